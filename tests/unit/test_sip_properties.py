"""Property tests: round trips for generated valid input, and garbage never escapes as anything but SipParseError."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from activecall.ids import IdSource
from activecall.sip.framing import FramingError, StreamFramer
from activecall.sip.message import (
    Headers,
    SipParseError,
    SipRequest,
    SipResponse,
    parse_message,
    parse_name_addr,
    parse_via,
)
from activecall.sdp.model import SdpParseError, parse_sdp
from activecall.sip.transaction import TransactionLayer
from activecall.sip.uri import SipUri, parse_uri

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
tokens = st.text(ALNUM + "-.!%*_+`'~", min_size=1, max_size=12)
labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
hosts = st.one_of(
    st.lists(labels, min_size=1, max_size=3).map(".".join),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
    st.just("[2001:db8::1]"),
)
users = st.text(ALNUM + "-_.!~*'()&=+$,;?/", min_size=1, max_size=12) | st.builds(
    lambda a, b: f"{a}%{b:02X}", st.text(ALNUM, min_size=1, max_size=4), st.integers(0, 255))
pchars = st.text(ALNUM + "-_.!~*'()[]/:&+$", min_size=1, max_size=8)
uri_params = st.lists(st.tuples(pchars, st.none() | pchars), max_size=3)
sip_uris = st.builds(
    lambda scheme, user, host, port, params: SipUri(scheme, user, None, host, port, params),
    st.sampled_from(["sip", "sips"]), st.none() | users, hosts, st.none() | st.integers(1, 65535), uri_params,
)
display_names = st.none() | st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FF, blacklist_characters="\x7f"), max_size=12)
header_values = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20
).map(lambda s: s.strip()).filter(bool)
methods = st.sampled_from(["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "REFER", "INFO", "X-CUSTOM"])


@st.composite
def requests(draw: st.DrawFn) -> SipRequest:
    """A valid request with random URIs, display names, extra headers and body."""
    method = draw(methods)
    uri = draw(sip_uris)
    from_display = draw(display_names)
    headers = Headers()
    headers.add(draw(st.sampled_from(["Via", "v", "VIA"])),
                f"SIP/2.0/{draw(st.sampled_from(['UDP', 'TCP', 'TLS']))} {draw(hosts)};branch=z9hG4bK{draw(tokens)}")
    headers.add("Max-Forwards", str(draw(st.integers(0, 255))))
    frm = parse_name_addr(f"<{draw(sip_uris)}>").with_tag(draw(tokens))
    frm.display_name = from_display
    headers.add(draw(st.sampled_from(["From", "f"])), str(frm))
    headers.add(draw(st.sampled_from(["To", "t"])), f"<{draw(sip_uris)}>")
    headers.add(draw(st.sampled_from(["Call-ID", "i"])), draw(tokens) + "@" + draw(labels))
    headers.add("CSeq", f"{draw(st.integers(0, 2**31 - 1))} {method}")
    for name in draw(st.lists(st.sampled_from(["X-A", "Subject", "User-Agent", "Allow"]), max_size=3)):
        headers.add(name, draw(header_values))
    body = draw(st.binary(max_size=64))
    return SipRequest(method, uri, headers, body)


def _significant(msg: SipRequest | SipResponse) -> list[tuple[str, str]]:
    return [(n, v) for n, v in msg.headers if n.lower() not in ("content-length", "l")]


class RoundTripProperties(SynchronousTestCase):
    """Generated valid input survives serialize/parse."""

    @SETTINGS
    @given(requests())
    def test_request_round_trip(self, req: SipRequest) -> None:
        """parse(serialize(r)) keeps method, URI, headers (names, order, values) and body."""
        wire = req.serialize()
        msg = parse_message(wire)
        assert isinstance(msg, SipRequest)
        self.assertEqual((msg.method, str(msg.uri), msg.body), (req.method, str(req.uri), req.body))
        self.assertEqual(_significant(msg), _significant(req))
        self.assertEqual(msg.from_.display_name, req.from_.display_name)
        self.assertEqual(msg.serialize(), wire)

    @SETTINGS
    @given(sip_uris)
    def test_uri_round_trip(self, uri: SipUri) -> None:
        """str(parse_uri(str(u))) is str(u), and the fields come back."""
        parsed = parse_uri(str(uri))
        self.assertEqual(str(parsed), str(uri))
        self.assertEqual((parsed.user, parsed.host, parsed.port, parsed.params),
                         (uri.user, uri.host, uri.port, uri.params))

    @SETTINGS
    @given(requests(), st.lists(st.integers(1, 50), max_size=30))
    def test_framing_any_split(self, req: SipRequest, cuts: list[int]) -> None:
        """Two messages fed in arbitrary chunks come out as exactly those two messages."""
        wire = req.serialize() * 2
        framer = StreamFramer()
        frames: list[object] = []
        pos = 0
        for cut in cuts:
            frames += framer.feed(wire[pos : pos + cut])
            pos += cut
        frames += framer.feed(wire[pos:])
        self.assertEqual(frames, [req.serialize()] * 2)


def _mutate(data: bytes, rnd: random.Random) -> bytes:
    """Flip, insert or delete a few bytes."""
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(3)
        pos = rnd.randrange(len(buf) + 1)
        if op == 0 and pos < len(buf):
            buf[pos] = rnd.randrange(256)
        elif op == 1:
            buf[pos:pos] = bytes([rnd.choice(b" \t\r\n:;,<>\"\\%@=/0")])
        elif pos < len(buf):
            del buf[pos]
    return bytes(buf)


class RobustnessProperties(SynchronousTestCase):
    """Garbage raises SipParseError or parses; nothing else escapes."""

    @SETTINGS
    @given(st.binary(max_size=300))
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes never raise anything but SipParseError."""
        try:
            parse_message(data)
        except SipParseError:
            pass

    @SETTINGS
    @given(requests(), st.integers(0, 2**32))
    def test_mutated_messages(self, req: SipRequest, seed: int) -> None:
        """Valid messages with a few bytes changed either parse (and re-serialize) or raise SipParseError."""
        data = _mutate(req.serialize(), random.Random(seed))
        try:
            msg = parse_message(data)
        except SipParseError:
            return
        parse_message(msg.serialize())

    @SETTINGS
    @given(st.text(max_size=80))
    def test_header_parsers(self, text: str) -> None:
        """URI, Via and address parsers only ever raise SipParseError."""
        for parser in (parse_uri, parse_via, parse_name_addr):
            try:
                parser(text)
            except SipParseError:
                pass

    @SETTINGS
    @given(st.text(max_size=200))
    def test_sdp_garbage(self, text: str) -> None:
        """parse_sdp only ever raises SdpParseError."""
        try:
            parse_sdp("v=0\r\no=- 1 1 IN IP4 h\r\n" + text)
        except SdpParseError:
            pass

    @SETTINGS
    @given(st.lists(st.binary(max_size=60), max_size=8))
    def test_framer_garbage(self, chunks: list[bytes]) -> None:
        """The framer returns frames or raises FramingError on any input."""
        framer = StreamFramer()
        try:
            for chunk in chunks:
                framer.feed(chunk)
        except FramingError:
            pass

    @SETTINGS
    @given(st.lists(st.tuples(requests(), st.integers(0, 2**32)), max_size=4))
    def test_transaction_layer_survives(self, items: list[tuple[SipRequest, int]]) -> None:
        """The transaction layer turns any datagram into actions without raising, and timers drain."""
        layer = TransactionLayer(IdSource(random.Random(3)))
        now = 0.0
        for req, seed in items:
            now += 0.1
            layer.receive_datagram(_mutate(req.serialize(), random.Random(seed)), ("192.0.2.1", 5060), now)
            layer.receive_datagram(req.serialize(), ("192.0.2.1", 5060), now)
        while (deadline := layer.deadline()) is not None:
            layer.expire(deadline)
            self.assertLess(deadline, 1000.0)
