"""The server-side track: what the agent plays on a call (TTS, files, a transfer bridge).

It is the :class:`~activecall.media.tracks.AudioSource` the call's leg pulls once
per tick; ambiance, the remote parties of bridged calls (``bridge``) and a ``mediaPass``
server's answer are mixed in.  One source plays at a time; starting another cuts it (``interruption``
for TTS, then ``trackEnd``).  A source that finished ends on the next pull,
after its last frame left; a normal end arms autoHangup or waitInputTimeout.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.call.ambiance import Ambiance
from activecall.call.events import InputTimedOut, PlayInterrupted, TrackEnded, TrackStarted
from activecall.call.fileplay import load_audio
from activecall.call.playback import FilePlay, SstSource, TtsPlay, strip_emoji
from activecall.call.tts import Speech, TtsJob
from activecall.media._audioop import audioop
from activecall.media.mixer import fade
from activecall.media.tracks import AudioSource
from activecall.options import SynthesisOption
from activecall.speech.interfaces import UnknownProviderError

if TYPE_CHECKING:
    from activecall.call.controller import CallController

#: The longest fade-out an interrupt may ask for (``fadeOutMs``, ``interruption.volumeFadeMs``).
MAX_FADE_MS = 2000


@dataclasses.dataclass
class _FadeOut:
    """A play being faded out: ``left`` of ``total`` 20 ms frames still to go."""

    source: Any
    total: int
    left: int


class ServerSideTrack:
    """The agent's audio on one call, and the plays that produce it."""

    _log = Logger()

    def __init__(self, call: "CallController") -> None:
        self._call = call
        self._services = call.services
        self.source: Optional[SstSource] = None
        self.muted = False
        # subscribe: agent frames mirrored to the client, tagged 0x00.
        self.mirror: Any = None
        # The call's recording, told each pull's frame.
        self.recording: Any = None
        self._speech = Speech(call, call.services)
        # Background sound mixed under whatever plays (activecall.call.ambiance); None: none.
        self.ambiance: Optional[Ambiance] = None
        # Audio mixed into the agent's: bridged calls' remote parties (activecall.call.bridge, by their
        # session id) and a mediaPass server's answer (activecall.call.mediapass).
        self.mixes: dict[object, AudioSource] = {}
        self._fade: Optional[_FadeOut] = None
        self._wait_input: Any = None

    # -- the leg's AudioSource ------------------------------------------------

    def read_frame(self) -> Optional[bytes]:
        """The agent's next 20 ms frame, or None when nothing plays."""
        source = self.source
        fading = self._fade
        if fading is not None and fading.source is not source:
            fading = self._fade = None  # something else plays now
        if source is not None and (source.finished or (fading is not None and fading.left == 0)):
            # Its last frame left on the previous pull: the track ends after its audio.
            self._fade = None
            self.end_play(source, interrupted=fading is not None
                          or (isinstance(source, TtsPlay) and source.stop_after_current))
            source, fading = self.source, None
        frame = None
        if source is not None:
            frame = source.read_frame()
            if frame is not None and fading is not None:
                frame = fade(frame, fading.left / fading.total, (fading.left - 1) / fading.total)
            if fading is not None:
                fading.left -= 1
            if frame is not None and self.muted:
                frame = bytes(len(frame))
        if self.ambiance is not None and not self.muted:
            # Under the agent's frame, or alone: the remote party, subscribers and the recording hear the mix.
            frame = self.ambiance.mix(frame)
        if self.mixes:
            frame = self._mix_in(frame)
        if frame is not None and self.mirror is not None:
            self.mirror(b"\x00" + frame)
        if self.recording is not None and not self._call.ended:
            self.recording.agent_frame(frame)
        return frame

    def _mix_in(self, frame: Optional[bytes]) -> Optional[bytes]:
        """``frame`` (or silence) with each of :attr:`mixes` added, saturating."""
        for feed in list(self.mixes.values()):
            other = feed.read_frame()
            if other is None:
                continue
            if frame is None:
                frame = bytes(self._call.leg.frame_bytes if self._call.leg is not None else len(other))
            if len(other) != len(frame):  # rates whose 20 ms is not a whole number of samples
                other = other[: len(frame)].ljust(len(frame), b"\0")
            frame = audioop.add(frame, other, 2)
        return frame

    # -- sources --------------------------------------------------------------

    def set_source(self, source: SstSource) -> None:
        """Play ``source`` (what played must have been cut)."""
        self.source = source

    def drop(self, source: SstSource) -> None:
        """Stop ``source`` without a trackEnd (a transfer bridge whose leg ended)."""
        if self.source is source:
            self.source = None
            source.cancel()

    def end_play(self, source: SstSource, interrupted: bool) -> None:
        """Emit the play's trackEnd; a normal end arms autoHangup or waitInputTimeout."""
        c = self._call
        if self.source is source:
            self.source = None
        source.cancel()
        c.report(TrackEnded(c.now(), c.sst, c.now() - source.started_at, source.ssrc, source.play_id))
        if interrupted or c.ended:
            return
        if source.auto_hangup:
            c.hangup("bySystem", "system")
        elif source.wait_input_timeout_ms:
            self._arm_wait_input(source.wait_input_timeout_ms)

    def cut(self) -> None:
        """Stop whatever plays now: ``interruption`` for TTS, then ``trackEnd``."""
        source = self.source
        if source is None:
            return
        if isinstance(source, TtsPlay):
            self._report_interruption(source)
        self.end_play(source, interrupted=True)

    def interrupt(self, graceful: bool, fade_out_ms: int = 0) -> None:
        """Stop the agent's audio; ``graceful`` lets the sentence being spoken finish, ``fade_out_ms``
        (at most 2 s) fades what plays out over that time instead of cutting it."""
        source = self.source
        if source is None:
            return
        if isinstance(source, TtsPlay) and graceful and not source.streaming:
            self._report_interruption(source)
            source.cut_after_current()
            return
        if fade_out_ms > 0:
            self.fade_out(fade_out_ms)
            return
        self.cut()

    def fade_out(self, fade_ms: int) -> None:
        """``interruption`` now (speech), then what plays fades to silence over ``fade_ms`` and ends."""
        source = self.source
        if source is None or (self._fade is not None and self._fade.source is source):
            return
        if isinstance(source, TtsPlay):
            self._report_interruption(source)
        frames = max(1, -(-min(fade_ms, MAX_FADE_MS) // 20))
        self._fade = _FadeOut(source, frames, frames)

    def agent_speaking_since(self) -> Optional[float]:
        """When the TTS play now speaking started; None when no TTS plays, or it ends the call (barge-in
        never cuts a goodbye before hang-up)."""
        source = self.source
        if not isinstance(source, TtsPlay) or source.finished or source.auto_hangup or source.stop_after_current:
            return None
        return source.started_at

    def barge_in(self, fade_ms: int = 0) -> None:
        """The caller spoke over the agent: cut its speech now (``interruption``, ``trackEnd``), or fade it
        out over ``fade_ms``. Its queued sentences and syntheses are dropped with the play."""
        if isinstance(self.source, TtsPlay):
            if fade_ms > 0:
                self.fade_out(fade_ms)
            else:
                self.cut()

    def pause(self, paused: bool) -> None:
        """Pause or resume what plays."""
        c = self._call
        if self.source is None:
            c.error(f"track not found: {c.sst}")
            return
        self.source.paused = paused

    def _report_interruption(self, play: TtsPlay) -> None:
        c = self._call
        subtitle, total_ms, current_ms, position = play.interruption_info()
        c.report(PlayInterrupted(c.now(), c.sst, play.play_id, subtitle, total_ms, current_ms, position))

    # -- waitInputTimeout ---------------------------------------------------------

    def _arm_wait_input(self, timeout_ms: int) -> None:
        c = self._call
        started = c.now()

        def expired() -> None:
            self._wait_input = None
            c.report(InputTimedOut(c.now(), c.sst, started, timeout_ms))

        c.timers.cancel(self._wait_input)
        self._wait_input = c.timers.call_later(timeout_ms / 1000.0, expired)

    def input_arrived(self) -> None:
        """The caller reacted: a pending waitInputTimeout no longer applies."""
        if self._wait_input is not None:
            self._call.timers.cancel(self._wait_input)
            self._wait_input = None

    # -- play ----------------------------------------------------------------

    def play_file(self, url: str, play_id: Optional[str], loop: bool = False, auto_hangup: bool = False,
                  wait_input_timeout_ms: Optional[int] = None, offset_ms: Optional[int] = None) -> FilePlay:
        """Start a file play (trackStart at once; the audio when loaded)."""
        c = self._call
        leg = c.require_leg()
        self.cut()
        play_id = play_id if play_id is not None else url
        source = FilePlay(play_id, self._services.ids.ssrc(), leg.frame_bytes, c.now(), url, loop=loop)
        source.auto_hangup = auto_hangup
        source.wait_input_timeout_ms = wait_input_timeout_ms
        rate = int(leg.media_rate_hz)
        offset_bytes = int(offset_ms or 0) * rate // 1000 * 2
        c.report(TrackStarted(c.now(), c.sst, play_id))
        self.set_source(source)
        d = load_audio(self._services, url, rate)
        source.loader = d

        def loaded(pcm: bytes) -> None:
            source.loader = None
            source.loaded(pcm, offset_bytes)

        def failed(f: Failure) -> None:
            source.loader = None
            if f.check(CancelledError):
                return
            message = f.getErrorMessage() or f.type.__name__
            self._log.info("play of {url} failed: {message}", url=url, message=message)
            if self.source is source:
                c.error(message, sender=f"filetrack: {url}", track=c.sst)
                source.failed = True
                self.end_play(source, interrupted=True)

        d.addCallbacks(loaded, failed)
        return source

    # -- tts -------------------------------------------------------------------

    def say(self, text: str, *, play_id: Optional[str], option: Optional[SynthesisOption], speaker: Optional[str],
            streaming: bool, end_of_stream: bool, base64_pcm: Optional[bytes], cache_key: Optional[str],
            auto_hangup: bool, wait_input_timeout_ms: Optional[int]) -> None:
        """Speak ``text`` (a chunk of streamed text, or ready-made PCM).

        Chunks with the play id of the TTS play in progress join it; anything else cuts
        what played and starts a new play.
        """
        c = self._call
        leg = c.require_leg()
        base = c.option.tts if c.option is not None else None
        if option is not None:
            option = option.merged_over(base) if base is not None else option
        else:
            option = base
        synthesizers = self._services.synthesizers
        if option is None or not option.provider:
            # providers.md: a tts without a provider anywhere speaks with the default engine.
            default = synthesizers.default_provider(option.language if option is not None else None)
            if default is None:
                c.error("TTS provider not available: no provider given and no default engine installed "
                        "(install the offline extra or set tts.provider)", sender="tts", track=c.sst)
                return
            option = dataclasses.replace(option or SynthesisOption(), provider=default)
        try:
            provider = synthesizers.resolve(option.provider)
        except UnknownProviderError as e:
            c.error(str(e))
            return
        option = option.with_defaults()
        current = self.source
        if isinstance(current, TtsPlay) and current.play_id == play_id and not current.finished and not current.stop_after_current:
            play = current
        else:
            self.cut()
            rate = int(leg.media_rate_hz)
            play = TtsPlay(play_id, self._services.ids.ssrc(), leg.frame_bytes, c.now(), streaming, rate * 2 / 1000)
            c.report(TrackStarted(c.now(), c.sst, play_id))
            self.set_source(play)
        play.auto_hangup = play.auto_hangup or auto_hangup
        if wait_input_timeout_ms is not None:
            play.wait_input_timeout_ms = wait_input_timeout_ms
        job = TtsJob(provider, option, speaker or option.speaker, cache_key, c.command_seq)
        if base64_pcm is not None and not play.streaming:
            self._speech.queue_pcm(play, base64_pcm, option)
        elif play.streaming:
            splitter = play.splitter
            pieces = splitter.feed(strip_emoji(text)) if splitter is not None else []
            if end_of_stream and splitter is not None:
                pieces += splitter.flush()
            for sentence in pieces:
                self._speech.queue_sentence(play, sentence, job, cacheable=False)
        else:
            stripped = strip_emoji(text).strip()
            if stripped:
                self._speech.queue_sentence(play, stripped, job, cacheable=True)
        if end_of_stream:
            play.end_of_stream = True
