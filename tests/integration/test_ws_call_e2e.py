"""End to end: the real daemon on 127.0.0.1 driven by a WebSocket client on /call."""

from __future__ import annotations

import io
import json
import math
import os
import struct
import wave
from typing import Any

from treq import collect
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from harness import BASE_CONFIG, CallClient, connect, http_client, spawn_daemon, start_daemon

treq = http_client()

from activecall.media._audioop import audioop

LONG_TEXT = (
    "Thank you for calling the activecall demonstration line. This sentence is long enough "
    "to keep the speech synthesizer busy for several seconds of audio. Here is one more "
    "sentence, so that an interruption has something to cut."
)


def rms(pcm: bytes) -> float:
    return float(audioop.rms(pcm, 2)) if pcm else 0.0


class WebSocketCallTests(TestCase):
    """A client opens /call, starts a call, asks for speech and hears it."""

    timeout = 120

    async def _start(self, extra: str = "", ready_text: str = " ready: ", twistd_args: tuple[str, ...] = ()) -> Any:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.workdir = workdir
        daemon = await start_daemon(workdir, extra + BASE_CONFIG, ready_text=ready_text, twistd_args=twistd_args)
        self.addCleanup(daemon.stop)
        return daemon

    async def _call(self, daemon: Any, sid: str, option: dict[str, Any]) -> CallClient:
        client = await connect(f"{daemon.ws_url}/call?id={sid}")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        client.send({"command": "invite", "option": option})
        await client.wait_event("answer", trackId=sid)
        return client

    async def test_tts_audio_frames_in_session_codec_then_track_end(self) -> None:
        """invite pcm 16 kHz + tts with Piper: trackStart, answer, >=1 s of 640-byte paced frames, trackEnd, hangup."""
        daemon = await self._start()
        client = await self._call(daemon, "e2e-1", {"codec": "pcm", "sampleRate": 16000, "tts": {"provider": "piper"}})
        self.assertEqual(client.events[0]["event"], "trackStart")
        self.assertEqual(client.events[0]["trackId"], "e2e-1")
        self.assertEqual(client.events[1]["sdp"], "")
        client.send({"command": "tts", "text": "Hello from the activecall daemon. This is a test of speech.", "playId": "p1", "endOfStream": True})
        start = await client.wait_event("trackStart", trackId="server-side-track")
        self.assertEqual(start["playId"], "p1")
        end = await client.wait_event("trackEnd", trackId="server-side-track", playId="p1")
        frames = [f for _, f in client.frames]
        self.assertGreaterEqual(len(frames), 50, "at least one second of audio")
        self.assertEqual({len(f) for f in frames}, {640})
        audio = b"".join(frames)
        self.assertGreater(rms(audio), 300, "speech, not silence")
        # Paced in real time by the media clock, not sent in a burst.
        first, last = client.frames[0][0], client.frames[-1][0]
        self.assertGreater(last - first, 0.6 * len(frames) * 0.02)
        self.assertGreaterEqual(end["duration"], len(frames) * 20 * 0.6)
        self.assertIsInstance(end["ssrc"], int)
        metrics = await client.wait_event("metrics")
        self.assertEqual(metrics["key"], "completed.tts.piper")
        client.send({"command": "hangup", "reason": "done"})
        await client.wait_event("trackEnd", trackId="e2e-1")
        hangup = await client.wait_event("hangup", trackId="e2e-1")
        self.assertEqual(hangup["reason"], "done")
        self.assertEqual(hangup["initiator"], "client")
        await client.wait_closed()

    async def test_tts_without_any_provider_speaks_with_the_default_engine(self) -> None:
        """A client written for Active Call sends tts with no provider anywhere: the offline default speaks."""
        daemon = await self._start()
        client = await self._call(daemon, "e2e-d", {"codec": "pcm", "sampleRate": 16000})
        client.send({"command": "tts", "text": "Hello with the default voice.", "playId": "d", "endOfStream": True})
        await client.wait_event("trackEnd", trackId="server-side-track", playId="d")
        self.assertFalse([e for e in client.events if e["event"] == "error"])
        frames = [f for _, f in client.frames]
        self.assertGreaterEqual(len(frames), 25)
        self.assertGreater(rms(b"".join(frames)), 300, "speech, not silence")
        metrics = await client.wait_event("metrics")
        self.assertEqual(metrics["key"], "completed.tts.piper")

    async def test_interrupt_cuts_speech_with_interruption_then_track_end(self) -> None:
        """pcmu call: interrupt while speaking gives interruption{playId,...} then trackEnd; frames are 160 bytes."""
        daemon = await self._start()
        client = await self._call(daemon, "e2e-2", {"codec": "pcmu", "tts": {"provider": "piper"}})
        client.send({"command": "tts", "text": LONG_TEXT, "playId": "long", "endOfStream": True})
        await client.wait_frames(10)
        client.send({"command": "interrupt"})
        interruption = await client.wait_event("interruption", playId="long")
        end = await client.wait_event("trackEnd", trackId="server-side-track", playId="long")
        self.assertLess(client.events.index(interruption), client.events.index(end))
        self.assertGreater(interruption["current"], 0)
        self.assertGreaterEqual(interruption["totalDuration"], interruption["current"])
        self.assertIn("Thank you", interruption["subtitle"])
        self.assertEqual({len(f) for _, f in client.frames}, {160})
        # The speech stopped: far fewer frames than the whole text would give.
        self.assertLess(len(client.frames), 400)

    async def test_play_wav_file(self) -> None:
        """play of a 44.1 kHz stereo WAV is resampled to the session rate and ends with trackEnd."""
        daemon = await self._start()
        # Local play reads only under [fetch] media_dirs (default ./config/media of the daemon's cwd).
        media = os.path.join(self.workdir, "config", "media")
        os.makedirs(media)
        path = os.path.join(media, "tone.wav")
        with wave.open(path, "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(44100)
            samples = [int(8000 * math.sin(2 * math.pi * 440 * i / 44100)) for i in range(44100)]
            w.writeframes(b"".join(struct.pack("<hh", s, s) for s in samples))
        client = await self._call(daemon, "e2e-3", {"codec": "pcm", "sampleRate": 8000})
        client.send({"command": "play", "url": path})
        start = await client.wait_event("trackStart", trackId="server-side-track")
        self.assertEqual(start["playId"], path)
        await client.wait_event("trackEnd", trackId="server-side-track", playId=path)
        frames = [f for _, f in client.frames]
        self.assertEqual({len(f) for f in frames}, {320})
        self.assertIn(len(frames), range(49, 52))
        self.assertGreater(rms(b"".join(frames)), 3000)
        client.send({"command": "play", "url": os.path.join(media, "missing.wav")})
        error = await client.wait_event("error", sender="filetrack: " + os.path.join(media, "missing.wav"))
        self.assertEqual(error["trackId"], "server-side-track")
        # Outside the media directories: refused, naming the field, and the call goes on.
        client.send({"command": "play", "url": "/etc/passwd"})
        error = await client.wait_event("error", sender="filetrack: /etc/passwd")
        self.assertEqual(error["error"], "invalid url: /etc/passwd is not in a media directory")
        client.send({"command": "play", "url": path, "playId": "again"})
        await client.wait_event("trackEnd", trackId="server-side-track", playId="again")

    async def test_play_over_http_and_openai_tts_against_local_servers(self) -> None:
        """play fetches an http URL; tts with provider openai streams from an OpenAI-compatible server."""
        from twisted.internet import reactor
        from twisted.web.resource import Resource
        from twisted.web.server import Site
        from twisted.web.static import Data

        requests: list[dict[str, Any]] = []

        class Speech(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                requests.append({"auth": request.getHeader("authorization"), "body": json.loads(request.content.read())})
                request.setHeader("content-type", "audio/pcm")
                # 0.6 s of a 24 kHz tone, the "pcm" response format of /v1/audio/speech.
                return b"".join(struct.pack("<h", int(6000 * math.sin(2 * math.pi * 300 * i / 24000))) for i in range(14400))

        root = Resource()
        v1 = Resource()
        root.putChild(b"v1", v1)
        audio = Resource()
        v1.putChild(b"audio", audio)
        audio.putChild(b"speech", Speech())
        wav = io.BytesIO()
        with wave.open(wav, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(struct.pack("<h", 7000) * 4000)
        root.putChild(b"beep.wav", Data(wav.getvalue(), "audio/wav"))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        from twisted.web.util import Redirect

        # Same server, other host name: the daemon does not follow redirects to other hosts.
        root.putChild(b"away", Redirect(f"http://localhost:{port.getHost().port}/beep.wav".encode()))

        daemon = await self._start()
        client = await self._call(daemon, "e2e-7", {"codec": "pcm", "sampleRate": 24000})
        client.send({"command": "play", "url": base + "/beep.wav", "playId": "beep"})
        await client.wait_event("trackEnd", trackId="server-side-track", playId="beep")
        self.assertEqual(len(client.frames), 25, "0.5 s of audio at 24 kHz")
        client.send({"command": "play", "url": base + "/away", "playId": "away"})
        error = await client.wait_event("error", sender="filetrack: " + base + "/away")
        self.assertEqual(error["error"], f"cannot fetch {base}/away: unavailable")
        client.frames.clear()
        client.send({"command": "tts", "text": "Hello over HTTP.", "playId": "o", "endOfStream": True,
                     "option": {"provider": "openai", "endpoint": base + "/v1", "apiKey": "sk-test", "speaker": "nova"}})
        await client.wait_event("trackEnd", trackId="server-side-track", playId="o")
        self.assertEqual(requests[0]["auth"], "Bearer sk-test")
        self.assertEqual((requests[0]["body"]["input"], requests[0]["body"]["voice"]), ("Hello over HTTP.", "nova"))
        self.assertEqual(len(client.frames), 30, "0.6 s of audio")
        self.assertEqual({len(f) for _, f in client.frames}, {960})
        self.assertGreater(rms(b"".join(f for _, f in client.frames)), 2000)

    async def test_interrupt_fades_the_speech_out(self) -> None:
        """interrupt with fadeOutMs: interruption at once, then 300 ms of ever quieter audio, then trackEnd.
        The play is 3 s of a steady 1 kHz tone (``base64`` PCM), so the fade is all that changes its level."""
        import base64

        daemon = await self._start()
        client = await self._call(daemon, "e2e-fade", {"codec": "pcm", "sampleRate": 16000,
                                                       "tts": {"provider": "piper"}})
        pcm = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 1000 * i / 16000))) for i in range(48000))
        client.send({"command": "tts", "playId": "tone", "base64": True, "text": base64.b64encode(pcm).decode()})
        await client.wait_frames(25, timeout_s=30)
        client.send({"command": "interrupt", "fadeOutMs": 300})
        await client.wait_event("interruption", trackId="server-side-track", playId="tone")
        at_cut = len(client.frames)
        await client.wait_event("trackEnd", trackId="server-side-track", playId="tone")
        levels = [rms(f) for _, f in client.frames[at_cut:]]
        self.assertLessEqual(abs(len(levels) - 15), 3, "about 300 ms of audio after the interruption")
        fading = [level for level in levels if level < 5600]  # below the tone's own level
        self.assertGreaterEqual(len(fading), 10, levels)
        self.assertEqual(fading, sorted(fading, reverse=True), levels)
        self.assertLess(fading[-1], 600, levels)

    async def test_bad_commands_get_error_events_and_the_call_goes_on(self) -> None:
        """Each kind of bad command produces an error event naming it; the session keeps working."""
        daemon = await self._start()
        client = await self._call(daemon, "e2e-4", {"codec": "pcm"})
        bad = [
            ("{not json", "invalid JSON"),
            (json.dumps({"command": "dance"}), "unknown command: dance"),
            (json.dumps({"command": "tts"}), "missing field tts.text"),
            (json.dumps({"command": "tts", "text": "x", "autoHangup": "false"}), "invalid tts.autoHangup"),
            (json.dumps({"command": "invite", "option": {"codec": "pcm", "sampleRate": 4000}}), "invalid invite.option.sampleRate"),
            (json.dumps({"command": "invite", "option": {}}), "invite not allowed"),
            (json.dumps({"command": "tts", "text": "hi", "option": {"provider": "nosuch"}}), "TTS type not found: nosuch"),
            (json.dumps({"command": "mute", "trackId": "nope"}), "mute not allowed"),
            (json.dumps({"command": "message", "body": "x"}), "message command is only supported for SIP calls"),
            (json.dumps({"command": "hangup", "headers": {"X-A": "a\r\n\r\nBYE sip:x SIP/2.0"}}),
             "invalid hangup.headers.X-A: header value must not contain CR, LF"),
            (json.dumps({"command": "hangup", "headers": {"Call-ID": "x"}}), "invalid hangup.headers.Call-ID"),
        ]
        for text, expected in bad:
            client.sendMessage(text.encode(), isBinary=False)
        client.send({"command": "accept", "option": {}})
        client.send({"command": "history", "speaker": "user", "text": "still here"})
        echo = await client.wait_event("addHistory")
        self.assertEqual(echo["text"], "still here")
        errors = [e["error"] for e in client.events if e["event"] == "error"]
        for _, expected in bad:
            self.assertTrue(any(expected in e for e in errors), f"no error containing {expected!r} in {errors}")
        self.assertTrue(all(e["sender"] == "command" for e in client.events if e["event"] == "error"))
        reject = await client.wait_event("reject")
        self.assertEqual((reject["reason"], reject["code"]), ("no pending call", 486))
        self.assertFalse(client.closed)

    async def test_rest_list_command_kill(self) -> None:
        """/list shows the session, /command/{id} drives it, /kill/{id} ends it; unknown ids are 404."""
        daemon = await self._start()
        client = await self._call(daemon, "e2e-5", {"codec": "pcm", "caller": "sip:bot@example.com"})
        listing = await (await treq.get(daemon.base_url + "/list")).json()
        entry = next(c for c in listing["active_calls"] if c["id"] == "e2e-5")
        self.assertEqual(entry["callType"], "webSocket")
        self.assertEqual(entry["cs.option"]["caller"], "sip:bot@example.com")
        self.assertTrue(entry["startTime"].endswith("Z"))
        r = await treq.post(daemon.base_url + "/command/e2e-5", json.dumps({"command": "custom", "data": {"k": 1}}).encode())
        self.assertEqual((r.code, await r.json()), (200, {"status": "sent", "id": "e2e-5"}))
        custom = await client.wait_event("custom")
        self.assertEqual(custom["data"], {"k": 1})
        r = await treq.post(daemon.base_url + "/command/e2e-5", b'{"command":"tts"}')
        self.assertEqual(r.code, 400)
        self.assertIn("missing field tts.text", (await r.json())["error"])
        r = await treq.post(daemon.base_url + "/command/nope", b'{"command":"hangup"}')
        self.assertEqual(r.code, 404)
        r = await treq.get(daemon.base_url + "/kill/nope")
        self.assertEqual((r.code, await r.json()), (404, {"status": "not_found", "id": "nope"}))
        health = await (await treq.get(daemon.base_url + "/health")).json()
        self.assertEqual({k: health[k] for k in ("status", "calls", "sessions")}, {"status": "ok", "calls": 0, "sessions": 1})
        self.assertIsInstance(health["cpu_percent"], float)
        ice = await (await treq.get(daemon.base_url + "/iceservers")).json()
        self.assertEqual(ice, [], "no public STUN server unless configured")
        r = await treq.get(daemon.base_url + "/kill/e2e-5")
        self.assertEqual(await r.json(), {"status": "killed", "id": "e2e-5"})
        hangup = await client.wait_event("hangup", trackId="e2e-5")
        self.assertEqual(hangup["initiator"], "system")
        await client.wait_closed()
        listing = await (await treq.get(daemon.base_url + "/list")).json()
        self.assertEqual([c for c in listing["active_calls"] if c["id"] == "e2e-5"], [])
        dump = os.path.join(self.workdir, "recorders", "e2e-5.events.jsonl")
        lines = [json.loads(line) for line in open(dump)]
        self.assertEqual(lines[0]["type"], "command")
        self.assertIn('"event":"hangup"', lines[-1]["content"])

    async def test_event_stream_and_log_file(self) -> None:
        """GET /events/{id} streams the session's commands and events as SSE; log_file receives the log."""
        daemon = await self._start('log_file = "{workdir}/activecall.log"\n', ready_text="")
        client = await self._call(daemon, "e2e-6", {"codec": "pcm"})
        response = await treq.get(daemon.base_url + "/events/e2e-6", unbuffered=True)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream;charset=utf-8"])
        chunks: list[bytes] = []
        done = collect(response, chunks.append)
        await client.wait_event("answer")
        client.send({"command": "history", "speaker": "bot", "text": "hi"})
        await client.wait_event("addHistory")
        client.send({"command": "hangup"})
        await done
        stream = b"".join(chunks).decode()
        self.assertIn('event: command\ndata: {"command":"history"', stream)
        self.assertIn('event: event\ndata: {"event":"addHistory"', stream)
        self.assertIn('"event":"hangup"', stream)
        r = await treq.get(daemon.base_url + "/events/e2e-6")
        self.assertEqual((r.code, await r.text()), (404, "track not active"))
        with open(os.path.join(self.workdir, "activecall.log")) as f:
            self.assertIn("session e2e-6 opened", f.read())

    async def test_twistd_logfile_is_honoured(self) -> None:
        """twistd --logfile FILE receives the daemon's log (with log_level applied); stdout stays quiet."""
        path = os.path.abspath(self.mktemp())
        daemon = await self._start(ready_text="", twistd_args=("--logfile", path))
        client = await self._call(daemon, "e2e-l", {"codec": "pcm"})
        client.send({"command": "hangup"})
        await client.wait_closed()
        with open(path) as f:
            text = f.read()
        self.assertIn(" ready: ", text)
        self.assertIn("session e2e-l opened", text)
        self.assertNotIn("session e2e-l opened", daemon.output)

    async def test_sip_and_webrtc_endpoints_accept_sessions(self) -> None:
        """/call/sip and /call/webrtc take connections; a WebRTC invite without an offer fails setting up the track."""
        daemon = await self._start()
        client = await connect(f"{daemon.ws_url}/call/sip?id=x-sip-listed")
        listing = await (await treq.get(daemon.base_url + "/list")).json()
        self.assertIn({"id": "x-sip-listed", "callType": "sip", "cs.option": None, "ringTime": None, "startTime": None},
                      listing["active_calls"])
        client.send({"command": "invite", "option": {}})
        error = await client.wait_event("error", sender="invite")
        self.assertEqual(error["error"], "missing field invite.option.callee")
        await client.wait_closed()
        for path, call_type in (("webrtc", "webrtc"),):
            client = await connect(f"{daemon.ws_url}/call/{path}?id=x-{path}")
            listing = await (await treq.get(daemon.base_url + "/list")).json()
            self.assertIn({"id": f"x-{path}", "callType": call_type, "cs.option": None, "ringTime": None, "startTime": None}, listing["active_calls"])
            client.send({"command": "invite", "option": {"callee": "sip:1001@127.0.0.1"}})
            error = await client.wait_event("error", sender="invite")
            self.assertEqual(error["error"], "Failed to setup track: option.offer (the client's SDP offer) is required")
            await client.wait_closed()

    async def test_precache_fills_the_cache_a_live_tts_uses(self) -> None:
        """POST /precache synthesizes once; a second call says exists; a live tts then plays it from cache."""
        daemon = await self._start()
        body = {"command": "tts", "text": "Welcome back.", "option": {"provider": "piper"}}
        r = await treq.post(daemon.base_url + "/precache", json.dumps(body).encode())
        first = await r.json()
        self.assertEqual((r.code, first["status"]), (200, "cached"))
        self.assertGreater(first["bytes"], 16000)
        self.assertTrue(os.path.exists(os.path.join(self.workdir, "cache", first["cacheKey"] + ".pcm")))
        again = await (await treq.post(daemon.base_url + "/precache", json.dumps(body).encode())).json()
        self.assertEqual(again, {"status": "exists", "cacheKey": first["cacheKey"], "bytes": 0})
        r = await treq.post(daemon.base_url + "/precache", b'{"command":"hangup"}')
        self.assertEqual((r.code, (await r.json())["error"]), (400, "precache only accepts tts commands"))
        r = await treq.post(daemon.base_url + "/precache", b'{"command":"tts","text":"x"}')
        self.assertEqual(r.code, 500)
        client = await self._call(daemon, "e2e-8", {"codec": "pcm", "tts": {"provider": "piper"}})
        client.send({"command": "tts", "text": "Welcome back.", "playId": "w", "endOfStream": True})
        await client.wait_event("trackEnd", trackId="server-side-track", playId="w")
        metrics = await client.wait_event("metrics")
        self.assertTrue(metrics["data"]["cached"])
        self.assertEqual(sum(len(f) for _, f in client.frames) // 640, -(-first["bytes"] // 640))

    async def test_http_gzip(self) -> None:
        """With http_gzip, REST answers are gzip-compressed for clients that accept it."""
        import gzip

        from twisted.internet import reactor
        from twisted.web.client import Agent, HTTPConnectionPool, readBody
        from twisted.web.http_headers import Headers

        daemon = await self._start("http_gzip = true\n")
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = await agent.request(b"GET", (daemon.base_url + "/health").encode(), Headers({b"Accept-Encoding": [b"gzip"]}))
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(json.loads(gzip.decompress(await readBody(response)))["status"], "ok")

    async def test_playbook_files_api(self) -> None:
        """/api/playbooks lists, saves and reads files under config/playbook/; bad names are 400."""
        daemon = await self._start()
        self.assertEqual(await (await treq.get(daemon.base_url + "/api/playbooks")).json(), [])
        text = "---\nllm:\n  provider: openai\n---\nHello.\n"
        r = await treq.post(daemon.base_url + "/api/playbooks/sales.md", text.encode())
        self.assertEqual(r.code, 200)
        listing = await (await treq.get(daemon.base_url + "/api/playbooks")).json()
        self.assertEqual([e["name"] for e in listing], ["sales.md"])
        self.assertEqual(await (await treq.get(daemon.base_url + "/api/playbooks/sales.md")).text(), text)
        self.assertTrue(os.path.exists(os.path.join(self.workdir, "config", "playbook", "sales.md")))
        r = await treq.get(daemon.base_url + "/api/playbooks/missing.md")
        self.assertEqual((r.code, await r.text()), (404, "Playbook not found"))
        r = await treq.get(daemon.base_url + "/api/playbooks/..%2Fsecret")
        self.assertEqual((r.code, await r.text()), (400, "Invalid filename"))

    async def test_recording_of_a_call(self) -> None:
        """A call with a recorder option leaves a 16 kHz stereo WAV: caller left, agent right; sox reads it."""
        import shutil
        import subprocess

        import numpy as np

        daemon = await self._start()
        client = await self._call(daemon, "e2e-9", {"codec": "pcm", "sampleRate": 8000, "recorder": {}, "tts": {"provider": "piper"}})
        tone = (6000 * np.sin(2 * np.pi * 500 * np.arange(8000) / 8000)).astype("<i2").tobytes()
        for i in range(0, len(tone), 320):
            client.sendMessage(tone[i:i + 320], isBinary=True)
        client.send({"command": "tts", "text": "Recording test.", "playId": "r", "endOfStream": True})
        await client.wait_event("trackEnd", trackId="server-side-track", playId="r")
        client.send({"command": "hangup"})
        await client.wait_closed()
        path = os.path.join(self.workdir, "recorders", "e2e-9.wav")
        await daemon.stop()  # the file is complete once the daemon exits
        with wave.open(path) as w:
            self.assertEqual((w.getnchannels(), w.getsampwidth(), w.getframerate()), (2, 2, 16000))
            frames = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
        self.assertGreater(len(frames), 16000 * 0.8)
        self.assertGreater(np.abs(frames[:, 0]).max(), 3000, "caller tone on the left")
        self.assertGreater(np.abs(frames[:, 1]).max(), 1000, "agent speech on the right")
        if shutil.which("soxi"):
            out = subprocess.run(["soxi", "-c", path], capture_output=True, text=True, check=True).stdout
            self.assertEqual(out.strip(), "2")

    async def test_call_record_written_per_call(self) -> None:
        """With [callrecord] local, each ended call leaves one JSON record with the spec's fields."""
        import glob

        daemon = await self._start(extra="")
        await daemon.stop()
        config_tail = '[callrecord]\ntype = "local"\nroot = "{workdir}/cdr"\n'
        daemon = await start_daemon(self.workdir, BASE_CONFIG + config_tail)
        self.addCleanup(daemon.stop)
        client = await self._call(daemon, "e2e-cdr", {"codec": "pcm", "callee": "sip:someone@example.com", "recorder": {}})
        client.send({"command": "hangup", "reason": "caller"})
        await client.wait_closed()
        await daemon.stop()
        [path] = glob.glob(os.path.join(self.workdir, "cdr", "*", "*_e2e-cdr.json"))
        with open(path) as f:
            record = json.load(f)
        self.assertEqual(record["callType"], "webSocket")
        self.assertEqual(record["callId"], "e2e-cdr")
        self.assertEqual(record["statusCode"], 200)
        self.assertEqual(record["hangupReason"], "byCaller")
        self.assertEqual(record["callee"], "sip:someone@example.com")
        self.assertTrue(record["startTime"].endswith("Z") and record["answerTime"].endswith("Z"))
        self.assertEqual(record["recorder"][0]["path"], os.path.join(self.workdir, "recorders", "e2e-cdr.wav"))
        self.assertGreaterEqual(record["recorder"][0]["size"], 44)
        self.assertTrue(record["dumpEventFile"].endswith("e2e-cdr.events.jsonl"))
        self.assertNotIn(None, record.values())

    async def test_graceful_shutdown_lets_calls_finish_then_cuts_them(self) -> None:
        """SIGTERM: a call that ends by itself ends normally; one still running is hung up after graceful_shutdown_timeout."""
        daemon = await self._start("graceful_shutdown_timeout = 2\n")
        short = await self._call(daemon, "e2e-short", {"codec": "pcm"})
        long = await self._call(daemon, "e2e-long", {"codec": "pcm"})
        started = reactor.seconds()
        daemon.transport.signalProcess("TERM")
        await daemon.wait_output("waiting up to 2.0 s for 2 call(s)")
        short.send({"command": "hangup", "reason": "done"})
        self.assertEqual((await short.wait_event("hangup"))["reason"], "done")
        hangup = await long.wait_event("hangup")
        self.assertEqual(hangup["initiator"], "system")
        self.assertGreaterEqual(reactor.seconds() - started, 1.5)
        await long.wait_closed()
        (code,) = await daemon.wait_exit()
        # twistd re-raises the signal it stopped for: "killed by SIGTERM" is its clean exit.
        self.assertIn(code, (0, -15))

    async def test_bad_query_parameter_is_http_400(self) -> None:
        """A query value of the wrong type fails the upgrade with HTTP 400."""
        daemon = await self._start()
        r = await treq.get(daemon.base_url + "/call?ping=x", headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        self.assertEqual(r.code, 400)


class StartupTests(TestCase):
    """A bad configuration stops start-up with one clear line and a non-zero exit."""

    timeout = 60

    async def _start_with(self, config: str) -> Any:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        path = os.path.join(workdir, "bad.toml")
        with open(path, "w") as f:
            f.write(config)
        daemon = spawn_daemon(workdir, ["--conf", path])
        self.addCleanup(daemon.stop)
        (code,) = await daemon.wait_exit()
        return code, daemon.output

    async def test_invalid_regex_names_the_key(self) -> None:
        """An invalid handler rule regex is fatal and names handler.rules[0].caller."""
        code, output = await self._start_with('[handler]\ntype = "playbook"\n[[handler.rules]]\ncaller = "(unclosed"\nplaybook = "x.md"\n')
        self.assertNotEqual(code, 0)
        self.assertIn("configuration error: handler.rules[0].caller", output)
        self.assertNotIn("Traceback", output)

    async def test_syntax_and_type_errors(self) -> None:
        """A TOML syntax error and a wrong type each stop start-up with their message."""
        code, output = await self._start_with("udp_port = [\n")
        self.assertNotEqual(code, 0)
        self.assertIn("configuration error:", output)
        code, output = await self._start_with('udp_port = "many"\n')
        self.assertNotEqual(code, 0)
        self.assertIn("configuration error: udp_port", output)
        self.assertNotIn("Traceback", output)
