"""Noise suppression of caller audio with RNNoise (``denoise: true``; off by default).

RNNoise (through the optional ``pyrnnoise`` package, Apache-2.0, which ships ``librnnoise``)
works on 10 ms frames of 480 samples at 48 kHz.  A :class:`Denoiser` takes the call's frames
at 8, 16 or 48 kHz, resamples them up with :class:`~activecall.media.resample.Resampler`, runs
whole RNNoise frames and resamples back, so every frame in gives one frame of the same length
out.  No frame is buffered here: the delay is RNNoise's own (20 ms measured with this build, at
48 kHz) plus the two resampling filters (2.5 ms in all at 16 kHz, 5 ms at 8 kHz).  One Denoiser
per stream: it carries state.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

import numpy as np

from activecall.media.resample import Resampler

__all__ = ["Denoiser", "DenoiseUnavailableError", "RNNOISE_RATE_HZ", "RNNOISE_FRAME_SAMPLES", "SUPPORTED_RATES_HZ"]

RNNOISE_RATE_HZ = 48000
RNNOISE_FRAME_SAMPLES = 480  # 10 ms at 48 kHz
SUPPORTED_RATES_HZ = (8000, 16000, 48000)


class DenoiseUnavailableError(RuntimeError):
    """``pyrnnoise`` (RNNoise) is not installed or its library cannot be loaded."""


def _rnnoise() -> Any:
    """The ``pyrnnoise.rnnoise`` ctypes binding, imported only when denoising is asked for."""
    try:
        from pyrnnoise import rnnoise
    except (ImportError, OSError) as e:
        raise DenoiseUnavailableError(f"denoise needs pyrnnoise (pip install pyrnnoise): {e}") from None
    if rnnoise.FRAME_SIZE != RNNOISE_FRAME_SAMPLES or rnnoise.SAMPLE_RATE != RNNOISE_RATE_HZ:
        raise DenoiseUnavailableError(f"unexpected RNNoise frame size {rnnoise.FRAME_SIZE}")
    return rnnoise


class Denoiser:
    """Streaming RNNoise for one stream of s16le mono frames at ``rate_hz``.

    ``process`` takes a frame whose length is a whole number of 10 ms (normally 20 ms) and
    returns the denoised frame of the same length.  ``speech_probability`` is RNNoise's voice
    probability for the last 10 ms processed.
    """

    __slots__ = ("rate_hz", "speech_probability", "_lib", "_state", "_up", "_down", "_block", "_block_ptr",
                 "_unit_bytes", "_finalizer", "__weakref__")

    def __init__(self, rate_hz: int) -> None:
        if rate_hz not in SUPPORTED_RATES_HZ:
            raise ValueError(f"denoise works at {SUPPORTED_RATES_HZ} Hz, not {rate_hz}")
        rnnoise = _rnnoise()
        self.rate_hz = rate_hz
        self.speech_probability = 0.0
        self._lib = rnnoise.lib
        self._state = rnnoise.create()
        if not self._state:
            raise DenoiseUnavailableError("rnnoise_create failed")
        self._finalizer = weakref.finalize(self, rnnoise.destroy, self._state)
        self._up = Resampler(rate_hz, RNNOISE_RATE_HZ)
        self._down = Resampler(RNNOISE_RATE_HZ, rate_hz)
        self._block = np.zeros(RNNOISE_FRAME_SAMPLES, dtype=np.float32)
        self._block_ptr = self._block.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        self._unit_bytes = rate_hz // 100 * 2  # 10 ms

    def process(self, frame: bytes) -> bytes:
        """Denoise one frame (a whole number of 10 ms at ``rate_hz``); same length out."""
        if self._state is None:
            raise ValueError("Denoiser is closed")
        if len(frame) % self._unit_bytes:
            raise ValueError(f"frame of {len(frame)} bytes is not a whole number of 10 ms at {self.rate_hz} Hz")
        if not frame:
            return b""
        up = np.frombuffer(self._up.process(frame), dtype="<i2")
        out = np.empty(len(up), dtype="<i2")
        block = self._block
        for i in range(0, len(up), RNNOISE_FRAME_SAMPLES):
            block[:] = up[i:i + RNNOISE_FRAME_SAMPLES]
            self.speech_probability = float(self._lib.rnnoise_process_frame(self._state, self._block_ptr,
                                                                            self._block_ptr))
            np.clip(block, -32768, 32767, out=block)
            out[i:i + RNNOISE_FRAME_SAMPLES] = block
        return self._down.process(out.tobytes())

    def close(self) -> None:
        """Free the RNNoise state (also done when the Denoiser is garbage collected)."""
        self._finalizer()
        self._state = None
