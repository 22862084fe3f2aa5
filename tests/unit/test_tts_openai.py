"""Tests for activecall.speech.tts.openai against a local /v1/audio/speech server."""

from __future__ import annotations

import json
import struct
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
from zope.interface.verify import verifyObject

from activecall.speech.interfaces import ISpeechSynthesizer, ProviderUnavailableError, SynthesisError, SynthesisRequest
from activecall.config import FetchConfig
from activecall.speech.registry import SynthesisSettings
from activecall.speech.tts.openai import OpenAISynthesizer

_KEY = "sk-test-123"
# 0.5 s of a 440 Hz tone at 24 kHz, s16le
_PCM = (np.sin(np.arange(12000) * 2 * np.pi * 440 / 24000) * 8000).astype("<i2").tobytes()


def _wav_header(rate: int) -> bytes:
    """A streaming-style WAV header: an extra LIST chunk and an unknown (0xFFFFFFFF) data size."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    listing = b"INFOISFT\x05\x00\x00\x00test\x00\x00"
    return (
        b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"LIST" + struct.pack("<I", len(listing)) + listing
        + b"data" + struct.pack("<I", 0xFFFFFFFF)
    )


class SpeechResource(Resource):
    """The OpenAI ``/v1/audio/speech`` wire contract, with the body streamed by the server.

    ``clock`` drives the gaps between pieces; with ``clock=None`` the whole body is written at once.
    """

    isLeaf = True

    def __init__(self, clock: Any = None, pieces: tuple[int, ...] = (1001, 4000, 3001, 2)) -> None:
        super().__init__()
        self.clock = clock
        self.pieces = pieces
        self.delay_s = 0.05
        self.mode = "ok"  # "ok", "500", "429", "stall", "mp3"
        self.requests: list[dict[str, Any]] = []
        self.lost: Deferred[None] = Deferred()
        self._calls: list[IDelayedCall] = []

    def _error(self, request: Request, code: int, message: str, type_: str, err_code: str | None) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": err_code}}).encode()

    def render_POST(self, request: Request) -> bytes | int:
        body = json.loads(request.content.read())
        self.requests.append(
            {"path": request.path, "auth": request.getHeader(b"authorization"), "ctype": request.getHeader(b"content-type"), "body": body}
        )
        if request.path == b"/moved/audio/speech":
            request.setResponseCode(307)
            request.setHeader(b"location", b"http://elsewhere.test/v1/audio/speech")
            return b""
        if request.path != b"/v1/audio/speech":
            request.setResponseCode(404)
            return b"not found"
        if request.getHeader(b"authorization") != f"Bearer {_KEY}".encode():
            return self._error(request, 401, "Incorrect API key provided: sk-wrong.", "invalid_request_error", "invalid_api_key")
        if set(body) - {"model", "input", "voice", "response_format", "speed", "instructions"} or not body.get("input"):
            return self._error(request, 400, "bad body", "invalid_request_error", None)
        if self.mode == "500":
            return self._error(request, 500, "The server had an error while processing your request.", "server_error", None)
        if self.mode == "429":
            return self._error(request, 429, "Rate limit reached for requests", "requests", "rate_limit_exceeded")
        fmt = body.get("response_format", "mp3")
        if self.mode == "mp3":
            request.setHeader(b"content-type", b"audio/mpeg")
            return b"\xff\xfb\x90\x00" * 100
        request.setHeader(b"content-type", b"audio/wav" if fmt == "wav" else b"audio/pcm")
        data = (_wav_header(22050) if fmt == "wav" else b"") + _PCM
        parts: list[bytes] = []
        pos = 0
        for n in self.pieces:
            parts.append(data[pos : pos + n])
            pos += n
        parts.append(data[pos:])
        if self.clock is None:
            for p in parts:
                request.write(p)
            request.finish()
            return NOT_DONE_YET
        request.notifyFinish().addErrback(self._connection_lost)
        if self.mode == "stall":
            parts = parts[:1]  # send the first piece, then nothing
        self._send(request, parts)
        return NOT_DONE_YET

    def _send(self, request: Request, parts: list[bytes]) -> None:
        request.write(parts[0])
        if len(parts) > 1:
            self._calls.append(self.clock.callLater(self.delay_s, self._send, request, parts[1:]))
        elif self.mode != "stall":
            request.finish()

    def _connection_lost(self, reason: Any) -> None:
        for c in self._calls:
            if c.active():
                c.cancel()
        self.lost.callback(None)

    def stop(self) -> None:
        for c in self._calls:
            if c.active():
                c.cancel()


class _NeverClient:
    """An HTTP client whose requests never get an answer (records cancellation)."""

    def __init__(self) -> None:
        self.cancelled = 0

    def post(self, url: str, **kw: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        return Deferred(cancel)


class OpenAIStubTests(SynchronousTestCase):
    """Request building, key/base URL fallbacks and errors, with treq's StubTreq."""

    def setUp(self) -> None:
        self.resource = SpeechResource()
        self.stub = StubTreq(self.resource)

    def make(self, settings: SynthesisSettings | None = None, environ: dict[str, str] | None = None, client: Any = None) -> OpenAISynthesizer:
        return OpenAISynthesizer(
            settings or SynthesisSettings(endpoint="http://tts.test/v1", api_key=_KEY),
            http_client=client or self.stub,
            clock=getattr(self, "clock", Clock()),
            environ=environ or {},
        )

    def run_synth(self, synth: OpenAISynthesizer, request: SynthesisRequest) -> tuple[Deferred[None], list[tuple[bytes, int]]]:
        got: list[tuple[bytes, int]] = []
        d = synth.synthesize(request, lambda pcm, rate: got.append((pcm, rate)))
        self.stub.flush()
        return d, got

    def test_provides_interface(self) -> None:
        """OpenAISynthesizer provides ISpeechSynthesizer and is named openai."""
        synth = self.make()
        self.assertTrue(verifyObject(ISpeechSynthesizer, synth))
        self.assertEqual(synth.name, "openai")

    def test_request_wire_format(self) -> None:
        """The request is a JSON POST with Bearer auth, defaults for model and voice, pcm format."""
        d, got = self.run_synth(self.make(), SynthesisRequest("Hello there.", speed=1.25))
        self.successResultOf(d)
        [req] = self.resource.requests
        self.assertEqual(req["path"], b"/v1/audio/speech")
        self.assertEqual(req["auth"], f"Bearer {_KEY}".encode())
        self.assertEqual(req["ctype"], b"application/json")
        self.assertEqual(
            req["body"],
            {"model": "gpt-4o-mini-tts", "input": "Hello there.", "voice": "alloy", "response_format": "pcm", "speed": 1.25},
        )
        self.assertEqual(b"".join(p for p, _ in got), _PCM)
        self.assertEqual({r for _, r in got}, {24000})

    def test_request_overrides(self) -> None:
        """Request model, speaker, key and extra instructions take precedence over settings."""
        synth = self.make(SynthesisSettings(endpoint="http://tts.test/v1/", api_key="sk-other", model="tts-1"))
        d, _ = self.run_synth(
            synth,
            SynthesisRequest("Hi.", speaker="nova", model="tts-1-hd", api_key=_KEY, extra={"instructions": "Speak calmly."}),
        )
        self.successResultOf(d)
        body = self.resource.requests[0]["body"]
        self.assertEqual((body["model"], body["voice"], body["instructions"]), ("tts-1-hd", "nova", "Speak calmly."))

    def test_environ_fallbacks(self) -> None:
        """Without settings, the base URL and key come from the injected environ."""
        synth = self.make(SynthesisSettings(), environ={"OPENAI_BASE_URL": "http://env.test/v1", "OPENAI_API_KEY": _KEY})
        self.assertEqual(synth.url_for(SynthesisRequest("x")), "http://env.test/v1/audio/speech")
        d, got = self.run_synth(synth, SynthesisRequest("Hi."))
        self.successResultOf(d)
        self.assertEqual(self.resource.requests[0]["auth"], f"Bearer {_KEY}".encode())
        self.assertTrue(got)

    def test_default_url(self) -> None:
        """With no endpoint anywhere the official API URL is used."""
        synth = self.make(SynthesisSettings(api_key="k"))
        self.assertEqual(synth.url_for(SynthesisRequest("x")), "https://api.openai.com/v1/audio/speech")

    def test_no_key_for_official_api_is_unavailable(self) -> None:
        """The official API without any key is ProviderUnavailableError; a configured self-hosted base needs none."""
        with self.assertRaises(ProviderUnavailableError):
            self.make(SynthesisSettings())
        synth = self.make(SynthesisSettings(), environ={"OPENAI_BASE_URL": "http://tts.test/v1"})
        d, _ = self.run_synth(synth, SynthesisRequest("Hi."))
        self.assertEqual(self.resource.requests[0]["auth"], None)
        self.assertEqual(self.failureResultOf(d, SynthesisError).value.retryable, False)  # our server wants a key

    def test_environment_key_never_goes_to_a_client_endpoint(self) -> None:
        """A client endpoint other than the configured base URL without its own key fails; nothing is sent."""
        environ = {"OPENAI_API_KEY": _KEY, "OPENAI_BASE_URL": "http://tts.test/v1"}
        with self.assertRaises(ProviderUnavailableError) as cm:
            self.make(SynthesisSettings(endpoint="http://collector.evil/v1"), environ=environ)
        self.assertIn("endpoint", str(cm.exception))
        self.assertIn("apiKey", str(cm.exception))
        synth = self.make(SynthesisSettings(), environ=environ)
        d, _ = self.run_synth(synth, SynthesisRequest("Hi.", endpoint="http://collector.evil/v1"))
        err = self.failureResultOf(d, SynthesisError).value
        self.assertFalse(err.retryable)
        self.assertIn("apiKey", str(err))
        self.assertEqual(self.resource.requests, [])
        # The configured base (any trailing slash) still gets the operator's key.
        d, _ = self.run_synth(synth, SynthesisRequest("Hi.", endpoint="http://tts.test/v1/"))
        self.successResultOf(d)
        self.assertEqual(self.resource.requests[0]["auth"], f"Bearer {_KEY}".encode())

    def test_client_endpoint_outside_allowed_hosts_is_refused(self) -> None:
        """A client endpoint must be http(s) and, with fetch.allowed_hosts, on an allowed host; nothing is sent."""
        synth = OpenAISynthesizer(SynthesisSettings(), http_client=self.stub, clock=Clock(), environ={"OPENAI_API_KEY": _KEY},
                                  fetch=FetchConfig(allowed_hosts=("tts.test",)))
        for endpoint in ("http://169.254.169.254/latest", "file:///etc", "gopher://tts.test/v1"):
            d, _ = self.run_synth(synth, SynthesisRequest("Hi.", endpoint=endpoint, api_key=_KEY))
            self.assertIn("endpoint not allowed", str(self.failureResultOf(d, SynthesisError).value))
        self.assertEqual(self.resource.requests, [])
        d, _ = self.run_synth(synth, SynthesisRequest("Hi.", endpoint="http://tts.test/v1", api_key=_KEY))
        self.successResultOf(d)

    def test_redirects_are_not_followed(self) -> None:
        """A 307 from the endpoint is an error; the other host is never asked."""
        d, _ = self.run_synth(self.make(SynthesisSettings(endpoint="http://tts.test/moved", api_key=_KEY)), SynthesisRequest("Hi."))
        self.assertIn("HTTP 307", str(self.failureResultOf(d, SynthesisError).value))
        self.assertEqual([r["path"] for r in self.resource.requests], [b"/moved/audio/speech"])

    def test_response_size_is_capped(self) -> None:
        """Audio beyond fetch.max_bytes fails the synthesis instead of filling memory."""
        synth = OpenAISynthesizer(SynthesisSettings(endpoint="http://tts.test/v1", api_key=_KEY), http_client=self.stub,
                                  clock=Clock(), environ={}, fetch=FetchConfig(max_bytes=len(_PCM) - 1))
        d, _ = self.run_synth(synth, SynthesisRequest("Hi."))
        self.assertIn("larger than", str(self.failureResultOf(d, SynthesisError).value))

    def test_client_endpoint_with_its_own_key(self) -> None:
        """A client endpoint with its own key is used with that key, never the operator's."""
        synth = self.make(SynthesisSettings(), environ={"OPENAI_API_KEY": "sk-operator", "OPENAI_BASE_URL": "http://env.test/v1"})
        d, _ = self.run_synth(synth, SynthesisRequest("Hi.", endpoint="http://tts.test/v1", api_key=_KEY))
        self.successResultOf(d)
        self.assertEqual(self.resource.requests[0]["auth"], f"Bearer {_KEY}".encode())

    def test_unauthorized(self) -> None:
        """A 401 carries OpenAI's error message and is not retryable."""
        d, got = self.run_synth(self.make(SynthesisSettings(endpoint="http://tts.test/v1", api_key="sk-wrong")), SynthesisRequest("Hi."))
        err = self.failureResultOf(d, SynthesisError).value
        self.assertEqual(str(err), "openai TTS HTTP 401: Incorrect API key provided: sk-wrong.")
        self.assertFalse(err.retryable)
        self.assertEqual(got, [])

    def test_server_errors_are_retryable(self) -> None:
        """500 and 429 are retryable SynthesisErrors with the server's message."""
        for mode, text in [("500", "The server had an error"), ("429", "Rate limit reached")]:
            self.resource.mode = mode
            d, _ = self.run_synth(self.make(), SynthesisRequest("Hi."))
            err = self.failureResultOf(d, SynthesisError).value
            self.assertIn(f"HTTP {mode}: {text}", str(err))
            self.assertTrue(err.retryable)

    def test_compressed_response_rejected(self) -> None:
        """A server answering with MP3 despite response_format pcm is a non-retryable error, not noise."""
        self.resource.mode = "mp3"
        d, got = self.run_synth(self.make(), SynthesisRequest("Hi."))
        err = self.failureResultOf(d, SynthesisError).value
        self.assertIn("audio/mpeg", str(err))
        self.assertFalse(err.retryable)
        self.assertEqual(got, [])

    def test_wav_response(self) -> None:
        """With extra response_format wav the header is parsed and its rate reported."""
        d, got = self.run_synth(self.make(), SynthesisRequest("Hi.", extra={"response_format": "wav"}))
        self.successResultOf(d)
        self.assertEqual(self.resource.requests[0]["body"]["response_format"], "wav")
        self.assertEqual(b"".join(p for p, _ in got), _PCM)
        self.assertEqual({r for _, r in got}, {22050})

    def test_idle_timeout(self) -> None:
        """No response within the idle timeout fails retryably and aborts the request."""
        self.clock = Clock()
        client = _NeverClient()
        d = self.make(client=client).synthesize(SynthesisRequest("Hi."), lambda p, r: None)
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertTrue(self.failureResultOf(d, SynthesisError).value.retryable)
        self.assertEqual(client.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_before_response(self) -> None:
        """Cancelling while waiting for the response aborts it and leaves no timer."""
        self.clock = Clock()
        client = _NeverClient()
        d = self.make(client=client).synthesize(SynthesisRequest("Hi."), lambda p, r: None)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(client.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class OpenAILocalServerTests(TestCase):
    """Streaming over a real socket: a twisted.web server on 127.0.0.1 and treq's real client."""

    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.resource = SpeechResource(clock=reactor)
        self.addCleanup(self.resource.stop)
        self.port = reactor.listenTCP(0, Site(self.resource), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = HTTPClient(Agent(reactor, pool=pool))
        base = f"http://127.0.0.1:{self.port.getHost().port}/v1"
        self.synth = OpenAISynthesizer(SynthesisSettings(endpoint=base, api_key=_KEY), http_client=self.client, clock=reactor, environ={})

    @inlineCallbacks
    def test_streams_pieces_as_they_arrive(self) -> Iterator[Deferred[Any]]:
        """Audio reaches on_audio piece by piece, even-length, before the response ends."""
        got: list[tuple[bytes, int, bool]] = []
        d: Deferred[None]
        d = self.synth.synthesize(SynthesisRequest("Hello over a socket."), lambda p, r: got.append((p, r, d.called)))
        yield d
        self.assertGreaterEqual(len(got), 4)
        self.assertFalse(got[0][2])
        self.assertTrue(all(len(p) % 2 == 0 for p, _, _ in got))
        self.assertEqual(b"".join(p for p, _, _ in got), _PCM)
        self.assertEqual(len(got[0][0]), 1000)  # the server's odd first piece, last byte carried
        self.assertEqual(self.resource.requests[0]["body"]["input"], "Hello over a socket.")

    @inlineCallbacks
    def test_errors_over_socket(self) -> Iterator[Deferred[Any]]:
        """A 401 and a 500 from a real server become SynthesisErrors with the server's message."""
        bad = OpenAISynthesizer(
            SynthesisSettings(endpoint=f"http://127.0.0.1:{self.port.getHost().port}/v1", api_key="sk-wrong"),
            http_client=self.client,
            clock=self.reactor,
            environ={},
        )
        err = yield self.assertFailure(bad.synthesize(SynthesisRequest("Hi."), lambda p, r: None), SynthesisError)
        self.assertIn("HTTP 401: Incorrect API key", str(err))
        self.assertFalse(err.retryable)
        self.resource.mode = "500"
        err = yield self.assertFailure(self.synth.synthesize(SynthesisRequest("Hi."), lambda p, r: None), SynthesisError)
        self.assertIn("HTTP 500: The server had an error", str(err))
        self.assertTrue(err.retryable)

    @inlineCallbacks
    def test_cancel_mid_stream_closes_connection(self) -> Iterator[Deferred[Any]]:
        """Cancelling after the first piece stops on_audio and drops the server's connection."""
        self.resource.mode = "stall"
        got: list[bytes] = []
        d: Deferred[None]

        def on_audio(pcm: bytes, rate: int) -> None:
            got.append(pcm)
            d.cancel()

        d = self.synth.synthesize(SynthesisRequest("Hi."), on_audio)
        yield self.assertFailure(d, CancelledError)
        yield self.resource.lost  # the server saw the client go away
        self.assertEqual(len(got), 1)

    @inlineCallbacks
    def test_connection_refused_is_retryable(self) -> Iterator[Deferred[Any]]:
        """A server that is not there gives a retryable SynthesisError."""
        port = self.port.getHost().port
        yield self.port.stopListening()
        synth = OpenAISynthesizer(
            SynthesisSettings(endpoint=f"http://127.0.0.1:{port}/v1", api_key=_KEY), http_client=self.client, clock=self.reactor, environ={}
        )
        err = yield self.assertFailure(synth.synthesize(SynthesisRequest("Hi."), lambda p, r: None), SynthesisError)
        self.assertTrue(err.retryable)
