"""One HTTP request whose response body streams to a provider's hooks: every HTTP speech provider's call.

The machinery (timer on the injected clock, cancellation, size caps, error bodies) lives here once;
a provider's subclass says only what differs: which responses it takes, what it does with the body,
and the texts of its errors.

States::

    waiting for the response headers --2xx, accepted--> streaming the body to ``received`` --end--> finished
                  |                  --other status--> collecting the error body (capped) --end--> failed
                  +-- request failed / timeout / cancel --> failed (or cancelled)

``result`` fires exactly once.  Every way out of the first two states (failure, timeout, cancel)
aborts the HTTP request: a request still waiting for its response headers is a *called* Deferred
chained to the connection's, so it is cancelled unconditionally; the call is marked stopped first,
and whatever the request reports after that (``ResponseNeverReceived`` wrapping the
``CancelledError``, a body cut short) is ignored.
"""

from __future__ import annotations

import json
from typing import Any, Callable, ClassVar, Generic, Optional, Sequence, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from activecall.fetch import BodyStream

__all__ = ["StreamedCall", "PcmFramer", "MAX_ERROR_BODY_BYTES", "content_type", "retryable_status", "server_message"]

T = TypeVar("T")
#: What a call fails with: its provider's exception type, built as ``error_type(message, retryable=...)``
#: (SynthesisError, RecognitionError, the LLM client's LlmError).
SpeechError = Exception

#: The most of an error response's body kept for its message.
MAX_ERROR_BODY_BYTES = 64 * 1024


class _TooLarge(Exception):
    """A body passed its cap (raised inside the body receiver, which then drops the connection)."""


class _ErrorBodyCut(Exception):
    """An error body reached MAX_ERROR_BODY_BYTES: enough to report, the rest is not read."""


class StreamedCall(Generic[T]):
    """One request: ``start(http_client.post(...))``, then ``result`` fires with :meth:`finished`'s value.

    Subclasses set ``provider`` (the name in error texts) and ``error_type``, implement
    :meth:`received`, :meth:`finished` and :meth:`status_error`, and may override the other hooks.
    ``timeout_s`` restarts with every piece of the body when ``idle_timeout`` is true, else it
    bounds the whole call.  A 2xx body beyond ``max_bytes`` fails; an error body is cut at
    ``MAX_ERROR_BODY_BYTES`` (or fails as too large when ``truncate_error_body`` is false).
    """

    provider: ClassVar[str]
    error_type: ClassVar[type[Exception]]
    idle_timeout: ClassVar[bool] = True
    truncate_error_body: ClassVar[bool] = True

    def __init__(self, clock: IReactorTime, timeout_s: float, max_bytes: int, log: Logger) -> None:
        self._clock = clock
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._log = log
        #: The response status, once the headers are in.
        self.code = 0
        self._size = 0
        self._error_body = bytearray()
        self._stopped = False
        self._pending: Optional[Deferred[Any]] = None
        self._body: Optional[BodyStream] = None
        self._timer: Optional[IDelayedCall] = None
        self.result: Deferred[T] = Deferred(lambda _: self._stop())

    def start(self, request: Deferred[IResponse]) -> None:
        """Follow ``request`` (the HTTP client's Deferred) until ``result`` fires."""
        self._pending = request
        self._timer = self._clock.callLater(self.timeout_s, self._timed_out)
        request.addCallbacks(self._got_response, self._request_failed)

    # -- hooks

    def check_response(self, response: IResponse) -> None:
        """Refuse a 2xx response (say, its content type) by raising ``error_type``; by default all are taken."""

    def received(self, data: bytes) -> None:
        """A piece of a 2xx body (within ``max_bytes``); raising ``error_type`` fails the call."""
        raise NotImplementedError

    def finished(self) -> T:
        """The whole 2xx body is in: the value ``result`` fires with, or raise ``error_type``."""
        raise NotImplementedError

    def status_error(self, code: int, body: bytes) -> SpeechError:
        """The error for a non-2xx status, given (the start of) its body."""
        raise NotImplementedError

    def timeout_error(self) -> SpeechError:
        """The error when the timer runs out."""
        if self.idle_timeout:
            return self.error_type(f"{self.provider}: no data for {self.timeout_s:g} s", retryable=True)
        return self.error_type(f"{self.provider}: no answer within {self.timeout_s:g} s", retryable=True)

    def request_error(self, failure: Failure) -> SpeechError:
        """The error when the request fails before a response (connection refused, reset, ...)."""
        return self.error_type(f"{self.provider} request failed: {failure.getErrorMessage()}", retryable=True)

    def interrupted_error(self, failure: Failure) -> SpeechError:
        """The error when the body is cut short."""
        return self.error_type(f"{self.provider} response interrupted: {failure.getErrorMessage()}", retryable=True)

    def too_large_error(self, limit: int) -> SpeechError:
        """The error when a body passes ``limit`` bytes."""
        return self.error_type(f"{self.provider}: response larger than {limit} bytes", retryable=False)

    def deliver(self, callback: Callable[..., None], *args: Any) -> None:
        """Call a consumer's callback; its exception is logged and fails the call as ``error_type``."""
        try:
            callback(*args)
        except Exception as e:
            self._log.failure("{provider} consumer callback failed", provider=self.provider)
            raise self.error_type(f"audio consumer failed: {e}", retryable=False) from e

    # -- outcome

    def _stop(self) -> None:
        self._stopped = True  # first: what the cancelled request reports below is ignored
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()  # even when "called": that is what drops a connection waiting for headers
        body, self._body = self._body, None
        if body is not None:
            body.stop()

    def _fail(self, error: SpeechError) -> None:
        if self._stopped:
            return
        self._stop()
        self.result.errback(Failure(error))

    def _succeed(self, value: T) -> None:
        if self._stopped:
            return
        self._stop()
        self.result.callback(value)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(self.timeout_error())

    # -- response

    def _request_failed(self, failure: Failure) -> None:
        self._pending = None
        self._fail(self.request_error(failure))

    def _got_response(self, response: IResponse) -> None:
        self._pending = None
        if self._stopped:
            _discard(response)
            return
        self.code = response.code
        ok = 200 <= response.code < 300
        if ok:
            try:
                self.check_response(response)
            except self.error_type as e:
                _discard(response)
                self._fail(e)
                return
        limit = self.max_bytes if ok else MAX_ERROR_BODY_BYTES
        if (ok or not self.truncate_error_body) and response.length is not UNKNOWN_LENGTH and response.length > limit:
            _discard(response)
            self._fail(self.too_large_error(limit))
            return
        finished: Deferred[None] = Deferred()
        self._body = BodyStream(self._data if ok else self._error_data, finished)
        finished.addCallbacks(self._body_done, self._body_failed)
        response.deliverBody(self._body)

    def _data(self, data: bytes) -> None:
        if self._stopped:
            return
        self._size += len(data)
        if self._size > self.max_bytes:
            raise _TooLarge()
        if self.idle_timeout and self._timer is not None:
            self._timer.reset(self.timeout_s)
        self.received(data)

    def _error_data(self, data: bytes) -> None:
        room = MAX_ERROR_BODY_BYTES - len(self._error_body)
        if len(data) > room:
            if not self.truncate_error_body:
                raise _TooLarge()
            self._error_body += data[:room]
            raise _ErrorBodyCut()
        self._error_body += data

    def _body_done(self, _: None) -> None:
        self._body = None
        if self._stopped:
            return
        if not 200 <= self.code < 300:
            self._fail(self.status_error(self.code, bytes(self._error_body)))
            return
        try:
            value = self.finished()
        except self.error_type as e:
            self._fail(e)
            return
        self._succeed(value)

    def _body_failed(self, failure: Failure) -> None:
        self._body = None
        if self._stopped:
            return
        if failure.check(_ErrorBodyCut):
            self._fail(self.status_error(self.code, bytes(self._error_body)))
        elif failure.check(_TooLarge):
            ok = 200 <= self.code < 300
            self._fail(self.too_large_error(self.max_bytes if ok else MAX_ERROR_BODY_BYTES))
        elif isinstance(failure.value, self.error_type):
            self._fail(failure.value)
        else:
            self._log.debug("{provider} body failed: {reason}", provider=self.provider,
                            reason=failure.getErrorMessage())
            self._fail(self.interrupted_error(failure))


def content_type(response: IResponse) -> bytes:
    """The response's media type, lower-case, without parameters (``b""`` when absent)."""
    return (response.headers.getRawHeaders(b"content-type") or [b""])[0].split(b";")[0].strip().lower()


def retryable_status(code: int) -> bool:
    """Whether trying again may help after HTTP ``code``: a timeout, a rate limit or a server error."""
    return code in (408, 429) or code >= 500


def server_message(body: bytes, fields: Sequence[str], max_chars: int = 200) -> str:
    """The message of an error body: the first of ``fields`` (of a JSON object) that is a string or an
    object with a ``message`` string, else the body's text; whitespace collapsed, at most ``max_chars``."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    message = ""
    if isinstance(parsed, dict):
        for field in fields:
            value = parsed.get(field)
            if isinstance(value, dict):
                value = value.get("message")
            if isinstance(value, str) and value.strip():
                message = value
                break
    message = " ".join((message or body.decode("utf-8", "replace")).split())
    return message[:max_chars] + "..." if len(message) > max_chars else message


def _discard(response: IResponse) -> None:
    """Drop the connection of a response whose body is not wanted."""
    ignored = BodyStream(lambda data: None, Deferred())
    response.deliverBody(ignored)
    ignored.stop()


class PcmFramer:
    """Hands out even-length pieces of an s16le byte stream (HTTP body or WebSocket frames), carrying
    an odd byte to the next piece, so consumers always get whole samples."""

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data
        cut = len(data) & ~1
        self._carry = data[cut:]
        return data[:cut]
