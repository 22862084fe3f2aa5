"""SIP transports: UDP, TCP and TLS protocols around one shared transaction stack.

Adapter module.  :class:`SipStack` owns the pure
:class:`~activecall.sip.transaction.TransactionLayer` (sharded by Call-ID so
that its linear timer scans stay short under load), exactly one ``callLater``
re-armed at the earliest transaction deadline, and the links (the UDP listener,
inbound and outbound stream connections).  It feeds the one transaction user
(:class:`~activecall.sip.useragent.SipUserAgent`) shared by every listener, as
``twisted/names/tap.py`` shares one controller between its TCP and UDP servers.

* :class:`SipDatagramProtocol` — one per UDP listener.
* :class:`SipStreamProtocol` — one per TCP/TLS connection, inbound or outbound;
  :class:`StreamFramer` splits the byte stream (one byte at a time or several
  messages per read) and answers RFC 5626 keep-alive pings.
* Outbound TCP/TLS connections are reused per ``(transport, host, port)``;
  TLS verifies the peer's certificate for the URI host (service-identity via
  ``optionsForClientTLS``).  TCP is the same stream path without the TLS layer.
* Responses go back on the connection the request came on (RFC 3261 §18.2.2);
  when it is gone, a new connection is opened to the Via's ``received`` IP
  and sent-by port (5060, 5061 for TLS, when it has none).
* A connection with no traffic for ``idle_timeout_s`` that no transaction and
  no dialog (:meth:`TransactionUser.flow_in_use`) uses is closed.
* The per-source checks run on streams as on datagrams: ``budget`` and
  ``admit`` when a connection is accepted and for every framed message,
  ``penalize`` for unparseable messages and for streams that cannot be framed.

Malformed input never raises out of a protocol: requests get 400 from the
transaction layer when they can be answered, everything else is dropped,
counted in :attr:`SipStack.counters` and logged at debug.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Callable
from typing import Any, Protocol as TypingProtocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.sip.framing import FramingError, KeepAlive, StreamFramer
from activecall.sip.message import SipParseError, SipRequest, SipResponse, parse_message
from activecall.sip.transaction import (
    AckTimeout,
    Action,
    DeliverRequest,
    DeliverResponse,
    MessageDropped,
    TimerConfig,
    TransactionKey,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimeout,
    Transmit,
    TransportError,
)
from activecall.sip.uri import SipUri, transport_for_uri

__all__ = [
    "SipStack",
    "SipDatagramProtocol",
    "SipStreamProtocol",
    "SipStreamFactory",
]

Address = tuple[str, int]
Hop = tuple[str, str, int]
_INF = float("inf")
#: Seconds without traffic after which an unused stream connection is closed.
IDLE_TIMEOUT_S = 60.0
#: Inbound TCP/TLS connections one source IP may hold open at once (a proxy needs a few; a flood is cut here).
MAX_INBOUND_STREAMS_PER_SOURCE = 64
_DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061}


class TransactionUser(TypingProtocol):
    """What :class:`SipStack` calls on the user agent."""

    def wants_request(self, request: SipRequest) -> bool: ...
    def request_received(self, request: SipRequest, key: TransactionKey | None, source: Address,
                         flow: object | None = None, cancels: TransactionKey | None = None) -> None: ...
    def response_received(self, response: SipResponse, key: TransactionKey) -> None: ...
    def client_failed(self, key: TransactionKey, request: SipRequest, status: int) -> None: ...
    def client_terminated(self, key: TransactionKey) -> None: ...
    def server_terminated(self, key: TransactionKey) -> None: ...
    def ack_timeout(self, key: TransactionKey) -> None: ...
    def flow_in_use(self, flow: object) -> bool: ...


class Link(TypingProtocol):
    """A way to send bytes: the UDP listener or one stream connection."""

    name: str
    reliable: bool

    def send(self, data: bytes, addr: Address) -> bool:
        """Write ``data`` (to ``addr`` for UDP); False when the transport failed."""
        ...


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class SipStack:
    """Transactions, the one transaction timer, and the links of every SIP listener.

    ``reactor`` must provide IReactorTime (and IReactorTCP/IReactorSSL for
    outbound stream connections, ``resolve`` for host names).
    ``client_tls(hostname)`` returns the client TLS options for an outbound
    connection (default: ``optionsForClientTLS(hostname)``, platform trust).
    ``idle_timeout_s`` closes stream connections nothing uses any more.
    """

    _log = Logger()

    def __init__(self, reactor: IReactorTime, ids: Any, *, shards: int = 256,
                 timers: TimerConfig | None = None,
                 client_tls: Callable[[str], Any] | None = None,
                 admit: Callable[[str, float], bool] | None = None,
                 budget: Callable[[str, float], bool] | None = None,
                 penalize: Callable[[str, float], None] | None = None,
                 idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self._reactor = reactor
        self.idle_timeout_s = idle_timeout_s
        # A per-source datagram budget (any message), then the ACL (requests), both before a parse.
        self._budget = budget
        self._penalize = penalize  # told of each unparseable message's source
        self._admit = admit
        self._ids = ids
        self._timers = timers
        self._shards = [TransactionLayer(ids, timers) for _ in range(shards)]
        self._deadlines = [_INF] * shards
        # (deadline, shard) pushed whenever a shard's deadline changes; stale entries are skipped.
        self._due: list[tuple[float, int]] = []
        self._dirty: set[int] = set()
        self._timer: IDelayedCall | None = None
        self._timer_at = _INF
        self._client_tls = client_tls
        self._user: TransactionUser | None = None
        self._links: dict[TransactionKey, Link] = {}
        # Server transactions on a stream: where to reconnect if their connection is gone.
        self._reply_hops: dict[TransactionKey, Hop] = {}
        self._listeners: dict[str, Address] = {}
        self._udp: SipDatagramProtocol | None = None
        self._connections: dict[Hop, SipStreamProtocol] = {}
        # Inbound stream connections open per source IP: each holds a socket for up to the idle timeout.
        self._inbound_open: dict[str, int] = {}
        self._tls_names: dict[Address, str] = {}
        self.counters: dict[str, int] = {"received": 0, "sent": 0, "dropped": 0, "parse_errors": 0,
                                         "send_errors": 0, "refused": 0, "flooded": 0}

    # ------------------------------------------------------------ wiring

    def set_user(self, user: TransactionUser) -> None:
        """Attach the transaction user (done by ``SipUserAgent.__init__``)."""
        self._user = user

    def add_listener(self, name: str, host: str, port: int, protocol: object | None = None) -> None:
        """Record the advertised address of the ``name`` listener (udp/tcp/tls)."""
        self._listeners[name] = (host, port)
        if name == "udp" and isinstance(protocol, SipDatagramProtocol):
            self._udp = protocol

    def remove_listener(self, name: str) -> None:
        """Forget a stopped listener."""
        self._listeners.pop(name, None)
        if name == "udp":
            self._udp = None

    def now(self) -> float:
        """Seconds on the injected clock."""
        return self._reactor.seconds()

    def call_later(self, delay: float, f: Callable[[], None]) -> IDelayedCall:
        """Schedule ``f`` on the injected clock (the connections' idle checks)."""
        return self._reactor.callLater(delay, f)

    def local_address(self, transport: str) -> Address | None:
        """The advertised (host, port) of the ``transport`` listener, if bound."""
        return self._listeners.get(transport)

    @property
    def transactions(self) -> int:
        """Live transactions, all shards together."""
        return sum(len(s) for s in self._shards)

    # ------------------------------------------------------------ the one timer

    def _shard_index(self, call_id: str) -> int:
        return hash(call_id) % len(self._shards)

    def _finish(self) -> None:
        """Refresh dirty shard deadlines and re-arm the single callLater at the earliest."""
        deadlines, due = self._deadlines, self._due
        if self._dirty:
            shards = self._shards
            for i in self._dirty:
                d = shards[i].deadline()
                d = _INF if d is None else d
                if d != deadlines[i]:
                    deadlines[i] = d
                    if d != _INF:
                        heapq.heappush(due, (d, i))
            self._dirty.clear()
        while due and deadlines[due[0][1]] != due[0][0]:
            heapq.heappop(due)
        at = due[0][0] if due else _INF
        if at == self._timer_at and self._timer is not None:
            return
        self._timer_at = at
        if at == _INF:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        delay = max(0.0, at - self._reactor.seconds())
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self._reactor.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._timer_at = _INF
        now = self._reactor.seconds()
        deadlines, due = self._deadlines, self._due
        while due and due[0][0] <= now:
            at, i = heapq.heappop(due)
            if deadlines[i] != at or i in self._dirty:
                continue  # stale, or already expired in this round
            self._dirty.add(i)
            try:
                self._run(self._shards[i], self._shards[i].expire(now), None)
            except Exception:
                self._log.failure("SIP timer processing failed")
        self._finish()

    # ------------------------------------------------------------ actions

    def _run(self, layer: TransactionLayer, actions: list[Action], link: Link | None) -> None:
        user = self._user
        for action in actions:
            kind = type(action)
            if kind is Transmit:
                key = action.key  # type: ignore[union-attr]
                target = self._links.get(key, link) if key is not None else link
                if isinstance(target, SipStreamProtocol) and target.closed and key is not None:
                    target = self._reconnect(key)
                if target is None:
                    self.counters["send_errors"] += 1
                    continue
                self.counters["sent"] += 1
                if not target.send(action.data, action.addr) and key is not None:  # type: ignore[union-attr]
                    self.counters["send_errors"] += 1
                    self._run(layer, layer.transport_failed(key), link)
            elif kind is DeliverRequest:
                assert isinstance(action, DeliverRequest)
                if action.server_txn_key is not None and link is not None:
                    self._links[action.server_txn_key] = link
                    if isinstance(link, SipStreamProtocol):
                        self._reply_hops[action.server_txn_key] = self._reply_hop(link, action.request,
                                                                                  action.source)
                if user is not None:
                    user.request_received(action.request, action.server_txn_key, action.source,
                                          link, action.cancels)
            elif kind is DeliverResponse:
                assert isinstance(action, DeliverResponse)
                if user is not None:
                    user.response_received(action.response, action.client_txn_key)
            elif kind is TransactionTerminated:
                key = action.key  # type: ignore[union-attr]
                self._links.pop(key, None)
                self._reply_hops.pop(key, None)
                if user is not None:
                    if key.server:
                        user.server_terminated(key)
                    else:
                        user.client_terminated(key)
            elif kind is TransactionTimeout:
                assert isinstance(action, TransactionTimeout)
                if not action.key.server and user is not None:
                    user.client_failed(action.key, action.request, 408)
            elif kind is TransportError:
                assert isinstance(action, TransportError)
                if not action.key.server and user is not None:
                    user.client_failed(action.key, action.request, 503)
            elif kind is AckTimeout:
                assert isinstance(action, AckTimeout)
                if user is not None:
                    user.ack_timeout(action.key)
            elif kind is MessageDropped:
                self.counters["dropped"] += 1

    @staticmethod
    def _reply_hop(link: SipStreamProtocol, request: SipRequest, source: Address) -> Hop:
        """§18.2.2: the ``received`` IP (the source) and the sent-by port of the request's top Via."""
        try:
            port = request.top_via.port
        except SipParseError:
            port = None
        return (link.name, source[0], port or _DEFAULT_PORTS[link.name])

    def _reconnect(self, key: TransactionKey) -> Link | None:
        """A server transaction's connection is gone: a (new or pooled) one to its Via's sent-by."""
        hop = self._reply_hops.get(key)
        if hop is None:
            return None
        link = self._link_for(hop, None)
        self._links[key] = link
        return link

    # ------------------------------------------------------------ receiving

    def stream_accepted(self, proto: SipStreamProtocol) -> bool:
        """An inbound connection from ``proto.peer``: the per-source budget and the ACL decide."""
        ip = proto.peer[0] if proto.peer is not None else ""
        now = self.now()
        if self._budget is not None and not self._budget(ip, now):
            self.counters["flooded"] += 1
            return False
        if self._admit is not None and not self._admit(ip, now):
            self.counters["refused"] += 1
            return False
        if self._inbound_open.get(ip, 0) >= MAX_INBOUND_STREAMS_PER_SOURCE:
            self.counters["flooded"] += 1
            return False
        self._inbound_open[ip] = self._inbound_open.get(ip, 0) + 1
        proto.counted_ip = ip
        return True

    def stream_unframed(self, proto: SipStreamProtocol) -> None:
        """``proto``'s stream could not be split into messages (it is being closed)."""
        self.counters["parse_errors"] += 1
        if self._penalize is not None and proto.peer is not None:
            self._penalize(proto.peer[0], self.now())

    def message_received(self, data: bytes, source: Address, link: Link) -> None:
        """One datagram or framed stream message arrived on ``link`` from ``source``."""
        self.counters["received"] += 1
        if self._budget is not None and not self._budget(source[0], self.now()):
            self.counters["flooded"] += 1
            return
        if self._admit is not None and not data.startswith(b"SIP/2.0 ") and not self._admit(source[0], self.now()):
            self.counters["refused"] += 1
            return
        try:
            try:
                msg = parse_message(data)
            except SipParseError as err:
                # Let the layer build the 400/505 (it re-parses; this is the rare path).
                self.counters["parse_errors"] += 1
                self._log.debug("unparseable SIP from {source}: {error}", source=source, error=str(err))
                if self._penalize is not None:
                    self._penalize(source[0], self.now())
                layer = self._shards[0]
                self._run(layer, layer.receive_datagram(data, source, self.now(), reliable=link.reliable), link)
                return
            if isinstance(msg, SipRequest) and self._user is not None and not self._user.wants_request(msg):
                self.counters["dropped"] += 1
                return
            i = self._shard_index(msg.call_id)
            layer = self._shards[i]
            self._dirty.add(i)
            self._run(layer, layer.receive(msg, source, self.now(), reliable=link.reliable), link)
            # Handled: whoever keeps the message re-parses what it reads later.
            msg.headers.forget_parsed()
        except SipParseError as err:
            self.counters["parse_errors"] += 1
            self._log.debug("bad SIP from {source}: {error}", source=source, error=str(err))
            if self._penalize is not None:
                self._penalize(source[0], self.now())
        except Exception:
            self._log.failure("SIP message processing failed")
        finally:
            self._finish()

    # ------------------------------------------------------------ sending

    def resolve(self, uri: SipUri) -> Deferred[Hop]:
        """Transport, IP and port for ``uri`` (A record lookup for names; no SRV/NAPTR)."""
        if not uri.is_sip:
            return fail(ValueError(f"cannot route to {uri}"))
        transport = transport_for_uri(uri)
        host, port = uri.host_port()
        maddr = uri.param("maddr")
        if maddr:
            host = maddr
        if uri.port is None and transport == "tls":
            port = 5061
        if _is_ip(host):
            return succeed((transport, host, port))
        resolver = getattr(self._reactor, "resolve", None)
        if resolver is None:
            return fail(ValueError(f"cannot resolve {host}"))

        def resolved(ip: str) -> Hop:
            if transport == "tls":
                self._tls_names[(ip, port)] = host
            return (transport, ip, port)

        d: Deferred[str] = resolver(host)
        return d.addCallback(resolved)

    def _link_for(self, hop: Hop, flow: object | None) -> Link:
        transport, host, port = hop
        if transport == "udp":
            if self._udp is None:
                raise ValueError("no UDP listener")
            return self._udp
        if isinstance(flow, SipStreamProtocol) and flow.name == transport and not flow.closed:
            return flow
        conn = self._connections.get(hop)
        if conn is not None and not conn.closed:
            return conn
        return self._connect(hop)

    def _connect(self, hop: Hop) -> SipStreamProtocol:
        transport, host, port = hop
        proto = SipStreamProtocol(self, transport, role="client")
        proto.peer = (host, port)
        self._connections[hop] = proto
        factory = _OutboundFactory(self, proto)
        if transport == "tls":
            name = self._tls_names.get((host, port), host)
            if self._client_tls is not None:
                options = self._client_tls(name)
            else:
                from twisted.internet.ssl import optionsForClientTLS

                options = optionsForClientTLS(name)
            self._reactor.connectSSL(host, port, factory, options)  # type: ignore[attr-defined]
        else:
            self._reactor.connectTCP(host, port, factory)  # type: ignore[attr-defined]
        return proto

    def send_request(self, request: SipRequest, hop: Hop, flow: object | None = None) -> TransactionKey:
        """Start a client transaction for ``request`` towards ``hop``."""
        link = self._link_for(hop, flow)
        i = self._shard_index(request.call_id)
        layer = self._shards[i]
        self._dirty.add(i)
        try:
            key, actions = layer.send_request(request, (hop[1], hop[2]), self.now(), reliable=link.reliable)
            self._links[key] = link
            self._run(layer, actions, link)
        finally:
            self._finish()
        return key

    def send_response(self, key: TransactionKey, response: SipResponse) -> None:
        """Send ``response`` through server transaction ``key`` (ValueError if it is gone)."""
        i = self._shard_index(response.call_id)
        layer = self._shards[i]
        self._dirty.add(i)
        try:
            self._run(layer, layer.send_response(key, response, self.now()), self._links.get(key))
        finally:
            response.headers.forget_parsed()  # the transaction keeps it for retransmissions
            self._finish()

    def send_stateless(self, message: SipRequest | SipResponse, hop: Hop, flow: object | None = None) -> None:
        """Send outside any transaction (the ACK for a 2xx)."""
        try:
            link = self._link_for(hop, flow)
        except ValueError:
            self.counters["send_errors"] += 1
            return
        self.counters["sent"] += 1
        if not link.send(message.serialize(), (hop[1], hop[2])):
            self.counters["send_errors"] += 1

    # ------------------------------------------------------------ connections

    def connection_made(self, proto: SipStreamProtocol) -> None:
        """Index a connected stream by its peer so responses and requests reuse it."""
        if proto.peer is not None:
            self._connections.setdefault((proto.name, proto.peer[0], proto.peer[1]), proto)

    def connection_lost(self, proto: SipStreamProtocol) -> None:
        """Forget a closed stream; client transactions on it fail (503), server ones reconnect to reply."""
        ip, proto.counted_ip = proto.counted_ip, None
        if ip is not None:
            left = self._inbound_open.get(ip, 0) - 1
            if left > 0:
                self._inbound_open[ip] = left
            else:
                self._inbound_open.pop(ip, None)
        for hop, conn in list(self._connections.items()):
            if conn is proto:
                del self._connections[hop]
        keys = [k for k, link in self._links.items() if link is proto and not k.server]
        for key in keys:
            self._fail_key(key)
        self._finish()

    def flow_of(self, key: TransactionKey) -> object | None:
        """The stream connection client transaction ``key`` was sent on (None on UDP)."""
        link = self._links.get(key)
        return link if isinstance(link, SipStreamProtocol) else None

    def connection_idle(self, proto: SipStreamProtocol) -> bool:
        """True when ``proto`` may be closed: no transaction and no dialog uses it."""
        if any(link is proto for link in self._links.values()):
            return False
        return self._user is None or not self._user.flow_in_use(proto)

    def _fail_key(self, key: TransactionKey) -> None:
        # The key does not say which shard owns it; this path is rare, so ask each.
        for i, layer in enumerate(self._shards):
            actions = layer.transport_failed(key)
            if actions:
                self._dirty.add(i)
                self._run(layer, actions, None)
                return
        self._links.pop(key, None)

    def close_connections(self) -> None:
        """Drop every stream connection (service shutdown)."""
        for conn in list(self._connections.values()):
            conn.abort()

    def stop(self) -> None:
        """Cancel the transaction timer and abandon every transaction (service shutdown).

        Connections closing after this (their ``connectionLost`` comes later)
        find no transaction left, so nothing re-arms the timer.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = _INF
        self._shards = [TransactionLayer(self._ids, self._timers) for _ in self._shards]
        self._deadlines = [_INF] * len(self._shards)
        self._due.clear()
        self._dirty.clear()
        self._links.clear()
        self._reply_hops.clear()


class SipDatagramProtocol(DatagramProtocol):
    """The UDP listener: every datagram goes to the shared :class:`SipStack`."""

    name = "udp"
    reliable = False

    def __init__(self, stack: SipStack) -> None:
        self._stack = stack

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """Feed one datagram to the stack (which never raises)."""
        if datagram in (b"\r\n", b"\r\n\r\n", b"\x00\x00\x00\x00"):
            return  # NAT keep-alives
        self._stack.message_received(datagram, (addr[0], addr[1]), self)

    def send(self, data: bytes, addr: Address) -> bool:
        """Write one datagram; False on an OS error, a bad address or when not listening."""
        if self.transport is None:
            return False
        try:
            self.transport.write(data, addr)
        except (OSError, ValueError, OverflowError):
            # OSError: the network; ValueError: Twisted's InvalidAddressError (a host
            # name, or the wrong address family); OverflowError: a port past 65535.
            return False
        return True


class SipStreamProtocol(Protocol):
    """One TCP or TLS connection (``name`` ``tcp``/``tls``), inbound or outbound.

    Writes made before an outbound connection is up are queued and flushed by
    :meth:`connectionMade`.  An inbound connection from a source the stack's
    budget or ACL refuses is closed at once.  Once connected, one ``callLater``
    checks for idleness every ``idle_timeout_s`` (traffic only updates
    :attr:`last_activity`), and the connection is closed when it has been
    quiet that long and :meth:`SipStack.connection_idle` agrees.
    """

    _log = Logger()
    reliable = True

    def __init__(self, stack: SipStack, name: str, role: str = "server") -> None:
        self._stack = stack
        self.name = name
        self._framer = StreamFramer(role="client" if role == "client" else "server")
        self.peer: Address | None = None
        self.closed = False
        self._queue: list[bytes] | None = []
        self._role = role
        #: The source IP this inbound connection counts against (None: outbound, or not admitted).
        self.counted_ip: str | None = None
        self.last_activity = 0.0
        self._idle: IDelayedCall | None = None

    def connectionMade(self) -> None:
        """Record the peer, admit it (inbound) and flush writes queued while connecting."""
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        if self.peer is None:
            self.peer = (getattr(peer, "host", ""), getattr(peer, "port", 0))
        if self._role == "server" and not self._stack.stream_accepted(self):
            self.closed = True
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.last_activity = self._stack.now()
        self._arm_idle(self._stack.idle_timeout_s)
        self._stack.connection_made(self)
        queued, self._queue = self._queue or [], None
        for data in queued:
            self.transport.write(data)  # type: ignore[union-attr]

    def _arm_idle(self, delay: float) -> None:
        self._idle = self._stack.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        self._idle = None
        if self.closed:
            return
        timeout = self._stack.idle_timeout_s
        quiet = self._stack.now() - self.last_activity
        if quiet < timeout:
            self._arm_idle(timeout - quiet)
        elif not self._stack.connection_idle(self):
            self._arm_idle(timeout)
        else:
            self._log.debug("closing idle SIP {name} connection to {peer}", name=self.name, peer=self.peer)
            self.transport.loseConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        """Frame the stream and hand each message to the stack."""
        if self.closed:
            return
        self.last_activity = self._stack.now()
        try:
            frames = self._framer.feed(data)
        except FramingError as err:
            self._stack.stream_unframed(self)
            self._log.debug("closing SIP stream from {peer}: {error}", peer=self.peer, error=str(err))
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        for frame in frames:
            if frame is KeepAlive.PING:
                self.transport.write(b"\r\n")  # type: ignore[union-attr]
            elif isinstance(frame, bytes):
                self._stack.message_received(frame, self.peer or ("", 0), self)

    def send(self, data: bytes, addr: Address) -> bool:
        """Write on this connection (queued until connected); False once closed."""
        if self.closed:
            return False
        if self._queue is not None:
            self._queue.append(data)
            return True
        self.last_activity = self._stack.now()
        self.transport.write(data)  # type: ignore[union-attr]
        return True

    def abort(self) -> None:
        """Close the connection now."""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connection_failed(self) -> None:
        """An outbound connection could not be made."""
        self.closed = True
        self._queue = None
        self._stack.connection_lost(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        """Fail whatever still depends on this connection."""
        self.closed = True
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        self._stack.connection_lost(self)


class SipStreamFactory(Factory):
    """Server factory for a TCP or TLS listener (``name``)."""

    def __init__(self, stack: SipStack, name: str) -> None:
        self._stack = stack
        self.name = name

    def buildProtocol(self, addr: Any) -> SipStreamProtocol:
        """A server-side stream protocol."""
        proto = SipStreamProtocol(self._stack, self.name, role="server")
        proto.factory = self
        return proto


class _OutboundFactory(ClientFactory):
    """Hands the pre-made protocol to the connector and reports failures."""

    noisy = False

    def __init__(self, stack: SipStack, proto: SipStreamProtocol) -> None:
        self._stack = stack
        self._proto = proto

    def buildProtocol(self, addr: Any) -> SipStreamProtocol:
        return self._proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self._proto.connection_failed()
