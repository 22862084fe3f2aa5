"""Audio bridges between two calls on this node (``bridge``/``unbridge``, protocol.md §5.8).

A :class:`SessionBridge` joins call A and call B: A's remote party, as its call hears it (after mute
and hold), is written into a feed that B's server-side track mixes into what B sends, and the other
way round.  Each call keeps its own agent audio, transfers and hang-up; what an agent plays on A
reaches only A's remote party.  Each side reports the bridge as a track of its own,
``bridge:<this sid>:to:<other sid>`` (``trackStart``, then ``trackEnd`` when it is removed or the other
call ends).

Both calls tick on the one media clock: A's caller frame arrives in the receive phase and leaves on
B's leg in the send phase of the same tick; a feed holds at most 5 frames (100 ms), so a stalled reader
cannot build up latency.  Calls at different rates are resampled on the way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from activecall.call.events import TrackEnded, TrackStarted
from activecall.media.resample import Resampler
from activecall.media.tracks import FrameQueue

if TYPE_CHECKING:
    from activecall.call.controller import CallController

__all__ = ["SessionBridge", "BridgeFeed", "bridge_track"]


def bridge_track(sid: str, other: str) -> str:
    """The track id call ``sid`` reports its bridge to ``other`` on."""
    return f"bridge:{sid}:to:{other}"


class BridgeFeed:
    """One direction of a bridge: a sink on the speaking call's caller audio, a source the listening
    call's server-side track mixes in."""

    __slots__ = ("_queue", "_resampler")

    def __init__(self, from_rate_hz: int, to_rate_hz: int) -> None:
        self._queue = FrameQueue(max_frames=5)
        self._resampler = Resampler(from_rate_hz, to_rate_hz) if from_rate_hz != to_rate_hz else None

    def write_frame(self, frame: bytes) -> None:
        self._queue.write_frame(self._resampler.process(frame) if self._resampler is not None else frame)

    def read_frame(self) -> Optional[bytes]:
        return self._queue.read_frame()


class SessionBridge:
    """The audio bridge of two answered calls; :meth:`stop` removes it from both."""

    def __init__(self, a: "CallController", b: "CallController") -> None:
        self.calls = (a, b)
        self.started_at = a.now()
        self._feeds = (BridgeFeed(a.media_rate_hz, b.media_rate_hz), BridgeFeed(b.media_rate_hz, a.media_rate_hz))
        self.stopped = False
        a_to_b, b_to_a = self._feeds
        a.caller_audio.add(a_to_b)
        b.caller_audio.add(b_to_a)
        a.track.mixes[b.sid] = b_to_a
        b.track.mixes[a.sid] = a_to_b
        for call, other in ((a, b), (b, a)):
            call.bridges[other.sid] = self
            call.report(TrackStarted(call.now(), bridge_track(call.sid, other.sid)))

    def other(self, call: "CallController") -> "CallController":
        a, b = self.calls
        return b if call is a else a

    def stop(self) -> None:
        """Take the bridge off both calls; each that is still up reports its bridge track's end."""
        if self.stopped:
            return
        self.stopped = True
        (a, b), (a_to_b, b_to_a) = self.calls, self._feeds
        a.caller_audio.remove(a_to_b)
        b.caller_audio.remove(b_to_a)
        for call, other in ((a, b), (b, a)):
            call.track.mixes.pop(other.sid, None)
            if call.bridges.get(other.sid) is self:
                del call.bridges[other.sid]
            if not call.ended:
                now = call.now()
                call.report(TrackEnded(now, bridge_track(call.sid, other.sid), now - self.started_at, 0))
