"""Rust ``regex``-dialect patterns and replacement templates, run with Python ``re`` (config.md §12).

Pure.  The configuration's ``[[rewrites]]``, ``[[trunk_rules]]`` and ``[[handler.rules]]``
patterns are written for the Rust ``regex`` crate.  :func:`compile_rust_regex` respells the
forms Python lacks (``\\z``, ``(?<name>...)``, ``\\x{...}``) and refuses Rust-only syntax
rather than misreading it; :func:`convert_replacement` turns ``$1``/``${name}``/``$$`` into
``re.sub`` form.
"""

from __future__ import annotations

import re
import string
import warnings as _warnings

__all__ = ["compile_rust_regex", "convert_replacement"]


def _class_set_error(pattern: str, i: int) -> str | None:
    """Describe Rust-only syntax starting at ``pattern[i]`` inside a character class, if any."""
    c = pattern[i]
    if c == "[":
        if pattern.startswith("[:", i):
            end = pattern.find(":]", i + 2)
            name = pattern[i : end + 2] if end >= 0 else "[:"
            return f"POSIX class {name} is not supported at position {i}"
        return f"nested character class is not supported at position {i}"
    if c in "&~" and pattern.startswith(c * 2, i):
        return f"character class set operation {c * 2!r} is not supported at position {i}"
    return None


def _translate_rust_regex(pattern: str) -> str:
    """Respell Rust ``regex`` forms Python lacks; ``ValueError`` on Rust-only syntax."""
    out: list[str] = []
    i = 0
    n = len(pattern)
    in_class = False
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if nxt in "pP":
                raise ValueError(f"Unicode class \\{nxt} is not supported at position {i}")
            if nxt == "z" and not in_class:
                out.append("\\Z")  # Rust \z (end of text) is Python \Z
                i += 2
                continue
            if nxt == "x" and pattern.startswith("{", i + 2):
                end = pattern.find("}", i + 3)
                digits = pattern[i + 3 : end] if end > 0 else ""
                if 0 < len(digits) <= 8 and all(d in string.hexdigits for d in digits):
                    out.append(f"\\U{int(digits, 16):08x}")
                    i = end + 1
                    continue
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            problem = _class_set_error(pattern, i)
            if problem is not None:
                raise ValueError(problem)
            if c == "]":
                in_class = False
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            # A ']' first in a class is a literal in both dialects.
            if i < n and pattern[i] == "]":
                out.append("]")
                i += 1
            continue
        if pattern.startswith("(?<", i) and i + 3 < n and pattern[i + 3] not in "=!":
            out.append("(?P<")  # Rust also spells named groups (?<name>...)
            i += 3
            continue
        out.append(c)
        i += 1
    return "".join(out)


def compile_rust_regex(pattern: str) -> re.Pattern[str]:
    """Compile a Rust ``regex``-dialect pattern with Python ``re``.

    Raises ``ValueError`` (also for ``re.error``) whose text is the reason, e.g.
    ``"unterminated character set at position 3"``; Rust-only syntax (``\\p{…}``,
    ``[[:alpha:]]``, class set operations) is rejected rather than silently misread.
    """
    translated = _translate_rust_regex(pattern)
    # Python warns (FutureWarning) where it reads a pattern differently from other engines.
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        try:
            return re.compile(translated)
        except re.error as e:
            raise ValueError(str(e)) from None
        except Warning as w:
            raise ValueError(str(w)) from None


_REPLACEMENT_REF = re.compile(r"\$(?:(\$)|\{([_0-9A-Za-z]+)\}|([_0-9A-Za-z]+))")


def convert_replacement(template: str, pattern: re.Pattern[str] | None = None) -> str:
    """Convert a Rust replacement (``$1``, ``${1}``, ``$name``, ``$$``) to ``re.sub`` form.

    ``$1`` becomes ``\\1`` (``\\g<1>`` when a digit follows), ``$name`` becomes ``\\g<name>``.

    Backslashes are escaped so they stay literal. With ``pattern``, references to groups it
    does not have become empty strings, as in Rust (Python would raise at substitution time).
    """
    out: list[str] = []
    pos = 0
    for m in _REPLACEMENT_REF.finditer(template):
        out.append(template[pos : m.start()].replace("\\", "\\\\"))
        pos = m.end()
        if m.group(1) is not None:
            out.append("$")
            continue
        name = m.group(2) if m.group(2) is not None else m.group(3)
        if name.isdigit():
            number = int(name)
            if pattern is not None and number > pattern.groups:
                continue
            following = template[pos : pos + 1]
            out.append(f"\\g<{number}>" if following.isdigit() else f"\\{number}")
        else:
            if pattern is not None and name not in pattern.groupindex:
                continue
            out.append(f"\\g<{name}>")
    out.append(template[pos:].replace("\\", "\\\\"))
    return "".join(out)
