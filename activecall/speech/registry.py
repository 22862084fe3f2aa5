"""Provider name -> factory, for synthesizers and recognizers (pure).

``tap.py`` fills a :class:`SynthesizerRegistry` and a :class:`RecognizerRegistry`
with the built-ins (:func:`activecall.speech.tts.register_builtin_synthesizers`,
:func:`activecall.speech.asr.register_builtin_recognizers`); the call layer asks
them for a provider by the name a ``tts`` or ``asr`` option carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Iterable, TypeVar

from twisted.logger import Logger

from activecall.speech.interfaces import IRecognizer, ISpeechSynthesizer, UnknownProviderError

__all__ = ["SynthesisSettings", "RecognizerSettings", "SynthesizerFactory", "SynthesizerRegistry",
           "RecognizerFactory", "RecognizerRegistry", "OFFLINE_TTS", "OFFLINE_ASR"]

#: The offline engines every default falls back to (providers.md "Defaults when provider is omitted").
OFFLINE_TTS = "piper"
OFFLINE_ASR = "whisper"

P = TypeVar("P")

#: Provider instances kept per registry (one per distinct name and settings).
MAX_INSTANCES = 16


@dataclass(frozen=True)
class SynthesisSettings:
    """Process- or option-level settings a provider instance is built from.

    ``model`` is a Piper voice path or an OpenAI model name; relative paths
    resolve under ``models_dir`` (the ``--models-dir`` option).
    """

    model: str | None = None
    endpoint: str | None = None
    api_key: str | None = None
    models_dir: str = "models"


#: Recognizers are built from the same settings (``asr.model``, ``endpoint``, key, models dir).
RecognizerSettings = SynthesisSettings

SynthesizerFactory = Callable[[SynthesisSettings], ISpeechSynthesizer]
RecognizerFactory = Callable[[RecognizerSettings], IRecognizer]


class _ProviderRegistry(Generic[P]):
    """Maps provider names (and compatibility aliases) to factories.

    Names are case-insensitive.  :meth:`create` builds one provider per
    ``(name, settings)`` and reuses it: providers keep no per-request state,
    and some (Piper, Whisper) are expensive to set up.
    """

    _log = Logger()
    kind = "provider"

    def __init__(self) -> None:
        self._factories: dict[str, Callable[[SynthesisSettings], P]] = {}
        self._aliases: dict[str, str] = {}
        self._instances: dict[tuple[str, SynthesisSettings], P] = {}
        self._alias_logged: set[str] = set()

    def _not_found(self, name: str) -> str:
        return f"{self.kind} provider not found: {name}"

    def register(self, name: str, factory: Callable[[SynthesisSettings], P], aliases: Iterable[str] = ()) -> None:
        """Register ``factory`` under ``name`` and each alias; a name may be registered once."""
        key = name.lower()
        if key in self._factories or key in self._aliases:
            raise ValueError(f"{self.kind} provider already registered: {name}")
        self._factories[key] = factory
        for alias in aliases:
            akey = alias.lower()
            if akey in self._factories or akey in self._aliases:
                raise ValueError(f"{self.kind} provider already registered: {alias}")
            self._aliases[akey] = key

    def names(self) -> list[str]:
        """Return the registered provider names (aliases excluded), sorted."""
        return sorted(self._factories)

    def resolve(self, name: str) -> str:
        """Return the canonical provider name for ``name`` (aliases applied).

        :raises UnknownProviderError: nothing is registered under ``name``.
        """
        key = name.lower()
        key = self._aliases.get(key, key)
        if key not in self._factories:
            raise UnknownProviderError(self._not_found(name))
        return key

    def create(self, name: str, settings: SynthesisSettings) -> P:
        """Return the provider for ``name`` built with ``settings`` (cached).

        :raises UnknownProviderError: unknown name.
        :raises ProviderUnavailableError: the factory cannot build the provider here.
        """
        canonical = self.resolve(name)
        requested = name.lower()
        if requested != canonical and requested not in self._alias_logged:
            # spec/providers.md: one info line naming the substitution
            self._alias_logged.add(requested)
            self._log.info("{kind} provider {alias} is served by {provider}", kind=self.kind, alias=requested,
                           provider=canonical)
        cache_key = (canonical, settings)
        provider = self._instances.pop(cache_key, None)
        if provider is None:
            provider = self._factories[canonical](settings)
            # Settings come from call options (endpoint, key, model): a client varying them must not
            # grow the cache without bound. The least recently used instance goes; calls using it keep it.
            while len(self._instances) >= MAX_INSTANCES:
                self._instances.pop(next(iter(self._instances)))
        self._instances[cache_key] = provider
        return provider

    def _default(self, wanted: str, offline: str) -> str | None:
        """``wanted`` if registered, else the offline engine (one info line), else None."""
        for name in (wanted, offline):
            try:
                provider = self.resolve(name)
            except UnknownProviderError:
                continue
            if name != wanted and wanted not in self._alias_logged:
                self._alias_logged.add(wanted)
                self._log.info("default {kind} provider {wanted} is not available here; using {provider}",
                               kind=self.kind, wanted=wanted, provider=provider)
            return provider
        return None


class SynthesizerRegistry(_ProviderRegistry[ISpeechSynthesizer]):
    """Text-to-speech providers (``tts.provider``)."""

    kind = "TTS"

    def _not_found(self, name: str) -> str:
        return f"TTS type not found: {name}"  # protocol.md §4.6 wording

    def default_provider(self, language: str | None) -> str | None:
        """The provider a ``tts`` without one speaks with: ``aliyun`` for Chinese, ``supertonic`` otherwise,
        the offline engine when that default is not available here; None when nothing is."""
        wanted = "aliyun" if (language or "").lower().startswith("zh") else "supertonic"
        return self._default(wanted, OFFLINE_TTS)


class RecognizerRegistry(_ProviderRegistry[IRecognizer]):
    """Speech-to-text providers (``asr.provider``)."""

    kind = "ASR"

    def default_provider(self, language: str | None) -> str | None:
        """The provider an ``asr`` without one hears with: ``aliyun`` for Chinese, else the offline engine."""
        wanted = "aliyun" if (language or "").lower().startswith("zh") else OFFLINE_ASR
        return self._default(wanted, OFFLINE_ASR)
