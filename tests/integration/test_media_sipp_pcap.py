"""Interop: SIPp calls the daemon's SIP stack and plays a pcap of G.711 audio with RFC 4733 DTMF into the call.

The pcap is made by the test (stdlib pcap writer in ``media_peer``): one RTP
stream (PCMA, 20 ms) carrying a 500 Hz tone interrupted by three key presses
sent as telephone-event packets with the usual triple end packet.  SIPp
(``-sf media_fixtures/uac_play_pcap.xml``) dials, ACKs, replays the pcap with
its original timing while the call lasts ``-d`` milliseconds, and hangs up.
The test-only glue (``media_peer.MediaPeerHandler``) answers with a real
RtpLeg, records both sides and echoes nothing: the agent plays 1 kHz.

Checked: digits arrive exactly once each and in order; the recording is a
2-channel 16 kHz WAV (``soxi``) as long as the call (±10 %); the left
channel holds the caller's 500 Hz and the right our 1 kHz.  A second test
plays SIPp's own sample pcaps (``g711a.pcap`` with 30 ms packets, then
``dtmf_2833_1.pcap`` from another SSRC) when the package ships them.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from typing import Any

import numpy as np
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, TestCase

from activecall.config import Config
from activecall.ids import SystemIds
from activecall.media._audioop import audioop
from activecall.sip.service import build_sip_service
from media_peer import (
    assert_near,
    MediaPeerHandler,
    RtpStream,
    dominant_hz,
    dtmf_rtp_packets,
    free_udp_port,
    g711_rtp_packets,
    read_wav,
    rms,
    soxi,
    spawn_peer,
    tone,
    write_rtp_pcap,
)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "media_fixtures")
SIPP = shutil.which("sipp")
CALLER_HZ = 500.0
AGENT_HZ = 1000.0
DIGITS = "15#"
CALL_MS = 4000


def caller_pcap(path: str) -> float:
    """Write the caller's pcap (tone, digit, tone, ... ) and return its length in seconds."""
    stream = RtpStream()
    packets = g711_rtp_packets(stream, tone(CALLER_HZ, 1.0, 8000))
    for digit in DIGITS:
        packets += dtmf_rtp_packets(stream, digit)
        packets += g711_rtp_packets(stream, tone(CALLER_HZ, 0.5, 8000))
    write_rtp_pcap(path, packets)
    return stream.t


class SippPcapTests(TestCase):
    """SIPp UAC with play_pcap_audio against the SIP service and the RTP media engine, on 127.0.0.1."""

    timeout = 60

    def setUp(self) -> None:
        if SIPP is None:
            raise SkipTest("sipp (sip-tester) is not installed")
        if shutil.which("soxi") is None:
            raise SkipTest("sox is not installed")
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.workdir = tempfile.mkdtemp(prefix="media-sipp-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.handler = MediaPeerHandler(reactor, self.workdir, codecs=("pcmu", "pcma", "telephone_event"),
                                        srtp=False, mode="tone", tone_hz=AGENT_HZ)
        self.addCleanup(self.handler.shutdown)
        config = Config(addr="127.0.0.1", udp_port=0, useragent="activecall-test")
        self.service = build_sip_service(config, reactor, SystemIds(), self.handler)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    @inlineCallbacks
    def call_from_sipp(self, scenario: str, *extra: str) -> Any:
        """Run one SIPp call with ``scenario`` (from media_fixtures/); check its exit code; return the CallResult."""
        assert SIPP is not None
        argv = [SIPP, "-sf", os.path.join(FIXTURES, scenario), f"127.0.0.1:{self.service.port('udp')}",
                "-i", "127.0.0.1", "-p", str(free_udp_port()), "-mp", str(free_udp_port() & ~1),
                "-s", "agent", "-m", "1", "-timeout", "30", "-timeout_error", "-nostdin", "-trace_err", *extra]
        proto, _ = spawn_peer(self.reactor, argv, self.workdir, self.addCleanup)
        media = yield self.handler.next_call()
        code = yield proto.ended
        self.assertEqual(code, 0, proto.text())
        result = yield media.ended
        return result

    @inlineCallbacks
    def test_pcap_audio_and_rfc4733_digits(self) -> Any:
        """A pcap-played PCMA call records 2×16 kHz for the call's length with the caller tone left and each digit once."""
        pcap_s = caller_pcap(os.path.join(self.workdir, "caller.pcap"))
        self.assertLess(pcap_s, CALL_MS / 1000 - 0.5, "the pcap must end before the BYE")
        result = yield self.call_from_sipp("uac_play_pcap.xml", "-d", str(CALL_MS))

        # Signalling and negotiation: plain RTP, PCMA, telephone-event 101; ended by SIPp's BYE.
        self.assertEqual(result.end_reason, "bye-received")
        assert result.negotiated is not None
        self.assertEqual((result.negotiated.codec, result.negotiated.telephone_event_pt), ("pcma", 101))
        self.assertFalse(result.negotiated.srtp)

        # Every digit exactly once, in order, despite three end packets each.
        self.assertEqual(result.digits, list(DIGITS))
        self.assertGreaterEqual(result.leg_stats["rx_dtmf_packets"], 9 * len(DIGITS))
        self.assertGreater(result.leg_stats["tx_audio_packets"], 100, "the agent tone was sent to SIPp")

        # The recording: format and length by soxi, content by numpy.
        info = yield soxi(result.recording)
        self.assertEqual((info["channels"], info["rate_hz"]), (2, 16000))
        assert_near(self, info["duration_s"], CALL_MS / 1000, 0.1 * CALL_MS / 1000)
        assert_near(self, info["duration_s"], result.call_s, 0.1 * result.call_s)
        samples, rate = read_wav(result.recording)
        left, right = samples[:, 0], samples[:, 1]
        # The first second of the pcap is uninterrupted tone; find it from the first loud frame.
        loud = [i for i in range(0, len(left) - 320, 320) if rms(left[i:i + 320]) > 1000]
        self.assertTrue(loud, "the left channel is silent")
        first = loud[0]
        assert_near(self, dominant_hz(left[first:first + rate // 2], rate), CALLER_HZ, 20)
        self.assertGreater(rms(left[first:first + rate // 2]), 3000)
        # Tone, including three 0.5 s stretches after the digits: about 2.5 s of audible left channel.
        audible_s = len(loud) * 320 / rate
        assert_near(self, audible_s, 2.5, 0.3)
        assert_near(self, dominant_hz(right[rate:2 * rate], rate), AGENT_HZ, 20)

    @inlineCallbacks
    def test_shipped_sample_pcaps(self) -> Any:
        """SIPp's own g711a.pcap (30 ms PCMA) then dtmf_2833_1.pcap (a new SSRC) give a non-silent recording and one "1"."""
        samples_dir = "/usr/share/sip-tester"
        if not all(os.path.exists(os.path.join(samples_dir, n)) for n in ("g711a.pcap", "dtmf_2833_1.pcap")):
            raise SkipTest("SIPp's sample pcaps are not installed")
        result = yield self.call_from_sipp("uac_play_shipped_pcaps.xml")
        self.assertEqual(result.end_reason, "bye-received")
        self.assertEqual(result.digits, ["1"])
        # 236 audio packets of 30 ms: all received; the 10 event packets come from another SSRC.
        self.assertGreaterEqual(result.leg_stats["rx_audio_packets"], 230)
        info = yield soxi(result.recording)
        self.assertEqual((info["channels"], info["rate_hz"]), (2, 16000))
        assert_near(self, info["duration_s"], 8.0, 0.8, "recording length (the scenario's 8 s call)")
        assert_near(self, info["duration_s"], result.call_s, 0.1 * result.call_s, "recording length")
        samples, rate = read_wav(result.recording)
        left = samples[:, 0]
        loud_s = sum(1 for i in range(0, len(left) - 320, 320) if rms(left[i:i + 320]) > 300) * 320 / rate
        # g711a.pcap is 7 s of sound; allow for its pauses.
        self.assertGreater(loud_s, 3.0, "the left channel is mostly silent")

    def test_pcap_writer_round_trip(self) -> None:
        """The generated pcap has a valid global header, one record per packet and PCMA payloads that decode to the tone."""
        path = os.path.join(self.workdir, "check.pcap")
        stream = RtpStream()
        packets = g711_rtp_packets(stream, tone(CALLER_HZ, 0.2, 8000)) + dtmf_rtp_packets(stream, "5")
        write_rtp_pcap(path, packets)
        with open(path, "rb") as f:
            data = f.read()
        magic, major, minor, _, _, _, linktype = struct.unpack_from("<IHHiIII", data)
        self.assertEqual((magic, major, minor, linktype), (0xA1B2C3D4, 2, 4, 1))
        offset, payloads = 24, []
        while offset < len(data):
            _, _, incl, orig = struct.unpack_from("<IIII", data, offset)
            frame = data[offset + 16:offset + 16 + incl]
            self.assertEqual(incl, orig)
            payloads.append(frame[14 + 20 + 8:])
            offset += 16 + incl
        self.assertEqual(len(payloads), 10 + 6 + 3)
        self.assertEqual(payloads[0][1] & 0x7F, 8)
        self.assertEqual(payloads[-1][1] & 0x7F, 101)
        self.assertTrue(payloads[-1][13] & 0x80, "the last event packet has the E bit")
        pcm = np.frombuffer(audioop.alaw2lin(b"".join(p[12:] for p in payloads[:10]), 2), dtype="<i2")
        assert_near(self, dominant_hz(pcm, 8000), CALLER_HZ, 40)
