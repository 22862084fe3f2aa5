"""Hardening: SIP numbers are bounded ASCII digits and a host-name Via never crashes the UDP adapter.

Issue items 1 and 8: Content-Length, Max-Forwards, CSeq, rport and the SIP
version are checked before ``int()`` (Python refuses to convert more than
4,300 digits with a plain ``ValueError``; ``str.isdigit()`` accepts ``'\u0663'``
and ``'\u00b2'``), and a request that needs a 400 is answered at the packet's
source address when its Via sent-by is a host name (RFC 3261 §18.2.2 with the
``received`` the server would stamp).
"""

from __future__ import annotations

import random
import time
from typing import Any

from twisted.internet import abstract
from twisted.internet.error import InvalidAddressError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from activecall.ids import IdSource
from activecall.sip.framing import FramingError, StreamFramer
from activecall.sip.message import (
    Headers,
    SipParseError,
    SipRequest,
    SipResponse,
    Via,
    parse_cseq,
    parse_message,
    parse_via,
)
from activecall.sip.transaction import TransactionLayer, Transmit, response_address
from activecall.sip.transport import SipDatagramProtocol, SipStack
from activecall.sip.uri import parse_uri
from activecall.testing_sip import MemoryDatagramTransport

HUGE = "9" * 5000  # past int()'s 4,300-digit limit
UNICODE_DIGITS = ("\u0663", "\u00b2", "\uff11", "1\u0660")


def _options(*, cl: str = "0", mf: str = "70", cseq: str = "1 OPTIONS",
             via: str = "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK1", version: str = "SIP/2.0") -> bytes:
    return (
        f"OPTIONS sip:agent@192.0.2.1 {version}\r\nVia: {via}\r\nFrom: <sip:a@example.com>;tag=f\r\n"
        f"To: <sip:agent@192.0.2.1>\r\nCall-ID: c1\r\nCSeq: {cseq}\r\nMax-Forwards: {mf}\r\n"
        f"Content-Length: {cl}\r\n\r\n"
    ).encode("utf-8")


def _request(**headers: str) -> SipRequest:
    """A request built in code (no parse) so the accessors see the raw values."""
    return SipRequest("OPTIONS", parse_uri("sip:a@192.0.2.1"), Headers(headers.items()))


class NumberBoundTests(SynchronousTestCase):
    """Header numbers: ASCII digits only, a bounded length before int(), a bounded value."""

    def test_content_length_accessor_bounded(self) -> None:
        """Content-Length of 5000 digits, or over 2^31 - 1, is a SipParseError, not a ValueError."""
        for value in (HUGE, str(2**31), *UNICODE_DIGITS):
            with self.assertRaises(SipParseError, msg=value[:20]):
                _request(**{"Content-Length": value}).content_length
        self.assertEqual(_request(**{"Content-Length": "000012"}).content_length, 12)
        self.assertEqual(_request(**{"Content-Length": str(2**31 - 1)}).content_length, 2**31 - 1)

    def test_max_forwards_accessor_bounded(self) -> None:
        """Max-Forwards of 5000 digits is a SipParseError; 0..255 (leading zeros allowed) parse."""
        for value in (HUGE, "256", "-1", *UNICODE_DIGITS):
            with self.assertRaises(SipParseError, msg=value[:20]):
                _request(**{"Max-Forwards": value}).max_forwards
        self.assertEqual(_request(**{"Max-Forwards": "0070"}).max_forwards, 70)
        self.assertEqual(_request(**{"Max-Forwards": "255"}).max_forwards, 255)

    def test_cseq_bounded(self) -> None:
        """A CSeq number of 5000 digits is a SipParseError (was a bare ValueError from int())."""
        for value in (HUGE + " INVITE", "4294967296 INVITE", "\u0663 INVITE", "\u00b2 INVITE"):
            with self.assertRaises(SipParseError, msg=value[:20]):
                parse_cseq(value)
        self.assertEqual(parse_cseq("4294967295 INVITE").seq, 2**32 - 1)

    def test_rport_bounded(self) -> None:
        """An rport value must be a port: 65536, 0 and 5000 digits are refused by parse_via."""
        for value in ("65536", "0", HUGE, "99999999999"):
            with self.assertRaises(SipParseError, msg=value[:20]):
                parse_via(f"SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1;rport={value}")
        (via,) = parse_via("SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1;rport=65535")
        self.assertEqual(via.rport, 65535)
        # A Via built in code with a bogus rport reads as "no port", never as 99999999.
        self.assertIsNone(Via("UDP", "192.0.2.1", None, [("rport", "99999999")]).rport)
        self.assertIsNone(Via("UDP", "192.0.2.1", None, [("rport", "\u00b2")]).rport)

    def test_huge_numbers_in_whole_messages(self) -> None:
        """Whole messages with 5000-digit numbers raise SipParseError and still get a 400 built."""
        for data in (_options(cl=HUGE), _options(mf=HUGE), _options(cseq=HUGE + " OPTIONS"),
                     _options(via=f"SIP/2.0/UDP 192.0.2.10:{HUGE};branch=z9hG4bK1")):
            with self.assertRaises(SipParseError) as ctx:
                parse_message(data)
            self.assertEqual(ctx.exception.status, 400)
            self.assertIsInstance(ctx.exception.partial, SipRequest)

    def test_huge_sip_version_is_505(self) -> None:
        """``SIP/<5000 digits>.0`` is an unsupported version (505), not a 400 from int()'s limit."""
        with self.assertRaises(SipParseError) as ctx:
            parse_message(_options(version="SIP/" + HUGE + ".0"))
        self.assertEqual(ctx.exception.status, 505)
        self.assertIsInstance(parse_message(_options(version="SIP/02.00")), SipRequest)
        with self.assertRaises(SipParseError):
            parse_message(_options(version="SIP/\u0662.\u0660"))

    def test_response_status_ascii(self) -> None:
        """A status code of Unicode digits is a bad status line."""
        data = _options().replace(b"OPTIONS sip:agent@192.0.2.1 SIP/2.0", "SIP/2.0 \u0662\u0660\u0660 OK".encode())
        with self.assertRaises(SipParseError):
            parse_message(data)


class FramingBoundTests(SynchronousTestCase):
    """The stream framer bounds Content-Length before int()."""

    def test_huge_content_length_is_framing_error(self) -> None:
        """A 5000-digit Content-Length on a stream is a FramingError (was a bare ValueError)."""
        framer = StreamFramer()
        with self.assertRaises(FramingError):
            framer.feed(_options(cl=HUGE))
        with self.assertRaises(FramingError):
            framer.feed(b"more")  # the stream stays failed

    def test_unicode_content_length_is_framing_error(self) -> None:
        """Content-Length in Arabic-Indic digits cannot delimit a stream."""
        for value in UNICODE_DIGITS:
            with self.assertRaises(FramingError):
                StreamFramer().feed(_options(cl=value))

    def test_head_fed_byte_by_byte_is_linear(self) -> None:
        """A 150 KB head arriving one byte per read is scanned once, not once per byte (slowloris CPU)."""
        framer = StreamFramer(max_head_bytes=200_000)
        data = b"INVITE sip:a@192.0.2.1 SIP/2.0\r\nX-Pad: " + b"a" * 150_000
        started = time.perf_counter()
        for i in range(len(data)):
            framer.feed(data[i:i + 1])
        self.assertLess(time.perf_counter() - started, 2.0)  # quadratic rescans took ~6 s
        frames = framer.feed(b"\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(len(frames), 1)
        self.assertTrue(frames[0].endswith(b"\r\n\r\nok"))

    def test_split_terminator_found(self) -> None:
        """The empty line split across reads, after keep-alives, still ends the head."""
        framer = StreamFramer()
        data = b"\r\n\r\n" + _options(cl="0")
        out = []
        for i in range(len(data)):
            out += framer.feed(data[i:i + 1])
        self.assertEqual(len(out), 2)

    def test_over_max_body_is_framing_error(self) -> None:
        """A 20-digit Content-Length is refused as too large."""
        with self.assertRaises(FramingError):
            StreamFramer().feed(_options(cl="9" * 20))
        self.assertEqual(len(StreamFramer().feed(_options(cl="0000"))), 1)


class TwistedLikeUdpTransport(MemoryDatagramTransport):
    """Refuses host names like ``twisted.internet.udp.Port.write`` (an IPv4 port)."""

    def write(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        assert addr is not None
        if not abstract.isIPAddress(addr[0]):
            raise InvalidAddressError(addr[0], "write() only accepts IP addresses, not hostnames")
        if not 0 <= addr[1] <= 65535:
            raise OverflowError("getsockaddrarg: port must be 0-65535.")
        super().write(data, addr)


def _stack() -> tuple[SipStack, SipDatagramProtocol, TwistedLikeUdpTransport]:
    stack = SipStack(Clock(), IdSource(random.Random(7)), shards=4)
    proto = SipDatagramProtocol(stack)
    transport = TwistedLikeUdpTransport(("192.0.2.1", 5060))
    proto.makeConnection(transport)  # type: ignore[arg-type]
    stack.add_listener("udp", "192.0.2.1", 5060, proto)
    return stack, proto, transport


class HostnameViaTests(SynchronousTestCase):
    """A 400 for a request whose Via sent-by is a host name goes to the packet's source."""

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def _errors(self) -> list[Any]:
        return [e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]

    def _status(self, data: bytes) -> int:
        msg = parse_message(data)
        assert isinstance(msg, SipResponse)
        return msg.status

    def test_fifteen_byte_reproducer(self) -> None:
        """``X\\nv:a/b/c h\\n\\n`` gets a 400 at its source address and logs no traceback."""
        stack, proto, transport = _stack()
        proto.datagramReceived(b"X\nv:a/b/c h\n\n", ("203.0.113.7", 5060))
        self.assertEqual(self._errors(), [])
        self.assertEqual(len(transport.written), 1)
        data, addr = transport.written[0]
        self.assertEqual(addr, ("203.0.113.7", 5060))
        self.assertTrue(data.startswith(b"SIP/2.0 400 "), data)

    def test_hostname_via_without_rport(self) -> None:
        """Without rport the 400 goes to the source IP and the sent-by port (§18.2.2 with received)."""
        stack, proto, transport = _stack()
        data = _options(mf="abc", via="SIP/2.0/UDP phone.example.com:5070;branch=z9hG4bK7")
        proto.datagramReceived(data, ("203.0.113.7", 40001))
        self.assertEqual(self._errors(), [])
        self.assertEqual([a for _, a in transport.written], [("203.0.113.7", 5070)])
        self.assertEqual(self._status(transport.written[0][0]), 400)

    def test_hostname_via_with_rport(self) -> None:
        """With rport the 400 goes back to the source IP and port (RFC 3581)."""
        stack, proto, transport = _stack()
        data = _options(mf="abc", via="SIP/2.0/UDP phone.example.com:5070;branch=z9hG4bK7;rport")
        proto.datagramReceived(data, ("203.0.113.7", 40001))
        self.assertEqual(self._errors(), [])
        self.assertEqual([a for _, a in transport.written], [("203.0.113.7", 40001)])

    def test_ipv6_via_on_ipv4_source(self) -> None:
        """An IPv6 sent-by from an IPv4 source is answered at the source (no InvalidAddressError)."""
        stack, proto, transport = _stack()
        data = _options(mf="abc", via="SIP/2.0/UDP [2001:db8::5]:5062;branch=z9hG4bK7")
        proto.datagramReceived(data, ("203.0.113.7", 40001))
        self.assertEqual(self._errors(), [])
        self.assertEqual([a for _, a in transport.written], [("203.0.113.7", 5062)])

    def test_forged_received_and_maddr_are_not_followed(self) -> None:
        """A client's own ``received``/``maddr`` host names never become a send address."""
        source = ("203.0.113.7", 40001)
        for params in (";received=victim.example.com", ";maddr=victim.example.com",
                       ";received=198.51.100.99"):
            via = parse_via(f"SIP/2.0/UDP 203.0.113.7:5070;branch=z9hG4bK7{params}")[0]
            host, _ = response_address(via, source, reliable=False)
            self.assertEqual(host, "203.0.113.7", params)

    def test_parsed_request_with_forged_received_answered_at_source(self) -> None:
        """A valid request whose Via carries a foreign ``received`` is answered at the real source."""
        tl = TransactionLayer(IdSource(random.Random(7)))
        data = _options(via="SIP/2.0/UDP 203.0.113.7:5070;branch=z9hG4bK7;received=victim.example.com")
        actions = tl.receive(parse_message(data), ("203.0.113.7", 40001), 0.0)
        (deliver,) = [a for a in actions if not isinstance(a, Transmit)]
        self.assertEqual(deliver.request.top_via.received, "203.0.113.7")  # type: ignore[union-attr]

    def test_send_never_raises_for_bad_addresses(self) -> None:
        """The UDP link reports False (a send error) for a host name or an out-of-range port."""
        stack, proto, transport = _stack()
        self.assertFalse(proto.send(b"x", ("example.com", 5060)))
        self.assertFalse(proto.send(b"x", ("192.0.2.9", 70000)))
        self.assertTrue(proto.send(b"x", ("192.0.2.9", 5060)))


class RegistrarNumberTests(SynchronousTestCase):
    """Numbers a registrar sends back (Expires, Min-Expires, Retry-After) are bounded."""

    def test_huge_and_unicode_delta_seconds(self) -> None:
        """5000 digits cap at 2**32-1; Unicode digits are not numbers; no ValueError escapes."""
        from activecall.sip.message import Headers
        from activecall.sip.registration import _int_header

        self.assertEqual(_int_header(Headers([("Expires", "9" * 5000)]), "Expires"), 2**32 - 1)
        self.assertEqual(_int_header(Headers([("Retry-After", "9" * 400)]), "Retry-After"), 2**32 - 1)
        self.assertIsNone(_int_header(Headers([("Expires", "\u00b2")]), "Expires"))
        self.assertEqual(_int_header(Headers([("Min-Expires", "0060")]), "Min-Expires"), 60)


class SessionTimerEchoTests(SynchronousTestCase):
    """Session-Expires is echoed only when it is a delta-seconds."""

    def test_garbage_session_expires_not_echoed(self) -> None:
        """A Session-Expires of letters, '²' or 5000 digits is not copied into our response."""
        from activecall.sip.useragent import _session_timer_headers

        for value in ("abc\r\nX: y", "\u00b2", "9" * 5000):
            self.assertEqual(_session_timer_headers(_request(**{"Session-Expires": value})), [])
        self.assertEqual(_session_timer_headers(_request(**{"Session-Expires": "0900;refresher=uas"})),
                         [("Session-Expires", "900;refresher=uas")])
