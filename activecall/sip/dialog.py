"""RFC 3261 §12 dialogs: identity, CSeq, route set, remote target, in-dialog requests.

Pure module: no I/O, no clock.  A :class:`Dialog` is built from the INVITE and
its response (:meth:`Dialog.for_uac` / :meth:`Dialog.for_uas`) and then builds
every in-dialog request (:meth:`Dialog.create_request`), checks incoming ones
(:meth:`Dialog.check_request`) and keeps the RFC 3261/3264 rules on re-INVITEs
(one INVITE transaction in each direction at a time, 491 on glare).

The Via header is left to the caller: it depends on the transport chosen for
:meth:`Dialog.next_hop`.

States::

    early --2xx--> confirmed --BYE (sent or received)--> terminated
      \\--non-2xx / CANCEL--> terminated
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from activecall.sip.message import (
    Headers,
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
)
from activecall.sdp.model import DIRECTIONS, SdpParseError, parse_sdp
from activecall.sip.uri import SipUri

__all__ = [
    "Dialog",
    "DialogError",
    "dialog_id",
    "answer_direction",
    "answer_hold",
    "set_direction",
]


class DialogError(ValueError):
    """An in-dialog request cannot be built or accepted now (``status`` is the response to send)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


def dialog_id(call_id: str, from_tag: str, to_tag: str) -> str:
    """``{Call-ID}-{larger tag}-{smaller tag}`` (protocol.md §1.4; byte order, so symmetric)."""
    a = from_tag.encode("utf-8", "surrogateescape")
    b = to_tag.encode("utf-8", "surrogateescape")
    larger, smaller = (from_tag, to_tag) if a >= b else (to_tag, from_tag)
    return f"{call_id}-{larger}-{smaller}"


def _contact_uri(message: SipRequest | SipResponse) -> SipUri | None:
    try:
        contacts = message.contacts
    except SipParseError:
        return None
    if contacts == "*" or not contacts:
        return None
    return contacts[0].uri


@dataclass
class Dialog:
    """State of one dialog, seen from our side (``local`` = us).

    ``local_seq`` is the CSeq of the last request we sent; ``remote_seq`` the
    highest CSeq received (None until the peer sends an in-dialog request).
    ``route_set`` is kept in the order we send it (§12.1.1 reverses the
    Record-Route of a response for a UAC).
    """

    call_id: str
    local_tag: str
    remote_tag: str
    local_party: NameAddr
    remote_party: NameAddr
    remote_target: SipUri
    route_set: list[NameAddr] = field(default_factory=list)
    local_seq: int = 0
    remote_seq: int | None = None
    is_uac: bool = True
    secure: bool = False
    state: str = "early"
    local_contact: str = ""
    # Offer/answer bookkeeping for re-INVITE glare (§14.1, RFC 3264 §4).
    invite_out: bool = False
    invite_in: bool = False

    # ------------------------------------------------------------ creation

    @classmethod
    def for_uac(cls, request: SipRequest, response: SipResponse, *, local_contact: str = "") -> Dialog:
        """The dialog a 1xx/2xx with a To tag creates for the INVITE we sent (§12.1.2)."""
        to = response.to
        if to.tag is None:
            raise DialogError("response without a To tag cannot create a dialog")
        target = _contact_uri(response) or request.uri.copy()
        routes = list(reversed(response.record_routes))
        from_ = request.from_
        return cls(
            call_id=request.call_id,
            local_tag=from_.tag or "",
            remote_tag=to.tag,
            local_party=from_,
            remote_party=to,
            remote_target=target,
            route_set=routes,
            local_seq=request.cseq.seq,
            is_uac=True,
            secure=request.uri.scheme.lower() == "sips",
            state="confirmed" if 200 <= response.status < 300 else "early",
            local_contact=local_contact,
        )

    @classmethod
    def for_uas(cls, request: SipRequest, local_tag: str, *, local_contact: str = "") -> Dialog:
        """The dialog we create by answering ``request`` with our ``local_tag`` (§12.1.1)."""
        from_ = request.from_
        target = _contact_uri(request)
        if target is None:
            raise DialogError("INVITE without a usable Contact", status=400)
        return cls(
            call_id=request.call_id,
            local_tag=local_tag,
            remote_tag=from_.tag or "",
            local_party=request.to.with_tag(local_tag),
            remote_party=from_,
            remote_target=target,
            route_set=list(request.record_routes),
            local_seq=0,
            remote_seq=request.cseq.seq,
            is_uac=False,
            secure=request.uri.scheme.lower() == "sips",
            state="early",
            local_contact=local_contact,
        )

    # ------------------------------------------------------------ identity

    @property
    def id(self) -> str:
        """The protocol.md §1.4 dialogId."""
        return dialog_id(self.call_id, self.local_tag, self.remote_tag)

    @property
    def from_tag(self) -> str:
        """The From tag of the initial INVITE."""
        return self.local_tag if self.is_uac else self.remote_tag

    @property
    def to_tag(self) -> str:
        """The To tag of the initial INVITE's dialog-creating response."""
        return self.remote_tag if self.is_uac else self.local_tag

    @property
    def terminated(self) -> bool:
        """Whether the dialog has ended."""
        return self.state == "terminated"

    def matches(self, message: SipRequest | SipResponse, incoming: bool = True) -> bool:
        """Whether an incoming request belongs here (Call-ID, our tag in To, theirs in From)."""
        try:
            if message.call_id != self.call_id:
                return False
            to_tag, from_tag = message.to_tag, message.from_tag
        except SipParseError:
            return False
        if incoming:
            return to_tag == self.local_tag and from_tag == self.remote_tag
        return from_tag == self.local_tag and to_tag == self.remote_tag

    # ------------------------------------------------------------ routing

    def next_hop(self) -> SipUri:
        """Where in-dialog requests go: the first route, else the remote target (§12.2.1.1)."""
        if self.route_set:
            return self.route_set[0].uri
        return self.remote_target

    def _request_uri_and_routes(self) -> tuple[SipUri, list[str]]:
        if not self.route_set:
            return self.remote_target.copy(), []
        first = self.route_set[0]
        if first.uri.lr:
            return self.remote_target.copy(), [str(r) for r in self.route_set]
        # Strict router: it goes in the Request-URI, the remote target last in Route.
        uri = first.uri.copy()
        uri.headers = []
        routes = [str(r) for r in self.route_set[1:]] + [f"<{self.remote_target}>"]
        return uri, routes

    # ------------------------------------------------------------ requests

    def create_request(
        self,
        method: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        content_type: str | None = None,
        cseq: int | None = None,
    ) -> SipRequest:
        """A new in-dialog request without Via; bumps the local CSeq unless ``cseq`` is given.

        ACK and CANCEL must pass the INVITE's ``cseq`` (§13.2.2.4, §9.1).
        """
        if self.terminated and method not in ("ACK",):
            raise DialogError(f"cannot send {method} in a terminated dialog", status=481)
        if cseq is None:
            self.local_seq += 1
            cseq = self.local_seq
        uri, routes = self._request_uri_and_routes()
        out = Headers()
        for value in routes:
            out.add("Route", value)
        out.add("Max-Forwards", "70")
        out.add("From", str(self.local_party.with_tag(self.local_tag)))
        out.add("To", str(self.remote_party.with_tag(self.remote_tag)))
        out.add("Call-ID", self.call_id)
        out.add("CSeq", f"{cseq} {method}")
        if self.local_contact and method in ("INVITE", "UPDATE", "REFER", "NOTIFY", "SUBSCRIBE"):
            out.add("Contact", self.local_contact)
        for name, value in headers:
            out.add(name, value)
        if body and content_type and "Content-Type" not in out:
            out.add("Content-Type", content_type)
        return SipRequest(method, uri, out, body)

    def create_ack(self, invite_cseq: int, *, body: bytes = b"", content_type: str | None = None) -> SipRequest:
        """The ACK for a 2xx to our INVITE with CSeq ``invite_cseq`` (§13.2.2.4)."""
        return self.create_request("ACK", cseq=invite_cseq, body=body, content_type=content_type)

    def begin_reinvite(self) -> None:
        """Mark our re-INVITE in progress; raises if one is already running in either direction."""
        if self.state != "confirmed":
            raise DialogError("re-INVITE needs a confirmed dialog", status=481)
        if self.invite_out or self.invite_in:
            raise DialogError("an INVITE transaction is already in progress", status=491)
        self.invite_out = True

    def end_reinvite(self) -> None:
        """Our re-INVITE got its final response."""
        self.invite_out = False

    # ------------------------------------------------------------ incoming

    def check_request(self, request: SipRequest) -> None:
        """Validate an incoming in-dialog request's CSeq and glare; raise :class:`DialogError`.

        A lower CSeq than seen before gets 500 (§12.2.2); an INVITE while ours
        is pending gets 491, while theirs is pending 500 (§14.2).
        ACK and CANCEL reuse the INVITE's number and are not checked.
        """
        if request.method in ("ACK", "CANCEL"):
            return
        seq = request.cseq.seq
        if self.remote_seq is not None and seq <= self.remote_seq:
            raise DialogError(f"CSeq {seq} not above {self.remote_seq}", status=500)
        if request.method == "INVITE":
            if self.invite_out:
                raise DialogError("re-INVITE glare", status=491)
            if self.invite_in:
                raise DialogError("re-INVITE while another is pending", status=500)
        self.remote_seq = seq

    def refresh_target(self, message: SipRequest | SipResponse) -> None:
        """Take the Contact of a target-refresh request or its 2xx (§12.2, RFC 3311) as remote target."""
        target = _contact_uri(message)
        if target is not None:
            self.remote_target = target

    def confirm(self) -> None:
        """The dialog got its 2xx (UAC) or sent it (UAS)."""
        if self.state == "early":
            self.state = "confirmed"

    def terminate(self) -> None:
        """The dialog is over (BYE sent/received, final non-2xx, CANCEL)."""
        self.state = "terminated"
        self.invite_in = self.invite_out = False


# ---------------------------------------------------------------- RFC 3264 §8.4 hold

_ANSWER_DIRECTION = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}


def answer_direction(offered: str) -> str:
    """The direction an answer takes for an offered direction (RFC 3264 §6.1)."""
    return _ANSWER_DIRECTION.get(offered, "sendrecv")


def set_direction(sdp: bytes, direction: str, *, bump_version: bool = True) -> bytes:
    """``sdp`` with every audio stream's direction set (hold: ``sendonly``/``inactive``).

    The o= version is incremented, as a changed session must (RFC 3264 §8).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"not a direction: {direction!r}")
    session = parse_sdp(sdp)
    session.attributes = [a for a in session.attributes if a.name not in DIRECTIONS]
    for media in session.media:
        media.set_direction(direction)
    if bump_version:
        session.origin.session_version += 1
    return session.to_bytes()


def answer_hold(local_sdp: bytes, offer: bytes) -> bytes:
    """Answer a re-offer with our previous SDP, its direction mirrored from the offer's first stream."""
    try:
        session = parse_sdp(offer)
        offered = session.direction(session.media[0]) if session.media else "sendrecv"
    except (SdpParseError, IndexError):
        offered = "sendrecv"
    return set_direction(local_sdp, answer_direction(offered))
