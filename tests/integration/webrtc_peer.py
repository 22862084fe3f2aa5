"""A WebRTC client for the daemon's ``/call/webrtc`` (protocol.md §5.2): aiortc under plain asyncio.

The pytest process runs Twisted's default reactor, where aiortc cannot run, so
tests start this file as a subprocess; the benchmark imports :func:`run_session`
and :func:`run_many`.  Each session:

1. makes its peer (no ICE servers: the machine is offline) with a microphone
   track (a WAV file or a generated tone, paced in real time), codec chosen with
   ``setCodecPreferences``, and an offer with all its candidates;
2. opens the control socket (autobahn's asyncio client) and sends ``invite``;
   with ``trickle`` the offer goes without its ``a=candidate`` lines and each
   candidate follows as ``addIceCandidate`` (``pre_invite`` of them before the
   invite);
3. applies the ``answer`` event's SDP, waits for the peer to connect, sends the
   ``commands`` (``play``/``tts``…), keeps the call up for ``seconds`` while the
   received audio is decoded to 16 kHz mono and measured per 20 ms;
4. ends by ``hangup`` command, by closing only the peer (then waits for
   ``trackEnd{sid}``, checks ``/list`` still has the session, then hangs up) or by
   closing the socket; reports events, ``getStats()`` figures and audio figures.

    python tests/integration/webrtc_peer.py --url ws://127.0.0.1:8080 --sid s1 --seconds 3 --trickle

prints one JSON object per session on stdout and exits 0 (failures are in each
object's ``errors``).  Only 127.0.0.1 host candidates are gathered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import urllib.parse
import wave
from fractions import Fraction
from typing import Any, Optional, Sequence

import aioice.ice
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from autobahn.asyncio.websocket import WebSocketClientFactory, WebSocketClientProtocol

__all__ = ["run_session", "run_many", "MicTrack", "AudioMeter", "opus_packets", "strip_candidates", "answer_codec",
           "use_loopback", "write_tone_wav"]

RATE = 16000
FRAME_MS = 20
FRAME_SAMPLES = RATE * FRAME_MS // 1000
#: A 20 ms frame at or above this RMS (s16) counts as sound.
SOUND_RMS = 200.0
#: How long a canary session holds back our answer for the daemon's first check of the canary.
CANARY_WAIT_S = 3.0
CODEC_MIME = {"opus": "audio/opus", "pcmu": "audio/PCMU", "pcma": "audio/PCMA", "g722": "audio/G722"}


def use_loopback(address: str = "127.0.0.1") -> None:
    """Gather ICE host candidates on ``address`` only (aioice skips 127.0.0.1 on its own)."""
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [address] if use_ipv4 else []


# ---------------------------------------------------------------------------
# the microphone


class MicTrack(MediaStreamTrack):
    """Mono 16 kHz audio in 20 ms frames, paced by the loop's clock: a WAV file (looped) or a tone."""

    kind = "audio"

    def __init__(self, wav: Optional[str] = None, tone_hz: float = 440.0, amplitude: int = 6000,
                 packets: Optional[list[bytes]] = None) -> None:
        super().__init__()
        #: Opus packets (20 ms each) sent as they are, looped, instead of encoding frames: see :func:`opus_packets`.
        self._packets = packets
        if wav:
            self._samples = read_wav_16k(wav)
        else:
            n = RATE  # one second, looped: a whole number of periods for integer Hz
            self._samples = (amplitude * np.sin(2 * math.pi * tone_hz * np.arange(n) / RATE)).astype("<i2")
        if len(self._samples) < FRAME_SAMPLES:
            self._samples = np.concatenate([self._samples, np.zeros(FRAME_SAMPLES, "<i2")])
        self._pos = 0
        self._pts = 0
        self._start: Optional[float] = None
        self._time_base = Fraction(1, RATE)
        self.frames_sent = 0

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        due = self._start + self._pts / RATE
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        elif wait < -0.2:  # the loop stalled: do not burst the backlog, restart the pacing
            self._start = loop.time() - self._pts / RATE
        if self._packets:
            packet = av.Packet(self._packets[self.frames_sent % len(self._packets)])
            packet.pts = self._pts * 3  # 48 kHz, Opus's RTP clock
            packet.time_base = _OPUS_TIME_BASE
            self._pts += FRAME_SAMPLES
            self.frames_sent += 1
            return packet
        end = self._pos + FRAME_SAMPLES
        if end <= len(self._samples):
            chunk = self._samples[self._pos:end]
            self._pos = end % len(self._samples)
        else:
            chunk = np.concatenate([self._samples[self._pos:], self._samples[: end - len(self._samples)]])
            self._pos = end - len(self._samples)
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(chunk.tobytes())
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = self._time_base
        self._pts += FRAME_SAMPLES
        self.frames_sent += 1
        return frame


_OPUS_TIME_BASE = Fraction(1, 48000)


def opus_packets(wav: Optional[str] = None, tone_hz: float = 440.0, seconds: float = 1.0) -> list[bytes]:
    """The microphone audio encoded once with aiortc's own Opus encoder (20 ms packets), for
    :class:`MicTrack` to loop: many sessions in one client process then cost no Opus encoding
    (which would make the client, not the daemon, the bottleneck)."""
    from aiortc.codecs.opus import OpusEncoder

    track = MicTrack(wav=wav, tone_hz=tone_hz)
    encoder = OpusEncoder()
    out: list[bytes] = []
    for i in range(int(seconds * 1000 / FRAME_MS)):
        end = (i + 1) * FRAME_SAMPLES
        chunk = np.resize(track._samples, end)[end - FRAME_SAMPLES:end]
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(chunk.tobytes())
        frame.sample_rate = RATE
        frame.pts = i * FRAME_SAMPLES
        frame.time_base = Fraction(1, RATE)
        out += encoder.encode(frame)[0]
    return out


def read_wav_16k(path: str) -> np.ndarray:
    """A WAV file's first channel as 16 kHz s16 samples (linear interpolation for other rates)."""
    with wave.open(path) as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit WAV files")
        rate, channels = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    data = data[::channels]
    if rate != RATE and len(data):
        t = np.arange(int(len(data) * RATE / rate)) * rate / RATE
        data = np.interp(t, np.arange(len(data)), data.astype(np.float64)).astype("<i2")
    return data


def write_tone_wav(path: str, seconds: float, hz: float = 440.0, rate: int = RATE, amplitude: int = 8000) -> None:
    """A mono 16-bit sine WAV (what the agent plays in tests and benchmarks)."""
    n = int(rate * seconds)
    samples = (amplitude * np.sin(2 * math.pi * hz * np.arange(n) / rate)).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


# ---------------------------------------------------------------------------
# received audio


class AudioMeter:
    """Decoded frames of the agent's track, as 16 kHz mono, measured per 20 ms."""

    def __init__(self, keep_pcm: bool = False, light: bool = False) -> None:
        #: light: one RMS per decoded frame on its own samples (no resampling; for load tests).
        self.light = light and not keep_pcm
        # The first channel, not a downmix: FFmpeg's stereo-to-mono mix is 3 dB down.
        self._resampler: Optional[av.AudioResampler] = None
        self._channels = 1
        self._pending = np.zeros(0, "<i2")
        self.keep_pcm = keep_pcm
        self.pcm = bytearray()
        self.frames = 0  # decoded frames as aiortc gave them
        self.chunks = 0  # 20 ms chunks after resampling
        self.sound_chunks = 0
        self.rms_sum = 0.0
        self.rms_max = 0.0
        self.first_frame_at: Optional[float] = None
        self.last_frame_at: Optional[float] = None
        self.first_sound_at: Optional[float] = None
        self.window: Optional[list[float]] = None  # [t0, t1] of a measurement window
        self.window_frames = 0
        self.window_first: Optional[float] = None  # the first frame in the window
        # Frames the sender's RTP timestamps skipped in the window (the daemon stamps each frame with its
        # media-clock slot, so a frame it dropped shows as a gap whatever the arrival times).
        self.window_skipped = 0
        self._last_pts: Optional[int] = None

    def add(self, frame: av.AudioFrame, now: float) -> None:
        self.frames += 1
        if self.first_frame_at is None:
            self.first_frame_at = now
        self.last_frame_at = now
        if self.window is not None and self.window[0] <= now <= self.window[1]:
            if self.window_first is None:
                self.window_first = now
            self.window_frames += 1
            if self._last_pts is not None and frame.pts is not None and frame.samples:
                gap = (frame.pts - self._last_pts) % (1 << 32)
                self.window_skipped += max(0, round(gap / frame.samples) - 1)
        self._last_pts = frame.pts
        if self.light:
            samples = np.frombuffer(frame.planes[0], "<i2")[: frame.samples * len(frame.layout.channels)]
            rms = float(np.sqrt(np.dot(samples, samples.astype(np.float64)) / max(1, len(samples))))
            chunks = max(1, round(frame.samples * 1000 / frame.sample_rate / FRAME_MS))
            self.chunks += chunks
            self.rms_max = max(self.rms_max, rms)
            if rms >= SOUND_RMS:
                self.sound_chunks += chunks
                self.rms_sum += rms * chunks
                if self.first_sound_at is None:
                    self.first_sound_at = now
            return
        if self._resampler is None:
            self._channels = len(frame.layout.channels)
            self._resampler = av.AudioResampler(format="s16", layout=frame.layout.name, rate=RATE)
        c = self._channels
        parts = [np.frombuffer(bytes(f.planes[0])[: f.samples * 2 * c], "<i2")[::c]
                 for f in self._resampler.resample(frame)]
        if not parts:
            return
        samples = np.concatenate([self._pending, *parts])
        n = len(samples) // FRAME_SAMPLES * FRAME_SAMPLES
        if self.keep_pcm:
            self.pcm += samples[:n].tobytes()
        if n:
            chunks = samples[:n].reshape(-1, FRAME_SAMPLES).astype(np.float64)
            rms = np.sqrt((chunks * chunks).mean(axis=1))
            self.chunks += len(rms)
            loud = rms >= SOUND_RMS
            self.sound_chunks += int(loud.sum())
            self.rms_sum += float(rms[loud].sum())
            self.rms_max = max(self.rms_max, float(rms.max()))
            if self.first_sound_at is None and loud.any():
                self.first_sound_at = now
        self._pending = samples[n:]

    def report(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "ms": self.chunks * FRAME_MS,
            "sound_ms": self.sound_chunks * FRAME_MS,
            "rms_mean_sound": round(self.rms_sum / self.sound_chunks, 1) if self.sound_chunks else 0.0,
            "rms_max": round(self.rms_max, 1),
        }


# ---------------------------------------------------------------------------
# the control socket


class _Canary(asyncio.DatagramProtocol):
    """A UDP socket offered as an extra ICE candidate: STUN binding requests arriving here prove
    the daemon applied the trickled candidates (its agent checks every remote candidate it has,
    whereas the real pair would connect anyway through a peer-reflexive candidate)."""

    def __init__(self) -> None:
        self.requests = 0
        self.first_at: Optional[float] = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:2] == b"\x00\x01":  # STUN Binding Request
            self.requests += 1
            if self.first_at is None:
                self.first_at = time.monotonic()


class _ControlProtocol(WebSocketClientProtocol):
    def onConnect(self, response: Any) -> None:
        self.factory.session.ws = self

    def onOpen(self) -> None:
        self.factory.session._opened()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self.factory.session._event(json.loads(payload))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.session._closed(wasClean, code, reason)


class _Session:
    """One call's state: events, waiters and the peer."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.ws: Optional[_ControlProtocol] = None
        self.events: list[dict[str, Any]] = []
        self.event_times: list[float] = []
        self.is_open = False
        self.is_closed = False
        self.close_reason: Any = None
        self.close_clean: Optional[bool] = None
        self.closed_at: Optional[float] = None
        self._changed = asyncio.Event()
        self.t0 = time.monotonic()

    def _poke(self) -> None:
        self._changed.set()

    def _opened(self) -> None:
        self.is_open = True
        self._poke()

    def _event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.event_times.append(time.monotonic() - self.t0)
        self._poke()

    def _closed(self, clean: bool, code: Any, reason: Any) -> None:
        self.is_closed = True
        self.closed_at = time.monotonic()
        self.close_clean = clean
        self.close_reason = (code, reason)
        self._poke()

    def send(self, command: dict[str, Any]) -> None:
        if self.ws is None or self.is_closed:
            raise ConnectionError("control socket is closed")
        self.ws.sendMessage(json.dumps(command).encode(), isBinary=False)

    def find(self, name: str, **fields: Any) -> Optional[dict[str, Any]]:
        for e in self.events:
            if e.get("event") == name and all(e.get(k) == v for k, v in fields.items()):
                return e
        return None

    async def until(self, check: Any, timeout_s: float, what: str) -> Any:
        """Wait until ``check()`` is truthy (re-checked on every socket change) or raise TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = check()
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}; events "
                                   f"{[e.get('event') for e in self.events]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.25))
            except asyncio.TimeoutError:
                pass

    async def wait_event(self, name: str, timeout_s: float, **fields: Any) -> dict[str, Any]:
        def check() -> Any:
            found = self.find(name, **fields)
            if found is None and self.is_closed:
                raise ConnectionError(f"socket closed before event {name} {fields}; events "
                                      f"{[e.get('event') for e in self.events]}")
            return found

        return await self.until(check, timeout_s, f"event {name} {fields}")


def _ws_url(url: str, sid: str, query: str) -> str:
    parts = urllib.parse.urlsplit(url)
    path = parts.path if parts.path not in ("", "/") else "/call/webrtc"
    q = urllib.parse.parse_qsl(parts.query)
    q.append(("id", sid))
    q.extend(urllib.parse.parse_qsl(query))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, urllib.parse.urlencode(q), ""))


async def http_get_json(url: str, timeout_s: float = 5.0) -> Any:
    """GET a JSON body over HTTP/1.0 (plain asyncio; the daemon's /list)."""
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port or 80), timeout_s)
    try:
        path = parts.path + ("?" + parts.query if parts.query else "")
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if status != 200:
        raise ConnectionError(f"GET {url}: HTTP {status}")
    return json.loads(body)


def listed(list_body: Any, sid: str) -> bool:
    return any(c.get("id") == sid for c in list_body.get("active_calls", []))


# ---------------------------------------------------------------------------
# SDP helpers


def strip_candidates(sdp: str) -> tuple[str, list[str]]:
    """The SDP without ``a=candidate``/``a=end-of-candidates`` lines, and the candidates (``candidate:…``)."""
    kept, candidates = [], []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            candidates.append(line[2:])
        elif line.startswith("a=end-of-candidates"):
            continue
        else:
            kept.append(line)
    return "\r\n".join(kept) + "\r\n", candidates


def answer_codec(sdp: str) -> str:
    """The first audio codec of the ``m=audio`` line (lowercase name), or ``""``."""
    payloads: list[str] = []
    names: dict[str, str] = {}
    for line in sdp.splitlines():
        if line.startswith("m=audio "):
            payloads = line.split()[3:]
        elif line.startswith("a=rtpmap:"):
            pt, _, rest = line[9:].partition(" ")
            names[pt] = rest.split("/")[0].lower()
    for pt in payloads:
        if names.get(pt, "") not in ("telephone-event", ""):
            return names[pt]
    return ""


async def _stats(pc: RTCPeerConnection) -> dict[str, Any]:
    out: dict[str, Any] = {"inbound": None, "outbound": None, "remote_inbound": None}
    try:
        report = await pc.getStats()
    except Exception as e:  # a closed peer
        out["error"] = repr(e)
        return out
    for s in report.values():
        if s.type == "inbound-rtp":
            out["inbound"] = {"packetsReceived": s.packetsReceived, "packetsLost": s.packetsLost, "jitter": s.jitter}
        elif s.type == "outbound-rtp":
            out["outbound"] = {"packetsSent": s.packetsSent, "bytesSent": s.bytesSent}
        elif s.type == "remote-inbound-rtp":
            out["remote_inbound"] = {"packetsReceived": s.packetsReceived, "packetsLost": s.packetsLost,
                                     "jitter": s.jitter, "fractionLost": s.fractionLost}
    return out


def _brief(event: dict[str, Any]) -> dict[str, Any]:
    e = dict(event)
    if isinstance(e.get("sdp"), str):
        e["sdp"] = f"<{len(e['sdp'])} chars>"
    return e


# ---------------------------------------------------------------------------
# a session


async def run_session(url: str, sid: str, *, seconds: float = 3.0, codec: str = "opus", trickle: bool = False,
                      pre_invite: int = 0, end_of_candidates: bool = False, commands: Sequence[dict[str, Any]] = (),
                      end: str = "hangup", wav: Optional[str] = None, tone_hz: float = 440.0,
                      option: Optional[dict[str, Any]] = None, query: str = "", timeout_s: float = 30.0,
                      wait_track_end: Optional[str] = None, keep_pcm: bool = False,
                      canary: bool = False, mic_packets: Optional[list[bytes]] = None, light: bool = False,
                      ready: Optional[asyncio.Event] = None,
                      start: Optional[asyncio.Event] = None, settle_s: float = 0.0) -> dict[str, Any]:
    """One call on ``/call/webrtc``; the report (a JSON-able dict, ``errors`` empty when all went well).

    ``canary`` (with ``trickle``): one more candidate, a UDP socket of ours that
    counts the daemon's connectivity checks (``canary_checks`` in the report),
    sent with the others (before the invite when ``pre_invite`` covers them all).
    ``mic_packets`` (Opus only): pre-encoded microphone packets (:func:`opus_packets`);
    ``light``: the received audio measured without resampling (see :class:`AudioMeter`).
    ``wait_track_end``: a ``playId`` whose ``trackEnd`` ends the talking phase
    early (else it lasts ``seconds``).  ``ready``/``start`` (benchmark): set
    ``ready`` once the peer is connected, then wait for ``start`` before sending
    ``commands``; the measurement window is the ``seconds`` after that, or, with ``settle_s``, the
    ``seconds`` after ``settle_s`` more (the call then lasts ``settle_s + seconds``).
    """
    use_loopback()
    loop = asyncio.get_running_loop()
    session = _Session(sid)
    result: dict[str, Any] = {"sid": sid, "codec_offered": codec, "trickle": trickle, "end": end, "errors": []}
    mic = MicTrack(wav=wav, tone_hz=tone_hz, packets=mic_packets if codec.lower() == "opus" else None)
    meter = AudioMeter(keep_pcm=keep_pcm, light=light)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pump: Optional[asyncio.Task[None]] = None
    canary_transport: Any = None
    connected = asyncio.Event()
    timing: dict[str, float] = {}

    async def pump_audio(track: Any) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            meter.add(frame, time.monotonic())

    def on_track(track: Any) -> None:
        nonlocal pump
        if track.kind == "audio" and pump is None:
            pump = asyncio.ensure_future(pump_audio(track))

    def on_state() -> None:
        result.setdefault("states", []).append(pc.connectionState)
        if pc.connectionState == "connected":
            timing.setdefault("connected", time.monotonic())
            connected.set()
        elif pc.connectionState in ("failed", "closed"):
            connected.set()

    pc.on("track", on_track)
    pc.on("connectionstatechange", on_state)
    factory = WebSocketClientFactory(_ws_url(url, sid, query))
    factory.protocol = _ControlProtocol
    factory.session = session
    transport = None
    try:
        transceiver = pc.addTransceiver(mic, direction="sendrecv")
        mime = CODEC_MIME[codec.lower()]
        caps = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == mime.lower()]
        transceiver.setCodecPreferences(caps)
        offer = await pc.createOffer()
        await pc.setLocalDescription(offer)  # gathers every candidate
        sdp = pc.localDescription.sdp
        candidates: list[str] = []
        if trickle:
            sdp, candidates = strip_candidates(sdp)
        canary_probe: Optional[_Canary] = None
        if trickle and canary:
            canary_transport, canary_probe = await loop.create_datagram_endpoint(_Canary, local_addr=("127.0.0.1", 0))
            port = canary_transport.get_extra_info("sockname")[1]
            # Highest priority, so the daemon checks it first, before our nomination of the real
            # pair completes its check list; it never answers, so it never wins.
            candidates.insert(0, f"candidate:canary 1 udp 2130706431 127.0.0.1 {port} typ host")
        result["candidates"] = len(candidates) if trickle else sdp.count("a=candidate:")

        parts = urllib.parse.urlsplit(factory.url)
        transport, _ = await asyncio.wait_for(loop.create_connection(factory, parts.hostname, parts.port), timeout_s)
        await session.until(lambda: session.is_open or session.is_closed, timeout_s, "WebSocket open")
        if not session.is_open:
            raise ConnectionError(f"WebSocket not opened: {session.close_reason}")

        def trickle_one(line: str) -> None:
            session.send({"command": "addIceCandidate", "candidate": line, "sdpMid": "0", "sdpMLineIndex": 0})

        before, after = candidates[:pre_invite], candidates[pre_invite:]
        for line in before:
            trickle_one(line)
        invite_option = dict(option or {})
        invite_option["offer"] = sdp
        t_invite = time.monotonic()
        session.send({"command": "invite", "option": invite_option})
        for line in after:
            trickle_one(line)
        if trickle and end_of_candidates:
            session.send({"command": "addIceCandidate", "candidate": "", "sdpMid": "0", "sdpMLineIndex": 0})

        def answer_or_error() -> Any:
            found = session.find("answer", trackId=sid) or session.find("error")
            if found is None and session.is_closed:
                raise ConnectionError("socket closed before answer")
            return found

        got = await session.until(answer_or_error, timeout_s, "answer")
        if got["event"] == "error":
            raise RuntimeError(f"error event instead of answer: {got}")
        timing["answer"] = time.monotonic()
        result["answer_codec"] = answer_codec(got.get("sdp", ""))
        result["answer_candidates"] = got.get("sdp", "").count("a=candidate:")
        if canary_probe is not None:
            # Our nomination would end the daemon's checks at once: let it check first.
            probe = canary_probe
            deadline = time.monotonic() + min(timeout_s, CANARY_WAIT_S)
            while not probe.requests and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            result["canary_wait_ms"] = round((time.monotonic() - timing["answer"]) * 1000, 1)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=got["sdp"], type="answer"))
        try:
            await asyncio.wait_for(connected.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"peer not connected after {timeout_s}s (state {pc.connectionState})") from None
        if pc.connectionState != "connected":
            raise ConnectionError(f"peer {pc.connectionState}")
        result["setup_ms"] = round((timing["connected"] - t_invite) * 1000, 1)
        result["answer_ms"] = round((timing["answer"] - t_invite) * 1000, 1)
        if ready is not None:
            ready.set()
        if start is not None:
            await start.wait()

        t_talk = time.monotonic()
        meter.window = [t_talk + settle_s, t_talk + settle_s + seconds]
        for command in commands:
            session.send(command)
        if wait_track_end:
            await session.wait_event("trackEnd", settle_s + seconds + timeout_s, playId=wait_track_end)
        else:
            await asyncio.sleep(settle_s + seconds)  # the call's length: audio flows meanwhile
        if canary_probe is not None:
            result["canary_checks"] = canary_probe.requests
        t_stats = time.monotonic()
        result["stats"] = await _stats(pc)
        result["talk_ms"] = round((t_stats - t_talk) * 1000, 1)
        result["mic_frames_sent"] = mic.frames_sent

        if end == "hangup":
            session.send({"command": "hangup"})
            await session.wait_event("hangup", timeout_s, trackId=sid)
        elif end == "peer":
            t_close = time.monotonic()
            await pc.close()
            track_end = await session.wait_event("trackEnd", timeout_s, trackId=sid)
            result["peer_track_end_ms"] = round((time.monotonic() - t_close) * 1000, 1)
            result["peer_track_end_duration"] = track_end.get("duration")
            http = urllib.parse.urlunsplit(("http", parts.netloc, "/list", "", ""))
            result["listed_after_peer_close"] = listed(await http_get_json(http), sid)
            result["hangup_before_command"] = session.find("hangup") is not None
            session.send({"command": "hangup"})
            await session.wait_event("hangup", timeout_s, trackId=sid)
        elif end == "socket":
            assert session.ws is not None
            session.ws.sendClose()
        else:
            raise ValueError(f"unknown end mode {end!r}")
        t_end = time.monotonic()
        await session.until(lambda: session.is_closed, timeout_s, "socket close")
        # clean: the daemon finished the closing handshake (autobahn drops the socket after 1 s otherwise).
        result["close"] = {"clean": session.close_clean, "ms": round((session.closed_at - t_end) * 1000, 1)}
    except Exception as e:
        result["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        if canary_transport is not None:
            canary_transport.close()
        try:
            await asyncio.wait_for(pc.close(), 10)
        except Exception as e:
            result["errors"].append(f"closing the peer: {type(e).__name__}: {e}")
        if pump is not None:
            pump.cancel()
        mic.stop()
        if session.ws is not None and not session.is_closed:
            session.ws.dropConnection(abort=True)
        elif transport is not None and not session.is_closed:
            transport.close()
    result["events"] = [_brief(e) for e in session.events]
    result["event_times_ms"] = [round(t * 1000) for t in session.event_times]
    audio = meter.report()
    if meter.window is not None and meter.window_first is not None:
        # Every codec aiortc sends is 20 ms a packet.  Once settled, audio already flows when the window
        # opens, so the whole window is expected; else from its first frame on (the delay before it is
        # latency, not loss).
        audio["window_frames"] = meter.window_frames
        audio["window_skipped"] = meter.window_skipped
        opened = meter.window[0] if settle_s > 0 else meter.window_first
        audio["window_expected"] = round((meter.window[1] - opened) * 1000 / FRAME_MS)
    if meter.first_sound_at is not None and "answer" in timing:
        audio["first_sound_after_answer_ms"] = round((meter.first_sound_at - timing["answer"]) * 1000, 1)
    result["audio"] = audio
    if keep_pcm:
        result["_pcm"] = bytes(meter.pcm)
    return result


async def run_many(url: str, sids: Sequence[str], **kwargs: Any) -> list[dict[str, Any]]:
    """Sessions run concurrently, one per sid; their reports in order."""
    return list(await asyncio.gather(*(run_session(url, sid, **kwargs) for sid in sids)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="ws://host:port (path /call/webrtc by default)")
    p.add_argument("--sid", required=True, help="session id (with --sessions N: <sid>-0 … <sid>-N-1)")
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="run the N sessions this many times, one round after the other")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--codec", default="opus", choices=sorted(CODEC_MIME))
    p.add_argument("--trickle", action="store_true", help="offer without candidates, then addIceCandidate")
    p.add_argument("--pre-invite", type=int, default=0, help="with --trickle: candidates sent before the invite")
    p.add_argument("--canary", action="store_true", help="with --trickle: an extra candidate counting the daemon's checks")
    p.add_argument("--end-of-candidates", action="store_true", help="with --trickle: finish with an empty candidate")
    p.add_argument("--play", action="append", default=[], help="agent plays this URL/path after the answer")
    p.add_argument("--tts", action="append", default=[], help="agent speaks this text after the answer")
    p.add_argument("--command", action="append", default=[], help="extra command JSON sent after the answer")
    p.add_argument("--wait-track-end", default=None, help="playId whose trackEnd ends the call early")
    p.add_argument("--option", default="{}", help="JSON merged into invite.option")
    p.add_argument("--query", default="", help="extra query parameters, e.g. dump=false")
    p.add_argument("--wav", default=None, help="microphone WAV (default: a 440 Hz tone)")
    p.add_argument("--tone-hz", type=float, default=440.0)
    p.add_argument("--preencode", action="store_true", help="opus: encode the microphone audio once, loop the packets")
    p.add_argument("--light", action="store_true", help="measure received audio per decoded frame, no resampling")
    p.add_argument("--end", default="hangup", choices=["hangup", "peer", "socket"])
    p.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    commands: list[dict[str, Any]] = []
    for i, u in enumerate(a.play):
        commands.append({"command": "play", "url": u, "playId": f"play-{i}"})
    for i, text in enumerate(a.tts):
        commands.append({"command": "tts", "text": text, "playId": f"tts-{i}", "endOfStream": True})
    commands.extend(json.loads(c) for c in a.command)
    kwargs = dict(seconds=a.seconds, codec=a.codec, trickle=a.trickle, pre_invite=a.pre_invite,
                  end_of_candidates=a.end_of_candidates, canary=a.canary, commands=commands, end=a.end, wav=a.wav, tone_hz=a.tone_hz,
                  option=json.loads(a.option), query=a.query, timeout_s=a.timeout, wait_track_end=a.wait_track_end)

    async def run() -> None:
        if a.preencode and a.codec == "opus":
            kwargs["mic_packets"] = opus_packets(a.wav, a.tone_hz)
        kwargs["light"] = a.light
        for r in range(a.rounds):
            if a.sessions == 1 and a.rounds == 1:
                sids = [a.sid]
            else:
                sids = [f"{a.sid}-{r * a.sessions + i}" for i in range(a.sessions)]
            for report in await run_many(a.url, sids, **kwargs):
                print(json.dumps(report), flush=True)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
