"""End to end: inbound SIP calls answered by playbooks, the caller a SIPp UAC speaking and pressing keys.

SIPp (``media_fixtures/uac_pcap_until_bye.xml``) dials the daemon, plays ``caller.pcap`` and waits for the
daemon's BYE. The pcap is written by the test: espeak-ng speech as PCMA and RFC 4733 key presses, on one RTP
timeline that starts at the ACK. The daemon hears with Silero VAD and offline Whisper and speaks with Piper;
what it did is read back from the session's event dump (``<recording path>/<dialogId>.events.jsonl``) and
from the call's recording.

The timelines below are set against Piper's lengths of the shipped ``default.md`` prompts (greeting 2.7 s,
menu 8.8 s, about 9.3 s, callback 3.7 s, validation error 4.7 s), with seconds of margin either side.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import wave
from typing import Any, Iterable

import numpy as np
from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from harness import BASE_CONFIG, REPO, Daemon, free_port, start_daemon
from media_peer import RtpStream, dtmf_rtp_packets, g711_rtp_packets, until, write_rtp_pcap

from activecall.media.resample import Resampler
from activecall.testing_llm import ScriptedLlm, TextReply, listen_llm

SCENARIO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "media_fixtures", "uac_pcap_until_bye.xml")
RATE = 8000


def espeak(text: str, workdir: str) -> bytes:
    """``text`` spoken by espeak-ng as 8 kHz s16le, whole 20 ms packets."""
    wav = os.path.join(workdir, "say.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", wav, text], check=True, capture_output=True)
    with wave.open(wav, "rb") as w:
        pcm, rate = w.readframes(w.getnframes()), w.getframerate()
    resampler = Resampler(rate, RATE)
    words = resampler.process(pcm) + resampler.flush()
    return words + bytes(-len(words) % 320)


def caller_pcap(path: str, workdir: str, script: Iterable[tuple[float, str, str]]) -> None:
    """Write the caller's side: ``(at_s, "say" | "keys", what)`` in time order, silence in between."""
    stream = RtpStream()
    packets: list[tuple[float, bytes]] = []
    for at_s, kind, what in script:
        gap = at_s - stream.t
        if gap > 0:
            packets += g711_rtp_packets(stream, bytes(int(gap / 0.02) * 320))
        if kind == "say":
            packets += g711_rtp_packets(stream, espeak(what, workdir))
        else:
            for key in what:
                packets += dtmf_rtp_packets(stream, key)
                packets += g711_rtp_packets(stream, bytes(320 * 10))  # 200 ms between presses
    packets += g711_rtp_packets(stream, bytes(320 * 50))
    write_rtp_pcap(path, packets)


class InboundPlaybookTests(TestCase):
    timeout = 150

    async def _call(self, playbook_name: str, playbook: str, script: Iterable[tuple[float, str, str]],
                    ) -> list[dict[str, Any]]:
        """Route every inbound call to ``playbook``; SIPp calls with ``script``; returns the call's dumped events
        once SIPp got the daemon's BYE and exited cleanly."""
        for tool in ("sipp", "espeak-ng"):
            if shutil.which(tool) is None:
                raise SkipTest(f"{tool} is not installed")
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "config", "playbook"))
        self.workdir = workdir
        with open(os.path.join(workdir, "config", "playbook", playbook_name), "w") as f:
            f.write(playbook)
        caller_pcap(os.path.join(workdir, "caller.pcap"), workdir, script)
        base = 20000 + free_port(socket.SOCK_DGRAM) % 20000 & ~1
        config = (f"rtp_start_port = {base}\nrtp_end_port = {base + 100}\n"
                  + BASE_CONFIG.replace("[recording]", "[recording]\nenabled = true\nauto_start = true")
                  + f'[handler]\ntype = "playbook"\ndefault = "{playbook_name}"\n')
        daemon = await start_daemon(workdir, config)
        self.addCleanup(daemon.stop)
        self.daemon = daemon
        sipp = Daemon()
        argv = ["sipp", "-sf", SCENARIO, f"127.0.0.1:{daemon.sip_port}", "-s", "agent",
                "-p", str(free_port(socket.SOCK_DGRAM)), "-i", "127.0.0.1",
                "-mp", str(free_port(socket.SOCK_DGRAM) & ~1), "-m", "1", "-nostdin", "-timeout", "90s",
                "-trace_err", "-error_file", os.path.join(workdir, "sipp_errors.log")]
        reactor.spawnProcess(sipp, shutil.which("sipp"), argv, env=dict(os.environ), path=workdir)
        self.addCleanup(sipp.stop)
        (code,) = await sipp.wait_exit(100)
        self.assertEqual(code, 0, "SIPp got the daemon's BYE\n" + sipp.output[-2000:] + daemon.output[-3000:])
        await until(reactor, lambda: any(e.get("event") == "hangup" for e in self._dumped_events()), "the dumped hangup")
        return self._dumped_events()

    def _dumped_events(self) -> list[dict[str, Any]]:
        """The events of the call's dump so far (each line ``{"type": "event", "content": "<event JSON>"}``)."""
        paths = glob.glob(os.path.join(self.workdir, "recorders", "*.events.jsonl"))
        if not paths:
            return []
        [path] = paths
        with open(path) as f:
            records = [json.loads(line) for line in f.read().splitlines() if line.endswith("}")]
        return [json.loads(r["content"]) for r in records if r.get("type") == "event"]

    def _agent_audible(self) -> bool:
        """The recording's agent channel (right) carries speech."""
        [path] = glob.glob(os.path.join(self.workdir, "recorders", "*.wav"))
        with wave.open(path) as w:
            frames = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
        return int(np.abs(frames[:, 1]).max()) > 1000

    @staticmethod
    def _spoken(events: list[dict[str, Any]]) -> list[str]:
        """What the agent said, one entry per play (its first piece when streamed), edges stripped."""
        return [e["data"]["text"].strip() for e in events
                if e.get("event") == "metrics" and e.get("key") == "tts_play_id_map"]

    @staticmethod
    def _default_playbook() -> str:
        with open(os.path.join(REPO, "etc", "playbook", "default.md")) as f:
            return f.read()

    async def test_default_ivr_spoken_keyword_then_key(self) -> None:
        """default.md: "what can you do?" over the menu takes the about branch (barge-in, Whisper,
        words=); back in the menu, key 0 takes the goodbye branch, whose <hangup/> sends our BYE."""
        events = await self._call("default.md", self._default_playbook(), [
            (5.0, "say", "What can you do?"),
            (21.0, "keys", "0"),
        ])
        finals = [e["text"].lower() for e in events if e.get("event") == "asrFinal"]
        self.assertTrue(any("what can you do" in t for t in finals), finals)
        spoken = self._spoken(events)
        self.assertEqual(spoken[0], "Hello, you are speaking with the activecall demo.")
        self.assertTrue(spoken[1].startswith("To hear what this line can do"), spoken)
        about = next(i for i, t in enumerate(spoken) if t.startswith("This line is answered by activecall"))
        self.assertTrue(spoken[about + 1].startswith("To hear what this line can do"), spoken)
        self.assertEqual(spoken[-1], "Goodbye.", spoken)
        self.assertIn("0", [e.get("digit") for e in events if e.get("event") == "dtmf"])
        names = [e.get("event") for e in events]
        self.assertIn("interruption", names, "the caller's words cut the menu prompt")
        hangup = next(e for e in events if e.get("event") == "hangup")
        self.assertEqual(hangup["reason"], "bySystem", hangup)
        self.assertFalse([e for e in events if e.get("event") == "error"], events)
        self.assertTrue(self._agent_audible())

    async def test_default_ivr_key_into_collector_with_validation_and_retry(self) -> None:
        """default.md: key 2 cuts the menu for the call-back collector; "5*5#" fails the pattern (the
        playbook's error message, a retry), "5551234#" is collected and read back in the thanks scene,
        which hangs up."""
        events = await self._call("default.md", self._default_playbook(), [
            (5.0, "keys", "2"),
            (11.0, "keys", "5*5#"),
            (19.0, "keys", "5551234#"),
        ])
        spoken = self._spoken(events)
        self.assertEqual([e.get("digit") for e in events if e.get("event") == "dtmf"],
                         list("2") + list("5*5#") + list("5551234#"))
        self.assertTrue(any(t.startswith("Please type your phone number") for t in spoken), spoken)
        self.assertTrue(any(t.startswith("That did not look like a phone number") for t in spoken), spoken)
        self.assertEqual(spoken[-1], "Thank you. We will call you back at 5551234. Goodbye.", spoken)
        self.assertFalse(any(t.startswith("This line is answered") for t in spoken), "no other branch taken")
        self.assertTrue(self._agent_audible())

    async def test_llm_playbook_hears_the_caller_and_hangs_up(self) -> None:
        """An LLM playbook on an inbound call: greeting, the caller's words reach the model (a local
        OpenAI-compatible server) as the user turn, the streamed reply is spoken and its <hangup/> ends the
        call with our BYE."""
        llm = ScriptedLlm(reactor, replies=(TextReply(chunks=("We open at nine", " tomorrow. Goodbye! <hang", "up/>")),))
        listening = listen_llm(reactor, llm)
        self.addCleanup(listening.stop)
        playbook = f"""---
asr: {{provider: whisper, language: en}}
tts: {{provider: piper}}
vad: {{type: silero}}
llm:
  provider: openai
  baseUrl: {listening.base_url}
  model: scripted
greeting: Hello, this is the shop.
---
You are the shop's phone assistant. The caller dialled {{{{ callee }}}}.
"""
        events = await self._call("shop.md", playbook, [(3.5, "say", "When do you open tomorrow?")])
        [request] = llm.requests
        self.assertEqual(request.messages[0]["role"], "system")
        self.assertIn("The caller dialled sip:agent@", request.messages[0]["content"])
        self.assertEqual(request.messages[-1]["role"], "user")
        self.assertIn("open", request.messages[-1]["content"].lower())
        spoken = self._spoken(events)
        self.assertEqual(spoken[0], "Hello, this is the shop.")
        self.assertEqual(spoken[1], "We open at nine", "the reply's first clause is spoken as it streams")
        said = [e["text"] for e in events if e.get("event") == "addHistory" and e.get("speaker") == "assistant"]
        self.assertEqual(said[-1], "We open at nine tomorrow. Goodbye! <hangup/>")
        self.assertFalse(any("<" in t for t in spoken), spoken)
        hangup = next(e for e in events if e.get("event") == "hangup")
        self.assertEqual(hangup["reason"], "bySystem", hangup)
        self.assertTrue(self._agent_audible())
