"""Unit tests for the SIP user agent over a memory UDP transport and a Clock."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.ids import IdSource
from activecall.sip.auth import check_authorization
from activecall.sip.dialog import set_direction
from activecall.sip.message import Headers, SipRequest, SipResponse, parse_message
from activecall.sdp.model import parse_sdp
from activecall.sip.transport import SipDatagramProtocol, SipStack
from activecall.sip.uri import parse_uri
from activecall.sip.useragent import SHUTTING_DOWN_REASON, CallRejected, InboundCall, OutboundCall, SipUserAgent
from activecall.testing_sip import AutoAnswerHandler, MemoryDatagramTransport, RecordingListener, minimal_sdp

PEER = ("10.0.0.2", 5070)
SDP = minimal_sdp("10.0.0.2").decode()


def req(method: str, *, to_tag: str | None = None, from_tag: str = "ftag1", cseq: int = 1,
        call_id: str = "call-1", branch: str = "z9hG4bKpeer1", body: str = "",
        extra: str = "", cseq_method: str | None = None) -> bytes:
    """A request from the peer at 10.0.0.2:5070."""
    to = "<sip:agent@10.0.0.1:5060>" + (f";tag={to_tag}" if to_tag else "")
    ctype = "Content-Type: application/sdp\r\n" if body and "Content-Type" not in extra else ""
    return (
        f"{method} sip:agent@10.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.2:5070;branch={branch};rport\r\n"
        f"From: <sip:alice@10.0.0.2>;tag={from_tag}\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {cseq_method or method}\r\n"
        f"Contact: <sip:alice@10.0.0.2:5070>\r\n"
        f"Max-Forwards: 70\r\n{extra}{ctype}"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def reply(request: SipRequest, status: int, *, to_tag: str | None = "rtag9", body: str = "",
          extra: list[tuple[str, str]] | None = None, via_params: str = "") -> bytes:
    """The peer's response to one of our requests."""
    headers = Headers()
    for name, value in request.headers:
        lname = name.lower()
        if lname == "via":
            headers.add(name, value + via_params)
        elif lname in ("from", "call-id", "cseq"):
            headers.add(name, value)
        elif lname == "to":
            headers.add(name, value + (f";tag={to_tag}" if to_tag and "tag=" not in value else ""))
    headers.add("Contact", "<sip:bob@10.0.0.2:5070>")
    for name, value in extra or []:
        headers.add(name, value)
    if body:
        headers.add("Content-Type", "application/sdp")
    return SipResponse(status, "Whatever", headers, body.encode()).serialize()


class UaTestCase(SynchronousTestCase):
    """Shared fixture: a UA on a memory UDP transport at 10.0.0.1:5060."""

    def make(self, handler: Any = None, **kwargs: Any) -> None:
        self.clock = Clock()
        self.ids = IdSource(random.Random(7))
        self.stack = SipStack(self.clock, self.ids, shards=4)
        self.ua = SipUserAgent(self.stack, ids=self.ids, handler=handler, useragent="test-ua", **kwargs)
        self.proto = SipDatagramProtocol(self.stack)
        self.transport = MemoryDatagramTransport(("10.0.0.1", 5060))
        self.proto.makeConnection(self.transport)  # type: ignore[arg-type]
        self.stack.add_listener("udp", "10.0.0.1", 5060, self.proto)

    def feed(self, data: bytes, source: tuple[str, int] = PEER) -> None:
        self.proto.datagramReceived(data, source)

    def sent(self) -> list[SipRequest | SipResponse]:
        out = [parse_message(data) for data, _ in self.transport.written]
        self.transport.written.clear()
        return out

    def one(self) -> Any:
        msgs = self.sent()
        self.assertEqual(len(msgs), 1, msgs)
        return msgs[0]


class OutOfDialogTests(UaTestCase):
    """config.md §5 behaviour for requests outside any dialog."""

    def test_no_handler_503(self) -> None:
        """Without a handler an INVITE gets 503 with the configured Reason."""
        self.make()
        self.feed(req("INVITE", body=SDP))
        r = self.one()
        self.assertEqual(r.status, 503)
        self.assertEqual(r.headers.get("Reason"), 'SIP;cause=503;text="No invite handler configured"')
        self.assertEqual(r.headers.get("Server"), "test-ua")
        self.assertIsNotNone(r.to.tag)

    def test_options_200(self) -> None:
        """OPTIONS is answered 200 with Allow and Accept, sent back to the rport address."""
        self.make()
        self.feed(req("OPTIONS"), source=("192.0.2.9", 40000))
        (data, addr), = self.transport.written
        r = parse_message(data)
        self.assertEqual(r.status, 200)
        self.assertIn("INVITE", r.headers.get("Allow"))
        self.assertEqual(r.headers.get("Accept"), "application/sdp")
        self.assertEqual(addr, ("192.0.2.9", 40000))

    def test_options_disabled(self) -> None:
        """With enable_options_response false OPTIONS gets no response and leaves no transaction."""
        self.make(enable_options_response=False)
        self.feed(req("OPTIONS"))
        self.assertEqual(self.sent(), [])
        self.assertEqual(self.stack.transactions, 0)

    def test_refer_400_message_200(self) -> None:
        """Out-of-dialog REFER gets 400, other methods 200."""
        self.make()
        self.feed(req("REFER", branch="z9hG4bK1"))
        self.feed(req("MESSAGE", branch="z9hG4bK2", body="hi", extra="Content-Type: text/plain\r\n"))
        self.assertEqual([m.status for m in self.sent()], [400, 200])

    def test_unknown_dialog_481(self) -> None:
        """An in-dialog request that matches no dialog gets 481."""
        self.make()
        self.feed(req("BYE", to_tag="nope"))
        self.assertEqual(self.one().status, 481)

    def test_garbage_is_dropped(self) -> None:
        """A datagram that is not SIP is counted and dropped without raising."""
        self.make()
        self.feed(b"\x16\x03\x01garbage")
        self.assertEqual(self.sent(), [])
        self.assertEqual(self.stack.counters["parse_errors"], 1)

    def test_bad_request_400(self) -> None:
        """A request with a bad Max-Forwards but a Via is answered 400."""
        self.make()
        self.feed(req("OPTIONS").replace(b"Max-Forwards: 70", b"Max-Forwards: many"))
        self.assertEqual(self.one().status, 400)

    def test_require_100rel_420(self) -> None:
        """An INVITE requiring an extension we lack gets 420 with Unsupported."""
        self.make(AutoAnswerHandler())
        self.feed(req("INVITE", body=SDP, extra="Require: 100rel\r\n"))
        r = self.one()
        self.assertEqual(r.status, 420)
        self.assertEqual(r.headers.get("Unsupported"), "100rel")


class DrainTests(UaTestCase):
    """A draining node (docs/cluster.md) answers OPTIONS and new INVITEs 503; its dialogs go on."""

    def test_options_503_while_draining(self) -> None:
        """After start_draining an out-of-dialog OPTIONS gets 503 with the shutting-down Reason, not 200."""
        self.make(AutoAnswerHandler())
        self.feed(req("OPTIONS", branch="z9hG4bKo1"))
        self.assertEqual(self.one().status, 200)
        self.assertFalse(self.ua.draining)
        self.ua.start_draining()
        self.assertTrue(self.ua.draining)
        self.feed(req("OPTIONS", branch="z9hG4bKo2", call_id="probe-2"))
        r = self.one()
        self.assertEqual(r.status, 503)
        self.assertEqual(r.headers.get("Reason"), SHUTTING_DOWN_REASON)
        self.assertEqual(r.headers.get("Server"), "test-ua")
        self.assertIsNotNone(r.to.tag)

    def test_new_invite_503_before_the_handler(self) -> None:
        """A new INVITE while draining gets 503 "Server shutting down" and never reaches the handler."""
        handler = AutoAnswerHandler()
        self.make(handler)
        self.ua.start_draining()
        self.feed(req("INVITE", body=SDP))
        r = self.one()
        self.assertEqual(r.status, 503)
        self.assertEqual(r.headers.get("Reason"), SHUTTING_DOWN_REASON)
        self.assertEqual(handler.calls, [])
        self.assertEqual(self.ua.counters["rejected_503"], 1)
        self.assertEqual(self.ua.dialogs(), [])

    def test_only_start_draining_drains(self) -> None:
        """The drain state is the user agent's own: a handler attribute named draining is not read."""
        handler = AutoAnswerHandler()
        self.make(handler)
        handler.draining = True  # type: ignore[attr-defined]
        self.assertFalse(self.ua.draining)
        self.feed(req("OPTIONS", branch="z9hG4bKo1"))
        self.assertEqual(self.one().status, 200)
        self.ua.start_draining()
        self.assertTrue(self.ua.draining)
        self.feed(req("OPTIONS", branch="z9hG4bKo2", call_id="probe-2"))
        self.assertEqual(self.one().status, 503)

    def test_established_call_goes_on(self) -> None:
        """A call answered before the drain keeps working: in-dialog OPTIONS 200, re-INVITE answered, BYE 200."""
        handler = AutoAnswerHandler()
        self.make(handler)
        self.feed(req("INVITE", body=SDP))
        ok = self.one()
        self.assertEqual(ok.status, 200)
        self.feed(req("ACK", to_tag=ok.to.tag))
        self.ua.start_draining()
        self.feed(req("OPTIONS", to_tag=ok.to.tag, cseq=2, branch="z9hG4bKin1"))
        self.assertEqual(self.one().status, 200)
        self.feed(req("INVITE", to_tag=ok.to.tag, cseq=3, branch="z9hG4bKre1", body=SDP))
        reinvite_ok = self.one()
        self.assertEqual((reinvite_ok.status, reinvite_ok.cseq.method), (200, "INVITE"))
        self.feed(req("ACK", to_tag=ok.to.tag, cseq=3, branch="z9hG4bKre2"))
        self.feed(req("BYE", to_tag=ok.to.tag, cseq=4, branch="z9hG4bKbye"))
        self.assertEqual(self.one().status, 200)
        self.assertEqual(handler.calls[0].listener.names()[-2:], ["bye", "terminated"])  # type: ignore[union-attr]
        self.assertEqual(self.ua.dialogs(), [])

    def test_options_disabled_stays_silent(self) -> None:
        """With enable_options_response false a draining node still sends nothing to OPTIONS."""
        self.make(AutoAnswerHandler(), enable_options_response=False)
        self.ua.start_draining()
        self.feed(req("OPTIONS"))
        self.assertEqual(self.sent(), [])


class InboundCallTests(UaTestCase):
    """UAS INVITE handling."""

    def setUp(self) -> None:
        self.handler = AutoAnswerHandler(answer=False)
        self.make(self.handler)

    def invite(self, **kw: Any) -> InboundCall:
        self.feed(req("INVITE", body=SDP, **kw))
        (call,) = self.handler.calls
        return call

    def test_answer_ack_bye(self) -> None:
        """ringing → 180, answer → 200 with SDP and Contact, ACK fires answer, BYE ends the call."""
        call = self.invite()
        listener = call.listener
        assert isinstance(listener, RecordingListener)
        self.assertEqual(call.remote_sdp, SDP.encode())
        call.ringing()
        self.assertEqual(self.one().status, 180)
        d = call.answer(minimal_sdp())
        ok = self.one()
        self.assertEqual(ok.status, 200)
        self.assertEqual(ok.body, minimal_sdp())
        self.assertEqual(ok.headers.get("Contact"), "<sip:10.0.0.1:5060>")
        self.assertEqual(ok.to.tag, call.to_tag)
        self.assertEqual(call.dialog_id, f"call-1-{max(call.to_tag, 'ftag1')}-{min(call.to_tag, 'ftag1')}")
        self.assertNoResult(d)
        self.feed(req("ACK", to_tag=call.to_tag))
        self.assertIs(self.successResultOf(d), call)
        self.feed(req("BYE", to_tag=call.to_tag, cseq=2, branch="z9hG4bKbye"))
        self.assertEqual(self.one().status, 200)
        self.assertEqual(listener.names(), ["bye", "terminated"])
        self.assertEqual(listener.events[-1][1], "bye-received")
        self.assertEqual(self.ua.dialogs(), [])

    def test_record_route_copied_into_dialog_responses(self) -> None:
        """180 and 200 carry the INVITE's Record-Route values in order (§12.1.1); our BYE follows them as Route."""
        rr = "Record-Route: <sip:10.0.0.9:5060;lr>\r\nRecord-Route: <sip:10.0.0.8;lr;ftag=x>, <sip:10.0.0.7;lr>\r\n"
        call = self.invite(extra=rr)
        call.ringing()
        call.answer(minimal_sdp())
        ringing, ok = self.sent()
        want = ["<sip:10.0.0.9:5060;lr>", "<sip:10.0.0.8;lr;ftag=x>, <sip:10.0.0.7;lr>"]
        for response in (ringing, ok):
            self.assertEqual(response.headers.get_all("Record-Route"), want)
        self.feed(req("ACK", to_tag=call.to_tag))
        call.bye()
        (bye,) = self.sent()
        self.assertEqual(bye.headers.get_all("Route")[0], "<sip:10.0.0.9:5060;lr>")

    def test_no_record_route_in_a_rejection(self) -> None:
        """A final non-2xx answer establishes nothing and carries no Record-Route."""
        call = self.invite(extra="Record-Route: <sip:10.0.0.9;lr>\r\n")
        call.reject(486)
        self.assertEqual(self.one().headers.get_all("Record-Route"), [])

    def test_200_retransmitted_until_ack(self) -> None:
        """The 2xx is resent on T1 doubling until the ACK arrives, then stops."""
        call = self.invite()
        call.answer(minimal_sdp())
        self.sent()
        self.clock.advance(0.5)
        self.assertEqual(self.one().status, 200)
        self.clock.advance(1.0)
        self.assertEqual(self.one().status, 200)
        self.feed(req("ACK", to_tag=call.to_tag))
        self.clock.advance(4.0)
        self.assertEqual(self.sent(), [])

    def test_no_ack_sends_bye(self) -> None:
        """Without an ACK for 64*T1 the answer errbacks 408 and a BYE is sent."""
        call = self.invite()
        d = call.answer(minimal_sdp())
        self.clock.pump([1.0] * 40)
        self.failureResultOf(d, CallRejected)
        requests = [m for m in self.sent() if isinstance(m, SipRequest)]
        self.assertEqual({m.method for m in requests}, {"BYE"})  # BYE and its Timer E resends
        self.assertIn(("terminated", "ack-timeout"), call.listener.events)  # type: ignore[union-attr]

    def test_cancel(self) -> None:
        """CANCEL gets 200, the INVITE 487, and the listener hears on_cancel then terminated."""
        call = self.invite()
        call.ringing()
        self.sent()
        self.feed(req("CANCEL"))
        statuses = sorted((m.cseq.method, m.status) for m in self.sent())
        self.assertEqual(statuses, [("CANCEL", 200), ("INVITE", 487)])
        self.assertEqual(call.listener.names(), ["cancel", "terminated"])  # type: ignore[union-attr]
        self.failureResultOf(call.answer(minimal_sdp()), CallRejected)

    def test_reject(self) -> None:
        """reject(486) sends 486 and forgets the dialog."""
        call = self.invite()
        call.reject(486)
        self.assertEqual(self.one().status, 486)
        self.assertEqual(self.ua.dialogs(), [])

    def answered(self) -> InboundCall:
        call = self.invite()
        call.answer(minimal_sdp())
        self.feed(req("ACK", to_tag=call.to_tag))
        self.sent()
        return call

    def test_reinvite_hold_default_answer(self) -> None:
        """A sendonly re-INVITE is answered recvonly from our SDP when the listener returns None."""
        call = self.answered()
        offer = set_direction(SDP.encode(), "sendonly").decode()
        self.feed(req("INVITE", to_tag=call.to_tag, cseq=2, branch="z9hG4bKre", body=offer))
        ok = self.one()
        self.assertEqual(ok.status, 200)
        answer = parse_sdp(ok.body)
        self.assertEqual(answer.direction(answer.media[0]), "recvonly")
        self.assertEqual(call.listener.names(), ["reinvite"])  # type: ignore[union-attr]
        self.assertEqual(call.remote_sdp, offer.encode())

    def test_reinvite_listener_answer(self) -> None:
        """The listener's SDP answer is used when it returns one."""
        call = self.answered()
        call.listener = RecordingListener(reinvite_answer=b"v=0\r\n")
        self.feed(req("INVITE", to_tag=call.to_tag, cseq=2, branch="z9hG4bKre", body=SDP))
        self.assertEqual(self.one().body, b"v=0\r\n")

    def test_in_dialog_requests(self) -> None:
        """INFO/MESSAGE/NOTIFY get 200, REFER 202, UPDATE 200, and each reaches the listener."""
        call = self.answered()
        for i, (method, extra) in enumerate([
            ("INFO", "Content-Type: application/dtmf-relay\r\n"),
            ("MESSAGE", "Content-Type: text/plain\r\n"),
            ("REFER", "Refer-To: <sip:carol@10.0.0.3>\r\n"),
            ("NOTIFY", "Event: refer\r\nContent-Type: message/sipfrag\r\n"),
            ("UPDATE", ""),
        ]):
            self.feed(req(method, to_tag=call.to_tag, cseq=10 + i, branch=f"z9hG4bKm{i}",
                          body="Signal=5\r\n" if method == "INFO" else "", extra=extra))
        self.assertEqual([m.status for m in self.sent()], [200, 200, 202, 200, 200])
        self.assertEqual(call.listener.names(), ["info", "message", "refer", "notify"])  # type: ignore[union-attr]

    def test_session_timer_echo(self) -> None:
        """A Session-Expires with Supported: timer is echoed with Require: timer in the 200."""
        self.feed(req("INVITE", body=SDP, extra="Supported: timer\r\nSession-Expires: 1800\r\n"))
        call = self.handler.calls[0]
        call.answer(minimal_sdp())
        ok = self.one()
        self.assertEqual(ok.headers.get("Session-Expires"), "1800;refresher=uac")
        self.assertEqual(ok.headers.get("Require"), "timer")

    def test_old_cseq_500(self) -> None:
        """An in-dialog request with an old CSeq gets 500."""
        call = self.answered()
        self.feed(req("INFO", to_tag=call.to_tag, cseq=1, branch="z9hG4bKold"))
        self.assertEqual(self.one().status, 500)

    def test_bye_from_us(self) -> None:
        """call.bye() sends a BYE to the remote Contact with our tag in From."""
        call = self.answered()
        d = call.bye()
        (data, addr), = self.transport.written
        self.transport.written.clear()
        bye = parse_message(data)
        self.assertEqual(addr, PEER)
        self.assertEqual(bye.method, "BYE")
        self.assertEqual(bye.from_.tag, call.to_tag)
        self.assertEqual(bye.headers.get("User-Agent"), "test-ua")
        self.feed(reply(bye, 200, to_tag=None))
        self.assertEqual(self.successResultOf(d).status, 200)
        self.assertEqual(call.listener.events[-1], ("terminated", "bye-sent"))  # type: ignore[union-attr]


class OutboundCallTests(UaTestCase):
    """UAC INVITE handling."""

    def setUp(self) -> None:
        self.make()
        self.provisional: list[int] = []

    def call(self, **kw: Any) -> Any:
        d = self.ua.invite("sip:bob@10.0.0.2:5070", "sip:agent@example.com", sdp=minimal_sdp(),
                           on_provisional=lambda r: self.provisional.append(r.status), **kw)
        return d, self.one()

    def test_invite_200_ack(self) -> None:
        """A 2xx is ACKed and the Deferred fires with the call; bye() then bumps the CSeq."""
        d, invite = self.call()
        self.assertEqual(invite.method, "INVITE")
        self.assertEqual(invite.headers.get("Contact"), "<sip:10.0.0.1:5060>")
        self.assertTrue(invite.top_via.branch.startswith("z9hG4bK"))
        self.feed(reply(invite, 180))
        self.assertEqual(self.provisional, [180])
        self.feed(reply(invite, 200, body=SDP))
        ack = self.one()
        self.assertEqual((ack.method, ack.cseq.seq), ("ACK", 1))
        self.assertEqual(str(ack.uri), "sip:bob@10.0.0.2:5070")
        call = self.successResultOf(d)
        self.assertIsInstance(call, OutboundCall)
        self.assertEqual(call.remote_sdp, SDP.encode())
        self.assertEqual(call.dialog_id, f"{invite.call_id}-{max(invite.from_.tag, 'rtag9')}-{min(invite.from_.tag, 'rtag9')}")
        # A retransmitted 200 is ACKed again.
        self.feed(reply(invite, 200, body=SDP))
        self.assertEqual(self.one().method, "ACK")
        call.bye()
        self.assertEqual(str(self.one().cseq), "2 BYE")

    def test_rejected(self) -> None:
        """A 486 errbacks with CallRejected and the transaction ACKs it."""
        d, invite = self.call()
        self.feed(reply(invite, 486))
        self.assertEqual(self.one().method, "ACK")
        err = self.failureResultOf(d, CallRejected)
        self.assertEqual(err.value.status, 486)

    def test_timeout_408(self) -> None:
        """No response at all: INVITE retransmitted on Timer A, then CallRejected(408) at Timer B."""
        d, _ = self.call()
        self.clock.advance(0.5)
        self.assertEqual(self.one().method, "INVITE")
        self.clock.pump([1.0] * 40)
        self.assertEqual(self.failureResultOf(d, CallRejected).value.status, 408)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_digest_retry(self) -> None:
        """A 407 is answered once with Proxy-Authorization on a new CSeq, and the 200 completes."""
        d, invite = self.call(credentials=type("C", (), {"username": "u", "password": "pw"})())
        self.feed(reply(invite, 407, extra=[("Proxy-Authenticate", 'Digest realm="r", nonce="n1", qop="auth"')]))
        ack, invite2 = self.sent()
        self.assertEqual(ack.method, "ACK")
        self.assertEqual(invite2.cseq.seq, 2)
        self.assertEqual(invite2.call_id, invite.call_id)
        self.assertTrue(check_authorization(invite2.headers.get("Proxy-Authorization"), "INVITE", "pw", realm="r"))
        self.feed(reply(invite2, 200, body=SDP))
        self.assertEqual(self.one().method, "ACK")
        self.successResultOf(d)

    def test_cancel_after_provisional(self) -> None:
        """Cancelling after a 180 sends CANCEL with the INVITE's branch; the 487 is ACKed."""
        d, invite = self.call()
        self.feed(reply(invite, 180))
        d.cancel()
        cancel = self.one()
        self.assertEqual(cancel.method, "CANCEL")
        self.assertEqual(cancel.top_via.branch, invite.top_via.branch)
        self.failureResultOf(d)
        self.feed(reply(cancel, 200))
        self.feed(reply(invite, 487))
        self.assertEqual(self.one().method, "ACK")

    def test_cancel_before_provisional(self) -> None:
        """Cancelling before any 1xx waits for one, then sends CANCEL."""
        d, invite = self.call()
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.sent(), [])
        self.feed(reply(invite, 100, to_tag=None))
        self.assertEqual(self.one().method, "CANCEL")

    def test_reinvite_hold(self) -> None:
        """reinvite() sends an INVITE in the dialog and ACKs its 2xx."""
        d, invite = self.call()
        self.feed(reply(invite, 200, body=SDP))
        self.sent()
        call = self.successResultOf(d)
        held = set_direction(minimal_sdp(), "sendonly")
        r = call.reinvite(held)
        reinvite = self.one()
        self.assertEqual((reinvite.method, reinvite.cseq.seq, reinvite.body), ("INVITE", 2, held))
        self.assertEqual(str(reinvite.uri), "sip:bob@10.0.0.2:5070")
        self.feed(reply(reinvite, 200, body=SDP))
        self.assertEqual(str(self.one().cseq), "2 ACK")
        self.assertEqual(self.successResultOf(r).status, 200)

    def test_refer_and_notify(self) -> None:
        """refer() carries Refer-To and notify() carries Event and sipfrag."""
        d, invite = self.call()
        self.feed(reply(invite, 200, body=SDP))
        self.sent()
        call = self.successResultOf(d)
        call.refer("sip:carol@10.0.0.3")
        refer = self.one()
        self.assertEqual(refer.headers.get("Refer-To"), "<sip:carol@10.0.0.3>")
        call.notify("SIP/2.0 200 OK\r\n", subscription_state="terminated;reason=noresource")
        notify = self.one()
        self.assertEqual(notify.headers.get("Event"), "refer")
        self.assertEqual(notify.headers.get("Content-Type"), "message/sipfrag;version=2.0")

    def test_external_ip(self) -> None:
        """external_ip replaces the host in Via and Contact."""
        self.make(external_ip="203.0.113.5")
        _, invite = self.call()
        self.assertEqual(invite.top_via.host, "203.0.113.5")
        self.assertEqual(invite.headers.get("Contact"), "<sip:203.0.113.5:5060>")

    def test_tls_without_listener(self) -> None:
        """A sips: target with no TLS listener fails with 503."""
        d = self.ua.invite("sips:bob@10.0.0.2", "sip:agent@example.com", sdp=minimal_sdp())
        self.assertEqual(self.failureResultOf(d, CallRejected).value.status, 503)


class RequestTests(UaTestCase):
    """Out-of-dialog requests the registration engineer sends."""

    def register(self) -> SipRequest:
        h = Headers([("From", "<sip:u@10.0.0.2>"), ("To", "<sip:u@10.0.0.2>"),
                     ("Contact", f"<{self.ua.local_contact(user='u')}>"), ("Expires", "3600")])
        return SipRequest("REGISTER", parse_uri("sip:10.0.0.2:5070"), h)

    def test_register_digest(self) -> None:
        """REGISTER challenged with 401 is resent with Authorization and CSeq+1; the 200 fires."""
        self.make()
        d = self.ua.request(self.register(), credentials=type("C", (), {"username": "u", "password": "pw"})())
        first = self.one()
        self.assertEqual(first.headers.get("Contact"), "<sip:u@10.0.0.1:5060>")
        self.feed(reply(first, 401, extra=[("WWW-Authenticate", 'Digest realm="r", nonce="abc"')]))
        second = self.one()
        self.assertEqual(second.cseq.seq, first.cseq.seq + 1)
        self.assertNotEqual(second.top_via.branch, first.top_via.branch)
        self.assertTrue(check_authorization(second.headers.get("Authorization"), "REGISTER", "pw"))
        self.feed(reply(second, 200))
        self.assertEqual(self.successResultOf(d).status, 200)

    def test_wrong_password_gives_up(self) -> None:
        """A second 401 for the same realm is returned instead of looping."""
        self.make()
        d = self.ua.request(self.register(), credentials=type("C", (), {"username": "u", "password": "pw"})())
        challenge = [("WWW-Authenticate", 'Digest realm="r", nonce="abc"')]
        self.feed(reply(self.one(), 401, extra=challenge))
        self.feed(reply(self.one(), 401, extra=challenge))
        self.assertEqual(self.successResultOf(d).status, 401)

    def test_timeout_is_408_response(self) -> None:
        """Timer F fires the Deferred with a synthesized 408."""
        self.make()
        d = self.ua.request(self.register())
        self.clock.pump([1.0] * 40)
        self.assertEqual(self.successResultOf(d).status, 408)

    def test_public_address(self) -> None:
        """received/rport in a UDP response's Via is reported and, when enabled, learned for Contact."""
        self.make(auto_learn_public_address=True)
        seen: list[tuple[str, int]] = []
        self.ua.on_public_address(lambda host, port: seen.append((host, port)))
        d = self.ua.request(self.register())
        sent = self.one()
        via = sent.headers.get("Via")
        self.feed(reply(sent, 200, via_params="").replace(
            via.encode(), via.replace(";rport", ";rport=40123;received=81.2.69.160").encode()))
        self.successResultOf(d)
        self.assertEqual(seen, [("81.2.69.160", 40123)])
        self.assertEqual(str(self.ua.local_contact()), "sip:81.2.69.160:40123")
