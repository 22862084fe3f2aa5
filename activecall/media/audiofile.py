"""Decode an audio file (or in-memory bytes) to PCM s16le mono at a chosen rate.

Anything FFmpeg opens works: WAV (PCM 8/16/24/32-bit, float, mu-law,
A-law), MP3, Ogg/Opus, FLAC, M4A...  Channels are averaged to mono; the
rate is converted with :func:`activecall.media.resample.resample`, the same
filter the live media path uses.

This is blocking, CPU-bound work: adapters call it from a thread
(``deferToThread``), never on the reactor.
"""

from __future__ import annotations

import io
import os

import av
import numpy as np

from activecall.media.resample import ResampleError, resample

__all__ = ["AudioDecodeError", "decode_audio"]


class AudioDecodeError(ValueError):
    """The source is missing, empty, corrupt or has no audio."""


def _open(source: bytes | bytearray | memoryview | str | os.PathLike[str]) -> av.container.InputContainer:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise AudioDecodeError("audio data is empty")
        target: str | io.BytesIO = io.BytesIO(data)
        label = f"<{len(data)} bytes>"
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise AudioDecodeError(f"audio file not found: {path!r}")
        if os.path.getsize(path) == 0:
            raise AudioDecodeError(f"audio file is empty: {path!r}")
        target = path
        label = repr(path)
    else:
        raise AudioDecodeError(f"audio source must be bytes or a path, got {type(source).__name__}")
    try:
        return av.open(target, mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise AudioDecodeError(f"cannot open audio {label}: {e}") from e


def decode_audio(source: bytes | str, sample_rate_hz: int) -> bytes:
    """Decode ``source`` (file path or encoded bytes) to PCM s16le mono at ``sample_rate_hz``.

    Raises :class:`AudioDecodeError` for missing files, empty or corrupt
    data, a container without an audio stream, or a source rate the
    resampler does not take (outside 1000..384000 Hz).
    """
    if not isinstance(sample_rate_hz, int) or not 1000 <= sample_rate_hz <= 384000:
        raise AudioDecodeError(f"sample_rate_hz must be an int in 1000..384000, got {sample_rate_hz!r}")
    container = _open(source)
    try:
        mono, rate = _decode_mono_float(container)
    finally:
        container.close()
    pcm = np.clip(np.rint(mono * 32768.0), -32768, 32767).astype("<i2")
    if rate == sample_rate_hz:
        return pcm.tobytes()
    try:
        return resample(pcm.tobytes(), rate, sample_rate_hz)
    except ResampleError as e:
        raise AudioDecodeError(f"unsupported source sample rate: {e}") from None


def _decode_mono_float(container: av.container.InputContainer) -> tuple[np.ndarray, int]:
    """Decode the first audio stream to float64 mono in [-1, 1) and its rate."""
    streams = container.streams.audio
    if not streams:
        raise AudioDecodeError("no audio stream in the source")
    stream = streams[0]
    # Normalise every sample format to planar float at the native layout/rate.
    converter: av.AudioResampler | None = None
    chunks: list[np.ndarray] = []
    rate = 0
    bad_packets = 0
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except (av.error.FFmpegError, ValueError):
                # One corrupt packet should not lose the rest of the file.
                bad_packets += 1
                continue
            for frame in frames:
                if converter is None:
                    rate = frame.sample_rate
                    converter = av.AudioResampler(format="fltp", layout=frame.layout, rate=rate)
                for out in converter.resample(frame):
                    chunks.append(out.to_ndarray().mean(axis=0, dtype=np.float64))
        if converter is not None:
            for out in converter.resample(None):
                chunks.append(out.to_ndarray().mean(axis=0, dtype=np.float64))
    except (av.error.FFmpegError, ValueError) as e:
        if not chunks:
            raise AudioDecodeError(f"corrupt audio data: {e}") from e
    total = sum(c.shape[0] for c in chunks)
    if total == 0 or rate <= 0:
        detail = f" ({bad_packets} undecodable packets)" if bad_packets else ""
        raise AudioDecodeError(f"no audio samples could be decoded{detail}")
    return np.concatenate(chunks), rate
