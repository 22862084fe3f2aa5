"""Tests for activecall.speech.asr.openai against a local /v1/audio/transcriptions server."""

from __future__ import annotations

import io
import json
import wave
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Iterator, Optional

import numpy as np
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from activecall.config import FetchConfig
from activecall.speech.asr.openai import OpenAIRecognizer, multipart_body, wav_bytes
from activecall.speech.asr.segments import SegmentStream
from activecall.speech.interfaces import (
    ISegmentRecognizer, ProviderUnavailableError, RecognitionError, RecognitionRequest, RecognizerBusyError,
    SegmentTranscript, Transcript,
)
from activecall.speech.registry import RecognizerSettings

_KEY = "sk-test-123"
# 0.5 s of a 300 Hz tone at 16 kHz, s16le: what the call layer hands a segment recognizer
_PCM = (np.sin(np.arange(8000) * 2 * np.pi * 300 / 16000) * 8000).astype("<i2").tobytes()


def parse_form(content_type: bytes, body: bytes) -> dict[str, Message]:
    """Parse a multipart/form-data body the way a server does (email.parser, no cgi)."""
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise ValueError("not multipart")
    parts: dict[str, Message] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        assert isinstance(name, str)
        parts[name] = part
    return parts


class TranscriptionResource(Resource):
    """The OpenAI ``/v1/audio/transcriptions`` wire contract: checks the form like the real API."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"  # "ok", "500", "never", "huge", "badjson", "plain"
        self.text = "Hello from the server."
        self.requests: list[dict[str, Any]] = []
        self.received: Deferred[None] = Deferred()  # fires when a "never" request is held
        self.lost: Deferred[None] = Deferred()
        self.open_requests: list[Request] = []

    def _error(self, request: Request, code: int, message: str, type_: str, err_code: Optional[str]) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": err_code}}).encode()

    def render_POST(self, request: Request) -> bytes | int:
        ctype = request.getHeader(b"content-type") or b""
        form = parse_form(ctype.encode() if isinstance(ctype, str) else ctype, request.content.read())
        fields = {k: v.get_content() for k, v in form.items() if k != "file"}
        wav_info: Optional[tuple[int, int, int, int]] = None
        if "file" in form:
            part = form["file"]
            with wave.open(io.BytesIO(part.get_payload(decode=True)), "rb") as w:
                wav_info = (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes())
            fields["filename"] = part.get_filename()
            fields["file_type"] = part.get_content_type()
        self.requests.append({"path": request.path, "auth": request.getHeader(b"authorization"), "fields": fields,
                              "wav": wav_info})
        if request.path != b"/v1/audio/transcriptions":
            request.setResponseCode(404)
            return b"not found"
        if request.getHeader(b"authorization") != f"Bearer {_KEY}".encode():
            return self._error(request, 401, "Incorrect API key provided: sk-wrong.", "invalid_request_error",
                               "invalid_api_key")
        if wav_info is None or "model" not in fields:
            return self._error(request, 400, "you must provide a model and a file", "invalid_request_error", None)
        if self.mode == "500":
            return self._error(request, 500, "The server had an error while processing your request.",
                               "server_error", None)
        if self.mode == "never":
            self.open_requests.append(request)
            request.notifyFinish().addErrback(lambda _: self.lost.callback(None))
            self.received.callback(None)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        if self.mode == "huge":
            return json.dumps({"text": "x" * 100_000}).encode()
        if self.mode == "badjson":
            return b'{"text": ["not", "a", "string"]}'
        return json.dumps({"text": self.text, "usage": {"type": "duration", "seconds": 1}}).encode()


class _NeverClient:
    """An HTTP client whose requests never get an answer (records cancellation)."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.posts = 0

    def post(self, url: str, **kw: Any) -> Deferred[Any]:
        self.posts += 1

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        return Deferred(cancel)


class _Listener:
    """Records what a recognition stream reports."""

    def __init__(self) -> None:
        self.transcripts: list[Transcript] = []
        self.drops: list[RecognitionError] = []
        self.fails: list[RecognitionError] = []
        self.got: Deferred[None] = Deferred()

    def transcript(self, result: Transcript) -> None:
        self.transcripts.append(result)
        if result.final and not self.got.called:
            self.got.callback(None)

    def dropped(self, error: RecognitionError) -> None:
        self.drops.append(error)

    def failed(self, error: RecognitionError) -> None:
        self.fails.append(error)


class WireFormatTests(SynchronousTestCase):
    """The WAV and multipart encoders, checked with the standard library's parsers."""

    def test_wav_is_16k_mono_s16(self) -> None:
        """wav_bytes makes a WAV file a decoder reads back as the same 16 kHz mono 16-bit samples."""
        with wave.open(io.BytesIO(wav_bytes(_PCM)), "rb") as w:
            self.assertEqual((w.getframerate(), w.getnchannels(), w.getsampwidth()), (16000, 1, 2))
            self.assertEqual(w.readframes(w.getnframes()), _PCM)

    def test_multipart_round_trip(self) -> None:
        """Fields and the file survive email.parser; the boundary never occurs in the content."""
        data = b"--activecall-\r\n" + _PCM
        ctype, body = multipart_body({"model": "whisper-1", "prompt": 'say "hi"\r\n--x'}, "audio.wav", "audio/wav", data)
        form = parse_form(ctype, body)
        self.assertEqual(form["model"].get_content(), "whisper-1")
        self.assertEqual(form["prompt"].get_content(), 'say "hi"\r\n--x')
        self.assertEqual(form["file"].get_payload(decode=True), data)
        self.assertEqual(form["file"].get_filename(), "audio.wav")


class OpenAIStubTests(SynchronousTestCase):
    """Request building, key policy and errors, with treq's StubTreq."""

    def setUp(self) -> None:
        self.resource = TranscriptionResource()
        self.stub = StubTreq(self.resource)
        self.clock = Clock()

    def make(self, settings: Optional[RecognizerSettings] = None, environ: Optional[dict[str, str]] = None,
             client: Any = None, fetch: FetchConfig = FetchConfig()) -> OpenAIRecognizer:
        return OpenAIRecognizer(settings or RecognizerSettings(endpoint="http://asr.test/v1", api_key=_KEY),
                                http_client=client or self.stub, clock=self.clock, environ=environ or {}, fetch=fetch)

    def go(self, recognizer: OpenAIRecognizer, request: RecognitionRequest = RecognitionRequest(),
            pcm: bytes = _PCM) -> Deferred[SegmentTranscript]:
        d = recognizer.transcribe(pcm, request, False)
        self.stub.flush()
        return d

    def test_provides_interface(self) -> None:
        """OpenAIRecognizer provides ISegmentRecognizer, is named openai and is not streaming."""
        r = self.make()
        self.assertTrue(verifyObject(ISegmentRecognizer, r))
        self.assertEqual((r.name, r.streaming), ("openai", False))

    def test_success_wire_format(self) -> None:
        """A multipart POST with a 16 kHz WAV, whisper-1, json format and Bearer key gives the server's text."""
        result = self.successResultOf(self.go(self.make(), RecognitionRequest(language="en-US")))
        self.assertEqual(result.text, "Hello from the server.")
        [req] = self.resource.requests
        self.assertEqual(req["path"], b"/v1/audio/transcriptions")
        self.assertEqual(req["auth"], f"Bearer {_KEY}".encode())
        self.assertEqual(req["wav"], (16000, 1, 2, len(_PCM) // 2))
        self.assertEqual(req["fields"], {"model": "whisper-1", "response_format": "json", "language": "en",
                                         "filename": "audio.wav", "file_type": "audio/wav"})

    def test_model_and_extra_overrides(self) -> None:
        """asr.model (settings) and the request's model/prompt reach the form; request wins over settings."""
        r = self.make(RecognizerSettings(endpoint="http://asr.test/v1", api_key=_KEY, model="gpt-4o-mini-transcribe"))
        self.successResultOf(self.go(r))
        self.assertEqual(self.resource.requests[0]["fields"]["model"], "gpt-4o-mini-transcribe")
        self.successResultOf(self.go(r, RecognitionRequest(model="whisper-large-v3", extra={"prompt": "Acme"})))
        fields = self.resource.requests[1]["fields"]
        self.assertEqual((fields["model"], fields["prompt"]), ("whisper-large-v3", "Acme"))
        self.assertNotIn("language", fields)

    def test_no_key_for_official_api_is_unavailable(self) -> None:
        """The official API without any key is ProviderUnavailableError; env key and base URL are used."""
        with self.assertRaises(ProviderUnavailableError):
            self.make(RecognizerSettings())
        r = self.make(RecognizerSettings(), environ={"OPENAI_API_KEY": _KEY, "OPENAI_BASE_URL": "http://asr.test/v1"})
        self.successResultOf(self.go(r))
        self.assertEqual(self.resource.requests[0]["auth"], f"Bearer {_KEY}".encode())

    def test_environment_key_never_goes_to_a_client_endpoint(self) -> None:
        """A client endpoint other than the configured base URL without its own key fails; nothing is sent."""
        environ = {"OPENAI_API_KEY": _KEY, "OPENAI_BASE_URL": "http://asr.test/v1"}
        with self.assertRaises(ProviderUnavailableError):
            self.make(RecognizerSettings(endpoint="http://collector.evil/v1"), environ=environ)
        r = self.make(RecognizerSettings(), environ=environ)
        foreign = RecognitionRequest(endpoint="http://collector.evil/v1")
        err = self.failureResultOf(self.go(r, foreign), RecognitionError).value
        self.assertFalse(err.retryable)
        self.assertIn("apiKey", str(err))
        with self.assertRaises(RecognitionError):
            r.open(foreign, _Listener())
        self.assertEqual(self.resource.requests, [])
        self.assertEqual(r.in_flight, 0)
        # the configured base URL (trailing slash or not) still gets the operator's key
        self.successResultOf(self.go(r, RecognitionRequest(endpoint="http://asr.test/v1/")))
        self.assertEqual(self.resource.requests[0]["auth"], f"Bearer {_KEY}".encode())

    def test_client_endpoint_with_own_key_and_allowed_hosts(self) -> None:
        """A client endpoint must pass fetch.allowed_hosts and is sent its own key, never the operator's."""
        r = self.make(RecognizerSettings(), environ={"OPENAI_API_KEY": "sk-operator"},
                      fetch=FetchConfig(allowed_hosts=("asr.test",)))
        for endpoint in ("http://169.254.169.254/latest", "file:///etc"):
            err = self.failureResultOf(self.go(r, RecognitionRequest(endpoint=endpoint, api_key=_KEY)),
                                       RecognitionError).value
            self.assertIn("endpoint not allowed", str(err))
        self.assertEqual(self.resource.requests, [])
        self.successResultOf(self.go(r, RecognitionRequest(endpoint="http://asr.test/v1", api_key=_KEY)))
        self.assertEqual(self.resource.requests[0]["auth"], f"Bearer {_KEY}".encode())

    def test_unauthorized_is_not_retryable(self) -> None:
        """A 401 carries OpenAI's error message and is not retryable."""
        r = self.make(RecognizerSettings(endpoint="http://asr.test/v1", api_key="sk-wrong"))
        err = self.failureResultOf(self.go(r), RecognitionError).value
        self.assertEqual(str(err), "openai ASR HTTP 401: Incorrect API key provided: sk-wrong.")
        self.assertFalse(err.retryable)

    def test_server_error_is_retryable(self) -> None:
        """A 500 is a retryable RecognitionError with the server's message."""
        self.resource.mode = "500"
        err = self.failureResultOf(self.go(self.make()), RecognitionError).value
        self.assertIn("HTTP 500: The server had an error", str(err))
        self.assertTrue(err.retryable)

    def test_oversize_response_refused(self) -> None:
        """A response beyond 64 KiB fails instead of filling memory."""
        self.resource.mode = "huge"
        err = self.failureResultOf(self.go(self.make()), RecognitionError).value
        self.assertIn("larger than 65536 bytes", str(err))
        self.assertFalse(err.retryable)

    def test_invalid_json_shape(self) -> None:
        """A 200 whose JSON has no text string is a RecognitionError, not a crash."""
        self.resource.mode = "badjson"
        self.assertIn("no text", str(self.failureResultOf(self.go(self.make()), RecognitionError).value))

    def test_timeout_on_clock(self) -> None:
        """No answer within 15 s on the injected clock fails retryably and aborts the request."""
        client = _NeverClient()
        d = self.make(client=client).transcribe(_PCM, RecognitionRequest(), False)
        self.clock.advance(14.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        err = self.failureResultOf(d, RecognitionError).value
        self.assertTrue(err.retryable)
        self.assertIn("15 s", str(err))
        self.assertEqual(client.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bounded_concurrency_and_cancel(self) -> None:
        """Eight requests may be in flight; the ninth is refused at once; cancelling frees a slot."""
        client = _NeverClient()
        r = self.make(client=client)
        ds = [r.transcribe(_PCM, RecognitionRequest(), False) for _ in range(8)]
        self.failureResultOf(r.transcribe(_PCM, RecognitionRequest(), True), RecognizerBusyError)
        self.assertEqual(client.posts, 8)
        ds[0].cancel()
        self.failureResultOf(ds[0], CancelledError)
        self.assertEqual((client.cancelled, r.in_flight), (1, 7))
        ds.append(r.transcribe(_PCM, RecognitionRequest(), False))
        self.assertEqual(client.posts, 9)
        for d in ds[1:]:
            d.cancel()
            self.failureResultOf(d, CancelledError)
        self.assertEqual(r.in_flight, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_open_partials_only_when_asked(self) -> None:
        """open() gives a SegmentStream; interim decodes only with extra partials=true."""
        client = _NeverClient()
        r = self.make(client=client)
        for extra, posts in (({}, 0), ({"partials": "true"}, 1)):
            client.posts = 0
            stream = r.open(RecognitionRequest(extra=extra), _Listener())
            self.assertIsInstance(stream, SegmentStream)
            stream.speech_started(0)
            for _ in range(50):  # 1 s of speech, no end yet
                stream.write(_PCM[:640])
            self.assertEqual(client.posts, posts)
            stream.close()


class OpenAILocalServerTests(TestCase):
    """Over a real socket: a twisted.web server on 127.0.0.1 and treq's real client."""

    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.resource = TranscriptionResource()
        self.port = reactor.listenTCP(0, Site(self.resource), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = HTTPClient(Agent(reactor, pool=pool))
        self.base = f"http://127.0.0.1:{self.port.getHost().port}/v1"

    def make(self, key: str = _KEY, clock: Any = None, environ: Optional[dict[str, str]] = None,
             endpoint: Optional[str] = None) -> OpenAIRecognizer:
        return OpenAIRecognizer(RecognizerSettings(endpoint=endpoint or self.base, api_key=key), http_client=self.client,
                                clock=clock or self.reactor, environ=environ or {})

    @inlineCallbacks
    def test_success(self) -> Iterator[Deferred[Any]]:
        """A real multipart upload is parsed by the server and its text comes back."""
        result = yield self.make().transcribe(_PCM, RecognitionRequest(language="en"), False)
        self.assertEqual(result.text, "Hello from the server.")
        self.assertEqual(self.resource.requests[0]["wav"], (16000, 1, 2, len(_PCM) // 2))
        self.assertEqual(self.resource.requests[0]["fields"]["language"], "en")

    @inlineCallbacks
    def test_errors_over_socket(self) -> Iterator[Deferred[Any]]:
        """401 (not retryable) and 500 (retryable) from a real server."""
        err = yield self.assertFailure(self.make(key="sk-wrong").transcribe(_PCM, RecognitionRequest(), False),
                                       RecognitionError)
        self.assertIn("HTTP 401: Incorrect API key", str(err))
        self.assertFalse(err.retryable)
        self.resource.mode = "500"
        err = yield self.assertFailure(self.make().transcribe(_PCM, RecognitionRequest(), False), RecognitionError)
        self.assertIn("HTTP 500", str(err))
        self.assertTrue(err.retryable)

    @inlineCallbacks
    def test_oversize_over_socket(self) -> Iterator[Deferred[Any]]:
        """A 100 KB answer from a real server is refused."""
        self.resource.mode = "huge"
        err = yield self.assertFailure(self.make().transcribe(_PCM, RecognitionRequest(), False), RecognitionError)
        self.assertIn("larger than", str(err))

    @inlineCallbacks
    def test_server_that_never_answers(self) -> Iterator[Deferred[Any]]:
        """A server that takes the request and never answers: timeout on the clock, the connection aborted."""
        self.resource.mode = "never"
        clock = Clock()
        d = self.make(clock=clock).transcribe(_PCM, RecognitionRequest(), False)
        yield self.resource.received
        self.assertNoResult(d)
        clock.advance(14)
        self.assertNoResult(d)
        clock.advance(1)
        err = yield self.assertFailure(d, RecognitionError)
        self.assertTrue(err.retryable)
        self.assertEqual(clock.getDelayedCalls(), [])
        yield self.resource.lost  # the server saw the client go away

    @inlineCallbacks
    def test_env_key_not_sent_to_foreign_endpoint(self) -> Iterator[Deferred[Any]]:
        """With OPENAI_API_KEY for another base URL, a client endpoint without its own key gets no request."""
        r = OpenAIRecognizer(RecognizerSettings(), http_client=self.client, clock=self.reactor,
                             environ={"OPENAI_API_KEY": _KEY, "OPENAI_BASE_URL": "http://asr.invalid/v1"})
        err = yield self.assertFailure(r.transcribe(_PCM, RecognitionRequest(endpoint=self.base), False),
                                       RecognitionError)
        self.assertIn("apiKey", str(err))
        self.assertEqual(self.resource.requests, [])
        result = yield r.transcribe(_PCM, RecognitionRequest(endpoint=self.base, api_key=_KEY), False)
        self.assertEqual(result.text, "Hello from the server.")

    @inlineCallbacks
    def test_open_gives_final_transcript(self) -> Iterator[Deferred[Any]]:
        """open() + VAD hints: the segment is uploaded and a final Transcript reaches the listener."""
        listener = _Listener()
        stream = self.make().open(RecognitionRequest(language="en"), listener)
        for _ in range(10):
            stream.write(b"\x00\x00" * 320)  # 200 ms of silence
        stream.speech_started(200)
        for i in range(0, len(_PCM), 640):
            stream.write(_PCM[i:i + 640])
        stream.speech_ended(700)
        yield listener.got
        [t] = listener.transcripts
        self.assertEqual((t.index, t.text, t.final, t.start_ms, t.end_ms), (0, "Hello from the server.", True, 0, 700))
        [req] = self.resource.requests
        self.assertGreaterEqual(req["wav"][3], len(_PCM) // 2)  # the segment with its pre-roll
        yield stream.close()
