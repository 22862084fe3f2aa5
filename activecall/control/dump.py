"""The event dump of a session: every command and event, one JSON line each, in ``<recording dir>/<sid>.events.jsonl``."""

from __future__ import annotations

import json
import os
from typing import IO, Optional

from twisted.logger import Logger

from activecall.fileio import file_safe_name, safe_join


def dump_path_for(directory: str, sid: str) -> str:
    """``<directory>/<sid>.events.jsonl``, the id made a harmless file name; raises UnsafePathError
    when the result would still lie outside ``directory`` (e.g. through a symlink)."""
    return safe_join(directory, file_safe_name(sid) + ".events.jsonl")


class EventDump:
    """Appends every command and event of a session to its ``.events.jsonl`` file, up to ``max_bytes``.

    ``problem`` says why nothing is written (the file could not be opened), else None.
    """

    _log = Logger()

    def __init__(self, path: str, max_bytes: Optional[int] = None) -> None:
        self.path = path
        self.problem: Optional[str] = None
        self._max_bytes = max_bytes
        self._size = 0
        self._file: Optional[IO[bytes]] = None
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._file = open(path, "ab")
            # A reused id appends: the bound covers what the file already holds.
            self._size = self._file.tell()
        except OSError as e:
            self.problem = f"cannot write event dump: {e.strerror or e}"
            self._log.warn("cannot write event dump {path}: {e}", path=path, e=e)

    def write(self, kind: str, timestamp_ms: int, content: str) -> None:
        """Append one line; flushed so a crash loses nothing already reported."""
        if self._file is None:
            return
        line = (json.dumps({"type": kind, "timestamp": timestamp_ms, "content": content}, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        if self._max_bytes is not None and self._size + len(line) > self._max_bytes:
            self._log.warn("event dump {path} reached max_dump_bytes ({max_bytes}); the rest of this session is not recorded",
                           path=self.path, max_bytes=self._max_bytes)
            self.close()
            return
        try:
            self._file.write(line)
            self._file.flush()
            self._size += len(line)
        except OSError as e:
            self._log.warn("event dump {path} failed: {e}", path=self.path, e=e)
            self.close()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            f, self._file = self._file, None
            f.close()
