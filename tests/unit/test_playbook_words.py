"""Spoken choices: ``words=`` phrases matched against final transcripts (playbook.md §5, §8.5)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from activecall.playbook.model import parse_scene
from activecall.playbook.words import MAX_TEXT_CHARS, match_words

MENU = {"1": ("sales", "buy something"), "2": ("support", "help"), "0": ("operator",)}


class MatchWordsTests(SynchronousTestCase):
    """Whole words, case-insensitive, punctuation ignored, first tag wins."""

    def test_whole_words_case_and_punctuation(self) -> None:
        """A phrase matches as whole words in any case, with punctuation around or inside it."""
        self.assertEqual(match_words("Sales, please.", MENU), "1")
        self.assertEqual(match_words("I'd like to BUY   something!", MENU), "1")
        self.assertEqual(match_words("buy-something", MENU), "1")
        self.assertEqual(match_words("I need HELP", MENU), "2")
        self.assertEqual(match_words("operator?", MENU), "0")

    def test_partial_words_do_not_match(self) -> None:
        """A phrase inside a longer word, or only part of a phrase, is no match."""
        for text in ("wholesale", "salesman", "helpful", "buy nothing", "something", "", "   ", "!!!"):
            self.assertIsNone(match_words(text, MENU), text)

    def test_first_tag_order_wins(self) -> None:
        """When phrases of several digits occur, the digit of the first tag wins, not the first in the text."""
        self.assertEqual(match_words("help me with sales", MENU), "1")
        self.assertEqual(match_words("help me with sales", {"2": ("help",), "1": ("sales",)}), "2")

    def test_full_width_letters(self) -> None:
        """Full-width letters (common in CJK ASR output) match their ASCII phrase."""
        self.assertEqual(match_words("ＳＡＬＥＳ", MENU), "1")

    def test_cjk_substring(self) -> None:
        """CJK phrases match as substrings, spaces ignored, since those scripts put no spaces between words."""
        words = {"1": ("销售", "买东西"), "2": ("售后服务",)}
        self.assertEqual(match_words("我想找销售。", words), "1")
        self.assertEqual(match_words("我要 买 东西", words), "1")
        self.assertEqual(match_words("请转售后服务，谢谢", words), "2")
        self.assertIsNone(match_words("我想问一下价格", words))
        self.assertEqual(match_words("カタカナ テスト", {"3": ("カタカナ",)}), "3")

    def test_pseudo_digits_never_match(self) -> None:
        """timeout/nomatch/collected/failed actions are taken on their own events, never by a phrase."""
        self.assertIsNone(match_words("timeout", {"timeout": ("timeout",), "nomatch": ("timeout",)}))
        self.assertIsNone(match_words("done", {"collected": ("done",), "failed": ("done",)}))

    def test_text_bounded(self) -> None:
        """Only the first MAX_TEXT_CHARS characters are looked at."""
        self.assertEqual(match_words("x " * 900 + "sales", MENU), "1")
        self.assertIsNone(match_words("x" * MAX_TEXT_CHARS + " sales", MENU))

    def test_empty_inputs(self) -> None:
        """No phrases, or phrases of punctuation only, match nothing."""
        self.assertIsNone(match_words("sales", {}))
        self.assertIsNone(match_words("sales", {"1": ()}))
        self.assertIsNone(match_words("sales ...", {"1": ("...",)}))

    def test_from_parsed_scene(self) -> None:
        """Phrases parsed from a scene's words= attribute drive the match."""
        scene = parse_scene("menu", 'Say sales or support.\n<dtmf digit="1" action="goto" scene="s" words="Sales|Buy Something"/>'
                                    '<dtmf digit="2" action="goto" scene="t" words="support"/>')
        self.assertEqual(match_words("buy something", scene.words), "1")
        self.assertEqual(match_words("Support!", scene.words), "2")

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=300), st.dictionaries(
        st.text(min_size=1, max_size=8), st.lists(st.text(max_size=20), max_size=5).map(tuple), max_size=5))
    def test_fuzz_total(self, text: str, words: dict[str, tuple[str, ...]]) -> None:
        """Any text and any phrases give a digit of the map or None, never an exception."""
        result = match_words(text, words)
        self.assertTrue(result is None or result in words)

    @settings(max_examples=200, deadline=None)
    @given(st.from_regex(r"[a-z]{1,10}( [a-z]{1,10}){0,2}", fullmatch=True),
           st.text(alphabet=" ,.!?;", max_size=3), st.text(alphabet=" ,.!?;", max_size=3))
    def test_fuzz_phrase_found_with_punctuation(self, phrase: str, before: str, after: str) -> None:
        """A phrase said between any punctuation, in upper case, is found."""
        self.assertEqual(match_words(f"ok{before or ' '}{phrase.upper()}{after or ' '}thanks", {"7": (phrase,)}), "7")
