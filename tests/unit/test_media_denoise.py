"""Denoiser: RNNoise on 20 ms call frames at 8/16/48 kHz (activecall.media.denoise)."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import wave
from typing import Optional

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from activecall.media.denoise import Denoiser, DenoiseUnavailableError
from activecall.media.resample import resample

try:
    import pyrnnoise.rnnoise  # noqa: F401
    _SKIP: Optional[str] = None
except (ImportError, OSError):
    _SKIP = "pyrnnoise is not installed"


def _noise(rate_hz: int, seconds: float, rms: float, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, rms, int(rate_hz * seconds))


def _db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-9))


def _run(denoiser: Denoiser, signal: np.ndarray, frame_ms: int = 20) -> np.ndarray:
    pcm = np.clip(signal, -32768, 32767).astype("<i2").tobytes()
    step = denoiser.rate_hz * frame_ms // 1000 * 2
    out = []
    for i in range(0, len(pcm) - step + 1, step):
        frame = pcm[i:i + step]
        got = denoiser.process(frame)
        assert len(got) == len(frame), (len(got), len(frame))
        out.append(got)
    return np.frombuffer(b"".join(out), dtype="<i2").astype(np.float64)


def _speech(rate_hz: int) -> Optional[np.ndarray]:
    """A spoken English sentence from espeak-ng at ``rate_hz``, or None without espeak-ng."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    wav = subprocess.run([exe, "--stdout", "-s", "150", "The quick brown fox jumps over the lazy dog near the river bank."],
                         capture_output=True, check=True, timeout=30).stdout
    with wave.open(io.BytesIO(wav), "rb") as w:
        pcm = w.readframes(w.getnframes())
        src_rate = w.getframerate()
    x = np.frombuffer(resample(pcm, src_rate, rate_hz), dtype="<i2").astype(np.float64)
    return x * (6000.0 / np.sqrt(np.mean(x ** 2)))  # speech at about -15 dBFS


class DenoiserTests(SynchronousTestCase):
    """RNNoise suppresses stationary noise, keeps speech, keeps frame sizes and streams state."""

    skip = _SKIP

    def test_white_noise_drops_markedly(self) -> None:
        """3 s of white noise loses more than 20 dB once the model has settled, at every call rate."""
        for rate in (8000, 16000, 48000):
            noise = _noise(rate, 3.0, 1500.0)
            out = _run(Denoiser(rate), noise)
            settled = slice(rate, None)
            self.assertEqual(len(out), len(noise))
            self.assertGreater(_db(noise[settled]) - _db(out[settled]), 20.0, rate)

    def test_speech_kept_noise_removed(self) -> None:
        """Speech plus white noise: the noise-only lead drops >15 dB, the speech keeps its energy, SNR improves.

        Latency: at 48 kHz the output lags by RNNoise's own delay only; at 8/16 kHz the two resamplers
        add at most 5.5 ms to it (no frame of buffering).
        """
        own_delay_ms = None
        for rate in (48000, 16000, 8000):
            speech = _speech(rate)
            if speech is None:
                raise self.skipTest("espeak-ng is not installed")
            lead = rate * 2  # 2 s of noise before the speaker starts
            clean = np.concatenate([np.zeros(lead), speech, np.zeros(rate // 2)])
            noise = _noise(rate, len(clean) / rate, 600.0)
            out = _run(Denoiser(rate), clean + noise)
            n = len(out)
            noise_only = slice(rate, lead)
            talk = slice(lead, lead + len(speech))
            self.assertGreater(_db(noise[noise_only]) - _db(out[noise_only]), 15.0, rate)
            # the speech is not what was removed: within 6 dB of the clean speech energy
            self.assertGreater(_db(out[talk]), _db(clean[talk]) - 6.0, rate)
            # the speaker stands out from the background far more than before (SNR improves)
            before = _db((clean + noise)[talk]) - _db(noise[noise_only])
            after = _db(out[talk]) - _db(out[noise_only])
            self.assertGreater(after - before, 10.0, rate)
            delay_ms = 1000 * self._best_delay(clean[:n], out, rate // 20) / rate
            if own_delay_ms is None:
                own_delay_ms = delay_ms
                self.assertLessEqual(own_delay_ms, 20.0)
            self.assertLessEqual(delay_ms - own_delay_ms, 5.5, rate)

    @staticmethod
    def _best_delay(clean: np.ndarray, out: np.ndarray, max_lag: int) -> int:
        """The output's delay against the clean signal in samples (cross-correlation peak)."""
        scores = [float(np.dot(out[lag:], clean[: len(clean) - lag])) for lag in range(max_lag)]
        return int(np.argmax(scores))

    def test_frame_lengths_preserved_and_checked(self) -> None:
        """Every 20 ms (and 10 ms) frame gives the same length back; other lengths are refused."""
        for rate in (8000, 16000, 48000):
            d = Denoiser(rate)
            for samples in (rate // 50, rate // 100, rate // 50 * 3):
                self.assertEqual(len(d.process(b"\x00\x00" * samples)), 2 * samples)
            with self.assertRaises(ValueError):
                d.process(b"\x00\x00" * (rate // 50 - 1))
        with self.assertRaises(ValueError):
            Denoiser(22050)

    def test_streaming_state_chunk_independent(self) -> None:
        """Frame-by-frame state: 10 ms and 20 ms frames give identical output; a restarted denoiser differs."""
        rate = 16000
        signal = _noise(rate, 1.0, 1500.0)
        a = _run(Denoiser(rate), signal, frame_ms=20)
        b = _run(Denoiser(rate), signal, frame_ms=10)
        np.testing.assert_array_equal(a, b)
        # the state carries across calls: the second half of a stream is not what a new stream makes of it
        half = len(signal) // 2
        restarted = _run(Denoiser(rate), signal[half:])
        self.assertFalse(np.array_equal(restarted, a[half:]))

    def test_close(self) -> None:
        """A closed denoiser refuses frames."""
        d = Denoiser(8000)
        d.close()
        d.close()
        with self.assertRaises(ValueError):
            d.process(b"\x00\x00" * 160)


class UnavailableTests(SynchronousTestCase):
    def test_unavailable_without_pyrnnoise(self) -> None:
        """Without pyrnnoise, Denoiser raises DenoiseUnavailableError naming the package."""
        code = ("import sys; sys.modules['pyrnnoise'] = None\n"
                "from activecall.media.denoise import Denoiser, DenoiseUnavailableError\n"
                "try:\n    Denoiser(16000)\nexcept DenoiseUnavailableError as e:\n    print('unavailable:', e)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
        self.assertIn("unavailable:", out)
        self.assertIn("pyrnnoise", out)
