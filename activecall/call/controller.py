"""CallController: one per call; the call's state and the typed operations on it.

State of a call::

    idle --dial/answer--> active --hangup / far end ended / inactivity / autoHangup--> ended
      \\____________________________hangup (reject, cancel, kill)___________________/

The controller owns the call's leg (an :class:`~activecall.media.tracks.ILeg`
from an injected dialer or inbound-leg factory; it never asks which kind), the
server-side track (what the agent plays: TTS, files, a transfer bridge), the
caller fan-out (recording, ``subscribe``, a transfer bridge; later VAD and ASR)
and its timers.  It reports what happens as domain events
(:mod:`activecall.call.events`) to its observer; the control layer maps wire
commands to these methods and the events to wire events.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from activecall.call.events import (
    INPUT_EVENTS, CallAnswered, CallDeclined, CallEnded, CallEvent, CallInactive, CallOffered, CustomSent,
    DtmfReceived, ErrorOccurred, HistoryAdded, HoldChanged, InputTimedOut, MediaArrived, MessageReceived,
    PlayInterrupted, RingingReported, TrackEnded, TrackStarted, TransferRequested,
)
from activecall.call.fileplay import load_audio
from activecall.call.playback import FilePlay, SstSource, TtsPlay, split_sentences, strip_emoji
from activecall.call.record import (
    CallRecord, RecordedHangupReason, RecorderFile, build_call_record, hangup_reason_from_name,
)
from activecall.call.recording import CallRecording, recording_file
from activecall.call.recordstore import file_sizes
from activecall.call.services import CallServices, PendingInbound
from activecall.call.transfer import BlindTransfer, BridgedTransfer
from activecall.call.tts import Speech, TtsJob
from activecall.clock import CallClock
from activecall.fileio import UnsafePathError
from activecall.media.tracks import (
    FanOut, IInboundLeg, ILeg, ILegDialer, ILegEvents, LegOptionError, LegRejectedError, LegSetupError,
)
from activecall.options import CallOption, CommandError, ReferOption, SynthesisOption
from activecall.speech.interfaces import UnknownProviderError
from activecall.timefmt import format_rfc3339

_INACTIVITY_CHECK_S = 1.0


class NotAllowedError(Exception):
    """An operation that the call's state does not allow now; the text says why."""


class CallObserver(Protocol):
    """Who hears about a call: its control session."""

    def call_event(self, event: CallEvent) -> None:
        """Something happened on the call."""

    def client_audio(self, data: bytes) -> None:
        """``subscribe``: a tagged frame of call audio for the client (0x00 agent, 0x01 caller)."""

    def call_finished(self) -> None:
        """The call is over."""


class _CallerGate:
    """The sink a leg writes caller audio to: muting, then the call's fan-out."""

    __slots__ = ("muted", "_out")

    def __init__(self, out: FanOut) -> None:
        self.muted = False
        self._out = out

    def write_frame(self, frame: bytes) -> None:
        self._out.write_frame(bytes(len(frame)) if self.muted else frame)


class _ClientMirror:
    """``subscribe``: caller audio mirrored to the control socket."""

    __slots__ = ("_observer",)

    def __init__(self, observer: CallObserver) -> None:
        self._observer = observer

    def write_frame(self, frame: bytes) -> None:
        self._observer.client_audio(b"\x01" + frame)


class CallController:
    """The state of one call and the operations a client, a playbook or an agent runs on it."""

    _log = Logger()

    def __init__(self, sid: str, sst: str, call_type: str, services: CallServices, observer: CallObserver, *,
                 dialers: Mapping[str, ILegDialer], pending: Optional[PendingInbound] = None,
                 dump_path: Optional[str] = None) -> None:
        self.sid = sid
        self.sst = sst
        self.call_type = call_type
        self.services = services
        self.dialers = dialers
        self._observer = observer
        self._pending = pending
        self._dump_path = dump_path
        self._timers = CallClock(services.clock)
        self.option: Optional[CallOption] = None
        self.leg: Optional[ILeg] = None
        self.created_at = services.clock.seconds()
        self.answered_at: Optional[float] = None
        self.ended = False
        self.hangup_reason: Optional[str] = None
        self.on_hold = False
        self.command_seq = 0
        self.caller_audio = FanOut()
        self._gate = _CallerGate(self.caller_audio)
        self._events = _MainLegEvents(self)
        self._agent: Optional[SstSource] = None
        self._mute_agent = False
        self._subscribed = False
        self._speech = Speech(self, services)
        self._wait_input: Any = None
        self._watch_from = self.created_at
        self._inbound: Optional[IInboundLeg] = None
        self._dialing: Optional[Deferred[Any]] = None
        self._dial_started = False
        self._remote_ended = False
        self._transfer: Optional[BridgedTransfer | BlindTransfer] = None
        self._recording: Optional[CallRecording] = None
        self._recorder_closed: Optional[Deferred[None]] = None
        self._recorded_reason: Optional[RecordedHangupReason] = None  # the call record's; the first one set wins
        self._sip_status: Optional[int] = None
        self._ring_s: Optional[float] = None
        self._greeting: Optional[str] = None

    # -- plumbing -------------------------------------------------------

    def now(self) -> float:
        """Seconds on the call's clock."""
        return self.services.clock.seconds()

    @property
    def media_rate_hz(self) -> int:
        """The leg's PCM rate (TTS and files are brought to it)."""
        assert self.leg is not None
        return int(self.leg.media_rate_hz)

    def report(self, event: CallEvent) -> None:
        """Tell the observer; the caller's reaction cancels a pending waitInputTimeout."""
        if self._wait_input is not None and isinstance(event, INPUT_EVENTS):
            self._timers.cancel(self._wait_input)
            self._wait_input = None
        self._observer.call_event(event)

    def error(self, message: str, sender: str = "command", track: Optional[str] = None, code: Optional[int] = None) -> None:
        """Report that something asked of the call could not be done."""
        self.report(ErrorOccurred(self.now(), track or self.sid, sender, message, code))

    @property
    def pending_timers(self) -> int:
        """Timers still scheduled for this call (0 after hangup)."""
        return self._timers.pending

    # -- outbound ---------------------------------------------------------

    def dial(self, option: CallOption, sender: str = "invite") -> Deferred[None]:
        """Place the call's leg (``invite``): trackStart, ringing*, then answer or reject."""
        if self.leg is not None or self.answered_at is not None or self._dial_started:
            raise NotAllowedError("the call is already started")
        if self.option is not None:
            option = option.merged_over(self.option)
        self.option = option
        dialer = self.dialers.get(self.call_type)
        if dialer is None:
            self.error(f"{self.call_type} calls are not supported by this daemon yet", sender="invite")
            self.hangup("failed", "system")
            return succeed(None)
        return Deferred.fromCoroutine(self._dial(dialer, option, sender))

    async def _dial(self, dialer: ILegDialer, option: CallOption, sender: str) -> None:
        try:
            dialing = dialer.dial(option, self.sid, self._on_ringing)
        except LegOptionError as e:
            self.error(str(e), sender="invite")
            self.hangup("failed", "system")
            return
        except LegSetupError as e:
            self.error(f"invite failed: {e}", sender="invite")
            self.hangup("failed", "system")
            return
        self._dialing = dialing
        self._dial_started = True
        self.report(TrackStarted(self.now(), self.sid))
        try:
            leg = await dialing
        except LegRejectedError as e:
            self._dialing = None
            self._sip_status = e.status
            self.report(CallDeclined(self.now(), self.sid, e.reason, e.status, refer=False))
            self.error(f"invite rejected: {e.status} {e.reason}", sender="invite")
            self.hangup("byCallee", "callee")
            return
        except CancelledError:
            return  # hung up while ringing: the dialer sent CANCEL
        except LegSetupError as e:  # the answer does not fit our offer
            self._dialing = None
            self.error(f"invite failed: {e}", sender="invite")
            self.hangup("failed", "system")
            return
        self._dialing = None
        if self.ended:
            leg.close().addErrback(lambda f: None)
            return
        self.leg = leg
        leg.attach(self, self._gate, self._events)
        self._answered()
        self.report(CallAnswered(self.now(), self.sid, leg.answer_sdp, refer=False))
        self._after_answer(option, sender=sender)

    def _on_ringing(self, early_media: bool) -> None:
        if self._ring_s is None:
            self._ring_s = self.now()
        self.report(RingingReported(self.now(), self.sid, early_media, refer=False))

    def _answered(self) -> None:
        if self.call_type == "sip":
            self._sip_status = 200
        self.answered_at = self.now()

    # -- inbound ------------------------------------------------------------

    def answer(self, option: Optional[CallOption], call: Any = None, greeting: Optional[str] = None) -> None:
        """Answer an inbound call: ``call`` handed over by the router (a playbook, greeting spoken
        after mediaReady), or the one waiting for this session's client (``accept``)."""
        if call is None:
            call = self._pending_call(take=True)
            if call is None or self.answered_at is not None:
                self.report(CallDeclined(self.now(), self.sid, "no pending call", 486))
                raise NotAllowedError("no pending inbound call")
            if option is not None and self.option is not None:
                option = option.merged_over(self.option)
            option = option if option is not None else self.option
        self.option = option
        if self._inbound is None and not self._prepare_inbound(call, option, sender="accept"):
            return
        inbound = self._inbound
        assert inbound is not None
        inbound.answer().addErrback(self._inbound_answer_failed)
        self._answered()
        self.report(CallAnswered(self.now(), self.sid, inbound.answer_sdp, refer=False))
        assert option is not None
        self._after_answer(option, sender="accept")
        self._greeting = greeting

    def ring(self, early_media: bool = False, ringtone: Optional[str] = None) -> None:
        """180 Ringing (or 183 with early media) to the waiting caller; a ringtone plays on the early media."""
        call = self._pending_call(take=False)
        if call is None or self.answered_at is not None:
            raise NotAllowedError("no pending inbound call")
        early = early_media or ringtone is not None
        if self._inbound is None and not self._prepare_inbound(call, self.option, sender="ringing"):
            return
        assert self._inbound is not None
        self._inbound.ring(early)
        if self._ring_s is None:
            self._ring_s = self.now()
        if ringtone:
            self.play(ringtone)

    def reject(self, code: int, reason: str) -> None:
        """Decline the waiting inbound call."""
        call = self._pending_call(take=True)
        if call is None or self.answered_at is not None:
            raise NotAllowedError("no pending inbound call")
        inbound = self._inbound
        if inbound is None:
            assert self.services.inbound_legs is not None
            inbound = self.services.inbound_legs.inbound(call, self.option)
        inbound.reject(code, reason)
        self._remote_ended = True
        self._sip_status = code
        self.hangup("rejected", "client")

    def _pending_call(self, take: bool) -> Any:
        """The inbound call this session's id names (a webhook's dialogId), if it still waits."""
        if self._inbound is not None:
            return self._inbound
        pending = self._pending
        if pending is None or self.services.inbound_legs is None:
            return None
        return pending.take(self.sid) if take else pending.get(self.sid)

    def _prepare_inbound(self, call: Any, option: Optional[CallOption], sender: str) -> bool:
        """``incoming``, SDP answer and media, ``trackStart{sid}`` (spec §5.4 steps 3 and 4)."""
        assert self.services.inbound_legs is not None
        inbound = self.services.inbound_legs.inbound(call, option)
        self.report(CallOffered(self.now(), self.sid, inbound.caller, inbound.callee, inbound.offer_sdp,
                                inbound.x_headers or None))
        try:
            inbound.prepare()
        except LegSetupError as e:  # declined with 488 by the leg
            self._remote_ended = True
            self.error(f"media setup failed: {e}", sender=sender)
            self.hangup("failed", "system")
            return False
        self._inbound = inbound
        self.leg = inbound
        inbound.attach(self, self._gate, self._events)
        self.report(TrackStarted(self.now(), self.sid))
        return True

    def _inbound_answer_failed(self, f: Failure) -> None:
        # The caller cancelled before our 200 (487) or never ACKed it (408).
        if not self.ended:
            self._remote_ended = True
            self.hangup("canceled" if f.check(LegRejectedError) and f.value.status == 487 else "failed", "caller")

    def far_end_hung_up(self) -> None:
        """The far end ended the call (BYE, or CANCEL of an inbound call that rings)."""
        self._remote_ended = True
        if self._inbound is not None:
            pending = self._pending
            if pending is not None and self.sid in pending:
                pending.cancelled(self.sid)  # CANCEL after ringing: the user agent already answered 487
            self.hangup("byCaller" if self.answered_at is not None else "canceled", "caller")
        else:
            self.hangup("byCallee", "callee")

    def _after_answer(self, option: CallOption, sender: str) -> None:
        """What every answered leg gets: processors, recording, the inactivity watch, ``subscribe``."""
        assert self.leg is not None
        # subscribe mirrors SIP/WebRTC audio to the socket; /call already carries audio.
        self._subscribed = option.subscribe and not self.leg.audio_on_control_socket
        if self._subscribed:
            self.caller_audio.add(_ClientMirror(self._observer))
        self._report_unavailable_processors(option, sender=sender)
        self._start_recording(option)
        if option.inactivity_timeout:
            self._watch_from = self.now()
            self._timers.call_later(_INACTIVITY_CHECK_S, self._check_inactivity)

    def _report_unavailable_processors(self, option: CallOption, sender: str) -> None:
        # Speech recognition and VAD engines join in later layers; name what this
        # call asked for and cannot get, and keep the rest of the call running.
        if option.asr is not None:
            self.error(f"ASR provider not available: {option.asr.provider}", sender=sender)
        if option.vad is not None and (option.vad.type or "silero") != "nop":
            self.error(f"VAD type not available: {option.vad.type or 'silero'}", sender=sender)
        if option.playbook is not None:
            self.error(f"playbook engine not available: {option.playbook}", sender="playbook")

    def _start_recording(self, option: CallOption) -> None:
        services = self.services
        if services.make_recorder is None or (option.recorder is None and not services.auto_record):
            return
        recorder_file = option.recorder.recorder_file if option.recorder is not None else ""
        try:
            path = recording_file(recorder_file, self.sid, services.recording_path)
        except UnsafePathError:
            # The call goes on unrecorded; nothing is written outside the recording directory.
            self.error(str(CommandError.invalid("option.recorder.recorderFile", "must stay inside the recording directory")),
                       sender="invite")
            return
        try:
            recorder = services.make_recorder(path)
        except (OSError, ValueError) as e:
            self.error(f"cannot record to {path}: {e}", sender="invite")
            return
        self._recording = CallRecording(recorder, path, self.media_rate_hz)
        self.caller_audio.add(self._recording)

    def _check_inactivity(self) -> None:
        assert self.option is not None and self.option.inactivity_timeout
        last = self.leg.last_activity_at if self.leg is not None else None
        idle_s = self.now() - max(last or self._watch_from, self._watch_from)
        if idle_s >= self.option.inactivity_timeout:
            self.report(CallInactive(self.now(), self.sid))
            self.hangup("inactivityTimeout", "system")
            return
        self._timers.call_later(_INACTIVITY_CHECK_S, self._check_inactivity)

    # -- the agent's audio (server-side track) --------------------------------

    @property
    def agent_source(self) -> Optional[SstSource]:
        """What plays on the server-side track now."""
        return self._agent

    def read_frame(self) -> Optional[bytes]:
        """The leg pulls the agent's next frame (the call is its AudioSource)."""
        source = self._agent
        if source is not None and source.finished:
            # Its last frame left on the previous pull: the track ends after its audio.
            self.end_play(source, interrupted=isinstance(source, TtsPlay) and source.stop_after_current)
            source = self._agent
        frame = None
        if source is not None:
            frame = source.read_frame()
            if frame is not None:
                if self._mute_agent:
                    frame = bytes(len(frame))
                if self._subscribed:
                    self._observer.client_audio(b"\x00" + frame)  # subscribe: agent audio on SST
        if self._recording is not None and not self.ended:
            self._recording.agent_frame(frame)
        return frame

    def set_agent_source(self, source: SstSource) -> None:
        """Play ``source`` on the server-side track (what was there must have been cut)."""
        self._agent = source

    def drop_agent_source(self, source: SstSource) -> None:
        """Stop ``source`` without a trackEnd (a transfer bridge whose leg ended)."""
        if self._agent is source:
            self._agent = None
            source.cancel()

    def end_play(self, source: SstSource, interrupted: bool) -> None:
        """Emit the track's trackEnd; a normal end arms autoHangup or waitInputTimeout."""
        if self._agent is source:
            self._agent = None
        source.cancel()
        self.report(TrackEnded(self.now(), self.sst, self.now() - source.started_at, source.ssrc, source.play_id))
        if interrupted or self.ended:
            return
        if source.auto_hangup:
            self.hangup("bySystem", "system")
        elif source.wait_input_timeout_ms:
            self._arm_wait_input(source.wait_input_timeout_ms)

    def _arm_wait_input(self, timeout_ms: int) -> None:
        started = self.now()

        def expired() -> None:
            self._wait_input = None
            self.report(InputTimedOut(self.now(), self.sst, started, timeout_ms))

        self._timers.cancel(self._wait_input)
        self._wait_input = self._timers.call_later(timeout_ms / 1000.0, expired)

    def cut_agent_audio(self) -> None:
        """Stop whatever plays on the server-side track now: ``interruption`` for TTS, then ``trackEnd``."""
        source = self._agent
        if source is None:
            return
        if isinstance(source, TtsPlay):
            self._report_interruption(source)
        self.end_play(source, interrupted=True)

    def _report_interruption(self, play: TtsPlay) -> None:
        subtitle, total_ms, current_ms = play.interruption_info()
        self.report(PlayInterrupted(self.now(), self.sst, play.play_id, subtitle, total_ms, current_ms))

    def interrupt(self, graceful: bool = False) -> None:
        """Stop the agent's audio; ``graceful`` lets the sentence being spoken finish."""
        source = self._agent
        if source is None:
            return
        if isinstance(source, TtsPlay) and graceful and not source.streaming:
            self._report_interruption(source)
            source.cut_after_current()
            return
        self.cut_agent_audio()

    def pause(self, paused: bool) -> None:
        """Pause or resume what plays on the server-side track."""
        if self._agent is None:
            self.error(f"track not found: {self.sst}")
            return
        self._agent.paused = paused

    def mute(self, track: Optional[str], muted: bool) -> None:
        """Mute (or unmute) the agent's track, the caller's, or both (``track`` None)."""
        if track is None:
            self._mute_agent = self._gate.muted = muted
        elif track == self.sst:
            self._mute_agent = muted
        elif track == self.sid:
            self._gate.muted = muted
        else:
            raise NotAllowedError(f"unknown track {track}")

    def _require_leg(self) -> ILeg:
        if self.leg is None:
            raise NotAllowedError("the call is not started")
        return self.leg

    # -- play ------------------------------------------------------------

    def play(self, url: str, play_id: Optional[str] = None, auto_hangup: bool = False,
             wait_input_timeout_ms: Optional[int] = None, offset_ms: Optional[int] = None) -> None:
        """Play an audio file or URL on the server-side track, cutting what played."""
        self._require_leg()
        self.play_file(url, play_id, auto_hangup=auto_hangup, wait_input_timeout_ms=wait_input_timeout_ms,
                       offset_ms=offset_ms)

    def play_file(self, url: str, play_id: Optional[str], loop: bool = False, auto_hangup: bool = False,
                  wait_input_timeout_ms: Optional[int] = None, offset_ms: Optional[int] = None) -> FilePlay:
        """Start a file play (trackStart at once; the audio when loaded)."""
        leg = self._require_leg()
        self.cut_agent_audio()
        play_id = play_id if play_id is not None else url
        source = FilePlay(play_id, self.services.ids.ssrc(), leg.frame_bytes, self.now(), url, loop=loop)
        source.auto_hangup = auto_hangup
        source.wait_input_timeout_ms = wait_input_timeout_ms
        rate = int(leg.media_rate_hz)
        offset_bytes = int(offset_ms or 0) * rate // 1000 * 2
        self.report(TrackStarted(self.now(), self.sst, play_id))
        self.set_agent_source(source)
        d = load_audio(self.services, url, rate)
        source.loader = d

        def loaded(pcm: bytes) -> None:
            source.loader = None
            source.loaded(pcm, offset_bytes)

        def failed(f: Failure) -> None:
            source.loader = None
            if f.check(CancelledError):
                return
            message = f.getErrorMessage() or f.type.__name__
            self._log.info("play of {url} failed: {message}", url=url, message=message)
            if self._agent is source:
                self.error(message, sender=f"filetrack: {url}", track=self.sst)
                source.failed = True
                self.end_play(source, interrupted=True)

        d.addCallbacks(loaded, failed)
        return source

    # -- tts ---------------------------------------------------------------

    def say(self, text: str, *, play_id: Optional[str] = None, option: Optional[SynthesisOption] = None,
            speaker: Optional[str] = None, streaming: bool = False, end_of_stream: bool = False,
            base64_pcm: Optional[bytes] = None, cache_key: Optional[str] = None, auto_hangup: bool = False,
            wait_input_timeout_ms: Optional[int] = None) -> None:
        """Speak ``text`` (or a chunk of streamed text, or ready-made PCM) on the server-side track.

        Chunks with the play id of the TTS play in progress join it; anything else cuts
        what played and starts a new play.
        """
        leg = self._require_leg()
        base = self.option.tts if self.option is not None else None
        if option is not None:
            option = option.merged_over(base) if base is not None else option
        else:
            option = base
        if option is None or not option.provider:
            self.error("TTS type not found: no tts provider in the call or command option")
            return
        try:
            provider = self.services.synthesizers.resolve(option.provider)
        except UnknownProviderError as e:
            self.error(str(e))
            return
        option = option.with_defaults()
        current = self._agent
        if isinstance(current, TtsPlay) and current.play_id == play_id and not current.finished and not current.stop_after_current:
            play = current
        else:
            self.cut_agent_audio()
            rate = int(leg.media_rate_hz)
            play = TtsPlay(play_id, self.services.ids.ssrc(), leg.frame_bytes, self.now(), streaming, rate * 2 / 1000)
            self.report(TrackStarted(self.now(), self.sst, play_id))
            self.set_agent_source(play)
        play.auto_hangup = play.auto_hangup or auto_hangup
        if wait_input_timeout_ms is not None:
            play.wait_input_timeout_ms = wait_input_timeout_ms
        job = TtsJob(provider, option, speaker or option.speaker, cache_key, self.command_seq)
        if base64_pcm is not None and not play.streaming:
            self._speech.queue_pcm(play, base64_pcm, option)
        elif play.streaming:
            play.pending_text += strip_emoji(text)
            sentences, play.pending_text = split_sentences(play.pending_text)
            if end_of_stream and play.pending_text.strip():
                sentences.append(play.pending_text.strip())
                play.pending_text = ""
            for sentence in sentences:
                self._speech.queue_sentence(play, sentence, job, cacheable=False)
        else:
            stripped = strip_emoji(text).strip()
            if stripped:
                self._speech.queue_sentence(play, stripped, job, cacheable=True)
        if end_of_stream:
            play.end_of_stream = True
            play.pending_text = play.pending_text.strip()

    # -- transfer -----------------------------------------------------------

    def transfer(self, callee: str, caller: Optional[str] = None, options: Optional[ReferOption] = None) -> Deferred[None]:
        """``refer``: bridge a new SIP leg on the server-side track, or send a SIP REFER (``sipRefer``)."""
        leg = self.leg
        if self.answered_at is None or leg is None or not leg.can_transfer or "sip" not in self.dialers:
            raise NotAllowedError("the call has no established SIP leg")
        if self._transfer is not None:
            raise NotAllowedError("a transfer is already in progress")
        options = options if options is not None else ReferOption()
        if options.sip_refer:
            blind = BlindTransfer(self)
            self._transfer = blind
            return Deferred.fromCoroutine(blind.run(leg, callee))
        bridged = BridgedTransfer(self, options)
        self._transfer = bridged
        return Deferred.fromCoroutine(bridged.run(callee, caller))

    def transfer_finished(self, transfer: object) -> None:
        """A transfer attempt or bridge is over (its own module reports how)."""
        if self._transfer is transfer:
            self._transfer = None

    def end_transfer(self, reason: str, initiator: str, headers: Optional[Mapping[str, str]] = None) -> None:
        """``hangup`` with ``refer``: end the transfer leg (BYE), then the call unless autoHangup is off."""
        transfer = self._transfer
        if not isinstance(transfer, BridgedTransfer):
            raise NotAllowedError("no transfer leg")
        transfer.end(reason, initiator, send_bye=True, headers=headers)

    def _transfer_progress(self, status: int, text: str) -> None:
        if isinstance(self._transfer, BlindTransfer) and not self.ended:
            self._transfer.progress(status, text)

    # -- conversation -------------------------------------------------------

    def add_history(self, speaker: str, text: str) -> None:
        """A line of conversation history (echoed as addHistory)."""
        self.report(HistoryAdded(self.now(), self.sid, speaker, text))

    def custom(self, sender: Optional[str], data: Any) -> None:
        """A client's custom payload, echoed to every listener."""
        self.report(CustomSent(self.now(), sender, data))

    # -- ending -----------------------------------------------------------

    def hangup(self, reason: str, initiator: str, headers: Optional[Mapping[str, str]] = None,
               recorded_reason: Optional[RecordedHangupReason] = None) -> None:
        """End the call: stop tracks, ``trackEnd{sid}`` and ``hangup{sid}``, close the leg, save the record."""
        if self.ended:
            return
        if recorded_reason is not None and self._recorded_reason is None:
            self._recorded_reason = recorded_reason
        self.cut_agent_audio()
        self.ended = True
        self.hangup_reason = reason
        if self._recorded_reason is None:
            self._recorded_reason = hangup_reason_from_name(reason)
        self._timers.cancel_all()
        if self._recording is not None:
            path = self._recording.path
            self._recorder_closed = self._recording.close()
            self._recorder_closed.addErrback(lambda f: self._log.failure("recording {path} failed", f, path=path))
        now = self.now()
        if self._dialing is not None:
            dialing, self._dialing = self._dialing, None
            dialing.cancel()  # still ringing: CANCEL
        transfer = self._transfer
        if isinstance(transfer, BridgedTransfer):
            transfer.auto_hangup = False
            transfer.end(reason, initiator, send_bye=True)
        self._transfer = None
        pending = self._pending
        if pending is not None and self.sid in pending:
            # The client never answered: a closed socket declines, a hangup terminates.
            if reason == "canceled" and initiator == "client":
                pending.client_disconnected(self.sid)
                self._sip_status = 603
            else:
                pending.reject(self.sid, 487, "Request Terminated")
                self._sip_status = 487
        elif self._inbound is not None and self.answered_at is None and not self._remote_ended:
            self._inbound.reject(487, "Request Terminated")  # after ringing, before accept
            self._remote_ended = True
        leg = self.leg
        if leg is not None or self._dial_started:
            duration_s = now - self.answered_at if self.answered_at is not None else 0.0
            self.report(TrackEnded(now, self.sid, duration_s, leg.ssrc if leg is not None else 0))
        if leg is not None:
            bye_headers = dict(self.option.sip.hangup_headers or {}) if self.option is not None and self.option.sip is not None else {}
            bye_headers.update(headers or {})
            leg.close(bye_headers).addErrback(lambda f: self._log.failure("closing the call's leg failed", f))
        self.caller_audio.clear()
        option = self.option
        self._observer.call_event(CallEnded(
            now, self.sid, reason, initiator, started_at=self.created_at, answered_at=self.answered_at,
            caller=option.caller if option is not None else None,
            callee=option.callee if option is not None else None,
            call_type=self.call_type,
        ))
        self._observer.call_finished()
        if self.services.call_records is not None:
            in_flight = self.services.records_in_flight
            saving = Deferred.fromCoroutine(self._save_record(now))
            in_flight.add(saving)
            saving.addErrback(lambda f: self._log.failure("building the call record of {sid} failed", f, sid=self.sid))
            saving.addBoth(lambda _: in_flight.discard(saving))

    async def _save_record(self, ended_at: float) -> None:
        """One call record per call, however it ended (playbook.md §14), after the recording is complete."""
        services = self.services
        if self._recorder_closed is not None:
            try:
                await self._recorder_closed
            except Exception:
                pass  # logged where the recorder failed; the record lists what exists
        recording_path = self._recording.path if self._recording is not None else None
        paths = [p for p in (recording_path, self._dump_path) if p]
        sizes = await file_sizes(services.run_blocking, paths)
        option = self.option
        inbound = self._inbound
        record = CallRecord(
            call_type=self.call_type,
            call_id=self.sid,
            start_s=self.created_at,
            end_s=ended_at,
            option=option,
            ring_s=self._ring_s,
            answer_s=self.answered_at,
            caller=inbound.caller if inbound is not None else (option.caller if option is not None else None),
            callee=inbound.callee if inbound is not None else (option.callee if option is not None else None),
            sip_status=self._sip_status,
            hangup_reason=self._recorded_reason,
            recorder=[RecorderFile(self.sid, recording_path, sizes.get(recording_path))] if recording_path else (),
            extras={"session_id": self.sid, "call_type": self.call_type.lower(),
                    "start_time": format_rfc3339(self.created_at)},
            dump_event_file=self._dump_path,
            dump_event_file_exists=self._dump_path is not None and sizes.get(self._dump_path) is not None,
        )
        assert services.call_records is not None
        await services.call_records.write(build_call_record(record), self.created_at)

    # -- what the leg reports ---------------------------------------------------

    def _media_ready(self) -> None:
        self.report(MediaArrived(self.now(), self.sid))
        greeting, self._greeting = self._greeting, None
        if greeting and not self.ended:
            # Playbooks speak only once the far end's RTP is recognised (protocol.md §6 item 22).
            self.command_seq += 1
            self.say(greeting, play_id="greeting", end_of_stream=True)

    def _hold(self, on_hold: bool) -> None:
        if on_hold != self.on_hold:
            self.on_hold = on_hold
            self.report(HoldChanged(self.now(), self.sid, on_hold))

    def _leg_ended(self, cause: str) -> None:
        if not self.ended:
            self.far_end_hung_up()


@implementer(ILegEvents)
class _MainLegEvents:
    """What the call's own leg reports, turned into controller calls and events."""

    __slots__ = ("_c",)

    def __init__(self, controller: CallController) -> None:
        self._c = controller

    def media_ready(self) -> None:
        self._c._media_ready()

    def dtmf(self, digit: str) -> None:
        c = self._c
        c.report(DtmfReceived(c.now(), c.sid, digit))

    def hold(self, on_hold: bool) -> None:
        self._c._hold(on_hold)

    def ended(self, cause: str) -> None:
        self._c._leg_ended(cause)

    def message(self, body: str, content_type: Optional[str]) -> None:
        c = self._c
        c.report(MessageReceived(c.now(), c.sid, body, content_type))

    def transfer_requested(self, refer_to: str, referred_by: Optional[str]) -> None:
        c = self._c
        c.report(TransferRequested(c.now(), c.sid, refer_to, referred_by))

    def transfer_progress(self, status: int, text: str) -> None:
        self._c._transfer_progress(status, text)

