"""Tests for activecall.call.record: CDR JSON (playbook.md §14.2), hangup reasons, file naming."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase

from activecall.call.record import (
    CallRecord,
    HangupReason,
    OtherHangupReason,
    RecordedHangupReason,
    RecorderFile,
    build_call_record,
    cdr_hangup_reason,
    command_event_reason,
    event_hangup_reason,
    hangup_reason_from_command,
    hangup_reason_from_name,
    record_file_path,
    status_code,
)
from activecall.options import CallOption

_T0 = datetime(2026, 8, 14, 7, 31, 40, 100000, tzinfo=timezone.utc).timestamp()
_START = "2026-08-14T07:31:40.100000Z"


def _at(offset_s: float) -> float:
    return _T0 + offset_s


def _record(**kw: Any) -> CallRecord:
    base: dict[str, Any] = dict(call_type="sip", call_id="s.1", start_s=_T0, end_s=_at(30))
    base.update(kw)
    return CallRecord(**base)


def _nulls(value: Any, path: str = "$") -> list[str]:
    """Paths of every null inside a JSON value."""
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nulls(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _nulls(v, f"{path}[{i}]")]
    return []


class HangupReasonFromCommandTests(SynchronousTestCase):
    """A hangup command's reason text and initiator map to the recorded reason as AC does."""

    TABLE: list[tuple[Optional[str], Optional[str], RecordedHangupReason]] = [
        (None, None, HangupReason.BY_SYSTEM),
        ("", None, HangupReason.BY_SYSTEM),
        ("caller", None, HangupReason.BY_CALLER),
        ("CALLER", None, HangupReason.BY_CALLER),
        ("callee", None, HangupReason.BY_CALLEE),
        ("refer", None, HangupReason.BY_REFER),
        ("system", None, HangupReason.BY_SYSTEM),
        ("autohangup", None, HangupReason.AUTOHANGUP),
        ("InactivityTimeout", None, HangupReason.INACTIVITY_TIMEOUT),
        ("canceled", None, HangupReason.CANCELED),
        ("Rejected", None, HangupReason.REJECTED),
        ("failed", None, HangupReason.FAILED),
        # AC's comparison cannot reach these names: they stay free text.
        ("noAnswer", None, OtherHangupReason("noAnswer")),
        ("byCaller", None, OtherHangupReason("byCaller")),
        ("Normal clearing", None, OtherHangupReason("Normal clearing")),
        # initiator overrides whatever the reason said
        ("failed", "caller", HangupReason.BY_CALLER),
        ("Normal clearing", "callee", HangupReason.BY_CALLEE),
        (None, "system", HangupReason.AUTOHANGUP),
        ("callee", "system", HangupReason.AUTOHANGUP),
        # any other initiator leaves the reason in force
        ("failed", "client", HangupReason.FAILED),
        ("Normal clearing", "agent", OtherHangupReason("Normal clearing")),
        (None, "Caller", HangupReason.BY_SYSTEM),
    ]

    def test_table(self) -> None:
        """Every (reason, initiator) row maps to its recorded reason."""
        for reason, initiator, expected in self.TABLE:
            with self.subTest(reason=reason, initiator=initiator):
                self.assertEqual(hangup_reason_from_command(reason, initiator), expected)

    def test_cdr_values(self) -> None:
        """The CDR value is the reason's camelCase name, or an ``other`` object for free text."""
        self.assertEqual(cdr_hangup_reason(hangup_reason_from_command("inactivitytimeout", None)), "inactivityTimeout")
        self.assertEqual(cdr_hangup_reason(hangup_reason_from_command(None, "system")), "autohangup")
        self.assertEqual(cdr_hangup_reason(hangup_reason_from_command("Normal clearing", None)), {"other": "Normal clearing"})

    def test_command_event_reason(self) -> None:
        """The hangup event echoes the command's reason text verbatim, else ``byClient``."""
        self.assertEqual(command_event_reason("caller"), "caller")
        self.assertEqual(command_event_reason("Normal clearing"), "Normal clearing")
        self.assertEqual(command_event_reason(None), "byClient")
        self.assertEqual(command_event_reason(""), "byClient")


class HangupReasonFromNameTests(SynchronousTestCase):
    """Daemon-side hangups record their reason name, or free text as ``other``."""

    TABLE: list[tuple[str, RecordedHangupReason, Any, str]] = [
        ("byCaller", HangupReason.BY_CALLER, "byCaller", "byCaller"),
        ("byCallee", HangupReason.BY_CALLEE, "byCallee", "byCallee"),
        ("byRefer", HangupReason.BY_REFER, "byRefer", "byRefer"),
        ("bySystem", HangupReason.BY_SYSTEM, "bySystem", "bySystem"),
        ("autohangup", HangupReason.AUTOHANGUP, "autohangup", "autohangup"),
        ("inactivityTimeout", HangupReason.INACTIVITY_TIMEOUT, "inactivityTimeout", "inactivityTimeout"),
        ("noAnswer", HangupReason.NO_ANSWER, "noAnswer", "noAnswer"),
        ("noBalance", HangupReason.NO_BALANCE, "noBalance", "noBalance"),
        ("answerMachine", HangupReason.ANSWER_MACHINE, "answerMachine", "answerMachine"),
        ("serverUnavailable", HangupReason.SERVER_UNAVAILABLE, "serverUnavailable", "serverUnavailable"),
        ("canceled", HangupReason.CANCELED, "canceled", "canceled"),
        ("rejected", HangupReason.REJECTED, "rejected", "rejected"),
        ("failed", HangupReason.FAILED, "failed", "failed"),
        ("INACTIVITYTIMEOUT", HangupReason.INACTIVITY_TIMEOUT, "inactivityTimeout", "inactivityTimeout"),
        ("DTMF Hangup", OtherHangupReason("DTMF Hangup"), {"other": "DTMF Hangup"}, "DTMF Hangup"),
        ("caller", OtherHangupReason("caller"), {"other": "caller"}, "caller"),
    ]

    def test_table(self) -> None:
        """Each name gives its recorded reason, CDR value and clean event reason."""
        for name, recorded, cdr, event in self.TABLE:
            with self.subTest(name=name):
                got = hangup_reason_from_name(name)
                self.assertEqual(got, recorded)
                self.assertEqual(cdr_hangup_reason(got), cdr)
                self.assertEqual(event_hangup_reason(got), event)


class StatusCodeTests(SynchronousTestCase):
    """statusCode follows the SIP outcome, or media setup for WebSocket/WebRTC sessions."""

    TABLE: list[tuple[str, bool, Optional[int], Optional[RecordedHangupReason], int]] = [
        ("sip", True, None, HangupReason.BY_CALLER, 200),
        ("sip", True, 200, HangupReason.BY_CALLEE, 200),
        ("sip", False, 486, HangupReason.BY_CALLEE, 486),
        ("sip", False, 603, HangupReason.REJECTED, 603),
        ("sip", False, 487, HangupReason.CANCELED, 487),
        ("sip", False, None, HangupReason.CANCELED, 487),
        ("sip", False, 408, HangupReason.BY_CALLEE, 408),
        ("sip", False, None, HangupReason.FAILED, 500),
        ("sip", False, None, None, 500),
        ("b2bua", False, 404, HangupReason.BY_CALLEE, 404),
        ("webSocket", True, None, HangupReason.BY_SYSTEM, 200),
        ("websocket", False, None, HangupReason.FAILED, 0),
        ("webrtc", True, None, HangupReason.CANCELED, 200),
        ("webrtc", False, 500, HangupReason.FAILED, 0),
    ]

    def test_table(self) -> None:
        """Each call outcome gives its status code."""
        for call_type, answered, sip_status, reason, expected in self.TABLE:
            with self.subTest(call_type=call_type, answered=answered, sip_status=sip_status, reason=reason):
                self.assertEqual(status_code(call_type, answered, sip_status, reason), expected)

    def test_unknown_call_type(self) -> None:
        """An unknown call type is a ValueError, not a silently wrong record."""
        self.assertRaises(ValueError, status_code, "pstn", True, None, None)


class BuildCallRecordTests(SynchronousTestCase):
    """build_call_record produces exactly the §14.2 JSON."""

    def test_answered_sip_call(self) -> None:
        """An answered SIP call lists every field in order, with Z times and existing recordings only."""
        option = CallOption(caller="sip:1001@pbx.example.com", callee="sip:2002@pbx.example.com")
        record = _record(
            option=option,
            ring_s=_at(1.5),
            answer_s=_at(4),
            end_s=_at(64.25),
            caller="sip:1001@pbx.example.com",
            callee="sip:2002@pbx.example.com",
            sip_status=200,
            hangup_reason=HangupReason.BY_CALLER,
            recorder=[
                RecorderFile("s.1", "/rec/s.1.wav", 1920044),
                RecorderFile("s.1-gone", "/rec/missing.wav", None),
            ],
            extras={"session_id": "s.1", "_hangup_headers": {"X-Reason": "done"}},
            dump_event_file="/rec/s.1.events.jsonl",
            dump_event_file_exists=True,
        )
        out = build_call_record(record)
        self.assertEqual(
            list(out),
            ["callType", "option", "callId", "startTime", "ringTime", "answerTime", "endTime", "caller",
             "callee", "statusCode", "hangupReason", "recorder", "extras", "dumpEventFile"],
        )
        self.assertEqual(out["callType"], "sip")
        self.assertEqual(out["callId"], "s.1")
        self.assertEqual(out["startTime"], _START)
        self.assertEqual(out["ringTime"], "2026-08-14T07:31:41.600000Z")
        self.assertEqual(out["answerTime"], "2026-08-14T07:31:44.100000Z")
        self.assertEqual(out["endTime"], "2026-08-14T07:32:44.350000Z")
        self.assertEqual(out["caller"], "sip:1001@pbx.example.com")
        self.assertEqual(out["callee"], "sip:2002@pbx.example.com")
        self.assertEqual(out["statusCode"], 200)
        self.assertEqual(out["hangupReason"], "byCaller")
        self.assertEqual(out["recorder"], [{"trackId": "s.1", "path": "/rec/s.1.wav", "size": 1920044}])
        self.assertEqual(out["extras"], {"session_id": "s.1", "_hangup_headers": {"X-Reason": "done"}})
        self.assertEqual(out["dumpEventFile"], "/rec/s.1.events.jsonl")
        self.assertEqual(out["option"]["caller"], "sip:1001@pbx.example.com")
        self.assertEqual(out["option"]["sampleRate"], 16000)
        # CallOption.to_json keeps "sip": null for /list; the CDR omits it.
        self.assertNotIn("sip", out["option"])
        self.assertEqual(_nulls(out), [])

    def test_rejected_486(self) -> None:
        """A rejected inbound call carries 486, ``rejected`` and no answer/ring times."""
        out = build_call_record(_record(sip_status=486, hangup_reason=HangupReason.REJECTED, end_s=_at(2)))
        self.assertEqual(out, {
            "callType": "sip",
            "callId": "s.1",
            "startTime": _START,
            "endTime": "2026-08-14T07:31:42.100000Z",
            "caller": "",
            "callee": "",
            "statusCode": 486,
            "hangupReason": "rejected",
        })

    def test_cancelled_487(self) -> None:
        """A call cancelled while ringing is 487 ``canceled`` with its ring time."""
        out = build_call_record(_record(ring_s=_at(0.5), hangup_reason=HangupReason.CANCELED,
                                        caller="sip:a@x", callee="sip:b@y"))
        self.assertEqual(out, {
            "callType": "sip",
            "callId": "s.1",
            "startTime": _START,
            "ringTime": "2026-08-14T07:31:40.600000Z",
            "endTime": "2026-08-14T07:32:10.100000Z",
            "caller": "sip:a@x",
            "callee": "sip:b@y",
            "statusCode": 487,
            "hangupReason": "canceled",
        })

    def test_failed(self) -> None:
        """A call that failed before any SIP answer is 500 ``failed``."""
        out = build_call_record(_record(hangup_reason=hangup_reason_from_name("failed")))
        self.assertEqual(out["statusCode"], 500)
        self.assertEqual(out["hangupReason"], "failed")
        self.assertNotIn("answerTime", out)

    def test_timed_out(self) -> None:
        """An outbound INVITE that timed out records the 408 it got."""
        out = build_call_record(_record(sip_status=408, hangup_reason=HangupReason.BY_CALLEE))
        self.assertEqual((out["statusCode"], out["hangupReason"]), (408, "byCallee"))

    def test_websocket_answered(self) -> None:
        """A /call session with media set up is ``webSocket`` with status 200."""
        out = build_call_record(_record(call_type="websocket", answer_s=_at(0.2),
                                        hangup_reason=hangup_reason_from_command("Normal clearing", "client")))
        self.assertEqual(out["callType"], "webSocket")
        self.assertEqual(out["statusCode"], 200)
        self.assertEqual(out["answerTime"], "2026-08-14T07:31:40.300000Z")
        self.assertEqual(out["hangupReason"], {"other": "Normal clearing"})

    def test_websocket_without_media(self) -> None:
        """A session that never set up media has status 0."""
        out = build_call_record(_record(call_type="webSocket", hangup_reason=HangupReason.CANCELED))
        self.assertEqual(out["statusCode"], 0)
        out = build_call_record(_record(call_type="webrtc", hangup_reason=HangupReason.CANCELED))
        self.assertEqual((out["callType"], out["statusCode"]), ("webrtc", 0))

    def test_unset_fields_omitted(self) -> None:
        """Option, reason, messages, recorder, extras and a missing dump file are omitted, never null."""
        out = build_call_record(_record(
            recorder=[RecorderFile("s.1", "/rec/s.1.wav", None)],
            dump_event_file="/rec/s.1.events.jsonl",
            dump_event_file_exists=False,
        ))
        self.assertEqual(list(out), ["callType", "callId", "startTime", "endTime", "caller", "callee", "statusCode"])

    def test_hangup_messages_and_recorder_extra(self) -> None:
        """Hangup messages drop unset members; a recording's extra is kept."""
        out = build_call_record(_record(
            hangup_messages=[{"code": 200, "reason": None, "target": "sip:x@y"}],
            recorder=[RecorderFile("s.1", "/r.wav", 44, extra={"format": "wav"})],
        ))
        self.assertEqual(out["hangupMessages"], [{"code": 200, "target": "sip:x@y"}])
        self.assertEqual(out["recorder"], [{"trackId": "s.1", "path": "/r.wav", "size": 44, "extra": {"format": "wav"}}])

    def test_refer_callrecord(self) -> None:
        """The transfer leg nests as ``referCallrecord`` with callType ``b2bua``."""
        leg = _record(call_id="s.1-refer", start_s=_at(10), answer_s=_at(12), end_s=_at(30),
                      callee="sip:agent@pbx", sip_status=200, hangup_reason=HangupReason.BY_REFER)
        out = build_call_record(_record(answer_s=_at(1), hangup_reason=HangupReason.BY_CALLER, refer=leg))
        self.assertEqual(list(out)[-1], "referCallrecord")
        self.assertEqual(out["referCallrecord"], {
            "callType": "b2bua",
            "callId": "s.1-refer",
            "startTime": "2026-08-14T07:31:50.100000Z",
            "answerTime": "2026-08-14T07:31:52.100000Z",
            "endTime": "2026-08-14T07:32:10.100000Z",
            "caller": "",
            "callee": "sip:agent@pbx",
            "statusCode": 200,
            "hangupReason": "byRefer",
        })

    def test_option_mapping(self) -> None:
        """An option given as JSON loses its null members at every depth."""
        out = build_call_record(_record(option={"codec": "pcmu", "sip": None, "vad": {"type": None, "ratio": 0.5}}))
        self.assertEqual(out["option"], {"codec": "pcmu", "vad": {"ratio": 0.5}})


class RecordFilePathTests(SynchronousTestCase):
    """Records are named after the local date and time of the call start."""

    def test_fixed_timezone(self) -> None:
        """The date directory and time stamp use the given zone, even across midnight."""
        start = datetime(2026, 8, 14, 20, 30, 5, 900000, tzinfo=timezone.utc).timestamp()
        plus8 = timezone(timedelta(hours=8))
        self.assertEqual(record_file_path("./config/cdr", "s.1f", start, plus8),
                         "./config/cdr/20260815/20260815-043005_s.1f.json")
        self.assertEqual(record_file_path("/var/cdr", "s.1f", start, timezone.utc),
                         "/var/cdr/20260814/20260814-203005_s.1f.json")
        minus5 = timezone(timedelta(hours=-5))
        self.assertEqual(record_file_path("/var/cdr", "abc", _T0, minus5),
                         "/var/cdr/20260814/20260814-023140_abc.json")

    def test_empty_root(self) -> None:
        """An empty root gives a path relative to the working directory."""
        self.assertEqual(record_file_path("", "x", _T0, timezone.utc), "20260814/20260814-073140_x.json")

    def test_call_id_cannot_escape_root(self) -> None:
        """Path separators in a client-chosen call id are replaced."""
        self.assertEqual(record_file_path("/cdr", "../../etc/x", _T0, timezone.utc),
                         "/cdr/20260814/20260814-073140_.._.._etc_x.json")
