"""The control WebSocket under attack: huge frames, vanished peers, duplicate ids, too many sessions.

Server (ControlFactory) and an Autobahn client are joined by ``twisted.test.iosim``
and driven by a Clock; nothing sleeps.
"""

from __future__ import annotations

from typing import Any, Optional

import autobahn.websocket.protocol as autobahn_protocol
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from activecall.config import ApiConfig
from activecall.control.protocol import ControlFactory, PeerWatchdog, RelaySlots
from activecall.control.query import SessionParams
from activecall.control.tunnel import OwnerLocator


class FakeSession:
    """Records what the protocol hands to a session."""

    def __init__(self, params: SessionParams) -> None:
        self.params = params
        self.channel: Any = None
        self.texts: list[bytes] = []
        self.audio: list[bytes] = []
        self.closed = False

    def attach(self, channel: Any) -> None:
        self.channel = channel

    def receive_text(self, text: Any) -> None:
        self.texts.append(text)

    def receive_audio(self, data: bytes) -> None:
        self.audio.append(data)

    def client_closed(self) -> None:
        self.closed = True


class FakeHost:
    """A SessionManager stand-in; ``pending`` holds webhook dialogIds waiting for a client."""

    def __init__(self) -> None:
        self.sessions: dict[str, FakeSession] = {}
        self.pending: set[str] = set()

    def open(self, params: SessionParams) -> FakeSession:
        session = FakeSession(params)
        self.sessions[params.sid] = session
        return session

    def new_sid(self) -> str:
        return f"s.{len(self.sessions)}"

    def hosts(self, sid: str) -> bool:
        return sid in self.sessions or sid in self.pending

    def __contains__(self, sid: str) -> bool:
        return sid in self.sessions

    def __len__(self) -> int:
        return len(self.sessions)


class Client(WebSocketClientProtocol):
    """Records the handshake outcome and what the server sends; ``answer_pings`` off = a vanished peer."""

    answer_pings = True

    def __init__(self) -> None:
        super().__init__()
        self.opened = False
        self.close_code: Optional[int] = None
        self.closed = False
        self.pings: list[bytes] = []
        self.failure: Optional[str] = None

    def onOpen(self) -> None:
        self.opened = True

    def onPing(self, payload: bytes) -> None:
        self.pings.append(payload)
        if self.answer_pings:
            super().onPing(payload)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.closed = True
        self.close_code = code
        self.failure = reason


class _SocketCase(SynchronousTestCase):
    limits = ApiConfig(max_message_bytes=4096, max_frame_bytes=1024, pong_timeout_s=10.0, max_sessions=3)

    def setUp(self) -> None:
        self.clock = Clock()
        self.host = FakeHost()
        self.factory = ControlFactory(self.host, "webSocket", None, self.clock, self.limits)

    def connect(self, query: str = "", transport: type = iosim.FakeTransport) -> tuple[Any, Client, iosim.IOPump]:
        server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        client_factory = WebSocketClientFactory(f"ws://127.0.0.1:8080/call{query}")
        client_factory.protocol = Client
        client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        pump = iosim.connect(server, transport(server, isServer=True),
                             client, iosim.FakeTransport(client, isServer=False))
        pump.flush()
        return server, client, pump

    def handshake_status(self, client: Client) -> str:
        return client.failure or ""


class FrameSizeTests(_SocketCase):
    """Binary frames above max_frame_bytes and text above max_message_bytes close with 1009."""

    def test_small_frames_pass(self) -> None:
        """A 640-byte audio frame and a command reach the session."""
        _, client, pump = self.connect("?id=a")
        client.sendMessage(b"\x00" * 640, isBinary=True)
        client.sendMessage(b'{"command":"hangup"}')
        pump.flush()
        session = self.host.sessions["a"]
        self.assertEqual((len(session.audio), session.texts), (1, [b'{"command":"hangup"}']))

    def test_session_end_closes_with_1000(self) -> None:
        """When the call is over the server closes the socket with 1000 (normal closure)."""
        _, client, pump = self.connect("?id=done")
        self.host.sessions["done"].channel.close()
        pump.flush()
        self.assertEqual((client.closed, client.close_code), (True, 1000))

    def test_oversized_binary_frame_closes_1009(self) -> None:
        """A 2 KiB binary frame (limit 1 KiB) is refused from its header: close 1009, nothing delivered."""
        _, client, pump = self.connect("?id=b")
        client.sendMessage(b"\x00" * 2048, isBinary=True)
        pump.flush()
        self.assertEqual(client.close_code, 1009)
        session = self.host.sessions["b"]
        self.assertEqual(session.audio, [])
        self.assertTrue(session.closed, "ends the session like a client close")

    def test_oversized_text_closes_1009(self) -> None:
        """Text over max_message_bytes (even split into fragments) closes with 1009."""
        _, client, pump = self.connect("?id=c")
        client.sendMessage(b"x" * 5000, fragmentSize=1000)
        pump.flush()
        self.assertEqual(client.close_code, 1009)
        self.assertEqual(self.host.sessions["c"].texts, [])

    def test_text_may_be_larger_than_an_audio_frame(self) -> None:
        """A 3 KiB command is fine: the binary limit does not apply to text."""
        _, client, pump = self.connect("?id=d")
        client.sendMessage(b'"' + b"x" * 3000 + b'"')
        pump.flush()
        self.assertEqual(len(self.host.sessions["d"].texts), 1)
        self.assertFalse(client.closed)


class UpgradeRefusalTests(_SocketCase):
    """Duplicate ids, too many sessions and bad ids are refused at the upgrade."""

    def test_second_client_with_a_live_id_is_409(self) -> None:
        """The first session keeps its socket; the second upgrade fails with 409."""
        _, first, _ = self.connect("?id=same")
        _, second, _ = self.connect("?id=same")
        self.assertTrue(first.opened)
        self.assertFalse(second.opened)
        self.assertIn("409", self.handshake_status(second))
        self.assertEqual(list(self.host.sessions), ["same"])
        self.assertFalse(first.closed)

    def test_pending_inbound_call_id_is_accepted(self) -> None:
        """``/call/sip?id=<dialogId>`` of a pending webhook call is not a duplicate, with or without forward."""
        self.host.pending.add("dlg-1@host-a-b")
        _, client, _ = self.connect("?id=dlg-1%40host-a-b&forward=true")
        self.assertTrue(client.opened)
        self.assertIn("dlg-1@host-a-b", self.host.sessions)

    def test_forward_for_unknown_id_is_404(self) -> None:
        """``forward=true`` for an id neither live nor pending here is 404 (protocol.md §1.5)."""
        _, client, _ = self.connect("?id=elsewhere&forward=true")
        self.assertIn("404", self.handshake_status(client))

    def test_max_sessions_is_503(self) -> None:
        """With max_sessions live sessions, one more upgrade fails with 503."""
        for i in range(3):
            self.assertTrue(self.connect(f"?id=s{i}")[1].opened)
        _, client, _ = self.connect("?id=s3")
        self.assertFalse(client.opened)
        self.assertIn("503", self.handshake_status(client))

    def test_bad_id_is_400(self) -> None:
        """An id with a control character is refused with 400."""
        _, client, _ = self.connect("?id=a%0Ab")
        self.assertIn("400", self.handshake_status(client))
        self.assertEqual(self.host.sessions, {})


class FakeUpstream:
    """The owner's socket as the relaying protocol sees it: records what is sent to the owner."""

    def __init__(self) -> None:
        self.downstream: Any = None
        self.sent: list[tuple[bytes, bool]] = []
        self.closed_with: Optional[int] = None

    def pair(self, downstream: Any) -> None:
        self.downstream = downstream

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        self.sent.append((payload, isBinary))

    def sendPong(self, payload: bytes) -> None:
        return None

    def sendClose(self, code: Optional[int] = None, reason: Optional[str] = None) -> None:
        self.closed_with = code


class TunnelSessionLimitTests(_SocketCase):
    """A socket relayed to its owner counts against max_sessions on the relaying node, until it closes."""

    def setUp(self) -> None:
        super().setUp()
        self.upstreams: list[FakeUpstream] = []
        self.lookups: list[Deferred[Any]] = []
        self.answer_at_once = True
        self.factory = ControlFactory(self.host, "webSocket", None, self.clock, self.limits,
                                      locator=OwnerLocator(None, ["ws://owner:8080"]), open_upstream=self._open)
        self.pumps: list[iosim.IOPump] = []
        self.addCleanup(self._finish_handshakes)

    def connect(self, query: str = "", transport: type = iosim.FakeTransport) -> tuple[Any, Client, iosim.IOPump]:
        server, client, pump = super().connect(query, transport)
        self.pumps.append(pump)
        return server, client, pump

    def _finish_handshakes(self) -> None:
        """Autobahn's opening-handshake timers run on txaio's (real) reactor: every handshake must end."""
        for d in self.lookups:
            if not d.called:
                d.callback(None)
        for pump in self.pumps:
            pump.flush()

    def _open(self, bases: Any, path: str, params: Any, headers: Any) -> Deferred[Any]:
        upstream = FakeUpstream()
        self.upstreams.append(upstream)
        if self.answer_at_once:
            return succeed(upstream)
        d: Deferred[Any] = Deferred()
        self.lookups.append(d)
        return d

    def test_tunnels_fill_max_sessions(self) -> None:
        """Three tunnels (max_sessions 3) and no local session: a fourth tunnel and a local session get 503."""
        clients = [self.connect(f"?id=remote{i}")[1] for i in range(3)]
        self.assertEqual([c.opened for c in clients], [True] * 3)
        self.assertEqual(self.host.sessions, {})
        _, refused, _ = self.connect("?id=remote3")
        self.assertIn("503", self.handshake_status(refused))
        self.host.pending.add("local")  # hosted here: no tunnel, a local session
        _, local, _ = self.connect("?id=local")
        self.assertIn("503", self.handshake_status(local))
        self.assertEqual(len(self.upstreams), 3, "the refused handshake never reached an owner")

    def test_client_close_gives_the_slot_back(self) -> None:
        """The client closing its tunnel frees its slot (and closes the owner's socket)."""
        tunnels = [self.connect(f"?id=remote{i}") for i in range(3)]
        _, client, pump = tunnels[0]
        client.sendClose(code=1000)
        pump.flush()
        self.assertEqual(self.upstreams[0].closed_with, 1000)
        self.assertTrue(self.connect("?id=again")[1].opened)

    def test_owner_close_gives_the_slot_back(self) -> None:
        """The owner closing the tunnelled socket frees its slot; the client's socket is closed too."""
        tunnels = [self.connect(f"?id=remote{i}") for i in range(3)]
        server, client, pump = tunnels[1]
        server.owner_closed(1000, None)
        pump.flush()
        self.assertTrue(client.closed)
        self.assertTrue(self.connect("?id=again")[1].opened)
        self.assertEqual(len(self.factory.relays), 3)

    def test_owner_lookup_in_progress_holds_a_slot(self) -> None:
        """Handshakes still looking for their owner count; a client leaving meanwhile gives its slot back."""
        self.answer_at_once = False
        waiting = [self.connect(f"?id=remote{i}") for i in range(3)]
        _, refused, _ = self.connect("?id=remote3")
        self.assertIn("503", self.handshake_status(refused))
        server, client, pump = waiting[0]
        server.transport.loseConnection()
        pump.flush()
        self.lookups[0].callback(self.upstreams[0])
        self.assertEqual(self.upstreams[0].closed_with, 1000, "the owner's socket does not linger")
        self.assertEqual(len(self.factory.relays), 2)
        self.assertEqual(self.host.sessions, {}, "no session for the client that left")
        self.assertFalse(self.connect("?id=again")[1].opened)  # its lookup is still pending
        self.assertEqual(len(self.factory.relays), 3)

    def test_nobody_takes_it_then_a_local_session(self) -> None:
        """No owner upgraded: the slot is given back and the local session counts itself instead."""
        self.answer_at_once = False
        self.connect("?id=orphan")
        self.lookups[0].callback(None)
        self.assertEqual((len(self.factory.relays), list(self.host.sessions)), (0, ["orphan"]))

    def test_endpoints_share_one_budget(self) -> None:
        """ApiResource gives its three endpoints one RelaySlots."""
        from activecall.web import ApiResource

        resource = ApiResource(self.host, self.clock, ())
        slots = {id(f.relays) for f in resource.factories.values()}
        self.assertEqual(len(slots), 1)
        self.assertIsInstance(next(iter(resource.factories.values())).relays, RelaySlots)


class _NoDelayTransport(iosim.FakeTransport):
    """Records TCP_NODELAY requests."""

    no_delay: Optional[bool] = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


class ConnectionCostTests(_SocketCase):
    """The per-connection work a flood of upgrades pays for: the factory's options, and log lines."""

    def log_events(self) -> Any:
        """A function returning the server side's log events since this call (the test's client logs too)."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        return lambda: [e for e in events if "ClientProtocol" not in e.get("log_namespace", "")]

    def test_factory_options_copied_without_pretty_printing_them(self) -> None:
        """Each protocol gets the factory's options (tcpNoDelay applied to the socket, payload limits)
        and Autobahn pretty-prints none of them for its debug line."""
        printed: list[Any] = []
        self.patch(autobahn_protocol, "pformat", lambda obj: printed.append(obj) or "")
        proto, _, _ = self.connect("?id=opts", transport=_NoDelayTransport)
        self.assertIn([], printed)
        self.assertEqual([p for p in printed if "ControlFactory" in repr(p)], [])
        self.assertTrue(proto.transport.no_delay)
        self.assertEqual((proto.maxMessagePayloadSize, proto.maxFramePayloadSize), (4096, 4096))
        self.assertEqual((proto.openHandshakeTimeout, proto.autoFragmentSize, proto.failByDrop), (10, 0, False))
        self.assertTrue(self.host.sessions["opts"].channel is not None)

    def test_max_sessions_refusals_logged_once_per_burst(self) -> None:
        """Many 503s in a row log one warning (and no Autobahn lines); after a session is admitted
        again, the next refusal is logged again."""
        logged = self.log_events()
        for i in range(3):
            self.connect(f"?id=s{i}")
        refused = [self.connect(f"?id=x{i}")[1] for i in range(20)]
        self.assertTrue(all("503" in self.handshake_status(c) for c in refused))
        warnings = [e for e in logged() if e["log_level"] >= LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("max_sessions", warnings[0]["log_format"])
        self.assertEqual([e for e in logged() if e.get("log_namespace", "").startswith("autobahn")], [])
        del self.host.sessions["s0"]
        self.assertTrue(self.connect("?id=s3")[1].opened)
        self.connect("?id=x20")
        self.assertEqual(len([e for e in logged() if e["log_level"] >= LogLevel.warn]), 2)

    def test_other_refusals_are_one_info_line(self) -> None:
        """A 409 is logged once by the daemon, at info, naming the code; Autobahn adds nothing."""
        self.connect("?id=same")
        logged = self.log_events()
        _, second, _ = self.connect("?id=same")
        self.assertIn("409", self.handshake_status(second))
        self.assertEqual([(e["log_level"], e.get("code")) for e in logged()], [(LogLevel.info, 409)])

    def test_vanished_peer_close_is_one_info_line(self) -> None:
        """The watchdog's close logs the daemon's line only, not Autobahn's 'dropping connection' warning."""
        _, client, pump = self.connect("?id=gone")
        client.answer_pings = False
        logged = self.log_events()
        self.host.sessions["gone"].channel.send_ping(b"t")
        pump.flush()
        self.clock.advance(10.1)
        pump.flush()
        self.assertTrue(self.host.sessions["gone"].closed)
        self.assertEqual([e["log_level"] for e in logged()], [LogLevel.info])
        self.assertIn("sent nothing", logged()[0]["log_format"])

    def test_unexpected_error_in_the_handshake_is_500_and_logged(self) -> None:
        """A bug while admitting a client answers 500 and logs the traceback (Autobahn's warning is off)."""
        logged = self.log_events()

        def broken(sid: str) -> bool:
            raise RuntimeError("boom")

        self.host.hosts = broken  # type: ignore[method-assign]
        _, client, _ = self.connect("?id=f&forward=true")
        self.assertIn("500", self.handshake_status(client))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([e["log_level"] for e in logged()], [LogLevel.critical])


class PongTimeoutTests(_SocketCase):
    """A peer that stops answering is closed after pong_timeout_s, ending its session."""

    def test_vanished_peer_is_closed(self) -> None:
        """The session pings; no byte comes back for 10 s → connection dropped, session told client_closed."""
        _, client, pump = self.connect("?id=gone")
        client.answer_pings = False
        session = self.host.sessions["gone"]
        session.channel.send_ping(b"t1")
        pump.flush()
        self.assertEqual(client.pings, [b"t1"])
        self.clock.advance(9.9)
        self.assertFalse(session.closed)
        self.clock.advance(0.2)
        pump.flush()
        self.assertTrue(session.closed)
        self.assertTrue(client.closed)

    def test_answering_peer_stays(self) -> None:
        """Pongs (and any other frame) keep the connection open through many pings."""
        _, client, pump = self.connect("?id=alive")
        session = self.host.sessions["alive"]
        for _ in range(5):
            session.channel.send_ping(b"t")
            pump.flush()
            self.clock.advance(20)
        self.assertFalse(session.closed)
        self.assertFalse(client.closed)

    def test_ping_zero_still_detects_dead_peers(self) -> None:
        """With ping=0 the daemon probes after 10 s of silence and closes 10 s later without an answer."""
        _, client, pump = self.connect("?id=quiet&ping=0")
        client.answer_pings = False
        session = self.host.sessions["quiet"]
        self.clock.advance(10)
        pump.flush()
        self.assertEqual(len(client.pings), 1)
        self.clock.advance(10)
        pump.flush()
        self.assertTrue(session.closed)

    def test_ping_zero_busy_peer_is_never_probed(self) -> None:
        """A client sending audio all the time gets no probe pings at all."""
        _, client, pump = self.connect("?id=busy&ping=0")
        for _ in range(100):
            client.sendMessage(b"\x00" * 320, isBinary=True)
            pump.flush()
            self.clock.advance(1)
        self.assertEqual(client.pings, [])
        self.assertFalse(self.host.sessions["busy"].closed)


class WatchdogTests(SynchronousTestCase):
    """PeerWatchdog on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.dead: list[bool] = []
        self.probes: list[bool] = []

    def test_late_answer_after_second_ping(self) -> None:
        """Ping at 0 answered, ping at 20 not: dead at 30 (timeout after the unanswered ping), not before."""
        dog = PeerWatchdog(self.clock, 10, lambda: self.dead.append(True))
        dog.pinged()
        self.clock.advance(1)
        dog.heard()
        self.clock.advance(19)
        dog.pinged()
        self.clock.advance(9.5)
        self.assertEqual(self.dead, [])
        self.clock.advance(0.5)
        self.assertEqual(self.dead, [True])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_everything(self) -> None:
        """After stop no timer is left and nothing fires."""
        dog = PeerWatchdog(self.clock, 10, lambda: self.dead.append(True), probe=lambda: self.probes.append(True))
        dog.pinged()
        dog.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual((self.dead, self.probes), ([], []))
