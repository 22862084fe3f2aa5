"""Tests for activecall.rtp.transport: port allocation, latching, SRTP, counters (memory transports)."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.rtp.packet import RtpParseError, SenderReport, build_rtcp, build_rtp, parse_rtcp, parse_rtp
from activecall.rtp.srtp import AES_CM_128_HMAC_SHA1_80, SrtpContext, generate_crypto
from activecall.rtp.transport import PortsExhaustedError, RtpEndpoint, RtpPortAllocator

PHONE = ("192.0.2.10", 40000)
NAT = ("198.51.100.1", 61000)


class FakeUdpPort:
    """A bound UDP port that records writes; stopListening can be held open."""

    def __init__(self, reactor: "FakeReactor", port: int, protocol: Any, interface: str) -> None:
        self.reactor = reactor
        self.port = port
        self.protocol = protocol
        self.interface = interface
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.stopped = False
        self.stop_deferred: Deferred[None] | None = None

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def stopListening(self) -> Deferred[None]:
        self.stopped = True
        del self.reactor.ports[self.port]
        if self.reactor.hold_stop:
            self.stop_deferred = Deferred()
            return self.stop_deferred
        return succeed(None)


class FakeReactor(Clock):
    """Clock plus listenUDP into FakeUdpPort; ports in ``busy`` refuse to bind."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: dict[int, FakeUdpPort] = {}
        self.busy: set[int] = set()
        self.hold_stop = False

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> FakeUdpPort:
        if port in self.busy or port in self.ports:
            raise CannotListenError(interface, port, OSError("in use"))
        p = FakeUdpPort(self, port, protocol, interface)
        self.ports[port] = p
        protocol.makeConnection(p)
        return p


def _rtp(seq: int, ssrc: int = 0x1111, pt: int = 0) -> bytes:
    return build_rtp(pt, seq, 160 * seq, ssrc, b"\xff" * 160)


class AllocatorTests(SynchronousTestCase):
    """RtpPortAllocator."""

    def test_even_ports_within_range(self) -> None:
        """An odd start is rounded up; every RTCP port (RTP + 1) stays inside the range."""
        a = RtpPortAllocator(10001, 10008)
        ports = [a.allocate() for _ in range(a.free_count)]
        self.assertEqual(ports, [10002, 10004, 10006])
        self.assertRaises(PortsExhaustedError, a.allocate)

    def test_release_reuses_last(self) -> None:
        """A released port goes to the back of the queue; unknown releases are ignored."""
        a = RtpPortAllocator(20000, 20007)
        first = a.allocate()
        a.release(first)
        a.release(12345)
        self.assertEqual([a.allocate() for _ in range(4)], [20002, 20004, 20006, 20000])

    def test_no_leak_after_thousands_of_calls(self) -> None:
        """Ten thousand start/stop cycles leave every port pair free."""
        reactor = FakeReactor()
        a = RtpPortAllocator(30000, 30099)
        for _ in range(10000):
            ep = RtpEndpoint(reactor, a, on_rtp=lambda d, n: None)
            ep.start()
            ep.stop()
        self.assertEqual((a.used_count, a.free_count), (0, 50))
        self.assertEqual(reactor.ports, {})

    def test_bad_ranges(self) -> None:
        """Empty or reversed ranges are refused."""
        self.assertRaises(ValueError, RtpPortAllocator, 5, 4)
        self.assertRaises(ValueError, RtpPortAllocator, 10000, 10000)


class EndpointTests(SynchronousTestCase):
    """RtpEndpoint over memory transports."""

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.alloc = RtpPortAllocator(40000, 40009)
        self.got: list[tuple[bytes, float]] = []
        self.rtcp: list[bytes] = []
        self.ep = RtpEndpoint(
            self.reactor, self.alloc, bind_ip="127.0.0.1",
            on_rtp=lambda d, now: self.got.append((d, now)), on_rtcp=lambda d, now: self.rtcp.append(d),
        )

    def _ports(self) -> tuple[FakeUdpPort, FakeUdpPort]:
        return self.reactor.ports[self.ep.local_port], self.reactor.ports[self.ep.local_rtcp_port]

    def test_binds_pair_on_bind_ip(self) -> None:
        """start() binds RTP on an even port and RTCP on +1, on rtp_bind_ip."""
        port = self.ep.start()
        rtp, rtcp = self._ports()
        self.assertEqual((port, rtcp.port, rtp.interface), (40000, 40001, "127.0.0.1"))

    def test_skips_ports_in_use(self) -> None:
        """A pair whose RTP or RTCP port is taken elsewhere is skipped."""
        self.reactor.busy = {40000, 40003}
        self.assertEqual(self.ep.start(), 40004)
        self.assertEqual(self.alloc.used_count, 1)

    def test_exhaustion(self) -> None:
        """When nothing can be bound, PortsExhaustedError is raised and nothing leaks."""
        self.reactor.busy = set(range(40000, 40010))
        self.assertRaises(PortsExhaustedError, self.ep.start)
        self.assertEqual(self.alloc.used_count, 0)

    def test_ports_released_after_sockets_close(self) -> None:
        """The pair is returned only when stopListening has finished."""
        self.reactor.hold_stop = True
        self.ep.start()
        rtp, rtcp = self._ports()
        d = self.ep.stop()
        self.assertNoResult(d)
        self.assertEqual(self.alloc.used_count, 1)
        assert rtp.stop_deferred is not None and rtcp.stop_deferred is not None
        rtp.stop_deferred.callback(None)
        rtcp.stop_deferred.callback(None)
        self.successResultOf(d)
        self.assertEqual(self.alloc.used_count, 0)

    def test_sends_to_sdp_address_until_latched(self) -> None:
        """Before any packet we send to the SDP address; after one we send to its source (NAT)."""
        self.ep.start()
        rtp, _ = self._ports()
        self.ep.set_remote(PHONE)
        self.assertTrue(self.ep.send_rtp(_rtp(1)))
        rtp.protocol.datagramReceived(_rtp(1), NAT)
        self.ep.send_rtp(_rtp(2))
        self.assertEqual([a for _, a in rtp.sent], [PHONE, NAT])
        self.assertEqual(self.ep.latched, NAT)
        self.assertEqual(len(self.got), 1)

    def test_no_latching_when_disabled(self) -> None:
        """With latching off we keep sending to the SDP address and accept any source."""
        self.ep.latching = False
        self.ep.start()
        rtp, _ = self._ports()
        self.ep.set_remote(PHONE)
        rtp.protocol.datagramReceived(_rtp(1), NAT)
        self.ep.send_rtp(_rtp(2))
        self.assertEqual(rtp.sent[-1][1], PHONE)
        self.assertEqual(len(self.got), 1)

    def test_foreign_source_dropped_while_latched_source_active(self) -> None:
        """A second source is dropped while the latched one is active, and latched once it went quiet."""
        self.ep.start()
        rtp, _ = self._ports()
        self.ep.set_remote(PHONE)
        rtp.protocol.datagramReceived(_rtp(1), NAT)
        self.reactor.advance(0.5)
        rtp.protocol.datagramReceived(_rtp(2), ("203.0.113.66", 5000))
        self.assertEqual((self.ep.rx_foreign, self.ep.latched), (1, NAT))
        self.reactor.advance(1.0)
        rtp.protocol.datagramReceived(_rtp(3), ("203.0.113.66", 5000))
        self.assertEqual(self.ep.latched, ("203.0.113.66", 5000))
        self.assertEqual(len(self.got), 2)

    def test_new_sdp_address_unlatches(self) -> None:
        """A re-offer with a new address forgets the latched source."""
        self.ep.start()
        rtp, _ = self._ports()
        self.ep.set_remote(PHONE)
        rtp.protocol.datagramReceived(_rtp(1), NAT)
        self.ep.set_remote(("192.0.2.99", 50000))
        self.ep.send_rtp(_rtp(2))
        self.assertEqual(rtp.sent[-1][1], ("192.0.2.99", 50000))

    def test_null_address_sends_nothing(self) -> None:
        """c=0.0.0.0 (old-style hold) means no destination: packets are counted, not sent."""
        self.ep.start()
        rtp, _ = self._ports()
        self.ep.set_remote(("0.0.0.0", 40000))
        self.assertFalse(self.ep.send_rtp(_rtp(1)))
        self.assertEqual((rtp.sent, self.ep.tx_no_destination), ([], 1))

    def test_malformed_counted(self) -> None:
        """Short datagrams and non-version-2 packets are dropped and counted."""
        self.ep.start()
        rtp, _ = self._ports()
        rtp.protocol.datagramReceived(b"\x80\x00", PHONE)
        rtp.protocol.datagramReceived(b"\x40" + bytes(20), PHONE)
        self.assertEqual((self.ep.rx_malformed, self.got, self.ep.latched), (2, [], None))

    def test_rtcp_socket_and_mux(self) -> None:
        """RTCP goes to port+1 (or a=rtcp), and to the RTP port over the RTP socket with rtcp-mux."""
        self.ep.start()
        rtp, rtcp = self._ports()
        report = build_rtcp([SenderReport(1, 2, 3, 4, 5)])
        self.ep.set_remote(PHONE)
        self.ep.send_rtcp(report)
        self.assertEqual(rtcp.sent[-1][1], ("192.0.2.10", 40001))
        self.ep.set_remote(PHONE, ("192.0.2.10", 40011))
        self.ep.send_rtcp(report)
        self.assertEqual(rtcp.sent[-1][1], ("192.0.2.10", 40011))
        self.ep.set_remote(PHONE, rtcp_mux=True)
        self.ep.send_rtcp(report)
        self.assertEqual(rtp.sent[-1], (report, PHONE))
        # Muxed RTCP arriving on the RTP socket is demultiplexed.
        rtp.protocol.datagramReceived(report, PHONE)
        rtcp.protocol.datagramReceived(report, ("192.0.2.10", 40001))
        self.assertEqual(self.rtcp, [report, report])
        self.assertEqual(self.got, [])

    def test_srtp_round_trip_and_auth_failures(self) -> None:
        """SRTP packets are protected on send and unprotected on receive; forgeries neither latch nor pass."""
        rng = random.Random(7)
        a = generate_crypto(1, AES_CM_128_HMAC_SHA1_80, rng)
        b = generate_crypto(1, AES_CM_128_HMAC_SHA1_80, rng)
        ours, theirs = SrtpContext.from_sdes(a, b), SrtpContext.from_sdes(b, a)
        self.ep.start()
        rtp, _ = self._ports()
        self.ep.set_remote(PHONE)
        self.ep.set_srtp(ours)
        forged = bytearray(theirs.protect(_rtp(1)))
        forged[-1] ^= 1
        rtp.protocol.datagramReceived(bytes(forged), ("203.0.113.66", 5000))
        self.assertEqual((self.ep.rx_srtp_errors, self.ep.latched), (1, None))
        rtp.protocol.datagramReceived(theirs.protect(_rtp(2)), NAT)
        self.assertEqual(parse_rtp(self.got[0][0]).sequence, 2)
        self.ep.send_rtp(_rtp(5))
        wire = rtp.sent[-1][0]
        self.assertEqual(len(wire), 172 + 10)
        self.assertEqual(parse_rtp(theirs.unprotect(wire)).sequence, 5)
        # SRTCP both ways.
        report = build_rtcp([SenderReport(9, 2, 3, 4, 5)])
        self.ep.send_rtcp(report)
        self.assertEqual(parse_rtcp(theirs.unprotect_rtcp(self._ports()[1].sent[-1][0]))[0].ssrc, 9)
        self._ports()[1].protocol.datagramReceived(theirs.protect_rtcp(report), PHONE)
        self.assertEqual(self.rtcp, [report])

    def test_send_errors_counted(self) -> None:
        """An OSError from the socket (full buffer) is counted, never raised."""
        self.ep.start()
        rtp, _ = self._ports()

        def boom(data: bytes, addr: tuple[str, int]) -> None:
            raise OSError(11, "EAGAIN")

        rtp.write = boom  # type: ignore[method-assign]
        self.ep._send_rtp_raw = lambda d, a: rtp.write(bytes(d), a)
        self.ep.set_remote(PHONE)
        self.assertFalse(self.ep.send_rtp(_rtp(1)))
        self.assertEqual(self.ep.stats()["tx_errors"], 1)

    def test_received_data_is_not_a_reused_buffer(self) -> None:
        """What on_rtp gets stays valid after later packets (views into it may be kept)."""
        self.ep.start()
        rtp, _ = self._ports()
        rtp.protocol.datagramReceived(_rtp(1), PHONE)
        rtp.protocol.datagramReceived(_rtp(2), PHONE)
        self.assertEqual([parse_rtp(d).sequence for d, _ in self.got], [1, 2])
        self.assertRaises(RtpParseError, parse_rtp, b"")
