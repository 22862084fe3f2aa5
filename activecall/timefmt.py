"""Wall-clock times as the wire and the call records spell them (RFC 3339, UTC)."""

from __future__ import annotations

from datetime import datetime, timezone


def format_rfc3339(epoch_s: float) -> str:
    """UTC RFC 3339 with microseconds and ``+00:00``, e.g. ``2026-08-14T07:31:40.100000+00:00``."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat(timespec="microseconds")


def format_rfc3339_z(epoch_s: float) -> str:
    """As :func:`format_rfc3339` but ending in ``Z`` (the ``/list`` form)."""
    return format_rfc3339(epoch_s)[: -len("+00:00")] + "Z"
