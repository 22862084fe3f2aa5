"""Tests for activecall.rtp.packet: RTP/RTCP/RFC 4733 wire formats."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from activecall.rtp.packet import (
    Bye,
    ReceiverReport,
    ReportBlock,
    RtpParseError,
    SdesChunk,
    SenderReport,
    SourceDescription,
    TelephoneEvent,
    UnknownRtcp,
    build_rtcp,
    build_rtp,
    build_rtp_into,
    is_rtcp,
    ntp_from_seconds,
    ntp_middle32,
    parse_rtcp,
    parse_rtp,
    parse_telephone_event,
    seq_diff,
    seq_lt,
    ts_diff,
)

# A PCMU packet: V=2, M=1, PT=0, seq 0x1234, ts 0xdecafbad, SSRC 0xcafebabe, 4-byte payload.
_PCMU = bytes.fromhex("8080 1234 decafbad cafebabe ffff7f7f".replace(" ", ""))
# V=2, P=1, X=1, CC=2, PT=96, two CSRCs, a one-word extension (profile 0xBEDE), payload "abc", 3 padding octets.
_FULL = bytes.fromhex(
    "b260 0001 00000064 11223344" "00000001 00000002" "bede0001 10ff0000" "616263" "000003"
)


class RtpParseTests(SynchronousTestCase):
    """parse_rtp reads every header field and validates lengths."""

    def test_simple_header(self) -> None:
        """A minimal packet yields its header fields and payload view."""
        h = parse_rtp(_PCMU)
        self.assertEqual(
            (h.version, h.padding, h.extension, h.csrc_count, h.marker, h.payload_type),
            (2, False, False, 0, True, 0),
        )
        self.assertEqual((h.sequence, h.timestamp, h.ssrc), (0x1234, 0xDECAFBAD, 0xCAFEBABE))
        self.assertEqual(bytes(h.payload), b"\xff\xff\x7f\x7f")
        self.assertEqual(h.extension_profile, -1)

    def test_csrc_extension_padding(self) -> None:
        """CSRCs, the header extension and padding are parsed and excluded from the payload."""
        h = parse_rtp(_FULL)
        self.assertTrue(h.padding)
        self.assertTrue(h.extension)
        self.assertEqual(h.csrcs, (1, 2))
        self.assertEqual(h.extension_profile, 0xBEDE)
        self.assertEqual(bytes(h.extension_data), bytes.fromhex("10ff0000"))
        self.assertEqual(bytes(h.payload), b"abc")
        self.assertEqual(h.payload_type, 96)
        self.assertFalse(h.marker)

    def test_payload_is_a_view_of_the_datagram(self) -> None:
        """The payload is a memoryview into the datagram, not a copy."""
        data = bytearray(_PCMU)
        h = parse_rtp(data)
        data[12] = 0x00
        self.assertEqual(h.payload[0], 0x00)
        self.assertIsInstance(h.payload, memoryview)

    def test_reuse_view(self) -> None:
        """A view passed as ``into`` is filled and returned."""
        view = parse_rtp(_PCMU)
        again = parse_rtp(_FULL, into=view)
        self.assertIs(again, view)
        self.assertEqual(view.sequence, 1)

    def test_bad_packets_rejected(self) -> None:
        """Short packets, wrong version, overrunning CSRC/extension and bad padding raise RtpParseError."""
        bad = {
            "short": _PCMU[:11],
            "version 1": bytes([0x40]) + _PCMU[1:],
            "version 3": bytes([0xC0]) + _PCMU[1:],
            "csrc overrun": bytes([0x8F]) + _PCMU[1:],
            "ext header overrun": bytes([0x90]) + _PCMU[1:12] + b"\xbe\xde",
            "ext body overrun": bytes([0x90]) + _PCMU[1:12] + b"\xbe\xde\x00\x05" + b"\x00" * 8,
            "padding zero": bytes([0xA0]) + _PCMU[1:-1] + b"\x00",
            "padding too long": bytes([0xA0]) + _PCMU[1:-1] + b"\x09",
        }
        for name, data in bad.items():
            with self.assertRaises(RtpParseError, msg=name):
                parse_rtp(data)
        self.assertTrue(issubclass(RtpParseError, ValueError))

    def test_padding_may_fill_the_whole_payload(self) -> None:
        """Padding that consumes the whole payload leaves an empty payload."""
        h = parse_rtp(bytes([0xA0]) + _PCMU[1:12] + b"\x00\x00\x00\x04")
        self.assertEqual(h.payload_length, 0)


class RtpBuildTests(SynchronousTestCase):
    """build_rtp_into writes the exact wire bytes into a preallocated buffer."""

    def test_golden_simple(self) -> None:
        """Building the PCMU fields reproduces the golden bytes."""
        self.assertEqual(build_rtp(0, 0x1234, 0xDECAFBAD, 0xCAFEBABE, b"\xff\xff\x7f\x7f", marker=True), _PCMU)

    def test_golden_full(self) -> None:
        """CSRCs, extension and padding serialize to the golden bytes."""
        out = build_rtp(
            96, 1, 100, 0x11223344, b"abc", csrcs=(1, 2),
            extension=(0xBEDE, bytes.fromhex("10ff0000")), padding=3,
        )
        self.assertEqual(out, _FULL)

    def test_into_offset_and_no_resize(self) -> None:
        """Packing at an offset leaves the rest alone and a too-small buffer raises without growing."""
        buf = bytearray(b"\xee" * 40)
        n = build_rtp_into(buf, 0, 0x1234, 0xDECAFBAD, 0xCAFEBABE, memoryview(b"\xff\xff\x7f\x7f"), marker=True, offset=2)
        self.assertEqual(n, 16)
        self.assertEqual(bytes(buf[2:18]), _PCMU)
        self.assertEqual(buf[:2] + buf[18:], b"\xee" * 24)
        small = bytearray(15)
        with self.assertRaises(ValueError):
            build_rtp_into(small, 0, 1, 1, 1, b"\x00" * 4)
        self.assertEqual(len(small), 15)

    def test_wraps_field_values(self) -> None:
        """Sequence and timestamp are masked to 16 and 32 bits."""
        h = parse_rtp(build_rtp(8, 65536 + 5, 2**32 + 7, 1, b""))
        self.assertEqual((h.sequence, h.timestamp), (5, 7))

    @given(
        pt=st.integers(0, 127),
        seq=st.integers(0, 0xFFFF),
        ts=st.integers(0, 0xFFFFFFFF),
        ssrc=st.integers(0, 0xFFFFFFFF),
        marker=st.booleans(),
        csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
        ext=st.one_of(st.none(), st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=12).map(lambda b: b + bytes(-len(b) % 4)))),
        payload=st.binary(max_size=200),
        padding=st.integers(0, 255),
    )
    def test_round_trip(self, pt: int, seq: int, ts: int, ssrc: int, marker: bool, csrcs: list[int],
                        ext: tuple[int, bytes] | None, payload: bytes, padding: int) -> None:
        """Any valid field combination survives build then parse."""
        data = build_rtp(pt, seq, ts, ssrc, payload, marker=marker, csrcs=tuple(csrcs), extension=ext, padding=padding)
        h = parse_rtp(data)
        self.assertEqual(
            (h.payload_type, h.sequence, h.timestamp, h.ssrc, h.marker, h.csrcs, bytes(h.payload)),
            (pt, seq, ts, ssrc, marker, tuple(csrcs), payload),
        )
        if ext is None:
            self.assertFalse(h.extension)
        else:
            self.assertEqual((h.extension_profile, bytes(h.extension_data)), ext)

    @given(st.binary(max_size=64))
    def test_garbage_never_crashes(self, data: bytes) -> None:
        """Random bytes either parse or raise RtpParseError, never another exception."""
        try:
            h = parse_rtp(data)
        except RtpParseError:
            return
        self.assertLessEqual(h.payload_offset + h.payload_length, len(data))


class ArithmeticTests(SynchronousTestCase):
    """Sequence and timestamp comparisons wrap correctly."""

    def test_seq_diff_wraps(self) -> None:
        """65535 -> 0 is one step forward, and the range is signed 16-bit."""
        self.assertEqual(seq_diff(0, 65535), 1)
        self.assertEqual(seq_diff(65535, 0), -1)
        self.assertEqual(seq_diff(10, 5), 5)
        self.assertEqual(seq_diff(0x8000, 0), -0x8000)
        self.assertTrue(seq_lt(65530, 3))
        self.assertFalse(seq_lt(3, 65530))
        self.assertFalse(seq_lt(7, 7))

    def test_ts_diff_wraps(self) -> None:
        """Timestamps wrap at 2**32."""
        self.assertEqual(ts_diff(80, 0xFFFFFFF0), 96)
        self.assertEqual(ts_diff(0xFFFFFFF0, 80), -96)
        self.assertEqual(ts_diff(160, 0), 160)


class DemuxTests(SynchronousTestCase):
    """is_rtcp applies the RFC 5761 rule."""

    def test_demux(self) -> None:
        """SR/RR/SDES/BYE are RTCP; audio payload types with or without marker are RTP."""
        for pt in (200, 201, 202, 203, 204, 205, 206, 207):
            self.assertTrue(is_rtcp(bytes([0x80, pt, 0, 1])), pt)
        for b1 in (0, 8, 9, 96, 101, 0x80, 0x80 | 101, 0x80 | 0x7F):
            self.assertFalse(is_rtcp(bytes([0x80, b1, 0, 1])), b1)
        self.assertFalse(is_rtcp(b"\x80"))


# An SR with one report block, then SDES CNAME "ab", then BYE with reason "x"; hand-assembled.
_COMPOUND = bytes.fromhex(
    "81c8000c" "11111111" "e3d4c2a380000000" "000003e8" "0000000a" "00000640"
    "22222222" "05fffffe" "0001ffff" "00000010" "a3800000" "00010000"
    "81ca0003" "11111111" "01026162" "00000000"
    "81cb0002" "11111111" "01780000"
)


class RtcpTests(SynchronousTestCase):
    """Compound RTCP parses and builds."""

    def _expected(self) -> list:
        block = ReportBlock(0x22222222, 5, -2, 0x1FFFF, 16, 0xA3800000, 0x10000)
        return [
            SenderReport(0x11111111, 0xE3D4C2A380000000, 1000, 10, 1600, (block,)),
            SourceDescription((SdesChunk(0x11111111, ((1, b"ab"),)),)),
            Bye((0x11111111,), b"x"),
        ]

    def test_parse_golden_compound(self) -> None:
        """The golden compound packet yields SR (with a negative cumulative loss), SDES and BYE."""
        packets = parse_rtcp(_COMPOUND)
        self.assertEqual(packets, self._expected())
        self.assertEqual(packets[1].chunks[0].cname, b"ab")

    def test_build_golden_compound(self) -> None:
        """Building the same objects reproduces the golden bytes."""
        self.assertEqual(build_rtcp(self._expected()), _COMPOUND)

    def test_round_trip_other_packets(self) -> None:
        """RR, multi-item SDES, empty-reason BYE and unknown types round-trip."""
        packets = [
            ReceiverReport(7, (ReportBlock(8, 255, 0x7FFFFF, 70000, 12, 0, 0), ReportBlock(9, 0, -0x800000, 1, 2, 3, 4))),
            ReceiverReport(7),
            SourceDescription((SdesChunk(7, ((1, b"user@host"), (2, b"Name"))), SdesChunk(8, ((1, b"abc"),)))),
            Bye((7, 8)),
            UnknownRtcp(205, 1, b"\x00\x00\x00\x07\x00\x00\x00\x08"),
        ]
        data = build_rtcp(packets)
        self.assertEqual(len(data) % 4, 0)
        self.assertEqual(parse_rtcp(data), packets)

    def test_bad_rtcp_rejected(self) -> None:
        """Wrong version, overrunning length, trailing bytes and truncated SDES raise RtpParseError."""
        for name, data in {
            "version": b"\x41" + _COMPOUND[1:],
            "length": _COMPOUND[:-4],
            "trailing": _COMPOUND + b"\x80",
            "sdes": bytes.fromhex("81ca0001 11111111".replace(" ", "")),
            "short": b"\x80\xc9",
            "rr blocks": bytes.fromhex("81c90001 11111111".replace(" ", "")),
        }.items():
            with self.assertRaises(RtpParseError, msg=name):
                parse_rtcp(data)

    def test_ntp(self) -> None:
        """Unix seconds convert to NTP with the 1900 epoch and a 32-bit fraction."""
        ntp = ntp_from_seconds(1.5)
        self.assertEqual(ntp >> 32, 2208988801)
        self.assertEqual(ntp & 0xFFFFFFFF, 0x80000000)
        self.assertEqual(ntp_middle32(0x0123456789ABCDEF), 0x456789AB)


class TelephoneEventTests(SynchronousTestCase):
    """RFC 4733 payloads parse and build."""

    def test_golden(self) -> None:
        """Digit 5, end bit, volume 10, duration 800 is 05 8a 03 20."""
        ev = TelephoneEvent(5, True, 10, 800)
        self.assertEqual(ev.encode(), bytes.fromhex("058a0320"))
        self.assertEqual(parse_telephone_event(bytes.fromhex("058a0320")), ev)
        self.assertEqual(parse_telephone_event(bytes.fromhex("0b0a00a0")), TelephoneEvent(11, False, 10, 160))

    def test_reserved_bit_ignored_and_short_rejected(self) -> None:
        """The R bit is ignored; fewer than 4 bytes raise RtpParseError."""
        self.assertEqual(parse_telephone_event(bytes.fromhex("01c00000")), TelephoneEvent(1, True, 0, 0))
        with self.assertRaises(RtpParseError):
            parse_telephone_event(b"\x01\x02\x03")

    def test_out_of_range(self) -> None:
        """Out-of-range fields raise ValueError when encoding."""
        with self.assertRaises(ValueError):
            TelephoneEvent(1, False, 64, 0).encode()
        with self.assertRaises(ValueError):
            TelephoneEvent(1, False, 0, 0x10000).encode()
