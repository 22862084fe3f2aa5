"""Seams between the call layer and speech providers (pure: zope.interface only).

Speech synthesis
----------------
A caller builds a :class:`SynthesisRequest` per sentence (or per streaming
piece), asks an :class:`ISpeechSynthesizer` to synthesize it, and receives PCM
through a callback as the provider produces it::

    d = synth.synthesize(SynthesisRequest("Hello there."), on_audio)
    ...
    d.cancel()   # barge-in: no on_audio after this, d errbacks CancelledError

Providers that report word timings (``request.subtitle``) also call
``on_words(words)`` with :class:`WordTiming` s relative to the start of that
request's audio; the call layer turns them into ``interruption.position``.

Speech recognition
------------------
Two kinds of recognizer, told apart by ``IRecognizer.streaming``:

* **segment** recognizers (``whisper``, ``openai``) transcribe one stretch of
  speech at a time: :meth:`ISegmentRecognizer.transcribe` gets the PCM of a
  VAD segment (or its growing prefix, for partials) and fires with a
  :class:`SegmentTranscript`. :class:`activecall.speech.asr.segments.SegmentStream`
  turns one into an :class:`IRecognitionStream` driven by VAD hints;
* **streaming** recognizers (``deepgram``, ``aliyun``, ``tencent``) get all of
  the caller's audio as it arrives and do their own endpointing; they open an
  :class:`IRecognitionStream` themselves.

Either way the call layer writes 16 kHz frames to the stream and hears
results through an :class:`IRecognitionListener`, on the reactor thread::

    stream = recognizer.open(RecognitionRequest(language="en"), listener)
    stream.write(frame_16k)        # every 20 ms, never blocks
    stream.speech_started(1520)    # VAD hints (ms of audio written so far)
    stream.speech_ended(3340)
    stream.close()                 # Deferred: no listener call after it fires

Times (``start_ms``/``end_ms``) count milliseconds of audio written to the
stream since it was opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from zope.interface import Attribute, Interface

__all__ = [
    "SynthesisRequest",
    "WordTiming",
    "RecognitionRequest",
    "Transcript",
    "SegmentTranscript",
    "IRecognitionListener",
    "IRecognitionStream",
    "IRecognizer",
    "ISegmentRecognizer",
    "RecognitionError",
    "RecognizerBusyError",
    "ISpeechSynthesizer",
    "SynthesisError",
    "UnknownProviderError",
    "ProviderUnavailableError",
]


def _empty_extra() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class SynthesisRequest:
    """One piece of text to speak, with the per-request SynthesisOption fields.

    ``sample_rate_hz`` is the rate the caller wants; providers may deliver
    their native rate instead and say so in each ``on_audio`` call.
    ``volume`` is 0-10 with 5 the normal level (protocol.md §4.6); providers
    deliver audio at their normal level and leave volume to the caller, since
    the media cache key (config.md §13) does not include it.
    """

    text: str
    sample_rate_hz: int = 16000
    speaker: str | None = None
    speed: float = 1.0
    volume: int = 5
    model: str | None = None
    language: str | None = None
    endpoint: str | None = None
    api_key: str | None = None
    extra: Mapping[str, str] = field(default_factory=_empty_extra)
    session_id: str | None = None
    subtitle: bool = False
    app_id: str | None = None
    secret_id: str | None = None


@dataclass(frozen=True)
class WordTiming:
    """One word (or character, for CJK providers) of synthesized speech and when it is heard."""

    text: str
    begin_ms: int
    end_ms: int


class ISpeechSynthesizer(Interface):
    """A text-to-speech provider."""

    name = Attribute("Provider name as used in ``tts.provider`` (``str``), e.g. ``'piper'``.")

    def synthesize(request, on_audio, on_words=None):  # type: ignore[no-untyped-def]
        """Synthesize ``request.text`` and stream the audio as it is produced.

        :param request: the :class:`SynthesisRequest`.
        :param on_audio: ``Callable[[bytes, int], None]`` called **on the
            reactor thread** with ``(pcm_s16le_mono, sample_rate_hz)``,
            possibly many times; every call carries whole samples.  The first
            call comes before the whole text is synthesized when the engine
            allows it.
        :param on_words: ``Callable[[Sequence[WordTiming]], None] | None``: when given and
            ``request.subtitle`` is set, called on the reactor thread with word timings as the
            provider reports them (providers without timings never call it).
        :return: ``Deferred[None]`` that fires once all audio was handed to
            ``on_audio``; errbacks with :class:`SynthesisError` on provider
            failure.  Cancelling it stops synthesis promptly: ``on_audio`` is
            not called again and the Deferred errbacks with ``CancelledError``.
        """


class SynthesisError(Exception):
    """A provider failed to synthesize; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class UnknownProviderError(ValueError):
    """No provider is registered under the requested name."""


class ProviderUnavailableError(RuntimeError):
    """The provider exists but cannot run here (extra not installed, no API key...)."""


# -- recognition ---------------------------------------------------------------------


@dataclass(frozen=True)
class RecognitionRequest:
    """The TranscriptionOption fields a recognizer needs for one call's stream (16 kHz s16le mono in)."""

    language: str | None = None
    model: str | None = None
    endpoint: str | None = None
    api_key: str | None = None
    app_id: str | None = None
    secret_id: str | None = None
    extra: Mapping[str, str] = field(default_factory=_empty_extra)
    session_id: str | None = None
    sample_rate_hz: int = 16000


@dataclass(frozen=True)
class Transcript:
    """A recognition result: sentence ``index`` (0, 1, ... per stream), its text so far or final.

    ``start_ms``/``end_ms`` are stream times (ms of audio written since open), None when unknown.
    """

    index: int
    text: str
    final: bool
    start_ms: int | None = None
    end_ms: int | None = None
    confidence: float | None = None


@dataclass(frozen=True)
class SegmentTranscript:
    """What a segment recognizer heard in one stretch of audio; ``model_s`` is the decode time."""

    text: str
    confidence: float | None = None
    model_s: float = 0.0


class IRecognitionListener(Interface):
    """Hears a recognition stream's results; every method is called on the reactor thread."""

    def transcript(result):  # type: ignore[no-untyped-def]
        """A :class:`Transcript` (partials of an index come before its final; finals in index order)."""

    def dropped(error):  # type: ignore[no-untyped-def]
        """One utterance was lost but the stream goes on (a :class:`RecognitionError`: the queue was
        full, one request failed); the call layer reports it as an ``error`` event."""

    def failed(error):  # type: ignore[no-untyped-def]
        """The stream cannot go on (a :class:`RecognitionError`: refused, timed out, connection lost);
        no further call comes.  ``error.retryable`` says whether opening a new stream may help."""


class IRecognitionStream(Interface):
    """One call's audio going into a recognizer."""

    def write(pcm):  # type: ignore[no-untyped-def]
        """A frame of 16 kHz s16le mono caller audio (normally 20 ms); never blocks, never raises."""

    def speech_started(at_ms):  # type: ignore[no-untyped-def]
        """VAD hint: voice began at stream time ``at_ms`` (may lie a little in the past)."""

    def speech_paused(at_ms):  # type: ignore[no-untyped-def]
        """VAD hint: the voice stopped at ``at_ms`` and may resume (before speech_ended): a segment
        recognizer may start decoding the utterance now, to have the final sooner."""

    def speech_ended(at_ms):  # type: ignore[no-untyped-def]
        """VAD hint: the voice that began at the last speech_started ended at ``at_ms``."""

    def close():  # type: ignore[no-untyped-def]
        """Stop: finish what is cheap to finish, release the connection; a Deferred that fires when
        done (never fails).  No listener call happens after it fires."""


class IRecognizer(Interface):
    """A speech-to-text provider."""

    name = Attribute("Provider name as used in ``asr.provider`` (``str``), e.g. ``'whisper'``.")
    streaming = Attribute("True: does its own endpointing on continuous audio; False: segment based.")

    def open(request, listener):  # type: ignore[no-untyped-def]
        """Start a stream for one call: returns an :class:`IRecognitionStream` at once (a connection
        is made in the background; audio written meanwhile is buffered, bounded). Raises
        :class:`RecognitionError` when the request cannot work at all (e.g. no key)."""


class ISegmentRecognizer(IRecognizer):
    """A recognizer that transcribes one stretch of speech at a time."""

    def transcribe(pcm, request, partial):  # type: ignore[no-untyped-def]
        """Transcribe ``pcm`` (16 kHz s16le mono, one utterance or its prefix so far).

        :param partial: True for an interim decode of a growing segment: cheap to refuse.
        :return: ``Deferred[SegmentTranscript]``; fails with :class:`RecognizerBusyError` at once when
            the provider's queue is full (callers drop partials, report finals), with
            :class:`RecognitionError` on failure. Cancelling it drops the work if not started.
        """


class RecognitionError(Exception):
    """A recognizer failed; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class RecognizerBusyError(RecognitionError):
    """The recognizer's work queue is full; nothing was queued."""

    def __init__(self, message: str = "recognizer busy") -> None:
        super().__init__(message, retryable=True)
