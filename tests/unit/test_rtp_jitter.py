"""Tests for activecall.rtp.jitter: reordering, duplicates, late packets, wrap, loss and adaptation."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

from twisted.trial.unittest import SynchronousTestCase

from activecall.rtp.jitter import LOSS, JitterBuffer, PutStatus

FRAME = 0.02
T0 = 1000.0


def _payload(seq: int) -> bytes:
    return seq.to_bytes(2, "big")


def _label(item: object) -> object:
    """Turn a pop result into the sequence number it carried, 'L' for LOSS, None for nothing."""
    if item is LOSS or item is None:
        return "L" if item is LOSS else None
    return int.from_bytes(bytes(item), "big")  # type: ignore[arg-type]


def _loss_pattern(pattern: Sequence[bool]) -> Iterator[bool]:
    """Deterministic loss (True = delivered), cycled, as aiortc's tests/utils.py does."""
    return itertools.cycle(pattern)


def _simulate(
    jb: JitterBuffer,
    count: int,
    *,
    start_seq: int = 0,
    delays: Sequence[float] | Callable[[int], float] = (0.0,),
    deliver: Iterator[bool] | None = None,
    extra_ticks: int = 10,
    targets: list[int] | None = None,
) -> list[object]:
    """Send ``count`` packets every 20 ms with cyclic network delays, pop once per tick; return labels."""
    delay_of = delays if callable(delays) else (lambda i: delays[i % len(delays)])
    arrivals = []
    delivered = deliver if deliver is not None else itertools.repeat(True)
    for i, ok in zip(range(count), delivered):
        if ok:
            arrivals.append((T0 + i * FRAME + delay_of(i), i))
    arrivals.sort()
    out: list[object] = []
    k = 0
    for tick in range(int((arrivals[-1][0] - T0) / FRAME) + extra_ticks + 2):
        now = T0 + tick * FRAME + 0.001
        while k < len(arrivals) and arrivals[k][0] <= now:
            at, i = arrivals[k]
            seq = (start_seq + i) & 0xFFFF
            jb.put(seq, (160 * i) & 0xFFFFFFFF, _payload(i), at)
            k += 1
        out.append(_label(jb.pop(now)))
        if targets is not None:
            targets.append(jb.target_frames)
    return out


def _played(labels: list[object]) -> list[int]:
    return [x for x in labels if isinstance(x, int)]


class OrderingTests(SynchronousTestCase):
    """Reordering, duplicates, late packets and sequence wrap."""

    def test_in_order_after_target_delay(self) -> None:
        """Playout starts once the target depth (2 frames) is buffered, then plays in order."""
        jb = JitterBuffer()
        jb.put(0, 0, _payload(0), T0)
        self.assertIsNone(jb.pop(T0))
        jb.put(1, 160, _payload(1), T0 + 0.02)
        self.assertEqual(_label(jb.pop(T0 + 0.02)), 0)
        self.assertEqual(_label(jb.pop(T0 + 0.04)), 1)
        self.assertEqual((jb.last_seq, jb.last_timestamp), (1, 160))

    def test_reorder_before_playout(self) -> None:
        """Packets arriving 2, 1, 0 before playout starts play as 0, 1, 2."""
        jb = JitterBuffer(min_delay_frames=3)
        for s in (2, 1, 0):
            self.assertEqual(jb.put(s, 160 * s, _payload(s), T0), PutStatus.QUEUED)
        self.assertEqual([_label(jb.pop(T0)) for _ in range(3)], [0, 1, 2])

    def test_reorder_while_playing(self) -> None:
        """Swapped packets during playout are put back in order."""
        jb = JitterBuffer()
        for s in (10, 11):
            jb.put(s, 0, _payload(s), T0)
        self.assertEqual(_label(jb.pop(T0)), 10)
        jb.put(13, 0, _payload(13), T0)
        jb.put(12, 0, _payload(12), T0)
        self.assertEqual([_label(jb.pop(T0)) for _ in range(3)], [11, 12, 13])

    def test_duplicates_dropped(self) -> None:
        """A duplicate is reported and played only once."""
        jb = JitterBuffer()
        jb.put(5, 0, _payload(5), T0)
        self.assertEqual(jb.put(5, 0, _payload(5), T0), PutStatus.DUPLICATE)
        jb.put(6, 0, _payload(6), T0)
        self.assertEqual([_label(jb.pop(T0)) for _ in range(2)], [5, 6])
        self.assertEqual(jb.duplicates, 1)

    def test_late_packet_dropped(self) -> None:
        """A packet older than what was played (or concealed) is dropped as late."""
        jb = JitterBuffer()
        for s in (1, 3):
            jb.put(s, 0, _payload(s), T0)
        jb.put(2, 0, _payload(2), T0)  # fills the hole before playout
        jb.put(5, 0, _payload(5), T0)
        self.assertEqual([_label(jb.pop(T0)) for _ in range(5)], [1, 2, 3, "L", 5])
        self.assertEqual(jb.put(4, 0, _payload(4), T0), PutStatus.LATE)
        self.assertEqual(jb.put(2, 0, _payload(2), T0), PutStatus.LATE)
        self.assertEqual(jb.late, 2)

    def test_wrap_around(self) -> None:
        """Sequence numbers 65533..2 delivered out of order play in order across the wrap."""
        jb = JitterBuffer(min_delay_frames=6)
        order = [65534, 65533, 0, 65535, 2, 1]
        for s in order:
            self.assertEqual(jb.put(s, 0, s.to_bytes(2, "big"), T0), PutStatus.QUEUED)
        self.assertEqual([_label(jb.pop(T0)) for _ in range(6)], [65533, 65534, 65535, 0, 1, 2])

    def test_wrap_in_simulation(self) -> None:
        """A long stream crossing 65535 -> 0 with jitter plays every packet exactly once, in order."""
        jb = JitterBuffer()
        labels = _simulate(jb, 300, start_seq=65400, delays=(0.0, 0.035, 0.01, 0.05))
        self.assertEqual(_played(labels), sorted(_played(labels)))
        self.assertEqual(len(set(_played(labels))), len(_played(labels)))
        self.assertEqual(jb.lost + jb.late + len(_played(labels)) + jb.trimmed, 300)


class LossTests(SynchronousTestCase):
    """Loss is reported in place so the caller can conceal it."""

    def test_deterministic_loss_pattern(self) -> None:
        """With every fifth packet lost, LOSS appears exactly in their places."""
        jb = JitterBuffer()
        labels = _simulate(jb, 50, deliver=_loss_pattern([True, True, True, True, False]))
        body = [x for x in labels if x is not None]
        expected = ["L" if i % 5 == 4 else i for i in range(50)]
        # The last packet (49) is lost too; nothing after it tells the buffer, so it ends with an underrun.
        self.assertEqual(body[:49], expected[:49])
        self.assertEqual(jb.lost, 9)

    def test_underrun_conceals_then_goes_silent(self) -> None:
        """When the stream stops, pop returns LOSS for max_conceal_frames then None, and the target grows."""
        jb = JitterBuffer(max_conceal_frames=3)
        for s in range(4):
            jb.put(s, 160 * s, _payload(s), T0 + 0.02 * s)
        out = [_label(jb.pop(T0)) for _ in range(9)]
        self.assertEqual(out, [0, 1, 2, 3, "L", "L", "L", None, None])
        self.assertEqual(jb.underruns, 1)
        self.assertEqual(jb.target_frames, 3)
        self.assertFalse(jb.playing)

    def test_resume_after_underrun_rebuffers(self) -> None:
        """After an underrun, a late packet still plays once the (larger) target depth is reached."""
        jb = JitterBuffer()
        for s in range(2):
            jb.put(s, 0, _payload(s), T0)
        self.assertEqual([_label(jb.pop(T0)) for _ in range(3)], [0, 1, "L"])
        jb.put(2, 0, _payload(2), T0)
        jb.put(3, 0, _payload(3), T0)
        self.assertEqual(_label(jb.pop(T0)), "L")  # still buffering towards 3 frames
        jb.put(4, 0, _payload(4), T0)
        self.assertEqual([_label(jb.pop(T0)) for _ in range(3)], [2, 3, 4])

    def test_concealed_frame_not_replayed(self) -> None:
        """A packet given up for lost is dropped as late when it finally arrives."""
        jb = JitterBuffer()
        for s in (0, 1, 3, 4):
            jb.put(s, 0, _payload(s), T0)
        self.assertEqual([_label(jb.pop(T0)) for _ in range(3)], [0, 1, "L"])
        self.assertEqual(jb.put(2, 0, _payload(2), T0), PutStatus.LATE)
        # Being late is evidence of too little delay: one concealed frame deepens the buffer.
        self.assertEqual(jb.target_frames, 3)
        self.assertEqual([_label(jb.pop(T0)) for _ in range(2)], ["L", 3])


class AdaptationTests(SynchronousTestCase):
    """The target delay follows measured jitter within its bounds."""

    def test_steady_stream_stays_at_minimum(self) -> None:
        """A jitter-free stream keeps the minimum delay and loses nothing."""
        jb = JitterBuffer()
        played = []
        for i in range(200):
            jb.put(i, 160 * i, _payload(i), T0 + i * FRAME)
            played.append(_label(jb.pop(T0 + i * FRAME + 0.001)))
        self.assertEqual(jb.target_frames, 2)
        self.assertEqual(played, [None] + list(range(199)))
        self.assertEqual((jb.lost, jb.underruns, jb.trimmed), (0, 0, 0))

    def test_grows_with_jitter(self) -> None:
        """Delays cycling 0..80 ms raise the target so that playout stops losing packets."""
        jb = JitterBuffer()
        labels = _simulate(jb, 500, delays=(0.0, 0.08, 0.02, 0.06, 0.0, 0.04))
        self.assertGreaterEqual(jb.target_frames, 4)
        self.assertLessEqual(jb.target_frames, jb.max_delay_frames)
        # The second half plays with no concealment at all.
        self.assertNotIn("L", labels[300:500])
        self.assertEqual(_played(labels), sorted(_played(labels)))

    def test_bounded(self) -> None:
        """Extreme jitter never pushes the target past max_delay_frames."""
        jb = JitterBuffer(max_delay_frames=6)
        _simulate(jb, 400, delays=(0.0, 0.5, 0.1, 0.9, 0.3))
        self.assertLessEqual(jb.target_frames, 6)
        self.assertLessEqual(jb.depth, jb.capacity)

    def test_shrinks_slowly(self) -> None:
        """After jitter stops the target comes down one frame per stable period, not at once."""
        jb = JitterBuffer(shrink_after_frames=50)
        pattern = (0.0, 0.08, 0.02, 0.06)
        targets: list[int] = []
        labels = _simulate(
            jb, 1000, delays=lambda i: pattern[i % 4] if i < 300 else 0.0, extra_ticks=0, targets=targets
        )
        peak = max(targets[:300])
        self.assertGreaterEqual(peak, 4)
        # Never more than one frame down per 50-frame period...
        for a, b in zip(targets, targets[1:]):
            self.assertGreaterEqual(b, a - 1)
        drops = [i for i, (a, b) in enumerate(zip(targets, targets[1:])) if b < a]
        self.assertTrue(all(y - x >= 50 for x, y in zip(drops, drops[1:])), drops)
        # ...but down to the minimum in the end, with latency actually removed.
        self.assertEqual(targets[-5], jb.min_delay_frames)
        self.assertGreaterEqual(jb.trimmed, 2)
        self.assertNotIn("L", labels[320:1000])

    def test_backlog_trimmed(self) -> None:
        """A burst that leaves the buffer well above target is trimmed frame by frame."""
        jb = JitterBuffer(trim_after_frames=5)
        for s in range(12):
            jb.put(s, 160 * s, _payload(s), T0)
        for i in range(12, 80):
            jb.pop(T0 + i * FRAME)
            jb.put(i, 160 * i, _payload(i), T0 + i * FRAME)
        self.assertGreater(jb.trimmed, 0)
        self.assertLessEqual(jb.depth, jb.target_frames + 2)


class ResyncTests(SynchronousTestCase):
    """Jumps restart playout instead of stalling."""

    def test_far_jump_ahead_resyncs(self) -> None:
        """A jump of 1000 sequence numbers flushes and restarts playout at the new packets."""
        jb = JitterBuffer()
        for s in range(4):
            jb.put(s, 0, _payload(s), T0)
        self.assertEqual(_label(jb.pop(T0)), 0)
        self.assertEqual(jb.put(1000, 0, _payload(1000), T0), PutStatus.RESYNC)
        self.assertIsNone(jb.pop(T0))
        jb.put(1001, 0, _payload(1001), T0)
        self.assertEqual([_label(jb.pop(T0)) for _ in range(2)], [1000, 1001])
        self.assertEqual(jb.resyncs, 1)

    def test_restart_backwards_resyncs(self) -> None:
        """A sender that restarts far behind is followed rather than dropped as late."""
        jb = JitterBuffer()
        for s in range(5000, 5004):
            jb.put(s, 0, _payload(s), T0)
        jb.pop(T0)
        self.assertEqual(jb.put(10, 0, _payload(10), T0), PutStatus.RESYNC)
        jb.put(11, 0, _payload(11), T0)
        self.assertEqual([_label(jb.pop(T0)) for _ in range(2)], [10, 11])

    def test_overflow_keeps_newest(self) -> None:
        """Without pops, a capacity-16 buffer keeps the newest packets and counts the rest as overflowed."""
        jb = JitterBuffer(capacity=16, max_delay_frames=8)
        for s in range(40):
            self.assertNotEqual(jb.put(s, 0, _payload(s), T0), PutStatus.RESYNC)
        self.assertEqual(jb.overflowed, 24)
        self.assertEqual(_label(jb.pop(T0)), 24)

    def test_marker_into_empty_buffer_rebuffers(self) -> None:
        """A talk spurt's first packet (marker) arriving into an empty buffer restarts buffering to target."""
        jb = JitterBuffer(max_conceal_frames=0)
        for s in range(2):
            jb.put(s, 0, _payload(s), T0)
        jb.pop(T0)
        jb.pop(T0)
        self.assertTrue(jb.playing)
        jb.put(2, 8000, _payload(2), T0 + 1, marker=True)
        self.assertFalse(jb.playing)
        self.assertIsNone(jb.pop(T0 + 1))
        jb.put(3, 8160, _payload(3), T0 + 1.02)
        self.assertEqual(_label(jb.pop(T0 + 1.02)), 2)

    def test_reset(self) -> None:
        """reset() empties the buffer so a new stream starts fresh."""
        jb = JitterBuffer()
        for s in range(5):
            jb.put(s, 0, _payload(s), T0)
        jb.reset()
        self.assertEqual(jb.depth, 0)
        self.assertIsNone(jb.pop(T0))
        jb.put(900, 0, _payload(900), T0)
        jb.put(901, 0, _payload(901), T0)
        self.assertEqual(_label(jb.pop(T0)), 900)

    def test_bad_configuration(self) -> None:
        """Capacity must be a power of two and the delay bounds must fit in it."""
        with self.assertRaises(ValueError):
            JitterBuffer(capacity=48)
        with self.assertRaises(ValueError):
            JitterBuffer(capacity=16, max_delay_frames=16)
