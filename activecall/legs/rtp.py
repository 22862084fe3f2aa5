"""The SIP call's media leg: RTP/SRTP in and out, ticked by the one media clock.

* :class:`RtpLeg` is the media half of a SIP :class:`~activecall.media.tracks.ILeg`
  for a negotiated audio stream (:class:`~activecall.sdp.negotiation.NegotiatedMedia`)
  on an :class:`~activecall.rtp.transport.RtpEndpoint`.  It exchanges PCM
  s16le mono at 16 kHz (``media_rate_hz``, 640-byte frames) with the call,
  whatever the codec, through the source, sink and events given to
  :meth:`RtpLeg.attach` (before that: :data:`~activecall.media.tracks.NO_AUDIO`
  and no events).
* :class:`RtpMediaEngine` ticks every leg from the process-wide
  :class:`~activecall.media.clock.MediaClock`, in two of its phases: in
  ``RECEIVE`` it pulls each leg's jitter buffer, decodes and writes the
  caller frame to the leg's sink; in ``SEND`` it reads each leg's source and
  encodes and sends the agent frame.  The G.711 legs' rate conversion
  (8 <-> 16 kHz) runs as one numpy operation per phase for all of them,
  which is what keeps hundreds of calls inside one reactor thread.

Receive path (per datagram, on the reactor): endpoint (latching, SRTP) ->
``parse_rtp`` into one reused header view -> RtpSession accounting ->
telephone-event to the RFC 4733 receiver (``events.dtmf``), audio into the
jitter buffer (payload kept as a view of the datagram); the first valid
packet while attached is ``events.media_ready()``.  Per tick: pop ->
decode -> 16 kHz frame -> in-band DTMF detector (only when telephone-event
was not negotiated; ``events.dtmf``) -> ``sink.write_frame(frame)``.  A
frame is delivered every tick while the leg runs: silence when nothing
arrived or while the peer holds the call.

Send path (per tick): ``source.read_frame()``; a frame is encoded and sent.
Once the stream runs (:meth:`RtpLeg.start_stream`: at the answer, or at
183 early media) every tick sends a packet, so carriers, NAT bindings and
media-timeout detection see a live stream from a silent agent: when the
source has no frame, silence in the negotiated codec (a precomputed G.711
payload, no encoding work; G.722 and Opus encode a silent frame), or, only
if the peer offered comfort noise, an RFC 3389 CN packet at the start of
the silence and again every :data:`CN_REFRESH_TICKS` (the slots between
send nothing; the audio after them starts a talkspurt with the marker
bit).  Sequence numbers and timestamps run on without gaps; the marker bit
is on the first packet of the stream and after a real gap (hold).  Before
the stream runs (an inbound leg ringing without early media) a slot
without a frame sends nothing and advances the timestamp.  While we may not
send (hold, ``recvonly``) the source is still read, its frames are dropped
and nothing is sent.

Sinks, sources and events run user code in the middle of a tick and may
close legs or open new ones: each phase works on a snapshot of the legs
and skips those closed meanwhile; a new leg joins at the next phase.

RTCP SR/RR go out when :class:`~activecall.rtp.session.RtpSession` says so
(checked once per tick, no timers); :meth:`RtpLeg.close` sends BYE and
releases the ports.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from activecall.legs import NO_EVENTS, PhaseTicker
from activecall.media._audioop import audioop
from activecall.media.clock import RECEIVE, SEND, MediaClock
from activecall.media.codecs import Decoder, Encoder, make_decoder, make_encoder
from activecall.media.dtmf_detect import InbandDtmfDetector
from activecall.media.dtmf_tones import DIGITS as DTMF_DIGITS, MAX_QUEUED_DIGITS, DtmfTones
from activecall.sdp.negotiation import NegotiatedMedia
from activecall.media.tracks import NO_AUDIO, AudioSink, AudioSource, ILegEvents
from activecall.rtp.dtmf import DtmfReceiver, DtmfSender
from activecall.rtp.jitter import LOSS, JitterBuffer
from activecall.rtp.packet import RtpHeaderView, RtpParseError, parse_rtcp, parse_rtp, parse_telephone_event
from activecall.rtp.session import ReceiveStatus, RandomBits, RtpSession
from activecall.rtp.srtp import SrtpContext
from activecall.rtp.transport import RtpEndpoint

__all__ = ["RtpLeg", "RtpMediaEngine", "MEDIA_RATE_HZ", "FRAME_BYTES"]

MEDIA_RATE_HZ = 16000
FRAME_SAMPLES = MEDIA_RATE_HZ // 50
FRAME_BYTES = 2 * FRAME_SAMPLES
_SILENCE = bytes(FRAME_BYTES)
# Returned by RtpLeg._tx_slot for "send silence this slot" (compared by identity).
_SILENT_SLOT = bytes(FRAME_BYTES)
_G711_FRAME = 160  # samples of 8 kHz audio per 20 ms
# Polyphase 2x filters for the batched G.711 path: taps per phase (up) and in total (down).
_UP_TAPS = 32
_DOWN_TAPS = 64
_CUTOFF_HZ = 3600.0
_KAISER_BETA = 8.0
_PT_CN = 13
# What a silent slot sends in G.711 (the codes of 0): the payload, precomputed.
_PCMU_SILENCE = b"\xff" * _G711_FRAME
_PCMA_SILENCE = b"\xd5" * _G711_FRAME
#: RFC 3389 comfort noise: the level (-dBov) of our CN packets, and how often
#: (in 20 ms slots) a silence longer than one packet repeats its CN packet.
CN_LEVEL_DBOV = 80
CN_REFRESH_TICKS = 50
_CN_PAYLOAD = bytes((CN_LEVEL_DBOV,))
_ACCEPT = (ReceiveStatus.ACCEPTED, ReceiveStatus.NEW_STREAM)


def _lowpass(taps: int, rate_hz: float) -> np.ndarray:
    """A Kaiser-windowed sinc low-pass at ``_CUTOFF_HZ`` with unity DC gain."""
    fc = _CUTOFF_HZ / rate_hz
    t = np.arange(taps, dtype=np.float64) - (taps - 1) / 2.0
    h = 2.0 * fc * np.sinc(2.0 * fc * t) * np.kaiser(taps, _KAISER_BETA)
    return h / h.sum()


def _up_matrix() -> np.ndarray:
    """Banded (taps-1+160, 320) matrix: [history | 8 kHz frame] @ M = the 16 kHz frame.

    Output sample 2j+p is the window of input j..j+taps-1 dotted with phase p
    of a 2x interpolation low-pass; each phase has unity DC gain.  One dense
    matrix product per tick for all legs is several times faster in BLAS than
    any strided FIR (``benchmarks/rtp_concurrency.py``).
    """
    h = _lowpass(2 * _UP_TAPS, 16000.0)
    m = np.zeros((_UP_TAPS - 1 + _G711_FRAME, 2 * _G711_FRAME), dtype=np.float64)
    for p in range(2):
        phase = h[p::2][::-1].copy()
        phase /= phase.sum()
        for j in range(_G711_FRAME):
            m[j : j + _UP_TAPS, 2 * j + p] = phase
    return m.astype(np.float32)


def _down_matrix() -> np.ndarray:
    """Banded (taps-1+320, 160) matrix: [history | 16 kHz frame] @ M = the low-passed 8 kHz frame."""
    g = _lowpass(_DOWN_TAPS, 16000.0)[::-1]
    m = np.zeros((_DOWN_TAPS - 1 + 2 * _G711_FRAME, _G711_FRAME), dtype=np.float64)
    for j in range(_G711_FRAME):
        m[2 * j + 1 : 2 * j + 1 + _DOWN_TAPS, j] = g
    return m.astype(np.float32)


def _to_s16(y: np.ndarray) -> bytes:
    np.rint(y, out=y)
    np.clip(y, -32768.0, 32767.0, out=y)
    return y.astype("<i2").tobytes()


class _G711Batch:
    """Streaming 8 <-> 16 kHz conversion for many legs at once, one row of filter history per leg."""

    def __init__(self, capacity: int = 64) -> None:
        self._up = _up_matrix()
        self._down = _down_matrix()
        self._up_hist = np.zeros((capacity, _UP_TAPS - 1), dtype=np.float32)
        self._down_hist = np.zeros((capacity, _DOWN_TAPS - 1), dtype=np.float32)
        self._free: list[int] = list(range(capacity - 1, -1, -1))

    def take_row(self) -> int:
        """A fresh (zeroed) history row for a new leg."""
        if not self._free:
            cap = self._up_hist.shape[0]
            self._up_hist = np.concatenate([self._up_hist, np.zeros_like(self._up_hist)])
            self._down_hist = np.concatenate([self._down_hist, np.zeros_like(self._down_hist)])
            self._free = list(range(2 * cap - 1, cap - 1, -1))
        row = self._free.pop()
        self.reset_row(row)
        return row

    def give_row(self, row: int) -> None:
        """Return a leg's row."""
        self._free.append(row)

    def reset_row(self, row: int) -> None:
        """Forget a row's filter history (a new leg)."""
        self._up_hist[row] = 0.0
        self._down_hist[row] = 0.0

    def reset_up(self, row: int) -> None:
        """Forget a row's receive filter history (the caller went silent)."""
        self._up_hist[row] = 0.0

    def reset_down(self, row: int) -> None:
        """Forget a row's send filter history (the agent went silent)."""
        self._down_hist[row] = 0.0

    def upsample(self, rows: list[int], pcm8k: list[bytes]) -> bytes:
        """n frames of 160 samples at 8 kHz -> n frames of 320 samples at 16 kHz, concatenated."""
        n = len(rows)
        idx = np.array(rows, dtype=np.intp)
        x = np.empty((n, _UP_TAPS - 1 + _G711_FRAME), dtype=np.float32)
        x[:, : _UP_TAPS - 1] = self._up_hist[idx]
        x[:, _UP_TAPS - 1 :] = np.frombuffer(b"".join(pcm8k), dtype="<i2").reshape(n, _G711_FRAME)
        self._up_hist[idx] = x[:, _G711_FRAME:]
        return _to_s16(x @ self._up)

    def downsample(self, rows: list[int], pcm16k: list[bytes]) -> bytes:
        """n frames of 320 samples at 16 kHz -> n frames of 160 samples at 8 kHz, concatenated."""
        n = len(rows)
        idx = np.array(rows, dtype=np.intp)
        x = np.empty((n, _DOWN_TAPS - 1 + 2 * _G711_FRAME), dtype=np.float32)
        x[:, : _DOWN_TAPS - 1] = self._down_hist[idx]
        x[:, _DOWN_TAPS - 1 :] = np.frombuffer(b"".join(pcm16k), dtype="<i2").reshape(n, 2 * _G711_FRAME)
        self._down_hist[idx] = x[:, 2 * _G711_FRAME :]
        return _to_s16(x @ self._down)


class RtpMediaEngine:
    """Ticks all RTP legs from the one media clock; batches the G.711 rate conversion.

    Subscribed to the media clock's ``RECEIVE`` and ``SEND`` phases while at
    least one leg runs.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, media_clock: MediaClock, *, batch_g711: bool = True) -> None:
        self._clock = clock
        self._media_clock = media_clock
        self.batch_g711 = batch_g711
        self._legs: list[RtpLeg] = []
        # Counters of the legs already removed, so /metrics totals never go down.
        self.retired_stats: dict[str, int] = {}
        self._batch = _G711Batch()
        self.frames = 0
        self.late_frames = 0
        self._subscribed = False
        self._receive = PhaseTicker(self._receive_tick)
        self._send = PhaseTicker(self._send_tick)

    def __len__(self) -> int:
        return len(self._legs)

    def add(self, leg: RtpLeg) -> None:
        """Start ticking ``leg``."""
        if leg in self._legs:
            return
        self._legs.append(leg)
        if leg._batched:
            leg._row = self._batch.take_row()
        if not self._subscribed:
            self._subscribed = True
            self._media_clock.subscribe(self._receive, RECEIVE)
            self._media_clock.subscribe(self._send, SEND)

    def legs(self) -> list[RtpLeg]:
        """The legs ticking now."""
        return list(self._legs)

    def remove(self, leg: RtpLeg) -> None:
        """Stop ticking ``leg``; its counters join :attr:`retired_stats`."""
        try:
            self._legs.remove(leg)
        except ValueError:
            return
        retired = self.retired_stats
        for name, value in leg.stats().items():
            if type(value) is int:
                retired[name] = retired.get(name, 0) + value
        if leg._row >= 0:
            self._batch.give_row(leg._row)
            leg._row = -1
        if not self._legs and self._subscribed:
            self._subscribed = False
            self._media_clock.unsubscribe(self._receive, RECEIVE)
            self._media_clock.unsubscribe(self._send, SEND)

    def _rebatch(self, leg: RtpLeg) -> None:
        """A leg's codec changed: give it or take away its batch row."""
        if leg._batched and leg._row < 0:
            leg._row = self._batch.take_row()
        elif not leg._batched and leg._row >= 0:
            self._batch.give_row(leg._row)
            leg._row = -1

    def _receive_tick(self, frames: int) -> None:
        """The receive phase: ``frames`` caller frames per leg (more than 1 after a late reactor)."""
        now = self._clock.seconds()
        if frames > 1:
            self.late_frames += frames - 1
        for _ in range(frames):
            self._receive_frame(now)
        self.frames += frames

    def _send_tick(self, frames: int) -> None:
        """The send phase: ``frames`` agent frames per leg, then RTCP where due."""
        now = self._clock.seconds()
        for _ in range(frames):
            self._send_frame(now)
        for leg in list(self._legs):
            if not leg.closed and now >= leg._rtcp_due_at:
                leg._send_rtcp(now)

    def _receive_frame(self, now: float) -> None:
        # Pull and convert first (no user code runs), then deliver: sinks may close or open legs.
        batch = self._batch
        legs = list(self._legs)
        frames: list[bytes | None] = []
        rows: list[int] = []
        pcms: list[bytes] = []
        for leg in legs:
            pcm = leg._pull(now)
            if leg._batched:
                if pcm is None:
                    if leg._up_dirty:
                        leg._up_dirty = False
                        batch.reset_up(leg._row)
                    frames.append(_SILENCE)
                else:
                    leg._up_dirty = True
                    rows.append(leg._row)
                    pcms.append(pcm)
                    frames.append(None)  # filled from the batch below
            else:
                frames.append(_SILENCE if pcm is None else pcm)
        if rows:
            out = batch.upsample(rows, pcms)
            i = 0
            for k, frame in enumerate(frames):
                if frame is None:
                    frames[k] = out[i * FRAME_BYTES : (i + 1) * FRAME_BYTES]
                    i += 1
        for leg, frame in zip(legs, frames):
            if not leg.closed:
                leg._deliver(frame)  # type: ignore[arg-type]

    def _send_frame(self, now: float) -> None:
        # Read every source first (user code: it may close or open legs), then encode and send
        # for the legs still open, so a batch row given back meanwhile is never written.
        taken: list[tuple[RtpLeg, bytes]] = []
        for leg in list(self._legs):
            if leg.closed:
                continue
            pcm = leg._tx_slot(now)
            if pcm is not None:
                taken.append((leg, pcm))
        rows: list[int] = []
        pcms: list[bytes] = []
        down_legs: list[RtpLeg] = []
        for leg, pcm in taken:
            if leg.closed:
                continue
            if pcm is _SILENT_SLOT:
                leg._send_silence(now)
            elif leg._batched:
                leg._down_dirty = True
                down_legs.append(leg)
                rows.append(leg._row)
                pcms.append(pcm)
            else:
                leg._send_payload(leg._encode(pcm), now)
        if down_legs:
            out = self._batch.downsample(rows, pcms)
            n = 2 * _G711_FRAME
            for i, leg in enumerate(down_legs):
                leg._send_payload(leg._lin2law(out[i * n : (i + 1) * n], 2), now)


class RtpLeg:
    """One SIP call's RTP media leg (see the module docstring for the data paths).

    :meth:`attach` connects it to the call: every 20 ms a 640-byte caller
    frame at 16 kHz goes to the sink and an agent frame is read from the
    source; ``events.dtmf(digit)`` once per key press (RFC 4733, or in-band
    detection when telephone-event was not negotiated);
    ``events.media_ready()`` once, on the first valid inbound packet after
    latching while attached.

    States::

        running --attach()--> attached --update(negotiated)--> attached (same sockets, SSRC and sequence)
        running/attached --close()--> closed (RTCP BYE sent, ports released)

    and, independently, the send stream: idle (only agent frames are sent)
    --start_stream()--> streaming (a packet every 20 ms while we may send).
    """

    _log = Logger()

    media_rate_hz = MEDIA_RATE_HZ
    frame_bytes = FRAME_BYTES

    def __init__(
        self,
        engine: RtpMediaEngine,
        endpoint: RtpEndpoint,
        negotiated: NegotiatedMedia,
        *,
        clock: IReactorTime,
        rng: RandomBits,
        cname: bytes = b"activecall",
        jitter_capacity: int = 64,
    ) -> None:
        self._engine = engine
        self._endpoint = endpoint
        self._clock = clock
        self._source: AudioSource = NO_AUDIO
        self._sink: AudioSink = NO_AUDIO
        self._events: ILegEvents = NO_EVENTS
        self._attached = False
        self._jitter_capacity = jitter_capacity
        now = clock.seconds()
        self._session = RtpSession(
            rng, now, clock_rate_hz=negotiated.clock_rate_hz, payload_type=negotiated.payload_type,
            cname=cname, min_sequential=1, check_timestamps=True,
        )
        self._rtcp_due_at = self._session.deadline()
        self._view = RtpHeaderView()
        self._dtmf_rx = DtmfReceiver()
        self._inband_rx: InbandDtmfDetector | None = None
        # Digits we play to the far end: RFC 4733 events, or tones when telephone-event was not negotiated.
        self._dtmf_tx: DtmfSender | None = None
        self._tones_tx: DtmfTones | None = None
        self._rx_fifo = bytearray()
        self._row = -1
        self._up_dirty = False
        self._down_dirty = False
        self._tx_marker = True
        self._streaming = False
        # Slots until the next comfort noise packet; -1 while not in a CN silence.
        self._cn_wait = -1
        self.media_ready = False
        self.closed = False
        self._released = False
        self._close_waiters: list[Deferred[None]] = []
        # Counters.
        self.rx_audio_packets = 0
        self.rx_dropped = 0
        self.rx_unknown_pt = 0
        self.rx_dtmf_packets = 0
        self.rx_rtcp_errors = 0
        self.tx_audio_packets = 0
        self.tx_silent_slots = 0
        self.tx_dtmf_packets = 0
        self.tx_dtmf_dropped = 0
        self.frames_delivered = 0
        self.negotiated = negotiated
        self._apply_codec(None, negotiated)
        self._apply_transport(None, negotiated)
        endpoint.set_handlers(self._on_rtp, self._on_rtcp)
        engine.add(self)

    # -- the media part of ILeg ------------------------------------------------

    @property
    def ssrc(self) -> int:
        """Our RTP SSRC (also the track ssrc in trackEnd)."""
        return self._session.sender.ssrc

    @property
    def last_activity_at(self) -> float | None:
        """When the last valid RTP packet arrived (inactivity tracking), or None."""
        return self._endpoint.last_rx_at

    def attach(self, source: AudioSource, sink: AudioSink, events: ILegEvents) -> None:
        """From the next tick on, read agent frames from ``source`` and write caller frames to ``sink``."""
        self._source = source
        self._sink = sink
        self._events = events
        self._attached = True

    def start_stream(self) -> None:
        """From the next tick on, send a packet every 20 ms (silence or comfort noise without agent audio)."""
        self._streaming = True

    @property
    def streaming(self) -> bool:
        """Whether :meth:`start_stream` was called."""
        return self._streaming

    def close(self) -> Deferred[None]:
        """Send RTCP BYE, stop ticking and release the ports; the Deferred fires when they are free."""
        waiter: Deferred[None] = Deferred()
        if self.closed:
            if self._released:
                waiter.callback(None)
            else:
                self._close_waiters.append(waiter)
            return waiter
        self.closed = True
        self._close_waiters.append(waiter)
        self._engine.remove(self)
        self._source = self._sink = NO_AUDIO
        self._events = NO_EVENTS
        if self.negotiated.can_send:
            self._endpoint.send_rtcp(self._session.bye(self._clock.seconds()))
        d = self._endpoint.stop()
        d.addErrback(lambda f: self._log.failure("closing RTP ports failed", f))
        d.addCallback(self._ports_released)
        return waiter

    def _ports_released(self, _: object) -> None:
        self._released = True
        waiters, self._close_waiters = self._close_waiters, []
        for w in waiters:
            w.callback(None)

    # -- control ------------------------------------------------------------

    @property
    def on_hold(self) -> bool:
        """Whether the peer holds the call (its audio is replaced by silence)."""
        return self.negotiated.remote_hold

    @property
    def local_port(self) -> int:
        """Our RTP port."""
        return self._endpoint.local_port

    @property
    def session(self) -> RtpSession:
        """The RTP session (statistics, RTT)."""
        return self._session

    @property
    def jitter_buffer(self) -> JitterBuffer:
        """The receive jitter buffer (statistics)."""
        return self._jb

    def update(self, negotiated: NegotiatedMedia) -> None:
        """Apply a re-offer/answer (hold, codec, address, keys) without stopping the stream."""
        old = self.negotiated
        self.negotiated = negotiated
        if (negotiated.codec, negotiated.payload_type, negotiated.clock_rate_hz, negotiated.telephone_event_pt,
                negotiated.remote_ptime_ms, negotiated.comfort_noise_pt) != (
                old.codec, old.payload_type, old.clock_rate_hz, old.telephone_event_pt, old.remote_ptime_ms,
                old.comfort_noise_pt):
            self._apply_codec(old, negotiated)
            self._engine._rebatch(self)
        self._apply_transport(old, negotiated)

    def send_dtmf(self, digits: str) -> None:
        """Play ``digits`` to the far end: RFC 4733 events when telephone-event was negotiated (100 ms
        each, 60 ms apart, audio paused meanwhile), else in-band tones in place of the audio.  At most
        32 digits wait; more are dropped (counted).  ValueError for a character that is not a digit."""
        digits = digits.upper()
        bad = [d for d in digits if d not in DTMF_DIGITS]
        if bad:
            raise ValueError(f"not a DTMF digit: {bad[0]!r}")
        if self._te_pt >= 0:
            sender = self._dtmf_tx
            if sender is None:
                sender = self._dtmf_tx = DtmfSender(self.negotiated.clock_rate_hz)
            room = max(0, MAX_QUEUED_DIGITS - sender.pending)
            sender.send(digits[:room])
            self.tx_dtmf_dropped += max(0, len(digits) - room)
            return
        tones = self._tones_tx
        if tones is None:
            tones = self._tones_tx = DtmfTones(MEDIA_RATE_HZ)
        before = tones.dropped
        tones.push(digits)
        self.tx_dtmf_dropped += tones.dropped - before

    def stats(self) -> dict[str, Any]:
        """Counters of the leg, its endpoint and its jitter buffer."""
        jb = self._jb
        cur = self._session.receiver.current
        return {
            **self._endpoint.stats(),
            "rx_audio_packets": self.rx_audio_packets,
            "rx_dropped": self.rx_dropped,
            "rx_unknown_pt": self.rx_unknown_pt,
            "rx_dtmf_packets": self.rx_dtmf_packets,
            "tx_audio_packets": self.tx_audio_packets,
            "tx_silent_slots": self.tx_silent_slots,
            "tx_dtmf_packets": self.tx_dtmf_packets,
            "frames_delivered": self.frames_delivered,
            "jitter_lost": jb.lost,
            "jitter_late": jb.late,
            "jitter_underruns": jb.underruns,
            "jitter_target_frames": jb.target_frames,
            "rtp_lost": cur.cumulative_lost if cur is not None else 0,
            "rtt_s": self._session.rtt_s,
        }

    # -- setup helpers ------------------------------------------------------

    def _apply_codec(self, old: NegotiatedMedia | None, neg: NegotiatedMedia) -> None:
        """Set payload types, codec state and jitter buffer; keep what a re-offer did not change."""
        codec = neg.codec
        self._pt = neg.payload_type
        self._te_pt = -1 if neg.telephone_event_pt is None else neg.telephone_event_pt
        self._cn_pt = -1 if neg.comfort_noise_pt is None else neg.comfort_noise_pt
        self._cn_wait = -1
        if old is None or (old.telephone_event_pt, old.clock_rate_hz) != (neg.telephone_event_pt, neg.clock_rate_hz):
            self._dtmf_tx = None  # digits still waiting are dropped with the old stream's clock
        self._silence_payload = _PCMU_SILENCE if codec == "pcmu" else _PCMA_SILENCE if codec == "pcma" else None
        sender = self._session.sender
        sender.payload_type = neg.payload_type
        sender.clock_rate_hz = neg.clock_rate_hz
        self._session.receiver.clock_rate_hz = neg.clock_rate_hz
        # RTP ticks per 20 ms frame (G.722 runs its RTP clock at 8000).
        self._spf = neg.clock_rate_hz // 50
        remote_ptime = neg.remote_ptime_ms if neg.remote_ptime_ms and 10 <= neg.remote_ptime_ms <= 120 else 20
        if old is None or (old.clock_rate_hz, old.remote_ptime_ms) != (neg.clock_rate_hz, neg.remote_ptime_ms):
            self._jb = JitterBuffer(neg.clock_rate_hz, remote_ptime, capacity=self._jitter_capacity)
            self._rx_fifo.clear()
        if old is None or old.codec != codec:
            self._rx_fifo.clear()
            self._batched = codec in ("pcmu", "pcma") and self._engine.batch_g711
            self._decoder: Decoder | None = None
            self._encoder: Encoder | None = None
            if self._batched:
                self._lin2law = audioop.lin2ulaw if codec == "pcmu" else audioop.lin2alaw
                self._law2lin = audioop.ulaw2lin if codec == "pcmu" else audioop.alaw2lin
                self._rx_frame_len = 2 * _G711_FRAME
            else:
                self._decoder = make_decoder(codec, MEDIA_RATE_HZ)
                self._encoder = make_encoder(codec, MEDIA_RATE_HZ)
                self._rx_frame_len = FRAME_BYTES
        # Concealment of a lost packet: silence of one remote packet duration.
        self._loss_fill = bytes(self._rx_frame_len * remote_ptime // 20)
        if neg.telephone_event_pt is None:
            if self._inband_rx is None:
                self._inband_rx = InbandDtmfDetector(MEDIA_RATE_HZ)
        else:
            self._inband_rx = None

    def _apply_transport(self, old: NegotiatedMedia | None, neg: NegotiatedMedia) -> None:
        pts = {neg.payload_type, _PT_CN}  # 13: comfort noise (RFC 3389), sent by many phones unasked
        if neg.telephone_event_pt is not None:
            pts.add(neg.telephone_event_pt)
        if neg.comfort_noise_pt is not None:
            pts.add(neg.comfort_noise_pt)
        self._endpoint.payload_types = frozenset(pts)
        self._endpoint.set_remote(
            (neg.remote_address, neg.remote_port),
            (neg.remote_rtcp_address, neg.remote_rtcp_port),
            rtcp_mux=neg.rtcp_mux,
        )
        keys = (neg.local_crypto, neg.remote_crypto)
        if old is None or keys != (old.local_crypto, old.remote_crypto):
            if neg.local_crypto is not None and neg.remote_crypto is not None:
                self._endpoint.set_srtp(SrtpContext.from_sdes(neg.local_crypto, neg.remote_crypto))
            else:
                self._endpoint.set_srtp(None)
        self._receiving = neg.can_receive and not neg.remote_hold

    # -- receive (per datagram) -----------------------------------------------

    def _on_rtp(self, data: bytes, now: float) -> None:
        try:
            h = parse_rtp(data, self._view)
        except RtpParseError:
            self.rx_dropped += 1
            return
        pt = h.payload_type
        if pt == self._pt:
            status = self._session.receive_rtp(h, now)
            if status not in _ACCEPT:
                self.rx_dropped += 1
                return
            if status is ReceiveStatus.NEW_STREAM:
                self._jb.reset()
                self._rx_fifo.clear()
            self.rx_audio_packets += 1
            off = h.payload_offset
            self._jb.put(h.sequence, h.timestamp, data[off : off + h.payload_length], now, h.marker)
        elif pt == self._te_pt:
            # Events are told apart by their own identity (RFC 4733), whatever the sequence
            # check says, and an event from another SSRC must not take the audio stream over.
            cur = self._session.receiver.current
            if cur is None or cur.ssrc == h.ssrc:
                status = self._session.receive_rtp(h, now, False)
                if status is ReceiveStatus.NEW_STREAM:
                    self._jb.reset()
                    self._rx_fifo.clear()
            else:
                status = ReceiveStatus.STALE_SOURCE
            self.rx_dtmf_packets += 1
            try:
                event = parse_telephone_event(h.payload)
            except RtpParseError:
                self.rx_dropped += 1
                return
            digit = self._dtmf_rx.feed(h.ssrc, h.timestamp, event, now)
            if digit is not None and self._receiving:
                self._events.dtmf(digit)
                if self.closed:
                    return  # the digit ended the call
            if status not in _ACCEPT:
                return
        elif pt == _PT_CN or pt == self._cn_pt:
            # Comfort noise: the peer is silent; the jitter buffer runs dry into silence.
            self._session.receive_rtp(h, now)
            return
        else:
            self.rx_unknown_pt += 1
            return
        if not self.media_ready and self._attached:
            self.media_ready = True
            self._events.media_ready()

    def _on_rtcp(self, data: bytes, now: float) -> None:
        try:
            packets = parse_rtcp(data)
        except RtpParseError:
            self.rx_rtcp_errors += 1
            return
        self._session.receive_rtcp(packets, now)

    # -- per frame slot (called by the engine) ------------------------------------

    def _pull(self, now: float) -> bytes | None:
        """The next caller frame at the decode rate (8 kHz for batched G.711), None for silence."""
        jb = self._jb
        fifo = self._rx_fifo
        need = self._rx_frame_len
        while len(fifo) < need:
            item = jb.pop(now)
            if item is None:
                break
            if item is LOSS or not self._receiving:
                pcm = self._loss_fill
            elif self._batched:
                pcm = self._law2lin(item, 2)
            else:
                assert self._decoder is not None
                pcm = self._decoder.decode(bytes(item))
            if not fifo and len(pcm) == need:
                return pcm
            fifo += pcm
        if len(fifo) >= need:
            out = bytes(fifo[:need])
            del fifo[:need]
            return out
        return None

    def _deliver(self, frame: bytes) -> None:
        if not self._receiving:
            frame = _SILENCE
        self.frames_delivered += 1
        det = self._inband_rx
        if det is not None and frame is not _SILENCE and self._attached:
            for digit in det.feed(frame):
                self._events.dtmf(digit)
            if self.closed:
                return  # the digit ended the call
        self._sink.write_frame(frame)

    def _tx_slot(self, now: float) -> bytes | None:
        """Use one 20 ms send slot: the agent frame to encode, :data:`_SILENT_SLOT` (send silence),
        or None (send nothing; the timestamp advances)."""
        pcm = self._source.read_frame()
        if self.closed:
            return None  # the source ended the call
        if not self.negotiated.can_send:
            self._session.sender.skip(self._spf)
            self._tx_marker = True
            return None
        if self._dtmf_tx is not None and self._dtmf_tx.busy:
            self._send_dtmf_event(now)
            return None
        if self._tones_tx is not None:
            pcm = self._tones_tx.next_frame() or pcm
        if pcm is not None:
            if self._cn_wait >= 0:
                # The end of a comfort noise silence: a new talkspurt.
                self._cn_wait = -1
                self._tx_marker = True
            return pcm
        if self._streaming:
            return _SILENT_SLOT
        self._session.sender.skip(self._spf)
        self._tx_marker = True
        return None

    def _send_dtmf_event(self, now: float) -> None:
        """One slot of an RFC 4733 digit (or of the gap after it); the next audio starts a talkspurt."""
        assert self._dtmf_tx is not None
        sender = self._session.sender
        packet = self._dtmf_tx.tick(sender.timestamp)
        if packet is None:
            sender.skip(self._spf)
        else:
            data = sender.build(packet.payload, self._spf, now, marker=packet.marker, payload_type=self._te_pt,
                                rtp_ts=packet.rtp_ts)
            self._endpoint.send_rtp(data)
            self.tx_dtmf_packets += 1
        self._tx_marker = True

    def _send_silence(self, now: float) -> None:
        """One silent slot of the stream: comfort noise if the peer offered it, else coded silence."""
        sender = self._session.sender
        if self._cn_pt >= 0:
            if self._cn_wait > 0:
                self._cn_wait -= 1
                sender.skip(self._spf)
                return
            self._cn_wait = CN_REFRESH_TICKS - 1
            data = sender.build(_CN_PAYLOAD, self._spf, now, marker=self._tx_marker, payload_type=self._cn_pt)
        else:
            payload = self._silence_payload
            if payload is None:
                payload = self._encode(_SILENCE)
            elif self._down_dirty:
                self._down_dirty = False
                self._engine._batch.reset_down(self._row)
            data = sender.build(payload, self._spf, now, marker=self._tx_marker)
        self._tx_marker = False
        self._endpoint.send_rtp(data)
        self.tx_silent_slots += 1

    def _encode(self, pcm: bytes) -> bytes:
        assert self._encoder is not None
        return self._encoder.encode(pcm)

    def _send_payload(self, payload: bytes, now: float) -> None:
        data = self._session.sender.build(payload, self._spf, now, marker=self._tx_marker)
        self._tx_marker = False
        self._endpoint.send_rtp(data)
        self.tx_audio_packets += 1

    def _send_rtcp(self, now: float) -> None:
        packet = self._session.rtcp_due(now)
        self._rtcp_due_at = self._session.deadline()
        if packet is not None:
            self._endpoint.send_rtcp(packet)
