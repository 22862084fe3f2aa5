"""Per-owner timers that can all be cancelled at once (one per call)."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


class CallClock:
    """Wraps an :class:`IReactorTime` and records every delayed call it makes.

    A call's controller schedules all its timers here, so hangup can cancel
    them with one :meth:`cancel_all` and tests can assert nothing is left.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._pending: set[IDelayedCall] = set()

    def seconds(self) -> float:
        """Return the current time on the underlying clock."""
        return self._clock.seconds()

    def call_later(self, delay_s: float, f: Callable[..., Any], *args: Any, **kw: Any) -> IDelayedCall:
        """Schedule ``f(*args, **kw)`` after ``delay_s`` seconds; tracked until it runs."""
        holder: list[IDelayedCall] = []

        def run() -> None:
            self._pending.discard(holder[0])
            try:
                f(*args, **kw)
            except Exception:
                self._log.failure("timer callback {f!r} failed", f=f)

        dc = self._clock.callLater(max(0.0, delay_s), run)
        holder.append(dc)
        self._pending.add(dc)
        return dc

    def cancel(self, dc: IDelayedCall | None) -> None:
        """Cancel ``dc`` if it is still pending."""
        if dc is not None and dc in self._pending:
            self._pending.discard(dc)
            if dc.active():
                dc.cancel()

    def cancel_all(self) -> None:
        """Cancel every pending timer of this owner."""
        for dc in list(self._pending):
            if dc.active():
                dc.cancel()
        self._pending.clear()

    @property
    def pending(self) -> int:
        """Number of timers still scheduled."""
        return len(self._pending)
