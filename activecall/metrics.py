"""Prometheus metrics for ``GET /metrics`` (docs/operations.md), built on ``prometheus-client``.

Adapter module without the reactor: it imports ``prometheus_client`` only and
reads the daemon's objects duck-typed, so nothing here reaches into Twisted.

Two kinds of metrics:

* **observed** ones, updated where the event happens, at most once per media
  tick or per provider request: the media tick lateness histogram
  (:attr:`DaemonMetrics.tick_lateness`, fed by ``MediaClock``) and provider
  latency/errors (:meth:`DaemonMetrics.observe_provider`, injected into the call layer);
* **collected** ones, read at scrape time by :class:`DaemonCollector` from the
  counters the SIP stack, user agent, guard, pending registry, sessions and
  RTP legs already keep.  Nothing is added to the per-packet path: RTP
  figures are sums over the legs of the calls in progress when scraped.

The daemon builds one :class:`DaemonMetrics` (its own ``CollectorRegistry``,
never the global default one) in ``tap.py`` and hands its ``observe_provider``
to the provider call sites (``CallServices.observe_provider``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "CpuMeter",
    "Capacity",
    "DaemonMetrics",
    "DaemonCollector",
    "TICK_LATENESS_BUCKETS_S",
]

# The tick is due every 20 ms: sub-ms is healthy, beyond a frame means missed frames.
TICK_LATENESS_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.1, 0.25, 1.0)
_PROVIDER_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_RTP_COUNTERS = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rtp_lost", "jitter_lost",
                 "rx_malformed", "rx_srtp_errors", "tx_errors")


class CpuMeter:
    """This process's CPU use (percent of one core) over the window since the previous reading.

    ``cpu_seconds`` (user + system time so far) and ``now`` (wall seconds) are injected;
    a reading less than ``min_window_s`` after the previous one returns that one again, so
    frequent probes neither cost nor jitter.
    """

    def __init__(self, cpu_seconds: Callable[[], float], now: Callable[[], float], min_window_s: float = 1.0) -> None:
        self._cpu_seconds = cpu_seconds
        self._now = now
        self._min_window_s = min_window_s
        self._at = now()
        self._cpu = cpu_seconds()
        self._percent = 0.0

    def percent(self) -> float:
        """CPU percent (100 = one core busy) over the last window."""
        now = self._now()
        if now - self._at >= self._min_window_s:
            cpu = self._cpu_seconds()
            self._percent = max(0.0, (cpu - self._cpu) / (now - self._at) * 100.0)
            self._at, self._cpu = now, cpu
        return self._percent


class Capacity:
    """What the edge and an autoscaler read (``/health``, ``/metrics``): calls, the limit, CPU, drain.

    ``user_agent`` (calls in progress, ``max_calls``), ``sessions`` (len) and ``draining`` are read
    duck-typed at each reading.
    """

    def __init__(self, *, user_agent: Any = None, sessions: Any = None, cpu: CpuMeter | None = None,
                 draining: Callable[[], bool] = lambda: False, node: str | None = None) -> None:
        self.user_agent = user_agent
        self.sessions = sessions
        self.cpu = cpu
        self.draining = draining
        self.node = node

    def snapshot(self) -> dict[str, Any]:
        """``{"status", "calls", "max_calls", "sessions", "cpu_percent", "node"?}``; status ``draining`` on drain."""
        ua = self.user_agent
        out: dict[str, Any] = {
            "status": "draining" if self.draining() else "ok",
            "calls": ua.calls_in_progress() if ua is not None else 0,
            "max_calls": ua.max_calls if ua is not None else None,
            "sessions": len(self.sessions) if self.sessions is not None else 0,
            "cpu_percent": round(self.cpu.percent(), 1) if self.cpu is not None else None,
        }
        if self.node is not None:
            out["node"] = self.node
        return out


class DaemonMetrics:
    """The daemon's registry, its observed metrics and ``render()`` for the HTTP route."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.tick_lateness = Histogram(
            "activecall_media_tick_lateness_seconds",
            "How late each 20 ms media clock tick ran after its due time.",
            buckets=TICK_LATENESS_BUCKETS_S, registry=self.registry)
        self.provider_latency = Histogram(
            "activecall_provider_latency_seconds",
            "Time to first byte of speech provider requests (TTS synthesis, ASR ...).",
            ["kind", "provider"], buckets=_PROVIDER_BUCKETS_S, registry=self.registry)
        self.provider_errors = Counter(
            "activecall_provider_errors",
            "Speech provider requests that failed.",
            ["kind", "provider"], registry=self.registry)

    def add_collector(self, collector: Collector) -> None:
        """Register a scrape-time collector (e.g. :class:`DaemonCollector`)."""
        self.registry.register(collector)

    def observe_provider(self, kind: str, provider: str, seconds: float | None, error: bool = False) -> None:
        """One provider request: its latency (time to first byte), and whether it failed."""
        if error:
            self.provider_errors.labels(kind, provider).inc()
        if seconds is not None and not error:
            self.provider_latency.labels(kind, provider).observe(max(0.0, seconds))

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _jitter_s(leg: Any) -> float | None:
    """The RFC 3550 interarrival jitter of a leg's current source, in seconds (None before packets)."""
    try:
        stats = leg._session.receiver.current
        rate = leg.negotiated.clock_rate_hz
    except AttributeError:
        return None
    if stats is None or not rate:
        return None
    return float(stats.jitter) / float(rate)


class DaemonCollector(Collector):
    """Reads the daemon's existing counters at scrape time; every source is optional.

    ``user_agent`` (SipUserAgent), ``stack`` (SipStack counters), ``guard``
    (SipGuard), ``pending`` (PendingCalls), ``sessions`` (SessionManager),
    ``engine`` (RtpMediaEngine, whose legs carry the RTP counters) and
    ``media_clock`` (MediaClock) and ``webrtc`` (the WebRTC dialer's ``open_peers``) are read duck-typed.
    """

    def __init__(self, *, user_agent: Any = None, stack: Any = None, guard: Any = None, pending: Any = None,
                 sessions: Any = None, engine: Any = None, media_clock: Any = None, webrtc: Any = None,
                 capacity: Capacity | None = None) -> None:
        self.webrtc = webrtc
        self.capacity = capacity
        self.user_agent = user_agent
        self.stack = stack
        self.guard = guard
        self.pending = pending
        self.sessions = sessions
        self.engine = engine
        self.media_clock = media_clock

    def describe(self) -> Iterable[Metric]:
        # Names are dynamic per source; let the registry skip up-front collision checks.
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._calls()
        yield from self._sip()
        yield from self._rtp()
        yield from self._media()

    # ------------------------------------------------------------ calls

    def _calls(self) -> Iterator[Metric]:
        calls = GaugeMetricFamily("activecall_calls", "SIP calls held now, by direction and state.",
                                  labels=["direction", "state"])
        ua = self.user_agent
        if ua is not None:
            counts = {("inbound", "ringing"): 0, ("inbound", "answered"): 0,
                      ("outbound", "ringing"): 0, ("outbound", "answered"): 0}
            for call in ua.dialogs():
                inbound = hasattr(call, "final_sent")
                if inbound:
                    counts[("inbound", "answered" if call.final_sent else "ringing")] += 1
                else:
                    counts[("outbound", "answered")] += 1
            counts[("outbound", "ringing")] = ua.calls_in_progress() - sum(counts.values())
            for (direction, state), n in counts.items():
                calls.add_metric([direction, state], max(0, n))
        yield calls
        if self.pending is not None:
            yield GaugeMetricFamily("activecall_calls_pending", "Inbound calls waiting for a webhook client.",
                                    value=len(self.pending))
            yield CounterMetricFamily("activecall_calls_pending_refused",
                                      "INVITEs answered 503 because max_pending_invites calls were waiting.",
                                      value=getattr(self.pending, "refused", 0))
        if self.sessions is not None:
            yield GaugeMetricFamily("activecall_sessions", "Control sessions open now.", value=len(self.sessions))
        if self.webrtc is not None:
            yield GaugeMetricFamily("activecall_webrtc_peers", "WebRTC peer connections open now.",
                                    value=self.webrtc.open_peers)
        if self.capacity is not None:
            snapshot = self.capacity.snapshot()
            if snapshot["max_calls"] is not None:
                yield GaugeMetricFamily("activecall_calls_limit", "[sip_limits] max_calls: SIP calls this node takes.",
                                        value=snapshot["max_calls"])
            if snapshot["cpu_percent"] is not None:
                yield GaugeMetricFamily("activecall_cpu_percent",
                                        "CPU used by the daemon since the previous reading (100 = one core).",
                                        value=snapshot["cpu_percent"])
            yield GaugeMetricFamily("activecall_draining", "1 while the node drains (SIGTERM): it takes no new calls.",
                                    value=1 if snapshot["status"] == "draining" else 0)

    # ------------------------------------------------------------ SIP

    def _sip(self) -> Iterator[Metric]:
        ua = self.user_agent
        if ua is not None:
            requests = CounterMetricFamily("activecall_sip_requests", "SIP requests by direction and method.",
                                           labels=["direction", "method"])
            for (direction, method), n in sorted(ua.request_counts.items()):
                requests.add_metric([direction, method], n)
            yield requests
            responses = CounterMetricFamily("activecall_sip_responses",
                                            "SIP responses by direction, method and status code.",
                                            labels=["direction", "method", "code"])
            for (direction, method, status), n in sorted(ua.response_counts.items()):
                responses.add_metric([direction, method, str(status)], n)
            yield responses
            counters = ua.counters
            invites = CounterMetricFamily("activecall_sip_invites", "Initial INVITEs by direction.",
                                          labels=["direction"])
            invites.add_metric(["in"], counters.get("invites_in", 0))
            invites.add_metric(["out"], counters.get("invites_out", 0))
            yield invites
            refused = CounterMetricFamily("activecall_sip_refused", "SIP requests refused, by reason.",
                                          labels=["reason"])
            refused.add_metric(["max_calls"], counters.get("rejected_max_calls", 0))
            refused.add_metric(["rate_limited"], counters.get("rate_limited", 0))
            if self.guard is not None:
                refused.add_metric(["acl_denied"], self.guard.denied)
                refused.add_metric(["datagram_budget"], self.guard.flooded)
            yield refused
        if self.stack is not None:
            messages = CounterMetricFamily("activecall_sip_transport_messages",
                                           "SIP datagrams/stream messages by outcome at the transport.",
                                           labels=["outcome"])
            for outcome, n in sorted(self.stack.counters.items()):
                messages.add_metric([outcome], n)
            yield messages
            yield GaugeMetricFamily("activecall_sip_transactions", "SIP transactions alive now.",
                                    value=self.stack.transactions)

    # ------------------------------------------------------------ RTP

    def _rtp(self) -> Iterator[Metric]:
        if self.engine is None:
            return
        legs = self.engine.legs()
        yield GaugeMetricFamily("activecall_rtp_legs", "RTP legs of calls in progress.", value=len(legs))
        # Running totals: the legs still up plus everything the ended ones counted.
        totals = {name: int(self.engine.retired_stats.get(name, 0)) for name in _RTP_COUNTERS}
        jitters: list[float] = []
        for leg in legs:
            try:
                stats = leg.stats()
            except Exception:  # a leg being torn down mid-scrape: skip it
                continue
            for name in totals:
                totals[name] += int(stats.get(name) or 0)
            jitter = _jitter_s(leg)
            if jitter is not None:
                jitters.append(jitter)
        packets = CounterMetricFamily("activecall_rtp_packets", "RTP packets received and sent.",
                                      labels=["direction"])
        packets.add_metric(["rx"], totals["rx_packets"])
        packets.add_metric(["tx"], totals["tx_packets"])
        yield packets
        octets = CounterMetricFamily("activecall_rtp_bytes", "RTP bytes received and sent.", labels=["direction"])
        octets.add_metric(["rx"], totals["rx_bytes"])
        octets.add_metric(["tx"], totals["tx_bytes"])
        yield octets
        yield CounterMetricFamily("activecall_rtp_lost_packets", "RTP packets lost (RFC 3550 cumulative).",
                                  value=totals["rtp_lost"])
        yield CounterMetricFamily("activecall_rtp_concealed_packets", "Packets the jitter buffers concealed.",
                                  value=totals["jitter_lost"])
        errors = CounterMetricFamily("activecall_rtp_errors", "RTP errors by kind.", labels=["kind"])
        errors.add_metric(["malformed"], totals["rx_malformed"])
        errors.add_metric(["srtp"], totals["rx_srtp_errors"])
        errors.add_metric(["send"], totals["tx_errors"])
        yield errors
        jitter = GaugeMetricFamily("activecall_rtp_jitter_seconds",
                                   "Interarrival jitter over the calls in progress.", labels=["stat"])
        jitter.add_metric(["max"], max(jitters) if jitters else 0.0)
        jitter.add_metric(["mean"], sum(jitters) / len(jitters) if jitters else 0.0)
        yield jitter

    # ------------------------------------------------------------ media clock

    def _media(self) -> Iterator[Metric]:
        if self.media_clock is not None:
            yield CounterMetricFamily("activecall_media_ticks", "Media clock ticks.",
                                      value=self.media_clock.ticks)
            yield CounterMetricFamily("activecall_media_late_ticks",
                                      "Media clock ticks that had to catch up missed frames.",
                                      value=self.media_clock.late_ticks)
        if self.engine is not None:
            yield CounterMetricFamily("activecall_media_late_frames",
                                      "Frames the RTP engine produced late after a stalled reactor.",
                                      value=getattr(self.engine, "late_frames", 0))
