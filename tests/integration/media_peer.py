"""Test-only glue joining the SIP user agent to the RTP media engine, for interop tests with real peers.

The real call controller comes later; this is the smallest thing that answers
a real phone's INVITE with real media:

* :class:`MediaPeerHandler` (an :class:`ICallHandler`) answers each INVITE by
  negotiating the offer (:func:`~activecall.sdp.negotiation.answer_offer`,
  SRTP when the offer is ``RTP/SAVP``), binding an
  :class:`~activecall.rtp.transport.RtpEndpoint` and running an
  :class:`~activecall.legs.rtp.RtpLeg` on a shared engine.
* :class:`MediaCall` records caller audio (left) and agent audio (right) with
  a :class:`~activecall.media.recorder.WavRecorder`, plays a tone or echoes
  the caller as agent audio, collects DTMF digits, and tears everything down
  when the peer sends BYE (or the dialog ends any other way).

Also here: a stdlib pcap writer for RTP (:func:`write_rtp_pcap`), RTP packet
builders for G.711 audio and RFC 4733 events, and WAV analysis helpers used
by the assertions (:func:`read_wav`, :func:`dominant_hz`, :func:`soxi`).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import wave
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.logger import Logger
from zope.interface import implementer

from activecall.media._audioop import audioop
from activecall.media.clock import MediaClock
from activecall.media.tracks import ILegEvents
from activecall.sdp.negotiation import NegotiatedMedia, NegotiationError, SdpError, answer_offer
from activecall.media.recorder import WavRecorder
from activecall.legs.rtp import MEDIA_RATE_HZ, RtpLeg, RtpMediaEngine
from activecall.rtp.srtp import generate_crypto
from activecall.rtp.transport import RtpEndpoint, RtpPortAllocator
from activecall.sip.useragent import ICallHandler, InboundCall

__all__ = [
    "MediaPeerHandler",
    "MediaCall",
    "CallResult",
    "PeerProcess",
    "spawn_peer",
    "free_udp_port",
    "free_tcp_port",
    "until",
    "tone",
    "RtpStream",
    "write_rtp_pcap",
    "g711_rtp_packets",
    "dtmf_rtp_packets",
    "read_wav",
    "dominant_hz",
    "rms",
    "soxi",
    "assert_near",
]

FRAME_SAMPLES = MEDIA_RATE_HZ // 50


# ---------------------------------------------------------------------------
# sockets and waiting


def free_udp_port() -> int:
    """A currently free UDP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(reactor: Any, check: Callable[[], bool], what: str, timeout_s: float = 15.0) -> Deferred[None]:
    """Fire when ``check()`` holds, polled every 20 ms on ``reactor``; fail with AssertionError after ``timeout_s``."""
    d: Deferred[None] = Deferred()
    start = reactor.seconds()

    def poll() -> None:
        if check():
            d.callback(None)
        elif reactor.seconds() - start > timeout_s:
            d.errback(AssertionError(f"timed out after {timeout_s}s waiting for {what}"))
        else:
            reactor.callLater(0.02, poll)

    poll()
    return d


class PeerProcess(ProcessProtocol):
    """A peer program (SIPp, baresip): collects its output and fires ``ended`` with the exit code."""

    def __init__(self) -> None:
        self.ended: Deferred[int] = Deferred()
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(-1 if code is None else code)

    def text(self, tail: int = 3000) -> str:
        """The last ``tail`` characters of the output, for failure messages."""
        return self.output.decode(errors="replace")[-tail:]


def spawn_peer(reactor: Any, argv: list[str], cwd: str, add_cleanup: Callable[..., None]) -> tuple[PeerProcess, Any]:
    """Start ``argv`` in ``cwd``; the registered cleanup kills it (if still running) and waits for its exit."""
    proto = PeerProcess()
    transport = reactor.spawnProcess(proto, argv[0], argv, env=os.environ.copy(), path=cwd)

    def stop() -> Deferred[int] | None:
        if proto.ended.called:
            return None
        try:
            transport.signalProcess("KILL")
        except ProcessExitedAlready:
            return None
        return proto.ended

    add_cleanup(stop)
    return proto, transport


# ---------------------------------------------------------------------------
# the call handler


@dataclass
class CallResult:
    """What one call did, read by the assertions once the call has ended."""

    offer_sdp: bytes
    answer_sdp: bytes
    negotiated: NegotiatedMedia | None
    digits: list[str]
    recording: str
    frames_recorded: int
    answered_at: float
    ended_at: float
    end_reason: str
    leg_stats: dict[str, Any]

    @property
    def call_s(self) -> float:
        """Seconds from answer to teardown on the reactor clock."""
        return self.ended_at - self.answered_at


class MediaCall:
    """One answered call: RtpLeg, recorder, agent audio, digits; also the dialog listener.

    States::

        running --BYE / dialog ended / hang_up()--> closing --leg and file closed--> ended
    """

    _log = Logger()

    def __init__(self, handler: MediaPeerHandler, call: InboundCall, endpoint: RtpEndpoint,
                 negotiated: NegotiatedMedia, answer_sdp: bytes, recording: str) -> None:
        self._handler = handler
        self._reactor = handler.reactor
        self.call = call
        self.negotiated = negotiated
        self.answer_sdp = answer_sdp
        self.recording = recording
        self.digits: list[str] = []
        self.frames_recorded = 0
        self.answered_at = self._reactor.seconds()
        self.end_reason = ""
        #: Fires with the :class:`CallResult` when the leg and the recording are closed.
        self.ended: Deferred[CallResult] = Deferred()
        self._closing = False
        self._tone_phase = 0
        self._recorder = WavRecorder(recording, MEDIA_RATE_HZ, reactor=self._reactor)
        self._next_agent: Optional[bytes] = None
        self.leg = RtpLeg(handler.engine, endpoint, negotiated, clock=self._reactor, rng=handler.rng,
                          cname=b"media-peer")
        self.leg.attach(self, self, _DigitsOnly(self.digits))

    def _agent_frame(self, caller: bytes) -> bytes:
        """The agent's next 20 ms: the caller's own frame (echo) or the next piece of a steady tone."""
        if self._handler.mode == "echo":
            return caller
        n = np.arange(self._tone_phase, self._tone_phase + FRAME_SAMPLES)
        self._tone_phase += FRAME_SAMPLES
        pcm = self._handler.tone_amplitude * np.sin(2 * np.pi * self._handler.tone_hz * n / MEDIA_RATE_HZ)
        return pcm.astype("<i2").tobytes()

    def write_frame(self, caller: bytes) -> None:
        """The leg's sink: one caller frame per media tick, so the agent frame is paced by the same clock."""
        agent = self._agent_frame(caller)
        self._next_agent = agent
        self._recorder.write(caller, agent)
        self.frames_recorded += 1

    def read_frame(self) -> Optional[bytes]:
        """The leg's source: the agent frame made from this tick's caller frame."""
        frame, self._next_agent = self._next_agent, None
        return frame

    # -- IDialogListener (the methods the user agent calls on call.listener) --

    def on_bye(self, request: object) -> None:
        """The peer hung up."""
        self._teardown("bye-received")

    def on_cancel(self) -> None:
        """The caller gave up before the answer."""
        self._teardown("cancel")

    def on_terminated(self, reason: str) -> None:
        """The dialog ended (after on_bye, or alone on timeouts)."""
        self._teardown(reason)

    def hang_up(self) -> Deferred[CallResult]:
        """Send BYE ourselves (cleanup of a call the peer left up) and tear down."""
        if not self._closing and not self.call.terminated:
            self.call.bye().addErrback(lambda f: None)  # the peer may be gone already
        self._teardown("hung-up")
        return self.ended

    def _teardown(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self.end_reason = reason
        ended_at = self._reactor.seconds()
        stats = self.leg.stats()
        closed = DeferredList([self.leg.close(), self._recorder.close()], fireOnOneErrback=True, consumeErrors=True)

        def done(_: object) -> CallResult:
            return CallResult(
                offer_sdp=bytes(self.call.remote_sdp), answer_sdp=self.answer_sdp, negotiated=self.negotiated,
                digits=list(self.digits), recording=self.recording, frames_recorded=self.frames_recorded,
                answered_at=self.answered_at, ended_at=ended_at, end_reason=reason, leg_stats=stats,
            )

        closed.addCallback(done).chainDeferred(self.ended)


@implementer(ILegEvents)
class _DigitsOnly:
    """Leg events of the media peer: only the digits are kept."""

    def __init__(self, digits: list[str]) -> None:
        self._digits = digits

    def media_ready(self) -> None:
        pass

    def dtmf(self, digit: str) -> None:
        self._digits.append(digit)

    def hold(self, on_hold: bool) -> None:
        pass

    def ended(self, cause: str) -> None:
        pass

    def media_ended(self, cause: str) -> None:
        pass

    def message(self, body: str, content_type: Optional[str]) -> None:
        pass

    def transfer_requested(self, refer_to: str, referred_by: Optional[str]) -> None:
        pass

    def transfer_progress(self, status: int, text: str) -> None:
        pass


@implementer(ICallHandler)
class MediaPeerHandler:
    """Answers every INVITE with negotiated RTP/SRTP media, one :class:`MediaCall` each.

    ``codecs`` is our preference list (as in the config); ``mode`` is
    ``"tone"`` (agent plays ``tone_hz``) or ``"echo"`` (agent repeats the
    caller).  Offers we cannot answer get 488 and are kept in ``rejected``.
    """

    _log = Logger()

    def __init__(self, reactor: Any, record_dir: str, *, codecs: Sequence[str] = ("pcmu", "pcma", "g722", "telephone_event"),
                 srtp: bool = True, mode: str = "tone", tone_hz: float = 1000.0, tone_amplitude: float = 8000.0,
                 address: str = "127.0.0.1", seed: int = 7) -> None:
        if mode not in ("tone", "echo"):
            raise ValueError(f"bad mode {mode!r}")
        self.reactor = reactor
        self.record_dir = record_dir
        self.codecs = tuple(codecs)
        self.srtp = srtp
        self.mode = mode
        self.tone_hz = tone_hz
        self.tone_amplitude = tone_amplitude
        self.address = address
        self.rng = random.Random(seed)
        self.media_clock = MediaClock(reactor)
        self.engine = RtpMediaEngine(reactor, self.media_clock)
        # A wide random range: ports other tests or processes hold are skipped by the endpoint.
        base = 30000 + 2 * random.Random().randrange(5000)
        self.allocator = RtpPortAllocator(base, base + 199)
        self.calls: list[MediaCall] = []
        self.rejected: list[tuple[InboundCall, str]] = []
        self._waiting: list[Deferred[MediaCall]] = []

    def incoming_call(self, call: InboundCall) -> None:
        """Negotiate the offer, start the leg and recorder, answer 200 (or 488)."""
        endpoint = RtpEndpoint(self.reactor, self.allocator, bind_ip=self.address)
        port = endpoint.start()
        try:
            answer, negotiated = answer_offer(
                call.remote_sdp, self.codecs, self.address, port, session_id=len(self.calls) + 1,
                srtp=self.srtp, make_crypto=lambda tag, suite: generate_crypto(tag, suite, self.rng),
            )
        except (NegotiationError, SdpError) as err:
            self.rejected.append((call, str(err)))
            call.reject(488)
            endpoint.stop().addErrback(lambda f: self._log.failure("releasing RTP ports failed", f))
            return
        recording = os.path.join(self.record_dir, f"call-{len(self.calls) + 1}.wav")
        media = MediaCall(self, call, endpoint, negotiated, answer.encode("ascii"), recording)
        call.listener = media
        self.calls.append(media)
        call.answer(answer).addErrback(self._answer_failed, media)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(media)

    def _answer_failed(self, failure: Any, media: MediaCall) -> None:
        self._log.failure("answer failed", failure)
        media._teardown("answer-failed")

    def next_call(self) -> Deferred[MediaCall]:
        """The first call, or the next one to arrive."""
        if self.calls:
            return succeed(self.calls[-1])
        d: Deferred[MediaCall] = Deferred()
        self._waiting.append(d)
        return d

    def shutdown(self) -> Deferred[Any]:
        """Hang up calls still running, stop the media clock (test cleanup)."""
        ds = [m.hang_up() for m in self.calls]
        d = DeferredList(ds, consumeErrors=True)
        d.addBoth(lambda r: (self.media_clock.stop(), r)[1])
        return d


# ---------------------------------------------------------------------------
# audio and pcap fixtures (stdlib + numpy)


def tone(hz: float, seconds: float, rate_hz: int, amplitude: float = 10000.0) -> bytes:
    """A sine tone as PCM s16le mono."""
    n = np.arange(int(round(seconds * rate_hz)))
    return (amplitude * np.sin(2 * np.pi * hz * n / rate_hz)).astype("<i2").tobytes()


_RTP = struct.Struct("!BBHII")


def _rtp(pt: int, seq: int, ts: int, ssrc: int, payload: bytes, marker: bool = False) -> bytes:
    return _RTP.pack(0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


@dataclass
class RtpStream:
    """Sequence, timestamp and send time of one synthetic RTP stream (8 kHz clock, 20 ms packets)."""

    ssrc: int = 0x1234ABCD
    seq: int = 1000
    ts: int = 160000
    t: float = 0.0


def g711_rtp_packets(stream: RtpStream, pcm8k: bytes, *, alaw: bool = True) -> list[tuple[float, bytes]]:
    """``(send time, RTP packet)`` for 8 kHz PCM as 20 ms G.711 packets (PCMA pt 8 or PCMU pt 0)."""
    out = []
    step = 320  # bytes of 20 ms at 8 kHz s16
    first = True
    for off in range(0, len(pcm8k) - step + 1, step):
        chunk = pcm8k[off:off + step]
        payload = audioop.lin2alaw(chunk, 2) if alaw else audioop.lin2ulaw(chunk, 2)
        out.append((stream.t, _rtp(8 if alaw else 0, stream.seq, stream.ts, stream.ssrc, payload, first)))
        first = False
        stream.seq += 1
        stream.ts += 160
        stream.t += 0.02
    return out


def dtmf_rtp_packets(stream: RtpStream, digit: str, *, pt: int = 101, packets: int = 6,
                     end_repeats: int = 3) -> list[tuple[float, bytes]]:
    """RFC 4733 packets for one key press: a marked start, updates every 20 ms, then the end packet three times.

    All packets of the event carry its start timestamp; the stream's
    timestamp then advances past the event (RFC 4733 §2.5.1).
    """
    event = "0123456789*#".index(digit)
    out = []
    start_ts = stream.ts
    for i in range(packets):
        duration = 160 * (i + 1)
        payload = struct.pack("!BBH", event, 10, duration)
        out.append((stream.t, _rtp(pt, stream.seq, start_ts, stream.ssrc, payload, i == 0)))
        stream.seq += 1
        stream.t += 0.02
    duration = 160 * packets
    for _ in range(end_repeats):
        payload = struct.pack("!BBH", event, 0x80 | 10, duration)
        # Redundant end packets: same timestamp, new sequence numbers, sent back to back.
        out.append((stream.t, _rtp(pt, stream.seq, start_ts, stream.ssrc, payload)))
        stream.seq += 1
    stream.ts = start_ts + duration + 160
    stream.t += 0.02
    return out


def write_rtp_pcap(path: str, packets: Iterable[tuple[float, bytes]], *, src: tuple[str, int] = ("127.0.0.1", 6000),
                   dst: tuple[str, int] = ("127.0.0.1", 6100), epoch: float = 1700000000.0) -> None:
    """Write RTP payloads as Ethernet/IPv4/UDP frames in a classic pcap (what SIPp's play_pcap_audio reads).

    SIPp rewrites the addresses and ports; only the timing and the UDP payload matter.
    """
    with open(path, "wb") as f:
        # Global header: magic, v2.4, GMT offset 0, accuracy 0, snaplen, LINKTYPE_ETHERNET.
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for ident, (t, payload) in enumerate(packets):
            udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
            header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident & 0xFFFF, 0, 64, 17, 0,
                                 socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
            checksum = _ip_checksum(header)
            header = header[:10] + struct.pack("!H", checksum) + header[12:]
            frame = b"\x00\x00\x00\x00\x00\x02" + b"\x00\x00\x00\x00\x00\x01" + b"\x08\x00" + header + udp
            ts = epoch + t
            sec = int(ts)
            usec = int(round((ts - sec) * 1e6))
            if usec >= 1000000:
                sec, usec = sec + 1, usec - 1000000
            f.write(struct.pack("<IIII", sec, usec, len(frame), len(frame)))
            f.write(frame)


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# ---------------------------------------------------------------------------
# analysis


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """A WAV file as an int16 array of shape (frames, channels) and its rate."""
    with wave.open(path, "rb") as w:
        channels, rate, width = w.getnchannels(), w.getframerate(), w.getsampwidth()
        if width != 2:
            raise AssertionError(f"{path}: {8 * width}-bit samples, expected 16")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return data.reshape(-1, channels), rate


def dominant_hz(samples: np.ndarray, rate_hz: int) -> float:
    """The frequency of the largest FFT bin (DC excluded) of a mono signal."""
    x = samples.astype(np.float64)
    x = x - x.mean()
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    spectrum[0] = 0.0
    return float(np.argmax(spectrum) * rate_hz / len(x))


def power_at(samples: np.ndarray, hz: float, rate_hz: int) -> float:
    """The windowed FFT magnitude at ``hz`` of a mono signal, per sample (a tone's level, not its rank)."""
    x = samples.astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(spectrum[int(round(hz * len(x) / rate_hz))] / len(x))


def rms(samples: np.ndarray) -> float:
    """Root mean square of int16 samples."""
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if len(samples) else 0.0


def soxi(path: str) -> Deferred[dict[str, float]]:
    """``soxi`` on ``path`` (without blocking the reactor): channels, rate and duration in seconds."""
    exe = shutil.which("soxi")
    if exe is None:
        raise AssertionError("soxi (sox) is not installed")
    d = getProcessOutputAndValue(exe, ["-c", path])
    results: dict[str, float] = {}

    def step(result: tuple[bytes, bytes, int], key: str, nxt: str | None) -> Any:
        out, err, code = result
        if code != 0:
            raise AssertionError(f"soxi failed on {path}: {err.decode(errors='replace')}")
        results[key] = float(out.decode().strip())
        if nxt is None:
            return results
        return getProcessOutputAndValue(exe, [nxt, path])

    d.addCallback(step, "channels", "-r")
    d.addCallback(step, "rate_hz", "-D")
    d.addCallback(step, "duration_s", None)
    return d


def assert_near(case: Any, actual: float, expected: float, tolerance: float, what: str = "") -> None:
    """Fail ``case`` unless ``|actual - expected| <= tolerance`` (trial's assertAlmostEqual ignores ``delta``)."""
    if abs(actual - expected) > tolerance:
        case.fail(f"{what or 'value'}: {actual!r} is not within {tolerance!r} of {expected!r}")
