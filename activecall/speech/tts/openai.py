"""OpenAI-compatible TTS, provider name ``openai``: ``POST {baseUrl}/audio/speech``.

Also serves self-hosted OpenAI-compatible servers (speaches, Kokoro-FastAPI, ...).

* Base URL: ``request.endpoint``, else ``settings.endpoint``, else ``environ["OPENAI_BASE_URL"]``,
  else ``https://api.openai.com/v1``.
* Key: ``request.api_key``, else ``settings.api_key``, else ``environ["OPENAI_API_KEY"]``; sent as
  ``Authorization: Bearer``.  The environment's key goes only to the configured base URL
  (``OPENAI_BASE_URL``, else api.openai.com): a client ``endpoint`` elsewhere must bring its own
  ``apiKey`` (any value for a server that needs none), else the request fails naming both.
  A key is required for the default (api.openai.com) base URL.
* Body: ``{"model", "input", "voice", "response_format", "speed"}`` (plus ``instructions`` from
  ``extra``).  ``response_format`` is ``pcm`` (raw s16le mono 24 kHz) unless ``extra`` asks for
  ``wav``, whose header is parsed for the rate.
* The response body is streamed: each piece goes to ``on_audio`` as it arrives (whole samples
  only; an odd trailing byte waits for the next piece).
* Errors: non-2xx -> :class:`SynthesisError` with the status and the server's ``error.message``,
  retryable for 408/429/5xx; connection failures and idle timeouts are retryable.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Callable, Mapping, Optional, Sequence

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

__all__ = ["OpenAISynthesizer", "DEFAULT_BASE_URL", "DEFAULT_MODEL", "DEFAULT_VOICE", "PCM_RATE_HZ"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini-tts"
DEFAULT_VOICE = "alloy"
PCM_RATE_HZ = 24000  # OpenAI's "pcm" format: s16le mono 24 kHz, no header
_MAX_ERROR_BODY = 64 * 1024
_OWN_KEY_NEEDED = ("openai TTS: endpoint is not the configured base URL (OPENAI_BASE_URL); "
                   "a request with its own endpoint must give its own apiKey")
_COMPRESSED_TYPES = frozenset(
    {b"audio/mpeg", b"audio/mp3", b"audio/ogg", b"audio/opus", b"audio/aac", b"audio/flac", b"application/json"}
)


class _PcmFramer:
    """Hands out even-length pieces of an s16le byte stream, carrying an odd byte."""

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data
        cut = len(data) & ~1
        self._carry = data[cut:]
        return data[:cut]


class _WavHeader:
    """Incremental RIFF/WAVE header parser; after the ``data`` chunk header, bytes are PCM.

    Streaming servers write 0 or 0xFFFFFFFF as the data size, so the size is ignored and
    everything up to the end of the body is audio.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._riff_seen = False
        self.sample_rate_hz: int | None = None
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Consume header bytes; return any audio bytes that follow the header."""
        self._buf += data
        if not self._riff_seen:
            if len(self._buf) < 12:
                return b""
            if self._buf[:4] != b"RIFF" or self._buf[8:12] != b"WAVE":
                raise SynthesisError("openai TTS: response is not a WAV file", retryable=False)
            self._riff_seen = True
            self._buf = self._buf[12:]
        while len(self._buf) >= 8:
            chunk_id, size = self._buf[:4], struct.unpack_from("<I", self._buf, 4)[0]
            if chunk_id == b"data":
                if self.sample_rate_hz is None:
                    raise SynthesisError("openai TTS: WAV data before fmt chunk", retryable=False)
                self.done = True
                audio, self._buf = self._buf[8:], b""
                return audio
            padded = size + (size & 1)
            if len(self._buf) < 8 + padded:
                return b""
            if chunk_id == b"fmt ":
                self._parse_fmt(self._buf[8 : 8 + size])
            self._buf = self._buf[8 + padded :]
        return b""

    def _parse_fmt(self, fmt: bytes) -> None:
        if len(fmt) < 16:
            raise SynthesisError("openai TTS: short WAV fmt chunk", retryable=False)
        audio_format, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
        if audio_format not in (1, 0xFFFE) or channels != 1 or bits != 16:
            raise SynthesisError(
                f"openai TTS: unsupported WAV format {audio_format}/{channels}ch/{bits}bit (need 16-bit mono PCM)",
                retryable=False,
            )
        self.sample_rate_hz = rate


@implementer(ISpeechSynthesizer)
class OpenAISynthesizer:
    """Streams speech from an OpenAI-compatible ``/audio/speech`` endpoint."""

    name = "openai"
    _log = Logger()

    def __init__(
        self,
        settings: SynthesisSettings,
        *,
        http_client: HTTPClient,
        clock: IReactorTime,
        environ: Mapping[str, str],
        idle_timeout_s: float = 30.0,
        fetch: FetchConfig = FetchConfig(),
    ) -> None:
        """Raise ProviderUnavailableError when api.openai.com would be used without a key.

        ``fetch`` bounds requests to client-chosen endpoints (``allowed_hosts``) and every
        response (``max_bytes``).
        """
        self._settings = settings
        self._http = http_client
        self._clock = clock
        self._idle_timeout_s = idle_timeout_s
        self._fetch = fetch
        self._configured_base_url = (environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self._env_api_key = environ.get("OPENAI_API_KEY") or None
        if self._default_base_url() == DEFAULT_BASE_URL and not (settings.api_key or self._env_api_key):
            raise ProviderUnavailableError("openai TTS: no API key (set tts.apiKey or OPENAI_API_KEY)")
        if self._default_base_url() != self._configured_base_url and not settings.api_key:
            raise ProviderUnavailableError(_OWN_KEY_NEEDED)

    def _default_base_url(self) -> str:
        return (self._settings.endpoint or self._configured_base_url).rstrip("/")

    def _key_for(self, request: SynthesisRequest) -> str | None:
        """The key for ``request``'s URL: its own, else (configured base URL only) the environment's.

        A client-chosen URL must also pass the ``[fetch]`` scheme and host rules.
        """
        own = request.api_key or self._settings.api_key
        if self.url_for(request) == self._configured_base_url + "/audio/speech":
            return own or self._env_api_key
        try:
            check_url(self.url_for(request), self._fetch.allowed_hosts)
        except FetchRefusedError as e:
            self._log.info("openai TTS endpoint refused: {reason}", reason=str(e))
            raise SynthesisError("openai TTS: endpoint not allowed (http/https and fetch.allowed_hosts only)",
                                 retryable=False) from None
        if not own:
            raise SynthesisError(_OWN_KEY_NEEDED, retryable=False)
        return own

    def url_for(self, request: SynthesisRequest) -> str:
        """Return the ``/audio/speech`` URL ``request`` goes to."""
        base = request.endpoint.rstrip("/") if request.endpoint else self._default_base_url()
        return base + "/audio/speech"

    def body_for(self, request: SynthesisRequest) -> dict[str, Any]:
        """Return the JSON body for ``request``."""
        fmt = "wav" if request.extra.get("response_format", "").lower() == "wav" else "pcm"
        body: dict[str, Any] = {
            "model": request.model or self._settings.model or DEFAULT_MODEL,
            "input": request.text,
            "voice": request.speaker or DEFAULT_VOICE,
            "response_format": fmt,
            "speed": request.speed,
        }
        if request.extra.get("instructions"):
            body["instructions"] = request.extra["instructions"]
        return body

    def synthesize(self, request: SynthesisRequest, on_audio: Callable[[bytes, int], None],
                   on_words: Optional[Callable[[Sequence[WordTiming]], None]] = None) -> Deferred[None]:
        """See :meth:`ISpeechSynthesizer.synthesize`; audio comes at 24 kHz for ``pcm``."""
        headers = {b"Content-Type": [b"application/json"]}
        try:
            key = self._key_for(request)
        except SynthesisError as e:
            return fail(e)
        if key:
            headers[b"Authorization"] = [b"Bearer " + key.encode("utf-8")]
        body = self.body_for(request)
        call = _SpeechCall(self._clock, self._idle_timeout_s, body["response_format"], on_audio, self._log,
                           self._fetch.max_bytes)
        # No redirects: a 3xx is an error, and the request never goes to a host nobody configured.
        call.start(self._http.post(self.url_for(request), data=json.dumps(body).encode("utf-8"), headers=headers,
                                   unbuffered=True, allow_redirects=False))
        return call.result


class _SpeechCall:
    """One ``/audio/speech`` request: headers -> streamed body -> done, with cancel and idle timeout.

    States: waiting for the response -> streaming the body -> finished (result fired).
    Cancelling ``result`` in either of the first two states aborts the HTTP request.
    """

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout_s: float,
        response_format: str,
        on_audio: Callable[[bytes, int], None],
        log: Logger,
        max_bytes: int,
    ) -> None:
        self._clock = clock
        self._max_bytes = max_bytes
        self._received = 0
        self._idle_timeout_s = idle_timeout_s
        self._on_audio = on_audio
        self._log = log
        self._wav = _WavHeader() if response_format == "wav" else None
        self._framer = _PcmFramer()
        self._pending: Deferred[Any] | None = None
        self._body: BodyStream | None = None
        self._timer: IDelayedCall | None = None
        self.result: Deferred[None] = Deferred(self._cancel)

    def start(self, request: Deferred[IResponse]) -> None:
        self._pending = request
        self._arm_timer()
        request.addCallbacks(self._got_response, self._request_failed)

    # -- timers and teardown

    def _arm_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout_s)
        else:
            self._timer = self._clock.callLater(self._idle_timeout_s, self._timed_out)

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

    def _cancel(self, _: Deferred[None]) -> None:
        self._stop()  # result errbacks with CancelledError on its own

    def _fail(self, error: SynthesisError) -> None:
        self._stop()
        if not self.result.called:
            self.result.errback(Failure(error))

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(SynthesisError(f"openai TTS: no data for {self._idle_timeout_s:g} s", retryable=True))

    # -- response

    def _request_failed(self, failure: Failure) -> None:
        self._pending = None
        if self.result.called or failure.check(CancelledError):
            return
        self._fail(SynthesisError(f"openai TTS request failed: {failure.getErrorMessage()}", retryable=True))

    def _got_response(self, response: IResponse) -> None:
        self._pending = None
        if self.result.called:
            return
        if not 200 <= response.code < 300:
            self._read_error(response)
            return
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].split(b";")[0].strip().lower()
        if ctype in _COMPRESSED_TYPES:
            # a server that ignored response_format; we cannot decode compressed audio here
            self._fail(SynthesisError(f"openai TTS: unsupported response type {ctype.decode('latin-1')}", retryable=False))
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
            raise SynthesisError(f"openai TTS: response larger than {self._max_bytes} bytes", retryable=False)
        self._arm_timer()
        if self._wav is not None and not self._wav.done:
            data = self._wav.feed(data)  # may raise SynthesisError -> _body_failed
        pcm = self._framer.feed(data)
        if pcm:
            rate = self._wav.sample_rate_hz if self._wav is not None else PCM_RATE_HZ
            assert rate is not None
            try:
                self._on_audio(pcm, rate)
            except Exception as e:
                self._log.failure("openai TTS on_audio callback failed")
                raise SynthesisError(f"audio consumer failed: {e}", retryable=False) from e

    def _body_done(self, _: None) -> None:
        self._body = None
        if self.result.called:
            return
        if self._wav is not None and not self._wav.done:
            self._fail(SynthesisError("openai TTS: WAV response ended inside its header", retryable=True))
            return
        self._stop()
        self.result.callback(None)

    def _body_failed(self, failure: Failure) -> None:
        self._body = None
        if self.result.called:
            return
        error = failure.value
        if isinstance(error, SynthesisError):
            self._fail(error)
            return
        self._log.debug("openai TTS body failed: {reason}", reason=failure.getErrorMessage())
        self._fail(SynthesisError(f"openai TTS response interrupted: {failure.getErrorMessage()}", retryable=True))

    def _read_error(self, response: IResponse) -> None:
        code = response.code
        chunks: list[bytes] = []
        size = [0]

        def collect(data: bytes) -> None:
            if size[0] < _MAX_ERROR_BODY:
                chunks.append(data)
                size[0] += len(data)

        def report(_: object) -> None:
            self._fail(_http_error(code, b"".join(chunks)))

        d = treq.collect(response, collect)
        self._pending = d
        d.addBoth(report)


def _http_error(code: int, body: bytes) -> SynthesisError:
    """Build the SynthesisError for an HTTP error status, with the server's message if any."""
    message = ""
    try:
        parsed = json.loads(body)
        err = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or "")
        elif isinstance(err, str):
            message = err
        elif isinstance(parsed, dict) and parsed.get("detail"):
            message = str(parsed["detail"])  # FastAPI-based self-hosted servers
    except ValueError:
        pass
    if not message:
        message = body.decode("utf-8", "replace").strip()[:200]
    retryable = code in (408, 429) or code >= 500
    return SynthesisError(f"openai TTS HTTP {code}: {message}".rstrip(": "), retryable=retryable)
