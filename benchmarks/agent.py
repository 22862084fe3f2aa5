"""The webhook application the load benchmarks run: it answers every inbound call with a prompt.

For each webhook POST it opens ``/call/sip?id=<dialogId>``, accepts, plays the prompt with
``autoHangup`` (so the daemon sends BYE when it ends) and counts what happened.
"""

from __future__ import annotations

import json
import math
import os
import sys
import wave
from typing import Any, Callable
from urllib.parse import quote

import numpy as np
from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from ws_tts_sessions import connect as raw_connect


def write_tone(path: str, seconds: float) -> None:
    """A 440 Hz 16 kHz mono WAV of ``seconds`` (the agent's prompt)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        n = int(16000 * seconds)
        w.writeframes((6000 * np.sin(2 * math.pi * 440 * np.arange(n) / 16000)).astype("<i2").tobytes())


class WebhookAgent:
    """Listens on 127.0.0.1 for the daemon's webhook; set :attr:`http_port` once the daemon runs.

    ``ignore(payload)`` true = leave that call unanswered (an attacker's, say);
    ``accept_option`` is the ``accept`` command's option (``vad``, ``asr`` ...).
    """

    def __init__(self, prompt: str, hangup_timeout_s: float, *, query: str = "dump=false",
                 ignore: Callable[[dict[str, Any]], bool] = lambda payload: False,
                 accept_option: dict[str, Any] | None = None) -> None:
        self.prompt = prompt
        self.accept_option = dict(accept_option or {})
        self.http_port = 0
        self.counts = {"accepted": 0, "hangups": 0, "errors": 0, "ignored": 0, "speaking": 0}
        self._hangup_timeout_s = hangup_timeout_s
        self._query = query
        self._ignore = ignore
        agent = self

        class Hook(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                payload = json.loads(request.content.read())
                if agent._ignore(payload):
                    agent.counts["ignored"] += 1
                else:
                    defer.ensureDeferred(agent._answer(payload))
                return b'{"status":"ok"}'

        self.port = reactor.listenTCP(0, Site(Hook()), interface="127.0.0.1")

    @property
    def webhook_config(self) -> str:
        """The daemon's ``[handler]`` table pointing at this agent."""
        return f'[handler]\ntype = "webhook"\nurl = "http://127.0.0.1:{self.port.getHost().port}/hook"\n'

    @property
    def in_call(self) -> int:
        return self.counts["accepted"] - self.counts["hangups"]

    async def _answer(self, payload: dict[str, Any]) -> None:
        try:
            client = await raw_connect(self.http_port, f"/call/sip?id={quote(payload['dialogId'], safe='')}&{self._query}")
            client.send({"command": "accept", "option": self.accept_option})
            await client.wait_event("answer", timeout_s=30)
            self.counts["accepted"] += 1
            client.send({"command": "play", "url": self.prompt, "autoHangup": True})
            await client.wait_event("hangup", timeout_s=self._hangup_timeout_s)
            self.counts["hangups"] += 1
            self.counts["speaking"] += sum(1 for e in client.events if e.get("event") == "speaking")  # VAD heard
            client.transport.loseConnection()
        except Exception as e:  # counted and reported: a benchmark goes on
            self.counts["errors"] += 1
            print("agent error:", e, file=sys.stderr)

    def stop(self) -> Any:
        return self.port.stopListening()
