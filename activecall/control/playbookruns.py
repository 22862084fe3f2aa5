"""Playbooks handed out by ``POST /api/playbook/run``, waiting for their WebSocket (playbook.md §1).

The HTTP side stores a playbook value (a file name, or inline text starting with ``---``)
and gives the client a fresh session id; the control side takes the value back when a
WebSocket connects with ``id`` = that session id. Unclaimed ids expire after ``ttl_s``
(protocol.md §1.3: 300 s, swept every 60 s). Pure apart from the injected clock.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import Callable, Iterator, NamedTuple, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime

DEFAULT_TTL_S = 300.0
DEFAULT_MAX_RUNS = 1000
SWEEP_INTERVAL_S = 60.0
# Attempts to draw an id not already pending before giving up (only a broken ``ids`` repeats).
_ID_ATTEMPTS = 8


class RunsFullError(Exception):
    """More than ``max_runs`` playbook runs are waiting for their WebSocket."""


class _Run(NamedTuple):
    value: str
    expires_at: float


def _new_session_id() -> str:
    return f"s.{uuid.uuid4()}"


class PlaybookRuns:
    """Pending playbook runs by session id, bounded in number and in age.

    ``ids()`` returns a whole session id (default ``s.<uuid4>``). Entries are kept in
    insertion order, which is also expiry order, so a sweep only looks at the oldest.
    Expiry is exact at :meth:`take` (checked against the clock); the periodic sweep only
    frees memory. Call :meth:`stop` on shutdown to cancel the sweep timer.
    """

    def __init__(self, clock: IReactorTime, ids: Optional[Callable[[], str]] = None,
                 ttl_s: float = DEFAULT_TTL_S, max_runs: int = DEFAULT_MAX_RUNS) -> None:
        if ttl_s <= 0 or max_runs < 1:
            raise ValueError("ttl_s must be > 0 and max_runs >= 1")
        self._clock = clock
        self._ids = ids or _new_session_id
        self._ttl_s = float(ttl_s)
        self._max_runs = max_runs
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._sweep: Optional[IDelayedCall] = None
        self._stopped = False
        #: Told each new id (the cluster's registry claims it at once, so any node finds it).
        self.on_added: Optional[Callable[[str], object]] = None

    def add(self, value: str) -> str:
        """Store ``value`` and return the new session id it waits under; raises RunsFullError."""
        self._expire()
        if len(self._runs) >= self._max_runs:
            raise RunsFullError(f"too many playbook runs waiting for a WebSocket (max {self._max_runs})")
        for _ in range(_ID_ATTEMPTS):
            sid = self._ids()
            if sid not in self._runs:
                break
        else:
            raise RuntimeError("session id source keeps repeating pending ids")
        self._runs[sid] = _Run(value, self._clock.seconds() + self._ttl_s)
        self._arm()
        if self.on_added is not None:
            self.on_added(sid)
        return sid

    def take(self, sid: str) -> Optional[str]:
        """Remove and return the value waiting under ``sid``; None when unknown or expired."""
        run = self._runs.pop(sid, None)
        if run is None or self._clock.seconds() >= run.expires_at:
            return None
        return run.value

    def __contains__(self, sid: object) -> bool:
        """``sid`` is waiting and not expired (for "is this id hosted here"; nothing is removed)."""
        run = self._runs.get(sid) if isinstance(sid, str) else None
        return run is not None and self._clock.seconds() < run.expires_at

    def __iter__(self) -> Iterator[str]:
        """The ids waiting and not expired."""
        now = self._clock.seconds()
        return iter([sid for sid, run in self._runs.items() if now < run.expires_at])

    def __len__(self) -> int:
        """Entries held now, expired ones not yet swept included."""
        return len(self._runs)

    def stop(self) -> None:
        """Cancel the sweep timer for good; entries still expire lazily (at add and take)."""
        self._stopped = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None

    def _expire(self) -> None:
        now = self._clock.seconds()
        while self._runs:
            sid, run = next(iter(self._runs.items()))
            if now < run.expires_at:
                break
            del self._runs[sid]

    def _arm(self) -> None:
        if self._sweep is None and self._runs and not self._stopped:
            self._sweep = self._clock.callLater(SWEEP_INTERVAL_S, self._swept)

    def _swept(self) -> None:
        self._sweep = None
        self._expire()
        self._arm()
