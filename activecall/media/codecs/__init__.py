"""Audio codecs: fixed-size PCM frames <-> RTP payloads.

Inside the daemon audio is always PCM signed 16-bit little-endian mono
``bytes``.  An :class:`Encoder` turns one frame of that (normally 20 ms) into
a payload; a :class:`Decoder` turns a payload back into PCM.  Both are
stateful (G.722 and Opus predict across frames), so keep one per stream and
direction.

Supported names (case-insensitive): ``pcmu``, ``pcma``, ``g722``, ``opus``
and ``pcm`` (raw s16le, the WebSocket "codec").  G.711 runs on
:mod:`audioop`; G.722 and Opus on FFmpeg through PyAV, the same libraries
aiortc and most softphones use, so payloads interoperate with them.

This module is pure compute: no reactor, no sockets, no clocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "CODECS",
    "CodecError",
    "CodecInfo",
    "Decoder",
    "Encoder",
    "FrameSizeError",
    "UnknownCodecError",
    "get_codec",
    "limit_codec_threads",
    "make_decoder",
    "make_encoder",
]

#: Default dynamic payload type for Opus (what browsers and aiortc offer).
OPUS_DEFAULT_PAYLOAD_TYPE = 111
#: Default frame duration used everywhere in the daemon.
DEFAULT_PTIME_MS = 20


class CodecError(ValueError):
    """Base class of codec errors."""


class UnknownCodecError(CodecError):
    """A codec name we do not implement."""


class FrameSizeError(CodecError):
    """PCM input whose length is not usable for this codec."""


@dataclass(frozen=True)
class CodecInfo:
    """Static facts about one codec, as SDP and RTP see them.

    ``clock_rate_hz`` is the RTP timestamp clock advertised in SDP;
    ``sample_rate_hz`` is the real audio rate.  They differ for G.722
    (RFC 3551 keeps its clock at 8000 for historical reasons) and, for
    ``pcm``, ``sample_rate_hz`` is only the default: a raw PCM stream
    runs at whatever rate its session states.
    """

    name: str
    encoding_name: str
    payload_type: int | None
    clock_rate_hz: int
    sample_rate_hz: int
    channels: int
    #: Payload bytes per millisecond for constant-bitrate codecs, else None.
    bytes_per_ms: int | None

    def frame_bytes(self, ptime_ms: int = DEFAULT_PTIME_MS) -> int | None:
        """Payload size of one ``ptime_ms`` frame, or None when it varies (Opus)."""
        if ptime_ms <= 0:
            raise FrameSizeError(f"ptime_ms must be positive, got {ptime_ms}")
        if self.bytes_per_ms is None:
            return None
        return self.bytes_per_ms * ptime_ms

    def frame_samples(self, ptime_ms: int = DEFAULT_PTIME_MS) -> int:
        """PCM samples in one ``ptime_ms`` frame at ``sample_rate_hz``."""
        if ptime_ms <= 0:
            raise FrameSizeError(f"ptime_ms must be positive, got {ptime_ms}")
        return self.sample_rate_hz * ptime_ms // 1000

    def rtp_ticks(self, ptime_ms: int = DEFAULT_PTIME_MS) -> int:
        """RTP timestamp increment for one ``ptime_ms`` frame."""
        return self.clock_rate_hz * ptime_ms // 1000


CODECS: dict[str, CodecInfo] = {
    info.name: info
    for info in (
        CodecInfo("pcmu", "PCMU", 0, 8000, 8000, 1, 8),
        CodecInfo("pcma", "PCMA", 8, 8000, 8000, 1, 8),
        # G.722: 16 kHz audio, 64 kbit/s, but an 8000 Hz RTP clock (RFC 3551 4.5.2).
        CodecInfo("g722", "G722", 9, 8000, 16000, 1, 8),
        # SDP always says opus/48000/2; we send and receive mono inside it.
        CodecInfo("opus", "opus", None, 48000, 48000, 2, None),
        # Raw s16le; 16 kHz is only the default rate (32 bytes per ms there).
        CodecInfo("pcm", "L16", None, 16000, 16000, 1, 32),
    )
}


def get_codec(name: str) -> CodecInfo:
    """Look up a codec by our name or its SDP encoding name, case-insensitively."""
    info = CODECS.get(name.lower()) if isinstance(name, str) else None
    if info is None:
        if isinstance(name, str) and name.lower() == "l16":
            return CODECS["pcm"]
        raise UnknownCodecError(
            f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}"
        )
    return info


@runtime_checkable
class Encoder(Protocol):
    """PCM s16le mono at ``sample_rate_hz`` -> one payload."""

    sample_rate_hz: int

    def encode(self, pcm: bytes) -> bytes:
        """Encode one frame of PCM; raise :class:`FrameSizeError` on unusable lengths."""
        ...


@runtime_checkable
class Decoder(Protocol):
    """One payload -> PCM s16le mono at ``sample_rate_hz``."""

    sample_rate_hz: int
    #: Payloads that could not be decoded (replaced by one frame of silence).
    errors: int

    def decode(self, payload: bytes) -> bytes:
        """Decode one payload; never raises on bad payloads."""
        ...


class _ResamplingEncoder:
    """Accepts PCM at another rate and resamples it for the inner encoder."""

    __slots__ = ("_inner", "_resampler", "sample_rate_hz")

    def __init__(self, inner: Encoder, sample_rate_hz: int) -> None:
        from activecall.media.resample import Resampler

        self._inner = inner
        self._resampler = Resampler(sample_rate_hz, inner.sample_rate_hz)
        self.sample_rate_hz = sample_rate_hz

    def encode(self, pcm: bytes) -> bytes:
        """Resample then encode."""
        return self._inner.encode(self._resampler.process(pcm))


class _ResamplingDecoder:
    """Decodes with the inner decoder, then resamples to the requested rate."""

    __slots__ = ("_inner", "_resampler", "sample_rate_hz")

    def __init__(self, inner: Decoder, sample_rate_hz: int) -> None:
        from activecall.media.resample import Resampler

        self._inner = inner
        self._resampler = Resampler(inner.sample_rate_hz, sample_rate_hz)
        self.sample_rate_hz = sample_rate_hz

    @property
    def errors(self) -> int:
        """Errors counted by the inner decoder."""
        return self._inner.errors

    def decode(self, payload: bytes) -> bytes:
        """Decode then resample."""
        return self._resampler.process(self._inner.decode(payload))


def _check_rate(sample_rate_hz: int | None) -> None:
    if sample_rate_hz is not None and (
        not isinstance(sample_rate_hz, int) or not 1000 <= sample_rate_hz <= 192000
    ):
        raise CodecError(f"sample_rate_hz must be an int in 1000..192000, got {sample_rate_hz!r}")


def make_encoder(name: str, sample_rate_hz: int | None = None) -> Encoder:
    """Build a stateful encoder for codec ``name``.

    The encoder takes PCM at ``sample_rate_hz`` (default: the codec's own
    rate).  For ``pcm`` that is the identity at the given rate; for the
    other codecs a rate that differs from the codec's is resampled inside
    (Opus takes 8/12/16/24/48 kHz natively).
    """
    info = get_codec(name)
    _check_rate(sample_rate_hz)
    # Imported here so that importing the package stays cheap and acyclic.
    if info.name == "pcm":
        from activecall.media.codecs.g711 import PcmPassthrough

        return PcmPassthrough(sample_rate_hz or info.sample_rate_hz)
    inner: Encoder
    if info.name == "opus":
        from activecall.media.codecs.opus import OPUS_INPUT_RATES, OpusEncoder

        if sample_rate_hz is not None and sample_rate_hz in OPUS_INPUT_RATES:
            return OpusEncoder(sample_rate_hz)
        inner = OpusEncoder()
    elif info.name == "g722":
        from activecall.media.codecs.g722 import G722Encoder

        inner = G722Encoder()
    else:
        from activecall.media.codecs.g711 import pcma_encoder, pcmu_encoder

        inner = pcmu_encoder() if info.name == "pcmu" else pcma_encoder()
    if sample_rate_hz is None or sample_rate_hz == inner.sample_rate_hz:
        return inner
    return _ResamplingEncoder(inner, sample_rate_hz)


def make_decoder(name: str, sample_rate_hz: int | None = None) -> Decoder:
    """Build a stateful decoder for codec ``name``.

    The decoder returns PCM at ``sample_rate_hz`` (default: the codec's own
    rate), resampling inside when that differs.  For ``pcm`` it is the
    identity at the given rate.
    """
    info = get_codec(name)
    _check_rate(sample_rate_hz)
    inner: Decoder
    if info.name == "pcm":
        from activecall.media.codecs.g711 import PcmPassthrough

        return PcmPassthrough(sample_rate_hz or info.sample_rate_hz)
    if info.name == "opus":
        from activecall.media.codecs.opus import OpusDecoder

        inner = OpusDecoder()
    elif info.name == "g722":
        from activecall.media.codecs.g722 import G722Decoder

        inner = G722Decoder()
    else:
        from activecall.media.codecs.g711 import pcma_decoder, pcmu_decoder

        inner = pcmu_decoder() if info.name == "pcmu" else pcma_decoder()
    if sample_rate_hz is None or sample_rate_hz == inner.sample_rate_hz:
        return inner
    return _ResamplingDecoder(inner, sample_rate_hz)


def limit_codec_threads() -> bool:
    """Keep FFmpeg from starting a thread pool per encoder (call once, before the first encoder);
    False when FFmpeg's libavutil cannot be found.  See :func:`activecall.media.codecs._av.limit_ffmpeg_threads`."""
    from activecall.media.codecs._av import limit_ffmpeg_threads

    return limit_ffmpeg_threads()
