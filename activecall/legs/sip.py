"""Outbound SIP legs for ``/call/sip``: SDP offer, INVITE through the user agent, RTP leg on answer.

The controller keeps the call's logic; this module only joins the SIP user
agent (signalling) and the RTP engine (media) for one outgoing call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from activecall.config import RegisterUser
from activecall.options import MAX_SIP_HEADERS, CallOption, sip_header_problem
from activecall.sdp.negotiation import LocalOffer, answer_offer, apply_answer, build_offer
from activecall.legs.rtp import RtpLeg, RtpMediaEngine
from activecall.rtp.srtp import AES_CM_128_HMAC_SHA1_80, generate_crypto
from activecall.rtp.transport import RtpEndpoint, RtpPortAllocator
from activecall.sip.uri import SipUri, parse_uri, transport_for_uri


_log = Logger(namespace="activecall.legs.sip")


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
    """What outbound SIP calls need from the daemon (built by tap.py)."""

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


class OutboundSipLeg:
    """One outgoing call: RTP endpoint + offer, INVITE, then the RtpLeg on 2xx.

    ``start()`` returns the INVITE's Deferred (cancel it to send CANCEL);
    ``on_answer(call)`` turns the 2xx into the media leg.
    """

    def __init__(self, media: SipMedia, option: CallOption, call_id: str, rng: Any, clock: Any) -> None:
        self._media = media
        self._option = option
        self._call_id = call_id
        self._rng = rng
        self._clock = clock
        self.endpoint: Optional[RtpEndpoint] = None
        self.offer: Optional[LocalOffer] = None
        self.call: Any = None
        self.sdp_session_id = 0

    def srtp(self) -> bool:
        """Per-call ``sip.enable_srtp`` wins over the config's ``enable_srtp``."""
        sip = self._option.sip
        if sip is not None and sip.enable_srtp is not None:
            return bool(sip.enable_srtp)
        return self._media.enable_srtp

    def start(self, on_provisional: Callable[[Any], None]) -> Deferred[Any]:
        """Open the RTP ports, build the offer and send the INVITE."""
        media = self._media
        self.endpoint = RtpEndpoint(media.reactor, media.allocator, bind_ip=media.bind_ip, latching=media.latching)
        port = self.endpoint.start()
        crypto = [generate_crypto(1, AES_CM_128_HMAC_SHA1_80, self._rng)] if self.srtp() else []
        self.sdp_session_id = self._rng.getrandbits(31)
        self.offer = build_offer(media.codecs, media.advertise_ip, port,
                                 session_id=self.sdp_session_id, crypto=crypto)
        sip = self._option.sip
        headers = outgoing_headers(sip.headers if sip is not None else None)
        contact = sip.contact if sip is not None and sip.contact else None
        target, caller, contact = apply_trunk_rules(
            media.trunk_rules, callee_uri(self._option), caller_uri(self._option), contact,
            lambda: str(media.user_agent.local_contact(transport_for_uri(callee_uri(self._option)))))
        next_hop = media.rewrite(target) if media.rewrite is not None else None
        return media.user_agent.invite(
            target, caller, contact=contact, sdp=self.offer.sdp,
            headers=headers, credentials=credentials_for(self._option, media.register_users),
            call_id=self._call_id, on_provisional=on_provisional, next_hop=next_hop)

    def on_answer(self, call: Any, *, on_audio: Callable[[bytes], None], on_dtmf: Callable[[str], None],
                  on_media_ready: Callable[[], None]) -> RtpLeg:
        """The callee answered: negotiate its SDP and start media (raises NegotiationError)."""
        assert self.offer is not None and self.endpoint is not None
        self.call = call
        negotiated = apply_answer(self.offer, call.remote_sdp)
        return RtpLeg(self._media.engine, self.endpoint, negotiated, clock=self._clock, rng=self._rng,
                      on_audio=on_audio, on_dtmf=on_dtmf, on_media_ready=on_media_ready)

    def release(self) -> None:
        """The call never got media: give the RTP ports back."""
        if self.endpoint is not None:
            endpoint, self.endpoint = self.endpoint, None
            endpoint.stop()


class InboundSipLeg:
    """Media for an inbound call: RTP endpoint + SDP answer to the INVITE's offer, then the RtpLeg."""

    def __init__(self, media: SipMedia, call: Any, option: Optional[CallOption], rng: Any, clock: Any) -> None:
        self._media = media
        self.call = call
        self._option = option
        self._rng = rng
        self._clock = clock
        self.endpoint: Optional[RtpEndpoint] = None
        self.answer_sdp = ""
        self.leg: Optional[RtpLeg] = None

    def prepare(self, *, on_audio: Callable[[bytes], None], on_dtmf: Callable[[str], None],
                on_media_ready: Callable[[], None]) -> RtpLeg:
        """Answer the offer (raises NegotiationError/ValueError) and start media on our side."""
        media = self._media
        sip = self._option.sip if self._option is not None else None
        srtp = bool(sip.enable_srtp) if sip is not None and sip.enable_srtp is not None else media.enable_srtp
        self.endpoint = RtpEndpoint(media.reactor, media.allocator, bind_ip=media.bind_ip, latching=media.latching)
        port = self.endpoint.start()
        self.sdp_session_id = self._rng.getrandbits(31)
        try:
            self.answer_sdp, negotiated = answer_offer(
                self.call.remote_sdp, media.codecs, media.advertise_ip, port,
                session_id=self.sdp_session_id, srtp=srtp,
                make_crypto=lambda tag, suite: generate_crypto(tag, suite, self._rng))
        except Exception:
            self.release()
            raise
        self.leg = RtpLeg(media.engine, self.endpoint, negotiated, clock=self._clock, rng=self._rng,
                          on_audio=on_audio, on_dtmf=on_dtmf, on_media_ready=on_media_ready)
        return self.leg

    def release(self) -> None:
        """Give the RTP ports back when no leg took them over."""
        if self.leg is None and self.endpoint is not None:
            endpoint, self.endpoint = self.endpoint, None
            endpoint.stop()


def answer_reoffer(media: SipMedia, leg: RtpLeg, offer: bytes, session_id: int, version: int, rng: Any) -> str:
    """Answer a re-INVITE's offer on the same RTP port and keys, and update the running leg.

    Hold, a codec change or a new remote address take effect without a gap
    (RFC 3264 §8); raises ValueError when the offer is not acceptable.
    """
    current = leg.negotiated
    answer, negotiated = answer_offer(
        offer, media.codecs, media.advertise_ip, leg.local_port, session_id=session_id, session_version=version,
        srtp=current.srtp, make_crypto=lambda tag, suite: generate_crypto(tag, suite, rng),
        local_crypto=current.local_crypto)
    leg.update(negotiated)
    return answer
