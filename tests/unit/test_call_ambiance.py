"""Ambiance (protocol.md §4.8, config.md §11): the looped background sound under the agent's voice."""

from __future__ import annotations

import os
import tempfile
import wave
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.call import events as ce
from activecall.call.ambiance import Ambiance, AmbianceSettings, resolve_ambiance
from activecall.call.controller import CallController
from activecall.config import AmbianceConfig
from activecall.options import AmbianceOption, CallOption, SynthesisOption
from activecall.testing import fake_call_services, FakeDialer, FakeLeg, FakeRecorder, FakeSynthesizer, RecordingObserver

SID = "s.ambiance"
SST = "server-side-track"
FRAME = 640  # bytes of 20 ms at 16 kHz (FakeLeg)
SAMPLES = FRAME // 2
LEVEL = 10000  # the constant sample of the test's ambiance file


def pcm(values: Any) -> bytes:
    return np.asarray(values, dtype="<i2").tobytes()


def samples(frame: bytes | None) -> np.ndarray:
    assert frame is not None
    return np.frombuffer(frame, dtype="<i2").astype(np.int32)


def write_wav(path: str, data: bytes, rate: int = 16000) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data)


class MixTests(SynchronousTestCase):
    """Ambiance.mix on its own: gain, looping, saturation."""

    def make(self, data: bytes, **levels: float) -> Ambiance:
        ambiance = Ambiance(AmbianceSettings("bg.wav", **levels), FRAME, max_bytes=16000 * 2 * 120)
        self.assertTrue(ambiance.loaded(data))
        return ambiance

    def test_not_loaded_hands_the_agent_frame_back(self) -> None:
        """Before the file is decoded nothing is added: silence stays None, the agent's frame is untouched."""
        ambiance = Ambiance(AmbianceSettings("bg.wav"), FRAME, max_bytes=1000)
        self.assertIsNone(ambiance.mix(None))
        agent = pcm([5] * SAMPLES)
        self.assertIs(ambiance.mix(agent), agent)
        self.assertFalse(ambiance.playing)

    def test_alone_at_normal_level(self) -> None:
        """With the agent silent the ambiance is sent alone at normalLevel, from the first frame."""
        ambiance = self.make(pcm([LEVEL] * 1600))
        for _ in range(3):
            frame = ambiance.mix(None)
            self.assertEqual(len(frame or b""), FRAME)
            self.assertEqual(set(samples(frame)), {3000})

    def test_ducks_with_the_transition_slope_and_recovers(self) -> None:
        """Under agent frames the gain steps down by transitionSpeed to duckLevel, then back up when silent."""
        ambiance = self.make(pcm([LEVEL] * 1600), duck_level=0.1, normal_level=0.3, transition_speed=0.05)
        agent = pcm([100] * SAMPLES)
        added = [int(samples(ambiance.mix(agent))[0]) - 100 for _ in range(6)]
        self.assertEqual(added, [2500, 2000, 1500, 1000, 1000, 1000])
        alone = [int(samples(ambiance.mix(None))[0]) for _ in range(6)]
        self.assertEqual(alone, [1500, 2000, 2500, 3000, 3000, 3000])

    def test_loops_over_frame_boundaries(self) -> None:
        """The file restarts where it ends, inside a frame, and a file shorter than a frame repeats in it."""
        ambiance = self.make(pcm(np.arange(480)), normal_level=1.0)
        first, second, third = (samples(ambiance.mix(None)) for _ in range(3))
        self.assertEqual(list(first), list(range(320)))
        self.assertEqual(list(second), list(range(320, 480)) + list(range(160)))
        self.assertEqual(list(third), list(range(160, 480)))
        short = self.make(pcm(np.arange(100)), normal_level=1.0)
        self.assertEqual(list(samples(short.mix(None))), [i % 100 for i in range(320)])
        self.assertEqual(int(samples(short.mix(None))[0]), 20)

    def test_saturates_instead_of_wrapping(self) -> None:
        """Loud agent audio plus ambiance clips at the int16 limits."""
        ambiance = self.make(pcm([30000, -30000, 1000, -1000] * 80), duck_level=1.0, normal_level=1.0)
        mixed = samples(ambiance.mix(pcm([30000, -30000, 30000, -30000] * 80)))
        self.assertEqual(list(mixed[:4]), [32767, -32768, 31000, -31000])

    def test_long_file_is_bounded_and_empty_is_refused(self) -> None:
        """Only max_bytes of the file are kept; a file without a whole sample holds no audio."""
        ambiance = Ambiance(AmbianceSettings("bg.wav", normal_level=1.0), FRAME, max_bytes=FRAME + 1)
        self.assertTrue(ambiance.loaded(pcm(np.arange(1000))))
        ambiance.mix(None)
        self.assertEqual(int(samples(ambiance.mix(None))[0]), 0, "looped after one frame")
        self.assertFalse(Ambiance(AmbianceSettings("bg.wav"), FRAME, max_bytes=100).loaded(b"\x01"))

    def test_stop_adds_nothing_more(self) -> None:
        """After stop the agent's frame passes untouched and silence stays silence."""
        ambiance = self.make(pcm([LEVEL] * 1600))
        ambiance.stop()
        self.assertIsNone(ambiance.mix(None))
        self.assertFalse(ambiance.playing)


class ResolveTests(SynchronousTestCase):
    """Which settings a call's ambiance block gives, the [ambiance] table filling its gaps."""

    def test_table_fills_unset_keys_and_option_wins(self) -> None:
        """Unset keys (and an empty path) come from the table; given ones are kept."""
        table = AmbianceConfig(path="table.wav", duck_level=0.2, normal_level=0.5)
        settings, errors = resolve_ambiance(AmbianceOption(path="", normal_level=0.4), table)
        self.assertEqual(errors, [])
        self.assertEqual(settings, AmbianceSettings("table.wav", 0.2, 0.4, 0.01))
        settings, _ = resolve_ambiance(AmbianceOption(path="own.wav"), None)
        self.assertEqual(settings, AmbianceSettings("own.wav", 0.1, 0.3, 0.01))

    def test_nothing_without_block_path_or_when_disabled(self) -> None:
        """No ambiance block, no path anywhere, or enabled false (here or in the table): no ambiance."""
        table = AmbianceConfig(path="table.wav")
        self.assertEqual(resolve_ambiance(None, table), (None, []))
        self.assertEqual(resolve_ambiance(AmbianceOption(), AmbianceConfig()), (None, []))
        self.assertEqual(resolve_ambiance(AmbianceOption(enabled=False), table), (None, []))
        self.assertEqual(resolve_ambiance(AmbianceOption(), AmbianceConfig(path="t.wav", enabled=False)), (None, []))
        self.assertIsNotNone(resolve_ambiance(AmbianceOption(enabled=True), AmbianceConfig(path="t.wav", enabled=False))[0])

    def test_levels_outside_0_1_are_errors_and_defaults_apply(self) -> None:
        """A level outside 0..1 (or NaN) is reported with its key and replaced by the built-in default."""
        settings, errors = resolve_ambiance(
            AmbianceOption(path="a.wav", duck_level=1.5, transition_speed=-0.1, normal_level=float("nan")),
            AmbianceConfig(normal_level=0.5))
        self.assertEqual(settings, AmbianceSettings("a.wav", 0.1, 0.3, 0.01))
        self.assertEqual(errors, [
            "invalid option.ambiance.duckLevel: must be a number between 0 and 1",
            "invalid option.ambiance.normalLevel: must be a number between 0 and 1",
            "invalid option.ambiance.transitionSpeed: must be a number between 0 and 1",
        ])
        _, errors = resolve_ambiance(AmbianceOption(path="a.wav"), AmbianceConfig(normal_level=2.0))
        self.assertEqual(errors, ["invalid ambiance.normalLevel: must be a number between 0 and 1"])


class CallAmbianceTests(SynchronousTestCase):
    """An answered call with option.ambiance: what its leg pulls, with TTS, recording and hangup."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.synth = FakeSynthesizer(self.clock, ms_per_char=20, chunk_ms=100, chunk_interval_s=0.01)
        self.dialer = FakeDialer()
        self.media = tempfile.mkdtemp()
        self.bg = os.path.join(self.media, "bg.wav")
        write_wav(self.bg, pcm([LEVEL] * 8000))  # 0.5 s
        self.services = fake_call_services(self.clock, synthesizer=self.synth, dialers={"sip": self.dialer},
                                           inbound_legs=self.dialer, media_dirs=(self.media,))
        self.obs = RecordingObserver()

    def answered(self, ambiance: AmbianceOption | None, **option: Any) -> tuple[CallController, FakeLeg]:
        c = CallController(SID, SST, "sip", self.services, self.obs, dialers=self.services.dialers)
        c.dial(CallOption(callee="sip:bob@example.com", ambiance=ambiance, **option))
        leg = FakeLeg(ssrc=99)
        self.dialer.attempts[-1][3].callback(leg)
        return c, leg

    def tick(self, leg: FakeLeg, n: int) -> list[bytes | None]:
        start = len(leg.sent)
        for _ in range(n):
            self.clock.advance(0.02)
            leg.tick()
        return leg.sent[start:]

    def errors(self) -> list[tuple[str, str]]:
        return [(e.sender, e.message) for e in self.obs.of(ce.ErrorOccurred)]

    def test_heard_alone_while_the_agent_is_silent(self) -> None:
        """Every pull carries the ambiance at normalLevel, also past the end of the file (it loops)."""
        c, leg = self.answered(AmbianceOption(path=self.bg))
        frames = self.tick(leg, 40)  # 0.8 s of a 0.5 s file
        self.assertEqual(self.errors(), [])
        self.assertEqual([set(samples(f)) for f in frames], [{3000}] * 40)
        c.hangup("byClient", "client")

    def test_ducked_under_tts_with_the_transition_slope(self) -> None:
        """While TTS plays the ambiance under it falls 0.01 per frame to duckLevel, and rises again after."""
        c, leg = self.answered(AmbianceOption(path=self.bg), tts=SynthesisOption(provider="fake"))
        self.tick(leg, 2)
        c.say("x" * 30, play_id="p", end_of_stream=True)  # 600 ms of tone
        frames: list[bytes | None] = []
        gains: list[float] = []
        for _ in range(45):
            frames += self.tick(leg, 1)
            gains.append(c.track.ambiance.gain if c.track.ambiance is not None else -1.0)
        self.assertEqual(self.errors(), [])
        tone = samples(self.synth.audio_for(self.synth.requests[0]))
        spoken = [i for i, f in enumerate(frames) if f is not None and set(samples(f)) != {round(gains[i] * LEVEL)}]
        self.assertEqual(len(spoken), 30, "30 frames of speech")
        for k, i in enumerate(spoken):
            expected = np.clip(tone[k * SAMPLES:(k + 1) * SAMPLES] + round(gains[i] * LEVEL), -32768, 32767)
            self.assertEqual(list(samples(frames[i])), list(expected))
        ducking = [round(gains[i], 6) for i in spoken]
        self.assertEqual(ducking[:21], [round(0.29 - 0.01 * k, 6) for k in range(20)] + [0.1])
        self.assertEqual(set(ducking[20:]), {0.1})
        after = [round(g, 6) for g in gains[spoken[-1] + 1:]]
        self.assertEqual(after[:3], [0.11, 0.12, 0.13])
        c.hangup("byClient", "client")

    def test_recording_and_subscribe_get_the_mixed_frame(self) -> None:
        """The recording's agent channel and the subscribe mirror carry what the leg sends."""
        recorder = FakeRecorder()
        self.services.make_recorder = lambda path: recorder
        self.services.auto_record = True
        self.services.recording_path = tempfile.mkdtemp()
        c, leg = self.answered(AmbianceOption(path=self.bg), subscribe=True)
        frames = self.tick(leg, 3)
        self.assertEqual(bytes(recorder.right), b"".join(f or b"" for f in frames))
        self.assertEqual(set(samples(bytes(recorder.right))), {3000})
        self.assertEqual(self.obs.audio[-1], b"\x00" + (frames[-1] or b""))
        c.hangup("byClient", "client")

    def test_missing_or_outside_file_is_an_error_and_the_call_goes_on(self) -> None:
        """A missing file or one outside the media directories: an ambiance error, nothing mixed, no hangup."""
        outside = os.path.join(tempfile.mkdtemp(), "secret.wav")
        write_wav(outside, pcm([LEVEL] * 1600))
        c, leg = self.answered(AmbianceOption(path=outside))
        self.assertEqual(self.errors(),
                         [("ambiance", f"invalid option.ambiance.path: {outside} is not in a media directory")])
        self.assertEqual(self.tick(leg, 3), [None] * 3)
        self.assertFalse(c.ended)
        c.hangup("byClient", "client")
        self.obs = RecordingObserver()
        c, leg = self.answered(AmbianceOption(path=os.path.join(self.media, "missing.wav")))
        [(sender, _)] = self.errors()
        self.assertEqual(sender, "ambiance")
        self.assertEqual(self.tick(leg, 3), [None] * 3)
        self.assertFalse(c.ended)
        c.hangup("byClient", "client")

    def test_disabled_or_absent_plays_nothing(self) -> None:
        """enabled false, or no ambiance block while the [ambiance] table has a path: nothing is added."""
        self.services.ambiance_defaults = AmbianceConfig(path=self.bg)
        c, leg = self.answered(AmbianceOption(enabled=False))
        self.assertIsNone(c.track.ambiance)
        self.assertEqual(self.tick(leg, 3), [None] * 3)
        c.hangup("byClient", "client")
        c, leg = self.answered(None)
        self.assertEqual(self.tick(leg, 3), [None] * 3)
        c.hangup("byClient", "client")
        self.assertEqual(self.errors(), [])

    def test_table_path_fills_an_empty_block(self) -> None:
        """An ambiance block without a path plays the [ambiance] table's file at the table's level."""
        self.services.ambiance_defaults = AmbianceConfig(path=self.bg, normal_level=0.5)
        c, leg = self.answered(AmbianceOption())
        self.assertEqual(set(samples(self.tick(leg, 1)[0])), {5000})
        c.hangup("byClient", "client")

    def test_bad_level_is_reported_and_the_default_used(self) -> None:
        """normalLevel 3 is an ambiance error naming option.ambiance.normalLevel; 0.3 is used."""
        c, leg = self.answered(AmbianceOption(path=self.bg, normal_level=3.0))
        self.assertEqual(self.errors(),
                         [("ambiance", "invalid option.ambiance.normalLevel: must be a number between 0 and 1")])
        self.assertEqual(set(samples(self.tick(leg, 1)[0])), {3000})
        c.hangup("byClient", "client")

    def test_mute_silences_the_ambiance_too(self) -> None:
        """A muted agent track sends no ambiance either."""
        c, leg = self.answered(AmbianceOption(path=self.bg))
        c.mute(SST, True)
        self.assertEqual(self.tick(leg, 2), [None] * 2)
        c.mute(SST, False)
        self.assertEqual(set(samples(self.tick(leg, 1)[0])), {3000})
        c.hangup("byClient", "client")

    def test_hangup_stops_it_and_cancels_a_pending_load(self) -> None:
        """Hangup stops the ambiance; a decoding still running is cancelled and reports nothing."""
        c, leg = self.answered(AmbianceOption(path=self.bg))
        ambiance = c.track.ambiance
        assert ambiance is not None
        c.hangup("byClient", "client")
        self.assertTrue(ambiance.stopped)
        self.assertIsNone(c.track.read_frame())
        self.assertEqual(self.clock.getDelayedCalls(), [])

        self.obs = RecordingObserver()
        loads: list[Deferred[Any]] = []

        def blocking(f: Any, *args: Any) -> Deferred[Any]:
            if f.__name__ == "decode_and_store":
                d: Deferred[Any] = Deferred()
                loads.append(d)
                return d
            return maybeDeferred(f, *args)

        self.services.run_blocking = blocking
        fresh = os.path.join(self.media, "fresh.wav")  # not in the media cache yet
        write_wav(fresh, pcm([LEVEL] * 1600))
        c, leg = self.answered(AmbianceOption(path=fresh))
        self.assertEqual(len(loads), 1)
        self.assertEqual(self.tick(leg, 2), [None] * 2, "nothing to mix while decoding")
        c.hangup("byClient", "client")
        self.assertTrue(loads[0].called, "the decoding was cancelled")
        self.assertEqual(self.errors(), [])
