"""Two real RtpLegs on 127.0.0.1 exchange SRTP audio (G.711, G.722) and in-band DTMF through real UDP sockets."""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

import numpy as np
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from activecall.media.clock import MediaClock
from activecall.sdp.negotiation import answer_offer, apply_answer, build_offer
from activecall.legs.rtp import FRAME_BYTES, RtpLeg, RtpMediaEngine
from activecall.media.dtmf_detect import COL_HZ, KEYPAD, ROW_HZ
from activecall.media.tracks import ILegEvents
from activecall.rtp.srtp import AES_CM_128_HMAC_SHA1_80, generate_crypto
from activecall.rtp.transport import RtpEndpoint, RtpPortAllocator

DEADLINE_S = 10.0


def _power_at(pcm: bytes, freq: float, rate: int = 16000) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(float)
    t = np.arange(len(x)) / rate
    return float(abs(np.dot(x, np.exp(-2j * np.pi * freq * t))) / max(1, len(x)))


class ToneSource:
    """An AudioSource of a steady tone, one 20 ms frame per read; ``digits`` queued play as DTMF tones first."""

    def __init__(self, freq: float) -> None:
        self.freq = freq
        self.n = 0
        self.playing = True
        self.digits: list[bytes] = []

    def play_digits(self, digits: str) -> None:
        """Queue ``digits`` as 100 ms tone pairs, each followed by 60 ms of silence."""
        for key in digits:
            row = next(i for i, r in enumerate(KEYPAD) if key in r)
            col = KEYPAD[row].index(key)
            t = np.arange(1600) / 16000
            tone = 5000 * (np.sin(2 * np.pi * ROW_HZ[row] * t) + np.sin(2 * np.pi * COL_HZ[col] * t))
            pcm = tone.astype("<i2").tobytes() + bytes(2 * 960)
            self.digits.extend(pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES))

    def read_frame(self) -> Optional[bytes]:
        if self.digits:
            return self.digits.pop(0)
        if not self.playing:
            return None
        t = (np.arange(320) + 320 * self.n) / 16000
        self.n += 1
        return (8000 * np.sin(2 * np.pi * self.freq * t)).astype("<i2").tobytes()


class ListSink:
    """An AudioSink keeping every frame."""

    def __init__(self, frames: list[bytes]) -> None:
        self.write_frame = frames.append


@implementer(ILegEvents)
class Events:
    """Records a leg's digits and media-ready."""

    def __init__(self, name: str, got: dict[str, Any]) -> None:
        self.name = name
        self.got = got

    def media_ready(self) -> None:
        self.got["ready"].append(self.name)

    def dtmf(self, digit: str) -> None:
        self.got["dtmf_" + self.name].append(digit)

    def hold(self, on_hold: bool) -> None:
        """Not reported by RTP legs."""

    def ended(self, cause: str) -> None:
        """Not reported by RTP legs."""

    def media_ended(self, cause: str) -> None:
        """Not reported by RTP legs."""

    def message(self, body: str, content_type: Optional[str]) -> None:
        """Not reported by RTP legs."""

    def transfer_requested(self, refer_to: str, referred_by: Optional[str]) -> None:
        """Not reported by RTP legs."""

    def transfer_progress(self, status: int, text: str) -> None:
        """Not reported by RTP legs."""


class LoopbackTests(TestCase):
    """Real sockets, real reactor, both legs in this process."""

    timeout = 60

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.media_clock = MediaClock(reactor)
        self.addCleanup(self.media_clock.stop)
        # A wide range: ports other processes hold are skipped by the endpoint.
        base = 20000 + 2 * random.Random().randrange(10000)
        self.allocator = RtpPortAllocator(base, base + 199)

    def _until(self, check: Callable[[], bool], what: str) -> Deferred[None]:
        """Poll ``check`` every 20 ms on the reactor until it holds, failing after DEADLINE_S."""
        d: Deferred[None] = Deferred()
        start = self.reactor.seconds()

        def poll() -> None:
            if check():
                d.callback(None)
            elif self.reactor.seconds() - start > DEADLINE_S:
                d.errback(AssertionError("timed out waiting for " + what))
            else:
                self.reactor.callLater(0.02, poll)

        poll()
        return d

    def _pair(self, codecs_a: tuple[str, ...], codecs_b: tuple[str, ...], srtp: bool) -> tuple[RtpLeg, RtpLeg, dict[str, Any]]:
        rng = random.Random(11)
        got: dict[str, Any] = {"a": [], "b": [], "dtmf_a": [], "dtmf_b": [], "ready": []}
        engine = RtpMediaEngine(self.reactor, self.media_clock)
        ep_a = RtpEndpoint(self.reactor, self.allocator, bind_ip="127.0.0.1")
        ep_b = RtpEndpoint(self.reactor, self.allocator, bind_ip="127.0.0.1")
        port_a, port_b = ep_a.start(), ep_b.start()
        crypto = [generate_crypto(1, AES_CM_128_HMAC_SHA1_80, rng)] if srtp else []
        offer = build_offer(codecs_a, "127.0.0.1", port_a, session_id=1, crypto=crypto)
        answer, neg_b = answer_offer(
            offer.sdp, codecs_b, "127.0.0.1", port_b, session_id=2, srtp=srtp,
            make_crypto=lambda tag, suite: generate_crypto(tag, suite, rng),
        )
        neg_a = apply_answer(offer, answer)
        leg_a = RtpLeg(engine, ep_a, neg_a, clock=self.reactor, rng=rng, cname=b"a")
        leg_b = RtpLeg(engine, ep_b, neg_b, clock=self.reactor, rng=rng, cname=b"b")
        src_a, src_b = ToneSource(1000.0), ToneSource(2000.0)
        leg_a.attach(src_a, ListSink(got["a"]), Events("a", got))
        leg_b.attach(src_b, ListSink(got["b"]), Events("b", got))
        self.addCleanup(leg_a.close)
        self.addCleanup(leg_b.close)
        self.assertEqual(neg_a.codec, neg_b.codec)
        self.assertEqual(neg_a.srtp, srtp)
        got["sources"] = (src_a, src_b)
        return leg_a, leg_b, got

    @inlineCallbacks
    def _exchange(self, codecs_a: tuple[str, ...], codecs_b: tuple[str, ...], expect: str) -> Any:
        leg_a, leg_b, got = self._pair(codecs_a, codecs_b, srtp=True)
        self.assertEqual(leg_a.negotiated.codec, expect)
        yield self._until(lambda: len(got["a"]) >= 60 and len(got["b"]) >= 60, "audio both ways")
        yield self._until(lambda: sorted(got["ready"]) == ["a", "b"], "media ready")
        heard_b = b"".join(got["b"][-25:])
        heard_a = b"".join(got["a"][-25:])
        self.assertGreater(_power_at(heard_b, 1000), 2000, "B hears A's 1 kHz")
        self.assertLess(_power_at(heard_b, 2000), 200)
        self.assertGreater(_power_at(heard_a, 2000), 2000, "A hears B's 2 kHz")
        for leg in (leg_a, leg_b):
            stats = leg.stats()
            self.assertEqual(stats["rx_srtp_errors"], 0)
            self.assertGreater(stats["tx_audio_packets"], 50)
        yield leg_a.close()
        yield leg_b.close()
        self.assertEqual(self.allocator.used_count, 0)
        self.assertEqual(len(self.media_clock), 0)

    def test_pcmu_srtp(self) -> None:
        """PCMU over SRTP: both directions carry the other side's tone."""
        return self._exchange(("pcmu", "telephone_event"), ("pcmu", "telephone_event"), "pcmu")

    def test_g722_srtp(self) -> None:
        """G.722 over SRTP (chosen by the answerer's preference) carries tones."""
        return self._exchange(("pcmu", "g722", "telephone_event"), ("g722", "pcmu", "telephone_event"), "g722")

    @inlineCallbacks
    def test_inband_dtmf_plain_rtp(self) -> None:
        """Without telephone-event, digits travel as tones in plain RTP and are detected."""
        leg_a, leg_b, got = self._pair(("pcma",), ("pcma",), srtp=False)
        self.assertIsNone(leg_a.negotiated.telephone_event_pt)
        for src in got["sources"]:
            src.playing = False
        yield self._until(lambda: len(got["b"]) >= 5, "ticks")
        got["sources"][0].play_digits("59")
        yield self._until(lambda: "".join(got["dtmf_b"]) == "59", "in-band 59 at B")
        self.assertEqual(len(leg_a.stats()) > 0, True)
        self.assertEqual(len(got["b"][0]), FRAME_BYTES)
        yield leg_a.close()
        yield leg_b.close()
        self.assertEqual(self.allocator.used_count, 0)
