"""RTP/RTCP UDP sockets for SIP calls: port pairs, symmetric latching, SRTP.

* :class:`RtpPortAllocator` hands out even RTP ports (RTCP = RTP + 1) from
  ``rtp_start_port..rtp_end_port``.  Released ports go to the back of the
  free list, so a port just freed is the last to be reused (stragglers of
  the old call do not reach the new one) and thousands of calls never leak.
* :class:`RtpEndpoint` owns one call's two sockets (bound on
  ``rtp_bind_ip`` through the injected reactor's ``listenUDP``); RTCP is
  sent on the RTP socket when rtcp-mux is negotiated (RFC 5761), and the
  RTCP socket stays bound so a re-offer can switch back.

Latching (symmetric RTP, ``enable_rtp_latching``): media goes to the SDP
address until the first valid packet arrives, then to the address that
packet came from, so phones behind NAT hear us.  While the latched source
is active, packets from other addresses are dropped (counted); if it has
been silent for ``relatch_idle_s`` the next valid source is latched
instead (the phone's NAT binding changed).  "Valid" means it looks like
RTP (version 2, at least 12 bytes) and, with SRTP, passed authentication,
so with SRTP nobody else can steal the stream.

The hot path is plain attribute access, integer counters and one
``sendto`` on the raw socket per packet; the endpoint never logs per packet.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import Any, Callable, Union

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from activecall.rtp.srtp import SrtpContext, SrtpError

__all__ = [
    "PortsExhaustedError",
    "RtpPortAllocator",
    "RtpEndpoint",
    "Address",
]

Address = tuple[str, int]
Packet = Union[bytes, bytearray, memoryview]
_NULL_HOSTS = frozenset({"0.0.0.0", "::", ""})


class PortsExhaustedError(RuntimeError):
    """No free RTP port pair in the configured range (the SIP layer answers 503/488)."""


class RtpPortAllocator:
    """Even RTP ports from ``start..end``, each with its RTCP port + 1 inside the range."""

    def __init__(self, start: int, end: int) -> None:
        if not 1 <= start <= end <= 65535:
            raise ValueError(f"bad RTP port range {start}..{end}")
        first = start + (start & 1)
        self.start = start
        self.end = end
        self._free: deque[int] = deque(range(first, end, 2))
        self._used: set[int] = set()
        if not self._free:
            raise ValueError(f"RTP port range {start}..{end} holds no even/odd pair")

    @property
    def free_count(self) -> int:
        """Port pairs available."""
        return len(self._free)

    @property
    def used_count(self) -> int:
        """Port pairs handed out and not released."""
        return len(self._used)

    def allocate(self) -> int:
        """Return a free even RTP port; raise :class:`PortsExhaustedError` if none is left."""
        if not self._free:
            raise PortsExhaustedError(f"all RTP ports {self.start}..{self.end} are in use")
        port = self._free.popleft()
        self._used.add(port)
        return port

    def release(self, port: int) -> None:
        """Return ``port`` to the pool (at the back); releasing an unknown port is a no-op."""
        if port in self._used:
            self._used.remove(port)
            self._free.append(port)


class _RtpProtocol(DatagramProtocol):
    """Forwards datagrams of the RTP socket to the endpoint."""

    def logPrefix(self) -> str:
        """What Twisted's port log lines call this socket (the log filter knows it)."""
        return "rtp"

    def __init__(self, endpoint: RtpEndpoint) -> None:
        self._endpoint = endpoint

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self._endpoint._rtp_received(datagram, addr)


class _RtcpProtocol(DatagramProtocol):
    """Forwards datagrams of the RTCP socket to the endpoint."""

    def logPrefix(self) -> str:
        """What Twisted's port log lines call this socket (the log filter knows it)."""
        return "rtcp"

    def __init__(self, endpoint: RtpEndpoint) -> None:
        self._endpoint = endpoint

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self._endpoint._rtcp_received(datagram, addr)


def _sender(port: Any) -> Callable[[Packet, Address], Any]:
    """The cheapest way to send on ``port``: its raw socket, else ``write`` with a copy."""
    sock = getattr(port, "socket", None)
    if sock is not None:
        # Twisted's Port.write re-validates the address on every call (STYLE §6).
        return sock.sendto  # type: ignore[no-any-return]

    def write(data: Packet, addr: Address) -> None:
        # Fakes keep what they are given; our buffers are reused.
        port.write(bytes(data), addr)

    return write


class RtpEndpoint:
    """One call's RTP and RTCP sockets with latching and SRTP.

    States::

        new --start()--> bound --set_remote()--> sending to the SDP address
        sending --first valid packet (latching on)--> latched to its source
        latched --source silent >= relatch_idle_s, packet from elsewhere--> relatched
        any --set_remote() with a new address--> unlatched (learn again)
        any --stop()--> closed (ports released when the sockets are closed)

    ``on_rtp(data, now)`` and ``on_rtcp(data, now)`` receive decrypted
    packets.  ``data`` is the datagram itself (or libsrtp's output), never a
    reused buffer, so the receiver may keep views into it.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        allocator: RtpPortAllocator,
        *,
        on_rtp: Callable[[bytes, float], None] | None = None,
        on_rtcp: Callable[[bytes, float], None] | None = None,
        bind_ip: str = "",
        latching: bool = True,
        relatch_idle_s: float = 1.0,
        max_bind_attempts: int = 16,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._udp: IReactorUDP = reactor
        self._allocator = allocator
        self._on_rtp: Callable[[bytes, float], None] = on_rtp if on_rtp is not None else _ignore
        self._on_rtcp = on_rtcp
        self.bind_ip = bind_ip
        self.latching = latching
        self.relatch_idle_s = relatch_idle_s
        self._max_bind_attempts = max_bind_attempts
        self.local_port = 0
        self._rtp_port: Any = None
        self._rtcp_port: Any = None
        self._send_rtp_raw: Callable[[Packet, Address], Any] | None = None
        self._send_rtcp_raw: Callable[[Packet, Address], Any] | None = None
        self._srtp: SrtpContext | None = None
        self.rtcp_mux = False
        self.remote: Address | None = None
        self.remote_rtcp: Address | None = None
        #: The source we latched onto, if any.
        self.latched: Address | None = None
        self.latched_rtcp: Address | None = None
        self._rtp_dest: Address | None = None
        self._rtcp_dest: Address | None = None
        self.last_rx_at: float | None = None
        self.closed = False
        # Counters (integers only on the hot path).
        self.rx_packets = 0
        self.rx_bytes = 0
        self.rx_malformed = 0
        self.rx_foreign = 0
        #: Payload types this call negotiated; packets with others are dropped before they can latch.
        self.payload_types: frozenset[int] | None = None
        self.rx_unexpected_pt = 0
        self.rx_srtp_errors = 0
        self.rx_rtcp = 0
        self.tx_packets = 0
        self.tx_bytes = 0
        self.tx_errors = 0
        self.tx_no_destination = 0
        self.tx_rtcp = 0
        self.latches = 0

    # -- life cycle ---------------------------------------------------------

    @property
    def local_rtcp_port(self) -> int:
        """The RTCP port (RTP + 1), bound even when rtcp-mux is in use."""
        return self.local_port + 1 if self.local_port else 0

    def start(self) -> int:
        """Bind an RTP/RTCP pair from the allocator and return the RTP port.

        Ports another process holds are skipped (they go back to the pool's
        end).  Raises :class:`PortsExhaustedError` when none can be bound.
        """
        if self._rtp_port is not None:
            return self.local_port
        last_error: Exception | None = None
        for _ in range(self._max_bind_attempts):
            port = self._allocator.allocate()
            try:
                rtp = self._udp.listenUDP(port, _RtpProtocol(self), interface=self.bind_ip)
            except CannotListenError as e:
                last_error = e
                self._allocator.release(port)
                continue
            try:
                rtcp = self._udp.listenUDP(port + 1, _RtcpProtocol(self), interface=self.bind_ip)
            except CannotListenError as e:
                last_error = e
                d = rtp.stopListening()
                if isinstance(d, Deferred):
                    d.addBoth(self._release_later, port)
                else:
                    self._allocator.release(port)
                continue
            self._rtp_port, self._rtcp_port = rtp, rtcp
            self._send_rtp_raw = _sender(rtp)
            self._send_rtcp_raw = _sender(rtcp)
            self.local_port = port
            return port
        raise PortsExhaustedError(f"could not bind an RTP port pair: {last_error}")

    def _release_later(self, result: object, port: int) -> None:
        """Return ``port`` once its socket is closed (whatever the outcome)."""
        self._allocator.release(port)

    def stop(self) -> Deferred[None]:
        """Close both sockets; the port pair returns to the allocator once they are closed."""
        if self.closed:
            return _done()
        self.closed = True
        self._srtp = None
        ports = [p for p in (self._rtp_port, self._rtcp_port) if p is not None]
        self._rtp_port = self._rtcp_port = None
        self._send_rtp_raw = self._send_rtcp_raw = None
        local = self.local_port
        waits: list[Deferred[Any]] = []
        for p in ports:
            d = p.stopListening()
            if isinstance(d, Deferred):
                waits.append(d)
        if not local:
            return _done()
        if not waits:
            self._allocator.release(local)
            return _done()
        done: Deferred[Any] = DeferredList(waits, consumeErrors=True)

        def release(_: object) -> None:
            self._allocator.release(local)

        done.addCallback(release)
        return done

    # -- configuration ---------------------------------------------------------

    def set_remote(self, rtp: Address | None, rtcp: Address | None = None, *, rtcp_mux: bool = False) -> None:
        """Set the peer's SDP addresses (offer/answer or a re-offer).

        A changed address forgets the latched source, so the next valid
        packet is latched again.  A null host (``0.0.0.0``) means "send
        nothing" (RFC 2543 hold).
        """
        if rtp is not None and rtp[0] in _NULL_HOSTS:
            rtp = None
        if rtcp is not None and rtcp[0] in _NULL_HOSTS:
            rtcp = None
        if rtp != self.remote:
            self.latched = None
            self.latched_rtcp = None
        self.remote = rtp
        self.remote_rtcp = rtp if rtcp_mux else (rtcp if rtcp is not None else _plus_one(rtp))
        self.rtcp_mux = rtcp_mux
        self._update_destinations()

    def set_handlers(
        self, on_rtp: Callable[[bytes, float], None], on_rtcp: Callable[[bytes, float], None] | None = None
    ) -> None:
        """Route packets to a new owner (the leg built after negotiation)."""
        self._on_rtp = on_rtp
        self._on_rtcp = on_rtcp

    def set_srtp(self, context: SrtpContext | None) -> None:
        """Use ``context`` to protect/unprotect from now on (``None``: plain RTP)."""
        self._srtp = context

    @property
    def srtp(self) -> SrtpContext | None:
        """The SRTP context in use, if any."""
        return self._srtp

    def _update_destinations(self) -> None:
        if self.remote is None:
            # Hold by null address: we learn nothing and send nothing.
            self._rtp_dest = None
            self._rtcp_dest = None
            return
        # An SDP host name or out-of-range port is never a destination (sendto would
        # resolve the name, blocking the reactor, or raise OverflowError); with
        # latching the peer's first packet still gives us where to send.
        self._rtp_dest = self.latched if self.latched is not None else _sendable(self.remote)
        if self.rtcp_mux:
            self._rtcp_dest = self._rtp_dest
        else:
            self._rtcp_dest = self.latched_rtcp if self.latched_rtcp is not None else _sendable(self.remote_rtcp)

    # -- receive --------------------------------------------------------------

    def _rtp_received(self, data: bytes, addr: Address) -> None:
        if len(data) < 12 or data[0] & 0xC0 != 0x80:
            self.rx_malformed += 1
            return
        if 192 <= data[1] <= 223:
            # rtcp-mux demultiplexing (RFC 5761 §4); harmless without mux.
            self._rtcp_received(data, addr, muxed=True)
            return
        if self.payload_types is not None and data[1] & 0x7F not in self.payload_types:
            # Scanners and stray streams must not steer our media by latching.
            self.rx_unexpected_pt += 1
            return
        now = self._clock.seconds()
        srtp = self._srtp
        if srtp is not None:
            try:
                data = srtp.unprotect(data)
            except SrtpError:
                self.rx_srtp_errors += 1
                return
        if addr != self.latched and self.latching:
            last = self.last_rx_at
            if self.latched is not None and last is not None and now - last < self.relatch_idle_s:
                self.rx_foreign += 1
                return
            self.latched = addr
            self.latches += 1
            self._update_destinations()
        self.last_rx_at = now
        self.rx_packets += 1
        self.rx_bytes += len(data)
        self._on_rtp(data, now)

    def _rtcp_received(self, data: bytes, addr: Address, muxed: bool = False) -> None:
        if len(data) < 8 or data[0] & 0xC0 != 0x80:
            self.rx_malformed += 1
            return
        srtp = self._srtp
        if srtp is not None:
            try:
                data = srtp.unprotect_rtcp(data)
            except SrtpError:
                self.rx_srtp_errors += 1
                return
        if self.latching and not muxed and addr != self.latched_rtcp:
            self.latched_rtcp = addr
            self._update_destinations()
        self.rx_rtcp += 1
        if self._on_rtcp is not None:
            self._on_rtcp(data, self._clock.seconds())

    # -- send -----------------------------------------------------------------

    def send_rtp(self, packet: Packet) -> bool:
        """Protect (if SRTP) and send one RTP packet; return whether it went out."""
        dest = self._rtp_dest
        send = self._send_rtp_raw
        if dest is None or send is None:
            self.tx_no_destination += 1
            return False
        srtp = self._srtp
        if srtp is not None:
            packet = srtp.protect(packet)
        try:
            send(packet, dest)
        except (OSError, ValueError, OverflowError):
            # EAGAIN (full socket buffer), ENETUNREACH, the wrong address family
            # (InvalidAddressError is a ValueError)...: count, never raise into the tick.
            self.tx_errors += 1
            return False
        self.tx_packets += 1
        self.tx_bytes += len(packet)
        return True

    def send_rtcp(self, packet: Packet) -> bool:
        """Protect (if SRTP) and send one compound RTCP packet."""
        dest = self._rtcp_dest
        send = self._send_rtp_raw if self.rtcp_mux else self._send_rtcp_raw
        if dest is None or send is None:
            self.tx_no_destination += 1
            return False
        srtp = self._srtp
        try:
            if srtp is not None:
                packet = srtp.protect_rtcp(packet)
            send(packet, dest)
        except (OSError, ValueError, OverflowError):  # SrtpError is a ValueError
            self.tx_errors += 1
            return False
        self.tx_rtcp += 1
        return True

    def stats(self) -> dict[str, int]:
        """All counters, for /metrics and call records."""
        return {
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "rx_malformed": self.rx_malformed,
            "rx_foreign": self.rx_foreign,
            "rx_srtp_errors": self.rx_srtp_errors,
            "rx_rtcp": self.rx_rtcp,
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "tx_errors": self.tx_errors,
            "tx_no_destination": self.tx_no_destination,
            "tx_rtcp": self.tx_rtcp,
            "latches": self.latches,
            "rx_unexpected_pt": self.rx_unexpected_pt,
        }


def _ignore(data: bytes, now: float) -> None:
    """Packets before anyone listens (ports bound for the SDP, no leg yet) are dropped."""


def _plus_one(addr: Address | None) -> Address | None:
    return None if addr is None or addr[1] >= 65535 else (addr[0], addr[1] + 1)


def _sendable(addr: Address | None) -> Address | None:
    """``addr`` if it is an IP literal with a port in 1..65535 (no DNS on the media path), else None."""
    if addr is None or not isinstance(addr[1], int) or not 1 <= addr[1] <= 65535:
        return None
    try:
        ipaddress.ip_address(addr[0])
    except ValueError:
        return None
    return addr


def _done() -> Deferred[None]:
    return succeed(None)
