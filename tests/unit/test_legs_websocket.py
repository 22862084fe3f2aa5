"""Tests for activecall.legs.websocket: the /call leg, its control-socket audio and its dialer, on a Clock."""

from __future__ import annotations

import random
from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from activecall.ids import IdSource
from activecall.legs import NO_EVENTS
from activecall.legs.websocket import MAX_EARLY_AUDIO_BYTES, ControlSocketAudio, WebSocketDialer, WebSocketLeg
from activecall.media.clock import PROCESS, MediaClock
from activecall.media.codecs import make_decoder, make_encoder
from activecall.media.tracks import FrameQueue, ILeg, ILegDialer, LegSetupError
from activecall.options import CallOption


class CountingIds(IdSource):
    """A seeded IdSource counting ssrc() calls."""

    def __init__(self) -> None:
        super().__init__(random.Random(7))
        self.ssrcs = 0

    def ssrc(self) -> int:
        self.ssrcs += 1
        return super().ssrc()


class ListSink:
    """An AudioSink keeping every frame."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write_frame(self, frame: bytes) -> None:
        self.frames.append(frame)


class WebSocketLegTests(SynchronousTestCase):
    """Framing, codecs, early audio, ticking and closing."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.media_clock = MediaClock(self.clock)
        self.sent: list[bytes] = []
        self.port = ControlSocketAudio(self.sent.append)
        self.ids = CountingIds()
        self.dialer = WebSocketDialer(self.port, self.media_clock, self.clock, self.ids)

    def dial(self, codec: str = "pcm", sample_rate: int = 16000) -> WebSocketLeg:
        option = CallOption(codec=codec, sample_rate=sample_rate)
        leg = self.successResultOf(self.dialer.dial(option, "call-1", lambda early: self.fail("no ringing")))
        self.assertIsInstance(leg, WebSocketLeg)
        return leg

    def attach(self, leg: WebSocketLeg) -> tuple[FrameQueue, ListSink]:
        source, sink = FrameQueue(), ListSink()
        leg.attach(source, sink, NO_EVENTS)
        return source, sink

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.clock.advance(0.02)

    def test_interfaces_and_attributes(self) -> None:
        """The leg provides ILeg (audio on the control socket, no transfer, no SDP) and the dialer ILegDialer."""
        leg = self.dial()
        verifyObject(ILeg, leg)
        verifyObject(ILegDialer, self.dialer)
        self.assertEqual((leg.audio_on_control_socket, leg.can_transfer, leg.answer_sdp), (True, False, ""))
        self.assertEqual((leg.media_rate_hz, leg.frame_bytes), (16000, 640))
        self.assertIsNone(leg.last_activity_at)
        self.failureResultOf(leg.refer("sip:x@example.com"), LegSetupError)

    def test_dial_takes_one_ssrc(self) -> None:
        """dial() draws exactly one ssrc from the id source and the leg reports it."""
        expected = IdSource(random.Random(7)).ssrc()
        leg = self.dial()
        self.assertEqual((self.ids.ssrcs, leg.ssrc), (1, expected))

    def test_codec_rates(self) -> None:
        """pcm runs at sampleRate, pcmu/pcma at 8 kHz, g722 at 16 kHz; unknown codecs are pcm."""
        for codec, rate, expected in (("pcm", 24000, 24000), ("pcmu", 16000, 8000), ("pcma", 48000, 8000),
                                      ("g722", 8000, 16000), ("opus", 8000, 8000)):
            with self.subTest(codec=codec):
                leg = self.dial(codec, rate)
                self.assertEqual((leg.media_rate_hz, leg.frame_bytes), (expected, expected // 50 * 2))

    def test_complete_frames_in_the_receive_phase(self) -> None:
        """Payloads are cut into 20 ms frames, all complete ones delivered in order on the next tick; the rest waits."""
        leg = self.dial()
        _, sink = self.attach(leg)
        data = bytes(range(256)) * 10  # 2560 bytes: four frames
        self.port.receive(data[:1000])
        self.port.receive(data[1000:2000] + b"\x01")  # odd length: the last byte waits for its pair
        self.assertEqual(sink.frames, [])
        self.assertEqual(leg.last_activity_at, 1000.0)
        self.tick()
        self.assertEqual(sink.frames, [data[:640], data[640:1280], data[1280:1920]])
        self.port.receive(b"\x02" + data[2001:2559])
        self.tick()
        self.assertEqual(sink.frames[3:], [data[1920:2000] + b"\x01\x02" + data[2001:2559]])
        self.assertEqual(leg.bytes_received, 2560)

    def test_pcmu_decoded_on_arrival(self) -> None:
        """PCMU payloads are decoded to 8 kHz PCM frames of 320 bytes."""
        leg = self.dial("pcmu")
        _, sink = self.attach(leg)
        payload = make_encoder("pcmu", 8000).encode(bytes(range(0, 200, 2)) * 8)
        self.port.receive(payload[:300])
        self.port.receive(payload[300:])
        self.tick()
        self.assertEqual(b"".join(sink.frames), make_decoder("pcmu", 8000).decode(payload)[:640])

    def test_early_audio_handed_over_at_attach(self) -> None:
        """Audio before the leg exists is kept (10 s at most, whole payloads) and delivered once it attaches."""
        chunk = bytes(32000)
        for _ in range(11):
            self.port.receive(chunk)
        self.assertEqual(self.port.early_dropped_bytes, 32000)
        self.clock.advance(5)
        leg = self.dial()
        self.assertIsNone(leg.last_activity_at)
        _, sink = self.attach(leg)
        self.assertEqual(leg.bytes_received, MAX_EARLY_AUDIO_BYTES)
        self.assertEqual(leg.last_activity_at, 1005.0)
        self.tick()
        self.assertEqual(len(sink.frames), MAX_EARLY_AUDIO_BYTES // 640)

    def test_buffer_is_bounded(self) -> None:
        """More than 10 s of caller audio between two ticks: the excess is dropped and counted."""
        leg = self.dial("pcm", 8000)
        _, sink = self.attach(leg)
        for _ in range(11):
            self.port.receive(bytes(16000))
        self.assertEqual(leg.dropped_bytes, 16000)
        self.tick()
        self.assertEqual(len(sink.frames), 10 * 50)

    def test_agent_frames_sent_in_the_send_phase(self) -> None:
        """Each tick reads the source once and sends a frame as one encoded Binary frame; None sends nothing."""
        leg = self.dial("pcmu")
        source, _ = self.attach(leg)
        pcm = bytes(range(0, 256, 2)) * 2 + bytes(64)
        source.write_frame(pcm)
        self.tick()
        self.tick()
        self.assertEqual(self.sent, [make_encoder("pcmu", 8000).encode(pcm)])
        self.assertEqual(leg.frames_sent, 1)

    def test_send_sees_this_ticks_caller_frame(self) -> None:
        """A processor in the PROCESS phase copying caller frames to the source gets them sent on the same tick."""
        leg = self.dial()
        source, sink = FrameQueue(), ListSink()

        class Copier:
            def media_tick(self, frames: int) -> None:
                for frame in sink.frames:
                    source.write_frame(frame)
                sink.frames.clear()

        self.media_clock.subscribe(Copier(), PROCESS)
        leg.attach(source, sink, NO_EVENTS)
        self.port.receive(b"\x07\x00" * 320)
        self.tick()
        self.assertEqual(self.sent, [b"\x07\x00" * 320])

    def test_close_unsubscribes_and_is_idempotent(self) -> None:
        """close() fires at once, stops the ticks, drops later client audio and can be called again."""
        leg = self.dial()
        source, sink = self.attach(leg)
        self.assertEqual(len(self.media_clock), 2)
        self.successResultOf(leg.close())
        self.assertEqual(len(self.media_clock), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.port.receive(bytes(640))
        self.assertEqual(leg.bytes_received, 0)
        self.successResultOf(leg.close({"X-Reason": "done"}))

    def test_source_that_closes_the_leg(self) -> None:
        """A source closing its leg while it is read: nothing is sent and the clock stops cleanly."""
        leg = self.dial()
        holder: list[WebSocketLeg] = [leg]

        class Closing:
            def read_frame(self) -> Optional[bytes]:
                holder[0].close()
                return bytes(640)

        leg.attach(Closing(), ListSink(), NO_EVENTS)
        self.tick()
        self.assertEqual(self.sent, [])
        self.assertEqual(len(self.media_clock), 0)

    def test_sink_that_closes_the_leg(self) -> None:
        """A sink closing its leg on the first frame gets no further frames of that tick."""
        leg = self.dial()

        class Closing:
            frames = 0

            def write_frame(self, frame: bytes) -> None:
                self.frames += 1
                leg.close()

        sink: Any = Closing()
        leg.attach(FrameQueue(), sink, NO_EVENTS)
        self.port.receive(bytes(640 * 3))
        self.tick()
        self.assertEqual(sink.frames, 1)
