"""SegmentStream: VAD hints cut caller audio into utterances; partials while speaking, finals in order."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from activecall.speech.asr.segments import BYTES_PER_MS, SegmentStream
from activecall.speech.interfaces import (
    ISegmentRecognizer, RecognitionError, RecognitionRequest, RecognizerBusyError, SegmentTranscript,
)

FRAME = b"\x01\x00" * 320  # 20 ms at 16 kHz


@implementer(ISegmentRecognizer)
class _Recognizer:
    name = "fake"
    streaming = False

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bool, Deferred[SegmentTranscript]]] = []
        self.busy = False

    def open(self, request: Any, listener: Any) -> Any:
        return SegmentStream(self, request, listener)

    def transcribe(self, pcm: bytes, request: Any, partial: bool) -> Deferred[SegmentTranscript]:
        if partial and self.busy:
            return fail(RecognizerBusyError())
        d: Deferred[SegmentTranscript] = Deferred()
        self.calls.append((pcm, partial, d))
        return d


class _Listener:
    def __init__(self) -> None:
        self.results: list[Any] = []
        self.dropped_errors: list[Any] = []

    def transcript(self, result: Any) -> None:
        self.results.append(result)

    def dropped(self, error: Any) -> None:
        self.dropped_errors.append(error)

    def failed(self, error: Any) -> None:
        raise AssertionError("a segment stream never fails as a whole")


class SegmentStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rec = _Recognizer()
        self.listener = _Listener()
        self.stream = SegmentStream(self.rec, RecognitionRequest(), self.listener, partial_interval_ms=500,
                                    preroll_ms=200, history_ms=1000)

    def write_ms(self, ms: int) -> None:
        for _ in range(ms // 20):
            self.stream.write(FRAME)

    def test_final_covers_preroll_to_end_plus_tail(self) -> None:
        """The utterance starts preroll before the VAD onset and ends a short tail after its end."""
        self.write_ms(2000)
        self.stream.speech_started(1500)  # reported late, as VAD does
        self.write_ms(1000)
        self.stream.speech_ended(2800)
        finals = [c for c in self.rec.calls if not c[1]]
        self.assertEqual(len(finals), 1)
        self.assertEqual(len(finals[0][0]), (2800 + 150 - 1300) * BYTES_PER_MS)
        finals[0][2].callback(SegmentTranscript("hello there"))
        [result] = self.listener.results
        self.assertEqual((result.index, result.text, result.final, result.start_ms, result.end_ms),
                         (0, "hello there", True, 1300, 2800))

    def test_preroll_limited_by_history(self) -> None:
        """Audio older than the history is gone; the segment starts at the oldest kept audio."""
        self.write_ms(3000)
        self.stream.speech_started(500)
        self.stream.speech_ended(3000)
        pcm = self.rec.calls[-1][0]
        self.assertEqual(len(pcm), 1000 * BYTES_PER_MS)

    def test_partials_while_speaking_then_final(self) -> None:
        """The growing segment is re-decoded every interval, one decode at a time."""
        self.stream.speech_started(0)
        self.write_ms(600)
        partials = [c for c in self.rec.calls if c[1]]
        self.assertEqual(len(partials), 1)
        self.write_ms(600)  # the first partial is still decoding: no second one
        self.assertEqual(len([c for c in self.rec.calls if c[1]]), 1)
        partials[0][2].callback(SegmentTranscript("hel"))
        self.write_ms(500)
        self.assertEqual(len([c for c in self.rec.calls if c[1]]), 2)
        self.stream.speech_ended(1700)
        self.rec.calls[-1][2].callback(SegmentTranscript("hello"))
        self.assertEqual([(r.text, r.final, r.index) for r in self.listener.results], [("hel", False, 0), ("hello", True, 0)])

    def test_busy_recognizer_drops_partials_not_finals(self) -> None:
        """A busy recognizer refuses partials; the final still runs."""
        self.rec.busy = True
        self.stream.speech_started(0)
        self.write_ms(2000)
        self.assertEqual(self.stream.partials_dropped, 4)  # at 0.5, 1, 1.5 and 2 s
        self.stream.speech_ended(2000)
        self.assertEqual([c[1] for c in self.rec.calls], [False])

    def test_finals_in_order_and_empty_uses_no_index(self) -> None:
        """A later utterance decoded first waits for the earlier; an empty one is skipped."""
        self.stream = SegmentStream(self.rec, RecognitionRequest(), self.listener, partials=False)
        for start in (0, 2000, 4000):
            self.stream.speech_started(start + self._ms())
            self.write_ms(500)
            self.stream.speech_ended(self._ms())
            self.write_ms(500)
        finals = [c for c in self.rec.calls if not c[1]]
        finals[2][2].callback(SegmentTranscript("third"))
        self.assertEqual(self.listener.results, [])
        finals[0][2].callback(SegmentTranscript(""))
        finals[1][2].callback(SegmentTranscript("second"))
        self.assertEqual([(r.index, r.text) for r in self.listener.results if r.final], [(0, "second"), (1, "third")])

    def _ms(self) -> int:
        return self.stream._written_bytes // BYTES_PER_MS

    def test_failed_final_is_dropped_and_stream_goes_on(self) -> None:
        """One failed decode reports dropped(); the next utterance still works."""
        self.stream.speech_started(0)
        self.write_ms(400)
        self.stream.speech_ended(400)
        self.rec.calls[-1][2].errback(RecognitionError("boom"))
        self.assertEqual([str(e) for e in self.listener.dropped_errors], ["boom"])
        self.stream.speech_started(self._ms())
        self.write_ms(400)
        self.stream.speech_ended(self._ms())
        self.rec.calls[-1][2].callback(SegmentTranscript("ok"))
        self.assertEqual([r.text for r in self.listener.results], ["ok"])

    def test_close_cancels_and_silences(self) -> None:
        """After close nothing reaches the listener and pending decodes are cancelled."""
        self.stream.speech_started(0)
        self.write_ms(400)
        self.stream.speech_ended(400)
        d = self.rec.calls[-1][2]
        fired = []
        self.stream.close().addCallback(fired.append)
        self.assertEqual(fired, [None])
        self.assertTrue(d.called)  # cancelled
        self.stream.write(FRAME)
        self.assertEqual(self.listener.results, [])

    def test_endless_speech_is_cut(self) -> None:
        """An utterance longer than max_segment_ms is decoded and a new one begins."""
        stream = SegmentStream(self.rec, RecognitionRequest(), self.listener, max_segment_ms=1000, partials=False)
        stream.speech_started(0)
        for _ in range(120):
            stream.write(FRAME)
        self.assertEqual(len(self.rec.calls), 2)

    def test_idle_memory_is_bounded(self) -> None:
        """Without speech only the history is kept."""
        self.write_ms(20_000)
        self.assertLessEqual(len(self.stream._audio), 1000 * BYTES_PER_MS)

    def test_partial_in_flight_covering_the_utterance_becomes_the_final(self) -> None:
        """An interim decode asked for after the voice ended (VAD says so only after silencePadding)
        already holds the whole utterance: its result is the final, no second decode."""
        self.stream.speech_started(0)
        self.write_ms(500)  # partial A asked for at 500 ms
        self.rec.calls[-1][2].callback(SegmentTranscript("hel"))
        self.write_ms(1000)  # partial B at 1000 ms
        self.assertEqual([c[1] for c in self.rec.calls], [True, True])
        self.stream.speech_ended(900)  # the voice ended at 0.9 s: B's audio (to 1.0 s) holds all of it
        self.assertEqual([c[1] for c in self.rec.calls], [True, True], "no separate final decode")
        self.rec.calls[-1][2].callback(SegmentTranscript("hello there"))
        self.assertEqual([(r.text, r.final) for r in self.listener.results], [("hel", False), ("hello there", True)])
        self.assertEqual(self.stream.partials_promoted, 1)

    def test_partial_older_than_the_end_is_cancelled_quietly(self) -> None:
        """A partial that misses the end of the utterance is dropped; the final decodes everything."""
        self.stream.speech_started(0)
        self.write_ms(600)
        partial = self.rec.calls[-1]
        self.stream.speech_ended(900)
        self.assertTrue(partial[2].called)
        self.assertFalse(self.rec.calls[-1][1])
        self.rec.calls[-1][2].callback(SegmentTranscript("done"))
        self.assertEqual([r.text for r in self.listener.results], ["done"])
        self.flushLoggedErrors()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_pause_starts_a_decode_that_becomes_the_final(self) -> None:
        """speech_paused decodes at once; when VAD then ends the utterance there, that decode is the
        final: the final does not wait silencePadding plus a second decode."""
        self.stream.speech_started(0)
        self.write_ms(400)
        self.stream.speech_paused(400)
        [(pcm, partial, d)] = self.rec.calls
        self.assertTrue(partial)
        self.assertEqual(len(pcm), 400 * BYTES_PER_MS)
        self.write_ms(100)
        self.stream.speech_ended(400)
        self.assertEqual(len(self.rec.calls), 1)
        d.callback(SegmentTranscript("yes please"))
        self.assertEqual([(r.text, r.final) for r in self.listener.results], [("yes please", True)])

    def test_pause_then_voice_again_is_just_a_partial(self) -> None:
        """A pause that was not the end: its decode reports a partial; the end decodes the whole."""
        self.stream.speech_started(0)
        self.write_ms(400)
        self.stream.speech_paused(400)
        self.rec.calls[-1][2].callback(SegmentTranscript("I would"))
        self.write_ms(800)
        self.stream.speech_ended(1200)
        self.rec.calls[-1][2].callback(SegmentTranscript("I would like a table"))
        self.assertEqual([(r.text, r.final) for r in self.listener.results],
                         [("I would", False), ("I would like a table", True)])
