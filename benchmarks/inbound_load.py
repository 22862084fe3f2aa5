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
import os
import shutil
import socket
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
sys.path.insert(0, HERE)

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.utils import getProcessOutputAndValue  # noqa: E402

from agent import WebhookAgent, write_tone  # noqa: E402
from harness import BASE_CONFIG, free_port, start_daemon  # noqa: E402
from procstats import cpu_seconds, rss_mb  # noqa: E402


async def run(args: argparse.Namespace) -> None:
    workdir = tempfile.mkdtemp(prefix="ac-inbound-")
    prompt = os.path.join(workdir, "media", "prompt.wav")
    write_tone(prompt, args.prompt_seconds)
    shutil.copy("/usr/share/sip-tester/g711a.pcap", os.path.join(workdir, "caller.pcap"))
    agent = WebhookAgent(prompt, args.prompt_seconds + 60, query="dump=false&ping=0")
    answered = agent.counts
    base = 20000
    config = (f"rtp_start_port = {base}\nrtp_end_port = {base + 4 * args.limit + 200}\n" + BASE_CONFIG
              + agent.webhook_config + '[fetch]\nmedia_dirs = ["{workdir}/media"]\n'
              + '[sip_rate_limit]\nenabled = false\n')
    daemon = await start_daemon(workdir, config)
    agent.http_port = daemon.http_port
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
        agent.stop()
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
