"""The playbook handler: rules pick the playbook; failures refuse the INVITE with a 503 Reason."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from activecall.config import Overrides, parse_config
from activecall.handlers.playbook import PlaybookCallHandler


class FakeCall:
    def __init__(self, caller: str, callee: str) -> None:
        self.caller = caller
        self.callee = callee
        self.dialog_id = "d-1"
        self.cancelled = False
        self.terminated = False
        self.rejected: list[tuple[int, list[tuple[str, str]]]] = []

    def reject(self, code: int, reason: Any = None, headers: Any = ()) -> None:
        self.rejected.append((code, list(headers)))


class PlaybookHandlerTests(SynchronousTestCase):
    """Routing per config.md §5 and playbook.md §13.3."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        with open(os.path.join(self.dir, "sales.md"), "w") as f:
            f.write("---\nllm:\n  provider: openai\ngreeting: Sales here.\n---\nSell.\n")
        with open(os.path.join(self.dir, "broken.md"), "w") as f:
            f.write("no front matter\n")
        config = parse_config(
            f'[handler]\ntype = "playbook"\n'
            f'[[handler.rules]]\ncallee = "^sip:sales@"\nplaybook = "{self.dir}/sales.md"\n'
            f'[[handler.rules]]\ncallee = "^sip:broken@"\nplaybook = "{self.dir}/broken.md"\n'
            f'[[handler.rules]]\ncallee = "^sip:gone@"\nplaybook = "{self.dir}/gone.md"\n', Overrides())
        self.started: list[Any] = []
        self.handler = PlaybookCallHandler(config.handler, lambda call, pb: self.started.append((call, pb)),
                                           lambda f, *a: maybeDeferred(f, *a), {})

    def reason(self, call: FakeCall) -> str:
        [(code, headers)] = call.rejected
        self.assertEqual(code, 503)
        return dict(headers)["Reason"]

    def test_matching_rule_starts_the_call_with_its_playbook(self) -> None:
        """The first matching rule's playbook is loaded and handed to the call layer."""
        call = FakeCall("sip:alice@example.com", "sip:sales@pbx")
        self.handler.incoming_call(call)
        [(started_call, playbook)] = self.started
        self.assertIs(started_call, call)
        self.assertEqual(playbook.greeting, "Sales here.")

    def test_failures_are_503_with_a_reason(self) -> None:
        """No match, a missing file and a bad file each refuse with an explaining Reason."""
        cases = [("sip:nobody@pbx", "No matching playbook"), ("sip:gone@pbx", "Playbook Not Found"),
                 ("sip:broken@pbx", "Playbook error")]
        for callee, text in cases:
            call = FakeCall("sip:alice@example.com", callee)
            self.handler.incoming_call(call)
            self.assertIn(text, self.reason(call))
        self.assertEqual(len(self.started), 0)

    def test_playbook_without_llm_is_answered(self) -> None:
        """A playbook without llm (IVR mode, playbook.md §8.5) starts the call instead of a 503."""
        with open(os.path.join(self.dir, "ivr.md"), "w") as f:
            f.write('---\ntts:\n  provider: piper\n---\nPress 1 for sales. <dtmf digit="1" action="hangup" words="sales"/>\n')
        config = parse_config(f'[handler]\ntype = "playbook"\ndefault = "{self.dir}/ivr.md"\n', Overrides())
        handler = PlaybookCallHandler(config.handler, lambda call, pb: self.started.append((call, pb)),
                                      lambda f, *a: maybeDeferred(f, *a), {})
        call = FakeCall("sip:alice@example.com", "sip:menu@pbx")
        handler.incoming_call(call)
        self.assertEqual(call.rejected, [])
        [(_, playbook)] = self.started
        self.assertTrue(playbook.ivr)
        self.assertEqual(playbook.prompt, "Press 1 for sales.")

    def test_template_error_is_503_before_answering(self) -> None:
        """A malformed {{ }} template refuses the call with the file and line in the Reason."""
        path = os.path.join(self.dir, "tpl.md")
        with open(path, "w") as f:
            f.write("---\ngreeting: hi\n---\nHello {{ caller \n")
        config = parse_config(f'[handler]\ntype = "playbook"\ndefault = "{path}"\n', Overrides())
        handler = PlaybookCallHandler(config.handler, lambda call, pb: self.started.append((call, pb)),
                                      lambda f, *a: maybeDeferred(f, *a), {})
        call = FakeCall("sip:alice@example.com", "sip:menu@pbx")
        handler.incoming_call(call)
        self.assertIn(f"Playbook error: {path}:", self.reason(call))
        self.assertIn("template error", self.reason(call))
        self.assertEqual(self.started, [])

    def test_cancelled_while_loading_is_not_started(self) -> None:
        """A caller that gave up while the file was read is not answered."""
        call = FakeCall("sip:alice@example.com", "sip:sales@pbx")
        call.cancelled = True
        self.handler.incoming_call(call)
        self.assertEqual(self.started, [])

    def test_env_prefix_limits_variables(self) -> None:
        """The handler passes [api] env_prefix: only those variables expand; others are empty."""
        with open(os.path.join(self.dir, "sales.md"), "w") as f:
            f.write("---\nllm:\n  provider: openai\ngreeting: ${CORP_GREETING}${HOME}\n---\nSell.\n")
        config = parse_config(
            f'[handler]\ntype = "playbook"\ndefault = "{self.dir}/sales.md"\n', Overrides())
        handler = PlaybookCallHandler(config.handler, lambda call, pb: self.started.append((call, pb)),
                                      lambda f, *a: maybeDeferred(f, *a),
                                      {"CORP_GREETING": "Hello.", "HOME": "/root"}, env_prefix="CORP_")
        handler.incoming_call(FakeCall("sip:a@x", "sip:b@y"))
        [(_, playbook)] = self.started
        self.assertEqual(playbook.greeting, "Hello.")

    def test_playbook_parsed_once_until_the_file_changes(self) -> None:
        """Two calls share one parsed playbook; an edit (new mtime) is parsed for the next call."""
        self.handler.incoming_call(FakeCall("sip:alice@example.com", "sip:sales@pbx"))
        self.handler.incoming_call(FakeCall("sip:carol@example.com", "sip:sales@pbx"))
        [(_, first), (_, second)] = self.started
        self.assertIs(second, first)
        path = os.path.join(self.dir, "sales.md")
        with open(path, "w") as f:
            f.write("---\nllm:\n  provider: openai\ngreeting: Sales, new.\n---\nSell.\n")
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        self.handler.incoming_call(FakeCall("sip:dave@example.com", "sip:sales@pbx"))
        self.assertEqual(self.started[2][1].greeting, "Sales, new.")

    def test_recently_checked_file_needs_no_thread_hop(self) -> None:
        """With a clock, a call within a second of the last check takes the cached playbook at once;
        later calls check the file again and see an edit."""
        from twisted.internet.task import Clock

        clock = Clock()
        hops: list[object] = []

        def run_blocking(f: Any, *a: Any) -> Any:
            hops.append(f)
            return maybeDeferred(f, *a)

        config = parse_config(f'[handler]\ntype = "playbook"\ndefault = "{self.dir}/sales.md"\n', Overrides())
        handler = PlaybookCallHandler(config.handler, lambda call, pb: self.started.append((call, pb)),
                                      run_blocking, {}, clock=clock)
        handler.incoming_call(FakeCall("sip:a@x", "sip:b@y"))
        clock.advance(0.5)
        handler.incoming_call(FakeCall("sip:a@x", "sip:b@y"))
        self.assertEqual((len(hops), len(self.started)), (1, 2))
        self.assertIs(self.started[0][1], self.started[1][1])
        path = os.path.join(self.dir, "sales.md")
        with open(path, "w") as f:
            f.write("---\nllm:\n  provider: openai\ngreeting: Changed.\n---\nSell.\n")
        os.utime(path, ns=(1, 1))
        clock.advance(1)
        handler.incoming_call(FakeCall("sip:a@x", "sip:b@y"))
        self.assertEqual(len(hops), 2)
        self.assertEqual(self.started[-1][1].greeting, "Changed.")

