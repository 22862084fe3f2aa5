"""Tests for activecall.sip.registration: the pure REGISTER machine and its Twisted service."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from activecall.config import Credential, RegisterUser
from activecall.ids import IdSource
from activecall.sip.message import SipRequest, SipResponse, make_response
from activecall.sip.registration import (
    RegistrationMachine,
    RegistrationService,
    SendRegister,
    backoff_retry,
    fixed_retry,
)
from activecall.sip.uri import SipUri, parse_uri, transport_for_uri

ACCOUNT = RegisterUser(
    server="sip:pbx.example.org:5060", username="2001",
    credential=Credential(username="2001", password="s3cret"),
)
CONTACT = parse_uri("sip:2001@192.0.2.10:25060")
OUR_VIA = "SIP/2.0/UDP 192.0.2.10:25060;branch=z9hG4bKabc;rport=25060"


def new_machine(account: RegisterUser = ACCOUNT, contact: SipUri = CONTACT,
                **kw: Any) -> RegistrationMachine:
    """A machine with fixed ids."""
    return RegistrationMachine(account, contact, call_id="cid-1", from_tag="ftag", **kw)


def answer(send: SendRegister | SipRequest, status: int, *, via: str = OUR_VIA,
           headers: tuple[tuple[str, str], ...] = (), cseq: int | None = None,
           contact_expires: int | None = None) -> SipResponse:
    """The registrar's response to ``send`` (Via as the user agent would have sent it)."""
    request = send.request if isinstance(send, SendRegister) else send
    request = request.copy()
    request.headers.add("Via", via, prepend=True)
    if cseq is not None:
        request.headers.set("CSeq", f"{cseq} REGISTER")
    extra = list(headers)
    if contact_expires is not None:
        for value in request.headers.get_all("Contact"):
            if "expires=0" not in value:
                extra.append(("Contact", f"{value};expires={contact_expires}"))
    return make_response(request, status, extra_headers=extra, to_tag="rtag")


def contacts(send: SendRegister) -> list[str]:
    """The Contact header values of a REGISTER."""
    return send.request.headers.get_all("Contact")


class RegisterRequestTests(SynchronousTestCase):
    """The REGISTER the machine builds."""

    def test_first_register(self) -> None:
        """start() yields a REGISTER to the registrar for the AOR, with Contact and Expires."""
        m = new_machine()
        send = m.start(100.0)
        assert send is not None
        req = send.request
        self.assertEqual(req.method, "REGISTER")
        self.assertEqual(str(req.uri), "sip:pbx.example.org:5060")
        self.assertEqual(str(req.from_.uri), "sip:2001@pbx.example.org:5060")
        self.assertEqual(req.from_.tag, "ftag")
        self.assertEqual(str(req.to.uri), "sip:2001@pbx.example.org:5060")
        self.assertIsNone(req.to.tag)
        self.assertEqual(req.call_id, "cid-1")
        self.assertEqual(str(req.cseq), "1 REGISTER")
        self.assertEqual(contacts(send), ["<sip:2001@192.0.2.10:25060>"])
        self.assertEqual(req.headers.get("Expires"), "3600")
        self.assertEqual(req.headers.get("Max-Forwards"), "70")
        self.assertNotIn("Via", req.headers)
        self.assertEqual((send.cseq, send.expires, send.call_id), (1, 3600, "cid-1"))
        self.assertEqual(m.state(100.0).state, "registering")
        self.assertEqual(m.deadline(), 180.0)
        self.assertIsNone(m.start(101.0))

    def test_user_agent_and_params(self) -> None:
        """User-Agent is added when given; URI params of the server stay on the Request-URI only."""
        account = RegisterUser(server="sip:pbx.example.org;transport=tcp", username="u")
        m = new_machine(account, parse_uri("sip:u@192.0.2.10:5070;transport=tcp"),
                        user_agent="activecall(test)", expires_s=600)
        send = m.start(0.0)
        assert send is not None
        self.assertEqual(str(send.request.uri), "sip:pbx.example.org;transport=tcp")
        self.assertEqual(str(send.request.to.uri), "sip:u@pbx.example.org")
        self.assertEqual(send.request.headers.get("User-Agent"), "activecall(test)")
        self.assertEqual(send.request.headers.get("Expires"), "600")
        self.assertEqual(m.transport, "tcp")

    def test_transport_for_uri(self) -> None:
        """sips: and ;transport=tls need TLS; otherwise the transport parameter or UDP."""
        self.assertEqual(transport_for_uri(parse_uri("sips:pbx.example.org")), "tls")
        self.assertEqual(transport_for_uri(parse_uri("sip:pbx.example.org;transport=TLS")), "tls")
        self.assertEqual(transport_for_uri(parse_uri("sip:pbx.example.org:5060")), "udp")


class RefreshTests(SynchronousTestCase):
    """Success, refresh timing and RFC 3261 §10.2.4 Call-ID/CSeq rules."""

    def test_registered_then_refresh_at_75_percent(self) -> None:
        """A 2xx granting 600 s registers; the refresh goes 450 s later with the same Call-ID."""
        m = new_machine()
        first = m.start(0.0)
        assert first is not None
        self.assertIsNone(m.response(answer(first, 200, contact_expires=600), 2.0))
        state = m.state(2.0)
        self.assertEqual((state.state, state.status, state.expires), ("registered", 200, 600))
        self.assertEqual(state.expires_at, 602.0)
        self.assertEqual(m.deadline(), 452.0)
        self.assertEqual(state.next_attempt, 452.0)
        self.assertIsNone(m.timeout(451.0))  # early timer: nothing
        refresh = m.timeout(452.0)
        assert refresh is not None
        self.assertEqual(refresh.call_id, first.call_id)
        self.assertEqual(refresh.request.from_.tag, "ftag")
        self.assertEqual(refresh.cseq, 2)
        self.assertEqual(m.state(452.0).state, "registered")  # binding holds while refreshing
        self.assertEqual(m.phase, "registering")
        self.assertIsNone(m.response(answer(refresh, 200, contact_expires=600), 453.0))
        third = m.timeout(m.deadline() or 0.0)
        assert third is not None
        self.assertEqual(third.cseq, 3)

    def test_granted_from_expires_header_or_request(self) -> None:
        """Without our Contact in the 2xx, Expires decides; without both, what we asked for."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        m.response(answer(send, 200, headers=(("Expires", "120"),)), 0.0)
        self.assertEqual(m.state(0.0).expires, 120)
        self.assertEqual(m.deadline(), 90.0)
        m2 = new_machine()
        send2 = m2.start(0.0)
        assert send2 is not None
        m2.response(answer(send2, 200), 0.0)
        self.assertEqual(m2.state(0.0).expires, 3600)

    def test_other_contacts_ignored(self) -> None:
        """Expiry comes from our own Contact even when other devices' bindings are listed first."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        response = answer(send, 200, headers=(("Contact", "<sip:2001@198.51.100.9>;expires=30"),),
                          contact_expires=300)
        m.response(response, 0.0)
        self.assertEqual(m.state(0.0).expires, 300)

    def test_cseq_continues_above_auth_retry(self) -> None:
        """When the UA answered a challenge with CSeq 2, the next REGISTER uses CSeq 3."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        m.response(answer(send, 200, cseq=2, contact_expires=60), 0.0)
        self.assertEqual(m.state(0.0).state, "registered")
        refresh = m.timeout(45.0)
        assert refresh is not None
        self.assertEqual(refresh.cseq, 3)

    def test_zero_granted_is_failure(self) -> None:
        """A 2xx that keeps no binding for us counts as a failure."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        m.response(answer(send, 200, contact_expires=0), 0.0)
        self.assertEqual(m.state(0.0).state, "failed")

    def test_stale_and_foreign_responses_ignored(self) -> None:
        """Responses with another Call-ID, an old CSeq, another method or a 1xx change nothing."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        foreign = answer(send, 200)
        foreign.headers.set("Call-ID", "other")
        self.assertIsNone(m.response(foreign, 0.0))
        self.assertIsNone(m.response(answer(send, 200, cseq=0), 0.0))
        options = answer(send, 200)
        options.headers.set("CSeq", "1 OPTIONS")
        self.assertIsNone(m.response(options, 0.0))
        self.assertIsNone(m.response(answer(send, 180), 0.0))
        self.assertEqual(m.state(0.0).state, "registering")


class FailureTests(SynchronousTestCase):
    """423, rejections, timeouts and transport errors."""

    def test_423_uses_min_expires(self) -> None:
        """423 is followed at once with Expires = Min-Expires, which refreshes keep."""
        m = new_machine(expires_s=60)
        send = m.start(0.0)
        assert send is not None
        again = m.response(answer(send, 423, headers=(("Min-Expires", "1800"),)), 1.0)
        assert again is not None
        self.assertEqual((again.cseq, again.expires), (2, 1800))
        self.assertEqual(again.request.headers.get("Expires"), "1800")
        m.response(answer(again, 200), 2.0)
        refresh = m.timeout(2.0 + 1350)
        assert refresh is not None
        self.assertEqual(refresh.expires, 1800)

    def test_423_without_usable_min_expires_fails(self) -> None:
        """423 without Min-Expires, or not above what we asked, is a failure (no loop)."""
        for headers in ((), (("Min-Expires", "3600"),), (("Min-Expires", "soon"),)):
            with self.subTest(headers=headers):
                m = new_machine()
                send = m.start(0.0)
                assert send is not None
                self.assertIsNone(m.response(answer(send, 423, headers=headers), 0.0))
                self.assertEqual(m.state(0.0).state, "failed")

    def test_rejection_retries_every_60s(self) -> None:
        """A 403 (or a 401 the UA could not answer) fails; retries come every 60 s."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        m.response(answer(send, 403), 1.0)
        state = m.state(1.0)
        self.assertEqual((state.state, state.status, state.reason, state.failures),
                         ("failed", 403, "Forbidden", 1))
        self.assertEqual(state.next_attempt, 61.0)
        self.assertIsNone(m.timeout(60.0))
        retry = m.timeout(61.0)
        assert retry is not None
        self.assertEqual(retry.cseq, 2)
        m.response(answer(retry, 401), 62.0)
        self.assertEqual(m.state(62.0).next_attempt, 122.0)
        self.assertEqual(m.state(62.0).failures, 2)
        retry = m.timeout(122.0)
        assert retry is not None
        m.response(answer(retry, 200), 123.0)
        self.assertEqual(m.state(123.0).failures, 0)

    def test_retry_after_honoured_when_longer(self) -> None:
        """503 with Retry-After: 300 waits 300 s instead of 60 s."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        m.response(answer(send, 503, headers=(("Retry-After", "300 (maintenance)"),)), 0.0)
        self.assertEqual(m.deadline(), 300.0)

    def test_retry_policy_injected(self) -> None:
        """The retry policy sees the failure count; jitter comes from the injected callable."""
        rng = random.Random(7)
        m = new_machine(retry=backoff_retry(2.0, 2.0, 60.0, jitter=lambda: rng.random()))
        send = m.start(0.0)
        delays = []
        now = 0.0
        for _ in range(7):
            assert send is not None
            m.response(answer(send, 500), now)
            deadline = m.deadline()
            assert deadline is not None
            delays.append(deadline - now)
            now = deadline
            send = m.timeout(now)
        self.assertEqual([int(d) for d in delays], [2, 4, 8, 16, 32, 60, 60])
        self.assertTrue(all(d % 1 for d in delays))  # some jitter on each
        self.assertEqual(fixed_retry(60.0)(5), 60.0)
        self.assertEqual(fixed_retry(60.0, jitter=lambda: 1.5)(1), 61.5)

    def test_no_answer(self) -> None:
        """If the UA never answers, the machine gives up after its response timeout and retries."""
        m = new_machine(response_timeout_s=80.0)
        send = m.start(0.0)
        assert send is not None
        self.assertIsNone(m.timeout(80.0))
        state = m.state(80.0)
        self.assertEqual((state.state, state.status), ("failed", 408))
        self.assertIsNone(m.response(answer(send, 200), 81.0))  # too late: ignored
        self.assertEqual(m.state(81.0).state, "failed")
        retry = m.timeout(140.0)
        assert retry is not None
        self.assertEqual(retry.cseq, 2)

    def test_request_failed(self) -> None:
        """A transport error for the pending CSeq fails; one for another CSeq is ignored."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        self.assertIsNone(m.request_failed(99, "boom", 0.0))
        self.assertEqual(m.state(0.0).state, "registering")
        self.assertIsNone(m.request_failed(send.cseq, "no route", 0.0))
        state = m.state(0.0)
        self.assertEqual((state.state, state.status, state.reason), ("failed", None, "no route"))


class AddressLearningTests(SynchronousTestCase):
    """Public-address learning from Via received/rport and from the UA."""

    def test_via_reveals_public_address(self) -> None:
        """A 2xx showing another address re-REGISTERs at once with it, removing the old Contact."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        via = "SIP/2.0/UDP 192.0.2.10:25060;branch=z9hG4bKabc;received=203.0.113.7;rport=40000"
        again = m.response(answer(send, 200, via=via, contact_expires=3600), 0.5)
        assert again is not None
        self.assertEqual(again.cseq, 2)
        self.assertEqual(again.call_id, "cid-1")
        self.assertEqual(str(again.contact), "sip:2001@203.0.113.7:40000")
        self.assertEqual(contacts(again), ["<sip:2001@203.0.113.7:40000>",
                                           "<sip:2001@192.0.2.10:25060>;expires=0"])
        self.assertEqual(m.state(0.5).state, "registered")
        self.assertIsNone(m.response(answer(again, 200, via=via, contact_expires=3600), 1.0))
        self.assertEqual(m.state(1.0).contact, "sip:2001@203.0.113.7:40000")
        refresh = m.timeout(m.deadline() or 0.0)
        assert refresh is not None
        self.assertEqual(contacts(refresh), ["<sip:2001@203.0.113.7:40000>"])

    def test_rport_alone(self) -> None:
        """Only the port differing (no received) is also a new address."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        via = "SIP/2.0/UDP 192.0.2.10:25060;branch=z9hG4bKabc;rport=1024"
        again = m.response(answer(send, 200, via=via), 0.0)
        assert again is not None
        self.assertEqual(str(again.contact), "sip:2001@192.0.2.10:1024")

    def test_same_address_no_reregister(self) -> None:
        """received/rport equal to the Contact (written differently) changes nothing."""
        m = new_machine(contact=parse_uri("sip:2001@[2001:db8::1]:25060"))
        send = m.start(0.0)
        assert send is not None
        via = "SIP/2.0/UDP [2001:db8::1]:25060;branch=z9hG4bKabc;received=2001:db8:0::1;rport=25060"
        self.assertIsNone(m.response(answer(send, 200, via=via), 0.0))
        self.assertEqual(m.state(0.0).state, "registered")

    def test_tls_does_not_learn(self) -> None:
        """Over TLS the Via is not used to learn an address."""
        m = new_machine(RegisterUser(server="sips:pbx.example.org", username="2001"),
                        parse_uri("sips:2001@192.0.2.10:5061"))
        send = m.start(0.0)
        assert send is not None
        via = "SIP/2.0/TLS 192.0.2.10:5061;branch=z9hG4bKabc;received=203.0.113.7;rport=40000"
        self.assertIsNone(m.response(answer(send, 200, via=via), 0.0))
        self.assertIsNone(m.public_address_changed("203.0.113.7", 40000, 1.0))
        self.assertEqual(m.state(1.0).contact, "sips:2001@192.0.2.10:5061")

    def test_relocation_capped(self) -> None:
        """A registrar reporting a new address every time is followed at most three times."""
        m = new_machine()
        send = m.start(0.0)
        sends = 0
        for port in range(40000, 40010):
            assert send is not None
            via = ("SIP/2.0/UDP 192.0.2.10:25060;branch=z9hG4bKabc;received=203.0.113.7;"
                   f"rport={port}")
            send = m.response(answer(send, 200, via=via), 0.0)
            if send is None:
                break
            sends += 1
        self.assertEqual(sends, 3)
        self.assertEqual(m.phase, "registered")

    def test_ua_notice_while_registered(self) -> None:
        """A public address learned by the UA re-REGISTERs a registered UDP account at once."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        m.response(answer(send, 200), 0.0)
        self.assertIsNone(m.public_address_changed("192.0.2.10", 25060, 1.0))
        again = m.public_address_changed("203.0.113.9", 5999, 1.0)
        assert again is not None
        self.assertEqual(contacts(again), ["<sip:2001@203.0.113.9:5999>",
                                           "<sip:2001@192.0.2.10:25060>;expires=0"])

    def test_ua_notice_ignored_for_local_registrar(self) -> None:
        """A registrar at a private address is not re-REGISTERed on a public-address notice."""
        m = new_machine(RegisterUser(server="sip:10.0.0.1:5060", username="2001"))
        send = m.start(0.0)
        assert send is not None
        m.response(answer(send, 200), 0.0)
        self.assertIsNone(m.public_address_changed("203.0.113.9", 5999, 1.0))
        self.assertEqual(m.state(1.0).contact, "sip:2001@192.0.2.10:25060")

    def test_ua_notice_while_in_flight(self) -> None:
        """A notice during a pending REGISTER applies when its 2xx (Via without rport) arrives."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        self.assertIsNone(m.public_address_changed("203.0.113.9", 5999, 0.1))
        plain_via = "SIP/2.0/UDP 192.0.2.10:25060;branch=z9hG4bKabc"
        again = m.response(answer(send, 200, via=plain_via), 0.2)
        assert again is not None
        self.assertEqual(str(again.contact), "sip:2001@203.0.113.9:5999")

    def test_registrar_view_beats_ua_notice(self) -> None:
        """When the 2xx's Via shows our Contact is right, an in-flight notice is dropped."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        m.public_address_changed("203.0.113.9", 5999, 0.1)
        self.assertIsNone(m.response(answer(send, 200), 0.2))
        self.assertEqual(m.state(0.2).contact, "sip:2001@192.0.2.10:25060")

    def test_ua_notice_while_failed(self) -> None:
        """A notice while failed (nothing bound) only changes the Contact of the next attempt."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        m.response(answer(send, 500), 0.0)
        self.assertIsNone(m.public_address_changed("203.0.113.9", 5999, 1.0))
        retry = m.timeout(60.0)
        assert retry is not None
        self.assertEqual(contacts(retry), ["<sip:2001@203.0.113.9:5999>"])


class StopTests(SynchronousTestCase):
    """un-REGISTER on shutdown."""

    def test_unregister_when_registered(self) -> None:
        """stop() sends Expires: 0 for our Contact with the next CSeq; the answer ends it."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        m.response(answer(send, 200), 0.0)
        bye = m.stop(10.0)
        assert bye is not None
        self.assertEqual((bye.cseq, bye.expires, bye.call_id), (2, 0, "cid-1"))
        self.assertEqual(bye.request.headers.get("Expires"), "0")
        self.assertEqual(contacts(bye), ["<sip:2001@192.0.2.10:25060>"])
        self.assertEqual(m.state(10.0).state, "unregistering")
        self.assertIsNone(m.stop(10.5))
        self.assertIsNone(m.response(answer(bye, 200), 11.0))
        state = m.state(11.0)
        self.assertEqual((state.state, state.status, state.expires), ("unregistered", 200, None))
        self.assertIsNone(m.deadline())
        self.assertIsNone(m.timeout(1e9))
        self.assertIsNone(m.public_address_changed("203.0.113.9", 1, 12.0))

    def test_unregister_includes_stale_contact(self) -> None:
        """An old Contact not yet confirmed removed is removed again by the un-REGISTER."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        m.response(answer(send, 200), 0.0)
        m.public_address_changed("203.0.113.9", 5999, 1.0)
        bye = m.stop(1.5)
        assert bye is not None
        self.assertEqual(contacts(bye), ["<sip:2001@203.0.113.9:5999>",
                                         "<sip:2001@192.0.2.10:25060>;expires=0"])
        self.assertGreaterEqual(bye.cseq, 2 + 16)  # room left for the abandoned request's retries

    def test_nothing_to_remove(self) -> None:
        """stop() before start, or while failed with no binding, sends nothing and stops."""
        m = new_machine()
        self.assertIsNone(m.stop(0.0))
        self.assertEqual(m.phase, "stopped")
        self.assertIsNone(m.start(1.0))
        m2 = new_machine()
        send = m2.start(0.0)
        assert send is not None
        m2.response(answer(send, 403), 0.0)
        self.assertIsNone(m2.stop(1.0))
        self.assertEqual(m2.phase, "stopped")
        self.assertIsNone(m2.deadline())

    def test_refresh_failure_still_unregisters(self) -> None:
        """After a failed refresh the old binding may live on, so stop() still removes it."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        m.response(answer(send, 200, contact_expires=100), 0.0)
        refresh = m.timeout(75.0)
        assert refresh is not None
        m.response(answer(refresh, 500), 76.0)
        self.assertEqual(m.state(76.0).state, "failed")
        bye = m.stop(80.0)
        assert bye is not None
        self.assertEqual(bye.expires, 0)

    def test_stop_while_registering(self) -> None:
        """Stopping with the first REGISTER in flight un-REGISTERs; the late 2xx is ignored."""
        m = new_machine()
        send = m.start(0.0)
        assert send is not None
        bye = m.stop(0.1)
        assert bye is not None
        self.assertEqual(bye.expires, 0)
        self.assertGreater(bye.cseq, send.cseq + 1)
        self.assertIsNone(m.response(answer(send, 200), 0.2))
        self.assertEqual(m.phase, "unregistering")
        m.response(answer(bye, 200), 0.3)
        self.assertEqual(m.phase, "stopped")

    def test_unregister_unanswered(self) -> None:
        """An un-REGISTER that gets no answer ends at the response timeout."""
        m = new_machine(response_timeout_s=10.0)
        send = m.start(0.0)
        assert send is not None
        m.response(answer(send, 200), 0.0)
        m.stop(5.0)
        self.assertEqual(m.deadline(), 15.0)
        self.assertIsNone(m.timeout(15.0))
        self.assertEqual(m.phase, "stopped")


# ----------------------------------------------------------------------------- the service


@dataclass
class Sent:
    """One request handed to the fake user agent."""

    request: SipRequest
    destination: Any
    credentials: Credential | None
    deferred: Deferred[SipResponse]


@dataclass
class FakeUserAgent:
    """Records requests; answers only when the test says so."""

    listeners: tuple[str, ...] = ("udp",)
    sent: list[Sent] = field(default_factory=list)
    callbacks: list[Callable[[str, int], None]] = field(default_factory=list)
    broken: bool = False

    def request(self, request: SipRequest, destination: Any = None, *,
                credentials: Credential | None = None) -> Deferred[SipResponse]:
        """Record the request and return its unfired Deferred."""
        if self.broken:
            return fail(ConnectionRefusedError("unreachable"))
        d: Deferred[SipResponse] = Deferred()
        self.sent.append(Sent(request, destination, credentials, d))
        return d

    def local_contact(self, transport: str = "udp", user: str | None = None) -> SipUri:
        """The listener's Contact, or LookupError without a listener."""
        if transport not in self.listeners:
            raise LookupError(f"missing local SIP address for {transport}")
        scheme = "sips" if transport == "tls" else "sip"
        return parse_uri(f"{scheme}:{user}@192.0.2.10:25060")

    def on_public_address(self, callback: Callable[[str, int], None]) -> None:
        """Remember the callback."""
        self.callbacks.append(callback)


def reply(sent: Sent, status: int, **kw: Any) -> None:
    """Fire ``sent``'s Deferred with a response."""
    sent.deferred.callback(answer(sent.request, status, **kw))


class ServiceTests(SynchronousTestCase):
    """RegistrationService on a fake user agent and a Clock."""

    def setUp(self) -> None:
        """A clock at a known epoch and a log capture."""
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.ua = FakeUserAgent()
        # createWithCleanup is typed for trial's TestCase; SynchronousTestCase has addCleanup too.
        self.logs = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)  # type: ignore[arg-type]

    def service(self, *accounts: RegisterUser, **kw: Any) -> RegistrationService:
        """A service over ``accounts``."""
        return RegistrationService(self.ua, accounts or (ACCOUNT,), self.clock,
                                   IdSource(random.Random(7)), **kw)

    def log_text(self) -> str:
        """Every captured log line."""
        return "\n".join(formatEvent(e) for e in self.logs)

    def test_start_registers_enabled_entries(self) -> None:
        """Enabled entries REGISTER with credentials; disabled or listener-less ones are skipped."""
        disabled = RegisterUser(server="sip:other.example.org", username="7", disabled=True)
        tls = RegisterUser(server="sips:secure.example.org", username="8")
        svc = self.service(ACCOUNT, disabled, tls)
        svc.startService()
        self.assertEqual(len(self.ua.sent), 1)
        sent = self.ua.sent[0]
        self.assertEqual(str(sent.request.uri), "sip:pbx.example.org:5060")
        self.assertEqual(sent.credentials, ACCOUNT.credential)
        self.assertIn("no tls listener, skipped", self.log_text())
        self.assertEqual([r["state"] for r in svc.registrations_json()],
                         ["registering", "disabled", "skipped"])
        self.assertEqual(svc.registrations()[1:], [None, None])

    def test_register_refresh_and_json(self) -> None:
        """A 200 registers (logged, in JSON); the refresh goes out at 75 % of the expiry."""
        svc = self.service(expires_s=600)
        svc.startService()
        reply(self.ua.sent[0], 200, contact_expires=600)
        self.assertIn("registration sip:2001@pbx.example.org:5060: registered (200 OK)",
                      self.log_text())
        [item] = svc.registrations_json()
        self.assertEqual(item, {
            "server": "sip:pbx.example.org:5060", "username": "2001",
            "aor": "sip:2001@pbx.example.org:5060", "transport": "udp",
            "state": "registered", "status": 200, "reason": "OK",
            "contact": "sip:2001@192.0.2.10:25060", "expires": 600,
            "expires_at": "2023-11-14T22:23:20Z", "expires_in": 600,
            "next_attempt": "2023-11-14T22:20:50Z", "next_attempt_in": 450, "failures": 0,
        })
        self.clock.advance(449)
        self.assertEqual(len(self.ua.sent), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.ua.sent), 2)
        refresh = self.ua.sent[1].request
        self.assertEqual(refresh.call_id, self.ua.sent[0].request.call_id)
        self.assertEqual(refresh.cseq.seq, 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_failure_retry(self) -> None:
        """A rejection is logged as a warning and retried 60 s later."""
        svc = self.service()
        svc.startService()
        reply(self.ua.sent[0], 403)
        self.assertIn("failed (403 Forbidden); retry in 60.0s", self.log_text())
        self.assertEqual(svc.registrations_json()[0]["next_attempt_in"], 60)
        self.clock.advance(59.9)
        self.assertEqual(len(self.ua.sent), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.ua.sent), 2)

    def test_transport_error(self) -> None:
        """A Deferred that fails (e.g. no route) is a failure with the error as reason."""
        self.ua.broken = True
        svc = self.service()
        svc.startService()
        [item] = svc.registrations_json()
        self.assertEqual((item["state"], item["reason"]), ("failed", "unreachable"))

    def test_stop_unregisters_and_waits(self) -> None:
        """stopService sends Expires: 0 and fires only once the registrar answered."""
        svc = self.service()
        svc.startService()
        reply(self.ua.sent[0], 200)
        d = svc.stopService()
        self.assertNoResult(d)
        bye = self.ua.sent[1]
        self.assertEqual(bye.request.headers.get("Expires"), "0")
        self.assertEqual(bye.credentials, ACCOUNT.credential)
        reply(bye, 200)
        self.successResultOf(d)
        self.assertEqual(svc.registrations_json()[0]["state"], "unregistered")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_wait_is_bounded(self) -> None:
        """An unanswered un-REGISTER does not hold shutdown beyond stop_timeout_s."""
        svc = self.service(stop_timeout_s=5.0)
        svc.startService()
        reply(self.ua.sent[0], 200)
        d = svc.stopService()
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertIn("un-REGISTER unanswered after 5.0s", self.log_text())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        reply(self.ua.sent[1], 200)  # a late answer is harmless
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_without_bindings(self) -> None:
        """With nothing registered stopService sends nothing and fires at once."""
        svc = self.service()
        svc.startService()
        reply(self.ua.sent[0], 403)
        self.successResultOf(svc.stopService())
        self.assertEqual(len(self.ua.sent), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_public_address_callback(self) -> None:
        """The UA's public-address notice re-REGISTERs running UDP accounts with the new Contact."""
        svc = self.service()
        svc.startService()
        reply(self.ua.sent[0], 200)
        [callback] = self.ua.callbacks
        callback("203.0.113.9", 5999)
        self.assertEqual(len(self.ua.sent), 2)
        self.assertEqual(self.ua.sent[1].request.headers.get_all("Contact")[0],
                         "<sip:2001@203.0.113.9:5999>")
        svc.stopService()
        callback("203.0.113.10", 6000)  # after stop: ignored
        self.assertEqual(len(self.ua.sent), 3)

    def test_restart(self) -> None:
        """A stopped service can be started again with a fresh Call-ID, subscribing only once."""
        svc = self.service()
        svc.startService()
        first_call_id = self.ua.sent[0].request.call_id
        reply(self.ua.sent[0], 200)
        d = svc.stopService()
        reply(self.ua.sent[1], 200)
        self.successResultOf(d)
        svc.startService()
        self.assertEqual(len(self.ua.sent), 3)
        self.assertNotEqual(self.ua.sent[2].request.call_id, first_call_id)
        self.assertEqual(len(self.ua.callbacks), 1)
