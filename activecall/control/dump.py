"""The event dump of a session: every command and event, one JSON line each, in ``<recording dir>/<sid>.events.jsonl``.

Creating a file costs far more than writing a line (0.1–1 ms on a loaded disk,
once per call), so the reactor thread never touches the file: it formats the
line and queues it; one :class:`DumpWriter` thread per process opens, appends
(each line written at once, unbuffered, so a crash of the daemon loses at
most what is still queued) and closes, in the order the session asked.
Whether the directory can be written is checked before the session starts, so
a client still learns at once that its dump will not be written.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import IO, Optional

from twisted.logger import Logger

from activecall.fileio import file_safe_name, safe_join

__all__ = ["DumpWriter", "EventDump", "dump_path_for", "dump_writer"]

#: Operations queued for the writer thread at most; beyond, lines are dropped (and one warning per dump says so).
MAX_QUEUED = 100_000
_ENCODER = json.JSONEncoder(ensure_ascii=False)  # built once: json.dumps(..., ensure_ascii=False) builds one per call

#: How long the writer waits for more work before it sleeps until woken.
LINGER_S = 0.002


def dump_path_for(directory: str, sid: str) -> str:
    """``<directory>/<sid>.events.jsonl``, the id made a harmless file name; raises UnsafePathError
    when the result would still lie outside ``directory`` (e.g. through a symlink)."""
    return safe_join(directory, file_safe_name(sid) + ".events.jsonl")


class DumpWriter:
    """One daemon thread running the queued file work of every dump, first in, first out.

    The thread starts with the first job; :meth:`drain` waits for what is
    queued so far; :meth:`stop` drains and ends the thread (run at interpreter
    exit for the process's writer, so a clean shutdown writes every line).
    Queueing is a deque append.  The thread is woken only when it went idle,
    and before going idle it lingers ``linger_s`` for more lines, so a busy
    daemon wakes it (and hands it the GIL) a few hundred times a second at
    most, not once per line; a line waits ``linger_s`` at most.
    """

    _log = Logger()

    def __init__(self, max_queued: int = MAX_QUEUED, linger_s: float = LINGER_S) -> None:
        self._jobs: deque[Optional[Callable[[], None]]] = deque()
        self._max_queued = max_queued
        self._linger_s = linger_s
        self._wake = threading.Event()
        self._idle = False
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job`` for the thread; False (job dropped) when ``max_queued`` jobs wait."""
        if len(self._jobs) >= self._max_queued:
            return False
        self._put(job)
        return True

    def _put(self, job: Optional[Callable[[], None]]) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    thread = threading.Thread(target=self._run, name="activecall-dump", daemon=True)
                    thread.start()
                    self._thread = thread
        self._jobs.append(job)
        if self._idle:
            self._idle = False
            self._wake.set()

    def drain(self, timeout_s: Optional[float] = None) -> bool:
        """Block until every job queued before this call ran; False on timeout."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._put(done.set)
        return done.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Run what is queued, then end the thread."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._put(None)
        thread.join(timeout_s)
        self._thread = None

    def _run(self) -> None:
        jobs = self._jobs
        while True:
            while jobs:
                job = jobs.popleft()
                if job is None:
                    return
                try:
                    job()
                except Exception:  # the thread is the boundary: one dump's failure must not stop the others
                    self._log.failure("event dump job failed")
            # More lines usually follow within milliseconds: take them in one batch.
            # (Nobody sets the event while the thread is not idle: this is a timed pause.)
            self._wake.wait(self._linger_s)
            if jobs:
                continue
            # Say idle, then look again: a job queued in between is never left waiting.
            self._idle = True
            if jobs:
                self._idle = False
                continue
            self._wake.wait()
            self._wake.clear()


_writer: Optional[DumpWriter] = None
_writer_lock = threading.Lock()


def dump_writer() -> DumpWriter:
    """The process's writer thread for event dumps (created on first use, drained at exit)."""
    global _writer
    if _writer is None:
        with _writer_lock:
            if _writer is None:
                _writer = DumpWriter()
                atexit.register(_writer.stop)
    return _writer


def _unwritable(path: str) -> Optional[str]:
    """Why ``path`` cannot be appended to (a cheap check: no file is created), else None."""
    directory = os.path.dirname(path) or "."
    try:
        if not os.path.isdir(directory):
            os.makedirs(directory, exist_ok=True)
    except OSError as e:
        return e.strerror or str(e)
    if not os.access(directory, os.W_OK | os.X_OK):
        return os.strerror(errno.EACCES)
    if not os.access(path, os.W_OK) and os.path.lexists(path):
        return os.strerror(errno.EACCES)
    return None


class EventDump:
    """Appends every command and event of a session to its ``.events.jsonl`` file, up to ``max_bytes``.

    ``problem`` says why nothing is written (the file cannot be opened), else
    None; it is known on return from the constructor when the directory or an
    existing file is not writable, and set by the writer when opening fails
    anyway.  ``submit`` runs the file work (default: the process's
    :func:`dump_writer` thread); the reactor thread only formats lines.
    """

    _log = Logger()

    def __init__(self, path: str, max_bytes: Optional[int] = None, *,
                 submit: Optional[Callable[[Callable[[], None]], bool]] = None) -> None:
        self.path = path
        self.problem: Optional[str] = None
        self._max_bytes = max_bytes
        self._submit = submit if submit is not None else dump_writer().submit
        # Written by the writer only.
        self._size = 0
        self._file: Optional[IO[bytes]] = None
        # Set by either side; once True nothing more is queued.
        self._stopped = False
        self._dropped = False
        self._closed = threading.Event()
        why = _unwritable(path)
        if why is not None:
            self._fail(why, path)
            self._closed.set()
            return
        if not self._submit(self._open):
            self._fail("too many event dump writes queued", path)
            self._closed.set()

    def _fail(self, why: str, detail: object) -> None:
        self.problem = f"cannot write event dump: {why}"
        self._stopped = True
        self._log.warn("cannot write event dump {path}: {e}", path=self.path, e=detail)

    # -- the reactor side -------------------------------------------------------

    def write(self, kind: str, timestamp_ms: int, content: str) -> None:
        """Queue one line (encoded by the writer, which appends it at once: a crash loses nothing already written)."""
        if self._stopped:
            return
        if not self._submit(lambda: self._append(kind, timestamp_ms, content)) and not self._dropped:
            self._dropped = True
            self._log.warn("event dump {path}: writer queue full, lines dropped", path=self.path)

    def close(self) -> None:
        """Close the file once every queued line is written; later writes are ignored."""
        if self._stopped:
            return
        self._stopped = True
        if not self._submit(self._close_file):
            self._log.warn("event dump {path}: writer queue full, file closed late", path=self.path)

    def wait_closed(self, timeout_s: Optional[float] = None) -> bool:
        """Block (in a worker thread, never the reactor) until the file is complete and closed."""
        return self._closed.wait(timeout_s)

    # -- the writer side ------------------------------------------------------

    def _open(self) -> None:
        try:
            self._file = open(self.path, "ab", buffering=0)
            # A reused id appends: the bound covers what the file already holds.
            self._size = self._file.tell()
        except OSError as e:
            self._fail(e.strerror or str(e), e)
            self._closed.set()

    def _append(self, kind: str, timestamp_ms: int, content: str) -> None:
        if self._file is None:
            return
        line = (_ENCODER.encode({"type": kind, "timestamp": timestamp_ms, "content": content}) + "\n").encode("utf-8", "replace")
        if self._max_bytes is not None and self._size + len(line) > self._max_bytes:
            self._log.warn("event dump {path} reached max_dump_bytes ({max_bytes}); the rest of this session is not recorded",
                           path=self.path, max_bytes=self._max_bytes)
            self._stopped = True
            self._close_file()
            return
        try:
            self._file.write(line)
            self._size += len(line)
        except OSError as e:
            self._log.warn("event dump {path} failed: {e}", path=self.path, e=e)
            self._stopped = True
            self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError as e:
                self._log.warn("event dump {path} failed: {e}", path=self.path, e=e)
        self._closed.set()
