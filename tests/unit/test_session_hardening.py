"""Sessions with hostile input: ids that are paths, unbounded dumps, deep JSON, secrets in /list."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from activecall.call.services import CallServices
from activecall.control.dump import EventDump, dump_writer
from activecall.control.session import SessionManager
from activecall.control.query import MAX_ID_CHARS, QueryError, SessionParams, parse_session_query
from activecall.interfaces import IControlChannel
from activecall.testing import fake_call_services, FakeSynthesizer


@implementer(IControlChannel)
class FakeChannel:
    """Records what a session sends to its WebSocket."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.pings: list[bytes] = []
        self.closed = False

    def send_text(self, text: str) -> None:
        self.texts.append(text)

    def send_binary(self, data: bytes) -> None:
        pass

    def send_ping(self, payload: bytes) -> None:
        self.pings.append(payload)

    def close(self) -> None:
        self.closed = True

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(t) for t in self.texts]


def make_services(clock: Clock, recording_path: str) -> CallServices:
    synth = FakeSynthesizer(clock, ms_per_char=20, chunk_ms=100, chunk_interval_s=0.01)
    return fake_call_services(clock, synthesizer=synth, recording_path=recording_path)


class _SessionCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.root = tempfile.mkdtemp()
        self.recordings = os.path.join(self.root, "recorders")
        self.services = make_services(self.clock, self.recordings)
        self.manager = SessionManager(self.services, max_dump_bytes=2000)

    def open(self, sid: str, dump: bool = True) -> Any:
        session = self.manager.open(SessionParams(sid=sid, call_type="webSocket", dump=dump, ping_s=0))
        channel = FakeChannel()
        session.attach(channel)
        self.addCleanup(lambda: session.finish() if not session.finished else None)
        return session, channel

    def files_outside_recordings(self) -> list[str]:
        found = []
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(directory, name)
                if not path.startswith(self.recordings + os.sep):
                    found.append(path)
        return found


class DumpPathTests(_SessionCase):
    """The event dump stays in the recording directory whatever the session id."""

    def test_traversal_id_writes_inside_recording_dir(self) -> None:
        """A Call-ID-like id ``../../../../x`` dumps to a harmless file name inside the directory."""
        session, _ = self.open("../../../../x-tagA-tagB")
        session.receive_text('{"command":"hangup"}')
        dump_writer().drain()  # the dump's file work runs on the writer thread
        self.assertEqual(os.path.dirname(session.dump_path), os.path.realpath(self.recordings))
        self.assertNotIn("/", os.path.basename(session.dump_path).replace(".events.jsonl", ""))
        self.assertFalse(os.path.basename(session.dump_path).startswith("."))
        self.assertEqual(self.files_outside_recordings(), [])
        self.assertTrue(os.path.exists(session.dump_path))

    def test_readable_id_keeps_its_name(self) -> None:
        """An id of letters, digits, dots and dashes is the dump's file name, as before."""
        session, _ = self.open("e2e-5.abc")
        self.assertEqual(os.path.basename(session.dump_path), "e2e-5.abc.events.jsonl")

    def test_symlink_escape_is_refused_with_an_error_event(self) -> None:
        """A dump file that is a symlink out of the directory is not written; the client gets an error event."""
        os.makedirs(self.recordings)
        outside = os.path.join(self.root, "victim")
        os.symlink(outside, os.path.join(self.recordings, "s1.events.jsonl"))
        session, channel = self.open("s1")
        session.receive_text('{"command":"nope"}')
        self.assertIsNone(session.dump_path)
        self.assertFalse(os.path.exists(outside))
        errors = [e for e in channel.events() if e["event"] == "error" and e["sender"] == "dump"]
        self.assertEqual(len(errors), 1)
        self.assertIn("recording directory", errors[0]["error"])


def _run_now(job: Any) -> bool:
    """A dump writer that runs each file job at once, in the caller's thread."""
    job()
    return True


class DumpBoundTests(SynchronousTestCase):
    """``max_dump_bytes`` bounds the dump; one warning says so."""

    def test_stops_at_the_limit_with_one_warning(self) -> None:
        """Lines past max_bytes are dropped whole; the file never exceeds the bound."""
        from twisted.internet.testing import EventLoggingObserver

        observer = EventLoggingObserver.createWithCleanup(self, EventDump._log.observer)  # type: ignore[attr-defined]
        path = os.path.join(tempfile.mkdtemp(), "d.events.jsonl")
        dump = EventDump(path, max_bytes=500, submit=_run_now)
        for i in range(100):
            dump.write("event", i, "x" * 40)
        dump.close()
        self.assertLessEqual(os.path.getsize(path), 500)
        self.assertGreater(os.path.getsize(path), 300)
        warnings = [e for e in observer if "max_dump_bytes" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    def test_reused_file_counts_what_it_holds(self) -> None:
        """A file that already holds max_bytes gets nothing more."""
        path = os.path.join(tempfile.mkdtemp(), "d.events.jsonl")
        with open(path, "wb") as f:
            f.write(b"y" * 500)
        dump = EventDump(path, max_bytes=500, submit=_run_now)
        dump.write("event", 1, "x")
        dump.close()
        self.assertEqual(os.path.getsize(path), 500)


class DeepJsonTests(_SessionCase):
    """Deeply nested JSON on the WebSocket is an ``error`` event, not a silent drop."""

    def test_recursion_bomb_gets_an_error_event(self) -> None:
        """100 000 nested arrays: error event naming the nesting; the session keeps working."""
        session, channel = self.open("s-deep", dump=False)
        session.receive_text(b"[" * 100_000 + b"]" * 100_000)
        errors = [e for e in channel.events() if e["event"] == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn("nested deeper than", errors[0]["error"])
        session.receive_text('{"command":"dance"}')
        self.assertIn("unknown command: dance", channel.events()[-1]["error"])

    def test_moderately_deep_json_is_refused_before_it_can_break_list(self) -> None:
        """JSON deeper than 64 levels (but parseable) is refused, so /list can always serialize options."""
        session, channel = self.open("s-deep2", dump=False)
        deep: Any = "v"
        for _ in range(500):
            deep = {"k": deep}
        session.receive_text(json.dumps({"command": "invite", "option": {"codec": "pcm", "extra": deep}}))
        self.assertIn("nested deeper than 64 levels", channel.events()[-1]["error"])


class ListRedactionTests(_SessionCase):
    """``/list`` never shows keys, passwords or Authorization headers of a call's option."""

    def test_secrets_in_option_are_redacted(self) -> None:
        """apiKey, secretKey, sip.password, an Authorization header and extra.token are redacted."""
        session, channel = self.open("s-secret", dump=False)
        session.receive_text(json.dumps({"command": "invite", "option": {
            "codec": "pcm",
            "tts": {"provider": "fake", "apiKey": "sk-live-1", "secretKey": "sk-2"},
            "sip": {"username": "alice", "password": "hunter2",
                    "headers": {"Authorization": "Bearer abc", "X-Trace": "t1"}},
            "extra": {"Token": "tok", "note": "keep"},
        }}))
        entry = json.dumps(session.list_entry())
        for secret in ("sk-live-1", "sk-2", "hunter2", "Bearer abc", '"tok"'):
            self.assertNotIn(secret, entry)
        option = session.list_entry()["cs.option"]
        self.assertEqual(option["sip"]["username"], "alice")
        self.assertEqual(option["sip"]["headers"]["X-Trace"], "t1")
        self.assertEqual(option["extra"], {"Token": "[redacted]", "note": "keep"})
        self.assertEqual(option["tts"]["secretKey"], "[redacted]")


class HostsTests(_SessionCase):
    """``hosts`` counts live sessions and inbound calls waiting for their client."""

    def test_pending_calls_are_hosted(self) -> None:
        """A pending dialogId is hosted though it is not (yet) a session."""
        self.services.pending = {"dlg-1"}
        self.open("s-live", dump=False)
        self.assertTrue(self.manager.hosts("dlg-1"))
        self.assertTrue(self.manager.hosts("s-live"))
        self.assertFalse(self.manager.hosts("other"))
        self.assertNotIn("dlg-1", self.manager)


class QueryIdTests(SynchronousTestCase):
    """``?id=`` and ``?serverSideTrack=`` are bounded, printable, without whitespace."""

    def parse(self, **params: str) -> SessionParams:
        return parse_session_query({k: [v] for k, v in params.items()}, "webSocket", lambda: "s.new")

    def test_bad_ids_are_refused(self) -> None:
        """Control characters, NUL, whitespace and over-long ids are QueryErrors naming the parameter."""
        for bad in ("a\x00b", "a\nb", "a b", "\x1b[31m", "x" * (MAX_ID_CHARS + 1)):
            with self.assertRaises(QueryError) as caught:
                self.parse(id=bad)
            self.assertIn("id", str(caught.exception))
        with self.assertRaises(QueryError):
            self.parse(serverSideTrack="a\tb")

    def test_bad_ping_values_are_query_errors(self) -> None:
        """``ping=²`` and a 10 000-digit ping are QueryErrors, not ValueErrors from int()."""
        for bad in ("\u00b2", "9" * 10_000, "-1", "1e3", "4294967296"):
            with self.assertRaises(QueryError):
                self.parse(ping=bad)
        self.assertEqual(self.parse(ping="0").ping_s, 0)
        self.assertEqual(self.parse(ping="4294967295").ping_s, 0xFFFFFFFF)

    def test_dialog_ids_and_paths_are_accepted(self) -> None:
        """A dialogId with @, dashes and dots (or even slashes) is a valid id; the dump sanitizes it."""
        dialog = "a84b4c76e66710@pc33.example.com-Xk29sLp0-1928301774"
        self.assertEqual(self.parse(id=dialog).sid, dialog)
        self.assertEqual(self.parse(id="../../x").sid, "../../x")
        self.assertEqual(self.parse(id="").sid, "s.new")
