"""The shipped Kamailio edge (``etc/kamailio/activecall-edge.cfg``) and SIPp, run on 127.0.0.1 for tests and benchmarks.

:func:`start_edge` writes a dispatcher list for the given node ports and starts
``kamailio -DD -E`` with the shipped config, its knobs set with ``-A`` defines
(listen socket, list file, control socket, probe interval); readiness is every
node probed active (``kamcmd dispatcher.list``). :func:`spawn_sipp` runs a SIPp
UAC through it with ``tests/integration/sipp/uac_via_edge.xml``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from typing import Any, Iterable, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from harness import REPO, Daemon, _Waiters, free_port

KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
KAMCMD = shutil.which("kamcmd") or "/usr/sbin/kamcmd"
SIPP = shutil.which("sipp")
EDGE_CFG = os.path.join(REPO, "etc", "kamailio", "activecall-edge.cfg")
SCENARIO = os.path.join(REPO, "tests", "integration", "sipp", "uac_via_edge.xml")
MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"

#: A playbook that answers and stays silent after a one-word greeting: cheap enough for load.
QUIET_PLAYBOOK = "---\ntts:\n  provider: piper\nllm:\n  provider: openai\ngreeting: Hello.\n---\nYou answer calls.\n"


def edge_available() -> Optional[str]:
    """None when Kamailio, kamcmd and SIPp are all installed, else what is missing."""
    for path in (KAMAILIO, KAMCMD):
        if not os.access(path, os.X_OK):
            return f"{os.path.basename(path)} is not installed (apt-get install -y kamailio)"
    if not os.path.isdir(MODULES):
        return f"no Kamailio modules in {MODULES}"
    if SIPP is None:
        return "sipp (sip-tester) is not installed"
    return None


class Edge(Daemon):
    """The Kamailio process: output kept, exit awaited like a daemon's."""

    def __init__(self, workdir: str, port: int, nodes: list[int]) -> None:
        super().__init__()
        self.workdir = workdir
        self.port = port
        self.nodes = nodes
        self.ctl = os.path.join(workdir, "ctl.sock")

    async def kamcmd(self, *args: str) -> str:
        """``kamcmd`` over the edge's control socket; its stdout."""
        out, err, code = await getProcessOutputAndValue(KAMCMD, ["-s", f"unix:{self.ctl}", *args])
        if code != 0:
            raise AssertionError(f"kamcmd {' '.join(args)}: {err.decode(errors='replace')}")
        return str(out.decode())

    async def states(self) -> dict[int, str]:
        """Node port -> dispatcher FLAGS (``AP`` active and probed, ``IP`` inactive, ``TP`` trying)."""
        text = await self.kamcmd("dispatcher.list")
        found = re.findall(r"URI: sip:127\.0\.0\.1:(\d+)\s+FLAGS: (\w+)", text)
        return {int(port): flags for port, flags in found}

    def dispatched(self, node_port: int) -> int:
        """INVITEs the edge sent to ``node_port`` so far (its info log, first tries and retries)."""
        return len(re.findall(rf"INVITE \S+ (?:to|retried on) node sip:127\.0\.0\.1:{node_port}\b", self.output))


def dispatcher_list(node_ports: Iterable[int], attrs: dict[int, str] | None = None) -> str:
    """The dispatcher list of set 1: one line per node, priorities descending in the given order."""
    ports = list(node_ports)
    lines = []
    for i, port in enumerate(ports):
        extra = (attrs or {}).get(port, "")
        lines.append(f"1 sip:127.0.0.1:{port} 0 {10 * (len(ports) - i)} duid=node{i + 1}{extra}")
    return "\n".join(lines) + "\n"


def spawn_edge(workdir: str, node_ports: list[int], *, ping_interval_s: int = 1, children: int = 2,
               attrs: dict[int, str] | None = None, defines: Iterable[str] = (), port: int = 0) -> Edge:
    """Start Kamailio with the shipped edge config on 127.0.0.1:``port`` (0: a free one) in front of ``node_ports``;
    ``defines`` are more ``-A`` knobs."""
    os.makedirs(workdir, exist_ok=True)
    if len(os.path.join(workdir, "ctl.sock")) > 100:
        raise ValueError(f"{workdir}: too long for a unix socket path; use a short directory (tempfile.mkdtemp)")
    port = port or free_port(socket.SOCK_DGRAM)
    edge = Edge(workdir, port, node_ports)
    path = os.path.join(workdir, "dispatcher.list")
    with open(path, "w") as f:
        f.write(dispatcher_list(node_ports, attrs))
    argv = [KAMAILIO, "-DD", "-E", "-f", EDGE_CFG, "-Y", workdir, "-w", workdir,
            "-A", f"EDGE_LISTEN=udp:127.0.0.1:{port}",
            "-A", f'DISPATCHER_LIST="{path}"',
            "-A", f'CTL_SOCKET="unix:{edge.ctl}"',
            "-A", f'MODULES_PATH="{MODULES}"',
            "-A", f"DS_PING_INTERVAL={ping_interval_s}",
            "-A", f"CHILDREN={children}",
            "-A", "DEBUG_LEVEL=2"]
    for define in defines:
        argv += ["-A", define]
    reactor.spawnProcess(edge, KAMAILIO, argv, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, path=workdir)
    return edge


async def wait_states(edge: Edge, want: dict[int, str], timeout_s: float = 20.0) -> dict[int, str]:
    """Poll ``dispatcher.list`` every 100 ms until each node's FLAGS start with the wanted letter(s)."""
    from twisted.internet.task import deferLater

    waiters = _Waiters()
    seen: dict[str, Any] = {"states": {}}
    done = waiters.wait(lambda: all(seen["states"].get(p, "").startswith(f) for p, f in want.items()),
                        timeout_s, f"dispatcher states {want}")
    failure: list[Any] = []
    done.addErrback(lambda f: failure.append(f))
    while not done.called:
        try:
            seen["states"] = await edge.states()
        except AssertionError:
            seen["states"] = {}  # the control socket is not up yet
        waiters.poke()
        if not done.called:
            await deferLater(reactor, 0.1, lambda: None)
    if failure:
        raise AssertionError(f"{failure[0].getErrorMessage()}; last {seen['states']}\n{edge.output[-3000:]}")
    return dict(seen["states"])


def spawn_sipp(workdir: str, target_port: int, *args: str, name: str = "sipp") -> Daemon:
    """SIPp's UAC through ``127.0.0.1:target_port`` with the record-route-aware scenario, plus ``args``.

    Response time 1 (INVITE to 200) goes to ``<name>_rtt.csv`` under ``workdir`` via ``-trace_rtt``.
    """
    assert SIPP is not None
    proc = Daemon()
    argv = [SIPP, "-sf", SCENARIO, f"127.0.0.1:{target_port}", "-s", "agent", "-i", "127.0.0.1",
            "-p", str(free_port(socket.SOCK_DGRAM)), "-mp", str(free_port(socket.SOCK_DGRAM) & ~1),
            "-nostdin", "-trace_err", "-error_file", os.path.join(workdir, f"{name}_errors.log"),
            "-trace_rtt", "-rtt_freq", "1", "-trace_stat", "-stf", os.path.join(workdir, f"{name}_stat.csv"),
            *args]
    reactor.spawnProcess(proc, SIPP, argv, env=dict(os.environ), path=workdir)
    return proc


def sipp_counts(output: str) -> tuple[int, int]:
    """(successful, failed) calls from SIPp's final statistics screen."""
    ok = re.findall(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)", output)
    failed = re.findall(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)", output)
    return (int(ok[-1]) if ok else -1, int(failed[-1]) if failed else -1)


def rtt_ms(workdir: str) -> list[float]:
    """Every call's INVITE -> 200 time in ms from the ``-trace_rtt`` files SIPp wrote in ``workdir``."""
    values: list[float] = []
    for name in sorted(os.listdir(workdir)):
        if not name.endswith("_rtt.csv"):
            continue
        with open(os.path.join(workdir, name)) as f:
            for line in f.read().splitlines()[1:]:
                parts = line.split(";")
                if len(parts) >= 2:
                    try:
                        values.append(float(parts[1]))
                    except ValueError:
                        pass
    return values


def node_config(base_rtp: int, top: str = "", tables: str = "") -> str:
    """A node's config for ``harness.start_daemon``: the quiet playbook answers; ``top`` holds more
    top-level keys, ``tables`` more tables."""
    from harness import BASE_CONFIG

    return (f"rtp_start_port = {base_rtp}\nrtp_end_port = {base_rtp + 400}\n" + top + BASE_CONFIG
            + '[handler]\ntype = "playbook"\ndefault = "answer.md"\n[sip_rate_limit]\nenabled = false\n' + tables)


def write_playbook(workdir: str) -> None:
    """``config/playbook/answer.md`` under the node's working directory."""
    os.makedirs(os.path.join(workdir, "config", "playbook"), exist_ok=True)
    with open(os.path.join(workdir, "config", "playbook", "answer.md"), "w") as f:
        f.write(QUIET_PLAYBOOK)


def wait(check: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> Deferred[Any]:
    """Fire when ``check()`` is true, polling every ``interval_s``; fail after ``timeout_s``."""
    from twisted.internet.task import LoopingCall

    waiters = _Waiters()
    loop = LoopingCall(waiters.poke)
    loop.start(interval_s, now=False)
    d = waiters.wait(check, timeout_s, what)

    def stop(result: Any) -> Any:
        if loop.running:
            loop.stop()
        return result

    return d.addBoth(stop)
