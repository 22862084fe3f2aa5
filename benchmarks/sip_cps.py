"""SIP call rate benchmark: SIPp UAC against the daemon, beside SIPp's own UAS as the reference.

Each call is INVITE → 200 (with SDP) → ACK → BYE → 200, no media (SIPp's
built-in ``uac`` scenario with ``-d 0``: the caller hangs up at once).  The rate
rises step by step (``--rates``, or one ``--rate``); each step runs
``--seconds`` of calls and passes when every call succeeded and SIPp kept up
with the planned rate (achieved ≥ 90 %).  The same steps then run against SIPp's own UAS
(``-sn uas``) as the reference, in the same run, so a noisy machine shows in
both.  Printed per step: successful and failed calls, wall time, calls/s
achieved, the server's CPU (user+system from /proc/<pid>/stat) as a share of
one core and in ms per successful call; at the end the highest rate
sustained with zero failed calls and its CPU ms per call.

Two servers can be measured (``--mode``):

``daemon`` (default)
    The whole daemon, ``twistd -n --reactor=asyncio activecall``, with the
    shipped ``etc/activecall.toml`` (inbound calls answered by the default
    playbook) copied into a temporary directory with free 127.0.0.1 ports and
    ``etc/playbook/default.md`` as ``config/playbook/default.md`` there.  The
    only other change: ``[sip_rate_limit] enabled = false``, since every call
    comes from one source (SIPp), which the shipped per-source limit would
    refuse at these rates.
``stack``
    The SIP stack alone (``build_sip_service`` with an auto-answer handler) on
    the default reactor.

The daemon runs in a fresh directory under ``--workdir`` (default ``/dev/shm``
when it exists): the shipped config writes one event dump file per call under
``./config/recorders``, and on a thin-provisioned VM disk creating a file costs
0.02–1.3 ms of kernel CPU depending on what the disk did before, which would
swamp the per-call figure; on tmpfs the figure measures the daemon, not the disk.
Pass ``--workdir /tmp`` to include the disk.

``--src DIR`` runs the server from another checkout (``PYTHONPATH=DIR``, e.g. a
``git worktree`` of an older commit) with this interpreter; repeat it to
measure several checkouts one after the other in the same run; the child prints
the ``activecall`` package it imported and the run stops if it is not under
DIR.  ``ACTIVECALL_BENCH_PROFILE=out.svg`` (or ``.txt`` for py-spy's raw
collapsed stacks) records the daemon with ``py-spy`` for the whole run
(``ACTIVECALL_BENCH_PROFILE_ARGS="--gil"`` samples only the thread holding the GIL).

Usage::

    python benchmarks/sip_cps.py [--mode daemon|stack] [--rates 100,200,300] [--rate 150]
                                 [--seconds 10] [--src DIR] [--workdir DIR] [--skip-reference]

Every process started here (daemon, SIPp, py-spy) is stopped before exit;
everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from procstats import cpu_seconds  # noqa: E402

PROFILE_ENV = "ACTIVECALL_BENCH_PROFILE"
PROFILE_ARGS_ENV = "ACTIVECALL_BENCH_PROFILE_ARGS"  # more py-spy arguments, e.g. "--gil"


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A currently free port on 127.0.0.1 (UDP unless told)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(port: int) -> None:
    """Child of ``--mode stack``: run the SIP service answering every INVITE until killed."""
    import gc
    import random

    import activecall
    from twisted.internet import reactor

    from activecall.config import Config
    from activecall.ids import IdSource
    from activecall.sip.service import build_sip_service
    from activecall.testing_sip import AutoAnswerHandler

    print(f"activecall from {activecall.__file__}", flush=True)
    service = build_sip_service(Config(addr="127.0.0.1", udp_port=port), reactor,
                                IdSource(random.Random()), AutoAnswerHandler(keep=False))
    service.startService()
    gc.freeze()  # start-up objects never need collecting again
    print("ready", flush=True)
    reactor.run()


# The daemon child: report which activecall it imports, then run twistd as the command line says.
DAEMON_BOOT = ("import sys, activecall; print('activecall from', activecall.__file__, flush=True); "
               "from twisted.scripts.twistd import run; run()")


def daemon_config(src: str, workdir: str, sip_port: int, http_port: int) -> str:
    """Copy ``src``'s shipped config and default playbook into ``workdir``; returns the config path."""
    with open(os.path.join(src, "etc", "activecall.toml")) as f:
        text = f.read()
    replaced = {
        "http_addr": f'"127.0.0.1:{http_port}"',
        "addr": '"127.0.0.1"',
        "udp_port": str(sip_port),
    }
    for key, value in replaced.items():
        text, n = re.subn(rf"^{key} = \S+", f"{key} = {value}", text, count=1, flags=re.M)
        if n != 1:
            raise SystemExit(f"{src}/etc/activecall.toml: no top-level {key} line to replace")
    if re.search(r"^\[sip_rate_limit\]", text, flags=re.M):
        raise SystemExit(f"{src}/etc/activecall.toml has a [sip_rate_limit] table; adapt daemon_config()")
    # Top-level keys must come before the first table: the table goes at the end.
    text += "\n# benchmarks/sip_cps.py: every call comes from SIPp, one source\n[sip_rate_limit]\nenabled = false\n"
    os.makedirs(os.path.join(workdir, "config", "playbook"))
    shutil.copy(os.path.join(src, "etc", "playbook", "default.md"), os.path.join(workdir, "config", "playbook"))
    path = os.path.join(workdir, "activecall.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


@dataclass
class Server:
    """A process under test: its pid, SIP port and how to stop it."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Optional[str] = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def wait_log(server: Server, text: str, src: Optional[str], timeout_s: float = 60.0) -> None:
    """Wait until ``text`` appears in the server's output; check the imported package is under ``src``."""
    assert server.log_path is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(server.log_path, errors="replace") as f:
            out = f.read()
        if text in out:
            found = re.search(r"activecall from (\S+)", out)
            where = found.group(1) if found else "?"
            print(f"{server.name}: imports {where}", flush=True)
            if src is not None and not os.path.realpath(where).startswith(os.path.realpath(src) + os.sep):
                raise RuntimeError(f"{server.name} imported {where}, not the checkout in {src}")
            return
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited during start-up:\n{out[-3000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} did not start within {timeout_s:.0f} s")


def start_ours(mode: str, src: str, workdir: str) -> Server:
    """Start the daemon (``mode`` daemon) or the bare SIP stack (``mode`` stack) from ``src``."""
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    port = free_port()
    log_path = os.path.join(workdir, "server.log")
    if mode == "daemon":
        conf = daemon_config(src, workdir, port, free_port(socket.SOCK_STREAM))
        argv = [sys.executable, "-c", DAEMON_BOOT, "-n", "--reactor=asyncio", "--pidfile=", "activecall", "--conf", conf]
        name, ready = f"activecall daemon (shipped config, playbook) from {src}", " ready: "
    else:
        argv = [sys.executable, os.path.abspath(__file__), "--serve", str(port)]
        name, ready = f"activecall SIP stack (SipUserAgent, auto-answer) from {src}", "ready"
    with open(log_path, "wb") as log:
        # cwd is the work directory: the config's relative paths land there, and no checkout shadows src.
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    server = Server(name, proc, port, log_path)
    try:
        wait_log(server, ready, src)
    except BaseException:
        server.stop()
        raise
    return server


def start_profiler(pid: int, out: str) -> Optional[subprocess.Popen[bytes]]:
    """py-spy recording ``pid`` into ``out`` (svg flame graph, or raw collapsed stacks for .txt)."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        print(f"{PROFILE_ENV} set but py-spy not found (pip install py-spy)", flush=True)
        return None
    fmt = "raw" if out.endswith(".txt") else "flamegraph"
    extra = os.environ.get(PROFILE_ARGS_ENV, "").split()
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "250", "--format", fmt, "--output", out,
                             "--nonblocking", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class Step:
    """One rate step's outcome."""

    rate: int
    ok: int
    failed: int
    wall_s: float
    cpu_s: float

    @property
    def cps(self) -> float:
        """Successful calls per wall second."""
        return self.ok / self.wall_s if self.wall_s else 0.0

    @property
    def cpu_ms_per_call(self) -> float:
        """Server CPU per successful call."""
        return 1000 * self.cpu_s / self.ok if self.ok else float("nan")


def run_step(target_port: int, rate: int, seconds: float, workdir: str) -> tuple[int, int, float]:
    """One SIPp UAC run at ``rate`` calls/s; returns (successful, failed, wall seconds)."""
    for old in glob.glob(os.path.join(workdir, "*.csv")):
        os.remove(old)
    calls = int(rate * seconds)
    argv = ["sipp", "-sn", "uac", f"127.0.0.1:{target_port}", "-i", "127.0.0.1",
            "-p", str(free_port()), "-mp", str(free_port()), "-r", str(rate), "-m", str(calls), "-d", "0",
            "-l", str(max(rate * 4, 100)), "-recv_timeout", "5000", "-timeout", str(int(seconds * 3 + 30)),
            "-nostdin", "-trace_stat", "-fd", "1", "-buff_size", "4194304"]
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds * 4 + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    wall = time.monotonic() - start
    files = glob.glob(os.path.join(workdir, "*.csv"))
    if not files:
        return 0, calls, wall
    with open(files[0]) as f:
        rows = list(csv.reader(f, delimiter=";"))
    header, last = rows[0], rows[-1]
    ok = int(last[header.index("SuccessfulCall(C)")])
    failed = int(last[header.index("FailedCall(C)")])
    return ok, failed + (calls - ok - failed), wall


def sweep(server: Server, rates: list[int], seconds: float) -> Optional[Step]:
    """Run the rising rates against one server; return the best clean step (None if none)."""
    workdir = tempfile.mkdtemp(prefix="sipcps-uac-")
    best: Optional[Step] = None
    print(f"\n== {server.name} ==")
    print(f"{'rate':>6} {'ok':>7} {'failed':>7} {'wall s':>7} {'calls/s':>8} {'cpu s':>7} {'cpu %':>6} {'ms/call':>8}")
    try:
        for rate in rates:
            before = cpu_seconds(server.proc.pid)
            ok, failed, wall = run_step(server.port, rate, seconds, workdir)
            step = Step(rate, ok, failed, wall, cpu_seconds(server.proc.pid) - before)
            print(f"{rate:>6} {ok:>7} {failed:>7} {wall:>7.1f} {step.cps:>8.1f} {step.cpu_s:>7.2f} "
                  f"{100 * step.cpu_s / wall:>5.0f}% {step.cpu_ms_per_call:>8.3f}", flush=True)
            if server.proc.poll() is not None:
                print(f"{server.name} exited (code {server.proc.returncode})")
                break
            # Sustained: no failed call, and SIPp kept (nearly) the planned rate.
            if failed or step.cps < 0.9 * rate:
                break
            best = step
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return best


def summary(name: str, best: Optional[Step]) -> str:
    """``name: R calls/s (X ms CPU per call)`` or that no step passed."""
    if best is None:
        return f"{name}: no rate sustained without failures"
    return f"{name}: {best.rate} calls/s ({best.cps:.0f} achieved), {best.cpu_ms_per_call:.3f} ms CPU per call"


def measure_ours(mode: str, src: str, rates: list[int], seconds: float, workdir_parent: Optional[str]) -> Optional[Step]:
    """Start our server from ``src``, sweep it (under py-spy when asked), stop it; the best clean step."""
    workdir = tempfile.mkdtemp(prefix=f"sipcps-{mode}-", dir=workdir_parent)
    print(f"\nworking directory {workdir}", flush=True)
    server: Optional[Server] = None
    profiler: Optional[subprocess.Popen[bytes]] = None
    try:
        server = start_ours(mode, src, workdir)
        if os.environ.get(PROFILE_ENV):
            profiler = start_profiler(server.proc.pid, os.path.abspath(os.environ[PROFILE_ENV]))
        return sweep(server, rates, seconds)
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                profiler.wait(timeout=60)
            except subprocess.TimeoutExpired:
                profiler.kill()
                profiler.wait(timeout=10)
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def measure_reference(rates: list[int], seconds: float) -> Optional[Step]:
    """Sweep SIPp's own UAS."""
    port = free_port()
    uas = subprocess.Popen(["sipp", "-sn", "uas", "-i", "127.0.0.1", "-p", str(port), "-mp", str(free_port()),
                            "-nostdin", "-buff_size", "4194304"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           cwd=tempfile.gettempdir())
    server = Server("SIPp UAS (reference)", uas, port)
    try:
        # No readiness wait needed: the UAC retransmits an INVITE that arrives before SIPp binds.
        return sweep(server, rates, seconds)
    finally:
        server.stop()


def main() -> None:
    """Parse arguments, sweep each ``--src`` in turn, then the SIPp UAS reference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("daemon", "stack"), default="daemon")
    parser.add_argument("--rates", default="100,150,200,300,400,500,600,800")
    parser.add_argument("--rate", type=int, help="one rate instead of the --rates steps")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--src", action="append",
                        help="checkout the server runs from (default: this one); repeat to compare checkouts in one run")
    parser.add_argument("--workdir", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
                        help="parent of the daemon's temporary working directory (default /dev/shm)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if shutil.which("sipp") is None:
        sys.exit("sipp (Debian sip-tester) is required")
    rates = [args.rate] if args.rate else [int(r) for r in args.rates.split(",")]
    sources = [os.path.abspath(src) for src in (args.src or [REPO])]
    results = [(src, measure_ours(args.mode, src, rates, args.seconds, args.workdir)) for src in sources]
    reference = None if args.skip_reference else measure_reference(rates, args.seconds)

    print("\nhighest rate sustained with zero failed calls:")
    for src, best in results:
        print("  " + summary(f"activecall {args.mode} ({src})", best))
    if not args.skip_reference:
        print("  " + summary("SIPp UAS", reference))


if __name__ == "__main__":
    main()
