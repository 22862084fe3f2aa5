"""``[handler] type = "playbook"``: route inbound INVITEs to playbooks by caller/callee rules (config.md §5)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from activecall.config import DEFAULT_ENV_PREFIX, PlaybookHandlerConfig
from activecall.playbook.model import Playbook, PlaybookCache, PlaybookError, PlaybookNotFound
from activecall.sip.useragent import ICallHandler, InboundCall


def _reason(text: str) -> list[tuple[str, str]]:
    return [("Reason", 'SIP;cause=503;text="' + text.replace('"', "'").replace("\r", " ").replace("\n", " ") + '"')]


@implementer(ICallHandler)
class PlaybookCallHandler:
    """First matching rule, else ``default``; no match, a missing file or a load error → 503 with a Reason.

    The playbook is loaded off the reactor thread through a
    :class:`PlaybookCache` (the file is stat'ed and parsed again only when it, or an
    environment variable it used, changed); with a ``clock``, a file checked less than a
    second ago is taken from the cache at once, without a thread hop per call.
    ``start_call(call, playbook)`` then answers the call with it.
    """

    _log = Logger()

    def __init__(self, config: PlaybookHandlerConfig, start_call: Callable[[InboundCall, Playbook], None],
                 run_blocking: Callable[..., Deferred[Any]], environ: Mapping[str, str],
                 env_prefix: str = DEFAULT_ENV_PREFIX, clock: Optional[IReactorTime] = None) -> None:
        self._config = config
        self._playbooks = PlaybookCache()
        self._start_call = start_call
        self._run_blocking = run_blocking
        self._environ = environ
        self._env_prefix = env_prefix  # [api] env_prefix: the ${VAR}s a playbook may read
        self._clock = clock

    def incoming_call(self, call: InboundCall) -> None:
        """Refuse without a rule; else load the rule's playbook and start the call (a draining user
        agent answers new INVITEs itself)."""
        name = self._config.select(call.caller, call.callee)
        if name is None:
            self._log.info("inbound call from {caller} to {callee}: no playbook rule matches", caller=call.caller, callee=call.callee)
            call.reject(503, None, headers=_reason("No matching playbook"))
            return
        now = self._clock.seconds() if self._clock is not None else None
        if now is not None:
            playbook = self._playbooks.recent(name, self._environ, now, env_prefix=self._env_prefix)
            if playbook is not None:
                self._loaded(playbook, call, name)
                return
        d = self._run_blocking(lambda: self._playbooks.load(name, self._environ, env_prefix=self._env_prefix, now=now))
        d.addCallbacks(self._loaded, self._failed, callbackArgs=(call, name), errbackArgs=(call, name))

    def _loaded(self, playbook: Playbook, call: InboundCall, name: str) -> None:
        if call.cancelled or call.terminated:
            return  # the caller gave up while the file was read
        for warning in playbook.warnings:
            self._log.warn("playbook {name}: {warning}", name=name, warning=warning)
        self._log.debug("inbound call {dialog_id} from {caller}: playbook {name}", dialog_id=call.dialog_id, caller=call.caller, name=name)
        self._start_call(call, playbook)

    def _failed(self, f: Failure, call: InboundCall, name: str) -> None:
        if f.check(PlaybookNotFound):
            text = "Playbook Not Found"
        elif f.check(PlaybookError):
            text = f"Playbook error: {f.getErrorMessage()}"
        else:
            self._log.failure("loading playbook {name} failed", f, name=name)
            text = "Playbook error"
        self._log.warn("inbound call refused: {text}", text=text)
        call.reject(503, None, headers=_reason(text))
