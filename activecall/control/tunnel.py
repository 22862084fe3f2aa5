"""Control sockets and REST requests for ids another node owns: sent to that node (protocol.md §1.5).

A client may reach any node of a cluster; a WebSocket whose ``id`` this node
does not host goes to the owner: the one the call registry names
(config.md §14b), else each static ``peers`` entry in order, the first that
upgrades.  The request is repeated there with ``forward=true`` (so it never
hops twice), the client's token but not its Origin (this node already checked
it; node-to-node requests are not browsers).  Once the owner has upgraded, the
client's handshake completes here and every frame is relayed both ways: text
and binary messages, the owner's Pings to the client and the client's Pongs
back, and the close.  ``/kill``, ``/command`` and ``/events`` for such ids are
sent there the same way (:func:`forward_http`), the answer streamed back.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Mapping, Optional, Sequence
from urllib.parse import urlencode, urlsplit

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers

__all__ = ["UpstreamProtocol", "OwnerLocator", "connect_upstream", "forward_url", "forward_http", "CONNECT_TIMEOUT_S"]

#: A candidate owner that has not upgraded within this is skipped (AC: 3 s).
CONNECT_TIMEOUT_S = 3.0


def forward_url(base: str, path: str, params: Mapping[str, Sequence[str]]) -> str:
    """The owner's WebSocket URL for this request: same path and query, ``forward=true``.

    ``base`` is a node's ``http(s)://`` or ``ws(s)://`` base URL.
    """
    scheme, netloc = urlsplit(base)[:2]
    ws_scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}[scheme]
    query = [(k, v) for k, values in params.items() if k != "forward" for v in values]
    query.append(("forward", "true"))
    return f"{ws_scheme}://{netloc}{path}?{urlencode(query)}"


class OwnerLocator:
    """Where a socket for an id this node does not host may be: the registry's answer, else the peers."""

    def __init__(self, registry_owner: Optional[Callable[[str], Deferred[Any]]], peers: Sequence[str]) -> None:
        self._registry_owner = registry_owner
        self._peers = tuple(peers)

    @property
    def peers(self) -> tuple[str, ...]:
        """The static ``peers`` (ws:// base URLs)."""
        return self._peers

    @property
    def enabled(self) -> bool:
        """Whether there is anywhere to look."""
        return self._registry_owner is not None or bool(self._peers)

    def candidates(self, sid: str) -> Deferred[list[str]]:
        """Base URLs to try, in order: the registered owner alone if known, else every peer."""
        if self._registry_owner is None:
            return succeed(list(self._peers))

        def found(owner: Any) -> list[str]:
            return [owner.url] if owner is not None else list(self._peers)

        return self._registry_owner(sid).addCallback(found)


#: Owner messages kept while the client's own handshake completes.
_MAX_EARLY_MESSAGES = 256


class UpstreamProtocol(WebSocketClientProtocol):
    """This node's socket to the owner; relays what the owner sends to ``downstream``."""

    log = txaio.make_logger(level="error")
    downstream: Any = None  # the client's ControlProtocol once paired

    def onOpen(self) -> None:
        self._early: list[tuple[bytes, bool]] = []
        self.factory.opened.callback(self)

    def pair(self, downstream: Any) -> None:
        """The client's socket is open: it gets what came meanwhile, then everything as it comes."""
        self.downstream = downstream
        early, self._early = self._early, []
        for payload, is_binary in early:
            downstream.relay_from_owner(payload, is_binary)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.downstream is not None:
            self.downstream.relay_from_owner(payload, isBinary)
        elif len(self._early) < _MAX_EARLY_MESSAGES:
            self._early.append((payload, isBinary))

    def onPing(self, payload: bytes) -> None:
        # The owner's keep-alive is for the client: it answers, and its Pong comes back through us.
        if self.downstream is not None:
            self.downstream.sendPing(payload)
        else:
            self.sendPong(payload)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        opened = self.factory.opened
        if not opened.called:
            opened.errback(ConnectionError(f"the owner did not upgrade: {reason or code}"))
        if self.downstream is not None:
            self.downstream.owner_closed(code, reason)
            self.downstream = None


class _UpstreamFactory(WebSocketClientFactory):
    protocol = UpstreamProtocol
    noisy = False

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.opened.called:
            self.opened.errback(reason)


def connect_upstream(reactor: IReactorTime, url: str, headers: Mapping[str, str], limits: Any,
                     timeout_s: float = CONNECT_TIMEOUT_S) -> Deferred[UpstreamProtocol]:
    """Open the owner's socket; fires once it upgraded, fails if it refused, failed or took too long."""
    factory = _UpstreamFactory(url, headers=dict(headers), reactor=reactor)
    factory.setProtocolOptions(autoFragmentSize=0, tcpNoDelay=True, openHandshakeTimeout=timeout_s,
                               closeHandshakeTimeout=2, maxMessagePayloadSize=limits.max_message_bytes,
                               maxFramePayloadSize=limits.max_message_bytes)
    factory.opened = Deferred()
    connector = connectWS(factory, timeout=timeout_s)

    def timed_out(f: Any) -> Any:
        connector.disconnect()
        return f

    return factory.opened.addTimeout(timeout_s, reactor).addErrback(timed_out)


class Tunnel:
    """Tries the candidate owners in order; the first that upgrades is kept."""

    _log = Logger()

    def __init__(self, reactor: IReactorTime, limits: Any) -> None:
        self._reactor = reactor
        self._limits = limits

    async def open(self, bases: Sequence[str], path: str, params: Mapping[str, Sequence[str]],
                   headers: Mapping[str, str]) -> Optional[UpstreamProtocol]:
        for base in bases:
            url = forward_url(base, path, params)
            try:
                return await connect_upstream(self._reactor, url, headers, self._limits)
            except Exception as e:
                self._log.info("control: {url} did not take the socket: {e}", url=url, e=e)
        return None


class _BodyRelay(Protocol):
    """Copies an owner's response body into the client's request as it arrives (SSE included)."""

    def __init__(self, request: Any, done: Deferred[None]) -> None:
        self._request = request
        self._done = done

    def dataReceived(self, data: bytes) -> None:
        if not self._done.called:
            self._request.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if not self._done.called:
            self._done.callback(None)


#: Response headers copied from the owner.
_COPIED_HEADERS = (b"content-type", b"cache-control")


async def forward_http(agent: Any, clock: IReactorTime, request: Any, bases: Sequence[str], path: str,
                       body: Optional[bytes], headers: Mapping[str, str],
                       timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """Send ``request`` (same method, ``path`` + ``forward=true``) to the first base that knows the id
    and stream its answer back; False when none did (each answered 404 or could not be reached)."""
    method = request.method
    for base in bases:
        scheme, netloc = urlsplit(base)[:2]
        http_scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        url = f"{http_scheme}://{netloc}{path}{'&' if '?' in path else '?'}forward=true"
        send_headers = Headers({k: [v] for k, v in headers.items()})
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        try:
            pending = agent.request(method, url.encode("ascii"), send_headers, producer)
            response = await pending.addTimeout(timeout_s, clock)
        except Exception as e:
            _tunnel_log.info("REST {method} {url}: owner unreachable: {e}", method=method.decode(), url=url, e=e)
            continue
        if response.code == 404 and len(bases) > 1:
            response.deliverBody(_BodyRelay(_Discard(), Deferred()))
            continue
        request.setResponseCode(response.code)
        for name in _COPIED_HEADERS:
            values = response.headers.getRawHeaders(name)
            if values:
                request.setHeader(name, values[0])
        done: Deferred[None] = Deferred()
        relay = _BodyRelay(request, done)
        response.deliverBody(relay)
        gone = request.notifyFinish()
        gone.addErrback(lambda f: None)
        gone.addCallback(lambda _: None if done.called else done.callback(None))
        await done
        return True
    return False


class _Discard:
    def write(self, data: bytes) -> None:
        return None


_tunnel_log = Logger(namespace="activecall.control.tunnel")
