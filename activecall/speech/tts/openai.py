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

__all__ = ["OpenAISynthesizer", "DEFAULT_BASE_URL", "DEFAULT_MODEL", "DEFAULT_VOICE", "PCM_RATE_HZ"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini-tts"
DEFAULT_VOICE = "alloy"
PCM_RATE_HZ = 24000  # OpenAI's "pcm" format: s16le mono 24 kHz, no header
_PATH = "/audio/speech"
_COMPRESSED_TYPES = frozenset(
    {b"audio/mpeg", b"audio/mp3", b"audio/ogg", b"audio/opus", b"audio/aac", b"audio/flac", b"application/json"}
)


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
        configured = (environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self._configured_base_url = configured
        self._keys = KeyPolicy(
            "openai TTS", official=frozenset({configured + _PATH}), env_key=environ.get("OPENAI_API_KEY") or None,
            no_key="openai TTS: no API key (set tts.apiKey or OPENAI_API_KEY)",
            where="the configured base URL (OPENAI_BASE_URL)", needs_key=frozenset({DEFAULT_BASE_URL + _PATH}),
            error_type=SynthesisError, check=lambda url: check_url(url, fetch.allowed_hosts),
            on_refused=lambda reason: self._log.info("openai TTS endpoint refused: {reason}", reason=reason))
        self._keys.check_settings(self._default_base_url() + _PATH, settings.api_key)

    def _default_base_url(self) -> str:
        return (self._settings.endpoint or self._configured_base_url).rstrip("/")

    def _key_for(self, request: SynthesisRequest) -> str:
        """The key for ``request``'s URL (see :class:`KeyPolicy`); ``""`` for a server that needs none."""
        return self._keys.key_for(self.url_for(request), request.api_key or self._settings.api_key)

    def url_for(self, request: SynthesisRequest) -> str:
        """Return the ``/audio/speech`` URL ``request`` goes to."""
        base = request.endpoint.rstrip("/") if request.endpoint else self._default_base_url()
        return base + _PATH

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


class _SpeechCall(StreamedCall[None]):
    """One ``/audio/speech`` request: its streamed body goes to ``on_audio`` (PCM, or WAV after its header)."""

    provider = "openai TTS"
    error_type = SynthesisError

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout_s: float,
        response_format: str,
        on_audio: Callable[[bytes, int], None],
        log: Logger,
        max_bytes: int,
    ) -> None:
        super().__init__(clock, idle_timeout_s, max_bytes, log)
        self._on_audio = on_audio
        self._wav = _WavHeader() if response_format == "wav" else None
        self._framer = PcmFramer()

    def check_response(self, response: IResponse) -> None:
        ctype = content_type(response)
        if ctype in _COMPRESSED_TYPES:
            # a server that ignored response_format; we cannot decode compressed audio here
            raise SynthesisError(f"openai TTS: unsupported response type {ctype.decode('latin-1')}", retryable=False)

    def received(self, data: bytes) -> None:
        if self._wav is not None and not self._wav.done:
            data = self._wav.feed(data)  # may raise SynthesisError
        pcm = self._framer.feed(data)
        if pcm:
            rate = self._wav.sample_rate_hz if self._wav is not None else PCM_RATE_HZ
            assert rate is not None
            self.deliver(self._on_audio, pcm, rate)

    def finished(self) -> None:
        if self._wav is not None and not self._wav.done:
            raise SynthesisError("openai TTS: WAV response ended inside its header", retryable=True)

    def status_error(self, code: int, body: bytes) -> SynthesisError:
        return _http_error(code, body)


def _http_error(code: int, body: bytes) -> SynthesisError:
    """Build the SynthesisError for an HTTP error status, with the server's message if any.

    ``detail`` is where FastAPI-based self-hosted servers put it.
    """
    message = server_message(body, ("error", "detail"))
    return SynthesisError(f"openai TTS HTTP {code}: {message}".rstrip(": "), retryable=retryable_status(code))
