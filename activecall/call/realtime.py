"""Realtime mode (``realtime``, protocol.md §4.10, playbook.md §8.4): the call's audio to a speech-to-speech
model over OpenAI's Realtime WebSocket protocol, the model's voice back to the remote party.

Where: ``provider`` ``openai`` (default) is ``wss://api.openai.com/v1/realtime?model=<model>`` with Bearer
auth and ``OpenAI-Beta: realtime=v1`` (the key: ``secretKey``, else the operator's ``OPENAI_API_KEY``, which
goes nowhere else); ``azure`` is ``<endpoint>/openai/realtime?api-version=2024-10-01-preview&deployment=<model>``
with ``api-key``; any other provider string is the full ``ws(s)://`` URL of a compatible server (Bearer
``secretKey`` when given).  The ``[fetch]`` policy's ``allowed_hosts`` apply.

The session: ``session.update`` (``extra.instructions``, ``extra.voice`` default ``alloy``, pcm16 both ways,
``turnDetection`` default server VAD 0.5 / 300 ms / 500 ms, ``tools``); the remote party's audio as
``input_audio_buffer.append`` every 100 ms; from the server:

- ``input_audio_buffer.speech_started``: ``speaking`` and ``interrupt{receiver}``; what the model was saying
  stops at once and a response in progress is cancelled (``response.cancel``);
- ``response.audio.delta``: the model's voice, mixed into the agent's audio on SST (``trackStart{SST}``
  when the session opens, ``trackEnd{SST}`` when it closes; at most 60 s waits);
- ``response.audio_transcript.delta``: ``asrDelta`` (one index per response item);
- ``response.function_call_arguments.done``: ``functionCall{callId, name, arguments}``;
- ``error``: ``error{sender: "realtime"}``; the call goes on.

**activecall**: pcm16 is sent and read at 24 kHz, the rate OpenAI's pcm16 format has (the call's audio is
resampled both ways).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import quote

from activecall.call.events import FunctionCalled, ModelInterrupted, SpeechStarted, TranscriptHeard
from activecall.call.wsaudio import WebSocketAudio
from activecall.media.resample import Resampler
from activecall.options import RealtimeOption

if TYPE_CHECKING:
    from activecall.call.controller import CallController

__all__ = ["RealtimeSession", "realtime_target", "REALTIME_RATE_HZ", "DEFAULT_MODEL", "DEFAULT_TURN_DETECTION"]

REALTIME_RATE_HZ = 24000
DEFAULT_MODEL = "gpt-4o-realtime-preview-2024-10-01"
DEFAULT_TURN_DETECTION = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                          "silence_duration_ms": 500}
OPENAI_URL = "wss://api.openai.com/v1/realtime"
_SEND_EVERY_BYTES = REALTIME_RATE_HZ * 2 // 10  # 100 ms
_MAX_PLAYBACK_S = 60


class RealtimeSetupError(ValueError):
    """The option names no usable endpoint or key."""


def realtime_target(option: RealtimeOption, openai_api_key: Optional[str]) -> tuple[str, dict[str, str]]:
    """The URL and headers of the session ``option`` asks for; RealtimeSetupError saying what is missing."""
    provider = (option.provider or "openai").strip()
    model = option.model or DEFAULT_MODEL
    if provider.lower() == "openai":
        key = option.secret_key or openai_api_key
        if not key:
            raise RealtimeSetupError("realtime.secretKey is required (or OPENAI_API_KEY on the server)")
        return f"{OPENAI_URL}?model={quote(model, safe='')}", {"Authorization": f"Bearer {key}",
                                                                "OpenAI-Beta": "realtime=v1"}
    if provider.lower() == "azure":
        if not option.endpoint or not option.secret_key:
            raise RealtimeSetupError("realtime.endpoint and realtime.secretKey are required for azure")
        base = option.endpoint.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        return (f"{base}/openai/realtime?api-version=2024-10-01-preview&deployment={quote(model, safe='')}",
                {"api-key": option.secret_key})
    if not provider.startswith(("ws://", "wss://")):
        raise RealtimeSetupError(f"realtime.provider must be openai, azure or a ws:// or wss:// URL: {provider[:100]}")
    headers = {"OpenAI-Beta": "realtime=v1"}
    if option.secret_key:  # a client's own server gets the client's key, never the operator's
        headers["Authorization"] = f"Bearer {option.secret_key}"
    return provider, headers


class _Voice:
    """The model's pcm16 at 24 kHz as 20 ms frames at the call's rate, for the server-side track."""

    def __init__(self, call_rate_hz: int, frame_bytes: int) -> None:
        self._resampler = Resampler(REALTIME_RATE_HZ, call_rate_hz) if call_rate_hz != REALTIME_RATE_HZ else None
        self._frame = frame_bytes
        self._max = _MAX_PLAYBACK_S * call_rate_hz * 2
        self._buffer = bytearray()

    def push(self, pcm: bytes) -> None:
        pcm = pcm[: len(pcm) & ~1]
        self._buffer += self._resampler.process(pcm) if self._resampler is not None else pcm
        if len(self._buffer) > self._max:
            del self._buffer[: len(self._buffer) - self._max]

    def clear(self) -> None:
        self._buffer.clear()

    def read_frame(self) -> Optional[bytes]:
        if not self._buffer:
            return None
        frame = bytes(self._buffer[: self._frame]).ljust(self._frame, b"\0")
        del self._buffer[: self._frame]
        return frame


class _ToModel:
    """A sink on the call's caller audio: 24 kHz pcm16, appended to the model's input every 100 ms."""

    def __init__(self, send: Any, call_rate_hz: int) -> None:
        self._send = send
        self._resampler = Resampler(call_rate_hz, REALTIME_RATE_HZ) if call_rate_hz != REALTIME_RATE_HZ else None
        self._pending = bytearray()

    def write_frame(self, frame: bytes) -> None:
        self._pending += self._resampler.process(frame) if self._resampler is not None else frame
        if len(self._pending) >= _SEND_EVERY_BYTES:
            audio = base64.b64encode(bytes(self._pending)).decode("ascii")
            self._pending.clear()
            self._send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))


class RealtimeSession(WebSocketAudio):
    """One call's realtime model session."""

    unavailable = "not available here"

    def __init__(self, call: "CallController", option: RealtimeOption) -> None:
        super().__init__(call)
        self._option = option
        self._voice: Optional[_Voice] = None
        self._responding = False
        self._items: dict[str, int] = {}  # transcript item id -> asrDelta index

    def _target(self) -> tuple[str, dict[str, str]]:
        return realtime_target(self._option, self._call.services.openai_api_key)

    def _attach(self, conn: Any) -> tuple[_ToModel, _Voice]:
        c = self._call
        assert c.leg is not None
        extra = self._option.extra or {}
        session: dict[str, Any] = {
            "modalities": ["audio", "text"],
            "voice": extra.get("voice") or "alloy",
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "turn_detection": self._option.turn_detection if self._option.turn_detection is not None
            else DEFAULT_TURN_DETECTION,
        }
        if extra.get("instructions"):
            session["instructions"] = extra["instructions"]
        if self._option.tools:
            session["tools"] = self._option.tools
        conn.send_text(json.dumps({"type": "session.update", "session": session}))
        self._voice = _Voice(c.media_rate_hz, int(c.leg.frame_bytes))
        return _ToModel(conn.send_text, c.media_rate_hz), self._voice

    def _report(self, text: str) -> None:
        self._call.error(f"realtime: {text}", sender="realtime", code=500)

    def _lost(self, clean: bool, code: Optional[int], reason: str) -> None:
        self._report(f"the model's connection closed ({code or 'no code'})")

    # -- the server's events (WsListener) -----------------------------------------

    def ws_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return
        kind = message["type"]
        c = self._call
        if c.ended or not self.connected or self._voice is None:
            return
        if kind == "response.audio.delta":
            try:
                self._voice.push(base64.b64decode(str(message.get("delta", "")), validate=True))
            except (binascii.Error, ValueError):
                pass
        elif kind == "input_audio_buffer.speech_started":
            self._voice.clear()
            c.report(SpeechStarted(c.now(), c.sid, c.now()))
            c.report(ModelInterrupted(c.now(), c.sid))
            if self._responding and self._conn is not None:
                self._conn.send_text(json.dumps({"type": "response.cancel"}))
        elif kind == "response.created":
            self._responding = True
        elif kind == "response.done":
            self._responding = False
        elif kind == "response.audio_transcript.delta":
            item = str(message.get("item_id", ""))[:128]
            index = self._items.setdefault(item, len(self._items)) if len(self._items) < 10_000 else 0
            c.report(TranscriptHeard(c.now(), c.sid, False, index, str(message.get("delta", ""))[:4096]))
        elif kind == "response.function_call_arguments.done":
            c.report(FunctionCalled(c.now(), c.sid, str(message.get("call_id", ""))[:256],
                                    str(message.get("name", ""))[:256], str(message.get("arguments", ""))[:65536]))
        elif kind == "error":
            error = message.get("error")
            text = error.get("message") if isinstance(error, dict) else None
            self._report(str(text or "error")[:500])
