"""Unit tests for the SIP transport adapter: UDP timers, stream framing, connections."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from activecall.ids import IdSource
from activecall.sip.message import SipRequest, parse_message
from activecall.sip.transport import SipDatagramProtocol, SipStack, SipStreamFactory
from activecall.sip.uri import parse_uri, transport_for_uri
from activecall.sip.useragent import SipUserAgent
from activecall.testing_sip import MemoryDatagramTransport

OPTIONS = (
    b"OPTIONS sip:agent@10.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 10.0.0.2:5070;branch=z9hG4bK%d\r\n"
    b"From: <sip:alice@10.0.0.2>;tag=f1\r\n"
    b"To: <sip:agent@10.0.0.1>\r\n"
    b"Call-ID: c%d\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Length: 4\r\n\r\nbody"
)


class RecordingUser:
    """A transaction user that records what the stack delivers."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        self.failed: list[int] = []

    def wants_request(self, request: SipRequest) -> bool:
        return True

    def request_received(self, request: SipRequest, key: Any, source: Any, flow: Any = None,
                         cancels: Any = None) -> None:
        self.requests.append((request.method, request.call_id, request.body))

    def response_received(self, response: Any, key: Any) -> None:
        pass

    def client_failed(self, key: Any, request: Any, status: int) -> None:
        self.failed.append(status)

    def client_terminated(self, key: Any) -> None:
        pass

    def server_terminated(self, key: Any) -> None:
        pass

    def ack_timeout(self, key: Any) -> None:
        pass

    def flow_in_use(self, flow: Any) -> bool:
        return False


def make_udp(reactor: Any = None) -> tuple[Any, SipStack, SipUserAgent, MemoryDatagramTransport]:
    clock = reactor or Clock()
    ids = IdSource(random.Random(7))
    stack = SipStack(clock, ids, shards=8)
    ua = SipUserAgent(stack, ids=ids)
    proto = SipDatagramProtocol(stack)
    transport = MemoryDatagramTransport(("10.0.0.1", 5060))
    proto.makeConnection(transport)  # type: ignore[arg-type]
    stack.add_listener("udp", "10.0.0.1", 5060, proto)
    return clock, stack, ua, transport


def options_request(target: str = "sip:10.0.0.2:5070") -> SipRequest:
    from activecall.sip.message import Headers

    return SipRequest("OPTIONS", parse_uri(target), Headers([("From", "<sip:a@10.0.0.1>"), ("To", f"<{target}>")]))


class UdpTimerTests(SynchronousTestCase):
    """One callLater follows the transaction layer's deadline."""

    def test_timer_a_doubles_and_b_times_out(self) -> None:
        """An unanswered request is resent at 0.5, 1.5, 3.5 s... and times out with 408 at 32 s."""
        clock, stack, ua, transport = make_udp()
        d = ua.request(options_request())
        self.assertEqual(len(transport.written), 1)
        for step, total in ((0.5, 2), (1.0, 3), (2.0, 4)):
            clock.advance(step)
            self.assertEqual(len(transport.written), total)
        clock.advance(32)
        self.assertEqual(self.successResultOf(d).status, 408)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_exactly_one_delayed_call(self) -> None:
        """Many concurrent transactions share a single delayed call."""
        clock, stack, ua, transport = make_udp()
        for _ in range(50):
            ua.request(options_request()).addErrback(lambda f: None)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual(stack.transactions, 50)
        clock.pump([1.0] * 40)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(stack.transactions, 0)

    def test_send_failure_is_503(self) -> None:
        """An OS error on send fails the transaction with a synthesized 503."""
        clock, stack, ua, transport = make_udp()
        transport.fail_writes = True
        d = ua.request(options_request())
        self.assertEqual(self.successResultOf(d).status, 503)
        self.assertEqual(stack.counters["send_errors"], 1)

    def test_keepalive_ignored(self) -> None:
        """A CRLF keep-alive datagram produces nothing."""
        clock, stack, ua, transport = make_udp()
        SipDatagramProtocol(stack).datagramReceived(b"\r\n\r\n", ("10.0.0.2", 5070))
        self.assertEqual(transport.written, [])
        self.assertEqual(stack.counters["received"], 0)


class TimerAcrossShardsTests(SynchronousTestCase):
    """The one delayed call follows the earliest deadline of all shards, as they move."""

    def test_deadline_follows_shards_started_at_different_times(self) -> None:
        """Requests in different shards retransmit on their own schedules, each at its due time."""
        clock, stack, ua, transport = make_udp()
        for i in range(6):  # sent at 0.0, 0.1, ... 0.5: first Timer E at 0.5, 0.6, ... 1.0
            ua.request(options_request(f"sip:10.0.0.{i + 2}:5070")).addErrback(lambda f: None)
            if i < 5:
                clock.advance(0.1)
        self.assertEqual(len(transport.written), 7)  # six requests, the first one resent at 0.5
        delayed = clock.getDelayedCalls()
        self.assertEqual(len(delayed), 1)
        self.assertAlmostEqual(delayed[0].getTime(), 0.6)
        clock.advance(0.1)
        self.assertEqual(len(transport.written), 8)
        clock.advance(0.4)
        self.assertEqual(len(transport.written), 12)
        self.assertAlmostEqual(clock.getDelayedCalls()[0].getTime(), 1.5)  # the first request's second resend
        clock.pump([1.0] * 40)
        self.assertEqual((clock.getDelayedCalls(), stack.transactions), ([], 0))


class ParsedViewsTests(SynchronousTestCase):
    """Messages the stack has handled keep no parsed views (a transaction holds them up to 32 s)."""

    def test_handled_request_and_sent_response_forget_their_views(self) -> None:
        """After an OPTIONS is answered, neither the request nor the response its transaction keeps has a cache."""
        clock, stack, ua, transport = make_udp()
        datagram = OPTIONS.replace(b"TCP", b"UDP") % (1, 1)
        stack._udp.datagramReceived(datagram, ("10.0.0.2", 5070))  # type: ignore[union-attr]
        self.assertEqual(parse_message(transport.written[0][0]).status, 200)  # type: ignore[union-attr]
        (txn,) = [t for shard in stack._shards for t in shard._servers.values()]
        self.assertIsNone(txn.request.headers._cache)
        self.assertIsNone(txn.last_response.headers._cache)  # type: ignore[union-attr]
        self.assertEqual(txn.request.call_id, "c1")  # read again: parsed again


class StreamTests(SynchronousTestCase):
    """TCP/TLS stream protocol over StringTransport."""

    def connect(self) -> tuple[SipStack, RecordingUser, Any, StringTransport]:
        stack = SipStack(Clock(), IdSource(random.Random(7)), shards=4)
        user = RecordingUser()
        stack.set_user(user)
        proto = SipStreamFactory(stack, "tcp").buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.2", 40001))
        proto.makeConnection(transport)
        return stack, user, proto, transport

    def feed_and_collect(self, chunks: list[bytes]) -> list[tuple[str, str, bytes]]:
        stack, user, proto, transport = self.connect()
        for chunk in chunks:
            proto.dataReceived(chunk)
        return user.requests

    def test_whole_bytewise_coalesced_identical(self) -> None:
        """The same two messages whole, one byte at a time, and coalesced give identical events."""
        m1, m2 = OPTIONS % (1, 1), OPTIONS % (2, 2)
        whole = self.feed_and_collect([m1, m2])
        stream = m1 + m2
        bytewise = self.feed_and_collect([stream[i : i + 1] for i in range(len(stream))])
        coalesced = self.feed_and_collect([stream])
        self.assertEqual(whole, [("OPTIONS", "c1", b"body"), ("OPTIONS", "c2", b"body")])
        self.assertEqual(bytewise, whole)
        self.assertEqual(coalesced, whole)

    def test_response_on_same_connection(self) -> None:
        """A response to a stream request is written back on that connection."""
        stack = SipStack(Clock(), IdSource(random.Random(7)), shards=4)
        SipUserAgent(stack, ids=IdSource(random.Random(8)))
        proto = SipStreamFactory(stack, "tcp").buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.2", 40001))
        proto.makeConnection(transport)
        proto.dataReceived(OPTIONS % (1, 1))
        response = parse_message(transport.value())
        self.assertEqual(response.status, 200)

    def test_ping_pong(self) -> None:
        """A double-CRLF ping is answered with a single CRLF."""
        stack, user, proto, transport = self.connect()
        proto.dataReceived(b"\r\n\r\n")
        self.assertEqual(transport.value(), b"\r\n")

    def test_framing_error_closes(self) -> None:
        """A stream that cannot be delimited is closed and counted."""
        stack, user, proto, transport = self.connect()
        proto.dataReceived(b"OPTIONS sip:x SIP/2.0\r\nContent-Length: nope\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(stack.counters["parse_errors"], 1)
        self.assertEqual(user.requests, [])

    def test_garbage_with_length_does_not_raise(self) -> None:
        """A well-framed but unparseable message is dropped without raising."""
        stack, user, proto, transport = self.connect()
        proto.dataReceived(b"HELLO\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(user.requests, [])
        self.assertEqual(stack.counters["parse_errors"], 1)


class OutboundConnectionTests(SynchronousTestCase):
    """Outbound TCP connections are made on demand and reused."""

    def test_connect_queue_and_reuse(self) -> None:
        """Two requests to one TCP target share one connection; writes wait for connectionMade."""
        reactor = MemoryReactorClock()
        stack = SipStack(reactor, IdSource(random.Random(7)), shards=4)
        ua = SipUserAgent(stack, ids=IdSource(random.Random(8)))
        stack.add_listener("tcp", "10.0.0.1", 5060)
        ua.request(options_request("sip:10.0.0.2:5070;transport=tcp"))
        ua.request(options_request("sip:10.0.0.2:5070;transport=tcp"))
        self.assertEqual(len(reactor.tcpClients), 1)
        host, port, factory, _, _ = reactor.tcpClients[0]
        self.assertEqual((host, port), ("10.0.0.2", 5070))
        proto = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.2", 5070))
        proto.makeConnection(transport)
        data = transport.value()
        self.assertEqual(data.count(b"OPTIONS sip:10.0.0.2:5070;transport=tcp SIP/2.0"), 2)
        self.assertIn(b"Via: SIP/2.0/TCP 10.0.0.1:5060;branch=", data)

    def test_connection_failure_is_503(self) -> None:
        """A refused outbound connection fails the queued request with 503."""
        from twisted.internet.error import ConnectionRefusedError
        from twisted.python.failure import Failure

        reactor = MemoryReactorClock()
        stack = SipStack(reactor, IdSource(random.Random(7)), shards=4)
        ua = SipUserAgent(stack, ids=IdSource(random.Random(8)))
        stack.add_listener("tcp", "10.0.0.1", 5060)
        d = ua.request(options_request("sip:10.0.0.2:5070;transport=tcp"))
        factory = reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(self.successResultOf(d).status, 503)

    def test_transport_selection(self) -> None:
        """sips: and transport=tls pick TLS, transport=tcp TCP, anything else UDP."""
        self.assertEqual(
            [transport_for_uri(parse_uri(u)) for u in
             ("sips:a@h", "sip:a@h;transport=tls", "sip:a@h;transport=TCP", "sip:a@h")],
            ["tls", "tls", "tcp", "udp"],
        )
