"""Action tags and JSON tools of the agent's reply (playbook.md §7)."""

from __future__ import annotations

import re
import time

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from activecall.playbook.actions import (
    MAX_SEGMENT_CHARS,
    MAX_TAG_CHARS,
    MAX_VALUE_CHARS,
    Accept,
    Collect,
    Goto,
    Hangup,
    Http,
    HttpTool,
    JsonReply,
    Message,
    Play,
    Rag,
    Refer,
    ReferTool,
    Reject,
    ReplyFormatError,
    ReplyParser,
    SetVar,
    is_json_reply,
    parse_json_reply,
)


def parse(text: str, chunks: list[str] | None = None) -> list:
    """The parser's whole output for ``text`` fed as ``chunks`` (default: one chunk)."""
    parser = ReplyParser()
    out: list = []
    for chunk in chunks if chunks is not None else [text]:
        out += parser.feed(chunk)
    return out + parser.flush()


def split_at(text: str, *points: int) -> list[str]:
    bounds = [0, *sorted(points), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


#: Every tag of §7.1 with the action it yields.
TAGS: list[tuple[str, object]] = [
    ("<hangup/>", Hangup()),
    ("<hangup />", Hangup()),
    ("<hangup\n/>", Hangup()),
    ('<refer to="sip:bob@10.0.0.1:5060"/>', Refer("sip:bob@10.0.0.1:5060")),
    ('<refer  to="sip:200@pbx" />', Refer("sip:200@pbx")),
    ('<play file="sounds/hold music.wav"/>', Play("sounds/hold music.wav")),
    ('<play file="https://x.example/a.wav?x=1&y=2"/>', Play("https://x.example/a.wav?x=1&y=2")),
    ('<goto scene="sales desk"/>', Goto("sales desk")),
    ('<set_var key="name" value="Ann"/>', SetVar("name", "Ann")),
    ("<set_var key=\"name\" value='Ann'/>", SetVar("name", "Ann")),
    ('<set_var key="q" value="it\'s"/>', SetVar("q", "it's")),
    ('<set_var key="q" value="say "hi" now" />', SetVar("q", 'say "hi" now')),
    ('<http url="https://crm.example/x"/>', Http("https://crm.example/x")),
    ('<http url="https://crm.example/x" method="post"/>', Http("https://crm.example/x", "post")),
    ('<http url="u" body="{id: 7}"/>', Http("u", None, "{id: 7}")),
    ('<http url="u" method="PUT" body="a=1" />', Http("u", "PUT", "a=1")),
    ('<collect type="pin" var="code"/>', Collect("pin", "code")),
    ('<collect type="pin" var="code" prompt="Enter your PIN."/>', Collect("pin", "code", "Enter your PIN.")),
    ('<collect type="pin" var="code" prompt=""/>', Collect("pin", "code", "")),
    ('<message body="order=7"/>', Message("order=7")),
    ('<message text="order=7"/>', Message("order=7")),
    ('<message body="x" contentType="text/plain"/>', Message("x", "text/plain")),
    ('<message body="x" content_type="application/json" refer="true"/>',
     Message("x", "application/json", True)),
    ('<message body="x" refer="false" />', Message("x", None, False)),
]

#: Near misses that §7.1 says are plain text (spoken).
NOT_TAGS = [
    "<hangup>",
    "<hangup/ >",
    "<Hangup/>",
    "<refer to='sip:x'/>",  # single quotes
    '<refer to=""/>',  # empty value
    '<refer to="sip:x">',
    '<refer to="sip:x"/',
    '<refer uri="sip:x"/>',
    '<referto="sip:x"/>',
    '<play file="a.wav" loop="1"/>',
    "<set_var key='k' value=\"v\"/>",  # single-quoted key
    '<set_var key="k" value=""/>',  # empty value
    '<set_var key="k" value="a\nb"/>',  # value on two lines
    "<http url=\"u\" body='{\"id\": 7}'/>",  # AC's docs: no ' quoting
    '<http url="u" body="b" method="POST"/>',  # fixed order
    '<http url="u" set_var="x"/>',
    '<collect var="v" type="t"/>',
    '<message body=""/>',
    '<message body="x" refer="yes"/>',
    '<message body="x" refer="true" contentType="c"/>',
    "<b>bold</b>",
    "<unknown/>",
    "a < b",
]


class TagTests(SynchronousTestCase):
    def test_every_tag(self) -> None:
        for tag, action in TAGS:
            self.assertEqual(parse(tag), [action], tag)

    def test_near_misses_are_spoken(self) -> None:
        for text in NOT_TAGS:
            out = parse(text)
            self.assertTrue(all(isinstance(piece, str) for piece in out), (text, out))
            self.assertEqual("".join(out).replace(" ", ""), text.replace(" ", "").replace("\n", ""), text)

    def test_set_var_value_is_the_shortest_match(self) -> None:
        self.assertEqual(parse('<set_var key="q" value="a"/> b"/>'), [SetVar("q", "a"), 'b"/>'])
        self.assertEqual(parse('<set_var key="q" value="a\'b"/>'), [SetVar("q", "a'b")])
        self.assertEqual(parse('<set_var key="q" value="a" \n />'), [SetVar("q", "a")])

    def test_http_request_method(self) -> None:
        self.assertEqual(Http("u", "post").request_method, "POST")
        self.assertEqual(Http("u", "Put").request_method, "PUT")
        self.assertEqual(Http("u", "DELETE").request_method, "GET")
        self.assertEqual(Http("u").request_method, "GET")

    def test_text_around_tags(self) -> None:
        self.assertEqual(
            parse('Sure, one moment. <play file="hold.wav"/>Transferring you <refer to="sip:200@pbx"/> bye'),
            ["Sure, one moment.", Play("hold.wav"), "Transferring you", Refer("sip:200@pbx"), "bye"])

    def test_tags_in_order_of_appearance(self) -> None:
        self.assertEqual(
            parse('<set_var key="a" value="1"/><hangup/><set_var key="b" value="2"/>'),
            [SetVar("a", "1"), Hangup(), SetVar("b", "2")])

    def test_sentence_segmentation(self) -> None:
        self.assertEqual(parse("Hi! How are you? Fine.\nGood 你好。好！是？   \n\n  "),
                         ["Hi!", "How are you?", "Fine.", "Good 你好。", "好！", "是？"])

    def test_sentences_are_emitted_as_soon_as_complete(self) -> None:
        parser = ReplyParser()
        self.assertEqual(parser.feed("Hello. Wor"), ["Hello."])
        self.assertEqual(parser.feed("ld"), [])
        self.assertEqual(parser.flush(), ["World"])

    def test_ip_address_inside_a_streaming_refer_is_not_spoken(self) -> None:
        """AC's defect (§7.1): the ``.`` of the address must not cut a half tag."""
        parser = ReplyParser()
        self.assertEqual(parser.feed('Okay. <refer to="sip:200@10.0.'), ["Okay."])
        self.assertEqual(parser.feed('0.1"'), [])
        self.assertEqual(parser.feed("/>"), [Refer("sip:200@10.0.0.1")])
        self.assertEqual(parser.flush(), [])

    def test_held_text_released_once_it_cannot_be_a_tag(self) -> None:
        parser = ReplyParser()
        self.assertEqual(parser.feed("a <ref"), [])
        self.assertEqual(parser.feed("ill. more"), ["a <refill."])
        self.assertEqual(parser.flush(), ["more"])

    def test_flush_releases_an_unfinished_tag_as_text(self) -> None:
        parser = ReplyParser()
        self.assertEqual(parser.feed('Bye. <hangup'), ["Bye."])
        self.assertEqual(parser.flush(), ["<hangup"])

    def test_every_tag_split_at_every_position(self) -> None:
        for tag, action in TAGS:
            text = f"Before. {tag} after."
            whole = parse(text)
            self.assertEqual(whole, ["Before.", action, "after."])
            for point in range(1, len(text)):
                self.assertEqual(parse(text, split_at(text, point)), whole, (text, point))

    def test_every_tag_split_at_every_pair_of_positions(self) -> None:
        for tag, action in TAGS[::4]:
            for a in range(1, len(tag)):
                for b in range(a, len(tag)):
                    self.assertEqual(parse(tag, split_at(tag, a, b)), [action], (tag, a, b))

    def test_one_character_chunks(self) -> None:
        text = "".join(tag + " x. " for tag, _ in TAGS) + "".join(NOT_TAGS)
        self.assertEqual(parse(text, list(text)), parse(text))


# --- hostile input -------------------------------------------------------------


class HostileTests(SynchronousTestCase):
    def held(self, parser: ReplyParser) -> int:
        """Characters the parser still holds back (its output on flush)."""
        return sum(len(piece) for piece in parser.flush() if isinstance(piece, str))

    def test_100_kb_without_close_is_released_with_a_bounded_hold(self) -> None:
        for opening, filler in (('<refer to="', "x"), ("<set_var key=\"k\" value='", "x"),
                                ("<hangup", " "), ('<http url="u" method="', "\t")):
            parser = ReplyParser()
            body = opening + filler * 100_000
            started = time.monotonic()
            for i in range(0, len(body), 100):
                parser.feed(body[i:i + 100])
            held = parser.flush()
            self.assertLess(time.monotonic() - started, 5.0, opening)
            self.assertLessEqual(sum(len(p) for p in held if isinstance(p, str)),
                                 MAX_TAG_CHARS + MAX_SEGMENT_CHARS, opening)

    def test_huge_attribute_makes_the_tag_text(self) -> None:
        value = "a" * (MAX_VALUE_CHARS + 1)
        out = parse(f'<play file="{value}"/>')
        self.assertTrue(all(isinstance(p, str) for p in out))
        self.assertEqual(parse(f'<play file="{value[:-1]}"/>'), [Play(value[:-1])])
        big = "a" * (MAX_VALUE_CHARS + 1)
        self.assertTrue(all(isinstance(p, str) for p in parse(f'<set_var key="k" value="{big}"/>')))

    def test_huge_attribute_streamed_is_released(self) -> None:
        parser = ReplyParser()
        out = parser.feed('<play file="')
        for _ in range(MAX_VALUE_CHARS + 10):
            out += parser.feed("a")
        # released as text: the next terminator ends the segment at once
        out += parser.feed(". ")
        self.assertEqual("".join(out), '<playfile="' + "a" * (MAX_VALUE_CHARS + 10) + ".")
        self.assertEqual(parser.flush(), [])

    def test_long_text_without_terminator_is_cut(self) -> None:
        words = "word " * 1000
        out = parse(words)
        self.assertGreater(len(out), 1)
        self.assertTrue(all(len(piece) <= MAX_SEGMENT_CHARS for piece in out))
        self.assertEqual(" ".join(out), words.strip())
        self.assertEqual(parse(words, list(words)), out)
        self.assertEqual(parse("x" * 5000), ["x" * MAX_SEGMENT_CHARS] * 2 + ["x" * 1000])

    def test_nested_angle_brackets(self) -> None:
        self.assertEqual(parse("<<<<hangup/>"), ["<<<", Hangup()])
        self.assertEqual(parse('<play file="<hangup/>"/>'), [Play("<hangup/>")])
        self.assertEqual(parse('<play file="x<hangup/>'), ['<play file="x', Hangup()])
        out = parse("<" * 50_000 + "<hangup/>")
        self.assertEqual(("".join(out[:-1]), out[-1]), ("<" * 50_000, Hangup()))

    def test_many_set_var_starts_are_fast(self) -> None:
        text = '<set_var key="k" value="' * 4000
        started = time.monotonic()
        out = parse(text, [text[i:i + 7] for i in range(0, len(text), 7)])
        self.assertLess(time.monotonic() - started, 10.0)
        self.assertEqual("".join(out).replace(" ", ""), text.replace(" ", ""))


# --- property: chunking does not matter, and the grammar is AC's ------------------

_AC = [
    (re.compile(r"<hangup\s*/>"), lambda m: Hangup()),
    (re.compile(r'<refer\s+to="([^"]+)"\s*/>'), lambda m: Refer(m[1])),
    (re.compile(r'<play\s+file="([^"]+)"\s*/>'), lambda m: Play(m[1])),
    (re.compile(r'<goto\s+scene="([^"]+)"\s*/>'), lambda m: Goto(m[1])),
    (re.compile(r'<set_var\s+key="([^"]+)"\s+value=["\'](.+?)["\']\s*/>'), lambda m: SetVar(m[1], m[2])),
    (re.compile(r'<http\s+url="([^"]+)"(?:\s+method="([^"]+)")?(?:\s+body="([^"]+)")?\s*/>'),
     lambda m: Http(m[1], m[2], m[3])),
    (re.compile(r'<collect\s+type="([^"]+)"\s+var="([^"]+)"(?:\s+prompt="([^"]*)")?\s*/>'),
     lambda m: Collect(m[1], m[2], m[3])),
    (re.compile(r'<message\s+(?:body|text)="([^"]+)"(?:\s+(?:contentType|content_type)="([^"]+)")?'
                r'(?:\s+refer="(true|false)")?\s*/>'),
     lambda m: Message(m[1], m[2], m[3] == "true")),
]
_TERMINATORS = re.compile(r"[.!?。！？\n]")


def reference(text: str) -> list:
    """AC's regexes (playbook.md §7.1) applied to the complete text, with our segments."""
    out: list = []
    segment = ""
    pos = 0

    def speak(piece: str) -> None:
        nonlocal segment
        for part in re.split(r"(?<=[.!?。！？\n])", piece):
            segment += part
            if _TERMINATORS.search(part[-1:] or " "):
                if segment.strip():
                    out.append(segment.strip())
                segment = ""

    while pos < len(text):
        if text[pos] == "<":
            for pattern, build in _AC:
                m = pattern.match(text, pos)
                if m:
                    speak("")
                    if segment.strip():
                        out.append(segment.strip())
                    segment = ""
                    out.append(build(m))
                    pos = m.end()
                    break
            else:
                speak("<")
                pos += 1
        else:
            nxt = text.find("<", pos)
            nxt = len(text) if nxt < 0 else nxt
            speak(text[pos:nxt])
            pos = nxt
    if segment.strip():
        out.append(segment.strip())
    return out


_PIECES = st.sampled_from(
    [tag for tag, _ in TAGS] + NOT_TAGS
    + ["Hello", " ", ". ", "!", "\n", "10.0.0.1", "<", "/>", '"', "'", "=", "<set_var", ' key="k"',
       ' value="', "<http", ' url="u"', ' method="m"', ' body="b"', "<refer", ' to="', "sip:x", "<hangup",
       "<message", ' body="b"', ' refer="true"', ' content_type="c"', "<collect", ' type="t"', ' var="v"',
       ' prompt="', "你好。"])


@st.composite
def reply_and_chunks(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = "".join(draw(st.lists(_PIECES, max_size=25)))
    points = draw(st.lists(st.integers(0, len(text)), max_size=12))
    return text, split_at(text, *points)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(reply_and_chunks())
    def test_random_chunking_gives_the_one_chunk_output(self, case: tuple[str, list[str]]) -> None:
        text, chunks = case
        self.assertEqual(parse(text, chunks), parse(text))

    @settings(max_examples=400, deadline=None)
    @given(reply_and_chunks())
    def test_same_as_ac_regexes(self, case: tuple[str, list[str]]) -> None:
        text, chunks = case
        self.assertEqual(parse(text, chunks), reference(text))

    @settings(max_examples=200, deadline=None)
    @given(st.text(alphabet='<>/="\' abc.\nhangupreftosetvar_', max_size=80), st.data())
    def test_arbitrary_text(self, text: str, data: st.DataObject) -> None:
        points = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
        self.assertEqual(parse(text, split_at(text, *points)), parse(text))
        self.assertEqual(parse(text), reference(text))


# --- JSON mode -------------------------------------------------------------------

SPEC_EXAMPLE = """{"text": "Let me check.", "waitInputTimeout": 8000,
 "tools": [{"name": "http", "url": "https://crm.example/x", "method": "POST", "body": {"id": 7}, "headers": {"K": "v"}},
           {"name": "hangup", "reason": "done", "initiator": "ai"},
           {"name": "refer", "caller": "sip:bot@pbx", "callee": "sip:200@pbx", "options": {"timeout": 20}},
           {"name": "rag", "query": "opening hours", "source": "kb"},
           {"name": "accept", "options": {}}, {"name": "reject", "reason": "busy", "code": 486}]}"""


class JsonModeTests(SynchronousTestCase):
    def test_detection(self) -> None:
        self.assertTrue(is_json_reply('  \n{"text": "x"}'))
        self.assertTrue(is_json_reply("```json\n{}\n```"))
        self.assertFalse(is_json_reply('Sure {"text": "x"}'))
        self.assertFalse(is_json_reply("[1]"))
        self.assertFalse(is_json_reply(""))

    def test_spec_example(self) -> None:
        self.assertEqual(parse_json_reply(SPEC_EXAMPLE), JsonReply("Let me check.", [
            HttpTool("https://crm.example/x", "POST", {"id": 7}, {"K": "v"}),
            Hangup("done", "ai"),
            ReferTool("sip:bot@pbx", "sip:200@pbx", {"timeout": 20}),
            Rag("opening hours", "kb"),
            Accept({}),
            Reject("busy", 486),
        ], 8000))

    def test_fence_and_defaults(self) -> None:
        reply = parse_json_reply('```json\n{"tools": [{"name": "http", "url": "u"}, {"name": "reject"}]}\n```')
        self.assertEqual(reply, JsonReply(None, [HttpTool("u", "GET", None, {}), Reject("Rejected by agent")],
                                          10000))
        self.assertEqual(parse_json_reply('```\n{"text": "hi"}\n```'), JsonReply("hi", [], 10000))
        self.assertEqual(parse_json_reply('{"text": "type ```ls``` now"}').speech, "type ```ls``` now")
        self.assertEqual(parse_json_reply('``` {"text": "unclosed"}').speech, "unclosed")
        speech, actions, _ = parse_json_reply('{"text": "bye", "tools": [{"name": "hangup"}]}')
        self.assertEqual((speech, actions), ("bye", [Hangup()]))

    def test_malformed(self) -> None:
        cases = {
            '{"text": "hi"': "invalid JSON",
            "```json\n{oops}\n```": "invalid JSON",
            "[1, 2]": "must be an object",
            '{"text": 5}': "text must be a string",
            '{"waitInputTimeout": "10"}': "waitInputTimeout",
            '{"waitInputTimeout": -1}': "waitInputTimeout",
            '{"waitInputTimeout": true}': "waitInputTimeout",
            '{"tools": {"name": "hangup"}}': "tools must be a list",
            '{"tools": [7]}': "tools[0] must be an object",
            '{"tools": [{"name": "refer", "callee": "sip:x"}]}': "tools[0].caller is required",
            '{"tools": [{"name": "http"}]}': "tools[0].url is required",
            '{"tools": [{"name": "http", "url": "u", "headers": {"K": 1}}]}': "headers values",
            '{"tools": [{"name": "rag"}]}': "query is required",
            '{"tools": [{"name": "reject", "code": 99}]}': "SIP status",
            '{"tools": [{"name": "fly"}]}': "unknown tool 'fly'",
            '{"tools": [' + ",".join(['{"name": "hangup"}'] * 33) + "]}": "more than 32 tools",
            "[" * 100_000 + "]" * 100_000: "longer than",
            "[" * 30_000 + "]" * 30_000: "invalid JSON",
            "Sorry, no JSON here": "no JSON",
        }
        for text, message in cases.items():
            with self.assertRaises(ReplyFormatError, msg=text[:40]) as caught:
                parse_json_reply(text)
            self.assertIn(message, str(caught.exception), text[:40])
