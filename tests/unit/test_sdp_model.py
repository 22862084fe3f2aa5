"""SDP model: parse, serialize, helpers."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.rtp.srtp import AES_CM_128_HMAC_SHA1_80, CryptoAttribute
from activecall.sdp.model import (
    Attribute,
    Connection,
    MediaDescription,
    Origin,
    RtpMap,
    SdpParseError,
    SessionDescription,
    parse_sdp,
)

OFFER = (
    "v=0\r\n"
    "o=alice 2890844526 2890844527 IN IP4 198.51.100.1\r\n"
    "s=-\r\n"
    "c=IN IP4 198.51.100.1\r\n"
    "b=AS:64\r\n"
    "t=0 0\r\n"
    "a=sendrecv\r\n"
    "m=audio 49170 RTP/SAVP 0 8 9 111 101\r\n"
    "a=rtpmap:111 opus/48000/2\r\n"
    "a=fmtp:111 minptime=10;useinbandfec=1\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-16\r\n"
    "a=ptime:20\r\n"
    "a=rtcp:49171\r\n"
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32\r\n"
    "a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj|2^20|1:32 UNENCRYPTED_SRTCP\r\n"
    "m=video 0 RTP/AVP 31\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    "c=IN IP4 0.0.0.0\r\n"
    "a=mid:0\r\n"
    "a=ice-ufrag:F7gI\r\n"
    "a=ice-pwd:x9cml/YzichV2+XlhiMu8g\r\n"
    "a=candidate:1 1 udp 2130706431 198.51.100.1 9 typ host\r\n"
    "a=fingerprint:SHA-256 4A:AD:B9:B1:3F\r\n"
    "a=setup:actpass\r\n"
    "a=rtcp-mux\r\n"
    "a=recvonly\r\n"
)


class ParseTests(SynchronousTestCase):
    """parse_sdp and helpers."""

    def setUp(self) -> None:
        self.sdp = parse_sdp(OFFER)

    def test_session_fields(self) -> None:
        """Origin, name, connection, bandwidth and timing are typed."""
        self.assertEqual(self.sdp.origin, Origin("alice", "2890844526", 2890844527, "IN", "IP4", "198.51.100.1"))
        self.assertEqual(self.sdp.connection, Connection("198.51.100.1"))
        self.assertEqual(self.sdp.bandwidths[0].bandwidth, 64)
        self.assertEqual((self.sdp.timings[0].start, self.sdp.timings[0].stop), (0, 0))
        self.assertEqual(len(self.sdp.media), 3)

    def test_rtpmaps_with_static_defaults(self) -> None:
        """rtpmaps() merges rtpmap lines with RFC 3551 static payload types."""
        self.assertEqual(self.sdp.media[0].rtpmaps(), {
            0: RtpMap("PCMU", 8000), 8: RtpMap("PCMA", 8000), 9: RtpMap("G722", 8000),
            111: RtpMap("opus", 48000, 2), 101: RtpMap("telephone-event", 8000),
        })
        self.assertEqual(self.sdp.media[0].fmtps()[101], "0-16")
        self.assertEqual(self.sdp.media[0].ptime_ms, 20)
        self.assertEqual(self.sdp.media[0].rtcp_port, 49171)

    def test_crypto(self) -> None:
        """Crypto lines give tag, suite, key params, session params and the inline key."""
        crypto = self.sdp.media[0].crypto()
        self.assertEqual([c.tag for c in crypto], [1, 2])
        self.assertEqual(crypto[0].suite, "AES_CM_128_HMAC_SHA1_80")
        self.assertEqual(crypto[0].inline_key, "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR")
        self.assertEqual(crypto[1].session_params, ("UNENCRYPTED_SRTCP",))
        self.assertTrue(self.sdp.media[0].is_secure)
        key = "a2tra2tra2tra2tra2tra3Nzc3Nzc3Nzc3Nzc3Nz"
        self.assertEqual(str(CryptoAttribute(1, AES_CM_128_HMAC_SHA1_80, b"k" * 16, b"s" * 14, session_params=("X",))),
                         f"1 AES_CM_128_HMAC_SHA1_80 inline:{key} X")

    def test_webrtc_attributes(self) -> None:
        """ICE, DTLS fingerprint, mid and rtcp-mux are exposed."""
        m = self.sdp.media[2]
        self.assertEqual((m.ice_ufrag, m.ice_pwd, m.mid), ("F7gI", "x9cml/YzichV2+XlhiMu8g", "0"))
        self.assertEqual(m.fingerprint, ("sha-256", "4A:AD:B9:B1:3F"))
        self.assertEqual(m.attribute("setup"), "actpass")
        self.assertTrue(m.rtcp_mux)
        self.assertEqual(len(m.candidates), 1)

    def test_direction(self) -> None:
        """Session default applies; port 0 is inactive; c=0.0.0.0 drops the receive half."""
        audio, video, webrtc = self.sdp.media
        self.assertEqual(self.sdp.direction(audio), "sendrecv")
        self.assertEqual(self.sdp.direction(video), "inactive")
        self.assertEqual(self.sdp.direction(webrtc), "inactive")  # recvonly + 0.0.0.0
        hold = parse_sdp(OFFER.replace("c=IN IP4 198.51.100.1", "c=IN IP4 0.0.0.0"))
        self.assertEqual(hold.direction(hold.media[0]), "sendonly")
        audio.set_direction("sendonly")
        self.assertEqual(self.sdp.direction(audio), "sendonly")

    def test_round_trip(self) -> None:
        """serialize() reproduces the input exactly (CRLF, order kept) and re-parses equal."""
        self.assertEqual(self.sdp.serialize(), OFFER)
        self.assertEqual(parse_sdp(self.sdp.serialize()), self.sdp)

    def test_lf_only_and_unknown_lines(self) -> None:
        """LF-only bodies parse; unknown line types are kept and written back."""
        text = OFFER.replace("\r\n", "\n").replace("t=0 0\n", "t=0 0\nr=7d 1h 0 25h\nz=2882844526 -1h\nx=unknown\n")
        sdp = parse_sdp(text.encode())
        self.assertEqual(sdp.timings[0].repeats, ["7d 1h 0 25h"])
        self.assertIn("x=unknown\r\n", sdp.serialize())
        self.assertEqual(parse_sdp(sdp.serialize()), sdp)

    def test_rfc4475_body(self) -> None:
        """The torture bodies' odd rtpmap ('LPC' with no clock) is tolerated; the static table fills in."""
        sdp = parse_sdp("v=0\r\no=mhandley 29739 7272939 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\n"
                        "t=0 0\r\nm=audio 49217 RTP/AVP 0 12\r\nm=video 3227 RTP/AVP 31\r\na=rtpmap:31 LPC\r\n")
        self.assertEqual(sdp.media[1].rtpmaps(), {31: RtpMap("H261", 90000)})

    def test_errors(self) -> None:
        """Malformed SDP raises SdpParseError (a ValueError with status 488)."""
        for bad in ("", "o=x", "v=0\r\no=a b\r\n", "v=0\r\no=a 1 2 IN IP4 h\r\nm=audio x RTP/AVP 0\r\n",
                    "v=0\r\no=a 1 2 IN IP4 h\r\nbogus\r\n", "v=0\r\ns=-\r\n", b"v=0\xff\r\n"):
            with self.assertRaises(SdpParseError, msg=repr(bad)) as ctx:
                parse_sdp(bad)
            self.assertEqual(ctx.exception.status, 488)


class BuildTests(SynchronousTestCase):
    """Building an SDP from the model."""

    def test_build_answer(self) -> None:
        """A model built in code serializes with mandatory lines and parses back equal."""
        sdp = SessionDescription(
            origin=Origin("activecall", "1", 1, address="203.0.113.5"),
            connection=Connection("203.0.113.5"),
            media=[MediaDescription("audio", 30000, "RTP/AVP", ["0", "101"], attributes=[
                Attribute("rtpmap", "0 PCMU/8000"), Attribute("rtpmap", "101 telephone-event/8000"),
                Attribute("ptime", "20"), Attribute("sendrecv"),
            ])],
        )
        text = sdp.serialize()
        self.assertTrue(text.startswith("v=0\r\no=activecall 1 1 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n"))
        self.assertEqual(parse_sdp(sdp.to_bytes()), sdp)
