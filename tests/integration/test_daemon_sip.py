"""The daemon's SIP side as a peer sees it: OPTIONS probe, inbound INVITE answer, registrations route."""

from __future__ import annotations

import json
import os
import shutil
import socket

from typing import Any

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from harness import BASE_CONFIG, Daemon, connect, free_port, http_client, start_daemon

SCENARIOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp")


def webhook_app(test: TestCase) -> tuple[str, Any]:
    """A webhook receiver on 127.0.0.1: each POSTed payload is put on the returned DeferredQueue."""
    from twisted.internet.defer import DeferredQueue
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    hooks: DeferredQueue[dict[str, Any]] = DeferredQueue()

    class Hook(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            hooks.put(json.loads(request.content.read()))
            return b'{"status":"ok"}'

    port = reactor.listenTCP(0, Site(Hook()), interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return f"http://127.0.0.1:{port.getHost().port}/hook", hooks


class DaemonSipTests(TestCase):
    """``twistd activecall`` listens for SIP on udp_port next to its HTTP API."""

    timeout = 60

    async def test_options_probe_and_inbound_invite(self) -> None:
        """SIPp's OPTIONS probe gets 200; with the webhook down an INVITE gets 503 with its Reason; /registrations lists none."""
        if shutil.which("sipp") is None:
            raise SkipTest("sipp (sip-tester) is not installed")
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        config = 'useragent = "acall-test"\n' + BASE_CONFIG + '[handler]\ntype = "webhook"\nurl = "http://127.0.0.1:9/hook"\n'
        daemon = await start_daemon(workdir, config)
        self.addCleanup(daemon.stop)
        sip_port = daemon.sip_port
        out, err, code = await getProcessOutputAndValue(
            shutil.which("sipp"),
            ["-sf", os.path.join(SCENARIOS, "uac_options.xml"), f"127.0.0.1:{sip_port}", "-m", "1",
             "-p", str(free_port(socket.SOCK_DGRAM)), "-i", "127.0.0.1", "-timeout", "10s", "-nostdin"],
            env=dict(os.environ), path=workdir)
        self.assertEqual(code, 0, out.decode(errors="replace")[-2000:] + err.decode(errors="replace")[-2000:])

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.settimeout(10)
            port = s.getsockname()[1]
            invite = (
                f"INVITE sip:agent@127.0.0.1:{sip_port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKtest1;rport\r\n"
                f"From: <sip:alice@127.0.0.1:{port}>;tag=abc\r\n"
                f"To: <sip:agent@127.0.0.1:{sip_port}>\r\n"
                "Call-ID: daemon-sip-1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
                f"Contact: <sip:alice@127.0.0.1:{port}>\r\nContent-Length: 0\r\n\r\n"
            )
            s.sendto(invite.encode(), ("127.0.0.1", sip_port))
            # The daemon is another process, so a short blocking read (with a timeout) is safe here.
            final = b""
            while not final:
                data, _ = s.recvfrom(65535)
                if not data.startswith(b"SIP/2.0 1"):
                    final = data
        self.assertTrue(final.startswith(b"SIP/2.0 503"), final)
        self.assertIn(b"Reason: Failed to process invite:", final)
        self.assertIn(b"Server: acall-test", final)
        registrations = await (await http_client().get(daemon.base_url + "/registrations")).json()
        self.assertEqual(registrations, [])



class OutboundSipCallTests(TestCase):
    """/call/sip invite places a real SIP call with RTP media (protocol.md §5.1)."""

    timeout = 90

    async def _setup(self, sipp_args: list[str], extra_config: str = "") -> tuple[Any, int, Any]:
        if shutil.which("sipp") is None:
            raise SkipTest("sipp (sip-tester) is not installed")
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.workdir = workdir
        base = free_port(socket.SOCK_DGRAM) & ~1
        config = f"rtp_start_port = {base + 1000 if base < 60000 else 20000}\nrtp_end_port = {base + 1100 if base < 60000 else 20100}\n"
        sipp_port = free_port(socket.SOCK_DGRAM)
        daemon = await start_daemon(workdir, config + BASE_CONFIG + '[callrecord]\ntype = "local"\nroot = "{workdir}/cdr"\n'
                                    + extra_config.replace("SIPP_PORT", str(sipp_port)))
        self.addCleanup(daemon.stop)
        sipp = Daemon()
        argv = ["sipp", *sipp_args, "-p", str(sipp_port), "-i", "127.0.0.1",
                "-mp", str(free_port(socket.SOCK_DGRAM)), "-m", "1", "-nostdin", "-timeout", "60s"]
        reactor.spawnProcess(sipp, shutil.which("sipp"), argv, env=dict(os.environ), path=workdir)
        self.addCleanup(sipp.stop)
        client = await connect(f"{daemon.ws_url}/call/sip?id=sip-e2e")
        return daemon, sipp_port, (client, sipp)

    async def test_call_answered_tts_over_rtp_echoed_back_then_bye(self) -> None:
        """SIPp UAS with RTP echo answers; TTS goes out as RTP, comes back (mediaReady, recording); hangup sends BYE."""
        daemon, sipp_port, (client, sipp) = await self._setup(["-sn", "uas", "-rtp_echo"])
        client.send({"command": "invite", "option": {
            "callee": f"sip:agent@127.0.0.1:{sipp_port}", "caller": "sip:bot@127.0.0.1",
            "tts": {"provider": "piper"}, "recorder": {}, "subscribe": True}})
        await client.wait_event("trackStart", trackId="sip-e2e")
        answer = await client.wait_event("answer", trackId="sip-e2e")
        self.assertIn("m=audio", answer["sdp"])
        self.assertIn("ringing", [e["event"] for e in client.events])
        client.send({"command": "tts", "text": "Hello over the phone line.", "playId": "t", "endOfStream": True})
        await client.wait_event("trackEnd", trackId="server-side-track", playId="t")
        await client.wait_event("mediaReady", trackId="sip-e2e")
        # subscribe: the client hears both sides, [0]+agent audio and [1]+the echo, 16 kHz PCM.
        import numpy as np

        agent = b"".join(f[1:] for _, f in client.frames if f[:1] == b"\x00")
        echo = b"".join(f[1:] for _, f in client.frames if f[:1] == b"\x01")
        self.assertGreater(len(agent), 32000, "at least a second of our TTS")
        self.assertGreater(np.abs(np.frombuffer(echo, "<i2")).max(), 1000, "the echo heard back")
        client.send({"command": "hangup"})
        hangup = await client.wait_event("hangup", trackId="sip-e2e")
        self.assertEqual(hangup["reason"], "byClient")
        await client.wait_closed()
        (code,) = await sipp.wait_exit()
        self.assertEqual(code, 0, sipp.output[-2000:])
        await daemon.stop()
        import numpy as np
        import wave

        with wave.open(os.path.join(self.workdir, "recorders", "sip-e2e.wav")) as w:
            frames = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
        self.assertGreater(np.abs(frames[:, 1]).max(), 1000, "our TTS on the right")
        self.assertGreater(np.abs(frames[:, 0]).max(), 1000, "the echo of it came back on the left")

    async def test_tts_without_provider_reaches_the_sip_callee(self) -> None:
        """No tts provider in the call or the command: the default engine speaks, SIPp echoes it back."""
        daemon, sipp_port, (client, sipp) = await self._setup(["-sn", "uas", "-rtp_echo"])
        client.send({"command": "invite", "option": {
            "callee": f"sip:agent@127.0.0.1:{sipp_port}", "caller": "sip:bot@127.0.0.1", "subscribe": True}})
        await client.wait_event("answer", trackId="sip-e2e")
        client.send({"command": "tts", "text": "Hello with the default voice.", "playId": "d", "endOfStream": True})
        await client.wait_event("trackEnd", trackId="server-side-track", playId="d")
        await client.wait_event("mediaReady", trackId="sip-e2e")
        import numpy as np

        self.assertFalse([e for e in client.events if e["event"] == "error"])
        echo = b"".join(f[1:] for _, f in client.frames if f[:1] == b"\x01")
        self.assertGreater(np.abs(np.frombuffer(echo, "<i2")).max(), 1000, "the callee heard our speech")
        client.send({"command": "hangup"})
        await client.wait_closed()
        (code,) = await sipp.wait_exit()
        self.assertEqual(code, 0, sipp.output[-2000:])
        await daemon.stop()

    async def test_idle_answered_call_streams_50_packets_per_second_to_sipp(self) -> None:
        """An answered call with no command sends SIPp one RTP packet per 20 ms (SIPp echoes it: both directions count)."""
        import re
        import time

        from twisted.internet.task import deferLater

        daemon, sipp_port, (client, sipp) = await self._setup(["-sn", "uas", "-rtp_echo"])
        client.send({"command": "invite", "option": {"callee": f"sip:agent@127.0.0.1:{sipp_port}"}})
        await client.wait_event("answer", trackId="sip-e2e")

        async def packets() -> dict[str, float]:
            text = await (await http_client().get(f"{daemon.base_url}/metrics")).text()
            return {d: float(v) for d, v in re.findall(r'activecall_rtp_packets_total\{direction="(\w+)"\} (\S+)', text)}

        first, t0 = await packets(), time.monotonic()
        while time.monotonic() - t0 < 2.0:  # a measuring window, not a wait for an event
            await deferLater(reactor, 0.1, lambda: None)
        last, t1 = await packets(), time.monotonic()
        sent_rate = (last["tx"] - first["tx"]) / (t1 - t0)
        echoed_rate = (last["rx"] - first["rx"]) / (t1 - t0)
        self.assertGreaterEqual(sent_rate, 45, last)
        self.assertGreaterEqual(echoed_rate, 40, "SIPp received our silence and echoed it")
        client.send({"command": "hangup"})
        await client.wait_closed()
        (code,) = await sipp.wait_exit()
        self.assertEqual(code, 0, sipp.output[-2000:])

    async def test_busy_callee_is_a_reject(self) -> None:
        """A 486 from the callee gives reject{code 486}, error{invite}, hangup{byCallee} and the socket closes."""
        daemon, sipp_port, (client, sipp) = await self._setup(["-sf", os.path.join(SCENARIOS, "uas_486.xml")])
        client.send({"command": "invite", "option": {"callee": f"sip:agent@127.0.0.1:{sipp_port}"}})
        reject = await client.wait_event("reject", trackId="sip-e2e")
        self.assertEqual((reject["code"], reject["reason"]), (486, "Busy Here"))
        await client.wait_event("error", sender="invite")
        hangup = await client.wait_event("hangup", trackId="sip-e2e")
        self.assertEqual((hangup["reason"], hangup["initiator"]), ("byCallee", "callee"))
        await client.wait_closed()
        (code,) = await sipp.wait_exit()
        self.assertEqual(code, 0, sipp.output[-2000:])
        await daemon.stop()
        import glob

        [path] = glob.glob(os.path.join(self.workdir, "cdr", "*", "*_sip-e2e.json"))
        with open(path) as f:
            record = json.load(f)
        self.assertEqual((record["callType"], record["statusCode"], record["hangupReason"]), ("sip", 486, "byCallee"))
        self.assertNotIn("answerTime", record)

    async def test_client_disconnecting_mid_call_sends_bye(self) -> None:
        """The control socket closing during an answered call hangs it up with a BYE (reason canceled)."""
        daemon, sipp_port, (client, sipp) = await self._setup(["-sn", "uas", "-rtp_echo"])
        client.send({"command": "invite", "option": {"callee": f"sip:agent@127.0.0.1:{sipp_port}"}})
        await client.wait_event("answer", trackId="sip-e2e")
        client.transport.loseConnection()
        (code,) = await sipp.wait_exit()
        self.assertEqual(code, 0, sipp.output[-2000:])
        await daemon.stop()
        import glob

        [path] = glob.glob(os.path.join(self.workdir, "cdr", "*", "*_sip-e2e.json"))
        with open(path) as f:
            record = json.load(f)
        self.assertEqual((record["hangupReason"], record["statusCode"]), ("canceled", 200))

    async def test_peer_that_vanishes_is_hung_up_by_inactivity(self) -> None:
        """The callee dies without BYE: with inactivityTimeout the call ends with inactivity then hangup."""
        daemon, sipp_port, (client, sipp) = await self._setup(["-sn", "uas", "-rtp_echo"])
        client.send({"command": "invite", "option": {"callee": f"sip:agent@127.0.0.1:{sipp_port}", "inactivityTimeout": 2,
                                                      "tts": {"provider": "piper"}}})
        await client.wait_event("answer", trackId="sip-e2e")
        client.send({"command": "tts", "text": "Are you there?", "playId": "q", "endOfStream": True})
        await client.wait_event("mediaReady")
        sipp.transport.signalProcess("KILL")
        await sipp.wait_exit()
        inactivity = await client.wait_event("inactivity", trackId="sip-e2e")
        hangup = await client.wait_event("hangup", trackId="sip-e2e")
        self.assertEqual((hangup["reason"], hangup["initiator"]), ("inactivityTimeout", "system"))
        self.assertLess(client.events.index(inactivity), client.events.index(hangup))
        await client.wait_closed()

    async def test_refer_bridges_a_transfer_leg_then_hangs_up_by_refer(self) -> None:
        """refer: a new INVITE to the target (X-Referred-* headers), answer{refer:true}; ending it ends the call."""
        daemon, sipp_port, (client, sipp) = await self._setup(["-sn", "uas", "-rtp_echo"])
        target = Daemon()
        target_port = free_port(socket.SOCK_DGRAM)
        argv = ["sipp", "-sn", "uas", "-rtp_echo", "-p", str(target_port), "-i", "127.0.0.1",
                "-mp", str(free_port(socket.SOCK_DGRAM)), "-m", "1", "-nostdin", "-timeout", "60s",
                "-trace_msg", "-message_file", "target.log"]
        reactor.spawnProcess(target, shutil.which("sipp"), argv, env=dict(os.environ), path=self.workdir)
        self.addCleanup(target.stop)
        client.send({"command": "invite", "option": {"callee": f"sip:agent@127.0.0.1:{sipp_port}", "caller": "sip:bot@127.0.0.1"}})
        await client.wait_event("answer", trackId="sip-e2e")
        client.send({"command": "refer", "caller": "", "callee": f"sip:human@127.0.0.1:{target_port}"})
        answer = await client.wait_event("answer", trackId="server-side-track", refer=True)
        self.assertIn("m=audio", answer["sdp"])
        client.send({"command": "hangup", "refer": True})
        hangup = await client.wait_event("hangup", trackId="server-side-track", refer=True)
        self.assertEqual(hangup["reason"], "byClient")
        main = await client.wait_event("hangup", trackId="sip-e2e")
        self.assertEqual(main["reason"], "byRefer")
        await client.wait_closed()
        for peer in (sipp, target):
            (code,) = await peer.wait_exit()
            self.assertEqual(code, 0, peer.output[-2000:])
        with open(os.path.join(self.workdir, "target.log"), errors="replace") as f:
            invite = f.read()
        self.assertIn("X-Referred-Id: sip-e2e", invite)
        self.assertIn(f"X-Referred-To: sip:agent@127.0.0.1:{sipp_port}", invite)

    async def test_sip_refer_blind_transfer(self) -> None:
        """options.sipRefer sends a real REFER; the NOTIFY sipfrag 200 completes it and the call ends byRefer."""
        daemon, sipp_port, (client, sipp) = await self._setup(["-sf", os.path.join(SCENARIOS, "uas_accepts_refer.xml")])
        client.send({"command": "invite", "option": {"callee": f"sip:agent@127.0.0.1:{sipp_port}"}})
        await client.wait_event("answer", trackId="sip-e2e")
        client.send({"command": "refer", "caller": "", "callee": "sip:human@127.0.0.1", "options": {"sipRefer": True}})
        hangup = await client.wait_event("hangup", trackId="sip-e2e")
        self.assertEqual(hangup["reason"], "byRefer")
        await client.wait_closed()
        (code,) = await sipp.wait_exit()
        self.assertEqual(code, 0, sipp.output[-3000:])

    async def test_message_command_sends_sip_message_in_the_dialog(self) -> None:
        """message sends an in-dialog SIP MESSAGE that SIPp checks (body, type, header); no error; the call goes on."""
        daemon, sipp_port, (client, sipp) = await self._setup(["-sf", os.path.join(SCENARIOS, "uas_receives_message.xml")])
        client.send({"command": "invite", "option": {"callee": f"sip:agent@127.0.0.1:{sipp_port}"}})
        await client.wait_event("answer", trackId="sip-e2e")
        client.send({"command": "message", "body": "hello pbx", "contentType": "text/plain", "headers": {"X-Ticket": "42"}})
        client.send({"command": "history", "speaker": "bot", "text": "sent"})
        await client.wait_event("addHistory")
        client.send({"command": "hangup"})
        await client.wait_event("hangup", trackId="sip-e2e")
        (code,) = await sipp.wait_exit()
        self.assertEqual(code, 0, sipp.output[-3000:])
        self.assertEqual([e for e in client.events if e["event"] == "error"], [])

    async def test_refer_rejected_keeps_the_call(self) -> None:
        """A busy transfer target gives reject{refer:true, 486} and an error; the original call goes on."""
        daemon, sipp_port, (client, sipp) = await self._setup(["-sn", "uas", "-rtp_echo"])
        target = Daemon()
        target_port = free_port(socket.SOCK_DGRAM)
        argv = ["sipp", "-sf", os.path.join(SCENARIOS, "uas_486.xml"), "-p", str(target_port), "-i", "127.0.0.1",
                "-m", "1", "-nostdin", "-timeout", "60s"]
        reactor.spawnProcess(target, shutil.which("sipp"), argv, env=dict(os.environ), path=self.workdir)
        self.addCleanup(target.stop)
        client.send({"command": "invite", "option": {"callee": f"sip:agent@127.0.0.1:{sipp_port}"}})
        await client.wait_event("answer", trackId="sip-e2e")
        client.send({"command": "refer", "caller": "", "callee": f"sip:human@127.0.0.1:{target_port}"})
        reject = await client.wait_event("reject", trackId="server-side-track", refer=True)
        self.assertEqual(reject["code"], 486)
        await client.wait_event("error", sender="command")
        client.send({"command": "history", "speaker": "bot", "text": "still connected"})
        await client.wait_event("addHistory")
        self.assertEqual([e for e in client.events if e["event"] == "hangup"], [])
        client.send({"command": "hangup"})
        await client.wait_closed()

    async def test_hold_and_resume_by_the_callee(self) -> None:
        """The callee's re-INVITEs: sendonly gives hold{onHold:true} and a recvonly answer, sendrecv resumes."""
        daemon, sipp_port, (client, sipp) = await self._setup(["-sf", os.path.join(SCENARIOS, "uas_hold_resume.xml")])
        client.send({"command": "invite", "option": {"callee": f"sip:agent@127.0.0.1:{sipp_port}"}})
        await client.wait_event("answer", trackId="sip-e2e")
        hold = await client.wait_event("hold", onHold=True)
        self.assertEqual(hold["trackId"], "sip-e2e")
        await client.wait_event("hold", onHold=False)
        client.send({"command": "hangup"})
        await client.wait_closed()
        (code,) = await sipp.wait_exit()
        self.assertEqual(code, 0, sipp.output[-3000:])

    async def test_rewrites_pick_where_the_invite_goes(self) -> None:
        """A [[rewrites]] rule sends the INVITE to the rewritten host:port; the Request-URI stays as dialled."""
        rule = '[[rewrites]]\nmatch = "sip:(\\\\d+)@pbx\\\\.invalid"\nrewrite = "sip:$1@127.0.0.1:SIPP_PORT"\n'
        daemon, sipp_port, (client, sipp) = await self._setup(
            ["-sf", os.path.join(SCENARIOS, "uas_486.xml"), "-trace_msg", "-message_file", "msgs.log"], rule)
        client.send({"command": "invite", "option": {"callee": "sip:1001@pbx.invalid"}})
        reject = await client.wait_event("reject", trackId="sip-e2e")
        self.assertEqual(reject["code"], 486)
        (code,) = await sipp.wait_exit()
        self.assertEqual(code, 0, sipp.output[-2000:])
        with open(os.path.join(self.workdir, "msgs.log"), errors="replace") as f:
            self.assertIn("INVITE sip:1001@pbx.invalid SIP/2.0", f.read())

    async def test_client_closing_while_ringing_sends_cancel(self) -> None:
        """Closing the socket while the callee rings sends CANCEL; SIPp sees it and the call record says canceled."""
        daemon, sipp_port, (client, sipp) = await self._setup(["-sf", os.path.join(SCENARIOS, "uas_ring_then_cancel.xml")])
        client.send({"command": "invite", "option": {"callee": f"sip:agent@127.0.0.1:{sipp_port}"}})
        ringing = await client.wait_event("ringing", trackId="sip-e2e")
        self.assertFalse(ringing["earlyMedia"])
        client.transport.loseConnection()
        (code,) = await sipp.wait_exit()
        self.assertEqual(code, 0, sipp.output[-2000:])
        await daemon.stop()
        import glob

        [path] = glob.glob(os.path.join(self.workdir, "cdr", "*", "*_sip-e2e.json"))
        with open(path) as f:
            record = json.load(f)
        self.assertEqual((record["hangupReason"], record["statusCode"]), ("canceled", 487))
        self.assertIn("ringTime", record)

    async def test_call_option_places_a_call_at_startup(self) -> None:
        """--call URI invites that URI about a second after start-up; /kill ends it with a BYE."""
        if shutil.which("sipp") is None:
            raise SkipTest("sipp (sip-tester) is not installed")
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        sipp_port = free_port(socket.SOCK_DGRAM)
        sipp = Daemon()
        argv = ["sipp", "-sn", "uas", "-p", str(sipp_port), "-i", "127.0.0.1", "-mp", str(free_port(socket.SOCK_DGRAM)),
                "-m", "1", "-nostdin", "-timeout", "60s"]
        reactor.spawnProcess(sipp, shutil.which("sipp"), argv, env=dict(os.environ), path=workdir)
        self.addCleanup(sipp.stop)
        base = 20000 + free_port(socket.SOCK_DGRAM) % 20000 & ~1
        daemon = await start_daemon(workdir, f"rtp_start_port = {base}\nrtp_end_port = {base + 100}\n" + BASE_CONFIG,
                                    extra_args=("--call", f"sip:1001@127.0.0.1:{sipp_port}"))
        self.addCleanup(daemon.stop)
        await daemon.wait_output("--call: calling")
        from twisted.internet import task

        client = http_client()
        listing: list[Any] = []
        for _ in range(100):  # answered calls show a startTime in /list: poll every 50 ms, bounded
            listing = (await (await client.get(daemon.base_url + "/list")).json())["active_calls"]
            if listing and listing[0]["startTime"]:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        [call] = listing
        self.assertTrue(call["id"].startswith("c."))
        self.assertEqual(call["cs.option"]["callee"], f"sip:1001@127.0.0.1:{sipp_port}")
        self.assertEqual(call["cs.option"]["inactivityTimeout"], 50)
        await client.get(daemon.base_url + "/kill/" + call["id"])
        (code,) = await sipp.wait_exit()
        self.assertEqual(code, 0, sipp.output[-2000:])


class InboundWebhookCallTests(TestCase):
    """An inbound SIP call announced by the webhook and answered by a WebSocket client (protocol.md §5.4)."""

    timeout = 90

    async def test_sipp_calls_in_client_accepts_audio_flows_caller_hangs_up(self) -> None:
        """SIPp UAC calls; the webhook POST names the dialogId; the client accepts; SIPp's BYE ends it as byCaller."""
        if shutil.which("sipp") is None:
            raise SkipTest("sipp (sip-tester) is not installed")
        hook_url, hooks = webhook_app(self)
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        base = 20000 + free_port(socket.SOCK_DGRAM) % 20000 & ~1
        config = (f"rtp_start_port = {base}\nrtp_end_port = {base + 100}\n" + BASE_CONFIG
                  + f'[handler]\ntype = "webhook"\nurl = "{hook_url}"\n')
        daemon = await start_daemon(workdir, config)
        self.addCleanup(daemon.stop)
        sipp = Daemon()
        argv = ["sipp", "-sn", "uac", f"127.0.0.1:{daemon.sip_port}", "-p", str(free_port(socket.SOCK_DGRAM)),
                "-i", "127.0.0.1", "-mp", str(free_port(socket.SOCK_DGRAM)), "-rtp_echo", "-d", "3000",
                "-m", "1", "-nostdin", "-timeout", "60s"]
        reactor.spawnProcess(sipp, shutil.which("sipp"), argv, env=dict(os.environ), path=workdir)
        self.addCleanup(sipp.stop)
        payload = await hooks.get().addTimeout(30, reactor)
        self.assertEqual(payload["event"], "invite")
        self.assertTrue(payload["dialogId"].startswith(payload["call_id"] + "-"))
        self.assertIn("m=audio", payload["offer"])
        from urllib.parse import quote

        client = await connect(f"{daemon.ws_url}/call/sip?id={quote(payload['dialogId'], safe='')}")
        client.send({"command": "accept", "option": {"tts": {"provider": "piper"}}})
        incoming = await client.wait_event("incoming")
        self.assertEqual(incoming["caller"].split("@")[0], "sip:sipp")
        answer = await client.wait_event("answer")
        self.assertIn("m=audio", answer["sdp"])
        # Garbage on our RTP port (scanners, broken phones) is dropped and cannot steer the
        # media by latching: non-RTP bytes, truncated headers, RTP with payload types we did not negotiate.
        rtp_port = int(answer["sdp"].split("m=audio ")[1].split()[0])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
            for i in range(50):
                junk.sendto(bytes([i]) + os.urandom(40), ("127.0.0.1", rtp_port))
                junk.sendto(b"\x80", ("127.0.0.1", rtp_port))
                junk.sendto(bytes([0x80, 96 + i % 30]) + os.urandom(170), ("127.0.0.1", rtp_port))
        client.send({"command": "tts", "text": "Thanks for calling.", "playId": "g", "endOfStream": True})
        await client.wait_event("mediaReady")
        hangup = await client.wait_event("hangup")
        self.assertEqual((hangup["reason"], hangup["initiator"]), ("byCaller", "caller"))
        await client.wait_closed()
        (code,) = await sipp.wait_exit()
        self.assertEqual(code, 0, sipp.output[-2000:])


class _SipProbe:
    """A minimal SIP caller on UDP: sends INVITEs and collects final responses by Call-ID."""

    def __init__(self) -> None:
        from twisted.internet.protocol import DatagramProtocol

        from harness import _Waiters

        self.finals: dict[str, bytes] = {}
        self.waiters = _Waiters()
        probe = self

        class Proto(DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:
                if data.startswith(b"SIP/2.0 ") and not data.startswith(b"SIP/2.0 1"):
                    call_id = next(line.split(b":", 1)[1].strip() for line in data.split(b"\r\n")
                                   if line.lower().startswith(b"call-id:"))
                    probe.finals[call_id.decode()] = data
                    probe.waiters.poke()

        self.proto = Proto()
        self.port = reactor.listenUDP(0, self.proto, interface="127.0.0.1")

    def invite(self, sip_port: int, call_id: str, user: str = "agent") -> None:
        me = self.port.getHost().port
        self.proto.transport.write((
            f"INVITE sip:{user}@127.0.0.1:{sip_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{call_id};rport\r\n"
            f"From: <sip:alice@127.0.0.1:{me}>;tag=a{call_id}\r\nTo: <sip:{user}@127.0.0.1:{sip_port}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
            f"Contact: <sip:alice@127.0.0.1:{me}>\r\nContent-Type: application/sdp\r\n\r\n"
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").encode(), ("127.0.0.1", sip_port))

    def final(self, call_id: str) -> Any:
        return self.waiters.wait(lambda: self.finals.get(call_id), 30, f"final response to {call_id}")


class InboundFailureTests(TestCase):
    """Inbound calls nobody answers: accept timeout 408; client leaves without answering 603."""

    timeout = 60

    async def test_accept_timeout_and_client_disconnect(self) -> None:
        """No client within accept_timeout gives 408 Reason accept timeout; a client that closes gives 603."""
        hook_url, hooks = webhook_app(self)
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        config = ('accept_timeout = "1s"\n' + BASE_CONFIG
                  + f'[handler]\ntype = "webhook"\nurl = "{hook_url}"\n'
                  + '[callrecord]\ntype = "local"\nroot = "{workdir}/cdr"\n')
        daemon = await start_daemon(workdir, config)
        self.addCleanup(daemon.stop)
        probe = _SipProbe()
        self.addCleanup(probe.port.stopListening)

        probe.invite(daemon.sip_port, "nobody-comes")
        await hooks.get().addTimeout(30, reactor)
        final = await probe.final("nobody-comes")
        self.assertTrue(final.startswith(b"SIP/2.0 408"), final)
        self.assertIn(b"accept timeout", final)

        probe.invite(daemon.sip_port, "client-leaves")
        hook = await hooks.get().addTimeout(30, reactor)
        from urllib.parse import quote

        client = await connect(f"{daemon.ws_url}/call/sip?id={quote(hook['dialogId'], safe='')}")
        client.transport.loseConnection()
        final = await probe.final("client-leaves")
        self.assertTrue(final.startswith(b"SIP/2.0 603"), final)
        self.assertIn(b"handler disconnected", final)
        await daemon.stop()
        # Both calls have their record, the one no client ever saw included.
        import glob

        records = {}
        for path in glob.glob(os.path.join(workdir, "cdr", "*", "*.json")):
            with open(path) as f:
                record = json.load(f)
            records[record["callId"].split("-")[0]] = record
        self.assertEqual((records["nobody"]["statusCode"], records["nobody"]["hangupReason"]), (408, "failed"))
        self.assertEqual(records["nobody"]["caller"].split("@")[0], "sip:alice")
        self.assertEqual(records["client"]["statusCode"], 603)


class PlaybookRoutingTests(TestCase):
    """[handler] type = "playbook": rules pick the playbook; the call is answered and greets the caller."""

    timeout = 90

    async def test_matching_default_and_unmatched_calls(self) -> None:
        """A rule-matched call is answered and speaks its greeting (recorded); no match and a missing file get 503."""
        if shutil.which("sipp") is None:
            raise SkipTest("sipp (sip-tester) is not installed")
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "config", "playbook"))
        with open(os.path.join(workdir, "config", "playbook", "desk.md"), "w") as f:
            f.write("---\ntts:\n  provider: piper\nllm:\n  provider: openai\n"
                    "greeting: Hello, you reached the front desk.\n---\nYou are a receptionist.\n")
        base = 20000 + free_port(socket.SOCK_DGRAM) % 20000 & ~1
        config = (f"rtp_start_port = {base}\nrtp_end_port = {base + 100}\n" + BASE_CONFIG.replace("[recording]", "[recording]\nenabled = true\nauto_start = true")
                  + '[handler]\ntype = "playbook"\n[[handler.rules]]\ncallee = "^sip:desk@"\nplaybook = "desk.md"\n'
                  + '[[handler.rules]]\ncallee = "^sip:gone@"\nplaybook = "missing.md"\n')
        daemon = await start_daemon(workdir, config)
        self.addCleanup(daemon.stop)

        # The caller must send RTP: a playbook speaks only after mediaReady (protocol.md §6 item 22).
        pcap = "/usr/share/sip-tester/g711a.pcap"
        if not os.path.exists(pcap):
            raise SkipTest("SIPp's sample pcaps are not installed")
        shutil.copy(pcap, os.path.join(workdir, "caller.pcap"))
        sipp = Daemon()
        scenario = os.path.join(os.path.dirname(SCENARIOS), "media_fixtures", "uac_play_pcap.xml")
        argv = ["sipp", "-sf", scenario, f"127.0.0.1:{daemon.sip_port}", "-s", "desk", "-p", str(free_port(socket.SOCK_DGRAM)),
                "-i", "127.0.0.1", "-mp", str(free_port(socket.SOCK_DGRAM)), "-d", "5000",
                "-m", "1", "-nostdin", "-timeout", "60s"]
        reactor.spawnProcess(sipp, shutil.which("sipp"), argv, env=dict(os.environ), path=workdir)
        self.addCleanup(sipp.stop)
        (code,) = await sipp.wait_exit(60)
        self.assertEqual(code, 0, sipp.output[-2000:])

        probe = _SipProbe()
        self.addCleanup(probe.port.stopListening)
        probe.invite(daemon.sip_port, "nomatch")  # sip:agent@ matches no rule and there is no default
        final = await probe.final("nomatch")
        self.assertTrue(final.startswith(b"SIP/2.0 503"), final)
        self.assertIn(b"No matching playbook", final)
        probe.invite(daemon.sip_port, "gone", user="gone")  # the rule names a file that does not exist
        final = await probe.final("gone")
        self.assertTrue(final.startswith(b"SIP/2.0 503"), final)
        self.assertIn(b"Playbook Not Found", final)

        await daemon.stop()
        import glob

        import numpy as np
        import wave

        [path] = glob.glob(os.path.join(workdir, "config", "recorders", "*.wav")) or glob.glob(os.path.join(workdir, "recorders", "*.wav"))
        with wave.open(path) as w:
            frames = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
        self.assertGreater(np.abs(frames[:, 1]).max(), 1000, "the greeting was spoken")
        self.assertGreater(np.abs(frames[:, 0]).max(), 1000, "the caller's audio on the left")
