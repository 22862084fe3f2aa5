"""Cluster benchmark: SIPp calls through the shipped Kamailio edge to 1, 2 and 3 activecall nodes on this machine.

Every node is a whole daemon (``twistd -n --reactor=asyncio activecall``) answering with a one-word
playbook greeting (``tests/integration/edge.py``: ``QUIET_PLAYBOOK``), its own ports on 127.0.0.1 and
its working directory under ``--workdir`` (default ``/dev/shm``: per-call event dumps on tmpfs). The
edge is Kamailio with ``etc/kamailio/activecall-edge.cfg`` (call-load dispatching, OPTIONS probing)
and a dispatcher list of the running nodes. SIPp runs ``tests/integration/sipp/uac_via_edge.xml``
(INVITE, 200, ACK, pause, BYE, the in-dialog requests record-routed through the edge).

Three figures per node count (``--nodes 1,2,3``):

calls/s
    Short calls (``-d 0``) at rising rates (``--rates``), ``--seconds`` each; a step passes when
    no call failed and SIPp achieved >= 90 % of the planned rate. Printed: the highest passing rate,
    the CPU ms per call of the nodes and of Kamailio at that rate, and how busy the whole host was
    (/proc/stat, every process: a saturated host caps every node count alike).
concurrent calls
    ``--hold`` calls brought up at ``--hold-rate`` calls/s and held until all are up (plus 3 s), for
    each count in ``--concurrency``; a step passes when every call succeeded. The nodes send RTP (the
    greeting, then silence) on every call; SIPp does not answer media.
setup latency
    INVITE -> 200 (SIPp's response time 1, ``-trace_rtt``) of ``--latency-calls`` calls at 5 calls/s,
    through the edge and, as the reference, straight to the first node: median and 95th percentile;
    their difference is what the edge adds.

All on one host: the nodes, Kamailio and SIPp share its cores, so the scaling ratio across node
counts (not the absolute figures) is what this shows; with two cores three nodes cannot triple
anything. Every process started here is stopped before exit; everything binds 127.0.0.1.

Usage::

    python benchmarks/cluster_load.py [--nodes 1,2,3] [--rates 60,80,100,120,140,160,200] [--seconds 8]
                                      [--concurrency 100,200,400,600] [--hold-rate 40] [--latency-calls 50]
                                      [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

from procstats import cpu_seconds  # noqa: E402

from edge import (EDGE_CFG, KAMAILIO, MODULES, QUIET_PLAYBOOK, SCENARIO, dispatcher_list,  # noqa: E402
                  edge_available, sipp_counts)

SIPP = shutil.which("sipp") or "sipp"


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A currently free port on 127.0.0.1 (UDP unless told)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check, timeout_s: float, what: str, interval_s: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    """Poll ``check()`` until true; SystemExit after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Proc:
    """A child process whose output goes to a file."""

    name: str
    popen: subprocess.Popen  # type: ignore[type-arg]
    log: str

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def cpu_s(self) -> float:
        """CPU of the process and, for Kamailio, of its forked workers (same process group)."""
        total = 0.0
        pgid = os.getpgid(self.popen.pid) if self.popen.poll() is None else None
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if int(entry) == self.popen.pid or (pgid is not None and os.getpgid(int(entry)) == pgid):
                    total += cpu_seconds(int(entry))
            except (OSError, ProcessLookupError, ValueError):
                continue
        return total

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
            except ProcessLookupError:
                pass


def spawn(name: str, argv: list[str], workdir: str, env: Optional[dict[str, str]] = None) -> Proc:
    """Start ``argv`` in its own process group with stdout+stderr to ``<workdir>/<name>.log``."""
    log = os.path.join(workdir, f"{name}.log")
    with open(log, "wb") as out:
        popen = subprocess.Popen(argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
    return Proc(name, popen, log)


@dataclass
class Node:
    proc: Proc
    sip_port: int
    http_port: int


def start_node(root: str, index: int) -> Node:
    """One daemon answering with the quiet playbook; returns once its HTTP port accepts."""
    workdir = os.path.join(root, f"node{index}")
    os.makedirs(os.path.join(workdir, "config", "playbook"))
    with open(os.path.join(workdir, "config", "playbook", "answer.md"), "w") as f:
        f.write(QUIET_PLAYBOOK)
    sip_port, http_port = free_port(), free_port(socket.SOCK_STREAM)
    rtp = 20000 + 4000 * index
    config = f"""rtp_start_port = {rtp}
rtp_end_port = {rtp + 3998}
graceful_shutdown_timeout = 1
http_addr = "127.0.0.1:{http_port}"
addr = "127.0.0.1"
udp_port = {sip_port}
log_level = "warn"
media_cache_path = "{workdir}/cache"
[recording]
path = "{workdir}/recorders"
[handler]
type = "playbook"
default = "answer.md"
[sip_rate_limit]
enabled = false
[sip_limits]
max_calls = 5000
"""
    path = os.path.join(workdir, "activecall.toml")
    with open(path, "w") as f:
        f.write(config)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    proc = spawn(f"node{index}", [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                                  "--reactor=asyncio", "--pidfile=", "activecall", "--conf", path], workdir, env)
    node = Node(proc, sip_port, http_port)
    def serving() -> bool:
        # log_level "warn" hides the ready line: the HTTP port accepting is the sign (bound last).
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", http_port)) == 0 or proc.popen.poll() is not None

    try:
        wait_for(serving, 90, f"node{index} ready")
        if proc.popen.poll() is not None:
            raise SystemExit(f"node{index} exited:\n{proc.output()[-3000:]}")
    except BaseException:
        proc.stop()
        raise
    return node


def start_edge(root: str, nodes: list[Node]) -> tuple[Proc, int]:
    """Kamailio with the shipped edge config in front of ``nodes``; returns once it listens and probed."""
    workdir = tempfile.mkdtemp(prefix="edge-", dir=root if len(root) < 60 else None)
    with open(os.path.join(workdir, "dispatcher.list"), "w") as f:
        f.write(dispatcher_list([n.sip_port for n in nodes]))
    port = free_port()
    argv = [KAMAILIO, "-DD", "-E", "-f", EDGE_CFG, "-Y", workdir, "-w", workdir,
            "-A", f"EDGE_LISTEN=udp:127.0.0.1:{port}",
            "-A", f'DISPATCHER_LIST="{workdir}/dispatcher.list"',
            "-A", f'CTL_SOCKET="unix:{workdir}/ctl.sock"',
            "-A", f'MODULES_PATH="{MODULES}"', "-A", "DS_PING_INTERVAL=1", "-A", "DEBUG_LEVEL=0"]
    proc = spawn("kamailio", argv, workdir, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    try:
        return proc, _edge_ready(proc, workdir, port, len(nodes))
    except BaseException:
        proc.stop()
        raise


def _edge_ready(proc: Proc, workdir: str, port: int, count: int) -> int:
    ctl = os.path.join(workdir, "ctl.sock")
    wait_for(lambda: os.path.exists(ctl) or proc.popen.poll() is not None, 30, "kamailio control socket")
    if proc.popen.poll() is not None:
        raise SystemExit(f"kamailio exited:\n{proc.output()[-3000:]}")

    def all_active() -> bool:
        out = subprocess.run(["kamcmd", "-s", f"unix:{ctl}", "dispatcher.list"], capture_output=True, text=True).stdout
        return len(re.findall(r"FLAGS: A", out)) == count

    wait_for(all_active, 30, "every node probed active", interval_s=0.2)
    return port


@dataclass
class SippRun:
    ok: int
    failed: int
    rate_cps: float
    rtt_ms: list[float] = field(default_factory=list)


def run_sipp(workdir: str, target_port: int, *args: str, timeout_s: float) -> SippRun:
    """One SIPp UAC run against 127.0.0.1:target_port; its counts, achieved rate, peak calls and INVITE->200 times."""
    run_dir = tempfile.mkdtemp(prefix="sipp-", dir=workdir)
    argv = [SIPP, "-sf", SCENARIO, f"127.0.0.1:{target_port}", "-s", "agent", "-i", "127.0.0.1",
            "-p", str(free_port()), "-mp", str(free_port() & ~1), "-nostdin", "-max_retrans", "8",
            "-trace_rtt", "-rtt_freq", "1", "-timeout", f"{int(timeout_s)}s", "-timeout_error", *args]
    proc = spawn("sipp", argv, run_dir)
    try:
        proc.popen.wait(timeout_s + 30)
    except subprocess.TimeoutExpired:
        proc.stop()
    out = proc.output()
    ok, failed = sipp_counts(out)
    rate = re.findall(r"Call Rate\s*\|\s*[\d.]+ cps\s*\|\s*([\d.]+) cps", out)
    rtts: list[float] = []
    for name in os.listdir(run_dir):
        if name.endswith("_rtt.csv"):
            rtts += _rtts(os.path.join(run_dir, name))
    return SippRun(ok, failed, float(rate[-1]) if rate else 0.0, rtts)


def _rtts(path: str) -> list[float]:
    values = []
    with open(path) as f:
        for line in f.read().splitlines()[1:]:
            parts = line.split(";")
            try:
                values.append(float(parts[1]))
            except (IndexError, ValueError):
                continue
    return values


def host_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[float, float]) -> float:
    """Share of the host's CPU time busy since ``before`` (every process, ours and others')."""
    busy, total = host_busy()
    return (busy - before[0]) / max(total - before[1], 1.0)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_rates(root: str, edge_port: int, nodes: list[Node], edge: Proc, rates: list[int],
                seconds: float) -> tuple[int, float, float]:
    """Highest passing short-call rate and the nodes' and edge's CPU ms per call there."""
    best, best_node_ms, best_edge_ms = 0, float("nan"), float("nan")
    for rate in rates:
        calls = int(rate * seconds)
        node_cpu0, edge_cpu0, host0 = sum(n.proc.cpu_s() for n in nodes), edge.cpu_s(), host_busy()
        run = run_sipp(root, edge_port, "-r", str(rate), "-m", str(calls), "-l", str(max(rate * 4, 100)), "-d", "0",
                       timeout_s=seconds + 30)
        node_ms = (sum(n.proc.cpu_s() for n in nodes) - node_cpu0) * 1000 / max(run.ok, 1)
        edge_ms = (edge.cpu_s() - edge_cpu0) * 1000 / max(run.ok, 1)
        host = busy_share(host0)
        passed = run.failed == 0 and run.ok == calls and run.rate_cps >= 0.9 * rate
        print(f"    {rate:4d} calls/s planned: {run.ok:5d} ok {run.failed:4d} failed, {run.rate_cps:6.1f} calls/s achieved, "
              f"nodes {node_ms:5.2f} CPU ms/call, edge {edge_ms:5.2f} CPU ms/call, host {host:4.0%} busy "
              f"{'PASS' if passed else 'FAIL'}",
              flush=True)
        if not passed:
            break
        best, best_node_ms, best_edge_ms = rate, node_ms, edge_ms
    return best, best_node_ms, best_edge_ms


def bench_concurrency(root: str, edge_port: int, counts: list[int], hold_rate: int) -> int:
    """Highest count of calls held at once with every call successful."""
    best = 0
    for count in counts:
        hold_ms = int((count / hold_rate + 3) * 1000)
        host0 = host_busy()
        run = run_sipp(root, edge_port, "-r", str(hold_rate), "-m", str(count), "-l", str(count), "-d", str(hold_ms),
                       timeout_s=hold_ms / 1000 * 2 + 30)
        passed = run.failed == 0 and run.ok == count
        print(f"    {count:4d} calls held {hold_ms / 1000:.1f} s each: {run.ok:5d} ok {run.failed:4d} failed "
              f"(host {busy_share(host0):4.0%} busy) {'PASS' if passed else 'FAIL'}", flush=True)
        if not passed:
            break
        best = count
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,2,3")
    parser.add_argument("--rates", default="60,80,100,120,140,160,200")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", default="100,200,400,600")
    parser.add_argument("--hold-rate", type=int, default=40)
    parser.add_argument("--latency-calls", type=int, default=50)
    parser.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args()
    # SIGTERM/SIGINT unwind through the finally blocks below, which stop every child.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    missing = edge_available()
    if missing:
        raise SystemExit(missing)
    rates = [int(r) for r in args.rates.split(",")]
    counts = [int(c) for c in args.concurrency.split(",")]
    results = []
    print(f"cluster_load: {os.cpu_count()} CPU(s); nodes, Kamailio and SIPp on this host", flush=True)
    for n in [int(x) for x in args.nodes.split(",")]:
        root = tempfile.mkdtemp(prefix="cluster-", dir=args.workdir)
        procs: list[Proc] = []
        try:
            nodes = [start_node(root, i + 1) for i in range(n)]
            procs += [node.proc for node in nodes]
            edge, edge_port = start_edge(root, nodes)
            procs.append(edge)
            print(f"{n} node(s) behind the edge:", flush=True)
            # setup latency first, on an idle cluster
            # -timer_resol 1: SIPp's clock otherwise moves in 4-10 ms steps, coarser than what is measured.
            via = run_sipp(root, edge_port, "-r", "5", "-m", str(args.latency_calls), "-d", "200",
                           "-timer_resol", "1", timeout_s=args.latency_calls / 5 + 30)
            direct = run_sipp(root, nodes[0].sip_port, "-r", "5", "-m", str(args.latency_calls), "-d", "200",
                              "-timer_resol", "1", timeout_s=args.latency_calls / 5 + 30)
            lat = (statistics.median(via.rtt_ms) if via.rtt_ms else float("nan"), pct(via.rtt_ms, 0.95),
                   statistics.median(direct.rtt_ms) if direct.rtt_ms else float("nan"), pct(direct.rtt_ms, 0.95))
            # SIPp's times come in whole clock steps (4 ms here): the means show what the medians round away.
            means = tuple(statistics.fmean(v) if v else float("nan") for v in (via.rtt_ms, direct.rtt_ms))
            print(f"    setup INVITE->200: via edge median {lat[0]:.2f} ms p95 {lat[1]:.2f} ms mean {means[0]:.2f} ms "
                  f"({via.ok} ok {via.failed} failed); direct to node1 median {lat[2]:.2f} ms p95 {lat[3]:.2f} ms "
                  f"mean {means[1]:.2f} ms ({direct.ok} ok {direct.failed} failed)", flush=True)
            best_rate, node_ms, edge_ms = bench_rates(root, edge_port, nodes, edge, rates, args.seconds)
            held = bench_concurrency(root, edge_port, counts, args.hold_rate)
            results.append((n, best_rate, node_ms, edge_ms, held, lat))
        finally:
            for proc in reversed(procs):
                proc.stop()
            shutil.rmtree(root, ignore_errors=True)
    print("\nsummary (one host; the ratio between rows is the point):")
    print(" nodes | calls/s (0 failed) | nodes CPU ms/call | edge CPU ms/call | calls held | setup ms via edge "
          "(median/p95) | direct (median/p95)")
    base = results[0][1] if results and results[0][1] else None
    for n, rate, node_ms, edge_ms, held, lat in results:
        ratio = f" (x{rate / base:.2f})" if base else ""
        print(f" {n:5d} | {rate:7d}{ratio:>11} | {node_ms:17.2f} | {edge_ms:16.2f} | {held:10d} | "
              f"{lat[0]:8.2f} / {lat[1]:6.2f}        | {lat[2]:6.2f} / {lat[3]:6.2f}")


if __name__ == "__main__":
    main()
