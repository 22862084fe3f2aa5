"""Option objects of the control protocol (protocol.md §4), as frozen dataclasses.

Every option class is declared with :func:`wire_field` metadata (wire key, type
checker, aliases, required flag); :class:`WireObject` turns that declaration
into ``from_json(obj, path)`` and ``to_json()``.  Decoding is strict for
declared keys and ignores unknown ones; a problem raises :class:`CommandError`
whose message names the dotted path of the offending key, e.g.
``invalid invite.option.sampleRate: expected an integer from 8000 to 48000``.

``null`` for a declared key means "not given" (the field keeps its default);
only free-form JSON fields (``realtime.turnDetection``, ``custom.data``) keep it.

Pure module: stdlib only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

__all__ = [
    "CommandError",
    "WireObject",
    "wire_field",
    "CallOption",
    "MERGED_OPTION_KEYS",
    "SipOption",
    "RecorderOption",
    "VadOption",
    "TranscriptionOption",
    "SynthesisOption",
    "MediaPassOption",
    "AmbianceOption",
    "EouOption",
    "InterruptionOption",
    "RealtimeOption",
    "ReferOption",
    "RingbackDetectionOption",
    "AgcOption",
    "RECORDER_FORMATS",
    "CALL_CODECS",
]


class CommandError(ValueError):
    """A control command that cannot be decoded; ``message`` is the ``error`` event text (§2.1)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message: str = message

    def __str__(self) -> str:
        return self.message

    @classmethod
    def missing(cls, path: str) -> CommandError:
        """``missing field <path>``."""
        return cls(f"missing field {path}")

    @classmethod
    def invalid(cls, path: str, expected: str) -> CommandError:
        """``invalid <path>: <expected>``."""
        return cls(f"invalid {path}: {expected}")


# A checker takes the raw JSON value and its dotted path and returns the
# Python value, or raises CommandError.
Checker = Callable[[Any, str], Any]

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
_I32_MIN = -(2**31)
_I32_MAX = 2**31 - 1


def _is_int(value: object) -> bool:
    # bool is an int subclass, and JSON 250.0 is a float: neither is an integer here.
    return isinstance(value, int) and not isinstance(value, bool)


def check_str(value: Any, path: str) -> str:
    """A JSON string."""
    if not isinstance(value, str):
        raise CommandError.invalid(path, "expected a string")
    return value


def check_bool(value: Any, path: str) -> bool:
    """A JSON ``true``/``false`` (never ``"false"`` or ``0``)."""
    if not isinstance(value, bool):
        raise CommandError.invalid(path, "expected a boolean")
    return value


def int_range(low: int, high: int, expected: str | None = None) -> Checker:
    """A checker for a JSON integer within ``[low, high]``."""
    text = expected or f"expected an integer from {low} to {high}"

    def check(value: Any, path: str) -> int:
        if not _is_int(value) or not low <= value <= high:
            raise CommandError.invalid(path, text)
        return int(value)

    return check


check_u32: Checker = int_range(0, _U32_MAX)
check_u64: Checker = int_range(0, _U64_MAX, "expected a non-negative integer")
check_i32: Checker = int_range(_I32_MIN, _I32_MAX)


def check_f32(value: Any, path: str) -> float:
    """A finite JSON number (integers accepted), returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CommandError.invalid(path, "expected a number")
    try:
        result = float(value)
    except OverflowError:  # a JSON integer with hundreds of digits
        raise CommandError.invalid(path, "expected a number") from None
    if not math.isfinite(result):
        raise CommandError.invalid(path, "expected a number")
    return result


def float_range(low: float, high: float) -> Checker:
    """A checker for a finite JSON number within ``[low, high]``."""

    def check(value: Any, path: str) -> float:
        result = check_f32(value, path)
        if not low <= result <= high:
            raise CommandError.invalid(path, f"expected a number from {low:g} to {high:g}")
        return result

    return check


def check_map(value: Any, path: str) -> dict[str, str]:
    """A JSON object whose values are all strings; a bad value is named by its key."""
    if not isinstance(value, dict):
        raise CommandError.invalid(path, "expected an object of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise CommandError.invalid(f"{path}.{key}", "expected a string")
    return dict(value)


# SIP headers a client may add to outgoing requests (option.sip.headers, hangup/message headers).
MAX_SIP_HEADERS = 32
MAX_SIP_HEADER_VALUE_CHARS = 1024
# RFC 3261 §25.1 token: the only characters a header name may have.
_SIP_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+")
# CR/LF would end the header (a client could append a second request); NUL and other
# controls have no place in a header value (HTAB is folding whitespace and allowed).
_SIP_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The transaction and dialog are ours: a client overriding these could hijack or break them.
PROTECTED_SIP_HEADERS = frozenset({
    "via", "v", "call-id", "i", "cseq", "from", "f", "to", "t", "content-length", "l", "max-forwards",
})


def sip_value_problem(value: str) -> str | None:
    """Why ``value`` may not be a header value of an outgoing SIP request, or None when it may."""
    if _SIP_VALUE_FORBIDDEN.search(value):
        return "header value must not contain CR, LF, NUL or other control characters"
    if len(value) > MAX_SIP_HEADER_VALUE_CHARS:
        return f"header value longer than {MAX_SIP_HEADER_VALUE_CHARS} characters"
    return None


def sip_header_problem(name: str, value: str) -> str | None:
    """Why ``name: value`` may not go into an outgoing SIP request, or None when it may."""
    if not _SIP_TOKEN.fullmatch(name):
        return "header name must be an RFC 3261 token (letters, digits, -.!%*_+`'~)"
    if name.lower() in PROTECTED_SIP_HEADERS:
        return f"{name} is set by activecall and cannot be overridden"
    return sip_value_problem(value)


def check_sip_text(value: Any, path: str) -> str:
    """A string that goes into a SIP header (URI, user name, realm): no CR, LF, NUL or other controls."""
    text = check_str(value, path)
    if _SIP_VALUE_FORBIDDEN.search(text):
        raise CommandError.invalid(path, "must not contain CR, LF, NUL or other control characters")
    return text


def check_sip_header_value(value: Any, path: str) -> str:
    """One header value we put on a request (``message.contentType``): single line, bounded length."""
    text = check_str(value, path)
    problem = sip_value_problem(text)
    if problem is not None:
        raise CommandError.invalid(path, problem)
    return text


def check_sip_headers(value: Any, path: str) -> dict[str, str]:
    """A JSON object of SIP headers to send: string values, at most 32, each safe (see sip_header_problem)."""
    headers = check_map(value, path)
    if len(headers) > MAX_SIP_HEADERS:
        raise CommandError.invalid(path, f"at most {MAX_SIP_HEADERS} headers")
    for name, item in headers.items():
        problem = sip_header_problem(name, item)
        if problem is not None:
            raise CommandError.invalid(f"{path}.{name[:64]!s}", problem)
    return headers


def check_str_list(value: Any, path: str) -> list[str]:
    """A JSON array of strings."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CommandError.invalid(path, "expected an array of strings")
    return list(value)


def check_list(value: Any, path: str) -> list[Any]:
    """A JSON array of anything."""
    if not isinstance(value, list):
        raise CommandError.invalid(path, "expected an array")
    return list(value)


def check_any(value: Any, path: str) -> Any:
    """Any JSON value, kept as parsed."""
    return value


def one_of(choices: Sequence[str]) -> Checker:
    """A checker for a string limited to ``choices`` (case-sensitive)."""
    text = "expected one of " + ", ".join(choices)

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise CommandError.invalid(path, text)
        return value

    return check


_W = TypeVar("_W", bound="WireObject")


def nested(cls: type[WireObject]) -> Checker:
    """A checker for a nested option object."""

    def check(value: Any, path: str) -> Any:
        return cls.from_json(value, path)

    return check


@dataclass(frozen=True, slots=True)
class WireSpec:
    """How one dataclass field appears on the wire."""

    key: str
    check: Checker
    aliases: tuple[str, ...] = ()
    required: bool = False
    # Emit the key even when the value is None (spec §0 exceptions).
    keep_none: bool = False
    # The field is free-form JSON where null is a value, not "absent".
    null_is_value: bool = False


def wire_field(
    key: str,
    check: Checker,
    default: Any = dataclasses.MISSING,
    *,
    aliases: tuple[str, ...] = (),
    keep_none: bool = False,
    null_is_value: bool = False,
) -> Any:
    """Declare a dataclass field with its wire key; no ``default`` means required."""
    spec = WireSpec(
        key=key,
        check=check,
        aliases=aliases,
        required=default is dataclasses.MISSING,
        keep_none=keep_none,
        null_is_value=null_is_value,
    )
    return dataclasses.field(default=default, metadata={"wire": spec})


def _encode_value(value: Any) -> Any:
    if isinstance(value, WireObject):
        return value.to_json()
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return value


class WireObject:
    """Mixin for dataclasses declared with :func:`wire_field`: strict decode, wire encode."""

    __slots__ = ()

    @classmethod
    def from_json(cls: type[_W], obj: object, path: str) -> _W:
        """Decode the JSON object ``obj`` found at dotted ``path``; raises CommandError."""
        if not isinstance(obj, dict):
            raise CommandError.invalid(path, "expected an object")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            spec: WireSpec | None = f.metadata.get("wire")
            if spec is None:
                continue
            # The canonical key wins over its aliases when both are present.
            for key in (spec.key, *spec.aliases):
                if key in obj and (obj[key] is not None or spec.null_is_value):
                    kwargs[f.name] = spec.check(obj[key], f"{path}.{key}")
                    break
            else:
                if spec.required:
                    raise CommandError.missing(f"{path}.{spec.key}")
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        """The wire JSON object (camelCase keys), omitting fields whose value is None."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            spec: WireSpec | None = f.metadata.get("wire")
            if spec is None:
                continue
            value = getattr(self, f.name)
            if value is None and not spec.keep_none:
                continue
            out[spec.key] = _encode_value(value)
        return out


def _fill_missing(new: _W, base: _W | None, names: Sequence[str]) -> _W:
    """Copy ``names`` from ``base`` into ``new`` where ``new`` has None."""
    if base is None:
        return new
    changes = {n: getattr(base, n) for n in names if getattr(new, n) is None}
    return dataclasses.replace(new, **changes) if changes else new  # type: ignore[type-var]


# --- §4.2 ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SipOption(WireObject):
    """SIP credentials, headers and SRTP for an outbound leg (§4.2); snake_case wire keys."""

    username: str | None = wire_field("username", check_sip_text, None)
    password: str | None = wire_field("password", check_str, None)
    realm: str | None = wire_field("realm", check_sip_text, None)
    contact: str | None = wire_field("contact", check_sip_text, None)
    headers: dict[str, str] | None = wire_field("headers", check_sip_headers, None)
    hangup_headers: dict[str, str] | None = wire_field("hangup_headers", check_sip_headers, None)
    extract_headers: list[str] | None = wire_field("extract_headers", check_str_list, None)
    enable_srtp: bool | None = wire_field(
        "enable_srtp", check_bool, None, aliases=("enableSrtp",)
    )


# --- §4.3 ----------------------------------------------------------------------------------

RECORDER_FORMATS: tuple[str, ...] = ("wav", "pcm", "pcmu", "pcma", "g722")


@dataclass(frozen=True, slots=True)
class RecorderOption(WireObject):
    """Call recording (§4.3); ``format`` None means the config's ``[recording].format``."""

    recorder_file: str = wire_field("recorderFile", check_str, "")
    samplerate: int = wire_field("samplerate", check_u32, 16000)
    ptime: int = wire_field("ptime", check_u32, 200)
    format: str | None = wire_field("format", one_of(RECORDER_FORMATS), None)

    @property
    def ptime_ms(self) -> int:
        """Write interval in ms; 0 means 200."""
        return self.ptime or 200


# --- §4.4 ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VadOption(WireObject):
    """Voice-activity detection (§4.4); missing keys take the spec defaults."""

    type: str = wire_field("type", check_str, "silero")
    samplerate: int = wire_field("samplerate", check_u32, 16000)
    speech_padding: int = wire_field("speechPadding", check_u64, 250)
    silence_padding: int = wire_field("silencePadding", check_u64, 100)
    ratio: float = wire_field("ratio", check_f32, 0.5)
    voice_threshold: float = wire_field("voiceThreshold", check_f32, 0.5)
    max_buffer_duration_secs: int = wire_field("maxBufferDurationSecs", check_u64, 50)
    silence_timeout: int | None = wire_field("silenceTimeout", check_u64, None)
    endpoint: str | None = wire_field("endpoint", check_str, None)
    secret_key: str | None = wire_field("secretKey", check_str, None)
    secret_id: str | None = wire_field("secretId", check_str, None)


# --- §4.5 ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TranscriptionOption(WireObject):
    """Speech recognition (§4.5); ``provider`` is required when the object is present."""

    provider: str = wire_field("provider", check_str)
    language: str | None = wire_field("language", check_str, None)
    app_id: str | None = wire_field("appId", check_str, None)
    secret_id: str | None = wire_field("secretId", check_str, None)
    secret_key: str | None = wire_field("secretKey", check_str, None, aliases=("apiKey",))
    model_type: str | None = wire_field("modelType", check_str, None, aliases=("model",))
    buffer_size: int | None = wire_field("bufferSize", check_u64, None)
    samplerate: int | None = wire_field("samplerate", check_u32, None)
    endpoint: str | None = wire_field("endpoint", check_str, None)
    extra: dict[str, str] | None = wire_field("extra", check_map, None)
    start_when_answer: bool | None = wire_field("startWhenAnswer", check_bool, None)


# --- §4.6 ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SynthesisOption(WireObject):
    """Text-to-speech settings (§4.6); every field is None when not given.

    Use :meth:`with_defaults` for the effective values and :meth:`merged_over`
    for the ``tts`` command rule (command option over call-level option).
    """

    DEFAULT_SAMPLERATE: ClassVar[int] = 16000
    DEFAULT_SPEED: ClassVar[float] = 1.0
    DEFAULT_VOLUME: ClassVar[int] = 5
    DEFAULT_CODEC: ClassVar[str] = "pcm"

    provider: str | None = wire_field("provider", check_str, None)
    samplerate: int | None = wire_field("samplerate", check_i32, None)
    speed: float | None = wire_field("speed", check_f32, None)
    volume: int | None = wire_field("volume", check_i32, None)
    speaker: str | None = wire_field("speaker", check_str, None)
    codec: str | None = wire_field("codec", check_str, None)
    subtitle: bool | None = wire_field("subtitle", check_bool, None)
    model: str | None = wire_field("model", check_str, None, aliases=("voice",))
    emotion: str | None = wire_field("emotion", check_str, None)
    language: str | None = wire_field("language", check_str, None)
    endpoint: str | None = wire_field("endpoint", check_str, None)
    app_id: str | None = wire_field("appId", check_str, None)
    secret_id: str | None = wire_field("secretId", check_str, None)
    secret_key: str | None = wire_field("secretKey", check_str, None, aliases=("apiKey",))
    extra: dict[str, str] | None = wire_field("extra", check_map, None)
    max_concurrent_tasks: int | None = wire_field("maxConcurrentTasks", check_u64, None)
    session_id: str | None = wire_field("sessionId", check_str, None)

    def with_defaults(self) -> SynthesisOption:
        """Fill samplerate 16000, speed 1.0, volume 5 and codec ``pcm`` where not given."""
        return dataclasses.replace(
            self,
            samplerate=self.DEFAULT_SAMPLERATE if self.samplerate is None else self.samplerate,
            speed=self.DEFAULT_SPEED if self.speed is None else self.speed,
            volume=self.DEFAULT_VOLUME if self.volume is None else self.volume,
            codec=self.DEFAULT_CODEC if self.codec is None else self.codec,
        )

    def merged_over(self, base: SynthesisOption | None) -> SynthesisOption:
        """This (``tts`` command) option merged over the call-level ``base``, field by field.

        Command values win; other fields come from ``base``.  As in AC (§6 item 17),
        samplerate/speed/volume/codec are never inherited: the command's own
        value, else the default.  The result has those four filled.
        """
        names = [
            f.name
            for f in dataclasses.fields(self)
            if f.name not in ("samplerate", "speed", "volume", "codec")
        ]
        return _fill_missing(self, base, names).with_defaults()


# --- §4.7 ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MediaPassOption(WireObject):
    """Agent audio from an external WebSocket (§4.7); url and both rates are required."""

    url: str = wire_field("url", check_str)
    input_sample_rate: int = wire_field("inputSampleRate", int_range(8000, 48000))
    output_sample_rate: int = wire_field("outputSampleRate", int_range(8000, 48000))
    packet_size: int = wire_field("packetSize", int_range(320, 64000), 3200)
    ptime: int | None = wire_field("ptime", int_range(10, 1000), None)


# --- §4.8 ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AmbianceOption(WireObject):
    """Background sound (§4.8); None = not given (the server's ``[ambiance]`` table fills it)."""

    path: str | None = wire_field("path", check_str, None)
    duck_level: float | None = wire_field("duckLevel", check_f32, None)
    normal_level: float | None = wire_field("normalLevel", check_f32, None)
    transition_speed: float | None = wire_field("transitionSpeed", check_f32, None)
    enabled: bool | None = wire_field("enabled", check_bool, None)

    def merged_over(self, base: AmbianceOption | None) -> AmbianceOption:
        """Fields not given here come from ``base`` (e.g. the config table)."""
        return _fill_missing(self, base, [f.name for f in dataclasses.fields(self)])

    def with_defaults(self) -> AmbianceOption:
        """Fill duckLevel 0.1, normalLevel 0.3, transitionSpeed 0.01, enabled true."""
        return self.merged_over(
            AmbianceOption(duck_level=0.1, normal_level=0.3, transition_speed=0.01, enabled=True)
        )


# --- §4.9 / §4.10 --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EouOption(WireObject):
    """End-of-utterance detection (§4.9)."""

    type: str | None = wire_field("type", check_str, None)
    endpoint: str | None = wire_field("endpoint", check_str, None)
    secret_key: str | None = wire_field("secretKey", check_str, None, aliases=("apiKey",))
    secret_id: str | None = wire_field("secretId", check_str, None)
    timeout: int | None = wire_field("timeout", check_u32, None)
    extra: dict[str, str] | None = wire_field("extra", check_map, None)


@dataclass(frozen=True, slots=True)
class InterruptionOption(WireObject):
    """Barge-in policy (playbook.md §9; **activecall** also takes it as ``option.interruption``).

    ``strategy``: which caller events cut the agent's speech: ``both`` (VAD ``speaking`` or an ASR
    partial), ``vad``, ``asr`` or ``none``.
    """

    strategy: str = wire_field("strategy", one_of(("both", "vad", "asr", "none")), "both")
    ignore_first_ms: int = wire_field("ignoreFirstMs", check_u32, 800)
    filler_word_filter: bool = wire_field("fillerWordFilter", check_bool, False)
    volume_fade_ms: int | None = wire_field("volumeFadeMs", check_u32, None)
    min_speech_ms: int = wire_field("minSpeechMs", check_u32, 0)


@dataclass(frozen=True, slots=True)
class RealtimeOption(WireObject):
    """Speech-to-speech model (§4.10); ``turn_detection``/``tools`` are free-form JSON."""

    provider: str | None = wire_field("provider", check_str, None)
    model: str | None = wire_field("model", check_str, None)
    secret_key: str | None = wire_field("secretKey", check_str, None, aliases=("apiKey",))
    secret_id: str | None = wire_field("secretId", check_str, None)
    endpoint: str | None = wire_field("endpoint", check_str, None)
    turn_detection: Any = wire_field("turnDetection", check_any, None)
    tools: list[Any] | None = wire_field("tools", check_list, None)
    extra: dict[str, str] | None = wire_field("extra", check_map, None)


# --- §4.12 / §4.13 -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RingbackDetectionOption(WireObject):
    """Early-media line-state classification (§4.12); missing keys take the spec defaults."""

    enabled: bool = wire_field("enabled", check_bool, False)
    model_weights_path: str = wire_field(
        "modelWeightsPath", check_str, "./telcoclassifier_weights.bin"
    )
    min_buffer_secs: float = wire_field("minBufferSecs", check_f32, 6.0)
    detection_interval_secs: float = wire_field("detectionIntervalSecs", check_f32, 2.0)
    confidence_threshold: float = wire_field("confidenceThreshold", check_f32, 0.5)
    on_state_change_only: bool = wire_field("onStateChangeOnly", check_bool, True)
    sliding_window_size: int = wire_field("slidingWindowSize", check_u64, 6)
    final_confidence_threshold: float = wire_field("finalConfidenceThreshold", check_f32, 0.9)


@dataclass(frozen=True, slots=True)
class AgcOption(WireObject):
    """Automatic gain control (§4.13); ``{}`` means all defaults.  Values are bounded to what the model
    can use (a 90 dB gain already lifts the quietest 16-bit sample to full scale)."""

    headroom_db: float = wire_field("headroomDb", float_range(0.0, 60.0), 5.0)
    max_gain_db: float = wire_field("maxGainDb", float_range(0.0, 90.0), 50.0)
    initial_gain_db: float = wire_field("initialGainDb", float_range(0.0, 90.0), 15.0)
    max_gain_change_db_per_second: float = wire_field(
        "maxGainChangeDbPerSecond", float_range(0.1, 1000.0), 6.0
    )
    max_output_noise_level_dbfs: float = wire_field(
        "maxOutputNoiseLevelDbfs", float_range(-90.0, 0.0), -50.0
    )
    adjacent_speech_frames_threshold: int = wire_field(
        "adjacentSpeechFramesThreshold", int_range(1, 1000), 12
    )
    enable_limiter: bool = wire_field("enableLimiter", check_bool, True)


# --- §4.11 ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReferOption(WireObject):
    """Options of the ``refer`` command's transfer leg (§4.11)."""

    timeout: int = wire_field("timeout", check_u32, 30)
    auto_hangup: bool = wire_field("autoHangup", check_bool, True)
    moh: str | None = wire_field("moh", check_str, None)
    sip: SipOption | None = wire_field("sip", nested(SipOption), None)
    vad: VadOption | None = wire_field("vad", nested(VadOption), None)
    asr: TranscriptionOption | None = wire_field("asr", nested(TranscriptionOption), None)
    denoise: bool | None = wire_field("denoise", check_bool, None)
    agc: AgcOption | None = wire_field("agc", nested(AgcOption), None)
    call_id: str | None = wire_field("callId", check_str, None)
    pause_parent_asr: bool = wire_field("pauseParentAsr", check_bool, False)
    forward_dtmf: bool = wire_field("forwardDtmf", check_bool, True)
    # **activecall**: true = a real SIP REFER (RFC 3515 blind transfer) instead of a bridged leg.
    sip_refer: bool = wire_field("sipRefer", check_bool, False)

    @property
    def timeout_s(self) -> int:
        """Seconds allowed for the transfer INVITE to be answered."""
        return self.timeout


# --- §4.1 ----------------------------------------------------------------------------------

CALL_CODECS: tuple[str, ...] = ("pcm", "pcmu", "pcma", "g722")

# Fields a new CallOption inherits from the session's existing one when it lacks
# them (§4.1 merge rule; realtime and sip are the activecall additions).  The one
# list of call-option keys: MERGED_OPTION_KEYS (below CallOption) is its wire spelling.
_CALL_MERGED_FIELDS: tuple[str, ...] = (
    "asr",
    "tts",
    "vad",
    "denoise",
    "agc",
    "recorder",
    "eou",
    "interruption",
    "extra",
    "ambiance",
    "ringback_detection",
    "realtime",
    "sip",
)


@dataclass(frozen=True, slots=True)
class CallOption(WireObject):
    """The option of ``invite``/``start``/``accept`` (§4.1).

    Fields that take part in the merge rule are None when not given.  ``offer``
    also accepts the seed spelling ``sdp`` (``offer`` wins).  ``sip`` is
    serialized as ``null`` when absent, as AC's ``/list`` does.
    """

    caller: str | None = wire_field("caller", check_sip_text, None)
    callee: str | None = wire_field("callee", check_sip_text, None)
    offer: str | None = wire_field("offer", check_str, None, aliases=("sdp",))
    codec: str = wire_field("codec", check_str, "pcm")
    sample_rate: int = wire_field("sampleRate", int_range(8000, 48000), 16000)
    playbook: str | None = wire_field("playbook", check_str, None)
    denoise: bool | None = wire_field("denoise", check_bool, None)
    vad: VadOption | None = wire_field("vad", nested(VadOption), None)
    agc: AgcOption | None = wire_field("agc", nested(AgcOption), None)
    asr: TranscriptionOption | None = wire_field("asr", nested(TranscriptionOption), None)
    tts: SynthesisOption | None = wire_field("tts", nested(SynthesisOption), None)
    recorder: RecorderOption | None = wire_field("recorder", nested(RecorderOption), None)
    media_pass: MediaPassOption | None = wire_field(
        "mediaPass", nested(MediaPassOption), None
    )
    eou: EouOption | None = wire_field("eou", nested(EouOption), None)
    interruption: InterruptionOption | None = wire_field("interruption", nested(InterruptionOption), None)
    realtime: RealtimeOption | None = wire_field("realtime", nested(RealtimeOption), None)
    ambiance: AmbianceOption | None = wire_field("ambiance", nested(AmbianceOption), None)
    ringback_detection: RingbackDetectionOption | None = wire_field(
        "ringbackDetection", nested(RingbackDetectionOption), None
    )
    handshake_timeout: int | None = wire_field("handshakeTimeout", check_u64, None)
    enable_ipv6: bool = wire_field("enableIpv6", check_bool, False)
    enable_ice_lite: bool | None = wire_field("enableIceLite", check_bool, None)
    inactivity_timeout: int | None = wire_field("inactivityTimeout", check_u64, None)
    subscribe: bool = wire_field("subscribe", check_bool, False)
    sip: SipOption | None = wire_field("sip", nested(SipOption), None, keep_none=True)
    extra: dict[str, str] | None = wire_field("extra", check_map, None)

    @property
    def audio_codec(self) -> str:
        """The ``/call`` codec: ``codec`` lower-cased, anything unknown meaning ``pcm``."""
        name = self.codec.lower()
        return name if name in CALL_CODECS else "pcm"

    def merged_over(self, base: CallOption | None) -> CallOption:
        """This option with asr/tts/vad/denoise/agc/recorder/eou/extra/ambiance/
        ringbackDetection/realtime/sip taken from ``base`` where missing (§4.1)."""
        return _fill_missing(self, base, _CALL_MERGED_FIELDS)

    @classmethod
    def from_mapping(cls, obj: Mapping[str, Any], path: str = "option") -> CallOption:
        """Decode a CallOption from a parsed mapping (playbooks, webhooks)."""
        return cls.from_json(dict(obj), path)


#: The wire keys of the merged fields (``ringbackDetection``...): the keys of a playbook's
#: front matter that become the call's options (playbook §4).
MERGED_OPTION_KEYS: tuple[str, ...] = tuple(
    f.metadata["wire"].key for f in dataclasses.fields(CallOption) if f.name in _CALL_MERGED_FIELDS
)
