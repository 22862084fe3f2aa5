"""End to end in a real browser: headless Chromium loads the daemon's test page and calls it over WebRTC.

The fake microphone plays espeak-ng speech (the daemon hears it: VAD, ASR); the agent's TTS comes
back on the same peer connection and is measured with WebAudio in the page (protocol.md §5.2).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import wave
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from chromium import Chromium, chromium_path
from harness import BASE_CONFIG, Daemon, free_port, start_daemon

from activecall.media.resample import Resampler

RATE = 16000
SPOKEN = "Please call me tomorrow at nine in the morning."
GREETING = "Hello, thank you for calling. This is the automated test agent speaking to you now."
OPTION = {"vad": {"type": "silero"}, "asr": {"provider": "whisper"}, "tts": {"provider": "piper"}}
PLAYBOOK_GREETING = "Welcome to the playbook test call."
# The model is never reached in these tests (nothing listens on port 9).
PLAYBOOK = ("---\ngreeting: " + PLAYBOOK_GREETING + "\nllm:\n  provider: openai\n  baseUrl: http://127.0.0.1:9/v1\n"
            "---\nYou are a test agent.\n")


def fake_mic_wav(text: str, workdir: str) -> str:
    """A 16 kHz mono WAV: 1 s silence, ``text`` spoken by espeak-ng, 2 s silence (Chromium loops it)."""
    if shutil.which("espeak-ng") is None:
        raise SkipTest("espeak-ng is not installed")
    raw = os.path.join(workdir, "espeak.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", raw, text], check=True, capture_output=True)
    with wave.open(raw, "rb") as w:
        pcm, rate = w.readframes(w.getnframes()), w.getframerate()
    resampler = Resampler(rate, RATE)
    words = resampler.process(pcm) + resampler.flush()
    path = os.path.join(workdir, "mic.wav")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(bytes(RATE * 2) + words + bytes(RATE * 4))
    return path


class BrowserCallTests(TestCase):
    timeout = 180

    async def _setup(self) -> tuple[Any, Chromium]:
        if chromium_path() is None:
            raise SkipTest("chromium is not installed (apt-get install chromium)")
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "config", "playbook"))
        with open(os.path.join(workdir, "config", "playbook", "demo.md"), "w") as f:
            f.write(PLAYBOOK)
        self.workdir = workdir
        mic = fake_mic_wav(SPOKEN, workdir)
        daemon = await start_daemon(workdir, BASE_CONFIG)
        self.addCleanup(daemon.stop)
        self.daemon = daemon
        browser = await Chromium.launch(mic)
        self.addCleanup(browser.stop)
        self.browser = browser
        await browser.navigate(f"{daemon.base_url}/")
        await browser.evaluate("window.acTest.ready")
        return daemon, browser

    async def events(self) -> list[dict[str, Any]]:
        return await self.browser.evaluate("window.acTest.events")  # type: ignore[no-any-return]

    async def wait_event(self, name: str, timeout_s: float = 30, **fields: Any) -> dict[str, Any]:
        """The first page-received event ``name`` whose fields match, polled within the deadline."""
        match = " && ".join([f"e.event === {json.dumps(name)}"] +
                            [f"e[{json.dumps(k)}] === {json.dumps(v)}" for k, v in fields.items()])
        try:
            found = await self.browser.wait_for(f"window.acTest.events.find(e => {match}) || null", timeout_s,
                                                f"event {name} {fields}")
        except AssertionError as e:
            seen = [{k: v for k, v in ev.items() if k != "sdp"} for ev in await self.events()]
            raise AssertionError(f"{e}; the page got {json.dumps(seen)[-4000:]}\n--- daemon output ---\n"
                                 f"{self.daemon.output[-6000:]}") from None
        return found  # type: ignore[no-any-return]

    async def test_page_loads_with_playbooks_and_no_errors(self) -> None:
        """GET / serves the page; it lists the playbooks and records and reports no error."""
        _, browser = await self._setup()
        options = await browser.evaluate("Array.from(document.querySelectorAll('#playbook option')).map(o => o.value)")
        self.assertEqual(options, ["", "demo.md"])
        self.assertEqual(await browser.evaluate("window.acTest.state"), "idle")
        self.assertEqual(await browser.evaluate("window.acTest.errors"), [])
        self.assertEqual(browser.console_errors, [])
        self.assertEqual(browser.exceptions, [])

    async def test_call_hears_the_caller_and_plays_tts(self) -> None:
        """A WebRTC call from the page: trackStart and answer; the fake mic's speech is heard (speaking,
        asrFinal); TTS is heard in the page for about its duration; hangup ends with trackEnd and hangup."""
        _, browser = await self._setup()
        sid = await browser.evaluate(f"window.acTest.start({{option: {json.dumps(OPTION)}}})", timeout_s=60)
        self.assertTrue(sid.startswith("s."), sid)
        names = [e["event"] for e in await self.events()]
        self.assertIn("trackStart", names)
        self.assertLess(names.index("trackStart"), names.index("answer"))
        answer = await self.wait_event("answer", trackId=sid)
        self.assertIn("a=candidate", answer["sdp"])
        self.assertEqual(await browser.evaluate("window.acTest.state"), "active")

        # The daemon hears the fake microphone.
        await self.wait_event("speaking", timeout_s=30, trackId=sid)
        final = await self.wait_event("asrFinal", timeout_s=60, trackId=sid)
        self.assertIn("tomorrow", final["text"].lower())
        transcript = await browser.evaluate("window.acTest.transcript")
        self.assertIn({"speaker": "caller", "text": final["text"]}, [
            {"speaker": t["speaker"], "text": t["text"]} for t in transcript])

        # The agent speaks: audio arrives on the peer connection for about the TTS duration.
        before = await browser.evaluate("window.acTest.agentAudio")
        self.assertLess(before["nonSilentMs"], 300, before)
        play_id = await browser.evaluate(f"window.acTest.tts({json.dumps(GREETING)})")
        end = await self.wait_event("trackEnd", timeout_s=60, trackId="server-side-track", playId=play_id)
        self.assertIn({"speaker": "agent", "text": GREETING}, [
            {"speaker": t["speaker"], "text": t["text"]} for t in await browser.evaluate("window.acTest.transcript")])
        # The play lasts from the TTS start: synthesis until the first audio (ttfb), then the audio in real time.
        done = await self.wait_event("metrics", timeout_s=10, key="completed.tts.piper")
        self.assertEqual(done["data"]["playId"], play_id)
        audio_ms = end["duration"] - done["data"]["ttfb"]
        self.assertGreater(audio_ms, 2000, (end, done))
        # What was still in flight (jitter buffer, playout) is heard just after trackEnd.
        try:
            await browser.wait_for(
                f"(a => a.nonSilentMs >= {0.5 * audio_ms} && a) (window.acTest.agentAudio)", 10,
                f"agent audio for about {audio_ms} ms")
        except AssertionError as e:
            raise AssertionError(f"{e}: measured {await browser.evaluate('window.acTest.agentAudio')}, "
                                 f"RTP {await browser.evaluate('window.acTest.rtpStats()')}") from None
        heard = await browser.evaluate("window.acTest.agentAudio")
        self.assertGreater(heard["maxRms"], 0.03, heard)
        self.assertLess(heard["nonSilentMs"] - before["nonSilentMs"], audio_ms + 1000, (heard, audio_ms))
        # First to last audible window: about the audio (stretched a little when the daemon is busy).
        self.assertGreater(heard["spanMs"], 0.7 * audio_ms, (heard, audio_ms))
        self.assertLess(heard["spanMs"], 2 * audio_ms + 1000, (heard, audio_ms))
        self.assertGreater(heard["totalMs"], end["duration"], heard)

        # DTMF from the page's RTCDTMFSender arrives as RFC 4733 events.
        await browser.evaluate("window.acTest.dtmf('5#')")
        await self.wait_event("dtmf", timeout_s=15, trackId=sid, digit="5")
        await self.wait_event("dtmf", timeout_s=15, trackId=sid, digit="#")

        # Hang up from the page.
        state = await browser.evaluate("window.acTest.hangup()", timeout_s=30)
        self.assertEqual(state, "ended")
        names = [e["event"] for e in await self.events()]
        self.assertIn("trackEnd", names)
        self.assertIn("hangup", names)
        ends = [e for e in await self.events() if e["event"] == "trackEnd" and e.get("trackId") == sid]
        self.assertTrue(ends, "trackEnd of the WebRTC leg")
        self.assertEqual(await browser.evaluate("window.acTest.errors"), [])
        self.assertEqual(browser.exceptions, [])
        self.assertEqual(browser.console_errors, [])
        # The call's event dump is listed under recent calls.
        records = await browser.wait_for(
            f"fetch('/api/records').then(r => r.json()).then(l => l.find(r => r.id === {json.dumps(sid)}) || null)",
            10, "the call in /api/records")
        self.assertEqual(records["status"], "completed")

    async def test_trickled_candidates(self) -> None:
        """With trickle the offer goes out before gathering and the candidates follow as addIceCandidate;
        the call connects and carries agent audio."""
        _, browser = await self._setup()
        sid = await browser.evaluate(f"window.acTest.start({{trickle: true, option: {json.dumps(OPTION)}}})",
                                     timeout_s=60)
        commands = await browser.wait_for(
            "(c => c.some(x => x.command === 'addIceCandidate') && c)(window.acTest.commands)", 10,
            "an addIceCandidate command")
        self.assertEqual(commands[0]["command"], "invite")
        self.assertNotIn("a=candidate", commands[0]["option"]["offer"])
        for c in commands[1:]:
            self.assertEqual(c["command"], "addIceCandidate")
            self.assertTrue(c["candidate"].startswith("candidate:"), c)
            self.assertIn("sdpMLineIndex", c)
        await browser.wait_for("window.acTest.rtpStats().then(s => s && s.connectionState === 'connected')", 15,
                               "peer connected")
        play_id = await browser.evaluate("window.acTest.tts('One two three four five.')")
        await self.wait_event("trackEnd", timeout_s=60, trackId="server-side-track", playId=play_id)
        await browser.wait_for("window.acTest.agentAudio.nonSilentMs > 300", 10, "agent audio")
        self.assertEqual(await browser.evaluate("window.acTest.hangup()", timeout_s=30), "ended")
        await self.wait_event("hangup", trackId=sid)

    async def test_playbook_drives_the_call(self) -> None:
        """A playbook chosen in the page: /api/playbook/run hands out the session id the page connects
        with, and the playbook's greeting is heard."""
        _, browser = await self._setup()
        sid = await browser.evaluate(
            f"window.acTest.start({{playbook: 'demo.md', option: {json.dumps(OPTION)}}})", timeout_s=60)
        self.assertRegex(sid, r"^s\.[0-9a-f-]{36}$")
        self.assertEqual(await browser.evaluate("window.acTest.sessionId"), sid)
        await self.wait_event("trackStart", timeout_s=30, trackId="server-side-track")
        await browser.wait_for("window.acTest.agentAudio.nonSilentMs > 500", 30, "the greeting")
        transcript = await browser.evaluate("window.acTest.transcript")
        self.assertIn(PLAYBOOK_GREETING, [t["text"] for t in transcript if t["speaker"] == "agent"])
        self.assertEqual(await browser.evaluate("window.acTest.hangup()", timeout_s=30), "ended")

    async def test_autostart(self) -> None:
        """``?autostart=1`` starts a call with the page's own settings at once."""
        daemon, browser = await self._setup()
        await browser.navigate(f"{daemon.base_url}/?autostart=1")
        await browser.wait_for("window.acTest.state === 'active'", 30, "the call answered")
        names = [e["event"] for e in await self.events()]
        self.assertLess(names.index("trackStart"), names.index("answer"))
        self.assertEqual(await browser.evaluate("window.acTest.hangup()", timeout_s=30), "ended")

    async def test_refer_bridges_the_browser_to_a_phone(self) -> None:
        """refer from a WebRTC call to SIPp (which echoes RTP): the browser's microphone reaches the phone
        and the phone's audio reaches the browser, through the bridged transfer leg; hangup ends both."""
        sipp_binary = shutil.which("sipp")
        if sipp_binary is None:
            raise SkipTest("sipp (sip-tester) is not installed")
        _, browser = await self._setup()
        phone = Daemon()
        phone_port = free_port(socket.SOCK_DGRAM)
        argv = ["sipp", "-sn", "uas", "-rtp_echo", "-p", str(phone_port), "-i", "127.0.0.1",
                "-mp", str(free_port(socket.SOCK_DGRAM)), "-m", "1", "-nostdin", "-timeout", "90s"]
        reactor.spawnProcess(phone, sipp_binary, argv, env=dict(os.environ), path=self.workdir)
        self.addCleanup(phone.stop)
        sid = await browser.evaluate("window.acTest.start({option: {}})", timeout_s=60)
        await browser.wait_for("window.acTest.rtpStats().then(s => s && s.connectionState === 'connected')", 15,
                               "peer connected")
        before = await browser.evaluate("window.acTest.agentAudio.nonSilentMs")
        await browser.evaluate(f"window.acTest.send({{command: 'refer', caller: '', "
                               f"callee: 'sip:human@127.0.0.1:{phone_port}'}})")
        answer = await self.wait_event("answer", timeout_s=30, trackId="server-side-track", refer=True)
        self.assertIn("m=audio", answer["sdp"])
        # Only speech that went to the phone and came back can be heard: the page plays nothing else.
        await browser.wait_for(f"window.acTest.agentAudio.nonSilentMs > {before + 1500}", 30,
                               "the browser's own speech echoed by the phone")
        self.assertEqual(await browser.evaluate("window.acTest.hangup()", timeout_s=30), "ended")
        await self.wait_event("hangup", trackId=sid)
        (code,) = await phone.wait_exit()
        self.assertEqual(code, 0, phone.output[-2000:])
