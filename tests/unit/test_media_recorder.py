"""Tests for activecall.media.recorder: stereo WAV written off the reactor thread."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import wave
from typing import IO, Any, Callable

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from activecall.media.recorder import RecorderError, WavRecorder, wav_header

_WAIT_S = 30.0


class ThreadReactor:
    """callFromThread into a queue; the test runs the calls on its own thread."""

    def __init__(self) -> None:
        self.calls: queue.Queue[Callable[[], Any]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put(lambda: f(*args))

    def run_one(self) -> None:
        self.calls.get(timeout=_WAIT_S)()


def _frame(value: int, samples: int = 320) -> bytes:
    return np.full(samples, value, dtype="<i2").tobytes()


class RecorderTests(SynchronousTestCase):
    """WavRecorder."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.reactor = ThreadReactor()

    def test_stereo_layout_and_header(self) -> None:
        """Left and right frames are interleaved into a 16 kHz stereo 16-bit WAV; close fires when done."""
        path = os.path.join(self.dir, "sub", "call.wav")
        rec = WavRecorder(path, reactor=self.reactor)
        for i in range(25):
            rec.write(_frame(i), _frame(-i))
        d = rec.close()
        self.assertNoResult(d)
        self.reactor.run_one()
        self.successResultOf(d)
        with wave.open(path) as w:
            self.assertEqual((w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()), (2, 2, 16000, 25 * 320))
            data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        self.assertEqual(data[0::2][::320].tolist(), list(range(25)))
        self.assertEqual(data[1::2][::320].tolist(), [-i for i in range(25)])
        self.assertEqual(rec.bytes_written, 25 * 640)

    def test_unequal_sides_are_padded(self) -> None:
        """A shorter (or empty) side is padded with silence to the other's length."""
        path = os.path.join(self.dir, "pad.wav")
        rec = WavRecorder(path, reactor=self.reactor)
        rec.write(_frame(5), b"")
        rec.write(_frame(1, 100), _frame(2))
        rec.close()
        self.reactor.run_one()
        with wave.open(path) as w:
            data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
        self.assertEqual(len(data), 640)
        self.assertEqual((data[0].tolist(), data[319].tolist(), data[320].tolist(), data[639].tolist()), ([5, 0], [5, 0], [1, 2], [0, 2]))

    def test_header_valid_after_each_chunk(self) -> None:
        """While recording, the header on disk always matches the data written so far."""
        path = os.path.join(self.dir, "live.wav")
        gate = threading.Semaphore(0)
        written: list[int] = []

        class Spy:
            """A file whose flush lets the test look at the disk."""

            def __init__(self, f: IO[bytes]) -> None:
                self.f = f

            def __getattr__(self, name: str) -> Any:
                return getattr(self.f, name)

            def flush(self) -> None:
                self.f.flush()
                written.append(os.path.getsize(path))
                gate.release()

        rec = WavRecorder(path, reactor=self.reactor, chunk_ms=20, open_file=lambda p: Spy(open(p, "wb")))  # type: ignore[arg-type,return-value]
        self.assertTrue(gate.acquire(timeout=_WAIT_S))  # header written
        for i in range(3):
            rec.write(_frame(i), _frame(i))
            self.assertTrue(gate.acquire(timeout=_WAIT_S))
            with wave.open(path) as w:
                self.assertEqual(w.getnframes(), 320 * (i + 1))
        rec.close()
        self.reactor.run_one()
        self.assertEqual(written, [44, 44 + 1280, 44 + 2560, 44 + 3840])

    def test_overflow_drops_instead_of_blocking(self) -> None:
        """With the writer stuck, chunks beyond the queue bound are dropped and counted, never blocking."""
        path = os.path.join(self.dir, "slow.wav")
        release = threading.Event()

        def slow_open(p: str) -> IO[bytes]:
            release.wait(_WAIT_S)
            return open(p, "wb")

        rec = WavRecorder(path, reactor=self.reactor, chunk_ms=20, max_chunks=3, open_file=slow_open)
        for i in range(10):
            rec.write(_frame(i), _frame(i))
        self.assertEqual((rec.dropped_chunks, rec.dropped_bytes), (7, 7 * 640))
        release.set()
        rec.close()
        self.reactor.run_one()
        with wave.open(path) as w:
            self.assertEqual(w.getnframes(), 3 * 320)

    def test_disk_error_fails_close(self) -> None:
        """An unwritable path makes close() fail with RecorderError; writes are dropped, not raised."""
        blocker = os.path.join(self.dir, "file")
        open(blocker, "w").close()
        rec = WavRecorder(os.path.join(blocker, "x.wav"), reactor=self.reactor, chunk_ms=20)
        rec.write(_frame(1), _frame(1))
        d = rec.close()
        self.reactor.run_one()
        self.failureResultOf(d, RecorderError)

    def test_header_bytes(self) -> None:
        """The header is the canonical 44-byte PCM WAV header."""
        h = wav_header(16000, 2, 1000)
        self.assertEqual((len(h), h[:4], h[8:16], h[36:40]), (44, b"RIFF", b"WAVEfmt ", b"data"))

    def test_killed_process_leaves_readable_file(self) -> None:
        """A recording process killed with SIGKILL mid-call leaves a WAV that wave and sox can read."""
        path = os.path.join(self.dir, "killed.wav")
        child = textwrap.dedent(
            f"""
            import sys, threading
            import numpy as np
            from activecall.media.recorder import WavRecorder
            class R:
                def callFromThread(self, f, *a):
                    f(*a)
            rec = WavRecorder({path!r}, reactor=R())
            frame = (1000 * np.sin(np.arange(320) / 5.0)).astype("<i2").tobytes()
            pace = threading.Event()
            announced = False
            while True:
                rec.write(frame, frame)
                if not announced and rec.chunks_written >= 3:
                    print("ready", flush=True)
                    announced = True
                pace.wait(0.002)
            """
        )
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, cwd=os.getcwd())
        self.addCleanup(proc.stdout.close)  # type: ignore[union-attr]
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            self.assertEqual(line.strip(), b"ready")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(_WAIT_S)
        with wave.open(path) as w:
            self.assertEqual((w.getnchannels(), w.getframerate()), (2, 16000))
            frames = w.getnframes()
            self.assertGreaterEqual(frames, 3 * 3200)
            self.assertEqual(len(w.readframes(frames)), 4 * frames)
        # The header never claims more than is on disk (a kill may cut a later chunk short).
        self.assertLessEqual(44 + 4 * frames, os.path.getsize(path))
        if shutil.which("sox"):
            info = subprocess.run(["sox", "--i", path], capture_output=True, text=True, check=True).stdout
            self.assertIn("Channels       : 2", info)
            self.assertIn("Sample Rate    : 16000", info)
