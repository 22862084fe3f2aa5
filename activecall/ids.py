"""Identifiers and randomness, injected so tests are deterministic.

Production uses :class:`SystemIds` (the ``secrets`` module); tests pass
``IdSource(random.Random(7))``.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Protocol

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
#: The longest session or track id a client may use (and that is ever echoed back): long enough for an
#: inbound call's dialogId ({Call-ID}-{tag}-{tag}), short enough for logs and file names.
MAX_ID_CHARS = 256


class RandomBits(Protocol):
    """Anything with ``getrandbits``, e.g. ``random.Random`` or ``secrets.SystemRandom``."""

    def getrandbits(self, k: int, /) -> int: ...


class IdSource:
    """Session ids, SSRCs, SIP tags/branches/Call-IDs from one random source."""

    def __init__(self, rng: RandomBits) -> None:
        self._rng = rng

    def bits(self, k: int) -> int:
        """Return a random non-negative integer of ``k`` bits."""
        return self._rng.getrandbits(k)

    def getrandbits(self, k: int) -> int:
        """The :class:`RandomBits` protocol, so an IdSource can seed RTP and SRTP state too."""
        return self._rng.getrandbits(k)

    def uuid4(self) -> str:
        """Return a random (version 4) UUID in canonical text form."""
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def session_id(self) -> str:
        """Return a new WebSocket session id, ``s.<uuid4>`` as Active Call makes them."""
        return "s." + self.uuid4()

    def ssrc(self) -> int:
        """Return a random 32-bit RTP SSRC (also used as a track's ``ssrc``)."""
        return self._rng.getrandbits(32)

    def token(self, length: int) -> str:
        """Return ``length`` random alphanumerics (SIP tags, branch suffixes)."""
        return "".join(_ALNUM[self._rng.getrandbits(16) % len(_ALNUM)] for _ in range(length))

    def tag(self) -> str:
        """Return a SIP From/To tag: 8 random alphanumerics."""
        return self.token(8)

    def branch(self) -> str:
        """Return an RFC 3261 Via branch with the magic cookie."""
        return "z9hG4bK" + self.token(16)

    def call_id(self) -> str:
        """Return a fresh SIP Call-ID."""
        return self.token(24)


class SystemIds(IdSource):
    """The production id source, backed by the OS CSPRNG."""

    def __init__(self) -> None:
        super().__init__(secrets.SystemRandom())
