"""The playbook HTTP API over real HTTP on 127.0.0.1 (protocol.md §1.3, playbook.md §1):
``POST /api/playbook/run`` and ``/api/playbooks[/{name}]``, their file I/O off the reactor thread."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import tempfile
import threading
from typing import Any, Callable, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from activecall import web
from activecall.config import ApiConfig
from activecall.control.playbookruns import PlaybookRuns
from activecall.web import MAX_PLAYBOOK_BYTES, ActivecallSite, ApiResource

GOOD = "---\nllm:\n  provider: openai\n---\nYou are a sales agent.\n"
SID = re.compile(r"s\.[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


class NoSessions:
    """ApiResource's session manager; the playbook routes never use it."""

    def sessions(self) -> list[Any]:
        return []

    def get(self, sid: str) -> None:
        return None


class _HttpCase(TestCase):
    timeout = 30
    api = ApiConfig()
    with_runs = True

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp()
        self.dir = os.path.join(self.root, "playbook")
        os.makedirs(self.dir)
        self.patch(web, "PLAYBOOK_DIR", self.dir)
        self.clock = Clock()
        self.runs: Optional[PlaybookRuns] = PlaybookRuns(self.clock) if self.with_runs else None
        self.work_threads: list[int] = []
        self.resource = self.make_resource()
        self.site = ActivecallSite(self.resource)
        port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = b"http://127.0.0.1:%d" % port.getHost().port
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)

    def tearDown(self) -> Deferred[None]:
        if self.runs is not None:
            self.runs.stop()
        return self.pool.closeCachedConnections()

    def make_resource(self, **kw: Any) -> ApiResource:
        kw.setdefault("run_blocking", self.in_thread)
        return ApiResource(NoSessions(), self.clock, (), api=self.api, playbook_runs=self.runs, **kw)

    def in_thread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
        """run_blocking as tap.py builds it (a thread pool), recording where the work ran."""
        def work() -> Any:
            self.work_threads.append(threading.get_ident())
            return f(*args, **kw)
        return deferToThread(work)

    def write(self, name: str, data: str | bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        return path

    def start(self, method: bytes, path: bytes, body: Optional[bytes] = None,
              headers: Optional[dict[bytes, bytes]] = None) -> Deferred[Any]:
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        return self.agent.request(method, self.url + path, Headers({k: [v] for k, v in (headers or {}).items()}),
                                  producer)

    async def call(self, method: bytes, path: bytes, body: Optional[bytes] = None,
                   headers: Optional[dict[bytes, bytes]] = None) -> tuple[int, bytes, Headers]:
        response = await self.start(method, path, body, headers)
        return response.code, await readBody(response), response.headers

    async def run_playbook(self, body: Any, raw: Optional[bytes] = None,
                  content_type: bytes = b"application/json") -> tuple[int, Any]:
        data = raw if raw is not None else json.dumps(body).encode("utf-8")
        code, text, headers = await self.call(b"POST", b"/api/playbook/run", data, {b"content-type": content_type})
        if headers.getRawHeaders(b"content-type") == [b"application/json"]:
            return code, json.loads(text)
        return code, text


class PlaybookRunTests(_HttpCase):
    """``POST /api/playbook/run`` checks the playbook, then hands out ``s.<uuid4>``."""

    async def test_named_playbook_gets_a_session_id(self) -> None:
        """An existing, valid file: 200 and an ``s.<uuid4>`` under which the registry holds the name as given."""
        self.write("sales.md", GOOD)
        code, body = await self.run_playbook({"playbook": "sales.md", "type": "sip", "to": "sip:1@x"})
        self.assertEqual(code, 200)
        self.assertEqual(list(body), ["session_id"])
        self.assertRegex(body["session_id"], SID.pattern)
        assert self.runs is not None
        self.assertEqual(self.runs.take(body["session_id"]), "sales.md")
        self.assertTrue(self.work_threads)
        self.assertNotIn(threading.get_ident(), self.work_threads)  # read and parsed off the reactor thread

    async def test_inline_content_is_stored_as_given(self) -> None:
        """Inline text: 200; the registry holds the content itself, and ids differ per run."""
        code, first = await self.run_playbook({"content": GOOD})
        code2, second = await self.run_playbook({"content": GOOD, "type": "webSocket"})
        self.assertEqual((code, code2), (200, 200))
        self.assertNotEqual(first["session_id"], second["session_id"])
        assert self.runs is not None
        self.assertEqual(self.runs.take(first["session_id"]), GOOD)

    async def test_unclaimed_id_expires_after_300_s(self) -> None:
        """The id is good until 300 s on the registry's clock, then take() gives None."""
        _, body = await self.run_playbook({"content": GOOD})
        assert self.runs is not None
        self.clock.advance(300)
        self.assertIsNone(self.runs.take(body["session_id"]))

    async def test_bad_bodies_are_400(self) -> None:
        """Not JSON, not an object, none or both of playbook/content, empty or non-string values: 400."""
        for raw in (b"{", b"[]", b'"sales.md"'):
            code, body = await self.run_playbook(None, raw=raw)
            self.assertEqual(code, 400, raw)
            self.assertEqual(body["status"], "error")
        for obj in ({}, {"type": "sip"}, {"playbook": "a.md", "content": GOOD}, {"playbook": ""},
                    {"content": ""}, {"playbook": 5}, {"content": ["---"]}, {"playbook": None, "content": None}):
            code, body = await self.run_playbook(obj)
            self.assertEqual(code, 400, obj)
            self.assertIsInstance(body["error"], str)
        assert self.runs is not None
        self.assertEqual(len(self.runs), 0)

    async def test_wrong_content_type_is_415(self) -> None:
        """The body must be JSON."""
        code, _ = await self.run_playbook({"content": GOOD}, content_type=b"text/markdown")
        self.assertEqual(code, 415)

    async def test_traversal_names_are_400(self) -> None:
        """``..``, slashes, backslashes, absolute paths, hidden files, names reading as inline text: 400,
        even when the target exists and is a valid playbook."""
        outside = os.path.join(self.root, "outside.md")
        with open(outside, "w") as f:
            f.write(GOOD)
        self.write(".hidden.md", GOOD)
        for name in ("../outside.md", "..%2Foutside.md", "..\\outside.md", outside, "playbook/../x.md",
                     "a/b.md", ".hidden.md", "---x.md", "x.txt", "x.md\n", "x\x00.md"):
            code, body = await self.run_playbook({"playbook": name})
            self.assertEqual(code, 400, name)
            self.assertIn("invalid playbook name", body["error"])
        assert self.runs is not None
        self.assertEqual(len(self.runs), 0)

    async def test_symlink_out_of_the_directory_is_400(self) -> None:
        """A link in config/playbook/ to a valid playbook elsewhere is not run."""
        outside = os.path.join(self.root, "outside.md")
        with open(outside, "w") as f:
            f.write(GOOD)
        os.symlink(outside, os.path.join(self.dir, "link.md"))
        code, body = await self.run_playbook({"playbook": "link.md"})
        self.assertEqual((code, body["error"]), (400, "Invalid filename"))

    async def test_missing_playbook_is_404(self) -> None:
        """A valid name with no file: 404, no id handed out."""
        code, body = await self.run_playbook({"playbook": "nope.md"})
        self.assertEqual((code, body), (404, {"status": "error", "error": "playbook not found: nope.md"}))
        assert self.runs is not None
        self.assertEqual(len(self.runs), 0)

    async def test_load_errors_are_400_with_line_and_reason(self) -> None:
        """Invalid YAML or a wrong type: 400, the message names the source, the line and the reason."""
        path = self.write("bad.md", "---\nllm:\n  provider: openai\nasr: 5\n---\n")
        code, body = await self.run_playbook({"playbook": "bad.md"})
        self.assertEqual(code, 400)
        self.assertEqual(body["error"], f"{path}:4: invalid asr: expected an object")
        code, body = await self.run_playbook({"content": "---\nllm: [\n---\n"})
        self.assertEqual(code, 400)
        self.assertRegex(body["error"], r"^<inline>:3: invalid YAML front matter: ")
        code, body = await self.run_playbook({"content": "---\nllm:\n  provider: openai\nasr: {}\n---\n"})
        self.assertEqual((code, body["error"]), (400, "<inline>:4: missing field asr.provider"))
        self.write("latin1.md", b"---\nllm:\n  provider: \xe9\n---\n")
        code, body = await self.run_playbook({"playbook": "latin1.md"})
        self.assertEqual(code, 400)
        self.assertIn("not UTF-8", body["error"])
        assert self.runs is not None
        self.assertEqual(len(self.runs), 0)

    async def test_content_must_start_with_dashes(self) -> None:
        """Inline content that is not playbook text (it would be taken for a file name later): 400."""
        for content in ("llm:\n  provider: openai\n", "sales.md", "  \n"):
            code, body = await self.run_playbook({"content": content})
            self.assertEqual(code, 400, content)
            self.assertIn("starting with ---", body["error"])

    async def test_oversized_playbooks_are_413(self) -> None:
        """Content or a file over 256 KiB: 413 (checked before parsing)."""
        big = GOOD + "x" * MAX_PLAYBOOK_BYTES
        code, _ = await self.run_playbook({"content": big})
        self.assertEqual(code, 413)
        self.write("big.md", big)
        code, _ = await self.run_playbook({"playbook": "big.md"})
        self.assertEqual(code, 413)
        code, _ = await self.run_playbook({"content": GOOD + "x" * (MAX_PLAYBOOK_BYTES - len(GOOD))})
        self.assertEqual(code, 200)

    async def test_full_registry_is_503(self) -> None:
        """More pending runs than the registry holds: 503."""
        self.runs = PlaybookRuns(self.clock, max_runs=1)
        self.resource._playbook_runs = self.runs
        self.assertEqual((await self.run_playbook({"content": GOOD}))[0], 200)
        code, body = await self.run_playbook({"content": GOOD})
        self.assertEqual(code, 503)
        self.assertIn("too many playbook runs", body["error"])

    async def test_only_post(self) -> None:
        """GET on the run route: 405."""
        code, _, _ = await self.call(b"GET", b"/api/playbook/run")
        self.assertEqual(code, 405)


class NoRegistryTests(_HttpCase):
    """Without a registry configured the run route is unavailable."""

    with_runs = False

    async def test_503(self) -> None:
        """503 even for a valid body."""
        code, body = await self.run_playbook({"content": GOOD})
        self.assertEqual((code, body), (503, {"status": "error", "error": "playbook runs are not enabled"}))


class RunAuthTests(_HttpCase):
    """The run route is behind ``[api] tokens`` like every other."""

    api = ApiConfig(tokens=("s3cret",))

    async def test_token_needed(self) -> None:
        """No token: 401 and no id; with the Bearer token: 200."""
        code, _ = await self.run_playbook({"content": GOOD})
        self.assertEqual(code, 401)
        code, _, _ = await self.call(b"POST", b"/api/playbook/run", json.dumps({"content": GOOD}).encode(),
                                     {b"authorization": b"Bearer s3cret"})
        self.assertEqual(code, 200)


class PlaybookFilesTests(_HttpCase):
    """``/api/playbooks[/{name}]``: list, read, save; traversal and links out refused."""

    async def test_list_shows_only_plain_playbooks(self) -> None:
        """Regular ``*.md`` files and links resolving inside; not hidden files, other extensions,
        links out, dangling links, directories or FIFOs."""
        self.write("b.md", GOOD)
        self.write("a.md", "# a\n")
        self.write(".hidden.md", GOOD)
        self.write("notes.txt", "x")
        outside = os.path.join(self.root, "outside.md")
        with open(outside, "w") as f:
            f.write(GOOD)
        os.symlink(outside, os.path.join(self.dir, "out.md"))
        os.symlink(os.path.join(self.dir, "a.md"), os.path.join(self.dir, "alias.md"))
        os.symlink(os.path.join(self.dir, "gone"), os.path.join(self.dir, "dangling.md"))
        os.mkdir(os.path.join(self.dir, "dir.md"))
        os.mkfifo(os.path.join(self.dir, "pipe.md"))
        code, body, headers = await self.call(b"GET", b"/api/playbooks")
        self.assertEqual(code, 200)
        entries = json.loads(body)
        self.assertEqual([e["name"] for e in entries], ["a.md", "alias.md", "b.md"])
        self.assertRegex(entries[0]["updated"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
        self.assertNotIn(threading.get_ident(), self.work_threads)
        self.assertTrue(self.work_threads)

    async def test_list_without_directory_is_empty(self) -> None:
        """No config/playbook/ at all: an empty list, not an error."""
        os.rmdir(self.dir)
        code, body, _ = await self.call(b"GET", b"/api/playbooks")
        self.assertEqual((code, json.loads(body)), (200, []))

    async def test_read_and_save(self) -> None:
        """A saved playbook reads back as text/markdown; the file is written in a worker thread."""
        code, body, _ = await self.call(b"POST", b"/api/playbooks/sales.md", b"# Sales\n",
                                        {b"content-type": b"text/markdown"})
        self.assertEqual((code, body), (200, b""))
        with open(os.path.join(self.dir, "sales.md"), "rb") as f:
            self.assertEqual(f.read(), b"# Sales\n")
        code, body, headers = await self.call(b"GET", b"/api/playbooks/sales.md")
        self.assertEqual((code, body), (200, b"# Sales\n"))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/markdown; charset=utf-8"])
        self.assertEqual(len(self.work_threads), 2)
        self.assertNotIn(threading.get_ident(), self.work_threads)

    async def test_traversal_is_400(self) -> None:
        """Encoded slashes and backslashes, dot-dot and absolute paths: 400 for reading and saving."""
        outside = os.path.join(self.root, "outside.md")
        with open(outside, "w") as f:
            f.write("secret")
        for name in (b"..%2Foutside.md", b"%2E%2E%2Foutside.md", b"..%5Coutside.md", b"a%5Cb.md",
                     b"%2F" + outside.lstrip("/").replace("/", "%2F").encode(), b".hidden.md", b"x%00.md"):
            code, body, _ = await self.call(b"GET", b"/api/playbooks/" + name)
            self.assertEqual((code, body), (400, b"Invalid filename"), name)
            code, body, _ = await self.call(b"POST", b"/api/playbooks/" + name, b"x")
            self.assertEqual((code, body), (400, b"Invalid filename"), name)
        with open(outside) as f:
            self.assertEqual(f.read(), "secret")
        code, body, _ = await self.call(b"GET", b"/api/playbooks/../outside.md")
        self.assertEqual(code, 404)  # not a playbook route at all
        self.assertNotIn(b"secret", body)

    async def test_symlink_out_is_refused_for_reading(self) -> None:
        """A link to a file outside the directory is neither read (400) nor written through."""
        outside = os.path.join(self.root, "outside.md")
        with open(outside, "w") as f:
            f.write("secret")
        os.symlink(outside, os.path.join(self.dir, "link.md"))
        code, body, _ = await self.call(b"GET", b"/api/playbooks/link.md")
        self.assertEqual((code, body), (400, b"Invalid filename"))
        code, _, _ = await self.call(b"POST", b"/api/playbooks/link.md", b"x")
        self.assertEqual(code, 400)
        with open(outside) as f:
            self.assertEqual(f.read(), "secret")

    async def test_missing_directory_and_fifo_are_404(self) -> None:
        """No such file, a directory or a FIFO named ``*.md``: 404 at once (a FIFO never blocks a thread)."""
        os.mkdir(os.path.join(self.dir, "dir.md"))
        os.mkfifo(os.path.join(self.dir, "pipe.md"))
        for name in (b"nope.md", b"dir.md", b"pipe.md"):
            code, body, _ = await self.call(b"GET", b"/api/playbooks/" + name)
            self.assertEqual((code, body), (404, b"Playbook not found"), name)

    async def test_sizes_are_bounded(self) -> None:
        """Reading or saving more than 256 KiB: 413; exactly 256 KiB is fine."""
        self.write("big.md", b"x" * (MAX_PLAYBOOK_BYTES + 1))
        self.write("max.md", b"x" * MAX_PLAYBOOK_BYTES)
        code, _, _ = await self.call(b"GET", b"/api/playbooks/big.md")
        self.assertEqual(code, 413)
        code, body, _ = await self.call(b"GET", b"/api/playbooks/max.md")
        self.assertEqual((code, len(body)), (200, MAX_PLAYBOOK_BYTES))
        code, _, _ = await self.call(b"POST", b"/api/playbooks/new.md", b"x" * (MAX_PLAYBOOK_BYTES + 1))
        self.assertEqual(code, 413)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "new.md")))

    async def test_write_error_is_500(self) -> None:
        """A directory where the file should go: the rename fails, 500 with a plain message."""
        os.mkdir(os.path.join(self.dir, "dir.md"))
        os.mkdir(os.path.join(self.dir, "dir.md", "keep"))
        code, body, _ = await self.call(b"POST", b"/api/playbooks/dir.md", b"x")
        self.assertEqual(code, 500)
        self.assertTrue(body.startswith(b"cannot save playbook: "), body)

    async def test_method_not_allowed(self) -> None:
        """DELETE on a playbook, POST on the list: 405."""
        self.assertEqual((await self.call(b"DELETE", b"/api/playbooks/a.md"))[0], 405)
        self.assertEqual((await self.call(b"POST", b"/api/playbooks", b"x"))[0], 405)


class GzipTests(_HttpCase):
    """Answers produced after a thread hop are compressed like immediate ones."""

    def make_resource(self, **kw: Any) -> ApiResource:
        return super().make_resource(gzip=True, **kw)

    async def test_read_is_gzipped(self) -> None:
        """With Accept-Encoding gzip the playbook text arrives compressed, not chunked."""
        self.write("a.md", GOOD)
        code, body, headers = await self.call(b"GET", b"/api/playbooks/a.md", headers={b"accept-encoding": b"gzip"})
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(gzip.decompress(body).decode(), GOOD)


class HeldWorkTests(_HttpCase):
    """The response waits for the worker; a client gone meanwhile is not written to."""

    def make_resource(self, **kw: Any) -> ApiResource:
        self.held: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self.work_called: Deferred[None] = Deferred()
        return super().make_resource(run_blocking=self.hold)

    def hold(self, f: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.held.append((f, d))
        self.work_called.callback(None)
        return d

    async def test_answer_comes_when_the_work_is_done(self) -> None:
        """Nothing is answered while the file read is pending; then the text arrives."""
        self.write("a.md", GOOD)
        response = self.start(b"GET", b"/api/playbooks/a.md")
        answered: list[Any] = []

        def note(r: Any) -> Any:
            answered.append(r)
            return r

        response.addCallback(note)
        await self.work_called
        self.assertEqual(answered, [])
        f, d = self.held[0]
        deferToThread(f).chainDeferred(d)
        result = await response
        self.assertEqual((result.code, await readBody(result)), (200, GOOD.encode()))

    async def test_client_gone_before_the_answer(self) -> None:
        """The client closes while the check runs: the late answer is dropped, nothing is logged, no id handed out."""
        lost: Deferred[None] = Deferred()

        class Request(web._BoundedRequest):
            def connectionLost(self, reason: Any) -> None:
                super().connectionLost(reason)
                lost.callback(None)

        self.site.requestFactory = Request
        response = self.start(b"POST", b"/api/playbook/run", json.dumps({"content": GOOD}).encode())
        response.addErrback(lambda f: None)
        await self.work_called
        response.cancel()
        await lost
        f, d = self.held[0]
        d.callback(f())
        self.assertEqual(self.flushLoggedErrors(), [])
        assert self.runs is not None
        self.assertEqual(len(self.runs), 0)
