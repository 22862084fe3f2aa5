"""Automatic gain control of the caller's audio (``agc``, protocol.md §4.13): WebRTC AGC2's adaptive
digital model.

Per 10 ms sub-frame of 16-bit mono PCM:

- the **speech level** (dBFS RMS) is a leaky average over the sub-frames the VAD calls speech; a run
  shorter than ``adjacentSpeechFramesThreshold`` sub-frames is taken back (a click is not a voice);
  the estimate is *confident* after 400 ms of speech;
- the **noise level** follows the quietest non-speech sub-frames down at once and up by about 1 dB/s;
- the **target gain** lifts the speech level (plus a fixed 20 dB saturation margin, AGC2's initial
  one) to ``-headroomDb``, within ``[0, maxGainDb]``, and no higher than what keeps the noise at or
  below ``maxOutputNoiseLevelDbfs``; while not confident, no higher than keeps peaks under -1 dBFS;
- the **applied gain** moves towards it by at most ``maxGainChangeDbPerSecond`` (it only rises after
  that many adjacent speech sub-frames; then the first step may catch up for the time waited), and is
  ramped across each sub-frame so a change makes no click;
- the **limiter** (``enableLimiter``) scales a sub-frame whose peak would pass -1 dBFS down to it at
  once and lets go by 1 dB per sub-frame; without it, samples are clipped at full scale.

Pure: numpy only, state per stream (one per call leg).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from activecall.options import AgcOption

__all__ = ["GainController", "SUBFRAME_MS"]

SUBFRAME_MS = 10
_FULL_SCALE = 32768.0
_MIN_LEVEL_DBFS = -90.31
_SATURATION_MARGIN_DB = 20.0
_TIME_TO_CONFIDENCE_MS = 400
_LEAK = 1.0 - 1.0 / _TIME_TO_CONFIDENCE_MS
_LIMITER_DBFS = -1.0
_LIMITER_LEVEL = 10 ** (_LIMITER_DBFS / 20) * 32767.0
_LIMITER_RELEASE = 10 ** (1.0 / 20)  # per sub-frame
_NOISE_RISE = 10 ** (0.01 / 10)  # energy ratio per sub-frame: about 1 dB/s


def _db_to_ratio(db: float) -> float:
    return 10.0 ** (db / 20.0)


class _LevelState:
    """The speech level as a weighted average (numerator/denominator) and the time left to confidence."""

    __slots__ = ("numerator", "denominator", "to_confidence_ms")

    def __init__(self, level_dbfs: float) -> None:
        self.numerator = level_dbfs
        self.denominator = 1.0
        self.to_confidence_ms = _TIME_TO_CONFIDENCE_MS

    def copy(self) -> "_LevelState":
        other = _LevelState(0.0)
        other.numerator, other.denominator, other.to_confidence_ms = \
            self.numerator, self.denominator, self.to_confidence_ms
        return other


class GainController:
    """The adaptive digital gain of one audio stream; :meth:`process` takes whole 10 ms sub-frames."""

    def __init__(self, option: AgcOption, rate_hz: int = 16000) -> None:
        self._option = option
        self._subframe = rate_hz * SUBFRAME_MS // 1000
        self._max_change_db = option.max_gain_change_db_per_second * SUBFRAME_MS / 1000.0
        self._adjacent = max(1, option.adjacent_speech_frames_threshold)
        initial = min(option.initial_gain_db, option.max_gain_db)
        initial_level = min(30.0, max(-90.0, -_SATURATION_MARGIN_DB - initial - option.headroom_db))
        self._preliminary = _LevelState(initial_level)
        self._reliable = _LevelState(initial_level)
        self.speech_level_dbfs = initial_level
        self._speech_run = 0
        self._to_gain_increase = self._adjacent
        self._noise_energy: Optional[float] = None
        self.gain_db = initial
        self._gain = _db_to_ratio(initial)
        self._limiter = 1.0
        self._peak_after_gain_dbfs = _MIN_LEVEL_DBFS

    @property
    def noise_level_dbfs(self) -> float:
        """The estimated noise floor (dBFS RMS); -90.31 until a non-speech sub-frame was heard."""
        if self._noise_energy is None:
            return _MIN_LEVEL_DBFS
        return max(_MIN_LEVEL_DBFS, 10 * math.log10(self._noise_energy + 1e-12))

    @property
    def confident(self) -> bool:
        """The speech level rests on at least 400 ms of speech."""
        if self._adjacent == 1:
            return self._preliminary.to_confidence_ms == 0
        return self._reliable.to_confidence_ms == 0 or (
            self._speech_run >= self._adjacent and self._preliminary.to_confidence_ms == 0)

    def process(self, pcm: bytes, speech: bool) -> bytes:
        """``pcm`` with the gain applied; ``speech``: the VAD's verdict.  The gain adapts once per whole
        10 ms sub-frame; samples past the last whole one (a resampler's odd frame) get the gain as it is."""
        n = self._subframe
        samples = np.frombuffer(pcm, dtype="<i2", count=len(pcm) // 2)
        count = len(samples) // n
        tail = samples[count * n:].astype(np.float32) * np.float32(self._gain * self._limiter)
        if count == 0:
            return np.clip(tail, -32768.0, 32767.0).astype("<i2").tobytes()
        frames = samples[: count * n].astype(np.float32).reshape(count, n)
        energies = np.mean(np.square(frames / _FULL_SCALE, dtype=np.float64), axis=1)
        peaks = np.max(np.abs(frames), axis=1)
        out = np.empty_like(frames)
        for i in range(count):
            energy = float(energies[i])
            self._update_levels(energy, speech)
            previous = self._gain
            self._adapt(speech, float(peaks[i]))
            ramp = np.linspace(previous, self._gain, n, endpoint=False, dtype=np.float32) \
                if previous != self._gain else np.float32(self._gain)
            out[i] = frames[i] * ramp
        if self._option.enable_limiter:
            self._limit(out)
        return np.clip(np.concatenate((out.reshape(-1), tail)), -32768.0, 32767.0).astype("<i2").tobytes()

    # -- estimators ----------------------------------------------------------

    def _update_levels(self, energy: float, speech: bool) -> None:
        rms_dbfs = max(_MIN_LEVEL_DBFS, 10 * math.log10(energy + 1e-12))
        if not speech:
            if self._adjacent > 1:
                if self._speech_run >= self._adjacent:
                    self._reliable = self._preliminary.copy()
                elif self._speech_run > 0:
                    self._preliminary = self._reliable.copy()
            self._speech_run = 0
            noise = self._noise_energy
            self._noise_energy = energy if noise is None else min(energy, noise * _NOISE_RISE)
            return
        self._speech_run += 1
        state = self._preliminary
        full = state.to_confidence_ms == 0
        if not full:
            state.to_confidence_ms -= SUBFRAME_MS
        leak = _LEAK if full else 1.0
        state.numerator = state.numerator * leak + rms_dbfs
        state.denominator = state.denominator * leak + 1.0
        if self._speech_run >= self._adjacent:
            self.speech_level_dbfs = min(30.0, max(-90.0, state.numerator / state.denominator))

    # -- gain ------------------------------------------------------------------

    def _target_gain_db(self, peak: float) -> float:
        option = self._option
        level = self.speech_level_dbfs + _SATURATION_MARGIN_DB
        if level < -(option.headroom_db + option.max_gain_db):
            target = option.max_gain_db
        elif level < -option.headroom_db:
            target = -option.headroom_db - level
        else:
            target = 0.0
        allowed_by_noise = option.max_output_noise_level_dbfs - self.noise_level_dbfs
        target = min(target, max(allowed_by_noise, 0.0))
        if not self.confident and self._peak_after_gain_dbfs > _LIMITER_DBFS:
            peak_dbfs = 20 * math.log10(peak / _FULL_SCALE) if peak > 0 else _MIN_LEVEL_DBFS
            target = min(target, max(_LIMITER_DBFS - peak_dbfs, 0.0))
        return target

    def _adapt(self, speech: bool, peak: float) -> None:
        target = self._target_gain_db(peak)
        first_confident_frame = False
        if not speech:
            self._to_gain_increase = self._adjacent
        elif self._to_gain_increase > 0:
            self._to_gain_increase -= 1
            first_confident_frame = self._to_gain_increase == 0
        increase = self._max_change_db * (self._adjacent if first_confident_frame else 1)
        change = target - self.gain_db
        if self._to_gain_increase > 0:
            change = min(change, 0.0)
        change = max(-self._max_change_db, min(increase, change))
        if change:
            self.gain_db += change
            self._gain = _db_to_ratio(self.gain_db)
        after = peak * self._gain
        self._peak_after_gain_dbfs = 20 * math.log10(after / _FULL_SCALE) if after > 0 else _MIN_LEVEL_DBFS

    def _limit(self, out: np.ndarray) -> None:
        """Sub-frames whose peak would pass -1 dBFS are scaled down to it at once; the scale recovers
        by 1 dB per sub-frame, ramped."""
        peaks = np.max(np.abs(out), axis=1)
        n = out.shape[1]
        for i in range(out.shape[0]):
            peak = float(peaks[i])
            previous = self._limiter
            wanted = min(1.0, _LIMITER_LEVEL / peak) if peak > 0 else 1.0
            if wanted < previous:
                self._limiter = wanted
                out[i] *= np.float32(wanted)
            else:
                self._limiter = min(wanted, previous * _LIMITER_RELEASE)
                if previous != 1.0 or self._limiter != 1.0:
                    out[i] *= np.linspace(previous, self._limiter, n, endpoint=False, dtype=np.float32)
