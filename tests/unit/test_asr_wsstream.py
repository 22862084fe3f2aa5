"""WsRecognitionStream: background connect, bounded pre-connect buffer, exactly-once failure, bounded close."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from activecall.fetch import FetchRefusedError
from activecall.speech.asr.wsstream import WsRecognitionStream, check_ws_url
from activecall.speech.interfaces import Transcript
from activecall.testing import RecordingListener
from wsfake import FakeWsHandler, FakeWsServer

FRAME = b"\x00\x01" * 320




class _Vendor(WsRecognitionStream):
    provider = "vendor"

    def opened(self) -> None:
        assert self.conn is not None
        self.conn.send_text("start")

    def text_received(self, text: str) -> None:
        if text == "started":
            self.ready()
        elif text.startswith("final:"):
            self.emit(Transcript(0, text[6:], True))

    def finish_audio(self) -> None:
        assert self.conn is not None
        self.conn.send_text("end")


class _Service(FakeWsHandler):
    """Answers start with started, audio bytes are counted, end with a final and a close."""

    silent_on_end = False

    def on_text(self, text: str) -> None:
        super().on_text(text)
        if text == "start":
            self.send_text("started")
        elif text == "end" and not self.silent_on_end:
            self.send_text(f"final:{sum(map(len, self.binaries))}")
            self.close()


async def _until(predicate: Any, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("condition not reached in time")


class WsRecognitionStreamTests(TestCase):
    timeout = 10

    def _server(self, handler: Any) -> int:
        server = FakeWsServer(handler)
        port = server.listen()
        self.addCleanup(server.stop)
        self.server = server
        return port

    async def test_audio_buffered_until_ready_then_final_on_close(self) -> None:
        """Audio written before the vendor is ready is sent after; close() waits for the last result."""
        port = self._server(_Service)
        listener = RecordingListener()
        stream = _Vendor(reactor=reactor, clock=reactor, url=f"ws://127.0.0.1:{port}/", headers={}, listener=listener)
        for _ in range(10):
            stream.write(FRAME)
        await stream.close()
        self.assertEqual([r.text for r in listener.results], [str(10 * len(FRAME))])
        self.assertEqual(listener.failures, [])

    async def test_pre_connect_buffer_is_bounded(self) -> None:
        """Beyond max_buffer_ms the oldest audio is dropped."""
        port = self._server(_Service)
        stream = _Vendor(reactor=reactor, clock=reactor, url=f"ws://127.0.0.1:{port}/", headers={},
                         listener=RecordingListener(), max_buffer_ms=100)
        for _ in range(20):
            stream.write(FRAME)
        self.assertEqual(stream.dropped_bytes, 15 * len(FRAME))
        await stream.close()

    async def test_drop_mid_stream_fails_once_retryable(self) -> None:
        """A vendor that cuts the TCP connection gives one retryable failure."""
        port = self._server(_Service)
        listener = RecordingListener()
        stream = _Vendor(reactor=reactor, clock=reactor, url=f"ws://127.0.0.1:{port}/", headers={}, listener=listener)
        await _until(lambda: stream._ready)
        self.server.handlers[0].drop()
        error = await listener.failed_d
        self.assertTrue(error.retryable)
        stream.write(FRAME)
        await stream.close()
        self.assertEqual(len(listener.failures), 1)

    async def test_refused_upgrade_not_retryable(self) -> None:
        """401 at the upgrade: a non-retryable failure naming the status."""
        class Deny(FakeWsHandler):
            def __init__(self, request: Any) -> None:
                super().__init__(request)
                self.deny = (401, "Unauthorized")

        port = self._server(Deny)
        listener = RecordingListener()
        _Vendor(reactor=reactor, clock=reactor, url=f"ws://127.0.0.1:{port}/", headers={}, listener=listener)
        error = await listener.failed_d
        self.assertFalse(error.retryable)
        self.assertIn("vendor", str(error))

    async def test_close_bounded_when_vendor_never_finishes(self) -> None:
        """close() fires after close_timeout_s even if the vendor keeps quiet."""
        class Quiet(_Service):
            silent_on_end = True

        port = self._server(Quiet)
        listener = RecordingListener()
        stream = _Vendor(reactor=reactor, clock=reactor, url=f"ws://127.0.0.1:{port}/", headers={}, listener=listener,
                         close_timeout_s=0.2)
        await _until(lambda: stream._ready)
        await stream.close()
        self.assertEqual(listener.failures, [])

    def test_ws_url_policy(self) -> None:
        """Only ws/wss URLs to allowed hosts pass."""
        self.assertEqual(check_ws_url("wss://API.deepgram.com/v1/listen", ()), "api.deepgram.com")
        with self.assertRaises(FetchRefusedError):
            check_ws_url("http://x/", ())
        with self.assertRaises(FetchRefusedError):
            check_ws_url("wss://evil.example/", ("api.deepgram.com",))
