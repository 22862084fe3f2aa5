"""The WebRTC leg against a real aiortc client peer, both on one private asyncio loop on 127.0.0.1.

The daemon runs aiortc on the asyncio reactor's loop; here the test owns the loop
and drives it until each awaited condition holds (with a deadline), and the media
clock runs on that loop's time.
"""

from __future__ import annotations

import asyncio
import math
import struct
from typing import Any, Callable, Optional

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from activecall.media.clock import MediaClock
from activecall.media.tracks import IIceLeg, ILegDialer, ILegEvents, LegOptionError
from activecall.options import CallOption

try:
    import av
    from aiortc import AudioStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.rtp import RtpPacket

    from activecall.legs import webrtc
except ImportError:  # pragma: no cover - aiortc is a dependency
    webrtc = None  # type: ignore[assignment]

DEADLINE_S = 15.0


class _Handle:
    """An IDelayedCall over an asyncio timer handle."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, f: Callable[..., Any], a: Any, kw: Any) -> None:
        self._done = False
        self.time = loop.time() + delay

        def run() -> None:
            self._done = True
            f(*a, **kw)

        self._handle = loop.call_later(delay, run)

    def getTime(self) -> float:
        return self.time

    def cancel(self) -> None:
        self._done = True
        self._handle.cancel()

    def active(self) -> bool:
        return not self._done

    def delay(self, secs: float) -> None:  # pragma: no cover - unused by the leg and the media clock
        raise NotImplementedError

    def reset(self, secs: float) -> None:  # pragma: no cover
        raise NotImplementedError


class LoopTime:
    """IReactorTime on an asyncio loop (what the asyncio reactor is, in miniature)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def seconds(self) -> float:
        return self.loop.time()

    def callLater(self, delay: float, f: Callable[..., Any], *a: Any, **kw: Any) -> _Handle:
        return _Handle(self.loop, delay, f, a, kw)

    def getDelayedCalls(self) -> list[Any]:  # pragma: no cover
        return []


class Tone(AudioStreamTrack if webrtc is not None else object):  # type: ignore[misc]
    """The client's microphone: a 440 Hz tone, paced by aiortc's own AudioStreamTrack."""

    def __init__(self) -> None:
        super().__init__()
        self._n = 0

    async def recv(self) -> Any:
        frame = await super().recv()
        samples = frame.samples
        rate = frame.sample_rate
        pcm = struct.pack(f"<{samples}h", *(int(8000 * math.sin(2 * math.pi * 440 * (self._n + i) / rate))
                                             for i in range(samples)))
        self._n += samples
        frame.planes[0].update(pcm)
        return frame


@implementer(ILegEvents)
class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def media_ready(self) -> None:
        self.seen.append(("media_ready", None))

    def dtmf(self, digit: str) -> None:
        self.seen.append(("dtmf", digit))

    def hold(self, on_hold: bool) -> None:
        self.seen.append(("hold", on_hold))

    def ended(self, cause: str) -> None:
        self.seen.append(("ended", cause))

    def media_ended(self, cause: str) -> None:
        self.seen.append(("media_ended", cause))

    def message(self, body: str, content_type: Optional[str]) -> None:
        self.seen.append(("message", body))

    def transfer_requested(self, refer_to: str, referred_by: Optional[str]) -> None:
        self.seen.append(("transfer_requested", refer_to))

    def transfer_progress(self, status: int, text: str) -> None:
        self.seen.append(("transfer_progress", status))


class ToneSource:
    """Agent audio: a 1 kHz tone at 16 kHz, one 20 ms frame per read."""

    def __init__(self) -> None:
        self._n = 0
        self.reads = 0

    def read_frame(self) -> bytes:
        self.reads += 1
        pcm = struct.pack("<320h", *(int(8000 * math.sin(2 * math.pi * 1000 * (self._n + i) / 16000))
                                     for i in range(320)))
        self._n += 320
        return pcm


class Silence:
    """Agent audio: nothing (the leg sends silence)."""

    def read_frame(self) -> None:
        return None


class Sink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write_frame(self, frame: bytes) -> None:
        self.frames.append(frame)


def rms(pcm: bytes) -> float:
    samples = struct.unpack(f"<{len(pcm) // 2}h", pcm)
    return math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))


class Ids:
    def ssrc(self) -> int:
        return 4242


class WebRtcLegTests(SynchronousTestCase):
    """The leg answers a real aiortc offer, carries audio both ways, takes DTMF and ends cleanly."""

    def setUp(self) -> None:
        if webrtc is None:
            self.skipTest("aiortc is not installed")
        self.loop = asyncio.new_event_loop()
        self.addCleanup(self.loop.close)
        # aiortc objects bind asyncio.get_event_loop() when made (the asyncio reactor's loop in the daemon).
        asyncio.set_event_loop(self.loop)
        self.addCleanup(asyncio.set_event_loop, None)
        self.time = LoopTime(self.loop)
        self.media_clock = MediaClock(self.time)
        self.addCleanup(self.media_clock.stop)
        webrtc.use_host_address("127.0.0.1")
        self.peers: list[Any] = []
        self.addCleanup(self._cancel_tasks)
        self.addCleanup(self._close_peers)

    def _cancel_tasks(self) -> None:
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    def _close_peers(self) -> None:
        for pc in self.peers:
            self.loop.run_until_complete(pc.close())

    def dialer(self, codecs: tuple[str, ...] = ("opus", "g722", "pcmu", "pcma", "telephone_event"),
               **kw: Any) -> Any:
        d = webrtc.WebRtcDialer(self.loop, self.media_clock, self.time, Ids(), codecs=codecs,
                                bind_ip="127.0.0.1", **kw)
        verifyObject(ILegDialer, d)
        return d

    def drive(self, awaitable: Any) -> Any:
        async def drive() -> Any:
            return await asyncio.wait_for(awaitable, DEADLINE_S)

        task = self.loop.create_task(drive(), name="drive")
        return self.loop.run_until_complete(task)

    def wait_until(self, check: Callable[[], Any], what: str) -> Any:
        async def poll() -> Any:
            while not check():
                await asyncio.sleep(0.02)
            return check()

        try:
            return self.drive(self.loop.create_task(poll(), name="poll"))
        except asyncio.TimeoutError:
            self.fail(f"timed out after {DEADLINE_S}s waiting for {what}")

    def client(self) -> Any:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.peers.append(pc)
        pc.addTransceiver(Tone(), direction="sendrecv")
        self.received: list[bytes] = []
        resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)

        @pc.on("track")
        def on_track(track: Any) -> None:
            async def pump() -> None:
                while True:
                    try:
                        frame = await track.recv()
                    except Exception:
                        return
                    for f in resampler.resample(frame):
                        self.received.append(bytes(f.planes[0])[: f.samples * 2])

            self.loop.create_task(pump())

        return pc

    def offer(self, pc: Any) -> str:
        async def make() -> str:
            await pc.setLocalDescription(await pc.createOffer())
            return pc.localDescription.sdp

        return self.drive(make())

    def dial(self, dialer: Any, offer: str, **option: Any) -> Any:
        d = dialer.dial(CallOption(offer=offer, **option), "s1", lambda early: None)
        return self.drive(d.asFuture(self.loop))

    def connected_call(self, **dialer_kw: Any) -> tuple[Any, Any, Any, Events, Sink]:
        dialer = self.dialer(**dialer_kw)
        pc = self.client()
        leg = self.dial(dialer, self.offer(pc))
        verifyObject(IIceLeg, leg)
        events, sink = Events(), Sink()
        leg.attach(ToneSource(), sink, events)
        self.drive(pc.setRemoteDescription(RTCSessionDescription(sdp=leg.answer_sdp, type="answer")))
        self.wait_until(lambda: leg.handshake_done, "the peer to connect")
        return dialer, pc, leg, events, sink

    def test_audio_both_ways_in_the_configured_codec_order(self) -> None:
        """PCMU first in ``codecs`` wins over the client's Opus; caller and agent tones cross the peer."""
        dialer, pc, leg, events, sink = self.connected_call(codecs=("pcmu", "opus", "telephone_event"))
        self.assertEqual(leg.codec, "pcmu")
        self.assertEqual(leg.native_rate_hz, 8000)
        answer = leg.answer_sdp
        self.assertIn("a=candidate:", answer)
        self.assertIn(" 127.0.0.1 ", answer)
        audio_line = next(line for line in answer.splitlines() if line.startswith("m=audio"))
        self.assertEqual(audio_line.split()[3], "0", audio_line)  # PCMU's payload type first
        self.assertIn("telephone-event/8000", answer)
        self.wait_until(lambda: sum(1 for f in sink.frames if rms(f) > 1000) >= 25, "0.5 s of the caller's tone")
        self.wait_until(lambda: sum(1 for f in self.received if rms(f) > 1000) >= 25, "0.5 s of the agent's tone")
        self.assertTrue(all(len(f) == 640 for f in sink.frames))
        self.assertEqual(dialer.open_peers, 1)
        self.drive(leg.close().asFuture(self.loop))
        self.assertEqual(dialer.open_peers, 0)
        self.assertEqual(len(self.media_clock), 0)
        self.drive(pc.close())
        # Both ends closed: no task of either peer is left on the loop (this one is the poll itself).
        mine = {"drive", "poll"}
        self.wait_until(lambda: not [t for t in asyncio.all_tasks(self.loop) if t.get_name() not in mine],
                        "every peer task to finish")

    def test_opus_by_default_order(self) -> None:
        """With Opus first the peer speaks Opus, and the leg still delivers 20 ms 16 kHz frames."""
        dialer, pc, leg, events, sink = self.connected_call()
        self.assertEqual(leg.codec, "opus")
        self.assertEqual(leg.native_rate_hz, 16000)
        self.wait_until(lambda: sum(1 for f in sink.frames if rms(f) > 1000) >= 25, "the caller's tone")
        self.drive(leg.close().asFuture(self.loop))

    def test_no_decoder_thread_per_call(self) -> None:
        """The caller's audio is decoded on the media tick: aiortc's per-receiver decoder thread has ended,
        and the caller is still heard."""
        dialer, pc, leg, events, sink = self.connected_call()
        thread = getattr(leg.pc.getTransceivers()[0].receiver, "_RTCRtpReceiver__decoder_thread", None)
        self.wait_until(lambda: thread is None or not thread.is_alive(), "aiortc's decoder thread to end")
        self.wait_until(lambda: sum(1 for f in sink.frames if rms(f) > 1000) >= 25, "the caller's tone")
        self.drive(leg.close().asFuture(self.loop))

    def test_extra_media_sections_are_answered_inactive(self) -> None:
        """An offer with more streams than the call's one audio: the first audio section carries the call,
        the others are answered inactive and start no receiver thread; too many sections are refused."""
        dialer = self.dialer()
        pc = self.client()
        pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="sendrecv")
        leg = self.dial(dialer, self.offer(pc))
        events, sink = Events(), Sink()
        leg.attach(ToneSource(), sink, events)
        sections = leg.answer_sdp.split("\r\nm=")[1:]
        self.assertEqual([s.split()[0] for s in sections], ["audio", "audio", "video"])
        self.assertIn("a=sendrecv", sections[0])
        self.assertTrue(all("a=inactive" in s for s in sections[1:]), sections)
        self.drive(pc.setRemoteDescription(RTCSessionDescription(sdp=leg.answer_sdp, type="answer")))
        self.wait_until(lambda: leg.handshake_done, "the peer to connect")
        self.wait_until(lambda: sum(1 for f in sink.frames if rms(f) > 1000) >= 25, "the caller's tone")
        threads = [getattr(t.receiver, "_RTCRtpReceiver__decoder_thread", None) for t in leg.pc.getTransceivers()]
        self.assertEqual([t for t in threads if t is not None and t.is_alive()], [])
        self.drive(leg.close().asFuture(self.loop))

        many = "v=0\r\n" + "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\n" * (webrtc.MAX_MEDIA_SECTIONS + 1)
        with self.assertRaises(LegOptionError) as e:
            dialer.dial(CallOption(offer=many), "s2", lambda early: None)
        self.assertIn(f"option.offer has {webrtc.MAX_MEDIA_SECTIONS + 1} media sections", str(e.exception))
        self.assertEqual(dialer.open_peers, 0)

    def test_keys_played_to_the_browser_as_tones(self) -> None:
        """send_dtmf (a bridged phone's keys) reaches the peer as in-band tones through Opus."""
        from activecall.media.dtmf_detect import InbandDtmfDetector

        dialer, pc, leg, events, sink = self.connected_call()
        leg.attach(Silence(), sink, events)
        self.wait_until(lambda: len(self.received) >= 10, "the agent's audio to flow")
        self.assertTrue(leg.send_dtmf("3#"))
        detector = InbandDtmfDetector(16000)
        heard: list[str] = []
        seen = [0]

        def both_heard() -> bool:
            heard.extend(detector.feed(b"".join(self.received[seen[0]:])))
            seen[0] = len(self.received)
            return heard == ["3", "#"]

        self.wait_until(both_heard, "the two keys as tones")
        self.drive(leg.close().asFuture(self.loop))
        self.assertFalse(leg.send_dtmf("1"))

    def test_telephone_events_become_one_digit_per_press(self) -> None:
        """RFC 4733 packets from the browser are taken before aiortc's decoder: one digit per press."""
        dialer, pc, leg, events, sink = self.connected_call()
        receiver = leg.pc.getTransceivers()[0].receiver
        pt = leg._dtmf_pt
        self.assertIsNotNone(pt)
        for duration, end in ((160, False), (320, False), (480, True), (480, True)):
            packet = RtpPacket(payload_type=pt, sequence_number=1, timestamp=9000, ssrc=77,
                               payload=struct.pack("!BBH", 5, 0x80 | 10 if end else 10, duration))
            self.drive(receiver._handle_rtp_packet(packet, 0))
        self.assertEqual([e for e in events.seen if e[0] == "dtmf"], [("dtmf", "5")])
        self.drive(leg.close().asFuture(self.loop))

    def test_client_closing_its_peer_ends_only_the_media(self) -> None:
        """The browser tab closes its peer: media_ended is reported (trackEnd), not ended (hangup)."""
        dialer, pc, leg, events, sink = self.connected_call()
        self.drive(pc.close())
        self.wait_until(lambda: ("media_ended", "peer closed") in events.seen or
                        any(e[0] == "media_ended" for e in events.seen), "the media to end")
        self.assertNotIn("ended", [e[0] for e in events.seen])
        self.assertTrue(leg.media_ended)
        self.drive(leg.close().asFuture(self.loop))
        self.assertEqual(dialer.open_peers, 0)

    def test_handshake_timeout_ends_the_media(self) -> None:
        """A client that never applies our answer: after handshakeTimeout the peer is closed."""
        dialer = self.dialer()
        pc = self.client()
        leg = self.dial(dialer, self.offer(pc), handshake_timeout=1)
        events = Events()
        leg.attach(ToneSource(), Sink(), events)
        self.wait_until(lambda: ("media_ended", "handshake timeout") in events.seen, "the handshake timeout")
        self.drive(leg.close().asFuture(self.loop))

    def test_trickled_candidates(self) -> None:
        """An offer without candidates connects once they are trickled; malformed ones are refused."""
        dialer = self.dialer()
        pc = self.client()
        offer = self.offer(pc)
        lines = offer.splitlines()
        candidates = [line[2:] for line in lines if line.startswith("a=candidate:")]
        self.assertTrue(candidates)
        # A trickling browser's offer: no candidates yet, no end-of-candidates.
        bare = "\r\n".join(line for line in lines
                           if not line.startswith(("a=candidate:", "a=end-of-candidates"))) + "\r\n"
        leg = self.dial(dialer, bare)
        events = Events()
        leg.attach(ToneSource(), Sink(), events)
        self.drive(pc.setRemoteDescription(RTCSessionDescription(sdp=leg.answer_sdp, type="answer")))
        for bad in ("candidate:1 1 udp", "candidate:1 1 udp 5 999.1.1.1 9 typ host", "x" * 600,
                    "candidate:1 1 udp 5 10.0.0.1 99999 typ host"):
            self.assertRaises(ValueError, leg.add_ice_candidate, bad, "0", None)
        for candidate in candidates:
            leg.add_ice_candidate(candidate, "0", 0)
        self.wait_until(lambda: leg.handshake_done, "the peer to connect after trickle")
        self.drive(leg.close().asFuture(self.loop))

    def test_missing_or_bad_offer(self) -> None:
        """No offer, a huge one and one aiortc refuses are 'Failed to setup track' errors; no peer is left."""
        dialer = self.dialer()
        with self.assertRaises(LegOptionError) as e:
            dialer.dial(CallOption(), "s1", lambda early: None)
        self.assertIn("Failed to setup track", str(e.exception))
        self.assertRaises(LegOptionError, dialer.dial, CallOption(offer="v=0\r\n" * 20000), "s1", lambda early: None)
        d = dialer.dial(CallOption(offer="v=0\r\nnonsense\r\n"), "s1", lambda early: None)
        with self.assertRaises(LegOptionError) as e:
            self.drive(d.asFuture(self.loop))
        self.assertIn("Failed to setup track", str(e.exception))
        self.assertEqual(dialer.open_peers, 0)

    def test_external_ip_and_ipv6_in_the_answer(self) -> None:
        """external_ip replaces the bound address in candidates and c=; IPv6 candidates go unless enableIpv6."""
        sdp = ("v=0\r\nc=IN IP4 127.0.0.1\r\na=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r\n"
               "a=candidate:2 1 udp 2130706431 ::1 5002 typ host\r\n")
        out = webrtc.rewrite_answer(sdp, bind_ip="127.0.0.1", external_ip="203.0.113.10", enable_ipv6=False)
        self.assertEqual(out, "v=0\nc=IN IP4 203.0.113.10\na=candidate:1 1 udp 2130706431 203.0.113.10 5000 typ host\n")
        kept = webrtc.rewrite_answer(sdp, bind_ip="127.0.0.1", external_ip=None, enable_ipv6=True)
        self.assertEqual(kept, sdp)

    def test_codec_order(self) -> None:
        """Config names map to aiortc mime types in order, telephone-event last; nothing usable: all."""
        self.assertEqual(webrtc.webrtc_codec_order(("telephone_event", "g729", "g722", "pcma")),
                         ["audio/G722", "audio/PCMA", "audio/telephone-event"])
        self.assertEqual(webrtc.webrtc_codec_order(("g729",)),
                         ["audio/opus", "audio/G722", "audio/PCMU", "audio/PCMA", "audio/telephone-event"])


class AgentTrackTests(SynchronousTestCase):
    """The agent track aiortc reads: RTP timestamps from each frame's media-clock slot."""

    def setUp(self) -> None:
        if webrtc is None:  # pragma: no cover
            self.skipTest("aiortc is not installed")
        self.loop = asyncio.new_event_loop()
        self.addCleanup(self.loop.close)
        self.worker = webrtc.EncodeWorker(self.loop)
        self.track = webrtc._AgentTrack(self.loop, self.worker)
        self.track.use_codec("pcmu")

    def test_frames_dropped_while_full_leave_a_timestamp_gap(self) -> None:
        """15 frames delivered while aiortc reads none: the oldest 5 go, and the first packet read
        then is stamped with frame 5's slot (160 samples a frame at 8 kHz), not frame 0's."""
        for index in range(15):
            self.track.deliver(index, bytes([index]) * 160)
        packets = [self.loop.run_until_complete(self.track.recv()) for _ in range(10)]
        self.assertEqual([p.pts for p in packets], [i * 160 for i in range(5, 15)])
        self.assertEqual(bytes(packets[0])[:1], b"\x05")
        self.track.deliver(20, b"\x14" * 160)
        self.assertEqual(self.loop.run_until_complete(self.track.recv()).pts, 20 * 160)

    def test_pushed_frames_are_numbered_in_order(self) -> None:
        """Each pushed frame goes to the worker with the next frame number."""
        seen: list[tuple[int, bytes]] = []
        self.patch(self.worker, "submit", lambda track, index, pcm: seen.append((index, pcm)))
        for n in range(3):
            self.track.push(bytes([n]) * 640)
        self.assertEqual([i for i, _ in seen], [0, 1, 2])
