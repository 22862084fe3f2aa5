"""Tests for activecall.speech.tts.aliyun against a local server speaking DashScope's CosyVoice WebSocket protocol."""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from activecall.config import FetchConfig
from activecall.speech.interfaces import ProviderUnavailableError, SynthesisError, SynthesisRequest, WordTiming
from activecall.speech.registry import SynthesisSettings
from activecall.speech.tts.aliyun import AliyunSynthesizer, words_in
from activecall.testing import SynthesizerConformanceMixin
from wsfake import FakeWsHandler, FakeWsServer

_KEY = "sk-dashscope-test"
# 0.4 s of a 330 Hz tone at 16 kHz, s16le, sent in odd-sized frames
_PCM = (np.sin(np.arange(6400) * 2 * np.pi * 330 / 16000) * 9000).astype("<i2").tobytes()
_CHUNKS = (3201, 4000, 2999, len(_PCM) - 10200)
_WORDS = [{"text": "Hello", "begin_index": 0, "end_index": 5, "begin_time": 40, "end_time": 210},
          {"text": "there", "begin_index": 6, "end_index": 11, "begin_time": 230, "end_time": 380}]
_RUN_PARAMETERS = {"text_type", "voice", "format", "sample_rate", "volume", "rate", "pitch",
                   "word_timestamp_enabled", "instruction"}


class CosyVoiceService(FakeWsHandler):
    """DashScope's ``/api-ws/v1/inference`` for the SpeechSynthesizer function, as its docs define it.

    ``bearer`` auth at the upgrade (401 otherwise); run-task -> task-started; continue-task text is kept;
    finish-task -> sentence-begin, (sentence-synthesis + Binary frame) per chunk, sentence-end, task-finished.
    With word_timestamp_enabled the words come in sentence-end *and* task-finished (snapshots repeat).
    ``mode`` scripts failures: fail, throttle, drop, stall, silent, garbage.
    """

    mode = "ok"
    gap_s = 0.03

    def __init__(self, request: Any) -> None:
        super().__init__(request)
        auth = self.headers.get("authorization", "")
        if auth.lower() != f"bearer {_KEY}":
            self.deny = (401, "Unauthorized")
        self.commands: list[dict[str, Any]] = []
        self.task_id: Optional[str] = None
        self.words_on = False
        self.calls: list[Any] = []
        self.got_finish: Deferred[None] = Deferred()

    def event(self, name: str, payload: Optional[dict[str, Any]] = None, **header: Any) -> None:
        self.send_text(json.dumps({"header": {"task_id": self.task_id, "event": name, "attributes": {}, **header},
                                   "payload": payload or {}}))

    def failed(self, code: str, message: str) -> None:
        """task-failed; the client then drops the connection, as the docs ask of it."""
        self.event("task-failed", error_code=code, error_message=message)

    def on_text(self, text: str) -> None:
        super().on_text(text)
        command = json.loads(text)
        self.commands.append(command)
        header, payload = command["header"], command["payload"]
        if header.get("streaming") != "duplex":
            return self.failed("InvalidParameter", "streaming must be duplex")
        action = header["action"]
        if action == "run-task":
            self.task_id = header["task_id"]
            params = payload.get("parameters", {})
            ok = (payload.get("task_group"), payload.get("task"), payload.get("function"), payload.get("input")) == \
                 ("audio", "tts", "SpeechSynthesizer", {})
            if not ok or set(params) - _RUN_PARAMETERS or params.get("format") != "pcm":
                return self.failed("InvalidParameter", "task can not be null")
            if payload["model"] == "cosyvoice-v2" and not params["voice"].endswith("_v2"):
                return self.failed("InvalidParameter", "[tts:]Engine return error code: 418")
            self.words_on = bool(params.get("word_timestamp_enabled"))
            if self.mode == "silent":
                return
            if self.mode == "fail":
                return self.failed("InvalidParameter", "[tts:]Engine return error code: 418")
            if self.mode == "throttle":
                return self.failed("Throttling.RateQuota", "Requests rate limit exceeded, please try again later.")
            self.event("task-started")
        elif header["task_id"] != self.task_id:
            self.failed("InvalidParameter", "task_id mismatch")
        elif action == "finish-task":
            self.got_finish.callback(None)
            if self.mode == "stall":
                return
            if self.mode == "garbage":
                self.send_text("not json {")
                return
            self.sentence("sentence-begin")
            self.later(0, list(_CHUNKS))

    def sentence(self, kind: str, words: Optional[list[dict[str, Any]]] = None) -> None:
        self.event("result-generated", {"output": {"sentence": {"index": 0, "words": words or []}, "type": kind,
                                                   "original_text": "Hello there."}})

    def later(self, pos: int, chunks: list[int]) -> None:
        self.calls.append(reactor.callLater(self.gap_s, self.chunk, pos, chunks))

    def chunk(self, pos: int, chunks: list[int]) -> None:
        if self.closed.called:
            return
        n = chunks.pop(0)
        self.sentence("sentence-synthesis")
        self.send_binary(_PCM[pos : pos + n])
        if self.mode == "drop":
            self.calls.append(reactor.callLater(self.gap_s, self.drop))
            return
        if chunks:
            self.later(pos + n, chunks)
            return
        words = _WORDS if self.words_on else []
        self.sentence("sentence-end", words)
        self.event("task-finished", {"output": {"sentence": {"index": 0, "words": words}}, "usage": {"characters": 12}},
                   attributes={"request_uuid": "0a9dba9e"})

    def stop(self) -> None:
        for c in self.calls:
            if c.active():
                c.cancel()


class _Collector:
    def __init__(self) -> None:
        self.audio: list[tuple[bytes, int, bool]] = []
        self.words: list[list[WordTiming]] = []
        self.d: Optional[Deferred[None]] = None

    def on_audio(self, pcm: bytes, rate: int) -> None:
        self.audio.append((pcm, rate, self.d is not None and self.d.called))

    def on_words(self, words: Any) -> None:
        self.words.append(list(words))


async def _until(predicate: Any, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("condition not reached in time")


class AliyunLocalServerTests(TestCase):
    """The provider against a local CosyVoice WebSocket service on 127.0.0.1."""

    timeout = 15

    def setUp(self) -> None:
        self.handler_class: type[CosyVoiceService] = CosyVoiceService
        self.server = FakeWsServer(self._make_handler)
        self.url = f"ws://127.0.0.1:{self.server.listen()}/api-ws/v1/inference"
        self.addCleanup(self.server.stop)

    def _make_handler(self, request: Any) -> CosyVoiceService:
        handler = self.handler_class(request)
        self.addCleanup(handler.stop)
        return handler

    def make(self, key: str = _KEY, clock: Any = reactor, **kw: Any) -> AliyunSynthesizer:
        return AliyunSynthesizer(SynthesisSettings(endpoint=self.url, api_key=key), reactor=reactor, clock=clock,
                                 environ={}, task_ids=lambda: "a1b2c3d4e5f60718293a4b5c6d7e8f90", **kw)

    def start(self, synth: AliyunSynthesizer, request: SynthesisRequest) -> tuple[Deferred[None], _Collector]:
        c = _Collector()
        c.d = synth.synthesize(request, c.on_audio, c.on_words)
        return c.d, c

    async def test_wire_protocol_and_streamed_audio(self) -> None:
        """bearer auth, run-task/continue-task/finish-task as documented; audio streams in whole samples."""
        d, c = self.start(self.make(), SynthesisRequest("Hello there.", speed=1.25))
        await d
        [handler] = self.server.handlers
        self.assertEqual(handler.headers["authorization"], f"bearer {_KEY}")
        run, cont, finish = handler.commands
        self.assertEqual(run, {
            "header": {"action": "run-task", "task_id": "a1b2c3d4e5f60718293a4b5c6d7e8f90", "streaming": "duplex"},
            "payload": {"task_group": "audio", "task": "tts", "function": "SpeechSynthesizer", "model": "cosyvoice-v2",
                        "parameters": {"text_type": "PlainText", "voice": "longxiaochun_v2", "format": "pcm",
                                       "sample_rate": 16000, "volume": 50, "rate": 1.25, "pitch": 1.0},
                        "input": {}}})
        self.assertEqual(cont["header"]["action"], "continue-task")
        self.assertEqual(cont["payload"], {"input": {"text": "Hello there."}})
        self.assertEqual((finish["header"]["action"], finish["payload"]), ("finish-task", {"input": {}}))
        self.assertEqual(b"".join(p for p, _, _ in c.audio), _PCM)
        self.assertGreaterEqual(len(c.audio), 4)
        self.assertTrue(all(len(p) % 2 == 0 for p, _, _ in c.audio))
        self.assertEqual(len(c.audio[0][0]), 3200)  # the odd frame's last byte waits for the next frame
        self.assertFalse(c.audio[0][2])  # first audio long before the end
        self.assertEqual({r for _, r, _ in c.audio}, {16000})
        self.assertEqual(c.words, [])  # subtitle not asked: no timestamps asked for, none reported
        await _until(lambda: handler.closed.called)

    async def test_word_timings_reported_once(self) -> None:
        """With subtitle, word_timestamp_enabled is sent and each word is reported once, in ms."""
        d, c = self.start(self.make(), SynthesisRequest("Hello there.", subtitle=True, sample_rate_hz=24000,
                                                        speaker="longwan", model="cosyvoice-v1",
                                                        extra={"pitch": "1.2"}))
        await d
        params = self.server.handlers[0].commands[0]["payload"]["parameters"]
        self.assertEqual((params["word_timestamp_enabled"], params["voice"], params["sample_rate"], params["pitch"]),
                         (True, "longwan", 24000, 1.2))
        self.assertEqual(c.words, [[WordTiming("Hello", 40, 210), WordTiming("there", 230, 380)]])
        self.assertEqual({r for _, r, _ in c.audio}, {24000})
        await self.server.handlers[0].closed

    async def test_task_failed_is_an_error(self) -> None:
        """task-failed carries error_code/error_message; InvalidParameter is final, Throttling retryable."""
        err = await self.assertFailure(self.start(self.make(), SynthesisRequest("Hi.", speaker="longwan"))[0],
                                       SynthesisError)
        self.assertEqual(str(err), "aliyun TTS task failed: InvalidParameter: [tts:]Engine return error code: 418")
        self.assertFalse(err.retryable)
        self.handler_class = type("Throttled", (CosyVoiceService,), {"mode": "throttle"})
        err = await self.assertFailure(self.start(self.make(), SynthesisRequest("Hi."))[0], SynthesisError)
        self.assertIn("Throttling.RateQuota", str(err))
        self.assertTrue(err.retryable)

    async def test_refused_upgrade(self) -> None:
        """A wrong key is refused at the upgrade (401, final); a 429 refusal is retryable."""
        d, c = self.start(self.make(key="sk-wrong"), SynthesisRequest("Hi."))
        err = await self.assertFailure(d, SynthesisError)
        self.assertEqual((str(err), err.retryable), ("aliyun TTS: upgrade refused (HTTP 401)", False))
        self.assertEqual(c.audio, [])

        class Busy(CosyVoiceService):
            def __init__(self, request: Any) -> None:
                super().__init__(request)
                self.deny = (429, "Too Many Requests")

        self.handler_class = Busy
        err = await self.assertFailure(self.start(self.make(), SynthesisRequest("Hi."))[0], SynthesisError)
        self.assertTrue(err.retryable)

    async def test_drop_mid_stream_is_retryable(self) -> None:
        """A TCP drop after the first frame fails retryably; the audio before it was delivered."""
        self.handler_class = type("Dropping", (CosyVoiceService,), {"mode": "drop"})
        d, c = self.start(self.make(), SynthesisRequest("Hi."))
        err = await self.assertFailure(d, SynthesisError)
        self.assertTrue(err.retryable)
        self.assertIn("connection closed before task-finished", str(err))
        self.assertEqual(len(c.audio), 1)

    async def test_malformed_event_fails(self) -> None:
        """A Text frame that is not a DashScope event fails the synthesis, not the reactor."""
        self.handler_class = type("Garbage", (CosyVoiceService,), {"mode": "garbage"})
        err = await self.assertFailure(self.start(self.make(), SynthesisRequest("Hi."))[0], SynthesisError)
        self.assertIn("malformed event", str(err))
        self.assertFalse(err.retryable)

    async def test_audio_size_is_capped(self) -> None:
        """Audio beyond fetch.max_bytes fails the synthesis and drops the connection."""
        d, _ = self.start(self.make(fetch=FetchConfig(max_bytes=5000)), SynthesisRequest("Hi."))
        err = await self.assertFailure(d, SynthesisError)
        self.assertIn("larger than 5000", str(err))
        await self.server.handlers[0].closed

    async def test_idle_timeout_on_the_clock(self) -> None:
        """A service that stops talking after task-started fails after idle_timeout_s on the injected clock."""
        self.handler_class = type("Stalling", (CosyVoiceService,), {"mode": "stall"})
        clock = Clock()
        d, _ = self.start(self.make(clock=clock, idle_timeout_s=20.0), SynthesisRequest("Hi."))
        await _until(lambda: self.server.handlers)
        await self.server.handlers[0].got_finish
        clock.advance(19.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        err = self.failureResultOf(d, SynthesisError).value
        self.assertEqual((str(err), err.retryable), ("aliyun TTS: no data for 20 s", True))
        self.assertEqual(clock.getDelayedCalls(), [])
        await self.server.handlers[0].closed

    async def test_no_task_started_times_out(self) -> None:
        """A service that never answers run-task is bounded by the idle timeout too."""
        self.handler_class = type("Silent", (CosyVoiceService,), {"mode": "silent"})
        clock = Clock()
        d, _ = self.start(self.make(clock=clock), SynthesisRequest("Hi."))
        await _until(lambda: self.server.handlers and self.server.handlers[0].commands)
        clock.advance(20)
        self.assertTrue(self.failureResultOf(d, SynthesisError).value.retryable)
        await self.server.handlers[0].closed

    async def test_cancel_mid_stream(self) -> None:
        """Cancelling in on_audio: no more on_audio, CancelledError, the service sees the connection go."""
        got: list[bytes] = []
        d: Deferred[None]

        def on_audio(pcm: bytes, rate: int) -> None:
            got.append(pcm)
            d.cancel()

        d = self.make().synthesize(SynthesisRequest("Hi."), on_audio)
        await self.assertFailure(d, CancelledError)
        await self.server.handlers[0].closed
        await deferLater(reactor, 0.1)  # frames the service had already queued must not reach on_audio
        self.assertEqual(len(got), 1)

    async def test_connection_refused_is_retryable(self) -> None:
        """Nobody listening gives a retryable SynthesisError."""
        await self.server.stop()
        err = await self.assertFailure(self.start(self.make(), SynthesisRequest("Hi."))[0], SynthesisError)
        self.assertTrue(err.retryable)
        self.assertIn("cannot connect", str(err))

    async def test_connect_timeout_on_the_clock(self) -> None:
        """A peer that accepts TCP but never answers the upgrade is bounded by connect_timeout_s."""
        mute = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(mute.stopListening)
        clock = Clock()
        synth = AliyunSynthesizer(SynthesisSettings(endpoint=f"ws://127.0.0.1:{mute.getHost().port}/", api_key=_KEY),
                                  reactor=reactor, clock=clock, environ={}, connect_timeout_s=3.0)
        d = synth.synthesize(SynthesisRequest("Hi."), lambda p, r: None)
        clock.advance(3.0)
        err = self.failureResultOf(d, SynthesisError).value
        self.assertEqual((str(err), err.retryable), ("aliyun TTS: connect timed out", True))
        self.assertEqual(clock.getDelayedCalls(), [])


class AliyunKeyPolicyTests(SynchronousTestCase, SynthesizerConformanceMixin):
    """Where keys go, checked on a memory reactor (nothing leaves the process)."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def make_synthesizer(self, settings: SynthesisSettings | None = None, environ: dict[str, str] | None = None,
                         fetch: FetchConfig = FetchConfig()) -> AliyunSynthesizer:
        return AliyunSynthesizer(settings or SynthesisSettings(), reactor=self.reactor, clock=self.reactor,
                                 environ={"DASHSCOPE_API_KEY": "env-key"} if environ is None else environ, fetch=fetch)

    def test_environment_key_goes_to_dashscope_over_tls(self) -> None:
        """By default the connection is TLS to dashscope.aliyuncs.com:443 with the environment's key."""
        d = self.make_synthesizer().synthesize(SynthesisRequest("你好"), lambda p, r: None)
        [(host, port, factory, context, _, _)] = self.reactor.sslClients
        self.assertEqual((host, port, factory.resource), ("dashscope.aliyuncs.com", 443, "/api-ws/v1/inference"))
        self.assertEqual(factory.headers["Authorization"], "bearer env-key")
        self.assertIsNotNone(context)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.reactor.connectors[0]._disconnected)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_intl_endpoint_also_gets_the_environment_key(self) -> None:
        """DashScope's international endpoint is DashScope's too."""
        synth = self.make_synthesizer(SynthesisSettings(endpoint="wss://dashscope-intl.aliyuncs.com/api-ws/v1/inference/"))
        synth.synthesize(SynthesisRequest("Hi."), lambda p, r: None).addErrback(lambda f: None).cancel()
        self.assertEqual(self.reactor.sslClients[0][2].headers["Authorization"], "bearer env-key")

    def test_no_key_is_unavailable(self) -> None:
        """No key for DashScope, or a configured other endpoint without its own key, cannot be built."""
        self.assertRaises(ProviderUnavailableError, self.make_synthesizer, environ={})
        with self.assertRaises(ProviderUnavailableError) as cm:
            self.make_synthesizer(SynthesisSettings(endpoint="wss://collector.evil/ws"))
        self.assertIn("apiKey", str(cm.exception))

    def test_environment_key_never_goes_to_a_client_endpoint(self) -> None:
        """A request endpoint elsewhere needs its own key; nothing is connected otherwise."""
        d = self.make_synthesizer().synthesize(SynthesisRequest("Hi.", endpoint="wss://collector.evil/ws"),
                                               lambda p, r: None)
        err = self.failureResultOf(d, SynthesisError).value
        self.assertIn("apiKey", str(err))
        self.assertFalse(err.retryable)
        self.assertEqual((self.reactor.sslClients, self.reactor.tcpClients), ([], []))
        d = self.make_synthesizer().synthesize(SynthesisRequest("Hi.", endpoint="ws://tts.test:9000/x", api_key="own"),
                                               lambda p, r: None)
        [(host, port, factory, _, _)] = self.reactor.tcpClients
        self.assertEqual((host, port, factory.headers["Authorization"]), ("tts.test", 9000, "bearer own"))
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_client_endpoint_outside_allowed_hosts_is_refused(self) -> None:
        """A client endpoint must be ws/wss on an allowed host."""
        synth = self.make_synthesizer(fetch=FetchConfig(allowed_hosts=("tts.test",)))
        for endpoint in ("ws://169.254.169.254/", "https://tts.test/ws", "wss://evil.test/"):
            d = synth.synthesize(SynthesisRequest("Hi.", endpoint=endpoint, api_key="own"), lambda p, r: None)
            self.assertIn("endpoint not allowed", str(self.failureResultOf(d, SynthesisError).value))
        self.assertEqual((self.reactor.sslClients, self.reactor.tcpClients), ([], []))

    def test_words_in_bounds_hostile_input(self) -> None:
        """Malformed word entries are skipped; texts and times are bounded; no words is None."""
        self.assertIsNone(words_in({"output": {"sentence": {"index": 0, "words": []}}}))
        self.assertIsNone(words_in(["not", "a", "dict"]))
        self.assertIsNone(words_in({"output": {"sentence": {"index": "0", "words": _WORDS}}}))
        found = words_in({"output": {"sentence": {"index": 2, "words": [
            {"text": "x" * 500, "begin_time": 10, "end_time": 5}, {"text": 3, "begin_time": 0, "end_time": 1},
            {"text": "y", "begin_time": -1, "end_time": 1}, {"text": "z", "begin_time": 1.5, "end_time": 2},
            "junk", {"text": "ok", "begin_time": 20, "end_time": 10 ** 12}]}}})
        self.assertEqual(found, (2, [WordTiming("x" * 64, 10, 10), WordTiming("ok", 20, 24 * 3600 * 1000)]))
