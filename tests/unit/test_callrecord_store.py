"""Tests for activecall.call.recordstore: local and HTTP CDR stores and the concurrency-capped writer."""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Optional

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from activecall.call.recordstore import (
    CallRecordUploadError,
    CallRecordWriter,
    HttpCallRecordStore,
    LocalCallRecordStore,
    file_sizes,
    make_store,
)
from activecall.config import CallRecordConfig, FetchConfig
from activecall.fetch import Fetcher
from activecall.fileio import UnsafePathError

_T0 = datetime(2026, 8, 14, 7, 31, 40, 100000, tzinfo=timezone.utc).timestamp()
_URL = "http://cdr.example.com/upload"


def fetcher(resource: Resource, clock: Clock) -> Fetcher:
    """A Fetcher over StubTreq with a 60 s total timeout."""
    return Fetcher(StubTreq(resource), clock, FetchConfig(timeout_s=60.0))


def run_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """A run_blocking that runs the job at once (the worker thread, collapsed)."""
    return maybeDeferred(f, *args)


class QueuedRunBlocking:
    """A run_blocking whose jobs wait until the test runs them, as a busy thread pool would."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_next(self) -> None:
        """Run the oldest waiting job."""
        f, args, d = self.jobs.pop(0)
        maybeDeferred(f, *args).chainDeferred(d)


def _record(call_id: str = "s.1", **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"callType": "sip", "callId": call_id, "startTime": "2026-08-14T07:31:40.100000Z",
                              "endTime": "2026-08-14T07:32:10.100000Z", "caller": "", "callee": "",
                              "statusCode": 200, "hangupReason": "byCaller"}
    record.update(extra)
    return record


class LocalStoreTests(SynchronousTestCase):
    """LocalCallRecordStore writes each record whole into its date directory."""

    def setUp(self) -> None:
        self.root = self.mktemp()

    def test_writes_dated_file(self) -> None:
        """The record lands at <root>/<YYYYMMDD>/<YYYYMMDD-HHMMSS>_<callId>.json with no temp file left."""
        store = LocalCallRecordStore(self.root, run_now, tz=timezone.utc)
        record = _record(extras={"name": "Zoë"})
        path = self.successResultOf(store.save(record, _T0))
        self.assertEqual(path, os.path.realpath(os.path.join(self.root, "20260814", "20260814-073140_s.1.json")))
        with open(path, encoding="utf-8") as f:
            self.assertEqual(json.load(f), record)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["20260814-073140_s.1.json"])

    def test_io_runs_in_run_blocking(self) -> None:
        """Nothing touches the disk until the injected run_blocking runs the job."""
        pool = QueuedRunBlocking()
        store = LocalCallRecordStore(self.root, pool, tz=timezone.utc)
        d = store.save(_record(), _T0)
        self.assertNoResult(d)
        self.assertFalse(os.path.exists(self.root))
        pool.run_next()
        self.assertTrue(os.path.isfile(self.successResultOf(d)))

    def test_replaces_whole_file(self) -> None:
        """Saving again replaces the file atomically rather than appending to it."""
        store = LocalCallRecordStore(self.root, run_now, tz=timezone.utc)
        path = self.successResultOf(store.save(_record(extras={"pad": "x" * 5000}), _T0))
        self.successResultOf(store.save(_record(statusCode=486), _T0))
        with open(path, encoding="utf-8") as f:
            self.assertEqual(json.load(f)["statusCode"], 486)

    def test_failed_write_leaves_no_temp_file(self) -> None:
        """When the rename fails the save fails and the temporary file is removed."""
        store = LocalCallRecordStore(self.root, run_now, tz=timezone.utc)
        target = os.path.join(self.root, "20260814", "20260814-073140_s.1.json")
        os.makedirs(os.path.join(target, "blocker"))
        self.failureResultOf(store.save(_record(), _T0), OSError)
        self.assertEqual(os.listdir(os.path.dirname(target)), ["20260814-073140_s.1.json"])
        self.assertTrue(os.path.isdir(target))

    def test_hostile_call_ids_stay_inside_root(self) -> None:
        """Call ids with separators, dot-dots, NUL or 10 000 characters give a file inside root."""
        store = LocalCallRecordStore(self.root, run_now, tz=timezone.utc)
        root = os.path.realpath(self.root)
        for call_id in ("../../../tmp/evil", "..\\..\\x", "a\0b", "x" * 10000, ".."):
            path = self.successResultOf(store.save(_record(call_id=call_id), _T0))
            self.assertEqual(os.path.dirname(path), os.path.join(root, "20260814"), call_id[:20])
            self.assertLess(len(os.path.basename(path)), 200)

    def test_symlinked_date_dir_out_of_root_is_refused(self) -> None:
        """A date directory that is a symlink out of root fails the save instead of writing there."""
        outside = os.path.realpath(self.mktemp())
        os.makedirs(outside)
        os.makedirs(self.root)
        os.symlink(outside, os.path.join(self.root, "20260814"))
        store = LocalCallRecordStore(self.root, run_now, tz=timezone.utc)
        self.failureResultOf(store.save(_record(), _T0), UnsafePathError)
        self.assertEqual(os.listdir(outside), [])

    def test_file_sizes(self) -> None:
        """file_sizes reports sizes of existing files and None for missing ones."""
        os.makedirs(self.root)
        present = os.path.join(self.root, "a.wav")
        with open(present, "wb") as f:
            f.write(b"\0" * 44)
        sizes = self.successResultOf(file_sizes(run_now, [present, os.path.join(self.root, "gone.wav"), self.root]))
        self.assertEqual(sizes, {present: 44, os.path.join(self.root, "gone.wav"): None, self.root: None})


class UploadResource(Resource):
    """The record endpoint: keeps every request's headers and parsed multipart parts."""

    isLeaf = True

    def __init__(self, code: int = 200, hang: bool = False) -> None:
        super().__init__()
        self.code = code
        self.hang = hang
        self.requests: list[dict[str, Any]] = []

    def render_POST(self, request: Request) -> Any:
        assert request.content is not None
        request.content.seek(0)
        body = request.content.read()
        content_type = request.getHeader("content-type") or ""
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        parts = []
        for part in message.iter_parts():
            parts.append({
                "name": part.get_param("name", header="content-disposition"),
                "filename": part.get_filename(),
                "content": part.get_payload(decode=True),
            })
        self.requests.append({
            "content_type": content_type,
            "authorization": request.getHeader("authorization"),
            "signature": request.getHeader("x-activecall-signature"),
            "parts": parts,
            "body": body,
        })
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        return b"ok"


class HttpStoreTests(SynchronousTestCase):
    """HttpCallRecordStore POSTs the record and media as multipart/form-data."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.wav = os.path.join(self.dir, "s.1.wav")
        self.dump = os.path.join(self.dir, "s.1.events.jsonl")
        with open(self.wav, "wb") as f:
            f.write(b"RIFF" + bytes(range(256)) * 4)
        with open(self.dump, "wb") as f:
            f.write(b'{"type":"event"}\n')
        self.record = _record(recorder=[{"trackId": "s.1", "path": self.wav, "size": 1028}],
                              dumpEventFile=self.dump)

    def _store(self, resource: UploadResource, with_media: bool, keep_media_copy: bool = False,
               headers: tuple[tuple[str, str], ...] = (("Authorization", "Bearer t0k"),),
               signing_secret: Optional[str] = None) -> HttpCallRecordStore:
        return HttpCallRecordStore(_URL, headers, with_media, keep_media_copy, fetcher(resource, self.clock), run_now,
                                   self.clock, boundary=lambda: "b0undary", signing_secret=signing_secret)

    def test_record_only(self) -> None:
        """Without with_media only the calllog.json field is sent, with the configured headers."""
        resource = UploadResource()
        where = self.successResultOf(self._store(resource, with_media=False).save(self.record, _T0))
        self.assertEqual(where, _URL)
        [req] = resource.requests
        self.assertEqual(req["content_type"], "multipart/form-data; boundary=b0undary")
        self.assertEqual(req["authorization"], "Bearer t0k")
        self.assertEqual([p["name"] for p in req["parts"]], ["calllog.json"])
        self.assertIsNone(req["parts"][0]["filename"])
        self.assertEqual(json.loads(req["parts"][0]["content"]), self.record)
        self.assertTrue(req["body"].endswith(b"--b0undary--\r\n"))
        self.assertTrue(os.path.exists(self.wav))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_with_media_deletes_copy(self) -> None:
        """With media, recordings and the event dump are sent; recordings are deleted afterwards."""
        resource = UploadResource(code=201)
        self.successResultOf(self._store(resource, with_media=True).save(self.record, _T0))
        [req] = resource.requests
        self.assertEqual(
            [(p["name"], p["filename"]) for p in req["parts"]],
            [("calllog.json", None), ("media_s.1", "s.1.wav"), ("dump_events_s.1.events.jsonl", "s.1.events.jsonl")],
        )
        self.assertEqual(req["parts"][1]["content"], b"RIFF" + bytes(range(256)) * 4)
        self.assertEqual(req["parts"][2]["content"], b'{"type":"event"}\n')
        self.assertFalse(os.path.exists(self.wav))
        self.assertTrue(os.path.exists(self.dump))

    def test_keep_media_copy(self) -> None:
        """keep_media_copy = true keeps the local recording after a successful upload."""
        resource = UploadResource()
        self.successResultOf(self._store(resource, with_media=True, keep_media_copy=True).save(self.record, _T0))
        self.assertEqual(len(resource.requests[0]["parts"]), 3)
        self.assertTrue(os.path.exists(self.wav))

    def test_non_2xx_fails_and_keeps_media(self) -> None:
        """A non-2xx answer (3xx, 4xx, 5xx) fails the save, once, and nothing is deleted."""
        for code in (302, 404, 503):
            with self.subTest(code=code):
                resource = UploadResource(code=code)
                d = self._store(resource, with_media=True).save(self.record, _T0)
                f = self.failureResultOf(d, CallRecordUploadError)
                self.assertEqual(f.value.code, code)
                self.assertEqual(len(resource.requests), 1)
                self.assertTrue(os.path.exists(self.wav))

    def test_missing_media_skipped(self) -> None:
        """A recording that vanished is left out (with a warning) and the rest is still sent."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        os.unlink(self.wav)
        resource = UploadResource()
        self.successResultOf(self._store(resource, with_media=True).save(self.record, _T0))
        self.assertEqual([p["name"] for p in resource.requests[0]["parts"]],
                         ["calllog.json", "dump_events_s.1.events.jsonl"])
        self.assertEqual([e.get("path") for e in observer if e.get("path")], [self.wav])

    def test_configured_content_type_overridden(self) -> None:
        """A Content-Type in [callrecord.headers] cannot break the multipart boundary."""
        resource = UploadResource()
        store = self._store(resource, with_media=False, headers=(("Content-Type", "application/json"),))
        self.successResultOf(store.save(self.record, _T0))
        self.assertEqual(resource.requests[0]["content_type"], "multipart/form-data; boundary=b0undary")

    def test_signed_when_a_secret_is_configured(self) -> None:
        """The POST carries X-Activecall-Signature = HMAC-SHA256 over "t." + the exact multipart body."""
        import hashlib
        import hmac

        self.clock.advance(1_786_692_721)
        resource = UploadResource()
        self.successResultOf(self._store(resource, with_media=False, signing_secret="whsec").save(self.record, _T0))
        [req] = resource.requests
        t, v1 = (part.split("=", 1)[1] for part in req["signature"].split(","))
        self.assertEqual(t, "1786692721")
        self.assertEqual(v1, hmac.new(b"whsec", t.encode() + b"." + req["body"], hashlib.sha256).hexdigest())

    def test_redirect_of_the_post_is_a_failure(self) -> None:
        """A 302 is not followed as a body-less GET: the save fails with the 302."""
        resource = UploadResource(code=302)
        f = self.failureResultOf(self._store(resource, with_media=False).save(self.record, _T0), CallRecordUploadError)
        self.assertEqual(f.value.code, 302)
        self.assertEqual(len(resource.requests), 1)

    def test_timeout(self) -> None:
        """A server that never answers fails the save after the timeout on the injected clock."""
        resource = UploadResource(hang=True)
        d = self._store(resource, with_media=True).save(self.record, _T0)
        self.assertNoResult(d)
        self.clock.advance(59)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.failureResultOf(d, DeferredTimeoutError)
        self.assertTrue(os.path.exists(self.wav))

    def test_reads_media_off_thread(self) -> None:
        """The multipart body, media included, is assembled inside run_blocking."""
        pool = QueuedRunBlocking()
        resource = UploadResource()
        store = HttpCallRecordStore(_URL, (), True, False, fetcher(resource, self.clock), pool, self.clock,
                                    boundary=lambda: "b0undary")
        d = store.save(self.record, _T0)
        self.assertEqual([job[0].__name__ for job in pool.jobs], ["_multipart_body"])
        self.assertEqual(resource.requests, [])
        pool.run_next()
        self.assertEqual(len(resource.requests), 1)
        self.assertNoResult(d)
        self.assertEqual([job[0].__name__ for job in pool.jobs], ["_delete_files"])
        self.assertTrue(os.path.exists(self.wav))
        pool.run_next()
        self.assertEqual(self.successResultOf(d), _URL)
        self.assertFalse(os.path.exists(self.wav))


class PendingStore:
    """A store whose saves stay pending until the test settles them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Mapping[str, Any], float, Deferred[str]]] = []

    def save(self, record: Mapping[str, Any], start_epoch_s: float) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.calls.append((record, start_epoch_s, d))
        return d


class WriterTests(SynchronousTestCase):
    """CallRecordWriter caps concurrent saves and never loses a record silently."""

    def test_caps_concurrency_at_32(self) -> None:
        """Only 32 saves run at once; the rest start in order as slots free up."""
        store = PendingStore()
        writer = CallRecordWriter(store)
        results: list[Optional[str]] = []
        for i in range(40):
            writer.write(_record(f"s.{i}"), _T0 + i).addCallback(results.append)
        self.assertEqual(len(store.calls), 32)
        self.assertEqual((writer.active, writer.queued), (32, 8))
        drained = writer.drain()
        store.calls[0][2].callback("p0")
        self.assertEqual(results, ["p0"])
        self.assertEqual(len(store.calls), 33)
        self.assertEqual(store.calls[32][0]["callId"], "s.32")
        self.assertEqual(store.calls[32][1], _T0 + 32)
        for i in range(1, 40):
            self.assertNoResult(drained)
            store.calls[i][2].callback(f"p{i}")
        self.assertEqual(results, [f"p{i}" for i in range(40)])
        self.assertEqual([c[0]["callId"] for c in store.calls], [f"s.{i}" for i in range(40)])
        self.assertEqual((writer.saved, writer.failed, writer.active, writer.queued), (40, 0, 0, 0))
        self.successResultOf(drained)

    def test_custom_limit(self) -> None:
        """max_concurrent sets the cap."""
        store = PendingStore()
        writer = CallRecordWriter(store, max_concurrent=2)
        for i in range(5):
            writer.write(_record(f"s.{i}"), _T0)
        self.assertEqual(len(store.calls), 2)

    def test_survives_failing_store(self) -> None:
        """Raising and failing saves are logged with the record and counted; later saves still run."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        outcomes: list[Callable[[], Deferred[str]]] = [
            lambda: fail(CallRecordUploadError(_URL, 500)),
            lambda: (_ for _ in ()).throw(OSError("disk full")),
            lambda: Deferred.fromCoroutine(_ok("saved")),
        ]

        class FlakyStore:
            def save(self, record: Mapping[str, Any], start_epoch_s: float) -> Deferred[str]:
                return outcomes.pop(0)()

        writer = CallRecordWriter(FlakyStore(), max_concurrent=1)
        first = writer.write(_record("s.a"), _T0)
        second = writer.write(_record("s.b"), _T0)
        third = writer.write(_record("s.c"), _T0)
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertEqual(self.successResultOf(third), "saved")
        self.assertEqual((writer.saved, writer.failed, writer.active), (1, 2, 0))
        logged = [e for e in observer if "log_failure" in e]
        self.assertEqual([e["call_id"] for e in logged], ["s.a", "s.b"])
        self.assertEqual(logged[0]["record"], _record("s.a"))
        self.assertEqual(len(self.flushLoggedErrors(CallRecordUploadError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.successResultOf(writer.drain())

    def test_survives_bad_record(self) -> None:
        """A record the store cannot even name (no callId) is a counted failure, not an exception."""
        writer = CallRecordWriter(LocalCallRecordStore(self.mktemp(), run_now))
        self.assertIsNone(self.successResultOf(writer.write({"callType": "sip"}, _T0)))
        self.assertEqual(writer.failed, 1)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)


async def _ok(value: str) -> str:
    return value


class MakeStoreTests(SynchronousTestCase):
    """make_store picks the store for a [callrecord] table."""

    def test_local(self) -> None:
        """type local gives a LocalCallRecordStore under root."""
        store = make_store(CallRecordConfig(type="local", root="./config/cdr"), run_blocking=run_now,
                           http_client=fetcher(Resource(), Clock()), clock=Clock())
        self.assertIsInstance(store, LocalCallRecordStore)

    def test_http(self) -> None:
        """type http gives an HttpCallRecordStore honouring with_media and headers."""
        resource = UploadResource()
        config = CallRecordConfig(type="http", url=_URL, headers=(("Authorization", "Bearer x"),), with_media=False)
        store = make_store(config, run_blocking=run_now, http_client=fetcher(resource, Clock()), clock=Clock())
        self.assertIsInstance(store, HttpCallRecordStore)
        self.successResultOf(store.save(_record(), _T0))
        self.assertEqual(resource.requests[0]["authorization"], "Bearer x")

    def test_s3_not_supported(self) -> None:
        """type s3 is refused with a clear message until it is implemented."""
        config = CallRecordConfig(type="s3", vendor="minio", bucket="b", region="r", access_key="a",
                                  secret_key="s", endpoint="http://minio", root="cdr")
        with self.assertRaises(ValueError) as cm:
            make_store(config, run_blocking=run_now, http_client=fetcher(Resource(), Clock()), clock=Clock())
        self.assertEqual(str(cm.exception), "callrecord type s3 is not supported yet")
