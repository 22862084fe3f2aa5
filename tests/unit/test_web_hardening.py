"""The HTTP side under attack: authentication, Origin, body types and sizes, playbook names,
slow and oversized requests, too many connections per IP, tokens in the access log."""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from activecall import web
from activecall.config import ApiConfig
from activecall.web import ActivecallSite, ApiResource, ConnectionLimiter


class FakeSession:
    """What ApiResource uses of a session."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.received: list[Any] = []

    def list_entry(self) -> dict[str, Any]:
        return {"id": self.sid}

    def receive_decoded(self, obj: Any, command: Any) -> None:
        self.received.append(obj)

    def kill(self) -> None:
        pass

    def attach(self, channel: Any) -> None:
        pass

    def client_closed(self) -> None:
        pass


class FakeSessions:
    """A SessionManager stand-in."""

    def __init__(self, *sids: str) -> None:
        self._by_id = {sid: FakeSession(sid) for sid in sids}

    def sessions(self) -> list[FakeSession]:
        return list(self._by_id.values())

    def get(self, sid: str) -> Optional[FakeSession]:
        return self._by_id.get(sid)

    def new_sid(self) -> str:
        return "s.new"

    def open(self, params: Any) -> FakeSession:
        self._by_id[params.sid] = FakeSession(params.sid)
        return self._by_id[params.sid]

    def hosts(self, sid: str) -> bool:
        return sid in self._by_id

    def __contains__(self, sid: str) -> bool:
        return sid in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)


def make_request(method: bytes, path: bytes, body: bytes = b"", headers: Optional[dict[bytes, bytes]] = None,
                 args: Optional[dict[bytes, list[bytes]]] = None) -> DummyRequest:
    request = DummyRequest([])
    request.method = method
    request.path = path
    request.uri = path
    request.content = io.BytesIO(body)
    request.args = args or {}
    request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:8080"])
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    return request


class _ResourceCase(SynchronousTestCase):
    api = ApiConfig()

    def setUp(self) -> None:
        self.sessions = FakeSessions("s1")
        self.resource = ApiResource(self.sessions, Clock(), (), api=self.api,
                                    metrics=lambda: (b"up 1\n", "text/plain; version=0.0.4"))

    def call(self, method: bytes, path: bytes, body: bytes = b"", **kw: Any) -> tuple[int, bytes, DummyRequest]:
        request = make_request(method, path, body, **kw)
        result = self.resource.render(request)
        return request.responseCode or 200, result, request


class AuthTests(_ResourceCase):
    """With ``[api] tokens`` every route but /health needs a token; 401 comes before any upgrade."""

    api = ApiConfig(tokens=("s3cret",))

    def test_missing_token_is_401_everywhere(self) -> None:
        """REST routes, /metrics and the WebSocket paths answer 401 with WWW-Authenticate."""
        for method, path in ((b"GET", b"/list"), (b"GET", b"/kill/s1"), (b"POST", b"/command/s1"),
                             (b"GET", b"/iceservers"), (b"GET", b"/metrics"), (b"GET", b"/call"),
                             (b"GET", b"/call/sip"), (b"GET", b"/call/webrtc"), (b"GET", b"/api/playbooks")):
            code, body, request = self.call(method, path)
            self.assertEqual(code, 401, path)
            self.assertEqual(json.loads(body), {"status": "error", "error": "missing or invalid token"})
            self.assertTrue(request.responseHeaders.getRawHeaders(b"www-authenticate"))

    def test_wrong_token_is_401(self) -> None:
        """A wrong Bearer token or ?token= is refused."""
        self.assertEqual(self.call(b"GET", b"/list", headers={b"authorization": b"Bearer nope"})[0], 401)
        self.assertEqual(self.call(b"GET", b"/list", args={b"token": [b"s3cre"]})[0], 401)

    def test_right_token_by_header_or_query(self) -> None:
        """The token works as ``Authorization: Bearer`` and as ``?token=``."""
        code, body, _ = self.call(b"GET", b"/list", headers={b"authorization": b"Bearer s3cret"})
        self.assertEqual((code, json.loads(body)), (200, {"active_calls": [{"id": "s1"}]}))
        self.assertEqual(self.call(b"GET", b"/list", args={b"token": [b"s3cret"]})[0], 200)
        code, body, _ = self.call(b"GET", b"/metrics", args={b"token": [b"s3cret"]})
        self.assertEqual((code, body), (200, b"up 1\n"))

    def test_health_stays_open(self) -> None:
        """Load balancers probe /health without a token."""
        code, body, _ = self.call(b"GET", b"/health")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ok"}))


class HealthTests(SynchronousTestCase):
    """/health reports capacity; a draining node answers 503 so HTTP probes take it out."""

    def test_draining_is_503(self) -> None:
        """The snapshot is the body; status draining makes the code 503."""
        state = {"status": "ok", "calls": 3}
        resource = ApiResource(FakeSessions("s1"), Clock(), (), health=lambda: dict(state))
        request = make_request(b"GET", b"/health")
        body = resource.render(request)
        self.assertEqual((request.responseCode or 200, json.loads(body)), (200, {"status": "ok", "calls": 3}))
        state["status"] = "draining"
        request = make_request(b"GET", b"/health")
        body = resource.render(request)
        self.assertEqual((request.responseCode, json.loads(body)["status"]), (503, "draining"))

    def test_a_forwarded_request_never_hops_again(self) -> None:
        """/kill for an id not here, carrying forward: 404 at once, even with peers to ask."""
        from activecall.control.tunnel import OwnerLocator

        resource = ApiResource(FakeSessions("s1"), Clock(), (), locator=OwnerLocator(None, ["ws://127.0.0.1:9"]))
        request = make_request(b"GET", b"/kill/other", args={b"forward": [b"true"]})
        body = resource.render(request)
        self.assertEqual((request.responseCode, json.loads(body)), (404, {"status": "not_found", "id": "other"}))


class NoTokenTests(_ResourceCase):
    """Without tokens (Active Call's behaviour) clients need none; Origin is still checked."""

    def test_no_token_needed(self) -> None:
        """GET /list works without any credentials."""
        self.assertEqual(self.call(b"GET", b"/list")[0], 200)

    def test_foreign_origin_is_403(self) -> None:
        """A cross-site browser request (POST or WebSocket upgrade) is refused with 403."""
        evil = {b"origin": b"http://evil.example"}
        code, body, _ = self.call(b"POST", b"/command/s1", b'{"command":"hangup"}', headers=evil)
        self.assertEqual(code, 403)
        self.assertIn("origin not allowed", json.loads(body)["error"])
        self.assertEqual(self.call(b"GET", b"/call", headers=evil)[0], 403)
        self.assertEqual(self.sessions.get("s1").received, [])  # type: ignore[union-attr]

    def test_own_origin_is_allowed(self) -> None:
        """The daemon's own page (Origin = http://Host) may post commands."""
        code, _, _ = self.call(b"POST", b"/command/s1", b'{"command":"hangup"}',
                               headers={b"origin": b"http://127.0.0.1:8080", b"content-type": b"application/json"})
        self.assertEqual(code, 200)


class PathIdTests(_ResourceCase):
    """Session ids in REST paths are percent-decoded like ``?id=``."""

    def test_encoded_dialog_id(self) -> None:
        """``/command/dlg%40host`` reaches session ``dlg@host``."""
        self.sessions = FakeSessions("dlg@host")
        self.resource = ApiResource(self.sessions, Clock(), ())
        code, body, _ = self.call(b"POST", b"/command/dlg%40host", b'{"command":"hangup"}')
        self.assertEqual((code, json.loads(body)), (200, {"status": "sent", "id": "dlg@host"}))


class BodyTests(_ResourceCase):
    """POST bodies: JSON only (415 otherwise), bounded (413), deep JSON is a 400."""

    api = ApiConfig(max_message_bytes=1024)

    def test_wrong_content_type_is_415(self) -> None:
        """text/plain or a form body on /command or /precache → 415, nothing queued."""
        for path in (b"/command/s1", b"/command/nobody"):
            code, body, _ = self.call(b"POST", path, b'{"command":"hangup"}',
                                      headers={b"content-type": b"application/x-www-form-urlencoded"})
            if path == b"/command/s1":
                self.assertEqual(code, 415)
                self.assertIn("application/json", json.loads(body)["error"])
        self.assertEqual(self.sessions.get("s1").received, [])  # type: ignore[union-attr]

    def test_json_content_type_with_charset_and_missing_type_are_accepted(self) -> None:
        """``application/json; charset=utf-8`` and no Content-Type (curl-like clients) are JSON."""
        self.assertEqual(self.call(b"POST", b"/command/s1", b'{"command":"hangup"}',
                                   headers={b"content-type": b"application/json; charset=utf-8"})[0], 200)
        self.assertEqual(self.call(b"POST", b"/command/s1", b'{"command":"hangup"}')[0], 200)
        self.assertEqual(len(self.sessions.get("s1").received), 2)  # type: ignore[union-attr]

    def test_oversized_body_is_413(self) -> None:
        """A body over max_message_bytes is refused without being parsed."""
        big = json.dumps({"command": "custom", "data": {"x": "y" * 2000}}).encode()
        code, body, _ = self.call(b"POST", b"/command/s1", big)
        self.assertEqual(code, 413)
        self.assertIn("1024 bytes", json.loads(body)["error"])

    def test_precache_checks_body_before_synthesizing(self) -> None:
        """/precache with a form body → 415."""
        self.resource = ApiResource(self.sessions, Clock(), (), api=self.api, precache=lambda c: self.fail("called"))
        code, _, _ = self.call(b"POST", b"/precache", b"{}", headers={b"content-type": b"text/plain"})
        self.assertEqual(code, 415)


class DeepJsonTests(_ResourceCase):
    """Deeply nested JSON bodies are a 400 naming the nesting (``RecursionError`` made them a 500)."""

    def test_recursion_bomb_on_command_and_precache(self) -> None:
        """``[[[[…]]]]`` 100 000 deep → 400 on /command and /precache."""
        self.resource = ApiResource(self.sessions, Clock(), (), precache=lambda c: self.fail("called"))
        for path in (b"/command/s1", b"/precache"):
            code, body, _ = self.call(b"POST", path, b"[" * 100_000 + b"]" * 100_000)
            self.assertEqual(code, 400, path)
            self.assertIn("nested deeper than", json.loads(body)["error"])


class PlaybookNameTests(_ResourceCase):
    """``/api/playbooks/{name}`` only reads and writes ``[A-Za-z0-9_.-]+.md`` inside the playbook directory."""

    def setUp(self) -> None:
        super().setUp()
        self.root = tempfile.mkdtemp()
        self.playbooks = os.path.join(self.root, "playbook")
        self.patch(web, "PLAYBOOK_DIR", self.playbooks)

    def save(self, name: bytes, body: bytes = b"# hi\n", content_type: bytes = b"text/markdown") -> tuple[int, bytes]:
        code, body, _ = self.call(b"POST", b"/api/playbooks/" + name, body, headers={b"content-type": content_type})
        return code, body

    def test_bad_names_are_400_and_write_nothing(self) -> None:
        """NUL (was a 500), other extensions, hidden files, encoded slashes and dot-dot are refused."""
        for name in (b"x%00.md", b"x.txt", b"x", b".hidden.md", b"..%2F..%2Fx.md", b"a%2Fb.md", b"..md",
                     b"x.md%0A", b"%2E%2E", b"x.md.sh"):
            code, body = self.save(name)
            self.assertEqual((code, body), (400, b"Invalid filename"), name)
            self.assertEqual(self.call(b"GET", b"/api/playbooks/" + name)[0], 400, name)
        self.assertEqual(os.listdir(self.root), [])

    def test_good_name_saves_and_reads_back(self) -> None:
        """``sales-v2.md`` with text/markdown is saved and read back; text/plain works too."""
        self.assertEqual(self.save(b"sales-v2.md", b"# Sales\n"), (200, b""))
        self.assertEqual(self.save(b"other_1.md", b"x", b"text/plain; charset=utf-8"), (200, b""))
        code, body, _ = self.call(b"GET", b"/api/playbooks/sales-v2.md")
        self.assertEqual((code, body), (200, b"# Sales\n"))
        self.assertEqual(sorted(os.listdir(self.playbooks)), ["other_1.md", "sales-v2.md"])

    def test_json_body_or_binary_is_refused(self) -> None:
        """A playbook body must be Markdown text: JSON type → 415, invalid UTF-8 → 400."""
        self.assertEqual(self.save(b"x.md", b"{}", b"application/json")[0], 415)
        self.assertEqual(self.save(b"x.md", b"\xff\xfe", b"text/markdown")[0], 400)
        self.assertFalse(os.path.exists(os.path.join(self.playbooks, "x.md")))

    def test_symlink_out_of_the_directory_is_refused(self) -> None:
        """A link in the playbook directory pointing elsewhere is not written through."""
        os.makedirs(self.playbooks)
        target = os.path.join(self.root, "outside.md")
        os.symlink(target, os.path.join(self.playbooks, "link.md"))
        self.assertEqual(self.save(b"link.md"), (400, b"Invalid filename"))
        self.assertFalse(os.path.exists(target))


# --- the connection level ------------------------------------------------------------------


class _SiteCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = ApiResource(FakeSessions("s1"), self.clock, (), api=ApiConfig())
        self.site = ActivecallSite(self.resource, header_timeout_s=5.0, max_body_bytes=100, reactor=self.clock)

    def connect(self, factory: Any = None, ip: str = "10.0.0.1") -> tuple[Any, StringTransport]:
        factory = factory or self.site
        address = IPv4Address("TCP", ip, 40000)
        proto = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        proto.makeConnection(transport)
        return proto, transport


class HeaderDeadlineTests(_SiteCase):
    """A request must arrive complete within ``header_timeout_s``; trickling bytes do not reset it."""

    def test_trickled_headers_are_cut_at_the_deadline(self) -> None:
        """A byte a second keeps twisted's idle timeout happy but not the deadline: 408 and close."""
        proto, transport = self.connect()
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 20
        for byte in request[:8]:
            proto.dataReceived(bytes([byte]))
            self.clock.advance(0.5)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.0)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(transport.disconnecting)

    def test_complete_request_in_time_is_served_and_deadline_rearmed(self) -> None:
        """/health answered; the next request on the kept-alive connection gets a fresh deadline."""
        proto, transport = self.connect()
        self.clock.advance(4.0)
        proto.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b'{"status":"ok"}', transport.value())
        self.clock.advance(4.0)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.5)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls() and [c for c in self.clock.getDelayedCalls()
                                                             if c.func.__name__ == "_too_slow"], [])

    def test_closed_connection_leaves_no_timer(self) -> None:
        """Closing the connection cancels its deadline."""
        proto, _ = self.connect()
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active() and c.func.__name__ == "_too_slow"], [])


class BodyLimitTests(_SiteCase):
    """Bodies over ``max_body_bytes`` are refused with 413 before they are buffered."""

    def test_declared_length_over_limit(self) -> None:
        """Content-Length: 10 GB → 413 at once, connection closed, the route never runs."""
        proto, transport = self.connect()
        proto.dataReceived(b"POST /command/s1 HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n" + b"x" * 50)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(transport.disconnecting)
        proto.dataReceived(b"x" * 1000)  # later bytes are ignored, no exception
        self.assertEqual(self.resource._sessions.get("s1").received, [])

    def test_chunked_body_over_limit(self) -> None:
        """A chunked body crossing the limit → 413, nothing rendered."""
        proto, transport = self.connect()
        proto.dataReceived(b"POST /command/s1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        proto.dataReceived(b"64\r\n" + b"x" * 100 + b"\r\n" + b"1\r\nx\r\n0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(self.resource._sessions.get("s1").received, [])

    def test_body_within_limit_is_served(self) -> None:
        """A small JSON body reaches the route."""
        proto, transport = self.connect()
        body = b'{"command":"hangup"}'
        proto.dataReceived(b"POST /command/s1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertIn(b'"status":"sent"', transport.value())


class LoopbackWarningTests(SynchronousTestCase):
    """tap warns about a token-less control API on anything but loopback."""

    def test_is_loopback(self) -> None:
        """127.x, ::1 and localhost are loopback; "", 0.0.0.0 and public addresses are not."""
        from activecall.lifecycle import is_loopback

        for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
            self.assertTrue(is_loopback(host), host)
        for host in ("", "0.0.0.0", "::", "10.0.0.5", "example.com"):
            self.assertFalse(is_loopback(host), host)


class ListenBacklogTests(SynchronousTestCase):
    """The HTTP port queues a burst of connections instead of dropping SYNs (Twisted's default is 50)."""

    def test_http_port_listens_with_a_large_backlog(self) -> None:
        """makeService listens on http_addr with backlog=LISTEN_BACKLOG, far above a burst the limits admit."""
        from twisted.application import internet

        from activecall.tap import Options, makeService

        workdir = tempfile.mkdtemp()
        path = os.path.join(workdir, "activecall.toml")
        with open(path, "w") as f:
            f.write('http_addr = "127.0.0.1:18080"\naddr = "127.0.0.1"\nudp_port = 15060\n'
                    f'media_cache_path = "{workdir}/cache"\n')
        options = Options()
        options.parseOptions(["--conf", path])
        top = makeService(options)

        def walk(service: Any) -> Any:
            yield service
            for child in getattr(service, "services", []):
                yield from walk(child)

        servers = [s for s in walk(top) if isinstance(s, internet.TCPServer) and s.args[0] == 18080]
        self.assertEqual(len(servers), 1)
        self.assertIsInstance(servers[0].args[1], ConnectionLimiter)
        self.assertEqual(servers[0].kwargs.get("backlog"), web.LISTEN_BACKLOG)
        self.assertGreaterEqual(web.LISTEN_BACKLOG, 1024)


class ConnectionCapTests(_SiteCase):
    """``max_connections_per_ip``: one more connection from the same IP gets 503 and is closed."""

    def test_cap_per_ip(self) -> None:
        """Two open from 10.0.0.1 → the third is refused; 10.0.0.2 is not affected; closing frees a slot."""
        limiter = ConnectionLimiter(self.site, 2)
        first, _ = self.connect(limiter)
        self.connect(limiter)
        _, refused = self.connect(limiter)
        self.assertTrue(refused.value().startswith(b"HTTP/1.1 503 "))
        self.assertTrue(refused.disconnecting)
        _, other_ip = self.connect(limiter, ip="10.0.0.2")
        self.assertFalse(other_ip.disconnecting)
        first.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(limiter.open_connections("10.0.0.1"), 1)
        _, again = self.connect(limiter)
        self.assertFalse(again.disconnecting)
        self.assertEqual(limiter.open_connections("10.0.0.1"), 2)

    def test_websocket_sessions_do_not_hold_a_slot(self) -> None:
        """A connection upgraded to a WebSocket leaves its IP's count: one application may hold many sessions."""
        limiter = ConnectionLimiter(self.site, 2)
        upgrade = (b"GET /call?id=s%d HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        sessions = []
        for i in range(5):
            proto, transport = self.connect(limiter)
            proto.dataReceived(upgrade % (i + 10))
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "), transport.value()[:80])
            sessions.append(proto)
        self.assertEqual(limiter.open_connections("10.0.0.1"), 0)
        # Closing a session never makes the count negative; plain HTTP connections still count.
        sessions[0].connectionLost(Failure(ConnectionDone()))
        self.assertEqual(limiter.open_connections("10.0.0.1"), 0)
        self.connect(limiter)
        self.assertEqual(limiter.open_connections("10.0.0.1"), 1)

    def test_requests_still_served_through_the_limiter(self) -> None:
        """/health through the wrapper works as before."""
        proto, transport = self.connect(ConnectionLimiter(self.site, 2))
        proto.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b'{"status":"ok"}', transport.value())


class AccessLogTests(SynchronousTestCase):
    """The access log never contains a ``?token=`` value."""

    def test_token_redacted(self) -> None:
        """``/call?id=x&token=abc`` is logged as ``token=[redacted]``."""
        request = make_request(b"GET", b"/call")
        request.uri = b"/call?token=abc&id=x&xtoken=keep"
        request.code = 101
        request.sentLength = 0
        request.getClientAddress = lambda: IPv4Address("TCP", "10.0.0.1", 1)  # type: ignore[method-assign]
        line = web._access_log_line("[01/Jan/2026:00:00:00 +0000]", request)
        self.assertNotIn("abc", line)
        self.assertIn("/call?token=[redacted]&id=x&xtoken=keep", line)


class EventStreamBacklogTests(SynchronousTestCase):
    """A Server-Sent Events reader that does not read skips events instead of growing memory."""

    def test_events_skipped_past_the_backlog_limit(self) -> None:
        """With 1 MiB unsent on its connection, further events are not written."""
        from activecall.web import SSE_MAX_BACKLOG_BYTES, _EventStream

        class Transport:
            dataBuffer = b""
            _tempDataLen = 0

        request = make_request(b"GET", b"/events/s1")
        request.transport = Transport()
        clock = Clock()
        stream = _EventStream(request, clock, lambda s: None)
        stream.on_event('{"event":"a"}')
        request.transport._tempDataLen = SSE_MAX_BACKLOG_BYTES
        stream.on_event('{"event":"b"}')
        stream.on_command('{"command":"c"}')
        self.assertEqual(request.written, [b'event: event\ndata: {"event":"a"}\n\n'])
        stream.gone()
        self.assertEqual(clock.getDelayedCalls(), [])


class IceServersTests(SynchronousTestCase):
    """/iceservers lists what [[ice_servers]] configures, nothing else."""

    def test_only_configured_servers_with_turn_credential_type(self) -> None:
        """No servers configured: []; a TURN entry carries its credential_type, a STUN one null."""
        from activecall.config import IceServer
        from activecall.web import ice_servers_json

        self.assertEqual(ice_servers_json(()), [])
        got = ice_servers_json((IceServer(urls=("stun:stun.example.net:3478",)),
                                IceServer(urls=("turn:turn.example.net:3478?transport=udp",), username="u",
                                          credential="p")))
        self.assertEqual(got, [
            {"urls": ["stun:stun.example.net:3478"], "username": None, "credential": None, "credential_type": None},
            {"urls": ["turn:turn.example.net:3478?transport=udp"], "username": "u", "credential": "p",
             "credential_type": "password"},
        ])

