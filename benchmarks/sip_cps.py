"""SIP call rate benchmark: SIPp UAC against the daemon's user agent answering INVITEs.

Each call is INVITE → 200 (with SDP) → ACK → BYE → 200, no media.  The rate
rises step by step (``--rates``); each step runs ``--seconds`` of calls and
passes when every call succeeded.  The same steps are run against SIPp's own
UAS (``-sn uas``) as the reference.  Printed: per step the successful/failed
calls and the server's CPU (user+system seconds per wall second, from
/proc/<pid>/stat); at the end the highest rate sustained with zero failed calls.

Usage::

    python benchmarks/sip_cps.py [--rates 100,200,300,...] [--seconds 10]

The daemon side runs in a child process (``--serve PORT``) on the default
(epoll) reactor, so its CPU is measured on its own.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_udp_port() -> int:
    """A currently free UDP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def serve(port: int) -> None:
    """Child mode: run the SIP service answering every INVITE until killed."""
    import gc
    import random

    from twisted.internet import reactor

    from activecall.config import Config
    from activecall.ids import IdSource
    from activecall.sip.service import build_sip_service
    from activecall.testing_sip import AutoAnswerHandler

    service = build_sip_service(Config(addr="127.0.0.1", udp_port=port), reactor,
                                IdSource(random.Random()), AutoAnswerHandler(keep=False))
    service.startService()
    gc.freeze()  # start-up objects never need collecting again
    print("ready", flush=True)
    reactor.run()


def wait_ready(proc: subprocess.Popen[str], timeout_s: float = 20.0) -> None:
    """Wait for the child's "ready" line (or fail)."""
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == "ready":
            return
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
    raise RuntimeError("server did not start")


def run_step(target_port: int, rate: int, seconds: float, workdir: str) -> tuple[int, int, float]:
    """One SIPp UAC run at ``rate`` calls/s; returns (successful, failed, wall seconds)."""
    for old in glob.glob(os.path.join(workdir, "*.csv")):
        os.remove(old)
    calls = int(rate * seconds)
    argv = ["sipp", "-sn", "uac", f"127.0.0.1:{target_port}", "-i", "127.0.0.1",
            "-p", str(free_udp_port()), "-r", str(rate), "-m", str(calls), "-d", "0",
            "-l", str(max(rate * 4, 100)), "-recv_timeout", "5000", "-timeout", str(int(seconds * 3 + 30)),
            "-nostdin", "-trace_stat", "-fd", "1", "-buff_size", "4194304"]
    start = time.monotonic()
    subprocess.run(argv, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=seconds * 4 + 60, check=False)
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


def sweep(name: str, port: int, pid: int, rates: list[int], seconds: float) -> int:
    """Run the rising rates against one server; return the best clean rate."""
    workdir = tempfile.mkdtemp(prefix=f"sipcps-{name}-")
    best = 0
    print(f"\n== {name} ==")
    print(f"{'rate':>6} {'ok':>7} {'failed':>7} {'wall s':>7} {'cpu s':>7} {'cpu %':>6}")
    for rate in rates:
        before = cpu_seconds(pid)
        ok, failed, wall = run_step(port, rate, seconds, workdir)
        used = cpu_seconds(pid) - before
        print(f"{rate:>6} {ok:>7} {failed:>7} {wall:>7.1f} {used:>7.2f} {100 * used / wall:>5.0f}%", flush=True)
        if failed:
            break
        # Sustained: SIPp finished the step in about the planned time (not lagging behind).
        if wall <= seconds * 1.25 + 2:
            best = rate
        else:
            break
    shutil.rmtree(workdir, ignore_errors=True)
    return best


def main() -> None:
    """Parse arguments and run both sweeps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100,200,300,400,500,600,800,1000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if shutil.which("sipp") is None:
        sys.exit("sipp (Debian sip-tester) is required")
    rates = [int(r) for r in args.rates.split(",")]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))

    port = free_udp_port()
    daemon = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(port)],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        wait_ready(daemon)
        ours = sweep("activecall SipUserAgent", port, daemon.pid, rates, args.seconds)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=20)

    reference = None
    if not args.skip_reference:
        port = free_udp_port()
        uas = subprocess.Popen(["sipp", "-sn", "uas", "-i", "127.0.0.1", "-p", str(port), "-nostdin",
                                "-buff_size", "4194304"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
        try:
            # No readiness wait needed: the UAC retransmits an INVITE that arrives before SIPp binds.
            reference = sweep("SIPp UAS (reference)", port, uas.pid, rates, args.seconds)
        finally:
            uas.send_signal(signal.SIGTERM)
            uas.wait(timeout=20)

    print(f"\nhighest sustained rate with zero failed calls: activecall {ours} calls/s"
          + (f", SIPp UAS {reference} calls/s" if reference is not None else ""))


if __name__ == "__main__":
    main()
