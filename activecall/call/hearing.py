"""What a call hears: the caller's audio through denoise -> VAD -> AGC -> ASR, turned into events and barge-in.

One :class:`CallHearing` per call leg that has ``vad``, ``asr``, ``denoise`` or
``eou`` in its option.  It is a sink on the call's caller fan-out (receive
phase): each 20 ms frame is denoised if asked, brought to the VAD's rate (8 kHz
for G.711 legs, no resampling; 16 kHz otherwise) and to the recognizer's 16 kHz,
where ``agc`` lifts a quiet caller (its gain adapting while the VAD hears speech).
VAD runs batched across calls (:class:`activecall.speech.vad.engine.VadEngine`,
process phase); its results and the recognizer's arrive on the reactor thread
and become ``speaking``/``silence``/``asrDelta``/``asrFinal``/``eou`` events.

Segment recognizers (whisper, openai) need utterance boundaries: they get VAD
hints even when the client did not ask for VAD events (a VAD then runs silently).
A streaming recognizer that fails is reopened with backoff (a few times in a row),
then the call falls back to ``asr.extra.fallback`` when that names a provider;
either way the call goes on.  Nothing here ever blocks the media.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from twisted.logger import Logger
from zope.interface import implementer

from activecall.call.events import (
    MetricsMeasured, SilenceLasted, SpeechEnded, SpeechStarted, TranscriptHeard, TurnEnded,
)
from activecall.call.services import AudioFilter, VoiceStream
from activecall.media.agc import GainController
from activecall.media.resample import Resampler
from activecall.options import AgcOption, CallOption, InterruptionOption, TranscriptionOption
from activecall.speech.interfaces import (
    IRecognitionListener, IRecognitionStream, IRecognizer, RecognitionError, RecognitionRequest, Transcript,
    UnknownProviderError,
)
from activecall.speech.registry import RecognizerSettings

if TYPE_CHECKING:
    from activecall.call.controller import CallController

__all__ = ["CallHearing", "BargeIn", "DEFAULT_FILLERS", "FILLERS_FILE", "read_fillers"]

ASR_RATE_HZ = 16000
#: playbook.md §9 step 4: the filler words when config/fillers.txt is absent or empty.
DEFAULT_FILLERS = frozenset({"嗯", "啊", "哦", "那个", "那个...", "uh", "um", "ah"})
FILLERS_FILE = "config/fillers.txt"
_MAX_FILLERS = 1000


def read_fillers(path: str) -> frozenset[str]:
    """The filler words of ``path`` (one per line, lowercased; bounded), empty when it is absent."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(64 * 1024).splitlines()
    except OSError:
        return frozenset()
    return frozenset(w for w in (line.strip().lower()[:64] for line in lines[:_MAX_FILLERS]) if w)
_RETRY_DELAYS_S = (0.5, 1.0, 2.0)
_FINAL_GRACE_MS = 500  # playbook.md §9 step 5
_EOU_DEFAULT_MS = 600
_EOU_WAIT_FOR_FINAL_S = 2.0


def _words(text: str) -> str:
    return text.strip().strip(".,!?;:。，！？、…").strip().lower()


@dataclass
class BargeIn:
    """When caller speech cuts the agent's speech (playbook.md §9), for one call."""

    option: InterruptionOption
    fillers: frozenset[str] = DEFAULT_FILLERS

    def is_filler(self, text: str) -> bool:
        return _words(text) in self.fillers

    def allows(self, by_vad: bool, text: Optional[str], speaking_for_ms: float, since_final_ms: Optional[float],
               speech_ms: int) -> bool:
        """Whether a ``speaking`` (``by_vad``) or an ASR partial (``text``) interrupts now."""
        strategy = self.option.strategy
        if strategy == "none" or (strategy == "vad" and not by_vad) or (strategy == "asr" and by_vad):
            return False
        if speaking_for_ms < self.option.ignore_first_ms:
            return False
        if by_vad and speech_ms < self.option.min_speech_ms:
            return False
        if self.option.filler_word_filter and text is not None and self.is_filler(text):
            return False
        if since_final_ms is not None and since_final_ms < _FINAL_GRACE_MS:
            return False
        return True


class CallHearing:
    """The hearing of one call leg; built by :meth:`start`, ended by :meth:`close`."""

    _log = Logger()

    def __init__(self, call: "CallController", option: CallOption, leg_rate_hz: int, sender: str,
                 track: Optional[str] = None, refer: Optional[bool] = None,
                 native_rate_hz: Optional[int] = None) -> None:
        native_rate_hz = native_rate_hz or leg_rate_hz
        self._call = call
        self._track = track or call.sid
        self._refer = refer
        self.asr_paused = False
        self._services = call.services
        self._option = option
        self._sender = sender
        self._leg_rate = leg_rate_hz
        self._closed = False
        self._denoiser: Optional[AudioFilter] = None
        self._vad: Optional[VoiceStream] = None
        self._agc: Optional[GainController] = None
        # Narrowband callers are heard at 8 kHz (cheaper Silero windows): an 8 kHz leg as it is, a
        # G.711 SIP leg's 16 kHz frames (upsampled from 8 kHz, nothing above 4 kHz) by taking every other
        # sample, which aliases nothing.
        self._vad_rate = 8000 if native_rate_hz == 8000 else 16000
        self._vad_decimate = leg_rate_hz == 2 * self._vad_rate and native_rate_hz == self._vad_rate
        self._to_vad = Resampler(leg_rate_hz, self._vad_rate) \
            if leg_rate_hz != self._vad_rate and not self._vad_decimate else None
        self._vad_events = False  # report speaking/silence (the client asked for vad)
        self._asr: Optional[IRecognitionStream] = None
        self._asr_option: Optional[TranscriptionOption] = None
        self._recognizer: Optional[IRecognizer] = None
        self._provider = ""
        self._to_asr = Resampler(leg_rate_hz, ASR_RATE_HZ) if leg_rate_hz != ASR_RATE_HZ else None
        self._asr_written_ms = 0
        self._written_ms = 0
        self._last_write_at = call.now()
        self._retries = 0
        self._retry_timer: Any = None
        self._fell_back = False
        self._reported_indexes: set[int] = set()
        self._speaking = False
        self._speech_started_ms = 0
        self._speech_started_at = 0.0
        self._last_final_at: Optional[float] = None
        self._turn_text: list[str] = []
        self._eou_timer: Any = None
        self._eou_ms: Optional[int] = None
        self._awaiting_final = False
        self._final_since_speech = False
        option_interruption = option.interruption if not refer else None  # the agent speaks to the caller only
        self.barge_in: Optional[BargeIn] = (
            BargeIn(option_interruption, self._services.fillers or DEFAULT_FILLERS)
            if option_interruption is not None else None)
        self.frames = 0

    # -- building ----------------------------------------------------------------

    @classmethod
    def start(cls, call: "CallController", option: CallOption, leg_rate_hz: int, sender: str,
              track: Optional[str] = None, refer: Optional[bool] = None,
              native_rate_hz: Optional[int] = None) -> Optional["CallHearing"]:
        """The hearing ``option`` asks for, reporting each piece that cannot run (the rest goes on); None
        when nothing is asked.  ``track``/``refer``: a transfer leg's hearing reports on SST with ``refer``."""
        wants_vad = option.vad is not None and (option.vad.type or "silero").lower() != "nop"
        if not (wants_vad or option.asr is not None or option.denoise or option.eou is not None):
            return None
        hearing = cls(call, option, leg_rate_hz, sender, track, refer, native_rate_hz)
        if option.denoise:
            hearing._open_denoiser()
        if option.asr is not None:
            hearing._open_recognizer(option.asr)
        needs_segments = hearing._recognizer is not None and not hearing._recognizer.streaming
        wants_agc = option.agc is not None and hearing._recognizer is not None
        if wants_vad or needs_segments or option.eou is not None or wants_agc:
            hearing._open_vad(events=wants_vad)
        if wants_agc:
            hearing._open_agc(option.agc)
        if option.eou is not None:
            hearing._open_eou()
        return hearing

    def _error(self, message: str, sender: Optional[str] = None, code: Optional[int] = None) -> None:
        self._call.error(message, sender=sender or self._sender, code=code)

    def _open_denoiser(self) -> None:
        make = self._services.make_denoiser
        if make is None:
            self._error("denoise not available: install pyrnnoise (denoise is off for this call)")
            return
        try:
            self._denoiser = make(self._leg_rate)
        except Exception as e:
            self._error(f"denoise not available: {e}")

    def _open_vad(self, events: bool) -> None:
        from activecall.speech.vad.segmenter import VadParams

        vad_option = self._option.vad
        kind = ((vad_option.type if vad_option is not None else "silero") or "silero").lower()
        if not events and kind == "nop":
            kind = "silero"  # "no VAD events" still needs utterance bounds for a segment recognizer
        if kind not in ("silero", "webrtc"):
            self._error(f"VAD type not available: {kind}")
            return
        engine = self._services.vad
        if engine is None:
            self._error(f"VAD type not available: {kind} (the offline extra is not installed)")
            return
        params = VadParams.from_option(vad_option) if vad_option is not None else VadParams()
        try:
            self._vad = engine.open(kind, self._vad_rate, params, _VadListener(self))
        except Exception as e:  # the model cannot load here
            self._error(f"VAD type not available: {kind}: {e}")
            return
        self._vad_events = events

    def _open_agc(self, agc: AgcOption) -> None:
        """Gain on what the recognizer hears, adapting while the VAD hears speech (§4.13)."""
        if self._vad is None:
            self._error("agc needs a VAD (agc is off for this call)")
            return
        self._agc = GainController(agc, ASR_RATE_HZ)

    def _open_eou(self) -> None:
        eou = self._option.eou
        assert eou is not None
        kind = (eou.type or "silence").lower()
        if kind != "silence":
            self._error(f"EOU type not available: {kind} (the silence detector is type 'silence')")
            return
        self._eou_ms = min(max(int(eou.timeout or _EOU_DEFAULT_MS), 100), 10_000)

    def _open_recognizer(self, asr: TranscriptionOption) -> None:
        registry = self._services.recognizers
        if registry is None:
            self._error(f"ASR provider not available: {asr.provider}")
            return
        name = asr.provider or registry.default_provider(asr.language) or ""
        try:
            provider = registry.resolve(name)
            # The model travels in each stream's request (every provider reads request.model first);
            # keeping it out of the settings means a client naming models does not build (and, for
            # whisper, load) a recognizer per name.
            recognizer = registry.create(provider, RecognizerSettings(
                endpoint=asr.endpoint, api_key=asr.secret_key, models_dir=self._services.models_dir))
        except UnknownProviderError:
            self._error(f"ASR provider not available: {name}")
            return
        except Exception as e:  # the engine cannot run here (extra missing, no key)
            self._error(f"ASR provider {name} not available: {e}")
            return
        self._asr_option = asr
        self._recognizer = recognizer
        self._provider = provider
        self._open_stream()

    def _open_stream(self) -> None:
        recognizer, asr = self._recognizer, self._asr_option
        assert recognizer is not None and asr is not None
        request = RecognitionRequest(
            language=asr.language, model=asr.model_type, endpoint=asr.endpoint, api_key=asr.secret_key,
            app_id=asr.app_id, secret_id=asr.secret_id, extra=dict(asr.extra or {}), session_id=self._call.sid)
        try:
            self._asr = recognizer.open(request, _AsrListener(self, recognizer))
        except RecognitionError as e:
            self._asr = None
            self._error(f"{self._provider}: {e}", sender=self._provider, code=500)

    # -- the caller's audio (AudioSink) ------------------------------------------------

    def write_frame(self, frame: bytes) -> None:
        if self._closed:
            return
        self.frames += 1
        if self._denoiser is not None:
            frame = self._denoiser.process(frame)
        self._last_write_at = self._call.now()
        self._written_ms += len(frame) * 500 // self._leg_rate
        if self._vad is not None:
            if self._vad_decimate:
                self._vad.write(np.frombuffer(frame, dtype="<i2")[::2].tobytes())
            else:
                self._vad.write(self._to_vad.process(frame) if self._to_vad is not None else frame)
        if self._asr is not None and not self.asr_paused:
            pcm = self._to_asr.process(frame) if self._to_asr is not None else frame
            if self._agc is not None:
                pcm = self._agc.process(pcm, self._speaking)
            self._asr.write(pcm)

    def _at(self, stream_ms: int) -> float:
        """The clock time of a stream time (ms of caller audio since the hearing started)."""
        return self._last_write_at - (self._written_ms - stream_ms) / 1000.0

    # -- VAD results ------------------------------------------------------------------------

    def speech_started(self, start_ms: int) -> None:
        call = self._call
        self._speaking = True
        self._speech_started_ms = start_ms
        self._speech_started_at = self._at(start_ms)
        self._final_since_speech = False
        self._cancel_eou()
        if self._asr is not None and not self.asr_paused:
            self._asr.speech_started(start_ms)
        if self._vad_events:
            call.report(SpeechStarted(call.now(), self._track, self._speech_started_at, self._refer))
        self._maybe_barge_in(by_vad=True, text=None)

    def speech_paused(self, at_ms: int) -> None:
        if self._asr is not None and not self.asr_paused:
            self._asr.speech_paused(at_ms)

    def speech_ended(self, start_ms: int, duration_ms: int) -> None:
        call = self._call
        self._speaking = False
        if self._asr is not None:
            self._asr.speech_ended(start_ms + duration_ms)
            # A streaming recognizer may have finalized before our VAD saw the end.
            self._awaiting_final = not self._final_since_speech
        if self._vad_events:
            # The same start as the speaking event reported, to the millisecond.
            started_at = self._speech_started_at if start_ms == self._speech_started_ms else self._at(start_ms)
            call.report(SpeechEnded(call.now(), self._track, started_at, duration_ms, self._refer))
        self._arm_eou()

    def silence_timeout(self, start_ms: int, duration_ms: int) -> None:
        call = self._call
        if self._vad_events:
            call.report(SilenceLasted(call.now(), self._track, self._at(start_ms), duration_ms, self._refer))

    # -- ASR results --------------------------------------------------------------------------

    def transcript(self, result: Transcript) -> None:
        call = self._call
        now = call.now()
        self._retries = 0
        started = self._at(result.start_ms) if result.start_ms is not None else None
        ended = self._at(result.end_ms) if result.end_ms is not None else None
        is_filler = self.barge_in.is_filler(result.text) if self.barge_in is not None and \
            self.barge_in.option.filler_word_filter else None
        if result.index not in self._reported_indexes:
            self._reported_indexes.add(result.index)
            if len(self._reported_indexes) > 64:
                self._reported_indexes = {i for i in self._reported_indexes if i > result.index - 32}
            if started is not None:
                self._metric(f"ttfb.asr.{self._provider}", now - started, result.index)
        call.report(TranscriptHeard(now, self._track, result.final, result.index, result.text, started, ended,
                                    result.confidence, is_filler, self._refer))
        if result.final:
            self._last_final_at = now
            self._awaiting_final = False
            self._final_since_speech = True
            self._turn_text.append(result.text)
            latency = now - (ended if ended is not None else now)
            self._metric(f"completed.asr.{self._provider}", latency, result.index)
            self._services.observe_provider("asr", self._provider, latency, False)
            if not self._speaking:
                self._arm_eou()
        else:
            self._maybe_barge_in(by_vad=False, text=result.text)

    def _metric(self, key: str, seconds: float, index: int) -> None:
        call = self._call
        ms = max(0, int(seconds * 1000))
        call.report(MetricsMeasured(call.now(), key, ms, {"index": index}))

    def asr_dropped(self, error: RecognitionError) -> None:
        self._services.observe_provider("asr", self._provider, None, True)
        self._error(f"{self._provider}: utterance not recognized: {error}", sender=self._provider, code=500)

    def asr_failed(self, recognizer: IRecognizer, error: RecognitionError) -> None:
        if self._closed or recognizer is not self._recognizer:
            return
        self._asr = None
        self._services.observe_provider("asr", self._provider, None, True)
        self._error(f"{self._provider}: {error}", sender=self._provider, code=500)
        if error.retryable and self._retries < len(_RETRY_DELAYS_S):
            delay = _RETRY_DELAYS_S[self._retries]
            self._retries += 1
            self._retry_timer = self._call.timers.call_later(delay, self._retry)
            return
        self._fall_back()

    def _retry(self) -> None:
        self._retry_timer = None
        if not self._closed and self._asr is None and self._recognizer is not None:
            self._open_stream()

    def _fall_back(self) -> None:
        asr = self._asr_option
        fallback = (asr.extra or {}).get("fallback") if asr is not None else None
        if self._fell_back or not fallback or asr is None:
            self._recognizer = None
            return
        self._fell_back = True
        self._retries = 0
        self._log.info("call {sid}: ASR falls back from {a} to {b}", sid=self._call.sid, a=self._provider, b=fallback)
        extra = {k: v for k, v in (asr.extra or {}).items() if k != "fallback"}
        from dataclasses import replace

        self._recognizer = None
        self._open_recognizer(replace(asr, provider=fallback, endpoint=None, secret_key=None, model_type=None,
                                      extra=extra or None))
        if self._recognizer is not None and not self._recognizer.streaming and self._vad is None:
            self._open_vad(events=False)

    # -- barge-in and end of utterance ------------------------------------------------------------

    def _maybe_barge_in(self, by_vad: bool, text: Optional[str]) -> None:
        policy = self.barge_in
        if policy is None:
            return
        track = self._call.track
        speaking_since = track.agent_speaking_since()
        if speaking_since is None:
            return
        now = self._call.now()
        since_final = (now - self._last_final_at) * 1000 if self._last_final_at is not None else None
        speech_ms = max(0, self._written_ms - self._speech_started_ms)
        if policy.allows(by_vad, text, (now - speaking_since) * 1000, since_final, speech_ms):
            track.barge_in(policy.option.volume_fade_ms or 0)

    def _arm_eou(self) -> None:
        if self._eou_ms is None or self._closed:
            return
        self._cancel_eou()
        self._eou_timer = self._call.timers.call_later(self._eou_ms / 1000.0, self._eou_due, 0.0)

    def _eou_due(self, waited_s: float) -> None:
        self._eou_timer = None
        if self._closed or self._speaking:
            return
        if self._awaiting_final and self._asr is not None and waited_s < _EOU_WAIT_FOR_FINAL_S:
            # The turn's words are still being recognized: end it with them, within a bound.
            self._eou_timer = self._call.timers.call_later(0.1, self._eou_due, waited_s + 0.1)
            return
        call = self._call
        text = " ".join(t for t in self._turn_text if t) or None
        self._turn_text = []
        call.report(TurnEnded(call.now(), self._track, True, text, self._refer))

    def _cancel_eou(self) -> None:
        timer, self._eou_timer = self._eou_timer, None
        if timer is not None:
            self._call.timers.cancel(timer)

    # -- ending -----------------------------------------------------------------------------

    def close(self) -> None:
        """The call ended: stop VAD and ASR; nothing is reported after this."""
        if self._closed:
            return
        self._closed = True
        self._cancel_eou()
        if self._retry_timer is not None:
            self._call.timers.cancel(self._retry_timer)
            self._retry_timer = None
        vad, self._vad = self._vad, None
        if vad is not None:
            vad.close()
        asr, self._asr = self._asr, None
        if asr is not None:
            asr.close()

    @property
    def closed(self) -> bool:
        return self._closed


class _VadListener:
    """VAD results for one hearing; silent once it is closed."""

    __slots__ = ("_h",)

    def __init__(self, hearing: CallHearing) -> None:
        self._h = hearing

    def speech_started(self, start_ms: int) -> None:
        if not self._h.closed:
            self._h.speech_started(start_ms)

    def speech_paused(self, at_ms: int) -> None:
        if not self._h.closed:
            self._h.speech_paused(at_ms)

    def speech_ended(self, start_ms: int, duration_ms: int) -> None:
        if not self._h.closed:
            self._h.speech_ended(start_ms, duration_ms)

    def silence_timeout(self, start_ms: int, duration_ms: int) -> None:
        if not self._h.closed:
            self._h.silence_timeout(start_ms, duration_ms)


@implementer(IRecognitionListener)
class _AsrListener:
    """Results of one recognition stream; a stream replaced by a retry or a fallback is ignored."""

    __slots__ = ("_h", "_recognizer")

    def __init__(self, hearing: CallHearing, recognizer: IRecognizer) -> None:
        self._h = hearing
        self._recognizer = recognizer

    def _current(self) -> bool:
        return not self._h.closed and self._h._recognizer is self._recognizer

    def transcript(self, result: Transcript) -> None:
        if self._current() and result.text.strip():
            self._h.transcript(result)

    def dropped(self, error: RecognitionError) -> None:
        if self._current():
            self._h.asr_dropped(error)

    def failed(self, error: RecognitionError) -> None:
        if self._current():
            self._h.asr_failed(self._recognizer, error)

