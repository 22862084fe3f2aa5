"""Tests for the ``[sip_acl]`` and ``[sip_rate_limit]`` configuration tables."""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from activecall.config import Config, ConfigError, SipAclConfig, SipRateLimitConfig, parse_config


class SipAclConfigTests(SynchronousTestCase):
    """``[sip_acl]`` parsing."""

    def test_default_open(self) -> None:
        """Without the table both lists are empty, i.e. every source is allowed."""
        self.assertEqual(parse_config("").sip_acl, SipAclConfig())
        self.assertEqual(Config().sip_acl, SipAclConfig())

    def test_inline_table(self) -> None:
        """The inline-table form gives parsed networks in file order; a bare address is a host."""
        config = parse_config(
            'sip_acl = { allow = ["10.0.0.0/8", "2001:db8::/32"], deny = ["192.0.2.7"] }'
        )
        self.assertEqual(
            config.sip_acl.allow,
            (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")),
        )
        self.assertEqual(config.sip_acl.deny, (ipaddress.ip_network("192.0.2.7/32"),))
        self.assertEqual(config.warnings, ())

    def test_bad_network(self) -> None:
        """Host bits, bad prefixes and names are start-up errors naming the element."""
        for bad in ('"10.0.0.1/8"', '"10.0.0.0/40"', '"pbx.example.org"'):
            with self.subTest(bad=bad):
                with self.assertRaises(ConfigError) as cm:
                    parse_config(f"[sip_acl]\nallow = [\"10.0.0.0/8\", {bad}]\n")
                self.assertEqual(cm.exception.key_path, "sip_acl.allow[1]")

    def test_wrong_types(self) -> None:
        """A string instead of an array, or a non-table, is an error."""
        with self.assertRaises(ConfigError) as cm:
            parse_config('[sip_acl]\ndeny = "192.0.2.0/24"\n')
        self.assertEqual(cm.exception.key_path, "sip_acl.deny")
        with self.assertRaises(ConfigError) as cm:
            parse_config('sip_acl = ["10.0.0.0/8"]\n')
        self.assertEqual(cm.exception.key_path, "sip_acl")

    def test_unknown_key_warns(self) -> None:
        """An unknown key inside the table is a warning, as elsewhere in the file."""
        config = parse_config('[sip_acl]\nallowed = ["10.0.0.0/8"]\n')
        self.assertIn("unknown key: sip_acl.allowed", config.warnings)


class SipRateLimitConfigTests(SynchronousTestCase):
    """``[sip_rate_limit]`` parsing."""

    def test_defaults(self) -> None:
        """The limiter is on by default at 50 requests/s with a burst of 200."""
        limit = parse_config("").sip_rate_limit
        self.assertEqual(limit, SipRateLimitConfig())
        self.assertEqual(
            (limit.enabled, limit.requests_per_second, limit.burst, limit.exempt),
            (True, 50.0, 200, ()),
        )

    def test_values(self) -> None:
        """All keys are read; an integer rate is accepted as a float."""
        limit = parse_config(
            "[sip_rate_limit]\nenabled = true\nrequests_per_second = 20\nburst = 40\n"
            'exempt = ["203.0.113.0/28"]\n'
        ).sip_rate_limit
        self.assertEqual(limit.requests_per_second, 20.0)
        self.assertEqual(limit.burst, 40)
        self.assertEqual(limit.exempt, (ipaddress.ip_network("203.0.113.0/28"),))

    def test_burst_defaults_to_at_least_rate(self) -> None:
        """Without ``burst``, a high rate gets a burst of one second's worth."""
        def burst(rate: int) -> int:
            text = f"sip_rate_limit = {{ requests_per_second = {rate} }}"
            return parse_config(text).sip_rate_limit.burst

        self.assertEqual(burst(500), 500)
        self.assertEqual(burst(5), 200)

    def test_disabled(self) -> None:
        """``enabled = false`` is kept."""
        config = parse_config("sip_rate_limit = { enabled = false }")
        self.assertFalse(config.sip_rate_limit.enabled)

    def test_invalid(self) -> None:
        """Non-positive rates, bursts below one and wrong types are start-up errors."""
        cases = [
            ("requests_per_second = 0", "sip_rate_limit.requests_per_second"),
            ("requests_per_second = -1.5", "sip_rate_limit.requests_per_second"),
            ('requests_per_second = "fast"', "sip_rate_limit.requests_per_second"),
            ("burst = 0", "sip_rate_limit.burst"),
            ("burst = 2.5", "sip_rate_limit.burst"),
            ('enabled = "yes"', "sip_rate_limit.enabled"),
            ('exempt = ["10.0.0.1/8"]', "sip_rate_limit.exempt[0]"),
        ]
        for line, path in cases:
            with self.subTest(line=line):
                with self.assertRaises(ConfigError) as cm:
                    parse_config(f"[sip_rate_limit]\n{line}\n")
                self.assertEqual(cm.exception.key_path, path)
