"""In-band DTMF: digits played as dual tones, for a far end that did not negotiate telephone-event.

A :class:`DtmfTones` queue holds the digits to play on one leg; :meth:`DtmfTones.next_frame` gives the
20 ms frame that replaces the leg's audio while a digit (100 ms of tone, then 60 ms of silence, by
default) is playing, and None when nothing is.  Each tone is -10 dBFS per frequency, within the
ITU-T Q.23/Q.24 levels and twist a detector expects.  Pure: numpy only.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import numpy as np

from activecall.media.dtmf_detect import COL_HZ, KEYPAD, ROW_HZ

__all__ = ["DtmfTones", "MAX_QUEUED_DIGITS", "DIGITS"]

#: Digits waiting beyond this are dropped (a far end pressing faster than they can be played).
MAX_QUEUED_DIGITS = 32
DIGITS = frozenset("".join(KEYPAD))
_LEVEL = 10 ** (-10 / 20) * 32767 * np.sqrt(2)  # each tone -10 dBFS RMS (about -7 dBm0); the sum peaks at -1 dBFS


def _tone(digit: str, rate_hz: int, samples: int) -> bytes:
    row = next(i for i, keys in enumerate(KEYPAD) if digit in keys)
    col = KEYPAD[row].index(digit)
    t = np.arange(samples) / rate_hz
    wave = _LEVEL * (np.sin(2 * np.pi * ROW_HZ[row] * t) + np.sin(2 * np.pi * COL_HZ[col] * t))
    return wave.astype("<i2").tobytes()


class DtmfTones:
    """Digits to play in-band on one leg at ``rate_hz``, one 20 ms frame at a time."""

    def __init__(self, rate_hz: int, duration_ms: int = 100, gap_ms: int = 60) -> None:
        self._frame_bytes = rate_hz // 50 * 2
        self._rate_hz = rate_hz
        self._tone_samples = rate_hz * duration_ms // 1000
        self._gap_bytes = rate_hz * gap_ms // 1000 * 2
        self._digits: deque[str] = deque()
        self._playing = b""
        self.dropped = 0

    @property
    def busy(self) -> bool:
        """Whether a digit is playing or waiting."""
        return bool(self._playing) or bool(self._digits)

    def push(self, digits: str) -> None:
        """Queue ``digits`` (0-9, *, #, A-D); raises ValueError for anything else."""
        bad = [d for d in digits if d not in DIGITS]
        if bad:
            raise ValueError(f"not a DTMF digit: {bad[0]!r}")
        for digit in digits:
            if len(self._digits) >= MAX_QUEUED_DIGITS:
                self.dropped += 1
                continue
            self._digits.append(digit)

    def next_frame(self) -> Optional[bytes]:
        """The next 20 ms of tone or inter-digit silence, or None when no digit is playing."""
        if not self._playing:
            if not self._digits:
                return None
            tone = _tone(self._digits.popleft(), self._rate_hz, self._tone_samples)
            body = tone + bytes(self._gap_bytes)
            pad = -len(body) % self._frame_bytes
            self._playing = body + bytes(pad)
        frame, self._playing = self._playing[: self._frame_bytes], self._playing[self._frame_bytes:]
        return frame
