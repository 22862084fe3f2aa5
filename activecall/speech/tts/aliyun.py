"""Aliyun (DashScope CosyVoice) TTS, provider name ``aliyun``, over the DashScope inference WebSocket.

One WebSocket per request (docs: help.aliyun.com/zh/model-studio/cosyvoice-websocket-api)::

    connect wss://dashscope.aliyuncs.com/api-ws/v1/inference   Authorization: bearer <key>
    -> run-task {header:{action, task_id, streaming:"duplex"}, payload:{task_group:"audio", task:"tts",
                 function:"SpeechSynthesizer", model, parameters:{text_type, voice, format:"pcm",
                 sample_rate, volume, rate, pitch[, word_timestamp_enabled]}, input:{}}}
    <- task-started
    -> continue-task {payload:{input:{text}}}, finish-task {payload:{input:{}}}
    <- Binary audio frames, result-generated (sentence-begin / -synthesis / -end, word timings)
    <- task-finished            (or task-failed with header.error_code / error_message)

* URL: ``request.endpoint``, else ``settings.endpoint``, else the Beijing endpoint above.
* Key: ``request.api_key``, else ``settings.api_key``, else ``environ["DASHSCOPE_API_KEY"]``; the
  environment's key goes only to DashScope's own endpoints (Beijing or ``dashscope-intl``): another
  endpoint must bring its own key and pass the ``[fetch]`` host rules (``ws``/``wss`` only).
* ``model`` (default ``cosyvoice-v2``) and ``speaker`` (default ``longxiaochun_v2``) must match, as
  DashScope requires; ``speed`` maps to ``rate`` (0.5-2.0); volume stays at the normal 50 (the call
  layer applies volume); ``extra`` may carry ``pitch`` (0.5-2.0) and ``instruction``.
* ``request.subtitle`` turns on ``word_timestamp_enabled``; word timings (from result-generated or
  task-finished, whichever carries them; repeated snapshots of a sentence are reported once) go to
  ``on_words`` in ms from the start of the request's audio.
* Every wait is bounded on the injected clock: the connection (``connect_timeout_s``) and then each
  gap between messages (``idle_timeout_s``).  A refused upgrade, task-failed, or a connection lost
  before task-finished is a :class:`SynthesisError`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from activecall.config import FetchConfig
from activecall.speech.asr.wsstream import check_ws_url
from activecall.speech.httpcall import PcmFramer
from activecall.speech.interfaces import (
    ISpeechSynthesizer,
    SynthesisError,
    SynthesisRequest,
    WordTiming,
)
from activecall.speech.keys import KeyPolicy
from activecall.speech.registry import SynthesisSettings
from activecall.speech.wsclient import WsConnectError, WsConnection, connect_ws

__all__ = ["AliyunSynthesizer", "DEFAULT_URL", "INTL_URL", "DEFAULT_MODEL", "DEFAULT_VOICE", "SAMPLE_RATES_HZ",
           "words_in"]

DEFAULT_URL = "wss://dashscope.aliyuncs.com/api-ws/v1/inference"
INTL_URL = "wss://dashscope-intl.aliyuncs.com/api-ws/v1/inference"
_OFFICIAL_URLS = frozenset({DEFAULT_URL, INTL_URL})
DEFAULT_MODEL = "cosyvoice-v2"
DEFAULT_VOICE = "longxiaochun_v2"
#: The rates CosyVoice offers.
SAMPLE_RATES_HZ = frozenset({8000, 16000, 22050, 24000, 44100, 48000})
_FALLBACK_RATE_HZ = 16000
_MAX_MESSAGE_BYTES = 1024 * 1024
_MAX_WORDS = 4096
_MAX_WORD_CHARS = 64
_MAX_TIME_MS = 24 * 3600 * 1000
_RETRYABLE_CODES = frozenset({"InternalError", "ServiceUnavailable", "RequestTimeOut", "Timeout"})


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


def _normalized(url: str) -> str:
    return url.rstrip("/")


@implementer(ISpeechSynthesizer)
class AliyunSynthesizer:
    """CosyVoice speech over DashScope's duplex WebSocket, streamed to ``on_audio`` frame by frame."""

    name = "aliyun"
    _log = Logger()

    def __init__(
        self,
        settings: SynthesisSettings,
        *,
        reactor: Any,
        clock: IReactorTime,
        environ: Mapping[str, str],
        fetch: FetchConfig = FetchConfig(),
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 20.0,
        task_ids: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        """``reactor`` makes the TCP/TLS connections, ``clock`` bounds every wait; raise
        ProviderUnavailableError when no key could ever be sent to the configured URL."""
        self._settings = settings
        self._reactor = reactor
        self._clock = clock
        self._fetch = fetch
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._task_ids = task_ids
        self._keys = KeyPolicy(
            "aliyun TTS", official=_OFFICIAL_URLS, env_key=environ.get("DASHSCOPE_API_KEY") or None,
            no_key="aliyun TTS: no API key (set tts.secretKey or DASHSCOPE_API_KEY)", where="DashScope's",
            schemes="ws/wss",
            error_type=SynthesisError, check=lambda url: check_ws_url(url, fetch.allowed_hosts),
            on_refused=lambda reason: self._log.info("aliyun TTS endpoint refused: {reason}", reason=reason))
        self._keys.check_settings(_normalized(settings.endpoint or DEFAULT_URL), settings.api_key)

    def url_for(self, request: SynthesisRequest) -> str:
        """The WebSocket URL ``request`` goes to."""
        return _normalized(request.endpoint or self._settings.endpoint or DEFAULT_URL)

    def _key_for(self, request: SynthesisRequest) -> str:
        """The key for ``request``'s URL (see :class:`KeyPolicy`)."""
        return self._keys.key_for(self.url_for(request), request.api_key or self._settings.api_key)

    def sample_rate_for(self, request: SynthesisRequest) -> int:
        """The rate asked of CosyVoice (and reported to ``on_audio``)."""
        return request.sample_rate_hz if request.sample_rate_hz in SAMPLE_RATES_HZ else _FALLBACK_RATE_HZ

    def run_task_for(self, request: SynthesisRequest, task_id: str) -> dict[str, Any]:
        """The ``run-task`` command for ``request``."""
        parameters: dict[str, Any] = {
            "text_type": "PlainText",
            "voice": request.speaker or DEFAULT_VOICE,
            "format": "pcm",
            "sample_rate": self.sample_rate_for(request),
            "volume": 50,
            "rate": _clamp(request.speed, 0.5, 2.0),
            "pitch": 1.0,
        }
        try:
            parameters["pitch"] = _clamp(float(request.extra.get("pitch", "1.0")), 0.5, 2.0)
        except ValueError:
            pass
        if request.extra.get("instruction"):
            parameters["instruction"] = request.extra["instruction"]
        if request.subtitle:
            parameters["word_timestamp_enabled"] = True
        return {
            "header": {"action": "run-task", "task_id": task_id, "streaming": "duplex"},
            "payload": {"task_group": "audio", "task": "tts", "function": "SpeechSynthesizer",
                        "model": request.model or self._settings.model or DEFAULT_MODEL,
                        "parameters": parameters, "input": {}},
        }

    def synthesize(self, request: SynthesisRequest, on_audio: Callable[[bytes, int], None],
                   on_words: Optional[Callable[[Sequence[WordTiming]], None]] = None) -> Deferred[None]:
        """See :meth:`ISpeechSynthesizer.synthesize`."""
        try:
            key = self._key_for(request)
        except SynthesisError as e:
            return fail(e)
        task_id = self._task_ids()
        task = _Task(
            clock=self._clock, task_id=task_id, run_task=self.run_task_for(request, task_id), text=request.text,
            rate_hz=self.sample_rate_for(request), on_audio=on_audio,
            on_words=on_words if request.subtitle else None, max_bytes=self._fetch.max_bytes,
            idle_timeout_s=self._idle_timeout_s, log=self._log)
        task.start(self._reactor, self.url_for(request), {"Authorization": f"bearer {key}"}, self._connect_timeout_s)
        return task.result


def _command(action: str, task_id: str, payload: dict[str, Any]) -> str:
    return json.dumps({"header": {"action": action, "task_id": task_id, "streaming": "duplex"},
                       "payload": payload}, ensure_ascii=False)


def words_in(payload: Any) -> tuple[int, list[WordTiming]] | None:
    """``(sentence index, words)`` from an event payload's ``output.sentence``, None when it has no
    words; malformed entries are skipped, texts and times bounded."""
    output = payload.get("output") if isinstance(payload, dict) else None
    sentence = output.get("sentence") if isinstance(output, dict) else None
    if not isinstance(sentence, dict):
        return None
    raw, index = sentence.get("words"), sentence.get("index", 0)
    if not isinstance(raw, list) or not raw or type(index) is not int or not 0 <= index < _MAX_WORDS:
        return None
    words = []
    for item in raw[:_MAX_WORDS]:
        if not isinstance(item, dict):
            continue
        text, begin, end = item.get("text"), item.get("begin_time"), item.get("end_time")
        if not isinstance(text, str) or type(begin) is not int or type(end) is not int:
            continue
        if not 0 <= begin <= _MAX_TIME_MS:
            continue
        words.append(WordTiming(text[:_MAX_WORD_CHARS], begin, min(max(end, begin), _MAX_TIME_MS)))
    return (index, words) if words else None


class _Task:
    """One CosyVoice task on its own WebSocket.

    States: connecting -> waiting for task-started (run-task sent) -> synthesizing (text and
    finish-task sent) -> finished (result fired).  ``result`` fires exactly once; after it has, no
    callback reaches the caller.  Cancelling it drops the connection (DashScope then stops at once).
    """

    def __init__(self, *, clock: IReactorTime, task_id: str, run_task: dict[str, Any], text: str, rate_hz: int,
                 on_audio: Callable[[bytes, int], None],
                 on_words: Optional[Callable[[Sequence[WordTiming]], None]], max_bytes: int,
                 idle_timeout_s: float, log: Logger) -> None:
        self._clock = clock
        self._task_id = task_id
        self._run_task = run_task
        self._text = text
        self._rate_hz = rate_hz
        self._on_audio = on_audio
        self._on_words = on_words
        self._max_bytes = max_bytes
        self._idle_timeout_s = idle_timeout_s
        self._log = log
        self._received = 0
        self._framer = PcmFramer()
        self._started = False
        self._emitted: dict[int, int] = {}  # sentence index -> words already reported
        self._connecting: Optional[Deferred[WsConnection]] = None
        self._conn: Optional[WsConnection] = None
        self._timer: Optional[IDelayedCall] = None
        self._ended = False  # result fired or firing: nothing more reaches the caller
        self.result: Deferred[None] = Deferred(lambda _: self._end())

    def start(self, reactor: Any, url: str, headers: Mapping[str, str], connect_timeout_s: float) -> None:
        self._timer = self._clock.callLater(connect_timeout_s, self._timed_out, "connect timed out")
        try:
            self._connecting = connect_ws(reactor, url, headers=headers, listener=self,
                                          max_message_bytes=_MAX_MESSAGE_BYTES, connect_timeout_s=connect_timeout_s)
        except WsConnectError as e:
            self._fail(SynthesisError(f"aliyun TTS: {e}", retryable=False))
            return
        self._connecting.addCallbacks(self._connected, self._connect_failed)

    # -- teardown

    def _end(self) -> None:
        self._ended = True
        self._teardown()

    def _teardown(self) -> None:
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
        if self._ended:
            return
        self._end()
        self._log.info("aliyun TTS failed: {error}", error=str(error))
        self.result.errback(Failure(error))

    def _timed_out(self, what: str) -> None:
        self._timer = None
        self._fail(SynthesisError(f"aliyun TTS: {what}", retryable=True))

    def _arm_idle(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(self._idle_timeout_s, self._timed_out,
                                            f"no data for {self._idle_timeout_s:g} s")

    # -- connection

    def _connected(self, conn: WsConnection) -> None:
        self._connecting = None
        if self._ended:
            conn.abort()
            return
        self._conn = conn
        self._arm_idle()
        conn.send_text(json.dumps(self._run_task, ensure_ascii=False))

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._ended:
            return
        status = failure.value.status if isinstance(failure.value, WsConnectError) else None
        if status is not None:
            retryable = status in (408, 429) or status >= 500
            self._fail(SynthesisError(f"aliyun TTS: upgrade refused (HTTP {status})", retryable=retryable))
        else:
            self._fail(SynthesisError(f"aliyun TTS: cannot connect: {failure.getErrorMessage()}", retryable=True))

    # -- WsListener

    def ws_binary(self, data: bytes) -> None:
        if self._ended:
            return
        if not self._started:
            self._fail(SynthesisError("aliyun TTS: audio before task-started", retryable=False))
            return
        self._received += len(data)
        if self._received > self._max_bytes:
            self._fail(SynthesisError(f"aliyun TTS: audio larger than {self._max_bytes} bytes", retryable=False))
            return
        self._arm_idle()
        pcm = self._framer.feed(data)
        if pcm:
            self._deliver(self._on_audio, pcm, self._rate_hz)

    def ws_text(self, text: str) -> None:
        if self._ended:
            return
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        header = message.get("header") if isinstance(message, dict) else None
        if not isinstance(header, dict) or not isinstance(header.get("event"), str):
            self._fail(SynthesisError("aliyun TTS: malformed event from the server", retryable=False))
            return
        if header.get("task_id") not in (None, self._task_id):
            self._fail(SynthesisError("aliyun TTS: event for another task", retryable=False))
            return
        self._arm_idle()
        event, payload = header["event"], message.get("payload")
        if event == "task-started":
            self._task_started()
        elif event == "result-generated":
            self._words(payload, final=isinstance(payload, dict) and isinstance(payload.get("output"), dict)
                        and payload["output"].get("type") == "sentence-end")
        elif event == "task-finished":
            self._words(payload, final=True)
            self._finished()
        elif event == "task-failed":
            code = str(header.get("error_code") or "")[:100]
            message_text = " ".join(str(header.get("error_message") or "").split())[:200]
            retryable = code.startswith("Throttling") or code in _RETRYABLE_CODES
            self._fail(SynthesisError(f"aliyun TTS task failed: {code}: {message_text}".rstrip(": "),
                                      retryable=retryable))

    def ws_closed(self, clean: bool, code: Optional[int], reason: str) -> None:
        self._conn = None
        detail = f" ({code} {reason[:200]})" if code else ""
        self._fail(SynthesisError(f"aliyun TTS: connection closed before task-finished{detail}", retryable=True))

    # -- protocol steps

    def _task_started(self) -> None:
        if self._started or self._conn is None:
            return
        self._started = True
        self._conn.send_text(_command("continue-task", self._task_id, {"input": {"text": self._text}}))
        self._conn.send_text(_command("finish-task", self._task_id, {"input": {}}))

    def _words(self, payload: Any, final: bool) -> None:
        """Report a sentence's words once it is complete (sentence-end or task-finished)."""
        if self._on_words is None or not final:
            return
        found = words_in(payload)
        if found is None:
            return
        index, words = found
        new = words[self._emitted.get(index, 0):]
        if new:
            self._emitted[index] = len(words)
            self._deliver(self._on_words, new)

    def _finished(self) -> None:
        if self._ended:  # a word consumer failed or cancelled
            return
        if not self._started:
            self._fail(SynthesisError("aliyun TTS: task-finished before task-started", retryable=False))
            return
        conn, self._conn = self._conn, None
        self._end()
        if conn is not None:
            conn.close()
        self.result.callback(None)

    def _deliver(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception as e:
            self._log.failure("aliyun TTS consumer callback failed")
            self._fail(SynthesisError(f"audio consumer failed: {e}", retryable=False))
