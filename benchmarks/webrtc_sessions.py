"""N concurrent WebRTC sessions (``/call/webrtc``, aiortc clients) on the real daemon, 127.0.0.1.

Starts ``twistd -n --reactor=asyncio activecall`` with a temp config
(``codecs = ["opus","g722","pcmu","pcma","telephone_event"]``), then N aiortc
client sessions (``tests/integration/webrtc_peer.py``) split over ``--processes``
client processes.  Every session sends microphone audio (a tone, real time; for
Opus pre-encoded once and looped, so the clients spend no CPU on encoding, and
received audio measured per decoded frame without resampling) and,
once all N are connected, asks the agent to play a long WAV; during the
``--seconds`` window that follows (from one second after the play command) the script measures:

* daemon CPU % of one core (utime+stime from /proc over the window), and the
  client processes' own CPU (so a saturated client is visible);
* daemon RSS per session (VmRSS during the window minus VmRSS idle after a
  warm-up, / N) and its threads;
* agent audio loss at the clients: RTP ``packetsLost / (packetsReceived +
  packetsLost)`` from ``getStats()``, and decoded frames received vs expected
  from the window (from each session's first frame in it to its end);
* caller audio loss at the daemon: its RTCP receiver reports (our
  ``remote-inbound-rtp``);
* setup time per session: invite → answer event, and invite → peer connected
  (all N invited at once).

    python benchmarks/webrtc_sessions.py --sessions 50 --seconds 20 --processes 2

Target (2 cores): 50 concurrent Opus sessions with < 1 % frame loss.

Lost agent frames do not show as RTP loss: the daemon drops them before
packetization (its media clock catches up at most 5 frames, the leg's outbound
queue keeps 200 ms), so the RTP sequence stays continuous.  Two measures: frames
received vs expected in the window (by arrival time at the clients, so a client
stall at an edge of the window moves it by a few tenths of a percent either
way), and the frames the RTP timestamps skipped (each frame carries its media
clock slot; the queue's drops show there, the clock's own catch-up limit not).  The daemon's main thread's run-queue wait is
printed too: on a busy machine (clients included) a starved loop thread, not
the daemon's own cost, explains lost frames.  ``--inline-executor``,
``--inline-decode``, ``--executor-workers`` and ``--switch-interval`` are
experiments on the daemon's threading (patched at its start, not options of
the daemon).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
sys.path.insert(0, HERE)

from procstats import cpu_seconds, rss_mb  # noqa: E402

# The measurement window opens this long after the play command, so it holds steady playing only.
SETTLE_S = 1.0

CONFIG = """
http_addr = "127.0.0.1:{http_port}"
addr = "127.0.0.1"
udp_port = {sip_port}
log_level = "warn"
media_cache_path = "{workdir}/cache"
codecs = ["opus", "g722", "pcmu", "pcma", "telephone_event"]
[recording]
path = "{workdir}/recorders"
[api]
# Every client is 127.0.0.1, and all N handshake at once.
max_connections_per_ip = {max_connections}
"""


# --inline-decode: aiortc starts one decoder thread per receiver (a queue.Queue in, the track's asyncio
# queue out); this decodes in put() on the loop thread instead.  Patches only aiortc.rtcrtpreceiver's names.
INLINE_DECODE = """import threading, types, aiortc.rtcrtpreceiver as _r
class _InlineDecoder:
    def __init__(self):
        self.out = None; self.name = None; self.decoder = None
    def put(self, task):
        if task is None:
            self.out.put_nowait(None); return
        codec, encoded = task
        if codec.name != self.name:
            self.decoder = _r.get_decoder(codec); self.name = codec.name
        try:
            frames = self.decoder.decode(encoded)
        except _r.av.FFmpegError:
            return
        for frame in frames:
            self.out.put_nowait(frame)
class _NoThread:
    def __init__(self, target=None, name=None, args=()):
        args[1].out = args[2]
    def start(self): pass
    def join(self): pass
_r.queue = types.SimpleNamespace(Queue=_InlineDecoder)
_r.threading = types.SimpleNamespace(Thread=_NoThread, Event=threading.Event)
"""


def free_port(kind: int) -> int:
    import socket

    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def runqueue_wait_s(pid: int) -> float:
    """Seconds the daemon's main thread spent runnable but waiting for a CPU (/proc schedstat)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def main_thread_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


# ---------------------------------------------------------------------------
# a client process: --worker


async def worker(args: argparse.Namespace) -> None:
    """Run this process's sessions: READY once all are connected, GO on stdin starts the plays."""
    from webrtc_peer import opus_packets, run_session

    # The client's own Opus encoding would cost as much as the daemon's: encode the mic once.
    packets = opus_packets() if args.codec == "opus" and not args.encode else None
    sids = [f"{args.sid}-{i}" for i in range(args.first, args.first + args.count)]
    ready = [asyncio.Event() for _ in sids]
    start = asyncio.Event()
    play = [] if args.silent_agent else [{"command": "play", "url": args.wav, "playId": "bench"}]
    tasks = [asyncio.ensure_future(run_session(args.url, sid, seconds=args.seconds, codec=args.codec,
                                               trickle=args.trickle, commands=play, query="dump=false&ping=0",
                                               timeout_s=60, mic_packets=packets, light=True, ready=ev,
                                               start=start, settle_s=SETTLE_S))
             for sid, ev in zip(sids, ready)]
    # A session that fails before connecting never sets its event: wait for "ready or finished".
    await asyncio.gather(*(asyncio.wait([asyncio.ensure_future(ev.wait()), t], return_when=asyncio.FIRST_COMPLETED)
                           for ev, t in zip(ready, tasks)))
    print(f"READY {sum(ev.is_set() for ev in ready)}", flush=True)
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "GO":
        raise SystemExit("no GO")
    start.set()
    for report in await asyncio.gather(*tasks):
        print(json.dumps(report), flush=True)
    print("END", flush=True)


# ---------------------------------------------------------------------------
# the measuring side


class Client:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.reports: list[dict[str, Any]] = []

    async def line(self, timeout_s: float) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not raw:
            raise RuntimeError(f"client {self.proc.pid} ended early (exit {await self.proc.wait()})")
        return raw.decode().strip()


async def spawn_client(args: argparse.Namespace, url: str, wav: str, first: int, count: int) -> Client:
    nice = ["nice", "-n", str(args.client_nice)] if args.client_nice else []
    proc = await asyncio.create_subprocess_exec(
        *nice, sys.executable, os.path.abspath(__file__), "--worker", "--url", url, "--sid", "bench", "--first", str(first),
        "--count", str(count), "--seconds", str(args.seconds), "--codec", args.codec, "--wav", wav,
        *(["--trickle"] if args.trickle else []), *(["--encode"] if args.encode else []),
        *(["--silent-agent"] if args.silent_agent else []),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    return Client(proc)


async def start_daemon(workdir: str, sessions: int, switch_interval: Optional[float] = None,
                       executor_workers: Optional[int] = None,
                       inline_executor: bool = False, inline_decode: bool = False) -> tuple[subprocess.Popen, int, Any]:
    http_port = free_port(1)
    sip_port = free_port(2)
    conf = os.path.join(workdir, "activecall.toml")
    with open(conf, "w") as f:
        f.write(CONFIG.format(http_port=http_port, sip_port=sip_port, workdir=workdir,
                              max_connections=max(64, sessions + 16)))
    log = open(os.path.join(workdir, "daemon.log"), "w+")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1"}
    boot = "from twisted.scripts.twistd import run; run()"
    if switch_interval is not None:  # an experiment: the GIL hand-over interval (Python's default 5 ms)
        boot = f"import sys; sys.setswitchinterval({switch_interval}); " + boot
    if inline_executor:  # an experiment: loop.run_in_executor(None, f) runs f on the loop thread (aiortc's encodes)
        boot = ("import asyncio; _rie = asyncio.BaseEventLoop.run_in_executor\n"
                "def _inline(self, executor, func, *args):\n"
                "    if executor is not None: return _rie(self, executor, func, *args)\n"
                "    f = self.create_future()\n"
                "    try: f.set_result(func(*args))\n"
                "    except BaseException as e: f.set_exception(e)\n"
                "    return f\n"
                "asyncio.BaseEventLoop.run_in_executor = _inline\n" + boot)
    if inline_decode:  # an experiment: aiortc's per-receiver decoder thread replaced by decoding on the loop
        boot = INLINE_DECODE + boot
    if executor_workers is not None:  # an experiment: thread pools made without max_workers get this many
        boot = ("import concurrent.futures.thread as t; _init = t.ThreadPoolExecutor.__init__; "
                f"t.ThreadPoolExecutor.__init__ = lambda self, max_workers=None, *a, **k: "
                f"_init(self, max_workers or {executor_workers}, *a, **k); " + boot)
    proc = subprocess.Popen([sys.executable, "-c", boot, "-n",
                             "--reactor=asyncio", "--pidfile=", "activecall", "--conf", conf],
                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:  # ready once /health answers (log_level warn: no "ready" line)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
            writer.write(b"GET /health HTTP/1.0\r\n\r\n")
            up = b" 200 " in await reader.read()
            writer.close()
            if up:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            with open(log.name) as f:
                raise SystemExit(f"daemon did not start:\n{f.read()}")
        await asyncio.sleep(0.05)
    return proc, http_port, log


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run(args: argparse.Namespace) -> None:
    from webrtc_peer import run_session, write_tone_wav

    workdir = tempfile.mkdtemp(prefix="ac-bench-webrtc-")
    # `play` reads local files only under [fetch] media_dirs (./config/media of the daemon's directory).
    media = os.path.join(workdir, "config", "media")
    os.makedirs(media)
    wav = os.path.join(media, "agent.wav")
    write_tone_wav(wav, args.seconds + 60, hz=660)
    daemon, http_port, log = await start_daemon(workdir, args.sessions, args.switch_interval, args.executor_workers,
                                                args.inline_executor, args.inline_decode)
    pid = daemon.pid
    url = f"ws://127.0.0.1:{http_port}"
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    clients: list[Client] = []
    try:
        # Warm-up in this process: the file decoded into the media cache, the daemon's executor threads.
        warm = await asyncio.gather(*(run_session(url, f"warm-{i}", seconds=1.0, codec=args.codec,
                                                  commands=[{"command": "play", "url": wav, "playId": "w"}],
                                                  query="dump=false&ping=0") for i in range(3)))
        for r in warm:
            if r["errors"]:
                raise SystemExit(f"warm-up session failed: {r['errors']}")
        await asyncio.sleep(3)  # let the warm-up peers' threads finish (they linger ~2 s after close)
        rss_idle, threads_idle = rss_mb(pid), threads(pid)

        t_setup = time.monotonic()
        per = [args.sessions // args.processes + (1 if i < args.sessions % args.processes else 0)
               for i in range(args.processes)]
        first = 0
        for count in per:
            clients.append(await spawn_client(args, url, wav, first, count))
            first += count
        ready = 0
        for c in clients:
            line = await c.line(120)
            if not line.startswith("READY "):
                raise SystemExit(f"client said {line!r}")
            ready += int(line.split()[1])
        setup_wall = time.monotonic() - t_setup

        def client_cpu() -> float:
            return sum(cpu_seconds(c.proc.pid) for c in clients)

        for c in clients:
            assert c.proc.stdin is not None
            c.proc.stdin.write(b"GO\n")
            await c.proc.stdin.drain()
        await asyncio.sleep(SETTLE_S)
        wait0, main0 = runqueue_wait_s(pid), main_thread_cpu_s(pid)
        cpu0, ccpu0, t0 = cpu_seconds(pid), client_cpu(), time.monotonic()
        await asyncio.sleep(args.seconds * 0.5)
        rss_mid, threads_mid = rss_mb(pid), threads(pid)
        await asyncio.sleep(args.seconds * 0.5)
        cpu1, ccpu1, t1 = cpu_seconds(pid), client_cpu(), time.monotonic()
        wait1, main1 = runqueue_wait_s(pid), main_thread_cpu_s(pid)
        rss_end = rss_mb(pid)

        reports: list[dict[str, Any]] = []
        for c in clients:
            while True:
                line = await c.line(120)
                if line == "END":
                    break
                if line.startswith("{"):
                    reports.append(json.loads(line))
            await c.proc.wait()
    finally:
        for c in clients:
            if c.proc.returncode is None:
                c.proc.kill()
                await c.proc.wait()
        stop(daemon)
        log.close()
        if args.keep:
            print(f"daemon directory      {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    ok = [r for r in reports if not r["errors"]]
    failed = [r for r in reports if r["errors"]]
    received = sum(r["stats"]["inbound"]["packetsReceived"] for r in ok if r.get("stats", {}).get("inbound"))
    lost = sum(max(0, r["stats"]["inbound"]["packetsLost"]) for r in ok if r.get("stats", {}).get("inbound"))
    frames = sum(r["audio"].get("window_frames", 0) for r in ok)
    expected = sum(r["audio"].get("window_expected", 0) for r in ok)
    skipped = sum(r["audio"].get("window_skipped", 0) for r in ok)
    sound = sum(r["audio"]["sound_ms"] for r in ok)
    remote = [r["stats"]["remote_inbound"] for r in ok if r.get("stats", {}).get("remote_inbound")]
    r_received = sum(x["packetsReceived"] for x in remote)
    r_lost = sum(max(0, x["packetsLost"]) for x in remote)
    sent = sum(r["stats"]["outbound"]["packetsSent"] for r in ok if r.get("stats", {}).get("outbound"))
    setup = [r["setup_ms"] for r in ok if "setup_ms" in r]
    answer = [r["answer_ms"] for r in ok if "answer_ms" in r]
    jitter = [r["stats"]["inbound"]["jitter"] for r in ok if r.get("stats", {}).get("inbound")]
    window = t1 - t0
    if args.switch_interval is not None:
        print(f"daemon GIL interval   sys.setswitchinterval({args.switch_interval})")
    if args.executor_workers is not None:
        print(f"daemon thread pools   {args.executor_workers} workers")
    if args.inline_executor:
        print("daemon executor       inline (run_in_executor(None, ...) on the loop thread)")
    if args.inline_decode:
        print("daemon decoding       inline (no aiortc decoder thread per receiver)")
    print(f"sessions              {args.sessions} ({args.codec}{', trickle' if args.trickle else ''}), "
          f"{len(ok)} ok, {len(failed)} failed, {ready} connected before the window")
    print(f"client processes      {args.processes}: {100 * (ccpu1 - ccpu0) / window:.1f} % of one core in all "
          f"({100 * (ccpu1 - ccpu0) / window / args.processes:.1f} % each)")
    print(f"window                {window:.1f} s")
    print(f"daemon CPU            {100 * (cpu1 - cpu0) / window:.1f} % of one core "
          f"({100 * (cpu1 - cpu0) / window / max(1, args.sessions):.2f} % per session)")
    print(f"daemon main thread    on a CPU {100 * (main1 - main0) / window:.1f} % of the window, runnable but "
          f"waiting for a CPU {100 * (wait1 - wait0) / window:.1f} % (the machine's other load; GIL waits are neither)")
    print(f"daemon RSS            idle {rss_idle:.1f} MB, window {rss_mid:.1f}/{rss_end:.1f} MB: "
          f"{(rss_end - rss_idle) / max(1, args.sessions):.2f} MB per session")
    print(f"daemon threads        idle {threads_idle}, window {threads_mid}")
    print(f"agent audio loss      RTP {100 * lost / max(1, received + lost):.3f} % ({lost} of {received + lost} packets); "
          f"frames {frames} of {expected} expected in the window ({100 * (1 - frames / max(1, expected)):.3f} % missing)")
    print(f"agent frames dropped  {skipped} skipped in the RTP timestamps "
          f"({100 * skipped / max(1, frames + skipped):.3f} %: frames the daemon dropped before sending)")
    print(f"agent audio heard     {sound / 1000 / max(1, len(ok)):.1f} s of tone per session; "
          f"jitter p50 {pct(jitter, 50):.0f} p99 {pct(jitter, 99):.0f} (RTP clock units)")
    print(f"caller audio loss     {100 * r_lost / max(1, r_received + r_lost):.3f} % at the daemon (its RTCP reports: "
          f"{r_lost} lost of {r_received + r_lost}; {sent} packets sent)")
    print(f"setup per session     invite->answer p50 {pct(answer, 50):.0f} ms p95 {pct(answer, 95):.0f} ms; "
          f"invite->connected p50 {pct(setup, 50):.0f} ms p95 {pct(setup, 95):.0f} ms max {max(setup, default=0):.0f} ms "
          f"({setup_wall:.1f} s for all {args.sessions})")
    print(f"load average          {' '.join(f'{x:.2f}' for x in os.getloadavg())} (before: {load_before})")
    for r in failed[:5]:
        print(f"failed {r['sid']}: {r['errors']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--processes", type=int, default=2, help="client processes the sessions are split over")
    p.add_argument("--codec", default="opus", choices=["opus", "g722", "pcmu", "pcma"])
    p.add_argument("--trickle", action="store_true")
    p.add_argument("--client-nice", type=int, default=0,
                   help="run the clients at this nice level, so that on a small machine they yield to the daemon")
    p.add_argument("--silent-agent", action="store_true",
                   help="the agent plays nothing (a listening agent: it sends silence all the time)")
    p.add_argument("--encode", action="store_true", help="clients encode their mic audio (default: pre-encoded Opus)")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="run the daemon with sys.setswitchinterval(S) (an experiment; default Python's 0.005)")
    p.add_argument("--executor-workers", type=int, default=None,
                   help="the daemon's default thread pools get this many workers (an experiment; default "
                        "min(32, cores + 4) = 6 here: aiortc encodes every outgoing frame in the loop's pool)")
    p.add_argument("--inline-executor", action="store_true",
                   help="the daemon's loop.run_in_executor(None, ...) runs on the loop thread (an experiment: "
                        "aiortc's per-frame encodes without a thread hand-over)")
    p.add_argument("--inline-decode", action="store_true",
                   help="the daemon decodes caller audio on the loop thread instead of aiortc's decoder thread per "
                        "receiver (an experiment)")
    p.add_argument("--keep", action="store_true", help="keep the daemon's temp directory (config, log)")
    p.add_argument("--json", default=None, help="write every session report to this file")
    # the client-process side
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--sid", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--wav", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        asyncio.run(worker(args))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
