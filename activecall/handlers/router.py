"""Inbound INVITE routing (config.md §5): webhook, playbook or no handler, and shutdown refusal.

:func:`build_router` reads ``[handler]`` once, at start-up, and builds the route:

- ``type = "webhook"``: :class:`~activecall.handlers.webhook.WebhookCallHandler` notifies
  the webhook and parks the call in :class:`~activecall.handlers.pending.PendingCalls`
  until a session (``/call/sip?id=<dialogId>``) claims it; a call that leaves the
  registry unclaimed still gets its call record (:class:`UnansweredCallRecords`).
- ``type = "playbook"``: :class:`~activecall.handlers.playbook.PlaybookCallHandler`
  picks and loads the playbook; :class:`PlaybookCallStarter` opens the call's session
  at once and has its controller answer with the playbook.
- no ``[handler]``: no route, so no :class:`ICallHandler`; the user agent answers
  503 "No invite handler configured" itself, before building a dialog.

:class:`InboundRouter` is the user agent's handler. The drain state is the user
agent's (:meth:`SipUserAgent.start_draining`): from then on new INVITEs and
out-of-dialog OPTIONS get 503 "Server shutting down" before reaching a handler, so
an edge proxy probing the node (Kamailio ``dispatcher``, docs/cluster.md) stops
sending it calls while its running calls go on. At shutdown
:meth:`InboundRouter.reject_waiting_calls` answers the calls still waiting for a
client the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from activecall.call.record import CallRecord, build_call_record, hangup_reason_from_name
from activecall.config import Config, PlaybookHandlerConfig, WebhookHandlerConfig
from activecall.control.query import SessionParams
from activecall.handlers.pending import PendingCall, PendingCalls
from activecall.handlers.playbook import PlaybookCallHandler
from activecall.handlers.webhook import HttpClient, WebhookCallHandler, WebhookNotifier
from activecall.options import CallOption
from activecall.legs.sip import custom_headers_of
from activecall.playbook.model import Playbook
from activecall.playbook.prompt import PromptTexts
from activecall.playbook.runner import PlaybookRunner
from activecall.sip.useragent import ICallHandler, InboundCall

__all__ = [
    "InboundRouter",
    "PlaybookCallStarter",
    "RecordWriter",
    "RouterSessions",
    "UnansweredCallRecords",
    "build_router",
]


class _Answerer(Protocol):
    """The controller operation a playbook call uses."""

    def answer(self, option: Optional[CallOption], call: Optional[InboundCall] = None) -> None:
        """Answer the inbound ``call`` with ``option``."""


class _AnsweringSession(Protocol):
    @property
    def controller(self) -> _Answerer:
        """The session's call controller."""


class RouterSessions(Protocol):
    """What routing needs of the live sessions (:class:`activecall.control.session.SessionManager`)."""

    def open(self, params: SessionParams) -> _AnsweringSession:
        """Create a session and list it at once."""

    def get(self, sid: str) -> object | None:
        """The live session with this id, if any."""


class RecordWriter(Protocol):
    """Saves call records (:class:`activecall.call.recordstore.CallRecordWriter`)."""

    def write(self, record: Mapping[str, Any], start_epoch_s: float) -> Deferred[Optional[str]]:
        """Save ``record``; fires with where it went, or None (never fails)."""


class _Route(Protocol):
    """A handler the router sends INVITEs to: :class:`WebhookCallHandler` or :class:`PlaybookCallHandler`."""

    def incoming_call(self, call: InboundCall) -> None:
        """A new INVITE arrived."""


class PlaybookCallStarter:
    """Starts a playbook-routed call: its session (named by the dialogId) answers with the playbook.

    The session has an event dump and no pings (no WebSocket); the call's option is the
    playbook's (§4), with a 50 s inactivity timeout unless the playbook sets one.
    """

    INACTIVITY_TIMEOUT_S = 50

    _log = Logger()

    def __init__(self, sessions: RouterSessions, playbooks: Optional[PlaybookRunner] = None) -> None:
        self._sessions = sessions
        self._playbooks = playbooks

    def __call__(self, call: InboundCall, playbook: Playbook) -> None:
        """Open the session for ``call`` and answer it with ``playbook`` (its engine attached first)."""
        runner = self._playbooks
        if runner is None:
            self._answer(call, playbook, None)
            return
        runner.prompt_texts(playbook).addCallback(lambda texts: self._answer(call, playbook, texts)).addErrback(
            lambda f: (self._log.failure("playbook call {dialog_id} not started", f, dialog_id=call.dialog_id),
                       call.reject(503, None)))

    def _answer(self, call: InboundCall, playbook: Playbook, texts: Optional[PromptTexts]) -> None:
        if call.cancelled or call.terminated:
            return  # the caller gave up while the feature texts were read
        session = self._sessions.open(SessionParams(sid=call.dialog_id, call_type="sip", dump=True, ping_s=0))
        option = PlaybookRunner.call_option(playbook, None)
        if option.inactivity_timeout is None:
            option = dataclasses.replace(option, inactivity_timeout=self.INACTIVITY_TIMEOUT_S)
        if self._playbooks is not None and texts is not None:
            self._playbooks.attach(session.controller, playbook, texts, caller=call.caller, callee=call.callee,
                                   headers=custom_headers_of(call))
        session.controller.answer(option, call=call)


class UnansweredCallRecords:
    """``PendingCalls(on_closed=...)``: the call record of an inbound call no client attached to (playbook.md §14).

    A call that leaves the pending registry unanswered (accept timeout, CANCEL,
    client gone, shutdown) gets a record with its final SIP status; one claimed by
    a session (whose controller writes the record) gets none from here.
    """

    def __init__(self, clock: IReactorTime, records: RecordWriter, sessions: RouterSessions) -> None:
        self._clock = clock
        self._records = records
        self._sessions = sessions

    def __call__(self, dialog_id: str, call: PendingCall, added_at: float, status: int) -> None:
        """Write the record of ``call``, pending since ``added_at`` and answered ``status``."""
        if self._sessions.get(dialog_id) is not None:
            return
        reason = hangup_reason_from_name("canceled" if status == 487 else "failed")
        record = CallRecord(call_type="sip", call_id=dialog_id, start_s=added_at, end_s=self._clock.seconds(),
                            caller=call.caller, callee=call.callee, sip_status=status, hangup_reason=reason,
                            extras={"session_id": dialog_id, "call_type": "sip"})
        self._records.write(build_call_record(record), added_at)


@implementer(ICallHandler)
class InboundRouter:
    """The user agent's :class:`ICallHandler`: every INVITE goes to the configured route.

    ``pending`` is the registry of calls waiting for a client (webhook route only),
    else None. :attr:`call_handler` is what the user agent is given: this router,
    or None when no route is configured. It keeps no drain state: the user agent does.
    """

    _log = Logger()

    def __init__(self, route: _Route | None, pending: PendingCalls | None = None) -> None:
        self._route = route
        self.pending = pending

    @property
    def call_handler(self) -> InboundRouter | None:
        """This router when a ``[handler]`` is configured; None lets the user agent answer 503 itself."""
        return self if self._route is not None else None

    def incoming_call(self, call: InboundCall) -> None:
        """Hand the new INVITE to the route."""
        assert self._route is not None, "without a route the user agent is given no handler (call_handler)"
        self._route.incoming_call(call)

    def reject_waiting_calls(self) -> None:
        """Shutdown (after the user agent started draining): calls still waiting for a client get 503
        "Server shutting down"."""
        if self.pending is not None:
            self.pending.reject_all()


def build_router(config: Config, *, clock: IReactorTime, sessions: RouterSessions, http_client: HttpClient,
                 run_blocking: Callable[..., Deferred[Any]], environ: Mapping[str, str],
                 call_records: RecordWriter | None, trusted: Callable[[str], bool],
                 playbooks: Optional[PlaybookRunner] = None,
                 node: Optional[tuple[str, str]] = None) -> InboundRouter:
    """The router for ``config.handler`` (config.md §5).

    ``http_client`` sends the webhook (an :class:`activecall.fetch.Fetcher`);
    ``run_blocking`` loads playbooks off the reactor; ``environ`` feeds their
    ``${VAR}``; ``call_records`` (None: ``[callrecord]`` absent) records calls no
    client took; ``trusted(ip)`` exempts trunks and registrars from the per-source
    share of pending calls.
    """
    handler = config.handler
    if isinstance(handler, WebhookHandlerConfig):
        limits = config.sip_limits
        pending = PendingCalls(
            clock, config.accept_timeout_s,
            on_closed=UnansweredCallRecords(clock, call_records, sessions) if call_records is not None else None,
            max_pending=limits.max_pending_invites, max_per_source=limits.max_pending_per_source,
            trusted=trusted)
        notifier = WebhookNotifier(handler, http_client, clock, signing_secret=config.webhook.signing_secret)
        return InboundRouter(WebhookCallHandler(notifier, pending, clock, node=node), pending)
    if isinstance(handler, PlaybookHandlerConfig):
        return InboundRouter(PlaybookCallHandler(handler, PlaybookCallStarter(sessions, playbooks), run_blocking, environ,
                                                 env_prefix=config.api.env_prefix, clock=clock))
    return InboundRouter(None)
