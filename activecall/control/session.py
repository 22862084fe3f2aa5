"""A session: one control WebSocket = one call (spec §1.2).

The session owns the ordered command queue, fans events out to the
WebSocket, Server-Sent Events listeners and the event dump, sends the
keep-alive pings, and hands commands to its :class:`CallController`.
"""

from __future__ import annotations

import dataclasses
import json

from collections import deque
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from activecall.call.controller import CallController
from activecall.call.events import CallEvent
from activecall.call.services import CallServices
from activecall.clock import CallClock
from activecall.control import commands as cmds
from activecall.control import events as ev
from activecall.control.access import redact_secrets
from activecall.control.commands import CommandError, command_from_object
from activecall.control.dispatch import execute, wire_event
from activecall.control.query import SessionParams
from activecall.control.dump import EventDump, dump_path_for
from activecall.control.wirejson import JsonInputError, parse_json
from activecall.fileio import UnsafePathError
from activecall.interfaces import IControlChannel, ISessionListener
from activecall.legs.websocket import ControlSocketAudio, WebSocketDialer
from activecall.playbook.model import PlaybookError
from activecall.playbook.runner import PlaybookRunner, is_inline_playbook

_STARTING_COMMANDS = (cmds.InviteCommand, cmds.AcceptCommand)

# Active Call holds at most 32 queued commands while one blocks.
MAX_QUEUED_COMMANDS = 32


class CallSession:
    """One control session and its call."""

    _log = Logger()

    def __init__(self, params: SessionParams, services: CallServices, on_finished: Callable[["CallSession"], None],
                 max_dump_bytes: Optional[int] = None, playbooks: Optional[PlaybookRunner] = None,
                 playbook: Optional[str] = None) -> None:
        self.params = params
        self._playbooks = playbooks
        # /api/playbook/run: the playbook the session's first invite/accept runs.
        self._run_playbook = playbook
        self.sid = params.sid
        self.call_type = params.call_type
        self.server_side_track = params.server_side_track
        self._services = services
        self._on_finished = on_finished
        self._timers = CallClock(services.clock)
        self._channel: Optional[IControlChannel] = None
        self._listeners: list[ISessionListener] = []
        self._queue: deque[Any] = deque()
        self._busy = False
        self.finished = False
        self.done: Deferred[None] = Deferred()
        self._dump_problem: Optional[str] = None
        self.dump = self._open_dump(max_dump_bytes) if params.dump else None
        self.dump_path = self.dump.path if self.dump is not None else None
        dialers = dict(services.dialers)
        self.audio: Optional[ControlSocketAudio] = None
        if self.call_type == "webSocket":
            # /call: the call's audio travels inside this session's own socket.
            self.audio = ControlSocketAudio(self.send_audio)
            dialers["webSocket"] = WebSocketDialer(self.audio, services.media_clock, services.clock, services.ids)
        self.controller = CallController(
            self.sid, self.server_side_track, self.call_type, services, self, dialers=dialers,
            pending=services.pending if self.call_type == "sip" else None, dump_path=self.dump_path,
            wait_dump_closed=self._wait_dump_closed if self.dump is not None else None)
        if params.ping_s:
            self._timers.call_later(params.ping_s, self._ping)

    def _wait_dump_closed(self) -> None:
        """Block (in a worker thread) until the dump is closed and flushed, at most 5 s."""
        if self.dump is not None:
            self.dump.wait_closed(5.0)

    def _open_dump(self, max_bytes: Optional[int]) -> Optional[EventDump]:
        try:
            path = dump_path_for(self._services.recording_path, self.sid)
        except UnsafePathError as e:
            self._log.warn("session {sid}: no event dump: {e}", sid=self.sid, e=e)
            self._dump_problem = "event dump refused: its path would leave the recording directory"
            return None
        dump = EventDump(path, max_bytes)
        self._dump_problem = dump.problem
        return dump

    # -- wiring -------------------------------------------------------------

    def attach(self, channel: IControlChannel) -> None:
        """Connect the client's WebSocket; it learns at once if its event dump cannot be written."""
        self._channel = channel
        if self._dump_problem is not None:
            self.emit(ev.ErrorEvent(track_id=self.sid, timestamp=self.now_ms(), sender="dump", error=self._dump_problem))

    def add_listener(self, listener: ISessionListener) -> None:
        """Add an observer (an SSE stream)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: ISessionListener) -> None:
        """Remove an observer."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def now_ms(self) -> int:
        """Current time in ms since the epoch."""
        return int(self._services.clock.seconds() * 1000)

    # -- input ----------------------------------------------------------------

    def receive_text(self, text: str | bytes) -> None:
        """A Text frame arrived: decode one command, or report why it is not one."""
        try:
            obj = parse_json(text)
        except JsonInputError as e:
            self._record_command(text if isinstance(text, str) else text.decode("utf-8", "replace"))
            self._command_error(e.message)
            return
        self.receive_object(obj)

    def receive_object(self, obj: object) -> None:
        """A parsed JSON command (WebSocket or ``POST /command/{id}``)."""
        self._record_command(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
        try:
            command = command_from_object(obj)
        except CommandError as e:
            self._command_error(e.message)
            return
        self.submit(command)

    def receive_decoded(self, obj: object, command: Any) -> None:
        """A command already decoded by the caller (``POST /command/{id}``)."""
        self._record_command(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
        self.submit(command)

    def submit(self, command: Any) -> None:
        """Queue a decoded command; commands run strictly one after another."""
        if self.finished:
            return
        if len(self._queue) >= MAX_QUEUED_COMMANDS:
            self._command_error(f"{type(command).name} not allowed: command queue is full ({MAX_QUEUED_COMMANDS} waiting)")
            return
        self._queue.append(command)
        self._pump()

    def _pump(self) -> None:
        while self._queue and not self._busy and not self.finished:
            command = self._queue.popleft()
            try:
                result = self._with_playbook(command)
                if result is None:
                    result = execute(self.controller, command)
            except Exception:
                self._log.failure("command {name} failed", name=type(command).name)
                self._command_error(f"{type(command).name} failed: internal error")
                continue
            if isinstance(result, Deferred) and not result.called:
                self._busy = True
                result.addErrback(lambda f: self._log.failure("command failed", f))
                result.addBoth(self._unblock)

    def _with_playbook(self, command: Any) -> Optional[Deferred[Any]]:
        """``option.playbook`` (or the session's /api/playbook/run playbook) on an invite/accept: load it,
        merge its options under the command's, attach its engine, then run the command (None: no playbook)."""
        if not isinstance(command, _STARTING_COMMANDS) or self.controller.agent is not None:
            return None
        value = command.option.playbook if command.option is not None else None
        if value is None:
            value, self._run_playbook = self._run_playbook, None
        if value is None:
            return None
        if self._playbooks is None:
            self.controller.error("playbook engine not available", sender="playbook")
            return None
        return Deferred.fromCoroutine(self._start_with_playbook(command, value))

    async def _start_with_playbook(self, command: Any, value: str) -> None:
        runner = self._playbooks
        assert runner is not None
        name = "inline playbook" if is_inline_playbook(value) else value
        try:
            playbook = await runner.load(value)
            texts = await runner.prompt_texts(playbook)
        except PlaybookError as e:
            self.controller.error(f"playbook {name}: {e}", sender="playbook")
            return
        except Exception:
            self._log.failure("loading playbook {name} failed", name=name)
            self.controller.error(f"playbook {name}: cannot be loaded", sender="playbook")
            return
        if self.finished or self.controller.ended:
            return
        option = runner.call_option(playbook, command.option)
        pending = self._services.pending.get(self.sid) if self._services.pending is not None else None
        caller = getattr(pending, "caller", None) if pending is not None else option.caller
        callee = getattr(pending, "callee", None) if pending is not None else option.callee
        runner.attach(self.controller, playbook, texts, caller=caller, callee=callee)
        result = execute(self.controller, dataclasses.replace(command, option=option))
        if isinstance(result, Deferred):
            await result

    def _unblock(self, _: object) -> None:
        self._busy = False
        self._pump()

    def receive_audio(self, data: bytes) -> None:
        """A Binary frame arrived: caller audio on /call, ignored elsewhere."""
        if self.audio is not None and not self.finished:
            self.audio.receive(data)

    def client_closed(self) -> None:
        """The client closed the socket: same as hangup, recorded reason canceled."""
        self._channel = None
        if not self.finished:
            self.controller.hangup("canceled", "client")

    def kill(self) -> None:
        """``GET /kill/{id}``: end the call as if the client had closed."""
        if not self.finished:
            self.controller.hangup("canceled", "system")

    # -- output ---------------------------------------------------------------

    def call_event(self, event: CallEvent) -> None:
        """The controller reports something: send it as its wire event."""
        self.emit(wire_event(event))

    def client_audio(self, data: bytes) -> None:
        """``subscribe``: call audio for the client."""
        self.send_audio(data)

    def call_finished(self) -> None:
        """The controller ended the call."""
        self.finish()

    def emit(self, event: Any) -> None:
        """Send an event to the WebSocket, SSE listeners and the dump."""
        text = ev.encode_event(event)
        if self._channel is not None:
            self._channel.send_text(text)
        for listener in list(self._listeners):
            listener.on_event(text)
        if self.dump is not None:
            self.dump.write("event", self.now_ms(), text)

    def send_audio(self, data: bytes) -> None:
        """Send a Binary frame of agent audio (never dumped)."""
        if self._channel is not None:
            self._channel.send_binary(data)
        for listener in self._listeners:
            listener.on_binary(data)

    def _record_command(self, text: str) -> None:
        for listener in list(self._listeners):
            listener.on_command(text)
        if self.dump is not None:
            self.dump.write("command", self.now_ms(), text)

    def _command_error(self, message: str) -> None:
        self.emit(ev.ErrorEvent(track_id=self.sid, timestamp=self.now_ms(), sender="command", error=message))

    def _ping(self) -> None:
        now = self._services.clock.seconds()
        payload = ev.format_rfc3339(now)
        if self._channel is not None:
            self._channel.send_ping(payload.encode())
        text = json.dumps({"event": "ping", "timestamp": int(now * 1000), "payload": payload})
        for listener in list(self._listeners):
            listener.on_ping(text)
        if self.dump is not None:
            self.dump.write("event", int(now * 1000), text)
        self._timers.call_later(self.params.ping_s, self._ping)

    def finish(self) -> None:
        """The call ended: close the socket, end SSE streams, forget the session."""
        if self.finished:
            return
        self.finished = True
        self._queue.clear()
        self._timers.cancel_all()
        if self.dump is not None:
            self.dump.close()
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.on_close()
        self._on_finished(self)
        self.done.callback(None)

    # -- introspection ----------------------------------------------------------

    def list_entry(self) -> dict[str, Any]:
        """This session as one entry of ``GET /list``."""
        c = self.controller
        return {
            "id": self.sid,
            "callType": self.call_type,
            # Keys, passwords and Authorization headers of the option stay with the session.
            "cs.option": redact_secrets(c.option.to_json()) if c.option is not None else None,
            "ringTime": ev.format_rfc3339_z(c.rang_at) if c.rang_at is not None else None,
            "startTime": ev.format_rfc3339_z(c.answered_at) if c.answered_at is not None else None,
        }


class SessionManager:
    """All live sessions by id.

    The control WebSocket refuses an id that is already live (docs/security.md); an
    internal ``open`` with such an id replaces the older entry (spec §6.20).
    """

    _log = Logger()

    def __init__(self, services: CallServices, max_dump_bytes: Optional[int] = None,
                 playbooks: Optional[PlaybookRunner] = None, runs: Any = None) -> None:
        self._services = services
        self._max_dump_bytes = max_dump_bytes
        #: Loads playbooks and attaches their engines (None: no playbook engine).
        self.playbooks = playbooks
        # /api/playbook/run: session id -> playbook waiting for its socket (PlaybookRuns).
        self._runs = runs
        self._sessions: dict[str, CallSession] = {}
        self._idle_waiters: list[Deferred[None]] = []
        #: The shared call registry (cluster/registry.py) told of each session; None: a lone node.
        self.registry: Any = None

    def open(self, params: SessionParams) -> CallSession:
        """Create a session and list it at once."""
        playbook = self._runs.take(params.sid) if self._runs is not None else None
        session = CallSession(params, self._services, self._forget, self._max_dump_bytes,
                              playbooks=self.playbooks, playbook=playbook)
        self._sessions[params.sid] = session
        self._log.info("session {sid} opened ({call_type})", sid=params.sid, call_type=params.call_type)
        if self.registry is not None:
            self.registry.claim(params.sid)
        return session

    def _forget(self, session: CallSession) -> None:
        if self._sessions.get(session.sid) is session:
            del self._sessions[session.sid]
            if self.registry is not None and not self.hosts(session.sid):
                self.registry.release(session.sid)
        self._log.info("session {sid} ended", sid=session.sid)
        if not self._sessions:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def wait_idle(self) -> Deferred[None]:
        """Fires when no session is left (graceful shutdown); cancellable."""
        d: Deferred[None] = Deferred()
        if not self._sessions:
            d.callback(None)
        else:
            self._idle_waiters.append(d)
        return d

    def kill_all(self) -> None:
        """End every session now, as ``/kill`` does."""
        for session in list(self._sessions.values()):
            session.kill()

    def get(self, sid: str) -> Optional[CallSession]:
        """The live session with this id, if any."""
        return self._sessions.get(sid)

    def __contains__(self, sid: str) -> bool:
        return sid in self._sessions

    def hosts(self, sid: str) -> bool:
        """Whether ``sid`` is a live session or an inbound call waiting for its client here (protocol.md §1.5)."""
        pending = self._services.pending
        return (sid in self._sessions or (pending is not None and sid in pending)
                or (self._runs is not None and sid in self._runs))

    def hosted_ids(self) -> list[str]:
        """Every id :meth:`hosts` answers for: sessions, inbound calls waiting, playbook runs waiting."""
        ids = list(self._sessions)
        if self._services.pending is not None:
            ids.extend(self._services.pending)
        if self._runs is not None:
            ids.extend(self._runs)
        return ids

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[CallSession]:
        """All live sessions."""
        return list(self._sessions.values())

    def new_sid(self) -> str:
        """A fresh session id ``s.<uuid4>``."""
        return self._services.ids.session_id()
