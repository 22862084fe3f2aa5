"""SIP legs: outbound calls (:class:`SipDialer`), inbound calls (:class:`SipInboundFactory`), the dialog listener.

A SIP leg is a dialog of the user agent plus its :class:`~activecall.legs.rtp.RtpLeg`,
presented to the call as one :class:`~activecall.media.tracks.ILeg`:

* :class:`SipLeg`: a call we placed, once answered (``SipDialer.dial`` fires with it);
* :class:`InboundSipLeg`: a call offered to us, from the offer to its end.

Each leg installs a :class:`SipDialogListener` as ``call.listener`` (an
outbound leg when the 2xx made it, an inbound one when :meth:`InboundSipLeg.prepare`
takes the call over) and reports the far end through the
:class:`~activecall.media.tracks.ILegEvents` given to ``attach``: BYE, CANCEL
and dialog timeouts end the leg; re-INVITE/UPDATE offers are answered in place
on the same port and keys, and hold changes reported; INFO digits, MESSAGE,
REFER and the NOTIFYs of our REFER are passed on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from activecall.config import RegisterUser
from activecall.legs import NO_EVENTS
from activecall.legs.rtp import FRAME_BYTES, MEDIA_RATE_HZ, RtpLeg, RtpMediaEngine
from activecall.media.tracks import (
    NO_AUDIO,
    AudioSink,
    AudioSource,
    IInboundLeg,
    IInboundLegFactory,
    ILeg,
    ILegDialer,
    ILegEvents,
    LegOptionError,
    LegRejectedError,
    LegSetupError,
)
from activecall.options import MAX_SIP_HEADERS, CallOption, sip_header_problem, sip_value_problem
from activecall.rtp.srtp import AES_CM_128_HMAC_SHA1_80, generate_crypto
from activecall.rtp.transport import RtpEndpoint, RtpPortAllocator
from activecall.sdp.negotiation import answer_offer, apply_answer, build_offer, offer_holds
from activecall.sip.message import canonical_name
from activecall.sip.uri import SipUri, parse_uri, transport_for_uri
from activecall.sip.useragent import CallRejected

__all__ = [
    "SipMedia",
    "SipLeg",
    "InboundSipLeg",
    "SipDialer",
    "SipInboundFactory",
    "SipDialogListener",
    "outgoing_headers",
    "caller_uri",
    "callee_uri",
    "credentials_for",
    "apply_trunk_rules",
    "sipfrag_status",
]

_log = Logger(namespace="activecall.legs.sip")
# Dialog ends (CallDialog.on_terminated reasons) that mean the far end is gone.
_FAR_END_GONE = ("bye-received", "timeout", "cancel")


#: Header fields of RFC 3261 §20 and the IETF extensions every PBX sends; an INVITE's other headers
#: (X-*, P-*, vendor ones) are the call's custom headers, reported in ``incoming``.
STANDARD_HEADERS = frozenset({
    "accept", "accept-encoding", "accept-language", "alert-info", "allow", "allow-events", "authentication-info",
    "authorization", "call-id", "call-info", "contact", "content-disposition", "content-encoding",
    "content-language", "content-length", "content-type", "cseq", "date", "error-info", "event", "expires",
    "from", "in-reply-to", "max-forwards", "mime-version", "min-expires", "min-se", "organization", "priority",
    "proxy-authenticate", "proxy-authorization", "proxy-require", "rack", "record-route", "reply-to", "require",
    "retry-after", "route", "rseq", "server", "session-expires", "subject", "supported", "timestamp", "to",
    "unsupported", "user-agent", "via", "warning", "www-authenticate", "refer-to", "referred-by", "replaces",
    "accept-contact", "reject-contact", "request-disposition", "identity", "identity-info", "path",
    "service-route", "privacy", "reason", "security-client", "security-server", "security-verify",
    "subscription-state", "target-dialog",
})


def outgoing_headers(headers: Optional[Mapping[str, str]]) -> list[tuple[str, str]]:
    """``headers`` fit to put on an outgoing request; unsafe ones are dropped with a warning.

    Commands and options are validated when decoded (``check_sip_headers``); this is the last
    check where headers leave, for values built later (templates, transfer headers).
    """
    safe: list[tuple[str, str]] = []
    for name, value in (headers or {}).items():
        problem = sip_header_problem(name, value)
        if problem is None and len(safe) < MAX_SIP_HEADERS:
            safe.append((name, value))
        else:
            _log.warn("SIP header {name!r} not sent: {problem}", name=name[:64], problem=problem or "too many headers")
    return safe


@dataclass
class SipMedia:
    """What SIP legs need from the daemon (built by tap.py)."""

    reactor: Any
    user_agent: Any  # activecall.sip.useragent.SipUserAgent
    engine: RtpMediaEngine
    allocator: RtpPortAllocator
    codecs: Sequence[str]
    advertise_ip: str  # external_ip, else the SIP listener's address
    bind_ip: str = ""
    latching: bool = True
    enable_srtp: bool = False
    register_users: Sequence[RegisterUser] = field(default_factory=tuple)
    # config.md §12: ``rewrite(uri) -> str | None``, the URI whose host/port the INVITE goes to.
    rewrite: Optional[Callable[[str], Optional[str]]] = None
    # config.md §12.1 [[trunk_rules]] (activecall.config.TrunkRule), applied before the rewrites.
    trunk_rules: Sequence[Any] = field(default_factory=tuple)


@dataclass(frozen=True)
class _Credentials:
    username: str
    password: str
    realm: Optional[str] = None


def caller_uri(option: CallOption) -> str:
    """The From URI (protocol.md §4.1): ``sip:`` added; default from ``sip.username``."""
    if option.caller:
        return option.caller if option.caller.startswith(("sip:", "sips:")) else "sip:" + option.caller
    sip = option.sip
    if sip is not None and sip.username:
        return f"sip:{sip.username}@{sip.realm or '127.0.0.1'}"
    return "sip:active-call@127.0.0.1"


def callee_uri(option: CallOption) -> str:
    """The target URI with ``sip:`` added when missing."""
    assert option.callee
    return option.callee if option.callee.startswith(("sip:", "sips:", "tel:")) else "sip:" + option.callee


def _host_of(uri: str) -> str:
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    rest = rest.split("@", 1)[-1]
    return rest.split(";", 1)[0].split(":", 1)[0].split(">", 1)[0].lower()


def credentials_for(option: CallOption, register_users: Sequence[RegisterUser]) -> Optional[_Credentials]:
    """Digest credentials: the option's ``sip``, else a ``[[register_users]]`` entry on the callee's host."""
    sip = option.sip
    if sip is not None:
        if sip.username and sip.password is not None:
            return _Credentials(sip.username, sip.password, sip.realm)
        return None
    host = _host_of(callee_uri(option))
    for user in register_users:
        if user.credential is not None and _host_of(user.server) == host:
            c = user.credential
            return _Credentials(c.username, c.password, c.realm)
    return None


def _rewrite_part(uri: SipUri, user: Optional[str], host: Optional[str]) -> SipUri:
    uri = uri.copy()
    if user is not None:
        uri.user = user
    if host is not None:
        name, _, port = host.partition(":")
        if port and not port.isdigit():
            return uri  # an unparseable host value is skipped (config.md §12.1)
        uri.host = name
        if port:
            uri.port = int(port)
    return uri


def apply_trunk_rules(rules: Sequence[Any], to_uri: str, from_uri: str, contact: Optional[str],
                      local_contact: Callable[[], str]) -> tuple[str, str, Optional[str]]:
    """The first matching ``[[trunk_rules]]`` entry rewrites From, To/Request-URI and Contact (§12.1)."""
    if not rules or to_uri.startswith("tel:"):
        return to_uri, from_uri, contact
    to, frm = parse_uri(to_uri), parse_uri(from_uri)
    for rule in rules:
        if not rule.matches(frm.user, frm.host, to.user, to.host):
            continue
        frm = _rewrite_part(frm, rule.rewrite_from_user, rule.rewrite_from_host)
        to = _rewrite_part(to, rule.rewrite_to_user, rule.rewrite_to_host)
        if rule.rewrite_contact_user is not None or rule.rewrite_contact_host is not None:
            base = parse_uri(contact) if contact else parse_uri(local_contact())
            contact = str(_rewrite_part(base, rule.rewrite_contact_user, rule.rewrite_contact_host))
        break
    return str(to), str(frm), contact


def _srtp_wanted(media: SipMedia, option: Optional[CallOption]) -> bool:
    """Per-call ``sip.enable_srtp`` wins over the config's ``enable_srtp``."""
    sip = option.sip if option is not None else None
    if sip is not None and sip.enable_srtp is not None:
        return bool(sip.enable_srtp)
    return media.enable_srtp


def sipfrag_status(body: bytes) -> Optional[tuple[int, str]]:
    """The status of a NOTIFY's ``message/sipfrag`` (``SIP/2.0 180 Ringing``): ``(180, "180 Ringing")``.

    None unless the first line has a status of three ASCII digits
    (``'²'.isdigit()`` is true, ``int('²')`` raises).
    """
    line = body.decode("utf-8", "replace").strip().splitlines()[:1]
    parts = line[0].split(None, 2) if line else []
    if len(parts) < 2 or len(parts[1]) != 3 or not (parts[1].isascii() and parts[1].isdigit()):
        return None
    return int(parts[1]), " ".join(parts[1:])


def _info_digits(body: bytes) -> list[str]:
    """The digits of a SIP INFO ``application/dtmf-relay`` body (``Signal=5`` lines)."""
    digits = []
    for line in body.decode("utf-8", "replace").splitlines():
        if line.strip().lower().startswith("signal="):
            digit = line.split("=", 1)[1].strip()[:1]
            if digit:
                digits.append(digit)
    return digits


class SipDialogListener:
    """The user agent's listener for one SIP leg's dialog (``call.listener``), either direction.

    Turns in-dialog requests into :class:`~activecall.media.tracks.ILegEvents`
    of the leg; a re-INVITE/UPDATE offer is answered by the leg.
    """

    __slots__ = ("_leg",)

    def __init__(self, leg: _SipLegBase) -> None:
        self._leg = leg

    def on_bye(self, request: Any) -> None:
        """The far end hung up."""
        self._leg._far_end_ended("hangup")

    def on_cancel(self) -> None:
        """The caller gave up before we answered (the user agent already sent 487)."""
        self._leg._far_end_ended("hangup")

    def on_terminated(self, reason: str) -> None:
        """The dialog ended: the far end's BYE or CANCEL, a timeout, or our 2xx never ACKed ("failed")."""
        if reason in _FAR_END_GONE:
            self._leg._far_end_ended("hangup")
        elif reason == "ack-timeout":
            self._leg._far_end_ended("failed")

    def on_reinvite(self, sdp: bytes) -> Optional[bytes]:
        """A re-INVITE/UPDATE offer: our answer, or None for the user agent's default."""
        return self._leg._reoffer(sdp)

    def on_info(self, request: Any) -> None:
        """INFO ``Signal=`` digits (DTMF relay)."""
        for digit in _info_digits(request.body):
            self._leg._events.dtmf(digit)

    def on_message(self, request: Any) -> None:
        """An in-dialog MESSAGE."""
        self._leg._events.message(request.body.decode("utf-8", "replace"), request.headers.first("Content-Type"))

    def on_refer(self, request: Any) -> None:
        """The far end asks us to transfer (REFER, already answered 202)."""
        headers = request.headers
        self._leg._events.transfer_requested(headers.first("Refer-To") or "", headers.first("Referred-By"))

    def on_notify(self, request: Any) -> None:
        """A NOTIFY of our REFER: its sipfrag status, when it has one."""
        status = sipfrag_status(request.body)
        if status is not None:
            self._leg._events.transfer_progress(*status)


def custom_headers_of(call: Any) -> dict[str, str]:
    """The INVITE's non-standard headers (X-*, P-*, Diversion ...), name as received -> value."""
    return {name: value for name, value in call.request.headers.items()
            if canonical_name(name) not in STANDARD_HEADERS}


class _SipLegBase:
    """What both SIP legs share: the dialog, its RtpLeg, re-offers, close."""

    _log = Logger()

    media_rate_hz = MEDIA_RATE_HZ
    frame_bytes = FRAME_BYTES
    can_transfer = True
    audio_on_control_socket = False
    signals_media_ready = True

    @property
    def native_rate_hz(self) -> int:
        """8000 while the far end speaks G.711 (narrowband), else the media rate."""
        rtp = self._rtp
        if rtp is not None and rtp.negotiated.codec in ("pcmu", "pcma"):
            return 8000
        return MEDIA_RATE_HZ

    def __init__(self, media: SipMedia, call: Any, ids: Any, clock: IReactorTime) -> None:
        self._media = media
        self.call = call
        self._ids = ids
        self._clock = clock
        self._rtp: Optional[RtpLeg] = None
        self._source: AudioSource = NO_AUDIO
        self._sink: AudioSink = NO_AUDIO
        self._events: ILegEvents = NO_EVENTS
        self._attached = False
        self._answered = False
        self._remote_ended = False
        self._ended_reported = False
        self._closed = False
        self._on_hold = False
        self.sdp_session_id = 0
        self._sdp_version = 1

    # -- ILeg ---------------------------------------------------------------

    @property
    def ssrc(self) -> int:
        """The RTP SSRC (0 before the media exists)."""
        return self._rtp.ssrc if self._rtp is not None else 0

    @property
    def last_activity_at(self) -> Optional[float]:
        """When the last valid RTP packet arrived, or None."""
        return self._rtp.last_activity_at if self._rtp is not None else None

    @property
    def rtp(self) -> Optional[RtpLeg]:
        """The media leg (None before an inbound leg is prepared)."""
        return self._rtp

    def attach(self, source: AudioSource, sink: AudioSink, events: ILegEvents) -> None:
        """Exchange audio with ``source``/``sink`` and report the far end to ``events``."""
        if self._closed:
            return
        self._source, self._sink, self._events = source, sink, events
        self._attached = True
        if self._rtp is not None and not self._rtp.closed:
            self._rtp.attach(source, sink, events)

    def send_dtmf(self, digits: str) -> bool:
        """Play ``digits`` on the RTP stream (RFC 4733, else in-band); False before there is one."""
        if self._closed or self._rtp is None or self._rtp.closed:
            return False
        self._rtp.send_dtmf(digits)
        return True

    def refer(self, target: str) -> Deferred[Any]:
        """Send REFER for ``target``; its NOTIFYs arrive as ``events.transfer_progress``."""
        return self.call.refer(target)

    def send_message(self, body: str, content_type: str, headers: Optional[Mapping[str, str]] = None) -> Deferred[Any]:
        """Send MESSAGE in the dialog (RFC 3428); fires with the final response.

        The content type is checked again where it leaves, as every header value is."""
        problem = sip_value_problem(content_type)
        if problem is not None:
            return fail(LegSetupError(f"invalid message.contentType: {problem}"))
        return self.call.message(body.encode("utf-8"), content_type, headers=outgoing_headers(headers))

    def close(self, headers: Optional[Mapping[str, str]] = None) -> Deferred[None]:
        """BYE (carrying ``headers``) unless the far end ended the dialog, then release the media.

        Before an inbound call is answered the BYE is a 487 to its INVITE.  Idempotent: every
        call returns a Deferred firing when the RTP ports are free.
        """
        if not self._closed:
            self._closed = True
            self._events = NO_EVENTS
            call = self.call
            if not self._remote_ended and not call.terminated:
                bye = call.bye(headers=outgoing_headers(headers))
                bye.addErrback(lambda f: self._log.failure("BYE failed", f))
        return self._rtp.close() if self._rtp is not None else succeed(None)

    # -- from the dialog listener ------------------------------------------------

    def _far_end_ended(self, cause: str) -> None:
        self._remote_ended = True
        if not self._ended_reported:
            self._ended_reported = True
            self._events.ended(cause)

    def _reoffer(self, sdp: bytes) -> Optional[bytes]:
        """Answer a re-INVITE/UPDATE offer on the same port and keys and report a hold change.

        None lets the user agent answer with our last SDP (an offerless
        re-INVITE, an offer we cannot answer, or a call not yet answered).
        """
        answer: Optional[bytes] = None
        held = False
        rtp = self._rtp
        if sdp and rtp is not None and self._answered and not rtp.closed:
            self._sdp_version += 1
            media = self._media
            current = rtp.negotiated
            try:
                text, negotiated = answer_offer(
                    sdp, media.codecs, media.advertise_ip, rtp.local_port, session_id=self.sdp_session_id,
                    session_version=self._sdp_version, srtp=current.srtp,
                    make_crypto=lambda tag, suite: generate_crypto(tag, suite, self._ids),
                    local_crypto=current.local_crypto)
            except ValueError as e:
                self._log.info("re-offer not accepted: {e}", e=e)
                held = offer_holds(sdp)
            else:
                rtp.update(negotiated)
                held = negotiated.remote_hold
                answer = text.encode()
        elif sdp:
            held = offer_holds(sdp)
        if held != self._on_hold:
            self._on_hold = held
            self._events.hold(held)
        return answer


@implementer(ILeg)
class SipLeg(_SipLegBase):
    """An answered outbound SIP call: the dialog (``call``, an OutboundCall) and its RtpLeg."""

    def __init__(self, media: SipMedia, call: Any, rtp: RtpLeg, session_id: int, ids: Any,
                 clock: IReactorTime) -> None:
        super().__init__(media, call, ids, clock)
        self._rtp = rtp
        self._answered = True
        self.sdp_session_id = session_id
        #: The callee's SDP answer (the answer event's ``sdp``).
        self.answer_sdp = bytes(call.remote_sdp).decode("utf-8", "replace")
        call.listener = SipDialogListener(self)


@implementer(IInboundLeg)
class InboundSipLeg(_SipLegBase):
    """An inbound SIP call (``call``, an InboundCall): offered, prepared, ringing, answered, ended.

    States::

        offered --prepare()--> prepared (our SDP answer, RTP open, listener installed)
        offered/prepared --reject(code)--> ended
        prepared --ring(early)--> ringing --answer()--> answered --BYE either way / close()--> ended
        prepared/ringing --close()--> ended (487)   --CANCEL--> ended (events.ended)
    """

    def __init__(self, media: SipMedia, call: Any, option: Optional[CallOption], ids: Any,
                 clock: IReactorTime) -> None:
        super().__init__(media, call, ids, clock)
        self._option = option
        self.caller: str = call.caller
        self.callee: str = call.callee
        self.offer_sdp = bytes(call.remote_sdp).decode("utf-8", "replace")
        self.custom_headers = custom_headers_of(call)
        #: Our SDP answer ('' until prepared).
        self.answer_sdp = ""

    def prepare(self) -> None:
        """Answer the offer and open the RTP ports; declines with 488 and raises LegSetupError when it cannot."""
        if self._rtp is not None:
            return
        media = self._media
        endpoint = RtpEndpoint(media.reactor, media.allocator, bind_ip=media.bind_ip, latching=media.latching)
        try:
            port = endpoint.start()
            self.sdp_session_id = self._ids.getrandbits(31)
            self.answer_sdp, negotiated = answer_offer(
                self.call.remote_sdp, media.codecs, media.advertise_ip, port,
                session_id=self.sdp_session_id, srtp=_srtp_wanted(media, self._option),
                make_crypto=lambda tag, suite: generate_crypto(tag, suite, self._ids))
        except Exception as e:  # no acceptable codec / bad offer / no RTP ports
            endpoint.stop().addErrback(lambda f: self._log.failure("releasing RTP ports failed", f))
            self.answer_sdp = ""
            self.call.reject(488, "Not Acceptable Here")
            self._remote_ended = True
            raise LegSetupError(str(e)) from e
        self._rtp = RtpLeg(media.engine, endpoint, negotiated, clock=self._clock, rng=self._ids)
        if self._attached:
            self._rtp.attach(self._source, self._sink, self._events)
        self.call.listener = SipDialogListener(self)

    def ring(self, early_media: bool) -> None:
        """180 Ringing, or 183 with our SDP (early media); prepares the leg first if needed."""
        self.prepare()
        if early_media:
            self._start_stream()
        self.call.ringing(self.answer_sdp if early_media else None)

    def answer(self) -> Deferred[None]:
        """200 OK with our SDP; fires when the ACK came, fails with LegRejectedError (487, 408 ...).

        Prepares the leg first if needed (which may raise LegSetupError).
        """
        self.prepare()
        self._answered = True
        self._start_stream()
        d: Deferred[Any] = self.call.answer(self.answer_sdp)
        return d.addCallbacks(lambda _: None, _rejected)

    def _start_stream(self) -> None:
        """The peer has our SDP (183 or 200): from now on RTP flows every 20 ms, silence included."""
        assert self._rtp is not None  # prepared
        self._rtp.start_stream()

    def reject(self, code: int, reason: str) -> None:
        """Decline the call with a final response."""
        self._remote_ended = True
        self.call.reject(code, reason)


def _rejected(f: Failure) -> Failure:
    """The user agent's failure as :class:`LegRejectedError` (its status, else 500)."""
    if f.check(CallRejected):
        return Failure(LegRejectedError(f.value.status, f.value.reason))
    status = getattr(f.value, "status", None)
    return Failure(LegRejectedError(status if isinstance(status, int) else 500, str(f.value)))


@implementer(ILegDialer)
class SipDialer:
    """Places outbound SIP legs (call kind ``sip``): RTP ports and offer, INVITE, the SipLeg on 2xx."""

    _log = Logger()

    def __init__(self, media: SipMedia, clock: IReactorTime, ids: Any) -> None:
        self._media = media
        self._clock = clock
        self._ids = ids

    def dial(self, option: CallOption, call_id: str, on_ringing: Callable[[bool], None]) -> Deferred[SipLeg]:
        """Send the INVITE for ``option``: a Deferred firing with the answered :class:`SipLeg`.

        Raises :class:`LegOptionError` without a callee and :class:`LegSetupError` when the
        attempt cannot start (bad URI, no RTP ports, no listener); fails with
        :class:`LegRejectedError` on a final non-2xx and with :class:`LegSetupError` when
        the answer's SDP does not fit (after a BYE).  Cancelling it sends CANCEL.
        """
        if not option.callee:
            raise LegOptionError("missing field invite.option.callee")
        media = self._media
        ids = self._ids
        endpoint = RtpEndpoint(media.reactor, media.allocator, bind_ip=media.bind_ip, latching=media.latching)
        try:
            port = endpoint.start()
            crypto = [generate_crypto(1, AES_CM_128_HMAC_SHA1_80, ids)] if _srtp_wanted(media, option) else []
            session_id = ids.getrandbits(31)
            offer = build_offer(media.codecs, media.advertise_ip, port, session_id=session_id, crypto=crypto)
            sip = option.sip
            headers = outgoing_headers(sip.headers if sip is not None else None)
            contact = sip.contact if sip is not None and sip.contact else None
            callee = callee_uri(option)
            target, caller, contact = apply_trunk_rules(
                media.trunk_rules, callee, caller_uri(option), contact,
                lambda: str(media.user_agent.local_contact(transport_for_uri(callee))))
            next_hop = media.rewrite(target) if media.rewrite is not None else None
            invite = media.user_agent.invite(
                target, caller, contact=contact, sdp=offer.sdp, headers=headers,
                credentials=credentials_for(option, media.register_users), call_id=call_id,
                on_provisional=lambda response: on_ringing(bool(response.body)) if response.status > 100 else None,
                next_hop=next_hop)
        except Exception as e:  # bad URI, no ports, no listener for the transport
            self._release(endpoint)
            raise LegSetupError(str(e)) from e

        def answered(call: Any) -> SipLeg:
            try:
                negotiated = apply_answer(offer, call.remote_sdp)
            except ValueError as e:  # the answer's SDP does not fit our offer
                call.bye().addErrback(lambda f: self._log.failure("BYE failed", f))
                self._release(endpoint)
                raise LegSetupError(str(e)) from e
            rtp = RtpLeg(media.engine, endpoint, negotiated, clock=self._clock, rng=ids)
            rtp.start_stream()
            return SipLeg(media, call, rtp, session_id, ids, self._clock)

        def failed(f: Failure) -> Failure:
            self._release(endpoint)
            if f.check(CallRejected):
                return Failure(LegRejectedError(f.value.status, f.value.reason))
            return f  # CancelledError: the user agent sent CANCEL

        # The user agent's Deferred itself: cancelling it is what sends CANCEL.
        return invite.addCallbacks(answered, failed)

    def _release(self, endpoint: RtpEndpoint) -> None:
        endpoint.stop().addErrback(lambda f: self._log.failure("releasing RTP ports failed", f))


@implementer(IInboundLegFactory)
class SipInboundFactory:
    """Wraps inbound calls of the SIP user agent into :class:`InboundSipLeg`."""

    def __init__(self, media: SipMedia, clock: IReactorTime, ids: Any) -> None:
        self._media = media
        self._clock = clock
        self._ids = ids

    def inbound(self, call: Any, option: Optional[CallOption]) -> InboundSipLeg:
        """The leg for ``call`` (a user-agent InboundCall) with the call option (may be None)."""
        return InboundSipLeg(self._media, call, option, self._ids, self._clock)
