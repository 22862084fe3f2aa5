"""SIP and other absolute URIs (RFC 3261 §19.1, §25.1): parse, serialize, compare.

Pure module: no I/O, no clock. Every bad input raises :class:`SipParseError`.

A :class:`SipUri` keeps each component *as written* (percent-escapes intact), so
``str(parse_uri(text)) == text`` for every valid ``sip:``/``sips:`` URI; the
``*_unescaped`` helpers and :func:`uri_equal` decode escapes where RFC 3261
§19.1.4 says to.  Non-SIP schemes (``tel:``, ``http:``, ``urn:`` ...) are kept
as an opaque absolute URI: ``scheme`` plus ``opaque``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from activecall.digits import bounded_int as _bounded_int

__all__ = [
    "SipParseError",
    "SipUri",
    "bounded_int",
    "is_ip_literal",
    "parse_uri",
    "transport_for_uri",
    "uri_equal",
    "unescape",
]


class SipParseError(ValueError):
    """Bad SIP/SDP input.

    ``status`` is the response a UAS should send (400 by default, 505 for an
    unknown SIP version, 501 for an unknown method whose CSeq disagrees);
    ``partial`` is whatever message could be built before the error (a
    ``SipRequest`` with its Via/From/To/Call-ID/CSeq lets the caller answer with
    :func:`activecall.sip.message.error_response`), or ``None``.
    """

    def __init__(self, message: str, *, status: int = 400, partial: object | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.partial = partial


_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_UNRESERVED = _ALNUM | frozenset("-_.!~*'()")
_USER_CHARS = _UNRESERVED | frozenset("&=+$,;?/")
_PASSWORD_CHARS = _UNRESERVED | frozenset("&=+$,")
_PARAM_CHARS = _UNRESERVED | frozenset("[]/:&+$")
_HEADER_CHARS = _UNRESERVED | frozenset("[]/?:+$")
_HOST_CHARS = _ALNUM | frozenset("-.")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*\Z")
_HEX = frozenset("0123456789abcdefABCDEF")
# Characters that can never appear unescaped in any URI we accept.
_OPAQUE_FORBIDDEN = frozenset(' \t\r\n<>"')

_DEFAULT_PORTS = {"sip": 5060, "sips": 5061}
#: The ``;transport=`` values we have listeners for (config.md §4).
_TRANSPORTS = ("udp", "tcp", "tls")


def bounded_int(text: str, what: str, high: int, *, low: int = 0,
                error: type[SipParseError] = SipParseError) -> int:
    """``text`` as an integer in ``low..high``, or raise ``error`` (:func:`activecall.digits.bounded_int`).

    The SIP parsers' spelling: the error defaults to :class:`SipParseError`.
    """
    return _bounded_int(text, what, high, low=low, error=error)


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 address or an IPv6 address (brackets optional), not a name."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_chars(text: str, allowed: frozenset[str], what: str) -> None:
    """Raise unless ``text`` is made of ``allowed`` characters and valid %HH escapes."""
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "%":
            if i + 2 >= n or text[i + 1] not in _HEX or text[i + 2] not in _HEX:
                raise SipParseError(f"bad escape in {what}: {text!r}")
            i += 3
            continue
        if ch not in allowed:
            raise SipParseError(f"invalid character {ch!r} in {what}: {text!r}")
        i += 1


def unescape(text: str) -> str:
    """Decode %HH escapes (as Latin-1 code points, so NUL and any octet survive)."""
    if "%" not in text:
        return text
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "%" and i + 2 < n and text[i + 1] in _HEX and text[i + 2] in _HEX:
            out.append(chr(int(text[i + 1 : i + 3], 16)))
            i += 3
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _check_host(host: str) -> None:
    """Validate a hostname, IPv4 address or bracketed IPv6 reference."""
    if not host:
        raise SipParseError("empty host in URI")
    if host.startswith("["):
        inner = host[1:-1]
        if not host.endswith("]") or not inner or any(c not in _HEX and c not in ":." for c in inner):
            raise SipParseError(f"bad IPv6 reference: {host!r}")
        if ":" not in inner:
            raise SipParseError(f"bad IPv6 reference: {host!r}")
        return
    if any(c not in _HOST_CHARS for c in host):
        raise SipParseError(f"invalid host: {host!r}")
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    for label in labels:
        if not label or label.startswith("-") or label.endswith("-"):
            raise SipParseError(f"invalid host: {host!r}")


def _parse_port(text: str) -> int:
    return bounded_int(text, "port", 65535)


def split_hostport(text: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` (IPv6 in brackets), validating both parts."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError(f"unterminated IPv6 reference: {text!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise SipParseError(f"junk after IPv6 reference: {text!r}")
        port = _parse_port(rest[1:]) if rest else None
    else:
        host, sep, port_text = text.partition(":")
        port = _parse_port(port_text) if sep else None
    _check_host(host)
    return host, port


@dataclass
class SipUri:
    """A parsed URI.

    For ``sip``/``sips`` the structured fields are filled (``user``/``password``
    escaped as written, ``params`` and ``headers`` ordered).  For any other
    scheme only ``scheme`` and ``opaque`` (the text after ``scheme:``) are.
    """

    scheme: str
    user: str | None = None
    password: str | None = None
    host: str = ""
    port: int | None = None
    params: list[tuple[str, str | None]] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    opaque: str | None = None

    @property
    def is_sip(self) -> bool:
        """True for ``sip:`` and ``sips:`` URIs."""
        return self.scheme.lower() in ("sip", "sips")

    @property
    def user_unescaped(self) -> str | None:
        """The user part with %HH escapes decoded."""
        return None if self.user is None else unescape(self.user)

    def param(self, name: str) -> str | None:
        """Value of URI parameter ``name`` (case-insensitive); ``""`` if valueless, None if absent."""
        lname = name.lower()
        for key, value in self.params:
            if key.lower() == lname:
                return "" if value is None else value
        return None

    def has_param(self, name: str) -> bool:
        """Whether URI parameter ``name`` is present (case-insensitive)."""
        return self.param(name) is not None

    def set_param(self, name: str, value: str | None) -> None:
        """Replace or append URI parameter ``name``."""
        lname = name.lower()
        for i, (key, _) in enumerate(self.params):
            if key.lower() == lname:
                self.params[i] = (key, value)
                return
        self.params.append((name, value))

    def remove_param(self, name: str) -> None:
        """Drop every URI parameter called ``name``."""
        lname = name.lower()
        self.params = [(k, v) for k, v in self.params if k.lower() != lname]

    @property
    def transport(self) -> str | None:
        """The ``transport`` parameter, lower-cased, if any."""
        value = self.param("transport")
        return value.lower() if value else None

    @property
    def lr(self) -> bool:
        """Whether this is a loose-routing URI (``;lr``)."""
        return self.has_param("lr")

    def host_port(self) -> tuple[str, int]:
        """Host (IPv6 brackets stripped) and port, defaulting per scheme."""
        host = self.host[1:-1] if self.host.startswith("[") else self.host
        return host, self.port if self.port is not None else _DEFAULT_PORTS.get(self.scheme.lower(), 5060)

    def copy(self) -> SipUri:
        """A deep copy."""
        return SipUri(
            self.scheme, self.user, self.password, self.host, self.port,
            list(self.params), list(self.headers), self.opaque,
        )

    def __str__(self) -> str:
        if not self.is_sip:
            return f"{self.scheme}:{self.opaque or ''}"
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out.append(":" + self.password)
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out.append(f":{self.port}")
        for key, value in self.params:
            out.append(f";{key}" if value is None else f";{key}={value}")
        if self.headers:
            out.append("?" + "&".join(f"{k}={v}" for k, v in self.headers))
        return "".join(out)


def parse_uri(text: str) -> SipUri:
    """Parse an absolute URI; ``sip``/``sips`` in full, anything else as opaque."""
    if not isinstance(text, str):
        raise SipParseError("URI must be text")
    scheme, sep, rest = text.partition(":")
    if not sep or not _SCHEME_RE.match(scheme):
        raise SipParseError(f"not an absolute URI: {text!r}")
    if scheme.lower() not in ("sip", "sips"):
        if not rest or any(c in _OPAQUE_FORBIDDEN or ord(c) < 0x20 for c in rest):
            raise SipParseError(f"bad {scheme} URI: {text!r}")
        return SipUri(scheme=scheme, opaque=rest)
    if not rest:
        raise SipParseError(f"empty SIP URI: {text!r}")
    # '@' never appears unescaped after the userinfo, so the last one ends it;
    # this is what lets ';' and '?' live inside the user part (RFC 4475 semiuri).
    at = rest.rfind("@")
    user: str | None = None
    password: str | None = None
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, colon, pw = userinfo.partition(":")
        if not user:
            raise SipParseError(f"empty user part: {text!r}")
        _check_chars(user, _USER_CHARS, "URI user")
        if colon:
            _check_chars(pw, _PASSWORD_CHARS, "URI password")
            password = pw
    rest, qmark, header_text = rest.partition("?")
    hostport, *param_texts = rest.split(";")
    host, port = split_hostport(hostport)
    params: list[tuple[str, str | None]] = []
    for item in param_texts:
        name, eq, value = item.partition("=")
        if not name:
            raise SipParseError(f"empty URI parameter: {text!r}")
        _check_chars(name, _PARAM_CHARS, "URI parameter")
        if eq:
            if not value:
                raise SipParseError(f"empty URI parameter value: {text!r}")
            _check_chars(value, _PARAM_CHARS, "URI parameter")
            params.append((name, value))
        else:
            params.append((name, None))
    headers: list[tuple[str, str]] = []
    if qmark:
        for item in header_text.split("&"):
            name, eq, value = item.partition("=")
            if not name or not eq:
                raise SipParseError(f"bad URI header: {text!r}")
            _check_chars(name, _HEADER_CHARS, "URI header")
            _check_chars(value, _HEADER_CHARS, "URI header")
            headers.append((name, value))
    return SipUri(scheme, user, password, host, port, params, headers)


# Parameters that make two URIs differ when present in only one (§19.1.4).
_STRICT_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def uri_equal(a: SipUri, b: SipUri) -> bool:
    """Compare two URIs per RFC 3261 §19.1.4."""
    if a.scheme.lower() != b.scheme.lower():
        return False
    if not a.is_sip:
        return (a.opaque or "").lower() == (b.opaque or "").lower()
    if (a.user is None) != (b.user is None) or (a.password is None) != (b.password is None):
        return False
    if a.user is not None and unescape(a.user) != unescape(b.user or ""):
        return False
    if a.password is not None and unescape(a.password) != unescape(b.password or ""):
        return False
    if a.host.lower() != b.host.lower() or a.port != b.port:
        return False
    pa = {k.lower(): (unescape(v).lower() if v is not None else None) for k, v in a.params}
    pb = {k.lower(): (unescape(v).lower() if v is not None else None) for k, v in b.params}
    for name in _STRICT_PARAMS:
        if (name in pa or name in pb) and pa.get(name, "\0") != pb.get(name, "\0"):
            return False
    for name in pa.keys() & pb.keys():
        if pa[name] != pb[name]:
            return False
    ha = {unescape(k).lower(): unescape(v) for k, v in a.headers}
    hb = {unescape(k).lower(): unescape(v) for k, v in b.headers}
    return ha == hb


def transport_for_uri(uri: SipUri | str) -> str:
    """The transport a request to ``uri`` goes over: ``"udp"``, ``"tcp"`` or ``"tls"``.

    RFC 3261 §26.2.2 and RFC 3263 §4.1 (without NAPTR/SRV): a ``sips:`` URI
    always needs TLS; otherwise the ``;transport=`` parameter (read from the
    parsed parameters, case-insensitively) names it, where ``tls`` is the
    legacy spelling of TLS over TCP.  No parameter, or one we have no
    listener for (``sctp``, ``ws``...), means UDP.  A string is parsed
    first; an unreadable one (or a non-SIP URI such as ``tel:``) gets the
    UDP default.
    """
    if isinstance(uri, str):
        try:
            uri = parse_uri(uri)
        except SipParseError:
            return "udp"
    if uri.scheme.lower() == "sips":
        return "tls"
    transport = uri.transport
    return transport if transport in _TRANSPORTS else "udp"
