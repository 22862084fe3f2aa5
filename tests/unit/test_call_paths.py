"""The controller's SIP, transfer, hold and recording paths, with fake legs and a fake dialer (no sockets)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from activecall.call import events as ce
from activecall.call.controller import CallController, NotAllowedError
from activecall.media.tracks import IInboundLeg, LegRejectedError, LegSetupError
from activecall.options import CallOption, RecorderOption, ReferOption, SipOption
from activecall.testing import fake_call_services, FakeDialer, FakeLeg, FakePending, FakeRecorder, FakeSynthesizer, RecordingObserver

SID = "s.paths"
SST = "server-side-track"


class _Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.synth = FakeSynthesizer(self.clock, ms_per_char=20, chunk_ms=100, chunk_interval_s=0.01)
        self.dialer = FakeDialer()
        self.services = fake_call_services(self.clock, synthesizer=self.synth, dialers={"sip": self.dialer},
                                           inbound_legs=self.dialer)
        self.obs = RecordingObserver()

    def controller(self, pending: Any = None) -> CallController:
        return CallController(SID, SST, "sip", self.services, self.obs, dialers=self.services.dialers, pending=pending)

    def answered_outbound(self, **option: Any) -> tuple[CallController, FakeLeg]:
        c = self.controller()
        c.dial(CallOption(callee="sip:bob@example.com", **option))
        leg = FakeLeg(ssrc=99, answer_sdp="v=0 answer")
        self.dialer.attempts[-1][3].callback(leg)
        return c, leg


class OutboundTests(_Case):
    """dial: trackStart, ringing, answer on the leg's SDP; every way it can end."""

    def test_answer_attaches_the_leg_and_hangup_closes_it_with_headers(self) -> None:
        """An answered leg is attached; hangup sends trackEnd{sid, ssrc}, hangup and BYE headers."""
        verifyObject(IInboundLeg, FakeLeg())
        c = self.controller()
        c.dial(CallOption(callee="sip:bob@example.com", sip=SipOption(hangup_headers={"X-Why": "done"})))
        option, call_id, on_ringing, dialing = self.dialer.attempts[0]
        self.assertEqual((option.callee, call_id), ("sip:bob@example.com", SID))
        on_ringing(True)
        leg = FakeLeg(ssrc=99, answer_sdp="v=0 answer")
        dialing.callback(leg)
        self.assertEqual(self.obs.kinds(), ["TrackStarted", "RingingReported", "CallAnswered"])
        self.assertTrue(self.obs.events[1].early_media)
        self.assertEqual(self.obs.events[2].sdp, "v=0 answer")
        self.assertIs(leg.source, c.track)
        c.hangup("byClient", "client", {"X-Extra": "1"})
        ended = self.obs.of(ce.TrackEnded)[-1]
        self.assertEqual((ended.track, ended.ssrc), (SID, 99))
        self.assertEqual(leg.closed_with, {"X-Why": "done", "X-Extra": "1"})
        self.assertTrue(self.obs.finished)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hangup_carries_the_ringing_time(self) -> None:
        """A call that rang reports when in hangup (ringingTime); one that never rang has none."""
        from activecall.control.dispatch import wire_event

        c = self.controller()
        c.dial(CallOption(callee="sip:bob@example.com"))
        rang = self.clock.seconds()
        self.dialer.attempts[0][2](False)
        self.clock.advance(1)
        self.dialer.attempts[0][3].callback(FakeLeg())
        c.hangup("byClient", "client")
        ended = self.obs.of(ce.CallEnded)[0]
        self.assertEqual(ended.rang_at, rang)
        self.assertEqual(wire_event(ended).to_json()["ringingTime"], "2023-11-14T22:13:20.000000+00:00")
        self.obs = RecordingObserver()
        c, _ = self.answered_outbound()
        c.hangup("byClient", "client")
        self.assertNotIn("ringingTime", wire_event(self.obs.of(ce.CallEnded)[0]).to_json())

    def test_rejection_reports_reject_and_ends_by_callee(self) -> None:
        """A 486 gives reject{486}, an error naming it and hangup byCallee."""
        c = self.controller()
        c.dial(CallOption(callee="sip:bob@example.com"))
        self.dialer.attempts[0][3].errback(Failure(LegRejectedError(486, "Busy Here")))
        declined = self.obs.of(ce.CallDeclined)[0]
        self.assertEqual((declined.code, declined.reason, declined.refer), (486, "Busy Here", False))
        self.assertEqual(self.obs.of(ce.ErrorOccurred)[0].message, "invite rejected: 486 Busy Here")
        self.assertEqual(self.obs.of(ce.CallEnded)[0].reason, "byCallee")

    def test_setup_error_and_missing_callee(self) -> None:
        """A leg that cannot start is an invite error and a failed hangup, with no trackStart."""
        self.dialer.setup_error = LegSetupError("no RTP ports")
        c = self.controller()
        c.dial(CallOption(callee="sip:bob@example.com"))
        self.assertEqual(self.obs.of(ce.ErrorOccurred)[0].message, "invite failed: no RTP ports")
        self.assertEqual(self.obs.of(ce.TrackStarted), [])
        self.assertEqual(self.obs.of(ce.CallEnded)[0].reason, "failed")

    def test_hangup_while_ringing_cancels_the_attempt(self) -> None:
        """hangup before the answer cancels the dial (SIP CANCEL) and still ends the call's track."""
        c = self.controller()
        c.dial(CallOption(callee="sip:bob@example.com"))
        c.hangup("byClient", "client")
        self.assertEqual(self.dialer.cancelled, [SID])
        self.assertEqual(self.obs.of(ce.TrackEnded)[0].ssrc, 0)
        self.assertEqual(self.obs.of(ce.CallEnded)[0].reason, "byClient")

    def test_second_dial_is_not_allowed(self) -> None:
        """A started call cannot be dialed again."""
        c, _ = self.answered_outbound()
        self.assertRaises(NotAllowedError, c.dial, CallOption(callee="sip:x@y"))

    def test_far_end_bye_ends_by_callee_without_bye(self) -> None:
        """The leg reporting its end hangs the call up byCallee."""
        c, leg = self.answered_outbound()
        leg.events.ended("hangup")
        self.assertEqual(self.obs.of(ce.CallEnded)[0].reason, "byCallee")
        self.assertTrue(leg.closed)


class InboundTests(_Case):
    """Inbound calls handed over by the router or waiting for a client."""

    def test_router_answer_then_media_ready(self) -> None:
        """answer(call=...) emits incoming, trackStart, answer; mediaReady follows the first packet; an RTP leg
        waits for it before an agent speaks."""
        c = self.controller()
        leg = FakeLeg(answer_sdp="v=0 ours")
        leg.signals_media_ready = True
        c.answer(CallOption(tts=None), call=leg)
        self.assertEqual(self.obs.kinds(), ["CallOffered", "TrackStarted", "CallAnswered"])
        self.assertEqual(self.obs.events[0].caller, "sip:alice@example.com")
        self.assertEqual(self.obs.events[2].sdp, "v=0 ours")
        self.assertTrue(c.waits_for_media())
        self.assertEqual(c.agent_uri(), "sip:bot@example.com")
        leg.events.media_ready()
        self.assertIsInstance(self.obs.events[3], ce.MediaArrived)
        self.assertFalse(c.waits_for_media())
        c.say("Hello there.", play_id="greeting", end_of_stream=True)
        # No provider in the option and no default engine registered here: the error says so.
        self.assertIn("no default engine", self.obs.of(ce.ErrorOccurred)[-1].message)

    def test_greeting_without_provider_speaks_with_the_default_engine(self) -> None:
        """With the offline engine registered, a greeting with no tts option is spoken by it."""
        self.services.synthesizers.register("piper", lambda settings: self.synth, aliases=("supertonic",))
        c = self.controller()
        leg = FakeLeg()
        c.answer(CallOption(), call=leg)
        c.say("Hello there.", play_id="greeting", end_of_stream=True)
        self.assertEqual(self.obs.of(ce.TrackStarted)[-1].play_id, "greeting")
        for _ in range(50):
            self.clock.advance(0.02)
            leg.tick()
        self.assertEqual(self.obs.of(ce.ErrorOccurred), [])
        self.assertTrue(any(frame for frame in leg.sent if frame), "the greeting's audio was pulled")
        self.assertEqual(self.synth.requests[0].text, "Hello there.")

    def test_media_setup_failure_is_reported_and_declined(self) -> None:
        """An offer the leg cannot answer: 488 by the leg, an error, hangup failed."""
        c = self.controller()
        leg = FakeLeg()
        leg.prepare_error = "no common codec"
        c.answer(CallOption(), call=leg)
        self.assertEqual(leg.rejected, (488, "Not Acceptable Here"))
        self.assertEqual(self.obs.of(ce.ErrorOccurred)[0].message, "media setup failed: no common codec")
        self.assertEqual(self.obs.of(ce.CallEnded)[0].reason, "failed")

    def test_ring_then_accept_from_pending(self) -> None:
        """ringing with early media rings the waiting call; accept answers it; the caller's BYE ends byCaller."""
        leg = FakeLeg()
        pending = FakePending({SID: leg})
        c = self.controller(pending)
        c.ring(early_media=True)
        self.assertEqual(leg.rang, [True])
        c.answer(CallOption())
        self.assertIsNotNone(leg.answering)
        leg.events.ended("hangup")
        self.assertEqual(self.obs.of(ce.CallEnded)[0].reason, "byCaller")

    def test_ringing_recorder_records_the_early_media(self) -> None:
        """ringing with a recorder starts the recording then: the early media is in it, accept keeps it (one
        recording), and its path is the recorder's."""
        made: list[tuple[str, FakeRecorder]] = []

        def make(path: str) -> FakeRecorder:
            made.append((path, FakeRecorder()))
            return made[-1][1]

        self.services.make_recorder = make
        self.services.recording_path = tempfile.mkdtemp()
        leg = FakeLeg()
        c = self.controller(FakePending({SID: leg}))
        c.ring(early_media=True, recorder=RecorderOption(recorder_file="early.wav"))
        self.assertEqual([os.path.basename(p) for p, _ in made], ["early.wav"])
        leg.caller_frames.append(b"\x05" * 640)
        leg.tick()
        c.answer(CallOption(recorder=RecorderOption(recorder_file="other.wav")))
        leg.caller_frames.append(b"\x06" * 640)
        leg.tick()
        self.assertEqual(len(made), 1)
        self.assertEqual(bytes(made[0][1].left), b"\x05" * 640 + b"\x06" * 640)
        c.hangup("byClient", "client")
        self.assertTrue(made[0][1].closed)

    def test_accept_without_a_pending_call(self) -> None:
        """accept with nothing waiting: reject{486} and not allowed."""
        c = self.controller(FakePending({"other": FakeLeg()}))
        self.assertRaises(NotAllowedError, c.answer, CallOption())
        self.assertEqual(self.obs.of(ce.CallDeclined)[0].code, 486)

    def test_cancel_while_ringing_and_unconfirmed_answer(self) -> None:
        """CANCEL after ringing ends as canceled; an answer never ACKed (408) ends as failed."""
        leg = FakeLeg()
        pending = FakePending({SID: leg})
        c = self.controller(pending)
        c.ring()
        leg.events.ended("hangup")
        self.assertEqual(pending.log, [("cancelled", SID)])
        self.assertEqual(self.obs.of(ce.CallEnded)[0].reason, "canceled")
        self.obs = RecordingObserver()
        c = self.controller()
        leg = FakeLeg()
        c.answer(CallOption(), call=leg)
        assert leg.answering is not None
        leg.answering.errback(Failure(LegRejectedError(408, "Request Timeout")))
        self.assertEqual(self.obs.of(ce.CallEnded)[0].reason, "failed")

    def test_client_gone_before_answer_declines(self) -> None:
        """A client closing before it answers declines the waiting call (603)."""
        pending = FakePending({SID: FakeLeg()})
        c = self.controller(pending)
        c.hangup("canceled", "client")
        self.assertEqual(pending.log, [("client_disconnected", SID)])

    def test_hangup_after_ringing_terminates_with_487(self) -> None:
        """A call rung but not accepted is answered 487 at hangup, by the pending list or by its leg."""
        leg = FakeLeg()
        pending = FakePending({SID: leg})
        c = self.controller(pending)
        c.ring()
        c.hangup("byClient", "client")
        self.assertEqual(pending.log, [("reject", 487)])
        self.obs = RecordingObserver()
        leg = FakeLeg()
        pending = FakePending({SID: leg})
        c = self.controller(pending)
        c.ring()
        pending.calls.clear()  # no longer listed as waiting (its accept timer ran elsewhere)
        c.hangup("byClient", "client")
        self.assertEqual(leg.rejected, (487, "Request Terminated"))


class LegEventTests(_Case):
    """What the leg reports becomes events; audio flows receive -> fan-out, source -> leg."""

    def test_hold_is_reported_on_change_only(self) -> None:
        """hold(True) twice gives one hold event; hold(False) another."""
        c, leg = self.answered_outbound()
        leg.events.hold(True)
        leg.events.hold(True)
        leg.events.hold(False)
        self.assertEqual([e.on_hold for e in self.obs.of(ce.HoldChanged)], [True, False])
        self.assertFalse(c.on_hold)

    def test_dtmf_message_and_refer_request(self) -> None:
        """A key, a MESSAGE and a REFER from the far end become their events."""
        _, leg = self.answered_outbound()
        leg.events.dtmf("5")
        leg.events.message("hi", "text/plain")
        leg.events.transfer_requested("sip:carol@example.com", None)
        self.assertEqual(self.obs.of(ce.DtmfReceived)[0].digit, "5")
        self.assertEqual(self.obs.of(ce.MessageReceived)[0].body, "hi")
        self.assertEqual(self.obs.of(ce.TransferRequested)[0].refer_to, "sip:carol@example.com")

    def test_message_is_sent_in_the_dialog(self) -> None:
        """message sends MESSAGE on the leg: no event on 200, an error naming a rejection."""
        c, leg = self.answered_outbound()
        c.send_message("hello", "text/plain", {"X-A": "1"})
        self.assertEqual(leg.messages, [("hello", "text/plain", {"X-A": "1"})])

        class Response:
            status, reason = 200, "OK"

        leg.message_result.callback(Response())
        self.assertEqual(self.obs.of(ce.ErrorOccurred), [])
        Response.status, Response.reason = 488, "Not Acceptable Here"
        leg.message_result = succeed(Response())
        c.send_message("again", "text/plain")
        self.assertEqual(self.obs.of(ce.ErrorOccurred)[-1].message, "message rejected: 488 Not Acceptable Here")
        self.assertRaises(NotAllowedError, c.send_message, "x", "text/plain", refer=True)

    def test_subscribe_mirrors_both_directions_and_mute_silences_the_caller(self) -> None:
        """subscribe tags caller audio 0x01; caller mute zeroes what every sink sees."""
        c, leg = self.answered_outbound(subscribe=True)
        leg.caller_frames.append(b"\x05" * 640)
        leg.tick()
        self.assertEqual(self.obs.audio, [b"\x01" + b"\x05" * 640])
        c.mute(SID, True)
        leg.caller_frames.append(b"\x05" * 640)
        leg.tick()
        self.assertEqual(self.obs.audio[-1], b"\x01" + bytes(640))
        self.assertRaises(NotAllowedError, c.mute, "nobody", True)


class RecordingTests(_Case):
    """The recorder is a sink on the fan-out and sees the agent frame of each pull."""

    def test_caller_left_agent_right_one_frame_per_pull(self) -> None:
        """Each tick writes one stereo frame: the caller frame left, silence right when the agent is quiet."""
        recorder = FakeRecorder()
        self.services.make_recorder = lambda path: recorder
        self.services.auto_record = True
        self.services.recording_path = tempfile.mkdtemp()
        c, leg = self.answered_outbound()
        leg.caller_frames.append(b"\x07" * 640)
        leg.tick()
        leg.tick()
        self.assertEqual(bytes(recorder.left), b"\x07" * 640 + bytes(640))
        self.assertEqual(bytes(recorder.right), bytes(1280))
        c.hangup("byClient", "client")
        self.assertTrue(recorder.closed)


class TransferTests(_Case):
    """refer: a bridged transfer leg on the server-side track, or a SIP REFER."""

    def test_bridged_transfer_joins_audio_and_ends_the_call_by_refer(self) -> None:
        """The transfer leg gets X-Referred headers; audio crosses both ways; its BYE ends the call."""
        c, leg = self.answered_outbound(caller="sip:bot@example.com")
        c.transfer("sip:carol@example.com", "", ReferOption())
        option, call_id, on_ringing, dialing = self.dialer.attempts[-1]
        self.assertEqual(option.sip.headers["X-Referred-Id"], SID)
        self.assertEqual(option.sip.headers["X-Referred-To"], "sip:bob@example.com")
        self.assertTrue(call_id.startswith("ref-"))
        on_ringing(False)
        target = FakeLeg(ssrc=7)
        dialing.callback(target)
        answered = self.obs.of(ce.CallAnswered)[-1]
        self.assertTrue(answered.refer)
        leg.caller_frames.append(b"\x01" * 640)
        leg.tick()  # caller -> transfer target
        target.tick()
        self.assertEqual(target.sent, [b"\x01" * 640])
        target.caller_frames.append(b"\x02" * 640)
        target.tick()  # transfer target -> caller, on SST
        leg.tick()
        self.assertEqual(leg.sent[-1], b"\x02" * 640)
        self.assertRaises(NotAllowedError, c.transfer, "sip:dave@example.com")
        target.events.ended("hangup")
        kinds = self.obs.kinds()
        self.assertEqual(kinds[-4:], ["TrackEnded", "CallEnded", "TrackEnded", "CallEnded"])
        self.assertTrue(self.obs.events[-3].refer)
        self.assertEqual(self.obs.events[-1].reason, "byRefer")

    def test_keys_are_relayed_across_the_bridge_unless_forward_dtmf_is_false(self) -> None:
        """A key the caller presses is played to the transfer target and one the target presses to the
        caller, both still reported (dtmf, dtmf{refer}); with forwardDtmf false nothing is played."""
        for forward in (True, False):
            c, leg = self.answered_outbound()
            c.transfer("sip:carol@example.com", "", ReferOption(forward_dtmf=forward, auto_hangup=False))
            leg.events.dtmf("5")  # before the target answers: nowhere to play it
            target = FakeLeg(ssrc=7)
            self.dialer.attempts[-1][3].callback(target)
            leg.events.dtmf("1")
            target.events.dtmf("#")
            heard = [(e.track, e.digit, e.refer) for e in self.obs.of(ce.DtmfReceived)[-3:]]
            self.assertEqual(heard, [(SID, "5", None), (SID, "1", None), ("server-side-track", "#", True)])
            self.assertEqual((target.dtmf_sent, leg.dtmf_sent), ((["1"], ["#"]) if forward else ([], [])))
            c.end_transfer("byClient", "client")
            leg.events.dtmf("2")  # the bridge is gone
            self.assertEqual(target.dtmf_sent, ["1"] if forward else [])

    def test_transfer_rejected_or_timed_out_keeps_the_call(self) -> None:
        """A declined target gives reject{refer}; a target that never answers gives 408 after timeout."""
        c, _ = self.answered_outbound()
        c.transfer("sip:carol@example.com", "", ReferOption())
        self.dialer.attempts[-1][3].errback(Failure(LegRejectedError(486, "Busy Here")))
        self.assertEqual(self.obs.of(ce.CallDeclined)[-1].refer, True)
        c.transfer("sip:carol@example.com", "", ReferOption(timeout=5))
        self.clock.advance(5)
        self.assertEqual(self.obs.of(ce.CallDeclined)[-1].code, 408)
        self.assertFalse(c.ended)

    def test_hangup_refer_ends_only_the_transfer_when_auto_hangup_off(self) -> None:
        """hangup{refer} with autoHangup off ends the transfer leg with BYE and keeps the call."""
        c, _ = self.answered_outbound()
        c.transfer("sip:carol@example.com", "", ReferOption(auto_hangup=False))
        target = FakeLeg()
        self.dialer.attempts[-1][3].callback(target)
        c.end_transfer("byClient", "client", {"X-Bye": "1"})
        self.assertEqual(target.closed_with, {"X-Bye": "1"})
        self.assertFalse(c.ended)
        self.assertRaises(NotAllowedError, c.end_transfer, "byClient", "client")

    def test_blind_refer_follows_the_notify_status(self) -> None:
        """sipRefer sends REFER; a 1xx sipfrag changes nothing, 2xx ends byRefer."""
        c, leg = self.answered_outbound()
        c.transfer("carol@example.com", "", ReferOption(sip_refer=True))
        self.assertEqual(leg.refer_targets, ["sip:carol@example.com"])

        class Accepted:
            status, reason = 202, "Accepted"

        leg.refer_result.callback(Accepted())
        leg.events.transfer_progress(180, "180 Ringing")
        self.assertFalse(c.ended)
        leg.events.transfer_progress(200, "200 OK")
        self.assertEqual(self.obs.of(ce.CallEnded)[-1].reason, "byRefer")

    def test_blind_refer_failure_is_an_error(self) -> None:
        """A failing target's sipfrag is an error and the call goes on."""
        c, leg = self.answered_outbound()
        c.transfer("sip:carol@example.com", "", ReferOption(sip_refer=True))

        class Accepted:
            status, reason = 202, "Accepted"

        leg.refer_result.callback(Accepted())
        leg.events.transfer_progress(486, "486 Busy Here")
        self.assertEqual(self.obs.of(ce.ErrorOccurred)[-1].message, "refer failed: the transfer target answered 486 Busy Here")
        self.assertFalse(c.ended)
