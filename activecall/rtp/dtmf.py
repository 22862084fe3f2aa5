"""RFC 4733 DTMF (telephone-event): receive and send state machines, pure.

A key press is one *event*: every packet of it carries the RTP timestamp of
the event start, a growing duration, and the last one (sent three times)
the end bit.  A new event starts on a new timestamp or a new event code
(§2.5.1.2), so the receiver identifies a press by ``(ssrc, rtp_ts, event)``
and reports it once, on whichever of its packets arrives first: lost start
packets, the repeated end packets, and retransmissions neither lose nor
duplicate digits, and two presses of the same key are two digits whatever
the timestamps do between them (a sender that restarts its timestamps too).
"""

from __future__ import annotations

from collections import deque

from activecall.rtp.packet import TelephoneEvent, build_telephone_event_into, ts_diff

__all__ = [
    "DTMF_EVENTS",
    "event_to_digit",
    "digit_to_event",
    "DtmfReceiver",
    "DtmfPacket",
    "DtmfSender",
]

#: RFC 4733 §3.2: events 0-15 are the DTMF digits in this order.
DTMF_EVENTS = "0123456789*#ABCD"


def event_to_digit(event: int) -> str | None:
    """The DTMF character for an RFC 4733 event code, ``None`` if not a DTMF event."""
    return DTMF_EVENTS[event] if 0 <= event < 16 else None


def digit_to_event(digit: str) -> int:
    """The RFC 4733 event code of a DTMF character (``0-9 * # A-D``, case-insensitive)."""
    i = DTMF_EVENTS.find(digit.upper()) if len(digit) == 1 else -1
    if i < 0:
        raise ValueError("not a DTMF digit: %r" % (digit,))
    return i


class _Press:
    __slots__ = ("ssrc", "rtp_ts", "event", "ended", "last_seen")

    def __init__(self, ssrc: int, rtp_ts: int, event: int, ended: bool, now: float) -> None:
        self.ssrc = ssrc
        self.rtp_ts = rtp_ts
        self.event = event
        self.ended = ended
        self.last_seen = now


class DtmfReceiver:
    """Turns telephone-event packets into exactly one digit per key press.

    States per press::

        (unknown) --any packet--> reported [digit returned]
        reported --more packets, end packets, retransmits--> reported (nothing)
        reported --end bit--> ended
        ended --non-end packet, same timestamp, > reuse_after_s later--> new press
            (peers that do not advance the timestamp between presses)

    An end packet whose timestamp is older than the newest press of its
    SSRC and not in the recent history is a stale retransmission and is
    ignored; any other packet of an unknown press starts one, older
    timestamp or not (the sender restarted its timestamps).
    """

    __slots__ = ("_history", "_newest_ts", "reuse_after_s")

    def __init__(self, history: int = 8, reuse_after_s: float = 1.0) -> None:
        self._history: deque[_Press] = deque(maxlen=history)
        self._newest_ts: dict[int, int] = {}
        self.reuse_after_s = reuse_after_s

    def feed(self, ssrc: int, rtp_ts: int, event: TelephoneEvent, now: float) -> str | None:
        """Take one telephone-event packet; return the digit if it starts a new press."""
        digit = event_to_digit(event.event)
        if digit is None:
            return None
        for press in self._history:
            if press.ssrc == ssrc and press.rtp_ts == rtp_ts and press.event == event.event:
                if press.ended and not event.end and now - press.last_seen > self.reuse_after_s:
                    # A new press on a peer with a frozen timestamp.
                    self._history.remove(press)
                    break
                press.ended = press.ended or event.end
                press.last_seen = now
                return None
        else:
            newest = self._newest_ts.get(ssrc)
            if event.end and newest is not None and ts_diff(rtp_ts, newest) < 0:
                return None
        self._newest_ts[ssrc] = rtp_ts
        self._history.append(_Press(ssrc, rtp_ts, event.event, event.end, now))
        return digit

    def reset(self) -> None:
        """Forget all presses (new call leg)."""
        self._history.clear()
        self._newest_ts.clear()


class DtmfPacket:
    """One telephone-event packet to send this tick: payload, its RTP timestamp and marker."""

    __slots__ = ("payload", "rtp_ts", "marker", "event")

    def __init__(self, payload: bytes, rtp_ts: int, marker: bool, event: TelephoneEvent) -> None:
        self.payload = payload
        self.rtp_ts = rtp_ts
        self.marker = marker
        self.event = event

    def __repr__(self) -> str:
        return f"DtmfPacket(ts={self.rtp_ts}, m={int(self.marker)}, {self.event})"


class DtmfSender:
    """Plays queued digits as RFC 4733 packets, one per media tick.

    Per digit of ``n = duration / ptime`` ticks: ticks 1..n-1 send the event
    with duration ``k * samples_per_tick`` (marker on the first), tick n sends
    the end packet with the full duration and ticks n+1, n+2 repeat it; all
    carry the timestamp of tick 1.  Then ``gap_ms`` of silence before the
    next digit.  While :attr:`busy`, the caller sends these instead of audio
    (the media clock keeps advancing by one frame per tick).
    """

    __slots__ = (
        "samples_per_tick",
        "ptime_ms",
        "duration_ms",
        "volume",
        "end_repeats",
        "gap_ms",
        "_queue",
        "_event",
        "_start_ts",
        "_tick",
        "_ticks",
        "_gap",
    )

    def __init__(
        self,
        clock_rate_hz: int = 8000,
        ptime_ms: int = 20,
        *,
        duration_ms: int = 100,
        volume: int = 10,
        end_repeats: int = 3,
        gap_ms: int = 60,
    ) -> None:
        if not 0 <= volume <= 63:
            raise ValueError("volume is 0..63 (-dBm0)")
        self.samples_per_tick = clock_rate_hz * ptime_ms // 1000
        self.ptime_ms = ptime_ms
        self.duration_ms = duration_ms
        self.volume = volume
        self.end_repeats = max(1, end_repeats)
        self.gap_ms = gap_ms
        self._queue: deque[tuple[int, int]] = deque()
        self._event = -1
        self._start_ts = 0
        self._tick = 0
        self._ticks = 0
        self._gap = 0

    @property
    def busy(self) -> bool:
        """Whether digits are playing or queued (gaps included)."""
        return self._event >= 0 or self._gap > 0 or bool(self._queue)

    @property
    def pending(self) -> int:
        """Digits queued and not started."""
        return len(self._queue)

    def send(self, digits: str, duration_ms: int | None = None) -> None:
        """Queue ``digits`` (``0-9 * # A-D``); raises ValueError for anything else."""
        dur = self.duration_ms if duration_ms is None else duration_ms
        ticks = max(1, -(-dur // self.ptime_ms))
        if ticks * self.samples_per_tick > 0xFFFF:
            raise ValueError("DTMF duration too long for one event")
        events = [digit_to_event(d) for d in digits]
        for ev in events:
            self._queue.append((ev, ticks))

    def cancel(self) -> None:
        """Drop queued digits; a digit already started still ends properly."""
        self._queue.clear()

    def tick(self, rtp_ts: int) -> DtmfPacket | None:
        """Advance one frame; ``rtp_ts`` is the media clock now. Return the packet to send, if any."""
        if self._event < 0:
            if self._gap > 0:
                self._gap -= 1
                return None
            if not self._queue:
                return None
            self._event, self._ticks = self._queue.popleft()
            self._start_ts = rtp_ts
            self._tick = 0
        self._tick += 1
        k, n = self._tick, self._ticks
        end = k >= n
        ev = TelephoneEvent(self._event, end, self.volume, min(k, n) * self.samples_per_tick)
        buf = bytearray(4)
        build_telephone_event_into(buf, 0, ev)
        pkt = DtmfPacket(bytes(buf), self._start_ts, k == 1, ev)
        if k - n + 1 >= self.end_repeats:
            self._event = -1
            self._gap = -(-self.gap_ms // self.ptime_ms)
        return pkt
