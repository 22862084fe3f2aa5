"""A WebSocket client connection for the streaming speech providers (Autobahn, Twisted).

One small adapter so every provider speaks to its service the same way::

    d = connect_ws(reactor, "wss://api.example.com/v1/listen?x=1",
                   headers={"Authorization": "Token ..."}, listener=my_listener)
    conn = await d            # fails with WsConnectError (refused, timeout, HTTP status)
    conn.send_text(json.dumps({...}))
    conn.send_binary(pcm)
    conn.close()              # listener.ws_closed(...) follows

The listener's methods run on the reactor thread.  Messages bigger than
``max_message_bytes`` close the connection (1009), so a hostile or broken
server cannot make us buffer without bound.
"""

from __future__ import annotations

from typing import Mapping, Optional, Protocol
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

__all__ = ["WsListener", "WsConnection", "WsConnectError", "connect_ws", "DEFAULT_MAX_MESSAGE_BYTES"]

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT_S = 5.0


class WsConnectError(Exception):
    """The WebSocket could not be opened; ``status`` is the HTTP status of a refused upgrade, if any."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class WsListener(Protocol):
    """What a provider hears from its connection (reactor thread)."""

    def ws_text(self, text: str) -> None:
        """A Text message."""

    def ws_binary(self, data: bytes) -> None:
        """A Binary message."""

    def ws_closed(self, clean: bool, code: Optional[int], reason: str) -> None:
        """The connection is gone (after a close handshake when ``clean``)."""


class WsConnection:
    """An open connection: send frames, close it."""

    def __init__(self, protocol: "_ClientProtocol") -> None:
        self._protocol = protocol
        self.open = True

    def send_text(self, text: str) -> None:
        if self.open:
            self._protocol.sendMessage(text.encode("utf-8"), isBinary=False)

    def send_binary(self, data: bytes) -> None:
        if self.open:
            self._protocol.sendMessage(data, isBinary=True)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake (idempotent); ``ws_closed`` follows."""
        if self.open:
            self.open = False
            self._protocol.sendClose(code, reason or None)

    def abort(self) -> None:
        """Drop the TCP connection without a handshake."""
        self.open = False
        transport = self._protocol.transport
        if transport is not None:
            transport.abortConnection()


class _ClientProtocol(WebSocketClientProtocol):
    factory: "_ClientFactory"
    connection: Optional[WsConnection] = None

    def connectionMade(self) -> None:
        # Audio goes out in small real-time messages: Nagle would hold them for the peer's delayed ACK.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        super().connectionMade()

    def onConnect(self, response: object) -> None:
        pass

    def onOpen(self) -> None:
        self.connection = WsConnection(self)
        d, self.factory.opened = self.factory.opened, None
        if d is not None:
            d.callback(self.connection)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        listener = self.factory.listener
        if isBinary:
            listener.ws_binary(payload)
            return
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            self.sendClose(1007)
            return
        listener.ws_text(text)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        factory = self.factory
        if self.connection is not None:
            self.connection.open = False
        d, factory.opened = factory.opened, None
        if d is not None:
            status = getattr(self, "_ac_status", None)
            d.errback(WsConnectError(f"WebSocket handshake failed: {reason or 'connection closed'}", status))
            return
        factory.listener.ws_closed(bool(wasClean), code, reason or "")

    def processHandshake(self) -> object:
        # Keep the HTTP status of a refused upgrade (401, 403, 429...) for the error text.
        result = super().processHandshake()
        fields = str(getattr(self, "http_status_line", "") or "").split()
        if len(fields) >= 2 and fields[1].isdigit() and fields[1] != "101":
            self._ac_status = int(fields[1])
        return result


class _ClientFactory(WebSocketClientFactory):
    protocol = _ClientProtocol
    _log = Logger()

    def __init__(self, url: str, headers: Mapping[str, str], listener: WsListener, max_message_bytes: int,
                 reactor: object) -> None:
        super().__init__(url, headers=dict(headers), reactor=reactor)
        self.listener = listener
        self.opened: Optional[Deferred[WsConnection]] = Deferred(self._cancel)
        self.connector: object = None
        self.setProtocolOptions(maxMessagePayloadSize=max_message_bytes, maxFramePayloadSize=max_message_bytes,
                                openHandshakeTimeout=DEFAULT_CONNECT_TIMEOUT_S, closeHandshakeTimeout=2.0,
                                autoPingInterval=None)

    def _cancel(self, d: Deferred[WsConnection]) -> None:
        self.opened = None
        connector = self.connector
        if connector is not None:
            connector.disconnect()  # type: ignore[attr-defined]

    def clientConnectionFailed(self, connector: object, reason: object) -> None:
        d, self.opened = self.opened, None
        if d is not None:
            d.errback(WsConnectError(f"cannot connect: {getattr(reason, 'getErrorMessage', lambda: reason)()}"))


def connect_ws(reactor: IReactorTCP | IReactorTime, url: str, *, headers: Mapping[str, str] | None = None,
               listener: WsListener, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
               connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> Deferred[WsConnection]:
    """Open a WebSocket to ``url`` (``ws://`` or ``wss://``, TLS checked against the host name).

    Fires with a :class:`WsConnection` once the upgrade succeeded; fails with
    :class:`WsConnectError`.  Cancelling the Deferred drops the attempt.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise WsConnectError(f"not a ws:// or wss:// URL: {url[:200]}")
    factory = _ClientFactory(url, headers or {}, listener, max_message_bytes, reactor)
    d = factory.opened
    assert d is not None
    context = optionsForClientTLS(parts.hostname) if parts.scheme == "wss" else None
    factory.connector = connectWS(factory, contextFactory=context, timeout=connect_timeout_s)
    return d
