"""The wire and the call layer meet here: wire commands become controller calls, domain events wire events.

:func:`execute` runs one decoded command (``activecall.control.commands``) on a
:class:`~activecall.call.controller.CallController`; :func:`wire_event` turns a
domain event (``activecall.call.events``) into the wire event of protocol.md §3,
with its millisecond timestamps and RFC 3339 times.
"""

from __future__ import annotations

import base64
import binascii
from functools import singledispatch
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred

from activecall.call import events as ce
from activecall.call.controller import CallController, NotAllowedError
from activecall.call.record import command_event_reason, hangup_reason_from_command
from activecall.control import commands as cmds
from activecall.control import events as ev
from activecall.timefmt import format_rfc3339


def execute(controller: CallController, command: Any) -> Optional[Deferred[Any]]:
    """Run one command; a returned Deferred blocks the session's queue until it fires."""
    if controller.ended:
        return None
    controller.command_seq += 1
    run = _COMMANDS.get(type(command))
    if run is None:
        controller.error(f"{command.name} not allowed: unknown command")
        return None
    try:
        return run(controller, command)
    except NotAllowedError as e:
        controller.error(f"{command.name} not allowed: {e}")
        return None


def _invite(c: CallController, cmd: cmds.InviteCommand) -> Deferred[None]:
    return c.dial(cmd.option, sender=cmd.name)


def _accept(c: CallController, cmd: cmds.AcceptCommand) -> None:
    c.answer(cmd.option)


def _reject(c: CallController, cmd: cmds.RejectCommand) -> None:
    c.reject(cmd.code, cmd.reason)


def _ringing(c: CallController, cmd: cmds.RingingCommand) -> None:
    c.ring(cmd.early_media, cmd.ringtone, cmd.recorder)


def _tts(c: CallController, cmd: cmds.TtsCommand) -> None:
    pcm: Optional[bytes] = None
    if cmd.base64 and not cmd.streaming:
        try:
            pcm = base64.b64decode(cmd.text, validate=True)
        except (binascii.Error, ValueError):
            c.error("invalid tts.text: expected base64 PCM when base64 is true")
            return
    c.say(cmd.text, play_id=cmd.play_id, option=cmd.option, speaker=cmd.speaker, streaming=cmd.streaming,
          end_of_stream=cmd.end_of_stream, base64_pcm=pcm, cache_key=cmd.cache_key, auto_hangup=cmd.auto_hangup,
          wait_input_timeout_ms=cmd.wait_input_timeout)


def _play(c: CallController, cmd: cmds.PlayCommand) -> None:
    c.play(cmd.url, cmd.play_id, auto_hangup=cmd.auto_hangup, wait_input_timeout_ms=cmd.wait_input_timeout,
           offset_ms=cmd.offset_ms)


def _hangup(c: CallController, cmd: cmds.HangupCommand) -> None:
    reason, initiator = command_event_reason(cmd.reason), cmd.initiator or "client"
    headers = dict(cmd.headers or {})
    if cmd.refer:
        c.end_transfer(reason, initiator, headers)
    else:
        c.hangup(reason, initiator, headers, recorded_reason=hangup_reason_from_command(cmd.reason, cmd.initiator))


def _refer(c: CallController, cmd: cmds.ReferCommand) -> Deferred[None]:
    return c.transfer(cmd.callee, cmd.caller, cmd.options)


_COMMANDS: dict[type, Callable[[CallController, Any], Optional[Deferred[Any]]]] = {
    cmds.InviteCommand: _invite,
    cmds.StartCommand: _invite,
    cmds.AcceptCommand: _accept,
    cmds.RejectCommand: _reject,
    cmds.RingingCommand: _ringing,
    cmds.TtsCommand: _tts,
    cmds.PlayCommand: _play,
    cmds.InterruptCommand: lambda c, cmd: c.interrupt(cmd.graceful, cmd.fade_out_ms or 0),
    cmds.PauseCommand: lambda c, cmd: c.pause(True),
    cmds.ResumeCommand: lambda c, cmd: c.pause(False),
    cmds.MuteCommand: lambda c, cmd: c.mute(cmd.track_id, True),
    cmds.UnmuteCommand: lambda c, cmd: c.mute(cmd.track_id, False),
    cmds.HangupCommand: _hangup,
    cmds.ReferCommand: _refer,
    cmds.MessageCommand: lambda c, cmd: c.send_message(cmd.body, cmd.content_type, cmd.headers, refer=cmd.refer),
    cmds.AddIceCandidateCommand: lambda c, cmd: c.add_ice_candidate(cmd.candidate, cmd.sdp_mid, cmd.sdp_mline_index),
    cmds.BridgeCommand: lambda c, cmd: c.bridge(cmd.target_session_id),
    cmds.UnbridgeCommand: lambda c, cmd: c.unbridge(cmd.target_session_id),
    cmds.HistoryCommand: lambda c, cmd: c.add_history(cmd.speaker, cmd.text),
    cmds.CustomCommand: lambda c, cmd: c.custom(cmd.sender, cmd.data),
}


def _ms(now: float) -> int:
    return int(now * 1000)


@singledispatch
def wire_event(event: object) -> Any:
    """The wire event (protocol.md §3) of a domain event."""
    raise TypeError(f"no wire form for {type(event).__name__}")


@wire_event.register
def _(e: ce.CallOffered) -> Any:
    return ev.IncomingEvent(track_id=e.track, timestamp=_ms(e.now), caller=e.caller, callee=e.callee, sdp=e.sdp,
                            headers=e.headers)


@wire_event.register
def _(e: ce.RingingReported) -> Any:
    return ev.RingingEvent(track_id=e.track, timestamp=_ms(e.now), early_media=e.early_media, refer=e.refer)


@wire_event.register
def _(e: ce.CallAnswered) -> Any:
    return ev.AnswerEvent(track_id=e.track, timestamp=_ms(e.now), sdp=e.sdp, refer=e.refer)


@wire_event.register
def _(e: ce.CallDeclined) -> Any:
    return ev.RejectEvent(track_id=e.track, timestamp=_ms(e.now), reason=e.reason, code=e.code, refer=e.refer)


@wire_event.register
def _(e: ce.MediaArrived) -> Any:
    return ev.MediaReadyEvent(track_id=e.track, timestamp=_ms(e.now))


@wire_event.register
def _(e: ce.TrackStarted) -> Any:
    return ev.TrackStartEvent(track_id=e.track, timestamp=_ms(e.now), play_id=e.play_id)


@wire_event.register
def _(e: ce.TrackEnded) -> Any:
    return ev.TrackEndEvent(track_id=e.track, timestamp=_ms(e.now), duration=max(0, int(e.duration_s * 1000)),
                            ssrc=e.ssrc, play_id=e.play_id)


@wire_event.register
def _(e: ce.PlayInterrupted) -> Any:
    return ev.InterruptionEvent(track_id=e.track, timestamp=_ms(e.now), play_id=e.play_id, subtitle=e.subtitle,
                                position=e.position, total_duration=e.total_ms, current=e.current_ms)


@wire_event.register
def _(e: ce.SpeechStarted) -> Any:
    return ev.SpeakingEvent(track_id=e.track, timestamp=_ms(e.now), start_time=_ms(e.started_at), confidence=1.0,
                            refer=e.refer)


@wire_event.register
def _(e: ce.SpeechEnded) -> Any:
    return ev.SilenceEvent(track_id=e.track, timestamp=_ms(e.now), start_time=_ms(e.started_at),
                           duration=e.duration_ms, refer=e.refer)


@wire_event.register
def _(e: ce.SilenceLasted) -> Any:
    return ev.SilenceEvent(track_id=e.track, timestamp=_ms(e.now), start_time=_ms(e.started_at),
                           duration=e.duration_ms, refer=e.refer)


@wire_event.register
def _(e: ce.TranscriptHeard) -> Any:
    kind = ev.AsrFinalEvent if e.final else ev.AsrDeltaEvent
    return kind(track_id=e.track, timestamp=_ms(e.now), index=e.index, text=e.text,
                start_time=_ms(e.started_at) if e.started_at is not None else None,
                end_time=_ms(e.ended_at) if e.ended_at is not None else None,
                is_filler=e.is_filler, confidence=e.confidence, refer=e.refer)


@wire_event.register
def _(e: ce.ModelInterrupted) -> Any:
    return ev.InterruptEvent(receiver=e.receiver)


@wire_event.register
def _(e: ce.FunctionCalled) -> Any:
    return ev.FunctionCallEvent(track_id=e.track, call_id=e.call_id, function_name=e.name, arguments=e.arguments,
                                timestamp=_ms(e.now))


@wire_event.register
def _(e: ce.TurnEnded) -> Any:
    return ev.EouEvent(track_id=e.track, timestamp=_ms(e.now), completed=e.completed, text=e.text, refer=e.refer)


@wire_event.register
def _(e: ce.DtmfReceived) -> Any:
    return ev.DtmfEvent(track_id=e.track, timestamp=_ms(e.now), digit=e.digit, refer=e.refer)


@wire_event.register
def _(e: ce.HoldChanged) -> Any:
    return ev.HoldEvent(track_id=e.track, timestamp=_ms(e.now), on_hold=e.on_hold, refer=False)


@wire_event.register
def _(e: ce.InputTimedOut) -> Any:
    return ev.SilenceEvent(track_id=e.track, timestamp=_ms(e.now), start_time=_ms(e.started_at),
                           duration=e.duration_ms, refer=False)


@wire_event.register
def _(e: ce.CallInactive) -> Any:
    return ev.InactivityEvent(track_id=e.track, timestamp=_ms(e.now))


@wire_event.register
def _(e: ce.MessageReceived) -> Any:
    return ev.MessageEvent(track_id=e.track, timestamp=_ms(e.now), body=e.body, content_type=e.content_type,
                           refer=False)


@wire_event.register
def _(e: ce.TransferRequested) -> Any:
    return ev.TransferRequestEvent(track_id=e.track, timestamp=_ms(e.now), refer_to=e.refer_to,
                                   referred_by=e.referred_by, refer=False)


@wire_event.register
def _(e: ce.MetricsMeasured) -> Any:
    return ev.MetricsEvent(timestamp=_ms(e.now), key=e.key, duration=e.duration_ms, data=e.data)


@wire_event.register
def _(e: ce.HistoryAdded) -> Any:
    return ev.AddHistoryEvent(sender=e.sender, timestamp=_ms(e.now), speaker=e.speaker, text=e.text)


@wire_event.register
def _(e: ce.CustomSent) -> Any:
    return ev.CustomEvent(timestamp=_ms(e.now), sender=e.sender, data=e.data)


@wire_event.register
def _(e: ce.ErrorOccurred) -> Any:
    return ev.ErrorEvent(track_id=e.track, timestamp=_ms(e.now), sender=e.sender, error=e.message, code=e.code)


@wire_event.register
def _(e: ce.CallEnded) -> Any:
    if e.refer:
        return ev.HangupEvent(track_id=e.track, timestamp=_ms(e.now), reason=e.reason, initiator=e.initiator,
                              start_time=format_rfc3339(e.started_at), hangup_time=format_rfc3339(e.now), refer=True)
    assert e.call_type is not None
    return ev.HangupEvent(
        track_id=e.track,
        timestamp=_ms(e.now),
        reason=e.reason,
        initiator=e.initiator,
        start_time=format_rfc3339(e.started_at),
        hangup_time=format_rfc3339(e.now),
        answer_time=format_rfc3339(e.answered_at) if e.answered_at is not None else None,
        ringing_time=format_rfc3339(e.rang_at) if e.rang_at is not None else None,
        from_=ev.Attendee.from_uri(e.caller) if e.caller else None,
        to=ev.Attendee.from_uri(e.callee) if e.callee else None,
        extra={
            "session_id": e.track,
            "call_type": e.call_type.lower(),
            "start_time": format_rfc3339(e.started_at),
        },
        refer=False,
    )
