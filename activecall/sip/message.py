"""SIP messages (RFC 3261 §7, §20, §25): parse and serialize requests and responses.

Pure module: bytes in, objects out; no I/O, no clock.

* :class:`Headers` keeps every header line as received (name spelling, order,
  value), so serializing a parsed message loses nothing but line folding
  (which RFC 3261 §7.3.1 makes equivalent to a single SP).  Lookups are
  case-insensitive and understand compact forms: ``get("Via")`` finds ``v:``.
* Typed views (:class:`Via`, :class:`NameAddr`, :class:`CSeq`, ...) are parsed
  from the stored text on first use and kept on the :class:`Headers`, which
  forget them on every edit, so a view is never stale; mutable views come
  back as copies.
* :func:`parse_message` validates what a UA needs (start line, Via, From, To,
  Call-ID, CSeq, Max-Forwards, Contact, Route, Content-Length) and raises
  :class:`SipParseError` carrying the response status to send and the partial
  message, so :func:`error_response` can answer 400/505 when possible.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from activecall.sip.uri import SipParseError, SipUri, bounded_int, parse_uri, split_hostport

__all__ = [
    "SipParseError",
    "Headers",
    "Via",
    "NameAddr",
    "CSeq",
    "AuthHeader",
    "SipRequest",
    "SipResponse",
    "SipMessage",
    "canonical_name",
    "split_commas",
    "parse_params",
    "parse_via",
    "parse_name_addr",
    "parse_name_addr_list",
    "parse_contacts",
    "parse_cseq",
    "parse_auth_header",
    "parse_message",
    "make_response",
    "error_response",
    "reason_phrase",
    "quote",
    "MAGIC_COOKIE",
    "KNOWN_METHODS",
]

MAGIC_COOKIE = "z9hG4bK"

KNOWN_METHODS = frozenset(
    {"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "SUBSCRIBE",
     "NOTIFY", "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE"}
)

# RFC 3261 §7.3.3 plus the compact forms registered later (RFC 3265, 3515, 3841, 3892, 4028, 4474).
_COMPACT = {
    "i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
    "c": "content-type", "f": "from", "s": "subject", "k": "supported", "t": "to",
    "v": "via", "o": "event", "u": "allow-events", "r": "refer-to", "b": "referred-by",
    "x": "session-expires", "a": "accept-contact", "j": "reject-contact",
    "d": "request-disposition", "y": "identity", "n": "identity-info",
}

# Header fields that may appear at most once (§20, RFC 4475 multi01).
_SINGLE = ("from", "to", "call-id", "cseq", "max-forwards", "content-length", "content-type")
# Header fields every message must have (canonical name, name in the error).
_REQUIRED = (("via", "Via"), ("from", "From"), ("to", "To"), ("call-id", "Call-ID"), ("cseq", "CSeq"))

_TOKEN_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
)
_WORD_CHARS = _TOKEN_CHARS | frozenset('()<>:\\"/[]?{}')
_GEN_VALUE_CHARS = _TOKEN_CHARS | frozenset(":[]")
_VERSION_RE = re.compile(r"SIP/([0-9]+)\.([0-9]+)\Z", re.IGNORECASE)
#: Largest Content-Length we read (a datagram is far smaller; streams cap it in :mod:`framing`).
MAX_CONTENT_LENGTH = 2**31 - 1
#: CSeq numbers fit 32 bits (§8.1.1.5).
MAX_CSEQ = 2**32 - 1
_LWS = " \t"
_T = TypeVar("_T")


_CANONICAL: dict[str, str] = {}
_CANONICAL_MAX = 512


def canonical_name(name: str) -> str:
    """Lower-case long form of a header name (``"V"`` → ``"via"``)."""
    found = _CANONICAL.get(name)
    if found is not None:
        return found
    lname = name.lower()
    key = _COMPACT.get(lname, lname)
    if len(_CANONICAL) < _CANONICAL_MAX:  # spellings seen on the wire are unbounded: remember the first few
        _CANONICAL[name] = key
    return key


# Character sets as strings for ``str.strip``: ``text.strip(chars)`` is "" exactly when every
# character of ``text`` is in ``chars``, and allocates nothing for the GC to count (a regex
# match object would, for every token of every header).
_TOKEN_STR = "".join(sorted(_TOKEN_CHARS))
_GEN_VALUE_STR = "".join(sorted(_GEN_VALUE_CHARS))
_CALL_ID_STR = "".join(sorted(_WORD_CHARS | frozenset("@")))


def _only(text: str, chars: str) -> bool:
    """Whether ``text`` is non-empty and made of ``chars`` only."""
    return bool(text) and not text.strip(chars)


def _is_token(text: str) -> bool:
    return _only(text, _TOKEN_STR)


_MISSING = object()


class Headers:
    """Ordered multi-dict of header fields that remembers names as written.

    Lookups are case-insensitive and map compact forms to long ones.  Each
    entry is one header line; comma-joined values stay joined (use the typed
    parsers or :func:`split_commas` to split them).

    The typed accessors of a message keep what they parsed here (``_cache``),
    so each header is parsed once however often it is read; every mutation
    empties the cache.
    """

    __slots__ = ("_items", "_keys", "_cache")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(n, v) for n, v in items]
        self._keys: list[str] = [canonical_name(n) for n, _ in self._items]
        self._cache: dict[str, object] | None = None

    @classmethod
    def _from_parsed(cls, items: list[tuple[str, str]], keys: list[str]) -> Headers:
        """Headers over lists the parser built (``keys`` the canonical names of ``items``)."""
        headers = cls.__new__(cls)
        headers._items = items
        headers._keys = keys
        headers._cache = None
        return headers

    def _changed(self) -> None:
        self._cache = None

    def forget_parsed(self) -> None:
        """Drop the kept typed views (they are parsed again when read).

        For a message that is done with but stays referenced (a transaction
        keeps its request up to 32 s): its views would otherwise keep tens of
        objects per message alive for the cyclic GC to scan again and again.
        """
        self._cache = None

    def _memo(self, key: str, compute: Callable[[], _T]) -> _T:
        """``compute()``, remembered under ``key`` until the headers change (errors are not remembered)."""
        cache = self._cache
        if cache is None:
            cache = self._cache = {}
        value = cache.get(key, _MISSING)
        if value is _MISSING:
            value = cache[key] = compute()
        return value  # type: ignore[return-value]

    def get(self, name: str, default: str | None = None) -> str | None:
        """Value of the first ``name`` header, or ``default``."""
        try:
            return self._items[self._keys.index(canonical_name(name))][1]
        except ValueError:
            return default

    def first(self, name: str) -> str | None:
        """Value of the first ``name`` header, or None."""
        return self.get(name)

    def get_all(self, name: str) -> list[str]:
        """Values of every ``name`` header line, in order."""
        key = canonical_name(name)
        return [item[1] for k, item in zip(self._keys, self._items) if k == key]

    def count(self, name: str) -> int:
        """How many ``name`` header lines there are."""
        return self._keys.count(canonical_name(name))

    def set(self, name: str, value: str) -> None:
        """Make ``value`` the only ``name`` header, in place of the first one if any."""
        key = canonical_name(name)
        out: list[tuple[str, str]] = []
        keys: list[str] = []
        done = False
        for k, (n, v) in zip(self._keys, self._items):
            if k == key:
                if not done:
                    out.append((n, value))
                    keys.append(k)
                    done = True
            else:
                out.append((n, v))
                keys.append(k)
        if not done:
            out.append((name, value))
            keys.append(key)
        self._items = out
        self._keys = keys
        self._changed()

    def add(self, name: str, value: str, *, prepend: bool = False) -> None:
        """Append a header line (or put it before all others of that name)."""
        key = canonical_name(name)
        self._changed()
        if prepend:
            try:
                i = self._keys.index(key)
            except ValueError:
                pass
            else:
                self._items.insert(i, (name, value))
                self._keys.insert(i, key)
                return
        self._items.append((name, value))
        self._keys.append(key)

    def remove(self, name: str) -> int:
        """Drop every ``name`` header; return how many were dropped."""
        key = canonical_name(name)
        before = len(self._items)
        kept = [(k, item) for k, item in zip(self._keys, self._items) if k != key]
        self._keys = [k for k, _ in kept]
        self._items = [item for _, item in kept]
        self._changed()
        return before - len(self._items)

    def replace_first_value(self, name: str, value: str) -> None:
        """Replace the first comma-separated element of the first ``name`` header."""
        key = canonical_name(name)
        self._changed()
        try:
            i = self._keys.index(key)
        except ValueError:
            self._items.append((name, value))
            self._keys.append(key)
            return
        n, v = self._items[i]
        parts = split_commas(v)
        parts[0] = value
        self._items[i] = (n, ", ".join(parts))

    def items(self) -> list[tuple[str, str]]:
        """All ``(name, value)`` lines, as written."""
        return list(self._items)

    def copy(self) -> Headers:
        """A shallow copy (strings are immutable, so effectively deep); parsed values come along."""
        other = Headers.__new__(Headers)
        other._items = list(self._items)
        other._keys = list(self._keys)
        other._cache = None if self._cache is None else dict(self._cache)
        return other

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonical_name(name) in self._keys

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


# ---------------------------------------------------------------- low-level lexing


def _read_quoted(text: str, start: int) -> tuple[str, int]:
    """Read a quoted-string at ``text[start] == '"'``; return (unescaped, index after)."""
    out: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 >= n or text[i + 1] in "\r\n":
                raise SipParseError(f"bad quoted-pair in {text!r}")
            out.append(text[i + 1])
            i += 2
        elif ch == '"':
            return "".join(out), i + 1
        elif ch in "\r\n":
            raise SipParseError(f"line break in quoted string: {text!r}")
        else:
            out.append(ch)
            i += 1
    raise SipParseError(f"unterminated quoted string: {text!r}")


def quote(text: str) -> str:
    """Render ``text`` as a quoted-string, escaping ``"`` and ``\\``."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def split_commas(value: str) -> list[str]:
    """Split a header value on commas outside quotes and ``<...>``; strip each part."""
    if '"' not in value and "<" not in value:
        return [part.strip(_LWS) for part in value.split(",")]
    parts: list[str] = []
    buf: list[str] = []
    in_quote = False
    in_angle = False
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if in_quote:
            buf.append(ch)
            if ch == "\\" and i + 1 < n:
                buf.append(value[i + 1])
                i += 1
            elif ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
            buf.append(ch)
        elif ch == "<":
            in_angle = True
            buf.append(ch)
        elif ch == ">":
            in_angle = False
            buf.append(ch)
        elif ch == "," and not in_angle:
            parts.append("".join(buf).strip(_LWS))
            buf = []
        else:
            buf.append(ch)
        i += 1
    if in_quote:
        raise SipParseError(f"unterminated quoted string: {value!r}")
    parts.append("".join(buf).strip(_LWS))
    return parts


def _split_semis(text: str) -> list[str]:
    """Split on semicolons outside quoted strings."""
    if '"' not in text:
        return text.split(";")
    parts: list[str] = []
    buf: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            _, end = _read_quoted(text, i)
            buf.append(text[i:end])
            i = end
            continue
        if ch == ";":
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return parts


Params = list[tuple[str, str | None]]


def parse_params(text: str) -> Params:
    """Parse ``*( SEMI generic-param )`` allowing LWS around ``;`` and ``=``.

    Values keep their quotes, so serialization reproduces them; use
    :func:`param_value` to read one unquoted.
    """
    parts = _split_semis(text)
    if parts[0].strip(_LWS):
        raise SipParseError(f"junk before parameters: {text!r}")
    params: Params = []
    for item in parts[1:]:
        name, eq, value = item.partition("=")
        name = name.strip(_LWS)
        if not _is_token(name):
            raise SipParseError(f"bad parameter name {name!r} in {text!r}")
        if not eq:
            params.append((name, None))
            continue
        value = value.strip(_LWS)
        if value.startswith('"'):
            _, end = _read_quoted(value, 0)
            if end != len(value):
                raise SipParseError(f"junk after quoted parameter: {text!r}")
        elif not _only(value, _GEN_VALUE_STR):
            raise SipParseError(f"bad parameter value {value!r} in {text!r}")
        params.append((name, value))
    return params


def param_value(params: Params, name: str) -> str | None:
    """Unquoted value of ``name`` (case-insensitive); ``""`` if valueless, None if absent."""
    lname = name.lower()
    for key, value in params:
        if key.lower() == lname:
            if value is None:
                return ""
            if value.startswith('"'):
                return _read_quoted(value, 0)[0]
            return value
    return None


def _set_param(params: Params, name: str, value: str | None) -> None:
    lname = name.lower()
    for i, (key, _) in enumerate(params):
        if key.lower() == lname:
            params[i] = (key, value)
            return
    params.append((name, value))


def _format_params(params: Params) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)


# ---------------------------------------------------------------- typed headers


@dataclass(slots=True)
class Via:
    """One Via header value: ``SIP/2.0/UDP host:port;branch=...;rport``."""

    transport: str
    host: str
    port: int | None = None
    params: Params = field(default_factory=list)
    protocol: str = "SIP"
    version: str = "2.0"

    def param(self, name: str) -> str | None:
        """Unquoted parameter value; ``""`` if valueless, None if absent."""
        return param_value(self.params, name)

    def set_param(self, name: str, value: str | None) -> None:
        """Replace or append a parameter."""
        _set_param(self.params, name, value)

    @property
    def branch(self) -> str | None:
        """The branch parameter, if any."""
        return self.param("branch")

    @property
    def received(self) -> str | None:
        """The received parameter, if any."""
        return self.param("received") or None

    @property
    def has_rport(self) -> bool:
        """Whether an ``rport`` parameter (RFC 3581) is present, with or without value."""
        return self.param("rport") is not None

    @property
    def rport(self) -> int | None:
        """The numeric rport value (1..65535), if one was filled in; None for anything else."""
        value = self.param("rport")
        if not value:
            return None
        try:
            return bounded_int(value, "rport", 65535, low=1)
        except SipParseError:
            return None

    @property
    def sent_by(self) -> str:
        """``host[:port]`` as sent."""
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def reliable(self) -> bool:
        """Whether the transport is connection-oriented (everything but UDP)."""
        return self.transport.upper() != "UDP"

    def copy(self) -> Via:
        """A copy with its own parameter list."""
        return Via(self.transport, self.host, self.port, list(self.params), self.protocol, self.version)

    def __str__(self) -> str:
        return f"{self.protocol}/{self.version}/{self.transport} {self.sent_by}{_format_params(self.params)}"


_VIA_RE = re.compile(
    r"([^/\s]+)[ \t]*/[ \t]*([^/\s]+)[ \t]*/[ \t]*([^/\s;]+)[ \t]+([^;]*)(.*)\Z", re.DOTALL
)


def _parse_one_via(value: str) -> Via:
    match = _VIA_RE.match(value.strip(_LWS))
    if not match:
        raise SipParseError(f"bad Via: {value!r}")
    protocol, version, transport, sent_by, rest = match.groups()
    for part in (protocol, version, transport):
        if not _is_token(part):
            raise SipParseError(f"bad Via protocol: {value!r}")
    sent_by = re.sub(r"[ \t]*:[ \t]*", ":", sent_by.strip(_LWS)) if "[" not in sent_by else sent_by.strip(_LWS)
    host, port = split_hostport(sent_by)
    via = Via(transport, host, port, parse_params(rest), protocol, version)
    rport = via.param("rport")
    if rport:
        bounded_int(rport, "Via rport", 65535, low=1)  # RFC 3581: a port, when filled in
    return via


def parse_via(value: str) -> list[Via]:
    """Parse one Via header line, which may hold several comma-separated values."""
    vias = []
    for part in split_commas(value):
        if not part:
            raise SipParseError(f"empty Via value: {value!r}")
        vias.append(_parse_one_via(part))
    return vias


@dataclass(slots=True)
class NameAddr:
    """``[display] <uri>;params`` or ``uri;params`` (From, To, Contact, Route ...).

    ``display_name`` is unescaped; ``bracketed`` records whether the URI was in
    angle brackets (it always is on output when that matters).
    """

    uri: SipUri
    display_name: str | None = None
    params: Params = field(default_factory=list)
    bracketed: bool = True

    def param(self, name: str) -> str | None:
        """Unquoted header parameter value; ``""`` if valueless, None if absent."""
        return param_value(self.params, name)

    def set_param(self, name: str, value: str | None) -> None:
        """Replace or append a header parameter."""
        _set_param(self.params, name, value)

    @property
    def tag(self) -> str | None:
        """The ``tag`` parameter (From/To), if any."""
        return self.param("tag") or None

    def with_tag(self, tag: str) -> NameAddr:
        """A copy with ``tag`` set."""
        other = self.copy()
        other.set_param("tag", tag)
        return other

    def copy(self) -> NameAddr:
        """A deep copy."""
        return NameAddr(self.uri.copy(), self.display_name, list(self.params), self.bracketed)

    def __str__(self) -> str:
        uri = str(self.uri)
        # An addr-spec may not carry ';', '?' or ',' (§20), so bracket whenever the URI does.
        needs_brackets = (
            self.bracketed or self.display_name is not None or any(c in uri for c in ";?,")
        )
        text = f"<{uri}>" if needs_brackets else uri
        if self.display_name is not None:
            text = f"{quote(self.display_name)} {text}"
        return text + _format_params(self.params)


def parse_name_addr(value: str) -> NameAddr:
    """Parse one name-addr or addr-spec with header parameters."""
    text = value.strip(_LWS)
    if not text:
        raise SipParseError("empty address")
    display: str | None = None
    if text.startswith('"'):
        display, end = _read_quoted(text, 0)
        rest = text[end:].lstrip(_LWS)
        if not rest.startswith("<"):
            raise SipParseError(f"quoted display name without <URI>: {value!r}")
        return _bracketed(rest, display, value)
    lt = text.find("<")
    if lt >= 0:
        words = text[:lt].split()
        if any(not _is_token(w) for w in words):
            raise SipParseError(f"display name must be tokens or quoted: {value!r}")
        display = " ".join(words) if words else None
        return _bracketed(text[lt:], display, value)
    uri_text, semi, rest = text.partition(";")
    uri_text = uri_text.strip(_LWS)
    if " " in uri_text or "\t" in uri_text or "," in uri_text or (
        uri_text.lower().startswith(("sip:", "sips:")) and "?" in uri_text
    ):
        raise SipParseError(f"URI with ',', '?' or spaces must be in <>: {value!r}")
    uri = parse_uri(uri_text)
    return NameAddr(uri, None, parse_params(semi + rest), bracketed=False)


def _bracketed(text: str, display: str | None, original: str) -> NameAddr:
    gt = text.find(">")
    if gt < 0:
        raise SipParseError(f"missing '>': {original!r}")
    uri_text = text[1:gt]
    if " " in uri_text or "\t" in uri_text:
        raise SipParseError(f"whitespace inside <URI>: {original!r}")
    return NameAddr(parse_uri(uri_text), display, parse_params(text[gt + 1 :]), bracketed=True)


def parse_name_addr_list(values: Iterable[str]) -> list[NameAddr]:
    """Parse header lines holding comma-separated addresses (Route, Record-Route, Contact)."""
    out = []
    for value in values:
        for part in split_commas(value):
            out.append(parse_name_addr(part))
    return out


def parse_contacts(values: Iterable[str]) -> list[NameAddr] | Literal["*"]:
    """Parse Contact header lines; ``"*"`` for the REGISTER wildcard."""
    values = list(values)
    if len(values) == 1 and values[0].strip(_LWS) == "*":
        return "*"
    return parse_name_addr_list(values)


@dataclass(frozen=True, slots=True)
class CSeq:
    """``CSeq: <seq> <method>``."""

    seq: int
    method: str

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"


def parse_cseq(value: str) -> CSeq:
    """Parse a CSeq value; the number must fit 32 bits (§8.1.1.5)."""
    parts = value.split()
    if len(parts) != 2 or not _is_token(parts[1]):
        raise SipParseError(f"bad CSeq: {value[:80]!r}")
    return CSeq(bounded_int(parts[0], "CSeq number", MAX_CSEQ), parts[1])


@dataclass(slots=True)
class AuthHeader:
    """``scheme param=value, ...`` of WWW-/Proxy-Authenticate and (Proxy-)Authorization.

    Values are unquoted; ``params`` keeps their order.
    """

    scheme: str
    params: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        """Value of ``name`` (case-insensitive) or None."""
        lname = name.lower()
        for key, value in self.params:
            if key.lower() == lname:
                return value
        return None


def parse_auth_header(value: str) -> AuthHeader:
    """Parse a challenge or credentials header value."""
    text = value.strip(_LWS)
    scheme, _, rest = text.partition(" ")
    if not _is_token(scheme):
        raise SipParseError(f"bad auth scheme: {value!r}")
    params: list[tuple[str, str]] = []
    for item in split_commas(rest) if rest.strip() else []:
        name, eq, raw = item.partition("=")
        name = name.strip(_LWS)
        raw = raw.strip(_LWS)
        if not eq or not _is_token(name) or not raw:
            raise SipParseError(f"bad auth parameter {item!r}")
        if raw.startswith('"'):
            unquoted, end = _read_quoted(raw, 0)
            if end != len(raw):
                raise SipParseError(f"junk after quoted auth parameter {item!r}")
            params.append((name, unquoted))
        elif _is_token(raw):
            params.append((name, raw))
        else:
            raise SipParseError(f"bad auth parameter value {item!r}")
    return AuthHeader(scheme, params)


# ---------------------------------------------------------------- messages


class _Accessors:
    """Typed views over ``self.headers`` shared by requests and responses.

    Each view is parsed once per header text and kept on ``headers`` (a
    mutation of ``headers`` forgets it); mutable views (Via, NameAddr, lists)
    are returned as copies, so changing one never changes the next read.
    """

    __slots__ = ()

    headers: Headers
    body: bytes

    def _one(self, name: str) -> str:
        value = self.headers.get(name)
        if value is None:
            raise SipParseError(f"missing {name} header")
        return value

    @property
    def call_id(self) -> str:
        """The Call-ID."""
        return self.headers._memo("call-id", lambda: self._one("Call-ID").strip())

    @property
    def cseq(self) -> CSeq:
        """The parsed CSeq."""
        return self.headers._memo("cseq", lambda: parse_cseq(self._one("CSeq")))

    def _vias(self) -> list[Via]:
        return self.headers._memo("via", lambda: [v for line in self.headers.get_all("Via") for v in parse_via(line)])

    @property
    def vias(self) -> list[Via]:
        """Every Via value, top first (comma-joined lines split)."""
        return [v.copy() for v in self._vias()]

    @property
    def top_via(self) -> Via:
        """The first Via value."""
        # The first line only: a bad Via further down does not hide the top one.
        return self.headers._memo("top-via", lambda: parse_via(self._one("Via"))[0]).copy()

    def set_top_via(self, via: Via) -> None:
        """Replace the first Via value, keeping any others on the same line.

        Only the Via views are forgotten: the others (From, To, CSeq ...) stay
        parsed, since stamping ``received``/``rport`` changes nothing else.
        """
        headers = self.headers
        cache = headers._cache
        headers.replace_first_value("Via", str(via))
        if cache:
            cache.pop("via", None)
            cache.pop("top-via", None)
            headers._cache = cache

    @property
    def from_(self) -> NameAddr:
        """The parsed From header."""
        return self.headers._memo("from", lambda: parse_name_addr(self._one("From"))).copy()

    @property
    def to(self) -> NameAddr:
        """The parsed To header."""
        return self.headers._memo("to", lambda: parse_name_addr(self._one("To"))).copy()

    @property
    def from_tag(self) -> str | None:
        """The From tag, without copying the parsed From."""
        return self.headers._memo("from", lambda: parse_name_addr(self._one("From"))).tag

    @property
    def to_tag(self) -> str | None:
        """The To tag, without copying the parsed To."""
        return self.headers._memo("to", lambda: parse_name_addr(self._one("To"))).tag

    @property
    def max_forwards(self) -> int | None:
        """Max-Forwards, or None if absent."""
        value = self.headers.get("Max-Forwards")
        if value is None:
            return None
        return bounded_int(value.strip(), "Max-Forwards", 255)

    @property
    def content_length(self) -> int | None:
        """The Content-Length header value, or None if absent."""
        value = self.headers.get("Content-Length")
        if value is None:
            return None
        return bounded_int(value.strip(), "Content-Length", MAX_CONTENT_LENGTH)

    @property
    def content_type(self) -> str | None:
        """The Content-Type media type, lower-cased without parameters."""
        value = self.headers.get("Content-Type")
        return value.split(";")[0].strip().lower() if value else None

    @property
    def contacts(self) -> list[NameAddr] | Literal["*"]:
        """Parsed Contact values (``"*"`` for the wildcard)."""
        contacts = self.headers._memo("contact", lambda: parse_contacts(self.headers.get_all("Contact")))
        return contacts if contacts == "*" else [c.copy() for c in contacts]

    @property
    def routes(self) -> list[NameAddr]:
        """Parsed Route values in order."""
        routes = self.headers._memo("route", lambda: parse_name_addr_list(self.headers.get_all("Route")))
        return [r.copy() for r in routes]

    @property
    def record_routes(self) -> list[NameAddr]:
        """Parsed Record-Route values in order."""
        routes = self.headers._memo("record-route", lambda: parse_name_addr_list(self.headers.get_all("Record-Route")))
        return [r.copy() for r in routes]

    def _serialize(self, start_line: str) -> bytes:
        # Content-Length is the body's: it replaces the first such line, later ones are dropped.
        length = str(len(self.body))
        lines = [start_line]
        done = False
        for key, (n, v) in zip(self.headers._keys, self.headers._items):
            if key == "content-length":
                if not done:
                    lines.append(f"{n}: {length}")
                    done = True
            else:
                lines.append(f"{n}: {v}")
        if not done:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + bytes(self.body)


@dataclass(eq=True, slots=True)
class SipRequest(_Accessors):
    """A SIP request.  ``uri`` may be a placeholder in a :class:`SipParseError`'s partial."""

    method: str
    uri: SipUri
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    version: str = "SIP/2.0"

    def serialize(self) -> bytes:
        """Wire bytes, with Content-Length set to the body length."""
        return self._serialize(f"{self.method} {self.uri} {self.version}")

    def copy(self) -> SipRequest:
        """A copy with its own headers and URI."""
        return SipRequest(self.method, self.uri.copy(), self.headers.copy(), self.body, self.version)


@dataclass(eq=True, slots=True)
class SipResponse(_Accessors):
    """A SIP response."""

    status: int
    reason: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    version: str = "SIP/2.0"

    def serialize(self) -> bytes:
        """Wire bytes, with Content-Length set to the body length."""
        return self._serialize(f"{self.version} {self.status} {self.reason}")

    def copy(self) -> SipResponse:
        """A copy with its own headers."""
        return SipResponse(self.status, self.reason, self.headers.copy(), self.body, self.version)


SipMessage = SipRequest | SipResponse


def _find_head_end(data: bytes, start: int) -> tuple[int, int]:
    """Return (end of headers, start of body); LF-only line ends are tolerated."""
    crlf = data.find(b"\r\n\r\n", start)
    lf = data.find(b"\n\n", start)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, crlf + 4
    if lf >= 0:
        # "\r\n\n" ends the head as well.
        return lf, lf + 2
    raise SipParseError("no empty line after the headers")


def _split_lines(head: str) -> list[str]:
    crlf = head.count("\r\n")
    if head.count("\r") == crlf and head.count("\n") == crlf:
        return head.split("\r\n")  # the usual case: CRLF line ends only
    lines = re.split(r"\r?\n", head)
    if any("\r" in line for line in lines):
        raise SipParseError("bare CR in message head")
    return lines


def _parse_headers(lines: list[str]) -> Headers:
    logical: list[str] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not logical:
                raise SipParseError("continuation line before any header")
            logical[-1] = logical[-1].rstrip(_LWS) + " " + line.strip(_LWS)
        elif line:
            logical.append(line)
        else:
            raise SipParseError("empty header line")
    items: list[tuple[str, str]] = []
    keys: list[str] = []
    for line in logical:
        name, colon, value = line.partition(":")
        name = name.rstrip(_LWS)
        if not colon or not _is_token(name):
            raise SipParseError(f"bad header line: {line[:80]!r}")
        items.append((name, value.strip(_LWS)))
        keys.append(canonical_name(name))
    return Headers._from_parsed(items, keys)


def _check_version(version: str) -> None:
    match = _VERSION_RE.match(version)
    if not match:
        raise SipParseError(f"bad SIP version: {version[:40]!r}")
    # Compared as digit strings: no int() of a 5000-digit major version.
    if (match.group(1).lstrip("0"), match.group(2).lstrip("0")) != ("2", ""):
        raise SipParseError(f"unsupported SIP version: {version[:40]!r}", status=505)


def parse_message(data: bytes) -> SipRequest | SipResponse:
    """Parse one message from a datagram (or a frame cut by :mod:`framing`).

    Leading CRLFs are skipped (§7.5).  Without Content-Length the rest of
    ``data`` is the body; with it, the body is cut to that length and bytes
    after it are ignored (RFC 4475 dblreq); a shorter body is an error.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SipParseError("message must be bytes")
    data = bytes(data)
    start = 0
    while data.startswith(b"\r\n", start) or data.startswith(b"\n", start):
        start += 2 if data.startswith(b"\r\n", start) else 1
    if start >= len(data):
        raise SipParseError("empty message")
    head_end, body_start = _find_head_end(data, start)
    head = data[start:head_end].decode("utf-8", "surrogateescape")
    lines = _split_lines(head)
    start_line = lines[0]
    headers = _parse_headers(lines[1:])
    msg: SipRequest | SipResponse
    is_response = start_line[:4].upper() == "SIP/"
    if is_response:
        version, _, rest = start_line.partition(" ")
        code, _, reason = rest.partition(" ")
        status = int(code) if len(code) == 3 and code.isdigit() and code.isascii() else 0
        msg = SipResponse(status, reason, headers, b"", version)
    else:
        method, _, rest = start_line.partition(" ")
        msg = SipRequest(method, SipUri(scheme="", opaque=rest), headers, b"")
    try:
        lengths = headers.get_all("Content-Length")
        if len(lengths) > 1:
            raise SipParseError("more than one Content-Length")
        if lengths:
            length = msg.content_length
            assert length is not None
            if body_start + length > len(data):
                raise SipParseError(
                    f"body is {len(data) - body_start} bytes, Content-Length says {length}"
                )
            msg.body = data[body_start : body_start + length]
        else:
            msg.body = data[body_start:]
        if isinstance(msg, SipResponse):
            _check_status_line(start_line, msg)
        else:
            _check_request_line(start_line, msg)
        _check_headers(msg)
    except SipParseError as err:
        err.partial = msg
        raise
    except (ValueError, IndexError, UnicodeError) as err:
        raise SipParseError(f"malformed message: {err}", partial=msg) from err
    return msg


def _check_status_line(line: str, msg: SipResponse) -> None:
    parts = line.split(" ", 2)
    if len(parts) < 2:
        raise SipParseError(f"bad status line: {line!r}")
    _check_version(parts[0])
    if not (100 <= msg.status <= 699):
        raise SipParseError(f"bad status code: {parts[1]!r}")
    msg.version = parts[0]


def _check_request_line(line: str, msg: SipRequest) -> None:
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise SipParseError(f"request line must be 'Method SP URI SP Version': {line!r}")
    method, uri_text, version = parts
    if not _is_token(method):
        raise SipParseError(f"bad method: {method!r}")
    _check_version(version)
    uri = parse_uri(uri_text)
    if uri.is_sip and uri.headers:
        raise SipParseError("headers are not allowed in a Request-URI")
    msg.uri = uri
    msg.version = version


def _check_headers(msg: SipRequest | SipResponse) -> None:
    headers = msg.headers
    keys = headers._keys  # canonical names: no per-lookup name folding
    for key, name in _REQUIRED:
        if key not in keys:
            raise SipParseError(f"missing {name} header")
    for name in _SINGLE:
        if keys.count(name) > 1:
            raise SipParseError(f"more than one {name} header")
    msg.vias  # noqa: B018 - parsing validates
    msg.from_  # noqa: B018
    msg.to  # noqa: B018
    call_id = msg.call_id
    if not _only(call_id, _CALL_ID_STR) or call_id.count("@") > 1:
        raise SipParseError(f"bad Call-ID: {call_id!r}")
    cseq = msg.cseq
    if "contact" in keys:
        contacts = msg.contacts
        if contacts == "*" and not (isinstance(msg, SipRequest) and msg.method == "REGISTER"):
            raise SipParseError("Contact: * outside REGISTER")
    msg.routes  # noqa: B018
    msg.record_routes  # noqa: B018
    if isinstance(msg, SipRequest):
        msg.max_forwards  # noqa: B018
        if cseq.method != msg.method:
            # RFC 4475 mismatch02: 501 is the better answer for a method we don't know.
            status = 400 if msg.method in KNOWN_METHODS else 501
            raise SipParseError(
                f"CSeq method {cseq.method!r} does not match {msg.method!r}", status=status
            )


# ---------------------------------------------------------------- responses

_REASONS = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 300: "Multiple Choices",
    301: "Moved Permanently", 302: "Moved Temporarily", 305: "Use Proxy", 380: "Alternative Service",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    413: "Request Entity Too Large", 414: "Request-URI Too Long", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 420: "Bad Extension", 421: "Extension Required",
    423: "Interval Too Brief", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    484: "Address Incomplete", 485: "Ambiguous", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 491: "Request Pending", 493: "Undecipherable",
    500: "Server Internal Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large", 600: "Busy Everywhere", 603: "Decline",
    604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}


def reason_phrase(status: int) -> str:
    """The RFC 3261 §21 reason phrase for ``status`` (a generic one if unknown)."""
    return _REASONS.get(status) or _REASONS.get(status // 100 * 100, "Unknown")


_RESPONSE_COPIES = frozenset({"via", "from", "to", "call-id", "cseq"})


def make_response(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
    to_tag: str | None = None,
    body: bytes = b"",
) -> SipResponse:
    """Build a response per RFC 3261 §8.2.6.2.

    Via (all, in order), From, To, Call-ID and CSeq are copied as written; a To
    tag is added when ``to_tag`` is given and the To has none; Timestamp is
    copied into a 100 (§8.2.6.1).  Headers the request lacks are skipped so a
    400 can be built from a partial request.
    """
    headers = Headers()
    first_to = True
    for key, (name, value) in zip(request.headers._keys, request.headers._items):
        if key == "to" and to_tag is not None:
            try:
                # The first To is the one the accessors parsed (and kept); a partial may hold more.
                tag = request.to_tag if first_to else parse_name_addr(value).tag
            except SipParseError:
                headers.add(name, value)
                continue
            finally:
                first_to = False
            if tag is None:
                value = value + ";tag=" + to_tag
            headers.add(name, value)
        elif key in _RESPONSE_COPIES or (key == "timestamp" and status == 100):
            headers.add(name, value)
    for name, value in extra_headers:
        headers.add(name, value)
    return SipResponse(status, reason if reason is not None else reason_phrase(status), headers, body)


def error_response(error: SipParseError, to_tag: str | None = None) -> SipResponse | None:
    """The response to send for a request that failed to parse, or None to drop it.

    Responses are never answered; a request is answered only when it got as
    far as having a Via header (otherwise there is nowhere to send it).
    """
    partial = error.partial
    if not isinstance(partial, SipRequest) or "Via" not in partial.headers:
        return None
    if partial.method == "ACK":
        return None  # never respond to an ACK (§17.2.3)
    reason = reason_phrase(error.status)
    return make_response(partial, error.status, reason, to_tag=to_tag)
