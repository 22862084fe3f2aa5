"""The one process-wide 20 ms media clock, in three phases.

Every leg and every batched processor subscribes here instead of arming its
own timers: one :class:`LoopingCall` ticks for all of them, so the cost per
frame is a method call, and the schedule never drifts (LoopingCall computes
each deadline from its start time and reports missed ticks as a count).

Each tick runs its subscribers phase by phase, for all calls at once:

1. ``RECEIVE``: every leg delivers its caller frames to its sinks;
2. ``PROCESS``: work batched across calls (VAD) sees everything received;
3. ``SEND``: every leg pulls its next agent frame.

So a decision taken on this tick's caller audio (barge-in) reaches this
tick's agent frame, whatever the order calls subscribed in.
"""

from __future__ import annotations

from typing import Callable, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

FRAME_MS = 20
FRAME_S = FRAME_MS / 1000.0
# After a long reactor stall, sending every missed frame would only burst
# audio the listener can no longer use; cap the catch-up.
MAX_CATCH_UP_FRAMES = 5

RECEIVE = 0
PROCESS = 1
SEND = 2
PHASES = (RECEIVE, PROCESS, SEND)


class MediaTicker(Protocol):
    """A subscriber of the media clock."""

    def media_tick(self, frames: int) -> None:
        """Produce ``frames`` frames of 20 ms (more than 1 when the reactor was late)."""


class MediaClock:
    """Drives all subscribers every 20 ms; runs only while someone listens.

    ``observe_lateness(seconds)``, when set (the /metrics tick lateness
    histogram), is told once per tick how long after its due time it ran.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, interval_s: float = FRAME_S,
                 observe_lateness: Callable[[float], None] | None = None) -> None:
        self._clock = clock
        self.observe_lateness = observe_lateness
        self._interval_s = interval_s
        self._phases: tuple[dict[int, MediaTicker], ...] = ({}, {}, {})
        self._loop: LoopingCall | None = None
        self._started_at = 0.0
        self._frames_done = 0
        self.late_ticks = 0
        self.ticks = 0

    def subscribe(self, ticker: MediaTicker, phase: int = SEND) -> None:
        """Add ``ticker`` to ``phase``; starts the clock if it was idle."""
        self._phases[phase][id(ticker)] = ticker
        if self._loop is None:
            loop = LoopingCall(self._tick)
            loop.clock = self._clock
            self._loop = loop
            self._started_at = self._clock.seconds()
            self._frames_done = 0
            d = loop.start(self._interval_s, now=False)
            d.addErrback(lambda f: self._log.failure("media clock stopped", f))

    def unsubscribe(self, ticker: MediaTicker, phase: int = SEND) -> None:
        """Remove ``ticker`` from ``phase``; the clock stops when nobody is left."""
        self._phases[phase].pop(id(ticker), None)
        if not len(self) and self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()

    def __len__(self) -> int:
        return sum(len(p) for p in self._phases)

    def _tick(self) -> None:
        # Count frames from the start time rather than trusting per-call counts:
        # with epoch-sized float times a tick can land a hair before its slot.
        now = self._clock.seconds()
        due = int((now - self._started_at) / self._interval_s + 1e-3)
        count = due - self._frames_done
        if count <= 0:
            return
        if self.observe_lateness is not None:
            # Late relative to the first frame slot this tick serves.
            slot_at = self._started_at + (self._frames_done + 1) * self._interval_s
            self.observe_lateness(max(0.0, now - slot_at))
        self._frames_done = due
        self.ticks += 1
        if count > 1:
            self.late_ticks += 1
        frames = min(count, MAX_CATCH_UP_FRAMES)
        for subscribers in self._phases:
            if not subscribers:
                continue
            for key, ticker in list(subscribers.items()):
                try:
                    ticker.media_tick(frames)
                except Exception:
                    # One broken call must not stop the media of all the others.
                    self._log.failure("media tick failed for {ticker!r}", ticker=ticker)
                    subscribers.pop(key, None)

    def stop(self) -> None:
        """Stop ticking and forget every subscriber (service shutdown)."""
        for subscribers in self._phases:
            subscribers.clear()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
