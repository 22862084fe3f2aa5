"""Per-stream RTP state and the RTCP schedule (RFC 3550), sans-IO.

* :class:`RtpReceiverStats`: reception statistics for one remote SSRC
  (Appendix A.1 sequence validation with probation, A.3 loss, A.8 jitter),
  optionally checking timestamps too: a sender that restarts its
  timestamps (or its sequence numbers behind the current ones) on the same
  SSRC is re-synchronised after two packets in order, as A.1 does for a
  sequence jump.
* :class:`RtpReceiver`: which remote SSRC is "the" stream.  A new SSRC that
  passes probation replaces the old one and is reported as
  ``ReceiveStatus.NEW_STREAM`` so the caller resets its jitter buffer and
  decoder, instead of discarding the packets as garbage.
* :class:`RtpStream`: our sending side (SSRC, sequence, timestamp, counts),
  packing into one preallocated buffer.
* :func:`rtcp_interval` and :class:`RtcpScheduler`: RFC 3550 §6.2/A.7 report
  interval (5 s minimum, halved for the first report, randomised 0.5–1.5).
* :class:`RtpSession`: the three above for one media line, producing
  SR/RR + SDES CNAME compounds when due and BYE at the end.

Everything takes ``now`` (float seconds on the injected clock, Unix epoch in
production, because SR timestamps are wallclock) and draws randomness from an
injected ``getrandbits`` source.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Protocol

from activecall.rtp.packet import (
    Bye,
    ReceiverReport,
    ReportBlock,
    RtcpPacket,
    RtpHeaderView,
    SdesChunk,
    SenderReport,
    SourceDescription,
    SDES_CNAME,
    build_rtcp,
    build_rtp_into,
    ntp_from_seconds,
    ntp_middle32,
    ts_diff,
)

__all__ = [
    "RandomBits",
    "SeqStatus",
    "ReceiveStatus",
    "RtpReceiverStats",
    "RtpReceiver",
    "RtpStream",
    "RtcpScheduler",
    "RtpSession",
    "rtcp_interval",
    "random_unit",
]

RTP_SEQ_MOD = 1 << 16
MAX_DROPOUT = 3000
MAX_MISORDER = 100
MIN_SEQUENTIAL = 2
#: Timestamp check: a media packet in sequence may advance the RTP clock by the
#: time since the previous one plus this much; less than 0 or more is a jump.
TS_SLACK_S = 1.0

RTCP_MIN_TIME_S = 5.0
# e - 3/2: compensates the randomisation's bias towards short intervals (§6.3.1).
_COMPENSATION = 2.71828 - 1.5
# IPv4 + UDP header octets, counted into the RTCP average size (§6.2).
_UDP_IP_OVERHEAD = 28


class RandomBits(Protocol):
    """Anything with ``getrandbits``: ``secrets.SystemRandom()`` or ``random.Random(7)``."""

    def getrandbits(self, k: int, /) -> int: ...


def random_unit(rng: RandomBits) -> float:
    """A uniform float in [0, 1) drawn from ``rng``."""
    return rng.getrandbits(53) / 9007199254740992.0


class SeqStatus(enum.IntEnum):
    """Outcome of :meth:`RtpReceiverStats.update` (RFC 3550 A.1)."""

    VALID = 0
    #: Still validating a new source: not yet MIN_SEQUENTIAL in a row.
    PROBATION = 1
    #: A large jump; dropped unless the next packet confirms it.
    BAD = 2
    #: The confirmed jump: the sender restarted its sequence numbering.
    RESTARTED = 3


class ReceiveStatus(enum.IntEnum):
    """What the caller should do with a received RTP packet."""

    #: Deliver it (to the jitter buffer).
    ACCEPTED = 0
    #: Reset jitter buffer/decoder, then deliver it: new SSRC or restarted numbering.
    NEW_STREAM = 1
    #: Drop it: a source still on probation.
    PROBATION = 2
    #: Drop it: an unconfirmed sequence jump.
    INVALID = 3
    #: Drop it: from an SSRC that was replaced or said BYE.
    STALE_SOURCE = 4


class RtpReceiverStats:
    """Reception statistics of one remote SSRC (RFC 3550 A.1, A.3, A.8).

    State: on probation until ``min_sequential`` packets arrive in sequence;
    then valid.  A jump of more than MAX_DROPOUT ahead (or MAX_MISORDER
    behind) is BAD once, and RESTARTED if the next packet follows it (the
    A.1 ``bad_seq`` rule).

    With ``check_timestamps``, media packets (not RFC 4733 events, whose
    timestamp is the event start) are held to their RTP clock as well: a
    packet in sequence whose timestamp goes backwards or advances more than
    the arrival time since the previous one plus :data:`TS_SLACK_S`, or a
    packet behind in sequence whose timestamp is ahead (a sequence restart
    to nearby numbers), is a jump handled by the same rule: BAD once,
    RESTARTED when the next packet follows it in sequence and timestamp.
    """

    __slots__ = (
        "ssrc",
        "clock_rate_hz",
        "base_seq",
        "max_seq",
        "bad_seq",
        "cycles",
        "probation",
        "received",
        "expected_prior",
        "received_prior",
        "transit",
        "jitter",
        "_have_transit",
        "last_sr_lsr",
        "last_sr_at",
        "_min_sequential",
        "_check_ts",
        "max_ts",
        "max_ts_at",
        "bad_ts",
        "bad_at",
    )

    def __init__(
        self, ssrc: int, seq: int, clock_rate_hz: int, min_sequential: int = MIN_SEQUENTIAL,
        *, check_timestamps: bool = False,
    ) -> None:
        self.ssrc = ssrc
        self.clock_rate_hz = clock_rate_hz
        self._min_sequential = min_sequential
        self._check_ts = check_timestamps
        self.jitter = 0.0
        self.transit = 0.0
        self._have_transit = False
        self.last_sr_lsr = 0
        self.last_sr_at: float | None = None
        #: Timestamp of the newest media packet in sequence and its arrival (-1: none yet).
        self.max_ts = 0
        self.max_ts_at = -1.0
        self.bad_ts = 0
        self.bad_at = 0.0
        self._init_seq(seq)
        self.max_seq = (seq - 1) & 0xFFFF
        self.probation = min_sequential

    def _init_seq(self, seq: int) -> None:
        self.base_seq = seq
        self.max_seq = seq
        self.bad_seq = RTP_SEQ_MOD + 1  # so seq == bad_seq is false
        self.cycles = 0
        self.received = 0
        self.received_prior = 0
        self.expected_prior = 0

    @property
    def valid(self) -> bool:
        """Whether the source has passed probation."""
        return self.probation == 0

    def _ts_follows(self, rtp_ts: int, now: float, ref_ts: int, ref_at: float) -> bool:
        """Whether ``rtp_ts`` at ``now`` may follow ``ref_ts`` received at ``ref_at`` in sequence."""
        step = ts_diff(rtp_ts, ref_ts)
        return 0 <= step <= (now - ref_at + TS_SLACK_S) * self.clock_rate_hz

    def update(self, seq: int, rtp_ts: int, now: float, media: bool = True) -> SeqStatus:
        """Account one packet (A.1 ``update_seq`` plus the A.8 jitter estimate).

        ``media`` is False for packets whose timestamp is not the media clock
        (RFC 4733 events): they are never checked against it.
        """
        udelta = (seq - self.max_seq) & 0xFFFF
        check = media and self._check_ts
        if self.probation:
            if seq == (self.max_seq + 1) & 0xFFFF:
                self.probation -= 1
                self.max_seq = seq
                if self.probation == 0:
                    self._init_seq(seq)
                    self.received += 1
                    if media:
                        self.max_ts, self.max_ts_at = rtp_ts, now
                    self._update_jitter(rtp_ts, now)
                    return SeqStatus.VALID
            else:
                self.probation = self._min_sequential - 1
                self.max_seq = seq
            return SeqStatus.PROBATION
        if udelta < MAX_DROPOUT:
            if udelta:
                if check and self.max_ts_at >= 0.0 and not self._ts_follows(rtp_ts, now, self.max_ts, self.max_ts_at):
                    return self._jump(seq, rtp_ts, now, check, False)
                if seq < self.max_seq:
                    self.cycles += RTP_SEQ_MOD
                self.max_seq = seq
                if media:
                    self.max_ts, self.max_ts_at = rtp_ts, now
        elif udelta <= RTP_SEQ_MOD - MAX_MISORDER:
            return self._jump(seq, rtp_ts, now, check, True)
        elif check and self.max_ts_at >= 0.0 and ts_diff(rtp_ts, self.max_ts) > 0:
            # Behind in sequence but ahead in time: not a reordered packet.
            return self._jump(seq, rtp_ts, now, check, True)
        # else: duplicate or reordered, still counted
        self.received += 1
        self._update_jitter(rtp_ts, now)
        return SeqStatus.VALID

    def _jump(self, seq: int, rtp_ts: int, now: float, check: bool, renumbered: bool) -> SeqStatus:
        """A discontinuity: BAD, or RESTARTED if it follows the previous BAD packet (A.1 ``bad_seq``)."""
        if seq == self.bad_seq and (not check or self._ts_follows(rtp_ts, now, self.bad_ts, self.bad_at)):
            # Two sequential packets after a jump: the sender restarted.
            if renumbered:
                self._init_seq(seq)
            else:
                if seq < self.max_seq:
                    self.cycles += RTP_SEQ_MOD
                self.max_seq = seq
                self.bad_seq = RTP_SEQ_MOD + 1
            self._have_transit = False
            self.max_ts, self.max_ts_at = rtp_ts, now
            self.received += 1
            self._update_jitter(rtp_ts, now)
            return SeqStatus.RESTARTED
        self.bad_seq = (seq + 1) & 0xFFFF
        self.bad_ts, self.bad_at = rtp_ts, now
        return SeqStatus.BAD

    def _update_jitter(self, rtp_ts: int, now: float) -> None:
        transit = now * self.clock_rate_hz - rtp_ts
        if self._have_transit:
            d = transit - self.transit
            # The 32-bit timestamp may have wrapped between the two packets.
            d = (d + 2147483648.0) % 4294967296.0 - 2147483648.0
            self.jitter += (abs(d) - self.jitter) / 16.0
        self.transit = transit
        self._have_transit = True

    @property
    def extended_max_seq(self) -> int:
        """Highest sequence number received, extended with the wrap count."""
        return self.cycles + self.max_seq

    @property
    def expected(self) -> int:
        """Packets expected since the base sequence number (A.3)."""
        return self.extended_max_seq - self.base_seq + 1

    @property
    def cumulative_lost(self) -> int:
        """Expected minus received, clamped to the 24-bit signed field (A.3)."""
        return max(-0x800000, min(0x7FFFFF, self.expected - self.received))

    def on_sender_report(self, sr: SenderReport, now: float) -> None:
        """Remember the SR's NTP time so the next report block carries LSR/DLSR."""
        self.last_sr_lsr = ntp_middle32(sr.ntp_timestamp)
        self.last_sr_at = now

    def report_block(self, now: float) -> ReportBlock:
        """Build the report block for this source and start a new interval (A.3)."""
        expected = self.expected
        expected_interval = expected - self.expected_prior
        self.expected_prior = expected
        received_interval = self.received - self.received_prior
        self.received_prior = self.received
        lost_interval = expected_interval - received_interval
        if expected_interval == 0 or lost_interval <= 0:
            fraction = 0
        else:
            fraction = min(255, (lost_interval << 8) // expected_interval)
        if self.last_sr_at is None:
            lsr = dlsr = 0
        else:
            lsr = self.last_sr_lsr
            dlsr = int((now - self.last_sr_at) * 65536.0) & 0xFFFFFFFF
        return ReportBlock(
            self.ssrc, fraction, self.cumulative_lost, self.extended_max_seq & 0xFFFFFFFF,
            int(self.jitter), lsr, dlsr,
        )


class RtpReceiver:
    """Tracks the remote source of one RTP session and follows SSRC changes.

    States: no source -> (candidate on probation) -> current source.  A packet
    from another SSRC starts a candidate; when the candidate passes probation
    it becomes current (``NEW_STREAM``) and the old SSRC is retired, so its
    stragglers are ``STALE_SOURCE`` rather than a flip-flop back.
    """

    __slots__ = ("clock_rate_hz", "current", "candidate", "_retired", "_min_sequential", "_check_ts")

    def __init__(
        self, clock_rate_hz: int, min_sequential: int = MIN_SEQUENTIAL, *, check_timestamps: bool = False
    ) -> None:
        self.clock_rate_hz = clock_rate_hz
        self._min_sequential = min_sequential
        self._check_ts = check_timestamps
        self.current: RtpReceiverStats | None = None
        self.candidate: RtpReceiverStats | None = None
        self._retired: deque[int] = deque(maxlen=4)

    def receive(self, ssrc: int, seq: int, rtp_ts: int, now: float, media: bool = True) -> ReceiveStatus:
        """Account one packet and say whether to deliver it (``media``: see :meth:`RtpReceiverStats.update`)."""
        cur = self.current
        if cur is not None and ssrc == cur.ssrc:
            status = cur.update(seq, rtp_ts, now, media)
            if status is SeqStatus.VALID:
                return ReceiveStatus.ACCEPTED
            if status is SeqStatus.RESTARTED:
                return ReceiveStatus.NEW_STREAM
            return ReceiveStatus.INVALID
        if ssrc in self._retired:
            return ReceiveStatus.STALE_SOURCE
        cand = self.candidate
        if cand is None or cand.ssrc != ssrc:
            cand = self.candidate = RtpReceiverStats(
                ssrc, seq, self.clock_rate_hz, self._min_sequential, check_timestamps=self._check_ts
            )
        if cand.update(seq, rtp_ts, now, media) is not SeqStatus.VALID:
            return ReceiveStatus.PROBATION
        if cur is not None:
            self._retired.append(cur.ssrc)
        self.current = cand
        self.candidate = None
        return ReceiveStatus.NEW_STREAM

    def on_bye(self, ssrc: int) -> bool:
        """Forget a source that sent RTCP BYE; return whether it was the current one."""
        if self.candidate is not None and self.candidate.ssrc == ssrc:
            self.candidate = None
        if self.current is not None and self.current.ssrc == ssrc:
            self._retired.append(ssrc)
            self.current = None
            return True
        return False

    def stats_for(self, ssrc: int) -> RtpReceiverStats | None:
        """The statistics object of ``ssrc`` (current or candidate), if any."""
        for st in (self.current, self.candidate):
            if st is not None and st.ssrc == ssrc:
                return st
        return None


class RtpStream:
    """Our sending stream: SSRC, next sequence number and timestamp, counters.

    Initial SSRC, sequence number and timestamp are random (RFC 3550 §5.1).
    :meth:`build` packs into one buffer allocated here, so the returned view
    is only valid until the next call.
    """

    __slots__ = (
        "ssrc",
        "sequence",
        "timestamp",
        "payload_type",
        "clock_rate_hz",
        "packet_count",
        "octet_count",
        "last_rtp_ts",
        "last_sent_at",
        "_buf",
        "_view",
    )

    def __init__(
        self, rng: RandomBits, clock_rate_hz: int, payload_type: int, *, ssrc: int | None = None, mtu: int = 1500
    ) -> None:
        self.ssrc = rng.getrandbits(32) if ssrc is None else ssrc
        self.sequence = rng.getrandbits(16)
        self.timestamp = rng.getrandbits(32)
        self.payload_type = payload_type
        self.clock_rate_hz = clock_rate_hz
        self.packet_count = 0
        self.octet_count = 0
        self.last_rtp_ts = self.timestamp
        self.last_sent_at: float | None = None
        self._buf = bytearray(mtu)
        self._view = memoryview(self._buf)

    def build(
        self,
        payload: bytes | bytearray | memoryview,
        samples: int,
        now: float,
        *,
        marker: bool = False,
        payload_type: int | None = None,
        rtp_ts: int | None = None,
    ) -> memoryview:
        """Pack the next packet, then advance the sequence number and the media clock by ``samples``.

        ``rtp_ts`` overrides the packet's timestamp (RFC 4733 events keep the
        timestamp of the event start) without stopping the media clock.
        """
        ts = self.timestamp if rtp_ts is None else rtp_ts
        n = build_rtp_into(
            self._buf,
            self.payload_type if payload_type is None else payload_type,
            self.sequence,
            ts,
            self.ssrc,
            payload,
            marker=marker,
        )
        self.sequence = (self.sequence + 1) & 0xFFFF
        self.last_rtp_ts = self.timestamp
        self.timestamp = (self.timestamp + samples) & 0xFFFFFFFF
        self.packet_count += 1
        self.octet_count += len(payload)
        self.last_sent_at = now
        return self._view[:n]

    def skip(self, samples: int) -> None:
        """Advance the media clock without sending (silence suppression, hold)."""
        self.timestamp = (self.timestamp + samples) & 0xFFFFFFFF

    def rtp_timestamp_at(self, now: float) -> int:
        """The RTP timestamp that corresponds to ``now`` (for the SR sender info)."""
        if self.last_sent_at is None:
            return self.timestamp
        return (self.last_rtp_ts + int(round((now - self.last_sent_at) * self.clock_rate_hz))) & 0xFFFFFFFF


def rtcp_interval(
    members: int,
    senders: int,
    rtcp_bw: float,
    we_sent: bool,
    avg_rtcp_size: float,
    initial: bool,
    rand: float,
    min_time_s: float = RTCP_MIN_TIME_S,
) -> float:
    """RFC 3550 A.7 ``rtcp_interval``: seconds to the next report.

    ``rtcp_bw`` is in octets/s (5 % of the session bandwidth); ``rand`` is a
    uniform sample in [0, 1) supplied by the caller.
    """
    min_time = min_time_s / 2.0 if initial else min_time_s
    n = members
    if senders <= members * 0.25:
        if we_sent:
            rtcp_bw *= 0.25
            n = senders
        else:
            rtcp_bw *= 0.75
            n -= senders
    t = avg_rtcp_size * n / rtcp_bw if rtcp_bw > 0 else min_time
    if t < min_time:
        t = min_time
    return t * (rand + 0.5) / _COMPENSATION


class RtcpScheduler:
    """When the next RTCP report is due (RFC 3550 §6.2, §6.3; no reconsideration).

    Two-party sessions: ``members`` and ``senders`` are passed in on each send.
    """

    __slots__ = ("_rng", "_rtcp_bw", "_min_time_s", "avg_rtcp_size", "initial", "_next", "last_sent_at")

    def __init__(
        self, rng: RandomBits, now: float, *, session_bandwidth_bps: int = 64000, min_time_s: float = RTCP_MIN_TIME_S
    ) -> None:
        self._rng = rng
        # RTCP gets 5 % of the session bandwidth, in octets per second.
        self._rtcp_bw = session_bandwidth_bps * 0.05 / 8.0
        self._min_time_s = min_time_s
        # Start from a guess of one small compound (SR + SDES) plus UDP/IP.
        self.avg_rtcp_size = 100.0
        self.initial = True
        self.last_sent_at: float | None = None
        self._next = now + self._interval(2, 1, False)

    def _interval(self, members: int, senders: int, we_sent: bool) -> float:
        return rtcp_interval(
            members, senders, self._rtcp_bw, we_sent, self.avg_rtcp_size, self.initial,
            random_unit(self._rng), self._min_time_s,
        )

    def deadline(self) -> float:
        """When the next report is due."""
        return self._next

    def due(self, now: float) -> bool:
        """Whether a report should be sent at ``now``."""
        return now >= self._next

    def sent(self, now: float, size: int, *, members: int, senders: int, we_sent: bool) -> None:
        """Record a report of ``size`` octets sent at ``now`` and schedule the next one."""
        self.avg_rtcp_size += (size + _UDP_IP_OVERHEAD - self.avg_rtcp_size) / 16.0
        self.initial = False
        self.last_sent_at = now
        self._next = now + self._interval(members, senders, we_sent)


class RtpSession:
    """One RTP session (one media line): our stream, the remote source and RTCP.

    The adapter calls :meth:`receive_rtp`/:meth:`receive_rtcp` for incoming
    packets, :attr:`sender` ``.build`` for outgoing media, and arms one timer
    at :meth:`deadline`, calling :meth:`rtcp_due` when it fires.
    """

    def __init__(
        self,
        rng: RandomBits,
        now: float,
        *,
        clock_rate_hz: int,
        payload_type: int,
        cname: bytes,
        session_bandwidth_bps: int = 64000,
        min_sequential: int = MIN_SEQUENTIAL,
        rtcp_min_time_s: float = RTCP_MIN_TIME_S,
        check_timestamps: bool = False,
    ) -> None:
        self.cname = cname
        self.sender = RtpStream(rng, clock_rate_hz, payload_type)
        self.receiver = RtpReceiver(clock_rate_hz, min_sequential, check_timestamps=check_timestamps)
        self.scheduler = RtcpScheduler(
            rng, now, session_bandwidth_bps=session_bandwidth_bps, min_time_s=rtcp_min_time_s
        )
        #: Round-trip time from the last report about us (§6.4.1), seconds.
        self.rtt_s: float | None = None
        self._packets_at_last_report = 0
        self._sent_since_report = False

    def receive_rtp(self, header: RtpHeaderView, now: float, media: bool = True) -> ReceiveStatus:
        """Account an incoming RTP packet; see :class:`ReceiveStatus` (``media`` False for RFC 4733 events)."""
        return self.receiver.receive(header.ssrc, header.sequence, header.timestamp, now, media)

    def receive_rtcp(self, packets: list[RtcpPacket], now: float) -> list[int]:
        """Take in a parsed compound RTCP packet; return the SSRCs that said BYE."""
        byes: list[int] = []
        our_ssrc = self.sender.ssrc
        for p in packets:
            if isinstance(p, SenderReport):
                st = self.receiver.stats_for(p.ssrc)
                if st is not None:
                    st.on_sender_report(p, now)
            if isinstance(p, (SenderReport, ReceiverReport)):
                for block in p.reports:
                    if block.ssrc == our_ssrc and block.lsr:
                        # RTT = A - LSR - DLSR, all in 1/65536 s (§6.4.1).
                        a = ntp_middle32(ntp_from_seconds(now))
                        rtt = ((a - block.lsr - block.dlsr) & 0xFFFFFFFF) / 65536.0
                        if rtt < 60.0:
                            self.rtt_s = rtt
            elif isinstance(p, Bye):
                for ssrc in p.sources:
                    self.receiver.on_bye(ssrc)
                    byes.append(ssrc)
        return byes

    def deadline(self) -> float:
        """When :meth:`rtcp_due` should next be called."""
        return self.scheduler.deadline()

    def _report(self, now: float) -> list[RtcpPacket]:
        blocks: tuple[ReportBlock, ...] = ()
        cur = self.receiver.current
        if cur is not None:
            blocks = (cur.report_block(now),)
        sender = self.sender
        we_sent = sender.packet_count != self._packets_at_last_report
        self._sent_since_report = we_sent
        self._packets_at_last_report = sender.packet_count
        report: RtcpPacket
        if we_sent:
            ntp = ntp_from_seconds(now)
            report = SenderReport(
                sender.ssrc, ntp, sender.rtp_timestamp_at(now), sender.packet_count, sender.octet_count, blocks
            )
        else:
            report = ReceiverReport(sender.ssrc, blocks)
        sdes = SourceDescription((SdesChunk(sender.ssrc, ((SDES_CNAME, self.cname),)),))
        return [report, sdes]

    def rtcp_due(self, now: float) -> bytes | None:
        """If a report is due, build the SR/RR + SDES compound and reschedule."""
        if not self.scheduler.due(now):
            return None
        data = build_rtcp(self._report(now))
        senders = int(self._sent_since_report) + int(self.receiver.current is not None)
        self.scheduler.sent(now, len(data), members=2, senders=max(senders, 1), we_sent=self._sent_since_report)
        return data

    def bye(self, now: float, reason: bytes = b"") -> bytes:
        """Build the final compound: SR/RR, SDES CNAME and BYE (§6.6)."""
        packets = self._report(now)
        packets.append(Bye((self.sender.ssrc,), reason))
        return build_rtcp(packets)
