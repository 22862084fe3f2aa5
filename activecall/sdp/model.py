"""SDP (RFC 4566 / RFC 8866) model, parser and serializer, with RFC 3264 helpers.

Pure module.  :func:`parse_sdp` accepts CRLF or bare LF line ends and keeps
every line it understands in a typed field and every other one (unknown types,
``r=``/``z=``/``k=`` lines) verbatim, so ``parse_sdp(s.serialize())`` equals
``s``.  :meth:`SessionDescription.serialize` writes CRLF in RFC 4566 order.

Offer/answer negotiation is the media layer's; this module gives it the pieces:
``rtpmaps()``, ``fmtps()``, ``ptime``, ``direction()`` (with the session-level
default and the RFC 2543 ``c=0.0.0.0`` hold), ``crypto()`` (RFC 4568, read into
the one ``a=crypto`` model, :class:`activecall.rtp.srtp.CryptoAttribute`), ICE,
``rtcp``/``rtcp-mux``, ``fingerprint``/``setup`` and ``mid``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from activecall.digits import bounded_int
from activecall.rtp.srtp import CryptoAttribute, SrtpError, parse_crypto

__all__ = [
    "SdpParseError",
    "Origin",
    "Connection",
    "Bandwidth",
    "Timing",
    "Attribute",
    "RtpMap",
    "MediaDescription",
    "SessionDescription",
    "parse_sdp",
    "DIRECTIONS",
]

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")

# Static payload types of RFC 3551 that may be used without an rtpmap.
_STATIC_PT = {
    0: ("PCMU", 8000, 1), 3: ("GSM", 8000, 1), 4: ("G723", 8000, 1), 5: ("DVI4", 8000, 1),
    6: ("DVI4", 16000, 1), 7: ("LPC", 8000, 1), 8: ("PCMA", 8000, 1), 9: ("G722", 8000, 1),
    10: ("L16", 44100, 2), 11: ("L16", 44100, 1), 12: ("QCELP", 8000, 1), 13: ("CN", 8000, 1),
    14: ("MPA", 90000, 1), 15: ("G728", 8000, 1), 18: ("G729", 8000, 1),
    26: ("JPEG", 90000, 1), 31: ("H261", 90000, 1), 32: ("MPV", 90000, 1), 34: ("H263", 90000, 1),
}


#: Bounds of the numbers we read (RFC 3550/3551 payload types, UDP ports).
MAX_PAYLOAD_TYPE = 127
MAX_PORT = 65535
MAX_CLOCK_RATE_HZ = 2**32 - 1
MAX_CHANNELS = 255
MAX_PTIME_MS = 10_000
_U64 = 2**64 - 1
# ptime is a decimal: at most 5 integer digits, an optional fraction (never float(): 1e999, nan, inf).
_PTIME_RE = re.compile(r"([0-9]{1,5})(?:\.[0-9]{0,9})?\Z")


def _small_int(text: str, high: int, low: int = 0) -> int | None:
    """``text`` as a bounded ASCII-digit integer, or None (for accessors that tolerate junk)."""
    try:
        return bounded_int(text, "number", high, low=low)
    except ValueError:
        return None


class SdpParseError(ValueError):
    """Malformed SDP; a UAS usually answers ``status`` 488 (or 400 if the SIP message is at fault).

    Like :class:`activecall.sip.uri.SipParseError` it carries the response
    status, but it is no SIP error: SDP sits below the SIP layer.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.status = 488


@dataclass
class Origin:
    """``o=<username> <sess-id> <sess-version> <nettype> <addrtype> <address>``."""

    username: str = "-"
    session_id: str = "0"
    session_version: int = 0
    nettype: str = "IN"
    addrtype: str = "IP4"
    address: str = "0.0.0.0"

    def __str__(self) -> str:
        return (f"{self.username} {self.session_id} {self.session_version} "
                f"{self.nettype} {self.addrtype} {self.address}")


@dataclass
class Connection:
    """``c=<nettype> <addrtype> <address>[/ttl][/count]``."""

    address: str
    addrtype: str = "IP4"
    nettype: str = "IN"

    @property
    def host(self) -> str:
        """The address without multicast /ttl/count suffixes."""
        return self.address.split("/")[0]

    @property
    def is_hold(self) -> bool:
        """The RFC 2543 hold address 0.0.0.0 (RFC 3264 §8.4)."""
        return self.host in ("0.0.0.0", "::")

    def __str__(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"


@dataclass
class Bandwidth:
    """``b=<bwtype>:<bandwidth>``."""

    bwtype: str
    bandwidth: int

    def __str__(self) -> str:
        return f"{self.bwtype}:{self.bandwidth}"


@dataclass
class Timing:
    """``t=<start> <stop>`` plus its ``r=`` repeat lines, verbatim."""

    start: int = 0
    stop: int = 0
    repeats: list[str] = field(default_factory=list)


@dataclass
class Attribute:
    """``a=<name>[:<value>]``."""

    name: str
    value: str | None = None

    def __str__(self) -> str:
        return self.name if self.value is None else f"{self.name}:{self.value}"


@dataclass(frozen=True)
class RtpMap:
    """``a=rtpmap:<pt> <encoding>/<clock>[/<channels>]``."""

    encoding: str
    clock_rate_hz: int
    channels: int = 1


class _AttributeMixin:
    attributes: list[Attribute]

    def attribute(self, name: str) -> str | None:
        """Value of the first ``a=name`` (``""`` for a flag), or None."""
        for attr in self.attributes:
            if attr.name == name:
                return "" if attr.value is None else attr.value
        return None

    def attribute_values(self, name: str) -> list[str]:
        """Values of every ``a=name``, in order."""
        return ["" if a.value is None else a.value for a in self.attributes if a.name == name]

    def has_attribute(self, name: str) -> bool:
        """Whether ``a=name`` is present."""
        return any(a.name == name for a in self.attributes)

    def _own_direction(self) -> str | None:
        for attr in self.attributes:
            if attr.name in DIRECTIONS:
                return attr.name
        return None

    def set_direction(self, direction: str) -> None:
        """Replace any direction attribute with ``direction``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"not a direction: {direction!r}")
        self.attributes = [a for a in self.attributes if a.name not in DIRECTIONS]
        self.attributes.append(Attribute(direction))


@dataclass
class MediaDescription(_AttributeMixin):
    """An ``m=`` section with its lines."""

    media: str
    port: int
    proto: str
    formats: list[str]
    port_count: int | None = None
    title: str | None = None
    connections: list[Connection] = field(default_factory=list)
    bandwidths: list[Bandwidth] = field(default_factory=list)
    key: str | None = None
    attributes: list[Attribute] = field(default_factory=list)
    extra: list[tuple[str, str]] = field(default_factory=list)

    @property
    def payload_types(self) -> list[int]:
        """Formats that are RTP payload types (0..127, ASCII digits); others are skipped."""
        out = []
        for f in self.formats:
            pt = _small_int(f, MAX_PAYLOAD_TYPE)
            if pt is not None:
                out.append(pt)
        return out

    def rtpmaps(self) -> dict[int, RtpMap]:
        """pt -> (encoding, clock, channels), from rtpmap lines or the RFC 3551 static table.

        Lines with a payload type outside 0..127, a clock rate outside
        1..2^32-1 or a channel count outside 1..255 are skipped.
        """
        out: dict[int, RtpMap] = {}
        for value in self.attribute_values("rtpmap"):
            pt_text, _, spec = value.partition(" ")
            parts = spec.strip().split("/")
            if len(parts) < 2:
                continue  # tolerate junk such as RFC 4475's "LPC" with no clock
            pt = _small_int(pt_text, MAX_PAYLOAD_TYPE)
            rate = _small_int(parts[1], MAX_CLOCK_RATE_HZ, low=1)
            channels = _small_int(parts[2], MAX_CHANNELS, low=1) if len(parts) > 2 else 1
            if pt is None or rate is None or channels is None:
                continue
            out[pt] = RtpMap(parts[0], rate, channels)
        for pt in self.payload_types:
            if pt not in out and pt in _STATIC_PT:
                out[pt] = RtpMap(*_STATIC_PT[pt])
        return out

    def fmtps(self) -> dict[int, str]:
        """pt -> format parameters string."""
        out: dict[int, str] = {}
        for value in self.attribute_values("fmtp"):
            pt_text, _, params = value.partition(" ")
            pt = _small_int(pt_text, MAX_PAYLOAD_TYPE)
            if pt is not None:
                out[pt] = params.strip()
        return out

    @property
    def ptime_ms(self) -> int | None:
        """``a=ptime`` in whole milliseconds (1..10000), if given and readable.

        A decimal such as ``22.5`` is cut to ``22``; exponents, ``inf``,
        ``nan`` and out-of-range values read as absent (no ``float()``).
        """
        match = _PTIME_RE.match((self.attribute("ptime") or "").strip())
        if not match:
            return None
        value = int(match.group(1))
        return value if 1 <= value <= MAX_PTIME_MS else None

    def crypto(self) -> list[CryptoAttribute]:
        """The RFC 4568 crypto lines we can read, in preference order.

        Each is decoded and checked by :func:`activecall.rtp.srtp.parse_crypto`
        (known suite, key length, bounded tag, lifetime and MKI); lines it
        refuses are skipped.
        """
        out = []
        for value in self.attribute_values("crypto"):
            try:
                out.append(parse_crypto(value))
            except SrtpError:
                continue
        return out

    @property
    def rtcp_mux(self) -> bool:
        """Whether ``a=rtcp-mux`` is present."""
        return self.has_attribute("rtcp-mux")

    @property
    def rtcp_port(self) -> int | None:
        """Port of ``a=rtcp`` (RFC 3605), if any and in 1..65535."""
        value = self.attribute("rtcp")
        head = value.split()[0] if value and value.split() else ""
        return _small_int(head, MAX_PORT, low=1)

    @property
    def ice_ufrag(self) -> str | None:
        """``a=ice-ufrag``."""
        return self.attribute("ice-ufrag")

    @property
    def ice_pwd(self) -> str | None:
        """``a=ice-pwd``."""
        return self.attribute("ice-pwd")

    @property
    def candidates(self) -> list[str]:
        """``a=candidate`` values."""
        return self.attribute_values("candidate")

    @property
    def fingerprint(self) -> tuple[str, str] | None:
        """``a=fingerprint`` as (hash function, hex), if any."""
        value = self.attribute("fingerprint")
        if not value:
            return None
        algo, _, digest = value.partition(" ")
        return algo.lower(), digest.strip()

    @property
    def mid(self) -> str | None:
        """``a=mid``."""
        return self.attribute("mid")

    @property
    def is_secure(self) -> bool:
        """Whether the profile is SRTP (SAVP/SAVPF, incl. DTLS)."""
        return "SAVP" in self.proto.upper()


@dataclass
class SessionDescription(_AttributeMixin):
    """A whole SDP body."""

    origin: Origin = field(default_factory=Origin)
    session_name: str = "-"
    version: int = 0
    info: str | None = None
    uri: str | None = None
    emails: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)
    connection: Connection | None = None
    bandwidths: list[Bandwidth] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=lambda: [Timing()])
    timezones: str | None = None
    key: str | None = None
    attributes: list[Attribute] = field(default_factory=list)
    media: list[MediaDescription] = field(default_factory=list)
    extra: list[tuple[str, str]] = field(default_factory=list)

    def connection_for(self, media: MediaDescription) -> Connection | None:
        """The media's own c= or the session-level one."""
        return media.connections[0] if media.connections else self.connection

    def direction(self, media: MediaDescription) -> str:
        """Direction of ``media`` as the remote stated it.

        The media attribute wins over the session attribute, which defaults to
        sendrecv.  A ``c=0.0.0.0`` (RFC 2543 hold) removes the receive half:
        sendrecv becomes sendonly, recvonly becomes inactive.  A zero port is
        a rejected stream: inactive.
        """
        if media.port == 0:
            return "inactive"
        direction = media._own_direction() or self._own_direction() or "sendrecv"
        conn = self.connection_for(media)
        if conn is not None and conn.is_hold:
            direction = {"sendrecv": "sendonly", "recvonly": "inactive"}.get(direction, direction)
        return direction

    def serialize(self) -> str:
        """The SDP text, CRLF line ends, RFC 4566 §5 order."""
        lines = [f"v={self.version}", f"o={self.origin}", f"s={self.session_name}"]
        if self.info is not None:
            lines.append(f"i={self.info}")
        if self.uri is not None:
            lines.append(f"u={self.uri}")
        lines += [f"e={e}" for e in self.emails] + [f"p={p}" for p in self.phones]
        if self.connection is not None:
            lines.append(f"c={self.connection}")
        lines += [f"b={b}" for b in self.bandwidths]
        for timing in self.timings:
            lines.append(f"t={timing.start} {timing.stop}")
            lines += [f"r={r}" for r in timing.repeats]
        if self.timezones is not None:
            lines.append(f"z={self.timezones}")
        if self.key is not None:
            lines.append(f"k={self.key}")
        lines += [f"a={a}" for a in self.attributes] + [f"{t}={v}" for t, v in self.extra]
        for m in self.media:
            port = f"{m.port}/{m.port_count}" if m.port_count is not None else str(m.port)
            lines.append(" ".join([f"m={m.media}", port, m.proto, *m.formats]))
            if m.title is not None:
                lines.append(f"i={m.title}")
            lines += [f"c={c}" for c in m.connections] + [f"b={b}" for b in m.bandwidths]
            if m.key is not None:
                lines.append(f"k={m.key}")
            lines += [f"a={a}" for a in m.attributes] + [f"{t}={v}" for t, v in m.extra]
        return "\r\n".join(lines) + "\r\n"

    def to_bytes(self) -> bytes:
        """:meth:`serialize` encoded as UTF-8, ready for a SIP body."""
        return self.serialize().encode("utf-8")


def _int(text: str, what: str, high: int = _U64, low: int = 0) -> int:
    """A bounded ASCII-digit number of the SDP grammar, or :class:`SdpParseError`."""
    return bounded_int(text, what, high, low=low, error=SdpParseError)


def _connection(value: str) -> Connection:
    parts = value.split()
    if len(parts) != 3:
        raise SdpParseError(f"bad c= line: {value!r}")
    return Connection(parts[2], parts[1], parts[0])


def _bandwidth(value: str) -> Bandwidth:
    bwtype, colon, amount = value.partition(":")
    if not colon or not bwtype:
        raise SdpParseError(f"bad b= line: {value!r}")
    return Bandwidth(bwtype, _int(amount.strip(), "bandwidth"))


def _attribute(value: str) -> Attribute:
    name, colon, rest = value.partition(":")
    if not name:
        raise SdpParseError(f"bad a= line: {value!r}")
    return Attribute(name, rest if colon else None)


def _media(value: str) -> MediaDescription:
    parts = value.split()
    if len(parts) < 3:
        raise SdpParseError(f"bad m= line: {value!r}")
    port_text, slash, count = parts[1].partition("/")
    return MediaDescription(
        media=parts[0], port=_int(port_text, "media port", MAX_PORT), proto=parts[2], formats=parts[3:],
        port_count=_int(count, "port count", MAX_PORT, low=1) if slash else None,
    )


def parse_sdp(text: str | bytes) -> SessionDescription:
    """Parse an SDP body (bytes are decoded as UTF-8)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            raise SdpParseError(f"SDP is not UTF-8: {err}") from err
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or not lines[0].startswith("v="):
        raise SdpParseError("SDP must start with v=")
    sdp = SessionDescription(timings=[])
    media: MediaDescription | None = None
    seen_origin = False
    for line in lines:
        if len(line) < 2 or line[1] != "=" or not line[0].isalpha():
            raise SdpParseError(f"bad SDP line: {line!r}")
        kind, value = line[0], line[2:]
        if media is None:
            if kind == "v":
                sdp.version = _int(value.strip(), "version")
            elif kind == "o":
                parts = value.split()
                if len(parts) != 6:
                    raise SdpParseError(f"bad o= line: {value!r}")
                sdp.origin = Origin(parts[0], parts[1], _int(parts[2], "session version"), *parts[3:])
                seen_origin = True
            elif kind == "s":
                sdp.session_name = value
            elif kind == "i":
                sdp.info = value
            elif kind == "u":
                sdp.uri = value
            elif kind == "e":
                sdp.emails.append(value)
            elif kind == "p":
                sdp.phones.append(value)
            elif kind == "c":
                sdp.connection = _connection(value)
            elif kind == "b":
                sdp.bandwidths.append(_bandwidth(value))
            elif kind == "t":
                parts = value.split()
                if len(parts) != 2:
                    raise SdpParseError(f"bad t= line: {value!r}")
                sdp.timings.append(Timing(_int(parts[0], "start time"), _int(parts[1], "stop time")))
            elif kind == "r" and sdp.timings:
                sdp.timings[-1].repeats.append(value)
            elif kind == "z":
                sdp.timezones = value
            elif kind == "k":
                sdp.key = value
            elif kind == "a":
                sdp.attributes.append(_attribute(value))
            elif kind == "m":
                media = _media(value)
                sdp.media.append(media)
            else:
                sdp.extra.append((kind, value))
            continue
        if kind == "m":
            media = _media(value)
            sdp.media.append(media)
        elif kind == "i":
            media.title = value
        elif kind == "c":
            media.connections.append(_connection(value))
        elif kind == "b":
            media.bandwidths.append(_bandwidth(value))
        elif kind == "k":
            media.key = value
        elif kind == "a":
            media.attributes.append(_attribute(value))
        else:
            media.extra.append((kind, value))
    if not seen_origin:
        raise SdpParseError("SDP without o= line")
    if not sdp.timings:
        sdp.timings.append(Timing())  # t= is mandatory on output; RFC 4475 bodies sometimes omit it
    return sdp
