"""Unit tests for the incoming-call webhook: payload, notifier (StubTreq) and the ICallHandler."""

from __future__ import annotations

import json
from urllib.parse import quote
import random
from typing import Any, cast

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface.verify import verifyObject

from activecall.config import FetchConfig, WebhookHandlerConfig
from activecall.fetch import Fetcher
from activecall.handlers.pending import PendingCalls
from activecall.handlers.webhook import (
    HttpClient,
    WebhookCallHandler,
    WebhookError,
    WebhookNotifier,
    build_invite_payload,
)
from activecall.ids import IdSource
from activecall.sip.message import SipResponse, parse_message
from activecall.sip.transport import SipDatagramProtocol, SipStack
from activecall.sip.useragent import ICallHandler, InboundCall, SipUserAgent
from activecall.testing_sip import MemoryDatagramTransport

PEER = ("192.0.2.10", 5060)
CALL_ID = "a84b4c76e66710@pc33.example.com"
FROM_TAG = "1928301774"
OFFER = (
    "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
)
HEADER_LINES = [
    "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport",
    "Max-Forwards: 70",
    'From: "Alice Smith" <sip:alice@example.com>;tag=' + FROM_TAG,
    "To: Agent <sip:agent@10.0.0.9:25060;transport=udp>",
    "Call-ID: " + CALL_ID,
    "CSeq: 314159 INVITE",
    "Contact: <sip:alice@192.0.2.10:5060>",
    "X-Tenant: acme",
    "Content-Type: application/sdp",
    f"Content-Length: {len(OFFER)}",
]
INVITE = ("INVITE sip:agent@10.0.0.9:25060 SIP/2.0\r\n" + "\r\n".join(HEADER_LINES)
          + "\r\n\r\n" + OFFER).encode()
CANCEL = (
    "CANCEL sip:agent@10.0.0.9:25060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport\r\n"
    "Max-Forwards: 70\r\n"
    f'From: "Alice Smith" <sip:alice@example.com>;tag={FROM_TAG}\r\n'
    "To: Agent <sip:agent@10.0.0.9:25060;transport=udp>\r\n"
    f"Call-ID: {CALL_ID}\r\nCSeq: 314159 CANCEL\r\nContent-Length: 0\r\n\r\n"
).encode()
# 2026-08-14T07:32:01.623706+00:00 (the protocol.md §1.4 example).
CREATED_AT = 1786692721.623706


class Hook(Resource):
    """A fake webhook server: records each request; answers per host, or holds it open."""

    isLeaf = True

    def __init__(self, codes: dict[str, int] | None = None) -> None:
        super().__init__()
        self.codes = codes or {}
        self.hold = False
        self.requests: list[dict[str, Any]] = []

    def render(self, request: Request) -> bytes | int:
        host = request.getRequestHostname().decode()
        self.requests.append({
            "method": request.method.decode(),
            "host": host,
            "path": request.path.decode(),
            "headers": request.requestHeaders,
            "body": request.content.read() if request.content is not None else b"",
        })
        if self.hold:
            return NOT_DONE_YET
        request.setResponseCode(self.codes.get(host, 200))
        return b"ignored body"

    def hosts(self) -> list[str]:
        return [r["host"] for r in self.requests]


class Unreachable:
    """Wraps a client: requests to ``hosts`` fail as the Agent fails them; the rest pass through."""

    def __init__(self, inner: Any, hosts: dict[str, Exception]) -> None:
        self.inner = inner
        self.hosts = hosts
        self.tried: list[str] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        host = url.split("/")[2]
        self.tried.append(host)
        if host in self.hosts:
            return fail(self.hosts[host])
        result: Deferred[Any] = self.inner.request(method, url, **kwargs)
        return result


def webhook_config(*hosts: str, method: str = "POST",
                   headers: tuple[tuple[str, str], ...] = ()) -> WebhookHandlerConfig:
    return WebhookHandlerConfig(urls=tuple(f"http://{h}/hook" for h in hosts), method=method, headers=headers)


class NotifierTests(SynchronousTestCase):
    """WebhookNotifier: method, headers, round-robin, error texts, timeout and retry rule."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.hook = Hook()
        self.http = cast(HttpClient, StubTreq(self.hook))  # StubTreq builds its methods at run time

    def notifier(self, config: WebhookHandlerConfig, client: Any = None) -> WebhookNotifier:
        return WebhookNotifier(config, client or self.http, self.clock, timeout_s=10.0)

    def test_post_json_with_configured_headers(self) -> None:
        """The payload goes as a JSON body with Content-Type and every configured header pair."""
        n = self.notifier(webhook_config(
            "a.example", headers=(("Authorization", "Bearer x"), ("X-Tenant", "t1"), ("X-Tenant", "t2"))))
        self.assertIsNone(self.successResultOf(n.notify({"event": "invite", "dialogId": "d-1"})))
        (req,) = self.hook.requests
        self.assertEqual(req["method"], "POST")
        self.assertEqual(req["path"], "/hook")
        self.assertEqual(json.loads(req["body"]), {"event": "invite", "dialogId": "d-1"})
        self.assertEqual(req["headers"].getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(req["headers"].getRawHeaders("authorization"), ["Bearer x"])
        self.assertEqual(req["headers"].getRawHeaders("x-tenant"), ["t1", "t2"])

    def test_configured_method_and_content_type(self) -> None:
        """The configured method is used (body still JSON) and a configured Content-Type replaces ours."""
        n = self.notifier(webhook_config("a.example", method="put",
                                         headers=(("content-type", "application/vnd.x+json"),)))
        self.successResultOf(n.notify({"event": "invite"}))
        (req,) = self.hook.requests
        self.assertEqual(req["method"], "PUT")
        self.assertEqual(req["headers"].getRawHeaders("content-type"), ["application/vnd.x+json"])

    def test_round_robin(self) -> None:
        """Successive notifications take the configured URLs in turn, one per INVITE."""
        n = self.notifier(webhook_config("a.example", "b.example"))
        for _ in range(5):
            self.successResultOf(n.notify({}))
        self.assertEqual(self.hook.hosts(), ["a.example", "b.example", "a.example", "b.example", "a.example"])

    def test_any_2xx_is_success(self) -> None:
        """A 204 counts as notified like a 200."""
        self.hook.codes["a.example"] = 204
        self.assertIsNone(self.successResultOf(self.notifier(webhook_config("a.example")).notify({})))

    def test_non_2xx_fails_without_retry(self) -> None:
        """A 500 errbacks WebhookError naming the status and does not try the other URL."""
        self.hook.codes["a.example"] = 500
        n = self.notifier(webhook_config("a.example", "b.example"))
        err = self.failureResultOf(n.notify({}), WebhookError).value
        self.assertEqual(str(err), "failed to send invite to webhook: HTTP 500")
        self.assertEqual(err.status, 500)
        self.assertEqual(self.hook.hosts(), ["a.example"])

    def test_client_error_status_fails(self) -> None:
        """A 404 is not a 2xx, so it fails with the status in the text."""
        self.hook.codes["a.example"] = 404
        err = self.failureResultOf(self.notifier(webhook_config("a.example")).notify({}), WebhookError).value
        self.assertEqual(err.status, 404)

    def test_unencodable_header_fails_cleanly(self) -> None:
        """A configured header value that cannot go on the wire errbacks instead of raising."""
        n = self.notifier(webhook_config("a.example", headers=(("X-Name", "caf\u00e9 \u2615"),)))
        err = self.failureResultOf(n.notify({}), WebhookError).value
        self.assertIn("UnicodeEncodeError", str(err))
        self.assertEqual(self.hook.requests, [])

    def test_no_url(self) -> None:
        """Without url/urls every notification fails at once."""
        n = self.notifier(WebhookHandlerConfig())
        self.assertEqual(str(self.failureResultOf(n.notify({}), WebhookError).value),
                         "no webhook URL configured")

    def test_timeout(self) -> None:
        """No answer within timeout_s errbacks WebhookError, is not retried, and leaves no timer."""
        self.hook.hold = True
        n = self.notifier(webhook_config("a.example", "b.example"))
        d = n.notify({})
        self.assertNoResult(d)
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(str(self.failureResultOf(d, WebhookError).value),
                         "failed to send invite to webhook: timed out after 10 s")
        self.assertEqual(self.hook.hosts(), ["a.example"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_answer_cancels_timer(self) -> None:
        """A prompt answer leaves no timeout armed on the clock."""
        self.successResultOf(self.notifier(webhook_config("a.example")).notify({}))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_refused_tries_next_url(self) -> None:
        """A refused connection (never delivered) moves on to the next URL of this INVITE."""
        client = Unreachable(self.http, {"a.example": ConnectionRefusedError("111: Connection refused")})
        n = self.notifier(webhook_config("a.example", "b.example"), client)
        self.assertIsNone(self.successResultOf(n.notify({})))
        self.assertEqual(client.tried, ["a.example", "b.example"])
        self.assertEqual(self.hook.hosts(), ["b.example"])
        self.flushLoggedErrors()

    def test_each_url_at_most_once(self) -> None:
        """When every URL is unreachable each is tried once, from the round-robin start, then it fails."""
        client = Unreachable(self.http, {
            "a.example": ConnectionRefusedError("111: Connection refused"),
            "b.example": DNSLookupError("b.example"),
            "c.example": ConnectionRefusedError("111: Connection refused"),
        })
        n = self.notifier(webhook_config("a.example", "b.example", "c.example"), client)
        self.successResultOf(n.notify({}).addErrback(lambda f: None))
        err = self.failureResultOf(n.notify({}), WebhookError).value
        self.assertEqual(client.tried, ["a.example", "b.example", "c.example",
                                        "b.example", "c.example", "a.example"])
        self.assertTrue(str(err).startswith("failed to send invite to webhook: ConnectionRefusedError"), err)
        self.assertNotIn("\n", str(err))

    def test_lost_response_not_retried(self) -> None:
        """A request that may have reached the server (no response received) is not sent to another URL."""
        lost = ResponseNeverReceived([Failure(ConnectionLost("Connection lost"))])
        client = Unreachable(self.http, {"a.example": lost})
        n = self.notifier(webhook_config("a.example", "b.example"), client)
        err = self.failureResultOf(n.notify({}), WebhookError).value
        self.assertEqual(client.tried, ["a.example"])
        self.assertTrue(str(err).startswith("failed to send invite to webhook: ResponseNeverReceived: "
                                            "Connection to the other side was lost"), err)

    def test_synchronous_client_error(self) -> None:
        """A client that raises instead of returning a Deferred still yields WebhookError."""

        class Raising:
            def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
                raise ValueError("bad\r\nurl")

        err = self.failureResultOf(self.notifier(webhook_config("a.example"), Raising()).notify({}),
                                   WebhookError).value
        self.assertEqual(str(err), "failed to send invite to webhook: ValueError: bad url")


class Redirecting(Resource):
    """Answers every request on ``a.example`` with a redirect to ``location``; records hosts."""

    isLeaf = True

    def __init__(self, location: str, code: int = 307) -> None:
        super().__init__()
        self.location = location
        self.code = code
        self.hosts: list[str] = []

    def render(self, request: Request) -> bytes:
        host = request.getRequestHostname().decode()
        self.hosts.append(host)
        if host == "a.example":
            request.setResponseCode(self.code)
            request.setHeader(b"location", self.location.encode())
        return b""


class HardenedNotifierTests(SynchronousTestCase):
    """The notifier behind the bounded Fetcher: no cross-host redirects; signed bodies."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_786_692_721.6)

    def test_redirect_to_other_host_is_not_followed(self) -> None:
        """A webhook redirecting to another host fails the INVITE; the other host sees nothing."""
        web = Redirecting("http://169.254.169.254/latest/meta-data")
        stub = StubTreq(web)
        fetcher = Fetcher(stub, self.clock, FetchConfig())
        n = WebhookNotifier(webhook_config("a.example", headers=(("Authorization", "Bearer x"),)), fetcher, self.clock)
        d = n.notify({"event": "invite"})
        stub.flush()
        err = self.failureResultOf(d, WebhookError).value
        self.assertTrue(str(err).startswith("failed to send invite to webhook: FetchRefusedError"), err)
        self.assertEqual(web.hosts, ["a.example"])

    def test_same_host_307_is_followed_with_the_body(self) -> None:
        """A 307 on the same host re-sends the POST and its body."""
        hook = Hook()
        web = Redirecting("http://a.example/new")

        class Router(Resource):
            isLeaf = True

            def render(self, request: Request) -> Any:
                # /hook redirects to /new, which the Hook answers.
                return (hook if request.path == b"/new" else web).render(request)

        stub = StubTreq(Router())
        n = WebhookNotifier(webhook_config("a.example"), Fetcher(stub, self.clock, FetchConfig()), self.clock)
        d = n.notify({"event": "invite"})
        stub.flush()
        self.successResultOf(d)
        self.assertEqual([(r["method"], r["path"], r["body"]) for r in hook.requests],
                         [("POST", "/new", b'{"event":"invite"}')])

    def test_signature_verifies_over_the_exact_body(self) -> None:
        """With a signing secret the request carries t=<now>,v1=HMAC-SHA256(secret, "t.body")."""
        import hashlib
        import hmac

        hook = Hook()
        n = WebhookNotifier(webhook_config("a.example"), cast(HttpClient, StubTreq(hook)), self.clock,
                            signing_secret="whsec")
        self.successResultOf(n.notify({"event": "invite", "caller": "sip:alice@example.com"}))
        (req,) = hook.requests
        (value,) = req["headers"].getRawHeaders("x-activecall-signature")
        t, v1 = (part.split("=", 1)[1] for part in value.split(","))
        self.assertEqual(t, "1786692721")
        expected = hmac.new(b"whsec", t.encode() + b"." + req["body"], hashlib.sha256).hexdigest()
        self.assertTrue(hmac.compare_digest(v1, expected))

    def test_no_signature_without_secret(self) -> None:
        """Without a signing secret no signature header is sent."""
        hook = Hook()
        n = WebhookNotifier(webhook_config("a.example"), cast(HttpClient, StubTreq(hook)), self.clock)
        self.successResultOf(n.notify({}))
        self.assertIsNone(hook.requests[0]["headers"].getRawHeaders("x-activecall-signature"))


class PayloadTests(SynchronousTestCase):
    """build_invite_payload against a real INVITE parsed by activecall.sip.message."""

    def test_fields(self) -> None:
        """Every field of protocol.md §1.4 is present with the INVITE's values, in the documented order."""
        harness = Harness(self)
        harness.feed(INVITE)
        call = harness.only_pending()
        payload = build_invite_payload(call, CREATED_AT, call.dialog_id)
        self.assertEqual(list(payload), ["event", "dialogId", "call_id", "from_tag", "to_tag", "createdAt",
                                         "caller", "callee", "headers", "offer"])
        to_tag = payload["to_tag"]
        self.assertRegex(to_tag, r"\A[A-Za-z0-9]{8}\Z")
        larger, smaller = sorted([FROM_TAG, to_tag], key=lambda t: t.encode(), reverse=True)
        self.assertEqual(payload["event"], "invite")
        self.assertEqual(payload["dialogId"], f"{CALL_ID}-{larger}-{smaller}")
        self.assertEqual(payload["call_id"], CALL_ID)
        self.assertEqual(payload["from_tag"], FROM_TAG)
        self.assertEqual(payload["createdAt"], "2026-08-14T07:32:01.623706+00:00")
        self.assertEqual(payload["caller"], "sip:alice@example.com")
        self.assertEqual(payload["callee"], "sip:agent@10.0.0.9:25060;transport=udp")
        # The transport stamps received/rport on the top Via (RFC 3261 §18.2.1) before the TU sees it.
        via = HEADER_LINES[0].replace(";rport", ";rport=5060;received=192.0.2.10")
        self.assertEqual(payload["headers"], [via, *HEADER_LINES[1:]])
        self.assertEqual(payload["offer"], OFFER)
        json.dumps(payload)  # JSON-serializable as is

    def test_dialog_id_argument_is_used(self) -> None:
        """The dialogId is the one passed in, while call_id/from_tag/to_tag come from the call."""
        harness = Harness(self)
        harness.feed(INVITE)
        payload = build_invite_payload(harness.only_pending(), 0.0, "given-id")
        self.assertEqual(payload["dialogId"], "given-id")
        self.assertEqual(payload["createdAt"], "1970-01-01T00:00:00.000000+00:00")


class Harness:
    """A SIP user agent on a memory transport whose handler is a WebhookCallHandler over StubTreq."""

    def __init__(self, test: SynchronousTestCase, config: WebhookHandlerConfig | None = None,
                 notifier: Any = None, node: tuple[str, str] | None = None) -> None:
        self.test = test
        self.sip_clock = Clock()
        self.clock = Clock()  # the handler's own clock, so SIP timers do not mix with ours
        self.clock.advance(CREATED_AT)
        self.hook = Hook()
        self.notifier = notifier or WebhookNotifier(config or webhook_config("a.example"),
                                                    cast(HttpClient, StubTreq(self.hook)), self.clock)
        self.pending = PendingCalls(self.clock, accept_timeout_s=60.0)
        self.handler = WebhookCallHandler(self.notifier, self.pending, self.clock, node=node)
        ids = IdSource(random.Random(7))
        self.stack = SipStack(self.sip_clock, ids, shards=1)
        self.ua = SipUserAgent(self.stack, ids=ids, handler=self.handler, useragent="test-ua")
        self.proto = SipDatagramProtocol(self.stack)
        self.transport = MemoryDatagramTransport(("10.0.0.9", 25060))
        self.proto.makeConnection(self.transport)  # type: ignore[arg-type]
        self.stack.add_listener("udp", "10.0.0.9", 25060, self.proto)

    def feed(self, data: bytes) -> None:
        self.proto.datagramReceived(data, PEER)

    def responses(self) -> list[SipResponse]:
        out = [parse_message(data) for data, _ in self.transport.written]
        self.transport.written.clear()
        return [m for m in out if isinstance(m, SipResponse)]

    def finals(self) -> list[SipResponse]:
        return [r for r in self.responses() if r.status >= 200]

    def only_pending(self) -> InboundCall:
        (dialog_id,) = list(self.pending)
        call = self.pending.get(dialog_id)
        assert isinstance(call, InboundCall)
        return call


class HandlerTests(SynchronousTestCase):
    """WebhookCallHandler: INVITE → webhook → pending, and the SIP answers of every failure path."""

    def test_provides_interface(self) -> None:
        """The handler provides ICallHandler."""
        harness = Harness(self)
        verifyObject(ICallHandler, harness.handler)

    def test_invite_notifies_and_waits(self) -> None:
        """A new INVITE posts its payload once and stays pending, unanswered, under its dialogId."""
        harness = Harness(self)
        harness.feed(INVITE)
        self.assertEqual(harness.finals(), [])
        call = harness.only_pending()
        (req,) = harness.hook.requests
        payload = json.loads(req["body"])
        self.assertEqual(payload, build_invite_payload(call, CREATED_AT, call.dialog_id))
        self.assertIn(payload["dialogId"], harness.pending)

    def test_cluster_payload_names_the_owner(self) -> None:
        """In a cluster the payload also names this node and its /call/sip socket for the dialogId."""
        harness = Harness(self, node=("node-a", "https://10.0.0.5:8443/"))
        harness.feed(INVITE)
        call = harness.only_pending()
        payload = json.loads(harness.hook.requests[0]["body"])
        self.assertEqual(payload["node"], "node-a")
        self.assertEqual(payload["wsUrl"], "wss://10.0.0.5:8443/call/sip?id=" + quote(call.dialog_id, safe=""))
        self.assertEqual({k: v for k, v in payload.items() if k not in ("node", "wsUrl")},
                         build_invite_payload(call, CREATED_AT, call.dialog_id))

    def test_webhook_error_rejects_503(self) -> None:
        """A non-2xx webhook answer rejects the INVITE 503 with Reason Failed to process invite and forgets it."""
        harness = Harness(self)
        harness.hook.codes["a.example"] = 500
        harness.feed(INVITE)
        (final,) = harness.finals()
        self.assertEqual((final.status, final.reason), (503, "Service Unavailable"))
        self.assertEqual(final.headers.get("Reason"),
                         "Failed to process invite: failed to send invite to webhook: HTTP 500")
        self.assertEqual(len(harness.pending), 0)
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_no_url_rejects_503(self) -> None:
        """A webhook handler without URLs answers every INVITE 503."""
        harness = Harness(self, WebhookHandlerConfig())
        harness.feed(INVITE)
        (final,) = harness.finals()
        self.assertEqual(final.status, 503)
        self.assertEqual(final.headers.get("Reason"), "Failed to process invite: no webhook URL configured")
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_webhook_timeout_rejects_503(self) -> None:
        """A webhook that never answers gets the INVITE rejected 503 after 10 s on the injected clock."""
        harness = Harness(self)
        harness.hook.hold = True
        harness.feed(INVITE)
        harness.clock.advance(9)
        self.assertEqual(harness.finals(), [])
        harness.clock.advance(1)
        (final,) = harness.finals()
        self.assertEqual(final.status, 503)
        self.assertEqual(final.headers.get("Reason"),
                         "Failed to process invite: failed to send invite to webhook: timed out after 10 s")
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_accept_timeout_408(self) -> None:
        """A notified call nobody claims is answered 408 Request Timeout, Reason accept timeout, at 60 s."""
        harness = Harness(self)
        harness.feed(INVITE)
        harness.clock.advance(59)
        self.assertEqual(harness.finals(), [])
        harness.clock.advance(1)
        (final,) = harness.finals()
        self.assertEqual((final.status, final.reason), (408, "Request Timeout"))
        self.assertEqual(final.headers.get("Reason"), "accept timeout")
        self.assertEqual(len(harness.pending), 0)
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_cancel_forgets_pending(self) -> None:
        """A CANCEL before any client answers forgets the call: no 408 later, no timer left."""
        harness = Harness(self)
        harness.feed(INVITE)
        dialog_id = harness.only_pending().dialog_id
        harness.feed(CANCEL)
        self.assertEqual(sorted(r.status for r in harness.finals()), [200, 487])
        self.assertNotIn(dialog_id, harness.pending)
        self.assertIsNone(harness.pending.take(dialog_id))
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_client_disconnect_603(self) -> None:
        """client_disconnected on the real call sends 603 Decline with Reason handler disconnected."""
        harness = Harness(self)
        harness.feed(INVITE)
        harness.pending.client_disconnected(harness.only_pending().dialog_id)
        (final,) = harness.finals()
        self.assertEqual((final.status, final.reason), (603, "Decline"))
        self.assertEqual(final.headers.get("Reason"), "handler disconnected")
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_late_failure_after_take_is_ignored(self) -> None:
        """A webhook failure after a client already claimed the call does not reject it."""
        waiting: Deferred[None] = Deferred()

        class Slow:
            def notify(self, payload: dict[str, Any]) -> Deferred[None]:
                return waiting

        harness = Harness(self, notifier=Slow())
        harness.feed(INVITE)
        call = harness.only_pending()
        self.assertIs(harness.pending.take(call.dialog_id), call)
        waiting.errback(WebhookError("failed to send invite to webhook: HTTP 502"))
        self.assertEqual(harness.finals(), [])
        self.assertFalse(call.final_sent)

    def test_notifier_raising_rejects_503(self) -> None:
        """A notifier that raises synchronously still gets the INVITE rejected and the entry dropped."""

        class Raising:
            def notify(self, payload: dict[str, Any]) -> Deferred[None]:
                raise RuntimeError("sync boom")

        harness = Harness(self, notifier=Raising())
        harness.feed(INVITE)
        (final,) = harness.finals()
        self.assertEqual((final.status, final.headers.get("Reason")), (503, "Failed to process invite: sync boom"))
        self.assertEqual(len(harness.pending), 0)
        self.assertEqual(harness.clock.getDelayedCalls(), [])
        self.flushLoggedErrors(RuntimeError)

    def test_unexpected_notifier_error_rejects_503(self) -> None:
        """A non-WebhookError failure is logged and still turns into a 503."""

        class Broken:
            def notify(self, payload: dict[str, Any]) -> Deferred[None]:
                return fail(RuntimeError("oops"))

        harness = Harness(self, notifier=Broken())
        harness.feed(INVITE)
        (final,) = harness.finals()
        self.assertEqual(final.headers.get("Reason"), "Failed to process invite: oops")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
