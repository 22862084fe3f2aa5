"""G.722 (64 kbit/s sub-band ADPCM, 16 kHz audio) through FFmpeg via PyAV.

G.722 is adaptive: each stream direction needs its own encoder/decoder and
must see its frames in order.  One payload byte carries two samples, so a
20 ms frame is 320 samples -> 160 bytes.  Note the RTP clock is 8000 Hz
(:class:`~activecall.media.codecs.CodecInfo` ``clock_rate_hz``) even though
the audio is 16 kHz.

Per frame we reuse one :class:`av.AudioFrame` and only copy the PCM into its
plane, which keeps the PyAV overhead to a couple of C calls.
"""

from __future__ import annotations

import fractions

import av
from av import AudioFrame, CodecContext

from activecall.media.codecs import DEFAULT_PTIME_MS, FrameSizeError
from activecall.media.codecs._av import decode_packet, encode_frame

__all__ = ["G722Decoder", "G722Encoder"]

SAMPLE_RATE_HZ = 16000
# FFmpeg's g722 encoder refuses frames larger than this.
_MAX_FRAME_SAMPLES = 32768
_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE_HZ)
_SILENCE_FRAME = bytes(2 * SAMPLE_RATE_HZ * DEFAULT_PTIME_MS // 1000)


class G722Encoder:
    """PCM s16le mono 16 kHz -> G.722 payload (one byte per two samples).

    The first call fixes the frame length (normally 320 samples); a call
    with another length reopens the codec, which restarts its adaptation.
    """

    __slots__ = ("_ctx", "_frame", "_frame_samples", "_plane", "_pts", "sample_rate_hz")

    def __init__(self) -> None:
        self.sample_rate_hz = SAMPLE_RATE_HZ
        self._ctx: av.audio.codeccontext.AudioCodecContext | None = None
        self._frame: AudioFrame | None = None
        self._plane: memoryview | None = None
        self._frame_samples = 0
        self._pts = 0

    def _open(self, samples: int) -> None:
        ctx = CodecContext.create("g722", "w")
        ctx.format = "s16"
        ctx.layout = "mono"
        ctx.sample_rate = SAMPLE_RATE_HZ
        ctx.time_base = _TIME_BASE
        # frame_size is read-only on the PyAV object but settable as an AVOption.
        ctx.options = {"frame_size": str(samples)}
        ctx.open()
        frame = AudioFrame(format="s16", layout="mono", samples=samples)
        frame.sample_rate = SAMPLE_RATE_HZ
        self._ctx = ctx
        self._frame = frame
        self._plane = memoryview(frame.planes[0]).cast("B")[: 2 * samples]
        self._frame_samples = samples

    def encode(self, pcm: bytes) -> bytes:
        """Encode one frame; its sample count must be even and at most 32768."""
        size = len(pcm)
        if size == 0:
            return b""
        if size % 4 or size > 2 * _MAX_FRAME_SAMPLES:
            raise FrameSizeError(
                "G.722 input must be an even number of s16 samples (byte count a "
                f"multiple of 4) and at most {_MAX_FRAME_SAMPLES} samples, got {size} bytes"
            )
        samples = size // 2
        if samples != self._frame_samples:
            self._open(samples)
        assert self._ctx is not None and self._frame is not None and self._plane is not None
        payload = encode_frame(self._ctx, self._frame, self._plane, pcm, self._pts)
        self._pts += samples
        return payload


class G722Decoder:
    """G.722 payload -> PCM s16le mono 16 kHz.

    An empty payload or a decoder error yields 20 ms of silence and counts
    one error; it never raises.
    """

    __slots__ = ("_ctx", "errors", "sample_rate_hz")

    def __init__(self) -> None:
        self.sample_rate_hz = SAMPLE_RATE_HZ
        self.errors = 0
        ctx = CodecContext.create("g722", "r")
        ctx.format = "s16"
        ctx.layout = "mono"
        ctx.sample_rate = SAMPLE_RATE_HZ
        self._ctx = ctx

    def decode(self, payload: bytes) -> bytes:
        """Decode a payload of any length (two samples per byte)."""
        frames = decode_packet(self._ctx, payload)
        if frames is None:
            self.errors += 1
            return _SILENCE_FRAME
        if len(frames) == 1:
            frame = frames[0]
            return bytes(memoryview(frame.planes[0]).cast("B")[: 2 * frame.samples])
        return b"".join(
            bytes(memoryview(f.planes[0]).cast("B")[: 2 * f.samples]) for f in frames
        )
