"""End to end on a real SIP call: the daemon hears a G.711 callee speak (Silero VAD, offline Whisper) and is
barged in on.

SIPp is the far end (``sipp/uas_play_pcap.xml``): it answers our ``/call/sip`` invite with PCMU and plays
``speech.pcap``, espeak-ng speech resampled to 8 kHz and μ-law encoded as 20 ms RTP packets, written by the
test with ``media_peer``'s pcap helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import wave
from typing import Any

import numpy as np
from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from harness import BASE_CONFIG, CallClient, Daemon, connect, free_port, start_daemon
from media_peer import RtpStream, g711_rtp_packets, write_rtp_pcap

from activecall.media.resample import Resampler

SCENARIO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp", "uas_play_pcap.xml")
PCAP_RATE = 8000
SID = "sip-hear"
#: Peak above which a mirrored agent frame is speech, not silence or dither.
AUDIBLE = 300


def speech_pcap(text: str, path: str, lead_s: float = 1.0, tail_s: float = 1.0) -> tuple[int, int]:
    """Write ``text`` spoken by espeak-ng as a μ-law RTP pcap with ``lead_s``/``tail_s`` of silence around
    it; returns when the voice starts in the pcap and how long it lasts (ms; espeak's own quiet edges
    excluded)."""
    wav = path + ".wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", wav, text], check=True, capture_output=True)
    with wave.open(wav, "rb") as w:
        pcm, rate = w.readframes(w.getnframes()), w.getframerate()
    resampler = Resampler(rate, PCAP_RATE)
    words = resampler.process(pcm) + resampler.flush()
    words += bytes(-len(words) % 320)  # whole 20 ms packets
    lead = int(PCAP_RATE * lead_s)
    pcm8k = bytes(lead * 2) + words + bytes(int(PCAP_RATE * tail_s) * 2)
    write_rtp_pcap(path, g711_rtp_packets(RtpStream(), pcm8k, alaw=False))
    voiced = np.nonzero(np.abs(np.frombuffer(words, "<i2")) > AUDIBLE)[0]
    return (lead + int(voiced[0])) * 1000 // PCAP_RATE, int(voiced[-1] - voiced[0]) * 1000 // PCAP_RATE


def audible(frame: bytes) -> bool:
    """A mirrored agent frame (tag 0x00) carrying sound."""
    return frame[:1] == b"\x00" and int(np.abs(np.frombuffer(frame[1:], "<i2")).max(initial=0)) > AUDIBLE


class SipSpeechTests(TestCase):
    timeout = 90

    async def _call(self, option: dict[str, Any], *,
                    lead_s: float = 1.0) -> tuple[CallClient, Daemon, tuple[int, int], list[int]]:
        """Daemon, a SIPp UAS playing the speech pcap, and an answered ``/call/sip`` invite to it with ``option``.

        Returns the client, SIPp, the voice's start and length in the pcap (ms) and, per text event, how many
        binary frames had arrived before it (so "after the interruption" is exact socket order, not a time guess).
        """
        for tool in ("sipp", "espeak-ng"):
            if shutil.which(tool) is None:
                raise SkipTest(f"{tool} is not installed")
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.workdir = workdir
        voice = speech_pcap("Please call me tomorrow at nine in the morning.", os.path.join(workdir, "speech.pcap"),
                            lead_s=lead_s)
        base = 20000 + free_port(socket.SOCK_DGRAM) % 20000 & ~1
        daemon = await start_daemon(workdir, f"rtp_start_port = {base}\nrtp_end_port = {base + 100}\n" + BASE_CONFIG)
        self.addCleanup(daemon.stop)
        sipp_port = free_port(socket.SOCK_DGRAM)
        sipp = Daemon()
        argv = ["sipp", "-sf", SCENARIO, "-p", str(sipp_port), "-i", "127.0.0.1",
                "-mp", str(free_port(socket.SOCK_DGRAM) & ~1), "-m", "1", "-nostdin", "-timeout", "60s",
                "-trace_err", "-error_file", os.path.join(workdir, "sipp_errors.log")]
        reactor.spawnProcess(sipp, shutil.which("sipp"), argv, env=dict(os.environ), path=workdir)
        self.addCleanup(sipp.stop)
        client = await connect(f"{daemon.ws_url}/call/sip?id={SID}")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        marks: list[int] = []
        on_message = client.onMessage

        def mark(payload: bytes, isBinary: bool) -> None:
            if not isBinary:
                marks.append(len(client.frames))
            on_message(payload, isBinary)

        client.onMessage = mark  # type: ignore[method-assign]
        client.send({"command": "invite", "option": {
            "callee": f"sip:agent@127.0.0.1:{sipp_port}", "caller": "sip:bot@127.0.0.1", **option}})
        answer = await client.wait_event("answer", trackId=SID)
        self.assertIn("PCMU/8000", answer["sdp"])
        self.answer = answer
        return client, sipp, voice, marks

    async def _hang_up(self, client: CallClient, sipp: Daemon) -> None:
        """Our BYE ends the call; SIPp answers it and exits cleanly."""
        client.send({"command": "hangup"})
        hangup = await client.wait_event("hangup", trackId=SID)
        self.assertEqual(hangup["reason"], "byClient")
        await client.wait_closed()
        (code,) = await sipp.wait_exit()
        self.assertEqual(code, 0, sipp.output[-2000:] + self._sipp_errors())

    def _sipp_errors(self) -> str:
        path = os.path.join(self.workdir, "sipp_errors.log")
        if not os.path.exists(path):
            return ""
        with open(path, errors="replace") as f:
            return f.read()[-2000:]

    async def test_callee_speech_gives_vad_events_and_transcript(self) -> None:
        """1 s silence, speech, 1 s silence over PCMU: speaking then silence as long as the speech, an
        asrFinal with the words, the ASR's completion metric; our hangup's BYE ends SIPp cleanly."""
        client, sipp, (onset_ms, speech_ms), _ = await self._call(
            {"vad": {"type": "silero"}, "asr": {"provider": "whisper"}})
        answered_at = self.answer["timestamp"]
        final = await client.wait_event("asrFinal", trackId=SID, timeout_s=20)
        text = final["text"].lower()
        self.assertIn("call me", text, final)
        self.assertTrue({"tomorrow", "nine", "morning"} & set(text.replace(",", " ").replace(".", " ").split()), final)
        names = [e["event"] for e in client.events]
        self.assertIn("speaking", names)
        self.assertIn("silence", names)
        self.assertLess(names.index("speaking"), names.index("silence"))
        self.assertLess(names.index("silence"), names.index("asrFinal"))
        speaking = next(e for e in client.events if e["event"] == "speaking")
        ended = next(e for e in client.events if e["event"] == "silence")
        self.assertLess(abs(ended["duration"] - speech_ms), 400, (ended, speech_ms))
        self.assertEqual(ended["startTime"], speaking["startTime"])
        # The voice starts just after 1 s into the pcap, which SIPp plays once it has our ACK.
        self.assertLess(abs(speaking["startTime"] - answered_at - onset_ms), 400, (speaking, answered_at, onset_ms))
        completed = await client.wait_event("metrics", key="completed.asr.whisper")
        self.assertEqual(completed["data"], {"index": 0})
        self.assertFalse([e for e in client.events if e["event"] == "error"], json.dumps(client.events)[-2000:])
        await self._hang_up(client, sipp)

    async def test_callee_talking_over_tts_interrupts_it(self) -> None:
        """The callee speaks while our long piper TTS plays: interruption with the playId, trackEnd, and no
        audible agent audio is sent after the interruption (≤ 2 frames already in flight)."""
        client, sipp, _, marks = await self._call({
            "vad": {"type": "silero"}, "tts": {"provider": "piper"}, "subscribe": True,
            "interruption": {"strategy": "vad", "ignoreFirstMs": 0}}, lead_s=5.0)
        client.send({"command": "tts", "playId": "long", "endOfStream": True, "text":
                     "Thank you for calling. This is a long answer that keeps talking for quite a while, so that "
                     "the caller has plenty of time to interrupt it before it ends on its own."})
        cut = await client.wait_event("interruption", trackId="server-side-track", timeout_s=20)
        self.assertEqual(cut["playId"], "long")
        self.assertGreater(cut["current"], 0)
        cut_index = client.events.index(cut)
        await client.wait_event("trackEnd", trackId="server-side-track", playId="long")
        speaking = [i for i, e in enumerate(client.events) if e["event"] == "speaking"]
        self.assertTrue(speaking and speaking[0] <= cut_index, "the callee's speech is what cut the TTS")
        before = [f for _, f in client.frames[:marks[cut_index]] if audible(f)]
        self.assertGreater(len(before), 25, "half a second of agent speech went out before the cut")
        # Mirrored audio keeps flowing (silence) after the cut: wait for a second of it, then look.
        await client.wait_frames(marks[cut_index] + 2 * 50, timeout_s=10)
        late = [f for _, f in client.frames[marks[cut_index]:] if audible(f)]
        self.assertLessEqual(len(late), 2, f"{len(late)} audible agent frames after the interruption")
        await self._hang_up(client, sipp)
