"""Call recording as a sink on the caller fan-out: caller left, agent right, 16 kHz stereo."""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred

from activecall.call.services import Recorder
from activecall.fileio import file_safe_name, safe_join
from activecall.media.resample import Resampler

RECORDING_RATE_HZ = 16000
_FRAME_BYTES = RECORDING_RATE_HZ // 50 * 2
# Caller audio waiting to be recorded; a client sending faster than real time is trimmed.
_MAX_BACKLOG_BYTES = RECORDING_RATE_HZ * 2


def recording_file(recorder_file: str, sid: str, recording_dir: str) -> str:
    """Where a call's WAV goes (playbook.md §15): ``{id}`` → sid, default/relative under the recording dir.

    The result always lies inside ``recording_dir`` (an absolute ``recorderFile`` only when it
    already does); anything else raises :class:`~activecall.fileio.UnsafePathError`.
    """
    sid_name = file_safe_name(sid)
    name = recorder_file.replace("{id}", sid_name) if recorder_file else f"{sid_name}.wav"
    if not name.endswith(".wav"):
        name += ".wav"
    return safe_join(recording_dir, name)


class CallRecording:
    """Pairs caller frames (written to it as a sink) with the agent frame of each tick.

    One stereo frame is written per agent pull (:meth:`agent_frame`), so the file
    runs at real time whatever the caller side sends; caller audio that is
    missing is silence, caller audio beyond two seconds of backlog is dropped.
    """

    __slots__ = ("path", "_recorder", "_caller", "_to_rec_caller", "_to_rec_agent")

    def __init__(self, recorder: Recorder, path: str, media_rate_hz: int) -> None:
        self.path = path
        self._recorder = recorder
        self._caller = bytearray()
        if media_rate_hz != RECORDING_RATE_HZ:
            self._to_rec_caller: Optional[Resampler] = Resampler(media_rate_hz, RECORDING_RATE_HZ)
            self._to_rec_agent: Optional[Resampler] = Resampler(media_rate_hz, RECORDING_RATE_HZ)
        else:
            self._to_rec_caller = self._to_rec_agent = None

    def write_frame(self, frame: bytes) -> None:
        """Caller audio (after muting) at the leg's media rate."""
        if self._to_rec_caller is not None:
            frame = self._to_rec_caller.process(frame)
        caller = self._caller
        caller += frame
        excess = len(caller) - _MAX_BACKLOG_BYTES
        if excess > 0:
            del caller[: excess + (excess & 1)]

    def agent_frame(self, frame: Optional[bytes]) -> None:
        """This tick's agent frame (None: the agent is silent): writes one stereo frame."""
        n = _FRAME_BYTES
        if frame is None:
            right = bytes(n)
        elif self._to_rec_agent is not None:
            right = self._to_rec_agent.process(frame)
        else:
            right = frame
        left = bytes(self._caller[:n])
        del self._caller[:n]
        if len(left) < n:
            left += bytes(n - len(left))  # the caller sent less than real time: silence
        self._recorder.write(left, right)

    def close(self) -> Deferred[None]:
        """Finish the file: a Deferred that fires when it is complete."""
        return self._recorder.close()
