"""End to end: ``mediaPass`` hands a /call session's audio to an external WebSocket server on 127.0.0.1 and
plays what that server sends back (protocol.md §4.7).

The server here is an echo: it records the query it was opened with and the size of every packet, and sends
each packet straight back, so the caller hears its own tone through the external server.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from harness import BASE_CONFIG, connect, free_port, start_daemon, talk_in_loop
from media_peer import power_at, tone

RATE = 16000


class EchoServer(WebSocketServerProtocol):
    def onConnect(self, request: Any) -> None:
        self.factory.queries.append(parse_qs(urlsplit(self.http_request_uri).query))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.sizes.append(len(payload))
        self.sendMessage(payload, isBinary=True)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.closed.append(code)
        if not self.factory.closed_d.called:
            self.factory.closed_d.callback(code)


class MediaPassTests(TestCase):
    timeout = 60

    async def test_caller_heard_through_the_external_server(self) -> None:
        factory = WebSocketServerFactory()
        factory.protocol = EchoServer
        factory.queries, factory.sizes, factory.closed = [], [], []
        factory.closed_d = Deferred()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"ws://127.0.0.1:{port.getHost().port}/agent?token=t1"

        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        daemon = await start_daemon(workdir, BASE_CONFIG)
        self.addCleanup(daemon.stop)
        client = await connect(f"{daemon.ws_url}/call?id=mp-1")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": RATE, "mediaPass": {
            "url": url, "inputSampleRate": 8000, "outputSampleRate": 8000, "packetSize": 1280}}})
        await client.wait_event("answer", trackId="mp-1")
        await client.wait_event("trackStart", trackId="server-side-track")
        talk_in_loop(self, client, tone(500.0, 1.0, RATE, 8000))

        def echoed() -> bool:
            pcm = b"".join(f for _, f in client.frames)
            return len(pcm) >= 640 * 25 and power_at(np.frombuffer(pcm[-640 * 25:], dtype="<i2"), 500.0, RATE) > 500

        await client.factory.waiters.wait(echoed, 10, "the caller's tone back through the external server")
        self.assertEqual(factory.queries[0]["token"], ["t1"])
        self.assertEqual((factory.queries[0]["sample_rate"], factory.queries[0]["packet_size"]), (["8000"], ["1280"]))
        # 1280 bytes at 16 kHz (40 ms) resampled to 8 kHz: 640 bytes each.
        self.assertEqual(set(factory.sizes[2:-2]), {640})
        client.send({"command": "hangup"})
        await client.wait_event("hangup", trackId="mp-1")
        # The daemon closes the external socket with the call (its close handshake reaches the server).
        await factory.closed_d.addTimeout(10, reactor)

    async def test_unreachable_server_is_an_error_and_the_call_goes_on(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        daemon = await start_daemon(workdir, BASE_CONFIG)
        self.addCleanup(daemon.stop)
        client = await connect(f"{daemon.ws_url}/call?id=mp-2")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        url = f"ws://127.0.0.1:{free_port()}/"
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": RATE, "mediaPass": {
            "url": url, "inputSampleRate": 16000, "outputSampleRate": 16000}}})
        await client.wait_event("answer", trackId="mp-2")
        error = await client.wait_event("error", sender=f"media_pass: {url}")
        self.assertIn("cannot connect", error["error"])
        client.send({"command": "invite", "option": {"mediaPass": {"url": url, "inputSampleRate": 4000,
                                                                   "outputSampleRate": 16000}}})
        bad = await client.wait_event("error", sender="command")
        self.assertIn("invite.option.mediaPass.inputSampleRate", bad["error"])
        client.send({"command": "tts", "text": "Still here.", "playId": "p", "endOfStream": True,
                     "option": {"provider": "piper"}})
        await client.wait_event("trackEnd", trackId="server-side-track", playId="p", timeout_s=30)
