"""Opus through libopus (FFmpeg via PyAV), mono inside, ``opus/48000/2`` on the wire.

SDP always advertises Opus as 48000 Hz, 2 channels (RFC 7587), but a mono
stream is legal in it and every decoder plays it.  We therefore:

* encode mono, at 48 kHz by default or natively at 8/12/16/24 kHz (libopus
  resamples inside, cheaper than doing it ourselves);
* decode any packet (mono or stereo, any frame duration) to mono 48 kHz:
  libopus mixes stereo down itself when its decoder is opened with one
  channel.

The encoder is tuned for speech (``application=voip``, 32 kbit/s by
default).  Per frame we reuse one :class:`av.AudioFrame`.
"""

from __future__ import annotations

import fractions

import av
import numpy as np
from av import AudioFrame, CodecContext

from activecall.media.codecs import DEFAULT_PTIME_MS, FrameSizeError
from activecall.media.codecs._av import decode_packet, encode_frame

__all__ = ["OPUS_INPUT_RATES", "OpusDecoder", "OpusEncoder"]

SAMPLE_RATE_HZ = 48000
#: Input rates libopus accepts without resampling.
OPUS_INPUT_RATES = frozenset({8000, 12000, 16000, 24000, 48000})
# Frame durations Opus can code, in tenths of a millisecond (2.5 ms .. 120 ms).
_FRAME_DURATIONS_DMS = (25, 50, 100, 200, 400, 600, 800, 1000, 1200)
_SILENCE_FRAME = bytes(2 * SAMPLE_RATE_HZ * DEFAULT_PTIME_MS // 1000)


def _pick_decoder_name() -> str:
    # libopus gives s16 directly and mixes stereo to mono; FFmpeg's native
    # decoder is the fallback on builds without libopus.
    return "libopus" if "libopus" in av.codecs_available else "opus"


class OpusEncoder:
    """PCM s16le mono at ``sample_rate_hz`` -> one Opus packet per call.

    Each call must carry a valid Opus frame duration (2.5, 5, 10, 20, 40 or
    60 ms, ...); the first call fixes it, and a call with a different length
    reopens the encoder.
    """

    __slots__ = (
        "_bitrate_bps",
        "_ctx",
        "_frame",
        "_frame_samples",
        "_last_silent",
        "_plane",
        "_pts",
        "_silent_packet",
        "_zeros",
        "sample_rate_hz",
    )

    def __init__(self, sample_rate_hz: int = SAMPLE_RATE_HZ, bitrate_bps: int = 32000) -> None:
        if sample_rate_hz not in OPUS_INPUT_RATES:
            raise FrameSizeError(
                f"Opus input rate must be one of {sorted(OPUS_INPUT_RATES)}, got {sample_rate_hz}"
            )
        if not 6000 <= bitrate_bps <= 510000:
            raise FrameSizeError(f"Opus bitrate must be 6000..510000 bit/s, got {bitrate_bps}")
        self.sample_rate_hz = sample_rate_hz
        self._bitrate_bps = bitrate_bps
        self._ctx: av.audio.codeccontext.AudioCodecContext | None = None
        self._frame: AudioFrame | None = None
        self._plane: memoryview | None = None
        self._frame_samples = 0
        self._pts = 0
        self._zeros = b""
        self._last_silent: bytes | None = None
        self._silent_packet: bytes | None = None

    def _duration_option(self, samples: int) -> str:
        for dms in _FRAME_DURATIONS_DMS:
            if samples * 10000 == dms * self.sample_rate_hz:
                return str(dms / 10).removesuffix(".0")
        raise FrameSizeError(
            f"{samples} samples at {self.sample_rate_hz} Hz is not an Opus frame "
            "duration (2.5, 5, 10, 20, 40, 60, 80, 100 or 120 ms)"
        )

    def _open(self, samples: int) -> None:
        duration = self._duration_option(samples)
        ctx = CodecContext.create("libopus", "w")
        ctx.format = "s16"
        ctx.layout = "mono"
        ctx.sample_rate = self.sample_rate_hz
        ctx.bit_rate = self._bitrate_bps
        ctx.time_base = fractions.Fraction(1, self.sample_rate_hz)
        ctx.options = {"application": "voip", "frame_duration": duration}
        ctx.open()
        frame = AudioFrame(format="s16", layout="mono", samples=samples)
        frame.sample_rate = self.sample_rate_hz
        self._ctx = ctx
        self._frame = frame
        self._plane = memoryview(frame.planes[0]).cast("B")[: 2 * samples]
        self._frame_samples = samples
        self._zeros = bytes(2 * samples)
        self._last_silent = self._silent_packet = None

    def encode(self, pcm: bytes) -> bytes:
        """Encode one frame into one Opus packet.

        A listening agent sends digital silence most of a call, and libopus spends more on a silent
        frame than on speech.  Once silence has settled (the encoder gave the same packet for two
        silent frames running, so its state no longer changes) that packet is repeated without
        encoding: the bytes are those encoding would give.
        """
        size = len(pcm)
        if size % 2 or size == 0:
            raise FrameSizeError(f"Opus input must be whole s16 samples, got {size} bytes")
        samples = size // 2
        if samples != self._frame_samples:
            self._open(samples)
        assert self._ctx is not None and self._frame is not None and self._plane is not None
        if pcm == self._zeros:
            if self._silent_packet is not None:
                self._pts += samples
                return self._silent_packet
            payload = encode_frame(self._ctx, self._frame, self._plane, pcm, self._pts)
            if payload == self._last_silent:
                self._silent_packet = payload
            self._last_silent = payload
        else:
            self._last_silent = self._silent_packet = None
            payload = encode_frame(self._ctx, self._frame, self._plane, pcm, self._pts)
        self._pts += samples
        return payload


class OpusDecoder:
    """Opus packet (mono or stereo) -> PCM s16le mono 48 kHz.

    An empty or undecodable packet yields 20 ms of silence and counts one
    error; it never raises.
    """

    __slots__ = ("_ctx", "errors", "sample_rate_hz")

    def __init__(self) -> None:
        self.sample_rate_hz = SAMPLE_RATE_HZ
        self.errors = 0
        ctx = CodecContext.create(_pick_decoder_name(), "r")
        ctx.layout = "mono"
        ctx.sample_rate = SAMPLE_RATE_HZ
        self._ctx = ctx

    @staticmethod
    def _frame_bytes(frame: AudioFrame) -> bytes:
        samples = frame.samples
        name = frame.format.name
        if name == "s16" and len(frame.layout.channels) == 1:
            return bytes(memoryview(frame.planes[0]).cast("B")[: 2 * samples])
        # Other formats (FFmpeg's native decoder gives float planar): mix to mono.
        data = frame.to_ndarray()
        channels = len(frame.layout.channels)
        if not frame.format.is_planar:
            data = data.reshape(-1, channels).T
        mono = data[0] if channels == 1 else data.mean(axis=0)
        if name.startswith("s16"):
            return mono.astype("<i2").tobytes()
        return np.clip(np.rint(mono * 32767.0), -32768, 32767).astype("<i2").tobytes()

    def decode(self, payload: bytes) -> bytes:
        """Decode one packet of any Opus frame duration."""
        frames = decode_packet(self._ctx, payload)
        if frames is None:
            self.errors += 1
            return _SILENCE_FRAME
        if not frames:
            self.errors += 1
            return _SILENCE_FRAME
        if len(frames) == 1:
            return self._frame_bytes(frames[0])
        return b"".join(self._frame_bytes(f) for f in frames)
