"""HTTP Digest authentication for SIP (RFC 3261 §22, RFC 2617, RFC 7616, RFC 8760).

Pure module: the client nonce is passed in (or drawn from an injected callable).

* :func:`parse_challenge` reads a ``WWW-Authenticate``/``Proxy-Authenticate`` value.
* :func:`build_authorization` computes the ``Authorization`` value for one request.
* :class:`DigestClient` answers 401/407 responses, counting ``nc`` per nonce and
  giving up when the server rejects the credentials it already sent.
* :func:`check_authorization` verifies credentials (server side; handy in tests).

Algorithms: MD5, MD5-sess, SHA-256, SHA-256-sess; qop ``auth`` (preferred) and
``auth-int``; the RFC 2069 form when the challenge offers no qop.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from activecall.sip.message import (
    SipParseError,
    SipRequest,
    SipResponse,
    parse_auth_header,
    quote,
)

__all__ = [
    "DigestChallenge",
    "DigestClient",
    "parse_challenge",
    "select_challenge",
    "build_authorization",
    "digest_response",
    "check_authorization",
    "SUPPORTED_ALGORITHMS",
]

_HASHES: dict[str, Callable[[bytes], str]] = {
    "MD5": lambda data: hashlib.md5(data).hexdigest(),  # noqa: S324 - mandated by RFC 2617
    "SHA-256": lambda data: hashlib.sha256(data).hexdigest(),
}
# Strongest first: when a server offers several challenges we answer this one (RFC 8760 §2.4).
SUPPORTED_ALGORITHMS = ("SHA-256", "SHA-256-SESS", "MD5", "MD5-SESS")


@dataclass(frozen=True)
class DigestChallenge:
    """A parsed Digest challenge."""

    realm: str
    nonce: str
    opaque: str | None = None
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()
    stale: bool = False
    domain: str | None = None


def parse_challenge(value: str) -> DigestChallenge:
    """Parse a ``Digest`` challenge header value."""
    header = parse_auth_header(value)
    if header.scheme.lower() != "digest":
        raise SipParseError(f"unsupported auth scheme {header.scheme!r}")
    realm = header.get("realm")
    nonce = header.get("nonce")
    if realm is None or nonce is None:
        raise SipParseError("Digest challenge without realm or nonce")
    qop = tuple(q.strip().lower() for q in (header.get("qop") or "").split(",") if q.strip())
    return DigestChallenge(
        realm=realm,
        nonce=nonce,
        opaque=header.get("opaque"),
        algorithm=(header.get("algorithm") or "MD5").upper(),
        qop=qop,
        stale=(header.get("stale") or "").lower() == "true",
        domain=header.get("domain"),
    )


def select_challenge(values: Iterable[str]) -> DigestChallenge | None:
    """The challenge to answer among several: the strongest supported algorithm wins."""
    best: DigestChallenge | None = None
    for value in values:
        try:
            challenge = parse_challenge(value)
        except SipParseError:
            continue
        if challenge.algorithm not in SUPPORTED_ALGORITHMS:
            continue
        if best is None or SUPPORTED_ALGORITHMS.index(challenge.algorithm) < SUPPORTED_ALGORITHMS.index(best.algorithm):
            best = challenge
    return best


def _hash_for(algorithm: str) -> Callable[[bytes], str]:
    base = algorithm.upper().removesuffix("-SESS")
    if algorithm.upper() not in SUPPORTED_ALGORITHMS:
        raise SipParseError(f"unsupported digest algorithm {algorithm!r}")
    return _HASHES[base]


def _choose_qop(offered: tuple[str, ...]) -> str | None:
    if "auth" in offered:
        return "auth"
    if "auth-int" in offered:
        return "auth-int"
    if offered:
        raise SipParseError(f"no supported qop in {offered!r}")
    return None


def digest_response(
    *, algorithm: str, username: str, realm: str, password: str, nonce: str, method: str,
    uri: str, qop: str | None, cnonce: str, nc: str, body: bytes = b"",
) -> str:
    """The ``response`` value (RFC 7616 §3.4.1)."""
    h = _hash_for(algorithm)
    ha1 = h(f"{username}:{realm}:{password}".encode())
    if algorithm.upper().endswith("-SESS"):
        ha1 = h(f"{ha1}:{nonce}:{cnonce}".encode())
    a2 = f"{method}:{uri}"
    if qop == "auth-int":
        a2 += ":" + h(body)
    ha2 = h(a2.encode())
    if qop is None:
        return h(f"{ha1}:{nonce}:{ha2}".encode())
    return h(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}".encode())


def build_authorization(
    challenge: DigestChallenge, method: str, uri: str, username: str, password: str,
    cnonce: str, nc: int = 1, body: bytes = b"",
) -> str:
    """The credentials value answering ``challenge`` for one request."""
    qop = _choose_qop(challenge.qop)
    nc_text = f"{nc:08x}"
    response = digest_response(
        algorithm=challenge.algorithm, username=username, realm=challenge.realm,
        password=password, nonce=challenge.nonce, method=method, uri=uri, qop=qop,
        cnonce=cnonce, nc=nc_text, body=body,
    )
    parts = [
        f"username={quote(username)}",
        f"realm={quote(challenge.realm)}",
        f"nonce={quote(challenge.nonce)}",
        f"uri={quote(uri)}",
        f"response={quote(response)}",
        f"algorithm={challenge.algorithm}",
    ]
    if qop is not None:
        parts += [f"cnonce={quote(cnonce)}", f"qop={qop}", f"nc={nc_text}"]
    elif challenge.algorithm.upper().endswith("-SESS"):
        parts.append(f"cnonce={quote(cnonce)}")  # the session key is built from it
    if challenge.opaque is not None:
        parts.append(f"opaque={quote(challenge.opaque)}")
    return "Digest " + ", ".join(parts)


def check_authorization(
    value: str, method: str, password: str, *, realm: str | None = None,
    nonce: str | None = None, body: bytes = b"",
) -> bool:
    """Whether credentials ``value`` are right for ``password`` (and the expected realm/nonce)."""
    try:
        header = parse_auth_header(value)
        if header.scheme.lower() != "digest":
            return False
        fields = {k.lower(): v for k, v in header.params}
        if realm is not None and fields.get("realm") != realm:
            return False
        if nonce is not None and fields.get("nonce") != nonce:
            return False
        qop = fields.get("qop")
        expected = digest_response(
            algorithm=fields.get("algorithm", "MD5"), username=fields["username"],
            realm=fields["realm"], password=password, nonce=fields["nonce"], method=method,
            uri=fields["uri"], qop=qop, cnonce=fields.get("cnonce", ""), nc=fields.get("nc", ""),
            body=body,
        )
    except (SipParseError, KeyError):
        return False
    return hmac.compare_digest(expected, fields.get("response", "").lower())


class DigestClient:
    """Answers 401/407 challenges for one account, counting ``nc`` per nonce.

    ``cnonce`` is called for a fresh client nonce (e.g. ``lambda: ids.token(16)``).
    """

    def __init__(self, username: str, password: str, cnonce: Callable[[], str]) -> None:
        self.username = username
        self._password = password
        self._cnonce = cnonce
        self._nc: dict[str, int] = {}

    def authorize(self, challenge: DigestChallenge, method: str, uri: str, body: bytes = b"") -> str:
        """Credentials for one request; ``nc`` goes up each time the nonce is reused."""
        nc = self._nc.get(challenge.nonce, 0) + 1
        self._nc[challenge.nonce] = nc
        return build_authorization(
            challenge, method, uri, self.username, self._password, self._cnonce(), nc, body
        )

    def respond(self, request: SipRequest, response: SipResponse) -> list[tuple[str, str]] | None:
        """Headers to add when resending ``request`` after ``response`` (401/407), or None to give up.

        We give up when no challenge is usable, or when ``request`` already
        carried credentials for the challenged realm and the server did not
        mark the nonce stale (the password is wrong).  Existing credentials of
        the same header name should be replaced by the returned ones.
        """
        if response.status == 401:
            challenge_name, answer_name = "WWW-Authenticate", "Authorization"
        elif response.status == 407:
            challenge_name, answer_name = "Proxy-Authenticate", "Proxy-Authorization"
        else:
            return None
        by_realm: dict[str, list[str]] = {}
        for value in response.headers.get_all(challenge_name):
            try:
                by_realm.setdefault(parse_challenge(value).realm, []).append(value)
            except SipParseError:
                continue
        tried = set()
        for value in request.headers.get_all(answer_name):
            try:
                header = parse_auth_header(value)
            except SipParseError:
                continue
            realm = header.get("realm")
            if realm is not None:
                tried.add(realm)
        out: list[tuple[str, str]] = []
        for realm, values in by_realm.items():
            challenge = select_challenge(values)
            if challenge is None:
                continue
            if realm in tried and not challenge.stale:
                return None
            try:
                out.append((answer_name, self.authorize(challenge, request.method, str(request.uri), request.body)))
            except SipParseError:
                continue
        return out or None
