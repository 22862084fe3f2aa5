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

from typing import Any, Callable, Mapping, Optional, Protocol

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from activecall.call.ambiance import start_ambiance
from activecall.call.events import (
    INPUT_EVENTS, CallAnswered, CallDeclined, CallEnded, CallEvent, CallInactive, CallOffered, CustomSent,
    DtmfReceived, ErrorOccurred, HistoryAdded, HoldChanged, MediaArrived, MessageReceived, RingingReported,
    TrackEnded, TrackStarted, TransferRequested,
)
from activecall.call.record import (
    CallRecord, RecordedHangupReason, RecorderFile, build_call_record, hangup_reason_from_name,
)
from activecall.call.hearing import CallHearing
from activecall.call.recording import CallRecording, recording_file
from activecall.call.recordstore import file_sizes
from activecall.call.services import CallServices, PendingInbound
from activecall.call.bridge import SessionBridge
from activecall.call.mediapass import MediaPass
from activecall.call.realtime import RealtimeSession
from activecall.call.transfer import BlindTransfer, BridgedTransfer
from activecall.call.track import ServerSideTrack
from activecall.clock import CallClock
from activecall.fileio import UnsafePathError
from activecall.media.tracks import (
    FanOut, IIceLeg, IInboundLeg, ILeg, ILegDialer, ILegEvents, LegOptionError, LegRejectedError, LegSetupError,
)
from activecall.ids import MAX_ID_CHARS
from activecall.options import CallOption, CommandError, RecorderOption, ReferOption, SynthesisOption
from activecall.timefmt import format_rfc3339

_INACTIVITY_CHECK_S = 1.0
#: Trickled candidates kept before the WebRTC leg exists (a browser sends a dozen at most).
MAX_EARLY_ICE_CANDIDATES = 64


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


class CallAgent(Protocol):
    """What drives a call from inside the daemon (a playbook engine): it sees every domain event."""

    def call_event(self, event: CallEvent) -> None:
        """Something happened on the call (after the observer heard it)."""


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
                 dump_path: Optional[str] = None, wait_dump_closed: Optional[Callable[[], object]] = None) -> None:
        self.sid = sid
        self.sst = sst
        self.call_type = call_type
        self.services = services
        self.dialers = dialers
        self._observer = observer
        self._pending = pending
        self._dump_path = dump_path
        # Blocks until the event dump's last line is on disk (its writer is a thread): run off the reactor.
        self._wait_dump_closed = wait_dump_closed
        self.timers = CallClock(services.clock)
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
        self.track = ServerSideTrack(self)
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
        self.rang_at: Optional[float] = None  # first 1xx above 100 (outbound) or our 180/183 (inbound)
        self.hearing: Optional[CallHearing] = None
        # The playbook engine driving this call, if any; it hears every event after the observer.
        self.agent: Optional[CallAgent] = None
        self._media_arrived = False
        self._leg_track_ended = False  # trackEnd{sid} already sent: the leg's media ended first
        self._ice_candidates: list[tuple[str, Optional[str], Optional[int]]] = []  # trickled before the leg
        # The agent's BYE headers (a playbook's rendered sip.hangup_headers); None: the option's.
        self.bye_headers: Optional[dict[str, str]] = None
        # Audio bridges to other calls of this node, by their session id.
        self.bridges: dict[str, SessionBridge] = {}
        self._media_pass: Optional[MediaPass] = None
        self._realtime: Optional[RealtimeSession] = None
        self._ringing_sent = False  # the ringing command prepared the media: accept applies no mediaPass
        services.calls.setdefault(sid, self)

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
        if isinstance(event, INPUT_EVENTS):
            self.track.input_arrived()
        self._observer.call_event(event)
        if self.agent is not None:
            self.agent.call_event(event)

    def error(self, message: str, sender: str = "command", track: Optional[str] = None, code: Optional[int] = None) -> None:
        """Report that something asked of the call could not be done."""
        self.report(ErrorOccurred(self.now(), track or self.sid, sender, message, code))

    @property
    def pending_timers(self) -> int:
        """Timers still scheduled for this call (0 after hangup)."""
        return self.timers.pending

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
        except LegOptionError as e:  # the text is the whole error (WebRTC: "Failed to setup track: ...")
            self._dialing = None
            self.error(str(e), sender="invite")
            self.hangup("failed", "system")
            return
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
        leg.attach(self.track, self._gate, self._events)
        self._answered()
        self.report(CallAnswered(self.now(), self.sid, leg.answer_sdp, refer=False))
        candidates, self._ice_candidates = self._ice_candidates, []
        for candidate in candidates:
            self._apply_ice_candidate(leg, *candidate)
        self._after_answer(option, sender=sender)

    def add_ice_candidate(self, candidate: str, sdp_mid: Optional[str], sdp_mline_index: Optional[int]) -> None:
        """``addIceCandidate`` (trickle ICE, protocol.md §5.2): applied to the WebRTC leg, or kept
        until the leg exists (at most :data:`MAX_EARLY_ICE_CANDIDATES`)."""
        if self.call_type != "webrtc":
            raise NotAllowedError("the call has no WebRTC leg")
        leg = self.leg
        if leg is None:
            if len(self._ice_candidates) >= MAX_EARLY_ICE_CANDIDATES:
                self.error(f"addIceCandidate: more than {MAX_EARLY_ICE_CANDIDATES} candidates before the answer")
                return
            self._ice_candidates.append((candidate, sdp_mid, sdp_mline_index))
            return
        self._apply_ice_candidate(leg, candidate, sdp_mid, sdp_mline_index)

    def _apply_ice_candidate(self, leg: ILeg, candidate: str, sdp_mid: Optional[str],
                             sdp_mline_index: Optional[int]) -> None:
        if not IIceLeg.providedBy(leg):
            self.error("addIceCandidate not allowed: the call has no WebRTC leg")
            return
        try:
            leg.add_ice_candidate(candidate, sdp_mid, sdp_mline_index)
        except ValueError as e:
            self.error(str(CommandError.invalid("candidate", str(e))))

    def _on_ringing(self, early_media: bool) -> None:
        if self.rang_at is None:
            self.rang_at = self.now()
        self.report(RingingReported(self.now(), self.sid, early_media, refer=False))

    def _answered(self) -> None:
        if self.call_type == "sip":
            self._sip_status = 200
        self.answered_at = self.now()

    # -- inbound ------------------------------------------------------------

    def answer(self, option: Optional[CallOption], call: Any = None) -> None:
        """Answer an inbound call: ``call`` handed over by the router (a playbook's), or the one
        waiting for this session's client (``accept``)."""
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

    def ring(self, early_media: bool = False, ringtone: Optional[str] = None,
             recorder: Optional[RecorderOption] = None) -> None:
        """180 Ringing (or 183 with early media) to the waiting caller; a ringtone plays on the early media.
        ``recorder`` starts the call's recording now, so it holds the early media too."""
        call = self._pending_call(take=False)
        if call is None or self.answered_at is not None:
            raise NotAllowedError("no pending inbound call")
        early = early_media or ringtone is not None
        if self._inbound is None and not self._prepare_inbound(call, self.option, sender="ringing"):
            return
        assert self._inbound is not None
        self._inbound.ring(early)
        self._ringing_sent = True
        if self.rang_at is None:
            self.rang_at = self.now()
        if recorder is not None and self._recording is None:
            self._start_recording(CallOption(recorder=recorder), int(self._inbound.media_rate_hz), sender="ringing")
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
                                inbound.custom_headers or None))
        try:
            inbound.prepare()
        except LegSetupError as e:  # declined with 488 by the leg
            self._remote_ended = True
            self.error(f"media setup failed: {e}", sender=sender)
            self.hangup("failed", "system")
            return False
        self._inbound = inbound
        self.leg = inbound
        inbound.attach(self.track, self._gate, self._events)
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
        if option.subscribe and not self.leg.audio_on_control_socket:
            self.caller_audio.add(_ClientMirror(self._observer))
            self.track.mirror = self._observer.client_audio
        if option.realtime is not None:
            # The model hears and answers: no denoise/VAD/AGC/ASR/EOU and no inactivity check of our own.
            self._realtime = RealtimeSession(self, option.realtime)
            self._realtime.start()
        else:
            self._start_hearing(option, sender=sender)
        if self._recording is None:  # else it started at ringing
            self._start_recording(option, self.media_rate_hz, sender="invite")
        self.track.ambiance = start_ambiance(self, option.ambiance)
        if option.media_pass is not None and not self._ringing_sent:
            self._media_pass = MediaPass(self, option.media_pass)
            self._media_pass.start()
        if option.inactivity_timeout and option.realtime is None:
            self._watch_from = self.now()
            self.timers.call_later(_INACTIVITY_CHECK_S, self._check_inactivity)

    def _start_hearing(self, option: CallOption, sender: str) -> None:
        """denoise -> VAD -> ASR on the caller's audio, after mute (a muted caller is not heard)."""
        assert self.leg is not None
        hearing = CallHearing.start(self, option, self.media_rate_hz, sender,
                                    native_rate_hz=int(self.leg.native_rate_hz))
        if hearing is not None:
            self.hearing = hearing
            self.caller_audio.add(hearing)

    def _start_recording(self, option: CallOption, rate_hz: int, sender: str) -> None:
        services = self.services
        if services.make_recorder is None or (option.recorder is None and not services.auto_record):
            return
        recorder_file = option.recorder.recorder_file if option.recorder is not None else ""
        try:
            path = recording_file(recorder_file, self.sid, services.recording_path)
        except UnsafePathError:
            # The call goes on unrecorded; nothing is written outside the recording directory.
            self.error(str(CommandError.invalid("option.recorder.recorderFile", "must stay inside the recording directory")),
                       sender=sender)
            return
        try:
            recorder = services.make_recorder(path)
        except (OSError, ValueError) as e:
            self.error(f"cannot record to {path}: {e}", sender=sender)
            return
        self._recording = CallRecording(recorder, path, rate_hz)
        self.caller_audio.add(self._recording)
        self.track.recording = self._recording

    def _check_inactivity(self) -> None:
        assert self.option is not None and self.option.inactivity_timeout
        last = self.leg.last_activity_at if self.leg is not None else None
        idle_s = self.now() - max(last or self._watch_from, self._watch_from)
        if idle_s >= self.option.inactivity_timeout:
            self.report(CallInactive(self.now(), self.sid))
            self.hangup("inactivityTimeout", "system")
            return
        self.timers.call_later(_INACTIVITY_CHECK_S, self._check_inactivity)

    # -- the agent's audio (server-side track) --------------------------------

    def waits_for_media(self) -> bool:
        """Whether media commands should still wait: an RTP leg whose first packet has not come
        (protocol.md §6 item 22; legs without that signal never wait)."""
        leg = self.leg
        return leg is not None and bool(getattr(leg, "signals_media_ready", False)) and not self._media_arrived

    def agent_uri(self) -> Optional[str]:
        """The agent's side of the call: the called URI of an inbound call, ``option.caller`` of an outbound one."""
        if self._inbound is not None:
            return str(self._inbound.callee)
        return self.option.caller if self.option is not None else None

    def playing_id(self) -> Optional[str]:
        """The play id of what the server-side track plays now."""
        source = self.track.source
        return source.play_id if source is not None else None

    def require_leg(self) -> ILeg:
        """The call's leg; an operation that needs media is not allowed before there is one."""
        if self.leg is None:
            raise NotAllowedError("the call is not started")
        return self.leg

    def play(self, url: str, play_id: Optional[str] = None, auto_hangup: bool = False,
             wait_input_timeout_ms: Optional[int] = None, offset_ms: Optional[int] = None) -> None:
        """Play an audio file or URL on the server-side track, cutting what played."""
        self.require_leg()
        self.track.play_file(url, play_id, auto_hangup=auto_hangup, wait_input_timeout_ms=wait_input_timeout_ms,
                             offset_ms=offset_ms)

    def say(self, text: str, *, play_id: Optional[str] = None, option: Optional[SynthesisOption] = None,
            speaker: Optional[str] = None, streaming: bool = False, end_of_stream: bool = False,
            base64_pcm: Optional[bytes] = None, cache_key: Optional[str] = None, auto_hangup: bool = False,
            wait_input_timeout_ms: Optional[int] = None) -> None:
        """Speak ``text`` (or a chunk of streamed text, or ready-made PCM) on the server-side track."""
        self.require_leg()
        self.track.say(text, play_id=play_id, option=option, speaker=speaker, streaming=streaming,
                       end_of_stream=end_of_stream, base64_pcm=base64_pcm, cache_key=cache_key,
                       auto_hangup=auto_hangup, wait_input_timeout_ms=wait_input_timeout_ms)

    def interrupt(self, graceful: bool = False, fade_out_ms: int = 0) -> None:
        """Stop the agent's audio; ``graceful`` lets the sentence being spoken finish, ``fade_out_ms``
        fades it out instead of cutting it."""
        self.track.interrupt(graceful, fade_out_ms)

    def pause(self, paused: bool) -> None:
        """Pause or resume what plays on the server-side track."""
        self.track.pause(paused)

    def mute(self, track: Optional[str], muted: bool) -> None:
        """Mute (or unmute) the agent's track, the caller's, or both (``track`` None)."""
        if track is None:
            self.track.muted = self._gate.muted = muted
        elif track == self.sst:
            self.track.muted = muted
        elif track == self.sid:
            self._gate.muted = muted
        else:
            raise NotAllowedError(f"unknown track {track}")

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

    def send_message(self, body: str, content_type: str, headers: Optional[Mapping[str, str]] = None,
                     refer: bool = False) -> None:
        """``message``: an in-dialog SIP MESSAGE on the call's leg (or the transfer leg); no event on success."""
        if refer:
            transfer = self._transfer
            if not isinstance(transfer, BridgedTransfer) or transfer.leg is None:
                raise NotAllowedError("no transfer leg")
            leg = transfer.leg
        else:
            leg = self.require_leg()

        def sent(response: Any) -> None:
            if not 200 <= response.status < 300:
                self.error(f"message rejected: {response.status} {response.reason}")

        def failed(f: Failure) -> None:
            if f.check(LegSetupError):
                self.error(f.getErrorMessage())
            elif not self.ended:
                self.error(f"message failed: {f.getErrorMessage()}")

        leg.send_message(body, content_type, headers).addCallbacks(sent, failed)

    # -- conversation -------------------------------------------------------

    def add_history(self, speaker: str, text: str) -> None:
        """A line of conversation history (echoed as addHistory)."""
        self.report(HistoryAdded(self.now(), self.sid, speaker, text))

    def bridge(self, target_sid: str) -> None:
        """``bridge``: patch this call's remote party and ``target_sid``'s both ways (protocol.md §5.8);
        bridging the same pair again replaces the bridge."""
        if target_sid == self.sid:
            self.error("cannot bridge a call to itself")
            return
        target = self.services.calls.get(target_sid)
        if target is None or target.ended or target.leg is None:
            self.error(f"bridge target session not found: {target_sid[:MAX_ID_CHARS]}")
            return
        if self.leg is None or self.ended:
            raise NotAllowedError("the call has no media yet (invite or accept first)")
        old = self.bridges.get(target_sid)
        if old is not None:
            old.stop()
        SessionBridge(self, target)

    def unbridge(self, target_sid: str) -> None:
        """``unbridge``: remove the bridge with ``target_sid`` (from both calls); none is not an error."""
        bridge = self.bridges.get(target_sid)
        if bridge is not None:
            bridge.stop()

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
        self.track.cut()
        if self.track.ambiance is not None:
            self.track.ambiance.stop()
        self.ended = True
        if self.services.calls.get(self.sid) is self:
            del self.services.calls[self.sid]
        for bridge in list(self.bridges.values()):
            bridge.stop()
        if self._media_pass is not None:
            self._media_pass.stop()
        if self._realtime is not None:
            self._realtime.stop()
        if self.hearing is not None:
            self.hearing.close()
        self.hangup_reason = reason
        if self._recorded_reason is None:
            self._recorded_reason = hangup_reason_from_name(reason)
        self.timers.cancel_all()
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
        if (leg is not None or self._dial_started) and not self._leg_track_ended:
            duration_s = now - self.answered_at if self.answered_at is not None else 0.0
            self.report(TrackEnded(now, self.sid, duration_s, leg.ssrc if leg is not None else 0))
        if leg is not None:
            if self.bye_headers is not None:
                bye_headers = dict(self.bye_headers)
            elif self.option is not None and self.option.sip is not None:
                bye_headers = dict(self.option.sip.hangup_headers or {})
            else:
                bye_headers = {}
            bye_headers.update(headers or {})
            leg.close(bye_headers).addErrback(lambda f: self._log.failure("closing the call's leg failed", f))
        self.caller_audio.clear()
        option = self.option
        ended_event = CallEnded(
            now, self.sid, reason, initiator, started_at=self.created_at, answered_at=self.answered_at,
            rang_at=self.rang_at,
            caller=option.caller if option is not None else None,
            callee=option.callee if option is not None else None,
            call_type=self.call_type,
        )
        self._observer.call_event(ended_event)
        if self.agent is not None:
            self.agent.call_event(ended_event)
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
        if self._wait_dump_closed is not None:
            await services.run_blocking(self._wait_dump_closed)
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
            ring_s=self.rang_at,
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
        self._media_arrived = True
        self.report(MediaArrived(self.now(), self.sid))

    def _hold(self, on_hold: bool) -> None:
        if on_hold != self.on_hold:
            self.on_hold = on_hold
            self.report(HoldChanged(self.now(), self.sid, on_hold))

    def _leg_ended(self, cause: str) -> None:
        if not self.ended:
            self.far_end_hung_up()

    def _leg_media_ended(self, cause: str) -> None:
        # A WebRTC peer that failed or closed: trackEnd{sid} now, the session stays (protocol.md §5.2).
        leg = self.leg
        if self.ended or leg is None or self._leg_track_ended:
            return
        self._leg_track_ended = True
        now = self.now()
        duration_s = now - self.answered_at if self.answered_at is not None else 0.0
        self.report(TrackEnded(now, self.sid, duration_s, leg.ssrc))


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
        if isinstance(c._transfer, BridgedTransfer):
            c._transfer.relay_dtmf(digit, to_target=True)

    def hold(self, on_hold: bool) -> None:
        self._c._hold(on_hold)

    def ended(self, cause: str) -> None:
        self._c._leg_ended(cause)

    def media_ended(self, cause: str) -> None:
        self._c._leg_media_ended(cause)

    def message(self, body: str, content_type: Optional[str]) -> None:
        c = self._c
        c.report(MessageReceived(c.now(), c.sid, body, content_type))

    def transfer_requested(self, refer_to: str, referred_by: Optional[str]) -> None:
        c = self._c
        c.report(TransferRequested(c.now(), c.sid, refer_to, referred_by))

    def transfer_progress(self, status: int, text: str) -> None:
        self._c._transfer_progress(status, text)

