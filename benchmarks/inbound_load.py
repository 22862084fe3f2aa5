"""Inbound load: SIPp calls in with RTP audio; a webhook-driven agent plays a prompt and hangs up.

Starts the real daemon (webhook handler) on 127.0.0.1. This process is the
webhook application: for each INVITE it opens ``/call/sip?id=<dialogId>``,
accepts, plays a prompt with ``autoHangup`` and lets the daemon send BYE.
SIPp places the calls (``-r`` calls/s, ``-l`` concurrent limit) and streams
G.711 audio from a pcap. Prints concurrent calls held, calls/s, failed
calls, daemon CPU and RSS.

    python benchmarks/inbound_load.py --calls 600 --rate 40 --limit 200 --prompt-seconds 6
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import wave
from urllib.parse import quote

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))

import numpy as np  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.utils import getProcessOutputAndValue  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Site  # noqa: E402

from harness import BASE_CONFIG, free_port, start_daemon  # noqa: E402
from ws_tts_sessions import connect as raw_connect  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace) -> None:
    import socket

    workdir = tempfile.mkdtemp(prefix="ac-inbound-")
    prompt = os.path.join(workdir, "prompt.wav")
    with wave.open(prompt, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        n = int(16000 * args.prompt_seconds)
        w.writeframes((6000 * np.sin(2 * math.pi * 440 * np.arange(n) / 16000)).astype("<i2").tobytes())
    pcap = "/usr/share/sip-tester/g711a.pcap"
    shutil.copy(pcap, os.path.join(workdir, "caller.pcap"))

    answered = {"accepted": 0, "hangups": 0, "errors": 0}
    clients: list[object] = []

    async def agent(payload: dict) -> None:
        try:
            client = await raw_connect(daemon.http_port, f"/call/sip?id={quote(payload['dialogId'], safe='')}&dump=false&ping=0")
            clients.append(client)
            client.send({"command": "accept", "option": {}})
            await client.wait_event("answer", timeout_s=30)
            answered["accepted"] += 1
            client.send({"command": "play", "url": prompt, "autoHangup": True})
            await client.wait_event("hangup", timeout_s=args.prompt_seconds + 60)
            answered["hangups"] += 1
            client.transport.loseConnection()
        except Exception as e:  # counted; the benchmark reports failures, it does not stop
            answered["errors"] += 1
            print("agent error:", e, file=sys.stderr)

    class Hook(Resource):
        isLeaf = True

        def render_POST(self, request: object) -> bytes:
            defer.ensureDeferred(agent(json.loads(request.content.read())))  # type: ignore[attr-defined]
            return b'{"status":"ok"}'

    hook = reactor.listenTCP(0, Site(Hook()), interface="127.0.0.1")
    base = 20000
    config = (f"rtp_start_port = {base}\nrtp_end_port = {base + 4 * args.limit + 200}\n" + BASE_CONFIG
              + f'[handler]\ntype = "webhook"\nurl = "http://127.0.0.1:{hook.getHost().port}/hook"\n'
              + '[sip_rate_limit]\nenabled = false\n')
    daemon = await start_daemon(workdir, config)
    pid = daemon.transport.pid
    peak = {"calls": 0}

    def sample() -> None:
        peak["calls"] = max(peak["calls"], answered["accepted"] - answered["hangups"])

    sampler = task.LoopingCall(sample)
    sampler.start(0.1)
    try:
        cpu0, t0 = cpu_seconds(pid), reactor.seconds()
        out, err, code = await getProcessOutputAndValue(shutil.which("sipp"), [
            "-sf", os.path.join(HERE, "sipp", "uac_agent_hangs_up.xml"), f"127.0.0.1:{daemon.sip_port}",
            "-s", "agent", "-i", "127.0.0.1", "-p", str(free_port(socket.SOCK_DGRAM)),
            "-mp", str(free_port(socket.SOCK_DGRAM)), "-r", str(args.rate), "-l", str(args.limit),
            "-m", str(args.calls), "-nostdin", "-timeout", str(int(args.calls / args.rate + args.prompt_seconds + 120)) + "s",
            "-trace_stat", "-stf", os.path.join(workdir, "stat.csv")], env=dict(os.environ), path=workdir)
        cpu1, t1 = cpu_seconds(pid), reactor.seconds()
        text = out.decode(errors="replace")
        successful = failed = 0
        for line in text.splitlines():
            if line.strip().startswith("Successful call"):
                successful = int(line.split("|")[2].split()[0]) if line.count("|") >= 2 else 0
            if line.strip().startswith("Failed call"):
                failed = int(line.split("|")[2].split()[0]) if line.count("|") >= 2 else 0
        print(f"calls placed        {args.calls} at {args.rate}/s, limit {args.limit} concurrent, prompt {args.prompt_seconds:.0f} s")
        print(f"SIPp                successful {successful}, failed {failed} (exit code {code})")
        print(f"agent               accepted {answered['accepted']}, hung up {answered['hangups']}, errors {answered['errors']}")
        print(f"concurrent held     peak {peak['calls']} answered calls")
        print(f"throughput          {successful / (t1 - t0):.1f} calls/s over {t1 - t0:.1f} s")
        print(f"daemon CPU          {100 * (cpu1 - cpu0) / (t1 - t0):.1f} % of one core")
        print(f"daemon RSS          {rss_mb(pid):.1f} MB")
    finally:
        sampler.stop()
        hook.stopListening()
        await daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--prompt-seconds", type=float, default=6.0)
    args = parser.parse_args()
    task.react(lambda _: defer.Deferred.fromCoroutine(run(args)))


if __name__ == "__main__":
    main()
