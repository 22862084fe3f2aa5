"""N simultaneous RTP calls on loopback: the daemon's media engine under load.

Two processes, so the measured side is honest:

* the **daemon** (this script with ``--daemon``, started by the load
  generator) runs N :class:`~activecall.legs.rtp.RtpLeg` on real UDP
  sockets, one reactor thread, one media clock.  Every leg is negotiated
  through :func:`~activecall.sdp.negotiation.answer_offer`, receives and
  decodes the caller stream (jitter buffer -> decoder -> 16 kHz frame
  written to a sink) and encodes and sends one agent frame (a tone, read from a source)
  every 20 ms, exactly as a call controller drives it;
* the **load generator** (this script without ``--daemon``) plays N phones:
  it sends 50 packets/s per call to the daemon's legs and receives what the
  legs send back, stamping arrivals with kernel receive timestamps
  (SO_TIMESTAMPNS).

Printed: calls, codec, daemon CPU% (of one core, from /proc), RSS per call
(daemon RSS growth over its idle baseline / N), packet loss in both
directions, p50/p99/max send-interval jitter (|inter-arrival - 20 ms| of the
daemon's packets at the generator) and the daemon's own tick lateness.

The daemon runs with ``OPENBLAS_NUM_THREADS=1`` (the batched G.711 filter
is a BLAS matrix product; extra BLAS threads would only spin on the other
core); production should set the same.  The machine is shared: run it when
nothing else is busy (the load average is printed).

Run: ``python benchmarks/rtp_concurrency.py --calls 500 --codec pcmu --seconds 20``
(``--codec g722`` for the G.722 variant, ``--srtp`` to add SRTP).
Targets (2 cores): 500 G.711 calls, loss < 0.1 %, p99 jitter < 5 ms, RSS < 0.5 MB/call.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import selectors
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import numpy as np

FRAME_S = 0.02
_RTP = struct.Struct("!BBHII")
_TIMESPEC = struct.Struct("@qq")
_SLOTS = 10
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def _rss_kb(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# daemon side


def run_daemon(args: argparse.Namespace) -> None:
    if args.reactor == "asyncio":
        import asyncio

        from twisted.internet import asyncioreactor

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        asyncioreactor.install(loop)
    from twisted.internet import reactor, stdio
    from twisted.protocols.basic import LineReceiver

    from activecall.legs import NO_EVENTS
    from activecall.media.clock import PROCESS, MediaClock
    from activecall.sdp.negotiation import answer_offer
    from activecall.legs.rtp import RtpLeg, RtpMediaEngine
    from activecall.rtp.srtp import generate_crypto
    from activecall.rtp.transport import RtpEndpoint, RtpPortAllocator

    gen_ports: list[int] = json.loads(sys.stdin.readline())
    keys: list[str] = json.loads(sys.stdin.readline()) if args.srtp else []
    rng = random.Random(7)
    media_clock = MediaClock(reactor)
    engine = RtpMediaEngine(reactor, media_clock)
    allocator = RtpPortAllocator(args.rtp_start, args.rtp_start + 4 * args.calls + 400)
    frames_heard = [0]

    class Heard:
        """The sink of every leg: counts caller frames."""

        def write_frame(self, frame: bytes) -> None:
            frames_heard[0] += 1

    heard = Heard()

    t = np.arange(320) / 16000
    tone = [(6000 * np.sin(2 * np.pi * 440 * (t + i * 0.02))).astype("<i2").tobytes() for i in range(50)]
    gc.collect()
    rss_base = _rss_kb()
    legs: list[RtpLeg] = []
    for i in range(args.calls):
        ep = RtpEndpoint(reactor, allocator, bind_ip="127.0.0.1")
        port = ep.start()
        gen_port = gen_ports[i % len(gen_ports)]
        crypto = ""
        proto = "RTP/AVP"
        if args.srtp:
            proto = "RTP/SAVP"
            crypto = f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{keys[i]}\r\n"
        pt = {"pcmu": 0, "pcma": 8, "g722": 9}[args.codec]
        offer = (
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {gen_port} {proto} {pt} 101\r\na=rtpmap:101 telephone-event/8000\r\n{crypto}"
        )
        _, neg = answer_offer(
            offer, (args.codec, "telephone_event"), "127.0.0.1", port, session_id=i,
            make_crypto=lambda tag, suite: generate_crypto(tag, suite, rng),
        )
        legs.append(RtpLeg(engine, ep, neg, clock=reactor, rng=rng, cname=b"bench"))

    class Agent:
        """The source of every leg: the tone, one frame per tick, as the controllers would play it."""

        n = 0

        def media_tick(self, frames: int) -> None:
            self.n += frames

        def read_frame(self) -> bytes:
            return tone[self.n % 50]

    agent = Agent()
    for leg in legs:
        leg.attach(agent, heard, NO_EVENTS)
    media_clock.subscribe(agent, PROCESS)
    tick_times = np.zeros(200000)
    tick_count = [0]

    class TickProbe:
        """Records when the media clock actually ticked (daemon-side pacing)."""

        def media_tick(self, frames: int) -> None:
            i = tick_count[0]
            if i < len(tick_times):
                tick_times[i] = time.monotonic()
            tick_count[0] = i + 1

    media_clock.subscribe(TickProbe())
    gc.collect()
    gc.freeze()  # as the daemon does after start-up: long-lived objects leave the GC's scans
    local_keys = [leg.negotiated.local_crypto.encode().split("inline:")[1] if leg.negotiated.local_crypto else ""
                  for leg in legs]

    class Control(LineReceiver):
        delimiter = b"\n"

        def connectionMade(self) -> None:
            self.sendLine(json.dumps({
                "ports": [leg.local_port for leg in legs], "keys": local_keys,
                "rss_base_kb": rss_base, "rss_kb": _rss_kb(), "pid": os.getpid(),
            }).encode())

        def lineReceived(self, line: bytes) -> None:
            cmd = line.decode().strip()
            if cmd == "mark":
                tick_count[0] = 0
                self._rx0 = sum(leg.stats()["rx_audio_packets"] for leg in legs)
                self._late0 = engine.late_frames
                self.sendLine(b"{}")
            elif cmd == "report":
                n = min(tick_count[0], len(tick_times))
                intervals = np.diff(tick_times[:n]) if n > 2 else np.zeros(1)
                stats = [leg.stats() for leg in legs]
                self.sendLine(json.dumps({
                    "rss_kb": _rss_kb(),
                    "rx_packets": sum(s["rx_audio_packets"] for s in stats) - self._rx0,
                    "rx_total": sum(s["rx_audio_packets"] for s in stats),
                    "rx_srtp_errors": sum(s["rx_srtp_errors"] for s in stats),
                    "tx_errors": sum(s["tx_errors"] for s in stats),
                    "jitter_lost": sum(s["jitter_lost"] for s in stats),
                    "late_frames": engine.late_frames - self._late0,
                    "tick_p50_ms": float(np.percentile(np.abs(intervals - FRAME_S), 50) * 1e3),
                    "tick_p99_ms": float(np.percentile(np.abs(intervals - FRAME_S), 99) * 1e3),
                    "frames_heard": frames_heard[0],
                }).encode())
            elif cmd == "stop":
                for leg in legs:
                    leg.close()
                reactor.callLater(0.2, reactor.stop)

    stdio.StandardIO(Control())
    if args.profile:
        import cProfile

        cProfile.runctx("reactor.run()", globals(), {"reactor": reactor}, args.profile)
    else:
        reactor.run()


# ---------------------------------------------------------------------------
# load generator side


class Generator:
    """N phones on a few UDP sockets: send 50 pps per call, timestamp what comes back."""

    def __init__(self, calls: int, codec: str, sockets: int, srtp: bool) -> None:
        self.calls = calls
        self.socks = []
        for _ in range(sockets):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            self.socks.append(s)
        self.ports = [s.getsockname()[1] for s in self.socks]
        self.pt = {"pcmu": 0, "pcma": 8, "g722": 9}[codec]
        self.payloads = self._payloads(codec)
        self.srtp = srtp
        rng = random.Random(3)
        self.ssrc = [rng.getrandbits(32) for _ in range(calls)]
        self.seq = [rng.getrandbits(16) for _ in range(calls)]
        self.ts = [rng.getrandbits(32) for _ in range(calls)]
        self.keys: list[bytes] = [bytes(rng.getrandbits(8) for _ in range(30)) for _ in range(calls)]
        self.tx_ctx: list[Any] = []
        self.rx_ctx: list[Any] = []
        self.sent = 0
        self.buf = bytearray(12 + 160)

    @staticmethod
    def _payloads(codec: str) -> list[bytes]:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from activecall.media.codecs import make_encoder

        enc = make_encoder(codec)
        n = enc.sample_rate_hz // 50
        out = []
        for i in range(50):
            t = (np.arange(n) + i * n) / enc.sample_rate_hz
            out.append(enc.encode((6000 * np.sin(2 * np.pi * 1000 * t)).astype("<i2").tobytes()))
        return out

    def setup_srtp(self, daemon_keys: list[str]) -> None:
        import base64

        import pylibsrtp

        for i in range(self.calls):
            profile = pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80
            self.tx_ctx.append(pylibsrtp.Session(pylibsrtp.Policy(
                key=self.keys[i], ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile)))
            self.rx_ctx.append(pylibsrtp.Session(pylibsrtp.Policy(
                key=base64.b64decode(daemon_keys[i]), ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND, srtp_profile=profile)))

    def run(self, daemon_ports: list[int], seconds: float, warmup_s: float, on_mark: Any, on_end: Any) -> dict[str, Any]:
        calls = self.calls
        by_port = {p: i for i, p in enumerate(daemon_ports)}
        max_per_call = int((seconds + warmup_s + 2) * 50) + 50
        arrivals = np.zeros((calls, max_per_call))
        counts = np.zeros(calls, dtype=np.int64)
        first_seq = [-1] * calls
        ext_seq = [0] * calls
        sel = selectors.DefaultSelector()
        for s in self.socks:
            sel.register(s, selectors.EVENT_READ)
        buf = self.buf
        payloads = self.payloads
        start = time.monotonic()
        next_send = start
        frame_no = 0
        slot = 0
        marked = False
        sent_in_window = 0
        end = start + warmup_s + seconds
        while True:
            now = time.monotonic()
            if not marked and now >= start + warmup_s:
                on_mark()
                mark_at = time.monotonic()
                marked = True
                counts[:] = 0
                first_seq = [-1] * calls
                sent_in_window = 0
            if now >= next_send:
                if now >= end and slot == 0:
                    on_end()
                    window_s = now - mark_at
                    received_at_end = int(counts.sum())
                    break
                # Phones are not synchronised: call i sends in sub-slot i % SLOTS of each 20 ms.
                payload = payloads[frame_no % 50]
                for i in range(slot, calls, _SLOTS):
                    _RTP.pack_into(buf, 0, 0x80, self.pt, self.seq[i], self.ts[i], self.ssrc[i])
                    buf[12:] = payload
                    data = self.tx_ctx[i].protect(bytes(buf)) if self.srtp else buf
                    try:
                        self.socks[i % len(self.socks)].sendto(data, ("127.0.0.1", daemon_ports[i]))
                        self.sent += 1
                        sent_in_window += 1
                    except BlockingIOError:
                        pass
                    self.seq[i] = (self.seq[i] + 1) & 0xFFFF
                    self.ts[i] = (self.ts[i] + 160) & 0xFFFFFFFF
                slot += 1
                if slot == _SLOTS:
                    slot = 0
                    frame_no += 1
                next_send = start + (frame_no + slot / _SLOTS) * FRAME_S
            timeout = max(0.0, next_send - time.monotonic())
            for key, _ in sel.select(timeout):
                sock = key.fileobj
                while True:
                    try:
                        data, anc, _flags, addr = sock.recvmsg(2048, 64)  # type: ignore[union-attr]
                    except BlockingIOError:
                        break
                    i = by_port.get(addr[1])
                    if i is None or len(data) < 12 or 192 <= data[1] <= 223:
                        continue
                    stamp = time.time()
                    for level, kind, value in anc:
                        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                            sec, nsec = _TIMESPEC.unpack(value[: _TIMESPEC.size])
                            stamp = sec + nsec * 1e-9
                    if self.srtp:
                        try:
                            data = self.rx_ctx[i].unprotect(data)
                        except Exception:
                            continue
                    seq = (data[2] << 8) | data[3]
                    c = counts[i]
                    if c < max_per_call:
                        arrivals[i, c] = stamp
                    counts[i] = c + 1
                    if first_seq[i] < 0:
                        first_seq[i] = seq
                        ext_seq[i] = seq
                    else:
                        d = ((seq - ext_seq[i] + 0x8000) & 0xFFFF) - 0x8000
                        if d > 0:
                            ext_seq[i] += d
        # Drain what is still in flight.
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            for key, _ in sel.select(0.05):
                try:
                    while True:
                        key.fileobj.recvmsg(2048, 64)  # type: ignore[union-attr]
                except BlockingIOError:
                    pass
        expected = 0
        received = 0
        jitter: list[np.ndarray] = []
        for i in range(calls):
            c = int(min(counts[i], max_per_call))
            if first_seq[i] >= 0:
                expected += ext_seq[i] - first_seq[i] + 1
                received += int(counts[i])
            if c > 2:
                d = np.diff(arrivals[i, :c])
                jitter.append(np.abs(d - FRAME_S))
        allj = np.concatenate(jitter) if jitter else np.zeros(1)
        return {
            # Frames the daemon should have sent in the window (50/s per call) and what arrived:
            # catches a sender that falls behind, which sequence gaps would not show.
            "frames_due": int(round(window_s * 50)) * calls,
            "frames_arrived": received_at_end,
            "sent_in_window": sent_in_window,
            "expected": expected,
            "received": received,
            "jitter_p50_ms": float(np.percentile(allj, 50) * 1e3),
            "jitter_p99_ms": float(np.percentile(allj, 99) * 1e3),
            "jitter_max_ms": float(allj.max() * 1e3),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--codec", choices=("pcmu", "pcma", "g722"), default="pcmu")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--srtp", action="store_true")
    ap.add_argument("--reactor", choices=("default", "asyncio"), default="default")
    ap.add_argument("--rtp-start", type=int, default=30000)
    ap.add_argument("--sockets", type=int, default=8)
    ap.add_argument("--daemon", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", default="", help="write the daemon's cProfile stats to this file")
    args = ap.parse_args()
    if args.daemon:
        run_daemon(args)
        return
    import base64

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    gen = Generator(args.calls, args.codec, args.sockets, args.srtp)
    cmd = [sys.executable, os.path.abspath(__file__), "--daemon", "--calls", str(args.calls), "--codec", args.codec,
           "--reactor", args.reactor, "--rtp-start", str(args.rtp_start)] + (["--srtp"] if args.srtp else [])
    if args.profile:
        cmd += ["--profile", os.path.abspath(args.profile)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + env.get("PYTHONPATH", "")
    # One reactor thread: BLAS worker threads would only spin on the other core.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write((json.dumps(gen.ports) + "\n").encode())
    if args.srtp:
        proc.stdin.write((json.dumps([base64.b64encode(k).decode() for k in gen.keys]) + "\n").encode())
    proc.stdin.flush()
    hello = json.loads(proc.stdout.readline())
    if args.srtp:
        gen.setup_srtp(hello["keys"])
    pid = hello["pid"]
    window: dict[str, float] = {}

    def mark() -> None:
        proc.stdin.write(b"mark\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        proc.stdout.readline()  # type: ignore[union-attr]
        window["cpu0"] = _cpu_s(pid)
        window["gcpu0"] = time.process_time()
        window["t0"] = time.monotonic()

    def end() -> None:
        window["elapsed"] = time.monotonic() - window["t0"]
        window["cpu"] = (_cpu_s(pid) - window["cpu0"]) / window["elapsed"] * 100
        window["gcpu"] = (time.process_time() - window["gcpu0"]) / window["elapsed"] * 100

    result = gen.run(hello["ports"], args.seconds, args.warmup, mark, end)
    elapsed, cpu, gcpu = window["elapsed"], window["cpu"], window["gcpu"]
    proc.stdin.write(b"report\n")
    proc.stdin.flush()
    report = json.loads(proc.stdout.readline())
    proc.stdin.write(b"stop\n")
    proc.stdin.flush()
    proc.wait(30)
    tx_loss = 1 - result["received"] / max(1, result["expected"])
    rx_loss = 1 - report["rx_packets"] / max(1, result["sent_in_window"])
    per_call_kb = (report["rss_kb"] - hello["rss_base_kb"]) / args.calls
    print(f"calls                 {args.calls} ({args.codec}{', SRTP' if args.srtp else ''}, {args.reactor} reactor)")
    print(f"window                {elapsed:.1f} s after {args.warmup:.0f} s warm-up")
    print(f"daemon CPU            {cpu:.1f} % of one core   (load generator: {gcpu:.1f} %)")
    print(f"daemon RSS            {report['rss_kb'] / 1024:.1f} MB, {per_call_kb / 1024:.3f} MB per call "
          f"(idle baseline {hello['rss_base_kb'] / 1024:.1f} MB)")
    print(f"loss daemon->phones   {100 * tx_loss:.3f} %  ({result['expected'] - result['received']} of {result['expected']})")
    print(f"daemon frames on time {100 * result['frames_arrived'] / max(1, result['frames_due']):.2f} %  "
          f"({result['frames_arrived']} of {result['frames_due']} due in the window)")
    print(f"loss phones->daemon   {100 * max(0.0, rx_loss):.3f} %  ({report['rx_packets']} of {result['sent_in_window']} received)")
    print(f"send-interval jitter  p50 {result['jitter_p50_ms']:.2f} ms  p99 {result['jitter_p99_ms']:.2f} ms  "
          f"max {result['jitter_max_ms']:.1f} ms")
    print(f"media tick lateness   p50 {report['tick_p50_ms']:.2f} ms  p99 {report['tick_p99_ms']:.2f} ms  "
          f"catch-up frames {report['late_frames']}")
    print(f"errors                srtp {report['rx_srtp_errors']}, send {report['tx_errors']}")
    # Other work on the same two cores shows up as stalls: say how busy the machine was.
    print(f"load average          {' '.join(f'{x:.2f}' for x in os.getloadavg())} (before: {load_before})")


if __name__ == "__main__":
    main()
