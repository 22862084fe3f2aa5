"""The query parameters of the control WebSocket endpoints (spec §1.1)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from activecall.ids import MAX_ID_CHARS

DEFAULT_SERVER_SIDE_TRACK = "server-side-track"
DEFAULT_PING_S = 20
_U32_TEXT = re.compile(r"[0-9]{1,10}")


class QueryError(ValueError):
    """A query parameter has the wrong type; the upgrade is refused with HTTP 400."""


@dataclass(frozen=True)
class SessionParams:
    """What a client chose for its session when connecting."""

    sid: str
    call_type: str  # "webSocket" (/call), "sip" (/call/sip), "webrtc" (/call/webrtc)
    dump: bool = True
    ping_s: int = DEFAULT_PING_S
    server_side_track: str = DEFAULT_SERVER_SIDE_TRACK
    forward: bool | None = None


def _single(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    return values[-1]


def _bool(params: Mapping[str, Sequence[str]], name: str) -> bool | None:
    value = _single(params, name)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise QueryError(f"invalid query parameter {name}: expected true or false, got {value!r}")
    return value == "true"


def _identifier(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    """A session or track id: 1..MAX_ID_CHARS printable characters, no whitespace or control characters."""
    value = _single(params, name)
    if value is None or value == "":
        return None
    if len(value) > MAX_ID_CHARS:
        raise QueryError(f"invalid query parameter {name}: longer than {MAX_ID_CHARS} characters")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise QueryError(f"invalid query parameter {name}: control or whitespace characters are not allowed")
    return value


def parse_session_query(params: Mapping[str, Sequence[str]], call_type: str, new_sid: Callable[[], str]) -> SessionParams:
    """Validate ``id``, ``dump``, ``ping``, ``serverSideTrack``, ``forward``; unknown keys are ignored."""
    sid = _identifier(params, "id") or new_sid()
    dump = _bool(params, "dump")
    ping_text = _single(params, "ping")
    ping_s = DEFAULT_PING_S
    if ping_text is not None:
        # ASCII digits only: str.isdigit() also accepts "²", which int() rejects.
        if _U32_TEXT.fullmatch(ping_text) is None or int(ping_text) > 0xFFFFFFFF:
            raise QueryError(f"invalid query parameter ping: expected seconds as an unsigned integer, got {ping_text!r}")
        ping_s = int(ping_text)
    sst = _identifier(params, "serverSideTrack") or DEFAULT_SERVER_SIDE_TRACK
    forward_text = _single(params, "forward")
    forward = None if forward_text is None else forward_text == "true"
    return SessionParams(
        sid=sid,
        call_type=call_type,
        dump=True if dump is None else dump,
        ping_s=ping_s,
        server_side_track=sst,
        forward=forward,
    )
