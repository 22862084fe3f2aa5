"""The agent's reply as speech and actions (playbook.md §7).

Text mode (§7.1): :class:`ReplyParser` takes the reply as it streams and returns, in
order, speakable sentence segments and the actions of the tags between them.  A ``<``
that can still become a known tag is held back (the defect AC has: it splits on the
``.`` of an IP address inside a half-received ``<refer>`` and speaks the fragment);
the hold is bounded, so a ``<`` that cannot become a tag within
:data:`MAX_TAG_CHARS` is released as text.  Because a tag is decided only once it is
complete or impossible, and segments end only at terminators or tags, any chunking of
the same reply gives the same output.

The grammar is AC's, exactly: double-quoted values, fixed attribute order, ``\\s``
before optional attributes, optional whitespace before ``/>``.  Anything not matching,
unknown tags included, is plain text and gets spoken.

JSON mode (§7.2): :func:`is_json_reply` tells whether a complete response is one, and
:func:`parse_json_reply` turns it into speech and tool actions or raises
:class:`ReplyFormatError` (the caller then speaks the raw response, §7.2).

Pure module: stdlib only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Union

#: Longest attribute value accepted; a longer one makes the tag plain text.
MAX_VALUE_CHARS = 2048
#: Longest whitespace run inside a tag.
MAX_WS_CHARS = 64
#: Longest tag; text from a ``<`` is never held back for longer than this.
MAX_TAG_CHARS = 8192
#: Longest segment: text without a terminator is cut (at a space if it has one) here.
MAX_SEGMENT_CHARS = 2000
#: Largest JSON-mode response parsed, and most tools in it.
MAX_JSON_CHARS = 65536
MAX_TOOLS = 32
#: ``waitInputTimeout`` default and upper bound (ms).
DEFAULT_WAIT_INPUT_TIMEOUT_MS = 10000
MAX_WAIT_INPUT_TIMEOUT_MS = 3_600_000

#: A segment ends after one of these (§7.1 sentence segmentation).
SEGMENT_TERMINATORS = frozenset(".!?。！？\n")


class ReplyFormatError(ValueError):
    """A JSON-mode response that cannot be used; its text says why."""


# --- actions ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hangup:
    """``<hangup/>`` (no reason) or the JSON ``hangup`` tool."""

    reason: str | None = None
    initiator: str | None = None


@dataclass(frozen=True, slots=True)
class Refer:
    """``<refer to="URI"/>``: transfer to ``to`` (§11.3)."""

    to: str


@dataclass(frozen=True, slots=True)
class Play:
    """``<play file="PATH_OR_URL"/>``."""

    file: str


@dataclass(frozen=True, slots=True)
class Goto:
    """``<goto scene="ID"/>``."""

    scene: str


@dataclass(frozen=True, slots=True)
class SetVar:
    """``<set_var key="K" value="V"/>``."""

    key: str
    value: str


@dataclass(frozen=True, slots=True)
class Http:
    """``<http url="U" method="M" body="B"/>``: ``body`` is sent raw."""

    url: str
    method: str | None = None
    body: str | None = None

    @property
    def request_method(self) -> str:
        """``POST``/``PUT`` (any case) as given, anything else ``GET`` (§7.1)."""
        upper = (self.method or "").upper()
        return upper if upper in ("POST", "PUT") else "GET"


@dataclass(frozen=True, slots=True)
class Collect:
    """``<collect type="T" var="V" prompt="P"/>``: ``prompt`` may be absent or empty."""

    type: str
    var: str
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """``<message body="B" contentType="C" refer="true|false"/>``: in-dialog SIP MESSAGE."""

    body: str
    content_type: str | None = None
    refer: bool = False


@dataclass(frozen=True, slots=True)
class HttpTool:
    """The JSON ``http`` tool: ``body`` is any JSON value, sent as JSON."""

    url: str
    method: str = "GET"
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReferTool:
    """The JSON ``refer`` tool with its refer options."""

    caller: str
    callee: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rag:
    """The JSON ``rag`` tool."""

    query: str
    source: str | None = None


@dataclass(frozen=True, slots=True)
class Accept:
    """The JSON ``accept`` tool: answer the pending call."""

    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reject:
    """The JSON ``reject`` tool: reject the pending call."""

    reason: str = "Rejected by agent"
    code: int | None = None


Action = Union[Hangup, Refer, Play, Goto, SetVar, Http, Collect, Message,
               HttpTool, ReferTool, Rag, Accept, Reject]


# --- tag grammar -----------------------------------------------------------------
#
# A matcher takes the buffer and the index of a ``<`` and returns ``(end, action)``
# for a complete tag, PARTIAL while the buffer is a proper prefix of a possible tag,
# or FAIL.  Matching is deterministic (no backtracking needed): values end at the
# first ``"``, and an optional attribute is told from ``/>`` by its first letter.

PARTIAL = "partial"
FAIL = "fail"
_Result = Union[tuple[int, Action], str]


def _literal(buf: str, i: int, text: str) -> int | str:
    have = buf[i:i + len(text)]
    if not text.startswith(have):
        return FAIL
    return i + len(text) if len(have) == len(text) else PARTIAL


def _spaces(buf: str, i: int, minimum: int) -> int | str:
    j = i
    while j < len(buf) and buf[j].isspace():
        j += 1
        if j - i > MAX_WS_CHARS:
            return FAIL
    if j - i < minimum:
        return PARTIAL if j == len(buf) else FAIL
    return j


def _quoted(buf: str, i: int, allow_empty: bool = False) -> tuple[int, str] | str:
    """``"value"`` without ``"`` inside: ``(end, value)``."""
    if i >= len(buf):
        return PARTIAL
    if buf[i] != '"':
        return FAIL
    close = buf.find('"', i + 1, i + 2 + MAX_VALUE_CHARS)
    if close < 0:
        return PARTIAL if len(buf) - i - 1 <= MAX_VALUE_CHARS else FAIL
    if close == i + 1 and not allow_empty:
        return FAIL
    return close + 1, buf[i + 1:close]


@dataclass(frozen=True)
class _Attr:
    names: tuple[str, ...]  # accepted spellings, e.g. body/text
    allow_empty: bool = False
    choices: tuple[str, ...] = ()  # exact values allowed, if restricted


def _attribute(buf: str, i: int, attr: _Attr) -> tuple[int, str] | str:
    """``name="value"`` for any of the attribute's spellings."""
    partial = False
    for name in attr.names:
        at = _literal(buf, i, name + "=")
        if at == PARTIAL:
            partial = True
        if isinstance(at, str):
            continue
        got = _quoted(buf, at, attr.allow_empty)
        if not attr.choices:
            return got
        if isinstance(got, tuple):
            return got if got[1] in attr.choices else FAIL
        if got == PARTIAL:  # the value so far must still be able to become a choice
            return PARTIAL if any(c.startswith(buf[at + 1:]) for c in attr.choices) else FAIL
        return got
    return PARTIAL if partial else FAIL


def _tag(name: str, required: tuple[_Attr, ...], optional: tuple[_Attr, ...],
         build: Callable[[list[str | None]], Action]) -> Callable[[str, int], _Result]:
    """Matcher for ``<name\\s+req="…"\\s+req="…"(?:\\s+opt="…")?…\\s*/>``."""

    def match(buf: str, i: int) -> _Result:
        at = _literal(buf, i, "<" + name)
        if isinstance(at, str):
            return at
        values: list[str | None] = []
        for attr in required:
            at = _spaces(buf, at, 1)
            if isinstance(at, str):
                return at
            got = _attribute(buf, at, attr)
            if isinstance(got, str):
                return got
            at, value = got
            values.append(value)
        rest: list[str | None] = [None] * len(optional)
        next_optional = 0
        while True:
            spaced = _spaces(buf, at, 0)
            if isinstance(spaced, str):
                return spaced
            if spaced == len(buf):
                return PARTIAL
            if buf[spaced] == "/":
                break
            if spaced == at:  # an attribute needs whitespace before it
                return FAIL
            for k in range(next_optional, len(optional)):
                got = _attribute(buf, spaced, optional[k])
                if got == FAIL:
                    continue
                if isinstance(got, str):
                    return got
                at, rest[k] = got
                next_optional = k + 1
                break
            else:
                return FAIL
        end = _literal(buf, spaced, "/>")
        if isinstance(end, str):
            return end
        return end, build(values + rest)

    return match


_SET_VAR_END = re.compile(r'["\']\s*/>')


def _set_var(buf: str, i: int) -> _Result:
    """``<set_var key="K" value=["'](.+?)["']\\s*/>``: the value is the shortest run of
    one line ending at a quote followed by ``/>`` (so it may contain quotes)."""
    head = _tag_head_set_var(buf, i)
    if isinstance(head, str):
        return head
    start, key = head
    newline = buf.find("\n", start, start + MAX_VALUE_CHARS + 1)
    stop = newline if newline >= 0 else start + MAX_VALUE_CHARS + 1  # quote must be before
    found = _SET_VAR_END.search(buf, start + 1, min(len(buf), stop + MAX_WS_CHARS + 3))
    if found is not None and found.start() < stop and found.end() - found.start() <= MAX_WS_CHARS + 3:
        return found.end(), SetVar(key, buf[start:found.start()])
    # still possible: a quote before ``stop`` followed by whitespace (and a ``/``) to the end
    tail_end = len(buf) - 1 if buf.endswith("/") else len(buf)
    k = tail_end
    while k > start and buf[k - 1].isspace() and tail_end - k <= MAX_WS_CHARS:
        k -= 1
    quote = k - 1
    if start < quote < stop and buf[quote] in "\"'" and tail_end - k <= MAX_WS_CHARS:
        return PARTIAL
    if newline < 0 and len(buf) - start <= MAX_VALUE_CHARS:
        return PARTIAL
    return FAIL


def _tag_head_set_var(buf: str, i: int) -> tuple[int, str] | str:
    """``<set_var\\s+key="K"\\s+value=`` and the opening quote: ``(value start, K)``."""
    at = _literal(buf, i, "<set_var")
    if isinstance(at, str):
        return at
    at = _spaces(buf, at, 1)
    if isinstance(at, str):
        return at
    got = _attribute(buf, at, _Attr(("key",)))
    if isinstance(got, str):
        return got
    at, key = got
    at = _spaces(buf, at, 1)
    if isinstance(at, str):
        return at
    at = _literal(buf, at, "value=")
    if isinstance(at, str):
        return at
    if at >= len(buf):
        return PARTIAL
    if buf[at] not in "\"'":
        return FAIL
    return at + 1, key


_MATCHERS: tuple[Callable[[str, int], _Result], ...] = (
    _tag("hangup", (), (), lambda v: Hangup()),
    _tag("refer", (_Attr(("to",)),), (), lambda v: Refer(v[0] or "")),
    _tag("play", (_Attr(("file",)),), (), lambda v: Play(v[0] or "")),
    _tag("goto", (_Attr(("scene",)),), (), lambda v: Goto(v[0] or "")),
    _set_var,
    _tag("http", (_Attr(("url",)),), (_Attr(("method",)), _Attr(("body",))),
         lambda v: Http(v[0] or "", v[1], v[2])),
    _tag("collect", (_Attr(("type",)), _Attr(("var",))), (_Attr(("prompt",), allow_empty=True),),
         lambda v: Collect(v[0] or "", v[1] or "", v[2])),
    _tag("message", (_Attr(("body", "text")),),
         (_Attr(("contentType", "content_type")), _Attr(("refer",), choices=("true", "false"))),
         lambda v: Message(v[0] or "", v[1], v[2] == "true")),
)


def match_tag(buf: str, i: int) -> _Result:
    """Match a known tag at ``buf[i] == "<"``: ``(end, action)``, PARTIAL or FAIL."""
    partial = False
    for matcher in _MATCHERS:
        got = matcher(buf, i)
        if isinstance(got, tuple):
            return FAIL if got[0] - i > MAX_TAG_CHARS else got
        if got == PARTIAL:
            partial = True
    return PARTIAL if partial and len(buf) - i <= MAX_TAG_CHARS else FAIL


# --- streaming parser ------------------------------------------------------------


class ReplyParser:
    """Speech segments and actions of one streamed text-mode reply (§7.1).

    ``feed`` and ``flush`` return ``str`` segments (stripped, never blank) and
    actions in order of appearance.  A segment ends after a terminator
    (:data:`SEGMENT_TERMINATORS`) or before a tag; ``flush`` ends the reply and
    releases everything held back.
    """

    def __init__(self, raw_text: bool = False) -> None:
        self._held = ""  # from a ``<`` that may still become a tag
        self._segment = ""  # text of the segment being built
        # raw_text: text is returned as it arrives (unstripped, unsegmented) for a downstream
        # splitter that cuts clauses itself; only tags are still held back and taken out.
        self._raw = raw_text

    def feed(self, chunk: str) -> list[str | Action]:
        """Add the next piece of the reply; return what is now complete."""
        out: list[str | Action] = []
        self._scan(self._held + chunk, out, final=False)
        return out

    def flush(self) -> list[str | Action]:
        """The reply ended: a held ``<`` that is not a complete tag is text."""
        out: list[str | Action] = []
        self._scan(self._held, out, final=True)
        self._end_segment(out)
        return out

    def _scan(self, buf: str, out: list[str | Action], final: bool) -> None:
        self._held = ""
        pos = 0
        while True:
            lt = buf.find("<", pos)
            self._text(buf[pos:] if lt < 0 else buf[pos:lt], out)
            if lt < 0:
                return
            got = match_tag(buf, lt)
            if got == PARTIAL and not final:
                self._held = buf[lt:]
                return
            if isinstance(got, tuple):
                self._end_segment(out)
                pos, action = got
                out.append(action)
            else:
                self._text("<", out)
                pos = lt + 1

    def _text(self, text: str, out: list[str | Action]) -> None:
        if self._raw:
            if text:
                if out and isinstance(out[-1], str):
                    out[-1] += text
                else:
                    out.append(text)
            return
        start = 0
        for i, char in enumerate(text):
            if char in SEGMENT_TERMINATORS:
                self._append(text[start:i + 1], out)
                self._end_segment(out)
                start = i + 1
        if start < len(text):
            self._append(text[start:], out)

    def _append(self, text: str, out: list[str | Action]) -> None:
        """Add to the segment, cutting it at :data:`MAX_SEGMENT_CHARS` so that neither
        held text nor the chunking changes where (the first MAX characters decide)."""
        self._segment += text
        while len(self._segment) >= MAX_SEGMENT_CHARS:
            head = self._segment[:MAX_SEGMENT_CHARS]
            cut = max(head.rfind(" "), head.rfind("\t")) + 1 or MAX_SEGMENT_CHARS
            rest = self._segment[cut:]
            self._segment = self._segment[:cut]
            self._end_segment(out)
            self._segment = rest

    def _end_segment(self, out: list[str | Action]) -> None:
        segment = self._segment.strip()
        self._segment = ""
        if segment:
            out.append(segment)


# --- JSON mode -------------------------------------------------------------------


class JsonReply(NamedTuple):
    """A parsed JSON-mode response: ``speech`` is ``None`` when it has no ``text``."""

    speech: str | None
    actions: list[Action]
    wait_input_timeout_ms: int = DEFAULT_WAIT_INPUT_TIMEOUT_MS


def is_json_reply(text: str) -> bool:
    """Whether a response is in JSON mode: first non-blank character ``{`` or a backtick."""
    stripped = text.lstrip()
    return stripped[:1] in ("{", "`")


_FENCE = re.compile(r"```(?:json)?(.*?)(?:```|\Z)", re.DOTALL)


def parse_json_reply(text: str) -> JsonReply:
    """Parse a JSON-mode response (§7.2); :class:`ReplyFormatError` if unusable."""
    if len(text) > MAX_JSON_CHARS:
        raise ReplyFormatError(f"JSON reply longer than {MAX_JSON_CHARS} characters")
    stripped = text.strip()
    fenced = None if stripped[:1] in ("{", "[") else _FENCE.search(stripped)
    if fenced is not None:
        source = fenced.group(1).strip()
    elif stripped[:1] in ("{", "["):
        source = stripped
    else:
        raise ReplyFormatError("no JSON: neither a ``` fence nor text starting with { or [")
    try:
        doc = json.loads(source)
    except (ValueError, RecursionError) as exc:
        raise ReplyFormatError(f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ReplyFormatError(f"JSON reply must be an object, got {type(doc).__name__}")
    speech = _opt_str(doc, "text", "reply")
    wait = doc.get("waitInputTimeout")
    if wait is None:
        wait = DEFAULT_WAIT_INPUT_TIMEOUT_MS
    elif isinstance(wait, bool) or not isinstance(wait, int) or not 0 <= wait <= MAX_WAIT_INPUT_TIMEOUT_MS:
        raise ReplyFormatError(f"waitInputTimeout must be an integer 0..{MAX_WAIT_INPUT_TIMEOUT_MS}")
    tools = doc.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise ReplyFormatError("tools must be a list")
    if len(tools) > MAX_TOOLS:
        raise ReplyFormatError(f"more than {MAX_TOOLS} tools")
    actions = [_tool(index, tool) for index, tool in enumerate(tools)]
    return JsonReply(speech, actions, wait)


def _tool(index: int, tool: Any) -> Action:
    where = f"tools[{index}]"
    if not isinstance(tool, dict):
        raise ReplyFormatError(f"{where} must be an object")
    name = tool.get("name")
    if name == "http":
        headers = _opt_dict(tool, "headers", where)
        if not all(isinstance(v, str) for v in headers.values()):
            raise ReplyFormatError(f"{where}.headers values must be strings")
        return HttpTool(_req_str(tool, "url", where), _opt_str(tool, "method", where) or "GET",
                        tool.get("body"), headers)
    if name == "hangup":
        return Hangup(_opt_str(tool, "reason", where), _opt_str(tool, "initiator", where))
    if name == "refer":
        return ReferTool(_req_str(tool, "caller", where), _req_str(tool, "callee", where),
                         _opt_dict(tool, "options", where))
    if name == "rag":
        return Rag(_req_str(tool, "query", where), _opt_str(tool, "source", where))
    if name == "accept":
        return Accept(_opt_dict(tool, "options", where))
    if name == "reject":
        code = tool.get("code")
        if code is not None and (isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 699):
            raise ReplyFormatError(f"{where}.code must be a SIP status 100..699")
        return Reject(_opt_str(tool, "reason", where) or "Rejected by agent", code)
    raise ReplyFormatError(f"{where}.name: unknown tool {str(name)[:64]!r}")


def _opt_str(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ReplyFormatError(f"{where}.{key} must be a string")
    return value


def _req_str(obj: dict[str, Any], key: str, where: str) -> str:
    value = _opt_str(obj, key, where)
    if value is None:
        raise ReplyFormatError(f"{where}.{key} is required")
    return value


def _opt_dict(obj: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReplyFormatError(f"{where}.{key} must be an object")
    return value
