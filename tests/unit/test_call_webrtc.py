"""The controller's side of WebRTC calls (protocol.md §5.2), with a fake ICE-taking leg on a Clock."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from activecall.call.controller import MAX_EARLY_ICE_CANDIDATES, CallController
from activecall.control import commands as cmds
from activecall.control import events as ev
from activecall.control.dispatch import execute
from activecall.media.tracks import IIceLeg, LegOptionError
from activecall.testing import FakeDialer, FakeLeg, fake_call_services

from test_call_controller import SST, FakeSession


@implementer(IIceLeg)
class IceLeg(FakeLeg):
    """A FakeLeg that keeps the candidates it is given; ``bad`` ones raise as a malformed one would."""

    handshake_done = False

    def __init__(self) -> None:
        super().__init__(answer_sdp="v=0\r\na=candidate:1 1 udp 1 127.0.0.1 5000 typ host\r\n")
        self.candidates: list[tuple[str, Optional[str], Optional[int]]] = []

    def add_ice_candidate(self, candidate: str, sdp_mid: Optional[str], sdp_mline_index: Optional[int]) -> None:
        if candidate == "bad":
            raise ValueError("candidate must be 'candidate:...'")
        self.candidates.append((candidate, sdp_mid, sdp_mline_index))


class WebRtcControllerTests(SynchronousTestCase):
    """Trickled candidates reach the leg in order, a dead peer ends only the media, errors name the field."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.services = fake_call_services(self.clock)
        self.session = FakeSession()
        self.dialer = FakeDialer()
        self.c = CallController("w1", SST, "webrtc", self.services, self.session, dialers={"webrtc": self.dialer})

    def run_cmd(self, obj: dict[str, Any]) -> Optional[Deferred[Any]]:
        return execute(self.c, cmds.command_from_object(obj))

    def answer(self) -> IceLeg:
        leg = IceLeg()
        verifyObject(IIceLeg, leg)
        self.dialer.attempts[-1][3].callback(leg)
        return leg

    def test_candidates_before_and_after_the_answer(self) -> None:
        """Candidates sent before invite and while negotiating are applied in order once the leg exists."""
        self.run_cmd({"command": "addIceCandidate", "candidate": "candidate:a", "sdpMid": "0"})
        self.run_cmd({"command": "invite", "option": {"offer": "v=0\r\n"}})
        self.run_cmd({"command": "addIceCandidate", "candidate": "candidate:b", "sdpMLineIndex": 0})
        self.assertEqual(self.dialer.attempts[-1][0].offer, "v=0\r\n")
        leg = self.answer()
        self.run_cmd({"command": "addIceCandidate", "candidate": "candidate:c", "sdpMlineIndex": 0})
        self.assertEqual(leg.candidates, [("candidate:a", "0", None), ("candidate:b", None, 0), ("candidate:c", None, 0)])
        self.assertEqual([e.name for e in self.session.events], ["trackStart", "answer"])
        self.assertIn("a=candidate:", self.session.of(ev.AnswerEvent)[0].sdp)

    def test_a_malformed_candidate_is_an_error_naming_the_field(self) -> None:
        """The leg refuses it: an error event about `candidate`; the call goes on."""
        self.run_cmd({"command": "invite", "option": {"offer": "v=0\r\n"}})
        self.answer()
        self.run_cmd({"command": "addIceCandidate", "candidate": "bad"})
        errors = self.session.of(ev.ErrorEvent)
        self.assertEqual(len(errors), 1)
        self.assertIn("candidate", errors[0].error)
        self.assertFalse(self.c.ended)

    def test_early_candidates_are_bounded(self) -> None:
        """A client flooding candidates before invite gets an error past the limit; nothing more is kept."""
        for i in range(MAX_EARLY_ICE_CANDIDATES + 3):
            self.run_cmd({"command": "addIceCandidate", "candidate": f"candidate:{i}"})
        self.assertEqual(len(self.c._ice_candidates), MAX_EARLY_ICE_CANDIDATES)
        self.assertEqual(len(self.session.of(ev.ErrorEvent)), 3)

    def test_candidates_on_other_calls_are_refused(self) -> None:
        """addIceCandidate on a /call or SIP session keeps its old error."""
        other = CallController("x", SST, "webSocket", self.services, self.session, dialers={})
        execute(other, cmds.command_from_object({"command": "addIceCandidate", "candidate": "candidate:a"}))
        self.assertEqual(self.session.of(ev.ErrorEvent)[-1].error,
                         "addIceCandidate not allowed: the call has no WebRTC leg")

    def test_a_dead_peer_ends_only_the_media(self) -> None:
        """media_ended: trackEnd{sid} at once, the session stays; hangup later sends no second trackEnd."""
        self.run_cmd({"command": "invite", "option": {"offer": "v=0\r\n"}})
        leg = self.answer()
        self.clock.advance(3)
        leg.events.media_ended("peer closed")
        ends = self.session.of(ev.TrackEndEvent)
        self.assertEqual([(e.track_id, e.duration) for e in ends], [("w1", 3000)])
        self.assertFalse(self.c.ended)
        self.assertFalse(leg.closed)
        leg.events.media_ended("peer failed")  # reported once
        self.run_cmd({"command": "hangup"})
        self.assertEqual(len(self.session.of(ev.TrackEndEvent)), 1)
        self.assertEqual(len(self.session.of(ev.HangupEvent)), 1)
        self.assertTrue(leg.closed)
        self.assertEqual(self.c.pending_timers, 0)

    def test_option_errors_are_reported_verbatim(self) -> None:
        """The dialer's 'Failed to setup track: ...' reaches the client as is (sender invite), then hangup."""
        self.dialer.setup_error = LegOptionError("Failed to setup track: option.offer (the client's SDP offer) is required")
        self.run_cmd({"command": "invite", "option": {}})
        error = self.session.of(ev.ErrorEvent)[0]
        self.assertEqual((error.sender, error.error),
                         ("invite", "Failed to setup track: option.offer (the client's SDP offer) is required"))
        self.assertTrue(self.c.ended)

    def test_a_negotiation_failure_is_reported_verbatim(self) -> None:
        """An offer the peer cannot take fails the dial's Deferred with the same kind of error."""
        self.run_cmd({"command": "invite", "option": {"offer": "v=0\r\nbad\r\n"}})
        self.dialer.attempts[-1][3].errback(LegOptionError("Failed to setup track: no common audio codec"))
        error = self.session.of(ev.ErrorEvent)[0]
        self.assertEqual(error.error, "Failed to setup track: no common audio codec")
        self.assertEqual([e.name for e in self.session.events][-1], "hangup")


class ReactorCheckTests(SynchronousTestCase):
    """WebRTC needs the asyncio reactor: a clear refusal instead of a hang (STACK.md pitfall)."""

    def log(self) -> Any:
        from twisted.logger import Logger

        return Logger()

    def test_configured_ice_servers_refuse_to_start(self) -> None:
        """[[ice_servers]] under another reactor: the daemon stops at start-up naming the key and the fix."""
        from activecall.config import parse_config
        from activecall.tap import _webrtc_dialer

        config = parse_config('[[ice_servers]]\nurls = ["turn:turn.example.org:3478"]\n')
        with self.assertRaises(SystemExit) as e:
            _webrtc_dialer(config, Clock(), None, None, self.log())
        self.assertIn("ice_servers", str(e.exception))
        self.assertIn("--reactor=asyncio", str(e.exception))

    def test_otherwise_webrtc_invites_fail_at_once(self) -> None:
        """Without ICE servers the daemon runs, and a WebRTC invite fails at once saying why."""
        from activecall.config import parse_config
        from activecall.tap import _webrtc_dialer

        dialer = _webrtc_dialer(parse_config(""), Clock(), None, None, self.log())
        with self.assertRaises(LegOptionError) as e:
            dialer.dial(None, "w1", lambda early: None)
        self.assertIn("Failed to setup track: WebRTC needs the asyncio reactor", str(e.exception))
        self.assertEqual(dialer.open_peers, 0)
