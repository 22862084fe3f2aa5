"""Bounded HTTP(S) requests to URLs the daemon is given: ``play`` URLs, webhooks, call-record posts.

Policy (``[fetch]``, :class:`~activecall.config.FetchConfig`; docs/security.md):

* only ``http``/``https`` URLs with a host; with ``allowed_hosts`` set, only those hosts
  (exact name, or ``*.suffix`` for any sub-domain), checked on the first URL and every redirect;
* redirects (301/302/303/307/308) are followed by hand, at most ``max_redirects``, and only to
  the same host unless ``follow_redirects``; a POST follows only 307/308 (same method and body),
  other redirects of a POST are returned as the answer; a hop to another host carries no caller headers
  (they may hold credentials meant for the first host);
* a connect timeout (the agent built by :func:`http_client_for`) and a total timeout on the
  injected clock cover every hop and the body;
* the body is streamed and the request fails once it passes ``max_bytes``; a larger
  ``Content-Length`` fails before any body is read.

:meth:`Fetcher.get` is for URLs a client chose: every failure is the same :class:`FetchError`
text (``cannot fetch <url>: unavailable``), so the daemon is no port scanner or size oracle for
the client; the reason goes to the daemon log only. :meth:`Fetcher.request` keeps the original
failure (connection refused, :class:`FetchRefusedError`, ``defer.TimeoutError`` ...) for
callers that must tell them apart (the webhook's retry rule).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union
from urllib.parse import urljoin, urlsplit

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from activecall.config import FetchConfig

__all__ = [
    "BodyStream",
    "FetchError",
    "FetchRefusedError",
    "FetchTooLargeError",
    "FetchedResponse",
    "Fetcher",
    "check_url",
    "SIGNATURE_HEADER",
    "host_allowed",
    "http_client_for",
    "signature",
]

SIGNATURE_HEADER = "X-Activecall-Signature"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# A redirect's own body is never used; read a little of it so the connection can be reused.
_MAX_REDIRECT_BODY = 64 * 1024


class FetchRefusedError(ValueError):
    """The policy refuses a URL (scheme, host, redirect); the message is for the daemon log."""


class FetchTooLargeError(ValueError):
    """The response body is larger than ``max_bytes``."""


class FetchError(Exception):
    """A client-chosen URL could not be fetched; ``str()`` never says why (see the log)."""

    def __init__(self, url: str) -> None:
        super().__init__(f"cannot fetch {url}: unavailable")
        self.url = url


@dataclass(frozen=True)
class FetchedResponse:
    """A complete response: status, headers and the whole (bounded) body."""

    code: int
    headers: Headers
    body: bytes
    url: str


def signature(secret: str, body: bytes, now: float) -> str:
    """The ``X-Activecall-Signature`` value: ``t=<unix s>,v1=<hex HMAC-SHA256 of "t.body">``.

    A receiver recomputes the HMAC over the exact bytes received and rejects old ``t``
    (replays); see docs/security.md.
    """
    t = str(int(now))
    mac = hmac.new(secret.encode("utf-8"), t.encode("ascii") + b"." + body, hashlib.sha256)
    return f"t={t},v1={mac.hexdigest()}"


def http_client_for(reactor: Any, config: FetchConfig, pool: Optional[HTTPConnectionPool] = None) -> HTTPClient:
    """A treq client whose agent gives up connecting after ``config.connect_timeout_s``."""
    return HTTPClient(Agent(reactor, connectTimeout=config.connect_timeout_s, pool=pool))


def host_allowed(host: str, allowed_hosts: tuple[str, ...]) -> bool:
    """Whether ``host`` matches the allow-list: empty = any; ``*.example.com`` = its sub-domains."""
    if not allowed_hosts:
        return True
    host = host.lower().rstrip(".")
    for entry in allowed_hosts:
        entry = entry.lower().strip("[]")
        if entry.startswith("*."):
            if host.endswith(entry[1:]):
                return True
        elif host == entry:
            return True
    return False


def check_url(url: str, allowed_hosts: tuple[str, ...], schemes: tuple[str, str] = ("http", "https")) -> str:
    """Return the lower-case host of an http(s) ``url`` (or another pair of ``schemes``: ws, wss) whose
    host is allowed, else raise FetchRefusedError."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
    except ValueError as e:
        raise FetchRefusedError(f"malformed URL: {e}") from None
    if parts.scheme not in schemes:
        raise FetchRefusedError(f"scheme {parts.scheme!r} is not {schemes[0]} or {schemes[1]}")
    if not host:
        raise FetchRefusedError("URL has no host")
    if not host_allowed(host, allowed_hosts):
        raise FetchRefusedError(f"host {host} is not in fetch.allowed_hosts")
    return host


class BodyStream(Protocol):
    """A response body receiver (like ``treq.collect``) that can also abort the connection.

    ``on_data`` gets each chunk; an exception from it stops the body and fails ``finished``.
    ``treq.collect`` cannot abort a stalled body when its Deferred is cancelled; this can.
    """

    def __init__(self, on_data: Callable[[bytes], None], finished: Deferred[None]) -> None:
        self._on_data = on_data
        self._finished: Optional[Deferred[None]] = finished

    def dataReceived(self, data: bytes) -> None:
        if self._finished is None:
            return
        try:
            self._on_data(data)
        except BaseException:
            finished, self._finished = self._finished, None
            self.stop()
            finished.errback(Failure())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        finished, self._finished = self._finished, None
        if finished is None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(None)
        else:
            finished.errback(reason)

    def stop(self) -> None:
        """Stop receiving: close the underlying connection."""
        self._finished = None
        if self.transport is not None:
            self.transport.stopProducing()


def _read_body(response: IResponse, limit: int) -> Deferred[bytes]:
    """The whole body, failing with :class:`FetchTooLargeError` (and dropping the connection) past ``limit``."""
    if response.length is not UNKNOWN_LENGTH and response.length > limit:
        ignored: Deferred[None] = Deferred()
        body = BodyStream(lambda data: None, ignored)
        response.deliverBody(body)
        body.stop()
        return fail(FetchTooLargeError(f"Content-Length {response.length} larger than {limit} bytes"))
    chunks: list[bytes] = []
    size = [0]

    def collect(data: bytes) -> None:
        size[0] += len(data)
        if size[0] > limit:
            raise FetchTooLargeError(f"body larger than {limit} bytes")
        chunks.append(data)

    holder: list[BodyStream] = []
    finished: Deferred[None] = Deferred(lambda _: holder[0].stop())
    holder.append(BodyStream(collect, finished))
    response.deliverBody(holder[0])
    return finished.addCallback(lambda _: b"".join(chunks))


def _as_headers(headers: Union[Headers, Mapping[str, str], None]) -> Headers:
    if isinstance(headers, Headers):
        return headers.copy()
    out = Headers()
    for name, value in (headers or {}).items():
        out.addRawHeader(name, value)
    return out


class Fetcher:
    """Requests URLs under a :class:`FetchConfig` policy (see the module docstring).

    ``http_client`` is a treq :class:`HTTPClient` from :func:`http_client_for` (``StubTreq`` in
    tests); ``clock`` runs the total timeout.
    """

    _log = Logger()

    def __init__(self, http_client: Any, clock: IReactorTime, config: FetchConfig) -> None:
        self._http = http_client
        self._clock = clock
        self._config = config

    def check_url(self, url: str) -> str:
        """Return the lower-case host of ``url``, or raise FetchRefusedError if policy forbids it."""
        return check_url(url, self._config.allowed_hosts)

    def request(self, method: str, url: str, *, data: Optional[bytes] = None,
                headers: Union[Headers, Mapping[str, str], None] = None) -> Deferred[FetchedResponse]:
        """Send one request under the policy; fire with the final response (any status).

        Fails with FetchRefusedError, FetchTooLargeError, ``defer.TimeoutError`` (total
        timeout) or the agent's own failure. Cancelling the Deferred aborts the request.
        """
        d = Deferred.fromCoroutine(self._request(method.upper(), url, data, _as_headers(headers)))
        timeout_s = self._config.timeout_s

        def timed_out(result: object, _timeout: float) -> Any:
            raise DeferredTimeoutError(timeout_s, f"no complete answer within {timeout_s:g} s")

        return d.addTimeout(timeout_s, self._clock, onTimeoutCancel=timed_out)

    def post(self, url: str, body: bytes,
             headers: Union[Headers, Mapping[str, str], None] = None) -> Deferred[FetchedResponse]:
        """POST ``body``; like :meth:`request`."""
        return self.request("POST", url, data=body, headers=headers)

    def get(self, url: str) -> Deferred[bytes]:
        """GET a client-chosen URL; fire with the body of a 2xx answer, else fail with FetchError."""

        def check(response: FetchedResponse) -> bytes:
            if not 200 <= response.code < 300:
                raise FetchRefusedError(f"HTTP {response.code}")
            return response.body

        def hide(f: Failure) -> Failure:
            if f.check(CancelledError):
                return f
            self._log.info("fetching {url} failed: {reason}", url=url, reason=_describe(f))
            return Failure(FetchError(url))

        return self.request("GET", url).addCallback(check).addErrback(hide)

    async def _request(self, method: str, url: str, data: Optional[bytes], headers: Headers) -> FetchedResponse:
        host = self.check_url(url)
        first_host = host
        for hop in range(self._config.max_redirects + 1):
            response = await self._http.request(
                method, url, data=data, headers=headers, allow_redirects=False, unbuffered=True)
            location = response.headers.getRawHeaders(b"location")
            # Only 307/308 keep the method and body; a POST answered 301-303 is returned as it is
            # (re-sending it as a body-less GET would report a delivery that never happened).
            resend = response.code in (307, 308) or method in ("GET", "HEAD")
            if response.code not in _REDIRECTS or not location or not resend:
                body = await _read_body(response, self._config.max_bytes)
                return FetchedResponse(response.code, response.headers, body, url)
            await _read_body(response, _MAX_REDIRECT_BODY).addErrback(lambda _f: None)
            if hop == self._config.max_redirects:
                break
            target = urljoin(url, location[0].decode("latin-1"))
            target_host = self.check_url(target)
            if target_host != host and not self._config.follow_redirects:
                raise FetchRefusedError(f"redirect from {host} to another host ({target_host})")
            self._log.debug("{url} redirects ({code}) to {target}", url=url, code=response.code, target=target)
            if target_host != first_host:
                headers = Headers()  # credentials in caller headers are for the first host only
            url, host = target, target_host
        raise FetchRefusedError(f"more than {self._config.max_redirects} redirects")


def _describe(f: Failure) -> str:
    """The log text of a fetch failure, unwrapping the agent's ResponseFailed-style wrappers."""
    reasons = getattr(f.value, "reasons", None)
    if reasons:
        inner = reasons[0]
        return f"{type(f.value).__name__}: {inner.getErrorMessage() if isinstance(inner, Failure) else inner}"
    return f"{type(f.value).__name__}: {f.getErrorMessage()}"
