"""Tests for activecall.sdp.negotiation: audio SDP offer/answer."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from activecall.sdp.negotiation import (
    NegotiationError,
    SdpError,
    answer_direction,
    answer_offer,
    apply_answer,
    build_offer,
)
from activecall.rtp.srtp import AES_CM_128_HMAC_SHA1_32, AES_CM_128_HMAC_SHA1_80, generate_crypto
from activecall.sdp.model import RtpMap, SdpParseError, parse_sdp

PREFS = ("pcmu", "pcma", "g722", "g729", "opus", "telephone_event")

PHONE_OFFER = (
    "v=0\r\n"
    "o=phone 123 456 IN IP4 192.0.2.10\r\n"
    "s=call\r\n"
    "c=IN IP4 192.0.2.10\r\n"
    "t=0 0\r\n"
    "m=audio 40000 RTP/AVP 9 8 96 18\r\n"
    "a=rtpmap:9 G722/8000\r\n"
    "a=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:96 telephone-event/8000\r\n"
    "a=fmtp:96 0-15\r\n"
    "a=rtpmap:18 G729/8000\r\n"
    "a=ptime:30\r\n"
    "a=sendrecv\r\n"
)


def _offer(body: str) -> str:
    return "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n" + body


def _crypto(tag: int = 1, suite: str = AES_CM_128_HMAC_SHA1_80, seed: int = 1):
    return generate_crypto(tag, suite, random.Random(seed))


class ParseTests(SynchronousTestCase):
    """Reading offers through the project's SDP model (activecall.sdp.model)."""

    def test_sdp_error_is_the_sdp_models_error(self) -> None:
        """SdpError is sdp.py's SdpParseError, a ValueError, so one except clause catches both."""
        self.assertIs(SdpError, SdpParseError)
        self.assertTrue(issubclass(SdpError, ValueError))

    def test_phone_offer_as_negotiation_reads_it(self) -> None:
        """The model gives negotiation the origin, connection, formats, rtpmap, fmtp, ptime and direction."""
        sd = parse_sdp(PHONE_OFFER)
        self.assertEqual((sd.origin.session_id, sd.origin.session_version), ("123", 456))
        assert sd.connection is not None
        self.assertEqual(sd.connection.host, "192.0.2.10")
        m = sd.media[0]
        self.assertEqual(m.payload_types, [9, 8, 96, 18])
        self.assertEqual(m.rtpmaps()[9], RtpMap("G722", 8000, 1))
        self.assertEqual(m.rtpmaps()[96], RtpMap("telephone-event", 8000, 1))
        self.assertEqual(m.fmtps()[96], "0-15")
        self.assertEqual((m.ptime_ms, sd.direction(m)), (30, "sendrecv"))

    def test_static_payload_type_without_rtpmap(self) -> None:
        """A static payload type with no a=rtpmap is still negotiated (PCMU as 0)."""
        _, neg = answer_offer(_offer("m=audio 5000 RTP/AVP 0\r\n"), PREFS, "10.0.0.1", 12000, session_id=1)
        self.assertEqual((neg.codec, neg.payload_type), ("pcmu", 0))

    def test_lf_line_endings_and_bytes(self) -> None:
        """Bare LF line endings and bytes input negotiate the same as CRLF text."""
        _, neg = answer_offer(PHONE_OFFER.replace("\r\n", "\n").encode(), PREFS, "10.0.0.1", 12000, session_id=1)
        self.assertEqual((neg.remote_port, neg.codec), (40000, "pcma"))

    def test_rejects_garbage(self) -> None:
        """A body that is not SDP makes answer_offer raise SdpError."""
        for bad in ("hello", "v=0\r\nm=audio x RTP/AVP 0\r\n", "o=- 1 1 IN IP4 x\r\n", "v=0\r\nc=IN XX 1\r\n"):
            with self.subTest(bad=bad):
                self.assertRaises(SdpError, answer_offer, bad, PREFS, "10.0.0.1", 12000, session_id=1)

    def test_non_ip_connection_address(self) -> None:
        """A well-formed offer whose c= is not an IP4/IP6 address cannot be answered."""
        offer = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN XX 1\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\n"
        self.assertRaises(NegotiationError, answer_offer, offer, PREFS, "10.0.0.1", 12000, session_id=1)

    def test_rtcp_attribute(self) -> None:
        """a=rtcp gives the RTCP port and address the leg sends RTCP to."""
        offer = _offer("m=audio 5000 RTP/AVP 0\r\na=rtcp:6001 IN IP4 192.0.2.9\r\n")
        _, neg = answer_offer(offer, PREFS, "10.0.0.1", 12000, session_id=1)
        self.assertEqual((neg.remote_rtcp_port, neg.remote_rtcp_address), (6001, "192.0.2.9"))
        _, neg = answer_offer(_offer("m=audio 5000 RTP/AVP 0\r\na=rtcp:6001\r\n"), PREFS, "10.0.0.1", 12000, session_id=1)
        self.assertEqual((neg.remote_rtcp_port, neg.remote_rtcp_address), (6001, "192.0.2.1"))


class AnswerTests(SynchronousTestCase):
    """Answering offers."""

    def test_chooses_our_preference_among_offered(self) -> None:
        """PCMA wins over the peer's first choice G.722 because we prefer PCMU > PCMA > G722."""
        text, neg = answer_offer(PHONE_OFFER, PREFS, "198.51.100.7", 12000, session_id=9)
        self.assertEqual((neg.codec, neg.payload_type, neg.clock_rate_hz), ("pcma", 8, 8000))
        self.assertEqual(neg.telephone_event_pt, 96)
        self.assertEqual((neg.remote_address, neg.remote_port), ("192.0.2.10", 40000))
        self.assertEqual((neg.remote_rtcp_address, neg.remote_rtcp_port), ("192.0.2.10", 40001))
        self.assertEqual((neg.ptime_ms, neg.remote_ptime_ms), (20, 30))
        self.assertEqual(neg.direction, "sendrecv")
        self.assertFalse(neg.srtp)
        ans = parse_sdp(text)
        self.assertEqual(ans.connection.host if ans.connection else None, "198.51.100.7")
        m = ans.media[0]
        self.assertEqual((m.port, m.proto, m.payload_types), (12000, "RTP/AVP", [8, 96]))
        self.assertEqual(m.fmtps()[96], "0-15")
        self.assertEqual((m.ptime_ms, m.rtcp_port, ans.direction(m)), (20, 12001, "sendrecv"))

    def test_preference_order_follows_config(self) -> None:
        """A config listing g722 first picks G.722 (RTP clock 8000)."""
        _, neg = answer_offer(PHONE_OFFER, ("g722", "pcmu", "dtmf"), "198.51.100.7", 12000, session_id=9)
        self.assertEqual((neg.codec, neg.payload_type, neg.telephone_event_pt), ("g722", 9, 96))

    def test_no_telephone_event_when_not_configured(self) -> None:
        """Without telephone_event in our list the answer omits it (in-band DTMF then)."""
        text, neg = answer_offer(PHONE_OFFER, ("pcma",), "198.51.100.7", 12000, session_id=9)
        self.assertIsNone(neg.telephone_event_pt)
        self.assertEqual(parse_sdp(text).media[0].payload_types, [8])

    def test_opus_keeps_dynamic_numbers_and_te48000(self) -> None:
        """Opus and telephone-event/48000 keep the peer's payload numbers; fmtp is mirrored."""
        offer = _offer(
            "m=audio 5000 RTP/AVP 109 0 101 100\r\n"
            "a=rtpmap:109 opus/48000/2\r\na=fmtp:109 minptime=10;useinbandfec=1;stereo=0\r\n"
            "a=rtpmap:101 telephone-event/48000\r\na=rtpmap:100 telephone-event/8000\r\n"
        )
        text, neg = answer_offer(offer, ("opus", "pcmu", "telephone_event"), "10.0.0.1", 12000, session_id=1)
        self.assertEqual((neg.codec, neg.payload_type, neg.clock_rate_hz, neg.telephone_event_pt), ("opus", 109, 48000, 101))
        m = parse_sdp(text).media[0]
        self.assertEqual(m.payload_types, [109, 101])
        self.assertEqual(m.rtpmaps()[109], RtpMap("opus", 48000, 2))
        self.assertIn("stereo=0", m.fmtps()[109])
        _, neg8 = answer_offer(offer, ("pcmu", "telephone_event"), "10.0.0.1", 12000, session_id=1)
        self.assertEqual((neg8.codec, neg8.telephone_event_pt), ("pcmu", 100))

    def test_no_common_codec(self) -> None:
        """An offer with only codecs we lack raises NegotiationError."""
        offer = _offer("m=audio 5000 RTP/AVP 18\r\na=rtpmap:18 G729/8000\r\n")
        self.assertRaises(NegotiationError, answer_offer, offer, PREFS, "10.0.0.1", 12000, session_id=1)

    def test_other_streams_rejected_with_port_zero(self) -> None:
        """A video line and a second audio line get port 0; the answer keeps the m-line count."""
        offer = _offer(
            "m=video 6000 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n"
            "m=audio 5000 RTP/AVP 0\r\nm=audio 5002 RTP/AVP 0\r\n"
        )
        text, neg = answer_offer(offer, PREFS, "10.0.0.1", 12000, session_id=1)
        ms = parse_sdp(text).media
        self.assertEqual([(m.media, m.port) for m in ms], [("video", 0), ("audio", 12000), ("audio", 0)])
        self.assertEqual(neg.remote_port, 5000)

    def test_direction_rules(self) -> None:
        """RFC 3264 §6.1: sendonly -> recvonly, recvonly -> sendonly, inactive -> inactive, local hold limits."""
        self.assertEqual(answer_direction("sendonly"), "recvonly")
        self.assertEqual(answer_direction("recvonly"), "sendonly")
        self.assertEqual(answer_direction("inactive"), "inactive")
        self.assertEqual(answer_direction("sendrecv", "sendonly"), "sendonly")
        self.assertEqual(answer_direction("sendonly", "sendonly"), "inactive")

    def test_hold_offers(self) -> None:
        """a=sendonly and c=0.0.0.0 are holds: we stop sending but keep receiving."""
        text, neg = answer_offer(_offer("m=audio 5000 RTP/AVP 0\r\na=sendonly\r\n"), PREFS, "10.0.0.1", 12000, session_id=1)
        self.assertTrue(neg.remote_hold)
        self.assertEqual(neg.direction, "recvonly")
        self.assertFalse(neg.can_send)
        self.assertTrue(neg.can_receive)
        ans = parse_sdp(text)
        self.assertEqual(ans.direction(ans.media[0]), "recvonly")
        old = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\n"
        _, neg = answer_offer(old, PREFS, "10.0.0.1", 12000, session_id=1)
        self.assertTrue(neg.remote_hold)
        self.assertEqual(neg.direction, "recvonly")
        _, neg = answer_offer(_offer("m=audio 5000 RTP/AVP 0\r\na=inactive\r\n"), PREFS, "10.0.0.1", 12000, session_id=1)
        self.assertEqual(neg.direction, "inactive")

    def test_session_level_direction(self) -> None:
        """A session-level a=sendonly applies to the media line."""
        offer = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\na=sendonly\r\nm=audio 5000 RTP/AVP 0\r\n"
        _, neg = answer_offer(offer, PREFS, "10.0.0.1", 12000, session_id=1)
        self.assertEqual(neg.direction, "recvonly")

    def test_srtp_offer_answered_with_our_key(self) -> None:
        """An RTP/SAVP offer gets RTP/SAVP with a crypto line of the same tag and suite."""
        theirs = [_crypto(1, AES_CM_128_HMAC_SHA1_32, 1), _crypto(2, AES_CM_128_HMAC_SHA1_80, 2)]
        lines = "".join("a=crypto:" + c.encode() + "\r\n" for c in theirs)
        offer = _offer("m=audio 5000 RTP/SAVP 0\r\n" + lines)
        rng = random.Random(3)
        text, neg = answer_offer(
            offer, PREFS, "10.0.0.1", 12000, session_id=1,
            make_crypto=lambda tag, suite: generate_crypto(tag, suite, rng),
        )
        self.assertEqual(neg.remote_crypto, theirs[0])
        assert neg.local_crypto is not None
        self.assertEqual((neg.local_crypto.tag, neg.local_crypto.suite), (1, AES_CM_128_HMAC_SHA1_32))
        m = parse_sdp(text).media[0]
        self.assertEqual(m.proto, "RTP/SAVP")
        self.assertEqual([str(c) for c in m.crypto()], [neg.local_crypto.encode()])

    def test_srtp_offer_without_usable_crypto_fails(self) -> None:
        """RTP/SAVP with an unknown suite only cannot be answered."""
        offer = _offer("m=audio 5000 RTP/SAVP 0\r\na=crypto:1 F8_128_HMAC_SHA1_80 inline:AAAA\r\n")
        self.assertRaises(
            NegotiationError, answer_offer, offer, PREFS, "10.0.0.1", 12000, session_id=1, make_crypto=lambda t, s: _crypto(t, s)
        )

    def test_avp_with_crypto_uses_srtp_only_when_enabled(self) -> None:
        """Best-effort SRTP (a=crypto in RTP/AVP) is used only with srtp=True."""
        offer = _offer("m=audio 5000 RTP/AVP 0\r\na=crypto:1 " + _crypto().encode().split(" ", 1)[1] + "\r\n")
        _, plain = answer_offer(offer, PREFS, "10.0.0.1", 12000, session_id=1)
        self.assertFalse(plain.srtp)
        _, secure = answer_offer(offer, PREFS, "10.0.0.1", 12000, session_id=1, srtp=True, make_crypto=lambda t, s: _crypto(t, s, 5))
        self.assertTrue(secure.srtp)

    def test_reoffer_keeps_local_key(self) -> None:
        """Passing local_crypto on a re-offer keeps our key (same suite)."""
        offer = _offer("m=audio 5000 RTP/SAVP 0\r\na=crypto:3 " + _crypto().encode().split(" ", 1)[1] + "\r\n")
        mine = _crypto(1, AES_CM_128_HMAC_SHA1_80, 9)
        _, neg = answer_offer(offer, PREFS, "10.0.0.1", 12000, session_id=1, local_crypto=mine)
        assert neg.local_crypto is not None
        self.assertEqual((neg.local_crypto.tag, neg.local_crypto.key_salt), (3, mine.key_salt))

    def test_rtcp_mux_accepted(self) -> None:
        """An offered a=rtcp-mux is answered and RTCP goes to the RTP port."""
        text, neg = answer_offer(_offer("m=audio 5000 RTP/AVP 0\r\na=rtcp-mux\r\n"), PREFS, "10.0.0.1", 12000, session_id=1)
        self.assertTrue(neg.rtcp_mux)
        self.assertEqual(neg.remote_rtcp_port, 5000)
        self.assertTrue(parse_sdp(text).media[0].rtcp_mux)

    def test_unsupported_transport(self) -> None:
        """A DTLS (UDP/TLS/RTP/SAVPF) audio line is not answerable here."""
        offer = _offer("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n")
        self.assertRaises(NegotiationError, answer_offer, offer, PREFS, "10.0.0.1", 12000, session_id=1)


class OfferTests(SynchronousTestCase):
    """Building our offer and reading the answer."""

    def test_offer_lists_codecs_in_order(self) -> None:
        """The offer lists PCMU, PCMA, G722, opus/48000/2, and telephone-event at 8000 and 48000; g729 is skipped."""
        offer = build_offer(PREFS, "203.0.113.5", 20000, session_id=77)
        sd = parse_sdp(offer.sdp)
        assert sd.connection is not None
        self.assertEqual(sd.connection.host, "203.0.113.5")
        m = sd.media[0]
        self.assertEqual(m.payload_types, [0, 8, 9, 111, 101, 110])
        self.assertEqual(m.rtpmaps()[111], RtpMap("opus", 48000, 2))
        self.assertEqual(m.rtpmaps()[110], RtpMap("telephone-event", 48000, 1))
        self.assertEqual((m.ptime_ms, m.rtcp_port, sd.direction(m), m.proto), (20, 20001, "sendrecv", "RTP/AVP"))

    def test_offer_srtp_and_mux(self) -> None:
        """With crypto the offer is RTP/SAVP with a=crypto, and rtcp-mux replaces a=rtcp."""
        c = _crypto()
        offer = build_offer(("pcmu",), "10.0.0.1", 20000, session_id=1, crypto=[c], rtcp_mux=True)
        m = parse_sdp(offer.sdp).media[0]
        self.assertEqual((m.proto, [str(x) for x in m.crypto()], m.rtcp_mux, m.rtcp_port), ("RTP/SAVP", [c.encode()], True, None))

    def test_offer_answer_round_trip(self) -> None:
        """Our offer answered by our answerer gives matching negotiated streams on both sides."""
        rng = random.Random(4)
        mine = _crypto(1, AES_CM_128_HMAC_SHA1_80, 11)
        offer = build_offer(("g722", "pcmu", "telephone_event"), "10.0.0.1", 20000, session_id=1, crypto=[mine])
        text, theirs = answer_offer(
            offer.sdp, ("pcmu", "g722", "telephone_event"), "10.0.0.2", 30000, session_id=2,
            make_crypto=lambda t, s: generate_crypto(t, s, rng),
        )
        ours = apply_answer(offer, text)
        self.assertEqual((theirs.codec, ours.codec), ("pcmu", "pcmu"))
        self.assertEqual((ours.remote_address, ours.remote_port), ("10.0.0.2", 30000))
        self.assertEqual(ours.telephone_event_pt, 101)
        self.assertEqual(ours.local_crypto, mine)
        self.assertEqual(ours.remote_crypto, theirs.local_crypto)
        self.assertEqual(theirs.remote_crypto, mine)

    def test_answer_direction_from_peer(self) -> None:
        """A recvonly answer to our sendrecv offer lets us send only."""
        offer = build_offer(("pcmu",), "10.0.0.1", 20000, session_id=1)
        ans = _offer("m=audio 5000 RTP/AVP 0\r\na=recvonly\r\n")
        self.assertEqual(apply_answer(offer, ans).direction, "sendonly")

    def test_bad_answers(self) -> None:
        """Rejected audio, unknown codec and missing crypto are NegotiationErrors."""
        plain = build_offer(("pcmu",), "10.0.0.1", 20000, session_id=1)
        secure = build_offer(("pcmu",), "10.0.0.1", 20000, session_id=1, crypto=[_crypto()])
        self.assertRaises(NegotiationError, apply_answer, plain, _offer("m=audio 0 RTP/AVP 0\r\n"))
        self.assertRaises(NegotiationError, apply_answer, plain, _offer("m=audio 5000 RTP/AVP 8\r\n"))
        self.assertRaises(NegotiationError, apply_answer, secure, _offer("m=audio 5000 RTP/SAVP 0\r\n"))
        self.assertRaises(NegotiationError, apply_answer, plain, _offer("m=audio 5000 RTP/SAVP 0\r\n"))


class ComfortNoiseTests(SynchronousTestCase):
    """Comfort noise (RFC 3389 CN) is negotiated only when the peer offers it."""

    def test_offered_cn_is_answered(self) -> None:
        """A peer offering static PT 13 gets CN in our answer and comfort_noise_pt is 13."""
        offer = _offer("m=audio 40000 RTP/AVP 0 101 13\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n")
        text, neg = answer_offer(offer, PREFS, "198.51.100.7", 12000, session_id=9)
        self.assertEqual(neg.comfort_noise_pt, 13)
        m = parse_sdp(text).media[0]
        self.assertEqual(m.payload_types, [0, 101, 13])
        self.assertEqual(m.rtpmaps()[13], RtpMap("CN", 8000, 1))

    def test_cn_at_the_codec_rate_only(self) -> None:
        """A dynamic CN/16000 does not go with PCMU (RTP clock 8000); CN/8000 at PT 98 does."""
        only16 = _offer("m=audio 40000 RTP/AVP 0 97\r\na=rtpmap:97 CN/16000\r\n")
        self.assertIsNone(answer_offer(only16, PREFS, "198.51.100.7", 12000, session_id=9)[1].comfort_noise_pt)
        dyn = _offer("m=audio 40000 RTP/AVP 0 98\r\na=rtpmap:98 CN/8000\r\n")
        self.assertEqual(answer_offer(dyn, PREFS, "198.51.100.7", 12000, session_id=9)[1].comfort_noise_pt, 98)

    def test_no_cn_unless_offered(self) -> None:
        """Without CN in the offer the answer lists none and comfort_noise_pt is None; our offers list none."""
        text, neg = answer_offer(PHONE_OFFER, PREFS, "198.51.100.7", 12000, session_id=9)
        self.assertIsNone(neg.comfort_noise_pt)
        self.assertNotIn(13, parse_sdp(text).media[0].payload_types)
        offer = build_offer(PREFS, "198.51.100.7", 12000, session_id=9)
        self.assertNotIn("CN/", offer.sdp)
        answer = _offer("m=audio 40000 RTP/AVP 0 13\r\n")
        self.assertIsNone(apply_answer(offer, answer).comfort_noise_pt)
