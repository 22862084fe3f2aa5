"""What a call hears: VAD and ASR events, barge-in, end of utterance and provider failures (fakes, Clock)."""

from __future__ import annotations

from typing import Any

import numpy as np
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.call import events as ce
from activecall.call.controller import CallController
from activecall.call.hearing import BargeIn, read_fillers
from activecall.control.dispatch import wire_event
from activecall.options import (
    AgcOption, CallOption, EouOption, InterruptionOption, SynthesisOption, TranscriptionOption, VadOption,
)
from activecall.speech.interfaces import RecognitionError, Transcript
from activecall.speech.registry import RecognizerRegistry
from activecall.testing import fake_call_services, FakeDialer, FakeLeg, FakeRecognizer, FakeSynthesizer, FakeVadEngine, RecordingObserver

SID = "s.hear"
FRAME_16K = b"\x10\x00" * 320
TTS = SynthesisOption(provider="fake")


class _Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.synth = FakeSynthesizer(self.clock, ms_per_char=20, chunk_ms=100, chunk_interval_s=0.01)
        self.streaming = FakeRecognizer("live", streaming=True)
        self.segments = FakeRecognizer("seg", streaming=False)
        self.backup = FakeRecognizer("backup", streaming=True)
        recognizers = RecognizerRegistry()
        recognizers.register("live", lambda s: self.streaming)
        recognizers.register("seg", lambda s: self.segments)
        recognizers.register("backup", lambda s: self.backup)
        self.vad = FakeVadEngine()
        self.dialer = FakeDialer()
        self.services = fake_call_services(self.clock, synthesizer=self.synth, dialers={"sip": self.dialer},
                                           recognizers=recognizers, vad=self.vad)
        self.obs = RecordingObserver()

    def call(self, leg_rate: int = 16000, **option: Any) -> tuple[CallController, FakeLeg]:
        c = CallController(SID, "sst", "sip", self.services, self.obs, dialers=self.services.dialers)
        c.dial(CallOption(callee="sip:bob@example.com", **option))
        leg = FakeLeg()
        leg.media_rate_hz = leg_rate
        leg.frame_bytes = leg_rate // 50 * 2
        self.dialer.attempts[-1][3].callback(leg)
        return c, leg

    def feed(self, leg: FakeLeg, ms: int) -> None:
        for _ in range(ms // 20):
            leg.sink.write_frame(bytes(leg.frame_bytes))
            self.clock.advance(0.02)


class VadEventTests(_Case):
    def test_speaking_and_silence_carry_speech_times(self) -> None:
        """speaking has the voice onset; the end-of-speech silence has the speech's start and length."""
        c, leg = self.call(vad=VadOption())
        [stream] = self.vad.streams
        self.assertEqual((stream.kind, stream.rate_hz), ("silero", 16000))
        self.feed(leg, 1000)
        stream.listener.speech_started(700)
        speaking = self.obs.of(ce.SpeechStarted)[0]
        self.assertAlmostEqual(speaking.started_at, self.clock.seconds() - 0.02 - 0.3, places=3)  # last frame 20 ms ago
        self.assertEqual(wire_event(speaking).to_json()["event"], "speaking")
        self.feed(leg, 500)
        stream.listener.speech_ended(700, 600)
        silence = self.obs.of(ce.SpeechEnded)[0]
        wire = wire_event(silence).to_json()
        self.assertEqual((wire["event"], wire["duration"]), ("silence", 600))
        self.assertEqual(wire["startTime"], int(speaking.started_at * 1000))
        stream.listener.silence_timeout(1300, 5000)
        self.assertEqual(self.obs.of(ce.SilenceLasted)[0].duration_ms, 5000)

    def test_g711_leg_runs_vad_at_8k_without_resampling(self) -> None:
        """An 8 kHz leg's frames reach VAD as they are; ASR gets them at 16 kHz."""
        c, leg = self.call(leg_rate=8000, vad=VadOption(), asr=TranscriptionOption(provider="live"))
        self.feed(leg, 100)
        [stream] = self.vad.streams
        self.assertEqual(stream.rate_hz, 8000)
        self.assertEqual(stream.frames[0], bytes(320))
        self.assertEqual(len(self.streaming.streams[0].audio), 5 * 640)

    def test_g711_sip_leg_vad_at_8k_by_decimation(self) -> None:
        """A 16 kHz leg carrying G.711 (narrowband) feeds VAD every other sample at 8 kHz; ASR keeps 16 kHz."""
        c = CallController(SID, "sst", "sip", self.services, self.obs, dialers=self.services.dialers)
        c.dial(CallOption(callee="sip:bob@example.com", vad=VadOption(), asr=TranscriptionOption(provider="live")))

        class NarrowLeg(FakeLeg):
            native_rate_hz = 8000

        leg = NarrowLeg()
        self.dialer.attempts[-1][3].callback(leg)
        frame = b"".join(int(i).to_bytes(2, "little", signed=True) for i in range(320))
        leg.sink.write_frame(frame)
        [stream] = self.vad.streams
        self.assertEqual(stream.rate_hz, 8000)
        self.assertEqual(stream.frames[-1], b"".join(int(i).to_bytes(2, "little") for i in range(0, 320, 2)))
        self.assertEqual(bytes(self.streaming.streams[0].audio), frame)

    def test_unknown_vad_type_is_an_error_and_asr_still_runs(self) -> None:
        """A bad vad.type is reported; the recognizer keeps hearing the caller."""
        c, leg = self.call(vad=VadOption(type="quantum"), asr=TranscriptionOption(provider="live"))
        errors = [e.message for e in self.obs.of(ce.ErrorOccurred)]
        self.assertEqual(errors, ["VAD type not available: quantum"])
        self.feed(leg, 40)
        self.assertEqual(len(self.streaming.streams[0].audio), 2 * 640)

    def test_nop_vad_opens_nothing(self) -> None:
        """vad.type nop: no VAD, no error."""
        self.call(vad=VadOption(type="nop"))
        self.assertEqual((self.vad.streams, self.obs.of(ce.ErrorOccurred)), ([], []))

    def test_speaking_cancels_wait_input_timeout(self) -> None:
        """Caller speech counts as input for waitInputTimeout."""
        c, leg = self.call(vad=VadOption())
        c.track._arm_wait_input(1000)
        self.vad.streams[0].listener.speech_started(0)
        self.clock.advance(2)
        self.assertEqual(self.obs.of(ce.InputTimedOut), [])

    def test_muted_caller_is_heard_as_silence(self) -> None:
        """mute of the caller's track zeroes what VAD and ASR receive."""
        c, leg = self.call(vad=VadOption())
        c.mute(SID, True)
        leg.sink.write_frame(FRAME_16K)
        self.assertEqual(self.vad.streams[0].frames[-1], bytes(640))


class AsrTests(_Case):
    def test_partials_and_finals_become_asr_events_with_metrics(self) -> None:
        """A streaming recognizer's results are asrDelta/asrFinal with epoch times, plus ttfb/completed metrics."""
        c, leg = self.call(asr=TranscriptionOption(provider="live", language="en"))
        self.assertEqual(self.vad.streams, [])  # a streaming recognizer needs no VAD
        stream = self.streaming.streams[0]
        self.assertEqual(stream.request.language, "en")
        self.feed(leg, 2000)
        stream.listener.transcript(Transcript(0, "hello", False, 1000, 1500))
        stream.listener.transcript(Transcript(0, "hello there", True, 1000, 1900, 0.9))
        delta, final = self.obs.of(ce.TranscriptHeard)
        self.assertEqual((delta.final, final.final, final.text, final.confidence), (False, True, "hello there", 0.9))
        wire = wire_event(final).to_json()
        self.assertEqual(wire["event"], "asrFinal")
        self.assertEqual(wire["endTime"] - wire["startTime"], 900)
        keys = [m.key for m in self.obs.of(ce.MetricsMeasured)]
        self.assertEqual(keys, ["ttfb.asr.live", "completed.asr.live"])
        self.assertLessEqual(abs(self.obs.of(ce.MetricsMeasured)[1].duration_ms - 120), 1)  # 100 ms + 20 since the last frame

    def test_segment_recognizer_gets_vad_hints_without_vad_events(self) -> None:
        """whisper-like recognizers need utterance bounds: VAD runs silently and drives them."""
        c, leg = self.call(asr=TranscriptionOption(provider="seg"))
        [vad] = self.vad.streams
        vad.listener.speech_started(100)
        vad.listener.speech_ended(100, 800)
        self.assertEqual(self.segments.streams[0].hints, [("started", 100), ("ended", 900)])
        self.assertEqual((self.obs.of(ce.SpeechStarted), self.obs.of(ce.SpeechEnded)), ([], []))

    def test_nop_vad_with_a_segment_recognizer_still_cuts_utterances(self) -> None:
        """vad nop means no VAD events; whisper-like recognizers still get a silent Silero."""
        c, leg = self.call(vad=VadOption(type="nop"), asr=TranscriptionOption(provider="seg"))
        self.assertEqual(self.obs.of(ce.ErrorOccurred), [])
        [vad] = self.vad.streams
        self.assertEqual(vad.kind, "silero")
        vad.listener.speech_started(0)
        self.assertEqual(self.obs.of(ce.SpeechStarted), [])
        self.assertEqual(self.segments.streams[0].hints, [("started", 0)])

    def test_unknown_provider_is_an_error_and_vad_still_runs(self) -> None:
        """An unknown asr.provider is reported; speaking events still come."""
        c, leg = self.call(vad=VadOption(), asr=TranscriptionOption(provider="nosuch"))
        self.assertEqual([e.message for e in self.obs.of(ce.ErrorOccurred)], ["ASR provider not available: nosuch"])
        self.vad.streams[0].listener.speech_started(0)
        self.assertEqual(len(self.obs.of(ce.SpeechStarted)), 1)

    def test_retryable_failure_reopens_then_falls_back(self) -> None:
        """A dropped connection is an error event and a new stream after a backoff; after the retries the
        configured fallback takes over; the call goes on."""
        c, leg = self.call(asr=TranscriptionOption(provider="live", extra={"fallback": "backup"}))
        for attempt in range(4):
            stream = self.streaming.streams[-1]
            stream.listener.failed(RecognitionError("connection lost", retryable=True))
            self.clock.advance(3)
        errors = self.obs.of(ce.ErrorOccurred)
        self.assertEqual(len(self.streaming.streams), 4)
        self.assertEqual({e.sender for e in errors}, {"live"})
        self.assertEqual(errors[0].code, 500)
        self.assertEqual(len(self.backup.streams), 1)
        self.assertNotIn("fallback", self.backup.streams[0].request.extra)
        self.backup.streams[0].listener.transcript(Transcript(0, "still here", True))
        self.assertEqual(self.obs.of(ce.TranscriptHeard)[-1].text, "still here")
        self.assertFalse(c.ended)

    def test_non_retryable_failure_stops_asr_only(self) -> None:
        """A refused key: one error, no retry, the call and its VAD go on."""
        c, leg = self.call(vad=VadOption(), asr=TranscriptionOption(provider="live"))
        self.streaming.streams[0].listener.failed(RecognitionError("401 unauthorized"))
        self.clock.advance(10)
        self.assertEqual(len(self.streaming.streams), 1)
        self.vad.streams[0].listener.speech_started(0)
        self.assertEqual(len(self.obs.of(ce.SpeechStarted)), 1)

    def test_dropped_utterance_is_an_error(self) -> None:
        """A busy or failed decode of one utterance is reported; the stream stays."""
        c, leg = self.call(asr=TranscriptionOption(provider="seg"))
        self.segments.streams[0].listener.dropped(RecognitionError("recognizer busy"))
        [error] = self.obs.of(ce.ErrorOccurred)
        self.assertIn("recognizer busy", error.message)
        self.assertEqual(error.sender, "seg")

    def test_hangup_closes_streams_and_silences_results(self) -> None:
        """After hangup VAD and ASR are closed and late results are dropped."""
        c, leg = self.call(vad=VadOption(), asr=TranscriptionOption(provider="live"))
        c.hangup("byClient", "client")
        self.assertTrue(self.vad.streams[0].closed)
        self.assertTrue(self.streaming.streams[0].closed)
        before = len(self.obs.events)
        self.streaming.streams[0].listener.transcript(Transcript(0, "late", True))
        self.vad.streams[0].listener.speech_started(0)
        self.assertEqual(len(self.obs.events), before)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class GainControlTests(_Case):
    QUIET = b"".join(int(30 * ((i // 20) % 2 * 2 - 1)).to_bytes(2, "little", signed=True) for i in range(320))  # -61 dBFS

    def test_agc_lifts_what_the_recognizer_hears_while_the_caller_speaks(self) -> None:
        """With agc the recognizer hears a quiet caller louder, and more so once the VAD has heard speech
        for a while; the VAD itself hears the caller as they are.  A streaming recognizer gets a silent VAD."""
        c, leg = self.call(asr=TranscriptionOption(provider="live"), agc=AgcOption())
        [vad] = self.vad.streams
        stream = self.streaming.streams[0]
        hiss = b"\x01\x00\xff\xff" * 160  # the line before the caller speaks: -90 dBFS
        leg.sink.write_frame(hiss)
        leg.sink.write_frame(self.QUIET)  # not speech yet to the VAD: the gain stays
        first = np.frombuffer(bytes(stream.audio)[640:], dtype="<i2")
        self.assertEqual(int(np.max(np.abs(first))), int(30 * 10 ** (15 / 20)))  # the initial 15 dB
        vad.listener.speech_started(20)
        for _ in range(150):
            leg.sink.write_frame(self.QUIET)
        last = np.frombuffer(bytes(stream.audio)[-640:], dtype="<i2")
        self.assertGreater(int(np.max(np.abs(last))), 30 * 10 ** (30 / 20))  # 6 dB/s for 3 s: over 30 dB
        self.assertEqual(vad.frames[-1], self.QUIET)
        self.assertEqual(self.obs.of(ce.SpeechStarted), [])

    def test_without_agc_the_recognizer_hears_the_caller_unchanged(self) -> None:
        c, leg = self.call(asr=TranscriptionOption(provider="live"))
        leg.sink.write_frame(self.QUIET)
        self.assertEqual(bytes(self.streaming.streams[0].audio), self.QUIET)

    def test_agc_without_a_vad_is_an_error_and_the_call_hears_on(self) -> None:
        self.services = fake_call_services(self.clock, synthesizer=self.synth, dialers={"sip": self.dialer},
                                           recognizers=self.services.recognizers, vad=None)
        c, leg = self.call(asr=TranscriptionOption(provider="live"), agc=AgcOption())
        errors = [e.message for e in self.obs.of(ce.ErrorOccurred)]
        self.assertIn("agc needs a VAD (agc is off for this call)", errors)
        leg.sink.write_frame(self.QUIET)
        self.assertEqual(bytes(self.streaming.streams[-1].audio), self.QUIET)


class BargeInTests(_Case):
    def speaking_call(self, **interruption: Any) -> tuple[CallController, FakeLeg]:
        c, leg = self.call(vad=VadOption(), asr=TranscriptionOption(provider="live"),
                           interruption=InterruptionOption(**interruption))
        c.say("This is a long sentence that the caller will talk over.", play_id="p1", option=TTS,
              end_of_stream=True)
        for _ in range(10):
            self.clock.advance(0.02)
            leg.tick()
        self.assertIsNotNone(leg.sent[-1])  # the agent is speaking
        return c, leg

    def test_speech_over_the_agent_cuts_it_within_a_tick(self) -> None:
        """speaking during TTS: interruption (playId, current) and trackEnd now, no agent frame after."""
        c, leg = self.speaking_call(ignore_first_ms=0)
        self.vad.streams[0].listener.speech_started(0)
        [cut] = self.obs.of(ce.PlayInterrupted)
        self.assertEqual(cut.play_id, "p1")
        self.assertGreater(cut.current_ms, 0)
        self.assertEqual(self.obs.of(ce.TrackEnded)[-1].play_id, "p1")
        for _ in range(50):
            leg.tick()
            self.clock.advance(0.02)
        self.assertEqual(set(leg.sent[-50:]), {None})

    def test_volume_fade_ms_fades_the_agent_out(self) -> None:
        """interruption.volumeFadeMs: interruption now, then 60 ms of fading agent audio, then trackEnd."""
        c, leg = self.speaking_call(ignore_first_ms=0, volume_fade_ms=60)
        self.vad.streams[0].listener.speech_started(0)
        self.assertEqual(len(self.obs.of(ce.PlayInterrupted)), 1)
        self.assertNotIn("p1", [e.play_id for e in self.obs.of(ce.TrackEnded)])  # still fading
        before = len(leg.sent)
        for _ in range(10):
            leg.tick()
            self.clock.advance(0.02)
        self.assertEqual(self.obs.of(ce.TrackEnded)[-1].play_id, "p1")
        audible = [f for f in leg.sent[before:] if f is not None]
        self.assertEqual(len(audible), 3)
        self.vad.streams[0].listener.speech_started(0)  # speech again: no second interruption
        self.assertEqual(len(self.obs.of(ce.PlayInterrupted)), 1)

    def test_same_play_id_after_a_cut_starts_fresh(self) -> None:
        """A tts for the cut play's id is a new play: the old sentences never resume."""
        c, leg = self.speaking_call(ignore_first_ms=0)
        self.vad.streams[0].listener.speech_started(0)
        c.say("New answer.", play_id="p1", option=TTS, end_of_stream=True)
        self.assertEqual([s.text for s in c.track.source.sentences], ["New answer."])

    def test_strategy_gates_and_ignore_first(self) -> None:
        """strategy none never cuts; asr ignores VAD; ignoreFirstMs protects the start of a response."""
        c, leg = self.speaking_call(strategy="none", ignore_first_ms=0)
        self.vad.streams[0].listener.speech_started(0)
        self.streaming.streams[0].listener.transcript(Transcript(0, "wait", False))
        self.assertEqual(self.obs.of(ce.PlayInterrupted), [])
        c.hangup("byClient", "client")

        self.obs.events.clear()
        c, leg = self.speaking_call(strategy="asr", ignore_first_ms=0)
        self.vad.streams[-1].listener.speech_started(0)
        self.assertEqual(self.obs.of(ce.PlayInterrupted), [])
        self.streaming.streams[-1].listener.transcript(Transcript(0, "wait", False))
        self.assertEqual(len(self.obs.of(ce.PlayInterrupted)), 1)
        c.hangup("byClient", "client")

        self.obs.events.clear()
        c, leg = self.speaking_call(ignore_first_ms=10_000)
        self.vad.streams[-1].listener.speech_started(0)
        self.assertEqual(self.obs.of(ce.PlayInterrupted), [])

    def test_filler_words_do_not_cut(self) -> None:
        """With fillerWordFilter an "um" partial is flagged and ignored; real words cut."""
        c, leg = self.speaking_call(strategy="asr", ignore_first_ms=0, filler_word_filter=True)
        listener = self.streaming.streams[0].listener
        listener.transcript(Transcript(0, "Um.", False))
        self.assertEqual(self.obs.of(ce.PlayInterrupted), [])
        self.assertTrue(self.obs.of(ce.TranscriptHeard)[-1].is_filler)
        listener.transcript(Transcript(0, "Um, stop", False))
        self.assertEqual(len(self.obs.of(ce.PlayInterrupted)), 1)

    def test_no_barge_in_without_the_option_or_during_a_goodbye(self) -> None:
        """API calls opt in with option.interruption; an autoHangup play is never cut."""
        c, leg = self.call(vad=VadOption())
        c.say("Hello there.", play_id="p", option=TTS, end_of_stream=True)
        self.clock.advance(0.5)
        self.vad.streams[0].listener.speech_started(0)
        self.assertEqual(self.obs.of(ce.PlayInterrupted), [])
        c, leg = self.call(vad=VadOption(), interruption=InterruptionOption(ignore_first_ms=0))
        c.say("Goodbye.", play_id="bye", option=TTS, end_of_stream=True, auto_hangup=True)
        self.clock.advance(0.5)
        self.vad.streams[-1].listener.speech_started(0)
        self.assertEqual(self.obs.of(ce.PlayInterrupted), [])

    def test_policy_final_grace_and_fillers_file(self) -> None:
        """A partial right after a final does not cut (500 ms); fillers.txt replaces the built-in list."""
        policy = BargeIn(InterruptionOption(ignore_first_ms=0))
        self.assertFalse(policy.allows(False, "yes", 5000, 200, 0))
        self.assertTrue(policy.allows(False, "yes", 5000, 800, 0))
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("Hmm\n\n  okay \n")
        self.assertEqual(read_fillers(path), frozenset({"hmm", "okay"}))
        self.assertEqual(read_fillers(path + ".missing"), frozenset())


class EndOfUtteranceTests(_Case):
    def test_eou_after_silence_with_the_turns_words(self) -> None:
        """eou comes eou.timeout after the end of speech, once the final transcript is in, with its text."""
        c, leg = self.call(asr=TranscriptionOption(provider="seg"), eou=EouOption(timeout=500))
        vad = self.vad.streams[0]
        vad.listener.speech_started(0)
        vad.listener.speech_ended(0, 900)
        self.clock.advance(0.6)
        self.assertEqual(self.obs.of(ce.TurnEnded), [])  # still waiting for the words
        self.segments.streams[0].listener.transcript(Transcript(0, "book a table", True))
        self.clock.advance(0.6)
        [turn] = self.obs.of(ce.TurnEnded)
        self.assertEqual((turn.completed, turn.text), (True, "book a table"))
        self.assertEqual(wire_event(turn).to_json()["event"], "eou")

    def test_speech_resuming_cancels_eou_and_unknown_type_errors(self) -> None:
        """Voice again before the timeout: no eou. A non-silence eou type is an error."""
        c, leg = self.call(vad=VadOption(), eou=EouOption(timeout=500))
        vad = self.vad.streams[0]
        vad.listener.speech_started(0)
        vad.listener.speech_ended(0, 900)
        self.clock.advance(0.3)
        vad.listener.speech_started(1200)
        self.clock.advance(1)
        self.assertEqual(self.obs.of(ce.TurnEnded), [])
        self.call(eou=EouOption(type="smart_turn"))
        self.assertTrue(any(e.message.startswith("EOU type not available: smart_turn") for e in self.obs.of(ce.ErrorOccurred)))


class TransferLegTests(_Case):
    def test_transfer_leg_is_heard_with_refer_and_pauses_the_parent_asr(self) -> None:
        """refer.options.vad/asr hear the transfer target (events on SST with refer:true); pauseParentAsr
        stops the caller's ASR until the transfer leg ends (autoHangup false)."""
        from activecall.options import ReferOption

        c, leg = self.call(asr=TranscriptionOption(provider="live"))
        c.transfer("sip:agent@example.com", options=ReferOption(
            vad=VadOption(), asr=TranscriptionOption(provider="live"), pause_parent_asr=True, auto_hangup=False))
        target = FakeLeg(ssrc=7)
        self.dialer.attempts[-1][3].callback(target)
        parent, child = self.streaming.streams
        self.assertTrue(c.hearing.asr_paused)
        self.feed(leg, 100)
        self.assertEqual(len(parent.audio), 0)
        target.sink.write_frame(bytes(640))
        self.assertEqual(len(child.audio), 640)
        self.vad.streams[-1].listener.speech_started(0)
        speaking = self.obs.of(ce.SpeechStarted)[-1]
        self.assertEqual((speaking.track, speaking.refer), ("sst", True))
        self.assertTrue(wire_event(speaking).to_json()["refer"])
        child.listener.transcript(Transcript(0, "agent here", True))
        final = self.obs.of(ce.TranscriptHeard)[-1]
        self.assertEqual((final.track, final.refer), ("sst", True))
        target.events.ended("hangup")
        self.assertTrue(child.closed)
        self.assertFalse(c.hearing.asr_paused)
        self.feed(leg, 40)
        self.assertEqual(len(parent.audio), 2 * 640)


    def test_transfer_leg_agc_lifts_only_the_target(self) -> None:
        """refer.options.agc applies to what the transfer target's recognizer hears, not to the caller's."""
        from activecall.options import ReferOption

        c, leg = self.call(asr=TranscriptionOption(provider="live"))
        c.transfer("sip:agent@example.com", options=ReferOption(
            asr=TranscriptionOption(provider="live"), agc=AgcOption(), auto_hangup=False))
        target = FakeLeg(ssrc=7)
        self.dialer.attempts[-1][3].callback(target)
        parent, child = self.streaming.streams
        quiet = GainControlTests.QUIET
        target.sink.write_frame(quiet)
        leg.sink.write_frame(quiet)
        self.assertEqual(int(np.max(np.abs(np.frombuffer(bytes(child.audio), dtype="<i2")))),
                         int(30 * 10 ** (15 / 20)))
        self.assertEqual(bytes(parent.audio), quiet)


class StreamingEouTests(_Case):
    def test_final_before_vad_end_does_not_delay_eou(self) -> None:
        """A streaming final that beat the VAD's end of speech: eou comes after the timeout, not 2 s later."""
        c, leg = self.call(vad=VadOption(), asr=TranscriptionOption(provider="live"), eou=EouOption(timeout=300))
        vad = self.vad.streams[0]
        vad.listener.speech_started(0)
        self.streaming.streams[0].listener.transcript(Transcript(0, "yes please", True))
        vad.listener.speech_ended(0, 700)
        self.clock.advance(0.35)
        self.assertEqual([t.text for t in self.obs.of(ce.TurnEnded)], ["yes please"])
