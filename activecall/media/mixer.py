"""N-way mixing, gain and silence for PCM s16le mono frames.

Mixing sums into a preallocated int32 accumulator (no overflow for up to
65536 inputs) and saturates once to int16 at the end, so loud sums clip
instead of wrapping around.  Everything is numpy-vectorised; the only Python
loop is over the inputs, never over samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from activecall.media._audioop import audioop

__all__ = ["MixError", "Mixer", "apply_gain", "db_to_gain", "mix_into", "silence"]

_INT16_MIN = -32768
_INT16_MAX = 32767


class MixError(ValueError):
    """Frames, gains or sizes the mixer cannot use."""


def mix_into(out: np.ndarray, frames: Sequence[bytes | memoryview]) -> bytes:
    """Sum ``frames`` into the int32 scratch ``out`` and return saturated s16le bytes.

    The result has ``len(out)`` samples; shorter frames count as padded
    with silence, longer ones are an error.
    """
    if out.dtype != np.int32 or out.ndim != 1:
        raise MixError(f"mix_into needs a 1-D int32 scratch array, got {out.dtype} {out.shape}")
    size = out.shape[0]
    out[:] = 0
    for frame in frames:
        if len(frame) % 2:
            raise MixError(f"PCM s16le frame must have an even byte count, got {len(frame)}")
        samples = np.frombuffer(frame, dtype="<i2")
        n = samples.shape[0]
        if n > size:
            raise MixError(f"frame of {n} samples is longer than the mix of {size}")
        out[:n] += samples
    np.clip(out, _INT16_MIN, _INT16_MAX, out=out)
    return out.astype("<i2").tobytes()


class Mixer:
    """Mixes any number of equal-length frames of ``samples_per_frame`` samples."""

    __slots__ = ("_acc", "_out", "_silence", "samples_per_frame")

    def __init__(self, samples_per_frame: int) -> None:
        if not isinstance(samples_per_frame, int) or samples_per_frame <= 0:
            raise MixError(f"samples_per_frame must be a positive int, got {samples_per_frame!r}")
        self.samples_per_frame = samples_per_frame
        self._acc = np.zeros(samples_per_frame, dtype=np.int32)
        self._out = np.zeros(samples_per_frame, dtype="<i2")
        self._silence = silence(samples_per_frame)

    def mix(self, frames: Sequence[bytes | memoryview]) -> bytes:
        """Return the saturated sum of ``frames`` as one frame of s16le bytes."""
        size = self.samples_per_frame
        if not frames:
            return self._silence
        if len(frames) == 1 and len(frames[0]) == 2 * size:
            # Nothing to add: skip the accumulator.
            return bytes(frames[0])
        acc = self._acc
        acc[:] = 0
        for frame in frames:
            if len(frame) % 2:
                raise MixError(f"PCM s16le frame must have an even byte count, got {len(frame)}")
            samples = np.frombuffer(frame, dtype="<i2")
            n = samples.shape[0]
            if n > size:
                raise MixError(f"frame of {n} samples is longer than the mix of {size}")
            acc[:n] += samples
        np.clip(acc, _INT16_MIN, _INT16_MAX, out=self._out, casting="unsafe")
        return self._out.tobytes()


def db_to_gain(db: float) -> float:
    """Convert decibels to a linear amplitude gain."""
    if not math.isfinite(db):
        raise MixError(f"gain in dB must be finite, got {db!r}")
    return 10.0 ** (db / 20.0)


def apply_gain(pcm: bytes, gain: float) -> bytes:
    """Scale PCM s16le by ``gain`` (linear, >= 0), saturating at the int16 range."""
    if not isinstance(gain, (int, float)) or not math.isfinite(gain) or gain < 0:
        raise MixError(f"gain must be a finite number >= 0, got {gain!r}")
    if len(pcm) % 2:
        raise MixError(f"PCM s16le must have an even byte count, got {len(pcm)}")
    if gain == 1.0:
        return bytes(pcm)
    if gain == 0.0:
        return silence(len(pcm) // 2)
    # audioop.mul is C and already saturates (it rounds toward -inf).
    return audioop.mul(pcm, 2, float(gain))


@lru_cache(maxsize=64)
def silence(samples: int) -> bytes:
    """Return ``samples`` samples of s16le silence (cached; bytes are immutable)."""
    if not isinstance(samples, int) or samples < 0:
        raise MixError(f"samples must be an int >= 0, got {samples!r}")
    return bytes(2 * samples)
