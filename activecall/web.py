"""The HTTP side: WebSocket endpoints and the REST routes of spec §1.3 on one twisted.web Site."""

from __future__ import annotations

import gzip
import heapq
import io
import json
import os
import re
import stat
from urllib.parse import unquote
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

from autobahn.twisted.resource import WebSocketResource
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.http import HTTPChannel, combinedLogFormatter
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from activecall.call.tts import PrecacheError
from activecall.config import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_MESSAGE_BYTES, ApiConfig
from activecall.control.access import AccessPolicy
from activecall.control.commands import CommandError, command_from_object
from activecall.control.events import format_rfc3339
from activecall.control.playbookruns import PlaybookRuns, RunsFullError
from activecall.control.wirejson import JsonInputError, parse_json
from activecall.fileio import UnsafePathError, safe_join, write_atomically
from activecall.control.protocol import ControlFactory, RelaySlots
from activecall.control.tunnel import OwnerLocator, forward_http
from activecall.interfaces import ISessionListener
from activecall.playbook.model import (INLINE_SOURCE, PlaybookError, PlaybookNotFound, parse_playbook,
                                       resolve_playbook_path)

# The HTTP port's accept queue. Twisted's default (50) overflows in a burst of connections
# (clients reconnecting after a restart, or a flood): the kernel then drops SYNs and the
# clients retry 1, 3, 7, 15, 31 s after their first try, so connections wait unseen, beyond every deadline
# here, and are admitted in waves. The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096
SSE_KEEPALIVE_S = 15.0
# A Server-Sent Events reader this far behind skips events (spec: "slow readers silently skip").
SSE_MAX_BACKLOG_BYTES = 1024 * 1024
# Playbooks always live here, relative to the working directory (playbook.md §1).
PLAYBOOK_DIR = os.path.join("config", "playbook")
# A playbook file name: no path, no NUL, no hidden file, always Markdown.
_PLAYBOOK_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,124}\.md")
# A playbook read, saved or run over HTTP is at most this large (its front matter has its own, smaller cap).
MAX_PLAYBOOK_BYTES = 256 * 1024
# GET /api/playbooks lists at most this many files (the first by name).
MAX_LISTED_PLAYBOOKS = 1000
# The built-in test page and its files (package data); GET / serves index.html from here.
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# A static file name: one path component, no hidden file, an extension from _STATIC_TYPES.
_STATIC_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
_STATIC_TYPES = {
    ".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8", ".json": b"application/json", ".svg": b"image/svg+xml",
    ".png": b"image/png", ".ico": b"image/x-icon", ".txt": b"text/plain; charset=utf-8",
}
MAX_STATIC_BYTES = 4 * 1024 * 1024
# GET /api/records lists at most this many event dumps (the newest).
MAX_LISTED_RECORDS = 200
#: /list?scope=cluster: each other node's /list must answer within this (seconds) ...
CLUSTER_LIST_TIMEOUT_S = 3.0
#: ... in at most this many bytes (about 8000 calls with their options); a bigger body is cut off ...
CLUSTER_LIST_NODE_MAX_BYTES = 8 * 1024 * 1024
#: ... and the answer lists at most this many calls in all (this node's first, then each node's in turn).
CLUSTER_LIST_MAX_ENTRIES = 10000
_DUMP_SUFFIX = ".events.jsonl"
# Routes that answer without a token, for load balancers.
_OPEN_PATHS = (["health"],)
_JSON_TYPES = (b"application/json",)
_PLAYBOOK_TYPES = (b"text/markdown", b"text/plain")


def _json(request: Request, body: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _text(request: Request, body: str, code: int) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return body.encode("utf-8")


def _error(request: Request, message: str, code: int) -> bytes:
    return _json(request, {"status": "error", "error": message}, code)


def _header(request: Request, name: bytes) -> Optional[str]:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


_T = TypeVar("_T")


class _PlaybookFileError(Exception):
    """A playbook file refused or not found: ``code`` and the plain-text ``message`` for the client."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- playbook files: blocking, run through ApiResource's run_blocking --------------------------


def _playbook_path(directory: str, name: str) -> str:
    """``name`` inside ``directory`` with symlinks resolved; a link pointing outside is refused (400)."""
    try:
        return safe_join(directory, name)
    except UnsafePathError:
        raise _PlaybookFileError(400, "Invalid filename") from None


def list_playbook_files(directory: str, limit: int = MAX_LISTED_PLAYBOOKS) -> list[tuple[str, float]]:
    """``(name, mtime)`` of the playbooks in ``directory``, by name: regular ``*.md`` files with a valid
    name (no hidden ones), symlinks only when they resolve inside ``directory``. Blocking."""
    try:
        with os.scandir(directory) as entries:
            names = sorted(e.name for e in entries if _PLAYBOOK_NAME.fullmatch(e.name))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: list[tuple[str, float]] = []
    for name in names:
        if len(found) >= limit:
            break
        try:
            st = os.stat(safe_join(directory, name))
        except (UnsafePathError, OSError):
            continue
        if stat.S_ISREG(st.st_mode):
            found.append((name, st.st_mtime))
    return found


def _read_regular_file(path: str, limit: int) -> Optional[bytes]:
    """At most ``limit + 1`` bytes of ``path`` if it is a regular file we can read, else None. Blocking."""
    try:
        # O_NONBLOCK: a FIFO in the directory must not hold a worker thread in open().
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read(limit + 1)
        except OSError:
            return None


def read_playbook_file(directory: str, name: str, limit: int = MAX_PLAYBOOK_BYTES) -> bytes:
    """The bytes of playbook ``name``; raises _PlaybookFileError (400 outside, 404 missing or not a
    regular file, 413 larger than ``limit``). Blocking."""
    data = _read_regular_file(_playbook_path(directory, name), limit)
    if data is None:
        raise _PlaybookFileError(404, "Playbook not found")
    if len(data) > limit:
        raise _PlaybookFileError(413, f"Playbook larger than {limit} bytes")
    return data


def save_playbook_file(directory: str, name: str, data: bytes) -> None:
    """Write playbook ``name`` atomically; raises _PlaybookFileError (400 outside, 500 write error). Blocking."""
    path = _playbook_path(directory, name)
    try:
        write_atomically(path, data)
    except OSError as e:
        raise _PlaybookFileError(500, f"cannot save playbook: {e.strerror}") from None


def check_playbook_run(directory: str, value: str, environ: Mapping[str, str], env_prefix: str) -> None:
    """Load ``value`` (inline text or a file name in ``directory``) as a call would; raises PlaybookError
    (the message names file, line and reason) or _PlaybookFileError. Blocking."""
    source = resolve_playbook_path(value, directory)
    if source is None:
        parse_playbook(value.strip(), environ, INLINE_SOURCE, env_prefix=env_prefix)
        return
    try:
        text = read_playbook_file(directory, value).decode("utf-8")
    except UnicodeDecodeError:
        raise PlaybookError("cannot read playbook: not UTF-8 text", source=source) from None
    parse_playbook(text, environ, source, env_prefix=env_prefix)


# --- the test page, its static files and the records list: blocking, run through run_blocking ---


class _StaticNotFound(Exception):
    """A static file that is not served (missing, not regular, too large)."""


def read_static_file(directory: str, name: str, limit: Optional[int] = None) -> bytes:
    """The bytes of regular file ``name`` inside ``directory`` (at most ``limit``, default
    MAX_STATIC_BYTES); raises _StaticNotFound. Blocking."""
    if limit is None:
        limit = MAX_STATIC_BYTES
    try:
        path = safe_join(directory, name)
    except UnsafePathError:
        raise _StaticNotFound(name) from None
    data = _read_regular_file(path, limit)
    if data is None or len(data) > limit:
        raise _StaticNotFound(name)
    return data


def list_event_dumps(directory: Optional[str], limit: Optional[int] = None) -> list[tuple[str, float]]:
    """``(id, mtime)`` of the newest ``limit`` (default MAX_LISTED_RECORDS) ``*.events.jsonl`` regular
    files in ``directory``, newest first (ties by id); the id is the file name without the suffix. Blocking."""
    if limit is None:
        limit = MAX_LISTED_RECORDS
    if not directory:
        return []
    found: list[tuple[float, str]] = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                name = entry.name
                if not name.endswith(_DUMP_SUFFIX) or name.startswith(".") or len(name) == len(_DUMP_SUFFIX):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                found.append((mtime, name[:-len(_DUMP_SUFFIX)]))
                if len(found) > 4 * limit + 64:
                    # Keep memory bounded in a directory of many dumps.
                    found = heapq.nlargest(limit, found, key=lambda t: (t[0], t[1]))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    newest = heapq.nlargest(limit, found, key=lambda t: (t[0], t[1]))
    return [(sid, mtime) for mtime, sid in newest]


class _BodyError(Exception):
    """A request body refused before it is used: ``code`` 413 or 415."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@implementer(ISessionListener)
class _EventStream:
    """One ``GET /events/{id}`` client: session traffic as Server-Sent Events."""

    def __init__(self, request: Request, clock: IReactorTime, on_gone: Callable[["_EventStream"], None]) -> None:
        self._request = request
        self._clock = clock
        self._on_gone = on_gone
        self._open = True
        self._keepalive = clock.callLater(SSE_KEEPALIVE_S, self._keep_alive)

    def _backlog_bytes(self) -> int:
        """Bytes written to the client's connection and not yet sent."""
        transport = getattr(self._request, "transport", None)
        if transport is None:
            return 0
        return len(getattr(transport, "dataBuffer", b"")) + int(getattr(transport, "_tempDataLen", 0))

    def _write(self, name: str, data: str) -> None:
        # Never buffer without bound for a reader that does not read.
        if self._open and self._backlog_bytes() < SSE_MAX_BACKLOG_BYTES:
            self._request.write(f"event: {name}\ndata: {data}\n\n".encode("utf-8"))

    def _keep_alive(self) -> None:
        if self._open:
            self._request.write(b": keep-alive\n\n")
            self._keepalive = self._clock.callLater(SSE_KEEPALIVE_S, self._keep_alive)

    def on_event(self, json_text: str) -> None:
        self._write("event", json_text)

    def on_command(self, json_text: str) -> None:
        self._write("command", json_text)

    def on_binary(self, data: bytes) -> None:
        # A slow reader skips audio rather than buffering it without bound.
        transport = getattr(self._request, "transport", None)
        if transport is not None and getattr(transport, "dataBuffer", b""):
            return
        self._write("event", json.dumps({"event": "binary", "data": list(data)}, separators=(",", ":")))

    def on_ping(self, json_text: str) -> None:
        self._write("event", json_text)

    def on_close(self) -> None:
        if self._open:
            self._open = False
            self._cancel_keepalive()
            self._request.finish()

    def gone(self) -> None:
        """The client went away."""
        self._open = False
        self._cancel_keepalive()
        self._on_gone(self)

    def _cancel_keepalive(self) -> None:
        if self._keepalive.active():
            self._keepalive.cancel()


class ApiResource(Resource):
    """Routes every path of the daemon; WebSocket paths are handed to Autobahn."""

    isLeaf = True
    _log = Logger()

    def __init__(self, sessions: Any, clock: IReactorTime, ice_servers: Sequence[Any],
                 precache: Optional[Callable[[Any], Deferred[dict[str, Any]]]] = None, gzip: bool = False,
                 registrations: Optional[Callable[[], Any]] = None,
                 metrics: Optional[Callable[[], tuple[bytes, str]]] = None, api: ApiConfig = ApiConfig(),
                 playbook_runs: Optional[PlaybookRuns] = None,
                 run_blocking: Optional[Callable[..., Deferred[Any]]] = None,
                 environ: Optional[Mapping[str, str]] = None, recording_path: Optional[str] = None,
                 static_dir: str = STATIC_DIR, locator: Optional[OwnerLocator] = None,
                 health: Optional[Callable[[], dict[str, Any]]] = None,
                 cluster_nodes: Optional[Callable[[], Deferred[Any]]] = None, node_id: Optional[str] = None,
                 http_agent: Any = None) -> None:
        super().__init__()
        self._node_id = node_id or "local"  # this node's name in /list?scope=cluster
        # GET /health's body (capacity: calls, limit, CPU, drain); None: {"status":"ok"}.
        self._health = health
        # The cluster's nodes (the registry's), for /list?scope=cluster; None: the static peers.
        self._cluster_nodes = cluster_nodes
        # Where sockets and REST requests for ids hosted on another node go (control/tunnel.py).
        self._locator = locator
        self._agent: Any = http_agent  # IAgent for requests to other nodes; None: made on the first one
        self._recording_path = recording_path  # where event dumps lie (GET /api/records); None: none listed
        self._static_dir = static_dir  # the test page (GET /, GET /static/{name})
        # POST /api/playbook/run hands out its ids here; None: the route answers 503.
        self._playbook_runs = playbook_runs
        # Playbook file I/O and parsing run through it; None runs them inline (tests, embedding).
        self._run_blocking = run_blocking
        self._environ: Mapping[str, str] = environ if environ is not None else {}  # ${VAR}s of playbooks
        self._env_prefix = api.env_prefix
        self._registrations = registrations
        self._metrics = metrics  # () -> (Prometheus text exposition, its content type)
        self._gzip = gzip
        self._sessions = sessions
        self._precache = precache
        self._clock = clock
        self._ice_servers = ice_servers
        self._access = AccessPolicy(api.tokens, api.allowed_origins)
        self._max_body_bytes = api.max_message_bytes
        relays = RelaySlots()  # one max_sessions budget: tunnels of every endpoint count
        self.factories = {
            name: ControlFactory(sessions, name, None, clock, api, locator=locator, relays=relays)
            for name in ("webSocket", "sip", "webrtc")
        }
        self._ws = {name: WebSocketResource(f) for name, f in self.factories.items()}

    def render(self, request: Request) -> Any:
        path = request.path.decode("utf-8", "replace").rstrip("/") or "/"
        parts = [p for p in path.split("/") if p]
        method = request.method.decode("ascii", "replace")
        if parts not in _OPEN_PATHS:
            denied = self._denied(request)
            if denied is not None:
                return denied
        try:
            body = self._route(request, method, parts)
        except _BodyError as e:
            return _error(request, e.message, e.code)
        except Exception:
            self._log.failure("HTTP {method} {path} failed", method=method, path=path)
            return _json(request, {"status": "error", "error": "internal error"}, 500)
        return self._encoded(request, body) if isinstance(body, bytes) else body

    def _encoded(self, request: Request, body: bytes) -> bytes:
        if self._gzip and b"gzip" in (request.getHeader(b"accept-encoding") or b""):
            request.setHeader(b"Content-Encoding", b"gzip")
            request.setHeader(b"Vary", b"Accept-Encoding")
            body = gzip.compress(body)
        return body

    def _off_reactor(self, request: Request, work: Callable[[], _T], answer: Callable[[_T], bytes],
                     refused: Callable[[BaseException], Optional[bytes]]) -> Any:
        """Run blocking ``work`` through ``run_blocking`` and respond ``answer(result)`` on the reactor.

        ``refused(error)`` turns an expected error into a response (None: unexpected, logged, 500).
        Returns the body when the work finished at once (no ``run_blocking``), else NOT_DONE_YET;
        for a client gone meanwhile ``answer`` is not called (no id handed out to nobody).
        """
        d: Deferred[Any] = self._run_blocking(work) if self._run_blocking is not None else maybeDeferred(work)

        def reply(outcome: Any) -> bytes:
            failure = outcome if isinstance(outcome, Failure) else None
            if failure is None:
                try:
                    return answer(outcome)
                except Exception:
                    failure = Failure()
            body = refused(failure.value)
            if body is None:
                self._log.failure("HTTP {method} {uri} failed", failure, method=request.method, uri=request.uri)
                body = _json(request, {"status": "error", "error": "internal error"}, 500)
            return body

        outcomes: list[Any] = []
        d.addBoth(outcomes.append)
        if outcomes:
            return reply(outcomes[0])
        gone: list[object] = []
        request.notifyFinish().addBoth(gone.append)

        def respond(_: object) -> None:
            if gone:
                return
            body = self._encoded(request, reply(outcomes[0]))
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        d.addCallback(respond)
        d.addErrback(lambda f: self._log.failure("HTTP response to {uri} failed", f, uri=request.uri))
        return NOT_DONE_YET

    def _denied(self, request: Request) -> Optional[bytes]:
        """The 401/403 answer when the token or the browser Origin is not accepted, else None."""
        tokens = request.args.get(b"token") if request.args else None
        denial = self._access.check(
            authorization=_header(request, b"authorization"),
            query_token=tokens[-1].decode("utf-8", "replace") if tokens else None,
            origin=_header(request, b"origin"),
            host=_header(request, b"host"))
        if denial is None:
            return None
        if denial.code == 401:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="activecall"')
        return _error(request, denial.message, denial.code)

    def _body(self, request: Request, accepted_types: Sequence[bytes]) -> bytes:
        """The request body, at most ``max_message_bytes``, of an accepted Content-Type.

        A body without Content-Type is accepted (curl-like clients); browsers always
        send one, and their cross-site requests are refused by the Origin check anyway.
        """
        content_type = request.getHeader(b"content-type")
        if content_type is not None:
            media_type = content_type.split(b";", 1)[0].strip().lower()
            if media_type not in accepted_types:
                raise _BodyError(415, f"expected Content-Type {' or '.join(t.decode() for t in accepted_types)}")
        body = request.content.read(self._max_body_bytes + 1) if request.content is not None else b""
        if len(body) > self._max_body_bytes:
            raise _BodyError(413, f"request body larger than {self._max_body_bytes} bytes")
        return body

    def _route(self, request: Request, method: str, parts: list[str]) -> Any:
        # Ids in paths are percent-decoded, as ?id= is: dialogIds carry "@" and clients encode them.
        if parts == ["call"]:
            return self._ws["webSocket"].render(request)
        if parts == ["call", "sip"]:
            return self._ws["sip"].render(request)
        if parts == ["call", "webrtc"]:
            return self._ws["webrtc"].render(request)
        if parts in (["list"], ["call", "lists"]) and method == "GET":
            local = [s.list_entry() for s in self._sessions.sessions()]
            if request.args.get(b"scope") == [b"cluster"] and b"forward" not in request.args:
                return self._cluster_list(request, local)
            return _json(request, {"active_calls": local})
        if len(parts) == 2 and parts[0] == "kill" and method == "GET":
            return self._kill(request, unquote(parts[1]))
        if len(parts) == 3 and parts[:2] == ["call", "kill"] and method in ("GET", "POST"):
            return self._kill(request, unquote(parts[2]))
        if len(parts) == 2 and parts[0] == "command" and method == "POST":
            return self._command(request, unquote(parts[1]))
        if len(parts) == 2 and parts[0] == "events" and method == "GET":
            return self._events(request, unquote(parts[1]))
        if parts == ["iceservers"] and method == "GET":
            return _json(request, self._ice_servers_json())
        if parts == ["precache"] and method == "POST" and self._precache is not None:
            return self._precache_route(request)
        if parts == ["api", "playbook", "run"]:
            return self._playbook_run(request) if method == "POST" else _text(request, "Method Not Allowed", 405)
        if parts[:2] == ["api", "playbooks"] and len(parts) <= 3:
            return self._playbooks(request, method, parts[2] if len(parts) == 3 else None)
        if parts == ["registrations"] and method == "GET" and self._registrations is not None:
            return _json(request, self._registrations())
        if parts == ["metrics"] and method == "GET" and self._metrics is not None:
            body, content_type = self._metrics()
            request.setHeader(b"Content-Type", content_type.encode("ascii"))
            return body
        if parts == ["health"] and method == "GET":
            body = self._health() if self._health is not None else {"status": "ok"}
            # A draining node answers 503 so a load balancer's HTTP probe takes it out too.
            return _json(request, body, 503 if body.get("status") == "draining" else 200)
        if parts == [] and method == "GET":
            return self._static(request, "index.html", "Index not found")
        if len(parts) == 2 and parts[0] == "static" and method == "GET":
            return self._static(request, unquote(parts[1]), "Not Found")
        if parts == ["api", "records"] and method == "GET":
            return self._records(request)
        return _text(request, "Not Found", 404)

    def _static(self, request: Request, name: str, missing: str) -> Any:
        """``GET /`` and ``GET /static/{name}``: a file of the test page, by extension; 404 otherwise."""
        content_type = _STATIC_TYPES.get(os.path.splitext(name)[1].lower())
        if (content_type is None or _STATIC_NAME.fullmatch(name) is None or ".." in name
                or "/" in name or "\\" in name or os.path.isabs(name)):
            return _text(request, missing, 404)
        directory = self._static_dir

        def served(data: bytes) -> bytes:
            request.setHeader(b"Content-Type", content_type)
            request.setHeader(b"X-Content-Type-Options", b"nosniff")
            request.setHeader(b"Cache-Control", b"no-cache")
            return data

        return self._off_reactor(
            request, lambda: read_static_file(directory, name), served,
            lambda e: _text(request, missing, 404) if isinstance(e, _StaticNotFound) else None)

    def _records(self, request: Request) -> Any:
        """``GET /api/records``: the newest event dumps of the recording directory, newest first."""
        directory = self._recording_path
        return self._off_reactor(
            request, lambda: list_event_dumps(directory),
            lambda found: _json(request, [{"id": sid, "date": format_rfc3339(mtime), "duration": "0s",
                                           "status": "completed"} for sid, mtime in found]),
            lambda e: None)

    def _kill(self, request: Request, sid: str) -> Any:
        session = self._sessions.get(sid)
        if session is None:
            return self._elsewhere(request, sid, None, lambda: _json(request, {"status": "not_found", "id": sid}, 404))
        session.kill()
        return _json(request, {"status": "killed", "id": sid})

    def _elsewhere(self, request: Request, sid: str, body: Optional[bytes], not_found: Callable[[], bytes]) -> Any:
        """A request for an id this node does not host: sent to its owner (the registry's, else each peer),
        whose answer is streamed back; nobody has it: ``not_found()``.  A forwarded request never hops again."""
        locator = self._locator
        if locator is None or not locator.enabled or b"forward" in request.args:
            return not_found()
        headers = {}
        authorization = request.getHeader(b"authorization")
        if authorization:
            headers["Authorization"] = authorization.decode("latin-1")
        if body is not None:
            headers["Content-Type"] = "application/json"
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))

        async def forward() -> None:
            bases = await locator.candidates(sid)
            sent = await forward_http(self._forward_agent(), self._clock, request, bases,
                                      request.path.decode("ascii", "replace"), body, headers)
            if not gone:
                if not sent:
                    request.write(not_found())
                request.finish()

        def failed(f: Failure) -> None:
            self._log.failure("forwarding {path} failed", f, path=request.path)
            if not gone:
                request.write(_error(request, "internal error", 500))
                request.finish()

        Deferred.fromCoroutine(forward()).addErrback(failed)
        return NOT_DONE_YET

    def _cluster_list(self, request: Request, local: list[dict[str, Any]]) -> Any:
        """``/list?scope=cluster``: every node's calls, each entry naming its ``node``, plus the nodes.

        Each other node's ``/list`` is read within :data:`CLUSTER_LIST_TIMEOUT_S` and
        :data:`CLUSTER_LIST_NODE_MAX_BYTES`; at most :data:`CLUSTER_LIST_MAX_ENTRIES` calls are listed.
        A node that fails, is slow, answers too much or is cut off by the entry cap says so in its
        ``nodes`` entry (``error``, ``truncated``) and in ``errors``; the answer itself is always 200.
        """
        from twisted.internet.defer import DeferredList

        node_id = self._node_id
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))

        async def gather() -> dict[str, Any]:
            errors: list[dict[str, str]] = []
            nodes: list[tuple[str, str]] = []
            if self._cluster_nodes is not None:
                try:
                    nodes = [(o.node, o.url) for o in await self._cluster_nodes()]
                except Exception as e:
                    self._log.info("listing the cluster: the registry's nodes are unknown: {e}", e=e)
                    errors.append({"node": "registry", "error": "registry unreachable"})
            else:
                nodes = [(url, url) for url in (self._locator.peers if self._locator is not None else ())]
            others = [(name, url) for name, url in nodes if name != node_id]

            def fetch(url: str) -> Deferred[bytes]:
                base = url.replace("ws://", "http://", 1).replace("wss://", "https://", 1).rstrip("/")
                headers = Headers()
                authorization = request.getHeader(b"authorization")
                if authorization:
                    headers.addRawHeader(b"authorization", authorization)
                d = self._forward_agent().request(b"GET", f"{base}/list?forward=true".encode("ascii"), headers)
                d.addCallback(_read_node_list, CLUSTER_LIST_NODE_MAX_BYTES)
                return d.addTimeout(CLUSTER_LIST_TIMEOUT_S, self._clock)

            results = await DeferredList([fetch(url) for _, url in others], consumeErrors=True)
            room = CLUSTER_LIST_MAX_ENTRIES
            calls = [dict(entry, node=node_id) for entry in local[:room]]
            mine: dict[str, Any] = {"node": node_id, "reachable": True, "calls": len(calls)}
            if len(local) > room:
                mine["truncated"] = True
            listed = [mine]
            room -= len(calls)
            for (name, url), (ok, outcome) in zip(others, results):
                entry: dict[str, Any] = {"node": name, "url": url}
                entries: list[dict[str, Any]] = []
                error: Optional[str] = None
                if not ok:
                    error = _node_list_error(outcome)
                else:
                    try:
                        entries = [e for e in json.loads(outcome).get("active_calls", []) if isinstance(e, dict)]
                    except (ValueError, AttributeError, TypeError):
                        error = "invalid JSON"
                entry["reachable"] = error is None
                if len(entries) > room:
                    entries, entry["truncated"] = entries[:room], True
                    errors.append({"node": name, "error": f"more than {CLUSTER_LIST_MAX_ENTRIES} calls in the cluster"})
                room -= len(entries)
                entry["calls"] = len(entries)
                if error is not None:
                    entry["error"] = error
                    errors.append({"node": name, "error": error})
                listed.append(entry)
                calls.extend(dict(e, node=name) for e in entries)
            body: dict[str, Any] = {"active_calls": calls, "nodes": listed}
            if errors:
                body["errors"] = errors
            return body

        def done(body: dict[str, Any]) -> None:
            if not gone:
                request.write(_json(request, body))
                request.finish()

        def failed(f: Failure) -> None:
            self._log.failure("listing the cluster failed", f)
            if not gone:
                request.write(_error(request, "internal error", 500))
                request.finish()

        Deferred.fromCoroutine(gather()).addCallbacks(done, failed)
        return NOT_DONE_YET

    def _forward_agent(self) -> Any:
        if self._agent is None:
            from twisted.web.client import Agent, HTTPConnectionPool

            self._agent = Agent(self._clock, pool=HTTPConnectionPool(self._clock, persistent=False))
        return self._agent

    def _command(self, request: Request, sid: str) -> Any:
        session = self._sessions.get(sid)
        if session is None:
            body = self._body(request, _JSON_TYPES)
            return self._elsewhere(request, sid, body, lambda: _json(request, {"status": "not_found", "id": sid}, 404))
        try:
            obj = parse_json(self._body(request, _JSON_TYPES))
            command = command_from_object(obj)
        except (JsonInputError, CommandError) as e:
            return _error(request, e.message, 400)
        session.receive_decoded(obj, command)
        return _json(request, {"status": "sent", "id": sid})

    def _precache_route(self, request: Request) -> Any:
        try:
            command = command_from_object(parse_json(self._body(request, _JSON_TYPES)))
        except (JsonInputError, CommandError) as e:
            return _error(request, e.message, 400)
        if type(command).name != "tts":
            return _json(request, {"status": "error", "error": "precache only accepts tts commands"}, 400)
        assert self._precache is not None
        d = self._precache(command)

        def done(result: dict[str, Any]) -> None:
            request.write(_json(request, result))
            request.finish()

        def failed(f: Any) -> None:
            if not f.check(PrecacheError):
                self._log.failure("precache failed", f)
            request.write(_json(request, {"status": "error", "error": f.getErrorMessage()}, 500))
            request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET

    def _playbooks(self, request: Request, method: str, name: Optional[str]) -> Any:
        """``/api/playbooks[/{name}]``: list, read and save files in ``config/playbook/``, off the reactor."""
        directory = PLAYBOOK_DIR

        def as_text(e: BaseException) -> Optional[bytes]:
            return _text(request, e.message, e.code) if isinstance(e, _PlaybookFileError) else None

        if name is None:
            if method != "GET":
                return _text(request, "Method Not Allowed", 405)
            return self._off_reactor(
                request, lambda: list_playbook_files(directory),
                lambda found: _json(request, [{"name": n, "updated": format_rfc3339(t)} for n, t in found]), as_text)
        name = unquote(name)
        if _PLAYBOOK_NAME.fullmatch(name) is None:
            return _text(request, "Invalid filename", 400)
        valid_name = name
        if method == "GET":
            def markdown(text: bytes) -> bytes:
                request.setHeader(b"Content-Type", b"text/markdown; charset=utf-8")
                return text

            return self._off_reactor(request, lambda: read_playbook_file(directory, valid_name), markdown, as_text)
        if method == "POST":
            text = self._body(request, _PLAYBOOK_TYPES)
            if len(text) > MAX_PLAYBOOK_BYTES:
                return _text(request, f"Playbook larger than {MAX_PLAYBOOK_BYTES} bytes", 413)
            try:
                text.decode("utf-8")
            except UnicodeDecodeError:
                return _text(request, "playbook is not UTF-8 text", 400)
            # Also refuses a symlink in the playbook directory that points elsewhere.
            return self._off_reactor(request, lambda: save_playbook_file(directory, valid_name, text),
                                     lambda _: b"", as_text)
        return _text(request, "Method Not Allowed", 405)

    def _playbook_run(self, request: Request) -> Any:
        """``POST /api/playbook/run``: check the playbook loads, then hand out the session id it waits under."""
        runs = self._playbook_runs
        if runs is None:
            return _error(request, "playbook runs are not enabled", 503)
        try:
            obj = parse_json(self._body(request, _JSON_TYPES))
        except JsonInputError as e:
            return _error(request, e.message, 400)
        if not isinstance(obj, dict):
            return _error(request, "body must be a JSON object", 400)
        for key in ("playbook", "content"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                return _error(request, f"{key} must be a string", 400)
        given = [key for key in ("playbook", "content") if obj.get(key)]
        if len(given) != 1:
            return _error(request, "give exactly one of playbook (a file name) and content (playbook text)", 400)
        value: str = obj[given[0]]
        if given == ["playbook"]:
            # A name that reads as inline text ("---x.md") would not be loaded as a file later.
            if _PLAYBOOK_NAME.fullmatch(value) is None or resolve_playbook_path(value) is None:
                return _error(request, "invalid playbook name (a file name in config/playbook/ ending in .md)", 400)
        else:
            if len(value.encode("utf-8", "surrogatepass")) > MAX_PLAYBOOK_BYTES:
                return _error(request, f"content larger than {MAX_PLAYBOOK_BYTES} bytes", 413)
            if resolve_playbook_path(value) is not None:
                return _error(request, "content must be playbook text starting with ---", 400)
        directory, environ, env_prefix = PLAYBOOK_DIR, self._environ, self._env_prefix

        def started(_: None) -> bytes:
            try:
                sid = runs.add(value)
            except RunsFullError as e:
                return _error(request, str(e), 503)
            self._log.info("playbook run {sid}: {what}", sid=sid,
                           what=value if given == ["playbook"] else "inline playbook")
            return _json(request, {"session_id": sid})

        def refused(e: BaseException) -> Optional[bytes]:
            if isinstance(e, PlaybookNotFound) or (isinstance(e, _PlaybookFileError) and e.code == 404):
                return _error(request, f"playbook not found: {value}", 404)
            if isinstance(e, _PlaybookFileError):
                return _error(request, e.message, e.code)
            if isinstance(e, PlaybookError):
                return _error(request, str(e), 400)
            return None

        return self._off_reactor(request, lambda: check_playbook_run(directory, value, environ, env_prefix),
                                 started, refused)

    def _events(self, request: Request, sid: str) -> Any:
        session = self._sessions.get(sid)
        if session is None:
            return self._elsewhere(request, sid, None, lambda: _text(request, "track not active", 404))
        request.setHeader(b"Content-Type", b"text/event-stream;charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.write(b": connected\n\n")
        stream = _EventStream(request, self._clock, session.remove_listener)
        session.add_listener(stream)
        request.notifyFinish().addBoth(lambda _: stream.gone())
        return NOT_DONE_YET

    def _ice_servers_json(self) -> list[dict[str, Any]]:
        return ice_servers_json(self._ice_servers)


def ice_servers_json(servers: Sequence[Any]) -> list[dict[str, Any]]:
    """``GET /iceservers``: the configured ``[[ice_servers]]`` only (no public server is ever added),
    ``credential_type`` filled for TURN entries and null for STUN-only ones."""
    out = []
    for s in servers:
        turn = any(url.lower().startswith(("turn:", "turns:")) for url in s.urls)
        out.append({"urls": list(s.urls), "username": s.username, "credential": s.credential,
                    "credential_type": (s.credential_type or "password") if turn else None})
    return out


class WebService(Service):
    """Starts and stops the WebSocket factories, which twisted.web's Site does not do."""

    def __init__(self, resource: ApiResource) -> None:
        self._resource = resource

    def startService(self) -> None:
        super().startService()
        for factory in self._resource.factories.values():
            factory.doStart()

    def stopService(self) -> Optional[Any]:
        for factory in self._resource.factories.values():
            factory.doStop()
        return super().stopService()


_TOKEN_IN_QUERY = re.compile(rb"([?&]token=)[^&#]*")


class _LoggedRequest:
    """A request as the access log sees it: the value of ``?token=`` replaced."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self.uri = _TOKEN_IN_QUERY.sub(rb"\1[redacted]", request.uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def _access_log_line(timestamp: str, request: Request) -> str:
    return str(combinedLogFormatter(timestamp, _LoggedRequest(request)))  # type: ignore[arg-type]


def _raw_response(code: int, reason: str, message: str) -> bytes:
    """A complete error response written straight to a transport, before or instead of a Request."""
    body = json.dumps({"status": "error", "error": message}).encode("utf-8")
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body


class _GuardedChannel(HTTPChannel):
    """An HTTPChannel with a deadline for each request to arrive and a cap on its body.

    The deadline (``header_timeout_s``) runs from the connection, or from the end of
    the previous response, until the request line, headers and body are all in, so a
    client trickling bytes cannot hold a connection (twisted's own timeout is an idle
    timeout that every byte resets). Late: 408 and close. A body over ``max_body_bytes``,
    declared or chunked: 413 and close, before it is buffered.
    """

    site: "ActivecallSite"
    _deadline: Optional[IDelayedCall] = None
    _refused = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_deadline()

    def allHeadersReceived(self) -> None:
        limit = self.site.max_body_bytes
        if self.length is not None and self.length > limit:
            self.refuse(413, "Content Too Large", f"request body larger than {limit} bytes")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self._refused:
            return
        self._cancel_deadline()
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        # Armed first: a pipelined next request may be read, and complete, inside requestDone.
        self._arm_deadline()
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def refuse(self, code: int, reason: str, message: str) -> None:
        """Answer ``code`` without a Request and close; later bytes are ignored."""
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        self.transport.write(_raw_response(code, reason, message))
        self.loseConnection()

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        if not self._refused:
            self._deadline = self.callLater(self.site.header_timeout_s, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.refuse(408, "Request Timeout", f"request not received within {self.site.header_timeout_s:g} s")


class _BoundedRequest(Request):
    """A Request whose body stays in memory and is refused (413) past ``max_body_bytes``."""

    _body_bytes = 0

    def gotLength(self, length: Optional[int]) -> None:
        # The channel already refused a larger declared length; a chunked body is counted below.
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        limit = self.channel.site.max_body_bytes
        if self._body_bytes > limit:
            self.channel.refuse(413, "Content Too Large", f"request body larger than {limit} bytes")
            return
        super().handleContentChunk(data)


class ActivecallSite(Site):
    """twisted.web Site with bounded requests (see :class:`_GuardedChannel`); skips access-log
    lines for ``http_access_skip_paths`` and never logs a ``?token=`` value."""

    protocol = _GuardedChannel
    requestFactory = _BoundedRequest

    def __init__(self, resource: Resource, skip_paths: Sequence[str] = (), *,
                 header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                 max_body_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, **kw: Any) -> None:
        kw.setdefault("logFormatter", _access_log_line)
        super().__init__(resource, **kw)
        self.noisy = False
        self.header_timeout_s = header_timeout_s
        self.max_body_bytes = max_body_bytes
        self._skip_exact = {p for p in skip_paths if not p.endswith("*")}
        self._skip_prefix = tuple(p[:-1] for p in skip_paths if p.endswith("*"))

    def log(self, request: Request) -> None:
        path = request.path.decode("utf-8", "replace")
        if path in self._skip_exact or (self._skip_prefix and path.startswith(self._skip_prefix)):
            return
        super().log(request)


class _NodeListTooLarge(Exception):
    """A node's /list body went over CLUSTER_LIST_NODE_MAX_BYTES."""


class _NodeListStatus(Exception):
    """A node's /list answered another code than 200."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _drop(transport: Any) -> None:
    if transport is not None:
        abort = getattr(transport, "abortConnection", None)
        abort() if abort is not None else transport.stopProducing()


class _Unwanted(Protocol):
    """A response body nobody reads: its connection is dropped at once."""

    def connectionMade(self) -> None:
        _drop(self.transport)


class _BoundedBody(Protocol):
    """Collects a response body up to ``limit`` bytes; beyond, the connection is dropped and it fails."""

    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self._done = done
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._cancelled = False

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._chunks = []
            self._done.errback(_NodeListTooLarge())
            self.stop()
            return
        self._chunks.append(data)

    def stop(self) -> None:
        """Drop the connection to the node (as ``readBody`` does on cancel)."""
        _drop(self.transport)

    def cancel(self) -> None:
        """The deadline passed: drop the connection; the Deferred fails with CancelledError."""
        self._cancelled = True
        self.stop()

    def connectionLost(self, reason: Any = None) -> None:
        if self._done.called or self._cancelled:
            return
        from twisted.web.client import PotentialDataLoss, ResponseDone

        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(reason)


def _read_node_list(response: Any, limit: int) -> Deferred[bytes]:
    """The body of another node's ``/list`` answer: 200 and at most ``limit`` bytes, else a failure.

    Cancelling (the deadline) drops the connection, as ``readBody`` does.
    """
    from twisted.web.iweb import UNKNOWN_LENGTH

    reader: list[_BoundedBody] = []
    done: Deferred[bytes] = Deferred(lambda d: reader[0].cancel() if reader else None)
    if response.code != 200 or (response.length is not UNKNOWN_LENGTH and response.length > limit):
        done.errback(_NodeListStatus(response.code) if response.code != 200 else _NodeListTooLarge())
        response.deliverBody(_Unwanted())
        return done
    reader.append(_BoundedBody(done, limit))
    response.deliverBody(reader[0])
    return done


def _node_list_error(failure: Failure) -> str:
    """What /list?scope=cluster says of a node whose /list could not be read."""
    from twisted.internet.defer import CancelledError, TimeoutError as DeferredTimeout

    if failure.check(_NodeListTooLarge):
        return f"answer larger than {CLUSTER_LIST_NODE_MAX_BYTES} bytes"
    if failure.check(_NodeListStatus):
        return f"HTTP {failure.value.code}"
    if failure.check(DeferredTimeout, CancelledError):
        return f"no answer within {CLUSTER_LIST_TIMEOUT_S:g} s"
    return "unreachable"


class _CountedConnection(ProtocolWrapper):
    """One HTTP connection, counted against its client IP until it closes or becomes a WebSocket.

    Autobahn hands an upgraded connection over by setting ``wrappedProtocol`` to the
    WebSocket protocol: from then on it is a control session, bounded by ``max_sessions``
    and the Ping/Pong timeout, not a request in progress. One application server legitimately
    holds hundreds of sessions from one address.
    """

    counted = False

    def __init__(self, factory: "ConnectionLimiter", wrapped: Any, ip: str) -> None:
        self.ip = ip
        super().__init__(factory, wrapped)

    @property
    def wrappedProtocol(self) -> Any:
        return self._wrapped

    @wrappedProtocol.setter
    def wrappedProtocol(self, protocol: Any) -> None:
        self._wrapped = protocol
        if self.counted and not isinstance(protocol, HTTPChannel):
            self.factory.uncount(self)


class _TooManyConnections(Protocol):
    """Answers 503 at once and closes."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(_raw_response(503, "Service Unavailable", "too many connections from this address"))
        self.transport.loseConnection()


class ConnectionLimiter(WrappingFactory):
    """Wraps the Site: at most ``max_per_ip`` HTTP connections per client IP.

    One more is answered 503 and closed before any byte of it is read. Connections
    upgraded to WebSocket sessions no longer count (see :class:`_CountedConnection`).
    """

    _log = Logger()

    def __init__(self, site: Site, max_per_ip: int) -> None:
        super().__init__(site)
        self.noisy = False
        self._max_per_ip = max_per_ip
        self._open: dict[str, int] = {}
        self._refusing: set[str] = set()

    def buildProtocol(self, addr: IAddress) -> Optional[Protocol]:
        ip = str(getattr(addr, "host", ""))
        if self._open.get(ip, 0) >= self._max_per_ip:
            if ip not in self._refusing:
                # Once per burst: an attack must not flood the log.
                self._refusing.add(ip)
                self._log.warn("HTTP: {ip} has {n} connections open (max_connections_per_ip); refusing more with 503",
                               ip=ip, n=self._max_per_ip)
            return _TooManyConnections()
        return _CountedConnection(self, self.wrappedFactory.buildProtocol(addr), ip)

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self._open[p.ip] = self._open.get(p.ip, 0) + 1
        p.counted = True

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        self.uncount(p)

    def uncount(self, p: Any) -> None:
        """``p`` no longer holds one of its IP's slots (closed, or now a WebSocket session)."""
        if not p.counted:
            return
        p.counted = False
        left = self._open.get(p.ip, 0) - 1
        if left > 0:
            self._open[p.ip] = left
        else:
            self._open.pop(p.ip, None)
            self._refusing.discard(p.ip)

    def open_connections(self, ip: str) -> int:
        """Connections from ``ip`` open now."""
        return self._open.get(ip, 0)
