"""Hardening: SDP numbers (ports, payload types, ptime, rtcp, crypto tags...) are bounded ASCII digits.

Issue items 1 and 8: ``a=ptime:1e999`` raised OverflowError, Unicode digits
such as ``'\u00b2'`` passed ``str.isdigit()`` and then failed ``int()``, and
more than 4,300 digits raised a plain ValueError.  Every failure is now an
:class:`SdpParseError` (or, for an accessor that tolerates junk, None / skip).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.sdp.negotiation import NegotiationError, SdpError, answer_offer
from activecall.sdp.model import MediaDescription, SdpParseError, parse_sdp

HUGE = "9" * 5000
UNICODE = ("\u0663", "\u00b2", "\uff11")


def _sdp(*, port: str = "40000", pts: str = "0 101", attrs: str = "", version: str = "0",
         session_version: str = "1", timing: str = "0 0", bandwidth: str = "") -> str:
    return (
        f"v={version}\r\no=- 1 {session_version} IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\n"
        f"{bandwidth}t={timing}\r\nm=audio {port} RTP/AVP {pts}\r\na=rtpmap:0 PCMU/8000\r\n"
        f"a=rtpmap:101 telephone-event/8000\r\n{attrs}"
    )


def _media(**kw: str) -> MediaDescription:
    return parse_sdp(_sdp(**kw)).media[0]


class PtimeTests(SynchronousTestCase):
    """``a=ptime`` is a bounded decimal; anything else reads as absent."""

    def test_overflowing_ptime_is_none(self) -> None:
        """``1e999``, ``inf``, ``-inf``, ``nan`` and 5000 digits give None instead of raising."""
        for value in ("1e999", "inf", "-inf", "nan", "NaN", "Infinity", "1e5", HUGE, HUGE + ".5",
                      "-20", "0", "20000000", *UNICODE):
            self.assertIsNone(_media(attrs=f"a=ptime:{value}\r\n").ptime_ms, value[:20])

    def test_plain_ptimes(self) -> None:
        """Integer and decimal ptimes in 1..10000 ms read as whole milliseconds."""
        for value, expected in (("20", 20), ("30.0", 30), ("0020", 20), ("10000", 10000), ("22.5", 22)):
            self.assertEqual(_media(attrs=f"a=ptime:{value}\r\n").ptime_ms, expected)

    def test_negotiation_survives_bad_ptime(self) -> None:
        """An INVITE offer with ``a=ptime:1e999`` is answered (the peer's ptime is just unknown)."""
        for value in ("1e999", "inf", "nan"):
            _, neg = answer_offer(_sdp(attrs=f"a=ptime:{value}\r\n"), ["pcmu"], "192.0.2.2", 30000, session_id=1)
            self.assertIsNone(neg.remote_ptime_ms)


class PortTests(SynchronousTestCase):
    """m= ports and port counts are 0..65535; a=rtcp ports likewise."""

    def test_media_port_out_of_range(self) -> None:
        """Ports 65536, 5000 digits or Unicode digits are SdpParseError."""
        for port in ("65536", "99999", HUGE, "40000/" + HUGE, "40000/0", *UNICODE):
            with self.assertRaises(SdpParseError, msg=port[:20]):
                parse_sdp(_sdp(port=port))
        self.assertEqual(_media(port="65535").port, 65535)
        self.assertEqual(_media(port="40000/2").port_count, 2)

    def test_rtcp_port_bounded(self) -> None:
        """``a=rtcp`` with an out-of-range or Unicode port reads as absent."""
        for value in ("65536", HUGE, "0", *UNICODE):
            self.assertIsNone(_media(attrs=f"a=rtcp:{value}\r\n").rtcp_port, value[:20])
        self.assertEqual(_media(attrs="a=rtcp:40001 IN IP4 192.0.2.1\r\n").rtcp_port, 40001)

    def test_negotiation_with_bad_ports(self) -> None:
        """An offer at port 65535 gets an RTCP port inside the range; bad ports are SdpError."""
        _, neg = answer_offer(_sdp(port="65535"), ["pcmu"], "192.0.2.2", 30000, session_id=1)
        self.assertLessEqual(neg.remote_rtcp_port, 65535)
        with self.assertRaises(SdpError):
            answer_offer(_sdp(port=HUGE), ["pcmu"], "192.0.2.2", 30000, session_id=1)


class PayloadTypeTests(SynchronousTestCase):
    """RTP payload types are 0..127; others are skipped, never a ValueError."""

    def test_formats(self) -> None:
        """Formats past 127, of 5000 digits or of Unicode digits are not payload types."""
        m = _media(pts="0 101 128 300 " + HUGE + " \u00b2 \u0663 0008")
        self.assertEqual(m.payload_types, [0, 101, 8])

    def test_rtpmap_and_fmtp(self) -> None:
        """rtpmap/fmtp lines with out-of-range or Unicode numbers are skipped."""
        attrs = (
            "a=rtpmap:\u00b2 PCMA/8000\r\na=rtpmap:8 PCMA/\u00b2\r\na=rtpmap:9 G722/8000/\u00b2\r\n"
            f"a=rtpmap:{HUGE} X/8000\r\na=rtpmap:10 L16/{HUGE}\r\na=rtpmap:128 X/8000\r\n"
            "a=rtpmap:11 L16/44100/999\r\na=fmtp:\u00b2 x\r\n"
            f"a=fmtp:{HUGE} x\r\na=fmtp:101 0-15\r\n"
        )
        m = _media(pts="0 8 9 101", attrs=attrs)
        maps = m.rtpmaps()
        self.assertEqual(sorted(maps), [0, 8, 9, 101])  # 8/9 from the RFC 3551 table, bad lines skipped
        self.assertEqual(maps[8].clock_rate_hz, 8000)
        self.assertEqual(maps[9].channels, 1)
        self.assertEqual(m.fmtps(), {101: "0-15"})

    def test_crypto_tags(self) -> None:
        """``a=crypto`` with a Unicode, ten-digit or 5000-digit tag is skipped."""
        key = "inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"
        attrs = "".join(f"a=crypto:{tag} AES_CM_128_HMAC_SHA1_80 {key}\r\n"
                        for tag in ("\u00b2", "1234567890", HUGE, "7"))
        self.assertEqual([c.tag for c in _media(attrs=attrs).crypto()], [7])

    def test_negotiation_with_junk_formats(self) -> None:
        """Negotiation with junk payload types raises nothing but NegotiationError/SdpError."""
        with self.assertRaises(NegotiationError):
            answer_offer(_sdp(pts="\u00b2 " + HUGE, attrs="a=rtpmap:\u00b2 PCMU/8000\r\n")
                         .replace("a=rtpmap:0 PCMU/8000\r\n", ""), ["pcmu"], "192.0.2.2", 30000, session_id=1)


class SessionNumberTests(SynchronousTestCase):
    """v=, o= session version, t= times and b= bandwidths are bounded before int()."""

    def test_huge_numbers_are_sdp_errors(self) -> None:
        """5000-digit values are SdpParseError, not a bare ValueError."""
        for kw in ({"version": HUGE}, {"session_version": HUGE}, {"timing": f"{HUGE} 0"},
                   {"bandwidth": f"b=AS:{HUGE}\r\n"}, {"version": "\u0660"}, {"bandwidth": "b=AS:\u00b2\r\n"}):
            with self.assertRaises(SdpParseError, msg=str(kw)[:40]):
                parse_sdp(_sdp(**kw))

    def test_large_but_valid_numbers(self) -> None:
        """NTP-sized times and 64-bit session versions still parse."""
        sd = parse_sdp(_sdp(session_version=str(2**63), timing="3034423619 3042462419"))
        self.assertEqual(sd.origin.session_version, 2**63)
        self.assertEqual(sd.timings[0].start, 3034423619)
