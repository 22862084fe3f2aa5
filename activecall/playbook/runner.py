"""Playbooks for calls: loading them off the reactor and attaching an engine to a call.

One :class:`PlaybookRunner` per process (built by tap.py).  Every way a playbook reaches a
call goes through it: the inbound router (a loaded :class:`Playbook`), ``option.playbook``
on ``invite``/``start``/``accept``, ``--call`` with ``--handler x.md`` and
``/api/playbook/run`` (a name or inline text, :meth:`load`).  :meth:`call_option` merges
the playbook's options under the command's (§4); :meth:`attach` renders the playbook for
the call (§3.3) and makes its :class:`~activecall.playbook.engine.PlaybookEngine` the
controller's agent.  Post-call hooks run here in the background; shutdown waits for them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from activecall.agent.llm import ChatResult, OpenAIChat
from activecall.config import DEFAULT_ENV_PREFIX, FetchConfig
from activecall.options import CallOption, InterruptionOption
from activecall.playbook.engine import EngineServices, PlaybookEngine
from activecall.playbook.httptool import call_http, tag_result_note, tool_result_note
from activecall.playbook.model import DEFAULT_BASE_DIR, Playbook, PlaybookCache, PlaybookError, parse_playbook
from activecall.playbook.posthook import PosthookSpec, send_posthook
from activecall.playbook.prompt import PromptTexts, load_prompt_texts
from activecall.playbook.templates import call_variables, render_playbook
from activecall.timefmt import format_rfc3339

__all__ = ["PlaybookRunner", "is_inline_playbook"]

DEFAULT_MODEL = "gpt-4-turbo"
MAX_INLINE_CHARS = 256 * 1024


def is_inline_playbook(value: str) -> bool:
    """A value whose trimmed text starts with ``---`` is the playbook itself (§1)."""
    return value.lstrip().startswith("---")


class _Controller(Protocol):
    sid: str
    call_type: str
    created_at: float
    agent: Any


class PlaybookRunner:
    """Loads playbooks and attaches their engines to calls (see the module docstring)."""

    _log = Logger()

    def __init__(self, *, clock: IReactorTime, run_blocking: Callable[..., Deferred[Any]], environ: Mapping[str, str],
                 http_client: Any = None, fetcher: Any = None, fetch: FetchConfig = FetchConfig(),
                 env_prefix: str = DEFAULT_ENV_PREFIX, base_dir: str = DEFAULT_BASE_DIR,
                 features_dir: str = "features", signing_secret: Optional[str] = None,
                 in_flight: Optional[set[Deferred[None]]] = None) -> None:
        """``in_flight``: where post-call hooks still running are kept (the daemon's shutdown waits for
        that set: CallServices.records_in_flight); ``signing_secret`` signs them ([webhook])."""
        self._clock = clock
        self._run_blocking = run_blocking
        self._environ = environ
        self._http_client = http_client
        self._fetcher = fetcher
        self._fetch = fetch
        self._env_prefix = env_prefix
        self._features_dir = features_dir
        self.cache = PlaybookCache(base_dir)
        self._texts: dict[tuple[Any, ...], PromptTexts] = {}
        self._signing_secret = signing_secret
        #: Post-call hooks still running.
        self.in_flight: set[Deferred[None]] = in_flight if in_flight is not None else set()

    # -- loading ----------------------------------------------------------------

    def load(self, value: str) -> Deferred[Playbook]:
        """The playbook a name or inline text names, parsed off the reactor (fails with PlaybookError)."""
        if is_inline_playbook(value):
            text = value.lstrip()
            if len(text) > MAX_INLINE_CHARS:
                return fail(PlaybookError(f"inline playbook larger than {MAX_INLINE_CHARS} characters"))
            return self._run_blocking(parse_playbook, text, self._environ, "<inline playbook>",
                                      env_prefix=self._env_prefix)
        return self._run_blocking(lambda: self.cache.load(value, self._environ, env_prefix=self._env_prefix))

    def prompt_texts(self, playbook: Playbook) -> Deferred[PromptTexts]:
        """Feature snippets and tool instructions for ``playbook`` (files read once, off the reactor)."""
        llm = playbook.llm or {}
        features = tuple(f for f in (llm.get("features") or ()) if isinstance(f, str))
        language = str(llm.get("language") or "zh")
        instructions = llm.get("toolInstructions") if isinstance(llm.get("toolInstructions"), str) else None
        key = (features, language, instructions)
        cached = self._texts.get(key)
        if cached is not None:
            return succeed(cached)

        def loaded(texts: PromptTexts) -> PromptTexts:
            for warning in texts.warnings:
                self._log.warn("playbook {source}: {warning}", source=playbook.source, warning=warning)
            if len(self._texts) < 256:
                self._texts[key] = texts
            return texts

        d: Deferred[PromptTexts] = self._run_blocking(load_prompt_texts, features, language, instructions,
                                                       self._features_dir)
        return d.addCallback(loaded)

    # -- options ------------------------------------------------------------------

    @staticmethod
    def call_option(playbook: Playbook, given: Optional[CallOption]) -> CallOption:
        """``given`` filled from the playbook's options (§4); barge-in defaults to ``both`` on playbook calls."""
        option = playbook.call_option(given)
        changes: dict[str, Any] = {"playbook": None}
        if option.interruption is None:
            raw = playbook.front_matter.get("interruption")
            changes["interruption"] = (InterruptionOption.from_mapping(raw, "interruption")
                                       if isinstance(raw, dict) else InterruptionOption())
        return dataclasses.replace(option, **changes)

    # -- attaching ------------------------------------------------------------------

    def attach(self, controller: Any, playbook: Playbook, texts: PromptTexts, *, caller: Optional[str] = None,
               callee: Optional[str] = None, headers: Sequence[tuple[str, str]] | Mapping[str, str] = ()) -> PlaybookEngine:
        """Render ``playbook`` for the call and make its engine the controller's agent."""
        sip = playbook.option.sip
        variables = call_variables(
            session_id=controller.sid, call_type=_variable_call_type(controller.call_type),
            start_time=format_rfc3339(controller.created_at), caller=caller, callee=callee, headers=headers,
            extract_headers=sip.extract_headers if sip is not None else None)
        rendered = render_playbook(playbook, variables, self._environ, self._env_prefix)
        engine = PlaybookEngine(controller, rendered, self._services(rendered, texts), variables)
        controller.agent = engine
        return engine

    def _services(self, playbook: Playbook, texts: PromptTexts) -> EngineServices:
        llm = playbook.llm
        chat = None
        model = DEFAULT_MODEL
        if llm is not None and self._http_client is not None:
            chat = OpenAIChat(http_client=self._http_client, clock=self._clock, environ=self._environ,
                              fetch=self._fetch, base_url=llm.get("baseUrl") or None, api_key=llm.get("apiKey") or None)
            model = str(llm.get("model") or DEFAULT_MODEL)
        return EngineServices(clock=self._clock, chat=chat, model=model, prompt_texts=texts,
                              call_http=self._call_http if self._fetcher is not None else None,
                              after_call=self._after_call)

    def _call_http(self, url: str, method: str, body: Optional[bytes], headers: Mapping[str, str],
                   tool: bool) -> Deferred[str]:
        if tool:
            return call_http(self._fetcher, url, method, body, headers, json_form=True).addCallback(tool_result_note)
        return call_http(self._fetcher, url, method, body, headers).addCallback(
            lambda outcome: tag_result_note(method, url, outcome))

    # -- after the call ----------------------------------------------------------------

    def _after_call(self, engine: PlaybookEngine) -> None:
        raw = engine.playbook.front_matter.get("posthook")
        if not isinstance(raw, dict) or self._fetcher is None:
            return
        try:
            spec = PosthookSpec.from_mapping(raw)
        except ValueError as e:
            self._log.warn("playbook {source}: posthook not sent: {e}", source=engine.playbook.source, e=e)
            return
        chat, model = engine.services.chat, engine.services.model

        def summarize(messages: list[dict[str, Any]]) -> Deferred[str]:
            assert chat is not None
            d: Deferred[ChatResult] = chat.stream(messages, model=model, first_token_timeout_s=20.0,
                                                  total_timeout_s=60.0)
            return d.addCallback(lambda result: result.text)

        d = send_posthook(spec, session_id=engine.call.sid, history=[dict(m) for m in engine.history],
                          summarize=summarize if chat is not None else None, fetcher=self._fetcher, clock=self._clock,
                          signing_secret=self._signing_secret)
        self.in_flight.add(d)
        d.addBoth(lambda _: self.in_flight.discard(d))



def _variable_call_type(call_type: str) -> str:
    """``call_type`` of the templates (§3.2): sip, websocket, webrtc or b2bua."""
    return call_type.lower()
