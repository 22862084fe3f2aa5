"""Tests for the bounded fetcher: schemes, allow-list, redirects, timeouts and the size cap."""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from activecall.config import FetchConfig
from activecall.fetch import (
    FetchError,
    FetchRefusedError,
    FetchTooLargeError,
    Fetcher,
    host_allowed,
    http_client_for,
    signature,
)

BIG = 4096


class Web(Resource):
    """A fake web: ``/ok``, ``/big`` (fixed length), ``/stream`` (chunked, unbounded),
    ``/hold`` (never answers), ``/to?u=<url>&c=<code>`` (redirect), ``/echo`` (method, headers)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, str, Any]] = []
        self.held: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        path = request.path.decode()
        host = request.getRequestHostname().decode()
        self.requests.append((request.method.decode(), host, path, request.requestHeaders))
        if path == "/big":
            return b"x" * (BIG + 1)
        if path == "/stream":
            for _ in range(10):
                request.write(b"y" * 1000)
            self.held.append(request)
            return NOT_DONE_YET
        if path == "/hold":
            self.held.append(request)
            return NOT_DONE_YET
        if path == "/to":
            request.setResponseCode(int(request.args[b"c"][0]) if b"c" in request.args else 302)
            request.setHeader(b"location", request.args[b"u"][0])
            return b"moved"
        if path == "/missing":
            request.setResponseCode(404)
            return b"secret server text"
        return f"{request.method.decode()} {host} {path}".encode()


class FetcherTests(SynchronousTestCase):
    """Fetcher over StubTreq with an injected Clock."""

    def setUp(self) -> None:
        self.web = Web()
        self.stub = StubTreq(self.web)
        self.clock = Clock()

    def fetcher(self, **changes: Any) -> Fetcher:
        config = FetchConfig(max_bytes=BIG, timeout_s=10.0, **changes)
        return Fetcher(self.stub, self.clock, config)

    def get(self, url: str, **changes: Any) -> Any:
        d = self.fetcher(**changes).get(url)
        self.stub.flush()
        return d

    def test_get_returns_body(self) -> None:
        """A 2xx body is returned whole."""
        self.assertEqual(self.successResultOf(self.get("http://a.test/ok")), b"GET a.test /ok")

    def test_only_http_and_https(self) -> None:
        """file:, ftp: and host-less URLs are refused without any request."""
        for url in ["file:///etc/passwd", "ftp://a.test/x", "http:///x", "gopher://a.test:70/"]:
            self.failureResultOf(self.get(url), FetchError)
        self.assertEqual(self.web.requests, [])

    def test_same_host_redirect_followed(self) -> None:
        """A redirect to the same host (also relative) is followed."""
        d = self.get("http://a.test/to?u=/ok")
        self.assertEqual(self.successResultOf(d), b"GET a.test /ok")

    def test_other_host_redirect_refused_by_default(self) -> None:
        """A redirect to another host fails and the other host is never contacted."""
        d = self.get("http://a.test/to?u=http://internal.test/ok")
        self.failureResultOf(d, FetchError)
        self.assertEqual([r[1] for r in self.web.requests], ["a.test"])

    def test_other_host_redirect_with_follow_redirects(self) -> None:
        """follow_redirects allows other hosts but drops the caller's headers on the way."""
        fetcher = self.fetcher(follow_redirects=True)
        d = fetcher.request("POST", "http://a.test/to?u=http://b.test/ok&c=307", data=b"{}",
                            headers={"Authorization": "Bearer secret"})
        self.stub.flush()
        self.assertEqual(self.successResultOf(d).body, b"POST b.test /ok")
        first, second = self.web.requests
        self.assertEqual(first[3].getRawHeaders("authorization"), ["Bearer secret"])
        self.assertIsNone(second[3].getRawHeaders("authorization"))

    def test_redirect_to_other_scheme_refused(self) -> None:
        """A redirect to a file: URL is refused even with follow_redirects."""
        self.failureResultOf(self.get("http://a.test/to?u=file:///etc/passwd", follow_redirects=True), FetchError)

    def test_too_many_redirects(self) -> None:
        """More than max_redirects hops fail."""
        self.failureResultOf(self.get("http://a.test/to?u=/to%3Fu%3D/ok", max_redirects=1), FetchError)
        self.assertEqual(self.successResultOf(self.get("http://a.test/to?u=/to%3Fu%3D/ok", max_redirects=2)),
                         b"GET a.test /ok")

    def test_post_303_is_the_answer(self) -> None:
        """A 303 answer to a POST is returned, not turned into a body-less GET."""
        d = self.fetcher().post("http://a.test/to?u=/ok&c=303", b"body")
        self.stub.flush()
        self.assertEqual(self.successResultOf(d).code, 303)
        self.assertEqual(len(self.web.requests), 1)

    def test_allow_list(self) -> None:
        """With allowed_hosts only matching hosts are fetched, on the first URL and on redirects."""
        hosts = ("a.test", "*.media.test")
        self.assertEqual(self.successResultOf(self.get("http://cdn.media.test/ok", allowed_hosts=hosts)),
                         b"GET cdn.media.test /ok")
        self.failureResultOf(self.get("http://b.test/ok", allowed_hosts=hosts), FetchError)
        self.failureResultOf(self.get("http://a.test/to?u=http://b.test/ok", allowed_hosts=hosts,
                                      follow_redirects=True), FetchError)
        self.assertNotIn("b.test", [r[1] for r in self.web.requests])

    def test_host_allowed_rules(self) -> None:
        """Exact names, *.suffix sub-domains (not the bare suffix), IPv6 literals, any case."""
        self.assertTrue(host_allowed("anything", ()))
        self.assertTrue(host_allowed("A.Test", ("a.test",)))
        self.assertTrue(host_allowed("x.y.media.test", ("*.media.test",)))
        self.assertFalse(host_allowed("media.test", ("*.media.test",)))
        self.assertFalse(host_allowed("evilmedia.test", ("*.media.test",)))
        self.assertTrue(host_allowed("::1", ("[::1]",)))

    def test_content_length_over_cap_fails_up_front(self) -> None:
        """A Content-Length above max_bytes fails with FetchTooLargeError."""
        d = self.fetcher().request("GET", "http://a.test/big")
        self.stub.flush()
        self.failureResultOf(d, FetchTooLargeError)

    def test_streamed_body_over_cap_fails(self) -> None:
        """A chunked body that passes max_bytes fails while it streams."""
        d = self.fetcher().request("GET", "http://a.test/stream")
        self.stub.flush()
        self.failureResultOf(d, FetchTooLargeError)

    def test_total_timeout(self) -> None:
        """No complete answer within timeout_s: TimeoutError, and get() gives the uniform FetchError."""
        fetcher = self.fetcher()
        d = fetcher.request("GET", "http://a.test/hold")
        g = fetcher.get("http://a.test/hold")
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(10)
        self.failureResultOf(d, DeferredTimeoutError)
        self.failureResultOf(g, FetchError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_uniform_error_text(self) -> None:
        """A 404, a refused host and a too-large body all read the same; details go to the log."""
        logged = EventLoggingObserver.createWithCleanup(self, Fetcher._log.observer)  # type: ignore[attr-defined]
        texts = {str(self.failureResultOf(self.get(url, allowed_hosts=("a.test",))).value)
                 for url in ("http://a.test/missing", "http://b.test/ok", "http://a.test/big")}
        self.assertEqual(len(texts), 3)
        self.assertTrue(all(t.endswith(": unavailable") for t in texts))
        self.assertFalse(any("secret server text" in t or "404" in t for t in texts))
        self.assertIn("HTTP 404", " ".join(str(e.get("reason")) for e in logged))

    def test_refused_url_raises_refused_error_for_request(self) -> None:
        """request() keeps the policy failure type for callers that need it."""
        d = self.fetcher(allowed_hosts=("a.test",)).request("GET", "http://b.test/")
        self.failureResultOf(d, FetchRefusedError)


class RealServerTests(TestCase):
    """The same policy through a real Agent against a twisted.web server on 127.0.0.1."""

    def setUp(self) -> None:
        self.web = Web()
        self.port = reactor.listenTCP(0, Site(self.web), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.fetcher = Fetcher(http_client_for(reactor, FetchConfig()), reactor, FetchConfig(max_bytes=BIG))

        def close_held() -> None:
            for request in self.web.held:
                request.finish()

        self.addCleanup(close_held)

    async def test_redirect_and_body(self) -> None:
        """A same-host redirect is followed over a real connection."""
        body = await self.fetcher.get(self.base + "/to?u=/ok")
        self.assertEqual(body, b"GET 127.0.0.1 /ok")

    async def test_streamed_body_over_cap(self) -> None:
        """The streamed cap closes a real connection."""
        with self.assertRaises(FetchTooLargeError):
            await self.fetcher.request("GET", self.base + "/stream")

    async def test_other_host_redirect_refused(self) -> None:
        """127.0.0.1 redirecting to localhost counts as another host."""
        port = self.port.getHost().port
        with self.assertRaises(FetchRefusedError):
            await self.fetcher.request("GET", f"{self.base}/to?u=http://localhost:{port}/ok")


class SignatureTests(SynchronousTestCase):
    """The webhook signature is an HMAC-SHA256 of "t.body" with the signing secret."""

    def test_known_value(self) -> None:
        """The value matches an independent HMAC computation; t is whole seconds."""
        import hashlib
        import hmac

        value = signature("s3cret", b'{"a":1}', 1700000000.9)
        expected = hmac.new(b"s3cret", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
        self.assertEqual(value, f"t=1700000000,v1={expected}")
