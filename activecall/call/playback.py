"""What plays on the server-side track (SST): TTS plays and file plays.

Pure: sources hold PCM (s16le mono at the call's media rate) and hand out
fixed 20 ms frames when the media clock pulls. Synthesis and decoding happen
elsewhere and append audio here as it arrives.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, Optional

from activecall.speech.text import TextSplitter


class Sentence:
    """One TTS sentence: its text and the audio synthesized for it so far."""

    __slots__ = ("text", "buf", "pos", "done", "synth", "synthesized_bytes", "cached", "started", "seq", "skipped",
                 "word_starts_ms", "played_bytes")

    def __init__(self, text: str, seq: int) -> None:
        self.text = text
        self.seq = seq
        self.buf = bytearray()
        self.pos = 0
        self.done = False  # synthesis finished (or failed); no more audio will arrive
        self.synth: Any = None  # the Deferred of the running synthesis, for cancellation
        self.synthesized_bytes = 0
        self.cached = False
        self.started = False
        self.skipped = False
        self.word_starts_ms: list[int] = []  # when each word begins (provider word timings), in order
        self.played_bytes = 0  # heard so far (pos restarts when played audio is released)

    def word_at(self, ms: int) -> Optional[int]:
        """Index of the word being heard ``ms`` into the sentence, when the provider gave timings."""
        if not self.word_starts_ms:
            return None
        return max(0, bisect_right(self.word_starts_ms, ms) - 1)

    def append(self, pcm: bytes) -> None:
        """Add synthesized audio."""
        self.buf += pcm
        self.synthesized_bytes += len(pcm)

    def cancel(self) -> None:
        """Stop synthesis of this sentence; it will play no further."""
        self.done = True
        synth, self.synth = self.synth, None
        if synth is not None:
            synth.cancel()


class SstSource:
    """Common shape of everything that plays on SST."""

    kind = "none"

    def __init__(self, play_id: Optional[str], ssrc: int, frame_bytes: int, started_at: float) -> None:
        self.play_id = play_id
        self.ssrc = ssrc
        self.frame_bytes = frame_bytes
        self.started_at = started_at
        self.paused = False
        self.auto_hangup = False
        self.wait_input_timeout_ms: Optional[int] = None
        self.played_bytes = 0

    def read_frame(self) -> Optional[bytes]:
        """Return the next 20 ms frame, or None when nothing is ready now."""
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        """True once everything this source will ever play has been played."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop producing audio (the source is being cut)."""


class TtsPlay(SstSource):
    """A TTS play: all ``tts`` commands sharing one ``playId``, spoken in order."""

    kind = "tts"

    def __init__(
        self,
        play_id: Optional[str],
        ssrc: int,
        frame_bytes: int,
        started_at: float,
        streaming: bool,
        bytes_per_ms: float,
    ) -> None:
        super().__init__(play_id, ssrc, frame_bytes, started_at)
        self.streaming = streaming
        self.bytes_per_ms = bytes_per_ms
        self.sentences: list[Sentence] = []
        self.index = 0  # sentence being played
        self.end_of_stream = False
        self.stop_after_current = False  # graceful interrupt
        # streaming: text chunks become pieces to synthesize (sentences; the first may be a clause)
        self.splitter: Optional[TextSplitter] = TextSplitter() if streaming else None
        self.synth_waiting: list[Any] = []  # syntheses not started yet (maxConcurrentTasks)
        self.synth_running = 0
        self._seq = 0

    def add_sentence(self, text: str) -> Sentence:
        """Queue a sentence for speaking after the ones already queued."""
        self._seq += 1
        sentence = Sentence(text, self._seq)
        self.sentences.append(sentence)
        return sentence

    @property
    def current(self) -> Optional[Sentence]:
        """The sentence being spoken (or next to be), if any."""
        if self.index < len(self.sentences):
            return self.sentences[self.index]
        return None

    def read_frame(self) -> Optional[bytes]:
        """Return 20 ms of the current sentence; pads a sentence's last partial frame."""
        if self.paused:
            return None
        n = self.frame_bytes
        while self.index < len(self.sentences):
            s = self.sentences[self.index]
            available = len(s.buf) - s.pos
            if available >= n:
                s.started = True
                frame = bytes(s.buf[s.pos:s.pos + n])
                s.pos += n
                self.played_bytes += n
                return frame
            if not s.done:
                return None  # synthesis is behind real time: underrun, send nothing
            if available > 0:
                s.started = True
                frame = bytes(s.buf[s.pos:]) + bytes(n - available)
                s.pos = len(s.buf)
                self.played_bytes += n
                self._advance()
                return frame
            self._advance()
        return None

    def _advance(self) -> None:
        # Release the played audio; long plays must not keep every sentence in memory.
        s = self.sentences[self.index]
        s.buf = bytearray()
        s.pos = 0
        self.index += 1
        if self.stop_after_current:
            for rest in self.sentences[self.index:]:
                rest.cancel()
            del self.sentences[self.index:]

    @property
    def finished(self) -> bool:
        if self.stop_after_current:
            return self.index >= len(self.sentences)
        return self.end_of_stream and self.index >= len(self.sentences)

    def interruption_info(self) -> tuple[Optional[str], int, int, Optional[int]]:
        """Return (subtitle, totalDuration ms synthesized, current ms played, word position) of the
        current sentence; the position is None without provider word timings."""
        s = self.current
        if s is None:
            return None, 0, 0, None
        total_ms = int(s.synthesized_bytes / self.bytes_per_ms)
        current_ms = int(s.pos / self.bytes_per_ms)
        return s.text, total_ms, current_ms, s.word_at(current_ms)

    def cut_after_current(self) -> None:
        """Graceful interrupt: finish the sentence being spoken, drop the rest."""
        self.stop_after_current = True
        self.end_of_stream = True
        self.splitter = None
        current = self.current
        keep = self.index + (1 if current is not None and current.started else 0)
        for rest in self.sentences[keep:]:
            rest.cancel()
        del self.sentences[keep:]

    def cancel(self) -> None:
        self.synth_waiting.clear()
        for s in self.sentences[self.index:]:
            s.cancel()
        self.sentences = self.sentences[: self.index]
        self.splitter = None
        self.end_of_stream = True


class FilePlay(SstSource):
    """An audio file (or a ringtone / hold music) decoded to PCM, played once or looped."""

    kind = "file"

    def __init__(
        self,
        play_id: Optional[str],
        ssrc: int,
        frame_bytes: int,
        started_at: float,
        url: str,
        loop: bool = False,
    ) -> None:
        super().__init__(play_id, ssrc, frame_bytes, started_at)
        self.url = url
        self.loop = loop
        self.pcm: Optional[bytes] = None
        self.pos = 0
        self.failed = False
        self.loader: Any = None

    def loaded(self, pcm: bytes, offset_bytes: int = 0) -> None:
        """Audio is decoded and ready; playback starts at ``offset_bytes``."""
        self.pcm = pcm
        self.pos = min(max(0, offset_bytes - offset_bytes % 2), len(pcm))

    def read_frame(self) -> Optional[bytes]:
        if self.paused or self.pcm is None:
            return None
        n = self.frame_bytes
        pcm = self.pcm
        if self.pos >= len(pcm):
            if not self.loop or not pcm:
                return None
            self.pos = 0
        end = self.pos + n
        frame = pcm[self.pos:end]
        self.pos = end
        if len(frame) < n:
            frame += bytes(n - len(frame))
        self.played_bytes += n
        return frame

    @property
    def finished(self) -> bool:
        if self.failed:
            return True
        return self.pcm is not None and not self.loop and self.pos >= len(self.pcm)

    def cancel(self) -> None:
        loader, self.loader = self.loader, None
        if loader is not None:
            loader.cancel()
        self.loop = False
        if self.pcm is not None:
            self.pos = len(self.pcm)


_EMOJI_RANGES = (
    (0x1F000, 0x1FAFF),
    (0x2600, 0x27BF),
    (0x1F1E6, 0x1F1FF),
    (0xFE00, 0xFE0F),
    (0x200D, 0x200D),
    (0xE0020, 0xE007F),
)


def strip_emoji(text: str) -> str:
    """Remove emoji characters, which TTS engines read out or choke on."""
    if text.isascii():
        return text
    return "".join(ch for ch in text if not any(lo <= ord(ch) <= hi for lo, hi in _EMOJI_RANGES))



class BridgeSource(SstSource):
    """Audio of another leg (a transfer target) played on SST, frame by frame as it arrives."""

    kind = "bridge"

    def __init__(self, ssrc: int, frame_bytes: int, started_at: float) -> None:
        super().__init__(None, ssrc, frame_bytes, started_at)
        self._frames: list[bytes] = []
        self.ended = False

    def write_frame(self, frame: bytes) -> None:
        """One frame from the other leg (this source is that leg's sink); a short backlog is kept, older audio dropped."""
        if len(self._frames) >= 5:
            del self._frames[0]
        self._frames.append(frame)

    def read_frame(self) -> Optional[bytes]:
        if self.paused or not self._frames:
            return None
        return self._frames.pop(0)

    @property
    def finished(self) -> bool:
        return self.ended

    def cancel(self) -> None:
        self.ended = True
        self._frames.clear()
