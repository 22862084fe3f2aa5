"""Adaptive, bounded jitter buffer for one incoming audio stream (pure).

The network side calls :meth:`JitterBuffer.put` for every accepted packet,
with its arrival time; the media clock calls :meth:`JitterBuffer.pop` once per
frame (20 ms).  Storage is a fixed ring of ``capacity`` slots indexed by the
extended sequence number, allocated once.

States::

    empty --put--> buffering --depth >= target--> playing
    playing --slot missing, later packet present--> playing (returns LOSS)
    playing --nothing buffered (underrun)--> buffering (target + 1; LOSS for
        up to ``max_conceal_frames`` pops, then None)
    any --far jump / sender restart--> buffering (flushed, "resync")

``pop`` returns the payload, :data:`LOSS` (conceal: repeat/attenuate or codec
PLC) or ``None`` (nothing to play: silence or comfort noise).

The target delay (in frames) grows at once when the measured interarrival
jitter (RFC 3550 A.8 estimator, in seconds) asks for more, and by one frame
on every underrun; it shrinks by one frame only after a long stable period,
and a backlog that stays above target is trimmed one frame at a time.
"""

from __future__ import annotations

import enum
import math
from typing import Final, Union

from activecall.rtp.packet import seq_diff, ts_diff

__all__ = ["JitterBuffer", "PutStatus", "Gap", "LOSS", "Payload"]

Payload = Union[bytes, bytearray, memoryview]

# Extended sequence numbers start here so they never go negative.
_EXT_BASE = 1 << 32
_NO_DEPTH = 1 << 30
# A packet this far behind the play position is a sender restart, not a late packet.
_MAX_MISORDER = 100


class Gap(enum.Enum):
    """Marker type for :data:`LOSS`."""

    LOSS = "loss"


#: Returned by :meth:`JitterBuffer.pop` for a frame that must be concealed.
LOSS: Final = Gap.LOSS


class PutStatus(enum.IntEnum):
    """Outcome of :meth:`JitterBuffer.put`."""

    QUEUED = 0
    DUPLICATE = 1
    #: Older than what was already played (or given up on): dropped.
    LATE = 2
    #: Queued after flushing: the stream jumped far from the play position.
    RESYNC = 3


class JitterBuffer:
    """Reorders packets, drops duplicates and late packets, and reports loss."""

    __slots__ = (
        "clock_rate_hz",
        "frame_s",
        "capacity",
        "min_delay_frames",
        "max_delay_frames",
        "max_conceal_frames",
        "jitter_factor",
        "shrink_after_frames",
        "trim_after_frames",
        "target_frames",
        "jitter_s",
        "last_seq",
        "last_timestamp",
        "received",
        "duplicates",
        "late",
        "lost",
        "underruns",
        "resyncs",
        "trimmed",
        "overflowed",
        "_mask",
        "_seqs",
        "_ts",
        "_payloads",
        "_play",
        "_high",
        "_started",
        "_playing",
        "_fresh",
        "_conceal_run",
        "_stretch",
        "_stable_pops",
        "_min_depth",
        "_peak_jitter_s",
        "_over_pops",
        "_prev_arrival",
        "_prev_ts",
    )

    def __init__(
        self,
        clock_rate_hz: int = 8000,
        ptime_ms: int = 20,
        *,
        capacity: int = 64,
        min_delay_frames: int = 2,
        max_delay_frames: int = 20,
        max_conceal_frames: int = 5,
        jitter_factor: float = 3.0,
        shrink_after_frames: int = 250,
        trim_after_frames: int = 10,
    ) -> None:
        if capacity & (capacity - 1) or capacity < 4:
            raise ValueError("capacity must be a power of two >= 4")
        if not 1 <= min_delay_frames <= max_delay_frames < capacity:
            raise ValueError("need 1 <= min_delay_frames <= max_delay_frames < capacity")
        self.clock_rate_hz = clock_rate_hz
        self.frame_s = ptime_ms / 1000.0
        self.capacity = capacity
        self.min_delay_frames = min_delay_frames
        self.max_delay_frames = max_delay_frames
        self.max_conceal_frames = max_conceal_frames
        self.jitter_factor = jitter_factor
        self.shrink_after_frames = shrink_after_frames
        self.trim_after_frames = trim_after_frames
        self._mask = capacity - 1
        self._seqs = [-1] * capacity
        self._ts = [0] * capacity
        self._payloads: list[Payload | None] = [None] * capacity
        self.received = self.duplicates = self.late = self.lost = 0
        self.underruns = self.resyncs = self.trimmed = self.overflowed = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything buffered and the jitter estimate (new stream); counters stay."""
        for i in range(self.capacity):
            self._seqs[i] = -1
            self._payloads[i] = None
        self.target_frames = self.min_delay_frames
        self.jitter_s = 0.0
        self.last_seq = -1
        self.last_timestamp = -1
        self._play = _EXT_BASE
        self._high = _EXT_BASE - 1
        self._started = False
        self._playing = False
        self._fresh = True
        self._conceal_run = 0
        self._stretch = 0
        self._stable_pops = 0
        self._min_depth = _NO_DEPTH
        self._peak_jitter_s = 0.0
        self._over_pops = 0
        self._prev_arrival = -1.0
        self._prev_ts = 0

    @property
    def depth(self) -> int:
        """Frames from the play position to the newest packet, holes included."""
        return max(0, self._high - self._play + 1)

    @property
    def playing(self) -> bool:
        """Whether playout has started (False while buffering)."""
        return self._playing

    def _flush(self, ext: int) -> None:
        seqs, payloads = self._seqs, self._payloads
        for i in range(self.capacity):
            seqs[i] = -1
            payloads[i] = None
        self._play = ext
        self._high = ext - 1
        self._playing = False
        self._fresh = True
        self._stretch = 0

    def put(self, seq: int, rtp_ts: int, payload: Payload, now: float, marker: bool = False) -> PutStatus:
        """Queue one packet that arrived at ``now``; see :class:`PutStatus`."""
        status = PutStatus.QUEUED
        if not self._started:
            self._started = True
            self._play = _EXT_BASE + seq
            self._high = self._play - 1
        play = self._play
        ext = play + seq_diff(seq, play & 0xFFFF)
        d = ext - play
        cap = self.capacity
        if d < 0:
            if self._fresh and self._high - ext < cap and d > -cap:
                # Reordered before playout started: move the start back.
                self._play = play = ext
            elif d < -_MAX_MISORDER:
                self.resyncs += 1
                self._flush(ext)
                play = ext
                status = PutStatus.RESYNC
            else:
                self.late += 1
                # It missed its slot by a little: we play too early.
                if self._playing and d >= -self.max_delay_frames:
                    self._grow(1)
                return PutStatus.LATE
        elif d >= cap:
            if ext - self._high > self.max_delay_frames:
                # A jump far ahead of everything we hold: start over from here.
                self.resyncs += 1
                self._flush(ext)
                play = ext
                status = PutStatus.RESYNC
            else:
                # We are behind: make room by giving up the oldest frames.
                new_play = ext - cap + 1
                seqs, payloads, mask = self._seqs, self._payloads, self._mask
                for e in range(play, new_play):
                    i = e & mask
                    if seqs[i] == e:
                        seqs[i] = -1
                        payloads[i] = None
                        self.overflowed += 1
                self._play = play = new_play
        elif marker and self._high < play and self._playing:
            # A new talk spurt into an empty buffer: rebuild the target delay.
            self._playing = False
        slot = ext & self._mask
        if self._seqs[slot] == ext:
            self.duplicates += 1
            return PutStatus.DUPLICATE
        self._seqs[slot] = ext
        self._ts[slot] = rtp_ts
        self._payloads[slot] = payload
        self.received += 1
        if ext > self._high:
            self._high = ext
            self._measure(rtp_ts, now)
        return status

    def _measure(self, rtp_ts: int, now: float) -> None:
        if self._prev_arrival >= 0.0:
            d = (now - self._prev_arrival) - ts_diff(rtp_ts, self._prev_ts) / self.clock_rate_hz
            self.jitter_s += (abs(d) - self.jitter_s) / 16.0
            if self.jitter_s > self._peak_jitter_s:
                self._peak_jitter_s = self.jitter_s
            want = self._desired(self.jitter_s)
            if want > self.target_frames:
                self._grow(want - self.target_frames)
        self._prev_arrival = now
        self._prev_ts = rtp_ts

    def _grow(self, frames: int) -> None:
        frames = min(frames, self.max_delay_frames - self.target_frames)
        if frames > 0:
            self.target_frames += frames
            self._stable_pops = 0
            self._min_depth = _NO_DEPTH
            if self._playing:
                # Delay playout by that many frames (concealed) to actually get deeper.
                self._stretch += frames

    def _desired(self, jitter_s: float) -> int:
        frames = math.ceil(self.jitter_factor * jitter_s / self.frame_s - 1e-9) + 1
        return max(self.min_delay_frames, min(self.max_delay_frames, frames))

    def pop(self, now: float) -> Payload | Gap | None:
        """Return the next frame's payload, :data:`LOSS`, or ``None`` (nothing to play)."""
        if not self._playing:
            if self._started and self._high - self._play + 1 >= self.target_frames:
                self._playing = True
                self._fresh = False
            elif 0 < self._conceal_run < self.max_conceal_frames:
                self._conceal_run += 1
                return LOSS
            else:
                return None
        if self._stretch:
            self._stretch -= 1
            return LOSS
        play = self._play
        slot = play & self._mask
        if self._seqs[slot] == play:
            payload = self._payloads[slot]
            self._seqs[slot] = -1
            self._payloads[slot] = None
            self.last_seq = play & 0xFFFF
            self.last_timestamp = self._ts[slot]
            self._play = play + 1
            self._conceal_run = 0
            self._adapt()
            return payload
        if self._high > play:
            # A later packet is here, so this one is lost (or hopelessly late).
            self.lost += 1
            self._play = play + 1
            self._conceal_run += 1
            return LOSS
        # Underrun: nothing buffered.  Wait for more, deeper this time.
        self.underruns += 1
        self._playing = False
        self._stretch = 0
        self._grow(1)
        self._conceal_run += 1
        return LOSS if self._conceal_run <= self.max_conceal_frames else None

    def _adapt(self) -> None:
        depth = self._high - self._play + 1
        if depth < self._min_depth:
            self._min_depth = depth
        self._stable_pops += 1
        if self._stable_pops >= self.shrink_after_frames:
            # Lower the target if even the period's worst jitter does not ask
            # for it; drop a frame of real latency only if that frame of slack
            # was there the whole period.
            if self.target_frames > self._desired(self._peak_jitter_s):
                self.target_frames -= 1
                if self._min_depth >= 2:
                    self._skip_one()
            self._stable_pops = 0
            self._min_depth = _NO_DEPTH
            self._peak_jitter_s = self.jitter_s
        # A backlog that stays two frames above the steady depth is trimmed.
        if depth >= self.target_frames + 1:
            self._over_pops += 1
            if self._over_pops >= self.trim_after_frames:
                self._over_pops = 0
                self._skip_one()
        else:
            self._over_pops = 0

    def _skip_one(self) -> None:
        i = self._play & self._mask
        if self._seqs[i] == self._play:
            self._seqs[i] = -1
            self._payloads[i] = None
        self._play += 1
        self.trimmed += 1
