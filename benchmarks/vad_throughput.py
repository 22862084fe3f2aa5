"""N concurrent VAD streams through the daemon's real VAD path, batched versus per call.

1. **batched** (the daemon's path): a real reactor, one :class:`MediaClock`
   at 20 ms, one :class:`VadEngine` with its one worker thread; every tick
   a feeder (RECEIVE phase) writes one 20 ms frame of real speech
   (espeak-ng, looped with pauses) to each of N Silero streams, the engine
   (PROCESS phase) submits one batch per tick and feeds the segmenters with
   the results.  Measured over ``--seconds`` of wall time: process CPU % (of
   one core, ``time.process_time`` over wall time), the worker thread's CPU
   (the Silero runs alone), per-stream RTF (process CPU / (N x audio
   seconds)), media tick lateness p50/p99, RSS, speech segments found.
2. **per-call** baseline, same model and audio, same process afterwards:
   every stream's windows evaluated with one session run per stream per
   window (what a VAD per call costs), over ``--baseline-seconds`` of audio
   per stream (it is slow: that is the point).  Printed: per-stream RTF and
   the cores N streams would need.

Run: ``python benchmarks/vad_throughput.py --streams 200 --seconds 20``
(``--rate 8000`` for the 8 kHz mode of G.711 calls).  Target: 200 streams
under one core.  The machine is shared: the load average is printed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import wave  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SENTENCES = (
    "Hello, I would like to check the status of my order please.",
    "It was placed last Tuesday and should have arrived by now.",
    "Can you tell me when the delivery is expected?",
)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def speech_loop(rate_hz: int) -> bytes:
    """espeak-ng sentences with 0.8 s pauses, at ``rate_hz``: the audio every stream loops."""
    from activecall.media.resample import resample

    exe = shutil.which("espeak-ng")
    if exe is None:
        sys.exit("espeak-ng is needed (apt-get install espeak-ng)")
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(SENTENCES):
            path = os.path.join(tmp, f"{i}.wav")
            subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", path, text], check=True, timeout=60)
            with wave.open(path) as w:
                pcm = resample(w.readframes(w.getnframes()), w.getframerate(), rate_hz)
            parts += [pcm, bytes(2 * rate_hz * 8 // 10)]
    audio = b"".join(parts)
    frame = 2 * rate_hz // 50
    return audio[: len(audio) // frame * frame]


class Counter:
    """A VadListener counting segments."""

    starts = 0
    ends = 0

    def speech_started(self, start_ms: int) -> None:
        Counter.starts += 1

    def speech_ended(self, start_ms: int, duration_ms: int) -> None:
        Counter.ends += 1

    def silence_timeout(self, start_ms: int, duration_ms: int) -> None:
        pass


def run_batched(args: argparse.Namespace, audio: bytes) -> dict[str, Any]:
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    from activecall.media.clock import RECEIVE, MediaClock
    from activecall.speech.vad.engine import VadEngine
    from activecall.speech.vad.segmenter import VadParams
    from activecall.speech.vad.silero import SileroBatch

    frame_bytes = 2 * args.rate // 50
    n_frames = len(audio) // frame_bytes
    frames = [audio[i * frame_bytes:(i + 1) * frame_bytes] for i in range(n_frames)]
    lateness: list[float] = []
    media = MediaClock(reactor, observe_lateness=lateness.append)
    pool = ThreadPool(minthreads=1, maxthreads=1, name="vad")
    worker_cpu = [0.0]

    def timed(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            t0 = time.thread_time()
            try:
                return fn()
            finally:
                worker_cpu[0] += time.thread_time() - t0
        return run

    def submit(fn: Callable[[], Any]) -> Any:
        return deferToThreadPool(reactor, pool, timed(fn))

    engine = VadEngine(media, reactor, reactor, submit=submit)
    pool.start()
    SileroBatch(args.rate)  # load the process's one session before measuring RSS
    gc.collect()
    rss0 = _rss_mb()
    streams = [engine.open("silero", args.rate, VadParams(), Counter()) for _ in range(args.streams)]
    # Streams start at different points of the loop, as real calls would.
    offsets = np.random.default_rng(7).integers(0, n_frames, args.streams).tolist()

    class Feeder:
        """RECEIVE phase: one caller frame per stream per tick, as the legs deliver them."""

        n = 0

        def media_tick(self, count: int) -> None:
            for _ in range(count):
                n = self.n
                for stream, off in zip(streams, offsets):
                    stream.write(frames[(n + off) % n_frames])
                self.n = n + 1

    feeder = Feeder()
    marks: dict[str, float] = {}

    def begin() -> None:
        lateness.clear()
        marks["wall"], marks["cpu"], marks["frames"] = time.monotonic(), time.process_time(), feeder.n
        marks["worker"], marks["windows"] = worker_cpu[0], engine.windows

    def end() -> None:
        marks["wall"] = time.monotonic() - marks["wall"]
        marks["cpu"] = time.process_time() - marks["cpu"]
        marks["frames"] = feeder.n - marks["frames"]
        marks["worker"] = worker_cpu[0] - marks["worker"]
        marks["windows"] = engine.windows - marks["windows"]
        marks["rss"] = _rss_mb() - rss0
        reactor.stop()

    media.subscribe(feeder, RECEIVE)
    reactor.callLater(1.0, begin)  # 1 s warm-up
    reactor.callLater(1.0 + args.seconds, end)
    reactor.run()
    for stream in streams:
        stream.close()
    pool.stop()
    media.stop()
    audio_s = marks["frames"] * 0.02
    lat = np.array(lateness) * 1e3 if lateness else np.zeros(1)
    return {
        "mode": "batched", "streams": args.streams, "rate_hz": args.rate, "wall_s": round(marks["wall"], 2),
        "cpu_pct": round(100 * marks["cpu"] / marks["wall"], 1),
        "worker_cpu_pct": round(100 * marks["worker"] / marks["wall"], 1),
        "rtf_per_stream": round(marks["cpu"] / (args.streams * audio_s), 5),
        "worker_rtf_per_stream": round(marks["worker"] / (args.streams * audio_s), 5),
        "tick_late_p50_ms": round(float(np.percentile(lat, 50)), 2),
        "tick_late_p99_ms": round(float(np.percentile(lat, 99)), 2),
        "late_ticks": media.late_ticks, "batches": engine.batches,
        "windows_per_stream_s": round(marks["windows"] / (args.streams * audio_s), 2),
        "dropped_ms": engine.dropped_ms, "segments": Counter.ends,
        "rss_mb_growth": round(marks["rss"], 1),
        "last_batch_ms": round(engine.last_batch_s * 1e3, 2),
    }


def run_per_call(args: argparse.Namespace, audio: bytes) -> dict[str, Any]:
    from activecall.speech.vad.silero import CONTEXT_SAMPLES, WINDOW_SAMPLES, SileroBatch

    batch = SileroBatch(args.rate)
    win, ctx = WINDOW_SAMPLES[args.rate], CONTEXT_SAMPLES[args.rate]
    x = np.frombuffer(audio, dtype="<i2").astype(np.float32) / 32768.0
    n_win = int(args.baseline_seconds * args.rate) // win
    offsets = np.random.default_rng(7).integers(0, len(x) // win, args.streams).tolist()
    xx = np.concatenate([x, x])
    t_wall, t_cpu = time.monotonic(), time.process_time()
    for off in offsets:
        states = np.zeros((2, 1, 128), dtype=np.float32)
        context = np.zeros((1, ctx), dtype=np.float32)
        for k in range(n_win):
            start = ((off + k) * win) % len(x)
            _, states, context = batch.run(xx[None, start:start + win], states, context)
    cpu = time.process_time() - t_cpu
    wall = time.monotonic() - t_wall
    audio_s = n_win * win / args.rate
    rtf = cpu / (args.streams * audio_s)
    return {
        "mode": "per-call", "streams": args.streams, "rate_hz": args.rate, "audio_s_per_stream": round(audio_s, 2),
        "cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "rtf_per_stream": round(rtf, 5),
        "cores_needed": round(rtf * args.streams, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=16000, choices=(8000, 16000))
    parser.add_argument("--baseline-seconds", type=float, default=3.0,
                        help="audio per stream for the per-call baseline (it is slow)")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    audio = speech_loop(args.rate)
    print(json.dumps({"loadavg": os.getloadavg()}))
    print(json.dumps(run_batched(args, audio)))
    if not args.no_baseline:
        print(json.dumps(run_per_call(args, audio)))


if __name__ == "__main__":
    main()
