"""Tests for activecall.control.events (protocol.md §3)."""

from __future__ import annotations

import dataclasses
import json

from twisted.trial.unittest import SynchronousTestCase

from activecall.control.events import (
    EVENT_TYPES,
    AddHistoryEvent,
    AnswerEvent,
    AnswerMachineDetectionEvent,
    AsrDeltaEvent,
    AsrFinalEvent,
    Attendee,
    CustomEvent,
    DtmfEvent,
    EouEvent,
    ErrorEvent,
    Event,
    FunctionCallEvent,
    HangupEvent,
    HoldEvent,
    InactivityEvent,
    IncomingEvent,
    InterruptEvent,
    InterruptionEvent,
    MediaReadyEvent,
    MessageEvent,
    MetricsEvent,
    OtherEvent,
    RejectEvent,
    RingbackStateEvent,
    RingingEvent,
    SilenceEvent,
    SpeakingEvent,
    TrackEndEvent,
    TrackStartEvent,
    TransferRequestEvent,
    encode_event,
    format_rfc3339,
    format_rfc3339_z,
)

T = 1786704321000
SID = "s.1"
ATT = Attendee("1001", "pbx.example.com", "sip:1001@pbx.example.com")

# (event with every field set, its wire keys in order, event with only required fields, its keys)
FULL_AND_MINIMAL: list[tuple[Event, list[str], Event, list[str]]] = [
    (
        IncomingEvent(SID, T, "sip:a@b", "sip:c@d", "v=0", headers={"X-A": "1"}),
        ["event", "trackId", "timestamp", "caller", "callee", "sdp", "headers"],
        IncomingEvent(SID, T, "sip:a@b", "sip:c@d", "v=0"),
        ["event", "trackId", "timestamp", "caller", "callee", "sdp"],
    ),
    (
        AnswerEvent(SID, T, "v=0", refer=True),
        ["event", "trackId", "timestamp", "sdp", "refer"],
        AnswerEvent(SID, T, ""),
        ["event", "trackId", "timestamp", "sdp", "refer"],
    ),
    (
        RejectEvent(SID, T, "Busy Here", code=486, refer=False),
        ["event", "trackId", "timestamp", "reason", "code", "refer"],
        RejectEvent(SID, T, "Busy Here"),
        ["event", "trackId", "timestamp", "reason"],
    ),
    (
        RingingEvent(SID, T, True, refer=True),
        ["event", "trackId", "timestamp", "earlyMedia", "refer"],
        RingingEvent(SID, T, False),
        ["event", "trackId", "timestamp", "earlyMedia", "refer"],
    ),
    (
        MediaReadyEvent(SID, T),
        ["event", "trackId", "timestamp"],
        MediaReadyEvent(SID, T),
        ["event", "trackId", "timestamp"],
    ),
    (
        HangupEvent(SID, T, reason="byCaller", initiator="caller", start_time="a", hangup_time="b",
                    answer_time="c", ringing_time="d", from_=ATT, to=ATT, extra={"k": "v"}, refer=True),
        ["event", "trackId", "timestamp", "reason", "initiator", "startTime", "hangupTime",
         "answerTime", "ringingTime", "from", "to", "extra", "refer"],
        HangupEvent(SID, T, start_time="a", hangup_time="b"),
        ["event", "trackId", "timestamp", "startTime", "hangupTime", "refer"],
    ),
    (
        TrackStartEvent(SID, T, play_id="p"),
        ["event", "trackId", "timestamp", "playId"],
        TrackStartEvent(SID, T),
        ["event", "trackId", "timestamp"],
    ),
    (
        TrackEndEvent(SID, T, 1200, 12345, play_id="p"),
        ["event", "trackId", "timestamp", "duration", "ssrc", "playId"],
        TrackEndEvent(SID, T, 0, 0),
        ["event", "trackId", "timestamp", "duration", "ssrc"],
    ),
    (
        InterruptionEvent(SID, T, play_id="p", subtitle="Hello", position=3, total_duration=900, current=400),
        ["event", "trackId", "timestamp", "playId", "subtitle", "position", "totalDuration", "current"],
        InterruptionEvent(SID, T, total_duration=0, current=0),
        ["event", "trackId", "timestamp", "totalDuration", "current"],
    ),
    (
        SpeakingEvent(SID, T, T - 250, is_filler=False, confidence=1.0, refer=False),
        ["event", "trackId", "timestamp", "startTime", "isFiller", "confidence", "refer"],
        SpeakingEvent(SID, T, T - 250),
        ["event", "trackId", "timestamp", "startTime"],
    ),
    (
        SilenceEvent(SID, T, T - 900, 900, refer=False),
        ["event", "trackId", "timestamp", "startTime", "duration", "refer"],
        SilenceEvent(SID, T, T - 900, 900),
        ["event", "trackId", "timestamp", "startTime", "duration"],
    ),
    (
        AsrDeltaEvent(SID, T, 0, start_time=1, end_time=2, text="hel", is_filler=False,
                      confidence=0.8, task_id="t", refer=True),
        ["event", "trackId", "timestamp", "index", "startTime", "endTime", "text", "isFiller",
         "confidence", "taskId", "refer"],
        AsrDeltaEvent(SID, T, 0, text="hel"),
        ["event", "trackId", "timestamp", "index", "text"],
    ),
    (
        AsrFinalEvent(SID, T, 1, start_time=1, end_time=2, text="hello", is_filler=True,
                      confidence=0.9, task_id="t", refer=False),
        ["event", "trackId", "timestamp", "index", "startTime", "endTime", "text", "isFiller",
         "confidence", "taskId", "refer"],
        AsrFinalEvent(SID, T, 1, text="hello"),
        ["event", "trackId", "timestamp", "index", "text"],
    ),
    (
        DtmfEvent(SID, T, "#", refer=True),
        ["event", "trackId", "timestamp", "digit", "refer"],
        DtmfEvent(SID, T, "5"),
        ["event", "trackId", "timestamp", "digit"],
    ),
    (
        HoldEvent(SID, T, True, refer=True),
        ["event", "trackId", "timestamp", "onHold", "refer"],
        HoldEvent(SID, T, False),
        ["event", "trackId", "timestamp", "onHold", "refer"],
    ),
    (
        TransferRequestEvent(SID, T, "<sip:x@y>", referred_by="<sip:a@b>", refer=False),
        ["event", "trackId", "timestamp", "referTo", "referredBy", "refer"],
        TransferRequestEvent(SID, T, "<sip:x@y>"),
        ["event", "trackId", "timestamp", "referTo", "refer"],
    ),
    (
        MessageEvent(SID, T, "hi", content_type="text/plain", refer=True),
        ["event", "trackId", "timestamp", "body", "contentType", "refer"],
        MessageEvent(SID, T, "hi"),
        ["event", "trackId", "timestamp", "body", "refer"],
    ),
    (
        RingbackStateEvent(SID, T, "ringing", 3, 0.7, prev_state="silence", prev_confidence=0.6,
                           is_final=False, refer=False),
        ["event", "trackId", "timestamp", "state", "stateIndex", "confidence", "prevState",
         "prevConfidence", "isFinal", "refer"],
        RingbackStateEvent(SID, T, "busy_tone", 1, 0.95, is_final=True),
        ["event", "trackId", "timestamp", "state", "stateIndex", "confidence", "isFinal"],
    ),
    (
        InactivityEvent(SID, T),
        ["event", "trackId", "timestamp"],
        InactivityEvent(SID, T),
        ["event", "trackId", "timestamp"],
    ),
    (
        MetricsEvent(T, "ttfb.asr.deepgram", 120, {"index": 0}),
        ["event", "timestamp", "key", "duration", "data"],
        MetricsEvent(T, "k", 0),
        ["event", "timestamp", "key", "duration", "data"],
    ),
    (
        ErrorEvent(SID, T, "tts", "boom", code=500),
        ["event", "trackId", "timestamp", "sender", "error", "code"],
        ErrorEvent(SID, T, "command", "unknown command: x"),
        ["event", "trackId", "timestamp", "sender", "error"],
    ),
    (
        AddHistoryEvent(sender=SID, timestamp=T, speaker="user", text="hi"),
        ["event", "sender", "timestamp", "speaker", "text"],
        AddHistoryEvent(timestamp=T, speaker="user", text="hi"),
        ["event", "timestamp", "speaker", "text"],
    ),
    (
        CustomEvent(T, sender="app", data=[1]),
        ["event", "timestamp", "sender", "data"],
        CustomEvent(T),
        ["event", "timestamp", "data"],
    ),
    (
        InterruptEvent(receiver=SID),
        ["event", "receiver"],
        InterruptEvent(),
        ["event"],
    ),
    (
        FunctionCallEvent(SID, "call_1", "lookup", '{"q":1}', T),
        ["event", "trackId", "callId", "name", "arguments", "timestamp"],
        FunctionCallEvent(SID, "call_1", "lookup", "{}", T),
        ["event", "trackId", "callId", "name", "arguments", "timestamp"],
    ),
    (
        AnswerMachineDetectionEvent(SID, T, 1, 2, "leave a message"),
        ["event", "trackId", "timestamp", "startTime", "endTime", "text"],
        AnswerMachineDetectionEvent(SID, T, 1, 2, ""),
        ["event", "trackId", "timestamp", "startTime", "endTime", "text"],
    ),
    (
        EouEvent(SID, T, True, interrupt_point=3, text="ok", refer=False),
        ["event", "trackId", "timestamp", "completed", "interruptPoint", "text", "refer"],
        EouEvent(SID, T, False),
        ["event", "trackId", "timestamp", "completed"],
    ),
    (
        OtherEvent(SID, T, "x", extra={"a": "b"}),
        ["event", "trackId", "timestamp", "sender", "extra"],
        OtherEvent(SID, T, "x"),
        ["event", "trackId", "timestamp", "sender"],
    ),
]


class EventKeyTests(SynchronousTestCase):
    """Wire keys of every event in §3.2."""

    def test_table_covers_every_event(self) -> None:
        """The key table exercises all 28 events, each once."""
        names = [full.name for full, _, _, _ in FULL_AND_MINIMAL]
        self.assertEqual(sorted(names), sorted(EVENT_TYPES))
        self.assertEqual(len(EVENT_TYPES), 28)

    def test_class_names_match_wire_names(self) -> None:
        """Each event class is the PascalCase wire name plus ``Event``."""
        for name, cls in EVENT_TYPES.items():
            self.assertEqual(cls.__name__, name[0].upper() + name[1:] + "Event")

    def test_all_fields_set(self) -> None:
        """With every field set, to_json has exactly the spec's keys in table order."""
        for full, keys, _, _ in FULL_AND_MINIMAL:
            wire = full.to_json()
            self.assertEqual(list(wire), keys, full.name)
            self.assertEqual(wire["event"], full.name)

    def test_optional_fields_omitted(self) -> None:
        """With only required fields, None-valued optional keys are absent (never null)."""
        for _, _, minimal, keys in FULL_AND_MINIMAL:
            wire = minimal.to_json()
            self.assertEqual(list(wire), keys, minimal.name)
            nulls = [k for k, v in wire.items() if v is None and k != "data"]
            self.assertEqual(nulls, [], minimal.name)

    def test_timestamp_and_track_id_rules(self) -> None:
        """Every event but interrupt has timestamp; all but metrics/addHistory/interrupt/custom have trackId."""
        for full, _, _, _ in FULL_AND_MINIMAL:
            wire = full.to_json()
            self.assertEqual("timestamp" in wire, full.name != "interrupt", full.name)
            self.assertEqual(
                "trackId" in wire,
                full.name not in ("metrics", "addHistory", "interrupt", "custom"),
                full.name,
            )

    def test_events_are_frozen(self) -> None:
        """Events cannot be modified after construction."""
        ev = DtmfEvent(SID, T, "1")
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, ev, "digit", "2")


class GoldenTests(SynchronousTestCase):
    """Exact JSON text of representative events."""

    def test_hangup_example(self) -> None:
        """The §3.3 hangup example is produced byte for byte in its key order."""
        ev = HangupEvent(
            "s.1f",
            1786704321000,
            reason="byCallee",
            initiator="callee",
            start_time=format_rfc3339(1786692700.1),
            hangup_time=format_rfc3339(1786704321.0),
            answer_time=format_rfc3339(1786692705.25),
            to=Attendee.from_uri("sip:1001@pbx.example.com"),
            extra={"session_id": "s.1f", "call_type": "sip", "start_time": "2026-08-14T07:31:40.100000+00:00"},
            refer=False,
        )
        self.assertEqual(
            encode_event(ev),
            '{"event":"hangup","trackId":"s.1f","timestamp":1786704321000,"reason":"byCallee",'
            '"initiator":"callee","startTime":"2026-08-14T07:31:40.100000+00:00",'
            '"hangupTime":"2026-08-14T10:45:21.000000+00:00",'
            '"answerTime":"2026-08-14T07:31:45.250000+00:00",'
            '"to":{"username":"1001","realm":"pbx.example.com","source":"sip:1001@pbx.example.com"},'
            '"extra":{"session_id":"s.1f","call_type":"sip","start_time":"2026-08-14T07:31:40.100000+00:00"},'
            '"refer":false}',
        )

    def test_command_error_event(self) -> None:
        """The §2.1 command error event has the documented shape."""
        self.assertEqual(
            encode_event(ErrorEvent("s.1", 5, "command", "invalid JSON: x")),
            '{"event":"error","trackId":"s.1","timestamp":5,"sender":"command","error":"invalid JSON: x"}',
        )

    def test_history_and_custom_echo(self) -> None:
        """addHistory and custom echoes match the §2.2 shapes, custom data null kept."""
        self.assertEqual(
            encode_event(AddHistoryEvent(sender="s.1", timestamp=7, speaker="u", text="hi")),
            '{"event":"addHistory","sender":"s.1","timestamp":7,"speaker":"u","text":"hi"}',
        )
        self.assertEqual(encode_event(CustomEvent(7)), '{"event":"custom","timestamp":7,"data":null}')
        self.assertEqual(
            encode_event(MetricsEvent(7, "completed.tts.aliyun", 300, None)),
            '{"event":"metrics","timestamp":7,"key":"completed.tts.aliyun","duration":300,"data":null}',
        )

    def test_track_events(self) -> None:
        """trackStart/trackEnd/interruption golden texts."""
        self.assertEqual(
            encode_event(TrackStartEvent("server-side-track", 1, play_id="turn-1")),
            '{"event":"trackStart","trackId":"server-side-track","timestamp":1,"playId":"turn-1"}',
        )
        self.assertEqual(
            encode_event(TrackEndEvent("server-side-track", 2, 1500, 42, play_id="turn-1")),
            '{"event":"trackEnd","trackId":"server-side-track","timestamp":2,"duration":1500,'
            '"ssrc":42,"playId":"turn-1"}',
        )
        self.assertEqual(
            encode_event(InterruptionEvent("server-side-track", 3, play_id="turn-1", subtitle="Hi",
                                           total_duration=800, current=200)),
            '{"event":"interruption","trackId":"server-side-track","timestamp":3,"playId":"turn-1",'
            '"subtitle":"Hi","totalDuration":800,"current":200}',
        )
        self.assertEqual(encode_event(InterruptEvent()), '{"event":"interrupt"}')

    def test_non_ascii_kept(self) -> None:
        """encode_event writes UTF-8 text unescaped and compact."""
        text = encode_event(AsrFinalEvent("s", 1, 0, text="你好 ça"))
        self.assertIn("你好 ça", text)
        self.assertNotIn(" :", text)
        self.assertEqual(json.loads(text)["text"], "你好 ça")


class AttendeeTests(SynchronousTestCase):
    """Attendee parsing from CallOption caller/callee URIs."""

    def test_from_uri(self) -> None:
        """SIP URIs in several forms give username, realm and the source text."""
        cases = [
            ("sip:1001@pbx.example.com", "1001", "pbx.example.com"),
            ("sips:agent@10.0.0.9:5061;transport=tls", "agent", "10.0.0.9"),
            ('"Bob" <sip:bob:secret@example.org>;tag=1', "bob", "example.org"),
            ("SIP:Alice@Example.COM?subject=x", "Alice", "Example.COM"),
            ("sip:pbx.example.com", "", "pbx.example.com"),
            ("sip:1@[2001:db8::1]:5060", "1", "[2001:db8::1]"),
        ]
        for uri, user, realm in cases:
            self.assertEqual(Attendee.from_uri(uri), Attendee(user, realm, uri), uri)

    def test_unparseable(self) -> None:
        """Text that is not a SIP URI gives empty username and realm."""
        for uri in ["", "garbage", "tel:+1555", "sip:", "sip:@", "http://x@y"]:
            att = Attendee.from_uri(uri)
            self.assertEqual((att.username, att.realm, att.source), ("", "", uri), uri)

    def test_to_json(self) -> None:
        """Attendee serializes as username/realm/source."""
        self.assertEqual(
            ATT.to_json(),
            {"username": "1001", "realm": "pbx.example.com", "source": "sip:1001@pbx.example.com"},
        )


class TimeFormatTests(SynchronousTestCase):
    """RFC 3339 helpers."""

    def test_rfc3339(self) -> None:
        """Times are UTC with microseconds and +00:00."""
        self.assertEqual(format_rfc3339(1786692700.1), "2026-08-14T07:31:40.100000+00:00")
        self.assertEqual(format_rfc3339(0), "1970-01-01T00:00:00.000000+00:00")

    def test_rfc3339_z(self) -> None:
        """The /list form ends in Z."""
        self.assertEqual(format_rfc3339_z(1786692700.1), "2026-08-14T07:31:40.100000Z")
