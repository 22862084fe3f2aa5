"""mediaPass pieces: the URL, packets to the server, frames from it (ptime, bounds, odd bytes)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.call.mediapass import MAX_BUFFER_S, _FromServer, _ToServer, media_pass_url
from activecall.options import MediaPassOption


def option(**kw: object) -> MediaPassOption:
    base = {"url": "ws://h/x?a=1", "input_sample_rate": 16000, "output_sample_rate": 16000}
    base.update(kw)
    return MediaPassOption(**base)  # type: ignore[arg-type]


class MediaPassTests(SynchronousTestCase):
    def test_url_gets_rate_and_packet_size(self) -> None:
        self.assertEqual(media_pass_url(option(output_sample_rate=8000)), "ws://h/x?a=1&sample_rate=8000&packet_size=3200")
        self.assertEqual(media_pass_url(option(url="wss://h")), "wss://h/?sample_rate=16000&packet_size=3200")

    def test_packets_are_counted_at_16k_then_resampled(self) -> None:
        sent: list[bytes] = []
        to_server = _ToServer(sent.append, 8000, option(packet_size=1000, output_sample_rate=8000))
        for _ in range(10):
            to_server.write_frame(bytes(320))  # 20 ms at 8 kHz = 640 bytes at 16 kHz
        self.assertEqual(len(sent), 6)  # 6400 bytes at 16 kHz in 1000-byte packets
        self.assertEqual({len(p) for p in sent[1:]}, {500})

    def test_frames_from_the_server(self) -> None:
        """Without ptime a partial frame waits; with ptime playback starts after that much and a late packet
        is silence; odd bytes carry over; beyond 10 s the oldest audio goes."""
        plain = _FromServer(16000, 640, option())
        plain.push(b"\x01" * 641)
        self.assertEqual(plain.read_frame(), b"\x01" * 640)
        self.assertIsNone(plain.read_frame())  # 1 odd byte kept, nothing to play
        plain.push(b"\x01" * 639)
        self.assertEqual(plain.read_frame(), b"\x01" * 640)

        steady = _FromServer(16000, 640, option(ptime=60))
        steady.push(b"\x02" * 1280)
        self.assertIsNone(steady.read_frame())  # 40 ms < ptime 60
        steady.push(b"\x02" * 700)
        self.assertEqual([steady.read_frame() for _ in range(3)], [b"\x02" * 640] * 3)
        self.assertEqual(steady.read_frame(), b"\x02" * 60 + bytes(580))
        self.assertEqual(steady.read_frame(), bytes(640))  # late: silence, not a pause

        bounded = _FromServer(8000, 320, option(input_sample_rate=8000))
        bounded.push(bytes(MAX_BUFFER_S * 16000 + 1000))
        self.assertEqual(bounded.dropped_bytes, 1000)
