"""Streaming sample-rate conversion for PCM s16le mono.

Implementation: a polyphase windowed-sinc FIR in numpy, with carried state.

Why this and not the alternatives (``benchmarks/codec_throughput.py``; on the
project machine, per 20 ms frame: this FIR 11-19 us for the telephony pairs
8/16/24/48 kHz, 40-60 us for the 44.1 kHz family; libswresample ~11-13 us;
``audioop.ratecv`` 2-11 us):

* ``audioop.ratecv`` is fast but only interpolates linearly; it does no
  low-pass, so a 6 kHz tone taken from 48 kHz to 8 kHz comes back as a loud
  2 kHz alias.  Unusable for anything that reaches a listener or an ASR.
* ``av.AudioResampler`` (libswresample) is good and fast, but its output
  per call is not a fixed size (it returns whatever the filter graph
  releases), its delay is not ours to choose, and it drags a filter graph
  into every stream.
* The FIR here is exact rational (``out/in`` reduced to ``L/M``), so the
  output count never drifts: after ``N`` input samples exactly
  ``ceil(N * L / M)`` output samples have come out, whatever the chunking,
  and every 20 ms frame in gives exactly one 20 ms frame out.  The filter is
  causal, i.e. the stream is delayed by half the filter (about 2.5 ms of the
  lower rate); :meth:`Resampler.flush` releases that tail.  Chunked input
  gives bit-identical output to one-shot input.

This module is the one resampling API outside the hot RTP path (whose batched
G.711 kernel is in :mod:`activecall.legs.rtp`): call audio, recordings, TTS
and decoded audio files all go through it.  Any rate pair in range works; a
pair with more than 4096 phases (odd rates such as 44056 Hz) computes the
filter rows each block needs instead of keeping the whole bank.

Filter: Kaiser-windowed sinc, beta 8 (about 80 dB stopband), cutoff at 0.94
of the lower Nyquist, 40 taps per output sample at the lower rate.  When
downsampling the kernel stretches with the ratio, which is what provides the
anti-aliasing.  Each phase is normalised to unity DC gain.  Arithmetic is
float64 so that the summation order (which differs between the vectorised
fast paths) cannot change how a sample rounds: chunking stays invisible.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ResampleError", "Resampler", "resample"]

# Filter design, see the module docstring.
_KAISER_BETA = 8.0
_CUTOFF = 0.94
_HALF_TAPS = 20
_MIN_RATE_HZ = 1000
_MAX_RATE_HZ = 384000
# Up to this many phases the per-residue strided path beats a gather.
_RESIDUE_MAX_UP = 16
# Outputs computed per vectorised step; keeps temporaries to a few MB.
_BLOCK_OUTPUTS = 4096
# Rate pairs with more phases than this (odd rates such as 44056 Hz, whose bank
# would take tens of MB) compute each block's kernel rows when they are needed.
_MAX_BANK_PHASES = 4096


class ResampleError(ValueError):
    """Bad sample rates or PCM input for the resampler."""


def _check_rate(name: str, rate: int) -> None:
    if not isinstance(rate, int) or isinstance(rate, bool) or not _MIN_RATE_HZ <= rate <= _MAX_RATE_HZ:
        raise ResampleError(f"{name} must be an int in {_MIN_RATE_HZ}..{_MAX_RATE_HZ} Hz, got {rate!r}")


def _half_taps(up: int, down: int) -> int:
    """Half the tap count: 20 taps each side at the lower rate, stretched when downsampling."""
    return math.ceil(_HALF_TAPS / min(1.0, up / down))


def _kernel_rows(up: int, down: int, phases: np.ndarray) -> np.ndarray:
    """The filter rows of the phases ``phases`` (indices in ``0..up-1``), each of unity DC gain."""
    ratio = min(1.0, up / down)
    half = _half_taps(up, down)
    taps = 2 * half
    # Cutoff in cycles per input sample.
    fc = 0.5 * ratio * _CUTOFF
    # tau = input time of the output minus input time of tap j.
    tau = phases.astype(np.float64)[:, None] / up + (half - 1) - np.arange(taps, dtype=np.float64)[None, :]
    kernel = 2.0 * fc * np.sinc(2.0 * fc * tau)
    x = np.clip(tau / half, -1.0, 1.0)
    kernel *= np.i0(_KAISER_BETA * np.sqrt(1.0 - x * x)) / np.i0(_KAISER_BETA)
    kernel /= kernel.sum(axis=1, keepdims=True)
    return np.ascontiguousarray(kernel, dtype=np.float64)


def _design_bank(up: int, down: int) -> tuple[np.ndarray | None, int]:
    """Return the (up, taps) polyphase filter bank (None past ``_MAX_BANK_PHASES``) and half its taps."""
    half = _half_taps(up, down)
    if up > _MAX_BANK_PHASES:
        return None, half
    return _kernel_rows(up, down, np.arange(up)), half


def _to_pcm16(y: np.ndarray) -> bytes:
    np.rint(y, out=y)
    np.clip(y, -32768.0, 32767.0, out=y)
    return y.astype("<i2").tobytes()


class Resampler:
    """Stateful converter of PCM s16le mono from ``in_rate_hz`` to ``out_rate_hz``.

    ``process`` may be called with chunks of any (whole-sample) size; the
    concatenated output is identical to what one call with all the input
    would give.  ``flush`` returns the delayed tail and resets the state,
    so the object can start a new stream.  Equal rates are a pass-through.
    """

    __slots__ = (
        "_buf",
        "_buf_start",
        "_down",
        "_bank",
        "_half",
        "_k",
        "_n_in",
        "_taps",
        "_up",
        "in_rate_hz",
        "out_rate_hz",
    )

    def __init__(self, in_rate_hz: int, out_rate_hz: int) -> None:
        _check_rate("in_rate_hz", in_rate_hz)
        _check_rate("out_rate_hz", out_rate_hz)
        self.in_rate_hz = in_rate_hz
        self.out_rate_hz = out_rate_hz
        g = math.gcd(in_rate_hz, out_rate_hz)
        self._up = out_rate_hz // g
        self._down = in_rate_hz // g
        self._bank: np.ndarray | None
        if self._up == self._down:
            self._bank = np.ones((1, 1), dtype=np.float64)
            self._half = 0
        else:
            self._bank, self._half = _design_bank(self._up, self._down)
        self._taps = 2 * self._half
        self._buf = np.zeros(4096, dtype=np.float64)
        self._reset()

    @property
    def delay_out_samples(self) -> float:
        """Group delay of the stream, in output samples."""
        return self._half * self._up / self._down

    def _reset(self) -> None:
        # Output k is centred on input time k*M/L - half; the history starts
        # primed with zeros so the first call already yields full output.
        prime = max(self._taps - 1, 0)
        self._buf[:prime] = 0.0
        self._buf_start = -prime
        self._n_in = 0
        self._k = 0

    def _ensure_capacity(self, size: int) -> None:
        if size > self._buf.shape[0]:
            grown = np.zeros(max(size, 2 * self._buf.shape[0]), dtype=np.float64)
            used = self._n_in - self._buf_start
            grown[:used] = self._buf[:used]
            self._buf = grown

    def _filter(self, buf: np.ndarray, buf_start: int, k0: int, k1: int, lead: int) -> np.ndarray:
        """Outputs k0..k1-1, output k centred on upsampled position k*M - lead.

        ``buf`` must be a contiguous float64 array.  Which of the two code
        paths runs depends only on the rate pair, never on the chunking.
        """
        count = k1 - k0
        if count > _BLOCK_OUTPUTS:
            # Bound the temporaries (gathered windows) on very long inputs.
            return np.concatenate([
                self._filter(buf, buf_start, k, min(k + _BLOCK_OUTPUTS, k1), lead)
                for k in range(k0, k1, _BLOCK_OUTPUTS)
            ])
        up, down, taps, half = self._up, self._down, self._taps, self._half
        item = buf.itemsize
        bank = self._bank
        if up <= _RESIDUE_MAX_UP:
            assert bank is not None
            # Outputs k0+j, k0+j+L, ... share one phase and their windows
            # start M input samples apart: one strided mat-vec per residue.
            y = np.empty(count, dtype=np.float64)
            for j in range(min(up, count)):
                u = (k0 + j) * down - lead
                first = u // up - half + 1 - buf_start
                rows = (count - j + up - 1) // up
                windows = np.ndarray(
                    (rows, taps), np.float64, buf, first * item, (down * item, item)
                )
                y[j::up] = np.dot(windows, bank[u % up])
            return y
        # Long periods (44.1 kHz family): gather every output's window.
        windows = np.ndarray((buf.shape[0] - taps + 1, taps), np.float64, buf, 0, (item, item))
        u = np.arange(k0, k1, dtype=np.int64) * down - lead
        firsts = u // up - half + 1 - buf_start
        rows = bank[u % up] if bank is not None else _kernel_rows(up, down, u % up)
        return np.einsum("kt,kt->k", windows[firsts], rows)

    def process(self, pcm: bytes) -> bytes:
        """Feed PCM; return all output that is complete so far."""
        if len(pcm) % 2:
            raise ResampleError(f"PCM s16le input must have an even byte count, got {len(pcm)}")
        if self._up == self._down:
            return bytes(pcm)
        x = np.frombuffer(pcm, dtype="<i2")
        used = self._n_in - self._buf_start
        self._ensure_capacity(used + x.shape[0])
        buf = self._buf
        buf[used : used + x.shape[0]] = x
        used += x.shape[0]
        self._n_in += x.shape[0]
        up, down = self._up, self._down
        k0 = self._k
        # Output k needs inputs up to floor(k*M/L), so all k with k*M < n_in*L.
        k1 = -((-self._n_in * up) // down)
        y = self._filter(buf[:used], self._buf_start, k0, k1, self._half * up) if k1 > k0 else None
        # Drop history older than the next output's window.
        keep = (k1 * down) // up - self._taps + 1 - self._buf_start
        if keep > 0:
            buf[: used - keep] = buf[keep:used]
            self._buf_start += keep
        # Rebase absolute indices so they stay small on endless streams.
        periods = k1 // up
        self._k = k1 - periods * up
        shift = periods * down
        self._n_in -= shift
        self._buf_start -= shift
        if y is None:
            return b""
        return _to_pcm16(y)

    def flush(self) -> bytes:
        """Return the tail still inside the filter and reset for a new stream."""
        if self._up == self._down:
            return b""
        tail = self.process(bytes(2 * self._half))
        self._reset()
        return tail


def resample(pcm: bytes, in_rate_hz: int, out_rate_hz: int) -> bytes:
    """Convert a whole buffer at once, without the streaming delay.

    Returns ``ceil(len * out / in)`` samples, aligned with the input (output
    sample k is centred on input time ``k * in / out``).
    """
    r = Resampler(in_rate_hz, out_rate_hz)
    if len(pcm) % 2:
        raise ResampleError(f"PCM s16le input must have an even byte count, got {len(pcm)}")
    if in_rate_hz == out_rate_hz:
        return bytes(pcm)
    x = np.frombuffer(pcm, dtype="<i2")
    n = x.shape[0]
    if n == 0:
        return b""
    pad = r._taps
    buf = np.zeros(n + 2 * pad, dtype=np.float64)
    buf[pad : pad + n] = x
    k1 = -((-n * r._up) // r._down)
    y = r._filter(buf, -pad, 0, k1, 0)
    return _to_pcm16(y)
