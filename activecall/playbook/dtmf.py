"""Keypad actions and digit collectors (playbook.md §11.1, §11.2).

:func:`keypad_action` looks a pressed digit up in the current scene's ``<dtmf>`` tags, then in
the global ``dtmf`` map.  :class:`DigitCollector` is one ``<collect>``: it takes digits and the
time, and says what the call must do as :data:`Outcome` values.  AC checks the collector's
timeouts only when a ``silence`` event arrives; activecall runs real timers, so the call layer
arms one ``callLater`` at :meth:`DigitCollector.deadline` and calls :meth:`DigitCollector.expire`
when it fires.  :func:`collector_route` says which call events matter while collecting.

Pure module: stdlib only; time is ``now`` (float seconds on the injected clock).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Union

from activecall.playbook.model import DTMF_ACTIONS, DtmfAction
from activecall.rustregex import compile_rust_regex

__all__ = [
    "DEFAULT_ERROR_MESSAGE",
    "DTMF_DIGITS",
    "MAX_COLLECTED_DIGITS",
    "Collected",
    "CollectorSpec",
    "DigitCollector",
    "Failed",
    "NothingEntered",
    "Outcome",
    "Retry",
    "Route",
    "collector_route",
    "collector_specs",
    "keypad_action",
]

#: Keys a ``dtmf`` event may carry (RFC 4733 events 0–15); anything else is ignored.
DTMF_DIGITS = frozenset("0123456789*#ABCD")
#: Longest buffer kept: reaching it finishes the attempt as ``maxDigits`` would.  It bounds
#: memory and the input the (backtracking) validation regex runs on; ``digits``,
#: ``minDigits`` and ``maxDigits`` above it are read as this value.
MAX_COLLECTED_DIGITS = 64
#: Upper bound on ``timeout``/``interDigitTimeout`` (s) and on ``retryTimes``.
MAX_TIMEOUT_S = 3600.0
MAX_RETRY_TIMES = 100
DEFAULT_TIMEOUT_S = 15.0
DEFAULT_INTER_DIGIT_TIMEOUT_S = 5.0
DEFAULT_RETRY_TIMES = 3
DEFAULT_ERROR_MESSAGE = "Input format is incorrect"


# --- §11.1 keypad actions ------------------------------------------------------------------------


def keypad_action(digit: str, scene_map: Mapping[str, DtmfAction] | None,
                  global_map: Mapping[str, DtmfAction] | None) -> DtmfAction | None:
    """The action for ``digit``: the current scene's tag first, then the global map (§11.1).

    ``None`` for an unmapped digit (ignored) and for an entry whose action is not ``goto``,
    ``transfer`` or ``hangup`` (the global map's ``action`` is any string after parsing).
    """
    for source in (scene_map, global_map):
        if source:
            action = source.get(digit)
            if action is not None:
                return action if action.action in DTMF_ACTIONS else None
    return None


# --- §11.2 collector definition ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CollectorSpec:
    """One ``dtmfCollectors.<name>`` entry with its defaults applied and its pattern compiled.

    ``min_digits``/``max_digits`` already account for ``digits`` (which sets both).
    """

    name: str
    description: str | None = None
    min_digits: int = 0
    max_digits: int | None = None
    finish_key: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    inter_digit_timeout_s: float = DEFAULT_INTER_DIGIT_TIMEOUT_S
    pattern: re.Pattern[str] | None = None
    error_message: str | None = None
    retry_times: int = DEFAULT_RETRY_TIMES
    interruptible: bool = False

    @classmethod
    def from_mapping(cls, name: str, raw: Mapping[str, Any]) -> CollectorSpec:
        """Build from the parsed front matter entry (types already checked by the model).

        Raises ``ValueError`` naming ``dtmfCollectors.<name>.validation.pattern`` when the
        pattern is not a valid Rust-dialect regex (:func:`compile_rust_regex`), and naming the
        key of a value no collection can satisfy: a zero ``digits``/``maxDigits``, or
        ``minDigits`` above ``maxDigits``.
        """
        for key in ("digits", "maxDigits"):
            if raw.get(key) == 0:
                raise ValueError(f"invalid dtmfCollectors.{name}.{key}: must be at least 1")
        low, high = raw.get("minDigits"), raw.get("maxDigits")
        if raw.get("digits") is None and low is not None and high is not None and low > high:
            raise ValueError(f"invalid dtmfCollectors.{name}.minDigits: larger than maxDigits ({high})")
        digits = raw.get("digits")
        validation = raw.get("validation") or {}
        source = validation.get("pattern")
        pattern = None
        if source is not None:
            try:
                pattern = compile_rust_regex(source)
            except ValueError as e:
                raise ValueError(f"invalid dtmfCollectors.{name}.validation.pattern: {e}") from None
        max_digits = digits if digits is not None else raw.get("maxDigits")
        min_digits = digits if digits is not None else _or(raw.get("minDigits"), 0)
        return cls(
            name=name,
            description=raw.get("description"),
            min_digits=min(min_digits, MAX_COLLECTED_DIGITS),
            max_digits=min(max_digits, MAX_COLLECTED_DIGITS) if max_digits is not None else None,
            finish_key=raw.get("finishKey"),
            timeout_s=_seconds(raw.get("timeout"), DEFAULT_TIMEOUT_S),
            inter_digit_timeout_s=_seconds(raw.get("interDigitTimeout"), DEFAULT_INTER_DIGIT_TIMEOUT_S),
            pattern=pattern,
            error_message=validation.get("errorMessage"),
            retry_times=min(_or(raw.get("retryTimes"), DEFAULT_RETRY_TIMES), MAX_RETRY_TIMES),
            interruptible=bool(raw.get("interruptible", False)),
        )


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _seconds(value: Any, default: float) -> float:
    return min(float(_or(value, default)), MAX_TIMEOUT_S)


def collector_specs(front_matter: Mapping[str, Any]) -> dict[str, CollectorSpec]:
    """Every ``dtmfCollectors`` entry of a parsed playbook's front matter, by name.

    Raises ``ValueError`` for an invalid validation pattern (see :meth:`CollectorSpec.from_mapping`).
    """
    return {
        str(name): CollectorSpec.from_mapping(str(name), raw)
        for name, raw in (front_matter.get("dtmfCollectors") or {}).items()
    }


# --- §11.2 outcomes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Collected:
    """Success (step 4): set ``var`` = ``value``, append :attr:`note` as ``system``, generate."""

    name: str
    var: str
    value: str

    @property
    def note(self) -> str:
        """The ``system`` message telling the model what was entered."""
        return f"DTMF collection '{self.name}' completed: {self.var} = {self.value}"


@dataclass(frozen=True, slots=True)
class Retry:
    """A failed attempt with retries left (step 5): collection restarted; speak ``message``."""

    name: str
    reason: str
    message: str
    retry: int  # retries used so far, this one included


@dataclass(frozen=True, slots=True)
class Failed:
    """Failure with no retries left (step 5): append :attr:`note` as ``system``, generate."""

    name: str
    var: str
    reason: str
    retries: int

    @property
    def note(self) -> str:
        """The ``system`` message telling the model the collection failed."""
        return f"DTMF collection '{self.name}' for {self.var} failed after {self.retries} retries: {self.reason}"


@dataclass(frozen=True, slots=True)
class NothingEntered:
    """Overall timeout with an empty buffer (step 6): append :attr:`note` as ``system``, generate."""

    name: str
    var: str

    @property
    def note(self) -> str:
        """The ``system`` message telling the model nothing was entered."""
        return f"DTMF collection '{self.name}' for {self.var} timed out: nothing was entered"


Outcome = Union[Collected, Retry, Failed, NothingEntered]

#: ``collect``: give it to the collector (``dtmf`` → :meth:`DigitCollector.digit`, ``silence`` →
#: :meth:`DigitCollector.expire`); ``normal``: handle as outside collection; ``ignore``: drop.
Route = Literal["collect", "normal", "ignore"]
_ALWAYS_NORMAL = frozenset(("trackStart", "trackEnd", "hangup"))
_INTERRUPTIBLE = frozenset(("asrFinal", "asrDelta", "speaking", "eou"))


def collector_route(event: str, interruptible: bool) -> Route:
    """How the call treats event type ``event`` while a collector runs (step 2).

    ``hangup`` is ``normal``: the caller also drops the collector.  Everything unlisted,
    keypad actions and follow-up included, is ignored.
    """
    if event in ("dtmf", "silence"):
        return "collect"
    if event in _ALWAYS_NORMAL or (interruptible and event in _INTERRUPTIBLE):
        return "normal"
    return "ignore"


# --- §11.2 the machine ---------------------------------------------------------------------------


class DigitCollector:
    """One ``<collect type var>`` run.

    States::

        idle --start(now)--> collecting --finish ok--> done (Collected)
                               |  ^        finish failed, retries left: Retry, buffer emptied
                               |  +------- (timers restart at that now)
                               +--finish failed, no retries left--> done (Failed)
                               +--overall timeout, empty buffer---> done (NothingEntered)

    "finish" is the finish key, ``maxDigits``/``digits`` reached without a finish key,
    :data:`MAX_COLLECTED_DIGITS` reached, the inter-digit timeout or the overall timeout with
    digits in the buffer.  Outside ``collecting`` every method returns ``[]``/``None``.
    """

    __slots__ = ("spec", "var", "_state", "_buffer", "_retries", "_started", "_last_digit")

    def __init__(self, spec: CollectorSpec, var: str) -> None:
        self.spec = spec
        self.var = var
        self._state: Literal["idle", "collecting", "done"] = "idle"
        self._buffer: list[str] = []
        self._retries = 0
        self._started = 0.0
        self._last_digit = 0.0

    @property
    def collecting(self) -> bool:
        """True between :meth:`start` and a terminal outcome."""
        return self._state == "collecting"

    @property
    def buffer(self) -> str:
        """Digits entered in the current attempt."""
        return "".join(self._buffer)

    @property
    def retries(self) -> int:
        """Retries used so far."""
        return self._retries

    def start(self, now: float) -> None:
        """Step 1: empty buffer, retry count 0, overall timer from ``now``."""
        self._state = "collecting"
        self._retries = 0
        self._restart(now)

    def _restart(self, now: float) -> None:
        self._buffer.clear()
        self._started = now

    def deadline(self) -> float | None:
        """When :meth:`expire` must next be called: the overall or the inter-digit timeout."""
        if self._state != "collecting":
            return None
        overall = self._started + self.spec.timeout_s
        if not self._buffer:
            return overall
        return min(overall, self._last_digit + self.spec.inter_digit_timeout_s)

    def expire(self, now: float) -> list[Outcome]:
        """Step 6 at ``now``: nothing before :meth:`deadline`; early or repeated calls are harmless."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return []
        if self._buffer:
            return self._finish(now)
        self._state = "done"
        return [NothingEntered(self.spec.name, self.var)]

    def digit(self, digit: str, now: float) -> list[Outcome]:
        """Step 3 for one ``dtmf`` event; a key that is not a DTMF digit is ignored.

        A timeout already due at ``now`` is applied first (the timer may not have run yet),
        and the digit then counts in the attempt it restarted, if any.
        """
        outcomes = self.expire(now)
        if self._state != "collecting" or not isinstance(digit, str) or digit not in DTMF_DIGITS:
            return outcomes
        spec = self.spec
        if digit == spec.finish_key:
            return outcomes + self._finish(now)
        self._buffer.append(digit)
        self._last_digit = now
        size = len(self._buffer)
        if size >= MAX_COLLECTED_DIGITS or (
            spec.finish_key is None and spec.max_digits is not None and size >= spec.max_digits
        ):
            return outcomes + self._finish(now)
        return outcomes

    def _finish(self, now: float) -> list[Outcome]:
        """Steps 4 and 5."""
        spec = self.spec
        value = "".join(self._buffer)
        reason: str | None = None
        if len(value) < spec.min_digits:
            reason = f"expected at least {spec.min_digits} digits, got {len(value)}"
        elif spec.pattern is not None and spec.pattern.search(value) is None:
            reason = spec.error_message or DEFAULT_ERROR_MESSAGE
        if reason is None:
            self._state = "done"
            return [Collected(spec.name, self.var, value)]
        if self._retries >= spec.retry_times:
            self._state = "done"
            return [Failed(spec.name, self.var, reason, self._retries)]
        self._retries += 1
        self._restart(now)
        return [Retry(spec.name, reason, spec.error_message or reason, self._retries)]
