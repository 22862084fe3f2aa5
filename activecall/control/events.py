"""Control events (server → client, protocol.md §3) as frozen dataclasses.

Each event class has ``name`` (the wire ``event`` value) and ``to_json()``
giving exactly the wire keys in the order of the spec's event table.
Optional fields that are None are omitted; ``metrics.data`` and
``custom.data`` are always present (null allowed).  Timestamps are passed
in by the caller (ms since the epoch); RFC 3339 strings come from
:func:`format_rfc3339`.

Leading required fields are positional; every field from the first optional
one on is keyword-only, so the field order can follow the wire order.

Pure module: stdlib only.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Union, get_args

from activecall.timefmt import format_rfc3339, format_rfc3339_z

__all__ = [
    "Attendee",
    "Event",
    "EVENT_TYPES",
    "encode_event",
    "format_rfc3339",
    "format_rfc3339_z",
    "IncomingEvent",
    "AnswerEvent",
    "RejectEvent",
    "RingingEvent",
    "MediaReadyEvent",
    "HangupEvent",
    "TrackStartEvent",
    "TrackEndEvent",
    "InterruptionEvent",
    "SpeakingEvent",
    "SilenceEvent",
    "AsrDeltaEvent",
    "AsrFinalEvent",
    "DtmfEvent",
    "HoldEvent",
    "TransferRequestEvent",
    "MessageEvent",
    "RingbackStateEvent",
    "InactivityEvent",
    "MetricsEvent",
    "ErrorEvent",
    "AddHistoryEvent",
    "CustomEvent",
    "InterruptEvent",
    "FunctionCallEvent",
    "AnswerMachineDetectionEvent",
    "EouEvent",
    "OtherEvent",
]


def _w(key: str, default: Any = dataclasses.MISSING, *, keep: bool = False) -> Any:
    """A field whose wire key is ``key``; ``keep`` emits it even when None."""
    return dataclasses.field(default=default, metadata={"key": key, "keep": keep})


def _encode(value: Any) -> Any:
    if isinstance(value, Attendee):
        return value.to_json()
    if isinstance(value, dict):
        return dict(value)
    return value


class _EventBase:
    """Shared ``to_json`` for event dataclasses declared with :func:`_w`."""

    __slots__ = ()
    name: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        """The wire JSON object: ``event`` first, then the fields; None-valued optionals omitted."""
        out: dict[str, Any] = {"event": self.name}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key = f.metadata.get("key")
            if key is None:
                continue
            value = getattr(self, f.name)
            if value is None and not f.metadata["keep"]:
                continue
            out[key] = _encode(value)
        return out


# A SIP/SIPS URI: user[:password]@host[:port][;params][?headers]
_URI_RE = re.compile(
    r"""sips?:
        (?:(?P<user>[^@:;?]*)(?::[^@;?]*)?@)?
        (?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]+)
        (?::\d+)?
        (?:[;?].*)?""",
    re.IGNORECASE | re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class Attendee:
    """A call party as in the ``hangup`` event's ``from``/``to`` (§3.2)."""

    username: str
    realm: str
    source: str

    @classmethod
    def from_uri(cls, uri: str) -> Attendee:
        """Parse ``sip:1001@pbx.example.com``; unparseable → empty username and realm.

        ``source`` is always the text given.
        """
        text = uri.strip()
        # name-addr ("Bob" <sip:bob@host>;tag=x): only the part inside <> is the URI.
        start = text.find("<")
        if start >= 0:
            end = text.find(">", start)
            text = text[start + 1 : end] if end >= 0 else ""
        match = _URI_RE.fullmatch(text.strip())
        if match is None:
            return cls(username="", realm="", source=uri)
        return cls(username=match.group("user") or "", realm=match.group("host"), source=uri)

    def to_json(self) -> dict[str, str]:
        """``{"username":…,"realm":…,"source":…}``."""
        return {"username": self.username, "realm": self.realm, "source": self.source}


@dataclass(frozen=True, slots=True)
class IncomingEvent(_EventBase):
    """A pending inbound call's media is being prepared."""

    name: ClassVar[str] = "incoming"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    caller: str = _w("caller")
    callee: str = _w("callee")
    sdp: str = _w("sdp")
    _: KW_ONLY
    headers: dict[str, str] | None = _w("headers", None)


@dataclass(frozen=True, slots=True)
class AnswerEvent(_EventBase):
    """A call leg connected; ``sdp`` per path (§3.2)."""

    name: ClassVar[str] = "answer"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    sdp: str = _w("sdp")
    _: KW_ONLY
    refer: bool = _w("refer", False)


@dataclass(frozen=True, slots=True)
class RejectEvent(_EventBase):
    """An outbound/transfer INVITE failed, or ``accept`` found no pending call."""

    name: ClassVar[str] = "reject"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    reason: str = _w("reason")
    _: KW_ONLY
    code: int | None = _w("code", None)
    refer: bool | None = _w("refer", None)


@dataclass(frozen=True, slots=True)
class RingingEvent(_EventBase):
    """A 1xx (>100) on an outbound leg; ``early_media`` = it carried SDP."""

    name: ClassVar[str] = "ringing"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    early_media: bool = _w("earlyMedia")
    _: KW_ONLY
    refer: bool = _w("refer", False)


@dataclass(frozen=True, slots=True)
class MediaReadyEvent(_EventBase):
    """The first inbound RTP stream of an RTP/SRTP leg was recognised."""

    name: ClassVar[str] = "mediaReady"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")


@dataclass(frozen=True, slots=True)
class HangupEvent(_EventBase):
    """A call leg ended (§3.3); times are RFC 3339 strings from :func:`format_rfc3339`."""

    name: ClassVar[str] = "hangup"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    _: KW_ONLY
    reason: str | None = _w("reason", None)
    initiator: str | None = _w("initiator", None)
    start_time: str = _w("startTime")
    hangup_time: str = _w("hangupTime")
    answer_time: str | None = _w("answerTime", None)
    ringing_time: str | None = _w("ringingTime", None)
    from_: Attendee | None = _w("from", None)
    to: Attendee | None = _w("to", None)
    extra: dict[str, Any] | None = _w("extra", None)
    refer: bool = _w("refer", False)


@dataclass(frozen=True, slots=True)
class TrackStartEvent(_EventBase):
    """A track started (remote leg, SST play, bridge track…)."""

    name: ClassVar[str] = "trackStart"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    _: KW_ONLY
    play_id: str | None = _w("playId", None)


@dataclass(frozen=True, slots=True)
class TrackEndEvent(_EventBase):
    """A track stopped; ``duration`` in ms."""

    name: ClassVar[str] = "trackEnd"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    duration: int = _w("duration")
    ssrc: int = _w("ssrc")
    _: KW_ONLY
    play_id: str | None = _w("playId", None)


@dataclass(frozen=True, slots=True)
class InterruptionEvent(_EventBase):
    """A TTS play was cut; ``total_duration``/``current`` in ms."""

    name: ClassVar[str] = "interruption"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    _: KW_ONLY
    play_id: str | None = _w("playId", None)
    subtitle: str | None = _w("subtitle", None)
    position: int | None = _w("position", None)
    total_duration: int = _w("totalDuration")
    current: int = _w("current")


@dataclass(frozen=True, slots=True)
class SpeakingEvent(_EventBase):
    """VAD: voice lasted ``speechPadding`` ms; ``start_time`` in ms epoch."""

    name: ClassVar[str] = "speaking"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    start_time: int = _w("startTime")
    _: KW_ONLY
    is_filler: bool | None = _w("isFiller", None)
    confidence: float | None = _w("confidence", None)
    refer: bool | None = _w("refer", None)


@dataclass(frozen=True, slots=True)
class SilenceEvent(_EventBase):
    """End of speech (start/length of the speech), silence timeout, or waitInputTimeout."""

    name: ClassVar[str] = "silence"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    start_time: int = _w("startTime")
    duration: int = _w("duration")
    _: KW_ONLY
    refer: bool | None = _w("refer", None)


@dataclass(frozen=True, slots=True)
class _AsrEvent(_EventBase):
    """Fields shared by interim and final transcripts."""

    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    index: int = _w("index")
    _: KW_ONLY
    start_time: int | None = _w("startTime", None)
    end_time: int | None = _w("endTime", None)
    text: str = _w("text")
    is_filler: bool | None = _w("isFiller", None)
    confidence: float | None = _w("confidence", None)
    task_id: str | None = _w("taskId", None)
    refer: bool | None = _w("refer", None)


@dataclass(frozen=True, slots=True)
class AsrDeltaEvent(_AsrEvent):
    """Interim transcript of sentence ``index``."""

    name: ClassVar[str] = "asrDelta"


@dataclass(frozen=True, slots=True)
class AsrFinalEvent(_AsrEvent):
    """Final transcript of sentence ``index``."""

    name: ClassVar[str] = "asrFinal"


@dataclass(frozen=True, slots=True)
class DtmfEvent(_EventBase):
    """A DTMF digit (RFC 4733 or SIP INFO)."""

    name: ClassVar[str] = "dtmf"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    digit: str = _w("digit")
    _: KW_ONLY
    refer: bool | None = _w("refer", None)


@dataclass(frozen=True, slots=True)
class HoldEvent(_EventBase):
    """The remote party put the call on hold (or resumed it)."""

    name: ClassVar[str] = "hold"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    on_hold: bool = _w("onHold")
    _: KW_ONLY
    refer: bool = _w("refer", False)


@dataclass(frozen=True, slots=True)
class TransferRequestEvent(_EventBase):
    """The remote party sent an in-dialog REFER."""

    name: ClassVar[str] = "transferRequest"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    refer_to: str = _w("referTo")
    _: KW_ONLY
    referred_by: str | None = _w("referredBy", None)
    refer: bool = _w("refer", False)


@dataclass(frozen=True, slots=True)
class MessageEvent(_EventBase):
    """The remote party sent an in-dialog SIP MESSAGE."""

    name: ClassVar[str] = "message"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    body: str = _w("body")
    _: KW_ONLY
    content_type: str | None = _w("contentType", None)
    refer: bool = _w("refer", False)


@dataclass(frozen=True, slots=True)
class RingbackStateEvent(_EventBase):
    """Line-state classification of early media (§4.12)."""

    name: ClassVar[str] = "ringbackState"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    state: str = _w("state")
    state_index: int = _w("stateIndex")
    confidence: float = _w("confidence")
    _: KW_ONLY
    prev_state: str | None = _w("prevState", None)
    prev_confidence: float | None = _w("prevConfidence", None)
    is_final: bool = _w("isFinal")
    refer: bool | None = _w("refer", None)


@dataclass(frozen=True, slots=True)
class InactivityEvent(_EventBase):
    """No media from the remote leg for ``inactivityTimeout`` seconds."""

    name: ClassVar[str] = "inactivity"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")


@dataclass(frozen=True, slots=True)
class MetricsEvent(_EventBase):
    """A timing metric; ``data`` is always sent (null allowed)."""

    name: ClassVar[str] = "metrics"
    timestamp: int = _w("timestamp")
    key: str = _w("key")
    duration: int = _w("duration")
    data: Any = _w("data", None, keep=True)


@dataclass(frozen=True, slots=True)
class ErrorEvent(_EventBase):
    """Something failed; ``sender`` names the part (``command``, ``invite``, ``tts``…)."""

    name: ClassVar[str] = "error"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    sender: str = _w("sender")
    error: str = _w("error")
    _: KW_ONLY
    code: int | None = _w("code", None)


@dataclass(frozen=True, slots=True)
class AddHistoryEvent(_EventBase):
    """Echo of the ``history`` command."""

    name: ClassVar[str] = "addHistory"
    _: KW_ONLY
    sender: str | None = _w("sender", None)
    timestamp: int = _w("timestamp")
    speaker: str = _w("speaker")
    text: str = _w("text")


@dataclass(frozen=True, slots=True)
class CustomEvent(_EventBase):
    """Echo of the ``custom`` command; ``data`` is always sent (null allowed)."""

    name: ClassVar[str] = "custom"
    timestamp: int = _w("timestamp")
    _: KW_ONLY
    sender: str | None = _w("sender", None)
    data: Any = _w("data", None, keep=True)


@dataclass(frozen=True, slots=True)
class InterruptEvent(_EventBase):
    """Realtime barge-in; the only event without a timestamp."""

    name: ClassVar[str] = "interrupt"
    _: KW_ONLY
    receiver: str | None = _w("receiver", None)


@dataclass(frozen=True, slots=True)
class FunctionCallEvent(_EventBase):
    """Realtime model tool call; ``function_name`` is the wire ``name``, ``arguments`` JSON text."""

    name: ClassVar[str] = "functionCall"
    track_id: str = _w("trackId")
    call_id: str = _w("callId")
    function_name: str = _w("name")
    arguments: str = _w("arguments")
    timestamp: int = _w("timestamp")


@dataclass(frozen=True, slots=True)
class AnswerMachineDetectionEvent(_EventBase):
    """Defined by AC, never emitted."""

    name: ClassVar[str] = "answerMachineDetection"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    start_time: int = _w("startTime")
    end_time: int = _w("endTime")
    text: str = _w("text")


@dataclass(frozen=True, slots=True)
class EouEvent(_EventBase):
    """End of utterance (a silence-based detector, option `eou`)."""

    name: ClassVar[str] = "eou"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    completed: bool = _w("completed")
    _: KW_ONLY
    interrupt_point: int | None = _w("interruptPoint", None)
    text: str | None = _w("text", None)
    refer: bool | None = _w("refer", None)


@dataclass(frozen=True, slots=True)
class OtherEvent(_EventBase):
    """Defined by AC, never emitted."""

    name: ClassVar[str] = "other"
    track_id: str = _w("trackId")
    timestamp: int = _w("timestamp")
    sender: str = _w("sender")
    _: KW_ONLY
    extra: dict[str, str] | None = _w("extra", None)


Event = Union[
    IncomingEvent,
    AnswerEvent,
    RejectEvent,
    RingingEvent,
    MediaReadyEvent,
    HangupEvent,
    TrackStartEvent,
    TrackEndEvent,
    InterruptionEvent,
    SpeakingEvent,
    SilenceEvent,
    AsrDeltaEvent,
    AsrFinalEvent,
    DtmfEvent,
    HoldEvent,
    TransferRequestEvent,
    MessageEvent,
    RingbackStateEvent,
    InactivityEvent,
    MetricsEvent,
    ErrorEvent,
    AddHistoryEvent,
    CustomEvent,
    InterruptEvent,
    FunctionCallEvent,
    AnswerMachineDetectionEvent,
    EouEvent,
    OtherEvent,
]

EVENT_TYPES: dict[str, type[Event]] = {cls.name: cls for cls in get_args(Event)}


def encode_event(ev: Event) -> str:
    """Compact JSON text of ``ev`` for a WebSocket Text frame (UTF-8, not ASCII-escaped)."""
    return json.dumps(ev.to_json(), separators=(",", ":"), ensure_ascii=False)
