"""The built-in test page routes (protocol.md §1.3): ``GET /``, ``GET /static/{name}`` and ``GET /api/records``."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from activecall import web
from activecall.config import ApiConfig
from activecall.control.events import format_rfc3339
from activecall.web import MAX_LISTED_RECORDS, STATIC_DIR, ApiResource, list_event_dumps


class NoSessions:
    """ApiResource's session manager; these routes never use it."""

    def sessions(self) -> list[Any]:
        return []

    def get(self, sid: str) -> None:
        return None


def make_request(method: bytes, path: bytes, headers: Optional[dict[bytes, bytes]] = None,
                 args: Optional[dict[bytes, list[bytes]]] = None) -> DummyRequest:
    request = DummyRequest([])
    request.method = method
    request.path = path
    request.uri = path
    request.content = io.BytesIO(b"")
    request.args = args or {}
    request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:8080"])
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    return request


class _PageCase(SynchronousTestCase):
    api = ApiConfig()

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root, True)
        self.static = os.path.join(self.root, "static")
        self.records = os.path.join(self.root, "recorders")
        os.makedirs(self.static)
        os.makedirs(self.records)
        self.blocking: list[Callable[[], Any]] = []
        self.resource = self.make_resource()

    def make_resource(self, **kw: Any) -> ApiResource:
        kw.setdefault("static_dir", self.static)
        kw.setdefault("recording_path", self.records)
        return ApiResource(NoSessions(), Clock(), (), api=self.api, **kw)

    def write(self, directory: str, name: str, data: bytes = b"x", mtime: Optional[float] = None) -> str:
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    def call(self, path: bytes, method: bytes = b"GET", **kw: Any) -> tuple[int, bytes, DummyRequest]:
        request = make_request(method, path, **kw)
        body = self.resource.render(request)
        self.assertIsInstance(body, bytes)
        return request.responseCode or 200, body, request

    def content_type(self, request: DummyRequest) -> Optional[bytes]:
        values = request.responseHeaders.getRawHeaders(b"content-type")
        return values[0] if values else None


class IndexTests(_PageCase):
    """``GET /`` serves ``index.html`` of the static directory."""

    def test_serves_index_as_html(self) -> None:
        """The page is served as UTF-8 HTML with nosniff."""
        self.write(self.static, "index.html", b"<!DOCTYPE html><title>t</title>")
        code, body, request = self.call(b"/")
        self.assertEqual(code, 200)
        self.assertEqual(body, b"<!DOCTYPE html><title>t</title>")
        self.assertEqual(self.content_type(request), b"text/html; charset=utf-8")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-content-type-options"), [b"nosniff"])

    def test_missing_index_is_404_text(self) -> None:
        """Without index.html: 404 ``Index not found`` as plain text."""
        code, body, request = self.call(b"/")
        self.assertEqual((code, body), (404, b"Index not found"))
        self.assertEqual(self.content_type(request), b"text/plain; charset=utf-8")

    def test_index_that_is_a_directory_is_404(self) -> None:
        """An index.html that is not a regular file is not served."""
        os.makedirs(os.path.join(self.static, "index.html"))
        self.assertEqual(self.call(b"/")[:2], (404, b"Index not found"))

    def test_only_get(self) -> None:
        """POST / is not the page."""
        self.write(self.static, "index.html", b"page")
        code, body, _ = self.call(b"/", method=b"POST")
        self.assertEqual(code, 404)
        self.assertNotEqual(body, b"page")

    def test_packaged_page_and_its_files(self) -> None:
        """The shipped page exists and every /static/ file it references is served."""
        resource = self.make_resource(static_dir=STATIC_DIR)
        request = make_request(b"GET", b"/")
        page = resource.render(request)
        self.assertEqual(request.responseCode or 200, 200)
        self.assertIn(b"/static/app.js", page)
        for name, kind in ((b"app.js", b"text/javascript; charset=utf-8"), (b"app.css", b"text/css; charset=utf-8")):
            self.assertIn(b"/static/" + name, page)
            request = make_request(b"GET", b"/static/" + name)
            body = resource.render(request)
            self.assertEqual(request.responseCode or 200, 200, name)
            self.assertTrue(body)
            self.assertEqual(self.content_type(request), kind)
        # No external resources: the machine running the daemon may be offline.
        for text in (page, open(os.path.join(STATIC_DIR, "app.js"), "rb").read()):
            self.assertNotIn(b"https://", text)
            self.assertNotIn(b"http://", text)


class StaticTests(_PageCase):
    """``GET /static/{name}``: one file of the static directory, typed by extension."""

    def test_content_types_by_extension(self) -> None:
        """Each known extension gets its type."""
        for name, kind in (("a.html", b"text/html; charset=utf-8"), ("a.js", b"text/javascript; charset=utf-8"),
                           ("a.css", b"text/css; charset=utf-8"), ("a.json", b"application/json"),
                           ("a.svg", b"image/svg+xml"), ("a.png", b"image/png"), ("A.PNG", b"image/png"),
                           ("a.ico", b"image/x-icon"), ("a.txt", b"text/plain; charset=utf-8")):
            self.write(self.static, name, name.encode())
            code, body, request = self.call(b"/static/" + name.encode())
            self.assertEqual((code, body), (200, name.encode()), name)
            self.assertEqual(self.content_type(request), kind, name)

    def test_unknown_extension_and_missing_file_are_404(self) -> None:
        """A file with an unlisted extension is not served; a missing one is 404."""
        self.write(self.static, "x.py", b"secret")
        self.write(self.static, "noext", b"secret")
        for path in (b"/static/x.py", b"/static/noext", b"/static/missing.js", b"/static/", b"/static"):
            code, body, _ = self.call(path)
            self.assertEqual(code, 404, path)
            self.assertNotIn(b"secret", body)

    def test_hostile_names_are_404(self) -> None:
        """Traversal, encoded separators, hidden, NUL, absolute and over-long names never leave the directory."""
        self.write(self.root, "outside.css", b"secret")
        self.write(self.static, ".hidden.css", b"secret")
        os.makedirs(os.path.join(self.static, "sub"))
        self.write(os.path.join(self.static, "sub"), "inner.css", b"secret")
        os.symlink(os.path.join(self.root, "outside.css"), os.path.join(self.static, "link.css"))
        hostile = [b"..%2foutside.css", b"..%2Foutside.css", b"%2e%2e%2foutside.css", b"..%5coutside.css",
                   b"..", b"%2e%2e", b"...css", b"..css", b".hidden.css", b"%2ehidden.css", b"sub%2finner.css",
                   b"sub%5cinner.css", b"%2f" + self.root.encode().replace(b"/", b"%2f") + b"%2foutside.css",
                   b"link.css", b"app.css%00.css", b"x" * 300 + b".css", b"%252e%252e%252foutside.css"]
        for name in hostile:
            code, body, _ = self.call(b"/static/" + name)
            self.assertEqual(code, 404, name)
            self.assertNotIn(b"secret", body, name)
        for path in (b"/static/../outside.css", b"/static/sub/inner.css", b"/static//outside.css",
                     b"/static/%2e%2e/outside.css"):
            code, body, _ = self.call(path)
            self.assertEqual(code, 404, path)
            self.assertNotIn(b"secret", body, path)

    def test_large_file_is_not_served(self) -> None:
        """A file over MAX_STATIC_BYTES is 404, not streamed into memory."""
        self.patch(web, "MAX_STATIC_BYTES", 10)
        self.write(self.static, "big.js", b"y" * 11)
        self.write(self.static, "small.js", b"y" * 10)
        resource = self.make_resource()
        for name, code in ((b"big.js", 404), (b"small.js", 200)):
            request = make_request(b"GET", b"/static/" + name)
            body = resource.render(request)
            self.assertEqual(request.responseCode or 200, code, (name, body))


class RecordsTests(_PageCase):
    """``GET /api/records``: the newest event dumps of the recording directory."""

    def test_lists_dumps_newest_first(self) -> None:
        """Each ``<sid>.events.jsonl`` becomes one completed record, newest first, dated by its mtime."""
        self.write(self.records, "s.old.events.jsonl", mtime=1_700_000_000.0)
        self.write(self.records, "s.new.events.jsonl", mtime=1_700_000_100.5)
        self.write(self.records, "s.mid.events.jsonl", mtime=1_700_000_050.0)
        code, body, request = self.call(b"/api/records")
        self.assertEqual(code, 200)
        self.assertEqual(self.content_type(request), b"application/json")
        self.assertEqual(json.loads(body), [
            {"id": "s.new", "date": format_rfc3339(1_700_000_100.5), "duration": "0s", "status": "completed"},
            {"id": "s.mid", "date": format_rfc3339(1_700_000_050.0), "duration": "0s", "status": "completed"},
            {"id": "s.old", "date": format_rfc3339(1_700_000_000.0), "duration": "0s", "status": "completed"},
        ])

    def test_other_files_are_ignored(self) -> None:
        """Recordings, hidden files, directories and symlinks named like dumps are not records."""
        self.write(self.records, "s1.wav")
        self.write(self.records, "s1.events.jsonl.tmp")
        self.write(self.records, ".s2.events.jsonl")
        self.write(self.records, ".events.jsonl")
        os.makedirs(os.path.join(self.records, "dir.events.jsonl"))
        os.symlink(self.write(self.root, "x.events.jsonl"), os.path.join(self.records, "link.events.jsonl"))
        self.write(self.records, "s3.events.jsonl")
        self.assertEqual([r["id"] for r in json.loads(self.call(b"/api/records")[1])], ["s3"])

    def test_no_directory_is_empty(self) -> None:
        """No recording directory (missing, or none configured): an empty list."""
        shutil.rmtree(self.records)
        self.assertEqual(json.loads(self.call(b"/api/records")[1]), [])
        self.resource = self.make_resource(recording_path=None)
        self.assertEqual(json.loads(self.call(b"/api/records")[1]), [])

    def test_bounded(self) -> None:
        """At most MAX_LISTED_RECORDS entries: the newest ones."""
        count = MAX_LISTED_RECORDS + 60
        for i in range(count):
            self.write(self.records, f"s{i:04d}.events.jsonl", mtime=1_700_000_000.0 + i)
        records = json.loads(self.call(b"/api/records")[1])
        self.assertEqual(len(records), MAX_LISTED_RECORDS)
        self.assertEqual(records[0]["id"], f"s{count - 1:04d}")
        self.assertEqual(records[-1]["id"], f"s{count - MAX_LISTED_RECORDS:04d}")
        self.assertEqual(list_event_dumps(self.records, limit=3),
                         [(f"s{count - 1 - i:04d}", 1_700_000_000.0 + count - 1 - i) for i in range(3)])

    def test_only_get(self) -> None:
        """POST /api/records is not a route."""
        self.assertEqual(self.call(b"/api/records", method=b"POST")[0], 404)


class OffReactorTests(_PageCase):
    """File work of these routes runs through run_blocking, answered when it finishes."""

    def test_routes_use_run_blocking(self) -> None:
        """/, /static/{name} and /api/records answer NOT_DONE_YET and respond once the work is done."""
        pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

        def run_blocking(f: Callable[[], Any]) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append((f, d))
            return d

        self.write(self.static, "index.html", b"page")
        self.write(self.static, "a.css", b"css")
        self.write(self.records, "s1.events.jsonl")
        resource = self.make_resource(run_blocking=run_blocking)
        for path, expected in ((b"/", b"page"), (b"/static/a.css", b"css"), (b"/static/missing.css", b"Not Found"),
                               (b"/api/records", b'"id":"s1"')):
            request = make_request(b"GET", path)
            self.assertEqual(resource.render(request), NOT_DONE_YET, path)
            self.assertEqual(request.written, [])
            f, d = pending.pop()
            try:
                d.callback(f())
            except Exception as e:
                d.errback(e)
            self.assertEqual(request.finished, 1, path)
            self.assertIn(expected, b"".join(request.written), path)


class AccessTests(_PageCase):
    """The page routes follow the same token policy as every other route."""

    api = ApiConfig(tokens=("s3cret",))

    def test_token_needed(self) -> None:
        """Without a token: 401; with ``?token=``: served."""
        self.write(self.static, "index.html", b"page")
        self.write(self.static, "a.js", b"js")
        for path in (b"/", b"/static/a.js", b"/api/records"):
            self.assertEqual(self.call(path)[0], 401, path)
            self.assertEqual(self.call(path, args={b"token": [b"s3cret"]})[0], 200, path)

    def test_foreign_origin_refused(self) -> None:
        """A browser page of another origin cannot read the records."""
        code, _, _ = self.call(b"/api/records", headers={b"origin": b"http://evil.example",
                                                         b"authorization": b"Bearer s3cret"})
        self.assertEqual(code, 403)
