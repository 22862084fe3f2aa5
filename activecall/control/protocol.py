"""The control WebSocket: Autobahn frames <-> a session. No call logic here."""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping, Optional, Protocol, Sequence

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from activecall.config import ApiConfig
from activecall.control.query import QueryError, SessionParams, parse_session_query
from activecall.control.tunnel import OwnerLocator, Tunnel, UpstreamProtocol
from activecall.interfaces import IControlChannel


class ISession(Protocol):
    """What the protocol drives (a CallSession)."""

    def attach(self, channel: IControlChannel) -> None: ...
    def receive_text(self, text: str | bytes) -> None: ...
    def receive_audio(self, data: bytes) -> None: ...
    def client_closed(self) -> None: ...


class ISessionHost(Protocol):
    """Creates and finds sessions (a SessionManager)."""

    def open(self, params: SessionParams) -> Any: ...
    def new_sid(self) -> str: ...
    def hosts(self, sid: str) -> bool: ...
    def __contains__(self, sid: str) -> bool: ...
    def __len__(self) -> int: ...


class PeerWatchdog:
    """Declares a peer dead when it sends nothing for ``timeout_s`` after a Ping.

    Every chunk of bytes from the peer counts as an answer (a Pong, audio, a
    command). The session's keep-alive pings are reported with :meth:`pinged`.
    With ``probe`` set (the client chose ``ping=0``) the watchdog sends its own
    Ping when a whole ``timeout_s`` passed without a byte, so a vanished peer is
    still found while a busy one is never pinged.

    States: quiet --pinged--> waiting --heard--> quiet;
    waiting --timeout_s without a byte--> dead (``on_dead`` once, then stopped).
    """

    def __init__(self, clock: IReactorTime, timeout_s: float, on_dead: Callable[[], None],
                 probe: Optional[Callable[[], None]] = None) -> None:
        self._clock = clock
        self._timeout_s = timeout_s
        self._on_dead = on_dead
        self._probe = probe
        # Counting chunks, not reading the clock, keeps heard() cheap and exact.
        self._heard = 0
        self._heard_at_probe_tick = 0
        # (when, chunks heard by then) of the oldest Ping nothing has answered yet.
        self._unanswered: Optional[tuple[float, int]] = None
        self._check_call: Optional[IDelayedCall] = None
        self._probe_call: Optional[IDelayedCall] = None
        self._stopped = False
        if probe is not None:
            self._probe_call = clock.callLater(timeout_s, self._probe_tick)

    def heard(self) -> None:
        """The peer sent something (called per received chunk)."""
        self._heard += 1

    def pinged(self) -> None:
        """A Ping went out; an answer is due within ``timeout_s``."""
        if self._stopped:
            return
        if self._unanswered is None or self._heard != self._unanswered[1]:
            self._unanswered = (self._clock.seconds(), self._heard)
        if self._check_call is None:
            self._check_call = self._clock.callLater(self._timeout_s, self._check)

    def stop(self) -> None:
        """The connection is gone: cancel every timer."""
        self._stopped = True
        for call in (self._check_call, self._probe_call):
            if call is not None and call.active():
                call.cancel()
        self._check_call = self._probe_call = None

    def _check(self) -> None:
        self._check_call = None
        if self._unanswered is None or self._heard != self._unanswered[1]:
            self._unanswered = None
            return
        remaining = self._unanswered[0] + self._timeout_s - self._clock.seconds()
        if remaining > 0:
            # The oldest unanswered ping is younger than the one this timer was armed for.
            self._check_call = self._clock.callLater(remaining, self._check)
            return
        self.stop()
        self._on_dead()

    def _probe_tick(self) -> None:
        self._probe_call = None
        if self._heard == self._heard_at_probe_tick and self._probe is not None:
            self._probe()
            self.pinged()
        self._heard_at_probe_tick = self._heard
        if not self._stopped:
            self._probe_call = self._clock.callLater(self._timeout_s, self._probe_tick)


class RelaySlots:
    """Sockets this node relays to their owner (control/tunnel.py), shared by the endpoints' factories.

    A tunnel counts against ``max_sessions`` like a local session: its slot is taken when the
    owner is looked for and given back when the tunnel closes, whichever side closes first.
    """

    def __init__(self) -> None:
        self._held = 0

    def __len__(self) -> int:
        return self._held

    def take(self) -> None:
        self._held += 1

    def give_back(self) -> None:
        self._held -= 1


#: Opens the owner's socket: (candidate bases, path, query, headers) -> the socket, or None.
OpenUpstream = Callable[[Sequence[str], str, Mapping[str, Sequence[str]], Mapping[str, str]],
                        Awaitable[Optional[UpstreamProtocol]]]


@implementer(IControlChannel)
class _Channel:
    """The IControlChannel a session writes to."""

    __slots__ = ("_proto",)

    def __init__(self, proto: "ControlProtocol") -> None:
        self._proto = proto

    def send_text(self, text: str) -> None:
        self._proto.sendMessage(text.encode("utf-8"), isBinary=False)

    def send_binary(self, data: bytes) -> None:
        self._proto.sendMessage(data, isBinary=True)

    def send_ping(self, payload: bytes) -> None:
        self._proto.send_keepalive_ping(payload)

    def close(self) -> None:
        self._proto.sendClose(code=1000)  # normal closure after the final hangup


# The options a server protocol takes from its factory (maxMessagePayloadSize, tcpNoDelay, ...).
_FACTORY_OPTIONS: tuple[str, ...] = tuple(WebSocketServerProtocol.CONFIG_ATTRS)


class ControlProtocol(WebSocketServerProtocol):
    """One client connection on /call, /call/sip or /call/webrtc.

    Autobahn's own log lines (a refused handshake, a dropped connection) come once or twice
    per connection at info and warn, so a flood of connections floods the log; only its errors
    are kept, and this class logs what an operator needs (:meth:`_peer_gone`, refusals).
    """

    _log = Logger()
    log = txaio.make_logger(level="error")
    factory: "ControlFactory"
    # Autobahn copies the factory's options in _connectionMade and pretty-prints them all for a
    # debug line even when debug is off (40% of an upgrade's cost), after connectionMade already
    # read tcpNoDelay (so it was never applied). connectionMade copies them instead; nothing to print.
    CONFIG_ATTRS: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._params: Optional[SessionParams] = None
        self._session: Optional[ISession] = None
        self._watchdog: Optional[PeerWatchdog] = None
        # The owner's socket when another node hosts this id (control/tunnel.py): frames are relayed.
        self._upstream: Optional[UpstreamProtocol] = None
        self._closed = False  # onClose ran (a client may leave while its owner is being found)
        self._holds_relay_slot = False  # a RelaySlots slot is held for this (possible) tunnel

    def connectionMade(self) -> None:
        for name in _FACTORY_OPTIONS:
            setattr(self, name, getattr(self.factory, name))
        super().connectionMade()

    def onConnect(self, request: ConnectionRequest) -> Any:
        try:
            params = self._admit(request)
            locator = self.factory.locator
            if params.forward is None and locator is not None and locator.enabled and not self.factory.host.hosts(params.sid):
                self.factory.relays.take()
                self._holds_relay_slot = True
                return Deferred.fromCoroutine(self._route(request, params))
            self._params = params
        except ConnectionDeny as e:
            if e.code == 503:
                self.factory.refusing_sessions()
            else:
                self._log.info("control client {peer} refused: {code} {reason}", peer=self.peer, code=e.code, reason=e.reason)
            raise
        except Exception:
            self._log.failure("control client {peer}: opening handshake failed", peer=self.peer)
            raise ConnectionDeny(500, "internal error")
        self.factory.admitting_sessions()

    async def _route(self, request: ConnectionRequest, params: SessionParams) -> None:
        """Tunnel to the node that owns ``params.sid``; nobody takes it: a local session, as usual."""
        assert self.factory.locator is not None
        try:
            bases = await self.factory.locator.candidates(params.sid)
            headers = {}
            authorization = request.headers.get("authorization")
            if authorization:
                headers["Authorization"] = authorization
            upstream = await self.factory.open_upstream(bases, request.path, request.params, headers)
        except Exception:
            self._log.failure("control client {peer}: finding the owner of {sid} failed", peer=self.peer, sid=params.sid)
            upstream = None
        if upstream is None or self._closed:
            self._release_relay_slot()  # a local session counts itself; a client gone holds nothing
        if self._closed:
            if upstream is not None:
                upstream.sendClose(code=1000)  # the client left meanwhile: the owner's socket must not linger
            return  # and no session is opened for it (onOpen sees _closed)
        if upstream is None:
            if params.sid in self.factory.host:
                raise ConnectionDeny(409, "session id already in use")
            self._params = params
        else:
            self._log.info("control client {peer}: {sid} tunnelled to its owner", peer=self.peer, sid=params.sid)
            self._upstream = upstream
        self.factory.admitting_sessions()

    def _release_relay_slot(self) -> None:
        if self._holds_relay_slot:
            self._holds_relay_slot = False
            self.factory.relays.give_back()

    def relay_from_owner(self, payload: bytes, is_binary: bool) -> None:
        """A message from the owner's socket, for the client."""
        self.sendMessage(payload, is_binary)

    def owner_closed(self, code: Optional[int], reason: Optional[str]) -> None:
        """The owner closed the tunnelled socket (the call is over): close the client's."""
        self._upstream = None
        self._release_relay_slot()
        self.sendClose(code=1000 if code in (None, 1005, 1006) else code, reason=reason or None)

    def _admit(self, request: ConnectionRequest) -> SessionParams:
        """The session this handshake opens, or ConnectionDeny."""
        host = self.factory.host
        try:
            params = parse_session_query(request.params, self.factory.call_type, host.new_sid)
        except QueryError as e:
            raise ConnectionDeny(400, str(e))
        if params.forward is not None and not host.hosts(params.sid):
            raise ConnectionDeny(404, "call not found on this node")
        # A second client would orphan the first session's socket and call.
        if params.sid in host:
            raise ConnectionDeny(409, "session id already in use")
        # Sockets relayed to their owner count too: tunnels through this node are not free.
        if len(host) + len(self.factory.relays) >= self.factory.limits.max_sessions:
            raise ConnectionDeny(503, "too many sessions")
        return params

    def onOpen(self) -> None:
        if self._closed:
            return  # the client left while its owner was looked for
        upstream = self._upstream
        if upstream is not None:
            upstream.pair(self)
            return
        assert self._params is not None
        limits = self.factory.limits
        self._watchdog = PeerWatchdog(self.factory.clock, limits.pong_timeout_s, self._peer_gone,
                                      probe=None if self._params.ping_s else (lambda: self.sendPing(b"")))
        session = self.factory.host.open(self._params)
        session.attach(_Channel(self))
        self._session = session

    def dataReceived(self, data: bytes) -> None:
        if self._watchdog is not None:
            self._watchdog.heard()
        super().dataReceived(data)

    def send_keepalive_ping(self, payload: bytes) -> None:
        """The session's periodic Ping; the peer must answer within ``pong_timeout_s``."""
        self.sendPing(payload)
        if self._watchdog is not None:
            self._watchdog.pinged()

    def _peer_gone(self) -> None:
        self._log.info("control client {peer} sent nothing for {timeout_s} s after a ping: closing",
                       peer=self.peer, timeout_s=self.factory.limits.pong_timeout_s)
        # onClose follows and ends the session as a client close does.
        self.dropConnection(abort=True)

    def onMessageFrameBegin(self, length: int) -> None:
        super().onMessageFrameBegin(length)
        # Text may be up to max_message_bytes; audio frames are far smaller.
        limit = self.factory.limits.max_frame_bytes
        if self.message_is_binary and not self.failedByMe and self.message_data_total_length > limit:
            self._max_message_size_exceeded(
                self.message_data_total_length, limit, f"binary message larger than {limit} bytes")

    def onPong(self, payload: bytes) -> None:
        if self._upstream is not None:
            self._upstream.sendPong(payload)  # the answer to the owner's keep-alive

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._upstream is not None:
            self._upstream.sendMessage(payload, isBinary)
            return
        session = self._session
        if session is None:
            return
        try:
            if isBinary:
                session.receive_audio(payload)
            else:
                session.receive_text(payload)
        except Exception:
            # A bug handling one frame must not kill the connection or the reactor.
            self._log.failure("handling a frame of session failed")

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self._closed = True
        self._release_relay_slot()
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.downstream = None
            upstream.sendClose(code=1000)
        if self._watchdog is not None:
            self._watchdog.stop()
        session, self._session = self._session, None
        if session is not None:
            session.client_closed()


class ControlFactory(WebSocketServerFactory):
    """The factory of one endpoint; ``call_type`` is fixed by its path; ``limits`` is ``config.api``.

    ``relays`` counts the tunnelled sockets against ``max_sessions``; the endpoints of one daemon
    share one. ``open_upstream`` opens an owner's socket (default: :class:`Tunnel`).
    """

    protocol = ControlProtocol
    _log = Logger()

    def __init__(self, host: ISessionHost, call_type: str, url: Optional[str], clock: IReactorTime,
                 limits: ApiConfig = ApiConfig(), locator: Optional[OwnerLocator] = None,
                 relays: Optional[RelaySlots] = None, open_upstream: Optional[OpenUpstream] = None) -> None:
        super().__init__(url, reactor=clock)
        self.noisy = False
        self.host = host
        # Where sockets for ids hosted elsewhere go (the registry, the peers); None: always local.
        self.locator = locator
        self.relays = relays if relays is not None else RelaySlots()
        self.open_upstream: OpenUpstream = open_upstream or Tunnel(clock, limits).open
        self.call_type = call_type
        self.clock = clock
        self.limits = limits
        self._refusing = False
        # Audio frames are small and frequent: no fragmentation, no Nagle delay. The payload
        # limits refuse a huge frame from its header, before its bytes are buffered (close 1009).
        self.setProtocolOptions(autoFragmentSize=0, tcpNoDelay=True, openHandshakeTimeout=10, closeHandshakeTimeout=2,
                                # Refuse with a Close frame (1009 for size) rather than a bare TCP drop.
                                failByDrop=False, maxMessagePayloadSize=limits.max_message_bytes,
                                maxFramePayloadSize=limits.max_message_bytes)

    def refusing_sessions(self) -> None:
        """A handshake was refused for ``max_sessions``: logged once per burst, not per connection."""
        if not self._refusing:
            self._refusing = True
            self._log.warn("control: {n} sessions open (max_sessions); refusing new WebSocket sessions with 503",
                           n=len(self.host) + len(self.relays))

    def admitting_sessions(self) -> None:
        """A handshake was accepted: the next refusal is logged again."""
        self._refusing = False
