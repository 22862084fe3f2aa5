"""A local WebSocket server for provider tests: it speaks whatever protocol a test scripts.

    server = FakeWsServer(handler_factory)     # handler_factory(request) -> FakeWsHandler
    port = server.listen()                     # 127.0.0.1, a free port
    ... url = f"ws://127.0.0.1:{port}/v1/listen"
    server.stop()                              # Deferred

A handler sees the upgrade request (path, query, headers) and may refuse it with
an HTTP status (``deny``); then gets each message and can send back Text/Binary
frames or close.  Everything runs on the real reactor (trial tests).
"""

from __future__ import annotations

from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed


class FakeWsHandler:
    """Override what the scripted service does; ``self.peer`` sends frames."""

    deny: Optional[tuple[int, str]] = None  # set in __init__ to refuse the upgrade

    def __init__(self, request: Any) -> None:
        self.request = request
        self.path = request.path
        self.query = {k: v[-1] for k, v in parse_qs(urlsplit("ws://x" + request.path).query).items()} \
            if "?" in request.path else {k: v[-1] for k, v in (request.params or {}).items()}
        self.headers = {k.lower(): v for k, v in request.headers.items()}
        self.peer: Optional["_ServerProtocol"] = None
        self.texts: list[str] = []
        self.binaries: list[bytes] = []
        self.closed = Deferred()

    def opened(self) -> None:
        """The upgrade completed."""

    def on_text(self, text: str) -> None:
        self.texts.append(text)

    def on_binary(self, data: bytes) -> None:
        self.binaries.append(data)

    def send_text(self, text: str) -> None:
        assert self.peer is not None
        self.peer.sendMessage(text.encode("utf-8"), isBinary=False)

    def send_binary(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.sendMessage(data, isBinary=True)

    def close(self, code: int = 1000, reason: str = "") -> None:
        assert self.peer is not None
        self.peer.sendClose(code, reason or None)

    def drop(self) -> None:
        """Cut the TCP connection without a close handshake."""
        assert self.peer is not None
        self.peer.transport.abortConnection()


class _ServerProtocol(WebSocketServerProtocol):
    handler: Optional[FakeWsHandler] = None

    def onConnect(self, request: Any) -> None:
        handler = self.factory.make_handler(request)
        self.factory.handlers.append(handler)
        if handler.deny is not None:
            raise ConnectionDeny(*handler.deny)
        handler.peer = self
        self.handler = handler

    def onOpen(self) -> None:
        assert self.handler is not None
        self.handler.opened()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert self.handler is not None
        if isBinary:
            self.handler.on_binary(payload)
        else:
            self.handler.on_text(payload.decode("utf-8"))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if self.handler is not None and not self.handler.closed.called:
            self.handler.closed.callback((wasClean, code, reason))


class FakeWsServer:
    """Listens on 127.0.0.1; ``handlers`` lists every connection attempt's handler, in order."""

    def __init__(self, make_handler: Callable[[Any], FakeWsHandler]) -> None:
        self.factory = WebSocketServerFactory("ws://127.0.0.1")
        self.factory.protocol = _ServerProtocol
        self.factory.make_handler = make_handler
        self.factory.handlers = []
        self._port: Any = None

    @property
    def handlers(self) -> list[FakeWsHandler]:
        return self.factory.handlers

    def listen(self) -> int:
        self._port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        return self._port.getHost().port

    def stop(self) -> Deferred[Any]:
        for handler in self.handlers:
            if handler.peer is not None and handler.peer.transport is not None:
                handler.peer.transport.abortConnection()
        port, self._port = self._port, None
        return port.stopListening() if port is not None else succeed(None)
