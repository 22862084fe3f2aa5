"""Who may use the control plane, and what it may show (config.md §14a, docs/security.md "Control plane").

Pure: the HTTP adapter (``activecall.web``) hands in the header and query values
and turns a :class:`Denial` into its HTTP status.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


@dataclass(frozen=True)
class Denial:
    """Why a request is refused: ``code`` 401 (token) or 403 (origin)."""

    code: int
    message: str


def _host_port(netloc: str, default_port: int) -> Optional[tuple[str, int]]:
    try:
        parts = urlsplit("//" + netloc)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    return host.lower(), port if port is not None else default_port


class AccessPolicy:
    """Bearer tokens and the browser Origin allow-list of ``[api]``.

    - ``tokens`` empty: no token needed (Active Call's behaviour). Otherwise the
      request must carry one of them as ``Authorization: Bearer <t>`` or ``?token=<t>``.
    - A request without ``Origin`` is not from a browser and passes the origin check.
      A browser request passes when its Origin is the daemon's own (same host and
      port as the request's ``Host``), is listed in ``allowed_origins``, or ``"*"`` is listed.
    """

    def __init__(self, tokens: Sequence[str] = (), allowed_origins: Sequence[str] = ()) -> None:
        self._tokens = tuple(t.encode("utf-8") for t in tokens)
        self._origins = frozenset(o.lower().rstrip("/") for o in allowed_origins)

    @property
    def requires_token(self) -> bool:
        """Whether any token is configured."""
        return bool(self._tokens)

    def check(self, *, authorization: Optional[str], query_token: Optional[str],
              origin: Optional[str], host: Optional[str]) -> Optional[Denial]:
        """None when the request may proceed, else the :class:`Denial` to answer."""
        if self._tokens and not self._token_ok(authorization, query_token):
            return Denial(401, "missing or invalid token")
        if origin is not None and not self._origin_ok(origin, host):
            return Denial(403, f"origin not allowed: {origin[:100]}")
        return None

    def _token_ok(self, authorization: Optional[str], query_token: Optional[str]) -> bool:
        candidates = []
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                candidates.append(value.strip())
        if query_token:
            candidates.append(query_token)
        ok = False
        for candidate in candidates:
            given = candidate.encode("utf-8", "replace")
            for token in self._tokens:
                # Constant time per comparison, and every token is compared.
                ok |= hmac.compare_digest(given, token)
        return ok

    def _origin_ok(self, origin: str, host: Optional[str]) -> bool:
        normalized = origin.strip().lower().rstrip("/")
        if "*" in self._origins or normalized in self._origins:
            return True
        try:
            scheme = urlsplit(normalized).scheme
        except ValueError:
            return False
        if scheme not in _DEFAULT_PORTS or host is None:
            return False
        default_port = _DEFAULT_PORTS[scheme]
        own = _host_port(normalized.split("://", 1)[1], default_port)
        # A Host without a port means the default port of the scheme the browser used.
        return own is not None and own == _host_port(host.strip(), default_port)


# --- what /list may show --------------------------------------------------------------------

REDACTED = "[redacted]"
_SECRET_SUFFIXES = ("apikey", "secretkey", "secret", "password", "passwd", "token", "authorization",
                    "credential", "credentials", "privatekey")
_NOT_ALNUM = re.compile(r"[^a-z0-9]")
_HEADER_LINE = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*:")
_MAX_REDACT_DEPTH = 64


def is_secret_key(key: str) -> bool:
    """Whether a field or header name (``apiKey``, ``secret_key``, ``Proxy-Authorization``…) holds a secret."""
    normalized = _NOT_ALNUM.sub("", key.lower())
    return normalized.endswith(_SECRET_SUFFIXES) or "secret" in normalized or "password" in normalized


def redact_secrets(value: Any, _depth: int = 0) -> Any:
    """A copy of a JSON value with the values of secret-named keys replaced by ``[redacted]``.

    Applies at any depth (``extra``, ``sip.headers``, provider options), case-insensitively,
    and to ``"Name: value"`` header strings inside lists.
    """
    if _depth > _MAX_REDACT_DEPTH:
        return REDACTED
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact_secrets(v, _depth + 1))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_header_line(v) if isinstance(v, str) else redact_secrets(v, _depth + 1) for v in value]
    return value


def _redact_header_line(text: str) -> str:
    match = _HEADER_LINE.match(text)
    if match is not None and is_secret_key(match.group(1)):
        return f"{match.group(1)}: {REDACTED}"
    return text
