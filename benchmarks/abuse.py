"""Abuse: floods against a daemon with the shipped limits, while real calls and probes run.

Starts the real daemon (webhook handler, the shipped ``[api]``/``[sip_limits]``/rate limits) on
127.0.0.1. Attackers send from other loopback addresses (127.0.0.2 and up), so per-source limits
apply to them and not to the legitimate clients on 127.0.0.1. While the floods run:

* WebSocket ``/call`` sessions stream agent audio (20 ms PCM frames) and SIPp keeps SIP calls
  with audio up through the webhook agent: their frame rate, longest gap and failed calls;
* ``GET /health`` every 200 ms and a SIP OPTIONS every 500 ms: answered or not, latency.

Phases: malformed UDP; INVITEs without ACK from one source, then from many; idle WebSocket
sessions that never answer Pings; trickling HTTP connections. After the last one, the daemon
must return to its baseline (sessions, descriptors, UDP ports, RSS).

    python benchmarks/abuse.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


# -- attack workers: plain sockets in their own process, so the measuring reactor stays free --

def _sources(n: int, first: int) -> list[str]:
    return [f"127.0.{(first + i) // 250}.{(first + i) % 250 + 2}" for i in range(n)]


def _garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 1400))
    base = (b"INVITE sip:a@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP evil.example;branch=z9hG4bK" + rng.randbytes(4).hex().encode()
            + b"\r\nCall-ID: " + rng.randbytes(6).hex().encode() + b"\r\nCSeq: 1 INVITE\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\n"
            + b"Max-Forwards: 70\r\nContent-Type: application/sdp\r\n")
    if kind == 1:
        return base + b"Content-Length: " + b"9" * rng.randrange(1, 6000) + b"\r\n\r\n"
    if kind == 2:
        sdp = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/SAVP 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^99999999999\r\na=ptime:1e999\r\n"
        return base + b"Content-Length: " + str(len(sdp)).encode() + b"\r\n\r\n" + sdp
    msg = bytearray(base + b"Content-Length: 0\r\n\r\n")
    for _ in range(rng.randrange(1, 8)):
        msg[rng.randrange(len(msg))] = rng.randrange(256)
    return bytes(msg)


def worker_udp_garbage(host: str, port: int, sources: int, seconds: float) -> dict[str, Any]:
    rng = random.Random(7)
    socks = []
    for src in _sources(sources, 0):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0))
        s.setblocking(False)
        socks.append(s)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for s in socks:
            try:
                s.sendto(_garbage(rng), (host, port))
                sent += 1
            except BlockingIOError:
                pass
    return {"sent": sent}


def _invite(src: str, sport: int, target: str, n: int) -> bytes:
    sdp = f"v=0\r\no=- {n} 1 IN IP4 {src}\r\ns=-\r\nc=IN IP4 {src}\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    return (f"INVITE sip:agent@{target} SIP/2.0\r\nVia: SIP/2.0/UDP {src}:{sport};branch=z9hG4bKflood{n}\r\n"
            f"From: <sip:flood@{src}>;tag=f{n}\r\nTo: <sip:agent@{target}>\r\nCall-ID: flood-{n}-{src}\r\n"
            f"CSeq: 1 INVITE\r\nContact: <sip:flood@{src}:{sport}>\r\nMax-Forwards: 70\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}").encode()


def worker_invite_flood(host: str, port: int, sources: int, rate: float, seconds: float) -> dict[str, Any]:
    """INVITEs at ``rate``/s spread over ``sources`` addresses; never ACKed; responses counted."""
    sel = selectors.DefaultSelector()
    socks = []
    for src in _sources(sources, 10):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    codes: dict[str, int] = {}
    sent = 0
    start = time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        if now >= end + 2:  # collect late answers for 2 s
            break
        due = int((min(now, end) - start) * rate)
        while sent < due:
            s = socks[sent % len(socks)]
            src, sport = s.getsockname()
            s.sendto(_invite(src, sport, f"{host}:{port}", sent), (host, port))
            sent += 1
        for key, _ in sel.select(timeout=0.002):
            try:
                data = key.fileobj.recv(65535)  # type: ignore[union-attr]
            except OSError:
                continue
            parts = data.split(b" ", 2)
            if len(parts) > 1 and parts[0] == b"SIP/2.0":
                code = parts[1].decode()
                codes[code] = codes.get(code, 0) + 1
    return {"sent": sent, "responses": codes}


def _connect_all(host: str, port: int, sources: int, count: int, first: bytes) -> tuple[list[socket.socket], int]:
    socks, failed = [], 0
    srcs = _sources(sources, 300)
    for i in range(count):
        s = socket.socket()
        s.bind((srcs[i % len(srcs)], 0))
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        except OSError:
            failed += 1
            s.close()
            continue
        socks.append(s)
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_WRITE)
    pending = set(socks)
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.1):
            s = key.fileobj  # type: ignore[assignment]
            sel.unregister(s)
            pending.discard(s)  # type: ignore[arg-type]
            try:
                s.send(first)  # type: ignore[union-attr]
            except OSError:
                failed += 1
    return socks, failed


def worker_ws_idle(host: str, port: int, sources: int, count: int, seconds: float) -> dict[str, Any]:
    """Open ``count`` WebSocket sessions that then never send anything (not even Pong)."""
    upgrade = (f"GET /call?dump=false HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    start = time.monotonic()
    socks, failed = _connect_all(host, port, sources, count, upgrade)
    return _watch(socks, failed, start, seconds, trickle=None)


def worker_trickle(host: str, port: int, sources: int, count: int, seconds: float) -> dict[str, Any]:
    """Open ``count`` HTTP connections that send their request one byte a second, never finishing."""
    start = time.monotonic()
    socks, failed = _connect_all(host, port, sources, count, b"G")
    return _watch(socks, failed, start, seconds, trickle=b"ET /health HTTP/1.1\r\nX-Slow: " + b"a" * 10000)


def _watch(socks: list[socket.socket], failed: int, start: float, seconds: float, trickle: bytes | None) -> dict[str, Any]:
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    status: dict[str, int] = {}
    closed_at: list[float] = []
    open_ = set(socks)
    pos = 0
    next_byte = time.monotonic() + 1
    end = start + seconds
    while open_ and time.monotonic() < end:
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            try:
                data = s.recv(65536)  # type: ignore[union-attr]
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 "):
                code = data[9:12].decode(errors="replace")
                status[code] = status.get(code, 0) + 1
            if not data:
                sel.unregister(s)
                open_.discard(s)  # type: ignore[arg-type]
                closed_at.append(time.monotonic() - start)
                s.close()  # type: ignore[union-attr]
        if trickle is not None and time.monotonic() >= next_byte and pos < len(trickle):
            for s in list(open_):
                try:
                    s.send(trickle[pos:pos + 1])
                except OSError:
                    pass
            pos += 1
            next_byte += 1
    still_open = len(open_)
    for s in open_:
        s.close()
    return {"connections": len(socks), "connect_failed": failed, "status": status,
            "closed_by_server": len(closed_at), "still_open": still_open,
            "last_closed_s": round(max(closed_at), 1) if closed_at else None}


WORKERS = {"udp-garbage": worker_udp_garbage, "invite-flood": worker_invite_flood,
           "ws-idle": worker_ws_idle, "trickle": worker_trickle}


def worker_main(argv: list[str]) -> None:
    name, host, port, *rest = argv
    args = [float(a) if "." in a else int(a) for a in rest]
    print(json.dumps(WORKERS[name](host, int(port), *args)))


# -- the measuring side (Twisted) -------------------------------------------------------------

def measure_main(args: argparse.Namespace) -> None:
    sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
    sys.path.insert(0, HERE)
    from twisted.internet import defer, protocol, reactor, task
    from twisted.internet.utils import getProcessOutputAndValue

    from harness import BASE_CONFIG, free_port, http_client, start_daemon
    from procstats import fd_kinds, rss_mb, tcp_remote_ports, udp_ports
    from agent import WebhookAgent, write_tone
    from soak import PCAP, caller_scenario
    from ws_tts_sessions import connect as raw_connect

    phase = {"name": "baseline"}
    health: dict[str, list[float | None]] = {}
    options: dict[str, list[bool]] = {}
    audio_gaps: dict[str, list[float]] = {}

    async def run() -> None:
        workdir = tempfile.mkdtemp(prefix="ac-abuse-")
        prompt = os.path.join(workdir, "media", "prompt.wav")
        write_tone(prompt, 30)
        shutil.copy(PCAP, os.path.join(workdir, "caller.pcap"))
        scenario = os.path.join(workdir, "caller.xml")
        with open(scenario, "w") as f:
            f.write(caller_scenario(28))
        # The attackers' INVITEs reach the webhook too: nobody picks those up.
        agent = WebhookAgent(prompt, 120, ignore=lambda payload: "flood" in str(payload.get("caller")))
        config = ("rtp_start_port = 20000\nrtp_end_port = 24000\n" + BASE_CONFIG + agent.webhook_config
                  + '[fetch]\nmedia_dirs = ["{workdir}/media"]\n')
        daemon = await start_daemon(workdir, config)
        agent.http_port = daemon.http_port
        sipp = None
        try:
            pid = daemon.transport.pid
            web = http_client()

            async def list_count() -> int:
                r = await web.get(daemon.base_url + "/list")
                return len(json.loads(await r.content())["active_calls"])

            # Probes.
            def probe_health() -> None:
                t0 = reactor.seconds()
                name = phase["name"]
                d = web.get(daemon.base_url + "/health", timeout=2)
                d.addCallback(lambda r: r.content())
                d.addCallbacks(lambda _: health.setdefault(name, []).append(reactor.seconds() - t0),
                               lambda _: health.setdefault(name, []).append(None))

            class OptionsProbe(protocol.DatagramProtocol):
                def __init__(self) -> None:
                    self.outstanding: dict[str, tuple[str, Any]] = {}
                    self.n = 0

                def send(self) -> None:
                    self.n += 1
                    branch = f"z9hG4bKprobe{self.n}"
                    port = self.transport.getHost().port
                    msg = (f"OPTIONS sip:agent@127.0.0.1:{daemon.sip_port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch}\r\n"
                           f"From: <sip:probe@127.0.0.1>;tag=p{self.n}\r\nTo: <sip:agent@127.0.0.1>\r\nCall-ID: probe-{self.n}\r\n"
                           f"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
                    name = phase["name"]

                    def lost() -> None:
                        if self.outstanding.pop(branch, None) is not None:
                            options.setdefault(name, []).append(False)

                    self.outstanding[branch] = (name, reactor.callLater(2, lost))
                    self.transport.write(msg.encode(), ("127.0.0.1", daemon.sip_port))

                def datagramReceived(self, data: bytes, addr: Any) -> None:
                    for branch in list(self.outstanding):
                        if branch.encode() in data:
                            name, timer = self.outstanding.pop(branch)
                            timer.cancel()
                            options.setdefault(name, []).append(True)

            probe = OptionsProbe()
            probe_port = reactor.listenUDP(0, probe, interface="127.0.0.1")
            loops = [task.LoopingCall(probe_health), task.LoopingCall(probe.send)]
            loops[0].start(0.2)
            loops[1].start(0.5)

            # Calls that must keep their audio: WebSocket sessions replaying the prompt, and SIPp.
            sessions = []
            for i in range(args.audio_sessions):
                c = await raw_connect(daemon.http_port, f"/call?id=audio-{i}&dump=false")
                c.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": 16000}})
                sessions.append(c)

            def replay() -> None:
                for c in sessions:
                    ended = sum(1 for e in c.events if e.get("event") == "trackEnd")
                    started = getattr(c, "plays", 0)
                    if started == ended:
                        c.plays = started + 1  # type: ignore[attr-defined]
                        c.send({"command": "play", "url": prompt})

            def gaps() -> None:
                for c in sessions:
                    frames = [t for t, _ in c.frames]
                    c.frames.clear()
                    last = getattr(c, "last_frame", None)
                    if last is not None and frames:
                        frames.insert(0, last)
                    if frames:
                        c.last_frame = frames[-1]  # type: ignore[attr-defined]
                    audio_gaps.setdefault(phase["name"], []).extend(b - a for a, b in zip(frames, frames[1:]))

            loops += [task.LoopingCall(replay), task.LoopingCall(gaps)]
            loops[2].start(0.5)
            loops[3].start(1.0)
            class Sipp(protocol.ProcessProtocol):
                def __init__(self) -> None:
                    self.out = b""
                    self.ended: defer.Deferred[None] = defer.Deferred()

                def outReceived(self, data: bytes) -> None:
                    self.out += data

                def processEnded(self, reason: Any) -> None:
                    self.ended.callback(None)

            sipp = Sipp()
            # Legitimate callers all along: up to 10 calls of 28 s; SIGUSR1 at the end lets them finish.
            reactor.spawnProcess(sipp, shutil.which("sipp"), [
                "sipp", "-sf", scenario, f"127.0.0.1:{daemon.sip_port}", "-s", "agent", "-i", "127.0.0.1",
                "-p", str(free_port(socket.SOCK_DGRAM)), "-mp", str(free_port(socket.SOCK_DGRAM)),
                "-r", "0.5", "-l", "10", "-nostdin", "-timeout", f"{args.total_seconds}s"],
                env=dict(os.environ), path=workdir)

            await task.deferLater(reactor, 5, lambda: None)
            baseline = {"rss": rss_mb(pid), "fds": fd_kinds(pid), "udp": len(udp_ports(pid))}

            async def attack(name: str, *worker_args: Any) -> dict[str, Any]:
                phase["name"] = name
                out, err, code = await getProcessOutputAndValue(sys.executable, [
                    os.path.abspath(__file__), "--worker", *[str(a) for a in worker_args]], env=dict(os.environ))
                if code != 0:
                    print(err.decode(errors="replace"), file=sys.stderr)
                    return {"error": code}
                return json.loads(out)

            results = {}
            results["malformed UDP"] = await attack("malformed UDP", "udp-garbage", "127.0.0.1", daemon.sip_port, 4, float(args.seconds))
            results["INVITE flood, 1 source"] = await attack("INVITE flood, 1 source", "invite-flood", "127.0.0.1", daemon.sip_port, 1, 500.0, float(args.seconds))
            results["INVITE flood, 200 sources"] = await attack("INVITE flood, 200 sources", "invite-flood", "127.0.0.1", daemon.sip_port, 200, 500.0, float(args.seconds))
            results["idle WebSockets"] = await attack("idle WebSockets", "ws-idle", "127.0.0.1", daemon.http_port, 50, 3000, 120.0)
            results["trickling HTTP"] = await attack("trickling HTTP", "trickle", "127.0.0.1", daemon.http_port, 20, 1100, 40.0)

            phase["name"] = "recovery"
            deadline = reactor.seconds() + 90
            while await list_count() > args.audio_sessions + 10 and reactor.seconds() < deadline:
                await task.deferLater(reactor, 1, lambda: None)
            phase["name"] = "end"  # the audio sessions close now: not measured any more
            for c in sessions:
                c.transport.loseConnection()
            sipp.transport.signalProcess(signal.SIGUSR1)
            await sipp.ended.addTimeout(60, reactor)
            deadline = reactor.seconds() + 60
            while await list_count() and reactor.seconds() < deadline:
                await task.deferLater(reactor, 0.5, lambda: None)
            after = {"rss": rss_mb(pid), "fds": fd_kinds(pid), "udp": len(udp_ports(pid))}
            pooled = min(2, tcp_remote_ports(pid).count(agent.port.getHost().port))
            after["fds"]["tcp"] = after["fds"].get("tcp", 0) - pooled
            for loop in loops:
                loop.stop()
            probe_port.stopListening()

            print(f"{'phase':28} {'/health ok  p50/max ms':24} {'OPTIONS ok':11} {'audio: longest gap ms, frames/s per session'}")
            for name in ["baseline", *results, "recovery"]:
                if name not in health:
                    continue  # nothing was measured in that phase (recovery may be instant)
                h = health.get(name, [])
                ok = [x for x in h if x is not None]
                o = options.get(name, [])
                g = audio_gaps.get(name, [])
                span = sum(g) or 1
                line = f"{name:28} "
                line += f"{len(ok)}/{len(h)} {1000 * statistics.median(ok) if ok else 0:5.1f}/{1000 * max(ok) if ok else 0:6.1f}   "
                line += f"{sum(o)}/{len(o):<8} {1000 * max(g) if g else 0:6.1f}, {len(g) / span:5.1f}"
                print(line)
            for name, result in results.items():
                print(f"{name}: {json.dumps(result)}")
            text = sipp.out.decode(errors="replace")
            cells = {line.split("|")[0].strip(): line.split("|")[2].split()[0] for line in text.splitlines()
                     if line.strip().startswith(("Successful call", "Failed call")) and line.count("|") >= 2}
            print(f"legit SIP calls (SIPp): {cells}; agent {agent.counts}")
            print(f"baseline {baseline}")
            print(f"after    {after} ({pooled} idle keep-alive connection(s) to the webhook not counted)")
        finally:
            if sipp is not None and sipp.transport.pid is not None:
                sipp.transport.signalProcess("KILL")
            agent.stop()
            await daemon.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    task.react(lambda _: defer.Deferred.fromCoroutine(run()))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each SIP flood")
    parser.add_argument("--audio-sessions", type=int, default=5)
    parser.add_argument("--total-seconds", type=int, default=400, help="SIPp run limit")
    measure_main(parser.parse_args())


if __name__ == "__main__":
    main()
