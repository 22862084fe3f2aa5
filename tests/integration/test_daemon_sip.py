"""The daemon's SIP side as a peer sees it: OPTIONS probe, inbound INVITE answer, registrations route."""

from __future__ import annotations

import os
import shutil
import socket

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from harness import BASE_CONFIG, free_port, http_client, start_daemon

SCENARIOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp")


class DaemonSipTests(TestCase):
    """``twistd activecall`` listens for SIP on udp_port next to its HTTP API."""

    timeout = 60

    async def test_options_probe_and_inbound_invite(self) -> None:
        """SIPp's OPTIONS probe gets 200; an INVITE gets an explained 503; /registrations lists none."""
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
        self.assertIn(b"Inbound call handling is not available yet", final)
        self.assertIn(b"Server: acall-test", final)
        registrations = await (await http_client().get(daemon.base_url + "/registrations")).json()
        self.assertEqual(registrations, [])

