"""Tests for activecall.legs.rtp: the RTP leg and the engine, on memory transports and a Clock."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import numpy as np
from twisted.internet.defer import succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from activecall.interfaces import ICallLeg
from activecall.media._audioop import audioop
from activecall.media.clock import MediaClock
from activecall.media.codecs import make_decoder, make_encoder
from activecall.media.dtmf_detect import InbandDtmfDetector
from activecall.sdp.negotiation import NegotiatedMedia
from activecall.legs.rtp import FRAME_BYTES, MAX_TX_BACKLOG, RtpLeg, RtpMediaEngine
from activecall.rtp.packet import (
    TelephoneEvent,
    build_rtp,
    is_rtcp,
    parse_rtcp,
    parse_rtp,
    parse_telephone_event,
    Bye,
    SenderReport,
)
from activecall.rtp.srtp import AES_CM_128_HMAC_SHA1_80, SrtpContext, generate_crypto
from activecall.rtp.transport import RtpEndpoint, RtpPortAllocator

PEER = ("192.0.2.10", 40000)
T0 = 1_700_000_000.0


class FakeUdpPort:
    """A bound UDP port recording writes."""

    def __init__(self, reactor: "FakeReactor", port: int, protocol: Any) -> None:
        self.reactor = reactor
        self.port = port
        self.protocol = protocol
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def stopListening(self) -> Any:
        del self.reactor.ports[self.port]
        return succeed(None)


class FakeReactor(Clock):
    """Clock plus an in-memory listenUDP."""

    def __init__(self) -> None:
        super().__init__()
        self.advance(T0)
        self.ports: dict[int, FakeUdpPort] = {}

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> FakeUdpPort:
        if port in self.ports:
            raise CannotListenError(interface, port, OSError("in use"))
        p = FakeUdpPort(self, port, protocol)
        self.ports[port] = p
        protocol.makeConnection(p)
        return p


def _neg(codec: str = "pcmu", pt: int = 0, rate: int = 8000, te: int | None = 101, **kw: Any) -> NegotiatedMedia:
    base = dict(
        remote_address=PEER[0], remote_port=PEER[1], remote_rtcp_address=PEER[0], remote_rtcp_port=PEER[1] + 1,
        codec=codec, payload_type=pt, clock_rate_hz=rate, telephone_event_pt=te, ptime_ms=20, direction="sendrecv",
    )
    base.update(kw)
    return NegotiatedMedia(**base)  # type: ignore[arg-type]


def _tone(freq: float, samples: int, rate: int, start: int = 0, amp: float = 8000.0) -> bytes:
    t = (np.arange(samples) + start) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def _power_at(pcm: bytes, freq: float, rate: int) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(float)
    t = np.arange(len(x)) / rate
    return float(abs(np.dot(x, np.exp(-2j * np.pi * freq * t))) / len(x))


class LegTestBase(SynchronousTestCase):
    """Builds a leg on a fake reactor; the peer injects packets and reads what we sent."""

    batch = True

    def make_leg(self, neg: NegotiatedMedia | None = None) -> RtpLeg:
        self.reactor = FakeReactor()
        self.media_clock = MediaClock(self.reactor)
        self.engine = RtpMediaEngine(self.reactor, self.media_clock, batch_g711=self.batch)
        self.alloc = RtpPortAllocator(30000, 30009)
        self.endpoint = RtpEndpoint(self.reactor, self.alloc)
        self.endpoint.start()
        self.audio: list[bytes] = []
        self.digits: list[str] = []
        self.ready = 0

        def ready() -> None:
            self.ready += 1

        self.leg = RtpLeg(
            self.engine, self.endpoint, neg or _neg(), clock=self.reactor, rng=random.Random(7),
            on_audio=self.audio.append, on_dtmf=self.digits.append, on_media_ready=ready,
        )
        self.rtp_port = self.reactor.ports[self.endpoint.local_port]
        self.rtcp_port = self.reactor.ports[self.endpoint.local_rtcp_port]
        return self.leg

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.reactor.advance(0.02)

    def inject(self, pt: int, seq: int, ts: int, payload: bytes, ssrc: int = 0xABC, marker: bool = False,
               src: tuple[str, int] = PEER) -> None:
        self.rtp_port.protocol.datagramReceived(build_rtp(pt, seq, ts, ssrc, payload, marker=marker), src)

    def sent_rtp(self) -> list[Any]:
        return [parse_rtp(d) for d, _ in self.rtp_port.sent if not is_rtcp(d)]


class ReceiveTests(LegTestBase):
    """Caller audio, DTMF and media readiness."""

    def _stream_tone(self, codec: str, pt: int, rate: int, frames: int, freq: float = 1000.0) -> None:
        enc = make_encoder(codec)
        sr = enc.sample_rate_hz
        n = sr // 50
        for i in range(frames):
            self.inject(pt, 100 + i, 5000 + i * (rate // 50), enc.encode(_tone(freq, n, sr, i * n)))
            self.tick()

    def test_implements_icallleg(self) -> None:
        """RtpLeg provides ICallLeg at 16 kHz with 640-byte frames."""
        leg = self.make_leg()
        verifyObject(ICallLeg, leg)
        self.assertEqual((leg.media_rate_hz, leg.frame_bytes), (16000, 640))

    def test_pcmu_tone_arrives_at_16k(self) -> None:
        """A 1 kHz PCMU tone comes out as 16 kHz frames carrying 1 kHz, one frame per tick."""
        self.make_leg()
        self._stream_tone("pcmu", 0, 8000, 50)
        self.assertEqual(len(self.audio), 50)
        self.assertTrue(all(len(f) == FRAME_BYTES for f in self.audio))
        tail = b"".join(self.audio[10:])
        self.assertGreater(_power_at(tail, 1000, 16000), 3000)
        self.assertLess(_power_at(tail, 3000, 16000), 50)
        self.assertEqual(self.ready, 1)
        self.assertEqual(self.leg.stats()["rx_audio_packets"], 50)

    def test_unbatched_g711_path(self) -> None:
        """With batching off, G.711 goes through the per-leg resampling codec and sounds the same."""
        self.batch = False
        self.make_leg()
        self._stream_tone("pcmu", 0, 8000, 30)
        self.assertGreater(_power_at(b"".join(self.audio[10:]), 1000, 16000), 3000)

    def test_g722_tone(self) -> None:
        """G.722 (RTP clock 8000, audio 16 kHz) decodes to the tone."""
        self.make_leg(_neg("g722", 9, 8000))
        self._stream_tone("g722", 9, 8000, 40, 2000.0)
        self.assertGreater(_power_at(b"".join(self.audio[10:]), 2000, 16000), 3000)

    def test_silence_delivered_without_packets(self) -> None:
        """Every tick delivers a frame, silence when nothing arrived; media_ready waits for a packet."""
        self.make_leg()
        self.tick(5)
        self.assertEqual(self.audio, [bytes(FRAME_BYTES)] * 5)
        self.assertEqual(self.ready, 0)

    def test_40ms_packets_are_split(self) -> None:
        """A peer sending 40 ms packets still yields one 20 ms frame per tick."""
        self.make_leg(_neg(remote_ptime_ms=40))
        enc = make_encoder("pcmu")
        for i in range(20):
            if i % 2 == 0:
                k = i // 2
                self.inject(0, 10 + k, k * 320, enc.encode(_tone(1000, 320, 8000, k * 320)))
            self.tick()
        self.assertEqual(len(self.audio), 20)
        self.assertGreater(_power_at(b"".join(self.audio[8:16]), 1000, 16000), 3000)

    def test_rfc4733_digit_once(self) -> None:
        """A telephone-event press (start, updates, three end packets) is one digit."""
        self.make_leg()
        for i, (end, dur) in enumerate([(False, 160), (False, 320), (True, 480), (True, 480), (True, 480)]):
            self.inject(101, 50 + i, 9000, TelephoneEvent(5, end, 10, dur).encode(), marker=i == 0)
        self.assertEqual(self.digits, ["5"])
        self.assertEqual(self.ready, 1)

    def test_inband_detection_without_telephone_event(self) -> None:
        """Without telephone-event, a DTMF tone in the audio is reported as a digit."""
        self.make_leg(_neg(te=None))
        enc = make_encoder("pcmu")
        from activecall.media.dtmf_detect import COL_HZ, ROW_HZ

        t = np.arange(8000) / 8000
        tone = (5000 * (np.sin(2 * np.pi * ROW_HZ[2] * t) + np.sin(2 * np.pi * COL_HZ[0] * t))).astype("<i2")
        pcm = np.concatenate([tone[:1200], np.zeros(2400, dtype="<i2")]).tobytes()
        for i in range(len(pcm) // 320):
            self.inject(0, i, i * 160, enc.encode(pcm[i * 320 : (i + 1) * 320]))
            self.tick()
        self.tick(5)
        self.assertEqual(self.digits, ["7"])

    def test_unknown_and_comfort_noise_payloads(self) -> None:
        """Payload types not negotiated are dropped at the socket (they cannot latch); comfort noise is accepted."""
        self.make_leg()
        self.inject(18, 1, 0, b"\x00" * 20)
        self.inject(13, 2, 160, b"\x40")
        stats = self.leg.stats()
        self.assertEqual((stats["rx_unexpected_pt"], stats["rx_unknown_pt"]), (1, 0))

    def test_ssrc_change_resets_stream(self) -> None:
        """A new SSRC replaces the old stream and its audio plays."""
        self.make_leg()
        enc = make_encoder("pcmu")
        for i in range(10):
            self.inject(0, i, i * 160, enc.encode(_tone(1000, 160, 8000, i * 160)), ssrc=1)
            self.tick()
        for i in range(20):
            self.inject(0, 5000 + i, 77 + i * 160, enc.encode(_tone(1000, 160, 8000, i * 160)), ssrc=2)
            self.tick()
        self.assertEqual(self.leg.session.receiver.current.ssrc, 2)  # type: ignore[union-attr]
        self.assertGreater(_power_at(b"".join(self.audio[-10:]), 1000, 16000), 3000)


class SendTests(LegTestBase):
    """Agent audio, timestamps across gaps, DTMF sending."""

    def test_one_packet_per_tick_with_true_timestamps(self) -> None:
        """Frames go out one per tick; a gap sends nothing but advances the timestamp and sets the marker."""
        self.make_leg()
        frame = _tone(1000, 320, 16000)
        for _ in range(3):
            self.leg.send_agent_audio(frame)
            self.tick()
        self.tick(4)
        self.leg.send_agent_audio(frame)
        self.tick()
        pkts = self.sent_rtp()
        self.assertEqual(len(pkts), 4)
        seqs = [p.sequence for p in pkts]
        self.assertEqual([(s - seqs[0]) & 0xFFFF for s in seqs], [0, 1, 2, 3])
        ts = [p.timestamp for p in pkts]
        self.assertEqual([(t - ts[0]) & 0xFFFFFFFF for t in ts], [0, 160, 320, 1120])
        self.assertEqual([p.marker for p in pkts], [True, False, False, True])
        self.assertEqual({p.payload_type for p in pkts}, {0})
        self.assertEqual({len(p.payload) for p in pkts}, {160})
        self.assertEqual(self.rtp_port.sent[0][1], PEER)
        self.assertEqual(pkts[0].ssrc, self.leg.ssrc)

    def test_sent_audio_is_the_tone(self) -> None:
        """The PCMU we send decodes to the agent's 1 kHz tone."""
        self.make_leg()
        for i in range(30):
            self.leg.send_agent_audio(_tone(1000, 320, 16000, i * 320))
            self.tick()
        dec = make_decoder("pcmu")
        pcm = b"".join(dec.decode(bytes(p.payload)) for p in self.sent_rtp()[5:])
        self.assertGreater(_power_at(pcm, 1000, 8000), 3000)

    def test_g722_and_opus_timestamps(self) -> None:
        """G.722 advances 160 per packet (8 kHz clock), Opus 960 (48 kHz)."""
        for codec, pt, rate, step in (("g722", 9, 8000, 160), ("opus", 111, 48000, 960)):
            with self.subTest(codec=codec):
                self.make_leg(_neg(codec, pt, rate))
                for _ in range(3):
                    self.leg.send_agent_audio(_tone(500, 320, 16000))
                    self.tick()
                ts = [p.timestamp for p in self.sent_rtp()]
                self.assertEqual([(t - ts[0]) & 0xFFFFFFFF for t in ts], [0, step, 2 * step])
                self.assertEqual({p.payload_type for p in self.sent_rtp()}, {pt})

    def test_late_tick_sends_every_frame(self) -> None:
        """After a reactor stall, the catch-up frames are all sent with consecutive timestamps."""
        self.make_leg()
        self.tick()
        for _ in range(3):
            self.leg.send_agent_audio(bytes(FRAME_BYTES))
        self.reactor.advance(0.061)
        ts = [p.timestamp for p in self.sent_rtp()]
        self.assertEqual([(t - ts[0]) & 0xFFFFFFFF for t in ts], [0, 160, 320])
        self.assertEqual(self.engine.late_frames, 2)

    def test_backlog_is_bounded(self) -> None:
        """Frames queued faster than they can be sent are dropped beyond the backlog limit."""
        self.make_leg()
        for _ in range(MAX_TX_BACKLOG + 3):
            self.leg.send_agent_audio(bytes(FRAME_BYTES))
        self.assertEqual(self.leg.stats()["tx_dropped_frames"], 3)

    def test_rfc4733_send(self) -> None:
        """send_dtmf sends telephone-event packets (marker first, same timestamp, end x3) instead of audio."""
        self.make_leg()
        self.leg.send_dtmf("9", duration_ms=60)
        for _ in range(8):
            self.leg.send_agent_audio(bytes(FRAME_BYTES))
            self.tick()
        te = [p for p in self.sent_rtp() if p.payload_type == 101]
        events = [parse_telephone_event(p.payload) for p in te]
        self.assertEqual([e.event for e in events], [9] * 5)
        self.assertEqual([e.end for e in events], [False, False, True, True, True])
        self.assertEqual(len({p.timestamp for p in te}), 1)
        self.assertEqual([p.marker for p in te], [True, False, False, False, False])
        audio = [p for p in self.sent_rtp() if p.payload_type == 0]
        # The 60 ms gap after the digit sends nothing either.
        self.assertEqual(len(audio), 0)
        self.leg.send_agent_audio(bytes(FRAME_BYTES))
        self.tick()
        last = self.sent_rtp()[-1]
        self.assertEqual((last.payload_type, last.marker), (0, True))
        self.assertEqual((last.timestamp - te[0].timestamp) & 0xFFFFFFFF, 8 * 160)

    def test_inband_send_without_telephone_event(self) -> None:
        """Without telephone-event, digits are sent as tones a detector recognises."""
        self.make_leg(_neg(te=None))
        self.leg.send_dtmf("3#")
        self.tick(20)
        dec = make_decoder("pcmu")
        pcm = b"".join(dec.decode(bytes(p.payload)) for p in self.sent_rtp())
        self.assertEqual(InbandDtmfDetector(8000).feed(pcm), ["3", "#"])


class ControlTests(LegTestBase):
    """Hold, re-offers, SRTP, RTCP, latching and close."""

    def test_hold_and_resume(self) -> None:
        """A hold stops sending and silences caller audio; resuming continues SSRC and sequence."""
        leg = self.make_leg()
        enc = make_encoder("pcmu")
        leg.send_agent_audio(bytes(FRAME_BYTES))
        self.tick()
        leg.update(replace(leg.negotiated, direction="recvonly", remote_hold=True))
        self.assertTrue(leg.on_hold)
        for i in range(10):
            leg.send_agent_audio(bytes(FRAME_BYTES))
            self.inject(0, i, i * 160, enc.encode(_tone(1000, 160, 8000, i * 160)))
            self.tick()
        self.assertEqual(len(self.sent_rtp()), 1)
        self.assertEqual(set(self.audio[1:]), {bytes(FRAME_BYTES)})
        leg.update(replace(leg.negotiated, direction="sendrecv", remote_hold=False))
        leg.send_agent_audio(bytes(FRAME_BYTES))
        self.tick()
        a, b = self.sent_rtp()
        self.assertEqual((a.ssrc, (b.sequence - a.sequence) & 0xFFFF, b.marker), (b.ssrc, 1, True))
        self.assertEqual((b.timestamp - a.timestamp) & 0xFFFFFFFF, 11 * 160)

    def test_codec_change_keeps_stream(self) -> None:
        """A re-offer switching PCMU to PCMA keeps SSRC and sequence, sends PT 8 and decodes A-law."""
        leg = self.make_leg()
        leg.send_agent_audio(bytes(FRAME_BYTES))
        self.tick()
        leg.update(replace(leg.negotiated, codec="pcma", payload_type=8))
        for i in range(20):
            leg.send_agent_audio(bytes(FRAME_BYTES))
            self.inject(8, i, i * 160, audioop.lin2alaw(_tone(1000, 160, 8000, i * 160), 2))
            self.tick()
        pkts = self.sent_rtp()
        self.assertEqual((pkts[-1].payload_type, pkts[-1].ssrc), (8, pkts[0].ssrc))
        self.assertEqual((pkts[-1].sequence - pkts[0].sequence) & 0xFFFF, 20)
        self.assertGreater(_power_at(b"".join(self.audio[-8:]), 1000, 16000), 3000)

    def test_codec_change_to_g722_and_back(self) -> None:
        """Switching between batched G.711 and G.722 re-batches the leg without errors."""
        leg = self.make_leg()
        leg.update(replace(leg.negotiated, codec="g722", payload_type=9))
        leg.send_agent_audio(bytes(FRAME_BYTES))
        self.tick()
        leg.update(replace(leg.negotiated, codec="pcmu", payload_type=0))
        leg.send_agent_audio(bytes(FRAME_BYTES))
        self.tick()
        self.assertEqual([p.payload_type for p in self.sent_rtp()], [9, 0])

    def test_new_address_on_reoffer(self) -> None:
        """A re-offer with a new address moves the stream there."""
        leg = self.make_leg()
        leg.update(replace(leg.negotiated, remote_address="192.0.2.99", remote_port=50000))
        leg.send_agent_audio(bytes(FRAME_BYTES))
        self.tick()
        self.assertEqual(self.rtp_port.sent[-1][1], ("192.0.2.99", 50000))

    def test_latching_to_nat_source(self) -> None:
        """Media goes to where the phone's packets come from once they arrive."""
        leg = self.make_leg()
        self.inject(0, 1, 160, b"\xff" * 160, src=("198.51.100.1", 61000))
        leg.send_agent_audio(bytes(FRAME_BYTES))
        self.tick()
        self.assertEqual(self.rtp_port.sent[-1][1], ("198.51.100.1", 61000))
        self.assertEqual(self.ready, 1)
        self.assertEqual(leg.last_packet_at, T0)

    def test_srtp(self) -> None:
        """With SDES keys the leg protects what it sends and accepts only authentic packets."""
        rng = random.Random(3)
        ours, theirs = generate_crypto(1, AES_CM_128_HMAC_SHA1_80, rng), generate_crypto(1, AES_CM_128_HMAC_SHA1_80, rng)
        leg = self.make_leg(_neg(local_crypto=ours, remote_crypto=theirs))
        peer = SrtpContext.from_sdes(theirs, ours)
        leg.send_agent_audio(bytes(FRAME_BYTES))
        self.tick()
        wire = self.rtp_port.sent[-1][0]
        self.assertEqual(parse_rtp(peer.unprotect(wire)).ssrc, leg.ssrc)
        self.rtp_port.protocol.datagramReceived(build_rtp(0, 1, 0, 5, b"\xff" * 160), PEER)
        self.assertEqual(self.ready, 0)
        self.rtp_port.protocol.datagramReceived(peer.protect(build_rtp(0, 2, 160, 5, b"\xff" * 160)), PEER)
        self.assertEqual(self.ready, 1)

    def test_rtcp_reports_and_bye_on_close(self) -> None:
        """An SR goes to the RTCP port on schedule; close sends BYE, releases ports and leaves no timers."""
        leg = self.make_leg()
        for _ in range(400):
            leg.send_agent_audio(bytes(FRAME_BYTES))
            self.tick()
        reports = [parse_rtcp(d) for d, _ in self.rtcp_port.sent]
        self.assertTrue(reports)
        self.assertIsInstance(reports[0][0], SenderReport)
        self.assertEqual(self.rtcp_port.sent[0][1], (PEER[0], PEER[1] + 1))
        d = leg.close()
        self.successResultOf(d)
        self.assertIsInstance(parse_rtcp(self.rtcp_port.sent[-1][0])[-1], Bye)
        self.assertEqual(self.alloc.used_count, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.engine), 0)
        leg.send_agent_audio(bytes(FRAME_BYTES))
        self.successResultOf(leg.close())

    def test_incoming_rtcp_is_read(self) -> None:
        """A peer's SR is taken in (later reports carry LSR)."""
        leg = self.make_leg()
        self.inject(0, 1, 160, b"\xff" * 160)
        self.inject(0, 2, 320, b"\xff" * 160)
        sr = SenderReport(0xABC, 0x0102030405060708, 1, 2, 3).encode()
        self.rtcp_port.protocol.datagramReceived(sr, (PEER[0], PEER[1] + 1))
        self.rtcp_port.protocol.datagramReceived(b"\x80\xc8\x00\x10garbage!", (PEER[0], PEER[1] + 1))
        self.assertEqual(leg.session.receiver.current.last_sr_lsr, 0x03040506)  # type: ignore[union-attr]
        self.assertEqual(leg.stats()["rx_dropped"], 0)

    def test_many_legs_share_one_timer(self) -> None:
        """Ten legs run on the single media clock timer, each receiving and sending."""
        self.make_leg()
        legs = [self.leg]
        for _ in range(4):
            ep = RtpEndpoint(self.reactor, self.alloc)
            ep.start()
            legs.append(RtpLeg(self.engine, ep, _neg(), clock=self.reactor, rng=random.Random(1)))
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        for leg in legs:
            leg.send_agent_audio(bytes(FRAME_BYTES))
        self.tick()
        self.assertEqual(sum(len(p.sent) for p in self.reactor.ports.values()), 5)
        for leg in legs:
            self.successResultOf(leg.close())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
