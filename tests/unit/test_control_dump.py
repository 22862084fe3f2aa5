"""Tests for activecall.control.dump: the event dump's file work runs on a writer thread, in order."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from activecall.control.dump import DumpWriter, EventDump


class HeldJobs:
    """A dump writer that keeps the jobs until the test runs them."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []

    def submit(self, job: Callable[[], None]) -> bool:
        self.jobs.append(job)
        return True

    def run(self) -> None:
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job()


def _lines(path: str) -> list[dict[str, object]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


class EventDumpTests(SynchronousTestCase):
    """The caller only queues; the file is created, appended and closed by the writer, in order."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "s1.events.jsonl")
        self.held = HeldJobs()

    def test_constructor_and_writes_do_not_touch_the_file(self) -> None:
        """No file exists until the writer runs the queued jobs; then every line is there in order."""
        dump = EventDump(self.path, submit=self.held.submit)
        dump.write("command", 1, "a")
        dump.write("event", 2, "b")
        dump.close()
        self.assertFalse(os.path.exists(self.path))
        self.held.run()
        self.assertEqual(_lines(self.path), [{"type": "command", "timestamp": 1, "content": "a"},
                                             {"type": "event", "timestamp": 2, "content": "b"}])

    def test_each_line_is_written_before_close(self) -> None:
        """A line is in the file as soon as the writer ran its job, before the dump is closed."""
        dump = EventDump(self.path, submit=self.held.submit)
        dump.write("event", 1, "x")
        self.held.run()
        self.assertEqual(len(_lines(self.path)), 1)
        self.assertFalse(dump.wait_closed(0))
        dump.close()
        self.held.run()
        self.assertTrue(dump.wait_closed(0))

    def test_writes_after_close_are_ignored(self) -> None:
        """Nothing is queued once the dump is closed."""
        dump = EventDump(self.path, submit=self.held.submit)
        dump.close()
        queued = len(self.held.jobs)
        dump.write("event", 1, "late")
        self.assertEqual(len(self.held.jobs), queued)

    def test_unwritable_directory_is_a_problem_at_once(self) -> None:
        """A directory that cannot be made is reported by the constructor, and nothing is queued."""
        blocker = os.path.join(self.dir, "file")
        with open(blocker, "w"):
            pass
        dump = EventDump(os.path.join(blocker, "s.events.jsonl"), submit=self.held.submit)
        self.assertIsNotNone(dump.problem)
        self.assertTrue(dump.problem.startswith("cannot write event dump: "))  # type: ignore[union-attr]
        dump.write("event", 1, "x")
        self.assertEqual(self.held.jobs, [])

    def test_open_failure_in_the_writer_sets_problem(self) -> None:
        """A path that passes the cheap check but cannot be opened (a directory) stops the dump."""
        os.makedirs(self.path)
        dump = EventDump(self.path, submit=self.held.submit)
        self.assertIsNone(dump.problem)
        self.held.run()
        self.assertIsNotNone(dump.problem)
        self.assertTrue(dump.wait_closed(0))

    def test_full_queue_drops_lines(self) -> None:
        """When the writer refuses jobs the dump drops lines instead of blocking the caller."""
        accepted: list[Callable[[], None]] = []

        def refuse_after_open(job: Callable[[], None]) -> bool:
            if accepted:
                return False
            accepted.append(job)
            return True

        dump = EventDump(self.path, submit=refuse_after_open)
        dump.write("event", 1, "x")
        accepted[0]()
        self.assertEqual(os.path.getsize(self.path), 0)


class DumpWriterTests(SynchronousTestCase):
    """The writer thread runs jobs first in, first out, off the calling thread."""

    def test_jobs_run_in_order_on_another_thread(self) -> None:
        """drain() returns once every queued job ran, in order, on the writer's thread."""
        writer = DumpWriter()
        self.addCleanup(writer.stop)
        seen: list[tuple[int, str]] = []
        for i in range(50):
            writer.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
        self.assertTrue(writer.drain(10))
        self.assertEqual([i for i, _ in seen], list(range(50)))
        self.assertEqual({name for _, name in seen}, {"activecall-dump"})

    def test_a_failing_job_does_not_stop_the_writer(self) -> None:
        """An exception in one job is logged and the next job still runs."""
        writer = DumpWriter()
        self.addCleanup(writer.stop)
        ran: list[int] = []
        writer.submit(lambda: 1 / 0)  # type: ignore[func-returns-value]
        writer.submit(lambda: ran.append(1))
        self.assertTrue(writer.drain(10))
        self.assertEqual(ran, [1])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_stop_runs_what_is_queued(self) -> None:
        """stop() lets the queued jobs finish before the thread ends."""
        writer = DumpWriter()
        path = os.path.join(tempfile.mkdtemp(), "d.events.jsonl")
        dump = EventDump(path, submit=writer.submit)
        for i in range(100):
            dump.write("event", i, "x")
        dump.close()
        writer.stop()
        self.assertEqual(len(_lines(path)), 100)
        self.assertTrue(dump.wait_closed(0))

    def test_full_queue_refuses(self) -> None:
        """submit() returns False instead of blocking once max_queued jobs wait."""
        writer = DumpWriter(max_queued=1)
        self.addCleanup(writer.stop)
        gate = threading.Event()
        started = threading.Event()

        def block() -> None:
            started.set()
            gate.wait(10)

        writer.submit(block)
        started.wait(10)
        self.assertTrue(writer.submit(lambda: None))
        self.assertFalse(writer.submit(lambda: None))
        gate.set()
