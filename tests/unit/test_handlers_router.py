"""The inbound router: [handler] picks webhook, playbook or no handler; shutdown refuses; unclaimed calls get records."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from activecall.config import Config, Overrides, parse_config
from activecall.control.query import SessionParams
from activecall.handlers.pending import SHUTTING_DOWN_REASON
from activecall.handlers.router import InboundRouter, PlaybookCallStarter, UnansweredCallRecords, build_router
from activecall.playbook.model import parse_playbook
from activecall.sip.useragent import ICallHandler


class FakeRequest:
    headers = [("From", "<sip:alice@example.com>;tag=1"), ("To", "<sip:agent@pbx>")]
    body = b"v=0\r\n"


class FakeCall:
    """An inbound call as the handlers see it; records how it was answered."""

    def __init__(self, dialog_id: str = "d-1", callee: str = "sip:sales@pbx") -> None:
        self.dialog_id = dialog_id
        self.call_id = "c-1"
        self.from_tag = "1"
        self.to_tag = "2"
        self.caller = "sip:alice@example.com"
        self.callee = callee
        self.request = FakeRequest()
        self.source = ("192.0.2.10", 5060)
        self.cancelled = False
        self.terminated = False
        self.listener: Any = None
        self.rejected: list[tuple[int, dict[str, str]]] = []

    def reject(self, code: int, reason: Any = None, headers: Any = ()) -> None:
        self.rejected.append((code, dict(headers)))


class FakeController:
    """Records the typed operations asked of it."""

    def __init__(self) -> None:
        self.answered: list[tuple[Any, Any]] = []
        self.sid = "d-1"
        self.call_type = "sip"
        self.created_at = 1_700_000_000.0
        self.agent: Any = None

    def answer(self, option: Any, call: Any = None) -> None:
        # The playbook's engine is attached before the call is answered (it hears the answer).
        self.answered.append((option, call, self.agent))


class FakeSession:
    def __init__(self, params: SessionParams) -> None:
        self.params = params
        self.controller = FakeController()


class FakeSessions:
    def __init__(self) -> None:
        self.opened: dict[str, FakeSession] = {}

    def open(self, params: SessionParams) -> FakeSession:
        self.opened[params.sid] = FakeSession(params)
        return self.opened[params.sid]

    def get(self, sid: str) -> FakeSession | None:
        return self.opened.get(sid)


class FakeHttpClient:
    """Records webhook requests; each one waits on a Deferred the test fires."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    def request(self, method: str, url: str, *, data: bytes, headers: Any) -> Deferred[Any]:
        self.requests.append((method, url))
        return Deferred()


class FakeRecords:
    def __init__(self) -> None:
        self.written: list[tuple[dict[str, Any], float]] = []

    def write(self, record: Any, start_epoch_s: float) -> Deferred[Any]:
        self.written.append((dict(record), start_epoch_s))
        return succeed("memory")


class RouterTests(SynchronousTestCase):
    """build_router reads [handler] once and sends each INVITE where it says."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.sessions = FakeSessions()
        self.http = FakeHttpClient()
        self.records = FakeRecords()
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        with open(os.path.join(self.dir, "sales.md"), "w") as f:
            f.write("---\nllm:\n  provider: openai\ngreeting: Sales here.\n---\nSell.\n")

    def router(self, toml: str, records: Any = None) -> InboundRouter:
        config: Config = parse_config(toml, Overrides())
        return build_router(config, clock=self.clock, sessions=self.sessions, http_client=self.http,
                            run_blocking=lambda f, *a: maybeDeferred(f, *a), environ={},
                            call_records=records, trusted=lambda ip: False)

    def webhook(self, records: Any = None) -> InboundRouter:
        return self.router('[handler]\ntype = "webhook"\nurl = "http://hook.example/invite"\n', records)

    def playbook(self) -> InboundRouter:
        return self.router(f'[handler]\ntype = "playbook"\ndefault = "{self.dir}/sales.md"\n')

    def test_no_handler_gives_the_user_agent_none(self) -> None:
        """Without [handler] there is no call handler (the user agent answers 503 itself) and nothing pending."""
        router = self.router("")
        self.assertIsNone(router.call_handler)
        self.assertIsNone(router.pending)
        router.reject_waiting_calls()  # nothing to refuse

    def test_webhook_invite_notifies_and_waits_for_a_session(self) -> None:
        """A webhook route parks the INVITE in pending under its dialogId and posts the webhook once."""
        router = self.webhook()
        self.assertIs(router.call_handler, router)
        verifyObject(ICallHandler, router)
        call = FakeCall()
        router.incoming_call(call)
        self.assertEqual(self.http.requests, [("POST", "http://hook.example/invite")])
        assert router.pending is not None
        self.assertIs(router.pending.get("d-1"), call)
        self.assertEqual(call.rejected, [])
        self.assertEqual(self.sessions.opened, {})

    def test_webhook_accept_timeout_from_config(self) -> None:
        """The pending call is answered 408 after [accept_timeout] with no client."""
        router = self.router('accept_timeout = "5s"\n[handler]\ntype = "webhook"\nurl = "http://h/"\n')
        call = FakeCall()
        router.incoming_call(call)
        self.clock.advance(5)
        self.assertEqual([code for code, _ in call.rejected], [408])

    def test_playbook_invite_opens_a_session_that_answers(self) -> None:
        """A playbook route opens the dialog's session (dump, no pings) and answers through the controller."""
        router = self.playbook()
        self.assertIsNone(router.pending)
        call = FakeCall()
        router.incoming_call(call)
        session = self.sessions.opened["d-1"]
        self.assertEqual(session.params, SessionParams(sid="d-1", call_type="sip", dump=True, ping_s=0))
        [(option, answered, _agent)] = session.controller.answered
        self.assertIs(answered, call)
        self.assertEqual(option.inactivity_timeout, 50)
        self.assertEqual(self.http.requests, [])

    def test_the_router_keeps_no_drain_state(self) -> None:
        """Draining is the user agent's alone: the router has no draining flag for it to read."""
        for router in (self.webhook(), self.playbook(), self.router("")):
            router.reject_waiting_calls()
            self.assertFalse(hasattr(router, "draining"))

    def test_shutdown_answers_calls_still_waiting(self) -> None:
        """Calls waiting for a client are answered 503 at shutdown and forgotten."""
        router = self.webhook()
        call = FakeCall()
        router.incoming_call(call)
        router.reject_waiting_calls()
        self.assertEqual(call.rejected, [(503, {"Reason": SHUTTING_DOWN_REASON})])
        assert router.pending is not None
        self.assertEqual(len(router.pending), 0)

    def test_unclaimed_call_gets_a_record(self) -> None:
        """With [callrecord], a webhook call that times out unclaimed is recorded as failed with its status."""
        router = self.router('accept_timeout = "5s"\n[handler]\ntype = "webhook"\nurl = "http://h/"\n',
                             self.records)
        router.incoming_call(FakeCall())
        self.clock.advance(5)
        [(record, started)] = self.records.written
        self.assertEqual(started, 1000)
        self.assertEqual((record["callId"], record["caller"], record["callee"], record["statusCode"]),
                         ("d-1", "sip:alice@example.com", "sip:sales@pbx", 408))


class UnansweredCallRecordsTests(SynchronousTestCase):
    """The record of a call that left pending unanswered; none for a call a session took."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1010)
        self.records = FakeRecords()
        self.sessions = FakeSessions()
        self.closed = UnansweredCallRecords(self.clock, self.records, self.sessions)

    def test_cancel_is_recorded_as_canceled(self) -> None:
        """A 487 (caller CANCEL) is recorded with the canceled hangup reason and the pending time span."""
        self.closed("d-1", FakeCall(), 1000.0, 487)
        [(record, started)] = self.records.written
        self.assertEqual(started, 1000.0)
        self.assertEqual(record["statusCode"], 487)
        self.assertEqual(record["hangupReason"], "canceled")
        self.assertEqual(record["extras"], {"session_id": "d-1", "call_type": "sip"})

    def test_other_status_is_recorded_as_failed(self) -> None:
        """Any other final status (timeout, client gone, shutdown) is recorded as failed."""
        self.closed("d-1", FakeCall(), 1000.0, 603)
        [(record, _)] = self.records.written
        self.assertEqual(record["hangupReason"], "failed")

    def test_call_with_a_session_is_not_recorded_here(self) -> None:
        """A session's controller writes its own record: nothing from here."""
        self.sessions.open(SessionParams(sid="d-1", call_type="sip"))
        self.closed("d-1", FakeCall(), 1000.0, 603)
        self.assertEqual(self.records.written, [])


class PlaybookCallStarterTests(SynchronousTestCase):
    """The option a playbook call is answered with."""

    def test_playbook_inactivity_timeout_kept(self) -> None:
        """A playbook that sets its own inactivity timeout keeps it; the option is the playbook's."""
        parsed = parse_playbook("---\nllm:\n  provider: openai\nsip:\n  username: bob\n---\nx", {}, "t.md")
        playbook = dataclasses.replace(parsed, option=dataclasses.replace(parsed.option, inactivity_timeout=7))
        sessions = FakeSessions()
        call = FakeCall()
        PlaybookCallStarter(sessions)(call, playbook)
        [(option, _, agent)] = sessions.opened["d-1"].controller.answered
        self.assertEqual(option.inactivity_timeout, 7)
        self.assertEqual(option.sip, playbook.option.sip)
        self.assertIsNone(agent)
        # Barge-in defaults to "both" on playbook calls (§9).
        self.assertEqual(option.interruption.strategy, "both")

    def test_the_engine_is_attached_before_the_answer(self) -> None:
        """With a runner, the playbook's engine becomes the controller's agent, its variables from the INVITE."""
        from twisted.internet.defer import maybeDeferred

        from activecall.playbook.engine import PlaybookEngine
        from activecall.playbook.runner import PlaybookRunner

        parsed = parse_playbook("---\ngreeting: Hi {{ caller }}.\n---\n# Scene: a\nPress 1.\n", {}, "t.md")
        runner = PlaybookRunner(clock=Clock(), run_blocking=lambda f, *a, **k: maybeDeferred(f, *a, **k), environ={})
        sessions = FakeSessions()
        call = FakeCall()
        call.request.headers = {"From": "<sip:alice@example.com>;tag=1", "X-Customer": "42"}
        PlaybookCallStarter(sessions, runner)(call, parsed)
        [(_, _, agent)] = sessions.opened["d-1"].controller.answered
        self.assertIsInstance(agent, PlaybookEngine)
        self.assertEqual(agent.playbook.greeting, "Hi sip:alice@example.com.")
        self.assertEqual(agent.variables["X-Customer"], "42")
        self.assertTrue(agent.ivr)


class RunnerLoadTests(SynchronousTestCase):
    def test_oversized_inline_playbook_is_a_load_error(self) -> None:
        """Inline text larger than 256 KiB is refused before it is parsed."""
        from twisted.internet.defer import maybeDeferred

        from activecall.playbook.model import PlaybookError
        from activecall.playbook.runner import PlaybookRunner

        runner = PlaybookRunner(clock=Clock(), run_blocking=lambda f, *a, **k: maybeDeferred(f, *a, **k), environ={})
        failure = self.failureResultOf(runner.load("---\n" + "x" * (300 * 1024)), PlaybookError)
        self.assertIn("larger than", str(failure.value))
        self.assertTrue(self.successResultOf(runner.load("---\ngreeting: hi\n---\nHello.\n")).ivr)
