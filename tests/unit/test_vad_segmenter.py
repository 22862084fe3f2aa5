"""The per-stream VAD state machine: padding, hysteresis, silence timeouts, forced ends, bounds."""

from __future__ import annotations

import math

from twisted.trial.unittest import SynchronousTestCase

from activecall.options import VadOption
from activecall.speech.vad.segmenter import (
    SilenceTimeout, SpeechEnd, SpeechPause, SpeechStart, VadParams, VadSegmenter,
)


def run(seg: VadSegmenter, probs: list[float], start_ms: int = 0, pauses: bool = False) -> list[tuple[int, object]]:
    """Feed one probability per window; (window end ms, event) for every event (SpeechPause hints only
    with ``pauses``)."""
    out = []
    end = start_ms
    for p in probs:
        end += seg.window_ms
        out.extend((end, e) for e in seg.feed(end, p) if pauses or not isinstance(e, SpeechPause))
    return out


class SegmenterTests(SynchronousTestCase):
    def test_speech_start_after_padding(self) -> None:
        """speaking comes once voice has lasted speechPadding, with the onset of that voice."""
        seg = VadSegmenter(VadParams(speech_padding_ms=100, silence_padding_ms=60), 20)
        events = run(seg, [0.0] * 5 + [0.9] * 10)
        self.assertEqual(events, [(200, SpeechStart(100))])
        self.assertTrue(seg.speaking)

    def test_short_voice_is_not_speech(self) -> None:
        """Voice shorter than speechPadding produces no event at all."""
        seg = VadSegmenter(VadParams(speech_padding_ms=100, silence_padding_ms=60), 20)
        self.assertEqual(run(seg, [0.0, 0.9, 0.9, 0.9, 0.0, 0.0, 0.0, 0.0, 0.9, 0.0] * 5), [])

    def test_speech_end_duration_excludes_trailing_silence(self) -> None:
        """silence after speech reports the speech's start and length, after silencePadding of quiet."""
        seg = VadSegmenter(VadParams(speech_padding_ms=100, silence_padding_ms=60), 20)
        events = run(seg, [0.0] * 5 + [0.9] * 20 + [0.0] * 10)
        self.assertEqual(events, [(200, SpeechStart(100)), (560, SpeechEnd(100, 400))])
        self.assertFalse(seg.speaking)

    def test_short_gap_keeps_the_segment(self) -> None:
        """A pause shorter than silencePadding does not split the segment."""
        seg = VadSegmenter(VadParams(speech_padding_ms=100, silence_padding_ms=100), 20)
        events = run(seg, [0.9] * 10 + [0.0] * 4 + [0.9] * 10 + [0.0] * 6)
        self.assertEqual([e for _, e in events], [SpeechStart(0), SpeechEnd(0, 480)])

    def test_hysteresis(self) -> None:
        """Once speaking, windows above threshold - 0.15 still count as voice; below it they do not."""
        seg = VadSegmenter(VadParams(speech_padding_ms=40, silence_padding_ms=60, voice_threshold=0.5), 20)
        events = run(seg, [0.9, 0.9] + [0.4] * 20 + [0.3] * 3)
        self.assertEqual([e for _, e in events], [SpeechStart(0), SpeechEnd(0, 440)])
        # Before speech, 0.4 is not voice.
        seg = VadSegmenter(VadParams(speech_padding_ms=40, silence_padding_ms=60, voice_threshold=0.5), 20)
        self.assertEqual(run(seg, [0.4] * 20), [])

    def test_trailing_resumes_only_above_threshold(self) -> None:
        """During trailing silence a window between the two thresholds does not resume speech (Silero)."""
        seg = VadSegmenter(VadParams(speech_padding_ms=40, silence_padding_ms=60, voice_threshold=0.5), 20)
        events = run(seg, [0.9, 0.9, 0.9, 0.2, 0.4, 0.4])
        self.assertEqual([e for _, e in events], [SpeechStart(0), SpeechEnd(0, 60)])

    def test_minimum_low_threshold(self) -> None:
        """A tiny voiceThreshold keeps the low threshold at 0.01 (silence still ends speech)."""
        params = VadParams(voice_threshold=0.05, speech_padding_ms=20, silence_padding_ms=20)
        self.assertAlmostEqual(params.low_threshold, 0.01)
        seg = VadSegmenter(params, 20)
        self.assertEqual([e for _, e in run(seg, [0.5, 0.02, 0.0])], [SpeechStart(0), SpeechEnd(0, 40)])

    def test_silence_timeout_repeats(self) -> None:
        """silenceTimeout fires every timeout of continued silence, with the silence's start."""
        seg = VadSegmenter(VadParams(silence_timeout_ms=200), 20)
        events = run(seg, [0.0] * 30)
        self.assertEqual(events, [(200, SilenceTimeout(0, 200)), (400, SilenceTimeout(0, 400)),
                                  (600, SilenceTimeout(0, 600))])

    def test_silence_timeout_restarts_after_speech(self) -> None:
        """After a speech segment the silence (and its timeout) counts from the end of the speech."""
        seg = VadSegmenter(VadParams(speech_padding_ms=40, silence_padding_ms=60, silence_timeout_ms=200), 20)
        events = run(seg, [0.0] * 5 + [0.9] * 5 + [0.0] * 15)
        self.assertEqual([e for _, e in events], [SpeechStart(100), SpeechEnd(100, 100), SilenceTimeout(200, 200)])
        self.assertEqual(events[-1][0], 400)

    def test_no_timeout_without_option(self) -> None:
        """Without silenceTimeout a long silence produces nothing."""
        seg = VadSegmenter(VadParams(), 32)
        self.assertEqual(run(seg, [0.0] * 1000), [])

    def test_forced_end_after_max_segment(self) -> None:
        """Speech longer than maxBufferDurationSecs is cut, and a new segment starts as it goes on."""
        seg = VadSegmenter(VadParams(speech_padding_ms=100, silence_padding_ms=100, max_segment_ms=1000), 20)
        events = run(seg, [0.9] * 75 + [0.0] * 10)
        self.assertEqual([e for _, e in events],
                         [SpeechStart(0), SpeechEnd(0, 1000), SpeechStart(1000), SpeechEnd(1000, 500)])
        self.assertEqual(events[1][0], 1000)

    def test_nan_probability_is_silence(self) -> None:
        """A NaN probability counts as silence."""
        seg = VadSegmenter(VadParams(speech_padding_ms=20, silence_padding_ms=20), 20)
        self.assertEqual([e for _, e in run(seg, [0.9, math.nan])], [SpeechStart(0), SpeechEnd(0, 20)])

    def test_params_bounded(self) -> None:
        """Absurd numbers are clamped: paddings 0..60 s, threshold 0.01..0.99, timeout >= 100 ms, segment 1..600 s."""
        p = VadParams(speech_padding_ms=10**12, silence_padding_ms=-5, voice_threshold=7.0,
                      silence_timeout_ms=1, max_segment_ms=10**15)
        self.assertEqual((p.speech_padding_ms, p.silence_padding_ms, p.voice_threshold, p.silence_timeout_ms,
                          p.max_segment_ms), (60_000, 0, 0.99, 100, 600_000))
        p = VadParams(voice_threshold=math.nan, silence_timeout_ms=0, max_segment_ms=3)
        self.assertEqual((p.voice_threshold, p.silence_timeout_ms, p.max_segment_ms), (0.5, None, 1000))
        self.assertEqual(VadParams(voice_threshold=-1.0).voice_threshold, 0.01)

    def test_from_option(self) -> None:
        """VADOption fields map onto the params; maxBufferDurationSecs becomes ms and is bounded."""
        option = VadOption.from_json({"speechPadding": 300, "silencePadding": 700, "voiceThreshold": 0.6,
                                      "silenceTimeout": 5000, "maxBufferDurationSecs": 20}, "vad")
        self.assertEqual(VadParams.from_option(option), VadParams(300, 700, 0.6, 5000, 20_000))
        self.assertEqual(VadParams.from_option(VadOption.from_json({}, "vad")), VadParams())
        huge = VadOption.from_json({"maxBufferDurationSecs": 2**63, "speechPadding": 2**63}, "vad")
        params = VadParams.from_option(huge)
        self.assertEqual((params.max_segment_ms, params.speech_padding_ms), (600_000, 60_000))

    def test_bad_window(self) -> None:
        """A window length outside 1..1000 ms is refused."""
        self.assertRaises(ValueError, VadSegmenter, VadParams(), 0)

    def test_pause_hint_when_the_voice_stops(self) -> None:
        """The first unvoiced window in speech gives SpeechPause(voiced end), before any SpeechEnd; a
        voice that resumes gives a pause and no end."""
        seg = VadSegmenter(VadParams(speech_padding_ms=40, silence_padding_ms=100), 20)
        events = run(seg, [0.9] * 5 + [0.0] + [0.9] * 3 + [0.0] * 6, pauses=True)
        self.assertEqual([e for _, e in events],
                         [SpeechStart(0), SpeechPause(100), SpeechPause(180), SpeechEnd(0, 180)])
        self.assertEqual(events[1][0], 120)  # told on the first unvoiced window

