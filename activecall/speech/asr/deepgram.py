"""Deepgram live streaming ASR, provider name ``deepgram``: a WebSocket to ``/v1/listen`` per call.

* URL: ``request.endpoint``, else ``settings.endpoint``, else ``wss://api.deepgram.com/v1/listen``;
  the query carries ``model`` (``asr.modelType``, default ``nova-3``), ``language`` (omitted when
  unset or ``auto``), ``encoding=linear16``, ``sample_rate=16000``, ``channels=1``,
  ``interim_results=true``, ``endpointing=300``, ``smart_format=true``; every ``extra`` entry is a
  query parameter too, replacing a default of the same name (protocol.md §4.5).
* Key: ``request.api_key``, else ``settings.api_key``, else ``environ["DEEPGRAM_API_KEY"]``, sent as
  ``Authorization: Token <key>``.  The environment's key goes only to the default endpoint: an
  endpoint elsewhere must bring its own key and pass the ``[fetch]`` host rules.
* Wire: raw PCM in Binary messages; ``{"type":"KeepAlive"}`` when no audio went out for a while
  (Deepgram drops a connection after about 10 s without data); ``{"type":"CloseStream"}`` at the end,
  after which the server sends its last ``Results`` and a ``Metadata`` and closes.
* Results: ``channel.alternatives[0]`` ``transcript``/``confidence``, ``is_final``, ``start`` and
  ``duration`` in seconds of the audio sent.  Interim results are partials of the sentence in
  progress; each ``is_final`` result with text is one final and the next result starts a new
  index.  ``Metadata``, ``SpeechStarted`` and ``UtteranceEnd`` carry nothing for the listener.
* Errors: a refused upgrade (401 bad key, 400 bad parameter) is a non-retryable failure; Deepgram
  reports stream errors as close frames (1008 ``DATA-0000`` undecodable audio: non-retryable; 1011
  ``NET-0000``/``NET-0001``: retryable); a lost connection is retryable.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional
from urllib.parse import urlencode

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from activecall.config import FetchConfig
from activecall.speech.asr.wsstream import WsRecognitionStream, check_ws_url, parse_json_object
from activecall.speech.interfaces import (
    IRecognitionListener,
    IRecognizer,
    RecognitionError,
    RecognitionRequest,
    Transcript,
)
from activecall.speech.keys import KeyPolicy
from activecall.speech.registry import RecognizerSettings

__all__ = ["DeepgramRecognizer", "DeepgramStream", "DEFAULT_ENDPOINT", "DEFAULT_MODEL", "KEEPALIVE_S"]

DEFAULT_ENDPOINT = "wss://api.deepgram.com/v1/listen"
DEFAULT_MODEL = "nova-3"
#: Seconds without audio after which a KeepAlive goes out (Deepgram gives up after about 10 s).
KEEPALIVE_S = 5.0
_MAX_TIME_S = 7 * 24 * 3600.0  # result times beyond a week of audio are nonsense


def _seconds(value: Any) -> Optional[float]:
    """A finite, non-negative, bounded number of seconds, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= _MAX_TIME_S else None


def _clean_key(key: str) -> str:
    """Refuse keys that would break (or inject into) the upgrade request's headers."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in key):
        raise RecognitionError("deepgram ASR: apiKey contains whitespace or control characters")
    return key


@implementer(IRecognizer)
class DeepgramRecognizer:
    """Opens a :class:`DeepgramStream` per call (see the module docstring)."""

    name = "deepgram"
    streaming = True
    _log = Logger()

    def __init__(self, settings: RecognizerSettings, *, reactor: Any, clock: IReactorTime,
                 environ: Mapping[str, str], fetch: FetchConfig = FetchConfig(), connect_timeout_s: float = 5.0,
                 close_timeout_s: float = 3.0) -> None:
        """Raise ProviderUnavailableError when the default endpoint would be used without any key,
        or the configured endpoint is elsewhere without its own key."""
        self._settings = settings
        self._reactor = reactor
        self._clock = clock
        self._fetch = fetch
        self._connect_timeout_s = connect_timeout_s
        self._close_timeout_s = close_timeout_s
        self._keys = KeyPolicy(
            "deepgram ASR", official=frozenset({DEFAULT_ENDPOINT}), env_key=environ.get("DEEPGRAM_API_KEY") or None,
            no_key="deepgram ASR: no API key (set asr.apiKey or DEEPGRAM_API_KEY)", where="the default one",
            schemes="ws/wss",
            error_type=RecognitionError, check=lambda url: check_ws_url(url, fetch.allowed_hosts),
            on_refused=lambda reason: self._log.info("deepgram ASR endpoint refused: {reason}", reason=reason))
        self._keys.check_settings(settings.endpoint or DEFAULT_ENDPOINT, settings.api_key)

    def endpoint_for(self, request: RecognitionRequest) -> str:
        """The listen URL ``request`` goes to, without the query."""
        return request.endpoint or self._settings.endpoint or DEFAULT_ENDPOINT

    def query_for(self, request: RecognitionRequest) -> dict[str, str]:
        """The query parameters: the defaults, then every ``extra`` entry over them."""
        query = {"model": request.model or self._settings.model or DEFAULT_MODEL}
        if request.language and request.language.lower() != "auto":
            query["language"] = request.language
        query.update(encoding="linear16", sample_rate="16000", channels="1", interim_results="true",
                     endpointing="300", smart_format="true")
        query.update({str(k): str(v) for k, v in request.extra.items()})
        return query

    def connection_for(self, request: RecognitionRequest) -> tuple[str, dict[str, str]]:
        """The full URL and the headers for ``request``; RecognitionError when it cannot be sent."""
        endpoint = self.endpoint_for(request)
        key = self._keys.key_for(endpoint, request.api_key or self._settings.api_key)
        separator = "&" if "?" in endpoint else "?"
        url = endpoint + separator + urlencode(list(self.query_for(request).items()))
        return url, {"Authorization": "Token " + _clean_key(key)}

    def open(self, request: RecognitionRequest, listener: IRecognitionListener) -> "DeepgramStream":
        """See :meth:`IRecognizer.open`."""
        url, headers = self.connection_for(request)
        return DeepgramStream(reactor=self._reactor, clock=self._clock, url=url, headers=headers, listener=listener,
                              connect_timeout_s=self._connect_timeout_s, close_timeout_s=self._close_timeout_s)


class DeepgramStream(WsRecognitionStream):
    """One call's Deepgram WebSocket: audio out, ``Results`` in, ``CloseStream`` at the end.

    States (on top of :class:`WsRecognitionStream`'s): open -> ready at once (audio flows) ->
    CloseStream sent -> the server's close.  ``_index`` is the sentence in progress.
    """

    provider = "deepgram ASR"

    def __init__(self, **kwargs: Any) -> None:
        self._index = 0
        self._last_sent_s = 0.0
        self._keepalive: Optional[IDelayedCall] = None
        super().__init__(**kwargs)

    # -- hooks

    def opened(self) -> None:
        self._last_sent_s = self._clock.seconds()
        self._keepalive = self._clock.callLater(KEEPALIVE_S, self._keepalive_due)
        self.ready()

    def encode_audio(self, pcm: bytes) -> None:
        super().encode_audio(pcm)
        self._last_sent_s = self._clock.seconds()

    def finish_audio(self) -> None:
        assert self.conn is not None
        self.conn.send_text(json.dumps({"type": "CloseStream"}))

    def text_received(self, text: str) -> None:
        message = parse_json_object(text, self.provider)
        kind = message.get("type")
        if kind == "Results":
            self._results(message)
        elif kind == "Error":  # not documented for /v1/listen, but the SDKs expect it: treat as fatal
            detail = message.get("description") or message.get("message") or "error"
            raise RecognitionError(f"{self.provider}: server error: {str(detail)[:200]}")
        # Metadata, SpeechStarted, UtteranceEnd and anything newer: nothing for the listener

    def ws_closed(self, clean: bool, code: Optional[int], reason: str) -> None:
        self._cancel_timer("_keepalive")
        super().ws_closed(clean, code, reason)

    # -- internals

    def _results(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        alternatives = channel.get("alternatives") if isinstance(channel, dict) else None
        if not isinstance(alternatives, list):
            raise RecognitionError(f"{self.provider}: Results without channel.alternatives")
        if not alternatives:
            return
        best = alternatives[0]
        text = best.get("transcript") if isinstance(best, dict) else None
        if not isinstance(text, str):
            raise RecognitionError(f"{self.provider}: Results alternative without a transcript")
        text = text.strip()
        if not text:
            return
        confidence = best.get("confidence")
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1:
            confidence = None
        start, duration = _seconds(message.get("start")), _seconds(message.get("duration"))
        offset_ms = self.dropped_bytes // 32  # the audio dropped before the connection was never sent
        start_ms = None if start is None else round(start * 1000) + offset_ms
        end_ms = None if start is None or duration is None else round((start + duration) * 1000) + offset_ms
        final = message.get("is_final") is True
        self.emit(Transcript(self._index, text, final, start_ms, end_ms,
                             None if confidence is None else float(confidence)))
        if final:
            self._index += 1

    def _keepalive_due(self) -> None:
        self._keepalive = None
        if self.conn is None:
            return
        idle_s = self._clock.seconds() - self._last_sent_s
        if idle_s >= KEEPALIVE_S:
            self.conn.send_text(json.dumps({"type": "KeepAlive"}))
            self._last_sent_s = self._clock.seconds()
            idle_s = 0.0
        self._keepalive = self._clock.callLater(KEEPALIVE_S - idle_s, self._keepalive_due)
