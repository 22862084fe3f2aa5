"""What the PyAV-backed encoders (G.722, Opus) share: one reused frame per encoder."""

from __future__ import annotations

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
