"""SDP offer/answer for one audio stream (RFC 3264), pure.

SDP itself (parsing, the model, serializing) is :mod:`activecall.sdp.model`;
this module reads offers and answers through that model and writes ours as
:class:`~activecall.sdp.model.SessionDescription` values.  The results are
:class:`NegotiatedMedia` values, everything an RTP leg needs to run the
stream: where to send, which payload types, SRTP keys, rtcp-mux.

Rules implemented:

* Codecs are chosen in *our* preference order (the ``codecs`` config list:
  ``pcmu``, ``pcma``, ``g722``, ``opus``, ``telephone_event``; unknown names
  such as ``g729`` are skipped) among those the peer offers; the answer
  carries that one codec plus telephone-event, numbered as the peer
  numbered them (dynamic payload types are kept).
* telephone-event is matched at the chosen codec's RTP clock rate (8000 for
  G.711/G.722, 48000 for Opus).  Without it the leg detects DTMF in-band.
* Directions follow RFC 3264 §6.1: the answer to ``sendonly`` is
  ``recvonly``, to ``recvonly`` ``sendonly``, to ``inactive`` ``inactive``,
  intersected with what we want locally (hold).  ``c=0.0.0.0`` is the old
  RFC 2543 hold and counts as ``sendonly`` from the peer
  (:meth:`SessionDescription.direction` applies that rule).
* SRTP (SDES, RFC 4568): an ``RTP/SAVP`` offer must carry an ``a=crypto``
  line with a suite we support, or the answer fails (488).  An ``RTP/AVP``
  offer carrying ``a=crypto`` is answered with SRTP when SRTP is enabled.
* ``a=rtcp-mux`` is accepted when offered (we then offer it too on
  re-offers); ``a=rtcp`` (RFC 3605) gives the peer's RTCP port and address.
* We always send 20 ms packets and say ``a=ptime:20``; the peer's ptime is
  recorded, and the receive path handles any packet duration.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from activecall.media.codecs import CODECS
from activecall.rtp.srtp import CryptoAttribute
from activecall.sdp.model import (
    DIRECTIONS,
    Attribute,
    Connection,
    MediaDescription,
    Origin,
    SdpParseError,
    SessionDescription,
    parse_sdp,
)

__all__ = [
    "SdpError",
    "NegotiationError",
    "NegotiatedMedia",
    "LocalOffer",
    "build_offer",
    "answer_offer",
    "apply_answer",
    "answer_direction",
    "offer_holds",
    "DIRECTIONS",
    "TELEPHONE_EVENT",
]

#: Unreadable SDP: the SDP model's parse error (a ``ValueError`` carrying ``status=488``).
SdpError = SdpParseError

TELEPHONE_EVENT = "telephone_event"
#: Audio codecs we can run, by config name.
_AUDIO = ("pcmu", "pcma", "g722", "opus")
# What we number dynamic formats as in our own offers.
_OFFER_PT = {"opus": 111, "te8000": 101, "te48000": 110}
_OPUS_FMTP = "minptime=10;useinbandfec=1"
_TE_FMTP = "0-16"
_TE_ENCODING = "telephone-event"
_PTIME_MS = 20
_PLAIN = "RTP/AVP"
_SECURE = "RTP/SAVP"


class NegotiationError(ValueError):
    """No acceptable audio stream in an offer/answer (the SIP layer answers 488)."""


@dataclass(frozen=True)
class NegotiatedMedia:
    """The outcome of offer/answer for the audio stream, from our point of view.

    ``direction`` is ours: ``sendrecv``, ``sendonly`` (we send only),
    ``recvonly`` (we receive only) or ``inactive``.  ``remote_hold`` is true
    when the peer put the call on hold (it offered ``sendonly``/``inactive``
    or ``c=0.0.0.0``).
    """

    remote_address: str
    remote_port: int
    remote_rtcp_address: str
    remote_rtcp_port: int
    codec: str
    payload_type: int
    clock_rate_hz: int
    telephone_event_pt: int | None
    ptime_ms: int
    direction: str
    remote_hold: bool = False
    local_crypto: CryptoAttribute | None = None
    remote_crypto: CryptoAttribute | None = None
    rtcp_mux: bool = False
    remote_ptime_ms: int | None = None
    #: The comfort noise payload type (RFC 3389 ``CN`` at the codec's RTP clock rate) when
    #: the peer offered it (our answer then lists it too); None otherwise, also for the
    #: answers to our own offers, which list no CN.  Only with it do we send CN.
    comfort_noise_pt: int | None = None

    @property
    def srtp(self) -> bool:
        """Whether the stream is SRTP."""
        return self.local_crypto is not None

    @property
    def can_send(self) -> bool:
        """Whether we may send RTP media."""
        return self.direction in ("sendrecv", "sendonly") and self.remote_port != 0

    @property
    def can_receive(self) -> bool:
        """Whether we play what the peer sends."""
        return self.direction in ("sendrecv", "recvonly")


@dataclass(frozen=True)
class LocalOffer:
    """An offer we sent: its SDP text and what :func:`apply_answer` needs to read the answer."""

    sdp: str
    #: Our offered crypto lines by tag (empty without SRTP).
    crypto: tuple[CryptoAttribute, ...]
    codecs: tuple[str, ...]
    direction: str
    rtcp_mux: bool


# ---------------------------------------------------------------------------
# writing (through the SDP model)


def _addr_type(address: str) -> str:
    try:
        return "IP6" if ipaddress.ip_address(address).version == 6 else "IP4"
    except ValueError:
        return "IP4"


def _session(address: str, session_id: int, session_version: int) -> SessionDescription:
    """Our session-level lines: o=, s=activecall, c= and t=0 0 (the model's default timing)."""
    kind = _addr_type(address)
    return SessionDescription(
        origin=Origin("-", str(session_id), session_version, "IN", kind, address),
        session_name="activecall",
        connection=Connection(address, kind),
    )


def _rtpmap(pt: int, name: str, rate: int, channels: int) -> Attribute:
    enc = _TE_ENCODING if name == TELEPHONE_EVENT else CODECS[name].encoding_name
    suffix = f"/{channels}" if channels > 1 else ""
    return Attribute("rtpmap", f"{pt} {enc}/{rate}{suffix}")


def _transport_attributes(port: int, mux: bool, crypto: Sequence[CryptoAttribute], direction: str) -> list[Attribute]:
    """The attributes after the formats in both offers and answers: ptime, RTCP, crypto, direction."""
    attrs = [Attribute("ptime", str(_PTIME_MS))]
    # RFC 3605: say where our RTCP goes unless it is muxed onto the RTP port.
    attrs.append(Attribute("rtcp-mux") if mux else Attribute("rtcp", str(port + 1)))
    attrs.extend(Attribute("crypto", c.encode()) for c in crypto)
    attrs.append(Attribute(direction))
    return attrs


def _known_prefs(codecs: Sequence[str]) -> list[str]:
    out = []
    for name in codecs:
        key = name.strip().lower().replace("-", "_")
        if key in ("dtmf", "2833"):
            key = TELEPHONE_EVENT
        if (key in _AUDIO or key == TELEPHONE_EVENT) and key not in out:
            out.append(key)
    if not any(c in _AUDIO for c in out):
        # No usable audio codec configured: the track default.
        out.insert(0, "pcmu")
    return out


def build_offer(
    codecs: Sequence[str],
    address: str,
    port: int,
    *,
    session_id: int,
    session_version: int = 1,
    direction: str = "sendrecv",
    crypto: Sequence[CryptoAttribute] = (),
    rtcp_mux: bool = False,
) -> LocalOffer:
    """Build our audio offer: every usable codec of ``codecs`` in order, plus telephone-event.

    ``address`` goes into ``o=``/``c=`` (pass ``external_ip`` behind NAT);
    ``crypto`` non-empty makes the offer ``RTP/SAVP`` with those keys.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"bad direction {direction!r}")
    prefs = _known_prefs(codecs)
    audio = [c for c in prefs if c in _AUDIO]
    formats: list[int] = []
    attrs: list[Attribute] = []
    for name in audio:
        info = CODECS[name]
        pt = info.payload_type if info.payload_type is not None else _OFFER_PT[name]
        formats.append(pt)
        attrs.append(_rtpmap(pt, name, info.clock_rate_hz, info.channels))
        if name == "opus":
            attrs.append(Attribute("fmtp", f"{pt} {_OPUS_FMTP}"))
    if TELEPHONE_EVENT in prefs:
        for rate in sorted({CODECS[c].clock_rate_hz for c in audio}):
            pt = _OFFER_PT[f"te{rate}"]
            formats.append(pt)
            attrs.append(_rtpmap(pt, TELEPHONE_EVENT, rate, 1))
            attrs.append(Attribute("fmtp", f"{pt} {_TE_FMTP}"))
    attrs.extend(_transport_attributes(port, rtcp_mux, crypto, direction))
    sd = _session(address, session_id, session_version)
    proto = _SECURE if crypto else _PLAIN
    sd.media.append(MediaDescription("audio", port, proto, [str(pt) for pt in formats], attributes=attrs))
    return LocalOffer(sd.serialize(), tuple(crypto), tuple(prefs), direction, rtcp_mux)


# ---------------------------------------------------------------------------
# offer/answer


_REVERSE = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}


def _parts(direction: str) -> tuple[bool, bool]:
    return direction in ("sendrecv", "sendonly"), direction in ("sendrecv", "recvonly")


def _join(send: bool, recv: bool) -> str:
    if send and recv:
        return "sendrecv"
    if send:
        return "sendonly"
    if recv:
        return "recvonly"
    return "inactive"


def answer_direction(offered: str, local: str = "sendrecv") -> str:
    """Our answer's direction (RFC 3264 §6.1): the reverse of the offer, limited by ``local``."""
    rs, rr = _parts(_REVERSE[offered])
    ls, lr = _parts(local)
    return _join(rs and ls, rr and lr)


def _codec_name(encoding: str, rate: int, candidates: Sequence[str]) -> str | None:
    """Our config name for an rtpmap ``encoding/rate`` among ``candidates``, if any."""
    for ours in candidates:
        info = CODECS[ours]
        if info.encoding_name.lower() == encoding.lower() and info.clock_rate_hz == rate:
            return ours
    return None


def _choose_codec(m: MediaDescription, prefs: Sequence[str]) -> tuple[str, int, int] | None:
    """Our most preferred codec the peer offers: ``(name, pt, clock rate)``."""
    rtpmaps = m.rtpmaps()
    offered: dict[str, int] = {}
    for pt in m.payload_types:
        enc = rtpmaps.get(pt)
        if enc is None:
            continue
        name = _codec_name(enc.encoding, enc.clock_rate_hz, _AUDIO)
        if name is not None:
            offered.setdefault(name, pt)
    for name in prefs:
        if name in offered:
            return name, offered[name], CODECS[name].clock_rate_hz
    return None


def _find_te(m: MediaDescription, rate: int) -> int | None:
    rtpmaps = m.rtpmaps()
    for pt in m.payload_types:
        enc = rtpmaps.get(pt)
        if enc is not None and enc.encoding.lower() == _TE_ENCODING and enc.clock_rate_hz == rate:
            return pt
    return None


def _find_cn(m: MediaDescription, rate: int) -> int | None:
    """The peer's comfort noise payload type at ``rate`` (static 13 or an rtpmap ``CN/rate``), if it lists one."""
    rtpmaps = m.rtpmaps()
    for pt in m.payload_types:
        enc = rtpmaps.get(pt)
        if enc is not None and enc.encoding.upper() == "CN" and enc.clock_rate_hz == rate:
            return pt
    return None


def _pick_crypto(m: MediaDescription) -> CryptoAttribute | None:
    """The first offered ``a=crypto`` we can use (known suite, no MKI, no session params)."""
    for attr in m.crypto():
        if attr.mki is None and not attr.session_params:
            return attr
    return None


def _remote_address(sd: SessionDescription, m: MediaDescription) -> str:
    """Where the peer wants media: the media c=, the session c=, else the o= address."""
    conn = sd.connection_for(m)
    if conn is None:
        return sd.origin.address
    if conn.nettype != "IN" or conn.addrtype not in ("IP4", "IP6"):
        # sdp.py accepts any c= triple; we can only send to IP addresses.
        raise NegotiationError(f"unsupported connection address {conn}")
    return conn.host


def _rtcp_target(m: MediaDescription, address: str, mux: bool) -> tuple[str, int]:
    """The peer's RTCP address and port: the RTP port if muxed, else a=rtcp or RTP port + 1."""
    if mux:
        return address, m.port
    # a=rtcp:<port> [IN IP4 <address>] (RFC 3605); sdp.py exposes only the port.
    bits = (m.attribute("rtcp") or "").split()
    rtcp_address = bits[3] if len(bits) >= 4 else address
    port = m.rtcp_port
    if port is None:
        # RTP + 1, kept inside the UDP range for a (nonsensical) odd RTP port 65535.
        port = m.port + 1 if m.port < 65535 else m.port
    return rtcp_address, port


def _holds(sd: SessionDescription, m: MediaDescription) -> bool:
    """The one hold rule: the peer's stream ``m`` says sendonly/inactive, or has the RFC 2543 hold
    address (``c=0.0.0.0`` or ``c=::``, media or session level)."""
    return sd.direction(m) in ("sendonly", "inactive")


def offer_holds(offer: str | bytes | SessionDescription) -> bool:
    """Whether an offer puts the call on hold, for an offer that cannot be answered.

    The rule of :attr:`NegotiatedMedia.remote_hold`, applied to the first
    audio stream with a port (other media never count); False for
    unreadable SDP or an offer without such a stream.
    """
    try:
        sd = offer if isinstance(offer, SessionDescription) else parse_sdp(offer)
    except SdpParseError:
        return False
    for m in sd.media:
        if m.media == "audio" and m.port != 0:
            return _holds(sd, m)
    return False


def _negotiated(
    sd: SessionDescription,
    m: MediaDescription,
    codec: tuple[str, int, int],
    te_pt: int | None,
    direction: str,
    mux: bool,
    local_crypto: CryptoAttribute | None,
    remote_crypto: CryptoAttribute | None,
    cn_pt: int | None = None,
) -> NegotiatedMedia:
    """The :class:`NegotiatedMedia` for the peer's audio section ``m`` (offer or answer)."""
    name, pt, rate = codec
    remote_addr = _remote_address(sd, m)
    rtcp_addr, rtcp_port = _rtcp_target(m, remote_addr, mux)
    return NegotiatedMedia(
        remote_address=remote_addr,
        remote_port=m.port,
        remote_rtcp_address=rtcp_addr,
        remote_rtcp_port=rtcp_port,
        codec=name,
        payload_type=pt,
        clock_rate_hz=rate,
        telephone_event_pt=te_pt,
        ptime_ms=_PTIME_MS,
        direction=direction,
        remote_hold=_holds(sd, m),
        local_crypto=local_crypto,
        remote_crypto=remote_crypto,
        rtcp_mux=mux,
        remote_ptime_ms=m.ptime_ms,
        comfort_noise_pt=cn_pt,
    )


def _answer_media(
    m: MediaDescription, port: int, neg: NegotiatedMedia
) -> MediaDescription:
    """Our accepted audio section: the chosen codec, telephone-event, ptime, RTCP, crypto, direction."""
    pt, rate = neg.payload_type, neg.clock_rate_hz
    fmtps = m.fmtps()
    attrs = [_rtpmap(pt, neg.codec, rate, CODECS[neg.codec].channels)]
    if neg.codec == "opus":
        # Mirror what the peer asked for (stereo, bitrates...), else our defaults.
        attrs.append(Attribute("fmtp", f"{pt} {fmtps.get(pt, _OPUS_FMTP)}"))
    formats = [pt]
    if neg.telephone_event_pt is not None:
        te = neg.telephone_event_pt
        formats.append(te)
        attrs.append(_rtpmap(te, TELEPHONE_EVENT, rate, 1))
        attrs.append(Attribute("fmtp", f"{te} {fmtps.get(te, _TE_FMTP)}"))
    if neg.comfort_noise_pt is not None:
        formats.append(neg.comfort_noise_pt)
        attrs.append(Attribute("rtpmap", f"{neg.comfort_noise_pt} CN/{rate}"))
    crypto = [neg.local_crypto] if neg.local_crypto is not None else []
    attrs.extend(_transport_attributes(port, neg.rtcp_mux, crypto, neg.direction))
    return MediaDescription("audio", port, m.proto, [str(f) for f in formats], attributes=attrs)


def answer_offer(
    offer: str | bytes | SessionDescription,
    codecs: Sequence[str],
    address: str,
    port: int,
    *,
    session_id: int,
    session_version: int = 1,
    local_direction: str = "sendrecv",
    srtp: bool = False,
    make_crypto: Callable[[int, str], CryptoAttribute] | None = None,
    local_crypto: CryptoAttribute | None = None,
) -> tuple[str, NegotiatedMedia]:
    """Answer an offer: return our SDP answer text and the negotiated stream.

    ``offer`` is SDP text or an already parsed
    :class:`~activecall.sdp.model.SessionDescription`.  ``make_crypto(tag,
    suite)`` creates our key when the answer uses SRTP (e.g. ``lambda t, s:
    generate_crypto(t, s, rng)``); on a re-offer pass the ``local_crypto``
    already in use to keep the key (no re-keying, no audio gap) when the
    suite is unchanged.  Raises :class:`NegotiationError` when no audio
    stream is acceptable and :class:`SdpError` for unreadable SDP.
    """
    sd = offer if isinstance(offer, SessionDescription) else parse_sdp(offer)
    if local_direction not in DIRECTIONS:
        raise ValueError(f"bad direction {local_direction!r}")
    prefs = _known_prefs(codecs)
    audio_prefs = [c for c in prefs if c in _AUDIO]
    chosen_index = -1
    problem = "no audio stream in the offer"
    result: NegotiatedMedia | None = None
    for index, m in enumerate(sd.media):
        if m.media != "audio" or m.port == 0 or result is not None:
            continue
        if m.proto not in (_PLAIN, _SECURE):
            problem = f"unsupported transport {m.proto}"
            continue
        codec = _choose_codec(m, audio_prefs)
        if codec is None:
            problem = "no common codec"
            continue
        remote_crypto: CryptoAttribute | None = None
        ours: CryptoAttribute | None = None
        if m.proto == _SECURE or (srtp and m.has_attribute("crypto")):
            remote_crypto = _pick_crypto(m)
            if remote_crypto is None:
                problem = "no usable a=crypto"
                continue
            if local_crypto is not None and local_crypto.suite == remote_crypto.suite:
                ours = replace(local_crypto, tag=remote_crypto.tag)
            elif make_crypto is not None:
                ours = make_crypto(remote_crypto.tag, remote_crypto.suite)
            else:
                raise ValueError("SRTP answer needs make_crypto or local_crypto")
        te_pt = _find_te(m, codec[2]) if TELEPHONE_EVENT in prefs else None
        direction = answer_direction(sd.direction(m), local_direction)
        # We take comfort noise wherever offered (RFC 3389) and answer it, so we may send it too.
        result = _negotiated(sd, m, codec, te_pt, direction, m.rtcp_mux, ours, remote_crypto, _find_cn(m, codec[2]))
        chosen_index = index
    if result is None:
        raise NegotiationError(problem)
    answer = _session(address, session_id, session_version)
    for index, m in enumerate(sd.media):
        if index == chosen_index:
            answer.media.append(_answer_media(m, port, result))
        else:
            # RFC 3264 §6: every offered stream gets an m-line; rejected ones have port 0.
            answer.media.append(MediaDescription(m.media, 0, m.proto, list(m.formats) or ["0"]))
    return answer.serialize(), result


def apply_answer(offer: LocalOffer, answer: str | bytes | SessionDescription) -> NegotiatedMedia:
    """Read the peer's answer to our ``offer`` into the negotiated stream.

    The first payload type of the answer's audio line that is a codec we
    offered is used (RFC 3264 §7: the answerer's preference).  Raises
    :class:`NegotiationError` if the answer rejects audio or picks nothing
    we offered, or if SRTP keys do not match what we offered.
    """
    sd = answer if isinstance(answer, SessionDescription) else parse_sdp(answer)
    audio = [c for c in offer.codecs if c in _AUDIO]
    for m in sd.media:
        if m.media != "audio":
            continue
        if m.port == 0:
            raise NegotiationError("audio stream rejected by the answer")
        chosen: tuple[str, int, int] | None = None
        rtpmaps = m.rtpmaps()
        for pt in m.payload_types:
            enc = rtpmaps.get(pt)
            name = _codec_name(enc.encoding, enc.clock_rate_hz, audio) if enc is not None else None
            if enc is not None and name is not None:
                chosen = (name, pt, enc.clock_rate_hz)
                break
        if chosen is None:
            raise NegotiationError("answer has no codec we offered")
        local_crypto: CryptoAttribute | None = None
        remote_crypto: CryptoAttribute | None = None
        if offer.crypto:
            remote_crypto = _pick_crypto(m)
            if remote_crypto is None:
                raise NegotiationError("SRTP offered but the answer has no usable a=crypto")
            for c in offer.crypto:
                if c.tag == remote_crypto.tag and c.suite == remote_crypto.suite:
                    local_crypto = c
            if local_crypto is None:
                raise NegotiationError("answer a=crypto matches none we offered")
        elif m.proto == _SECURE:
            raise NegotiationError("answer is RTP/SAVP but we offered plain RTP")
        te_pt = _find_te(m, chosen[2]) if TELEPHONE_EVENT in offer.codecs else None
        ls, lr = _parts(offer.direction)
        # The peer's "recvonly" means we may send; its "sendonly" that we receive.
        ps, pr = _parts(sd.direction(m))
        direction = _join(ls and pr, lr and ps)
        mux = m.rtcp_mux and offer.rtcp_mux
        return _negotiated(sd, m, chosen, te_pt, direction, mux, local_crypto, remote_crypto)
    raise NegotiationError("answer has no audio stream")
