"""Bounded ASCII-digit integers, the one number reader of the wire parsers (SIP, SDP).

Pure.  ``str.isdigit()`` also takes ``'\u0663'`` and ``'\u00b2'``, and ``int()`` of more
than 4,300 digits raises a plain ``ValueError``; :func:`bounded_int` accepts ASCII digits
only and checks the length before converting, so hostile numbers cost nothing and fail
with the caller's own parse error.
"""

from __future__ import annotations

import re

__all__ = ["bounded_int"]

_DIGITS_RE = re.compile(r"[0-9]+\Z")


def bounded_int(text: str, what: str, high: int, *, low: int = 0,
                error: type[ValueError] = ValueError) -> int:
    """``text`` as an integer in ``low..high``, or raise ``error(message)``.

    Only ASCII digits count, leading zeros are allowed, and the length is
    checked before ``int()`` so a 5000-digit value is refused without
    converting it.  The message names ``what``.
    """
    if not _DIGITS_RE.match(text):
        raise error(f"bad {what}: {text[:40]!r}")
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(high)):
        raise error(f"{what} out of range: {text[:40]!r}")
    value = int(digits)
    if not low <= value <= high:
        raise error(f"{what} out of range: {text[:40]!r}")
    return value
