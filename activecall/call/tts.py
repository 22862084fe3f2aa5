"""Turning a ``tts`` command's SynthesisOption into provider calls, with the media cache."""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.call.events import CallEvent, ErrorOccurred, MetricsMeasured
from activecall.call.playback import Sentence, TtsPlay, strip_emoji
from activecall.call.services import CallServices
from activecall.media.mixer import apply_gain
from activecall.options import SynthesisOption
from activecall.media.resample import Resampler
from activecall.media.cache import validate_key
from activecall.speech.interfaces import ISpeechSynthesizer, SynthesisRequest, WordTiming
from activecall.speech.registry import SynthesisSettings


def create_synthesizer(services: CallServices, provider: str, option: SynthesisOption) -> ISpeechSynthesizer:
    """The provider instance for ``option`` (may raise ProviderUnavailableError)."""
    return services.synthesizers.create(provider, SynthesisSettings(
        model=option.model, endpoint=option.endpoint, api_key=option.secret_key, models_dir=services.models_dir))


def synthesis_request(text: str, option: SynthesisOption, speaker: Optional[str], session_id: Optional[str]) -> SynthesisRequest:
    """The provider request for one sentence; ``option`` has its defaults applied."""
    return SynthesisRequest(
        text=text,
        sample_rate_hz=option.samplerate,
        speaker=speaker,
        speed=option.speed,
        volume=option.volume,
        model=option.model,
        language=option.language,
        endpoint=option.endpoint,
        api_key=option.secret_key,
        extra=dict(option.extra or {}),
        session_id=option.session_id or session_id,
        subtitle=bool(option.subtitle),
        app_id=option.app_id,
        secret_id=option.secret_id,
    )


def cache_key(services: CallServices, provider: str, text: str, option: SynthesisOption,
              speaker: Optional[str], explicit: Optional[str]) -> str:
    """The media-cache key of a sentence: the client's ``cacheKey`` (validated) or config.md §13's."""
    if explicit:
        return validate_key(explicit)
    return services.cache.tts_key(provider, text, option.samplerate, speaker, option.speed)


class PrecacheError(Exception):
    """``POST /precache`` could not synthesize; the message is returned to the client."""


async def precache(services: CallServices, command: Any) -> dict[str, Any]:
    """Synthesize a ``tts`` command without a call and store it where a live ``tts`` would look."""
    if command.option is None or not command.option.provider:
        raise PrecacheError("precache needs option.provider")
    option = command.option.with_defaults()
    try:
        provider = services.synthesizers.resolve(option.provider)
        text = strip_emoji(command.text).strip()
        speaker = command.speaker or option.speaker
        key = cache_key(services, provider, text, option, speaker, command.cache_key)
    except ValueError as e:
        raise PrecacheError(str(e))
    if not text:
        raise PrecacheError("precache needs a non-empty text")
    if await services.run_blocking(services.cache.exists, key):
        return {"status": "exists", "cacheKey": key, "bytes": 0}
    try:
        synthesizer = create_synthesizer(services, provider, option)
    except Exception as e:
        raise PrecacheError(f"TTS provider {provider} unavailable: {e}")
    pcm = bytearray()
    resampler: list[Resampler] = []

    def on_audio(chunk: bytes, rate: int) -> None:
        if not resampler:
            resampler.append(Resampler(rate, option.samplerate))
        pcm.extend(resampler[0].process(chunk))

    d: Deferred[None] = synthesizer.synthesize(synthesis_request(text, option, speaker, None), on_audio)
    try:
        await d
    except Exception as e:
        raise PrecacheError(f"TTS {provider} failed: {e}")
    if resampler:
        pcm.extend(resampler[0].flush())
    await services.run_blocking(services.cache.put, key, bytes(pcm))
    return {"status": "cached", "cacheKey": key, "bytes": len(pcm)}


class SpeechHost(Protocol):
    """What the synthesis of a call's TTS plays needs from its controller."""

    sid: str
    sst: str
    ended: bool
    media_rate_hz: int

    def report(self, event: CallEvent) -> None:
        """Emit a domain event."""

    def now(self) -> float:
        """Seconds on the call's clock."""


class TtsJob:
    """What a ``tts`` command asked for, shared by the sentences it produced."""

    __slots__ = ("provider", "option", "speaker", "cache_key", "cmd_seq")

    def __init__(self, provider: str, option: SynthesisOption, speaker: Optional[str], cache_key: Optional[str], cmd_seq: int) -> None:
        self.provider = provider
        self.option = option
        self.speaker = speaker
        self.cache_key = cache_key
        self.cmd_seq = cmd_seq


class Speech:
    """Synthesizes the sentences of a call's TTS plays, in order, up to each play's maxConcurrentTasks."""

    def __init__(self, host: SpeechHost, services: CallServices) -> None:
        self._host = host
        self._services = services

    def to_media(self, pcm: bytes, rate: int, volume: int) -> bytes:
        """PCM at ``rate`` brought to the leg's media rate and the option's volume (5 = unchanged)."""
        media_rate = self._host.media_rate_hz
        if rate != media_rate:
            pcm = Resampler(rate, media_rate).process(pcm)
        return apply_gain(pcm, volume / 5.0) if volume != 5 else pcm

    def queue_pcm(self, play: TtsPlay, pcm: bytes, option: SynthesisOption) -> None:
        """Ready-made PCM (a base64 ``tts``) as one sentence of ``play``."""
        if len(pcm) % 2:
            pcm = pcm[:-1]
        sentence = play.add_sentence("")
        sentence.append(self.to_media(pcm, option.samplerate, option.volume))
        sentence.done = True

    def queue_sentence(self, play: TtsPlay, text: str, job: TtsJob, cacheable: bool) -> None:
        """Add a sentence to ``play`` and start its synthesis when a slot is free."""
        sentence = play.add_sentence(text)
        play.synth_waiting.append(_SentenceSynthesis(self, play, sentence, job, cacheable))
        self.pump(play)

    def pump(self, play: TtsPlay) -> None:
        """Start queued syntheses, in order, up to the play's maxConcurrentTasks (default 1)."""
        while play.synth_waiting:
            limit = play.synth_waiting[0].concurrency
            if play.synth_running >= limit:
                return
            synthesis = play.synth_waiting.pop(0)
            if synthesis.sentence.done:
                continue  # cancelled while waiting
            play.synth_running += 1
            synthesis.start()

    def error(self, message: str, code: Optional[int] = None, sender: str = "tts", track: Optional[str] = None) -> None:
        host = self._host
        host.report(ErrorOccurred(host.now(), track or host.sst, sender, message, code))


class _SentenceSynthesis:
    """Synthesizes one sentence (or reads it from the media cache) into its play."""

    _log = Logger()

    def __init__(self, speech: Speech, play: TtsPlay, sentence: Sentence, job: TtsJob, cacheable: bool) -> None:
        self._speech = speech
        self._host = speech._host
        self._services = speech._services
        self._play = play
        self._sentence = sentence
        self._job = job
        self._cacheable = cacheable
        self._started = self._host.now()
        self._first_audio: Optional[float] = None
        self._to_cache: Optional[Resampler] = None
        self._to_media: Optional[Resampler] = None
        self._cache_pcm = bytearray()
        self._key: Optional[str] = None
        self._finished = False
        self.sentence = sentence
        self.concurrency = max(1, job.option.max_concurrent_tasks or 1)

    def _release(self) -> None:
        """This synthesis no longer occupies a slot of its play; start the next one."""
        if not self._finished:
            self._finished = True
            self._play.synth_running -= 1
            if not self._host.ended:
                self._speech.pump(self._play)

    def start(self) -> None:
        services = self._services
        option = self._job.option
        if self._cacheable:
            try:
                self._key = cache_key(services, self._job.provider, self._sentence.text, option, self._job.speaker, self._job.cache_key)
            except ValueError as e:
                self._speech.error(f"invalid tts.cacheKey: {e}", sender="command", track=self._host.sid)
                self._sentence.done = True
                self._release()
                return
            d = services.run_blocking(services.cache.get, self._key)
            self._sentence.synth = d
            d.addCallbacks(self._cache_result, self._failed)
        else:
            self._synthesize()

    def _cache_result(self, pcm: Optional[bytes]) -> None:
        if self._sentence.done:
            return
        if pcm is None:
            self._synthesize()
            return
        self._sentence.cached = True
        self._sentence.synth = None
        self._sentence.append(self._speech.to_media(pcm, self._job.option.samplerate, self._job.option.volume))
        self._sentence.done = True
        self._release()
        self._metrics(len(pcm), cached=True)

    def _synthesize(self) -> None:
        option = self._job.option
        try:
            synthesizer = create_synthesizer(self._services, self._job.provider, option)
        except Exception as e:  # provider construction failed: unavailable engine, bad model path
            self._log.info("TTS provider {p} unavailable: {e}", p=self._job.provider, e=e)
            self._speech.error(f"TTS provider {self._job.provider} unavailable: {e}", code=500)
            self._sentence.done = True
            self._release()
            return
        request = synthesis_request(self._sentence.text, option, self._job.speaker, self._host.sid)
        d = synthesizer.synthesize(request, self._on_audio, self._on_words if request.subtitle else None)
        self._sentence.synth = d
        d.addCallbacks(self._done, self._failed)

    def _on_words(self, words: Sequence[WordTiming]) -> None:
        if self._sentence.done:
            return
        starts = self._sentence.word_starts_ms
        for word in words[:10_000 - len(starts)]:
            begin = max(0, int(word.begin_ms))
            if not starts or begin >= starts[-1]:
                starts.append(begin)

    def _on_audio(self, pcm: bytes, rate: int) -> None:
        if self._sentence.done:
            return
        if self._first_audio is None:
            self._first_audio = self._host.now()
        option = self._job.option
        if self._cacheable:
            if self._to_cache is None:
                self._to_cache = Resampler(rate, option.samplerate)
            self._cache_pcm += self._to_cache.process(pcm)
        if self._to_media is None:
            self._to_media = Resampler(rate, self._host.media_rate_hz)
        media = self._to_media.process(pcm)
        self._sentence.append(apply_gain(media, option.volume / 5.0) if option.volume != 5 else media)

    def _done(self, _: object) -> None:
        self._sentence.synth = None
        self._release()
        if self._sentence.done:
            return
        if self._to_media is not None:
            self._sentence.append(self._to_media.flush())
        self._sentence.done = True
        if self._cacheable and self._key is not None and self._cache_pcm:
            if self._to_cache is not None:
                self._cache_pcm += self._to_cache.flush()
            services = self._services
            services.run_blocking(services.cache.put, self._key, bytes(self._cache_pcm)).addErrback(
                lambda f: self._log.failure("writing the media cache failed", f))
        self._metrics(len(self._cache_pcm), cached=False)

    def _failed(self, f: Failure) -> None:
        self._sentence.synth = None
        self._release()
        if f.check(CancelledError) or self._sentence.done:
            return
        self._sentence.done = True
        self._services.observe_provider("tts", self._job.provider, None, True)
        self._log.info("TTS {p} failed: {e}", p=self._job.provider, e=f.getErrorMessage())
        if not self._host.ended:
            self._speech.error(f"TTS {self._job.provider} failed: {f.getErrorMessage()}", code=500)

    def _metrics(self, length: int, cached: bool) -> None:
        now = self._host.now()
        ttfb = int(((self._first_audio or now) - self._started) * 1000)
        if not cached:
            self._services.observe_provider("tts", self._job.provider, (self._first_audio or now) - self._started, False)
        data: dict[str, Any] = {
            "playId": self._play.play_id,
            "cmdSeq": self._job.cmd_seq,
            "length": length,
            "cached": cached,
            "ttfb": ttfb,
            "duration": int((now - self._started) * 1000),
        }
        if self._job.speaker:
            data["speaker"] = self._job.speaker
        self._host.report(MetricsMeasured(now, f"completed.tts.{self._job.provider}", data["duration"], data))
