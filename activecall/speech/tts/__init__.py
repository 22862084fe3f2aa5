"""Built-in text-to-speech providers and their registration (called by ``tap.py``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python.threadpool import ThreadPool

from activecall.config import FetchConfig
from activecall.speech.interfaces import ISpeechSynthesizer
from activecall.speech.registry import SynthesisSettings, SynthesizerRegistry

__all__ = ["register_builtin_synthesizers"]


def register_builtin_synthesizers(
    registry: SynthesizerRegistry,
    *,
    reactor: IReactorFromThreads,
    clock: IReactorTime,
    threadpool: ThreadPool,
    http_client: HTTPClient,
    environ: Mapping[str, str],
    models_dir: str,
    fetch: FetchConfig = FetchConfig(),
) -> None:
    """Register ``piper`` (alias ``supertonic``), ``openai``, ``deepgram``, ``aliyun``, ``tencent`` and
    ``tencent_basic`` in ``registry``.

    Providers are built lazily by :meth:`SynthesizerRegistry.create`, so a missing
    offline extra or API key only matters when the provider is asked for
    (``ProviderUnavailableError``).  ``models_dir`` fills in settings that leave
    ``models_dir`` empty; ``fetch`` (``[fetch]``) bounds requests to client-chosen endpoints.
    """

    def with_models_dir(settings: SynthesisSettings) -> SynthesisSettings:
        return settings if settings.models_dir else replace(settings, models_dir=models_dir)

    def piper(settings: SynthesisSettings) -> ISpeechSynthesizer:
        from activecall.speech.tts.piper import PiperSynthesizer

        return PiperSynthesizer(with_models_dir(settings), reactor=reactor, threadpool=threadpool)

    def openai(settings: SynthesisSettings) -> ISpeechSynthesizer:
        from activecall.speech.tts.openai import OpenAISynthesizer

        return OpenAISynthesizer(settings, http_client=http_client, clock=clock, environ=environ, fetch=fetch)

    def deepgram(settings: SynthesisSettings) -> ISpeechSynthesizer:
        from activecall.speech.tts.deepgram import DeepgramSynthesizer

        return DeepgramSynthesizer(settings, http_client=http_client, clock=clock, environ=environ, fetch=fetch)

    def aliyun(settings: SynthesisSettings) -> ISpeechSynthesizer:
        from activecall.speech.tts.aliyun import AliyunSynthesizer

        return AliyunSynthesizer(settings, reactor=reactor, clock=clock, environ=environ, fetch=fetch)

    def tencent(settings: SynthesisSettings) -> ISpeechSynthesizer:
        from activecall.speech.tts.tencent import TencentSynthesizer

        return TencentSynthesizer(settings, reactor=reactor, clock=clock, environ=environ, fetch=fetch)

    def tencent_basic(settings: SynthesisSettings) -> ISpeechSynthesizer:
        from activecall.speech.tts.tencent import TencentBasicSynthesizer

        return TencentBasicSynthesizer(settings, http_client=http_client, clock=clock, environ=environ, fetch=fetch)

    registry.register("piper", piper, aliases=("supertonic",))
    registry.register("openai", openai)
    registry.register("deepgram", deepgram)
    registry.register("aliyun", aliyun)
    registry.register("tencent", tencent)
    registry.register("tencent_basic", tencent_basic)
