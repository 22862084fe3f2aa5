"""The LLM's system message: scene prompt, feature snippets, tool instructions, collectors (playbook.md §6).

:func:`load_prompt_texts` reads the feature and tool-instruction texts (blocking file reads:
the engine runs it off the reactor thread, once per call); :func:`system_prompt` is pure and
builds the message again on each scene switch.

A text ``<name>.<language>.md`` is looked up in this order: ``<features_dir>/`` (relative to
the working directory, the operator's texts), the texts shipped in this package's
``features/`` directory, then the same two for ``en``.  Names are ``[a-z_]+`` and languages
tags such as ``zh`` or ``en-US`` (tried whole, then the primary subtag), so no value from a
playbook can reach outside those directories.

Pure module apart from those reads: stdlib only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from activecall.playbook.dtmf import CollectorSpec

__all__ = [
    "BUILTIN_TOOL_INSTRUCTIONS",
    "FEATURES",
    "MAX_FEATURES",
    "MAX_TEXT_BYTES",
    "SHIPPED_FEATURES_DIR",
    "PromptTexts",
    "collector_section",
    "load_prompt_texts",
    "system_prompt",
]

#: The features activecall ships texts for (others are looked up too, in the operator's directory).
FEATURES: tuple[str, ...] = (
    "context_repair", "rolling_summary", "http_tool", "voice_emotion", "emotion_resonance",
    "intent_clarification",
)
#: Where the shipped texts are (package data).
SHIPPED_FEATURES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "features")
#: Features read per call; a longer list is cut with a warning.
MAX_FEATURES = 16
#: Largest text file read; a larger one is skipped with a warning.
MAX_TEXT_BYTES = 64 * 1024
#: Used when no tool-instruction file is found at all (the shipped files missing).
BUILTIN_TOOL_INSTRUCTIONS = (
    "Answer in short spoken sentences. Action tags (not spoken): <hangup/> ends the call, "
    '<refer to="sip:..."/> transfers it, <message body="..."/> sends metadata to the SIP peer, '
    '<play file="..."/> plays audio, <goto scene="..."/> switches scene, '
    '<set_var key="..." value="..."/> remembers a value. To call tools answer only with JSON '
    '{"text": "...", "tools": [{"name": "http", "url": "...", "method": "GET"}]}; '
    "the http result comes back as a system message."
)

_NAME = re.compile(r"[a-z_]{1,64}")
_LANGUAGE = re.compile(r"[a-z]{2,8}(?:-[a-z0-9]{1,8}){0,3}")


@dataclass(frozen=True)
class PromptTexts:
    """What :func:`load_prompt_texts` found: snippets in feature order, and why any was skipped."""

    snippets: tuple[str, ...] = ()
    tool_instructions: str = BUILTIN_TOOL_INSTRUCTIONS
    warnings: tuple[str, ...] = ()


def _languages(language: str, warnings: list[str]) -> list[str]:
    tag = language.strip().lower().replace("_", "-")
    if not _LANGUAGE.fullmatch(tag):
        warnings.append(f"llm.language {language[:40]!r} is not a language tag: using en texts")
        return ["en"]
    primary = tag.split("-", 1)[0]
    return list(dict.fromkeys((tag, primary, "en")))


def _read_text(path: str, warnings: list[str]) -> str | None:
    """The trimmed text of ``path``; ``None`` when it is missing or unusable (with a warning then)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        warnings.append(f"cannot read {path}: {e.strerror or e}")
        return None
    if len(data) > MAX_TEXT_BYTES:
        warnings.append(f"{path} skipped: larger than {MAX_TEXT_BYTES} bytes")
        return None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        warnings.append(f"{path} skipped: not UTF-8")
        return None


def _find(name: str, languages: Sequence[str], features_dir: str, warnings: list[str]) -> str | None:
    for lang in languages:
        for directory in (features_dir, SHIPPED_FEATURES_DIR):
            text = _read_text(os.path.join(directory, f"{name}.{lang}.md"), warnings)
            if text is not None:
                return text
    return None


def load_prompt_texts(features: Sequence[str], language: str, tool_instructions: str | None,
                      features_dir: str = "features") -> PromptTexts:
    """Read the snippets of ``features`` (``llm.features``) and the tool instructions (§6).

    ``tool_instructions`` (``llm.toolInstructions``) replaces the files entirely when given.
    A feature without any text, or with an invalid name, is skipped with a warning.
    Blocking: call it in a thread.
    """
    warnings: list[str] = []
    languages = _languages(language, warnings)
    names = list(dict.fromkeys(features))
    if len(names) > MAX_FEATURES:
        warnings.append(f"llm.features: only the first {MAX_FEATURES} are used")
        names = names[:MAX_FEATURES]
    snippets: list[str] = []
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            warnings.append(f"llm.features: {str(name)[:40]!r} skipped: names are lowercase letters and _")
            continue
        text = _find(name, languages, features_dir, warnings)
        if text is None:
            warnings.append(f"feature {name}: no text {features_dir}/{name}.{languages[0]}.md, skipped")
        elif text:
            snippets.append(text)
    if tool_instructions is None:
        found = _find("tool_instructions", languages, features_dir, warnings)
        tool_instructions = BUILTIN_TOOL_INSTRUCTIONS if found is None else found
    return PromptTexts(tuple(snippets), tool_instructions, tuple(warnings))


def _details(spec: CollectorSpec) -> str:
    parts: list[str] = []
    if spec.max_digits is not None and spec.min_digits == spec.max_digits:
        parts.append(f"{spec.max_digits} digits")
    else:
        if spec.min_digits:
            parts.append(f"min {spec.min_digits} digits")
        if spec.max_digits is not None:
            parts.append(f"max {spec.max_digits} digits")
    if spec.finish_key:
        parts.append(f"press {spec.finish_key} to finish")
    return ", ".join(parts)


def collector_section(collectors: Mapping[str, CollectorSpec]) -> str:
    """The ``### DTMF Digit Collection`` section; empty without collectors."""
    if not collectors:
        return ""
    lines = [
        "### DTMF Digit Collection",
        "To have the caller enter digits on the keypad, write this tag in your answer:",
        '<collect type="TYPE" var="VAR_NAME" prompt="PROMPT_TEXT" />',
        "TYPE is one of these collectors:",
    ]
    for name in sorted(collectors):
        spec = collectors[name]
        details = _details(spec)
        lines.append(f"- `{name}`: {spec.description or 'No description'}" + (f" ({details})" if details else ""))
    lines += [
        "How it works: PROMPT_TEXT is spoken to the caller, who then answers on the keypad only",
        "(speech is not collected meanwhile). The result arrives as a system message; after a",
        "success the digits can be used as {{ VAR_NAME }}.",
    ]
    return "\n".join(lines) + "\n"


def system_prompt(scene_prompt: str, texts: PromptTexts, collectors: Mapping[str, CollectorSpec]) -> str:
    """The ``system`` message of §6:
    ``<scene prompt>[\\n\\n### Enhanced Capabilities:\\n- <snippet>\\n…]\\n\\n<tool instructions>\\n<collectors>``."""
    out = scene_prompt
    if texts.snippets:
        out += "\n\n### Enhanced Capabilities:\n" + "".join(f"- {s}\n" for s in texts.snippets)
    return out + "\n\n" + texts.tool_instructions + "\n" + collector_section(collectors)
