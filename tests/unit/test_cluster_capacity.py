"""Capacity signals (/health, /metrics) and where requests for ids hosted elsewhere are sent."""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from activecall.cluster.registry import Owner
from activecall.control.tunnel import OwnerLocator, forward_url
from activecall.metrics import Capacity, CpuMeter, DaemonCollector


class FakeUserAgent:
    max_calls: Optional[int] = 50

    def calls_in_progress(self) -> int:
        return 7


class CapacityTests(SynchronousTestCase):
    """CPU is measured over windows of injected time; the snapshot names calls, limit, sessions, drain."""

    def test_cpu_meter_windows(self) -> None:
        """Half a core busy over 2 s is 50 %; a reading inside the minimum window repeats the last one."""
        now, cpu = [100.0], [10.0]
        meter = CpuMeter(lambda: cpu[0], lambda: now[0])
        now[0], cpu[0] = 102.0, 11.0
        self.assertEqual(meter.percent(), 50.0)
        now[0], cpu[0] = 102.5, 11.5
        self.assertEqual(meter.percent(), 50.0)  # 0.5 s later: the same window
        now[0], cpu[0] = 104.0, 13.0
        self.assertAlmostEqual(meter.percent(), 100.0)

    def test_snapshot_and_metrics(self) -> None:
        """The /health body and the three gauges agree; draining flips status and the gauge."""
        draining = [False]
        capacity = Capacity(user_agent=FakeUserAgent(), sessions=[1, 2], cpu=CpuMeter(lambda: 0.0, lambda: 0.0),
                            draining=lambda: draining[0], node="n1")
        self.assertEqual(capacity.snapshot(), {"status": "ok", "calls": 7, "max_calls": 50, "sessions": 2,
                                               "cpu_percent": 0.0, "node": "n1"})
        draining[0] = True
        self.assertEqual(capacity.snapshot()["status"], "draining")
        gauges = {m.name: m.samples[0].value for m in DaemonCollector(capacity=capacity).collect()
                  if m.name in ("activecall_calls_limit", "activecall_cpu_percent", "activecall_draining")}
        self.assertEqual(gauges, {"activecall_calls_limit": 50, "activecall_cpu_percent": 0.0,
                                  "activecall_draining": 1})


class LocatorTests(SynchronousTestCase):
    """The registry's owner alone when known, else every static peer; URLs keep the query, add forward."""

    def test_candidates(self) -> None:
        """Known owner: only its URL; unknown or no registry: the peers in order."""
        owners: dict[str, Any] = {"x": Owner("a", "http://10.0.0.1:8080")}
        located = OwnerLocator(lambda sid: succeed(owners.get(sid)), ["ws://p1:8080", "ws://p2:8080"])
        self.assertEqual(self.successResultOf(located.candidates("x")), ["http://10.0.0.1:8080"])
        self.assertEqual(self.successResultOf(located.candidates("y")), ["ws://p1:8080", "ws://p2:8080"])
        peers_only = OwnerLocator(None, ["ws://p1:8080"])
        self.assertTrue(peers_only.enabled)
        self.assertEqual(self.successResultOf(peers_only.candidates("x")), ["ws://p1:8080"])
        self.assertFalse(OwnerLocator(None, []).enabled)

    def test_forward_url(self) -> None:
        """Same path and parameters (token included), a client's own forward value replaced by true."""
        url = forward_url("https://node-a:8443", "/call/sip",
                          {"id": ["d@1"], "token": ["t"], "forward": ["false"], "dump": ["true"]})
        parts = urlsplit(url)
        self.assertEqual((parts.scheme, parts.netloc, parts.path), ("wss", "node-a:8443", "/call/sip"))
        self.assertEqual(parse_qs(parts.query), {"id": ["d@1"], "token": ["t"], "dump": ["true"], "forward": ["true"]})


class TunnelPairingTests(SynchronousTestCase):
    """A client that leaves while its owner is being found does not leave the owner's socket open."""

    def test_owner_socket_closed_when_the_client_left(self) -> None:
        """The owner upgrades after the client closed: its socket is closed at once, never paired."""
        from twisted.internet.defer import Deferred

        from activecall.control import protocol as control_protocol
        from activecall.control.query import SessionParams

        class Upstream:
            closed: list[int] = []

            def sendClose(self, code: int = 1000) -> None:
                self.closed.append(code)

        upstream = Upstream()
        opening: Deferred[Any] = Deferred()

        class Factory:
            locator = OwnerLocator(None, ["ws://127.0.0.1:9"])
            clock = limits = None
            host: dict[str, Any] = {}
            relays = control_protocol.RelaySlots()

            def open_upstream(self, bases: Any, path: Any, params: Any, headers: Any) -> Deferred[Any]:
                return opening

            def admitting_sessions(self) -> None:
                pass

        proto = control_protocol.ControlProtocol()
        proto.factory = Factory()  # type: ignore[assignment]

        class Request:
            headers: dict[str, str] = {}
            path = "/call"
            params: dict[str, list[str]] = {"id": ["x"]}

        d = Deferred.fromCoroutine(proto._route(Request(), SessionParams(sid="x", call_type="webSocket")))  # type: ignore[arg-type]
        proto.onClose(False, 1006, "gone")
        opening.callback(upstream)
        self.successResultOf(d)
        self.assertEqual(upstream.closed, [1000])
        self.assertIsNone(proto._upstream)
