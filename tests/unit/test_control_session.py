"""The control session's view of its call: /list entries and the wire events it sends."""

from __future__ import annotations

import random
import tempfile

from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from activecall.call.services import CallServices
from activecall.control.query import SessionParams
from activecall.control.session import SessionManager
from activecall.ids import IdSource
from activecall.media.cache import MediaCache
from activecall.media.clock import MediaClock
from activecall.speech.registry import SynthesizerRegistry
from activecall.testing import FakeDialer, FakeLeg, FakePending


class ListEntryTests(SynchronousTestCase):
    """``GET /list`` shows when a call rang and when it was answered."""

    def test_ring_time_and_start_time(self) -> None:
        """A waiting SIP call that was rung lists ringTime; accept adds startTime."""
        clock = Clock()
        clock.advance(1_700_000_000)
        dialer = FakeDialer()
        services = CallServices(
            clock=clock, media_clock=MediaClock(clock), ids=IdSource(random.Random(7)),
            synthesizers=SynthesizerRegistry(), cache=MediaCache(tempfile.mkdtemp()),
            run_blocking=lambda f, *a: maybeDeferred(f, *a), fetch_url=lambda url: succeed(b""),
            dialers={"sip": dialer}, inbound_legs=dialer, pending=FakePending({"d-1": FakeLeg()}),
            recording_path=tempfile.mkdtemp())
        session = SessionManager(services).open(SessionParams(sid="d-1", call_type="sip", dump=False, ping_s=0))
        self.assertEqual((session.list_entry()["ringTime"], session.list_entry()["startTime"]), (None, None))
        session.receive_object({"command": "ringing"})
        self.assertEqual(session.list_entry()["ringTime"], "2023-11-14T22:13:20.000000Z")
        clock.advance(2)
        session.receive_object({"command": "accept", "option": {}})
        self.assertEqual(session.list_entry()["startTime"], "2023-11-14T22:13:22.000000Z")
