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


# ------------------------------------------------------------------ SIP over TCP (issue 10 item 2)

PEER_INVITE = (
    "INVITE sip:agent@10.0.0.1:5060;transport=tcp SIP/2.0\r\n"
    "Via: SIP/2.0/TCP 10.0.0.2:5070;branch=z9hG4bKtcp{n}\r\n"
    "From: <sip:alice@10.0.0.2>;tag=ft{n}\r\n"
    "To: <sip:agent@10.0.0.1>\r\n"
    "Call-ID: tcp-call-{n}\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:alice@10.0.0.2:5070;transport=tcp>\r\n"
    "Max-Forwards: 70\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: {length}\r\n\r\n{body}"
)


def peer_invite(n: int = 1) -> bytes:
    from activecall.testing_sip import minimal_sdp

    body = minimal_sdp("10.0.0.2").decode()
    return PEER_INVITE.format(n=n, length=len(body), body=body).encode()


def peer_request(method: str, response: Any, n: int = 1, cseq: int = 2) -> bytes:
    """An in-dialog request from the peer of :func:`peer_invite`, To tag from our ``response``."""
    return (
        f"{method} sip:agent@10.0.0.1:5060;transport=tcp SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 10.0.0.2:5070;branch=z9hG4bKtcp{method}{n}\r\n"
        f"From: <sip:alice@10.0.0.2>;tag=ft{n}\r\n"
        f"To: {response.headers.get('To')}\r\n"
        f"Call-ID: tcp-call-{n}\r\n"
        f"CSeq: {1 if method == 'ACK' else cseq} {method}\r\n"
        "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def reply_to(request: Any, status: int, to_tag: str = "rt1") -> bytes:
    """The peer's response to our ``request`` (Via, From, To + tag, Call-ID, CSeq copied)."""
    from activecall.sip.message import Headers, SipResponse

    headers = Headers()
    for name, value in request.headers:
        if name.lower() in ("via", "from", "call-id", "cseq"):
            headers.add(name, value)
        elif name.lower() == "to":
            headers.add(name, value if "tag=" in value else f"{value};tag={to_tag}")
    headers.add("Contact", "<sip:bob@10.0.0.2:5070;transport=tcp>")
    return SipResponse(status, "OK", headers).serialize()


def messages(data: bytes) -> list[Any]:
    """Every SIP message in a stream capture, in order."""
    from activecall.sip.framing import StreamFramer

    return [parse_message(f) for f in StreamFramer(role="client").feed(data) if isinstance(f, bytes)]


class TcpCase(SynchronousTestCase):
    """A UA with UDP and TCP listeners at 10.0.0.1:5060 on a MemoryReactorClock."""

    def make(self, handler: Any = None, **stack_kwargs: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.stack = SipStack(self.reactor, IdSource(random.Random(7)), shards=4, **stack_kwargs)
        self.ua = SipUserAgent(self.stack, ids=IdSource(random.Random(8)), handler=handler)
        self.udp = SipDatagramProtocol(self.stack)
        self.udp_out = MemoryDatagramTransport(("10.0.0.1", 5060))
        self.udp.makeConnection(self.udp_out)  # type: ignore[arg-type]
        self.stack.add_listener("udp", "10.0.0.1", 5060, self.udp)
        self.stack.add_listener("tcp", "10.0.0.1", 5060)

    def accept(self, host: str = "10.0.0.2", port: int = 40001) -> tuple[Any, StringTransport]:
        """An inbound TCP connection from ``host:port``."""
        proto = SipStreamFactory(self.stack, "tcp").buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        proto.makeConnection(transport)
        return proto, transport

    def connect(self, index: int = 0) -> tuple[Any, StringTransport]:
        """Complete the ``index``-th outbound TCP connection the stack asked for."""
        host, port, factory, _, _ = self.reactor.tcpClients[index]
        proto = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        proto.makeConnection(transport)
        return proto, transport


class TcpTransportChoiceTests(TcpCase):
    """RFC 3261 §18.1.1: ;transport=tcp, or a request over 1300 bytes, goes over TCP."""

    def big_options(self, target: str, body_bytes: int) -> SipRequest:
        request = options_request(target)
        request.body = b"x" * body_bytes
        request.headers.add("Content-Type", "text/plain")
        return request

    def test_large_request_switches_to_tcp(self) -> None:
        """A 1400-byte request to a target naming no transport goes over TCP, Via SIP/2.0/TCP."""
        self.make()
        self.ua.request(self.big_options("sip:10.0.0.2:5070", 1400))
        self.assertEqual(self.udp_out.written, [])
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("10.0.0.2", 5070)])
        _, transport = self.connect()
        (sent,) = messages(transport.value())
        self.assertEqual(sent.top_via.transport.upper(), "TCP")

    def test_small_request_stays_udp(self) -> None:
        """A request under 1300 bytes to the same target goes over UDP."""
        self.make()
        self.ua.request(self.big_options("sip:10.0.0.2:5070", 100))
        self.assertEqual(len(self.udp_out.written), 1)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_explicit_udp_is_kept(self) -> None:
        """A large request to a ;transport=udp target stays on UDP."""
        self.make()
        self.ua.request(self.big_options("sip:10.0.0.2:5070;transport=udp", 1400))
        self.assertEqual(len(self.udp_out.written), 1)
        self.assertEqual(parse_message(self.udp_out.written[0][0]).top_via.transport.upper(), "UDP")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_large_invite_contact_names_tcp(self) -> None:
        """A large INVITE switched to TCP carries our TCP Contact (;transport=tcp) and TCP Via."""
        self.make()
        self.ua.invite("sip:bob@10.0.0.2:5070", "sip:agent@10.0.0.1", sdp=b"v=0\r\n" + b"a=x:" + b"y" * 1400 + b"\r\n")
        _, transport = self.connect()
        (invite,) = messages(transport.value())
        self.assertEqual(invite.headers.get_all("Contact"), ["<sip:10.0.0.1:5060;transport=tcp>"])
        self.assertEqual(invite.top_via.transport.upper(), "TCP")

    def test_tcp_target_invite_via_and_contact(self) -> None:
        """An INVITE to a ;transport=tcp target: Via SIP/2.0/TCP and Contact ;transport=tcp."""
        self.make()
        self.ua.invite("sip:bob@10.0.0.2:5070;transport=tcp", "sip:agent@10.0.0.1", sdp=b"v=0\r\n")
        _, transport = self.connect()
        (invite,) = messages(transport.value())
        self.assertTrue(invite.headers.get("Via").startswith("SIP/2.0/TCP 10.0.0.1:5060;"))
        self.assertEqual(invite.headers.get("Contact"), "<sip:10.0.0.1:5060;transport=tcp>")

    def test_invite_connection_refused_is_503(self) -> None:
        """A refused TCP connection fails the INVITE with CallRejected(503) (§8.1.3.1)."""
        from twisted.internet.error import ConnectionRefusedError
        from twisted.python.failure import Failure

        from activecall.sip.useragent import CallRejected

        self.make()
        d = self.ua.invite("sip:bob@10.0.0.2:5070;transport=tcp", "sip:agent@10.0.0.1", sdp=b"v=0\r\n")
        self.reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(self.failureResultOf(d, CallRejected).value.status, 503)

    def test_lost_connection_fails_pending_request(self) -> None:
        """A connection that drops before the response fails its client transaction with 503."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.make()
        d = self.ua.request(options_request("sip:10.0.0.2:5070;transport=tcp"))
        proto, _ = self.connect()
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(d).status, 503)


class TcpResponseTests(TcpCase):
    """§18.2.2: responses on the request's connection, else a new one to the Via sent-by."""

    def test_responses_follow_the_connection(self) -> None:
        """The 180/200 of an INVITE received over TCP go back on that connection, none on UDP."""
        from activecall.testing_sip import AutoAnswerHandler

        self.make(AutoAnswerHandler(ring=True))
        proto, transport = self.accept()
        proto.dataReceived(peer_invite())
        self.assertEqual([m.status for m in messages(transport.value())], [180, 200])
        self.assertEqual(self.udp_out.written, [])
        self.assertEqual(self.reactor.tcpClients, [])
        (ok,) = [m for m in messages(transport.value()) if m.status == 200]
        self.assertEqual(ok.headers.get("Contact"), "<sip:10.0.0.1:5060;transport=tcp>")

    def test_response_reconnects_to_via_sent_by(self) -> None:
        """When the request's connection is gone, the response opens one to the Via's received IP and sent-by port."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        from activecall.testing_sip import AutoAnswerHandler

        handler = AutoAnswerHandler(answer=False)
        self.make(handler)
        proto, transport = self.accept(port=40001)
        proto.dataReceived(peer_invite())
        proto.connectionLost(Failure(ConnectionDone()))
        (call,) = handler.calls
        call.reject(486)
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("10.0.0.2", 5070)])
        _, again = self.connect()
        self.assertEqual([m.status for m in messages(again.value())], [486])
        self.assertEqual(self.stack.counters["send_errors"], 0)


class TcpIdleTests(TcpCase):
    """Idle connections are closed after 60 s on the injected clock, busy ones are kept."""

    def test_idle_outbound_connection_closed(self) -> None:
        """An outbound connection is reused while used and closed 60 s after its last traffic."""
        self.make()
        d = self.ua.request(options_request("sip:10.0.0.2:5070;transport=tcp"))
        proto, transport = self.connect()
        self.reactor.advance(30)
        (request,) = messages(transport.value())
        proto.dataReceived(reply_to(request, 200))
        self.assertEqual(self.successResultOf(d).status, 200)
        self.reactor.advance(59)
        self.assertFalse(transport.disconnecting)
        self.ua.request(options_request("sip:10.0.0.2:5070;transport=tcp"))
        self.assertEqual(len(self.reactor.tcpClients), 1)  # reused
        self.reactor.advance(59)
        self.assertFalse(transport.disconnecting)  # a transaction still uses it
        self.reactor.advance(32)  # Timer F: the second OPTIONS ends (408)
        self.reactor.advance(60)
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_inbound_quiet_connection_closed(self) -> None:
        """An inbound connection with a ping at 30 s is closed at 90 s, not at 60 s."""
        self.make()
        proto, transport = self.accept()
        self.reactor.advance(30)
        proto.dataReceived(b"\r\n\r\n")
        self.reactor.advance(30)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(30)
        self.assertTrue(transport.disconnecting)

    def test_dialog_keeps_connection(self) -> None:
        """A confirmed call over TCP keeps its connection open while idle; after BYE it is closed."""
        from activecall.testing_sip import AutoAnswerHandler

        self.make(AutoAnswerHandler())
        proto, transport = self.accept()
        proto.dataReceived(peer_invite())
        (ok,) = messages(transport.value())
        proto.dataReceived(peer_request("ACK", ok))
        self.reactor.advance(300)
        self.assertFalse(transport.disconnecting)
        transport.clear()
        proto.dataReceived(peer_request("BYE", ok))
        self.assertEqual([m.status for m in messages(transport.value())], [200])
        self.reactor.advance(60)
        self.assertTrue(transport.disconnecting)


class TcpGuardTests(TcpCase):
    """The per-source budget, ACL and garbage muting apply to TCP connections too."""

    def test_refused_source_closed_at_accept(self) -> None:
        """A connection from a source the ACL refuses is aborted before any byte is read."""
        self.make(admit=lambda ip, now: ip != "10.0.0.66")
        proto, transport = self.accept(host="10.0.0.66")
        self.assertTrue(transport.disconnecting)
        proto.dataReceived(OPTIONS % (1, 1))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.stack.counters["refused"], 1)

    def test_over_budget_source_closed_at_accept(self) -> None:
        """A connection from a source over its budget is aborted and counted as flooded."""
        self.make(budget=lambda ip, now: False)
        _, transport = self.accept()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.stack.counters["flooded"], 1)

    def test_open_connections_per_source_are_capped(self) -> None:
        """A source holding MAX_INBOUND_STREAMS_PER_SOURCE connections gets no more until one closes; others still can."""
        from activecall.sip.transport import MAX_INBOUND_STREAMS_PER_SOURCE

        self.make()
        held = [self.accept(host="10.0.0.9") for _ in range(MAX_INBOUND_STREAMS_PER_SOURCE)]
        self.assertFalse(any(t.disconnecting for _, t in held))
        _, refused = self.accept(host="10.0.0.9")
        self.assertTrue(refused.disconnecting)
        self.assertEqual(self.stack.counters["flooded"], 1)
        _, other = self.accept(host="10.0.0.10")
        self.assertFalse(other.disconnecting)
        proto, _ = held[0]
        proto.connectionLost(None)
        _, again = self.accept(host="10.0.0.9")
        self.assertFalse(again.disconnecting)

    def test_unframeable_stream_penalizes_source(self) -> None:
        """A stream that cannot be framed charges its source as garbage (penalize) and is closed."""
        seen: list[str] = []
        self.make(penalize=lambda ip, now: seen.append(ip))
        proto, transport = self.accept()
        proto.dataReceived(b"OPTIONS sip:x SIP/2.0\r\nContent-Length: nope\r\n\r\n")
        self.assertEqual(seen, ["10.0.0.2"])
        self.assertTrue(transport.disconnecting)

    def test_garbage_source_muted_for_new_connections(self) -> None:
        """With the real SipGuard, a source sending unframeable streams is muted: its next connection is refused."""
        from activecall.config import SipAclConfig, SipRateLimitConfig
        from activecall.sip.security import SipGuard

        guard = SipGuard.from_config(SipAclConfig(), SipRateLimitConfig())
        self.make(admit=guard.source_admitted, budget=guard.datagram_allowed, penalize=guard.parse_failed)
        for _ in range(500):  # the default burst is 200 unparseable messages
            proto, transport = self.accept()
            if transport.disconnecting and transport.value() == b"" and self.stack.counters["flooded"]:
                break
            proto.dataReceived(b"X\r\nContent-Length: -1\r\n\r\n")
        self.assertGreater(self.stack.counters["flooded"], 0)
        _, transport = self.accept(host="10.0.0.3")
        self.assertFalse(transport.disconnecting)  # another source is not affected


class TcpFramingTests(TcpCase):
    """Responses on a client connection, whole, one byte at a time and coalesced, give identical results."""

    def run_feed(self, mode: str) -> list[int]:
        self.make()
        results = [self.ua.request(options_request("sip:10.0.0.2:5070;transport=tcp")) for _ in range(2)]
        proto, transport = self.connect()
        stream = b"".join(reply_to(r, 200) for r in messages(transport.value()))
        chunks = {"whole": [reply_to(r, 200) for r in messages(transport.value())],
                  "bytewise": [stream[i:i + 1] for i in range(len(stream))],
                  "coalesced": [stream]}[mode]
        for chunk in chunks:
            proto.dataReceived(chunk)
        return [self.successResultOf(d).status for d in results]

    def test_whole_bytewise_coalesced(self) -> None:
        """Both OPTIONS complete with 200 in each feeding mode."""
        self.assertEqual([self.run_feed(m) for m in ("whole", "bytewise", "coalesced")], [[200, 200]] * 3)


class StopTests(TcpCase):
    """Service shutdown leaves no timer behind, even when connections close afterwards."""

    def test_connection_lost_after_stop_arms_nothing(self) -> None:
        """A transaction pending at stop() is abandoned: the later connectionLost schedules no timer."""
        self.make()
        self.ua.request(options_request("sip:10.0.0.2:5070;transport=tcp"))
        proto, _ = self.connect()
        self.stack.close_connections()
        self.stack.stop()
        proto.connectionLost(None)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.stack.transactions, 0)


class TcpNextHopContactTests(TcpCase):
    """The Contact follows the transport actually used, not only the Request-URI's."""

    def test_tcp_next_hop_gives_tcp_contact(self) -> None:
        """An INVITE for a plain sip: URI sent to a ;transport=tcp next hop carries the TCP Contact."""
        self.make()
        self.ua.invite("sip:bob@10.0.0.2:5070", "sip:agent@10.0.0.1", sdp=b"v=0\r\n",
                       next_hop="sip:10.0.0.3:5080;transport=tcp")
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("10.0.0.3", 5080)])
        _, transport = self.connect()
        (invite,) = messages(transport.value())
        self.assertEqual(invite.headers.get("Contact"), "<sip:10.0.0.1:5060;transport=tcp>")

    def test_foreign_contact_kept(self) -> None:
        """A Contact the caller chose (not one of ours) is sent unchanged over TCP."""
        self.make()
        self.ua.invite("sip:bob@10.0.0.2:5070;transport=tcp", "sip:agent@10.0.0.1", sdp=b"v=0\r\n",
                       contact="sip:me@192.0.2.1:5099")
        _, transport = self.connect()
        (invite,) = messages(transport.value())
        self.assertEqual(invite.headers.get("Contact"), "<sip:me@192.0.2.1:5099>")
