"""Gain and silence for PCM s16le mono frames.

Gain goes through ``audioop.mul`` (C, saturating), so loud results clip
instead of wrapping around.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from activecall.media._audioop import audioop

__all__ = ["MixError", "apply_gain", "silence", "fade"]


class MixError(ValueError):
    """Frames, gains or sizes that cannot be used."""


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


def fade(pcm: bytes, start_gain: float, end_gain: float) -> bytes:
    """PCM s16le with its gain ramped linearly from ``start_gain`` to ``end_gain`` (both in 0..1)."""
    samples = np.frombuffer(pcm, dtype="<i2", count=len(pcm) // 2).astype(np.float32)
    ramp = np.linspace(start_gain, end_gain, len(samples), endpoint=False, dtype=np.float32)
    return (samples * ramp).astype("<i2").tobytes()


@lru_cache(maxsize=64)
def silence(samples: int) -> bytes:
    """Return ``samples`` samples of s16le silence (cached; bytes are immutable)."""
    if not isinstance(samples, int) or samples < 0:
        raise MixError(f"samples must be an int >= 0, got {samples!r}")
    return bytes(2 * samples)
