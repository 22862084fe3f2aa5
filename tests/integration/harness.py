"""Start the real daemon (``twistd activecall``) and talk to it over real sockets on 127.0.0.1.

Everything waits for the awaited output or event with a deadline; nothing sleeps.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any, Callable, Optional

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 30.0


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A currently free port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Waiters:
    """Deferreds fired when a predicate over accumulated items becomes true."""

    def __init__(self) -> None:
        self._waiters: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def wait(self, check: Callable[[], Any], timeout_s: float, what: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        found = check()
        if found:
            d.callback(found)
            return d
        self._waiters.append((check, d))

        def timed_out(f: Any) -> Any:
            f.trap(defer.TimeoutError)
            self._waiters[:] = [(c, w) for c, w in self._waiters if w is not d]
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")

        d.addTimeout(timeout_s, reactor)
        d.addErrback(timed_out)
        return d

    def poke(self) -> None:
        for check, d in list(self._waiters):
            found = check()
            if found and not d.called:
                self._waiters.remove((check, d))
                d.callback(found)


class Daemon(ProcessProtocol):
    """A running ``twistd -n --reactor=asyncio activecall`` child process."""

    def __init__(self) -> None:
        self.output = ""
        self.exit_code: Optional[int] = None
        self._waiters = _Waiters()
        self.http_port = 0
        self.sip_port = 0
        self._reaper: Optional[task.LoopingCall] = None

    def connectionMade(self) -> None:
        # The daemon reads nothing; an open stdin pipe would also delay processEnded.
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")
        self._waiters.poke()

    errReceived = outReceived

    def childConnectionLost(self, childFD: int) -> None:
        # Under pytest no SIGCHLD handler may be installed, so reap the child
        # ourselves once it closed its output: check every 50 ms until it is gone.
        if childFD in (1, 2) and self._reaper is None:
            self._reaper = task.LoopingCall(self._reap)
            self._reaper.start(0.05)

    def _reap(self) -> None:
        if self.exit_code is not None:
            if self._reaper is not None and self._reaper.running:
                self._reaper.stop()
            return
        try:
            self.transport.reapProcess()
        except Exception:
            pass

    def processExited(self, reason: Any) -> None:
        self.processEnded(reason)

    def processEnded(self, reason: Any) -> None:
        if self.exit_code is not None:
            return
        if reason.check(ProcessDone):
            self.exit_code = 0
        elif reason.value.exitCode is not None:
            self.exit_code = reason.value.exitCode
        else:
            self.exit_code = -(reason.value.signal or 1)  # ended by a signal
        if self._reaper is not None and self._reaper.running:
            self._reaper.stop()
        self._waiters.poke()

    def wait_output(self, text: str, timeout_s: float = TIMEOUT_S) -> Deferred[Any]:
        """Fires when ``text`` appeared in stdout/stderr."""
        return self._waiters.wait(lambda: text in self.output, timeout_s, f"daemon output {text!r}")

    def wait_exit(self, timeout_s: float = TIMEOUT_S) -> Deferred[Any]:
        """Fires with the exit code when the process ended."""
        return self._waiters.wait(lambda: self.exit_code is not None and (self.exit_code,), timeout_s, "daemon exit")

    def stop(self) -> Deferred[Any]:
        """SIGTERM the daemon (SIGKILL if it does not go) and wait for it."""
        if self.exit_code is not None:
            return self.wait_exit()
        try:
            self.transport.signalProcess("TERM")
        except ProcessExitedAlready:
            pass
        d = self.wait_exit(15)

        def kill(f: Any) -> Any:
            try:
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
            return f

        d.addErrback(kill)
        return d

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}"


def spawn_daemon(workdir: str, args: list[str], env: Optional[dict[str, str]] = None,
                 twistd_args: tuple[str, ...] = ()) -> Daemon:
    """Run twistd activecall with ``args`` in ``workdir``, importing this checkout; ``twistd_args``
    go to twistd itself (before the subcommand)."""
    proto = Daemon()
    workdir = os.path.abspath(workdir)
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = REPO + os.pathsep + child_env.get("PYTHONPATH", "")
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env.update(env or {})
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--reactor=asyncio", "--pidfile=", *twistd_args, "activecall"] + args
    reactor.spawnProcess(proto, sys.executable, argv, env=child_env, path=workdir)
    return proto


def start_daemon(workdir: str, config: str, extra_args: tuple[str, ...] = (), ready_text: str = " ready: ",
                 twistd_args: tuple[str, ...] = ()) -> Deferred[Daemon]:
    """Write ``config`` (with {http_port} and {sip_port} filled) and start the daemon; fires when ready.

    Readiness is the daemon's ``ready`` log line on stdout, or, with
    ``ready_text=""`` (a log_file is configured), the HTTP port accepting.
    """
    workdir = os.path.abspath(workdir)
    http_port = free_port()
    sip_port = free_port(socket.SOCK_DGRAM)
    path = os.path.join(workdir, "activecall.toml")
    with open(path, "w") as f:
        f.write(config.format(http_port=http_port, sip_port=sip_port, workdir=workdir))
    daemon = spawn_daemon(workdir, ["--conf", path, *extra_args], twistd_args=twistd_args)
    daemon.http_port = http_port
    daemon.sip_port = sip_port
    d = daemon.wait_output(ready_text) if ready_text else wait_port(http_port)

    def failed(f: Any) -> Any:
        # Never leave a half-started daemon behind: the caller has no handle to stop it.
        if daemon.exit_code is None:
            try:
                daemon.transport.signalProcess("KILL")
            except Exception:
                pass
        raise AssertionError(f"daemon did not start: {f.getErrorMessage()}\n--- output ---\n{daemon.output}")

    d.addCallbacks(lambda _: daemon, failed)
    return d


def wait_port(port: int, timeout_s: float = TIMEOUT_S) -> Deferred[Any]:
    """Fires once 127.0.0.1:port accepts TCP connections (tried every 50 ms until the deadline)."""
    waiters = _Waiters()
    state = {"up": False}

    def attempt() -> None:
        with socket.socket() as s:
            state["up"] = s.connect_ex(("127.0.0.1", port)) == 0
        waiters.poke()

    loop = task.LoopingCall(attempt)
    loop.start(0.05)
    d = waiters.wait(lambda: state["up"], timeout_s, f"port {port}")

    def stop(result: Any) -> Any:
        if loop.running:
            loop.stop()
        return result

    return d.addBoth(stop)


BASE_CONFIG = """
http_addr = "127.0.0.1:{http_port}"
addr = "127.0.0.1"
udp_port = {sip_port}
log_level = "info"
media_cache_path = "{workdir}/cache"
[recording]
path = "{workdir}/recorders"
"""


class CallClient(WebSocketClientProtocol):
    """A control-socket client recording every event and audio frame with its arrival time."""

    def connectionMade(self) -> None:
        # Autobahn leaves Nagle on: a command sent between audio frames would wait for a delayed ACK.
        self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def onOpen(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.frames: list[tuple[float, bytes]] = []
        self.closed = False
        self.factory.waiters.poke()
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.frames.append((reactor.seconds(), payload))
        else:
            self.events.append(json.loads(payload))
        self.factory.waiters.poke()

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.closed = True
        if not self.factory.opened.called:
            self.factory.opened.errback(AssertionError(f"WebSocket not opened: {code} {reason}"))
        self.factory.waiters.poke()

    def send(self, command: dict[str, Any]) -> None:
        """Send one command as a Text frame."""
        self.sendMessage(json.dumps(command).encode(), isBinary=False)

    def wait_event(self, name: str, timeout_s: float = TIMEOUT_S, **fields: Any) -> Deferred[dict[str, Any]]:
        """Fires with the first event named ``name`` whose fields match."""

        def check() -> Any:
            for e in self.events:
                if e.get("event") == name and all(e.get(k) == v for k, v in fields.items()):
                    return e
            return None

        return self.factory.waiters.wait(check, timeout_s, f"event {name} {fields}; got {[e.get('event') for e in self.events]}")

    def wait_closed(self, timeout_s: float = TIMEOUT_S) -> Deferred[Any]:
        """Fires when the server closed the socket."""
        return self.factory.waiters.wait(lambda: self.closed, timeout_s, "socket close")

    def wait_frames(self, count: int, timeout_s: float = TIMEOUT_S) -> Deferred[Any]:
        """Fires when at least ``count`` audio frames arrived."""
        return self.factory.waiters.wait(lambda: len(self.frames) >= count, timeout_s, f"{count} audio frames")


def talk_in_loop(test: Any, client: CallClient, pcm: bytes, frame_bytes: int = 640) -> None:
    """The client as a caller: ``pcm`` sent over and over as Binary frames of 20 ms, in real time, until the
    socket closes or the test ends."""
    from twisted.internet.task import LoopingCall

    sent = [0]

    def talk() -> None:
        if client.state == client.STATE_OPEN:
            offset = (sent[0] * frame_bytes) % len(pcm)
            client.sendMessage(pcm[offset:offset + frame_bytes], isBinary=True)
            sent[0] += 1

    loop = LoopingCall(talk)
    loop.start(0.02)
    test.addCleanup(lambda: loop.stop() if loop.running else None)


def connect(url: str) -> Deferred[CallClient]:
    """Open a control WebSocket; fires with the connected client."""
    factory = WebSocketClientFactory(url)
    factory.protocol = CallClient
    factory.waiters = _Waiters()
    factory.opened = Deferred()
    connectWS(factory)
    return factory.opened


def http_client() -> Any:
    """A treq client without persistent connections, so tests leave a clean reactor."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
