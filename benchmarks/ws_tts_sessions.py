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
import struct
import sys
import tempfile
import wave

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))

import numpy as np  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402

from harness import BASE_CONFIG, connect, start_daemon  # noqa: E402


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
    wav = os.path.join(workdir, "tone.wav")
    write_tone(wav, args.seconds)
    daemon = await start_daemon(workdir, BASE_CONFIG.replace('log_level = "info"', 'log_level = "warn"'))
    pid = daemon.transport.pid
    try:
        clients = []
        for i in range(args.sessions):
            clients.append(await connect(f"{daemon.ws_url}/call?id=bench-{i}&dump=false&ping=0"))
        for c in clients:
            c.send({"command": "invite", "option": {"codec": args.codec, "sampleRate": 16000, "tts": {"provider": "piper"}}})
        await defer.gatherResults([c.wait_event("answer") for c in clients])
        if args.source == "tts":
            # Warm the media cache once so N sessions measure pacing, not N parallel syntheses.
            text = "This is the activecall benchmark speaking a cached sentence for pacing measurements. " * 2
            clients[0].send({"command": "tts", "text": text, "playId": "warm", "endOfStream": True})
            await clients[0].wait_event("trackEnd", timeout_s=120, playId="warm")
            clients[0].frames.clear()
        cpu0, t0 = cpu_seconds(pid), reactor.seconds()
        for c in clients:
            if args.source == "tts":
                c.send({"command": "tts", "text": text, "playId": "b", "endOfStream": True})
            else:
                c.send({"command": "play", "url": wav, "playId": "b"})
        await defer.gatherResults([c.wait_event("trackEnd", timeout_s=args.seconds * 4 + 60, playId="b") for c in clients])
        cpu1, t1 = cpu_seconds(pid), reactor.seconds()
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
        late = np.concatenate(lateness) * 1000
        print(f"sessions            {args.sessions} ({args.source}, codec {args.codec})")
        print(f"frames received     {frames} in {t1 - t0:.1f} s")
        print(f"daemon CPU          {100 * (cpu1 - cpu0) / (t1 - t0):.1f} % of one core")
        print(f"interval jitter     p50 {np.percentile(d, 50):.2f} ms   p99 {np.percentile(d, 99):.2f} ms   max {d.max():.1f} ms")
        print(f"late frames (>20ms) {int((late > 20).sum())} ({100 * (late > 20).mean():.3f} %)")
        for c in clients:
            c.sendClose()
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
