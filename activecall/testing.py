"""Shipped fakes for tests of activecall and of code built on it."""

from __future__ import annotations

import random
import tempfile
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from activecall.call.services import CallServices
from activecall.ids import IdSource
from activecall.media.cache import MediaCache
from activecall.media.clock import MediaClock
from activecall.media.tracks import IInboundLeg, IInboundLegFactory, ILegDialer, LegSetupError
from activecall.speech.interfaces import (
    IRecognitionListener, IRecognitionStream, IRecognizer, ISpeechSynthesizer, RecognitionRequest, SynthesisError, SynthesisRequest, WordTiming,
)
from activecall.speech.registry import SynthesizerRegistry

__all__ = ["fake_call_services", "FakeSynthesizer", "SynthesizerConformanceMixin", "FakeLeg", "FakeDialer", "FakeRecorder", "FakePending",
           "FakeRecognizer", "FakeRecognitionStream", "FakeVadEngine", "FakeVadStream", "RecordingListener",
           "RecordingObserver"]


def fake_call_services(clock: IReactorTime, *, synthesizer: Optional[ISpeechSynthesizer] = None,
                       **fields: Any) -> CallServices:
    """:class:`CallServices` for tests: ``clock`` drives time and the media clock, blocking work runs inline,
    fetches return nothing, the media cache is a fresh temporary directory, ids are seeded; ``synthesizer``
    (when given) is TTS provider ``"fake"``; ``fields`` set or replace any other field."""
    registry = SynthesizerRegistry()
    if synthesizer is not None:
        registry.register("fake", lambda settings: synthesizer)
    defaults: dict[str, Any] = dict(
        clock=clock, media_clock=MediaClock(clock), ids=IdSource(random.Random(7)), synthesizers=registry,
        cache=MediaCache(tempfile.mkdtemp()), run_blocking=lambda f, *a: maybeDeferred(f, *a),
        fetch_url=lambda url: succeed(b""))
    defaults.update(fields)
    return CallServices(**defaults)


@implementer(ISpeechSynthesizer)
class FakeSynthesizer:
    """Deterministic synthesizer: a tone of ``ms_per_char`` per character, in timed chunks.

    Audio is a sine at ``frequency_hz`` at the request's rate (or ``rate_hz``), cut
    into ``chunk_ms`` pieces; one piece is delivered every ``chunk_interval_s`` on
    the injected clock (the first one after one interval), then the Deferred fires.
    With ``fail_with`` set, the Deferred errbacks with it after ``fail_after_chunks``
    pieces.  ``requests`` records every request; ``cancelled`` counts cancels.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        name: str = "fake",
        ms_per_char: int = 50,
        chunk_ms: int = 100,
        chunk_interval_s: float = 0.02,
        frequency_hz: float = 440.0,
        rate_hz: int | None = None,
        fail_with: SynthesisError | None = None,
        fail_after_chunks: int = 0,
    ) -> None:
        self.name = name
        self._clock = clock
        self.ms_per_char = ms_per_char
        self.chunk_ms = chunk_ms
        self.chunk_interval_s = chunk_interval_s
        self.frequency_hz = frequency_hz
        self.rate_hz = rate_hz
        self.fail_with = fail_with
        self.fail_after_chunks = fail_after_chunks
        self.requests: list[SynthesisRequest] = []
        self.cancelled = 0
        self.active = 0

    def rate_for(self, request: SynthesisRequest) -> int:
        """Return the rate audio for ``request`` is delivered at."""
        return self.rate_hz or request.sample_rate_hz

    def audio_for(self, request: SynthesisRequest) -> bytes:
        """Return the whole PCM a successful synthesis of ``request`` delivers."""
        rate = self.rate_for(request)
        n = max(1, len(request.text)) * self.ms_per_char * rate // 1000
        tone = np.sin(np.arange(n) * (2 * np.pi * self.frequency_hz / rate)) * 8000
        return tone.astype("<i2").tobytes()

    def synthesize(self, request: SynthesisRequest, on_audio: Callable[[bytes, int], None],
                   on_words: Optional[Callable[[Sequence[WordTiming]], None]] = None) -> Deferred[None]:
        """Deliver :meth:`audio_for` in chunks on the clock; see ``ISpeechSynthesizer``."""
        self.requests.append(request)
        rate = self.rate_for(request)
        pcm = self.audio_for(request)
        step = max(2, self.chunk_ms * rate // 1000 * 2)
        chunks = [pcm[i : i + step] for i in range(0, len(pcm), step)]
        pending: list[IDelayedCall] = []

        def cancel(_: Deferred[None]) -> None:
            self.cancelled += 1
            self.active -= 1
            if pending and pending[0].active():
                pending[0].cancel()

        d: Deferred[None] = Deferred(cancel)
        self.active += 1

        def tick(index: int) -> None:
            pending.clear()
            if self.fail_with is not None and index >= self.fail_after_chunks:
                self.active -= 1
                d.errback(Failure(self.fail_with))
                return
            if index >= len(chunks):
                self.active -= 1
                d.callback(None)
                return
            on_audio(chunks[index], rate)
            if not d.called:  # on_audio may have cancelled us
                pending.append(self._clock.callLater(self.chunk_interval_s, tick, index + 1))

        pending.append(self._clock.callLater(self.chunk_interval_s, tick, 0))
        return d


class SynthesizerConformanceMixin:
    """Checks every ``ISpeechSynthesizer`` must pass; mix into a trial TestCase.

    Subclasses define :meth:`make_synthesizer`.
    """

    def make_synthesizer(self) -> ISpeechSynthesizer:
        """Return the provider under test."""
        raise NotImplementedError

    def test_conformance_interface(self) -> None:
        """The provider verifiably provides ISpeechSynthesizer and has a lower-case str name."""
        synth = self.make_synthesizer()
        assert verifyObject(ISpeechSynthesizer, synth)
        assert isinstance(synth.name, str) and synth.name == synth.name.lower() and synth.name


@implementer(IInboundLeg)
class FakeLeg:
    """An :class:`~activecall.media.tracks.ILeg` (and IInboundLeg) driven by hand in tests.

    ``tick()`` does what the media clock does to a real leg: deliver the queued
    caller frames to the sink, then pull one agent frame into ``sent``.  The
    ``events`` given at attach are what a test calls to play the far end.
    """

    media_rate_hz = 16000
    frame_bytes = 640
    can_transfer = True
    audio_on_control_socket = False
    signals_media_ready = False

    def __init__(self, ssrc: int = 1234, answer_sdp: str = "v=0\r\n", caller: str = "sip:alice@example.com",
                 callee: str = "sip:bot@example.com") -> None:
        self.ssrc = ssrc
        self.answer_sdp = answer_sdp
        self.offer_sdp = "v=0\r\n"
        self.caller = caller
        self.callee = callee
        self.custom_headers: dict[str, str] = {}
        self.last_activity_at: Optional[float] = None
        self.source: Any = None
        self.sink: Any = None
        self.events: Any = None
        self.caller_frames: list[bytes] = []
        self.sent: list[Optional[bytes]] = []
        self.closed_with: Optional[dict[str, str]] = None
        self.closed = False
        self.rang: list[bool] = []
        self.rejected: Optional[tuple[int, str]] = None
        self.answering: Optional[Deferred[None]] = None
        self.refer_targets: list[str] = []
        self.refer_result: Deferred[Any] = Deferred()
        self.messages: list[tuple[str, str, dict[str, str]]] = []
        self.message_result: Deferred[Any] = Deferred()
        self.prepare_error: Optional[str] = None
        self.dtmf_sent: list[str] = []

    @property
    def native_rate_hz(self) -> int:
        return self.media_rate_hz

    def send_dtmf(self, digits: str) -> bool:
        if self.closed:
            return False
        self.dtmf_sent.append(digits)
        return True

    def attach(self, source: Any, sink: Any, events: Any) -> None:
        self.source, self.sink, self.events = source, sink, events

    def tick(self) -> None:
        """One media tick: receive phase (caller frames to the sink), then send phase (one pull)."""
        frames, self.caller_frames = self.caller_frames, []
        for frame in frames:
            self.sink.write_frame(frame)
        if self.source is not None and not self.closed:
            self.sent.append(self.source.read_frame())

    def refer(self, target: str) -> Deferred[Any]:
        self.refer_targets.append(target)
        return self.refer_result

    def send_message(self, body: str, content_type: str, headers: Optional[Mapping[str, str]] = None) -> Deferred[Any]:
        self.messages.append((body, content_type, dict(headers or {})))
        return self.message_result

    def close(self, headers: Optional[Mapping[str, str]] = None) -> Deferred[None]:
        if not self.closed:
            self.closed = True
            self.closed_with = dict(headers or {})
        return succeed(None)

    # IInboundLeg
    def prepare(self) -> None:
        if self.prepare_error is not None:
            self.rejected = (488, "Not Acceptable Here")
            raise LegSetupError(self.prepare_error)

    def ring(self, early_media: bool) -> None:
        self.rang.append(early_media)

    def answer(self) -> Deferred[None]:
        self.answering = Deferred()
        return self.answering

    def reject(self, code: int, reason: str) -> None:
        self.rejected = (code, reason)


@implementer(ILegDialer, IInboundLegFactory)
class FakeDialer:
    """Dials :class:`FakeLeg` s: each ``dial`` is kept in ``attempts`` with its Deferred, answered by the test."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, str, Callable[[bool], None], Deferred[Any]]] = []
        self.cancelled: list[str] = []
        self.setup_error: Optional[LegSetupError] = None
        self.inbound_legs: list[FakeLeg] = []

    def dial(self, option: Any, call_id: str, on_ringing: Callable[[bool], None]) -> Deferred[Any]:
        if self.setup_error is not None:
            raise self.setup_error
        d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(call_id))
        self.attempts.append((option, call_id, on_ringing, d))
        return d

    def inbound(self, call: Any, option: Any) -> FakeLeg:
        leg = call if isinstance(call, FakeLeg) else FakeLeg()
        self.inbound_legs.append(leg)
        return leg


class FakeRecorder:
    """A stereo recorder (``CallServices.make_recorder``'s product) that keeps what it is given."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.left = bytearray()
        self.right = bytearray()
        self.closed = False

    def write(self, left: bytes, right: bytes) -> None:
        self.left += left
        self.right += right

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


class FakePending:
    """Inbound calls waiting for a client (``CallServices.pending``), with a log of what happened to them."""

    def __init__(self, calls: Optional[dict[str, Any]] = None) -> None:
        self.calls: dict[str, Any] = dict(calls or {})
        self.log: list[tuple[str, Any]] = []

    def __contains__(self, dialog_id: object) -> bool:
        return dialog_id in self.calls

    def get(self, dialog_id: str) -> Any:
        return self.calls.get(dialog_id)

    def take(self, dialog_id: str) -> Any:
        return self.calls.pop(dialog_id, None)

    def cancelled(self, dialog_id: str) -> bool:
        self.log.append(("cancelled", dialog_id))
        return self.calls.pop(dialog_id, None) is not None

    def reject(self, dialog_id: str, code: int, reason: str) -> bool:
        self.log.append(("reject", code))
        return self.calls.pop(dialog_id, None) is not None

    def client_disconnected(self, dialog_id: str) -> bool:
        self.log.append(("client_disconnected", dialog_id))
        return self.calls.pop(dialog_id, None) is not None



@implementer(IRecognitionStream)
class FakeRecognitionStream:
    """What a :class:`FakeRecognizer` opened: records the audio and VAD hints; a test plays the provider
    by calling ``listener.transcript/dropped/failed``."""

    def __init__(self, request: RecognitionRequest, listener: Any) -> None:
        self.request = request
        self.listener = listener
        self.audio = bytearray()
        self.hints: list[tuple[str, int]] = []
        self.closed = False

    def write(self, pcm: bytes) -> None:
        if not self.closed:
            self.audio += pcm

    def speech_started(self, at_ms: int) -> None:
        self.hints.append(("started", at_ms))

    def speech_paused(self, at_ms: int) -> None:
        self.hints.append(("paused", at_ms))

    def speech_ended(self, at_ms: int) -> None:
        self.hints.append(("ended", at_ms))

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


@implementer(IRecognizer)
class FakeRecognizer:
    """A recognizer whose streams a test drives by hand (``streaming`` chooses which kind it claims to be)."""

    def __init__(self, name: str = "fakeasr", streaming: bool = True) -> None:
        self.name = name
        self.streaming = streaming
        self.streams: list[FakeRecognitionStream] = []
        self.open_error: Optional[Exception] = None

    def open(self, request: RecognitionRequest, listener: Any) -> FakeRecognitionStream:
        if self.open_error is not None:
            raise self.open_error
        stream = FakeRecognitionStream(request, listener)
        self.streams.append(stream)
        return stream


class FakeVadStream:
    """A VAD stream that records frames; a test plays the detector through ``listener``."""

    def __init__(self, kind: str, rate_hz: int, params: Any, listener: Any) -> None:
        self.kind = kind
        self.rate_hz = rate_hz
        self.params = params
        self.listener = listener
        self.frames: list[bytes] = []
        self.closed = False

    def write(self, pcm: bytes) -> None:
        self.frames.append(pcm)

    def close(self) -> None:
        self.closed = True


class FakeVadEngine:
    """A VAD engine whose streams a test drives by hand."""

    def __init__(self) -> None:
        self.streams: list[FakeVadStream] = []

    def open(self, kind: str, rate_hz: int, params: Any, listener: Any) -> FakeVadStream:
        stream = FakeVadStream(kind, rate_hz, params, listener)
        self.streams.append(stream)
        return stream


class RecordingObserver:
    """A call's observer that keeps what the controller reports: its domain ``events``, the client
    ``audio`` (``subscribe``), and whether the call ``finished``."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.audio: list[bytes] = []
        self.finished = False

    def call_event(self, event: Any) -> None:
        self.events.append(event)

    def client_audio(self, data: bytes) -> None:
        self.audio.append(data)

    def call_finished(self) -> None:
        self.finished = True

    def of(self, cls: type) -> list[Any]:
        """The events of type ``cls``, in order."""
        return [e for e in self.events if isinstance(e, cls)]

    def kinds(self) -> list[str]:
        """The type names of the events, in order."""
        return [type(e).__name__ for e in self.events]

    def errors(self) -> list[str]:
        """The messages of the error events, in order."""
        return [e.message for e in self.events if type(e).__name__ == "ErrorOccurred"]


@implementer(IRecognitionListener)
class RecordingListener:
    """Keeps what a recognition stream reports: ``results``, ``drops``, ``failures``; ``result_d`` fires
    with the first transcript, ``failed_d`` with the first failure."""

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.drops: list[Any] = []
        self.failures: list[Any] = []
        self.result_d: Deferred[Any] = Deferred()
        self.failed_d: Deferred[Any] = Deferred()

    def transcript(self, result: Any) -> None:
        self.results.append(result)
        if not self.result_d.called:
            self.result_d.callback(result)

    def dropped(self, error: Any) -> None:
        self.drops.append(error)

    def failed(self, error: Any) -> None:
        self.failures.append(error)
        if not self.failed_d.called:
            self.failed_d.callback(error)
