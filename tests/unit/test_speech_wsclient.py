"""The provider WebSocket client against a local server: open, frames both ways, refusals, limits."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from activecall.speech.wsclient import WsConnectError, connect_ws
from wsfake import FakeWsHandler, FakeWsServer


class _Listener:
    def __init__(self) -> None:
        self.texts: list[str] = []
        self.binaries: list[bytes] = []
        self.closed: Deferred[Any] = Deferred()
        self.got_text: Deferred[str] = Deferred()

    def ws_text(self, text: str) -> None:
        self.texts.append(text)
        if not self.got_text.called:
            self.got_text.callback(text)

    def ws_binary(self, data: bytes) -> None:
        self.binaries.append(data)

    def ws_closed(self, clean: bool, code: Optional[int], reason: str) -> None:
        self.closed.callback((clean, code))


class _Echo(FakeWsHandler):
    def on_text(self, text: str) -> None:
        super().on_text(text)
        self.send_text("echo:" + text)

    def on_binary(self, data: bytes) -> None:
        super().on_binary(data)
        self.send_binary(data[::-1])


class _Deny(FakeWsHandler):
    def __init__(self, request: Any) -> None:
        super().__init__(request)
        self.deny = (401, "Unauthorized")


class WsClientTests(TestCase):
    timeout = 10

    async def _serve(self, handler: type[FakeWsHandler]) -> int:
        server = FakeWsServer(handler)
        port = server.listen()
        self.addCleanup(server.stop)
        self.server = server
        return port

    async def test_frames_both_ways_headers_and_close(self) -> None:
        port = await self._serve(_Echo)
        listener = _Listener()
        conn = await connect_ws(reactor, f"ws://127.0.0.1:{port}/v1/listen?model=x",
                                headers={"Authorization": "Token k"}, listener=listener)
        conn.send_text("hi")
        self.assertEqual(await listener.got_text, "echo:hi")
        handler = self.server.handlers[0]
        self.assertEqual(handler.headers["authorization"], "Token k")
        self.assertEqual(handler.query, {"model": "x"})
        conn.close()
        clean, code = await listener.closed
        self.assertTrue(clean)
        self.assertEqual(code, 1000)

    async def test_refused_upgrade_fails_with_status(self) -> None:
        port = await self._serve(_Deny)
        with self.assertRaises(WsConnectError) as cm:
            await connect_ws(reactor, f"ws://127.0.0.1:{port}/", listener=_Listener())
        self.assertIn("handshake", str(cm.exception))
        self.assertEqual(cm.exception.status, 401)

    async def test_connection_refused(self) -> None:
        port = await self._serve(_Echo)
        await self.server.stop()
        with self.assertRaises(WsConnectError):
            await connect_ws(reactor, f"ws://127.0.0.1:{port}/", listener=_Listener())

    def test_bad_scheme(self) -> None:
        with self.assertRaises(WsConnectError):
            connect_ws(reactor, "http://127.0.0.1/", listener=_Listener())

    async def test_oversized_message_closes(self) -> None:
        class Big(FakeWsHandler):
            def opened(self) -> None:
                self.send_binary(b"x" * 5000)

        port = await self._serve(Big)
        listener = _Listener()
        await connect_ws(reactor, f"ws://127.0.0.1:{port}/", listener=listener, max_message_bytes=1000)
        clean, code = await listener.closed
        self.assertEqual(listener.binaries, [])
        self.assertIn(code, (1006, 1009))  # autobahn fails the connection: 1009 sent, TCP dropped
