"""End to end: the real daemon's ``/call/webrtc`` against aiortc client peers (protocol.md §5.2).

The daemon runs under ``twistd --reactor=asyncio``; the clients are
``webrtc_peer.py`` subprocesses (aiortc needs asyncio, this process runs
Twisted's default reactor), each printing one JSON report per session.  All on
127.0.0.1; every wait has a deadline.

How "the trickled candidates were applied" is proven: the daemon would connect
anyway, through a peer-reflexive candidate learnt from our checks, so the
client also trickles a *canary* candidate (a UDP socket of its own, highest
priority) and holds back its answer until the daemon's ICE agent sent a
connectivity check there (``canary_checks``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import wave
from typing import Any

from twisted.internet import reactor, task
from twisted.trial.unittest import SkipTest, TestCase

from harness import REPO, BASE_CONFIG, Daemon, http_client, start_daemon

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from procstats import fd_kinds, udp_ports  # noqa: E402

sys.path.pop(0)

try:
    import aiortc  # noqa: F401  (the client subprocess needs it)
    import numpy as np
except ImportError:  # pragma: no cover - aiortc is a dependency
    aiortc = None

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "webrtc_peer.py")
SST = "server-side-track"
treq = http_client()


class PeerProcess(Daemon):
    """A ``webrtc_peer.py`` child: its stdout JSON lines are the session reports, stderr kept apart."""

    def __init__(self) -> None:
        super().__init__()
        self.stderr = ""

    def errReceived(self, data: bytes) -> None:
        self.stderr += data.decode("utf-8", "replace")


async def run_peer(daemon: Any, sid: str, *args: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Run the client with ``args`` against ``daemon``; its reports (the process is killed at the deadline)."""
    proto = PeerProcess()
    argv = [sys.executable, PEER, "--url", daemon.ws_url, "--sid", sid, "--timeout", "15", *args]
    reactor.spawnProcess(proto, sys.executable, argv, env=dict(os.environ), path=HERE)
    try:
        await proto.wait_exit(timeout_s)
    except AssertionError:
        await proto.stop()
        raise AssertionError(f"webrtc_peer.py did not finish in {timeout_s}s\n{proto.output}\n{proto.stderr}")
    if proto.exit_code != 0:
        raise AssertionError(f"webrtc_peer.py exited {proto.exit_code}\n{proto.stderr}")
    return [json.loads(line) for line in proto.output.splitlines() if line.startswith("{")]


def write_tone(path: str, seconds: float, hz: float, rate: int = 16000) -> None:
    n = int(rate * seconds)
    samples = (8000 * np.sin(2 * np.pi * hz * np.arange(n) / rate)).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def dominant_hz(samples: Any, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def names(report: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["event"], e.get("trackId", "")) for e in report["events"]]


async def until(check: Any, timeout_s: float, what: Any) -> Any:
    """Poll ``check`` (a coroutine function) every 100 ms until truthy; ``what()`` describes a timeout."""
    deadline = reactor.seconds() + timeout_s
    while True:
        found = await check()
        if found:
            return found
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s: {what()}")
        await task.deferLater(reactor, 0.1, lambda: None)


class ProcState:
    """What could leak from a daemon process: descriptors, threads, UDP ports."""

    def __init__(self, pid: int) -> None:
        self.fds = len(os.listdir(f"/proc/{pid}/fd"))
        self.threads = len(os.listdir(f"/proc/{pid}/task"))
        self.udp = udp_ports(pid)
        self.kinds = fd_kinds(pid)

    def __repr__(self) -> str:
        return f"fds={self.fds} threads={self.threads} udp={self.udp} kinds={self.kinds}"


class WebRtcAiortcTests(TestCase):
    """Trickle ICE, early candidates, a client closing its peer, and teardown of 100 sessions."""

    timeout = 240

    def setUp(self) -> None:
        if aiortc is None:
            raise SkipTest("aiortc is not installed")

    async def _start(self) -> Daemon:
        workdir = os.path.abspath(self.mktemp())
        self.workdir = workdir
        # `play` reads local files only under [fetch] media_dirs: ./config/media of the daemon's directory.
        self.media = os.path.join(workdir, "config", "media")
        os.makedirs(self.media)
        daemon = await start_daemon(workdir, BASE_CONFIG)
        self.addCleanup(daemon.stop)
        return daemon

    def _ok(self, report: dict[str, Any]) -> None:
        self.assertEqual(report["errors"], [], report)

    async def test_trickle_ice_audio_both_ways(self) -> None:
        """A candidate-less offer, then addIceCandidate: answer, the canary checked, the agent's WAV heard by the
        client, the client's tone in the recording, then trackEnd{sid} + hangup{sid} on hangup."""
        daemon = await self._start()
        wav = os.path.join(self.media, "agent.wav")
        write_tone(wav, 4, 660)
        [r] = await run_peer(daemon, "wrtc-trickle", "--trickle", "--canary", "--seconds", "2.5", "--play", wav,
                             "--tone-hz", "440", "--option", json.dumps({"recorder": {}}))
        self._ok(r)
        self.assertGreaterEqual(r["candidates"], 2, "our host candidate and the canary went by addIceCandidate")
        self.assertGreaterEqual(r["canary_checks"], 1, "the daemon's ICE agent checked a trickled candidate")
        self.assertGreater(r["answer_candidates"], 0, "the answer carries complete candidates")
        self.assertEqual(r["answer_codec"], "opus")
        seen = names(r)
        self.assertEqual(seen[:2], [("trackStart", "wrtc-trickle"), ("answer", "wrtc-trickle")])
        self.assertIn(("trackStart", SST), seen)
        self.assertEqual(seen[-2:], [("trackEnd", "wrtc-trickle"), ("hangup", "wrtc-trickle")])
        # Agent → client: the played file, as decoded audio.
        self.assertGreaterEqual(r["audio"]["sound_ms"], 1000, r["audio"])  # of 2.5 s: a loaded machine drops some
        self.assertGreaterEqual(r["stats"]["inbound"]["packetsReceived"], 100, r["stats"])
        self.assertEqual(r["stats"]["inbound"]["packetsLost"], 0, r["stats"])
        # Client → daemon: the mic tone on the recording's left channel, the agent's on the right.
        await daemon.stop()  # the recording is complete once the daemon exits
        with wave.open(os.path.join(self.workdir, "recorders", "wrtc-trickle.wav")) as w:
            self.assertEqual((w.getnchannels(), w.getframerate()), (2, 16000))
            frames = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
        left, right = frames[:, 0], frames[:, 1]
        loud_left = np.abs(left) > 2000
        self.assertGreater(loud_left.sum(), 0, "the caller's tone was recorded")
        caller = left[np.argmax(loud_left):][:16000]
        self.assertGreaterEqual(len(caller), 16000, "at least 1 s of the caller's tone")
        self.assertAlmostEqual(dominant_hz(caller, 16000), 440, delta=10)
        agent = right[np.argmax(np.abs(right) > 2000):][:16000]
        self.assertAlmostEqual(dominant_hz(agent, 16000), 660, delta=10)

    async def test_caller_speech_interrupts_the_agent(self) -> None:
        """Barge-in on the WebRTC leg, as on the others: the client starts talking (espeak-ng speech after
        3 s of silence) over a long TTS answer; with ``interruption`` on, the daemon reports
        ``interruption`` for that play, then its ``trackEnd``, long before the text would end."""
        if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
            raise SkipTest("espeak-ng and sox are needed for the caller's speech")
        daemon = await self._start()
        said = os.path.join(self.workdir, "said.wav")
        mic = os.path.join(self.workdir, "mic.wav")
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", said, "Stop please, I want to speak to a person."],
                       check=True, capture_output=True)
        subprocess.run(["sox", said, "-r", "16000", "-c", "1", "-b", "16", mic, "pad", "3", "0"],
                       check=True, capture_output=True)
        long_text = ("Thank you for calling. This is a long answer that keeps talking for quite a while, so that "
                     "the caller has plenty of time to interrupt it before it ends on its own. " * 3)
        tts = {"command": "tts", "playId": "long", "endOfStream": True, "text": long_text}
        option = {"vad": {"type": "silero"}, "tts": {"provider": "piper"},
                  "interruption": {"strategy": "vad", "ignoreFirstMs": 0}}
        [r] = await run_peer(daemon, "wrtc-barge", "--wav", mic, "--seconds", "30", "--wait-track-end", "long",
                             "--command", json.dumps(tts), "--option", json.dumps(option), timeout_s=90)
        self._ok(r)
        events = [e for e in r["events"] if e.get("playId") == "long"]
        kinds = [e["event"] for e in events]
        self.assertIn("interruption", kinds, r["events"])
        self.assertLess(kinds.index("interruption"), kinds.index("trackEnd"))
        cut = events[kinds.index("interruption")]
        self.assertGreater(cut["current"], 0)
        self.assertLess(cut["current"], cut["totalDuration"])
        self.assertIn(("speaking", "wrtc-barge"), names(r))

    async def test_candidates_before_invite_are_buffered(self) -> None:
        """Every candidate sent before the invite (the offer has none): kept, applied when the leg starts."""
        daemon = await self._start()
        # 2.5 s: the daemon's aiortc sends a receiver report every 0.5-1.5 s.
        [r] = await run_peer(daemon, "wrtc-early", "--trickle", "--canary", "--pre-invite", "99", "--seconds", "2.5")
        self._ok(r)
        self.assertGreaterEqual(r["canary_checks"], 1, "the buffered canary was checked")
        self.assertEqual(names(r)[:2], [("trackStart", "wrtc-early"), ("answer", "wrtc-early")])
        self.assertNotIn("error", [e for e, _ in names(r)])
        self.assertGreaterEqual(r["stats"]["inbound"]["packetsReceived"], 100, r["stats"])
        self.assertIsNotNone(r["stats"]["remote_inbound"], f"no RTCP receiver report from the daemon: {r['stats']}")
        self.assertGreaterEqual(r["stats"]["remote_inbound"]["packetsReceived"], 25, "the daemon received our audio")

    async def test_peer_closed_by_client_ends_only_the_media(self) -> None:
        """The client closes its peer: trackEnd{sid} while /list still has the session; hangup{sid} only
        after the client's hangup command."""
        daemon = await self._start()
        [r] = await run_peer(daemon, "wrtc-peer", "--end", "peer", "--seconds", "1", "--codec", "pcmu")
        self._ok(r)
        self.assertEqual(r["answer_codec"], "pcmu")
        self.assertTrue(r["listed_after_peer_close"], "the session stays after its peer closed")
        self.assertFalse(r["hangup_before_command"], "no hangup before the client's command")
        seen = names(r)
        self.assertIn(("trackEnd", "wrtc-peer"), seen)
        self.assertEqual(seen.count(("trackEnd", "wrtc-peer")), 1, seen)
        self.assertEqual(seen[-1], ("hangup", "wrtc-peer"))
        self.assertLess(seen.index(("trackEnd", "wrtc-peer")), seen.index(("hangup", "wrtc-peer")))
        self.assertGreaterEqual(r["peer_track_end_duration"], 900)
        body = await (await treq.get(daemon.base_url + "/list")).json()
        self.assertEqual(body["active_calls"], [])

    async def test_hundred_sessions_leave_nothing_behind(self) -> None:
        """10 rounds of 10 concurrent short sessions (trickled, hung up, peers closed, sockets closed): the
        daemon's descriptors and UDP ports come back to what they were after a warm-up, its threads stop growing,
        /list is empty and no peer connection stays open."""
        daemon = await self._start()
        pid = daemon.transport.pid
        wav = os.path.join(self.media, "agent.wav")
        write_tone(wav, 2, 660)
        # Warm-up at the rounds' concurrency, both kinds: the thread pools (file reads, records) grow to
        # what 10 sessions at once need and keep those workers, and the file gets into the media cache.
        for kind in ((), ("--trickle",)):
            warm = await run_peer(daemon, "wrtc-warm", "--sessions", "10", "--seconds", "0.4", "--play", wav, *kind)
            for r in warm:
                self._ok(r)

        async def idle() -> bool:
            body = await (await treq.get(daemon.base_url + "/list")).json()
            return not body["active_calls"]

        await until(idle, 15, lambda: "warm-up sessions still listed")
        metrics_text = await (await treq.get(daemon.base_url + "/metrics")).text()
        peers_metric = next((line.split()[0] for line in metrics_text.splitlines()
                             if "webrtc" in line and not line.startswith("#")), None)
        before = ProcState(pid)

        ends = ["hangup", "peer", "socket"]
        reports: list[dict[str, Any]] = []
        halfway: ProcState | None = None
        for i, end in enumerate(ends + ends + ends + ["hangup"]):
            args = ["--sessions", "10", "--seconds", "0.4", "--end", end, "--play", wav]
            if i % 2:
                args.append("--trickle")
            reports += await run_peer(daemon, f"wrtc-r{i}", *args, timeout_s=90)
            if i == 4:
                await until(idle, 15, lambda: "first 50 sessions still listed")
                halfway = ProcState(pid)
        assert halfway is not None
        self.assertEqual(len(reports), 100)
        for r in reports:
            self._ok(r)
        # Media flowed in (nearly) every session; on a loaded machine the first agent packets of a 0.4 s
        # call may come after its end.
        heard = [r["sid"] for r in reports if (r["stats"]["inbound"] or {}).get("packetsReceived")]
        self.assertGreaterEqual(len(heard), 90, f"sessions that received agent audio: {len(heard)} of 100")

        async def settled() -> Any:
            after = ProcState(pid)
            body = await (await treq.get(daemon.base_url + "/list")).json()
            state["after"], state["list"] = after, body["active_calls"]
            # The thread pools (the reactor's, asyncio's executor) grow on a burst and keep their workers,
            # up to sizes that depend on the machine: a leak shows as growth over the second 50 sessions.
            return (not body["active_calls"] and after.udp == before.udp and after.fds <= before.fds
                    and after.threads <= max(before.threads + 2, halfway.threads + 1))

        state: dict[str, Any] = {}
        await until(settled, 30, lambda: f"before {before!r}; halfway {halfway!r}; after {state.get('after')!r}; list {state.get('list')}")
        if peers_metric is not None:
            metrics_text = await (await treq.get(daemon.base_url + "/metrics")).text()
            values = [line.split()[-1] for line in metrics_text.splitlines() if line.startswith(peers_metric + " ")]
            self.assertEqual([float(v) for v in values], [0.0], f"{peers_metric}: {values}")
