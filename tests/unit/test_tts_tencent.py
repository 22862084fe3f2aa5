"""tencent (stream_ws WebSocket) and tencent_basic (TextToVoice REST) TTS against local servers
speaking Tencent's documented protocols, signatures recomputed on the server side."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any, Optional
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from activecall.config import FetchConfig
from activecall.speech.interfaces import (
    ISpeechSynthesizer,
    ProviderUnavailableError,
    SynthesisError,
    SynthesisRequest,
    WordTiming,
)
from activecall.speech.registry import SynthesisSettings
from activecall.speech.tencent_auth import get_signature, tc3_authorization
from activecall.speech.tts.tencent import TencentBasicSynthesizer, TencentSynthesizer, parse_subtitles, tencent_speed
from activecall.testing import SynthesizerConformanceMixin
from wsfake import FakeWsHandler, FakeWsServer

APP_ID = "1300000001"
SECRET_ID = "AKIDttstestsecret0002"
SECRET_KEY = "tts-secret-key-0002"
ENV = {"TENCENT_APPID": APP_ID, "TENCENT_SECRET_ID": SECRET_ID, "TENCENT_SECRET_KEY": SECRET_KEY}
# 0.3 s of a 440 Hz tone at 16 kHz, s16le
PCM = (np.sin(np.arange(4800) * 2 * np.pi * 440 / 16000) * 8000).astype("<i2").tobytes()
PIECES = (1001, 3000, 2999, len(PCM) - 7000)  # odd sizes: samples split across frames
W0 = {"Text": "你", "BeginTime": 0, "EndTime": 120, "BeginIndex": 0, "EndIndex": 1, "Phoneme": None}
W1 = {"Text": "好", "BeginTime": 120, "EndTime": 250, "BeginIndex": 1, "EndIndex": 2, "Phoneme": None}
W2 = {"Text": "世", "BeginTime": 250, "EndTime": 300, "BeginIndex": 3, "EndIndex": 4, "Phoneme": None}


class _Sink:
    def __init__(self) -> None:
        self.audio: list[tuple[bytes, int]] = []
        self.words: list[list[WordTiming]] = []
        self.first: Deferred[None] = Deferred()

    def on_audio(self, pcm: bytes, rate: int) -> None:
        self.audio.append((pcm, rate))
        if not self.first.called:
            self.first.callback(None)

    def on_words(self, words: Any) -> None:
        self.words.append(list(words))

    @property
    def pcm(self) -> bytes:
        return b"".join(p for p, _ in self.audio)


def _doc_signature(key: str, host: str, path: str, params: dict[str, str]) -> str:
    """The stream_ws signature as Tencent's page describes it, written out independently of the provider."""
    text = "GET" + host + path + "?" + "&".join(f"{k}={params[k]}" for k in sorted(params))
    return base64.b64encode(hmac.new(key.encode(), text.encode(), hashlib.sha1).digest()).decode()


class TencentTtsService(FakeWsHandler):
    """The stream_ws service: checks the signature, then PCM pieces, subtitles and final, 10 ms apart.

    ``mode``: ``ok``; ``error`` (a code != 0 frame after the first audio); ``drop`` (TCP cut after the
    first audio); ``stall`` (the first audio, then silence).
    """

    mode = "ok"

    def __init__(self, request: Any) -> None:
        super().__init__(request)
        parts = urlsplit("ws://x" + request.path)
        self.url_path = parts.path
        self.params = dict(parse_qsl(parts.query)) if parts.query else {k: v[-1] for k, v in request.params.items()}
        signature = self.params.pop("Signature", "")
        self.signature_ok = signature == _doc_signature(SECRET_KEY, self.headers["host"], self.url_path, self.params)
        self.calls: list[Any] = []

    def _frame(self, message: dict[str, Any]) -> str:
        base = {"code": 0, "message": "success", "session_id": self.params.get("SessionId"), "request_id": "r1",
                "message_id": "m", "final": 0, "result": {"subtitles": None}}
        base.update(message)
        return json.dumps(base, ensure_ascii=False)

    def opened(self) -> None:
        if not self.signature_ok:
            self.send_text(self._frame({"code": 10003, "message": "鉴权失败"}))
            return
        steps: list[Any] = []
        offset = 0
        for size in PIECES:
            steps.append(PCM[offset : offset + size])
            offset += size
        steps.insert(2, self._frame({"result": {"subtitles": [W0, W1]}}))
        steps.insert(4, self._frame({"result": {"subtitles": [W0, W1, W2]}}))
        steps.append(self._frame({"final": 1}))
        if self.mode == "error":
            steps[1:] = [self._frame({"code": 10005, "message": "合成失败"})]
        elif self.mode == "drop":
            steps[1:] = ["drop"]
        elif self.mode == "stall":
            steps[1:] = []
        for i, step in enumerate(steps):
            self.calls.append(reactor.callLater(0.01 * i, self._send, step))

    def _send(self, step: Any) -> None:
        if self.peer is None or self.peer.transport is None or self.closed.called:
            return
        if step == "drop":
            self.drop()
        elif isinstance(step, bytes):
            self.send_binary(step)
        else:
            self.send_text(step)

    def stop(self) -> None:
        for call in self.calls:
            if call.active():
                call.cancel()


def _own(text: str, **kwargs: Any) -> SynthesisRequest:
    """A request carrying its own appId/secretId, as one to a local (not Tencent's) endpoint must."""
    return SynthesisRequest(text, extra={"appId": APP_ID, "secretId": SECRET_ID}, **kwargs)


class TencentWsTtsTests(TestCase):
    timeout = 10

    def _serve(self, mode: str = "ok", deny: Optional[tuple[int, str]] = None) -> str:
        def make(request: Any) -> TencentTtsService:
            handler = TencentTtsService(request)
            handler.mode = mode
            handler.deny = deny
            self.addCleanup(handler.stop)
            return handler

        server = FakeWsServer(make)
        port = server.listen()
        self.addCleanup(server.stop)
        self.server = server
        return f"ws://127.0.0.1:{port}"

    def _synth(self, endpoint: str, key: str = SECRET_KEY, **kwargs: Any) -> TencentSynthesizer:
        synth = TencentSynthesizer(SynthesisSettings(endpoint=endpoint, api_key=key), reactor=reactor, clock=reactor,
                                   environ=ENV, **kwargs)
        verifyObject(ISpeechSynthesizer, synth)
        return synth

    async def test_streams_pcm_and_subtitles(self) -> None:
        """Signed URL with the documented parameters; PCM in whole samples at the asked rate; words once each."""
        endpoint = self._serve()
        sink = _Sink()
        request = _own("你好，世界。", sample_rate_hz=16000, speaker="101002", speed=1.2, subtitle=True)
        await self._synth(endpoint).synthesize(request, sink.on_audio, sink.on_words)
        service = self.server.handlers[0]
        self.assertTrue(service.signature_ok)
        self.assertEqual(service.url_path, "/stream_ws")
        params = service.params
        self.assertEqual({k: params[k] for k in ("Action", "AppId", "SecretId", "Codec", "SampleRate", "VoiceType",
                                                  "Speed", "Volume", "EnableSubtitle", "Text")},
                         {"Action": "TextToStreamAudioWS", "AppId": APP_ID, "SecretId": SECRET_ID, "Codec": "pcm",
                          "SampleRate": "16000", "VoiceType": "101002", "Speed": "1.0", "Volume": "0",
                          "EnableSubtitle": "true", "Text": "你好，世界。"})
        self.assertEqual(int(params["Expired"]) - int(params["Timestamp"]), 3600)
        self.assertTrue(params["SessionId"])
        self.assertEqual(sink.pcm, PCM)
        self.assertTrue(all(len(p) % 2 == 0 and rate == 16000 for p, rate in sink.audio))
        self.assertEqual(sink.words, [[WordTiming("你", 0, 120), WordTiming("好", 120, 250)],
                                      [WordTiming("世", 250, 300)]])
        await service.closed  # the client closes after final, as documented

    async def test_no_subtitles_unless_asked(self) -> None:
        """Without request.subtitle: no EnableSubtitle parameter and no on_words calls."""
        endpoint = self._serve()
        sink = _Sink()
        await self._synth(endpoint).synthesize(_own("hi", sample_rate_hz=8000), sink.on_audio,
                                               sink.on_words)
        self.assertNotIn("EnableSubtitle", self.server.handlers[0].params)
        self.assertEqual(self.server.handlers[0].params["SampleRate"], "8000")
        self.assertEqual({rate for _, rate in sink.audio}, {8000})
        self.assertEqual(sink.words, [])
        await self.server.handlers[0].closed

    async def test_wrong_key_is_the_servers_error(self) -> None:
        """A signature the server rejects comes back as its code != 0 frame: SynthesisError with the code."""
        endpoint = self._serve()
        d = self._synth(endpoint, key="nope").synthesize(
            _own("hi"), _Sink().on_audio)
        error = await self.assertFailure(d, SynthesisError)
        self.assertIn("10003", str(error))
        self.assertFalse(error.retryable)

    async def test_error_frame_mid_stream(self) -> None:
        """A code != 0 frame after some audio fails the request; no audio after it."""
        endpoint = self._serve("error")
        sink = _Sink()
        error = await self.assertFailure(self._synth(endpoint).synthesize(_own("hi"), sink.on_audio),
                                         SynthesisError)
        self.assertIn("10005", str(error))
        self.assertEqual(sink.pcm, PCM[:PIECES[0] - 1])

    async def test_refused_upgrade(self) -> None:
        """401 at the upgrade: not retryable, the status in the text."""
        endpoint = self._serve(deny=(401, "Unauthorized"))
        error = await self.assertFailure(self._synth(endpoint).synthesize(_own("hi"), _Sink().on_audio),
                                         SynthesisError)
        self.assertIn("401", str(error))
        self.assertFalse(error.retryable)

    async def test_drop_mid_stream(self) -> None:
        """A TCP cut before final: a retryable error, not a short success."""
        endpoint = self._serve("drop")
        error = await self.assertFailure(self._synth(endpoint).synthesize(_own("hi"), _Sink().on_audio),
                                         SynthesisError)
        self.assertTrue(error.retryable)
        self.assertIn("closed before the end", str(error))

    async def test_stalled_server_times_out(self) -> None:
        """No frame within idle_timeout_s: a retryable error, the connection dropped."""
        endpoint = self._serve("stall")
        synth = self._synth(endpoint, idle_timeout_s=0.2)
        error = await self.assertFailure(synth.synthesize(_own("hi"), _Sink().on_audio), SynthesisError)
        self.assertTrue(error.retryable)
        self.assertIn("no data", str(error))
        await self.server.handlers[0].closed

    async def test_cancel_stops_audio(self) -> None:
        """Cancelling after the first audio: CancelledError, no on_audio after, the connection dropped."""
        endpoint = self._serve()
        sink = _Sink()
        d = self._synth(endpoint).synthesize(_own("hi"), sink.on_audio)
        await sink.first
        d.cancel()
        await self.assertFailure(d, CancelledError)
        await self.server.handlers[0].closed
        await deferLater(reactor, 0.08)  # the server's remaining frames would have come by now
        self.assertEqual(len(sink.audio), 1)

    async def test_consumer_failure_stops_synthesis(self) -> None:
        """An on_audio that raises fails the request (not retryable) and drops the connection."""
        endpoint = self._serve()

        def broken(pcm: bytes, rate: int) -> None:
            raise ValueError("sink full")

        error = await self.assertFailure(self._synth(endpoint).synthesize(_own("hi"), broken),
                                         SynthesisError)
        self.assertIn("sink full", str(error))
        self.assertFalse(error.retryable)
        await self.server.handlers[0].closed
        self.flushLoggedErrors(ValueError)

    async def test_unreachable_service(self) -> None:
        """Nothing listening: a retryable connect error."""
        server = FakeWsServer(TencentTtsService)
        port = server.listen()
        await server.stop()
        error = await self.assertFailure(
            self._synth(f"ws://127.0.0.1:{port}").synthesize(_own("hi"), _Sink().on_audio), SynthesisError)
        self.assertTrue(error.retryable)


class TencentWsTtsUrlTests(SynthesizerConformanceMixin, SynchronousTestCase):
    def make_synthesizer(self) -> TencentSynthesizer:
        return TencentSynthesizer(SynthesisSettings(), reactor=None, clock=Clock(), environ=ENV)

    def _url(self, request: SynthesisRequest, settings: SynthesisSettings = SynthesisSettings(),
             environ: Any = ENV, fetch: FetchConfig = FetchConfig()) -> tuple[str, dict[str, str]]:
        clock = Clock()
        clock.advance(1_700_000_000)
        synth = TencentSynthesizer(settings, reactor=None, clock=clock, environ=environ, fetch=fetch,
                                   session_id=lambda: "sid-1")
        parts = urlsplit(synth.url_for(request))
        return f"{parts.scheme}://{parts.netloc}{parts.path}", dict(parse_qsl(parts.query))

    def test_default_url_signed_as_documented(self) -> None:
        """wss://tts.cloud.tencent.com/stream_ws, signed over GET + host + path + sorted raw params."""
        base, params = self._url(SynthesisRequest("a b&c=d"))
        self.assertEqual(base, "wss://tts.cloud.tencent.com/stream_ws")
        signature = params.pop("Signature")
        self.assertEqual(signature, get_signature(SECRET_KEY, "tts.cloud.tencent.com", "/stream_ws", params))
        self.assertEqual((params["Text"], params["Timestamp"], params["SessionId"], params["VoiceType"]),
                         ("a b&c=d", "1700000000", "sid-1", "101001"))

    def test_bad_speaker_and_credentials(self) -> None:
        """A non-numeric VoiceType and missing credentials are refused before any connection."""
        with self.assertRaises(SynthesisError):
            self._url(SynthesisRequest("x", speaker="longxiaochun"))
        with self.assertRaises(ProviderUnavailableError):
            self._url(SynthesisRequest("x"), environ={})
        with self.assertRaises(SynthesisError) as e:
            self._url(SynthesisRequest("x"), environ={"TENCENT_SECRET_KEY": "k"})
        self.assertIn("TENCENT_SECRET_ID", str(e.exception))

    def test_environment_credentials_stay_with_tencent(self) -> None:
        """An endpoint elsewhere needs its own appId/secretId/secretKey and must pass allowed_hosts."""
        with self.assertRaises(SynthesisError):
            self._url(SynthesisRequest("x", endpoint="ws://127.0.0.1:9"))
        own = SynthesisRequest("x", endpoint="ws://127.0.0.1:9", api_key="k",
                               extra={"appId": "7", "secretId": "AKIDown", "EmotionCategory": "happy"})
        base, params = self._url(own)
        self.assertEqual((base, params["AppId"], params["EmotionCategory"]),
                         ("ws://127.0.0.1:9/stream_ws", "7", "happy"))
        signature = params.pop("Signature")
        self.assertEqual(signature, get_signature("k", "127.0.0.1:9", "/stream_ws", params))
        with self.assertRaises(SynthesisError):
            self._url(own, fetch=FetchConfig(allowed_hosts=("tts.cloud.tencent.com",)))
        with self.assertRaises(SynthesisError):  # the option's endpoint is a client's choice too
            self._url(SynthesisRequest("x"), settings=SynthesisSettings(endpoint="ws://127.0.0.1:9", api_key="k"))
        with self.assertRaises(ProviderUnavailableError):
            self._url(SynthesisRequest("x"), settings=SynthesisSettings(endpoint="ws://127.0.0.1:9"))

    def test_speed_scale(self) -> None:
        """Rates map onto Tencent's documented Speed levels, clamped at both ends."""
        self.assertEqual([tencent_speed(r) for r in (0.3, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 2.5, 4.0)],
                         [-2.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 6.0, 6.0])
        self.assertEqual(tencent_speed(float("nan")), -2.0)

    def test_subtitles_are_validated(self) -> None:
        """Malformed subtitles (types, negative or reversed times) are errors; words are cut to 64 chars."""
        for bad in ("x", [1], [{"Text": "a", "BeginTime": 5, "EndTime": 1}], [{"Text": "a", "BeginTime": True,
                                                                              "EndTime": 2}]):
            with self.assertRaises(SynthesisError):
                parse_subtitles(bad, "t")
        [(index, word)] = parse_subtitles([{"Text": "x" * 100, "BeginTime": 1, "EndTime": 2}], "t")
        self.assertEqual((index, len(word.text)), (-1, 64))


# -- tencent_basic ------------------------------------------------------------------------


class TextToVoiceResource(Resource):
    """``POST /`` of tts.tencentcloudapi.com: checks the TC3 signature and the JSON body, answers as documented.

    ``mode``: ``ok``, ``error`` (an Error answer), ``busy`` (InternalError), ``500`` (HTML 500),
    ``badaudio`` (Audio not base64), ``stall`` (never answers).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self.stalled: list[Request] = []

    def render_POST(self, request: Request) -> Any:
        payload = request.content.read()
        header = lambda name: (request.getHeader(name) or "")  # noqa: E731
        timestamp = int(header("X-TC-Timestamp") or 0)
        expected = tc3_authorization(SECRET_ID, SECRET_KEY, service="tts", host=header("host"), payload=payload,
                                     timestamp=timestamp, content_type=header("content-type"))
        body = json.loads(payload)
        self.requests.append({"body": body, "action": header("X-TC-Action"), "version": header("X-TC-Version"),
                              "content_type": header("content-type"), "timestamp": timestamp,
                              "signed": header("authorization") == expected})
        request.setHeader(b"content-type", b"application/json")
        if self.mode == "stall":
            self.stalled.append(request)
            return NOT_DONE_YET
        if self.mode == "500":
            request.setResponseCode(500)
            return b"<html>Internal Server Error</html>"
        if header("authorization") != expected:
            error = {"Code": "AuthFailure.SignatureFailure", "Message": "The credentials could not be validated."}
            return json.dumps({"Response": {"Error": error, "RequestId": "r"}}).encode()
        if self.mode in ("error", "busy"):
            code = "InvalidParameterValue.InvalidText" if self.mode == "error" else "InternalError.ExceedMaxLimit"
            return json.dumps({"Response": {"Error": {"Code": code, "Message": "请求文本含有非法字符"},
                                            "RequestId": "r"}}, ensure_ascii=False).encode()
        audio = "!!not base64!!" if self.mode == "badaudio" else base64.b64encode(PCM).decode()
        return json.dumps({"Response": {"Audio": audio, "SessionId": body.get("SessionId"),
                                        "Subtitles": [W0, W1], "RequestId": "r"}}).encode()


class TencentBasicTtsTests(SynthesizerConformanceMixin, SynchronousTestCase):
    def make_synthesizer(self) -> TencentBasicSynthesizer:
        return self._synth()

    def setUp(self) -> None:
        self.resource = TextToVoiceResource()
        self.stub = StubTreq(self.resource)
        self.clock = Clock()
        self.clock.advance(1_551_113_065)

    def _synth(self, environ: Any = ENV, **kwargs: Any) -> TencentBasicSynthesizer:
        synth = TencentBasicSynthesizer(SynthesisSettings(), http_client=self.stub, clock=self.clock, environ=environ,
                                        session_id=lambda: "sid-9", **kwargs)
        verifyObject(ISpeechSynthesizer, synth)
        return synth

    def _call(self, synth: TencentBasicSynthesizer, request: SynthesisRequest, sink: _Sink) -> Deferred[None]:
        d = synth.synthesize(request, sink.on_audio, sink.on_words)
        self.stub.flush()
        return d

    def test_signed_request_audio_and_words(self) -> None:
        """TC3-signed TextToVoice with the documented headers and body; Audio decoded, Subtitles as words."""
        sink = _Sink()
        d = self._call(self._synth(), SynthesisRequest("你好", speaker="101003", speed=0.8, subtitle=True), sink)
        self.assertIsNone(self.successResultOf(d))
        [seen] = self.resource.requests
        self.assertTrue(seen["signed"])
        self.assertEqual((seen["action"], seen["version"], seen["content_type"], seen["timestamp"]),
                         ("TextToVoice", "2019-08-23", "application/json; charset=utf-8", 1_551_113_065))
        self.assertEqual(seen["body"], {"Text": "你好", "SessionId": "sid-9", "VoiceType": 101003, "Codec": "pcm",
                                        "SampleRate": 16000, "Speed": -1.0, "Volume": 0, "EnableSubtitle": True})
        self.assertEqual(sink.audio, [(PCM, 16000)])
        self.assertEqual(sink.words, [[WordTiming("你", 0, 120), WordTiming("好", 120, 250)]])

    def test_error_answer(self) -> None:
        """{"Response": {"Error": ...}}: SynthesisError with Code and Message; InternalError is retryable."""
        self.resource.mode = "error"
        f = self.failureResultOf(self._call(self._synth(), SynthesisRequest("x"), _Sink()), SynthesisError)
        self.assertIn("InvalidParameterValue.InvalidText", str(f.value))
        self.assertFalse(f.value.retryable)
        self.resource.mode = "busy"
        f = self.failureResultOf(self._call(self._synth(), SynthesisRequest("x"), _Sink()), SynthesisError)
        self.assertTrue(f.value.retryable)

    def test_wrong_key_reported_by_the_server(self) -> None:
        """The server's AuthFailure answer to a bad signature becomes a non-retryable error."""
        f = self.failureResultOf(self._call(self._synth(environ={**ENV, "TENCENT_SECRET_KEY": "bad"}),
                                           SynthesisRequest("x"), _Sink()), SynthesisError)
        self.assertIn("AuthFailure.SignatureFailure", str(f.value))

    def test_http_500_and_bad_audio(self) -> None:
        """A non-API 500 is retryable with its text; Audio that is not base64 is an error, no audio delivered."""
        self.resource.mode = "500"
        f = self.failureResultOf(self._call(self._synth(), SynthesisRequest("x"), _Sink()), SynthesisError)
        self.assertTrue(f.value.retryable)
        self.assertIn("500", str(f.value))
        self.resource.mode = "badaudio"
        sink = _Sink()
        self.failureResultOf(self._call(self._synth(), SynthesisRequest("x"), sink), SynthesisError)
        self.assertEqual(sink.audio, [])

    def test_response_size_bounded(self) -> None:
        """An answer larger than fetch.max_bytes fails instead of being buffered."""
        synth = self._synth(fetch=FetchConfig(max_bytes=1024))
        self.failureResultOf(self._call(synth, SynthesisRequest("x"), _Sink()), SynthesisError)

    def test_timeout_on_the_clock(self) -> None:
        """No answer within timeout_s: a retryable error, with no delayed call left."""
        self.resource.mode = "stall"
        d = self._call(self._synth(timeout_s=5), SynthesisRequest("x"), _Sink())
        self.assertNoResult(d)
        self.clock.advance(5)
        f = self.failureResultOf(d, SynthesisError)
        self.assertTrue(f.value.retryable)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        """Cancelling a pending request: CancelledError, no audio, timer gone."""
        self.resource.mode = "stall"
        sink = _Sink()
        d = self._call(self._synth(), SynthesisRequest("x"), sink)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual((sink.audio, self.clock.getDelayedCalls()), ([], []))

    def test_environment_credentials_stay_with_the_configured_service(self) -> None:
        """A client endpoint elsewhere without its own credentials is refused before any request."""
        f = self.failureResultOf(self._synth().synthesize(SynthesisRequest("x", endpoint="https://evil.example/"),
                                                          _Sink().on_audio), SynthesisError)
        self.assertIn("own appId", str(f.value))
        self.assertEqual(self.resource.requests, [])


class DroppingResource(Resource):
    """Starts a TextToVoice answer, then cuts the TCP connection."""

    isLeaf = True

    def render_POST(self, request: Request) -> Any:
        request.setHeader(b"content-length", b"100000")
        request.write(b'{"Response": {"Audio": "AAAA')
        reactor.callLater(0.01, request.transport.abortConnection)
        return NOT_DONE_YET


class TencentBasicTcpTests(TestCase):
    timeout = 10

    async def test_tcp_drop_mid_answer(self) -> None:
        """A connection cut inside the answer: a retryable error, never a success."""
        port = reactor.listenTCP(0, Site(DroppingResource()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, pool=pool))
        endpoint = f"http://127.0.0.1:{port.getHost().port}/"
        synth = TencentBasicSynthesizer(SynthesisSettings(endpoint=endpoint, api_key=SECRET_KEY), http_client=client,
                                        clock=reactor, environ=ENV)
        error = await self.assertFailure(synth.synthesize(_own("x"), _Sink().on_audio), SynthesisError)
        self.assertTrue(error.retryable)
        await pool.closeCachedConnections()
