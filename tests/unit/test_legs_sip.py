"""SIP legs: URI and credential helpers, trunk rules (config.md §12.1), the dialer, inbound legs and the dialog listener."""

from __future__ import annotations

import random
from typing import Any, Optional

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from activecall.config import Overrides, parse_config
from activecall.ids import IdSource
from activecall.legs.rtp import RtpMediaEngine
from activecall.legs.sip import (
    InboundSipLeg,
    SipDialer,
    SipInboundFactory,
    SipLeg,
    SipMedia,
    apply_trunk_rules,
    caller_uri,
    credentials_for,
    outgoing_headers,
    sipfrag_status,
)
from activecall.media.clock import MediaClock
from activecall.media.tracks import (
    FrameQueue,
    IInboundLeg,
    IInboundLegFactory,
    ILeg,
    ILegDialer,
    ILegEvents,
    LegOptionError,
    LegRejectedError,
    LegSetupError,
)
from activecall.options import CallOption, SipOption
from activecall.rtp.transport import RtpPortAllocator
from activecall.sip.dialog import DialogError
from activecall.sip.message import Headers
from activecall.sip.useragent import CallRejected
from test_legs_rtp import FakeReactor, ListSink


def rules(text: str):  # type: ignore[no-untyped-def]
    return parse_config(text, Overrides()).trunk_rules


class TrunkRuleTests(SynchronousTestCase):
    """The first matching rule rewrites From, To/Request-URI and Contact; others are skipped."""

    def test_first_match_rewrites_to_and_contact(self) -> None:
        """A rule matching the callee host rewrites the callee host (keeping the port) and the Contact host."""
        r = rules('[[trunk_rules]]\nrule.match.to.host = "^10\\\\."\nrule.rewrite.to.host = "carrier.example"\n'
                  'rule.rewrite.contact.host = "203.0.113.10:5070"\n'
                  '[[trunk_rules]]\nrule.rewrite.from.user = "never"\n')
        to, frm, contact = apply_trunk_rules(r, "sip:1001@10.0.0.5:5080", "sip:bot@127.0.0.1", None,
                                             lambda: "sip:127.0.0.1:25060")
        self.assertEqual(to, "sip:1001@carrier.example:5080")
        self.assertEqual(frm, "sip:bot@127.0.0.1", "only the first matching rule applies")
        self.assertEqual(contact, "sip:203.0.113.10:5070")

    def test_catch_all_and_user_patterns(self) -> None:
        """A rule without conditions always matches; a user pattern never matches a URI without user."""
        r = rules('[[trunk_rules]]\nrule.match.to.user = "^1"\nrule.rewrite.from.user = "a"\n'
                  '[[trunk_rules]]\nrule.rewrite.from.user = "+15550100"\n')
        to, frm, contact = apply_trunk_rules(r, "sip:pbx.example", "sip:bot@127.0.0.1", "sip:x@1.2.3.4", lambda: "")
        self.assertEqual((to, frm, contact), ("sip:pbx.example", "sip:+15550100@127.0.0.1", "sip:x@1.2.3.4"))

    def test_no_rules_leave_everything(self) -> None:
        """Without rules nothing changes."""
        self.assertEqual(apply_trunk_rules((), "sip:a@b", "sip:c@d", None, lambda: ""), ("sip:a@b", "sip:c@d", None))


class OptionDefaultsTests(SynchronousTestCase):
    """CallOption caller defaults and credential lookup (protocol.md §4.1, §4.2; config.md §7)."""

    def test_caller_defaults(self) -> None:
        """caller gets sip: added; absent, it comes from sip.username/realm, else active-call@127.0.0.1."""
        self.assertEqual(caller_uri(CallOption.from_json({"caller": "bot@x"}, "o")), "sip:bot@x")
        self.assertEqual(caller_uri(CallOption.from_json({"sip": {"username": "u", "realm": "r"}}, "o")), "sip:u@r")
        self.assertEqual(caller_uri(CallOption.from_json({}, "o")), "sip:active-call@127.0.0.1")

    def test_credentials_from_register_users_on_the_callee_host(self) -> None:
        """Without a sip object, a [[register_users]] entry whose server host is the callee's host is used."""
        users = parse_config('[[register_users]]\nserver = "pbx.example:5060"\nusername = "2001"\n'
                             '[register_users.credential]\nusername = "2001"\npassword = "pw"\n', Overrides()).register_users
        c = credentials_for(CallOption.from_json({"callee": "sip:1001@pbx.example"}, "o"), users)
        assert c is not None
        self.assertEqual((c.username, c.password), ("2001", "pw"))
        self.assertIsNone(credentials_for(CallOption.from_json({"callee": "sip:1001@other"}, "o"), users))
        self.assertIsNone(credentials_for(CallOption.from_json({"callee": "sip:1001@pbx.example", "sip": {}}, "o"), users))


class OutgoingHeadersTests(SynchronousTestCase):
    """The last check before headers go into an outgoing request."""

    def test_unsafe_headers_are_dropped(self) -> None:
        """CR/LF values, protected names and non-token names are dropped; safe ones kept in order."""
        headers = {"X-A": "1", "X-B": "x\r\nINVITE sip:a@b SIP/2.0", "Via": "SIP/2.0/UDP evil", "X C": "2", "X-D": "3"}
        self.assertEqual(outgoing_headers(headers), [("X-A", "1"), ("X-D", "3")])
        self.assertEqual(outgoing_headers(None), [])

    def test_at_most_32(self) -> None:
        """Beyond 32 headers the rest are dropped."""
        self.assertEqual(len(outgoing_headers({f"X-{i}": "v" for i in range(40)})), 32)


# -- fakes of the user agent's side -------------------------------------------------


def sdp(*media: str, session_c: str = "c=IN IP4 192.0.2.10", attrs: str = "") -> bytes:
    """An SDP body with ``session_c`` and the given m= sections (each with its own lines)."""
    body = "v=0\r\no=- 5 5 IN IP4 192.0.2.10\r\ns=-\r\n" + (session_c + "\r\n" if session_c else "")
    body += "t=0 0\r\n" + attrs
    for section in media or (AUDIO,):
        body += section
    return body.encode()


AUDIO = "m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"


def audio(direction: str = "", extra: str = "") -> str:
    return AUDIO + extra + (f"a={direction}\r\n" if direction else "")


VIDEO_INACTIVE = "m=video 40002 RTP/AVP 96\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:96 H264/90000\r\na=inactive\r\n"
G729_ONLY = "m=audio 40000 RTP/AVP 18\r\na=rtpmap:18 G729/8000\r\n"


class Response:
    """A SIP response as on_provisional sees it."""

    def __init__(self, status: int, body: bytes = b"", reason: str = "OK") -> None:
        self.status = status
        self.body = body
        self.reason = reason


class Request:
    """An in-dialog request as the listener sees it."""

    def __init__(self, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.body = body
        self.headers = Headers(headers)


class FakeCall:
    """An OutboundCall: the answer SDP, the listener and what we sent in the dialog."""

    def __init__(self, remote_sdp: bytes) -> None:
        self.remote_sdp = remote_sdp
        self.listener: Any = None
        self.terminated = False
        self.byes: list[list[tuple[str, str]]] = []
        self.refers: list[str] = []
        self.messages: list[tuple[bytes, str, list[tuple[str, str]]]] = []

    def bye(self, headers: Any = ()) -> Deferred[Any]:
        assert not self.terminated, "BYE on a terminated dialog"
        self.byes.append(list(headers))
        self.terminated = True
        return succeed(Response(200))

    def refer(self, target: str) -> Deferred[Any]:
        self.refers.append(target)
        return succeed(Response(202, reason="Accepted"))

    def message(self, body: bytes, content_type: str, headers: Any = ()) -> Deferred[Any]:
        self.messages.append((body, content_type, list(headers)))
        return succeed(Response(200))

    # What the user agent does on in-dialog requests.
    def far_bye(self) -> None:
        self.listener.on_bye(Request())
        self.terminated = True
        self.listener.on_terminated("bye-received")


class FakeInboundCall(FakeCall):
    """An InboundCall: the offer, the INVITE's headers, and our responses."""

    def __init__(self, offer: bytes, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(offer)
        self.caller = "sip:alice@192.0.2.10"
        self.callee = "sip:bot@192.0.2.1"
        self.request = Request(offer, (("From", "<sip:alice@192.0.2.10>"), *headers))
        self.responses: list[tuple[int, Optional[str], Optional[bytes]]] = []
        self.acked: Deferred[Any] = Deferred()
        self.final_sent = False

    def ringing(self, sdp: Optional[str] = None) -> None:
        self.responses.append((183 if sdp else 180, None, sdp.encode() if sdp else None))

    def answer(self, sdp: str) -> Deferred[Any]:
        self.final_sent = True
        self.responses.append((200, None, sdp.encode()))
        return self.acked

    def reject(self, code: int, reason: Optional[str] = None) -> None:
        self.final_sent = True
        self.terminated = True
        self.responses.append((code, reason, None))

    def bye(self, headers: Any = ()) -> Deferred[Any]:
        if not self.final_sent:
            self.reject(487)
            return succeed(Response(487))
        return super().bye(headers)

    def far_cancel(self) -> None:
        self.final_sent = True
        self.terminated = True
        self.listener.on_cancel()
        self.listener.on_terminated("cancel")
        self.acked.errback(CallRejected(487, "Request Terminated"))


class FakeUserAgent:
    """SipUserAgent.invite: records the INVITE; the test answers, rejects or rings it."""

    def __init__(self) -> None:
        self.invites: list[dict[str, Any]] = []
        self.cancels = 0

    def local_contact(self, transport: str = "udp") -> str:
        return f"sip:127.0.0.1:5060;transport={transport}"

    def invite(self, target: str, caller: str, **kw: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancels += 1

        d: Deferred[Any] = Deferred(cancel)
        self.invites.append({"target": target, "caller": caller, "deferred": d, **kw})
        return d


@implementer(ILegEvents)
class Events:
    """ILegEvents recording every report as a tuple."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def media_ready(self) -> None:
        self.seen.append(("media_ready",))

    def dtmf(self, digit: str) -> None:
        self.seen.append(("dtmf", digit))

    def hold(self, on_hold: bool) -> None:
        self.seen.append(("hold", on_hold))

    def ended(self, cause: str) -> None:
        self.seen.append(("ended", cause))

    def media_ended(self, cause: str) -> None:
        self.seen.append(("media_ended", cause))

    def message(self, body: str, content_type: Optional[str]) -> None:
        self.seen.append(("message", body, content_type))

    def transfer_requested(self, refer_to: str, referred_by: Optional[str]) -> None:
        self.seen.append(("transfer_requested", refer_to, referred_by))

    def transfer_progress(self, status: int, text: str) -> None:
        self.seen.append(("transfer_progress", status, text))


class SipTestBase(SynchronousTestCase):
    """A SipMedia on a fake reactor, a fake user agent, the dialer and the inbound factory."""

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.media_clock = MediaClock(self.reactor)
        self.ua = FakeUserAgent()
        self.alloc = RtpPortAllocator(30000, 30009)
        self.media = SipMedia(
            reactor=self.reactor, user_agent=self.ua, engine=RtpMediaEngine(self.reactor, self.media_clock),
            allocator=self.alloc, codecs=("pcmu", "pcma", "telephone_event"), advertise_ip="192.0.2.1")
        self.ids = IdSource(random.Random(7))
        self.dialer = SipDialer(self.media, self.reactor, self.ids)
        self.factory = SipInboundFactory(self.media, self.reactor, self.ids)
        self.events = Events()
        self.ringing: list[bool] = []

    def dial(self, option: Optional[CallOption] = None) -> Deferred[Any]:
        return self.dialer.dial(option or CallOption(callee="sip:bob@192.0.2.10"), "call-1", self.ringing.append)

    def answered_leg(self, answer: Optional[bytes] = None) -> tuple[SipLeg, FakeCall]:
        d = self.dial()
        call = FakeCall(answer or sdp())
        self.ua.invites[-1]["deferred"].callback(call)
        leg = self.successResultOf(d)
        leg.attach(FrameQueue(), ListSink([]), self.events)
        return leg, call

    def inbound_leg(self, offer: Optional[bytes] = None,
                    headers: tuple[tuple[str, str], ...] = ()) -> tuple[InboundSipLeg, FakeInboundCall]:
        call = FakeInboundCall(offer or sdp(), headers)
        leg = self.factory.inbound(call, None)
        return leg, call

    def reinvite(self, call: FakeCall, body: bytes) -> Optional[bytes]:
        answer: Optional[bytes] = call.listener.on_reinvite(body)
        return answer

    def holds(self) -> list[bool]:
        return [e[1] for e in self.events.seen if e[0] == "hold"]


class DialerTests(SipTestBase):
    """SipDialer: the INVITE, ringing, the answered leg, rejection, CANCEL and set-up errors."""

    def test_interfaces(self) -> None:
        """The dialer, the factory and both legs provide their interfaces."""
        verifyObject(ILegDialer, self.dialer)
        verifyObject(IInboundLegFactory, self.factory)
        leg, _ = self.answered_leg()
        verifyObject(ILeg, leg)
        inbound, _ = self.inbound_leg()
        verifyObject(IInboundLeg, inbound)

    def test_invite_ringing_and_answer(self) -> None:
        """The INVITE carries our offer; 18x ring (early media when it has a body); the 2xx gives an attached SipLeg."""
        d = self.dial(CallOption(callee="bob@192.0.2.10", caller="bot@192.0.2.1",
                                 sip=SipOption(headers={"X-Tag": "7"})))
        invite = self.ua.invites[0]
        self.assertEqual((invite["target"], invite["caller"], invite["call_id"]),
                         ("sip:bob@192.0.2.10", "sip:bot@192.0.2.1", "call-1"))
        self.assertEqual(invite["headers"], [("X-Tag", "7")])
        self.assertIn("m=audio 30000 RTP/AVP 0 8 101", invite["sdp"])
        invite["on_provisional"](Response(100))
        invite["on_provisional"](Response(180))
        invite["on_provisional"](Response(183, b"v=0..."))
        self.assertEqual(self.ringing, [False, True])
        self.assertNoResult(d)
        answer = sdp()
        call = FakeCall(answer)
        invite["deferred"].callback(call)
        leg = self.successResultOf(d)
        self.assertIsInstance(leg, SipLeg)
        self.assertEqual(leg.answer_sdp, answer.decode())
        self.assertIsNotNone(call.listener)
        self.assertEqual((leg.can_transfer, leg.audio_on_control_socket, leg.media_rate_hz, leg.frame_bytes),
                         (True, False, 16000, 640))
        assert leg.rtp is not None
        self.assertEqual(leg.ssrc, leg.rtp.ssrc)
        self.assertIsNone(leg.last_activity_at)

    def test_rejection(self) -> None:
        """A final non-2xx fails the dial with LegRejectedError(status, reason) and frees the RTP ports."""
        d = self.dial()
        self.assertEqual(self.alloc.used_count, 1)
        self.ua.invites[0]["deferred"].errback(CallRejected(486, "Busy Here"))
        f = self.failureResultOf(d, LegRejectedError)
        self.assertEqual((f.value.status, f.value.reason), (486, "Busy Here"))
        self.assertEqual(self.alloc.used_count, 0)

    def test_cancel_sends_cancel_and_frees_ports(self) -> None:
        """Cancelling the dial cancels the INVITE (the user agent sends CANCEL) and frees the ports."""
        d = self.dial()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.ua.cancels, 1)
        self.assertEqual(self.alloc.used_count, 0)

    def test_timeout_cancels(self) -> None:
        """A timeout on the dial (a transfer's) sends CANCEL and fails with TimeoutError."""
        d = self.dial()
        d.addTimeout(5, self.reactor)
        self.reactor.advance(5)
        self.failureResultOf(d, TimeoutError)
        self.assertEqual((self.ua.cancels, self.alloc.used_count), (1, 0))

    def test_unusable_answer(self) -> None:
        """An answer SDP that does not fit our offer: BYE, ports freed, LegSetupError."""
        d = self.dial()
        call = FakeCall(sdp(G729_ONLY))
        self.ua.invites[0]["deferred"].callback(call)
        self.failureResultOf(d, LegSetupError)
        self.assertEqual(len(call.byes), 1)
        self.assertEqual(self.alloc.used_count, 0)

    def test_setup_errors_are_synchronous(self) -> None:
        """No callee raises LegOptionError; no free RTP ports raise LegSetupError; nothing is sent or held."""
        with self.assertRaises(LegOptionError):
            self.dial(CallOption(callee=None))
        self.alloc = self.media.allocator = RtpPortAllocator(30000, 30001)
        self.dialer = SipDialer(self.media, self.reactor, self.ids)
        self.dial()
        with self.assertRaises(LegSetupError):
            self.dial()
        self.assertEqual((len(self.ua.invites), self.alloc.used_count), (1, 1))

    def test_bad_uri(self) -> None:
        """A callee the trunk rules cannot parse raises LegSetupError and frees the ports."""
        self.media.trunk_rules = parse_config('[[trunk_rules]]\nrule.rewrite.to.host = "x"\n', Overrides()).trunk_rules
        with self.assertRaises(LegSetupError):
            self.dial(CallOption(callee="sip:"))
        self.assertEqual((self.ua.invites, self.alloc.used_count), ([], 0))

    def test_refer(self) -> None:
        """refer() sends REFER in the dialog and returns its response."""
        leg, call = self.answered_leg()
        response = self.successResultOf(leg.refer("sip:carol@192.0.2.20"))
        self.assertEqual((call.refers, response.status), (["sip:carol@192.0.2.20"], 202))

    def test_send_message(self) -> None:
        """send_message() sends MESSAGE in the dialog with its content type and only safe headers."""
        leg, call = self.answered_leg()
        response = self.successResultOf(leg.send_message("héllo", "text/plain", {"X-A": "1", "X-B": "a\r\nVia: x"}))
        self.assertEqual(response.status, 200)
        self.assertEqual(call.messages, [("héllo".encode(), "text/plain", [("X-A", "1")])])
        failure = self.failureResultOf(leg.send_message("x", "text/plain\r\nVia: SIP/2.0/UDP evil"), LegSetupError)
        self.assertIn("invalid message.contentType", failure.getErrorMessage())
        self.assertEqual(len(call.messages), 1, "nothing sent with a multi-line content type")


class CloseTests(SipTestBase):
    """close(): BYE with headers unless the far end ended, media released, idempotent."""

    def test_bye_with_headers_once(self) -> None:
        """close(headers) sends one BYE with the safe headers, frees the ports; a second close sends nothing."""
        leg, call = self.answered_leg()
        d = leg.close({"X-Reason": "done", "Bad Name": "x"})
        self.successResultOf(d)
        self.assertEqual(call.byes, [[("X-Reason", "done")]])
        self.assertEqual(self.alloc.used_count, 0)
        self.successResultOf(leg.close({"X-Other": "1"}))
        self.assertEqual(len(call.byes), 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_no_bye_after_far_end_bye(self) -> None:
        """After the far end's BYE, close() only releases the media."""
        leg, call = self.answered_leg()
        call.far_bye()
        self.successResultOf(leg.close())
        self.assertEqual(call.byes, [])
        self.assertEqual(self.alloc.used_count, 0)

    def test_no_bye_on_terminated_dialog(self) -> None:
        """A dialog the user agent already ended (timeout) gets no BYE."""
        leg, call = self.answered_leg()
        call.terminated = True
        self.successResultOf(leg.close())
        self.assertEqual(call.byes, [])

    def test_bye_error_is_logged(self) -> None:
        """A BYE that fails is logged, and the media is released anyway."""
        leg, call = self.answered_leg()
        call.bye = lambda headers=(): fail(DialogError("gone", status=481))  # type: ignore[method-assign]
        self.successResultOf(leg.close())
        self.assertEqual(len(self.flushLoggedErrors(DialogError)), 1)
        self.assertEqual(self.alloc.used_count, 0)


class ListenerTests(SipTestBase):
    """The dialog listener: ends, re-offers and hold, INFO, MESSAGE, REFER, NOTIFY."""

    def test_bye_ends_once(self) -> None:
        """A BYE (then the dialog's end) is one ended("hangup")."""
        leg, call = self.answered_leg()
        call.far_bye()
        self.assertEqual(self.events.seen, [("ended", "hangup")])

    def test_dialog_timeouts(self) -> None:
        """A dialog timeout ends the leg; our own BYE or a rejection does not report an end."""
        leg, call = self.answered_leg()
        call.listener.on_terminated("bye-sent")
        call.listener.on_terminated("rejected")
        self.assertEqual(self.events.seen, [])
        call.listener.on_terminated("timeout")
        self.assertEqual(self.events.seen, [("ended", "hangup")])

    def test_reinvite_answered_in_place(self) -> None:
        """A re-offer is answered on the same port, session id and keys with the next version; the RtpLeg follows."""
        leg, call = self.answered_leg()
        assert leg.rtp is not None
        port = leg.rtp.local_port
        first = self.reinvite(call, sdp(audio("sendonly")))
        second = self.reinvite(call, sdp(audio()))
        assert first is not None and second is not None
        o1 = [line for line in first.decode().splitlines() if line.startswith("o=")][0].split()
        o2 = [line for line in second.decode().splitlines() if line.startswith("o=")][0].split()
        self.assertEqual((o1[1], o1[2], o2[1], o2[2]), (str(leg.sdp_session_id), "2", str(leg.sdp_session_id), "3"))
        self.assertIn(f"m=audio {port} RTP/AVP 0 101", second.decode())
        self.assertIn("a=recvonly", first.decode())
        self.assertEqual(self.holds(), [True, False])
        self.assertFalse(leg.rtp.on_hold)

    def test_hold_forms(self) -> None:
        """sendonly, inactive, c=0.0.0.0 and c=:: hold; each change is reported once, repeats are not."""
        leg, call = self.answered_leg()
        for body, held in [
            (sdp(audio("sendonly")), True),
            (sdp(audio("sendonly")), True),
            (sdp(audio()), False),
            (sdp(audio("inactive")), True),
            (sdp(audio()), False),
            (sdp(audio(), session_c="c=IN IP4 0.0.0.0"), True),
            (sdp(audio()), False),
            (sdp(audio(), session_c="c=IN IP6 ::"), True),
            (sdp(audio(), session_c="c=IN IP6 2001:db8::1"), False),
        ]:
            with self.subTest(body=body, held=held):
                self.assertIsNotNone(self.reinvite(call, body))
                assert leg.rtp is not None
                self.assertEqual(leg.rtp.on_hold, held)
        self.assertEqual(self.holds(), [True, False, True, False, True, False, True, False])

    def test_only_the_audio_stream_counts(self) -> None:
        """An inactive video stream on 0.0.0.0 is no hold; a held audio stream beside live video is."""
        leg, call = self.answered_leg()
        self.reinvite(call, sdp(audio(), VIDEO_INACTIVE))
        self.assertEqual(self.holds(), [])
        video = "m=video 40002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\na=sendrecv\r\n"
        self.reinvite(call, sdp(video, audio("sendonly")))
        self.assertEqual(self.holds(), [True])

    def test_unanswerable_reoffer_still_reports_hold(self) -> None:
        """A re-offer without a common codec returns None (the user agent answers) and its hold is still reported."""
        leg, call = self.answered_leg()
        self.assertIsNone(self.reinvite(call, sdp(G729_ONLY + "a=sendonly\r\n")))
        self.assertIsNone(self.reinvite(call, sdp(G729_ONLY, session_c="c=IN IP6 ::")))
        self.assertIsNone(self.reinvite(call, sdp(G729_ONLY)))
        self.assertEqual(self.holds(), [True, False])
        assert leg.rtp is not None
        self.assertEqual(leg.rtp.negotiated.codec, "pcmu")

    def test_offerless_reinvite(self) -> None:
        """A re-INVITE without SDP returns None and is no hold."""
        leg, call = self.answered_leg()
        self.assertIsNone(self.reinvite(call, b""))
        self.assertEqual(self.holds(), [])

    def test_info_digits(self) -> None:
        """INFO `Signal=` lines (any case) are digits; other lines, `Signal =` and empty signals are not."""
        leg, call = self.answered_leg()
        call.listener.on_info(Request(b"Signal=5\r\nDuration=160\r\n"))
        call.listener.on_info(Request(b" signal= # \r\nSignal = 9\r\n"))
        call.listener.on_info(Request(b"Signal=\r\nfoo=1\r\n"))
        self.assertEqual(self.events.seen, [("dtmf", "5"), ("dtmf", "#")])

    def test_message_and_refer(self) -> None:
        """MESSAGE gives its text and Content-Type; REFER its Refer-To and Referred-By."""
        leg, call = self.answered_leg()
        call.listener.on_message(Request("hé".encode(), (("Content-Type", "text/plain"),)))
        call.listener.on_message(Request(b"\xff"))
        call.listener.on_refer(Request(headers=(("Refer-To", "<sip:carol@192.0.2.20>"), ("Referred-By", "<sip:a@b>"))))
        call.listener.on_refer(Request())
        self.assertEqual(self.events.seen, [
            ("message", "hé", "text/plain"), ("message", "\ufffd", None),
            ("transfer_requested", "<sip:carol@192.0.2.20>", "<sip:a@b>"), ("transfer_requested", "", None),
        ])

    def test_notify_sipfrag(self) -> None:
        """A NOTIFY's sipfrag status (three ASCII digits) is reported with its text; anything else is ignored."""
        leg, call = self.answered_leg()
        for body in (b"SIP/2.0 180 Ringing\r\n", b"SIP/2.0 200 OK", b"SIP/2.0 503 Service Unavailable\r\nX: y",
                     "SIP/2.0 \u00b200 OK".encode(), b"SIP/2.0 20 OK", b"SIP/2.0", b"", b"SIP/2.0 abc x"):
            call.listener.on_notify(Request(body))
        self.assertEqual(self.events.seen, [
            ("transfer_progress", 180, "180 Ringing"), ("transfer_progress", 200, "200 OK"),
            ("transfer_progress", 503, "503 Service Unavailable"),
        ])
        self.assertEqual(sipfrag_status(b"SIP/2.0 486 Busy Here"), (486, "486 Busy Here"))

    def test_nothing_reported_before_attach_or_after_close(self) -> None:
        """Before attach and after close the leg reports nothing."""
        d = self.dial()
        call = FakeCall(sdp())
        self.ua.invites[0]["deferred"].callback(call)
        leg = self.successResultOf(d)
        call.listener.on_info(Request(b"Signal=1"))
        leg.attach(FrameQueue(), ListSink([]), self.events)
        leg.close()
        call.listener.on_info(Request(b"Signal=2"))
        call.listener.on_bye(Request())
        self.assertEqual(self.events.seen, [])


class InboundTests(SipTestBase):
    """InboundSipLeg: the offer, prepare, ring, answer, reject, CANCEL and close."""

    def test_offer_fields(self) -> None:
        """caller, callee, the offer text and the INVITE's non-standard headers (X-*, P-*, Diversion), no standard one."""
        offer = sdp()
        leg, _ = self.inbound_leg(offer, (("X-Tenant", "7"), ("x-lower", "a"), ("Subject", "no"),
                                          ("P-Asserted-Identity", "<sip:100@pbx>"), ("Diversion", "<sip:200@pbx>"),
                                          ("User-Agent", "no"), ("s", "no")))
        self.assertEqual((leg.caller, leg.callee, leg.offer_sdp), ("sip:alice@192.0.2.10", "sip:bot@192.0.2.1",
                                                                  offer.decode()))
        self.assertEqual(leg.custom_headers, {"X-Tenant": "7", "x-lower": "a", "P-Asserted-Identity": "<sip:100@pbx>",
                                              "Diversion": "<sip:200@pbx>"})
        self.assertEqual((leg.answer_sdp, leg.ssrc, leg.last_activity_at), ("", 0, None))

    def test_prepare_ring_answer(self) -> None:
        """prepare answers the offer; ring sends 180 or 183 with our SDP; answer sends 200 and fires on ACK."""
        leg, call = self.inbound_leg()
        leg.prepare()
        leg.attach(FrameQueue(), ListSink([]), self.events)
        self.assertIn("m=audio 30000 RTP/AVP 0 101", leg.answer_sdp)
        self.assertIsNotNone(call.listener)
        leg.prepare()
        self.assertEqual(self.alloc.used_count, 1)
        leg.ring(False)
        leg.ring(True)
        d = leg.answer()
        self.assertEqual(call.responses, [(180, None, None), (183, None, leg.answer_sdp.encode()),
                                          (200, None, leg.answer_sdp.encode())])
        self.assertNoResult(d)
        call.acked.callback(call)
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNotNone(self.reinvite(call, sdp(audio("sendonly"))))
        self.assertEqual(self.holds(), [True])

    def test_prepare_failure_declines(self) -> None:
        """An offer without a common codec: 488 sent, ports freed, LegSetupError; close() sends nothing more."""
        leg, call = self.inbound_leg(sdp(G729_ONLY))
        with self.assertRaises(LegSetupError) as e:
            leg.prepare()
        self.assertIn("no common codec", str(e.exception))
        self.assertEqual(call.responses, [(488, "Not Acceptable Here", None)])
        self.assertEqual(self.alloc.used_count, 0)
        self.successResultOf(leg.close())
        self.assertEqual(len(call.responses), 1)

    def test_answer_failures(self) -> None:
        """The user agent's CallRejected becomes LegRejectedError with its status; other errors carry theirs, else 500."""
        for error, status in ((CallRejected(408, "ACK Timeout"), 408), (DialogError("INVITE already answered"), 500),
                              (RuntimeError("boom"), 500), (DialogError("no", status=481), 481)):
            with self.subTest(error=error):
                leg, call = self.inbound_leg()
                d = leg.answer()
                call.acked.errback(error)
                f = self.failureResultOf(d, LegRejectedError)
                self.assertEqual(f.value.status, status)
                leg.close()

    def test_cancel_before_answer(self) -> None:
        """CANCEL while ringing is one ended("hangup"); an answer attempted then fails with 487; close() sends nothing."""
        leg, call = self.inbound_leg()
        leg.prepare()
        leg.attach(FrameQueue(), ListSink([]), self.events)
        leg.ring(False)
        call.far_cancel()
        self.assertEqual(self.events.seen, [("ended", "hangup")])
        d = leg.answer()
        f = self.failureResultOf(d, LegRejectedError)
        self.assertEqual((f.value.status, f.value.reason), (487, "Request Terminated"))
        self.successResultOf(leg.close())
        self.assertEqual(call.responses[-1][0], 200)
        self.assertEqual(call.byes, [])

    def test_ack_timeout_is_a_failure(self) -> None:
        """An answer never ACKed ends the leg as "failed"."""
        leg, call = self.inbound_leg()
        leg.prepare()
        leg.attach(FrameQueue(), ListSink([]), self.events)
        leg.answer().addErrback(lambda f: None)
        call.listener.on_terminated("ack-timeout")
        self.assertEqual(self.events.seen, [("ended", "failed")])

    def test_close_before_answer_is_487(self) -> None:
        """Hanging up a ringing inbound call answers its INVITE 487 and frees the ports."""
        leg, call = self.inbound_leg()
        leg.ring(False)
        self.successResultOf(leg.close({"X-Ignored": "1"}))
        self.assertEqual(call.responses, [(180, None, None), (487, None, None)])
        self.assertEqual(self.alloc.used_count, 0)

    def test_reject(self) -> None:
        """reject() declines with the code and reason; close() then sends nothing."""
        leg, call = self.inbound_leg()
        leg.reject(486, "Busy Here")
        self.successResultOf(leg.close())
        self.assertEqual(call.responses, [(486, "Busy Here", None)])

    def test_reoffer_before_answer(self) -> None:
        """An UPDATE before the answer is left to the user agent (None), its hold still reported."""
        leg, call = self.inbound_leg()
        leg.prepare()
        leg.attach(FrameQueue(), ListSink([]), self.events)
        self.assertIsNone(self.reinvite(call, sdp(audio("inactive"))))
        self.assertEqual(self.holds(), [True])

    def test_bye_after_answer(self) -> None:
        """The caller's BYE after the answer ends the leg once and close() sends no BYE."""
        leg, call = self.inbound_leg()
        leg.prepare()
        leg.attach(FrameQueue(), ListSink([]), self.events)
        leg.answer()
        call.acked.callback(call)
        call.far_bye()
        self.successResultOf(leg.close())
        self.assertEqual((self.events.seen, call.byes), ([("ended", "hangup")], []))


class StreamStartTests(SipTestBase):
    """Issue 10.3: the RTP stream (a packet every 20 ms, silence included) runs from 183 or the answer."""

    def test_inbound_streams_from_early_media_or_answer(self) -> None:
        """Prepared or ringing with 180 the leg does not stream; 183 with SDP or the 200 starts it."""
        for early in (True, False):
            with self.subTest(early=early):
                leg, call = self.inbound_leg()
                leg.prepare()
                assert leg.rtp is not None
                leg.ring(False)
                self.assertFalse(leg.rtp.streaming)
                if early:
                    leg.ring(True)
                    self.assertTrue(leg.rtp.streaming)
                leg.answer()
                self.assertTrue(leg.rtp.streaming)
                leg.close()

    def test_outbound_streams_once_answered(self) -> None:
        """An answered outbound leg streams at once."""
        leg, _ = self.answered_leg()
        assert leg.rtp is not None
        self.assertTrue(leg.rtp.streaming)
