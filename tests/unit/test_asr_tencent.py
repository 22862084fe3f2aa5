"""tencent ASR against a local server speaking Tencent's real-time ASR WebSocket protocol."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any, Optional
from urllib.parse import parse_qsl, urlsplit

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from activecall.config import FetchConfig
from activecall.speech.asr.tencent import TencentRecognizer
from activecall.speech.interfaces import (
    IRecognitionStream,
    IRecognizer,
    ProviderUnavailableError,
    RecognitionError,
    RecognitionRequest,
)
from activecall.speech.registry import RecognizerSettings
from activecall.speech.tencent_auth import asr_signature
from activecall.testing import RecordingListener
from wsfake import FakeWsHandler, FakeWsServer

APP_ID = "1259228442"
SECRET_ID = "AKIDtestsecretid0001"
SECRET_KEY = "test-secret-key-0001"
ENV = {"TENCENT_APPID": APP_ID, "TENCENT_SECRET_ID": SECRET_ID, "TENCENT_SECRET_KEY": SECRET_KEY}
FRAME = b"\x10\x00\xf0\xff" * 160  # 20 ms at 16 kHz
#: What a request to a local (not Tencent's) endpoint must carry: the environment's stay with Tencent.
OWN = {"app_id": APP_ID, "secret_id": SECRET_ID}




def _doc_signature(key: str, host: str, path: str, params: dict[str, str]) -> str:
    """The ASR signature as Tencent's page describes it, written out independently of the provider."""
    text = host + path + "?" + "&".join(f"{k}={params[k]}" for k in sorted(params))
    return base64.b64encode(hmac.new(key.encode(), text.encode(), hashlib.sha1).digest()).decode()


class TencentAsrService(FakeWsHandler):
    """Tencent's real-time ASR as documented: checks the signature, answers audio with sentence slices."""

    secret_key = SECRET_KEY
    error_code: Optional[int] = None  # answer the handshake with this error instead

    def __init__(self, request: Any) -> None:
        super().__init__(request)
        parts = urlsplit("ws://x" + request.path)
        self.url_path = parts.path
        self.params = dict(parse_qsl(parts.query)) if parts.query else {k: v[-1] for k, v in request.params.items()}
        signature = self.params.pop("signature", "")
        expected = _doc_signature(self.secret_key, self.headers["host"], self.url_path, self.params)
        self.signature_ok = signature == expected
        self.end_messages: list[Any] = []

    def opened(self) -> None:
        voice_id = self.params.get("voice_id", "")
        if not self.signature_ok:
            # Tencent closes after an error frame; the client drops the connection on reading it
            self.send_text(json.dumps({"code": 4002, "message": "鉴权失败", "voice_id": voice_id}))
        elif self.error_code is not None:
            self.send_text(json.dumps({"code": self.error_code, "message": "引擎繁忙", "voice_id": voice_id}))
        else:
            self.send_text(json.dumps({"code": 0, "message": "success", "voice_id": voice_id}))

    def _slice(self, slice_type: int, text: str, index: int = 0) -> str:
        audio_ms = sum(map(len, self.binaries)) // 32
        return json.dumps({"code": 0, "message": "success", "voice_id": self.params["voice_id"], "message_id": "m",
                           "result": {"slice_type": slice_type, "index": index, "start_time": 100,
                                      "end_time": audio_ms, "voice_text_str": text, "word_size": 0,
                                      "word_list": []}}, ensure_ascii=False)

    def on_binary(self, data: bytes) -> None:
        super().on_binary(data)
        if len(self.binaries) == 1:
            self.send_text(self._slice(0, ""))
        elif len(self.binaries) == 3:
            self.send_text(self._slice(1, "你好"))

    def on_text(self, text: str) -> None:
        super().on_text(text)
        self.end_messages.append(json.loads(text))
        self.send_text(self._slice(2, "你好世界。"))
        self.send_text(json.dumps({"code": 0, "message": "success", "voice_id": self.params["voice_id"],
                                   "message_id": "m2", "final": 1}))


async def _until(predicate: Any, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("condition not reached in time")


class TencentAsrStreamTests(TestCase):
    timeout = 10

    def _serve(self, handler: Any) -> str:
        server = FakeWsServer(handler)
        port = server.listen()
        self.addCleanup(server.stop)
        self.server = server
        return f"ws://127.0.0.1:{port}"

    def _recognizer(self, endpoint: str, key: str = SECRET_KEY, **kwargs: Any) -> TencentRecognizer:
        recognizer = TencentRecognizer(RecognizerSettings(endpoint=endpoint, api_key=key), reactor=reactor,
                                       clock=reactor, environ=ENV, **kwargs)
        verifyObject(IRecognizer, recognizer)
        return recognizer

    async def test_signed_stream_partials_then_final(self) -> None:
        """A correctly signed URL, binary audio in 40 ms messages, {"type":"end"}; partial then final, in order."""
        endpoint = self._serve(TencentAsrService)
        listener = RecordingListener()
        stream = self._recognizer(endpoint).open(RecognitionRequest(language="zh-CN", **OWN), listener)
        verifyObject(IRecognitionStream, stream)
        for _ in range(50):
            stream.write(FRAME)
        await _until(lambda: bool(self.server.handlers) and len(self.server.handlers[0].binaries) >= 25)
        await stream.close()
        service = self.server.handlers[0]
        self.assertTrue(service.signature_ok)
        self.assertEqual(service.url_path, f"/asr/v2/{APP_ID}")
        params = service.params
        self.assertEqual((params["secretid"], params["engine_model_type"], params["voice_format"], params["needvad"]),
                         (SECRET_ID, "16k_zh", "1", "1"))
        self.assertEqual(int(params["expired"]) - int(params["timestamp"]), 3600)
        self.assertTrue(params["nonce"].isdigit() and params["voice_id"])
        self.assertEqual(b"".join(service.binaries), FRAME * 50)
        self.assertEqual({len(b) for b in service.binaries}, {1280})
        self.assertEqual(service.end_messages, [{"type": "end"}])
        self.assertEqual([(r.index, r.text, r.final) for r in listener.results],
                         [(0, "你好", False), (0, "你好世界。", True)])
        self.assertEqual((listener.results[-1].start_ms, listener.results[-1].end_ms), (100, 1000))
        self.assertEqual(listener.failures, [])

    async def test_wrong_secret_key_is_an_auth_error(self) -> None:
        """The server's code 4002 (signature check failed) fails the stream, not retryable."""
        endpoint = self._serve(TencentAsrService)
        listener = RecordingListener()
        self._recognizer(endpoint, key="wrong").open(RecognitionRequest(**OWN), listener)
        error = await listener.failed_d
        self.assertIn("4002", str(error))
        self.assertFalse(error.retryable)
        await self.server.handlers[0].closed

    async def test_concurrency_error_is_retryable(self) -> None:
        """Code 4006 (too many concurrent streams) is worth a new stream."""
        class Busy(TencentAsrService):
            error_code = 4006

        listener = RecordingListener()
        self._recognizer(self._serve(Busy)).open(RecognitionRequest(**OWN), listener)
        error = await listener.failed_d
        self.assertTrue(error.retryable)
        self.assertIn("4006", str(error))
        await self.server.handlers[0].closed

    async def test_refused_upgrade(self) -> None:
        """An HTTP 403 at the upgrade is a non-retryable failure naming the status."""
        class Deny(TencentAsrService):
            def __init__(self, request: Any) -> None:
                super().__init__(request)
                self.deny = (403, "Forbidden")

        listener = RecordingListener()
        self._recognizer(self._serve(Deny)).open(RecognitionRequest(**OWN), listener)
        error = await listener.failed_d
        self.assertIn("403", str(error))
        self.assertFalse(error.retryable)

    async def test_malformed_message_fails(self) -> None:
        """A Text frame that is not a JSON object fails the stream with a clear text."""
        class Garbage(TencentAsrService):
            def opened(self) -> None:
                self.send_text("<html>oops</html>")

        listener = RecordingListener()
        self._recognizer(self._serve(Garbage)).open(RecognitionRequest(**OWN), listener)
        error = await listener.failed_d
        self.assertIn("malformed", str(error))

    async def test_drop_mid_stream_fails_once_and_close_returns(self) -> None:
        """A TCP drop mid-stream: one retryable failure, close() still fires, nothing after it."""
        endpoint = self._serve(TencentAsrService)
        listener = RecordingListener()
        stream = self._recognizer(endpoint).open(RecognitionRequest(**OWN), listener)
        for _ in range(6):
            stream.write(FRAME)
        await _until(lambda: bool(self.server.handlers) and len(self.server.handlers[0].binaries) >= 3)
        self.server.handlers[0].drop()
        error = await listener.failed_d
        self.assertTrue(error.retryable)
        stream.write(FRAME)
        await stream.close()
        self.assertEqual(len(listener.failures), 1)
        self.assertEqual([r.text for r in listener.results], ["你好"])


class TencentAsrUrlTests(SynchronousTestCase):
    def _url(self, request: RecognitionRequest, settings: RecognizerSettings = RecognizerSettings(),
             environ: Any = ENV, fetch: FetchConfig = FetchConfig()) -> tuple[str, dict[str, str]]:
        clock = Clock()
        clock.advance(1_700_000_000)
        recognizer = TencentRecognizer(settings, reactor=None, clock=clock, environ=environ, fetch=fetch,
                                       nonce=lambda: 1234567, voice_id=lambda: "vid-1")
        url = recognizer.url_for(request)
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}", dict(parse_qsl(parts.query))

    def test_default_url_and_signature(self) -> None:
        """The documented URL and a signature recomputed from the documented algorithm."""
        base, params = self._url(RecognitionRequest())
        self.assertEqual(base, f"wss://asr.cloud.tencent.com/asr/v2/{APP_ID}")
        signature = params.pop("signature")
        self.assertEqual(signature, asr_signature(SECRET_KEY, "asr.cloud.tencent.com", f"/asr/v2/{APP_ID}", params))
        self.assertEqual(params["timestamp"], "1700000000")
        self.assertEqual(params["expired"], "1700003600")
        self.assertEqual((params["nonce"], params["voice_id"]), ("1234567", "vid-1"))

    def test_model_language_and_extra(self) -> None:
        """modelType wins, en* picks 16k_en, extra adds or replaces parameters but never the signing ones."""
        _, params = self._url(RecognitionRequest(model="8k_zh"))
        self.assertEqual(params["engine_model_type"], "8k_zh")
        _, params = self._url(RecognitionRequest(language="en-US"))
        self.assertEqual(params["engine_model_type"], "16k_en")
        _, params = self._url(RecognitionRequest(extra={"hotword_id": "abc", "needvad": "0", "nonce": "1",
                                                        "Bad Name": "x"}))
        self.assertEqual((params["hotword_id"], params["needvad"], params["nonce"]), ("abc", "0", "1234567"))
        self.assertNotIn("Bad Name", params)

    def test_request_credentials_win(self) -> None:
        """appId/secretId/secretKey of the request are used over the environment."""
        request = RecognitionRequest(app_id="42", secret_id="AKIDother", api_key="other-key")
        base, params = self._url(request)
        self.assertTrue(base.endswith("/asr/v2/42"))
        self.assertEqual(params["secretid"], "AKIDother")
        signature = params.pop("signature")
        self.assertEqual(signature, asr_signature("other-key", "asr.cloud.tencent.com", "/asr/v2/42", params))

    def test_missing_credentials(self) -> None:
        """No secret key: the provider is unavailable; no app id: open() refuses naming the variable."""
        with self.assertRaises(ProviderUnavailableError) as e:
            self._url(RecognitionRequest(), environ={})
        self.assertIn("TENCENT_SECRET_KEY", str(e.exception))
        with self.assertRaises(RecognitionError) as e:
            self._url(RecognitionRequest(), environ={"TENCENT_SECRET_KEY": "k"})
        self.assertIn("TENCENT_APPID", str(e.exception))
        with self.assertRaises(RecognitionError):
            self._url(RecognitionRequest(app_id="not-a-number"))

    def test_environment_credentials_stay_with_tencent(self) -> None:
        """An endpoint elsewhere (request's or option's) gets no environment credentials, must pass allowed_hosts."""
        with self.assertRaises(RecognitionError) as e:
            self._url(RecognitionRequest(endpoint="ws://127.0.0.1:9/"))
        self.assertIn("own appId", str(e.exception))
        own = RecognitionRequest(endpoint="ws://127.0.0.1:9", app_id="1", secret_id="AKIDx", api_key="k")
        self.assertEqual(self._url(own)[0], "ws://127.0.0.1:9/asr/v2/1")
        with self.assertRaises(RecognitionError):
            self._url(own, fetch=FetchConfig(allowed_hosts=("asr.cloud.tencent.com",)))
        elsewhere = RecognizerSettings(endpoint="ws://127.0.0.1:9", api_key="k")
        with self.assertRaises(RecognitionError):
            self._url(RecognitionRequest(), settings=elsewhere)
        self.assertEqual(self._url(RecognitionRequest(app_id="1", secret_id="AKIDx"), settings=elsewhere)[0],
                         "ws://127.0.0.1:9/asr/v2/1")
        with self.assertRaises(ProviderUnavailableError):  # the option's endpoint without its own key
            self._url(RecognitionRequest(), settings=RecognizerSettings(endpoint="ws://127.0.0.1:9"))
