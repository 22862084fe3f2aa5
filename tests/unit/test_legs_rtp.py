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
from zope.interface import implementer
from zope.interface.verify import verifyObject

from activecall.media._audioop import audioop
from activecall.media.clock import MediaClock
from activecall.media.codecs import make_decoder, make_encoder
from activecall.sdp.negotiation import NegotiatedMedia
from activecall.legs.rtp import FRAME_BYTES, RtpLeg, RtpMediaEngine
from activecall.media.tracks import FrameQueue, ILegEvents
from activecall.rtp.packet import (
    TelephoneEvent,
    parse_telephone_event,
    build_rtp,
    is_rtcp,
    parse_rtcp,
    parse_rtp,
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


@implementer(ILegEvents)
class RecordingEvents:
    """ILegEvents that records what a leg reported."""

    def __init__(self) -> None:
        self.digits: list[str] = []
        self.ready = 0

    def media_ready(self) -> None:
        self.ready += 1

    def dtmf(self, digit: str) -> None:
        self.digits.append(digit)

    def hold(self, on_hold: bool) -> None:
        raise AssertionError("RTP legs do not report hold")

    def ended(self, cause: str) -> None:
        raise AssertionError("RTP legs do not report an end")

    def media_ended(self, cause: str) -> None:
        raise AssertionError("RTP legs do not report a media end")

    def message(self, body: str, content_type: str | None) -> None:
        raise AssertionError("RTP legs carry no messages")

    def transfer_requested(self, refer_to: str, referred_by: str | None) -> None:
        raise AssertionError("RTP legs carry no REFER")

    def transfer_progress(self, status: int, text: str) -> None:
        raise AssertionError("RTP legs carry no NOTIFY")


class ListSink:
    """An AudioSink keeping every frame."""

    def __init__(self, frames: list[bytes]) -> None:
        self.write_frame = frames.append


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
        self.events = RecordingEvents()
        self.digits = self.events.digits
        self.agent = FrameQueue()
        self.leg = RtpLeg(self.engine, self.endpoint, neg or _neg(), clock=self.reactor, rng=random.Random(7))
        self.leg.attach(self.agent, ListSink(self.audio), self.events)
        self.rtp_port = self.reactor.ports[self.endpoint.local_port]
        self.rtcp_port = self.reactor.ports[self.endpoint.local_rtcp_port]
        return self.leg

    @property
    def ready(self) -> int:
        return self.events.ready

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

    def test_media_rate(self) -> None:
        """RtpLeg runs at 16 kHz with 640-byte frames and reports to an ILegEvents."""
        leg = self.make_leg()
        verifyObject(ILegEvents, self.events)
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
    """Agent audio and timestamps across gaps."""

    def test_one_packet_per_tick_with_true_timestamps(self) -> None:
        """Frames go out one per tick; a gap sends nothing but advances the timestamp and sets the marker."""
        self.make_leg()
        frame = _tone(1000, 320, 16000)
        for _ in range(3):
            self.agent.write_frame(frame)
            self.tick()
        self.tick(4)
        self.agent.write_frame(frame)
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
            self.agent.write_frame(_tone(1000, 320, 16000, i * 320))
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
                    self.agent.write_frame(_tone(500, 320, 16000))
                    self.tick()
                ts = [p.timestamp for p in self.sent_rtp()]
                self.assertEqual([(t - ts[0]) & 0xFFFFFFFF for t in ts], [0, step, 2 * step])
                self.assertEqual({p.payload_type for p in self.sent_rtp()}, {pt})

    def test_late_tick_sends_every_frame(self) -> None:
        """After a reactor stall, the catch-up frames are all sent with consecutive timestamps."""
        self.make_leg()
        self.tick()
        for _ in range(3):
            self.agent.write_frame(bytes(FRAME_BYTES))
        self.reactor.advance(0.061)
        ts = [p.timestamp for p in self.sent_rtp()]
        self.assertEqual([(t - ts[0]) & 0xFFFFFFFF for t in ts], [0, 160, 320])
        self.assertEqual(self.engine.late_frames, 2)

class DtmfSendTests(LegTestBase):
    """Keys we play to the far end (a bridged transfer relaying the other side's presses)."""

    def test_rfc4733_events_pause_the_audio_and_keep_the_clock(self) -> None:
        """With telephone-event negotiated, each digit is 100 ms of events on one timestamp (marker on the
        first, three end packets), 60 ms of nothing, then audio resumes as a new talkspurt on the media clock."""
        self.make_leg()
        self.leg.start_stream()
        self.agent.write_frame(_tone(1000, 320, 16000))
        self.tick()
        self.leg.send_dtmf("1#")
        for _ in range(25):  # 2 x (7 event slots + 3 of gap), then audio again
            self.agent.write_frame(_tone(1000, 320, 16000))
            self.tick()
        pkts = self.sent_rtp()
        events = [p for p in pkts if p.payload_type == 101]
        self.assertEqual(len(events), 2 * 7)  # per digit: 4 updates, then the end packet 3 times
        parsed = [parse_telephone_event(bytes(p.payload)) for p in events]
        self.assertEqual([e.event for e in parsed], [1] * 7 + [11] * 7)
        first = events[:7]
        self.assertEqual({p.timestamp for p in first}, {first[0].timestamp})
        self.assertEqual([p.marker for p in first], [True] + [False] * 6)
        self.assertEqual([e.end for e in parsed[:7]], [False] * 4 + [True] * 3)
        self.assertEqual(parsed[6].duration, 800)
        audio = [p for p in pkts if p.payload_type == 0]
        self.assertEqual([p.marker for p in audio], [True, True, False, False, False, False])
        self.assertEqual((events[0].timestamp - audio[0].timestamp) & 0xFFFFFFFF, 160)
        self.assertEqual((events[7].timestamp - audio[0].timestamp) & 0xFFFFFFFF, 11 * 160)
        # One media clock: audio resumes where 21 ticks of 160 put it.
        self.assertEqual((audio[1].timestamp - audio[0].timestamp) & 0xFFFFFFFF, 21 * 160)
        self.assertEqual(self.leg.stats()["tx_dtmf_packets"], 14)

    def test_inband_tones_without_telephone_event(self) -> None:
        """Without telephone-event the digits are tones in the audio, which a DTMF detector reads back."""
        from activecall.media.dtmf_detect import InbandDtmfDetector

        self.make_leg(_neg(te=None))
        self.leg.start_stream()
        self.leg.send_dtmf("7*")
        for _ in range(20):
            self.tick()
        dec = make_decoder("pcmu")
        pcm = b"".join(dec.decode(bytes(p.payload)) for p in self.sent_rtp())
        self.assertEqual(InbandDtmfDetector(8000).feed(pcm), ["7", "*"])

    def test_bad_digits_and_a_flood(self) -> None:
        """A character that is no key is refused; more than 32 waiting digits are dropped and counted."""
        self.make_leg()
        self.assertRaises(ValueError, self.leg.send_dtmf, "1x")
        self.leg.send_dtmf("1" * 40)
        self.assertEqual(self.leg.tx_dtmf_dropped, 8)


class ControlTests(LegTestBase):
    """Hold, re-offers, SRTP, RTCP, latching and close."""

    def test_hold_and_resume(self) -> None:
        """A hold stops sending and silences caller audio; resuming continues SSRC and sequence."""
        leg = self.make_leg()
        enc = make_encoder("pcmu")
        self.agent.write_frame(bytes(FRAME_BYTES))
        self.tick()
        leg.update(replace(leg.negotiated, direction="recvonly", remote_hold=True))
        self.assertTrue(leg.on_hold)
        for i in range(10):
            self.agent.write_frame(bytes(FRAME_BYTES))
            self.inject(0, i, i * 160, enc.encode(_tone(1000, 160, 8000, i * 160)))
            self.tick()
        self.assertEqual(len(self.sent_rtp()), 1)
        self.assertEqual(set(self.audio[1:]), {bytes(FRAME_BYTES)})
        leg.update(replace(leg.negotiated, direction="sendrecv", remote_hold=False))
        self.agent.write_frame(bytes(FRAME_BYTES))
        self.tick()
        a, b = self.sent_rtp()
        self.assertEqual((a.ssrc, (b.sequence - a.sequence) & 0xFFFF, b.marker), (b.ssrc, 1, True))
        self.assertEqual((b.timestamp - a.timestamp) & 0xFFFFFFFF, 11 * 160)

    def test_codec_change_keeps_stream(self) -> None:
        """A re-offer switching PCMU to PCMA keeps SSRC and sequence, sends PT 8 and decodes A-law."""
        leg = self.make_leg()
        self.agent.write_frame(bytes(FRAME_BYTES))
        self.tick()
        leg.update(replace(leg.negotiated, codec="pcma", payload_type=8))
        for i in range(20):
            self.agent.write_frame(bytes(FRAME_BYTES))
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
        self.agent.write_frame(bytes(FRAME_BYTES))
        self.tick()
        leg.update(replace(leg.negotiated, codec="pcmu", payload_type=0))
        self.agent.write_frame(bytes(FRAME_BYTES))
        self.tick()
        self.assertEqual([p.payload_type for p in self.sent_rtp()], [9, 0])

    def test_new_address_on_reoffer(self) -> None:
        """A re-offer with a new address moves the stream there."""
        leg = self.make_leg()
        leg.update(replace(leg.negotiated, remote_address="192.0.2.99", remote_port=50000))
        self.agent.write_frame(bytes(FRAME_BYTES))
        self.tick()
        self.assertEqual(self.rtp_port.sent[-1][1], ("192.0.2.99", 50000))

    def test_latching_to_nat_source(self) -> None:
        """Media goes to where the phone's packets come from once they arrive."""
        leg = self.make_leg()
        self.inject(0, 1, 160, b"\xff" * 160, src=("198.51.100.1", 61000))
        self.agent.write_frame(bytes(FRAME_BYTES))
        self.tick()
        self.assertEqual(self.rtp_port.sent[-1][1], ("198.51.100.1", 61000))
        self.assertEqual(self.ready, 1)
        self.assertEqual(leg.last_activity_at, T0)

    def test_srtp(self) -> None:
        """With SDES keys the leg protects what it sends and accepts only authentic packets."""
        rng = random.Random(3)
        ours, theirs = generate_crypto(1, AES_CM_128_HMAC_SHA1_80, rng), generate_crypto(1, AES_CM_128_HMAC_SHA1_80, rng)
        leg = self.make_leg(_neg(local_crypto=ours, remote_crypto=theirs))
        peer = SrtpContext.from_sdes(theirs, ours)
        self.agent.write_frame(bytes(FRAME_BYTES))
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
            self.agent.write_frame(bytes(FRAME_BYTES))
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
        self.agent.write_frame(bytes(FRAME_BYTES))
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
        queues = [self.agent]
        for _ in range(4):
            ep = RtpEndpoint(self.reactor, self.alloc)
            ep.start()
            leg = RtpLeg(self.engine, ep, _neg(), clock=self.reactor, rng=random.Random(1))
            queues.append(FrameQueue())
            leg.attach(queues[-1], ListSink([]), RecordingEvents())
            legs.append(leg)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        for queue in queues:
            queue.write_frame(bytes(FRAME_BYTES))
        self.tick()
        self.assertEqual(sum(len(p.sent) for p in self.reactor.ports.values()), 5)
        for leg in legs:
            self.successResultOf(leg.close())
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class _Echo:
    """A sink and a source in one: the source returns what the sink got last (None once read)."""

    def __init__(self) -> None:
        self.last: bytes | None = None

    def write_frame(self, frame: bytes) -> None:
        self.last = frame

    def read_frame(self) -> bytes | None:
        frame, self.last = self.last, None
        return frame


class _Hook:
    """A sink or source that runs ``action`` once, on its first frame, then behaves like ``inner``."""

    def __init__(self, action: Any, inner: Any = None) -> None:
        self.action = action
        self.inner = inner
        self.frames = 0

    def write_frame(self, frame: bytes) -> None:
        self.frames += 1
        if self.frames == 1:
            self.action()

    def read_frame(self) -> bytes | None:
        self.frames += 1
        if self.frames == 1:
            self.action()
        return self.inner.read_frame() if self.inner is not None else None


class TickTests(LegTestBase):
    """The engine's phases, attach, and legs closed or opened while a tick runs."""

    def _second_leg(self, source: Any = None, sink: Any = None) -> tuple[RtpLeg, list[bytes], FrameQueue]:
        ep = RtpEndpoint(self.reactor, self.alloc)
        ep.start()
        leg = RtpLeg(self.engine, ep, _neg(), clock=self.reactor, rng=random.Random(2))
        frames: list[bytes] = []
        queue = FrameQueue()
        leg.attach(source if source is not None else queue, sink if sink is not None else ListSink(frames),
                   RecordingEvents())
        return leg, frames, queue

    def test_send_phase_sees_this_ticks_caller_frame(self) -> None:
        """A source reading what the leg's sink was given in the same tick sends it on that tick."""
        leg = self.make_leg()
        echo = _Echo()
        leg.attach(echo, echo, self.events)
        self.tick()
        self.assertEqual(len(self.sent_rtp()), 1, "the silent frame of this tick is echoed at once")
        enc = make_encoder("pcmu")
        for i in range(12):
            self.inject(0, 100 + i, i * 160, enc.encode(_tone(1000, 160, 8000, i * 160)))
            self.tick()
        self.assertEqual(len(self.sent_rtp()), 13)
        dec = make_decoder("pcmu")
        pcm = b"".join(dec.decode(bytes(p.payload)) for p in self.sent_rtp()[-6:])
        self.assertGreater(_power_at(pcm, 1000, 8000), 3000)

    def test_before_attach_no_audio_no_events(self) -> None:
        """Until attach a leg sends nothing, keeps its timestamps true and reports no media-ready or digits."""
        self.reactor = FakeReactor()
        self.media_clock = MediaClock(self.reactor)
        self.engine = RtpMediaEngine(self.reactor, self.media_clock)
        self.alloc = RtpPortAllocator(30000, 30009)
        ep = RtpEndpoint(self.reactor, self.alloc)
        ep.start()
        leg = RtpLeg(self.engine, ep, _neg(), clock=self.reactor, rng=random.Random(7))
        self.rtp_port = self.reactor.ports[ep.local_port]
        self.inject(0, 1, 160, b"\xff" * 160)
        self.inject(101, 2, 320, TelephoneEvent(5, True, 10, 480).encode())
        self.tick(3)
        self.assertEqual(self.sent_rtp(), [])
        self.assertEqual(leg.stats()["tx_silent_slots"], 0)
        events, audio, agent = RecordingEvents(), [], FrameQueue()
        leg.attach(agent, ListSink(audio), events)
        agent.write_frame(bytes(FRAME_BYTES))
        self.tick()
        self.assertEqual((events.ready, events.digits, len(audio)), (0, [], 1))
        self.inject(0, 3, 480, b"\xff" * 160)
        self.assertEqual(events.ready, 1)
        (pkt,) = self.sent_rtp()
        self.assertTrue(pkt.marker)
        self.successResultOf(leg.close())

    def test_sink_closes_another_leg(self) -> None:
        """A sink closing a leg mid-tick: the closed leg gets no frame, sends nothing, and the others go on."""
        self.make_leg()
        other, other_frames, other_queue = self._second_leg()
        self.leg.attach(self.agent, _Hook(other.close), self.events)
        other_queue.write_frame(bytes(FRAME_BYTES))
        self.agent.write_frame(bytes(FRAME_BYTES))
        self.tick()
        self.assertTrue(other.closed)
        self.assertEqual(other_frames, [])
        self.assertEqual(other.stats()["frames_delivered"], 0)
        self.assertEqual(len(self.sent_rtp()), 1)
        self.assertEqual(other.stats()["tx_audio_packets"], 0)
        self.assertEqual(len(self.engine), 1)
        self.leg.attach(self.agent, ListSink(self.audio), self.events)
        self.tick(2)
        self.assertEqual(len(self.audio), 2, "the clock still ticks the remaining leg")

    def test_source_closes_an_earlier_leg_and_its_own(self) -> None:
        """A source closing a leg whose frame was already read, and its own leg: neither sends anything."""
        self.make_leg()
        self.agent.write_frame(bytes(FRAME_BYTES))
        queue = FrameQueue()
        queue.write_frame(bytes(FRAME_BYTES))
        holder: list[RtpLeg] = []

        def close_both() -> None:
            self.leg.close()
            holder[0].close()

        other, _, _ = self._second_leg(source=_Hook(close_both, queue))
        holder.append(other)
        self.tick()
        self.assertEqual((self.leg.stats()["tx_audio_packets"], other.stats()["tx_audio_packets"]), (0, 0))
        self.assertEqual(self.sent_rtp(), [])
        self.assertEqual(len(self.engine), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_leg_opened_during_a_tick_runs_from_the_next(self) -> None:
        """A leg created by a sink mid-tick (a new call) sends in this tick's send phase and receives from the next tick on."""
        self.make_leg()
        opened: list[tuple[RtpLeg, list[bytes], FrameQueue]] = []

        def open_leg() -> None:
            opened.append(self._second_leg())
            opened[0][2].write_frame(_tone(1000, 320, 16000))

        self.leg.attach(self.agent, _Hook(open_leg), self.events)
        self.tick()
        new, frames, _ = opened[0]
        self.assertEqual((frames, new.stats()["tx_audio_packets"]), ([], 1))
        self.tick()
        self.assertEqual((len(frames), new.stats()["tx_audio_packets"]), (1, 1))

    def test_digit_that_closes_the_leg(self) -> None:
        """An in-band digit whose handler closes the leg: the frame is not written to the sink after the close."""
        self.make_leg(_neg(te=None))
        from activecall.media.dtmf_detect import COL_HZ, ROW_HZ

        self.events.dtmf = lambda digit: self.leg.close()  # type: ignore[method-assign]
        enc = make_encoder("pcmu")
        t = np.arange(1600) / 8000
        tone = (5000 * (np.sin(2 * np.pi * ROW_HZ[0] * t) + np.sin(2 * np.pi * COL_HZ[0] * t))).astype("<i2").tobytes()
        for i in range(10):
            if self.leg.closed:
                break
            self.inject(0, i, i * 160, enc.encode(tone[i * 320 : (i + 1) * 320]))
            self.tick()
        self.assertTrue(self.leg.closed)
        self.assertEqual(len(self.audio), self.leg.stats()["frames_delivered"] - 1)


class StreamTests(LegTestBase):
    """Issue 10.3: once the stream runs, one packet every 20 ms, silence or comfort noise included."""

    def _rel(self, values: list[int], mod: int) -> list[int]:
        return [(v - values[0]) % mod for v in values]

    def test_idle_stream_is_50_packets_per_second_of_coded_silence(self) -> None:
        """A streaming leg with no agent frames sends 50 packets/s of G.711 silence (PCMU 0xFF, PCMA 0xD5)."""
        for batch in (True, False):
            for codec, pt, code in (("pcmu", 0, 0xFF), ("pcma", 8, 0xD5)):
                with self.subTest(codec=codec, batch=batch):
                    self.batch = batch
                    leg = self.make_leg(_neg(codec, pt))
                    leg.start_stream()
                    self.tick(50)
                    pkts = self.sent_rtp()
                    self.assertEqual(len(pkts), 50)
                    self.assertEqual({bytes(p.payload) for p in pkts}, {bytes([code]) * 160})
                    self.assertEqual({p.payload_type for p in pkts}, {pt})
                    self.assertEqual(self._rel([p.sequence for p in pkts], 1 << 16), list(range(50)))
                    self.assertEqual(self._rel([p.timestamp for p in pkts], 1 << 32), [160 * k for k in range(50)])
                    self.assertEqual([p.marker for p in pkts], [True] + [False] * 49)
                    stats = leg.stats()
                    self.assertEqual((stats["tx_silent_slots"], stats["tx_audio_packets"]), (50, 0))

    def test_g722_and_opus_send_encoded_silence(self) -> None:
        """G.722 and Opus legs send a silent frame through their encoder every tick."""
        for codec, pt, rate, step in (("g722", 9, 8000, 160), ("opus", 111, 48000, 960)):
            with self.subTest(codec=codec):
                self.make_leg(_neg(codec, pt, rate)).start_stream()
                self.tick(25)
                pkts = self.sent_rtp()
                self.assertEqual(len(pkts), 25)
                self.assertEqual({p.payload_type for p in pkts}, {pt})
                self.assertEqual(self._rel([p.timestamp for p in pkts], 1 << 32), [step * k for k in range(25)])
                dec = make_decoder(codec, 16000)
                pcm = b"".join(dec.decode(bytes(p.payload)) for p in pkts)
                self.assertLess(np.abs(np.frombuffer(pcm, dtype="<i2")).max(), 64)

    def test_audio_silence_audio_is_one_continuous_stream(self) -> None:
        """Audio, silence and audio again: consecutive sequence numbers and timestamps, no marker after silence."""
        leg = self.make_leg()
        leg.start_stream()
        frame = _tone(1000, 320, 16000)
        for _ in range(3):
            self.agent.write_frame(frame)
            self.tick()
        self.tick(4)
        for _ in range(2):
            self.agent.write_frame(frame)
            self.tick()
        pkts = self.sent_rtp()
        self.assertEqual(len(pkts), 9)
        self.assertEqual(self._rel([p.sequence for p in pkts], 1 << 16), list(range(9)))
        self.assertEqual(self._rel([p.timestamp for p in pkts], 1 << 32), [160 * k for k in range(9)])
        self.assertEqual([p.marker for p in pkts], [True] + [False] * 8)
        silent = [bytes(p.payload) == b"\xff" * 160 for p in pkts]
        self.assertEqual(silent, [False] * 3 + [True] * 4 + [False] * 2)
        self.assertEqual((leg.stats()["tx_audio_packets"], leg.stats()["tx_silent_slots"]), (5, 4))

    def test_comfort_noise_only_when_offered(self) -> None:
        """With CN offered: one CN packet at the start of silence, again every CN_REFRESH_TICKS, and a marker when audio resumes."""
        from activecall.legs.rtp import CN_LEVEL_DBOV, CN_REFRESH_TICKS

        leg = self.make_leg(_neg(comfort_noise_pt=13))
        leg.start_stream()
        self.tick(2 * CN_REFRESH_TICKS + 10)
        cn = self.sent_rtp()
        self.assertEqual(len(cn), 3)
        self.assertEqual({(p.payload_type, bytes(p.payload)) for p in cn}, {(13, bytes([CN_LEVEL_DBOV]))})
        self.assertEqual(self._rel([p.sequence for p in cn], 1 << 16), [0, 1, 2])
        self.assertEqual(self._rel([p.timestamp for p in cn], 1 << 32), [0, 160 * CN_REFRESH_TICKS, 320 * CN_REFRESH_TICKS])
        self.agent.write_frame(_tone(1000, 320, 16000))
        self.tick()
        self.tick()
        audio, again = self.sent_rtp()[3:]
        self.assertEqual((audio.payload_type, audio.marker, (audio.sequence - cn[0].sequence) & 0xFFFF), (0, True, 3))
        self.assertEqual((audio.timestamp - cn[0].timestamp) & 0xFFFFFFFF, 160 * (2 * CN_REFRESH_TICKS + 10))
        self.assertEqual((again.payload_type, again.marker), (13, False), "the next silence starts with CN at once")
        self.assertEqual(leg.stats()["tx_silent_slots"], 4)
        # Without CN in the offer: coded silence, never PT 13.
        self.make_leg().start_stream()
        self.tick(CN_REFRESH_TICKS + 5)
        self.assertEqual({p.payload_type for p in self.sent_rtp()}, {0})
        self.assertEqual(len(self.sent_rtp()), CN_REFRESH_TICKS + 5)

    def test_hold_sends_nothing_while_streaming(self) -> None:
        """On hold (recvonly/inactive) a streaming leg sends nothing; on resume the stream goes on with a marker."""
        leg = self.make_leg()
        leg.start_stream()
        self.tick(5)
        for direction in ("recvonly", "inactive"):
            leg.update(replace(leg.negotiated, direction=direction))
            self.tick(5)
            self.assertEqual(len(self.sent_rtp()), 5, direction)
        leg.update(replace(leg.negotiated, direction="sendrecv"))
        self.tick()
        pkts = self.sent_rtp()
        self.assertEqual(len(pkts), 6)
        last, prev = pkts[-1], pkts[-2]
        self.assertEqual(((last.sequence - prev.sequence) & 0xFFFF, last.marker), (1, True))
        self.assertEqual((last.timestamp - prev.timestamp) & 0xFFFFFFFF, 11 * 160)

    def test_not_streaming_before_start(self) -> None:
        """Until start_stream (an inbound leg ringing without early media) silence sends nothing."""
        leg = self.make_leg()
        self.tick(10)
        self.assertEqual(self.sent_rtp(), [])
        self.assertFalse(leg.streaming)
        leg.start_stream()
        self.tick(2)
        self.assertEqual(len(self.sent_rtp()), 2)
        self.assertTrue(self.sent_rtp()[0].marker)


class ResyncTests(LegTestBase):
    """Issue 10.4 through the leg: restarts resync the jitter buffer; every key press is a digit."""

    def _tone_packets(self, seq0: int, ts0: int, frames: int, ssrc: int = 0xABC, start: int = 0) -> None:
        enc = make_encoder("pcmu")
        for i in range(frames):
            self.inject(0, (seq0 + i) & 0xFFFF, (ts0 + 160 * i) & 0xFFFFFFFF,
                        enc.encode(_tone(1000, 160, 8000, (start + i) * 160)), ssrc=ssrc)
            self.tick()

    def test_sequence_restart_resyncs(self) -> None:
        """A source restarting at seq 0 / ts 0 (same SSRC) plays on after one dropped packet, none late."""
        self.make_leg()
        self._tone_packets(30000, 123456, 20)
        self._tone_packets(0, 0, 40, start=20)
        stats = self.leg.stats()
        self.assertEqual((stats["rx_dropped"], stats["jitter_late"]), (1, 0))
        self.assertGreater(_power_at(b"".join(self.audio[-20:]), 1000, 16000), 3000)

    def test_sequence_restart_nearby_resyncs(self) -> None:
        """A restart to sequence numbers just behind the current ones (timestamps going on) is no late packet."""
        self.make_leg()
        self._tone_packets(100, 5000, 60)
        self._tone_packets(110, 5000 + 160 * 60, 40, start=60)
        stats = self.leg.stats()
        self.assertEqual((stats["rx_dropped"], stats["jitter_late"]), (1, 0))
        self.assertGreater(_power_at(b"".join(self.audio[-20:]), 1000, 16000), 3000)

    def test_timestamp_restart_keeps_the_delay(self) -> None:
        """A timestamp restart with the sequence going on resets the jitter buffer instead of inflating its delay."""
        self.make_leg()
        self._tone_packets(100, 5000, 20)
        self._tone_packets(120, 0x7FFF0000, 40, start=20)
        stats = self.leg.stats()
        self.assertEqual(stats["jitter_target_frames"], self.leg.jitter_buffer.min_delay_frames)
        self.assertGreater(_power_at(b"".join(self.audio[-20:]), 1000, 16000), 3000)

    def test_same_key_twice_and_after_a_restart(self) -> None:
        """5, 5 (new timestamp) and 5 again after the source restarted its timestamps: three digits."""
        self.make_leg()
        seq = 10
        for ts in (8000, 16000, 160):
            for end, dur in ((False, 160), (False, 320), (True, 480), (True, 480), (True, 480)):
                self.inject(101, seq, ts, TelephoneEvent(5, end, 10, dur).encode())
                seq += 1
            self.tick()
        self.assertEqual(self.digits, ["5", "5", "5"])

    def test_events_from_another_ssrc(self) -> None:
        """Telephone-events from another SSRC are digits and do not take the audio stream over."""
        self.make_leg()
        self._tone_packets(100, 5000, 10)
        self.inject(101, 7, 4000, TelephoneEvent(9, False, 10, 160).encode(), ssrc=0xD7)
        self.inject(101, 8, 4000, TelephoneEvent(9, True, 10, 320).encode(), ssrc=0xD7)
        self._tone_packets(110, 5000 + 1600, 10, start=10)
        self.assertEqual(self.digits, ["9"])
        self.assertEqual(self.leg.session.receiver.current.ssrc, 0xABC)  # type: ignore[union-attr]
        self.assertEqual(self.leg.stats()["rx_audio_packets"], 20)
