"""Built-in speech-to-text providers and their registration (called by ``tap.py``).

Segment recognizers (``whisper``, ``openai``) decode VAD segments through
:class:`activecall.speech.asr.segments.SegmentStream`; streaming ones
(``deepgram``, ``aliyun``, ``tencent``) keep a WebSocket per call.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python.threadpool import ThreadPool

from activecall.config import FetchConfig
from activecall.speech.interfaces import IRecognizer
from activecall.speech.registry import RecognizerRegistry, RecognizerSettings

__all__ = ["register_builtin_recognizers"]


def register_builtin_recognizers(
    registry: RecognizerRegistry,
    *,
    reactor: IReactorFromThreads,
    clock: IReactorTime,
    asr_threadpool: ThreadPool,
    http_client: HTTPClient,
    environ: Mapping[str, str],
    models_dir: str,
    fetch: FetchConfig = FetchConfig(),
    max_queue: int = 16,
) -> None:
    """Register ``whisper`` (alias ``sensevoice``), ``openai``, ``deepgram``, ``aliyun`` and ``tencent``.

    Providers are built lazily by :meth:`RecognizerRegistry.create`; a missing offline
    extra or key matters only when the provider is asked for.  ``asr_threadpool`` is
    the bounded worker pool offline decoding runs in (never the reactor, never the
    pool file I/O uses); ``max_queue`` bounds the utterances waiting for it.
    """

    def with_models_dir(settings: RecognizerSettings) -> RecognizerSettings:
        return settings if settings.models_dir else replace(settings, models_dir=models_dir)

    def whisper(settings: RecognizerSettings) -> IRecognizer:
        from activecall.speech.asr.whisper import WhisperRecognizer

        return WhisperRecognizer(with_models_dir(settings), reactor=reactor, threadpool=asr_threadpool,
                                 clock=clock, max_queue=max_queue)

    def openai(settings: RecognizerSettings) -> IRecognizer:
        from activecall.speech.asr.openai import OpenAIRecognizer

        return OpenAIRecognizer(settings, http_client=http_client, clock=clock, environ=environ, fetch=fetch)

    def deepgram(settings: RecognizerSettings) -> IRecognizer:
        from activecall.speech.asr.deepgram import DeepgramRecognizer

        return DeepgramRecognizer(settings, reactor=reactor, clock=clock, environ=environ, fetch=fetch)  # type: ignore[arg-type]

    def aliyun(settings: RecognizerSettings) -> IRecognizer:
        from activecall.speech.asr.aliyun import AliyunRecognizer

        return AliyunRecognizer(settings, reactor=reactor, clock=clock, environ=environ, fetch=fetch)  # type: ignore[arg-type]

    def tencent(settings: RecognizerSettings) -> IRecognizer:
        from activecall.speech.asr.tencent import TencentRecognizer

        return TencentRecognizer(settings, reactor=reactor, clock=clock, environ=environ, fetch=fetch)  # type: ignore[arg-type]

    registry.register("whisper", whisper, aliases=("sensevoice",))
    registry.register("openai", openai)
    registry.register("deepgram", deepgram)
    registry.register("aliyun", aliyun)
    registry.register("tencent", tencent)

