"""Voice activity detection for every call of the process, batched (adapter).

One :class:`VadEngine` serves all calls.  Each call opens a :class:`VadStream`
(``silero`` or ``webrtc``, 8 or 16 kHz; 8 kHz for G.711 calls, so no
resampling) and writes its 20 ms caller frames to it; a listener hears
``speech_started``/``speech_ended``/``silence_timeout`` on the reactor thread,
times in stream ms (ms of audio written since open).

How the work is scheduled (STACK.md: Silero costs far less per stream in a
batch than one stream at a time):

* ``write`` only appends the frame to the stream's row of a per-rate int16
  buffer (bounded: when the worker is far behind, the oldest whole windows
  are dropped and counted in ``dropped_ms``);
* on the media clock's PROCESS phase, if no batch is in flight, the engine
  takes every Silero stream's complete 32 ms windows (one numpy gather per
  rate, streams sorted by window count) and submits ONE job to its worker;
  the job runs the Silero batch once per window index, streams with ``k``
  pending windows taking part in the first ``k`` runs, 8 kHz and 16 kHz
  separately; states and contexts travel with the job (gathered and
  scattered with numpy on the reactor thread), so the worker shares nothing;
* the probabilities come back on the reactor thread (``callFromThread``),
  are fed to each stream's :class:`VadSegmenter`, and events go to the
  listeners; a stream closed (or its slot reused) meanwhile gets nothing;
* WebRTC VAD streams are cheap: they are evaluated on the reactor, in the tick.

Workers: by default the engine owns a one-thread :class:`ThreadPool` started
by :meth:`VadEngine.start` and stopped by :meth:`VadEngine.stop`; an injected
``threadpool`` is used but not started or stopped.  Tests pass
``submit=lambda fn: maybeDeferred(fn)`` (any ``Callable[[Callable[[], T]],
Deferred[T]]``) to run jobs inline, or a submit that holds the Deferred to
stall the worker.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Protocol, Sequence, TypeVar

import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from activecall.media.clock import PROCESS, MediaClock
from activecall.speech.vad.segmenter import (
    SilenceTimeout, SpeechEnd, SpeechPause, SpeechStart, VadEvent, VadParams, VadSegmenter,
)
from activecall.speech.vad.silero import (
    CONTEXT_SAMPLES,
    WINDOW_SAMPLES,
    SileroBatch,
    VadUnavailableError,
    check_available,
)
from activecall.speech.vad.webrtc import FRAME_MS as WEBRTC_FRAME_MS
from activecall.speech.vad.webrtc import WebrtcVad

__all__ = ["VadEngine", "VadStream", "VadListener", "VadUnavailableError", "KINDS", "RATES"]

T = TypeVar("T")
Submit = Callable[[Callable[[], T]], "Deferred[T]"]

KINDS = ("silero", "webrtc")
RATES = (8000, 16000)
DEFAULT_MAX_PENDING_MS = 2000
_INITIAL_SLOTS = 8


class VadListener(Protocol):
    """Hears one stream's voice activity, on the reactor thread (times in stream ms)."""

    def speech_started(self, start_ms: int) -> None:
        """Voice began at ``start_ms`` and has lasted speechPadding (protocol.md ``speaking``)."""

    def speech_paused(self, at_ms: int) -> None:
        """While speaking, the voice stopped at ``at_ms`` (it may resume within silencePadding)."""

    def speech_ended(self, start_ms: int, duration_ms: int) -> None:
        """The speech segment that began at ``start_ms`` lasted ``duration_ms`` (``silence`` (a))."""

    def silence_timeout(self, start_ms: int, duration_ms: int) -> None:
        """Silence since ``start_ms`` has lasted ``duration_ms`` (``silence`` (b), repeats)."""


class VadStream:
    """One call's audio going into the engine; ``write`` never blocks, never raises."""

    __slots__ = ("kind", "rate_hz", "listener", "segmenter", "closed", "dropped_ms", "_engine", "_slot",
                 "_group", "_webrtc", "_pending", "_written_samples")

    def __init__(self, engine: "VadEngine", kind: str, rate_hz: int, listener: VadListener,
                 segmenter: VadSegmenter) -> None:
        self.kind = kind
        self.rate_hz = rate_hz
        self.listener = listener
        self.segmenter = segmenter
        self.closed = False
        #: ms of audio dropped because the worker was behind (the stream clock still counts them).
        self.dropped_ms = 0
        self._engine = engine
        self._slot = -1
        self._group: _SileroGroup | None = None
        self._webrtc: WebrtcVad | None = None
        self._pending = bytearray()
        self._written_samples = 0

    def write(self, pcm: bytes) -> None:
        """A frame (normally 20 ms) of s16le mono at ``rate_hz``; a trailing odd byte is ignored."""
        if self.closed:
            return
        if self._group is not None:
            self._group.write(self._slot, pcm, self)
        else:
            self._engine._write_webrtc(self, pcm)

    def close(self) -> None:
        """Stop: no listener call after this returns."""
        if not self.closed:
            self.closed = True
            self._engine._close(self)


@dataclasses.dataclass
class _GroupJob:
    """One rate's share of a batch: what the worker needs, and what the reactor needs to scatter it back."""

    group: "_SileroGroup"
    rows: np.ndarray  # slots, sorted by window count, descending
    gens: np.ndarray  # slot generations at submission
    counts: list[int]  # windows per row
    active: list[int]  # rows taking part in run j: those with counts > j
    windows: np.ndarray  # [n, kmax, window] int16
    states: np.ndarray  # [2, n, 128] float32
    contexts: np.ndarray  # [n, context] float32
    ends_ms: np.ndarray  # [n, kmax] stream ms at each window's end


class _SileroGroup:
    """The streams of one sample rate, as rows of preallocated arrays (slots reused)."""

    def __init__(self, rate_hz: int, max_pending_ms: int) -> None:
        self.rate_hz = rate_hz
        self.window = WINDOW_SAMPLES[rate_hz]
        self.context = CONTEXT_SAMPLES[rate_hz]
        windows = max(2, -(-max_pending_ms * rate_hz // 1000) // self.window)
        self.width = windows * self.window
        self.streams: list[VadStream | None] = []
        self._free: list[int] = []
        self._alloc(_INITIAL_SLOTS)

    def _alloc(self, capacity: int) -> None:
        old = len(self.streams)
        buf = np.zeros((capacity, self.width), dtype=np.int16)
        fill = np.zeros(capacity, dtype=np.int64)
        base = np.zeros(capacity, dtype=np.int64)
        gen = np.zeros(capacity, dtype=np.int64)
        states = np.zeros((2, capacity, 128), dtype=np.float32)
        contexts = np.zeros((capacity, self.context), dtype=np.float32)
        if old:
            buf[:old], fill[:old], base[:old], gen[:old] = self.buf, self.fill, self.base, self.gen
            states[:, :old], contexts[:old] = self.states, self.contexts
        self.buf, self.fill, self.base, self.gen = buf, fill, base, gen
        self.states, self.contexts = states, contexts
        self.streams.extend([None] * (capacity - old))
        self._free.extend(range(capacity - 1, old - 1, -1))

    def __len__(self) -> int:
        return len(self.streams) - len(self._free)

    def add(self, stream: VadStream) -> int:
        if not self._free:
            self._alloc(2 * len(self.streams))
        slot = self._free.pop()
        self.streams[slot] = stream
        self.fill[slot] = 0
        self.base[slot] = 0
        self.gen[slot] += 1
        self.states[:, slot] = 0.0
        self.contexts[slot] = 0.0
        return slot

    def remove(self, slot: int) -> None:
        self.streams[slot] = None
        self.fill[slot] = 0
        self.gen[slot] += 1
        self._free.append(slot)

    def write(self, slot: int, pcm: bytes, stream: VadStream) -> None:
        n = len(pcm) // 2
        if not n:
            return
        samples = np.frombuffer(pcm, dtype="<i2", count=n)
        fill = int(self.fill[slot])
        dropped = 0
        if n >= self.width:
            # One absurd frame: keep its tail only, and nothing older.
            dropped = fill + n - self.width
            samples = samples[n - self.width:]
            n = self.width
            fill = 0
        elif fill + n > self.width:
            over = fill + n - self.width
            drop = min(fill, -(-over // self.window) * self.window)
            row = self.buf[slot]
            row[:fill - drop] = row[drop:fill]
            fill -= drop
            dropped = drop
        if dropped:
            self.base[slot] += dropped
            stream.dropped_ms += dropped * 1000 // self.rate_hz
            stream._engine.dropped_ms += dropped * 1000 // self.rate_hz
        self.buf[slot, fill:fill + n] = samples
        self.fill[slot] = fill + n

    def collect(self) -> _GroupJob | None:
        """Take every stream's complete windows (and its state) for one job, or None if there are none."""
        win = self.window
        k = self.fill // win
        rows = np.flatnonzero(k)
        if not rows.size:
            return None
        kr = k[rows]
        order = np.argsort(-kr, kind="stable")
        rows, kr = rows[order], kr[order]
        kmax = int(kr[0])
        n = rows.size
        windows = self.buf[rows, :kmax * win].reshape(n, kmax, win)
        starts = self.base[rows]
        ends_ms = (starts[:, None] + np.arange(1, kmax + 1) * win) * 1000 // self.rate_hz
        taken = kr * win
        rem = self.fill[rows] - taken
        max_rem = int(rem.max())
        if max_rem:
            idx = np.minimum(taken[:, None] + np.arange(max_rem), self.width - 1)
            self.buf[rows, :max_rem] = self.buf[rows[:, None], idx]
        self.fill[rows] = rem
        self.base[rows] += taken
        counts = kr.tolist()
        active = [int(np.count_nonzero(kr > j)) for j in range(kmax)]
        return _GroupJob(self, rows, self.gen[rows], counts, active, windows,
                         self.states[:, rows], self.contexts[rows], ends_ms)

    def scatter(self, job: _GroupJob, probs: np.ndarray, states: np.ndarray, contexts: np.ndarray
                ) -> list[tuple[VadStream, list[int], list[float]]]:
        """Store the new states of the rows still open; their (stream, window ends, probabilities)."""
        alive = self.gen[job.rows] == job.gens
        if not alive.any():
            return []
        rows = job.rows[alive]
        self.states[:, rows] = states[:, alive]
        self.contexts[rows] = contexts[alive]
        out = []
        ends = job.ends_ms.tolist()
        plist = probs.tolist()
        for i in np.flatnonzero(alive).tolist():
            stream = self.streams[int(job.rows[i])]
            if stream is not None:
                k = job.counts[i]
                out.append((stream, ends[i][:k], plist[i][:k]))
        return out


_Result = list[tuple[np.ndarray, np.ndarray, np.ndarray]]


class VadEngine:
    """Batched VAD for all calls (see the module docstring).

    :param media_clock: subscribed in the PROCESS phase while any stream is open.
    :param reactor: delivers worker results (``callFromThread``).
    :param clock: times each batch's round trip (``last_batch_s``).
    :param threadpool: an injected one-thread pool (not started/stopped here).
    :param submit: runs a job and returns a Deferred of its result (tests: inline).
    :param max_pending_ms: audio buffered per stream before the oldest is dropped.
    """

    _log = Logger()

    def __init__(self, media_clock: MediaClock, reactor: IReactorFromThreads, clock: IReactorTime, *,
                 threadpool: ThreadPool | None = None, submit: Submit[Any] | None = None,
                 max_pending_ms: int = DEFAULT_MAX_PENDING_MS, model_path: str | None = None) -> None:
        self._media_clock = media_clock
        self._clock = clock
        self._own_pool: ThreadPool | None = None
        if submit is None:
            pool = threadpool
            if pool is None:
                pool = self._own_pool = ThreadPool(minthreads=1, maxthreads=1, name="vad")
            submit = partial(deferToThreadPool, reactor, pool)
        self._submit: Submit[Any] = submit
        self._max_pending_ms = max(100, min(int(max_pending_ms), 60_000))
        self._model_path = model_path
        self._groups = {rate: _SileroGroup(rate, self._max_pending_ms) for rate in RATES}
        self._batches: dict[int, SileroBatch] = {}  # touched by the worker only
        self._webrtc: dict[int, VadStream] = {}
        self._subscribed = False
        self._in_flight = False
        #: counters (integers, for /metrics and benchmarks)
        self.batches = 0
        self.windows = 0
        self.failures = 0
        self.dropped_ms = 0
        self.last_batch_s = 0.0

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine's own worker thread (no-op with an injected pool or submit)."""
        if self._own_pool is not None and not self._own_pool.started:
            self._own_pool.start()

    def stop(self) -> None:
        """Close every stream and stop the own worker thread (waits for a running batch)."""
        for stream in self._all_streams():
            stream.close()
        if self._own_pool is not None and self._own_pool.started:
            self._own_pool.stop()

    def _all_streams(self) -> list[VadStream]:
        streams = list(self._webrtc.values())
        for group in self._groups.values():
            streams.extend(s for s in group.streams if s is not None)
        return streams

    def __len__(self) -> int:
        return len(self._webrtc) + sum(len(g) for g in self._groups.values())

    # -- streams ----------------------------------------------------------------------

    def open(self, kind: str, rate_hz: int, params: VadParams, listener: VadListener) -> VadStream:
        """Start VAD for one call's audio at ``rate_hz`` (8000 or 16000: the caller resamples).

        Raises ValueError for another kind or rate, :class:`VadUnavailableError` when the
        engine's library or model is missing.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown VAD type {kind!r} (expected one of {', '.join(KINDS)})")
        if rate_hz not in RATES:
            raise ValueError(f"VAD runs at 8000 or 16000 Hz, got {rate_hz!r}")
        if kind == "silero":
            check_available(self._model_path)
            stream = VadStream(self, kind, rate_hz, listener, VadSegmenter(params, 32))
            group = self._groups[rate_hz]
            stream._group = group
            stream._slot = group.add(stream)
        else:
            vad = WebrtcVad(rate_hz, params.voice_threshold)
            # voiceThreshold chose the aggressiveness; the 1.0/0.0 decisions segment at 0.5.
            seg_params = dataclasses.replace(params, voice_threshold=0.5)
            stream = VadStream(self, kind, rate_hz, listener, VadSegmenter(seg_params, WEBRTC_FRAME_MS))
            stream._webrtc = vad
            self._webrtc[id(stream)] = stream
        if not self._subscribed:
            self._subscribed = True
            self._media_clock.subscribe(self, PROCESS)
        return stream

    def _close(self, stream: VadStream) -> None:
        if stream._group is not None:
            stream._group.remove(stream._slot)
        else:
            self._webrtc.pop(id(stream), None)
        if not len(self) and self._subscribed:
            self._subscribed = False
            self._media_clock.unsubscribe(self, PROCESS)

    def _write_webrtc(self, stream: VadStream, pcm: bytes) -> None:
        pending = stream._pending
        pending += memoryview(pcm)[: len(pcm) & ~1]
        vad = stream._webrtc
        assert vad is not None
        limit = max(1, self._max_pending_ms // WEBRTC_FRAME_MS) * vad.frame_bytes
        over = len(pending) - limit
        if over > 0:
            drop = min(len(pending), -(-over // vad.frame_bytes) * vad.frame_bytes)
            del pending[:drop]
            stream._written_samples += drop // 2
            stream.dropped_ms += drop // 2 * 1000 // stream.rate_hz
            self.dropped_ms += drop // 2 * 1000 // stream.rate_hz

    # -- the tick ---------------------------------------------------------------------

    def media_tick(self, frames: int) -> None:
        """PROCESS phase: evaluate WebRTC streams now; submit one Silero batch unless one is in flight."""
        if self._webrtc:
            for stream in list(self._webrtc.values()):
                self._evaluate_webrtc(stream)
        if self._in_flight:
            return
        jobs = [job for job in (g.collect() for g in self._groups.values() if len(g)) if job is not None]
        if not jobs:
            return
        self._in_flight = True
        started = self._clock.seconds()
        try:
            d = self._submit(partial(self._evaluate, jobs))
        except Exception:
            self._in_flight = False
            self.failures += 1
            self._log.failure("VAD batch could not be submitted")
            return
        d.addCallbacks(self._batch_done, self._batch_failed, callbackArgs=(jobs, started))

    def _evaluate_webrtc(self, stream: VadStream) -> None:
        vad = stream._webrtc
        assert vad is not None
        pending = stream._pending
        fb = vad.frame_bytes
        n = len(pending) // fb
        if not n:
            return
        samples = fb // 2
        for i in range(n):
            p = vad.probability(bytes(pending[i * fb:(i + 1) * fb]))
            stream._written_samples += samples
            events = stream.segmenter.feed(stream._written_samples * 1000 // stream.rate_hz, p)
            if events:
                self._deliver(stream, events)
                if stream.closed:
                    return
        del pending[:n * fb]

    def _evaluate(self, jobs: Sequence[_GroupJob]) -> _Result:
        """The worker's part: the Silero runs of every job, one per window index."""
        out: _Result = []
        for job in jobs:
            rate = job.group.rate_hz
            batch = self._batches.get(rate)
            if batch is None:
                batch = self._batches[rate] = SileroBatch(rate, self._model_path)
            n, kmax, _ = job.windows.shape
            x = job.windows.astype(np.float32)
            x *= 1.0 / 32768.0
            states, contexts = job.states, job.contexts
            probs = np.zeros((n, kmax), dtype=np.float32)
            for j, m in enumerate(job.active):
                p, new_states, new_contexts = batch.run(x[:m, j], states[:, :m], contexts[:m])
                probs[:m, j] = p
                states[:, :m] = new_states
                contexts[:m] = new_contexts
            out.append((probs, states, contexts))
        return out

    def _batch_done(self, results: _Result, jobs: Sequence[_GroupJob], started: float) -> None:
        self._in_flight = False
        self.batches += 1
        self.last_batch_s = self._clock.seconds() - started
        for job, (probs, states, contexts) in zip(jobs, results):
            self.windows += sum(job.counts)
            for stream, ends, plist in job.group.scatter(job, probs, states, contexts):
                feed = stream.segmenter.feed
                for end_ms, p in zip(ends, plist):
                    events = feed(end_ms, p)
                    if events:
                        self._deliver(stream, events)
                        if stream.closed:
                            break

    def _batch_failed(self, failure: Failure) -> None:
        self._in_flight = False
        self.failures += 1
        self._log.failure("VAD batch failed; its windows are lost", failure)

    def _deliver(self, stream: VadStream, events: Sequence[VadEvent]) -> None:
        listener = stream.listener
        for event in events:
            if stream.closed:
                return
            try:
                if isinstance(event, SpeechStart):
                    listener.speech_started(event.start_ms)
                elif isinstance(event, SpeechPause):
                    listener.speech_paused(event.at_ms)
                elif isinstance(event, SpeechEnd):
                    listener.speech_ended(event.start_ms, event.duration_ms)
                elif isinstance(event, SilenceTimeout):
                    listener.silence_timeout(event.start_ms, event.duration_ms)
            except Exception:
                self._log.failure("VAD listener failed for {kind} stream", kind=stream.kind)
