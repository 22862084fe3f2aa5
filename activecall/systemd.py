"""systemd service notification: ``READY=1``, ``STOPPING=1`` and the reactor watchdog (sd_notify(3)).

Adapter module.  The protocol is one datagram per state change, sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the
Linux abstract namespace).  With ``WatchdogSec=`` in the unit, systemd sets
``$WATCHDOG_USEC`` and kills the service when no ``WATCHDOG=1`` came within
that time; pinging from a ``LoopingCall`` every half period means a reactor
that stops turning (a blocking call, a busy loop) is restarted.

Life of :class:`SystemdNotify`, driven by the daemon's top service::

    ready()    (all children started, listeners bound) ──► READY=1 ──► WATCHDOG=1 every WATCHDOG_USEC/2 ...
    stopping() (start of stopService, before the drain) ──► STOPPING=1, pings stopped
               (systemd disarms the watchdog while the unit stops)

Without ``$NOTIFY_SOCKET`` (not run by systemd, or ``Type=simple``) nothing is sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["SdNotifier", "SystemdNotify", "notify_address", "watchdog_interval_s"]


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The socket address from ``$NOTIFY_SOCKET`` (abstract ``@name`` → ``"\\0name"``), or None."""
    path = environ.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]
    return path if path.startswith("/") else None


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, or None (unset, bad, or ``$WATCHDOG_PID`` is another process)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec / 2_000_000.0


class SdNotifier:
    """Sends sd_notify datagrams on a non-blocking ``AF_UNIX`` socket; never raises."""

    _log = Logger()

    def __init__(self, address: str) -> None:
        self.address = address
        self.sent = 0
        self.errors = 0
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    def send(self, state: str) -> bool:
        """Send one state string (``"READY=1"``); False when it could not be sent (logged once per kind)."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto(state.encode("utf-8"), self.address)
        except OSError as err:
            self.errors += 1
            if self.errors == 1:
                self._log.warn("sd_notify to {address!r} failed: {error}", address=self.address, error=err)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        """Release the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class SystemdNotify:
    """``READY=1``, ``STOPPING=1`` and ``WATCHDOG=1`` from the reactor in between.

    The daemon's top service calls :meth:`ready` after all its children have
    started (every listener bound) and :meth:`stopping` first thing in its
    ``stopService``, before the drain.
    """

    _log = Logger()

    def __init__(self, notifier: Any, clock: IReactorTime, watchdog_s: float | None = None) -> None:
        self._notifier = notifier
        self._clock = clock
        self._watchdog_s = watchdog_s
        self._loop: LoopingCall | None = None

    @classmethod
    def from_environment(cls, clock: IReactorTime, environ: Mapping[str, str] | None = None,
                         pid: int | None = None) -> SystemdNotify | None:
        """The notifier for ``$NOTIFY_SOCKET``/``$WATCHDOG_USEC``, or None when systemd is not listening."""
        env = os.environ if environ is None else environ
        address = notify_address(env)
        if address is None:
            return None
        return cls(SdNotifier(address), clock, watchdog_interval_s(env, os.getpid() if pid is None else pid))

    def ready(self) -> None:
        """Serving: send ``READY=1`` and start the watchdog pings (when ``$WATCHDOG_USEC`` asked for them)."""
        self._notifier.send("READY=1")
        if self._watchdog_s is not None and self._loop is None:
            loop = LoopingCall(self._notifier.send, "WATCHDOG=1")
            loop.clock = self._clock
            self._loop = loop
            loop.start(self._watchdog_s, now=True).addErrback(
                lambda f: self._log.failure("systemd watchdog loop stopped", f))
            self._log.info("systemd watchdog: pinging every {s} s", s=self._watchdog_s)

    def stopping(self) -> None:
        """Shutdown begins: send ``STOPPING=1``, stop the pings and release the socket."""
        self._notifier.send("STOPPING=1")
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        close = getattr(self._notifier, "close", None)
        if close is not None:
            close()
