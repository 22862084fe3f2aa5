"""SIP over TCP end to end (issue 10 item 2, RFC 3261 §18): SIPp with ``-t t1`` both ways, and Kamailio.

* SIPp's UAC calls the real daemon (``twistd activecall``, a playbook answers)
  over TCP at the daemon's ``udp_port``;
* the daemon's ``--call sip:...;transport=tcp`` calls SIPp's UAS over TCP;
* a call between two in-process SIP services through Kamailio 5.6 listening
  on TCP only (record-routing, so ACK and BYE also cross it over TCP).

127.0.0.1 only, free ports, every wait has a deadline, every process is stopped.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SkipTest, TestCase

from activecall.config import Config
from activecall.ids import SystemIds
from activecall.sip.service import SipService, build_sip_service
from activecall.testing_sip import AutoAnswerHandler, minimal_sdp
from harness import BASE_CONFIG, Daemon, free_port, http_client, start_daemon, wait_port
from test_sip_kamailio import KAMAILIO, MODULES, Kamailio

SIPP = shutil.which("sipp")
PLAYBOOK = ("---\ntts:\n  provider: piper\nllm:\n  provider: openai\n"
            "greeting: Hello.\n---\nYou answer calls.\n")
DEADLINE_S = 20.0

KAMAILIO_TCP = """#!KAMAILIO
debug=2
log_stderror=yes
children=1
tcp_children=1
auto_aliases=no
listen=tcp:127.0.0.1:{port}
alias="127.0.0.1:{port}"
mpath="{modules}"
loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "rr.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"

request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (is_method("OPTIONS") && $rU == $null) {{ sl_send_reply("200", "OK"); exit; }}
    if (loose_route()) {{ t_relay(); exit; }}
    if (is_method("INVITE")) {{ record_route(); }}
    t_relay();
}}
"""


def _need_sipp() -> str:
    if SIPP is None:
        raise SkipTest("sipp (sip-tester) is not installed")
    return SIPP


def _rtp_range() -> str:
    base = 20000 + free_port(socket.SOCK_DGRAM) % 20000 & ~1
    return f"rtp_start_port = {base}\nrtp_end_port = {base + 100}\n"


class SippTcpTests(TestCase):
    """SIPp (``-t t1``, one TCP connection) against the real daemon, both directions."""

    timeout = 90

    def setUp(self) -> None:
        _need_sipp()
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.workdir, "config", "playbook"))
        with open(os.path.join(self.workdir, "config", "playbook", "answer.md"), "w") as f:
            f.write(PLAYBOOK)

    def sipp(self, *args: str) -> Daemon:
        proc = Daemon()  # any ProcessProtocol with output and exit waiting will do
        argv = [_need_sipp(), *args, "-t", "t1", "-i", "127.0.0.1", "-m", "1", "-nostdin", "-timeout", "60s",
                "-mp", str(free_port(socket.SOCK_DGRAM))]
        reactor.spawnProcess(proc, argv[0], argv, env=dict(os.environ), path=self.workdir)
        self.addCleanup(proc.stop)
        return proc

    async def test_sipp_uac_calls_daemon_over_tcp(self) -> None:
        """SIPp's UAC calls the daemon over TCP at its udp_port: the playbook answers, ACK and BYE complete."""
        daemon = await start_daemon(self.workdir, _rtp_range() + BASE_CONFIG
                                    + '[handler]\ntype = "playbook"\ndefault = "answer.md"\n')
        self.addCleanup(daemon.stop)
        sipp = self.sipp("-sn", "uac", f"127.0.0.1:{daemon.sip_port}", "-p", str(free_port()), "-d", "2000")
        (code,) = await sipp.wait_exit(60)
        self.assertEqual(code, 0, sipp.output[-3000:] + daemon.output[-3000:])

    async def test_daemon_calls_sipp_uas_over_tcp(self) -> None:
        """--call sip:...;transport=tcp reaches SIPp's UAS over TCP; /kill ends the call with a BYE SIPp accepts."""
        sipp_port = free_port()
        sipp = self.sipp("-sn", "uas", "-p", str(sipp_port))  # up long before the daemon places --call
        daemon = await start_daemon(self.workdir, _rtp_range() + BASE_CONFIG,
                                    extra_args=("--call", f"sip:1001@127.0.0.1:{sipp_port};transport=tcp"))
        self.addCleanup(daemon.stop)
        await daemon.wait_output("--call: calling")
        client = http_client()
        listing: list[Any] = []
        for _ in range(200):  # answered calls show a startTime in /list: poll every 50 ms, bounded
            listing = (await (await client.get(daemon.base_url + "/list")).json())["active_calls"]
            if listing and listing[0]["startTime"]:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(listing), 1, daemon.output[-3000:] + sipp.output[-3000:])
        self.assertTrue(listing[0]["startTime"], daemon.output[-3000:])
        await client.get(daemon.base_url + "/kill/" + listing[0]["id"])
        (code,) = await sipp.wait_exit(60)
        self.assertEqual(code, 0, sipp.output[-3000:] + daemon.output[-3000:])


class KamailioTcpTests(TestCase):
    """A call from one SIP service to another through Kamailio, TCP on every hop."""

    timeout = 90

    def start_service(self, handler: Any) -> SipService:
        service = build_sip_service(Config(addr="127.0.0.1", udp_port=0), reactor, SystemIds(), handler)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    @inlineCallbacks
    def test_call_through_kamailio_over_tcp(self) -> Any:
        """INVITE, 200, ACK and BYE cross a TCP-only Kamailio (record-routed); Via and Contact name TCP."""
        if not os.access(KAMAILIO, os.X_OK):
            raise SkipTest("kamailio is not installed (apt-get install -y kamailio)")
        tmp = tempfile.mkdtemp(prefix="kamtcp-")
        self.addCleanup(shutil.rmtree, tmp, True)
        kport = free_port()
        cfg = os.path.join(tmp, "kamailio.cfg")
        with open(cfg, "w") as f:
            f.write(KAMAILIO_TCP.format(port=kport, modules=MODULES))
        kamailio = Kamailio()
        reactor.spawnProcess(kamailio, KAMAILIO, [KAMAILIO, "-DD", "-E", "-f", cfg, "-Y", tmp, "-w", tmp],
                             env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        self.addCleanup(kamailio.stop)
        yield wait_port(kport, DEADLINE_S)

        callee_handler = AutoAnswerHandler()
        callee = self.start_service(callee_handler)
        caller = self.start_service(None)
        target = f"sip:bob@127.0.0.1:{callee.port('tcp')};transport=tcp"
        d: Deferred[Any] = caller.user_agent.invite(
            target, "sip:alice@127.0.0.1", sdp=minimal_sdp("127.0.0.1"),
            next_hop=f"sip:127.0.0.1:{kport};transport=tcp")
        d.addTimeout(DEADLINE_S, reactor)
        try:
            call = yield d
        except Exception:
            self.fail("call through Kamailio failed:\n" + kamailio.log.decode(errors="replace")[-3000:])
        (inbound,) = callee_handler.calls
        yield inbound.acked.addTimeout(DEADLINE_S, reactor)
        invite = inbound.invite_request
        vias = invite.headers.get_all("Via")
        self.assertEqual(len(vias), 2, vias)  # Kamailio's and ours, both TCP
        self.assertTrue(all(v.upper().startswith("SIP/2.0/TCP ") for v in vias), vias)
        self.assertIn(";transport=tcp", invite.headers.get("Contact"))
        self.assertIn(f"127.0.0.1:{kport};transport=tcp", invite.headers.get("Record-Route"))
        response = yield call.bye().addTimeout(DEADLINE_S, reactor)
        self.assertEqual(response.status, 200)
        self.assertEqual(inbound.listener.names(), ["bye", "terminated"])
        self.assertEqual(caller.stack.counters["send_errors"], 0)
