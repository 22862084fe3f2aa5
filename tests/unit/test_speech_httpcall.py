"""StreamedCall (activecall.speech.httpcall) and KeyPolicy (activecall.speech.keys).

The regression: a request still waiting for its response headers must be aborted by a cancel or a
timeout (the server sees its connection closed), and the result must then be the CancelledError or
the timeout error, not a "request failed" error made of the aborted request's own failure.
"""

from __future__ import annotations

from typing import Any, Callable

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from activecall.fetch import FetchRefusedError
from activecall.speech.asr.openai import OpenAIRecognizer
from activecall.speech.httpcall import server_message
from activecall.speech.interfaces import (
    ProviderUnavailableError,
    RecognitionError,
    RecognitionRequest,
    SynthesisError,
    SynthesisRequest,
)
from activecall.speech.keys import KeyPolicy
from activecall.speech.registry import RecognizerSettings, SynthesisSettings
from activecall.speech.tts.deepgram import DeepgramSynthesizer
from activecall.speech.tts.openai import OpenAISynthesizer
from activecall.speech.tts.tencent import TencentBasicSynthesizer

DEADLINE_S = 5.0
SHORT_TIMEOUT_S = 0.2
TENCENT_OWN = {"appId": "1300000001", "secretId": "AKIDttstestsecret0002"}


class _Mute(Protocol):
    """Reads the request, never answers; tells the factory when the request is in and when the connection closes."""

    factory: "_MuteFactory"

    def dataReceived(self, data: bytes) -> None:
        self.factory.seen += data
        if b"\r\n\r\n" in self.factory.seen and not self.factory.request_in.called:
            self.factory.request_in.callback(None)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.factory.closed.callback(None)


class _MuteFactory(Factory):
    protocol = _Mute

    def __init__(self) -> None:
        self.seen = b""
        self.request_in: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()


def _within(d: Deferred[Any]) -> Deferred[Any]:
    return d.addTimeout(DEADLINE_S, reactor)


Start = Callable[[HTTPClient, str, float], Deferred[Any]]


def _openai_tts(client: HTTPClient, url: str, timeout_s: float) -> Deferred[Any]:
    synth = OpenAISynthesizer(SynthesisSettings(endpoint=url + "/v1", api_key="k"), http_client=client, clock=reactor,
                              environ={}, idle_timeout_s=timeout_s)
    return synth.synthesize(SynthesisRequest("Hi."), lambda pcm, rate: None)


def _deepgram_tts(client: HTTPClient, url: str, timeout_s: float) -> Deferred[Any]:
    synth = DeepgramSynthesizer(SynthesisSettings(endpoint=url + "/v1/speak", api_key="k"), http_client=client,
                                clock=reactor, environ={}, idle_timeout_s=timeout_s)
    return synth.synthesize(SynthesisRequest("Hi."), lambda pcm, rate: None)


def _tencent_basic_tts(client: HTTPClient, url: str, timeout_s: float) -> Deferred[Any]:
    synth = TencentBasicSynthesizer(SynthesisSettings(endpoint=url + "/", api_key="secret"), http_client=client,
                                    clock=reactor, environ={}, timeout_s=timeout_s)
    return synth.synthesize(SynthesisRequest("Hi.", extra=TENCENT_OWN), lambda pcm, rate: None)


def _openai_asr(client: HTTPClient, url: str, timeout_s: float) -> Deferred[Any]:
    recognizer = OpenAIRecognizer(RecognizerSettings(endpoint=url + "/v1", api_key="k"), http_client=client,
                                  clock=reactor, environ={}, timeout_s=timeout_s)
    return recognizer.transcribe(b"\x00\x00" * 1600, RecognitionRequest(), partial=False)


PROVIDERS: dict[str, tuple[Start, type[Exception]]] = {
    "openai TTS": (_openai_tts, SynthesisError),
    "deepgram TTS": (_deepgram_tts, SynthesisError),
    "tencent_basic TTS": (_tencent_basic_tts, SynthesisError),
    "openai ASR": (_openai_asr, RecognitionError),
}


class AbortWaitingRequestTests(TestCase):
    """Against a real local server that takes the request and never answers."""

    timeout = 30

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = HTTPClient(Agent(reactor, pool=self.pool))

    def tearDown(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()

    def _serve(self) -> tuple[_MuteFactory, str]:
        factory = _MuteFactory()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, f"http://127.0.0.1:{port.getHost().port}"

    async def test_cancel_closes_the_connection(self) -> None:
        """Cancelling while the server holds back the headers: CancelledError, and the server sees the close."""
        for name, (start, _) in PROVIDERS.items():
            factory, url = self._serve()
            d = start(self.client, url, 30.0)
            await _within(factory.request_in)
            d.cancel()
            self.assertIsInstance(self.failureResultOf(d).value, CancelledError, name)
            await _within(factory.closed)

    async def test_timeout_closes_the_connection(self) -> None:
        """A short timeout while the server holds back the headers: the provider's retryable timeout error,
        and the server sees the close."""
        for name, (start, error_type) in PROVIDERS.items():
            factory, url = self._serve()
            d = start(self.client, url, SHORT_TIMEOUT_S)
            await _within(factory.request_in)
            error = await _within(self.assertFailure(d, error_type))
            self.assertTrue(error.retryable, name)
            self.assertRegex(str(error), r"no (data for|answer (in|within)) 0\.2 s", name)
            await _within(factory.closed)


class ServerMessageTests(SynchronousTestCase):
    def test_fields_in_order_then_the_body(self) -> None:
        """The first usable field wins (a string or an object's message); else the body text, collapsed and bounded."""
        fields = ("err_msg", "error")
        self.assertEqual(server_message(b'{"error": {"message": "bad  key"}, "err_msg": ""}', fields), "bad key")
        self.assertEqual(server_message(b'{"err_msg": "first", "error": "second"}', fields), "first")
        self.assertEqual(server_message(b"<html>\n oops </html>", fields), "<html> oops </html>")
        self.assertEqual(server_message(b'{"error": 5}', fields), '{"error": 5}')
        self.assertEqual(server_message(b"x" * 50, fields, max_chars=10), "x" * 10 + "...")


def _refuse(url: str) -> None:
    if "allowed.test" not in url:
        raise FetchRefusedError(f"{url} is not allowed")


class KeyPolicyTests(SynchronousTestCase):
    def _policy(self, env_key: str | None = "env-key", **kwargs: Any) -> KeyPolicy:
        self.refused: list[str] = []
        return KeyPolicy("x TTS", official=frozenset({"https://api.x.test/speak"}), env_key=env_key,
                         no_key="x TTS: no API key", where="api.x.test", error_type=SynthesisError, check=_refuse,
                         on_refused=self.refused.append, **kwargs)

    def test_environment_key_only_to_the_official_endpoint(self) -> None:
        """The environment's key goes to the official endpoint; elsewhere only the request's own key, if allowed."""
        policy = self._policy()
        self.assertEqual(policy.key_for("https://api.x.test/speak", None), "env-key")
        self.assertEqual(policy.key_for("https://api.x.test/speak", "own"), "own")
        self.assertEqual(policy.key_for("https://allowed.test/speak", "own"), "own")
        error = self.assertRaises(SynthesisError, policy.key_for, "https://allowed.test/speak", None)
        self.assertEqual(str(error), "x TTS: endpoint is not api.x.test; a request with its own endpoint "
                                     "must give its own apiKey")
        error = self.assertRaises(SynthesisError, policy.key_for, "https://evil.test/speak", "own")
        self.assertEqual((str(error), error.retryable),
                         ("x TTS: endpoint not allowed (http/https and fetch.allowed_hosts only)", False))
        self.assertEqual(self.refused, ["https://evil.test/speak is not allowed"])

    def test_settings(self) -> None:
        """No key for an endpoint that needs one, or settings elsewhere without their own: unavailable."""
        self._policy().check_settings("https://api.x.test/speak", None)
        self.assertRaises(ProviderUnavailableError, self._policy(env_key=None).check_settings,
                          "https://api.x.test/speak", None)
        self.assertRaises(ProviderUnavailableError, self._policy().check_settings, "https://allowed.test/", None)
        self._policy(env_key=None, needs_key=frozenset()).check_settings("https://api.x.test/speak", None)
        self.assertEqual(self._policy(env_key=None, needs_key=frozenset()).key_for("https://api.x.test/speak", None),
                         "")
