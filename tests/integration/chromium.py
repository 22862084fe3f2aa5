"""Headless Debian Chromium driven over the Chrome DevTools Protocol (CDP), for browser tests.

The browser runs with a fake microphone playing a WAV file and fake media permission prompts, so a
page can call getUserMedia and start a WebRTC call without a user. The DevTools WebSocket is an
autobahn Twisted client; everything waits with a deadline, nothing sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready

from harness import TIMEOUT_S, Daemon, _Waiters, http_client

CHROMIUM = "/usr/bin/chromium"


def chromium_path() -> Optional[str]:
    """The Chromium binary, or None when it is not installed."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    return shutil.which("chromium")


class EvaluationError(Exception):
    """A ``Runtime.evaluate`` that threw (or whose promise rejected) in the page."""


class CdpError(Exception):
    """A CDP command answered with an error."""


class _BrowserProcess(Daemon):
    """The Chromium child, reaped as the harness reaps the daemon; its output bounded (Chromium is chatty)."""

    def __init__(self, waiters: _Waiters) -> None:
        super().__init__()
        self._waiters = waiters
        self.open_pipes = {1, 2}

    def childConnectionLost(self, childFD: int) -> None:
        super().childConnectionLost(childFD)
        self.open_pipes.discard(childFD)
        self._waiters.poke()

    def outReceived(self, data: bytes) -> None:
        # The tail is what explains a failure.
        self.output = (self.output + data.decode("utf-8", "replace"))[-20000:]
        self._waiters.poke()

    errReceived = outReceived


class _CdpClient(WebSocketClientProtocol):
    """One DevTools page session: numbered commands with their answers, and the events."""

    def onOpen(self) -> None:
        self.factory.browser._cdp_opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.browser._cdp_message(json.loads(payload))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.browser._cdp_closed(code, reason)


class Chromium:
    """A headless Chromium with one page under CDP control.

    ``await Chromium.launch(fake_audio)`` starts it; then ``navigate(url)``, ``evaluate(expression)``
    and, at the end, ``stop()`` (kills the browser and removes its profile directory).
    ``console_errors`` and ``exceptions`` collect what the page reported, for assertions;
    ``console`` holds every console message.
    """

    def __init__(self, fake_audio: str, extra_args: tuple[str, ...] = ()) -> None:
        self._fake_audio = os.path.abspath(fake_audio)
        self._extra_args = extra_args
        self._profile = tempfile.mkdtemp(prefix="activecall-chromium-")
        self._waiters = _Waiters()
        self.process = _BrowserProcess(self._waiters)
        self._cdp: Optional[_CdpClient] = None
        self._cdp_open: Optional[Deferred[Any]] = None
        self._cdp_gone = False
        self._next_id = 0
        self._pending: dict[int, Deferred[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.console: list[tuple[str, str]] = []
        self.console_errors: list[str] = []
        self.exceptions: list[str] = []
        self.devtools_port = 0

    @classmethod
    async def launch(cls, fake_audio: str, extra_args: tuple[str, ...] = (),
                     timeout_s: float = TIMEOUT_S) -> "Chromium":
        """Start Chromium and attach to its page; fires with the ready browser (stopped again on failure)."""
        browser = cls(fake_audio, extra_args)
        try:
            await browser._start(timeout_s)
        except BaseException as e:
            await browser.stop()
            raise AssertionError(f"Chromium did not start: {e}\n--- output ---\n{browser.process.output}") from e
        return browser

    def _argv(self, binary: str) -> list[str]:
        return [binary, "--headless", "--no-sandbox", "--disable-gpu",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={self._fake_audio}",
                "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
                "--autoplay-policy=no-user-gesture-required", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                f"--user-data-dir={self._profile}", "--remote-debugging-port=0",
                *self._extra_args, "about:blank"]

    async def _start(self, timeout_s: float) -> None:
        binary = chromium_path()
        if binary is None:
            raise RuntimeError("chromium is not installed")
        env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
        env["HOME"] = self._profile  # nothing of the user's profile, no writes outside the temp dir
        reactor.spawnProcess(self.process, binary, self._argv(binary), env=env, path=self._profile)
        port_file = os.path.join(self._profile, "DevToolsActivePort")
        self.devtools_port = await self._poll(lambda: self._read_port(port_file), timeout_s, "DevToolsActivePort")
        url = await self._page_socket_url(timeout_s)
        self._cdp_open = Deferred()
        factory = WebSocketClientFactory(url)
        factory.protocol = _CdpClient
        factory.browser = self
        connectWS(factory)
        self._cdp_open.addTimeout(timeout_s, reactor)
        await self._cdp_open
        await self.send("Runtime.enable")
        await self.send("Page.enable")

    def _read_port(self, path: str) -> Optional[int]:
        if self.process.exit_code is not None:
            raise RuntimeError(f"chromium exited with {self.process.exit_code}")
        try:
            with open(path) as f:
                first = f.readline().strip()
        except OSError:
            return None
        return int(first) if first.isdigit() else None

    async def _poll(self, check: Any, timeout_s: float, what: str) -> Any:
        """``check()`` every 50 ms until it returns a truthy value (or raises), within the deadline."""
        waiters = _Waiters()
        state: dict[str, Any] = {"value": None, "error": None}

        def attempt() -> None:
            try:
                state["value"] = check()
            except Exception as e:
                state["error"] = e
            waiters.poke()

        loop = task.LoopingCall(attempt)
        loop.start(0.05)
        try:
            await waiters.wait(lambda: state["value"] or state["error"], timeout_s, what)
        finally:
            if loop.running:
                loop.stop()
        if state["error"] is not None:
            raise state["error"]
        return state["value"]

    async def _page_socket_url(self, timeout_s: float) -> str:
        client = http_client()
        base = f"http://127.0.0.1:{self.devtools_port}"
        response = await client.get(f"{base}/json/list").addTimeout(timeout_s, reactor)
        targets = json.loads(await response.text())
        pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
        if pages:
            return str(pages[0]["webSocketDebuggerUrl"])
        response = await client.put(f"{base}/json/new?about:blank").addTimeout(timeout_s, reactor)
        return str(json.loads(await response.text())["webSocketDebuggerUrl"])

    # --- the CDP session ------------------------------------------------------------------------

    def _cdp_opened(self, client: _CdpClient) -> None:
        self._cdp = client
        if self._cdp_open is not None and not self._cdp_open.called:
            self._cdp_open.callback(None)

    def _cdp_closed(self, code: Any, reason: Any) -> None:
        self._cdp_gone = True
        if self._cdp_open is not None and not self._cdp_open.called:
            self._cdp_open.errback(RuntimeError(f"DevTools WebSocket not opened: {code} {reason}"))
        pending, self._pending = self._pending, {}
        for d in pending.values():
            if not d.called:
                d.errback(CdpError(f"DevTools WebSocket closed: {code} {reason}"))
        self._waiters.poke()

    def _cdp_message(self, message: dict[str, Any]) -> None:
        if "id" in message:
            d = self._pending.pop(message["id"], None)
            if d is None or d.called:
                return
            if "error" in message:
                d.errback(CdpError(json.dumps(message["error"])))
            else:
                d.callback(message.get("result", {}))
            return
        method = message.get("method", "")
        params = message.get("params", {})
        self.events.append(message)
        if method == "Runtime.consoleAPICalled":
            text = " ".join(_remote_text(a) for a in params.get("args", []))
            self.console.append((params.get("type", ""), text))
            if params.get("type") in ("error", "assert"):
                self.console_errors.append(text)
        elif method == "Runtime.exceptionThrown":
            self.exceptions.append(_exception_text(params.get("exceptionDetails", {})))
        self._waiters.poke()

    def send(self, method: str, params: Optional[dict[str, Any]] = None,
             timeout_s: float = TIMEOUT_S) -> Deferred[dict[str, Any]]:
        """Send one CDP command; fires with its ``result`` (CdpError on an error answer)."""
        if self._cdp is None or self._cdp_gone:
            raise CdpError("no DevTools session")
        self._next_id += 1
        d: Deferred[dict[str, Any]] = Deferred()
        self._pending[self._next_id] = d
        self._cdp.sendMessage(json.dumps({"id": self._next_id, "method": method, "params": params or {}}).encode())
        d.addTimeout(timeout_s, reactor)
        return d

    def wait_event(self, method: str, timeout_s: float = TIMEOUT_S, after: int = 0) -> Deferred[Any]:
        """Fires with the first CDP event ``method`` at index ``after`` or later of ``events``."""
        def check() -> Any:
            for e in self.events[after:]:
                if e.get("method") == method:
                    return e
            return None
        return self._waiters.wait(check, timeout_s, f"CDP event {method}")

    async def navigate(self, url: str, timeout_s: float = TIMEOUT_S) -> None:
        """Load ``url`` in the page and wait for its load event."""
        mark = len(self.events)
        result = await self.send("Page.navigate", {"url": url}, timeout_s)
        if result.get("errorText"):
            raise CdpError(f"navigation to {url} failed: {result['errorText']}")
        await self.wait_event("Page.loadEventFired", timeout_s, after=mark)

    async def evaluate(self, expression: str, await_promise: bool = True, timeout_s: float = TIMEOUT_S) -> Any:
        """The JSON value of ``expression`` in the page (a promise awaited); EvaluationError if it throws."""
        result = await self.send("Runtime.evaluate", {
            "expression": expression, "awaitPromise": await_promise, "returnByValue": True,
            "timeout": int(timeout_s * 1000)}, timeout_s + 1)
        if "exceptionDetails" in result:
            raise EvaluationError(_exception_text(result["exceptionDetails"]))
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout_s: float = TIMEOUT_S, what: str = "") -> Any:
        """Evaluate ``expression`` every 100 ms until it is truthy; fires with that value."""
        waiters = _Waiters()
        state: dict[str, Any] = {"value": None, "error": None, "busy": False}

        def attempt() -> None:
            if state["busy"]:
                return
            state["busy"] = True
            d = Deferred.fromCoroutine(self.evaluate(expression, timeout_s=timeout_s))

            def got(value: Any) -> None:
                state["value"] = value

            def failed(f: Any) -> None:
                state["error"] = f.value

            def done(_: Any) -> None:
                state["busy"] = False
                waiters.poke()

            d.addCallbacks(got, failed).addBoth(done)

        loop = task.LoopingCall(attempt)
        loop.start(0.1)
        try:
            await waiters.wait(lambda: state["value"] or state["error"], timeout_s, what or expression)
        finally:
            if loop.running:
                loop.stop()
        if state["error"] is not None:
            raise state["error"]
        return state["value"]

    async def stop(self, timeout_s: float = 15.0) -> None:
        """Close the DevTools session, end the browser (SIGTERM, then SIGKILL) and remove its profile."""
        if self._cdp is not None and not self._cdp_gone:
            self._cdp.dropConnection(abort=True)
        if self.process.transport is not None and self.process.exit_code is None:
            try:
                self.process.transport.signalProcess("TERM")
            except ProcessExitedAlready:
                pass
            try:
                await self._waiters.wait(lambda: self.process.exit_code is not None, timeout_s, "chromium exit")
            except AssertionError:
                try:
                    self.process.transport.signalProcess("KILL")
                except ProcessExitedAlready:
                    pass
                await self._waiters.wait(lambda: self.process.exit_code is not None, timeout_s, "chromium kill")
        await self._close_pipes()
        shutil.rmtree(self._profile, ignore_errors=True)


    async def _close_pipes(self, grace_s: float = 3.0) -> None:
        """Chromium's helper processes inherit its stdout/stderr and may hold them open after the browser
        exited; past a short grace, close our ends so no reader outlives the test."""
        if self.process.transport is None:
            return
        try:
            await self._waiters.wait(lambda: not self.process.open_pipes, grace_s, "chromium output closed")
        except AssertionError:
            self.process.transport.loseConnection()  # the pipes report closed on the next turn
            await self._waiters.wait(lambda: not self.process.open_pipes, grace_s, "chromium output closed")


def _remote_text(obj: dict[str, Any]) -> str:
    if "value" in obj:
        return obj["value"] if isinstance(obj["value"], str) else json.dumps(obj["value"])
    return str(obj.get("description", obj.get("type", "")))


def _exception_text(details: dict[str, Any]) -> str:
    exception = details.get("exception") or {}
    return str(exception.get("description") or details.get("text") or details)
