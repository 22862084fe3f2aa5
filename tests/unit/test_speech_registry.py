"""Tests for the synthesizer registry, built-in registration and FakeSynthesizer."""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from activecall.speech.interfaces import (
    ISpeechSynthesizer,
    ProviderUnavailableError,
    SynthesisError,
    SynthesisRequest,
    UnknownProviderError,
)
from activecall.speech.registry import SynthesisSettings, SynthesizerRegistry
from activecall.speech.tts import register_builtin_synthesizers
from activecall.speech.tts.aliyun import AliyunSynthesizer
from activecall.speech.tts.deepgram import DeepgramSynthesizer
from activecall.speech.tts.openai import OpenAISynthesizer
from activecall.speech.tts.piper import PiperSynthesizer
from activecall.testing import FakeSynthesizer, SynthesizerConformanceMixin


class RegistryTests(SynchronousTestCase):
    """Names, aliases and instance caching."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.built: list[SynthesisSettings] = []
        self.registry = SynthesizerRegistry()

        def factory(settings: SynthesisSettings) -> FakeSynthesizer:
            self.built.append(settings)
            return FakeSynthesizer(self.clock, name="piper")

        self.registry.register("piper", factory, aliases=("supertonic",))
        self.registry.register("fake", lambda s: FakeSynthesizer(self.clock))

    def test_names_exclude_aliases(self) -> None:
        """names() lists canonical names only, sorted."""
        self.assertEqual(self.registry.names(), ["fake", "piper"])

    def test_resolve_aliases_case_insensitively(self) -> None:
        """supertonic maps to piper, in any letter case."""
        self.assertEqual(self.registry.resolve("supertonic"), "piper")
        self.assertEqual(self.registry.resolve("SuperTonic"), "piper")
        self.assertEqual(self.registry.resolve("PIPER"), "piper")

    def test_unknown_name(self) -> None:
        """An unknown name raises UnknownProviderError with AC's message."""
        with self.assertRaises(UnknownProviderError) as cm:
            self.registry.resolve("aliyun")
        self.assertEqual(str(cm.exception), "TTS type not found: aliyun")
        self.assertRaises(UnknownProviderError, self.registry.create, "", SynthesisSettings())
        self.assertIsInstance(cm.exception, ValueError)

    def test_duplicate_registration_rejected(self) -> None:
        """A name or alias cannot be registered twice."""
        self.assertRaises(ValueError, self.registry.register, "Piper", lambda s: FakeSynthesizer(self.clock))
        self.assertRaises(ValueError, self.registry.register, "other", lambda s: FakeSynthesizer(self.clock), aliases=("supertonic",))

    def test_create_caches_per_settings(self) -> None:
        """Equal settings (through an alias too) reuse one provider; other settings build another."""
        a = self.registry.create("piper", SynthesisSettings(models_dir="m"))
        b = self.registry.create("supertonic", SynthesisSettings(models_dir="m"))
        c = self.registry.create("piper", SynthesisSettings(model="x.onnx", models_dir="m"))
        self.assertIs(a, b)
        self.assertIsNot(a, c)
        self.assertEqual(len(self.built), 2)

    def test_alias_substitution_logged_once(self) -> None:
        """Using an alias logs one info line naming the substitution."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.registry.create("supertonic", SynthesisSettings())
        self.registry.create("supertonic", SynthesisSettings(model="y"))
        self.registry.create("piper", SynthesisSettings())
        lines = [e for e in events if e.get("alias") == "supertonic"]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["provider"], "piper")

    def test_failed_factory_not_cached(self) -> None:
        """A factory that raises ProviderUnavailableError is asked again next time."""
        calls: list[int] = []

        def flaky(settings: SynthesisSettings) -> FakeSynthesizer:
            calls.append(1)
            if len(calls) == 1:
                raise ProviderUnavailableError("not yet")
            return FakeSynthesizer(self.clock)

        self.registry.register("flaky", flaky)
        self.assertRaises(ProviderUnavailableError, self.registry.create, "flaky", SynthesisSettings())
        self.assertIsInstance(self.registry.create("flaky", SynthesisSettings()), FakeSynthesizer)


class BuiltinRegistrationTests(SynchronousTestCase):
    """register_builtin_synthesizers wires piper (alias supertonic), openai and the cloud providers."""

    def make(self, environ: dict[str, str]) -> SynthesizerRegistry:
        registry = SynthesizerRegistry()
        clock = Clock()
        register_builtin_synthesizers(
            registry,
            reactor=object(),  # type: ignore[arg-type]
            clock=clock,
            threadpool=object(),  # type: ignore[arg-type]
            http_client=StubTreq(Resource()),
            environ=environ,
            models_dir="/srv/models",
        )
        return registry

    def test_builtins(self) -> None:
        """The built-ins resolve and build providers of the right classes."""
        registry = self.make({"OPENAI_API_KEY": "k"})
        self.assertEqual(registry.names(), ["aliyun", "deepgram", "openai", "piper", "tencent", "tencent_basic"])
        piper = registry.create("supertonic", SynthesisSettings(models_dir=""))
        self.assertIsInstance(piper, PiperSynthesizer)
        self.assertTrue(verifyObject(ISpeechSynthesizer, piper))
        # an empty models_dir is filled from the registration's models_dir
        self.assertEqual(piper.voice_for(SynthesisRequest("x", model="v.onnx"))[0], "/srv/models/v.onnx")
        self.assertIsInstance(registry.create("OpenAI", SynthesisSettings()), OpenAISynthesizer)

    def test_cloud_builtins(self) -> None:
        """deepgram and aliyun build with their environment keys and are unavailable without any."""
        registry = self.make({"DEEPGRAM_API_KEY": "dg", "DASHSCOPE_API_KEY": "ds"})
        self.assertIsInstance(registry.create("deepgram", SynthesisSettings()), DeepgramSynthesizer)
        self.assertIsInstance(registry.create("aliyun", SynthesisSettings()), AliyunSynthesizer)
        bare = self.make({})
        self.assertRaises(ProviderUnavailableError, bare.create, "deepgram", SynthesisSettings())
        self.assertRaises(ProviderUnavailableError, bare.create, "aliyun", SynthesisSettings())

    def test_openai_without_key_unavailable(self) -> None:
        """openai without any key for the official API is ProviderUnavailableError at create time."""
        registry = self.make({})
        self.assertRaises(ProviderUnavailableError, registry.create, "openai", SynthesisSettings())
        # A client-chosen endpoint needs its own key (docs/security.md), whatever the server wants.
        self.assertRaises(ProviderUnavailableError, registry.create, "openai",
                          SynthesisSettings(endpoint="http://127.0.0.1:8000/v1"))
        self.assertIsInstance(registry.create("openai", SynthesisSettings(endpoint="http://127.0.0.1:8000/v1", api_key="none")),
                              OpenAISynthesizer)


class FakeSynthesizerTests(SynthesizerConformanceMixin, SynchronousTestCase):
    """The shipped FakeSynthesizer behaves like a streaming provider on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()

    def make_synthesizer(self) -> FakeSynthesizer:
        return FakeSynthesizer(self.clock)

    def test_streams_chunks_on_the_clock(self) -> None:
        """Audio length follows the text, arrives in 100 ms chunks as the clock advances, then fires."""
        synth = self.make_synthesizer()
        got: list[tuple[bytes, int]] = []
        request = SynthesisRequest("Hello", sample_rate_hz=8000)  # 5 chars * 50 ms = 250 ms
        d = synth.synthesize(request, lambda pcm, rate: got.append((pcm, rate)))
        self.assertEqual(got, [])
        self.clock.advance(0.02)
        self.assertEqual(len(got), 1)
        self.assertNoResult(d)
        self.clock.pump([0.02] * 3)
        self.successResultOf(d)
        self.assertEqual([len(p) for p, _ in got], [1600, 1600, 800])
        self.assertEqual({r for _, r in got}, {8000})
        self.assertEqual(b"".join(p for p, _ in got), synth.audio_for(request))
        self.assertEqual(synth.requests, [request])
        self.assertEqual(synth.active, 0)

    def test_cancel(self) -> None:
        """Cancel stops delivery, errbacks CancelledError and leaves no delayed call."""
        synth = self.make_synthesizer()
        got: list[bytes] = []
        d = synth.synthesize(SynthesisRequest("Hello world"), lambda pcm, rate: got.append(pcm))
        self.clock.advance(0.02)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.clock.advance(10)
        self.assertEqual(len(got), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((synth.cancelled, synth.active), (1, 0))

    def test_configured_failure(self) -> None:
        """fail_with errbacks after the configured number of chunks."""
        synth = FakeSynthesizer(self.clock, fail_with=SynthesisError("boom", retryable=True), fail_after_chunks=2)
        got: list[Any] = []
        d = synth.synthesize(SynthesisRequest("Hello world"), lambda pcm, rate: got.append(pcm))
        self.clock.pump([0.02] * 5)
        self.assertTrue(self.failureResultOf(d, SynthesisError).value.retryable)
        self.assertEqual(len(got), 2)


class PiperConformanceTests(SynthesizerConformanceMixin, SynchronousTestCase):
    """PiperSynthesizer passes the shared provider checks."""

    def make_synthesizer(self) -> ISpeechSynthesizer:
        return PiperSynthesizer(SynthesisSettings(), reactor=object(), threadpool=object())  # type: ignore[arg-type]


class OpenAIConformanceTests(SynthesizerConformanceMixin, SynchronousTestCase):
    """OpenAISynthesizer passes the shared provider checks."""

    def make_synthesizer(self) -> ISpeechSynthesizer:
        return OpenAISynthesizer(SynthesisSettings(api_key="k"), http_client=StubTreq(Resource()), clock=Clock(), environ={})


class DefaultProviderTests(SynchronousTestCase):
    """A tts without a provider speaks with providers.md's default, else the offline engine."""

    def test_defaults_by_language_fall_back_to_the_offline_engine(self) -> None:
        """English takes supertonic (served by piper); Chinese wants aliyun, absent here, so piper; nothing registered: None."""
        registry = SynthesizerRegistry()
        self.assertIsNone(registry.default_provider("en"))
        registry.register("piper", lambda settings: None, aliases=("supertonic",))
        self.assertEqual(registry.default_provider(None), "piper")
        self.assertEqual(registry.default_provider("zh-CN"), "piper")
        registry.register("aliyun", lambda settings: None)
        self.assertEqual(registry.default_provider("zh"), "aliyun")
        self.assertEqual(registry.default_provider("en-US"), "piper")



class InstanceCacheBoundTests(SynchronousTestCase):
    def test_settings_from_clients_cannot_grow_the_cache(self) -> None:
        """Distinct client settings (endpoint, key) build instances, but at most MAX_INSTANCES are kept,
        the least recently used going first."""
        from activecall.speech.registry import MAX_INSTANCES, RecognizerRegistry, RecognizerSettings

        built: list[Any] = []
        registry = RecognizerRegistry()
        registry.register("x", lambda settings: built.append(settings) or object())
        first = registry.create("x", RecognizerSettings(api_key="k0"))
        for i in range(1, 1000):
            registry.create("x", RecognizerSettings(api_key=f"k{i}"))
            if i % 10 == 0:
                self.assertIs(registry.create("x", RecognizerSettings(api_key="k0")), first)  # kept while used
        self.assertLessEqual(len(registry._instances), MAX_INSTANCES)
        self.assertEqual(len(built), 1000)
