"""Tests for activecall.media.mixer."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from activecall.media.mixer import MixError, Mixer, apply_gain, db_to_gain, mix_into, silence


def frame(values: list[int] | np.ndarray) -> bytes:
    """Pack int16 values as s16le bytes."""
    return np.asarray(values, dtype="<i2").tobytes()


def unpack(pcm: bytes) -> np.ndarray:
    """Unpack s16le bytes to int16."""
    return np.frombuffer(pcm, dtype="<i2")


class MixerTests(SynchronousTestCase):
    """Mixer and mix_into."""

    def test_sums_frames(self) -> None:
        """Mixing adds the frames sample by sample."""
        m = Mixer(4)
        out = m.mix([frame([1, 2, 3, 4]), frame([10, -20, 30, -40]), frame([100, 100, 100, 100])])
        self.assertEqual(unpack(out).tolist(), [111, 82, 133, 64])

    def test_saturates_instead_of_wrapping(self) -> None:
        """Sums beyond the int16 range clip to 32767 / -32768."""
        m = Mixer(3)
        out = m.mix([frame([30000, -30000, 5]), frame([30000, -30000, 5]), frame([1, -1, 5])])
        self.assertEqual(unpack(out).tolist(), [32767, -32768, 15])

    def test_empty_and_single(self) -> None:
        """No frames gives silence; one full frame comes back unchanged."""
        m = Mixer(160)
        self.assertEqual(m.mix([]), bytes(320))
        f = frame(np.arange(160))
        self.assertEqual(m.mix([f]), f)
        self.assertEqual(m.mix([memoryview(f)]), f)

    def test_short_frames_are_padded(self) -> None:
        """A frame shorter than the mix counts as followed by silence."""
        m = Mixer(4)
        out = m.mix([frame([1, 1, 1, 1]), frame([5, 5])])
        self.assertEqual(unpack(out).tolist(), [6, 6, 1, 1])

    def test_state_does_not_leak_between_mixes(self) -> None:
        """The reused accumulator starts from zero on every call."""
        m = Mixer(2)
        m.mix([frame([1000, 1000]), frame([1000, 1000])])
        self.assertEqual(unpack(m.mix([frame([1, 2]), frame([3, 4])])).tolist(), [4, 6])

    def test_bad_frames(self) -> None:
        """Odd byte counts and over-long frames raise MixError (a ValueError)."""
        m = Mixer(2)
        self.assertRaises(MixError, m.mix, [frame([1, 2]), b"\x00\x00\x00"])
        self.assertRaises(MixError, m.mix, [frame([1, 2]), frame([1, 2, 3])])
        self.assertRaises(MixError, Mixer, 0)
        self.assertTrue(issubclass(MixError, ValueError))

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.lists(st.integers(-32768, 32767), min_size=8, max_size=8), min_size=2, max_size=6))
    def test_matches_reference(self, frames: list[list[int]]) -> None:
        """Mixer.mix and mix_into equal a clipped integer sum for arbitrary frames."""
        expected = np.clip(np.sum(np.array(frames, dtype=np.int64), axis=0), -32768, 32767)
        packed = [frame(f) for f in frames]
        self.assertEqual(unpack(Mixer(8).mix(packed)).tolist(), expected.tolist())
        scratch = np.empty(8, dtype=np.int32)
        self.assertEqual(unpack(mix_into(scratch, packed)).tolist(), expected.tolist())

    def test_mix_into_checks_scratch(self) -> None:
        """mix_into refuses a scratch buffer that is not a 1-D int32 array."""
        self.assertRaises(MixError, mix_into, np.zeros(4, dtype=np.int16), [frame([1, 2, 3, 4])])


class GainTests(SynchronousTestCase):
    """apply_gain, db_to_gain and silence."""

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
        self.assertRaises(MixError, db_to_gain, float("nan"))

    def test_db_to_gain(self) -> None:
        """0 dB is unity and -6 dB roughly halves the amplitude."""
        self.assertEqual(db_to_gain(0.0), 1.0)
        self.assertAlmostEqual(db_to_gain(-6.0206), 0.5, places=4)

    def test_silence_cached(self) -> None:
        """silence() returns zero bytes of the right length, the same object each time."""
        self.assertEqual(silence(160), bytes(320))
        self.assertIs(silence(160), silence(160))
        self.assertEqual(silence(0), b"")
        self.assertRaises(MixError, silence, -1)
