"""Call detail records (playbook.md §14): the record model, its JSON, hangup reasons, file naming.

Pure: no clock, no file system.  Everything that needs I/O (file sizes,
whether the event dump exists, saving) is done by the caller or by
:mod:`activecall.call.recordstore` and passed in as plain values.

Hangup reasons come from two places and are recorded differently:

* a client ``hangup`` command: its ``reason`` text and ``initiator`` go
  through AC's mapping (protocol.md §2.3), :func:`hangup_reason_from_command`;
* the daemon itself (inactivity, autoHangup, remote BYE, reject, socket
  close, ...): the reason is already one of the recorded names,
  :func:`hangup_reason_from_name`.

Either way the result is a :data:`RecordedHangupReason`, rendered for the CDR
by :func:`cdr_hangup_reason` and for the ``hangup`` event by
:func:`event_hangup_reason` (protocol.md §3.3).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any, Mapping, Optional, Protocol, Sequence, Union

from activecall.timefmt import format_rfc3339_z

__all__ = [
    "CALL_TYPES",
    "CallRecord",
    "HangupReason",
    "OtherHangupReason",
    "RecordedHangupReason",
    "RecorderFile",
    "build_call_record",
    "cdr_hangup_reason",
    "command_event_reason",
    "event_hangup_reason",
    "hangup_reason_from_command",
    "hangup_reason_from_name",
    "record_file_path",
    "status_code",
]


class HangupReason(str, enum.Enum):
    """The named hangup reasons of a call record (playbook.md §14.2)."""

    BY_CALLER = "byCaller"
    BY_CALLEE = "byCallee"
    BY_REFER = "byRefer"
    BY_SYSTEM = "bySystem"
    AUTOHANGUP = "autohangup"
    INACTIVITY_TIMEOUT = "inactivityTimeout"
    NO_ANSWER = "noAnswer"
    NO_BALANCE = "noBalance"
    ANSWER_MACHINE = "answerMachine"
    SERVER_UNAVAILABLE = "serverUnavailable"
    CANCELED = "canceled"
    REJECTED = "rejected"
    FAILED = "failed"


@dataclass(frozen=True)
class OtherHangupReason:
    """A free-text hangup reason, recorded as ``{"other": text}``."""

    text: str


RecordedHangupReason = Union[HangupReason, OtherHangupReason]

# AC's comparison of a hangup command's reason (lower-cased); noAnswer, noBalance,
# answerMachine and serverUnavailable are deliberately absent: AC cannot reach them.
_COMMAND_REASONS: Mapping[str, HangupReason] = {
    "caller": HangupReason.BY_CALLER,
    "callee": HangupReason.BY_CALLEE,
    "refer": HangupReason.BY_REFER,
    "system": HangupReason.BY_SYSTEM,
    "autohangup": HangupReason.AUTOHANGUP,
    "inactivitytimeout": HangupReason.INACTIVITY_TIMEOUT,
    "canceled": HangupReason.CANCELED,
    "rejected": HangupReason.REJECTED,
    "failed": HangupReason.FAILED,
}

_COMMAND_INITIATORS: Mapping[str, HangupReason] = {
    "caller": HangupReason.BY_CALLER,
    "callee": HangupReason.BY_CALLEE,
    # Not bySystem: AC maps the "system" initiator to Autohangup.
    "system": HangupReason.AUTOHANGUP,
}

_NAMED_REASONS: Mapping[str, HangupReason] = {r.value.lower(): r for r in HangupReason}


def hangup_reason_from_command(reason: Optional[str], initiator: Optional[str]) -> RecordedHangupReason:
    """The recorded reason of a client ``hangup`` command (protocol.md §2.3, playbook.md §14.2).

    ``reason`` is matched case-insensitively (absent or empty → ``bySystem``,
    unknown → other text verbatim); an ``initiator`` of ``caller``, ``callee`` or
    ``system`` then overrides it (exact match, as AC compares it).
    """
    recorded: RecordedHangupReason
    if not reason:
        recorded = HangupReason.BY_SYSTEM
    else:
        recorded = _COMMAND_REASONS.get(reason.lower(), OtherHangupReason(reason))
    if initiator is not None and initiator in _COMMAND_INITIATORS:
        recorded = _COMMAND_INITIATORS[initiator]
    return recorded


def hangup_reason_from_name(name: str) -> RecordedHangupReason:
    """The recorded reason for a daemon-side hangup: a reason name (any case) or other text.

    E.g. ``"inactivityTimeout"``, ``"bySystem"`` (autoHangup), ``"canceled"``
    (socket close, ``/kill``), ``"DTMF Hangup"`` → ``{"other": "DTMF Hangup"}``.
    """
    return _NAMED_REASONS.get(name.lower(), OtherHangupReason(name))


def cdr_hangup_reason(reason: RecordedHangupReason) -> Union[str, dict[str, str]]:
    """The CDR ``hangupReason`` JSON value: the reason's name or ``{"other": text}``."""
    if isinstance(reason, HangupReason):
        return reason.value
    return {"other": reason.text}


def event_hangup_reason(reason: RecordedHangupReason) -> str:
    """The ``hangup`` event's clean ``reason`` string for a daemon-side hangup (protocol.md §3.3)."""
    if isinstance(reason, HangupReason):
        return reason.value
    return reason.text


def command_event_reason(reason: Optional[str]) -> str:
    """The ``hangup`` event's ``reason`` for a client ``hangup`` command: its text verbatim, else ``byClient``."""
    return reason if reason else "byClient"


# -- the record ---------------------------------------------------------------

CALL_TYPES: Mapping[str, str] = {"sip": "sip", "webrtc": "webrtc", "websocket": "webSocket", "b2bua": "b2bua"}
_MEDIA_SESSION_TYPES = frozenset({"webrtc", "webSocket"})


class _ToJson(Protocol):
    def to_json(self) -> dict[str, Any]:
        """The object's wire JSON."""


@dataclass(frozen=True)
class RecorderFile:
    """One recording of a call; ``size`` (bytes) is None when the file does not exist."""

    track_id: str
    path: str
    size: Optional[int]
    extra: Optional[Mapping[str, Any]] = None


@dataclass(frozen=True)
class CallRecord:
    """Everything a call record says about one call leg; times are epoch seconds on the injected clock.

    ``option`` is the call's final ``CallOption`` (or its JSON).  ``sip_status``
    is the final SIP status sent or received, if any.  ``recorder`` sizes and
    ``dump_event_file_exists`` must be found off the reactor thread by the
    caller.  ``refer`` is the transfer leg's record (rendered as ``b2bua``).
    """

    call_type: str
    call_id: str
    start_s: float
    end_s: float
    option: Union[Mapping[str, Any], _ToJson, None] = None
    ring_s: Optional[float] = None
    answer_s: Optional[float] = None
    caller: Optional[str] = None
    callee: Optional[str] = None
    sip_status: Optional[int] = None
    hangup_reason: Optional[RecordedHangupReason] = None
    hangup_messages: Sequence[Mapping[str, Any]] = ()
    recorder: Sequence[RecorderFile] = ()
    extras: Optional[Mapping[str, Any]] = None
    dump_event_file: Optional[str] = None
    dump_event_file_exists: bool = False
    refer: Optional["CallRecord"] = field(default=None)


def normalize_call_type(call_type: str) -> str:
    """The CDR spelling of a call type (``webSocket``, not ``websocket``); ValueError if unknown."""
    try:
        return CALL_TYPES[call_type.lower()]
    except KeyError:
        raise ValueError(f"unknown call type {call_type!r}; expected one of {', '.join(CALL_TYPES.values())}") from None


def status_code(
    call_type: str,
    answered: bool,
    sip_status: Optional[int],
    reason: Optional[RecordedHangupReason],
) -> int:
    """The CDR ``statusCode`` (playbook.md §14.2).

    WebSocket/WebRTC sessions: 200 once media is set up, else 0.  SIP legs: 200
    when answered; otherwise the final status sent or received as-is; with no
    status, 487 for a cancelled call and 500 (unknown) for anything else.
    """
    kind = normalize_call_type(call_type)
    if kind in _MEDIA_SESSION_TYPES:
        return 200 if answered else 0
    if answered:
        # A call ended by BYE after its 2xx is still a 200 call.
        return 200
    if sip_status is not None:
        return sip_status
    if reason is HangupReason.CANCELED:
        return 487
    return 500


def build_call_record(record: CallRecord, *, call_type: Optional[str] = None) -> dict[str, Any]:
    """The record's JSON object (playbook.md §14.2): camelCase, unset fields omitted, never null.

    ``call_type`` overrides ``record.call_type`` (used for the nested transfer leg).
    """
    kind = normalize_call_type(call_type or record.call_type)
    out: dict[str, Any] = {"callType": kind}
    option = _option_json(record.option)
    if option is not None:
        out["option"] = option
    out["callId"] = record.call_id
    out["startTime"] = format_rfc3339_z(record.start_s)
    if record.ring_s is not None:
        out["ringTime"] = format_rfc3339_z(record.ring_s)
    if record.answer_s is not None:
        out["answerTime"] = format_rfc3339_z(record.answer_s)
    out["endTime"] = format_rfc3339_z(record.end_s)
    out["caller"] = record.caller or ""
    out["callee"] = record.callee or ""
    out["statusCode"] = status_code(kind, record.answer_s is not None, record.sip_status, record.hangup_reason)
    if record.hangup_reason is not None:
        out["hangupReason"] = cdr_hangup_reason(record.hangup_reason)
    if record.hangup_messages:
        out["hangupMessages"] = [_drop_none(dict(m)) for m in record.hangup_messages]
    recorder = [_recorder_json(f) for f in record.recorder if f.size is not None]
    if recorder:
        out["recorder"] = recorder
    if record.extras is not None:
        out["extras"] = _drop_none(dict(record.extras))
    if record.dump_event_file and record.dump_event_file_exists:
        out["dumpEventFile"] = record.dump_event_file
    if record.refer is not None:
        out["referCallrecord"] = build_call_record(record.refer, call_type="b2bua")
    return out


def _recorder_json(f: RecorderFile) -> dict[str, Any]:
    item: dict[str, Any] = {"trackId": f.track_id, "path": f.path, "size": f.size}
    if f.extra is not None:
        item["extra"] = dict(f.extra)
    return item


def _option_json(option: Union[Mapping[str, Any], _ToJson, None]) -> Optional[dict[str, Any]]:
    if option is None:
        return None
    raw = option.to_json() if hasattr(option, "to_json") else dict(option)  # type: ignore[call-overload]
    # CallOption.to_json keeps ``sip: null`` for /list; a CDR never carries null.
    return _drop_none(raw)


def _drop_none(value: Any) -> Any:
    """``value`` with every None-valued object member removed, recursively."""
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


# -- file naming ----------------------------------------------------------------

def record_file_path(root: str, call_id: str, start_epoch_s: float, tz: Optional[tzinfo] = None) -> str:
    """``<root>/<YYYYMMDD>/<YYYYMMDD-HHMMSS>_<callId>.json`` in ``tz`` (None: local time) of the call start.

    An empty ``root`` gives a path relative to the working directory.  Path
    separators in ``call_id`` (a client may choose it) become ``_`` so the
    record stays under ``root``.
    """
    start = datetime.fromtimestamp(start_epoch_s, tz)
    safe_id = call_id.replace("/", "_").replace("\\", "_").replace("\0", "_")
    return os.path.join(root, start.strftime("%Y%m%d"), f"{start:%Y%m%d-%H%M%S}_{safe_id}.json")
