"""Tests for activecall.media.dtmf_detect: in-band (Goertzel) DTMF detection on synthesized audio."""

from __future__ import annotations

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from activecall.media.dtmf_detect import COL_HZ, KEYPAD, ROW_HZ, InbandDtmfDetector

ALL = "123A456B789C*0#D"


def _tone(digit: str, ms: float, fs: int, rng: np.random.Generator, amp: float = 7000.0) -> np.ndarray:
    """Both tones of ``digit`` at ``amp`` each, random phases."""
    r = next(i for i, row in enumerate(KEYPAD) if digit in row)
    c = KEYPAD[r].index(digit)
    t = np.arange(int(fs * ms / 1000)) / fs
    return amp * (
        np.sin(2 * np.pi * ROW_HZ[r] * t + rng.uniform(0, 2 * np.pi))
        + np.sin(2 * np.pi * COL_HZ[c] * t + rng.uniform(0, 2 * np.pi))
    )


def _silence(ms: float, fs: int) -> np.ndarray:
    return np.zeros(int(fs * ms / 1000))


def _sequence(digits: str, fs: int, rng: np.random.Generator, on_ms: float = 80, off_ms: float = 80) -> np.ndarray:
    parts = [_silence(off_ms, fs)]
    for d in digits:
        parts += [_tone(d, on_ms, fs, rng), _silence(off_ms, fs)]
    return np.concatenate(parts)


def _pcm(signal: np.ndarray) -> bytes:
    return np.clip(np.round(signal), -32768, 32767).astype(np.int16).tobytes()


def _detect(signal: np.ndarray, fs: int, frame_ms: int = 20, **kw: float) -> str:
    """Feed ``signal`` in 20 ms frames, as the media tick does, and join the digits."""
    det = InbandDtmfDetector(fs, **kw)  # type: ignore[arg-type]
    data = _pcm(signal)
    step = 2 * fs * frame_ms // 1000
    return "".join("".join(det.feed(data[i : i + step])) for i in range(0, len(data), step))


def _speech_like(seconds: float, fs: int, rng: np.random.Generator) -> np.ndarray:
    """Voiced segments (harmonic series with gliding f0 and formant envelope), noise bursts and chords."""
    out = []
    total = int(seconds * fs)
    n = 0
    while n < total:
        seg = int(fs * rng.uniform(0.08, 0.3))
        t = np.arange(seg) / fs
        kind = rng.integers(0, 3)
        if kind == 0:
            # Glottal-like source (-12 dB/octave) through three resonant formants.
            f0 = rng.uniform(85, 260) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
            phase = 2 * np.pi * np.cumsum(f0) / fs
            formants = [(rng.uniform(300, 900), rng.uniform(60, 150)), (rng.uniform(900, 2300), rng.uniform(80, 200)),
                        (rng.uniform(2300, 3300), rng.uniform(100, 250))]
            sig = np.zeros(seg)
            for k in range(1, int(3400 / f0.max())):
                fk = k * f0.mean()
                gain = 1.0 / k**2
                for big_f, bw in formants:
                    gain *= big_f**2 / np.hypot(big_f**2 - fk**2, fk * bw)
                sig += gain * np.sin(k * phase)
        elif kind == 1:
            sig = rng.normal(0, 1, seg)
        else:
            # A chord of 3-5 random notes, each with a few harmonics (music on hold).
            sig = np.zeros(seg)
            for _ in range(rng.integers(3, 6)):
                f = rng.uniform(200, 1200)
                for h in (1, 2, 3):
                    sig += np.sin(2 * np.pi * h * f * t + rng.uniform(0, 6)) / h
        env = np.hanning(seg)
        sig = sig / (np.max(np.abs(sig)) + 1e-9) * rng.uniform(2000, 20000) * env
        out.append(sig)
        n += seg
    return np.concatenate(out)[:total]


class DetectionTests(SynchronousTestCase):
    """All digits are detected once per press."""

    def test_all_digits_8k(self) -> None:
        """The 16 digits at 8 kHz, 80 ms on / 80 ms off, are each reported exactly once."""
        rng = np.random.default_rng(7)
        self.assertEqual(_detect(_sequence(ALL, 8000, rng), 8000), ALL)

    def test_all_digits_16k(self) -> None:
        """The 16 digits at 16 kHz (blocks scaled to 204 samples) are each reported exactly once."""
        rng = np.random.default_rng(8)
        self.assertEqual(_detect(_sequence(ALL, 16000, rng), 16000, frame_ms=20), ALL)
        self.assertEqual(InbandDtmfDetector(16000).block, 204)

    def test_white_noise_15db_snr(self) -> None:
        """With continuous white noise 15 dB below the tone power, every digit is still found once."""
        for fs, seed in ((8000, 1), (16000, 2)):
            rng = np.random.default_rng(seed)
            sig = _sequence(ALL, fs, rng)
            tone_power = 7000.0**2  # two tones of amplitude 7000: 2 * a**2 / 2
            noise = rng.normal(0, np.sqrt(tone_power / 10 ** 1.5), len(sig))
            self.assertEqual(_detect(sig + noise, fs), ALL, fs)

    def test_back_to_back_same_digit(self) -> None:
        """Two presses of the same key separated by 50 ms of silence yield both."""
        for fs in (8000, 16000):
            rng = np.random.default_rng(3)
            sig = np.concatenate([_silence(30, fs), _tone("5", 70, fs, rng), _silence(50, fs), _tone("5", 70, fs, rng), _silence(50, fs)])
            self.assertEqual(_detect(sig, fs), "55", fs)

    def test_back_to_back_different_digits(self) -> None:
        """A fast dialled string with 50 ms gaps is read completely, at every alignment."""
        rng = np.random.default_rng(4)
        for offset in range(0, 102, 17):
            sig = np.concatenate([_silence(offset / 8, 8000), _sequence("9#0*", 8000, rng, on_ms=50, off_ms=50)])
            self.assertEqual(_detect(sig, 8000), "9#0*", offset)

    def test_minimum_duration(self) -> None:
        """A 40 ms tone is detected; a 10 ms click of the same tones is not."""
        rng = np.random.default_rng(5)
        for offset in range(0, 102, 10):
            pre = _silence(offset / 8, 8000)
            self.assertEqual(_detect(np.concatenate([pre, _tone("7", 40, 8000, rng), _silence(60, 8000)]), 8000), "7")
            self.assertEqual(_detect(np.concatenate([pre, _tone("7", 10, 8000, rng), _silence(60, 8000)]), 8000), "")

    def test_held_key_reported_once(self) -> None:
        """A key held for two seconds is one press."""
        rng = np.random.default_rng(6)
        self.assertEqual(_detect(np.concatenate([_tone("#", 2000, 8000, rng), _silence(40, 8000)]), 8000), "#")

    def test_arbitrary_chunking(self) -> None:
        """Feeding odd-sized chunks gives the same digits as 20 ms frames."""
        rng = np.random.default_rng(9)
        data = _pcm(_sequence("147*", 8000, rng))
        det = InbandDtmfDetector(8000)
        got = []
        for i in range(0, len(data), 74):
            got += det.feed(data[i : i + 74])
        self.assertEqual("".join(got), "147*")


class RejectionTests(SynchronousTestCase):
    """Things that are not DTMF produce no digits."""

    def test_silence_and_noise(self) -> None:
        """Silence and loud white noise produce nothing."""
        rng = np.random.default_rng(10)
        self.assertEqual(_detect(np.zeros(8000), 8000), "")
        self.assertEqual(_detect(rng.normal(0, 5000, 8000 * 5), 8000), "")

    def test_speech_like_signals(self) -> None:
        """Speech-like voiced segments, noise bursts and chords (15 s at each rate) produce no digits."""
        for fs, seed in ((8000, 11), (16000, 12)):
            rng = np.random.default_rng(seed)
            self.assertEqual(_detect(_speech_like(15.0, fs, rng), fs), "", fs)

    def test_single_tone(self) -> None:
        """A row or column frequency alone is not a digit."""
        t = np.arange(8000) / 8000
        self.assertEqual(_detect(10000 * np.sin(2 * np.pi * 697 * t), 8000), "")
        self.assertEqual(_detect(10000 * np.sin(2 * np.pi * 1336 * t), 8000), "")

    def test_too_quiet(self) -> None:
        """Tones below the level threshold (-36 dBFS) are ignored."""
        rng = np.random.default_rng(13)
        quiet = _sequence("1", 8000, rng) * (100.0 / 7000.0)
        self.assertEqual(_detect(quiet, 8000), "")

    def test_excessive_twist(self) -> None:
        """A column tone 12 dB weaker than the row tone is rejected."""
        t = np.arange(4000) / 8000
        sig = 8000 * np.sin(2 * np.pi * 770 * t) + 2000 * np.sin(2 * np.pi * 1336 * t)
        self.assertEqual(_detect(sig, 8000), "")
        ok = 8000 * np.sin(2 * np.pi * 770 * t) + 5000 * np.sin(2 * np.pi * 1336 * t)
        self.assertEqual(_detect(ok, 8000), "5")


class SharedTablesTests(SynchronousTestCase):
    """The Goertzel tables are built once per sample rate and shared, read-only, by every detector."""

    def test_detectors_at_one_rate_share_the_basis(self) -> None:
        """Two 8 kHz detectors hold the same basis array; a 16 kHz one has its own, twice as long."""
        a, b, wide = InbandDtmfDetector(8000), InbandDtmfDetector(8000), InbandDtmfDetector(16000)
        self.assertIs(a._basis, b._basis)
        self.assertEqual(a._basis.shape, (102, 16))
        self.assertEqual(wide._basis.shape, (204, 16))

    def test_shared_tables_are_read_only(self) -> None:
        """Writing into a shared table raises instead of corrupting every other call's detector."""
        detector = InbandDtmfDetector(8000)
        with self.assertRaises(ValueError):
            detector._basis[0, 0] = 0.0

    def test_detectors_sharing_tables_keep_their_own_state(self) -> None:
        """A press fed to one detector is not seen by another at the same rate."""
        rng = np.random.default_rng(3)
        a, b = InbandDtmfDetector(8000), InbandDtmfDetector(8000)
        pcm = _pcm(_sequence("5", 8000, rng))
        self.assertEqual(a.feed(pcm), ["5"])
        self.assertEqual(b.feed(_pcm(_silence(200, 8000))), [])
