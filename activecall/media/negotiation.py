"""SDP offer/answer for one audio stream (RFC 3264, RFC 4566), pure.

``activecall/sip/sdp.py`` (the general SDP model) was not committed when this
module was written, so it carries a minimal audio-only SDP reader and writer
of its own: :func:`parse_sdp` keeps what audio negotiation needs (origin,
connection, media lines with their formats and attributes) and
:func:`build_offer` / :func:`answer_offer` write complete SDP bodies.

The results are :class:`NegotiatedMedia` values, everything an RTP leg needs
to run the stream: where to send, which payload types, SRTP keys, rtcp-mux.

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
  RFC 2543 hold and counts as ``sendonly`` from the peer.
* SRTP (SDES, RFC 4568): an ``RTP/SAVP`` offer must carry an ``a=crypto``
  line with a suite we support, or the answer fails (488).  An ``RTP/AVP``
  offer carrying ``a=crypto`` is answered with SRTP when SRTP is enabled.
* ``a=rtcp-mux`` is accepted when offered (we then offer it too on
  re-offers); ``a=rtcp`` (RFC 3605) gives the peer's RTCP port.
* We always send 20 ms packets and say ``a=ptime:20``; the peer's ptime is
  recorded, and the receive path handles any packet duration.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from activecall.media.codecs import CODECS
from activecall.rtp.srtp import SUITES, CryptoAttribute, SrtpError, parse_crypto

__all__ = [
    "SdpError",
    "NegotiationError",
    "MediaDescription",
    "SessionDescription",
    "NegotiatedMedia",
    "LocalOffer",
    "parse_sdp",
    "build_offer",
    "answer_offer",
    "apply_answer",
    "answer_direction",
    "DIRECTIONS",
    "TELEPHONE_EVENT",
]

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
TELEPHONE_EVENT = "telephone_event"
#: Audio codecs we can run, by config name.
_AUDIO = ("pcmu", "pcma", "g722", "opus")
_STATIC_PT = {0: ("pcmu", 8000), 8: ("pcma", 8000), 9: ("g722", 8000)}
# What we number dynamic formats as in our own offers.
_OFFER_PT = {"opus": 111, "te8000": 101, "te48000": 110}
_OPUS_FMTP = "minptime=10;useinbandfec=1"
_TE_FMTP = "0-16"
_PTIME_MS = 20
_PLAIN = "RTP/AVP"
_SECURE = "RTP/SAVP"


class SdpError(ValueError):
    """An SDP body we cannot read."""


class NegotiationError(ValueError):
    """No acceptable audio stream in an offer/answer (the SIP layer answers 488)."""


@dataclass
class MediaDescription:
    """One ``m=`` section: port, proto, formats and the attributes we care about."""

    media: str
    port: int
    proto: str
    formats: list[str]
    connection: str | None = None
    #: ``{pt: (encoding name lower-case, clock rate, channels)}`` from a=rtpmap.
    rtpmap: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    fmtp: dict[int, str] = field(default_factory=dict)
    direction: str | None = None
    ptime_ms: int | None = None
    crypto: list[str] = field(default_factory=list)
    rtcp_port: int | None = None
    rtcp_address: str | None = None
    rtcp_mux: bool = False
    #: Every other ``a=`` line, verbatim (without ``a=``).
    other: list[str] = field(default_factory=list)

    def payload_types(self) -> list[int]:
        """The RTP payload types of the m-line, in order (non-numeric formats skipped)."""
        out = []
        for f in self.formats:
            if f.isdigit():
                out.append(int(f))
        return out

    def encoding(self, pt: int) -> tuple[str, int, int] | None:
        """``(name, clock rate, channels)`` of a payload type: a=rtpmap, else the static table."""
        entry = self.rtpmap.get(pt)
        if entry is not None:
            return entry
        static = _STATIC_PT.get(pt)
        if static is not None:
            return static[0], static[1], 1
        return None


@dataclass
class SessionDescription:
    """A parsed SDP body: origin, session-level connection/direction and the media sections."""

    origin_username: str = "-"
    session_id: int = 0
    session_version: int = 0
    origin_address: str = "0.0.0.0"
    session_name: str = "-"
    connection: str | None = None
    direction: str | None = None
    media: list[MediaDescription] = field(default_factory=list)


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
# reading


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SdpError(f"bad {what}: {text!r}") from None


def _connection_address(value: str) -> str:
    # c=IN IP4 203.0.113.1[/ttl[/n]]
    parts = value.split()
    if len(parts) < 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SdpError(f"bad c= line: {value!r}")
    return parts[2].split("/")[0]


def _media_attribute(m: MediaDescription, name: str, value: str | None, line: str) -> None:
    if name == "rtpmap" and value:
        pt_s, _, enc = value.partition(" ")
        bits = enc.strip().split("/")
        if pt_s.isdigit() and len(bits) >= 2 and bits[1].isdigit():
            channels = int(bits[2]) if len(bits) > 2 and bits[2].isdigit() else 1
            m.rtpmap[int(pt_s)] = (bits[0].lower(), int(bits[1]), channels)
    elif name == "fmtp" and value:
        pt_s, _, params = value.partition(" ")
        if pt_s.isdigit():
            m.fmtp[int(pt_s)] = params.strip()
    elif name in DIRECTIONS and value is None:
        m.direction = name
    elif name == "ptime" and value:
        try:
            m.ptime_ms = int(float(value.strip()))
        except ValueError:
            pass
    elif name == "crypto" and value:
        m.crypto.append(value.strip())
    elif name == "rtcp" and value:
        bits = value.split()
        if bits and bits[0].isdigit():
            m.rtcp_port = int(bits[0])
            if len(bits) >= 4:
                m.rtcp_address = bits[3]
    elif name == "rtcp-mux":
        m.rtcp_mux = True
    else:
        m.other.append(line[2:])


def parse_sdp(text: str | bytes) -> SessionDescription:
    """Parse an SDP body; raise :class:`SdpError` if it is not usable SDP.

    Lenient about line endings and unknown lines; strict about the ``o=``,
    ``c=`` and ``m=`` lines negotiation relies on.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    sd = SessionDescription()
    current: MediaDescription | None = None
    saw_version = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if len(line) < 2 or line[1] != "=":
            raise SdpError(f"not an SDP line: {line!r}")
        kind, value = line[0], line[2:]
        if kind == "v":
            saw_version = True
        elif kind == "o":
            parts = value.split()
            if len(parts) != 6:
                raise SdpError(f"bad o= line: {value!r}")
            sd.origin_username = parts[0]
            sd.session_id = _int(parts[1], "o= session id")
            sd.session_version = _int(parts[2], "o= session version")
            sd.origin_address = parts[5]
        elif kind == "s" and current is None:
            sd.session_name = value
        elif kind == "c":
            addr = _connection_address(value)
            if current is None:
                sd.connection = addr
            else:
                current.connection = addr
        elif kind == "m":
            parts = value.split()
            if len(parts) < 3:
                raise SdpError(f"bad m= line: {value!r}")
            port = _int(parts[1].split("/")[0], "m= port")
            if not 0 <= port <= 65535:
                raise SdpError(f"m= port out of range: {port}")
            current = MediaDescription(parts[0], port, parts[2], parts[3:])
            sd.media.append(current)
        elif kind == "a":
            name, sep, attr_value = value.partition(":")
            if current is None:
                if name in DIRECTIONS and not sep:
                    sd.direction = name
            else:
                _media_attribute(current, name, attr_value if sep else None, line)
    if not saw_version:
        raise SdpError("no v= line")
    return sd


# ---------------------------------------------------------------------------
# writing


def _addr_type(address: str) -> str:
    try:
        return "IP6" if ipaddress.ip_address(address).version == 6 else "IP4"
    except ValueError:
        return "IP4"


def _session_lines(address: str, session_id: int, session_version: int) -> list[str]:
    kind = _addr_type(address)
    return [
        "v=0",
        f"o=- {session_id} {session_version} IN {kind} {address}",
        "s=activecall",
        f"c=IN {kind} {address}",
        "t=0 0",
    ]


def _rtpmap_line(pt: int, name: str, rate: int, channels: int) -> str:
    enc = "telephone-event" if name == TELEPHONE_EVENT else CODECS[name].encoding_name
    suffix = f"/{channels}" if channels > 1 else ""
    return f"a=rtpmap:{pt} {enc}/{rate}{suffix}"


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
    attrs: list[str] = []
    for name in audio:
        info = CODECS[name]
        pt = info.payload_type if info.payload_type is not None else _OFFER_PT[name]
        formats.append(pt)
        attrs.append(_rtpmap_line(pt, name, info.clock_rate_hz, info.channels))
        if name == "opus":
            attrs.append(f"a=fmtp:{pt} {_OPUS_FMTP}")
    if TELEPHONE_EVENT in prefs:
        rates = sorted({CODECS[c].clock_rate_hz for c in audio})
        for rate in rates:
            pt = _OFFER_PT[f"te{rate}"]
            formats.append(pt)
            attrs.append(_rtpmap_line(pt, TELEPHONE_EVENT, rate, 1))
            attrs.append(f"a=fmtp:{pt} {_TE_FMTP}")
    proto = _SECURE if crypto else _PLAIN
    lines = _session_lines(address, session_id, session_version)
    lines.append(f"m=audio {port} {proto} " + " ".join(str(pt) for pt in formats))
    lines.extend(attrs)
    lines.append(f"a=ptime:{_PTIME_MS}")
    if rtcp_mux:
        lines.append("a=rtcp-mux")
    else:
        lines.append(f"a=rtcp:{port + 1}")
    for c in crypto:
        lines.append("a=crypto:" + c.encode())
    lines.append("a=" + direction)
    return LocalOffer("\r\n".join(lines) + "\r\n", tuple(crypto), tuple(prefs), direction, rtcp_mux)


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


def _is_null_address(address: str) -> bool:
    return address in ("0.0.0.0", "::")


def _remote_direction(sd: SessionDescription, m: MediaDescription) -> tuple[str, bool]:
    """The peer's direction for ``m`` and whether it is a hold."""
    direction = m.direction or sd.direction or "sendrecv"
    address = m.connection or sd.connection or ""
    hold = direction in ("sendonly", "inactive")
    if _is_null_address(address):
        # RFC 2543 hold: the peer does not want media from us.
        direction = "inactive" if direction in ("recvonly", "inactive") else "sendonly"
        hold = True
    return direction, hold


def _choose_codec(m: MediaDescription, prefs: Sequence[str]) -> tuple[str, int, int] | None:
    """Our most preferred codec the peer offers: ``(name, pt, clock rate)``."""
    offered: dict[str, int] = {}
    for pt in m.payload_types():
        enc = m.encoding(pt)
        if enc is None:
            continue
        name, rate = enc[0], enc[1]
        for ours in _AUDIO:
            info = CODECS[ours]
            if info.encoding_name.lower() == name and info.clock_rate_hz == rate:
                offered.setdefault(ours, pt)
    for name in prefs:
        if name in offered:
            return name, offered[name], CODECS[name].clock_rate_hz
    return None


def _find_te(m: MediaDescription, rate: int) -> int | None:
    for pt in m.payload_types():
        enc = m.encoding(pt)
        if enc is not None and enc[0] == "telephone-event" and enc[1] == rate:
            return pt
    return None


def _pick_crypto(lines: Sequence[str]) -> CryptoAttribute | None:
    """The first offered ``a=crypto`` we can use (known suite, no MKI, no session params)."""
    for line in lines:
        try:
            attr = parse_crypto(line)
        except SrtpError:
            continue
        if attr.suite in SUITES and attr.mki is None and not attr.session_params:
            return attr
    return None


def _rtcp_target(sd: SessionDescription, m: MediaDescription, address: str, mux: bool) -> tuple[str, int]:
    if mux:
        return address, m.port
    port = m.rtcp_port if m.rtcp_port is not None else m.port + 1
    return m.rtcp_address or address, port


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

    ``make_crypto(tag, suite)`` creates our key when the answer uses SRTP
    (e.g. ``lambda t, s: generate_crypto(t, s, rng)``); on a re-offer pass the
    ``local_crypto`` already in use to keep the key (no re-keying, no audio
    gap) when the suite is unchanged.  Raises :class:`NegotiationError` when
    no audio stream is acceptable and :class:`SdpError` for unreadable SDP.
    """
    sd = offer if isinstance(offer, SessionDescription) else parse_sdp(offer)
    if local_direction not in DIRECTIONS:
        raise ValueError(f"bad direction {local_direction!r}")
    prefs = _known_prefs(codecs)
    chosen_index = -1
    problem = "no audio stream in the offer"
    result: NegotiatedMedia | None = None
    chosen_lines: list[str] = []
    for index, m in enumerate(sd.media):
        if m.media != "audio" or m.port == 0 or result is not None:
            continue
        if m.proto not in (_PLAIN, _SECURE):
            problem = f"unsupported transport {m.proto}"
            continue
        codec = _choose_codec(m, [c for c in prefs if c in _AUDIO])
        if codec is None:
            problem = "no common codec"
            continue
        name, pt, rate = codec
        remote_crypto: CryptoAttribute | None = None
        ours: CryptoAttribute | None = None
        if m.proto == _SECURE or (srtp and m.crypto):
            remote_crypto = _pick_crypto(m.crypto)
            if remote_crypto is None:
                problem = "no usable a=crypto"
                continue
            if local_crypto is not None and local_crypto.suite == remote_crypto.suite:
                ours = replace(local_crypto, tag=remote_crypto.tag)
            elif make_crypto is not None:
                ours = make_crypto(remote_crypto.tag, remote_crypto.suite)
            else:
                raise ValueError("SRTP answer needs make_crypto or local_crypto")
        te_pt = _find_te(m, rate) if TELEPHONE_EVENT in prefs else None
        peer_dir, hold = _remote_direction(sd, m)
        direction = answer_direction(peer_dir, local_direction)
        remote_addr = m.connection or sd.connection or sd.origin_address
        mux = m.rtcp_mux
        rtcp_addr, rtcp_port = _rtcp_target(sd, m, remote_addr, mux)
        result = NegotiatedMedia(
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
            remote_hold=hold,
            local_crypto=ours,
            remote_crypto=remote_crypto,
            rtcp_mux=mux,
            remote_ptime_ms=m.ptime_ms,
        )
        chosen_index = index
        info = CODECS[name]
        chosen_lines = [_rtpmap_line(pt, name, rate, info.channels)]
        if name == "opus":
            # Mirror what the peer asked for (stereo, bitrates...), else our defaults.
            chosen_lines.append(f"a=fmtp:{pt} {m.fmtp.get(pt, _OPUS_FMTP)}")
        formats = [pt]
        if te_pt is not None:
            formats.append(te_pt)
            chosen_lines.append(_rtpmap_line(te_pt, TELEPHONE_EVENT, rate, 1))
            chosen_lines.append(f"a=fmtp:{te_pt} {m.fmtp.get(te_pt, _TE_FMTP)}")
        chosen_lines.insert(0, f"m=audio {port} {m.proto} " + " ".join(str(f) for f in formats))
        chosen_lines.append(f"a=ptime:{_PTIME_MS}")
        if mux:
            chosen_lines.append("a=rtcp-mux")
        else:
            chosen_lines.append(f"a=rtcp:{port + 1}")
        if ours is not None:
            chosen_lines.append("a=crypto:" + ours.encode())
        chosen_lines.append("a=" + direction)
    if result is None:
        raise NegotiationError(problem)
    lines = _session_lines(address, session_id, session_version)
    for index, m in enumerate(sd.media):
        if index == chosen_index:
            lines.extend(chosen_lines)
        else:
            # RFC 3264 §6: every offered stream gets an m-line; rejected ones have port 0.
            lines.append(f"m={m.media} 0 {m.proto} {' '.join(m.formats) or '0'}")
    return "\r\n".join(lines) + "\r\n", result


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
        for pt in m.payload_types():
            enc = m.encoding(pt)
            if enc is None:
                continue
            for name in audio:
                info = CODECS[name]
                if info.encoding_name.lower() == enc[0] and info.clock_rate_hz == enc[1]:
                    chosen = (name, pt, enc[1])
                    break
            if chosen is not None:
                break
        if chosen is None:
            raise NegotiationError("answer has no codec we offered")
        name, pt, rate = chosen
        local_crypto: CryptoAttribute | None = None
        remote_crypto: CryptoAttribute | None = None
        if offer.crypto:
            remote_crypto = _pick_crypto(m.crypto)
            if remote_crypto is None:
                raise NegotiationError("SRTP offered but the answer has no usable a=crypto")
            for c in offer.crypto:
                if c.tag == remote_crypto.tag and c.suite == remote_crypto.suite:
                    local_crypto = c
            if local_crypto is None:
                raise NegotiationError("answer a=crypto matches none we offered")
        elif m.proto == _SECURE:
            raise NegotiationError("answer is RTP/SAVP but we offered plain RTP")
        te_pt = _find_te(m, rate) if TELEPHONE_EVENT in offer.codecs else None
        peer_dir, hold = _remote_direction(sd, m)
        ls, lr = _parts(offer.direction)
        # The peer's "recvonly" means we may send; its "sendonly" that we receive.
        ps, pr = _parts(peer_dir)
        direction = _join(ls and pr, lr and ps)
        remote_addr = m.connection or sd.connection or sd.origin_address
        mux = m.rtcp_mux and offer.rtcp_mux
        rtcp_addr, rtcp_port = _rtcp_target(sd, m, remote_addr, mux)
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
            remote_hold=hold,
            local_crypto=local_crypto,
            remote_crypto=remote_crypto,
            rtcp_mux=mux,
            remote_ptime_ms=m.ptime_ms,
        )
    raise NegotiationError("answer has no audio stream")
