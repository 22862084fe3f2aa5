"""Tests for activecall.sip.security: token buckets per source, the ACL and the combined guard."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.config import SipAclConfig, SipRateLimitConfig, parse_config
from activecall.sip.security import (
    RateLimiter,
    SipAcl,
    SipGuard,
    Verdict,
    parse_network,
    registrar_hosts,
    source_key,
)


class RateLimiterTests(SynchronousTestCase):
    """Token-bucket behaviour and bounded memory."""

    def test_burst_then_drop(self) -> None:
        """A source gets exactly ``burst`` requests at one instant, then is refused."""
        limiter = RateLimiter(rate_per_s=10, burst=5)
        results = [limiter.allow("192.0.2.1", 0.0) for _ in range(7)]
        self.assertEqual(results, [True] * 5 + [False] * 2)

    def test_refill_at_rate(self) -> None:
        """An empty bucket gets one token back every 1/rate seconds, never more than burst."""
        limiter = RateLimiter(rate_per_s=10, burst=2)
        self.assertTrue(limiter.allow("192.0.2.1", 0.0))
        self.assertTrue(limiter.allow("192.0.2.1", 0.0))
        self.assertFalse(limiter.allow("192.0.2.1", 0.05))
        self.assertTrue(limiter.allow("192.0.2.1", 0.16))
        self.assertFalse(limiter.allow("192.0.2.1", 0.17))
        # A long pause refills to burst, not beyond.
        self.assertEqual([limiter.allow("192.0.2.1", 100.0) for _ in range(3)], [True, True, False])

    def test_sustained_rate(self) -> None:
        """A flood at 100/s from one source gets through at about the configured 20/s."""
        limiter = RateLimiter(rate_per_s=20, burst=40)
        passed = sum(limiter.allow("198.51.100.7", i / 100) for i in range(1000))  # 10 s
        self.assertTrue(40 + 195 <= passed <= 40 + 201, passed)

    def test_sources_are_independent(self) -> None:
        """One source exhausting its bucket does not affect another."""
        limiter = RateLimiter(rate_per_s=1, burst=1)
        self.assertTrue(limiter.allow("192.0.2.1", 0.0))
        self.assertFalse(limiter.allow("192.0.2.1", 0.0))
        self.assertTrue(limiter.allow("192.0.2.2", 0.0))

    def test_clock_stepping_back_mints_nothing(self) -> None:
        """A clock that goes backwards neither adds tokens nor raises."""
        limiter = RateLimiter(rate_per_s=1, burst=1)
        self.assertTrue(limiter.allow("192.0.2.1", 10.0))
        self.assertFalse(limiter.allow("192.0.2.1", 5.0))

    def test_idle_sources_forgotten(self) -> None:
        """Sources whose bucket has refilled are dropped, so memory follows the active set."""
        limiter = RateLimiter(rate_per_s=10, burst=20)  # full again after 2 s
        for i in range(100):
            limiter.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
        self.assertEqual(len(limiter), 100)
        limiter.allow("10.1.0.1", 1.0)
        self.assertEqual(len(limiter), 101)
        limiter.allow("10.1.0.2", 2.5)
        self.assertEqual(len(limiter), 2)  # the 100 from t=0 expired; 10.1.0.1 has not

    def test_max_sources_cap(self) -> None:
        """A flood from many sources never holds more than ``max_sources`` buckets."""
        limiter = RateLimiter(rate_per_s=1, burst=5, max_sources=50)
        for i in range(1000):
            self.assertTrue(limiter.allow(f"10.0.{i // 256}.{i % 256}", 0.0))
        self.assertEqual(len(limiter), 50)

    def test_ipv6_shares_a_slash64(self) -> None:
        """Addresses in one IPv6 /64 share a bucket; another /64 has its own."""
        limiter = RateLimiter(rate_per_s=1, burst=2)
        self.assertTrue(limiter.allow("2001:db8:1:2::1", 0.0))
        self.assertTrue(limiter.allow("2001:db8:1:2::ffff", 0.0))
        self.assertFalse(limiter.allow("2001:db8:1:2:abcd::9", 0.0))
        self.assertTrue(limiter.allow("2001:db8:1:3::1", 0.0))

    def test_source_key(self) -> None:
        """IPv4-mapped IPv6 counts as the IPv4 address; brackets and zone ids are ignored."""
        self.assertEqual(source_key("::ffff:192.0.2.9"), "192.0.2.9")
        self.assertEqual(source_key("[2001:db8::1]"), "2001:db8::/64")
        self.assertEqual(source_key("fe80::1%eth0"), "fe80::/64")

    def test_bad_arguments(self) -> None:
        """Non-positive rate, burst below one and a zero cap are rejected."""
        self.assertRaises(ValueError, RateLimiter, 0, 1)
        self.assertRaises(ValueError, RateLimiter, 1, 0.5)
        self.assertRaises(ValueError, RateLimiter, 1, 1, max_sources=0)


class AclTests(SynchronousTestCase):
    """Allow/deny evaluation order."""

    CASES = [
        # (allow, deny, source, expected)
        ((), (), "203.0.113.5", True),
        (("10.0.0.0/8",), (), "10.1.2.3", True),
        (("10.0.0.0/8",), (), "11.1.2.3", False),
        ((), ("192.0.2.0/24",), "192.0.2.44", False),
        ((), ("192.0.2.0/24",), "198.51.100.1", True),
        # deny wins even over a more specific allow
        (("192.0.2.44/32",), ("192.0.2.0/24",), "192.0.2.44", False),
        (("10.0.0.0/8",), ("10.9.0.0/16",), "10.9.1.1", False),
        (("10.0.0.0/8",), ("10.9.0.0/16",), "10.8.1.1", True),
        # families and mapped addresses
        (("2001:db8::/32",), (), "2001:db8::7", True),
        (("2001:db8::/32",), (), "10.0.0.1", False),
        (("10.0.0.0/8",), (), "::ffff:10.0.0.1", True),
        ((), ("10.0.0.0/8",), "::ffff:10.0.0.1", False),
        # garbage source with a non-empty list
        (("10.0.0.0/8",), (), "not-an-ip", False),
    ]

    def test_table(self) -> None:
        """Deny wins, an empty allow list admits all, otherwise allow must match."""
        for allow, deny, source, expected in self.CASES:
            with self.subTest(allow=allow, deny=deny, source=source):
                self.assertEqual(SipAcl(allow, deny).allows(source), expected)

    def test_open(self) -> None:
        """An ACL without entries is open and admits even unparseable sources."""
        self.assertTrue(SipAcl().is_open)
        self.assertTrue(SipAcl().allows("whatever"))
        self.assertFalse(SipAcl(deny=["192.0.2.0/24"]).is_open)

    def test_parse_network(self) -> None:
        """Bare addresses are host networks; host bits set are an error."""
        self.assertEqual(str(parse_network("192.0.2.1")), "192.0.2.1/32")
        self.assertEqual(str(parse_network(" 2001:db8::/32 ")), "2001:db8::/32")
        self.assertRaises(ValueError, parse_network, "10.0.0.1/8")
        self.assertRaises(ValueError, parse_network, "10.0.0.0/33")


class GuardTests(SynchronousTestCase):
    """The ACL and limiter combined, with counters."""

    def test_acl_before_rate(self) -> None:
        """A denied source is counted as denied and does not consume rate tokens."""
        guard = SipGuard(SipAcl(deny=["192.0.2.0/24"]), RateLimiter(1, 1))
        self.assertEqual(guard.admit("192.0.2.1", 0.0), Verdict.DENIED)
        self.assertEqual(guard.admit("198.51.100.1", 0.0), Verdict.ADMIT)
        self.assertEqual(guard.admit("198.51.100.1", 0.0), Verdict.RATE_LIMITED)
        self.assertEqual((guard.denied, guard.rate_limited), (1, 1))
        assert guard.limiter is not None
        self.assertEqual(len(guard.limiter), 1)

    def test_exempt_skips_limit_not_acl(self) -> None:
        """Exempt networks are never rate limited but are still subject to the ACL."""
        guard = SipGuard(
            SipAcl(deny=["10.9.0.0/16"]), RateLimiter(1, 1),
            exempt=(parse_network("10.0.0.0/8"),),
        )
        self.assertEqual([guard.admit("10.1.1.1", 0.0) for _ in range(5)], [Verdict.ADMIT] * 5)
        self.assertEqual(guard.admit("10.9.1.1", 0.0), Verdict.DENIED)

    def test_from_config_defaults(self) -> None:
        """The default configuration has an open ACL and a 50/s, 200-burst limiter."""
        config = parse_config("")
        guard = SipGuard.from_config(config.sip_acl, config.sip_rate_limit)
        self.assertTrue(guard.acl.is_open)
        assert guard.limiter is not None
        self.assertEqual((guard.limiter.rate_per_s, guard.limiter.burst), (50.0, 200.0))
        verdicts = [guard.admit("203.0.113.1", 0.0) for _ in range(201)]
        self.assertEqual(verdicts.count(Verdict.ADMIT), 200)

    def test_from_config_disabled(self) -> None:
        """``enabled = false`` leaves only the ACL."""
        guard = SipGuard.from_config(
            SipAclConfig(allow=(parse_network("10.0.0.0/8"),)), SipRateLimitConfig(enabled=False)
        )
        self.assertIsNone(guard.limiter)
        self.assertEqual([guard.admit("10.0.0.1", 0.0) for _ in range(500)], [Verdict.ADMIT] * 500)
        self.assertEqual(guard.admit("11.0.0.1", 0.0), Verdict.DENIED)

    def test_allow_list_and_trusted_bypass_limit(self) -> None:
        """ACL allow-listed sources and trusted registrar addresses skip the rate limit, not the deny list."""
        guard = SipGuard(SipAcl(allow=["10.0.0.0/8", "192.0.2.5"], deny=["10.9.0.0/16"]), RateLimiter(1, 1))
        self.assertEqual([guard.limit("10.1.1.1", 0.0) for _ in range(5)], [Verdict.ADMIT] * 5)
        self.assertEqual(guard.admit("10.9.1.1", 0.0), Verdict.DENIED)
        open_guard = SipGuard(SipAcl(), RateLimiter(1, 1))
        open_guard.trust("::ffff:198.51.100.4")
        open_guard.trust("not an ip")
        self.assertEqual([open_guard.admit("198.51.100.4", 0.0) for _ in range(5)], [Verdict.ADMIT] * 5)
        self.assertEqual([open_guard.admit("198.51.100.5", 0.0) for _ in range(2)],
                         [Verdict.ADMIT, Verdict.RATE_LIMITED])

    def test_two_hooks_charge_the_remembered_source(self) -> None:
        """source_admitted runs the ACL and remembers the source; admit_new_request charges that source."""
        guard = SipGuard(SipAcl(deny=["192.0.2.0/24"]), RateLimiter(1, 1))
        self.assertTrue(guard.admit_new_request())  # no source seen yet
        self.assertFalse(guard.source_admitted("192.0.2.1", 0.0))
        self.assertTrue(guard.source_admitted("198.51.100.1", 0.0))
        self.assertEqual((guard.admit_new_request(), guard.admit_new_request()), (True, False))
        self.assertTrue(guard.source_admitted("198.51.100.2", 0.0))
        self.assertTrue(guard.admit_new_request())
        self.assertEqual((guard.denied, guard.rate_limited), (1, 1))

    def test_registrar_hosts(self) -> None:
        """Registrar URIs give their hosts (IPv6 without brackets), once each."""
        self.assertEqual(
            registrar_hosts(["sip:pbx.example.org:5060", "sips:10.0.0.9;transport=tls", "sip:[2001:db8::1]:5080",
                             "sip:pbx.example.org"]),
            ["pbx.example.org", "10.0.0.9", "2001:db8::1"])
