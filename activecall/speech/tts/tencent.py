"""Tencent Cloud TTS: ``tencent`` (real-time WebSocket synthesis) and ``tencent_basic`` (TextToVoice REST).

``tencent``: Tencent's "实时语音合成" WebSocket API, one connection per request (it takes the
whole text in the URL, which suits one :class:`SynthesisRequest` per sentence; the duplex
``stream_wsv2`` variant is for text that arrives piece by piece and is not used here):

* ``wss://tts.cloud.tencent.com/stream_ws?Action=TextToStreamAudioWS&AppId=..&SecretId=..&Timestamp=..
  &Expired=..&SessionId=..&Text=..&VoiceType=..&Codec=pcm&SampleRate=..&Speed=..&Volume=0
  [&EnableSubtitle=true]&Signature=..``, signed by :func:`activecall.speech.tencent_auth.get_signature`;
* the server sends Binary frames of s16le mono PCM and Text JSON ``{code, message, session_id,
  request_id, message_id, final, result: {subtitles: [{Text, BeginTime, EndTime, BeginIndex,
  EndIndex, Phoneme}]}}``; ``final: 1`` ends the synthesis (we then close), ``code != 0`` is an error.

``tencent_basic``: ``POST https://tts.tencentcloudapi.com/`` (API 3.0, ``X-TC-Action: TextToVoice``,
``X-TC-Version: 2019-08-23``, TC3-HMAC-SHA256 ``Authorization``) with the JSON body ``{Text, SessionId,
VoiceType, Codec: "pcm", SampleRate, Speed, Volume, EnableSubtitle}``; the answer is
``{"Response": {"Audio": base64 PCM, "Subtitles": [...], "RequestId"}}`` or
``{"Response": {"Error": {"Code", "Message"}, "RequestId"}}``.

Both:

* credentials: ``request.extra`` ``appId``/``secretId`` and ``request.api_key`` (the option's
  ``secretKey``) or ``settings.api_key``, else ``TENCENT_APPID``/``TENCENT_SECRET_ID``/``TENCENT_SECRET_KEY``;
  the environment's go only to Tencent's own endpoint: an ``endpoint`` elsewhere (the option's, which a
  client chooses) must come with all three of its own and pass ``[fetch] allowed_hosts``; without any
  secret key for the settings' endpoint the constructor raises ProviderUnavailableError;
* ``speaker`` is the numeric ``VoiceType``; ``speed`` (a rate, 1.0 normal) maps onto Tencent's
  -2..6 scale; volume stays 0 (normal; the caller applies ``volume``); ``sample_rate_hz`` 8000,
  16000 or 24000 is asked for, other rates get 16000, and ``on_audio`` says which;
* ``endpoint``: the service URL (``tencent``: ``ws[s]://host[:port][/path]``, path ``/stream_ws`` when
  absent; ``tencent_basic``: ``http[s]://host[:port]/``), its host being the signed one;
* extra entries named like Tencent parameters (``EmotionCategory``, ``SegmentRate``...) are added;
* word timings come from the subtitles when ``request.subtitle`` (``BeginTime``/``EndTime`` ms).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from typing import Any, Callable, Mapping, Optional, Sequence
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from activecall.config import FetchConfig
from activecall.fetch import FetchRefusedError, check_url
from activecall.speech.httpcall import PcmFramer, StreamedCall, retryable_status
from activecall.speech.asr.wsstream import check_ws_url
from activecall.speech.interfaces import (
    ISpeechSynthesizer,
    ProviderUnavailableError,
    SynthesisError,
    SynthesisRequest,
    WordTiming,
)
from activecall.speech.registry import SynthesisSettings
from activecall.speech.tencent_auth import (
    TC3_CONTENT_TYPE,
    TencentCredentials,
    get_signature,
    resolve_credentials,
    signed_query,
    tc3_authorization,
)
from activecall.speech.wsclient import WsConnectError, WsConnection, connect_ws

__all__ = ["TencentSynthesizer", "TencentBasicSynthesizer", "DEFAULT_WS_ENDPOINT", "DEFAULT_REST_ENDPOINT",
           "tencent_speed", "parse_subtitles"]

DEFAULT_WS_ENDPOINT = "wss://tts.cloud.tencent.com/stream_ws"
DEFAULT_REST_ENDPOINT = "https://tts.tencentcloudapi.com/"
DEFAULT_VOICE = "101001"  # Active Call's defaults: 101001 (stream_ws), 501004 (TextToVoice)
DEFAULT_BASIC_VOICE = "501004"
SIGNATURE_TTL_S = 3600
_RATES = (8000, 16000, 24000)
_VOICE = re.compile(r"[0-9]{1,12}")
_EXTRA_NAME = re.compile(r"[A-Z][A-Za-z0-9]{1,63}")
#: Parameters an ``extra`` entry never sets: identity and signing ones.
_RESERVED = frozenset({"AppId", "SecretId", "Action", "Timestamp", "Expired", "Nonce", "Signature", "SessionId"})
_MAX_EXTRA_VALUE = 256
_MAX_SUBTITLES = 4096
_MAX_WORD = 64
_MAX_TIME_MS = 24 * 3600 * 1000
#: Tencent's speed levels and the rates they stand for (documented: -2 = 0.6x ... 6 = 2.5x).
_SPEED_STEPS = ((0.6, -2.0), (0.8, -1.0), (1.0, 0.0), (1.2, 1.0), (1.5, 2.0), (2.5, 6.0))


def _rate_for(request: SynthesisRequest) -> int:
    """The sample rate asked of Tencent (and so delivered): the request's when Tencent has it, else 16 kHz."""
    return request.sample_rate_hz if request.sample_rate_hz in _RATES else 16000


def tencent_speed(rate: float) -> float:
    """Map a speaking rate (1.0 normal) onto Tencent's ``Speed`` (-2..6, 0 normal), piecewise linearly."""
    if not rate == rate or rate <= _SPEED_STEPS[0][0]:  # NaN or slower than the slowest step
        return _SPEED_STEPS[0][1]
    for (r0, s0), (r1, s1) in zip(_SPEED_STEPS, _SPEED_STEPS[1:]):
        if rate <= r1:
            return round(s0 + (s1 - s0) * (rate - r0) / (r1 - r0), 2)
    return _SPEED_STEPS[-1][1]


def parse_subtitles(value: Any, provider: str) -> list[tuple[int, WordTiming]]:
    """Tencent ``Subtitles`` as ``(BeginIndex, WordTiming)`` pairs; SynthesisError when malformed.

    ``BeginIndex`` is -1 when absent.  Hostile input is bounded: count, word length, times.
    """
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > _MAX_SUBTITLES:
        raise SynthesisError(f"{provider}: malformed subtitles")
    words: list[tuple[int, WordTiming]] = []
    for item in value:
        if not isinstance(item, dict):
            raise SynthesisError(f"{provider}: malformed subtitles")
        text, begin, end = item.get("Text"), item.get("BeginTime"), item.get("EndTime")
        index = item.get("BeginIndex", -1)
        numbers = (begin, end, index)
        if not (isinstance(text, str) and all(isinstance(v, int) and not isinstance(v, bool) for v in numbers)
                and 0 <= begin <= end <= _MAX_TIME_MS):
            raise SynthesisError(f"{provider}: malformed subtitles")
        words.append((index, WordTiming(text[:_MAX_WORD], begin, end)))
    return words


class _Common:
    """Credentials, endpoint policy and request parameters shared by both providers."""

    provider = "tencent TTS"
    _log = Logger()

    def __init__(self, settings: SynthesisSettings, environ: Mapping[str, str], fetch: FetchConfig,
                 default_endpoint: str, url_policy: Callable[[str, tuple[str, ...]], str],
                 session_id: Callable[[], str]) -> None:
        """``url_policy`` checks a client-chosen endpoint (raises FetchRefusedError)."""
        self._settings = settings
        self._url_policy = url_policy
        self._environ = environ
        self._fetch = fetch
        self._session_id = session_id
        self._official = default_endpoint
        self._default = settings.endpoint or default_endpoint
        if not settings.api_key and (not self._is_official(self._default) or not environ.get("TENCENT_SECRET_KEY")):
            raise ProviderUnavailableError(
                f"{self.provider}: no secret key (set tts.secretKey, or TENCENT_SECRET_KEY for Tencent's endpoint)")

    def _is_official(self, url: str) -> bool:
        return url.rstrip("/") == self._official.rstrip("/")

    def _target(self, request: SynthesisRequest) -> tuple[str, TencentCredentials]:
        """The URL ``request`` goes to and the credentials it is signed with, or SynthesisError."""
        url = request.endpoint or self._default
        official = self._is_official(url)
        if not official:
            try:
                self._url_policy(url, self._fetch.allowed_hosts)
            except FetchRefusedError as e:
                self._log.info("{provider} endpoint refused: {reason}", provider=self.provider, reason=str(e))
                raise SynthesisError(f"{self.provider}: endpoint not allowed (fetch.allowed_hosts only)") from None
        own = (request.app_id or request.extra.get("appId"), request.secret_id or request.extra.get("secretId"),
               request.api_key or self._settings.api_key)
        try:
            return url, resolve_credentials(own, self._environ, use_environ=official, provider=self.provider)
        except ValueError as e:
            raise SynthesisError(str(e)) from None

    def _params(self, request: SynthesisRequest, default_voice: str) -> dict[str, Any]:
        voice = request.speaker or default_voice
        if not _VOICE.fullmatch(voice):
            raise SynthesisError(f"{self.provider}: speaker must be a numeric Tencent VoiceType, not {voice[:40]!r}")
        params: dict[str, Any] = {
            key: value for key, value in request.extra.items()
            if _EXTRA_NAME.fullmatch(key) and len(value) <= _MAX_EXTRA_VALUE and key not in _RESERVED}
        params.update({
            "Text": request.text,
            "SessionId": self._session_id(),
            "VoiceType": int(voice),
            "Codec": "pcm",
            "SampleRate": _rate_for(request),
            "Speed": tencent_speed(request.speed),
            "Volume": 0,
        })
        if request.subtitle:
            params["EnableSubtitle"] = True
        return params


class _Words:
    """Forwards subtitle words once each: Tencent may repeat a sentence's words in later messages."""

    def __init__(self, request: SynthesisRequest, on_words: Optional[Callable[[Sequence[WordTiming]], None]]) -> None:
        self._on_words = on_words if request.subtitle else None
        self._last_index = -1

    def feed(self, words: list[tuple[int, WordTiming]]) -> None:
        if self._on_words is None:
            return
        fresh = [word for index, word in words if index < 0 or index > self._last_index]
        self._last_index = max([self._last_index] + [index for index, _ in words])
        if fresh:
            self._on_words(fresh)


@implementer(ISpeechSynthesizer)
class TencentSynthesizer(_Common):
    """``tencent``: real-time synthesis over Tencent's ``stream_ws`` WebSocket (see the module docstring)."""

    name = "tencent"

    def __init__(self, settings: SynthesisSettings, *, reactor: Any, clock: IReactorTime, environ: Mapping[str, str],
                 fetch: FetchConfig = FetchConfig(), connect_timeout_s: float = 5.0, idle_timeout_s: float = 15.0,
                 session_id: Callable[[], str] = lambda: str(uuid.uuid4())) -> None:
        """``idle_timeout_s`` bounds the wait for each frame; ``session_id`` makes the per-request SessionId."""
        super().__init__(settings, environ, fetch, DEFAULT_WS_ENDPOINT, check_ws_url, session_id)
        self._reactor = reactor
        self._clock = clock
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s

    def url_for(self, request: SynthesisRequest) -> str:
        """The signed ``stream_ws`` URL for ``request``; SynthesisError when it cannot work."""
        url, creds = self._target(request)
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise SynthesisError("tencent TTS: endpoint must be a ws:// or wss:// URL")
        path = parts.path or "/stream_ws"
        params = self._params(request, DEFAULT_VOICE)
        now = int(self._clock.seconds())
        params.update({"Action": "TextToStreamAudioWS", "AppId": int(creds.app_id), "SecretId": creds.secret_id,
                       "Timestamp": now, "Expired": now + SIGNATURE_TTL_S})
        if request.subtitle:
            params["EnableSubtitle"] = "true"  # in a URL the boolean is spelled as Tencent's samples do
        signature = get_signature(creds.secret_key, parts.netloc, path, params)
        return f"{parts.scheme}://{parts.netloc}{path}?{signed_query(params, 'Signature', signature)}"

    def synthesize(self, request: SynthesisRequest, on_audio: Callable[[bytes, int], None],
                   on_words: Optional[Callable[[Sequence[WordTiming]], None]] = None) -> Deferred[None]:
        """See :meth:`ISpeechSynthesizer.synthesize`; audio at 8/16/24 kHz (the rate asked for, else 16 kHz)."""
        try:
            url = self.url_for(request)
        except SynthesisError as e:
            return fail(e)
        call = _WsSpeechCall(self._clock, self._connect_timeout_s, self._idle_timeout_s, _rate_for(request), on_audio,
                             _Words(request, on_words), self._fetch.max_bytes, self._log)
        try:
            connecting = connect_ws(self._reactor, url, listener=call, max_message_bytes=1024 * 1024,
                                    connect_timeout_s=self._connect_timeout_s)
        except WsConnectError as e:
            return fail(SynthesisError(f"tencent TTS: {e}"))
        call.start(connecting)
        return call.result


class _WsSpeechCall:
    """One ``stream_ws`` synthesis: connecting -> streaming (PCM + subtitles) -> final, with timeouts.

    Every wait (connect, each frame) is bounded on the injected clock.  Cancelling ``result``
    drops the connection; after ``result`` fired nothing reaches ``on_audio``/``on_words``.
    """

    provider = "tencent TTS"

    def __init__(self, clock: IReactorTime, connect_timeout_s: float, idle_timeout_s: float, rate: int,
                 on_audio: Callable[[bytes, int], None], words: _Words, max_bytes: int, log: Logger) -> None:
        self._clock = clock
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._rate = rate
        self._on_audio = on_audio
        self._words = words
        self._max_bytes = max_bytes
        self._log = log
        self._received = 0
        self._framer = PcmFramer()
        self._connecting: Optional[Deferred[WsConnection]] = None
        self._conn: Optional[WsConnection] = None
        self._timer: Optional[IDelayedCall] = None
        self.result: Deferred[None] = Deferred(lambda _: self._stop())

    def start(self, connecting: Deferred[WsConnection]) -> None:
        self._connecting = connecting
        self._timer = self._clock.callLater(self._connect_timeout_s, self._timed_out, "connect timed out")
        connecting.addCallbacks(self._connected, self._connect_failed)

    # -- outcome

    def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.called:
            connecting.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    def _fail(self, error: SynthesisError) -> None:
        self._stop()
        if not self.result.called:
            self.result.errback(Failure(error))

    def _timed_out(self, what: str) -> None:
        self._timer = None
        self._fail(SynthesisError(f"tencent TTS: {what}", retryable=True))

    def _arm_idle(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout_s)
        else:
            self._timer = self._clock.callLater(self._idle_timeout_s, self._timed_out,
                                                f"no data for {self._idle_timeout_s:g} s")

    # -- connection

    def _connected(self, conn: WsConnection) -> None:
        self._connecting = None
        if self.result.called:
            conn.abort()
            return
        self._conn = conn
        if self._timer is not None and self._timer.active():
            self._timer.cancel()  # the connect deadline; frames now have the idle one
        self._timer = None
        self._arm_idle()

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.result.called or failure.check(CancelledError):
            return
        status = failure.value.status if failure.check(WsConnectError) else None
        retryable = status is None or status == 429 or status >= 500
        detail = f"refused ({status})" if status else failure.getErrorMessage()
        self._fail(SynthesisError(f"tencent TTS: cannot connect: {detail}", retryable=retryable))

    # -- WsListener

    def ws_binary(self, data: bytes) -> None:
        if self.result.called:
            return
        self._received += len(data)
        if self._received > self._max_bytes:
            self._fail(SynthesisError(f"tencent TTS: audio larger than {self._max_bytes} bytes"))
            return
        self._arm_idle()
        pcm = self._framer.feed(data)
        if pcm:
            try:
                self._on_audio(pcm, self._rate)
            except Exception as e:
                self._log.failure("tencent TTS on_audio callback failed")
                self._fail(SynthesisError(f"audio consumer failed: {e}"))

    def ws_text(self, text: str) -> None:
        if self.result.called:
            return
        self._arm_idle()
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("code"), int) \
                or isinstance(message.get("code"), bool):
            self._fail(SynthesisError("tencent TTS: malformed message from the server"))
            return
        code = message["code"]
        if code != 0:
            detail = str(message.get("message") or "")[:200]
            self._fail(SynthesisError(f"tencent TTS: error {code}: {detail}".rstrip(": ")))
            return
        result = message.get("result")
        try:
            words = parse_subtitles(result.get("subtitles") if isinstance(result, dict) else None, self.provider)
            self._words.feed(words)
        except SynthesisError as e:
            self._fail(e)
            return
        except Exception as e:
            self._log.failure("tencent TTS on_words callback failed")
            self._fail(SynthesisError(f"word timing consumer failed: {e}"))
            return
        if message.get("final") == 1:
            conn, self._conn = self._conn, None
            self._stop()
            if conn is not None:
                conn.close()  # the documented end: the client closes
            self.result.callback(None)

    def ws_closed(self, clean: bool, code: Optional[int], reason: str) -> None:
        self._conn = None
        if not self.result.called:
            detail = f" ({code} {reason[:200]})" if code else ""
            self._fail(SynthesisError(f"tencent TTS: connection closed before the end of the audio{detail}",
                                      retryable=True))


@implementer(ISpeechSynthesizer)
class TencentBasicSynthesizer(_Common):
    """``tencent_basic``: one TextToVoice REST call per request (see the module docstring)."""

    name = "tencent_basic"
    provider = "tencent_basic TTS"

    def __init__(self, settings: SynthesisSettings, *, http_client: HTTPClient, clock: IReactorTime,
                 environ: Mapping[str, str], fetch: FetchConfig = FetchConfig(), timeout_s: float = 30.0,
                 session_id: Callable[[], str] = lambda: str(uuid.uuid4())) -> None:
        """``timeout_s`` bounds the whole request; ``fetch.max_bytes`` the response."""
        super().__init__(settings, environ, fetch, DEFAULT_REST_ENDPOINT, check_url, session_id)
        self._http = http_client
        self._clock = clock
        self._timeout_s = timeout_s

    def request_for(self, request: SynthesisRequest) -> tuple[str, dict[bytes, list[bytes]], bytes]:
        """URL, headers and JSON body of the signed TextToVoice call for ``request``; SynthesisError if impossible."""
        url, creds = self._target(request)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SynthesisError("tencent_basic TTS: endpoint must be an http:// or https:// URL")
        body = self._params(request, DEFAULT_BASIC_VOICE)
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        now = int(self._clock.seconds())
        authorization = tc3_authorization(creds.secret_id, creds.secret_key, service="tts", host=parts.netloc,
                                          payload=payload, timestamp=now)
        headers = {
            b"Authorization": [authorization.encode("ascii")],
            b"Content-Type": [TC3_CONTENT_TYPE.encode("ascii")],
            b"Host": [parts.netloc.encode("ascii")],
            b"X-TC-Action": [b"TextToVoice"],
            b"X-TC-Version": [b"2019-08-23"],
            b"X-TC-Timestamp": [str(now).encode("ascii")],
        }
        region = request.extra.get("region")
        if region and re.fullmatch(r"[a-z]{2,4}-[a-z0-9-]{2,32}", region):
            headers[b"X-TC-Region"] = [region.encode("ascii")]
        return url, headers, payload

    def synthesize(self, request: SynthesisRequest, on_audio: Callable[[bytes, int], None],
                   on_words: Optional[Callable[[Sequence[WordTiming]], None]] = None) -> Deferred[None]:
        """See :meth:`ISpeechSynthesizer.synthesize`: all audio in one ``on_audio`` call once the answer is in."""
        try:
            url, headers, payload = self.request_for(request)
        except SynthesisError as e:
            return fail(e)
        call = _RestCall(self._clock, self._timeout_s, self._fetch.max_bytes, _rate_for(request), on_audio,
                         _Words(request, on_words), self._log)
        call.start(self._http.post(url, data=payload, headers=headers, unbuffered=True, allow_redirects=False))
        return call.result


class _RestCall(StreamedCall[None]):
    """One TextToVoice request: the (bounded) answer is decoded once whole into audio and subtitles.

    ``timeout_s`` bounds the whole exchange; nothing reaches ``on_audio`` after ``result`` fired.
    """

    provider = "tencent_basic TTS"
    error_type = SynthesisError
    idle_timeout = False
    truncate_error_body = False

    def __init__(self, clock: IReactorTime, timeout_s: float, max_bytes: int, rate: int,
                 on_audio: Callable[[bytes, int], None], words: _Words, log: Logger) -> None:
        super().__init__(clock, timeout_s, max_bytes, log)
        self._rate = rate
        self._on_audio = on_audio
        self._words = words
        self._chunks: list[bytes] = []

    def timeout_error(self) -> SynthesisError:
        return SynthesisError(f"tencent_basic TTS: no answer in {self.timeout_s:g} s", retryable=True)

    def received(self, data: bytes) -> None:
        self._chunks.append(data)

    def status_error(self, code: int, body: bytes) -> SynthesisError:
        answer = _text_to_voice_answer(code, body)
        assert isinstance(answer, SynthesisError)  # a non-2xx answer is always an error
        return answer

    def finished(self) -> None:
        audio, words = _parse_text_to_voice(self.code, b"".join(self._chunks))
        self.deliver(self._words.feed, words)
        if audio:
            self.deliver(self._on_audio, audio, self._rate)


_RETRYABLE_ERRORS = ("InternalError", "RequestLimitExceeded", "ResourceUnavailable")


def _text_to_voice_answer(status: int, body: bytes) -> dict[str, Any] | SynthesisError:
    """The ``Response`` object of a successful TextToVoice answer, or the SynthesisError the answer stands for."""
    provider = "tencent_basic TTS"
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    response = parsed.get("Response") if isinstance(parsed, dict) else None
    if not isinstance(response, dict):
        text = body.decode("utf-8", "replace").strip()[:200]
        return SynthesisError(f"{provider} HTTP {status}: {text or 'not a Tencent Cloud API answer'}",
                              retryable=retryable_status(status))
    error = response.get("Error")
    if error is not None:
        code = str(error.get("Code") or "") if isinstance(error, dict) else ""
        message = str(error.get("Message") or "") if isinstance(error, dict) else ""
        return SynthesisError(f"{provider}: {code[:100]}: {message[:200]}".rstrip(": "),
                              retryable=code.startswith(_RETRYABLE_ERRORS))
    if not 200 <= status < 300:
        return SynthesisError(f"{provider} HTTP {status}", retryable=retryable_status(status))
    return response


def _parse_text_to_voice(status: int, body: bytes) -> tuple[bytes, list[tuple[int, WordTiming]]]:
    """Audio (whole samples) and words of a TextToVoice answer, or the SynthesisError it stands for."""
    provider = "tencent_basic TTS"
    response = _text_to_voice_answer(status, body)
    if isinstance(response, SynthesisError):
        raise response
    audio_b64 = response.get("Audio")
    if not isinstance(audio_b64, str):
        raise SynthesisError(f"{provider}: answer without Audio")
    try:
        audio = base64.b64decode(audio_b64, validate=True)
    except (binascii.Error, ValueError):
        raise SynthesisError(f"{provider}: Audio is not base64") from None
    return audio[: len(audio) & ~1], parse_subtitles(response.get("Subtitles"), provider)
