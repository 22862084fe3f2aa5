"""Keypad actions and digit collectors (playbook.md §11.1, §11.2)."""

from __future__ import annotations

import time
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from activecall.playbook.dtmf import (
    DEFAULT_ERROR_MESSAGE,
    MAX_COLLECTED_DIGITS,
    MAX_TIMEOUT_S,
    Collected,
    CollectorSpec,
    DigitCollector,
    Failed,
    NothingEntered,
    Retry,
    collector_route,
    collector_specs,
    keypad_action,
)
from activecall.playbook.model import DtmfAction, parse_playbook


def collector(var: str = "pin", **raw: Any) -> DigitCollector:
    """A started collector (at t=0) for front matter entry ``raw``."""
    c = DigitCollector(CollectorSpec.from_mapping("code", raw), var)
    c.start(0.0)
    return c


def press(c: DigitCollector, keys: str, now: float = 0.0) -> list:
    """Every outcome of pressing ``keys`` one after the other at ``now``."""
    out: list = []
    for k in keys:
        out += c.digit(k, now)
    return out


class KeypadActionTests(SynchronousTestCase):
    """§11.1 lookup order."""

    scene = {"1": DtmfAction("goto", scene="sales"), "9": DtmfAction("hangup")}
    globals_ = {
        "1": DtmfAction("goto", scene="support"),
        "0": DtmfAction("transfer", target="sip:op@example.com"),
    }

    def test_scene_overrides_global(self) -> None:
        """A digit the scene maps uses the scene's action, not the global one."""
        self.assertEqual(keypad_action("1", self.scene, self.globals_), DtmfAction("goto", scene="sales"))

    def test_global_fallback(self) -> None:
        """A digit the scene does not map falls back to the global map."""
        self.assertEqual(keypad_action("0", self.scene, self.globals_),
                         DtmfAction("transfer", target="sip:op@example.com"))
        self.assertEqual(keypad_action("1", None, self.globals_), DtmfAction("goto", scene="support"))
        self.assertEqual(keypad_action("9", self.scene, None), DtmfAction("hangup"))

    def test_unmapped_ignored(self) -> None:
        """Unmapped digits, odd keys and unknown actions give no action."""
        self.assertIsNone(keypad_action("5", self.scene, self.globals_))
        self.assertIsNone(keypad_action("", {}, {}))
        self.assertIsNone(keypad_action("x" * 1000, self.scene, self.globals_))
        self.assertIsNone(keypad_action("2", None, {"2": DtmfAction("dance")}))

    def test_from_parsed_playbook(self) -> None:
        """Actions parsed from a playbook's front matter and scene tags resolve as §11.1 says."""
        pb = parse_playbook(
            '---\nllm: {provider: openai}\ndtmf:\n  "1": {action: goto, scene: b}\n'
            '  "2": {action: hangup}\n---\n# Scene: a\n<dtmf digit="2" action="goto" scene="c"/>Hi\n',
            {}, "<t>",
        )
        scene = pb.scenes["a"].dtmf
        self.assertEqual(keypad_action("1", scene, pb.dtmf), DtmfAction("goto", scene="b"))
        self.assertEqual(keypad_action("2", scene, pb.dtmf), DtmfAction("goto", scene="c"))
        self.assertEqual(keypad_action("2", {}, pb.dtmf), DtmfAction("hangup"))


class SpecTests(SynchronousTestCase):
    """Collector definitions and their defaults (§11.2)."""

    def test_defaults(self) -> None:
        """An empty entry gets timeout 15 s, inter-digit 5 s, 3 retries, not interruptible."""
        s = CollectorSpec.from_mapping("x", {})
        self.assertEqual((s.timeout_s, s.inter_digit_timeout_s, s.retry_times, s.interruptible,
                          s.min_digits, s.max_digits, s.finish_key, s.pattern),
                         (15.0, 5.0, 3, False, 0, None, None, None))

    def test_digits_sets_min_and_max(self) -> None:
        """``digits`` wins over ``minDigits``/``maxDigits``."""
        s = CollectorSpec.from_mapping("x", {"digits": 4, "minDigits": 1, "maxDigits": 9})
        self.assertEqual((s.min_digits, s.max_digits), (4, 4))

    def test_from_playbook(self) -> None:
        """collector_specs reads the normalized front matter of a parsed playbook."""
        pb = parse_playbook(
            "---\nllm: {provider: openai}\ndtmfCollectors:\n  zip:\n    min_digits: 5\n"
            "    finishKey: '#'\n    validation: {pattern: '^\\d{5}$', errorMessage: Bad zip}\n---\nHi\n",
            {}, "<t>",
        )
        specs = collector_specs(pb.front_matter)
        self.assertEqual(list(specs), ["zip"])
        self.assertEqual((specs["zip"].min_digits, specs["zip"].finish_key, specs["zip"].error_message),
                         (5, "#", "Bad zip"))
        self.assertEqual(collector_specs({}), {})

    def test_bad_pattern(self) -> None:
        """An invalid or Rust-only pattern is a ValueError naming the field."""
        for pattern in ("[0-9", r"\p{N}+", "[[:digit:]]"):
            with self.assertRaises(ValueError) as e:
                CollectorSpec.from_mapping("zip", {"validation": {"pattern": pattern}})
            self.assertIn("dtmfCollectors.zip.validation.pattern", str(e.exception))

    def test_unsatisfiable_values(self) -> None:
        """Zero digits/maxDigits and minDigits above maxDigits are ValueErrors naming the key."""
        for raw, key in (({"digits": 0}, "digits"), ({"maxDigits": 0}, "maxDigits"),
                         ({"minDigits": 5, "maxDigits": 4}, "minDigits")):
            with self.assertRaises(ValueError, msg=raw) as e:
                CollectorSpec.from_mapping("acct", raw)
            self.assertTrue(str(e.exception).startswith(f"invalid dtmfCollectors.acct.{key}:"), str(e.exception))
        # digits overrides both, so a contradicting min/max pair beside it is harmless; equal is fine.
        self.assertEqual(CollectorSpec.from_mapping("a", {"digits": 3, "minDigits": 5, "maxDigits": 4}).max_digits, 3)
        self.assertEqual(CollectorSpec.from_mapping("a", {"minDigits": 4, "maxDigits": 4}).min_digits, 4)

    def test_playbook_collectors_built_at_load(self) -> None:
        """A parsed playbook carries the same specs collector_specs builds."""
        pb = parse_playbook("---\ndtmfCollectors:\n  pin: {digits: 4}\n---\nHi\n", {}, "<t>")
        self.assertEqual(pb.collectors, collector_specs(pb.front_matter))
        self.assertEqual(pb.collectors["pin"].max_digits, 4)

    def test_bounds(self) -> None:
        """Huge counts, timeouts and retries from the file are clamped."""
        s = CollectorSpec.from_mapping("x", {"digits": 10**18, "timeout": 10**18,
                                             "interDigitTimeout": 10**18, "retryTimes": 10**18})
        self.assertEqual((s.min_digits, s.max_digits), (MAX_COLLECTED_DIGITS, MAX_COLLECTED_DIGITS))
        self.assertEqual((s.timeout_s, s.inter_digit_timeout_s), (MAX_TIMEOUT_S, MAX_TIMEOUT_S))
        self.assertLessEqual(s.retry_times, 100)


class CollectorTests(SynchronousTestCase):
    """The §11.2 steps."""

    def test_not_started(self) -> None:
        """Before start the collector takes nothing and has no deadline."""
        c = DigitCollector(CollectorSpec.from_mapping("code", {"digits": 1}), "v")
        self.assertEqual(c.digit("1", 0.0), [])
        self.assertIsNone(c.deadline())
        self.assertFalse(c.collecting)

    def test_max_digits_finishes(self) -> None:
        """Without a finish key, reaching ``digits`` finishes with the buffer (step 3)."""
        c = collector(digits=4)
        self.assertEqual(press(c, "123"), [])
        self.assertEqual(c.digit("4", 1.0), [Collected("code", "pin", "1234")])
        self.assertFalse(c.collecting)
        self.assertIsNone(c.deadline())
        self.assertEqual(c.digit("5", 1.0), [])

    def test_max_digits_field(self) -> None:
        """``maxDigits`` alone also finishes the attempt."""
        c = collector(maxDigits=2)
        self.assertEqual(press(c, "98"), [Collected("code", "pin", "98")])

    def test_finish_key(self) -> None:
        """The finish key ends the attempt and is not stored; extra digits keep appending."""
        c = collector(maxDigits=2, finishKey="#")
        self.assertEqual(press(c, "12345"), [])
        self.assertEqual(c.buffer, "12345")
        self.assertEqual(c.digit("#", 0.5), [Collected("code", "pin", "12345")])

    def test_star_finish_key_and_hash_stored(self) -> None:
        """With ``*`` as finish key a ``#`` is an ordinary digit."""
        c = collector(finishKey="*")
        self.assertEqual(press(c, "1#*"), [Collected("code", "pin", "1#")])

    def test_finish_key_on_empty_buffer(self) -> None:
        """Finish with nothing entered succeeds with an empty value when no minimum is set."""
        c = collector(finishKey="#")
        self.assertEqual(c.digit("#", 0.0), [Collected("code", "pin", "")])

    def test_min_digits_failure_then_retry(self) -> None:
        """Too few digits fail with the documented reason and restart with an empty buffer."""
        c = collector(minDigits=4, finishKey="#")
        out = press(c, "12#", 2.0)
        reason = "expected at least 4 digits, got 2"
        self.assertEqual(out, [Retry("code", reason, reason, 1)])
        self.assertTrue(c.collecting)
        self.assertEqual((c.buffer, c.retries), ("", 1))
        self.assertEqual(press(c, "1234#", 3.0), [Collected("code", "pin", "1234")])

    def test_error_message_spoken_on_any_failure(self) -> None:
        """A configured errorMessage is what gets spoken, whatever the reason."""
        c = collector(minDigits=4, finishKey="#", validation={"pattern": "^1", "errorMessage": "Try again"})
        self.assertEqual(press(c, "1#"), [Retry("code", "expected at least 4 digits, got 1", "Try again", 1)])
        self.assertEqual(press(c, "2222#"), [Retry("code", "Try again", "Try again", 2)])

    def test_pattern_searched(self) -> None:
        """The pattern is searched, not matched whole: ``5`` anywhere passes."""
        c = collector(finishKey="#", validation={"pattern": "5"})
        self.assertEqual(press(c, "12345#"), [Collected("code", "pin", "12345")])

    def test_pattern_default_message(self) -> None:
        """A pattern miss without errorMessage fails with the default text."""
        c = collector(digits=3, validation={"pattern": "^9"})
        self.assertEqual(press(c, "123"),
                         [Retry("code", DEFAULT_ERROR_MESSAGE, DEFAULT_ERROR_MESSAGE, 1)])

    def test_rust_regex_syntax(self) -> None:
        """Rust spellings (``\\z``, ``(?<name>…)``, ``\\x{…}``) work in the pattern."""
        c = collector(digits=4, validation={"pattern": r"^(?<year>19|20)\d\d\z"})
        self.assertEqual(press(c, "1999"), [Collected("code", "pin", "1999")])
        c = collector(digits=2, validation={"pattern": r"^\x{31}\d\z"})
        self.assertEqual(press(c, "27"), [Retry("code", DEFAULT_ERROR_MESSAGE, DEFAULT_ERROR_MESSAGE, 1)])
        self.assertEqual(press(c, "17"), [Collected("code", "pin", "17")])

    def test_retries_exhausted(self) -> None:
        """After ``retryTimes`` retries the next failure is final, with the reason (step 5)."""
        c = collector(digits=1, retryTimes=2, validation={"pattern": "^0$", "errorMessage": "Zero only"})
        self.assertEqual(c.digit("1", 0.0), [Retry("code", "Zero only", "Zero only", 1)])
        self.assertEqual(c.digit("2", 1.0), [Retry("code", "Zero only", "Zero only", 2)])
        out = c.digit("3", 2.0)
        self.assertEqual(out, [Failed("code", "pin", "Zero only", 2)])
        self.assertIn("failed after 2 retries: Zero only", out[0].note)
        self.assertFalse(c.collecting)
        self.assertEqual(c.digit("0", 3.0), [])

    def test_zero_retries(self) -> None:
        """``retryTimes: 0`` fails on the first bad attempt."""
        c = collector(digits=1, retryTimes=0, validation={"pattern": "0"})
        self.assertEqual(c.digit("1", 0.0), [Failed("code", "pin", DEFAULT_ERROR_MESSAGE, 0)])

    def test_notes_name_and_digits(self) -> None:
        """The success note names the collector, variable and digits."""
        note = Collected("code", "pin", "4711").note
        for part in ("code", "pin", "4711"):
            self.assertIn(part, note)
        self.assertIn("nothing", NothingEntered("code", "pin").note)

    def test_hostile_digits(self) -> None:
        """Keys that are not DTMF digits, multi-character strings and non-strings are ignored."""
        c = collector(digits=2)
        for bad in ("", "12", "x", "a", " ", "\x00", "١", None, 5, ["1"]):
            self.assertEqual(c.digit(bad, 0.0), [])  # type: ignore[arg-type]
        self.assertEqual(c.buffer, "")
        self.assertEqual(press(c, "AD"), [Collected("code", "pin", "AD")])

    def test_thousand_digits_bounded(self) -> None:
        """1000 digits with a finish key never grow the buffer past the bound: it finishes there."""
        c = collector(finishKey="#", retryTimes=0)
        out = press(c, "7" * 1000)
        self.assertEqual(out, [Collected("code", "pin", "7" * MAX_COLLECTED_DIGITS)])
        self.assertEqual(c.buffer, "7" * MAX_COLLECTED_DIGITS)
        self.assertFalse(c.collecting)

    def test_thousand_digits_with_retries(self) -> None:
        """1000 digits against a failing pattern use the retries and then stop."""
        c = collector(finishKey="#", retryTimes=3, validation={"pattern": "^$"})
        out = press(c, "1" * 1000)
        self.assertEqual([type(o) for o in out], [Retry, Retry, Retry, Failed])
        self.assertLessEqual(len(c.buffer), MAX_COLLECTED_DIGITS)

    def test_pathological_pattern_is_bounded(self) -> None:
        """A backtracking-prone pattern runs only on the bounded buffer."""
        c = collector(finishKey="#", retryTimes=0, validation={"pattern": r"^(\d|\d\d)+x"})
        t0 = time.perf_counter()
        out = press(c, "1" * 30 + "#")
        self.assertLess(time.perf_counter() - t0, 5.0)
        self.assertEqual(type(out[0]), Failed)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.text(max_size=3), st.floats(0, 100)), max_size=200))
    def test_never_raises(self, events: list[tuple[str, float]]) -> None:
        """Any key sequence at any times gives only outcomes, a bounded buffer and at most one end."""
        c = collector(minDigits=2, maxDigits=6, finishKey="#", validation={"pattern": "[13579]"})
        ends = 0
        for key, now in sorted(events, key=lambda e: e[1]):
            for o in c.digit(key, now) + c.expire(now):
                ends += not isinstance(o, Retry)
            self.assertLessEqual(len(c.buffer), MAX_COLLECTED_DIGITS)
        self.assertLessEqual(ends, 1)


class TimeoutTests(SynchronousTestCase):
    """Step 6 with real timers: deadlines and ``expire(now)``."""

    def test_overall_timeout_nothing_entered(self) -> None:
        """No key within ``timeout`` ends the collection with NothingEntered."""
        c = collector(timeout=10)
        self.assertEqual(c.deadline(), 10.0)
        self.assertEqual(c.expire(9.99), [])
        self.assertTrue(c.collecting)
        self.assertEqual(c.expire(10.0), [NothingEntered("code", "pin")])
        self.assertFalse(c.collecting)
        self.assertEqual(c.expire(20.0), [])

    def test_inter_digit_timeout_finishes(self) -> None:
        """A pause of ``interDigitTimeout`` after a digit finishes with the buffer."""
        c = collector(timeout=60, interDigitTimeout=3, finishKey="#")
        c.digit("4", 1.0)
        self.assertEqual(c.deadline(), 4.0)
        c.digit("2", 3.5)
        self.assertEqual(c.deadline(), 6.5)
        self.assertEqual(c.expire(6.0), [])
        self.assertEqual(c.expire(6.5), [Collected("code", "pin", "42")])

    def test_overall_timeout_with_digits_finishes(self) -> None:
        """The overall timeout with digits in the buffer finishes (step 4), here a failure."""
        c = collector(timeout=5, interDigitTimeout=4, minDigits=3, retryTimes=0)
        c.digit("1", 1.0)
        c.digit("2", 3.0)
        self.assertEqual(c.deadline(), 5.0)  # overall comes before 3.0 + 4
        self.assertEqual(c.expire(5.0), [Failed("code", "pin", "expected at least 3 digits, got 2", 0)])

    def test_timers_restart_on_retry(self) -> None:
        """A retry restarts the overall timer at the time of the failure."""
        c = collector(timeout=10, interDigitTimeout=2, minDigits=2)
        c.digit("1", 1.0)
        self.assertEqual(c.expire(3.0), [Retry("code", "expected at least 2 digits, got 1",
                                               "expected at least 2 digits, got 1", 1)])
        self.assertEqual(c.deadline(), 13.0)
        self.assertEqual(c.expire(12.0), [])
        self.assertEqual(c.expire(13.0), [NothingEntered("code", "pin")])

    def test_late_digit_applies_due_timeout_first(self) -> None:
        """A digit arriving after a due but unrun timer: the timeout applies, the digit starts the retry."""
        c = collector(interDigitTimeout=2, minDigits=2, finishKey="#")
        c.digit("1", 0.0)
        out = c.digit("5", 2.5)
        self.assertEqual([type(o) for o in out], [Retry])
        self.assertEqual(c.buffer, "5")
        self.assertEqual(c.digit("5", 3.0) + c.digit("#", 3.0), [Collected("code", "pin", "55")])

    def test_late_digit_after_nothing_entered(self) -> None:
        """A digit after the overall timeout is due gets NothingEntered and is then dropped."""
        c = collector(timeout=1)
        self.assertEqual(c.digit("1", 1.5), [NothingEntered("code", "pin")])
        self.assertEqual(c.buffer, "")

    def test_zero_timeout(self) -> None:
        """``timeout: 0`` is due at once."""
        c = collector(timeout=0)
        self.assertEqual(c.expire(0.0), [NothingEntered("code", "pin")])


class RouteTests(SynchronousTestCase):
    """Step 2: which events matter while collecting."""

    def test_routes(self) -> None:
        """dtmf/silence go to the collector; track and hangup events are normal; the rest is ignored."""
        for interruptible in (False, True):
            self.assertEqual(collector_route("dtmf", interruptible), "collect")
            self.assertEqual(collector_route("silence", interruptible), "collect")
            for event in ("trackStart", "trackEnd", "hangup"):
                self.assertEqual(collector_route(event, interruptible), "normal")
            for event in ("answer", "asrFinalX", "", "interruption", "metrics"):
                self.assertEqual(collector_route(event, interruptible), "ignore")

    def test_interruptible(self) -> None:
        """Speech events are handled only with ``interruptible``."""
        for event in ("asrFinal", "asrDelta", "speaking", "eou"):
            self.assertEqual(collector_route(event, False), "ignore")
            self.assertEqual(collector_route(event, True), "normal")
        self.assertTrue(collector(interruptible=True).spec.interruptible)
