"""End to end: the real daemon hears a /call client speak (Silero VAD, offline Whisper) and is barged in on."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import wave
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import SkipTest, TestCase

from harness import BASE_CONFIG, CallClient, connect, start_daemon

from activecall.media.resample import Resampler

RATE = 16000
FRAME = RATE // 50 * 2  # 20 ms


def speech(text: str, workdir: str) -> bytes:
    """``text`` spoken by espeak-ng, as 16 kHz s16le mono."""
    if shutil.which("espeak-ng") is None:
        raise SkipTest("espeak-ng is not installed")
    path = os.path.join(workdir, "speech.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", path, text], check=True, capture_output=True)
    with wave.open(path, "rb") as w:
        pcm, rate = w.readframes(w.getnframes()), w.getframerate()
    resampler = Resampler(rate, RATE)
    return resampler.process(pcm) + resampler.flush()


class _Talker:
    """Sends PCM to the daemon in real time, 20 ms per frame, like a caller's phone."""

    def __init__(self, client: CallClient, pcm: bytes) -> None:
        self._client = client
        self._pcm = pcm
        self._pos = 0
        self.sent_at: list[float] = []
        self._loop = LoopingCall(self._send)
        self.done = self._loop.start(0.02)

    def _send(self) -> None:
        # The daemon may be closing the socket (a hang-up): ``closed`` is set only once it is closed.
        if self._pos >= len(self._pcm) or self._client.closed or self._client.state != self._client.STATE_OPEN:
            self._loop.stop()
            return
        self._client.sendMessage(self._pcm[self._pos:self._pos + FRAME], isBinary=True)
        self._pos += FRAME
        self.sent_at.append(reactor.seconds())

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()


class SpeechTests(TestCase):
    timeout = 120

    async def _session(self, sid: str, option: dict[str, Any]) -> CallClient:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.workdir = workdir
        daemon = await start_daemon(workdir, BASE_CONFIG)
        self.addCleanup(daemon.stop)
        client = await connect(f"{daemon.ws_url}/call?id={sid}")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": RATE, **option}})
        await client.wait_event("answer", trackId=sid)
        return client

    async def test_vad_events_partials_and_transcript(self) -> None:
        """Silence, speech, silence: speaking then silence with the speech's times; asrDelta before an asrFinal
        holding the spoken words."""
        client = await self._session("hear-1", {"vad": {"type": "silero"}, "asr": {"provider": "whisper"}})
        words = speech("Please call me tomorrow at nine in the morning.", self.workdir)
        silence = bytes(RATE * 2)
        talker = _Talker(client, silence + words + silence + silence)
        self.addCleanup(talker.stop)
        final = await client.wait_event("asrFinal", trackId="hear-1", timeout_s=60)
        text = final["text"].lower()
        self.assertIn("call me tomorrow", text)
        names = [e["event"] for e in client.events]
        self.assertLess(names.index("speaking"), names.index("silence"))
        self.assertLess(names.index("asrDelta"), names.index("asrFinal"), "partials come before the final")
        speaking = next(e for e in client.events if e["event"] == "speaking")
        ended = next(e for e in client.events if e["event"] == "silence")
        speech_ms = len(words) * 1000 // (RATE * 2)
        onset_sent = talker.sent_at[50] * 1000  # the first speech frame (after 1 s of silence)
        self.assertLess(abs(speaking["startTime"] - onset_sent), 400)
        self.assertLess(abs(ended["duration"] - speech_ms), 600, (ended, speech_ms))
        self.assertEqual(ended["startTime"], speaking["startTime"])
        self.assertGreater(final["endTime"], final["startTime"])
        completed = await client.wait_event("metrics", key="completed.asr.whisper")
        self.assertEqual(completed["data"], {"index": 0})
        self.assertIn("ttfb.asr.whisper", {e.get("key") for e in client.events})

    async def test_barge_in_stops_agent_audio_within_a_tick(self) -> None:
        """The caller talking over TTS: interruption with playId and position, then no more agent audio."""
        client = await self._session("hear-2", {
            "vad": {"type": "silero"}, "tts": {"provider": "piper"},
            "interruption": {"strategy": "vad", "ignoreFirstMs": 0}})
        client.send({"command": "tts", "playId": "long", "endOfStream": True, "text":
                     "Thank you for calling. This is a long answer that keeps talking for quite a while, so that "
                     "the caller has plenty of time to interrupt it before it ends on its own."})
        await client.wait_frames(25, timeout_s=30)  # half a second of agent audio is out
        words = speech("Stop, I want to speak to a person.", self.workdir)
        talker = _Talker(client, words + bytes(RATE))
        self.addCleanup(talker.stop)
        cut = await client.wait_event("interruption", trackId="server-side-track", timeout_s=30)
        cut_at = reactor.seconds()
        self.assertEqual(cut["playId"], "long")
        self.assertGreater(cut["current"], 0)
        end = await client.wait_event("trackEnd", trackId="server-side-track", playId="long")
        await talker.done
        late = [f for at, f in client.frames if at > cut_at + 0.05]
        self.assertEqual(late, [], "no agent audio after the interruption (beyond frames already in flight)")
        self.assertGreaterEqual(end["duration"], 500)

    async def test_agc_lifts_a_quiet_caller_for_the_recognizer(self) -> None:
        """Two calls on one daemon hear the same quiet caller (espeak 30 dB down); an OpenAI-compatible
        transcription server on 127.0.0.1 receives each utterance.  With ``agc`` it arrives over 10 dB
        louder, and it is transcribed on both."""
        from email.parser import BytesParser
        from email.policy import HTTP

        import numpy as np
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        heard: dict[str, list[float]] = {}

        class Transcriptions(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                body = request.content.read()
                ctype = request.getHeader("content-type").encode()
                form = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype + b"\r\n\r\n" + body)
                parts = {p.get_param("name", header="content-disposition"): p for p in form.iter_parts()}
                with wave.open(io.BytesIO(parts["file"].get_payload(decode=True)), "rb") as w:
                    pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)
                caller = request.getHeader("authorization").split("-")[-1]
                heard.setdefault(caller, []).append(float(10 * np.log10(np.mean(pcm ** 2) / 32768 ** 2 + 1e-12)))
                request.setHeader("content-type", "application/json")
                return json.dumps({"text": "call me tomorrow"}).encode()

        port = reactor.listenTCP(0, Site(Transcriptions()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = f"http://127.0.0.1:{port.getHost().port}/v1"

        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        daemon = await start_daemon(workdir, BASE_CONFIG)
        self.addCleanup(daemon.stop)
        words = np.frombuffer(speech("Please call me tomorrow at nine in the morning.", workdir), dtype="<i2")
        quiet = (words.astype(np.float64) * 10 ** (-30 / 20)).astype("<i2").tobytes()
        hiss = (np.random.RandomState(3).randn(RATE) * 3).astype("<i2").tobytes()  # -80 dBFS line noise
        clients = {}
        for name, extra in (("plain", {}), ("agc", {"agc": {}})):
            client = await connect(f"{daemon.ws_url}/call?id=agc-{name}")
            self.addCleanup(lambda c=client: c.transport.loseConnection() if not c.closed else None)
            client.send({"command": "invite", "option": {
                "codec": "pcm", "sampleRate": RATE, "vad": {"type": "silero"},
                "asr": {"provider": "openai", "endpoint": endpoint, "secretKey": f"sk-{name}"}, **extra}})
            await client.wait_event("answer", trackId=f"agc-{name}")
            clients[name] = client
        talkers = [_Talker(c, hiss + quiet + hiss + hiss) for c in clients.values()]
        for talker in talkers:
            self.addCleanup(talker.stop)
        for name, client in clients.items():
            final = await client.wait_event("asrFinal", trackId=f"agc-{name}", timeout_s=60)
            self.assertEqual(final["text"], "call me tomorrow")
        self.assertEqual(sorted(heard), ["agc", "plain"])
        self.assertGreater(max(heard["agc"]) - max(heard["plain"]), 10.0, heard)
