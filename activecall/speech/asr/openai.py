"""OpenAI-compatible ASR, provider name ``openai``: ``POST {baseUrl}/audio/transcriptions`` per VAD segment.

Also serves self-hosted OpenAI-compatible servers (speaches, faster-whisper-server, vLLM, ...).

* Base URL: ``request.endpoint``, else ``settings.endpoint``, else ``environ["OPENAI_BASE_URL"]``,
  else ``https://api.openai.com/v1``.
* Key: ``request.api_key``, else ``settings.api_key``, else ``environ["OPENAI_API_KEY"]``; sent as
  ``Authorization: Bearer``.  The environment's key goes only to the configured base URL
  (``OPENAI_BASE_URL``, else api.openai.com): a client ``endpoint`` elsewhere must bring its own
  ``apiKey``, else the request fails naming both.  A key is required for api.openai.com.
* Body: ``multipart/form-data`` with ``file`` (a 16 kHz mono s16le WAV), ``model`` (``request.model``,
  else ``settings.model``, else ``whisper-1``), ``response_format=json``, ``language`` (ISO-639-1,
  from ``request.language``) and ``prompt``/``temperature`` from ``extra``.  The answer is
  ``{"text": ...}``.
* Limits: at most ``max_in_flight`` requests per recognizer (more fail at once with
  :class:`RecognizerBusyError`), ``timeout_s`` on the injected clock for the whole request, a
  64 KiB response.  Redirects are not followed.
* Errors: non-2xx -> :class:`RecognitionError` with the status and the server's ``error.message``,
  retryable for 408/429/5xx; connection failures and timeouts are retryable.
"""

from __future__ import annotations

import hashlib
import io
import json
import wave
from typing import Any, Mapping, Optional

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from activecall.config import FetchConfig
from activecall.fetch import check_url
from activecall.speech.httpcall import StreamedCall, retryable_status, server_message
from activecall.speech.asr.segments import SegmentStream
from activecall.speech.interfaces import (
    IRecognitionListener,
    ISegmentRecognizer,
    RecognitionError,
    RecognitionRequest,
    RecognizerBusyError,
    SegmentTranscript,
)
from activecall.speech.keys import KeyPolicy
from activecall.speech.registry import RecognizerSettings

__all__ = ["OpenAIRecognizer", "DEFAULT_BASE_URL", "DEFAULT_MODEL", "wav_bytes", "multipart_body"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "whisper-1"
SAMPLE_RATE_HZ = 16000
MAX_RESPONSE_BYTES = 64 * 1024
_MAX_MESSAGE_CHARS = 300
_PATH = "/audio/transcriptions"
_EXTRA_FIELDS = ("prompt", "temperature")


def wav_bytes(pcm: bytes, sample_rate_hz: int = SAMPLE_RATE_HZ) -> bytes:
    """A RIFF/WAVE file of mono s16le ``pcm`` (an odd trailing byte is dropped)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate_hz)
        w.writeframes(pcm[: len(pcm) & ~1])
    return out.getvalue()


def multipart_body(fields: Mapping[str, str], file_name: str, file_type: str, file_data: bytes) -> tuple[bytes, bytes]:
    """Encode ``fields`` and one file as ``multipart/form-data``; return ``(content_type, body)``.

    The boundary is derived from the content (no randomness needed) and checked not to occur in it.
    """
    digest = hashlib.sha256(file_data).hexdigest()[:32]
    boundary = f"activecall-{digest}"
    parts = [(name, value.encode("utf-8")) for name, value in fields.items()]
    n = 0
    while any(boundary.encode() in v for _, v in parts) or boundary.encode() in file_data:
        n += 1
        boundary = f"activecall-{digest}-{n}"
    b = boundary.encode("ascii")
    body = bytearray()
    for name, value in parts:
        body += b"--" + b + b"\r\n"
        body += b'Content-Disposition: form-data; name="' + _quote(name) + b'"\r\n\r\n'
        body += value + b"\r\n"
    body += b"--" + b + b"\r\n"
    body += b'Content-Disposition: form-data; name="file"; filename="' + _quote(file_name) + b'"\r\n'
    body += b"Content-Type: " + file_type.encode("ascii") + b"\r\n\r\n"
    body += file_data + b"\r\n--" + b + b"--\r\n"
    return b"multipart/form-data; boundary=" + b, bytes(body)


def _quote(name: str) -> bytes:
    return name.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ").encode("utf-8")


def _language(language: Optional[str]) -> Optional[str]:
    """OpenAI wants ISO-639-1 (``en``), callers often give a locale (``en-US``, ``zh_CN``)."""
    if not language:
        return None
    code = language.replace("_", "-").split("-")[0].strip().lower()
    return code if code.isalpha() and 2 <= len(code) <= 3 else None


@implementer(ISegmentRecognizer)
class OpenAIRecognizer:
    """Transcribes VAD segments with an OpenAI-compatible ``/audio/transcriptions`` endpoint."""

    name = "openai"
    streaming = False
    _log = Logger()

    def __init__(
        self,
        settings: RecognizerSettings,
        *,
        http_client: HTTPClient,
        clock: IReactorTime,
        environ: Mapping[str, str],
        fetch: FetchConfig = FetchConfig(),
        timeout_s: float = 15.0,
        max_in_flight: int = 8,
    ) -> None:
        """Raise ProviderUnavailableError when api.openai.com would be used without a key.

        ``fetch.allowed_hosts`` bounds requests to client-chosen endpoints.
        """
        self._settings = settings
        self._http = http_client
        self._clock = clock
        self._fetch = fetch
        self._timeout_s = timeout_s
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        configured = (environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self._configured_base_url = configured
        self._keys = KeyPolicy(
            "openai ASR", official=frozenset({configured + _PATH}), env_key=environ.get("OPENAI_API_KEY") or None,
            no_key="openai ASR: no API key (set asr.apiKey or OPENAI_API_KEY)",
            where="the configured base URL (OPENAI_BASE_URL)", needs_key=frozenset({DEFAULT_BASE_URL + _PATH}),
            error_type=RecognitionError, check=lambda url: check_url(url, fetch.allowed_hosts),
            on_refused=lambda reason: self._log.info("openai ASR endpoint refused: {reason}", reason=reason))
        self._keys.check_settings(self._default_base_url() + _PATH, settings.api_key)

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered (for tests and metrics)."""
        return self._in_flight

    def _default_base_url(self) -> str:
        return (self._settings.endpoint or self._configured_base_url).rstrip("/")

    def url_for(self, request: RecognitionRequest) -> str:
        """Return the ``/audio/transcriptions`` URL ``request`` goes to."""
        base = request.endpoint.rstrip("/") if request.endpoint else self._default_base_url()
        return base + _PATH

    def _key_for(self, request: RecognitionRequest) -> str:
        """The key for ``request``'s URL (see :class:`KeyPolicy`); ``""`` for a server that needs none."""
        return self._keys.key_for(self.url_for(request), request.api_key or self._settings.api_key)

    def fields_for(self, request: RecognitionRequest) -> dict[str, str]:
        """Return the form fields (all but ``file``) for ``request``."""
        fields = {"model": request.model or self._settings.model or DEFAULT_MODEL, "response_format": "json"}
        language = _language(request.language)
        if language:
            fields["language"] = language
        for name in _EXTRA_FIELDS:
            value = request.extra.get(name)
            if value:
                fields[name] = value
        return fields

    def open(self, request: RecognitionRequest, listener: IRecognitionListener) -> SegmentStream:
        """See :meth:`IRecognizer.open`; raises RecognitionError when the request has no usable key/endpoint."""
        self._key_for(request)
        return SegmentStream(self, request, listener, partials=request.extra.get("partials") == "true")

    def transcribe(self, pcm: bytes, request: RecognitionRequest, partial: bool) -> Deferred[SegmentTranscript]:
        """See :meth:`ISegmentRecognizer.transcribe`."""
        if self._in_flight >= self._max_in_flight:
            return fail(RecognizerBusyError(f"openai ASR: {self._max_in_flight} requests in flight"))
        try:
            key = self._key_for(request)
        except RecognitionError as e:
            return fail(e)
        content_type, body = multipart_body(self.fields_for(request), "audio.wav", "audio/wav",
                                            wav_bytes(pcm, request.sample_rate_hz))
        headers = {b"Content-Type": [content_type], b"Accept": [b"application/json"]}
        if key:
            headers[b"Authorization"] = [b"Bearer " + key.encode("utf-8")]
        self._in_flight += 1
        call = _TranscriptionCall(self._clock, self._timeout_s, self._log)
        call.result.addBoth(self._released)
        # No redirects: a 3xx is an error, and the audio never goes to a host nobody configured.
        call.start(self._http.post(self.url_for(request), data=body, headers=headers, unbuffered=True,
                                   allow_redirects=False))
        return call.result

    def _released(self, result: Any) -> Any:
        self._in_flight -= 1
        return result


class _TranscriptionCall(StreamedCall[SegmentTranscript]):
    """One ``/audio/transcriptions`` request: the (64 KiB at most) JSON answer, whole, becomes the transcript.

    ``timeout_s`` bounds the whole request.
    """

    provider = "openai ASR"
    error_type = RecognitionError
    idle_timeout = False
    truncate_error_body = False

    def __init__(self, clock: IReactorTime, timeout_s: float, log: Logger) -> None:
        super().__init__(clock, timeout_s, MAX_RESPONSE_BYTES, log)
        self._started = clock.seconds()
        self._chunks: list[bytes] = []

    def too_large_error(self, limit: int) -> RecognitionError:
        return RecognitionError(f"openai ASR: response (HTTP {self.code}) larger than {limit} bytes", retryable=False)

    def received(self, data: bytes) -> None:
        self._chunks.append(data)

    def status_error(self, code: int, body: bytes) -> RecognitionError:
        return _http_error(code, body)

    def finished(self) -> SegmentTranscript:
        text = _parse_text(b"".join(self._chunks))
        return SegmentTranscript(text, None, max(0.0, self._clock.seconds() - self._started))


def _parse_text(body: bytes) -> str:
    """The ``text`` of a ``response_format=json`` answer, validated."""
    try:
        parsed = json.loads(body)
    except ValueError:
        raise RecognitionError("openai ASR: response is not JSON", retryable=False) from None
    text = parsed.get("text") if isinstance(parsed, dict) else None
    if not isinstance(text, str):
        raise RecognitionError("openai ASR: response has no text string", retryable=False)
    return text.strip()


def _http_error(code: int, body: bytes) -> RecognitionError:
    """Build the RecognitionError for an HTTP error status, with the server's message if any.

    ``detail`` is where FastAPI-based self-hosted servers put it.
    """
    message = server_message(body, ("error", "detail"), _MAX_MESSAGE_CHARS)
    return RecognitionError(f"openai ASR HTTP {code}: {message}".rstrip(": "), retryable=retryable_status(code))
