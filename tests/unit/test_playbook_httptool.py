"""Tests for activecall.playbook.httptool: <http/> and the http tool over a real local server and the Fetcher."""

from __future__ import annotations

from typing import Any, Iterator

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from activecall.config import FetchConfig
from activecall.fetch import Fetcher, http_client_for
from activecall.playbook.httptool import (
    MAX_RESPONSE_CHARS,
    HttpOutcome,
    call_http,
    check_headers,
    tag_method,
    tag_result_note,
    tool_method,
    tool_result_note,
)


class _Api(Resource):
    """``/echo`` answers ``<method> <body>`` and records the request; ``/status/N`` answers N;
    ``/big`` a large body; ``/hang`` never answers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []
        self.hanging: list[Request] = []
        self.lost: Deferred[None] = Deferred()

    def render(self, request: Request) -> Any:
        body = request.content.read() if request.content is not None else b""
        self.seen.append({"method": request.method, "path": request.path, "body": body,
                          "headers": {k.lower(): v[-1] for k, v in request.requestHeaders.getAllRawHeaders()}})
        if request.path == b"/echo":
            return request.method + b" " + body
        if request.path.startswith(b"/status/"):
            request.setResponseCode(int(request.path.rsplit(b"/", 1)[1]))
            return b'{"error": "nope"}'
        if request.path == b"/big":
            return "é".encode() * 10000
        if request.path == b"/hang":
            self.hanging.append(request)
            request.notifyFinish().addErrback(lambda _: self.lost.called or self.lost.callback(None))
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"no"


class CallHttpTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.api = _Api()
        self.port = reactor.listenTCP(0, Site(self.api), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.config = FetchConfig(allowed_hosts=("127.0.0.1",))
        self.fetcher = Fetcher(http_client_for(reactor, self.config, pool), reactor, self.config)

    @inlineCallbacks
    def test_get_and_post(self) -> Iterator[Deferred[Any]]:
        """GET sends no body; POST/PUT (any case) send it raw; anything else in tag form is a GET."""
        outcome = yield call_http(self.fetcher, self.base + "/echo", None, b"ignored")
        self.assertEqual(outcome, HttpOutcome(200, "GET ", None))
        self.assertEqual(self.api.seen[-1]["body"], b"")
        outcome = yield call_http(self.fetcher, self.base + "/echo", "post", b"id=7", {"X-Token": "abc"})
        self.assertEqual(outcome, HttpOutcome(200, "POST id=7", None))
        self.assertEqual(self.api.seen[-1]["headers"][b"x-token"], b"abc")
        self.assertNotIn(b"content-type", self.api.seen[-1]["headers"])  # the tag's body is raw
        outcome = yield call_http(self.fetcher, self.base + "/echo", "Put", b"x")
        self.assertEqual(outcome.text, "PUT x")
        outcome = yield call_http(self.fetcher, self.base + "/echo", "DELETE", b"x")
        self.assertEqual(outcome.text, "GET ")

    @inlineCallbacks
    def test_json_form_methods(self) -> Iterator[Deferred[Any]]:
        """The JSON form allows PATCH and DELETE, defaults to GET, gives the body a JSON type, refuses others."""
        outcome = yield call_http(self.fetcher, self.base + "/echo", "patch", b'{"a": 1}', json_form=True)
        self.assertEqual(outcome.text, 'PATCH {"a": 1}')
        self.assertEqual(self.api.seen[-1]["headers"][b"content-type"], b"application/json")
        outcome = yield call_http(self.fetcher, self.base + "/echo", "DELETE", None, json_form=True)
        self.assertEqual(outcome.text, "DELETE ")
        outcome = yield call_http(self.fetcher, self.base + "/echo", None, None, json_form=True)
        self.assertEqual(outcome.text, "GET ")
        count = len(self.api.seen)
        outcome = yield call_http(self.fetcher, self.base + "/echo", "TRACE", None, json_form=True)
        self.assertIsNone(outcome.status)
        self.assertIn("TRACE", outcome.error)
        self.assertEqual(len(self.api.seen), count)

    @inlineCallbacks
    def test_status_codes(self) -> Iterator[Deferred[Any]]:
        """A non-2xx answer is an outcome with its status and body, not an error."""
        clock = Clock()
        for code in (201, 404, 500):
            outcome = yield call_http(self.fetcher, f"{self.base}/status/{code}", "GET", None, clock=clock)
            self.assertEqual(outcome, HttpOutcome(code, '{"error": "nope"}', None))
            self.assertEqual(outcome.ok, code == 201)
        self.assertEqual(clock.getDelayedCalls(), [])  # each deadline went with its answer

    @inlineCallbacks
    def test_timeout(self) -> Iterator[Deferred[Any]]:
        """A server that never answers: an error outcome once the timeout passes, and the connection is dropped."""
        clock = Clock()
        d = call_http(self.fetcher, self.base + "/hang", "GET", None, timeout_s=2.0, clock=clock)
        while not self.api.hanging:
            yield _turn()
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        outcome = self.successResultOf(d)
        self.assertEqual(outcome, HttpOutcome(None, "", "no answer within 2 s"))
        yield self.api.lost

    @inlineCallbacks
    def test_refused_host(self) -> Iterator[Deferred[Any]]:
        """A host outside [fetch] allowed_hosts, or a non-http URL, is an error outcome and no request."""
        port = self.port.getHost().port
        for url in (f"http://localhost:{port}/echo", "file:///etc/passwd", "http:///x"):
            outcome = yield call_http(self.fetcher, url, "POST", b"x")
            self.assertIsNone(outcome.status)
            self.assertTrue(outcome.error.startswith("refused: "), outcome.error)
        outcome = yield call_http(self.fetcher, f"http://localhost:{port}/echo", None, None)
        self.assertIn("not in fetch.allowed_hosts", outcome.error)
        self.assertEqual(self.api.seen, [])

    @inlineCallbacks
    def test_bad_headers(self) -> Iterator[Deferred[Any]]:
        """A header with CR/LF, a bad name or too many headers, an overlong URL or body: error outcome, no request."""
        for headers in ({"X-A": "v\r\nX-Injected: 1"}, {"Bad Name": "v"}, {f"X-{i}": "v" for i in range(40)},
                        {"X-Long": "v" * 5000}):
            outcome = yield call_http(self.fetcher, self.base + "/echo", "GET", None, headers)
            self.assertTrue(outcome.error.startswith("invalid headers: "), outcome.error)
        outcome = yield call_http(self.fetcher, self.base + "/echo?" + "q" * 3000, "GET", None)
        self.assertIn("URL longer than", outcome.error)
        outcome = yield call_http(self.fetcher, self.base + "/echo", "POST", b"x" * 100_000)
        self.assertIn("request body larger than", outcome.error)
        self.assertEqual(self.api.seen, [])

    @inlineCallbacks
    def test_big_body_cut(self) -> Iterator[Deferred[Any]]:
        """A long body is decoded and cut to 4000 characters; a body past [fetch] max_bytes is an error."""
        outcome = yield call_http(self.fetcher, self.base + "/big", "GET", None)
        self.assertEqual((outcome.status, outcome.text), (200, "é" * MAX_RESPONSE_CHARS))
        from twisted.internet import reactor

        small = FetchConfig(max_bytes=1000)
        fetcher = Fetcher(http_client_for(reactor, small, HTTPConnectionPool(reactor, persistent=False)), reactor, small)
        outcome = yield call_http(fetcher, self.base + "/big", "GET", None)
        self.assertIsNone(outcome.status)
        self.assertIn("too large", outcome.error)

    @inlineCallbacks
    def test_connection_refused(self) -> Iterator[Deferred[Any]]:
        """A server that is down is an error outcome, not a failure."""
        yield self.port.stopListening()
        outcome = yield call_http(self.fetcher, self.base + "/echo", "GET", None)
        self.assertIsNone(outcome.status)
        self.assertTrue(outcome.error.startswith("request failed"), outcome.error)


def _turn() -> Deferred[None]:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.01, lambda: None)


class PureTests(SynchronousTestCase):
    def test_methods(self) -> None:
        """Tag: POST/PUT else GET; tool: the five methods (default GET) else None."""
        self.assertEqual([tag_method(m) for m in (None, "", "post", "PUT", "patch", "delete")],
                         ["GET", "GET", "POST", "PUT", "GET", "GET"])
        self.assertEqual([tool_method(m) for m in (None, "", "patch", "Delete", "trace")],
                         ["GET", "GET", "PATCH", "DELETE", None])

    def test_check_headers(self) -> None:
        """Good headers pass through; each kind of bad one raises."""
        self.assertEqual(check_headers({"Authorization": "Bearer x\ty"}), {"Authorization": "Bearer x\ty"})
        self.assertEqual(check_headers(None), {})
        for bad in ({"X": 1}, {"": "v"}, {"X:Y": "v"}, {"X": "a\nb"}, {"X": "\x00"}, ["X"]):
            self.assertRaises(ValueError, check_headers, bad)

    def test_notes(self) -> None:
        """The tag note names method, URL, status and text, or the error; the tool note is §7.2's."""
        ok = HttpOutcome(200, '{"open": true}')
        self.assertEqual(tag_result_note("post", "https://crm/x", ok),
                         'HTTP POST https://crm/x -> status 200\nResponse: {"open": true}')
        self.assertEqual(tag_result_note(None, "https://crm/x", HttpOutcome(None, "", "no answer within 10 s")),
                         "HTTP GET https://crm/x failed: no answer within 10 s")
        note = tool_result_note(ok)
        first, second = note.split("\n")
        self.assertEqual(first, 'HTTP tool response (200): {"open": true}')
        self.assertIn("already been completed", second)
        self.assertIn("natural language", second)
        self.assertIn("not call", second)
        self.assertEqual(tool_result_note(HttpOutcome(None, "", "refused: x")), "HTTP tool failed: refused: x")
