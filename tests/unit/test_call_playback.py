"""SST sources: TTS plays and file plays hand out 20 ms frames as the media clock pulls."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.call.playback import FilePlay, TtsPlay, strip_emoji

FRAME = 640  # 20 ms at 16 kHz


def tone(n_bytes: int, value: int = 1) -> bytes:
    return bytes([value]) * n_bytes


class TtsPlayTests(SynchronousTestCase):
    """A TTS play speaks its sentences in order, as fast as synthesis allows."""

    def make(self) -> TtsPlay:
        return TtsPlay("p1", 1234, FRAME, 0.0, streaming=False, bytes_per_ms=32.0)

    def test_underrun_sends_nothing_until_audio_arrives(self) -> None:
        """A sentence whose synthesis is behind real time yields no frame (no silence fill)."""
        play = self.make()
        s = play.add_sentence("Hello.")
        self.assertIsNone(play.read_frame())
        s.append(tone(FRAME + 100))
        self.assertEqual(play.read_frame(), tone(FRAME))
        self.assertIsNone(play.read_frame(), "the 100-byte rest waits for more audio")
        s.done = True
        last = play.read_frame()
        self.assertEqual(last, tone(100) + bytes(FRAME - 100))
        self.assertFalse(play.finished, "no endOfStream yet")
        play.end_of_stream = True
        self.assertTrue(play.finished)

    def test_sentences_play_in_order(self) -> None:
        """Audio of the second sentence follows the first even if it was synthesized first."""
        play = self.make()
        a = play.add_sentence("A.")
        b = play.add_sentence("B.")
        b.append(tone(FRAME, 2))
        b.done = True
        self.assertIsNone(play.read_frame())
        a.append(tone(FRAME, 1))
        a.done = True
        self.assertEqual(play.read_frame(), tone(FRAME, 1))
        self.assertEqual(play.read_frame(), tone(FRAME, 2))

    def test_interruption_info_reports_the_current_sentence(self) -> None:
        """interruption carries the sentence text, the ms synthesized and the ms played."""
        play = self.make()
        s = play.add_sentence("Good morning.")
        s.append(tone(FRAME * 5))
        play.read_frame()
        play.read_frame()
        self.assertEqual(play.interruption_info(), ("Good morning.", 100, 40, None))
        play.current.word_starts_ms = [0, 30]
        self.assertEqual(play.interruption_info()[3], 1)

    def test_graceful_cut_finishes_the_current_sentence_only(self) -> None:
        """cut_after_current keeps the sentence being spoken and cancels the queued ones."""
        play = self.make()
        cancelled = []

        class Synth:
            def cancel(self) -> None:
                cancelled.append(True)

        a = play.add_sentence("A.")
        b = play.add_sentence("B.")
        b.synth = Synth()
        a.append(tone(FRAME * 2))
        a.done = True
        play.read_frame()
        play.cut_after_current()
        self.assertEqual(cancelled, [True])
        self.assertFalse(play.finished)
        play.read_frame()
        self.assertIsNone(play.read_frame())
        self.assertTrue(play.finished)

    def test_pause_keeps_position(self) -> None:
        """A paused play yields nothing and resumes where it stopped."""
        play = self.make()
        s = play.add_sentence("A.")
        s.append(tone(FRAME, 1) + tone(FRAME, 2))
        play.read_frame()
        play.paused = True
        self.assertIsNone(play.read_frame())
        play.paused = False
        self.assertEqual(play.read_frame(), tone(FRAME, 2))


class FilePlayTests(SynchronousTestCase):
    """A file play starts at its offset, pads the last frame and can loop."""

    def test_offset_and_padding(self) -> None:
        """offsetMs skips audio; the last partial frame is zero-padded; then finished."""
        play = FilePlay("u", 1, FRAME, 0.0, "u")
        self.assertIsNone(play.read_frame(), "not loaded yet")
        self.assertFalse(play.finished)
        play.loaded(tone(FRAME, 1) + tone(FRAME // 2, 2), offset_bytes=FRAME)
        self.assertEqual(play.read_frame(), tone(FRAME // 2, 2) + bytes(FRAME // 2))
        self.assertTrue(play.finished)

    def test_loop_restarts(self) -> None:
        """A looping play (hold music) starts again at the end and never finishes by itself."""
        play = FilePlay("moh", 1, FRAME, 0.0, "moh", loop=True)
        play.loaded(tone(FRAME, 3))
        self.assertEqual(play.read_frame(), tone(FRAME, 3))
        self.assertEqual(play.read_frame(), tone(FRAME, 3))
        self.assertFalse(play.finished)
        play.cancel()
        self.assertTrue(play.finished)


class TextTests(SynchronousTestCase):
    """Streaming text is cut into sentences; emoji are removed."""

    def test_strip_emoji(self) -> None:
        """Emoji vanish, other non-ASCII text stays."""
        self.assertEqual(strip_emoji("Hello 👋 café ☀️!"), "Hello  café !")
