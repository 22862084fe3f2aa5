"""SIP limits, /metrics and systemd notification against the real daemon, with SIPp as the peer.

* a trunk sending 25 calls/s with ACK and BYE for several seconds is not throttled by a
  30 requests/s limit (only requests that start something count), while a flood of
  out-of-dialog OPTIONS from one source is;
* with ``max_calls = 3`` the fourth concurrent INVITE gets 503 with Retry-After, and with
  ``max_pending_invites = 2`` the third INVITE waiting for a webhook client does (no webhook);
* ``GET /metrics`` shows the SIP counters and the calls held;
* with ``$NOTIFY_SOCKET`` set the daemon sends READY=1 once it serves, WATCHDOG=1
  repeatedly with ``$WATCHDOG_USEC``, and STOPPING=1 on SIGTERM.

Every wait has a deadline; nothing sleeps.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SkipTest, TestCase

from harness import BASE_CONFIG, Daemon, _Waiters, free_port, http_client, spawn_daemon, start_daemon, wait_port

SCENARIOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp")
SIPP = shutil.which("sipp")

PLAYBOOK = ("---\ntts:\n  provider: piper\nllm:\n  provider: openai\n"
            "greeting: Hello.\n---\nYou answer calls.\n")


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
        if got == want:
            return float(m.group(3))
    return 0.0


def sipp_counts(output: str) -> tuple[int, int]:
    """(successful, failed) calls from SIPp's final statistics screen."""
    ok = re.findall(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)", output)
    failed = re.findall(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)", output)
    return (int(ok[-1]) if ok else -1, int(failed[-1]) if failed else -1)


class LimitsTestCase(TestCase):
    """Starts a playbook-answering daemon and SIPp processes; cleans both up."""

    timeout = 120

    def setUp(self) -> None:
        if SIPP is None:
            raise SkipTest("sipp (sip-tester) is not installed")
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.workdir, "config", "playbook"))
        with open(os.path.join(self.workdir, "config", "playbook", "answer.md"), "w") as f:
            f.write(PLAYBOOK)

    async def daemon(self, extra: str, handler: str = '[handler]\ntype = "playbook"\ndefault = "answer.md"\n') -> Daemon:
        """The daemon with ``extra`` tables; calls are answered by a playbook unless ``handler`` says otherwise."""
        base = 20000 + free_port(socket.SOCK_DGRAM) % 20000 & ~1
        config = (f"rtp_start_port = {base}\nrtp_end_port = {base + 800}\ngraceful_shutdown_timeout = 1\n" + BASE_CONFIG
                  + handler + extra)
        daemon = await start_daemon(self.workdir, config)
        self.addCleanup(daemon.stop)
        return daemon

    def sipp(self, daemon: Daemon, *args: str) -> Daemon:
        proc = Daemon()  # any ProcessProtocol with output and exit waiting will do
        argv = [SIPP, *args, f"127.0.0.1:{daemon.sip_port}", "-i", "127.0.0.1",
                "-p", str(free_port(socket.SOCK_DGRAM)), "-nostdin", "-timeout", "60s"]
        reactor.spawnProcess(proc, SIPP, argv, env=dict(os.environ), path=self.workdir)
        self.addCleanup(proc.stop)
        return proc

    async def metrics(self, daemon: Daemon) -> str:
        response = await http_client().get(f"{daemon.base_url}/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        return (await treq.content(response)).decode()


class RateLimitTests(LimitsTestCase):
    """[sip_rate_limit] counts only new work."""

    async def test_trunk_not_throttled_options_flood_is(self) -> None:
        """150 calls at 25 calls/s (INVITE, ACK, BYE: 75 requests/s) all succeed under a 30/s limit; an OPTIONS flood does not."""
        daemon = await self.daemon("[sip_rate_limit]\nrequests_per_second = 30\nburst = 100\n")
        trunk = self.sipp(daemon, "-sn", "uac", "-r", "25", "-m", "150", "-l", "100", "-d", "500",
                          "-mp", str(free_port(socket.SOCK_DGRAM)))
        (code,) = await trunk.wait_exit(90)
        self.assertEqual(sipp_counts(trunk.output), (150, 0), trunk.output[-3000:])
        self.assertEqual(code, 0)
        text = await self.metrics(daemon)
        self.assertEqual(sample(text, "activecall_sip_refused_total", reason="rate_limited"), 0.0)
        self.assertEqual(sample(text, "activecall_sip_requests_total", direction="in", method="INVITE"), 150.0)
        self.assertEqual(sample(text, "activecall_sip_requests_total", direction="in", method="BYE"), 150.0)
        self.assertEqual(sample(text, "activecall_sip_responses_total", direction="out", method="INVITE",
                                code="200"), 150.0)
        self.assertEqual(sample(text, "activecall_sip_invites_total", direction="in"), 150.0)
        self.assertIn("activecall_media_tick_lateness_seconds_bucket", text)

        # 600 OPTIONS in 2 s from the same source: far beyond the 100 + 2 * 30 tokens.
        flood = self.sipp(daemon, "-sf", os.path.join(SCENARIOS, "uac_options.xml"), "-r", "300", "-m", "600",
                          "-max_non_invite_retrans", "0", "-recv_timeout", "2000")
        (code,) = await flood.wait_exit(90)
        ok, failed = sipp_counts(flood.output)
        self.assertNotEqual(code, 0)
        self.assertTrue(ok < 300 and failed > 300, (ok, failed))
        text = await self.metrics(daemon)
        self.assertGreater(sample(text, "activecall_sip_refused_total", reason="rate_limited"), 300.0)


class MaxCallsTests(LimitsTestCase):
    """[sip_limits] max_calls."""

    async def test_fourth_concurrent_invite_gets_503_retry_after(self) -> None:
        """Three calls held by SIPp; a fourth INVITE gets 503 with Retry-After and the Reason; /metrics shows the three calls."""
        daemon = await self.daemon("[sip_limits]\nmax_calls = 3\n")
        holder = self.sipp(daemon, "-sn", "uac", "-r", "10", "-m", "3", "-l", "3", "-d", "60000",
                           "-mp", str(free_port(socket.SOCK_DGRAM)))
        waiters = _Waiters()
        state = {"text": ""}

        async def poll() -> None:
            state["text"] = await self.metrics(daemon)
            waiters.poke()

        from twisted.internet.task import LoopingCall

        loop = LoopingCall(lambda: Deferred.fromCoroutine(poll()))
        loop.start(0.1)
        self.addCleanup(lambda: loop.stop() if loop.running else None)
        await waiters.wait(lambda: sample(state["text"], "activecall_calls", direction="inbound",
                                          state="answered") == 3.0, 30, "three answered calls in /metrics")
        loop.stop()
        probe = self.sipp(daemon, "-sf", os.path.join(SCENARIOS, "uac_expect_503_retry_after.xml"), "-m", "1")
        (code,) = await probe.wait_exit(30)
        self.assertEqual(code, 0, probe.output[-3000:])
        text = await self.metrics(daemon)
        self.assertEqual(sample(text, "activecall_sip_refused_total", reason="max_calls"), 1.0)
        self.assertEqual(sample(text, "activecall_sip_responses_total", direction="out", method="INVITE",
                                code="503"), 1.0)
        self.assertEqual(sample(text, "activecall_calls", direction="inbound", state="answered"), 3.0)
        holder.transport.signalProcess("KILL")  # the held calls end with the daemon's shutdown


class MaxPendingInvitesTests(LimitsTestCase):
    """[sip_limits] max_pending_invites with the webhook handler."""

    async def test_third_pending_invite_gets_503_and_no_webhook(self) -> None:
        """Two calls wait for a webhook client; a third INVITE gets 503 with Retry-After and a Reason, and no webhook."""
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        hooks: list[bytes] = []
        waiters = _Waiters()

        class Hook(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                hooks.append(request.content.read())
                waiters.poke()
                return b'{"status":"ok"}'

        port = reactor.listenTCP(0, Site(Hook()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        daemon = await self.daemon("[sip_limits]\nmax_pending_invites = 2\nmax_pending_per_source = 2\n", handler=(
            f'[handler]\ntype = "webhook"\nurl = "http://127.0.0.1:{port.getHost().port}/hook"\n'))
        holder = self.sipp(daemon, "-sn", "uac", "-m", "2", "-l", "2", "-mp", str(free_port(socket.SOCK_DGRAM)))
        await waiters.wait(lambda: len(hooks) == 2, 30, "two webhooks")
        probe = self.sipp(daemon, "-sf", os.path.join(SCENARIOS, "uac_expect_503_retry_after.xml"), "-m", "1")
        (code,) = await probe.wait_exit(30)
        self.assertEqual(code, 0, probe.output[-3000:])
        text = await self.metrics(daemon)
        self.assertEqual(sample(text, "activecall_calls_pending"), 2.0)
        self.assertEqual(sample(text, "activecall_calls_pending_refused_total"), 1.0)
        self.assertEqual(len(hooks), 2)
        holder.transport.signalProcess("KILL")


class _NotifyListener(DatagramProtocol):
    """systemd's side of NOTIFY_SOCKET: collects the datagrams."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.waiters = _Waiters()
        self.on_ready: Any = None

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        text = data.decode()
        self.messages.append(text)
        if text == "READY=1" and self.on_ready is not None:
            self.on_ready()
        self.waiters.poke()


class SystemdNotifyTests(TestCase):
    """Type=notify: READY=1 when serving, WATCHDOG=1 from the reactor, STOPPING=1 on SIGTERM."""

    timeout = 60

    async def test_ready_watchdog_stopping(self) -> None:
        """READY=1 comes when the HTTP and SIP ports already answer, WATCHDOG=1 repeats, STOPPING=1 on SIGTERM."""
        directory = tempfile.mkdtemp(prefix="notify-")
        path = os.path.join(directory, "notify")
        listener = _NotifyListener()
        port = reactor.listenUNIXDatagram(path, listener)
        self.addCleanup(port.stopListening)
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        http_port, sip_port = free_port(), free_port(socket.SOCK_DGRAM)
        conf = os.path.join(workdir, "activecall.toml")
        with open(conf, "w") as f:
            f.write(BASE_CONFIG.format(http_port=http_port, sip_port=sip_port, workdir=workdir))
        at_ready: dict[str, bool] = {}

        def check_listeners() -> None:
            # Both listeners must be bound when READY=1 arrives: connect/bind right now.
            with socket.socket() as s:
                at_ready["http"] = s.connect_ex(("127.0.0.1", http_port)) == 0
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    s.bind(("127.0.0.1", sip_port))
                    at_ready["sip"] = False  # still free: not bound yet
                except OSError:
                    at_ready["sip"] = True

        listener.on_ready = check_listeners
        daemon = spawn_daemon(workdir, ["--conf", conf],
                              env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        self.addCleanup(daemon.stop)
        await listener.waiters.wait(lambda: "READY=1" in listener.messages, 30, "READY=1")
        self.assertEqual(at_ready, {"http": True, "sip": True})
        await wait_port(http_port)
        await listener.waiters.wait(lambda: listener.messages.count("WATCHDOG=1") >= 5, 10, "five WATCHDOG=1")
        (code,) = await daemon.stop()
        # twistd ends a SIGTERM shutdown by re-raising the signal, which systemd counts as clean.
        self.assertIn(code, (0, -15), daemon.output[-2000:])
        self.assertIn("Server Shut Down.", daemon.output)
        self.assertIn("STOPPING=1", listener.messages)
        ready = listener.messages.index("READY=1")
        self.assertLess(ready, listener.messages.index("STOPPING=1"))
        self.assertEqual(listener.messages[0], "READY=1")
