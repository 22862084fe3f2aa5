"""Interop with SIPp (sip-tester) over real UDP sockets on 127.0.0.1.

Each test starts the SIP service on free ports and one SIPp process, waits for
SIPp to exit (trial's timeout is the deadline) and checks both sides.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from activecall.config import Config
from activecall.ids import SystemIds
from activecall.sip.service import SipService, build_sip_service
from activecall.sip.useragent import CallRejected, OutboundCall
from activecall.testing_sip import AutoAnswerHandler, minimal_sdp

SCENARIOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp")
SIPP = shutil.which("sipp")


def free_udp_port() -> int:
    """A currently free UDP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _SippProcess(ProcessProtocol):
    """Collects output and fires ``ended`` with the exit code."""

    def __init__(self) -> None:
        self.ended: Deferred[int] = Deferred()
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(-1 if code is None else code)


class SippTestCase(TestCase):
    """Starts the service and SIPp, and stops both in cleanup."""

    timeout = 60

    def setUp(self) -> None:
        if SIPP is None:
            raise SkipTest("sipp (sip-tester) is not installed")
        from twisted.internet import reactor

        self.reactor = reactor
        self.workdir = tempfile.mkdtemp(prefix="sipp-")

    def start_service(self, handler: Any) -> SipService:
        service = build_sip_service(Config(addr="127.0.0.1", udp_port=0, useragent="activecall-test"),
                                    self.reactor, SystemIds(), handler)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def sipp(self, *args: str, calls: int = 1) -> _SippProcess:
        proto = _SippProcess()
        argv = [SIPP, *args, "-i", "127.0.0.1", "-m", str(calls), "-timeout", "30", "-timeout_error",
                "-nostdin", "-trace_err", "-max_recv_loops", "1000"]
        transport = self.reactor.spawnProcess(proto, SIPP, argv, env=os.environ.copy(), path=self.workdir)

        def stop() -> Deferred[int] | None:
            if proto.ended.called:
                return None
            try:
                transport.signalProcess("KILL")
            except ProcessExitedAlready:
                return None
            return proto.ended

        self.addCleanup(stop)
        return proto

    def errors(self) -> str:
        out = []
        for name in os.listdir(self.workdir):
            if name.endswith("_errors.log"):
                with open(os.path.join(self.workdir, name)) as f:
                    out.append(f.read())
        return "\n".join(out)


class SippUacTests(SippTestCase):
    """SIPp as the caller, the daemon as UAS."""

    @inlineCallbacks
    def run_uac(self, handler: Any, *scenario: str, calls: int = 1) -> Any:
        service = self.start_service(handler)
        proto = self.sipp(*scenario, f"127.0.0.1:{service.port('udp')}", "-p", str(free_udp_port()), calls=calls)
        code = yield proto.ended
        self.assertEqual(code, 0, proto.output.decode(errors="replace")[-2000:] + self.errors())
        return service

    @inlineCallbacks
    def test_options(self) -> Any:
        """OPTIONS from SIPp gets 200 with Allow (INVITE) and Accept: application/sdp."""
        yield self.run_uac(None, "-sf", os.path.join(SCENARIOS, "uac_options.xml"))

    @inlineCallbacks
    def test_invite_answer_bye(self) -> Any:
        """SIPp's built-in UAC: INVITE, 200 with SDP, ACK, BYE, 200 — for five calls."""
        handler = AutoAnswerHandler()
        yield self.run_uac(handler, "-sn", "uac", "-d", "10", calls=5)
        self.assertEqual(len(handler.calls), 5)
        for call in handler.calls:
            self.assertEqual(call.listener.names(), ["bye", "terminated"])
            self.assertTrue(call.acked.called)

    @inlineCallbacks
    def test_cancel(self) -> Any:
        """SIPp cancels after 180: the daemon answers 200 and 487 and the call layer hears on_cancel."""
        handler = AutoAnswerHandler(ring=True, answer=False)
        yield self.run_uac(handler, "-sf", os.path.join(SCENARIOS, "uac_cancel.xml"))
        (call,) = handler.calls
        self.assertEqual(call.listener.names(), ["cancel", "terminated"])

    @inlineCallbacks
    def test_lost_200_is_retransmitted(self) -> Any:
        """SIPp withholds the ACK for the first 200: the daemon resends it, then the call completes."""
        handler = AutoAnswerHandler()
        service = yield self.run_uac(handler, "-sf", os.path.join(SCENARIOS, "uac_lost_200.xml"))
        (call,) = handler.calls
        self.assertEqual(call.listener.names(), ["bye", "terminated"])
        # 200 at 0 and 0.5 s (ACK at 1 s), then the 200 for the BYE: without retransmission it would be 2.
        self.assertGreaterEqual(service.stack.counters["sent"], 3)


class SippUasTests(SippTestCase):
    """The daemon as the caller, SIPp as UAS."""

    def target(self, *scenario: str) -> tuple[str, _SippProcess]:
        port = free_udp_port()
        proto = self.sipp(*scenario, "-p", str(port))
        return f"sip:sipp@127.0.0.1:{port}", proto

    @inlineCallbacks
    def test_invite_ack_bye(self) -> Any:
        """The daemon calls SIPp's built-in UAS, gets 180/200, ACKs, and SIPp hangs up with BYE."""
        service = self.start_service(None)
        target, proto = self.target("-sn", "uas")
        provisional: list[int] = []
        terminated: Deferred[str] = Deferred()
        call = yield service.user_agent.invite(target, "sip:bot@127.0.0.1", sdp=minimal_sdp(),
                                               on_provisional=lambda r: provisional.append(r.status))
        self.assertIsInstance(call, OutboundCall)
        self.assertIn(180, provisional)

        class Listener:
            def on_terminated(self, reason: str) -> None:
                terminated.callback(reason)

        call.listener = Listener()
        # SIPp's uas scenario waits for our BYE.
        response = yield call.bye()
        self.assertEqual(response.status, 200)
        self.assertEqual((yield terminated), "bye-sent")
        code = yield proto.ended
        self.assertEqual(code, 0, proto.output.decode(errors="replace")[-2000:] + self.errors())

    @inlineCallbacks
    def test_busy_486(self) -> Any:
        """A 486 from SIPp errbacks the invite with CallRejected(486) and is ACKed."""
        service = self.start_service(None)
        target, proto = self.target("-sf", os.path.join(SCENARIOS, "uas_486.xml"))
        with self.assertRaises(CallRejected) as ctx:
            yield service.user_agent.invite(target, "sip:bot@127.0.0.1", sdp=minimal_sdp())
        self.assertEqual(ctx.exception.status, 486)
        code = yield proto.ended
        self.assertEqual(code, 0, proto.output.decode(errors="replace")[-2000:] + self.errors())

    @inlineCallbacks
    def test_digest_challenge(self) -> Any:
        """A 401 is answered with credentials that SIPp's verifyauth accepts; the call is set up and ended."""
        service = self.start_service(None)
        target, proto = self.target("-sf", os.path.join(SCENARIOS, "uas_auth.xml"))
        creds = type("Creds", (), {"username": "agent", "password": "s3cret"})()
        call = yield service.user_agent.invite(target, "sip:agent@127.0.0.1", sdp=minimal_sdp(),
                                               credentials=creds)
        self.assertIn("Authorization", call.invite_request.headers)
        response = yield call.bye()
        self.assertEqual(response.status, 200)
        code = yield proto.ended
        self.assertEqual(code, 0, proto.output.decode(errors="replace")[-2000:] + self.errors())

    @inlineCallbacks
    def test_digest_wrong_password(self) -> Any:
        """With a wrong password SIPp's verifyauth fails and the invite ends with 403."""
        service = self.start_service(None)
        target, proto = self.target("-sf", os.path.join(SCENARIOS, "uas_auth.xml"))
        creds = type("Creds", (), {"username": "agent", "password": "wrong"})()
        with self.assertRaises(CallRejected) as ctx:
            yield service.user_agent.invite(target, "sip:agent@127.0.0.1", sdp=minimal_sdp(), credentials=creds)
        self.assertEqual(ctx.exception.status, 403)
        yield proto.ended
