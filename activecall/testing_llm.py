"""A scripted, local OpenAI-compatible ``/chat/completions`` server for tests and benchmarks.

:class:`ScriptedLlm` is a twisted.web resource (``POST /v1/chat/completions`` and
``POST /chat/completions``) answering each request with the next scripted reply:

* :class:`TextReply` -- text streamed as the given chunks, with a first-token delay and a
  delay between chunks on the injected clock (``callLater``, never a sleep);
* :class:`ToolCallsReply` -- OpenAI ``tool_calls`` deltas, each call's arguments split across chunks;
* :class:`ErrorReply` -- an HTTP error status with a (JSON) body;
* :class:`GarbageReply` -- ``data:`` lines that are not JSON;
* :class:`CutReply` -- some chunks, then the connection is dropped mid-event;
* :class:`StallReply` -- some chunks, then nothing: the stream stays open until the client goes.

A request without ``"stream": true`` gets one ``chat.completion`` JSON object instead of a
stream (text and tool calls joined); garbage, cut and stall replies are streamed either way.  When the queue is empty, ``responder(request_json)``
chooses the reply (a reply or a Deferred of one, for benchmarks), else ``default`` is used.
Every request is recorded in :attr:`ScriptedLlm.requests`; :meth:`ScriptedLlm.next_request`
waits for the next one.  :func:`listen_llm` serves it on ``127.0.0.1:<free port>``.

SSE framing is OpenAI's: ``data: {json}\\n\\n`` per chunk, ending ``data: [DONE]\\n\\n``.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTCP, IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

__all__ = [
    "TextReply", "ToolCallSpec", "ToolCallsReply", "ErrorReply", "GarbageReply", "CutReply", "StallReply",
    "Reply", "RecordedRequest", "ScriptedLlm", "ListeningLlm", "listen_llm", "echo_responder", "MAX_REQUEST_BYTES",
]

#: The largest request body read; a larger one is answered 413.
MAX_REQUEST_BYTES = 8 * 1024 * 1024
_PATHS = (b"/v1/chat/completions", b"/chat/completions")


# -- replies -------------------------------------------------------------------------


@dataclass(frozen=True)
class TextReply:
    """Text streamed as ``chunks``: the first after ``first_delay_s``, each next one ``chunk_delay_s`` later."""

    chunks: Sequence[str] = ("OK.",)
    chunk_delay_s: float = 0.0
    first_delay_s: float = 0.0
    finish_reason: str = "stop"


@dataclass(frozen=True)
class ToolCallSpec:
    """One tool call; ``arguments`` (a JSON string, or a mapping to encode) goes out in pieces of ``piece_chars``."""

    name: str
    arguments: Union[str, Mapping[str, Any]] = "{}"
    id: Optional[str] = None
    piece_chars: int = 8

    def arguments_json(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)


@dataclass(frozen=True)
class ToolCallsReply:
    """Optional ``text`` chunks, then the ``calls`` as ``tool_calls`` deltas, ending ``finish_reason``."""

    calls: Sequence[ToolCallSpec]
    text: Sequence[str] = ()
    chunk_delay_s: float = 0.0
    first_delay_s: float = 0.0
    finish_reason: str = "tool_calls"


@dataclass(frozen=True)
class ErrorReply:
    """An HTTP error: ``status`` with ``body`` (a mapping is sent as JSON); the default body is OpenAI's error shape."""

    status: int = 500
    body: Union[str, bytes, Mapping[str, Any], None] = None
    delay_s: float = 0.0


@dataclass(frozen=True)
class GarbageReply:
    """``chunks_before`` as valid text chunks, then each of ``lines`` as a ``data:`` line (not JSON); no ``[DONE]``."""

    lines: Sequence[str] = ("{this is not json",)
    chunks_before: Sequence[str] = ()


@dataclass(frozen=True)
class CutReply:
    """Text ``chunks``, then half a chunk, then the connection is aborted (a stream that stops mid-way)."""

    chunks: Sequence[str] = ("Hel",)
    chunk_delay_s: float = 0.0
    first_delay_s: float = 0.0


@dataclass(frozen=True)
class StallReply:
    """Text ``chunks`` (maybe none), then the stream stays open, sending nothing, until the client goes."""

    chunks: Sequence[str] = ()


Reply = Union[TextReply, ToolCallsReply, ErrorReply, GarbageReply, CutReply, StallReply]
_REPLY_TYPES = (TextReply, ToolCallsReply, ErrorReply, GarbageReply, CutReply, StallReply)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received: path, headers (lower-case names, last value), body (parsed JSON, None if not JSON)."""

    path: str
    headers: Mapping[str, str]
    body: Any
    raw: bytes = field(repr=False, default=b"")

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("stream") is True

    @property
    def messages(self) -> list[Any]:
        messages = self.body.get("messages") if isinstance(self.body, dict) else None
        return messages if isinstance(messages, list) else []


def echo_responder(clock: IReactorTime, delay_s: float = 0.0, prefix: str = "",
                   chunk_chars: int = 0) -> Callable[[Mapping[str, Any]], Deferred[Reply]]:
    """A responder for benchmarks: after ``delay_s``, the last user message's text back (after ``prefix``),
    in chunks of ``chunk_chars`` (0 = one chunk)."""

    def respond(body: Mapping[str, Any]) -> Deferred[Reply]:
        text = prefix
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
                text += message["content"]
                break
        chunks = [text[i:i + chunk_chars] for i in range(0, len(text), chunk_chars)] if chunk_chars > 0 else [text]
        d: Deferred[Reply] = Deferred()
        clock.callLater(delay_s, d.callback, TextReply(chunks or [""]))
        return d

    return respond


# -- the resource --------------------------------------------------------------------


class _Exchange:
    """One request being answered: its timers (cancelled when the client goes) and its state."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.timers: list[IDelayedCall] = []
        self.gone = False

    def cancel(self) -> None:
        self.gone = True
        timers, self.timers = self.timers, []
        for t in timers:
            if t.active():
                t.cancel()


class ScriptedLlm(Resource):
    """The scripted server (see the module docstring).  ``clock`` runs every delay."""

    isLeaf = True

    def __init__(self, clock: IReactorTime, *, replies: Sequence[Reply] = (), default: Reply = TextReply(("OK.",)),
                 responder: Optional[Callable[[Mapping[str, Any]], Union[Reply, Deferred[Reply]]]] = None,
                 model: str = "scripted-model") -> None:
        super().__init__()
        self._clock = clock
        self.queue: deque[Reply] = deque(replies)
        self.default = default
        self.responder = responder
        self.model = model
        #: Every request received, in order.
        self.requests: list[RecordedRequest] = []
        self._waiters: list[Deferred[RecordedRequest]] = []
        self._live: set[_Exchange] = set()
        self._count = 0

    def push(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order."""
        self.queue.extend(replies)

    def next_request(self) -> Deferred[RecordedRequest]:
        """A Deferred fired with the next request to arrive (after this call)."""
        d: Deferred[RecordedRequest] = Deferred()
        self._waiters.append(d)
        return d

    def stop(self) -> None:
        """Drop every open stream and cancel every pending timer (test cleanup)."""
        for exchange in list(self._live):
            exchange.cancel()
            transport = exchange.request.channel.transport if exchange.request.channel else None
            if transport is not None:
                transport.abortConnection()
        self._live.clear()

    # twisted.web

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"allow", b"POST")
        return b""

    def render_POST(self, request: Request) -> Any:
        if request.path not in _PATHS:
            return self._json_error(request, 404, f"no route {request.path.decode('latin-1')}")
        raw = request.content.read(MAX_REQUEST_BYTES + 1) if request.content is not None else b""
        if len(raw) > MAX_REQUEST_BYTES:
            return self._json_error(request, 413, "request body too large")
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        headers = {name.decode("latin-1").lower(): values[-1].decode("latin-1")
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        recorded = RecordedRequest(request.path.decode("latin-1"), headers, body, raw)
        self.requests.append(recorded)
        if not isinstance(body, dict):
            self._arrived(recorded)
            return self._json_error(request, 400, "request body is not a JSON object")
        exchange = _Exchange(request)
        self._live.add(exchange)
        request.notifyFinish().addBoth(self._finished, exchange)
        maybeDeferred(self._choose, body).addCallbacks(
            lambda reply: self._answer(exchange, reply, recorded.stream),
            lambda f: self._broken(exchange, f))
        # Waiters learn of the request once its reply's timers are set, so a test may advance the clock at once.
        self._arrived(recorded)
        return NOT_DONE_YET

    def _arrived(self, recorded: RecordedRequest) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(recorded)

    def _finished(self, result: Any, exchange: _Exchange) -> None:
        exchange.cancel()
        self._live.discard(exchange)

    def _choose(self, body: Mapping[str, Any]) -> Union[Reply, Deferred[Reply]]:
        if self.queue:
            return self.queue.popleft()
        if self.responder is not None:
            return self.responder(body)
        return self.default

    def _broken(self, exchange: _Exchange, f: Failure) -> None:
        if not exchange.gone:
            self._write_error(exchange.request, 500, f"responder failed: {f.getErrorMessage()}")
            exchange.request.finish()

    # replies

    def _answer(self, exchange: _Exchange, reply: Reply, stream: bool) -> None:
        if exchange.gone:
            return
        if not isinstance(reply, _REPLY_TYPES):
            self._broken(exchange, Failure(TypeError(f"not a scripted reply: {reply!r}")))
            return
        self._count += 1
        cid = f"chatcmpl-scripted-{self._count}"
        request = exchange.request
        if isinstance(reply, ErrorReply):
            self._after(exchange, reply.delay_s, lambda: self._send_error(exchange, reply))
            return
        if not stream and isinstance(reply, (TextReply, ToolCallsReply)):
            delay = reply.first_delay_s
            self._after(exchange, delay, lambda: self._send_whole(exchange, cid, reply))
            return
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b"")  # the headers go now, before the first chunk
        steps: list[tuple[float, Callable[[], None]]] = []
        write = lambda data: (lambda: request.write(data))  # noqa: E731
        if isinstance(reply, (TextReply, CutReply)):
            steps.append((0.0, write(self._chunk(cid, {"role": "assistant", "content": ""}))))
            for i, text in enumerate(reply.chunks):
                steps.append((reply.first_delay_s if i == 0 else reply.chunk_delay_s,
                              write(self._chunk(cid, {"content": text}))))
            if isinstance(reply, TextReply):
                steps.append((0.0 if reply.chunks else reply.first_delay_s,
                              write(self._chunk(cid, {}, reply.finish_reason) + b"data: [DONE]\n\n")))
                steps.append((0.0, request.finish))
            else:
                half = self._chunk(cid, {"content": "never"})
                steps.append((reply.chunk_delay_s, write(half[: len(half) // 2])))
                steps.append((0.0, lambda: self._abort(exchange)))
        elif isinstance(reply, ToolCallsReply):
            steps.append((0.0, write(self._chunk(cid, {"role": "assistant", "content": None}))))
            pieces = [self._chunk(cid, {"content": t}) for t in reply.text] + self._tool_chunks(cid, reply.calls)
            for i, piece in enumerate(pieces):
                steps.append((reply.first_delay_s if i == 0 else reply.chunk_delay_s, write(piece)))
            steps.append((0.0, write(self._chunk(cid, {}, reply.finish_reason) + b"data: [DONE]\n\n")))
            steps.append((0.0, request.finish))
        elif isinstance(reply, GarbageReply):
            for text in reply.chunks_before:
                steps.append((0.0, write(self._chunk(cid, {"content": text}))))
            for line in reply.lines:
                steps.append((0.0, write(b"data: " + line.encode("utf-8") + b"\n\n")))
            steps.append((0.0, request.finish))
        else:  # StallReply
            for text in reply.chunks:
                steps.append((0.0, write(self._chunk(cid, {"content": text}))))
        self._run(exchange, steps)

    def _run(self, exchange: _Exchange, steps: list[tuple[float, Callable[[], None]]]) -> None:
        """Run the steps in order; a positive delay waits on the clock first, zero runs at once."""
        while steps and not exchange.gone:
            delay, step = steps[0]
            if delay > 0:
                steps[0] = (0.0, step)
                exchange.timers.append(self._clock.callLater(delay, self._run, exchange, steps))
                return
            steps.pop(0)
            step()

    def _after(self, exchange: _Exchange, delay_s: float, action: Callable[[], None]) -> None:
        self._run(exchange, [(delay_s, action)])

    def _abort(self, exchange: _Exchange) -> None:
        """Close the connection mid-response: what was written is flushed first (an abort would drop it),
        and the unterminated chunked body is a cut for the client."""
        exchange.cancel()
        transport = exchange.request.channel.transport if exchange.request.channel else None
        if transport is not None:
            transport.loseConnection()

    def _chunk(self, cid: str, delta: Mapping[str, Any], finish: Optional[str] = None) -> bytes:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": int(self._clock.seconds()), "model": self.model,
               "choices": [{"index": 0, "delta": dict(delta), "finish_reason": finish}]}
        return b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n"

    def _tool_chunks(self, cid: str, calls: Sequence[ToolCallSpec]) -> list[bytes]:
        out = []
        for index, call in enumerate(calls):
            call_id = call.id or f"call_scripted_{self._count}_{index}"
            out.append(self._chunk(cid, {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                                          "function": {"name": call.name, "arguments": ""}}]}))
            args, size = call.arguments_json(), max(1, call.piece_chars)
            for i in range(0, len(args), size):
                out.append(self._chunk(cid, {"tool_calls": [{"index": index,
                                                              "function": {"arguments": args[i:i + size]}}]}))
        return out

    def _send_whole(self, exchange: _Exchange, cid: str, reply: Union[TextReply, ToolCallsReply]) -> None:
        """The non-streaming answer: one ``chat.completion`` object."""
        message: dict[str, Any] = {"role": "assistant"}
        if isinstance(reply, TextReply):
            message["content"] = "".join(reply.chunks)
        else:
            message["content"] = "".join(reply.text) or None
            message["tool_calls"] = [
                {"id": call.id or f"call_scripted_{self._count}_{i}", "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments_json()}}
                for i, call in enumerate(reply.calls)]
        obj = {"id": cid, "object": "chat.completion", "created": int(self._clock.seconds()), "model": self.model,
               "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
               "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
        request = exchange.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps(obj).encode("utf-8"))
        request.finish()

    def _send_error(self, exchange: _Exchange, reply: ErrorReply) -> None:
        body = reply.body
        request = exchange.request
        if body is None:
            self._write_error(request, reply.status, f"scripted error {reply.status}")
        else:
            request.setResponseCode(reply.status)
            if isinstance(body, Mapping):
                request.setHeader(b"content-type", b"application/json")
                request.write(json.dumps(body).encode("utf-8"))
            else:
                data = body if isinstance(body, bytes) else body.encode("utf-8")
                request.setHeader(b"content-type", b"application/json" if data.lstrip()[:1] in (b"{", b"[")
                                  else b"text/plain")
                request.write(data)
        request.finish()

    def _write_error(self, request: Request, status: int, message: str) -> None:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps({"error": {"message": message, "type": "scripted_error", "code": status}}).encode())

    def _json_error(self, request: Request, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": {"message": message, "type": "scripted_error", "code": status}}).encode()


# -- listening -----------------------------------------------------------------------


@dataclass
class ListeningLlm:
    """A :class:`ScriptedLlm` listening on loopback: ``base_url`` is ``http://127.0.0.1:<port>/v1``."""

    llm: ScriptedLlm
    port: IListeningPort

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/v1"

    def stop(self) -> Deferred[None]:
        """Drop open streams, cancel timers, stop listening."""
        self.llm.stop()
        return maybeDeferred(self.port.stopListening)


def listen_llm(reactor: IReactorTCP, llm: ScriptedLlm) -> ListeningLlm:
    """Serve ``llm`` on ``127.0.0.1`` at a free port."""
    site = Site(llm)
    site.displayTracebacks = False
    site.noisy = False
    return ListeningLlm(llm, reactor.listenTCP(0, site, interface="127.0.0.1"))
