"""Tests for activecall.rtp.dtmf: RFC 4733 telephone-event receive and send."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from activecall.rtp.dtmf import DtmfPacket, DtmfReceiver, DtmfSender, digit_to_event, event_to_digit
from activecall.rtp.packet import TelephoneEvent, parse_telephone_event

T0 = 500.0


def _run(sender: DtmfSender, ticks: int, ts0: int = 1000) -> list[DtmfPacket | None]:
    """Tick the sender ``ticks`` times with a media clock advancing 160 per tick."""
    return [sender.tick((ts0 + 160 * i) & 0xFFFFFFFF) for i in range(ticks)]


def _press(ts: int, event: int, n: int = 5, repeats: int = 3) -> list[tuple[int, TelephoneEvent]]:
    """The packets of one press as a sender emits them: (rtp_ts, event)."""
    out = [(ts, TelephoneEvent(event, False, 10, 160 * k)) for k in range(1, n)]
    out += [(ts, TelephoneEvent(event, True, 10, 160 * n))] * repeats
    return out


class MappingTests(SynchronousTestCase):
    """Event codes map to DTMF characters per RFC 4733 §3.2."""

    def test_mapping(self) -> None:
        """0-9, *, #, A-D map both ways; other events and characters do not."""
        self.assertEqual("".join(event_to_digit(i) or "?" for i in range(17)), "0123456789*#ABCD?")
        self.assertEqual([digit_to_event(d) for d in "09*#AaD"], [0, 9, 10, 11, 12, 12, 15])
        for bad in ("E", "", "12", " "):
            with self.assertRaises(ValueError):
                digit_to_event(bad)


class ReceiverTests(SynchronousTestCase):
    """One digit per key press, whatever packets arrive."""

    def _feed_all(self, rx: DtmfReceiver, packets: list[tuple[int, TelephoneEvent]], ssrc: int = 7) -> list[str]:
        out = []
        for i, (ts, ev) in enumerate(packets):
            d = rx.feed(ssrc, ts, ev, T0 + 0.02 * i)
            if d is not None:
                out.append(d)
        return out

    def test_one_digit_per_press(self) -> None:
        """A full press with three end packets yields its digit once, on the first packet."""
        rx = DtmfReceiver()
        packets = _press(1000, 5)
        self.assertEqual(rx.feed(7, 1000, packets[0][1], T0), "5")
        self.assertEqual(self._feed_all(rx, packets[1:]), [])

    def test_retransmits_and_duplicates(self) -> None:
        """Duplicated and reordered packets of the same press produce nothing more."""
        rx = DtmfReceiver()
        packets = _press(1000, 11)
        mixed = packets[2:] + packets + packets[:3]
        self.assertEqual(self._feed_all(rx, mixed), ["#"])

    def test_lost_start_still_yields_digit(self) -> None:
        """If only the end packets arrive, the digit is still reported once."""
        rx = DtmfReceiver()
        self.assertEqual(self._feed_all(rx, _press(1000, 1)[-3:]), ["1"])

    def test_same_digit_twice(self) -> None:
        """Two presses of the same key are told apart by their timestamps."""
        rx = DtmfReceiver()
        self.assertEqual(self._feed_all(rx, _press(1000, 3) + _press(3000, 3)), ["3", "3"])

    def test_timestamp_wrap(self) -> None:
        """Presses across the 32-bit timestamp wrap are both reported, in order."""
        rx = DtmfReceiver()
        self.assertEqual(self._feed_all(rx, _press(0xFFFFFF00, 2) + _press(0x400, 4)), ["2", "4"])

    def test_stale_retransmission_ignored(self) -> None:
        """An old press's packet arriving after newer presses (beyond history) is not reported again."""
        rx = DtmfReceiver(history=2)
        packets = _press(1000, 1) + _press(2000, 2) + _press(3000, 3) + _press(1000, 1)[-1:]
        self.assertEqual(self._feed_all(rx, packets), ["1", "2", "3"])

    def test_other_ssrc_is_separate(self) -> None:
        """The same timestamp from another SSRC (new stream) is a separate press."""
        rx = DtmfReceiver()
        self.assertEqual(rx.feed(1, 1000, TelephoneEvent(9, False, 10, 160), T0), "9")
        self.assertEqual(rx.feed(2, 1000, TelephoneEvent(9, False, 10, 160), T0), "9")

    def test_non_dtmf_events_ignored(self) -> None:
        """Events above 15 (flash, tones) are not digits."""
        rx = DtmfReceiver()
        self.assertIsNone(rx.feed(1, 1000, TelephoneEvent(16, False, 10, 160), T0))

    def test_frozen_timestamp_peer(self) -> None:
        """A peer reusing the timestamp gets a new press once the old one ended and time has passed."""
        rx = DtmfReceiver(reuse_after_s=1.0)
        self.assertEqual(rx.feed(1, 50, TelephoneEvent(6, False, 10, 160), T0), "6")
        self.assertIsNone(rx.feed(1, 50, TelephoneEvent(6, True, 10, 800), T0 + 0.1))
        self.assertIsNone(rx.feed(1, 50, TelephoneEvent(6, True, 10, 800), T0 + 0.2))
        self.assertEqual(rx.feed(1, 50, TelephoneEvent(6, False, 10, 160), T0 + 3.0), "6")
        self.assertIsNone(rx.feed(1, 50, TelephoneEvent(6, False, 10, 320), T0 + 3.02))

    @given(
        digits=st.lists(st.integers(0, 15), min_size=1, max_size=6),
        plan=st.lists(st.tuples(st.booleans(), st.integers(0, 2)), min_size=7 * 6, max_size=7 * 6),
    )
    def test_any_loss_or_duplication(self, digits: list[int], plan: list[tuple[bool, int]]) -> None:
        """With any packets lost or repeated, each press that delivers at least one packet yields one digit."""
        rx = DtmfReceiver()
        expected, got = [], []
        for n, event in enumerate(digits):
            packets = _press(10_000 + 2_000 * n, event)
            delivered = False
            for i, pkt in enumerate(packets):
                keep, copies = plan[n * 7 + i]
                if not keep and not (i == len(packets) - 1 and not delivered):
                    continue
                delivered = True
                for _ in range(1 + copies):
                    d = rx.feed(7, pkt[0], pkt[1], T0 + n)
                    if d is not None:
                        got.append(d)
            expected.append(event_to_digit(event))
        self.assertEqual(got, expected)


class SenderTests(SynchronousTestCase):
    """The sender emits correct durations, end bits, markers and timestamps."""

    def test_default_digit(self) -> None:
        """A 100 ms digit at 8 kHz: durations 160..640, then 800 with the end bit three times."""
        tx = DtmfSender()
        tx.send("5")
        packets = _run(tx, 8)
        self.assertIsNone(packets[7])
        sent = [p for p in packets if p is not None]
        self.assertEqual([p.event.duration for p in sent], [160, 320, 480, 640, 800, 800, 800])
        self.assertEqual([p.event.end for p in sent], [False] * 4 + [True] * 3)
        self.assertEqual([p.marker for p in sent], [True] + [False] * 6)
        self.assertEqual({p.rtp_ts for p in sent}, {1000})
        self.assertEqual({(p.event.event, p.event.volume) for p in sent}, {(5, 10)})
        self.assertEqual(parse_telephone_event(sent[4].payload), TelephoneEvent(5, True, 10, 800))

    def test_digits_in_sequence_with_gap(self) -> None:
        """Queued digits play one after another, each with its own start timestamp, after a 60 ms gap."""
        tx = DtmfSender()
        tx.send("1#")
        packets = _run(tx, 20)
        firsts = [(i, p) for i, p in enumerate(packets) if p is not None and p.marker]
        self.assertEqual([(i, p.event.event, p.rtp_ts) for i, p in firsts], [(0, 1, 1000), (10, 11, 1000 + 1600)])
        self.assertEqual(packets[7:10], [None, None, None])
        self.assertFalse(tx.busy)

    def test_wideband_and_custom_duration(self) -> None:
        """At 16 kHz a 60 ms digit grows by 320 per tick and ends at 960."""
        tx = DtmfSender(16000, duration_ms=60, volume=0, end_repeats=3)
        tx.send("D")
        sent = [p for p in _run(tx, 6) if p is not None]
        self.assertEqual([(p.event.duration, p.event.end) for p in sent], [(320, False), (640, False), (960, True), (960, True), (960, True)])
        self.assertEqual(sent[0].event.volume, 0)

    def test_round_trip_with_receiver(self) -> None:
        """Everything the sender emits for a digit string is received as exactly that string."""
        tx, rx = DtmfSender(), DtmfReceiver()
        tx.send("1234567890*#ABCD")
        got = []
        for i, p in enumerate(_run(tx, 200)):
            if p is not None:
                d = rx.feed(3, p.rtp_ts, parse_telephone_event(p.payload), T0 + 0.02 * i)
                if d:
                    got.append(d)
        self.assertEqual("".join(got), "1234567890*#ABCD")

    def test_cancel_finishes_current_digit(self) -> None:
        """cancel() drops queued digits but the digit in progress still ends with its end packets."""
        tx = DtmfSender()
        tx.send("12")
        _run(tx, 2)
        tx.cancel()
        rest = [p for p in _run(tx, 20) if p is not None]
        self.assertEqual({p.event.event for p in rest}, {1})
        self.assertTrue(rest[-1].event.end)

    def test_bad_input(self) -> None:
        """Non-DTMF characters, bad volume and over-long durations raise ValueError."""
        with self.assertRaises(ValueError):
            DtmfSender().send("12X")
        with self.assertRaises(ValueError):
            DtmfSender(volume=64)
        with self.assertRaises(ValueError):
            DtmfSender().send("1", duration_ms=10_000)


def _end(ts: int, event: int, duration: int = 800) -> tuple[int, TelephoneEvent]:
    return ts, TelephoneEvent(event, True, 10, duration)


def _start(ts: int, event: int, duration: int = 160) -> tuple[int, TelephoneEvent]:
    return ts, TelephoneEvent(event, False, 10, duration)


class NewEventRuleTests(SynchronousTestCase):
    """RFC 4733 §2.5.1.2: a new event starts on a new timestamp or a new event code (golden sequences)."""

    GOLDEN: list[tuple[str, list[tuple[int, TelephoneEvent]], list[str]]] = [
        ("5 then 5, distinct timestamps", _press(1000, 5) + _press(2600, 5), ["5", "5"]),
        ("end bit three times", [_start(1000, 5), _end(1000, 5), _end(1000, 5), _end(1000, 5)], ["5"]),
        ("only the end packets, three times", [_end(1000, 7)] * 3, ["7"]),
        ("new code, same timestamp", [_start(1000, 5), _end(1000, 5), _start(1000, 6), _end(1000, 6)], ["5", "6"]),
        ("new code, same timestamp, no end", [_start(1000, 1), _start(1000, 2)], ["1", "2"]),
        ("timestamps restarted: 5 then 5 at an older timestamp", _press(900000, 5) + _press(1000, 5), ["5", "5"]),
        ("timestamps restarted: 8 then 9 at an older timestamp", _press(900000, 8) + _press(160, 9), ["8", "9"]),
        ("timestamps restarted, start of the second press lost", _press(900000, 5) + _press(1000, 5)[1:], ["5", "5"]),
        ("three keys in a row", _press(1000, 1) + _press(2000, 2) + _press(3000, 3), ["1", "2", "3"]),
    ]

    def test_golden(self) -> None:
        """Each golden telephone-event sequence gives exactly its digits."""
        for name, packets, digits in self.GOLDEN:
            with self.subTest(name):
                rx = DtmfReceiver()
                out = [rx.feed(7, ts, ev, T0 + 0.02 * i) for i, (ts, ev) in enumerate(packets)]
                self.assertEqual([d for d in out if d is not None], digits, name)

    def test_two_sources(self) -> None:
        """Interleaved presses of two SSRCs are each reported once."""
        rx = DtmfReceiver()
        a, b = _press(1000, 4), _press(1000, 4)
        out = []
        for i, ((ts_a, ev_a), (ts_b, ev_b)) in enumerate(zip(a, b)):
            out.append(rx.feed(1, ts_a, ev_a, T0 + 0.02 * i))
            out.append(rx.feed(2, ts_b, ev_b, T0 + 0.02 * i))
        self.assertEqual([d for d in out if d is not None], ["4", "4"])
