"""The batched VAD engine on real speech (espeak-ng, made at test time), driven by a fake media clock.

Jobs run inline (``submit=maybeDeferred``) or are held (a stalled worker), so
no thread and no sleep is involved.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import wave
from typing import Any, Callable

import numpy as np
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from activecall.media.codecs.g711 import pcmu_decoder, pcmu_encoder
from activecall.media.resample import Resampler
from activecall.speech.vad.engine import VadEngine, VadStream, VadUnavailableError
from activecall.speech.vad.segmenter import VadParams
from activecall.speech.vad.silero import CONTEXT_SAMPLES, WINDOW_SAMPLES, SileroBatch

TEXT = "The quick brown fox jumps over the lazy dog near the river bank"
# One segment for the whole sentence: espeak's word gaps are short, Silero's dips a little longer.
PARAMS = VadParams(speech_padding_ms=250, silence_padding_ms=300)
_VOICED = 300  # |sample| above this is speech, for finding the real onset and end


class FakeMediaClock:
    """Collects subscribers; the test ticks them by hand."""

    def __init__(self) -> None:
        self.subscribers: dict[int, Any] = {}

    def subscribe(self, ticker: Any, phase: int) -> None:
        self.subscribers[id(ticker)] = ticker

    def unsubscribe(self, ticker: Any, phase: int) -> None:
        self.subscribers.pop(id(ticker), None)

    def tick(self) -> None:
        for ticker in list(self.subscribers.values()):
            ticker.media_tick(1)


class Recorder:
    """A VadListener keeping every event."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def speech_started(self, start_ms: int) -> None:
        self.events.append(("start", start_ms))

    def speech_paused(self, at_ms: int) -> None:
        """A hint only; the tests look at segments."""

    def speech_ended(self, start_ms: int, duration_ms: int) -> None:
        self.events.append(("end", start_ms, duration_ms))

    def silence_timeout(self, start_ms: int, duration_ms: int) -> None:
        self.events.append(("timeout", start_ms, duration_ms))


class StalledWorker:
    """A submit that holds jobs until released; after ``release`` it runs them inline."""

    def __init__(self) -> None:
        self.held: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self.inline = False
        self.submits = 0

    def __call__(self, fn: Callable[[], Any]) -> Deferred[Any]:
        self.submits += 1
        if self.inline:
            return maybeDeferred(fn)
        d: Deferred[Any] = Deferred()
        self.held.append((fn, d))
        return d

    def release(self) -> None:
        self.inline = True
        held, self.held = self.held, []
        for fn, d in held:
            d.callback(fn())


def _speech_22k() -> bytes:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SkipTest("espeak-ng not installed")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.wav")
        subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", path, TEXT], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        with wave.open(path) as w:
            assert w.getnchannels() == 1 and w.getsampwidth() == 2
            return w.getframerate(), w.readframes(w.getnframes())  # type: ignore[return-value]


class Signal:
    """silence 1 s + speech + silence 1 s + white noise 2 s + silence 0.5 s, at one rate."""

    def __init__(self, rate_in: int, speech_in: bytes, rate_hz: int, ulaw: bool = False) -> None:
        r = Resampler(rate_in, rate_hz)
        speech = r.process(speech_in) + r.flush()
        x = np.frombuffer(speech, dtype="<i2")
        voiced = np.flatnonzero(np.abs(x) > _VOICED)
        self.rate_hz = rate_hz
        self.onset_ms = 1000 + int(voiced[0]) * 1000 // rate_hz
        self.speech_ms = int(voiced[-1] - voiced[0]) * 1000 // rate_hz
        self.noise_from_ms = 1000 + len(x) * 1000 // rate_hz + 1000
        noise = np.random.default_rng(7).normal(0, 1000, 2 * rate_hz).clip(-32768, 32767).astype("<i2")
        pcm = bytes(2 * rate_hz) + speech + bytes(2 * rate_hz) + noise.tobytes() + bytes(rate_hz)
        frame = 2 * rate_hz // 50
        pcm = pcm[: len(pcm) // frame * frame]
        frames = [pcm[i:i + frame] for i in range(0, len(pcm), frame)]
        if ulaw:
            enc, dec = pcmu_encoder(), pcmu_decoder()
            frames = [dec.decode(enc.encode(f)) for f in frames]
        self.frames = frames


class EngineTestBase(SynchronousTestCase):
    speech: tuple[int, bytes]

    @classmethod
    def setUpClass(cls) -> None:
        cls.speech = _speech_22k()  # type: ignore[assignment]

    def make_engine(self, submit: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
                    **kw: Any) -> tuple[VadEngine, FakeMediaClock]:
        media = FakeMediaClock()
        engine = VadEngine(media, None, Clock(), submit=submit or maybeDeferred, **kw)  # type: ignore[arg-type]
        return engine, media

    def signal(self, rate_hz: int, ulaw: bool = False) -> Signal:
        rate_in, pcm = self.speech
        return Signal(rate_in, pcm, rate_hz, ulaw)

    def feed(self, media: FakeMediaClock, streams: list[VadStream], frames: list[bytes]) -> None:
        for frame in frames:
            for stream in streams:
                stream.write(frame)
            media.tick()

    def assert_one_segment(self, sig: Signal, events: list[tuple[Any, ...]]) -> None:
        self.assertEqual([e[0] for e in events], ["start", "end"], events)
        start = events[0][1]
        self.assertGreaterEqual(start, sig.onset_ms - 40)
        self.assertLessEqual(start, sig.onset_ms + PARAMS.speech_padding_ms + 150)
        _, end_start, duration = events[1]
        self.assertEqual(end_start, start)
        self.assertLess(abs(duration - sig.speech_ms), 250, (duration, sig.speech_ms))


class SileroEngineTests(EngineTestBase):
    def test_16k_speech_one_segment_noise_ignored(self) -> None:
        """16 kHz: speaking near the onset, silence with the speech's length; silence and noise give nothing."""
        engine, media = self.make_engine()
        sig = self.signal(16000)
        rec = Recorder()
        stream = engine.open("silero", 16000, PARAMS, rec)
        self.feed(media, [stream], sig.frames)
        self.assert_one_segment(sig, rec.events)
        self.assertGreater(engine.windows, 0)
        self.assertEqual(engine.dropped_ms, 0)

    def test_8k_ulaw_speech_one_segment(self) -> None:
        """8 kHz through G.711 mu-law (no resampling to 16 kHz): the same segment."""
        engine, media = self.make_engine()
        sig = self.signal(8000, ulaw=True)
        rec = Recorder()
        stream = engine.open("silero", 8000, PARAMS, rec)
        self.feed(media, [stream], sig.frames)
        self.assert_one_segment(sig, rec.events)

    def test_pure_silence_no_events(self) -> None:
        """Five seconds of digital silence produce no event (no silenceTimeout set)."""
        engine, media = self.make_engine()
        rec = Recorder()
        stream = engine.open("silero", 16000, VadParams(), rec)
        self.feed(media, [stream], [bytes(640)] * 250)
        self.assertEqual(rec.events, [])
        self.assertEqual(engine.windows, 5000 // 32)

    def test_silence_timeout_events(self) -> None:
        """With silenceTimeout, silence reports its start and growing length every timeout."""
        engine, media = self.make_engine()
        rec = Recorder()
        stream = engine.open("silero", 8000, VadParams(silence_timeout_ms=1000), rec)
        self.feed(media, [stream], [bytes(320)] * 110)
        self.assertEqual(rec.events, [("timeout", 0, 1024), ("timeout", 0, 2016)])

    def test_batched_equals_one_by_one(self) -> None:
        """Three streams batched (with uneven window counts per job) get the probabilities of one-by-one runs."""
        engine, media = self.make_engine()
        base = self.signal(16000).frames
        signals = [base, base[13:] + base[:13], [bytes(640)] * 40 + base]
        n_frames = 220
        probs: list[list[float]] = [[], [], []]

        class Spy:
            def __init__(self, out: list[float]) -> None:
                self.out = out

            def feed(self, end_ms: int, p: float) -> tuple[()]:
                self.out.append(p)
                return ()

        streams = [engine.open("silero", 16000, PARAMS, Recorder()) for _ in range(3)]
        for stream, out in zip(streams, probs):
            stream.segmenter = Spy(out)  # type: ignore[assignment]
        for t in range(n_frames):
            streams[0].write(signals[0][t])
            if t % 3 == 2:  # stream 1 arrives in bursts of three frames
                for f in signals[1][t - 2:t + 1]:
                    streams[1].write(f)
            streams[2].write(signals[2][t])
            media.tick()
        batch = SileroBatch(16000)
        win, ctx = WINDOW_SAMPLES[16000], CONTEXT_SAMPLES[16000]
        for i in range(3):
            pcm = b"".join(signals[i][:n_frames])
            x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
            states = np.zeros((2, 1, 128), dtype=np.float32)
            context = np.zeros((1, ctx), dtype=np.float32)
            single = []
            for k in range(len(probs[i])):
                p, states, context = batch.run(x[None, k * win:(k + 1) * win], states, context)
                single.append(float(p[0]))
            self.assertGreater(len(single), 100)
            self.assertLess(float(np.max(np.abs(np.array(single) - np.array(probs[i])))), 1e-4)
            self.assertGreater(max(single), 0.9)  # real speech was in there

    def test_fifty_streams_one_batch_per_tick(self) -> None:
        """50 streams are evaluated together (one job per tick) and every one gets its segment."""
        worker = StalledWorker()
        worker.inline = True
        engine, media = self.make_engine(worker)
        sig = self.signal(8000)
        recs = [Recorder() for _ in range(50)]
        streams = [engine.open("silero", 8000, PARAMS, r) for r in recs]
        frames = sig.frames[: sig.noise_from_ms // 20]
        self.feed(media, streams, frames)
        self.assertLessEqual(worker.submits, len(frames))
        self.assertEqual(engine.windows, 50 * (len(frames) * 20 // 32))
        for rec in recs:
            self.assert_one_segment(sig, rec.events)

    def test_closed_stream_gets_nothing(self) -> None:
        """A stream closed while its batch is in flight hears nothing; the others go on."""
        worker = StalledWorker()
        engine, media = self.make_engine(worker, max_pending_ms=10_000)
        sig = self.signal(16000)
        rec_a, rec_b = Recorder(), Recorder()
        a = engine.open("silero", 16000, PARAMS, rec_a)
        b = engine.open("silero", 16000, PARAMS, rec_b)
        cut = (sig.onset_ms + 1000) // 20
        self.feed(media, [a, b], sig.frames[:cut])
        self.assertEqual(worker.submits, 1)  # one job in flight: no second one
        a.close()
        worker.release()
        self.feed(media, [a, b], sig.frames[cut:])
        self.assertEqual(rec_a.events, [])
        self.assert_one_segment(sig, rec_b.events)
        b.close()
        self.assertEqual(media.subscribers, {})

    def test_slot_reuse_while_in_flight(self) -> None:
        """A new stream taking a closed stream's slot during a batch does not inherit its results."""
        worker = StalledWorker()
        engine, media = self.make_engine(worker)
        sig = self.signal(16000)
        rec_a, rec_c = Recorder(), Recorder()
        a = engine.open("silero", 16000, PARAMS, rec_a)
        self.feed(media, [a], sig.frames[: (sig.onset_ms + 1500) // 20])
        a.close()
        c = engine.open("silero", 16000, PARAMS, rec_c)
        worker.release()
        self.feed(media, [c], [bytes(640)] * 100)
        self.assertEqual(rec_a.events + rec_c.events, [])

    def test_stalled_worker_drops_oldest_audio(self) -> None:
        """With the worker stalled the buffer stays bounded, drops are counted, and stream time still counts them."""
        worker = StalledWorker()
        engine, media = self.make_engine(worker, max_pending_ms=500)
        sig = self.signal(16000)
        rec = Recorder()
        stream = engine.open("silero", 16000, PARAMS, rec)
        self.feed(media, [stream], [bytes(640)] * 150)  # 3 s while stalled
        self.assertGreater(stream.dropped_ms, 2000)
        self.assertEqual(engine.dropped_ms, stream.dropped_ms)
        group = stream._group
        assert group is not None
        self.assertLessEqual(int(group.fill[stream._slot]), group.width)
        worker.release()
        self.feed(media, [stream], sig.frames)
        # The speech began 3 s + onset after open: dropped audio still advanced the stream clock.
        self.assertEqual(rec.events[0][0], "start")
        self.assertGreaterEqual(rec.events[0][1], 3000 + sig.onset_ms - 40)
        self.assertLessEqual(rec.events[0][1], 3000 + sig.onset_ms + 400)

    def test_failed_batch_is_counted_and_next_runs(self) -> None:
        """A failing job is logged and counted; the next tick submits again."""
        calls = []

        def failing(fn: Callable[[], Any]) -> Deferred[Any]:
            calls.append(fn)
            return maybeDeferred(lambda: 1 / 0) if len(calls) == 1 else maybeDeferred(fn)

        engine, media = self.make_engine(failing)
        stream = engine.open("silero", 16000, VadParams(), Recorder())
        self.feed(media, [stream], [bytes(640)] * 10)
        self.assertEqual(engine.failures, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertGreater(engine.batches, 1)


class WebrtcAndErrorsTests(EngineTestBase):
    def test_webrtc_16k_speech(self) -> None:
        """WebRTC VAD finds the speech segment on the reactor in the tick, without any job."""
        worker = StalledWorker()
        engine, media = self.make_engine(worker)
        sig = self.signal(16000)
        rec = Recorder()
        stream = engine.open("webrtc", 16000, PARAMS, rec)
        self.feed(media, [stream], sig.frames[: sig.noise_from_ms // 20])
        self.assertEqual(worker.submits, 0)
        self.assert_one_segment(sig, rec.events)

    def test_webrtc_8k_silence(self) -> None:
        """WebRTC VAD at 8 kHz: silence gives nothing."""
        engine, media = self.make_engine()
        rec = Recorder()
        stream = engine.open("webrtc", 8000, VadParams(), rec)
        self.feed(media, [stream], [bytes(320)] * 100)
        self.assertEqual(rec.events, [])

    def test_bad_kind_and_rate(self) -> None:
        """Unknown kinds and rates other than 8/16 kHz are refused."""
        engine, _ = self.make_engine()
        self.assertRaises(ValueError, engine.open, "ten", 16000, VadParams(), Recorder())
        self.assertRaises(ValueError, engine.open, "silero", 48000, VadParams(), Recorder())
        self.assertRaises(ValueError, engine.open, "webrtc", 22050, VadParams(), Recorder())

    def test_model_missing(self) -> None:
        """A missing model is a clear VadUnavailableError at open."""
        engine, _ = self.make_engine(model_path="/nonexistent/silero.onnx")
        with self.assertRaises(VadUnavailableError) as cm:
            engine.open("silero", 16000, VadParams(), Recorder())
        self.assertIn("/nonexistent/silero.onnx", str(cm.exception))

    def test_hostile_writes(self) -> None:
        """Odd byte counts, empty and huge writes never raise and stay bounded."""
        engine, media = self.make_engine(max_pending_ms=500)
        rec = Recorder()
        s = engine.open("silero", 16000, VadParams(), rec)
        w = engine.open("webrtc", 16000, VadParams(), rec)
        for stream in (s, w):
            stream.write(b"")
            stream.write(b"\x01")
            stream.write(bytes(641))
            stream.write(bytes(16000 * 2 * 10))
        media.tick()
        self.assertGreater(s.dropped_ms, 9000)
        self.assertGreater(w.dropped_ms, 9000)
        s.close()
        w.close()
        s.write(bytes(640))
        self.assertEqual(media.subscribers, {})
