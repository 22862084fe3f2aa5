"""RFC 3261 §17 transactions, sans-IO, on an injected clock.

Pure module.  The adapter feeds what it receives and the current time, gets
back a list of actions, and re-arms one timer at :meth:`TransactionLayer.deadline`::

    actions = layer.receive_datagram(data, addr, now)
    actions = layer.send_request(request, addr, now)[1]
    actions = layer.send_response(key, response, now)
    actions = layer.expire(now)            # when the clock reaches deadline()

Actions are small frozen dataclasses: :class:`Transmit` (bytes to an address),
:class:`DeliverRequest` / :class:`DeliverResponse` (to the transaction user),
:class:`TransactionTimeout` (Timer B/F: the TU synthesizes a 408; Timer H: the
ACK never came), :class:`AckTimeout` (no ACK for a 2xx), :class:`TransportError`,
:class:`TransactionTerminated` and :class:`MessageDropped` (for counters/logs).

Timers A-K use T1/T2/T4 from :class:`TimerConfig`; on reliable transports the
retransmission timers are not started and D/I/J/K are zero (§17.1.1.2 ff.).

INVITE transactions follow RFC 6026: a 2xx moves them to *Accepted* (Timer L/M
= 64*T1) instead of terminating, so 2xx retransmissions and forks still reach
the TU and retransmitted INVITEs are absorbed.  On the server side the layer
also retransmits the 2xx on the TU's behalf (§13.3.1.4: T1 doubling up to T2)
until the ACK arrives; the ACK itself, which is a new transaction, is matched
by Call-ID/CSeq/From-tag and delivered with ``server_txn_key=None``.

Server transactions stamp ``received``/``rport`` on the top Via of incoming
requests (§18.2.1, RFC 3581) and send responses to ``received:rport``.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Protocol

from activecall.sip.message import (
    MAGIC_COOKIE,
    Headers,
    SipParseError,
    SipRequest,
    SipResponse,
    Via,
    error_response,
    make_response,
    parse_message,
)
from activecall.sip.uri import is_ip_literal

__all__ = [
    "Address",
    "TimerConfig",
    "TransactionKey",
    "Transmit",
    "DeliverRequest",
    "DeliverResponse",
    "TransactionTimeout",
    "AckTimeout",
    "TransportError",
    "TransactionTerminated",
    "MessageDropped",
    "Action",
    "ClientTransaction",
    "ServerTransaction",
    "TransactionLayer",
    "BranchSource",
    "build_ack_for_non2xx",
    "build_cancel",
    "response_address",
    "stateless_response_address",
]

Address = tuple[str, int]


class BranchSource(Protocol):
    """Fresh Via branches and tags (``activecall.ids.IdSource`` is one)."""

    def branch(self) -> str:
        """Return ``z9hG4bK`` followed by a random token."""
        ...

    def tag(self) -> str:
        """Return a random To/From tag."""
        ...


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """RFC 3261 timer base values, in seconds (§17.1.1.1 and table 4)."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    trying_delay: float = 0.2  # INVITE server: send 100 if the TU is silent this long (§17.2.1)


@dataclass(frozen=True, slots=True)
class TransactionKey:
    """Identifies a transaction: branch, sent-by (server side only) and method (ACK counts as INVITE)."""

    branch: str
    sent_by: str
    method: str
    server: bool


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send ``data`` to ``addr``; report failures with :meth:`TransactionLayer.transport_failed`."""

    data: bytes
    addr: Address
    key: TransactionKey | None = None


@dataclass(frozen=True, slots=True)
class DeliverRequest:
    """A new request for the TU; ``server_txn_key`` is None for an ACK to a 2xx.

    ``cancels`` is set on a CANCEL that matched a pending INVITE: the TU answers
    the CANCEL with 200 and the INVITE with 487 (§9.2).
    """

    request: SipRequest
    server_txn_key: TransactionKey | None
    source: Address
    cancels: TransactionKey | None = None


@dataclass(frozen=True, slots=True)
class DeliverResponse:
    """A response for the TU's client transaction."""

    response: SipResponse
    client_txn_key: TransactionKey


@dataclass(frozen=True, slots=True)
class TransactionTimeout:
    """Timer B/F (client: answer yourself with 408) or Timer H (server: no ACK came)."""

    key: TransactionKey
    request: SipRequest


@dataclass(frozen=True, slots=True)
class AckTimeout:
    """A 2xx to an INVITE was retransmitted for 64*T1 with no ACK: the TU should send BYE."""

    key: TransactionKey
    response: SipResponse


@dataclass(frozen=True, slots=True)
class TransportError:
    """Sending failed; the transaction is gone (client TU: treat as 503)."""

    key: TransactionKey
    request: SipRequest


@dataclass(frozen=True, slots=True)
class TransactionTerminated:
    """The transaction reached Terminated and was forgotten."""

    key: TransactionKey


@dataclass(frozen=True, slots=True)
class MessageDropped:
    """A message was absorbed or discarded; ``reason`` says why (for counters and debug logs)."""

    reason: str
    source: Address | None = None


Action = (
    Transmit | DeliverRequest | DeliverResponse | TransactionTimeout | AckTimeout
    | TransportError | TransactionTerminated | MessageDropped
)


def response_address(via: Via, source: Address, reliable: bool) -> Address:
    """Where responses to a request with top ``via`` go (§18.2.2, RFC 3581 §4).

    Always an IP address: a ``maddr`` that is not an IP literal is ignored,
    and a ``received``/sent-by host that is a name (we do not resolve
    sent-by, RFC 3263 §5) or names another address than the packet's source
    is replaced by the source IP, which is the ``received`` §18.2.1 makes
    the server stamp.  The port is the RFC 3581 ``rport``, else the sent-by
    port, else 5060.
    """
    if reliable:
        return source
    maddr = via.param("maddr")
    if maddr and is_ip_literal(maddr):
        return _unbracket(maddr), via.port or 5060
    host = via.received or via.host
    if not is_ip_literal(host) or (via.received is not None and _unbracket(host).lower() != source[0].lower()):
        host = source[0]
    return _unbracket(host), via.rport or via.port or 5060


def stateless_response_address(via: Via, source: Address, reliable: bool) -> Address:
    """Where a stateless reply (400 for a request that failed to parse) goes.

    Nothing was stamped on such a request, so the source IP is the
    ``received`` (§18.2.2): the sent-by port unless ``rport`` asks for the
    source port (RFC 3581).  Never a host name.
    """
    if reliable or via.has_rport:
        return source
    return source[0], via.port or 5060


def _unbracket(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _copy_lines(src: Headers, dst: Headers, name: str) -> None:
    for value in src.get_all(name):
        dst.add(name, value)


def build_ack_for_non2xx(request: SipRequest, response: SipResponse) -> SipRequest:
    """The ACK a client transaction sends for a 300-699 to ``request`` (§17.1.1.3)."""
    headers = Headers()
    headers.add("Via", str(request.top_via))
    _copy_lines(request.headers, headers, "Route")
    headers.add("Max-Forwards", "70")
    _copy_lines(request.headers, headers, "From")
    _copy_lines(response.headers, headers, "To")
    headers.add("Call-ID", request.call_id)
    headers.add("CSeq", f"{request.cseq.seq} ACK")
    return SipRequest("ACK", request.uri.copy(), headers, b"")


def build_cancel(request: SipRequest) -> SipRequest:
    """A CANCEL for ``request`` (§9.1): same Request-URI, Call-ID, From, To, CSeq number, top Via and Route."""
    headers = Headers()
    headers.add("Via", str(request.top_via))
    _copy_lines(request.headers, headers, "Route")
    headers.add("Max-Forwards", "70")
    _copy_lines(request.headers, headers, "From")
    _copy_lines(request.headers, headers, "To")
    headers.add("Call-ID", request.call_id)
    headers.add("CSeq", f"{request.cseq.seq} CANCEL")
    return SipRequest("CANCEL", request.uri.copy(), headers, b"")


class _Transaction:
    """Timer bookkeeping shared by client and server transactions."""

    __slots__ = ("key", "request", "addr", "reliable", "cfg", "state", "timers", "armed", "_intervals")

    def __init__(self, key: TransactionKey, request: SipRequest, addr: Address, reliable: bool,
                 timers: TimerConfig) -> None:
        self.key = key
        self.request = request
        self.addr = addr
        self.reliable = reliable
        self.cfg = timers
        self.state = ""
        self.timers: dict[str, float] = {}
        # name -> due time already on the layer's timer heap
        self.armed: dict[str, float] = {}
        self._intervals: dict[str, float] = {}

    @property
    def terminated(self) -> bool:
        """Whether the transaction has reached Terminated."""
        return self.state == "terminated"

    def deadline(self) -> float | None:
        """Earliest pending timer, or None."""
        return min(self.timers.values()) if self.timers else None

    def _start_retransmit(self, name: str, now: float, interval: float) -> None:
        if not self.reliable:
            self._intervals[name] = interval
            self.timers[name] = now + interval

    def _start(self, name: str, now: float, duration: float) -> None:
        self.timers[name] = now + duration

    def _terminate(self) -> list[Action]:
        self.state = "terminated"
        self.timers.clear()
        return [TransactionTerminated(self.key)]

    def fire(self, name: str, at: float) -> list[Action]:
        """Run timer ``name`` that was due at ``at``."""
        del self.timers[name]
        return self._on_timer(name, at)

    def _on_timer(self, name: str, at: float) -> list[Action]:
        raise NotImplementedError


class ClientTransaction(_Transaction):
    """A client transaction (§17.1).

    INVITE::

        calling --1xx--> proceeding --2xx--> accepted --Timer M--> terminated
           |  \\--2xx--> accepted      \\--300-699 (send ACK)--> completed --Timer D--> terminated
           \\--Timer B / transport error--> terminated (timeout reported)

    non-INVITE::

        trying --1xx--> proceeding --final--> completed --Timer K--> terminated
           \\-- Timer F / transport error --> terminated (timeout reported)
    """

    __slots__ = ("is_invite", "_wire", "_ack", "last_response")

    def __init__(self, key: TransactionKey, request: SipRequest, addr: Address, reliable: bool,
                 timers: TimerConfig) -> None:
        super().__init__(key, request, addr, reliable, timers)
        self.is_invite = request.method == "INVITE"
        self._wire = request.serialize()
        self._ack: bytes | None = None
        self.last_response: SipResponse | None = None

    def start(self, now: float) -> list[Action]:
        """Send the request and arm Timers A+B or E+F."""
        t1 = self.cfg.t1
        if self.is_invite:
            self.state = "calling"
            self._start_retransmit("A", now, t1)
            self._start("B", now, 64 * t1)
        else:
            self.state = "trying"
            self._start_retransmit("E", now, t1)
            self._start("F", now, 64 * t1)
        return [Transmit(self._wire, self.addr, self.key)]

    def on_response(self, response: SipResponse, now: float) -> list[Action]:
        """Handle a response matched to this transaction."""
        status = response.status
        deliver = DeliverResponse(response, self.key)
        if self.is_invite:
            if self.state in ("calling", "proceeding"):
                self.last_response = response
                if status < 200:
                    self.state = "proceeding"
                    self.timers.pop("A", None)
                    self.timers.pop("B", None)
                    return [deliver]
                self.timers.clear()
                if status < 300:
                    self.state = "accepted"
                    self._start("M", now, 64 * self.cfg.t1)
                    return [deliver]
                self.state = "completed"
                self._ack = build_ack_for_non2xx(self.request, response).serialize()
                self._start("D", now, 0.0 if self.reliable else max(32.0, 64 * self.cfg.t1))
                return [Transmit(self._ack, self.addr, self.key), deliver]
            if self.state == "accepted" and 200 <= status < 300:
                return [deliver]  # a retransmission or a fork: the TU ACKs each
            if self.state == "completed" and status >= 300 and self._ack is not None:
                return [Transmit(self._ack, self.addr, self.key)]
            return [MessageDropped(f"{status} in {self.state} INVITE client transaction")]
        if self.state in ("trying", "proceeding"):
            self.last_response = response
            if status < 200:
                self.state = "proceeding"
                return [deliver]
            self.state = "completed"
            self.timers.clear()
            self._start("K", now, 0.0 if self.reliable else self.cfg.t4)
            return [deliver]
        return [MessageDropped(f"{status} retransmission absorbed")]

    def on_transport_error(self) -> list[Action]:
        """The transport failed to send: report and terminate."""
        return [TransportError(self.key, self.request), *self._terminate()]

    def _on_timer(self, name: str, at: float) -> list[Action]:
        if name == "A":
            interval = self._intervals["A"] * 2
            self._intervals["A"] = interval
            self.timers["A"] = at + interval
            return [Transmit(self._wire, self.addr, self.key)]
        if name == "E":
            # Trying: double up to T2; Proceeding: every T2 (§17.1.2.2).
            interval = self.cfg.t2 if self.state == "proceeding" else min(self._intervals["E"] * 2, self.cfg.t2)
            self._intervals["E"] = interval
            self.timers["E"] = at + interval
            return [Transmit(self._wire, self.addr, self.key)]
        if name in ("B", "F"):
            return [TransactionTimeout(self.key, self.request), *self._terminate()]
        return self._terminate()  # D, K, M


class ServerTransaction(_Transaction):
    """A server transaction (§17.2).

    INVITE::

        proceeding --1xx--> proceeding (100 after trying_delay if the TU is silent)
           |--2xx--> accepted (2xx resent until ACK) --Timer L--> terminated
           \\--300-699--> completed (Timer G resends) --ACK--> confirmed --Timer I--> terminated
                             \\--Timer H--> terminated (timeout reported)

    non-INVITE::

        trying --1xx--> proceeding --final--> completed --Timer J--> terminated
    """

    __slots__ = ("is_invite", "last_response", "_last_wire", "acked")

    def __init__(self, key: TransactionKey, request: SipRequest, addr: Address, reliable: bool,
                 timers: TimerConfig) -> None:
        super().__init__(key, request, addr, reliable, timers)
        self.is_invite = request.method == "INVITE"
        self.last_response: SipResponse | None = None
        self._last_wire: bytes | None = None
        self.acked = False

    def start(self, now: float) -> list[Action]:
        """Enter the initial state; an INVITE arms the 100 Trying timer."""
        if self.is_invite:
            self.state = "proceeding"
            self._start("trying", now, self.cfg.trying_delay)
        else:
            self.state = "trying"
        return []

    def _transmit(self) -> list[Action]:
        assert self._last_wire is not None
        return [Transmit(self._last_wire, self.addr, self.key)]

    def on_retransmission(self) -> list[Action]:
        """The request came again: resend the last response, or absorb it."""
        if self.state in ("proceeding", "completed") and self._last_wire is not None:
            return self._transmit()
        return [MessageDropped(f"{self.request.method} retransmission absorbed in {self.state}")]

    def on_ack(self, now: float) -> list[Action]:
        """An ACK matched this INVITE transaction by branch (ACK to a non-2xx)."""
        if self.state == "completed":
            self.state = "confirmed"
            self.timers.clear()
            self._start("I", now, 0.0 if self.reliable else self.cfg.t4)
            return [MessageDropped("ACK absorbed")]
        return [MessageDropped(f"ACK absorbed in {self.state}")]

    def ack_2xx(self) -> None:
        """The ACK for our 2xx arrived: stop retransmitting it."""
        self.acked = True
        self.timers.pop("G2xx", None)

    def send(self, response: SipResponse, now: float) -> list[Action]:
        """Send a response from the TU."""
        status = response.status
        wire = response.serialize()
        if self.state == "accepted" and 200 <= status < 300:
            return [Transmit(wire, self.addr, self.key)]  # TU resends the 2xx itself: fine
        if self.state not in ("proceeding", "trying"):
            raise ValueError(f"cannot send {status} in state {self.state}")
        self.timers.pop("trying", None)
        self.last_response = response
        self._last_wire = wire
        t1 = self.cfg.t1
        if status < 200:
            self.state = "proceeding"
        elif not self.is_invite:
            self.state = "completed"
            self._start("J", now, 0.0 if self.reliable else 64 * t1)
        elif status < 300:
            self.state = "accepted"
            self._start_retransmit("G2xx", now, t1)
            self._start("L", now, 64 * t1)
        else:
            self.state = "completed"
            self._start_retransmit("G", now, t1)
            self._start("H", now, 64 * t1)
        return self._transmit()

    def on_transport_error(self) -> list[Action]:
        """The transport failed to send: report and terminate."""
        return [TransportError(self.key, self.request), *self._terminate()]

    def _on_timer(self, name: str, at: float) -> list[Action]:
        if name == "trying":
            if self.state == "proceeding" and self._last_wire is None:
                self.last_response = make_response(self.request, 100)
                self._last_wire = self.last_response.serialize()
                return self._transmit()
            return []
        if name in ("G", "G2xx"):
            interval = min(self._intervals[name] * 2, self.cfg.t2)
            self._intervals[name] = interval
            self.timers[name] = at + interval
            return self._transmit()
        if name == "H":
            return [TransactionTimeout(self.key, self.request), *self._terminate()]
        if name == "L" and not self.acked and self.last_response is not None:
            return [AckTimeout(self.key, self.last_response), *self._terminate()]
        return self._terminate()  # I, J, L


def _is_rfc3261_branch(branch: str | None) -> bool:
    return bool(branch) and branch.startswith(MAGIC_COOKIE) and len(branch) > len(MAGIC_COOKIE)  # type: ignore[union-attr]


def _server_key(request: SipRequest) -> TransactionKey:
    """§17.2.3 matching key; RFC 2543 requests get one built from the identifying fields."""
    via = request.top_via
    method = "INVITE" if request.method in ("ACK",) else request.method
    sent_by = via.sent_by.lower()
    if _is_rfc3261_branch(via.branch):
        return TransactionKey(via.branch or "", sent_by, method, True)
    # RFC 2543: Request-URI, From tag, Call-ID, CSeq number and top Via identify it.
    # The To tag is left out so the ACK (which carries our tag) matches too.
    ident = "|".join((
        str(request.uri).lower(), request.from_tag or "", request.call_id,
        str(request.cseq.seq), str(via),
    ))
    return TransactionKey("2543:" + ident, sent_by, method, True)


class TransactionLayer:
    """All transactions of one UA: matching, timers, retransmissions (§17).

    Requests are mutated in place: :meth:`send_request` fills in the branch and
    ``rport`` of the top Via; :meth:`receive` stamps ``received``/``rport``.

    Timers live on one heap of ``(due, seq, transaction, name)``: after every
    call into a transaction its new timers are pushed; an entry whose timer
    was since cancelled or moved is dropped when it reaches the top.  So
    :meth:`deadline` and :meth:`expire` cost O(log n), not a scan of every
    transaction.
    """

    def __init__(self, ids: BranchSource, timers: TimerConfig | None = None) -> None:
        self._ids = ids
        self.timers = timers or TimerConfig()
        self._clients: dict[TransactionKey, ClientTransaction] = {}
        self._servers: dict[TransactionKey, ServerTransaction] = {}
        # (from-tag, Call-ID, CSeq number, CSeq method) -> server key, for merged requests (§8.2.2.2)
        self._merge_index: dict[tuple[str, str, int, str], TransactionKey] = {}
        # (Call-ID, CSeq number, From tag) -> INVITE server txn waiting for the ACK to its 2xx
        self._awaiting_ack: dict[tuple[str, int, str], TransactionKey] = {}
        # server key -> its entry in each of the two indexes above, to forget it in O(1)
        self._merge_ident: dict[TransactionKey, tuple[str, str, int, str]] = {}
        self._ack_ident: dict[TransactionKey, tuple[str, int, str]] = {}
        self._heap: list[tuple[float, int, _Transaction, str]] = []
        self._seq = itertools.count()

    # ------------------------------------------------------------ lookup

    def client_transaction(self, key: TransactionKey) -> ClientTransaction | None:
        """The live client transaction for ``key``, if any."""
        return self._clients.get(key)

    def server_transaction(self, key: TransactionKey) -> ServerTransaction | None:
        """The live server transaction for ``key``, if any."""
        return self._servers.get(key)

    def __len__(self) -> int:
        return len(self._clients) + len(self._servers)

    # ------------------------------------------------------------ sending

    def send_request(self, request: SipRequest, addr: Address, now: float, *,
                     reliable: bool = False) -> tuple[TransactionKey, list[Action]]:
        """Start a client transaction for ``request`` (not ACK; see :meth:`send_stateless`)."""
        if request.method == "ACK":
            raise ValueError("ACK has no client transaction; use send_stateless")
        if "Via" not in request.headers:
            raise ValueError("request needs a top Via (transport and sent-by)")
        via = request.top_via
        if not via.branch:
            via.set_param("branch", self._ids.branch())
        if not via.has_rport:
            via.set_param("rport", None)
        request.set_top_via(via)
        key = TransactionKey(via.branch or "", "", request.method, False)
        if key in self._clients:
            raise ValueError(f"a client transaction with branch {key.branch} exists")
        txn = ClientTransaction(key, request, addr, reliable, self.timers)
        self._clients[key] = txn
        return key, self._after(txn, txn.start(now))

    def send_response(self, key: TransactionKey, response: SipResponse, now: float) -> list[Action]:
        """Send the TU's response through server transaction ``key``."""
        txn = self._servers.get(key)
        if txn is None:
            raise ValueError(f"no server transaction {key}")
        actions = self._after(txn, txn.send(response, now))
        if txn.is_invite and 200 <= response.status < 300:
            req = txn.request
            ident = (req.call_id, req.cseq.seq, req.from_tag or "")
            self._awaiting_ack[ident] = key
            self._ack_ident[key] = ident
        return actions

    def send_stateless(self, message: SipRequest | SipResponse, addr: Address) -> list[Action]:
        """Transmit outside any transaction (ACK for 2xx, stateless error responses)."""
        return [Transmit(message.serialize(), addr, None)]

    def transport_failed(self, key: TransactionKey) -> list[Action]:
        """The adapter could not send for ``key``: fail that transaction."""
        txn: _Transaction | None = self._clients.get(key) or self._servers.get(key)
        if txn is None or txn.terminated:
            return []
        actions = txn.on_transport_error()  # type: ignore[attr-defined]
        self._forget(txn)
        return actions

    # ------------------------------------------------------------ receiving

    def receive_datagram(self, data: bytes, source: Address, now: float, *,
                         reliable: bool = False) -> list[Action]:
        """Parse and :meth:`receive` one datagram (or framed stream message).

        Unparseable requests are answered statelessly with 400/505/501 when
        they carry a Via; everything else that fails is dropped.
        """
        try:
            msg = parse_message(data)
        except SipParseError as err:
            response = error_response(err)
            if response is None:
                return [MessageDropped(f"unparseable: {err}", source)]
            try:
                via = err.partial.top_via  # type: ignore[union-attr]
                addr = stateless_response_address(via, source, reliable)
            except SipParseError:
                addr = source  # a broken Via: answer where it came from
            return [MessageDropped(f"unparseable: {err}", source), *self.send_stateless(response, addr)]
        return self.receive(msg, source, now, reliable=reliable)

    def receive(self, msg: SipRequest | SipResponse, source: Address, now: float, *,
                reliable: bool = False) -> list[Action]:
        """Match a parsed message to its transaction and act on it."""
        if isinstance(msg, SipResponse):
            return self._receive_response(msg, source, now)
        return self._receive_request(msg, source, now, reliable)

    def _receive_response(self, response: SipResponse, source: Address, now: float) -> list[Action]:
        via = response.top_via
        key = TransactionKey(via.branch or "", "", response.cseq.method, False)
        txn = self._clients.get(key)
        if txn is None:
            return [MessageDropped(f"stray {response.status} response", source)]
        return self._after(txn, txn.on_response(response, now))

    def _receive_request(self, request: SipRequest, source: Address, now: float,
                         reliable: bool) -> list[Action]:
        key = _server_key(request)
        self._stamp_via(request, source)
        addr = response_address(request.top_via, source, reliable)
        existing = self._servers.get(key)
        if request.method == "ACK":
            return self._receive_ack(request, existing, source, now)
        if existing is not None:
            return existing.on_retransmission()
        if request.method == "CANCEL":
            return self._receive_cancel(request, key, source, addr, now, reliable)
        txn = self._new_server(key, request, addr, reliable, now)
        merged = self._merged_with(request, key)
        if merged:
            # §8.2.2.2: same request reached us twice by different paths.
            txn.start(now)
            return self._after(txn, txn.send(make_response(request, 482, to_tag=self._ids.tag()), now))
        return [*self._after(txn, txn.start(now)), DeliverRequest(request, key, source)]

    def _stamp_via(self, request: SipRequest, source: Address) -> None:
        via = request.top_via
        host, port = source
        if via.has_rport:
            via.set_param("received", host)
            via.set_param("rport", str(port))
        elif via.host.strip("[]").lower() != host.lower() or via.param("received") is not None:
            # Also overwrite a ``received`` the client put there itself: responses
            # must not be reflected to an address of its choosing.
            via.set_param("received", host)
        else:
            return
        request.set_top_via(via)

    def _new_server(self, key: TransactionKey, request: SipRequest, addr: Address,
                    reliable: bool, now: float) -> ServerTransaction:
        txn = ServerTransaction(key, request, addr, reliable, self.timers)
        self._servers[key] = txn
        return txn

    def _merged_with(self, request: SipRequest, key: TransactionKey) -> bool:
        if request.to_tag is not None:
            return False
        cseq = request.cseq
        ident = (request.from_tag or "", request.call_id, cseq.seq, cseq.method)
        other = self._merge_index.get(ident)
        if other is not None and other != key and other in self._servers:
            return True
        self._merge_index[ident] = key
        self._merge_ident[key] = ident
        return False

    def _receive_ack(self, ack: SipRequest, txn: ServerTransaction | None, source: Address,
                     now: float) -> list[Action]:
        if txn is not None and txn.state != "accepted":
            return self._after(txn, txn.on_ack(now))
        ident = (ack.call_id, ack.cseq.seq, ack.from_tag or "")
        waiting = self._awaiting_ack.pop(ident, None)
        if waiting is not None:
            self._ack_ident.pop(waiting, None)
        invite = self._servers.get(waiting) if waiting else txn
        if invite is not None:
            invite.ack_2xx()
        return [DeliverRequest(ack, None, source)]

    def _receive_cancel(self, cancel: SipRequest, key: TransactionKey, source: Address,
                        addr: Address, now: float, reliable: bool) -> list[Action]:
        invite_key = TransactionKey(key.branch, key.sent_by, "INVITE", True)
        txn = self._new_server(key, cancel, addr, reliable, now)
        txn.start(now)
        invite = self._servers.get(invite_key)
        if invite is None:
            return self._after(txn, txn.send(make_response(cancel, 481, to_tag=self._ids.tag()), now))
        if invite.state != "proceeding":
            # Final response already sent: CANCEL has no effect but still gets a 200 (§9.2).
            return self._after(txn, txn.send(make_response(cancel, 200, to_tag=self._to_tag(invite)), now))
        return self._after(txn, [DeliverRequest(cancel, key, source, cancels=invite_key)])

    @staticmethod
    def _to_tag(txn: ServerTransaction) -> str | None:
        if txn.last_response is not None:
            try:
                return txn.last_response.to.tag
            except SipParseError:
                return None
        return None

    # ------------------------------------------------------------ timers

    def _after(self, txn: _Transaction, actions: list[Action]) -> list[Action]:
        """Push the timers ``txn`` armed since it was last seen; pass ``actions`` through."""
        armed = txn.armed
        for name, at in txn.timers.items():
            if armed.get(name) != at:
                armed[name] = at
                heapq.heappush(self._heap, (at, next(self._seq), txn, name))
        return actions

    @staticmethod
    def _live(txn: _Transaction, name: str, at: float) -> bool:
        return txn.timers.get(name) == at and txn.armed.get(name) == at

    def deadline(self) -> float | None:
        """When :meth:`expire` must next be called, or None if no timer is pending."""
        heap = self._heap
        while heap:
            at, _, txn, name = heap[0]
            if self._live(txn, name, at):
                return at
            heapq.heappop(heap)
            if txn.armed.get(name) == at:
                del txn.armed[name]
        return None

    def expire(self, now: float) -> list[Action]:
        """Fire every timer due at or before ``now``, oldest first."""
        actions: list[Action] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _, txn, name = heapq.heappop(heap)
            if not self._live(txn, name, at):
                if txn.armed.get(name) == at:
                    del txn.armed[name]
                continue
            del txn.armed[name]
            actions.extend(txn.fire(name, at))
            if txn.terminated:
                self._forget(txn)
            else:
                self._after(txn, actions)
        return actions

    def _forget(self, txn: _Transaction) -> None:
        if isinstance(txn, ClientTransaction):
            self._clients.pop(txn.key, None)
            return
        key = txn.key
        self._servers.pop(key, None)
        merge = self._merge_ident.pop(key, None)
        if merge is not None and self._merge_index.get(merge) == key:
            del self._merge_index[merge]
        ack = self._ack_ident.pop(key, None)
        if ack is not None and self._awaiting_ack.get(ack) == key:
            del self._awaiting_ack[ack]
