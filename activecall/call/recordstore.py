"""Where call records go (config.md §10): local JSON files or an HTTP multipart POST.

A store saves one record JSON object (built by
:func:`activecall.call.record.build_call_record`); :class:`CallRecordWriter`
runs at most 32 saves at once and turns every failure into a log entry and a
count, so a broken store never breaks a call's teardown.  All file work
(directories, writes, reading media, deleting copies) goes through the
injected ``run_blocking(f, *args) -> Deferred`` and never runs on the reactor
thread.  ``[callrecord] type = "s3"`` is not implemented yet.
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import tzinfo
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from activecall.fetch import SIGNATURE_HEADER, Fetcher, signature
from activecall.fileio import file_safe_name, safe_join, write_atomically
from activecall.call.record import record_file_path
from activecall.config import CallRecordConfig

__all__ = [
    "CallRecordUploadError",
    "CallRecordWriter",
    "HttpCallRecordStore",
    "ICallRecordStore",
    "LocalCallRecordStore",
    "MAX_CONCURRENT_SAVES",
    "file_sizes",
    "make_store",
]

RunBlocking = Callable[..., "Deferred[Any]"]

# config.md §10: "Up to 32 records are saved concurrently."
MAX_CONCURRENT_SAVES = 32
_JSON_FIELD = "calllog.json"


class ICallRecordStore(Protocol):
    """Saves one call record; fires with where it went (file path or URL), or fails."""

    def save(self, record: Mapping[str, Any], start_epoch_s: float) -> "Deferred[str]":
        """Save ``record``; ``start_epoch_s`` (call start) names the file or object."""


class CallRecordUploadError(Exception):
    """The HTTP record endpoint answered with a non-2xx status."""

    def __init__(self, url: str, code: int) -> None:
        super().__init__(f"POST {url} answered {code}")
        self.url = url
        self.code = code


def _encode_record(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def file_sizes(run_blocking: RunBlocking, paths: Iterable[str]) -> "Deferred[dict[str, Optional[int]]]":
    """Sizes in bytes of ``paths`` (None for a missing file), found off the reactor thread.

    What a caller needs for :class:`~activecall.call.record.RecorderFile` sizes
    and ``dump_event_file_exists`` before building a record.
    """
    return run_blocking(_stat_sizes, list(paths))


def _stat_sizes(paths: Sequence[str]) -> dict[str, Optional[int]]:
    sizes: dict[str, Optional[int]] = {}
    for path in paths:
        try:
            sizes[path] = os.path.getsize(path) if os.path.isfile(path) else None
        except OSError:
            sizes[path] = None
    return sizes


# -- local ---------------------------------------------------------------------

class LocalCallRecordStore:
    """Writes ``<root>/<YYYYMMDD>/<YYYYMMDD-HHMMSS>_<callId>.json`` (local time of the call start).

    The file appears whole or not at all: it is written to a hidden temporary
    file in the same directory and renamed into place.
    """

    def __init__(self, root: str, run_blocking: RunBlocking, tz: Optional[tzinfo] = None) -> None:
        self._root = root
        self._run_blocking = run_blocking
        self._tz = tz

    def save(self, record: Mapping[str, Any], start_epoch_s: float) -> "Deferred[str]":
        """Write the record; fires with its path (always inside ``root``)."""
        # A client may choose the call id: it becomes one harmless name component.
        relative = record_file_path("", file_safe_name(str(record["callId"])), start_epoch_s, self._tz)
        d: Deferred[str] = self._run_blocking(_write_inside, self._root or ".", relative, _encode_record(record))
        return d


def _write_inside(root: str, relative: str, data: bytes) -> str:
    """Write ``data`` at ``root/relative`` after the realpath check (worker thread); return the path."""
    path = safe_join(root, relative)
    write_atomically(path, data)
    return path




# -- http ----------------------------------------------------------------------

class HttpCallRecordStore:
    """POSTs ``multipart/form-data`` to ``url`` (config.md §10).

    Parts: text field ``calllog.json`` (the record); with ``with_media``, a file
    part ``media_<trackId>`` per listed recording and ``dump_events_<file name>``
    for the event dump.  A non-2xx answer fails the save (no retry).  After a
    successful upload with media, the uploaded recordings are deleted unless
    ``keep_media_copy`` (activecall's meaning, not AC's inverted one).

    The body is assembled off the reactor thread and sent from memory through the bounded
    :class:`~activecall.fetch.Fetcher` (``[fetch]`` timeouts, same-host redirects only), signed
    with ``X-Activecall-Signature`` when ``[webhook] signing_secret`` is set.
    """

    _log = Logger()

    def __init__(
        self,
        url: str,
        headers: Iterable[tuple[str, str]],
        with_media: bool,
        keep_media_copy: bool,
        http_client: Fetcher,
        run_blocking: RunBlocking,
        clock: IReactorTime,
        boundary: Callable[[], str] = lambda: secrets.token_hex(16),
        signing_secret: Optional[str] = None,
    ) -> None:
        self._url = url
        self._headers = tuple(headers)
        self._with_media = with_media
        self._keep_media_copy = keep_media_copy
        self._http = http_client
        self._run_blocking = run_blocking
        self._clock = clock
        self._boundary = boundary
        self._signing_secret = signing_secret

    def save(self, record: Mapping[str, Any], start_epoch_s: float) -> "Deferred[str]":
        """Upload the record (and media); fires with the URL."""
        return Deferred.fromCoroutine(self._save(record))

    async def _save(self, record: Mapping[str, Any]) -> str:
        media: list[tuple[str, str]] = []
        if self._with_media:
            media = [(f"media_{item['trackId']}", item["path"]) for item in record.get("recorder", ())]
            dump = record.get("dumpEventFile")
            if dump:
                media.append((f"dump_events_{os.path.basename(dump)}", dump))
        boundary = self._boundary()
        body, sent, missing = await self._run_blocking(_multipart_body, boundary, _encode_record(record), media)
        for path in missing:
            self._log.warn("call record {call_id}: {path} is gone, not uploaded", call_id=record.get("callId"), path=path)
        headers = Headers()
        for key, value in self._headers:
            headers.addRawHeader(key, value)
        # Our boundary must win over any configured Content-Type.
        headers.setRawHeaders(b"Content-Type", [b"multipart/form-data; boundary=" + boundary.encode("ascii")])
        if self._signing_secret is not None:
            headers.setRawHeaders(SIGNATURE_HEADER, [signature(self._signing_secret, body, self._clock.seconds())])
        # The Fetcher bounds time and answer size; a POST answered 301-303 comes back as a failure.
        response = await self._http.post(self._url, body, headers)
        if not 200 <= response.code < 300:
            raise CallRecordUploadError(self._url, response.code)
        recordings = [path for name, path in sent if name.startswith("media_")]
        if recordings and not self._keep_media_copy:
            failed: list[tuple[str, str]] = await self._run_blocking(_delete_files, recordings)
            for path, error in failed:
                self._log.warn("call record {call_id}: cannot delete {path}: {error}",
                               call_id=record.get("callId"), path=path, error=error)
        return self._url


def _disposition_value(text: str) -> str:
    """A quoted-string-safe form-data name or filename (HTML form encoding of ``"``, CR, LF)."""
    return text.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _multipart_body(
    boundary: str, record_json: bytes, files: Sequence[tuple[str, str]],
) -> tuple[bytes, list[tuple[str, str]], list[str]]:
    """The multipart body, the (part name, path) pairs sent and the paths missing (worker thread)."""
    dash = b"--" + boundary.encode("ascii")
    chunks = [
        dash,
        b'\r\nContent-Disposition: form-data; name="' + _JSON_FIELD.encode() + b'"\r\n\r\n',
        record_json,
        b"\r\n",
    ]
    sent: list[tuple[str, str]] = []
    missing: list[str] = []
    for name, path in files:
        try:
            with open(path, "rb") as f:
                content = f.read()
        except OSError:
            missing.append(path)
            continue
        sent.append((name, path))
        chunks += [
            dash,
            b'\r\nContent-Disposition: form-data; name="' + _disposition_value(name).encode("utf-8")
            + b'"; filename="' + _disposition_value(os.path.basename(path)).encode("utf-8") + b'"\r\n',
            b"Content-Type: application/octet-stream\r\n\r\n",
            content,
            b"\r\n",
        ]
    chunks.append(dash + b"--\r\n")
    return b"".join(chunks), sent, missing


def _delete_files(paths: Sequence[str]) -> list[tuple[str, str]]:
    """Delete ``paths`` (worker thread); returns the (path, error) pairs that failed."""
    failed: list[tuple[str, str]] = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            failed.append((path, str(e)))
    return failed


# -- writer --------------------------------------------------------------------

class CallRecordWriter:
    """Saves records through a store, at most ``max_concurrent`` at once; the rest wait in order.

    A failed save (store error, non-2xx, exception) is logged with the whole
    record as a log field, so a JSON log keeps it, and counted in ``failed``;
    the Deferred returned by :meth:`write` never fails.
    """

    _log = Logger()

    def __init__(self, store: ICallRecordStore, max_concurrent: int = MAX_CONCURRENT_SAVES) -> None:
        self._store = store
        self._semaphore = DeferredSemaphore(max_concurrent)
        self._unfinished = 0
        self._idle_waiters: list[Deferred[None]] = []
        self.saved = 0
        self.failed = 0

    @property
    def active(self) -> int:
        """Saves running now."""
        return self._semaphore.limit - self._semaphore.tokens

    @property
    def queued(self) -> int:
        """Saves waiting for a free slot."""
        return len(self._semaphore.waiting)

    def write(self, record: Mapping[str, Any], start_epoch_s: float) -> "Deferred[Optional[str]]":
        """Save ``record``; fires with where it went, or None if saving failed (already logged)."""
        self._unfinished += 1
        done: Deferred[Optional[str]] = Deferred()

        def saved(where: str) -> None:
            self.saved += 1
            self._finish(done, where)

        def failed(f: Failure) -> None:
            self.failed += 1
            self._log.failure("call record {call_id} not saved", f, call_id=_call_id(record), record=record)
            self._finish(done, None)

        self._semaphore.run(self._store.save, record, start_epoch_s).addCallbacks(saved, failed)
        return done

    def _finish(self, done: "Deferred[Optional[str]]", where: Optional[str]) -> None:
        self._unfinished -= 1
        if self._unfinished == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        done.callback(where)

    def drain(self) -> "Deferred[None]":
        """Fires once every record written so far is saved or given up (for shutdown)."""
        if self._unfinished == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter


def _call_id(record: Any) -> Any:
    return record.get("callId") if isinstance(record, Mapping) else None


# -- factory -------------------------------------------------------------------

def make_store(
    config: CallRecordConfig,
    *,
    run_blocking: RunBlocking,
    http_client: Fetcher,
    clock: IReactorTime,
    tz: Optional[tzinfo] = None,
    signing_secret: Optional[str] = None,
) -> ICallRecordStore:
    """The store for a ``[callrecord]`` table; ValueError for ``s3`` (not implemented yet)."""
    if config.type == "local":
        return LocalCallRecordStore(config.root or "", run_blocking, tz)
    if config.type == "http":
        if not config.url:
            raise ValueError("callrecord type http needs a url")
        return HttpCallRecordStore(
            config.url, config.headers, config.with_media, config.keep_media_copy,
            http_client, run_blocking, clock, signing_secret=signing_secret,
        )
    if config.type == "s3":
        raise ValueError("callrecord type s3 is not supported yet")
    raise ValueError(f"unknown callrecord type {config.type!r}")
