"""RFC 3261 §17 transactions driven by an injected clock (no sleeps, no sockets)."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from activecall.ids import IdSource
from activecall.sip.message import SipRequest, SipResponse, make_response, parse_message
from activecall.sip.transaction import (
    AckTimeout,
    Action,
    DeliverRequest,
    DeliverResponse,
    MessageDropped,
    TimerConfig,
    TransactionKey,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimeout,
    Transmit,
    TransportError,
    build_cancel,
)

PEER = ("192.0.2.10", 5060)
CALLER = ("198.51.100.7", 40000)


def request(method: str = "INVITE", branch: str | None = "z9hG4bKabc123", via_host: str = "198.51.100.7",
            rport: bool = False, to_tag: str | None = None, cseq: int = 1, call_id: str = "call-1",
            from_tag: str = "ftag") -> SipRequest:
    """A minimal valid request as a peer would send it."""
    via = f"SIP/2.0/UDP {via_host}:5060" + (f";branch={branch}" if branch else "") + (";rport" if rport else "")
    to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    text = (
        f"{method} sip:bob@example.com SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "Route: <sip:proxy.example.com;lr>\r\n"
        "Max-Forwards: 70\r\n"
        f"From: \"Alice\" <sip:alice@example.com>;tag={from_tag}\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    msg = parse_message(text.encode())
    assert isinstance(msg, SipRequest)
    return msg


def layer() -> TransactionLayer:
    """A layer with seeded ids and default timers."""
    return TransactionLayer(IdSource(random.Random(7)))


def of(actions: list[Action], kind: type) -> list:
    """The actions of one type."""
    return [a for a in actions if isinstance(a, kind)]


def run_until(tl: TransactionLayer, end: float) -> list[tuple[float, Action]]:
    """Advance the clock deadline by deadline up to ``end``, collecting timestamped actions."""
    out: list[tuple[float, Action]] = []
    while (d := tl.deadline()) is not None and d <= end:
        out.extend((d, a) for a in tl.expire(d))
    return out


def reply(req: SipRequest, status: int, to_tag: str | None = "rtag") -> SipResponse:
    """A response as the peer would build it (round-tripped through the parser)."""
    msg = parse_message(make_response(req, status, to_tag=to_tag if status > 100 else None).serialize())
    assert isinstance(msg, SipResponse)
    return msg


class ClientInviteTests(SynchronousTestCase):
    """INVITE client transaction (§17.1.1)."""

    def test_timer_a_doubles_and_timer_b_times_out(self) -> None:
        """Over UDP the INVITE is resent at 0.5, 1.5, 3.5 ... s and Timer B reports a timeout at 64*T1."""
        tl = layer()
        key, first = tl.send_request(request(branch=None), PEER, 0.0)
        self.assertEqual(len(of(first, Transmit)), 1)
        events = run_until(tl, 100.0)
        sends = [t for t, a in events if isinstance(a, Transmit)]
        self.assertEqual(sends, [0.5, 1.5, 3.5, 7.5, 15.5, 31.5])
        timeouts = [(t, a) for t, a in events if isinstance(a, TransactionTimeout)]
        self.assertEqual([(t, a.key) for t, a in timeouts], [(32.0, key)])
        self.assertIn((32.0, TransactionTerminated(key)), events)
        self.assertEqual(len(tl), 0)
        self.assertIsNone(tl.deadline())

    def test_reliable_transport_has_no_timer_a(self) -> None:
        """Over TCP nothing is retransmitted but Timer B still fires at 32 s."""
        tl = layer()
        tl.send_request(request(), PEER, 0.0, reliable=True)
        events = run_until(tl, 100.0)
        self.assertEqual(of([a for _, a in events], Transmit), [])
        self.assertEqual([t for t, a in events if isinstance(a, TransactionTimeout)], [32.0])

    def test_send_request_adds_branch_and_rport(self) -> None:
        """Our requests get a magic-cookie branch and an empty rport in the top Via."""
        tl = layer()
        req = request(branch=None)
        key, actions = tl.send_request(req, PEER, 0.0)
        via = req.top_via
        self.assertTrue(via.branch and via.branch.startswith("z9hG4bK") and len(via.branch) > 7)
        self.assertTrue(via.has_rport)
        self.assertEqual(key.branch, via.branch)
        sent = parse_message(of(actions, Transmit)[0].data)
        self.assertEqual(sent.top_via.branch, via.branch)

    def test_provisional_stops_retransmission_and_timer_b(self) -> None:
        """After a 180 there are no more retransmissions and no timeout."""
        tl = layer()
        req = request()
        key, _ = tl.send_request(req, PEER, 0.0)
        actions = tl.receive(reply(req, 180), PEER, 0.2)
        self.assertEqual([type(a) for a in actions], [DeliverResponse])
        self.assertEqual(run_until(tl, 500.0), [])
        self.assertIsNotNone(tl.client_transaction(key))

    def test_non2xx_generates_ack(self) -> None:
        """A 486 is acknowledged by the transaction with the §17.1.1.3 ACK, and its retransmission re-sends that ACK only."""
        tl = layer()
        req = request()
        key, _ = tl.send_request(req, PEER, 0.0)
        resp = reply(req, 486)
        actions = tl.receive(resp, PEER, 1.0)
        self.assertEqual([type(a) for a in actions], [Transmit, DeliverResponse])
        ack = parse_message(of(actions, Transmit)[0].data)
        assert isinstance(ack, SipRequest)
        self.assertEqual(ack.method, "ACK")
        self.assertEqual(str(ack.uri), str(req.uri))
        self.assertEqual(ack.top_via.branch, req.top_via.branch)
        self.assertEqual(len(ack.vias), 1)
        self.assertEqual(ack.to.tag, "rtag")
        self.assertEqual(ack.from_.tag, "ftag")
        self.assertEqual(ack.call_id, req.call_id)
        self.assertEqual((ack.cseq.seq, ack.cseq.method), (1, "ACK"))
        self.assertEqual(ack.headers.get_all("Route"), ["<sip:proxy.example.com;lr>"])
        again = tl.receive(resp, PEER, 2.0)
        self.assertEqual([type(a) for a in again], [Transmit])
        self.assertEqual(again[0].data, actions[0].data)  # type: ignore[union-attr]
        # Timer D: 32 s after the final response, then gone.
        events = run_until(tl, 100.0)
        self.assertEqual(events, [(33.0, TransactionTerminated(key))])

    def test_timer_d_zero_on_reliable(self) -> None:
        """Over TCP Timer D is zero, so the transaction ends at once."""
        tl = layer()
        req = request()
        key, _ = tl.send_request(req, PEER, 0.0, reliable=True)
        tl.receive(reply(req, 603), PEER, 1.0)
        self.assertEqual(tl.deadline(), 1.0)
        self.assertEqual(tl.expire(1.0), [TransactionTerminated(key)])

    def test_2xx_goes_to_tu_including_retransmissions(self) -> None:
        """2xx responses (and their retransmissions) reach the TU, which ACKs them; Timer M ends the transaction."""
        tl = layer()
        req = request()
        key, _ = tl.send_request(req, PEER, 0.0)
        ok = reply(req, 200)
        self.assertEqual([type(a) for a in tl.receive(ok, PEER, 1.0)], [DeliverResponse])
        self.assertEqual([type(a) for a in tl.receive(ok, PEER, 1.5)], [DeliverResponse])
        self.assertEqual(run_until(tl, 100.0), [(33.0, TransactionTerminated(key))])

    def test_stray_response_dropped(self) -> None:
        """A response matching no transaction is dropped."""
        tl = layer()
        actions = tl.receive(reply(request(), 200), PEER, 0.0)
        self.assertEqual([type(a) for a in actions], [MessageDropped])

    def test_cancel_is_its_own_transaction(self) -> None:
        """A CANCEL built for an INVITE shares its branch but is a separate non-INVITE transaction."""
        tl = layer()
        req = request()
        invite_key, _ = tl.send_request(req, PEER, 0.0)
        tl.receive(reply(req, 180), PEER, 0.1)
        cancel = build_cancel(req)
        self.assertEqual((cancel.cseq.seq, cancel.cseq.method), (1, "CANCEL"))
        self.assertEqual(cancel.to.tag, None)
        cancel_key, _ = tl.send_request(cancel, PEER, 0.2)
        self.assertEqual(cancel_key.branch, invite_key.branch)
        self.assertNotEqual(cancel_key, invite_key)
        delivered = tl.receive(reply(cancel, 200), PEER, 0.3)
        self.assertEqual(of(delivered, DeliverResponse)[0].client_txn_key, cancel_key)
        delivered = tl.receive(reply(req, 487), PEER, 0.4)
        self.assertEqual(of(delivered, DeliverResponse)[0].client_txn_key, invite_key)

    def test_transport_error(self) -> None:
        """A send failure reported by the adapter ends the transaction with TransportError."""
        tl = layer()
        key, _ = tl.send_request(request(), PEER, 0.0)
        actions = tl.transport_failed(key)
        self.assertEqual([type(a) for a in actions], [TransportError, TransactionTerminated])
        self.assertIsNone(tl.deadline())


class ClientNonInviteTests(SynchronousTestCase):
    """Non-INVITE client transaction (§17.1.2)."""

    def test_timer_e_caps_at_t2_and_f_times_out(self) -> None:
        """Timer E doubles from T1 up to T2 (4 s) and Timer F times out at 64*T1."""
        tl = layer()
        tl.send_request(request("OPTIONS"), PEER, 0.0)
        events = run_until(tl, 100.0)
        sends = [t for t, a in events if isinstance(a, Transmit)]
        self.assertEqual(sends, [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5])
        self.assertEqual([t for t, a in events if isinstance(a, TransactionTimeout)], [32.0])

    def test_proceeding_retransmits_every_t2(self) -> None:
        """After a provisional, retransmissions come every T2."""
        tl = layer()
        req = request("BYE", to_tag="x")
        tl.send_request(req, PEER, 0.0)
        tl.receive(reply(req, 100), PEER, 0.1)
        events = run_until(tl, 20.0)
        sends = [t for t, a in events if isinstance(a, Transmit)]
        self.assertEqual(sends, [0.5, 4.5, 8.5, 12.5, 16.5])

    def test_final_then_timer_k(self) -> None:
        """A final response is delivered once; retransmissions are absorbed; Timer K (T4) ends it."""
        tl = layer()
        req = request("REGISTER")
        key, _ = tl.send_request(req, PEER, 0.0)
        resp = reply(req, 401)
        self.assertEqual([type(a) for a in tl.receive(resp, PEER, 0.3)], [DeliverResponse])
        self.assertEqual([type(a) for a in tl.receive(resp, PEER, 0.4)], [MessageDropped])
        self.assertEqual(run_until(tl, 100.0), [(5.3, TransactionTerminated(key))])


class ServerInviteTests(SynchronousTestCase):
    """INVITE server transaction (§17.2.1) with RFC 6026 Accepted state."""

    def setUp(self) -> None:
        self.tl = layer()
        self.req = request()
        actions = self.tl.receive(self.req, CALLER, 0.0)
        (deliver,) = of(actions, DeliverRequest)
        self.key = deliver.server_txn_key
        assert self.key is not None

    def test_trying_after_200ms(self) -> None:
        """If the TU is silent for 200 ms the transaction sends 100 Trying without a To tag."""
        actions = self.tl.expire(0.2)
        (sent,) = of(actions, Transmit)
        trying = parse_message(sent.data)
        assert isinstance(trying, SipResponse)
        self.assertEqual(trying.status, 100)
        self.assertIsNone(trying.to.tag)
        self.assertEqual(sent.addr, ("198.51.100.7", 5060))

    def test_retransmitted_invite_resends_last_provisional(self) -> None:
        """A retransmitted INVITE is absorbed and the last provisional response is re-sent."""
        assert self.key is not None
        self.assertEqual(of(self.tl.receive(request(), CALLER, 0.1), DeliverRequest), [])
        ringing = make_response(self.req, 180, to_tag="tt")
        self.tl.send_response(self.key, ringing, 0.3)
        actions = self.tl.receive(request(), CALLER, 0.5)
        self.assertEqual([type(a) for a in actions], [Transmit])
        self.assertEqual(actions[0].data, ringing.serialize())  # type: ignore[union-attr]

    def test_final_retransmitted_by_timer_g_until_h(self) -> None:
        """A 486 is resent at T1 doubling to T2 and Timer H reports the missing ACK at 64*T1."""
        assert self.key is not None
        self.tl.send_response(self.key, make_response(self.req, 486, to_tag="tt"), 0.0)
        events = run_until(self.tl, 100.0)
        sends = [t for t, a in events if isinstance(a, Transmit)]
        self.assertEqual(sends, [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5])
        self.assertEqual([t for t, a in events if isinstance(a, TransactionTimeout)], [32.0])

    def test_ack_confirms_then_timer_i(self) -> None:
        """The ACK to a 486 is absorbed, stops Timer G, and Timer I (T4) ends the transaction."""
        assert self.key is not None
        final = make_response(self.req, 486, to_tag="tt")
        self.tl.send_response(self.key, final, 0.0)
        self.assertEqual(self.tl.receive(request(), CALLER, 0.1)[0].data, final.serialize())  # type: ignore[union-attr]
        ack = request("ACK", to_tag="tt")
        self.assertEqual([type(a) for a in self.tl.receive(ack, CALLER, 0.2)], [MessageDropped])
        self.assertEqual(run_until(self.tl, 100.0), [(5.2, TransactionTerminated(self.key))])

    def test_2xx_retransmitted_until_ack(self) -> None:
        """A 200 is resent (T1 doubling) until the ACK with a new branch arrives; that ACK goes to the TU."""
        assert self.key is not None
        self.tl.send_response(self.key, make_response(self.req, 200, to_tag="tt"), 0.0)
        early = run_until(self.tl, 2.0)
        self.assertEqual([t for t, a in early if isinstance(a, Transmit)], [0.5, 1.5])
        ack = request("ACK", branch="z9hG4bKnewbranch", to_tag="tt")
        actions = self.tl.receive(ack, CALLER, 2.1)
        (deliver,) = of(actions, DeliverRequest)
        self.assertIsNone(deliver.server_txn_key)
        self.assertEqual(deliver.request.method, "ACK")
        later = run_until(self.tl, 100.0)
        self.assertEqual(later, [(32.0, TransactionTerminated(self.key))])

    def test_2xx_without_ack(self) -> None:
        """With no ACK for the 200 the layer reports AckTimeout at 64*T1 so the TU can send BYE."""
        assert self.key is not None
        self.tl.send_response(self.key, make_response(self.req, 200, to_tag="tt"), 0.0)
        events = [a for _, a in run_until(self.tl, 100.0)]
        self.assertEqual([type(a) for a in events if not isinstance(a, Transmit)],
                         [AckTimeout, TransactionTerminated])

    def test_cancel_matches_pending_invite(self) -> None:
        """A CANCEL with the INVITE's branch is delivered with the INVITE's key (§9.2)."""
        cancel = build_cancel(request())
        actions = self.tl.receive(parse_message(cancel.serialize()), CALLER, 0.5)  # type: ignore[arg-type]
        (deliver,) = of(actions, DeliverRequest)
        self.assertEqual(deliver.cancels, self.key)
        self.assertEqual(deliver.request.method, "CANCEL")
        assert deliver.server_txn_key is not None
        self.assertEqual(deliver.server_txn_key.method, "CANCEL")

    def test_cancel_after_final_gets_200(self) -> None:
        """A CANCEL arriving after the final response is answered 200 by the layer and not delivered."""
        assert self.key is not None
        self.tl.send_response(self.key, make_response(self.req, 486, to_tag="tt"), 0.0)
        actions = self.tl.receive(build_cancel(request()), CALLER, 0.1)
        self.assertEqual(of(actions, DeliverRequest), [])
        resp = parse_message(of(actions, Transmit)[0].data)
        assert isinstance(resp, SipResponse)
        self.assertEqual((resp.status, resp.cseq.method, resp.to.tag), (200, "CANCEL", "tt"))

    def test_merged_request_gets_482(self) -> None:
        """The same INVITE arriving by another path (new branch, no To tag) is answered 482 (§8.2.2.2)."""
        merged = request(branch="z9hG4bKotherpath", via_host="203.0.113.5")
        actions = self.tl.receive(merged, ("203.0.113.5", 5060), 0.1)
        self.assertEqual(of(actions, DeliverRequest), [])
        resp = parse_message(of(actions, Transmit)[0].data)
        assert isinstance(resp, SipResponse)
        self.assertEqual(resp.status, 482)
        self.assertEqual(of(actions, Transmit)[0].addr, ("203.0.113.5", 5060))


class ServerNonInviteTests(SynchronousTestCase):
    """Non-INVITE server transaction (§17.2.2), CANCEL and Via handling."""

    def test_retransmission_and_timer_j(self) -> None:
        """Before a response retransmissions are absorbed; after it they get the final again; Timer J ends it."""
        tl = layer()
        req = request("OPTIONS")
        (deliver,) = of(tl.receive(req, CALLER, 0.0), DeliverRequest)
        key = deliver.server_txn_key
        assert key is not None
        self.assertEqual([type(a) for a in tl.receive(request("OPTIONS"), CALLER, 0.1)], [MessageDropped])
        ok = make_response(req, 200, to_tag="t")
        tl.send_response(key, ok, 1.0)
        self.assertEqual(tl.receive(request("OPTIONS"), CALLER, 2.0)[0].data, ok.serialize())  # type: ignore[union-attr]
        self.assertEqual(run_until(tl, 100.0), [(33.0, TransactionTerminated(key))])

    def test_timer_j_zero_on_reliable(self) -> None:
        """Over TCP Timer J is zero."""
        tl = layer()
        req = request("OPTIONS")
        (deliver,) = of(tl.receive(req, CALLER, 0.0, reliable=True), DeliverRequest)
        assert deliver.server_txn_key is not None
        tl.send_response(deliver.server_txn_key, make_response(req, 200, to_tag="t"), 1.0)
        self.assertEqual(tl.deadline(), 1.0)

    def test_unmatched_cancel_gets_481(self) -> None:
        """A CANCEL matching no INVITE is answered 481 by the layer."""
        tl = layer()
        actions = tl.receive(build_cancel(request()), CALLER, 0.0)
        self.assertEqual(of(actions, DeliverRequest), [])
        resp = parse_message(of(actions, Transmit)[0].data)
        assert isinstance(resp, SipResponse)
        self.assertEqual(resp.status, 481)

    def test_rport_and_received(self) -> None:
        """With rport the Via gets received and rport filled in and responses go to the source address."""
        tl = layer()
        req = request("OPTIONS", rport=True, via_host="10.0.0.2")
        (deliver,) = of(tl.receive(req, ("203.0.113.9", 61000), 0.0), DeliverRequest)
        via = deliver.request.top_via
        self.assertEqual((via.received, via.rport), ("203.0.113.9", 61000))
        assert deliver.server_txn_key is not None
        actions = tl.send_response(deliver.server_txn_key, make_response(deliver.request, 200, to_tag="t"), 0.1)
        self.assertEqual(actions[0].addr, ("203.0.113.9", 61000))  # type: ignore[union-attr]
        sent = parse_message(actions[0].data)  # type: ignore[union-attr]
        self.assertEqual(sent.top_via.rport, 61000)

    def test_received_without_rport(self) -> None:
        """Without rport a differing source gets a received param and responses go to received:sent-by-port."""
        tl = layer()
        req = request("OPTIONS", via_host="10.0.0.2")
        (deliver,) = of(tl.receive(req, ("203.0.113.9", 61000), 0.0), DeliverRequest)
        self.assertEqual(deliver.request.top_via.received, "203.0.113.9")
        self.assertIsNone(deliver.request.top_via.rport)
        assert deliver.server_txn_key is not None
        actions = tl.send_response(deliver.server_txn_key, make_response(deliver.request, 200, to_tag="t"), 0.1)
        self.assertEqual(actions[0].addr, ("203.0.113.9", 5060))  # type: ignore[union-attr]

    def test_rfc2543_matching(self) -> None:
        """A request without a magic-cookie branch is matched by its identifying fields, so its retransmission is absorbed."""
        tl = layer()
        req = request(branch=None)
        (deliver,) = of(tl.receive(req, CALLER, 0.0), DeliverRequest)
        key = deliver.server_txn_key
        assert key is not None
        self.assertTrue(key.branch.startswith("2543:"))
        self.assertEqual(of(tl.receive(request(branch=None), CALLER, 0.1), DeliverRequest), [])
        tl.send_response(key, make_response(req, 404, to_tag="tt"), 0.2)
        ack = tl.receive(request("ACK", branch=None, to_tag="tt"), CALLER, 0.3)
        self.assertEqual([type(a) for a in ack], [MessageDropped])
        self.assertEqual(tl.server_transaction(key).state, "confirmed")  # type: ignore[union-attr]

    def test_bad_datagram_answered_400(self) -> None:
        """An unparseable request with a Via is answered 400 statelessly; a bad response is only dropped."""
        tl = layer()
        bad = request("OPTIONS").serialize().replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE")
        actions = tl.receive_datagram(bad, CALLER, 0.0)
        resp = parse_message(of(actions, Transmit)[0].data)
        assert isinstance(resp, SipResponse)
        self.assertEqual(resp.status, 400)
        self.assertEqual(of(actions, Transmit)[0].addr, ("198.51.100.7", 5060))
        dropped = tl.receive_datagram(b"SIP/2.0 999999 nope\r\n\r\n", CALLER, 0.0)
        self.assertEqual([type(a) for a in dropped], [MessageDropped])
        self.assertEqual([type(a) for a in tl.receive_datagram(b"\x00\xff garbage", CALLER, 0.0)],
                         [MessageDropped])

    def test_custom_timers(self) -> None:
        """T1/T2 come from TimerConfig, e.g. a 1 s T1 makes Timer F fire at 64 s."""
        tl = TransactionLayer(IdSource(random.Random(1)), TimerConfig(t1=1.0, t2=4.0, t4=5.0))
        tl.send_request(request("OPTIONS"), PEER, 0.0)
        events = run_until(tl, 100.0)
        self.assertEqual([t for t, a in events if isinstance(a, TransactionTimeout)], [64.0])

    def test_keys_are_distinct_by_method(self) -> None:
        """Server keys treat ACK as INVITE but keep CANCEL apart (§17.2.3)."""
        self.assertNotEqual(TransactionKey("b", "h", "INVITE", True), TransactionKey("b", "h", "CANCEL", True))


class TimerHeapTests(SynchronousTestCase):
    """Timers of many transactions fire in due order from one heap; ended transactions leave nothing behind."""

    def test_timers_of_many_transactions_fire_in_due_order(self) -> None:
        """Client INVITEs started at different times retransmit in global time order."""
        tl = layer()
        keys = [tl.send_request(request(branch=None, call_id=f"c{i}"), PEER, i * 0.1)[0] for i in range(5)]
        events = run_until(tl, 2.0)
        sends = [(t, a.key) for t, a in events if isinstance(a, Transmit)]
        self.assertEqual([t for t, _ in sends], sorted(t for t, _ in sends))
        self.assertEqual(sends[:5], [(0.5 + i * 0.1, keys[i]) for i in range(5)])

    def test_cancelled_timer_never_fires_and_deadline_moves_on(self) -> None:
        """A 1xx stops Timer A and B: the deadline becomes the next live timer, not the cancelled one."""
        tl = layer()
        key, _ = tl.send_request(request(branch=None, call_id="a"), PEER, 0.0)
        other, _ = tl.send_request(request(branch=None, call_id="b"), PEER, 0.2)
        sent = tl.client_transaction(key).request  # type: ignore[union-attr]
        tl.receive(reply(sent, 180), PEER, 0.1)
        self.assertEqual(tl.deadline(), 0.7)  # the other INVITE's Timer A; key's 0.5 is gone
        events = run_until(tl, 40.0)
        self.assertEqual({a.key for _, a in events if isinstance(a, Transmit)}, {other})

    def test_ended_transactions_leave_no_index_or_timer_entries(self) -> None:
        """After answered INVITEs and BYEs have run out their timers, every index and the heap are empty."""
        tl = layer()
        for i in range(20):
            invite = request(call_id=f"call-{i}", branch=f"z9hG4bKi{i}")
            key = next(a.server_txn_key for a in tl.receive(invite, CALLER, 0.0) if isinstance(a, DeliverRequest))
            tl.send_response(key, make_response(invite, 200, to_tag="t"), 0.0)
            ack = request("ACK", call_id=f"call-{i}", branch=f"z9hG4bKa{i}", to_tag="t")
            tl.receive(ack, CALLER, 0.01)
            bye = request("BYE", call_id=f"call-{i}", branch=f"z9hG4bKb{i}", to_tag="t", cseq=2)
            bye_key = next(a.server_txn_key for a in tl.receive(bye, CALLER, 0.02) if isinstance(a, DeliverRequest))
            tl.send_response(bye_key, make_response(bye, 200), 0.02)
        run_until(tl, 100.0)
        self.assertEqual(len(tl), 0)
        self.assertIsNone(tl.deadline())
        self.assertEqual((tl._merge_index, tl._awaiting_ack, tl._merge_ident, tl._ack_ident, tl._heap),
                         ({}, {}, {}, {}, []))
