"""Turning a ``tts`` command's SynthesisOption into provider calls, with the media cache."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred

from activecall.call.playback import strip_emoji
from activecall.call.services import CallServices
from activecall.options import SynthesisOption
from activecall.media.resample import Resampler
from activecall.media.cache import validate_key
from activecall.speech.interfaces import ISpeechSynthesizer, SynthesisRequest
from activecall.speech.registry import SynthesisSettings


def create_synthesizer(services: CallServices, provider: str, option: SynthesisOption) -> ISpeechSynthesizer:
    """The provider instance for ``option`` (may raise ProviderUnavailableError)."""
    return services.synthesizers.create(provider, SynthesisSettings(
        model=option.model, endpoint=option.endpoint, api_key=option.secret_key, models_dir=services.models_dir))


def synthesis_request(text: str, option: SynthesisOption, speaker: Optional[str], session_id: Optional[str]) -> SynthesisRequest:
    """The provider request for one sentence; ``option`` has its defaults applied."""
    return SynthesisRequest(
        text=text,
        sample_rate_hz=option.samplerate,
        speaker=speaker,
        speed=option.speed,
        volume=option.volume,
        model=option.model,
        language=option.language,
        endpoint=option.endpoint,
        api_key=option.secret_key,
        extra=dict(option.extra or {}),
        session_id=option.session_id or session_id,
    )


def cache_key(services: CallServices, provider: str, text: str, option: SynthesisOption,
              speaker: Optional[str], explicit: Optional[str]) -> str:
    """The media-cache key of a sentence: the client's ``cacheKey`` (validated) or config.md §13's."""
    if explicit:
        return validate_key(explicit)
    return services.cache.tts_key(provider, text, option.samplerate, speaker, option.speed)


class PrecacheError(Exception):
    """``POST /precache`` could not synthesize; the message is returned to the client."""


async def precache(services: CallServices, command: Any) -> dict[str, Any]:
    """Synthesize a ``tts`` command without a call and store it where a live ``tts`` would look."""
    if command.option is None or not command.option.provider:
        raise PrecacheError("precache needs option.provider")
    option = command.option.with_defaults()
    try:
        provider = services.synthesizers.resolve(option.provider)
        text = strip_emoji(command.text).strip()
        speaker = command.speaker or option.speaker
        key = cache_key(services, provider, text, option, speaker, command.cache_key)
    except ValueError as e:
        raise PrecacheError(str(e))
    if not text:
        raise PrecacheError("precache needs a non-empty text")
    if await services.run_blocking(services.cache.exists, key):
        return {"status": "exists", "cacheKey": key, "bytes": 0}
    try:
        synthesizer = create_synthesizer(services, provider, option)
    except Exception as e:
        raise PrecacheError(f"TTS provider {provider} unavailable: {e}")
    pcm = bytearray()
    resampler: list[Resampler] = []

    def on_audio(chunk: bytes, rate: int) -> None:
        if not resampler:
            resampler.append(Resampler(rate, option.samplerate))
        pcm.extend(resampler[0].process(chunk))

    d: Deferred[None] = synthesizer.synthesize(synthesis_request(text, option, speaker, None), on_audio)
    try:
        await d
    except Exception as e:
        raise PrecacheError(f"TTS {provider} failed: {e}")
    if resampler:
        pcm.extend(resampler[0].flush())
    await services.run_blocking(services.cache.put, key, bytes(pcm))
    return {"status": "cached", "cacheKey": key, "bytes": len(pcm)}
