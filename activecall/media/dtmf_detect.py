"""In-band DTMF detection (Goertzel) for peers that do not send telephone-event.

Audio is cut into blocks of 102 samples at 8 kHz (12.75 ms; scaled with the
rate, 204 at 16 kHz), the length at which adjacent DTMF row frequencies
fall about one DFT bin apart.  For each block the power at the 8 DTMF
frequencies is the Goertzel value, computed for all complete blocks of a
``feed`` at once as one matrix product with precomputed cos/sin tables
(the same single-bin DFT the Goertzel recursion evaluates).  The tables
depend only on the sample rate: they are built once per rate and process,
read-only and shared by every detector (one per call).

A block is a *hit* for a key when the strongest row and column tones are
both loud enough, their twist is within limits, each stands out from the
other tones of its group, and together they carry most of the block's
energy (this rejects speech and noise).  Consecutive hits must also agree
in phase: the drift of each bin's phase from block to block gives the
tone's offset from the nominal frequency, which must be within 3 %.  A key
is reported once when it has been hit in ``min_on_blocks`` consecutive
blocks; it must then be
absent for ``min_off_blocks`` blocks before another press is reported.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["InbandDtmfDetector", "ROW_HZ", "COL_HZ", "KEYPAD", "block_samples", "goertzel_tables"]

ROW_HZ = (697.0, 770.0, 852.0, 941.0)
COL_HZ = (1209.0, 1336.0, 1477.0, 1633.0)
KEYPAD = ("123A", "456B", "789C", "*0#D")


def block_samples(sample_rate_hz: int) -> int:
    """Samples per analysis block at ``sample_rate_hz`` (102 at 8 kHz)."""
    return int(round(102 * sample_rate_hz / 8000))


@lru_cache(maxsize=8)
def goertzel_tables(sample_rate_hz: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frequencies, per-block phase advance, (N, 16) cos|sin basis) for ``sample_rate_hz``.

    Computed once per rate and process; the arrays are read-only because every
    detector at that rate shares them.
    """
    block = block_samples(sample_rate_hz)
    n = np.arange(block)
    freqs = np.array(ROW_HZ + COL_HZ)
    # Phase a tone exactly at each frequency advances by from one block to the next.
    advance = 2.0 * np.pi * freqs * block / sample_rate_hz
    phase = 2.0 * np.pi * np.outer(freqs, n) / sample_rate_hz
    # (N, 16): cos then sin columns; block @ basis gives real and imaginary parts.
    basis = np.concatenate((np.cos(phase), np.sin(phase))).T.copy()
    for table in (freqs, advance, basis):
        table.setflags(write=False)
    return freqs, advance, basis


class InbandDtmfDetector:
    """Detects DTMF digits in 16-bit signed native-endian mono PCM.

    States::

        idle --key hit for min_on_blocks consecutive blocks--> pressed [digit reported]
        pressed --key absent for min_off_blocks blocks--> idle
    """

    __slots__ = (
        "sample_rate_hz",
        "block",
        "min_on_blocks",
        "min_off_blocks",
        "_min_power",
        "_normal_twist",
        "_reverse_twist",
        "_relative_peak",
        "_energy_ratio",
        "_max_offset",
        "_advance",
        "_freqs",
        "_basis",
        "_pending",
        "_fill",
        "_prev_key",
        "_prev_row",
        "_prev_col",
        "_run_key",
        "_run",
        "_current",
        "_off",
    )

    def __init__(
        self,
        sample_rate_hz: int = 8000,
        *,
        min_on_blocks: int = 2,
        min_off_blocks: int = 2,
        min_level_dbfs: float = -36.0,
        normal_twist_db: float = 8.0,
        reverse_twist_db: float = 6.0,
        relative_peak_db: float = 8.0,
        energy_ratio: float = 0.75,
        max_frequency_offset: float = 0.03,
    ) -> None:
        self.sample_rate_hz = sample_rate_hz
        self.block = block_samples(sample_rate_hz)
        self.min_on_blocks = min_on_blocks
        self.min_off_blocks = min_off_blocks
        # Per-tone power (amplitude**2 / 2) of a sine at min_level_dbfs peak.
        amp = 32768.0 * 10.0 ** (min_level_dbfs / 20.0)
        self._min_power = amp * amp / 2.0
        self._normal_twist = 10.0 ** (normal_twist_db / 10.0)
        self._reverse_twist = 10.0 ** (reverse_twist_db / 10.0)
        self._relative_peak = 10.0 ** (relative_peak_db / 10.0)
        self._energy_ratio = energy_ratio
        self._max_offset = max_frequency_offset
        self._freqs, self._advance, self._basis = goertzel_tables(sample_rate_hz)
        self._pending = np.zeros(self.block, dtype=np.float64)
        self._fill = 0
        self._prev_key = ""
        self._prev_row = 0j
        self._prev_col = 0j
        self._run_key = ""
        self._run = 0
        self._current = ""
        self._off = 0

    def reset(self) -> None:
        """Forget buffered samples and press state."""
        self._fill = 0
        self._prev_key = ""
        self._run_key = ""
        self._run = 0
        self._current = ""
        self._off = 0

    def feed(self, pcm: bytes | bytearray | memoryview) -> list[str]:
        """Add PCM (any length; a trailing odd byte is ignored); return digits whose press was recognised."""
        samples = np.frombuffer(pcm, dtype=np.int16, count=len(pcm) // 2)
        n = self.block
        out: list[str] = []
        start = 0
        if self._fill:
            take = min(n - self._fill, len(samples))
            self._pending[self._fill : self._fill + take] = samples[:take]
            self._fill += take
            start = take
            if self._fill < n:
                return out
            self._fill = 0
            self._classify(self._pending.reshape(1, n), out)
        whole = (len(samples) - start) // n
        if whole:
            blocks = samples[start : start + whole * n].reshape(whole, n).astype(np.float64)
            self._classify(blocks, out)
        rest = samples[start + whole * n :]
        if len(rest):
            self._pending[: len(rest)] = rest
            self._fill = len(rest)
        return out

    def _classify(self, blocks: np.ndarray, out: list[str]) -> None:
        n = self.block
        proj = blocks @ self._basis
        # Power of a tone of amplitude a: (a * n / 2)**2 -> a**2 / 2 after scaling.
        power = (proj[:, :8] ** 2 + proj[:, 8:] ** 2) * (2.0 / (n * n))
        total = np.einsum("ij,ij->i", blocks, blocks) / n
        rows, cols = power[:, :4], power[:, 4:]
        ri = rows.argmax(axis=1)
        ci = cols.argmax(axis=1)
        idx = np.arange(len(blocks))
        rp = rows[idx, ri]
        cp = cols[idx, ci]
        # Second strongest of each group, for the relative-peak check.
        rows2 = np.sort(rows, axis=1)[:, -2]
        cols2 = np.sort(cols, axis=1)[:, -2]
        ok = (
            (rp >= self._min_power)
            & (cp >= self._min_power)
            & (rp <= cp * self._normal_twist)
            & (cp <= rp * self._reverse_twist)
            & (rp >= rows2 * self._relative_peak)
            & (cp >= cols2 * self._relative_peak)
            & (rp + cp >= total * self._energy_ratio)
        )
        # Complex bin values of the chosen row and column, for the frequency check.
        row_c = proj[idx, ri] + 1j * proj[idx, 8 + ri]
        col_c = proj[idx, 4 + ci] + 1j * proj[idx, 12 + ci]
        for i in range(len(blocks)):
            key = KEYPAD[ri[i]][ci[i]] if ok[i] else ""
            rc, cc = complex(row_c[i]), complex(col_c[i])
            on_freq = False
            if key and key == self._prev_key:
                # The phase drift between consecutive blocks measures how far
                # the tones are from the nominal frequencies (catches near misses
                # that one 102-sample block cannot resolve).
                on_freq = self._near(rc, self._prev_row, int(ri[i])) and self._near(cc, self._prev_col, 4 + int(ci[i]))
            self._prev_key, self._prev_row, self._prev_col = key, rc, cc
            self._step(key, on_freq, out)

    def _near(self, now: complex, before: complex, k: int) -> bool:
        # The bins are sums of x·e^{+jωn}, so a tone turns them clockwise.
        drift = -np.angle(now * before.conjugate()) - self._advance[k]
        drift = (drift + np.pi) % (2.0 * np.pi) - np.pi
        offset_hz = drift * self.sample_rate_hz / (2.0 * np.pi * self.block)
        return bool(abs(offset_hz) <= self._max_offset * self._freqs[k])

    def _step(self, key: str, on_freq: bool, out: list[str]) -> None:
        if key and key == self._run_key and on_freq:
            self._run += 1
        else:
            self._run_key = key
            self._run = 1 if key else 0
        if self._current:
            if key == self._current:
                self._off = 0
                return
            self._off += 1
            if self._off < self.min_off_blocks:
                return
            self._current = ""
        if key and self._run >= self.min_on_blocks:
            self._current = key
            self._off = 0
            out.append(key)
