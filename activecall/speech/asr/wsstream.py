"""What every streaming recognizer's per-call WebSocket stream does, whatever the vendor.

:class:`WsRecognitionStream` connects in the background (bounded by a timeout on
the injected clock), keeps the audio written meanwhile (bounded: the oldest is
dropped), sends audio in messages of a few frames once the vendor says it may,
reports a failure exactly once, and closes with a bounded wait for the vendor's
last results.  After :meth:`close` fires the listener hears nothing more.

A vendor module subclasses it and overrides the hooks: :meth:`opened` (send the
start message; call :meth:`ready` when audio may flow), :meth:`text_received`
(parse results: :meth:`emit`, :meth:`fail`), :meth:`finish_audio` (the
end-of-audio message) and, if the vendor needs it, :meth:`binary_received`.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Mapping, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from activecall.fetch import check_url
from activecall.speech.interfaces import IRecognitionListener, IRecognitionStream, RecognitionError, Transcript
from activecall.speech.wsclient import WsConnectError, WsConnection, connect_ws

__all__ = ["WsRecognitionStream", "check_ws_url", "parse_json_object", "MAX_RESULT_TEXT"]

#: The longest result message accepted (bytes) and transcript text kept (characters).
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_RESULT_TEXT = 4096
_BYTES_PER_MS = 32  # 16 kHz s16le mono


def check_ws_url(url: str, allowed_hosts: tuple[str, ...]) -> str:
    """Return the lower-case host of a ``ws``/``wss`` URL the ``[fetch]`` policy allows, else raise
    :class:`~activecall.fetch.FetchRefusedError`."""
    return check_url(url, allowed_hosts, schemes=("ws", "wss"))


def parse_json_object(text: str, provider: str) -> dict[str, Any]:
    """A vendor message as a JSON object, or :class:`RecognitionError` (non-retryable) saying what is wrong."""
    try:
        value = json.loads(text)
    except ValueError:
        raise RecognitionError(f"{provider}: malformed message from the server") from None
    if not isinstance(value, dict):
        raise RecognitionError(f"{provider}: message is not a JSON object")
    return value


@implementer(IRecognitionStream)
class WsRecognitionStream:
    """One call's audio to a streaming recognizer over a WebSocket (see the module docstring)."""

    _log = Logger()
    provider = "asr"

    def __init__(self, *, reactor: Any, clock: IReactorTime, url: str, headers: Mapping[str, str],
                 listener: IRecognitionListener, connect_timeout_s: float = 5.0, close_timeout_s: float = 3.0,
                 max_buffer_ms: int = 5000, frames_per_message: int = 5) -> None:
        self._reactor = reactor
        self._clock = clock
        self._listener = listener
        self._close_timeout_s = close_timeout_s
        self._max_buffer_bytes = max_buffer_ms * _BYTES_PER_MS
        self._message_bytes = frames_per_message * 20 * _BYTES_PER_MS
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._outgoing = bytearray()
        self.conn: Optional[WsConnection] = None
        self._ready = False
        self._ended = False  # failed or closed: the listener hears nothing more
        self._closing: Optional[Deferred[None]] = None
        self._close_timer: Optional[IDelayedCall] = None
        self.dropped_bytes = 0
        self.written_bytes = 0
        self._connecting: Optional[Deferred[WsConnection]] = connect_ws(
            reactor, url, headers=headers, listener=self, max_message_bytes=MAX_MESSAGE_BYTES,
            connect_timeout_s=connect_timeout_s)
        self._connect_timer: Optional[IDelayedCall] = clock.callLater(connect_timeout_s, self._connect_timed_out)
        self._connecting.addCallbacks(self._connected, self._connect_failed)

    # -- hooks for vendors ----------------------------------------------------------

    def opened(self) -> None:
        """The WebSocket is up: send the vendor's start message; call :meth:`ready` when audio may flow."""
        self.ready()

    def text_received(self, text: str) -> None:
        """A Text message from the vendor."""

    def binary_received(self, data: bytes) -> None:
        """A Binary message from the vendor (most send none)."""

    def finish_audio(self) -> None:
        """No more audio: send the vendor's end-of-stream message (default: close the WebSocket)."""
        assert self.conn is not None
        self.conn.close()

    def encode_audio(self, pcm: bytes) -> None:
        """Send one message of audio (default: a Binary frame of the raw PCM)."""
        assert self.conn is not None
        self.conn.send_binary(pcm)

    # -- for vendors ------------------------------------------------------------------

    def ready(self) -> None:
        """Audio may flow now: send what was buffered."""
        if self._ready or self._ended or self.conn is None:
            return
        self._ready = True
        while self._pending:
            self._queue(self._pending.popleft())
        self._pending_bytes = 0
        if self._closing is not None:
            self._flush()
            self.finish_audio()

    def emit(self, result: Transcript) -> None:
        """Report a result (ignored once the stream has ended)."""
        if not self._ended:
            text = result.text[:MAX_RESULT_TEXT]
            if text != result.text:
                result = Transcript(result.index, text, result.final, result.start_ms, result.end_ms, result.confidence)
            self._listener.transcript(result)

    def fail(self, error: RecognitionError) -> None:
        """The stream cannot go on: tell the listener once, drop the connection."""
        if self._ended:
            return
        self._ended = True
        self._log.info("{provider} recognition failed: {e}", provider=self.provider, e=error)
        if self._closing is None:
            self._listener.failed(error)
        self._teardown()

    @property
    def stream_ms(self) -> int:
        """Milliseconds of audio written so far (the stream time of now)."""
        return self.written_bytes // _BYTES_PER_MS

    # -- IRecognitionStream -------------------------------------------------------------

    def write(self, pcm: bytes) -> None:
        if self._ended or self._closing is not None:
            return
        self.written_bytes += len(pcm)
        if self._ready:
            self._queue(pcm)
            return
        self._pending.append(pcm)
        self._pending_bytes += len(pcm)
        while self._pending_bytes > self._max_buffer_bytes:
            old = self._pending.popleft()
            self._pending_bytes -= len(old)
            self.dropped_bytes += len(old)

    def speech_started(self, at_ms: int) -> None:
        """Streaming vendors do their own endpointing."""

    def speech_paused(self, at_ms: int) -> None:
        """Streaming vendors do their own endpointing."""

    def speech_ended(self, at_ms: int) -> None:
        """Streaming vendors do their own endpointing."""

    def close(self) -> Deferred[None]:
        if self._closing is not None:
            return self._closing_result()
        self._closing = Deferred()
        if self._ended:
            self._fire_closed()
        elif self.conn is None and self._connecting is None:
            self._ended = True
            self._teardown()
        else:
            # Still connecting: what was said so far is sent once the vendor is ready, within the same wait.
            self._close_timer = self._clock.callLater(self._close_timeout_s, self._close_timed_out)
            if self._ready:
                self._flush()
                self.finish_audio()
        return self._closing_result()

    def _closing_result(self) -> Deferred[None]:
        assert self._closing is not None
        d: Deferred[None] = Deferred()
        if self._closing.called:
            return succeed(None)
        self._closing.addBoth(lambda _: d.callback(None))
        return d

    # -- WsListener ---------------------------------------------------------------------------

    def ws_text(self, text: str) -> None:
        if self._ended:
            return
        try:
            self.text_received(text)
        except RecognitionError as e:
            self.fail(e)

    def ws_binary(self, data: bytes) -> None:
        if self._ended:
            return
        try:
            self.binary_received(data)
        except RecognitionError as e:
            self.fail(e)

    def ws_closed(self, clean: bool, code: Optional[int], reason: str) -> None:
        self.conn = None
        if self._closing is not None:
            self._ended = True
            self._teardown()
            return
        if not self._ended:
            retryable = not clean or code in (1001, 1006, 1011, 1012, 1013, 1014)
            detail = f" ({code} {reason[:200]})" if code else ""
            self.fail(RecognitionError(f"{self.provider}: connection closed{detail}", retryable=retryable))

    # -- internals -------------------------------------------------------------------------------

    def _queue(self, pcm: bytes) -> None:
        self._outgoing += pcm
        if len(self._outgoing) >= self._message_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._outgoing and self.conn is not None:
            data, self._outgoing = bytes(self._outgoing), bytearray()
            self.encode_audio(data)

    def _connected(self, conn: WsConnection) -> None:
        self._connecting = None
        self._cancel_timer("_connect_timer")
        if self._ended:
            conn.abort()
            return
        self.conn = conn
        try:
            self.opened()
        except RecognitionError as e:
            self.fail(e)

    def _connect_failed(self, f: Failure) -> None:
        self._connecting = None
        self._cancel_timer("_connect_timer")
        if self._ended:
            return
        if f.check(WsConnectError):
            status = f.value.status
            retryable = status is None or status == 429 or status >= 500
            detail = f"refused ({status})" if status else f.getErrorMessage()
            self.fail(RecognitionError(f"{self.provider}: cannot connect: {detail}", retryable=retryable))
        else:
            self.fail(RecognitionError(f"{self.provider}: cannot connect: {f.getErrorMessage()}", retryable=True))

    def _connect_timed_out(self) -> None:
        self._connect_timer = None
        self.fail(RecognitionError(f"{self.provider}: connect timed out", retryable=True))

    def _close_timed_out(self) -> None:
        self._close_timer = None
        self._ended = True
        self._teardown()

    def _cancel_timer(self, name: str) -> None:
        timer = getattr(self, name)
        setattr(self, name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _teardown(self) -> None:
        self._cancel_timer("_connect_timer")
        self._cancel_timer("_close_timer")
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        self._pending.clear()
        self._outgoing = bytearray()
        self._fire_closed()

    def _fire_closed(self) -> None:
        closing = self._closing
        if closing is not None and not closing.called:
            closing.callback(None)
