"""Tests for activecall.media.cache (config.md §13)."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from activecall.media.cache import MediaCache, format_speed, validate_key

# Digests computed with `printf '<text>' | sha256sum`.
_HELLO = "fe6d2dcc25e90068f6cd335e8870a4a6eaf6379e045dd4d3729bfceab2d7ad1e"  # "tts:piperHello world."
_NIHAO = "1fbc3f0daa47adecc42fd8dd7a00d9fa8ba8304189a41e7c7faf919326695021"  # "tts:openai你好"
_WELCOME = "e4a60521a4a6b4a36be0579dbc4a7fa6adee3138661da208a110e651b6f0db42"  # "sounds/welcome.wav"


class KeyTests(SynchronousTestCase):
    """Cache keys are exactly the documented format."""

    def test_tts_key_without_speaker(self) -> None:
        """A request without a speaker has no speaker part and speed 1.0 prints as 1."""
        self.assertEqual(MediaCache.tts_key("piper", "Hello world.", 16000, None, 1.0), f"{_HELLO}_16000_1")

    def test_tts_key_with_speaker_and_fractional_speed(self) -> None:
        """Speaker and a fractional speed appear as AC prints them."""
        self.assertEqual(MediaCache.tts_key("piper", "Hello world.", 8000, "F1", 1.5), f"{_HELLO}_8000_F1_1.5")

    def test_tts_key_hashes_utf8(self) -> None:
        """Non-ASCII text is hashed as UTF-8."""
        self.assertEqual(MediaCache.tts_key("openai", "你好", 24000, "alloy", 0.8), f"{_NIHAO}_24000_alloy_0.8")

    def test_tts_key_empty_speaker_is_omitted(self) -> None:
        """An empty speaker string is treated as no speaker."""
        self.assertEqual(MediaCache.tts_key("piper", "Hello world.", 16000, "", 1.0), f"{_HELLO}_16000_1")

    def test_tts_key_sanitizes_path_speaker(self) -> None:
        """A speaker that is a voice path yields a key that is still one file name."""
        key = MediaCache.tts_key("piper", "Hello world.", 16000, "../voices/en.onnx", 1.0)
        self.assertEqual(key, f"{_HELLO}_16000____voices_en_onnx_1")
        self.assertEqual(validate_key(key), key)

    def test_speed_formatting_matches_rust_f32_display(self) -> None:
        """Speeds print as Rust's f32 Display does: shortest digits, no trailing .0."""
        cases = {1.0: "1", 1.5: "1.5", 1.1: "1.1", 0.8: "0.8", 2.0: "2", 0.75: "0.75", 1.25: "1.25"}
        for speed, text in cases.items():
            self.assertEqual(format_speed(speed), text, speed)

    def test_file_key(self) -> None:
        """File keys are the path's sha256, the rate and a literal 1."""
        self.assertEqual(MediaCache.file_key("sounds/welcome.wav", 16000), f"{_WELCOME}_16000_1")

    def test_bad_keys_rejected(self) -> None:
        """Keys that are not a single plain file name raise ValueError."""
        cache = MediaCache("/nonexistent")
        for bad in ["", "../etc/passwd", "a/b", "..", ".hidden", "a\\b", "x\x00y", "a..b", "x" * 201, "a\nb"]:
            with self.assertRaises(ValueError, msg=repr(bad)):
                cache.get(bad)
            with self.assertRaises(ValueError, msg=repr(bad)):
                cache.put(bad, b"\x00\x00")


class StorageTests(SynchronousTestCase):
    """Entries round-trip through the file system and are written atomically."""

    def setUp(self) -> None:
        tmp = tempfile.mkdtemp(prefix="test-media-cache-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.root = os.path.join(tmp, "cache", "sub")
        self.cache = MediaCache(self.root)

    def test_missing_entry(self) -> None:
        """A missing entry (and a missing directory) reads as None."""
        self.assertIsNone(self.cache.get("k1"))
        self.assertFalse(self.cache.exists("k1"))

    def test_round_trip_creates_directory(self) -> None:
        """put creates the directory on demand and get returns the same bytes."""
        pcm = bytes(range(256)) * 10
        path = self.cache.put("k1", pcm)
        self.assertEqual(path, os.path.join(self.root, "k1.pcm"))
        self.assertTrue(self.cache.exists("k1"))
        self.assertEqual(self.cache.get("k1"), pcm)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), pcm)

    def test_overwrite_replaces_whole_entry(self) -> None:
        """A second put replaces the entry completely and leaves no temp files."""
        self.cache.put("k1", b"\x01\x00" * 1000)
        self.cache.put("k1", b"\x02\x00" * 3)
        self.assertEqual(self.cache.get("k1"), b"\x02\x00" * 3)
        self.assertEqual(os.listdir(self.root), ["k1.pcm"])

    def test_failed_write_leaves_previous_entry(self) -> None:
        """A write that fails midway keeps the old entry and removes its temp file."""
        self.cache.put("k1", b"\x01\x00")
        with self.assertRaises(TypeError):
            self.cache.put("k1", "not bytes!")  # type: ignore[arg-type]
        self.assertEqual(self.cache.get("k1"), b"\x01\x00")
        self.assertEqual(os.listdir(self.root), ["k1.pcm"])

    def test_failed_first_write_leaves_nothing(self) -> None:
        """A failed write of a new entry leaves no entry and no temp file."""
        with self.assertRaises(TypeError):
            self.cache.put("k2", "xy")  # type: ignore[arg-type]
        self.assertFalse(self.cache.exists("k2"))
        self.assertEqual(os.listdir(self.root), [])

    def test_odd_length_rejected(self) -> None:
        """PCM with half a sample is refused."""
        with self.assertRaises(ValueError):
            self.cache.put("k1", b"\x00")
        self.assertFalse(self.cache.exists("k1"))

    def test_user_cache_key(self) -> None:
        """A caller-supplied plain key is used as given."""
        self.cache.put("greeting-v2", b"\x00\x01")
        self.assertTrue(os.path.isfile(os.path.join(self.root, "greeting-v2.pcm")))
