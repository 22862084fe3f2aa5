"""``{{ expr }}`` templates rendered per call (playbook.md §3.2, §3.3).

One module-level sandboxed Jinja2 environment renders every playbook template.
Templates come from playbook files and ``POST /api/playbook/run`` bodies, and the values
from the caller (SIP headers, ``<set_var>`` chosen by a steerable LLM), so rendering is
bounded as well as sandboxed:

- no escape: ``ImmutableSandboxedEnvironment`` plus an allow-list of ``str`` methods;
  an unsafe attribute (``{{ ''.__class__ }}``) is an error, not an empty string;
- bounded memory: ``*``, ``**`` and ``%`` are intercepted, integer arguments of calls and
  filters are at most :data:`MAX_OUTPUT_CHARS`, the filters and methods whose output can be
  a product of their inputs (``replace``, ``join``, ``indent``, ``format``) are sized first,
  and the output stops at :data:`MAX_OUTPUT_CHARS`;
- bounded work: every call, attribute, item, filter, ``range`` item and ``for`` iteration
  is charged to a per-render budget of :data:`MAX_OPERATIONS` (so nested loops are bounded
  too), and the constructs whose cost escapes the budget are refused when the template is
  checked: recursive loops, macros and ``{% call %}`` blocks; ``include``/``import``/
  ``extends`` are refused as well, since templates get no file access.

Undefined names render as ``""`` (§3: "lenient undefined"); using an attribute of an
undefined name is an error, as in MiniJinja's lenient mode.

Pure module: jinja2 and the stdlib only.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError, safe_range

from activecall.playbook.model import Playbook, PlaybookError, Scene, parse_scene, render_playbook

__all__ = [
    "MAX_OPERATIONS",
    "MAX_OUTPUT_CHARS",
    "MAX_TEMPLATE_CHARS",
    "PlaybookTemplateError",
    "TemplateRenderError",
    "call_variables",
    "check_template",
    "render",
    "render_playbook",
    "render_scene_prompt",
]

#: Longest rendered text, and the largest string, list or integer argument a template may build.
MAX_OUTPUT_CHARS = 1_000_000
#: Longest template text accepted.
MAX_TEMPLATE_CHARS = 1_000_000
#: Calls, attribute/item lookups, filters, operators and ``range`` items per render.
MAX_OPERATIONS = 1_000_000
#: Largest integer ``**`` may produce, in bits.
_MAX_POW_BITS = 4096


class PlaybookTemplateError(PlaybookError):
    """A template that does not compile; a load error naming file, line and reason."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        super().__init__(reason, source=path, line=line)
        self.path: str = path
        self.reason: str = reason


class TemplateRenderError(ValueError):
    """Rendering failed (syntax, runtime error, sandbox refusal, a bound); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason: str = reason


class _Limit(SecurityError):
    """A bound of this module was hit."""


# --- per-render work budget ------------------------------------------------------------------

_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar("template_budget")


def _charge(units: int = 1) -> None:
    left = _budget.get(None)
    if left is None:  # outside render(): nothing to bound against (check_template never runs code)
        return
    left[0] -= units
    if left[0] < 0:
        raise _Limit(f"template does more than {MAX_OPERATIONS} operations")


def _check_size(n: int, what: str) -> None:
    if n > MAX_OUTPUT_CHARS:
        raise _Limit(f"{what} would exceed {MAX_OUTPUT_CHARS} characters")


def _check_args(args: Iterable[Any]) -> None:
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_OUTPUT_CHARS:
            raise _Limit(f"number argument {a} exceeds {MAX_OUTPUT_CHARS}")


def _check_result(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)):
        _check_size(len(value), "result")
    return value


_PERCENT_SPEC = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")
_DIGITS = re.compile(r"\d+")


def _check_format_string(fmt: str) -> None:
    """Refuse widths and precisions larger than the bound (``%0999999999d``, ``{:>999999999}``)."""
    widths: list[str] = []
    for m in _PERCENT_SPEC.finditer(fmt):
        widths.extend(g for g in m.groups() if g and g != "*")
    for m in _BRACE_SPEC.finditer(fmt):
        widths.extend(_DIGITS.findall(m.group(1)))
    for w in widths:
        if len(w) > 7 or int(w) > MAX_OUTPUT_CHARS:
            raise _Limit(f"format width {w} exceeds {MAX_OUTPUT_CHARS}")


def _replace_size(s: str, old: str, new: str, count: int = -1) -> int:
    hits = len(s) + 1 if old == "" else s.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * (len(new) - len(old))


def _join(sep: str, items: Iterable[Any]) -> str:
    parts = [str(x) for x in items]
    _check_size(sum(map(len, parts)) + len(sep) * max(len(parts) - 1, 0), "join")
    return sep.join(parts)


# --- the environment -------------------------------------------------------------------------

#: ``str`` methods a template may call; the others can build unbounded text (expandtabs) or are useless.
_STR_METHODS = frozenset({
    "capitalize", "casefold", "center", "count", "endswith", "find", "format", "index",
    "isalnum", "isalpha", "isdecimal", "isdigit", "islower", "isnumeric", "isspace", "istitle",
    "isupper", "join", "ljust", "lower", "lstrip", "partition", "removeprefix", "removesuffix",
    "replace", "rfind", "rindex", "rjust", "rpartition", "rsplit", "rstrip", "split",
    "splitlines", "startswith", "strip", "swapcase", "title", "upper", "zfill",
})

#: Filters kept (the others: random, wordwrap, urlize, pprint, safe/forceescape are not needed).
_FILTERS = frozenset({
    "abs", "attr", "batch", "capitalize", "center", "count", "d", "default", "dictsort", "e",
    "escape", "filesizeformat", "first", "float", "format", "groupby", "indent", "int", "items",
    "join", "last", "length", "list", "lower", "map", "max", "min", "reject", "rejectattr",
    "replace", "reverse", "round", "select", "selectattr", "slice", "sort", "string",
    "striptags", "sum", "title", "tojson", "trim", "truncate", "unique", "upper", "urlencode",
    "wordcount", "xmlattr",
})


def _guard(f: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _charge()
        _check_args(args)
        _check_args(kwargs.values())
        return _check_result(f(*args, **kwargs))

    guarded.__dict__.update(getattr(f, "__dict__", {}))  # keeps jinja's pass_context/pass_environment marks
    guarded.__name__ = getattr(f, "__name__", "filter")
    return guarded


def _sized_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """Size the filters whose output is a product of their inputs before running them."""
    sized: Callable[..., Any]
    if name == "replace":
        def sized_replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> Any:
            if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
                _check_size(_replace_size(s, old, new, -1 if count is None else count), "replace")
            return f(eval_ctx, s, old, new, count)
        sized = sized_replace
    elif name == "join":
        def sized_join(eval_ctx: Any, value: Any, d: Any = "", attribute: Any = None) -> Any:
            items = list(value)
            # str() of an item is at least as long as any of its attributes' str(): an upper bound.
            _check_size(sum(len(str(x)) for x in items) + len(str(d)) * max(len(items) - 1, 0), "join")
            return f(eval_ctx, items, d, attribute)
        sized = sized_join
    elif name == "indent":
        def sized_indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> Any:
            if isinstance(s, str):
                w = len(width) if isinstance(width, str) else int(width)
                _check_size(len(s) + (s.count("\n") + 1) * w, "indent")
            return f(s, width, first, blank)
        sized = sized_indent
    elif name == "format":
        def sized_format(value: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(value, str):
                _check_format_string(value)
            return f(value, *args, **kwargs)
        sized = sized_format
    else:
        return f
    sized.__dict__.update(f.__dict__)
    return sized


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox with this module's bounds."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr not in _STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def getattr(self, obj: Any, attribute: str) -> Any:
        _charge()
        return self._bounded_method(obj, attribute, super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        _charge()
        value = super().getitem(obj, argument)
        return self._bounded_method(obj, argument, value) if isinstance(argument, str) else value

    @staticmethod
    def _bounded_method(obj: Any, name: str, value: Any) -> Any:
        """Wrap the ``str`` methods whose output can exceed their inputs' sizes."""
        if not isinstance(obj, str) or not callable(value):
            return value
        if name == "replace":
            def replace(old: Any, new: Any, count: int = -1) -> Any:
                if isinstance(old, str) and isinstance(new, str) and isinstance(count, int):
                    _check_size(_replace_size(obj, old, new, count), "replace")
                return value(old, new, count)
            return replace
        if name == "join":
            return lambda items: _join(obj, items)
        if name in ("format", "format_map"):
            _check_format_string(obj)
        return value

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _charge()
        _check_args(args)
        _check_args(kwargs.values())
        return _check_result(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _charge()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check_size(len(seq) * max(n, 0), "repetition")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                if max(abs(left).bit_length(), 1) * right > _MAX_POW_BITS and abs(left) > 1:
                    raise _Limit(f"power exceeds {_MAX_POW_BITS} bits")
        elif operator == "%" and isinstance(left, str):
            _check_format_string(left)
            _check_args(right if isinstance(right, tuple) else (right,))
        return _check_result(super().call_binop(context, operator, left, right))


#: The filter every ``for`` loop's iterable goes through (see :func:`_compile`).
_ITERATE = "_activecall_iterate"


def _iterate(value: Any) -> Iterable[Any]:
    """Yield ``value``'s items, charging each one: loops cost their iterations, nested ones too."""
    for item in value:
        _charge()
        yield item


def _range(*args: int) -> range:
    r = safe_range(*args)
    _charge(len(r))
    return r


def _make_environment() -> _Environment:
    env = _Environment(autoescape=False, undefined=jinja2.Undefined, keep_trailing_newline=True)
    env.filters = {
        name: _guard(_sized_filter(name, f)) for name, f in env.filters.items() if name in _FILTERS
    }
    env.tests = {name: _guard(f) for name, f in env.tests.items()}  # type: ignore[arg-type]  # typed loosely by jinja
    env.globals.pop("lipsum", None)  # random text: not deterministic, and sized by its argument
    env.globals["range"] = _range
    env.filters[_ITERATE] = _iterate
    return env


#: The one environment every playbook template is rendered with.
ENVIRONMENT: jinja2.Environment = _make_environment()


# --- checking and rendering ------------------------------------------------------------------

_REFUSED: tuple[tuple[type[nodes.Node], str], ...] = (
    (nodes.Macro, "macros are not supported in playbook templates"),
    (nodes.CallBlock, "{% call %} blocks are not supported in playbook templates"),
    (nodes.Include, "{% include %} is not supported in playbook templates"),
    (nodes.Import, "{% import %} is not supported in playbook templates"),
    (nodes.FromImport, "{% from … import %} is not supported in playbook templates"),
    (nodes.Extends, "{% extends %} is not supported in playbook templates"),
)


def _refusal(tree: nodes.Template) -> tuple[int, str] | None:
    """The first construct whose work the budget cannot bound: ``(line, reason)``."""
    for node_type, reason in _REFUSED:
        for node in tree.find_all(node_type):
            return node.lineno, reason
    for loop in tree.find_all(nodes.For):
        if loop.recursive:
            return loop.lineno, "recursive loops are not supported in playbook templates"
    return None


@lru_cache(maxsize=256)
def _compile(text: str) -> jinja2.Template:
    """Parse, vet and compile ``text``; raises TemplateSyntaxError (with ``lineno``)."""
    if len(text) > MAX_TEMPLATE_CHARS:
        raise jinja2.TemplateSyntaxError(f"template longer than {MAX_TEMPLATE_CHARS} characters", 1)
    tree = ENVIRONMENT.parse(text)
    refused = _refusal(tree)
    if refused is not None:
        raise jinja2.TemplateSyntaxError(refused[1], refused[0])
    for loop in tree.find_all(nodes.For):
        # Iteration itself calls nothing the sandbox sees: route it through a charging filter.
        loop.iter = nodes.Filter(loop.iter, _ITERATE, [], [], None, None, lineno=loop.lineno)
    return ENVIRONMENT.from_string(tree)


def check_template(text: str, path: str, *, first_line: int = 1) -> None:
    """Raise PlaybookTemplateError (file, line, reason) if ``text`` does not compile.

    ``first_line`` is the file line ``text`` starts on, so a scene checked alone still
    reports file lines.
    """
    try:
        _compile(text)
    except jinja2.TemplateSyntaxError as e:
        line = None if e.lineno is None else e.lineno + first_line - 1
        raise PlaybookTemplateError(path, line, f"template error: {e.message}") from None


def render(text: str, variables: Mapping[str, Any], *, include_internal: bool = False) -> str:
    """Render ``text`` with ``variables``; raises TemplateRenderError.

    Keys starting with ``_`` are internal and hidden unless ``include_internal`` (§3.2).
    Text is rendered as is: ``\\r\\n`` line ends come out as ``\\n``.
    """
    try:
        template = _compile(text)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateRenderError(f"line {e.lineno}: {e.message}") from None
    context = {k: v for k, v in variables.items() if include_internal or not k.startswith("_")}
    token = _budget.set([MAX_OPERATIONS])
    try:
        out: list[str] = []
        size = 0
        for chunk in template.generate(context):
            size += len(chunk)
            _check_size(size, "rendered text")
            out.append(chunk)
        return "".join(out)
    except jinja2.TemplateError as e:  # sandbox refusals and this module's bounds included
        raise TemplateRenderError(str(e)) from None
    except (ArithmeticError, LookupError, TypeError, ValueError,
            RecursionError, MemoryError, AttributeError) as e:
        raise TemplateRenderError(f"{type(e).__name__}: {e}") from None
    finally:
        _budget.reset(token)


def render_scene_prompt(scene: Scene, variables: Mapping[str, Any]) -> str | None:
    """A scene's prompt re-rendered with the current variables (§3.3 scene switch).

    Only a raw text holding template syntax is rendered (else the prompt as parsed comes
    back); the scene tags are stripped after rendering.  ``None`` when rendering fails: the
    caller keeps the previous rendering.
    """
    if "{{" not in scene.raw and "{%" not in scene.raw:
        return scene.prompt
    try:
        return parse_scene(scene.id, render(scene.raw, variables)).prompt
    except TemplateRenderError:
        return None


# --- §3.2 call variables ---------------------------------------------------------------------


def call_variables(
    *,
    session_id: str,
    call_type: str,
    start_time: str,
    caller: str | None = None,
    callee: str | None = None,
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    extract_headers: Sequence[str] | None = None,
    values: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``{{ }}`` context of one call (§3.2, with the activecall rule of §3.3).

    - ``headers``: the INVITE's extension headers (name as received → value) of a
      playbook-routed inbound SIP call; the caller picks the non-standard ones.  With
      ``extract_headers`` set, only the listed names (case-insensitive) stay variables,
      ``_sip_header_keys`` records the kept names, and ``sip`` maps them to their values;
      without it every header stays and ``sip`` is empty.  The filter never removes
      anything but header entries (AC's also deletes built-ins and caller/callee: defect).
    - ``caller``/``callee``: From/To URIs, when known.
    - ``values``: strings set during the call so far, ``<set_var>`` and digit collector
      results alike, in the order they were set (a later one wins).
    - ``session_id``, ``call_type`` (``sip``/``websocket``/``webrtc``/``b2bua``),
      ``start_time`` (RFC 3339 UTC, e.g. ``activecall.timefmt.format_rfc3339``): built-ins,
      which never overwrite an externally supplied value of the same name.
    """
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    if extract_headers is not None:
        wanted = {name.lower() for name in extract_headers}
        pairs = [(k, v) for k, v in pairs if k.lower() in wanted]
    variables: dict[str, Any] = {}
    for name, value in pairs:
        variables[name] = value
    if caller is not None:
        variables["caller"] = caller
    if callee is not None:
        variables["callee"] = callee
    if extract_headers is not None:
        variables["_sip_header_keys"] = [k for k, _ in pairs]
    variables.update(values or {})
    for name, value in (("session_id", session_id), ("call_type", call_type), ("start_time", start_time)):
        variables.setdefault(name, value)
    variables.setdefault("sip", dict(pairs) if extract_headers is not None else {})
    return variables
