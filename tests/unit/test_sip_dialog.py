"""Unit tests for the pure SIP dialog module."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.sip.dialog import (
    Dialog,
    DialogError,
    answer_direction,
    answer_hold,
    dialog_id,
    set_direction,
)
from activecall.sip.message import parse_message
from activecall.sdp.model import parse_sdp
from activecall.testing_sip import minimal_sdp

INVITE = (
    "INVITE sip:bob@10.0.0.1 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 10.0.0.2:5070;branch=z9hG4bKabc\r\n"
    "Record-Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n"
    "From: <sip:alice@example.com>;tag=1928301774\r\n"
    "To: <sip:bob@10.0.0.1>\r\n"
    "Call-ID: a84b4c76e66710@pc33.example.com\r\n"
    "CSeq: 314159 INVITE\r\n"
    "Contact: <sip:alice@10.0.0.2:5070>\r\n"
    "Max-Forwards: 70\r\n"
    "Content-Length: 0\r\n\r\n"
).encode()

OK = (
    "SIP/2.0 200 OK\r\n"
    "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKxyz\r\n"
    "Record-Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n"
    "From: <sip:alice@example.com>;tag=1928301774\r\n"
    "To: <sip:bob@10.0.0.1>;tag=Xk29sLp0\r\n"
    "Call-ID: a84b4c76e66710@pc33.example.com\r\n"
    "CSeq: 314159 INVITE\r\n"
    "Contact: <sip:bob@10.0.0.9:5080>\r\n"
    "Content-Length: 0\r\n\r\n"
).encode()


def uas_dialog() -> Dialog:
    return Dialog.for_uas(parse_message(INVITE), "Xk29sLp0", local_contact="<sip:bob@10.0.0.1>")


class DialogIdTests(SynchronousTestCase):
    """dialogId per protocol.md §1.4."""

    def test_larger_tag_first(self) -> None:
        """The lexicographically larger tag comes first, then the smaller one."""
        self.assertEqual(dialog_id("a84b@pc33", "1928301774", "Xk29sLp0"), "a84b@pc33-Xk29sLp0-1928301774")

    def test_symmetric(self) -> None:
        """Swapping From and To tags gives the same id."""
        self.assertEqual(dialog_id("c", "abc", "ABD"), dialog_id("c", "ABD", "abc"))

    def test_byte_order_not_case_folded(self) -> None:
        """Byte order puts upper case before lower case."""
        self.assertEqual(dialog_id("c", "a", "Z"), "c-a-Z")

    def test_uas_dialog_id(self) -> None:
        """A dialog created as UAS reports the protocol.md example id."""
        self.assertEqual(uas_dialog().id, "a84b4c76e66710@pc33.example.com-Xk29sLp0-1928301774")


class UasDialogTests(SynchronousTestCase):
    """Dialogs created by answering an INVITE."""

    def test_fields(self) -> None:
        """Remote target, route set order, tags and remote CSeq come from the INVITE."""
        d = uas_dialog()
        self.assertEqual(str(d.remote_target), "sip:alice@10.0.0.2:5070")
        self.assertEqual([str(r.uri) for r in d.route_set], ["sip:p1.example.com;lr", "sip:p2.example.com;lr"])
        self.assertEqual((d.from_tag, d.to_tag), ("1928301774", "Xk29sLp0"))
        self.assertEqual(d.remote_seq, 314159)
        self.assertFalse(d.is_uac)

    def test_bye_request(self) -> None:
        """A BYE from the UAS swaps From/To, uses the remote target and the route set."""
        d = uas_dialog()
        bye = d.create_request("BYE")
        self.assertEqual(str(bye.uri), "sip:alice@10.0.0.2:5070")
        self.assertEqual(bye.from_.tag, "Xk29sLp0")
        self.assertEqual(bye.to.tag, "1928301774")
        self.assertEqual(bye.headers.get_all("Route"), ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"])
        self.assertEqual(bye.cseq.seq, 1)
        self.assertEqual(d.create_request("INFO").cseq.seq, 2)
        self.assertEqual(str(d.next_hop()), "sip:p1.example.com;lr")

    def test_lower_cseq_is_500(self) -> None:
        """An in-dialog request whose CSeq is not above the last one is refused with 500."""
        d = uas_dialog()
        req = parse_message(INVITE.replace(b"314159 INVITE", b"314159 BYE").replace(b"INVITE sip", b"BYE sip"))
        with self.assertRaises(DialogError) as ctx:
            d.check_request(req)
        self.assertEqual(ctx.exception.status, 500)

    def test_glare_is_491(self) -> None:
        """A re-INVITE arriving while ours is pending gets 491."""
        d = uas_dialog()
        d.confirm()
        d.begin_reinvite()
        req = parse_message(INVITE.replace(b"314159", b"314160"))
        with self.assertRaises(DialogError) as ctx:
            d.check_request(req)
        self.assertEqual(ctx.exception.status, 491)

    def test_one_reinvite_at_a_time(self) -> None:
        """We refuse to start a second re-INVITE while one is pending."""
        d = uas_dialog()
        d.confirm()
        d.begin_reinvite()
        self.assertRaises(DialogError, d.begin_reinvite)
        d.end_reinvite()
        d.begin_reinvite()

    def test_no_requests_after_terminate(self) -> None:
        """A terminated dialog cannot send new requests."""
        d = uas_dialog()
        d.terminate()
        self.assertRaises(DialogError, d.create_request, "BYE")


class UacDialogTests(SynchronousTestCase):
    """Dialogs created by a 2xx to our INVITE."""

    def test_route_set_reversed_and_target(self) -> None:
        """The UAC reverses Record-Route and targets the 2xx Contact."""
        d = Dialog.for_uac(parse_message(INVITE), parse_message(OK))
        self.assertEqual([str(r.uri) for r in d.route_set], ["sip:p2.example.com;lr", "sip:p1.example.com;lr"])
        self.assertEqual(str(d.remote_target), "sip:bob@10.0.0.9:5080")
        self.assertEqual(d.state, "confirmed")

    def test_ack_keeps_invite_cseq(self) -> None:
        """The ACK for a 2xx reuses the INVITE's CSeq number without bumping the counter."""
        d = Dialog.for_uac(parse_message(INVITE), parse_message(OK))
        ack = d.create_ack(314159)
        self.assertEqual(str(ack.cseq), "314159 ACK")
        self.assertEqual(d.create_request("BYE").cseq.seq, 314160)

    def test_strict_router(self) -> None:
        """A strict first route goes in the Request-URI and the remote target last in Route."""
        ok = OK.replace(b"<sip:p1.example.com;lr>, <sip:p2.example.com;lr>", b"<sip:strict.example.com>")
        d = Dialog.for_uac(parse_message(INVITE), parse_message(ok))
        bye = d.create_request("BYE")
        self.assertEqual(str(bye.uri), "sip:strict.example.com")
        self.assertEqual(bye.headers.get_all("Route"), ["<sip:bob@10.0.0.9:5080>"])

    def test_target_refresh(self) -> None:
        """A re-INVITE's Contact becomes the new remote target."""
        d = Dialog.for_uac(parse_message(INVITE), parse_message(OK))
        d.refresh_target(parse_message(INVITE.replace(b"10.0.0.2:5070>", b"10.0.0.7:5090>")))
        self.assertEqual(str(d.remote_target), "sip:alice@10.0.0.7:5090")

    def test_needs_to_tag(self) -> None:
        """A response without a To tag cannot create a dialog."""
        untagged = parse_message(OK.replace(b";tag=Xk29sLp0", b""))
        self.assertRaises(DialogError, Dialog.for_uac, parse_message(INVITE), untagged)


class HoldTests(SynchronousTestCase):
    """RFC 3264 §8.4 hold directions."""

    def test_answer_direction_table(self) -> None:
        """Offered directions map to their mirrored answers."""
        self.assertEqual(
            [answer_direction(d) for d in ("sendrecv", "sendonly", "recvonly", "inactive")],
            ["sendrecv", "recvonly", "sendonly", "inactive"],
        )

    def test_set_direction_bumps_version(self) -> None:
        """Setting hold rewrites a=direction and increments the o= version."""
        held = parse_sdp(set_direction(minimal_sdp(), "sendonly"))
        self.assertEqual(held.direction(held.media[0]), "sendonly")
        self.assertEqual(held.origin.session_version, 2)

    def test_answer_hold(self) -> None:
        """A sendonly offer is answered recvonly from our previous SDP."""
        offer = set_direction(minimal_sdp("10.0.0.2"), "sendonly")
        answer = parse_sdp(answer_hold(minimal_sdp(), offer))
        self.assertEqual(answer.direction(answer.media[0]), "recvonly")
