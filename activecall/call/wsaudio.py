"""A call's audio exchanged with an external WebSocket server: what ``mediaPass`` and ``realtime`` share.

:class:`WebSocketAudio` connects through ``services.open_websocket`` (the ``[fetch]`` policy applies),
and once the upgrade succeeded puts a sink on the call's caller audio (what the server hears) and a
source among what the server-side track mixes in (what the remote party hears of the server), reporting
``trackStart{SST}``; when the connection or the call ends it takes both off again (``trackEnd{SST}``).
A subclass says where to connect, builds the sink and source, and words its errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

from activecall.call.events import TrackEnded, TrackStarted
from activecall.media.tracks import AudioSink, AudioSource

if TYPE_CHECKING:
    from activecall.call.controller import CallController

__all__ = ["WebSocketAudio"]


class WebSocketAudio:
    """One connection of a call to an external audio server, from connecting to its end."""

    #: What the errors of a daemon without client WebSockets say.
    unavailable = "not available here"

    def __init__(self, call: "CallController") -> None:
        self._call = call
        self._conn: Any = None
        self._sink: Optional[AudioSink] = None
        self._source: Optional[AudioSource] = None
        self._started_at: Optional[float] = None
        self.closed = False

    # -- what a subclass provides ----------------------------------------------

    def _target(self) -> tuple[str, Optional[Mapping[str, str]]]:
        """The URL and headers to connect to; an exception saying what is wrong."""
        raise NotImplementedError

    def _attach(self, conn: Any) -> tuple[AudioSink, AudioSource]:
        """The connection is open: the sink of the caller's audio and the source of the server's."""
        raise NotImplementedError

    def _report(self, text: str) -> None:
        """An error event about this connection."""
        raise NotImplementedError

    def _lost(self, clean: bool, code: Optional[int], reason: str) -> None:
        """The server closed a connection that was open while the call goes on."""

    # -- the lifecycle -----------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._source is not None

    def start(self) -> None:
        """Connect; the audio flows from the upgrade on."""
        open_websocket = self._call.services.open_websocket
        if open_websocket is None:
            self._report(self.unavailable)
            return
        try:
            url, headers = self._target()
            d = open_websocket(url, self, headers=headers)
        except Exception as e:  # a missing key or endpoint, a URL the [fetch] policy refuses
            self._report(f"cannot connect: {e}")
            return
        d.addCallbacks(self._opened, self._failed)

    def _opened(self, conn: Any) -> None:
        c = self._call
        if self.closed or c.ended or c.leg is None:
            conn.close()
            return
        self._conn = conn
        self._sink, self._source = self._attach(conn)
        c.caller_audio.add(self._sink)
        c.track.mixes[self] = self._source
        self._started_at = c.now()
        c.report(TrackStarted(c.now(), c.sst))

    def _failed(self, failure: Any) -> None:
        if not self.closed and not self._call.ended:
            self._report(f"cannot connect: {failure.getErrorMessage()}")

    def stop(self) -> None:
        """The call ended: close the connection."""
        self.closed = True
        conn, self._conn = self._conn, None
        self._detach()
        if conn is not None:
            conn.close()

    def _detach(self) -> None:
        c = self._call
        if self._sink is not None:
            c.caller_audio.remove(self._sink)
            self._sink = None
        if self._source is not None and c.track.mixes.get(self) is self._source:
            del c.track.mixes[self]
        self._source = None
        if self._started_at is not None:
            started, self._started_at = self._started_at, None
            if not c.ended:
                c.report(TrackEnded(c.now(), c.sst, c.now() - started, 0))

    # -- WsListener ----------------------------------------------------------------

    def ws_text(self, text: str) -> None:
        """Text messages carry nothing unless a subclass says so."""

    def ws_binary(self, data: bytes) -> None:
        """Binary messages carry nothing unless a subclass says so."""

    def ws_closed(self, clean: bool, code: Optional[int], reason: str) -> None:
        was_open = self._conn is not None
        self._conn = None
        self._detach()
        if was_open and not self.closed and not self._call.ended:
            self._lost(clean, code, reason)
