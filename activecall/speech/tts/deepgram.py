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
from typing import Any, Callable, Mapping, Optional, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from zope.interface import implementer

from activecall.config import FetchConfig
from activecall.fetch import BodyStream, FetchRefusedError, check_url
from activecall.speech.interfaces import (
    ISpeechSynthesizer,
    ProviderUnavailableError,
    SynthesisError,
    SynthesisRequest,
    WordTiming,
)
from activecall.speech.registry import SynthesisSettings

__all__ = ["DeepgramSynthesizer", "DEFAULT_URL", "DEFAULT_MODEL", "SAMPLE_RATES_HZ"]

DEFAULT_URL = "https://api.deepgram.com/v1/speak"
DEFAULT_MODEL = "aura-2-thalia-en"
#: The rates Deepgram offers for linear16.
SAMPLE_RATES_HZ = frozenset({8000, 16000, 24000, 32000, 48000})
_FALLBACK_RATE_HZ = 16000
_SPEED_RANGE = (0.7, 1.5)
_FIXED_PARAMS = frozenset({"encoding", "container"})
_MAX_ERROR_BODY = 64 * 1024
_OWN_KEY_NEEDED = ("deepgram TTS: endpoint is not api.deepgram.com; a request with its own endpoint "
                   "must give its own apiKey")
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
        self._env_api_key = environ.get("DEEPGRAM_API_KEY") or None
        default = _normalized(settings.endpoint or DEFAULT_URL)
        if default == DEFAULT_URL and not (settings.api_key or self._env_api_key):
            raise ProviderUnavailableError("deepgram TTS: no API key (set tts.apiKey or DEEPGRAM_API_KEY)")
        if default != DEFAULT_URL and not settings.api_key:
            raise ProviderUnavailableError(_OWN_KEY_NEEDED)

    def _base_url(self, request: SynthesisRequest) -> str:
        return _normalized(request.endpoint or self._settings.endpoint or DEFAULT_URL)

    def _key_for(self, request: SynthesisRequest) -> str:
        """The key for ``request``'s URL: its own, else (api.deepgram.com only) the environment's."""
        own = request.api_key or self._settings.api_key
        base = self._base_url(request)
        if base == DEFAULT_URL:
            key = own or self._env_api_key
            if not key:
                raise SynthesisError("deepgram TTS: no API key", retryable=False)
            return key
        try:
            check_url(base, self._fetch.allowed_hosts)
        except FetchRefusedError as e:
            self._log.info("deepgram TTS endpoint refused: {reason}", reason=str(e))
            raise SynthesisError("deepgram TTS: endpoint not allowed (http/https and fetch.allowed_hosts only)",
                                 retryable=False) from None
        if not own:
            raise SynthesisError(_OWN_KEY_NEEDED, retryable=False)
        return own

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


class _SpeakCall:
    """One ``/v1/speak`` request: waiting for the response -> streaming the body -> finished.

    Cancelling ``result`` in either of the first two states aborts the HTTP request; every wait is
    bounded by ``idle_timeout_s`` without data on the injected clock.
    """

    def __init__(self, clock: IReactorTime, idle_timeout_s: float, rate_hz: int,
                 on_audio: Callable[[bytes, int], None], log: Logger, max_bytes: int) -> None:
        self._clock = clock
        self._idle_timeout_s = idle_timeout_s
        self._rate_hz = rate_hz
        self._on_audio = on_audio
        self._log = log
        self._max_bytes = max_bytes
        self._received = 0
        self._carry = b""
        self._pending: Deferred[Any] | None = None
        self._body: BodyStream | None = None
        self._timer: IDelayedCall | None = None
        self.result: Deferred[None] = Deferred(lambda _: self._stop())

    def start(self, request: Deferred[IResponse]) -> None:
        self._pending = request
        self._timer = self._clock.callLater(self._idle_timeout_s, self._timed_out)
        request.addCallbacks(self._got_response, self._request_failed)

    def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._pending = self._pending, None
        if pending is not None and not pending.called:
            pending.cancel()
        body, self._body = self._body, None
        if body is not None:
            body.stop()

    def _fail(self, error: SynthesisError) -> None:
        self._stop()
        if not self.result.called:
            self.result.errback(Failure(error))

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(SynthesisError(f"deepgram TTS: no data for {self._idle_timeout_s:g} s", retryable=True))

    def _request_failed(self, failure: Failure) -> None:
        self._pending = None
        if self.result.called or failure.check(CancelledError):
            return
        self._fail(SynthesisError(f"deepgram TTS request failed: {failure.getErrorMessage()}", retryable=True))

    def _got_response(self, response: IResponse) -> None:
        self._pending = None
        if self.result.called:
            return
        if not 200 <= response.code < 300:
            self._read_error(response)
            return
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].split(b";")[0].strip().lower()
        if ctype in _NOT_AUDIO_TYPES:
            self._fail(SynthesisError(f"deepgram TTS: unexpected response type {ctype.decode('latin-1')}",
                                      retryable=False))
            return
        finished: Deferred[None] = Deferred()
        self._body = BodyStream(self._data, finished)
        finished.addCallbacks(self._body_done, self._body_failed)
        response.deliverBody(self._body)

    def _data(self, data: bytes) -> None:
        if self.result.called:
            return
        self._received += len(data)
        if self._received > self._max_bytes:
            raise SynthesisError(f"deepgram TTS: response larger than {self._max_bytes} bytes", retryable=False)
        assert self._timer is not None
        self._timer.reset(self._idle_timeout_s)
        data = self._carry + data
        cut = len(data) & ~1  # whole s16le samples only; an odd byte waits for the next piece
        self._carry = data[cut:]
        if cut:
            try:
                self._on_audio(data[:cut], self._rate_hz)
            except Exception as e:
                self._log.failure("deepgram TTS on_audio callback failed")
                raise SynthesisError(f"audio consumer failed: {e}", retryable=False) from e

    def _body_done(self, _: None) -> None:
        self._body = None
        if not self.result.called:
            self._stop()
            self.result.callback(None)

    def _body_failed(self, failure: Failure) -> None:
        self._body = None
        if self.result.called:
            return
        if isinstance(failure.value, SynthesisError):
            self._fail(failure.value)
            return
        self._fail(SynthesisError(f"deepgram TTS response interrupted: {failure.getErrorMessage()}", retryable=True))

    def _read_error(self, response: IResponse) -> None:
        code = response.code
        chunks: list[bytes] = []
        size = [0]

        def collect(data: bytes) -> None:
            if size[0] < _MAX_ERROR_BODY:
                chunks.append(data[: _MAX_ERROR_BODY - size[0]])
                size[0] += len(data)

        d = treq.collect(response, collect)
        self._pending = d
        d.addBoth(lambda _: self._fail(http_error(code, b"".join(chunks))))


def http_error(code: int, body: bytes) -> SynthesisError:
    """The SynthesisError for an HTTP error status, with Deepgram's message when the body has one.

    Deepgram answers ``{"err_code", "err_msg", "request_id"}`` or ``{"category", "message", "details"}``.
    """
    message = ""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        for field in ("err_msg", "message", "error", "reason"):
            value = parsed.get(field)
            if isinstance(value, dict):
                value = value.get("message")
            if isinstance(value, str) and value:
                message = value
                break
    if not message:
        message = body.decode("utf-8", "replace").strip()
    message = " ".join(message.split())[:200]
    retryable = code in (408, 429) or code >= 500
    return SynthesisError(f"deepgram TTS HTTP {code}: {message}".rstrip(": "), retryable=retryable)
