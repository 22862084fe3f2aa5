"""The conversation engine (playbook.md §7–§11) on a real controller with a fake leg, TTS and model.

Time is a task.Clock; the model is a scripted in-process chat client whose answers the
tests stream piece by piece; caller speech and keys are the domain events the hearing
and the leg would report.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.agent.llm import ChatResult, LlmError, ToolCall
from activecall.call import events as ce
from activecall.call.controller import CallController
from activecall.options import CallOption
from activecall.playbook.engine import EngineServices, PlaybookEngine
from activecall.playbook.model import parse_playbook, render_playbook
from activecall.playbook.prompt import PromptTexts
from activecall.testing import fake_call_services, FakeDialer, FakeLeg, FakeSynthesizer, RecordingObserver

SID = "s.engine"


class _Request:
    def __init__(self, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> None:
        self.messages = [dict(m) for m in messages]
        self.kwargs = kwargs
        self.on_delta = kwargs["on_delta"]
        self.cancelled = False
        self.d: Deferred[ChatResult] = Deferred(lambda _: self._cancel())
        self.text: list[str] = []

    def _cancel(self) -> None:
        self.cancelled = True

    def send(self, *pieces: str) -> None:
        for p in pieces:
            self.text.append(p)
            self.on_delta(p)

    def finish(self, tool_calls: tuple[ToolCall, ...] = ()) -> None:
        self.d.callback(ChatResult("".join(self.text), tool_calls, "stop"))

    def reply(self, *pieces: str) -> None:
        self.send(*pieces)
        self.finish()


class FakeChat:
    """Records each stream() request; the test answers it."""

    def __init__(self) -> None:
        self.requests: list[_Request] = []

    def stream(self, messages: Any, **kwargs: Any) -> Deferred[ChatResult]:
        kwargs.setdefault("on_delta", lambda text: None)
        request = _Request(list(messages), kwargs)
        self.requests.append(request)
        return request.d

    @property
    def last(self) -> _Request:
        return self.requests[-1]


LLM_PLAYBOOK = """---
llm:
  provider: openai
  model: test-model
tts:
  provider: fake
greeting: Welcome to the shop.
dtmf:
  "0": {action: hangup}
dtmfCollectors:
  account:
    description: Account number
    digits: 4
    validation: {pattern: "^[0-9]+$", errorMessage: Digits only please}
    retryTimes: 1
followUp: {timeout: 0, maxCount: 2}
sip:
  hangup_headers:
    X-Result: "{{ outcome }}"
---
# Scene: main
You are a helpful shop assistant.
<dtmf digit="1" action="goto" scene="billing"/>

# Scene: billing
You handle billing for {{ caller }}.
"""

IVR_PLAYBOOK = """---
tts:
  provider: fake
greeting: Hello.
---
# Scene: menu
Press 1 or say sales for sales. Press 2 for support.
<dtmf digit="1" action="goto" scene="sales" words="sales|buy something"/>
<dtmf digit="2" action="goto" scene="support" words="support"/>
<dtmf digit="nomatch" action="goto" scene="sorry"/>
<followup timeout="0" max="1"/>

# Scene: sales
Sales here. Goodbye. <hangup/>

# Scene: support
Please enter your account number. <collect type="account" var="acct"/>
<dtmf digit="collected" action="goto" scene="thanks"/>

# Scene: thanks
Thank you, account {{ acct }}. Goodbye. <hangup/>

# Scene: sorry
Sorry, I did not get that. <hangup/>
"""

IVR_COLLECTORS = IVR_PLAYBOOK.replace("greeting: Hello.\n", "greeting: Hello.\ndtmfCollectors:\n  account: {digits: 3}\n")


class _Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.synth = FakeSynthesizer(self.clock, ms_per_char=10, chunk_ms=200, chunk_interval_s=0.01)
        self.dialer = FakeDialer()
        self.services = fake_call_services(self.clock, synthesizer=self.synth, dialers={"sip": self.dialer},
                                           inbound_legs=self.dialer)
        self.obs = RecordingObserver()
        self.chat = FakeChat()
        self.http_calls: list[tuple[Any, ...]] = []
        self.posthooks: list[PlaybookEngine] = []

    def start(self, text: str, *, chat: bool = True,
              environ: Optional[dict[str, str]] = None) -> tuple[CallController, PlaybookEngine, FakeLeg]:
        playbook = parse_playbook(text, environ or {}, "test.md")
        c = CallController(SID, "sst", "sip", self.services, self.obs, dialers=self.services.dialers)

        def call_http(url: str, method: str, body: Optional[bytes], headers: Any, tool: bool) -> Deferred[str]:
            self.http_calls.append((url, method, body, tool))
            return succeed(f"HTTP {method} {url} -> 200 ok")

        services = EngineServices(clock=self.clock, chat=self.chat if chat and not playbook.ivr else None,
                                  model="test-model", prompt_texts=PromptTexts(), call_http=call_http,
                                  after_call=self.posthooks.append)
        variables = {"caller": "sip:alice@x", "session_id": SID}
        # As the runner does: the load-time render with the call's variables (§3.3).
        playbook = render_playbook(playbook, variables, environ or {})
        engine = PlaybookEngine(c, playbook, services, variables)
        c.agent = engine
        c.dial(playbook.call_option(CallOption(callee="sip:bob@example.com")))
        leg = FakeLeg(ssrc=5)
        self.dialer.attempts[-1][3].callback(leg)
        self.leg = leg
        return c, engine, leg

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.02)):
            self.clock.advance(0.02)
            self.leg.tick()

    def said(self) -> list[str]:
        return [r.text for r in self.synth.requests]

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.obs.events if isinstance(e, cls)]

    def hear(self, c: CallController, text: str) -> None:
        c.report(ce.TranscriptHeard(c.now(), SID, True, 0, text))

    def key(self, c: CallController, digit: str) -> None:
        c.report(ce.DtmfReceived(c.now(), SID, digit))


class ConversationTests(_Case):
    def test_greeting_then_a_turn_streams_speech_and_history(self) -> None:
        """The greeting is spoken (not in LLM history); a final transcript asks the model with the system
        prompt and the user message; its reply is spoken as it streams and joins the history."""
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.advance(1)
        self.assertEqual(self.said(), ["Welcome to the shop."])
        self.assertEqual(self.chat.requests, [])
        self.hear(c, "Do you sell shoes?")
        request = self.chat.last
        self.assertEqual([m["role"] for m in request.messages], ["system", "user"])
        self.assertIn("You are a helpful shop assistant.", request.messages[0]["content"])
        self.assertNotIn("{{ caller", request.messages[0]["content"])
        self.assertEqual(request.kwargs["model"], "test-model")
        request.send("Yes, we do", " sell shoes, and")
        self.advance(0.2)
        # The first clause is on its way before the sentence is complete.
        self.assertEqual(len(self.synth.requests), 2)
        request.send(" boots. Anything else?")
        request.finish()
        self.advance(2)
        self.assertEqual("".join(self.said()[1:]).replace(" ", ""), "Yes,wedosellshoes,andboots.Anythingelse?")
        self.assertEqual(engine.history[-1], {"role": "assistant", "content": "Yes, we do sell shoes, and boots. Anything else?"})
        history = [(e.speaker, e.text) for e in self.of(ce.HistoryAdded)]
        self.assertEqual(history[0], ("assistant", "Welcome to the shop."))
        self.assertIn(("user", "Do you sell shoes?"), history)
        keys = [e.key for e in self.of(ce.MetricsMeasured)]
        self.assertIn("llm_call_start", keys)
        self.assertIn("llm_response", keys)

    def test_no_greeting_asks_the_model_at_once(self) -> None:
        c, engine, _ = self.start(LLM_PLAYBOOK.replace("greeting: Welcome to the shop.\n", ""))
        self.assertEqual(len(self.chat.requests), 1)
        self.assertEqual([m["role"] for m in self.chat.last.messages], ["system"])

    def test_tags_split_across_chunks_are_actions_never_spoken(self) -> None:
        """<set_var> and <goto> split over chunks act, and are not spoken; the scene's prompt is re-rendered."""
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.hear(c, "I have a billing question.")
        self.chat.last.reply("Sure. <set_v", 'ar key="outcome" value="bill', 'ing"/><goto sc', 'ene="billing"/>One moment.')
        self.advance(2)
        spoken = " ".join(self.said())
        self.assertNotIn("<", spoken)
        self.assertIn("One moment.", spoken)
        self.assertEqual(engine.variables["outcome"], "billing")
        self.assertEqual(engine.scene_id, "billing")
        self.assertIn("You handle billing for sip:alice@x.", engine.history[0]["content"])

    def test_hangup_tag_ends_the_call_after_the_speech_with_rendered_headers(self) -> None:
        c, engine, leg = self.start(LLM_PLAYBOOK)
        self.hear(c, "Bye.")
        self.chat.last.send('<set_var key="outcome" value="done"/>Goodbye now.<hangup/>')
        self.assertTrue(self.chat.last.cancelled, "the reply ends at <hangup/>")
        self.assertFalse(c.ended)
        self.advance(2)
        self.assertTrue(c.ended)
        self.assertEqual(c.hangup_reason, "bySystem")
        self.assertEqual(leg.closed_with, {"X-Result": "done"})
        self.assertIn("Goodbye now.", self.said())
        self.assertEqual(self.posthooks, [engine])

    def test_http_tag_result_goes_to_history(self) -> None:
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.hear(c, "Check my order.")
        self.chat.last.reply('Checking. <http url="http://crm.local/o/1" method="post" body="x"/>')
        self.assertEqual(self.http_calls, [("http://crm.local/o/1", "POST", b"x", False)])
        self.assertEqual(engine.history[-1]["role"], "system")
        self.assertIn("crm.local", engine.history[-1]["content"])

    def test_model_failure_speaks_the_apology_and_the_call_goes_on(self) -> None:
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.advance(1)
        self.hear(c, "Hello?")
        self.chat.last.d.errback(LlmError("llm: no first token within 8 s", retryable=True))
        errors = [e for e in self.of(ce.ErrorOccurred) if e.sender == "llm"]
        self.assertEqual(len(errors), 1)
        self.assertIn("no first token", errors[0].message)
        self.advance(3)
        self.assertIn("Sorry, I am having trouble answering right now.", self.said())
        self.assertFalse(c.ended)
        self.hear(c, "Are you there?")
        self.chat.last.reply("Yes.")
        self.advance(1)
        self.assertEqual(self.said()[-1], "Yes.")

    def test_failures_end_the_call_when_configured(self) -> None:
        c, engine, _ = self.start(LLM_PLAYBOOK.replace("  model: test-model\n",
                                                       "  model: test-model\n  onError: hangup\n  apology: ''\n"))
        self.hear(c, "Hello?")
        self.chat.last.d.errback(LlmError("llm: HTTP 500"))
        self.assertTrue(c.ended)

    def test_a_failure_after_partial_speech_hangs_up_once_it_is_said(self) -> None:
        """onError: hangup with a stream cut mid-reply: what arrived is spoken to its end, then the call ends."""
        c, engine, _ = self.start(LLM_PLAYBOOK.replace("  model: test-model\n",
                                                       "  model: test-model\n  onError: hangup\n"))
        self.hear(c, "Hi.")
        self.chat.last.send("Hello there. How")
        self.chat.last.d.errback(LlmError("llm: the stream ended early"))
        self.assertFalse(c.ended, "the words already on their way are not cut")
        self.advance(5)
        self.assertIn("Hello there.", self.said())
        self.assertTrue(c.ended)
        self.assertNotIn("Sorry, I am having trouble answering right now.", self.said())

    def test_a_stream_cut_keeps_what_arrived(self) -> None:
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.hear(c, "Hi.")
        self.chat.last.send("Hello there. How")
        self.chat.last.d.errback(LlmError("llm: the stream ended early"))
        self.advance(2)
        self.assertIn("Hello there.", self.said())
        self.assertEqual(engine.history[-1]["content"], "Hello there. How")

    def test_barge_in_stops_the_reply(self) -> None:
        """The hearing cut the agent's speech: the model's stream is cancelled, its text stays in history."""
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.hear(c, "Tell me everything.")
        request = self.chat.last
        request.send("Well, there is a lot to say about this. ")
        self.advance(0.1)
        c.track.barge_in()
        self.assertTrue(request.cancelled)
        self.assertEqual(engine.history[-1]["role"], "assistant")
        before = len(self.synth.requests)
        self.advance(1)
        self.assertEqual(len(self.synth.requests), before)

    def test_follow_up_on_silence_then_hangup_after_max(self) -> None:
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.advance(1)
        for expected in (1, 2):
            c.report(ce.InputTimedOut(c.now(), "sst", c.now(), 10000))
            self.assertEqual(len(self.chat.requests), expected)
            self.assertNotIn("user", [m["role"] for m in self.chat.last.messages], "no user message is added")
            self.chat.last.reply("Are you still there?")
            self.advance(1)
        c.report(ce.InputTimedOut(c.now(), "sst", c.now(), 10000))
        self.assertTrue(c.ended)
        self.assertEqual(c.hangup_reason, "Max follow-up reached")

    def test_dtmf_goto_switches_scene_and_asks_the_model(self) -> None:
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.advance(1)
        self.key(c, "1")
        self.assertEqual(engine.scene_id, "billing")
        self.assertIn("You handle billing", self.chat.last.messages[0]["content"])
        self.key(c, "0")
        self.assertTrue(c.ended)
        self.assertEqual(c.hangup_reason, "DTMF Hangup")

    def test_collector_with_validation_and_retries(self) -> None:
        """<collect> speaks its prompt, takes keys only; a bad entry is retried with the error message;
        the result is a system note and the model is asked again."""
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.hear(c, "My account?")
        self.chat.last.reply('<collect type="account" var="acct" prompt="Type your account number."/>')
        self.advance(1)
        self.assertIn("Type your account number.", self.said())
        self.hear(c, "one two three four")  # speech is ignored while collecting
        self.assertEqual(len(self.chat.requests), 1)
        self.key(c, "1")
        self.key(c, "2")
        self.key(c, "*")
        self.key(c, "4")  # *: fails the pattern -> retry
        self.advance(1)
        self.assertIn("Digits only please", self.said())
        for d in "1234":
            self.key(c, d)
        self.assertEqual(engine.variables["acct"], "1234")
        self.assertEqual(len(self.chat.requests), 2)
        self.assertIn("acct = 1234", self.chat.last.messages[-1]["content"])

    def test_collector_times_out_on_its_own_timer(self) -> None:
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.hear(c, "Account.")
        self.chat.last.reply('<collect type="account" var="acct"/>')
        self.clock.advance(15.5)
        self.assertEqual(len(self.chat.requests), 2)
        self.assertIn("nothing was entered", self.chat.last.messages[-1]["content"])

    def test_tools_mode_turns_tool_calls_into_actions(self) -> None:
        text = LLM_PLAYBOOK.replace("  model: test-model\n", "  model: test-model\n  toolMode: tools\n")
        c, engine, leg = self.start(text)
        self.hear(c, "Goodbye.")
        request = self.chat.last
        self.assertEqual({t["function"]["name"] for t in request.kwargs["tools"]} >= {"hangup", "transfer"}, True)
        request.send("Bye!")
        request.finish((ToolCall("call_1", "set_var", '{"key": "outcome", "value": "tools"}'),
                        ToolCall("call_2", "hangup", "{}")))
        self.advance(2)
        self.assertTrue(c.ended)
        self.assertEqual(leg.closed_with, {"X-Result": "tools"})

    def test_json_mode_reply_speaks_text_and_runs_tools(self) -> None:
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.hear(c, "Look it up.")
        self.chat.last.reply('{"text": "Let me check.", "tools": [{"name": "http", "url": "http://crm.local/x"}]}')
        self.assertEqual(self.http_calls[0][0], "http://crm.local/x")
        # The http result goes back to the model, which is asked again.
        self.assertEqual(len(self.chat.requests), 2)
        self.chat.last.reply('{"text": "Your order shipped."}')
        self.advance(2)
        self.assertEqual(self.said()[1:], ["Let me check.", "Your order shipped."])
        self.assertEqual(engine.history[-1]["content"], "Your order shipped.")

    def test_unparseable_json_is_spoken(self) -> None:
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.hear(c, "?")
        self.chat.last.reply('{"text": broken')
        self.advance(2)
        self.assertIn('{"text": broken', self.said())

    def test_hangup_stops_everything_and_runs_the_posthook(self) -> None:
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.hear(c, "Hi.")
        request = self.chat.last
        c.hangup("byCaller", "caller")
        self.assertTrue(request.cancelled)
        self.assertEqual(self.posthooks, [engine])
        self.assertEqual([d for d in self.clock.getDelayedCalls() if d.active()], [])


class IvrTests(_Case):
    def test_greeting_then_scene_prompt_then_key_choice(self) -> None:
        c, engine, _ = self.start(IVR_PLAYBOOK)
        self.advance(3)
        self.assertEqual(self.said(), ["Hello.", "Press 1 or say sales for sales.", "Press 2 for support."])
        self.key(c, "1")
        self.advance(3)
        self.assertIn("Sales here.", self.said())
        self.assertTrue(c.ended)

    def test_spoken_keyword_chooses(self) -> None:
        c, engine, _ = self.start(IVR_PLAYBOOK)
        self.advance(3)
        self.hear(c, "I'd like to buy something please")
        self.assertEqual(engine.scene_id, "sales")

    def test_no_match_takes_the_nomatch_action(self) -> None:
        c, engine, _ = self.start(IVR_PLAYBOOK)
        self.advance(3)
        self.hear(c, "bananas")
        self.assertEqual(engine.scene_id, "sorry")

    def test_silence_repeats_then_ends_with_no_input(self) -> None:
        c, engine, _ = self.start(IVR_PLAYBOOK)
        self.advance(3)
        n = len(self.said())
        c.report(ce.InputTimedOut(c.now(), "sst", c.now(), 10000))
        self.advance(3)
        self.assertEqual(len(self.said()), n + 2, "the prompt again")
        c.report(ce.InputTimedOut(c.now(), "sst", c.now(), 10000))
        self.assertTrue(c.ended)
        self.assertEqual(c.hangup_reason, "No input")

    def test_collector_in_ivr_goes_to_the_collected_scene(self) -> None:
        c, engine, _ = self.start(IVR_COLLECTORS)
        self.advance(3)
        self.key(c, "2")
        self.advance(3)
        for d in "123":
            self.key(c, d)
        self.advance(3)
        self.assertIn("Thank you, account 123.", self.said())


HYBRID_PLAYBOOK = IVR_PLAYBOOK.replace("greeting: Hello.\n", """greeting: Hello.
llm:
  provider: openai
  optional: true
  prompt: You are the front desk of {{ caller }}'s favourite shop.
""")


class HybridTests(_Case):
    """``llm.optional`` with a model configured: keys and keywords choose as in the IVR; other speech goes to the model."""

    def start_hybrid(self) -> tuple[CallController, PlaybookEngine, FakeLeg]:
        return self.start(HYBRID_PLAYBOOK, environ={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})

    def test_unmatched_speech_goes_to_the_model(self) -> None:
        c, engine, _ = self.start_hybrid()
        self.assertTrue(engine.hybrid)
        self.advance(3)
        self.assertEqual(self.said(), ["Hello.", "Press 1 or say sales for sales.", "Press 2 for support."])
        self.assertEqual(self.chat.requests, [])
        self.hear(c, "What are your opening hours?")
        self.assertEqual(engine.scene_id, "menu", "no nomatch action in hybrid mode")
        self.assertIn("front desk of sip:alice@x's favourite shop", self.chat.last.messages[0]["content"])
        self.assertEqual(self.chat.last.messages[-1], {"role": "user", "content": "What are your opening hours?"})
        self.hear(c, "sales")
        self.assertEqual(engine.scene_id, "sales")

    def test_without_a_model_configured_it_is_an_ivr(self) -> None:
        playbook = parse_playbook(HYBRID_PLAYBOOK, {}, "t.md")
        self.assertTrue(playbook.ivr)


def _default_playbook() -> str:
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "playbook", "default.md")
    with open(path, encoding="utf-8") as f:
        return f.read().replace("provider: piper", "provider: fake")


class DefaultPlaybookTests(_Case):
    """The shipped etc/playbook/default.md, the README's embedded default: an offline IVR."""

    MENU = "press 1 or say about."

    def test_keyword_about_then_back_to_the_menu(self) -> None:
        c, engine, _ = self.start(_default_playbook())
        self.assertTrue(engine.ivr)
        self.advance(5)
        self.assertEqual(self.said()[0], "Hello, you are speaking with the activecall demo.")
        self.assertIn(self.MENU, self.said())
        self.hear(c, "Tell me about it.")
        self.advance(12)
        spoken = self.said()
        about = next(i for i, t in enumerate(spoken) if t.startswith("This line is answered by activecall"))
        self.assertIn(self.MENU, spoken[about:], "<goto scene=menu/> speaks the menu again after the text")
        self.assertEqual(engine.scene_id, "menu")

    def test_key_two_collects_a_number_with_a_retry(self) -> None:
        c, engine, leg = self.start(_default_playbook())
        self.advance(5)
        self.key(c, "2")
        self.advance(5)
        self.assertIn("Please type your phone number on the keypad, then press the hash key.", " ".join(self.said()))
        for d in "12#":  # too short: retried with the error message
            self.key(c, d)
        self.advance(6)
        self.assertTrue(any(t.startswith("That did not look like a phone number.") for t in self.said()))
        for d in "5551234#":
            self.key(c, d)
        self.advance(8)
        self.assertIn("We will call you back at 5551234.", " ".join(self.said()))
        self.assertTrue(c.ended)

    def test_goodbye_and_nothing_understood(self) -> None:
        c, engine, _ = self.start(_default_playbook())
        self.advance(5)
        self.hear(c, "bananas")
        self.advance(1)
        self.assertIn("Sorry, I did not catch that.", self.said())
        self.hear(c, "Goodbye!")
        self.advance(3)
        self.assertTrue(c.ended)
        self.assertEqual(self.said()[-1], "Goodbye.")


class HangupUtteranceTests(_Case):
    def test_speech_during_the_goodbye_does_not_cut_it(self) -> None:
        """After <hangup/>, caller speech starts no new turn: the goodbye plays out and the call ends (§7.1)."""
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.hear(c, "Bye.")
        self.chat.last.send("Goodbye, have a nice day. <hangup/>")
        self.advance(0.1)
        self.hear(c, "bye bye")
        self.key(c, "1")
        self.assertEqual(len(self.chat.requests), 1)
        self.advance(3)
        self.assertTrue(c.ended)
        self.assertEqual(c.hangup_reason, "bySystem")

    def test_collect_prompt_follows_the_text_before_it(self) -> None:
        """Text before <collect prompt=...> in the same reply is said, then the prompt, in one stream."""
        c, engine, _ = self.start(LLM_PLAYBOOK)
        self.hear(c, "My account.")
        request = self.chat.last
        request.reply('Sure, I can look that up. <collect type="account" var="acct" prompt="Type your account number."/>')
        self.assertFalse(request.cancelled)
        self.advance(3)
        spoken = " ".join(self.said())
        self.assertIn("Sure, I can look that up.", spoken)
        self.assertIn("Type your account number.", spoken)
        self.assertLess(spoken.index("Sure"), spoken.index("Type your"))
        self.assertEqual([e.play_id for e in self.of(ce.PlayInterrupted)], [f"{SID}-1"], "only the greeting was cut")


class UnexpandedVariableTests(SynchronousTestCase):
    def test_an_unset_variable_in_llm_keys_counts_as_unset(self) -> None:
        text = "---\nllm:\n  provider: openai\n  optional: true\n  baseUrl: ${ACTIVECALL_LLM_URL}\n---\nHi.\n"
        self.assertTrue(parse_playbook(text, {}, "t.md").ivr)
        with_env = parse_playbook(text, {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, "t.md")
        self.assertEqual(with_env.llm["baseUrl"], "http://127.0.0.1:9/v1")


REALTIME_PLAYBOOK = """---
llm:
  provider: openai
  model: test-model
realtime:
  provider: ws://127.0.0.1:9/rt
---
# Scene: main
You answer calls.

# Scene: billing
Billing.
"""


class RealtimeToolTests(_Case):
    """§8.4: the engine carries out a realtime model's hangup_call, transfer_call/refer_call and goto_scene."""

    def called(self, c: CallController, name: str, arguments: str) -> None:
        c.report(ce.FunctionCalled(c.now(), SID, "call_1", name, arguments))

    def test_goto_then_transfer_then_hangup(self) -> None:
        c, engine, _ = self.start(REALTIME_PLAYBOOK)
        self.advance(1)
        self.called(c, "goto_scene", '{"scene": "billing"}')
        self.assertEqual(engine.scene_id, "billing")
        self.called(c, "goto_scene", '{"scene": "nowhere"}')
        self.called(c, "lookup_order", '{"id": 5}')  # not the engine's: nothing happens
        self.called(c, "transfer_call", "not json")
        self.assertEqual(len(self.dialer.attempts), 1)
        self.called(c, "refer_call", '{"callee_uri": "sip:human@example.com"}')
        self.assertEqual(self.dialer.attempts[-1][0].callee, "sip:human@example.com")
        self.assertEqual(engine.scene_id, "billing")
        self.called(c, "hangup_call", '{"reason": "customer is done"}')
        self.assertTrue(c.ended)
        ended = self.of(ce.CallEnded)[-1]
        self.assertEqual((ended.reason, ended.initiator), ("customer is done", "ai"))
