"""Tests for activecall.testing_llm: the scripted chat-completions server, driven by OpenAIChat over a real socket."""

from __future__ import annotations

import json
from typing import Any, Iterator, Mapping

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from activecall.agent.llm import ChatResult, LlmError, OpenAIChat, ToolCall
from activecall.testing_llm import (
    CutReply,
    ErrorReply,
    GarbageReply,
    ScriptedLlm,
    StallReply,
    TextReply,
    ToolCallSpec,
    ToolCallsReply,
    echo_responder,
    listen_llm,
)

_MESSAGES = [{"role": "user", "content": "hi there"}]


class ScriptedLlmTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.llm = ScriptedLlm(reactor)
        self.server = listen_llm(reactor, self.llm)
        self.addCleanup(self.server.stop)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.client_clock = Clock()  # the client's deadlines: advanced by hand
        self.chat = OpenAIChat(http_client=self.http, clock=self.client_clock, environ={},
                               base_url=self.server.base_url, api_key="sk-scripted")

    def ask(self, **kw: Any) -> tuple[Deferred[ChatResult], list[str]]:
        got: list[str] = []
        return self.chat.stream(_MESSAGES, model="m1", on_delta=got.append, **kw), got

    @inlineCallbacks
    def test_text_chunks_and_recording(self) -> Iterator[Deferred[Any]]:
        """Scripted chunks arrive as deltas in order; the request body and headers are recorded."""
        self.llm.push(TextReply(["Hel", "lo ", "wörld."], chunk_delay_s=0.01))
        waiting = self.llm.next_request()
        d, got = self.ask(temperature=0.5)
        seen = yield waiting
        result = yield d
        self.assertEqual(result, ChatResult("Hello wörld.", (), "stop"))
        self.assertEqual(got, ["Hel", "lo ", "wörld."])
        [req] = self.llm.requests
        self.assertIs(seen, req)
        self.assertEqual(req.path, "/v1/chat/completions")
        self.assertEqual(req.headers["authorization"], "Bearer sk-scripted")
        self.assertEqual(req.body, {"model": "m1", "messages": _MESSAGES, "stream": True, "temperature": 0.5})
        self.assertTrue(req.stream)
        self.assertEqual(req.messages, _MESSAGES)

    @inlineCallbacks
    def test_sse_framing(self) -> Iterator[Deferred[Any]]:
        """The wire is OpenAI's: data: {chunk}\\n\\n events with chunk objects, ending data: [DONE]."""
        self.llm.push(TextReply(["a", "b"]))
        response = yield self.http.post(self.server.base_url + "/chat/completions",
                                        data=json.dumps({"model": "x", "messages": [], "stream": True}).encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        wire = (yield treq.content(response)).decode()
        self.assertTrue(wire.endswith("\n\ndata: [DONE]\n\n"))
        events = wire.split("\n\n")[:-1]
        self.assertTrue(all(e.startswith("data: ") for e in events))
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        self.assertEqual([c["choices"][0]["delta"] for c in chunks],
                         [{"role": "assistant", "content": ""}, {"content": "a"}, {"content": "b"}, {}])
        self.assertEqual([c["choices"][0]["finish_reason"] for c in chunks], [None, None, None, "stop"])
        for c in chunks:
            self.assertEqual((c["object"], c["model"], c["choices"][0]["index"]),
                             ("chat.completion.chunk", "scripted-model", 0))
            self.assertEqual(c["id"], chunks[0]["id"])

    @inlineCallbacks
    def test_first_token_delay(self) -> Iterator[Deferred[Any]]:
        """A first-token delay longer than the client's deadline makes the client give up; the server's timer is dropped."""
        llm = ScriptedLlm(self.reactor, default=TextReply(["late"], first_delay_s=30))
        server = listen_llm(self.reactor, llm)
        self.addCleanup(server.stop)
        chat = OpenAIChat(http_client=self.http, clock=self.client_clock, environ={}, base_url=server.base_url,
                          api_key="k")
        d = chat.stream(_MESSAGES, model="m", first_token_timeout_s=2)
        yield llm.next_request()
        self.client_clock.advance(2)
        err = yield self.assertFailure(d, LlmError)
        self.assertIn("no first token", str(err))

    @inlineCallbacks
    def test_delays_on_injected_clock(self) -> Iterator[Deferred[Any]]:
        """Delays run on the clock given to the server: nothing is sent until it advances."""
        clock = Clock()
        llm = ScriptedLlm(clock, replies=[TextReply(["one", "two"], first_delay_s=1.0, chunk_delay_s=0.5)])
        server = listen_llm(self.reactor, llm)
        self.addCleanup(server.stop)
        chat = OpenAIChat(http_client=self.http, clock=self.client_clock, environ={}, base_url=server.base_url,
                          api_key="k")
        got: list[str] = []
        arrived: list[Deferred[None]] = [Deferred(), Deferred()]
        d = chat.stream(_MESSAGES, model="m", on_delta=lambda t: (got.append(t), arrived[len(got) - 1].callback(None)))
        yield llm.next_request()
        clock.advance(0.9)
        self.assertEqual(got, [])
        clock.advance(0.1)
        yield arrived[0]
        self.assertEqual(got, ["one"])
        clock.advance(0.5)
        result = yield d
        self.assertEqual((result.text, got), ("onetwo", ["one", "two"]))

    @inlineCallbacks
    def test_tool_calls(self) -> Iterator[Deferred[Any]]:
        """Tool calls go out as tool_calls deltas, arguments in pieces, and assemble back whole."""
        self.llm.push(ToolCallsReply([ToolCallSpec("transfer", {"target": "sip:100@example.com"}, id="call_7", piece_chars=5),
                                      ToolCallSpec("hangup")], text=["One moment."]))
        d, got = self.ask()
        result = yield d
        self.assertEqual(result.tool_calls, (ToolCall("call_7", "transfer", '{"target": "sip:100@example.com"}'),
                                             ToolCall(result.tool_calls[1].id, "hangup", "{}")))
        self.assertEqual((result.text, result.finish_reason, got), ("One moment.", "tool_calls", ["One moment."]))

    @inlineCallbacks
    def test_tool_arguments_split(self) -> Iterator[Deferred[Any]]:
        """The arguments really are split: one delta per piece on the wire."""
        self.llm.push(ToolCallsReply([ToolCallSpec("f", '{"a": 12345}', piece_chars=4)]))
        response = yield self.http.post(self.server.base_url + "/chat/completions",
                                        data=json.dumps({"stream": True, "messages": []}).encode())
        wire = (yield treq.content(response)).decode()
        pieces = [json.loads(e[6:])["choices"][0]["delta"].get("tool_calls") for e in wire.split("\n\n")[:-2]]
        args = [p[0]["function"]["arguments"] for p in pieces if p and "name" not in p[0]["function"]]
        self.assertEqual(args, ['{"a"', ": 12", "345}"])

    @inlineCallbacks
    def test_http_error(self) -> Iterator[Deferred[Any]]:
        """An error reply gives its status and body; the client reports the server's message."""
        self.llm.push(ErrorReply(429, {"error": {"message": "slow down"}}), ErrorReply(401))
        err = yield self.assertFailure(self.ask()[0], LlmError)
        self.assertIn("HTTP 429: slow down", str(err))
        self.assertTrue(err.retryable)
        err = yield self.assertFailure(self.ask()[0], LlmError)
        self.assertIn("HTTP 401: scripted error 401", str(err))
        self.assertFalse(err.retryable)
        self.llm.push(ErrorReply(502, b"<html>bad gateway</html>"))
        response = yield self.http.post(self.server.base_url + "/chat/completions", data=b"{}")
        self.assertEqual((response.code, response.headers.getRawHeaders(b"content-type")), (502, [b"text/plain"]))
        self.assertEqual((yield response.content()), b"<html>bad gateway</html>")

    @inlineCallbacks
    def test_garbage(self) -> Iterator[Deferred[Any]]:
        """Non-JSON data lines after valid chunks fail the client as malformed, after the good deltas."""
        self.llm.push(GarbageReply(["{oops"], chunks_before=["fine"]))
        d, got = self.ask()
        err = yield self.assertFailure(d, LlmError)
        self.assertIn("malformed chunk: not JSON", str(err))
        self.assertEqual(got, ["fine"])

    @inlineCallbacks
    def test_cut_mid_stream(self) -> Iterator[Deferred[Any]]:
        """A cut reply drops the connection mid-event: a retryable error after the chunks that arrived."""
        self.llm.push(CutReply(["Hello", " there"]))
        d, got = self.ask()
        err = yield self.assertFailure(d, LlmError)
        self.assertTrue(err.retryable)
        self.assertEqual(got, ["Hello", " there"])

    @inlineCallbacks
    def test_stall_until_total_deadline(self) -> Iterator[Deferred[Any]]:
        """A stalled stream stays open; the client's total deadline ends it."""
        self.llm.push(StallReply(["part"]))
        first: Deferred[None] = Deferred()
        d = self.chat.stream(_MESSAGES, model="m", on_delta=lambda t: first.callback(None), total_timeout_s=5)
        yield first
        self.assertNoResult(d)
        self.client_clock.advance(5)
        err = yield self.assertFailure(d, LlmError)
        self.assertIn("not complete within 5 s", str(err))

    @inlineCallbacks
    def test_non_streaming(self) -> Iterator[Deferred[Any]]:
        """Without "stream": true the answer is one chat.completion object (text or tool calls)."""
        self.llm.push(TextReply(["a", "b"]), ToolCallsReply([ToolCallSpec("f", {"x": 1}, id="c1")]))
        url = self.server.base_url + "/chat/completions"
        response = yield self.http.post(url, data=json.dumps({"model": "m", "messages": []}).encode())
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        body = yield response.json()
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(body["choices"][0]["message"], {"role": "assistant", "content": "ab"})
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        body = yield (yield self.http.post(url, data=b'{"stream": false}')).json()
        self.assertEqual(body["choices"][0]["message"]["tool_calls"],
                         [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}])
        self.assertFalse(self.llm.requests[1].stream)

    @inlineCallbacks
    def test_default_and_responder(self) -> Iterator[Deferred[Any]]:
        """An empty queue gives the default reply, or the responder's (here: echo after a delay)."""
        result = yield self.ask()[0]
        self.assertEqual(result.text, "OK.")
        self.llm.default = TextReply(["Sure."])
        self.assertEqual((yield self.ask()[0]).text, "Sure.")
        self.llm.responder = echo_responder(self.reactor, delay_s=0.01, prefix="you said: ", chunk_chars=4)
        d, got = self.ask()
        result = yield d
        self.assertEqual(result.text, "you said: hi there")
        self.assertEqual(got[0], "you ")
        self.llm.push(TextReply(["queued first"]))
        self.assertEqual((yield self.ask()[0]).text, "queued first")

    @inlineCallbacks
    def test_bad_requests(self) -> Iterator[Deferred[Any]]:
        """A body that is not JSON is 400 (and still recorded); an unknown path is 404; GET is 405."""
        response = yield self.http.post(self.server.base_url + "/chat/completions", data=b"{nope")
        self.assertEqual(response.code, 400)
        yield response.content()
        self.assertIsNone(self.llm.requests[-1].body)
        response = yield self.http.post(self.server.base_url + "/embeddings", data=b"{}")
        self.assertEqual(response.code, 404)
        yield response.content()
        response = yield self.http.get(self.server.base_url + "/chat/completions")
        self.assertEqual(response.code, 405)
        yield response.content()

    @inlineCallbacks
    def test_responder_failure(self) -> Iterator[Deferred[Any]]:
        """A responder that raises gives a 500 error, not a hung request."""

        def broken(body: Mapping[str, Any]) -> Any:
            raise RuntimeError("bench bug")

        self.llm.responder = broken
        err = yield self.assertFailure(self.ask()[0], LlmError)
        self.assertIn("HTTP 500: responder failed: bench bug", str(err))
