"""Ambiance: a looped background sound under the agent's voice (protocol.md §4.8, config.md §11).

The call's ``option.ambiance`` block, its unset keys filled from the server's
``[ambiance]`` table, names a file that is decoded once (off the reactor, under the
same local-file policy as ``play``) at the leg's rate.  From then on every pull of
the server-side track carries it: mixed under the agent's frame with the gain
moving towards ``duckLevel``, or sent alone with the gain moving towards
``normalLevel`` when the agent is silent, ``transitionSpeed`` per 20 ms frame.
A file that cannot be read is an ``error`` event; the call goes on without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.call.fileplay import load_audio
from activecall.config import AmbianceConfig
from activecall.options import AmbianceOption, CommandError

if TYPE_CHECKING:
    from activecall.call.controller import CallController

_log = Logger(namespace="activecall.call.ambiance")

# At most this much of the file loops: every call holds its own copy of the PCM.
MAX_LOOP_S = 120

# (attribute, wire key, built-in default) of the levels that must lie in 0..1.
_LEVELS = (
    ("duck_level", "duckLevel", 0.1),
    ("normal_level", "normalLevel", 0.3),
    ("transition_speed", "transitionSpeed", 0.01),
)


@dataclass(frozen=True, slots=True)
class AmbianceSettings:
    """What one call's ambiance plays: a path and checked levels (each 0..1)."""

    path: str
    duck_level: float = 0.1
    normal_level: float = 0.3
    transition_speed: float = 0.01


def resolve_ambiance(option: Optional[AmbianceOption],
                     table: Optional[AmbianceConfig]) -> tuple[Optional[AmbianceSettings], list[str]]:
    """The call's settings (None: no ambiance) and the error texts of bad levels.

    Only a call that has an ``ambiance`` block gets one; its unset keys (and an empty
    ``path``) come from ``table``.  A level outside 0..1 is reported, naming where it
    came from, and its built-in default is used instead.
    """
    if option is None:
        return None, []
    errors: list[str] = []
    path = option.path if option.path and option.path.strip() else (table.path if table is not None else None)
    enabled = option.enabled if option.enabled is not None else (table.enabled if table is not None else True)
    if not enabled or not path or not path.strip():
        return None, errors
    levels: dict[str, float] = {}
    for name, key, default in _LEVELS:
        own = getattr(option, name)
        value, where = (own, f"option.ambiance.{key}") if own is not None else (
            (getattr(table, name), f"ambiance.{key}") if table is not None else (default, ""))
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            errors.append(str(CommandError.invalid(where, "must be a number between 0 and 1")))
            value = default
        levels[name] = float(value)
    return AmbianceSettings(path, **levels), errors


class Ambiance:
    """The looped PCM of one call and the gain it is heard at; pure (no clock, no I/O).

    Until :meth:`loaded` (and after :meth:`stop`) :meth:`mix` hands the agent's frame
    back untouched.  The gain starts at ``normalLevel``.
    """

    __slots__ = ("settings", "frame_bytes", "max_bytes", "loader", "stopped", "_pcm", "_pos", "_gain",
                 "_offsets", "_buf")

    def __init__(self, settings: AmbianceSettings, frame_bytes: int, max_bytes: int) -> None:
        self.settings = settings
        self.frame_bytes = frame_bytes
        self.max_bytes = max_bytes
        self.loader: Any = None  # the Deferred of the decoding, for cancellation
        self.stopped = False
        self._pcm: Optional[np.ndarray] = None
        self._pos = 0
        self._gain = settings.normal_level
        samples = frame_bytes // 2
        self._offsets = np.arange(samples, dtype=np.int64)
        self._buf = np.empty(samples, dtype=np.float32)

    @property
    def gain(self) -> float:
        """The gain the last frame was mixed at (``normalLevel`` before the first)."""
        return self._gain

    @property
    def playing(self) -> bool:
        """Loaded and not stopped: :meth:`mix` adds the sound."""
        return self._pcm is not None and not self.stopped

    def loaded(self, pcm: bytes) -> bool:
        """Decoded audio (s16le at the leg's rate) is ready; False when it holds no sample."""
        usable = min(len(pcm), self.max_bytes) & ~1
        if usable == 0:
            return False
        self._pcm = np.frombuffer(pcm, dtype="<i2", count=usable // 2)
        self._pos = 0
        return True

    def stop(self) -> None:
        """Play no more (the call ended); a decoding still running is cancelled."""
        self.stopped = True
        self._pcm = None
        loader, self.loader = self.loader, None
        if loader is not None:
            loader.cancel()

    def mix(self, agent_frame: Optional[bytes]) -> Optional[bytes]:
        """This tick's frame: the agent's plus the gained ambiance (int16, saturating), or the ambiance
        alone when the agent is silent (``None``); the agent's frame as is while nothing is loaded."""
        pcm = self._pcm
        if pcm is None or self.stopped:
            return agent_frame
        s = self.settings
        target = s.duck_level if agent_frame is not None else s.normal_level
        gain = self._gain
        if gain < target:
            gain = min(target, gain + s.transition_speed)
        elif gain > target:
            gain = max(target, gain - s.transition_speed)
        self._gain = gain
        samples = len(agent_frame) // 2 if agent_frame is not None else self.frame_bytes // 2
        if samples == len(self._offsets):
            offsets, buf = self._offsets, self._buf
        else:  # an odd-sized frame (never from a leg): no preallocated buffer fits
            offsets, buf = np.arange(samples, dtype=np.int64), np.empty(samples, dtype=np.float32)
        pos, end = self._pos, self._pos + samples
        if end <= len(pcm):
            segment = pcm[pos:end]  # a view: no copy on the common path
        else:  # mode="wrap" loops the file, also when it is shorter than one frame
            segment = pcm.take(offsets + pos, mode="wrap")
        self._pos = end % len(pcm)
        np.multiply(segment, np.float32(gain), out=buf, casting="unsafe")
        if agent_frame is not None:
            np.add(buf, np.frombuffer(agent_frame, dtype="<i2", count=samples), out=buf, casting="unsafe")
        np.rint(buf, out=buf)
        np.clip(buf, -32768.0, 32767.0, out=buf)
        return buf.astype("<i2").tobytes()


def start_ambiance(call: "CallController", option: Optional[AmbianceOption]) -> Optional[Ambiance]:
    """The answered call's ambiance, loading (None: the call has none, or it is disabled).

    Bad levels and a file that cannot be loaded are ``error`` events (sender ``ambiance``);
    neither stops the call.
    """
    services = call.services
    settings, errors = resolve_ambiance(option, services.ambiance_defaults)
    for message in errors:
        call.error(message, sender="ambiance", track=call.sst)
    if settings is None:
        return None
    leg = call.require_leg()
    rate = int(leg.media_rate_hz)
    ambiance = Ambiance(settings, int(leg.frame_bytes), max_bytes=rate * 2 * MAX_LOOP_S)
    path = settings.path
    d = load_audio(services, path, rate)
    ambiance.loader = d

    def loaded(pcm: bytes) -> None:
        ambiance.loader = None
        if ambiance.stopped:
            return
        if not ambiance.loaded(pcm):
            call.error(f"ambiance {path} holds no audio", sender="ambiance", track=call.sst)
        elif len(pcm) > ambiance.max_bytes:
            _log.info("ambiance {path} loops its first {seconds} s only", path=path, seconds=MAX_LOOP_S)

    def failed(f: Failure) -> None:
        ambiance.loader = None
        if f.check(CancelledError) or ambiance.stopped or call.ended:
            return
        if f.check(CommandError):
            # load_audio's refusal names ``url``; here the key is the option's path.
            message = str(CommandError.invalid("option.ambiance.path", f"{path} is not in a media directory"))
        else:
            message = f.getErrorMessage() or f.type.__name__
        _log.info("ambiance {path} failed: {message}", path=path, message=message)
        call.error(message, sender="ambiance", track=call.sst)

    d.addCallbacks(loaded, failed)
    return ambiance
