"""Microseconds per 20 ms frame for every codec and resampler (run by hand).

    python benchmarks/codec_throughput.py [--frames N]

Prints one line per operation.  A 20 ms frame budget is 20000 us, so
"per stream CPU" is the sum of a stream's operations / 20000.  The
resampler section also times the alternatives considered in
``activecall/media/resample.py`` (``audioop.ratecv`` and
``av.AudioResampler``) so the choice can be re-checked on new hardware.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activecall.media._audioop import audioop  # noqa: E402
from activecall.media.codecs import get_codec, make_decoder, make_encoder  # noqa: E402
from activecall.media.mixer import apply_gain  # noqa: E402
from activecall.media.resample import Resampler  # noqa: E402

RATES = (8000, 16000, 24000, 44100, 48000)


def speech_like(rate_hz: int, seconds: float) -> np.ndarray:
    """A few harmonics with an amplitude envelope: closer to speech than a pure sine."""
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    x = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate((180, 360, 720, 1400, 2900)))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (x * env * 6000).astype("<i2")


def frames_of(pcm: np.ndarray, samples: int) -> list[bytes]:
    """Split into whole frames of ``samples`` samples."""
    return [pcm[i : i + samples].tobytes() for i in range(0, len(pcm) - samples + 1, samples)]


def timeit(fn: Callable[[bytes], object], inputs: list[bytes], repeat: int) -> float:
    """Best-of-``repeat`` mean microseconds per call of ``fn`` over ``inputs``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for item in inputs:
            fn(item)
        best = min(best, (time.perf_counter() - start) / len(inputs))
    return best * 1e6


def bench_codecs(frames: int, repeat: int) -> None:
    """Encode and decode time per 20 ms frame for each codec."""
    print("codec      rate    encode_us  decode_us  payload_bytes")
    for name in ("pcmu", "pcma", "g722", "opus"):
        info = get_codec(name)
        rates = [info.sample_rate_hz] + ([16000] if name == "opus" else [])
        for rate in rates:
            pcm = frames_of(speech_like(rate, frames / 50), rate // 50)
            enc = make_encoder(name, rate)
            payloads = [enc.encode(f) for f in pcm]
            enc_us = timeit(make_encoder(name, rate).encode, pcm, repeat)
            dec_us = timeit(make_decoder(name, rate).decode, payloads, repeat)
            mean_bytes = sum(map(len, payloads)) / len(payloads)
            print(f"{name:<8} {rate:>6}  {enc_us:>9.1f}  {dec_us:>9.1f}  {mean_bytes:>8.1f}")


def _ratecv(in_rate: int, out_rate: int) -> Callable[[bytes], bytes]:
    state = None

    def run(pcm: bytes) -> bytes:
        nonlocal state
        out, state = audioop.ratecv(pcm, 2, 1, in_rate, out_rate, state)
        return out

    return run


def _swr(in_rate: int, out_rate: int) -> Callable[[bytes], bytes]:
    swr = av.AudioResampler(format="s16", layout="mono", rate=out_rate)
    samples = in_rate // 50
    pts = 0

    def run(pcm: bytes) -> bytes:
        nonlocal pts
        frame = av.AudioFrame(format="s16", layout="mono", samples=samples)
        frame.sample_rate = in_rate
        frame.pts = pts
        pts += samples
        frame.planes[0].update(pcm)
        return b"".join(bytes(f.planes[0]) for f in swr.resample(frame))

    return run


def bench_resamplers(frames: int, repeat: int) -> None:
    """Resampler cost per 20 ms input frame for each rate pair, against the alternatives."""
    print("\nresample          ours_us  ratecv_us  swr_us")
    for a in RATES:
        pcm = frames_of(speech_like(a, frames / 50), a // 50)
        for b in RATES:
            if a == b:
                continue
            ours = timeit(Resampler(a, b).process, pcm, repeat)
            cheap = timeit(_ratecv(a, b), pcm, repeat)
            swr = timeit(_swr(a, b), pcm, repeat)
            print(f"{a:>6} -> {b:>6}  {ours:>7.1f}  {cheap:>9.1f}  {swr:>6.1f}")


def bench_gain(frames: int, repeat: int) -> None:
    """Gain cost per 20 ms frame at 16 kHz."""
    pcm = frames_of(speech_like(16000, frames / 50), 320)
    print("\ngain (16 kHz)     us")
    print(f"apply_gain        {timeit(lambda f: apply_gain(f, 0.7), pcm, repeat):.1f}")


def main() -> None:
    """Parse arguments and run every benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=500, help="20 ms frames per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    bench_codecs(args.frames, args.repeat)
    bench_resamplers(args.frames, args.repeat)
    bench_gain(args.frames, args.repeat)


if __name__ == "__main__":
    main()
