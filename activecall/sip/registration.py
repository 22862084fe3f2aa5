"""SIP registration client (config.md §7): REGISTER, refresh, retry and un-REGISTER.

Two layers live here:

* :class:`RegistrationMachine` is pure (no ``twisted.internet`` import, time is
  passed in as ``now``): one per ``[[register_users]]`` account.  Its inputs are
  :meth:`~RegistrationMachine.start`, :meth:`~RegistrationMachine.response`,
  :meth:`~RegistrationMachine.request_failed`, :meth:`~RegistrationMachine.timeout`,
  :meth:`~RegistrationMachine.stop` and
  :meth:`~RegistrationMachine.public_address_changed`; each returns a
  :class:`SendRegister` to transmit, or None.  :meth:`~RegistrationMachine.deadline`
  says when to call ``timeout`` next, :meth:`~RegistrationMachine.state` what to display.
* :class:`RegistrationService` is the Twisted adapter: a ``Service`` that owns a
  clock and one timer per account and talks to the SIP user agent through the
  :class:`RegistrationUserAgent` protocol (``request``/``local_contact``/``on_public_address``).

Behaviour (config.md §7, RFC 3261 §10.2):

* every REGISTER of an account shares one Call-ID and From tag, with CSeq
  increasing (§10.2.4); when the user agent answers a digest challenge it
  resends with a higher CSeq, and the next REGISTER continues above it;
* the Contact is the listener's (``sip:<username>@<host>:<port>``); over UDP,
  when the 2xx's top Via ``received``/``rport`` shows a different address, the
  Contact switches to it and REGISTER is repeated at once, removing the old
  Contact (``;expires=0``) in the same request;
* refresh when 75 % of the granted expiry (our Contact's ``expires`` parameter,
  else the ``Expires`` header, else what we asked for) has elapsed;
* ``423 Interval Too Brief``: ask again at once with ``Min-Expires``;
* any other failure (including 401/407 the user agent could not satisfy, a
  timeout, or a transport error): retry after the retry policy's delay, 60 s by
  default, or ``Retry-After`` when longer;
* on stop: ``Expires: 0`` for our Contact(s) when a binding may exist.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.config import Credential, RegisterUser
from activecall.sip.message import Headers, NameAddr, SipRequest, SipResponse, SipParseError
from activecall.sip.uri import SipUri, bounded_int, parse_uri, transport_for_uri

_MAX_DELTA_SECONDS = 2**32 - 1

__all__ = [
    "DEFAULT_EXPIRES_S",
    "REFRESH_FRACTION",
    "RETRY_INTERVAL_S",
    "RetryPolicy",
    "fixed_retry",
    "backoff_retry",
    "SendRegister",
    "RegistrationState",
    "RegistrationMachine",
    "RegistrationUserAgent",
    "RegistrationIds",
    "RegistrationService",
]

DEFAULT_EXPIRES_S = 3600
REFRESH_FRACTION = 0.75
RETRY_INTERVAL_S = 60.0
# Longer than two non-INVITE transactions (Timer F = 64*T1 = 32 s each: the challenge
# round and the authenticated retry), so it only fires when the user agent never answers.
RESPONSE_TIMEOUT_S = 80.0
# CSeq numbers left free after an abandoned request, for the digest retries the user
# agent may still make with it; responses in [pending, pending + window) are ours.
AUTH_CSEQ_WINDOW = 16
# Immediate re-REGISTERs for a newly learned address before we stop chasing it.
MAX_RELOCATIONS = 3

RetryPolicy = Callable[[int], float]
"""Seconds to wait before attempt ``failures + 1``, given consecutive ``failures`` (≥ 1)."""


def fixed_retry(interval_s: float = RETRY_INTERVAL_S,
                jitter: Callable[[], float] | None = None) -> RetryPolicy:
    """Retry every ``interval_s`` (config.md §7: 60 s), plus ``jitter()`` seconds if given."""

    def policy(failures: int) -> float:
        return interval_s + (jitter() if jitter is not None else 0.0)

    return policy


def backoff_retry(initial_s: float = 2.0, factor: float = 2.0, max_s: float = RETRY_INTERVAL_S,
                  jitter: Callable[[], float] | None = None) -> RetryPolicy:
    """Exponential backoff capped at ``max_s`` (``twisted.application.internet.backoffPolicy``)."""

    def policy(failures: int) -> float:
        delay = min(initial_s * factor ** min(max(failures - 1, 0), 64), max_s)
        return delay + (jitter() if jitter is not None else 0.0)

    return policy


@dataclass(frozen=True)
class SendRegister:
    """Output: send ``request`` (a REGISTER without Via: the user agent adds it)."""

    request: SipRequest
    call_id: str
    cseq: int
    expires: int
    contact: SipUri


@dataclass(frozen=True)
class RegistrationState:
    """What to display for one account; times are on the machine's clock.

    ``state`` is ``unregistered``, ``registering``, ``registered`` (also while a
    refresh is in flight), ``failed`` (waiting to retry) or ``unregistering``.
    """

    state: str
    status: int | None
    reason: str | None
    expires: int | None
    expires_at: float | None
    next_attempt: float | None
    contact: str
    failures: int


# ----------------------------------------------------------------------------- the machine


class _Inputs(Protocol):
    """Classified inputs of the automat machine (the public wrapper does the classifying)."""

    def begin(self, now: float) -> SendRegister | None:
        """Start registering."""

    def accepted(self, granted_s: int, now: float) -> SendRegister | None:
        """A 2xx granted ``granted_s`` for our Contact."""

    def accepted_elsewhere(self, granted_s: int, host: str, port: int,
                           now: float) -> SendRegister | None:
        """A 2xx that shows our public address is ``host:port``."""

    def too_brief(self, min_expires_s: int, now: float) -> SendRegister | None:
        """423 with a usable Min-Expires."""

    def rejected(self, status: int | None, reason: str, retry_after_s: float | None,
                 now: float) -> SendRegister | None:
        """Any other final failure, a timeout or a transport error."""

    def due(self, now: float) -> SendRegister | None:
        """The current deadline has passed."""

    def moved(self, host: str, port: int, now: float) -> SendRegister | None:
        """The user agent learned a new public address."""

    def finish(self, now: float) -> SendRegister | None:
        """Stop, removing a binding that may exist."""

    def abandon(self, now: float) -> SendRegister | None:
        """Stop; there is nothing to remove."""


class _Core:
    """The machine's data; transitions read and update it."""

    def __init__(self, account: RegisterUser, contact: SipUri, call_id: str, from_tag: str,
                 expires_s: int, retry: RetryPolicy, response_timeout_s: float,
                 user_agent: str | None, first_cseq: int) -> None:
        self.account = account
        server = parse_uri(account.server)
        self.transport = transport_for_uri(server)
        self.registrar = SipUri(server.scheme, host=server.host, port=server.port,
                                params=list(server.params))
        self.aor = SipUri(server.scheme, user=account.username, host=server.host, port=server.port)
        try:
            # A registrar at a private/loopback address sees our local address, so
            # public addresses other transactions reveal are nothing to it.
            self.registrar_is_local = not ipaddress.ip_address(server.host.strip("[]")).is_global
        except ValueError:
            self.registrar_is_local = False  # a host name: assume it is out there
        self.contact = contact.copy()
        self.call_id = call_id
        self.from_tag = from_tag
        self.expires_s = expires_s
        self.retry = retry
        self.response_timeout_s = response_timeout_s
        self.user_agent = user_agent
        self.next_cseq = first_cseq
        self.pending: int | None = None  # CSeq of the REGISTER in flight
        self.pending_expires = expires_s
        self.stale: list[SipUri] = []  # old Contacts to remove (;expires=0) in the next REGISTER
        self.moved_to: tuple[str, int] | None = None  # learned while a request was in flight
        self.relocations = 0
        self.phase = "idle"
        self.deadline: float | None = None
        self.status: int | None = None
        self.reason: str | None = None
        self.granted: int | None = None
        self.bound_until: float | None = None
        self.next_attempt: float | None = None
        self.failures = 0

    def bound(self, now: float) -> bool:
        """Whether a binding of ours may still exist at the registrar."""
        return self.bound_until is not None and now < self.bound_until

    def send(self, now: float, expires: int) -> SendRegister:
        """Build the next REGISTER and remember it as pending."""
        if self.pending is not None:  # leave room for the abandoned request's auth retries
            self.next_cseq = max(self.next_cseq, self.pending + AUTH_CSEQ_WINDOW)
        cseq = self.next_cseq
        self.next_cseq += 1
        self.pending = cseq
        self.pending_expires = expires
        self.deadline = now + self.response_timeout_s
        self.next_attempt = None
        headers = Headers([
            ("From", str(NameAddr(self.aor.copy(), params=[("tag", self.from_tag)]))),
            ("To", str(NameAddr(self.aor.copy()))),
            ("Call-ID", self.call_id),
            ("CSeq", f"{cseq} REGISTER"),
            ("Max-Forwards", "70"),
            ("Contact", str(NameAddr(self.contact.copy()))),
        ])
        for old in self.stale:
            headers.add("Contact", str(NameAddr(old.copy(), params=[("expires", "0")])))
        headers.add("Expires", str(expires))
        if self.user_agent:
            headers.add("User-Agent", self.user_agent)
        request = SipRequest("REGISTER", self.registrar.copy(), headers)
        return SendRegister(request, self.call_id, cseq, expires, self.contact.copy())

    def relocate(self, host: str, port: int) -> None:
        """Use ``host:port`` in the Contact from now on; the old one is removed next time."""
        if not any(_same_contact(self.contact, s) for s in self.stale):
            self.stale.append(self.contact.copy())
        self.contact.host = f"[{host}]" if ":" in host else host
        self.contact.port = port
        self.moved_to = None

    def fail(self, status: int | None, reason: str, retry_after_s: float | None,
             now: float) -> None:
        """Record a failure and schedule the retry."""
        self.pending = None
        self.status = status
        self.reason = reason
        self.failures += 1
        delay = self.retry(self.failures)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        self.phase = "failed"
        self.deadline = self.next_attempt = now + delay

    def stopped(self) -> None:
        """Terminal bookkeeping."""
        self.pending = None
        self.phase = "stopped"
        self.deadline = self.next_attempt = None
        self.bound_until = None
        self.granted = None


def _build_machine() -> Callable[[_Core], _Inputs]:
    """Describe the REGISTER state machine with automat (diagram above)."""
    builder = TypeMachineBuilder(_Inputs, _Core)
    idle = builder.state("idle")
    registering = builder.state("registering")
    registered = builder.state("registered")
    failed = builder.state("failed")
    unregistering = builder.state("unregistering")
    stopped = builder.state("stopped")

    def send_registration(inputs: _Inputs, core: _Core, now: float) -> SendRegister | None:
        core.phase = "registering"
        return core.send(now, core.expires_s)

    idle.upon(_Inputs.begin).to(registering)(send_registration)
    failed.upon(_Inputs.due).to(registering)(send_registration)
    registered.upon(_Inputs.due).to(registering)(send_registration)

    @registering.upon(_Inputs.accepted).to(registered)
    def _accepted(inputs: _Inputs, core: _Core, granted_s: int, now: float) -> SendRegister | None:
        core.pending = None
        core.phase = "registered"
        core.failures = core.relocations = 0
        core.stale.clear()
        core.granted = granted_s
        core.bound_until = now + granted_s
        core.deadline = core.next_attempt = now + REFRESH_FRACTION * granted_s
        return None

    @registering.upon(_Inputs.accepted_elsewhere).loop()
    def _elsewhere(inputs: _Inputs, core: _Core, granted_s: int, host: str, port: int,
                   now: float) -> SendRegister | None:
        core.granted = granted_s
        core.bound_until = now + granted_s
        core.relocations += 1
        core.relocate(host, port)
        return core.send(now, core.expires_s)

    @registering.upon(_Inputs.too_brief).loop()
    def _too_brief(inputs: _Inputs, core: _Core, min_expires_s: int,
                   now: float) -> SendRegister | None:
        core.expires_s = min_expires_s
        return core.send(now, core.expires_s)

    @registering.upon(_Inputs.rejected).to(failed)
    def _rejected(inputs: _Inputs, core: _Core, status: int | None, reason: str,
                  retry_after_s: float | None, now: float) -> SendRegister | None:
        core.fail(status, reason, retry_after_s, now)
        return None

    @registering.upon(_Inputs.due).to(failed)
    def _no_answer(inputs: _Inputs, core: _Core, now: float) -> SendRegister | None:
        core.fail(408, "no response", None, now)
        return None

    @registering.upon(_Inputs.moved).loop()
    def _moved_in_flight(inputs: _Inputs, core: _Core, host: str, port: int,
                         now: float) -> SendRegister | None:
        core.moved_to = (host, port)  # applied when the pending REGISTER completes
        return None

    @registered.upon(_Inputs.moved).to(registering)
    def _moved_registered(inputs: _Inputs, core: _Core, host: str, port: int,
                          now: float) -> SendRegister | None:
        core.relocate(host, port)
        core.phase = "registering"
        return core.send(now, core.expires_s)

    def update_contact(inputs: _Inputs, core: _Core, host: str, port: int,
                       now: float) -> SendRegister | None:
        core.contact.host = f"[{host}]" if ":" in host else host
        core.contact.port = port
        return None

    idle.upon(_Inputs.moved).loop()(update_contact)

    @failed.upon(_Inputs.moved).loop()
    def _moved_failed(inputs: _Inputs, core: _Core, host: str, port: int,
                      now: float) -> SendRegister | None:
        if core.bound(now):
            core.relocate(host, port)  # the old binding may be alive: remove it on the retry
        else:
            update_contact(inputs, core, host, port, now)
        return None

    def unregister(inputs: _Inputs, core: _Core, now: float) -> SendRegister | None:
        core.phase = "unregistering"
        return core.send(now, 0)

    for state in (registering, registered, failed):
        state.upon(_Inputs.finish).to(unregistering)(unregister)

    def abandon(inputs: _Inputs, core: _Core, now: float) -> SendRegister | None:
        core.stopped()
        return None

    for state in (idle, registered, failed):
        state.upon(_Inputs.abandon).to(stopped)(abandon)

    def unregistered(inputs: _Inputs, core: _Core, *args: Any) -> SendRegister | None:
        core.stopped()
        return None

    for name in ("accepted", "accepted_elsewhere", "too_brief", "rejected", "due"):
        unregistering.upon(getattr(_Inputs, name)).to(stopped)(unregistered)
    for name in ("moved", "finish", "abandon"):
        unregistering.upon(getattr(_Inputs, name)).loop().returns(None)
    for name in ("begin", "accepted", "accepted_elsewhere", "too_brief", "rejected", "due",
                 "moved", "finish", "abandon"):
        stopped.upon(getattr(_Inputs, name)).loop().returns(None)
    idle.upon(_Inputs.due).loop().returns(None)
    return builder.build()


_Machine = _build_machine()


def _same_host(a: str, b: str) -> bool:
    """Compare hosts, as addresses when both are IP literals."""
    a, b = a.strip("[]"), b.strip("[]")
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower() == b.lower()


def _same_contact(a: SipUri, b: SipUri) -> bool:
    """Whether two Contact URIs name the same user at the same host and port."""
    ha, pa = a.host_port()
    hb, pb = b.host_port()
    return a.user == b.user and pa == pb and _same_host(ha, hb)


def _int_header(headers: Headers, name: str) -> int | None:
    """A non-negative integer header (Expires, Min-Expires, Retry-After), or None."""
    value = headers.get(name)
    if value is None:
        return None
    digits = value.split(";", 1)[0].split("(", 1)[0].strip()
    return _delta_seconds(digits)


def _delta_seconds(text: str) -> int | None:
    """RFC 3261 delta-seconds (ASCII digits, capped at 2**32-1 as §25.1 allows), or None."""
    try:
        return bounded_int(text, "delta-seconds", _MAX_DELTA_SECONDS)
    except SipParseError:
        return _MAX_DELTA_SECONDS if text.isascii() and text.isdigit() else None


class RegistrationMachine:
    """REGISTER state for one ``[[register_users]]`` account (pure; see the module docstring).

    ``contact`` is the listener's Contact URI for the account's transport;
    ``call_id`` and ``from_tag`` come from the caller's id source.  Every
    input returns the REGISTER to send, if any; after each, re-arm one timer
    at :meth:`deadline` and call :meth:`timeout` when it fires.

    The automat machine behind it (``=>`` means a REGISTER is returned)::

        idle          --start => Expires: N------------------> registering
        registering   --2xx----------------------------------> registered
        registering   --2xx showing a new address => N-------> registering
                        (new Contact, old one ;expires=0)
        registering   --423 with a larger Min-Expires => M---> registering
        registering   --other final / error / no answer------> failed
        registered    --75 % of the granted expiry => N------> registering
        registered    --public address changed => N----------> registering
        failed        --retry delay elapsed => N-------------> registering
        registering,
        registered,
        failed        --stop, binding may exist => Expires: 0> unregistering
        idle, registered,
        failed        --stop, nothing bound------------------> stopped
        unregistering --any final / error / no answer--------> stopped

    While a refresh is in flight the machine is in *registering* but
    :meth:`state` shows ``registered``: the binding still holds.
    """

    def __init__(self, account: RegisterUser, contact: SipUri, *, call_id: str, from_tag: str,
                 expires_s: int = DEFAULT_EXPIRES_S, retry: RetryPolicy | None = None,
                 response_timeout_s: float = RESPONSE_TIMEOUT_S, user_agent: str | None = None,
                 first_cseq: int = 1) -> None:
        self._core = _Core(account, contact, call_id, from_tag, expires_s,
                           retry or fixed_retry(), response_timeout_s, user_agent, first_cseq)
        self._machine = _Machine(self._core)

    # -------------------------------------------------------------- read-only views

    @property
    def account(self) -> RegisterUser:
        """The configuration entry."""
        return self._core.account

    @property
    def transport(self) -> str:
        """``udp``, ``tls`` (or another ``;transport=``) from the registrar URI."""
        return self._core.transport

    @property
    def aor(self) -> SipUri:
        """The address of record, ``sip:<username>@<server>``."""
        return self._core.aor.copy()

    @property
    def call_id(self) -> str:
        """The Call-ID shared by every REGISTER of this account."""
        return self._core.call_id

    @property
    def contact(self) -> SipUri:
        """The Contact currently registered (or to be)."""
        return self._core.contact.copy()

    @property
    def phase(self) -> str:
        """The machine state: idle, registering, registered, failed, unregistering, stopped."""
        return self._core.phase

    def deadline(self) -> float | None:
        """When :meth:`timeout` must be called next, or None."""
        return self._core.deadline

    def state(self, now: float) -> RegistrationState:
        """A snapshot for logs and ``GET /registrations``."""
        core = self._core
        phase = core.phase
        if phase in ("idle", "stopped"):
            shown = "unregistered"
        elif phase == "registering" and core.bound(now):
            shown = "registered"  # a refresh is in flight; the binding still holds
        else:
            shown = phase
        bound = core.bound(now)
        return RegistrationState(
            state=shown,
            status=core.status,
            reason=core.reason,
            expires=core.granted if bound else None,
            expires_at=core.bound_until if bound else None,
            next_attempt=core.next_attempt,
            contact=str(core.contact),
            failures=core.failures,
        )

    # -------------------------------------------------------------- inputs

    def start(self, now: float) -> SendRegister | None:
        """Begin: the first REGISTER (a second call does nothing)."""
        if self._core.phase != "idle":
            return None
        return self._machine.begin(now)

    def timeout(self, now: float) -> SendRegister | None:
        """The timer armed at :meth:`deadline` fired (early calls are ignored)."""
        deadline = self._core.deadline
        if deadline is None or now < deadline:
            return None
        return self._machine.due(now)

    def stop(self, now: float) -> SendRegister | None:
        """Shut down: the ``Expires: 0`` REGISTER when a binding may exist, else nothing."""
        core = self._core
        if core.phase in ("unregistering", "stopped"):
            return None
        if core.pending is not None or core.bound(now):
            return self._machine.finish(now)
        return self._machine.abandon(now)

    def public_address_changed(self, host: str, port: int, now: float) -> SendRegister | None:
        """The user agent learned our public address; UDP accounts re-REGISTER with it.

        Ignored for TLS/TCP accounts and for registrars at private or loopback
        IP addresses (their own responses tell us what they see).
        """
        core = self._core
        if core.transport != "udp" or core.registrar_is_local or self._at_contact(host, port):
            return None
        return self._machine.moved(host, port, now)

    def request_failed(self, cseq: int, reason: str, now: float) -> SendRegister | None:
        """The REGISTER with ``cseq`` could not be sent or never got a response."""
        pending = self._core.pending
        if pending is None or not pending <= cseq < pending + AUTH_CSEQ_WINDOW:
            return None
        return self._machine.rejected(None, reason, None, now)

    def response(self, response: SipResponse, now: float) -> SendRegister | None:
        """A final response to one of our REGISTERs (stale or foreign ones are ignored)."""
        core = self._core
        try:
            cseq = response.cseq
            call_id = response.call_id
        except SipParseError:
            return None
        if (core.pending is None or call_id != core.call_id or cseq.method != "REGISTER"
                or not core.pending <= cseq.seq < core.pending + AUTH_CSEQ_WINDOW
                or response.status < 200):
            return None
        core.next_cseq = max(core.next_cseq, cseq.seq + 1)
        core.pending = None  # answered: the next REGISTER needs no CSeq gap
        core.status = response.status
        core.reason = response.reason
        status = response.status
        if 200 <= status < 300:
            if core.pending_expires == 0:
                return self._machine.accepted(0, now)
            granted = self._granted(response)
            if granted <= 0:
                return self._machine.rejected(status, "registrar kept no binding", None, now)
            # The registrar's own view (Via received/rport) is the freshest; a notice
            # from the UA that arrived meanwhile only counts when the Via says nothing.
            learned = self._learned(response) or core.moved_to
            core.moved_to = None
            if (learned is not None and not self._at_contact(*learned)
                    and core.relocations < MAX_RELOCATIONS):
                return self._machine.accepted_elsewhere(granted, learned[0], learned[1], now)
            return self._machine.accepted(granted, now)
        if status == 423:
            minimum = _int_header(response.headers, "Min-Expires")
            if minimum is not None and minimum > core.pending_expires:
                return self._machine.too_brief(minimum, now)
        retry_after = _int_header(response.headers, "Retry-After")
        return self._machine.rejected(
            status, response.reason, None if retry_after is None else float(retry_after), now
        )

    # -------------------------------------------------------------- helpers

    def _at_contact(self, host: str, port: int) -> bool:
        chost, cport = self._core.contact.host_port()
        return cport == port and _same_host(chost, host)

    def _granted(self, response: SipResponse) -> int:
        """Our Contact's ``expires``, else the Expires header, else what we asked for."""
        core = self._core
        try:
            contacts = response.contacts
        except SipParseError:
            contacts = []
        if contacts != "*":
            for entry in contacts:
                if _same_contact(entry.uri, core.contact):
                    value = entry.param("expires")
                    granted = None if value is None else _delta_seconds(value)
                    if granted is not None:
                        return granted
        header = _int_header(response.headers, "Expires")
        return header if header is not None else core.pending_expires

    def _learned(self, response: SipResponse) -> tuple[str, int] | None:
        """Our address as the registrar saw it (top Via received/rport), UDP only."""
        if self._core.transport != "udp":
            return None
        try:
            via = response.top_via
        except SipParseError:
            return None
        if via.received is None and via.rport is None:
            return None
        host = via.received or via.host
        port = via.rport or via.port or 5060
        return host.strip("[]"), port


# ----------------------------------------------------------------------------- the adapter


class RegistrationUserAgent(Protocol):
    """What :class:`RegistrationService` needs from the SIP user agent."""

    def request(self, request: SipRequest, destination: Any = None, *,
                credentials: Credential | None = None) -> Deferred[SipResponse]:
        """Send an out-of-dialog request (adding Via); fire with the final response.

        With ``credentials`` the user agent answers 401/407 with digest itself.
        """

    def local_contact(self, transport: str = "udp", user: str | None = None) -> SipUri:
        """The Contact URI of the listener for ``transport``; raise if there is none."""

    def on_public_address(self, callback: Callable[[str, int], None]) -> None:
        """Call ``callback(host, port)`` when a UDP response reveals a new public address."""


class RegistrationIds(Protocol):
    """Random identifiers (``activecall.ids.IdSource`` is one)."""

    def call_id(self) -> str:
        """A fresh Call-ID."""

    def tag(self) -> str:
        """A fresh From tag."""


@dataclass
class _Account:
    """Adapter state for one configured entry."""

    config: RegisterUser
    machine: RegistrationMachine | None = None
    skipped: str | None = None  # why there is no machine
    timer: IDelayedCall | None = None
    done: Deferred[None] | None = None
    shown: tuple[object, ...] = ()


def _utc(seconds: float | None) -> str | None:
    """RFC 3339 UTC text for a clock reading (the reactor's clock is the epoch clock)."""
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z")


def _seconds_until(at: float | None, now: float) -> int | None:
    """Whole seconds from ``now`` to ``at`` (never negative), or None."""
    return None if at is None else max(0, round(at - now))


class RegistrationService(Service):
    """Registers every enabled ``[[register_users]]`` entry while running.

    ``startService`` sends the first REGISTERs; ``stopService`` sends the
    ``Expires: 0`` ones and returns a Deferred that fires when all are
    answered, or after ``stop_timeout_s`` at the latest.  State changes are
    logged; :meth:`registrations_json` is the body of ``GET /registrations``
    (docs/registrations.md).
    """

    _log = Logger()

    def __init__(self, ua: RegistrationUserAgent, accounts: Sequence[RegisterUser],
                 clock: IReactorTime, ids: RegistrationIds, *,
                 expires_s: int = DEFAULT_EXPIRES_S, retry: RetryPolicy | None = None,
                 stop_timeout_s: float = 5.0, user_agent: str | None = None) -> None:
        self.setName("registrations")
        self._ua = ua
        self._clock = clock
        self._ids = ids
        self._expires_s = expires_s
        self._retry = retry
        self._stop_timeout_s = stop_timeout_s
        self._user_agent = user_agent
        self._accounts = [_Account(a) for a in accounts]
        self._subscribed = False

    # -------------------------------------------------------------- Service

    def startService(self) -> None:
        """Create a machine per enabled entry with a listener and send its REGISTER."""
        super().startService()
        if not self._subscribed:
            self._ua.on_public_address(self._public_address)
            self._subscribed = True
        for account in self._accounts:
            account.machine, account.skipped, account.shown = None, None, ()
            config = account.config
            if config.disabled:
                account.skipped = "disabled"
                self._log.info("registration {server} {username}: disabled, skipped",
                               server=config.server, username=config.username)
                continue
            transport = "?"
            try:
                transport = transport_for_uri(parse_uri(config.server))
                contact = self._ua.local_contact(transport, user=config.username)
            except Exception as e:  # adapter boundary: whatever the UA raises means "no listener"
                account.skipped = f"no listener: {e}"
                self._log.warn(
                    "registration {server} {username}: no {transport} listener, skipped ({error})",
                    server=config.server, username=config.username,
                    transport=transport, error=str(e))
                continue
            account.machine = RegistrationMachine(
                config, contact, call_id=self._ids.call_id(), from_tag=self._ids.tag(),
                expires_s=self._expires_s, retry=self._retry, user_agent=self._user_agent,
            )
            self._apply(account, account.machine.start(self._clock.seconds()))

    def stopService(self) -> Deferred[None]:
        """Un-REGISTER everything and wait (bounded) for the answers."""
        super().stopService()
        waits: list[Deferred[None]] = []
        now = self._clock.seconds()
        for account in self._accounts:
            machine = account.machine
            if machine is None:
                continue
            send = machine.stop(now)
            if machine.phase == "unregistering":
                account.done = Deferred()
                waits.append(account.done)
            self._apply(account, send)
        if not waits:
            self._cancel_timers()
            return succeed(None)

        finished: Deferred[None] = Deferred()
        timer = self._clock.callLater(self._stop_timeout_s, self._stop_timed_out, finished)

        def all_done(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not finished.called:
                finished.callback(None)

        DeferredList(waits).addCallback(all_done)
        finished.addCallback(lambda _: self._cancel_timers())
        return finished

    def _stop_timed_out(self, finished: Deferred[None]) -> None:
        pending = [a.config.server for a in self._accounts
                   if a.machine is not None and a.machine.phase == "unregistering"]
        self._log.warn("un-REGISTER unanswered after {timeout_s}s: {servers}",
                       timeout_s=self._stop_timeout_s, servers=pending)
        if not finished.called:
            finished.callback(None)

    def _cancel_timers(self) -> None:
        for account in self._accounts:
            if account.timer is not None and account.timer.active():
                account.timer.cancel()
            account.timer = None

    # -------------------------------------------------------------- driving the machines

    def _apply(self, account: _Account, send: SendRegister | None) -> None:
        """Send what the machine asked for, re-arm its timer and log changes."""
        machine = account.machine
        assert machine is not None
        if send is not None:
            self._send(account, send)
        if account.timer is not None and account.timer.active():
            account.timer.cancel()
        account.timer = None
        deadline = machine.deadline()
        if deadline is not None:
            delay = max(0.0, deadline - self._clock.seconds())
            account.timer = self._clock.callLater(delay, self._timer_fired, account)
        self._log_change(account)
        if machine.phase == "stopped" and account.done is not None and not account.done.called:
            account.done.callback(None)

    def _send(self, account: _Account, send: SendRegister) -> None:
        credentials = account.config.credential
        d = maybeDeferred(self._ua.request, send.request, None, credentials=credentials)

        def answered(response: SipResponse) -> None:
            machine = account.machine
            if machine is not None:
                self._apply(account, machine.response(response, self._clock.seconds()))

        def failed(failure: Failure) -> None:
            machine = account.machine
            self._log.debug("REGISTER to {server} failed: {error}",
                            server=account.config.server, error=failure.getErrorMessage())
            if machine is not None:
                reason = failure.getErrorMessage() or failure.type.__name__
                now = self._clock.seconds()
                self._apply(account, machine.request_failed(send.cseq, reason, now))

        d.addCallbacks(answered, failed)
        d.addErrback(lambda f: self._log.failure("registration handling failed", f))

    def _timer_fired(self, account: _Account) -> None:
        account.timer = None
        if account.machine is not None:
            self._apply(account, account.machine.timeout(self._clock.seconds()))

    def _public_address(self, host: str, port: int) -> None:
        if not self.running:
            return
        now = self._clock.seconds()
        for account in self._accounts:
            if account.machine is not None:
                self._apply(account, account.machine.public_address_changed(host, port, now))

    def _log_change(self, account: _Account) -> None:
        machine = account.machine
        assert machine is not None
        now = self._clock.seconds()
        state = machine.state(now)
        shown = (state.state, state.status, state.contact)
        if shown == account.shown:
            return
        account.shown = shown
        next_s = None if state.next_attempt is None else round(state.next_attempt - now, 1)
        fields = dict(aor=str(machine.aor), state=state.state, status=state.status,
                      reason=state.reason, contact=state.contact, expires=state.expires,
                      next_s=next_s)
        if state.state == "failed":
            self._log.warn("registration {aor}: failed ({status} {reason}); retry in {next_s}s",
                           **fields)
        else:
            self._log.info("registration {aor}: {state} ({status} {reason}) contact {contact}, "
                           "expires {expires}s, next REGISTER in {next_s}s", **fields)

    # -------------------------------------------------------------- views

    def registrations(self) -> list[RegistrationState | None]:
        """Each configured entry's state (None when disabled or skipped), in file order."""
        now = self._clock.seconds()
        return [None if a.machine is None else a.machine.state(now) for a in self._accounts]

    def registrations_json(self) -> list[dict[str, object]]:
        """The ``GET /registrations`` body: one object per entry (docs/registrations.md)."""
        now = self._clock.seconds()
        out: list[dict[str, object]] = []
        for account in self._accounts:
            config = account.config
            server = parse_uri(config.server)
            item: dict[str, object] = {
                "server": config.server,
                "username": config.username,
                "aor": str(SipUri(server.scheme, user=config.username, host=server.host,
                                  port=server.port)),
                "transport": transport_for_uri(server),
            }
            machine = account.machine
            if machine is None:
                if account.skipped is None:
                    shown = "unregistered"  # not started yet
                else:
                    shown = "disabled" if account.skipped == "disabled" else "skipped"
                item.update(state=shown, status=None, reason=account.skipped, contact=None,
                            expires=None,
                            expires_at=None, expires_in=None, next_attempt=None,
                            next_attempt_in=None, failures=0)
            else:
                s = machine.state(now)
                item.update(
                    state=s.state, status=s.status, reason=s.reason, contact=s.contact,
                    expires=s.expires, expires_at=_utc(s.expires_at),
                    expires_in=_seconds_until(s.expires_at, now),
                    next_attempt=_utc(s.next_attempt),
                    next_attempt_in=_seconds_until(s.next_attempt, now),
                    failures=s.failures,
                )
            out.append(item)
        return out

