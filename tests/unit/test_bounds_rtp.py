"""Hardening: SDP-given media addresses never reach ``sendto`` as host names or impossible ports.

The endpoint sends with the raw socket's ``sendto``: a host name there is a
blocking DNS lookup on the reactor thread for every packet, and a port past
65535 raises ``OverflowError`` (not an ``OSError``) into the media tick.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.rtp.packet import build_rtp
from activecall.rtp.transport import RtpEndpoint, RtpPortAllocator
from activecall.sip.uri import is_ip_literal


class RawSocket:
    """Records ``sendto`` like a socket; raises what CPython raises for bad ports."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.name_lookups: list[str] = []

    def sendto(self, data: Any, addr: tuple[str, int]) -> int:
        if not 0 <= addr[1] <= 65535:
            raise OverflowError("getsockaddrarg: port must be 0-65535.")
        if not is_ip_literal(addr[0]):
            self.name_lookups.append(addr[0])  # a real socket would block on getaddrinfo here
        self.sent.append((bytes(data), addr))
        return len(data)


class SocketPort:
    """A bound UDP port exposing ``socket`` (the endpoint's fast path)."""

    def __init__(self, protocol: Any) -> None:
        self.socket = RawSocket()
        self.protocol = protocol

    def stopListening(self) -> None:
        pass


class SocketReactor(Clock):
    """Clock plus listenUDP returning :class:`SocketPort`."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: dict[int, SocketPort] = {}

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> SocketPort:
        if port in self.ports:
            raise CannotListenError(interface, port, OSError("in use"))
        p = SocketPort(protocol)
        self.ports[port] = p
        protocol.makeConnection(p)
        return p


def _endpoint() -> tuple[RtpEndpoint, SocketPort, SocketPort]:
    reactor = SocketReactor()
    ep = RtpEndpoint(reactor, RtpPortAllocator(30000, 30010))
    port = ep.start()
    return ep, reactor.ports[port], reactor.ports[port + 1]


RTP = build_rtp(0, 1, 160, 0x1234, b"\xff" * 160)
RTCP = b"\x80\xc9\x00\x01\x00\x00\x12\x34"


class RemoteAddressTests(SynchronousTestCase):
    """set_remote() with what a hostile SDP can carry."""

    def test_host_name_is_not_sent_to(self) -> None:
        """``c=IN IP4 media.example.com``: nothing is sent (no DNS per packet) until a packet latches."""
        ep, rtp, rtcp = _endpoint()
        ep.set_remote(("media.example.com", 40000))
        self.assertFalse(ep.send_rtp(RTP))
        self.assertFalse(ep.send_rtcp(RTCP))
        self.assertEqual(rtp.socket.name_lookups + rtcp.socket.name_lookups, [])
        rtp.protocol.datagramReceived(RTP, ("192.0.2.7", 40000))
        self.assertTrue(ep.send_rtp(RTP))
        self.assertEqual(rtp.socket.sent[-1][1], ("192.0.2.7", 40000))

    def test_rtcp_port_past_65535(self) -> None:
        """An RTP port of 65535 has no RTP + 1 RTCP port: RTCP is not sent, nothing raises."""
        ep, rtp, rtcp = _endpoint()
        ep.set_remote(("192.0.2.7", 65535))
        self.assertTrue(ep.send_rtp(RTP))
        self.assertFalse(ep.send_rtcp(RTCP))
        ep.set_remote(("192.0.2.7", 40000), ("192.0.2.7", 70000))
        self.assertFalse(ep.send_rtcp(RTCP))

    def test_send_errors_are_counted(self) -> None:
        """OverflowError or ValueError from the socket count as tx_errors instead of escaping."""
        ep, rtp, rtcp = _endpoint()
        ep.set_remote(("192.0.2.7", 40000))

        def boom(data: Any, addr: Any) -> None:
            raise ValueError("IPv4 port write() called with IPv6 address")

        ep._send_rtp_raw = boom
        self.assertFalse(ep.send_rtp(RTP))
        self.assertEqual(ep.tx_errors, 1)
