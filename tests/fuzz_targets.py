"""Fuzz targets shared by ``tests/unit/test_fuzz_parsers.py`` (hypothesis) and ``benchmarks/fuzz.py``.

Every parser reachable from the network or a control client is one
:class:`Target`: a callable taking ``bytes``, the exceptions it documents
(its module's ``ValueError`` subclasses), a seed corpus of valid inputs and
grammar templates whose ``{n}`` slots take hostile numbers.  Anything else a
target raises, and any error logged by the Twisted adapters while it runs, is
a finding.

Inputs are built two ways, by the same code in both runners:

* :func:`mutate`: a seed with byte flips, insertions of interesting tokens,
  deletions, duplications, splices and *number substitutions* (every run of
  digits can become ``2^2000000000``, 5000 nines, ``1e999``, ``nan``, an
  Arabic-Indic digit...).
* :func:`fill`: a template such as ``a=crypto:1 SUITE inline:KEY|2^{n}`` with
  numbers drawn from :data:`NUMBERS` or at random.

No sockets, no real reactor: the SIP adapters run on a ``Clock`` and a
memory datagram transport that refuses host names like Twisted's UDP port.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Target",
    "TARGETS",
    "NUMBERS",
    "Finding",
    "LoggedError",
    "mutate",
    "apply_ops",
    "fill",
    "random_number",
    "random_input",
    "run_one",
    "target",
]

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- numbers and tokens

#: Hostile numbers: bounds, overflows, int()'s 4,300-digit limit, floats and non-ASCII digits.
NUMBERS: tuple[str, ...] = (
    "0", "1", "-1", "00", "007", "127", "128", "255", "256", "65535", "65536", "70000",
    "2147483647", "2147483648", "4294967295", "4294967296", "18446744073709551616",
    "99999999999999999999", "9" * 4301, "1" + "0" * 4300, "9" * 5000,
    "2^0", "2^20", "2^31", "2^48", "2^49", "2^64", "2^2000000000", "2^99999999999", "2^" + "9" * 5000,
    "1e999", "-1e999", "1e-999", "1e5", "nan", "NaN", "inf", "-inf", "Infinity", "1.5", "20.0", ".5", "5.",
    "0x10", "1_000", "+5", " 7", "7 ", "--1",
    "\u0663", "\u00b2", "\uff11", "1\u0660", "\u0661\u0662\u0663", "\u2167", "\U0001d7d9",
)

#: Structural tokens of SIP, SDP, SRTP, JSON, YAML and TOML.
TOKENS: tuple[bytes, ...] = (
    b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\x00", b";", b",", b":", b"<", b">", b'"', b"\\", b"%", b"%00",
    b"[", b"]", b" ", b"\t", b"=", b"|", b"/", b"@", b"?", b"&", b"\xff", b"\xc3", b"\xe2\x80", b"{", b"}",
    b"---", b"*", b"&a ", b"*a", b"!!python/object:os.system", b"- ", b"#", b"'", b"${X}", b"[[", b"]]",
    b"\xd9\xa3", b"\xc2\xb2", b"sips:", b"[::1]", b";rport", b";received=h.example", b";maddr=h.example",
    b"2^", b"inline:", b"|", b"a=", b"m=", b"v=0", b"Content-Length: ", b"l: ", b"Via: ", b"v: ",
    b"\\u0000", b"\\ud800", b"[" * 64, b"{\"a\":" * 32,
)

_DIGITS = re.compile(rb"[0-9]+")


def random_number(rng: random.Random) -> str:
    """One hostile number: from :data:`NUMBERS`, a random int, a digit string or an exponent."""
    kind = rng.randrange(6)
    if kind <= 1:
        return rng.choice(NUMBERS)
    if kind == 2:
        return str(rng.randint(-(2**70), 2**70) >> rng.randrange(70))
    if kind == 3:
        alphabet = "0123456789" if rng.random() < 0.8 else "0123456789\u0660\u0663\u00b2\uff11"
        return "".join(rng.choice(alphabet) for _ in range(rng.choice((1, 2, 3, 5, 10, 20, 400, 4400))))
    if kind == 4:
        return "2^" + str(rng.choice((rng.randrange(100), rng.randrange(10**12))))
    return f"{rng.choice(('', '-'))}{rng.randrange(10)}e{rng.choice(('', '-'))}{rng.randrange(2000)}"


# ---------------------------------------------------------------------------- mutations

#: One mutation: (kind, position, argument); positions and arguments are reduced modulo sizes.
Op = tuple[int, int, int]
N_OPS = 9


def _apply(data: bytes, op: Op, others: Sequence[bytes]) -> bytes:
    kind, pos, arg = op
    n = len(data)
    at = pos % (n + 1)
    if kind == 0:  # flip one byte
        if not n:
            return data
        i = pos % n
        return data[:i] + bytes((data[i] ^ (1 << (arg % 8)) if arg % 3 else arg % 256,)) + data[i + 1:]
    if kind == 1:  # insert a token
        return data[:at] + TOKENS[arg % len(TOKENS)] + data[at:]
    if kind == 2:  # delete a range
        return data[:at] + data[at + 1 + arg % 16:]
    if kind == 3:  # duplicate a range
        chunk = data[at:at + 1 + arg % 64]
        return data[:at] + chunk * (2 + arg % 3) + data[at:]
    if kind == 4:  # substitute a number for one run of digits
        runs = list(_DIGITS.finditer(data))
        number = NUMBERS[arg % len(NUMBERS)].encode("utf-8")
        if not runs:
            return data[:at] + number + data[at:]
        m = runs[pos % len(runs)]
        return data[:m.start()] + number + data[m.end():]
    if kind == 5:  # truncate
        return data[:at]
    if kind == 6:  # splice the tail of another seed
        other = others[arg % len(others)] if others else data
        return data[:at] + other[(arg // 7) % (len(other) + 1):]
    if kind == 7:  # repeat a line (header, attribute) many times
        start = data.rfind(b"\n", 0, at) + 1
        end = data.find(b"\n", at)
        line = data[start:end + 1] if end >= 0 else data[start:] + b"\n"
        return data[:start] + line * (2 + arg % 200) + data[start:]
    # kind 8: swap case of one byte / replace with a random byte
    if not n:
        return bytes((arg % 256,))
    i = pos % n
    return data[:i] + bytes((arg % 256,)) + data[i + 1:]


def apply_ops(seed: bytes, ops: Sequence[Op], others: Sequence[bytes] = ()) -> bytes:
    """``seed`` after ``ops`` in order (kept within 64 KiB, the largest datagram or SIP head)."""
    data = seed
    for op in ops:
        data = _apply(data, op, others)[: 1 << 16]
    return data


def mutate(seed: bytes, rng: random.Random, others: Sequence[bytes] = ()) -> bytes:
    """``seed`` with 1..8 random mutations (mostly few, so most inputs stay near-valid)."""
    ops = [(rng.randrange(N_OPS), rng.randrange(1 << 20), rng.randrange(1 << 20))
           for _ in range(rng.choice((1, 1, 1, 1, 2, 2, 3, 5, 8)))]
    return apply_ops(seed, ops, others)


def fill(template: str, numbers: Sequence[str]) -> bytes:
    """``template`` with its ``{n}`` slots replaced by ``numbers`` in turn (cycled)."""
    parts = template.split("{n}")
    out = [parts[0]]
    for i, part in enumerate(parts[1:]):
        out.append(numbers[i % len(numbers)] if numbers else "0")
        out.append(part)
    return "".join(out).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------------- findings


class LoggedError(AssertionError):
    """An adapter logged an error or a traceback (``log.failure``) while handling the input."""


@dataclass(frozen=True)
class Finding:
    """An undocumented exception (or a logged error) for one input."""

    target: str
    data: bytes
    error: BaseException

    def reproducer(self) -> str:
        """A line of Python that reproduces the finding."""
        return f"TARGETS_BY_NAME[{self.target!r}].run({self.data!r})"


@dataclass
class Target:
    """One fuzzed entry point.

    ``run(data)`` parses ``data`` and exercises what the application does with
    the result; ``allowed`` are its documented exceptions; ``owner`` is
    ``"hardening"`` for the modules of this work, or the module owned by
    someone else; ``reset()`` drops state a stateful target accumulates.
    """

    name: str
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]
    seeds: tuple[bytes, ...]
    templates: tuple[str, ...] = ()
    owner: str = "hardening"
    reset: Callable[[], None] = field(default=lambda: None)


def run_one(t: Target, data: bytes) -> Finding | None:
    """Run ``t`` on ``data``; a :class:`Finding` if it raised anything undocumented."""
    try:
        t.run(data)
    except t.allowed:
        return None
    except Exception as e:  # noqa: BLE001 - that is the point of a fuzzer
        return Finding(t.name, data, e)
    return None


def random_input(t: Target, rng: random.Random) -> bytes:
    """A mutated seed (3 in 4) or a filled template of ``t``."""
    if t.templates and rng.random() < 0.25:
        template = rng.choice(t.templates)
        return fill(template, [random_number(rng) for _ in range(template.count("{n}"))])
    return mutate(rng.choice(t.seeds), rng, t.seeds)


# ---------------------------------------------------------------------------- seeds

_KEY = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"
_CRYPTO = f"1 AES_CM_128_HMAC_SHA1_80 inline:{_KEY}|2^20|1:4"

SDP_OFFER = (
    "v=0\r\no=alice 2890844526 2890844527 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\n"
    "b=AS:64\r\nt=0 0\r\nm=audio 49170 RTP/SAVP 0 8 9 111 101\r\na=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:8 PCMA/8000\r\na=rtpmap:9 G722/8000\r\na=rtpmap:111 opus/48000/2\r\n"
    "a=fmtp:111 minptime=10;useinbandfec=1\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\n"
    f"a=ptime:20\r\na=rtcp:49171 IN IP4 192.0.2.10\r\na=crypto:{_CRYPTO}\r\n"
    "a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNk\r\na=sendrecv\r\n"
    "m=video 0 RTP/AVP 31\r\n"
)
SDP_PLAIN = (
    "v=0\r\no=- 1 1 IN IP4 192.0.2.20\r\ns=call\r\nc=IN IP4 192.0.2.20\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    "a=rtcp-mux\r\na=ptime:30\r\na=sendonly\r\n"
)
SDP_ICE = (
    "v=0\r\no=- 4611731400430051336 2 IN IP6 ::1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP6 ::\r\na=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdefghijkl\r\n"
    "a=fingerprint:sha-256 AB:CD:EF\r\na=setup:actpass\r\na=mid:0\r\na=candidate:1 1 udp 2122260223 192.0.2.1 54321 typ host\r\n"
    "a=rtpmap:111 opus/48000/2\r\na=rtcp-mux\r\n"
)


def _sip(method: str, *, body: str = "", extra: str = "", ctype: str = "application/sdp",
         via: str = "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport") -> bytes:
    ct = f"Content-Type: {ctype}\r\n" if body else ""
    return (
        f"{method} sip:agent@192.0.2.1:5060;transport=udp SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\n"
        f"To: \"Agent\" <sip:agent@192.0.2.1>\r\nFrom: Alice <sip:alice@example.com>;tag=1928301774\r\n"
        f"Call-ID: a84b4c76e66710@pc33.example.com\r\nCSeq: 314159 {method}\r\n"
        f"Contact: <sip:alice@192.0.2.10:5060;ob>;expires=3600\r\n{extra}{ct}Content-Length: {len(body.encode())}\r\n\r\n{body}"
    ).encode("utf-8")


SIP_SEEDS: tuple[bytes, ...] = (
    _sip("INVITE", body=SDP_OFFER, extra="Route: <sip:proxy.example.com;lr>\r\nSupported: timer\r\nSession-Expires: 1800\r\n"),
    _sip("INVITE", body=SDP_PLAIN, via="SIP/2.0/UDP pc33.example.com:5062;branch=z9hG4bKnashds8"),
    _sip("OPTIONS"),
    _sip("REGISTER", extra='Authorization: Digest username="alice", realm="example.com", nonce="abc", '
                           'uri="sip:example.com", response="0123456789abcdef0123456789abcdef", qop=auth, '
                           'nc=00000001, cnonce="x", algorithm=MD5\r\nExpires: 3600\r\n'),
    _sip("BYE"), _sip("CANCEL"), _sip("ACK"),
    _sip("NOTIFY", body="SIP/2.0 200 OK\r\n", ctype="message/sipfrag;version=2.0",
         extra="Event: refer;id=7\r\nSubscription-State: terminated;reason=noresource\r\n"),
    _sip("REFER", extra="Refer-To: <sip:carol@example.com?Replaces=abc%40x%3Bto-tag%3D1%3Bfrom-tag%3D2>\r\n"),
    _sip("INFO", body="Signal=5\r\nDuration=160\r\n", ctype="application/dtmf-relay"),
    (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;received=192.0.2.1;rport=5060\r\n"
     b"From: <sip:agent@192.0.2.1>;tag=a\r\nTo: <sip:bob@example.com>;tag=b\r\nCall-ID: out-1\r\n"
     b"CSeq: 1 INVITE\r\nContact: <sip:bob@192.0.2.30>\r\nRecord-Route: <sip:p1.example.com;lr>, <sip:p2;lr>\r\n"
     b"Content-Type: application/sdp\r\nContent-Length: " + str(len(SDP_PLAIN)).encode() + b"\r\n\r\n"
     + SDP_PLAIN.encode()),
    (b"SIP/2.0 401 Unauthorized\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKreg\r\n"
     b"From: <sip:agent@example.com>;tag=a\r\nTo: <sip:agent@example.com>;tag=b\r\nCall-ID: reg-1\r\n"
     b"CSeq: 2 REGISTER\r\nWWW-Authenticate: Digest realm=\"example.com\", nonce=\"n0nce\", qop=\"auth,auth-int\", "
     b"algorithm=SHA-256, opaque=\"o\", stale=FALSE\r\nMin-Expires: 60\r\nRetry-After: 120\r\nContent-Length: 0\r\n\r\n"),
    (b"INVITE sip:b@192.0.2.1 SIP/2.0\r\nv: SIP/2.0/UDP 192.0.2.10\r\nf: <sip:a@x>;tag=1\r\nt: sip:b@y\r\n"
     b"i: compact\r\nCSeq: 1 INVITE\r\nm: <sip:a@192.0.2.10>\r\nl: 0\r\n\r\n"),
    b"X\nv:a/b/c h\n\n",
)


def _torture() -> tuple[bytes, ...]:
    out = []
    for path in sorted((ROOT / "tests" / "unit" / "sip_torture").glob("*.txt")):
        if path.name == "README.txt":
            continue
        text = path.read_text("utf-8")
        data = b""
        for i, part in enumerate(re.split(r"<hex>|</hex>", text)):
            data += bytes.fromhex(part) if i % 2 else part.replace("\n", "\r\n").encode("utf-8")
        out.append(data[:8192])
    return tuple(out)


SIP_TEMPLATES: tuple[str, ...] = (
    "OPTIONS sip:a@192.0.2.1:{n} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:{n};branch=z9hG4bK{n};rport={n}\r\n"
    "From: <sip:b@x>;tag={n}\r\nTo: <sip:a@y>\r\nCall-ID: {n}\r\nCSeq: {n} OPTIONS\r\nMax-Forwards: {n}\r\n"
    "Content-Length: {n}\r\n\r\n",
    "INVITE sip:a@h.example SIP/{n}.{n}\r\nVia: SIP/2.0/UDP host.example:{n};branch=z9hG4bKx\r\n"
    "From: <sip:b@x>;tag=1\r\nTo: <sip:a@y>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nMax-Forwards: {n}\r\n"
    "Expires: {n}\r\nSession-Expires: {n};refresher=uac\r\nMin-SE: {n}\r\nRSeq: {n}\r\nRAck: {n} {n} INVITE\r\n"
    "Content-Length: {n}\r\n\r\n",
    "SIP/2.0 {n} Reason\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;rport={n};received=192.0.2.{n}\r\n"
    "From: <sip:a@x>;tag=a\r\nTo: <sip:b@y>;tag=b\r\nCall-ID: out-1\r\nCSeq: {n} INVITE\r\n"
    "Contact: <sip:b@192.0.2.30:{n}>;expires={n}\r\nRetry-After: {n}\r\nMin-Expires: {n}\r\nContent-Length: {n}\r\n\r\n",
    "X\nv:SIP/2.0/UDP h{n}:{n}\n\n",
)

SDP_TEMPLATES: tuple[str, ...] = (
    "v={n}\r\no=- {n} {n} IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1/{n}/{n}\r\nb=AS:{n}\r\nt={n} {n}\r\n"
    "m=audio {n}/{n} RTP/AVP {n} {n}\r\na=rtpmap:{n} PCMU/{n}/{n}\r\na=fmtp:{n} 0-{n}\r\na=ptime:{n}\r\n"
    "a=maxptime:{n}\r\na=rtcp:{n} IN IP4 192.0.2.{n}\r\n",
    "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio {n} RTP/SAVP 0\r\n"
    f"a=rtpmap:0 PCMU/8000\r\na=crypto:{{n}} AES_CM_128_HMAC_SHA1_80 inline:{_KEY}|{{n}}|{{n}}:{{n}}\r\n",
    "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio 4000 RTP/SAVP 0\r\n"
    f"a=rtpmap:0 PCMU/8000\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{_KEY}|2^{{n}}\r\na=ptime:{{n}}.{{n}}\r\n",
)

CRYPTO_SEEDS: tuple[bytes, ...] = tuple(s.encode() for s in (
    _CRYPTO, "a=crypto:" + _CRYPTO,
    "7 AES_CM_128_HMAC_SHA1_32 inline:QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNk KDR=0 UNENCRYPTED_SRTP",
    f"1 AES_CM_128_HMAC_SHA1_80 inline:{_KEY}|1048576",
))
CRYPTO_TEMPLATES: tuple[str, ...] = (
    f"{{n}} AES_CM_128_HMAC_SHA1_80 inline:{_KEY}|2^{{n}}|{{n}}:{{n}}",
    f"1 AES_CM_128_HMAC_SHA1_80 inline:{_KEY}|{{n}}",
    f"1 AES_CM_128_HMAC_SHA1_80 inline:{_KEY}|{{n}}:{{n}}",
    f"1 AES_CM_128_HMAC_SHA1_32 inline:{_KEY}|2^{{n}} KDR={{n}} WSH={{n}}",
)

URI_SEEDS: tuple[bytes, ...] = tuple(s.encode() for s in (
    "sip:alice@example.com", "sips:bob:secret@[2001:db8::1]:5061;transport=tls;lr?Subject=hi&Priority=urgent",
    "sip:+15551234567;phone-context=example.com@gw.example.com;user=phone", "tel:+1-555-123-4567",
    "sip:%61lice@192.0.2.1:5060;maddr=239.255.255.1;ttl=15", "urn:service:sos", "sip:user;par=u%40example.net@example.com",
))
URI_TEMPLATES: tuple[str, ...] = ("sip:a@192.0.2.{n}:{n};ttl={n}", "sip:[2001:db8::{n}]:{n}", "sips:h{n}.example:{n}")

HEADER_SEEDS: tuple[bytes, ...] = tuple(s.encode() for s in (
    "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx;rport=5060;received=192.0.2.2, SIP/2.0/TCP [::1];branch=z9hG4bKy",
    '"Alice \\"A\\"" <sip:alice@example.com>;tag=abc;expires=60, <sip:b@x>;q=0.5',
    "314159 INVITE",
    'Digest realm="example.com", nonce="abc", qop="auth,auth-int", algorithm=MD5-sess, opaque="x", stale=true',
    "*",
))
HEADER_TEMPLATES: tuple[str, ...] = (
    "SIP/2.0/UDP 192.0.2.1:{n};branch=z9hG4bK{n};rport={n};ttl={n}", "{n} INVITE",
    "<sip:a@b:{n}>;expires={n};q={n}",
)

COMMAND_SEEDS: tuple[bytes, ...] = tuple(s.encode() for s in (
    '{"command":"invite","option":{"callee":"sip:bob@example.com","caller":"sip:a@b","codec":"pcmu",'
    '"sampleRate":16000,"enableIpv6":false,"recorder":{"recorderFile":"x.wav","samplerate":16000,"ptime":200},'
    '"asr":{"provider":"whisper","language":"en"},"tts":{"provider":"piper","speed":1.0},'
    '"vad":{"type":"silero","voiceThreshold":0.5},"extra":{"k":"v"}}}',
    '{"command":"accept","option":{"codec":"pcma"}}', '{"command":"reject","reason":"busy","code":486}',
    '{"command":"ringing","recorder":false,"earlyMedia":true}',
    '{"command":"tts","text":"Hello","speaker":"a","playId":"p1","autoHangup":false,"streaming":true,"endOfStream":false,"option":{"speed":1.5}}',
    '{"command":"play","url":"http://example.com/a.wav","autoHangup":true,"waitInputTimeout":5000}',
    '{"command":"interrupt","graceful":true}', '{"command":"pause"}', '{"command":"resume"}',
    '{"command":"hangup","reason":"done","initiator":"user"}',
    '{"command":"refer","callee":"sip:carol@example.com","options":{"bypass":true,"timeout":30,"moh":"m.wav","autoHangup":true}}',
    '{"command":"mute","trackId":"t1"}', '{"command":"history","speaker":"user","text":"hi"}',
    '{"command":"custom","data":{"a":[1,2.5,null,true,{"b":"c"}]}}',
    '{"command":"addIceCandidate","candidate":"candidate:1 1 udp 1 192.0.2.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0}',
))
COMMAND_TEMPLATES: tuple[str, ...] = (
    '{"command":"reject","reason":"r","code":{n}}', '{"command":"invite","option":{"sampleRate":{n},"offer":"x"}}',
    '{"command":"play","url":"u","waitInputTimeout":{n}}', '{"command":"tts","text":"x","option":{"speed":{n}}}',
    '{"command":"addIceCandidate","candidate":"c","sdpMLineIndex":{n}}',
    '{"command":"refer","callee":"sip:x@y","options":{"timeout":{n}}}',
)

PLAYBOOK_SEEDS: tuple[bytes, ...] = (
    b"---\nllm:\n  provider: openai\n  model: gpt-4o-mini\n  temperature: 0.7\ngreeting: Hi\n"
    b"asr:\n  provider: whisper\ntts:\n  provider: piper\n  speed: 1.0\nfollowUp:\n  timeout: 10000\n  maxCount: 2\n"
    b"dtmf:\n  \"1\": {action: goto, scene: sales}\n  \"0\": {action: transfer, target: \"sip:op@example.com\"}\n"
    b"---\n# Scene: main\nYou are helpful.\n# Scene: sales\nSell things.\n",
    b"---\nllm: {provider: openai, apiKey: ${OPENAI_API_KEY}}\nvad: {type: silero}\n---\nBe brief.",
    b"---\nllm:\n  provider: openai\nrecorder:\n  recorderFile: r.wav\n  samplerate: 8000\n---\n",
)
PLAYBOOK_TEMPLATES: tuple[str, ...] = (
    "---\nllm:\n  provider: openai\n  temperature: {n}\n  maxTokens: {n}\nfollowUp:\n  timeout: {n}\n  maxCount: {n}\n---\nx",
    "---\nllm: {provider: openai}\nsampleRate: {n}\nrecorder: {samplerate: {n}, ptime: {n}}\n---\n",
)

CONFIG_SEEDS: tuple[bytes, ...] = (
    b'http_addr = "127.0.0.1:8080"\naddr = "0.0.0.0"\nudp_port = 25060\naccept_timeout = "60s"\n'
    b'enable_srtp = false\nrtp_start_port = 12000\nrtp_end_port = 42000\ncodecs = ["pcmu", "pcma", "opus"]\n'
    b'log_level = "info"\ngraceful_shutdown_timeout = 30\n[api]\ntokens = ["t"]\nmax_sessions = 2000\n'
    b'max_message_bytes = 1048576\npong_timeout = "30s"\n[handler]\ntype = "playbook"\ndefault = "default.md"\n',
    b'udp_port = 5060\ntls_port = 5061\ntls_cert_file = "c.pem"\ntls_key_file = "k.pem"\n'
    b'[[registrations]]\nserver = "sip:pbx.example.com"\nusername = "u"\npassword = "p"\nexpires = 3600\n',
)
CONFIG_TEMPLATES: tuple[str, ...] = (
    "udp_port = {n}\nrtp_start_port = {n}\nrtp_end_port = {n}\ngraceful_shutdown_timeout = {n}\n",
    'accept_timeout = "{n}s"\n[api]\nmax_sessions = {n}\nmax_message_bytes = {n}\npong_timeout = "{n}m"\n',
    'http_addr = "127.0.0.1:{n}"\nexternal_ip = "192.0.2.{n}"\n[[registrations]]\nserver = "sip:pbx:{n}"\nexpires = {n}\n',
)


def _config_file_seed() -> tuple[bytes, ...]:
    path = ROOT / "etc" / "activecall.toml"
    try:
        return (path.read_bytes(),)
    except OSError:
        return ()


# ---------------------------------------------------------------------------- target bodies


def _text(data: bytes) -> str:
    """What the SIP parser hands to its sub-parsers: UTF-8 with surrogate escapes."""
    return data.decode("utf-8", "surrogateescape")


def _sip_message(data: bytes) -> None:
    from activecall.sip.message import SipParseError, SipRequest, error_response, make_response, parse_message

    try:
        msg = parse_message(data)
    except SipParseError as err:
        response = error_response(err, to_tag="t")
        if response is not None:
            response.serialize()
        raise
    for via in msg.vias:
        via.rport, via.received, via.sent_by, str(via)  # noqa: B018
    msg.content_length, msg.content_type, msg.cseq, msg.from_.tag, msg.to.tag  # noqa: B018
    msg.contacts, msg.routes, msg.record_routes  # noqa: B018
    if isinstance(msg, SipRequest):
        msg.max_forwards  # noqa: B018
        make_response(msg, 200, to_tag="t").serialize()
        str(msg.uri)
    again = parse_message(msg.serialize())
    again.call_id  # noqa: B018


def _sip_headers(data: bytes) -> None:
    from activecall.sip.auth import parse_challenge
    from activecall.sip.message import (
        SipParseError,
        parse_auth_header,
        parse_contacts,
        parse_cseq,
        parse_name_addr,
        parse_via,
        split_commas,
    )

    text = _text(data)
    failures = 0
    for parse in (parse_via, parse_name_addr, parse_cseq, parse_auth_header, parse_challenge,
                  lambda t: parse_contacts([t]), split_commas):
        try:
            result = parse(text)
            for item in result if isinstance(result, list) else [result]:
                str(item)
                if hasattr(item, "rport"):
                    item.rport  # noqa: B018
        except SipParseError:
            failures += 1
    if failures == 7:
        raise SipParseError("no header parser accepted the input")


def _sip_uri(data: bytes) -> None:
    from activecall.sip.uri import parse_uri, uri_equal

    uri = parse_uri(_text(data))
    text = str(uri)
    if uri.is_sip:
        uri.host_port(), uri.transport, uri.user_unescaped  # noqa: B018
        assert uri_equal(uri, parse_uri(text)), text


def _sip_stream(data: bytes) -> None:
    from activecall.sip.framing import StreamFramer
    from activecall.sip.message import SipParseError, parse_message

    framer = StreamFramer()
    frames = []
    step = 1 + len(data) % 97
    for i in range(0, len(data), step):
        frames.extend(framer.feed(data[i:i + step]))
    bad = None
    for frame in frames:
        if isinstance(frame, bytes):
            try:
                parse_message(frame)
            except SipParseError as err:
                bad = err
    if bad is not None:
        raise bad


class _NegotiatingHandler:
    """Answers each INVITE like the call layer: offer/answer on its body, 488 when that fails."""

    def incoming_call(self, call: Any) -> None:
        from activecall.sdp.negotiation import answer_offer
        from activecall.rtp.srtp import generate_crypto

        try:
            answer, _ = answer_offer(call.remote_sdp or b"", ["pcmu", "opus", "telephone_event"], "192.0.2.1",
                                     30000, session_id=1, srtp=True,
                                     make_crypto=lambda t, s: generate_crypto(t, s, random.Random(7)))
        except ValueError:
            call.reject(488)
            return
        call.answer(answer).addErrback(lambda f: None)


class _LogWatch:
    """Collects error/critical log events (tracebacks) from the global publisher."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._installed = False

    def install(self) -> None:
        if self._installed:
            return
        from twisted.logger import LogLevel, globalLogPublisher

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") in (LogLevel.error, LogLevel.critical):
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self._installed = True

    def check(self) -> None:
        if self.events:
            from twisted.logger import formatEvent

            event = self.events[0]
            self.events.clear()
            failure = event.get("log_failure")
            detail = f": {failure.type.__name__}: {failure.value}" if failure is not None else ""
            raise LoggedError(formatEvent(event) + detail)


_WATCH = _LogWatch()


class _UdpStack:
    """A SIP stack on a Clock and a Twisted-like memory UDP port, rebuilt every ``every`` inputs."""

    def __init__(self, with_ua: bool, every: int = 300) -> None:
        self._with_ua = with_ua
        self._every = every
        self._count = 0
        self._proto: Any = None
        self._clock: Any = None

    def reset(self) -> None:
        from twisted.internet.task import Clock

        from activecall.ids import IdSource
        from activecall.sip.transport import SipDatagramProtocol, SipStack

        _WATCH.install()
        self._clock = Clock()
        ids = IdSource(random.Random(7))
        stack = SipStack(self._clock, ids, shards=4)
        if self._with_ua:
            from activecall.sip.useragent import SipUserAgent

            SipUserAgent(stack, ids=ids, handler=_NegotiatingHandler())
        else:
            stack.set_user(_NullUser())
        proto = SipDatagramProtocol(stack)
        proto.makeConnection(_TwistedLikeUdp())  # type: ignore[arg-type]
        stack.add_listener("udp", "192.0.2.1", 5060, proto)
        self._proto = proto
        self._count = 0

    def __call__(self, data: bytes) -> None:
        if self._proto is None or self._count >= self._every:
            self.reset()
        self._count += 1
        _WATCH.events.clear()
        self._proto.datagramReceived(data, ("203.0.113.7", 40001))
        if self._count % 16 == 0:
            self._clock.advance(1.0)
        _WATCH.check()


class _NullUser:
    """A transaction user that accepts every request and answers nothing."""

    def wants_request(self, request: Any) -> bool:
        return True

    def request_received(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flow_in_use(self, flow: Any) -> bool:
        return False

    def response_received(self, *args: Any) -> None:
        pass

    def client_failed(self, *args: Any) -> None:
        pass

    def client_terminated(self, *args: Any) -> None:
        pass

    def server_terminated(self, *args: Any) -> None:
        pass

    def ack_timeout(self, *args: Any) -> None:
        pass


class _TwistedLikeUdp:
    """Checks addresses like ``twisted.internet.udp.Port.write`` on an IPv4 port, then drops the datagram."""

    def write(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        from twisted.internet import abstract
        from twisted.internet.error import InvalidAddressError

        assert addr is not None
        if not abstract.isIPAddress(addr[0]):
            raise InvalidAddressError(addr[0], "write() only accepts IP addresses")
        if not 0 <= addr[1] <= 65535:
            raise OverflowError("getsockaddrarg: port must be 0-65535.")

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("UDP", "192.0.2.1", 5060)

    def stopListening(self) -> None:
        pass


def _sdp(data: bytes) -> None:
    from activecall.sdp.negotiation import answer_offer, apply_answer, build_offer
    from activecall.rtp.srtp import generate_crypto
    from activecall.sdp.model import parse_sdp

    sd = parse_sdp(data)
    for m in sd.media:
        m.payload_types, m.rtpmaps(), m.fmtps(), m.ptime_ms, m.crypto(), m.rtcp_port  # noqa: B018
        m.fingerprint, m.candidates, m.is_secure, sd.direction(m), sd.connection_for(m)  # noqa: B018
        for c in m.crypto():
            c.inline_key  # noqa: B018
    parse_sdp(sd.serialize())
    rng = random.Random(7)
    crypto = (generate_crypto(1, "AES_CM_128_HMAC_SHA1_80", rng),) if b"SAVP" in data else ()
    offer = build_offer(["pcmu", "opus", "telephone_event"], "192.0.2.1", 30000, session_id=1, crypto=crypto)
    _all_of(
        # The SDP as an offer in an INVITE (we answer), and as the answer to our offer.
        lambda: answer_offer(sd, ["opus", "g722", "pcmu", "pcma", "telephone_event"], "192.0.2.1", 30000,
                             session_id=1, srtp=True, make_crypto=lambda t, s: generate_crypto(t, s, rng)),
        lambda: apply_answer(offer, sd),
    )


def _all_of(*calls: Callable[[], object]) -> None:
    """Run every call; re-raise the first documented error once all have run (others escape at once)."""
    from activecall.sdp.negotiation import NegotiationError
    from activecall.sdp.model import SdpParseError

    first: Exception | None = None
    for call in calls:
        try:
            call()
        except (SdpParseError, NegotiationError) as e:
            first = first or e
    if first is not None:
        raise first


def _crypto(data: bytes) -> None:
    from activecall.rtp.srtp import SrtpContext, generate_crypto, parse_crypto

    attr = parse_crypto(_text(data))
    assert attr.lifetime is None or attr.lifetime <= 1 << 48
    assert parse_crypto(attr.encode()) == attr
    SrtpContext.from_sdes(generate_crypto(attr.tag, attr.suite, random.Random(7)), attr)


_SRTP: dict[str, Any] = {}


def _srtp_contexts() -> tuple[Any, Any]:
    if not _SRTP:
        from activecall.rtp.srtp import AES_CM_128_HMAC_SHA1_80, SrtpContext

        a = bytes(range(30))
        b = bytes(range(30, 60))
        _SRTP["tx"] = SrtpContext(AES_CM_128_HMAC_SHA1_80, a, b)
        _SRTP["rx"] = SrtpContext(AES_CM_128_HMAC_SHA1_80, b, a, replay_window=1024)
    return _SRTP["tx"], _SRTP["rx"]


def _srtp_unprotect(data: bytes) -> None:
    from activecall.rtp.srtp import SrtpError

    tx, rx = _srtp_contexts()
    errors = 0
    # The datagram as received, and (so that authentication passes and the
    # decrypt path runs) the same bytes protected by the peer first.
    for fn in (rx.unprotect, rx.unprotect_rtcp, lambda d: rx.unprotect(tx.protect(d)),
               lambda d: rx.unprotect_rtcp(tx.protect_rtcp(d))):
        try:
            fn(data)
        except SrtpError:
            errors += 1
    if errors:
        raise SrtpError("unprotect failed", "other")


def _srtp_seeds() -> tuple[bytes, ...]:
    from activecall.rtp.packet import ReceiverReport, build_rtcp, build_rtp

    tx, _ = _srtp_contexts()
    plain = [build_rtp(0, 100 + i, 160 * i, 0xABCDEF, bytes(160)) for i in range(4)]
    rtp = [tx.protect(p) for p in plain]
    rtcp = build_rtcp([ReceiverReport(0xABCDEF)])
    return tuple(rtp + plain + [tx.protect_rtcp(rtcp), rtcp])


def _rtp(data: bytes) -> None:
    from activecall.rtp.packet import RtpHeaderView, parse_rtp

    view = parse_rtp(data, into=RtpHeaderView())
    bytes(view.payload), bytes(view.extension_data), repr(view)  # noqa: B018
    _SESSION[0].receive_rtp(view, 0.0)


_SESSION: list[Any] = []


def _rtcp(data: bytes) -> None:
    from activecall.rtp.packet import parse_rtcp

    packets = parse_rtcp(data)
    _SESSION[0].receive_rtcp(packets, 1.0)


def _rtp_seeds() -> tuple[bytes, ...]:
    from activecall.rtp.packet import build_rtp
    from activecall.rtp.session import RtpSession

    if not _SESSION:
        _SESSION.append(RtpSession(random.Random(7), 0.0, clock_rate_hz=8000, payload_type=0, cname=b"fuzz"))
    return (
        build_rtp(0, 1, 160, 0x1234, b"\xff" * 160),
        build_rtp(101, 65535, 2**32 - 1, 1, b"\x05\x8a\x03\x20", marker=True, csrcs=(1, 2, 3)),
        build_rtp(111, 7, 960, 9, b"\x00" * 40, extension=(0xBEDE, b"\x10\xff\x00\x00"), padding=4),
    )


def _rtcp_seeds() -> tuple[bytes, ...]:
    from activecall.rtp.packet import (
        Bye, ReceiverReport, ReportBlock, SdesChunk, SenderReport, SourceDescription, UnknownRtcp, build_rtcp,
    )

    _rtp_seeds()
    block = ReportBlock(0x1234, 12, -5, 70000, 33, 0xABCD, 655)
    return (
        build_rtcp([SenderReport(9, 2**63, 160, 10, 1600, (block,)), SourceDescription((SdesChunk(9, ((1, b"fuzz@x"),)),))]),
        build_rtcp([ReceiverReport(9, (block, block)), Bye((9, 10), b"bye now")]),
        build_rtcp([UnknownRtcp(205, 1, b"\x00" * 8)]),
    )


_DTMF: list[Any] = []


def _telephone_event(data: bytes) -> None:
    from activecall.rtp.dtmf import DtmfReceiver
    from activecall.rtp.packet import parse_telephone_event

    if not _DTMF:
        _DTMF.append(DtmfReceiver())
    event = parse_telephone_event(data)
    _DTMF[0].feed(0x1234, int.from_bytes(data[:4].ljust(4, b"\0"), "big"), event, float(len(data)))
    event.encode()


_INBAND: list[Any] = []


def _inband_dtmf(data: bytes) -> None:
    from activecall.media.dtmf_detect import InbandDtmfDetector

    if not _INBAND:
        _INBAND.append(InbandDtmfDetector(8000))
    _INBAND[0].feed(data)


def _inband_seeds() -> tuple[bytes, ...]:
    import math
    import struct

    tone = [int(8000 * (math.sin(2 * math.pi * 697 * i / 8000) + math.sin(2 * math.pi * 1209 * i / 8000)))
            for i in range(480)]
    return (struct.pack("<480h", *tone), bytes(320), b"\x01")


def _command(data: bytes) -> None:
    from activecall.control.commands import decode_command, encode_command

    encode_command(decode_command(data))


def _query(data: bytes) -> None:
    from urllib.parse import parse_qs

    from activecall.control.query import parse_session_query

    # Autobahn hands onConnect the URL query as parse_qs() gives it.
    params = parse_qs(data.decode("utf-8", "replace"), keep_blank_values=True)
    parse_session_query(params, "websocket", lambda: "sid")


def _ice_candidate(data: bytes) -> None:
    from activecall.legs.webrtc import parse_ice_candidate

    parse_ice_candidate(_text(data), "0", 0)


ICE_SEEDS: tuple[bytes, ...] = (
    b"candidate:842163049 1 udp 1677729535 192.0.2.7 46154 typ srflx raddr 10.0.0.2 rport 46154 generation 0",
    b"a=candidate:1 1 UDP 2122260223 127.0.0.1 50000 typ host",
    b"candidate:2 1 tcp 1518280447 2001:db8::1 9 typ host tcptype active",
    b"candidate:3 1 udp 2122194687 4f3c2b1a-0000-4000-8000-000000000000.local 51000 typ host",
)
ICE_TEMPLATES: tuple[str, ...] = (
    "candidate:{n} {n} udp {n} 127.0.0.1 {n} typ host",
    "candidate:1 1 udp 1 10.0.0.1 9 typ relay raddr 10.0.0.{n} rport {n} generation {n}",
)


QUERY_SEEDS: tuple[bytes, ...] = (b"id=abc&dump=false&ping=20&serverSideTrack=t1", b"forward=true&id=x%20y", b"")
QUERY_TEMPLATES: tuple[str, ...] = ("ping={n}", "id=s{n}&ping={n}&dump=true")


def _playbook(data: bytes) -> None:
    from activecall.playbook.model import parse_playbook

    parse_playbook(data.decode("utf-8", "replace"), {"OPENAI_API_KEY": "k"}, "fuzz.md")


def _config(data: bytes) -> None:
    from activecall.config import parse_config

    parse_config(data.decode("utf-8", "replace"), source="fuzz.toml")


# ---------------------------------------------------------------------------- the table


def _build() -> tuple[Target, ...]:
    from activecall.config import ConfigError
    from activecall.options import CommandError
    from activecall.control.query import QueryError
    from activecall.sdp.negotiation import NegotiationError
    from activecall.playbook.model import PlaybookError
    from activecall.rtp.packet import RtpParseError
    from activecall.rtp.srtp import SrtpError
    from activecall.sip.framing import FramingError
    from activecall.sip.message import SipParseError
    from activecall.sdp.model import SdpParseError

    sip_seeds = SIP_SEEDS + _torture()
    sdp_seeds = tuple(s.encode() for s in (SDP_OFFER, SDP_PLAIN, SDP_ICE))
    udp = _UdpStack(with_ua=False)
    ua = _UdpStack(with_ua=True)
    return (
        Target("sip_message", _sip_message, (SipParseError,), sip_seeds, SIP_TEMPLATES),
        Target("sip_stream", _sip_stream, (FramingError, SipParseError), sip_seeds, SIP_TEMPLATES),
        Target("sip_udp_stack", udp, (), sip_seeds, SIP_TEMPLATES, reset=udp.reset),
        Target("sip_useragent", ua, (), sip_seeds, SIP_TEMPLATES, owner="activecall/sip/useragent.py", reset=ua.reset),
        Target("sip_uri", _sip_uri, (SipParseError,), URI_SEEDS, URI_TEMPLATES),
        Target("sip_headers", _sip_headers, (SipParseError,), HEADER_SEEDS, HEADER_TEMPLATES),
        Target("sdp", _sdp, (SdpParseError, NegotiationError), sdp_seeds, SDP_TEMPLATES),
        Target("rtp", _rtp, (RtpParseError,), _rtp_seeds()),
        Target("rtcp", _rtcp, (RtpParseError,), _rtcp_seeds()),
        Target("srtp_unprotect", _srtp_unprotect, (SrtpError,), _srtp_seeds()),
        Target("srtp_crypto", _crypto, (SrtpError,), CRYPTO_SEEDS, CRYPTO_TEMPLATES),
        Target("telephone_event", _telephone_event, (RtpParseError,),
               (b"\x05\x8a\x03\x20", b"\x0b\x0a\x00\xa0\x0b\x0a\x00\xa0", b"\x10\x80\xff\xff")),
        Target("inband_dtmf", _inband_dtmf, (), _inband_seeds()),
        Target("control_command", _command, (CommandError,), COMMAND_SEEDS, COMMAND_TEMPLATES,
               owner="activecall/control/commands.py"),
        Target("ice_candidate", _ice_candidate, (ValueError,), ICE_SEEDS, ICE_TEMPLATES,
               owner="activecall/legs/webrtc.py"),
        Target("control_query", _query, (QueryError,), QUERY_SEEDS, QUERY_TEMPLATES,
               owner="activecall/control/query.py"),
        Target("playbook", _playbook, (PlaybookError,), PLAYBOOK_SEEDS, PLAYBOOK_TEMPLATES,
               owner="activecall/playbook/model.py"),
        Target("config", _config, (ConfigError,), CONFIG_SEEDS + _config_file_seed(), CONFIG_TEMPLATES,
               owner="activecall/config.py"),
    )


TARGETS: tuple[Target, ...] = _build()
TARGETS_BY_NAME: dict[str, Target] = {t.name: t for t in TARGETS}


def target(name: str) -> Target:
    """The target called ``name``."""
    return TARGETS_BY_NAME[name]

