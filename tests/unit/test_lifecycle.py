"""Process-wide policy (activecall.lifecycle): the open-files limit and the periodic garbage collection."""

from __future__ import annotations

import resource

from twisted.trial.unittest import SynchronousTestCase

from activecall.lifecycle import raise_open_files_limit


class OpenFilesLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.saved = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, self.saved)
        if self.saved[1] != resource.RLIM_INFINITY and self.saved[1] < 2048:
            self.skipTest("hard RLIMIT_NOFILE too low to test")

    def test_soft_limit_raised_to_hard(self) -> None:
        """A soft limit of 1024 is lifted to the hard limit (at most the wanted number)."""
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, self.saved[1]))
        old, new = raise_open_files_limit(2048)
        self.assertEqual((old, new), (1024, 2048))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 2048)

    def test_higher_soft_limit_kept(self) -> None:
        """A soft limit already above the wanted number is left alone."""
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, self.saved[1]))
        self.assertEqual(raise_open_files_limit(1500), (2048, 2048))


class CyclicGarbageServiceTests(SynchronousTestCase):
    """Ended calls' reference cycles are collected on a fixed period, not when Python's thresholds say."""

    def test_collects_every_interval_until_stopped(self) -> None:
        """A full collection runs every 15 s on the injected clock, none after stop."""
        from twisted.internet.task import Clock

        from activecall.lifecycle import CyclicGarbageService

        clock = Clock()
        runs: list[float] = []
        svc = CyclicGarbageService(clock, collect=lambda: runs.append(clock.seconds()))
        svc.startService()
        clock.advance(14)
        self.assertEqual(runs, [])
        clock.advance(1)
        clock.advance(15)
        self.assertEqual(runs, [15.0, 30.0])
        svc.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
