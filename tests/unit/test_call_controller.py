"""CallController on /call, driven by a Clock, a fake synthesizer and an in-memory session."""

from __future__ import annotations

import tempfile
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.call.controller import CallController
from activecall.control import commands as cmds
from activecall.control import events as ev
from activecall.control.dispatch import execute, wire_event
from activecall.legs.websocket import ControlSocketAudio, WebSocketDialer
from activecall.speech.interfaces import SynthesisError
from activecall.testing import fake_call_services, FakeRecorder, FakeSynthesizer

SID = "s.test"
SST = "server-side-track"


class FakeSession:
    """Collects what the controller emits."""

    sid = SID
    call_type = "webSocket"
    server_side_track = SST
    dump_path = None

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.audio: list[bytes] = []
        self.finished = False

    def emit(self, event: Any) -> None:
        self.events.append(event)

    def send_audio(self, data: bytes) -> None:
        self.audio.append(data)

    def finish(self) -> None:
        self.finished = True

    def call_event(self, event: Any) -> None:
        self.emit(wire_event(event))

    def client_audio(self, data: bytes) -> None:
        self.send_audio(data)

    def call_finished(self) -> None:
        self.finish()

    def names(self) -> list[str]:
        return [e.name for e in self.events]

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]


class _ControllerCase(SynchronousTestCase):
    """A controller on a Clock with a fake synthesizer and session."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.synth = FakeSynthesizer(self.clock, ms_per_char=20, chunk_ms=100, chunk_interval_s=0.01)
        self.fetched: list[str] = []
        self.services = fake_call_services(self.clock, synthesizer=self.synth)
        self.session = FakeSession()
        self.c = self.controller()

    def controller(self, call_type: str = "webSocket") -> CallController:
        """A controller for ``self.session``; /call sessions carry their audio in ``self.audio``."""
        self.audio = ControlSocketAudio(self.session.send_audio)
        dialers = {"webSocket": WebSocketDialer(self.audio, self.services.media_clock, self.clock, self.services.ids)}
        return CallController(self.session.sid, SST, call_type, self.services, self.session, dialers=dialers)

    def run_cmd(self, obj: dict[str, Any]) -> None:
        execute(self.c, cmds.command_from_object(obj))

    def invite(self, **option: Any) -> None:
        option.setdefault("codec", "pcm")
        option.setdefault("tts", {"provider": "fake"})
        self.run_cmd({"command": "invite", "option": option})

    def advance(self, seconds: float) -> None:
        for _ in range(int(round(seconds / 0.01))):
            self.clock.advance(0.01)



class ControllerTests(_ControllerCase):
    """Commands on a raw-audio call produce the events and audio of spec §5.3/§5.7."""

    def test_invite_answers_with_track_start(self) -> None:
        """invite on /call emits trackStart{sid} then answer{sid, sdp:""}."""
        self.invite()
        self.assertEqual(self.session.names(), ["trackStart", "answer"])
        self.assertEqual(self.session.events[0].track_id, SID)
        self.assertEqual(self.session.events[1].sdp, "")

    def test_tts_plays_paced_frames_then_track_end(self) -> None:
        """A tts play sends one 640-byte frame per 20 ms tick and ends with trackEnd{SST, playId}."""
        self.invite()
        self.run_cmd({"command": "tts", "text": "x" * 50, "playId": "p1", "endOfStream": True})
        start = self.session.of(ev.TrackStartEvent)[-1]
        self.assertEqual((start.track_id, start.play_id), (SST, "p1"))
        self.advance(0.5)
        self.assertEqual({len(a) for a in self.session.audio}, {640})
        self.assertIn(len(self.session.audio), range(23, 26), "about 25 frames in 0.5 s")
        self.advance(1.0)
        end = self.session.of(ev.TrackEndEvent)[-1]
        self.assertEqual((end.track_id, end.play_id), (SST, "p1"))
        self.assertEqual(len(self.session.audio), 50, "1000 ms of audio = 50 frames")
        self.assertGreaterEqual(end.duration, 1000)
        metrics = self.session.of(ev.MetricsEvent)
        self.assertEqual(metrics[0].key, "completed.tts.fake")
        self.assertEqual(metrics[0].data["cached"], False)
        self.run_cmd({"command": "hangup"})
        self.assertEqual(len(self.services.media_clock), 0, "the call left the media clock")

    def test_play_without_end_of_stream_stays_open(self) -> None:
        """Without endOfStream the play never ends: no trackEnd."""
        self.invite()
        self.run_cmd({"command": "tts", "text": "hello", "playId": "p1"})
        self.advance(2)
        self.assertEqual(self.session.of(ev.TrackEndEvent), [])

    def test_same_play_id_appends_other_play_id_interrupts(self) -> None:
        """Same playId queues text; a different playId cuts with interruption then trackEnd."""
        self.invite()
        self.run_cmd({"command": "tts", "text": "a" * 20, "playId": "p1"})
        self.run_cmd({"command": "tts", "text": "b" * 20, "playId": "p1"})
        self.assertEqual(len(self.session.of(ev.TrackStartEvent)), 2, "call + one play")
        self.assertEqual(len(self.synth.requests), 1, "sentences are synthesized one at a time")
        self.advance(0.03)
        self.run_cmd({"command": "tts", "text": "c", "playId": "p2", "endOfStream": True})
        names = self.session.names()
        i = names.index("interruption")
        self.assertEqual(names[i:i + 3], ["interruption", "trackEnd", "trackStart"])
        interruption = self.session.of(ev.InterruptionEvent)[0]
        self.assertEqual((interruption.play_id, interruption.subtitle), ("p1", "a" * 20))
        self.assertGreater(interruption.current, 0)
        self.assertGreaterEqual(interruption.total_duration, interruption.current)
        self.assertEqual(self.synth.cancelled, 1, "the running synthesis was cancelled")
        self.assertEqual([r.text for r in self.synth.requests], ["a" * 20, "c"], "b was never synthesized")

    def test_graceful_interrupt_finishes_the_sentence(self) -> None:
        """interrupt graceful: interruption now, trackEnd only after the current sentence, rest dropped."""
        self.invite()
        self.run_cmd({"command": "tts", "text": "a" * 20, "playId": "p1"})
        self.run_cmd({"command": "tts", "text": "b" * 20, "playId": "p1"})
        self.advance(0.1)
        self.run_cmd({"command": "interrupt", "graceful": True})
        self.assertEqual(self.session.names()[-1], "interruption")
        self.advance(0.2)
        self.assertEqual(self.session.of(ev.TrackEndEvent), [], "still finishing sentence a")
        self.advance(0.5)
        self.assertEqual(len(self.session.of(ev.TrackEndEvent)), 1)
        self.assertEqual(len(self.session.audio), 20, "400 ms sentence a only")

    def test_interrupt_with_fade_out(self) -> None:
        """interrupt fadeOutMs: interruption at once, the speech fades to silence over that time (frame by frame
        quieter), then trackEnd; the queued rest is dropped."""
        import numpy as np

        self.invite()
        self.run_cmd({"command": "tts", "text": "a" * 100, "playId": "p1", "endOfStream": True})
        self.advance(0.2)
        before = len(self.session.audio)
        self.run_cmd({"command": "interrupt", "fadeOutMs": 100})
        self.assertEqual(self.session.names()[-1], "interruption")
        self.advance(0.5)
        ended = self.session.of(ev.TrackEndEvent)
        self.assertEqual([e.play_id for e in ended], ["p1"])
        faded = self.session.audio[before:]
        self.assertEqual(len(faded), 5, "100 ms of fade, then nothing")
        peaks = [int(np.abs(np.frombuffer(f, dtype="<i2")).max()) for f in faded]
        level = int(np.abs(np.frombuffer(self.session.audio[before - 1], dtype="<i2")).max())
        self.assertGreater(level, 0)
        self.assertEqual(peaks, sorted(peaks, reverse=True))
        self.assertLess(peaks[-1], level // 4)
        self.assertEqual(self.session.names().count("interruption"), 1)

    def test_auto_hangup_after_play(self) -> None:
        """autoHangup ends the call after the play: trackEnd{SST}, trackEnd{sid}, hangup{bySystem}."""
        self.invite()
        self.run_cmd({"command": "tts", "text": "bye", "autoHangup": True, "endOfStream": True})
        self.advance(1)
        self.assertEqual(self.session.names()[-3:], ["trackEnd", "trackEnd", "hangup"])
        hangup = self.session.events[-1]
        self.assertEqual((hangup.reason, hangup.initiator), ("bySystem", "system"))
        self.assertTrue(self.session.finished)
        self.assertEqual(self.c.pending_timers, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_wait_input_timeout_emits_silence_once(self) -> None:
        """waitInputTimeout (ms) after a normal play end emits silence{SST} with start and duration."""
        self.invite()
        self.run_cmd({"command": "tts", "text": "q", "waitInputTimeout": 500, "endOfStream": True})
        self.advance(0.2)
        ended_ms = self.session.of(ev.TrackEndEvent)[-1].timestamp
        self.advance(0.6)
        silence = self.session.of(ev.SilenceEvent)
        self.assertEqual(len(silence), 1)
        self.assertEqual((silence[0].track_id, silence[0].duration, silence[0].refer), (SST, 500, False))
        self.assertLessEqual(abs(silence[0].start_time - ended_ms), 20)
        self.advance(2)
        self.assertEqual(len(self.session.of(ev.SilenceEvent)), 1)

    def test_wait_input_timeout_cancelled_by_a_new_track(self) -> None:
        """A trackStart within waitInputTimeout cancels the silence event."""
        self.invite()
        self.run_cmd({"command": "tts", "text": "q", "playId": "a", "waitInputTimeout": 500, "endOfStream": True})
        self.advance(0.2)
        self.run_cmd({"command": "tts", "text": "r", "playId": "b"})
        self.advance(1)
        self.assertEqual(self.session.of(ev.SilenceEvent), [])

    def test_provider_failure_is_a_tts_error_and_the_play_ends(self) -> None:
        """A failing synthesis gives error{SST, sender tts, code 500}; the play still ends."""
        self.synth.fail_with = SynthesisError("engine exploded")
        self.invite()
        self.run_cmd({"command": "tts", "text": "hello", "playId": "p", "endOfStream": True})
        self.advance(0.5)
        error = self.session.of(ev.ErrorEvent)[0]
        self.assertEqual((error.track_id, error.sender, error.code), (SST, "tts", 500))
        self.assertIn("engine exploded", error.error)
        self.assertEqual(self.session.of(ev.TrackEndEvent)[-1].play_id, "p")

    def test_cached_sentence_skips_the_provider(self) -> None:
        """The second identical non-streaming sentence comes from the media cache."""
        self.invite()
        self.run_cmd({"command": "tts", "text": "hello there", "playId": "a", "endOfStream": True})
        self.advance(1)
        audio_a = b"".join(self.session.audio)
        self.session.audio.clear()
        self.run_cmd({"command": "tts", "text": "hello there", "playId": "b", "endOfStream": True})
        self.advance(1)
        self.assertEqual(len(self.synth.requests), 1)
        self.assertEqual(b"".join(self.session.audio), audio_a)
        self.assertTrue(self.session.of(ev.MetricsEvent)[-1].data["cached"])

    def test_streaming_text_is_spoken_sentence_by_sentence(self) -> None:
        """Streaming pieces are synthesized per complete sentence; endOfStream flushes the rest."""
        self.invite()
        for piece in ("Hello the", "re. How are", " you"):
            self.run_cmd({"command": "tts", "text": piece, "playId": "s", "streaming": True})
        self.assertEqual([r.text for r in self.synth.requests], ["Hello there."])
        self.run_cmd({"command": "tts", "text": "?", "playId": "s", "streaming": True, "endOfStream": True})
        self.advance(0.3)
        self.assertEqual([r.text for r in self.synth.requests], ["Hello there.", "How are you?"])
        self.advance(2)
        self.assertEqual(self.session.of(ev.TrackEndEvent)[-1].play_id, "s")

    def test_streaming_first_clause_starts_early_and_keeps_numbers_whole(self) -> None:
        """LLM-sized tokens: the first piece may end at a clause; prices and abbreviations never split."""
        self.invite()
        text = "Okay, I found your booking for Friday, and it costs $4.99 per night. Dr. Smith will see you."
        for i in range(0, len(text), 3):
            self.run_cmd({"command": "tts", "text": text[i:i + 3], "playId": "s", "streaming": True})
        self.run_cmd({"command": "tts", "text": "", "playId": "s", "streaming": True, "endOfStream": True})
        self.assertEqual([r.text for r in self.synth.requests][:1], ["Okay, I found your booking for Friday,"])
        self.advance(3)
        self.assertEqual([r.text for r in self.synth.requests],
                         ["Okay, I found your booking for Friday,", "and it costs $4.99 per night.",
                          "Dr. Smith will see you."])

    def test_pause_resume_and_mute(self) -> None:
        """pause stops frames; resume continues; mute of SST sends zeros; unknown tracks are errors."""
        self.invite()
        self.run_cmd({"command": "pause"})
        self.assertIn("track not found: server-side-track", self.session.of(ev.ErrorEvent)[-1].error)
        self.run_cmd({"command": "tts", "text": "x" * 50, "playId": "p"})
        self.advance(0.2)
        self.run_cmd({"command": "pause"})
        sent = len(self.session.audio)
        self.advance(0.5)
        self.assertEqual(len(self.session.audio), sent)
        self.run_cmd({"command": "resume"})
        self.run_cmd({"command": "mute", "trackId": SST})
        self.advance(0.1)
        self.assertGreater(len(self.session.audio), sent)
        self.assertEqual(self.session.audio[-1], bytes(640))
        self.run_cmd({"command": "unmute", "trackId": "other"})
        self.assertIn("unmute not allowed: unknown track other", self.session.of(ev.ErrorEvent)[-1].error)

    def test_pcmu_session_encodes_g711(self) -> None:
        """A pcmu call sends 160-byte G.711 frames."""
        self.invite(codec="pcmu")
        self.run_cmd({"command": "tts", "text": "x" * 10, "endOfStream": True})
        self.advance(0.5)
        self.assertEqual({len(a) for a in self.session.audio}, {160})

    def test_base64_pcm_is_played_as_is(self) -> None:
        """base64 text is raw PCM at the TTS rate, played without calling the provider."""
        import base64

        self.invite()
        pcm = (b"\x10\x00" * 320) * 5
        self.run_cmd({"command": "tts", "text": base64.b64encode(pcm).decode(), "base64": True, "endOfStream": True})
        self.advance(0.3)
        self.assertEqual(self.synth.requests, [])
        self.assertEqual(b"".join(self.session.audio), pcm)

    def test_inactivity_timeout_hangs_up(self) -> None:
        """No caller audio for inactivityTimeout seconds: inactivity{sid} then hangup."""
        self.invite(inactivityTimeout=3)
        self.advance(2)
        self.audio.receive(bytes(640))
        self.advance(2.5)
        self.assertEqual(self.session.of(ev.InactivityEvent), [])
        self.advance(1.5)
        self.assertEqual(len(self.session.of(ev.InactivityEvent)), 1)
        self.assertEqual(self.session.events[-1].reason, "inactivityTimeout")
        self.assertTrue(self.session.finished)

    def test_hangup_stops_everything(self) -> None:
        """hangup while speaking: interruption, trackEnd{SST}, trackEnd{sid}, hangup; no timers left."""
        self.invite(caller="sip:bot@example.com")
        self.run_cmd({"command": "tts", "text": "x" * 100, "waitInputTimeout": 100})
        self.advance(0.3)
        self.run_cmd({"command": "hangup", "reason": "done", "initiator": "caller"})
        self.assertEqual(self.session.names()[-4:], ["interruption", "trackEnd", "trackEnd", "hangup"])
        hangup = self.session.events[-1]
        self.assertEqual((hangup.reason, hangup.initiator), ("done", "caller"))
        self.assertEqual(hangup.from_.username, "bot")
        self.assertEqual(hangup.extra["call_type"], "websocket")
        self.assertEqual(self.c.pending_timers, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        sent = len(self.session.audio)
        self.advance(1)
        self.assertEqual(len(self.session.audio), sent)

    def test_commands_before_invite_and_unsupported_paths(self) -> None:
        """tts before invite is refused; an invite on a sip session is reported, not faked."""
        self.run_cmd({"command": "tts", "text": "x"})
        self.assertIn("tts not allowed", self.session.of(ev.ErrorEvent)[-1].error)
        self.session.call_type = "sip"
        self.c = self.controller("sip")
        self.invite()
        error = self.session.of(ev.ErrorEvent)[-1]
        self.assertEqual(error.sender, "invite")
        self.assertTrue(self.session.finished)


class RecordingTests(_ControllerCase):
    """Calls are recorded as 16 kHz stereo frames: caller left, agent right."""

    def setUp(self) -> None:
        super().setUp()
        self.recorders: list[FakeRecorder] = []

        def make(path: str) -> FakeRecorder:
            self.recorders.append(FakeRecorder(path))
            return self.recorders[-1]

        self.services.make_recorder = make
        self.services.recording_path = "/rec"

    def test_recorder_option_records_both_sides_at_16k(self) -> None:
        """An 8 kHz pcmu call records caller and agent resampled to 16 kHz; hangup closes the file."""
        self.invite(codec="pcmu", recorder={"recorderFile": "calls/{id}"})
        rec = self.recorders[0]
        self.assertEqual(rec.path, "/rec/calls/s.test.wav")
        self.audio.receive(bytes([0x10]) * 1600)  # 200 ms of loud mu-law
        self.run_cmd({"command": "tts", "text": "x" * 10, "endOfStream": True})
        self.advance(0.5)
        self.assertEqual(len(rec.left), len(rec.right))
        self.assertIn(len(rec.left), range(15 * 640, 26 * 640))
        self.assertGreater(max(rec.left[:6400]), 0, "caller audio on the left")
        self.assertGreater(max(rec.right), 0, "agent audio on the right")
        self.run_cmd({"command": "hangup"})
        self.assertTrue(rec.closed)

    def test_auto_record_and_no_recording_by_default(self) -> None:
        """Without a recorder option nothing is recorded unless [recording] auto_start is on."""
        self.invite()
        self.assertEqual(self.recorders, [])
        self.services.auto_record = True
        self.session = FakeSession()
        self.c = self.controller()
        self.invite()
        self.assertEqual(self.recorders[0].path, "/rec/s.test.wav")

    def test_recorder_file_outside_the_recording_dir_is_refused(self) -> None:
        """A recorderFile leaving the recording dir is an error naming recorderFile; the call goes on unrecorded."""
        for name in ("../../tmp/evil", "/etc/cron.d/evil", "calls/../../evil"):
            self.session = FakeSession()
            self.c = self.controller()
            self.invite(recorder={"recorderFile": name})
            self.assertEqual(self.recorders, [], name)
            error = self.session.of(ev.ErrorEvent)[-1]
            self.assertIn("recorderFile", error.error)
            self.assertIn("answer", self.session.names())
            self.assertFalse(self.session.finished)

    def test_session_id_is_sanitised_in_the_file_name(self) -> None:
        """A session id with path separators cannot steer the default file name."""
        self.services.auto_record = True
        self.session = FakeSession()
        self.session.sid = "../../x"
        self.c = self.controller()
        self.invite()
        self.assertEqual(self.recorders[0].path, "/rec/_._.._x.wav")


class LocalPlayTests(_ControllerCase):
    """play of a local file reads only inside the configured media directories."""

    def setUp(self) -> None:
        super().setUp()
        import math
        import os
        import struct
        import wave

        self.media = tempfile.mkdtemp()
        self.services.media_dirs = (self.media,)
        self.inside = os.path.join(self.media, "tone.wav")
        with wave.open(self.inside, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(i / 5))) for i in range(1600)))
        self.outside = os.path.join(tempfile.mkdtemp(), "secret.wav")
        os.symlink(self.outside, os.path.join(self.media, "link.wav"))
        with open(self.outside, "wb") as f:
            f.write(open(self.inside, "rb").read())

    def test_file_inside_media_dir_plays(self) -> None:
        """A WAV under media_dirs plays and ends with trackEnd."""
        self.invite()
        self.run_cmd({"command": "play", "url": self.inside})
        self.advance(0.2)
        self.assertEqual(self.session.of(ev.ErrorEvent), [])
        self.assertTrue(self.session.audio)

    def test_files_outside_are_an_error_naming_url(self) -> None:
        """Paths outside media_dirs (also via a symlink, or a missing one) are refused alike; the call goes on."""
        import os

        self.invite()
        for url in (self.outside, os.path.join(self.media, "link.wav"), "/etc/passwd", "/nonexistent/x.wav"):
            self.run_cmd({"command": "play", "url": url})
            error = self.session.of(ev.ErrorEvent)[-1]
            self.assertEqual(error.error, f"invalid url: {url} is not in a media directory")
        self.assertFalse(self.session.finished)
        self.assertEqual(self.session.audio, [])

    def test_fetched_non_audio_reads_like_a_fetch_failure(self) -> None:
        """A URL that answers with something other than audio gives the uniform fetch error, no size."""
        self.services.fetch_url = lambda url: succeed(b"<html>internal admin page</html>")
        self.invite()
        self.run_cmd({"command": "play", "url": "http://10.0.0.1:8080/admin"})
        error = self.session.of(ev.ErrorEvent)[-1]
        self.assertEqual(error.error, "cannot fetch http://10.0.0.1:8080/admin: unavailable")
