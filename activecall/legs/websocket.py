"""The leg of a /call session: raw audio inside the control WebSocket.

* :class:`ControlSocketAudio` (one per control session) is the audio side
  of the socket: the session feeds it every client Binary frame
  (:meth:`ControlSocketAudio.receive`); before a leg exists it keeps up to
  10 s of them (spec §5.3: audio may come before ``invite``) and hands them
  to the leg when the leg attaches.  Agent audio leaves through its
  ``send_binary``.
* :class:`WebSocketLeg` (:class:`~activecall.media.tracks.ILeg`) decodes
  client payloads on arrival into a bounded buffer, writes every complete
  20 ms frame to its sink in the media clock's ``RECEIVE`` phase, and in the
  ``SEND`` phase reads its source and sends each agent frame as one encoded
  Binary frame.
* :class:`WebSocketDialer` (:class:`~activecall.media.tracks.ILegDialer`
  for ``webSocket`` calls) makes the leg at once: there is nobody to ring.

``pcm`` runs at the session's ``sampleRate`` both ways; the G.711 codecs at
8 kHz and G.722 at 16 kHz (spec §5.3).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from activecall.legs import LegTicks
from activecall.media.clock import MediaClock
from activecall.media.codecs import get_codec, make_decoder, make_encoder
from activecall.media.tracks import (
    NO_AUDIO,
    AudioSink,
    AudioSource,
    ILeg,
    ILegDialer,
    ILegEvents,
    LegSetupError,
    frame_bytes_at,
)

__all__ = ["WEBSOCKET_CODECS", "websocket_codec", "ControlSocketAudio", "WebSocketLeg", "WebSocketDialer",
           "MAX_EARLY_AUDIO_BYTES", "BUFFER_S"]

WEBSOCKET_CODECS = ("pcm", "pcmu", "pcma", "g722")
#: Client audio kept before the leg exists (10 s of 16 kHz PCM); beyond that it is dropped.
MAX_EARLY_AUDIO_BYTES = 10 * 16000 * 2
#: Seconds of decoded caller audio a leg buffers between ticks; a client sending faster loses the excess.
BUFFER_S = 10


def websocket_codec(name: str | None) -> str:
    """Normalize ``option.codec`` for /call: one of pcm/pcmu/pcma/g722; anything else is pcm."""
    value = (name or "pcm").lower()
    return value if value in WEBSOCKET_CODECS else "pcm"


class ControlSocketAudio:
    """The audio side of one control session's WebSocket.

    States::

        early (payloads kept, 10 s at most) --leg attaches--> bound (payloads go to the leg)
        bound --leg closes--> done (payloads dropped)
    """

    def __init__(self, send_binary: Callable[[bytes], None]) -> None:
        self.send_binary = send_binary
        self._early: Optional[list[bytes]] = []
        self._early_bytes = 0
        self._leg: Optional[WebSocketLeg] = None
        self.early_dropped_bytes = 0

    def receive(self, payload: bytes) -> None:
        """One client Binary frame (caller audio in the session codec)."""
        if self._leg is not None:
            self._leg._receive(payload)
        elif self._early is not None:
            if self._early_bytes + len(payload) <= MAX_EARLY_AUDIO_BYTES:
                self._early.append(payload)
                self._early_bytes += len(payload)
            else:
                self.early_dropped_bytes += len(payload)

    def _bind(self, leg: WebSocketLeg) -> None:
        """``leg`` takes the audio from now on, starting with what came early."""
        early, self._early = self._early or [], None
        self._early_bytes = 0
        self._leg = leg
        for payload in early:
            leg._receive(payload)

    def _unbind(self, leg: WebSocketLeg) -> None:
        if self._leg is leg:
            self._leg = None


@implementer(ILeg)
class WebSocketLeg:
    """Caller audio from the client's Binary frames, agent audio back as one Binary frame per 20 ms.

    States::

        created --attach()--> running (ticked in RECEIVE and SEND) --close()--> closed
    """

    can_transfer = False
    audio_on_control_socket = True
    signals_media_ready = False
    answer_sdp = ""

    def __init__(self, codec: str, sample_rate_hz: int, ssrc: int, port: ControlSocketAudio,
                 media_clock: MediaClock, clock: IReactorTime) -> None:
        self.codec = websocket_codec(codec)
        if self.codec == "pcm":
            self.media_rate_hz = sample_rate_hz
        else:
            self.media_rate_hz = get_codec(self.codec).sample_rate_hz
        self.frame_bytes = frame_bytes_at(self.media_rate_hz)
        self.native_rate_hz = self.media_rate_hz
        self.ssrc = ssrc
        self._port = port
        self._clock = clock
        self._last_rx_at: Optional[float] = None
        self._encoder = make_encoder(self.codec, self.media_rate_hz)
        self._decoder = make_decoder(self.codec, self.media_rate_hz)
        self._odd = b""
        self._buffer = bytearray()
        self._max_buffer = BUFFER_S * self.media_rate_hz * 2
        self._source: AudioSource = NO_AUDIO
        self._sink: AudioSink = NO_AUDIO
        self._ticks = LegTicks(media_clock, self._receive_tick, self._send_tick)
        self.attached = False
        self.closed = False
        self.frames_sent = 0
        self.frames_delivered = 0
        self.bytes_received = 0
        self.dropped_bytes = 0

    @property
    def last_activity_at(self) -> Optional[float]:
        """When the leg last got a client Binary frame (seconds on the clock; audio that came
        before the leg counts when it is handed over at attach), or None."""
        return self._last_rx_at

    def send_dtmf(self, digits: str) -> bool:
        """The client's audio has no signalling channel: nothing is sent."""
        return False

    def attach(self, source: AudioSource, sink: AudioSink, events: ILegEvents) -> None:
        """Start ticking; audio that came before is handed over first.  The far end reports no events."""
        if self.closed:
            return
        self._source = source
        self._sink = sink
        if not self.attached:
            self.attached = True
            self._ticks.start()
            self._port._bind(self)

    def refer(self, target: str) -> Deferred[Any]:
        """A WebSocket leg cannot be transferred."""
        return fail(LegSetupError("refer needs a SIP leg"))

    def send_message(self, body: str, content_type: str, headers: Optional[Mapping[str, str]] = None) -> Deferred[Any]:
        """A WebSocket leg has no SIP dialog."""
        return fail(LegSetupError("message command is only supported for SIP calls"))

    def close(self, headers: Optional[Mapping[str, str]] = None) -> Deferred[None]:
        """Stop ticking; the WebSocket itself belongs to the session.  Idempotent."""
        if not self.closed:
            self.closed = True
            self._ticks.stop()
            self._port._unbind(self)
            self._source = self._sink = NO_AUDIO
            self._buffer.clear()
        return succeed(None)

    def _receive(self, payload: bytes) -> None:
        """Decode one client Binary frame (any length) into the buffer of caller audio."""
        self._last_rx_at = self._clock.seconds()
        self.bytes_received += len(payload)
        if self.codec == "pcm":
            data = self._odd + payload if self._odd else payload
            if len(data) % 2:
                self._odd = data[-1:]
                data = data[:-1]
            else:
                self._odd = b""
            pcm = bytes(data)
        else:
            pcm = self._decoder.decode(payload)
        room = self._max_buffer - len(self._buffer)
        if len(pcm) > room:
            self.dropped_bytes += len(pcm) - room
            pcm = pcm[:room]
        self._buffer += pcm

    def _receive_tick(self, frames: int) -> None:
        """Write every complete frame buffered so far to the sink, in order."""
        buf = self._buffer
        n = self.frame_bytes
        while len(buf) >= n and not self.closed:
            frame = bytes(buf[:n])
            del buf[:n]
            self.frames_delivered += 1
            self._sink.write_frame(frame)

    def _send_tick(self, frames: int) -> None:
        """Read the source once per frame slot and send what it gives as one Binary frame each."""
        for _ in range(frames):
            pcm = self._source.read_frame()
            if self.closed:
                return
            if pcm is not None:
                self._port.send_binary(self._encoder.encode(pcm))
                self.frames_sent += 1


@implementer(ILegDialer)
class WebSocketDialer:
    """Legs for ``webSocket`` calls: the control session's own socket carries the audio."""

    def __init__(self, port: ControlSocketAudio, media_clock: MediaClock, clock: IReactorTime, ids: Any) -> None:
        self._port = port
        self._media_clock = media_clock
        self._clock = clock
        self._ids = ids

    def dial(self, option: Any, call_id: str, on_ringing: Callable[[bool], None]) -> Deferred[WebSocketLeg]:
        """The leg at once (an already fired Deferred), in the option's codec and sample rate."""
        return succeed(WebSocketLeg(option.codec, option.sample_rate, self._ids.ssrc(), self._port,
                                    self._media_clock, self._clock))
