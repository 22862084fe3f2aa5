"""``mediaPass`` (protocol.md §4.7): a call's audio handed to an external WebSocket server, whose answer
the remote party hears.

The daemon connects as a client to ``url`` (``sample_rate`` and ``packet_size`` added to its query; the
``[fetch]`` policy's ``allowed_hosts`` apply).  Both ways the messages are Binary, PCM s16le mono:

- to the server: the remote party's audio, as the call hears it (after mute), brought to 16 kHz, cut
  into ``packetSize`` bytes, then resampled to ``outputSampleRate``;
- from the server: PCM at ``inputSampleRate``, resampled to the call's rate and mixed into what the
  agent plays on the server-side track (``trackStart{SST}`` when the connection opens, ``trackEnd{SST}``
  when it closes).  At most 10 s wait; beyond, the oldest audio is dropped.  With ``ptime`` playback starts
  once that much has arrived and a late packet leaves silence, so the stream never pauses.

A refused URL or a connection that fails is ``error{SST, sender: "media_pass: <url>"}``; the call goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlsplit, urlunsplit

from activecall.call.wsaudio import WebSocketAudio
from activecall.media.resample import Resampler
from activecall.options import MediaPassOption

if TYPE_CHECKING:
    from activecall.call.controller import CallController

__all__ = ["MediaPass", "media_pass_url", "MAX_BUFFER_S"]

MAX_BUFFER_S = 10
MEDIA_RATE_HZ = 16000


def media_pass_url(option: MediaPassOption) -> str:
    """``option.url`` with ``sample_rate`` and ``packet_size`` appended to its query."""
    parts = urlsplit(option.url)
    extra = f"sample_rate={option.output_sample_rate}&packet_size={option.packet_size}"
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))


class _ToServer:
    """A sink on the call's caller audio: 16 kHz packets of ``packetSize`` bytes, resampled, sent."""

    def __init__(self, send: Any, call_rate_hz: int, option: MediaPassOption) -> None:
        self._send = send
        self._to_16k = Resampler(call_rate_hz, MEDIA_RATE_HZ) if call_rate_hz != MEDIA_RATE_HZ else None
        self._out = Resampler(MEDIA_RATE_HZ, option.output_sample_rate) \
            if option.output_sample_rate != MEDIA_RATE_HZ else None
        self._packet = option.packet_size & ~1
        self._pending = bytearray()

    def write_frame(self, frame: bytes) -> None:
        self._pending += self._to_16k.process(frame) if self._to_16k is not None else frame
        while len(self._pending) >= self._packet:
            chunk = bytes(self._pending[: self._packet])
            del self._pending[: self._packet]
            self._send(self._out.process(chunk) if self._out is not None else chunk)


class _FromServer:
    """What the server sends, as 20 ms frames at the call's rate for the server-side track to mix in."""

    def __init__(self, call_rate_hz: int, frame_bytes: int, option: MediaPassOption) -> None:
        self._resampler = Resampler(option.input_sample_rate, call_rate_hz) \
            if option.input_sample_rate != call_rate_hz else None
        self._frame = frame_bytes
        self._max = MAX_BUFFER_S * call_rate_hz * 2
        self._start_at = call_rate_hz * 2 * option.ptime // 1000 if option.ptime else 0
        self._steady = bool(option.ptime)
        self._playing = False
        self._buffer = bytearray()
        self._odd = b""
        self.dropped_bytes = 0

    def push(self, data: bytes) -> None:
        data = self._odd + data
        cut = len(data) & ~1
        data, self._odd = data[:cut], data[cut:]
        self._buffer += self._resampler.process(data) if self._resampler is not None else data
        excess = len(self._buffer) - self._max
        if excess > 0:
            excess += excess & 1
            del self._buffer[:excess]
            self.dropped_bytes += excess

    def read_frame(self) -> Optional[bytes]:
        if not self._playing:
            if not self._buffer or len(self._buffer) < self._start_at:
                return None
            self._playing = True
        if len(self._buffer) >= self._frame:
            frame = bytes(self._buffer[: self._frame])
            del self._buffer[: self._frame]
            return frame
        if self._steady:  # a late packet: silence, the stream goes on
            frame = bytes(self._buffer).ljust(self._frame, b"\0")
            self._buffer.clear()
            return frame
        return None


class MediaPass(WebSocketAudio):
    """One call's mediaPass connection."""

    unavailable = "mediaPass is not available here"

    def __init__(self, call: "CallController", option: MediaPassOption) -> None:
        super().__init__(call)
        self._option = option
        self._sender = f"media_pass: {option.url[:200]}"
        self._from_server: Optional[_FromServer] = None

    def _target(self) -> tuple[str, None]:
        return media_pass_url(self._option), None

    def _attach(self, conn: Any) -> tuple[_ToServer, _FromServer]:
        c = self._call
        assert c.leg is not None
        self._from_server = _FromServer(c.media_rate_hz, int(c.leg.frame_bytes), self._option)
        return _ToServer(conn.send_binary, c.media_rate_hz, self._option), self._from_server

    def _report(self, text: str) -> None:
        self._call.error(text, sender=self._sender, track=self._call.sst)

    def _lost(self, clean: bool, code: Optional[int], reason: str) -> None:
        if not clean:
            self._report(f"connection lost ({code}: {reason[:200]})" if code else "connection lost")

    def ws_binary(self, data: bytes) -> None:
        if self.connected and self._from_server is not None:
            self._from_server.push(data)
