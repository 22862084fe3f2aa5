"""The audio seam: every leg and every consumer or producer of call audio meets here.

A leg exchanges 20 ms frames of PCM s16le mono at its ``media_rate_hz`` with
the call, on the one media clock (:mod:`activecall.media.clock`):

* **receive phase**: the leg writes each caller frame to the :class:`AudioSink`
  attached to it, normally a :class:`FanOut` whose sinks are the recorder,
  the ``subscribe`` mirror, a transfer bridge and (later) VAD and ASR;
* **process phase**: batched work across calls (VAD) runs on what was received;
* **send phase**: the leg pulls its next agent frame from the attached
  :class:`AudioSource`, once per tick.

Legs report what happens on the far end through :class:`ILegEvents`.  A leg
is RTP/SIP, raw audio inside the control WebSocket, or (later) WebRTC; the
controller never asks which.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Mapping, Optional, Protocol

from zope.interface import Attribute, Interface

FRAME_MS = 20


def frame_bytes_at(rate_hz: int) -> int:
    """Bytes of one 20 ms PCM s16le mono frame at ``rate_hz``."""
    return rate_hz // 50 * 2


class AudioSource(Protocol):
    """Agent audio, pulled by a leg once per tick."""

    def read_frame(self) -> Optional[bytes]:
        """The next 20 ms frame at the leg's media rate, or None: nothing to send this tick."""


class AudioSink(Protocol):
    """Caller audio, written by a leg once per received frame."""

    def write_frame(self, frame: bytes) -> None:
        """One 20 ms frame of caller audio at the leg's media rate."""


class FanOut:
    """An :class:`AudioSink` that writes every frame to each of its sinks, in the order they were added."""

    __slots__ = ("_sinks",)

    def __init__(self) -> None:
        self._sinks: tuple[AudioSink, ...] = ()

    def add(self, sink: AudioSink) -> None:
        """Start writing frames to ``sink`` (no-op if it is already here)."""
        if sink not in self._sinks:
            self._sinks = self._sinks + (sink,)

    def remove(self, sink: AudioSink) -> None:
        """Stop writing frames to ``sink``."""
        self._sinks = tuple(s for s in self._sinks if s is not sink)

    def clear(self) -> None:
        """Remove every sink (the call ended)."""
        self._sinks = ()

    def write_frame(self, frame: bytes) -> None:
        # A tuple snapshot: a sink may remove itself (or another) while it runs.
        for sink in self._sinks:
            sink.write_frame(frame)

    def __len__(self) -> int:
        return len(self._sinks)

    def __contains__(self, sink: object) -> bool:
        return sink in self._sinks


class FrameQueue:
    """A bounded FIFO of frames that is both a sink and a source (one leg's audio into another leg).

    Beyond ``max_frames`` the oldest frame is dropped: latency stays bounded
    when the writer runs faster than the reader.
    """

    __slots__ = ("_frames", "_max", "dropped")

    def __init__(self, max_frames: int = 5) -> None:
        self._frames: deque[bytes] = deque()
        self._max = max_frames
        self.dropped = 0

    def write_frame(self, frame: bytes) -> None:
        frames = self._frames
        if len(frames) >= self._max:
            frames.popleft()
            self.dropped += 1
        frames.append(frame)

    def read_frame(self) -> Optional[bytes]:
        return self._frames.popleft() if self._frames else None

    def clear(self) -> None:
        """Forget what is queued."""
        self._frames.clear()

    def __len__(self) -> int:
        return len(self._frames)


class _Silent:
    """Source that never sends and sink that discards: what a leg has before :meth:`ILeg.attach`."""

    __slots__ = ()

    def read_frame(self) -> Optional[bytes]:
        return None

    def write_frame(self, frame: bytes) -> None:
        return None


NO_AUDIO = _Silent()


class LegSetupError(Exception):
    """A leg could not be set up (bad target, no ports, an unacceptable SDP); the text says why."""


class LegOptionError(LegSetupError):
    """The call option lacks what this kind of leg needs (e.g. a callee); the text is the whole error."""


class LegRejectedError(Exception):
    """The far end declined the leg with a final status (486 Busy, 487 after CANCEL, 408 ...)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class ILegEvents(Interface):
    """What a leg reports about its far end; every method is called on the reactor thread."""

    def media_ready() -> None:
        """The first valid media arrived from the far end (once per leg)."""

    def dtmf(digit: str) -> None:
        """The far end pressed a key (RFC 4733, SIP INFO or in-band tones)."""

    def hold(on_hold: bool) -> None:
        """The far end put the call on hold or took it off (only on a change)."""

    def ended(cause: str) -> None:
        """The far end ended the leg: ``"hangup"`` (BYE, CANCEL, dialog timeout) or ``"failed"``
        (an inbound answer that was never confirmed: no ACK)."""

    def media_ended(cause: str) -> None:
        """The far end's media stopped for good while the call goes on (a WebRTC peer that failed,
        closed or never connected); the call's session decides when to end."""

    def message(body: str, content_type: Optional[str]) -> None:
        """An in-dialog SIP MESSAGE arrived (SIP legs only)."""

    def transfer_requested(refer_to: str, referred_by: Optional[str]) -> None:
        """The far end sent REFER (SIP legs only)."""

    def transfer_progress(status: int, text: str) -> None:
        """A NOTIFY of our REFER: the sipfrag's status code and its ``code reason`` text (SIP legs only)."""


class ILeg(Interface):
    """A two-way media leg to the remote party of a call (RTP/SIP, WebSocket, WebRTC)."""

    media_rate_hz = Attribute("Sample rate (Hz) of the PCM the call exchanges with this leg.")
    native_rate_hz = Attribute("The bandwidth of the far end's audio (Hz): 8000 for a G.711 SIP leg, whose "
                               "frames reach the call upsampled to media_rate_hz; else media_rate_hz.")
    frame_bytes = Attribute("Bytes of one 20 ms PCM frame at media_rate_hz.")
    ssrc = Attribute("The leg's track ssrc, reported in trackEnd.")
    answer_sdp = Attribute("The SDP reported in the call's answer event ('' for legs without SDP).")
    last_activity_at = Attribute("When media last arrived from the far end (seconds on the clock), or None.")
    can_transfer = Attribute("Whether refer() and bridging a transfer leg are possible (SIP legs).")
    audio_on_control_socket = Attribute("Whether the leg's audio already travels on the control socket (/call).")
    signals_media_ready = Attribute("Whether the leg reports media_ready (RTP legs: the far end's first packet); "
                                    "an agent waits for it before speaking.")

    def attach(source: AudioSource, sink: AudioSink, events: ILegEvents) -> None:
        """Start exchanging audio: caller frames go to ``sink`` in the receive phase, agent frames
        are pulled from ``source`` in the send phase, far-end happenings go to ``events``."""

    def send_dtmf(digits: str) -> bool:
        """Play DTMF ``digits`` to the far end (RFC 4733 events where the peer negotiated them, else
        in-band tones); False when this leg has no way to (audio on the control socket).  ValueError for
        a character that is not a DTMF digit."""

    def refer(target: str) -> Any:
        """Send a SIP REFER for ``target`` (RFC 3515): Deferred firing with the response
        (``.status``, ``.reason``); NOTIFYs arrive as :meth:`ILegEvents.transfer_progress`."""

    def send_message(body: str, content_type: str, headers: Optional[Mapping[str, str]] = None) -> Any:
        """Send an in-dialog SIP MESSAGE: Deferred firing with the final response (``.status``,
        ``.reason``); legs without SIP signalling fail it with :class:`LegSetupError`."""

    def close(headers: Optional[Mapping[str, str]] = None) -> Any:
        """End the leg: signal the far end if it is still up (SIP BYE carrying ``headers``) and
        release the media. Idempotent; returns a Deferred that fires when the resources are free."""


class IIceLeg(ILeg):
    """A leg that takes trickled ICE candidates from the client (``addIceCandidate``: WebRTC legs)."""

    handshake_done = Attribute("Whether the peer connected (ICE and DTLS) at least once.")

    def add_ice_candidate(candidate: str, sdp_mid: Optional[str], sdp_mline_index: Optional[int]) -> None:
        """Apply one remote candidate (``""`` = end of candidates); raises ValueError for a malformed one."""


class IInboundLeg(ILeg):
    """An offered inbound call, before and after it is answered."""

    caller = Attribute("The caller's URI (From).")
    callee = Attribute("The called URI (To).")
    offer_sdp = Attribute("The offer as text.")
    custom_headers = Attribute("The request's non-standard headers (dict: X-*, P-*, Diversion ...), for the incoming event.")

    def prepare() -> None:
        """Answer the offer's SDP and open the media (early media possible from here).
        Raises :class:`LegSetupError` after declining the call (488) itself."""

    def ring(early_media: bool) -> None:
        """Send 180 Ringing, or 183 with our SDP when ``early_media``."""

    def answer() -> Any:
        """Send 200 OK with our SDP: a Deferred firing when it is confirmed (ACK), failing with
        :class:`LegRejectedError` (487 when the caller cancelled first, 408 without an ACK)."""

    def reject(code: int, reason: str) -> None:
        """Decline the call with a final response."""


class ILegDialer(Interface):
    """Places outbound legs of one call kind (``sip``, ``webSocket``, ``webrtc``)."""

    def dial(option: Any, call_id: str, on_ringing: Callable[[bool], None]) -> Any:
        """Start a leg for ``option`` (a CallOption): returns a Deferred firing with the answered
        :class:`ILeg`; cancelling it cancels the attempt (SIP CANCEL).  Raises
        :class:`LegSetupError` at once when the attempt cannot start (bad target, no ports);
        the Deferred fails with :class:`LegRejectedError` when the far end declines and with
        :class:`LegSetupError` when its answer cannot be used.  ``on_ringing(early_media)``
        is called for each provisional response above 100."""


class IInboundLegFactory(Interface):
    """Wraps an inbound call offered by the SIP user agent into an :class:`IInboundLeg`."""

    def inbound(call: Any, option: Any) -> IInboundLeg:
        """The leg for ``call`` (a user-agent InboundCall) with the call option (may be None)."""


Headers = Mapping[str, str]
RingingCallback = Callable[[bool], None]
