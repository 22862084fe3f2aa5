"""Hardening: every number in an ``a=crypto`` line is bounded before it is used (issue item 1)."""

from __future__ import annotations

import time

from twisted.trial.unittest import SynchronousTestCase

from activecall.sdp.negotiation import NegotiationError, answer_offer
from activecall.rtp.srtp import SrtpError, generate_crypto, parse_crypto

KEY = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"
PREFIX = f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}"


def _offer(crypto_line: str) -> str:
    """An RTP/SAVP PCMU offer carrying ``crypto_line``."""
    return (
        "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
        "m=audio 40000 RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
        f"a=crypto:{crypto_line}\r\n"
    )


class LifetimeBoundTests(SynchronousTestCase):
    """The ``2^n`` and decimal key lifetimes are capped at 2^48 (RFC 4568 §6.1 / RFC 3711)."""

    def _rejected_fast(self, line: str) -> None:
        started = time.perf_counter()
        with self.assertRaises(SrtpError) as ctx:
            parse_crypto(line)
        self.assertEqual(ctx.exception.reason, "param")
        self.assertLess(time.perf_counter() - started, 0.1, line[:60])

    def test_power_bomb_rejected_quickly(self) -> None:
        """``|2^2000000000`` (hundreds of MB as an int) is refused without computing it."""
        self._rejected_fast(PREFIX + "|2^2000000000")

    def test_huge_power_rejected_quickly(self) -> None:
        """``|2^99999999999`` (34 s and 12 GB before the fix) is refused at once."""
        self._rejected_fast(PREFIX + "|2^99999999999")

    def test_exponent_bound_is_48(self) -> None:
        """2^48 is the largest lifetime accepted; 2^49 is refused."""
        self.assertEqual(parse_crypto(PREFIX + "|2^48").lifetime, 1 << 48)
        self.assertEqual(parse_crypto(PREFIX + "|2^0").lifetime, 1)
        self._rejected_fast(PREFIX + "|2^49")
        self._rejected_fast(PREFIX + "|2^" + "9" * 5000)

    def test_decimal_lifetime_bounded(self) -> None:
        """A decimal lifetime above 2^48, or of thousands of digits, is refused (no plain ValueError)."""
        self.assertEqual(parse_crypto(PREFIX + f"|{1 << 48}").lifetime, 1 << 48)
        self._rejected_fast(PREFIX + f"|{(1 << 48) + 1}")
        self._rejected_fast(PREFIX + "|" + "9" * 5000)
        self._rejected_fast(PREFIX + "|0")

    def test_unicode_digits_rejected(self) -> None:
        """Arabic-Indic and superscript digits are not numbers on the wire."""
        for extra in ("|2^\u0663", "|\u0663\u0663", "|2^\u00b2", "|1:\u0664", "|\u0661:4"):
            self._rejected_fast(PREFIX + extra)
        with self.assertRaises(SrtpError):
            parse_crypto("\u0661 AES_CM_128_HMAC_SHA1_80 inline:" + KEY)

    def test_savp_offer_with_bomb_is_not_usable(self) -> None:
        """An RTP/SAVP INVITE offer with the bomb fails negotiation (488) quickly, SRTP enabled or not."""
        for srtp in (True, False):
            started = time.perf_counter()
            with self.assertRaises(NegotiationError):
                answer_offer(_offer(PREFIX + "|2^2000000000"), ["pcmu"], "192.0.2.2", 30000,
                             session_id=1, srtp=srtp,
                             make_crypto=lambda t, s: generate_crypto(t, s, __import__("random").Random(7)))
            self.assertLess(time.perf_counter() - started, 0.1)


class MkiBoundTests(SynchronousTestCase):
    """The MKI value must fit its declared length of 1..128 bytes."""

    def test_mki_value_must_fit_its_length(self) -> None:
        """``|255:1`` fits one byte, ``|256:1`` does not; a 5000-digit MKI is refused, not a ValueError."""
        self.assertEqual(parse_crypto(PREFIX + "|255:1").mki, (255, 1))
        self.assertEqual(parse_crypto(PREFIX + "|2^20|1:4").mki, (1, 4))
        for extra in ("|256:1", "|" + "9" * 5000 + ":4", "|1:0", "|1:129", "|1:" + "1" * 5000):
            with self.assertRaises(SrtpError, msg=extra[:40]):
                parse_crypto(PREFIX + extra)

    def test_largest_mki_accepted(self) -> None:
        """A 128-byte MKI of all ones is the largest value accepted."""
        value = (1 << (8 * 128)) - 1
        self.assertEqual(parse_crypto(PREFIX + f"|{value}:128").mki, (value, 128))
        with self.assertRaises(SrtpError):
            parse_crypto(PREFIX + f"|{value + 1}:128")

    def test_tag_bounded(self) -> None:
        """The tag is 1*9DIGIT (RFC 4568 §9.1); ten digits are refused."""
        self.assertEqual(parse_crypto("999999999 AES_CM_128_HMAC_SHA1_80 inline:" + KEY).tag, 999999999)
        with self.assertRaises(SrtpError):
            parse_crypto("1234567890 AES_CM_128_HMAC_SHA1_80 inline:" + KEY)

    def test_failing_offers_do_not_raise_value_error(self) -> None:
        """Bad crypto lines in an offer end in NegotiationError, never a bare ValueError."""
        for extra in ("|" + "9" * 5000, "|" + "9" * 5000 + ":4"):
            with self.assertRaises(NegotiationError):
                answer_offer(_offer(PREFIX + extra), ["pcmu"], "192.0.2.2", 30000, session_id=1)
