"""Call recording: a stereo 16-bit WAV written off the reactor thread.

Format (playbook.md §15): RIFF/WAVE, 44-byte header, PCM (format 1),
16-bit signed little-endian, 2 channels interleaved, at the call's media
rate (16 kHz).  Left = the remote leg, right = everything else (agent audio,
files, transfer leg).

How it stays cheap and safe:

* :meth:`WavRecorder.write` runs on the reactor thread and only appends
  the two frames to lists; every ``chunk_ms`` (200 ms) the collected audio
  becomes one chunk put on a bounded queue.  When the writer lags and the
  queue is full the chunk is dropped and counted: the reactor never blocks
  on the disk.
* A writer thread drains the queue: it interleaves the channels (numpy),
  appends them, rewrites the RIFF and data sizes in the header and
  flushes, so the file on disk is a valid WAV after every chunk.  If the
  daemon is killed, ``sox``/``wave`` read everything up to the last chunk.
* :meth:`WavRecorder.close` queues the rest (padded to equal length) and a
  stop marker; its Deferred fires on the reactor thread (``callFromThread``)
  when the file is complete and closed.
"""

from __future__ import annotations

import os
import queue
import struct
import threading
from typing import IO, Any, Callable

import numpy as np
from twisted.internet.defer import Deferred
from twisted.logger import Logger

__all__ = ["WavRecorder", "wav_header", "RecorderError"]

_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")
HEADER_BYTES = _HEADER.size  # 44
_STOP = None


class RecorderError(IOError):
    """The recording could not be written."""


def wav_header(sample_rate_hz: int, channels: int, data_bytes: int) -> bytes:
    """The 44-byte header of a 16-bit PCM WAV with ``data_bytes`` of samples."""
    block = 2 * channels
    return _HEADER.pack(
        b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, channels,
        sample_rate_hz, sample_rate_hz * block, block, 16, b"data", data_bytes,
    )


def _open_for_writing(path: str) -> IO[bytes]:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    return open(path, "wb")


class WavRecorder:
    """Records left/right PCM s16le mono frames into a stereo WAV file.

    States::

        recording --write()--> recording (chunks queued every chunk_ms)
        recording --close()--> closing --writer done--> closed (Deferred fires)
        any --disk error--> failed (writes dropped; close() Deferred fails)

    ``reactor`` only needs ``callFromThread``.  ``open_file`` opens the
    path for binary writing (tests inject a slow one).
    """

    _log = Logger()

    def __init__(
        self,
        path: str,
        sample_rate_hz: int = 16000,
        *,
        reactor: Any,
        chunk_ms: int = 200,
        max_chunks: int = 50,
        open_file: Callable[[str], IO[bytes]] = _open_for_writing,
    ) -> None:
        if sample_rate_hz <= 0 or chunk_ms <= 0 or max_chunks <= 0:
            raise ValueError("sample_rate_hz, chunk_ms and max_chunks must be positive")
        self.path = path
        self.sample_rate_hz = sample_rate_hz
        self._reactor = reactor
        self._chunk_bytes = 2 * sample_rate_hz * chunk_ms // 1000
        self._max_chunks = max_chunks
        self._open_file = open_file
        self._left: list[bytes] = []
        self._right: list[bytes] = []
        self._pending_bytes = 0
        # Unbounded underneath so close() can always queue its marker; chunks are bounded by hand.
        self._queue: queue.Queue[tuple[bytes, bytes] | None] = queue.Queue()
        self._done: Deferred[None] | None = None
        self._closed = False
        self.error: BaseException | None = None
        #: Frames dropped because the writer lagged (or failed).
        self.dropped_bytes = 0
        self.dropped_chunks = 0
        #: Per-channel bytes of audio on disk (updated by the writer thread).
        self.bytes_written = 0
        self.chunks_written = 0
        self._thread = threading.Thread(target=self._run, name="wav-recorder", daemon=True)
        self._thread.start()

    # -- reactor side ---------------------------------------------------------

    def write(self, left_pcm: bytes, right_pcm: bytes) -> None:
        """Add one frame per channel (the shorter one is padded with silence)."""
        if self._closed:
            return
        n = max(len(left_pcm), len(right_pcm))
        n -= n & 1
        if len(left_pcm) != n:
            left_pcm = bytes(left_pcm[:n]) + bytes(max(0, n - len(left_pcm)))
        if len(right_pcm) != n:
            right_pcm = bytes(right_pcm[:n]) + bytes(max(0, n - len(right_pcm)))
        self._left.append(left_pcm)
        self._right.append(right_pcm)
        self._pending_bytes += n
        if self._pending_bytes >= self._chunk_bytes:
            self._flush_chunk()

    def _flush_chunk(self) -> None:
        if not self._pending_bytes:
            return
        chunk = (b"".join(self._left), b"".join(self._right))
        self._left.clear()
        self._right.clear()
        size = self._pending_bytes
        self._pending_bytes = 0
        if self.error is not None or self._queue.qsize() >= self._max_chunks:
            self.dropped_chunks += 1
            self.dropped_bytes += size
            return
        self._queue.put_nowait(chunk)

    def close(self) -> Deferred[None]:
        """Write what is left, fix the header and close; fires when the file is complete."""
        if self._done is not None:
            return self._done
        self._closed = True
        self._flush_chunk()
        self._done = Deferred()
        self._queue.put_nowait(_STOP)
        return self._done

    def _finished(self) -> None:
        d = self._done
        if d is None or d.called:
            return
        if self.error is not None:
            d.errback(RecorderError(f"recording {self.path} failed: {self.error}"))
        else:
            d.callback(None)

    # -- writer thread -----------------------------------------------------------

    def _run(self) -> None:
        f: IO[bytes] | None = None
        data_bytes = 0
        try:
            f = self._open_file(self.path)
            f.write(wav_header(self.sample_rate_hz, 2, 0))
            f.flush()
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                left, right = item
                n = len(left) // 2
                frames = np.empty(2 * n, dtype="<i2")
                frames[0::2] = np.frombuffer(left, dtype="<i2", count=n)
                frames[1::2] = np.frombuffer(right, dtype="<i2", count=n)
                f.write(frames.tobytes())
                data_bytes += 4 * n
                # Sizes first in the header, so a kill right now still leaves a readable file.
                f.seek(4)
                f.write(struct.pack("<I", 36 + data_bytes))
                f.seek(40)
                f.write(struct.pack("<I", data_bytes))
                f.seek(0, os.SEEK_END)
                f.flush()
                self.bytes_written += 2 * n
                self.chunks_written += 1
        except Exception as e:  # adapter boundary: disk full, permissions...
            self.error = e
            # Unblock close(): drain until the stop marker.
            while self._queue.get() is not _STOP:
                pass
        finally:
            if f is not None:
                try:
                    f.close()
                except Exception as e:
                    self.error = self.error or e
            self._reactor.callFromThread(self._finished)
