"""Adaptive digital gain (``agc``): the level it reaches, how fast, what holds it back, the limiter."""

from __future__ import annotations

import random

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from activecall.media.agc import GainController
from activecall.options import AgcOption

RATE = 16000
FRAME = 320  # 20 ms


def tone(rms_dbfs: float, ms: int = 20, hz: float = 300.0, start: int = 0) -> bytes:
    t = (np.arange(RATE * ms // 1000) + start) / RATE
    amplitude = 10 ** (rms_dbfs / 20) * 32768 * np.sqrt(2)
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def noise(rms_dbfs: float, ms: int = 20, seed: int = 1) -> bytes:
    samples = np.random.RandomState(seed).randn(RATE * ms // 1000) * 10 ** (rms_dbfs / 20) * 32768
    return samples.astype("<i2").tobytes()


def rms_dbfs(pcm: bytes) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(10 * np.log10(np.mean(np.square(x)) / 32768**2 + 1e-12))


def peak(pcm: bytes) -> int:
    return int(np.max(np.abs(np.frombuffer(pcm, dtype="<i2").astype(np.int32))))


class GainTests(SynchronousTestCase):
    def assertNear(self, value: float, expected: float, delta: float) -> None:
        self.assertLessEqual(abs(value - expected), delta, f"{value} is not within {delta} of {expected}")

    def test_quiet_speech_is_lifted_to_the_target_at_the_allowed_rate(self) -> None:
        """Speech at -45 dBFS over a quiet floor: the gain climbs from 15 dB by at most 6 dB/s (plus one
        catch-up step after the first 12 speech sub-frames) until the output sits at -25 dBFS."""
        agc = GainController(AgcOption())
        for _ in range(25):
            agc.process(noise(-85), speech=False)
        self.assertEqual(agc.gain_db, 15.0)
        gains = []
        for i in range(150):
            out = agc.process(tone(-45, start=i * FRAME), speech=True)
            gains.append(agc.gain_db)
        steps = np.diff([15.0] + gains)
        self.assertLessEqual(max(steps), 2 * 0.06 * 12 + 1e-6)  # the catch-up frame (two sub-frames)
        self.assertLessEqual(sorted(steps)[-2], 2 * 0.06 + 1e-6)
        self.assertNear(agc.speech_level_dbfs, -45.0, 0.5)
        self.assertTrue(agc.confident)
        self.assertNear(agc.gain_db, 20.0, 0.5)
        self.assertNear(rms_dbfs(out), -25.0, 0.5)

    def test_noise_floor_caps_the_gain(self) -> None:
        """A -60 dBFS floor may be lifted only to -50 dBFS: the gain falls to 10 dB, whatever the speech."""
        agc = GainController(AgcOption())
        for i in range(200):
            agc.process(noise(-60, seed=i), speech=False)
        self.assertNear(agc.noise_level_dbfs, -60.0, 1.5)
        for i in range(200):
            agc.process(tone(-50, start=i * FRAME), speech=True)
        self.assertNear(agc.gain_db, -50.0 - agc.noise_level_dbfs, 0.2)
        self.assertLess(agc.gain_db, 12.0)

    def test_no_rise_without_speech_or_on_short_bursts(self) -> None:
        """Quiet audio the VAD calls silence, and speech runs shorter than the threshold, never raise the gain
        nor move the speech level."""
        agc = GainController(AgcOption())
        start_level = agc.speech_level_dbfs
        for i in range(100):
            agc.process(tone(-60, start=i * FRAME), speech=False)
        self.assertLessEqual(agc.gain_db, 15.0)
        for burst in range(20):
            for i in range(5):  # 10 sub-frames < 12
                agc.process(tone(-60, start=i * FRAME), speech=True)
            agc.process(bytes(FRAME * 2), speech=False)
        self.assertLessEqual(agc.gain_db, 15.0)
        self.assertEqual(agc.speech_level_dbfs, start_level)
        self.assertFalse(agc.confident)

    def test_loud_speech_lowers_the_gain_and_the_limiter_stops_clipping(self) -> None:
        """Speech near full scale: peaks stay at -1 dBFS under the limiter while the gain comes down;
        without the limiter the same input clips."""
        limited = GainController(AgcOption())
        clipped = GainController(AgcOption(enable_limiter=False))
        ceiling = int(10 ** (-1 / 20) * 32767) + 1
        clipped_peaks = []
        for i in range(300):
            loud = tone(-6, start=i * FRAME)
            out = limited.process(loud, speech=True)
            self.assertLessEqual(peak(out), ceiling)
            clipped_peaks.append(peak(clipped.process(loud, speech=True)))
        self.assertLess(limited.gain_db, 15.0 - 5.0)
        self.assertGreaterEqual(max(clipped_peaks), 32767)  # full scale: clipped
        self.assertLess(rms_dbfs(out), 0.0)

    def test_any_length_and_hostile_settings(self) -> None:
        """Odd lengths (a resampler's 319/321 samples, a lone byte, nothing) keep their length; extreme but
        valid settings on random input give finite 16-bit output."""
        agc = GainController(AgcOption())
        for n in (0, 1, 2, 318, 638, 640, 642, 6400):
            self.assertEqual(len(agc.process(bytes(range(256)) * (n // 256) + bytes(n % 256), speech=True)),
                             n - n % 2)
        extremes = AgcOption(headroom_db=0.0, max_gain_db=90.0, initial_gain_db=90.0,
                             max_gain_change_db_per_second=1000.0, max_output_noise_level_dbfs=0.0,
                             adjacent_speech_frames_threshold=1)
        rng = random.Random(5)
        for settings in (extremes, AgcOption(max_gain_db=0.0, initial_gain_db=90.0)):
            agc = GainController(settings)
            for _ in range(300):
                pcm = rng.randbytes(rng.choice((0, 2, 320, 640, 642)))
                out = agc.process(pcm, speech=rng.random() < 0.7)
                self.assertEqual(len(out), len(pcm))
                self.assertTrue(np.isfinite(agc.gain_db))
            self.assertLessEqual(agc.gain_db, settings.max_gain_db)
