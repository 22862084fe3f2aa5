"""What the PyAV-backed encoders (G.722, Opus) share: one reused frame per encoder."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from typing import Any

import av


def encode_frame(ctx: Any, frame: Any, plane: memoryview, pcm: bytes, pts: int) -> bytes:
    """Copy ``pcm`` into the encoder's reused AudioFrame, encode it and return the packet bytes."""
    plane[:] = pcm
    frame.pts = pts
    packets = ctx.encode(frame)
    if len(packets) == 1:
        return bytes(packets[0])
    return b"".join(bytes(p) for p in packets)


def decode_packet(ctx: Any, payload: bytes) -> list[Any] | None:
    """Decode one payload into AudioFrames, or None when it is empty or undecodable.

    An empty packet is never passed to FFmpeg: it would put the decoder into
    drain mode for good.
    """
    if not payload:
        return None
    try:
        return ctx.decode(av.Packet(payload))  # type: ignore[no-any-return]
    except (av.error.FFmpegError, ValueError):
        return None


def limit_ffmpeg_threads() -> bool:
    """Tell FFmpeg this process has one CPU; False when its libavutil cannot be found.

    PyAV fits every frame it encodes to the codec through a filter graph, and each graph starts
    a thread pool sized to the CPUs: two idle threads per G.722 or Opus call on two cores, a
    thousand calls two thousand threads.  Our frames already fit and our codecs are audio, which
    FFmpeg does not thread: one CPU costs nothing.  Must run before the first encoder.
    """
    libavutil = _libavutil_path()
    if libavutil is None:
        return False
    try:
        lib = ctypes.CDLL(libavutil)  # the copy PyAV loaded: dlopen gives the same handle
        lib.av_cpu_force_count(ctypes.c_int(1))
    except (OSError, AttributeError):
        return False
    return True


def _libavutil_path() -> str | None:
    # PyAV's wheels bundle FFmpeg under av.libs/ with hashed names; a source build links the system's.
    bundled = os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "av.libs")
    found = sorted(glob.glob(os.path.join(bundled, "libavutil-*.so*")))
    if found:
        return found[0]
    return ctypes.util.find_library("avutil")
