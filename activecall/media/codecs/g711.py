"""G.711 mu-law (PCMU) and A-law (PCMA), plus the raw PCM pass-through.

G.711 is stateless and sample-by-sample, so :mod:`audioop` (C) does the
whole frame in one call; any frame length works.
"""

from __future__ import annotations

from typing import Callable

from activecall.media._audioop import audioop
from activecall.media.codecs import DEFAULT_PTIME_MS, FrameSizeError

__all__ = ["G711Decoder", "G711Encoder", "PcmPassthrough", "pcma_decoder", "pcma_encoder", "pcmu_decoder", "pcmu_encoder"]

SAMPLE_RATE_HZ = 8000
# One 20 ms frame of silence, returned in place of an empty payload.
_SILENCE_FRAME = bytes(2 * SAMPLE_RATE_HZ * DEFAULT_PTIME_MS // 1000)


def _check_pcm(pcm: bytes) -> None:
    if len(pcm) % 2:
        raise FrameSizeError(
            f"PCM s16le input must have an even byte count, got {len(pcm)} bytes"
        )


class G711Encoder:
    """PCM s16le 8 kHz -> G.711 (mu-law or A-law), one byte per sample."""

    __slots__ = ("sample_rate_hz", "_convert")

    def __init__(self, convert: Callable[[bytes, int], bytes]) -> None:
        self.sample_rate_hz = SAMPLE_RATE_HZ
        self._convert = convert

    def encode(self, pcm: bytes) -> bytes:
        """Encode any whole number of samples."""
        _check_pcm(pcm)
        return self._convert(pcm, 2)


class G711Decoder:
    """G.711 (mu-law or A-law) -> PCM s16le 8 kHz; an empty payload becomes 20 ms of silence."""

    __slots__ = ("errors", "sample_rate_hz", "_convert")

    def __init__(self, convert: Callable[[bytes, int], bytes]) -> None:
        self.sample_rate_hz = SAMPLE_RATE_HZ
        self.errors = 0
        self._convert = convert

    def decode(self, payload: bytes) -> bytes:
        """Decode; every byte is a valid sample, so only emptiness is an error."""
        if not payload:
            self.errors += 1
            return _SILENCE_FRAME
        return self._convert(payload, 2)


def pcmu_encoder() -> G711Encoder:
    """The mu-law (PCMU) encoder."""
    return G711Encoder(audioop.lin2ulaw)


def pcmu_decoder() -> G711Decoder:
    """The mu-law (PCMU) decoder."""
    return G711Decoder(audioop.ulaw2lin)


def pcma_encoder() -> G711Encoder:
    """The A-law (PCMA) encoder."""
    return G711Encoder(audioop.lin2alaw)


def pcma_decoder() -> G711Decoder:
    """The A-law (PCMA) decoder."""
    return G711Decoder(audioop.alaw2lin)


class PcmPassthrough:
    """The ``pcm`` codec: s16le in, the same bytes out, at a stated rate.

    Serves as both encoder and decoder.  As a decoder it never raises: an
    empty payload becomes 20 ms of silence and a stray odd byte is dropped,
    each counted in ``errors``.
    """

    __slots__ = ("_silence", "errors", "sample_rate_hz")

    def __init__(self, sample_rate_hz: int) -> None:
        self.sample_rate_hz = sample_rate_hz
        self.errors = 0
        self._silence = bytes(2 * sample_rate_hz * DEFAULT_PTIME_MS // 1000)

    def encode(self, pcm: bytes) -> bytes:
        """Return ``pcm`` unchanged after checking it is whole samples."""
        _check_pcm(pcm)
        return bytes(pcm)

    def decode(self, payload: bytes) -> bytes:
        """Return ``payload`` as PCM, repairing empty or odd-length input."""
        if not payload:
            self.errors += 1
            return self._silence
        if len(payload) % 2:
            self.errors += 1
            return bytes(payload[:-1])
        return bytes(payload)
