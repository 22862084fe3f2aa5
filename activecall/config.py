"""The TOML configuration file and command-line overrides (config.md), as frozen dataclasses.

Pure: TOML text (plus :class:`Overrides`) in, a validated :class:`Config` out. Any problem is
one :class:`ConfigError` naming the key path and the reason; unknown keys and other harmless
oddities become strings in ``Config.warnings`` for the caller to log.

Only :func:`load_config` (reads the file, checks the TLS files with ``os.access``) touches the
file system.  The routing rules the tables are read into are :mod:`activecall.routing`, their
Rust-dialect patterns are compiled by :mod:`activecall.rustregex`, and the ``.env`` file is
:mod:`activecall.dotenv`'s.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias, TypeVar

from activecall import __version__
from activecall.routing import PlaybookRule, Rewrite, TrunkRule
from activecall.rustregex import compile_rust_regex, convert_replacement

__all__ = [
    "AmbianceConfig",
    "ApiConfig",
    "FetchConfig",
    "SipLimitsConfig",
    "WebhookSigningConfig",
    "CallRecordConfig",
    "Config",
    "ConfigError",
    "Credential",
    "IceServer",
    "Overrides",
    "PlaybookHandlerConfig",
    "RecordingConfig",
    "RegisterUser",
    "SipAclConfig",
    "SipRateLimitConfig",
    "WebhookHandlerConfig",
    "check_files",
    "unreadable_reason",
    "load_config",
    "normalize_codecs",
    "parse_config",
    "parse_duration",
]


class ConfigError(ValueError):
    """A configuration problem that prevents start-up: ``"<key_path>: <reason>"``."""

    def __init__(self, key_path: str, reason: str) -> None:
        super().__init__(f"{key_path}: {reason}")
        self.key_path = key_path
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Defaults (config.md §3)

DEFAULT_HTTP_ADDR: Final = "0.0.0.0:8080"
DEFAULT_ADDR: Final = "0.0.0.0"
DEFAULT_UDP_PORT: Final = 25060
DEFAULT_USERAGENT: Final = f"activecall({__version__})"
DEFAULT_ACCEPT_TIMEOUT_S: Final = 60.0
DEFAULT_CODECS: Final = ("pcmu", "pcma", "g722", "g729", "opus", "telephone_event")
DEFAULT_MEDIA_CACHE_PATH: Final = "./config/mediacache"
DEFAULT_RECORDING_PATH: Final = "./config/recorders"
DEFAULT_MODELS_DIR: Final = "./models"
# docs/config-security.md: a trunk at ~15 calls/s (INVITE, ACK, BYE) stays under 50/s;
# the burst absorbs a PBX re-registering all its phones after a restart.
DEFAULT_SIP_RATE_PER_S: Final = 50.0
DEFAULT_SIP_RATE_BURST: Final = 200

# [api] (config.md §14a): the control plane's access and resource limits.
DEFAULT_ENV_PREFIX: Final = "ACTIVECALL_"
DEFAULT_MAX_SESSIONS: Final = 2000
DEFAULT_MAX_MESSAGE_BYTES: Final = 1024 * 1024
DEFAULT_MAX_FRAME_BYTES: Final = 64 * 1024  # one binary audio frame
DEFAULT_PONG_TIMEOUT_S: Final = 30.0
DEFAULT_HEADER_TIMEOUT_S: Final = 10.0
DEFAULT_MAX_CONNECTIONS_PER_IP: Final = 64
DEFAULT_MAX_DUMP_BYTES: Final = 64 * 1024 * 1024
# [sip_limits]
DEFAULT_MAX_CALLS: Final = 1000
DEFAULT_MAX_PENDING_INVITES: Final = 200
# [fetch]: URLs the daemon downloads (play, webhook, posthook, playbook <http/>).
DEFAULT_FETCH_CONNECT_TIMEOUT_S: Final = 5.0
DEFAULT_FETCH_TIMEOUT_S: Final = 30.0
DEFAULT_FETCH_MAX_BYTES: Final = 32 * 1024 * 1024
DEFAULT_MEDIA_DIRS: Final = ("./config/media",)

LOG_LEVELS: Final = ("trace", "debug", "info", "warn", "error", "off")
RECORDING_FORMATS: Final = ("wav", "pcm", "pcmu", "pcma", "g722")
S3_VENDORS: Final = ("aliyun", "tencent", "minio", "aws", "gcp", "azure", "digitalocean")

_CODEC_NAMES: Final = {
    "pcmu": "pcmu",
    "pcma": "pcma",
    "g722": "g722",
    "g729": "g729",
    "opus": "opus",
    "telephone_event": "telephone_event",
    "telephone-event": "telephone_event",
    "dtmf": "telephone_event",
    "2833": "telephone_event",
}


# ---------------------------------------------------------------------------------------------
# Result dataclasses


@dataclass(frozen=True)
class WebhookHandlerConfig:
    """``[handler] type = "webhook"``: notify ``urls`` (round-robin) of each inbound INVITE."""

    urls: tuple[str, ...] = ()
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PlaybookHandlerConfig:
    """``[handler] type = "playbook"``: first matching rule, else ``default``, else 503."""

    default: str | None = None
    rules: tuple[PlaybookRule, ...] = ()

    def select(self, caller_uri: str, callee_uri: str) -> str | None:
        """Return the playbook for a call, or ``None`` when nothing applies."""
        for rule in self.rules:
            if rule.matches(caller_uri, callee_uri):
                return rule.playbook
        return self.default


HandlerConfig: TypeAlias = WebhookHandlerConfig | PlaybookHandlerConfig


@dataclass(frozen=True)
class Credential:
    """Digest credentials of a ``[[register_users]]`` entry."""

    username: str
    password: str
    realm: str | None = None


@dataclass(frozen=True)
class RegisterUser:
    """One ``[[register_users]]`` account; ``server`` always carries ``sip:`` or ``sips:``."""

    server: str
    username: str
    display_name: str | None = None
    disabled: bool = False
    credential: Credential | None = None


@dataclass(frozen=True)
class SipAclConfig:
    """``[sip_acl]`` (docs/config-security.md): request sources by network; deny wins.

    Empty ``allow`` admits every source not in ``deny``.
    """

    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class SipRateLimitConfig:
    """``[sip_rate_limit]`` (docs/config-security.md): token bucket per request source.

    ``exempt`` sources (trusted trunks) skip the limit but not the ACL.
    """

    enabled: bool = True
    requests_per_second: float = DEFAULT_SIP_RATE_PER_S
    burst: int = DEFAULT_SIP_RATE_BURST
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class IceServer:
    """One ``[[ice_servers]]`` entry (W3C ``RTCIceServer``)."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None
    credential_type: str = "password"


@dataclass(frozen=True)
class RecordingConfig:
    """``[recording]``: automatic recording policy and default recorder settings."""

    enabled: bool = False
    auto_start: bool = False
    path: str = DEFAULT_RECORDING_PATH
    format: str = "wav"
    samplerate: int | None = None
    ptime: int | None = None
    filename_pattern: str | None = None


@dataclass(frozen=True)
class CallRecordConfig:
    """``[callrecord]``: where CDRs go; ``type`` is ``local``, ``s3`` or ``http``.

    Keys not belonging to ``type`` stay ``None``; ``headers`` is only used by ``http``.
    """

    type: str
    root: str | None = None
    vendor: str | None = None
    bucket: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    endpoint: str | None = None
    url: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    with_media: bool = False
    keep_media_copy: bool = False


@dataclass(frozen=True)
class AmbianceConfig:
    """``[ambiance]`` (camelCase keys in TOML): global background sound defaults."""

    path: str | None = None
    duck_level: float = 0.1
    normal_level: float = 0.3
    transition_speed: float = 0.01
    enabled: bool = True


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]`` (config.md §14b, docs/cluster.md): the shared call registry of several nodes."""

    redis_url: str | None = None
    advertise_url: str | None = None  # None: http://<http_addr>
    node_id: str | None = None  # None: the host name
    registry_ttl_s: float = 30.0


@dataclass(frozen=True)
class ApiConfig:
    """``[api]`` (config.md §14a, docs/security.md): who may use the control plane, and its limits.

    ``tokens`` empty = no authentication (Active Call's behaviour). ``allowed_origins`` empty =
    browsers only from the daemon's own origin; requests without ``Origin`` are not browsers.
    """

    tokens: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    env_prefix: str = DEFAULT_ENV_PREFIX
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    pong_timeout_s: float = DEFAULT_PONG_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP
    max_dump_bytes: int = DEFAULT_MAX_DUMP_BYTES


@dataclass(frozen=True)
class SipLimitsConfig:
    """``[sip_limits]``: calls at once (503 + Retry-After beyond) and INVITEs awaiting a client,
    in all and per source address (sources on the ACL allow list, exempt or registrars excepted)."""

    max_calls: int = DEFAULT_MAX_CALLS
    max_pending_invites: int = DEFAULT_MAX_PENDING_INVITES
    # One untrusted source's share of max_pending_invites (None = a quarter of it).
    max_pending_per_source: int | None = None


@dataclass(frozen=True)
class WebhookSigningConfig:
    """``[webhook]``: ``signing_secret`` set = webhook and posthook POSTs carry
    ``X-Activecall-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of "t.body">``."""

    signing_secret: str | None = None


@dataclass(frozen=True)
class FetchConfig:
    """``[fetch]``: how the daemon downloads URLs it is given (play, webhook, posthook, ``<http/>``).

    Redirects are followed on the same host only unless ``follow_redirects``; ``allowed_hosts``
    non-empty = only those hosts (exact names or ``*.suffix``). Local ``play`` paths must lie
    under one of ``media_dirs``.
    """

    connect_timeout_s: float = DEFAULT_FETCH_CONNECT_TIMEOUT_S
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_bytes: int = DEFAULT_FETCH_MAX_BYTES
    follow_redirects: bool = False
    max_redirects: int = 5
    allowed_hosts: tuple[str, ...] = ()
    media_dirs: tuple[str, ...] = DEFAULT_MEDIA_DIRS


@dataclass(frozen=True)
class Config:
    """The validated daemon configuration; ``Config()`` is the built-in defaults."""

    http_addr: str = DEFAULT_HTTP_ADDR
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    addr: str = DEFAULT_ADDR
    udp_port: int = DEFAULT_UDP_PORT
    http_gzip: bool = False
    log_level: str = "info"
    log_file: str | None = None
    http_access_skip_paths: tuple[str, ...] = ()
    useragent: str = DEFAULT_USERAGENT
    graceful_shutdown: bool = True
    graceful_shutdown_timeout: int = 30
    accept_timeout_s: float = DEFAULT_ACCEPT_TIMEOUT_S
    codecs: tuple[str, ...] = DEFAULT_CODECS
    external_ip: str | None = None
    auto_learn_public_address: bool = False
    rtp_start_port: int = 12000
    rtp_end_port: int = 42000
    enable_rtp_latching: bool = True
    rtp_bind_ip: str | None = None
    enable_ice_lite: bool | None = None
    enable_options_response: bool = True
    peers: tuple[str, ...] = ()
    media_cache_path: str = DEFAULT_MEDIA_CACHE_PATH
    tls_port: int | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    enable_srtp: bool = False
    handler: HandlerConfig | None = None
    register_users: tuple[RegisterUser, ...] = ()
    sip_acl: SipAclConfig = field(default_factory=SipAclConfig)
    sip_rate_limit: SipRateLimitConfig = field(default_factory=SipRateLimitConfig)
    ice_servers: tuple[IceServer, ...] = ()
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    callrecord: CallRecordConfig | None = None
    ambiance: AmbianceConfig = field(default_factory=AmbianceConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    rewrites: tuple[Rewrite, ...] = ()
    trunk_rules: tuple[TrunkRule, ...] = ()
    api: ApiConfig = field(default_factory=ApiConfig)
    sip_limits: SipLimitsConfig = field(default_factory=SipLimitsConfig)
    webhook: WebhookSigningConfig = field(default_factory=WebhookSigningConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    call: str | None = None
    models_dir: str = DEFAULT_MODELS_DIR
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Overrides:
    """Command-line options that override the file (config.md §2); ``None`` = not given."""

    http: str | None = None
    sip: str | None = None
    handler: str | None = None
    call: str | None = None
    external_ip: str | None = None
    codecs: str | None = None
    models_dir: str | None = None


# ---------------------------------------------------------------------------------------------
# Small value parsers (public where other layers need the same rules)

_DURATION_ITEM = re.compile(r"\s*([0-9]{1,15})\s*([A-Za-zµ]+)")
# humantime's unit names (what AC uses for accept_timeout); case matters: M = month, m = minute.
_DURATION_UNITS: Final[Mapping[str, float]] = {
    **dict.fromkeys(("nanos", "nsec", "ns"), 1e-9),
    **dict.fromkeys(("usec", "us", "µs"), 1e-6),
    **dict.fromkeys(("millis", "msec", "ms"), 1e-3),
    **dict.fromkeys(("seconds", "second", "secs", "sec", "s"), 1.0),
    **dict.fromkeys(("minutes", "minute", "mins", "min", "m"), 60.0),
    **dict.fromkeys(("hours", "hour", "hrs", "hr", "h"), 3600.0),
    **dict.fromkeys(("days", "day", "d"), 86400.0),
    **dict.fromkeys(("weeks", "week", "wk", "wks", "w"), 604800.0),
    **dict.fromkeys(("months", "month", "M"), 2630016.0),
    **dict.fromkeys(("years", "year", "yr", "yrs", "y"), 31557600.0),
}


def parse_duration(text: str) -> float | None:
    """Parse a humantime duration (``"30s"``, ``"2m"``, ``"1h 5m"``, ``"500ms"``) to seconds.

    Returns ``None`` when the text is not a duration (empty, bare number, unknown unit).
    """
    s = text.strip()
    if not s:
        return None
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_ITEM.match(s, pos)
        if m is None:
            return None
        factor = _DURATION_UNITS.get(m.group(2))
        if factor is None:
            return None
        total += int(m.group(1)) * factor
        pos = m.end()
        while pos < len(s) and s[pos].isspace():
            pos += 1
    return total


def normalize_codecs(names: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Map codec names to canonical ones in order, dropping duplicates.

    Returns ``(codecs, unknown)``: the recognised canonical names and the names ignored.
    """
    out: list[str] = []
    unknown: list[str] = []
    for name in names:
        canonical = _CODEC_NAMES.get(name.strip().lower())
        if canonical is None:
            unknown.append(name)
        elif canonical not in out:
            out.append(canonical)
    return tuple(out), tuple(unknown)


# ---------------------------------------------------------------------------------------------
# Typed access to one TOML table, with key paths and unknown-key warnings

_MISSING: Final = object()

_ARTICLE_TYPE: Final = {
    "bool": "a boolean",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "list": "an array",
    "dict": "a table",
}


def _type_name(value: object) -> str:
    """Name a TOML value's type as a user would: ``string``, ``integer``, ``table``…"""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, datetime.datetime):
        return "datetime"
    if isinstance(value, datetime.date):
        return "date"
    if isinstance(value, datetime.time):
        return "time"
    return type(value).__name__


def _expect(value: object, kind: str, path: str) -> Any:
    """Check ``value`` is of TOML kind ``kind`` (bool/int/float/str/list/dict) or raise."""
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "list":
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, dict)
    if not ok:
        raise ConfigError(path, f"expected {_ARTICLE_TYPE[kind]}, got {_type_name(value)}")
    return value


def _child_path(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


class _Table:
    """One TOML table being read: typed getters that know their key paths, and unknown keys."""

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        warnings: list[str],
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self._data = data
        self.path = path
        self._warnings = warnings
        # Keys whose value came from somewhere else (an option, [ua]) report that origin.
        self._labels: Mapping[str, str] = labels or {}
        self._used: set[str] = set()

    def key_path(self, key: str) -> str:
        """Return the path used in errors and warnings for ``key``."""
        return self._labels.get(key) or _child_path(self.path, key)

    def warn(self, message: str) -> None:
        """Collect a warning for the caller to log."""
        self._warnings.append(message)

    def keys(self) -> list[str]:
        """Return the keys present, in file order."""
        return list(self._data)

    def raw(self, key: str) -> Any:
        """Return the value of ``key`` (or ``_MISSING``) and mark it as known."""
        self._used.add(key)
        return self._data.get(key, _MISSING)

    def _get(self, key: str, kind: str) -> Any:
        value = self.raw(key)
        if value is _MISSING:
            return _MISSING
        return _expect(value, kind, self.key_path(key))

    def string(self, key: str, default: str) -> str:
        """Return a string value or ``default``."""
        value = self._get(key, "str")
        return default if value is _MISSING else value

    def opt_string(self, key: str) -> str | None:
        """Return a string value or ``None``."""
        value = self._get(key, "str")
        return None if value is _MISSING else value

    def req_string(self, key: str, *, allow_empty: bool = True) -> str:
        """Return a required string value."""
        value = self._get(key, "str")
        if value is _MISSING:
            raise ConfigError(self.key_path(key), "required")
        if not allow_empty and not value.strip():
            raise ConfigError(self.key_path(key), "must not be empty")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        """Return a boolean value or ``default``."""
        value = self._get(key, "bool")
        return default if value is _MISSING else value

    def opt_bool(self, key: str) -> bool | None:
        """Return a boolean value or ``None``."""
        value = self._get(key, "bool")
        return None if value is _MISSING else value

    def opt_int(self, key: str, *, minimum: int | None = None) -> int | None:
        """Return an integer value (at least ``minimum``) or ``None``."""
        value = self._get(key, "int")
        if value is _MISSING:
            return None
        if minimum is not None and value < minimum:
            raise ConfigError(self.key_path(key), f"must be at least {minimum}, got {value}")
        return int(value)

    def integer(self, key: str, default: int, *, minimum: int | None = None) -> int:
        """Return an integer value or ``default``."""
        value = self.opt_int(key, minimum=minimum)
        return default if value is None else value

    def opt_port(self, key: str) -> int | None:
        """Return a port number in 1-65535 or ``None``."""
        value = self._get(key, "int")
        if value is _MISSING:
            return None
        return _check_port(value, self.key_path(key))

    def port(self, key: str, default: int) -> int:
        """Return a port number in 1-65535 or ``default``."""
        value = self.opt_port(key)
        return default if value is None else value

    def number(self, key: str, default: float, *, minimum: float | None = None) -> float:
        """Return a float (TOML integers accepted) or ``default``."""
        value = self._get(key, "float")
        if value is _MISSING:
            return default
        if minimum is not None and value < minimum:
            raise ConfigError(self.key_path(key), f"must be at least {minimum}, got {value}")
        return float(value)

    def strings(self, key: str, hint: str = "") -> tuple[str, ...] | None:
        """Return an array of strings or ``None``; ``hint`` is added to a not-an-array error."""
        value = self.raw(key)
        if value is _MISSING:
            return None
        path = self.key_path(key)
        if not isinstance(value, list):
            raise ConfigError(path, f"expected an array of strings{hint}, got {_type_name(value)}")
        for i, item in enumerate(value):
            _expect(item, "str", f"{path}[{i}]")
        return tuple(value)

    def table(self, key: str) -> _Table | None:
        """Return a sub-table reader or ``None``."""
        value = self._get(key, "dict")
        if value is _MISSING:
            return None
        return _Table(value, self.key_path(key), self._warnings)

    def tables(self, key: str) -> list[_Table]:
        """Return readers for an array of tables (empty when absent)."""
        value = self.raw(key)
        if value is _MISSING:
            return []
        path = self.key_path(key)
        if not isinstance(value, list):
            raise ConfigError(path, f"expected an array of tables, got {_type_name(value)}")
        out = []
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            out.append(_Table(_expect(item, "dict", item_path), item_path, self._warnings))
        return out

    def finish(self) -> None:
        """Warn once for each key nobody asked for."""
        for key in self._data:
            if key not in self._used:
                self._warnings.append(f"unknown key: {self.key_path(key)}")


def _check_port(value: int, path: str) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(path, f"expected a port in 1-65535, got {value}")
    return value


def _check_ip(value: str, path: str) -> str:
    """Require an IPv4/IPv6 literal (no brackets, no port)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(path, f"must be an IP literal, got {value!r}") from None
    return value


_PORT_DIGITS = re.compile(r"[0-9]{1,5}")


def _split_ip_port(text: str) -> tuple[str, str] | None:
    """Split ``IP:PORT`` / ``[IPv6]:PORT`` into host and port text, or ``None`` if not that form."""
    if text.startswith("["):
        close = text.find("]:")
        if close < 0:
            return None
        return text[1:close], text[close + 2 :]
    if text.count(":") != 1:
        return None  # bare IPv6 or no port at all
    host, _, port = text.partition(":")
    return host, port


def _parse_ip_port(text: str, path: str) -> tuple[str, int]:
    """Parse and validate ``IP:PORT`` (IPv6 in brackets)."""
    parts = _split_ip_port(text)
    if parts is None or _PORT_DIGITS.fullmatch(parts[1]) is None:
        raise ConfigError(path, f"expected IP:PORT, got {text!r}")
    host, port = parts
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(path, f"expected IP:PORT with an IP literal, got {text!r}") from None
    return host, _check_port(int(port), path)


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_ORIGIN = re.compile(r"(?i)https?://([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


def _compile(pattern: str, path: str) -> re.Pattern[str]:
    try:
        return compile_rust_regex(pattern)
    except ValueError as e:
        raise ConfigError(path, f"invalid regex: {e}") from None


def _opt_regex(t: _Table, key: str) -> re.Pattern[str] | None:
    source = t.opt_string(key)
    return None if source is None else _compile(source, t.key_path(key))


# ---------------------------------------------------------------------------------------------
# Tables


def _read_handler(t: _Table) -> HandlerConfig:
    kind = t.raw("type")
    type_path = t.key_path("type")
    if kind is _MISSING:
        raise ConfigError(type_path, "required; expected one of webhook, playbook")
    kind = _expect(kind, "str", type_path).strip().lower()
    if kind == "webhook":
        return _read_webhook(t)
    if kind == "playbook":
        return _read_playbook(t)
    raise ConfigError(type_path, "expected one of webhook, playbook")


def _read_pairs(t: _Table, key: str) -> tuple[tuple[str, str], ...]:
    """Read ``[[name, value], ...]`` header pairs."""
    value = t.raw(key)
    if value is _MISSING:
        return ()
    path = t.key_path(key)
    if not isinstance(value, list):
        raise ConfigError(
            path, f"expected an array of [name, value] pairs, got {_type_name(value)}"
        )
    pairs: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        if not isinstance(item, list) or len(item) != 2:
            got = f"{len(item)} items" if isinstance(item, list) else _type_name(item)
            raise ConfigError(item_path, f"expected a [name, value] pair, got {got}")
        name = _expect(item[0], "str", f"{item_path}[0]")
        header_value = _expect(item[1], "str", f"{item_path}[1]")
        if _TOKEN.fullmatch(name) is None:
            raise ConfigError(f"{item_path}[0]", f"expected an HTTP header name, got {name!r}")
        pairs.append((name, header_value))
    return tuple(pairs)


def _is_http_url(text: str) -> bool:
    low = text.lower()
    return low.startswith("http://") or low.startswith("https://")


def _read_webhook(t: _Table) -> WebhookHandlerConfig:
    urls = t.strings("urls")
    url = t.opt_string("url")
    if urls:
        chosen, base = urls, t.key_path("urls")
        paths = [f"{base}[{i}]" for i in range(len(urls))]
    elif url is not None and url.strip():
        chosen, paths = (url,), [t.key_path("url")]
    else:
        chosen, paths = (), []
    for value, path in zip(chosen, paths):
        if not _is_http_url(value.strip()):
            raise ConfigError(path, f"expected an http:// or https:// URL, got {value!r}")
    method = t.string("method", "POST").strip()
    if _TOKEN.fullmatch(method) is None:
        raise ConfigError(t.key_path("method"), f"expected an HTTP method token, got {method!r}")
    headers = _read_pairs(t, "headers")
    t.finish()
    if not chosen:
        t.warn(f"{t.path}: webhook handler has no url or urls; every INVITE will get 503")
    # HTTP methods are case-sensitive on the wire and "post" is what users mean by POST.
    return WebhookHandlerConfig(
        urls=tuple(u.strip() for u in chosen), method=method.upper(), headers=headers
    )


def _read_playbook(t: _Table) -> PlaybookHandlerConfig:
    default = t.opt_string("default")
    if default is not None and not default.strip():
        default = None
    rules = []
    for r in t.tables("rules"):
        caller = _opt_regex(r, "caller")
        callee = _opt_regex(r, "callee")
        playbook = r.req_string("playbook", allow_empty=False)
        r.finish()
        rules.append(PlaybookRule(caller=caller, callee=callee, playbook=playbook))
    t.finish()
    if default is None and not rules:
        t.warn(f"{t.path}: playbook handler has no default and no rules; every INVITE will get 503")
    return PlaybookHandlerConfig(default=default, rules=tuple(rules))


_SIP_SCHEME = re.compile(r"(?i)(sips?):")


def _normalize_server(server: str, path: str) -> str:
    s = server.strip()
    m = _SIP_SCHEME.match(s)
    if m is not None:
        scheme, rest = m.group(1).lower(), s[m.end() :]
    else:
        scheme, rest = "sip", s
    if not rest:
        raise ConfigError(path, f"missing host in {server!r}")
    return f"{scheme}:{rest}"


def _read_register_user(t: _Table) -> RegisterUser:
    server_path = t.key_path("server")
    server = _normalize_server(t.req_string("server", allow_empty=False), server_path)
    username = t.req_string("username", allow_empty=False)
    display_name = t.opt_string("display_name")
    disabled = t.boolean("disabled", False)
    credential = None
    c = t.table("credential")
    if c is not None:
        credential = Credential(
            username=c.req_string("username"),
            password=c.req_string("password"),
            realm=c.opt_string("realm"),
        )
        c.finish()
    t.finish()
    return RegisterUser(
        server=server,
        username=username,
        display_name=display_name,
        disabled=disabled,
        credential=credential,
    )


_Networks: TypeAlias = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def _read_networks(t: _Table, key: str) -> _Networks:
    """An array of CIDR networks (a bare address is a /32 or /128); host bits set is an error."""
    out = []
    for i, text in enumerate(t.strings(key) or ()):
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as e:
            reason = f"expected a network like 10.0.0.0/8: {e}"
            raise ConfigError(f"{t.key_path(key)}[{i}]", reason) from None
    return tuple(out)


def _read_sip_acl(t: _Table | None) -> SipAclConfig:
    if t is None:
        return SipAclConfig()
    allow = _read_networks(t, "allow")
    deny = _read_networks(t, "deny")
    t.finish()
    return SipAclConfig(allow=allow, deny=deny)


def _read_sip_rate_limit(t: _Table | None) -> SipRateLimitConfig:
    if t is None:
        return SipRateLimitConfig()
    enabled = t.boolean("enabled", True)
    rate = t.number("requests_per_second", DEFAULT_SIP_RATE_PER_S)
    if rate <= 0:
        raise ConfigError(t.key_path("requests_per_second"), f"must be positive, got {rate:g}")
    burst = t.integer("burst", max(DEFAULT_SIP_RATE_BURST, int(rate)), minimum=1)
    exempt = _read_networks(t, "exempt")
    t.finish()
    return SipRateLimitConfig(enabled=enabled, requests_per_second=rate, burst=burst, exempt=exempt)


def _duration(t: _Table, key: str, default: float, *, minimum: float = 0.0) -> float:
    """A duration given as seconds (number) or humantime text ("30s", "2m")."""
    value = t.raw(key)
    if value is _MISSING:
        return default
    path = t.key_path(key)
    if isinstance(value, str):
        parsed = parse_duration(value)
        if parsed is None:
            raise ConfigError(path, f"expected a duration like \"30s\" or seconds, got {value!r}")
    else:
        parsed = float(_expect(value, "float", path))
    if not parsed >= minimum or parsed == float("inf"):
        raise ConfigError(path, f"must be a finite duration of at least {minimum:g} s")
    return parsed


def _read_api(t: _Table | None) -> ApiConfig:
    if t is None:
        return ApiConfig()
    tokens = t.strings("tokens") or ()
    for i, token in enumerate(tokens):
        if not token or not _TOKEN68.fullmatch(token):
            raise ConfigError(f"{t.key_path('tokens')}[{i}]",
                              "expected a non-empty token of letters, digits and -._~+/=")
    origins = []
    for i, origin in enumerate(t.strings("allowed_origins") or ()):
        origin = origin.strip().rstrip("/")
        if origin != "*" and _ORIGIN.fullmatch(origin) is None:
            raise ConfigError(f"{t.key_path('allowed_origins')}[{i}]",
                              f"expected an origin like https://crm.example.com, got {origin!r}")
        origins.append(origin.lower())
    env_prefix = t.string("env_prefix", DEFAULT_ENV_PREFIX)
    if not env_prefix.strip():
        raise ConfigError(t.key_path("env_prefix"), "must not be empty (it would expose the whole environment)")
    api = ApiConfig(
        tokens=tokens,
        allowed_origins=tuple(origins),
        env_prefix=env_prefix,
        max_sessions=t.integer("max_sessions", DEFAULT_MAX_SESSIONS, minimum=1),
        max_message_bytes=t.integer("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES, minimum=1024),
        max_frame_bytes=t.integer("max_frame_bytes", DEFAULT_MAX_FRAME_BYTES, minimum=1024),
        pong_timeout_s=_duration(t, "pong_timeout", DEFAULT_PONG_TIMEOUT_S, minimum=1.0),
        header_timeout_s=_duration(t, "header_timeout", DEFAULT_HEADER_TIMEOUT_S, minimum=1.0),
        max_connections_per_ip=t.integer("max_connections_per_ip", DEFAULT_MAX_CONNECTIONS_PER_IP, minimum=1),
        max_dump_bytes=t.integer("max_dump_bytes", DEFAULT_MAX_DUMP_BYTES, minimum=0),
    )
    t.finish()
    return api


def _read_sip_limits(t: _Table | None) -> SipLimitsConfig:
    if t is None:
        return SipLimitsConfig()
    limits = SipLimitsConfig(
        max_calls=t.integer("max_calls", DEFAULT_MAX_CALLS, minimum=1),
        max_pending_invites=t.integer("max_pending_invites", DEFAULT_MAX_PENDING_INVITES, minimum=1),
        max_pending_per_source=t.opt_int("max_pending_per_source", minimum=1),
    )
    t.finish()
    return limits


def _read_webhook_signing(t: _Table | None) -> WebhookSigningConfig:
    if t is None:
        return WebhookSigningConfig()
    secret = t.opt_string("signing_secret")
    if secret is not None and not secret.strip():
        secret = None
    t.finish()
    return WebhookSigningConfig(signing_secret=secret)


_HOST_PATTERN: Final = re.compile(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


def _read_fetch(t: _Table | None) -> FetchConfig:
    if t is None:
        return FetchConfig()
    hosts = []
    for i, host in enumerate(t.strings("allowed_hosts") or ()):
        host = host.strip().lower()
        if _HOST_PATTERN.fullmatch(host) is None:
            raise ConfigError(f"{t.key_path('allowed_hosts')}[{i}]",
                              f"expected a host name, IP or *.domain, got {host!r}")
        hosts.append(host)
    media_dirs = t.strings("media_dirs")
    if media_dirs is not None:
        for i, d in enumerate(media_dirs):
            if not d.strip():
                raise ConfigError(f"{t.key_path('media_dirs')}[{i}]", "must not be empty")
    fetch = FetchConfig(
        connect_timeout_s=_duration(t, "connect_timeout", DEFAULT_FETCH_CONNECT_TIMEOUT_S, minimum=0.1),
        timeout_s=_duration(t, "timeout", DEFAULT_FETCH_TIMEOUT_S, minimum=0.1),
        max_bytes=t.integer("max_bytes", DEFAULT_FETCH_MAX_BYTES, minimum=1024),
        follow_redirects=t.boolean("follow_redirects", False),
        max_redirects=t.integer("max_redirects", 5, minimum=0),
        allowed_hosts=tuple(hosts),
        media_dirs=tuple(d.strip() for d in media_dirs) if media_dirs is not None else DEFAULT_MEDIA_DIRS,
    )
    t.finish()
    return fetch


_ICE_SCHEMES: Final = ("stun:", "stuns:", "turn:", "turns:")


def _read_ice_server(t: _Table) -> IceServer:
    urls = t.strings("urls", hint=" (even for one URI)")
    if urls is None:
        raise ConfigError(t.key_path("urls"), "required")
    if not urls:
        raise ConfigError(t.key_path("urls"), "must not be empty")
    for i, url in enumerate(urls):
        if not url.lower().startswith(_ICE_SCHEMES):
            raise ConfigError(
                f"{t.key_path('urls')}[{i}]",
                f"expected a stun:, stuns:, turn: or turns: URI, got {url!r}",
            )
    username = t.opt_string("username")
    credential = t.opt_string("credential")
    credential_type = t.string("credential_type", "password").strip().lower()
    if credential_type not in ("password", "oauth"):
        raise ConfigError(t.key_path("credential_type"), "expected one of password, oauth")
    t.finish()
    return IceServer(
        urls=urls, username=username, credential=credential, credential_type=credential_type
    )


def _read_recording(t: _Table | None) -> RecordingConfig:
    if t is None:
        return RecordingConfig()
    enabled = t.boolean("enabled", False)
    auto_start = t.boolean("auto_start", False)
    path = t.string("path", DEFAULT_RECORDING_PATH).strip() or DEFAULT_RECORDING_PATH
    fmt = t.string("format", "wav").strip().lower()
    if fmt not in RECORDING_FORMATS:
        raise ConfigError(t.key_path("format"), f"expected one of {', '.join(RECORDING_FORMATS)}")
    samplerate = t.opt_int("samplerate", minimum=1)
    ptime = t.opt_int("ptime", minimum=1)
    filename_pattern = t.opt_string("filename_pattern")
    t.finish()
    return RecordingConfig(
        enabled=enabled,
        auto_start=auto_start,
        path=path,
        format=fmt,
        samplerate=samplerate,
        ptime=ptime,
        filename_pattern=filename_pattern,
    )


def _read_callrecord(t: _Table) -> CallRecordConfig:
    type_path = t.key_path("type")
    kind = t.raw("type")
    if kind is _MISSING:
        raise ConfigError(type_path, "required; expected one of local, s3, http")
    kind = _expect(kind, "str", type_path).strip().lower()
    if kind == "local":
        result = CallRecordConfig(type="local", root=t.req_string("root"))
    elif kind == "s3":
        vendor_path = t.key_path("vendor")
        vendor = t.req_string("vendor").strip().lower().replace("_", "")
        if vendor not in S3_VENDORS:
            raise ConfigError(vendor_path, f"expected one of {', '.join(S3_VENDORS)}")
        result = CallRecordConfig(
            type="s3",
            vendor=vendor,
            bucket=t.req_string("bucket", allow_empty=False),
            region=t.req_string("region"),
            access_key=t.req_string("access_key"),
            secret_key=t.req_string("secret_key"),
            endpoint=t.req_string("endpoint"),
            root=t.req_string("root"),
            with_media=t.boolean("with_media", False),
            keep_media_copy=t.boolean("keep_media_copy", False),
        )
    elif kind == "http":
        url = t.req_string("url", allow_empty=False).strip()
        if not _is_http_url(url):
            raise ConfigError(
                t.key_path("url"), f"expected an http:// or https:// URL, got {url!r}"
            )
        headers: list[tuple[str, str]] = []
        h = t.table("headers")
        if h is not None:
            for name in h.keys():
                value = h.req_string(name)
                if _TOKEN.fullmatch(name) is None:
                    raise ConfigError(
                        h.key_path(name), f"expected an HTTP header name, got {name!r}"
                    )
                headers.append((name, value))
        result = CallRecordConfig(
            type="http",
            url=url,
            headers=tuple(headers),
            with_media=t.boolean("with_media", False),
            keep_media_copy=t.boolean("keep_media_copy", False),
        )
    else:
        raise ConfigError(type_path, "expected one of local, s3, http")
    t.finish()
    return result


def _read_ambiance(t: _Table | None) -> AmbianceConfig:
    if t is None:
        return AmbianceConfig()
    path = t.opt_string("path")
    result = AmbianceConfig(
        path=path if path is None or path.strip() else None,
        duck_level=t.number("duckLevel", 0.1, minimum=0.0),
        normal_level=t.number("normalLevel", 0.3, minimum=0.0),
        transition_speed=t.number("transitionSpeed", 0.01, minimum=0.0),
        enabled=t.boolean("enabled", True),
    )
    t.finish()
    return result


_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _read_cluster(t: _Table | None) -> ClusterConfig:
    if t is None:
        return ClusterConfig()
    redis_url = t.opt_string("redis_url")
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(t.key_path("redis_url"), "expected a redis://host:port/db (or rediss://, unix://) URL")
    advertise_url = t.opt_string("advertise_url")
    if advertise_url is not None and not advertise_url.startswith(("http://", "https://")):
        raise ConfigError(t.key_path("advertise_url"), "expected this node's http:// or https:// base URL")
    node_id = t.opt_string("node_id")
    if node_id is not None and not _NODE_ID.fullmatch(node_id):
        raise ConfigError(t.key_path("node_id"), "expected 1-63 letters, digits, '.', '_' or '-'")
    result = ClusterConfig(redis_url=redis_url, advertise_url=advertise_url.rstrip("/") if advertise_url else None,
                           node_id=node_id, registry_ttl_s=_duration(t, "registry_ttl", 30.0, minimum=3.0))
    t.finish()
    return result


def _read_rewrite(t: _Table) -> Rewrite | None:
    source = t.req_string("match")
    rewrite = t.req_string("rewrite")
    t.finish()
    try:
        pattern = compile_rust_regex(source)
    except ValueError as e:
        # config.md §12: invalid rewrite patterns are logged and skipped, not fatal.
        t.warn(f"{t.key_path('match')}: invalid regex: {e}; rule skipped")
        return None
    replacement = convert_replacement(rewrite, pattern)
    return Rewrite(match=pattern, rewrite=rewrite, replacement=replacement)


_T = TypeVar("_T")


def _user_host(
    t: _Table | None, read: Callable[[_Table, str], _T | None]
) -> tuple[_T | None, _T | None]:
    """Read the ``user`` and ``host`` keys of a trunk-rule ``from``/``to``/``contact`` table."""
    if t is None:
        return None, None
    user, host = read(t, "user"), read(t, "host")
    t.finish()
    return user, host


def _read_trunk_rule(t: _Table) -> TrunkRule:
    rule = t.table("rule")
    t.finish()
    if rule is None:
        return TrunkRule()  # no conditions, no rewrites: matches and changes nothing
    match = rule.table("match")
    rewrite = rule.table("rewrite")
    rule.finish()
    m_from = m_to = r_from = r_to = r_contact = None
    if match is not None:
        m_from, m_to = match.table("from"), match.table("to")
        match.finish()
    if rewrite is not None:
        r_from, r_to = rewrite.table("from"), rewrite.table("to")
        r_contact = rewrite.table("contact")
        rewrite.finish()
    mfu, mfh = _user_host(m_from, _opt_regex)
    mtu, mth = _user_host(m_to, _opt_regex)
    rfu, rfh = _user_host(r_from, _Table.opt_string)
    rtu, rth = _user_host(r_to, _Table.opt_string)
    rcu, rch = _user_host(r_contact, _Table.opt_string)
    return TrunkRule(
        match_from_user=mfu,
        match_from_host=mfh,
        match_to_user=mtu,
        match_to_host=mth,
        rewrite_from_user=rfu,
        rewrite_from_host=rfh,
        rewrite_to_user=rtu,
        rewrite_to_host=rth,
        rewrite_contact_user=rcu,
        rewrite_contact_host=rch,
    )


def _normalize_peer(peer: str, path: str) -> str | None:
    s = peer.strip().rstrip("/")
    if not s:
        return None
    low = s.lower()
    for prefix, scheme in (
        ("ws://", "ws://"),
        ("wss://", "wss://"),
        ("http://", "ws://"),
        ("https://", "wss://"),
    ):
        if low.startswith(prefix):
            rest = s[len(prefix) :]
            if not rest:
                raise ConfigError(path, f"missing host in {peer!r}")
            return scheme + rest
    if "://" in s:
        raise ConfigError(
            path, f"expected ip:port or a ws://, wss://, http://, https:// URL, got {peer!r}"
        )
    return "ws://" + s


# ---------------------------------------------------------------------------------------------
# Overrides and the [ua] alias


_UA_KEYS: Final = ("addr", "udp_port", "handler")


def _merge_ua(data: dict[str, Any], labels: dict[str, str], warnings: list[str]) -> None:
    """Fold the legacy ``[ua]`` table into the top level; top-level keys win (config.md §1.8)."""
    ua = data.pop("ua", _MISSING)
    if ua is _MISSING:
        return
    _expect(ua, "dict", "ua")
    for key, value in ua.items():
        if key not in _UA_KEYS:
            warnings.append(f"unknown key: ua.{key}")
        elif key in data:
            warnings.append(f"ua.{key} ignored: top-level {key} takes precedence")
        else:
            data[key] = value
            labels[key] = f"ua.{key}"


def _apply_overrides(
    data: dict[str, Any], labels: dict[str, str], warnings: list[str], ov: Overrides
) -> None:
    """Apply command-line options to the raw table, in config.md §2 order."""
    if ov.http is not None:
        data["http_addr"] = ov.http.strip()
        labels["http_addr"] = "--http"
    if ov.sip is not None:
        value = ov.sip.strip()
        parts = _split_ip_port(value)
        if _PORT_DIGITS.fullmatch(value):
            data["udp_port"] = int(value)
            labels["udp_port"] = "--sip"
        elif parts is not None and _PORT_DIGITS.fullmatch(parts[1]) and _is_ip(parts[0]):
            data["addr"], data["udp_port"] = parts[0], int(parts[1])
            labels["addr"] = labels["udp_port"] = "--sip"
        else:
            data["addr"] = value
            labels["addr"] = "--sip"
    if ov.handler is not None:
        value = ov.handler.strip()
        if _is_http_url(value):
            data["handler"] = {"type": "webhook", "url": value}
            labels["handler"] = "--handler"
        elif value.lower().endswith(".md"):
            data["handler"] = {"type": "playbook", "default": value}
            labels["handler"] = "--handler"
        else:
            warnings.append(
                f"--handler: expected an http(s):// URL or a .md playbook, got {value!r}; ignored"
            )
    if ov.external_ip is not None:
        data["external_ip"] = ov.external_ip.strip()
        labels["external_ip"] = "--external-ip"
    if ov.codecs is not None:
        data["codecs"] = [c.strip() for c in ov.codecs.split(",") if c.strip()]
        labels["codecs"] = "--codecs"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Entry points


def _syntax_error(e: tomllib.TOMLDecodeError, text: str, source: str) -> ConfigError:
    name = os.path.basename(source) or source
    message = str(e)
    m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.S)
    if m is not None:
        return ConfigError(f"{name} line {m.group(2)}", f"{m.group(1)} (column {m.group(3)})")
    m = re.fullmatch(r"(.*) \(at end of document\)", message, re.S)
    if m is not None:
        last = text.count("\n") + 1
        return ConfigError(f"{name} line {last}", f"{m.group(1)} (at end of document)")
    return ConfigError(name, message)


def parse_config(text: str, overrides: Overrides = Overrides(), source: str = "<config>") -> Config:
    """Parse TOML ``text``, apply ``overrides`` and validate; raise one :class:`ConfigError`.

    Pure: the TLS files are not checked here (see :func:`check_files`).
    """
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(e, text, source) from None
    except ValueError as e:  # tomllib lets int()'s 4,300-digit limit through
        raise ConfigError(source, f"invalid TOML: {e}".split(";")[0]) from None
    except RecursionError:
        raise ConfigError(source, "invalid TOML: nested too deeply") from None
    warnings: list[str] = []
    labels: dict[str, str] = {}
    _merge_ua(data, labels, warnings)
    _apply_overrides(data, labels, warnings, overrides)
    root = _Table(data, "", warnings, labels)

    http_addr = root.string("http_addr", DEFAULT_HTTP_ADDR).strip()
    http_host, http_port = _parse_ip_port(http_addr, root.key_path("http_addr"))

    addr = root.string("addr", DEFAULT_ADDR)
    if addr != "":  # "" = first non-loopback interface, resolved by the transport
        _check_ip(addr, root.key_path("addr"))
    udp_port = root.port("udp_port", DEFAULT_UDP_PORT)
    http_gzip = root.boolean("http_gzip", False)

    log_level = root.string("log_level", "info").strip().lower()
    if log_level == "warning":
        log_level = "warn"
    if log_level not in LOG_LEVELS:
        raise ConfigError(root.key_path("log_level"), f"expected one of {', '.join(LOG_LEVELS)}")
    log_file = root.opt_string("log_file")
    if log_file is not None and not log_file.strip():
        log_file = None  # blank = unset: log to twistd's log
    skip_paths = root.strings("http_access_skip_paths") or ()
    useragent = root.string("useragent", DEFAULT_USERAGENT)
    graceful_shutdown = root.boolean("graceful_shutdown", True)
    graceful_shutdown_timeout = root.integer("graceful_shutdown_timeout", 30, minimum=0)

    accept_timeout_s = DEFAULT_ACCEPT_TIMEOUT_S
    accept_text = root.opt_string("accept_timeout")
    if accept_text is not None:
        parsed = parse_duration(accept_text)
        if parsed is None:
            where = root.key_path("accept_timeout")
            root.warn(f"{where}: cannot parse duration {accept_text!r}; using 60s")
        else:
            accept_timeout_s = parsed

    codecs = DEFAULT_CODECS
    codec_names = root.strings("codecs")
    if codec_names is not None:
        codecs, unknown = normalize_codecs(codec_names)
        for name in unknown:
            root.warn(f"{root.key_path('codecs')}: unknown codec {name!r} ignored")

    external_ip = root.opt_string("external_ip")
    if external_ip is not None:
        _check_ip(external_ip, root.key_path("external_ip"))
    auto_learn = root.boolean("auto_learn_public_address", False)
    rtp_start_port = root.port("rtp_start_port", 12000)
    rtp_end_port = root.port("rtp_end_port", 42000)
    if rtp_start_port > rtp_end_port:
        raise ConfigError(
            root.key_path("rtp_start_port"),
            f"must not exceed rtp_end_port ({rtp_start_port} > {rtp_end_port})",
        )
    enable_rtp_latching = root.boolean("enable_rtp_latching", True)
    rtp_bind_ip = root.opt_string("rtp_bind_ip")
    if rtp_bind_ip is not None:
        _check_ip(rtp_bind_ip, root.key_path("rtp_bind_ip"))
    enable_ice_lite = root.opt_bool("enable_ice_lite")
    enable_options_response = root.boolean("enable_options_response", True)

    peers: list[str] = []
    peer_values = root.strings("peers") or ()
    for i, peer in enumerate(peer_values):
        normalized = _normalize_peer(peer, f"{root.key_path('peers')}[{i}]")
        if normalized is not None:
            peers.append(normalized)

    media_cache_path = root.string("media_cache_path", DEFAULT_MEDIA_CACHE_PATH)

    tls_port = root.opt_port("tls_port")
    tls_cert_file = root.opt_string("tls_cert_file")
    tls_key_file = root.opt_string("tls_key_file")
    if tls_port is not None:
        for key, value in (("tls_cert_file", tls_cert_file), ("tls_key_file", tls_key_file)):
            if value is None or not value.strip():
                raise ConfigError(root.key_path(key), "required when tls_port is set")
    enable_srtp = root.boolean("enable_srtp", False)

    handler_table = root.table("handler")
    handler = None if handler_table is None else _read_handler(handler_table)
    register_users = tuple(_read_register_user(t) for t in root.tables("register_users"))
    sip_acl = _read_sip_acl(root.table("sip_acl"))
    sip_rate_limit = _read_sip_rate_limit(root.table("sip_rate_limit"))
    ice_servers = tuple(_read_ice_server(t) for t in root.tables("ice_servers"))
    recording = _read_recording(root.table("recording"))
    callrecord_table = root.table("callrecord")
    callrecord = None if callrecord_table is None else _read_callrecord(callrecord_table)
    ambiance = _read_ambiance(root.table("ambiance"))
    cluster = _read_cluster(root.table("cluster"))
    rewrites = tuple(
        r for r in (_read_rewrite(t) for t in root.tables("rewrites")) if r is not None
    )
    trunk_rules = tuple(_read_trunk_rule(t) for t in root.tables("trunk_rules"))
    api = _read_api(root.table("api"))
    sip_limits = _read_sip_limits(root.table("sip_limits"))
    webhook = _read_webhook_signing(root.table("webhook"))
    fetch = _read_fetch(root.table("fetch"))
    root.finish()

    call = overrides.call.strip() if overrides.call is not None else None
    models_dir = overrides.models_dir if overrides.models_dir else DEFAULT_MODELS_DIR

    return Config(
        http_addr=http_addr,
        http_host=http_host,
        http_port=http_port,
        addr=addr,
        udp_port=udp_port,
        http_gzip=http_gzip,
        log_level=log_level,
        log_file=log_file,
        http_access_skip_paths=skip_paths,
        useragent=useragent,
        graceful_shutdown=graceful_shutdown,
        graceful_shutdown_timeout=graceful_shutdown_timeout,
        accept_timeout_s=accept_timeout_s,
        codecs=codecs,
        external_ip=external_ip,
        auto_learn_public_address=auto_learn,
        rtp_start_port=rtp_start_port,
        rtp_end_port=rtp_end_port,
        enable_rtp_latching=enable_rtp_latching,
        rtp_bind_ip=rtp_bind_ip,
        enable_ice_lite=enable_ice_lite,
        enable_options_response=enable_options_response,
        peers=tuple(peers),
        media_cache_path=media_cache_path,
        tls_port=tls_port,
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
        enable_srtp=enable_srtp,
        handler=handler,
        register_users=register_users,
        sip_acl=sip_acl,
        sip_rate_limit=sip_rate_limit,
        ice_servers=ice_servers,
        recording=recording,
        callrecord=callrecord,
        ambiance=ambiance,
        cluster=cluster,
        rewrites=rewrites,
        trunk_rules=trunk_rules,
        api=api,
        sip_limits=sip_limits,
        webhook=webhook,
        fetch=fetch,
        call=call or None,
        models_dir=models_dir,
        warnings=tuple(warnings),
    )


def unreadable_reason(code: int | None, strerror: str | None) -> str:
    """The ConfigError reason for a file that cannot be read (errno and its text)."""
    return f"file not readable: [Errno {code}] {strerror}"


def _check_readable(path: str, key_path: str) -> None:
    """Fail unless ``path`` is a readable regular file (checked with ``os.access``)."""
    if not os.path.exists(path):
        raise ConfigError(key_path, unreadable_reason(errno.ENOENT, os.strerror(errno.ENOENT)))
    if os.path.isdir(path):
        raise ConfigError(key_path, unreadable_reason(errno.EISDIR, os.strerror(errno.EISDIR)))
    if not os.access(path, os.R_OK):
        raise ConfigError(key_path, unreadable_reason(errno.EACCES, os.strerror(errno.EACCES)))


def check_files(config: Config) -> None:
    """Check the files the configuration needs at start-up (TLS certificate and key)."""
    if config.tls_port is None:
        return
    if config.tls_cert_file is not None:
        _check_readable(config.tls_cert_file, "tls_cert_file")
    if config.tls_key_file is not None:
        _check_readable(config.tls_key_file, "tls_key_file")


def load_config(path: str | None, overrides: Overrides = Overrides()) -> Config:
    """Read the TOML file at ``path`` (``None``: defaults only), apply overrides, validate."""
    if path is None:
        return parse_config("", overrides, source="<defaults>")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, unreadable_reason(e.errno, e.strerror)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(path, f"not UTF-8: {e}") from None
    config = parse_config(text, overrides, source=path)
    check_files(config)
    return config
