"""The HTTP side: WebSocket endpoints and the REST routes of spec §1.3 on one twisted.web Site."""

from __future__ import annotations

import gzip
import json
import os
from urllib.parse import unquote
from typing import Any, Callable, Optional, Sequence

from autobahn.twisted.resource import WebSocketResource
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from activecall.call.tts import PrecacheError
from activecall.control.commands import CommandError, command_from_object
from activecall.control.events import format_rfc3339
from activecall.fileio import write_atomically
from activecall.control.protocol import ControlFactory
from activecall.interfaces import ISessionListener

SSE_KEEPALIVE_S = 15.0
# Playbooks always live here, relative to the working directory (playbook.md §1).
PLAYBOOK_DIR = os.path.join("config", "playbook")


def _json(request: Request, body: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _text(request: Request, body: str, code: int) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return body.encode("utf-8")


@implementer(ISessionListener)
class _EventStream:
    """One ``GET /events/{id}`` client: session traffic as Server-Sent Events."""

    def __init__(self, request: Request, clock: IReactorTime, on_gone: Callable[["_EventStream"], None]) -> None:
        self._request = request
        self._clock = clock
        self._on_gone = on_gone
        self._open = True
        self._keepalive = clock.callLater(SSE_KEEPALIVE_S, self._keep_alive)

    def _write(self, name: str, data: str) -> None:
        if self._open:
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
                 metrics: Optional[Callable[[], tuple[bytes, str]]] = None) -> None:
        super().__init__()
        self._registrations = registrations
        self._metrics = metrics  # () -> (Prometheus text exposition, its content type)
        self._gzip = gzip
        self._sessions = sessions
        self._precache = precache
        self._clock = clock
        self._ice_servers = ice_servers
        self.factories = {
            "webSocket": ControlFactory(sessions, "webSocket", None),
            "sip": ControlFactory(sessions, "sip", None),
            "webrtc": ControlFactory(sessions, "webrtc", None),
        }
        self._ws = {name: WebSocketResource(f) for name, f in self.factories.items()}

    def render(self, request: Request) -> Any:
        path = request.path.decode("utf-8", "replace").rstrip("/") or "/"
        parts = [p for p in path.split("/") if p]
        method = request.method.decode("ascii", "replace")
        try:
            body = self._route(request, method, parts)
        except Exception:
            self._log.failure("HTTP {method} {path} failed", method=method, path=path)
            return _json(request, {"status": "error", "error": "internal error"}, 500)
        if self._gzip and isinstance(body, bytes) and b"gzip" in (request.getHeader(b"accept-encoding") or b""):
            request.setHeader(b"Content-Encoding", b"gzip")
            request.setHeader(b"Vary", b"Accept-Encoding")
            body = gzip.compress(body)
        return body

    def _route(self, request: Request, method: str, parts: list[str]) -> Any:
        if parts == ["call"]:
            return self._ws["webSocket"].render(request)
        if parts == ["call", "sip"]:
            return self._ws["sip"].render(request)
        if parts == ["call", "webrtc"]:
            return self._ws["webrtc"].render(request)
        if parts in (["list"], ["call", "lists"]) and method == "GET":
            return _json(request, {"active_calls": [s.list_entry() for s in self._sessions.sessions()]})
        if len(parts) == 2 and parts[0] == "kill" and method == "GET":
            return self._kill(request, parts[1])
        if len(parts) == 3 and parts[:2] == ["call", "kill"] and method in ("GET", "POST"):
            return self._kill(request, parts[2])
        if len(parts) == 2 and parts[0] == "command" and method == "POST":
            return self._command(request, parts[1])
        if len(parts) == 2 and parts[0] == "events" and method == "GET":
            return self._events(request, parts[1])
        if parts == ["iceservers"] and method == "GET":
            return _json(request, self._ice_servers_json())
        if parts == ["precache"] and method == "POST" and self._precache is not None:
            return self._precache_route(request)
        if parts[:2] == ["api", "playbooks"] and len(parts) <= 3:
            return self._playbooks(request, method, parts[2] if len(parts) == 3 else None)
        if parts == ["registrations"] and method == "GET" and self._registrations is not None:
            return _json(request, self._registrations())
        if parts == ["metrics"] and method == "GET" and self._metrics is not None:
            body, content_type = self._metrics()
            request.setHeader(b"Content-Type", content_type.encode("ascii"))
            return body
        if parts == ["health"] and method == "GET":
            return _json(request, {"status": "ok"})
        return _text(request, "Not Found", 404)

    def _kill(self, request: Request, sid: str) -> bytes:
        session = self._sessions.get(sid)
        if session is None:
            return _json(request, {"status": "not_found", "id": sid}, 404)
        session.kill()
        return _json(request, {"status": "killed", "id": sid})

    def _command(self, request: Request, sid: str) -> bytes:
        session = self._sessions.get(sid)
        if session is None:
            return _json(request, {"status": "not_found", "id": sid}, 404)
        body = request.content.read() if request.content is not None else b""
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return _json(request, {"status": "error", "error": f"invalid JSON: {e}"}, 400)
        try:
            command = command_from_object(obj)
        except CommandError as e:
            return _json(request, {"status": "error", "error": e.message}, 400)
        session.receive_decoded(obj, command)
        return _json(request, {"status": "sent", "id": sid})

    def _precache_route(self, request: Request) -> Any:
        body = request.content.read() if request.content is not None else b""
        try:
            command = command_from_object(json.loads(body))
        except (ValueError, UnicodeDecodeError) as e:
            message = e.message if isinstance(e, CommandError) else f"invalid JSON: {e}"
            return _json(request, {"status": "error", "error": message}, 400)
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

    def _playbooks(self, request: Request, method: str, name: Optional[str]) -> bytes:
        """``/api/playbooks[/{name}]``: list, read and save files in ``config/playbook/``."""
        if name is None:
            if method != "GET":
                return _text(request, "Method Not Allowed", 405)
            entries = []
            if os.path.isdir(PLAYBOOK_DIR):
                for entry in sorted(os.scandir(PLAYBOOK_DIR), key=lambda e: e.name):
                    if entry.is_file() and entry.name.endswith(".md"):
                        entries.append({"name": entry.name, "updated": format_rfc3339(entry.stat().st_mtime)})
            return _json(request, entries)
        name = unquote(name)
        if ".." in name or "/" in name or "\\" in name:
            return _text(request, "Invalid filename", 400)
        path = os.path.join(PLAYBOOK_DIR, name)
        if method == "GET":
            try:
                with open(path, "rb") as f:
                    text = f.read()
            except OSError:
                return _text(request, "Playbook not found", 404)
            request.setHeader(b"Content-Type", b"text/markdown; charset=utf-8")
            return text
        if method == "POST":
            try:
                write_atomically(path, request.content.read() if request.content is not None else b"")
            except OSError as e:
                return _text(request, f"cannot save playbook: {e.strerror}", 500)
            return b""
        return _text(request, "Method Not Allowed", 405)

    def _events(self, request: Request, sid: str) -> Any:
        session = self._sessions.get(sid)
        if session is None:
            return _text(request, "track not active", 404)
        request.setHeader(b"Content-Type", b"text/event-stream;charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.write(b": connected\n\n")
        stream = _EventStream(request, self._clock, session.remove_listener)
        session.add_listener(stream)
        request.notifyFinish().addBoth(lambda _: stream.gone())
        return NOT_DONE_YET

    def _ice_servers_json(self) -> list[dict[str, Any]]:
        if not self._ice_servers:
            return [{"urls": ["stun:stun.l.google.com:19302"], "username": None, "credential": None, "credential_type": None}]
        return [
            {"urls": list(s.urls), "username": s.username, "credential": s.credential, "credential_type": s.credential_type}
            for s in self._ice_servers
        ]


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


class ActivecallSite(Site):
    """twisted.web Site that skips access-log lines for ``http_access_skip_paths``."""

    def __init__(self, resource: Resource, skip_paths: Sequence[str] = (), **kw: Any) -> None:
        super().__init__(resource, **kw)
        self.noisy = False
        self._skip_exact = {p for p in skip_paths if not p.endswith("*")}
        self._skip_prefix = tuple(p[:-1] for p in skip_paths if p.endswith("*"))

    def log(self, request: Request) -> None:
        path = request.path.decode("utf-8", "replace")
        if path in self._skip_exact or (self._skip_prefix and path.startswith(self._skip_prefix)):
            return
        super().log(request)
