"""Turns a stream's per-window voice probabilities into speech segments (pure).

One :class:`VadSegmenter` per stream is fed ``(window_end_ms, probability)``
for each analysis window (32 ms for Silero, 20 ms for WebRTC VAD) and returns
the events of protocol.md §3.2 (``speaking``/``silence``) as frozen
dataclasses, times in stream ms::

               p >= thr                 voice lasted speechPadding
    SILENT ------------------> PENDING ----------------------------> SPEAKING
      ^   <------------------     |         (SpeechStart(onset))      |   ^
      |        p < low            |                                   |   | p >= thr
      |                                                      p < low  v   |
      +------------------------------------------------------------ TRAILING
         unvoiced for silencePadding: SpeechEnd(onset, speech length)

``thr`` is ``voiceThreshold``; ``low = max(thr - 0.15, 0.01)`` is Silero's
hysteresis: once speaking, windows between ``low`` and ``thr`` still count as
voice.  A segment longer than ``max_segment_ms`` is ended
(``maxBufferDurationSecs``) and, if the voice goes on, a new one starts at
once.  While silent, ``SilenceTimeout(silence start, silence length)`` comes
every ``silence_timeout_ms`` of continued silence when that is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from activecall.options import VadOption

__all__ = ["VadParams", "VadSegmenter", "SpeechStart", "SpeechPause", "SpeechEnd", "SilenceTimeout", "VadEvent"]

HYSTERESIS = 0.15
_MIN_LOW_THRESHOLD = 0.01

# Bounds on the option values (anything outside is clamped): ms, probability.
_PADDING_MAX_MS = 60_000
_THRESHOLD_MIN = 0.01
_THRESHOLD_MAX = 0.99
_SILENCE_TIMEOUT_MIN_MS = 100
_SILENCE_TIMEOUT_MAX_MS = 24 * 3600 * 1000
_MAX_SEGMENT_MIN_MS = 1_000
_MAX_SEGMENT_MAX_MS = 600_000


@dataclass(frozen=True, slots=True)
class SpeechStart:
    """Voice has lasted ``speechPadding``: it began at ``start_ms`` (stream ms)."""

    start_ms: int


@dataclass(frozen=True, slots=True)
class SpeechPause:
    """While speaking, the voice stopped at ``at_ms``; it may resume within ``silencePadding``.

    A hint for speculative work (a recognizer can start decoding the utterance now)."""

    at_ms: int


@dataclass(frozen=True, slots=True)
class SpeechEnd:
    """A speech segment ended: it began at ``start_ms`` and lasted ``duration_ms`` (trailing silence excluded)."""

    start_ms: int
    duration_ms: int


@dataclass(frozen=True, slots=True)
class SilenceTimeout:
    """Silence since ``start_ms`` has lasted ``duration_ms`` (a multiple of ``silenceTimeout``)."""

    start_ms: int
    duration_ms: int


VadEvent = Union[SpeechStart, SpeechPause, SpeechEnd, SilenceTimeout]


def _clamp_int(value: object, low: int, high: int, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    if isinstance(value, float) and not math.isfinite(value):
        return default
    return int(min(max(value, low), high))


def _clamp_float(value: object, low: float, high: float, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    f = float(value)
    if not math.isfinite(f):
        return default
    return min(max(f, low), high)


@dataclass(frozen=True, slots=True)
class VadParams:
    """The VADOption numbers the segmenter uses (protocol.md §4.4), already bounded."""

    speech_padding_ms: int = 250
    silence_padding_ms: int = 100
    voice_threshold: float = 0.5
    silence_timeout_ms: int | None = None
    max_segment_ms: int = 50_000

    def __post_init__(self) -> None:
        # Bound every number, so that hand-built params are as safe as parsed ones.
        d = VadParams.__dataclass_fields__
        object.__setattr__(self, "speech_padding_ms", _clamp_int(
            self.speech_padding_ms, 0, _PADDING_MAX_MS, d["speech_padding_ms"].default))
        object.__setattr__(self, "silence_padding_ms", _clamp_int(
            self.silence_padding_ms, 0, _PADDING_MAX_MS, d["silence_padding_ms"].default))
        object.__setattr__(self, "voice_threshold", _clamp_float(
            self.voice_threshold, _THRESHOLD_MIN, _THRESHOLD_MAX, d["voice_threshold"].default))
        if self.silence_timeout_ms is not None:
            timeout = _clamp_int(self.silence_timeout_ms, 0, _SILENCE_TIMEOUT_MAX_MS, 0)
            # 0 (or garbage) means "no timeout"; tiny values would flood events.
            object.__setattr__(self, "silence_timeout_ms",
                               max(timeout, _SILENCE_TIMEOUT_MIN_MS) if timeout > 0 else None)
        object.__setattr__(self, "max_segment_ms", _clamp_int(
            self.max_segment_ms, _MAX_SEGMENT_MIN_MS, _MAX_SEGMENT_MAX_MS, d["max_segment_ms"].default))

    @property
    def low_threshold(self) -> float:
        """Below this a speaking stream's window counts as unvoiced (hysteresis)."""
        return max(self.voice_threshold - HYSTERESIS, _MIN_LOW_THRESHOLD)

    @classmethod
    def from_option(cls, option: "VadOption") -> "VadParams":
        """The params of a wire VADOption (missing fields took their defaults when it was parsed)."""
        secs = option.max_buffer_duration_secs
        max_segment_ms = _clamp_int(secs, 0, _MAX_SEGMENT_MAX_MS // 1000, 50) * 1000
        return cls(
            speech_padding_ms=option.speech_padding,
            silence_padding_ms=option.silence_padding,
            voice_threshold=option.voice_threshold,
            silence_timeout_ms=option.silence_timeout,
            max_segment_ms=max_segment_ms,
        )


_SILENT = 0
_PENDING = 1
_SPEAKING = 2
_TRAILING = 3

_NO_EVENTS: tuple[VadEvent, ...] = ()


class VadSegmenter:
    """One stream's speech/silence state machine (see the module docstring)."""

    __slots__ = ("params", "window_ms", "_state", "_onset_ms", "_voiced_end_ms", "_silence_start_ms",
                 "_next_timeout_ms", "_thr", "_low")

    def __init__(self, params: VadParams, window_ms: int) -> None:
        if not 1 <= window_ms <= 1000:
            raise ValueError(f"window_ms must be 1..1000, got {window_ms!r}")
        self.params = params
        self.window_ms = window_ms
        self._thr = params.voice_threshold
        self._low = params.low_threshold
        self._state = _SILENT
        self._onset_ms = 0
        self._voiced_end_ms = 0
        self._silence_start_ms = 0
        self._next_timeout_ms = self._timeout_after(0)

    @property
    def speaking(self) -> bool:
        """Whether a speech segment is open (``speaking`` was reported and not yet ended)."""
        return self._state >= _SPEAKING

    def _timeout_after(self, start_ms: int) -> int | None:
        timeout = self.params.silence_timeout_ms
        return None if timeout is None else start_ms + timeout

    def _silence_from(self, start_ms: int) -> None:
        self._state = _SILENT
        self._silence_start_ms = start_ms
        self._next_timeout_ms = self._timeout_after(start_ms)

    def feed(self, window_end_ms: int, probability: float) -> tuple[VadEvent, ...]:
        """One window ending at ``window_end_ms`` had voice probability ``probability``; the events it causes."""
        state = self._state
        p = probability if probability == probability else 0.0  # NaN counts as silence
        if state == _SILENT:
            if p >= self._thr:
                self._state = _PENDING
                self._onset_ms = max(window_end_ms - self.window_ms, 0)
                return self._check_start(window_end_ms)
            due = self._next_timeout_ms
            if due is not None and window_end_ms >= due:
                step = self.params.silence_timeout_ms or 1
                while due <= window_end_ms:
                    due += step
                self._next_timeout_ms = due
                start = self._silence_start_ms
                return (SilenceTimeout(start, window_end_ms - start),)
            return _NO_EVENTS
        if state == _PENDING:
            if p >= self._low:
                return self._check_start(window_end_ms)
            # Too short to be speech: the silence it interrupted goes on.
            self._state = _SILENT
            return _NO_EVENTS
        if state == _SPEAKING:
            if p >= self._low:
                self._voiced_end_ms = window_end_ms
                return self._check_forced(window_end_ms)
            self._state = _TRAILING
            return (SpeechPause(self._voiced_end_ms),) + self._check_end(window_end_ms)
        # _TRAILING
        if p >= self._thr:
            self._state = _SPEAKING
            self._voiced_end_ms = window_end_ms
            return self._check_forced(window_end_ms)
        return self._check_end(window_end_ms)

    def _check_start(self, window_end_ms: int) -> tuple[VadEvent, ...]:
        if window_end_ms - self._onset_ms < self.params.speech_padding_ms:
            return _NO_EVENTS
        self._state = _SPEAKING
        self._voiced_end_ms = window_end_ms
        return (SpeechStart(self._onset_ms),)

    def _check_end(self, window_end_ms: int) -> tuple[VadEvent, ...]:
        if window_end_ms - self._voiced_end_ms >= self.params.silence_padding_ms:
            onset, voiced_end = self._onset_ms, self._voiced_end_ms
            self._silence_from(voiced_end)
            return (SpeechEnd(onset, voiced_end - onset),)
        return self._check_forced(window_end_ms)

    def _check_forced(self, window_end_ms: int) -> tuple[VadEvent, ...]:
        if window_end_ms - self._onset_ms < self.params.max_segment_ms:
            return _NO_EVENTS
        onset, voiced_end = self._onset_ms, self._voiced_end_ms
        if self._state == _SPEAKING:
            # Voice goes on: a new segment starts right here.
            self._state = _PENDING
            self._onset_ms = window_end_ms
            self._silence_start_ms = window_end_ms
            self._next_timeout_ms = self._timeout_after(window_end_ms)
        else:
            self._silence_from(voiced_end)
        return (SpeechEnd(onset, voiced_end - onset),)
