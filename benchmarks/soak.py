"""Soak: SIPp holds N concurrent calls with audio both ways for M minutes through the webhook handler.

Starts the real daemon (webhook handler, shipped limits) on 127.0.0.1. This process is the
webhook application: for every INVITE it opens ``/call/sip?id=<dialogId>``, accepts and plays
a prompt as long as the call with ``autoHangup``, so the daemon sends BYE. SIPp keeps
``--calls`` calls up (``-l``), each streaming G.711 audio from a pcap for the whole call.

Prints failed calls, daemon RSS over time (growth from the end of the warm-up to the end of
the run; target < 5 %), and open descriptors and UDP (RTP) ports before the run and after
the last call ended (target: back to baseline).

    python benchmarks/soak.py --calls 100 --minutes 10
"""

from __future__ import annotations

import argparse
import json
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

from harness import BASE_CONFIG, free_port, http_client, start_daemon  # noqa: E402
from procstats import fd_kinds, open_fds, rss_mb, tcp_remote_ports, udp_ports  # noqa: E402
from agent import WebhookAgent, write_tone  # noqa: E402

PCAP = "/usr/share/sip-tester/g711a.pcap"
PCAP_SECONDS = 8  # g711a.pcap plays for just under 8 s

_INVITE_ACK = os.path.join(HERE, "sipp", "uac_agent_hangs_up.xml")


def caller_scenario(call_s: float) -> str:
    """The load caller: INVITE, ACK, the pcap replayed for the whole call, then the agent's BYE."""
    with open(_INVITE_ACK) as f:
        text = f.read()
    plays = max(1, int((call_s - 4) // PCAP_SECONDS))
    one = ('  <nop><action><exec play_pcap_audio="caller.pcap"/></action></nop>\n'
           f'  <pause milliseconds="{PCAP_SECONDS * 1000}"/>\n')
    start = text.index("  <nop>")
    end = text.index('  <recv request="BYE"')
    text = text[:start] + one * plays + text[end:]
    return text.replace('timeout="60000"', f'timeout="{int(call_s * 1000 + 60000)}"')


async def active_calls(base_url: str) -> int:
    client = http_client()
    response = await client.get(base_url + "/list")
    return len(json.loads(await response.content())["active_calls"])


async def run(args: argparse.Namespace) -> None:
    workdir = tempfile.mkdtemp(prefix="ac-soak-")
    prompt = os.path.join(workdir, "media", "prompt.wav")
    write_tone(prompt, args.call_seconds)
    shutil.copy(PCAP, os.path.join(workdir, "caller.pcap"))
    scenario = os.path.join(workdir, "caller.xml")
    with open(scenario, "w") as f:
        f.write(caller_scenario(args.call_seconds))

    agent = WebhookAgent(prompt, args.call_seconds + 60)
    base = 20000
    config = (f"rtp_start_port = {base}\nrtp_end_port = {base + 4 * args.calls + 200}\n" + BASE_CONFIG
              + agent.webhook_config + '[fetch]\nmedia_dirs = ["{workdir}/media"]\n')
    daemon = await start_daemon(workdir, config)
    agent.http_port = daemon.http_port
    pid = daemon.transport.pid
    rate = args.calls / args.call_seconds
    total = max(args.calls, int(args.minutes * 60 * rate))
    samples: list[tuple[float, float, int]] = []
    t0 = reactor.seconds()

    def sample() -> None:
        samples.append((reactor.seconds() - t0, rss_mb(pid), agent.in_call))

    await active_calls(daemon.base_url)  # the baseline includes what serving one request opens
    fds_before, kinds_before, ports_before = open_fds(pid), fd_kinds(pid), udp_ports(pid)
    sampler = task.LoopingCall(sample)
    sampler.start(10.0)
    try:
        out, _err, code = await getProcessOutputAndValue(shutil.which("sipp"), [
            "-sf", scenario, f"127.0.0.1:{daemon.sip_port}", "-s", "agent", "-i", "127.0.0.1",
            "-p", str(free_port(socket.SOCK_DGRAM)), "-mp", str(free_port(socket.SOCK_DGRAM)),
            "-r", f"{rate:.3f}", "-l", str(args.calls), "-m", str(total), "-nostdin",
            "-timeout", f"{int(args.minutes * 60 + args.call_seconds * 2 + 300)}s"],
            env=dict(os.environ), path=workdir)
        sampler.stop()
        elapsed = reactor.seconds() - t0
        # Everything the calls held must be released: wait (with a deadline) for the last one.
        deadline = reactor.seconds() + 30
        while await active_calls(daemon.base_url) and reactor.seconds() < deadline:
            await task.deferLater(reactor, 0.5, lambda: None)
        # The /list connections above close a moment later: wait for them too, with a deadline.
        deadline = reactor.seconds() + 10
        while open_fds(pid) > fds_before and reactor.seconds() < deadline:
            await task.deferLater(reactor, 0.2, lambda: None)
        fds_after, kinds_after, ports_after = open_fds(pid), fd_kinds(pid), udp_ports(pid)
        successful = failed = 0
        for line in out.decode(errors="replace").splitlines():
            cells = line.split("|")
            if line.strip().startswith("Successful call") and len(cells) >= 3:
                successful = int(cells[2].split()[0])
            if line.strip().startswith("Failed call") and len(cells) >= 3:
                failed = int(cells[2].split()[0])
        warm = [s for s in samples if s[0] >= args.call_seconds * 1.5] or samples
        rss_start, rss_end = warm[0][1], warm[-1][1]
        growth = 100 * (rss_end - rss_start) / rss_start if rss_start else 0.0
        print(f"load                {args.calls} concurrent calls of {args.call_seconds:.0f} s, {total} calls, {elapsed / 60:.1f} min")
        print(f"SIPp                successful {successful}, failed {failed} (exit code {code})")
        print(f"agent               accepted {agent.counts['accepted']}, hung up {agent.counts['hangups']}, "
              f"errors {agent.counts['errors']}")
        print(f"concurrent held     peak {max(s[2] for s in samples) if samples else 0} answered calls")
        print("RSS over time       " + ", ".join(f"{t:.0f}s {m:.0f}MB" for t, m, _ in samples[:: max(1, len(samples) // 12)]))
        print(f"RSS growth          {rss_start:.1f} MB -> {rss_end:.1f} MB after warm-up: {growth:+.2f} % (target < 5 %)")
        print(f"descriptors         {fds_before} before {kinds_before}, {fds_after} after {kinds_after}")
        print(f"UDP ports           {len(ports_before)} before, {len(ports_after)} after "
              f"({sorted(set(ports_after) - set(ports_before))[:10]} new)")
        # The daemon's HTTP client keeps up to two idle keep-alive connections to the webhook.
        pooled = min(2, tcp_remote_ports(pid).count(agent.port.getHost().port))
        kinds_after["tcp"] = kinds_after.get("tcp", 0) - pooled
        print(f"                    ({pooled} idle keep-alive connection(s) to the webhook not counted)")
        held = ("tcp", "udp", "file", "socket")
        ok = (failed == 0 and agent.counts["errors"] == 0 and growth < 5.0 and len(ports_after) <= len(ports_before)
              and all(kinds_after.get(k, 0) <= kinds_before.get(k, 0) for k in held))
        print("result              " + ("PASS" if ok else "FAIL"))
    finally:
        if sampler.running:
            sampler.stop()
        agent.stop()
        await daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="concurrent calls")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--call-seconds", type=float, default=60.0)
    args = parser.parse_args()
    task.react(lambda _: defer.Deferred.fromCoroutine(run(args)))


if __name__ == "__main__":
    main()
