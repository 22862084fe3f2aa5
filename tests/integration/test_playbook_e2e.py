"""End to end: playbooks drive /call sessions of the real daemon.

The caller's speech is espeak-ng, heard by the daemon's Silero VAD and offline Whisper; the model is
:class:`activecall.testing_llm.ScriptedLlm` on 127.0.0.1 in this process (OpenAI's streaming wire
protocol); the agent speaks with Piper; the post-call hook goes to a local HTTP receiver.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from harness import BASE_CONFIG, CallClient, connect, http_client, start_daemon
from test_speech_e2e import RATE, _Talker, speech

from activecall.testing_llm import ErrorReply, ScriptedLlm, TextReply, ToolCallSpec, ToolCallsReply, listen_llm

AUDIBLE = 300


class _HookReceiver(Resource):
    """Records the JSON bodies POSTed to it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._waiters: list[Deferred[None]] = []

    def render_POST(self, request: Any) -> bytes:
        self.bodies.append(json.loads(request.content.read()))
        self.headers.append({k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()})
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)
        return b"ok"

    def wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.bodies:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d


def audible_frames(client: CallClient) -> int:
    return sum(1 for _, f in client.frames
               if int(np.abs(np.frombuffer(f[: len(f) // 2 * 2], "<i2")).max(initial=0)) > AUDIBLE)


class PlaybookSessionTests(TestCase):
    timeout = 150

    async def _daemon(self) -> Any:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "config", "playbook"))
        self.workdir = workdir
        daemon = await start_daemon(workdir, BASE_CONFIG)
        self.addCleanup(daemon.stop)
        self.addCleanup(lambda: open(os.environ["SHOW_DAEMON"], "w").write(workdir + "\n" + daemon.output) if os.environ.get("SHOW_DAEMON") else None)
        return daemon

    def _llm(self, *replies: Any) -> Any:
        llm = ScriptedLlm(reactor, replies=replies)
        listening = listen_llm(reactor, llm)
        self.addCleanup(listening.stop)
        return listening

    def _hook(self) -> tuple[_HookReceiver, int]:
        receiver = _HookReceiver()
        port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return receiver, port.getHost().port

    async def test_llm_playbook_conversation_actions_and_posthook(self) -> None:
        """option.playbook (inline) on /call: greeting audio; spoken words reach the model as the user turn;
        the streamed reply is spoken with its tags taken out (split across chunks); <hangup/> ends the call
        after the goodbye; the posthook carries the summary and the history."""
        daemon = await self._daemon()
        llm = self._llm(
            TextReply(chunks=("We open at nine", " in the morning. <set_", 'var key="topic" value="hours"/>',
                              "Goodbye! <hang", "up/>")),
            TextReply(chunks=("The caller asked about opening hours.",)),  # the posthook's summary
        )
        hook, hook_port = self._hook()
        playbook = f"""---
asr: {{provider: whisper, language: en}}
tts: {{provider: piper}}
vad: {{type: silero}}
llm:
  provider: openai
  baseUrl: {llm.base_url}
  model: scripted
greeting: Hello, this is the shop.
posthook:
  url: http://127.0.0.1:{hook_port}/hook
  summary: short
  headers: {{X-Token: abc}}
---
# Scene: main
You are the shop's phone assistant for {{{{ session_id }}}}.
"""
        sid = "pb-llm-1"
        client = await connect(f"{daemon.ws_url}/call?id={sid}")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": RATE, "playbook": playbook}})
        await client.wait_event("answer", trackId=sid)
        await client.wait_event("addHistory", text="Hello, this is the shop.")
        words = speech("When do you open tomorrow?", self.workdir)
        talker = _Talker(client, bytes(RATE * 2 * 3) + words + bytes(RATE * 2 * 4))
        self.addCleanup(talker.stop)
        request = await llm.llm.next_request()
        messages = request.messages
        self.assertEqual(messages[0]["role"], "system")
        self.assertIn(f"You are the shop's phone assistant for {sid}.", messages[0]["content"])
        self.assertEqual(messages[-1]["role"], "user")
        self.assertIn("open", messages[-1]["content"].lower())
        self.assertTrue(request.stream)
        hangup = await client.wait_event("hangup", timeout_s=60)
        self.assertEqual(hangup["reason"], "bySystem")
        spoken = [e["data"]["text"] for e in client.events if e.get("event") == "metrics" and e.get("key") == "tts_play_id_map"]
        self.assertIn("Hello, this is the shop.", spoken)
        self.assertFalse(any("<" in t for t in spoken), spoken)
        histories = [e["text"] for e in client.events if e.get("event") == "addHistory"]
        self.assertIn('We open at nine in the morning. <set_var key="topic" value="hours"/>Goodbye! <hangup/>', histories)
        self.assertGreater(audible_frames(client), 50, "greeting and reply were heard")
        await hook.wait()
        [body] = hook.bodies
        self.assertEqual(body["sessionId"], sid)
        self.assertEqual(body["summary"], "The caller asked about opening hours.")
        self.assertEqual([m["role"] for m in body["history"]][:2], ["system", "user"])
        self.assertEqual(body["history"][-1]["role"], "assistant")
        self.assertRegex(body["timestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
        self.assertEqual(hook.headers[0]["x-token"], "abc")
        summary_request = llm.llm.requests[-1]
        self.assertEqual(summary_request.messages[-1]["role"], "user")

    async def test_api_run_with_tools_mode_and_a_failing_model(self) -> None:
        """POST /api/playbook/run, then /call?id=: the stored playbook drives the session. The model fails
        first (the caller hears the apology, an error event names the model), then answers with tool calls."""
        daemon = await self._daemon()
        llm = self._llm(
            ErrorReply(status=500),
            ToolCallsReply(text=("Goodbye.",), calls=(ToolCallSpec("hangup", {"reason": "done"}),)),
        )
        playbook = f"""---
asr: {{provider: whisper, language: en}}
tts: {{provider: piper}}
vad: {{type: silero}}
llm:
  provider: openai
  baseUrl: {llm.base_url}
  toolMode: tools
  apology: Sorry, one moment please.
---
You are a terse assistant.
"""
        response = await http_client().post(f"{daemon.base_url}/api/playbook/run", json.dumps({"content": playbook}).encode(),
                                   headers={"Content-Type": "application/json"})
        self.assertEqual(response.code, 200)
        sid = json.loads(await response.content())["session_id"]
        client = await connect(f"{daemon.ws_url}/call?id={sid}")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": RATE}})
        await client.wait_event("answer", trackId=sid)
        # No greeting: the model is asked at once, fails, and the apology is spoken.
        error = await client.wait_event("error", sender="llm", timeout_s=30)
        self.assertIn("500", error["error"])
        await client.wait_event("metrics", key="tts_play_id_map")
        talker = _Talker(client, bytes(RATE * 2 * 2) + speech("Thanks, bye.", self.workdir) + bytes(RATE * 2 * 4))
        self.addCleanup(talker.stop)
        await client.wait_event("hangup", timeout_s=60)
        second = llm.llm.requests[1]
        self.assertIn("hangup", {t["function"]["name"] for t in second.body["tools"]})
        self.assertEqual(second.messages[-1]["role"], "user")
        spoken = [e["data"]["text"] for e in client.events if e.get("event") == "metrics" and e.get("key") == "tts_play_id_map"]
        self.assertEqual(spoken[0], "Sorry, one moment please.")

    async def test_bad_playbook_is_an_error_event_and_loses_nothing(self) -> None:
        """An inline playbook with a broken template: an error event with the line; the session stays usable."""
        daemon = await self._daemon()
        sid = "pb-bad"
        client = await connect(f"{daemon.ws_url}/call?id={sid}")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": RATE,
                                                      "playbook": "---\ngreeting: hi\n---\nHello {{ oops\n"}})
        error = await client.wait_event("error", sender="playbook")
        self.assertIn("line", error["error"])
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": RATE}})
        await client.wait_event("answer", trackId=sid)
