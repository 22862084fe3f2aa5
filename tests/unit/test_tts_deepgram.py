"""Tests for activecall.speech.tts.deepgram against a local server speaking Deepgram's /v1/speak REST API."""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from activecall.config import FetchConfig
from activecall.speech.interfaces import ProviderUnavailableError, SynthesisError, SynthesisRequest
from activecall.speech.registry import SynthesisSettings
from activecall.speech.tts.deepgram import DeepgramSynthesizer
from activecall.testing import SynthesizerConformanceMixin

_KEY = "dg-test-key"
# 0.5 s of a 440 Hz tone at 16 kHz, s16le
_PCM = (np.sin(np.arange(8000) * 2 * np.pi * 440 / 16000) * 8000).astype("<i2").tobytes()
_MODELS = {"aura-2-thalia-en", "aura-2-andromeda-en", "aura-asteria-en"}


class SpeakResource(Resource):
    """Deepgram's ``POST /v1/speak`` contract: query options, ``Token`` auth, JSON text, raw audio back.

    With ``clock`` the body goes out in ``pieces`` with gaps; with ``clock=None`` all at once.
    Errors use Deepgram's shapes: ``{err_code, err_msg, request_id}`` and ``{category, message, details}``.
    """

    isLeaf = True

    def __init__(self, clock: Any = None, pieces: tuple[int, ...] = (1001, 4000, 3001, 2)) -> None:
        super().__init__()
        self.clock = clock
        self.pieces = pieces
        self.mode = "ok"  # ok, 429, 500, stall, drop, mp3
        self.requests: list[dict[str, Any]] = []
        self.lost: Deferred[None] = Deferred()
        self._calls: list[IDelayedCall] = []

    def _error(self, request: Request, code: int, body: dict[str, Any]) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def render_POST(self, request: Request) -> bytes | int:
        raw = request.content.read()
        query = {k.decode(): v[-1].decode() for k, v in request.args.items()}
        self.requests.append({"host": request.getRequestHostname(), "path": request.path, "query": query,
                              "auth": request.getHeader(b"authorization"), "ctype": request.getHeader(b"content-type"),
                              "body": raw})
        if request.path == b"/moved/v1/speak":
            request.setResponseCode(307)
            request.setHeader(b"location", b"http://elsewhere.test/v1/speak")
            return b""
        if request.path != b"/v1/speak":
            request.setResponseCode(404)
            return b"not found"
        if request.getHeader(b"authorization") != f"Token {_KEY}".encode():
            return self._error(request, 401, {"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials.",
                                              "request_id": "r1"})
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or set(body) != {"text"} or not body["text"]:
            return self._error(request, 400, {"category": "INVALID_JSON", "message": "Invalid JSON submitted.",
                                              "details": "missing field `text`", "request_id": "r2"})
        if query.get("model") not in _MODELS:
            return self._error(request, 400, {"err_code": "Bad Request", "err_msg": "No such model/version/tier.",
                                              "request_id": "r3"})
        if self.mode == "429":
            return self._error(request, 429, {"err_code": "TOO_MANY_REQUESTS",
                                              "err_msg": "Too many requests. Please try again later",
                                              "request_id": "r4"})
        if self.mode == "500":
            return self._error(request, 500, {"err_code": "INTERNAL_SERVER_ERROR", "err_msg": "Something went wrong",
                                              "request_id": "r5"})
        if self.mode == "mp3":
            request.setHeader(b"content-type", b"audio/mpeg")
            return b"\xff\xfb\x90\x00" * 100
        request.setHeader(b"content-type", b"audio/l16;rate=" + query["sample_rate"].encode())
        parts: list[bytes] = []
        pos = 0
        for n in self.pieces:
            parts.append(_PCM[pos : pos + n])
            pos += n
        parts.append(_PCM[pos:])
        if self.clock is None:
            for p in parts:
                request.write(p)
            request.finish()
            return NOT_DONE_YET
        request.notifyFinish().addErrback(self._connection_lost)
        self._send(request, parts)
        return NOT_DONE_YET

    def _send(self, request: Request, parts: list[bytes]) -> None:
        request.write(parts[0])
        if self.mode in ("stall", "drop"):
            if self.mode == "drop":
                self._calls.append(self.clock.callLater(0.05, request.transport.abortConnection))
            return
        if len(parts) > 1:
            self._calls.append(self.clock.callLater(0.05, self._send, request, parts[1:]))
        else:
            request.finish()

    def _connection_lost(self, reason: Any) -> None:
        self.stop()
        if not self.lost.called:
            self.lost.callback(None)

    def stop(self) -> None:
        for c in self._calls:
            if c.active():
                c.cancel()


class _NeverClient:
    """An HTTP client whose requests never get an answer (counts cancellations)."""

    def __init__(self) -> None:
        self.cancelled = 0

    def post(self, url: str, **kw: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        return Deferred(cancel)


class DeepgramStubTests(SynthesizerConformanceMixin, SynchronousTestCase):
    """Request building, key policy and error mapping, with treq's StubTreq in front of the resource."""

    def setUp(self) -> None:
        self.resource = SpeakResource()
        self.stub = StubTreq(self.resource)
        self.clock = Clock()

    def make(self, settings: SynthesisSettings | None = None, environ: dict[str, str] | None = None,
             client: Any = None, fetch: FetchConfig = FetchConfig()) -> DeepgramSynthesizer:
        return DeepgramSynthesizer(settings or SynthesisSettings(endpoint="http://tts.test/v1/speak", api_key=_KEY),
                                   http_client=client or self.stub, clock=self.clock, environ=environ or {}, fetch=fetch)

    make_synthesizer = make

    def run_synth(self, synth: DeepgramSynthesizer, request: SynthesisRequest) -> tuple[Deferred[None], list[tuple[bytes, int]]]:
        got: list[tuple[bytes, int]] = []
        d = synth.synthesize(request, lambda pcm, rate: got.append((pcm, rate)))
        self.stub.flush()
        return d, got

    def test_request_wire_format(self) -> None:
        """POST /v1/speak?model&encoding=linear16&sample_rate&container=none, Token auth, JSON {"text"}."""
        d, got = self.run_synth(self.make(), SynthesisRequest("Hello there."))
        self.successResultOf(d)
        [req] = self.resource.requests
        self.assertEqual(req["path"], b"/v1/speak")
        self.assertEqual(req["query"], {"model": "aura-2-thalia-en", "encoding": "linear16", "sample_rate": "16000",
                                        "container": "none"})
        self.assertEqual(req["auth"], f"Token {_KEY}".encode())
        self.assertEqual(req["ctype"], b"application/json")
        self.assertEqual(json.loads(req["body"]), {"text": "Hello there."})
        self.assertEqual(b"".join(p for p, _ in got), _PCM)
        self.assertEqual({r for _, r in got}, {16000})

    def test_voice_rate_speed_and_extra(self) -> None:
        """speaker (then model) is the model param; unsupported rates fall back to 16 kHz; speed is clamped;
        extra entries become query parameters but cannot change the encoding."""
        synth = self.make(SynthesisSettings(endpoint="http://tts.test/v1/speak", api_key=_KEY, model="aura-asteria-en"))
        d, got = self.run_synth(synth, SynthesisRequest("Hi.", speaker="aura-2-andromeda-en", model="x",
                                                        sample_rate_hz=48000, speed=2.0,
                                                        extra={"mip_opt_out": "true", "encoding": "mp3"}))
        self.successResultOf(d)
        query = self.resource.requests[-1]["query"]
        self.assertEqual((query["model"], query["sample_rate"], query["speed"], query["mip_opt_out"], query["encoding"]),
                         ("aura-2-andromeda-en", "48000", "1.5", "true", "linear16"))
        self.assertEqual({r for _, r in got}, {48000})
        d, got = self.run_synth(synth, SynthesisRequest("Hi.", sample_rate_hz=22050))
        self.successResultOf(d)
        query = self.resource.requests[-1]["query"]
        self.assertEqual((query["model"], query["sample_rate"]), ("aura-asteria-en", "16000"))
        self.assertNotIn("speed", query)
        self.assertEqual({r for _, r in got}, {16000})

    def test_environment_key_goes_to_api_deepgram_com(self) -> None:
        """With no endpoint the official URL gets DEEPGRAM_API_KEY."""
        synth = self.make(SynthesisSettings(), environ={"DEEPGRAM_API_KEY": _KEY})
        self.assertTrue(synth.url_for(SynthesisRequest("x")).startswith("https://api.deepgram.com/v1/speak?"))
        d, _ = self.run_synth(synth, SynthesisRequest("Hi."))
        self.successResultOf(d)
        self.assertEqual(self.resource.requests[0]["host"], b"api.deepgram.com")
        self.assertEqual(self.resource.requests[0]["auth"], f"Token {_KEY}".encode())

    def test_no_key_is_unavailable(self) -> None:
        """No key for the official API, or a configured other endpoint without its own key, cannot be built."""
        with self.assertRaises(ProviderUnavailableError):
            self.make(SynthesisSettings())
        with self.assertRaises(ProviderUnavailableError) as cm:
            self.make(SynthesisSettings(endpoint="http://collector.evil/v1/speak"), environ={"DEEPGRAM_API_KEY": _KEY})
        self.assertIn("apiKey", str(cm.exception))

    def test_environment_key_never_goes_to_a_client_endpoint(self) -> None:
        """A request endpoint elsewhere without its own key fails and nothing is sent; with its own key it works."""
        synth = self.make(SynthesisSettings(), environ={"DEEPGRAM_API_KEY": _KEY})
        d, _ = self.run_synth(synth, SynthesisRequest("Hi.", endpoint="http://collector.evil/v1/speak"))
        err = self.failureResultOf(d, SynthesisError).value
        self.assertFalse(err.retryable)
        self.assertIn("apiKey", str(err))
        self.assertEqual(self.resource.requests, [])
        d, _ = self.run_synth(synth, SynthesisRequest("Hi.", endpoint="http://tts.test/v1/speak", api_key=_KEY))
        self.successResultOf(d)
        self.assertEqual(self.resource.requests[0]["host"], b"tts.test")

    def test_client_endpoint_outside_allowed_hosts_is_refused(self) -> None:
        """A client endpoint must be http(s) on an allowed host; nothing is sent otherwise."""
        synth = self.make(SynthesisSettings(), environ={"DEEPGRAM_API_KEY": _KEY},
                          fetch=FetchConfig(allowed_hosts=("tts.test",)))
        for endpoint in ("http://169.254.169.254/v1/speak", "file:///etc/passwd", "wss://tts.test/v1/speak"):
            d, _ = self.run_synth(synth, SynthesisRequest("Hi.", endpoint=endpoint, api_key=_KEY))
            self.assertIn("endpoint not allowed", str(self.failureResultOf(d, SynthesisError).value))
        self.assertEqual(self.resource.requests, [])

    def test_endpoint_query_is_kept(self) -> None:
        """A query in the configured endpoint survives beside the provider's own parameters."""
        synth = self.make(SynthesisSettings(endpoint="http://tts.test/v1/speak?tag=ivr", api_key=_KEY))
        d, _ = self.run_synth(synth, SynthesisRequest("Hi."))
        self.successResultOf(d)
        self.assertEqual(self.resource.requests[0]["query"]["tag"], "ivr")

    def test_unauthorized(self) -> None:
        """A 401 carries Deepgram's err_msg and is not retryable; no audio is delivered."""
        synth = self.make(SynthesisSettings(endpoint="http://tts.test/v1/speak", api_key="wrong"))
        d, got = self.run_synth(synth, SynthesisRequest("Hi."))
        err = self.failureResultOf(d, SynthesisError).value
        self.assertEqual(str(err), "deepgram TTS HTTP 401: Invalid credentials.")
        self.assertFalse(err.retryable)
        self.assertEqual(got, [])

    def test_error_shapes_and_retryability(self) -> None:
        """429 and 500 are retryable; a 400 in the category/message shape and a bad model are not."""
        for mode, text, retryable in [("429", "HTTP 429: Too many requests", True),
                                      ("500", "HTTP 500: Something went wrong", True)]:
            self.resource.mode = mode
            d, _ = self.run_synth(self.make(), SynthesisRequest("Hi."))
            err = self.failureResultOf(d, SynthesisError).value
            self.assertIn(text, str(err))
            self.assertEqual(err.retryable, retryable)
        self.resource.mode = "ok"
        d, _ = self.run_synth(self.make(), SynthesisRequest("Hi.", speaker="nope"))
        err = self.failureResultOf(d, SynthesisError).value
        self.assertEqual(str(err), "deepgram TTS HTTP 400: No such model/version/tier.")
        self.assertFalse(err.retryable)
        d, _ = self.run_synth(self.make(), SynthesisRequest(""))
        self.assertEqual(str(self.failureResultOf(d, SynthesisError).value), "deepgram TTS HTTP 400: Invalid JSON submitted.")

    def test_compressed_response_rejected(self) -> None:
        """An MP3 answer to a linear16 request is an error, not noise."""
        self.resource.mode = "mp3"
        d, got = self.run_synth(self.make(), SynthesisRequest("Hi."))
        self.assertIn("audio/mpeg", str(self.failureResultOf(d, SynthesisError).value))
        self.assertEqual(got, [])

    def test_redirects_are_not_followed(self) -> None:
        """A 307 is an error; the other host is never asked (the key stays put)."""
        synth = self.make(SynthesisSettings(endpoint="http://tts.test/moved/v1/speak", api_key=_KEY))
        d, _ = self.run_synth(synth, SynthesisRequest("Hi."))
        self.assertIn("HTTP 307", str(self.failureResultOf(d, SynthesisError).value))
        self.assertEqual([r["path"] for r in self.resource.requests], [b"/moved/v1/speak"])

    def test_response_size_is_capped(self) -> None:
        """Audio beyond fetch.max_bytes fails the synthesis."""
        synth = self.make(fetch=FetchConfig(max_bytes=len(_PCM) - 1))
        d, _ = self.run_synth(synth, SynthesisRequest("Hi."))
        self.assertIn("larger than", str(self.failureResultOf(d, SynthesisError).value))

    def test_idle_timeout(self) -> None:
        """No response within the idle timeout fails retryably, aborts the request, leaves no timer."""
        client = _NeverClient()
        d = self.make(client=client).synthesize(SynthesisRequest("Hi."), lambda p, r: None)
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        err = self.failureResultOf(d, SynthesisError).value
        self.assertTrue(err.retryable)
        self.assertIn("no data for 30 s", str(err))
        self.assertEqual(client.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_before_response(self) -> None:
        """Cancelling while waiting aborts the request and leaves no timer."""
        client = _NeverClient()
        d = self.make(client=client).synthesize(SynthesisRequest("Hi."), lambda p, r: None)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(client.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class DeepgramLocalServerTests(TestCase):
    """Streaming over a real socket: a twisted.web server on 127.0.0.1 and treq's real client."""

    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.resource = SpeakResource(clock=reactor)
        self.addCleanup(self.resource.stop)
        self.port = reactor.listenTCP(0, Site(self.resource), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/v1/speak"

    def make(self, **kw: Any) -> DeepgramSynthesizer:
        return DeepgramSynthesizer(SynthesisSettings(endpoint=self.url, api_key=_KEY), http_client=self.client,
                                   clock=self.reactor, environ={}, **kw)

    @inlineCallbacks
    def test_streams_pieces_as_they_arrive(self) -> Iterator[Deferred[Any]]:
        """Audio reaches on_audio piece by piece, even-length, before the response ends."""
        got: list[tuple[bytes, int, bool]] = []
        d: Deferred[None]
        d = self.make().synthesize(SynthesisRequest("Hello over a socket."), lambda p, r: got.append((p, r, d.called)))
        yield d
        self.assertGreaterEqual(len(got), 4)
        self.assertFalse(got[0][2])
        self.assertTrue(all(len(p) % 2 == 0 for p, _, _ in got))
        self.assertEqual(len(got[0][0]), 1000)  # the odd first piece; its last byte waits for the next
        self.assertEqual(b"".join(p for p, _, _ in got), _PCM)
        self.assertEqual(self.resource.requests[0]["query"]["container"], "none")

    @inlineCallbacks
    def test_drop_mid_stream_is_retryable(self) -> Iterator[Deferred[Any]]:
        """A server that cuts the TCP connection after the first piece gives a retryable error."""
        self.resource.mode = "drop"
        got: list[bytes] = []
        err = yield self.assertFailure(self.make().synthesize(SynthesisRequest("Hi."), lambda p, r: got.append(p)),
                                       SynthesisError)
        self.assertTrue(err.retryable)
        self.assertIn("interrupted", str(err))
        self.assertEqual(len(got), 1)

    @inlineCallbacks
    def test_stall_mid_stream_times_out(self) -> Iterator[Deferred[Any]]:
        """A server that goes quiet mid-body fails after the idle timeout and loses the connection."""
        self.resource.mode = "stall"
        err = yield self.assertFailure(self.make(idle_timeout_s=0.3).synthesize(SynthesisRequest("Hi."),
                                                                                lambda p, r: None), SynthesisError)
        self.assertTrue(err.retryable)
        self.assertIn("no data", str(err))
        yield self.resource.lost

    @inlineCallbacks
    def test_cancel_mid_stream_stops_audio(self) -> Iterator[Deferred[Any]]:
        """Cancelling in on_audio: no further on_audio, CancelledError, the server sees the client go."""
        got: list[bytes] = []
        d: Deferred[None]

        def on_audio(pcm: bytes, rate: int) -> None:
            got.append(pcm)
            d.cancel()

        d = self.make().synthesize(SynthesisRequest("Hi."), on_audio)
        yield self.assertFailure(d, CancelledError)
        yield self.resource.lost
        self.assertEqual(len(got), 1)

    @inlineCallbacks
    def test_errors_over_socket(self) -> Iterator[Deferred[Any]]:
        """401 and 429 from a real server keep Deepgram's message and retry rule."""
        bad = DeepgramSynthesizer(SynthesisSettings(endpoint=self.url, api_key="wrong"), http_client=self.client,
                                  clock=self.reactor, environ={})
        err = yield self.assertFailure(bad.synthesize(SynthesisRequest("Hi."), lambda p, r: None), SynthesisError)
        self.assertEqual((str(err), err.retryable), ("deepgram TTS HTTP 401: Invalid credentials.", False))
        self.resource.mode = "429"
        err = yield self.assertFailure(self.make().synthesize(SynthesisRequest("Hi."), lambda p, r: None), SynthesisError)
        self.assertTrue(err.retryable)

    @inlineCallbacks
    def test_connection_refused_is_retryable(self) -> Iterator[Deferred[Any]]:
        """Nobody listening gives a retryable SynthesisError."""
        yield self.port.stopListening()
        err = yield self.assertFailure(self.make().synthesize(SynthesisRequest("Hi."), lambda p, r: None), SynthesisError)
        self.assertTrue(err.retryable)
