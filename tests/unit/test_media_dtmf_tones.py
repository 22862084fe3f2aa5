"""In-band DTMF generation: what a detector hears, frame sizes, bad digits and a bounded queue."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.media.dtmf_detect import InbandDtmfDetector
from activecall.media.dtmf_tones import MAX_QUEUED_DIGITS, DtmfTones


class DtmfTonesTests(SynchronousTestCase):
    def test_every_key_is_heard_back_once_at_8_and_16_khz(self) -> None:
        for rate in (8000, 16000):
            tones = DtmfTones(rate)
            tones.push("0123456789*#ABCD")
            frames = []
            while (frame := tones.next_frame()) is not None:
                frames.append(frame)
            self.assertEqual({len(f) for f in frames}, {rate // 50 * 2})
            self.assertEqual(len(frames), 16 * 8)  # 100 ms of tone + 60 ms of silence per key
            self.assertEqual("".join(InbandDtmfDetector(rate).feed(b"".join(frames))), "0123456789*#ABCD")
            self.assertFalse(tones.busy)

    def test_bad_digit_and_flood(self) -> None:
        tones = DtmfTones(16000)
        self.assertRaises(ValueError, tones.push, "12x")
        self.assertFalse(tones.busy)  # nothing of a refused string is queued
        tones.push("5" * (MAX_QUEUED_DIGITS + 3))
        self.assertEqual(tones.dropped, 3)
        self.assertIsNone(DtmfTones(8000).next_frame())
