"""The post-call hook (playbook.md §12): an optional summary, then one JSON report to the ``posthook`` URL.

:class:`PosthookSpec` validates the front matter's ``posthook`` map; :func:`send_posthook` runs
the hook in the background and never fails.  The whole hook (summary included) stays within
``timeout`` on the injected clock; past it, whatever is in flight is cancelled and the hook is
abandoned (logged).  A non-2xx answer or a network error is retried (3 attempts, 1 s then 2 s
apart) while the deadline allows: the issue asks for retries where AC has none.  A URL the
``[fetch]`` policy refuses is logged and dropped at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Optional, Sequence
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.fetch import SIGNATURE_HEADER, FetchedResponse, Fetcher, FetchRefusedError, signature
from activecall.playbook.httptool import check_headers

__all__ = [
    "PosthookError", "PosthookSpec", "summary_instruction", "send_posthook", "posthook_timestamp",
    "SUMMARY_KINDS", "ATTEMPTS", "BACKOFF_S", "DEFAULT_TIMEOUT_S", "MIN_TIMEOUT_S", "MAX_TIMEOUT_S",
    "MAX_URL_CHARS", "MAX_SUMMARY_CHARS",
]

DEFAULT_TIMEOUT_S = 30.0
MIN_TIMEOUT_S = 1.0
MAX_TIMEOUT_S = 300.0
#: Attempts at delivering the report, and the waits between them.
ATTEMPTS = 3
BACKOFF_S = (1.0, 2.0)
MAX_URL_CHARS = 2048
#: The longest ``summary`` (a custom instruction) accepted.
MAX_SUMMARY_CHARS = 4000
#: Methods that carry the JSON body; any other is POST (§12).
_METHODS = ("POST", "PUT", "PATCH")
_INSTRUCTIONS = {
    "short": "Summarize this conversation in one or two sentences.",
    "detailed": ("Summarize this conversation in detail: the key points discussed, the decisions made "
                 "and any action items."),
    "intent": "Describe the caller's main intent in this conversation and what they need.",
    "json": ('Summarize this conversation as a JSON object with exactly these fields: "intent" (string, the '
             'caller\'s main intent), "key_points" (array of strings) and "sentiment" (string: positive, '
             'neutral or negative). Reply with the JSON object only.'),
}
SUMMARY_KINDS = frozenset(_INSTRUCTIONS)
_log = Logger()


class PosthookError(ValueError):
    """The ``posthook`` map is invalid; the message names the field."""


@dataclass(frozen=True)
class PosthookSpec:
    """A validated ``posthook``: where and how to send the report, what it carries, how long it may take."""

    url: str
    summary: Optional[str] = None
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()
    include_history: bool = True
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_mapping(cls, raw: Any) -> "PosthookSpec":
        """Validate the front matter's ``posthook`` map (camelCase keys); raise PosthookError.

        ``url`` is required (http or https with a host); ``method`` other than POST/PUT/PATCH
        is POST; ``timeout`` (seconds) is clamped to 1..300; ``summary`` empty = none.
        """
        if not isinstance(raw, Mapping):
            raise PosthookError("posthook: expected a map")
        url = raw.get("url")
        if not isinstance(url, str) or not url.strip():
            raise PosthookError("posthook.url: required")
        url = url.strip()
        if len(url) > MAX_URL_CHARS:
            raise PosthookError(f"posthook.url: longer than {MAX_URL_CHARS} characters")
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 -- raises ValueError for a malformed port
        except ValueError:
            raise PosthookError("posthook.url: malformed URL") from None
        if parts.scheme not in ("http", "https") or not host:
            raise PosthookError("posthook.url: must be an http or https URL with a host")
        summary = raw.get("summary")
        if summary is not None and not isinstance(summary, str):
            raise PosthookError("posthook.summary: expected a string")
        summary = summary.strip() if summary else None
        if summary is not None and len(summary) > MAX_SUMMARY_CHARS:
            raise PosthookError(f"posthook.summary: longer than {MAX_SUMMARY_CHARS} characters")
        method = raw.get("method")
        method = method.strip().upper() if isinstance(method, str) else "POST"
        if method not in _METHODS:
            method = "POST"
        try:
            headers = check_headers(raw.get("headers"))
        except ValueError as e:
            raise PosthookError(f"posthook.headers: {e}") from None
        include = raw.get("includeHistory", True)
        if include is None:
            include = True
        if not isinstance(include, bool):
            raise PosthookError("posthook.includeHistory: expected true or false")
        timeout = raw.get("timeout", DEFAULT_TIMEOUT_S)
        if timeout is None:
            timeout = DEFAULT_TIMEOUT_S
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout:
            raise PosthookError("posthook.timeout: expected a number of seconds")
        timeout_s = min(MAX_TIMEOUT_S, max(MIN_TIMEOUT_S, float(timeout)))
        return cls(url, summary or None, method, tuple(headers.items()), include, timeout_s)


def summary_instruction(kind: str) -> str:
    """The ``user`` message asking for the summary: the built-in text for short/detailed/intent/json
    (any case), else ``kind`` itself (a custom instruction)."""
    return _INSTRUCTIONS.get(kind.strip().lower(), kind)


def posthook_timestamp(epoch_s: float) -> str:
    """RFC 3339 UTC with milliseconds and ``+00:00``, e.g. ``2025-01-01T10:00:00.123+00:00`` (§12)."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat(timespec="milliseconds")


def _history_entries(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The history as §12 reports it: ``role`` and ``content`` of every message, system ones included."""
    return [{"role": m.get("role"), "content": m.get("content")} for m in history if isinstance(m, Mapping)]


class _Expired(Exception):
    """The hook's deadline passed."""


class _Hook:
    """One run of the hook: a deadline that cancels whatever is in flight."""

    def __init__(self, spec: PosthookSpec, session_id: str, history: list[dict[str, Any]],
                 summarize: Optional[Callable[[list[dict[str, Any]]], Deferred[str]]], fetcher: Fetcher,
                 clock: IReactorTime, log: Logger, signing_secret: Optional[str]) -> None:
        self.spec = spec
        self.session_id = session_id
        self.history = history
        self.summarize = summarize
        self.fetcher = fetcher
        self.clock = clock
        self.log = log
        self.signing_secret = signing_secret
        self.expired = False
        self._current: Optional[Deferred[Any]] = None
        self._deadline: Optional[IDelayedCall] = None

    def start(self) -> Deferred[None]:
        self._deadline = self.clock.callLater(self.spec.timeout_s, self._expire)
        d = Deferred.fromCoroutine(self._run())

        def stop_deadline() -> None:
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()

        def finished(_: None) -> None:
            stop_deadline()

        def failed(f: Failure) -> None:
            stop_deadline()
            if f.check(_Expired):
                self.log.warn("posthook {url} abandoned: not done within {timeout:g} s",
                              url=self.spec.url, timeout=self.spec.timeout_s)
            elif f.check(CancelledError):
                self.log.info("posthook {url} cancelled", url=self.spec.url)
            else:  # a bug, not the network: keep the traceback in the log, never in the caller
                self.log.failure("posthook {url} failed", f, url=self.spec.url)

        return d.addCallbacks(finished, failed)

    def _expire(self) -> None:
        self.expired = True
        current, self._current = self._current, None
        if current is not None:
            current.cancel()

    async def _wait(self, d: Deferred[Any]) -> Any:
        """Await ``d`` unless the deadline passes first (then raise _Expired)."""
        if self.expired:
            d.cancel()
            raise _Expired()
        self._current = d
        try:
            return await d
        except Exception:
            if self.expired:
                raise _Expired() from None
            raise
        finally:
            self._current = None

    async def _run(self) -> None:
        summary = await self._summary()
        payload = {"sessionId": self.session_id, "summary": summary,
                   "history": _history_entries(self.history) if self.spec.include_history else None,
                   "timestamp": posthook_timestamp(self.clock.seconds())}
        body = json.dumps(payload, ensure_ascii=False, default=str).encode("utf-8")
        for attempt in range(ATTEMPTS):
            if attempt:
                await self._wait(deferLater(self.clock, BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1], lambda: None))
            headers = self._headers(body)
            try:
                response: FetchedResponse = await self._wait(
                    self.fetcher.request(self.spec.method, self.spec.url, data=body, headers=headers))
            except _Expired:
                raise
            except FetchRefusedError as e:  # the policy will not change its mind: no retry
                self.log.warn("posthook {url} refused: {reason}", url=self.spec.url, reason=str(e))
                return
            except Exception as e:
                self.log.info("posthook {url} attempt {n}/{of} failed: {reason}", url=self.spec.url,
                              n=attempt + 1, of=ATTEMPTS, reason=f"{type(e).__name__}: {e}"[:300])
                continue
            if 200 <= response.code < 300:
                self.log.debug("posthook {url} delivered ({code})", url=self.spec.url, code=response.code)
                return
            self.log.info("posthook {url} attempt {n}/{of}: HTTP {code}", url=self.spec.url,
                          n=attempt + 1, of=ATTEMPTS, code=response.code)
        self.log.warn("posthook {url} not delivered after {of} attempts", url=self.spec.url, of=ATTEMPTS)

    async def _summary(self) -> Optional[str]:
        if not self.spec.summary or self.summarize is None:
            return None
        messages = [dict(m) for m in self.history]
        messages.append({"role": "user", "content": summary_instruction(self.spec.summary)})
        try:
            summary = await self._wait(maybeDeferred(self.summarize, messages))
        except _Expired:
            raise
        except Exception as e:
            self.log.info("posthook summary failed: {reason}", reason=f"{type(e).__name__}: {e}"[:300])
            return None
        return summary if isinstance(summary, str) else None

    def _headers(self, body: bytes) -> dict[str, str]:
        headers = dict(self.spec.headers)
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"
        if self.signing_secret:
            headers[SIGNATURE_HEADER] = signature(self.signing_secret, body, self.clock.seconds())
        return headers


def send_posthook(spec: PosthookSpec, *, session_id: str, history: list[dict[str, Any]],
                  summarize: Optional[Callable[[list[dict[str, Any]]], Deferred[str]]], fetcher: Fetcher,
                  clock: IReactorTime, log: Optional[Logger] = None,
                  signing_secret: Optional[str] = None) -> Deferred[None]:
    """Run the hook (see the module docstring); the Deferred fires with None when it is delivered,
    given up or abandoned, and never fails.

    ``summarize(messages)`` is one non-streaming model call (history plus the instruction); its
    failure makes ``summary`` null.  With ``signing_secret`` ([webhook]) each attempt carries
    ``X-Activecall-Signature``.  ``clock`` runs the deadline and the backoff, and stamps ``timestamp``.
    """
    return _Hook(spec, session_id, list(history), summarize, fetcher, clock, log or _log, signing_secret).start()
