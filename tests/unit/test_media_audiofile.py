"""Tests for activecall.media.audiofile.decode_audio."""

from __future__ import annotations

import io
import struct
import wave

import av
import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from activecall.media._audioop import audioop
from activecall.media.audiofile import AudioDecodeError, decode_audio


def tone(freq_hz: float, rate_hz: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    """Return a float sine in [-1, 1]."""
    return np.sin(2 * np.pi * freq_hz * np.arange(int(rate_hz * seconds)) / rate_hz) * amplitude


def pcm_wav(samples: np.ndarray, rate: int, width: int, channels: int = 1) -> bytes:
    """Write integer PCM (width 1..4 bytes) with the stdlib wave module; ``samples`` is float (n, ch)."""
    scaled = samples.reshape(-1)
    if width == 1:
        data = (np.rint(scaled * 127) + 128).astype(np.uint8).tobytes()
    elif width == 2:
        data = np.rint(scaled * 32767).astype("<i2").tobytes()
    elif width == 3:
        ints = np.rint(scaled * 8388607).astype("<i4")
        data = ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        data = np.rint(scaled * 2147483647).astype("<i4").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)
    return buf.getvalue()


def raw_wav(format_tag: int, bits: int, rate: int, data: bytes, channels: int = 1) -> bytes:
    """Build a WAV with a non-PCM format tag (3 float, 6 A-law, 7 mu-law) by hand."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHHH", format_tag, channels, rate, rate * block, block, bits, 0)
    fact = struct.pack("<4sII", b"fact", 4, len(data) // block)
    body = b"WAVE" + struct.pack("<4sI", b"fmt ", len(fmt)) + fmt + fact
    body += struct.pack("<4sI", b"data", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def mp3_bytes(samples: np.ndarray, rate: int) -> bytes:
    """Encode a float mono signal to MP3 with PyAV (libmp3lame)."""
    out = io.BytesIO()
    container = av.open(out, "w", format="mp3")
    stream = container.add_stream("libmp3lame", rate=rate)
    stream.layout = "mono"
    frame = av.AudioFrame.from_ndarray(
        np.rint(samples * 32767).astype("<i2").reshape(1, -1), format="s16", layout="mono"
    )
    frame.sample_rate = rate
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()
    return out.getvalue()


def dominant_hz(pcm: bytes, rate: int) -> float:
    """Frequency of the strongest FFT bin."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def peak(pcm: bytes) -> float:
    """Peak absolute amplitude as a fraction of full scale."""
    return float(np.abs(np.frombuffer(pcm, dtype="<i2")).max()) / 32768


class DecodeTests(SynchronousTestCase):
    """Formats decode to mono s16le at the requested rate with the right content."""

    def assert_tone(self, pcm: bytes, rate: int, seconds: float, freq: float, level: float) -> None:
        """Check duration, dominant frequency and level of decoded audio."""
        # trial's assertAlmostEqual has no delta argument.
        self.assertLess(abs(len(pcm) / 2 / rate - seconds), 0.03)
        self.assertLess(abs(dominant_hz(pcm, rate) - freq), 5)
        self.assertLess(abs(peak(pcm) - level), 0.05)

    def test_pcm_wav_widths(self) -> None:
        """8-, 16-, 24- and 32-bit PCM WAVs decode to the same tone."""
        signal = tone(440, 16000, 1.0)
        for width in (1, 2, 3, 4):
            pcm = decode_audio(pcm_wav(signal, 16000, width), 16000)
            self.assert_tone(pcm, 16000, 1.0, 440, 0.5)

    def test_same_rate_16bit_is_exact(self) -> None:
        """A 16-bit mono WAV at the requested rate comes back sample-exact."""
        ints = np.rint(tone(440, 8000, 0.5) * 32767).astype("<i2")
        self.assertEqual(decode_audio(pcm_wav(tone(440, 8000, 0.5), 8000, 2), 8000), ints.tobytes())

    def test_stereo_downmix_and_resample(self) -> None:
        """A 44.1 kHz stereo WAV becomes 16 kHz mono averaging the channels."""
        left = tone(1000, 44100, 1.0, 0.6)
        right = tone(1000, 44100, 1.0, 0.2)
        pcm = decode_audio(pcm_wav(np.stack([left, right], axis=1), 44100, 2, channels=2), 16000)
        self.assert_tone(pcm, 16000, 1.0, 1000, 0.4)

    def test_float_wav(self) -> None:
        """A 32-bit float WAV decodes."""
        data = tone(700, 48000, 0.5).astype("<f4").tobytes()
        self.assert_tone(decode_audio(raw_wav(3, 32, 48000, data), 8000), 8000, 0.5, 700, 0.5)

    def test_g711_wavs(self) -> None:
        """mu-law and A-law WAVs decode."""
        ints = np.rint(tone(500, 8000, 0.5) * 32767).astype("<i2").tobytes()
        ulaw = raw_wav(7, 8, 8000, audioop.lin2ulaw(ints, 2))
        alaw = raw_wav(6, 8, 8000, audioop.lin2alaw(ints, 2))
        for blob in (ulaw, alaw):
            self.assert_tone(decode_audio(blob, 16000), 16000, 0.5, 500, 0.5)

    def test_mp3(self) -> None:
        """An MP3 (made with libmp3lame) decodes to the right tone and duration."""
        if "libmp3lame" not in av.codecs_available:
            self.skipTest("libmp3lame not available in this FFmpeg build")
        pcm = decode_audio(mp3_bytes(tone(880, 44100, 1.0), 44100), 16000)
        self.assert_tone(pcm, 16000, 1.0, 880, 0.5)

    def test_from_path(self) -> None:
        """A file path decodes the same as the bytes it contains."""
        blob = pcm_wav(tone(440, 22050, 0.5), 22050, 2)
        path = self.mktemp() + ".wav"
        with open(path, "wb") as f:
            f.write(blob)
        self.assertEqual(decode_audio(path, 16000), decode_audio(blob, 16000))
        self.assert_tone(decode_audio(path, 24000), 24000, 0.5, 440, 0.5)


class ErrorTests(SynchronousTestCase):
    """Bad sources raise AudioDecodeError with a clear message."""

    def test_missing_file(self) -> None:
        """A path that does not exist names the path in the error."""
        path = self.mktemp() + ".wav"
        with self.assertRaises(AudioDecodeError) as cm:
            decode_audio(path, 16000)
        self.assertIn("not found", str(cm.exception))
        self.assertIn(path, str(cm.exception))

    def test_empty(self) -> None:
        """Empty bytes and an empty file are refused as empty."""
        path = self.mktemp()
        open(path, "wb").close()
        for source in (b"", path):
            with self.assertRaises(AudioDecodeError) as cm:
                decode_audio(source, 16000)
            self.assertIn("empty", str(cm.exception))

    def test_corrupt(self) -> None:
        """Bytes that are not audio are refused."""
        rng = np.random.default_rng(5)
        for blob in (b"this is not audio at all" * 50, b"RIFF\x00\x00\x00\x00WAVEjunk", rng.bytes(4096)):
            self.assertRaises(AudioDecodeError, decode_audio, blob, 16000)

    def test_no_audio_stream(self) -> None:
        """A container with only a video stream is refused as having no audio."""
        out = io.BytesIO()
        container = av.open(out, "w", format="matroska")
        stream = container.add_stream("ffv1", rate=1)
        stream.width = 16
        stream.height = 16
        stream.pix_fmt = "yuv420p"
        frame = av.VideoFrame(16, 16, "yuv420p")
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        container.close()
        with self.assertRaises(AudioDecodeError) as cm:
            decode_audio(out.getvalue(), 16000)
        self.assertIn("no audio stream", str(cm.exception))

    def test_bad_arguments(self) -> None:
        """A bad rate or source type raises AudioDecodeError, a ValueError."""
        blob = pcm_wav(tone(440, 8000, 0.1), 8000, 2)
        self.assertRaises(AudioDecodeError, decode_audio, blob, 0)
        self.assertRaises(AudioDecodeError, decode_audio, 42, 16000)
        self.assertTrue(issubclass(AudioDecodeError, ValueError))


class OddRateTests(SynchronousTestCase):
    """Files at odd rates go through the same resampler as everything else."""

    def test_odd_source_rate(self) -> None:
        """A 44101 Hz WAV (8000 filter phases to 8 kHz) decodes to an 8 kHz tone."""
        pcm = decode_audio(pcm_wav(tone(440, 44101, 1.0), 44101, 2), 8000)
        self.assertLess(abs(len(pcm) / 2 / 8000 - 1.0), 0.03)
        self.assertLess(abs(dominant_hz(pcm, 8000) - 440), 5)
        self.assertLess(abs(peak(pcm) - 0.5), 0.05)

    def test_source_rate_out_of_range(self) -> None:
        """A source rate the resampler does not take is an AudioDecodeError, not a ResampleError."""
        with self.assertRaises(AudioDecodeError):
            decode_audio(pcm_wav(tone(100, 500, 1.0), 500, 2), 8000)
