"""Media cache: synthesized speech and decoded audio files as raw PCM (config.md §13).

Blocking file I/O: callers run these methods in a thread (``deferToThreadPool``).

Entries are ``<root>/<key>.pcm`` holding s16le mono PCM.  Keys:

* TTS: ``<sha256 hex of "tts:" + provider + text>_<samplerate>[_<speaker>]_<speed>``.
  ``speed`` is formatted like Rust's ``f32`` ``Display`` (what Active Call
  produces): shortest round-trip digits of the 32-bit value, no exponent, no
  trailing ``.0`` - ``1.0`` -> ``1``, ``1.5`` -> ``1.5``, ``1.1`` -> ``1.1``.
  Characters of ``speaker`` outside ``[A-Za-z0-9_-]`` become ``_`` so the key
  stays one safe file name (a speaker may be a voice path).
* Files: ``<sha256 hex of path or URL>_<rate>_1``.

A caller-supplied ``cacheKey`` is used as given but must be a plain file name.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from activecall.fileio import write_atomically

__all__ = ["MediaCache", "format_speed", "validate_key"]

_UNSAFE_SPEAKER = re.compile(r"[^A-Za-z0-9_-]")
_MAX_KEY_LEN = 200  # file names are limited to 255 bytes; leave room for ".pcm" and temp suffixes


def format_speed(speed: float) -> str:
    """Format ``speed`` as Rust's ``f32`` Display would (``1.0`` -> ``"1"``)."""
    return np.format_float_positional(np.float32(speed), trim="-")


def validate_key(key: str) -> str:
    """Return ``key`` if it is safe as a single file name, else raise ``ValueError``."""
    if not key or len(key) > _MAX_KEY_LEN:
        raise ValueError(f"invalid cache key length: {len(key)}")
    if "/" in key or "\\" in key or "\x00" in key or ".." in key or key.startswith("."):
        raise ValueError(f"invalid cache key: {key!r}")
    if any(ord(c) < 0x20 for c in key):
        raise ValueError(f"invalid cache key: {key!r}")
    return key


class MediaCache:
    """PCM entries under ``root``; the directory is created on the first write."""

    def __init__(self, root: str) -> None:
        self.root = root

    @staticmethod
    def tts_key(provider: str, text: str, sample_rate_hz: int, speaker: str | None, speed: float) -> str:
        """Return the default cache key of a TTS sentence (config.md §13)."""
        digest = hashlib.sha256(("tts:" + provider + text).encode("utf-8")).hexdigest()
        parts = [digest, str(sample_rate_hz)]
        if speaker:
            parts.append(_UNSAFE_SPEAKER.sub("_", speaker))
        parts.append(format_speed(speed))
        return "_".join(parts)

    @staticmethod
    def file_key(path_or_url: str, sample_rate_hz: int) -> str:
        """Return the cache key of an audio file decoded at ``sample_rate_hz``."""
        digest = hashlib.sha256(path_or_url.encode("utf-8")).hexdigest()
        return f"{digest}_{sample_rate_hz}_1"

    def path(self, key: str) -> str:
        """Return the file path of entry ``key`` (validated)."""
        return os.path.join(self.root, validate_key(key) + ".pcm")

    def exists(self, key: str) -> bool:
        """Return whether entry ``key`` is present."""
        return os.path.isfile(self.path(key))

    def get(self, key: str) -> bytes | None:
        """Return the PCM of entry ``key``, or None if absent."""
        try:
            with open(self.path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(self, key: str, pcm: bytes) -> str:
        """Store ``pcm`` under ``key`` atomically (temp file + rename); return the entry's path.

        Readers see either the previous entry or the complete new one, never
        a partial file.
        """
        target = self.path(key)
        if len(pcm) % 2:
            raise ValueError("PCM s16le must have an even number of bytes")
        write_atomically(target, pcm)
        return target
