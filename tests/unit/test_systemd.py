"""Tests for activecall.systemd: sd_notify datagrams on a real AF_UNIX socket, watchdog on a Clock."""

from __future__ import annotations

import os
import socket
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.systemd import SdNotifier, SystemdNotify, notify_address, watchdog_interval_s


class Listener:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, test: SynchronousTestCase) -> None:
        directory = tempfile.mkdtemp(prefix="notify-")
        self.path = os.path.join(directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        test.addCleanup(self.sock.close)

    def received(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out


class EnvironmentTests(SynchronousTestCase):
    """Reading NOTIFY_SOCKET and WATCHDOG_USEC/WATCHDOG_PID."""

    def test_notify_address(self) -> None:
        """Paths are used as is, @names become abstract addresses, anything else means no notification."""
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}), "/run/systemd/notify")
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "@sd/notify"}), "\0sd/notify")
        self.assertIsNone(notify_address({}))
        self.assertIsNone(notify_address({"NOTIFY_SOCKET": "relative"}))

    def test_watchdog_interval(self) -> None:
        """Half of WATCHDOG_USEC, only for the process WATCHDOG_PID names."""
        self.assertEqual(watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, 7), 15.0)
        self.assertEqual(watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7), 15.0)
        self.assertIsNone(watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7))
        self.assertIsNone(watchdog_interval_s({"WATCHDOG_USEC": "x"}, 7))
        self.assertIsNone(watchdog_interval_s({"WATCHDOG_USEC": "0"}, 7))
        self.assertIsNone(watchdog_interval_s({}, 7))


class NotifyServiceTests(SynchronousTestCase):
    """READY=1 on start, WATCHDOG=1 every half period, STOPPING=1 on stop."""

    def test_ready_watchdog_stopping(self) -> None:
        """The datagrams arrive in order on a real socket; the watchdog repeats on the clock and stops with the service."""
        listener = Listener(self)
        clock = Clock()
        service = SystemdNotify.from_environment(
            clock, {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "2000000"}, pid=1)
        assert service is not None
        service.ready()
        self.assertEqual(listener.received(), ["READY=1", "WATCHDOG=1"])
        clock.advance(1.0)
        clock.advance(1.0)
        self.assertEqual(listener.received(), ["WATCHDOG=1", "WATCHDOG=1"])
        service.stopping()
        self.assertEqual(listener.received(), ["STOPPING=1"])
        clock.advance(5.0)
        self.assertEqual(listener.received(), [])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_watchdog_without_usec(self) -> None:
        """Without WATCHDOG_USEC only READY=1 and STOPPING=1 are sent and no timer runs."""
        listener = Listener(self)
        clock = Clock()
        service = SystemdNotify.from_environment(clock, {"NOTIFY_SOCKET": listener.path}, pid=1)
        assert service is not None
        service.ready()
        self.assertEqual(clock.getDelayedCalls(), [])
        service.stopping()
        self.assertEqual(listener.received(), ["READY=1", "STOPPING=1"])

    def test_not_under_systemd(self) -> None:
        """No NOTIFY_SOCKET: no notifier at all."""
        self.assertIsNone(SystemdNotify.from_environment(Clock(), {}))

    def test_gone_socket_never_raises(self) -> None:
        """A notify socket that went away makes send return False, counted, without raising."""
        listener = Listener(self)
        notifier = SdNotifier(listener.path + ".missing")
        self.addCleanup(notifier.close)
        self.assertFalse(notifier.send("READY=1"))
        self.assertFalse(notifier.send("WATCHDOG=1"))
        self.assertEqual((notifier.sent, notifier.errors), (0, 2))


class TopServiceTests(SynchronousTestCase):
    """The daemon's top service sends READY=1 after its children started and STOPPING=1 before they stop."""

    def test_order(self) -> None:
        """ready() follows every child's startService; stopping() precedes every child's stopService."""
        from twisted.application.service import Service

        from activecall.config import Config
        from activecall.tap import ActivecallService

        log: list[str] = []

        class Child(Service):
            def startService(self) -> None:
                super().startService()
                log.append("child started")

            def stopService(self) -> None:
                log.append("child stopping")
                super().stopService()

        class Notify:
            def ready(self) -> None:
                log.append("READY=1")

            def stopping(self) -> None:
                log.append("STOPPING=1")

        top = ActivecallService(Config(), None)
        Child().setServiceParent(top)
        top.systemd = Notify()
        top.startService()
        top.stopService()
        self.assertEqual(log, ["child started", "READY=1", "STOPPING=1", "child stopping"])
