"""The conversation engine: one playbook driving one call (playbook.md §8).

:class:`PlaybookEngine` watches the call's domain events (it is the controller's agent,
beside the control session) and drives the call through the controller's typed
operations.  With an ``llm`` block it runs the loop of §8: greeting, listen, stream the
model's reply as clause-chunked TTS while its action tags (or tool calls, or JSON tools)
are taken out and executed.  Without one it is the voice-and-keypad IVR of §8.5: scene
prompts are spoken, keys and spoken keywords choose, collectors collect.

Events are handled one at a time: an operation that reports an event while the engine
handles another (``say`` reports ``trackStart`` at once) queues it.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.agent.llm import ChatResult, LlmError
from activecall.call import events as ce
from activecall.call.record import OtherHangupReason, RecordedHangupReason
from activecall.options import ReferOption
from activecall.playbook import actions as act
from activecall.playbook.dtmf import Collected, DigitCollector, Failed, NothingEntered, Retry, collector_route, keypad_action
from activecall.playbook.functions import FUNCTIONS, REPLY_SCHEMA, action_from_call
from activecall.playbook.model import DtmfAction, FollowUp, Playbook, Scene
from activecall.playbook.prompt import PromptTexts, system_prompt
from activecall.playbook.templates import TemplateRenderError, render, render_scene_prompt
from activecall.playbook.words import match_words

__all__ = ["ChatClient", "EngineServices", "PlaybookEngine", "TurnPolicy"]

WAIT_INPUT_MS = 10000
#: §7.2: at most this many model responses per caller turn (tool results re-ask).
MAX_RESPONSES_PER_TURN = 3
#: The history kept for the model (beyond it, oldest user/assistant turns are dropped).
MAX_HISTORY_MESSAGES = 200
MAX_MESSAGE_CHARS = 8000
DEFAULT_APOLOGY = "Sorry, I am having trouble answering right now."
_REPAIR_MAX_CHARS = 15
_SUMMARY_KEEP = 6
_SUMMARY_SLACK = 6


class ChatClient(Protocol):
    """Streams one chat completion (:class:`activecall.agent.llm.OpenAIChat`)."""

    def stream(self, messages: Sequence[Mapping[str, Any]], *, model: str, temperature: Optional[float] = None,
               max_tokens: Optional[int] = None, tools: Optional[Sequence[Mapping[str, Any]]] = None,
               response_format: Optional[Mapping[str, Any]] = None,
               on_delta: Callable[[str], None] = ..., first_token_timeout_s: float = 10.0,
               total_timeout_s: float = 60.0) -> Deferred[ChatResult]: ...


class CallDriver(Protocol):
    """What the engine uses of its call (:class:`activecall.call.controller.CallController`)."""

    sid: str
    sst: str
    call_type: str
    ended: bool
    answered_at: Optional[float]
    bye_headers: Optional[dict[str, str]]

    def now(self) -> float: ...

    def say(self, text: str, *, play_id: Optional[str] = None, streaming: bool = False, end_of_stream: bool = False,
            auto_hangup: bool = False, wait_input_timeout_ms: Optional[int] = None) -> None: ...

    def play(self, url: str, play_id: Optional[str] = None, auto_hangup: bool = False,
             wait_input_timeout_ms: Optional[int] = None) -> None: ...

    def interrupt(self, graceful: bool = False) -> None: ...

    def hangup(self, reason: str, initiator: str, headers: Optional[Mapping[str, str]] = None,
               recorded_reason: Optional[RecordedHangupReason] = None) -> None: ...

    def transfer(self, callee: str, caller: Optional[str] = None, options: Optional[ReferOption] = None) -> Deferred[None]: ...

    def send_message(self, body: str, content_type: str, headers: Optional[Mapping[str, str]] = None,
                     refer: bool = False) -> None: ...

    def add_history(self, speaker: str, text: str) -> None: ...

    def error(self, message: str, sender: str = "command", track: Optional[str] = None, code: Optional[int] = None) -> None: ...

    def report(self, event: Any) -> None: ...

    def agent_uri(self) -> Optional[str]: ...

    def playing_id(self) -> Optional[str]: ...


@dataclass(frozen=True)
class TurnPolicy:
    """Per-turn model limits and what the caller hears when the model fails (activecall ``llm`` keys)."""

    first_token_timeout_s: float = 8.0
    total_timeout_s: float = 30.0
    apology: str = DEFAULT_APOLOGY  # "" = silence
    hangup_on_error: bool = False
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    tool_mode: str = "tags"

    @classmethod
    def from_llm(cls, llm: Mapping[str, Any]) -> "TurnPolicy":
        """Read ``timeoutMs``, ``totalTimeoutMs``, ``apology``, ``onError``, ``temperature``,
        ``maxTokens``, ``toolMode`` (validated at load)."""
        policy = cls()
        changes: dict[str, Any] = {}
        if isinstance(llm.get("timeoutMs"), int):
            changes["first_token_timeout_s"] = max(0.1, llm["timeoutMs"] / 1000.0)
        if isinstance(llm.get("totalTimeoutMs"), int):
            changes["total_timeout_s"] = max(0.1, llm["totalTimeoutMs"] / 1000.0)
        if isinstance(llm.get("apology"), str):
            changes["apology"] = llm["apology"]
        if llm.get("onError") == "hangup":
            changes["hangup_on_error"] = True
        temperature = llm.get("temperature")
        if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
            changes["temperature"] = float(temperature)
        if isinstance(llm.get("maxTokens"), int):
            changes["max_tokens"] = llm["maxTokens"]
        if llm.get("toolMode") in ("tags", "tools", "json"):
            changes["tool_mode"] = llm["toolMode"]
        return dataclasses.replace(policy, **changes) if changes else policy


@dataclass
class EngineServices:
    """What one engine is given by :class:`activecall.playbook.runner.PlaybookRunner`."""

    clock: IReactorTime
    chat: Optional[ChatClient] = None
    model: str = "gpt-4-turbo"
    prompt_texts: PromptTexts = field(default_factory=lambda: PromptTexts((), "", ()))
    # <http/> and the http tool: call_http(url, method, body, headers) -> Deferred[(note for tag, note for tool)].
    call_http: Optional[Callable[[str, str, Optional[bytes], Mapping[str, str], bool], Deferred[str]]] = None
    # After the call: posthook(engine) (runs in the background, never fails).
    after_call: Optional[Callable[["PlaybookEngine"], None]] = None


class _Reply:
    """One model response being streamed: its play id, parser and what it did so far."""

    def __init__(self, play_id: str, json_mode_allowed: bool) -> None:
        self.play_id = play_id
        self.parser = act.ReplyParser(raw_text=True)
        self.text: list[str] = []
        self.mode: Optional[str] = None if json_mode_allowed else "text"  # decided by the first non-blank char
        self.lead = ""
        self.spoken = False  # text went to TTS on this play id
        self.queued = False  # text was handed out (it may wait behind a file play)
        self.unflushed = False  # text since the last sentence cut
        self.hangup: Optional[act.Hangup] = None
        self.stopped = False  # cancelled: what it still holds is dropped
        self.started_at = 0.0
        self.first_at: Optional[float] = None
        self.request: Optional[Deferred[ChatResult]] = None
        self.notes: list[str] = []
        self.remembered = False
        self.scene_text = False  # an IVR scene's own text, not a model reply
        self.enter_after: Optional[str] = None  # <goto> in scene text: enter that scene once this is said  # tool results that arrived while it streamed: after it in history


class PlaybookEngine:
    """One playbook on one call; built by the runner, fed every domain event of the call."""

    _log = Logger()

    def __init__(self, call: CallDriver, playbook: Playbook, services: EngineServices,
                 variables: Mapping[str, Any]) -> None:
        self.call = call
        self.playbook = playbook
        self.services = services
        self.variables: dict[str, Any] = dict(variables)
        self.policy = TurnPolicy.from_llm(playbook.llm or {})
        self.history: list[dict[str, Any]] = []
        self.scene_id = playbook.initial_scene
        self._scene_prompt = self.scene.prompt if self.scene is not None else playbook.prompt
        self._started = False
        self._finished = False
        self._queue: deque[Any] = deque()
        self._handling = False
        self._turns = 0
        self._reply: Optional[_Reply] = None
        self._agent_play: Optional[str] = None  # play id of what the agent track plays now
        self._blocking_play: Optional[str] = None  # a file or greeting: later speech waits behind it
        self._after_block: deque[Callable[[], None]] = deque()
        self._follow_ups = 0
        self._last_interaction = 0.0
        self._last_assistant_at: Optional[float] = None
        self._collector: Optional[DigitCollector] = None
        self._collector_timer: Optional[IDelayedCall] = None
        self._errors_in_row = 0
        # A goodbye with auto-hangup is playing: nothing the caller does now starts another turn (§7.1).
        self._hanging_up = False
        self._summarizing: Optional[Deferred[Any]] = None
        if playbook.llm is not None:
            self.history.append({"role": "system", "content": self._system_prompt()})

    # -- state ---------------------------------------------------------------

    @property
    def scene(self) -> Optional[Scene]:
        """The current scene (None for a playbook without a body)."""
        return self.playbook.scenes.get(self.scene_id) if self.scene_id is not None else None

    @property
    def ivr(self) -> bool:
        """No model: the voice-and-keypad IVR of §8.5."""
        return self.playbook.llm is None

    @property
    def hybrid(self) -> bool:
        """``llm.optional`` with a model configured: an IVR whose unmatched speech goes to the model."""
        return self.playbook.llm is not None and bool(self.playbook.llm.get("optional"))

    @property
    def speaks_scenes(self) -> bool:
        """Scene texts are what the agent says (IVR and hybrid), not the model's prompt."""
        return self.playbook.llm is None or self.hybrid

    @property
    def agent_speaking(self) -> bool:
        return self._agent_play is not None

    def _now(self) -> float:
        return self.call.now()

    def _system_prompt(self) -> str:
        prompt = self._scene_prompt
        if self.hybrid:
            prompt = self._render(str((self.playbook.llm or {}).get("prompt") or ""))
        return system_prompt(prompt, self.services.prompt_texts, self.playbook.collectors)

    def _render(self, text: str) -> str:
        if "{{" not in text and "{%" not in text:
            return text
        try:
            return render(text, self.variables)
        except TemplateRenderError as e:
            self._log.info("call {sid}: template not rendered: {e}", sid=self.call.sid, e=e)
            return text

    # -- events ---------------------------------------------------------------

    def call_event(self, event: Any) -> None:
        """A domain event of the call (the controller's agent hook)."""
        if self._finished:
            return
        self._queue.append(event)
        if self._handling:
            return
        self._handling = True
        try:
            while self._queue and not self._finished:
                try:
                    self._handle(self._queue.popleft())
                except Exception:
                    self._log.failure("playbook engine of {sid} failed on an event", sid=self.call.sid)
        finally:
            self._handling = False

    def _handle(self, event: Any) -> None:
        call = self.call
        if isinstance(event, ce.CallEnded):
            if not getattr(event, "refer", False):
                self._end()
            return
        if isinstance(event, ce.CallAnswered) and not event.refer:
            if not self._waits_for_media():
                self._start()
            return
        if isinstance(event, ce.MediaArrived):
            self._start()
            return
        if not self._started:
            return
        if isinstance(event, ce.TrackStarted) and event.track == call.sst:
            self._agent_play = event.play_id if event.play_id is not None else ""
            return
        if isinstance(event, ce.TrackEnded) and event.track == call.sst:
            self._track_ended(event)
            return
        if isinstance(event, ce.PlayInterrupted):
            self._interrupted(event)
            return
        if getattr(event, "refer", None):
            return  # the transfer leg's own speech and keys are not the agent's business
        if isinstance(event, ce.FunctionCalled):
            self._realtime_tool(event)
            return
        name = _EVENT_NAMES.get(type(event))
        if name is None or self._hanging_up:
            return
        if self._collector is not None and self._collector.collecting:
            route = collector_route(name, self._collector.spec.interruptible)
            if route == "ignore":
                return
            if route == "collect":
                if isinstance(event, ce.DtmfReceived):
                    self._collector_outcomes(self._collector.digit(event.digit, self._now()))
                else:
                    self._collector_outcomes(self._collector.expire(self._now()))
                return
        if isinstance(event, ce.TranscriptHeard):
            if event.final:
                self._final_transcript(event.text)
        elif isinstance(event, ce.DtmfReceived):
            self._digit(event.digit)
        elif isinstance(event, (ce.SilenceLasted, ce.InputTimedOut)):
            self._silence()
        elif isinstance(event, ce.TurnEnded):
            if event.completed and not self.agent_speaking and not self.ivr:
                self._generate()

    def _waits_for_media(self) -> bool:
        waits = getattr(self.call, "waits_for_media", None)
        return bool(waits() if callable(waits) else waits)

    # -- start and end -----------------------------------------------------------

    def _start(self) -> None:
        """§8.1 step 2: entry audio, then the greeting; no greeting → the model (or the IVR prompt)."""
        if self._started or self.call.ended:
            return
        self._started = True
        self._last_interaction = self._now()
        greeting = self.playbook.greeting
        scene = self.scene
        if scene is not None and scene.play:
            self._play_file(self._render(scene.play))
        if greeting:
            text = self._render(greeting)
            self._after_speech(lambda: self._say_once(text, blocking=self.speaks_scenes))
            self.call.add_history("assistant", text)
            if self.speaks_scenes:
                self._after_speech(self._speak_scene)
            return
        if self.speaks_scenes:
            self._after_speech(self._speak_scene)
        else:
            self._after_speech(self._generate)

    def _end(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._stop_reply()
        self._stop_collector()
        if self._summarizing is not None:
            self._summarizing.cancel()
        if self._started and self.call.answered_at is not None and self.services.after_call is not None:
            self.services.after_call(self)

    # -- agent output ----------------------------------------------------------

    def _new_play_id(self) -> str:
        self._turns += 1
        return f"{self.call.sid}-{self._turns}"

    def _after_speech(self, f: Callable[[], None]) -> None:
        """Run ``f`` now, or once the blocking play ends (speech never cuts a <play> or an IVR greeting)."""
        if self._blocking_play is not None:
            self._after_block.append(f)
        else:
            f()

    def _block_on(self, play_id: str) -> None:
        """Later speech waits for ``play_id`` to end, if it did start (a failed say starts nothing)."""
        if self.call.playing_id() == play_id:
            self._blocking_play = play_id

    def _say_once(self, text: str, *, auto_hangup: bool = False, wait_input_ms: int = WAIT_INPUT_MS,
                  blocking: bool = False) -> None:
        if self.call.ended:
            return
        if not text.strip():
            if auto_hangup:
                self._hangup_now("bySystem", "system")
            return
        play_id = self._new_play_id()
        self._metric("tts_play_id_map", {"playId": play_id, "text": text})
        self._hanging_up = self._hanging_up or auto_hangup
        self.call.say(text, play_id=play_id, end_of_stream=True, auto_hangup=auto_hangup,
                      wait_input_timeout_ms=wait_input_ms)
        if blocking:
            self._block_on(play_id)

    def _play_file(self, path: str) -> None:
        play_id = f"play-{self._new_play_id()}"
        try:
            self.call.play(path, play_id)
        except Exception as e:  # NotAllowedError: no leg any more
            self.call.error(f"play {path}: {e}", sender="playbook")
            return
        self._block_on(play_id)

    def _track_ended(self, event: ce.TrackEnded) -> None:
        if event.play_id != self._agent_play and self._agent_play is not None and event.play_id is not None:
            return  # an older play, already replaced
        self._agent_play = None
        self._last_interaction = self._now()
        if self._blocking_play is not None and event.play_id == self._blocking_play:
            self._blocking_play = None
            while self._after_block and self._blocking_play is None and not self.call.ended:
                self._after_block.popleft()()

    def _interrupted(self, event: ce.PlayInterrupted) -> None:
        """Barge-in cut the reply: stop the model; what it said stays in history (§9 step 6)."""
        reply = self._reply
        if reply is not None and event.play_id == reply.play_id:
            self._stop_reply(keep_text=True)

    def _metric(self, key: str, data: dict[str, Any], duration_ms: int = 0) -> None:
        self.call.report(ce.MetricsMeasured(self._now(), key, duration_ms, data))

    # -- caller input ------------------------------------------------------------

    def _final_transcript(self, text: str) -> None:
        """§8.1 step 5 (LLM) or §8.5 (IVR): keywords act as keys first."""
        text = text.strip()
        if not text:
            return
        self._follow_ups = 0
        self._last_interaction = self._now()
        scene = self.scene
        words = getattr(scene, "words", None) if scene is not None else None
        digit = match_words(text, words) if words else None
        if digit is not None and self._keypad(digit, heard=text):
            return
        if self.ivr:
            action = scene.dtmf.get("nomatch") if scene is not None else None
            if action is not None:
                self._take_action(action, "nomatch")
            else:
                self._speak_scene()
            return
        self._add_user(text)
        self._generate()

    def _add_user(self, text: str) -> None:
        text = text[:MAX_MESSAGE_CHARS]
        self.call.add_history("user", text)
        last = self.history[-1] if self.history else None
        if ("context_repair" in self._features and last is not None and last["role"] == "assistant"
                and len(str(last.get("content") or "")) < _REPAIR_MAX_CHARS and self._last_assistant_at is not None
                and (self._now() - self._last_assistant_at) * 1000 < self._repair_window_ms
                and len(self.history) >= 3 and self.history[-2]["role"] == "user"):
            self.history.pop()
            self.history[-1]["content"] = f"{self.history[-1]['content']}，{text}"
            return
        self.history.append({"role": "user", "content": text})
        self._trim_history()

    @property
    def _features(self) -> tuple[str, ...]:
        llm = self.playbook.llm or {}
        features = llm.get("features") or ()
        return tuple(f for f in features if isinstance(f, str))

    @property
    def _repair_window_ms(self) -> int:
        value = (self.playbook.llm or {}).get("repairWindowMs")
        return value if isinstance(value, int) else 3000

    def _trim_history(self) -> None:
        while len(self.history) > MAX_HISTORY_MESSAGES:
            del self.history[1]

    def _digit(self, digit: str) -> None:
        self._follow_ups = 0
        self._last_interaction = self._now()
        self._keypad(digit)

    def _keypad(self, digit: str, heard: Optional[str] = None) -> bool:
        """§11.1: the scene's key, then the global map; unmapped keys are ignored."""
        scene = self.scene
        action = keypad_action(digit, scene.dtmf if scene is not None else None, self.playbook.dtmf)
        if action is None:
            return False
        self._take_action(action, digit if heard is None else f"{digit} ({heard!r})")
        return True

    def _take_action(self, action: DtmfAction, why: str) -> None:
        self._log.debug("call {sid}: key {why}: {action}", sid=self.call.sid, why=why, action=action.action)
        if action.action == "goto" and action.scene:
            self._stop_reply()
            self.call.interrupt()
            self._after_block.clear()
            self._blocking_play = None
            self._enter_scene(action.scene)
        elif action.action == "transfer" and action.target:
            self._transfer(self._render(action.target))
        elif action.action == "hangup":
            self._stop_reply()
            self._hangup_now("DTMF Hangup", "ai", OtherHangupReason("DTMF Hangup"))

    def _silence(self) -> None:
        """§10 (LLM) and §8.5 (IVR): re-prompt on silence, at most ``max`` times in a row."""
        if self.agent_speaking or self._reply is not None:
            return
        policy = self._follow_up_policy()
        if policy is None:
            if self.speaks_scenes:
                policy = FollowUp(timeout=0, max_count=2)
            else:
                return
        if (self._now() - self._last_interaction) * 1000 < policy.timeout:
            return
        if self._follow_ups >= policy.max_count:
            scene = self.scene
            timeout_action = scene.dtmf.get("timeout") if scene is not None else None
            if timeout_action is not None:
                self._follow_ups = 0
                self._take_action(timeout_action, "timeout")
            elif self.speaks_scenes:
                self._hangup_now("No input", "system")
            else:
                self._hangup_now("Max follow-up reached", "system")
            return
        self._follow_ups += 1
        self._last_interaction = self._now()
        if self.speaks_scenes:
            self._speak_scene()
        else:
            self._generate()

    def _follow_up_policy(self) -> Optional[FollowUp]:
        scene = self.scene
        if scene is not None and scene.followup is not None:
            return scene.followup
        return self.playbook.follow_up

    # -- scenes ----------------------------------------------------------------

    def _switch_scene(self, scene_id: str) -> bool:
        scene = self.playbook.scenes.get(scene_id)
        if scene is None:
            self._log.warn("call {sid}: no scene {scene!r}", sid=self.call.sid, scene=scene_id)
            return False
        self.scene_id = scene_id
        self._follow_ups = 0
        rendered = render_scene_prompt(scene, self.variables)
        if rendered is not None:
            self._scene_prompt = rendered  # else the previous rendering stays (§3.3)
        if self.history and self.history[0]["role"] == "system":
            self.history[0] = {"role": "system", "content": self._system_prompt()}
        return True

    def _enter_scene(self, scene_id: str) -> None:
        """Switch to ``scene_id``, play its entry audio, then speak it (IVR) or ask the model (§11.1 goto)."""
        if self.call.ended or not self._switch_scene(scene_id):
            return
        scene = self.scene
        if scene is not None and scene.play:
            self._play_file(self._render(scene.play))
        self._after_speech(self._speak_scene if self.speaks_scenes else self._generate)

    def _speak_scene(self) -> None:
        """IVR: the scene's text is what the agent says; its action tags run in order."""
        if self.call.ended:
            return
        self._scene_prompt = self._scene_prompt_for_ivr()
        play_id = self._new_play_id()
        reply = _Reply(play_id, json_mode_allowed=False)
        reply.scene_text = True
        self._reply = reply
        items = reply.parser.feed(self._scene_prompt) + reply.parser.flush()
        self._run_items(reply, items)
        self._finish_reply(reply)

    def _scene_prompt_for_ivr(self) -> str:
        scene = self.scene
        if scene is None:
            return self._render(self.playbook.prompt)
        return self._current_prompt(scene)

    def _current_prompt(self, scene: Scene) -> str:
        """The scene's prompt with the variables as they are now (values collected since the call began)."""
        rendered = render_scene_prompt(scene, self.variables)
        return rendered if rendered is not None else scene.prompt

    # -- the model -------------------------------------------------------------

    def _generate(self, responses: int = 0) -> None:
        """§8.1 step 6: stream one response; speech and actions leave as they complete."""
        chat = self.services.chat
        if self.call.ended or chat is None:
            return
        self._stop_reply()
        if self._maybe_summarize(lambda: self._generate(responses)):
            return
        play_id = self._new_play_id()
        mode = self.policy.tool_mode
        reply = _Reply(play_id, json_mode_allowed=mode != "tools")
        if mode == "json":
            reply.mode = "json"
        reply.started_at = self._now()
        self._reply = reply
        self._metric("llm_call_start", {"playId": play_id, "messages": len(self.history)})
        request = chat.stream(
            list(self.history), model=self.services.model, temperature=self.policy.temperature,
            max_tokens=self.policy.max_tokens, tools=FUNCTIONS if mode == "tools" else None,
            response_format=REPLY_SCHEMA if mode == "json" else None,
            on_delta=lambda text: self._delta(reply, text),
            first_token_timeout_s=self.policy.first_token_timeout_s, total_timeout_s=self.policy.total_timeout_s)
        reply.request = request
        request.addCallbacks(self._replied, self._reply_failed, callbackArgs=(reply, responses),
                             errbackArgs=(reply,)).addErrback(self._bug, "handling a model reply")

    def _bug(self, f: Failure, what: str) -> None:
        self._log.failure("playbook engine of {sid} failed {what}", f, sid=self.call.sid, what=what)

    def _delta(self, reply: _Reply, text: str) -> None:
        if reply.stopped or self._reply is not reply:
            return
        if reply.first_at is None:
            reply.first_at = self._now()
        reply.text.append(text)
        if reply.mode is None:
            reply.lead += text
            stripped = reply.lead.lstrip()
            if not stripped:
                return
            reply.mode = "json" if act.is_json_reply(stripped) else "text"
            text, reply.lead = reply.lead, ""
        if reply.mode == "json":
            return
        self._run_items(reply, reply.parser.feed(text))
        if reply.hangup is not None:
            # <hangup/> ends the reply: what was said is spoken, then the call ends (§7.1).
            self._stop_request(reply)
            self._run_items(reply, reply.parser.flush())
            self._remember_assistant("".join(reply.text), reply)
            self._finish_reply(reply)

    def _replied(self, result: ChatResult, reply: _Reply, responses: int) -> None:
        if reply.stopped or self._reply is not reply:
            return
        self._errors_in_row = 0
        duration_ms = int((self._now() - reply.started_at) * 1000)
        ttfb_ms = int(((reply.first_at or self._now()) - reply.started_at) * 1000)
        full = "".join(reply.text)
        self._metric("llm_response", {"response": full, "is_json_mode": reply.mode == "json", "duration": duration_ms,
                                      "ttfb": ttfb_ms, "playId": reply.play_id}, duration_ms)
        if reply.mode == "json" or (reply.mode is None and act.is_json_reply(full)):
            self._json_reply(reply, full, responses)
            return
        if reply.mode is None:  # blank so far
            reply.mode = "text"
            self._run_items(reply, reply.parser.feed(reply.lead))
        self._run_items(reply, reply.parser.flush())
        self._remember_assistant(full, reply)
        calls = [c for c in result.tool_calls]
        if calls:
            self._tool_calls(reply, calls, responses)
            return
        self._finish_reply(reply)

    def _reply_failed(self, f: Failure, reply: _Reply) -> None:
        if f.check(CancelledError) or reply.stopped or self._reply is not reply:
            return
        reason = f.getErrorMessage() if f.check(LlmError) else f"{f.type.__name__}: {f.getErrorMessage()}"
        if not f.check(LlmError):
            self._log.failure("llm request of {sid} failed", f, sid=self.call.sid)
        self._errors_in_row += 1
        self.call.error(f"llm: {reason}", sender="llm")
        said = "".join(reply.text)
        give_up = self.policy.hangup_on_error or self._errors_in_row >= 3
        if reply.queued:
            # A stream error keeps what arrived (§8.1 step 6); giving up hangs up once it is said.
            self._run_items(reply, reply.parser.flush())
            self._remember_assistant(said, reply)
            if give_up and reply.hangup is None and not reply.stopped:
                reply.hangup = act.Hangup("llm failure", "system")
            self._finish_reply(reply)
            return
        self._reply = None
        reply.stopped = True
        apology = self.policy.apology
        if give_up:
            self._say_once(apology, auto_hangup=True) if apology else self._hangup_now("llm failure", "system")
        elif apology:
            self._say_once(apology)

    def _remember_assistant(self, text: str, reply: Optional[_Reply] = None) -> None:
        if text.strip():
            text = text[:MAX_MESSAGE_CHARS]
            self.history.append({"role": "assistant", "content": text})
            self._last_assistant_at = self._now()
            self.call.add_history("assistant", text)
        if reply is not None:
            reply.remembered = True
            notes, reply.notes = reply.notes, []
            self.history.extend({"role": "system", "content": note} for note in notes)
        self._trim_history()

    def _note(self, reply: _Reply, note: str) -> None:
        """A tool result: after the reply's own text in history (the model sees it next turn)."""
        if reply.remembered or reply.stopped:
            self.history.append({"role": "system", "content": note})
        else:
            reply.notes.append(note)

    def _run_items(self, reply: _Reply, items: Sequence[Any]) -> None:
        for item in items:
            if reply.stopped or self.call.ended:
                return
            if isinstance(item, str):
                self._speak_piece(reply, item)
            elif reply.hangup is None:
                self._action(reply, item)
            elif isinstance(item, act.SetVar):
                self._set_var(item.key, item.value)  # set_vars after <hangup/> still apply

    def _speak_piece(self, reply: _Reply, text: str) -> None:
        if not text.strip() and not reply.unflushed:
            return
        play_id = reply.play_id

        reply.queued = True

        def say() -> None:
            if reply.stopped:
                return
            if not reply.spoken:
                self._metric("tts_play_id_map", {"playId": play_id, "text": text})
            reply.spoken = True
            reply.unflushed = True
            self.call.say(text, play_id=play_id, streaming=True, wait_input_timeout_ms=WAIT_INPUT_MS)

        self._after_speech(say)

    def _cut_sentence(self, reply: _Reply) -> None:
        """Text before a tag is spoken as its own sentence (§7.1)."""
        if reply.unflushed or (reply.queued and not reply.spoken):
            reply.unflushed = False
            self._after_speech(lambda: None if reply.stopped else self.call.say("\n", play_id=reply.play_id, streaming=True))

    def _finish_reply(self, reply: _Reply) -> None:
        """End the reply's stream (the last chunk carries endOfStream); a <hangup/> rides on it."""
        if self._reply is reply:
            self._reply = None
        hangup = reply.hangup
        if self.call.ended:
            return
        if hangup is not None:
            self._store_hangup_headers()
            self._hanging_up = True
        if reply.queued:
            def close() -> None:
                if reply.stopped:
                    return
                self.call.say("", play_id=reply.play_id, streaming=True, end_of_stream=True,
                              auto_hangup=hangup is not None, wait_input_timeout_ms=WAIT_INPUT_MS)
                if reply.enter_after is not None:
                    self._block_on(reply.play_id)
            self._after_speech(close)
        elif hangup is not None:
            self._after_speech(lambda: self._hangup_now(hangup.reason or "bySystem", hangup.initiator or "system"))
        if reply.enter_after is not None and hangup is None:
            target = reply.enter_after
            self._after_speech(lambda: None if reply.stopped else self._enter_scene(target))

    def _stop_request(self, reply: _Reply) -> None:
        request, reply.request = reply.request, None
        if request is not None and not request.called:
            request.cancel()  # its CancelledError is ignored

    def _stop_reply(self, keep_text: bool = False) -> None:
        """Drop the reply in progress (a new turn, barge-in, hang-up)."""
        reply, self._reply = self._reply, None
        if reply is None:
            return
        self._stop_request(reply)
        reply.stopped = True
        if keep_text and reply.mode == "text":
            self._remember_assistant("".join(reply.text), reply)

    # -- JSON mode and tool calls ---------------------------------------------------

    def _json_reply(self, reply: _Reply, full: str, responses: int) -> None:
        """§7.2: parse the whole response; tools run; http/rag results ask again."""
        try:
            parsed = act.parse_json_reply(full)
        except act.ReplyFormatError as e:
            self._log.info("call {sid}: JSON reply not usable ({e}); spoken as text", sid=self.call.sid, e=e)
            self._reply = None
            self._remember_assistant(full)
            self._say_once(full)
            return
        hangup = next((a for a in parsed.actions if isinstance(a, act.Hangup)), None)
        results: list[Deferred[Any]] = []
        for action in parsed.actions:
            if isinstance(action, act.Hangup):
                continue
            if isinstance(action, act.HttpTool):
                d = self._http(action.url, action.method, action.body, action.headers, tool=True)
                results.append(d.addCallback(lambda note: self.history.append({"role": "system", "content": note})))
            elif isinstance(action, act.Rag):
                self._action(reply, action)
                results.append(succeed(None))
            else:
                self._action(reply, action)
        if parsed.speech:
            self._remember_assistant(parsed.speech, reply)
        self._reply = None
        reply.stopped = True
        if hangup is not None:
            self._store_hangup_headers()
            if parsed.speech:
                self._say_once(parsed.speech, auto_hangup=True, wait_input_ms=parsed.wait_input_timeout_ms)
            else:
                self._hangup_now(hangup.reason or "bySystem", hangup.initiator or "ai")
            return
        if parsed.speech:
            self._say_once(parsed.speech, wait_input_ms=parsed.wait_input_timeout_ms)
        self._ask_again_after(results, responses)

    def _ask_again_after(self, results: list[Deferred[Any]], responses: int) -> None:
        """Tool results go back to the model: one more response once they are all in (§7.2)."""
        if not results or responses + 1 >= MAX_RESPONSES_PER_TURN:
            return

        def again(_: Any) -> None:
            if not self.call.ended and self._reply is None and not self._finished:
                self._generate(responses + 1)

        gatherResults(results, consumeErrors=True).addBoth(again)

    def _tool_calls(self, reply: _Reply, calls: Sequence[Any], responses: int) -> None:
        """``tools`` mode: each call is an action; http results go back as ``tool`` messages and the model
        is asked again (at most :data:`MAX_RESPONSES_PER_TURN` responses per turn)."""
        assistant = {"role": "assistant", "content": "".join(reply.text) or None,
                     "tool_calls": [{"id": c.id, "type": "function",
                                     "function": {"name": c.name, "arguments": c.arguments_json}} for c in calls]}
        if self.history and self.history[-1]["role"] == "assistant" and self.history[-1].get("content") == assistant["content"]:
            self.history[-1] = assistant
        else:
            self.history.append(assistant)
        waiting: list[Deferred[Any]] = []
        for c in calls:
            try:
                action = action_from_call(c.name, c.arguments_json)
            except act.ReplyFormatError as e:
                self.history.append({"role": "tool", "tool_call_id": c.id, "content": f"error: {e}"})
                continue
            self._metric("tool_invocation", {"name": c.name, "arguments": c.arguments_json[:2000]})
            if isinstance(action, act.HttpTool):
                d = self._http(action.url, action.method, action.body, action.headers, tool=True)
                d.addCallback(lambda note, cid=c.id: self.history.append(
                    {"role": "tool", "tool_call_id": cid, "content": note}))
                waiting.append(d)
                continue
            self.history.append({"role": "tool", "tool_call_id": c.id, "content": "done"})
            self._action(reply, action)
        self._finish_reply(reply)
        self._ask_again_after(waiting, responses)

    # -- actions -----------------------------------------------------------------

    def _action(self, reply: _Reply, action: Any) -> None:
        """One tag or tool of a reply (§7.1, §7.2)."""
        call = self.call
        if isinstance(action, act.Hangup):
            reply.hangup = action
            self._cut_sentence(reply)
        elif isinstance(action, act.SetVar):
            self._set_var(action.key, action.value)
        elif isinstance(action, act.Goto):
            if reply.scene_text:
                reply.enter_after = action.scene
            else:
                self._switch_scene(action.scene)
        elif isinstance(action, act.Play):
            self._cut_sentence(reply)
            self._play_file(self._render(action.file))
        elif isinstance(action, act.Refer):
            self._stop_reply()
            self._transfer(action.to)
        elif isinstance(action, act.ReferTool):
            self._stop_reply()
            try:
                options = ReferOption.from_mapping(action.options, "tools.refer.options")
            except Exception as e:
                call.error(f"refer tool: {e}", sender="llm")
                return
            self._transfer(action.callee, action.caller, options)
        elif isinstance(action, act.Collect):
            self._cut_sentence(reply)
            self._start_collect(action, reply)
        elif isinstance(action, act.Message):
            if call.call_type != "sip":
                call.error("message: the call has no SIP leg", sender="playbook")
                return
            try:
                call.send_message(action.body, action.content_type or "text/plain", refer=action.refer)
            except Exception as e:
                call.error(f"message not sent: {e}", sender="playbook")
        elif isinstance(action, act.Http):
            body = action.body.encode("utf-8") if action.body is not None else None
            d = self._http(action.url, action.request_method, body, {}, tool=False)
            d.addCallback(lambda note: self._note(reply, note))
        elif isinstance(action, act.HttpTool):
            d = self._http(action.url, action.method, action.body, action.headers, tool=True)
            d.addCallback(lambda note: self._note(reply, note))
        elif isinstance(action, act.Rag):
            self._metric("rag_result", {"query": action.query, "source": action.source, "result": ""})
            self.history.append({"role": "system", "content": f"Knowledge base result for {action.query!r}: (none)"})
        elif isinstance(action, act.Accept):
            call.error("accept tool: the call is already answered", sender="llm")
        elif isinstance(action, act.Reject):
            call.error("reject tool: the call is already answered", sender="llm")

    def _set_var(self, key: str, value: str) -> None:
        if key.startswith("_") or len(key) > 128 or len(value) > 4096 or len(self.variables) > 1000:
            self.call.error(f"set_var {key[:64]!r} refused", sender="playbook")
            return
        self.variables[key] = value

    def _http(self, url: str, method: str, body: Any, headers: Mapping[str, str], tool: bool) -> Deferred[str]:
        call_http = self.services.call_http
        if call_http is None:
            return succeed("HTTP tool failed: HTTP requests are not available")
        data: Optional[bytes]
        if body is None or isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body).encode("utf-8")
        return call_http(self._render(url), method, data, headers, tool)

    def _realtime_tool(self, event: ce.FunctionCalled) -> None:
        """§8.4: a realtime model's tool call the engine carries out (others are the client's)."""
        if self._hanging_up or self.call.ended:
            return
        try:
            args = json.loads(event.arguments) if event.arguments else {}
        except ValueError:
            args = {}
        if not isinstance(args, dict):
            args = {}
        if event.name == "hangup_call":
            reason = args.get("reason")
            self._hangup_now(str(reason)[:128] if reason else "bySystem", "ai")
        elif event.name in ("transfer_call", "refer_call"):
            callee = args.get("callee") or args.get("callee_uri")
            if isinstance(callee, str) and callee:
                self._transfer(callee[:1024])
        elif event.name == "goto_scene":
            scene = args.get("scene")
            if isinstance(scene, str) and self._switch_scene(scene):
                entry = self.scene.play if self.scene is not None else None
                if entry:
                    self._play_file(self._render(entry))

    def _transfer(self, target: str, caller: Optional[str] = None, options: Optional[ReferOption] = None) -> None:
        """§11.3: agent audio stops, a new leg is bridged; failure is the controller's reject event."""
        call = self.call
        call.interrupt()
        try:
            d = call.transfer(target, caller or call.agent_uri(), options)
        except Exception as e:  # NotAllowedError: no SIP leg
            call.error(f"transfer to {target} not possible: {e}", sender="playbook")
            return
        d.addErrback(lambda f: self._log.failure("transfer of {sid} failed", f, sid=call.sid))

    def _store_hangup_headers(self) -> None:
        """``sip.hangup_headers`` rendered with the call's variables (§3.3) for the agent's BYE."""
        option = self.playbook.option
        templates = option.sip.hangup_headers if option.sip is not None else None
        if not templates:
            return
        context = {k: v for k, v in self.variables.items() if not k.startswith("_")}
        rendered: dict[str, str] = {}
        for name, value in templates.items():
            try:
                text = render(value, context)
            except TemplateRenderError:
                text = value
            rendered[name] = text.replace("\r", " ").replace("\n", " ")[:1024]
        self.variables["_hangup_headers"] = rendered
        self.call.bye_headers = rendered

    def _hangup_now(self, reason: str, initiator: str, recorded: Optional[RecordedHangupReason] = None) -> None:
        if self.call.ended:
            return
        self._store_hangup_headers()
        self.call.hangup(reason, initiator, self.call.bye_headers, recorded_reason=recorded)

    # -- digit collection --------------------------------------------------------------

    def _start_collect(self, action: act.Collect, reply: Optional[_Reply] = None) -> None:
        spec = self.playbook.collectors.get(action.type)
        if spec is None:
            names = ", ".join(sorted(self.playbook.collectors)) or "none"
            self.history.append({"role": "system",
                                 "content": f"Unknown DTMF collector type '{action.type}'. Configured types: {names}."})
            return
        self._stop_collector()
        collector = DigitCollector(spec, action.var)
        self._collector = collector
        if action.prompt:
            prompt = self._render(action.prompt)
            if reply is not None and reply.queued:
                # Said after what the reply already said, in its stream: a new play would cut it.
                self._speak_piece(reply, prompt + "\n")
            else:
                self._after_speech(lambda: self._say_once(prompt, wait_input_ms=0))
        collector.start(self._now())
        self._arm_collector()

    def _arm_collector(self) -> None:
        collector = self._collector
        if self._collector_timer is not None and self._collector_timer.active():
            self._collector_timer.cancel()
        self._collector_timer = None
        if collector is None or not collector.collecting:
            return
        deadline = collector.deadline()
        if deadline is not None:
            self._collector_timer = self.services.clock.callLater(
                max(0.0, deadline - self._now()), self._collector_due)

    def _collector_due(self) -> None:
        self._collector_timer = None
        if self._collector is not None and not self._finished:
            self.call_event(_CollectorDue())

    def _collector_outcomes(self, outcomes: Sequence[Any]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, Retry):
                self._say_once(self._render(outcome.message), wait_input_ms=0)
            elif isinstance(outcome, Collected):
                self._set_var(outcome.var, outcome.value)
                self._collector_done(outcome.note, success=True)
            elif isinstance(outcome, (Failed, NothingEntered)):
                self._collector_done(outcome.note, success=False)
        self._arm_collector()

    def _collector_done(self, note: str, success: bool) -> None:
        self._collector = None
        if self.speaks_scenes:
            scene = self.scene
            action = scene.dtmf.get("collected" if success else "failed") if scene is not None else None
            if action is not None:
                self._take_action(action, "collected" if success else "failed")
                return
            if self.ivr:
                if not success:
                    self._speak_scene()
                return
        self.history.append({"role": "system", "content": note})
        self._generate()

    def _stop_collector(self) -> None:
        self._collector = None
        if self._collector_timer is not None and self._collector_timer.active():
            self._collector_timer.cancel()
        self._collector_timer = None

    # -- rolling summary ------------------------------------------------------------

    def _maybe_summarize(self, then: Callable[[], None]) -> bool:
        """§8.3 rolling_summary: fold old turns into the system message before generating."""
        if "rolling_summary" not in self._features or self._summarizing is not None or self.services.chat is None:
            return False
        limit = (self.playbook.llm or {}).get("summaryLimit")
        limit = limit if isinstance(limit, int) else 20
        if len(self.history) <= limit + _SUMMARY_SLACK:
            return False
        old = self.history[1:-_SUMMARY_KEEP]
        keep = self.history[-_SUMMARY_KEEP:]
        messages = [{"role": "system", "content": "Summarise this conversation in a few sentences."},
                    *({"role": m["role"], "content": str(m.get("content") or "")} for m in old
                      if m["role"] in ("user", "assistant", "system"))]
        d = self.services.chat.stream(messages, model=self.services.model,
                                      first_token_timeout_s=self.policy.first_token_timeout_s,
                                      total_timeout_s=self.policy.total_timeout_s)
        self._summarizing = d

        def done(result: ChatResult) -> None:
            if result.text.strip():
                system = self.history[0]
                self.history[:] = [{"role": "system", "content": f"{system['content']}\n\n[Previous Context Summary]: "
                                                                 f"{result.text.strip()}"}, *keep]

        def always(_: Any) -> None:
            self._summarizing = None
            if not self._finished:
                then()

        d.addCallbacks(done, lambda f: None).addBoth(always)
        return True


class _CollectorDue:
    """The collector's own timer fired (handled like the ``silence`` of §11.2 step 6)."""


_EVENT_NAMES: dict[type, str] = {
    ce.TranscriptHeard: "asrFinal",
    ce.DtmfReceived: "dtmf",
    ce.SilenceLasted: "silence",
    ce.InputTimedOut: "silence",
    _CollectorDue: "silence",
    ce.SpeechStarted: "speaking",
    ce.TurnEnded: "eou",
}
