"""Interop: baresip (a real softphone) calls the daemon with SDES-SRTP and G.722.

baresip runs headless from a config directory the test writes: audio source
``aufile`` (a 700 Hz WAV the test makes), audio player ``aubridge`` (a sink
nobody reads), the ``sndfile`` filter dumping what baresip encodes and
decodes as WAV files, ``mediaenc=srtp-mand`` (RTP/SAVP with ``a=crypto``),
``audio_codecs=G722/16000/1`` and no registration.  The test drives it over
``ctrl_tcp`` (JSON in netstrings): ``dial``, ``sndcode``, ``hangup``,
``quit``, and reads its events (``CALL_ESTABLISHED``, ``CALL_CLOSED``).

Our side is the SIP service with the test-only glue ``media_peer``: answer
with SRTP, G.722 RtpLeg, agent plays 1 kHz, both sides recorded.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import wave
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater
from twisted.protocols.basic import NetstringReceiver
from twisted.trial.unittest import SkipTest, TestCase

from activecall.config import Config
from activecall.ids import SystemIds
from activecall.sdp.model import parse_sdp
from activecall.sip.service import build_sip_service
from media_peer import (
    MediaPeerHandler,
    assert_near,
    dominant_hz,
    free_tcp_port,
    free_udp_port,
    read_wav,
    rms,
    soxi,
    spawn_peer,
    tone,
    until,
)

BARESIP = shutil.which("baresip")
MODULE_PATH = "/usr/lib/baresip/modules"
MODULES = ("g722.so", "g711.so", "aufile.so", "aubridge.so", "srtp.so", "sndfile.so")
APPS = ("account.so", "menu.so", "ctrl_tcp.so")
CALLER_HZ = 700.0
AGENT_HZ = 1000.0
DIGITS = "42#"
DEADLINE_S = 15.0


class BaresipControl(NetstringReceiver):
    """A ctrl_tcp client: sends ``{"command", "params", "token"}``, collects responses and events."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.responses: dict[str, dict[str, Any]] = {}
        self._token = 0
        self._pending: dict[str, Deferred[dict[str, Any]]] = {}

    def stringReceived(self, string: bytes) -> None:
        message = json.loads(string)
        if message.get("event"):
            self.events.append(message)
            return
        token = str(message.get("token", ""))
        self.responses[token] = message
        d = self._pending.pop(token, None)
        if d is not None:
            d.callback(message)

    def command(self, command: str, params: str = "") -> Deferred[dict[str, Any]]:
        """Send one command; fires with baresip's response."""
        self._token += 1
        token = str(self._token)
        d: Deferred[dict[str, Any]] = Deferred()
        self._pending[token] = d
        self.sendString(json.dumps({"command": command, "params": params, "token": token}).encode())
        return d

    def event_types(self) -> list[str]:
        """The ``type`` of every event so far."""
        return [str(e.get("type")) for e in self.events]


def write_baresip_config(confdir: str, *, sip_port: int, ctrl_port: int, source_wav: str, snd_dir: str) -> None:
    """A minimal headless baresip 1.0 config: UDP SIP on 127.0.0.1, SRTP-mandatory G.722 account, ctrl_tcp."""
    lines = [
        "poll_method epoll",
        f"sip_listen 127.0.0.1:{sip_port}",
        f"audio_source aufile,{source_wav}",
        "audio_player aubridge,sink",
        "audio_alert aubridge,alert",
        # G.722 runs at 16 kHz: the aufile source must match it.
        "ausrc_srate 16000",
        "ausrc_channels 1",
        f"module_path {MODULE_PATH}",
        *(f"module {m}" for m in MODULES),
        f"snd_path {snd_dir}",
        *(f"module_app {m}" for m in APPS),
        f"ctrl_tcp_listen 127.0.0.1:{ctrl_port}",
        "rtp_tos 0",
        # Without this baresip puts the first non-loopback address in its SDP; the test stays on loopback.
        "net_interface 127.0.0.1",
    ]
    with open(os.path.join(confdir, "config"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(confdir, "accounts"), "w") as f:
        # regint=0: no REGISTER; srtp-mand: RTP/SAVP with SDES keys; G.722 only (plus telephone-event).
        f.write("<sip:caller@127.0.0.1>;regint=0;mediaenc=srtp-mand;audio_codecs=G722/16000/1\n")
    with open(os.path.join(confdir, "contacts"), "w") as f:
        f.write("")


class _BaresipPeer:
    """Starting and driving a headless baresip (needs ``self.reactor``, ``self.workdir``, ``addCleanup``)."""

    reactor: Any
    workdir: str

    def start_baresip(self) -> tuple[Any, str]:
        """Write the config, start baresip; returns the process protocol and the sndfile directory."""
        confdir = os.path.join(self.workdir, "baresip")
        snd_dir = os.path.join(self.workdir, "snd")
        os.makedirs(confdir)
        os.makedirs(snd_dir)
        source = os.path.join(self.workdir, "caller.wav")
        with wave.open(source, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(tone(CALLER_HZ, 20.0, 16000, amplitude=8000))
        sip_port = free_udp_port()
        ctrl_port = free_tcp_port()
        while ctrl_port in (sip_port, sip_port + 1):  # baresip also binds TCP/TLS on the SIP port and +1
            ctrl_port = free_tcp_port()
        self.ctrl_port = ctrl_port
        write_baresip_config(confdir, sip_port=sip_port, ctrl_port=ctrl_port, source_wav=source, snd_dir=snd_dir)
        assert BARESIP is not None
        proto, _ = spawn_peer(self.reactor, [BARESIP, "-f", confdir, "-v"], self.workdir, self.addCleanup)
        return proto, snd_dir

    @inlineCallbacks
    def connect_control(self, proto: Any) -> Any:
        """Connect to ctrl_tcp, retrying until baresip listens (deadline DEADLINE_S)."""
        start = self.reactor.seconds()
        while True:
            try:
                ctrl = yield connectProtocol(TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.ctrl_port),
                                             BaresipControl())
            except ConnectError:
                if proto.ended.called or self.reactor.seconds() - start > DEADLINE_S:
                    self.fail("baresip's ctrl_tcp never listened:\n" + proto.text())
                yield deferLater(self.reactor, 0.1, lambda: None)  # retry interval, bounded by the deadline
                continue
            self.addCleanup(ctrl.transport.loseConnection)
            return ctrl


class BaresipTests(_BaresipPeer, TestCase):
    """baresip UAC (SRTP, G.722, RFC 4733) against the SIP service and the RTP media engine on 127.0.0.1."""

    timeout = 90

    def setUp(self) -> None:
        if BARESIP is None:
            raise SkipTest("baresip is not installed")
        missing = [m for m in MODULES + APPS if not os.path.exists(os.path.join(MODULE_PATH, m))]
        if missing:
            raise SkipTest(f"baresip modules missing: {missing}")
        if shutil.which("soxi") is None:
            raise SkipTest("sox is not installed")
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.workdir = tempfile.mkdtemp(prefix="media-baresip-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.handler = MediaPeerHandler(reactor, self.workdir, codecs=("g722", "pcmu", "pcma", "telephone_event"),
                                        srtp=True, mode="tone", tone_hz=AGENT_HZ)
        self.addCleanup(self.handler.shutdown)
        config = Config(addr="127.0.0.1", udp_port=0, useragent="activecall-test")
        self.service = build_sip_service(config, reactor, SystemIds(), self.handler)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    @inlineCallbacks
    def test_srtp_g722_call_with_dtmf(self) -> Any:
        """baresip dials with SRTP/G.722, its tone is recorded left, its digits arrive once, and it hears our tone."""
        proto, snd_dir = self.start_baresip()
        ctrl = yield self.connect_control(proto)
        target = f"sip:agent@127.0.0.1:{self.service.port('udp')}"
        response = yield ctrl.command("dial", target)
        self.assertTrue(response.get("ok"), response)
        media = yield self.handler.next_call()
        yield until(self.reactor, lambda: "CALL_ESTABLISHED" in ctrl.event_types(), "CALL_ESTABLISHED", DEADLINE_S)
        # Let two seconds of audio flow both ways before the digits.
        yield until(self.reactor, lambda: media.frames_recorded >= 100, "2 s of media", DEADLINE_S)
        for digit in DIGITS:
            yield ctrl.command("sndcode", digit)
            yield until(self.reactor, lambda: digit in media.digits, f"digit {digit}", DEADLINE_S)
        yield until(self.reactor, lambda: media.frames_recorded >= 200, "4 s of media", DEADLINE_S)
        yield ctrl.command("hangup")
        result = yield media.ended
        yield until(self.reactor, lambda: "CALL_CLOSED" in ctrl.event_types(), "CALL_CLOSED", DEADLINE_S)
        yield ctrl.command("quit")
        code = yield proto.ended
        output = proto.text()

        # The offer and answer: RTP/SAVP with SDES keys, G.722 (static pt 9).
        offer = parse_sdp(result.offer_sdp)
        answer = parse_sdp(result.answer_sdp)
        self.assertEqual(offer.media[0].proto, "RTP/SAVP", result.offer_sdp)
        self.assertTrue(offer.media[0].crypto(), "baresip offered a=crypto")
        self.assertEqual((answer.media[0].proto, answer.media[0].payload_types[0]), ("RTP/SAVP", 9))
        assert result.negotiated is not None
        self.assertEqual((result.negotiated.codec, result.negotiated.srtp), ("g722", True))
        self.assertEqual(result.end_reason, "bye-received")
        # Every SRTP audio packet was authenticated and decrypted: no sequence gap at all.  The one
        # error allowed is baresip's plaintext RTCP APP "PING" (16 bytes, sent to open NAT pinholes),
        # rightly dropped; the endpoint counts RTP and RTCP SRTP failures together.
        self.assertEqual(result.leg_stats["rtp_lost"], 0)
        self.assertLessEqual(result.leg_stats["rx_srtp_errors"], 1)
        self.assertGreater(result.leg_stats["rx_audio_packets"], 150)

        # RFC 4733 digits from baresip, each exactly once, in order.
        self.assertEqual(result.digits, list(DIGITS), output)

        # Our recording: 2 channels at 16 kHz for the call's length; baresip's tone on the left.
        info = yield soxi(result.recording)
        self.assertEqual((info["channels"], info["rate_hz"]), (2, 16000))
        assert_near(self, info["duration_s"], result.call_s, 0.1 * result.call_s, "recording length")
        samples, rate = read_wav(result.recording)
        left, right = samples[:, 0], samples[:, 1]
        window = left[rate:2 * rate]  # 1..2 s into the call: before the digits
        self.assertGreater(rms(window), 1000, "left channel is silent")
        assert_near(self, dominant_hz(window, rate), CALLER_HZ, 20, "caller tone")
        assert_near(self, dominant_hz(right[rate:2 * rate], rate), AGENT_HZ, 20, "agent tone")

        # baresip decoded our 1 kHz (sndfile's dump of what it played).
        decoded = sorted(glob.glob(os.path.join(snd_dir, "*dec.wav")))
        self.assertTrue(decoded, f"no sndfile dump in {snd_dir}: {os.listdir(snd_dir)}")
        heard, heard_rate = read_wav(decoded[0])
        mono = heard[:, 0]
        self.assertGreater(len(mono), heard_rate, "baresip played less than a second")
        middle = mono[len(mono) // 4: len(mono) // 4 + heard_rate // 2]
        self.assertGreater(rms(middle), 1000, "baresip heard silence")
        assert_near(self, dominant_hz(middle, heard_rate), AGENT_HZ, 20, "tone heard by baresip")
        self.assertEqual(code, 0, output)


class BaresipDaemonTests(_BaresipPeer, TestCase):
    """baresip calls the real daemon; a webhook client accepts; its RFC 4733 keys become ``dtmf`` events."""

    timeout = 90

    def setUp(self) -> None:
        if BARESIP is None:
            raise SkipTest("baresip is not installed")
        missing = [m for m in MODULES + APPS if not os.path.exists(os.path.join(MODULE_PATH, m))]
        if missing:
            raise SkipTest(f"baresip modules missing: {missing}")
        from twisted.internet import reactor

        self.reactor = reactor
        self.workdir = tempfile.mkdtemp(prefix="daemon-baresip-")
        self.addCleanup(shutil.rmtree, self.workdir, True)

    @inlineCallbacks
    def test_dtmf_keys_reach_the_client_as_events(self) -> Any:
        """SRTP/G.722 call from baresip, accepted over /call/sip; keys 4, 2, # arrive once each as dtmf events."""
        from urllib.parse import quote

        from harness import BASE_CONFIG, connect, start_daemon
        from test_daemon_sip import webhook_app

        hook_url, hooks = webhook_app(self)
        base = 20000 + free_udp_port() % 20000 & ~1
        config = (f"rtp_start_port = {base}\nrtp_end_port = {base + 100}\ncodecs = [\"g722\", \"pcmu\", \"telephone_event\"]\n"
                  + BASE_CONFIG + f'[handler]\ntype = "webhook"\nurl = "{hook_url}"\n')
        daemon = yield start_daemon(self.workdir, config)
        self.addCleanup(daemon.stop)
        proto, _ = self.start_baresip()
        ctrl = yield self.connect_control(proto)
        response = yield ctrl.command("dial", f"sip:agent@127.0.0.1:{daemon.sip_port}")
        self.assertTrue(response.get("ok"), response)
        hook = yield hooks.get().addTimeout(DEADLINE_S, self.reactor)
        client = yield connect(f"{daemon.ws_url}/call/sip?id={quote(hook['dialogId'], safe='')}")
        client.send({"command": "accept", "option": {"sip": {"enable_srtp": True}}})
        answer = yield client.wait_event("answer")
        self.assertIn("RTP/SAVP", answer["sdp"])
        self.assertIn("a=crypto", answer["sdp"])
        yield client.wait_event("mediaReady")
        for digit in DIGITS:
            yield ctrl.command("sndcode", digit)
            yield client.wait_event("dtmf", digit=digit)
        yield ctrl.command("hangup")
        hangup = yield client.wait_event("hangup")
        self.assertEqual(hangup["reason"], "byCaller")
        self.assertEqual([e["digit"] for e in client.events if e["event"] == "dtmf"], list(DIGITS))
        yield ctrl.command("quit")
        yield proto.ended
