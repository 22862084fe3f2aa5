"""Process-wide policy of the running daemon: open-files limit, garbage collection, listen checks.

The composition root (``tap.py``) calls these; they hold no call logic.
"""

from __future__ import annotations

import gc
import ipaddress
import resource
from typing import Any, Callable

from twisted.application import service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

__all__ = ["CyclicGarbageService", "is_loopback", "raise_open_files_limit"]


def is_loopback(host: str) -> bool:
    """Whether a listen address only accepts local connections ("" and 0.0.0.0 accept all)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def raise_open_files_limit(wanted: int = 65536) -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE towards the hard one; returns (old soft, new soft).

    systemd and shells start services with a soft limit of 1024 descriptors, which a few
    hundred calls (RTP pairs, sockets) or a connection flood exhaust long before the
    per-IP and session caps apply.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (ValueError, OSError):
            pass
    return soft, soft


class CyclicGarbageService(service.Service):
    """Runs a full cyclic garbage collection every ``interval_s`` on the reactor.

    An ended call leaves its objects (controller, session, legs, dialog, sockets' protocols)
    in reference cycles, and under media load Python's own thresholds reach a full collection
    only every few minutes: meanwhile each call's garbage adds to RSS and fragments it. The
    heap left to scan is small (start-up objects are frozen), so a collection costs a few ms.
    """

    INTERVAL_S = 15.0

    def __init__(self, clock: IReactorTime, collect: Callable[[], object] | None = None,
                 interval_s: float = INTERVAL_S) -> None:
        self._loop = LoopingCall(collect or gc.collect)
        self._loop.clock = clock
        self._interval_s = interval_s

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval_s, now=False)

    def stopService(self) -> Any:
        if self._loop.running:
            self._loop.stop()
        return super().stopService()
