"""Playbook files: name resolution, parsing, validation and scenes (playbook.md §1–§5).

A playbook is ``---`` + YAML front matter + ``---`` + a Markdown body split
into ``# Scene: <id>`` sections.  :func:`load_playbook` resolves a name (or
inline text), reads the file anew and returns a frozen :class:`Playbook`;
every problem raises :class:`PlaybookError` whose message names the file, the
YAML line when known, and the dotted key path.  :class:`PlaybookCache` does the
same but parses a file again only when it or the environment it read changed.
Loading also checks what would otherwise fail during a call: every ``{{ }}``
template's syntax (§3.3) and the digit collectors (§11.2).  Without ``llm`` the
playbook runs in IVR mode (§8.5).  :func:`render_playbook` is the per-call
``{{ }}`` render of the whole file.

Pure module: stdlib, pyyaml and the pure playbook modules (templates, dtmf), which
import this one and are therefore imported inside functions.  File reading is a
plain blocking ``open`` and ``os.stat``; callers on the reactor thread should load
in a thread.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, Mapping

import yaml  # type: ignore[import-untyped]

from activecall.config import DEFAULT_ENV_PREFIX
from activecall.options import (
    AgcOption,
    AmbianceOption,
    MERGED_OPTION_KEYS,
    CallOption,
    CommandError,
    EouOption,
    RealtimeOption,
    RecorderOption,
    RingbackDetectionOption,
    SipOption,
    SynthesisOption,
    TranscriptionOption,
    VadOption,
    WireObject,
    check_bool,
    check_f32,
    check_map,
    check_str,
    check_str_list,
    check_u64,
    one_of,
)

if TYPE_CHECKING:  # dtmf imports this module; the specs are built by a function-local import
    from activecall.playbook.dtmf import CollectorSpec

__all__ = [
    "DEFAULT_BASE_DIR",
    "DTMF_ACTIONS",
    "MAX_WORDS_PER_TAG",
    "MAX_WORD_CHARS",
    "DtmfAction",
    "FollowUp",
    "PSEUDO_DIGITS",
    "Playbook",
    "PlaybookCache",
    "PlaybookError",
    "PlaybookNotFound",
    "Scene",
    "expand_env",
    "load_playbook",
    "parse_playbook",
    "parse_scene",
    "render_playbook",
    "resolve_playbook_path",
    "split_scenes",
]

DEFAULT_BASE_DIR = "config/playbook"
INLINE_SOURCE = "<inline>"

class PlaybookError(ValueError):
    """A playbook that cannot be loaded; ``str()`` is the full message (file, line, key path)."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None) -> None:
        where = source + (f":{line}" if line is not None and source else "")
        full = f"{where}: {message}" if where else message
        super().__init__(full)
        self.message: str = full
        self.source: str = source
        self.line: int | None = line

    def __str__(self) -> str:
        return self.message


class PlaybookNotFound(PlaybookError):
    """The named playbook file does not exist (§13.3 step 4: ``Reason: Playbook Not Found``)."""


# --- §1 name resolution ----------------------------------------------------------------------


def resolve_playbook_path(value: str, base_dir: str = DEFAULT_BASE_DIR) -> str | None:
    """Return the file path for a playbook name, or ``None`` when ``value`` is inline text."""
    if value.strip().startswith("---"):
        return None
    prefix = base_dir.rstrip("/") + "/"
    if os.path.isabs(value) or value.startswith(prefix):
        return value
    return os.path.join(base_dir, value)


def load_playbook(
    value: str, environ: Mapping[str, str], *, base_dir: str = DEFAULT_BASE_DIR,
    env_prefix: str = DEFAULT_ENV_PREFIX,
) -> Playbook:
    """Resolve ``value`` (§1), read the file anew and parse it; raises PlaybookError."""
    path = resolve_playbook_path(value, base_dir)
    if path is None:
        # Inline text: the trimmed value is what "starts with ---" was tested on.
        return parse_playbook(value.strip(), environ, INLINE_SOURCE, env_prefix=env_prefix)
    return parse_playbook(_read(path), environ, path, env_prefix=env_prefix)


def _read(path: str) -> str:
    try:
        # utf-8, not utf-8-sig: a BOM must stay visible so rule §2.1 rejects it.
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise PlaybookNotFound("playbook not found", source=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlaybookError(f"cannot read playbook: {e}", source=path) from None


class _EnvReads(Mapping[str, str]):
    """The environment as a parse sees it, remembering every variable looked up (set or not)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self.reads: dict[str, str | None] = {}
        self.enumerated = False  # iterated or sized: the reads alone no longer describe what was seen

    def __getitem__(self, name: str) -> str:
        value = self._environ.get(name)
        self.reads[name] = value
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        self.enumerated = True
        return iter(self._environ)

    def __len__(self) -> int:
        self.enumerated = True
        return len(self._environ)


@dataclass(frozen=True)
class _Cached:
    file_id: tuple[int, int, int] | None  # (st_mtime_ns, st_size, st_ino) when read; None: inline text
    env: tuple[tuple[str, str | None], ...]  # every variable the parse looked up, with its value then
    playbook: Playbook
    checked_at: float | None = None  # when the file was last stat'ed unchanged (load's ``now``)


class PlaybookCache:
    """Playbooks by name as :func:`load_playbook` returns them, each file parsed once until it changes.

    A file is parsed again when its ``os.stat`` (mtime in ns, size, inode) differs from
    the one taken before it was last read, or when a variable the parse looked up in
    ``environ`` (``${VAR}`` expansion, the ``llm`` fill-ins) now has another value; inline
    text is parsed once per text. Failed loads are not kept: each raises anew.

    The :class:`Playbook` returned is shared by every call that loads it: treat it as
    read-only. :meth:`load` blocks on the file system; it may run in worker threads at
    once (a race parses a file twice, and the last result is kept).
    """

    def __init__(self, base_dir: str = DEFAULT_BASE_DIR) -> None:
        self._base_dir = base_dir
        self._entries: dict[tuple[str, str], _Cached] = {}

    def recent(self, value: str, environ: Mapping[str, str], now: float, *,
               env_prefix: str = DEFAULT_ENV_PREFIX, max_age_s: float = 1.0) -> Playbook | None:
        """The cached playbook if its file was found unchanged by a :meth:`load` less than ``max_age_s``
        ago and its variables still hold: no file system access, so it may run on the reactor thread."""
        path = resolve_playbook_path(value, self._base_dir)
        cached = self._entries.get((env_prefix, path if path is not None else value))
        if cached is None or cached.checked_at is None or not 0 <= now - cached.checked_at < max_age_s:
            return None
        if not all(environ.get(name) == seen for name, seen in cached.env):
            return None
        return cached.playbook

    def load(self, value: str, environ: Mapping[str, str], *,
             env_prefix: str = DEFAULT_ENV_PREFIX, now: float | None = None) -> Playbook:
        """Resolve ``value`` (§1) and return its parsed playbook; raises PlaybookError.

        ``now`` (seconds on the caller's clock) dates the check, for :meth:`recent`."""
        path = resolve_playbook_path(value, self._base_dir)
        file_id: tuple[int, int, int] | None = None
        if path is not None:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise PlaybookNotFound("playbook not found", source=path) from None
            except OSError as e:
                raise PlaybookError(f"cannot read playbook: {e}", source=path) from None
            file_id = (st.st_mtime_ns, st.st_size, st.st_ino)
        key = (env_prefix, path if path is not None else value)
        cached = self._entries.get(key)
        if (cached is not None and cached.file_id == file_id
                and all(environ.get(name) == seen for name, seen in cached.env)):
            if now is not None:
                self._entries[key] = dataclasses.replace(cached, checked_at=now)
            return cached.playbook
        env = _EnvReads(environ)
        if path is None:
            playbook = parse_playbook(value.strip(), env, INLINE_SOURCE, env_prefix=env_prefix)
        else:
            # The stat was taken before the read: a change in between is seen at the next load.
            playbook = parse_playbook(_read(path), env, path, env_prefix=env_prefix)
        if not env.enumerated:
            self._entries[key] = _Cached(file_id, tuple(env.reads.items()), playbook, now)
        return playbook


# --- §3.1 ${VAR} -----------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\{([^}]+)\}")
# Provider variables from config.md §15 that are no secret: they expand anywhere.
PROVIDER_ENV_VARS = frozenset({"OPENAI_BASE_URL", "OPENAI_MODEL", "TENCENT_APPID", "VOICEAPI_ENDPOINT",
                               "VOICEAPI_SPEAKER_ID"})
# Provider keys (config.md §15): they expand only where they go to the configured base URL.
PROVIDER_SECRET_VARS = frozenset({"OPENAI_API_KEY", "DASHSCOPE_API_KEY", "TENCENT_SECRET_ID", "TENCENT_SECRET_KEY",
                                  "DEEPGRAM_API_KEY"})
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Sections whose key fields may hold a provider key, when the section names no endpoint of its own.
_KEYED_SECTIONS = ("asr", "tts", "realtime", "eou")
_KEY_FIELDS = ("secretKey", "apiKey", "secretId")


def expand_env(text: str, environ: Mapping[str, str], env_prefix: str = DEFAULT_ENV_PREFIX,
               warnings: list[str] | None = None) -> str:
    """Replace each allowed ``${NAME}`` by ``environ[NAME]`` (docs/security.md).

    Allowed: names starting with ``env_prefix`` and the non-secret provider variables; unset,
    they stay verbatim (§3.1). Provider keys stay verbatim here for :func:`_place_secrets`.
    Any other name becomes empty, set or not (no probing the environment), with a warning.
    """

    def replace(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in PROVIDER_SECRET_VARS:
            return m.group(0)
        if name.startswith(env_prefix) or name in PROVIDER_ENV_VARS:
            return environ.get(name, m.group(0))
        if warnings is not None:
            warnings.append(f"${{{name}}} not expanded: only variables starting with {env_prefix} "
                            "(api.env_prefix) and provider variables may be used")
        return ""

    return _ENV_REF.sub(replace, text)


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def _llm_goes_to_configured_base(llm: Any, environ: Mapping[str, str]) -> bool:
    """Whether the playbook's LLM talks to the operator's OpenAI base URL (its own or none)."""
    base = llm.get("baseUrl") if isinstance(llm, dict) else None
    return not base or _same_url(str(base), environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL)


def _secret_allowed_at(fm: dict[str, Any], path: tuple[str, ...], environ: Mapping[str, str]) -> bool:
    if path == ("llm", "apiKey"):
        return _llm_goes_to_configured_base(fm.get("llm"), environ)
    if len(path) == 2 and path[0] in _KEYED_SECTIONS and path[1] in _KEY_FIELDS:
        section = fm.get(path[0])
        return isinstance(section, dict) and not section.get("endpoint")
    return False


def _place_secrets(fm: dict[str, Any], environ: Mapping[str, str], warnings: list[str]) -> dict[str, Any]:
    """Expand provider keys where they are allowed (the whole value of a key field going to a
    configured base URL); anywhere else they become empty with a warning."""

    def walk(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*path, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*path, str(i))) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        m = _ENV_REF.fullmatch(value.strip())
        if m is not None and m.group(1) in PROVIDER_SECRET_VARS and _secret_allowed_at(fm, path, environ):
            return environ.get(m.group(1), value)

        def drop(ref: re.Match[str]) -> str:
            if ref.group(1) not in PROVIDER_SECRET_VARS:
                return ref.group(0)
            warnings.append(f"{'.'.join(path)}: ${{{ref.group(1)}}} not expanded: a provider key may only be "
                            "the whole value of a key field sent to the configured base URL")
            return ""

        return _ENV_REF.sub(drop, value)

    result: dict[str, Any] = walk(fm, ())
    return result


# --- §5 scenes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DtmfAction:
    """One keypad action (§11.1): ``goto`` a scene, ``transfer`` to a target, or ``hangup``."""

    action: str
    scene: str | None = None
    target: str | None = None


@dataclass(frozen=True, slots=True)
class FollowUp:
    """Re-prompt policy on caller silence (§10): ``timeout`` ms, at most ``max_count`` in a row."""

    timeout: int
    max_count: int


@dataclass(frozen=True, slots=True)
class Scene:
    """One ``# Scene:`` section: prompt without tags, its DTMF map, entry audio and follow-up."""

    id: str
    prompt: str
    raw: str
    dtmf: Mapping[str, DtmfAction] = field(default_factory=dict)
    play: str | None = None
    followup: FollowUp | None = None
    # digit -> spoken phrases (lowercased, trimmed) from ``words="a|b"`` (activecall, §5, §8.5)
    words: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


DTMF_ACTIONS: tuple[str, ...] = ("goto", "transfer", "hangup")
#: ``digit`` values that no key produces: no input, no match, and a collector's outcome (§8.5).
PSEUDO_DIGITS: tuple[str, ...] = ("timeout", "nomatch", "collected", "failed")
#: Bounds of one tag's ``words=``: phrases kept, and the longest phrase (longer ones are dropped).
MAX_WORDS_PER_TAG = 64
MAX_WORD_CHARS = 100
_SCENE_HEADER = "# Scene:"
# AC's grammar is digit, action, then scene and target in that order; activecall also takes
# ``words`` and reads the optional attributes in any order (the first of a repeated name wins).
_DTMF_TAG = re.compile(
    r'<dtmf\s+digit="([^"]*)"\s+action="([^"]*)"'
    r'((?:\s+(?:scene|target|words)="[^"]*")*)\s*/>'
)
_DTMF_ATTR = re.compile(r'(scene|target|words)="([^"]*)"')
_PLAY_TAG = re.compile(r'<play\s+file="([^"]*)"\s*/>')
_FOLLOWUP_TAG = re.compile(r'<followup\s+timeout="(\d+)"\s+max="(\d+)"\s*/>')


def parse_scene(scene_id: str, raw: str) -> Scene:
    """Build a Scene from its raw text: collect and strip the dtmf/play/followup tags (§5).

    A ``<dtmf>`` tag's ``words="a|b"`` (activecall) become :attr:`Scene.words` for its digit:
    trimmed, lowercased, empty and over-long (:data:`MAX_WORD_CHARS`) phrases dropped, at most
    :data:`MAX_WORDS_PER_TAG` kept.
    """
    dtmf: dict[str, DtmfAction] = {}
    words: dict[str, tuple[str, ...]] = {}
    for m in _DTMF_TAG.finditer(raw):
        digit, action, attr_text = m.groups()
        attrs: dict[str, str] = {}
        for a in _DTMF_ATTR.finditer(attr_text):
            attrs.setdefault(a.group(1), a.group(2))
        # Tags with other actions are stripped but do nothing.
        if action in DTMF_ACTIONS:
            dtmf[digit] = DtmfAction(action=action, scene=attrs.get("scene"), target=attrs.get("target"))
            phrases = _phrases(attrs.get("words", ""))
            words.pop(digit, None)  # the tag kept for a digit (the last) brings its own words
            if phrases:
                words[digit] = phrases
    play_match = _PLAY_TAG.search(raw)
    follow_match = _FOLLOWUP_TAG.search(raw)
    prompt = _FOLLOWUP_TAG.sub("", _PLAY_TAG.sub("", _DTMF_TAG.sub("", raw))).strip()
    return Scene(
        id=scene_id,
        prompt=prompt,
        raw=raw,
        dtmf=dtmf,
        play=play_match.group(1) if play_match else None,
        followup=(
            FollowUp(timeout=int(follow_match.group(1)), max_count=int(follow_match.group(2)))
            if follow_match
            else None
        ),
        words=words,
    )


def _phrases(value: str) -> tuple[str, ...]:
    """``"Sales| buy something |"`` -> ``("sales", "buy something")``: bounded, deduplicated."""
    out: list[str] = []
    for part in value.split("|"):
        phrase = " ".join(part.split()).lower()
        if phrase and len(phrase) <= MAX_WORD_CHARS and phrase not in out:
            out.append(phrase)
            if len(out) == MAX_WORDS_PER_TAG:
                break
    return tuple(out)


def split_scenes(body: str) -> tuple[dict[str, Scene], str | None]:
    """Split a body into scenes; return them and the initial scene id (None for an empty body)."""
    body = body.strip()
    if not body:
        return {}, None
    sections: list[tuple[str, list[str]]] = []
    preamble: list[str] = []
    for line in body.split("\n"):
        if line.startswith(_SCENE_HEADER):
            sections.append((line[len(_SCENE_HEADER) :].strip(), []))
        elif sections:
            sections[-1][1].append(line)
        else:
            preamble.append(line)
    scenes: dict[str, Scene] = {}
    initial: str | None = None
    pre_text = "\n".join(preamble).strip()
    # Text before the first header is its own scene "default", not a shared prompt.
    if pre_text:
        scenes["default"] = parse_scene("default", pre_text)
        initial = "default"
    for scene_id, lines in sections:
        scenes[scene_id] = parse_scene(scene_id, "\n".join(lines).strip())  # last wins
        if initial is None:
            initial = scene_id
    return scenes, initial


# --- §4 schema: key normalization ------------------------------------------------------------

# A schema maps each canonical key to the schema of its value (None = leaf or
# free-form map whose keys are left alone); "*" means "every key of this map".
_Schema = dict[str, Any]


def _wire_schema(cls: type[WireObject]) -> _Schema:
    keys: _Schema = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        spec = f.metadata.get("wire")
        if spec is not None:
            for key in (spec.key, *spec.aliases):
                keys[key] = None
    return keys


_UNEXPANDED = re.compile(r"\$\{[^}]+\}")
_LLM_FIELDS = (
    "provider", "model", "baseUrl", "apiKey", "prompt", "greeting", "language",
    "features", "repairWindowMs", "summaryLimit", "toolInstructions",
    "timeoutMs", "totalTimeoutMs", "apology", "onError", "temperature", "maxTokens", "toolMode", "optional",
)  # fmt: skip
_COLLECTOR_SCHEMA: _Schema = {
    **dict.fromkeys(
        ("description", "digits", "minDigits", "maxDigits", "finishKey", "timeout",
         "interDigitTimeout", "retryTimes", "interruptible")  # fmt: skip
    ),
    "validation": dict.fromkeys(("pattern", "errorMessage")),
}
_SCHEMA: _Schema = {
    "asr": _wire_schema(TranscriptionOption),
    "tts": _wire_schema(SynthesisOption),
    "vad": _wire_schema(VadOption),
    "agc": _wire_schema(AgcOption),
    "recorder": _wire_schema(RecorderOption),
    "realtime": _wire_schema(RealtimeOption),
    "eou": _wire_schema(EouOption),
    "sip": _wire_schema(SipOption),
    "ambiance": _wire_schema(AmbianceOption),
    "ringbackDetection": _wire_schema(RingbackDetectionOption),
    "denoise": None,
    "extra": None,
    "greeting": None,
    "llm": dict.fromkeys(_LLM_FIELDS),
    "interruption": dict.fromkeys(
        ("strategy", "ignoreFirstMs", "fillerWordFilter", "volumeFadeMs", "minSpeechMs")
    ),
    "followUp": dict.fromkeys(("timeout", "maxCount")),
    "dtmf": {"*": dict.fromkeys(("action", "scene", "target"))},
    "dtmfCollectors": {"*": _COLLECTOR_SCHEMA},
    "posthook": dict.fromkeys(
        ("url", "summary", "method", "headers", "includeHistory", "timeout")
    ),
}
# Spellings from AC's docs and examples (§4), accepted with a warning.
_DOC_SPELLINGS = {"followup": "followUp", "max": "maxCount"}
_UPPER = re.compile(r"[A-Z]")


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _snake(key: str) -> str:
    return _UPPER.sub(lambda m: "_" + m.group(0).lower(), key)


def _canonical(key: object, schema: _Schema) -> object:
    """The schema spelling of ``key`` (itself when known or unknown)."""
    if not isinstance(key, str) or key in schema:
        return key
    for twin in (_DOC_SPELLINGS.get(key), _camel(key), _snake(key)):
        if twin is not None and twin in schema:
            return twin
    return key


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _normalize(value: Any, schema: _Schema | None, path: str, warnings: list[str]) -> Any:
    """Rename snake/camel twins to the schema spelling, recording a warning for each."""
    if schema is None or not isinstance(value, dict):
        return value
    if "*" in schema:
        # Name -> item maps (dtmf digits, collector names); YAML may give digits as ints.
        return {
            str(k): _normalize(v, schema["*"], _join(path, k), warnings) for k, v in value.items()
        }
    out: dict[Any, Any] = {}
    for key, item in value.items():
        canon = _canonical(key, schema)
        if canon != key:
            if canon in value:
                warnings.append(
                    f"{_join(path, key)} ignored: {_join(path, canon)} is also given"
                )
                continue
            warnings.append(f"{_join(path, key)} accepted as {_join(path, canon)}")
        sub = schema.get(canon) if isinstance(canon, str) else None
        out[canon] = _normalize(item, sub, _join(path, canon), warnings)
    return out


def _line_of(path: str, lines: Mapping[str, int]) -> int | None:
    """The line of the deepest known key on a dotted ``path`` (a missing key points at its parent)."""
    parts = path.split(".")
    while parts:
        line = lines.get(".".join(parts))
        if line is not None:
            return line
        parts.pop()
    return None


def _key_lines(node: yaml.Node, schema: _Schema | None, path: str, out: dict[str, int]) -> None:
    """Record the 1-based line of every mapping key, under its normalized dotted path."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        raw = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if raw is None:
            continue
        if schema is not None and "*" in schema:
            canon: object = raw
            sub = schema["*"]
        elif schema is not None:
            canon = _canonical(raw, schema)
            sub = schema.get(canon) if isinstance(canon, str) else None
        else:
            canon, sub = raw, None
        child = _join(path, canon)
        # The front matter starts right after "---" on line 1, so YAML line 0 is file line 1.
        out.setdefault(child, key_node.start_mark.line + 1)
        _key_lines(value_node, sub, child, out)


# --- §4 schema: types --------------------------------------------------------------------------

Checker = Callable[[Any, str], Any]
_Fields = Mapping[str, tuple[Checker, bool]]  # key -> (checker, required)


def _check_fields(obj: Any, path: str, fields: _Fields) -> None:
    if not isinstance(obj, dict):
        raise CommandError.invalid(path, "expected a map")
    for key, (check, required) in fields.items():
        if obj.get(key) is not None:
            check(obj[key], f"{path}.{key}")
        elif required:
            raise CommandError.missing(f"{path}.{key}")


def _map_of(fields: _Fields) -> Checker:
    def check(value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise CommandError.invalid(path, "expected a map")
        for name, item in value.items():
            _check_fields(item, f"{path}.{name}", fields)
        return value

    return check


def _nested(fields: _Fields) -> Checker:
    def check(value: Any, path: str) -> Any:
        _check_fields(value, path, fields)
        return value

    return check


def _int(value: Any, path: str) -> int:
    result: int = check_u64(value, path)
    return result


_LLM_TYPES: _Fields = {
    "provider": (check_str, True),
    "model": (check_str, False),
    "baseUrl": (check_str, False),
    "apiKey": (check_str, False),
    "prompt": (check_str, False),
    "greeting": (check_str, False),
    "language": (check_str, False),
    "features": (check_str_list, False),
    "repairWindowMs": (_int, False),
    "summaryLimit": (_int, False),
    "toolInstructions": (check_str, False),
    # activecall: per-turn limits, what the caller hears when the model fails, the structured channel.
    "timeoutMs": (_int, False),
    "totalTimeoutMs": (_int, False),
    "apology": (check_str, False),
    "onError": (one_of(("continue", "hangup")), False),
    "temperature": (check_f32, False),
    "maxTokens": (_int, False),
    "toolMode": (one_of(("tags", "tools", "json")), False),
    # activecall: use the model only when a base URL or key is configured, else run as an IVR.
    "optional": (check_bool, False),
}
_OTHER_TYPES: _Fields = {
    "greeting": (check_str, False),
    "interruption": (
        _nested(
            {
                "strategy": (one_of(("both", "vad", "asr", "none")), False),
                "ignoreFirstMs": (_int, False),
                "fillerWordFilter": (check_bool, False),
                "volumeFadeMs": (_int, False),
                "minSpeechMs": (_int, False),
            }
        ),
        False,
    ),
    "followUp": (_nested({"timeout": (_int, True), "maxCount": (_int, True)}), False),
    "dtmf": (
        _map_of(
            {
                "action": (one_of(DTMF_ACTIONS), True),
                "scene": (check_str, False),
                "target": (check_str, False),
            }
        ),
        False,
    ),
    "dtmfCollectors": (
        _map_of(
            {
                "description": (check_str, False),
                "digits": (_int, False),
                "minDigits": (_int, False),
                "maxDigits": (_int, False),
                "finishKey": (one_of(("#", "*")), False),
                "timeout": (_int, False),
                "interDigitTimeout": (_int, False),
                "validation": (
                    _nested({"pattern": (check_str, True), "errorMessage": (check_str, False)}),
                    False,
                ),
                "retryTimes": (_int, False),
                "interruptible": (check_bool, False),
            }
        ),
        False,
    ),
    "posthook": (
        _nested(
            {
                "url": (check_str, True),
                "summary": (check_str, False),
                "method": (check_str, False),
                "headers": (check_map, False),
                "includeHistory": (check_bool, False),
                "timeout": (_int, False),
            }
        ),
        False,
    ),
}
_ERROR_PATH = re.compile(r"^(?:invalid|missing field) ([^:\s]+)")


# --- the playbook ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Playbook:
    """A parsed playbook.

    ``front_matter`` is after ``${VAR}`` expansion, key normalization and the
    ``llm`` fill-ins (§2.5); ``option`` holds the option-bearing keys (§4);
    ``text`` is the file as read, for the load-time ``{{ }}`` render (§3.3).
    ``llm`` is ``None`` for a playbook without one: IVR mode (§8.5).
    ``collectors`` are the ``dtmfCollectors`` with their defaults applied and patterns compiled.
    """

    source: str
    text: str
    front_matter: dict[str, Any]
    option: CallOption
    greeting: str | None
    llm: dict[str, Any] | None
    scenes: dict[str, Scene]
    initial_scene: str | None
    dtmf: Mapping[str, DtmfAction] = field(default_factory=dict)
    follow_up: FollowUp | None = None
    warnings: tuple[str, ...] = ()
    # llm.apiKey is the operator's OPENAI_API_KEY: it is not copied to sections with their own endpoint.
    llm_key_is_operators: bool = False
    collectors: Mapping[str, CollectorSpec] = field(default_factory=dict)

    @property
    def ivr(self) -> bool:
        """True without an ``llm`` section: scene texts are spoken, no model is called (§8.5)."""
        return self.llm is None

    @property
    def prompt(self) -> str:
        """The initial system prompt: the initial scene's, else ``llm.prompt``, else empty."""
        if self.initial_scene is not None:
            return self.scenes[self.initial_scene].prompt
        prompt = self.llm.get("prompt") if self.llm is not None else None
        return prompt if isinstance(prompt, str) else ""

    def call_option(self, given: CallOption | None = None) -> CallOption:
        """The call's option: ``given`` (invite/accept) filled from the playbook's (§4),
        then empty ``secretKey`` of asr/tts/realtime/eou set to ``llm.apiKey`` (the operator's
        key only where the section names no endpoint of its own)."""
        merged = self.option if given is None else given.merged_over(self.option)
        api_key = self.llm.get("apiKey") if self.llm is not None else None
        if not api_key:
            return merged
        changes: dict[str, Any] = {}
        for name in ("asr", "tts", "realtime", "eou"):
            sub = getattr(merged, name)
            if sub is None or sub.secret_key:
                continue
            if self.llm_key_is_operators and getattr(sub, "endpoint", None):
                continue
            changes[name] = dataclasses.replace(sub, secret_key=api_key)
        return dataclasses.replace(merged, **changes) if changes else merged


MAX_FRONT_MATTER_CHARS = 256 * 1024
MAX_YAML_DEPTH = 64


class _PlaybookLoader(yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader without anchors and aliases (a few hundred bytes of aliases expand to
    gigabytes, "billion laughs", and a recursive alias recurses forever) and with bounded nesting."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "YAML anchors and aliases (& and *) are not allowed", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


    def construct_bounded_int(self, node: Any) -> int:
        try:
            value: int = self.construct_yaml_int(node)
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
            raise yaml.constructor.ConstructorError(None, None, "integer too long", node.start_mark) from None
        return value


_PlaybookLoader.add_constructor("tag:yaml.org,2002:int", _PlaybookLoader.construct_bounded_int)


def _load_yaml(text: str) -> tuple[Any, Any]:
    """The composed node (for key lines) and the data of one YAML document."""
    loader = _PlaybookLoader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def _split(text: str, source: str) -> tuple[str, str]:
    """Cut at the first two ``---`` anywhere (§2.2): (yaml text, body)."""
    if not text.startswith("---"):
        hint = " (found a byte-order mark)" if text.startswith("\ufeff") else ""
        raise PlaybookError(f"a playbook must begin with '---'{hint}", source=source, line=1)
    end = text.find("---", 3)
    if end < 0:
        raise PlaybookError("front matter has no closing '---'", source=source)
    return text[3:end], text[end + 3 :]


def parse_playbook(text: str, environ: Mapping[str, str], source: str, *,
                   env_prefix: str = DEFAULT_ENV_PREFIX) -> Playbook:
    """Parse playbook ``text`` read from ``source`` (used in messages); raises PlaybookError.

    Only allowed ``${VAR}`` expand (:func:`expand_env`, ``env_prefix`` = ``[api] env_prefix``).
    Every ``{{ }}`` of the file is syntax-checked (§3.3), front matter and body apart as
    :func:`render_playbook` renders them, so a broken template is a load error with its file
    line before any call is answered.
    """
    # templates imports this module (PlaybookError): a function-local import breaks the cycle.
    from activecall.playbook.templates import check_template

    yaml_text, body = _split(text, source)
    check_template(yaml_text, source)  # the front matter starts on line 1, right after "---"
    check_template(body, source, first_line=1 + yaml_text.count("\n"))
    warnings: list[str] = []
    yaml_text = expand_env(yaml_text, environ, env_prefix, warnings)
    return _parse_parts(text, yaml_text, body, environ, source, warnings)


def render_playbook(playbook: Playbook, variables: Mapping[str, Any], environ: Mapping[str, str],
                    env_prefix: str = DEFAULT_ENV_PREFIX) -> Playbook:
    """The activecall load-time ``{{ }}`` render of §3.3, for every call.

    Front matter (after ``${VAR}`` expansion, so a caller's value cannot name a variable)
    and body are rendered apart (so a value holding ``---`` cannot move the boundary) and
    parsed again.  ``sip.hangup_headers`` keep their templates (rendered at hangup), and each
    scene keeps its template as ``raw`` (re-rendered on a scene switch).  Any render or parse
    error gives back ``playbook`` itself with one more warning saying why.  A file without
    template syntax is returned as is.
    """
    from activecall.playbook.templates import TemplateRenderError, render  # see parse_playbook

    text = playbook.text
    if "{{" not in text and "{%" not in text and "{#" not in text:
        return playbook
    try:
        yaml_text, body = _split(text, playbook.source)
        yaml_text = render(expand_env(yaml_text, environ, env_prefix), variables)
        body = render(body, variables)
        rendered = _parse_parts(text, yaml_text, body, environ, playbook.source, [])
    except (TemplateRenderError, PlaybookError) as e:
        reason = e.reason if isinstance(e, TemplateRenderError) else str(e)
        return dataclasses.replace(
            playbook, warnings=(*playbook.warnings, f"template render failed, playbook used unrendered: {reason}"))
    option = rendered.option
    fm = rendered.front_matter
    if option.sip is not None:
        kept = playbook.option.sip.hangup_headers if playbook.option.sip is not None else None
        option = dataclasses.replace(option, sip=dataclasses.replace(option.sip, hangup_headers=kept))
        if isinstance(fm.get("sip"), dict):
            fm = {**fm, "sip": {k: v for k, v in fm["sip"].items() if k != "hangup_headers"}}
            unrendered_sip = playbook.front_matter.get("sip")
            if isinstance(unrendered_sip, dict) and "hangup_headers" in unrendered_sip:
                fm["sip"]["hangup_headers"] = unrendered_sip["hangup_headers"]
    scenes = {
        sid: dataclasses.replace(scene, raw=playbook.scenes[sid].raw) if sid in playbook.scenes else scene
        for sid, scene in rendered.scenes.items()
    }
    warnings = (*playbook.warnings, *(w for w in rendered.warnings if w not in playbook.warnings))
    return dataclasses.replace(rendered, option=option, front_matter=fm, scenes=scenes, warnings=warnings)


def _parse_parts(text: str, yaml_text: str, body: str, environ: Mapping[str, str], source: str,
                 warnings: list[str]) -> Playbook:
    """Parse the (expanded) front matter and body of ``text``."""
    if len(yaml_text) > MAX_FRONT_MATTER_CHARS:
        raise PlaybookError(f"front matter larger than {MAX_FRONT_MATTER_CHARS} characters", source=source)
    try:
        node, data = _load_yaml(yaml_text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise PlaybookError(
            f"invalid YAML front matter: {problem}",
            source=source,
            line=mark.line + 1 if mark is not None else None,
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PlaybookError("front matter must be a YAML map", source=source, line=1)

    fm: dict[str, Any] = _place_secrets(_normalize(data, _SCHEMA, "", warnings), environ, warnings)
    lines: dict[str, int] = {}
    if node is not None:
        _key_lines(node, _SCHEMA, "", lines)

    def fail(e: CommandError, prefix: str = "") -> PlaybookError:
        message = e.message.replace(" option.", " ", 1) if prefix else e.message
        m = _ERROR_PATH.match(message)
        return PlaybookError(message, source=source, line=_line_of(m.group(1), lines) if m else None)

    try:
        option = CallOption.from_mapping({k: fm[k] for k in MERGED_OPTION_KEYS if k in fm}, "option")
    except CommandError as e:
        raise fail(e, "option") from None

    llm_value = fm.get("llm")  # absent: IVR mode (§8.5)
    try:
        if llm_value is not None:
            _check_fields(llm_value, "llm", _LLM_TYPES)
        for key, (check, _required) in _OTHER_TYPES.items():
            if fm.get(key) is not None:
                check(fm[key], key)
    except CommandError as e:
        raise fail(e) from None
    collectors = _collectors(fm, source, lines)

    scenes, initial = split_scenes(body)
    llm: dict[str, Any] | None = None
    operator_key = False
    if llm_value is not None:
        llm = dict(llm_value)
        for key in ("apiKey", "baseUrl", "model"):
            # An unset ${VAR} stays verbatim (§3.1): here that is no value, so the environment fills it.
            if isinstance(llm.get(key), str) and _UNEXPANDED.fullmatch(llm[key].strip()):
                llm[key] = ""
        for key, env in (("apiKey", "OPENAI_API_KEY"), ("baseUrl", "OPENAI_BASE_URL"),
                         ("model", "OPENAI_MODEL")):  # fmt: skip
            if key == "apiKey" and not _llm_goes_to_configured_base(llm, environ):
                continue  # the operator's key goes only to the operator's base URL
            if not llm.get(key) and environ.get(env):
                llm[key] = environ[env]
        operator_key = bool(llm.get("apiKey")) and llm.get("apiKey") == environ.get("OPENAI_API_KEY")
        if llm.get("optional"):
            # An IVR that hands free speech to a model when one is configured: its scenes stay what it
            # says, llm.prompt is the model's prompt.
            if not (llm.get("baseUrl") or llm.get("apiKey")):
                llm = None
                operator_key = False
        elif initial is not None:
            llm["prompt"] = scenes[initial].prompt
        fm["llm"] = llm

    greeting = fm.get("greeting")
    if greeting is None and llm is not None:
        greeting = llm.get("greeting")
    follow = fm.get("followUp")
    return Playbook(
        source=source,
        text=text,
        front_matter=fm,
        option=option,
        greeting=greeting,
        llm=llm,
        scenes=scenes,
        initial_scene=initial,
        dtmf={
            digit: DtmfAction(action=a["action"], scene=a.get("scene"), target=a.get("target"))
            for digit, a in (fm.get("dtmf") or {}).items()
        },
        follow_up=FollowUp(follow["timeout"], follow["maxCount"]) if follow else None,
        warnings=tuple(warnings),
        llm_key_is_operators=operator_key,
        collectors=collectors,
    )


_SPEC_ERROR_PATH = re.compile(r"^invalid (dtmfCollectors\.\S+?):")


def _collectors(fm: Mapping[str, Any], source: str, lines: Mapping[str, int]) -> dict[str, CollectorSpec]:
    """The digit collectors, built now so a bad pattern or value is a load error naming its key and line."""
    from activecall.playbook.dtmf import collector_specs  # dtmf imports this module

    try:
        return collector_specs(fm)
    except ValueError as e:
        message = str(e)
        m = _SPEC_ERROR_PATH.match(message)
        raise PlaybookError(message, source=source, line=_line_of(m.group(1), lines) if m else None) from None
