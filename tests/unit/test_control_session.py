"""The control session's view of its call: /list entries and the wire events it sends."""

from __future__ import annotations

import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.control.query import SessionParams
from activecall.control.session import SessionManager
from activecall.testing import fake_call_services, FakeDialer, FakeLeg, FakePending


class ListEntryTests(SynchronousTestCase):
    """``GET /list`` shows when a call rang and when it was answered."""

    def test_ring_time_and_start_time(self) -> None:
        """A waiting SIP call that was rung lists ringTime; accept adds startTime."""
        clock = Clock()
        clock.advance(1_700_000_000)
        dialer = FakeDialer()
        services = fake_call_services(clock, dialers={"sip": dialer}, inbound_legs=dialer,
                                      pending=FakePending({"d-1": FakeLeg()}), recording_path=tempfile.mkdtemp())
        session = SessionManager(services).open(SessionParams(sid="d-1", call_type="sip", dump=False, ping_s=0))
        self.assertEqual((session.list_entry()["ringTime"], session.list_entry()["startTime"]), (None, None))
        session.receive_object({"command": "ringing"})
        self.assertEqual(session.list_entry()["ringTime"], "2023-11-14T22:13:20.000000Z")
        clock.advance(2)
        session.receive_object({"command": "accept", "option": {}})
        self.assertEqual(session.list_entry()["startTime"], "2023-11-14T22:13:22.000000Z")
