"""The daemon's services and process-wide policy.

Services: ordered stop (:class:`SequentialService`), the graceful drain of calls
(:class:`DrainCallsService`), the ``--call`` start-up call (:class:`StartupCallService`)
and the periodic garbage collection (:class:`CyclicGarbageService`). Policy: the
open-files limit and the loopback check of the listen address.

The composition root (``tap.py``) builds and attaches these; what they act on (sessions,
record writers) comes in through their constructors as the small protocols below.
"""

from __future__ import annotations

import gc
import ipaddress
import resource
import sys
from collections.abc import Collection
from typing import Any, Callable, Optional, Protocol

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.config import Config
from activecall.control.commands import InviteCommand
from activecall.control.query import SessionParams
from activecall.media.codecs import limit_codec_threads
from activecall.options import CallOption

__all__ = [
    "CyclicGarbageService",
    "DrainCallsService",
    "DrainableSessions",
    "RecordDrain",
    "SequentialService",
    "StartupCallService",
    "StartupSessions",
    "is_loopback",
    "prepare_process",
    "raise_open_files_limit",
]

#: Below this many open files a few hundred calls (RTP pairs, sockets) run out of descriptors.
MIN_OPEN_FILES = 4096


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


#: How long another Python thread may keep the GIL while the reactor wants it (CPython's default: 5 ms).
#: The codec, VAD and ASR workers spend their time in C without the GIL; between those calls a 5 ms
#: hold is a quarter of a media tick, and at 50 WebRTC calls it made a tenth of the agent's frames late.
GIL_SWITCH_INTERVAL_S = 0.0002


def prepare_process(config: Config, log: Logger,
                    raise_limit: Callable[[], tuple[int, int]] = raise_open_files_limit,
                    set_switch_interval: Callable[[float], None] = sys.setswitchinterval,
                    limit_codec_threads: Callable[[], bool] = limit_codec_threads) -> None:
    """Before the daemon is built: log the config's warnings, lift the open-files limit, hand the GIL
    to the reactor sooner (:data:`GIL_SWITCH_INTERVAL_S`), keep FFmpeg from starting thread pools per
    encoder, warn of risks.

    Warns when fewer than :data:`MIN_OPEN_FILES` descriptors are allowed after
    ``raise_limit()``, and when the control API listens beyond loopback without a token.
    """
    for warning in config.warnings:
        log.warn("config: {warning}", warning=warning)
    set_switch_interval(GIL_SWITCH_INTERVAL_S)
    if not limit_codec_threads():
        log.warn("FFmpeg's libavutil not found: each G.722 or Opus call keeps two idle FFmpeg threads")
    _, open_files = raise_limit()
    if open_files < MIN_OPEN_FILES:
        log.warn("only {n} open files allowed (RLIMIT_NOFILE); raise LimitNOFILE for more than a few hundred calls",
                 n=open_files)
    if not config.api.tokens and not is_loopback(config.http_host):
        log.warn("HTTP/WebSocket control API on {addr} needs no token: anyone who can reach it can place, "
                 "list and end calls; set [api] tokens or listen on 127.0.0.1 (docs/security.md)",
                 addr=config.http_addr)


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

    def stopService(self) -> Optional[Deferred[None]]:
        if self._loop.running:
            self._loop.stop()
        return super().stopService()


class Startable(Protocol):
    def start(self) -> object: ...

    def stop(self) -> object: ...


class WorkersService(service.Service):
    """Starts worker pools (the VAD engine's thread, the ASR decoding pool) with the daemon and
    stops them after the calls ended, in reverse order."""

    def __init__(self, *workers: Startable) -> None:
        self._workers = workers

    def startService(self) -> None:
        super().startService()
        for worker in self._workers:
            worker.start()

    def stopService(self) -> Optional[Deferred[None]]:
        for worker in reversed(self._workers):
            worker.stop()
        return super().stopService()


class SequentialService(service.MultiService):
    """Stops its children in reverse order, each after the previous one finished.

    Registration must finish its un-REGISTER before the SIP listeners close,
    or the registrar's answers are lost.
    """

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)

        async def stop_in_order() -> None:
            for child in reversed(list(self)):
                await maybeDeferred(child.stopService)

        return Deferred.fromCoroutine(stop_in_order())


class DrainableSessions(Protocol):
    """What the drain needs of the live sessions (:class:`activecall.control.session.SessionManager`)."""

    def __len__(self) -> int:
        """How many sessions are live."""

    def wait_idle(self) -> Deferred[None]:
        """Fire when no session is left; cancellable."""

    def kill_all(self) -> None:
        """End every session now."""


class RecordDrain(Protocol):
    """What the drain needs of the call-record writer (:class:`activecall.call.recordstore.CallRecordWriter`)."""

    def drain(self) -> Deferred[None]:
        """Fire once every record written so far is saved or given up."""


class DrainCallsService(service.Service):
    """Graceful shutdown of calls (config.md §3 graceful_shutdown).

    On stop: refuse new inbound calls (503 "Server shutting down"), answer the
    ones still waiting for a client, let running calls end on their own for up
    to ``timeout_s``, then hang up what is left. With ``graceful`` false the
    calls are hung up at once.

    When ``record_writer`` is given, the stop also waits for the records still
    being assembled (``records_in_flight``, looked at when the stop begins) and
    then for the writer to save everything: no call record is lost to a shutdown.
    """

    _log = Logger(namespace="activecall")

    def __init__(self, sessions: DrainableSessions, clock: IReactorTime, *, graceful: bool, timeout_s: float,
                 refuse_new_calls: Callable[[], None],
                 records_in_flight: Collection[Deferred[Any]] = (),
                 record_writer: Optional[RecordDrain] = None) -> None:
        self._sessions = sessions
        self._clock = clock
        self._graceful = graceful
        self._timeout_s = timeout_s
        self._refuse_new_calls = refuse_new_calls
        self._records_in_flight = records_in_flight
        self._record_writer = record_writer

    def stopService(self) -> Optional[Deferred[None]]:
        super().stopService()
        self._refuse_new_calls()
        if not self._graceful:
            self._sessions.kill_all()
            return self._save_records()
        if len(self._sessions):
            self._log.info("shutting down: waiting up to {t} s for {n} call(s) to end",
                           t=self._timeout_s, n=len(self._sessions))
        d = self._sessions.wait_idle()
        d.addTimeout(self._timeout_s, self._clock)
        d.addErrback(self._cut)
        return d.addCallback(lambda _: self._save_records())

    def _cut(self, f: Failure) -> None:
        f.trap(TimeoutError)
        self._log.info("shutting down: ending {n} call(s) still running", n=len(self._sessions))
        self._sessions.kill_all()

    def _save_records(self) -> Optional[Deferred[None]]:
        writer = self._record_writer
        if writer is None:
            return None
        pending = list(self._records_in_flight)
        return DeferredList(pending).addCallback(lambda _: writer.drain())


class _DialingSession(Protocol):
    def submit(self, command: Any) -> None:
        """Run a decoded command as if the session's client had sent it."""


class StartupSessions(Protocol):
    """What the start-up call needs of the sessions (:class:`activecall.control.session.SessionManager`)."""

    def new_sid(self) -> str:
        """A fresh session id ``s.<uuid4>``."""

    def open(self, params: SessionParams) -> _DialingSession:
        """Create a session and list it at once."""


class StartupCallService(service.Service):
    """``--call URI``: about 1 s after start-up, place one outbound SIP call (config.md §2).

    The call runs as a session without a WebSocket (``c.<uuid>``, no event dump,
    no pings, 50 s inactivity timeout); ``/list`` and ``/kill`` see it. A stop
    before the second has passed places nothing.
    """

    DELAY_S = 1.0
    INACTIVITY_TIMEOUT_S = 50

    _log = Logger(namespace="activecall")

    def __init__(self, sessions: StartupSessions, clock: IReactorTime, uri: str,
                 playbook: Optional[str] = None) -> None:
        self._sessions = sessions
        self._clock = clock
        self._uri = uri
        self._playbook = playbook  # --handler x.md: the playbook drives the call
        self._pending: Optional[IDelayedCall] = None

    def startService(self) -> None:
        super().startService()
        self._pending = self._clock.callLater(self.DELAY_S, self._place)

    def stopService(self) -> Optional[Deferred[None]]:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        return super().stopService()

    def _place(self) -> None:
        self._pending = None
        sid = "c." + self._sessions.new_sid()[2:]
        session = self._sessions.open(SessionParams(sid=sid, call_type="sip", dump=False, ping_s=0))
        self._log.info("--call: calling {uri} as session {sid}", uri=self._uri, sid=sid)
        session.submit(InviteCommand(option=CallOption(callee=self._uri, inactivity_timeout=self.INACTIVITY_TIMEOUT_S,
                                                       playbook=self._playbook)))
