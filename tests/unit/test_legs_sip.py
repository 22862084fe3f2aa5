"""Outbound SIP leg helpers: caller/callee defaults, credentials, trunk rules (config.md §12.1)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.legs.sip import apply_trunk_rules, caller_uri, credentials_for, outgoing_headers
from activecall.config import Overrides, parse_config
from activecall.options import CallOption


def rules(text: str):  # type: ignore[no-untyped-def]
    return parse_config(text, Overrides()).trunk_rules


class TrunkRuleTests(SynchronousTestCase):
    """The first matching rule rewrites From, To/Request-URI and Contact; others are skipped."""

    def test_first_match_rewrites_to_and_contact(self) -> None:
        """A rule matching the callee host rewrites the callee host (keeping the port) and the Contact host."""
        r = rules('[[trunk_rules]]\nrule.match.to.host = "^10\\\\."\nrule.rewrite.to.host = "carrier.example"\n'
                  'rule.rewrite.contact.host = "203.0.113.10:5070"\n'
                  '[[trunk_rules]]\nrule.rewrite.from.user = "never"\n')
        to, frm, contact = apply_trunk_rules(r, "sip:1001@10.0.0.5:5080", "sip:bot@127.0.0.1", None,
                                             lambda: "sip:127.0.0.1:25060")
        self.assertEqual(to, "sip:1001@carrier.example:5080")
        self.assertEqual(frm, "sip:bot@127.0.0.1", "only the first matching rule applies")
        self.assertEqual(contact, "sip:203.0.113.10:5070")

    def test_catch_all_and_user_patterns(self) -> None:
        """A rule without conditions always matches; a user pattern never matches a URI without user."""
        r = rules('[[trunk_rules]]\nrule.match.to.user = "^1"\nrule.rewrite.from.user = "a"\n'
                  '[[trunk_rules]]\nrule.rewrite.from.user = "+15550100"\n')
        to, frm, contact = apply_trunk_rules(r, "sip:pbx.example", "sip:bot@127.0.0.1", "sip:x@1.2.3.4", lambda: "")
        self.assertEqual((to, frm, contact), ("sip:pbx.example", "sip:+15550100@127.0.0.1", "sip:x@1.2.3.4"))

    def test_no_rules_leave_everything(self) -> None:
        """Without rules nothing changes."""
        self.assertEqual(apply_trunk_rules((), "sip:a@b", "sip:c@d", None, lambda: ""), ("sip:a@b", "sip:c@d", None))


class OptionDefaultsTests(SynchronousTestCase):
    """CallOption caller defaults and credential lookup (protocol.md §4.1, §4.2; config.md §7)."""

    def test_caller_defaults(self) -> None:
        """caller gets sip: added; absent, it comes from sip.username/realm, else active-call@127.0.0.1."""
        self.assertEqual(caller_uri(CallOption.from_json({"caller": "bot@x"}, "o")), "sip:bot@x")
        self.assertEqual(caller_uri(CallOption.from_json({"sip": {"username": "u", "realm": "r"}}, "o")), "sip:u@r")
        self.assertEqual(caller_uri(CallOption.from_json({}, "o")), "sip:active-call@127.0.0.1")

    def test_credentials_from_register_users_on_the_callee_host(self) -> None:
        """Without a sip object, a [[register_users]] entry whose server host is the callee's host is used."""
        users = parse_config('[[register_users]]\nserver = "pbx.example:5060"\nusername = "2001"\n'
                             '[register_users.credential]\nusername = "2001"\npassword = "pw"\n', Overrides()).register_users
        c = credentials_for(CallOption.from_json({"callee": "sip:1001@pbx.example"}, "o"), users)
        assert c is not None
        self.assertEqual((c.username, c.password), ("2001", "pw"))
        self.assertIsNone(credentials_for(CallOption.from_json({"callee": "sip:1001@other"}, "o"), users))
        self.assertIsNone(credentials_for(CallOption.from_json({"callee": "sip:1001@pbx.example", "sip": {}}, "o"), users))


class OutgoingHeadersTests(SynchronousTestCase):
    """The last check before headers go into an outgoing request."""

    def test_unsafe_headers_are_dropped(self) -> None:
        """CR/LF values, protected names and non-token names are dropped; safe ones kept in order."""
        headers = {"X-A": "1", "X-B": "x\r\nINVITE sip:a@b SIP/2.0", "Via": "SIP/2.0/UDP evil", "X C": "2", "X-D": "3"}
        self.assertEqual(outgoing_headers(headers), [("X-A", "1"), ("X-D", "3")])
        self.assertEqual(outgoing_headers(None), [])

    def test_at_most_32(self) -> None:
        """Beyond 32 headers the rest are dropped."""
        self.assertEqual(len(outgoing_headers({f"X-{i}": "v" for i in range(40)})), 32)
