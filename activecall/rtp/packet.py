"""RTP/RTCP (RFC 3550) and RFC 4733 telephone-event wire formats.

Pure: bytes in, small objects out, and back.  The RTP path is the hot one
(50 packets/s per stream), so it parses with precompiled ``struct.Struct``
objects straight from the datagram, keeps the payload as offsets (a
``memoryview`` on demand) and builds into a caller-owned ``bytearray``.
RTCP is a few packets every few seconds and uses plain frozen dataclasses.

Sequence numbers wrap at 2**16 and timestamps at 2**32: compare them only
through :func:`seq_diff`, :func:`seq_lt` and :func:`ts_diff`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Union

__all__ = [
    "RTP_HEADER",
    "RTP_VERSION",
    "RtpParseError",
    "RtpHeaderView",
    "parse_rtp",
    "build_rtp_into",
    "build_rtp",
    "is_rtcp",
    "seq_diff",
    "seq_lt",
    "ts_diff",
    "ReportBlock",
    "SenderReport",
    "ReceiverReport",
    "SdesChunk",
    "SourceDescription",
    "Bye",
    "UnknownRtcp",
    "RtcpPacket",
    "parse_rtcp",
    "build_rtcp",
    "ntp_from_seconds",
    "ntp_middle32",
    "RTCP_SR",
    "RTCP_RR",
    "RTCP_SDES",
    "RTCP_BYE",
    "RTCP_APP",
    "SDES_CNAME",
    "TelephoneEvent",
    "parse_telephone_event",
    "build_telephone_event_into",
]

RTP_VERSION = 2

#: V/P/X/CC, M/PT, sequence, timestamp, SSRC.
RTP_HEADER = struct.Struct("!BBHII")
_U32 = struct.Struct("!I")
_EXT_HEADER = struct.Struct("!HH")
_RTCP_HEADER = struct.Struct("!BBHI")  # V/P/count, PT, length in words - 1, SSRC
_SR_INFO = struct.Struct("!QIII")  # NTP, RTP ts, packet count, octet count
_REPORT_BLOCK = struct.Struct("!IIIIII")  # SSRC, fraction|cumulative, ext seq, jitter, LSR, DLSR
_TEL_EVENT = struct.Struct("!BBH")

RTCP_SR = 200
RTCP_RR = 201
RTCP_SDES = 202
RTCP_BYE = 203
RTCP_APP = 204
SDES_CNAME = 1

_NO_CSRCS: tuple[int, ...] = ()
# Seconds from the NTP epoch (1900) to the Unix epoch (1970).
_NTP_UNIX_OFFSET = 2208988800


class RtpParseError(ValueError):
    """A datagram is not a well-formed RTP/RTCP packet (or RFC 4733 payload)."""


# ---------------------------------------------------------------------------
# sequence / timestamp arithmetic


def seq_diff(a: int, b: int) -> int:
    """Return ``a - b`` for 16-bit sequence numbers, in ``[-32768, 32767]``."""
    return ((a - b + 0x8000) & 0xFFFF) - 0x8000


def seq_lt(a: int, b: int) -> bool:
    """Return whether sequence number ``a`` comes before ``b`` (16-bit wrap)."""
    return seq_diff(a, b) < 0


def ts_diff(a: int, b: int) -> int:
    """Return ``a - b`` for 32-bit RTP timestamps, in ``[-2**31, 2**31 - 1]``."""
    return ((a - b + 0x80000000) & 0xFFFFFFFF) - 0x80000000


# ---------------------------------------------------------------------------
# RTP


class RtpHeaderView:
    """The parsed fixed header of one RTP packet, referring into its datagram.

    The payload and extension data are not copied: :attr:`payload` is a
    ``memoryview`` of the original datagram.  One instance can be reused for
    every packet of a stream with ``parse_rtp(data, into=view)``.
    """

    __slots__ = (
        "data",
        "padding",
        "extension",
        "csrc_count",
        "marker",
        "payload_type",
        "sequence",
        "timestamp",
        "ssrc",
        "csrcs",
        "extension_profile",
        "extension_offset",
        "extension_length",
        "payload_offset",
        "payload_length",
    )

    data: bytes | bytearray | memoryview
    padding: bool
    extension: bool
    csrc_count: int
    marker: bool
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    csrcs: tuple[int, ...]
    extension_profile: int
    extension_offset: int
    extension_length: int
    payload_offset: int
    payload_length: int

    @property
    def version(self) -> int:
        """Always 2: anything else fails to parse."""
        return RTP_VERSION

    @property
    def payload(self) -> memoryview:
        """The payload (without padding) as a view of the datagram."""
        off = self.payload_offset
        return memoryview(self.data)[off : off + self.payload_length]

    @property
    def extension_data(self) -> memoryview:
        """The header extension body (after profile/length), empty if absent."""
        off = self.extension_offset
        return memoryview(self.data)[off : off + self.extension_length]

    def __repr__(self) -> str:
        return (
            f"RtpHeaderView(pt={self.payload_type}, seq={self.sequence}, ts={self.timestamp}, "
            f"ssrc={self.ssrc:#010x}, m={int(self.marker)}, payload={self.payload_length}B)"
        )


def parse_rtp(data: bytes | bytearray | memoryview, into: RtpHeaderView | None = None) -> RtpHeaderView:
    """Parse and validate an RTP packet; raise :class:`RtpParseError` if it is bad.

    Checks version 2, that CSRCs and the header extension fit, and that the
    padding count is at least 1 and fits in what follows the header.  If it
    raises, a reused ``into`` view holds unspecified values.
    """
    size = len(data)
    if size < 12:
        raise RtpParseError("RTP packet shorter than 12 bytes")
    b0, b1, seq, ts, ssrc = RTP_HEADER.unpack_from(data)
    if b0 >> 6 != RTP_VERSION:
        raise RtpParseError("RTP version is not 2")
    cc = b0 & 0x0F
    off = 12 + 4 * cc
    if off > size:
        raise RtpParseError("CSRC list runs past the packet")
    view = RtpHeaderView() if into is None else into
    if cc:
        view.csrcs = struct.unpack_from("!%dI" % cc, data, 12)
    else:
        view.csrcs = _NO_CSRCS
    if b0 & 0x10:
        if off + 4 > size:
            raise RtpParseError("header extension runs past the packet")
        profile, words = _EXT_HEADER.unpack_from(data, off)
        view.extension_profile = profile
        view.extension_offset = off + 4
        view.extension_length = 4 * words
        off += 4 + 4 * words
        if off > size:
            raise RtpParseError("header extension runs past the packet")
    else:
        view.extension_profile = -1
        view.extension_offset = off
        view.extension_length = 0
    end = size
    if b0 & 0x20:
        pad = data[size - 1]
        # The count includes itself, so 0 is invalid.
        if pad == 0 or off + pad > size:
            raise RtpParseError("bad RTP padding count")
        end -= pad
    view.data = data
    view.padding = bool(b0 & 0x20)
    view.extension = bool(b0 & 0x10)
    view.csrc_count = cc
    view.marker = bool(b1 & 0x80)
    view.payload_type = b1 & 0x7F
    view.sequence = seq
    view.timestamp = ts
    view.ssrc = ssrc
    view.payload_offset = off
    view.payload_length = end - off
    return view


def build_rtp_into(
    buf: bytearray,
    payload_type: int,
    sequence: int,
    timestamp: int,
    ssrc: int,
    payload: bytes | bytearray | memoryview,
    *,
    marker: bool = False,
    csrcs: tuple[int, ...] = (),
    extension: tuple[int, bytes] | None = None,
    padding: int = 0,
    offset: int = 0,
) -> int:
    """Pack an RTP packet into ``buf`` at ``offset`` and return its length.

    ``extension`` is ``(profile, data)`` with ``len(data)`` a multiple of 4;
    ``padding`` is the number of padding octets to append (0 or 1..255).
    Raises ``ValueError`` if ``buf`` is too small or an argument is out of
    range; ``buf`` is never resized.
    """
    cc = len(csrcs)
    if cc > 15:
        raise ValueError("at most 15 CSRCs")
    if not 0 <= payload_type <= 127:
        raise ValueError("payload type out of range")
    if not 0 <= padding <= 255:
        raise ValueError("padding out of range")
    plen = len(payload)
    ext_len = 0
    if extension is not None:
        ext_len = len(extension[1])
        if ext_len % 4:
            raise ValueError("extension data must be a multiple of 4 bytes")
        ext_len += 4
    total = 12 + 4 * cc + ext_len + plen + padding
    if offset + total > len(buf):
        raise ValueError("buffer too small for RTP packet")
    b0 = 0x80 | (0x20 if padding else 0) | (0x10 if extension is not None else 0) | cc
    RTP_HEADER.pack_into(
        buf,
        offset,
        b0,
        (0x80 if marker else 0) | payload_type,
        sequence & 0xFFFF,
        timestamp & 0xFFFFFFFF,
        ssrc & 0xFFFFFFFF,
    )
    pos = offset + 12
    for csrc in csrcs:
        _U32.pack_into(buf, pos, csrc)
        pos += 4
    if extension is not None:
        profile, ext_data = extension
        _EXT_HEADER.pack_into(buf, pos, profile, (ext_len - 4) // 4)
        pos += 4
        buf[pos : pos + ext_len - 4] = ext_data
        pos += ext_len - 4
    buf[pos : pos + plen] = payload
    pos += plen
    if padding:
        buf[pos : pos + padding - 1] = bytes(padding - 1)
        buf[pos + padding - 1] = padding
        pos += padding
    return pos - offset


def build_rtp(
    payload_type: int,
    sequence: int,
    timestamp: int,
    ssrc: int,
    payload: bytes | bytearray | memoryview,
    *,
    marker: bool = False,
    csrcs: tuple[int, ...] = (),
    extension: tuple[int, bytes] | None = None,
    padding: int = 0,
) -> bytes:
    """Return one RTP packet as ``bytes`` (convenience for tests and rare paths)."""
    ext = 0 if extension is None else 4 + len(extension[1])
    buf = bytearray(12 + 4 * len(csrcs) + ext + len(payload) + padding)
    n = build_rtp_into(
        buf, payload_type, sequence, timestamp, ssrc, payload,
        marker=marker, csrcs=csrcs, extension=extension, padding=padding,
    )
    return bytes(buf[:n])


def is_rtcp(data: bytes | bytearray | memoryview) -> bool:
    """Demultiplex rtcp-mux (RFC 5761 §4): RTCP iff the second octet is 192..223."""
    return len(data) >= 2 and 192 <= data[1] <= 223


# ---------------------------------------------------------------------------
# RTCP


def ntp_from_seconds(now: float) -> int:
    """Convert Unix-epoch seconds (the injected clock) to a 64-bit NTP timestamp."""
    secs = int(now)
    frac = int((now - secs) * 4294967296.0) & 0xFFFFFFFF
    return ((secs + _NTP_UNIX_OFFSET) & 0xFFFFFFFF) << 32 | frac


def ntp_middle32(ntp: int) -> int:
    """The middle 32 bits of an NTP timestamp, as used by LSR (RFC 3550 §6.4.1)."""
    return (ntp >> 16) & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class ReportBlock:
    """One reception report (RFC 3550 §6.4.1); ``cumulative_lost`` is signed 24-bit."""

    ssrc: int
    fraction_lost: int
    cumulative_lost: int
    highest_seq: int
    jitter: int
    lsr: int
    dlsr: int

    def encode(self) -> bytes:
        """The 24-byte wire form."""
        lost = max(-0x800000, min(0x7FFFFF, self.cumulative_lost)) & 0xFFFFFF
        return _REPORT_BLOCK.pack(
            self.ssrc, (self.fraction_lost & 0xFF) << 24 | lost,
            self.highest_seq & 0xFFFFFFFF, self.jitter & 0xFFFFFFFF,
            self.lsr & 0xFFFFFFFF, self.dlsr & 0xFFFFFFFF,
        )


@dataclass(frozen=True, slots=True)
class SenderReport:
    """RTCP SR: sender info plus reception reports."""

    ssrc: int
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: tuple[ReportBlock, ...] = ()

    def encode(self) -> bytes:
        """The wire form (header included)."""
        body = _SR_INFO.pack(
            self.ntp_timestamp & 0xFFFFFFFFFFFFFFFF, self.rtp_timestamp & 0xFFFFFFFF,
            self.packet_count & 0xFFFFFFFF, self.octet_count & 0xFFFFFFFF,
        ) + b"".join(r.encode() for r in self.reports)
        return _rtcp_packet(RTCP_SR, len(self.reports), self.ssrc, body)


@dataclass(frozen=True, slots=True)
class ReceiverReport:
    """RTCP RR: reception reports from a participant that did not send."""

    ssrc: int
    reports: tuple[ReportBlock, ...] = ()

    def encode(self) -> bytes:
        """The wire form (header included)."""
        return _rtcp_packet(RTCP_RR, len(self.reports), self.ssrc, b"".join(r.encode() for r in self.reports))


@dataclass(frozen=True, slots=True)
class SdesChunk:
    """The SDES items of one source: ``((item_type, value), ...)``."""

    ssrc: int
    items: tuple[tuple[int, bytes], ...]

    @property
    def cname(self) -> bytes | None:
        """The CNAME item, if present."""
        for kind, value in self.items:
            if kind == SDES_CNAME:
                return value
        return None

    def encode(self) -> bytes:
        """The chunk with its null terminator, padded to 32 bits."""
        out = bytearray(_U32.pack(self.ssrc))
        for kind, value in self.items:
            if len(value) > 255:
                raise ValueError("SDES item longer than 255 octets")
            out += bytes((kind, len(value))) + value
        # At least one null octet ends the list, then pad to a word boundary.
        out += b"\x00" * (4 - len(out) % 4)
        return bytes(out)


@dataclass(frozen=True, slots=True)
class SourceDescription:
    """RTCP SDES packet (RFC 3550 §6.5)."""

    chunks: tuple[SdesChunk, ...]

    def encode(self) -> bytes:
        """The wire form (header included)."""
        body = b"".join(c.encode() for c in self.chunks)
        return _rtcp_header(RTCP_SDES, len(self.chunks), len(body)) + body


@dataclass(frozen=True, slots=True)
class Bye:
    """RTCP BYE (RFC 3550 §6.6) with an optional reason."""

    sources: tuple[int, ...]
    reason: bytes = b""

    def encode(self) -> bytes:
        """The wire form (header included)."""
        body = b"".join(_U32.pack(s) for s in self.sources)
        if self.reason:
            reason = self.reason[:255]
            body += bytes((len(reason),)) + reason
            body += b"\x00" * (-len(body) % 4)
        return _rtcp_header(RTCP_BYE, len(self.sources), len(body)) + body


@dataclass(frozen=True, slots=True)
class UnknownRtcp:
    """Any other RTCP packet (APP, XR, feedback...), kept as raw body bytes."""

    packet_type: int
    count: int
    body: bytes

    def encode(self) -> bytes:
        """The wire form (header included)."""
        return _rtcp_header(self.packet_type, self.count, len(self.body)) + self.body


RtcpPacket = Union[SenderReport, ReceiverReport, SourceDescription, Bye, UnknownRtcp]


def _rtcp_header(packet_type: int, count: int, body_len: int) -> bytes:
    if count > 31:
        raise ValueError("RTCP count field holds at most 31")
    if body_len % 4:
        raise ValueError("RTCP body must be a multiple of 4 bytes")
    return struct.pack("!BBH", 0x80 | count, packet_type, body_len // 4)


def _rtcp_packet(packet_type: int, count: int, ssrc: int, body: bytes) -> bytes:
    return _RTCP_HEADER.pack(0x80 | count, packet_type, (len(body) + 4) // 4, ssrc) + body


def build_rtcp(packets: list[RtcpPacket] | tuple[RtcpPacket, ...]) -> bytes:
    """Concatenate packets into one compound RTCP datagram."""
    return b"".join(p.encode() for p in packets)


def _parse_report_blocks(data: bytes, off: int, count: int, end: int) -> tuple[ReportBlock, ...]:
    if off + 24 * count > end:
        raise RtpParseError("RTCP report blocks run past the packet")
    blocks = []
    for _ in range(count):
        ssrc, lost_word, highest, jitter, lsr, dlsr = _REPORT_BLOCK.unpack_from(data, off)
        lost = lost_word & 0xFFFFFF
        if lost & 0x800000:
            lost -= 0x1000000
        blocks.append(ReportBlock(ssrc, lost_word >> 24, lost, highest, jitter, lsr, dlsr))
        off += 24
    return tuple(blocks)


def _parse_sdes(data: bytes, off: int, count: int, end: int) -> SourceDescription:
    chunks = []
    for _ in range(count):
        if off + 4 > end:
            raise RtpParseError("SDES chunk runs past the packet")
        (ssrc,) = _U32.unpack_from(data, off)
        off += 4
        items = []
        while True:
            if off >= end:
                raise RtpParseError("SDES item list not terminated")
            kind = data[off]
            if kind == 0:
                # Skip the terminator and the padding to the next word.
                off = (off + 4) & ~3
                break
            if off + 2 > end or off + 2 + data[off + 1] > end:
                raise RtpParseError("SDES item runs past the packet")
            length = data[off + 1]
            items.append((kind, bytes(data[off + 2 : off + 2 + length])))
            off += 2 + length
        chunks.append(SdesChunk(ssrc, tuple(items)))
    return SourceDescription(tuple(chunks))


def parse_rtcp(data: bytes | bytearray | memoryview) -> list[RtcpPacket]:
    """Parse a compound RTCP datagram; raise :class:`RtpParseError` if it is bad.

    Every packet must be version 2, have a length that fits, and the lengths
    must add up to the datagram exactly (RFC 3550 A.2).
    """
    data = bytes(data)
    size = len(data)
    if size < 4:
        raise RtpParseError("RTCP packet shorter than 4 bytes")
    packets: list[RtcpPacket] = []
    off = 0
    while off < size:
        if off + 4 > size:
            raise RtpParseError("truncated RTCP header")
        b0, pt, words = struct.unpack_from("!BBH", data, off)
        if b0 >> 6 != RTP_VERSION:
            raise RtpParseError("RTCP version is not 2")
        end = off + 4 + 4 * words
        if end > size:
            raise RtpParseError("RTCP length runs past the datagram")
        count = b0 & 0x1F
        body_end = end
        if b0 & 0x20:
            pad = data[end - 1]
            if pad == 0 or off + 4 + pad > end:
                raise RtpParseError("bad RTCP padding count")
            body_end -= pad
        body_off = off + 4
        if pt in (RTCP_SR, RTCP_RR):
            if body_off + 4 > body_end:
                raise RtpParseError("RTCP report without SSRC")
            (ssrc,) = _U32.unpack_from(data, body_off)
            body_off += 4
            if pt == RTCP_SR:
                if body_off + 20 > body_end:
                    raise RtpParseError("SR sender info runs past the packet")
                ntp, rtp_ts, pkts, octets = _SR_INFO.unpack_from(data, body_off)
                blocks = _parse_report_blocks(data, body_off + 20, count, body_end)
                packets.append(SenderReport(ssrc, ntp, rtp_ts, pkts, octets, blocks))
            else:
                packets.append(ReceiverReport(ssrc, _parse_report_blocks(data, body_off, count, body_end)))
        elif pt == RTCP_SDES:
            packets.append(_parse_sdes(data, body_off, count, body_end))
        elif pt == RTCP_BYE:
            if body_off + 4 * count > body_end:
                raise RtpParseError("BYE source list runs past the packet")
            sources = struct.unpack_from("!%dI" % count, data, body_off)
            pos = body_off + 4 * count
            reason = b""
            if pos < body_end:
                rlen = data[pos]
                if pos + 1 + rlen > body_end:
                    raise RtpParseError("BYE reason runs past the packet")
                reason = data[pos + 1 : pos + 1 + rlen]
            packets.append(Bye(tuple(sources), reason))
        else:
            packets.append(UnknownRtcp(pt, count, data[body_off:body_end]))
        off = end
    return packets


# ---------------------------------------------------------------------------
# RFC 4733 telephone-event


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    """One RFC 4733 event payload: event code, end bit, volume (0..63 = -dBm0), duration."""

    event: int
    end: bool
    volume: int
    duration: int

    def encode(self) -> bytes:
        """The 4-byte payload."""
        buf = bytearray(4)
        build_telephone_event_into(buf, 0, self)
        return bytes(buf)


def parse_telephone_event(payload: bytes | bytearray | memoryview) -> TelephoneEvent:
    """Parse the first event of an RFC 4733 payload (any further blocks are redundancy)."""
    if len(payload) < 4:
        raise RtpParseError("telephone-event payload shorter than 4 bytes")
    event, flags, duration = _TEL_EVENT.unpack_from(payload)
    return TelephoneEvent(event, bool(flags & 0x80), flags & 0x3F, duration)


def build_telephone_event_into(buf: bytearray, offset: int, event: TelephoneEvent) -> int:
    """Pack ``event`` into ``buf`` at ``offset``; return 4 (bytes written)."""
    if not 0 <= event.event <= 255 or not 0 <= event.volume <= 63 or not 0 <= event.duration <= 0xFFFF:
        raise ValueError("telephone-event field out of range")
    _TEL_EVENT.pack_into(buf, offset, event.event, (0x80 if event.end else 0) | event.volume, event.duration)
    return 4
