"""Hardening: the in-band DTMF detector takes any byte string without raising."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.media.dtmf_detect import InbandDtmfDetector


class OddLengthTests(SynchronousTestCase):
    """PCM of odd length (a truncated or hostile frame) is not a ValueError from numpy."""

    def test_odd_lengths(self) -> None:
        """One byte, 161 bytes and an odd memoryview are accepted; the odd byte is ignored."""
        detector = InbandDtmfDetector(8000)
        for pcm in (b"\x01", bytes(161), memoryview(bytes(321)), b""):
            self.assertEqual(detector.feed(pcm), [])
