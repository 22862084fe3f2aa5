"""Media legs that are not SIP/WebRTC: raw audio inside the control WebSocket (/call)."""

from __future__ import annotations

from typing import Callable

from zope.interface import implementer

from activecall.interfaces import ICallLeg
from activecall.media.codecs import get_codec, make_decoder, make_encoder

WEBSOCKET_CODECS = ("pcm", "pcmu", "pcma", "g722")


def websocket_codec(name: str | None) -> str:
    """Normalize ``option.codec`` for /call: one of pcm/pcmu/pcma/g722; anything else is pcm."""
    value = (name or "pcm").lower()
    return value if value in WEBSOCKET_CODECS else "pcm"


@implementer(ICallLeg)
class WebSocketLeg:
    """Caller audio arrives as Binary frames; agent audio leaves as one Binary frame per 20 ms.

    ``pcm`` runs at the session's ``sampleRate`` both ways; the G.711 codecs at
    8 kHz and G.722 at 16 kHz (spec §5.3).
    """

    def __init__(self, codec: str, sample_rate_hz: int, ssrc: int, send_binary: Callable[[bytes], None]) -> None:
        self.codec = websocket_codec(codec)
        if self.codec == "pcm":
            self.media_rate_hz = sample_rate_hz
        else:
            self.media_rate_hz = get_codec(self.codec).sample_rate_hz
        self.frame_bytes = self.media_rate_hz // 50 * 2
        self.ssrc = ssrc
        self._send_binary = send_binary
        self._encoder = make_encoder(self.codec, self.media_rate_hz)
        self._decoder = make_decoder(self.codec, self.media_rate_hz)
        self._odd = b""
        self.frames_sent = 0
        self.bytes_received = 0

    def send_agent_audio(self, pcm: bytes) -> None:
        """Encode one 20 ms frame in the session codec and send it."""
        self._send_binary(self._encoder.encode(pcm))
        self.frames_sent += 1

    def decode_caller_audio(self, payload: bytes) -> bytes:
        """Decode one client Binary frame (any length) to PCM at media_rate_hz."""
        self.bytes_received += len(payload)
        if self.codec == "pcm":
            data = self._odd + payload if self._odd else payload
            if len(data) % 2:
                self._odd = data[-1:]
                data = data[:-1]
            else:
                self._odd = b""
            return bytes(data)
        return self._decoder.decode(payload)

    def close(self) -> None:
        """Nothing to release: the WebSocket belongs to the session."""
