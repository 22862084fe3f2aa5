"""Deepgram Aura TTS, provider name ``deepgram``: ``POST https://api.deepgram.com/v1/speak`` (REST).

REST per request rather than the ``wss://.../v1/speak`` WebSocket: the call layer already sends one
sentence at a time, and the REST response is streamed (first audio before the whole sentence is
synthesized), so the WebSocket's Speak/Flush/Clear protocol would add state without lowering latency.

* URL: ``request.endpoint``, else ``settings.endpoint``, else ``https://api.deepgram.com/v1/speak``
  (the full speak URL; a query string in it is kept).
* Query: ``model`` (``request.speaker``, else ``request.model``, else ``settings.model``, else
  ``aura-2-thalia-en``), ``encoding=linear16``, ``container=none`` (raw s16le mono), ``sample_rate``
  (the requested rate when Deepgram offers it, else 16000), ``speed`` when not 1.0 (Aura-2: 0.7-1.5);
  every ``extra`` entry becomes a query parameter too, except ``encoding``/``container``.
* Body: ``{"text": ...}``; auth header ``Authorization: Token <key>``.
* Key: ``request.api_key``, else ``settings.api_key``, else ``environ["DEEPGRAM_API_KEY"]``; the
  environment's key goes only to api.deepgram.com: another endpoint must bring its own key, and a
  client-chosen one must pass the ``[fetch]`` rules.
* Errors: non-2xx -> :class:`SynthesisError` with the status and Deepgram's ``err_msg`` (or
  ``message``/``error``), retryable for 408/429/5xx; connection failures and idle timeouts are
  retryable.
"""

from __future__ import annotations

import json
from typing import Callable, Mapping, Optional, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IResponse
from zope.interface import implementer

from activecall.config import FetchConfig
from activecall.fetch import check_url
from activecall.speech.httpcall import PcmFramer, StreamedCall, content_type, retryable_status, server_message
from activecall.speech.interfaces import (
    ISpeechSynthesizer,
    SynthesisError,
    SynthesisRequest,
    WordTiming,
)
from activecall.speech.keys import KeyPolicy
from activecall.speech.registry import SynthesisSettings

__all__ = ["DeepgramSynthesizer", "DEFAULT_URL", "DEFAULT_MODEL", "SAMPLE_RATES_HZ"]

DEFAULT_URL = "https://api.deepgram.com/v1/speak"
DEFAULT_MODEL = "aura-2-thalia-en"
#: The rates Deepgram offers for linear16.
SAMPLE_RATES_HZ = frozenset({8000, 16000, 24000, 32000, 48000})
_FALLBACK_RATE_HZ = 16000
_SPEED_RANGE = (0.7, 1.5)
_FIXED_PARAMS = frozenset({"encoding", "container"})
_NOT_AUDIO_TYPES = frozenset(
    {b"audio/mpeg", b"audio/mp3", b"audio/ogg", b"audio/opus", b"audio/aac", b"audio/flac", b"application/json"}
)


@implementer(ISpeechSynthesizer)
class DeepgramSynthesizer:
    """Streams linear16 speech from Deepgram's ``/v1/speak`` REST endpoint."""

    name = "deepgram"
    _log = Logger()

    def __init__(
        self,
        settings: SynthesisSettings,
        *,
        http_client: HTTPClient,
        clock: IReactorTime,
        environ: Mapping[str, str],
        fetch: FetchConfig = FetchConfig(),
        idle_timeout_s: float = 30.0,
    ) -> None:
        """Raise ProviderUnavailableError when no key could ever be sent to the configured URL."""
        self._settings = settings
        self._http = http_client
        self._clock = clock
        self._fetch = fetch
        self._idle_timeout_s = idle_timeout_s
        self._keys = KeyPolicy(
            "deepgram TTS", official=frozenset({DEFAULT_URL}), env_key=environ.get("DEEPGRAM_API_KEY") or None,
            no_key="deepgram TTS: no API key (set tts.apiKey or DEEPGRAM_API_KEY)", where="api.deepgram.com",
            error_type=SynthesisError, check=lambda url: check_url(url, fetch.allowed_hosts),
            on_refused=lambda reason: self._log.info("deepgram TTS endpoint refused: {reason}", reason=reason))
        self._keys.check_settings(_normalized(settings.endpoint or DEFAULT_URL), settings.api_key)

    def _base_url(self, request: SynthesisRequest) -> str:
        return _normalized(request.endpoint or self._settings.endpoint or DEFAULT_URL)

    def _key_for(self, request: SynthesisRequest) -> str:
        """The key for ``request``'s URL (see :class:`KeyPolicy`)."""
        return self._keys.key_for(self._base_url(request), request.api_key or self._settings.api_key)

    def sample_rate_for(self, request: SynthesisRequest) -> int:
        """The rate asked of Deepgram (and reported to ``on_audio``)."""
        return request.sample_rate_hz if request.sample_rate_hz in SAMPLE_RATES_HZ else _FALLBACK_RATE_HZ

    def url_for(self, request: SynthesisRequest) -> str:
        """Return the full request URL (endpoint plus query) for ``request``."""
        parts = urlsplit(self._base_url(request))
        params = dict(parse_qsl(parts.query))
        params["model"] = request.speaker or request.model or self._settings.model or DEFAULT_MODEL
        params["encoding"] = "linear16"
        params["container"] = "none"
        params["sample_rate"] = str(self.sample_rate_for(request))
        if request.speed != 1.0:
            low, high = _SPEED_RANGE
            params["speed"] = f"{min(high, max(low, request.speed)):g}"
        for key, value in request.extra.items():
            if key not in _FIXED_PARAMS:
                params[key] = value
        return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(params), ""))

    def synthesize(self, request: SynthesisRequest, on_audio: Callable[[bytes, int], None],
                   on_words: Optional[Callable[[Sequence[WordTiming]], None]] = None) -> Deferred[None]:
        """See :meth:`ISpeechSynthesizer.synthesize`; Deepgram reports no word timings."""
        try:
            key = self._key_for(request)
        except SynthesisError as e:
            return fail(e)
        headers = {b"Content-Type": [b"application/json"], b"Authorization": [b"Token " + key.encode("utf-8")]}
        call = _SpeakCall(self._clock, self._idle_timeout_s, self.sample_rate_for(request), on_audio, self._log,
                          self._fetch.max_bytes)
        # No redirects: the key never follows a 3xx to a host nobody configured.
        call.start(self._http.post(self.url_for(request), data=json.dumps({"text": request.text}).encode("utf-8"),
                                   headers=headers, unbuffered=True, allow_redirects=False))
        return call.result


def _normalized(url: str) -> str:
    return url.rstrip("/")


class _SpeakCall(StreamedCall[None]):
    """One ``/v1/speak`` request: its streamed linear16 body goes to ``on_audio`` in whole samples."""

    provider = "deepgram TTS"
    error_type = SynthesisError

    def __init__(self, clock: IReactorTime, idle_timeout_s: float, rate_hz: int,
                 on_audio: Callable[[bytes, int], None], log: Logger, max_bytes: int) -> None:
        super().__init__(clock, idle_timeout_s, max_bytes, log)
        self._rate_hz = rate_hz
        self._on_audio = on_audio
        self._framer = PcmFramer()

    def check_response(self, response: IResponse) -> None:
        ctype = content_type(response)
        if ctype in _NOT_AUDIO_TYPES:
            raise SynthesisError(f"deepgram TTS: unexpected response type {ctype.decode('latin-1')}", retryable=False)

    def received(self, data: bytes) -> None:
        pcm = self._framer.feed(data)
        if pcm:
            self.deliver(self._on_audio, pcm, self._rate_hz)

    def finished(self) -> None:
        return None

    def status_error(self, code: int, body: bytes) -> SynthesisError:
        return http_error(code, body)


def http_error(code: int, body: bytes) -> SynthesisError:
    """The SynthesisError for an HTTP error status, with Deepgram's message when the body has one.

    Deepgram answers ``{"err_code", "err_msg", "request_id"}`` or ``{"category", "message", "details"}``.
    """
    message = server_message(body, ("err_msg", "message", "error", "reason"))
    return SynthesisError(f"deepgram TTS HTTP {code}: {message}".rstrip(": "), retryable=retryable_status(code))
