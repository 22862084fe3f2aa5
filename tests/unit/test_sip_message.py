"""SIP message, header and URI parsing/serialization (RFC 3261 §7, §19, §20, §25)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.sip.message import (
    CSeq,
    Headers,
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
    Via,
    make_response,
    parse_auth_header,
    parse_contacts,
    parse_cseq,
    parse_message,
    parse_name_addr,
    parse_via,
    split_commas,
)
from activecall.sip.uri import SipUri, parse_uri, uri_equal

INVITE = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>\r\n"
    b"From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@pc33.atlanta.example.com>\r\n"
    b"Record-Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n"
    b"\r\n"
    b"v=0\n"
)


class HeadersTests(SynchronousTestCase):
    """The Headers multi-dict."""

    def test_case_and_compact_lookup(self) -> None:
        """Lookups ignore case and map compact forms both ways."""
        h = Headers([("v", "a"), ("VIA", "b"), ("i", "cid"), ("l", "0")])
        self.assertEqual(h.get_all("Via"), ["a", "b"])
        self.assertEqual(h.get("call-id"), "cid")
        self.assertEqual(h.first("Content-Length"), "0")
        self.assertIn("V", h)
        self.assertNotIn("To", h)

    def test_set_add_remove_keep_order_and_names(self) -> None:
        """set() replaces in place keeping the written name; add(prepend=True) goes before its kin."""
        h = Headers([("From", "f"), ("l", "5"), ("Via", "v1")])
        h.set("Content-Length", "0")
        h.add("Via", "v0", prepend=True)
        h.add("X-New", "x")
        self.assertEqual(h.items(), [("From", "f"), ("l", "0"), ("Via", "v0"), ("Via", "v1"), ("X-New", "x")])
        self.assertEqual(h.remove("via"), 2)
        self.assertEqual(h.count("Via"), 0)

    def test_split_commas(self) -> None:
        """Commas inside quotes and <> do not split values."""
        self.assertEqual(split_commas('"a, b" <sip:x@y>;p=1, <sip:c,d@e>, f'),
                         ['"a, b" <sip:x@y>;p=1', "<sip:c,d@e>", "f"])


class TypedHeaderTests(SynchronousTestCase):
    """Via, name-addr, CSeq and auth parsing."""

    def test_via(self) -> None:
        """Via transport, sent-by, IPv6, branch, rport and received are read; str() is canonical."""
        (via,) = parse_via("SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bKx;rport;received=192.0.2.1")
        self.assertEqual((via.transport, via.host, via.port), ("TLS", "[2001:db8::1]", 5061))
        self.assertEqual((via.branch, via.has_rport, via.rport, via.received), ("z9hG4bKx", True, None, "192.0.2.1"))
        self.assertTrue(via.reliable)
        via.set_param("rport", "1234")
        self.assertEqual(str(via), "SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bKx;rport=1234;received=192.0.2.1")
        self.assertEqual(parse_via(str(via)), [via])

    def test_bad_vias(self) -> None:
        """Malformed Via values raise SipParseError."""
        for bad in ("SIP/2.0 host", "SIP/2.0/UDP", "SIP/2.0/UDP host;;", "SIP/2.0/UDP host:99999",
                    "SIP/2.0/UDP host,", "SIP/2.0/UDP ho st", "SIP/2.0/UDP host;branch=\"x"):
            with self.assertRaises(SipParseError, msg=bad):
                parse_via(bad)

    def test_name_addr_forms(self) -> None:
        """Quoted, token and absent display names, bracketed and bare URIs, and params are parsed per §20."""
        table = [
            ('"A \\"B\\"" <sip:a@b>;tag=1', 'A "B"', "sip:a@b", "1"),
            ("Alice Smith <sip:a@b;lr>;tag=2", "Alice Smith", "sip:a@b;lr", "2"),
            ("<sip:a@b>", None, "sip:a@b", None),
            ("sip:a@b;tag=3", None, "sip:a@b", "3"),
            ("tel:+123;tag=4", None, "tel:+123", "4"),
        ]
        for text, display, uri, tag in table:
            na = parse_name_addr(text)
            self.assertEqual((na.display_name, str(na.uri), na.tag), (display, uri, tag), text)
            self.assertEqual(parse_name_addr(str(na)), na if na.bracketed or na.display_name else na, text)

    def test_name_addr_serialization_brackets_when_needed(self) -> None:
        """A URI with params is bracketed on output so they stay URI params; display names are quoted."""
        na = NameAddr(parse_uri("sip:a@b;transport=tcp"), "Bob", [("tag", "x")], bracketed=False)
        self.assertEqual(str(na), '"Bob" <sip:a@b;transport=tcp>;tag=x')
        self.assertEqual(str(parse_name_addr("sip:a@b").with_tag("t")), "sip:a@b;tag=t")

    def test_bad_name_addrs(self) -> None:
        """Broken addresses raise SipParseError."""
        for bad in ("", '"unterminated <sip:a@b>', "<sip:a@b", "< sip:a@b>", "A,B <sip:a@b>",
                    "sip:a@b?x=y", '"x" sip:a@b', "<sip:a@b>;=1", "<notauri>"):
            with self.assertRaises(SipParseError, msg=bad):
                parse_name_addr(bad)

    def test_contacts_star(self) -> None:
        """Contact: * is recognised; lists are split."""
        self.assertEqual(parse_contacts(["*"]), "*")
        contacts = parse_contacts(["<sip:a@b>;expires=60, <sip:c@d>", "sip:e@f"])
        assert contacts != "*"
        self.assertEqual([str(c.uri) for c in contacts], ["sip:a@b", "sip:c@d", "sip:e@f"])
        self.assertEqual(contacts[0].param("expires"), "60")

    def test_cseq(self) -> None:
        """CSeq parses with any LWS; numbers beyond 32 bits fail."""
        self.assertEqual(parse_cseq(" 0009\t INVITE "), CSeq(9, "INVITE"))
        for bad in ("INVITE", "1", "1 2 3", "-1 INVITE", "4294967296 INVITE"):
            with self.assertRaises(SipParseError, msg=bad):
                parse_cseq(bad)

    def test_auth_header(self) -> None:
        """Auth params are split on commas outside quotes and unquoted."""
        h = parse_auth_header('Digest realm="a,b", nonce="n\\"x", algorithm=MD5')
        self.assertEqual((h.scheme, h.get("realm"), h.get("NONCE"), h.get("algorithm")), ("Digest", "a,b", 'n"x', "MD5"))


class UriTests(SynchronousTestCase):
    """SIP URIs (§19.1)."""

    def test_round_trip_as_written(self) -> None:
        """Every component survives str(parse_uri(x)) unchanged, escapes included."""
        for text in ("sip:alice@atlanta.com", "sips:alice:secret@atlanta.com:5061;transport=tcp?subject=project%20x&priority=urgent",
                     "sip:+1-212-555-1212:1234@gateway.com;user=phone", "sip:[2001:db8::10]:5070", "sip:a%20b@h;lr",
                     "SIP:alice@atlanta.com", "tel:+358-555-1234567;postd=pp22", "urn:service:sos"):
            self.assertEqual(str(parse_uri(text)), text)

    def test_fields(self) -> None:
        """User, password, host, port, params and headers are split correctly."""
        uri = parse_uri("sips:alice:pw@atlanta.com:5061;transport=tcp;lr?subject=hi")
        self.assertEqual((uri.scheme, uri.user, uri.password, uri.host, uri.port),
                         ("sips", "alice", "pw", "atlanta.com", 5061))
        self.assertEqual((uri.transport, uri.lr, uri.headers), ("tcp", True, [("subject", "hi")]))
        self.assertEqual(uri.host_port(), ("atlanta.com", 5061))
        self.assertEqual(parse_uri("sips:h").host_port(), ("h", 5061))

    def test_rfc3261_equal_examples(self) -> None:
        """The §19.1.4 equivalent pairs compare equal."""
        pairs = [
            ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
            ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
            ("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;newparam=5"),
            ("sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
             "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com"),
            ("sip:alice@atlanta.com?subject=project%20x&priority=urgent",
             "sip:alice@atlanta.com?priority=urgent&subject=project%20x"),
        ]
        for a, b in pairs:
            self.assertTrue(uri_equal(parse_uri(a), parse_uri(b)), (a, b))

    def test_rfc3261_unequal_examples(self) -> None:
        """The §19.1.4 non-equivalent pairs compare unequal."""
        pairs = [
            ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),
            ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
            ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
            ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
            ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),
            ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
            ("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;security=off"),
            ("sip:a@b", "sips:a@b"),
        ]
        for a, b in pairs:
            self.assertFalse(uri_equal(parse_uri(a), parse_uri(b)), (a, b))

    def test_bad_uris(self) -> None:
        """Bad URIs raise SipParseError."""
        for bad in ("", "sip:", "sip:@h", "sip:a@", "sip:a@h:", "sip:a@h:x", "sip:a@h;", "sip:a@h;=v",
                    "sip:a@h?x", "sip:a@[::1", "sip:a b@h", "1sip:a@h", "tel:", "http://a b", "sip:a@-h"):
            with self.assertRaises(SipParseError, msg=bad):
                parse_uri(bad)

    def test_params_editing(self) -> None:
        """set_param/remove_param edit parameters case-insensitively."""
        uri = SipUri("sip", "a", None, "h", None, [("Transport", "udp")])
        uri.set_param("transport", "tcp")
        uri.set_param("lr", None)
        self.assertEqual(str(uri), "sip:a@h;Transport=tcp;lr")
        uri.remove_param("TRANSPORT")
        self.assertEqual(str(uri), "sip:a@h;lr")


class MessageTests(SynchronousTestCase):
    """Whole messages."""

    def test_request_fields(self) -> None:
        """A request exposes method, URI and typed headers; the body is cut to Content-Length."""
        msg = parse_message(INVITE)
        assert isinstance(msg, SipRequest)
        self.assertEqual((msg.method, str(msg.uri)), ("INVITE", "sip:bob@biloxi.example.com"))
        self.assertEqual(msg.from_.tag, "1928301774")
        self.assertEqual(msg.to.display_name, "Bob")
        self.assertEqual(msg.cseq, CSeq(314159, "INVITE"))
        self.assertEqual([str(r.uri) for r in msg.record_routes], ["sip:p1.example.com;lr", "sip:p2.example.com;lr"])
        self.assertEqual(msg.body, b"v=0\n")
        self.assertEqual(msg.content_type, "application/sdp")

    def test_serialize_sets_content_length(self) -> None:
        """serialize() rewrites Content-Length to the real body length, in place, keeping other headers."""
        msg = parse_message(INVITE)
        msg.body = b"v=0\r\ns=-\r\n"
        wire = msg.serialize()
        self.assertIn(b"Content-Length: 10\r\n\r\nv=0\r\ns=-\r\n", wire)
        self.assertEqual(parse_message(wire).body, msg.body)

    def test_serialize_round_trip(self) -> None:
        """A parsed message serializes to the same bytes it came from (when it had no folding)."""
        self.assertEqual(parse_message(INVITE).serialize(), INVITE)

    def test_lf_only_and_leading_crlf(self) -> None:
        """LF-only line ends and leading CRLFs (§7.5) are tolerated."""
        msg = parse_message(b"\r\n\r\n" + INVITE.replace(b"\r\n", b"\n"))
        self.assertEqual(msg.call_id, "a84b4c76e66710@pc33.atlanta.example.com")

    def test_no_content_length_datagram(self) -> None:
        """Without Content-Length the whole rest of a datagram is the body."""
        msg = parse_message(INVITE.replace(b"Content-Length: 4\r\n", b"") + b"more")
        self.assertEqual(msg.body, b"v=0\nmore")

    def test_response(self) -> None:
        """Status lines parse with multi-word reasons; responses validate their headers."""
        resp = make_response(parse_message(INVITE), 180, to_tag="abc")  # type: ignore[arg-type]
        msg = parse_message(resp.serialize())
        assert isinstance(msg, SipResponse)
        self.assertEqual((msg.status, msg.reason), (180, "Ringing"))
        self.assertEqual(msg.to.tag, "abc")

    def test_errors(self) -> None:
        """Broken messages raise SipParseError (never anything else)."""
        bads = [
            b"", b"\r\n", b"INVITE sip:a@b SIP/2.0\r\n", b"garbage\r\n\r\n",
            INVITE.replace(b"Max-Forwards: 70", b"Max-Forwards: 256"),
            INVITE.replace(b"Max-Forwards: 70", b"Max-Forwards: x"),
            INVITE.replace(b"Content-Length: 4", b"Content-Length: 40"),
            INVITE.replace(b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com", b"Call-ID: a b"),
            INVITE.replace(b"Max-Forwards: 70\r\n", b" folded-first\r\n", 1).replace(b"INVITE sip", b"INVITE sip", 1),
            INVITE.replace(b"Contact: <", b"Contact<"),
            INVITE.replace(b"Contact: <sip:alice@pc33.atlanta.example.com>", b"Contact: *"),
            INVITE.replace(b"SIP/2.0\r\n", b"SIP/2.0\rX\r\n", 1),
            INVITE.replace(b"INVITE sip", b"INV\xc3\xa9 sip", 1),
            b"SIP/2.0 99 Low\r\nVia: SIP/2.0/UDP h\r\n\r\n",
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h\r\n\r\n",
        ]
        for bad in bads:
            with self.assertRaises(SipParseError, msg=bad[:60]):
                parse_message(bad)

    def test_version_error_status(self) -> None:
        """An unknown SIP version carries status 505 and the partial request."""
        with self.assertRaises(SipParseError) as ctx:
            parse_message(INVITE.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1))
        self.assertEqual(ctx.exception.status, 505)
        self.assertIsInstance(ctx.exception.partial, SipRequest)

    def test_make_response_rfc3261_8_2_6(self) -> None:
        """make_response copies Via/From/To/Call-ID/CSeq, adds the To tag once, adds extras and the body."""
        req = parse_message(INVITE.replace(b"Max-Forwards", b"Via: SIP/2.0/UDP p1;branch=z9hG4bK2\r\nTimestamp: 54\r\nMax-Forwards"))
        assert isinstance(req, SipRequest)
        resp = make_response(req, 200, extra_headers=[("Contact", "<sip:bob@h>")], to_tag="t9", body=b"x")
        self.assertEqual([n for n, _ in resp.headers], ["Via", "Via", "To", "From", "Call-ID", "CSeq", "Contact"])
        self.assertEqual(resp.to.tag, "t9")
        self.assertEqual(make_response(resp_request_with_tag(req), 200, to_tag="other").to.tag, "old")
        self.assertIn(b"Content-Length: 1\r\n", resp.serialize())
        trying = make_response(req, 100)
        self.assertEqual(trying.headers.get("Timestamp"), "54")
        self.assertIsNone(trying.to.tag)

    def test_set_top_via_keeps_others_on_line(self) -> None:
        """Replacing the top Via leaves comma-joined later Vias in place."""
        msg = parse_message(INVITE.replace(b"branch=z9hG4bK776asdhds", b"branch=z9hG4bK1, SIP/2.0/TCP second"))
        via = msg.top_via
        via.set_param("received", "192.0.2.1")
        msg.set_top_via(via)
        self.assertEqual([v.received for v in msg.vias], ["192.0.2.1", None])
        self.assertEqual(msg.vias[1].host, "second")

    def test_via_constructs(self) -> None:
        """A Via built in code serializes with defaults."""
        self.assertEqual(str(Via("UDP", "h", 5060, [("branch", "z9hG4bKa"), ("rport", None)])),
                         "SIP/2.0/UDP h:5060;branch=z9hG4bKa;rport")


def resp_request_with_tag(req: SipRequest) -> SipRequest:
    """A copy of ``req`` whose To already has tag=old."""
    other = req.copy()
    other.headers.set("To", "<sip:bob@biloxi.example.com>;tag=old")
    return other


class ParsedHeaderCacheTests(SynchronousTestCase):
    """Typed views are parsed once and kept, yet every header edit is seen by the next read."""

    def setUp(self) -> None:
        self.msg = parse_message(INVITE)

    def test_views_are_parsed_once(self) -> None:
        """Reading a view twice returns equal values without parsing the header text again."""
        first = self.msg.top_via
        self.assertIn("top-via", self.msg.headers._cache or {})
        self.assertEqual(self.msg.top_via, first)
        self.assertIs(self.msg.cseq, self.msg.cseq)

    def test_set_after_read_returns_the_new_value(self) -> None:
        """Replacing Via, From, To, CSeq and Call-ID after reading them changes what the views return."""
        self.assertEqual(self.msg.top_via.branch, "z9hG4bK776asdhds")
        self.assertEqual(self.msg.from_.tag, "1928301774")
        self.assertIsNone(self.msg.to.tag)
        self.assertEqual(self.msg.cseq, CSeq(314159, "INVITE"))
        self.msg.headers.set("Via", "SIP/2.0/TCP host.example.com;branch=z9hG4bKnew")
        self.msg.headers.set("From", "<sip:carol@example.com>;tag=c1")
        self.msg.headers.set("To", "<sip:bob@example.com>;tag=b2")
        self.msg.headers.set("CSeq", "7 INVITE")
        self.msg.headers.set("Call-ID", "other@host")
        self.assertEqual(self.msg.top_via.branch, "z9hG4bKnew")
        self.assertEqual([v.transport for v in self.msg.vias], ["TCP"])
        self.assertEqual(self.msg.from_.tag, "c1")
        self.assertEqual(self.msg.from_tag, "c1")
        self.assertEqual(self.msg.to.tag, "b2")
        self.assertEqual(self.msg.to_tag, "b2")
        self.assertEqual(self.msg.cseq, CSeq(7, "INVITE"))
        self.assertEqual(self.msg.call_id, "other@host")

    def test_add_remove_and_set_top_via_are_seen(self) -> None:
        """add, remove, replace_first_value (set_top_via) all invalidate what was parsed."""
        self.assertEqual(self.msg.routes, [])
        self.msg.headers.add("Route", "<sip:proxy.example.com;lr>")
        self.assertEqual([r.uri.host for r in self.msg.routes], ["proxy.example.com"])
        self.assertEqual(len(self.msg.contacts), 1)
        self.msg.headers.remove("Contact")
        self.assertEqual(self.msg.contacts, [])
        via = self.msg.top_via
        via.set_param("received", "192.0.2.1")
        self.msg.set_top_via(via)
        self.assertEqual(self.msg.top_via.received, "192.0.2.1")
        self.msg.headers.add("Via", "SIP/2.0/UDP first.example.com;branch=z9hG4bKtop", prepend=True)
        self.assertEqual(self.msg.top_via.host, "first.example.com")
        self.assertEqual(len(self.msg.vias), 2)

    def test_changing_a_returned_view_does_not_change_the_next_read(self) -> None:
        """Views are copies: editing one without writing it back leaves the message as it was."""
        self.msg.top_via.set_param("branch", "z9hG4bKmutated")
        self.msg.from_.set_param("tag", "mutated")
        self.msg.vias[0].set_param("rport", None)
        self.msg.contacts[0].uri.host = "mutated.example.com"  # type: ignore[index]
        self.assertEqual(self.msg.top_via.branch, "z9hG4bK776asdhds")
        self.assertFalse(self.msg.vias[0].has_rport)
        self.assertEqual(self.msg.from_.tag, "1928301774")
        self.assertNotEqual(self.msg.contacts[0].uri.host, "mutated.example.com")  # type: ignore[index]

    def test_a_copy_keeps_its_own_cache(self) -> None:
        """Editing a copied message's headers changes neither the original nor its views."""
        original_branch = self.msg.top_via.branch
        other = self.msg.copy()
        other.headers.set("Via", "SIP/2.0/UDP elsewhere.example.com;branch=z9hG4bKcopy")
        self.assertEqual(other.top_via.branch, "z9hG4bKcopy")
        self.assertEqual(self.msg.top_via.branch, original_branch)

    def test_serialize_sets_content_length_once(self) -> None:
        """The first Content-Length line takes the body length in place; later ones are dropped."""
        msg = SipRequest("MESSAGE", parse_uri("sip:a@example.com"), Headers([
            ("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"), ("l", "99"), ("To", "<sip:a@example.com>"),
            ("Content-Length", "5")]), b"hi")
        wire = msg.serialize().decode()
        self.assertIn("\r\nl: 2\r\nTo: <sip:a@example.com>\r\n\r\nhi", wire)
        self.assertNotIn("Content-Length", wire)
        self.assertIn("\r\nContent-Length: 0\r\n", SipResponse(200, "OK", Headers([("To", "x")])).serialize().decode())

    def test_forget_parsed_drops_views_and_reads_parse_again(self) -> None:
        """forget_parsed() empties the cache; the next read parses the same value again."""
        before = self.msg.from_
        self.assertIsNotNone(self.msg.headers._cache)
        self.msg.headers.forget_parsed()
        self.assertIsNone(self.msg.headers._cache)
        self.assertEqual(self.msg.from_, before)

    def test_set_top_via_keeps_the_other_views(self) -> None:
        """Stamping the top Via forgets only the Via views; From stays parsed and every view is current."""
        from_ = self.msg.from_
        via = self.msg.top_via
        via.set_param("received", "192.0.2.7")
        self.msg.set_top_via(via)
        self.assertIn("from", self.msg.headers._cache or {})
        self.assertEqual(self.msg.from_, from_)
        self.assertEqual(self.msg.top_via.received, "192.0.2.7")
        self.assertEqual(self.msg.vias[0].received, "192.0.2.7")
