"""Provider name -> synthesizer factory (pure).

``tap.py`` fills a :class:`SynthesizerRegistry` with the built-ins (see
:func:`activecall.speech.tts.register_builtin_synthesizers`); the call
controller asks it for a provider by the name a ``tts`` option carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from twisted.logger import Logger

from activecall.speech.interfaces import ISpeechSynthesizer, UnknownProviderError

__all__ = ["SynthesisSettings", "SynthesizerFactory", "SynthesizerRegistry", "OFFLINE_TTS"]

#: The offline engine every default falls back to (providers.md "Defaults when provider is omitted").
OFFLINE_TTS = "piper"


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


SynthesizerFactory = Callable[[SynthesisSettings], ISpeechSynthesizer]


class SynthesizerRegistry:
    """Maps provider names (and compatibility aliases) to factories.

    Names are case-insensitive.  :meth:`create` builds one provider per
    ``(name, settings)`` and reuses it: providers keep no per-request state,
    and some (Piper) are expensive to set up.
    """

    _log = Logger()

    def __init__(self) -> None:
        self._factories: dict[str, SynthesizerFactory] = {}
        self._aliases: dict[str, str] = {}
        self._instances: dict[tuple[str, SynthesisSettings], ISpeechSynthesizer] = {}
        self._alias_logged: set[str] = set()

    def register(self, name: str, factory: SynthesizerFactory, aliases: Iterable[str] = ()) -> None:
        """Register ``factory`` under ``name`` and each alias; a name may be registered once."""
        key = name.lower()
        if key in self._factories or key in self._aliases:
            raise ValueError(f"TTS provider already registered: {name}")
        self._factories[key] = factory
        for alias in aliases:
            akey = alias.lower()
            if akey in self._factories or akey in self._aliases:
                raise ValueError(f"TTS provider already registered: {alias}")
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
            raise UnknownProviderError(f"TTS type not found: {name}")
        return key

    def default_provider(self, language: str | None) -> str | None:
        """The provider a ``tts`` without one speaks with: ``aliyun`` for Chinese, ``supertonic`` otherwise,
        the offline engine when that default is not available here; None when nothing is."""
        wanted = "aliyun" if (language or "").lower().startswith("zh") else "supertonic"
        for name in (wanted, OFFLINE_TTS):
            try:
                provider = self.resolve(name)
            except UnknownProviderError:
                continue
            if name != wanted and wanted not in self._alias_logged:
                self._alias_logged.add(wanted)
                self._log.info("default TTS provider {wanted} is not available here; using {provider}",
                               wanted=wanted, provider=provider)
            return provider
        return None

    def create(self, name: str, settings: SynthesisSettings) -> ISpeechSynthesizer:
        """Return the provider for ``name`` built with ``settings`` (cached).

        :raises UnknownProviderError: unknown name.
        :raises ProviderUnavailableError: the factory cannot build the provider here.
        """
        canonical = self.resolve(name)
        requested = name.lower()
        if requested != canonical and requested not in self._alias_logged:
            # spec/providers.md: one info line naming the substitution
            self._alias_logged.add(requested)
            self._log.info("TTS provider {alias} is served by {provider}", alias=requested, provider=canonical)
        cache_key = (canonical, settings)
        provider = self._instances.get(cache_key)
        if provider is None:
            provider = self._factories[canonical](settings)
            self._instances[cache_key] = provider
        return provider
