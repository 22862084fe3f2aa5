"""Tests for activecall.rtp.srtp: SDES a=crypto lines and SRTP/SRTCP protect/unprotect.

Known answers come from RFC 3711 Appendix B (AES-CM keystream, key derivation)
and libSRTP's srtp_validate() vectors.  A small independent reference
implementation of RFC 3711 (AES-CTR and HMAC-SHA1 from ``cryptography``),
itself checked against those vectors, is the oracle for random packets.
"""

from __future__ import annotations

import hashlib
import hmac
import random

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from activecall.rtp.packet import build_rtp, parse_rtp
from activecall.rtp.srtp import (
    AES_CM_128_HMAC_SHA1_32,
    AES_CM_128_HMAC_SHA1_80,
    CryptoAttribute,
    SrtpContext,
    SrtpError,
    generate_crypto,
    parse_crypto,
)

# libSRTP srtp_driver.c srtp_validate(): master key || salt, RTP/RTCP plaintext and protected forms.
TEST_KEY = bytes.fromhex("e1f97a0d3e018be0d64fa32c06de4139" "0ec675ad498afeebb6960b3aabe6")
RTP_PLAIN = bytes.fromhex("800f1234decafbadcafebabe" + "ab" * 16)
SRTP_80 = bytes.fromhex(
    "800f1234decafbadcafebabe" "4e55dc4ce79978d88ca4d215949d2402" "b78d6acc99ea179b8dbb"
)
RTCP_PLAIN = bytes.fromhex("81c8000bcafebabe" + "ab" * 16)
SRTCP_80 = bytes.fromhex(
    "81c8000bcafebabe" "7128035be487b9bdbef89041f977a5a8" "80000001" "993e08cd54d6c1230798"
)


# ---------------------------------------------------------------------------
# Reference RFC 3711 implementation (test oracle only).


def _aes_cm(key: bytes, iv: int, n: int) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CTR(iv.to_bytes(16, "big"))).encryptor()
    return enc.update(bytes(n)) + enc.finalize()


def _derive(master: bytes, label: int, n: int) -> bytes:
    """RFC 3711 §4.3 key derivation with kdr = 0 (index term 0)."""
    key, salt = master[:16], master[16:]
    x = int.from_bytes(salt, "big") ^ (label << 48)
    return _aes_cm(key, x << 16, n)


def _xor(data: bytes, stream: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, stream))


def _ref_protect(master: bytes, packet: bytes, roc: int, tag_len: int) -> bytes:
    """Reference SRTP protect (no header extension or CSRC handling beyond parse_rtp)."""
    k_e, k_a, k_s = _derive(master, 0, 16), _derive(master, 1, 20), _derive(master, 2, 14)
    h = parse_rtp(packet)
    index = (roc << 16) | h.sequence
    iv = (int.from_bytes(k_s, "big") << 16) ^ (h.ssrc << 64) ^ (index << 16)
    off = h.payload_offset
    enc = packet[:off] + _xor(packet[off:], _aes_cm(k_e, iv, len(packet) - off))
    tag = hmac.new(k_a, enc + roc.to_bytes(4, "big"), hashlib.sha1).digest()[:tag_len]
    return enc + tag


def _ref_protect_rtcp(master: bytes, packet: bytes, index: int) -> bytes:
    """Reference SRTCP protect (80-bit tag, E bit set)."""
    k_e, k_a, k_s = _derive(master, 3, 16), _derive(master, 4, 20), _derive(master, 5, 14)
    ssrc = int.from_bytes(packet[4:8], "big")
    iv = (int.from_bytes(k_s, "big") << 16) ^ (ssrc << 64) ^ (index << 16)
    enc = packet[:8] + _xor(packet[8:], _aes_cm(k_e, iv, len(packet) - 8))
    enc += (0x80000000 | index).to_bytes(4, "big")
    return enc + hmac.new(k_a, enc, hashlib.sha1).digest()[:10]


class ReferenceTests(SynchronousTestCase):
    """The test oracle reproduces RFC 3711 Appendix B and libSRTP's vectors."""

    def test_rfc3711_b2_keystream(self) -> None:
        """AES-CM with the B.2 key and IV yields the published keystream."""
        ks = _aes_cm(bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c"), 0xF0F1F2F3F4F5F6F7F8F9FAFBFCFD0000, 48)
        self.assertEqual(
            ks.hex(),
            "e03ead0935c95e80e166b16dd92b4eb4d23513162b02d0f72a43a2fe4a5f97ab41e95b3bb0a2e8dd477901e4fca894c0",
        )

    def test_rfc3711_b3_key_derivation(self) -> None:
        """Key derivation from the B.3 master key/salt yields the published session keys."""
        self.assertEqual(_derive(TEST_KEY, 0, 16).hex(), "c61e7a93744f39ee10734afe3ff7a087")
        self.assertEqual(_derive(TEST_KEY, 2, 14).hex(), "30cbbc08863d8c85d49db34a9ae1")
        self.assertEqual(_derive(TEST_KEY, 1, 20).hex(), "cebe321f6ff7716b6fd4ab49af256a156d38baa4")

    def test_reference_matches_libsrtp_vectors(self) -> None:
        """The oracle reproduces libSRTP's SRTP and SRTCP known answers."""
        self.assertEqual(_ref_protect(TEST_KEY, RTP_PLAIN, 0, 10), SRTP_80)
        self.assertEqual(_ref_protect_rtcp(TEST_KEY, RTCP_PLAIN, 1), SRTCP_80)


class KnownAnswerTests(SynchronousTestCase):
    """SrtpContext produces and accepts libSRTP's reference packets."""

    def test_protect_80(self) -> None:
        """Protecting the reference RTP packet with _80 gives libSRTP's ciphertext."""
        ctx = SrtpContext(AES_CM_128_HMAC_SHA1_80, TEST_KEY, TEST_KEY)
        self.assertEqual(ctx.protect(RTP_PLAIN), SRTP_80)

    def test_protect_32(self) -> None:
        """With _32 the ciphertext is the same and the tag is the first 4 bytes of the HMAC."""
        ctx = SrtpContext(AES_CM_128_HMAC_SHA1_32, TEST_KEY, TEST_KEY)
        self.assertEqual(ctx.protect(RTP_PLAIN), SRTP_80[:-6])

    def test_unprotect_80(self) -> None:
        """Unprotecting libSRTP's ciphertext gives the plaintext back."""
        ctx = SrtpContext(AES_CM_128_HMAC_SHA1_80, TEST_KEY, TEST_KEY)
        self.assertEqual(ctx.unprotect(SRTP_80), RTP_PLAIN)

    def test_srtcp(self) -> None:
        """SRTCP protect/unprotect matches libSRTP's reference compound (index 1, E bit)."""
        ctx = SrtpContext(AES_CM_128_HMAC_SHA1_80, TEST_KEY, TEST_KEY)
        self.assertEqual(ctx.protect_rtcp(RTCP_PLAIN), SRTCP_80)
        self.assertEqual(ctx.unprotect_rtcp(SRTCP_80), RTCP_PLAIN)

    def test_srtcp_uses_80_bit_tag_with_32_suite(self) -> None:
        """The _32 suite still authenticates SRTCP with an 80-bit tag (RFC 4568 §6.2)."""
        ctx = SrtpContext(AES_CM_128_HMAC_SHA1_32, TEST_KEY, TEST_KEY)
        self.assertEqual(ctx.protect_rtcp(RTCP_PLAIN), SRTCP_80)


class RoundTripTests(SynchronousTestCase):
    """Two contexts with crossed keys talk to each other; tampering and replay fail."""

    def _pair(self, suite: str) -> tuple[SrtpContext, SrtpContext]:
        rng = random.Random(7)
        a, b = generate_crypto(1, suite, rng), generate_crypto(1, suite, rng)
        return SrtpContext.from_sdes(a, b), SrtpContext.from_sdes(b, a)

    def test_round_trip_both_suites(self) -> None:
        """RTP and RTCP survive protect on one side and unprotect on the other, for both suites."""
        for suite, tag_len in ((AES_CM_128_HMAC_SHA1_80, 10), (AES_CM_128_HMAC_SHA1_32, 4)):
            alice, bob = self._pair(suite)
            for seq in range(65530, 65536 + 10):  # across the rollover counter increment
                pkt = build_rtp(0, seq, 160 * seq, 0x1234, bytes(range(160)))
                wire = alice.protect(memoryview(pkt))
                self.assertEqual(len(wire), len(pkt) + tag_len)
                self.assertNotEqual(wire[12:172], pkt[12:])
                self.assertEqual(bob.unprotect(wire), pkt)
            rtcp = RTCP_PLAIN
            self.assertEqual(alice.unprotect_rtcp(bob.protect_rtcp(rtcp)), rtcp)

    def test_tampered_rejected(self) -> None:
        """A flipped bit in header, payload or tag is an authentication failure."""
        alice, bob = self._pair(AES_CM_128_HMAC_SHA1_80)
        for seq, pos in enumerate((1, 20, -1)):
            wire = bytearray(alice.protect(build_rtp(0, seq, 0, 0x1234, b"\x55" * 40)))
            wire[pos] ^= 0x01
            with self.assertRaises(SrtpError) as cm:
                bob.unprotect(wire)
            self.assertEqual(cm.exception.reason, "auth")
        wire_rtcp = bytearray(bob.protect_rtcp(RTCP_PLAIN))
        wire_rtcp[10] ^= 0x80
        with self.assertRaises(SrtpError):
            alice.unprotect_rtcp(wire_rtcp)

    def test_wrong_key_rejected(self) -> None:
        """A packet protected with another key does not authenticate."""
        alice, _ = self._pair(AES_CM_128_HMAC_SHA1_80)
        eve = SrtpContext(AES_CM_128_HMAC_SHA1_80, TEST_KEY, TEST_KEY)
        with self.assertRaises(SrtpError):
            eve.unprotect(alice.protect(RTP_PLAIN))

    def test_replay_rejected(self) -> None:
        """The same SRTP packet delivered twice is rejected the second time."""
        alice, bob = self._pair(AES_CM_128_HMAC_SHA1_80)
        wire = alice.protect(RTP_PLAIN)
        bob.unprotect(wire)
        with self.assertRaises(SrtpError) as cm:
            bob.unprotect(wire)
        self.assertEqual(cm.exception.reason, "replay")

    def test_new_ssrc_needs_no_rekey(self) -> None:
        """Packets from a new SSRC (mid-call change) are unprotected with the same keys."""
        alice, bob = self._pair(AES_CM_128_HMAC_SHA1_32)
        for ssrc in (1, 2, 3):
            pkt = build_rtp(8, 100, 0, ssrc, b"\xd5" * 160)
            self.assertEqual(bob.unprotect(alice.protect(pkt)), pkt)

    def test_short_garbage_rejected(self) -> None:
        """A datagram too short to be SRTP raises SrtpError rather than anything else."""
        _, bob = self._pair(AES_CM_128_HMAC_SHA1_80)
        for junk in (b"", b"\x80\x00", RTP_PLAIN[:12]):
            with self.assertRaises(SrtpError):
                bob.unprotect(junk)

    @settings(max_examples=40, deadline=None)
    @given(
        seq=st.integers(0, 0xFFFF),
        ssrc=st.integers(0, 0xFFFFFFFF),
        payload=st.binary(min_size=1, max_size=300),
        short=st.booleans(),
    )
    def test_matches_reference(self, seq: int, ssrc: int, payload: bytes, short: bool) -> None:
        """For random packets the protected bytes equal the independent reference implementation."""
        suite, tag_len = (AES_CM_128_HMAC_SHA1_32, 4) if short else (AES_CM_128_HMAC_SHA1_80, 10)
        ctx = SrtpContext(suite, TEST_KEY, TEST_KEY)
        pkt = build_rtp(96, seq, 12345, ssrc, payload, marker=True)
        self.assertEqual(ctx.protect(pkt), _ref_protect(TEST_KEY, pkt, 0, tag_len))


class SdesTests(SynchronousTestCase):
    """a=crypto lines parse, encode and generate."""

    LINE = "1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:4"

    def test_parse_rfc4568_example(self) -> None:
        """The RFC 4568 §4 example yields tag, suite, 16+14 key bytes, lifetime and MKI."""
        attr = parse_crypto("a=crypto:" + self.LINE)
        self.assertEqual((attr.tag, attr.suite, attr.lifetime, attr.mki), (1, AES_CM_128_HMAC_SHA1_80, 1 << 20, (1, 4)))
        self.assertEqual(len(attr.key), 16)
        self.assertEqual(len(attr.salt), 14)
        self.assertEqual(attr.key[:3], b"=-n")

    def test_encode_round_trip(self) -> None:
        """Encoding a parsed line reproduces it, including session parameters."""
        self.assertEqual(parse_crypto(self.LINE).encode(), self.LINE)
        line = "7 AES_CM_128_HMAC_SHA1_32 inline:" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNk" + " KDR=0"
        attr = parse_crypto(line)
        self.assertEqual(attr.session_params, ("KDR=0",))
        self.assertEqual(attr.encode(), line)
        self.assertEqual(CryptoAttribute(2, AES_CM_128_HMAC_SHA1_80, b"k" * 16, b"s" * 14, 1000).encode().split("|")[1], "1000")

    def test_generate_from_injected_source(self) -> None:
        """Generated keys come from the injected source: same seed, same key; valid line."""
        a = generate_crypto(1, AES_CM_128_HMAC_SHA1_80, random.Random(7))
        b = generate_crypto(1, AES_CM_128_HMAC_SHA1_80, random.Random(7))
        c = generate_crypto(1, AES_CM_128_HMAC_SHA1_80, random.Random(8))
        self.assertEqual(a, b)
        self.assertNotEqual(a.key_salt, c.key_salt)
        self.assertEqual(parse_crypto(a.encode()), a)
        self.assertEqual(len(a.key_salt), 30)

    def test_bad_lines_rejected(self) -> None:
        """Unknown suites, bad base64, wrong key length, bad tag or key params raise SrtpError."""
        key = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"
        for line in (
            "1 AES_256_CM_HMAC_SHA1_80 inline:" + key,
            "1 AES_CM_128_HMAC_SHA1_80 inline:" + key[:-4],
            "1 AES_CM_128_HMAC_SHA1_80 inline:" + key[:-1] + "*",
            "x AES_CM_128_HMAC_SHA1_80 inline:" + key,
            "1 AES_CM_128_HMAC_SHA1_80 uri:" + key,
            "1 AES_CM_128_HMAC_SHA1_80 inline:" + key + "|lifetime",
            "1 AES_CM_128_HMAC_SHA1_80 inline:" + key + "|1:999",
            "1 AES_CM_128_HMAC_SHA1_80 inline:" + key + ";inline:" + key,
            "1 AES_CM_128_HMAC_SHA1_80",
        ):
            with self.assertRaises(SrtpError, msg=line):
                parse_crypto(line)

    def test_unsupported_negotiation_rejected(self) -> None:
        """MKI, unencrypted/unauthenticated session params and mismatched suites cannot build a context."""
        rng = random.Random(7)
        good = generate_crypto(1, AES_CM_128_HMAC_SHA1_80, rng)
        with self.assertRaises(SrtpError):
            SrtpContext.from_sdes(good, parse_crypto(self.LINE))
        with self.assertRaises(SrtpError):
            SrtpContext.from_sdes(good, generate_crypto(1, AES_CM_128_HMAC_SHA1_32, rng))
        plain = parse_crypto(good.encode() + " UNENCRYPTED_SRTP")
        with self.assertRaises(SrtpError):
            SrtpContext.from_sdes(good, plain)
        with self.assertRaises(SrtpError):
            SrtpContext(AES_CM_128_HMAC_SHA1_80, b"short", TEST_KEY)
