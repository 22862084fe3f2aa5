"""RFC 4475 torture messages: each one handled the way the RFC says.

Fixtures live in ``tests/unit/sip_torture/*.txt`` (see the README there for
the notation).  Valid messages must parse (and survive a serialize/parse round
trip); invalid requests must raise :class:`SipParseError` whose
:func:`error_response` is the status the RFC asks for; invalid responses must
raise and get no answer (they are dropped).
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from activecall.sip.message import (
    SipParseError,
    SipRequest,
    SipResponse,
    error_response,
    parse_message,
    split_commas,
)
from activecall.sip.uri import parse_uri, unescape, uri_equal

FIXTURES = Path(__file__).parent / "sip_torture"


def load(name: str) -> bytes:
    """Wire bytes of fixture ``name``: LF becomes CRLF and <hex> runs become octets."""
    text = (FIXTURES / f"{name}.txt").read_text(encoding="utf-8")
    out = b""
    for i, part in enumerate(re.split(r"<hex>|</hex>", text)):
        out += bytes.fromhex(part) if i % 2 else part.replace("\n", "\r\n").encode("utf-8")
    return out


def parse_ok(name: str) -> SipRequest | SipResponse:
    """Parse a fixture that must be valid, and check it survives a round trip."""
    msg = parse_message(load(name))
    wire = msg.serialize()
    again = parse_message(wire)
    # Nothing is lost: same start line, headers (Content-Length is always written) and body.
    assert again.serialize() == wire, name
    assert [h for h in again.headers if h[0].lower() not in ("l", "content-length")] == [
        h for h in msg.headers if h[0].lower() not in ("l", "content-length")
    ], name
    assert again.body == msg.body, name
    return msg


def rejected(name: str) -> SipParseError:
    """Parse a fixture that must fail, returning the error."""
    try:
        parse_message(load(name))
    except SipParseError as err:
        return err
    raise AssertionError(f"{name} parsed but RFC 4475 says it is invalid")


class ValidMessageTests(SynchronousTestCase):
    """RFC 4475 §3.1.1: valid messages that stress the parser."""

    def test_wsinv(self) -> None:
        """§3.1.1.1: folding, odd whitespace, compact forms and escapes in a quoted string parse."""
        msg = parse_ok("wsinv")
        assert isinstance(msg, SipRequest)
        self.assertEqual(msg.method, "INVITE")
        self.assertEqual(msg.uri.param("unknownparam"), "")
        self.assertEqual(msg.to.tag, "1918181833n")
        self.assertEqual(msg.from_.display_name, 'J Rosenberg \\"')
        self.assertEqual(msg.from_.tag, "98asjd8")
        self.assertEqual(msg.max_forwards, 68)
        self.assertEqual(msg.call_id, "wsinv.ndaksdj@192.0.2.1")
        self.assertEqual((msg.cseq.seq, msg.cseq.method), (9, "INVITE"))
        self.assertEqual(
            [(v.transport, v.host, v.branch) for v in msg.vias],
            [("UDP", "192.0.2.2", "390skdjuw"), ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
             ("UDP", "192.168.255.111", "z9hG4bK30239")],
        )
        self.assertEqual(msg.headers.get("Subject"), "")
        self.assertEqual(msg.headers.get("newfangledheader"), "newfangled value continued newfangled value")
        self.assertEqual(msg.headers.get("UnknownHeaderWithUnusualValue"), ";;,,;;,;")
        contacts = msg.contacts
        assert contacts != "*"
        self.assertEqual(contacts[0].display_name, 'Quoted string ""')
        self.assertEqual(contacts[0].param("newparam"), "newvalue")
        self.assertEqual(contacts[0].param("secondparam"), "")
        self.assertEqual(contacts[0].param("q"), "0.33")
        self.assertTrue(msg.routes[0].uri.lr)
        self.assertEqual(len(msg.body), 150)

    def test_intmeth(self) -> None:
        """§3.1.1.2: a method, URI, tags and Call-ID using every legal character parse."""
        msg = parse_ok("intmeth")
        assert isinstance(msg, SipRequest)
        self.assertEqual(msg.method, "!interesting-Method0123456789_*+`.%indeed'~")
        self.assertEqual(msg.cseq.method, msg.method)
        self.assertEqual(msg.uri.user, "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*")
        self.assertEqual(msg.uri.password, "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)")
        self.assertEqual(msg.to.display_name, "BEL:\x07 NUL:\x00 DEL:\x7f")
        self.assertEqual(msg.from_.display_name, "token1~` token2'+_ token3*%!.-")
        self.assertEqual(msg.from_.tag, "_token~1'+`*%!-.")
        self.assertEqual(msg.from_.param("fromParam''~+*_!.-%"), "работающий")
        self.assertEqual(msg.call_id, "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{")
        self.assertEqual(msg.max_forwards, 255)
        self.assertEqual(msg.headers.get("extensionHeader-!.%*+_`'~"), "\ufeff大停電")

    def test_esc01(self) -> None:
        """§3.1.1.3: escaped user parts compare equal to their unescaped forms; escaped params stay distinct."""
        msg = parse_ok("esc01")
        assert isinstance(msg, SipRequest)
        self.assertEqual(msg.uri.user_unescaped, "sips:user@example.com")
        self.assertTrue(uri_equal(msg.to.uri, parse_uri("sip:user@example.com")))
        self.assertEqual(msg.from_.uri.user_unescaped, "I have spaces")
        contacts = msg.contacts
        assert contacts != "*"
        uri = contacts[0].uri
        self.assertEqual(uri.user_unescaped, "caller")
        self.assertTrue(uri_equal(uri, parse_uri("sip:caller@host5.example.net;lr;name=value%2541")))
        self.assertEqual(unescape(uri.params[1][1] or ""), "value%41")
        self.assertEqual(msg.content_type, "application/sdp")

    def test_escnull(self) -> None:
        """§3.1.1.4: %00 in user parts is legal and is kept as a NUL when unescaped."""
        msg = parse_ok("escnull")
        self.assertEqual(msg.to.uri.user_unescaped, "null-\x00-null")
        contacts = msg.contacts
        assert contacts != "*"
        self.assertEqual([c.uri.user_unescaped for c in contacts], ["\x00", "\x00\x00"])

    def test_esc02(self) -> None:
        """§3.1.1.5: an escaped method is a new method and an escaped header name is an unknown header."""
        msg = parse_ok("esc02")
        assert isinstance(msg, SipRequest)
        self.assertEqual(msg.method, "RE%47IST%45R")
        self.assertNotEqual(msg.method, "REGISTER")
        self.assertEqual(msg.to.display_name, "%Z%45")
        contacts = msg.contacts
        assert contacts != "*"
        self.assertEqual([c.uri.user for c in contacts], ["alias1", "alias3"])
        self.assertEqual(msg.headers.get("C%6Fntact"), "<sip:alias2@host2.example.com>")
        self.assertEqual(msg.top_via.branch, "z9hG4bK209%fzsnel234")

    def test_lwsdisp(self) -> None:
        """§3.1.1.6: no LWS between display name and '<' is fine."""
        msg = parse_ok("lwsdisp")
        self.assertEqual(msg.from_.display_name, "caller")
        self.assertEqual(msg.from_.tag, "323")

    def test_longreq(self) -> None:
        """§3.1.1.7: very long values and 34 Via headers in every case/compact spelling parse."""
        msg = parse_ok("longreq")
        vias = msg.vias
        self.assertEqual(len(vias), 34)
        self.assertEqual(vias[0].host, "sip33.example.com")
        self.assertEqual(vias[-1].received, "192.0.2.5")
        self.assertEqual(msg.to.uri.port, 6000)
        self.assertTrue(msg.from_.tag and msg.from_.tag.endswith("424"))
        self.assertEqual(len(msg.body), 150)

    def test_dblreq(self) -> None:
        """§3.1.1.8: bytes after Content-Length in a datagram are ignored; only the REGISTER is seen."""
        msg = parse_ok("dblreq")
        assert isinstance(msg, SipRequest)
        self.assertEqual(msg.method, "REGISTER")
        self.assertEqual(msg.body, b"")

    def test_semiuri(self) -> None:
        """§3.1.1.9: a ';' in the user part belongs to the user, not to a parameter."""
        msg = parse_ok("semiuri")
        assert isinstance(msg, SipRequest)
        self.assertEqual(msg.uri.user_unescaped, "user;par=u@example.net")
        self.assertEqual(msg.uri.host, "example.com")
        self.assertEqual(msg.uri.params, [])
        self.assertEqual(len(split_commas(msg.headers.get("Accept") or "")), 6)

    def test_transports(self) -> None:
        """§3.1.1.10: Via transports UDP, SCTP, TLS, an unknown one and TCP all parse."""
        msg = parse_ok("transports")
        self.assertEqual([v.transport for v in msg.vias], ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"])

    def test_mpart01(self) -> None:
        """§3.1.1.11: a multipart body with binary octets is carried byte for byte."""
        msg = parse_ok("mpart01")
        self.assertIn(b"\x00", msg.body)
        self.assertTrue(msg.body.endswith(b"--7a9cbec02ceef655--\r\n"))
        self.assertEqual(len(msg.body), msg.content_length)
        self.assertTrue(msg.top_via.has_rport)

    def test_unreason(self) -> None:
        """§3.1.1.12: a UTF-8 reason phrase is kept."""
        msg = parse_ok("unreason")
        assert isinstance(msg, SipResponse)
        self.assertEqual(msg.status, 200)
        self.assertTrue(msg.reason.endswith("простое"))

    def test_noreason(self) -> None:
        """§3.1.1.13: an empty reason phrase is legal."""
        msg = parse_ok("noreason")
        assert isinstance(msg, SipResponse)
        self.assertEqual((msg.status, msg.reason), (100, ""))


class InvalidMessageTests(SynchronousTestCase):
    """RFC 4475 §3.1.2: invalid messages get 400 (or the stated status), or are dropped."""

    # name -> status the UAS answers with
    REQUESTS = {
        "badinv01": 400,  # §3.1.2.1 extra ';' and ',' in Via/Contact
        "clerr": 400,  # §3.1.2.2 Content-Length larger than the datagram
        "ncl": 400,  # §3.1.2.3 negative Content-Length
        "scalar02": 400,  # §3.1.2.4 CSeq beyond 32 bits, Max-Forwards 300
        "quotbal": 400,  # §3.1.2.6 unterminated quoted display name
        "ltgtruri": 400,  # §3.1.2.7 Request-URI in <>
        "lwsruri": 400,  # §3.1.2.8 LWS inside the Request-URI
        "lwsstart": 400,  # §3.1.2.9 several SPs between request-line elements
        "trws": 400,  # §3.1.2.10 SP after the SIP version
        "escruri": 400,  # §3.1.2.11 escaped headers in the Request-URI
        "regbadct": 400,  # §3.1.2.13 URI with '?' not in <>
        "badaspec": 400,  # §3.1.2.14 spaces inside <addr-spec>
        "baddn": 400,  # §3.1.2.15 unquoted display name with a comma
        "badvers": 505,  # §3.1.2.16 SIP/7.0 -> Version Not Supported
        "mismatch01": 400,  # §3.1.2.17 CSeq method differs from the request method
        "mismatch02": 501,  # §3.1.2.18 unknown method + CSeq mismatch: 501 preferred
        "multi01": 400,  # §3.1.2.19 several To/From/Call-ID/CSeq/Max-Forwards
        "mcl01": 400,  # §3.2.2? two Content-Length values
        "insuf": 400,  # §3.3.1 missing Call-ID, From, To
    }

    def test_invalid_requests_answered(self) -> None:
        """Each invalid request raises SipParseError and yields a response with the RFC's status."""
        for name, status in self.REQUESTS.items():
            err = rejected(name)
            response = error_response(err, to_tag="t0")
            self.assertIsNotNone(response, name)
            assert response is not None
            self.assertEqual(response.status, status, name)
            # The answer echoes the Via lines as received, so it can be routed back.
            assert isinstance(err.partial, SipRequest)
            self.assertEqual(response.headers.get_all("Via"), err.partial.headers.get_all("Via"), name)
            self.assertTrue(response.serialize().startswith(b"SIP/2.0 %d " % status), name)

    def test_error_response_copies_dialog_headers(self) -> None:
        """The 400 for badaspec copies Via, Call-ID and CSeq and adds a To tag."""
        err = rejected("badaspec")
        response = error_response(err, to_tag="abc")
        assert response is not None
        self.assertEqual(response.call_id, "badaspec.sdf0234n2nds0a099u23h3hnnw009cdkne3")
        self.assertEqual(response.headers.get("CSeq"), "3923239 OPTIONS")
        # The To itself is the broken header, so it is echoed untouched.
        self.assertEqual(response.headers.get("To"), '"Watson, Thomas" < sip:t.watson@example.org >')

    def test_invalid_responses_dropped(self) -> None:
        """§3.1.2.5 scalarlg and §3.1.2.? bigcode responses raise and are never answered."""
        for name in ("scalarlg", "bigcode"):
            err = rejected(name)
            self.assertIsNone(error_response(err), name)

    def test_baddate_tolerated(self) -> None:
        """§3.1.2.12: a non-GMT Date may be ignored, so the request still parses with the Date kept."""
        msg = parse_ok("baddate")
        self.assertEqual(msg.headers.get("Date"), "Fri, 01 Jan 2010 16:00:00 EST")

    def test_bcast_parses(self) -> None:
        """§3.2.3 bcast: a response whose second Via is a broadcast address is well-formed; only the top Via matters to a UA."""
        msg = parse_ok("bcast")
        self.assertEqual(msg.vias[1].host, "255.255.255.255")
        self.assertEqual(msg.top_via.host, "192.0.2.198")


class SemanticMessageTests(SynchronousTestCase):
    """RFC 4475 §3.1.3, §3.3, §3.4: syntactically valid; the transaction user decides."""

    def test_badbranch(self) -> None:
        """§3.1.3.1: a branch that is only the magic cookie still parses (the transaction layer falls back)."""
        self.assertEqual(parse_ok("badbranch").top_via.branch, "z9hG4bK")

    def test_unknown_schemes(self) -> None:
        """§3.3.2/3: unknown Request-URI schemes parse as opaque URIs so the UA can answer 416."""
        for name, scheme in (("unkscm", "nobodyKnowsThisScheme"), ("novelsc", "soap.beep")):
            msg = parse_ok(name)
            assert isinstance(msg, SipRequest)
            self.assertEqual(msg.uri.scheme, scheme)
            self.assertFalse(msg.uri.is_sip)

    def test_unksm2(self) -> None:
        """§3.3.4: non-SIP URIs in To, From and Contact parse."""
        msg = parse_ok("unksm2")
        self.assertEqual(msg.to.uri.scheme, "isbn")
        self.assertEqual(msg.from_.uri.scheme, "http")

    def test_bext01_invut_regaut01_sdp01(self) -> None:
        """§3.3.5-3.3.8: Require lists, unknown body types and auth schemes are exposed for 420/415/401."""
        msg = parse_ok("bext01")
        self.assertEqual(split_commas(msg.headers.get("Require") or ""),
                         ["nothingSupportsThis", "nothingSupportsThisEither"])
        self.assertEqual(parse_ok("invut").content_type, "application/unknownformat")
        self.assertEqual(parse_ok("regaut01").headers.get("Authorization"),
                         "NoOneKnowsThisScheme opaque-data=here")
        self.assertEqual(parse_ok("sdp01").headers.get("Accept"), "text/nobodyKnowsThis")

    def test_zeromf(self) -> None:
        """§3.3.12 zeromf: Max-Forwards 0 parses as 0 (a UA answers it; only proxies send 483)."""
        self.assertEqual(parse_ok("zeromf").max_forwards, 0)

    def test_contact_params(self) -> None:
        """§3.3.13/14: outside <> ';unknownparam' is a Contact parameter; inside it is a URI parameter."""
        c1 = parse_ok("cparam01").contacts
        c2 = parse_ok("cparam02").contacts
        assert c1 != "*" and c2 != "*"
        self.assertEqual((c1[0].param("unknownparam"), c1[0].uri.params), ("", []))
        self.assertEqual((c2[0].param("unknownparam"), c2[0].uri.param("unknownparam")), (None, ""))

    def test_regescrt(self) -> None:
        """§3.3.15: escaped headers inside a bracketed Contact URI are legal and kept."""
        contacts = parse_ok("regescrt").contacts
        assert contacts != "*"
        self.assertEqual(contacts[0].uri.headers, [("Route", "%3Csip:sip.example.com%3E")])

    def test_inv2543(self) -> None:
        """§3.4.1: an RFC 2543 INVITE (no branch, no Max-Forwards, no Content-Length) parses."""
        msg = parse_ok("inv2543")
        self.assertIsNone(msg.top_via.branch)
        self.assertIsNone(msg.max_forwards)
        self.assertTrue(msg.body.startswith(b"v=0"))
