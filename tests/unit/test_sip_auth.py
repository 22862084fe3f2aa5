"""Digest authentication against the RFC 2617 and RFC 7616 examples, and the SIP client flow."""

from __future__ import annotations

import itertools

from twisted.trial.unittest import SynchronousTestCase

from activecall.sip.auth import (
    DigestChallenge,
    DigestClient,
    build_authorization,
    check_authorization,
    parse_challenge,
    select_challenge,
)
from activecall.sip.message import Headers, SipParseError, SipRequest, SipResponse, parse_auth_header
from activecall.sip.uri import parse_uri

RFC7616_CHALLENGE = DigestChallenge(
    realm="http-auth@example.org",
    nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
    opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS",
    qop=("auth", "auth-int"),
)
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"


def response_of(value: str) -> str | None:
    """The response= value of an Authorization header."""
    return parse_auth_header(value).get("response")


def register() -> SipRequest:
    """A REGISTER to answer challenges for."""
    headers = Headers([("Via", "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx"), ("CSeq", "1 REGISTER")])
    return SipRequest("REGISTER", parse_uri("sip:example.com"), headers)


class VectorTests(SynchronousTestCase):
    """Published test vectors."""

    def test_rfc2617_example(self) -> None:
        """The RFC 2617 §3.5 Mufasa example produces response 6629fae4..."""
        challenge = parse_challenge(
            'Digest realm="testrealm@host.com", qop="auth,auth-int", '
            'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
        )
        value = build_authorization(challenge, "GET", "/dir/index.html", "Mufasa", "Circle Of Life",
                                    cnonce="0a4f113b", nc=1)
        self.assertEqual(response_of(value), "6629fae49393a05397450978507c4ef1")
        header = parse_auth_header(value)
        self.assertEqual((header.get("qop"), header.get("nc"), header.get("opaque")),
                         ("auth", "00000001", "5ccc069c403ebaf9f0171e9517f40e41"))

    def test_rfc7616_md5(self) -> None:
        """The RFC 7616 §3.9.1 MD5 example produces response 8ca523f5..."""
        value = build_authorization(RFC7616_CHALLENGE, "GET", "/dir/index.html", "Mufasa",
                                    "Circle of Life", cnonce=RFC7616_CNONCE, nc=1)
        self.assertEqual(response_of(value), "8ca523f5e9506fed4657c9700eebdbec")

    def test_rfc7616_sha256(self) -> None:
        """The RFC 7616 §3.9.1 SHA-256 example produces response 753927fa..."""
        challenge = DigestChallenge(**{**RFC7616_CHALLENGE.__dict__, "algorithm": "SHA-256"})
        value = build_authorization(challenge, "GET", "/dir/index.html", "Mufasa",
                                    "Circle of Life", cnonce=RFC7616_CNONCE, nc=1)
        self.assertEqual(response_of(value), "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1")
        self.assertIn("algorithm=SHA-256", value)


class ParseTests(SynchronousTestCase):
    """Challenge parsing."""

    def test_fields(self) -> None:
        """Realm, nonce, opaque, algorithm, qop list and stale are read, with quotes and escapes."""
        c = parse_challenge('Digest realm="a \\"b\\"", nonce="n", opaque="o", algorithm=md5-sess, '
                            'qop="auth", stale=TRUE')
        self.assertEqual(c, DigestChallenge('a "b"', "n", "o", "MD5-SESS", ("auth",), True))

    def test_errors(self) -> None:
        """Other schemes, missing realm/nonce and broken syntax raise SipParseError."""
        for bad in ('Basic realm="x"', 'Digest nonce="n"', 'Digest realm="r"', 'Digest realm="r, nonce=n',
                    "NoOneKnowsThisScheme opaque-data=here"):
            with self.assertRaises(SipParseError, msg=bad):
                parse_challenge(bad)

    def test_select_prefers_sha256(self) -> None:
        """Among MD5 and SHA-256 challenges the SHA-256 one is answered; unknown algorithms are skipped."""
        chosen = select_challenge([
            'Digest realm="r", nonce="1", algorithm=MD5',
            'Digest realm="r", nonce="2", algorithm=SHA-512-256',
            'Digest realm="r", nonce="3", algorithm=SHA-256',
        ])
        assert chosen is not None
        self.assertEqual(chosen.nonce, "3")


class RoundTripTests(SynchronousTestCase):
    """build_authorization agrees with check_authorization."""

    def test_all_algorithms_and_qops(self) -> None:
        """Every algorithm/qop combination verifies with the right password and fails with a wrong one."""
        for algorithm, qop in itertools.product(("MD5", "MD5-SESS", "SHA-256", "SHA-256-SESS"),
                                                ((), ("auth",), ("auth-int",))):
            c = DigestChallenge("sip.example.com", "abc", algorithm=algorithm, qop=qop)
            value = build_authorization(c, "INVITE", "sip:bob@example.com", "alice", "pw",
                                        cnonce="cn", nc=3, body=b"v=0\r\n")
            self.assertTrue(check_authorization(value, "INVITE", "pw", realm="sip.example.com",
                                                nonce="abc", body=b"v=0\r\n"), (algorithm, qop))
            self.assertFalse(check_authorization(value, "INVITE", "bad", body=b"v=0\r\n"), (algorithm, qop))
            self.assertFalse(check_authorization(value, "BYE", "pw", body=b"v=0\r\n"), (algorithm, qop))

    def test_checker_rejects_garbage(self) -> None:
        """Unparseable or incomplete credentials are simply not valid."""
        for bad in ("", "Digest", 'Digest username="a"', "Basic Zm9vOmJhcg=="):
            self.assertFalse(check_authorization(bad, "INVITE", "pw"))


class ClientTests(SynchronousTestCase):
    """DigestClient on 401/407 responses."""

    def setUp(self) -> None:
        counter = itertools.count(1)
        self.client = DigestClient("alice", "pw", cnonce=lambda: f"c{next(counter)}")

    def challenge(self, status: int, *values: str) -> SipResponse:
        """A 401/407 carrying ``values`` as challenges."""
        name = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
        return SipResponse(status, "x", Headers([(name, v) for v in values]))

    def test_401_and_nonce_count(self) -> None:
        """A 401 is answered with Authorization and nc counts up while the nonce is reused."""
        resp = self.challenge(401, 'Digest realm="r", nonce="n1", qop="auth"')
        first = self.client.respond(register(), resp)
        second = self.client.respond(register(), resp)
        assert first and second
        self.assertEqual(first[0][0], "Authorization")
        self.assertEqual(parse_auth_header(first[0][1]).get("nc"), "00000001")
        self.assertEqual(parse_auth_header(second[0][1]).get("nc"), "00000002")
        self.assertEqual(parse_auth_header(second[0][1]).get("cnonce"), "c2")
        self.assertTrue(check_authorization(first[0][1], "REGISTER", "pw"))

    def test_407_uses_proxy_headers(self) -> None:
        """A 407 is answered with Proxy-Authorization, one per challenged realm."""
        resp = self.challenge(407, 'Digest realm="a", nonce="1"', 'Digest realm="b", nonce="2"')
        answers = self.client.respond(register(), resp)
        assert answers is not None
        self.assertEqual([n for n, _ in answers], ["Proxy-Authorization"] * 2)
        self.assertEqual({parse_auth_header(v).get("realm") for _, v in answers}, {"a", "b"})

    def test_gives_up_on_rejected_credentials(self) -> None:
        """If the challenged request already had credentials for that realm, a non-stale challenge means give up."""
        resp = self.challenge(401, 'Digest realm="r", nonce="n2"')
        retried = register()
        retried.headers.add("Authorization", 'Digest username="alice", realm="r", nonce="n1", uri="sip:x", response="0"')
        self.assertIsNone(self.client.respond(retried, resp))

    def test_stale_nonce_retries(self) -> None:
        """stale=true means the password was right: answer the fresh nonce."""
        resp = self.challenge(401, 'Digest realm="r", nonce="n2", stale=true')
        retried = register()
        retried.headers.add("Authorization", 'Digest username="alice", realm="r", nonce="n1", uri="sip:x", response="0"')
        answers = self.client.respond(retried, resp)
        assert answers is not None
        self.assertEqual(parse_auth_header(answers[0][1]).get("nonce"), "n2")

    def test_unusable_challenges(self) -> None:
        """Non-Digest challenges, other statuses and broken headers give None."""
        self.assertIsNone(self.client.respond(register(), self.challenge(401, 'Basic realm="r"')))
        self.assertIsNone(self.client.respond(register(), self.challenge(401, "Digest realm=")))
        self.assertIsNone(self.client.respond(register(), SipResponse(403, "Forbidden", Headers())))
