"""Control commands (client → server, protocol.md §2) as frozen dataclasses.

:func:`decode_command` turns one Text frame into a typed command or raises
:class:`CommandError` whose ``message`` is the text of the ``error`` event
(§2.1); :func:`encode_command` gives the wire JSON back (SSE ``command``
events, the event dump, ``/command`` forwarding).

Pure module: stdlib only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Union, get_args

from activecall.options import (
    CallOption,
    CommandError,
    RecorderOption,
    ReferOption,
    SynthesisOption,
    WireObject,
    check_any,
    check_bool,
    check_sip_headers,
    check_sip_header_value,
    check_sip_text,
    check_str,
    check_u32,
    nested,
    wire_field,
)

__all__ = [
    "CommandError",
    "Command",
    "COMMAND_TYPES",
    "decode_command",
    "command_from_object",
    "encode_command",
    "InviteCommand",
    "StartCommand",
    "AcceptCommand",
    "RejectCommand",
    "RingingCommand",
    "TtsCommand",
    "PlayCommand",
    "InterruptCommand",
    "PauseCommand",
    "ResumeCommand",
    "HangupCommand",
    "ReferCommand",
    "MessageCommand",
    "BridgeCommand",
    "UnbridgeCommand",
    "AddIceCandidateCommand",
    "MuteCommand",
    "UnmuteCommand",
    "HistoryCommand",
    "CustomCommand",
]


@dataclass(frozen=True, slots=True)
class InviteCommand(WireObject):
    """Start the outbound leg of this session's path (§5.1–5.3)."""

    name: ClassVar[str] = "invite"

    option: CallOption = wire_field("option", nested(CallOption))


@dataclass(frozen=True, slots=True)
class StartCommand(InviteCommand):
    """**activecall** alias of ``invite`` on every path."""

    name: ClassVar[str] = "start"


@dataclass(frozen=True, slots=True)
class AcceptCommand(WireObject):
    """Answer the pending inbound SIP call (§5.4)."""

    name: ClassVar[str] = "accept"

    option: CallOption = wire_field("option", nested(CallOption))


@dataclass(frozen=True, slots=True)
class RejectCommand(WireObject):
    """Refuse the pending inbound call with SIP status ``code``."""

    name: ClassVar[str] = "reject"

    reason: str = wire_field("reason", check_str)
    code: int = wire_field("code", check_u32, 603)


@dataclass(frozen=True, slots=True)
class RingingCommand(WireObject):
    """Prepare inbound media and send 180 (or 183 with early media / a ringtone)."""

    name: ClassVar[str] = "ringing"

    recorder: RecorderOption | None = wire_field("recorder", nested(RecorderOption), None)
    early_media: bool = wire_field("earlyMedia", check_bool, False)
    ringtone: str | None = wire_field("ringtone", check_str, None)


@dataclass(frozen=True, slots=True)
class TtsCommand(WireObject):
    """Speak ``text`` on the server-side track (§5.7); ``wait_input_timeout`` is in ms."""

    name: ClassVar[str] = "tts"

    text: str = wire_field("text", check_str)
    speaker: str | None = wire_field("speaker", check_str, None)
    play_id: str | None = wire_field("playId", check_str, None)
    auto_hangup: bool = wire_field("autoHangup", check_bool, False)
    streaming: bool = wire_field("streaming", check_bool, False)
    end_of_stream: bool = wire_field("endOfStream", check_bool, False)
    option: SynthesisOption | None = wire_field("option", nested(SynthesisOption), None)
    wait_input_timeout: int | None = wire_field("waitInputTimeout", check_u32, None)
    base64: bool = wire_field("base64", check_bool, False)
    cache_key: str | None = wire_field("cacheKey", check_str, None)


@dataclass(frozen=True, slots=True)
class PlayCommand(WireObject):
    """Play an audio file or URL on the server-side track; ``wait_input_timeout`` in ms."""

    name: ClassVar[str] = "play"

    url: str = wire_field("url", check_str)
    play_id: str | None = wire_field("playId", check_str, None)
    auto_hangup: bool = wire_field("autoHangup", check_bool, False)
    wait_input_timeout: int | None = wire_field("waitInputTimeout", check_u32, None)
    offset_ms: int = wire_field("offsetMs", check_u32, 0)

    @property
    def effective_play_id(self) -> str:
        """The playId reported in events: ``play_id``, else the URL (§6 item 14)."""
        return self.url if self.play_id is None else self.play_id


@dataclass(frozen=True, slots=True)
class InterruptCommand(WireObject):
    """Stop playback on the server-side track (``fade_out_ms``: fade it out over that time, at most 2 s)."""

    name: ClassVar[str] = "interrupt"

    graceful: bool = wire_field("graceful", check_bool, False)
    fade_out_ms: int | None = wire_field("fadeOutMs", check_u32, None)


@dataclass(frozen=True, slots=True)
class PauseCommand(WireObject):
    """Freeze the current server-side playback."""

    name: ClassVar[str] = "pause"


@dataclass(frozen=True, slots=True)
class ResumeCommand(WireObject):
    """Continue a paused server-side playback."""

    name: ClassVar[str] = "resume"


@dataclass(frozen=True, slots=True)
class HangupCommand(WireObject):
    """End the call (or only the transfer leg with ``refer``); ``headers`` go on the BYE."""

    name: ClassVar[str] = "hangup"

    reason: str | None = wire_field("reason", check_str, None)
    initiator: str | None = wire_field("initiator", check_str, None)
    headers: dict[str, str] | None = wire_field("headers", check_sip_headers, None)
    refer: bool = wire_field("refer", check_bool, False)


@dataclass(frozen=True, slots=True)
class ReferCommand(WireObject):
    """Transfer by bridging a new outbound SIP leg (§5.5); ``caller`` may be ``""``."""

    name: ClassVar[str] = "refer"

    caller: str = wire_field("caller", check_sip_text)
    callee: str = wire_field("callee", check_sip_text)
    options: ReferOption | None = wire_field("options", nested(ReferOption), None)


@dataclass(frozen=True, slots=True)
class MessageCommand(WireObject):
    """Send an in-dialog SIP MESSAGE (§5.9)."""

    name: ClassVar[str] = "message"

    body: str = wire_field("body", check_str)
    content_type: str = wire_field("contentType", check_sip_header_value, "text/plain;charset=utf-8")
    headers: dict[str, str] | None = wire_field("headers", check_sip_headers, None)
    refer: bool = wire_field("refer", check_bool, False)


@dataclass(frozen=True, slots=True)
class BridgeCommand(WireObject):
    """Patch remote-party audio both ways with another session (§5.8)."""

    name: ClassVar[str] = "bridge"

    target_session_id: str = wire_field("targetSessionId", check_str)


@dataclass(frozen=True, slots=True)
class UnbridgeCommand(WireObject):
    """Remove the bridge with another session."""

    name: ClassVar[str] = "unbridge"

    target_session_id: str = wire_field("targetSessionId", check_str)


@dataclass(frozen=True, slots=True)
class AddIceCandidateCommand(WireObject):
    """Trickle one client ICE candidate (§5.2); also accepts ``sdpMLineIndex``."""

    name: ClassVar[str] = "addIceCandidate"

    candidate: str = wire_field("candidate", check_str)
    sdp_mid: str | None = wire_field("sdpMid", check_str, None)
    sdp_mline_index: int | None = wire_field(
        "sdpMlineIndex", check_u32, None, aliases=("sdpMLineIndex",)
    )


@dataclass(frozen=True, slots=True)
class MuteCommand(WireObject):
    """Zero the audio of ``track_id`` (all tracks when None)."""

    name: ClassVar[str] = "mute"

    track_id: str | None = wire_field("trackId", check_str, None)


@dataclass(frozen=True, slots=True)
class UnmuteCommand(WireObject):
    """Undo ``mute`` for ``track_id`` (all tracks when None)."""

    name: ClassVar[str] = "unmute"

    track_id: str | None = wire_field("trackId", check_str, None)


@dataclass(frozen=True, slots=True)
class HistoryCommand(WireObject):
    """Add a line to the conversation history; echoed as ``addHistory``."""

    name: ClassVar[str] = "history"

    speaker: str = wire_field("speaker", check_str)
    text: str = wire_field("text", check_str)


@dataclass(frozen=True, slots=True)
class CustomCommand(WireObject):
    """Free-form message echoed as a ``custom`` event; ``data`` is any JSON (absent = null)."""

    name: ClassVar[str] = "custom"

    sender: str | None = wire_field("sender", check_str, None)
    data: Any = wire_field("data", check_any, None, keep_none=True, null_is_value=True)


Command = Union[
    InviteCommand,
    StartCommand,
    AcceptCommand,
    RejectCommand,
    RingingCommand,
    TtsCommand,
    PlayCommand,
    InterruptCommand,
    PauseCommand,
    ResumeCommand,
    HangupCommand,
    ReferCommand,
    MessageCommand,
    BridgeCommand,
    UnbridgeCommand,
    AddIceCandidateCommand,
    MuteCommand,
    UnmuteCommand,
    HistoryCommand,
    CustomCommand,
]

COMMAND_TYPES: dict[str, type[Command]] = {cls.name: cls for cls in get_args(Command)}


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity; JSON (and AC's serde parser) does not.
    raise ValueError(f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    # 1e400 parses to inf, which could not be written back as JSON.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range: {text}")
    return value


def command_from_object(obj: object) -> Command:
    """Decode an already-parsed JSON value into a command; raises :class:`CommandError`."""
    if not isinstance(obj, dict):
        raise CommandError.invalid("command", "expected an object")
    name = obj.get("command")
    if name is None:
        raise CommandError.missing("command")
    if not isinstance(name, str):
        raise CommandError.invalid("command", "expected a string")
    cls = COMMAND_TYPES.get(name)
    if cls is None:
        raise CommandError(f"unknown command: {name}")
    return cls.from_json(obj, name)


def decode_command(text: str | bytes) -> Command:
    """Parse one Text frame (JSON) into a command; raises :class:`CommandError`."""
    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float)
    except RecursionError:
        raise CommandError("invalid JSON: nesting too deep") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CommandError(f"invalid JSON: {exc}") from None
    return command_from_object(obj)


def encode_command(cmd: Command) -> dict[str, Any]:
    """The wire JSON object of ``cmd`` (``command`` first, None-valued fields omitted)."""
    out: dict[str, Any] = {"command": cmd.name}
    out.update(cmd.to_json())
    return out
