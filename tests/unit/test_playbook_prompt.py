"""The system message: feature snippets, tool instructions and the collector section (playbook.md §6)."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from activecall.playbook.dtmf import CollectorSpec
from activecall.playbook.model import parse_playbook
from activecall.playbook.prompt import (
    BUILTIN_TOOL_INSTRUCTIONS,
    FEATURES,
    MAX_FEATURES,
    MAX_TEXT_BYTES,
    SHIPPED_FEATURES_DIR,
    PromptTexts,
    collector_section,
    load_prompt_texts,
    system_prompt,
)


def shipped(name: str) -> str:
    """The trimmed text of a shipped file."""
    with open(os.path.join(SHIPPED_FEATURES_DIR, name), encoding="utf-8") as f:
        return f.read().strip()


class ShippedTextTests(SynchronousTestCase):
    """activecall ships English and Chinese texts for every feature and the tool instructions."""

    def test_every_text_shipped(self) -> None:
        """Each feature and tool_instructions exists in en and zh, non-empty and within the size bound."""
        for name in (*FEATURES, "tool_instructions"):
            for lang in ("en", "zh"):
                text = shipped(f"{name}.{lang}.md")
                self.assertTrue(text, f"{name}.{lang}")
                self.assertLess(len(text.encode()), MAX_TEXT_BYTES)

    def test_tool_instructions_teach_every_action(self) -> None:
        """The shipped tool instructions teach each tag, the JSON tools block with http, and short sentences."""
        for lang in ("en", "zh"):
            text = shipped(f"tool_instructions.{lang}.md")
            for needle in ("<hangup/>", '<refer to="sip:', '<message body="', '<play file="', '<goto scene="',
                           '<set_var key="', "<collect ", '"tools"', '"name": "http"'):
                self.assertIn(needle, text, (lang, needle))
        self.assertIn("short", shipped("tool_instructions.en.md"))


class LoadTextsTests(SynchronousTestCase):
    """Lookup order: operator directory, shipped texts, then both for en; else skipped with a warning."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, name: str, text: str | bytes) -> None:
        mode = "wb" if isinstance(text, bytes) else "w"
        with open(os.path.join(self.dir, name), mode) as f:
            f.write(text)

    def test_shipped_texts_in_the_language(self) -> None:
        """Without operator files the shipped texts of the language are used, in feature order."""
        texts = load_prompt_texts(["http_tool", "context_repair"], "zh", None, self.dir)
        self.assertEqual(texts.snippets, (shipped("http_tool.zh.md"), shipped("context_repair.zh.md")))
        self.assertEqual(texts.tool_instructions, shipped("tool_instructions.zh.md"))
        self.assertEqual(texts.warnings, ())

    def test_operator_file_wins_and_is_trimmed(self) -> None:
        """features/<name>.<lang>.md in the operator's directory replaces the shipped text."""
        self.write("voice_emotion.en.md", "\n  Mine.  \n")
        self.write("tool_instructions.en.md", "My tools.\n")
        texts = load_prompt_texts(["voice_emotion"], "en", None, self.dir)
        self.assertEqual((texts.snippets, texts.tool_instructions), (("Mine.",), "My tools."))

    def test_region_then_primary_language_then_en(self) -> None:
        """en-US tries en-us then en; an unshipped language falls back to the en texts."""
        self.write("custom.en-us.md", "US text")
        self.assertEqual(load_prompt_texts(["custom"], "en_US", None, self.dir).snippets, ("US text",))
        fr = load_prompt_texts(["emotion_resonance"], "fr", None, self.dir)
        self.assertEqual(fr.snippets, (shipped("emotion_resonance.en.md"),))
        self.assertEqual(fr.tool_instructions, shipped("tool_instructions.en.md"))
        # The operator's en text beats the shipped en one when the language has none.
        self.write("emotion_resonance.en.md", "Operator en")
        self.assertEqual(load_prompt_texts(["emotion_resonance"], "fr", None, self.dir).snippets, ("Operator en",))

    def test_missing_and_invalid_names_skipped_with_warnings(self) -> None:
        """An unknown feature and names that could leave the directories are skipped, each with a warning."""
        self.write("x.en.md", "must not be read")
        texts = load_prompt_texts(["nope", "../x", "X", "a/b", "", "intent_clarification"], "en", None, self.dir)
        self.assertEqual(texts.snippets, (shipped("intent_clarification.en.md"),))
        self.assertEqual(len(texts.warnings), 5)
        self.assertIn("feature nope", texts.warnings[0])

    def test_bad_language_uses_en(self) -> None:
        """A language that is no tag (a path here) reads the en texts, with a warning."""
        texts = load_prompt_texts(["context_repair"], "../../etc", None, self.dir)
        self.assertEqual(texts.snippets, (shipped("context_repair.en.md"),))
        self.assertIn("not a language tag", texts.warnings[0])

    def test_unusable_files(self) -> None:
        """Oversized and non-UTF-8 operator files are skipped with a warning; the next candidate is used."""
        self.write("context_repair.en.md", "x" * (MAX_TEXT_BYTES + 1))
        self.write("rolling_summary.en.md", b"\xff\xfe bad")
        texts = load_prompt_texts(["context_repair", "rolling_summary"], "en", None, self.dir)
        self.assertEqual(texts.snippets, (shipped("context_repair.en.md"), shipped("rolling_summary.en.md")))
        self.assertEqual(len(texts.warnings), 2)
        self.assertIn("larger than", texts.warnings[0])
        self.assertIn("not UTF-8", texts.warnings[1])

    def test_empty_operator_file_disables_the_snippet(self) -> None:
        """An empty operator file is found and contributes no snippet."""
        self.write("http_tool.en.md", "  \n")
        self.assertEqual(load_prompt_texts(["http_tool"], "en", None, self.dir).snippets, ())

    def test_tool_instructions_given(self) -> None:
        """llm.toolInstructions replaces the files entirely."""
        self.write("tool_instructions.en.md", "file")
        self.assertEqual(load_prompt_texts([], "en", "Given.", self.dir).tool_instructions, "Given.")

    def test_feature_count_bounded_and_duplicates_once(self) -> None:
        """Duplicates count once; more than MAX_FEATURES names are cut with a warning."""
        texts = load_prompt_texts(["http_tool", "http_tool"], "en", None, self.dir)
        self.assertEqual(len(texts.snippets), 1)
        many = load_prompt_texts([f"f_{chr(97 + i % 26)}{'x' * (i // 26)}" for i in range(40)], "en", None, self.dir)
        self.assertEqual(sum("only the first" in w for w in many.warnings), 1)
        self.assertEqual(len(many.warnings), 1 + MAX_FEATURES)


class SystemPromptTests(SynchronousTestCase):
    """The exact §6 layout."""

    texts = PromptTexts(snippets=("One.", "Two."), tool_instructions="TOOLS")

    def test_layout_with_snippets_without_collectors(self) -> None:
        """scene prompt, Enhanced Capabilities list, blank line, tool instructions, newline."""
        self.assertEqual(system_prompt("Be kind.", self.texts, {}),
                         "Be kind.\n\n### Enhanced Capabilities:\n- One.\n- Two.\n\n\nTOOLS\n")

    def test_layout_without_snippets(self) -> None:
        """Without snippets the section is absent."""
        self.assertEqual(system_prompt("P", PromptTexts((), "T"), {}), "P\n\nT\n")

    def test_collector_section(self) -> None:
        """Collectors sorted by name with their details; the collect tag and the flow are taught."""
        collectors = {
            "zip": CollectorSpec("zip", description="Postal code", min_digits=5, max_digits=5),
            "acct": CollectorSpec("acct", min_digits=3, max_digits=8, finish_key="#"),
            "any": CollectorSpec("any", finish_key="*"),
            "free": CollectorSpec("free"),
            "least": CollectorSpec("least", description="", min_digits=2),
        }
        out = system_prompt("P", PromptTexts((), "T"), collectors)
        self.assertTrue(out.startswith("P\n\nT\n### DTMF Digit Collection\n"), out)
        lines = [line for line in out.splitlines() if line.startswith("- `")]
        self.assertEqual(lines, [
            "- `acct`: No description (min 3 digits, max 8 digits, press # to finish)",
            "- `any`: No description (press * to finish)",
            "- `free`: No description",
            "- `least`: No description (min 2 digits)",
            "- `zip`: Postal code (5 digits)",
        ])
        self.assertIn('<collect type="TYPE" var="VAR_NAME" prompt="PROMPT_TEXT" />', out)
        self.assertIn("keypad only", out)
        self.assertIn("system message", out)
        self.assertIn("{{ VAR_NAME }}", out)
        self.assertEqual(collector_section({}), "")

    def test_from_a_parsed_playbook(self) -> None:
        """The playbook's collectors and initial prompt build the message the engine sends."""
        pb = parse_playbook("---\nllm: {provider: o}\ndtmfCollectors:\n  pin: {digits: 4, description: PIN}\n"
                            "---\nYou sell shoes.\n", {}, "p.md")
        out = system_prompt(pb.prompt, PromptTexts((), BUILTIN_TOOL_INSTRUCTIONS), pb.collectors)
        self.assertTrue(out.startswith("You sell shoes.\n\n" + BUILTIN_TOOL_INSTRUCTIONS + "\n### DTMF"))
        self.assertIn("- `pin`: PIN (4 digits)", out)
