"""WebRTC legs (protocol.md §5.2): a browser's peer connection as the call's leg, through aiortc.

This is the only module that imports aiortc.  aiortc is asyncio code: it runs on
the loop under Twisted's asyncio reactor (``twistd --reactor=asyncio``), and
every coroutine is bridged to a Deferred here.

* :class:`WebRtcDialer` (:class:`~activecall.media.tracks.ILegDialer` for
  ``webrtc`` calls) applies the client's offer (``option.offer``), gathers all
  of our candidates and answers; the leg it gives carries the answer SDP.
* :class:`WebRtcLeg` (:class:`IIceLeg`) is ticked by the media clock like the
  other legs.  aiortc keeps ICE, DTLS, SRTP and RTP packetization; the audio is
  ours.  The caller's RTP packets are taken from aiortc's receiver as they
  arrive (after SRTP) into our jitter buffer, and in ``RECEIVE`` each tick
  decodes one (our codecs, 16 kHz out) and writes the frame to the sink; RFC
  4733 telephone-events become DTMF.  In ``SEND`` one agent frame goes to the
  :class:`EncodeWorker`, one thread for every leg (libopus runs there without
  the GIL; Opus from 16 kHz mono at 32 kbit/s), a tick's batch per hand-over;
  the outbound track's ``recv()`` hands aiortc the packets.  Nothing hands a
  single frame to a thread: at 50 sessions that cost more than the codecs.  The
  agent's audio starts once the peer has connected, so a greeting sent with
  the answer is heard whole.
* A peer that fails, closes or does not connect within ``handshakeTimeout``
  stops only the media (``ILegEvents.media_ended``): the session stays until
  hangup, socket close, ``/kill``, inactivity or autoHangup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import queue
import threading
from collections import deque
from fractions import Fraction
from typing import Any, Callable, Coroutine, Mapping, Optional, Sequence

import aioice.ice
import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.codecs import CODECS
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.sdp import candidate_from_sdp
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from activecall.aio import deferred_from_coroutine
from activecall.legs import NO_EVENTS, LegTicks
from activecall.media.clock import MediaClock
from activecall.media.tracks import (
    NO_AUDIO,
    AudioSink,
    AudioSource,
    IIceLeg,
    ILegDialer,
    ILegEvents,
    LegOptionError,
    LegSetupError,
    frame_bytes_at,
)
from activecall.media.codecs import CodecError, Decoder, Encoder, get_codec, make_decoder, make_encoder
from activecall.media.dtmf_tones import DtmfTones
from activecall.rtp.dtmf import DtmfReceiver
from activecall.rtp.jitter import LOSS, JitterBuffer
from activecall.rtp.packet import RtpParseError, parse_telephone_event

__all__ = ["EncodeWorker", "WebRtcLeg", "WebRtcDialer", "WebRtcUnavailableDialer", "WEBRTC_CODECS",
           "webrtc_codec_order", "parse_ice_candidate", "rewrite_answer", "DEFAULT_HANDSHAKE_TIMEOUT_S",
           "MAX_OFFER_BYTES", "MAX_CANDIDATE_CHARS", "MAX_MEDIA_SECTIONS", "use_host_address"]

MEDIA_RATE_HZ = 16000
FRAME_SAMPLES = MEDIA_RATE_HZ // 50
FRAME_BYTES = frame_bytes_at(MEDIA_RATE_HZ)
_SILENCE = bytes(FRAME_BYTES)
#: A peer that has not connected this long after our answer stops the media (no ``handshakeTimeout`` given).
DEFAULT_HANDSHAKE_TIMEOUT_S = 30
MAX_OFFER_BYTES = 64 * 1024
MAX_CANDIDATE_CHARS = 512
#: Media sections (m= lines) an offer may have: audio, perhaps video and data the call leaves inactive.
MAX_MEDIA_SECTIONS = 8
#: Agent frames waiting for aiortc's sender (200 ms); a sender that lags loses the oldest.
_MAX_OUTBOUND_FRAMES = 10
#: Seconds of decoded caller audio kept between ticks.
_MAX_INBOUND_S = 2

#: Our codec names (config ``codecs``) and the aiortc mime types they stand for.
WEBRTC_CODECS = {"opus": "audio/opus", "g722": "audio/G722", "pcmu": "audio/PCMU", "pcma": "audio/PCMA",
                 "telephone_event": "audio/telephone-event"}
_NARROWBAND = frozenset({"audio/pcmu", "audio/pcma"})

# aiortc knows no telephone-event; with it in its codec table the browser may send RFC 4733 DTMF
# (RTCDTMFSender), which this module takes before aiortc's decoder sees it.
_TELEPHONE_EVENT = RTCRtpCodecParameters(mimeType="audio/telephone-event", clockRate=8000, channels=1,
                                         payloadType=101)
if not any(c.mimeType.lower() == "audio/telephone-event" for c in CODECS["audio"]):
    CODECS["audio"].append(_TELEPHONE_EVENT)


def use_host_address(bind_ip: str) -> None:
    """Gather ICE host candidates on ``bind_ip`` only (``rtp_bind_ip``/``addr``), loopback included.

    aioice gathers on every interface but loopback and offers no setting; a
    daemon bound to one address must offer that one (and tests bind 127.0.0.1).
    An unspecified address keeps aioice's own choice.
    """
    try:
        address = ipaddress.ip_address(bind_ip)
    except ValueError:
        return
    if address.is_unspecified:
        return
    chosen = str(address)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [chosen] if (address.version == 4 and use_ipv4) or (address.version == 6 and use_ipv6) else []

    aioice.ice.get_host_addresses = host_addresses


def webrtc_codec_order(codecs: Sequence[str]) -> list[str]:
    """The aiortc mime types of the configured ``codecs`` a WebRTC peer can use, in that order;
    telephone-event always last (never the audio codec).  None usable: all of them, Opus first."""
    order = [WEBRTC_CODECS[c] for c in codecs if c in WEBRTC_CODECS and c != "telephone_event"]
    if not order:
        order = [WEBRTC_CODECS[c] for c in ("opus", "g722", "pcmu", "pcma")]
    if "telephone_event" in codecs or not any(c in WEBRTC_CODECS for c in codecs):
        order.append(WEBRTC_CODECS["telephone_event"])
    return order


def parse_ice_candidate(candidate: str, sdp_mid: Optional[str], sdp_mline_index: Optional[int]) -> Any:
    """An ``RTCIceCandidate`` from the browser's ``candidate`` text (``candidate:…``, ``a=`` allowed).

    Raises ValueError naming what is wrong; aiortc's own parser only asserts.
    """
    text = candidate.strip()
    if len(text) > MAX_CANDIDATE_CHARS:
        raise ValueError(f"candidate longer than {MAX_CANDIDATE_CHARS} characters")
    if text.startswith("a="):
        text = text[2:]
    if text.startswith("candidate:"):
        text = text[len("candidate:"):]
    bits = text.split()
    if len(bits) < 8 or bits[6] != "typ":
        raise ValueError("candidate must be 'candidate:<foundation> <component> <transport> <priority> "
                         "<address> <port> typ <type> ...'")
    if not (bits[1].isdigit() and bits[3].isdigit() and bits[5].isdigit()):
        raise ValueError("candidate component, priority and port must be numbers")
    if not 1 <= int(bits[1]) <= 256 or int(bits[3]) >= 2**32 or not 0 <= int(bits[5]) <= 65535:
        raise ValueError("candidate component, priority or port out of range")
    if bits[2].lower() not in ("udp", "tcp"):
        raise ValueError("candidate transport must be udp or tcp")
    if bits[7] not in ("host", "srflx", "prflx", "relay"):
        raise ValueError("candidate type must be host, srflx, prflx or relay")
    if not bits[4].endswith(".local"):
        ipaddress.ip_address(bits[4])  # ValueError for anything else
    parsed = candidate_from_sdp(text)
    parsed.sdpMid = sdp_mid
    parsed.sdpMLineIndex = sdp_mline_index if sdp_mline_index is not None else (0 if sdp_mid is None else None)
    return parsed


def _is_ipv6_candidate(line: str) -> bool:
    bits = line.split()
    return len(bits) > 4 and ":" in bits[4]


def rewrite_answer(sdp: str, *, bind_ip: Optional[str], external_ip: Optional[str], enable_ipv6: bool) -> str:
    """Our answer as sent: host candidates on ``bind_ip`` advertised as ``external_ip`` (1:1 NAT),
    IPv6 candidates removed unless ``enableIpv6`` (then with LF line ends, as Active Call does)."""
    out = []
    changed = False
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            if not enable_ipv6 and _is_ipv6_candidate(line):
                changed = True
                continue
            if external_ip and bind_ip and f" {bind_ip} " in line:
                line = line.replace(f" {bind_ip} ", f" {external_ip} ", 1)
        elif line.startswith("c=IN IP4 ") and external_ip and bind_ip and line[9:].strip() == bind_ip:
            line = f"c=IN IP4 {external_ip}"
        out.append(line)
    return "\n".join(out) + "\n" if changed else "\r\n".join(out) + "\r\n"


class EncodeWorker:
    """One thread encoding the agent frames of every WebRTC leg of the process, a tick's worth at a time.

    libopus runs without the GIL: on this thread it costs the reactor nothing.  The SEND phase
    submits each leg's frame; the batch goes to the thread once the phase is over (one hand-over
    per tick, not per frame) and the payloads come back in one loop callback.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._batch: list[tuple[_AgentTrack, int, bytes]] = []
        self._queue: "queue.SimpleQueue[Optional[list[tuple[_AgentTrack, int, bytes]]]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self.errors = 0

    def submit(self, track: "_AgentTrack", index: int, pcm: bytes) -> None:
        """Encode ``pcm``, frame ``index`` of ``track`` (it gets the payload back in order)."""
        if not self._batch:
            self._loop.call_soon(self._flush)
        self._batch.append((track, index, pcm))

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="webrtc-encode", daemon=True)
            self._thread.start()
        self._queue.put(batch)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            out = []
            for track, index, pcm in batch:
                encoder = track.encoder
                if encoder is None:
                    continue
                try:
                    out.append((track, index, encoder.encode(pcm)))
                except Exception:
                    self.errors += 1
            try:
                self._loop.call_soon_threadsafe(_deliver, out)
            except RuntimeError:  # the loop is closed: nothing is waiting any more
                return

    def stop(self) -> None:
        """End the thread (after what it was given)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None


def _deliver(encoded: list[tuple["_AgentTrack", int, bytes]]) -> None:
    for track, index, payload in encoded:
        track.deliver(index, payload)


class _AgentTrack(MediaStreamTrack):
    """The agent's audio to the browser: frames handed over by the leg's SEND tick, silence between plays.

    ``recv()`` gives aiortc encoded packets (our codecs, 16 kHz mono in: Opus at 32 kbit/s, encoded
    on the :class:`EncodeWorker`), which its sender only packetizes.
    """

    kind = "audio"

    def __init__(self, loop: asyncio.AbstractEventLoop, worker: EncodeWorker) -> None:
        super().__init__()
        self._loop = loop
        self._worker = worker
        self._packets: deque[tuple[int, bytes]] = deque(maxlen=_MAX_OUTBOUND_FRAMES)
        self._waiter: Optional[asyncio.Future[None]] = None
        self.encoder: Optional[Encoder] = None  # used on the worker's thread only
        self._frames_pushed = 0
        self._time_base = Fraction(1, MEDIA_RATE_HZ)
        self._pts_step = FRAME_SAMPLES
        self.frames_sent = 0

    def use_codec(self, name: str) -> None:
        """Encode in ``name`` (``opus``, ``g722``, ``pcmu``, ``pcma``) from now on."""
        self.encoder = make_encoder(name, MEDIA_RATE_HZ)
        # Packets in the codec's RTP clock: aiortc then copies the timestamp instead of doing Fraction math.
        clock_rate = get_codec(name).clock_rate_hz
        self._time_base = Fraction(1, clock_rate)
        self._pts_step = clock_rate // 50

    def push(self, pcm: bytes) -> None:
        """One 20 ms frame of 16 kHz PCM, to be encoded and sent."""
        if self.encoder is not None and self.readyState == "live":
            self._worker.submit(self, self._frames_pushed, pcm)
            self._frames_pushed += 1

    def deliver(self, index: int, payload: bytes) -> None:
        """Encoded frame ``index`` back from the worker (the oldest waiting one is dropped when full)."""
        if self.readyState != "live":
            return
        self._packets.append((index, payload))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def recv(self) -> av.Packet:
        while not self._packets:
            if self.readyState != "live":
                raise MediaStreamError
            self._waiter = self._loop.create_future()
            await self._waiter
            self._waiter = None
        index, payload = self._packets.popleft()
        packet = av.Packet(payload)
        # The frame's own slot: a frame dropped on the way leaves a gap in the RTP timestamps, so the
        # browser's jitter buffer conceals it instead of playing on as if nothing were missing.
        packet.pts = index * self._pts_step
        packet.time_base = self._time_base
        self.frames_sent += 1
        return packet

    def stop(self) -> None:
        super().stop()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@implementer(IIceLeg)
class WebRtcLeg:
    """A browser's peer connection: caller audio from its track, agent audio on ours.

    States::

        negotiating --answer made--> answered --attach()--> running
        running --peer connected--> connected (handshake timer cancelled)
        answered|running|connected --peer failed/closed, handshake timeout--> media ended (trackEnd only)
        any --close()--> closed (peer closed, nothing ticks)
    """

    _log = Logger()

    can_transfer = True  # a bridged transfer; sipRefer needs a SIP dialog
    audio_on_control_socket = False
    signals_media_ready = False  # no mediaReady for WebRTC peers (protocol.md §3.2)
    media_rate_hz = MEDIA_RATE_HZ
    frame_bytes = FRAME_BYTES

    def __init__(self, loop: asyncio.AbstractEventLoop, media_clock: MediaClock, clock: IReactorTime, ssrc: int,
                 handshake_timeout_s: float, on_closed: Optional[Callable[[WebRtcLeg], None]] = None,
                 worker: Optional[EncodeWorker] = None) -> None:
        self._loop = loop
        self._on_closed = on_closed
        self._clock = clock
        self.ssrc = ssrc
        self.native_rate_hz = MEDIA_RATE_HZ
        self.answer_sdp = ""
        self.codec = ""
        self.pc: Optional[RTCPeerConnection] = None
        self._own_worker = EncodeWorker(loop) if worker is None else None  # a leg made alone (tests)
        self.outbound = _AgentTrack(loop, worker if worker is not None else self._own_worker)
        self._handshake_timeout_s = handshake_timeout_s
        self._handshake_timer: Optional[IDelayedCall] = None
        self._source: AudioSource = NO_AUDIO
        self._sink: AudioSink = NO_AUDIO
        self._events: ILegEvents = NO_EVENTS
        self._ticks = LegTicks(media_clock, self._receive_tick, self._send_tick)
        self._inbound = bytearray()
        self._max_inbound = _MAX_INBOUND_S * MEDIA_RATE_HZ * 2
        self._jitter: Optional[JitterBuffer] = None  # caller audio payloads, reordered, until the tick decodes them
        self._decoder: Optional[Decoder] = None
        self._audio_pt: Optional[int] = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._dtmf = DtmfReceiver()
        self._dtmf_pt: Optional[int] = None
        self._tones: Optional[DtmfTones] = None  # digits we play (relayed from a bridged phone)
        self._last_rx_at: Optional[float] = None
        self.attached = False
        self.closed = False
        self.media_ended = False
        self.handshake_done = False
        self.frames_delivered = 0
        self.dropped_bytes = 0
        self.undecodable = 0

    # -- ILeg -------------------------------------------------------------

    @property
    def last_activity_at(self) -> Optional[float]:
        """When caller audio last arrived (seconds on the clock), or None."""
        return self._last_rx_at

    def attach(self, source: AudioSource, sink: AudioSink, events: ILegEvents) -> None:
        """Start ticking; the handshake timer runs from here (the client has our answer now)."""
        if self.closed:
            return
        self._source = source
        self._sink = sink
        self._events = events
        if not self.attached:
            self.attached = True
            self._ticks.start()
            if self.media_ended:
                events.media_ended("peer closed")
            elif not self.handshake_done and self._handshake_timeout_s > 0:
                self._handshake_timer = self._clock.callLater(self._handshake_timeout_s, self._handshake_expired)

    def refer(self, target: str) -> Deferred[Any]:
        """A SIP REFER needs a SIP dialog; a bridged transfer (refer without sipRefer) works."""
        return fail(LegSetupError("sipRefer needs a SIP leg; a WebRTC call can only bridge a transfer"))

    def send_dtmf(self, digits: str) -> bool:
        """In-band tones in the agent audio (aiortc sends no RFC 4733 events)."""
        if self.closed:
            return False
        if self._tones is None:
            self._tones = DtmfTones(MEDIA_RATE_HZ)
        self._tones.push(digits.upper())
        return True

    def send_message(self, body: str, content_type: str, headers: Optional[Mapping[str, str]] = None) -> Deferred[Any]:
        """A WebRTC leg has no SIP dialog."""
        return fail(LegSetupError("message command is only supported for SIP calls"))

    def add_ice_candidate(self, candidate: str, sdp_mid: Optional[str], sdp_mline_index: Optional[int]) -> None:
        """Apply a trickled candidate to the peer (``""``: end of candidates)."""
        if self.closed or self.pc is None:
            return
        parsed = parse_ice_candidate(candidate, sdp_mid, sdp_mline_index) if candidate.strip() else None
        self._spawn(self.pc.addIceCandidate(parsed), "adding an ICE candidate")

    def close(self, headers: Optional[Mapping[str, str]] = None) -> Deferred[None]:
        """Stop ticking and close the peer connection (its ports, tasks and threads).  Idempotent."""
        if self.closed:
            return succeed(None)
        self.closed = True
        if self._on_closed is not None:
            self._on_closed(self)
        self._cancel_handshake_timer()
        self._ticks.stop()
        self._source = self._sink = NO_AUDIO
        self._events = NO_EVENTS
        self._inbound.clear()
        self.outbound.stop()
        if self._own_worker is not None:
            self._own_worker.stop()
        pc, self.pc = self.pc, None
        if pc is None:
            return succeed(None)
        pc.remove_all_listeners()
        return deferred_from_coroutine(self._loop, pc.close())

    # -- set-up (the dialer's) -------------------------------------------

    async def negotiate(self, offer: str, configuration: RTCConfiguration, codec_order: Sequence[str]) -> None:
        """Apply the client's offer and make our answer (all candidates gathered)."""
        pc = RTCPeerConnection(configuration)
        self.pc = pc
        transceiver = pc.addTransceiver(self.outbound, direction="sendrecv")
        capabilities = RTCRtpSender.getCapabilities("audio").codecs
        preferred = [c for mime in codec_order for c in capabilities if c.mimeType.lower() == mime.lower()]
        transceiver.setCodecPreferences(preferred)
        pc.on("connectionstatechange", self._connection_state_changed)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        except Exception as e:  # aiortc's parse errors (ValueError), OperationError, InvalidStateError
            raise LegOptionError(f"Failed to setup track: the offer was not accepted: {e or type(e).__name__}") from None
        # One audio stream per call: every other section of the offer is answered inactive, so aiortc
        # neither sends on it nor starts a receiver (and its decoder thread) for it.
        for other in pc.getTransceivers():
            if other is not transceiver:
                other.direction = "inactive"
        codecs = transceiver._codecs
        audio = [c for c in codecs if c.mimeType.lower() != "audio/telephone-event"]
        if not audio or codecs[0].mimeType.lower() == "audio/telephone-event":
            raise LegOptionError("Failed to setup track: no common audio codec")
        self.codec = audio[0].mimeType.split("/", 1)[1].lower()
        self.native_rate_hz = 8000 if audio[0].mimeType.lower() in _NARROWBAND else MEDIA_RATE_HZ
        self._dtmf_pt = next((c.payloadType for c in codecs if c.mimeType.lower() == "audio/telephone-event"), None)
        self._audio_pt = audio[0].payloadType
        self._jitter = JitterBuffer(audio[0].clockRate, 20)
        self._decoder = make_decoder(self.codec, MEDIA_RATE_HZ)
        self.outbound.use_codec(self.codec)
        self._take_rtp(transceiver.receiver)
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
        _end_decoder_thread(transceiver.receiver)
        if self.closed:
            raise LegSetupError("closed while negotiating")

    def _take_rtp(self, receiver: Any) -> None:
        # The caller's RTP (after SRTP) comes to us, not to aiortc's receiver: its decoder thread and
        # per-frame hand-over back to the loop cost more than the media itself.  Audio goes into our
        # jitter buffer, decoded once per media tick; RFC 4733 events (unknown to aiortc) become DTMF;
        # other payload types were not negotiated and are dropped, as on a SIP leg.
        dtmf_pt, audio_pt = self._dtmf_pt, self._audio_pt
        # aiortc's per-source reception statistics, which its RTCP receiver reports are built from.
        streams = getattr(receiver, "_RTCRtpReceiver__remote_streams", None)
        clock_rate = self._jitter.clock_rate_hz if self._jitter is not None else 8000

        async def handle_rtp_packet(packet: Any, arrival_time_ms: int) -> None:
            pt = packet.payload_type
            if pt == audio_pt:
                if streams is not None:
                    stats = streams.get(packet.ssrc)
                    if stats is None:
                        stats = streams[packet.ssrc] = StreamStatistics(clock_rate)
                    stats.add(packet)
                self._caller_packet(packet)
            elif pt == dtmf_pt:
                self._telephone_event(packet)

        receiver._handle_rtp_packet = handle_rtp_packet

    def _caller_packet(self, packet: Any) -> None:
        jitter = self._jitter
        if jitter is None or self.closed:
            return
        now = self._clock.seconds()
        self._last_rx_at = now
        jitter.put(packet.sequence_number, packet.timestamp, packet.payload, now, packet.marker)

    def _telephone_event(self, packet: Any) -> None:
        try:
            event = parse_telephone_event(packet.payload)
        except RtpParseError:
            return
        digit = self._dtmf.feed(packet.ssrc, packet.timestamp, event, self._clock.seconds())
        if digit is not None and not self.closed:
            self._events.dtmf(digit)

    # -- the peer ---------------------------------------------------------

    def _connection_state_changed(self) -> None:
        pc = self.pc
        if pc is None:
            return
        state = pc.connectionState
        if state == "connected":
            self.handshake_done = True
            self._cancel_handshake_timer()
        elif state in ("failed", "closed"):
            self._end_media(f"peer {state}")

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self.handshake_done and not self.closed:
            self._end_media("handshake timeout")

    def _end_media(self, cause: str) -> None:
        """The peer is gone for good: close it, stop the media; the call's session decides the rest."""
        if self.media_ended or self.closed:
            return
        self.media_ended = True
        self._cancel_handshake_timer()
        self._log.info("WebRTC media ended: {cause}", cause=cause)
        self.outbound.stop()
        pc = self.pc
        if pc is not None:
            pc.remove_all_listeners()
            self._spawn(pc.close(), "closing the peer")
        if self.attached:
            self._events.media_ended(cause)

    def _cancel_handshake_timer(self) -> None:
        timer, self._handshake_timer = self._handshake_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        task = asyncio.ensure_future(coro, loop=self._loop)
        self._tasks.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self._log.warn("WebRTC: {what} failed: {e}", what=what, e=t.exception())

        task.add_done_callback(done)

    # -- media clock ------------------------------------------------------

    def _receive_tick(self, frames: int) -> None:
        """Decode what the jitter buffer gives for each slot (silence for a lost or missing packet once
        the caller's audio started) and write every complete 20 ms frame to the sink."""
        jitter, decoder = self._jitter, self._decoder
        if jitter is None or decoder is None or not self.handshake_done:
            return
        now = self._clock.seconds()
        buf = self._inbound
        for _ in range(frames):
            item = jitter.pop(now)
            if item is None or item is LOSS:
                if jitter.received:
                    buf += _SILENCE
                continue
            try:
                pcm = decoder.decode(bytes(item))
            except CodecError:
                self.undecodable += 1
                pcm = _SILENCE
            room = self._max_inbound - len(buf)
            if len(pcm) > room:
                self.dropped_bytes += len(pcm) - room
                pcm = pcm[:room]
            buf += pcm
        n = FRAME_BYTES
        while len(buf) >= n and not self.closed:
            frame = bytes(buf[:n])
            del buf[:n]
            self.frames_delivered += 1
            self._sink.write_frame(frame)

    def _send_tick(self, frames: int) -> None:
        if not self.handshake_done:
            return  # the agent's first words wait for the peer (a greeting is heard from its start)
        for _ in range(frames):
            pcm = self._source.read_frame()
            if self.closed:
                return
            if self._tones is not None:
                pcm = self._tones.next_frame() or pcm
            if not self.media_ended:
                self.outbound.push(pcm if pcm is not None else _SILENCE)


def _end_decoder_thread(receiver: Any) -> None:
    """End the decoder thread aiortc starts per receiver: no packet reaches it (see ``_take_rtp``),
    and idle it would still be one thread per call.  Its stop() then joins a finished thread."""
    decoder_queue = getattr(receiver, "_RTCRtpReceiver__decoder_queue", None)
    if decoder_queue is not None:
        decoder_queue.put(None)


@implementer(ILegDialer)
class WebRtcDialer:
    """Legs for ``webrtc`` calls: the client's offer in ``option.offer`` (or ``sdp``), our answer back."""

    def __init__(self, loop: asyncio.AbstractEventLoop, media_clock: MediaClock, clock: IReactorTime, ids: Any, *,
                 codecs: Sequence[str], ice_servers: Sequence[Any] = (), bind_ip: Optional[str] = None,
                 external_ip: Optional[str] = None) -> None:
        self._loop = loop
        self._media_clock = media_clock
        self._clock = clock
        self._ids = ids
        self._codec_order = webrtc_codec_order(codecs)
        # Only what the operator configured: aiortc's default would ask a public STUN server.
        self._ice_servers = [RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential,
                                          credentialType=s.credential_type) for s in ice_servers]
        self._bind_ip = bind_ip or None
        self._external_ip = external_ip or None
        self.live: set[WebRtcLeg] = set()
        self.encode_worker = EncodeWorker(loop)
        if self._bind_ip:
            use_host_address(self._bind_ip)

    def dial(self, option: Any, call_id: str, on_ringing: Callable[[bool], None]) -> Deferred[WebRtcLeg]:
        """Negotiate the offer; fires with the leg (``answer_sdp`` set) once our answer is complete."""
        offer = option.offer
        if not offer or not offer.strip():
            raise LegOptionError("Failed to setup track: option.offer (the client's SDP offer) is required")
        if len(offer) > MAX_OFFER_BYTES:
            raise LegOptionError(f"Failed to setup track: option.offer is larger than {MAX_OFFER_BYTES} bytes")
        sections = sum(1 for line in offer.splitlines() if line.startswith("m="))
        if sections > MAX_MEDIA_SECTIONS:
            raise LegOptionError(f"Failed to setup track: option.offer has {sections} media sections "
                                 f"(at most {MAX_MEDIA_SECTIONS})")
        timeout = option.handshake_timeout
        leg = WebRtcLeg(self._loop, self._media_clock, self._clock, self._ids.ssrc(),
                        float(timeout) if timeout else DEFAULT_HANDSHAKE_TIMEOUT_S, on_closed=self.live.discard,
                        worker=self.encode_worker)
        enable_ipv6 = bool(getattr(option, "enable_ipv6", False))
        configuration = RTCConfiguration(iceServers=list(self._ice_servers))
        self.live.add(leg)

        async def negotiate() -> WebRtcLeg:
            try:
                await leg.negotiate(offer, configuration, self._codec_order)
            except BaseException:
                leg.close().addErrback(lambda f: None)
                raise
            assert leg.pc is not None and leg.pc.localDescription is not None
            leg.answer_sdp = rewrite_answer(leg.pc.localDescription.sdp, bind_ip=self._bind_ip,
                                            external_ip=self._external_ip, enable_ipv6=enable_ipv6)
            return leg

        return deferred_from_coroutine(self._loop, negotiate())

    @property
    def open_peers(self) -> int:
        """Peer connections not yet closed (a gauge for /metrics)."""
        return len(self.live)


@implementer(ILegDialer)
class WebRtcUnavailableDialer:
    """Under a reactor other than asyncio aiortc cannot run: every WebRTC invite fails at once, clearly."""

    open_peers = 0

    def dial(self, option: Any, call_id: str, on_ringing: Callable[[bool], None]) -> Deferred[Any]:
        raise LegOptionError("Failed to setup track: WebRTC needs the asyncio reactor "
                             "(run twistd --reactor=asyncio activecall)")
