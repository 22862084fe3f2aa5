"""OpenAI-compatible chat completions with SSE streaming: ``POST {baseUrl}/chat/completions``.

Serves api.openai.com and any compatible server (vLLM, Ollama, llama.cpp, Groq, ...), as the
playbook's ``llm`` block names it (playbook.md §4.4, providers.md).

* Base URL: ``base_url``, else ``environ["OPENAI_BASE_URL"]``, else ``https://api.openai.com/v1``;
  ``/chat/completions`` is appended unless already the suffix (trailing ``/`` trimmed).
* Key: ``api_key``, else ``environ["OPENAI_API_KEY"]``, sent as ``Authorization: Bearer``.  The
  environment's key goes only to the configured base URL (:class:`~activecall.speech.keys.KeyPolicy`);
  a base URL elsewhere must pass ``[fetch] allowed_hosts`` and bring its own key.
* The answer streams as SSE: :class:`SseDecoder` (pure) cuts it into ``data:`` payloads,
  :func:`parse_chunk` (pure) validates each chunk into a :class:`ChatDelta`, :class:`ChatAssembler`
  (pure) joins the text and the tool-call pieces (by ``index``) into a :class:`ChatResult`.
* Never a stuck call: a first-token deadline and a whole-answer deadline on the injected clock;
  cancelling the Deferred stops ``on_delta`` at once and drops the connection.
* Errors are :class:`LlmError` with ``retryable``: non-2xx (the server's ``error.message``;
  retryable for 408/429/5xx), connection failures, cuts and timeouts (retryable), malformed
  chunks, an SSE line past its cap, an error object in the stream, a stream ending unfinished.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from activecall.config import FetchConfig
from activecall.fetch import check_url
from activecall.speech.httpcall import StreamedCall, content_type, retryable_status, server_message
from activecall.speech.keys import KeyPolicy

__all__ = [
    "LlmError", "SseError", "SseDecoder", "ToolCallDelta", "ChatDelta", "ToolCall", "ChatResult", "ChatAssembler",
    "parse_chunk", "chat_url", "OpenAIChat", "DEFAULT_BASE_URL", "MAX_LINE_BYTES", "MAX_TOOL_CALLS",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_PATH = "/chat/completions"
#: The longest SSE line (and ``data`` of one event) accepted.
MAX_LINE_BYTES = 1024 * 1024
#: The most tool calls one answer may carry (the highest ``index`` + 1).
MAX_TOOL_CALLS = 64
_LINE_END = re.compile(rb"\r\n|\r|\n")
_DONE = "[DONE]"


class LlmError(Exception):
    """The model call failed; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class SseError(ValueError):
    """The event stream is not valid SSE (a line past its cap, text that is not UTF-8)."""


# -- SSE [pure] ----------------------------------------------------------------------


class SseDecoder:
    """Incremental ``text/event-stream`` decoder: bytes in, the ``data`` of each complete event out.

    Lines end with CRLF, LF or CR (a CRLF may be split across pieces); ``:`` lines are comments;
    several ``data`` lines of one event join with ``\\n``; other fields (``event``, ``id``,
    ``retry``) are ignored.  The payload ``[DONE]`` is not returned: it sets :attr:`done`, and
    everything after it is ignored.  A line or an event's data longer than ``max_line_bytes``
    raises :class:`SseError` (so does text that is not UTF-8).
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_line_bytes
        self._partial = bytearray()
        self._skip_lf = False
        self._data: list[str] = []
        self._data_size = 0
        #: ``[DONE]`` was seen.
        self.done = False

    def feed(self, data: bytes) -> list[str]:
        """Consume ``data``; return the payloads of the events it completed, in order."""
        if self.done or not data:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        if b"\n" not in data and b"\r" not in data:
            self._partial += data
            self._check_partial()
            return []
        lines = _LINE_END.split(bytes(self._partial) + data)
        self._partial = bytearray(lines.pop())
        self._check_partial()
        self._skip_lf = data.endswith(b"\r")
        out: list[str] = []
        for raw in lines:
            payload = self._line(raw)
            if payload is None:
                continue
            if payload == _DONE:
                self.done = True
                self._partial.clear()
                break
            out.append(payload)
        return out

    def _check_partial(self) -> None:
        if len(self._partial) > self._max:
            raise SseError(f"SSE line longer than {self._max} bytes")

    def _line(self, raw: bytes) -> Optional[str]:
        """Handle one line; return an event's data when the line (a blank one) ends an event."""
        if len(raw) > self._max:
            raise SseError(f"SSE line longer than {self._max} bytes")
        if not raw:
            if not self._data:
                return None
            payload = "\n".join(self._data)
            self._data, self._data_size = [], 0
            return payload
        if raw.startswith(b":"):
            return None
        name, colon, value = raw.partition(b":")
        if name != b"data":
            return None
        if colon and value.startswith(b" "):
            value = value[1:]
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise SseError("SSE data is not UTF-8") from None
        self._data_size += len(value) + 1
        if self._data_size > self._max:
            raise SseError(f"SSE event data longer than {self._max} bytes")
        self._data.append(text)
        return None


# -- chunks [pure] -------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call: the first piece usually names it, the rest carry ``arguments``."""

    index: int
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""


@dataclass(frozen=True)
class ChatDelta:
    """One ``chat.completion.chunk``: its text piece, tool-call pieces and finish reason."""

    text: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    finish_reason: Optional[str] = None


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call; ``arguments_json`` is the model's text, as sent (may not be valid JSON)."""

    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True)
class ChatResult:
    """A whole answer."""

    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: Optional[str] = None


def _opt_str(obj: Mapping[str, Any], key: str, what: str) -> Optional[str]:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise LlmError(f"llm: malformed chunk: {what} is not a string")
    return value


def parse_chunk(payload: str) -> ChatDelta:
    """Validate one SSE payload (a ``chat.completion.chunk``) into a ChatDelta; raise LlmError.

    Only the first choice counts (``n`` is never asked for).  A chunk without choices (a usage
    or prompt-filter chunk) is an empty delta; a chunk with an ``error`` object is the server's
    failure mid-stream.
    """
    try:
        chunk = json.loads(payload)
    except ValueError:
        raise LlmError("llm: malformed chunk: not JSON") from None
    if not isinstance(chunk, dict):
        raise LlmError("llm: malformed chunk: not a JSON object")
    if chunk.get("error") is not None:
        message = server_message(payload.encode("utf-8"), ("error",))
        raise LlmError(f"llm: server error in stream: {message}", retryable=True)
    choices = chunk.get("choices")
    if choices is None or choices == []:
        return ChatDelta()
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise LlmError("llm: malformed chunk: choices is not a list of objects")
    choice = choices[0]
    delta = choice.get("delta")
    delta = {} if delta is None else delta
    if not isinstance(delta, dict):
        raise LlmError("llm: malformed chunk: delta is not an object")
    text = _opt_str(delta, "content", "content") or ""
    finish = _opt_str(choice, "finish_reason", "finish_reason")
    raw_calls = delta.get("tool_calls")
    raw_calls = [] if raw_calls is None else raw_calls
    if not isinstance(raw_calls, list):
        raise LlmError("llm: malformed chunk: tool_calls is not a list")
    calls: list[ToolCallDelta] = []
    for position, raw in enumerate(raw_calls):
        if not isinstance(raw, dict):
            raise LlmError("llm: malformed chunk: a tool call is not an object")
        index = raw.get("index", position)  # some servers send whole calls without an index
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_TOOL_CALLS:
            raise LlmError(f"llm: malformed chunk: tool call index is not an integer in 0..{MAX_TOOL_CALLS - 1}")
        function = raw.get("function")
        function = {} if function is None else function
        if not isinstance(function, dict):
            raise LlmError("llm: malformed chunk: tool call function is not an object")
        calls.append(ToolCallDelta(index, _opt_str(raw, "id", "tool call id"), _opt_str(function, "name", "tool name"),
                                   _opt_str(function, "arguments", "tool arguments") or ""))
    return ChatDelta(text, tuple(calls), finish)


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ChatAssembler:
    """Joins the deltas of one answer: text in order, tool-call pieces by ``index``."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._calls: dict[int, _PartialCall] = {}
        self.finish_reason: Optional[str] = None

    def add(self, delta: ChatDelta) -> None:
        if delta.text:
            self._text.append(delta.text)
        for piece in delta.tool_calls:
            call = self._calls.setdefault(piece.index, _PartialCall())
            if piece.id:
                call.id = piece.id
            if piece.name and not call.name:  # some servers repeat the name in every piece
                call.name = piece.name
            if piece.arguments:
                call.arguments.append(piece.arguments)
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason

    def result(self) -> ChatResult:
        """The answer so far as a ChatResult; raise LlmError for a tool call that never got a name."""
        calls = []
        for index in sorted(self._calls):
            call = self._calls[index]
            if not call.name:
                raise LlmError(f"llm: tool call {index} has no name")
            calls.append(ToolCall(call.id or f"call_{index}", call.name, "".join(call.arguments)))
        return ChatResult("".join(self._text), tuple(calls), self.finish_reason)


def chat_url(base_url: str) -> str:
    """``{base_url}/chat/completions``, unless ``base_url`` already ends so (trailing ``/`` trimmed)."""
    base = base_url.rstrip("/")
    return base if base.endswith(_PATH) else base + _PATH


# -- the client ----------------------------------------------------------------------


class OpenAIChat:
    """Streams chat completions from one OpenAI-compatible endpoint (a playbook's ``llm`` block)."""

    _log = Logger()

    def __init__(self, *, http_client: HTTPClient, clock: IReactorTime, environ: Mapping[str, str],
                 fetch: FetchConfig = FetchConfig(), base_url: Optional[str] = None,
                 api_key: Optional[str] = None) -> None:
        """``fetch.allowed_hosts`` bounds a base URL other than the configured one, ``fetch.max_bytes``
        every answer."""
        self._http = http_client
        self._clock = clock
        self._fetch = fetch
        configured = chat_url(environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL)
        #: The URL requests go to.
        self.url = chat_url(base_url) if base_url else configured
        self._api_key = api_key or None
        self._keys = KeyPolicy(
            "llm", official=frozenset({configured}), env_key=environ.get("OPENAI_API_KEY") or None,
            no_key="llm: no API key (set llm.apiKey or OPENAI_API_KEY)",
            where="the configured base URL (OPENAI_BASE_URL)", needs_key=frozenset({chat_url(DEFAULT_BASE_URL)}),
            error_type=LlmError,
            check=lambda url: check_url(url, fetch.allowed_hosts),
            # A playbook's own base URL is often a local server (llama.cpp, Ollama, vLLM) that wants no key.
            own_key_required=False,
            on_refused=lambda reason: self._log.info("llm endpoint refused: {reason}", reason=reason))

    def body_for(self, messages: Sequence[Mapping[str, Any]], *, model: str, temperature: Optional[float] = None,
                 max_tokens: Optional[int] = None, tools: Optional[Sequence[Mapping[str, Any]]] = None,
                 response_format: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """The JSON body of one request: only the fields given (``None`` = the server's default)."""
        body: dict[str, Any] = {"model": model, "messages": list(messages), "stream": True}
        if temperature is not None:
            body["temperature"] = temperature
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if tools:
            body["tools"] = list(tools)
        if response_format is not None:
            body["response_format"] = response_format
        return body

    def stream(self, messages: Sequence[Mapping[str, Any]], *, model: str, temperature: Optional[float] = None,
               max_tokens: Optional[int] = None, tools: Optional[Sequence[Mapping[str, Any]]] = None,
               response_format: Optional[Mapping[str, Any]] = None,
               on_delta: Callable[[str], None] = lambda text: None,
               first_token_timeout_s: float = 10.0, total_timeout_s: float = 60.0) -> Deferred[ChatResult]:
        """Ask for one answer; each text piece goes to ``on_delta`` (on the reactor thread) as it arrives.

        Fires with the ChatResult, or fails with LlmError (an exception from ``on_delta`` too);
        cancelling it stops ``on_delta`` and aborts the request.
        """
        try:
            key = self._keys.key_for(self.url, self._api_key)
            data = json.dumps(self.body_for(messages, model=model, temperature=temperature, max_tokens=max_tokens,
                                            tools=tools, response_format=response_format)).encode("utf-8")
        except LlmError as e:
            return fail(e)
        except (TypeError, ValueError) as e:
            return fail(LlmError(f"llm: request is not JSON: {e}"))
        headers = {b"Content-Type": [b"application/json"], b"Accept": [b"text/event-stream"]}
        if key:
            headers[b"Authorization"] = [b"Bearer " + key.encode("utf-8")]
        call = _ChatCall(self._clock, first_token_timeout_s, total_timeout_s, on_delta, self._log,
                         self._fetch.max_bytes)
        # No redirects: the key never goes to a host nobody configured.
        call.start(self._http.post(self.url, data=data, headers=headers, unbuffered=True, allow_redirects=False))
        return call.result


class _ChatCall(StreamedCall[ChatResult]):
    """One streamed ``/chat/completions`` request: ``timeout_s`` bounds the whole answer, and a
    second timer the wait for its first delta."""

    provider = "llm"
    error_type = LlmError
    idle_timeout = False

    def __init__(self, clock: IReactorTime, first_token_timeout_s: float, total_timeout_s: float,
                 on_delta: Callable[[str], None], log: Logger, max_bytes: int) -> None:
        super().__init__(clock, total_timeout_s, max_bytes, log)
        self._on_delta = on_delta
        self._first_s = first_token_timeout_s
        self._first: Optional[IDelayedCall] = clock.callLater(first_token_timeout_s, self._no_first_token)
        self._sse = SseDecoder()
        self._answer = ChatAssembler()
        self.result.addBoth(self._ended)

    def _ended(self, result: Any) -> Any:
        self._cancel_first()
        return result

    def _cancel_first(self) -> None:
        first, self._first = self._first, None
        if first is not None and first.active():
            first.cancel()

    def _no_first_token(self) -> None:
        self._first = None
        self._fail(LlmError(f"llm: no first token within {self._first_s:g} s", retryable=True))

    def timeout_error(self) -> LlmError:
        return LlmError(f"llm: answer not complete within {self.timeout_s:g} s", retryable=True)

    def check_response(self, response: IResponse) -> None:
        ctype = content_type(response)
        if ctype == b"application/json":
            raise LlmError("llm: the server answered with JSON, not an event stream (stream not supported?)")

    def received(self, data: bytes) -> None:
        try:
            payloads = self._sse.feed(data)
        except SseError as e:
            raise LlmError(f"llm: malformed stream: {e}") from None
        for payload in payloads:
            if self._stopped:  # on_delta cancelled the call
                return
            delta = parse_chunk(payload)
            if delta.text or delta.tool_calls or delta.finish_reason:
                self._cancel_first()
            self._answer.add(delta)
            if delta.text:
                self.deliver(self._on_delta, delta.text)

    def deliver(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception as e:
            self._log.failure("llm on_delta callback failed")
            raise LlmError(f"llm: delta consumer failed: {e}") from e

    def finished(self) -> ChatResult:
        if not self._sse.done and self._answer.finish_reason is None:
            raise LlmError("llm: stream ended before the answer finished", retryable=True)
        return self._answer.result()

    def status_error(self, code: int, body: bytes) -> LlmError:
        message = server_message(body, ("error", "detail", "message"))
        return LlmError(f"llm HTTP {code}: {message}".rstrip(": "), retryable=retryable_status(code))
