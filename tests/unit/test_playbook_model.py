"""Tests for activecall.playbook.model: resolution, parsing, validation, key twins and scenes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from activecall.options import CallOption, TranscriptionOption
from activecall.playbook.dtmf import CollectorSpec
from activecall.playbook.model import (
    MAX_WORD_CHARS,
    MAX_WORDS_PER_TAG,
    DtmfAction,
    Playbook,
    PlaybookCache,
    PlaybookError,
    PlaybookNotFound,
    expand_env,
    load_playbook,
    parse_playbook,
    parse_scene,
    resolve_playbook_path,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MD = str(REPO / "etc" / "playbook" / "default.md")
OPENAI_ENV = {
    "OPENAI_API_KEY": "sk-test",
    "OPENAI_BASE_URL": "http://llm.local/v1",
    "OPENAI_MODEL": "gpt-test",
}
LLM = "llm:\n  provider: openai\n"


def llm_of(p: Playbook) -> dict[str, Any]:
    """The llm section of a playbook that has one."""
    assert p.llm is not None
    return p.llm


def parse(front: str, body: str = "Hello.", env: dict[str, str] | None = None) -> Playbook:
    """Parse a playbook built from front matter and body text."""
    return parse_playbook(f"---\n{front}---\n{body}", env or {}, "t.md")


class ResolveTests(SynchronousTestCase):
    """Name resolution (§1)."""

    def test_inline(self) -> None:
        """Text whose trimmed form starts with --- is inline (None)."""
        self.assertIsNone(resolve_playbook_path("  \n---\nllm: {}\n---\n"))

    def test_relative_name(self) -> None:
        """A bare name is looked up under config/playbook."""
        self.assertEqual(resolve_playbook_path("a.md"), "config/playbook/a.md")

    def test_prefixed_and_absolute(self) -> None:
        """A config/playbook/ prefixed or absolute value is used as-is."""
        self.assertEqual(resolve_playbook_path("config/playbook/a.md"), "config/playbook/a.md")
        self.assertEqual(resolve_playbook_path("/srv/a.md"), "/srv/a.md")

    def test_missing_file(self) -> None:
        """A missing file raises PlaybookNotFound naming the path."""
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(PlaybookNotFound) as cm:
                load_playbook("nope.md", {}, base_dir=d)
        self.assertIn("nope.md", str(cm.exception))

    def test_reads_anew(self) -> None:
        """Each load reads the file again, so edits take effect."""
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "p.md")
            Path(path).write_text(f"---\n{LLM}greeting: one\n---\nx")
            self.assertEqual(load_playbook("p.md", {}, base_dir=d).greeting, "one")
            Path(path).write_text(f"---\n{LLM}greeting: two\n---\nx")
            self.assertEqual(load_playbook("p.md", {}, base_dir=d).greeting, "two")

    def test_inline_load(self) -> None:
        """Inline text is parsed directly with source <inline>."""
        p = load_playbook(f"\n---\n{LLM}---\nBe brief.", {})
        self.assertEqual((p.source, llm_of(p)["prompt"]), ("<inline>", "Be brief."))


class PlaybookCacheTests(SynchronousTestCase):
    """A playbook file is parsed once, and again only when it or the environment it used changed."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "p.md")
        Path(self.path).write_text(f"---\n{LLM}greeting: ${{ACTIVECALL_GREETING}} one\n---\nx")
        self.cache = PlaybookCache(base_dir=self.dir)

    def touch(self, delta_ns: int = 1_000_000_000) -> None:
        """Move the file's mtime on, as an edit a second later would."""
        st = os.stat(self.path)
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + delta_ns))

    def test_unchanged_file_parsed_once(self) -> None:
        """Two loads of an unchanged file return the one parsed playbook."""
        env = {"ACTIVECALL_GREETING": "Hi"}
        first = self.cache.load("p.md", env)
        self.assertEqual(first.greeting, "Hi one")
        self.assertIs(self.cache.load("p.md", env), first)

    def test_touched_file_parsed_again(self) -> None:
        """A new mtime parses the file again and picks up its new text."""
        first = self.cache.load("p.md", {})
        self.touch()
        second = self.cache.load("p.md", {})
        self.assertIsNot(second, first)
        self.assertIs(self.cache.load("p.md", {}), second)
        Path(self.path).write_text(f"---\n{LLM}greeting: two\n---\nx")
        self.touch()
        self.assertEqual(self.cache.load("p.md", {}).greeting, "two")

    def test_edit_of_another_size_parsed_again(self) -> None:
        """An edit that changes the size is seen even when the mtime did not move."""
        self.cache.load("p.md", {})
        st = os.stat(self.path)
        Path(self.path).write_text(f"---\n{LLM}greeting: a longer greeting\n---\nx")
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.assertEqual(self.cache.load("p.md", {}).greeting, "a longer greeting")

    def test_environment_change_parsed_again(self) -> None:
        """A variable the playbook expands (or one it could have read) changing parses it again."""
        first = self.cache.load("p.md", {"ACTIVECALL_GREETING": "Hi"})
        self.assertIs(self.cache.load("p.md", {"ACTIVECALL_GREETING": "Hi", "UNRELATED": "1"}), first)
        self.assertEqual(self.cache.load("p.md", {"ACTIVECALL_GREETING": "Hello"}).greeting, "Hello one")
        self.assertEqual(self.cache.load("p.md", {}).greeting, "${ACTIVECALL_GREETING} one")
        # The llm fill-ins read OPENAI_* even though the file names none of them.
        self.assertEqual(llm_of(self.cache.load("p.md", OPENAI_ENV))["model"], "gpt-test")

    def test_env_prefix_is_part_of_the_key(self) -> None:
        """The same file under another [api] env_prefix expands differently."""
        env = {"ACTIVECALL_GREETING": "Hi"}
        self.assertEqual(self.cache.load("p.md", env).greeting, "Hi one")
        self.assertEqual(self.cache.load("p.md", env, env_prefix="CORP_").greeting, "one")

    def test_missing_and_broken_files_fail_every_time(self) -> None:
        """A missing file raises PlaybookNotFound; a broken one, fixed, loads at the next call."""
        with self.assertRaises(PlaybookNotFound):
            self.cache.load("nope.md", {})
        Path(self.path).write_text("no front matter")
        self.touch()
        with self.assertRaises(PlaybookError):
            self.cache.load("p.md", {})
        Path(self.path).write_text(f"---\n{LLM}greeting: fixed\n---\nx")
        self.touch(2_000_000_000)
        self.assertEqual(self.cache.load("p.md", {}).greeting, "fixed")

    def test_inline_text_parsed_once(self) -> None:
        """Inline text is parsed once per text."""
        text = f"\n---\n{LLM}---\nBe brief."
        first = self.cache.load(text, {})
        self.assertEqual(first.source, "<inline>")
        self.assertIs(self.cache.load(text, {}), first)


class DefaultPlaybookTests(SynchronousTestCase):
    """The shipped etc/playbook/default.md."""

    def test_with_env(self) -> None:
        """With OPENAI_* set, ${VAR}s expand and the options are built."""
        p = load_playbook(DEFAULT_MD, OPENAI_ENV)
        self.assertEqual(llm_of(p)["apiKey"], "sk-test")
        self.assertEqual(llm_of(p)["model"], "gpt-test")
        self.assertEqual(llm_of(p)["baseUrl"], "http://llm.local/v1")
        assert p.option.tts is not None and p.option.asr is not None and p.option.vad is not None
        self.assertEqual(p.option.tts.provider, "piper")
        self.assertEqual(p.option.asr.provider, "whisper")
        self.assertEqual(p.option.vad.type, "silero")
        self.assertEqual(p.initial_scene, "menu")
        # llm.optional: the prompt stays the model's; the scenes stay what the IVR says.
        self.assertTrue(llm_of(p)["prompt"].startswith("You are the activecall demo assistant"))
        self.assertIn("activecall demo", p.greeting or "")
        self.assertFalse(p.ivr)
        self.assertEqual(p.warnings, ())

    def test_without_env(self) -> None:
        """Without the env vars it is an offline IVR: no model at all."""
        p = load_playbook(DEFAULT_MD, {})
        self.assertTrue(p.ivr)
        self.assertIsNone(p.llm)
        self.assertEqual(set(p.scenes["menu"].dtmf), {"0", "1", "2", "nomatch", "timeout"})


class ParsingTests(SynchronousTestCase):
    """File structure, ${VAR} and the --- rule (§2, §3.1)."""

    def test_must_begin_with_dashes(self) -> None:
        """A leading blank line or a BOM is a load error."""
        for text in (f"\n---\n{LLM}---\nx", f"\ufeff---\n{LLM}---\nx"):
            with self.assertRaises(PlaybookError) as cm:
                parse_playbook(text, {}, "x.md")
            self.assertIn("x.md:1: a playbook must begin with '---'", str(cm.exception))

    def test_no_closing(self) -> None:
        """Front matter without a second --- is a load error."""
        self.assertRaises(PlaybookError, parse_playbook, f"---\n{LLM}", {}, "x.md")

    def test_cut_anywhere(self) -> None:
        """The second --- ends the YAML even inside a string; later --- are body text."""
        p = parse(f"{LLM}greeting: a---b\n", body="x")
        # YAML is cut at "a", the rest is body.
        self.assertEqual(p.greeting, "a")
        self.assertEqual(p.scenes["default"].prompt, "b\n---\nx")

    def test_env_expansion(self) -> None:
        """${VAR} expands in the front matter (unquoted numbers work) but not in the body."""
        p = parse("tts:\n  speed: ${ACTIVECALL_S}\n" + LLM + "  model: ${ACTIVECALL_NOPE}\n", "say ${ACTIVECALL_S}",
                  {"ACTIVECALL_S": "1.5"})
        assert p.option.tts is not None
        self.assertEqual(p.option.tts.speed, 1.5)
        # Left verbatim (§3.1), which for the llm's endpoint keys means unset (the environment may fill them).
        self.assertEqual(llm_of(p)["model"], "")
        self.assertEqual(llm_of(p)["prompt"], "say ${ACTIVECALL_S}")

    def test_expand_env(self) -> None:
        """expand_env replaces allowed names, keeps unset allowed ones and empties the others."""
        env = {"ACTIVECALL_A": "1", "HOME": "/root", "OPENAI_MODEL": "m"}
        warnings: list[str] = []
        self.assertEqual(expand_env("${ACTIVECALL_A}-${ACTIVECALL_B}-${}-${HOME}-${PATH}-${OPENAI_MODEL}", env,
                                    warnings=warnings), "1-${ACTIVECALL_B}-${}---m")
        self.assertEqual(len(warnings), 2)
        self.assertIn("${HOME} not expanded", warnings[0])
        self.assertEqual(expand_env("${MY_X}", {"MY_X": "y"}, "MY_"), "y")

    def test_yaml_error_line(self) -> None:
        """A YAML syntax error names the file and line."""
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM + "tts: [1\n")
        self.assertRegex(str(cm.exception), r"^t\.md:\d+: invalid YAML front matter")

    def test_env_fill_only_when_empty(self) -> None:
        """Empty llm apiKey/baseUrl/model are filled from OPENAI_*; given ones are kept."""
        p = parse(LLM + '  model: mine\n  apiKey: ""\n', env=OPENAI_ENV)
        self.assertEqual(llm_of(p)["model"], "mine")
        self.assertEqual(llm_of(p)["apiKey"], "sk-test")
        self.assertEqual(llm_of(p)["baseUrl"], "http://llm.local/v1")


class EnvironmentSecretTests(SynchronousTestCase):
    """${VAR} cannot read the daemon's environment, and provider keys go only to configured base URLs."""

    ENV = {**OPENAI_ENV, "AWS_SECRET_ACCESS_KEY": "aws-secret", "DEEPGRAM_API_KEY": "dg-key",
           "ACTIVECALL_GREETING": "Hi there"}

    def test_other_variables_are_empty_with_a_warning(self) -> None:
        """A variable outside the prefix and the provider list is never expanded, set or not."""
        p = parse(LLM + 'greeting: "k=${AWS_SECRET_ACCESS_KEY} u=${UNSET_THING}"\n', env=self.ENV)
        self.assertEqual(p.greeting, "k= u=")
        self.assertEqual(len(p.warnings), 2)
        self.assertNotIn("aws-secret", repr(p))

    def test_prefixed_variables_expand(self) -> None:
        """Variables starting with api.env_prefix expand anywhere in the front matter."""
        self.assertEqual(parse(LLM + "greeting: ${ACTIVECALL_GREETING}\n", env=self.ENV).greeting, "Hi there")
        p = parse_playbook(f"---\n{LLM}greeting: ${{MYCO_G}}\n---\nx", {"MYCO_G": "g", "ACTIVECALL_GREETING": "no"},
                           "t.md", env_prefix="MYCO_")
        self.assertEqual(p.greeting, "g")

    def test_provider_key_in_llm_api_key_to_configured_base(self) -> None:
        """${OPENAI_API_KEY} expands in llm.apiKey when baseUrl is unset or the configured one."""
        for base in ("", "  baseUrl: http://llm.local/v1/\n"):
            p = parse(LLM + base + "  apiKey: ${OPENAI_API_KEY}\n", env=self.ENV)
            self.assertEqual(llm_of(p)["apiKey"], "sk-test", base)
            self.assertEqual(p.warnings, ())

    def test_provider_key_to_another_base_url_is_refused(self) -> None:
        """With llm.baseUrl pointing elsewhere neither ${OPENAI_API_KEY} nor the env fill-in sends the key."""
        p = parse(LLM + "  baseUrl: https://collector.evil/v1\n  apiKey: ${OPENAI_API_KEY}\n", env=self.ENV)
        self.assertEqual(llm_of(p)["apiKey"], "")
        self.assertIn("llm.apiKey: ${OPENAI_API_KEY} not expanded", p.warnings[0])
        p = parse(LLM + "  baseUrl: https://collector.evil/v1\n", env=self.ENV)
        self.assertNotIn("apiKey", llm_of(p))
        # Without OPENAI_BASE_URL the configured base is api.openai.com.
        p = parse(LLM + "  baseUrl: https://collector.evil/v1\n", env={"OPENAI_API_KEY": "sk-test"})
        self.assertNotIn("apiKey", llm_of(p))

    def test_provider_key_outside_key_fields_is_empty(self) -> None:
        """A provider key in a greeting, a header, a URL or inside a longer value is dropped."""
        front = (LLM + 'greeting: "key ${OPENAI_API_KEY}"\n'
                 "sip:\n  headers:\n    X-Key: ${DEEPGRAM_API_KEY}\n"
                 "posthook:\n  url: https://hook.evil/?k=${OPENAI_API_KEY}\n"
                 "tts:\n  provider: openai\n  secretKey: Bearer ${OPENAI_API_KEY}\n")
        p = parse(front, env=self.ENV)
        self.assertEqual(p.greeting, "key ")
        assert p.option.sip is not None and p.option.sip.headers is not None and p.option.tts is not None
        self.assertEqual(p.option.sip.headers["X-Key"], "")
        self.assertEqual(p.front_matter["posthook"]["url"], "https://hook.evil/?k=")
        self.assertEqual(p.option.tts.secret_key, "Bearer ")
        # Only llm.apiKey (filled for the configured base URL) holds the key.
        self.assertNotIn("sk-test", repr({k: v for k, v in p.front_matter.items() if k != "llm"}))
        self.assertEqual(len(p.warnings), 4)

    def test_section_key_only_without_own_endpoint(self) -> None:
        """tts.secretKey: ${OPENAI_API_KEY} expands without tts.endpoint, not with one."""
        ok = parse(LLM + "tts:\n  provider: openai\n  secretKey: ${OPENAI_API_KEY}\n", env=self.ENV)
        assert ok.option.tts is not None
        self.assertEqual(ok.option.tts.secret_key, "sk-test")
        bad = parse(LLM + "tts:\n  provider: openai\n  endpoint: https://tts.evil/v1\n  secretKey: ${OPENAI_API_KEY}\n",
                    env=self.ENV)
        assert bad.option.tts is not None
        self.assertEqual(bad.option.tts.secret_key, "")

    def test_operator_llm_key_not_copied_to_sections_with_their_own_endpoint(self) -> None:
        """call_option copies the env-provided llm key into sections without an endpoint only."""
        p = parse(LLM + "tts:\n  provider: openai\n  endpoint: https://tts.evil/v1\n"
                  "asr:\n  provider: openai\n", env=self.ENV)
        option = p.call_option()
        assert option.tts is not None and option.asr is not None
        self.assertIsNone(option.tts.secret_key)
        self.assertEqual(option.asr.secret_key, "sk-test")
        # A key the playbook wrote itself is its own to send anywhere (AC behaviour).
        own = parse(LLM + "  apiKey: sk-own\ntts:\n  provider: openai\n  endpoint: https://tts.other/v1\n",
                    env=self.ENV).call_option()
        assert own.tts is not None
        self.assertEqual(own.tts.secret_key, "sk-own")


class YamlBombTests(SynchronousTestCase):
    """Front matter cannot blow up the loader: no aliases, bounded size and depth."""

    def test_billion_laughs_is_rejected_fast(self) -> None:
        """The exponential alias document is a PlaybookError naming its line, well under a second."""
        import time

        lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        for i in range(1, 9):
            prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
            lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
        start = time.perf_counter()
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM + "\n".join(lines) + "\n")
        self.assertLess(time.perf_counter() - start, 0.5)
        self.assertIn("t.md:4: invalid YAML front matter: YAML anchors and aliases", str(cm.exception))

    def test_recursive_alias_is_a_playbook_error(self) -> None:
        """A self-referencing alias is a PlaybookError, not a RecursionError."""
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM + "x: &x [*x]\n")
        self.assertIn("anchors and aliases", str(cm.exception))

    def test_plain_alias_is_refused(self) -> None:
        """Even a harmless alias is refused, with its line."""
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM + "tts: &t {provider: piper}\nasr:\n  x: 1\n")
        self.assertIn("t.md:4:", str(cm.exception))

    def test_front_matter_size_and_depth_are_bounded(self) -> None:
        """Front matter over 256 KiB, or nested over 64 levels, is a PlaybookError."""
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM + "greeting: '" + "x" * (256 * 1024) + "'\n")
        self.assertIn("front matter larger than", str(cm.exception))
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM + "extra: " + "[" * 5000 + "]" * 5000 + "\n")
        self.assertIn("nested deeper than 64 levels", str(cm.exception))


class ValidationTests(SynchronousTestCase):
    """Wrong types are load errors with clear messages (§2.3); llm is optional (§8.5)."""

    def assertLoadError(self, front: str, expected: str) -> None:
        """Parsing ``front`` raises PlaybookError whose message contains ``expected``."""
        with self.assertRaises(PlaybookError) as cm:
            parse(front)
        self.assertIn(expected, str(cm.exception))

    def test_missing_llm_is_ivr_mode(self) -> None:
        """A playbook without llm loads in IVR mode (§8.5): no llm, no greeting fill-in, prompt from the scene."""
        p = parse("tts:\n  provider: piper\n", "# Scene: menu\nPress 1.\n", env=OPENAI_ENV)
        self.assertIsNone(p.llm)
        self.assertTrue(p.ivr)
        self.assertNotIn("llm", p.front_matter)
        self.assertIsNone(p.greeting)
        self.assertEqual(p.prompt, "Press 1.")
        self.assertFalse(p.llm_key_is_operators)
        self.assertFalse(parse(LLM).ivr)

    def test_llm_types_still_checked(self) -> None:
        """An llm section that is given is still type-checked."""
        self.assertLoadError("llm: [a]\n", "invalid llm: expected a map")

    def test_llm_without_provider(self) -> None:
        """llm.provider is required."""
        self.assertLoadError("llm:\n  model: x\n", "t.md:2: missing field llm.provider")

    def test_option_type(self) -> None:
        """A wrong option type names the key path and its line."""
        self.assertLoadError(
            LLM + "vad:\n  speechPadding: soon\n", "t.md:5: invalid vad.speechPadding"
        )

    def test_denoise_type(self) -> None:
        """denoise must be a boolean."""
        self.assertLoadError(LLM + "denoise: yes please\n", "invalid denoise: expected a boolean")

    def test_followup_without_max(self) -> None:
        """followUp without maxCount is a load error."""
        self.assertLoadError(
            LLM + "followUp:\n  timeout: 5000\n", "t.md:4: missing field followUp.maxCount"
        )

    def test_extract_headers_objects(self) -> None:
        """sip.extract_headers given as objects is a load error."""
        self.assertLoadError(
            LLM + "sip:\n  extract_headers:\n    - {name: X-A, pattern: '.*'}\n",
            "invalid sip.extract_headers",
        )

    def test_llm_types(self) -> None:
        """llm.features must be a list of strings."""
        self.assertLoadError(LLM + "  features: nope\n", "t.md:4: invalid llm.features")

    def test_dtmf_map_types(self) -> None:
        """A global dtmf entry needs an action."""
        self.assertLoadError(LLM + 'dtmf:\n  "1": {scene: a}\n', "missing field dtmf.1.action")

    def test_front_matter_not_map(self) -> None:
        """A front matter that is a list is refused."""
        self.assertLoadError("- a\n", "front matter must be a YAML map")


class KeyTwinTests(SynchronousTestCase):
    """snake/camel twins and doc spellings are accepted with a warning (§4)."""

    def test_twins(self) -> None:
        """ringback_detection, speech_padding, api_key and extractHeaders are renamed."""
        p = parse(
            "llm:\n  provider: o\n  api_key: k\nvad:\n  speech_padding: 300\n"
            "ringback_detection:\n  enabled: true\nsip:\n  extractHeaders: [X-A]\n"
        )
        assert p.option.vad is not None and p.option.sip is not None
        self.assertEqual(p.option.vad.speech_padding, 300)
        self.assertEqual(llm_of(p)["apiKey"], "k")
        self.assertTrue(p.option.ringback_detection and p.option.ringback_detection.enabled)
        self.assertEqual(p.option.sip.extract_headers, ["X-A"])
        self.assertIn("ringback_detection accepted as ringbackDetection", p.warnings)
        self.assertIn("sip.extractHeaders accepted as sip.extract_headers", p.warnings)
        self.assertEqual(len(p.warnings), 4)

    def test_followup_max(self) -> None:
        """followup/max become followUp/maxCount."""
        p = parse(LLM + "followup:\n  timeout: 5000\n  max: 2\n")
        self.assertEqual(p.front_matter["followUp"], {"timeout": 5000, "maxCount": 2})
        self.assertEqual((p.follow_up and p.follow_up.max_count), 2)
        self.assertEqual(len(p.warnings), 2)

    def test_canonical_wins(self) -> None:
        """When both spellings are given the canonical one wins and the twin is reported."""
        p = parse(LLM + "vad:\n  speechPadding: 1\n  speech_padding: 2\n")
        assert p.option.vad is not None
        self.assertEqual(p.option.vad.speech_padding, 1)
        self.assertIn("ignored", p.warnings[0])

    def test_free_form_untouched(self) -> None:
        """Keys inside extra and sip.headers keep their spelling."""
        p = parse(LLM + "extra:\n  my_key: v\nsip:\n  headers:\n    x_snake: v\n")
        self.assertEqual(p.option.extra, {"my_key": "v"})
        assert p.option.sip is not None
        self.assertEqual(p.option.sip.headers, {"x_snake": "v"})
        self.assertEqual(p.warnings, ())


class SceneTests(SynchronousTestCase):
    """Scenes and scene tags (§5)."""

    def test_no_headers(self) -> None:
        """Without headers the whole body is scene default."""
        p = parse(LLM, "  Just talk.  ")
        self.assertEqual(list(p.scenes), ["default"])
        self.assertEqual((p.initial_scene, llm_of(p)["prompt"]), ("default", "Just talk."))

    def test_preamble_is_default_and_initial(self) -> None:
        """Text before the first header becomes the initial scene default."""
        p = parse(LLM, "Intro.\n# Scene: a\nA text\n## Scene: not\n# Scene: b b \nB text")
        self.assertEqual(list(p.scenes), ["default", "a", "b b"])
        self.assertEqual(p.initial_scene, "default")
        self.assertEqual(p.scenes["a"].prompt, "A text\n## Scene: not")

    def test_first_header_initial_and_duplicates(self) -> None:
        """Without a preamble the first header is initial; a duplicate id keeps the last text."""
        p = parse(LLM, "# Scene: a\none\n# Scene: b\ntwo\n# Scene: a\nthree")
        self.assertEqual(p.initial_scene, "a")
        self.assertEqual(p.scenes["a"].prompt, "three")
        self.assertEqual(llm_of(p)["prompt"], "three")

    def test_tags(self) -> None:
        """dtmf, play and followup tags are collected and stripped; other tags stay."""
        body = (
            "# Scene: s\n"
            '<play file="a.wav"/><play file="b.wav"/>\n'
            '<dtmf digit="1" action="goto" scene="x"/>\n'
            '<dtmf digit="0" action="transfer" target="sip:op@h"/>\n'
            '<dtmf digit="9" action="dance"/>\n'
            '<followup timeout="3000" max="2"/>\n'
            'Say hi. <goto scene="x"/>'
        )
        s = parse(LLM, body).scenes["s"]
        self.assertEqual(s.prompt, 'Say hi. <goto scene="x"/>')
        self.assertEqual(s.play, "a.wav")
        self.assertEqual(sorted(s.dtmf), ["0", "1"])
        self.assertEqual(s.dtmf["1"].scene, "x")
        self.assertEqual(s.dtmf["0"].target, "sip:op@h")
        self.assertEqual((s.followup and (s.followup.timeout, s.followup.max_count)), (3000, 2))
        self.assertIn("<play", s.raw)

    def test_empty_body_keeps_llm_prompt(self) -> None:
        """With an empty body there are no scenes and llm.prompt is kept."""
        p = parse(LLM + "  prompt: from yaml\n", "  \n")
        self.assertEqual((p.scenes, p.initial_scene, p.prompt), ({}, None, "from yaml"))


class GreetingAndOptionTests(SynchronousTestCase):
    """Greeting precedence and the call option (§4)."""

    def test_greeting_precedence(self) -> None:
        """Top-level greeting wins over llm.greeting, which is used otherwise."""
        self.assertEqual(parse(LLM + "  greeting: b\ngreeting: a\n").greeting, "a")
        self.assertEqual(parse(LLM + "  greeting: b\n").greeting, "b")
        self.assertIsNone(parse(LLM).greeting)

    def test_only_option_keys(self) -> None:
        """Only option-bearing keys reach the CallOption."""
        p = parse(LLM + "greeting: hi\nrecorder:\n  recorderFile: r.wav\neou:\n  type: x\n")
        self.assertEqual(p.option.to_json().keys(), {"recorder", "eou", "sip", "codec",
                                                      "sampleRate", "enableIpv6", "subscribe"})

    def test_call_option_merge_and_secret(self) -> None:
        """Invite options win, the playbook fills the rest, and empty secretKeys take llm.apiKey."""
        p = parse(LLM + "  apiKey: K\nasr:\n  provider: a\ntts:\n  provider: t\n  secretKey: own\n")
        given = CallOption(asr=TranscriptionOption(provider="mine"))
        merged = p.call_option(given)
        assert merged.asr is not None and merged.tts is not None
        self.assertEqual((merged.asr.provider, merged.asr.secret_key), ("mine", "K"))
        self.assertEqual((merged.tts.provider, merged.tts.secret_key), ("t", "own"))

    def test_huge_integer_is_a_playbook_error(self) -> None:
        """An integer with more digits than Python converts is a PlaybookError with its line."""
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM + "followUp:\n  timeout: 1\n  maxCount: " + "9" * 5000 + "\n")
        self.assertIn("t.md:6: invalid YAML front matter: integer too long", str(cm.exception))


class IvrModeTests(SynchronousTestCase):
    """A playbook without llm (§8.5) still gives a call option and a prompt."""

    def test_call_option_without_llm(self) -> None:
        """call_option merges as usual and copies no key into empty secretKeys."""
        p = parse("asr:\n  provider: a\n", env=OPENAI_ENV)
        merged = p.call_option(CallOption(tts=None))
        assert merged.asr is not None
        self.assertEqual((merged.asr.provider, merged.asr.secret_key), ("a", None))
        self.assertIs(p.call_option(), p.option)

    def test_prompt_without_scenes(self) -> None:
        """Without llm and without a body the prompt is empty."""
        self.assertEqual(parse("greeting: hi\n", "").prompt, "")


class WordsTagTests(SynchronousTestCase):
    """``words=`` on scene <dtmf> tags and the pseudo digits (§5, §8.5)."""

    def test_words_parsed(self) -> None:
        """Phrases are split on |, trimmed, lowercased; empty ones are dropped; the tag is stripped."""
        s = parse_scene("m", 'Menu. <dtmf digit="1" action="goto" scene="sales" words=" Sales | Buy  Something ||"/>')
        self.assertEqual(s.words, {"1": ("sales", "buy something")})
        self.assertEqual(s.dtmf["1"], DtmfAction("goto", scene="sales"))
        self.assertEqual(s.prompt, "Menu.")

    def test_attribute_order_is_lenient(self) -> None:
        """words may come before, between or after scene/target; target before scene is read too."""
        for tag in ('<dtmf digit="2" action="transfer" words="agent" target="sip:a@h"/>',
                    '<dtmf digit="2" action="transfer" target="sip:a@h" words="agent"/>',
                    '<dtmf digit="2" action="transfer" words="agent" scene="x" target="sip:a@h" />'):
            s = parse_scene("m", "Hi." + tag)
            self.assertEqual((s.prompt, s.words, s.dtmf["2"].target), ("Hi.", {"2": ("agent",)}, "sip:a@h"), tag)
        s = parse_scene("m", '<dtmf digit="3" action="goto" target="t" scene="x"/>')
        self.assertEqual(s.dtmf["3"], DtmfAction("goto", scene="x", target="t"))

    def test_without_words_and_ignored_actions(self) -> None:
        """A tag without words= has no phrases; a tag with another action contributes none either."""
        s = parse_scene("m", '<dtmf digit="1" action="goto" scene="a"/><dtmf digit="9" action="dance" words="x"/>')
        self.assertEqual(s.words, {})
        self.assertEqual(list(s.dtmf), ["1"])

    def test_last_tag_for_a_digit_brings_its_words(self) -> None:
        """For a repeated digit the last tag wins, with its own words (none here)."""
        s = parse_scene("m", '<dtmf digit="1" action="goto" scene="a" words="a"/><dtmf digit="1" action="goto" scene="b"/>')
        self.assertEqual((s.dtmf["1"].scene, s.words), ("b", {}))

    def test_bounds(self) -> None:
        """At most MAX_WORDS_PER_TAG phrases per tag; phrases over MAX_WORD_CHARS are dropped."""
        many = "|".join(f"w{i}" for i in range(MAX_WORDS_PER_TAG + 10))
        s = parse_scene("m", f'<dtmf digit="1" action="goto" scene="a" words="{"x" * (MAX_WORD_CHARS + 1)}|{many}"/>')
        self.assertEqual(len(s.words["1"]), MAX_WORDS_PER_TAG)
        self.assertEqual(s.words["1"][0], "w0")
        s = parse_scene("m", f'<dtmf digit="1" action="goto" scene="a" words="{"y" * MAX_WORD_CHARS}"/>')
        self.assertEqual(s.words["1"], ("y" * MAX_WORD_CHARS,))

    def test_pseudo_digits(self) -> None:
        """digit="timeout" and digit="nomatch" are kept as actions (IVR mode's no input / no match)."""
        s = parse("tts: {provider: p}\n", '# Scene: m\nPick. <dtmf digit="timeout" action="hangup"/>'
                  '<dtmf digit="nomatch" action="goto" scene="m"/>').scenes["m"]
        self.assertEqual(s.dtmf, {"timeout": DtmfAction("hangup"), "nomatch": DtmfAction("goto", scene="m")})
        p = parse('dtmf:\n  timeout: {action: hangup}\n')
        self.assertEqual(p.dtmf, {"timeout": DtmfAction("hangup")})

    @settings(max_examples=300, deadline=None)
    @given(
        st.text(alphabet=st.characters(blacklist_characters='"<>'), max_size=12),
        st.lists(st.text(alphabet=st.characters(blacklist_characters='"'), max_size=30), max_size=8),
        st.permutations(["scene", "target", "words"]),
        st.text(max_size=40),
    )
    def test_fuzz_tag(self, digit: str, phrases: list[str], order: list[str], around: str) -> None:
        """Any words= value in any attribute order parses; the tag never stays in the prompt;
        every kept phrase is non-empty, lowercase, trimmed and bounded."""
        values = {"scene": "s", "target": "sip:t@h", "words": "|".join(phrases)}
        attrs = " ".join(f'{k}="{values[k]}"' for k in order)
        tag = f'<dtmf digit="{digit}" action="goto" {attrs}/>'
        s = parse_scene("m", around.replace("<", "") + tag)
        self.assertNotIn("<dtmf", s.prompt)
        self.assertEqual(s.dtmf[digit], DtmfAction("goto", scene="s", target="sip:t@h"))
        kept = s.words.get(digit, ())
        self.assertLessEqual(len(kept), MAX_WORDS_PER_TAG)
        for phrase in kept:
            self.assertTrue(phrase and phrase == phrase.strip() and phrase == phrase.lower())
            self.assertLessEqual(len(phrase), MAX_WORD_CHARS)
        expected = {" ".join(p.split()).lower() for p in "|".join(phrases).split("|")} - {""}
        self.assertLessEqual(set(kept), expected)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=200))
    def test_fuzz_scene_text(self, raw: str) -> None:
        """Any scene text parses into a Scene whose words belong to its goto/transfer/hangup digits."""
        s = parse_scene("m", raw)
        self.assertLessEqual(set(s.words), set(s.dtmf))


class CollectorLoadTests(SynchronousTestCase):
    """dtmfCollectors are built and validated at load (§11.2)."""

    def test_collectors_built(self) -> None:
        """Each collector becomes a CollectorSpec with its pattern compiled."""
        p = parse(LLM + "dtmfCollectors:\n  pin:\n    digits: 4\n    validation:\n      pattern: '^[0-9]+$'\n")
        spec = p.collectors["pin"]
        self.assertIsInstance(spec, CollectorSpec)
        self.assertEqual((spec.min_digits, spec.max_digits), (4, 4))
        assert spec.pattern is not None
        self.assertTrue(spec.pattern.search("1234"))
        self.assertEqual(parse(LLM).collectors, {})

    def test_bad_pattern_names_key_and_line(self) -> None:
        """An invalid validation.pattern is a load error naming file, line and key path."""
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM + "dtmfCollectors:\n  pin:\n    digits: 4\n    validation:\n      pattern: '(['\n")
        self.assertTrue(str(cm.exception).startswith("t.md:8: invalid dtmfCollectors.pin.validation.pattern"),
                        str(cm.exception))
        self.assertEqual(cm.exception.line, 8)

    def test_bad_values_name_key_and_line(self) -> None:
        """minDigits above maxDigits, or zero digits, is a load error naming the key and its line."""
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM + "dtmfCollectors:\n  acct:\n    minDigits: 9\n    maxDigits: 3\n")
        self.assertIn("t.md:6: invalid dtmfCollectors.acct.minDigits", str(cm.exception))
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM + "dtmfCollectors:\n  acct:\n    digits: 0\n")
        self.assertIn("t.md:6: invalid dtmfCollectors.acct.digits", str(cm.exception))

    def test_global_dtmf_action_checked(self) -> None:
        """A global dtmf entry whose action is not goto/transfer/hangup is a load error naming the key."""
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM + 'dtmf:\n  "1": {action: dance}\n')
        self.assertIn("t.md:5: invalid dtmf.1.action: expected one of goto, transfer, hangup", str(cm.exception))


class TemplateCheckAtLoadTests(SynchronousTestCase):
    """Every {{ }} of the file is syntax-checked at load (§3.3)."""

    def test_malformed_template_in_body_names_file_and_line(self) -> None:
        """A broken template in the body is a PlaybookError with the file line."""
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM, "\n# Scene: a\nfine {{ caller }}\nbroken {{ caller + }} more\n# Scene: b\n")
        self.assertEqual((cm.exception.source, cm.exception.line), ("t.md", 8))
        self.assertIn("template error", str(cm.exception))

    def test_malformed_template_in_front_matter(self) -> None:
        """A broken template in the front matter names its line too."""
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM + "greeting: 'hi {% if x %}'\n")
        self.assertTrue(str(cm.exception).startswith("t.md:4: template error"), str(cm.exception))

    def test_refused_construct_is_a_load_error(self) -> None:
        """An include is refused at load, with its line."""
        with self.assertRaises(PlaybookError) as cm:
            parse(LLM, '\na\n{% include "/etc/passwd" %}\n')
        self.assertEqual(cm.exception.line, 7)

    def test_valid_templates_load(self) -> None:
        """Valid templates load; the parsed values keep them literally until rendered."""
        p = parse(LLM + "greeting: 'Hi {{ caller }}'\n", "Hello {{ sip['X-A'] }}{% if vip %} VIP{% endif %}")
        self.assertEqual(p.greeting, "Hi {{ caller }}")
