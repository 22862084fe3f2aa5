"""The process-wide media clock: one LoopingCall for every call, with catch-up counts."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.media.clock import MAX_CATCH_UP_FRAMES, PROCESS, RECEIVE, SEND, MediaClock


class Recorder:
    def __init__(self) -> None:
        self.ticks: list[int] = []

    def media_tick(self, frames: int) -> None:
        self.ticks.append(frames)


class MediaClockTests(SynchronousTestCase):
    """Subscribers are ticked every 20 ms by a single timer."""

    def test_ticks_every_20ms_for_all_subscribers(self) -> None:
        """Two subscribers share one schedule; no timer per subscriber."""
        clock = Clock()
        mc = MediaClock(clock)
        a, b = Recorder(), Recorder()
        mc.subscribe(a)
        mc.subscribe(b)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        for _ in range(5):
            clock.advance(0.02)
        self.assertEqual(a.ticks, [1] * 5)
        self.assertEqual(b.ticks, [1] * 5)

    def test_late_reactor_reports_missed_frames(self) -> None:
        """After a stall the next tick carries the number of missed frames, capped."""
        clock = Clock()
        mc = MediaClock(clock)
        r = Recorder()
        mc.subscribe(r)
        clock.advance(0.02)
        clock.advance(0.061)
        clock.advance(1.0)
        self.assertEqual(r.ticks, [1, 3, MAX_CATCH_UP_FRAMES])
        self.assertEqual(mc.late_ticks, 2)

    def test_epoch_sized_times_give_one_frame_per_tick(self) -> None:
        """Float rounding at epoch-sized times never yields a zero-frame tick followed by a double."""
        clock = Clock()
        clock.advance(1_795_326_672.336)
        mc = MediaClock(clock)
        r = Recorder()
        mc.subscribe(r)
        for _ in range(500):
            clock.advance(0.02)
        self.assertEqual(r.ticks, [1] * 500)

    def test_stops_when_nobody_listens(self) -> None:
        """The timer is gone when the last subscriber leaves."""
        clock = Clock()
        mc = MediaClock(clock)
        r = Recorder()
        mc.subscribe(r)
        mc.unsubscribe(r)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_failing_subscriber_is_dropped_others_continue(self) -> None:
        """An exception in one call's tick does not stop the others."""
        clock = Clock()
        mc = MediaClock(clock)

        class Broken:
            def media_tick(self, frames: int) -> None:
                raise RuntimeError("boom")

        good = Recorder()
        mc.subscribe(Broken())
        mc.subscribe(good)
        clock.advance(0.02)
        clock.advance(0.02)
        self.assertEqual(good.ticks, [1, 1])
        self.assertEqual(len(mc), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class PhaseTests(SynchronousTestCase):
    """Each tick runs every RECEIVE subscriber, then PROCESS, then SEND, whatever the subscription order."""

    def test_phase_order_is_independent_of_subscription_order(self) -> None:
        """Subscribed send-first, the tick still runs receive, process, send; the same object may be in two phases."""
        clock = Clock()
        mc = MediaClock(clock)
        order: list[str] = []

        class Named:
            def __init__(self, name: str) -> None:
                self.name = name

            def media_tick(self, frames: int) -> None:
                order.append(self.name)

        mc.subscribe(Named("send"), SEND)
        mc.subscribe(Named("process"), PROCESS)
        mc.subscribe(Named("receive"), RECEIVE)
        both = Named("both")
        mc.subscribe(both, RECEIVE)
        mc.subscribe(both, SEND)
        clock.advance(0.02)
        self.assertEqual(order, ["receive", "both", "process", "send", "both"])
        mc.unsubscribe(both, RECEIVE)
        self.assertEqual(len(mc), 4)
        mc.unsubscribe(both, SEND)
        self.assertEqual(len(mc), 3)
