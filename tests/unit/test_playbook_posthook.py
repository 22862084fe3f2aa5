"""Tests for activecall.playbook.posthook: the spec, the instructions, and delivery with retries and a deadline."""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from activecall.config import FetchConfig
from activecall.fetch import SIGNATURE_HEADER, Fetcher, http_client_for, signature
from activecall.playbook.posthook import (
    PosthookError,
    PosthookSpec,
    posthook_timestamp,
    send_posthook,
    summary_instruction,
)

_T0 = 1735725600.123  # 2025-01-01T10:00:00.123Z
_HISTORY = [{"role": "system", "content": "You are a bot."}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "I want a refund."},
            {"role": "system", "content": "HTTP tool response (200): ok", "name": "http"}]


class _Hook(Resource):
    """Answers each request with the next of ``codes`` (then 200); ``hold`` = never answer."""

    isLeaf = True

    def __init__(self, codes: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.codes = list(codes)
        self.hold = False
        self.seen: list[dict[str, Any]] = []
        self.arrived: Optional[Deferred[None]] = None

    def render(self, request: Request) -> Any:
        self.seen.append({"method": request.method, "path": request.path, "body": request.content.read(),
                          "headers": {k.lower(): v[-1] for k, v in request.requestHeaders.getAllRawHeaders()}})
        if self.arrived is not None and not self.arrived.called:
            self.arrived.callback(None)
        if self.hold:
            return NOT_DONE_YET
        request.setResponseCode(self.codes.pop(0) if self.codes else 200)
        return b"thanks"

    def payloads(self) -> list[Any]:
        return [json.loads(s["body"]) for s in self.seen]


class SpecTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Only url given: POST, no summary, no headers, history included, 30 s."""
        spec = PosthookSpec.from_mapping({"url": "https://hooks.example/call"})
        self.assertEqual(spec, PosthookSpec("https://hooks.example/call", None, "POST", (), True, 30.0))

    def test_fields(self) -> None:
        """Every field is read; an invalid method is POST; timeout is clamped to 1..300."""
        spec = PosthookSpec.from_mapping({"url": "http://h/x", "summary": "json", "method": "put",
                                          "headers": {"X-Key": "k1"}, "includeHistory": False, "timeout": 5})
        self.assertEqual(spec, PosthookSpec("http://h/x", "json", "PUT", (("X-Key", "k1"),), False, 5.0))
        self.assertEqual(PosthookSpec.from_mapping({"url": "http://h", "method": "FETCH"}).method, "POST")
        self.assertEqual(PosthookSpec.from_mapping({"url": "http://h", "method": 7}).method, "POST")
        self.assertEqual(PosthookSpec.from_mapping({"url": "http://h", "timeout": 0}).timeout_s, 1.0)
        self.assertEqual(PosthookSpec.from_mapping({"url": "http://h", "timeout": 10_000}).timeout_s, 300.0)
        self.assertIsNone(PosthookSpec.from_mapping({"url": "http://h", "summary": "  "}).summary)

    def test_invalid(self) -> None:
        """A missing or non-http(s) url, bad headers or wrongly typed fields raise PosthookError naming the field."""
        bad = [(None, "posthook"), ({}, "posthook.url"), ({"url": "ftp://h/x"}, "posthook.url"),
               ({"url": "http://"}, "posthook.url"), ({"url": "http://h:99999999/"}, "posthook.url"),
               ({"url": "http://h", "headers": {"X": "a\r\nB: c"}}, "posthook.headers"),
               ({"url": "http://h", "headers": {f"X{i}": "v" for i in range(40)}}, "posthook.headers"),
               ({"url": "http://h", "includeHistory": "yes"}, "posthook.includeHistory"),
               ({"url": "http://h", "timeout": "30"}, "posthook.timeout"),
               ({"url": "http://h", "timeout": True}, "posthook.timeout"),
               ({"url": "http://h", "summary": 3}, "posthook.summary"),
               ({"url": "http://h", "summary": "x" * 5000}, "posthook.summary")]
        for raw, field in bad:
            with self.assertRaises(PosthookError, msg=repr(raw)) as e:
                PosthookSpec.from_mapping(raw)
            self.assertTrue(str(e.exception).startswith(field + ":"), str(e.exception))

    def test_instructions(self) -> None:
        """The four kinds have their own texts (json names its fields); anything else is itself."""
        self.assertIn("one or two sentences", summary_instruction("short"))
        self.assertIn("action items", summary_instruction("detailed"))
        self.assertIn("intent", summary_instruction("intent"))
        for name in ('"intent"', '"key_points"', '"sentiment"'):
            self.assertIn(name, summary_instruction("json"))
        self.assertEqual(summary_instruction("JSON"), summary_instruction("json"))
        self.assertEqual(summary_instruction("List the products mentioned."), "List the products mentioned.")

    def test_timestamp(self) -> None:
        """RFC 3339 UTC with milliseconds and +00:00."""
        self.assertEqual(posthook_timestamp(_T0), "2025-01-01T10:00:00.123+00:00")
        self.assertEqual(posthook_timestamp(0), "1970-01-01T00:00:00.000+00:00")


class SendTests(SynchronousTestCase):
    """Delivery over StubTreq (an in-memory twisted.web server), all time on one Clock."""

    def setUp(self) -> None:
        self.hook = _Hook()
        self.stub = StubTreq(self.hook)
        self.clock = Clock()
        self.clock.advance(_T0)
        self.fetcher = Fetcher(self.stub, self.clock, FetchConfig(timeout_s=60.0))
        self.log = EventLoggingObserver()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)

    def send(self, raw: dict[str, Any], summarize: Any = None, history: Any = None) -> Deferred[None]:
        d = send_posthook(PosthookSpec.from_mapping({"url": "https://hooks.example/done", **raw}),
                          session_id="sess-1", history=list(_HISTORY if history is None else history),
                          summarize=summarize, fetcher=self.fetcher, clock=self.clock, log=Logger())
        self.stub.flush()
        return d

    def messages(self) -> list[str]:
        return [e.get("log_format", "") for e in self.log]

    def test_payload_and_headers(self) -> None:
        """One POST: sessionId, the summary, role/content history (system notes included), a ms timestamp,
        JSON content type and the configured headers; the summarizer got history + the instruction."""
        asked: list[Any] = []

        def summarize(messages: list[dict[str, Any]]) -> Deferred[str]:
            asked.append(messages)
            return succeed("Caller wants a refund.")

        d = self.send({"summary": "short", "headers": {"Authorization": "Bearer hk"}}, summarize)
        self.assertIsNone(self.successResultOf(d))
        [req] = self.hook.seen
        self.assertEqual((req["method"], req["path"]), (b"POST", b"/done"))
        self.assertEqual(req["headers"][b"content-type"], b"application/json")
        self.assertEqual(req["headers"][b"authorization"], b"Bearer hk")
        self.assertNotIn(SIGNATURE_HEADER.lower().encode(), req["headers"])
        self.assertEqual(json.loads(req["body"]), {
            "sessionId": "sess-1", "summary": "Caller wants a refund.",
            "history": [{"role": m["role"], "content": m["content"]} for m in _HISTORY],
            "timestamp": "2025-01-01T10:00:00.123+00:00"})
        [messages] = asked
        self.assertEqual(messages[:-1], _HISTORY)
        self.assertEqual(messages[-1], {"role": "user", "content": summary_instruction("short")})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_summary_and_no_history(self) -> None:
        """Without summary the summarizer is not called and summary is null; includeHistory false -> history null."""
        called: list[Any] = []
        self.successResultOf(self.send({"includeHistory": False, "method": "put"},
                                       lambda m: called.append(m) or succeed("x")))
        [payload] = self.hook.payloads()
        self.assertEqual((payload["summary"], payload["history"]), (None, None))
        self.assertEqual(called, [])
        self.assertEqual(self.hook.seen[0]["method"], b"PUT")

    def test_summary_failure_is_null(self) -> None:
        """A summarizer that fails (or raises, or returns a non-string) gives summary null; the report still goes."""

        def raises(messages: Any) -> Deferred[str]:
            raise RuntimeError("model down")

        for summarize in (lambda m: fail(RuntimeError("HTTP 500")), raises, lambda m: succeed(None)):
            self.successResultOf(self.send({"summary": "detailed"}, summarize))
        self.assertEqual([p["summary"] for p in self.hook.payloads()], [None, None, None])

    def test_retry_after_failure(self) -> None:
        """A 500 then a 503 are retried 1 s and then 2 s later; the third attempt's 200 ends it."""
        self.hook.codes = [500, 503]
        d = self.send({})
        self.assertEqual(len(self.hook.seen), 1)
        self.clock.advance(0.9)
        self.stub.flush()
        self.assertEqual(len(self.hook.seen), 1)
        self.clock.advance(0.1)
        self.stub.flush()
        self.assertEqual(len(self.hook.seen), 2)
        self.clock.advance(1.9)
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.stub.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.hook.seen), 3)
        self.assertEqual(self.hook.payloads()[0], self.hook.payloads()[2])  # the same report each time
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_network_error_retried(self) -> None:
        """A connection failure on the first attempt is retried after 1 s, and the retry delivers."""
        stub = self.stub
        failures = [ConnectionRefusedError("connection refused")]

        class Flaky:
            def request(self, *args: Any, **kw: Any) -> Deferred[Any]:
                return fail(failures.pop()) if failures else stub.request(*args, **kw)

        self.fetcher = Fetcher(Flaky(), self.clock, FetchConfig())
        d = self.send({})
        self.assertEqual(self.hook.seen, [])
        self.clock.advance(1)
        self.stub.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.hook.seen), 1)
        self.assertTrue(any("attempt {n}/{of} failed" in m for m in self.messages()))

    def test_gives_up_after_three(self) -> None:
        """Three failures: no fourth attempt, logged, and the Deferred still succeeds."""
        self.hook.codes = [500, 500, 500, 500]
        d = self.send({})
        for _ in range(4):
            self.clock.advance(2)
            self.stub.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.hook.seen), 3)
        self.assertTrue(any("not delivered after" in m for m in self.messages()))

    def test_refused_url_is_dropped(self) -> None:
        """A host the [fetch] policy refuses never gets a request and is not retried; the hook ends, logged."""
        self.fetcher = Fetcher(self.stub, self.clock, FetchConfig(allowed_hosts=("other.example",)))
        d = self.send({})
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.hook.seen, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(any("refused" in m for m in self.messages()))

    def test_timeout_abandons_a_held_request(self) -> None:
        """A server that never answers: at the hook's timeout the request is cancelled and the hook abandoned."""
        self.hook.hold = True
        d = self.send({"timeout": 5})
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.hook.seen), 1)
        self.assertTrue(any("abandoned" in m for m in self.messages()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout_covers_summary_and_backoff(self) -> None:
        """The deadline counts the summary: a slow summarizer plus the backoff run out of time; no late attempt."""
        slow: Deferred[str] = Deferred()
        self.hook.codes = [500]
        d = self.send({"summary": "short", "timeout": 3}, lambda m: slow)
        self.clock.advance(2.5)
        slow.callback("late summary")
        self.stub.flush()
        self.assertEqual(len(self.hook.seen), 1)  # answered 500: the retry would come at 3.5 s
        self.clock.advance(0.5)
        self.assertIsNone(self.successResultOf(d))
        self.clock.advance(5)
        self.stub.flush()
        self.assertEqual(len(self.hook.seen), 1)
        self.assertTrue(any("abandoned" in m for m in self.messages()))

    def test_summary_that_never_answers(self) -> None:
        """A summarizer that hangs is cancelled at the deadline; nothing is sent."""
        cancelled: list[bool] = []
        d = self.send({"summary": "intent", "timeout": 2}, lambda m: Deferred(lambda _: cancelled.append(True)))
        self.clock.advance(2)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual((cancelled, self.hook.seen), ([True], []))

    def test_signing(self) -> None:
        """With a signing secret the POST carries the [webhook] signature of its exact body."""
        d = send_posthook(PosthookSpec.from_mapping({"url": "https://hooks.example/done"}), session_id="s",
                          history=[], summarize=None, fetcher=self.fetcher, clock=self.clock, signing_secret="sec")
        self.stub.flush()
        self.successResultOf(d)
        [req] = self.hook.seen
        self.assertEqual(req["headers"][SIGNATURE_HEADER.lower().encode()].decode(),
                         signature("sec", req["body"], self.clock.seconds()))


class RealSocketTests(TestCase):
    """End to end over a real socket: the first attempt fails, the retry delivers."""

    timeout = 20

    @inlineCallbacks
    def test_first_attempt_fails(self) -> Iterator[Deferred[Any]]:
        """A 502 from a real server is retried after 1 s on the hook's clock, and the second POST is delivered."""
        from twisted.internet import reactor

        hook = _Hook(codes=(502,))
        port = reactor.listenTCP(0, Site(hook), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        config = FetchConfig()
        fetcher = Fetcher(http_client_for(reactor, config, HTTPConnectionPool(reactor, persistent=False)),
                          reactor, config)
        clock = Clock()
        clock.advance(_T0)
        hook.arrived = Deferred()
        d = send_posthook(PosthookSpec.from_mapping({"url": f"http://127.0.0.1:{port.getHost().port}/hook",
                                                     "headers": {"X-Api-Key": "k"}}),
                          session_id="abc", history=_HISTORY[:2], summarize=None, fetcher=fetcher, clock=clock)
        yield hook.arrived
        while not clock.getDelayedCalls() or len(clock.getDelayedCalls()) < 2:  # the deadline and the backoff
            yield _turn()
        hook.arrived = Deferred()
        clock.advance(1)
        yield hook.arrived
        yield d
        self.assertEqual(len(hook.seen), 2)
        self.assertEqual(hook.payloads()[1]["sessionId"], "abc")
        self.assertEqual(hook.seen[1]["headers"][b"x-api-key"], b"k")
        self.assertEqual(clock.getDelayedCalls(), [])


def _turn() -> Deferred[None]:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.01, lambda: None)
