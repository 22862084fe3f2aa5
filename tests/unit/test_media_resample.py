"""Tests for activecall.media.resample."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from activecall.media._audioop import audioop
from activecall.media.resample import ResampleError, Resampler, resample

RATES = (8000, 16000, 22050, 24000, 44100, 48000)


def tone(freq_hz: float, rate_hz: int, samples: int, amplitude: float = 10000.0) -> np.ndarray:
    """Return an int16 sine of ``samples`` samples."""
    return (np.sin(2 * np.pi * freq_hz * np.arange(samples) / rate_hz) * amplitude).astype("<i2")


def pcm_array(pcm: bytes) -> np.ndarray:
    """View s16le bytes as float64 samples."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def noise(samples: int, seed: int) -> bytes:
    """Return reproducible white noise as s16le bytes."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(samples) * 4000).astype("<i2").tobytes()


def chunked(r: Resampler, pcm: bytes, sizes: list[int]) -> bytes:
    """Feed ``pcm`` through ``r`` in chunks of the given sample counts (cycled), then flush."""
    out = []
    pos = 0
    for size in itertools.cycle(sizes):
        if pos >= len(pcm):
            break
        out.append(r.process(pcm[pos : pos + 2 * size]))
        pos += 2 * size
    out.append(r.flush())
    return b"".join(out)


class ResamplerTests(SynchronousTestCase):
    """Streaming behaviour of Resampler."""

    def test_identity(self) -> None:
        """Equal rates return the input unchanged and flush nothing."""
        pcm = noise(333, 1)
        r = Resampler(16000, 16000)
        self.assertEqual(r.process(pcm), pcm)
        self.assertEqual(r.flush(), b"")
        self.assertEqual(resample(pcm, 8000, 8000), pcm)

    def test_chunked_equals_one_shot(self) -> None:
        """For every rate pair, odd-sized chunks give bit-identical output to a single call."""
        pcm = noise(9000, 2)
        for a, b in itertools.product(RATES, RATES):
            whole = Resampler(a, b)
            expected = whole.process(pcm) + whole.flush()
            got = chunked(Resampler(a, b), pcm, [1, 7, 160, 333, 2])
            self.assertEqual(got, expected, f"{a}->{b}")

    @settings(max_examples=30, deadline=None)
    @given(
        st.sampled_from(RATES),
        st.sampled_from(RATES),
        st.lists(st.integers(min_value=0, max_value=700), min_size=1, max_size=8),
    )
    def test_chunking_property(self, a: int, b: int, sizes: list[int]) -> None:
        """Any chunking, including empty chunks, gives the same output as one call."""
        pcm = noise(3000, 3)
        whole = Resampler(a, b)
        expected = whole.process(pcm) + whole.flush()
        sizes = sizes if any(sizes) else [1]
        self.assertEqual(chunked(Resampler(a, b), pcm, sizes), expected)

    def test_fixed_frame_in_fixed_frame_out(self) -> None:
        """Every 20 ms frame in yields exactly one 20 ms frame out, from the first frame on."""
        for a, b in itertools.product(RATES, RATES):
            r = Resampler(a, b)
            frame = tone(440, a, a // 50).tobytes()
            sizes = {len(r.process(frame)) for _ in range(20)}
            self.assertEqual(sizes, {2 * (b // 50)}, f"{a}->{b}")

    def test_no_drift_on_long_streams(self) -> None:
        """After 200 s of 10 ms frames at 44.1 kHz the output count equals ceil(N*out/in) exactly."""
        r = Resampler(44100, 16000)
        frame = bytes(2 * 441)  # 10 ms: an awkward size for a 441:160 ratio
        calls = 20000
        counts = [len(r.process(frame)) // 2 for _ in range(calls)]
        total_out = sum(counts)
        total_in = 441 * calls
        # 10 ms at 16 kHz is 160 samples: never more, never fewer, on every call.
        self.assertEqual(set(counts), {160})
        self.assertEqual(total_out, -(-total_in * 16000 // 44100))

    def test_flush_releases_delay_and_resets(self) -> None:
        """flush() returns the delayed tail, after which the object behaves like a new one."""
        pcm = tone(1000, 16000, 1600).tobytes()
        r = Resampler(16000, 8000)
        first = r.process(pcm) + r.flush()
        self.assertEqual(len(first) // 2, 800 + int(np.ceil(r.delay_out_samples)))
        self.assertGreater(np.abs(pcm_array(first[-2 * int(r.delay_out_samples) :])).max(), 100)
        second = r.process(pcm) + r.flush()
        self.assertEqual(first, second)

    def test_no_click_at_chunk_edges(self) -> None:
        """A tone fed in 20 ms chunks has no sample-to-sample jump larger than the tone's own slope."""
        a, b = 8000, 48000
        pcm = tone(300, a, a).tobytes()
        r = Resampler(a, b)
        out = pcm_array(b"".join(r.process(pcm[i : i + 320]) for i in range(0, len(pcm), 320)))
        steady = out[2000:-2000]
        max_slope = 10000 * 2 * np.pi * 300 / b
        self.assertLess(np.abs(np.diff(steady)).max(), max_slope * 1.05)

    def test_bad_arguments(self) -> None:
        """Non-integer or out-of-range rates and odd byte counts raise ResampleError (a ValueError)."""
        for args in ((0, 8000), (8000, -1), (8000.0, 16000), (8000, 10**7), (True, 8000)):
            self.assertRaises(ResampleError, Resampler, *args)
        self.assertRaises(ResampleError, Resampler(8000, 16000).process, b"\x00")
        self.assertRaises(ResampleError, resample, b"\x00\x00\x00", 8000, 16000)
        self.assertTrue(issubclass(ResampleError, ValueError))


class QualityTests(SynchronousTestCase):
    """Frequency response of the filter."""

    def test_tone_preserved_for_all_pairs(self) -> None:
        """A 1 kHz tone keeps its frequency and amplitude (error below 0.1 %) for every rate pair."""
        for a, b in itertools.product(RATES, RATES):
            y = pcm_array(resample(tone(1000, a, a // 2).tobytes(), a, b))
            self.assertEqual(len(y), -(-(a // 2) * b // a))
            ref = np.sin(2 * np.pi * 1000 * np.arange(len(y)) / b) * 10000
            rms_err = np.sqrt(np.mean((y[300:-300] - ref[300:-300]) ** 2))
            self.assertLess(rms_err, 10.0, f"{a}->{b}")

    def test_downsampling_does_not_alias(self) -> None:
        """A 6 kHz tone taken from 48 kHz to 8 kHz vanishes instead of folding to 2 kHz."""
        x = tone(6000, 48000, 48000, 16000).tobytes()
        for y in (resample(x, 48000, 8000), Resampler(48000, 8000).process(x)):
            steady = pcm_array(y)[400:-400]
            spectrum = np.abs(np.fft.rfft(steady * np.hanning(len(steady))))
            freqs = np.fft.rfftfreq(len(steady), 1 / 8000)
            alias = spectrum[np.abs(freqs - 2000) < 50].max()
            # Reference: what an in-band tone of the same amplitude produces.
            ref = pcm_array(resample(tone(2000, 48000, 48000, 16000).tobytes(), 48000, 8000))[400:-400]
            ref_peak = np.abs(np.fft.rfft(ref * np.hanning(len(ref)))).max()
            self.assertLess(alias / ref_peak, 10 ** (-70 / 20))
        # audioop.ratecv, the cheap alternative, does alias loudly: the test can tell.
        cheap = pcm_array(audioop.ratecv(x, 2, 1, 48000, 8000, None)[0])
        self.assertGreater(np.sqrt(np.mean(cheap**2)), 5000)

    def test_upsampling_has_no_images(self) -> None:
        """A 3 kHz tone taken from 8 kHz to 48 kHz has no image at 5 kHz."""
        y = pcm_array(resample(tone(3000, 8000, 8000).tobytes(), 8000, 48000))[2000:-2000]
        spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
        freqs = np.fft.rfftfreq(len(y), 1 / 48000)
        peak = spectrum[np.abs(freqs - 3000) < 50].max()
        image = spectrum[np.abs(freqs - 5000) < 50].max()
        self.assertLess(image / peak, 10 ** (-60 / 20))

    def test_one_shot_is_aligned(self) -> None:
        """resample() has no delay: a 16k->8k tone lines up with the ideal 8 kHz tone."""
        y = pcm_array(resample(tone(500, 16000, 16000).tobytes(), 16000, 8000))
        ref = np.sin(2 * np.pi * 500 * np.arange(len(y)) / 8000) * 10000
        self.assertLess(np.abs(y[200:-200] - ref[200:-200]).max(), 20)

    def test_loud_input_saturates(self) -> None:
        """A full-scale square wave overshoots in the filter and is clipped, never wrapped."""
        square = np.where(np.arange(8000) // 20 % 2 == 0, 32767, -32768).astype("<i2")
        y = np.frombuffer(resample(square.tobytes(), 8000, 16000), dtype="<i2")
        self.assertEqual(y.max(), 32767)
        self.assertEqual(y.min(), -32768)
        # Wrap-around would put negative values inside the positive plateaus and vice versa.
        half_period = (np.arange(len(y)) // 2) % 40
        self.assertGreater(y[(half_period >= 5) & (half_period < 15)].min(), 30000)
        self.assertLess(y[(half_period >= 25) & (half_period < 35)].max(), -30000)


class OddRateTests(SynchronousTestCase):
    """Rate pairs with more than 4096 phases (odd file rates) work without a full filter bank."""

    ODD = ((44101, 8000), (8000, 44101), (44101, 16000))

    def test_rows_on_demand_equal_the_bank(self) -> None:
        """The rows computed per block are the rows the bank would hold, bit for bit."""
        from activecall.media.resample import _design_bank, _kernel_rows

        bank, half = _design_bank(147, 160)
        assert bank is not None
        phases = np.array([0, 5, 146, 73])
        self.assertTrue(np.array_equal(_kernel_rows(147, 160, phases), bank[phases]))
        self.assertEqual(bank.shape, (147, 2 * half))

    def test_large_pairs_keep_no_bank(self) -> None:
        """8 kHz -> 44101 Hz (44101 phases) and 44101 Hz -> 8 kHz (8000 phases) keep no bank."""
        self.assertIsNone(Resampler(8000, 44101)._bank)
        self.assertIsNone(Resampler(44101, 8000)._bank)
        self.assertIsNotNone(Resampler(44100, 8000)._bank)

    def test_odd_pairs_preserve_a_tone(self) -> None:
        """A 1 kHz tone keeps its frequency and amplitude through the odd pairs, one-shot and chunked."""
        for a, b in self.ODD:
            x = tone(1000, a, a // 4).tobytes()
            y = pcm_array(resample(x, a, b))
            self.assertEqual(len(y), -(-(a // 4) * b // a))
            ref = np.sin(2 * np.pi * 1000 * np.arange(len(y)) / b) * 10000
            rms_err = np.sqrt(np.mean((y[300:-300] - ref[300:-300]) ** 2))
            self.assertLess(rms_err, 10.0, f"{a}->{b}")
            self.assertEqual(chunked(Resampler(a, b), x, [a // 50, 7, 1000]),
                             chunked(Resampler(a, b), x, [len(x) // 2]), f"{a}->{b}")
