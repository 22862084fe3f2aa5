"""Inbound load: SIPp calls in with RTP audio; a webhook-driven agent plays a prompt and hangs up.

Starts the real daemon (webhook handler) on 127.0.0.1. This process is the
webhook application: for each INVITE it opens ``/call/sip?id=<dialogId>``,
accepts, plays a prompt with ``autoHangup`` and lets the daemon send BYE.
SIPp places the calls (``-r`` calls/s, ``-l`` concurrent limit) and streams
G.711 audio from a pcap. Prints concurrent calls held, calls/s, failed
calls, daemon CPU and RSS (at the end and the peak), and the media tick
lateness from the daemon's ``/metrics``; then the same for the "held" window
(all ``--limit`` calls up, until the first hangup: no setups or teardowns),
with the daemon's busiest threads and how busy the whole machine was.

``--vad`` accepts every call with ``"vad": {"type": "silero"}`` (the caller's
pcap goes through batched Silero VAD); ``--asr PROVIDER`` adds
``"asr": {"provider": PROVIDER}``.  SIPp's own ``g711a.pcap`` lasts 7 s;
``--caller-seconds S`` has each caller speak instead for S seconds (espeak-ng
sentences and pauses as PCMA), so VAD and ASR work for the whole call.

    python benchmarks/inbound_load.py --calls 600 --rate 40 --limit 200 --prompt-seconds 6
    python benchmarks/inbound_load.py --vad --calls 300 --rate 30 --limit 300 --prompt-seconds 30 --caller-seconds 32
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import wave
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.utils import getProcessOutputAndValue  # noqa: E402

from agent import WebhookAgent, write_tone  # noqa: E402
from harness import BASE_CONFIG, free_port, http_client, start_daemon  # noqa: E402
from procstats import cpu_seconds, rss_mb  # noqa: E402


def write_speech_pcap(path: str, seconds: float) -> None:
    """A caller talking for ``seconds``: espeak-ng sentences with 1 s pauses, as 20 ms PCMA RTP."""
    from media_peer import RtpStream, g711_rtp_packets, write_rtp_pcap

    from activecall.media.resample import Resampler

    wav = os.path.join(os.path.dirname(path), "caller.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", wav,
                    "Hello, I am calling about my order. It has not arrived yet. Could you check it for me?"],
                   check=True, capture_output=True)
    with wave.open(wav, "rb") as w:
        resampler = Resampler(w.getframerate(), 8000)
        talk = resampler.process(w.readframes(w.getnframes())) + resampler.flush() + bytes(16000)
    pcm = talk * (int(seconds * 16000 / len(talk)) + 1)
    write_rtp_pcap(path, g711_rtp_packets(RtpStream(), pcm[:int(seconds * 8000) * 2]))


def thread_cpu(pid: int) -> dict[str, tuple[str, float]]:
    """CPU seconds of each thread of ``pid`` (tid -> (name, user + system))."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, rest = f.read().rsplit(")", 1)
        except OSError:
            continue
        fields = rest.split()
        out[tid] = (head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK"), sum(values) / os.sysconf("SC_CLK_TCK")


async def media_metrics(port: int) -> dict[str, float]:
    """The daemon's media tick lateness histogram (``le`` -> cumulative count) and late tick/frame counters."""
    response = await http_client().get(f"http://127.0.0.1:{port}/metrics")
    text = (await response.content()).decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("activecall_media_tick_lateness_seconds_bucket"):
            values[line.split('le="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(("activecall_media_late_ticks", "activecall_media_late_frames")):
            values[line.split(" ", 1)[0].removesuffix("_total")] = float(line.rsplit(" ", 1)[1])
    return values


def lateness(before: dict[str, float], after: dict[str, float]) -> str:
    """Tick lateness between two :func:`media_metrics` snapshots: bucket quantiles and ticks later than a frame."""
    buckets = sorted((float(le), after[le] - before.get(le, 0.0)) for le in after if le[0].isdigit() or le == "+Inf")
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return "no ticks"

    def quantile(q: float) -> str:
        le = next(le for le, count in buckets if count >= q * total)
        return f"<= {le * 1000:g} ms" if le != float("inf") else "> 1 s"

    within_frame = next(count for le, count in buckets if le >= 0.02)
    late = {k: int(after.get(k, 0) - before.get(k, 0)) for k in ("activecall_media_late_ticks", "activecall_media_late_frames")}
    return (f"p50 {quantile(0.5)}, p99 {quantile(0.99)}, p99.9 {quantile(0.999)}; {int(total - within_frame)} of "
            f"{int(total)} ticks > 20 ms late; late ticks {late['activecall_media_late_ticks']}, "
            f"late frames {late['activecall_media_late_frames']}")


async def run(args: argparse.Namespace) -> None:
    workdir = tempfile.mkdtemp(prefix="ac-inbound-")
    prompt = os.path.join(workdir, "media", "prompt.wav")
    write_tone(prompt, args.prompt_seconds)
    if args.caller_seconds:
        write_speech_pcap(os.path.join(workdir, "caller.pcap"), args.caller_seconds)
    else:
        shutil.copy("/usr/share/sip-tester/g711a.pcap", os.path.join(workdir, "caller.pcap"))
    option: dict = {}
    if args.vad:
        option["vad"] = {"type": "silero"}
    if args.asr:
        option["asr"] = {"provider": args.asr}
    agent = WebhookAgent(prompt, args.prompt_seconds + 60, query="dump=false&ping=0", accept_option=option)
    answered = agent.counts
    base = 20000
    config = (f"rtp_start_port = {base}\nrtp_end_port = {base + 4 * args.limit + 200}\n" + BASE_CONFIG
              + agent.webhook_config + '[fetch]\nmedia_dirs = ["{workdir}/media"]\n'
              + '[sip_rate_limit]\nenabled = false\n')
    daemon = await start_daemon(workdir, config)
    agent.http_port = daemon.http_port
    pid = daemon.transport.pid
    peak = {"calls": 0, "rss": 0.0}
    # The "held" window: from all ``--limit`` calls up to the first hangup after that (no setups, no teardowns).
    held: dict[str, Any] = {}

    def snapshot() -> tuple[float, float, defer.Deferred, dict[str, tuple[str, float]], tuple[float, float]]:
        return (reactor.seconds(), cpu_seconds(pid), defer.ensureDeferred(media_metrics(daemon.http_port)),
                thread_cpu(pid), machine_busy())

    def sample() -> None:
        in_call = answered["accepted"] - answered["hangups"]
        peak["calls"] = max(peak["calls"], in_call)
        peak["rss"] = max(peak["rss"], rss_mb(pid))
        if "from" not in held and in_call >= args.limit:
            held["from"], held["hangups"] = snapshot(), answered["hangups"]
        elif "from" in held and "to" not in held and answered["hangups"] > held["hangups"]:
            held["to"] = snapshot()

    sampler = task.LoopingCall(sample)
    sampler.start(0.1)
    try:
        cpu0, t0 = cpu_seconds(pid), reactor.seconds()
        metrics0 = await media_metrics(daemon.http_port)
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
        print(f"calls placed        {args.calls} at {args.rate}/s, limit {args.limit} concurrent, prompt {args.prompt_seconds:.0f} s, "
              f"accept option {option or '{}'}")
        print(f"SIPp                successful {successful}, failed {failed} (exit code {code})")
        print(f"agent               accepted {answered['accepted']}, hung up {answered['hangups']}, errors {answered['errors']}")
        if args.vad:
            print(f"VAD                 {answered['speaking']} speaking events over {answered['hangups']} calls")
        print(f"concurrent held     peak {peak['calls']} answered calls")
        print(f"throughput          {successful / (t1 - t0):.1f} calls/s over {t1 - t0:.1f} s")
        print(f"daemon CPU          {100 * (cpu1 - cpu0) / (t1 - t0):.1f} % of one core")
        print(f"daemon RSS          {rss_mb(pid):.1f} MB at the end, peak {peak['rss']:.1f} MB")
        print(f"media tick lateness {lateness(metrics0, await media_metrics(daemon.http_port))} (whole run)")
        if "to" in held:
            (ta, ca, ma, tha, busy_a), (tb, cb, mb, thb, busy_b) = held["from"], held["to"]
            print(f"held window         {tb - ta:.1f} s with {args.limit} calls up: daemon CPU "
                  f"{100 * (cb - ca) / (tb - ta):.1f} % of one core; machine {100 * (busy_b[0] - busy_a[0]) / (busy_b[1] - busy_a[1]):.0f} % busy "
                  f"({os.cpu_count()} CPUs)")
            busiest = sorted(((thb[t][1] - tha.get(t, ("", 0.0))[1], t, thb[t][0]) for t in thb), reverse=True)[:3]
            print("  daemon threads    " + ", ".join(
                f"{name} {tid}{' (main)' if tid == str(pid) else ''} {100 * sec / (tb - ta):.0f} %" for sec, tid, name in busiest))
            print(f"  tick lateness     {lateness(await ma, await mb)}")
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
    parser.add_argument("--vad", action="store_true", help='accept calls with "vad": {"type": "silero"}')
    parser.add_argument("--caller-seconds", type=float, default=0.0,
                        help="callers speak espeak-ng sentences this long (default: SIPp's 7 s g711a.pcap)")
    parser.add_argument("--asr", default=None, metavar="PROVIDER", help='accept calls with "asr": {"provider": PROVIDER}')
    args = parser.parse_args()
    task.react(lambda _: defer.Deferred.fromCoroutine(run(args)))


if __name__ == "__main__":
    main()
