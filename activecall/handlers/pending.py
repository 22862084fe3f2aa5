"""Inbound calls waiting for a WebSocket client to ``accept`` or ``reject`` them.

After the webhook (protocol.md §1.4, §5.4) an INVITE stays unanswered until
the application connects ``/call/sip?id=<dialogId>``.  :class:`PendingCalls`
holds those calls by dialogId and answers them itself when nobody does:

- ``accept_timeout`` expires → ``408 Request Timeout`` with
  ``Reason: accept timeout``, then forgotten (a later ``accept`` finds nothing);
- the caller CANCELs → forgotten (the user agent already sent 487);
- the client's socket closes without ``accept``/``reject`` →
  ``603 Decline`` with ``Reason: handler disconnected``;
- shutdown → every pending call gets ``503`` with the "Server shutting down" Reason;
- ``max_pending`` (``[sip_limits] max_pending_invites``) already waiting →
  the new call gets ``503`` with ``Retry-After`` and the "Too many pending
  calls" Reason at once, never enters the registry (no webhook is sent);
  the same when its source address already holds ``max_per_source`` of
  them (a quarter by default), unless ``trusted(ip)`` says it is a trunk or
  registrar: one sender alone cannot lock everybody else out until the accept
  timeouts free the registry.

Life of one entry::

    add ──► pending ──take──────────────► (owned by the caller of take)
               │ ├──accept timeout──────► 408, forgotten
               │ ├──cancelled───────────► forgotten (no response: 487 already sent)
               │ ├──client_disconnected─► 603, forgotten
               │ └──reject / reject_all─► <code>, forgotten
               └── every exit cancels the entry's timer

As AC's rsipstack does, the response keeps the standard status phrase and the
reason text travels in a ``Reason`` header.  An entry is always removed
*before* the call is answered, because answering terminates the dialog and a
dialog listener may call back into this registry (:meth:`cancelled`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Callable, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = [
    "ACCEPT_TIMEOUT_REASON",
    "DISCONNECTED_REASON",
    "SHUTTING_DOWN_REASON",
    "TOO_MANY_PENDING_REASON",
    "PENDING_RETRY_AFTER_S",
    "PendingCall",
    "PendingCalls",
]

ACCEPT_TIMEOUT_REASON = "accept timeout"
DISCONNECTED_REASON = "handler disconnected"
SHUTTING_DOWN_REASON = 'SIP;cause=503;text="Server shutting down"'
TOO_MANY_PENDING_REASON = 'SIP;cause=503;text="Too many pending calls"'
PENDING_RETRY_AFTER_S = 5


class PendingCall(Protocol):
    """What the registry and its ``on_closed`` need of a call: :class:`activecall.sip.useragent.InboundCall` fits."""

    @property
    def caller(self) -> str:
        """The From URI (for the record of a call that leaves unanswered)."""

    @property
    def callee(self) -> str:
        """The To URI."""

    def reject(self, code: int, reason: str | None = None,
               headers: Iterable[tuple[str, str]] = ()) -> None:
        """Answer the INVITE with a final non-2xx ``code`` (a no-op once answered)."""


class _Entry:
    """One pending call and its accept-timeout timer."""

    __slots__ = ("call", "timer", "added_at", "source_ip")

    def __init__(self, call: PendingCall, timer: IDelayedCall, added_at: float = 0.0,
                 source_ip: str | None = None) -> None:
        self.call = call
        self.timer = timer
        self.added_at = added_at
        self.source_ip = source_ip  # counted against its source's share; None = not counted


class PendingCalls:
    """Registry of unanswered inbound calls by dialogId, each armed with the accept timeout.

    ``clock`` is the injected :class:`IReactorTime`; ``accept_timeout_s`` is
    ``Config.accept_timeout_s`` (config.md §3); ``max_pending`` is
    ``Config.sip_limits.max_pending_invites`` (None: unbounded).
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, accept_timeout_s: float,
                 on_closed: Callable[[str, PendingCall, float, int], None] | None = None,
                 max_pending: int | None = None, max_per_source: int | None = None,
                 trusted: Callable[[str], bool] = lambda ip: False) -> None:
        self._clock = clock
        self._max_pending = max_pending
        if max_per_source is None and max_pending is not None:
            max_per_source = max(1, max_pending // 4)
        self._max_per_source = max_per_source
        self._trusted = trusted
        self._per_source: dict[str, int] = {}
        self.refused = 0  # calls answered 503 because max_pending were waiting
        self._timeout_s = accept_timeout_s
        self._entries: dict[str, _Entry] = {}
        # Told (dialog_id, call, added_at, final status) when a call leaves unanswered, for its call record.
        self._on_closed = on_closed
        #: Told each dialog id as it starts waiting (the cluster's registry claims it at once).
        self.on_added: Callable[[str], object] | None = None

    # ------------------------------------------------------------ queries

    def __contains__(self, dialog_id: object) -> bool:
        # Peer forwarding (protocol.md §1.5) counts pending ids as hosted here.
        return dialog_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def get(self, dialog_id: str) -> PendingCall | None:
        """Return the pending call without claiming it (e.g. for ``ringing``), or None."""
        entry = self._entries.get(dialog_id)
        return entry.call if entry is not None else None

    # ------------------------------------------------------------ changes

    def add(self, dialog_id: str, call: PendingCall, source_ip: str | None = None) -> bool:
        """Register ``call`` under ``dialog_id`` and start its accept timeout; False if refused.

        A second ``add`` under the same id replaces the first entry (and its timer).
        When ``max_pending`` calls are already waiting, or ``source_ip`` (untrusted)
        already holds ``max_per_source``, the call is answered ``503``
        (``Retry-After``, "Too many pending calls") and not registered.
        """
        counted = source_ip if source_ip and not self._trusted(source_ip) else None
        old = self._pop(dialog_id)
        if old is None and self._full(counted):
            self.refused += 1
            self._log.debug("pending call {dialog_id} from {source} refused: {n} calls waiting for a client",
                            dialog_id=dialog_id, source=source_ip, n=len(self._entries))
            call.reject(503, None, headers=[("Retry-After", str(PENDING_RETRY_AFTER_S)),
                                            ("Reason", TOO_MANY_PENDING_REASON)])
            return False
        timer = self._clock.callLater(self._timeout_s, self._expired, dialog_id)
        self._entries[dialog_id] = _Entry(call, timer, self._clock.seconds(), counted)
        if counted is not None:
            self._per_source[counted] = self._per_source.get(counted, 0) + 1
        if self.on_added is not None:
            self.on_added(dialog_id)
        return True

    def _full(self, source_ip: str | None) -> bool:
        if self._max_pending is not None and len(self._entries) >= self._max_pending:
            return True
        return (source_ip is not None and self._max_per_source is not None
                and self._per_source.get(source_ip, 0) >= self._max_per_source)

    def take(self, dialog_id: str) -> PendingCall | None:
        """Claim the call (the client accepts or rejects it): stop its timer and forget it.

        Returns None when nothing is pending, e.g. after a timeout or a CANCEL
        (the caller then answers ``reject{"no pending call",486}``).
        """
        entry = self._pop(dialog_id)
        return entry.call if entry is not None else None

    def cancelled(self, dialog_id: str) -> bool:
        """The caller CANCELled (or the dialog ended otherwise): forget without answering.

        Returns whether an entry was dropped; safe to call repeatedly.
        """
        entry = self._pop(dialog_id)
        if entry is None:
            return False
        self._log.info("pending call {dialog_id} cancelled by the caller", dialog_id=dialog_id)
        self._closed(dialog_id, entry, 487)
        return True

    def reject(self, dialog_id: str, code: int, reason: str) -> bool:
        """Forget the call and answer it ``code`` with ``Reason: <reason>``; False if not pending."""
        entry = self._pop(dialog_id)
        if entry is None:
            return False
        entry.call.reject(code, None, headers=[("Reason", reason)])
        self._closed(dialog_id, entry, code)
        return True

    def client_disconnected(self, dialog_id: str) -> bool:
        """The client's socket closed without ``accept``/``reject``: answer 603 at once (protocol.md §5.4)."""
        if self.reject(dialog_id, 603, DISCONNECTED_REASON):
            self._log.info("pending call {dialog_id} declined: handler disconnected", dialog_id=dialog_id)
            return True
        return False

    def reject_all(self, code: int = 503, reason: str = SHUTTING_DOWN_REASON) -> int:
        """Answer every pending call ``code`` (shutdown) and forget them all; return how many."""
        count = 0
        for dialog_id in list(self._entries):
            if self.reject(dialog_id, code, reason):
                count += 1
        return count

    # ------------------------------------------------------------ internals

    def _pop(self, dialog_id: str) -> _Entry | None:
        entry = self._entries.pop(dialog_id, None)
        if entry is not None:
            self._cancel_timer(entry)
            ip = entry.source_ip
            if ip is not None:
                left = self._per_source[ip] - 1
                if left:
                    self._per_source[ip] = left
                else:
                    del self._per_source[ip]
        return entry

    @staticmethod
    def _cancel_timer(entry: _Entry) -> None:
        if entry.timer.active():
            entry.timer.cancel()

    def _expired(self, dialog_id: str) -> None:
        entry = self._pop(dialog_id)
        if entry is None:
            return
        self._log.info("pending call {dialog_id} not accepted within {timeout_s} s",
                       dialog_id=dialog_id, timeout_s=self._timeout_s)
        try:
            entry.call.reject(408, None, headers=[("Reason", ACCEPT_TIMEOUT_REASON)])
        except Exception:
            # A timer callback must not raise into the reactor.
            self._log.failure("answering 408 to {dialog_id} failed", dialog_id=dialog_id)
        self._closed(dialog_id, entry, 408)

    def _closed(self, dialog_id: str, entry: _Entry, status: int) -> None:
        if self._on_closed is None:
            return
        try:
            self._on_closed(dialog_id, entry.call, entry.added_at, status)
        except Exception:
            self._log.failure("recording the end of pending call {dialog_id} failed", dialog_id=dialog_id)
