"""What every call controller is given by the composition root (tap.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from activecall.ids import IdSource
from activecall.media.clock import MediaClock
from activecall.media.cache import MediaCache
from activecall.speech.registry import SynthesizerRegistry


@dataclass
class CallServices:
    """Shared, process-wide collaborators of calls; nothing here is global state."""

    clock: IReactorTime
    media_clock: MediaClock
    ids: IdSource
    synthesizers: SynthesizerRegistry
    cache: MediaCache
    # Runs a blocking function in the worker thread pool: run_blocking(f, *args) -> Deferred.
    run_blocking: Callable[..., Deferred[Any]]
    # Fetches an http(s) URL under the [fetch] policy: fetch_url(url) -> Deferred[bytes]
    # (activecall.fetch.Fetcher.get; fails with a FetchError whose text reveals nothing).
    fetch_url: Callable[[str], Deferred[bytes]]
    # Opens a stereo WAV recorder at a path: make_recorder(path) -> WavRecorder-like
    # (write(left, right), close() -> Deferred). None disables recording.
    make_recorder: Optional[Callable[[str], Any]] = None
    # [recording] enabled + auto_start: record every call from answer.
    auto_record: bool = False
    recording_path: str = "./config/recorders"
    # SIP user agent + RTP engine for /call/sip (activecall.legs.sip.SipMedia); None: no SIP.
    sip: Any = None
    # Saves one call record per call (activecall.call.recordstore.CallRecordWriter); None: [callrecord] absent.
    call_records: Any = None
    # Records still being assembled (recording closing, sizes); shutdown waits for them.
    records_in_flight: set = field(default_factory=set)
    # Inbound calls waiting for a client (activecall.handlers.pending.PendingCalls); None: no webhook.
    pending: Any = None
    models_dir: str = "./models"
    # Local files `play` may read ([fetch] media_dirs); anything else is refused.
    media_dirs: tuple[str, ...] = ("./config/media",)
    environ: Mapping[str, str] = field(default_factory=dict)
