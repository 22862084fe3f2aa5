"""Per-call ``{{ }}`` templates of playbooks (playbook.md §3.2, §3.3)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.playbook.model import PlaybookError, parse_playbook, parse_scene
from activecall.playbook.templates import (
    MAX_OPERATIONS,
    MAX_OUTPUT_CHARS,
    PlaybookTemplateError,
    TemplateRenderError,
    call_variables,
    check_template,
    render,
    render_playbook,
    render_scene_prompt,
)

START = "2026-01-01T10:00:00.000000+00:00"


def sip_call(**kwargs: object) -> dict:
    """Variables of a playbook-routed inbound SIP call with two extension headers."""
    args: dict = dict(
        session_id="cid-b-a", call_type="sip", start_time=START, caller="sip:6001@pbx",
        callee="sip:agent@pbx", headers={"X-Customer-ID": "42", "X-Campaign": "spring"},
    )
    args.update(kwargs)
    return call_variables(**args)


class CallVariablesTests(SynchronousTestCase):
    def test_builtins(self) -> None:
        """session_id, call_type, start_time, caller and callee render as given."""
        v = sip_call()
        self.assertEqual(
            render("{{ session_id }}|{{ call_type }}|{{ start_time }}|{{ caller }}|{{ callee }}", v),
            f"cid-b-a|sip|{START}|sip:6001@pbx|sip:agent@pbx",
        )

    def test_caller_callee_absent_render_empty(self) -> None:
        """Calls not routed by the playbook handler have no caller/callee: they render as ''."""
        v = call_variables(session_id="s.1", call_type="websocket", start_time=START)
        self.assertNotIn("caller", v)
        self.assertEqual(render("[{{ caller }}][{{ callee }}]", v), "[][]")

    def test_headers_without_extract_headers(self) -> None:
        """Every extension header is a variable by its received name; ``sip`` is empty."""
        v = sip_call(headers={"X_Tenant": "acme", "X-Customer-ID": "42"})
        self.assertEqual(render("{{ X_Tenant }}", v), "acme")
        self.assertEqual(v["sip"], {})
        self.assertNotIn("_sip_header_keys", v)

    def test_extract_headers_filter(self) -> None:
        """extract_headers keeps only the listed headers (case-insensitive), in ``sip`` too."""
        v = sip_call(extract_headers=["x-customer-id"])
        self.assertEqual(v["sip"], {"X-Customer-ID": "42"})
        self.assertEqual(v["_sip_header_keys"], ["X-Customer-ID"])
        self.assertNotIn("X-Campaign", v)
        self.assertEqual(render('{{ sip["X-Customer-ID"] }}/{{ sip["X-Campaign"] }}', v), "42/")

    def test_filter_keeps_builtins(self) -> None:
        """activecall: the header filter never deletes built-ins nor caller/callee (AC's defect)."""
        v = sip_call(extract_headers=[])
        self.assertEqual(render("{{ session_id }} {{ caller }} {{ callee }}", v),
                         "cid-b-a sip:6001@pbx sip:agent@pbx")
        self.assertEqual(v["sip"], {})

    def test_set_var_and_collector_values(self) -> None:
        """Values set during the call (set_var, collected digits) are variables; later ones win."""
        v = sip_call(values={"name": "Bob", "account": "123456"})
        self.assertEqual(render("{{ name }}:{{ account }}", v), "Bob:123456")

    def test_builtins_never_overwrite(self) -> None:
        """An externally supplied session_id/call_type/start_time/sip beats the built-in."""
        v = sip_call(values={"session_id": "mine", "call_type": "x", "start_time": "t"},
                     headers={"sip": "hdr"})
        self.assertEqual(render("{{ session_id }} {{ call_type }} {{ start_time }} {{ sip }}", v),
                         "mine x t hdr")

    def test_hyphenated_name_is_an_error(self) -> None:
        """``{{ X-Customer-ID }}`` parses as subtraction and fails; ``sip[...]`` is the way."""
        with self.assertRaises(TemplateRenderError):
            render("{{ X-Customer-ID }}", sip_call(extract_headers=["X-Customer-ID"]))


class RenderRuleTests(SynchronousTestCase):
    def test_undefined_renders_empty(self) -> None:
        """An unknown name renders as the empty string (§3, lenient undefined)."""
        self.assertEqual(render("a{{ nobody }}b{% if nobody %}x{% endif %}", {}), "ab")

    def test_undefined_attribute_is_error(self) -> None:
        """Using an attribute of an undefined name is a render error, as in MiniJinja's lenient mode."""
        with self.assertRaises(TemplateRenderError):
            render("{{ nobody.attr }}", {})

    def test_internal_keys_hidden(self) -> None:
        """Keys starting with ``_`` are hidden from scene/BYE rendering, shown on request."""
        v = {"_hangup_headers": "secret", "a": "1"}
        self.assertEqual(render("[{{ _hangup_headers }}]{{ a }}", v), "[]1")
        self.assertEqual(render("[{{ _hangup_headers }}]", v, include_internal=True), "[secret]")

    def test_whole_file_render_keeps_text(self) -> None:
        """A file without templates renders to itself, trailing newline included; no autoescape."""
        text = "---\nllm:\n  provider: openai\n---\n# Scene: a\nSay <b>&</b> 'hi'.\n"
        self.assertEqual(render(text, {}), text)
        self.assertEqual(render("{{ v }}", {"v": "<x>&"}), "<x>&")

    def test_filters_and_statements(self) -> None:
        """Ordinary Jinja2 works: filters, tests, if, a for loop, set."""
        v = {"name": "bob", "items": "a,b"}
        self.assertEqual(
            render('{{ name|upper }} {{ missing|default("x") }}{% if name is defined %}!{% endif %}'
                   '{% for i in items.split(",") %}[{{ i }}]{% endfor %}{% set n = 2 %}{{ n * 3 }}', v),
            "BOB x![a][b]6",
        )

    def test_runtime_error(self) -> None:
        """A runtime failure is a TemplateRenderError with the reason."""
        with self.assertRaises(TemplateRenderError) as cm:
            render("{{ 1 // 0 }}", {})
        self.assertIn("ZeroDivisionError", cm.exception.reason)

    def test_syntax_error_in_render(self) -> None:
        """render() reports a syntax error as TemplateRenderError with its line."""
        with self.assertRaises(TemplateRenderError) as cm:
            render("a\n{{ x ", {})
        self.assertIn("line 2", cm.exception.reason)


class CheckTemplateTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """A valid file passes."""
        check_template("---\ngreeting: Hi {{ caller }}\n---\nHello {{ sip['X-A'] }}\n", "p.md")

    def test_syntax_error_line(self) -> None:
        """A syntax error names the file, the file line and the reason; it is a PlaybookError."""
        text = "---\nllm:\n  provider: x\n---\nline five\nHello {{ name \n"
        with self.assertRaises(PlaybookTemplateError) as cm:
            check_template(text, "config/playbook/p.md")
        e = cm.exception
        self.assertIsInstance(e, PlaybookError)
        self.assertEqual((e.path, e.line), ("config/playbook/p.md", 6))
        self.assertTrue(str(e).startswith("config/playbook/p.md:6: template error: "), str(e))

    def test_first_line_offset(self) -> None:
        """A part checked alone reports file lines through ``first_line``."""
        with self.assertRaises(PlaybookTemplateError) as cm:
            check_template("ok\n{% if x %}\n", "p.md", first_line=10)
        self.assertEqual(cm.exception.line, 11)

    def test_unbounded_constructs_refused(self) -> None:
        """Recursive loops, macros, call blocks and includes/imports (no file access) are refused with their line."""
        cases = {
            "{% for a in x recursive %}{{ loop(a) }}{% endfor %}": 1,
            "\n{% macro f() %}{% endmacro %}": 2,
            "{% call f() %}{% endcall %}": 1,
            '{% include "x" %}': 1,
            '{% import "x" as y %}': 1,
            '{% extends "x" %}': 1,
        }
        for text, line in cases.items():
            with self.assertRaises(PlaybookTemplateError, msg=text) as cm:
                check_template(text, "p.md")
            self.assertEqual(cm.exception.line, line, text)


class SandboxTests(SynchronousTestCase):
    def assertRefused(self, text: str, variables: dict | None = None) -> str:
        with self.assertRaises(TemplateRenderError, msg=text) as cm:
            render(text, variables or {"s": "abc"})
        return cm.exception.reason

    def test_escapes_refused(self) -> None:
        """Dunder and internal attribute paths out of the sandbox are errors, not empty strings."""
        for text in (
            "{{ ''.__class__ }}",
            "{{ ''.__class__.__mro__[1].__subclasses__() }}",
            "{{ s.__class__ }}",
            "{{ cycler.__init__.__globals__ }}",
            "{{ namespace.__init__ }}",
            "{{ self._TemplateReference__context }}",
            "{{ ''['__class__'] }}",
            "{{ s.format.__globals__ }}",
            "{{ '{0.__class__}'.format(s) }}",
        ):
            self.assertRefused(text)

    def test_mutation_refused(self) -> None:
        """Built-in containers cannot be modified (immutable sandbox)."""
        self.assertRefused("{% set l = [1] %}{{ l.append(2) }}")

    def test_unlisted_str_method_refused(self) -> None:
        """str methods outside the allow-list (expandtabs can build unbounded text) are refused."""
        self.assertIn("expandtabs", self.assertRefused("{{ s.expandtabs(8) }}"))


class BoundTests(SynchronousTestCase):
    def assertLimit(self, text: str, variables: dict | None = None) -> None:
        with self.assertRaises(TemplateRenderError, msg=text):
            render(text, variables or {})

    def test_output_bound(self) -> None:
        """Output stops at MAX_OUTPUT_CHARS; exactly the bound is fine."""
        self.assertEqual(len(render("{{ 'x' * %d }}" % MAX_OUTPUT_CHARS, {})), MAX_OUTPUT_CHARS)
        self.assertLimit("{% for i in range(100000) %}{{ 'x' * 20 }}{% endfor %}")
        self.assertLimit("{{ v }}{{ v }}", {"v": "y" * (MAX_OUTPUT_CHARS // 2 + 1)})

    def test_memory_bombs_refused(self) -> None:
        """Operations whose result would exceed the bound are refused before they run."""
        for text in (
            "{{ 'x' * 10**9 }}",
            "{{ ['x'] * 10**9 }}",
            "{{ 2 ** (10**9) }}",
            "{{ '%0999999999d' % 1 }}",
            "{{ '%*d' % (10**9, 1) }}",
            "{{ '{:>999999999}'.format(1) }}",
            "{{ '{:>{}}'.format(1, 10**9) }}",
            "{{ 1|string|center(10**9) }}",
            "{{ 'a'.ljust(10**9) }}",
            "{{ ('x' * 1000000)|replace('x', 'yy') }}",
            "{{ ('x' * 1000000).replace('x', 'yy') }}",
            "{{ range(100000)|join('abcdefghijk') }}",
            "{{ 'abcdefghijk'.join(range(100000)|map('string')) }}",
            "{{ ('\n' * 100000)|indent(100) }}",
            "{{ '%099999999d'|format(1) }}",
        ):
            self.assertLimit(text)

    def test_work_budget(self) -> None:
        """Unbounded work (ranges, calls in a loop) hits the per-render budget."""
        self.assertLimit("{% for i in range(100000) %}{{ range(100000)|length }}{% endfor %}")



class NestedLoopTests(SynchronousTestCase):
    def test_nested_loops_render(self) -> None:
        """Nested for loops are allowed (the budget bounds them) and render as Jinja2 does."""
        text = "{% for a in xs %}{% for b in ys %}{{ a }}{{ b }},{% endfor %}{% endfor %}"
        check_template(text, "p.md")
        self.assertEqual(render(text, {"xs": ["1", "2"], "ys": ["a", "b"]}), "1a,1b,2a,2b,")
        self.assertEqual(render("{% for a in xs %}{{ loop.index }}{% else %}none{% endfor %}", {"xs": []}), "none")
        self.assertEqual(render("{% for k, v in d|dictsort %}{{ k }}={{ v }};{% endfor %}", {"d": {"b": 2, "a": 1}}),
                         "a=1;b=2;")
        self.assertEqual(render("{% for a in missing %}x{% endfor %}", {}), "")

    def test_loop_iterations_are_charged(self) -> None:
        """Iterations count against the budget even when the body does nothing: nested loops stay bounded."""
        xs = list(range(1000))
        with self.assertRaises(TemplateRenderError) as cm:
            render("{% for a in xs %}{% for b in xs %}{% for c in xs %}{% endfor %}{% endfor %}{% endfor %}",
                   {"xs": xs})
        self.assertIn(str(MAX_OPERATIONS), cm.exception.reason)
        render("{% for a in xs %}{% endfor %}", {"xs": xs})  # a plain loop is well within budget


PLAYBOOK = (
    "---\n"
    "tts:\n  provider: piper\n  speaker: '{{ voice }}'\n"
    "greeting: 'Hello {{ caller }}'\n"
    "sip:\n  hangup_headers:\n    X-Outcome: '{{ outcome }}'\n"
    "---\n"
    "# Scene: main\nCustomer {{ sip['X-Customer-ID'] }}.{% if vip %} Be extra kind.{% endif %}\n"
    '<dtmf digit="1" action="transfer" target="sip:{{ desk }}@pbx"/>\n'
    "# Scene: later\nNow {{ outcome }}.\n"
)


class RenderPlaybookTests(SynchronousTestCase):
    """The activecall load-time render for every call (§3.3)."""

    def setUp(self) -> None:
        self.playbook = parse_playbook(PLAYBOOK, {}, "p.md")
        self.variables = sip_call(extract_headers=["X-Customer-ID"], values={"voice": "F1", "desk": "200"})

    def test_whole_file_rendered_and_reparsed(self) -> None:
        """Front matter values, scene prompts and scene tags are rendered with the call's variables."""
        r = render_playbook(self.playbook, self.variables, {})
        self.assertEqual(r.greeting, "Hello sip:6001@pbx")
        assert r.option.tts is not None
        self.assertEqual(r.option.tts.speaker, "F1")
        self.assertEqual(r.prompt, "Customer 42.")
        self.assertEqual(r.scenes["main"].dtmf["1"].target, "sip:200@pbx")
        self.assertEqual(r.warnings, ())
        vip = render_playbook(self.playbook, {**self.variables, "vip": "yes"}, {})
        self.assertEqual(vip.prompt, "Customer 42. Be extra kind.")

    def test_hangup_headers_and_scene_templates_kept(self) -> None:
        """sip.hangup_headers keep their templates; each scene's raw text stays the template for re-rendering."""
        r = render_playbook(self.playbook, {**self.variables, "outcome": "sold"}, {})
        assert r.option.sip is not None
        self.assertEqual(r.option.sip.hangup_headers, {"X-Outcome": "{{ outcome }}"})
        self.assertEqual(r.front_matter["sip"]["hangup_headers"], {"X-Outcome": "{{ outcome }}"})
        self.assertEqual(r.scenes["later"].prompt, "Now sold.")
        self.assertIn("{{ outcome }}", r.scenes["later"].raw)
        self.assertEqual(r.text, PLAYBOOK)

    def test_render_error_keeps_unrendered_with_a_warning(self) -> None:
        """A render error (here an undefined attribute) gives the unrendered playbook plus one warning."""
        pb = parse_playbook("---\ngreeting: '{{ nothing.here }}'\n---\nHi {{ caller }}\n", {}, "p.md")
        r = render_playbook(pb, self.variables, {})
        self.assertEqual((r.greeting, r.prompt), ("{{ nothing.here }}", "Hi {{ caller }}"))
        [warning] = r.warnings
        self.assertIn("template render failed", warning)

    def test_parse_error_after_render_keeps_unrendered(self) -> None:
        """A value that makes the rendered front matter invalid falls back to the unrendered playbook."""
        pb = parse_playbook("---\ngreeting: x{{ g }}\n---\nHi\n", {}, "p.md")
        self.assertEqual(render_playbook(pb, {"g": "y"}, {}).greeting, "xy")
        r = render_playbook(pb, {"g": ": no"}, {})
        self.assertEqual(r.greeting, "x{{ g }}")
        self.assertIn("template render failed, playbook used unrendered: p.md:2: invalid YAML", r.warnings[-1])

    def test_values_cannot_name_environment_variables_or_move_the_front_matter_end(self) -> None:
        """A caller's value holding ${VAR} stays literal, and one holding --- stays inside its value."""
        pb = parse_playbook("---\ngreeting: 'Hi {{ name }}'\ntts:\n  provider: p\n---\nBody\n", {}, "p.md")
        env = {"ACTIVECALL_SECRET": "s3cret"}
        r = render_playbook(pb, {"name": "${ACTIVECALL_SECRET} --- x"}, env)
        self.assertEqual(r.greeting, "Hi ${ACTIVECALL_SECRET} --- x")
        assert r.option.tts is not None
        self.assertEqual((r.option.tts.provider, r.prompt), ("p", "Body"))
        # The playbook's own ${VAR}s still expand.
        own = parse_playbook("---\ngreeting: '${ACTIVECALL_SECRET} {{ n }}'\n---\n", env, "p.md")
        self.assertEqual(render_playbook(own, {"n": "1"}, env).greeting, "s3cret 1")

    def test_no_template_syntax_returns_the_same_playbook(self) -> None:
        """A file without template syntax is not parsed again."""
        pb = parse_playbook("---\ngreeting: hi\n---\nHello\n", {}, "p.md")
        self.assertIs(render_playbook(pb, self.variables, {}), pb)

    def test_exported_from_model_too(self) -> None:
        """render_playbook is one function, importable from model and templates."""
        from activecall.playbook import model

        self.assertIs(model.render_playbook, render_playbook)


class RenderScenePromptTests(SynchronousTestCase):
    """Scene switch re-render (§3.3)."""

    def test_rerendered_with_current_variables(self) -> None:
        """A raw text with {{ is rendered again and its tags stripped."""
        scene = parse_scene("s", 'Order {{ order }}. <dtmf digit="1" action="hangup"/>')
        self.assertEqual(render_scene_prompt(scene, {"order": "7"}), "Order 7.")
        self.assertEqual(render_scene_prompt(scene, {}), "Order .")

    def test_plain_scene_and_errors(self) -> None:
        """Without template syntax the parsed prompt comes back; a render error gives None."""
        self.assertEqual(render_scene_prompt(parse_scene("s", "Plain."), {}), "Plain.")
        self.assertIsNone(render_scene_prompt(parse_scene("s", "{{ x.y.z }}"), {}))
        self.assertIsNone(render_scene_prompt(parse_scene("s", "{% if x %}unclosed {{ x }}"), {}))
