"""The daemon's services and process-wide policy (activecall.lifecycle): ordered stop, drain, start-up call, open-files limit, periodic garbage collection."""

from __future__ import annotations

import resource
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from activecall.lifecycle import raise_open_files_limit


class OpenFilesLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.saved = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, self.saved)
        if self.saved[1] != resource.RLIM_INFINITY and self.saved[1] < 2048:
            self.skipTest("hard RLIMIT_NOFILE too low to test")

    def test_soft_limit_raised_to_hard(self) -> None:
        """A soft limit of 1024 is lifted to the hard limit (at most the wanted number)."""
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, self.saved[1]))
        old, new = raise_open_files_limit(2048)
        self.assertEqual((old, new), (1024, 2048))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 2048)

    def test_higher_soft_limit_kept(self) -> None:
        """A soft limit already above the wanted number is left alone."""
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, self.saved[1]))
        self.assertEqual(raise_open_files_limit(1500), (2048, 2048))


class CyclicGarbageServiceTests(SynchronousTestCase):
    """Ended calls' reference cycles are collected on a fixed period, not when Python's thresholds say."""

    def test_collects_every_interval_until_stopped(self) -> None:
        """A full collection runs every 15 s on the injected clock, none after stop."""
        from twisted.internet.task import Clock

        from activecall.lifecycle import CyclicGarbageService

        clock = Clock()
        runs: list[float] = []
        svc = CyclicGarbageService(clock, collect=lambda: runs.append(clock.seconds()))
        svc.startService()
        clock.advance(14)
        self.assertEqual(runs, [])
        clock.advance(1)
        clock.advance(15)
        self.assertEqual(runs, [15.0, 30.0])
        svc.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class FakeSessions:
    """Live sessions as the drain and the start-up call see them; records what was done to them."""

    def __init__(self, live: int = 0) -> None:
        from twisted.internet.defer import Deferred

        self.live = live
        self.killed = 0
        self.idle: list[Deferred[None]] = []
        self.opened: list[Any] = []

    def __len__(self) -> int:
        return self.live

    def wait_idle(self) -> Deferred[None]:
        from twisted.internet.defer import Deferred, succeed

        if not self.live:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.idle.append(d)
        return d

    def end_all(self) -> None:
        self.live = 0
        for d in self.idle:
            d.callback(None)

    def kill_all(self) -> None:
        self.killed += 1
        self.end_all()

    def new_sid(self) -> str:
        return "s.1234"

    def open(self, params: Any) -> Any:
        session = FakeSession(params)
        self.opened.append(session)
        return session


class FakeController:
    """Records the typed operations it is asked for; ``dial`` answers with ``result``."""

    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.dialed: list[Any] = []
        self.result: Deferred[None] = Deferred()

    def dial(self, option: Any) -> Deferred[None]:
        self.dialed.append(option)
        return self.result


class FakeSession:
    def __init__(self, params: Any) -> None:
        self.params = params
        self.controller = FakeController()
        self.submitted: list[Any] = []

    def submit(self, command: Any) -> None:
        self.submitted.append(command)


class FakeRecordWriter:
    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.drained: Deferred[None] = Deferred()
        self.asked = 0

    def drain(self) -> Deferred[None]:
        self.asked += 1
        return self.drained


class SequentialServiceTests(SynchronousTestCase):
    def test_children_stop_in_reverse_order_one_after_the_other(self) -> None:
        """The last child stops first, and the next one only once the previous stop has fired."""
        from twisted.application import service
        from twisted.internet.defer import Deferred

        from activecall.lifecycle import SequentialService

        stops: list[str] = []
        waits: dict[str, Deferred[None]] = {}

        class Child(service.Service):
            def __init__(self, name: str) -> None:
                self.name = name

            def stopService(self) -> Deferred[None]:
                super().stopService()
                stops.append(self.name)
                waits[self.name] = Deferred()
                return waits[self.name]

        group = SequentialService()
        for name in ("sip", "registrations", "drain"):
            Child(name).setServiceParent(group)
        group.startService()
        d = group.stopService()
        self.assertEqual(stops, ["drain"])
        waits["drain"].callback(None)
        self.assertEqual(stops, ["drain", "registrations"])
        waits["registrations"].callback(None)
        self.assertNoResult(d)
        waits["sip"].callback(None)
        self.assertEqual(stops, ["drain", "registrations", "sip"])
        self.successResultOf(d)


class DrainCallsServiceTests(SynchronousTestCase):
    """Graceful shutdown: refuse new calls, wait for running ones, then cut; no record lost."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.refused = 0

    def refuse(self) -> None:
        self.refused += 1

    def drain(self, sessions: FakeSessions, graceful: bool = True, **kwargs: Any) -> Any:
        from activecall.lifecycle import DrainCallsService

        svc = DrainCallsService(sessions, self.clock, graceful=graceful, timeout_s=30.0,
                                refuse_new_calls=self.refuse, **kwargs)
        svc.startService()
        return svc

    def test_graceful_waits_then_kills_what_is_left(self) -> None:
        """New calls are refused at once; running calls get the timeout to end, then are hung up."""
        sessions = FakeSessions(live=2)
        d = self.drain(sessions).stopService()
        self.assertEqual(self.refused, 1)
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.assertEqual(sessions.killed, 0)
        self.clock.advance(0.1)
        self.assertEqual(sessions.killed, 1)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_graceful_ends_early_when_calls_end(self) -> None:
        """Calls ending on their own finish the stop before the timeout, with nothing killed."""
        sessions = FakeSessions(live=1)
        d = self.drain(sessions).stopService()
        self.clock.advance(5)
        sessions.end_all()
        self.successResultOf(d)
        self.assertEqual(sessions.killed, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_not_graceful_kills_at_once(self) -> None:
        """Without graceful_shutdown every call is hung up when the stop begins, with nothing to wait for."""
        sessions = FakeSessions(live=3)
        result = self.drain(sessions, graceful=False).stopService()
        self.assertEqual((self.refused, sessions.killed), (1, 1))
        self.assertIsNone(result)

    def test_records_in_flight_and_writer_are_waited_for(self) -> None:
        """The stop fires only after the records being assembled and the writer's saves are done."""
        from twisted.internet.defer import Deferred

        sessions = FakeSessions()
        assembling: Deferred[None] = Deferred()
        writer = FakeRecordWriter()
        d = self.drain(sessions, graceful=False, records_in_flight={assembling},
                       record_writer=writer).stopService()
        self.assertNoResult(d)
        self.assertEqual(writer.asked, 0)
        assembling.callback(None)
        self.assertEqual(writer.asked, 1)
        self.assertNoResult(d)
        writer.drained.callback(None)
        self.successResultOf(d)

    def test_graceful_waits_for_records_after_the_calls(self) -> None:
        """After a graceful wait the writer is drained too."""
        sessions = FakeSessions(live=1)
        writer = FakeRecordWriter()
        d = self.drain(sessions, record_writer=writer).stopService()
        sessions.end_all()
        self.assertEqual(writer.asked, 1)
        self.assertNoResult(d)
        writer.drained.callback(None)
        self.successResultOf(d)


class DrainProbeTests(SynchronousTestCase):
    """The drain seen by an edge proxy: the real router and user agent on a memory UDP transport."""

    def test_drain_answers_probes_503_and_keeps_the_running_call(self) -> None:
        """On stop the node answers OPTIONS and new INVITEs 503 at once; the call up before goes on and its BYE ends the drain."""
        import random

        from twisted.internet.task import Clock

        from activecall.handlers.router import InboundRouter
        from activecall.ids import IdSource
        from activecall.lifecycle import DrainCallsService
        from activecall.sip.message import parse_message
        from activecall.sip.transport import SipDatagramProtocol, SipStack
        from activecall.sip.useragent import SHUTTING_DOWN_REASON, SipUserAgent
        from activecall.testing_sip import AutoAnswerHandler, MemoryDatagramTransport, minimal_sdp

        clock = Clock()
        ids = IdSource(random.Random(7))
        stack = SipStack(clock, ids, shards=1)
        route = AutoAnswerHandler()
        router = InboundRouter(route)
        ua = SipUserAgent(stack, ids=ids, handler=router.call_handler)
        proto = SipDatagramProtocol(stack)
        transport = MemoryDatagramTransport(("10.0.0.1", 5060))
        proto.makeConnection(transport)  # type: ignore[arg-type]
        stack.add_listener("udp", "10.0.0.1", 5060, proto)
        edge = ("10.0.0.9", 5060)

        def send(method: str, n: int, to_tag: str = "", body: bytes = b"") -> None:
            to = "<sip:agent@10.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
            cseq = 1 if method in ("INVITE", "ACK") else 2
            data = (f"{method} sip:agent@10.0.0.1:5060 SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bK{method}{n}\r\n"
                    f"From: <sip:dispatcher@10.0.0.9>;tag=f{n}\r\nTo: {to}\r\nCall-ID: c{n}\r\n"
                    f"CSeq: {cseq} {method}\r\nContact: <sip:edge@10.0.0.9>\r\nMax-Forwards: 70\r\n"
                    + ("Content-Type: application/sdp\r\n" if body else "")
                    + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            proto.datagramReceived(data, edge)

        def answers() -> list[Any]:
            out = [parse_message(data) for data, _ in transport.written]
            transport.written.clear()
            return out

        send("INVITE", 1, body=minimal_sdp("10.0.0.9"))
        (ok,) = answers()
        self.assertEqual(ok.status, 200)
        send("ACK", 1, to_tag=ok.to.tag)
        send("OPTIONS", 2)
        self.assertEqual([r.status for r in answers()], [200])

        sessions = FakeSessions(live=1)
        svc = DrainCallsService(sessions, clock, graceful=True, timeout_s=30.0,
                                refuse_new_calls=lambda: (ua.start_draining(), router.reject_waiting_calls()))
        svc.startService()
        stopped = svc.stopService()
        send("OPTIONS", 3)
        send("INVITE", 4, body=minimal_sdp("10.0.0.9"))
        refused = answers()
        self.assertEqual([(r.status, r.cseq.method) for r in refused], [(503, "OPTIONS"), (503, "INVITE")])
        self.assertEqual({r.headers.get("Reason") for r in refused}, {SHUTTING_DOWN_REASON})
        self.assertEqual(len(route.calls), 1, "the refused INVITE never reached the route")

        clock.advance(10)
        self.assertNoResult(stopped)
        answers()  # the unacknowledged 503's retransmissions
        send("BYE", 1, to_tag=ok.to.tag)
        self.assertEqual([(r.status, r.cseq.method) for r in answers()], [(200, "BYE")])
        self.assertEqual(route.calls[0].listener.names()[-2:], ["bye", "terminated"])  # type: ignore[union-attr]
        sessions.end_all()
        self.successResultOf(stopped)
        self.assertEqual(sessions.killed, 0)


class StartupCallServiceTests(SynchronousTestCase):
    """``--call URI``: one outbound call through the typed controller API, a second after start-up."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from activecall.lifecycle import StartupCallService

        self.clock = Clock()
        self.sessions = FakeSessions()
        self.svc = StartupCallService(self.sessions, self.clock, "sip:bob@example.com")

    def test_call_placed_after_one_second(self) -> None:
        """After 1 s a session c.<uuid> (no dump, no pings) dials the URI with a 50 s inactivity timeout."""
        from activecall.control.query import SessionParams
        from activecall.options import CallOption

        self.svc.startService()
        self.clock.advance(0.9)
        self.assertEqual(self.sessions.opened, [])
        self.clock.advance(0.1)
        [session] = self.sessions.opened
        self.assertEqual(session.params, SessionParams(sid="c.1234", call_type="sip", dump=False, ping_s=0))
        self.assertEqual([c.option for c in session.submitted],
                         [CallOption(callee="sip:bob@example.com", inactivity_timeout=50)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_handler_playbook_drives_the_call(self) -> None:
        """--call with --handler x.md: the invite carries the playbook (the session loads and runs it)."""
        from activecall.lifecycle import StartupCallService

        svc = StartupCallService(self.sessions, self.clock, "sip:bob@example.com", playbook="x.md")
        svc.startService()
        self.clock.advance(1)
        [session] = self.sessions.opened
        [command] = session.submitted
        self.assertEqual((command.name, command.option.playbook), ("invite", "x.md"))

    def test_stop_before_the_second_cancels(self) -> None:
        """A stop within the first second places no call and leaves no timer."""
        self.svc.startService()
        self.clock.advance(0.5)
        self.svc.stopService()
        self.clock.advance(5)
        self.assertEqual(self.sessions.opened, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PrepareProcessTests(SynchronousTestCase):
    """Start-up checks: config warnings, the open-files limit and an open control API are logged."""

    def warnings(self, toml: str, open_files: int = 65536, ffmpeg_found: bool = True) -> list[str]:
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import Logger, formatEvent

        from activecall.config import Overrides, parse_config
        from activecall.lifecycle import prepare_process

        observer = EventLoggingObserver()
        self.switch_intervals: list[float] = []
        self.codec_limits = 0

        def limit_codec_threads() -> bool:
            self.codec_limits += 1
            return ffmpeg_found

        prepare_process(parse_config(toml, Overrides()), Logger(observer=observer),
                        raise_limit=lambda: (1024, open_files), set_switch_interval=self.switch_intervals.append,
                        limit_codec_threads=limit_codec_threads)
        return [formatEvent(e) for e in observer]

    def test_the_reactor_gets_the_gil_sooner(self) -> None:
        """Worker threads hold the GIL at most 0.2 ms while the reactor waits (CPython's default is 5 ms)."""
        self.warnings('http_addr = "127.0.0.1:8080"\n')
        self.assertEqual(self.switch_intervals, [0.0002])

    def test_ffmpeg_thread_pools_limited_once(self) -> None:
        """FFmpeg is told once to start no thread pools; when its library is not found, that is a warning."""
        self.assertEqual(self.warnings('http_addr = "127.0.0.1:8080"\n'), [])
        self.assertEqual(self.codec_limits, 1)
        [line] = self.warnings('http_addr = "127.0.0.1:8080"\n', ffmpeg_found=False)
        self.assertIn("two idle FFmpeg threads", line)

    def test_quiet_on_loopback_with_enough_files(self) -> None:
        """A loopback API and 65536 files log nothing."""
        self.assertEqual(self.warnings('http_addr = "127.0.0.1:8080"\n'), [])

    def test_few_open_files_warned(self) -> None:
        """Fewer than 4096 open files after raising the limit is a warning."""
        [line] = self.warnings('http_addr = "127.0.0.1:8080"\n', open_files=1024)
        self.assertIn("only 1024 open files allowed", line)

    def test_open_api_without_token_warned(self) -> None:
        """An API on all interfaces without [api] tokens is a warning; with a token it is not."""
        [line] = self.warnings('http_addr = "0.0.0.0:8080"\n')
        self.assertIn("needs no token", line)
        self.assertEqual(self.warnings('http_addr = "0.0.0.0:8080"\n[api]\ntokens = ["t0ken-t0ken-t0ken-t0ken"]\n'), [])

    def test_config_warnings_logged(self) -> None:
        """Each warning the config reader collected is logged with a config: prefix."""
        lines = self.warnings('http_addr = "127.0.0.1:8080"\n[handler]\ntype = "playbook"\n')
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].startswith("config: "), lines)


class LogDestinationTests(SynchronousTestCase):
    """Logs go where the operator asked: twistd --logfile, else log_file, else stdout."""

    def test_logfile_then_log_file_then_stdout(self) -> None:
        """The command line wins; '-' is stdout; neither is stdout (None)."""
        from activecall.logs import log_destination

        self.assertEqual(log_destination("/var/log/a.log", "/tmp/b.log"), "/var/log/a.log")
        self.assertIsNone(log_destination("-", "/tmp/b.log"))
        self.assertEqual(log_destination(None, "/tmp/b.log"), "/tmp/b.log")
        self.assertIsNone(log_destination(None, None))

    def test_twistd_parent_option_is_read(self) -> None:
        """The plugin's options see twistd's --logfile through their parent."""
        from twisted.scripts.twistd import ServerOptions

        from activecall.tap import _twistd_logfile

        top = ServerOptions()
        top["logfile"] = "/tmp/x.log"

        class Sub:
            parent = top

        self.assertEqual(_twistd_logfile(Sub()), "/tmp/x.log")
        self.assertIsNone(_twistd_logfile(object()))



class PortChatterTests(SynchronousTestCase):
    """The per-call start/close lines of RTP and RTCP sockets stay out of the log unless log_level is debug."""

    def test_media_port_lines_dropped_at_info_kept_at_debug(self) -> None:
        """At info only the SIP listener's line and ordinary lines remain; debug keeps everything."""
        import io

        from twisted.logger import globalLogPublisher
        from twisted.python import log

        from activecall.logs import make_observer

        kept = {}
        for level in ("info", "debug"):
            out = io.StringIO()
            observer = make_observer(level, None, out)
            globalLogPublisher.addObserver(observer)
            try:
                for text in ("(UDP Port 40000 Closed)", "rtp starting on 40000", "rtcp starting on 40001",
                             "SipUdpProtocol starting on 5060", "hello"):
                    log.msg(text)
            finally:
                globalLogPublisher.removeObserver(observer)
            kept[level] = [line.split("] ", 1)[-1] for line in out.getvalue().splitlines()]
        self.assertEqual(kept["info"], ["SipUdpProtocol starting on 5060", "hello"])
        self.assertEqual(len(kept["debug"]), 5)
