"""The ``.env`` file (config.md §1.3): ``KEY=VALUE`` lines loaded into the environment.

:func:`parse_dotenv` is pure (text in, pairs out); :func:`load_dotenv` reads the file and
fills a mapping without overwriting what is already set.  Errors are
:class:`~activecall.config.ConfigError` values naming the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from typing import Final

from activecall.config import ConfigError, unreadable_reason

__all__ = ["load_dotenv", "parse_dotenv"]

_DOTENV_LINE = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*)")
_DOTENV_ESCAPES: Final = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


def _dotenv_value(raw: str) -> str:
    """Unquote one ``.env`` value: double quotes with escapes, single quotes literal."""
    raw = raw.strip()
    if raw[:1] == '"':
        out: list[str] = []
        i = 1
        while i < len(raw):
            c = raw[i]
            if c == "\\" and i + 1 < len(raw):
                out.append(_DOTENV_ESCAPES.get(raw[i + 1], "\\" + raw[i + 1]))
                i += 2
                continue
            if c == '"':
                return "".join(out)
            out.append(c)
            i += 1
        return raw  # unterminated: keep the text as written
    if raw[:1] == "'":
        end = raw.find("'", 1)
        return raw if end < 0 else raw[1:end]
    # Unquoted: a '#' after whitespace starts a comment.
    m = re.search(r"\s#", raw)
    if m is not None:
        raw = raw[: m.start()]
    return raw.strip()


def parse_dotenv(text: str) -> list[tuple[str, str]]:
    """Parse ``.env`` text into ``(name, value)`` pairs in file order."""
    pairs = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _DOTENV_LINE.fullmatch(line)
        if m is None:
            continue
        pairs.append((m.group(1), _dotenv_value(m.group(2))))
    return pairs


def load_dotenv(path: str = ".env", environ: MutableMapping[str, str] | None = None) -> None:
    """Load ``KEY=VALUE`` lines from ``path`` into ``environ`` (default ``os.environ``).

    A missing file is fine; variables already set are never overwritten (config.md §1.3).
    """
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as e:
        reason = unreadable_reason(e.errno, e.strerror) if isinstance(e, OSError) else f"not UTF-8: {e}"
        raise ConfigError(path, reason) from None
    for name, value in parse_dotenv(text):
        if name not in env:
            env[name] = value
