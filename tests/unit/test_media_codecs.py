"""Tests for activecall.media.codecs: the codec table, G.711, G.722, Opus, pcm."""

from __future__ import annotations

import fractions
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from activecall.media.codecs import (
    CODECS,
    CodecInfo,
    Decoder,
    Encoder,
    FrameSizeError,
    UnknownCodecError,
    get_codec,
    make_decoder,
    make_encoder,
)


def sine(freq_hz: float, rate_hz: int, seconds: float, amplitude: float = 8000.0) -> np.ndarray:
    """Return an int16 sine wave."""
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    return (np.sin(2 * np.pi * freq_hz * t) * amplitude).astype("<i2")


def best_correlation(ref: np.ndarray, got: np.ndarray, max_lag: int, margin: int) -> tuple[float, int]:
    """Highest correlation of ``got`` against ``ref`` delayed by 0..max_lag samples."""
    n = min(len(ref), len(got)) - margin - max_lag
    best = (-1.0, 0)
    for lag in range(max_lag + 1):
        a = ref[margin : margin + n].astype(np.float64)
        b = got[margin + lag : margin + lag + n].astype(np.float64)
        if a.std() == 0 or b.std() == 0:
            continue
        c = float(np.corrcoef(a, b)[0, 1])
        if c > best[0]:
            best = (c, lag)
    return best


def run_codec(name: str, pcm: np.ndarray, frame_samples: int, rate: int | None = None) -> list[bytes]:
    """Encode ``pcm`` frame by frame and return the payloads."""
    enc = make_encoder(name, rate)
    return [
        enc.encode(pcm[i : i + frame_samples].tobytes())
        for i in range(0, len(pcm) - frame_samples + 1, frame_samples)
    ]


def decode_all(name: str, payloads: list[bytes], rate: int | None = None) -> np.ndarray:
    """Decode payloads in order and return the int16 PCM."""
    dec = make_decoder(name, rate)
    return np.frombuffer(b"".join(dec.decode(p) for p in payloads), dtype="<i2")


def av_frame(pcm: np.ndarray, rate: int, layout: str = "mono", pts: int = 0) -> av.AudioFrame:
    """Build an s16 PyAV frame from int16 samples (interleaved for stereo)."""
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=layout)
    frame.sample_rate = rate
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, rate)
    return frame


def frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Return a decoded PyAV frame as int16 mono (averaging channels)."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    mono = data.mean(axis=0)
    if frame.format.name.startswith("flt"):
        mono = mono * 32767.0
    return np.rint(mono).astype("<i2")


class CodecTableTests(SynchronousTestCase):
    """The static codec facts SDP and RTP rely on."""

    def test_table_values(self) -> None:
        """Each codec has the SDP name, payload type, clock and audio rates of its RFC."""
        expected = {
            "pcmu": ("PCMU", 0, 8000, 8000, 1, 160),
            "pcma": ("PCMA", 8, 8000, 8000, 1, 160),
            "g722": ("G722", 9, 8000, 16000, 1, 160),
            "opus": ("opus", None, 48000, 48000, 2, None),
            "pcm": ("L16", None, 16000, 16000, 1, 640),
        }
        self.assertEqual(set(CODECS), set(expected))
        for name, (enc, pt, clock, rate, ch, fb) in expected.items():
            info = get_codec(name)
            self.assertIsInstance(info, CodecInfo)
            self.assertEqual(
                (info.name, info.encoding_name, info.payload_type, info.clock_rate_hz,
                 info.sample_rate_hz, info.channels, info.frame_bytes()),
                (name, enc, pt, clock, rate, ch, fb),
            )

    def test_frame_bytes_scales_with_ptime(self) -> None:
        """frame_bytes follows ptime for constant-rate codecs and rejects a non-positive ptime."""
        self.assertEqual(get_codec("pcmu").frame_bytes(30), 240)
        self.assertEqual(get_codec("g722").frame_bytes(10), 80)
        self.assertIsNone(get_codec("opus").frame_bytes(60))
        self.assertEqual(get_codec("g722").rtp_ticks(20), 160)
        self.assertEqual(get_codec("g722").frame_samples(20), 320)
        self.assertRaises(FrameSizeError, get_codec("pcmu").frame_bytes, 0)

    def test_lookup_is_case_insensitive(self) -> None:
        """Codec names match regardless of case, including the SDP spelling."""
        self.assertIs(get_codec("PCMU"), CODECS["pcmu"])
        self.assertIs(get_codec("G722"), CODECS["g722"])
        self.assertIs(get_codec("Opus"), CODECS["opus"])
        self.assertIs(get_codec("L16"), CODECS["pcm"])

    def test_unknown_codec(self) -> None:
        """An unknown name raises UnknownCodecError, a ValueError, from every entry point."""
        for call in (get_codec, make_encoder, make_decoder):
            with self.assertRaises(UnknownCodecError) as cm:
                call("g729")
            self.assertIsInstance(cm.exception, ValueError)
            self.assertIn("g729", str(cm.exception))

    def test_factories_satisfy_protocols(self) -> None:
        """Every codec's encoder and decoder match the Encoder/Decoder protocols and use slots."""
        for name in CODECS:
            enc = make_encoder(name)
            dec = make_decoder(name)
            self.assertIsInstance(enc, Encoder)
            self.assertIsInstance(dec, Decoder)
            self.assertFalse(hasattr(enc, "__dict__"), name)
            self.assertFalse(hasattr(dec, "__dict__"), name)
            self.assertEqual(enc.sample_rate_hz, get_codec(name).sample_rate_hz)
            self.assertEqual(dec.errors, 0)

    def test_import_without_deprecation_warning(self) -> None:
        """Importing the codecs, the resampler and the audioop shim raises no DeprecationWarning."""
        code = (
            "import activecall.media.codecs, activecall.media.resample, "
            "activecall.media.mixer, activecall.media.codecs.g711, activecall.media.codecs.g722, "
            "activecall.media.codecs.opus, activecall.media._audioop\n"
        )
        subprocess.run(
            [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2],
        )


class G711Tests(SynchronousTestCase):
    """PCMU and PCMA."""

    def test_sizes_and_roundtrip(self) -> None:
        """A 20 ms frame becomes 160 bytes and decodes to 320 bytes close to the input."""
        pcm = sine(440, 8000, 1.0)
        for name in ("pcmu", "pcma"):
            payloads = run_codec(name, pcm, 160)
            self.assertTrue(all(len(p) == 160 for p in payloads))
            out = decode_all(name, payloads)
            self.assertEqual(len(out), len(pcm))
            # G.711 is ~38 dB SNR for a loud sine: error a few percent of amplitude.
            err = np.sqrt(np.mean((out.astype(float) - pcm) ** 2))
            self.assertLess(err, 8000 * 0.03, name)

    def test_matches_ffmpeg(self) -> None:
        """Our G.711 decode tables equal FFmpeg's, and our encoders differ only by boundary rounding."""
        codes = bytes(range(256))
        ramp = np.linspace(-32768, 32767, 65536).astype("<i2")
        for name, ff in (("pcmu", "pcm_mulaw"), ("pcma", "pcm_alaw")):
            dctx = av.CodecContext.create(ff, "r")
            dctx.layout = "mono"
            dctx.sample_rate = 8000
            theirs_table = np.concatenate([frame_to_mono(f) for f in dctx.decode(av.Packet(codes))])
            ours_table = np.frombuffer(make_decoder(name).decode(codes), dtype="<i2")
            np.testing.assert_array_equal(ours_table, theirs_table)

            ctx = av.CodecContext.create(ff, "w")
            ctx.format = "s16"
            ctx.layout = "mono"
            ctx.sample_rate = 8000
            ctx.time_base = fractions.Fraction(1, 8000)
            theirs = np.frombuffer(
                b"".join(bytes(p) for p in ctx.encode(av_frame(ramp, 8000))), dtype=np.uint8
            )
            ours = np.frombuffer(make_encoder(name).encode(ramp.tobytes()), dtype=np.uint8)
            # Implementations may round differently at decision boundaries only.
            self.assertLess(np.count_nonzero(ours != theirs) / len(ramp), 0.02, name)
            ours_err = np.abs(theirs_table[ours].astype(int) - ramp).max()
            theirs_err = np.abs(theirs_table[theirs].astype(int) - ramp).max()
            self.assertLessEqual(ours_err, theirs_err + 1, name)

    def test_empty_payload_is_silence(self) -> None:
        """An empty payload decodes to one 20 ms frame of silence and counts an error."""
        for name in ("pcmu", "pcma"):
            dec = make_decoder(name)
            self.assertEqual(dec.decode(b""), bytes(320))
            self.assertEqual(dec.errors, 1)

    def test_odd_pcm_rejected(self) -> None:
        """An odd byte count is not whole samples and raises FrameSizeError."""
        for name in ("pcmu", "pcma", "pcm", "g722", "opus"):
            self.assertRaises(FrameSizeError, make_encoder(name).encode, b"\x00\x01\x02")


class PcmTests(SynchronousTestCase):
    """The raw pcm pass-through."""

    def test_identity_at_any_rate(self) -> None:
        """pcm encodes and decodes to the same bytes at the stated rate."""
        pcm = sine(300, 24000, 0.02).tobytes()
        enc = make_encoder("pcm", 24000)
        dec = make_decoder("pcm", 24000)
        self.assertEqual(enc.sample_rate_hz, 24000)
        self.assertEqual(dec.decode(enc.encode(pcm)), pcm)

    def test_repairs_bad_payloads(self) -> None:
        """An empty pcm payload becomes 20 ms of silence and an odd byte is dropped, both counted."""
        dec = make_decoder("pcm", 8000)
        self.assertEqual(dec.decode(b""), bytes(320))
        self.assertEqual(dec.decode(b"\x01\x02\x03"), b"\x01\x02")
        self.assertEqual(dec.errors, 2)


class G722Tests(SynchronousTestCase):
    """G.722 via FFmpeg, checked against aiortc and FFmpeg used independently."""

    def test_sine_roundtrip(self) -> None:
        """A 1 kHz sine survives G.722 encode/decode with correlation above 0.99."""
        pcm = sine(1000, 16000, 1.0)
        payloads = run_codec("g722", pcm, 320)
        self.assertTrue(all(len(p) == 160 for p in payloads))
        out = decode_all("g722", payloads)
        self.assertEqual(len(out), len(pcm))
        corr, _ = best_correlation(pcm, out, 64, 800)
        self.assertGreater(corr, 0.99)

    def test_other_frame_sizes(self) -> None:
        """10 ms and 40 ms frames encode to 80 and 320 bytes and still decode correctly."""
        pcm = sine(700, 16000, 0.8)
        for frame in (160, 640):
            payloads = run_codec("g722", pcm, frame)
            self.assertEqual({len(p) for p in payloads}, {frame // 2})
            corr, _ = best_correlation(pcm, decode_all("g722", payloads), 64, 800)
            self.assertGreater(corr, 0.99)

    def test_bad_frame_length(self) -> None:
        """An odd sample count (not a whole byte of G.722) raises FrameSizeError."""
        self.assertRaises(FrameSizeError, make_encoder("g722").encode, bytes(322))

    def test_ours_to_aiortc(self) -> None:
        """aiortc's G722Decoder decodes our payloads back to the sine."""
        from aiortc.codecs.g722 import G722Decoder as AiortcDecoder
        from aiortc.jitterbuffer import JitterFrame

        pcm = sine(800, 16000, 1.0)
        payloads = run_codec("g722", pcm, 320)
        dec = AiortcDecoder()
        out = np.concatenate([
            frame_to_mono(f)
            for i, p in enumerate(payloads)
            for f in dec.decode(JitterFrame(data=p, timestamp=i * 160))
        ])
        corr, _ = best_correlation(pcm, out, 64, 800)
        self.assertGreater(corr, 0.99)

    def test_aiortc_to_ours(self) -> None:
        """Our decoder decodes aiortc's G722Encoder output back to the sine."""
        from aiortc.codecs.g722 import G722Encoder as AiortcEncoder

        pcm = sine(800, 16000, 1.0)
        enc = AiortcEncoder()
        payloads: list[bytes] = []
        for i in range(0, len(pcm), 320):
            packets, _ = enc.encode(av_frame(pcm[i : i + 320], 16000, pts=i))
            payloads += packets
        self.assertEqual({len(p) for p in payloads}, {160})
        corr, _ = best_correlation(pcm, decode_all("g722", payloads), 64, 800)
        self.assertGreater(corr, 0.99)

    def test_resampling_factory(self) -> None:
        """make_encoder/make_decoder('g722', 8000) exchange 8 kHz PCM around the 16 kHz codec."""
        pcm = sine(500, 8000, 1.0)
        enc = make_encoder("g722", 8000)
        dec = make_decoder("g722", 8000)
        self.assertEqual((enc.sample_rate_hz, dec.sample_rate_hz), (8000, 8000))
        payloads = [enc.encode(pcm[i : i + 160].tobytes()) for i in range(0, len(pcm), 160)]
        self.assertEqual({len(p) for p in payloads}, {160})
        out = np.frombuffer(b"".join(dec.decode(p) for p in payloads), dtype="<i2")
        self.assertEqual(len(out), len(pcm))
        corr, _ = best_correlation(pcm, out, 64, 800)
        self.assertGreater(corr, 0.99)
        # The filter tail of the previous audio continues into the concealment frame.
        self.assertEqual(len(dec.decode(b"")), 320)
        self.assertEqual(dec.errors, 1)

    def test_empty_payload_is_silence(self) -> None:
        """An empty G.722 payload yields 20 ms of silence, counts an error, and decoding continues."""
        pcm = sine(800, 16000, 0.2)
        payloads = run_codec("g722", pcm, 320)
        dec = make_decoder("g722")
        self.assertEqual(dec.decode(b""), bytes(640))
        self.assertEqual(dec.errors, 1)
        self.assertEqual(len(dec.decode(payloads[0])), 640)


class CodecThreadTests(SynchronousTestCase):
    """FFmpeg's per-encoder thread pools (PyAV's frame-fitting filter graphs), with and without the limit."""

    def threads_added(self, limit: bool) -> int:
        script = (
            "import os\n"
            "from activecall.media.codecs import limit_codec_threads, make_encoder\n"
            f"assert {limit} is False or limit_codec_threads()\n"
            "_ = make_encoder('pcmu', 16000).encode(bytes(640))  # a one-off thread of the imports\n"
            "before = len(os.listdir('/proc/self/task'))\n"
            "encoders = [make_encoder(c, 16000) for c in ('g722', 'opus') * 3]\n"
            "for e in encoders: e.encode(bytes(640))\n"
            "print(len(os.listdir('/proc/self/task')) - before)\n")
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
        return int(out.stdout.strip())

    def test_encoders_start_no_threads_once_limited(self) -> None:
        """Six G.722/Opus encoders start no thread once the limit is set (PyAV's graphs otherwise start
        a pool each on a machine with more than one CPU)."""
        self.assertEqual(self.threads_added(limit=True), 0)
        if (os.cpu_count() or 1) > 1:
            self.assertGreaterEqual(self.threads_added(limit=False), 6)


class OpusTests(SynchronousTestCase):
    """Opus via libopus, mono inside opus/48000/2."""

    def test_sine_roundtrip(self) -> None:
        """A 440 Hz sine survives Opus encode/decode at 48 kHz with correlation above 0.98."""
        pcm = sine(440, 48000, 1.0)
        payloads = run_codec("opus", pcm, 960)
        self.assertEqual(len(payloads), 50)
        self.assertTrue(all(0 < len(p) < 400 for p in payloads))
        out = decode_all("opus", payloads)
        self.assertEqual(len(out), len(pcm))
        corr, _ = best_correlation(pcm, out, 960, 4800)
        self.assertGreater(corr, 0.98)

    def test_native_16k(self) -> None:
        """At 16 kHz the encoder takes 320-sample frames and the decoder returns 16 kHz."""
        pcm = sine(440, 16000, 1.0)
        payloads = run_codec("opus", pcm, 320, 16000)
        out = decode_all("opus", payloads, 16000)
        self.assertEqual(len(out), len(pcm))
        corr, _ = best_correlation(pcm, out, 320, 1600)
        self.assertGreater(corr, 0.98)

    def test_bad_frame_duration(self) -> None:
        """A length that is not an Opus frame duration raises FrameSizeError."""
        self.assertRaises(FrameSizeError, make_encoder("opus").encode, bytes(2 * 1000))

    def test_ours_to_aiortc_and_ffmpeg(self) -> None:
        """aiortc's stereo OpusDecoder and FFmpeg's native opus decoder both decode our packets."""
        from aiortc.codecs.opus import OpusDecoder as AiortcDecoder
        from aiortc.jitterbuffer import JitterFrame

        pcm = sine(440, 48000, 1.0)
        payloads = run_codec("opus", pcm, 960)
        dec = AiortcDecoder()
        out = np.concatenate([
            frame_to_mono(f)
            for i, p in enumerate(payloads)
            for f in dec.decode(JitterFrame(data=p, timestamp=i * 960))
        ])
        corr, _ = best_correlation(pcm, out, 960, 4800)
        self.assertGreater(corr, 0.98)

        native = av.CodecContext.create("opus", "r")
        native.layout = "stereo"
        native.sample_rate = 48000
        out = np.concatenate([frame_to_mono(f) for p in payloads for f in native.decode(av.Packet(p))])
        corr, _ = best_correlation(pcm, out, 960, 4800)
        self.assertGreater(corr, 0.98)

    def test_aiortc_stereo_to_ours(self) -> None:
        """Our decoder turns aiortc's stereo Opus packets into mono at 48 kHz."""
        from aiortc.codecs.opus import OpusEncoder as AiortcEncoder

        pcm = sine(440, 48000, 1.0)
        stereo = np.repeat(pcm, 2)
        enc = AiortcEncoder()
        payloads: list[bytes] = []
        for i in range(0, len(pcm), 960):
            packets, _ = enc.encode(av_frame(stereo[2 * i : 2 * (i + 960)], 48000, "stereo", pts=i))
            payloads += packets
        out = decode_all("opus", payloads)
        self.assertEqual(len(out), 960 * len(payloads))
        corr, _ = best_correlation(pcm, out, 960, 4800)
        self.assertGreater(corr, 0.98)

    def test_settled_silence_is_not_encoded(self) -> None:
        """Digital silence is encoded until the encoder repeats its packet; then that packet is sent
        without calling libopus, byte for byte what encoding gives, and speech after it still decodes."""
        import activecall.media.codecs.opus as opus

        speech = sine(440, 16000, 0.6).tobytes()
        frames = [speech[i : i + 640] for i in range(0, len(speech), 640)]
        sequence = frames[:10] + [bytes(640)] * 40 + frames[10:30]
        reference = opus.OpusEncoder(16000)
        expected = []
        for pcm in sequence:
            expected.append(reference.encode(pcm))
            reference._zeros = b"never silent"  # the shortcut off: every frame really encoded
        calls = []
        real = opus.encode_frame
        self.patch(opus, "encode_frame", lambda *a: calls.append(1) or real(*a))
        encoder = opus.OpusEncoder(16000)
        got = [encoder.encode(pcm) for pcm in sequence]
        self.assertEqual(got[:50], expected[:50])
        self.assertLess(len(calls), len(sequence) - 30)  # most of the 40 silent frames skipped libopus
        out = decode_all("opus", got, 16000)
        after = out[52 * 320 :].astype(np.float64)
        ref = decode_all("opus", expected, 16000)[52 * 320 :].astype(np.float64)
        self.assertLess(abs(np.sqrt((after * after).mean()) / np.sqrt((ref * ref).mean()) - 1.0), 0.05)
        corr, _ = best_correlation(np.frombuffer(speech, "<i2")[12 * 320 :], after.astype("<i2"), 320, 320)
        self.assertGreater(corr, 0.98)

    def test_corrupt_and_empty_payloads(self) -> None:
        """Empty or corrupt Opus payloads yield 20 ms of silence, count errors, and decoding continues."""
        payloads = run_codec("opus", sine(440, 48000, 0.1), 960)
        dec = make_decoder("opus")
        self.assertEqual(dec.decode(b""), bytes(1920))
        # TOC 0xff = code 3 with a frame-count byte declaring an impossible layout.
        self.assertEqual(dec.decode(b"\xff\xff\xfe\x00"), bytes(1920))
        self.assertEqual(dec.errors, 2)
        self.assertEqual(len(dec.decode(payloads[0])), 1920)
        self.assertEqual(dec.errors, 2)
