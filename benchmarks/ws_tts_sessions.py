"""N concurrent /call sessions, each receiving agent audio paced by the daemon's media clock.

Starts the real daemon on 127.0.0.1, opens N WebSocket sessions, has each play a
WAV file (default) or speak a cached TTS sentence, and measures on the client side
the arrival time of every 20 ms audio frame. Prints sessions, daemon CPU %,
frame-interval jitter p50/p99 and late frames.

    python benchmarks/ws_tts_sessions.py --sessions 200 --seconds 10
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import wave

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))

import json  # noqa: E402
import struct  # noqa: E402

import numpy as np  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402

from harness import BASE_CONFIG, _Waiters, start_daemon  # noqa: E402


class RawClient(Protocol):
    """A minimal WebSocket client (RFC 6455) that only timestamps frames.

    Autobahn's client costs more per frame than the daemon does, so with one
    client process for 200 sessions it, not the daemon, would set the jitter.
    """

    def __init__(self, path: str, waiters: _Waiters) -> None:
        self.path = path
        self.waiters = waiters
        self.buf = bytearray()
        self.upgraded = False
        self.events: list[dict] = []
        self.frames: list[tuple[float, bytes]] = []
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())

    def dataReceived(self, data: bytes) -> None:
        now = reactor.seconds()
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            del self.buf[: end + 4]
            self.upgraded = True
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 2:
            opcode = buf[pos] & 0x0F
            n = buf[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n = struct.unpack_from("!H", buf, pos + 2)[0]
                head = 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            if len(buf) - pos < head + n:
                break
            payload = bytes(buf[pos + head: pos + head + n])
            pos += head + n
            if opcode == 2:
                self.frames.append((now, payload))
            elif opcode == 1:
                self.events.append(json.loads(payload))
            elif opcode == 9:  # the server's keep-alive Ping: a live client answers Pong
                self._write_frame(0x8A, payload)
        del buf[:pos]
        self.waiters.poke()

    def connectionLost(self, reason: object) -> None:
        self.closed = True
        self.waiters.poke()

    def send(self, command: dict) -> None:
        self._write_frame(0x81, json.dumps(command).encode())

    def _write_frame(self, first_byte: int, payload: bytes) -> None:
        mask = b"\x00\x00\x00\x00"  # a zero mask leaves the payload as is
        if len(payload) < 126:
            head = bytes([first_byte, 0x80 | len(payload)])
        else:
            head = bytes([first_byte, 0x80 | 126]) + struct.pack("!H", len(payload))
        self.transport.write(head + mask + payload)

    def wait_event(self, name: str, timeout_s: float = 30.0, **fields: object) -> defer.Deferred:
        def check() -> object:
            return next((e for e in self.events if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())), None)

        return self.waiters.wait(check, timeout_s, f"event {name}")


async def connect(port: int, path: str) -> RawClient:
    client = RawClient(path, _Waiters())
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await client.waiters.wait(lambda: client.upgraded, 10, "upgrade")
    return client


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_tone(path: str, seconds: float) -> None:
    rate = 16000
    n = int(rate * seconds)
    samples = (8000 * np.sin(2 * math.pi * 440 * np.arange(n) / rate)).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


async def run(args: argparse.Namespace) -> None:
    workdir = tempfile.mkdtemp(prefix="ac-bench-")
    # `play` reads local files only under [fetch] media_dirs (./config/media of the daemon's directory).
    media = os.path.join(workdir, "config", "media")
    os.makedirs(media, exist_ok=True)
    wav = os.path.join(media, "tone.wav")
    write_tone(wav, args.seconds)
    daemon = await start_daemon(workdir, BASE_CONFIG)
    pid = daemon.transport.pid
    try:
        clients = []
        for i in range(args.sessions):
            clients.append(await connect(daemon.http_port, f"/call?id=bench-{i}&dump=false&ping=0"))
        for c in clients:
            c.send({"command": "invite", "option": {"codec": args.codec, "sampleRate": 16000, "tts": {"provider": "piper"}}})
        await defer.gatherResults([c.wait_event("answer") for c in clients])
        if args.source == "wav":
            # Decode once into the media cache so N sessions measure pacing, not N parallel decodes.
            clients[0].send({"command": "play", "url": wav, "playId": "warm"})
            await clients[0].wait_event("trackStart", playId="warm")
            await clients[0].waiters.wait(lambda: clients[0].frames, 30, "warm-up audio")
            clients[0].send({"command": "interrupt"})
            await clients[0].wait_event("trackEnd", playId="warm")
            clients[0].frames.clear()
        if args.source == "tts":
            # Warm the media cache once so N sessions measure pacing, not N parallel syntheses.
            text = "This is the activecall benchmark speaking a cached sentence for pacing measurements. " * 2
            clients[0].send({"command": "tts", "text": text, "playId": "warm", "endOfStream": True})
            await clients[0].wait_event("trackEnd", timeout_s=120, playId="warm")
            clients[0].frames.clear()
        cpu0, t0, own0 = cpu_seconds(pid), reactor.seconds(), sum(os.times()[:2])
        for c in clients:
            if args.source == "tts":
                c.send({"command": "tts", "text": text, "playId": "b", "endOfStream": True})
            else:
                c.send({"command": "play", "url": wav, "playId": "b"})
        await defer.gatherResults([c.wait_event("trackEnd", timeout_s=args.seconds * 4 + 60, playId="b") for c in clients])
        cpu1, t1, own1 = cpu_seconds(pid), reactor.seconds(), sum(os.times()[:2])
        deltas, lateness, frames = [], [], 0
        for c in clients:
            times = np.array([t for t, _ in c.frames])
            frames += len(times)
            if len(times) < 3:
                continue
            deltas.append(np.abs(np.diff(times) - 0.02))
            offsets = times - times[0] - 0.02 * np.arange(len(times))
            lateness.append(offsets - offsets.min())
        d = np.concatenate(deltas) * 1000
        steady = np.concatenate([x[50:] for x in deltas]) * 1000
        late = np.concatenate(lateness) * 1000
        print(f"sessions            {args.sessions} ({args.source}, codec {args.codec})")
        print(f"frames received     {frames} in {t1 - t0:.1f} s")
        print(f"daemon CPU          {100 * (cpu1 - cpu0) / (t1 - t0):.1f} % of one core")
        print(f"client CPU          {100 * (own1 - own0) / (t1 - t0):.1f} % of one core (the measuring side)")
        print(f"interval jitter     p50 {np.percentile(d, 50):.2f} ms   p99 {np.percentile(d, 99):.2f} ms   max {d.max():.1f} ms")
        print(f"  after first second p50 {np.percentile(steady, 50):.2f} ms   p99 {np.percentile(steady, 99):.2f} ms")
        print(f"late frames (>20ms) {int((late > 20).sum())} ({100 * (late > 20).mean():.3f} %)")
        for c in clients:
            c.transport.loseConnection()
    finally:
        await daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the played audio")
    parser.add_argument("--source", choices=("wav", "tts"), default="wav")
    parser.add_argument("--codec", default="pcm", choices=("pcm", "pcmu", "pcma", "g722"))
    args = parser.parse_args()
    task.react(lambda _: defer.Deferred.fromCoroutine(run(args)))


if __name__ == "__main__":
    main()
