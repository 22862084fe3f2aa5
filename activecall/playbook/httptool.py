"""The agent's HTTP requests: the ``<http/>`` tag and the JSON ``http`` tool (playbook.md §7).

:func:`call_http` sends one request through the :class:`~activecall.fetch.Fetcher` (so the
``[fetch]`` policy, redirects, size cap apply) under its own deadline, and never fails: every
result, refused URL, bad header, timeout or network error is an :class:`HttpOutcome`.  The two
formatters turn an outcome into the ``system`` note the model sees next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.fetch import FetchedResponse, Fetcher, FetchRefusedError, FetchTooLargeError

__all__ = [
    "HttpOutcome", "call_http", "tag_method", "tool_method", "header_problem", "check_headers",
    "tag_result_note", "tool_result_note", "MAX_RESPONSE_CHARS", "MAX_HEADERS", "MAX_HEADER_NAME_CHARS",
    "MAX_HEADER_VALUE_CHARS", "MAX_URL_CHARS", "MAX_REQUEST_BODY_BYTES", "TOOL_METHODS", "DEFAULT_TIMEOUT_S",
]

#: The response text the model sees is cut to this many characters.
MAX_RESPONSE_CHARS = 4000
MAX_URL_CHARS = 2048
MAX_REQUEST_BODY_BYTES = 64 * 1024
MAX_HEADERS = 32
MAX_HEADER_NAME_CHARS = 128
MAX_HEADER_VALUE_CHARS = 4096
#: AC has no timeout for these requests; a stuck server must not stall the call.
DEFAULT_TIMEOUT_S = 10.0
#: The methods the JSON tool may name (default GET).
TOOL_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
# RFC 9110 token characters.
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
# CR/LF would end the header (request smuggling); NUL and other controls have no place in a value.
_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_log = Logger()


@dataclass(frozen=True)
class HttpOutcome:
    """What one request came to: ``status`` and ``text`` of an answer (any status), or an ``error`` (no answer)."""

    status: Optional[int]
    text: str = ""
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and 200 <= self.status < 300


def tag_method(raw: Optional[str]) -> str:
    """The ``<http/>`` tag's method: ``POST`` or ``PUT`` (any case), else ``GET``."""
    upper = (raw or "").strip().upper()
    return upper if upper in ("POST", "PUT") else "GET"


def tool_method(raw: Optional[str]) -> Optional[str]:
    """The JSON tool's method (default GET), or None when it is not one of :data:`TOOL_METHODS`."""
    upper = (raw or "GET").strip().upper() or "GET"
    return upper if upper in TOOL_METHODS else None


def header_problem(name: Any, value: Any) -> Optional[str]:
    """Why ``name: value`` may not go on an outgoing request, or None when it may."""
    if not isinstance(name, str) or not isinstance(value, str):
        return "header names and values must be strings"
    if not _TOKEN.fullmatch(name) or len(name) > MAX_HEADER_NAME_CHARS:
        return f"header name {name[:40]!r} is not a token of at most {MAX_HEADER_NAME_CHARS} characters"
    if _VALUE_FORBIDDEN.search(value):
        return f"header {name} has CR, LF or another control character"
    if len(value) > MAX_HEADER_VALUE_CHARS:
        return f"header {name} is longer than {MAX_HEADER_VALUE_CHARS} characters"
    return None


def check_headers(headers: Optional[Mapping[Any, Any]]) -> dict[str, str]:
    """The headers as a dict, or raise ValueError naming the first problem (count, name, value)."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ValueError("headers must be an object of strings")
    if len(headers) > MAX_HEADERS:
        raise ValueError(f"at most {MAX_HEADERS} headers")
    for name, value in headers.items():
        problem = header_problem(name, value)
        if problem is not None:
            raise ValueError(problem)
    return dict(headers)


def _text_of(body: bytes) -> str:
    return body[: MAX_RESPONSE_CHARS * 4].decode("utf-8", errors="replace")[:MAX_RESPONSE_CHARS]


def _error_of(f: Failure, timeout_s: float) -> str:
    """A short reason for the model (and the log): never a traceback."""
    if f.check(FetchRefusedError):
        return f"refused: {f.getErrorMessage()}"
    if f.check(FetchTooLargeError):
        return f"response too large: {f.getErrorMessage()}"
    if f.check(DeferredTimeoutError, CancelledError):
        return f"no answer within {timeout_s:g} s"
    reasons = getattr(f.value, "reasons", None)
    if reasons:
        inner = reasons[0]
        if isinstance(inner, Failure):
            return f"request failed: {inner.getErrorMessage()}"
    return f"request failed: {f.getErrorMessage() or type(f.value).__name__}"


def call_http(fetcher: Fetcher, url: str, method: Optional[str], body: Optional[bytes],
              headers: Optional[Mapping[str, str]] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
              clock: Optional[IReactorTime] = None, *, json_form: bool = False) -> Deferred[HttpOutcome]:
    """Send one request; fire with its :class:`HttpOutcome`, never fail.

    The tag form (``json_form`` false) sends POST/PUT as named, anything else as GET; the JSON
    form allows :data:`TOOL_METHODS` (another method is an error outcome) and gives a body with
    no ``Content-Type`` of its own ``application/json``.  A GET never carries the body.  ``timeout_s`` on ``clock`` (default:
    the fetcher's) bounds the whole request, on top of the fetcher's own ``[fetch]`` timeout.
    A refused URL or a bad header is an outcome with ``error``; no request is made.
    """
    chosen = tool_method(method) if json_form else tag_method(method)
    if chosen is None:
        return succeed(HttpOutcome(None, "", f"method {str(method)[:20]!r} is not one of "
                                             f"{', '.join(sorted(TOOL_METHODS))}"))
    if len(url) > MAX_URL_CHARS:
        return succeed(HttpOutcome(None, "", f"URL longer than {MAX_URL_CHARS} characters"))
    if body is not None and len(body) > MAX_REQUEST_BODY_BYTES:
        return succeed(HttpOutcome(None, "", f"request body larger than {MAX_REQUEST_BODY_BYTES} bytes"))
    try:
        fetcher.check_url(url)
    except FetchRefusedError as e:
        _log.info("http request to {url} refused: {reason}", url=url[:200], reason=str(e))
        return succeed(HttpOutcome(None, "", f"refused: {e}"))
    try:
        sent = check_headers(headers)
    except ValueError as e:
        return succeed(HttpOutcome(None, "", f"invalid headers: {e}"))
    data = None if chosen == "GET" else body  # a GET carries no body
    if json_form and data is not None and not any(n.lower() == "content-type" for n in sent):
        sent["Content-Type"] = "application/json"
    # The fetcher keeps its clock private; it is the same reactor in production.
    timer = clock if clock is not None else fetcher._clock  # noqa: SLF001
    d = fetcher.request(chosen, url, data=data, headers=sent)
    # Our own timer, not addTimeout: a cancelled request may fail with the agent's wrapper
    # (ResponseNeverReceived) rather than CancelledError, and it is still our timeout.
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        d.cancel()

    deadline = timer.callLater(timeout_s, expire)

    def answered(response: FetchedResponse) -> HttpOutcome:
        if deadline.active():
            deadline.cancel()
        return HttpOutcome(response.code, _text_of(response.body), None)

    def failed(f: Failure) -> HttpOutcome:
        if deadline.active():
            deadline.cancel()
        error = f"no answer within {timeout_s:g} s" if expired else _error_of(f, timeout_s)
        _log.info("http {method} {url} failed: {error}", method=chosen, url=url[:200], error=error)
        return HttpOutcome(None, "", error)

    return d.addCallbacks(answered, failed)


def tag_result_note(method: Optional[str], url: str, outcome: HttpOutcome) -> str:
    """The ``system`` note after an ``<http/>`` tag: method, URL, and the status and text, or the error."""
    shown = tag_method(method)
    if outcome.error is not None:
        return f"HTTP {shown} {url} failed: {outcome.error}"
    return f"HTTP {shown} {url} -> status {outcome.status}\nResponse: {outcome.text}"


def tool_result_note(outcome: HttpOutcome) -> str:
    """The ``system`` note after a JSON ``http`` tool (§7.2)."""
    if outcome.error is not None:
        return f"HTTP tool failed: {outcome.error}"
    return (f"HTTP tool response ({outcome.status}): {outcome.text}\n"
            "The HTTP request has already been completed. Answer the caller from this response in natural "
            "language; do not call the http tool again for it.")
