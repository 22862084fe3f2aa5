"""A recognition stream over a segment recognizer, cut into utterances by VAD hints.

The call writes every 16 kHz frame; while no one speaks only the last
``history_ms`` are kept, so that when VAD reports speech (late by its
``speechPadding`` and its own latency) the utterance starts ``preroll_ms``
before the voice began.  While the caller speaks the growing segment is
re-decoded every ``partial_interval_ms`` of audio (``asrDelta``), one decode at
a time and only if the recognizer has room (a busy one refuses partials at
once); at the end of speech the whole segment is decoded (``asrFinal``).
Finals are reported in utterance order; an utterance that decodes to nothing
uses no index.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from activecall.speech.interfaces import (
    IRecognitionListener, IRecognitionStream, ISegmentRecognizer, RecognitionError, RecognitionRequest,
    RecognizerBusyError, SegmentTranscript, Transcript,
)

__all__ = ["SegmentStream", "BYTES_PER_MS"]

BYTES_PER_MS = 32  # 16 kHz s16le mono
_MIN_PARTIAL_MS = 300
_TAIL_MS = 150  # audio kept after the VAD's end of speech: the last phoneme's release


class _Utterance:
    __slots__ = ("start_ms", "end_ms", "decode", "result", "error")

    def __init__(self, start_ms: int, end_ms: int) -> None:
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.decode: Optional[Deferred[SegmentTranscript]] = None
        self.result: Optional[SegmentTranscript] = None
        self.error: Optional[RecognitionError] = None


@implementer(IRecognitionStream)
class SegmentStream:
    """:class:`IRecognitionStream` for an :class:`ISegmentRecognizer` (whisper, openai)."""

    _log = Logger()

    def __init__(self, recognizer: ISegmentRecognizer, request: RecognitionRequest, listener: IRecognitionListener,
                 *, partial_interval_ms: int = 700, preroll_ms: int = 200, history_ms: int = 1500,
                 max_segment_ms: int = 30_000, partials: bool = True) -> None:
        self._recognizer = recognizer
        self._request = request
        self._listener = listener
        self._partial_interval_ms = partial_interval_ms
        self._preroll_ms = preroll_ms
        self._history_bytes = history_ms * BYTES_PER_MS
        self._max_segment_bytes = max_segment_ms * BYTES_PER_MS
        self._partials = partials
        self._written_bytes = 0
        self._audio = bytearray()  # history while idle; the segment (from _audio_start) while speaking
        self._audio_start = 0  # stream byte offset of _audio[0]
        self._speaking = False
        self._segment_start = 0
        self._partial: Optional[Deferred[SegmentTranscript]] = None
        self._partial_at = 0  # stream bytes when the last partial decode was asked for
        self._last_partial_text = ""
        self._finals: deque[_Utterance] = deque()
        self._next_index = 0
        self._closed = False
        self.partials_dropped = 0
        self.partials_promoted = 0
        self._partial_end_ms = 0

    # -- IRecognitionStream ---------------------------------------------------

    def write(self, pcm: bytes) -> None:
        if self._closed:
            return
        self._audio += pcm
        self._written_bytes += len(pcm)
        if not self._speaking:
            excess = len(self._audio) - self._history_bytes
            if excess > 0:
                del self._audio[:excess]
                self._audio_start += excess
            return
        if self._written_bytes - self._segment_start >= self._max_segment_bytes:
            # An endless utterance: decode what we have and go on with a new one.
            now_ms = self._written_bytes // BYTES_PER_MS
            self.speech_ended(now_ms)
            self.speech_started(now_ms)
            return
        self._maybe_partial()

    def speech_started(self, at_ms: int) -> None:
        if self._closed or self._speaking:
            return
        start = max(self._audio_start, (at_ms - self._preroll_ms) * BYTES_PER_MS)
        start = min(start - start % 2, self._written_bytes)
        del self._audio[:start - self._audio_start]
        self._audio_start = self._segment_start = start
        self._speaking = True
        self._partial_at = self._written_bytes
        self._last_partial_text = ""

    def speech_ended(self, at_ms: int) -> None:
        if self._closed or not self._speaking:
            return
        self._speaking = False
        utterance = _Utterance(self._segment_start // BYTES_PER_MS, at_ms)
        self._finals.append(utterance)
        partial, self._partial = self._partial, None
        if partial is not None and self._partial_end_ms >= at_ms:
            # The interim decode in flight already holds the whole utterance (VAD tells the end of
            # speech only after silencePadding): its result is the final, sooner than a new decode.
            utterance.decode = partial
            partial.addCallbacks(self._final_done, self._final_failed, callbackArgs=(utterance,),
                                 errbackArgs=(utterance,))
            self.partials_promoted += 1
            return
        if partial is not None:
            partial.addErrback(lambda f: None)  # its own errback passes failures on once superseded
            partial.cancel()
        end = min(self._written_bytes, max(self._segment_start, (at_ms + _TAIL_MS) * BYTES_PER_MS))
        pcm = bytes(self._audio[: end - self._segment_start])
        d = self._recognizer.transcribe(pcm, self._request, False)
        utterance.decode = d
        d.addCallbacks(self._final_done, self._final_failed, callbackArgs=(utterance,), errbackArgs=(utterance,))

    def close(self) -> Deferred[None]:
        if not self._closed:
            self._closed = True
            self._cancel_partial()
            finals, self._finals = self._finals, deque()
            for utterance in finals:
                if utterance.decode is not None:
                    utterance.decode.cancel()
            self._audio = bytearray()
        return succeed(None)

    # -- partials -------------------------------------------------------------

    def speech_paused(self, at_ms: int) -> None:
        """The voice stopped: decode what was said now; if it really was the end (VAD says so only
        after silencePadding), this decode becomes the final (see speech_ended)."""
        if self._closed or not self._speaking or not self._partials:
            return
        if self._partial is not None:
            if self._partial_end_ms >= at_ms:
                return  # the decode in flight already holds everything said
            self._cancel_partial()  # dropped if still queued; the new one supersedes it
        if self._written_bytes - self._segment_start >= _MIN_PARTIAL_MS * BYTES_PER_MS:
            self._launch_partial()

    def _maybe_partial(self) -> None:
        if not self._partials or self._partial is not None:
            return
        if self._written_bytes - self._partial_at < self._partial_interval_ms * BYTES_PER_MS:
            return
        if self._written_bytes - self._segment_start < _MIN_PARTIAL_MS * BYTES_PER_MS:
            return
        self._launch_partial()

    def _launch_partial(self) -> None:
        self._partial_at = self._written_bytes
        pcm = bytes(self._audio)
        end_ms = self._written_bytes // BYTES_PER_MS
        d = self._recognizer.transcribe(pcm, self._request, True)
        self._partial = d
        self._partial_end_ms = end_ms
        d.addCallbacks(self._partial_done, self._partial_failed, callbackArgs=(d, end_ms), errbackArgs=(d,))

    def _partial_done(self, result: SegmentTranscript, d: Deferred[Any], end_ms: int) -> Any:
        if self._partial is not d:
            return result  # promoted to the final (or cancelled): the next callback takes it
        self._partial = None
        text = result.text.strip()
        if self._closed or not self._speaking or not text or text == self._last_partial_text:
            return
        self._last_partial_text = text
        index = self._next_index + len(self._finals)
        self._listener.transcript(Transcript(index, text, False, self._segment_start // BYTES_PER_MS, end_ms,
                                             result.confidence))
        return None

    def _partial_failed(self, f: Failure, d: Deferred[Any]) -> Any:
        if self._partial is not d:
            return f  # promoted to the final: its errback reports it
        self._partial = None
        if f.check(CancelledError):
            return None
        self.partials_dropped += 1
        if not f.check(RecognizerBusyError):
            self._log.info("interim decode failed: {e}", e=f.getErrorMessage())

    def _cancel_partial(self) -> None:
        d, self._partial = self._partial, None
        if d is not None:
            d.addErrback(lambda f: None)  # its own errback passes failures on once superseded
            d.cancel()

    # -- finals -----------------------------------------------------------------

    def _final_done(self, result: SegmentTranscript, utterance: _Utterance) -> None:
        utterance.result = result
        self._flush_finals()

    def _final_failed(self, f: Failure, utterance: _Utterance) -> None:
        if f.check(CancelledError):
            return
        error = f.value if isinstance(f.value, RecognitionError) else RecognitionError(
            f.getErrorMessage() or f.type.__name__, retryable=True)
        utterance.error = error
        self._flush_finals()

    def _flush_finals(self) -> None:
        """Report finished utterances in the order they were spoken."""
        while self._finals and not self._closed:
            head = self._finals[0]
            if head.result is None and head.error is None:
                return
            self._finals.popleft()
            if head.error is not None:
                self._listener.dropped(head.error)
                continue
            assert head.result is not None
            text = head.result.text.strip()
            if text:
                index = self._next_index
                self._next_index += 1
                self._listener.transcript(Transcript(index, text, True, head.start_ms, head.end_ms,
                                                     head.result.confidence))
