"""Tests for activecall.rtp.session: receiver statistics, SSRC changes, sender state, RTCP schedule."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from activecall.rtp.packet import (
    Bye,
    ReceiverReport,
    ReportBlock,
    SenderReport,
    SourceDescription,
    build_rtp,
    ntp_from_seconds,
    ntp_middle32,
    parse_rtcp,
    parse_rtp,
)
from activecall.rtp.session import (
    ReceiveStatus,
    RtcpScheduler,
    RtpReceiver,
    RtpReceiverStats,
    RtpSession,
    RtpStream,
    SeqStatus,
    rtcp_interval,
)

_COMP = 2.71828 - 1.5
T0 = 1_700_000_000.0


def _feed(stats: RtpReceiverStats, seqs: list[int], t0: float = T0) -> list[SeqStatus]:
    """Feed packets 20 ms apart with timestamps 160 apart (by sequence offset)."""
    out = []
    for i, seq in enumerate(seqs):
        out.append(stats.update(seq & 0xFFFF, (1000 + 160 * i) & 0xFFFFFFFF, t0 + 0.02 * i))
    return out


class ReceiverStatsTests(SynchronousTestCase):
    """RFC 3550 A.1/A.3/A.8 reception statistics."""

    def test_probation_then_valid(self) -> None:
        """A new source is on probation for one packet, then valid (MIN_SEQUENTIAL = 2)."""
        st = RtpReceiverStats(1, 100, 8000)
        self.assertEqual(_feed(st, [100, 101, 102]), [SeqStatus.PROBATION, SeqStatus.VALID, SeqStatus.VALID])
        self.assertEqual((st.base_seq, st.received, st.expected), (101, 2, 2))

    def test_probation_restarts_on_gap(self) -> None:
        """A non-sequential packet during probation restarts it."""
        st = RtpReceiverStats(1, 100, 8000)
        self.assertEqual(_feed(st, [100, 105, 106]), [SeqStatus.PROBATION, SeqStatus.PROBATION, SeqStatus.VALID])

    def test_min_sequential_one_accepts_first_packet(self) -> None:
        """With min_sequential=1 the first packet is already valid."""
        st = RtpReceiverStats(1, 7, 8000, min_sequential=1)
        self.assertEqual(st.update(7, 0, T0), SeqStatus.VALID)

    def test_wrap_extends_sequence(self) -> None:
        """Crossing 65535 -> 0 adds a cycle to the extended highest sequence number."""
        st = RtpReceiverStats(1, 65530, 8000)
        _feed(st, list(range(65530, 65536 + 10)))
        self.assertEqual(st.cycles, 65536)
        self.assertEqual(st.extended_max_seq, 65536 + 9)
        self.assertEqual(st.expected, st.received)
        self.assertEqual(st.cumulative_lost, 0)

    def test_loss_and_fraction(self) -> None:
        """Lost packets show in the cumulative count and in the per-interval fraction (A.3)."""
        st = RtpReceiverStats(9, 0, 8000)
        # Deterministic loss: drop every 4th packet after probation.
        seqs = [s for s in range(0, 102) if s < 2 or s % 4 != 0]
        _feed(st, seqs)
        block = st.report_block(T0 + 5)
        # Valid from seq 1 to 101: 101 expected, 25 lost (4, 8, ..., 100).
        self.assertEqual((st.expected, block.cumulative_lost), (101, 25))
        self.assertEqual(block.fraction_lost, (25 << 8) // 101)
        self.assertEqual(block.highest_seq, 101)
        self.assertEqual(block.ssrc, 9)
        # Next interval has no loss: fraction drops to 0, cumulative stays.
        for s in range(102, 152):
            st.update(s, 0, T0)
        block2 = st.report_block(T0 + 10)
        self.assertEqual((block2.fraction_lost, block2.cumulative_lost), (0, 25))

    def test_duplicates_make_loss_negative(self) -> None:
        """Duplicates are counted as received, so the cumulative loss can go negative (A.3)."""
        st = RtpReceiverStats(1, 10, 8000)
        _feed(st, [10, 11, 12, 12, 12])
        self.assertEqual(st.cumulative_lost, -2)
        self.assertEqual(st.report_block(T0).fraction_lost, 0)

    def test_large_jump_bad_then_restart(self) -> None:
        """A jump beyond MAX_DROPOUT is BAD once and RESTARTED when confirmed by the next packet."""
        st = RtpReceiverStats(1, 10, 8000)
        _feed(st, [10, 11, 12])
        self.assertEqual(st.update(20000, 0, T0), SeqStatus.BAD)
        self.assertEqual(st.update(20001, 0, T0), SeqStatus.RESTARTED)
        self.assertEqual((st.base_seq, st.received), (20001, 1))
        self.assertEqual(st.update(20002, 0, T0), SeqStatus.VALID)

    def test_isolated_jump_is_dropped(self) -> None:
        """A single stray packet far away is BAD and the stream continues."""
        st = RtpReceiverStats(1, 10, 8000)
        _feed(st, [10, 11, 12])
        self.assertEqual(st.update(40000, 0, T0), SeqStatus.BAD)
        self.assertEqual(st.update(13, 0, T0), SeqStatus.VALID)
        self.assertEqual(st.max_seq, 13)

    def test_jitter_zero_for_steady_stream(self) -> None:
        """Packets arriving exactly on their timestamps give zero jitter."""
        st = RtpReceiverStats(1, 0, 8000)
        _feed(st, list(range(50)))
        self.assertAlmostEqual(st.jitter, 0.0, places=3)

    def test_jitter_converges_to_transit_variation(self) -> None:
        """Arrival offsets alternating 0/10 ms converge to a jitter of 80 timestamp units (A.8)."""
        st = RtpReceiverStats(1, 0, 8000, min_sequential=1)
        for i in range(400):
            st.update(i, (0xFFFFF000 + 160 * i) & 0xFFFFFFFF, T0 + 0.02 * i + (0.01 if i % 2 else 0.0))
        self.assertLess(abs(st.jitter - 80.0), 0.5)
        self.assertEqual(st.report_block(T0).jitter, int(st.jitter))


class ReceiverTests(SynchronousTestCase):
    """RtpReceiver follows SSRC changes instead of discarding them."""

    def test_first_stream(self) -> None:
        """The first source is on probation, then reported as a new stream, then accepted."""
        r = RtpReceiver(8000)
        self.assertEqual(r.receive(0xA, 1, 0, T0), ReceiveStatus.PROBATION)
        self.assertEqual(r.receive(0xA, 2, 160, T0 + 0.02), ReceiveStatus.NEW_STREAM)
        self.assertEqual(r.receive(0xA, 3, 320, T0 + 0.04), ReceiveStatus.ACCEPTED)
        self.assertEqual(r.current.ssrc, 0xA)

    def test_ssrc_change_mid_call(self) -> None:
        """A new SSRC mid-call becomes the stream after probation; the old SSRC's stragglers are stale."""
        r = RtpReceiver(8000)
        for i in range(10):
            r.receive(0xA, i, 160 * i, T0 + 0.02 * i)
        self.assertEqual(r.receive(0xB, 5000, 0, T0 + 1), ReceiveStatus.PROBATION)
        # The old stream still plays while the new one is being validated.
        self.assertEqual(r.receive(0xA, 10, 1600, T0 + 1.01), ReceiveStatus.ACCEPTED)
        self.assertEqual(r.receive(0xB, 5001, 160, T0 + 1.02), ReceiveStatus.NEW_STREAM)
        self.assertEqual(r.current.ssrc, 0xB)
        self.assertEqual(r.current.received, 1)
        self.assertEqual(r.receive(0xA, 11, 1760, T0 + 1.03), ReceiveStatus.STALE_SOURCE)
        self.assertEqual(r.receive(0xB, 5002, 320, T0 + 1.04), ReceiveStatus.ACCEPTED)

    def test_sequence_restart_is_new_stream(self) -> None:
        """A confirmed sequence restart on the same SSRC is reported as a new stream."""
        r = RtpReceiver(8000, min_sequential=1)
        for i in range(5):
            self.assertNotIn(r.receive(1, i, 0, T0), (ReceiveStatus.INVALID, ReceiveStatus.PROBATION))
        self.assertEqual(r.receive(1, 30000, 0, T0), ReceiveStatus.INVALID)
        self.assertEqual(r.receive(1, 30001, 0, T0), ReceiveStatus.NEW_STREAM)

    def test_bye_forgets_source(self) -> None:
        """After BYE the source is gone and its late packets are stale."""
        r = RtpReceiver(8000, min_sequential=1)
        r.receive(1, 0, 0, T0)
        self.assertTrue(r.on_bye(1))
        self.assertIsNone(r.current)
        self.assertEqual(r.receive(1, 1, 160, T0), ReceiveStatus.STALE_SOURCE)
        self.assertFalse(r.on_bye(99))


class StreamTests(SynchronousTestCase):
    """RtpStream owns SSRC, seq and timestamp of our outgoing media."""

    def test_random_initial_values_from_injected_source(self) -> None:
        """SSRC, sequence and timestamp come from the injected source, so a seed reproduces them."""
        a = RtpStream(random.Random(7), 8000, 0)
        b = RtpStream(random.Random(7), 8000, 0)
        c = RtpStream(random.Random(8), 8000, 0)
        self.assertEqual((a.ssrc, a.sequence, a.timestamp), (b.ssrc, b.sequence, b.timestamp))
        self.assertNotEqual((a.ssrc, a.sequence, a.timestamp), (c.ssrc, c.sequence, c.timestamp))

    def test_build_advances_and_wraps(self) -> None:
        """Each packet takes the next seq (wrapping at 65535) and the timestamp advances by samples."""
        s = RtpStream(random.Random(7), 8000, 0, ssrc=0x1234)
        s.sequence, s.timestamp = 65535, 0xFFFFFF60
        p1 = parse_rtp(bytes(s.build(b"\xff" * 160, 160, T0, marker=True)))
        p2 = parse_rtp(bytes(s.build(b"\xff" * 160, 160, T0 + 0.02)))
        self.assertEqual((p1.sequence, p1.timestamp, p1.marker, p1.ssrc), (65535, 0xFFFFFF60, True, 0x1234))
        self.assertEqual((p2.sequence, p2.timestamp, p2.marker), (0, 0, False))
        self.assertEqual((s.packet_count, s.octet_count), (2, 320))

    def test_rtp_ts_override_keeps_media_clock(self) -> None:
        """An explicit rtp_ts (RFC 4733 event) is used for the packet while the media clock still advances."""
        s = RtpStream(random.Random(7), 8000, 0)
        s.timestamp = 1000
        p = parse_rtp(bytes(s.build(b"\x00\x00\x00\x00", 160, T0, payload_type=101, rtp_ts=500)))
        self.assertEqual((p.timestamp, p.payload_type), (500, 101))
        self.assertEqual(s.timestamp, 1160)

    def test_skip_and_sr_timestamp(self) -> None:
        """skip() advances the clock without a packet; the SR timestamp extrapolates from the last send."""
        s = RtpStream(random.Random(7), 8000, 0)
        s.timestamp = 0
        s.build(b"", 160, T0)
        self.assertEqual(s.rtp_timestamp_at(T0 + 1.0), 8000)
        s.skip(800)
        self.assertEqual(s.timestamp, 960)

    def test_buffer_reused(self) -> None:
        """build() packs into the same preallocated buffer every time."""
        s = RtpStream(random.Random(7), 8000, 0)
        v1 = s.build(b"a", 160, T0)
        v2 = s.build(b"b", 160, T0)
        self.assertIs(v1.obj, v2.obj)


class IntervalTests(SynchronousTestCase):
    """RFC 3550 A.7 interval computation."""

    def test_minimum_and_randomisation(self) -> None:
        """Small sessions get the 5 s minimum (2.5 s initially) scaled by 0.5..1.5 and the compensation."""
        self.assertAlmostEqual(rtcp_interval(2, 2, 400.0, True, 100.0, False, 0.5), 5.0 / _COMP)
        self.assertAlmostEqual(rtcp_interval(2, 2, 400.0, True, 100.0, False, 0.0), 2.5 / _COMP)
        self.assertAlmostEqual(rtcp_interval(2, 2, 400.0, True, 100.0, True, 0.5), 2.5 / _COMP)

    def test_bandwidth_limited(self) -> None:
        """With little RTCP bandwidth the interval is avg size times members over bandwidth."""
        self.assertAlmostEqual(rtcp_interval(2, 2, 10.0, True, 100.0, False, 0.5), 20.0 / _COMP)

    def test_sender_share(self) -> None:
        """When senders are at most a quarter of members, senders share 25 % of the bandwidth."""
        self.assertAlmostEqual(rtcp_interval(8, 1, 10.0, True, 100.0, False, 0.5), 100.0 * 1 / 2.5 / _COMP)
        self.assertAlmostEqual(rtcp_interval(8, 1, 10.0, False, 100.0, False, 0.5), 100.0 * 7 / 7.5 / _COMP)

    def test_scheduler_deadlines(self) -> None:
        """The first deadline uses the halved minimum; later ones the full minimum, within the random range."""
        sch = RtcpScheduler(random.Random(7), T0)
        first = sch.deadline() - T0
        self.assertTrue(2.5 * 0.5 / _COMP <= first < 2.5 * 1.5 / _COMP, first)
        self.assertFalse(sch.due(T0))
        self.assertTrue(sch.due(sch.deadline()))
        intervals = []
        now = sch.deadline()
        for _ in range(50):
            sch.sent(now, 60, members=2, senders=2, we_sent=True)
            intervals.append(sch.deadline() - now)
            now = sch.deadline()
        self.assertTrue(all(5.0 * 0.5 / _COMP <= t < 5.0 * 1.5 / _COMP for t in intervals), intervals)
        self.assertGreater(max(intervals) - min(intervals), 1.0)


class SessionTests(SynchronousTestCase):
    """RtpSession produces SR/RR + SDES on schedule and a final BYE."""

    def _session(self) -> RtpSession:
        return RtpSession(random.Random(7), T0, clock_rate_hz=8000, payload_type=0, cname=b"ac@host")

    def _receive(self, s: RtpSession, ssrc: int, seqs: list[int], t0: float) -> None:
        for i, seq in enumerate(seqs):
            s.receive_rtp(parse_rtp(build_rtp(0, seq, 160 * seq, ssrc, b"\xff" * 160)), t0 + 0.02 * i)

    def test_receiver_report_when_silent(self) -> None:
        """A session that has not sent reports with RR + SDES CNAME, including a block for the remote source."""
        s = self._session()
        self._receive(s, 0x55, [s for s in range(0, 50) if s != 20], T0)
        self.assertIsNone(s.rtcp_due(s.deadline() - 0.001))
        data = s.rtcp_due(s.deadline())
        assert data is not None
        rr, sdes = parse_rtcp(data)
        self.assertIsInstance(rr, ReceiverReport)
        self.assertEqual(rr.ssrc, s.sender.ssrc)
        self.assertEqual((rr.reports[0].ssrc, rr.reports[0].cumulative_lost, rr.reports[0].highest_seq), (0x55, 1, 49))
        self.assertIsInstance(sdes, SourceDescription)
        self.assertEqual(sdes.chunks[0].cname, b"ac@host")
        self.assertGreater(s.deadline(), T0 + 2.0)

    def test_sender_report_after_sending(self) -> None:
        """After sending media the report is an SR with our counts and a matching RTP timestamp."""
        s = self._session()
        for i in range(10):
            s.sender.build(b"\xff" * 160, 160, T0 + 0.02 * i)
        now = s.deadline()
        sr = parse_rtcp(s.rtcp_due(now))[0]
        self.assertIsInstance(sr, SenderReport)
        self.assertEqual((sr.packet_count, sr.octet_count), (10, 1600))
        self.assertEqual(sr.ntp_timestamp, ntp_from_seconds(now))
        self.assertEqual(sr.rtp_timestamp, s.sender.rtp_timestamp_at(now))
        self.assertEqual(sr.reports, ())
        # Nothing sent since: the next report is an RR.
        self.assertIsInstance(parse_rtcp(s.rtcp_due(s.deadline()))[0], ReceiverReport)

    def test_lsr_dlsr_and_rtt(self) -> None:
        """A remote SR sets LSR/DLSR in our next block; a remote report about us yields the RTT."""
        s = self._session()
        self._receive(s, 0x55, list(range(5)), T0)
        remote_ntp = ntp_from_seconds(T0 + 1)
        s.receive_rtcp([SenderReport(0x55, remote_ntp, 0, 5, 800)], T0 + 1)
        rr = parse_rtcp(s.rtcp_due(s.deadline()))[0]
        block = rr.reports[0]
        self.assertEqual(block.lsr, ntp_middle32(remote_ntp))
        self.assertAlmostEqual(block.dlsr / 65536.0, s.scheduler.last_sent_at - (T0 + 1), places=3)
        # The peer answers: its block about us echoes our SR time; RTT = now - sent - dlsr.
        s.sender.build(b"", 160, T0 + 10)
        sent_at = s.deadline()
        our_sr = parse_rtcp(s.rtcp_due(sent_at))[0]
        back = ReportBlock(s.sender.ssrc, 0, 0, 0, 0, ntp_middle32(our_sr.ntp_timestamp), int(0.5 * 65536))
        s.receive_rtcp([ReceiverReport(0x55, (back,))], sent_at + 0.6)
        self.assertAlmostEqual(s.rtt_s, 0.1, places=3)

    def test_bye(self) -> None:
        """The final compound ends with a BYE for our SSRC and the reason; a remote BYE is reported."""
        s = self._session()
        packets = parse_rtcp(s.bye(T0 + 3, b"hangup"))
        self.assertEqual(packets[-1], Bye((s.sender.ssrc,), b"hangup"))
        self.assertIsInstance(packets[0], (SenderReport, ReceiverReport))
        self._receive(s, 0x55, list(range(5)), T0)
        self.assertEqual(s.receive_rtcp([Bye((0x55,))], T0 + 4), [0x55])
        self.assertIsNone(s.receiver.current)


A, N, I = ReceiveStatus.ACCEPTED, ReceiveStatus.NEW_STREAM, ReceiveStatus.INVALID

#: Golden sequences after a steady stream of 10 packets (seq BASE.., ts 5000 + 160 k, 20 ms apart):
#: (name, base seq, packets as (seq, ts, seconds after the previous packet), statuses).
_GOLDEN: list[tuple[str, int, list[tuple[int, int, float]], list[ReceiveStatus]]] = [
    ("in order", 1000, [(1010, 6600, 0.02), (1011, 6760, 0.02)], [A, A]),
    ("restart to seq 0, ts continuing", 20000, [(0, 6600, 0.02), (1, 6760, 0.02), (2, 6920, 0.02)], [I, N, A]),
    ("restart to seq 0 and ts 0", 20000, [(0, 0, 0.02), (1, 160, 0.02), (2, 320, 0.02)], [I, N, A]),
    ("jump ahead > MAX_DROPOUT", 1000, [(4600, 6600, 0.02), (4601, 6760, 0.02), (4602, 6920, 0.02)], [I, N, A]),
    ("one stray packet far away", 1000, [(40000, 6600, 0.02), (1010, 6600, 0.0), (1011, 6760, 0.02)], [I, A, A]),
    ("reorder within MAX_MISORDER", 1000, [(1011, 6760, 0.02), (1010, 6600, 0.001), (1012, 6920, 0.02)], [A, A, A]),
    ("duplicates", 1000, [(1010, 6600, 0.02), (1010, 6600, 0.001), (1011, 6760, 0.02)], [A, A, A]),
    ("65535 -> 0 wrap", 65526, [(0, 6600, 0.02), (1, 6760, 0.02)], [A, A]),
    ("loss below MAX_DROPOUT", 1000, [(1110, 22600, 2.02), (1111, 22760, 0.02)], [A, A]),
    ("ts restart, seq continuing", 1000, [(1010, 7, 0.02), (1011, 167, 0.02), (1012, 327, 0.02)], [I, N, A]),
    ("ts jumps ahead, seq continuing", 1000, [(1010, 0x70000000, 0.02), (1011, 0x700000A0, 0.02)], [I, N]),
    ("one packet with a wild ts", 1000, [(1010, 0x12345678, 0.02), (1011, 6760, 0.02)], [I, A]),
    ("seq restart behind, ts continuing", 1000, [(990, 6600, 0.02), (991, 6760, 0.02), (992, 6920, 0.02)], [I, N, A]),
    ("silence suppressed for 5 s", 1000, [(1010, 46440, 5.0), (1011, 46600, 0.02)], [A, A]),
    ("network stall then burst", 1000, [(1010, 6600, 3.0), (1011, 6760, 0.0), (1012, 6920, 0.0)], [A, A, A]),
]


def _steady(r: RtpReceiver, base: int, ssrc: int = 5) -> float:
    """Ten packets in order from BASE, 20 ms apart; the time of the last."""
    for k in range(10):
        status = r.receive(ssrc, (base + k) & 0xFFFF, 5000 + 160 * k, T0 + 0.02 * k)
        assert status in (A, N, ReceiveStatus.PROBATION), status
    return T0 + 0.18


class GoldenSequenceTests(SynchronousTestCase):
    """RFC 3550 A.1 validation (MAX_DROPOUT 3000, MAX_MISORDER 100, MIN_SEQUENTIAL 2) with timestamp checks."""

    def test_golden_sequences(self) -> None:
        """Each golden packet sequence gives its statuses: restarts resync after two packets in order."""
        for name, base, packets, expected in _GOLDEN:
            with self.subTest(name):
                r = RtpReceiver(8000, check_timestamps=True)
                now = _steady(r, base)
                got = []
                for seq, ts, dt in packets:
                    now += dt
                    got.append(r.receive(5, seq, ts, now))
                self.assertEqual(got, expected, name)

    def test_restart_rebases_statistics(self) -> None:
        """After a sequence restart the loss count starts again from the new base, not 45000 packets lost."""
        r = RtpReceiver(8000, check_timestamps=True)
        now = _steady(r, 45000)
        for k in range(5):
            r.receive(5, k, 160 * k, now + 0.02 * (k + 1))
        cur = r.current
        assert cur is not None
        self.assertEqual((cur.base_seq, cur.expected, cur.cumulative_lost), (1, 4, 0))

    def test_ts_restart_keeps_sequence_accounting(self) -> None:
        """A timestamp restart with the sequence continuing keeps the sequence statistics (one packet lost)."""
        r = RtpReceiver(8000, check_timestamps=True)
        now = _steady(r, 1000)
        for k in range(4):
            r.receive(5, 1010 + k, 160 * k, now + 0.02 * (k + 1))
        cur = r.current
        assert cur is not None
        self.assertEqual((cur.base_seq, cur.extended_max_seq, cur.cumulative_lost), (1001, 1013, 1))

    def test_events_are_not_held_to_the_media_clock(self) -> None:
        """RFC 4733 packets (media=False) keep their event-start timestamp amid audio without a jump."""
        r = RtpReceiver(8000, check_timestamps=True)
        now = _steady(r, 1000)
        seq = 1010
        got = []
        for k in range(6):
            now += 0.02
            got.append(r.receive(5, seq, 6600 + 160 * k, now))  # audio goes on
            got.append(r.receive(5, seq + 1, 6600, now, media=False))  # the event keeps its start
            seq += 2
        self.assertEqual(set(got), {A})

    def test_without_timestamp_checks_a1_only(self) -> None:
        """By default only sequence numbers count (plain A.1): a timestamp restart is accepted."""
        r = RtpReceiver(8000)
        now = _steady(r, 1000)
        self.assertEqual([r.receive(5, 1010 + k, 7 + 160 * k, now + 0.02 * (k + 1)) for k in range(2)], [A, A])
