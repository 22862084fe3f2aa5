"""SIP security basics: a per-source request rate limit and an allow/deny list of networks.

Pure module: no sockets, no clock (``now`` is passed in), stdlib ``ipaddress`` only.

Two checks, at two moments (docs/config-security.md):

* the **ACL** is asked for every *request* datagram before it costs a parse
  (:meth:`SipGuard.source_admitted`, the ``SipStack`` ``admit`` hook);
* the **rate limit** counts only requests that *start something*: an
  out-of-dialog INVITE, REGISTER, OPTIONS, MESSAGE, SUBSCRIBE, NOTIFY ... (no
  To tag, or a To tag naming no live dialog).  ACK, CANCEL and requests inside
  a live dialog never count, so a trunk's ACKs and BYEs do not eat the budget
  of its new calls.  The user agent classifies the parsed request and asks
  :meth:`SipGuard.admit_new_request`, which charges the source the stack just
  passed to :meth:`source_admitted` (both run synchronously for one datagram).
  Sources in ``exempt``, in the ACL ``allow`` list or trusted as a configured
  registrar (:meth:`SipGuard.trust`) skip the rate limit, never the ACL.

Responses are never filtered by the ACL: they only match transactions we
started, and a registrar or carrier we call out to need not be on the allow list.

A third, coarse check runs first, on every datagram (requests, responses and
garbage alike, :meth:`SipGuard.datagram_allowed`): a per-source budget of
``DATAGRAM_BUDGET_FACTOR`` times the request rate and burst.  It is far above
what a trunk's in-dialog traffic needs (an ACK, a BYE, a few responses per
call) and only exists so that a flood of datagrams that would each cost a
parse is dropped for the price of a dictionary lookup.  A source whose
unparseable messages exceed the request rate is muted for ``MUTE_S``.

Why drop silently rather than answer ``403``/``503``:

* an answer confirms to a scanner that a SIP service listens here and gives it
  a User-Agent to fingerprint;
* answering spoofed-source UDP makes us a reflector, and answering a flood
  costs the very work the limit is there to save;
* legitimate UDP clients retransmit (Timer A/E), so a request dropped by the
  rate limit is retried after T1, 2*T1... and gets in once tokens are back.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

from activecall.config import SipAclConfig, SipRateLimitConfig

__all__ = [
    "Network",
    "parse_network",
    "source_key",
    "RateLimiter",
    "SipAcl",
    "Verdict",
    "SipGuard",
    "DEFAULT_MAX_SOURCES",
    "registrar_hosts",
]

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

# Enough for every phone of a large site plus a scan from a few /16s; ~200 bytes each.
DEFAULT_MAX_SOURCES = 65536


def parse_network(text: str) -> Network:
    """Parse ``"10.0.0.0/8"``, ``"2001:db8::/32"`` or a bare address (a /32 or /128).

    Host bits set (``"10.0.0.1/8"``) are an error rather than silently masked,
    so a typo in an ACL does not widen or narrow it unnoticed.
    """
    return ipaddress.ip_network(text.strip(), strict=True)


def _address(ip: str) -> _Address:
    """Parse a source address; IPv4-mapped IPv6 (``::ffff:a.b.c.d``) becomes IPv4."""
    host = ip[1:-1] if ip.startswith("[") else ip
    addr = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def source_key(ip: str) -> str:
    """The rate-limit bucket of a source: the IPv4 address, or the IPv6 /64 it is in.

    One IPv6 host usually owns a whole /64 and can rotate through it, so
    counting per address would let a single scanner escape the limit.
    """
    addr = _address(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return str(addr)


class RateLimiter:
    """Token bucket per source: ``burst`` requests at once, refilled at ``rate_per_s``.

    Memory is bounded two ways.  A source idle long enough for its bucket to be
    full again (``burst / rate_per_s`` seconds) is forgotten, which changes
    nothing since a new source starts with a full bucket; buckets are kept in
    least-recently-seen order so that sweep is O(expired).  And at most
    ``max_sources`` buckets are kept: under a flood from more sources than
    that, the least recently seen are dropped first (those sources simply get
    a fresh bucket if they come back).
    """

    __slots__ = ("rate_per_s", "burst", "max_sources", "_buckets", "_full_after_s")

    def __init__(
        self, rate_per_s: float, burst: float, *, max_sources: int = DEFAULT_MAX_SOURCES
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if max_sources < 1:
            raise ValueError("max_sources must be at least 1")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.max_sources = max_sources
        # key -> [tokens, last_seen]; ordered by last_seen (oldest first).
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._full_after_s = self.burst / self.rate_per_s

    def __len__(self) -> int:
        return len(self._buckets)

    def _expire(self, now: float) -> None:
        """Forget sources whose bucket has refilled completely."""
        buckets = self._buckets
        while buckets:
            key, bucket = next(iter(buckets.items()))
            if now - bucket[1] < self._full_after_s:
                break
            del buckets[key]

    def allow(self, ip: str, now: float) -> bool:
        """Take one token from ``ip``'s bucket; False when it is empty (drop the request).

        ``ip`` must be an IP literal (as a transport reports it); IPv6 sources
        share one bucket per /64 (:func:`source_key`).
        """
        self._expire(now)
        key = source_key(ip)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            bucket = [self.burst, now]
            self._buckets[key] = bucket
        else:
            # A clock that steps back must not mint tokens or stall refills.
            elapsed = max(0.0, now - bucket[1])
            bucket[0] = min(self.burst, bucket[0] + elapsed * self.rate_per_s)
            bucket[1] = now
            self._buckets.move_to_end(key)
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True
        return False


class SipAcl:
    """Allow/deny lists of networks for SIP request sources.

    Evaluation order (documented in docs/config-security.md):

    1. a source in any ``deny`` network is denied: deny always wins, however
       specific an ``allow`` entry is;
    2. otherwise, an empty ``allow`` list admits every source;
    3. otherwise the source must be in some ``allow`` network.

    IPv4-mapped IPv6 sources are checked as IPv4.  An unparseable source is denied.
    """

    __slots__ = ("allow", "deny")

    def __init__(
        self, allow: Iterable[Network | str] = (), deny: Iterable[Network | str] = ()
    ) -> None:
        self.allow: tuple[Network, ...] = tuple(
            n if not isinstance(n, str) else parse_network(n) for n in allow
        )
        self.deny: tuple[Network, ...] = tuple(
            n if not isinstance(n, str) else parse_network(n) for n in deny
        )

    @property
    def is_open(self) -> bool:
        """True when the lists are both empty (every source allowed, nothing to check)."""
        return not self.allow and not self.deny

    def allows(self, ip: str) -> bool:
        """Whether requests from ``ip`` may be processed."""
        if self.is_open:
            return True
        try:
            addr = _address(ip)
        except ValueError:
            return False
        if any(addr in net for net in self.deny):
            return False
        return not self.allow or any(addr in net for net in self.allow)


class Verdict(enum.Enum):
    """What to do with one incoming request."""

    ADMIT = "admit"
    DENIED = "denied"  # by the ACL
    RATE_LIMITED = "rate_limited"


def registrar_hosts(servers: Iterable[str]) -> list[str]:
    """The hosts of registrar URIs (``sip:pbx.example.org:5060;transport=tcp`` → ``pbx.example.org``).

    IP literals come back as they are; names are for the adapter to resolve
    and pass to :meth:`SipGuard.trust`.
    """
    hosts: list[str] = []
    for server in servers:
        rest = server.split(":", 1)[1] if server[:4].lower() in ("sip:", "sips") else server
        rest = rest.split(";", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]
        if rest.startswith("["):
            host = rest[1:rest.find("]")] if "]" in rest else rest[1:]
        else:
            host = rest.split(":", 1)[0]
        if host and host not in hosts:
            hosts.append(host)
    return hosts


# Datagrams per source allowed per request the rate limit admits (see the module docstring).
DATAGRAM_BUDGET_FACTOR = 20
# How long a source that floods us with unparseable messages is ignored.
MUTE_S = 1.0


@dataclass
class SipGuard:
    """The ACL, then the rate limit, with drop counters for /metrics and logs.

    ``limiter`` None disables rate limiting.  Sources in ``exempt`` (e.g. the
    carrier's trunk addresses), in the ACL ``allow`` list and registrar addresses
    given to :meth:`trust` skip the limiter but not the ACL.
    """

    acl: SipAcl
    limiter: RateLimiter | None
    exempt: tuple[Network, ...] = ()
    denied: int = 0
    rate_limited: int = 0
    trusted: set[_Address] = field(default_factory=set)
    # The coarse per-source datagram budget checked before anything is parsed.
    datagrams: RateLimiter | None = None
    # Unparseable messages per source, at the request rate: beyond it the source is muted.
    parse_errors: RateLimiter | None = None
    flooded: int = 0
    # Source -> when its datagram bucket has a token again: a flood's datagrams are dropped
    # with one dict lookup, without even parsing the address.
    _over_budget: dict[str, float] = field(default_factory=dict, repr=False)
    # The source of the datagram being processed (source_admitted → admit_new_request).
    _source: str | None = field(default=None, repr=False)
    _source_at: float = field(default=0.0, repr=False)

    @classmethod
    def from_config(
        cls, acl: SipAclConfig, rate_limit: SipRateLimitConfig,
        *, max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> SipGuard:
        """Build the guard from ``Config.sip_acl`` and ``Config.sip_rate_limit``."""
        if not rate_limit.enabled:
            return cls(SipAcl(acl.allow, acl.deny), None, rate_limit.exempt)
        limiter = RateLimiter(rate_limit.requests_per_second, rate_limit.burst, max_sources=max_sources)
        datagrams = RateLimiter(rate_limit.requests_per_second * DATAGRAM_BUDGET_FACTOR,
                                rate_limit.burst * DATAGRAM_BUDGET_FACTOR, max_sources=max_sources)
        parse_errors = RateLimiter(rate_limit.requests_per_second, rate_limit.burst, max_sources=max_sources)
        return cls(SipAcl(acl.allow, acl.deny), limiter, rate_limit.exempt, datagrams=datagrams,
                   parse_errors=parse_errors)

    def trust(self, ip: str) -> bool:
        """Let ``ip`` (a configured registrar's address) skip the rate limit; False (ignored) if not an IP literal."""
        try:
            self.trusted.add(_address(ip))
        except ValueError:
            return False
        return True

    def bypasses_limit(self, ip: str) -> bool:
        """Whether ``ip`` is exempt, on the ACL allow list or a trusted registrar."""
        if not self.exempt and not self.acl.allow and not self.trusted:
            return False
        try:
            addr = _address(ip)
        except ValueError:
            return False
        return (addr in self.trusted or any(addr in net for net in self.exempt)
                or any(addr in net for net in self.acl.allow))

    def check_source(self, ip: str) -> Verdict:
        """The ACL alone: ``ADMIT`` or ``DENIED`` (counted)."""
        if not self.acl.allows(ip):
            self.denied += 1
            return Verdict.DENIED
        return Verdict.ADMIT

    def limit(self, ip: str, now: float) -> Verdict:
        """The rate limit alone: take a token from ``ip``'s bucket unless it bypasses the limit."""
        if self.limiter is None or self.bypasses_limit(ip):
            return Verdict.ADMIT
        try:
            allowed = self.limiter.allow(ip, now)
        except ValueError:  # not an IP literal: the ACL was open; count it as one bucket
            allowed = self.limiter.allow("0.0.0.0", now)
        if allowed:
            return Verdict.ADMIT
        self.rate_limited += 1
        return Verdict.RATE_LIMITED

    def admit(self, ip: str, now: float) -> Verdict:
        """Classify a request from ``ip`` received at ``now`` as if every request counted; only ``ADMIT`` goes on."""
        verdict = self.check_source(ip)
        if verdict is not Verdict.ADMIT:
            return verdict
        return self.limit(ip, now)

    # ------------------------------------------------------------ the daemon's four hooks

    def parse_failed(self, ip: str, now: float) -> None:
        """``SipStack(penalize=...)``: ``ip`` sent garbage; past the request rate of it, mute it for a second.

        A parse of junk costs far more than the budget check, and no SIP peer sends
        dozens of unparseable messages a second.
        """
        if self.parse_errors is None or self.bypasses_limit(ip):
            return
        try:
            allowed = self.parse_errors.allow(ip, now)
        except ValueError:
            allowed = self.parse_errors.allow("0.0.0.0", now)
        if not allowed:
            self._mute(ip, now + MUTE_S)

    def _mute(self, ip: str, until: float) -> None:
        if self.datagrams is not None and len(self._over_budget) >= self.datagrams.max_sources:
            self._over_budget.clear()
        self._over_budget[ip] = max(until, self._over_budget.get(ip, 0.0))

    def datagram_allowed(self, ip: str, now: float) -> bool:
        """``SipStack(budget=...)``: any datagram from ``ip`` within its coarse budget, before a parse."""
        if self.datagrams is None:
            return True
        if now < self._over_budget.get(ip, 0.0):
            self.flooded += 1
            return False
        if self.bypasses_limit(ip):
            return True
        try:
            allowed = self.datagrams.allow(ip, now)
        except ValueError:
            allowed = self.datagrams.allow("0.0.0.0", now)
        if not allowed:
            self.flooded += 1
            self._mute(ip, now + 1.0 / self.datagrams.rate_per_s)
        return allowed

    def source_admitted(self, ip: str, now: float) -> bool:
        """``SipStack(admit=...)``: the ACL before parsing; remembers the source for :meth:`admit_new_request`."""
        self._source, self._source_at = ip, now
        return self.check_source(ip) is Verdict.ADMIT

    def admit_new_request(self, request: object = None) -> bool:
        """``SipUserAgent.admit_new_request``: charge the request that starts something to its source.

        The source is the one last passed to :meth:`source_admitted`; with none
        (a stack without the hook) the request is admitted.
        """
        if self._source is None:
            return True
        return self.limit(self._source, self._source_at) is Verdict.ADMIT
