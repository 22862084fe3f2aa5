"""Incoming-call webhook (protocol.md §1.4, §5.4; config.md §5; playbook.md §13.2).

Three pieces:

- :func:`build_invite_payload` renders an inbound INVITE as the JSON body.
- :class:`WebhookNotifier` sends that body to the configured URLs through an
  :class:`activecall.fetch.Fetcher` (bounded, redirects on the same host only),
  signed with ``X-Activecall-Signature`` when ``[webhook] signing_secret`` is set.
- :class:`WebhookCallHandler` is the :class:`ICallHandler` that ties them to
  :class:`~activecall.handlers.pending.PendingCalls`: each new INVITE waits
  there (armed with ``accept_timeout``) for a ``/call/sip?id=<dialogId>``
  client, and a failed notification rejects it ``503`` with
  ``Reason: Failed to process invite: <error>``.

URL choice and retries.  The spec says "one URL per INVITE round-robin" and
nothing about retries; AC sends exactly one request and gives up.  activecall
starts each INVITE at the next URL in turn and, **only when the request
provably never reached a server** (connection refused or failed, DNS failure,
unsupported scheme, request not transmitted), tries the following URLs, each
at most once per INVITE.  A timeout, an HTTP error status or a lost response
is not retried: the application may already have seen the INVITE, and a
second notification could make two clients race for one call.  Each attempt
is bounded by ``timeout_s`` (10 s, playbook.md §13.2; AC has none).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, NoReturn, Optional, Protocol
from urllib.parse import quote

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from zope.interface import implementer

from activecall.config import WebhookHandlerConfig
from activecall.control.events import format_rfc3339
from activecall.fetch import SIGNATURE_HEADER, signature
from activecall.handlers.pending import PendingCalls
from activecall.sip.message import SipRequest
from activecall.sip.useragent import ICallHandler, InboundCall

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "HttpClient",
    "Notifier",
    "WebhookCallHandler",
    "WebhookError",
    "WebhookNotifier",
    "build_invite_payload",
]

DEFAULT_TIMEOUT_S = 10.0
"""Per-request limit (playbook.md §13.2: "activecall uses 10 s")."""

_FAILED_PREFIX = "Failed to process invite: "
_SEND_FAILED = "failed to send invite to webhook"  # AC's wording, kept for log/grep compatibility

# Failures after which the server cannot have received the request: safe to try the next URL.
_NOT_DELIVERED: tuple[type[BaseException], ...] = (
    ConnectError, DNSLookupError, SchemeNotSupported, RequestTransmissionFailed,
)

_WS = re.compile(r"\s+")


class WebhookError(Exception):
    """The webhook was not notified; ``str(error)`` is the text for the 503 ``Reason``.

    ``status`` is the HTTP status when the server answered non-2xx, else None.
    """

    def __init__(self, text: str, status: int | None = None) -> None:
        super().__init__(text)
        self.status = status


class HttpClient(Protocol):
    """The part of :class:`activecall.fetch.Fetcher` (or ``treq.testing.StubTreq``) used here."""

    def request(self, method: str, url: str, *, data: bytes, headers: Headers) -> Deferred[Any]:
        """Send one request; fire with a treq response (``code``, ``content()``)."""


class Notifier(Protocol):
    """Anything that delivers an invite payload: :class:`WebhookNotifier` or a test fake."""

    def notify(self, payload: dict[str, Any]) -> Deferred[None]:
        """Fire with None once notified; errback with :class:`WebhookError` otherwise."""


class _InviteView(Protocol):
    """What :func:`build_invite_payload` reads of an :class:`InboundCall`."""

    @property
    def request(self) -> SipRequest: ...

    @property
    def call_id(self) -> str: ...

    @property
    def from_tag(self) -> str: ...

    @property
    def to_tag(self) -> str: ...

    @property
    def caller(self) -> str: ...

    @property
    def callee(self) -> str: ...


def build_invite_payload(call: _InviteView, created_at: float, dialog_id: str) -> dict[str, Any]:
    """Return the webhook JSON object for ``call`` exactly as protocol.md §1.4 lists it.

    ``created_at`` is the INVITE's arrival in seconds since the epoch (the
    injected clock); ``dialog_id`` is the session id clients must connect with.
    """
    request = call.request
    return {
        "event": "invite",
        "dialogId": dialog_id,
        "call_id": call.call_id,
        "from_tag": call.from_tag,
        "to_tag": call.to_tag,
        "createdAt": format_rfc3339(created_at),
        "caller": call.caller,
        "callee": call.callee,
        # Every header line as received (names as written, repeated headers kept, in order).
        "headers": [f"{name}: {value}" for name, value in request.headers],
        # AC uses from_utf8_lossy; "replace" is the same policy.
        "offer": bytes(request.body).decode("utf-8", "replace"),
    }


def owner_fields(node: tuple[str, str], dialog_id: str) -> dict[str, str]:
    """``node`` and ``wsUrl`` (config.md §14b): the owning node, and its socket URL for this call, so an
    application may connect there directly (any node would tunnel it)."""
    node_id, base = node
    scheme, rest = base.split("://", 1)
    ws = ("wss" if scheme == "https" else "ws") + "://" + rest.rstrip("/")
    return {"node": node_id, "wsUrl": f"{ws}/call/sip?id={quote(dialog_id, safe='')}"}


def _one_line(text: str) -> str:
    # The text ends up in a SIP header: no CR/LF, no runs of whitespace.
    return _WS.sub(" ", text).strip()


def _describe(failure: Failure) -> str:
    """A short human text for a transport failure (unwrapping treq/Agent wrappers)."""
    value = failure.value
    if isinstance(value, (ResponseFailed, RequestTransmissionFailed)) and value.reasons:
        inner = value.reasons[0]
        text = inner.getErrorMessage() if isinstance(inner, Failure) else str(inner)
    else:
        text = failure.getErrorMessage()
    text = _one_line(text)
    name = type(value).__name__
    return f"{name}: {text}" if text and text != name else name


def _timed_out(result: object, timeout_s: float) -> NoReturn:
    """``addTimeout`` hook: whatever the cancelled request produced, the outcome is a timeout."""
    raise DeferredTimeoutError(timeout_s, "webhook request timed out")


def _drain(response: Any) -> None:
    """Read and drop the body so the connection can be reused; its outcome does not matter."""
    content = getattr(response, "content", None)
    if callable(content):
        d = content()
        if isinstance(d, Deferred):
            d.addErrback(lambda _f: None)


class WebhookNotifier:
    """Sends invite payloads to ``config.urls`` (round-robin, one URL per INVITE).

    ``http_client`` is a :class:`~activecall.fetch.Fetcher` (``StubTreq`` in tests) and
    ``clock`` bounds each attempt to ``timeout_s``.  See the module docstring
    for the retry rule.
    """

    _log = Logger()

    def __init__(self, config: WebhookHandlerConfig, http_client: HttpClient, clock: IReactorTime, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, signing_secret: str | None = None) -> None:
        self._urls: tuple[str, ...] = tuple(config.urls)
        self._method = (config.method or "POST").upper()
        self._extra_headers = tuple(config.headers)
        self._client = http_client
        self._clock = clock
        self._timeout_s = timeout_s
        self._signing_secret = signing_secret
        self._next = 0

    def notify(self, payload: dict[str, Any]) -> Deferred[None]:
        """POST (or the configured method) ``payload`` as JSON; fire None on any 2xx.

        Errbacks with :class:`WebhookError` on a non-2xx answer, a timeout or
        a transport error (after the retries the module docstring describes),
        and at once when no URL is configured.
        """
        if not self._urls:
            return fail(WebhookError("no webhook URL configured"))
        start = self._next
        self._next = (start + 1) % len(self._urls)
        order = self._urls[start:] + self._urls[:start]
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        return self._attempt(order, 0, body)

    def _headers(self, body: bytes) -> Headers:
        headers = Headers()
        headers.setRawHeaders(b"Content-Type", [b"application/json"])
        replaced: set[bytes] = set()
        for name, value in self._extra_headers:
            raw = name.encode("latin-1")
            key = raw.lower()
            if key == b"content-type" and key not in replaced:
                # A configured Content-Type wins over ours (reqwest behaves the same).
                headers.setRawHeaders(raw, [])
                replaced.add(key)
            headers.addRawHeader(raw, value.encode("latin-1"))
        if self._signing_secret is not None:
            # Ours, never a configured one: the application verifies it over the exact body.
            headers.setRawHeaders(SIGNATURE_HEADER, [signature(self._signing_secret, body, self._clock.seconds())])
        return headers

    def _attempt(self, order: Sequence[str], index: int, body: bytes) -> Deferred[None]:
        url = order[index]
        # maybeDeferred: a bad header value or URL raising here must become a WebhookError too.
        d: Deferred[Any] = maybeDeferred(
            lambda: self._client.request(self._method, url, data=body, headers=self._headers(body)))
        # Agents report their own cancellation as ResponseNeverReceived, not CancelledError,
        # so mark every timeout explicitly rather than relying on addTimeout's translation.
        d.addTimeout(self._timeout_s, self._clock, onTimeoutCancel=_timed_out)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(url,),
                       errbackArgs=(order, index, body))
        return d

    def _answered(self, response: Any, url: str) -> None:
        code = int(response.code)
        _drain(response)
        self._log.info("webhook {url} answered {code}", url=url, code=code)
        if not 200 <= code < 300:
            raise WebhookError(f"{_SEND_FAILED}: HTTP {code}", status=code)

    def _failed(self, failure: Failure, order: Sequence[str], index: int, body: bytes) -> Deferred[None]:
        url = order[index]
        if failure.check(DeferredTimeoutError):
            self._log.warn("webhook {url} timed out after {timeout_s} s", url=url, timeout_s=self._timeout_s)
            raise WebhookError(f"{_SEND_FAILED}: timed out after {self._timeout_s:g} s")
        text = _describe(failure)
        if failure.check(*_NOT_DELIVERED) and index + 1 < len(order):
            self._log.warn("webhook {url} unreachable ({error}); trying {next_url}",
                           url=url, error=text, next_url=order[index + 1])
            return self._attempt(order, index + 1, body)
        self._log.warn("webhook {url} failed: {error}", url=url, error=text)
        raise WebhookError(f"{_SEND_FAILED}: {text}")


class _PendingWatch:
    """Dialog listener installed while a call is pending: a CANCEL (or any end) forgets it.

    The call controller replaces it with its own listener once a client claims the call.
    """

    def __init__(self, pending: PendingCalls, dialog_id: str, call: object) -> None:
        self._pending = pending
        self._dialog_id = dialog_id
        self._call = call

    def _forget(self) -> None:
        if self._pending.get(self._dialog_id) is self._call:
            self._pending.cancelled(self._dialog_id)

    def on_cancel(self) -> None:
        """The caller sent CANCEL before any client answered (487 already sent)."""
        self._forget()

    def on_terminated(self, reason: str) -> None:
        """The dialog ended while still pending (cancel, rejected, transport error)."""
        self._forget()


@implementer(ICallHandler)
class WebhookCallHandler:
    """The ``[handler] type = "webhook"`` inbound-call handler.

    For each new INVITE: register the call in ``pending`` under its dialogId
    (armed with the accept timeout), then notify the webhook; a failed
    notification rejects the call 503 ``Reason: Failed to process invite: <error>``
    if it is still pending.  During a graceful shutdown the user agent answers
    new INVITEs 503 itself; they never come here.
    """

    _log = Logger()

    def __init__(self, notifier: Notifier, pending: PendingCalls, clock: IReactorTime,
                 node: Optional[tuple[str, str]] = None) -> None:
        self._notifier = notifier
        self._pending = pending
        self._clock = clock
        # (node_id, HTTP base URL) of this node in a cluster: the payload names where to connect.
        self._node = node

    def incoming_call(self, call: InboundCall) -> None:
        """Park ``call`` in the pending registry and send the webhook (protocol.md §5.4 step 1)."""
        dialog_id = call.dialog_id
        try:
            payload = build_invite_payload(call, self._clock.seconds(), dialog_id)
            if self._node is not None:
                payload.update(owner_fields(self._node, dialog_id))
        except Exception as err:
            # A header the parser accepted but we cannot render: refuse rather than leave it ringing.
            self._log.failure("building the webhook payload for {dialog_id} failed", dialog_id=dialog_id)
            call.reject(503, None, headers=[("Reason", _FAILED_PREFIX + _one_line(str(err)))])
            return
        if not self._pending.add(dialog_id, call, source_ip=call.source[0]):
            return  # max_pending_invites reached: answered 503, no webhook
        call.listener = _PendingWatch(self._pending, dialog_id, call)
        self._log.info("inbound call {dialog_id} from {caller} to {callee}: notifying webhook",
                       dialog_id=dialog_id, caller=call.caller, callee=call.callee)
        d: Deferred[None] = maybeDeferred(self._notifier.notify, payload)
        d.addErrback(self._notify_failed, dialog_id, call)

    def _notify_failed(self, failure: Failure, dialog_id: str, call: object) -> None:
        if failure.check(WebhookError):
            text = str(failure.value)
        else:
            self._log.failure("webhook notifier failed unexpectedly", failure)
            text = failure.getErrorMessage() or type(failure.value).__name__
        if self._pending.get(dialog_id) is not call:
            # Already claimed by a client, cancelled or timed out: nothing left to refuse.
            self._log.info("webhook for {dialog_id} failed after the call left pending: {error}",
                           dialog_id=dialog_id, error=text)
            return
        self._log.warn("inbound call {dialog_id} refused: webhook failed: {error}",
                       dialog_id=dialog_id, error=text)
        self._pending.reject(dialog_id, 503, _FAILED_PREFIX + _one_line(text))
