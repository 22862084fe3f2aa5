"""The call's legs: two-way :class:`~activecall.media.tracks.ILeg` implementations.

* :mod:`activecall.legs.rtp`: the RTP/SRTP media leg and the engine ticking all of them;
* :mod:`activecall.legs.sip`: SIP legs (outbound dialer, inbound factory, the dialog listener);
* :mod:`activecall.legs.websocket`: raw audio inside the control WebSocket (/call);
* :mod:`activecall.legs.webrtc`: a browser's peer connection (/call/webrtc), the only aiortc importer.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from zope.interface import implementer

from activecall.media.clock import RECEIVE, SEND
from activecall.media.tracks import ILegEvents

__all__ = ["NO_EVENTS", "PhaseTicker", "LegTicks"]


@implementer(ILegEvents)
class _NoEvents:
    """What a leg reports to before :meth:`~activecall.media.tracks.ILeg.attach`: nobody."""

    __slots__ = ()

    def media_ready(self) -> None:
        return None

    def dtmf(self, digit: str) -> None:
        return None

    def hold(self, on_hold: bool) -> None:
        return None

    def ended(self, cause: str) -> None:
        return None

    def media_ended(self, cause: str) -> None:
        return None

    def message(self, body: str, content_type: Optional[str]) -> None:
        return None

    def transfer_requested(self, refer_to: str, referred_by: Optional[str]) -> None:
        return None

    def transfer_progress(self, status: int, text: str) -> None:
        return None


NO_EVENTS = _NoEvents()


class PhaseTicker:
    """A media clock subscriber calling ``tick(frames)``: one object per phase a leg ticks in."""

    __slots__ = ("media_tick",)

    def __init__(self, tick: Callable[[int], None]) -> None:
        self.media_tick = tick


class LegTicks:
    """A leg's two subscriptions to the media clock, made and dropped together: ``receive(frames)`` in
    the ``RECEIVE`` phase (caller audio to the sink), ``send(frames)`` in ``SEND`` (agent audio out)."""

    __slots__ = ("_media_clock", "_receive", "_send", "running")

    def __init__(self, media_clock: Any, receive: Callable[[int], None], send: Callable[[int], None]) -> None:
        self._media_clock = media_clock
        self._receive = PhaseTicker(receive)
        self._send = PhaseTicker(send)
        self.running = False

    def start(self) -> None:
        """Tick from the next media tick on (idempotent)."""
        if not self.running:
            self.running = True
            self._media_clock.subscribe(self._receive, RECEIVE)
            self._media_clock.subscribe(self._send, SEND)

    def stop(self) -> None:
        """Tick no more (idempotent)."""
        if self.running:
            self.running = False
            self._media_clock.unsubscribe(self._receive, RECEIVE)
            self._media_clock.unsubscribe(self._send, SEND)
