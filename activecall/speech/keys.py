"""Which API key goes to which endpoint: the one policy of the key-based speech providers. [pure]

The environment's key (``OPENAI_API_KEY``, ``DEEPGRAM_API_KEY``, ``DASHSCOPE_API_KEY``) was given for the
provider's own service, so it goes only to the provider's default endpoint(s).  An endpoint
elsewhere (the settings' or a client's) needs its own key, and must pass the ``[fetch]
allowed_hosts`` check: a client chooses it, and neither a key nor audio goes to a host nobody allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from activecall.speech.interfaces import ProviderUnavailableError

__all__ = ["KeyPolicy"]


def _ignore(reason: str) -> None:
    """The default ``on_refused``."""


@dataclass(frozen=True)
class KeyPolicy:
    """One provider's key policy.

    ``official``: the endpoints (as the provider spells them) the environment's key may go to;
    ``needs_key``: those that cannot work without a key (default: ``official``; a self-hosted
    server behind ``OPENAI_BASE_URL`` may need none); ``where`` names ``official`` in the texts.
    ``check`` raises ValueError (:class:`~activecall.fetch.FetchRefusedError`) for a URL the
    ``[fetch]`` rules refuse, ``schemes`` names the schemes it accepts, and ``on_refused`` gets its
    reason (for the daemon log: the error text stays generic).  Refusals are ``error_type``,
    not retryable.
    """

    provider: str
    official: frozenset[str]
    env_key: Optional[str]
    no_key: str
    where: str
    error_type: type[Exception]  # built as error_type(message, retryable=...)
    check: Callable[[str], object]
    schemes: str = "http/https"
    needs_key: Optional[frozenset[str]] = None
    on_refused: Callable[[str], None] = _ignore
    # False: an endpoint elsewhere may go without a key (a local model server); it still passes ``check``.
    own_key_required: bool = True

    @property
    def own_key_needed(self) -> str:
        """The text for an endpoint elsewhere without its own key."""
        return (f"{self.provider}: endpoint is not {self.where}; a request with its own endpoint "
                "must give its own apiKey")

    def _needs_key(self, url: str) -> bool:
        return url in (self.official if self.needs_key is None else self.needs_key)

    def check_settings(self, endpoint: str, api_key: Optional[str]) -> None:
        """Raise ProviderUnavailableError when the settings' ``endpoint`` could never be given a key."""
        if self._needs_key(endpoint) and not (api_key or self.env_key):
            raise ProviderUnavailableError(self.no_key)
        if endpoint not in self.official and not api_key and self.own_key_required:
            raise ProviderUnavailableError(self.own_key_needed)

    def key_for(self, url: str, own: Optional[str]) -> str:
        """The key to send to ``url`` given the request's (or settings') ``own`` key; ``""`` for a
        server that needs none.  Raise ``error_type`` when the request must not be sent."""
        if url in self.official:
            key = own or self.env_key or ""
            if not key and self._needs_key(url):
                raise self.error_type(self.no_key, retryable=False)
            return key
        try:
            self.check(url)
        except ValueError as e:
            self.on_refused(str(e))
            raise self.error_type(f"{self.provider}: endpoint not allowed ({self.schemes} and fetch.allowed_hosts only)",
                                  retryable=False) from None
        if not own and self.own_key_required:
            raise self.error_type(self.own_key_needed, retryable=False)
        return own or ""
