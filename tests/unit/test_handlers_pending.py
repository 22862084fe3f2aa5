"""Unit tests for the registry of inbound calls waiting for a WebSocket client."""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.handlers.pending import SHUTTING_DOWN_REASON, PendingCalls


class FakeCall:
    """Records ``reject`` calls the way InboundCall receives them."""

    def __init__(self) -> None:
        self.rejections: list[tuple[int, str | None, list[tuple[str, str]]]] = []

    def reject(self, code: int, reason: str | None = None,
               headers: Iterable[tuple[str, str]] = ()) -> None:
        self.rejections.append((code, reason, list(headers)))


class PendingCallsTests(SynchronousTestCase):
    """PendingCalls: accept timeout, take, cancel, disconnect and shutdown."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pending = PendingCalls(self.clock, accept_timeout_s=60.0)
        self.call = FakeCall()
        self.pending.add("d1", self.call)

    def test_add_get_contains(self) -> None:
        """An added call is found by get and counted as hosted, without being claimed."""
        self.assertIn("d1", self.pending)
        self.assertNotIn("d2", self.pending)
        self.assertIs(self.pending.get("d1"), self.call)
        self.assertIs(self.pending.get("d1"), self.call)
        self.assertIsNone(self.pending.get("d2"))
        self.assertEqual(len(self.pending), 1)
        self.assertEqual(list(self.pending), ["d1"])

    def test_accept_timeout_408(self) -> None:
        """Nobody claims the call within accept_timeout: 408 with Reason accept timeout, then forgotten."""
        self.clock.advance(59.9)
        self.assertEqual(self.call.rejections, [])
        self.clock.advance(0.1)
        self.assertEqual(self.call.rejections, [(408, None, [("Reason", "accept timeout")])])
        self.assertNotIn("d1", self.pending)
        self.assertIsNone(self.pending.take("d1"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout_from_config_value(self) -> None:
        """The timeout is the configured number of seconds, not a fixed default."""
        pending = PendingCalls(self.clock, accept_timeout_s=5.0)
        call = FakeCall()
        pending.add("d9", call)
        self.clock.advance(5.0)
        self.assertEqual([code for code, _, _ in call.rejections], [408])

    def test_take_stops_timer(self) -> None:
        """take returns the call once, forgets it and leaves no timer, so no 408 follows."""
        self.assertIs(self.pending.take("d1"), self.call)
        self.assertIsNone(self.pending.take("d1"))
        self.assertNotIn("d1", self.pending)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(120)
        self.assertEqual(self.call.rejections, [])

    def test_cancelled(self) -> None:
        """A caller CANCEL forgets the call without answering it; a later take finds nothing."""
        self.assertTrue(self.pending.cancelled("d1"))
        self.assertFalse(self.pending.cancelled("d1"))
        self.assertIsNone(self.pending.take("d1"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(120)
        self.assertEqual(self.call.rejections, [])

    def test_client_disconnected_603(self) -> None:
        """A socket closing before accept/reject answers 603 with Reason handler disconnected."""
        self.assertTrue(self.pending.client_disconnected("d1"))
        self.assertEqual(self.call.rejections, [(603, None, [("Reason", "handler disconnected")])])
        self.assertFalse(self.pending.client_disconnected("d1"))
        self.assertEqual(len(self.call.rejections), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_disconnect_after_take_is_noop(self) -> None:
        """Once a client has claimed the call, its disconnect does not answer the INVITE here."""
        self.pending.take("d1")
        self.assertFalse(self.pending.client_disconnected("d1"))
        self.assertEqual(self.call.rejections, [])

    def test_reject_with_reason(self) -> None:
        """reject answers the given code with the reason text as the Reason header."""
        self.assertTrue(self.pending.reject("d1", 503, "Failed to process invite: boom"))
        self.assertEqual(self.call.rejections, [(503, None, [("Reason", "Failed to process invite: boom")])])
        self.assertFalse(self.pending.reject("d1", 503, "again"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reject_all_shutdown(self) -> None:
        """reject_all answers every pending call 503 Server shutting down and empties the registry."""
        other = FakeCall()
        self.pending.add("d2", other)
        self.assertEqual(self.pending.reject_all(), 2)
        for call in (self.call, other):
            self.assertEqual(call.rejections, [(503, None, [("Reason", SHUTTING_DOWN_REASON)])])
        self.assertEqual(SHUTTING_DOWN_REASON, 'SIP;cause=503;text="Server shutting down"')
        self.assertEqual(len(self.pending), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.pending.reject_all(), 0)

    def test_re_add_replaces_timer(self) -> None:
        """Adding the same id again replaces the entry and leaves a single timer."""
        self.clock.advance(30)
        newer = FakeCall()
        self.pending.add("d1", newer)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(30)
        self.assertEqual(self.call.rejections, [])
        self.assertEqual(newer.rejections, [])
        self.clock.advance(30)
        self.assertEqual([code for code, _, _ in newer.rejections], [408])

    def test_reentrant_cancel_during_reject(self) -> None:
        """A call whose reject reports back through cancelled (as a dialog listener does) is answered once."""
        pending = self.pending

        class Reentrant(FakeCall):
            def reject(self, code: int, reason: str | None = None,
                       headers: Iterable[tuple[str, str]] = ()) -> None:
                super().reject(code, reason, headers)
                pending.cancelled("d3")

        call = Reentrant()
        pending.add("d3", call)
        pending.client_disconnected("d3")
        self.assertEqual([code for code, _, _ in call.rejections], [603])
        self.assertNotIn("d3", pending)

    def test_timeout_reject_error_is_contained(self) -> None:
        """An exception from the call's reject at expiry is logged, not raised into the reactor."""

        class Broken(FakeCall):
            def reject(self, code: int, reason: str | None = None,
                       headers: Iterable[tuple[str, str]] = ()) -> None:
                raise RuntimeError("transport gone")

        self.pending.take("d1")
        self.pending.add("d4", Broken())
        self.clock.advance(60)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNotIn("d4", self.pending)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class MaxPendingTests(SynchronousTestCase):
    """``[sip_limits] max_pending_invites``: calls beyond get 503 at once and never wait."""

    def test_beyond_max_pending_503_with_reason(self) -> None:
        """With max_pending 2 the third waiting call is answered 503 with Retry-After and a Reason, and not kept."""
        from activecall.handlers.pending import TOO_MANY_PENDING_REASON

        clock = Clock()
        closed: list[tuple[str, int]] = []
        pending = PendingCalls(clock, accept_timeout_s=60.0, max_pending=2,
                               on_closed=lambda d, c, at, status: closed.append((d, status)))
        calls = [FakeCall() for _ in range(3)]
        self.assertEqual([pending.add(f"d{i}", c) for i, c in enumerate(calls)], [True, True, False])
        self.assertEqual(calls[2].rejections,
                         [(503, None, [("Retry-After", "5"), ("Reason", TOO_MANY_PENDING_REASON)])])
        self.assertNotIn("d2", pending)
        self.assertEqual((len(pending), pending.refused, closed), (2, 1, []))
        self.assertEqual(len(clock.getDelayedCalls()), 2)
        # A slot frees when a waiting call leaves; re-adding a present id never counts as new.
        pending.take("d0")
        self.assertTrue(pending.add("d3", FakeCall()))
        self.assertTrue(pending.add("d3", FakeCall()))
        self.assertEqual(len(pending), 2)
        pending.reject_all()
        self.assertEqual(clock.getDelayedCalls(), [])


class PerSourceShareTests(SynchronousTestCase):
    """One source may hold only its share of the pending registry, unless it is trusted."""

    def test_one_source_cannot_fill_the_registry(self) -> None:
        """With max_pending 8, one untrusted source holds 2 (a quarter); others and trusted sources still get in."""
        clock = Clock()
        pending = PendingCalls(clock, accept_timeout_s=60.0, max_pending=8,
                               trusted=lambda ip: ip == "10.0.0.2")
        flood = [pending.add(f"f{i}", FakeCall(), source_ip="192.0.2.66") for i in range(5)]
        self.assertEqual(flood, [True, True, False, False, False])
        self.assertTrue(pending.add("other", FakeCall(), source_ip="198.51.100.7"))
        self.assertEqual([pending.add(f"t{i}", FakeCall(), source_ip="10.0.0.2") for i in range(5)], [True] * 5)
        self.assertEqual(pending.refused, 3)
        # Leaving by any path frees the source's share: timeout, take, cancel.
        clock.advance(60)
        self.assertEqual(len(pending), 0)
        self.assertTrue(pending.add("f9", FakeCall(), source_ip="192.0.2.66"))
        pending.take("f9")
        self.assertTrue(pending.add("f10", FakeCall(), source_ip="192.0.2.66"))
        self.assertTrue(pending.cancelled("f10"))
        self.assertEqual(pending._per_source, {})
