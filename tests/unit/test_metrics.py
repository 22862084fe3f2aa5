"""Tests for activecall.metrics: the registry, observed metrics and the scrape-time collector."""

from __future__ import annotations

import random
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.handlers.pending import PendingCalls
from activecall.ids import IdSource
from activecall.media.clock import MediaClock
from activecall.metrics import DaemonCollector, DaemonMetrics
from activecall.sip.message import parse_message
from activecall.sip.security import RateLimiter, SipAcl, SipGuard
from activecall.sip.transport import SipDatagramProtocol, SipStack
from activecall.sip.useragent import SipUserAgent
from activecall.testing_sip import AutoAnswerHandler, MemoryDatagramTransport, minimal_sdp


def samples(m: DaemonMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the exposition the way Prometheus would: (sample name, sorted labels) -> value."""
    body, content_type = m.render()
    assert content_type.startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class FakeReceiverStats:
    jitter = 80.0  # RTP timestamp units


class FakeLeg:
    """The parts of an RtpLeg the collector reads."""

    def __init__(self, rx: int, tx: int, lost: int) -> None:
        self._stats = {"rx_packets": rx, "tx_packets": tx, "rx_bytes": rx * 172, "tx_bytes": tx * 172,
                       "rtp_lost": lost, "jitter_lost": 1, "rx_malformed": 0, "rx_srtp_errors": 0,
                       "tx_errors": 0}

        class Receiver:
            current = FakeReceiverStats()

        class Session:
            receiver = Receiver()

        class Negotiated:
            clock_rate_hz = 8000

        self._session = Session()
        self.negotiated = Negotiated()

    def stats(self) -> dict[str, Any]:
        return self._stats


class FakeEngine:
    def __init__(self, legs: list[FakeLeg], retired: dict[str, int] | None = None) -> None:
        self._legs = legs
        self.retired_stats = retired or {}
        self.late_frames = 3

    def legs(self) -> list[FakeLeg]:
        return list(self._legs)


class DaemonMetricsTests(SynchronousTestCase):
    """Observed metrics and the text exposition."""

    def test_own_registry_and_format(self) -> None:
        """Each DaemonMetrics has its own registry (two can coexist) and renders the Prometheus text format."""
        a, b = DaemonMetrics(), DaemonMetrics()
        a.tick_lateness.observe(0.0003)
        self.assertEqual(samples(a)[("activecall_media_tick_lateness_seconds_count", ())], 1.0)
        self.assertEqual(samples(b)[("activecall_media_tick_lateness_seconds_count", ())], 0.0)

    def test_observe_provider(self) -> None:
        """observe_provider records latency for successes and counts errors."""
        m = DaemonMetrics()
        m.observe_provider("tts", "openai", 0.3)
        m.observe_provider("tts", "openai", None, error=True)
        got = samples(m)
        labels = (("kind", "tts"), ("provider", "openai"))
        self.assertEqual(got[("activecall_provider_latency_seconds_count", labels)], 1.0)
        self.assertEqual(got[("activecall_provider_errors_total", labels)], 1.0)

    def test_media_clock_observes_lateness_once_per_tick(self) -> None:
        """The media clock reports each tick's lateness after the frame slot it serves."""
        clock = Clock()
        seen: list[float] = []
        mc = MediaClock(clock, observe_lateness=seen.append)

        class Ticker:
            def media_tick(self, frames: int) -> None:
                pass

        mc.subscribe(Ticker())
        clock.advance(0.02)
        clock.advance(0.065)  # the reactor was late: slot 2 at 0.04, tick at 0.085
        self.assertEqual(len(seen), 2)
        self.assertAlmostEqual(seen[0], 0.0)
        self.assertAlmostEqual(seen[1], 0.045)
        mc.stop()


class CollectorTests(SynchronousTestCase):
    """Scrape-time values from the SIP stack, user agent, guard, pending calls and RTP legs."""

    def test_sip_calls_and_counters(self) -> None:
        """After a call is answered and an OPTIONS is refused by the rate limit, /metrics shows both."""
        clock = Clock()
        ids = IdSource(random.Random(7))
        guard = SipGuard(SipAcl(), RateLimiter(1, 1))
        stack = SipStack(clock, ids, shards=2, admit=guard.source_admitted)
        ua = SipUserAgent(stack, ids=ids, handler=AutoAnswerHandler(), admit_new_request=guard.admit_new_request)
        proto = SipDatagramProtocol(stack)
        transport = MemoryDatagramTransport(("10.0.0.1", 5060))
        proto.makeConnection(transport)  # type: ignore[arg-type]
        stack.add_listener("udp", "10.0.0.1", 5060, proto)
        sdp = minimal_sdp("10.0.0.2").decode()
        invite = (f"INVITE sip:a@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5070;branch=z9hG4bK1\r\n"
                  f"From: <sip:b@10.0.0.2>;tag=f1\r\nTo: <sip:a@10.0.0.1>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n"
                  f"Contact: <sip:b@10.0.0.2:5070>\r\nContent-Type: application/sdp\r\n"
                  f"Content-Length: {len(sdp)}\r\n\r\n{sdp}").encode()
        proto.datagramReceived(invite, ("10.0.0.2", 5070))
        proto.datagramReceived(invite.replace(b"INVITE", b"OPTIONS").replace(b"c1", b"c2")
                               .replace(b"z9hG4bK1", b"z9hG4bK2"), ("10.0.0.2", 5070))
        self.assertEqual([parse_message(d).status for d, _ in transport.written], [200])
        pending = PendingCalls(clock, 60.0)
        m = DaemonMetrics()
        m.add_collector(DaemonCollector(user_agent=ua, stack=stack, guard=guard, pending=pending, sessions=[],
                                        engine=FakeEngine([FakeLeg(100, 90, 2), FakeLeg(50, 50, 0)],
                                                          retired={"rx_packets": 1000, "rtp_lost": 5}),
                                        media_clock=MediaClock(clock)))
        got = samples(m)
        self.assertEqual(got[("activecall_calls", (("direction", "inbound"), ("state", "answered")))], 1.0)
        self.assertEqual(got[("activecall_calls", (("direction", "outbound"), ("state", "ringing")))], 0.0)
        self.assertEqual(got[("activecall_sip_requests_total", (("direction", "in"), ("method", "INVITE")))], 1.0)
        self.assertEqual(got[("activecall_sip_responses_total",
                              (("code", "200"), ("direction", "out"), ("method", "INVITE")))], 1.0)
        self.assertEqual(got[("activecall_sip_refused_total", (("reason", "rate_limited"),))], 1.0)
        self.assertEqual(got[("activecall_sip_transport_messages_total", (("outcome", "received"),))], 2.0)
        self.assertEqual(got[("activecall_calls_pending", ())], 0.0)
        self.assertEqual(got[("activecall_rtp_legs", ())], 2.0)
        # Totals include what the ended legs counted: they never go down.
        self.assertEqual(got[("activecall_rtp_packets_total", (("direction", "rx"),))], 1150.0)
        self.assertEqual(got[("activecall_rtp_lost_packets_total", ())], 7.0)
        self.assertAlmostEqual(got[("activecall_rtp_jitter_seconds", (("stat", "max"),))], 0.01)
        self.assertEqual(got[("activecall_media_late_frames_total", ())], 3.0)

    def test_unknown_methods_share_one_label(self) -> None:
        """A method name made up by a peer is counted as "other": the label set stays bounded."""
        clock = Clock()
        ids = IdSource(random.Random(7))
        stack = SipStack(clock, ids, shards=1)
        ua = SipUserAgent(stack, ids=ids)
        proto = SipDatagramProtocol(stack)
        proto.makeConnection(MemoryDatagramTransport(("10.0.0.1", 5060)))  # type: ignore[arg-type]
        stack.add_listener("udp", "10.0.0.1", 5060, proto)
        for i in range(20):
            proto.datagramReceived(
                (f"X{i}FOO sip:a@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK{i}\r\n"
                 f"From: <sip:b@10.0.0.2>;tag=f\r\nTo: <sip:a@10.0.0.1>\r\nCall-ID: c{i}\r\nCSeq: 1 X{i}FOO\r\n"
                 f"Content-Length: 0\r\n\r\n").encode(), ("10.0.0.2", 5060))
        self.assertEqual(dict(ua.request_counts), {("in", "other"): 20})

    def test_empty_collector(self) -> None:
        """With no sources the collector still renders (zero calls)."""
        m = DaemonMetrics()
        m.add_collector(DaemonCollector())
        self.assertIn(b"activecall_calls", m.render()[0])


class TtsProviderMetricsTests(SynchronousTestCase):
    """The call controller reports TTS time to first byte and failures through observe_provider."""

    def run_tts(self, fail: bool) -> DaemonMetrics:


        from activecall.call.controller import CallController
        from activecall.control import commands as cmds
        from activecall.control.dispatch import execute
        from activecall.legs.websocket import ControlSocketAudio, WebSocketDialer
        from activecall.speech.interfaces import SynthesisError
        from activecall.testing import fake_call_services, FakeSynthesizer

        m = DaemonMetrics()
        clock = Clock()
        synth = FakeSynthesizer(clock, ms_per_char=20, chunk_ms=100, chunk_interval_s=0.01)
        if fail:
            synth.fail_with = SynthesisError("engine exploded")
        services = fake_call_services(clock, synthesizer=synth, observe_provider=m.observe_provider)

        class Observer:
            def call_event(self, event: Any) -> None:
                pass

            def client_audio(self, data: bytes) -> None:
                pass

            def call_finished(self) -> None:
                pass

        port = ControlSocketAudio(lambda data: None)
        dialers = {"webSocket": WebSocketDialer(port, services.media_clock, clock, services.ids)}
        c = CallController("s.m", "sst", "webSocket", services, Observer(), dialers=dialers)
        execute(c, cmds.command_from_object({"command": "invite", "option": {"codec": "pcm", "tts": {"provider": "fake"}}}))
        execute(c, cmds.command_from_object({"command": "tts", "text": "x" * 20, "playId": "p", "endOfStream": True}))
        for _ in range(200):
            clock.advance(0.01)
        return m

    def test_success_observes_latency(self) -> None:
        """A synthesized sentence adds one latency observation for tts/fake and no error."""
        got = samples(self.run_tts(fail=False))
        labels = (("kind", "tts"), ("provider", "fake"))
        self.assertEqual(got[("activecall_provider_latency_seconds_count", labels)], 1.0)
        self.assertNotIn(("activecall_provider_errors_total", labels), got)

    def test_failure_counts_an_error(self) -> None:
        """A failing synthesis counts one tts/fake error."""
        got = samples(self.run_tts(fail=True))
        self.assertEqual(got[("activecall_provider_errors_total", (("kind", "tts"), ("provider", "fake")))], 1.0)
