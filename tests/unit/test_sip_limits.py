"""SIP limits in the real stack: the rate limit counts only requests that start something; max_calls."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.config import SipAclConfig, SipRateLimitConfig
from activecall.ids import IdSource
from activecall.sip.message import SipResponse, parse_message
from activecall.sip.security import RateLimiter, SipAcl, SipGuard, parse_network
from activecall.sip.transport import SipDatagramProtocol, SipStack
from activecall.sip.useragent import MAX_CALLS_REASON, CallRejected, SipUserAgent
from activecall.testing_sip import AutoAnswerHandler, MemoryDatagramTransport, minimal_sdp

TRUNK = ("10.0.0.2", 5070)
SDP = minimal_sdp("10.0.0.2").decode()


def request(method: str, n: int, *, to_tag: str | None = None, cseq: int = 1, body: str = "",
            branch: str | None = None) -> bytes:
    """Request of call ``n`` from the trunk (Call-ID ``call-<n>``)."""
    to = "<sip:agent@10.0.0.1:5060>" + (f";tag={to_tag}" if to_tag else "")
    ctype = "Content-Type: application/sdp\r\n" if body else ""
    return (
        f"{method} sip:agent@10.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.2:5070;branch={branch or f'z9hG4bK{method}{n}x{cseq}'};rport\r\n"
        f"From: <sip:trunk@10.0.0.2>;tag=f{n}\r\n"
        f"To: {to}\r\n"
        f"Call-ID: call-{n}\r\n"
        f"CSeq: {cseq} {method}\r\n"
        f"Contact: <sip:trunk@10.0.0.2:5070>\r\n"
        f"Max-Forwards: 70\r\n{ctype}"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


class StackCase(SynchronousTestCase):
    """A user agent on the real SipStack over a memory UDP transport, optionally guarded."""

    def make(self, handler: Any = None, guard: SipGuard | None = None, **kwargs: Any) -> None:
        self.clock = Clock()
        self.ids = IdSource(random.Random(7))
        self.stack = SipStack(self.clock, self.ids, shards=4,
                              admit=guard.source_admitted if guard is not None else None,
                              budget=guard.datagram_allowed if guard is not None else None,
                              penalize=guard.parse_failed if guard is not None else None)
        self.ua = SipUserAgent(self.stack, ids=self.ids, handler=handler, useragent="test-ua",
                               admit_new_request=guard.admit_new_request if guard is not None else None,
                               **kwargs)
        self.proto = SipDatagramProtocol(self.stack)
        self.transport = MemoryDatagramTransport(("10.0.0.1", 5060))
        self.proto.makeConnection(self.transport)  # type: ignore[arg-type]
        self.stack.add_listener("udp", "10.0.0.1", 5060, self.proto)

    def feed(self, data: bytes, source: tuple[str, int] = TRUNK) -> None:
        self.proto.datagramReceived(data, source)

    def responses(self) -> list[SipResponse]:
        out = [parse_message(data) for data, _ in self.transport.written]
        self.transport.written.clear()
        return [m for m in out if isinstance(m, SipResponse)]

    def call(self, n: int) -> list[int]:
        """One whole call from the trunk: INVITE, ACK, BYE; returns the statuses it got back."""
        self.feed(request("INVITE", n, body=SDP))
        got = self.responses()
        statuses = [r.status for r in got]
        final = [r for r in got if r.status >= 200]
        if not final or final[0].status != 200:
            return statuses
        tag = final[0].to.tag
        self.feed(request("ACK", n, to_tag=tag))
        self.feed(request("BYE", n, to_tag=tag, cseq=2))
        return statuses + [r.status for r in self.responses()]


class RateLimitCountsNewWorkTests(StackCase):
    """Only requests that start something take tokens; ACK/BYE of live calls never do."""

    def test_trunk_calls_not_throttled_by_their_ack_and_bye(self) -> None:
        """With a burst of 10, ten whole calls (30 requests) at one instant all succeed; the 11th INVITE is dropped."""
        self.make(AutoAnswerHandler(keep=False), SipGuard(SipAcl(), RateLimiter(1, 10)))
        for n in range(10):
            self.assertEqual(self.call(n), [200, 200], n)
        self.feed(request("INVITE", 99, body=SDP))
        self.assertEqual(self.responses(), [])
        self.assertEqual(self.ua.counters["rate_limited"], 1)

    def test_options_flood_throttled(self) -> None:
        """Out-of-dialog OPTIONS from one source beyond the burst get no answer; other sources are unaffected."""
        self.make(None, SipGuard(SipAcl(), RateLimiter(1, 10)))
        for n in range(50):
            self.feed(request("OPTIONS", n), source=("192.0.2.66", 5060))
        self.assertEqual(len(self.responses()), 10)
        self.feed(request("OPTIONS", 100))
        self.assertEqual([r.status for r in self.responses()], [200])
        self.clock.advance(1.0)
        self.feed(request("OPTIONS", 200), source=("192.0.2.66", 5060))
        self.assertEqual([r.status for r in self.responses()], [200])

    def test_made_up_in_dialog_requests_count(self) -> None:
        """Requests whose To tag names no live dialog take tokens (they would only get 481)."""
        self.make(None, SipGuard(SipAcl(), RateLimiter(1, 3)))
        for n in range(6):
            self.feed(request("BYE", n, to_tag="nosuch"))
        self.assertEqual([r.status for r in self.responses()], [481, 481, 481])

    def test_cancel_does_not_count(self) -> None:
        """A CANCEL for a ringing call is processed even when the source's bucket is empty."""
        handler = AutoAnswerHandler(ring=True, answer=False)
        self.make(handler, SipGuard(SipAcl(), RateLimiter(1, 1)))
        self.feed(request("INVITE", 1, body=SDP))
        self.assertEqual([r.status for r in self.responses()], [180])
        self.feed(request("CANCEL", 1, branch="z9hG4bKINVITE1x1"))
        self.assertEqual(sorted(r.status for r in self.responses()), [200, 487])

    def test_trusted_registrar_and_allow_list_bypass(self) -> None:
        """A trusted registrar address and ACL allow-listed sources skip the limit."""
        guard = SipGuard(SipAcl(allow=["10.0.0.0/8", "192.0.2.7"]), RateLimiter(1, 2))
        guard.trust("192.0.2.7")
        self.make(None, guard)
        for n in range(20):
            self.feed(request("OPTIONS", n))  # 10.0.0.2: on the allow list
            self.feed(request("OPTIONS", 100 + n), source=("192.0.2.7", 5060))
        self.assertEqual(len(self.responses()), 40)

    def test_denied_source_never_parsed(self) -> None:
        """The ACL still refuses before parsing: even garbage from a denied source is only counted."""
        guard = SipGuard(SipAcl(deny=["10.0.0.0/8"]), RateLimiter(1, 2))
        self.make(None, guard)
        self.feed(b"OPTIONS garbage\r\n\r\n")
        self.assertEqual((self.responses(), self.stack.counters["parse_errors"], guard.denied), ([], 0, 1))


class MaxCallsTests(StackCase):
    """``[sip_limits] max_calls``: INVITEs beyond get 503 with Retry-After."""

    def test_call_beyond_max_gets_503_retry_after(self) -> None:
        """With max_calls 2 the third concurrent INVITE gets 503, Retry-After and a Reason; it never reaches the handler."""
        handler = AutoAnswerHandler()
        self.make(handler, max_calls=2)
        for n in range(2):
            self.feed(request("INVITE", n, body=SDP))
        self.assertEqual([r.status for r in self.responses()], [200, 200])
        self.feed(request("INVITE", 2, body=SDP))
        (r,) = self.responses()
        self.assertEqual(r.status, 503)
        self.assertEqual(r.headers.get("Retry-After"), "5")
        self.assertEqual(r.headers.get("Reason"), MAX_CALLS_REASON)
        self.assertEqual(len(handler.calls), 2)
        self.assertEqual(self.ua.counters["rejected_max_calls"], 1)

    def test_slot_freed_when_a_call_ends(self) -> None:
        """After one held call hangs up, the next INVITE is answered again."""
        self.make(AutoAnswerHandler(), max_calls=1)
        self.feed(request("INVITE", 0, body=SDP))
        (ok,) = self.responses()
        self.feed(request("ACK", 0, to_tag=ok.to.tag))
        self.feed(request("INVITE", 1, body=SDP))
        self.assertEqual([r.status for r in self.responses()], [503])
        self.feed(request("BYE", 0, to_tag=ok.to.tag, cseq=2))
        self.responses()
        self.feed(request("INVITE", 2, body=SDP))
        self.assertEqual([r.status for r in self.responses()], [200])

    def test_ringing_calls_count_rejected_do_not(self) -> None:
        """Unanswered inbound calls hold a slot; a rejected call gives it back."""
        handler = AutoAnswerHandler(ring=True, answer=False)
        self.make(handler, max_calls=1)
        self.feed(request("INVITE", 0, body=SDP))
        self.feed(request("INVITE", 1, body=SDP))
        self.assertEqual([r.status for r in self.responses()], [180, 503])
        handler.calls[0].reject(486)
        self.assertEqual(self.ua.calls_in_progress(), 0)

    def test_outbound_invite_at_limit_fails_503(self) -> None:
        """Placing a call while max_calls are held fails at once with CallRejected(503); a ringing outbound call counts."""
        self.make(None, max_calls=1)
        first = self.ua.invite("sip:bob@10.0.0.2:5070", "sip:agent@10.0.0.1", sdp=SDP)
        self.assertEqual(self.ua.calls_in_progress(), 1)
        second = self.ua.invite("sip:bob@10.0.0.2:5070", "sip:agent@10.0.0.1", sdp=SDP)
        err = self.failureResultOf(second, CallRejected).value
        self.assertEqual(err.status, 503)
        self.assertNoResult(first)
        first.cancel()
        self.failureResultOf(first)

    def test_unlimited_by_default(self) -> None:
        """Without max_calls nothing is refused."""
        self.make(AutoAnswerHandler())
        for n in range(30):
            self.feed(request("INVITE", n, body=SDP))
        self.assertEqual([r.status for r in self.responses()], [200] * 30)


class MaxPendingInvitesTests(StackCase):
    """``[sip_limits] max_pending_invites`` through the webhook handler: 503 at once, no webhook."""

    def test_invite_beyond_max_pending_gets_503_and_no_webhook(self) -> None:
        """With 2 calls waiting for a client, a third INVITE gets 503 with a Reason and its webhook is never sent."""
        from twisted.internet.defer import Deferred

        from activecall.handlers.pending import TOO_MANY_PENDING_REASON, PendingCalls
        from activecall.handlers.webhook import WebhookCallHandler

        class Notifier:
            def __init__(self) -> None:
                self.payloads: list[dict[str, Any]] = []

            def notify(self, payload: dict[str, Any]) -> Deferred[None]:
                self.payloads.append(payload)
                return Deferred()

        notifier = Notifier()
        pending = PendingCalls(Clock(), accept_timeout_s=60.0, max_pending=2, max_per_source=2)
        self.make(WebhookCallHandler(notifier, pending, Clock()))
        for n in range(3):
            self.feed(request("INVITE", n, body=SDP))
        finals = [r for r in self.responses() if r.status >= 200]
        self.assertEqual([r.status for r in finals], [503])
        self.assertEqual(finals[0].headers.get("Reason"), TOO_MANY_PENDING_REASON)
        self.assertEqual(finals[0].headers.get("Retry-After"), "5")
        self.assertEqual(len(notifier.payloads), 2)
        self.assertEqual(self.ua.calls_in_progress(), 2)


def test_exempt_network_parse() -> None:
    """Sanity: exempt networks given as parsed networks bypass like allow-listed ones."""
    guard = SipGuard(SipAcl(), RateLimiter(1, 1), exempt=(parse_network("198.51.100.0/24"),))
    assert all(guard.admit("198.51.100.9", 0.0).value == "admit" for _ in range(5))


class DatagramBudgetTests(StackCase):
    """A flood of datagrams is dropped per source before it costs a parse."""

    def test_datagram_flood_dropped_before_parse(self) -> None:
        """Past 20x the request burst, a source's datagrams are counted as flooded, not parsed."""
        guard = SipGuard.from_config(SipAclConfig(), SipRateLimitConfig(requests_per_second=5, burst=10))
        self.make(guard=guard)
        for i in range(1000):
            self.feed(request("ACK", i, to_tag="t"), ("192.0.2.66", 5060))
        self.assertEqual(self.stack.counters["flooded"], 800)
        self.assertEqual(guard.flooded, 800)
        # Another source is not affected, and the budget refills with time.
        self.feed(request("OPTIONS", 1), ("192.0.2.67", 5060))
        self.assertEqual(self.stack.counters["flooded"], 800)
        self.clock.advance(10)
        self.feed(request("ACK", 2000, to_tag="t"), ("192.0.2.66", 5060))
        self.assertEqual(self.stack.counters["flooded"], 800)

    def test_garbage_source_muted(self) -> None:
        """A source sending more unparseable messages than the request rate is muted for a second."""
        guard = SipGuard.from_config(SipAclConfig(), SipRateLimitConfig(requests_per_second=5, burst=10))
        self.make(guard=guard)
        for i in range(100):
            self.feed(b"\x16\x03garbage %d" % i, ("192.0.2.66", 5060))
        self.assertEqual(self.stack.counters["parse_errors"], 11)
        self.assertEqual(self.stack.counters["flooded"], 89)
        self.clock.advance(1.5)
        self.feed(request("OPTIONS", 1), ("192.0.2.66", 5060))
        self.assertEqual(self.stack.counters["flooded"], 89)

    def test_trusted_sources_have_no_budget(self) -> None:
        """Allow-listed sources (trunks) are never cut by the datagram budget."""
        guard = SipGuard.from_config(SipAclConfig(allow=(parse_network("10.0.0.0/8"),)),
                                     SipRateLimitConfig(requests_per_second=5, burst=10))
        self.make(guard=guard)
        for i in range(1000):
            self.feed(b"garbage %d" % i, TRUNK)
        self.assertEqual(self.stack.counters["flooded"], 0)


class PendingPerSourceTests(StackCase):
    """Through the user agent and webhook handler, one source gets only its share of pending INVITEs."""

    def test_one_source_share(self) -> None:
        """With max_pending 8 (share 2), the trunk's third waiting INVITE gets 503; another source still gets in."""
        from twisted.internet.defer import Deferred

        from activecall.handlers.pending import PendingCalls
        from activecall.handlers.webhook import WebhookCallHandler

        class Notifier:
            def notify(self, payload: dict[str, Any]) -> Deferred[None]:
                return Deferred()

        pending = PendingCalls(Clock(), accept_timeout_s=60.0, max_pending=8)
        self.make(WebhookCallHandler(Notifier(), pending, Clock()))
        for n in range(3):
            self.feed(request("INVITE", n, body=SDP))
        self.assertEqual([r.status for r in self.responses() if r.status >= 200], [503])
        self.feed(request("INVITE", 7, body=SDP), ("10.0.0.3", 5070))
        self.assertEqual(len(pending), 3)
