"""SIP message framing on stream transports (TCP/TLS/WS-less streams).

Pure module: bytes in, complete messages out.  A message ends ``Content-Length``
octets after the empty line that ends its headers (RFC 3261 §18.3); bytes may
arrive one at a time or several messages at once.  Between messages, the RFC 5626
§3.5.1 keep-alives are recognised: a double CRLF is a *ping* (a server answers
with a single CRLF), a single CRLF is a *pong* (what a client waits for after its
ping).  Which one the framer reports depends on its ``role``; the other kind of
stray CRLF is ignored as RFC 3261 §7.5 allows.

A :class:`FramingError` means the stream can no longer be delimited (bad or
duplicated Content-Length, oversize head or body): close the connection.
"""

from __future__ import annotations

import enum
from typing import Literal

from activecall.sip.uri import SipParseError, bounded_int

__all__ = ["FramingError", "KeepAlive", "StreamFramer", "Frame"]


class FramingError(SipParseError):
    """The byte stream cannot be split into messages any more."""


class KeepAlive(enum.Enum):
    """RFC 5626 keep-alive events seen between messages."""

    PING = "ping"  # CRLFCRLF from a client: answer with CRLF
    PONG = "pong"  # CRLF from a server, answering our ping


Frame = bytes | KeepAlive

_CRLF = b"\r\n"
_MAX_CONTENT_LENGTH = 2**31 - 1


def _content_length(head: bytes) -> int:
    """Content-Length of a message head (0 when absent), strictly validated."""
    text = head.decode("latin-1")
    logical: list[str] = []
    for line in text.split("\r\n")[1:]:
        if line[:1] in (" ", "\t") and logical:
            logical[-1] += " " + line.strip()
        else:
            logical.append(line)
    values = []
    for line in logical:
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() in ("content-length", "l"):
            values.append(value.strip())
    if not values:
        return 0
    if len(values) > 1:
        raise FramingError("more than one Content-Length on a stream")
    # ASCII digits, length checked before int(); the framer compares with its max_body_bytes.
    return bounded_int(values[0], "Content-Length on a stream", _MAX_CONTENT_LENGTH, error=FramingError)


class StreamFramer:
    """Split a byte stream into SIP messages and keep-alives.

    ``role="server"`` reports :attr:`KeepAlive.PING` for each double CRLF;
    ``role="client"`` reports :attr:`KeepAlive.PONG` for each CRLF.
    """

    def __init__(
        self,
        *,
        role: Literal["server", "client"] = "server",
        max_head_bytes: int = 65536,
        max_body_bytes: int = 1 << 20,
    ) -> None:
        self._role = role
        self._max_head = max_head_bytes
        self._max_body = max_body_bytes
        self._buf = bytearray()
        self._need: int | None = None  # total length of the message being read
        # Where the search for the end of the head resumes: bytes fed one at a
        # time must not rescan the whole head each time (quadratic CPU).
        self._scan = 0
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return the complete messages and keep-alives, in order."""
        if self._failed:
            raise FramingError("stream already failed")
        self._buf += data
        out: list[Frame] = []
        try:
            while self._step(out):
                pass
        except FramingError:
            self._failed = True
            raise
        return out

    def _step(self, out: list[Frame]) -> bool:
        """Consume one item from the buffer if complete; False when more bytes are needed."""
        buf = self._buf
        if self._need is None:
            if buf[:1] == b"\r" or buf[:1] == b"\n":
                self._scan = 0
                return self._keepalive(out)
            end = buf.find(b"\r\n\r\n", self._scan)
            if end < 0:
                if len(buf) > self._max_head:
                    raise FramingError("message head too large")
                self._scan = max(0, len(buf) - 3)
                return False
            self._scan = 0
            if end > self._max_head:
                raise FramingError("message head too large")
            length = _content_length(bytes(buf[:end]))
            if length > self._max_body:
                raise FramingError(f"body of {length} bytes is too large")
            self._need = end + 4 + length
        if len(buf) < self._need:
            return False
        out.append(bytes(buf[: self._need]))
        del buf[: self._need]
        self._need = None
        return True

    def _keepalive(self, out: list[Frame]) -> bool:
        buf = self._buf
        if buf[:1] == b"\n":
            del buf[:1]  # a bare LF between messages: tolerate and drop
            return True
        if len(buf) < 2:
            return False
        if buf[:2] != _CRLF:
            del buf[:1]  # a bare CR: drop it
            return True
        if self._role == "client":
            del buf[:2]
            out.append(KeepAlive.PONG)
            return True
        if len(buf) < 4:
            if buf[2:3] in (b"", b"\r"):
                return False  # could still become a double CRLF
            del buf[:2]
            return True
        if buf[:4] == b"\r\n\r\n":
            del buf[:4]
            out.append(KeepAlive.PING)
        else:
            del buf[:2]
        return True
