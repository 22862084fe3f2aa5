"""Where a realtime session connects, and which key goes there."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.call.realtime import OPENAI_URL, RealtimeSetupError, realtime_target
from activecall.options import RealtimeOption


class TargetTests(SynchronousTestCase):
    def test_openai_azure_and_a_url(self) -> None:
        url, headers = realtime_target(RealtimeOption(model="m 1"), "sk-operator")
        self.assertEqual(url, f"{OPENAI_URL}?model=m%201")
        self.assertEqual(headers, {"Authorization": "Bearer sk-operator", "OpenAI-Beta": "realtime=v1"})
        url, headers = realtime_target(RealtimeOption(provider="azure", endpoint="https://x.openai.azure.com/",
                                                      secret_key="az"), None)
        self.assertEqual(url, "wss://x.openai.azure.com/openai/realtime?api-version=2024-10-01-preview"
                              "&deployment=gpt-4o-realtime-preview-2024-10-01")
        self.assertEqual(headers, {"api-key": "az"})

    def test_the_operators_key_never_goes_to_a_client_url(self) -> None:
        url, headers = realtime_target(RealtimeOption(provider="wss://bot.example/rt"), "sk-operator")
        self.assertEqual((url, headers), ("wss://bot.example/rt", {"OpenAI-Beta": "realtime=v1"}))
        _, headers = realtime_target(RealtimeOption(provider="wss://bot.example/rt", secret_key="sk-own"), "sk-op")
        self.assertEqual(headers["Authorization"], "Bearer sk-own")

    def test_what_is_missing_is_named(self) -> None:
        self.assertRaises(RealtimeSetupError, realtime_target, RealtimeOption(), None)
        self.assertRaises(RealtimeSetupError, realtime_target, RealtimeOption(provider="azure", secret_key="k"), None)
        self.assertRaises(RealtimeSetupError, realtime_target, RealtimeOption(provider="http://x"), None)


class SessionTests(SynchronousTestCase):
    """A session on a fake connection: what the server sends becomes events, hostile input nothing worse."""

    def setUp(self) -> None:
        import random
        from typing import Any

        from twisted.internet.defer import succeed
        from twisted.internet.task import Clock

        from activecall.call.controller import CallController
        from activecall.options import CallOption
        from activecall.testing import FakeDialer, FakeLeg, FakeSynthesizer, RecordingObserver, fake_call_services

        self.rng = random.Random(3)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        dialer = FakeDialer()
        services = fake_call_services(self.clock, synthesizer=FakeSynthesizer(self.clock), dialers={"sip": dialer})
        self.sent: list[str] = []
        self.opened: list[tuple[str, Any, Any]] = []
        test = self

        class Conn:
            def send_text(self, text: str) -> None:
                test.sent.append(text)

            def close(self) -> None:
                test.sent.append("CLOSE")

        def open_websocket(url: str, listener: Any, headers: Any = None) -> Any:
            self.opened.append((url, listener, headers))
            return succeed(Conn())

        services.open_websocket = open_websocket
        observer = RecordingObserver()
        self.events = observer.events
        self.call = CallController("rt", "server-side-track", "sip", services, observer, dialers=services.dialers)
        self.call.dial(CallOption(callee="sip:x@example.com",
                                  realtime=RealtimeOption(provider="ws://127.0.0.1:9/rt", secret_key="k")))
        self.leg = FakeLeg()
        dialer.attempts[-1][3].callback(self.leg)
        self.session = self.opened[0][1]

    def test_events_and_hostile_messages(self) -> None:
        import base64
        import json

        from activecall.call import events as ce

        self.assertEqual(json.loads(self.sent[0])["type"], "session.update")
        for text in ("not json", "[1, 2]", '{"type": 5}', '{"type": "response.audio.delta", "delta": "!!"}',
                     '{"type": "response.audio_transcript.delta", "item_id": {"a": 1}, "delta": 7}',
                     '{"type": "response.function_call_arguments.done", "call_id": 1, "name": null}',
                     '{"type": "error", "error": "flat"}', '{"type": "error"}'):
            self.session.ws_text(text)
        for _ in range(300):
            blob = bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(64)))
            self.session.ws_text(blob.decode("latin-1"))
        audio = base64.b64encode(b"\x00\x10" * 2400).decode()
        self.session.ws_text(json.dumps({"type": "response.audio.delta", "delta": audio}))
        self.leg.tick()
        self.assertEqual(len(self.leg.sent[-1]), 640)  # 100 ms at 24 kHz, played as 20 ms frames at 16 kHz
        self.session.ws_text(json.dumps({"type": "response.created"}))
        self.session.ws_text(json.dumps({"type": "input_audio_buffer.speech_started"}))
        self.assertEqual(json.loads(self.sent[-1]), {"type": "response.cancel"})
        self.leg.tick()
        self.assertIsNone(self.leg.sent[-1])  # what the model was saying stopped
        kinds = {type(e).__name__ for e in self.events}
        self.assertTrue({"SpeechStarted", "ModelInterrupted", "TranscriptHeard", "FunctionCalled"} <= kinds, kinds)
        self.assertEqual([e.message for e in self.events if isinstance(e, ce.ErrorOccurred)],
                         ["realtime: error", "realtime: error"])
        self.leg.caller_frames.extend([bytes(640)] * 5)
        self.leg.tick()
        self.assertEqual(json.loads(self.sent[-1])["type"], "input_audio_buffer.append")
        self.call.hangup("byClient", "client")
        self.assertEqual(self.sent[-1], "CLOSE")
