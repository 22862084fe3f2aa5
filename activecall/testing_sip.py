"""SIP test helpers shipped with the package: a memory UDP transport and an auto-answer handler.

Used by the SIP unit tests, the SIPp interop tests and ``benchmarks/sip_cps.py``.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from activecall.sip.useragent import ICallHandler, InboundCall

__all__ = ["MemoryDatagramTransport", "AutoAnswerHandler", "RecordingListener", "minimal_sdp"]


class MemoryDatagramTransport:
    """Collects ``write(data, addr)`` calls in :attr:`written` instead of sending."""

    def __init__(self, host: tuple[str, int] = ("127.0.0.1", 5060)) -> None:
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self._host = host
        self.fail_writes = False

    def write(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        """Record a datagram (or raise OSError when ``fail_writes`` is set)."""
        if self.fail_writes:
            raise OSError("network unreachable")
        assert addr is not None
        self.written.append((bytes(data), addr))

    def getHost(self) -> Any:
        """The bound address, like an IPv4Address."""
        from twisted.internet.address import IPv4Address

        return IPv4Address("UDP", *self._host)

    def stopListening(self) -> None:
        """Nothing to release."""


def minimal_sdp(host: str = "127.0.0.1", port: int = 40000, session_id: int = 1) -> bytes:
    """A one-stream PCMU + telephone-event SDP (no media is actually sent)."""
    return (
        f"v=0\r\no=- {session_id} 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendrecv\r\n"
    ).encode("ascii")


class RecordingListener:
    """An IDialogListener that records every event as ``(name, argument)``."""

    def __init__(self, reinvite_answer: bytes | None = None) -> None:
        self.events: list[tuple[str, Any]] = []
        self.reinvite_answer = reinvite_answer

    def on_bye(self, request: Any) -> None:
        self.events.append(("bye", request))

    def on_cancel(self) -> None:
        self.events.append(("cancel", None))

    def on_reinvite(self, sdp: bytes) -> bytes | None:
        self.events.append(("reinvite", sdp))
        return self.reinvite_answer

    def on_info(self, request: Any) -> None:
        self.events.append(("info", request))

    def on_message(self, request: Any) -> None:
        self.events.append(("message", request))

    def on_refer(self, request: Any) -> None:
        self.events.append(("refer", request))

    def on_notify(self, request: Any) -> None:
        self.events.append(("notify", request))

    def on_terminated(self, reason: str) -> None:
        self.events.append(("terminated", reason))

    def names(self) -> list[str]:
        """Event names in order."""
        return [name for name, _ in self.events]


@implementer(ICallHandler)
class AutoAnswerHandler:
    """Answers every INVITE at once with 200 and :func:`minimal_sdp` (or a fixed ``status``).

    ``ring`` sends 180 first; ``status`` other than 200 rejects instead;
    ``calls`` keeps the offered calls; a :class:`RecordingListener` is attached to each.
    """

    def __init__(self, *, status: int = 200, ring: bool = False, host: str = "127.0.0.1",
                 keep: bool = True, answer: bool = True) -> None:
        self.status = status
        self.ring = ring
        self.host = host
        self.keep = keep
        self.answer = answer
        self.calls: list[InboundCall] = []
        self._sdp = minimal_sdp(host)

    def incoming_call(self, call: InboundCall) -> None:
        """Ring, then answer or reject per the settings."""
        if self.keep:
            call.listener = RecordingListener()
            self.calls.append(call)
        if self.ring:
            call.ringing()
        if not self.answer:
            return
        if self.status == 200:
            call.answer(self._sdp).addErrback(lambda f: None)
        else:
            call.reject(self.status)
