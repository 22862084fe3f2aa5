"""End to end: realtime mode against a local server speaking OpenAI's Realtime WebSocket protocol.

The server (``ScriptedRealtime``) checks what a real one would: the headers, ``session.update``, base64
pcm16 at 24 kHz in ``input_audio_buffer.append``.  Once it has heard 300 ms of the caller's tone it plays
what server VAD and a model do: ``input_audio_buffer.speech_started``, then a response with a transcript
delta, 0.6 s of a 24 kHz tone as ``response.audio.delta`` and a function call.  The /call client must see
``speaking``, ``interrupt``, ``asrDelta``, ``functionCall`` and hear the model's tone.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import numpy as np
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from harness import BASE_CONFIG, connect, start_daemon, talk_in_loop
from media_peer import dominant_hz, tone

RATE = 16000


class ScriptedRealtime(WebSocketServerProtocol):
    def onConnect(self, request: Any) -> None:
        self.factory.seen_headers.append(dict(request.headers))
        self.heard = bytearray()
        self.answered = False

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = json.loads(payload)
        self.factory.received.append(message["type"])
        if message["type"] == "session.update":
            self.factory.session = message["session"]
            self.send({"type": "session.updated", "session": message["session"]})
        elif message["type"] == "input_audio_buffer.append":
            self.heard += base64.b64decode(message["audio"])
            if len(self.heard) >= 24000 * 2 * 3 // 10 and not self.answered:
                self.answered = True
                self.factory.heard_hz = dominant_hz(np.frombuffer(bytes(self.heard[-24000:]), dtype="<i2"), 24000)
                self.answer()

    def send(self, message: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(message).encode(), isBinary=False)

    def answer(self) -> None:
        self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "item_in"})
        self.send({"type": "response.created", "response": {"id": "resp_1"}})
        self.send({"type": "response.audio_transcript.delta", "item_id": "item_1", "delta": "Hello there"})
        voice = tone(700.0, 0.6, 24000, 8000)
        for i in range(0, len(voice), 4800):
            self.send({"type": "response.audio.delta", "item_id": "item_1",
                       "delta": base64.b64encode(voice[i:i + 4800]).decode()})
        self.send({"type": "response.function_call_arguments.done", "call_id": "call_9", "name": "hangup_call",
                   "arguments": json.dumps({"reason": "done"})})
        self.send({"type": "response.done", "response": {"id": "resp_1"}})


class RealtimeTests(TestCase):
    timeout = 60

    async def test_caller_and_model_talk_over_the_realtime_protocol(self) -> None:
        factory = WebSocketServerFactory()
        factory.protocol = ScriptedRealtime
        factory.seen_headers, factory.received, factory.session, factory.heard_hz = [], [], None, None
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        daemon = await start_daemon(workdir, BASE_CONFIG)
        self.addCleanup(daemon.stop)
        client = await connect(f"{daemon.ws_url}/call?id=rt-1")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": RATE, "realtime": {
            "provider": f"ws://127.0.0.1:{port.getHost().port}/v1/realtime", "secretKey": "sk-rt",
            "tools": [{"type": "function", "name": "hangup_call", "parameters": {"type": "object"}}],
            "extra": {"instructions": "Be brief.", "voice": "verse"}}}})
        await client.wait_event("answer", trackId="rt-1")
        talk_in_loop(self, client, tone(440.0, 1.0, RATE, 8000))
        await client.wait_event("speaking", trackId="rt-1")
        await client.wait_event("interrupt", receiver="rt-1")
        delta = await client.wait_event("asrDelta", trackId="rt-1")
        self.assertEqual(delta["text"], "Hello there")
        call = await client.wait_event("functionCall", trackId="rt-1")
        self.assertEqual((call["callId"], call["name"], json.loads(call["arguments"])),
                         ("call_9", "hangup_call", {"reason": "done"}))

        def model_heard() -> bool:
            loud = [f for _, f in client.frames if np.abs(np.frombuffer(f, dtype="<i2")).max(initial=0) > 2000]
            return len(loud) >= 25 and abs(dominant_hz(np.frombuffer(b"".join(loud[:25]), dtype="<i2"), RATE) - 700.0) < 20

        await client.factory.waiters.wait(model_heard, 10, "the model's 700 Hz voice")
        headers = factory.seen_headers[0]
        self.assertEqual((headers["authorization"], headers["openai-beta"]), ("Bearer sk-rt", "realtime=v1"))
        session = factory.session
        self.assertEqual((session["voice"], session["instructions"], session["input_audio_format"]),
                         ("verse", "Be brief.", "pcm16"))
        self.assertEqual(session["turn_detection"]["type"], "server_vad")
        self.assertEqual(session["tools"][0]["name"], "hangup_call")
        self.assertLess(abs(factory.heard_hz - 440.0), 10, "the caller's tone reached the model at 24 kHz")
        names = [e["event"] for e in client.events]
        self.assertNotIn("silence", names)  # no VAD of our own runs in realtime mode
        client.send({"command": "hangup"})
        await client.wait_event("hangup", trackId="rt-1")

    async def test_missing_endpoint_is_an_error(self) -> None:
        """azure without its endpoint and key: error{realtime} naming them, and the call goes on."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        daemon = await start_daemon(workdir, BASE_CONFIG)
        self.addCleanup(daemon.stop)
        client = await connect(f"{daemon.ws_url}/call?id=rt-2")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": RATE, "realtime": {"provider": "azure"}}})
        await client.wait_event("answer", trackId="rt-2")
        error = await client.wait_event("error", sender="realtime")
        self.assertIn("realtime.endpoint and realtime.secretKey are required", error["error"])
        client.send({"command": "tts", "text": "Still here.", "playId": "p", "endOfStream": True,
                     "option": {"provider": "piper"}})
        await client.wait_event("trackEnd", trackId="server-side-track", playId="p", timeout_s=30)
