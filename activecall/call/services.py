"""What every call controller is given by the composition root (tap.py), and the seams it sees them through."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from activecall.config import AmbianceConfig
from activecall.ids import IdSource
from activecall.media.cache import MediaCache
from activecall.media.clock import MediaClock
from activecall.media.tracks import IInboundLegFactory, ILegDialer
from activecall.speech.registry import RecognizerRegistry, SynthesizerRegistry


class Recorder(Protocol):
    """A stereo call recording (activecall.media.recorder.WavRecorder)."""

    def write(self, left: bytes, right: bytes) -> None:
        """Append one frame per channel (caller left, agent right)."""

    def close(self) -> Deferred[None]:
        """Finish the file; fires when it is complete."""


class CallRecords(Protocol):
    """Saves one call record per call (activecall.call.recordstore.CallRecordWriter)."""

    def write(self, record: dict[str, Any], started_at: float) -> Deferred[Any]:
        """Save ``record`` (built by build_call_record)."""


class PendingInbound(Protocol):
    """Inbound calls waiting for a client to accept them (activecall.handlers.pending.PendingCalls)."""

    def __contains__(self, dialog_id: object) -> bool: ...

    def get(self, dialog_id: str) -> Any:
        """The waiting call, left waiting."""

    def take(self, dialog_id: str) -> Any:
        """The waiting call, no longer waiting (the client accepts or answers it)."""

    def cancelled(self, dialog_id: str) -> bool:
        """The caller cancelled it."""

    def reject(self, dialog_id: str, code: int, reason: str) -> bool:
        """Decline it."""

    def client_disconnected(self, dialog_id: str) -> bool:
        """Its client went away before answering."""


class VoiceStream(Protocol):
    """One call's audio into the VAD engine."""

    def write(self, pcm: bytes) -> None: ...

    def close(self) -> None: ...


class VoiceDetectors(Protocol):
    """The process's VAD engine (activecall.speech.vad.engine.VadEngine): batched across calls."""

    def open(self, kind: str, rate_hz: int, params: Any, listener: Any) -> VoiceStream:
        """A stream for one call (kind ``silero``/``webrtc``, 8000 or 16000 Hz); raises if it cannot run."""


class AudioFilter(Protocol):
    """A frame-by-frame filter of caller audio (denoise): as many bytes out as in."""

    def process(self, frame: bytes) -> bytes: ...


def _not_observed(kind: str, provider: str, seconds: Optional[float], error: bool = False) -> None:
    """Provider measurements go nowhere (no /metrics)."""


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
    # Outbound legs by call kind ("sip" when SIP is configured); /call legs come from their session.
    dialers: Mapping[str, ILegDialer] = field(default_factory=dict)
    # Wraps inbound SIP calls into legs; None: no SIP.
    inbound_legs: Optional[IInboundLegFactory] = None
    # Opens a stereo WAV recorder at a path; None disables recording.
    make_recorder: Optional[Callable[[str], Recorder]] = None
    # [recording] enabled + auto_start: record every call from answer.
    auto_record: bool = False
    recording_path: str = "./config/recorders"
    # None: [callrecord] absent.
    call_records: Optional[CallRecords] = None
    # Records still being assembled (recording closing, sizes); shutdown waits for them.
    records_in_flight: set[Deferred[None]] = field(default_factory=set)
    # None: no webhook handler, so no call waits for a client.
    pending: Optional[PendingInbound] = None
    models_dir: str = "./models"
    # Local files `play` may read ([fetch] media_dirs); anything else is refused.
    media_dirs: tuple[str, ...] = ("./config/media",)
    # Speech recognition providers by name; None: no ASR here.
    recognizers: Optional[RecognizerRegistry] = None
    # The batched VAD engine; None: no VAD here (the offline extra is missing).
    vad: Optional[VoiceDetectors] = None
    # Builds a denoiser for a leg rate (RNNoise); None: denoise not available.
    make_denoiser: Optional[Callable[[int], AudioFilter]] = None
    # Filler words barge-in ignores (config/fillers.txt); empty: the built-in list.
    fillers: frozenset[str] = frozenset()
    # One provider request: observe_provider(kind, provider, seconds to first byte or None, error).
    observe_provider: Callable[[str, str, Optional[float], bool], None] = _not_observed
    # The [ambiance] table: fills the keys a call's ambiance block leaves unset; None: built-in defaults.
    ambiance_defaults: Optional[AmbianceConfig] = None
    # Opens a client WebSocket under the [fetch] policy: open_websocket(url, listener, headers=None) ->
    # Deferred[connection] (send_text, send_binary, close; the listener gets ws_binary/ws_text/ws_closed);
    # None: not available (mediaPass, realtime).
    open_websocket: Optional[Callable[..., Deferred[Any]]] = None
    # The operator's OPENAI_API_KEY: only ever sent to OpenAI's own realtime endpoint.
    openai_api_key: Optional[str] = None
    # The calls of this node that have not ended, by session id (what ``bridge`` finds its target in).
    calls: dict[str, Any] = field(default_factory=dict)
