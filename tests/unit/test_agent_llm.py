"""Tests for activecall.agent.llm: the pure SSE/chunk layers, and OpenAIChat against a local server."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from activecall.agent.llm import (
    ChatAssembler,
    ChatDelta,
    ChatResult,
    LlmError,
    OpenAIChat,
    SseDecoder,
    SseError,
    ToolCall,
    ToolCallDelta,
    chat_url,
    parse_chunk,
)
from activecall.config import FetchConfig

_KEY = "sk-test-llm"


def _chunk(content: Optional[str] = None, tool_calls: Optional[list[Any]] = None, finish: Optional[str] = None) -> bytes:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    out, pos = [], 0
    for c in sorted(set(cuts)):
        out.append(data[pos:c])
        pos = c
    out.append(data[pos:])
    return [p for p in out if p]


# -- SseDecoder ----------------------------------------------------------------------


class SseDecoderTests(SynchronousTestCase):
    def test_events_and_line_endings(self) -> None:
        """LF, CRLF and CR all end lines; a blank line ends an event; the optional space is dropped."""
        d = SseDecoder()
        self.assertEqual(d.feed(b"data: a\n\ndata:b\r\n\r\ndata: c\r\rdata:  d\n\n"), ["a", "b", "c", " d"])

    def test_crlf_split_across_pieces(self) -> None:
        """A CR at the end of one piece and LF at the start of the next are one line end, not two."""
        d = SseDecoder()
        self.assertEqual(d.feed(b"data: x\r"), [])
        self.assertEqual(d.feed(b"\ndata: y\r"), [])  # the LF does not end the event
        self.assertEqual(d.feed(b"\n\r\n"), ["x\ny"])

    def test_comments_fields_multiline(self) -> None:
        """Comments and other fields are ignored; several data lines join with LF; a bare 'data' adds ''."""
        d = SseDecoder()
        self.assertEqual(d.feed(b": keep-alive\nevent: msg\nid: 3\nretry: 10\ndata: one\ndata\ndata: two\n\n"),
                         ["one\n\ntwo"])
        self.assertEqual(d.feed(b": only a comment\n\n\n"), [])

    def test_done_stops(self) -> None:
        """[DONE] is not returned, sets done, and whatever follows is ignored."""
        d = SseDecoder()
        self.assertEqual(d.feed(b"data: a\n\ndata: [DONE]\n\ndata: b\n\n"), ["a"])
        self.assertTrue(d.done)
        self.assertEqual(d.feed(b"data: c\n\n"), [])

    def test_incomplete_event_is_held(self) -> None:
        """An event is returned only once its blank line arrives."""
        d = SseDecoder()
        self.assertEqual(d.feed(b"data: {\"a\""), [])
        self.assertEqual(d.feed(b": 1}\n"), [])
        self.assertEqual(d.feed(b"\n"), ['{"a": 1}'])

    def test_line_cap(self) -> None:
        """A line (even one with no end yet) or an event's data past the cap raises SseError."""
        self.assertRaises(SseError, SseDecoder(max_line_bytes=100).feed, b"data: " + b"x" * 200)
        d = SseDecoder(max_line_bytes=100)
        for _ in range(10):
            self.assertEqual(d.feed(b"x" * 9), [])
        self.assertRaises(SseError, d.feed, b"x" * 20)
        self.assertRaises(SseError, SseDecoder(max_line_bytes=100).feed, b"data: " + b"y" * 60 + b"\ndata: " + b"y" * 60 + b"\n")
        self.assertRaises(SseError, SseDecoder().feed, b"data: \xff\xfe\n\n")

    @settings(max_examples=200, deadline=None)
    @given(
        events=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                                max_size=20), max_size=8),
        newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
    )
    def test_chunking_invariance(self, events: list[str], newline: bytes, cuts: list[int]) -> None:
        """However the stream is cut into pieces (mid-line, mid-CRLF, mid-UTF-8), the payloads are the same."""
        wire = b"".join(b": c" + newline + b"data: " + e.encode() + newline + newline for e in events)
        wire += b"data: [DONE]" + newline + newline
        whole = SseDecoder().feed(wire)
        self.assertEqual(whole, events)
        d = SseDecoder()
        got: list[str] = []
        for piece in _split(wire, [c % (len(wire) + 1) for c in cuts]):
            got += d.feed(piece)
        self.assertEqual(got, events)
        self.assertTrue(d.done)


# -- chunks and assembly ---------------------------------------------------------------


class ChunkTests(SynchronousTestCase):
    def test_parse_text_and_tools(self) -> None:
        """Text, tool-call pieces and finish_reason come out of a chunk; choices-less chunks are empty."""
        self.assertEqual(parse_chunk(_chunk("Hi")[6:].decode()), ChatDelta("Hi"))
        calls = [{"index": 1, "id": "call_x", "type": "function", "function": {"name": "hangup", "arguments": ""}}]
        self.assertEqual(parse_chunk(_chunk(tool_calls=calls, finish="tool_calls")[6:].decode()),
                         ChatDelta("", (ToolCallDelta(1, "call_x", "hangup", ""),), "tool_calls"))
        self.assertEqual(parse_chunk('{"choices": [], "usage": {"total_tokens": 3}}'), ChatDelta())
        self.assertEqual(parse_chunk('{"choices": [{"delta": {"content": null}}]}'), ChatDelta())

    def test_malformed_chunks(self) -> None:
        """Every wrong shape is an LlmError naming what is wrong, never another exception."""
        bad = ["{", "[]", '"x"', '{"choices": {}}', '{"choices": [1]}', '{"choices": [{"delta": []}]}',
               '{"choices": [{"delta": {"content": 5}}]}', '{"choices": [{"finish_reason": 1}]}',
               '{"choices": [{"delta": {"tool_calls": {}}}]}', '{"choices": [{"delta": {"tool_calls": [3]}}]}',
               '{"choices": [{"delta": {"tool_calls": [{"index": -1}]}}]}',
               '{"choices": [{"delta": {"tool_calls": [{"index": true}]}}]}',
               '{"choices": [{"delta": {"tool_calls": [{"index": 999}]}}]}',
               '{"choices": [{"delta": {"tool_calls": [{"index": 0, "function": "f"}]}}]}',
               '{"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": {}}}]}}]}']
        for payload in bad:
            with self.assertRaises(LlmError, msg=payload) as e:
                parse_chunk(payload)
            self.assertIn("malformed chunk", str(e.exception))
            self.assertFalse(e.exception.retryable)

    def test_error_in_stream(self) -> None:
        """An error object mid-stream is the server's failure, with its message."""
        with self.assertRaises(LlmError) as e:
            parse_chunk('{"error": {"message": "model overloaded", "code": 503}}')
        self.assertIn("model overloaded", str(e.exception))
        self.assertTrue(e.exception.retryable)

    def test_assembler_joins_by_index(self) -> None:
        """Tool-call pieces interleaved across chunks join by index; an unnamed call is an error."""
        a = ChatAssembler()
        a.add(ChatDelta("Let me "))
        a.add(ChatDelta("check.", (ToolCallDelta(0, "c0", "lookup", '{"q": '),)))
        a.add(ChatDelta("", (ToolCallDelta(1, "c1", "transfer", ""), ToolCallDelta(0, arguments='"x"}'))))
        a.add(ChatDelta("", (ToolCallDelta(1, name="transfer", arguments='{}'),), "tool_calls"))
        self.assertEqual(a.result(), ChatResult("Let me check.", (ToolCall("c0", "lookup", '{"q": "x"}'),
                                                                   ToolCall("c1", "transfer", "{}")), "tool_calls"))
        r = ChatAssembler()  # a server that repeats the name with every piece
        r.add(ChatDelta("", (ToolCallDelta(0, None, "hangup", '{"a"'),)))
        r.add(ChatDelta("", (ToolCallDelta(0, None, "hangup", ': 1}'),)))
        self.assertEqual(r.result().tool_calls, (ToolCall("call_0", "hangup", '{"a": 1}'),))
        b = ChatAssembler()
        b.add(ChatDelta("", (ToolCallDelta(0, arguments="{}"),)))
        self.assertRaises(LlmError, b.result)

    def test_chat_url(self) -> None:
        self.assertEqual(chat_url("http://h/v1/"), "http://h/v1/chat/completions")
        self.assertEqual(chat_url("http://h/v1/chat/completions/"), "http://h/v1/chat/completions")


# -- the client, over a real socket ----------------------------------------------------


class ChatResource(Resource):
    """A scripted ``/v1/chat/completions``: ``script`` is the list of pieces written, one per reactor turn.

    ``end`` is ``"finish"``, ``"stall"`` (stay open) or ``"cut"`` (abort the connection after the script).
    """

    isLeaf = True

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.script: list[bytes] = []
        self.end = "finish"
        self.status = 200
        self.ctype = b"text/event-stream"
        self.requests: list[dict[str, Any]] = []
        self.got_request: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self._calls: list[Any] = []

    def render_POST(self, request: Request) -> int:
        self.requests.append({"path": request.path, "auth": request.getHeader(b"authorization"),
                              "accept": request.getHeader(b"accept"), "body": json.loads(request.content.read())})
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", self.ctype)
        request.notifyFinish().addErrback(lambda _: self.lost.called or self.lost.callback(None))
        request.write(b"")  # the headers go now, before the first piece
        self._send(request, list(self.script))
        if not self.got_request.called:
            self.got_request.callback(None)
        return NOT_DONE_YET

    def _send(self, request: Request, rest: list[bytes]) -> None:
        if rest:
            request.write(rest[0])
            self._calls.append(self.reactor.callLater(0, self._send, request, rest[1:]))
        elif self.end == "finish":
            request.finish()
        elif self.end == "cut":
            request.transport.abortConnection()

    def stop(self) -> None:
        for c in self._calls:
            if c.active():
                c.cancel()


class OpenAIChatTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.resource = ChatResource(reactor)
        self.addCleanup(self.resource.stop)
        self.port = reactor.listenTCP(0, Site(self.resource), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.base = f"http://127.0.0.1:{self.port.getHost().port}/v1"
        self.clock = Clock()  # the client's deadlines: advanced by hand

    def make(self, **kw: Any) -> OpenAIChat:
        kw.setdefault("base_url", self.base)
        kw.setdefault("api_key", _KEY)
        environ = kw.pop("environ", {})
        return OpenAIChat(http_client=self.http, clock=self.clock, environ=environ, **kw)

    def ask(self, chat: OpenAIChat, on_delta: Optional[Callable[[str], None]] = None, **kw: Any) -> tuple[Deferred[ChatResult], list[str]]:
        got: list[str] = []
        d = chat.stream([{"role": "user", "content": "hi"}], model="test-model",
                        on_delta=on_delta or got.append, **kw)
        return d, got

    @inlineCallbacks
    def test_text_stream_split_mid_line_and_json(self) -> Iterator[Deferred[Any]]:
        """Text deltas cut mid-line and mid-JSON reach on_delta in order; the body asks for a stream."""
        wire = b": hello\n\n" + _chunk("Hel") + _chunk("lo, ") + _chunk("wörld.") + _chunk(finish="stop") + b"data: [DONE]\n\n"
        self.resource.script = _split(wire, [3, 20, 41, 90, 91, 150, len(wire) - 3])
        d, got = self.ask(self.make(), temperature=0.2, max_tokens=50, response_format={"type": "text"})
        result = yield d
        self.assertEqual(result, ChatResult("Hello, wörld.", (), "stop"))
        self.assertEqual(got, ["Hel", "lo, ", "wörld."])
        [req] = self.resource.requests
        self.assertEqual(req["path"], b"/v1/chat/completions")
        self.assertEqual(req["auth"], f"Bearer {_KEY}".encode())
        self.assertEqual(req["accept"], b"text/event-stream")
        self.assertEqual(req["body"], {"model": "test-model", "messages": [{"role": "user", "content": "hi"}],
                                       "stream": True, "temperature": 0.2, "max_tokens": 50,
                                       "response_format": {"type": "text"}})

    @inlineCallbacks
    def test_tool_calls_across_chunks(self) -> Iterator[Deferred[Any]]:
        """Tool-call pieces split across chunks assemble into complete ToolCalls; tools are sent."""
        tools = [{"type": "function", "function": {"name": "transfer", "parameters": {"type": "object"}}}]
        wire = (_chunk(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                    "function": {"name": "transfer", "arguments": ""}}])
                + _chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"target": '}}])
                + _chunk(tool_calls=[{"index": 0, "function": {"arguments": '"sip:100@x"}'}}])
                + _chunk(finish="tool_calls") + b"data: [DONE]\n\n")
        self.resource.script = _split(wire, list(range(7, len(wire), 50)))
        d, got = self.ask(self.make(), tools=tools)
        result = yield d
        self.assertEqual(result.tool_calls, (ToolCall("call_1", "transfer", '{"target": "sip:100@x"}'),))
        self.assertEqual((result.text, result.finish_reason, got), ("", "tool_calls", []))
        self.assertEqual(self.resource.requests[0]["body"]["tools"], tools)
        self.assertNotIn("temperature", self.resource.requests[0]["body"])

    @inlineCallbacks
    def test_slow_first_token_times_out(self) -> Iterator[Deferred[Any]]:
        """Headers and keep-alive comments but no token: the first-token deadline fails it and drops the connection."""
        self.resource.script = [b": keep-alive\n\n"]
        self.resource.end = "stall"
        d, _ = self.ask(self.make(), first_token_timeout_s=5)
        yield self.resource.got_request
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        err = yield self.assertFailure(d, LlmError)
        self.assertIn("no first token within 5 s", str(err))
        self.assertTrue(err.retryable)
        yield self.resource.lost
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_total_deadline(self) -> Iterator[Deferred[Any]]:
        """A stream that started but never ends fails at the total deadline."""
        self.resource.script = [_chunk("partial")]
        self.resource.end = "stall"
        got_first: Deferred[None] = Deferred()
        d, _ = self.ask(self.make(), on_delta=lambda t: got_first.callback(None), total_timeout_s=30)
        yield got_first
        self.clock.advance(29)
        self.assertNoResult(d)  # past the first-token deadline (10 s): that timer stopped at the first token
        self.clock.advance(2)
        err = yield self.assertFailure(d, LlmError)
        self.assertIn("answer not complete within 30 s", str(err))
        yield self.resource.lost

    @inlineCallbacks
    def test_http_errors(self) -> Iterator[Deferred[Any]]:
        """401 and 500 error JSON become LlmErrors with the server's message; only 500 is retryable."""
        self.resource.ctype = b"application/json"
        self.resource.status = 401
        self.resource.script = [json.dumps({"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}).encode()]
        err = yield self.assertFailure(self.ask(self.make())[0], LlmError)
        self.assertIn("HTTP 401: Incorrect API key provided", str(err))
        self.assertFalse(err.retryable)
        self.resource.status = 500
        self.resource.script = [b'{"error": {"message": "The server had an error"}}']
        err = yield self.assertFailure(self.ask(self.make())[0], LlmError)
        self.assertIn("HTTP 500: The server had an error", str(err))
        self.assertTrue(err.retryable)

    @inlineCallbacks
    def test_garbage(self) -> Iterator[Deferred[Any]]:
        """A non-JSON data line, plain garbage without events, and a JSON (non-stream) answer all fail clearly."""
        self.resource.script = [_chunk("ok"), b"data: {not json\n\n"]
        err = yield self.assertFailure(self.ask(self.make())[0], LlmError)
        self.assertIn("malformed chunk: not JSON", str(err))
        self.resource.script = [b"<html>Bad Gateway</html>"]
        err = yield self.assertFailure(self.ask(self.make())[0], LlmError)
        self.assertIn("stream ended before the answer finished", str(err))
        self.resource.ctype = b"application/json"
        self.resource.script = [b'{"choices": [{"message": {"content": "hi"}}]}']
        err = yield self.assertFailure(self.ask(self.make())[0], LlmError)
        self.assertIn("not an event stream", str(err))
        self.resource.ctype = b"text/event-stream"
        self.resource.script = [b"data: " + b"x" * (1024 * 1024 + 10)]
        err = yield self.assertFailure(self.ask(self.make())[0], LlmError)
        self.assertIn("SSE line longer than", str(err))

    @inlineCallbacks
    def test_connection_cut_mid_stream(self) -> Iterator[Deferred[Any]]:
        """A connection dropped mid-stream is a retryable LlmError, after the deltas that did arrive."""
        self.resource.script = [_chunk("Hello"), _chunk(" the")[:20]]
        self.resource.end = "cut"
        d, got = self.ask(self.make())
        err = yield self.assertFailure(d, LlmError)
        self.assertIn("interrupted", str(err))
        self.assertTrue(err.retryable)
        self.assertEqual(got, ["Hello"])

    @inlineCallbacks
    def test_cancel_stops_deltas_and_connection(self) -> Iterator[Deferred[Any]]:
        """Cancelling from on_delta: no further delta (even of the same piece), and the server sees the client go."""
        self.resource.script = [_chunk("one") + _chunk("two"), _chunk("three")]
        self.resource.end = "stall"
        got: list[str] = []
        d: Deferred[ChatResult]

        def on_delta(text: str) -> None:
            got.append(text)
            d.cancel()

        d, _ = self.ask(self.make(), on_delta=on_delta)
        yield self.assertFailure(d, CancelledError)
        yield self.resource.lost
        self.assertEqual(got, ["one"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_on_delta_exception(self) -> Iterator[Deferred[Any]]:
        """A consumer that raises fails the call with LlmError, not a traceback elsewhere."""
        self.resource.script = [_chunk("x"), _chunk(finish="stop")]

        def boom(text: str) -> None:
            raise RuntimeError("consumer broke")

        err = yield self.assertFailure(self.ask(self.make(), on_delta=boom)[0], LlmError)
        self.assertIn("consumer broke", str(err))
        self.flushLoggedErrors(RuntimeError)

    @inlineCallbacks
    def test_connection_refused(self) -> Iterator[Deferred[Any]]:
        """An endpoint that is down gives a retryable LlmError."""
        yield self.port.stopListening()
        err = yield self.assertFailure(self.ask(self.make())[0], LlmError)
        self.assertTrue(err.retryable)
        self.assertIn("request failed", str(err))

    @inlineCallbacks
    def test_key_policy(self) -> Iterator[Deferred[Any]]:
        """The environment's key goes to OPENAI_BASE_URL only; elsewhere gets its own key or none (a local
        server), and allowed_hosts bounds it."""
        self.resource.script = [_chunk("a", finish="stop"), b"data: [DONE]\n\n"]
        env = {"OPENAI_BASE_URL": self.base + "/", "OPENAI_API_KEY": "sk-env"}
        yield self.ask(self.make(base_url=None, api_key=None, environ=env))[0]
        self.assertEqual(self.resource.requests[-1]["auth"], b"Bearer sk-env")
        # the same server under another name: not the configured URL, so the env key must not go there
        other = f"http://localhost:{self.port.getHost().port}/v1"
        yield self.ask(self.make(base_url=other, api_key=None, environ=env))[0]
        self.assertIsNone(self.resource.requests[-1]["auth"], "the env key never goes to another endpoint")
        err = yield self.assertFailure(
            self.ask(self.make(base_url=other, api_key="sk-own", environ=env, fetch=FetchConfig(allowed_hosts=("example.com",))))[0],
            LlmError)
        self.assertIn("endpoint not allowed", str(err))
        yield self.ask(self.make(base_url=other, api_key="sk-own", environ=env))[0]
        self.assertEqual(self.resource.requests[-1]["auth"], b"Bearer sk-own")
        self.assertEqual(len(self.resource.requests), 3)
        # a self-hosted OPENAI_BASE_URL may need no key: no Authorization header at all
        yield self.ask(self.make(base_url=None, api_key=None, environ={"OPENAI_BASE_URL": self.base}))[0]
        self.assertIsNone(self.resource.requests[-1]["auth"])
        # api.openai.com without any key fails before sending
        err = yield self.assertFailure(self.ask(self.make(base_url=None, api_key=None))[0], LlmError)
        self.assertIn("no API key", str(err))
        self.assertEqual(len(self.resource.requests), 4)
