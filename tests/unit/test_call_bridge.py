"""Audio bridges between two calls (``bridge``/``unbridge``, protocol.md §5.8) on fakes and a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.call import events as ce
from activecall.call.controller import CallController, NotAllowedError
from activecall.control.dispatch import wire_event
from activecall.options import CallOption
from activecall.testing import FakeDialer, FakeLeg, FakeSynthesizer, fake_call_services, RecordingObserver

A_FRAME = b"\x01\x00" * 320
B_FRAME = b"\x02\x00" * 320
AGENT = b"\x10\x00" * 320


class _Source:
    """Agent audio of one call: a given frame every pull."""

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self.finished = False
        self.started_at = 0.0
        self.ssrc = 5
        self.play_id = None
        self.auto_hangup = False
        self.wait_input_timeout_ms = None

    def read_frame(self) -> bytes:
        return self.frame

    def cancel(self) -> None:
        pass


class BridgeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.dialer = FakeDialer()
        self.services = fake_call_services(self.clock, synthesizer=FakeSynthesizer(self.clock),
                                           dialers={"sip": self.dialer})

    def call(self, sid: str, leg_rate: int = 16000) -> tuple[CallController, FakeLeg, RecordingObserver]:
        obs = RecordingObserver()
        c = CallController(sid, "server-side-track", "sip", self.services, obs, dialers=self.services.dialers)
        c.dial(CallOption(callee=f"sip:{sid}@example.com"))
        leg = FakeLeg()
        leg.media_rate_hz = leg_rate
        leg.frame_bytes = leg_rate // 50 * 2
        self.dialer.attempts[-1][3].callback(leg)
        return c, leg, obs

    def tick(self, *legs: FakeLeg) -> None:
        """One media tick for every call: all receive phases, then all send phases."""
        for leg in legs:
            frames, leg.caller_frames = leg.caller_frames, []
            for frame in frames:
                leg.sink.write_frame(frame)
        for leg in legs:
            leg.sent.append(leg.source.read_frame())

    def test_remote_parties_hear_each_other_and_agents_only_their_own(self) -> None:
        """After bridge each remote party hears the other in the same tick; A's agent audio is mixed in for
        A's party only; both calls report their bridge track; unbridge ends both tracks and the audio."""
        a, a_leg, a_obs = self.call("s.a")
        b, b_leg, b_obs = self.call("s.b")
        a.bridge("s.b")
        self.assertEqual([e.track for e in a_obs.of(ce.TrackStarted)][-1], "bridge:s.a:to:s.b")
        self.assertEqual([e.track for e in b_obs.of(ce.TrackStarted)][-1], "bridge:s.b:to:s.a")
        self.assertEqual(wire_event(a_obs.of(ce.TrackStarted)[-1]).to_json()["trackId"], "bridge:s.a:to:s.b")
        a.track.set_source(_Source(AGENT))  # A's agent speaks
        a_leg.caller_frames.append(A_FRAME)
        b_leg.caller_frames.append(B_FRAME)
        self.tick(a_leg, b_leg)
        self.assertEqual(b_leg.sent[-1], A_FRAME)  # B's party hears A's, not A's agent
        self.assertEqual(a_leg.sent[-1], b"\x12\x00" * 320)  # A's party: its agent plus B's party
        self.clock.advance(3)
        b.unbridge("s.a")
        ended = {e.track: e.duration_s for e in a_obs.of(ce.TrackEnded) + b_obs.of(ce.TrackEnded)}
        self.assertEqual(ended, {"bridge:s.a:to:s.b": 3.0, "bridge:s.b:to:s.a": 3.0})
        a_leg.caller_frames.append(A_FRAME)
        self.tick(a_leg, b_leg)
        self.assertIsNone(b_leg.sent[-1])
        b.unbridge("s.a")  # none left: not an error
        self.assertEqual(a_obs.errors() + b_obs.errors(), [])

    def test_rates_are_converted_and_the_other_call_goes_on_when_one_ends(self) -> None:
        """An 8 kHz call bridged to a 16 kHz one gets frames of its own size; when B hangs up, A reports the
        end of its bridge track and keeps its call."""
        a, a_leg, a_obs = self.call("s.a", leg_rate=8000)
        b, b_leg, b_obs = self.call("s.b")
        b.bridge("s.a")
        for _ in range(3):
            a_leg.caller_frames.append(b"\x00\x10" * 160)
            b_leg.caller_frames.append(b"\x00\x10" * 320)
            self.tick(a_leg, b_leg)
        self.assertEqual((len(a_leg.sent[-1]), len(b_leg.sent[-1])), (320, 640))
        b.hangup("byClient", "client")
        self.assertEqual([e.track for e in a_obs.of(ce.TrackEnded)], ["bridge:s.a:to:s.b"])
        self.assertFalse(a.ended)
        self.assertEqual(a.bridges, {})
        self.assertNotIn("s.b", self.services.calls)

    def test_errors_and_rebridging(self) -> None:
        """Bridging to itself, to an unknown or ended call, or before the call has media fails with the spec's
        texts; bridging the same pair again replaces the bridge (one track each)."""
        a, a_leg, a_obs = self.call("s.a")
        b, b_leg, b_obs = self.call("s.b")
        a.bridge("s.a")
        a.bridge("s.x")
        self.assertEqual(a_obs.errors(), ["cannot bridge a call to itself", "bridge target session not found: s.x"])
        a.bridge("x" * 1_000_000)  # a hostile id is not echoed whole
        self.assertEqual(a_obs.errors()[-1], "bridge target session not found: " + "x" * 256)
        fresh = CallController("s.c", "server-side-track", "sip", self.services, RecordingObserver(),
                               dialers=self.services.dialers)
        self.assertRaises(NotAllowedError, fresh.bridge, "s.a")
        a.bridge("s.c")  # s.c has no leg yet
        self.assertEqual(a_obs.errors()[-1], "bridge target session not found: s.c")
        a.bridge("s.b")
        a.bridge("s.b")
        self.assertEqual(len(a.bridges), 1)
        self.assertEqual(len(b.track.mixes), 1)
        a_leg.caller_frames.append(A_FRAME)
        self.tick(a_leg, b_leg)
        self.assertEqual(b_leg.sent[-1], A_FRAME)  # once, not twice
        b.hangup("byClient", "client")
        a.bridge("s.b")
        self.assertEqual(a_obs.errors()[-1], "bridge target session not found: s.b")
