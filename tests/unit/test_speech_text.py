"""TextSplitter / split_text: sentence and clause pieces for streaming TTS (activecall.speech.text)."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from activecall.speech.text import MAX_PIECE_CHARS, TextSplitter, split_text


def stream(text: str, sizes: list[int], first_clause: bool = True) -> list[str]:
    """Feed ``text`` in chunks of the given sizes (cycled), then flush."""
    splitter = TextSplitter(first_clause=first_clause)
    out: list[str] = []
    pos = 0
    k = 0
    while pos < len(text):
        n = sizes[k % len(sizes)] if sizes else len(text)
        out += splitter.feed(text[pos:pos + n])
        pos += n
        k += 1
    return out + splitter.flush()


def squash(text: str) -> str:
    return "".join(text.split())


_ALPHABET = st.sampled_from(list("abcXY 12.,:;!?\n<>[]{}$—–。！？，、你好\"')") + ["Mr.", "e.g.", "J.", "3.5", " ", "  "])
_TEXTS = st.lists(_ALPHABET, max_size=120).map("".join)


class SentenceRuleTests(SynchronousTestCase):
    """The split rules of a whole text (split_text)."""

    def test_sentence_ends(self) -> None:
        """. ! ? ; followed by space end pieces; a run of marks and closing quotes stays with its sentence."""
        self.assertEqual(split_text('Hi there! Is it on? Yes; it is. "Really?!" she said. Ok…  fine.'),
                         ["Hi there!", "Is it on?", "Yes;", "it is.", '"Really?!"', "she said.", "Ok…", "fine."])

    def test_newlines_split(self) -> None:
        """A newline ends a piece; blank lines give no empty pieces."""
        self.assertEqual(split_text("first line\n\n\nsecond line\r\nthird"), ["first line", "second line", "third"])

    def test_numbers_do_not_split(self) -> None:
        """Decimals, thousands, prices, times and versions stay whole; a number may end a sentence."""
        text = "Pi is 3.5 or so. We had 1,000 guests at 10:30 paying $4.99 for v1.2.3 each. It was 5. Then more."
        self.assertEqual(split_text(text), ["Pi is 3.5 or so.", "We had 1,000 guests at 10:30 paying $4.99 for v1.2.3 each.",
                                            "It was 5.", "Then more."])

    def test_abbreviations_and_initials(self) -> None:
        """Common abbreviations and single initials do not end a sentence."""
        text = ("Mr. Smith met Dr. Jones and Prof. Lee vs. Mrs. Brown, etc. and so on. Use e.g. this, i.e. that. "
                "At 9 a.m. or 5 p.m. in the U.S. it works. J. R. R. Tolkien wrote No. 5 at St. Mary. Sr. and Jr. too.")
        self.assertEqual(split_text(text), [
            "Mr. Smith met Dr. Jones and Prof. Lee vs. Mrs. Brown, etc. and so on.",
            "Use e.g. this, i.e. that.",
            "At 9 a.m. or 5 p.m. in the U.S. it works.",
            "J. R. R. Tolkien wrote No. 5 at St. Mary.",
            "Sr. and Jr. too.",
        ])

    def test_list_numbers(self) -> None:
        """A list number opening a piece does not end it."""
        self.assertEqual(split_text("1. Buy milk. 2. Call Bob."), ["1. Buy milk.", "2. Call Bob."])

    def test_markup_is_never_split(self) -> None:
        """Tags and bracket/brace markup are kept whole, even with sentence marks inside."""
        text = 'Say <prosody rate="slow. er">this. Now</prosody> ok. Then [laughs. loudly] and {x. y} end. A < b. c'
        self.assertEqual(split_text(text), ['Say <prosody rate="slow. er">this.', "Now</prosody> ok.",
                                            "Then [laughs. loudly] and {x. y} end.", "A < b.", "c"])

    def test_urls_and_emails(self) -> None:
        """Dots and colons inside URLs and e-mail addresses do not split; a final dot does."""
        text = "Visit https://example.com/a.b?x=1 now. Mail bob.smith@mail.example.org today. Bye"
        self.assertEqual(split_text(text), ["Visit https://example.com/a.b?x=1 now.",
                                            "Mail bob.smith@mail.example.org today.", "Bye"])

    def test_cjk(self) -> None:
        """CJK sentence marks end a piece with no space after them; closing quotes stay attached."""
        self.assertEqual(split_text("你好。今天天气很好！“真的吗？”他问；我说：是的"),
                         ["你好。", "今天天气很好！", "“真的吗？”", "他问；", "我说：是的"])

    def test_no_clause_rule_for_whole_text(self) -> None:
        """split_text never cuts at commas."""
        self.assertEqual(split_text("Well, I think that, honestly, this is fine."),
                         ["Well, I think that, honestly, this is fine."])

    def test_long_piece_cut_at_clause_then_space(self) -> None:
        """A piece longer than the limit is cut at its last clause mark, else at its last space."""
        clause = ("word " * 30).strip() + ", " + ("more " * 30).strip() + "."
        pieces = split_text(clause)
        self.assertEqual(pieces[0], ("word " * 30).strip() + ",")
        no_clause = ("word " * 60).strip() + "."
        pieces = split_text(no_clause)
        self.assertTrue(all(len(p) <= MAX_PIECE_CHARS for p in pieces))
        self.assertTrue(all(p.startswith("word") and "wor " not in p + " " for p in pieces), pieces)


class StreamingTests(SynchronousTestCase):
    """TextSplitter.feed/flush: early first piece, pieces as soon as they are certain."""

    def test_first_piece_may_end_at_a_clause(self) -> None:
        """The first piece ends at the first clause mark after 4 words; later pieces are whole sentences."""
        s = TextSplitter()
        self.assertEqual(s.feed("Well, "), [])
        self.assertEqual(s.feed("I think that, honestly"), ["Well, I think that,"])
        self.assertEqual(s.feed(", this is fine. And, well, "), ["honestly, this is fine."])
        self.assertEqual(s.flush(), ["And, well,"])

    def test_first_clause_cjk(self) -> None:
        """A CJK first piece ends at ， or 、 once it has 6 CJK characters."""
        s = TextSplitter()
        self.assertEqual(s.feed("好，我们今天去公园玩，然后"), ["好，我们今天去公园玩，"])
        self.assertEqual(s.feed("回家，睡觉。"), [])  # a closing quote may follow
        self.assertEqual(s.feed("好"), ["然后回家，睡觉。"])

    def test_waits_for_the_character_after_a_mark(self) -> None:
        """'3.' or 'Mr.' at the end of a chunk is not a sentence end until the next character says so."""
        s = TextSplitter(first_clause=False)
        self.assertEqual(s.feed("It costs 3."), [])
        self.assertEqual(s.feed("5 euros. Mr."), ["It costs 3.5 euros."])
        self.assertEqual(s.feed(" Smith left."), [])
        self.assertEqual(s.feed(" Ok"), ["Mr. Smith left."])
        self.assertEqual(s.flush(), ["Ok"])

    def test_waits_for_a_tag_to_close(self) -> None:
        """An open tag holds the piece until it closes (or proves too long to be one)."""
        s = TextSplitter(first_clause=False)
        self.assertEqual(s.feed("Hi <break time='1s'. "), [])
        self.assertEqual(s.feed("/> there. "), ["Hi <break time='1s'. /> there."])

    def test_flush_resets(self) -> None:
        """After flush the splitter starts a new stream (first-clause rule again)."""
        s = TextSplitter()
        s.feed("One two three four, five.")
        s.flush()
        self.assertEqual(s.feed("Six seven eight nine, ten"), ["Six seven eight nine,"])

    def test_whitespace_only(self) -> None:
        """Only white space gives no pieces."""
        self.assertEqual(stream("  \n \t ", [1]), [])
        self.assertEqual(split_text(""), [])


class HostileInputTests(SynchronousTestCase):
    """Unbounded input gives bounded pieces and bounded work."""

    def test_100kb_without_punctuation(self) -> None:
        """100 KB of words without punctuation comes out in pieces no longer than the limit, nothing lost."""
        text = ("lorem ipsum dolor " * 6000)[:100_000]
        pieces = split_text(text)
        self.assertTrue(all(0 < len(p) <= MAX_PIECE_CHARS for p in pieces))
        self.assertEqual(squash("".join(pieces)), squash(text))
        self.assertEqual(stream(text, [997]), stream(text, []))

    def test_100kb_single_token(self) -> None:
        """100 KB without spaces is cut hard at the limit."""
        pieces = split_text("x" * 100_000)
        self.assertEqual(len(pieces), 500)
        self.assertEqual({len(p) for p in pieces}, {MAX_PIECE_CHARS})

    def test_long_tags_are_bounded(self) -> None:
        """A tag that does not close within the markup bound is plain text; pieces stay bounded."""
        for text in ("<" + "a" * 20_000 + ">. Next.", "<speak " + "x. " * 5000, "[" * 50_000, "<a>" * 10_000):
            pieces = stream(text, [333])
            self.assertTrue(all(0 < len(p) <= MAX_PIECE_CHARS for p in pieces))
            self.assertEqual(squash("".join(pieces)), squash(text))

    def test_one_character_chunks_are_fast_enough(self) -> None:
        """20 KB fed one character at a time works in bounded time (the scan resumes, it does not restart)."""
        text = ("Some words without an end " * 800)[:20_000]
        self.assertEqual(stream(text, [1]), split_text(text))


class PropertyTests(SynchronousTestCase):
    """Hypothesis: nothing lost or reordered, no empty pieces, chunking never matters."""

    @settings(max_examples=300, deadline=None)
    @given(_TEXTS)
    def test_joined_pieces_give_back_the_text(self, text: str) -> None:
        """Joining the pieces gives the input back (white space normalized); no piece is empty or padded."""
        for pieces in (split_text(text), stream(text, [])):
            self.assertEqual(squash("".join(pieces)), squash(text))
            self.assertTrue(all(p and p == p.strip() for p in pieces))
            self.assertTrue(all(len(p) <= MAX_PIECE_CHARS for p in pieces))

    @settings(max_examples=300, deadline=None)
    @given(_TEXTS, st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=10), st.booleans())
    def test_chunking_does_not_change_pieces(self, text: str, sizes: list[int], first_clause: bool) -> None:
        """Feeding the text in random chunk sizes gives exactly the pieces of feeding it whole."""
        self.assertEqual(stream(text, sizes, first_clause), stream(text, [], first_clause))
        if not first_clause:
            self.assertEqual(stream(text, sizes, False), split_text(text))

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.sampled_from(["word", "x" * 60, "a, b", ". ", " ", "<t>", "<" + "q" * 90]), max_size=40).map("".join),
           st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=5))
    def test_long_inputs_chunking(self, text: str, sizes: list[int]) -> None:
        """The long-piece cut and the markup bound are chunking-independent too."""
        self.assertEqual(stream(text, sizes), stream(text, []))
        self.assertEqual(squash("".join(stream(text, sizes))), squash(text))


class PurityTests(SynchronousTestCase):
    def test_stdlib_only(self) -> None:
        """activecall.speech.text imports no Twisted reactor and nothing outside the standard library."""
        code = ("import sys, activecall.speech.text; "
                "bad = [m for m in sys.modules if m.split('.')[0] in ('twisted', 'numpy', 'zope')]; print(bad)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        self.assertEqual(out, "[]")
