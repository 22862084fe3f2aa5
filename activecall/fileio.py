"""Blocking file helpers shared by the media cache, call records and playbook saves (run them in threads)."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Sequence


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename.

    Readers see the old file or the complete new one, never a partial write;
    a failed write leaves no temporary file behind.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 honours the umask, unlike mkstemp's 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class UnsafePathError(ValueError):
    """A path built from untrusted parts would leave its configured directory."""


def safe_join(base: str, *parts: str) -> str:
    """Join untrusted ``parts`` onto ``base`` and return the absolute result inside ``realpath(base)``.

    Symlinks are resolved before the check, so a link inside ``base`` pointing
    elsewhere is refused too. Raises :class:`UnsafePathError` for an empty part,
    a NUL byte, or a result that is ``base`` itself or lies outside it. An
    absolute part is accepted only when it already lies inside ``base``.
    """
    if not parts or any(not part or "\0" in part for part in parts):
        raise UnsafePathError(f"unsafe path {parts!r}: empty part or NUL byte")
    root = os.path.realpath(base)
    candidate = os.path.realpath(os.path.join(root, *parts))
    if candidate == root or os.path.commonpath([root, candidate]) != root:
        raise UnsafePathError(f"unsafe path {os.path.join(*parts)!r}: outside {root}")
    return candidate


def path_under_any(path: str, bases: Sequence[str]) -> str:
    """Return ``realpath(path)`` (relative paths from the working directory) if it lies in one of ``bases``.

    Raises :class:`UnsafePathError` otherwise; symlinks are resolved first.
    """
    if not path or "\0" in path:
        raise UnsafePathError(f"unsafe path {path!r}: empty or NUL byte")
    absolute = os.path.abspath(path)
    for base in bases:
        try:
            return safe_join(base, absolute)
        except UnsafePathError:
            continue
    raise UnsafePathError(f"{path!r} is not under {', '.join(bases) or 'any allowed directory'}")


_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=-]")
_MAX_NAME_CHARS = 128


def file_safe_name(text: str) -> str:
    """``text`` (a call or session id) as one harmless file-name component.

    Characters other than letters, digits and ``._@+=-`` become ``_``, a leading
    dot too (no hidden files, no ``..``); a long id keeps its first 64 characters
    plus a hash of the whole, so distinct ids stay distinct.
    """
    name = _NAME_UNSAFE.sub("_", text) or "_"
    if name.startswith("."):
        name = "_" + name[1:]
    if len(name) > _MAX_NAME_CHARS:
        name = name[:64] + "-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return name
