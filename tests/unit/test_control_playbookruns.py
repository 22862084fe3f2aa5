"""PlaybookRuns: session ids handed out by POST /api/playbook/run, taken once, expiring after 300 s."""

from __future__ import annotations

import re
from typing import Callable

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.control.playbookruns import SWEEP_INTERVAL_S, PlaybookRuns, RunsFullError


def counting_ids() -> Callable[[], str]:
    n = iter(range(1, 1_000_000))
    return lambda: f"s.{next(n)}"


class PlaybookRunsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runs = PlaybookRuns(self.clock, ids=counting_ids())

    def tearDown(self) -> None:
        self.runs.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_default_ids_are_s_dot_uuid4(self) -> None:
        """Without ``ids`` the session id is ``s.`` + a version-4 UUID, fresh every time."""
        runs = PlaybookRuns(self.clock)
        a, b = runs.add("a.md"), runs.add("b.md")
        pattern = r"s\.[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
        self.assertRegex(a, pattern)
        self.assertIsNotNone(re.fullmatch(pattern, b))
        self.assertNotEqual(a, b)
        runs.stop()

    def test_take_returns_the_value_once(self) -> None:
        """The stored value comes back exactly once; unknown ids give None."""
        sid = self.runs.add("sales.md")
        inline = self.runs.add("---\nllm: {}\n---\n")
        self.assertEqual((sid, inline), ("s.1", "s.2"))
        self.assertIn(sid, self.runs)
        self.assertEqual(self.runs.take(sid), "sales.md")
        self.assertIsNone(self.runs.take(sid))
        self.assertNotIn(sid, self.runs)
        self.assertEqual(self.runs.take(inline), "---\nllm: {}\n---\n")
        self.assertIsNone(self.runs.take("s.unknown"))
        self.assertEqual(len(self.runs), 0)

    def test_unclaimed_ids_expire_after_300_s(self) -> None:
        """At 299.9 s the value is still there; at 300 s it is gone (checked at take, not only by the sweep)."""
        early = self.runs.add("a.md")
        late = self.runs.add("b.md")
        self.clock.advance(299.9)
        self.assertEqual(self.runs.take(early), "a.md")
        self.clock.advance(0.1)
        self.assertNotIn(late, self.runs)
        self.assertIsNone(self.runs.take(late))

    def test_sweep_frees_expired_entries_and_stops_when_empty(self) -> None:
        """The periodic sweep drops expired entries; with nothing left no timer stays armed."""
        self.runs.add("a.md")
        self.clock.advance(100)
        self.runs.add("b.md")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # one sweep timer, whatever the count
        self.clock.advance(200)  # a.md is 300 s old
        self.assertEqual(len(self.runs), 1)
        self.clock.advance(100 + SWEEP_INTERVAL_S)
        self.assertEqual(len(self.runs), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_full_registry_refuses_until_entries_expire(self) -> None:
        """max_runs pending: add raises RunsFullError; once they expire (even before a sweep) add works."""
        runs = PlaybookRuns(self.clock, ids=counting_ids(), max_runs=3)
        for name in ("a.md", "b.md", "c.md"):
            runs.add(name)
        self.assertRaises(RunsFullError, runs.add, "d.md")
        self.assertEqual(len(runs), 3)
        runs.take("s.2")
        self.assertEqual(runs.add("d.md"), "s.4")
        runs.stop()  # no sweep now: expiry is lazy
        self.clock.advance(300)
        self.assertEqual(runs.add("e.md"), "s.5")
        self.assertEqual(len(runs), 1)
        self.assertEqual(runs.take("s.5"), "e.md")

    def test_repeated_ids_are_skipped_then_refused(self) -> None:
        """An id already pending is never handed out twice; a source that only repeats fails loudly."""
        seq = iter(["s.x", "s.x", "s.y"])
        runs = PlaybookRuns(self.clock, ids=lambda: next(seq))
        self.assertEqual((runs.add("a.md"), runs.add("b.md")), ("s.x", "s.y"))
        stuck = PlaybookRuns(self.clock, ids=lambda: "s.same")
        stuck.add("a.md")
        self.assertRaises(RuntimeError, stuck.add, "b.md")
        self.assertEqual(stuck.take("s.same"), "a.md")
        runs.stop()
        stuck.stop()

    def test_stop_cancels_the_sweep_for_good(self) -> None:
        """After stop no timer is armed again by add; expired entries still read as None."""
        self.runs.add("a.md")
        self.runs.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        sid = self.runs.add("b.md")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(301)
        self.assertIsNone(self.runs.take(sid))

    def test_bad_limits_are_refused(self) -> None:
        """A ttl of 0 or a max of 0 would hand out ids nobody can use."""
        self.assertRaises(ValueError, PlaybookRuns, self.clock, ttl_s=0)
        self.assertRaises(ValueError, PlaybookRuns, self.clock, max_runs=0)
