"""SRTP/SRTCP (RFC 3711) with SDES keys (RFC 4568), wrapping pylibsrtp.

* :class:`CryptoAttribute`, :func:`parse_crypto` / :meth:`CryptoAttribute.encode`:
  the SDP ``a=crypto`` attribute value,
  ``<tag> <suite> inline:<base64 key||salt>[|lifetime][|MKI:len] [params]``.
  This is the project's one ``a=crypto`` model: the SDP model
  (:meth:`activecall.sdp.model.MediaDescription.crypto`), the offer/answer
  (:mod:`activecall.sdp.negotiation`) and :class:`SrtpContext` all use it.
* :func:`generate_crypto`: a fresh master key and salt from an injected
  random source (production: ``secrets.SystemRandom()``).
* :class:`SrtpContext`: protect what we send with our key, unprotect what we
  receive with the peer's key (each direction has its own libsrtp session).
  Any SSRC is accepted in both directions, so an SSRC change on either side
  needs no re-keying.  Failures raise :class:`SrtpError`.

No sockets and no clock; pylibsrtp is compute-only.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Protocol

import pylibsrtp

__all__ = [
    "SrtpError",
    "SrtpSuite",
    "SUITES",
    "AES_CM_128_HMAC_SHA1_80",
    "AES_CM_128_HMAC_SHA1_32",
    "CryptoAttribute",
    "MAX_LIFETIME",
    "parse_crypto",
    "generate_crypto",
    "SrtpContext",
]

AES_CM_128_HMAC_SHA1_80 = "AES_CM_128_HMAC_SHA1_80"
AES_CM_128_HMAC_SHA1_32 = "AES_CM_128_HMAC_SHA1_32"


class SrtpError(ValueError):
    """SRTP processing failed; ``reason`` is ``"auth"``, ``"replay"``, ``"param"`` or ``"other"``."""

    def __init__(self, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SrtpSuite:
    """A crypto suite we support: key/salt lengths, tag length and libsrtp profile."""

    name: str
    profile: int
    key_len: int
    salt_len: int
    tag_len: int


SUITES: dict[str, SrtpSuite] = {
    AES_CM_128_HMAC_SHA1_80: SrtpSuite(
        AES_CM_128_HMAC_SHA1_80, pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 16, 14, 10
    ),
    AES_CM_128_HMAC_SHA1_32: SrtpSuite(
        AES_CM_128_HMAC_SHA1_32, pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32, 16, 14, 4
    ),
}

_PREFIX = "a=crypto:"
_TAG_RE = re.compile(r"[0-9]{1,9}\Z")
# Numbers are ASCII digits of bounded length, matched before int() ever sees them:
# str.isdigit() takes '\u0663' and '\u00b2', and int() of 4,300+ digits raises ValueError.
_LIFETIME_RE = re.compile(r"(?:2\^([0-9]{1,3})|([0-9]{1,20}))\Z")
_MKI_RE = re.compile(r"([0-9]{1,400}):([0-9]{1,3})\Z")
#: RFC 4568 §6.1: SRTP master keys live at most 2^48 packets (RFC 3711 §9.2).
MAX_LIFETIME_EXPONENT = 48
MAX_LIFETIME = 1 << MAX_LIFETIME_EXPONENT
#: RFC 4568 §6.1: the MKI length is 1..128 bytes.
MAX_MKI_BYTES = 128


class RandomBits(Protocol):
    """Anything with ``getrandbits``: ``secrets.SystemRandom()`` or ``random.Random(7)``."""

    def getrandbits(self, k: int, /) -> int: ...


@dataclass(frozen=True, slots=True)
class CryptoAttribute:
    """One parsed ``a=crypto`` line (a single inline key)."""

    tag: int
    suite: str
    key: bytes
    salt: bytes
    lifetime: int | None = None
    mki: tuple[int, int] | None = None
    session_params: tuple[str, ...] = field(default=())

    @property
    def key_salt(self) -> bytes:
        """Master key followed by master salt, as libsrtp wants it."""
        return self.key + self.salt

    @property
    def inline_key(self) -> str:
        """The base64 key||salt of the ``inline:`` key parameter."""
        return base64.b64encode(self.key_salt).decode("ascii")

    def encode(self) -> str:
        """The attribute value (without ``a=crypto:``)."""
        key_params = "inline:" + self.inline_key
        if self.lifetime is not None:
            exp = self.lifetime.bit_length() - 1
            key_params += "|" + (f"2^{exp}" if self.lifetime == 1 << exp else str(self.lifetime))
        if self.mki is not None:
            key_params += f"|{self.mki[0]}:{self.mki[1]}"
        return " ".join((str(self.tag), self.suite, key_params, *self.session_params))

    def __str__(self) -> str:
        return self.encode()


def parse_crypto(value: str) -> CryptoAttribute:
    """Parse an ``a=crypto`` value (the ``a=crypto:`` prefix is optional).

    Raises :class:`SrtpError` (``reason="param"``) for unknown suites, bad
    base64 or key lengths, and malformed or out-of-range lifetime (above
    2^48) or MKI (1..128 bytes, value fitting the length).  Every number is
    ASCII digits of bounded length, checked before ``int()``.
    """
    text = value.strip()
    if text.startswith(_PREFIX):
        text = text[len(_PREFIX):]
    parts = text.split()
    if len(parts) < 3:
        raise SrtpError("a=crypto needs tag, suite and key params", "param")
    tag_s, suite_name, key_params, *params = parts
    if not _TAG_RE.match(tag_s):
        raise SrtpError("bad a=crypto tag", "param")
    suite = SUITES.get(suite_name)
    if suite is None:
        raise SrtpError("unsupported crypto suite " + suite_name, "param")
    if ";" in key_params:
        raise SrtpError("only one inline key is supported", "param")
    if not key_params.startswith("inline:"):
        raise SrtpError("key method must be inline", "param")
    b64, *extras = key_params[len("inline:"):].split("|")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SrtpError("bad base64 key", "param") from e
    if len(raw) != suite.key_len + suite.salt_len:
        raise SrtpError("key||salt has the wrong length for " + suite_name, "param")
    lifetime: int | None = None
    mki: tuple[int, int] | None = None
    for extra in extras:
        m = _MKI_RE.match(extra)
        if m and mki is None:
            mki = _mki(m.group(1), m.group(2))
            continue
        m = _LIFETIME_RE.match(extra)
        if m and lifetime is None and mki is None:
            lifetime = _lifetime(m.group(1), m.group(2))
            continue
        raise SrtpError("bad key parameter " + extra[:40], "param")
    return CryptoAttribute(
        int(tag_s), suite_name, raw[: suite.key_len], raw[suite.key_len :], lifetime, mki, tuple(params)
    )


def _lifetime(exponent: str | None, decimal: str | None) -> int:
    """A key lifetime ``2^n`` or decimal, at most 2^48; never computes a bigger number."""
    if exponent is not None:
        n = int(exponent)  # at most 3 digits: the regex bounds it
        if n > MAX_LIFETIME_EXPONENT:
            raise SrtpError("key lifetime above 2^48", "param")
        return 1 << n
    value = int(decimal or "")  # at most 20 digits
    if not 1 <= value <= MAX_LIFETIME:
        raise SrtpError("key lifetime out of range 1..2^48", "param")
    return value


def _mki(value_text: str, length_text: str) -> tuple[int, int]:
    """``MKI:length``: a length of 1..128 bytes and a value that fits in it."""
    length = int(length_text)  # at most 3 digits
    if not 1 <= length <= MAX_MKI_BYTES:
        raise SrtpError("MKI length out of range", "param")
    value = int(value_text)  # at most 400 digits: below int()'s limit, above 2^1024
    if value >> (8 * length):
        raise SrtpError("MKI value does not fit its length", "param")
    return value, length


def generate_crypto(tag: int, suite: str, rng: RandomBits) -> CryptoAttribute:
    """A new ``a=crypto`` offer/answer with a random master key and salt from ``rng``."""
    spec = SUITES.get(suite)
    if spec is None:
        raise SrtpError("unsupported crypto suite " + suite, "param")
    n = spec.key_len + spec.salt_len
    raw = rng.getrandbits(8 * n).to_bytes(n, "big")
    return CryptoAttribute(tag, suite, raw[: spec.key_len], raw[spec.key_len :])


def _error(e: Exception) -> SrtpError:
    msg = str(e)
    if msg.startswith("authentication"):
        return SrtpError(msg, "auth")
    if msg.startswith("replay"):
        return SrtpError(msg, "replay")
    return SrtpError(msg, "other")


class SrtpContext:
    """Protects outgoing and unprotects incoming RTP/RTCP for one media line.

    ``local_key`` (our key||salt, the one we offered/answered) protects what
    we send; ``remote_key`` (the peer's) unprotects what we receive.
    """

    __slots__ = ("suite", "_tx", "_rx")

    def __init__(self, suite: str, local_key: bytes, remote_key: bytes, *, replay_window: int = 128) -> None:
        spec = SUITES.get(suite)
        if spec is None:
            raise SrtpError("unsupported crypto suite " + suite, "param")
        need = spec.key_len + spec.salt_len
        if len(local_key) != need or len(remote_key) != need:
            raise SrtpError("key||salt must be %d bytes" % need, "param")
        self.suite = spec
        tx = pylibsrtp.Policy(
            key=bytes(local_key), ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=spec.profile
        )
        rx = pylibsrtp.Policy(
            key=bytes(remote_key), ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND, srtp_profile=spec.profile
        )
        rx.window_size = replay_window
        self._tx = pylibsrtp.Session(tx)
        self._rx = pylibsrtp.Session(rx)

    @classmethod
    def from_sdes(cls, local: CryptoAttribute, remote: CryptoAttribute) -> SrtpContext:
        """Build from our and the peer's negotiated ``a=crypto`` lines (same suite)."""
        if local.suite != remote.suite:
            raise SrtpError("local and remote crypto suites differ", "param")
        for attr in (local, remote):
            if attr.mki is not None:
                raise SrtpError("MKI is not supported", "param")
            for p in attr.session_params:
                if p.startswith("UNENCRYPTED") or p.startswith("UNAUTHENTICATED"):
                    raise SrtpError("session parameter not supported: " + p, "param")
        return cls(local.suite, local.key_salt, remote.key_salt)

    def protect(self, packet: bytes | bytearray | memoryview) -> bytes:
        """Encrypt and authenticate one RTP packet."""
        try:
            return self._tx.protect(packet if type(packet) is bytes else bytes(packet))
        except (pylibsrtp.Error, ValueError) as e:
            raise _error(e) from None

    def unprotect(self, packet: bytes | bytearray | memoryview) -> bytes:
        """Authenticate (with replay check) and decrypt one SRTP packet."""
        try:
            return self._rx.unprotect(packet if type(packet) is bytes else bytes(packet))
        except (pylibsrtp.Error, ValueError) as e:
            raise _error(e) from None

    def protect_rtcp(self, packet: bytes | bytearray | memoryview) -> bytes:
        """Encrypt and authenticate one (compound) RTCP packet."""
        try:
            return self._tx.protect_rtcp(packet if type(packet) is bytes else bytes(packet))
        except (pylibsrtp.Error, ValueError) as e:
            raise _error(e) from None

    def unprotect_rtcp(self, packet: bytes | bytearray | memoryview) -> bytes:
        """Authenticate and decrypt one SRTCP packet."""
        try:
            return self._rx.unprotect_rtcp(packet if type(packet) is bytes else bytes(packet))
        except (pylibsrtp.Error, ValueError) as e:
            raise _error(e) from None
