"""The control WebSocket: Autobahn frames <-> a session. No call logic here."""

from __future__ import annotations

from typing import Any, Optional, Protocol

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.logger import Logger
from zope.interface import implementer

from activecall.control.query import QueryError, SessionParams, parse_session_query
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
    def __contains__(self, sid: str) -> bool: ...


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
        self._proto.sendPing(payload)

    def close(self) -> None:
        self._proto.sendClose()


class ControlProtocol(WebSocketServerProtocol):
    """One client connection on /call, /call/sip or /call/webrtc."""

    _log = Logger()
    factory: "ControlFactory"

    def __init__(self) -> None:
        super().__init__()
        self._params: Optional[SessionParams] = None
        self._session: Optional[ISession] = None

    def onConnect(self, request: ConnectionRequest) -> None:
        host = self.factory.host
        try:
            params = parse_session_query(request.params, self.factory.call_type, host.new_sid)
        except QueryError as e:
            raise ConnectionDeny(400, str(e))
        if params.forward is not None and params.sid not in host:
            raise ConnectionDeny(404, "call not found on this node")
        self._params = params

    def onOpen(self) -> None:
        assert self._params is not None
        session = self.factory.host.open(self._params)
        session.attach(_Channel(self))
        self._session = session

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
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
        session, self._session = self._session, None
        if session is not None:
            session.client_closed()


class ControlFactory(WebSocketServerFactory):
    """The factory of one endpoint; ``call_type`` is fixed by its path."""

    protocol = ControlProtocol

    def __init__(self, host: ISessionHost, call_type: str, url: str) -> None:
        super().__init__(url)
        self.noisy = False
        self.host = host
        self.call_type = call_type
        # Audio frames are small and frequent: no fragmentation, no Nagle delay.
        self.setProtocolOptions(autoFragmentSize=0, tcpNoDelay=True, openHandshakeTimeout=10, closeHandshakeTimeout=2)
