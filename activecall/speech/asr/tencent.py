"""Tencent Cloud real-time ASR, provider name ``tencent``: one WebSocket per call.

Wire protocol (Tencent's "实时语音识别 (WebSocket)", API 2.0 style):

* ``wss://asr.cloud.tencent.com/asr/v2/<appid>?secretid=..&timestamp=..&expired=..&nonce=..
  &engine_model_type=16k_zh&voice_id=..&voice_format=1&needvad=1&...&signature=..``, the signature
  being :func:`activecall.speech.tencent_auth.asr_signature` over every other parameter;
* we send Binary frames of 16 kHz s16le mono PCM (2 frames = 40 ms a message, Tencent's advice),
  then the Text ``{"type": "end"}``;
* the server sends Text JSON ``{code, message, voice_id, message_id, result: {slice_type, index,
  start_time, end_time, voice_text_str, word_list...}, final}``: ``slice_type`` 0/1 is a sentence
  starting/changing (a partial), 2 its end (a final); ``final: 1`` once all audio is recognized
  (we then close); ``code != 0`` is an error, after which the server closes.

Credentials: ``request.app_id``/``secret_id``/``api_key`` (the option's ``appId``/``secretId``/
``secretKey``), else ``request.extra`` ``appId``/``secretId``, else ``settings.api_key`` for the key,
else ``TENCENT_APPID``/``TENCENT_SECRET_ID``/``TENCENT_SECRET_KEY``.  The environment's credentials
go only to Tencent (``wss://asr.cloud.tencent.com``): an ``endpoint`` elsewhere (the option's, which a
client chooses) must come with all three of its own and pass ``[fetch] allowed_hosts``.

An ``endpoint`` is ``ws[s]://host[:port]`` (a path there replaces ``/asr/v2``; ``/<appid>`` follows);
the signature covers the endpoint's host, as it does Tencent's.

``request.model`` (``modelType``) is the ``engine_model_type`` (default ``16k_zh``; ``16k_en`` for
an ``en*`` language).  Every ``extra`` entry with a lower-case name becomes a query parameter,
replacing the defaults (``needvad=1``, ``vad_silence_time=700``, ``filter_modal=0``, ``filter_punc=0``,
``convert_num_mode=1``, ``word_info=1``, ``max_speak_time=60000``, as Active Call sends them); the
signing parameters cannot be replaced.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from activecall.config import FetchConfig
from activecall.fetch import FetchRefusedError
from activecall.speech.asr.wsstream import MAX_RESULT_TEXT, WsRecognitionStream, check_ws_url, parse_json_object
from activecall.speech.interfaces import (
    IRecognitionListener,
    IRecognitionStream,
    IRecognizer,
    ProviderUnavailableError,
    RecognitionError,
    RecognitionRequest,
    Transcript,
)
from activecall.speech.registry import RecognizerSettings
from activecall.speech.tencent_auth import asr_signature, resolve_credentials, signed_query

__all__ = ["TencentRecognizer", "DEFAULT_ENDPOINT", "DEFAULT_ENGINE", "SIGNATURE_TTL_S"]

DEFAULT_ENDPOINT = "wss://asr.cloud.tencent.com"
DEFAULT_ENGINE = "16k_zh"
#: How long the signed URL stays valid (``expired - timestamp``); it is checked at the upgrade only.
SIGNATURE_TTL_S = 3600
_DEFAULT_PARAMS = {
    "needvad": "1",
    "vad_silence_time": "700",
    "filter_modal": "0",
    "filter_punc": "0",
    "convert_num_mode": "1",
    "word_info": "1",
    "max_speak_time": "60000",
}
_SIGNING_PARAMS = frozenset({"secretid", "timestamp", "expired", "nonce", "voice_id", "voice_format", "signature"})
_EXTRA_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_EXTRA_VALUE = 2048
#: Server error codes worth a new stream: concurrency limit, engine/server errors.
_RETRYABLE_CODES = frozenset({4006}) | frozenset(range(5000, 6000))
_MAX_TIME_MS = 24 * 3600 * 1000


def _bounded_ms(value: Any) -> Optional[int]:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_TIME_MS:
        return value
    return None


class _TencentStream(WsRecognitionStream):
    """Parses Tencent's result messages into transcripts; ``{"type": "end"}`` ends the audio.

    Sentences are numbered here (0, 1, ... in the order their finals come) so partials of an
    index always precede its final, whatever the server's own ``index`` says.
    """

    provider = "tencent"

    def __init__(self, **kwargs: Any) -> None:
        self._index = 0
        self._partial_sent = False
        super().__init__(**kwargs)

    def text_received(self, text: str) -> None:
        message = parse_json_object(text, self.provider)
        code = message.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            raise RecognitionError("tencent: message without a numeric code")
        if code != 0:
            detail = str(message.get("message") or "")[:200]
            raise RecognitionError(f"tencent: error {code}: {detail}".rstrip(": "),
                                   retryable=code in _RETRYABLE_CODES)
        result = message.get("result")
        if result is not None:
            self._result(result)
        if message.get("final") == 1 and self.conn is not None:
            self.conn.close()  # all audio recognized: ws_closed ends the stream

    def _result(self, result: Any) -> None:
        if not isinstance(result, dict):
            raise RecognitionError("tencent: result is not an object")
        slice_type = result.get("slice_type")
        text = result.get("voice_text_str", "")
        if slice_type not in (0, 1, 2) or isinstance(slice_type, bool) or not isinstance(text, str):
            raise RecognitionError("tencent: malformed result")
        text = text[:MAX_RESULT_TEXT]
        final = slice_type == 2
        if not final and not text:
            return
        if final and not text and not self._partial_sent:
            return  # a sentence that never had words (noise): nothing to report
        offset_ms = self.dropped_bytes // 32  # audio dropped before the connection never reached Tencent
        start, end = _bounded_ms(result.get("start_time")), _bounded_ms(result.get("end_time"))
        self.emit(Transcript(self._index, text, final,
                             None if start is None else start + offset_ms,
                             None if end is None else end + offset_ms))
        if final:
            self._index += 1
            self._partial_sent = False
        else:
            self._partial_sent = True

    def finish_audio(self) -> None:
        assert self.conn is not None
        self.conn.send_text(json.dumps({"type": "end"}))


@implementer(IRecognizer)
class TencentRecognizer:
    """Opens one :class:`_TencentStream` per call (see the module docstring)."""

    name = "tencent"
    streaming = True
    _log = Logger()

    def __init__(self, settings: RecognizerSettings, *, reactor: Any, clock: IReactorTime,
                 environ: Mapping[str, str], fetch: FetchConfig = FetchConfig(), connect_timeout_s: float = 5.0,
                 close_timeout_s: float = 3.0, nonce: Callable[[], int] = lambda: secrets.randbelow(10**9) + 1,
                 voice_id: Callable[[], str] = lambda: uuid.uuid4().hex) -> None:
        """``nonce`` and ``voice_id`` are the per-connection random values (injected for tests).

        Raise ProviderUnavailableError when no secret key could ever be sent: none in the settings
        nor (for Tencent's own endpoint) in the environment.
        """
        self._settings = settings
        self._reactor = reactor
        self._clock = clock
        self._environ = environ
        self._fetch = fetch
        self._connect_timeout_s = connect_timeout_s
        self._close_timeout_s = close_timeout_s
        self._nonce = nonce
        self._voice_id = voice_id
        self._default = (settings.endpoint or DEFAULT_ENDPOINT).rstrip("/")
        if not settings.api_key and (self._default != DEFAULT_ENDPOINT or not environ.get("TENCENT_SECRET_KEY")):
            raise ProviderUnavailableError(
                "tencent ASR: no secret key (set asr.secretKey, or TENCENT_SECRET_KEY for Tencent's endpoint)")

    def url_for(self, request: RecognitionRequest) -> str:
        """The signed URL of a new stream for ``request``; RecognitionError when it cannot work."""
        base = (request.endpoint or self._default).rstrip("/")
        official = base == DEFAULT_ENDPOINT
        if not official:
            try:
                check_ws_url(base, self._fetch.allowed_hosts)
            except FetchRefusedError as e:
                self._log.info("tencent ASR endpoint refused: {reason}", reason=str(e))
                raise RecognitionError("tencent ASR: endpoint not allowed (ws/wss and fetch.allowed_hosts only)") \
                    from None
        own = (request.app_id or request.extra.get("appId"), request.secret_id or request.extra.get("secretId"),
               request.api_key or self._settings.api_key)
        try:
            creds = resolve_credentials(own, self._environ, use_environ=official, provider="tencent ASR")
        except ValueError as e:
            raise RecognitionError(str(e)) from None
        parts = urlsplit(base)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise RecognitionError("tencent ASR: endpoint must be a ws:// or wss:// URL")
        path = (parts.path.rstrip("/") or "/asr/v2") + "/" + creds.app_id
        params = dict(_DEFAULT_PARAMS)
        for key, value in request.extra.items():
            if _EXTRA_NAME.fullmatch(key) and key not in _SIGNING_PARAMS and len(value) <= _MAX_EXTRA_VALUE:
                params[key] = value
        language = (request.language or "").lower()
        params["engine_model_type"] = (request.model or params.get("engine_model_type")
                                       or ("16k_en" if language.startswith("en") else DEFAULT_ENGINE))
        now = int(self._clock.seconds())
        params.update({
            "secretid": creds.secret_id,
            "timestamp": str(now),
            "expired": str(now + SIGNATURE_TTL_S),
            "nonce": str(self._nonce()),
            "voice_id": self._voice_id(),
            "voice_format": "1",  # pcm
        })
        signature = asr_signature(creds.secret_key, parts.netloc, path, params)
        return f"{parts.scheme}://{parts.netloc}{path}?{signed_query(params, 'signature', signature)}"

    def open(self, request: RecognitionRequest, listener: IRecognitionListener) -> IRecognitionStream:
        """See :meth:`IRecognizer.open`; raises RecognitionError for missing credentials or a refused endpoint."""
        url = self.url_for(request)
        return _TencentStream(reactor=self._reactor, clock=self._clock, url=url, headers={}, listener=listener,
                              connect_timeout_s=self._connect_timeout_s, close_timeout_s=self._close_timeout_s,
                              frames_per_message=2)
