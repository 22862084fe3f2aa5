"""The registration client against Kamailio 5.6 (digest-auth registrar), real UDP on 127.0.0.1.

The test writes a minimal kamailio.cfg (in-memory usrloc, ``pv_www_authenticate``
with the password in the script, ``min_expires = max_expires = 3`` with 423
replies), runs ``kamailio -DD -E`` in the foreground, registers through the real
SIP user agent and reads the location table with ``kamcmd ul.dump``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from activecall.config import Config, Credential, RegisterUser
from activecall.ids import SystemIds
from activecall.sip.message import Headers, NameAddr, SipRequest, SipResponse
from activecall.sip.registration import RegistrationService
from activecall.sip.service import SipService, build_sip_service
from activecall.sip.uri import SipUri, parse_uri
from harness import _Waiters, free_port

KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
KAMCMD = shutil.which("kamcmd") or "/usr/sbin/kamcmd"
MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"
PASSWORD = "s3cret"
DEADLINE_S = 20.0

CONFIG = """#!KAMAILIO
debug=2
log_stderror=yes
children=1
disable_tcp=yes
auto_aliases=no
listen=udp:127.0.0.1:{port}
alias="127.0.0.1:{port}"
mpath="{modules}"
loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "textops.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"
loadmodule "ctl.so"
modparam("ctl", "binrpc", "unix:{ctl}")
modparam("usrloc", "db_mode", 0)
modparam("registrar", "min_expires", 3)
modparam("registrar", "max_expires", 3)
modparam("registrar", "min_expires_mode", 1)

request_route {{
    if (is_method("OPTIONS")) {{ sl_send_reply("200", "OK"); exit; }}
    if (!is_method("REGISTER")) {{ sl_send_reply("404", "Not Here"); exit; }}
    if (!pv_www_authenticate("$td", "{password}", "0")) {{
        www_challenge("$td", "1");
        exit;
    }}
    if ($au != "2001") {{ sl_send_reply("403", "Forbidden"); exit; }}
    consume_credentials();
    if (!save("location")) {{ sl_reply_error(); }}
    exit;
}}
"""


class Kamailio(ProcessProtocol):
    """The registrar process: collects its log, fires ``ended`` on exit."""

    def __init__(self) -> None:
        self.log = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        """Keep stdout for failure messages."""
        self.log += data

    def errReceived(self, data: bytes) -> None:
        """Keep stderr (where -E logs go) for failure messages."""
        self.log += data

    def processEnded(self, reason: Failure) -> None:
        """The process and its pipes are gone."""
        if not self.ended.called:
            self.ended.callback(None)

    def stop(self) -> Deferred[None]:
        """SIGTERM, then SIGKILL if it has not exited within 10 s."""
        if self.ended.called:
            return self.ended
        try:
            assert self.transport is not None
            self.transport.signalProcess("TERM")
        except ProcessExitedAlready:
            return self.ended
        done: Deferred[None] = Deferred()

        def killed(f: Failure) -> Deferred[None]:
            f.trap(TimeoutError)
            try:
                assert self.transport is not None
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
            return self.ended

        self.ended.addBoth(lambda r: done.callback(None) if not done.called else None)
        done.addTimeout(10, reactor)
        done.addErrback(killed)
        return done


class RecordingUserAgent:
    """Passes requests to the real user agent and records each final response."""

    def __init__(self, ua: Any) -> None:
        self._ua = ua
        self.exchanges: list[tuple[SipRequest, SipResponse]] = []
        self.waiters = _Waiters()

    def request(self, request: SipRequest, destination: Any = None, *,
                credentials: Credential | None = None) -> Deferred[SipResponse]:
        """Send through the real UA; record (request as first sent, final response)."""
        sent = request.copy()
        d: Deferred[SipResponse] = self._ua.request(request, destination, credentials=credentials)

        def got(response: SipResponse) -> SipResponse:
            self.exchanges.append((sent, response))
            # Poke on the next turn, once the registration service has seen the response too.
            reactor.callLater(0, self.waiters.poke)
            return response

        return d.addCallback(got)

    def local_contact(self, transport: str = "udp", user: str | None = None) -> SipUri:
        """The real UA's Contact."""
        uri: SipUri = self._ua.local_contact(transport, user)
        return uri

    def on_public_address(self, callback: Callable[[str, int], None]) -> None:
        """Subscribe on the real UA."""
        self._ua.on_public_address(callback)

    def statuses(self) -> list[int]:
        """Final statuses so far, in order."""
        return [r.status for _, r in self.exchanges]


class KamailioRegistrationTests(TestCase):
    """REGISTER (with 423 and digest), refresh and un-REGISTER against Kamailio."""

    timeout = 90

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        """Start Kamailio and our SIP listener; wait until Kamailio answers OPTIONS."""
        if not (os.access(KAMAILIO, os.X_OK) and os.access(KAMCMD, os.X_OK)):
            raise SkipTest("kamailio is not installed (apt-get install -y kamailio)")
        # Short path: a unix socket path must fit in 108 bytes.
        self.tmp = tempfile.mkdtemp(prefix="kam-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.ctl = os.path.join(self.tmp, "ctl.sock")
        self.kport = free_port(socket.SOCK_DGRAM)
        cfg = os.path.join(self.tmp, "kamailio.cfg")
        with open(cfg, "w") as f:
            f.write(CONFIG.format(port=self.kport, modules=MODULES, ctl=self.ctl,
                                  password=PASSWORD))
        self.kamailio = Kamailio()
        reactor.spawnProcess(
            self.kamailio, KAMAILIO,
            [KAMAILIO, "-DD", "-E", "-f", cfg, "-Y", self.tmp, "-w", self.tmp],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        self.addCleanup(self.kamailio.stop)

        self.sip: SipService = build_sip_service(
            Config(addr="127.0.0.1", udp_port=0), reactor, SystemIds(), None
        )
        self.sip.startService()
        self.addCleanup(self.sip.stopService)
        self.ua = RecordingUserAgent(self.sip.user_agent)
        return self._options_ping()

    def _options_ping(self) -> Deferred[None]:
        """OPTIONS to Kamailio: UDP retransmissions cover its start-up; 200 means ready."""
        target = parse_uri(f"sip:127.0.0.1:{self.kport}")
        headers = Headers([
            ("From", str(NameAddr(parse_uri("sip:probe@127.0.0.1")))),
            ("To", str(NameAddr(target.copy()))),
        ])
        options = SipRequest("OPTIONS", target, headers)
        d: Deferred[SipResponse] = self.sip.user_agent.request(options)
        d.addTimeout(DEADLINE_S, reactor)

        def ready(response: SipResponse) -> None:
            if response.status != 200:
                log = self.kamailio.log.decode(errors="replace")
                self.fail(f"kamailio not ready: {response.status}\n{log}")

        return d.addCallback(ready)

    @inlineCallbacks
    def ul_dump(self) -> Any:
        """``kamcmd ul.dump`` text."""
        args = ["-s", f"unix:{self.ctl}", "ul.dump"]
        out, err, code = yield getProcessOutputAndValue(KAMCMD, args)
        self.assertEqual(code, 0, err)
        return out.decode()

    def wait(self, check: Callable[[], Any], what: str) -> Deferred[Any]:
        """Fire when ``check()`` is true after some response, or fail after the deadline."""
        return self.ua.waiters.wait(check, DEADLINE_S, what)

    @inlineCallbacks
    def test_register_refresh_unregister(self) -> Any:
        """The account registers (after a 423), refreshes before expiry and unregisters on stop."""
        account = RegisterUser(
            server=f"sip:127.0.0.1:{self.kport}", username="2001",
            credential=Credential(username="2001", password=PASSWORD),
        )
        service = RegistrationService(self.ua, [account], reactor, SystemIds(), expires_s=2,
                                      stop_timeout_s=10.0)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        contact = f"sip:2001@127.0.0.1:{self.sip.port('udp')}"

        def state() -> str:
            return str(service.registrations_json()[0]["state"])

        # 1. REGISTER: digest (inside the UA), 423 Min-Expires: 3, REGISTER again, 200.
        yield self.wait(lambda: state() in ("registered", "failed"), "the first registration")
        log = self.kamailio.log.decode(errors="replace")
        self.assertEqual(state(), "registered", f"{self.ua.statuses()}\n{log}")
        self.assertEqual(self.ua.statuses(), [423, 200])
        (first, too_brief), (second, ok) = self.ua.exchanges
        self.assertEqual(first.headers.get("Expires"), "2")
        self.assertEqual(too_brief.headers.get("Min-Expires"), "3")
        self.assertEqual(second.headers.get("Expires"), "3")
        self.assertEqual(first.call_id, second.call_id)
        self.assertGreater(ok.cseq.seq, too_brief.cseq.seq)
        item = service.registrations_json()[0]
        self.assertEqual((item["status"], item["expires"], item["contact"]), (200, 3, contact))
        dump = yield self.ul_dump()
        self.assertIn("AoR: 2001", dump)
        self.assertIn(contact, dump)
        bound_cseq = int(re.findall(r"CSeq: (\d+)", dump)[0])
        self.assertEqual(bound_cseq, ok.cseq.seq)

        # 2. Refresh at 75 % of the 3 s granted: same Call-ID, higher CSeq, binding updated.
        yield self.wait(lambda: self.ua.statuses().count(200) >= 2, "the refresh")
        refresh, refreshed = self.ua.exchanges[-1]
        self.assertEqual(refreshed.status, 200)
        self.assertEqual(refresh.call_id, first.call_id)
        self.assertEqual(refresh.headers.get("Expires"), "3")
        self.assertGreater(refreshed.cseq.seq, ok.cseq.seq)
        dump = yield self.ul_dump()
        self.assertIn(contact, dump)
        self.assertGreaterEqual(int(re.findall(r"CSeq: (\d+)", dump)[0]), refreshed.cseq.seq)
        self.assertEqual(state(), "registered")

        # 3. Shutdown: Expires: 0, answered, binding gone.
        yield service.stopService()
        # stopService fires from inside the SIP stack's datagram handling; leave it first.
        yield deferLater(reactor, 0, lambda: None)
        bye, gone = self.ua.exchanges[-1]
        self.assertEqual(bye.headers.get("Expires"), "0")
        self.assertEqual(gone.status, 200)
        self.assertEqual(bye.call_id, first.call_id)
        self.assertEqual(state(), "unregistered")
        dump = yield self.ul_dump()
        self.assertNotIn(contact, dump)
