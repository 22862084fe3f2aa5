"""CallController: one per call; executes commands and owns the call's tracks and timers.

State of a call::

    idle --invite/start--> active --hangup/close/kill/autoHangup/inactivity--> ended
      \\________________________hangup/close/kill___________________________/

The controller sees its session only through :class:`ISessionOutput` (emit
events, send audio, finish) and everything else through :class:`CallServices`,
so it can be driven in tests by a Clock and fakes.
"""

from __future__ import annotations

import base64 as b64
import binascii
import dataclasses
from typing import Any, Callable, Optional, Protocol

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.legs.websocket import WebSocketLeg
from activecall.legs.sip import InboundSipLeg, OutboundSipLeg, answer_reoffer, outgoing_headers
from activecall.call.record import CallRecord, RecorderFile, build_call_record, hangup_reason_from_command, hangup_reason_from_name
from activecall.call.recordstore import file_sizes
from activecall.legs.rtp import RtpLeg
from activecall.call.playback import BridgeSource, FilePlay, Sentence, SstSource, TtsPlay, split_sentences, strip_emoji
from activecall.call.services import CallServices
from activecall.clock import CallClock
from activecall.control import commands as cmds
from activecall.control import events as ev
from activecall.options import CallOption, CommandError, ReferOption, SipOption, SynthesisOption
from activecall.fileio import UnsafePathError, file_safe_name, path_under_any, safe_join
from activecall.media.mixer import apply_gain
from activecall.media.resample import Resampler
from activecall.metrics import observe_provider
from activecall.call.tts import cache_key, create_synthesizer, synthesis_request
from activecall.sip.useragent import CallRejected
from activecall.speech.interfaces import UnknownProviderError

# Events that count as "the user reacted" and cancel a pending waitInputTimeout.
_INPUT_EVENTS = (ev.SpeakingEvent, ev.DtmfEvent, ev.AsrDeltaEvent, ev.AsrFinalEvent, ev.TrackStartEvent)
_INACTIVITY_CHECK_S = 1.0
# Caller audio that arrives before invite is kept (spec §5.3) but bounded.
_MAX_EARLY_AUDIO_BYTES = 10 * 16000 * 2


RECORDING_RATE_HZ = 16000
_RECORDING_FRAME_BYTES = RECORDING_RATE_HZ // 50 * 2
# Caller audio waiting to be recorded; a client sending faster than real time is trimmed.
_MAX_RECORD_BACKLOG_BYTES = RECORDING_RATE_HZ * 2


def recording_file(recorder_file: str, sid: str, recording_dir: str) -> str:
    """Where a call's WAV goes (playbook.md §15): ``{id}`` → sid, default/relative under the recording dir.

    The result always lies inside ``recording_dir`` (an absolute ``recorderFile`` only when it
    already does); anything else raises :class:`UnsafePathError`.
    """
    sid_name = file_safe_name(sid)
    name = recorder_file.replace("{id}", sid_name) if recorder_file else f"{sid_name}.wav"
    if not name.endswith(".wav"):
        name += ".wav"
    return safe_join(recording_dir, name)


class ISessionOutput(Protocol):
    """What a controller needs from its session."""

    sid: str
    call_type: str
    server_side_track: str
    dump_path: Optional[str]

    def emit(self, event: Any) -> None:
        """Send an event to every listener of the session."""

    def send_audio(self, data: bytes) -> None:
        """Send a Binary frame of agent audio to the client."""

    def finish(self) -> None:
        """The call is over: close the socket and forget the session."""


class CallController:
    """Executes the commands of one call (spec §2) and produces its events (§3)."""

    _log = Logger()

    def __init__(self, session: ISessionOutput, services: CallServices) -> None:
        self._session = session
        self._services = services
        self._timers = CallClock(services.clock)
        self.sid = session.sid
        self.sst = session.server_side_track
        self.option: Optional[CallOption] = None
        self.leg: Any = None  # WebSocketLeg or RtpLeg (ICallLeg)
        self.created_at = services.clock.seconds()
        self.answered_at: Optional[float] = None
        self.ended = False
        self.hangup_reason: Optional[str] = None
        self._sst: Optional[SstSource] = None
        self._ticking = False
        self._mute_agent = False
        self._mute_caller = False
        self._early_audio: list[bytes] = []
        self._early_audio_bytes = 0
        self._wait_input: Any = None
        self._last_caller_audio_at = self.created_at
        self._inactivity_timer: Any = None
        self._cmd_seq = 0
        self.recorder: Any = None
        self._sip_leg: Optional[OutboundSipLeg] = None
        self._inbound: Optional[InboundSipLeg] = None
        self._sip_leg_call: Any = None
        self._pending_invite: Optional[Deferred[Any]] = None
        self._sip_remote_ended = False
        self._hangup_headers: dict[str, str] = {}
        self._recorded_reason: Any = None  # the call record's hangupReason; the first one set wins
        self._sip_status: Optional[int] = None
        self._ring_s: Optional[float] = None
        self._recorder_closed: Optional[Deferred[None]] = None
        self._sdp_version = 1
        self._greeting: Optional[str] = None
        self._transfer: Optional[OutboundSipLeg] = None
        self._transfer_leg: Any = None
        self._transfer_auto_hangup = True
        self._transfer_answered_at: Optional[float] = None
        self._blind_refer = False
        self._subscribed = False
        self.on_hold = False
        self.recording_path: Optional[str] = None
        self._caller_to_rec: Optional[Resampler] = None
        self._agent_to_rec: Optional[Resampler] = None
        self._caller_rec = bytearray()

    # -- plumbing -------------------------------------------------------

    def now_ms(self) -> int:
        """Current time in ms since the epoch (on the injected clock)."""
        return int(self._services.clock.seconds() * 1000)

    def emit(self, event: Any) -> None:
        """Emit an event; user input cancels a pending waitInputTimeout."""
        if self._wait_input is not None and isinstance(event, _INPUT_EVENTS):
            self._timers.cancel(self._wait_input)
            self._wait_input = None
        self._session.emit(event)

    def error(self, message: str, sender: str = "command", track_id: Optional[str] = None, code: Optional[int] = None) -> None:
        """Emit an ``error`` event."""
        self.emit(ev.ErrorEvent(track_id=track_id or self.sid, timestamp=self.now_ms(), sender=sender, error=message, code=code))

    def execute(self, command: Any) -> Optional[Deferred[Any]]:
        """Run one command; a returned Deferred blocks the session's queue until it fires."""
        if self.ended:
            return None
        self._cmd_seq += 1
        handler: Callable[[Any], Optional[Deferred[Any]]] = getattr(self, "_cmd_" + type(command).name.lower())
        return handler(command)

    # -- call setup -----------------------------------------------------

    def _cmd_invite(self, cmd: Any) -> Optional[Deferred[None]]:
        if self.leg is not None or self.answered_at is not None or self._sip_leg is not None:
            self.error(f"{type(cmd).name} not allowed: the call is already started")
            return None
        option: CallOption = cmd.option
        if self.option is not None:
            option = option.merged_over(self.option)
        self.option = option
        if self._session.call_type == "sip" and self._services.sip is not None:
            return Deferred.fromCoroutine(self._invite_sip(cmd, option))
        if self._session.call_type != "webSocket":
            # WebRTC legs are built by their own layer; until it is wired in, say so
            # instead of pretending the call connected.
            self.error(f"{self._session.call_type} calls are not supported by this daemon yet", sender="invite")
            self.hangup("failed", "system")
            return None
        self.leg = WebSocketLeg(option.codec, option.sample_rate, self._services.ids.ssrc(), self._session.send_audio)
        self.emit(ev.TrackStartEvent(track_id=self.sid, timestamp=self.now_ms()))
        self.answered_at = self._services.clock.seconds()
        self.emit(ev.AnswerEvent(track_id=self.sid, timestamp=self.now_ms(), sdp="", refer=False))
        self._after_answer(option, sender=type(cmd).name)
        early, self._early_audio = self._early_audio, []
        self._early_audio_bytes = 0
        for chunk in early:
            self.caller_audio(chunk)
        return None

    _cmd_start = _cmd_invite

    async def _invite_sip(self, cmd: Any, option: CallOption) -> None:
        """Outbound SIP (protocol.md §5.1): trackStart, INVITE, ringing*, then answer or reject."""
        if not option.callee:
            self.error("missing field invite.option.callee", sender="invite")
            self.hangup("failed", "system")
            return
        leg = OutboundSipLeg(self._services.sip, option, self.sid, self._services.ids, self._services.clock)
        self._sip_leg = leg
        try:
            invite = leg.start(self._on_provisional)
        except Exception as e:  # bad URI, no ports, no listener for the transport
            leg.release()
            self._sip_leg = None
            self.error(f"invite failed: {e}", sender="invite")
            self.hangup("failed", "system")
            return
        self._pending_invite = invite
        self.emit(ev.TrackStartEvent(track_id=self.sid, timestamp=self.now_ms()))
        try:
            call = await invite
        except CallRejected as e:
            self._pending_invite = None
            self._sip_status = e.status
            leg.release()
            self.emit(ev.RejectEvent(track_id=self.sid, timestamp=self.now_ms(), reason=e.reason, code=e.status, refer=False))
            self.error(f"invite rejected: {e.status} {e.reason}", sender="invite")
            self.hangup("byCallee", "callee")
            return
        except CancelledError:
            leg.release()  # hangup while ringing: the UA sent CANCEL
            return
        self._pending_invite = None
        if self.ended:
            call.bye()
            leg.release()
            return
        try:
            self.leg = leg.on_answer(call, on_audio=self._caller_pcm, on_dtmf=self._on_dtmf, on_media_ready=self._on_media_ready)
        except ValueError as e:  # the answer's SDP does not fit our offer
            self.error(f"invite failed: {e}", sender="invite")
            leg.release()
            call.bye()
            self.hangup("failed", "system")
            return
        call.listener = _SipListener(self)
        self._sip_status = 200
        self.answered_at = self._services.clock.seconds()
        self.emit(ev.AnswerEvent(track_id=self.sid, timestamp=self.now_ms(), sdp=call.remote_sdp.decode("utf-8", "replace"), refer=False))
        self._after_answer(option, sender=type(cmd).name)

    def reoffer(self, sdp: bytes) -> Optional[bytes]:
        """A re-INVITE/UPDATE offer on an answered SIP leg: renegotiate in place."""
        media = self._services.sip
        leg_owner = self._inbound if self._inbound is not None else self._sip_leg
        if media is None or leg_owner is None or self.leg is None or self.answered_at is None:
            return None
        self._sdp_version += 1
        try:
            answer = answer_reoffer(media, self.leg, sdp, leg_owner.sdp_session_id, self._sdp_version, self._services.ids)
        except ValueError as e:
            self._log.info("re-offer on {sid} not accepted: {e}", sid=self.sid, e=e)
            return None
        return answer.encode()

    def _on_provisional(self, response: Any) -> None:
        if response.status > 100:
            if self._ring_s is None:
                self._ring_s = self._services.clock.seconds()
            self.emit(ev.RingingEvent(track_id=self.sid, timestamp=self.now_ms(), early_media=bool(response.body), refer=False))

    def _on_dtmf(self, digit: str) -> None:
        self.emit(ev.DtmfEvent(track_id=self.sid, timestamp=self.now_ms(), digit=digit))

    def _on_media_ready(self) -> None:
        self.emit(ev.MediaReadyEvent(track_id=self.sid, timestamp=self.now_ms()))
        greeting, self._greeting = self._greeting, None
        if greeting and not self.ended:
            # Playbooks speak only once the far end's RTP is recognised (protocol.md §6 item 22).
            self.execute(cmds.TtsCommand(text=greeting, play_id="greeting", end_of_stream=True))

    def remote_hangup(self, inbound: bool = False) -> None:
        """The far end sent BYE (or CANCEL on an inbound call that rings)."""
        self._sip_remote_ended = True
        pending = self._services.pending
        if inbound and pending is not None and self.sid in pending:
            pending.cancelled(self.sid)  # CANCEL after ringing: the user agent already answered 487
        if inbound:
            self.hangup("byCaller" if self.answered_at is not None else "canceled", "caller")
        else:
            self.hangup("byCallee", "callee")

    def _start_recording(self, option: CallOption) -> None:
        services = self._services
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
            self.recorder = services.make_recorder(path)
        except (OSError, ValueError) as e:
            self.error(f"cannot record to {path}: {e}", sender="invite")
            return
        self.recording_path = path
        assert self.leg is not None
        if self.leg.media_rate_hz != RECORDING_RATE_HZ:
            self._caller_to_rec = Resampler(self.leg.media_rate_hz, RECORDING_RATE_HZ)
            self._agent_to_rec = Resampler(self.leg.media_rate_hz, RECORDING_RATE_HZ)
        self._ensure_ticking()

    def _after_answer(self, option: CallOption, sender: str) -> None:
        """What every answered leg gets: processors, recording, the inactivity watch, ``subscribe``."""
        # subscribe mirrors SIP/WebRTC audio (16 kHz) to the socket; /call already carries audio.
        self._subscribed = option.subscribe and self._session.call_type != "webSocket"
        self._report_unavailable_processors(option, sender=sender)
        self._start_recording(option)
        if option.inactivity_timeout:
            self._last_caller_audio_at = self._services.clock.seconds()
            self._inactivity_timer = self._timers.call_later(_INACTIVITY_CHECK_S, self._check_inactivity)

    def _report_unavailable_processors(self, option: CallOption, sender: str) -> None:
        # Speech recognition and VAD engines join in later layers; name what this
        # call asked for and cannot get, and keep the rest of the call running.
        if option.asr is not None:
            self.error(f"ASR provider not available: {option.asr.provider}", sender=sender)
        if option.vad is not None and (option.vad.type or "silero") != "nop":
            self.error(f"VAD type not available: {option.vad.type or 'silero'}", sender=sender)
        if option.playbook is not None:
            self.error(f"playbook engine not available: {option.playbook}", sender="playbook")

    def _pending_call(self, take: bool) -> Any:
        """The inbound call this session's id names (a webhook's dialogId), if it still waits."""
        pending = self._services.pending
        if self._inbound is not None:
            return self._inbound.call
        if pending is None or self._session.call_type != "sip" or self._services.sip is None:
            return None
        return pending.take(self.sid) if take else pending.get(self.sid)

    def _no_pending(self, cmd: Any) -> None:
        self.error(f"{type(cmd).name} not allowed: no pending inbound call")

    def _cmd_accept(self, cmd: Any) -> None:
        call = self._pending_call(take=True)
        if call is None or self.answered_at is not None:
            self.emit(ev.RejectEvent(track_id=self.sid, timestamp=self.now_ms(), reason="no pending call", code=486))
            self._no_pending(cmd)
            return
        option = cmd.option.merged_over(self.option) if self.option is not None else cmd.option
        self.option = option
        if self._inbound is None and not self._prepare_inbound(call, option, sender="accept"):
            return
        assert self._inbound is not None
        answered = call.answer(self._inbound.answer_sdp)
        answered.addErrback(self._inbound_answer_failed)
        call.listener = _SipListener(self, inbound=True)
        self._sip_status = 200
        self.answered_at = self._services.clock.seconds()
        self.emit(ev.AnswerEvent(track_id=self.sid, timestamp=self.now_ms(), sdp=self._inbound.answer_sdp, refer=False))
        self._after_answer(option, sender="accept")

    def answer_with_playbook(self, call: Any, option: CallOption, greeting: Optional[str]) -> None:
        """A playbook-routed inbound call (config.md §5): answer at once; speak the greeting after mediaReady.

        The conversation engine drives such calls in a later layer; until then the
        call waits for commands (``POST /command/{id}``) after its greeting.
        """
        self.option = option
        if not self._prepare_inbound(call, option, sender="accept"):
            return
        assert self._inbound is not None
        call.answer(self._inbound.answer_sdp).addErrback(self._inbound_answer_failed)
        call.listener = _SipListener(self, inbound=True)
        self._sip_status = 200
        self.answered_at = self._services.clock.seconds()
        self.emit(ev.AnswerEvent(track_id=self.sid, timestamp=self.now_ms(), sdp=self._inbound.answer_sdp, refer=False))
        self._after_answer(option, sender="accept")
        self._greeting = greeting

    def _inbound_answer_failed(self, f: Failure) -> None:
        # The caller cancelled before our 200 (487) or never ACKed it (408).
        if not self.ended:
            self._sip_remote_ended = True
            self.hangup("canceled" if f.check(CallRejected) and f.value.status == 487 else "failed", "caller")

    def _prepare_inbound(self, call: Any, option: Optional[CallOption], sender: str) -> bool:
        """``incoming``, SDP answer and RTP leg, ``trackStart{sid}`` (spec §5.4 step 3/4)."""
        headers = {name: value for name, value in call.request.headers.items() if name.lower().startswith("x-")}
        self.emit(ev.IncomingEvent(track_id=self.sid, timestamp=self.now_ms(), caller=call.caller, callee=call.callee,
                                   sdp=call.remote_sdp.decode("utf-8", "replace"), headers=headers or None))
        inbound = InboundSipLeg(self._services.sip, call, option, self._services.ids, self._services.clock)
        try:
            self.leg = inbound.prepare(on_audio=self._caller_pcm, on_dtmf=self._on_dtmf, on_media_ready=self._on_media_ready)
        except Exception as e:  # no acceptable codec / bad offer / no RTP ports
            call.reject(488, "Not Acceptable Here")
            self._sip_remote_ended = True
            self.error(f"media setup failed: {e}", sender=sender)
            self.hangup("failed", "system")
            return False
        self._inbound = inbound
        self._sip_leg_call = call
        call.listener = _SipListener(self, inbound=True)
        self.emit(ev.TrackStartEvent(track_id=self.sid, timestamp=self.now_ms()))
        return True

    def _cmd_reject(self, cmd: Any) -> None:
        call = self._pending_call(take=True)
        if call is None or self.answered_at is not None:
            self._no_pending(cmd)
            return
        call.reject(cmd.code, cmd.reason)
        self._sip_remote_ended = True
        self._sip_status = cmd.code
        self.hangup("rejected", "client")

    def _cmd_ringing(self, cmd: Any) -> None:
        call = self._pending_call(take=False)
        if call is None or self.answered_at is not None:
            self._no_pending(cmd)
            return
        early = cmd.early_media or cmd.ringtone is not None
        if self._inbound is None and not self._prepare_inbound(call, self.option, sender="ringing"):
            return
        assert self._inbound is not None
        call.ringing(self._inbound.answer_sdp if early else None)
        if self._ring_s is None:
            self._ring_s = self._services.clock.seconds()
        if cmd.ringtone:
            self._cmd_play(cmds.PlayCommand(url=cmd.ringtone))

    def _cmd_refer(self, cmd: Any) -> Optional[Deferred[None]]:
        media = self._services.sip
        if media is None or self.answered_at is None or not isinstance(self.leg, RtpLeg):
            self.error("refer not allowed: the call has no established SIP leg")
            return None
        if self._transfer is not None or self._blind_refer:
            self.error("refer not allowed: a transfer is already in progress")
            return None
        if cmd.options is not None and cmd.options.sip_refer:
            return Deferred.fromCoroutine(self._blind_transfer(cmd))
        return Deferred.fromCoroutine(self._refer(cmd, media))

    async def _blind_transfer(self, cmd: Any) -> None:
        """``options.sipRefer``: send SIP REFER to the remote party (RFC 3515); its NOTIFYs report the outcome.

        A final ``SIP/2.0 2xx`` sipfrag completes the transfer and the call is hung up (reason byRefer);
        a failure is an ``error`` event and the call goes on.
        """
        call = self._inbound.call if self._inbound is not None else (self._sip_leg.call if self._sip_leg is not None else None)
        target = cmd.callee if cmd.callee.startswith(("sip:", "sips:", "tel:")) else "sip:" + cmd.callee
        self._blind_refer = True
        try:
            response = await call.refer(target)
        except Exception as e:
            self._blind_refer = False
            self.error(f"refer failed: {e}")
            return
        if not 200 <= response.status < 300:
            self._blind_refer = False
            self.error(f"refer rejected: {response.status} {response.reason}")

    def transfer_progress(self, request: Any) -> None:
        """A NOTIFY of our REFER: the sipfrag's status line tells how the transfer went."""
        if not self._blind_refer or self.ended:
            return
        line = request.body.decode("utf-8", "replace").strip().splitlines()[:1]
        parts = line[0].split(None, 2) if line else []
        # A status code is three ASCII digits ('²'.isdigit() is true, int('²') raises).
        if len(parts) < 2 or len(parts[1]) != 3 or not (parts[1].isascii() and parts[1].isdigit()):
            return
        status = int(parts[1])
        if 200 <= status < 300:
            self._blind_refer = False
            self.hangup("byRefer", "system")
        elif status >= 300:
            self._blind_refer = False
            self.error(f"refer failed: the transfer target answered {' '.join(parts[1:])}")

    async def _refer(self, cmd: Any, media: Any) -> None:
        """Transfer by bridging a new outbound leg on SST (protocol.md §5.5)."""
        options = cmd.options if cmd.options is not None else ReferOption()
        self._cut_sst()
        moh: Optional[FilePlay] = None
        if options.moh:
            self._cmd_play(cmds.PlayCommand(url=options.moh))
            moh = self._sst if isinstance(self._sst, FilePlay) else None
            if moh is not None:
                moh.loop = True
        else:
            self.emit(ev.TrackStartEvent(track_id=self.sst, timestamp=self.now_ms()))
        original = self.option
        headers = dict(options.sip.headers or {}) if options.sip is not None else {}
        if original is not None and original.callee:
            headers.setdefault("X-Referred-To", original.callee)
        if original is not None and original.caller:
            headers.setdefault("X-Referred-From", original.caller)
        headers["X-Referred-Id"] = self.sid
        sip = options.sip if options.sip is not None else SipOption()
        sip = dataclasses.replace(sip, headers=headers)
        caller = cmd.caller or (original.caller if original is not None else None)
        option = CallOption(caller=caller or None, callee=cmd.callee, sip=sip)
        call_id = options.call_id or f"ref-{self._services.ids.bits(32)}-{self.sid}"
        transfer = OutboundSipLeg(media, option, call_id, self._services.ids, self._services.clock)
        self._transfer = transfer

        def ringing(response: Any) -> None:
            if response.status > 100:
                self.emit(ev.RingingEvent(track_id=self.sst, timestamp=self.now_ms(), early_media=bool(response.body), refer=True))

        try:
            invite = transfer.start(ringing)
        except Exception as e:
            self._transfer = None
            self.error(f"refer failed: {e}")
            return
        invite.addTimeout(options.timeout, self._services.clock)
        try:
            call = await invite
        except (CallRejected, CancelledError, TimeoutError) as e:
            transfer.release()
            self._transfer = None
            if moh is not None and self._sst is moh:
                self._end_sst(moh, interrupted=True)
            if isinstance(e, CallRejected):
                self.emit(ev.RejectEvent(track_id=self.sst, timestamp=self.now_ms(), reason=e.reason, code=e.status, refer=True))
                self.error(f"refer rejected: {e.status} {e.reason}")
            elif not self.ended:
                self.emit(ev.RejectEvent(track_id=self.sst, timestamp=self.now_ms(), reason="Timeout when refer", code=408, refer=True))
                self.error("refer sip track creation timed out")
            return
        if self.ended:
            call.bye()
            transfer.release()
            return
        if moh is not None and self._sst is moh:
            self._end_sst(moh, interrupted=True)
        bridge = BridgeSource(self._services.ids.ssrc(), self.leg.frame_bytes, self._services.clock.seconds())
        if options.moh:
            self.emit(ev.TrackStartEvent(track_id=self.sst, timestamp=self.now_ms()))
        try:
            self._transfer_leg = transfer.on_answer(
                call, on_audio=bridge.push,
                on_dtmf=lambda digit: self.emit(ev.DtmfEvent(track_id=self.sst, timestamp=self.now_ms(), digit=digit, refer=True)),
                on_media_ready=lambda: self.emit(ev.MediaReadyEvent(track_id=self.sst, timestamp=self.now_ms())))
        except ValueError as e:
            call.bye()
            transfer.release()
            self._transfer = None
            self.error(f"refer failed: {e}")
            return
        self._transfer_auto_hangup = options.auto_hangup
        self._transfer_answered_at = self._services.clock.seconds()
        call.listener = _TransferListener(self)
        self._set_sst(bridge)
        self.emit(ev.AnswerEvent(track_id=self.sst, timestamp=self.now_ms(), sdp=call.remote_sdp.decode("utf-8", "replace"), refer=True))

    def end_transfer(self, reason: str, initiator: str, send_bye: bool, headers: Optional[dict[str, str]] = None) -> None:
        """The transfer leg ended: trackEnd{SST}, hangup{SST, refer}, then autoHangup the call (byRefer)."""
        transfer, leg = self._transfer, self._transfer_leg
        if transfer is None:
            return
        self._transfer = self._transfer_leg = None
        if send_bye and transfer.call is not None and not transfer.call.terminated:
            transfer.call.bye(headers=outgoing_headers(headers)).addErrback(lambda f: None)
        if isinstance(self._sst, BridgeSource):
            source = self._sst
            self._sst = None
            source.cancel()
        now = self._services.clock.seconds()
        started = self._transfer_answered_at or now
        self.emit(ev.TrackEndEvent(track_id=self.sst, timestamp=self.now_ms(), duration=int((now - started) * 1000),
                                   ssrc=leg.ssrc if leg is not None else 0))
        self.emit(ev.HangupEvent(track_id=self.sst, timestamp=self.now_ms(), reason=reason, initiator=initiator,
                                 start_time=ev.format_rfc3339(started), hangup_time=ev.format_rfc3339(now), refer=True))
        if leg is not None:
            leg.close().addErrback(lambda f: None)
        if self._transfer_auto_hangup and not self.ended:
            self.hangup("byRefer", "system")

    def _cmd_message(self, cmd: Any) -> None:
        self.error("message command is only supported for SIP calls")

    def _cmd_addicecandidate(self, cmd: Any) -> None:
        self.error("addIceCandidate not allowed: the call has no WebRTC leg")

    def _cmd_bridge(self, cmd: Any) -> None:
        self.error(f"bridge target session not found: {cmd.target_session_id}")

    def _cmd_unbridge(self, cmd: Any) -> None:
        """No bridge exists on this call, which is not an error (spec §2.2)."""

    def _cmd_history(self, cmd: Any) -> None:
        self.emit(ev.AddHistoryEvent(sender=self.sid, timestamp=self.now_ms(), speaker=cmd.speaker, text=cmd.text))

    def _cmd_custom(self, cmd: Any) -> None:
        self.emit(ev.CustomEvent(timestamp=self.now_ms(), sender=cmd.sender, data=cmd.data))

    # -- caller audio ---------------------------------------------------

    def caller_audio(self, payload: bytes) -> None:
        """A Binary frame of caller audio arrived on /call."""
        if self.ended:
            return
        if self.leg is None:
            if self._early_audio_bytes + len(payload) <= _MAX_EARLY_AUDIO_BYTES:
                self._early_audio.append(payload)
                self._early_audio_bytes += len(payload)
            return
        self._last_caller_audio_at = self._services.clock.seconds()
        self._caller_pcm(self.leg.decode_caller_audio(payload))

    def _caller_pcm(self, pcm: bytes) -> None:
        """Decoded caller audio at the leg's media rate (any length)."""
        if self._mute_caller:
            pcm = bytes(len(pcm))
        if self._transfer_leg is not None:
            self._transfer_leg.send_agent_audio(pcm)  # bridged: the caller talks to the transfer target
        if self._subscribed:
            self._session.send_audio(b"\x01" + pcm)  # subscribe: the remote leg's audio (16 kHz)
        if self.recorder is not None:
            if self._caller_to_rec is not None:
                pcm = self._caller_to_rec.process(pcm)
            self._caller_rec += pcm
            excess = len(self._caller_rec) - _MAX_RECORD_BACKLOG_BYTES
            if excess > 0:
                del self._caller_rec[: excess + (excess & 1)]
        # Speech processors (VAD/ASR) attach here in later layers.

    def _check_inactivity(self) -> None:
        assert self.option is not None and self.option.inactivity_timeout
        # RTP legs hand over a frame every tick (silence included): ask when a packet last came.
        last = getattr(self.leg, "last_packet_at", None) or self._last_caller_audio_at
        idle_s = self._services.clock.seconds() - max(last, self._last_caller_audio_at)
        if idle_s >= self.option.inactivity_timeout:
            self.emit(ev.InactivityEvent(track_id=self.sid, timestamp=self.now_ms()))
            self.hangup("inactivityTimeout", "system")
            return
        self._inactivity_timer = self._timers.call_later(_INACTIVITY_CHECK_S, self._check_inactivity)

    # -- agent audio on SST ---------------------------------------------

    def _require_leg(self, cmd: Any) -> bool:
        if self.leg is None:
            self.error(f"{type(cmd).name} not allowed: the call is not started")
            return False
        return True

    def _set_sst(self, source: SstSource) -> None:
        self._sst = source
        self._ensure_ticking()

    def _ensure_ticking(self) -> None:
        if not self._ticking:
            self._ticking = True
            self._services.media_clock.subscribe(self)

    def _stop_ticking(self) -> None:
        if self._ticking:
            self._ticking = False
            self._services.media_clock.unsubscribe(self)

    def media_tick(self, frames: int) -> None:
        """Called by the process-wide media clock: send (and record) ``frames`` frames of SST audio."""
        for _ in range(frames):
            frame = self._next_agent_frame()
            if self.recorder is not None:
                self._record(frame)
            elif frame is None:
                break
        if self._sst is None and self.recorder is None:
            self._stop_ticking()

    def _next_agent_frame(self) -> Optional[bytes]:
        source = self._sst
        if source is None:
            return None
        frame = source.read_frame()
        if frame is not None and self.leg is not None:
            if self._mute_agent:
                frame = bytes(len(frame))
            self.leg.send_agent_audio(frame)
            if self._subscribed:
                self._session.send_audio(b"\x00" + frame)  # subscribe: agent audio on SST
        if source.finished:
            self._end_sst(source, interrupted=isinstance(source, TtsPlay) and source.stop_after_current)
        return frame

    def _record(self, agent_frame: Optional[bytes]) -> None:
        """One 20 ms stereo frame: caller left, agent right, at 16 kHz."""
        n = _RECORDING_FRAME_BYTES
        if agent_frame is None:
            right = bytes(n)
        elif self._agent_to_rec is not None:
            right = self._agent_to_rec.process(agent_frame)
        else:
            right = agent_frame
        left = bytes(self._caller_rec[:n])
        del self._caller_rec[:n]
        if len(left) < n:
            left += bytes(n - len(left))  # the caller sent less than real time: silence
        self.recorder.write(left, right)

    def _end_sst(self, source: SstSource, interrupted: bool) -> None:
        """Emit the track's trackEnd; a normal end arms autoHangup or waitInputTimeout."""
        if self._sst is source:
            self._sst = None
        source.cancel()
        duration_ms = int((self._services.clock.seconds() - source.started_at) * 1000)
        self.emit(ev.TrackEndEvent(track_id=self.sst, timestamp=self.now_ms(), duration=max(0, duration_ms), ssrc=source.ssrc, play_id=source.play_id))
        if interrupted or self.ended:
            return
        if source.auto_hangup:
            self.hangup("bySystem", "system")
        elif source.wait_input_timeout_ms:
            self._arm_wait_input(source.wait_input_timeout_ms)

    def _arm_wait_input(self, timeout_ms: int) -> None:
        started_ms = self.now_ms()

        def expired() -> None:
            self._wait_input = None
            self.emit(ev.SilenceEvent(track_id=self.sst, timestamp=self.now_ms(), start_time=started_ms, duration=timeout_ms, refer=False))

        self._timers.cancel(self._wait_input)
        self._wait_input = self._timers.call_later(timeout_ms / 1000.0, expired)

    def _cut_sst(self) -> None:
        """Stop whatever plays on SST now: ``interruption`` for TTS, then ``trackEnd``."""
        source = self._sst
        if source is None:
            return
        if isinstance(source, TtsPlay):
            self._emit_interruption(source)
        self._end_sst(source, interrupted=True)

    def _emit_interruption(self, play: TtsPlay) -> None:
        subtitle, total_ms, current_ms = play.interruption_info()
        self.emit(ev.InterruptionEvent(
            track_id=self.sst, timestamp=self.now_ms(), play_id=play.play_id, subtitle=subtitle,
            total_duration=total_ms, current=current_ms,
        ))

    def _cmd_interrupt(self, cmd: Any) -> None:
        source = self._sst
        if source is None:
            return
        if isinstance(source, TtsPlay) and cmd.graceful and not source.streaming:
            self._emit_interruption(source)
            source.cut_after_current()
            return
        self._cut_sst()

    def _cmd_pause(self, cmd: Any) -> None:
        self._set_paused(True)

    def _cmd_resume(self, cmd: Any) -> None:
        self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        if self._sst is None:
            self.error(f"track not found: {self.sst}")
            return
        self._sst.paused = paused

    def _cmd_mute(self, cmd: Any) -> None:
        self._set_mute(cmd, True)

    def _cmd_unmute(self, cmd: Any) -> None:
        self._set_mute(cmd, False)

    def _set_mute(self, cmd: Any, muted: bool) -> None:
        track = cmd.track_id
        if track is None:
            self._mute_agent = self._mute_caller = muted
        elif track == self.sst:
            self._mute_agent = muted
        elif track == self.sid:
            self._mute_caller = muted
        else:
            self.error(f"{type(cmd).name} not allowed: unknown track {track}")

    # -- play ------------------------------------------------------------

    def _cmd_play(self, cmd: Any) -> None:
        if not self._require_leg(cmd):
            return
        assert self.leg is not None
        self._cut_sst()
        play_id = cmd.play_id if cmd.play_id is not None else cmd.url
        source = FilePlay(play_id, self._services.ids.ssrc(), self.leg.frame_bytes, self._services.clock.seconds(), cmd.url)
        source.auto_hangup = cmd.auto_hangup
        source.wait_input_timeout_ms = cmd.wait_input_timeout
        self.emit(ev.TrackStartEvent(track_id=self.sst, timestamp=self.now_ms(), play_id=play_id))
        self._set_sst(source)
        rate = self.leg.media_rate_hz
        offset_bytes = int(cmd.offset_ms or 0) * rate // 1000 * 2
        d = self.load_audio(cmd.url, rate)
        source.loader = d

        def loaded(pcm: bytes) -> None:
            source.loader = None
            source.loaded(pcm, offset_bytes)

        def failed(f: Failure) -> None:
            source.loader = None
            if f.check(CancelledError):
                return
            message = f.getErrorMessage() or f.type.__name__
            self._log.info("play of {url} failed: {message}", url=cmd.url, message=message)
            if self._sst is source:
                self.error(message, sender=f"filetrack: {cmd.url}", track_id=self.sst)
                source.failed = True
                self._end_sst(source, interrupted=True)

        d.addCallbacks(loaded, failed)

    def load_audio(self, url: str, rate: int) -> Deferred[bytes]:
        """Decoded PCM of a local file or http(s) URL at ``rate``, through the media cache."""
        from activecall.fetch import FetchError
        from activecall.media.audiofile import AudioDecodeError, decode_audio

        services = self._services
        key = services.cache.file_key(url, rate)

        def decode_and_store(data: bytes | str) -> bytes:
            pcm = decode_audio(data, rate)
            services.cache.put(key, pcm)
            return pcm

        remote = url.startswith(("http://", "https://"))

        def refused(f: Failure) -> None:
            f.trap(UnsafePathError)
            # The same text whether or not such a file exists: no probing outside the media directories.
            raise CommandError.invalid("url", f"{url} is not in a media directory")

        def from_cache(cached: Optional[bytes]) -> Any:
            if cached is not None:
                return cached
            if remote:
                return services.fetch_url(url).addCallback(
                    lambda body: services.run_blocking(decode_and_store, body).addErrback(undecodable))
            return services.run_blocking(decode_and_store, url)

        def undecodable(f: Failure) -> None:
            f.trap(AudioDecodeError)
            # Fetched but not audio reads like any other failure: no probing of what a URL serves.
            self._log.info("{url} is not audio: {error}", url=url, error=f.getErrorMessage())
            raise FetchError(url)

        allowed: Deferred[Any] = succeed(None) if remote else services.run_blocking(path_under_any, url, services.media_dirs)
        allowed.addErrback(refused)
        return allowed.addCallback(lambda _: services.run_blocking(services.cache.get, key)).addCallback(from_cache)

    # -- tts ---------------------------------------------------------------

    def _synthesis_option(self, cmd: Any) -> Optional[SynthesisOption]:
        base = self.option.tts if self.option is not None else None
        if cmd.option is not None:
            return cmd.option.merged_over(base) if base is not None else cmd.option
        return base

    def _cmd_tts(self, cmd: Any) -> None:
        if not self._require_leg(cmd):
            return
        assert self.leg is not None
        option = self._synthesis_option(cmd)
        if option is None or not option.provider:
            self.error("TTS type not found: no tts provider in the call or command option")
            return
        try:
            provider = self._services.synthesizers.resolve(option.provider)
        except UnknownProviderError as e:
            self.error(str(e))
            return
        option = option.with_defaults()
        current = self._sst
        if isinstance(current, TtsPlay) and current.play_id == cmd.play_id and not current.finished and not current.stop_after_current:
            play = current
        else:
            self._cut_sst()
            rate = self.leg.media_rate_hz
            play = TtsPlay(cmd.play_id, self._services.ids.ssrc(), self.leg.frame_bytes, self._services.clock.seconds(), cmd.streaming, rate * 2 / 1000)
            self.emit(ev.TrackStartEvent(track_id=self.sst, timestamp=self.now_ms(), play_id=cmd.play_id))
            self._set_sst(play)
        play.auto_hangup = play.auto_hangup or cmd.auto_hangup
        if cmd.wait_input_timeout is not None:
            play.wait_input_timeout_ms = cmd.wait_input_timeout
        job = _TtsJob(provider, option, cmd.speaker or option.speaker, cmd.cache_key, self._cmd_seq)
        if cmd.base64 and not play.streaming:
            self._queue_base64(play, cmd.text, option)
        elif play.streaming:
            play.pending_text += strip_emoji(cmd.text)
            sentences, play.pending_text = split_sentences(play.pending_text)
            if cmd.end_of_stream and play.pending_text.strip():
                sentences.append(play.pending_text.strip())
                play.pending_text = ""
            for text in sentences:
                self._queue_sentence(play, text, job, cacheable=False)
        else:
            text = strip_emoji(cmd.text).strip()
            if text:
                self._queue_sentence(play, text, job, cacheable=True)
        if cmd.end_of_stream:
            play.end_of_stream = True
            play.pending_text = play.pending_text.strip()

    def _queue_base64(self, play: TtsPlay, text: str, option: SynthesisOption) -> None:
        try:
            pcm = b64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.error("invalid tts.text: expected base64 PCM when base64 is true")
            return
        if len(pcm) % 2:
            pcm = pcm[:-1]
        sentence = play.add_sentence("")
        sentence.append(self._to_media(pcm, option.samplerate, option.volume))
        sentence.done = True

    def _to_media(self, pcm: bytes, rate: int, volume: int) -> bytes:
        assert self.leg is not None
        if rate != self.leg.media_rate_hz:
            pcm = Resampler(rate, self.leg.media_rate_hz).process(pcm)
        return apply_gain(pcm, volume / 5.0) if volume != 5 else pcm

    def _queue_sentence(self, play: TtsPlay, text: str, job: "_TtsJob", cacheable: bool) -> None:
        sentence = play.add_sentence(text)
        play.synth_waiting.append(_SentenceSynthesis(self, play, sentence, job, cacheable))
        self._pump_synthesis(play)

    def _pump_synthesis(self, play: TtsPlay) -> None:
        """Start queued syntheses, in order, up to the play's maxConcurrentTasks (default 1)."""
        while play.synth_waiting:
            limit = play.synth_waiting[0].concurrency
            if play.synth_running >= limit:
                return
            synthesis = play.synth_waiting.pop(0)
            if synthesis.sentence.done:
                continue  # cancelled while waiting
            play.synth_running += 1
            synthesis.start()

    # -- ending -----------------------------------------------------------

    def _cmd_hangup(self, cmd: Any) -> None:
        if cmd.refer:
            if self._transfer is None:
                self.error("hangup not allowed: no transfer leg")
                return
            self.end_transfer(cmd.reason or "byClient", cmd.initiator or "client", send_bye=True, headers=dict(cmd.headers or {}))
            return
        self._hangup_headers = dict(cmd.headers or {})
        self._recorded_reason = hangup_reason_from_command(cmd.reason, cmd.initiator)
        self.hangup(cmd.reason or "byClient", cmd.initiator or "client")

    def hangup(self, reason: str, initiator: str) -> None:
        """End the call: stop tracks, emit ``trackEnd{sid}`` and ``hangup{sid}``, close."""
        if self.ended:
            return
        self._cut_sst()
        self.ended = True
        self.hangup_reason = reason
        if self._recorded_reason is None:
            self._recorded_reason = hangup_reason_from_name(reason)
        self._stop_ticking()
        self._timers.cancel_all()
        if self.recorder is not None:
            self._recorder_closed = self.recorder.close()
            self._recorder_closed.addErrback(lambda f: self._log.failure("recording {path} failed", f, path=self.recording_path))
        now = self._services.clock.seconds()
        if self._pending_invite is not None:
            invite, self._pending_invite = self._pending_invite, None
            invite.cancel()  # still ringing: CANCEL
        if self._transfer is not None:
            self._transfer_auto_hangup = False
            self.end_transfer(reason, initiator, send_bye=True)
        sip_call = self._sip_leg.call if self._sip_leg is not None else self._sip_leg_call
        pending = self._services.pending
        if pending is not None and self._session.call_type == "sip" and self.sid in pending:
            # The client never answered: a closed socket declines, a hangup terminates.
            if reason == "canceled" and initiator == "client":
                pending.client_disconnected(self.sid)
                self._sip_status = 603
            else:
                pending.reject(self.sid, 487, "Request Terminated")
                self._sip_status = 487
        elif sip_call is not None and self.answered_at is None and not self._sip_remote_ended and self._inbound is not None:
            sip_call.reject(487, "Request Terminated")  # after ringing, before accept
            self._sip_remote_ended = True
        if sip_call is not None and not self._sip_remote_ended and not sip_call.terminated:
            headers = dict(self.option.sip.hangup_headers or {}) if self.option is not None and self.option.sip is not None else {}
            headers.update(self._hangup_headers)
            sip_call.bye(headers=outgoing_headers(headers)).addErrback(lambda f: self._log.failure("BYE failed", f))
        if self._inbound is not None:
            self._inbound.release()
        if self.leg is not None or self._sip_leg is not None:
            duration_ms = int((now - self.answered_at) * 1000) if self.answered_at is not None else 0
            ssrc = self.leg.ssrc if self.leg is not None else 0
            self._session.emit(ev.TrackEndEvent(track_id=self.sid, timestamp=self.now_ms(), duration=duration_ms, ssrc=ssrc))
        if self.leg is not None:
            closing = self.leg.close()
            if isinstance(closing, Deferred):
                closing.addErrback(lambda f: self._log.failure("closing the media leg failed", f))
        option = self.option
        self._session.emit(ev.HangupEvent(
            track_id=self.sid,
            timestamp=self.now_ms(),
            reason=reason,
            initiator=initiator,
            start_time=ev.format_rfc3339(self.created_at),
            hangup_time=ev.format_rfc3339(now),
            answer_time=ev.format_rfc3339(self.answered_at) if self.answered_at is not None else None,
            from_=ev.Attendee.from_uri(option.caller) if option is not None and option.caller else None,
            to=ev.Attendee.from_uri(option.callee) if option is not None and option.callee else None,
            extra={
                "session_id": self.sid,
                "call_type": self._session.call_type.lower(),
                "start_time": ev.format_rfc3339(self.created_at),
            },
            refer=False,
        ))
        self._session.finish()
        if self._services.call_records is not None:
            in_flight = self._services.records_in_flight
            saving = Deferred.fromCoroutine(self._save_record(now))
            in_flight.add(saving)
            saving.addErrback(lambda f: self._log.failure("building the call record of {sid} failed", f, sid=self.sid))
            saving.addBoth(lambda _: in_flight.discard(saving))

    async def _save_record(self, ended_at: float) -> None:
        """One call record per call, however it ended (playbook.md §14), after the recording is complete."""
        services = self._services
        if self._recorder_closed is not None:
            try:
                await self._recorder_closed
            except Exception:
                pass  # logged where the recorder failed; the record lists what exists
        dump_path = self._session.dump_path
        paths = [p for p in (self.recording_path, dump_path) if p]
        sizes = await file_sizes(services.run_blocking, paths)
        option = self.option
        call = self._inbound.call if self._inbound is not None else None
        record = CallRecord(
            call_type=self._session.call_type,
            call_id=self.sid,
            start_s=self.created_at,
            end_s=ended_at,
            option=option,
            ring_s=self._ring_s,
            answer_s=self.answered_at,
            caller=call.caller if call is not None else (option.caller if option is not None else None),
            callee=call.callee if call is not None else (option.callee if option is not None else None),
            sip_status=self._sip_status,
            hangup_reason=self._recorded_reason,
            recorder=[RecorderFile(self.sid, self.recording_path, sizes.get(self.recording_path))] if self.recording_path else (),
            extras={"session_id": self.sid, "call_type": self._session.call_type.lower(),
                    "start_time": ev.format_rfc3339(self.created_at)},
            dump_event_file=dump_path,
            dump_event_file_exists=dump_path is not None and sizes.get(dump_path) is not None,
        )
        await services.call_records.write(build_call_record(record), self.created_at)

    @property
    def pending_timers(self) -> int:
        """Timers still scheduled for this call (0 after hangup)."""
        return self._timers.pending


class _TtsJob:
    """What a ``tts`` command asked for, shared by the sentences it produced."""

    __slots__ = ("provider", "option", "speaker", "cache_key", "cmd_seq")

    def __init__(self, provider: str, option: SynthesisOption, speaker: Optional[str], cache_key: Optional[str], cmd_seq: int) -> None:
        self.provider = provider
        self.option = option
        self.speaker = speaker
        self.cache_key = cache_key
        self.cmd_seq = cmd_seq


class _SentenceSynthesis:
    """Synthesizes one sentence (or reads it from the media cache) into its play."""

    _log = Logger()

    def __init__(self, controller: CallController, play: TtsPlay, sentence: Sentence, job: _TtsJob, cacheable: bool) -> None:
        self._c = controller
        self._play = play
        self._sentence = sentence
        self._job = job
        self._cacheable = cacheable
        self._started = controller._services.clock.seconds()
        self._first_audio: Optional[float] = None
        self._to_cache: Optional[Resampler] = None
        self._to_media: Optional[Resampler] = None
        self._cache_pcm = bytearray()
        self._key: Optional[str] = None
        self._finished = False
        self.sentence = sentence
        self.concurrency = max(1, job.option.max_concurrent_tasks or 1)

    def _release(self) -> None:
        """This synthesis no longer occupies a slot of its play; start the next one."""
        if not self._finished:
            self._finished = True
            self._play.synth_running -= 1
            if not self._c.ended:
                self._c._pump_synthesis(self._play)

    def start(self) -> None:
        services = self._c._services
        option = self._job.option
        if self._cacheable:
            try:
                self._key = cache_key(services, self._job.provider, self._sentence.text, option, self._job.speaker, self._job.cache_key)
            except ValueError as e:
                self._c.error(f"invalid tts.cacheKey: {e}")
                self._sentence.done = True
                self._release()
                return
            d = services.run_blocking(services.cache.get, self._key)
            self._sentence.synth = d
            d.addCallbacks(self._cache_result, self._failed)
        else:
            self._synthesize()

    def _cache_result(self, pcm: Optional[bytes]) -> None:
        if self._sentence.done:
            return
        if pcm is None:
            self._synthesize()
            return
        self._sentence.cached = True
        self._sentence.synth = None
        self._sentence.append(self._c._to_media(pcm, self._job.option.samplerate, self._job.option.volume))
        self._sentence.done = True
        self._release()
        self._metrics(len(pcm), cached=True)

    def _synthesize(self) -> None:
        services = self._c._services
        option = self._job.option
        try:
            synthesizer = create_synthesizer(services, self._job.provider, option)
        except Exception as e:  # provider construction failed: unavailable engine, bad model path
            self._log.info("TTS provider {p} unavailable: {e}", p=self._job.provider, e=e)
            self._c.error(f"TTS provider {self._job.provider} unavailable: {e}", sender="tts", track_id=self._c.sst, code=500)
            self._sentence.done = True
            self._release()
            return
        request = synthesis_request(self._sentence.text, option, self._job.speaker, self._c.sid)
        d = synthesizer.synthesize(request, self._on_audio)
        self._sentence.synth = d
        d.addCallbacks(self._done, self._failed)

    def _on_audio(self, pcm: bytes, rate: int) -> None:
        if self._sentence.done:
            return
        if self._first_audio is None:
            self._first_audio = self._c._services.clock.seconds()
        option = self._job.option
        if self._cacheable:
            if self._to_cache is None:
                self._to_cache = Resampler(rate, option.samplerate)
            self._cache_pcm += self._to_cache.process(pcm)
        assert self._c.leg is not None
        if self._to_media is None:
            self._to_media = Resampler(rate, self._c.leg.media_rate_hz)
        media = self._to_media.process(pcm)
        self._sentence.append(apply_gain(media, option.volume / 5.0) if option.volume != 5 else media)

    def _done(self, _: object) -> None:
        self._sentence.synth = None
        self._release()
        if self._sentence.done:
            return
        if self._to_media is not None:
            self._sentence.append(self._to_media.flush())
        self._sentence.done = True
        if self._cacheable and self._key is not None and self._cache_pcm:
            if self._to_cache is not None:
                self._cache_pcm += self._to_cache.flush()
            services = self._c._services
            services.run_blocking(services.cache.put, self._key, bytes(self._cache_pcm)).addErrback(
                lambda f: self._log.failure("writing the media cache failed", f))
        self._metrics(len(self._cache_pcm), cached=False)

    def _failed(self, f: Failure) -> None:
        self._sentence.synth = None
        self._release()
        if f.check(CancelledError) or self._sentence.done:
            return
        self._sentence.done = True
        observe_provider("tts", self._job.provider, None, error=True)
        self._log.info("TTS {p} failed: {e}", p=self._job.provider, e=f.getErrorMessage())
        if not self._c.ended:
            self._c.error(f"TTS {self._job.provider} failed: {f.getErrorMessage()}", sender="tts", track_id=self._c.sst, code=500)

    def _metrics(self, length: int, cached: bool) -> None:
        now = self._c._services.clock.seconds()
        ttfb = int(((self._first_audio or now) - self._started) * 1000)
        if not cached:
            observe_provider("tts", self._job.provider, (self._first_audio or now) - self._started)
        data: dict[str, Any] = {
            "playId": self._play.play_id,
            "cmdSeq": self._job.cmd_seq,
            "length": length,
            "cached": cached,
            "ttfb": ttfb,
            "duration": int((now - self._started) * 1000),
        }
        if self._job.speaker:
            data["speaker"] = self._job.speaker
        self._c.emit(ev.MetricsEvent(timestamp=self._c.now_ms(), key=f"completed.tts.{self._job.provider}", duration=data["duration"], data=data))


class _SipListener:
    """In-dialog events of an outbound SIP call, turned into controller calls and events."""

    def __init__(self, controller: CallController, inbound: bool = False) -> None:
        self._c = controller
        self._inbound = inbound

    def on_bye(self, request: Any) -> None:
        self._c.remote_hangup(self._inbound)

    def on_cancel(self) -> None:
        if self._inbound and not self._c.ended:
            self._c.remote_hangup(inbound=True)

    def on_reinvite(self, sdp: bytes) -> Optional[bytes]:
        c = self._c
        answer = c.reoffer(sdp) if sdp else None
        held = _is_hold(sdp)
        if held != c.on_hold:
            c.on_hold = held
            c.emit(ev.HoldEvent(track_id=c.sid, timestamp=c.now_ms(), on_hold=held, refer=False))
        return answer  # None: the user agent answers with our last SDP, direction mirrored

    def on_info(self, request: Any) -> None:
        body = request.body.decode("utf-8", "replace")
        for line in body.splitlines():
            if line.strip().lower().startswith("signal="):
                digit = line.split("=", 1)[1].strip()[:1]
                if digit:
                    self._c._on_dtmf(digit)

    def on_message(self, request: Any) -> None:
        c = self._c
        c.emit(ev.MessageEvent(track_id=c.sid, timestamp=c.now_ms(), body=request.body.decode("utf-8", "replace"),
                               content_type=request.headers.first("Content-Type"), refer=False))

    def on_refer(self, request: Any) -> None:
        c = self._c
        c.emit(ev.TransferRequestEvent(track_id=c.sid, timestamp=c.now_ms(), refer_to=request.headers.first("Refer-To") or "",
                                       referred_by=request.headers.first("Referred-By"), refer=False))

    def on_notify(self, request: Any) -> None:
        self._c.transfer_progress(request)

    def on_terminated(self, reason: str) -> None:
        if reason in ("bye-received", "ack-timeout", "timeout", "cancel") and not self._c.ended:
            self._c.remote_hangup(self._inbound)


def _is_hold(sdp: bytes) -> bool:
    text = sdp.decode("utf-8", "replace")
    return "c=IN IP4 0.0.0.0" in text or "a=sendonly" in text or "a=inactive" in text


class _TransferListener:
    """In-dialog events of the transfer leg (its BYE ends the transfer)."""

    def __init__(self, controller: CallController) -> None:
        self._c = controller

    def on_bye(self, request: Any) -> None:
        self._c.end_transfer("byCallee", "callee", send_bye=False)

    def on_terminated(self, reason: str) -> None:
        if reason in ("bye-received", "ack-timeout", "timeout"):
            self._c.end_transfer("byCallee", "callee", send_bye=False)

    def on_reinvite(self, sdp: bytes) -> Optional[bytes]:
        return None

    def on_cancel(self) -> None:
        """Outbound legs are not cancelled by the far end."""

    def on_info(self, request: Any) -> None:
        """Ignored on the transfer leg."""

    def on_message(self, request: Any) -> None:
        """Ignored on the transfer leg."""

    def on_refer(self, request: Any) -> None:
        """Ignored on the transfer leg."""

    def on_notify(self, request: Any) -> None:
        """Ignored on the transfer leg."""
