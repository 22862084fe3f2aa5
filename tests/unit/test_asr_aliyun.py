"""AliyunRecognizer against a local server that speaks DashScope's real-time ASR protocol (run-task duplex)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import numpy as np
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from activecall.config import FetchConfig
from activecall.speech.asr.aliyun import DEFAULT_ENDPOINT, AliyunRecognizer
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

_ENV = {"DASHSCOPE_API_KEY": "env-secret"}
# 1 s of a 300 Hz tone, 16 kHz s16le, cut into 20 ms frames
_AUDIO = (np.sin(np.arange(16000) * 2 * np.pi * 300 / 16000) * 6000).astype("<i2").tobytes()
_FRAMES = [_AUDIO[i:i + 640] for i in range(0, len(_AUDIO), 640)]


def _event(task_id: str, event: str, payload: Any = None, **header: Any) -> str:
    return json.dumps({"header": {"task_id": task_id, "event": event, "attributes": {}, **header},
                       "payload": {} if payload is None else payload})


def _sentence(task_id: str, text: str, begin: int, end: Any, done: bool, heartbeat: bool = False) -> str:
    sentence = {"begin_time": begin, "end_time": end, "text": text, "sentence_end": done, "words": []}
    if heartbeat:
        sentence["heartbeat"] = True
    return _event(task_id, "result-generated",
                  {"output": {"sentence": sentence}, "usage": {"duration": 2} if done else None})




class _DashScope(FakeWsHandler):
    """The inference endpoint: task-started a little after run-task, results, task-finished on finish-task."""

    answer_finish = True
    audio_before_started = -1
    task_id = ""

    def on_text(self, text: str) -> None:
        super().on_text(text)
        message = json.loads(text)
        action = message["header"]["action"]
        if action == "run-task":
            self.task_id = message["header"]["task_id"]
            self.starting = reactor.callLater(0.1, self.start)
        elif action == "finish-task" and self.answer_finish:
            self.send_text(_sentence(self.task_id, "再见", 1300, 2000, True))
            self.send_text(_event(self.task_id, "task-finished", {"output": {}, "usage": None}))

    def start(self) -> None:
        self.audio_before_started = len(self.binaries)
        self.send_text(_event(self.task_id, "task-started"))

    def on_binary(self, data: bytes) -> None:
        super().on_binary(data)
        if len(self.binaries) == 1:
            self.send_text(_sentence(self.task_id, "你好", 100, None, False))
            self.send_text(_sentence(self.task_id, "", 0, 0, False, heartbeat=True))
            self.send_text(_sentence(self.task_id, "你好世界。", 100, 1200, True))


async def _until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.01)


class AliyunStreamTests(TestCase):
    timeout = 10

    def _server(self, handler: Any) -> str:
        self.server = FakeWsServer(handler)
        port = self.server.listen()
        self.addCleanup(self.server.stop)
        return f"ws://127.0.0.1:{port}/api-ws/v1/inference"

    def _recognizer(self, **kwargs: Any) -> AliyunRecognizer:
        return AliyunRecognizer(RecognizerSettings(), reactor=reactor, clock=reactor, environ=_ENV, **kwargs)

    def _open(self, handler: Any, listener: RecordingListener, **kwargs: Any) -> Any:
        url = self._server(handler)
        return self._recognizer(**kwargs).open(RecognitionRequest(endpoint=url, api_key="ds-own"), listener)

    async def test_task_shape_audio_results_and_finish(self) -> None:
        """Bearer key; run-task as documented; no audio before task-started; partial then final results;
        finish-task gets the last result and task-finished before close() fires."""
        url = self._server(_DashScope)
        listener = RecordingListener()
        request = RecognitionRequest(language="zh-CN", endpoint=url, api_key="ds-own",
                                     extra={"disfluency_removal_enabled": "true", "format": "wav",
                                            "vocabulary_id": "vocab-1"})
        stream = self._recognizer().open(request, listener)
        verifyObject(IRecognitionStream, stream)
        for frame in _FRAMES:
            stream.write(frame)
        await _until(lambda: len(listener.results) >= 2)
        await stream.close()

        handler = self.server.handlers[0]
        self.assertEqual(handler.headers["authorization"], "Bearer ds-own")
        run_task = json.loads(handler.texts[0])
        self.assertRegex(run_task["header"]["task_id"], r"^[0-9a-f]{32}$")
        self.assertEqual(run_task, {
            "header": {"action": "run-task", "task_id": handler.task_id, "streaming": "duplex"},
            "payload": {"task_group": "audio", "task": "asr", "function": "recognition",
                        "model": "paraformer-realtime-v2",
                        "parameters": {"format": "pcm", "sample_rate": 16000, "language_hints": ["zh"],
                                       "disfluency_removal_enabled": True, "vocabulary_id": "vocab-1"},
                        "input": {}},
        })
        self.assertEqual(handler.audio_before_started, 0)
        self.assertEqual(b"".join(handler.binaries), _AUDIO)
        self.assertEqual(json.loads(handler.texts[-1]), {
            "header": {"action": "finish-task", "task_id": handler.task_id, "streaming": "duplex"},
            "payload": {"input": {}}})
        self.assertEqual(listener.results, [
            Transcript(0, "你好", False, 100, None),
            Transcript(0, "你好世界。", True, 100, 1200),
            Transcript(1, "再见", True, 1300, 2000),
        ])
        self.assertEqual(listener.failures, [])
        await handler.closed  # we closed the WebSocket after task-finished

    async def test_task_failed(self) -> None:
        """task-failed fails the stream with the server's code and message."""
        class Fails(_DashScope):
            def start(self) -> None:
                self.send_text(_event(self.task_id, "task-failed", error_code="InvalidParameter",
                                      error_message="request timeout after 23 seconds."))

        listener = RecordingListener()
        stream = self._open(Fails, listener)
        error = await listener.failed_d
        self.assertFalse(error.retryable)
        self.assertIn("InvalidParameter", str(error))
        self.assertIn("23 seconds", str(error))
        await stream.close()

        class Throttled(_DashScope):
            def start(self) -> None:
                self.send_text(_event(self.task_id, "task-failed", error_code="Throttling.RateQuota",
                                      error_message="Requests rate limit exceeded"))

        listener = RecordingListener()
        stream = self._open(Throttled, listener)
        self.assertTrue((await listener.failed_d).retryable)
        await stream.close()

    async def test_refused_upgrade_401_not_retryable(self) -> None:
        """A 401 at the upgrade (bad key) fails the stream once, non-retryable, naming the status."""
        class Unauthorized(FakeWsHandler):
            def __init__(self, request: Any) -> None:
                super().__init__(request)
                self.deny = (401, "Unauthorized")

        listener = RecordingListener()
        stream = self._open(Unauthorized, listener)
        error = await listener.failed_d
        self.assertFalse(error.retryable)
        self.assertIn("401", str(error))
        await stream.close()
        self.assertEqual(len(listener.failures), 1)

    async def test_tcp_drop_mid_stream_retryable(self) -> None:
        """A connection cut without a close frame fails the stream once, retryable."""
        class Drops(_DashScope):
            def on_binary(self, data: bytes) -> None:
                super().on_binary(data)
                self.drop()

        listener = RecordingListener()
        stream = self._open(Drops, listener)
        for frame in _FRAMES[:10]:
            stream.write(frame)
        error = await listener.failed_d
        self.assertTrue(error.retryable)
        stream.write(_FRAMES[0])
        await stream.close()
        self.assertEqual(len(listener.failures), 1)

    async def test_hostile_messages_fail(self) -> None:
        """A message for another task, or a result without a sentence, fails the stream."""
        for bad in ("other", "shape"):
            class Hostile(_DashScope):
                def start(self) -> None:
                    if bad == "other":
                        self.send_text(_event("f" * 32, "task-started"))
                    else:
                        self.send_text(_event(self.task_id, "result-generated", {"output": {"sentence": 5}}))

            listener = RecordingListener()
            stream = self._open(Hostile, listener)
            error = await listener.failed_d
            self.assertFalse(error.retryable)
            await stream.close()

    async def test_no_task_started_times_out(self) -> None:
        """A server that never answers run-task fails the stream (retryable) within the connect timeout."""
        class Mute(_DashScope):
            def on_text(self, text: str) -> None:
                self.texts.append(text)

        listener = RecordingListener()
        stream = self._open(Mute, listener, connect_timeout_s=0.3)
        stream.write(_FRAMES[0])
        error = await listener.failed_d
        self.assertTrue(error.retryable)
        self.assertIn("task-started", str(error))
        self.assertEqual(self.server.handlers[0].binaries, [])
        await stream.close()

    async def test_close_bounded_when_server_never_finishes(self) -> None:
        """close() fires after the bounded wait when finish-task gets no answer; nothing is heard after."""
        class Silent(_DashScope):
            answer_finish = False

        listener = RecordingListener()
        stream = self._open(Silent, listener, close_timeout_s=0.3)
        for frame in _FRAMES:
            stream.write(frame)
        await _until(lambda: len(listener.results) >= 2)
        started = time.monotonic()
        await stream.close()
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.25)
        self.assertLess(elapsed, 2.0)
        handler = self.server.handlers[0]
        await handler.closed
        heard = list(listener.results)
        await deferLater(reactor, 0.1)
        self.assertEqual(listener.results, heard)
        self.assertEqual(listener.failures, [])
        self.assertIn("finish-task", handler.texts[-1])


class AliyunRequestTests(SynchronousTestCase):
    def test_default_endpoint_gets_the_environment_key(self) -> None:
        """With no endpoint of its own, a request goes to DashScope with DASHSCOPE_API_KEY as a Bearer token."""
        recognizer = AliyunRecognizer(RecognizerSettings(model="paraformer-realtime-8k-v2"), reactor=None,
                                      clock=Clock(), environ=_ENV)
        verifyObject(IRecognizer, recognizer)
        self.assertEqual((recognizer.name, recognizer.streaming), ("aliyun", True))
        request = RecognitionRequest(language="auto")
        self.assertEqual(recognizer.endpoint_for(request), DEFAULT_ENDPOINT)
        self.assertEqual(recognizer.headers_for(request), {"Authorization": "Bearer env-secret"})
        task = recognizer.run_task_for(request, "a" * 32)
        self.assertEqual(task["payload"]["model"], "paraformer-realtime-8k-v2")
        self.assertEqual(task["payload"]["parameters"], {"format": "pcm", "sample_rate": 16000})
        self.assertEqual(recognizer.run_task_for(RecognitionRequest(model="fun-asr-realtime", extra={"x": "NaN"}),
                                                 "a" * 32)["payload"]["parameters"]["x"], "NaN")

    def test_environment_key_never_goes_elsewhere(self) -> None:
        """A foreign endpoint without its own key is refused at open(), before any connection."""
        recognizer = AliyunRecognizer(RecognizerSettings(), reactor=None, clock=Clock(), environ=_ENV)
        with self.assertRaises(RecognitionError) as caught:
            recognizer.open(RecognitionRequest(endpoint="ws://127.0.0.1:9/api-ws/v1/inference"), RecordingListener())
        self.assertIn("apiKey", str(caught.exception))
        self.assertNotIn("env-secret", str(caught.exception))

    def test_endpoint_policy_and_key_shape(self) -> None:
        """Endpoints outside fetch.allowed_hosts or not ws/wss are refused; a key with CR/LF is refused."""
        recognizer = AliyunRecognizer(RecognizerSettings(), reactor=None, clock=Clock(), environ=_ENV,
                                      fetch=FetchConfig(allowed_hosts=("asr.example.com",)))
        for endpoint in ("wss://evil.example/api-ws/v1/inference", "https://asr.example.com/api-ws/v1/inference"):
            with self.assertRaises(RecognitionError):
                recognizer.open(RecognitionRequest(endpoint=endpoint, api_key="own"), RecordingListener())
        with self.assertRaises(RecognitionError):
            recognizer.open(RecognitionRequest(api_key="k\nX-Evil: 1"), RecordingListener())
        self.assertEqual(recognizer.headers_for(RecognitionRequest(endpoint="wss://asr.example.com/x", api_key="own")),
                         {"Authorization": "Bearer own"})

    def test_unavailable_without_any_key(self) -> None:
        """No key anywhere for the default endpoint, or a configured foreign endpoint without its own key."""
        with self.assertRaises(ProviderUnavailableError):
            AliyunRecognizer(RecognizerSettings(), reactor=None, clock=Clock(), environ={})
        with self.assertRaises(ProviderUnavailableError):
            AliyunRecognizer(RecognizerSettings(endpoint="wss://asr.example.com/x"), reactor=None, clock=Clock(),
                             environ=_ENV)

    def test_task_ids_are_fresh(self) -> None:
        """Each stream gets its own 32-hex task id."""
        ids = {AliyunRecognizer(RecognizerSettings(), reactor=None, clock=Clock(), environ=_ENV)._new_task_id()
               for _ in range(3)}
        self.assertEqual(len(ids), 3)
        self.assertTrue(all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids))

    def test_registered(self) -> None:
        """The built-in registration builds this provider from the process settings and environment."""
        registry = RecognizerRegistry()
        register_builtin_recognizers(registry, reactor=reactor, clock=Clock(),
                                     asr_threadpool=None, http_client=None,  # type: ignore[arg-type]
                                     environ=_ENV, models_dir="models")
        self.assertIsInstance(registry.create("aliyun", RecognizerSettings()), AliyunRecognizer)
