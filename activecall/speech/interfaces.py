"""Seams between the call layer and speech providers (pure: zope.interface only).

Speech synthesis
----------------
A caller builds a :class:`SynthesisRequest` per sentence (or per streaming
piece), asks an :class:`ISpeechSynthesizer` to synthesize it, and receives PCM
through a callback as the provider produces it::

    d = synth.synthesize(SynthesisRequest("Hello there."), on_audio)
    ...
    d.cancel()   # barge-in: no on_audio after this, d errbacks CancelledError
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from zope.interface import Attribute, Interface

__all__ = [
    "SynthesisRequest",
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


class ISpeechSynthesizer(Interface):
    """A text-to-speech provider."""

    name = Attribute("Provider name as used in ``tts.provider`` (``str``), e.g. ``'piper'``.")

    def synthesize(request, on_audio):  # type: ignore[no-untyped-def]
        """Synthesize ``request.text`` and stream the audio as it is produced.

        :param request: the :class:`SynthesisRequest`.
        :param on_audio: ``Callable[[bytes, int], None]`` called **on the
            reactor thread** with ``(pcm_s16le_mono, sample_rate_hz)``,
            possibly many times; every call carries whole samples.  The first
            call comes before the whole text is synthesized when the engine
            allows it.
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
