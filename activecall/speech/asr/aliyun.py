"""Alibaba Cloud Model Studio (DashScope) real-time ASR, provider name ``aliyun``: one WebSocket task per call.

* URL: ``request.endpoint``, else ``settings.endpoint``, else
  ``wss://dashscope.aliyuncs.com/api-ws/v1/inference``.
* Key: ``request.api_key``, else ``settings.api_key``, else ``environ["DASHSCOPE_API_KEY"]``, sent as
  ``Authorization: Bearer <key>``.  The environment's key goes only to the default endpoint: an
  endpoint elsewhere must bring its own key and pass the ``[fetch]`` host rules.
* Wire (duplex task): the client sends ``run-task`` (``header.task_id`` 32 hex digits, ``streaming``
  ``duplex``; ``payload`` task_group ``audio``, task ``asr``, function ``recognition``, ``model``
  (``asr.modelType``, default ``paraformer-realtime-v2``), ``parameters`` ``format=pcm``,
  ``sample_rate=16000``, ``language_hints`` from ``language`` (``zh-CN`` -> ``zh``), then every
  ``extra`` entry (JSON values decoded, e.g. ``"true"`` -> true); ``input`` ``{}``); the server
  answers ``task-started`` (within the connect timeout, else a retryable failure) and only then does
  audio flow, as Binary PCM; at the end the client
  sends ``finish-task`` and the server its last results and ``task-finished``.
* Results: ``result-generated`` with ``payload.output.sentence`` ``{begin_time, end_time, text,
  sentence_end}`` (ms of the audio sent); ``sentence_end`` false is a partial of the sentence in
  progress, true its final; ``heartbeat`` results are skipped.
* Errors: ``task-failed`` (``header.error_code``, ``error_message``) fails the stream, retryable for
  throttling, timeouts and internal errors; a refused upgrade (401) is non-retryable; a lost
  connection is retryable.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any, Callable, Mapping, Optional

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

__all__ = ["AliyunRecognizer", "AliyunStream", "DEFAULT_ENDPOINT", "DEFAULT_MODEL"]

DEFAULT_ENDPOINT = "wss://dashscope.aliyuncs.com/api-ws/v1/inference"
DEFAULT_MODEL = "paraformer-realtime-v2"
_FIXED_PARAMETERS = ("format", "sample_rate")  # the audio we send is 16 kHz PCM whatever extra says
_RETRYABLE_HINTS = ("throttl", "timeout", "internal", "overload", "busy")
_MAX_TIME_MS = 7 * 24 * 3600 * 1000


def _ms(value: Any) -> Optional[int]:
    """A finite, non-negative, bounded millisecond count, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if math.isfinite(value) and 0 <= value <= _MAX_TIME_MS else None


def _extra_value(text: str) -> Any:
    """An ``extra`` string as the JSON value it spells (``true``, ``5``, ``["a"]``), else the string."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return text


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: keep such a value as its string."""
    raise ValueError(name)


def _clean_key(key: str) -> str:
    """Refuse keys that would break (or inject into) the upgrade request's headers."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in key):
        raise RecognitionError("aliyun ASR: apiKey contains whitespace or control characters")
    return key


@implementer(IRecognizer)
class AliyunRecognizer:
    """Opens an :class:`AliyunStream` per call (see the module docstring)."""

    name = "aliyun"
    streaming = True
    _log = Logger()

    def __init__(self, settings: RecognizerSettings, *, reactor: Any, clock: IReactorTime,
                 environ: Mapping[str, str], fetch: FetchConfig = FetchConfig(), connect_timeout_s: float = 5.0,
                 close_timeout_s: float = 3.0, new_task_id: Callable[[], str] = lambda: uuid.uuid4().hex) -> None:
        """Raise ProviderUnavailableError when the default endpoint would be used without any key,
        or the configured endpoint is elsewhere without its own key."""
        self._settings = settings
        self._reactor = reactor
        self._clock = clock
        self._fetch = fetch
        self._connect_timeout_s = connect_timeout_s
        self._close_timeout_s = close_timeout_s
        self._new_task_id = new_task_id
        self._keys = KeyPolicy(
            "aliyun ASR", official=frozenset({DEFAULT_ENDPOINT}), env_key=environ.get("DASHSCOPE_API_KEY") or None,
            no_key="aliyun ASR: no API key (set asr.apiKey or DASHSCOPE_API_KEY)", where="the default one",
            schemes="ws/wss",
            error_type=RecognitionError, check=lambda url: check_ws_url(url, fetch.allowed_hosts),
            on_refused=lambda reason: self._log.info("aliyun ASR endpoint refused: {reason}", reason=reason))
        self._keys.check_settings(settings.endpoint or DEFAULT_ENDPOINT, settings.api_key)

    def endpoint_for(self, request: RecognitionRequest) -> str:
        """The inference WebSocket URL ``request`` goes to."""
        return request.endpoint or self._settings.endpoint or DEFAULT_ENDPOINT

    def headers_for(self, request: RecognitionRequest) -> dict[str, str]:
        """The upgrade headers for ``request``; RecognitionError when it cannot be sent."""
        key = self._keys.key_for(self.endpoint_for(request), request.api_key or self._settings.api_key)
        return {"Authorization": "Bearer " + _clean_key(key)}

    def run_task_for(self, request: RecognitionRequest, task_id: str) -> dict[str, Any]:
        """The ``run-task`` message that starts ``request``'s task."""
        parameters: dict[str, Any] = {"format": "pcm", "sample_rate": 16000}
        language = (request.language or "").split("-")[0].split("_")[0].lower()
        if language and language != "auto":
            parameters["language_hints"] = [language]
        for name, value in request.extra.items():
            if name not in _FIXED_PARAMETERS:
                parameters[str(name)] = _extra_value(str(value))
        return {
            "header": {"action": "run-task", "task_id": task_id, "streaming": "duplex"},
            "payload": {"task_group": "audio", "task": "asr", "function": "recognition",
                        "model": request.model or self._settings.model or DEFAULT_MODEL,
                        "parameters": parameters, "input": {}},
        }

    def open(self, request: RecognitionRequest, listener: IRecognitionListener) -> "AliyunStream":
        """See :meth:`IRecognizer.open`."""
        headers = self.headers_for(request)
        task_id = self._new_task_id()
        return AliyunStream(self.run_task_for(request, task_id), reactor=self._reactor, clock=self._clock,
                            url=self.endpoint_for(request), headers=headers, listener=listener,
                            connect_timeout_s=self._connect_timeout_s, close_timeout_s=self._close_timeout_s)


class AliyunStream(WsRecognitionStream):
    """One call's DashScope task: ``run-task`` -> ``task-started`` (ready) -> audio and
    ``result-generated`` -> ``finish-task`` -> ``task-finished`` (we close the WebSocket).

    ``_index`` is the sentence in progress.
    """

    provider = "aliyun ASR"

    def __init__(self, run_task: dict[str, Any], **kwargs: Any) -> None:
        self._run_task = run_task
        self._task_id: str = run_task["header"]["task_id"]
        self._index = 0
        self._finish_sent = False
        self._start_timeout_s: float = kwargs.get("connect_timeout_s", 5.0)
        self._start_timer: Optional[IDelayedCall] = None
        super().__init__(**kwargs)

    # -- hooks

    def opened(self) -> None:
        assert self.conn is not None
        self.conn.send_text(json.dumps(self._run_task))
        self._start_timer = self._clock.callLater(self._start_timeout_s, self._start_timed_out)

    def finish_audio(self) -> None:
        assert self.conn is not None
        self._finish_sent = True
        self.conn.send_text(json.dumps({
            "header": {"action": "finish-task", "task_id": self._task_id, "streaming": "duplex"},
            "payload": {"input": {}},
        }))

    def text_received(self, text: str) -> None:
        message = parse_json_object(text, self.provider)
        header = message.get("header")
        if not isinstance(header, dict):
            raise RecognitionError(f"{self.provider}: message without a header")
        task_id = header.get("task_id")
        if task_id is not None and task_id != self._task_id:
            raise RecognitionError(f"{self.provider}: message for another task")
        event = header.get("event")
        if event == "task-started":
            self._cancel_timer("_start_timer")
            self.ready()
        elif event == "result-generated":
            self._result(message.get("payload"))
        elif event == "task-finished":
            if self._finish_sent and self.conn is not None:
                self.conn.close()  # the server's last word: the base class sees the close and is done
            else:
                raise RecognitionError(f"{self.provider}: the server finished the task early", retryable=True)
        elif event == "task-failed":
            raise _task_failed(header)

    def ws_closed(self, clean: bool, code: Optional[int], reason: str) -> None:
        self._cancel_timer("_start_timer")
        super().ws_closed(clean, code, reason)

    # -- internals

    def _start_timed_out(self) -> None:
        self._start_timer = None
        self.fail(RecognitionError(f"{self.provider}: no task-started within {self._start_timeout_s:g} s",
                                   retryable=True))

    def _result(self, payload: Any) -> None:
        output = payload.get("output") if isinstance(payload, dict) else None
        sentence = output.get("sentence") if isinstance(output, dict) else None
        if not isinstance(sentence, dict):
            raise RecognitionError(f"{self.provider}: result-generated without payload.output.sentence")
        if sentence.get("heartbeat") is True:
            return
        text = sentence.get("text")
        if not isinstance(text, str):
            raise RecognitionError(f"{self.provider}: result sentence without text")
        text = text.strip()
        if not text:
            return
        offset_ms = self.dropped_bytes // 32  # the audio dropped before the task started was never sent
        begin, end = _ms(sentence.get("begin_time")), _ms(sentence.get("end_time"))
        final = sentence.get("sentence_end") is True
        self.emit(Transcript(self._index, text, final, None if begin is None else begin + offset_ms,
                             None if end is None else end + offset_ms))
        if final:
            self._index += 1


def _task_failed(header: dict[str, Any]) -> RecognitionError:
    """The error a ``task-failed`` header describes."""
    code = str(header.get("error_code") or "unknown")[:100]
    message = str(header.get("error_message") or "")[:200]
    retryable = any(hint in code.lower() for hint in _RETRYABLE_HINTS)
    return RecognitionError(f"aliyun ASR: task failed: {code}: {message}".rstrip(": "), retryable=retryable)
