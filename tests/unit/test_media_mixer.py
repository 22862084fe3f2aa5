"""Tests for activecall.media.mixer."""

from __future__ import annotations

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from activecall.media.mixer import MixError, apply_gain, silence


def frame(values: list[int] | np.ndarray) -> bytes:
    """Pack int16 values as s16le bytes."""
    return np.asarray(values, dtype="<i2").tobytes()


def unpack(pcm: bytes) -> np.ndarray:
    """Unpack s16le bytes to int16."""
    return np.frombuffer(pcm, dtype="<i2")


class GainTests(SynchronousTestCase):
    """apply_gain and silence."""

    def test_gain_scales_and_saturates(self) -> None:
        """Gain multiplies samples and clips at the int16 range."""
        self.assertEqual(unpack(apply_gain(frame([100, -200, 20000]), 2.0)).tolist(), [200, -400, 32767])
        self.assertEqual(unpack(apply_gain(frame([100, -202]), 0.5)).tolist(), [50, -101])

    def test_unity_and_zero(self) -> None:
        """Gain 1 returns the input and gain 0 returns silence of the same length."""
        f = frame([1, 2, 3])
        self.assertEqual(apply_gain(f, 1.0), f)
        self.assertEqual(apply_gain(f, 0), bytes(6))

    def test_bad_gain(self) -> None:
        """Negative, infinite or NaN gains and odd byte counts raise MixError."""
        for gain in (-1.0, float("inf"), float("nan")):
            self.assertRaises(MixError, apply_gain, frame([1]), gain)
        self.assertRaises(MixError, apply_gain, b"\x00", 2.0)

    def test_silence_cached(self) -> None:
        """silence() returns zero bytes of the right length, the same object each time."""
        self.assertEqual(silence(160), bytes(320))
        self.assertIs(silence(160), silence(160))
        self.assertEqual(silence(0), b"")
        self.assertRaises(MixError, silence, -1)
