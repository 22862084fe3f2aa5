"""Transfers (protocol.md §5.5): a bridged transfer leg on the server-side track, or a SIP REFER.

Bridged transfer::

    idle --start--> dialing --answered--> bridged --ended (BYE either way, hangup refer)--> idle
                       \\--rejected / timeout / cancelled--> idle

While bridged, the caller's audio goes to the transfer leg (a sink on the call's
fan-out) and the transfer leg's audio plays on the server-side track; keys pressed
on either side are played to the other (``forwardDtmf``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Optional

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger
from zope.interface import implementer

from activecall.call.events import (
    CallAnswered, CallDeclined, CallEnded, DtmfReceived, MediaArrived, RingingReported, TrackEnded,
    TrackStarted,
)
from activecall.call.playback import BridgeSource, FilePlay
from activecall.call.hearing import CallHearing
from activecall.media.tracks import AudioSink, FanOut, FrameQueue, ILeg, ILegEvents, LegRejectedError, LegSetupError
from activecall.options import CallOption, ReferOption, SipOption

if TYPE_CHECKING:
    from activecall.call.controller import CallController


class BridgedTransfer:
    """One transfer leg of a call, from dialing to its end."""

    _log = Logger()

    def __init__(self, call: "CallController", options: ReferOption) -> None:
        self._call = call
        self._options = options
        self.leg: Optional[ILeg] = None
        self.auto_hangup = options.auto_hangup
        self.answered_at: Optional[float] = None
        self._dialing: Optional[Deferred[Any]] = None
        self._to_target = FrameQueue()
        self._bridge: Optional[BridgeSource] = None
        self._moh: Optional[FilePlay] = None
        self._ended = False
        self.hearing: Optional[CallHearing] = None

    def transfer_option(self, callee: str, caller: Optional[str]) -> CallOption:
        """The transfer leg's CallOption: the X-Referred-* headers added to the refer's sip headers."""
        options, original, sid = self._options, self._call.option, self._call.sid
        headers = dict(options.sip.headers or {}) if options.sip is not None else {}
        if original is not None and original.callee:
            headers.setdefault("X-Referred-To", original.callee)
        if original is not None and original.caller:
            headers.setdefault("X-Referred-From", original.caller)
        headers["X-Referred-Id"] = sid
        sip = options.sip if options.sip is not None else SipOption()
        sip = dataclasses.replace(sip, headers=headers)
        caller = caller or (original.caller if original is not None else None)
        return CallOption(caller=caller or None, callee=callee, sip=sip)

    async def run(self, callee: str, caller: Optional[str]) -> None:
        """Dial the target with music on hold (or a bridge trackStart), then bridge it."""
        c, options = self._call, self._options
        c.track.cut()
        moh: Optional[FilePlay] = None
        if options.moh:
            moh = self._moh = c.track.play_file(options.moh, play_id=None, loop=True)
        else:
            c.report(TrackStarted(c.now(), c.sst))
        call_id = options.call_id or f"ref-{c.services.ids.bits(32)}-{c.sid}"
        dialer = c.dialers["sip"]

        def ringing(early_media: bool) -> None:
            c.report(RingingReported(c.now(), c.sst, early_media, refer=True))

        try:
            dialing = dialer.dial(self.transfer_option(callee, caller), call_id, ringing)
        except LegSetupError as e:
            c.transfer_finished(self)
            c.error(f"refer failed: {e}")
            return
        self._dialing = dialing
        dialing.addTimeout(options.timeout, c.services.clock)
        try:
            leg = await dialing
        except (LegRejectedError, LegSetupError, CancelledError, TimeoutError) as e:
            self._dialing = None
            c.transfer_finished(self)
            if moh is not None and c.track.source is moh:
                c.track.end_play(moh, interrupted=True)
            if self._ended:
                return  # ended while dialing (hangup): the attempt was cancelled
            if isinstance(e, LegRejectedError):
                c.report(CallDeclined(c.now(), c.sst, e.reason, e.status, refer=True))
                c.error(f"refer rejected: {e.status} {e.reason}")
            elif isinstance(e, LegSetupError):
                c.error(f"refer failed: {e}")
            elif not c.ended:
                c.report(CallDeclined(c.now(), c.sst, "Timeout when refer", 408, refer=True))
                c.error("refer sip track creation timed out")
            return
        self._dialing = None
        if c.ended or self._ended:
            leg.close().addErrback(lambda f: None)
            return
        if moh is not None and c.track.source is moh:
            c.track.end_play(moh, interrupted=True)
        assert c.leg is not None
        bridge = BridgeSource(c.services.ids.ssrc(), c.leg.frame_bytes, c.now())
        self._bridge = bridge
        if options.moh:
            c.report(TrackStarted(c.now(), c.sst))
        self.leg = leg
        self.answered_at = c.now()
        sink: AudioSink = bridge
        hearing_option = CallOption(vad=options.vad, asr=options.asr, denoise=options.denoise, agc=options.agc)
        self.hearing = CallHearing.start(c, hearing_option, int(leg.media_rate_hz), "refer", track=c.sst, refer=True,
                                         native_rate_hz=int(leg.native_rate_hz))
        if self.hearing is not None:
            # The target's voice is heard (refer:true events) on its way to the caller.
            sink = FanOut()
            sink.add(bridge)
            sink.add(self.hearing)
        if options.pause_parent_asr and c.hearing is not None:
            c.hearing.asr_paused = True
        leg.attach(self._to_target, sink, _TransferLegEvents(self))
        c.caller_audio.add(self._to_target)
        c.track.set_source(bridge)
        c.report(CallAnswered(c.now(), c.sst, leg.answer_sdp, refer=True))

    def relay_dtmf(self, digit: str, to_target: bool) -> None:
        """A key pressed on one side of the bridge, played to the other (unless ``forwardDtmf`` is false)."""
        if self._ended or self.leg is None or not self._options.forward_dtmf:
            return
        leg = self.leg if to_target else self._call.leg
        if leg is None:
            return
        try:
            leg.send_dtmf(digit)
        except ValueError:  # not a key a leg can play (a receiver reports only keys)
            pass

    def end(self, reason: str, initiator: str, send_bye: bool, headers: Optional[Mapping[str, str]] = None) -> None:
        """The transfer leg ended: trackEnd{SST}, hangup{SST, refer}, then autoHangup the call (byRefer)."""
        if self._ended:
            return
        self._ended = True
        c = self._call
        c.transfer_finished(self)
        dialing, self._dialing = self._dialing, None
        if dialing is not None:
            dialing.cancel()
        leg = self.leg
        if self.hearing is not None:
            self.hearing.close()
        if self._options.pause_parent_asr and c.hearing is not None and not self.auto_hangup:
            c.hearing.asr_paused = False  # the call goes on: hear its caller again
        c.caller_audio.remove(self._to_target)
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            c.track.drop(bridge)
        now = c.now()
        started = self.answered_at or now
        c.report(TrackEnded(now, c.sst, now - started, leg.ssrc if leg is not None else 0))
        c.report(CallEnded(now, c.sst, reason, initiator, started_at=started, refer=True))
        if leg is not None:
            leg.close(headers if send_bye else None).addErrback(lambda f: None)
        if self.auto_hangup and not c.ended:
            c.hangup("byRefer", "system")


@implementer(ILegEvents)
class _TransferLegEvents:
    """What the transfer leg reports: its media, keys and its end."""

    def __init__(self, transfer: BridgedTransfer) -> None:
        self._t = transfer

    def media_ready(self) -> None:
        c = self._t._call
        c.report(MediaArrived(c.now(), c.sst))

    def dtmf(self, digit: str) -> None:
        c = self._t._call
        c.report(DtmfReceived(c.now(), c.sst, digit, refer=True))
        self._t.relay_dtmf(digit, to_target=False)

    def hold(self, on_hold: bool) -> None:
        """Not reported for the transfer leg."""

    def ended(self, cause: str) -> None:
        self._t.end("byCallee", "callee", send_bye=False)

    def media_ended(self, cause: str) -> None:
        self._t.end("byCallee", "callee", send_bye=False)

    def message(self, body: str, content_type: Optional[str]) -> None:
        """Ignored on the transfer leg."""

    def transfer_requested(self, refer_to: str, referred_by: Optional[str]) -> None:
        """Ignored on the transfer leg."""

    def transfer_progress(self, status: int, text: str) -> None:
        """Ignored on the transfer leg."""


class BlindTransfer:
    """``options.sipRefer``: REFER sent to the remote party (RFC 3515); its NOTIFYs report the outcome.

    A final 2xx sipfrag completes the transfer and the call is hung up (byRefer);
    a failure is an ``error`` event and the call goes on.
    """

    def __init__(self, call: "CallController") -> None:
        self._call = call

    async def run(self, leg: ILeg, callee: str) -> None:
        c = self._call
        target = callee if callee.startswith(("sip:", "sips:", "tel:")) else "sip:" + callee
        try:
            response = await leg.refer(target)
        except Exception as e:
            c.transfer_finished(self)
            c.error(f"refer failed: {e}")
            return
        if not 200 <= response.status < 300:
            c.transfer_finished(self)
            c.error(f"refer rejected: {response.status} {response.reason}")

    def progress(self, status: int, text: str) -> None:
        """A NOTIFY's sipfrag status."""
        c = self._call
        if 200 <= status < 300:
            c.transfer_finished(self)
            c.hangup("byRefer", "system")
        elif status >= 300:
            c.transfer_finished(self)
            c.error(f"refer failed: the transfer target answered {text}")

