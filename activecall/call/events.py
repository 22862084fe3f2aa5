"""What happens on a call, as the call layer reports it (domain events).

Past-tense, frozen, with ``now`` in float seconds on the injected clock and
durations in the units their names say.  ``track`` is the call's own track
(the session id) or its server-side track (agent audio, a transfer leg).
The control layer turns these into wire events (``activecall.control.dispatch``);
a playbook runner or an agent pipeline can watch a call without any JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass(frozen=True, slots=True)
class CallOffered:
    """An inbound call was offered to this session (the ``incoming`` of the spec)."""

    now: float
    track: str
    caller: str
    callee: str
    sdp: str
    headers: Optional[dict[str, str]] = None


@dataclass(frozen=True, slots=True)
class RingingReported:
    """The far end (or a transfer target) is ringing."""

    now: float
    track: str
    early_media: bool
    refer: bool = False


@dataclass(frozen=True, slots=True)
class CallAnswered:
    """The call (or its transfer leg, ``refer``) was answered."""

    now: float
    track: str
    sdp: str
    refer: bool = False


@dataclass(frozen=True, slots=True)
class CallDeclined:
    """The far end declined the call or transfer, or there was nothing to accept."""

    now: float
    track: str
    reason: str
    code: Optional[int] = None
    refer: Optional[bool] = None


@dataclass(frozen=True, slots=True)
class MediaArrived:
    """The first media of a leg arrived."""

    now: float
    track: str


@dataclass(frozen=True, slots=True)
class TrackStarted:
    """A track started: the call's media, or a play/TTS/bridge on the server-side track."""

    now: float
    track: str
    play_id: Optional[str] = None


@dataclass(frozen=True, slots=True)
class TrackEnded:
    """A track ended after ``duration_s``."""

    now: float
    track: str
    duration_s: float
    ssrc: int
    play_id: Optional[str] = None


@dataclass(frozen=True, slots=True)
class PlayInterrupted:
    """Agent speech was cut: what had been said and how far it got."""

    now: float
    track: str
    play_id: Optional[str]
    subtitle: Optional[str]
    total_ms: int
    current_ms: int
    position: Optional[int] = None  # index of the word being heard, when the provider gave word timings


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The caller's voice has lasted ``speechPadding`` (the ``speaking`` of the spec); it began at ``started_at``."""

    now: float
    track: str
    started_at: float
    refer: Optional[bool] = None


@dataclass(frozen=True, slots=True)
class SpeechEnded:
    """A stretch of the caller's speech ended: it began at ``started_at`` and lasted ``duration_ms``."""

    now: float
    track: str
    started_at: float
    duration_ms: int
    refer: Optional[bool] = None


@dataclass(frozen=True, slots=True)
class SilenceLasted:
    """The caller has been silent since ``started_at`` for ``duration_ms`` (VAD ``silenceTimeout``)."""

    now: float
    track: str
    started_at: float
    duration_ms: int
    refer: Optional[bool] = None


@dataclass(frozen=True, slots=True)
class TranscriptHeard:
    """What the recognizer heard of sentence ``index``: interim (``final`` False) or final."""

    now: float
    track: str
    final: bool
    index: int
    text: str
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    confidence: Optional[float] = None
    is_filler: Optional[bool] = None
    refer: Optional[bool] = None


@dataclass(frozen=True, slots=True)
class TurnEnded:
    """The caller finished a turn (end of utterance): ``text`` is what they said in it, if recognized."""

    now: float
    track: str
    completed: bool
    text: Optional[str] = None
    refer: Optional[bool] = None


@dataclass(frozen=True, slots=True)
class DtmfReceived:
    """The far end pressed a key."""

    now: float
    track: str
    digit: str
    refer: Optional[bool] = None


@dataclass(frozen=True, slots=True)
class HoldChanged:
    """The far end put the call on hold or took it off."""

    now: float
    track: str
    on_hold: bool


@dataclass(frozen=True, slots=True)
class InputTimedOut:
    """Nobody reacted for ``duration_ms`` after a play asked for input (waitInputTimeout)."""

    now: float
    track: str
    started_at: float
    duration_ms: int


@dataclass(frozen=True, slots=True)
class CallInactive:
    """No caller media for the call's inactivity timeout."""

    now: float
    track: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """An in-dialog SIP MESSAGE arrived."""

    now: float
    track: str
    body: str
    content_type: Optional[str] = None


@dataclass(frozen=True, slots=True)
class TransferRequested:
    """The far end asked us to transfer the call (REFER)."""

    now: float
    track: str
    refer_to: str
    referred_by: Optional[str] = None


@dataclass(frozen=True, slots=True)
class MetricsMeasured:
    """A measurement (TTS time to first byte, synthesis time)."""

    now: float
    key: str
    duration_ms: int
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HistoryAdded:
    """A line of conversation history was added."""

    now: float
    sender: str
    speaker: str
    text: str


@dataclass(frozen=True, slots=True)
class CustomSent:
    """A client's custom payload, echoed to every listener."""

    now: float
    sender: Optional[str]
    data: Any


@dataclass(frozen=True, slots=True)
class ErrorOccurred:
    """Something asked of the call could not be done; the call goes on unless it says otherwise."""

    now: float
    track: str
    sender: str
    message: str
    code: Optional[int] = None


@dataclass(frozen=True, slots=True)
class ModelInterrupted:
    """Realtime mode: the remote party's speech cut the model's answer (``receiver``: that leg's track)."""

    now: float
    receiver: str


@dataclass(frozen=True, slots=True)
class FunctionCalled:
    """Realtime mode: the model asked for tool ``name`` with ``arguments`` (JSON text)."""

    now: float
    track: str
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class CallEnded:
    """The call (or its transfer leg, ``refer``) ended.

    ``call_type`` is set for the call itself (its record extras), None for a transfer leg.
    """

    now: float
    track: str
    reason: str
    initiator: str
    started_at: float
    answered_at: Optional[float] = None
    rang_at: Optional[float] = None
    caller: Optional[str] = None
    callee: Optional[str] = None
    call_type: Optional[str] = None
    refer: bool = False


CallEvent = Union[
    CallOffered, RingingReported, CallAnswered, CallDeclined, MediaArrived, TrackStarted, TrackEnded,
    PlayInterrupted, SpeechStarted, SpeechEnded, SilenceLasted, TranscriptHeard, TurnEnded, DtmfReceived, HoldChanged, InputTimedOut, CallInactive, MessageReceived,
    TransferRequested, MetricsMeasured, HistoryAdded, CustomSent, ErrorOccurred, ModelInterrupted, FunctionCalled,
    CallEnded,
]

#: Events that count as "the caller reacted": they cancel a pending waitInputTimeout.
INPUT_EVENTS = (DtmfReceived, TrackStarted, SpeechStarted, TranscriptHeard)
