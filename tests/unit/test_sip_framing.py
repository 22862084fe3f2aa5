"""Stream framing: Content-Length delimiting and RFC 5626 keep-alives."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.sip.framing import FramingError, KeepAlive, StreamFramer
from activecall.sip.message import SipRequest, parse_message

INVITE = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP pc33.example.com;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: <sip:bob@example.com>\r\n"
    b"From: <sip:alice@example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 12\r\n"
    b"\r\n"
    b"v=0\r\ns=-\r\n\r\n"
)
BYE = (
    b"BYE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP pc33.example.com;branch=z9hG4bK8\r\n"
    b"To: <sip:bob@example.com>;tag=x\r\n"
    b"From: <sip:alice@example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.example.com\r\n"
    b"CSeq: 314160 BYE\r\n"
    b"l: 0\r\n"
    b"\r\n"
)


class FramerTests(SynchronousTestCase):
    """StreamFramer behaviour."""

    def test_whole_bytewise_and_coalesced_agree(self) -> None:
        """The same messages come out whether bytes arrive whole, one at a time, or coalesced."""
        whole = StreamFramer().feed(INVITE) + StreamFramer().feed(BYE)
        framer = StreamFramer()
        bytewise = [f for i in range(len(INVITE + BYE)) for f in framer.feed((INVITE + BYE)[i : i + 1])]
        coalesced = StreamFramer().feed(INVITE + BYE)
        self.assertEqual(whole, [INVITE, BYE])
        self.assertEqual(bytewise, [INVITE, BYE])
        self.assertEqual(coalesced, [INVITE, BYE])

    def test_body_containing_blank_line_is_kept(self) -> None:
        """A body that itself contains CRLFCRLF is cut by Content-Length, not by the blank line."""
        (frame,) = StreamFramer().feed(INVITE)
        msg = parse_message(frame)
        assert isinstance(msg, SipRequest)
        self.assertEqual(msg.body, b"v=0\r\ns=-\r\n\r\n")

    def test_partial_message_waits(self) -> None:
        """Until the body is complete nothing is emitted and the bytes stay buffered."""
        framer = StreamFramer()
        self.assertEqual(framer.feed(INVITE[:-3]), [])
        self.assertEqual(framer.buffered, len(INVITE) - 3)
        self.assertEqual(framer.feed(INVITE[-3:]), [INVITE])
        self.assertEqual(framer.buffered, 0)

    def test_server_sees_ping(self) -> None:
        """A server framer reports a double CRLF as a ping, even split byte by byte, before a message."""
        framer = StreamFramer(role="server")
        events = [e for b in b"\r\n\r\n" for e in framer.feed(bytes([b]))]
        self.assertEqual(events, [KeepAlive.PING])
        self.assertEqual(framer.feed(b"\r\n\r\n" + BYE), [KeepAlive.PING, BYE])

    def test_server_ignores_single_crlf(self) -> None:
        """A lone CRLF before a message is ignored by a server framer (RFC 3261 §7.5)."""
        self.assertEqual(StreamFramer(role="server").feed(b"\r\n" + BYE), [BYE])

    def test_client_sees_pong(self) -> None:
        """A client framer reports each CRLF between messages as a pong right away."""
        framer = StreamFramer(role="client")
        self.assertEqual(framer.feed(b"\r\n"), [KeepAlive.PONG])
        self.assertEqual(framer.feed(b"\r\n" + BYE), [KeepAlive.PONG, BYE])

    def test_missing_content_length_means_empty_body(self) -> None:
        """Without Content-Length a streamed message is taken to have no body."""
        msg = BYE.replace(b"l: 0\r\n", b"")
        self.assertEqual(StreamFramer().feed(msg + BYE), [msg, BYE])

    def test_bad_lengths_fail_the_stream(self) -> None:
        """Negative, duplicated or oversize Content-Length raise FramingError and the framer stays failed."""
        for bad in (b"l: -1\r\n", b"l: 0\r\nContent-Length: 0\r\n", b"l: 99999999\r\n"):
            framer = StreamFramer(max_body_bytes=1000)
            with self.assertRaises(FramingError):
                framer.feed(BYE.replace(b"l: 0\r\n", bad))
            with self.assertRaises(FramingError):
                framer.feed(BYE)

    def test_oversize_head_fails(self) -> None:
        """A head that never ends is rejected once it exceeds the limit."""
        framer = StreamFramer(max_head_bytes=100)
        with self.assertRaises(FramingError):
            framer.feed(b"INVITE sip:a@b SIP/2.0\r\nX: " + b"a" * 200)

    def test_folded_content_length(self) -> None:
        """A folded Content-Length header is still found."""
        msg = BYE.replace(b"l: 0\r\n", b"Content-Length:\r\n 2\r\n") + b"ok"
        self.assertEqual(StreamFramer().feed(msg + BYE), [msg, BYE])
