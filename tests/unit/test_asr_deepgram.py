"""DeepgramRecognizer against a local server that speaks Deepgram's live streaming protocol (/v1/listen)."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from activecall.config import FetchConfig
from activecall.speech.asr.deepgram import DEFAULT_ENDPOINT, KEEPALIVE_S, DeepgramRecognizer
from activecall.speech.interfaces import (
    IRecognitionStream,
    IRecognizer,
    ProviderUnavailableError,
    RecognitionError,
    RecognitionRequest,
    Transcript,
)
from activecall.speech.asr import register_builtin_recognizers
from activecall.speech.registry import RecognizerRegistry, RecognizerSettings
from activecall.testing import RecordingListener
from wsfake import FakeWsHandler, FakeWsServer

_ENV = {"DEEPGRAM_API_KEY": "env-secret"}
# 1 s of a 300 Hz tone, 16 kHz s16le, cut into 20 ms frames
_AUDIO = (np.sin(np.arange(16000) * 2 * np.pi * 300 / 16000) * 6000).astype("<i2").tobytes()
_FRAMES = [_AUDIO[i:i + 640] for i in range(0, len(_AUDIO), 640)]


def _results(text: str, *, final: bool, start: float, duration: float, confidence: float = 0.9) -> str:
    """A Deepgram ``Results`` message as the service sends it."""
    return json.dumps({
        "type": "Results", "channel_index": [0, 1], "duration": duration, "start": start, "is_final": final,
        "speech_final": final, "from_finalize": False,
        "channel": {"alternatives": [{"transcript": text, "confidence": confidence, "words": []}]},
        "metadata": {"request_id": "r-1", "model_info": {"name": "general", "version": "x", "arch": "nova-3"},
                     "model_uuid": "u-1"},
    })


_METADATA = json.dumps({"type": "Metadata", "transaction_key": "deprecated", "request_id": "r-1",
                        "sha256": "0" * 64, "created": "2026-01-01T00:00:00.000Z", "duration": 2.0, "channels": 1})




class _Deepgram(FakeWsHandler):
    """Deepgram /v1/listen: an interim result after the first audio, the rest when CloseStream comes."""

    answer_close_stream = True

    def on_binary(self, data: bytes) -> None:
        super().on_binary(data)
        if len(self.binaries) == 1:
            self.send_text(json.dumps({"type": "SpeechStarted", "channel": [0], "timestamp": 0.1}))
            self.send_text(_results("hello", final=False, start=0.0, duration=0.5, confidence=0.7))

    def on_text(self, text: str) -> None:
        super().on_text(text)
        if json.loads(text) == {"type": "CloseStream"} and self.answer_close_stream:
            self.send_text(_results("hello world", final=True, start=0.0, duration=1.0))
            self.send_text(_results("", final=False, start=1.0, duration=0.2))  # silence: skipped
            self.send_text(_results("how", final=False, start=1.0, duration=0.3))
            self.send_text(json.dumps({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 1.0}))
            self.send_text(_results("how are you", final=True, start=1.0, duration=0.8, confidence=0.95))
            self.send_text(_METADATA)
            self.close(1000)


async def _until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.01)


class DeepgramStreamTests(TestCase):
    timeout = 10

    def _server(self, handler: Any) -> str:
        self.server = FakeWsServer(handler)
        port = self.server.listen()
        self.addCleanup(self.server.stop)
        return f"ws://127.0.0.1:{port}/v1/listen"

    def _recognizer(self, clock: Any = reactor, **kwargs: Any) -> DeepgramRecognizer:
        return DeepgramRecognizer(RecognizerSettings(), reactor=reactor, clock=clock, environ=_ENV, **kwargs)

    async def test_session_query_auth_audio_results_and_close_stream(self) -> None:
        """The upgrade carries the query and Token key; audio goes as Binary; partials then finals map to
        indexed transcripts; CloseStream gets the last results before close() fires."""
        url = self._server(_Deepgram)
        listener = RecordingListener()
        request = RecognitionRequest(language="en-US", endpoint=url, api_key="dg-own",
                                     extra={"endpointing": "500", "diarize": "true"})
        stream = self._recognizer().open(request, listener)
        verifyObject(IRecognitionStream, stream)
        for frame in _FRAMES:
            stream.write(frame)
        await _until(lambda: listener.results)
        await stream.close()

        handler = self.server.handlers[0]
        self.assertEqual(handler.headers["authorization"], "Token dg-own")
        self.assertEqual(handler.query, {"model": "nova-3", "language": "en-US", "encoding": "linear16",
                                         "sample_rate": "16000", "channels": "1", "interim_results": "true",
                                         "endpointing": "500", "smart_format": "true", "diarize": "true"})
        self.assertEqual(b"".join(handler.binaries), _AUDIO)
        self.assertEqual([json.loads(t) for t in handler.texts], [{"type": "CloseStream"}])
        self.assertEqual(listener.results, [
            Transcript(0, "hello", False, 0, 500, 0.7),
            Transcript(0, "hello world", True, 0, 1000, 0.9),
            Transcript(1, "how", False, 1000, 1300, 0.9),
            Transcript(1, "how are you", True, 1000, 1800, 0.95),
        ])
        self.assertEqual(listener.failures, [])

    async def test_refused_upgrade_401_not_retryable(self) -> None:
        """A 401 at the upgrade (bad key) fails the stream once, non-retryable, naming the status."""
        class Unauthorized(FakeWsHandler):
            def __init__(self, request: Any) -> None:
                super().__init__(request)
                self.deny = (401, "Unauthorized")

        url = self._server(Unauthorized)
        listener = RecordingListener()
        stream = self._recognizer().open(RecognitionRequest(endpoint=url, api_key="bad"), listener)
        error = await listener.failed_d
        self.assertFalse(error.retryable)
        self.assertIn("401", str(error))
        await stream.close()
        self.assertEqual(len(listener.failures), 1)

    async def test_error_close_frames(self) -> None:
        """Deepgram's error close frames: 1008 DATA-0000 is final, 1011 NET-0001 is worth a retry."""
        for code, reason, retryable in ((1008, "DATA-0000", False), (1011, "NET-0001", True)):
            class Closes(_Deepgram):
                def on_binary(self, data: bytes) -> None:
                    super().on_binary(data)
                    if len(self.binaries) == 1:
                        # Autobahn's sendClose only takes 1000/3000-4999; Deepgram sends protocol codes
                        assert self.peer is not None
                        self.peer.sendCloseFrame(code, reason.encode(), isReply=False)

            url = self._server(Closes)
            listener = RecordingListener()
            stream = self._recognizer().open(RecognitionRequest(endpoint=url, api_key="k"), listener)
            for frame in _FRAMES[:10]:
                stream.write(frame)
            error = await listener.failed_d
            self.assertEqual(error.retryable, retryable)
            self.assertIn(reason, str(error))
            await stream.close()

    async def test_tcp_drop_mid_stream_retryable(self) -> None:
        """A connection cut without a close frame fails the stream once, retryable; the call goes on."""
        class Drops(_Deepgram):
            def on_binary(self, data: bytes) -> None:
                super().on_binary(data)
                self.drop()

        url = self._server(Drops)
        listener = RecordingListener()
        stream = self._recognizer().open(RecognitionRequest(endpoint=url, api_key="k"), listener)
        for frame in _FRAMES[:10]:
            stream.write(frame)
        error = await listener.failed_d
        self.assertTrue(error.retryable)
        stream.write(_FRAMES[0])  # never raises after a failure
        await stream.close()
        self.assertEqual(len(listener.failures), 1)

    async def test_malformed_message_fails(self) -> None:
        """A message that is not a JSON object fails the stream, non-retryable."""
        class Garbage(_Deepgram):
            def opened(self) -> None:
                self.send_text("[1, 2")

        url = self._server(Garbage)
        listener = RecordingListener()
        stream = self._recognizer().open(RecognitionRequest(endpoint=url, api_key="k"), listener)
        error = await listener.failed_d
        self.assertFalse(error.retryable)
        await stream.close()

    async def test_close_bounded_when_server_never_finishes(self) -> None:
        """close() fires after the bounded wait when CloseStream gets no answer; nothing is heard after."""
        class Silent(_Deepgram):
            answer_close_stream = False

        url = self._server(Silent)
        listener = RecordingListener()
        stream = self._recognizer(close_timeout_s=0.3).open(RecognitionRequest(endpoint=url, api_key="k"), listener)
        for frame in _FRAMES:
            stream.write(frame)
        await _until(lambda: listener.results)
        started = time.monotonic()
        await stream.close()
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.25)
        self.assertLess(elapsed, 2.0)
        handler = self.server.handlers[0]
        await handler.closed  # the connection was released
        heard = list(listener.results)
        await deferLater(reactor, 0.1)
        self.assertEqual(listener.results, heard)
        self.assertEqual(listener.failures, [])

    async def test_keepalive_when_no_audio_flows(self) -> None:
        """With no audio for KEEPALIVE_S the stream sends KeepAlive; audio going out postpones it."""
        clock = Clock()
        url = self._server(_Deepgram)
        stream = self._recognizer(clock=clock).open(RecognitionRequest(endpoint=url, api_key="k"), RecordingListener())
        await _until(lambda: stream.conn is not None)
        handler = self.server.handlers[0]
        clock.advance(KEEPALIVE_S)
        await _until(lambda: handler.texts)
        self.assertEqual(json.loads(handler.texts[0]), {"type": "KeepAlive"})
        clock.advance(KEEPALIVE_S - 1)
        for frame in _FRAMES[:5]:
            stream.write(frame)
        clock.advance(1)
        clock.advance(KEEPALIVE_S - 1.5)
        await _until(lambda: handler.binaries)
        await deferLater(reactor, 0.05)
        self.assertEqual(len(handler.texts), 1)
        clock.advance(1)
        await _until(lambda: len(handler.texts) == 2)
        self.assertEqual(json.loads(handler.texts[1]), {"type": "KeepAlive"})
        await stream.close()


class DeepgramRequestTests(SynchronousTestCase):
    def test_default_endpoint_gets_the_environment_key(self) -> None:
        """With no endpoint of its own, a request goes to api.deepgram.com with DEEPGRAM_API_KEY, default query."""
        recognizer = DeepgramRecognizer(RecognizerSettings(), reactor=None, clock=Clock(), environ=_ENV)
        verifyObject(IRecognizer, recognizer)
        self.assertEqual((recognizer.name, recognizer.streaming), ("deepgram", True))
        url, headers = recognizer.connection_for(RecognitionRequest(language="auto"))
        self.assertEqual(url, DEFAULT_ENDPOINT + "?model=nova-3&encoding=linear16&sample_rate=16000&channels=1"
                         "&interim_results=true&endpointing=300&smart_format=true")
        self.assertEqual(headers, {"Authorization": "Token env-secret"})
        url, _ = recognizer.connection_for(RecognitionRequest(model="nova-2-phonecall", language="es",
                                                              extra={"model": "nova-3-medical"}))
        self.assertIn("?model=nova-3-medical&language=es&", url)

    def test_environment_key_never_goes_elsewhere(self) -> None:
        """A foreign endpoint without its own key is refused at open(), before any connection."""
        recognizer = DeepgramRecognizer(RecognizerSettings(), reactor=None, clock=Clock(), environ=_ENV)
        with self.assertRaises(RecognitionError) as caught:
            recognizer.open(RecognitionRequest(endpoint="ws://127.0.0.1:9/v1/listen"), RecordingListener())
        self.assertIn("apiKey", str(caught.exception))
        self.assertNotIn("env-secret", str(caught.exception))

    def test_endpoint_policy_and_key_shape(self) -> None:
        """Endpoints outside fetch.allowed_hosts or not ws/wss are refused; a key with CR/LF is refused."""
        recognizer = DeepgramRecognizer(RecognizerSettings(), reactor=None, clock=Clock(), environ=_ENV,
                                        fetch=FetchConfig(allowed_hosts=("asr.example.com",)))
        for endpoint in ("wss://evil.example/v1/listen", "https://asr.example.com/v1/listen"):
            with self.assertRaises(RecognitionError):
                recognizer.open(RecognitionRequest(endpoint=endpoint, api_key="own"), RecordingListener())
        with self.assertRaises(RecognitionError):
            recognizer.open(RecognitionRequest(api_key="k\r\nX-Evil: 1"), RecordingListener())
        url, headers = recognizer.connection_for(RecognitionRequest(endpoint="wss://asr.example.com/v1/listen",
                                                                    api_key="own"))
        self.assertTrue(url.startswith("wss://asr.example.com/v1/listen?model=nova-3"))
        self.assertEqual(headers, {"Authorization": "Token own"})

    def test_unavailable_without_any_key(self) -> None:
        """No key anywhere for the default endpoint, or a configured foreign endpoint without its own key."""
        with self.assertRaises(ProviderUnavailableError):
            DeepgramRecognizer(RecognizerSettings(), reactor=None, clock=Clock(), environ={})
        with self.assertRaises(ProviderUnavailableError):
            DeepgramRecognizer(RecognizerSettings(endpoint="wss://asr.example.com/v1/listen"), reactor=None,
                               clock=Clock(), environ=_ENV)

    def test_registered(self) -> None:
        """The built-in registration builds this provider from the process settings and environment."""
        registry = RecognizerRegistry()
        register_builtin_recognizers(registry, reactor=reactor, clock=Clock(),
                                     asr_threadpool=None, http_client=None,  # type: ignore[arg-type]
                                     environ=_ENV, models_dir="models")
        self.assertIsInstance(registry.create("deepgram", RecognizerSettings()), DeepgramRecognizer)
