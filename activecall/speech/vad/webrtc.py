"""WebRTC VAD (``webrtcvad-wheels``) for one stream: the cheap per-call alternative to Silero.

It decides voiced/unvoiced per 20 ms frame, reported as probability 1.0/0.0
so that the same :class:`~activecall.speech.vad.segmenter.VadSegmenter`
(threshold 0.5) turns it into segments.  ``voiceThreshold`` picks the
aggressiveness (spec/providers.md): ``mode = min(3, int(voiceThreshold * 4))``,
so 0-0.24 -> 0 (most permissive), the default 0.5 -> 2, 0.75 and above -> 3.
It is known to fire on noise; it costs a few microseconds per frame, so it
runs on the reactor thread.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from activecall.speech.vad.silero import VadUnavailableError

__all__ = ["WebrtcVad", "FRAME_MS", "aggressiveness"]

FRAME_MS = 20
_RATES = (8000, 16000)


def aggressiveness(voice_threshold: float) -> int:
    """The WebRTC VAD mode 0-3 for a ``voiceThreshold`` 0-1."""
    return min(3, max(0, int(voice_threshold * 4)))


class WebrtcVad:
    """Voiced (1.0) or not (0.0) per 20 ms frame of s16le mono at 8 or 16 kHz."""

    __slots__ = ("rate_hz", "frame_bytes", "mode", "_vad")

    def __init__(self, rate_hz: int, voice_threshold: float) -> None:
        if rate_hz not in _RATES:
            raise ValueError(f"WebRTC VAD runs here at 8000 or 16000 Hz, got {rate_hz!r}")
        if importlib.util.find_spec("webrtcvad") is None:
            raise VadUnavailableError("WebRTC VAD not installed: pip install webrtcvad-wheels")
        import webrtcvad

        self.rate_hz = rate_hz
        self.frame_bytes = 2 * rate_hz * FRAME_MS // 1000
        self.mode = aggressiveness(voice_threshold)
        self._vad: Any = webrtcvad.Vad(self.mode)

    def probability(self, frame: bytes) -> float:
        """1.0 when the 20 ms ``frame`` (exactly ``frame_bytes``) holds voice, else 0.0."""
        if len(frame) != self.frame_bytes:
            raise ValueError(f"WebRTC VAD frames are {self.frame_bytes} bytes, got {len(frame)}")
        return 1.0 if self._vad.is_speech(frame, self.rate_hz) else 0.0
