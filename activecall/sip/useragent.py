"""The SIP transaction user: dialogs, calls and out-of-dialog requests; no sockets.

:class:`SipUserAgent` sits on an :class:`ISipStack` (``activecall.sip.transport.SipStack``
in production: transactions, timers and sockets) and turns what it delivers into
calls for an :class:`ICallHandler` and events for per-dialog
:class:`IDialogListener` objects.  It exposes Deferred-returning operations to
the call layer (``invite``, ``request``; on a call ``answer``, ``bye``,
``reinvite``, ``info``, ``message``, ``refer``, ``notify``).  There is no call
logic here: what to answer and when is the handler's business.

Outgoing INVITE::

    send --1xx--> on_provisional(response) ...
      |--2xx--> ACK sent, Deferred fires with OutboundCall
      |--401/407--> resend with credentials (once per challenge) ...
      |--other final--> errback CallRejected(status, reason)
      |--Timer B / transport error--> errback CallRejected(408 / 503)
      \\--Deferred.cancel()--> CANCEL after the first 1xx; a 2xx that still comes is ACKed and BYEd

Incoming INVITE::

    handler.incoming_call(call) --call.ringing()--> 180/183
      |--call.answer(sdp)--> 200 (resent by the transaction layer) --ACK--> answer Deferred fires
      |--call.reject(code)--> final non-2xx
      \\--CANCEL--> 200 to CANCEL, 487 to INVITE, listener.on_cancel(), on_terminated("cancel")

Out-of-dialog requests follow config.md §5: INVITE without a handler → 503
with ``Reason``; OPTIONS → 200 with Allow/Accept (or silence when disabled);
REFER → 400; anything else → 200; requests with a To tag matching no dialog → 481.

Drain (docs/cluster.md): the user agent owns the node's drain state. Once
:meth:`SipUserAgent.start_draining` was called (at shutdown), out-of-dialog OPTIONS and new INVITEs get ``503`` with the "Server shutting down"
``Reason``, so a dispatcher probing with OPTIONS takes the node out; dialogs go on
(in-dialog OPTIONS, BYE, re-INVITE are answered as before). Everything else that
says "draining" (/health, the ``activecall_draining`` gauge) reads :attr:`SipUserAgent.draining`.

Limits (docs/config-security.md): with ``max_calls`` set, a new INVITE while
that many calls are held (inbound dialogs, early or confirmed, plus outbound
calls and INVITEs in progress) gets ``503`` with ``Retry-After`` and a
``Reason``, and :meth:`SipUserAgent.invite` fails with ``CallRejected(503)``.
``admit_new_request`` (the rate limit) is asked, before any transaction
exists, only for requests that start something (:meth:`SipUserAgent.starts_something`);
a False answer drops the request silently.

Transports (RFC 3261 §18.1.1): a request goes over the transport its target
names (``;transport=``, ``sips:``); a target that names none goes over UDP,
or over TCP when the request is larger than :data:`UDP_MTU_LIMIT` bytes and a
TCP listener exists.  Via and Contact name the transport actually used
(``SIP/2.0/TCP``, ``;transport=tcp``).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from activecall.sip.auth import DigestClient
from activecall.sip.dialog import Dialog, DialogError, answer_hold
from activecall.sip.message import (
    Headers,
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
    make_response,
    parse_name_addr,
)
from activecall.sip.transaction import TransactionKey, build_cancel
from activecall.sip.uri import SipUri, parse_uri, transport_for_uri

__all__ = [
    "ALLOW",
    "MAX_CALLS_REASON",
    "MAX_CALLS_RETRY_AFTER_S",
    "SHUTTING_DOWN_REASON",
    "CallRejected",
    "ICallHandler",
    "IDialogListener",
    "ISipStack",
    "Hop",
    "CallDialog",
    "InboundCall",
    "OutboundCall",
    "SipUserAgent",
]

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, MESSAGE, REFER, NOTIFY, UPDATE, PRACK"
_SUPPORTED = "timer, replaces"
# Extensions we can honour when a request Requires them.
_KNOWN_EXTENSIONS = frozenset({"timer", "replaces"})
_NO_HANDLER_REASON = 'SIP;cause=503;text="No invite handler configured"'
MAX_CALLS_REASON = 'SIP;cause=503;text="Too many calls"'
#: The Reason of the 503 a draining node gives to OPTIONS and new INVITEs (as handlers/pending.py's).
SHUTTING_DOWN_REASON = 'SIP;cause=503;text="Server shutting down"'
# Methods counted by name in request_counts/response_counts; anything else is "other"
# (a method is any token on the wire: labels must stay a bounded set).
_COUNTED_METHODS = frozenset(ALLOW.split(", ")) | {"REGISTER", "SUBSCRIBE", "PUBLISH"}
# Seconds a caller refused for max_calls is asked to wait (RFC 3261 §20.33).
MAX_CALLS_RETRY_AFTER_S = 5
#: §18.1.1: a request larger than this (path MTU 1500 minus 200) goes over TCP unless the target asks for UDP.
UDP_MTU_LIMIT = 1300

Hop = tuple[str, str, int]
"""Where a request goes: ``(transport, host, port)`` with transport ``udp``/``tcp``/``tls``."""


class CallRejected(Exception):
    """An outgoing INVITE (or in-dialog request) ended with a final non-2xx ``status``."""

    def __init__(self, status: int, reason: str, response: SipResponse | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.response = response


class ICallHandler(Interface):
    """Receives new inbound calls (the call layer's router implements it).

    While the user agent drains, new INVITEs are answered 503 before a handler sees them.
    """

    def incoming_call(call: InboundCall) -> None:
        """A new INVITE arrived: eventually call ``call.ringing()``, ``call.answer(sdp)`` or ``call.reject(code)``.

        Set ``call.listener`` to an :class:`IDialogListener` to receive in-dialog events.
        """


class IDialogListener(Interface):
    """In-dialog events of one call; set as ``call.listener`` by the call layer.

    Every method is optional in practice: a listener lacking one is skipped.
    """

    def on_bye(request: SipRequest) -> None:
        """The peer hung up (already answered 200)."""

    def on_cancel() -> None:
        """The caller cancelled the INVITE before it was answered (487 already sent)."""

    def on_reinvite(sdp: bytes) -> bytes | None:
        """A re-INVITE/UPDATE offer (``b""`` when offerless); return the SDP answer, or None for the default.

        The default answers with our last local SDP, its direction mirrored
        from the offer (sendonly → recvonly, inactive → inactive: RFC 3264 §8.4 hold).
        """

    def on_info(request: SipRequest) -> None:
        """An INFO arrived (e.g. ``application/dtmf-relay``); answered 200."""

    def on_message(request: SipRequest) -> None:
        """A MESSAGE arrived in the dialog; answered 200."""

    def on_refer(request: SipRequest) -> None:
        """A REFER arrived (answered 202); report progress with ``call.notify``."""

    def on_notify(request: SipRequest) -> None:
        """A NOTIFY arrived (e.g. REFER progress as message/sipfrag); answered 200."""

    def on_terminated(reason: str) -> None:
        """The dialog ended, exactly once: ``bye-received``, ``bye-sent``, ``cancel``,
        ``rejected``, ``ack-timeout``, ``timeout`` or ``transport-error``."""


class ISipStack(Protocol):
    """What the user agent needs from the transport/transaction adapter."""

    def now(self) -> float:
        """Seconds on the injected clock."""
        ...

    def local_address(self, transport: str) -> tuple[str, int] | None:
        """The bound (host, port) of the listener for ``transport``, or None if there is none."""
        ...

    def resolve(self, uri: SipUri) -> Deferred[Hop]:
        """Where requests for ``uri`` go (fires synchronously for IP literals)."""
        ...

    def send_request(self, request: SipRequest, hop: Hop, flow: object | None = None) -> TransactionKey:
        """Start a client transaction; ``flow`` is a connection to reuse (stream transports)."""
        ...

    def send_response(self, key: TransactionKey, response: SipResponse) -> None:
        """Send through server transaction ``key``."""
        ...

    def send_stateless(self, message: SipRequest, hop: Hop, flow: object | None = None) -> None:
        """Send an ACK for a 2xx (no transaction)."""
        ...

    def flow_of(self, key: TransactionKey) -> object | None:
        """The stream connection client transaction ``key`` went out on (None for UDP)."""
        ...


class _Op:
    """One client transaction the TU waits on (plus its digest retries)."""

    __slots__ = ("request", "hop", "flow", "deferred", "digest", "on_final", "on_provisional", "auth_tries",
                 "sized")

    def __init__(self, request: SipRequest, hop: Hop, flow: object | None,
                 on_final: Callable[[SipResponse], None],
                 on_provisional: Callable[[SipResponse], None] | None = None,
                 digest: DigestClient | None = None) -> None:
        self.request = request
        self.hop = hop
        self.flow = flow
        self.on_final = on_final
        self.on_provisional = on_provisional
        self.digest = digest
        self.auth_tries = 0
        # The target named no transport: a request over UDP_MTU_LIMIT bytes goes over TCP (§18.1.1).
        self.sized = False


def _call_listener(listener: object | None, name: str, *args: object) -> Any:
    """Call ``listener.name(*args)`` if it exists; return its result."""
    method = getattr(listener, name, None)
    if method is None:
        return None
    return method(*args)


def _as_bytes(body: bytes | str | None) -> bytes:
    if body is None:
        return b""
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


def _session_timer_headers(request: SipRequest) -> list[tuple[str, str]]:
    """Echo RFC 4028 Session-Expires so a UAC that Requires timer is satisfied; we never refresh."""
    value = request.headers.get("Session-Expires")
    if value is None:
        return []
    delta, _, params = value.partition(";")
    delta = delta.strip()
    if not (delta.isascii() and delta.isdigit() and len(delta) <= 10):
        return []  # not a delta-seconds: nothing to echo back (RFC 4028 is optional for us)
    refresher = "uac"
    for item in params.split(";"):
        name, _, val = item.partition("=")
        if name.strip().lower() == "refresher" and val.strip().lower() in ("uac", "uas"):
            refresher = val.strip().lower()
    out = [("Session-Expires", f"{int(delta)};refresher={refresher}")]
    supported = request.headers.get_all("Supported") + request.headers.get_all("Require")
    if any(t.strip().lower() == "timer" for line in supported for t in line.split(",")):
        out.append(("Require", "timer"))
    return out


class CallDialog:
    """The dialog handle shared by :class:`InboundCall` and :class:`OutboundCall`.

    ``listener`` (an :class:`IDialogListener`, set by the call layer) receives
    in-dialog events.  ``local_sdp``/``remote_sdp`` track the last offer/answer.
    """

    _log = Logger()

    def __init__(self, ua: SipUserAgent, dialog: Dialog, invite: SipRequest, flow: object | None) -> None:
        self._ua = ua
        self.dialog = dialog
        self.invite_request = invite
        self.flow = flow
        self.listener: object | None = None
        self.local_sdp: bytes = b""
        self.remote_sdp: bytes = b""
        self.digest: DigestClient | None = None
        self._terminated_reason: str | None = None

    # ------------------------------------------------------------ identity

    @property
    def dialog_id(self) -> str:
        """``{Call-ID}-{larger tag}-{smaller tag}`` (protocol.md §1.4)."""
        return self.dialog.id

    @property
    def call_id(self) -> str:
        """The Call-ID."""
        return self.dialog.call_id

    @property
    def from_tag(self) -> str:
        """The initial INVITE's From tag."""
        return self.dialog.from_tag

    @property
    def to_tag(self) -> str:
        """The To tag of the dialog (ours for inbound calls)."""
        return self.dialog.to_tag

    @property
    def terminated(self) -> bool:
        """Whether the dialog has ended."""
        return self._terminated_reason is not None

    # ------------------------------------------------------------ requests

    def bye(self, headers: Iterable[tuple[str, str]] = ()) -> Deferred[SipResponse]:
        """Hang up: send BYE; fires with its final response (the dialog ends at once either way)."""
        if self.terminated:
            return fail(DialogError("dialog already terminated", status=481))
        d = self._ua._dialog_request(self, "BYE", headers=headers)
        self._ua._end_dialog(self, "bye-sent")
        return d

    def reinvite(self, sdp: bytes | str, headers: Iterable[tuple[str, str]] = ()) -> Deferred[SipResponse]:
        """Send a re-INVITE offering ``sdp`` (hold: a=sendonly/inactive, RFC 3264 §8.4).

        Fires with the 2xx (ACK sent, ``remote_sdp`` updated) or errbacks with
        :class:`CallRejected` (491 on glare: retry later).
        """
        try:
            self.dialog.begin_reinvite()
        except DialogError as err:
            return fail(err)
        body = _as_bytes(sdp)
        self.local_sdp = body
        return self._ua._dialog_request(self, "INVITE", headers=headers, body=body,
                                        content_type="application/sdp")

    def update(self, sdp: bytes | str | None = None) -> Deferred[SipResponse]:
        """Send UPDATE (RFC 3311), with an SDP offer or without (session refresh)."""
        body = _as_bytes(sdp)
        if body:
            self.local_sdp = body
        return self._ua._dialog_request(self, "UPDATE", body=body,
                                        content_type="application/sdp" if body else None)

    def info(self, body: bytes | str, content_type: str = "application/dtmf-relay",
             headers: Iterable[tuple[str, str]] = ()) -> Deferred[SipResponse]:
        """Send INFO (``Signal=5\\r\\nDuration=160\\r\\n`` for DTMF relay); fires with the final response."""
        return self._ua._dialog_request(self, "INFO", headers=headers, body=_as_bytes(body),
                                        content_type=content_type)

    def message(self, body: bytes | str, content_type: str = "text/plain",
                headers: Iterable[tuple[str, str]] = ()) -> Deferred[SipResponse]:
        """Send MESSAGE in the dialog; fires with the final response."""
        return self._ua._dialog_request(self, "MESSAGE", headers=headers, body=_as_bytes(body),
                                        content_type=content_type)

    def refer(self, target: str | SipUri, headers: Iterable[tuple[str, str]] = ()) -> Deferred[SipResponse]:
        """Send REFER (RFC 3515) with ``Refer-To: <target>``; fires with the final response (202 expected)."""
        extra = [("Refer-To", f"<{target}>"), ("Referred-By", f"<{self.dialog.local_party.uri}>"), *headers]
        return self._ua._dialog_request(self, "REFER", headers=extra)

    def notify(self, body: bytes | str, *, event: str = "refer",
               subscription_state: str = "active;expires=60",
               content_type: str = "message/sipfrag;version=2.0",
               headers: Iterable[tuple[str, str]] = ()) -> Deferred[SipResponse]:
        """Send NOTIFY (REFER progress: ``SIP/2.0 200 OK`` and ``terminated;reason=noresource``)."""
        extra = [("Event", event), ("Subscription-State", subscription_state), *headers]
        return self._ua._dialog_request(self, "NOTIFY", headers=extra, body=_as_bytes(body),
                                        content_type=content_type)

    def _terminate(self, reason: str) -> None:
        if self._terminated_reason is not None:
            return
        self._terminated_reason = reason
        self.dialog.terminate()
        try:
            _call_listener(self.listener, "on_terminated", reason)
        except Exception:
            self._log.failure("listener on_terminated failed")


class OutboundCall(CallDialog):
    """A call we placed: created when the 2xx arrived and the ACK was sent."""

    def __init__(self, ua: SipUserAgent, dialog: Dialog, invite: SipRequest, response: SipResponse,
                 flow: object | None) -> None:
        super().__init__(ua, dialog, invite, flow)
        self.response = response
        self.local_sdp = invite.body
        self.remote_sdp = response.body
        self.ack: SipRequest | None = None
        self.ack_hop: Hop | None = None


class InboundCall(CallDialog):
    """A call offered to us by an INVITE, until and after the handler answers it.

    Useful fields for the webhook (protocol.md §1.4): ``dialog_id``,
    ``call_id``, ``from_tag``, ``to_tag``, ``caller``, ``callee``, ``request``
    (all headers), ``remote_sdp`` (the offer), ``source`` (where the INVITE came from).
    """

    def __init__(self, ua: SipUserAgent, dialog: Dialog, invite: SipRequest, key: TransactionKey,
                 flow: object | None, source: tuple[str, int] = ("", 0)) -> None:
        super().__init__(ua, dialog, invite, flow)
        self.key = key
        self.source = source
        self.remote_sdp = invite.body
        self.final_sent = False
        self.cancelled = False
        self.acked: Deferred[InboundCall] = Deferred()

    @property
    def request(self) -> SipRequest:
        """The initial INVITE."""
        return self.invite_request

    @property
    def caller(self) -> str:
        """The From URI, without display name or parameters."""
        return str(self.dialog.remote_party.uri)

    @property
    def callee(self) -> str:
        """The To URI, without display name or parameters."""
        return str(self.dialog.local_party.uri)

    def ringing(self, sdp: bytes | str | None = None) -> None:
        """Send 180 Ringing, or 183 Session Progress with ``sdp`` (early media)."""
        if self.final_sent:
            return
        body = _as_bytes(sdp)
        status = 183 if body else 180
        if body:
            self.local_sdp = body
        self._ua._respond_invite(self, status, body=body)

    def answer(self, sdp: bytes | str, headers: Iterable[tuple[str, str]] = ()) -> Deferred[InboundCall]:
        """Send 200 OK with ``sdp``; fires with the call when the ACK arrives.

        Errbacks with :class:`CallRejected` (487) if the caller cancelled first,
        or (408) when no ACK came in 64*T1 (a BYE is then sent).
        """
        if self.cancelled or self.terminated:
            return fail(CallRejected(487, "Request Terminated"))
        if self.final_sent:
            return fail(DialogError("INVITE already answered"))
        body = _as_bytes(sdp)
        self.local_sdp = body
        self.dialog.confirm()
        extra = [*_session_timer_headers(self.invite_request), *headers]
        self._ua._respond_invite(self, 200, body=body, headers=extra, final=True)
        return self.acked

    def reject(self, code: int, reason: str | None = None, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Answer the INVITE with a final non-2xx ``code`` and forget the dialog."""
        if self.final_sent:
            return
        self._ua._respond_invite(self, code, reason=reason, headers=headers, final=True)
        self._ua._end_dialog(self, "rejected")

    def bye(self, headers: Iterable[tuple[str, str]] = ()) -> Deferred[SipResponse]:
        """Hang up; before the answer this rejects the INVITE with 487 instead."""
        if not self.final_sent:
            self.reject(487)
            return succeed(make_response(self.invite_request, 487))
        return super().bye(headers)


class _PendingInvite:
    """An outgoing INVITE waiting for its final response."""

    __slots__ = ("ua", "op", "deferred", "call", "provisional", "cancel_requested", "cancel_sent")

    def __init__(self, ua: SipUserAgent, op: _Op) -> None:
        self.ua = ua
        self.op = op
        self.deferred: Deferred[OutboundCall] = Deferred(self._cancel)
        self.call: OutboundCall | None = None
        self.provisional = False
        self.cancel_requested = False
        self.cancel_sent = False

    def _cancel(self, _d: Deferred[OutboundCall]) -> None:
        self.cancel_requested = True
        self.ua._maybe_send_cancel(self)


class SipUserAgent:
    """The transaction user shared by every SIP listener (UDP, TCP, TLS).

    ``handler`` (an :class:`ICallHandler`) may be set after construction;
    while it is None every new INVITE gets 503 (config.md §5).
    """

    _log = Logger()

    def __init__(
        self,
        stack: ISipStack,
        *,
        ids: Any,
        handler: object | None = None,
        useragent: str = "activecall",
        external_ip: str | None = None,
        auto_learn_public_address: bool = False,
        enable_options_response: bool = True,
        max_calls: int | None = None,
        admit_new_request: Callable[[SipRequest], bool] | None = None,
    ) -> None:
        self._stack = stack
        self._ids = ids
        self.handler = handler
        self.useragent = useragent
        self.external_ip = external_ip
        self.auto_learn_public_address = auto_learn_public_address
        self.enable_options_response = enable_options_response
        # [sip_limits] max_calls; None = unlimited.
        self.max_calls = max_calls
        # The per-source rate limit, asked only for requests that start something.
        self.admit_new_request = admit_new_request
        self._draining = False
        self._ops: dict[TransactionKey, _Op] = {}
        self._dialogs: dict[tuple[str, str], CallDialog] = {}
        self._invites: dict[TransactionKey, InboundCall] = {}
        self._pending_invites: dict[TransactionKey, _PendingInvite] = {}
        self._answered: dict[TransactionKey, InboundCall] = {}
        self._public_callbacks: list[Callable[[str, int], None]] = []
        self._learned: tuple[str, int] | None = None
        # For /metrics: (direction "in"/"out", method) and (direction, method, status).
        self.request_counts: Counter[tuple[str, str]] = Counter()
        self.response_counts: Counter[tuple[str, str, int]] = Counter()
        self.counters: dict[str, int] = {"invites_in": 0, "invites_out": 0, "rejected_503": 0,
                                         "rejected_max_calls": 0, "rate_limited": 0}
        setter = getattr(stack, "set_user", None)
        if setter is not None:
            setter(self)

    # ------------------------------------------------------------ drain

    def start_draining(self) -> None:
        """Shutdown: from now on out-of-dialog OPTIONS and new INVITEs get 503 "Server shutting down".

        A dispatcher (Kamailio ``dispatcher`` with OPTIONS probing, docs/cluster.md) then
        stops sending new calls here while the dialogs already up continue.
        """
        if not self._draining:
            self._log.info("draining: new INVITEs and out-of-dialog OPTIONS get 503")
        self._draining = True

    @property
    def draining(self) -> bool:
        """Whether the node drains (:meth:`start_draining` was called); the one drain state of the daemon."""
        return self._draining

    # ------------------------------------------------------------ addresses

    def _advertised(self, transport: str) -> tuple[str, int]:
        local = self._stack.local_address(transport)
        if local is None:
            raise DialogError(f"missing local SIP address for callee transport: {transport}", status=503)
        host, port = local
        if self.external_ip:
            return self.external_ip, port
        if transport == "udp" and self._learned is not None:
            return self._learned
        return host, port

    def local_contact(self, transport: str = "udp", user: str | None = None) -> SipUri:
        """Our Contact URI for ``transport`` (``sips:`` on TLS; external_ip or the learned address when set)."""
        host, port = self._advertised(transport)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        uri = SipUri("sips" if transport == "tls" else "sip", user, None, host, port)
        if transport == "tcp":
            uri.set_param("transport", "tcp")
        return uri

    def on_public_address(self, callback: Callable[[str, int], None]) -> None:
        """Call ``callback(host, port)`` when a UDP response's Via received/rport differs from our sent-by."""
        self._public_callbacks.append(callback)

    def _via(self, transport: str) -> str:
        host, port = self._advertised(transport)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"SIP/2.0/{transport.upper()} {host}:{port};branch={self._ids.branch()};rport"

    def _put_via(self, request: SipRequest, transport: str) -> TransactionKey:
        """Give ``request`` our own fresh top Via; return the client transaction key it will have."""
        via = self._via(transport)
        request.headers.remove("Via")
        request.headers = Headers([("Via", via), *request.headers.items()])
        branch = via.split(";branch=", 1)[1].split(";", 1)[0]
        return TransactionKey(branch, "", request.method, False)

    # ------------------------------------------------------------ sending requests

    def _start(self, op: _Op) -> TransactionKey:
        key = self._put_via(op.request, op.hop[0])
        if op.sized and op.hop[0] == "udp" and self._stack.local_address("tcp") is not None \
                and len(op.request.serialize()) > UDP_MTU_LIMIT:
            op.hop = ("tcp", op.hop[1], op.hop[2])
            key = self._put_via(op.request, "tcp")
        if "Contact" in op.request.headers:
            self._fit_contact(op.request, op.hop[0])
        self._ops[key] = op  # before sending: a synchronous failure reports back at once
        self._count_request("out", op.request.method)
        self._stack.send_request(op.request, op.hop, op.flow)
        if op.flow is None:
            op.flow = self._stack.flow_of(key)  # the dialog keeps the connection it was made on
        return key

    def _fit_contact(self, request: SipRequest, transport: str) -> None:
        """Our own Contact for another transport (the target URI's, when the hop or size chose another)
        becomes the one for ``transport``; any other Contact is left alone."""
        try:
            ours = f"<{self.local_contact(transport)}>"
        except DialogError:
            return
        others = set()
        for name in ("udp", "tcp", "tls"):
            if name != transport and self._stack.local_address(name) is not None:
                others.add(f"<{self.local_contact(name)}>")
        h = request.headers
        lines = h.get_all("Contact")
        if not any(line.strip() in others for line in lines):
            return
        h.remove("Contact")
        for line in lines:
            h.add("Contact", ours if line.strip() in others else line)

    @staticmethod
    def _sized(uri: SipUri) -> bool:
        """True when ``uri`` leaves the transport to us (no ``;transport=``, not ``sips:``)."""
        return uri.param("transport") is None and transport_for_uri(uri) == "udp"

    def _resolve(self, uri: SipUri) -> Deferred[Hop]:
        try:
            return self._stack.resolve(uri)
        except Exception as err:  # a bad URI or no listener: same as a failed resolution
            return fail(err)

    def _send_when_resolved(self, uri: SipUri, build: Callable[[Hop], _Op],
                            failed: Callable[[SipResponse], None], request: SipRequest,
                            flow: object | None = None) -> None:
        """Resolve ``uri``, then start the op; resolution failure reports a 503."""
        def go(hop: Hop) -> None:
            op = build(hop)
            op.flow = flow
            op.sized = self._sized(uri)
            self._start(op)

        def bad(f: Failure) -> None:
            self._log.debug("cannot send {method} to {uri}: {error}", method=request.method,
                            uri=str(uri), error=f.getErrorMessage())
            failed(make_response(request, 503, "Service Unavailable"))

        d = self._resolve(uri)
        d.addCallback(go)
        d.addErrback(bad)

    def request(self, request: SipRequest, destination: SipUri | tuple[str, int] | None = None, *,
                credentials: object | None = None) -> Deferred[SipResponse]:
        """Send an out-of-dialog request (REGISTER, OPTIONS, MESSAGE ...); fire with its final response.

        Missing Max-Forwards, From tag, Call-ID, CSeq and User-Agent are filled
        in and our own Via is put on top.  401/407 are answered once per
        challenge with ``credentials`` (``username``/``password`` attributes or
        a :class:`DigestClient`).  Timeouts and transport errors fire with a
        synthesized 408/503 rather than errback.
        """
        self._complete_request(request)
        digest = self._digest(credentials)
        result: Deferred[SipResponse] = Deferred()

        def final(response: SipResponse) -> None:
            if not result.called:
                result.callback(response)

        if isinstance(destination, tuple):
            target = request.uri.copy()
            target.host, target.port = destination[0], destination[1]
            target.params = [p for p in target.params if p[0].lower() == "transport"]
        else:
            target = destination or request.uri
        self._send_when_resolved(target, lambda hop: _Op(request, hop, None, final, digest=digest),
                                 final, request)
        return result

    def _complete_request(self, request: SipRequest) -> None:
        h = request.headers
        if "Max-Forwards" not in h:
            h.add("Max-Forwards", "70")
        if "Call-ID" not in h:
            h.add("Call-ID", self._ids.call_id())
        if "CSeq" not in h:
            h.add("CSeq", f"1 {request.method}")
        try:
            from_ = request.from_
            if from_.tag is None:
                h.set("From", str(from_.with_tag(self._ids.tag())))
        except SipParseError:
            pass
        if "User-Agent" not in h:
            h.add("User-Agent", self.useragent)

    def _digest(self, credentials: object | None) -> DigestClient | None:
        if credentials is None or isinstance(credentials, DigestClient):
            return credentials
        username = getattr(credentials, "username", None)
        password = getattr(credentials, "password", None)
        if username is None or password is None:
            raise TypeError("credentials need username and password")
        return DigestClient(username, password, lambda: self._ids.token(16))

    def invite(
        self,
        target_uri: str | SipUri,
        from_uri: str | SipUri | NameAddr,
        *,
        contact: str | SipUri | None = None,
        sdp: bytes | str,
        headers: Iterable[tuple[str, str]] = (),
        credentials: object | None = None,
        call_id: str | None = None,
        on_provisional: Callable[[SipResponse], None] | None = None,
        next_hop: str | SipUri | None = None,
    ) -> Deferred[OutboundCall]:
        """Place a call; fires with an :class:`OutboundCall` once the 2xx is ACKed.

        ``next_hop`` (a URI) is where the INVITE is sent when it differs from the
        Request-URI (config.md §12 ``[[rewrites]]``); the Request-URI is unchanged.

        Errbacks with :class:`CallRejected` for a final non-2xx (after one
        digest retry per challenge), 408 on timeout, 503 on transport failure.
        ``on_provisional(response)`` sees each 1xx (183 bodies carry early
        media SDP).  ``cancel()`` on the Deferred sends CANCEL after the first
        provisional (at once if one came already) and errbacks it with
        CancelledError.
        """
        if self._at_max_calls():
            return fail(CallRejected(503, f"max_calls ({self.max_calls}) reached"))
        target = parse_uri(target_uri) if isinstance(target_uri, str) else target_uri.copy()
        if isinstance(from_uri, NameAddr):
            from_ = from_uri.copy()
        else:
            text = str(from_uri)
            from_ = parse_name_addr(text if "<" in text else f"<{text}>")
        from_.set_param("tag", self._ids.tag())
        transport = transport_for_uri(target)
        try:
            contact_text = f"<{contact}>" if contact is not None else f"<{self.local_contact(transport)}>"
        except DialogError as err:
            return fail(CallRejected(503, str(err)))
        body = _as_bytes(sdp)
        h = Headers()
        h.add("Max-Forwards", "70")
        h.add("From", str(from_))
        h.add("To", f"<{target}>")
        h.add("Call-ID", call_id or self._ids.call_id())
        h.add("CSeq", "1 INVITE")
        h.add("Contact", contact_text)
        h.add("User-Agent", self.useragent)
        h.add("Allow", ALLOW)
        h.add("Supported", _SUPPORTED)
        for name, value in headers:
            h.add(name, value)
        if body and "Content-Type" not in h:
            h.add("Content-Type", "application/sdp")
        request = SipRequest("INVITE", target, h, body)
        digest = self._digest(credentials)
        # Final responses of INVITEs go through _invite_final via _pending_invites.
        op = _Op(request, ("udp", "", 0), None, lambda r: None, on_provisional, digest)
        pending = _PendingInvite(self, op)
        self.counters["invites_out"] += 1

        def go(hop: Hop) -> None:
            op.hop = hop
            op.sized = self._sized(hop_uri)
            self._pending_invites[self._start(op)] = pending

        def bad(f: Failure) -> None:
            if not pending.deferred.called:
                pending.deferred.errback(CallRejected(503, f"cannot reach {target}: {f.getErrorMessage()}"))

        hop_uri = target if next_hop is None else (parse_uri(next_hop) if isinstance(next_hop, str) else next_hop)
        self._resolve(hop_uri).addCallbacks(go, bad)
        return pending.deferred

    def _maybe_send_cancel(self, pending: _PendingInvite) -> None:
        if pending.cancel_sent or not pending.provisional or pending.call is not None:
            return
        pending.cancel_sent = True
        cancel = build_cancel(pending.op.request)
        h = cancel.headers
        h.add("User-Agent", self.useragent)
        # CANCEL must reuse the INVITE's Via branch (§9.1), so no _put_via here.
        key = TransactionKey(cancel.top_via.branch or "", "", "CANCEL", False)
        self._ops[key] = _Op(cancel, pending.op.hop, pending.op.flow, lambda r: None)
        self._count_request("out", "CANCEL")
        self._stack.send_request(cancel, pending.op.hop, pending.op.flow)

    def _dialog_request(self, call: CallDialog, method: str, *, headers: Iterable[tuple[str, str]] = (),
                        body: bytes = b"", content_type: str | None = None) -> Deferred[SipResponse]:
        """Send an in-dialog request; fire with its final response (re-INVITE: errback on non-2xx)."""
        try:
            request = call.dialog.create_request(
                method, headers=[("User-Agent", self.useragent), *headers], body=body,
                content_type=content_type)
        except DialogError as err:
            return fail(err)
        result: Deferred[SipResponse] = Deferred()

        def final(response: SipResponse) -> None:
            self._dialog_final(call, request, response, result)

        self._send_when_resolved(call.dialog.next_hop(),
                                 lambda hop: _Op(request, hop, None, final, digest=call.digest),
                                 final, request, flow=call.flow)
        return result

    def _dialog_final(self, call: CallDialog, request: SipRequest, response: SipResponse,
                      result: Deferred[SipResponse]) -> None:
        status = response.status
        if request.method == "INVITE":
            call.dialog.end_reinvite()
            if 200 <= status < 300:
                call.dialog.refresh_target(response)
                call.remote_sdp = response.body or call.remote_sdp
                self._send_ack(call, response)
            elif not result.called:
                result.errback(CallRejected(status, response.reason, response))
                return
        elif request.method == "UPDATE" and 200 <= status < 300:
            call.dialog.refresh_target(response)
            if response.body:
                call.remote_sdp = response.body
        if status in (408, 481) and request.method != "BYE":
            # §12.2.1.2: the dialog is gone at the peer.
            self._end_dialog(call, "timeout" if status == 408 else "bye-received")
        if not result.called:
            result.callback(response)

    def _send_ack(self, call: CallDialog, response: SipResponse) -> None:
        """ACK a 2xx to our (re-)INVITE, end to end (§13.2.2.4)."""
        ack = call.dialog.create_ack(response.cseq.seq)

        def go(hop: Hop) -> None:
            self._put_via(ack, hop[0])
            if isinstance(call, OutboundCall):
                call.ack, call.ack_hop = ack, hop
            self._count_request("out", "ACK")
            self._stack.send_stateless(ack, hop, call.flow)

        self._resolve(call.dialog.next_hop()).addCallbacks(go, lambda f: None)

    # ------------------------------------------------------------ responses (from the stack)

    def _count_request(self, direction: str, method: str) -> None:
        self.request_counts[(direction, method if method in _COUNTED_METHODS else "other")] += 1

    def _count_response(self, direction: str, method: str, status: int) -> None:
        self.response_counts[(direction, method if method in _COUNTED_METHODS else "other", status)] += 1

    def response_received(self, response: SipResponse, key: TransactionKey) -> None:
        """A response for one of our client transactions."""
        self._count_response("in", key.method, response.status)
        op = self._ops.get(key)
        if op is None:
            return
        if op.hop[0] == "udp":
            self._check_public_address(response)
        if response.status < 200:
            if op.on_provisional is not None or key in self._pending_invites:
                self._invite_provisional(key, op, response)
            return
        if key.method == "INVITE" and 200 <= response.status < 300:
            # The transaction stays (RFC 6026) to pass on retransmitted 2xx: ACK each again.
            if key in self._pending_invites:
                self._invite_final(response, key)
            else:
                self._ops.pop(key, None)
                op.on_final(response)
            return
        self._ops.pop(key, None)
        if response.status in (401, 407) and op.digest is not None and op.auth_tries < 2:
            auth = op.digest.respond(op.request, response)
            if auth:
                self._retry_with_auth(key, op, auth)
                return
        if key in self._pending_invites:
            self._invite_final(response, key)
        else:
            op.on_final(response)

    def _retry_with_auth(self, key: TransactionKey, op: _Op, auth: list[tuple[str, str]]) -> None:
        request = op.request.copy()
        for name, _ in auth:
            request.headers.remove(name)
        for name, value in auth:
            request.headers.add(name, value)
        cseq = request.cseq
        call = None
        if request.to_tag is not None:
            call = self._dialogs.get((request.call_id, request.from_tag or ""))
        if call is not None:
            call.dialog.local_seq += 1
            seq = call.dialog.local_seq
        else:
            seq = cseq.seq + 1
        request.headers.set("CSeq", f"{seq} {cseq.method}")
        op.request = request
        op.auth_tries += 1
        pending = self._pending_invites.pop(key, None)
        new_key = self._start(op)
        if pending is not None:
            pending.provisional = False
            self._pending_invites[new_key] = pending

    def _invite_provisional(self, key: TransactionKey, op: _Op, response: SipResponse) -> None:
        pending = self._pending_invites.get(key)
        if pending is not None:
            pending.provisional = True  # any 1xx (even 100) allows a CANCEL (§9.1)
            if pending.cancel_requested:
                self._maybe_send_cancel(pending)
        if op.on_provisional is not None and response.status > 100:
            try:
                op.on_provisional(response)
            except Exception:
                self._log.failure("on_provisional failed")

    def _invite_final(self, response: SipResponse, key: TransactionKey) -> None:
        pending = self._pending_invites.get(key)
        if pending is None:
            return
        status = response.status
        if status >= 300:
            self._pending_invites.pop(key, None)
            if not pending.deferred.called:
                pending.deferred.errback(CallRejected(status, response.reason, response))
            return
        request = pending.op.request
        to_tag = response.to_tag
        if pending.call is not None:
            if to_tag == pending.call.dialog.remote_tag:
                call = pending.call
                if call.ack is not None and call.ack_hop is not None:
                    self._stack.send_stateless(call.ack, call.ack_hop, call.flow)
                return
            # A second fork answered: ACK it and hang up on it (§13.2.2.4).
            extra = self._make_outbound(pending, request, response)
            extra.bye()
            return
        call = self._make_outbound(pending, request, response)
        pending.call = call
        if pending.cancel_requested or pending.deferred.called:
            call.bye()
            return
        pending.deferred.callback(call)

    def _make_outbound(self, pending: _PendingInvite, request: SipRequest,
                       response: SipResponse) -> OutboundCall:
        contact = request.headers.get("Contact") or ""
        dialog = Dialog.for_uac(request, response, local_contact=contact)
        dialog.confirm()
        call = OutboundCall(self, dialog, request, response, pending.op.flow)
        call.digest = pending.op.digest
        self._dialogs[(dialog.call_id, dialog.local_tag)] = call
        self._send_ack(call, response)
        return call

    def client_failed(self, key: TransactionKey, request: SipRequest, status: int) -> None:
        """Timer B/F (408) or a transport error (503) on a client transaction."""
        op = self._ops.pop(key, None)
        if op is None:
            return
        response = make_response(request, status)
        if key in self._pending_invites:
            self._invite_final(response, key)
        else:
            op.on_final(response)

    def client_terminated(self, key: TransactionKey) -> None:
        """A client transaction was forgotten (e.g. an INVITE's Timer M): drop our record."""
        self._ops.pop(key, None)
        self._pending_invites.pop(key, None)

    def _check_public_address(self, response: SipResponse) -> None:
        try:
            via = response.top_via
        except SipParseError:
            return
        received, rport = via.received, via.rport
        if received is None and rport is None:
            return
        host = received or via.host
        port = rport or via.port or 5060
        if (host, port) == (via.host, via.port or 5060):
            return
        if self.auto_learn_public_address and not self.external_ip and self._learned != (host, port):
            try:
                public = ipaddress.ip_address(host).is_global
            except ValueError:
                public = False
            if public:
                self._learned = (host, port)
        for callback in list(self._public_callbacks):
            try:
                callback(host, port)
            except Exception:
                self._log.failure("on_public_address callback failed")

    # ------------------------------------------------------------ requests (from the stack)

    def wants_request(self, request: SipRequest) -> bool:
        """Whether the stack should open a server transaction at all.

        Disabled OPTIONS are dropped, and so are requests that start something
        when ``admit_new_request`` (the per-source rate limit) refuses them.
        """
        if request.method == "OPTIONS" and not self.enable_options_response:
            try:
                if request.to_tag is None:
                    return False
            except SipParseError:
                return False
        gate = self.admit_new_request
        if gate is not None and self.starts_something(request) and not gate(request):
            self.counters["rate_limited"] += 1
            return False
        return True

    def starts_something(self, request: SipRequest) -> bool:
        """Whether ``request`` would start new work here (what the rate limit counts).

        ACK and CANCEL never do (they finish or end an INVITE); a request with
        a To tag does only when that tag names no live dialog (it gets 481, and
        a flood of made-up in-dialog requests must not escape the limit).
        """
        if request.method in ("ACK", "CANCEL"):
            return False
        try:
            to_tag = request.to_tag
            if to_tag is None:
                return True
            return (request.call_id, to_tag) not in self._dialogs
        except SipParseError:
            return True

    def calls_in_progress(self) -> int:
        """Calls held now: live dialogs (inbound early or confirmed, outbound) plus outbound INVITEs not yet answered."""
        return len(self._dialogs) + sum(1 for p in self._pending_invites.values() if p.call is None)

    def _at_max_calls(self) -> bool:
        return self.max_calls is not None and self.calls_in_progress() >= self.max_calls

    def request_received(self, request: SipRequest, key: TransactionKey | None, source: tuple[str, int],
                         flow: object | None = None, cancels: TransactionKey | None = None) -> None:
        """A new request from the transaction layer (``key`` None for an ACK to a 2xx)."""
        method = request.method
        self._count_request("in", method)
        if key is None:
            self._ack_received(request)
            return
        if method == "CANCEL":
            self._cancel_received(request, key, cancels)
            return
        try:
            to_tag = request.to_tag
        except SipParseError:
            self._respond(key, request, 400)
            return
        if to_tag is not None:
            self._in_dialog(request, key, to_tag)
        elif method == "INVITE":
            self._new_invite(request, key, flow, source)
        elif method == "OPTIONS":
            if self.draining:
                self._respond(key, request, 503, headers=[("Reason", SHUTTING_DOWN_REASON)], to_tag=self._ids.tag())
                return
            self._respond(key, request, 200, headers=[("Allow", ALLOW), ("Accept", "application/sdp")],
                          to_tag=self._ids.tag())
        elif method == "REFER":
            self._respond(key, request, 400, to_tag=self._ids.tag())
        elif method == "BYE":
            self._respond(key, request, 481)
        else:
            self._respond(key, request, 200, to_tag=self._ids.tag())

    def _respond(self, key: TransactionKey, request: SipRequest, status: int, reason: str | None = None,
                 headers: Iterable[tuple[str, str]] = (), body: bytes = b"", to_tag: str | None = None,
                 content_type: str | None = None) -> None:
        response = make_response(request, status, reason, extra_headers=headers, to_tag=to_tag, body=body)
        response.headers.add("Server", self.useragent)
        self._count_response("out", request.method, status)
        if body and content_type:
            response.headers.add("Content-Type", content_type)
        try:
            self._stack.send_response(key, response)
        except ValueError:
            # The transaction already completed (e.g. the handler answered twice): nothing to send.
            self._log.debug("no server transaction for {status}", status=status)

    def _new_invite(self, request: SipRequest, key: TransactionKey, flow: object | None,
                    source: tuple[str, int] = ("", 0)) -> None:
        self.counters["invites_in"] += 1
        tag = self._ids.tag()
        if self.draining:
            self.counters["rejected_503"] += 1
            self._respond(key, request, 503, headers=[("Reason", SHUTTING_DOWN_REASON)], to_tag=tag)
            return
        if self.handler is None:
            self.counters["rejected_503"] += 1
            self._respond(key, request, 503, headers=[("Reason", _NO_HANDLER_REASON)], to_tag=tag)
            return
        if self._at_max_calls():
            self.counters["rejected_503"] += 1
            self.counters["rejected_max_calls"] += 1
            self._log.debug("INVITE {call_id} refused: {n} calls in progress (max_calls)",
                           call_id=request.call_id, n=self.calls_in_progress())
            self._respond(key, request, 503, to_tag=tag, headers=[
                ("Retry-After", str(MAX_CALLS_RETRY_AFTER_S)), ("Reason", MAX_CALLS_REASON)])
            return
        unsupported = [ext for line in request.headers.get_all("Require")
                       for ext in (e.strip().lower() for e in line.split(","))
                       if ext and ext not in _KNOWN_EXTENSIONS]
        if unsupported:
            self._respond(key, request, 420, headers=[("Unsupported", ", ".join(unsupported))], to_tag=tag)
            return
        transport = "udp"
        try:
            transport = request.top_via.transport.lower()
            contact = f"<{self.local_contact(transport if transport in ('tcp', 'tls') else 'udp')}>"
            dialog = Dialog.for_uas(request, tag, local_contact=contact)
        except (DialogError, SipParseError) as err:
            self._respond(key, request, getattr(err, "status", 400), to_tag=tag)
            return
        call = InboundCall(self, dialog, request, key, flow if transport in ("tcp", "tls") else None, source)
        self._dialogs[(dialog.call_id, tag)] = call
        self._invites[key] = call
        try:
            self.handler.incoming_call(call)  # type: ignore[attr-defined]
        except Exception:
            self._log.failure("incoming_call handler failed")
            if not call.final_sent:
                call.reject(500)

    def _respond_invite(self, call: InboundCall, status: int, *, reason: str | None = None,
                        body: bytes = b"", headers: Iterable[tuple[str, str]] = (), final: bool = False) -> None:
        extra = list(headers)
        if 100 < status < 300:
            # §12.1.1: a response that establishes the dialog carries the request's Record-Route,
            # values and order as received, so the caller's ACK and BYE take the proxies' path.
            extra = [("Record-Route", value) for value in call.invite_request.headers.get_all("Record-Route")] + extra
        if status < 300:
            extra += [("Contact", call.dialog.local_contact), ("Allow", ALLOW), ("Supported", _SUPPORTED)]
        if final:
            call.final_sent = True
            self._invites.pop(call.key, None)
            if 200 <= status < 300:
                self._answered[call.key] = call
        self._respond(call.key, call.invite_request, status, reason, extra, body,
                      to_tag=call.dialog.local_tag, content_type="application/sdp")

    def _ack_received(self, ack: SipRequest) -> None:
        try:
            call = self._dialogs.get((ack.call_id, ack.to_tag or ""))
        except SipParseError:
            return
        if call is None:
            return
        call.dialog.invite_in = False
        if isinstance(call, InboundCall) and not call.acked.called:
            self._answered.pop(call.key, None)
            if ack.body:
                call.remote_sdp = ack.body  # late offer answered in the ACK
            call.acked.callback(call)

    def flow_in_use(self, flow: object) -> bool:
        """True while a dialog (a call, early or confirmed) holds stream connection ``flow``."""
        return any(call.flow is flow for call in self._dialogs.values())

    def ack_timeout(self, key: TransactionKey) -> None:
        """Our 2xx was never ACKed (64*T1): end the call with a BYE (§13.3.1.4)."""
        call = self._answered.pop(key, None)
        if call is None or call.terminated:
            return
        if not call.acked.called:
            call.acked.errback(CallRejected(408, "ACK Timeout"))
        self._dialog_request(call, "BYE").addErrback(lambda f: None)
        self._end_dialog(call, "ack-timeout")

    def server_terminated(self, key: TransactionKey) -> None:
        """A server transaction was forgotten: drop per-transaction records."""
        self._invites.pop(key, None)
        self._answered.pop(key, None)

    def _cancel_received(self, cancel: SipRequest, key: TransactionKey, cancels: TransactionKey | None) -> None:
        call = self._invites.get(cancels) if cancels is not None else None
        if call is None or call.final_sent:
            self._respond(key, cancel, 200, to_tag=call.dialog.local_tag if call else self._ids.tag())
            return
        self._respond(key, cancel, 200, to_tag=call.dialog.local_tag)
        call.cancelled = True
        self._respond_invite(call, 487, final=True)
        try:
            _call_listener(call.listener, "on_cancel")
        except Exception:
            self._log.failure("listener on_cancel failed")
        self._end_dialog(call, "cancel")
        if not call.acked.called:
            call.acked.errback(CallRejected(487, "Request Terminated"))
            call.acked.addErrback(lambda f: None)

    def _end_dialog(self, call: CallDialog, reason: str) -> None:
        self._dialogs.pop((call.dialog.call_id, call.dialog.local_tag), None)
        call._terminate(reason)

    def _in_dialog(self, request: SipRequest, key: TransactionKey, to_tag: str) -> None:
        call = self._dialogs.get((request.call_id, to_tag))
        if call is None or request.from_tag != call.dialog.remote_tag:
            self._respond(key, request, 481)
            return
        try:
            call.dialog.check_request(request)
        except DialogError as err:
            extra = [("Retry-After", "1")] if err.status == 500 and request.method == "INVITE" else []
            self._respond(key, request, err.status, headers=extra)
            return
        method = request.method
        listener = call.listener
        if method == "BYE":
            self._respond(key, request, 200)
            if isinstance(call, InboundCall) and not call.final_sent:
                self._respond_invite(call, 487, final=True)
            self._safe(listener, "on_bye", request)
            self._end_dialog(call, "bye-received")
        elif method in ("INVITE", "UPDATE"):
            self._offer_received(call, request, key)
        elif method == "INFO":
            self._respond(key, request, 200)
            self._safe(listener, "on_info", request)
        elif method == "MESSAGE":
            self._respond(key, request, 200)
            self._safe(listener, "on_message", request)
        elif method == "REFER":
            self._respond(key, request, 202)
            self._safe(listener, "on_refer", request)
        elif method == "NOTIFY":
            self._respond(key, request, 200)
            self._safe(listener, "on_notify", request)
        elif method in ("OPTIONS",):
            self._respond(key, request, 200, headers=[("Allow", ALLOW), ("Accept", "application/sdp")])
        elif method in ("PRACK", "SUBSCRIBE"):
            self._respond(key, request, 200)
        else:
            self._respond(key, request, 501, headers=[("Allow", ALLOW)])

    def _safe(self, listener: object | None, name: str, *args: object) -> None:
        try:
            _call_listener(listener, name, *args)
        except Exception:
            self._log.failure("listener {name} failed", name=name)

    def _offer_received(self, call: CallDialog, request: SipRequest, key: TransactionKey) -> None:
        """re-INVITE or UPDATE: refresh the target, ask the listener for an answer (RFC 3264 §8)."""
        is_invite = request.method == "INVITE"
        if is_invite:
            call.dialog.invite_in = True
        call.dialog.refresh_target(request)
        offer = request.body
        try:
            answer = _call_listener(call.listener, "on_reinvite", offer) if (offer or is_invite) else None
        except Exception:
            self._log.failure("listener on_reinvite failed")
            call.dialog.invite_in = False
            self._respond(key, request, 500)
            return
        if answer is None and (offer or is_invite):
            try:
                answer = answer_hold(call.local_sdp, offer) if offer and call.local_sdp else call.local_sdp
            except (SipParseError, ValueError):
                answer = b""
                if offer:
                    call.dialog.invite_in = False
                    self._respond(key, request, 488)
                    return
        body = _as_bytes(answer)
        if offer:
            call.remote_sdp = offer
        if body:
            call.local_sdp = body
        extra = [("Contact", call.dialog.local_contact), ("Allow", ALLOW), ("Supported", _SUPPORTED),
                 *_session_timer_headers(request)]
        self._respond(key, request, 200, headers=extra, body=body, content_type="application/sdp")

    # ------------------------------------------------------------ introspection

    def dialogs(self) -> list[CallDialog]:
        """Every live dialog (for /list and shutdown)."""
        return list(self._dialogs.values())

