"""Turn latency: end of the caller's speech -> asrFinal -> first agent audio, over /call, SIP and a playbook (run by hand).

    python benchmarks/turn_latency.py [--turns 20] [--paths call,sip,playbook] [--reply TEXT] [--llm-delay-ms 200]

Starts the real daemon on 127.0.0.1 with offline models: Silero VAD, Whisper tiny.en
(``asr.provider = whisper``) and Piper (``tts.provider = piper``).  A scripted agent in
this process answers each ``asrFinal`` at once with ``tts`` of a fixed reply (a fresh
``cacheKey`` per turn, so every reply is synthesized, not read from the media cache).
The caller speaks espeak-ng sentences of 1-9 s, 16 kHz, 20 ms per frame in real time,
and keeps sending silence between utterances as a phone does.

Paths:

* ``call``: a ``/call`` session, codec ``pcm`` 16 kHz; the WebSocket client is the caller
  and receives the agent's audio frames.
* ``sip``: a ``/call/sip`` session places an ``invite`` to a far end in this process: the
  project's test glue (``tests/integration/media_peer.py``, a real ``RtpLeg`` behind
  ``build_sip_service``) answering with PCMU.  The far end speaks the utterances as RTP
  (its leg's source) and timestamps the agent audio its leg delivers (its sink, after
  the jitter buffer, as a phone would play it).  Chosen over SIPp ``play_pcap_audio``
  because one reactor then knows both when the last speech frame left and when agent
  audio arrived, without the ``subscribe`` mirror.
* ``playbook``: a ``/call`` session like ``call``, but driven by an inline playbook
  (``option.playbook``) whose ``llm.baseUrl`` is a local OpenAI-compatible server in this
  process (:class:`activecall.testing_llm.ScriptedLlm`) that streams the reply after a
  fixed first-token delay (``--llm-delay-ms``). The daemon's conversation engine, not this
  process, answers each final: the full agent loop (engine, HTTP/SSE client, clause
  chunking, streaming TTS).

Per turn (this process's clock; the daemon runs on the same machine):

* T0 = the utterance's last voiced 20 ms frame was sent (known from the generated audio);
  the VAD can only know the speech ended ``silencePadding`` (100 ms) later, so figures are
  given from T0 and from T0 + padding;
* T1 = ``asrFinal`` arrived (only finals after T0 count; earlier ones are a split utterance);
* T2 = the first non-silent agent audio frame arrived.

Model time is measured in this process with the same engines and settings as the daemon
(``WhisperEngine.decode`` of the utterance, 1 thread int8; Piper's time to its first
chunk of the reply), while the daemon is idle.  "Our share" is
``T1 - T0 - padding - whisper decode`` and ``T2 - T1 - piper first chunk`` (on the
playbook path also minus the model's fixed delay); it includes everything that is not a
model: frame transport, VAD batching, queueing behind a partial decode, event delivery,
the LLM round trip over loopback, resampling and media-clock pacing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
from autobahn.twisted.websocket import WebSocketClientFactory, connectWS  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402

from asr_whisper import UTTERANCES, espeak_16k  # noqa: E402
from harness import BASE_CONFIG, CallClient, _Waiters, free_port, start_daemon  # noqa: E402
from media_peer import MediaCall, MediaPeerHandler  # noqa: E402

from activecall.config import Config  # noqa: E402
from activecall.testing_llm import ScriptedLlm, TextReply, listen_llm  # noqa: E402
from activecall.ids import SystemIds  # noqa: E402
from activecall.rtp.srtp import generate_crypto  # noqa: E402
from activecall.rtp.transport import RtpEndpoint  # noqa: E402
from activecall.sdp.negotiation import answer_offer  # noqa: E402
from activecall.sip.service import build_sip_service  # noqa: E402

RATE = 16000
FRAME = RATE // 50 * 2  # 20 ms of s16le
SILENCE = bytes(FRAME)
VOICED_RMS = 300.0  # a 20 ms frame louder than this (about -40 dBFS) is speech
AGENT_PEAK = 300  # first agent frame with a sample beyond this is "agent audio"
LEAD_S = 0.4  # silence before each utterance
PAUSE_S = 0.5  # silence after the agent's reply ended, before the next utterance
MISSED_S = 10.0  # no asrFinal this long after the last speech frame: the turn is counted as missed
# One clause, so the playbook path speaks it as one piece and Piper's first chunk is the same as on the others.
DEFAULT_REPLY = "I can help you with that."
# The playbook path's agent: the daemon's engine asks the local model, which answers the fixed reply.
PLAYBOOK = """---
asr: {{provider: whisper, language: en}}
tts: {{provider: piper}}
vad: {{type: silero, silencePadding: {padding}}}
interruption: {{strategy: none}}
llm:
  provider: openai
  baseUrl: {base_url}
  model: scripted
greeting: Hello.
---
You are a helpful assistant.
"""
# asr_whisper's sentences up to 6 s, then long ones without commas: espeak-ng pauses at a comma for
# longer than the 100 ms silencePadding, which would split the utterance into two VAD segments.
SENTENCES = UTTERANCES[:6] + (
    "My internet connection has been very slow since Saturday and restarting the router did not help at all.",
    "I ordered a blue jacket last week and it arrived today but it is the wrong size so I would like to send "
    "it back and get a refund.",
)


def frames_of(audio: np.ndarray) -> tuple[list[bytes], int]:
    """The utterance as 20 ms frames and the index of its last voiced frame."""
    pcm = (audio * 32768.0).clip(-32768, 32767).astype("<i2").tobytes()
    pcm += bytes(-len(pcm) % FRAME)
    frames = [pcm[i:i + FRAME] for i in range(0, len(pcm), FRAME)]
    rms = [float(np.sqrt(np.mean(np.frombuffer(f, "<i2").astype(np.float64) ** 2))) for f in frames]
    voiced = [i for i, r in enumerate(rms) if r > VOICED_RMS]
    return frames, voiced[-1]


class Speaker:
    """The caller's mouth: queued frames then silence, one per 20 ms pull; notes when the last voiced frame left."""

    def __init__(self) -> None:
        self._queue: list[bytes] = []
        self._last_voiced = -1
        self.last_voiced_at: Optional[float] = None

    def say(self, frames: list[bytes], last_voiced: int) -> None:
        lead = [SILENCE] * int(LEAD_S * 50)
        self._queue = lead + frames
        self._last_voiced = len(lead) + last_voiced
        self.last_voiced_at = None

    def next_frame(self) -> bytes:
        if not self._queue:
            return SILENCE
        frame = self._queue.pop(0)
        if self._last_voiced == 0:
            self.last_voiced_at = reactor.seconds()
        self._last_voiced -= 1
        return frame


class Turn:
    """One turn's timestamps, filled by the client (T1) and by whichever side hears the agent (T2)."""

    def __init__(self, index: int, utterance: int, speaker: Speaker) -> None:
        self.index = index
        self.utterance = utterance
        self.speaker = speaker
        self.speech_end_at = 0.0  # T0
        self.final_at: Optional[float] = None
        self.agent_at: Optional[float] = None
        self.early_finals = 0
        self.asr_completed_ms: Optional[int] = None
        self.tts_completed_ms: Optional[int] = None
        self.track_start_at: Optional[float] = None
        self.reply_ended = False

    def missed(self) -> bool:
        """No final long after the speech ended."""
        return self.speaker.last_voiced_at is not None and reactor.seconds() - self.speaker.last_voiced_at > MISSED_S

    def agent_frame(self, pcm: bytes, at: float) -> None:
        if self.final_at is not None and self.agent_at is None and len(pcm) >= 2 and \
                int(np.abs(np.frombuffer(pcm[: len(pcm) // 2 * 2], "<i2")).max()) > AGENT_PEAK:
            self.agent_at = at


class Agent(CallClient):
    """The scripted agent on the control socket: each asrFinal after the speech ended gets the reply at once."""

    turn: Optional[Turn] = None
    reply = DEFAULT_REPLY
    run_id = "0"
    hears_audio = True  # /call: binary frames are the agent audio
    scripted = True  # False: a playbook in the daemon answers, this client only listens

    def connectionMade(self) -> None:
        super().connectionMade()
        # Autobahn's client reads its tcpNoDelay option before it has one, so Nagle stays on: a command
        # sent between audio frames would then wait for the daemon's delayed ACK (~40 ms).
        self.transport.setTcpNoDelay(True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        now = reactor.seconds()
        turn = self.turn
        if isBinary:
            if turn is not None and self.hears_audio:
                turn.agent_frame(payload, now)
            self.factory.waiters.poke()
            return
        super().onMessage(payload, isBinary)
        event = self.events[-1]
        if turn is None:
            return
        if event.get("event") == "asrFinal" and turn.final_at is None:
            if turn.speaker.last_voiced_at is None:
                turn.early_finals += 1  # the VAD split the utterance: the caller is still talking
            else:
                turn.final_at = now
                turn.speech_end_at = turn.speaker.last_voiced_at
                if self.scripted:
                    self.send({"command": "tts", "text": self.reply, "playId": f"r{turn.index}", "endOfStream": True,
                               "cacheKey": f"turnlat-{self.run_id}-{turn.index}"})
        elif turn.final_at is None:
            return
        elif event.get("event") == "metrics" and event.get("key") == "completed.asr.whisper" and \
                turn.asr_completed_ms is None:
            turn.asr_completed_ms = event.get("duration")
        elif event.get("event") == "metrics" and event.get("key") == "completed.tts.piper" and \
                turn.tts_completed_ms is None:
            turn.tts_completed_ms = event.get("duration")
        elif event.get("event") == "trackStart" and event.get("trackId") == "server-side-track" and \
                turn.track_start_at is None:
            turn.track_start_at = now
        elif event.get("event") == "trackEnd" and event.get("trackId") == "server-side-track" and \
                turn.agent_at is not None:
            turn.reply_ended = True


def connect_agent(url: str) -> defer.Deferred:
    factory = WebSocketClientFactory(url)
    factory.protocol = Agent
    factory.waiters = _Waiters()
    factory.opened = defer.Deferred()
    connectWS(factory)
    return factory.opened


class SpeakingCall(MediaCall):
    """The far end of the SIP path: speaks the Speaker's frames and hands received agent audio to the turn."""

    speaker: Speaker
    on_agent: Callable[[bytes, float], None]

    def _agent_frame(self, caller: bytes) -> bytes:
        # media_peer's naming is from its own side: "caller" is what the daemon sent us.
        self.on_agent(caller, self._reactor.seconds())
        return self.speaker.next_frame()


class FarEnd(MediaPeerHandler):
    """MediaPeerHandler answering with a :class:`SpeakingCall` (same negotiation as the test glue)."""

    def __init__(self, speaker: Speaker, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.speaker = speaker
        self.turn: Optional[Turn] = None

    def incoming_call(self, call: Any) -> None:
        endpoint = RtpEndpoint(self.reactor, self.allocator, bind_ip=self.address)
        port = endpoint.start()
        answer, negotiated = answer_offer(
            call.remote_sdp, self.codecs, self.address, port, session_id=len(self.calls) + 1,
            srtp=False, make_crypto=lambda tag, suite: generate_crypto(tag, suite, self.rng))
        media = SpeakingCall(self, call, endpoint, negotiated, answer.encode("ascii"),
                             os.path.join(self.record_dir, f"call-{len(self.calls) + 1}.wav"))
        media.speaker = self.speaker
        media.on_agent = self._agent_audio
        call.listener = media
        self.calls.append(media)
        call.answer(answer).addErrback(self._answer_failed, media)

    def _agent_audio(self, pcm: bytes, at: float) -> None:
        if self.turn is not None:
            self.turn.agent_frame(pcm, at)


class ModelTimes:
    """Whisper decode per utterance and Piper's first chunk of the reply, in this process, as the daemon runs them."""

    def __init__(self, audios: list[np.ndarray], reply: str, repeat: int) -> None:
        from faster_whisper import WhisperModel

        from activecall.speech.asr.whisper import WhisperEngine, default_model_path
        from activecall.speech.tts.piper import VoiceCache, default_voice_paths

        model_dir, voice_paths = default_model_path(), default_voice_paths()
        if model_dir is None or voice_paths is None:
            sys.exit("needs activecall[offline]: the Whisper and Piper model wheels")
        engine = WhisperEngine(WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=1))
        engine.decode(np.zeros(RATE, np.float32), "en", 1)  # warm up
        self.whisper_ms = [self._median(lambda: engine.decode(a, "en", 1), repeat) for a in audios]
        voice = VoiceCache().get(*voice_paths)
        next(iter(voice.synthesize("Warm up.")))
        self.piper_ms = self._median(lambda: next(iter(voice.synthesize(reply))), repeat)

    @staticmethod
    def _median(run: Callable[[], Any], repeat: int) -> float:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000


async def wait_for(check: Callable[[], Any], timeout_s: float, what: Callable[[], str] | str) -> None:
    """Poll ``check`` every 10 ms (timestamps are taken where things happen, so polling adds no error)."""
    deadline = reactor.seconds() + timeout_s
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what() if callable(what) else what}")
        await task.deferLater(reactor, 0.01, lambda: None)


async def run_turns(client: Agent, speaker: Speaker, far: Optional[FarEnd], utterances: list[tuple[list[bytes], int]],
                    turns: int) -> list[Turn]:
    """A warm-up turn (model loads), then ``turns`` measured turns cycling through the utterances."""
    done: list[Turn] = []
    for n in range(turns + 1):
        u = 0 if n == 0 else (n - 1) % len(utterances)
        turn = Turn(n, u, speaker)
        client.turn = turn
        if far is not None:
            far.turn = turn
        speaker.say(*utterances[u])
        seen = len(client.events)
        await wait_for(lambda: turn.final_at is not None or turn.missed(), 60,
                       lambda: f"asrFinal of turn {n}; events {[e.get('event') for e in client.events[seen:]]}")
        if turn.final_at is None:  # nothing recognized (an empty transcript gives no asrFinal): say the next one
            events = [e.get("event") for e in client.events[seen:]]
            print(f"turn {n}: no asrFinal {MISSED_S:.0f} s after the speech ({SENTENCES[u]!r}); events {events}")
            if n:
                done.append(turn)
            continue
        await wait_for(lambda: turn.agent_at is not None, 60, f"agent audio of turn {n}")
        await wait_for(lambda: turn.reply_ended, 60, f"trackEnd of turn {n}")
        await task.deferLater(reactor, PAUSE_S, lambda: None)
        if n:
            done.append(turn)
    client.turn = None
    return done


def fixed_reply(text: str, delay_ms: float) -> Callable[[Any], defer.Deferred]:
    """The local model: ``text`` as one streamed chunk, ``delay_ms`` after each request (a model's first token)."""
    return lambda body: task.deferLater(reactor, delay_ms / 1000, TextReply, (text,))


def pct(values: list[float]) -> str:
    a = np.array(values)
    return f"p50 {np.percentile(a, 50):7.1f}  p95 {np.percentile(a, 95):7.1f}  max {a.max():7.1f} ms"


def report(path: str, all_turns: list[Turn], models: ModelTimes, padding_ms: float, durations: list[float],
           llm_ms: float = 0.0) -> None:
    turns = [t for t in all_turns if t.final_at is not None]
    eos_final = [(t.final_at - t.speech_end_at) * 1000 for t in turns]  # type: ignore[operator]
    final_agent = [(t.agent_at - t.final_at) * 1000 for t in turns]  # type: ignore[operator]
    eos_agent = [(t.agent_at - t.speech_end_at) * 1000 for t in turns]  # type: ignore[operator]
    whisper = [models.whisper_ms[t.utterance] for t in turns]
    # A split utterance's final decodes only its tail: the whole utterance's decode time does not apply.
    whole = [i for i, t in enumerate(turns) if not t.early_finals]
    ours_asr = [eos_final[i] - padding_ms - whisper[i] for i in whole]
    ours_tts = [f - models.piper_ms - llm_ms for f in final_agent]
    print(f"\n== {path}: {len(all_turns)} turns ({len(all_turns) - len(turns)} without asrFinal), "
          f"utterances {min(durations):.1f}-{max(durations):.1f} s, silencePadding {padding_ms:.0f} ms")
    print(f"last speech frame -> asrFinal          {pct(eos_final)}")
    print(f"  from last frame + silencePadding     {pct([e - padding_ms for e in eos_final])}")
    print(f"asrFinal -> first agent audio          {pct(final_agent)}")
    print(f"last speech frame -> first agent audio {pct(eos_agent)}")
    print(f"  from last frame + silencePadding     {pct([e - padding_ms for e in eos_agent])}")
    print(f"model: whisper decode (final)          {pct(whisper)}")
    print(f"model: piper first chunk               {models.piper_ms:7.1f} ms")
    if llm_ms:
        print(f"model: LLM first token (fixed)         {llm_ms:7.1f} ms")
    print(f"our share, speech end -> asrFinal      {pct(ours_asr)}  ({len(whole)} unsplit turns)")
    print(f"our share, asrFinal -> agent audio     {pct(ours_tts)}")
    print(f"our share, both                        {pct([ours_asr[k] + ours_tts[i] for k, i in enumerate(whole)])}")
    # The daemon's own figures: segment end -> final, and the reply's synthesis (one Piper chunk per sentence).
    asr_done = [float(t.asr_completed_ms) for t in turns if t.asr_completed_ms is not None]
    if asr_done:
        print(f"daemon metric completed.asr.whisper    {pct(asr_done)}")
    tts_done = [t for t in turns if t.tts_completed_ms is not None]
    if tts_done:
        print(f"daemon metric completed.tts.piper      {pct([float(t.tts_completed_ms) for t in tts_done])}")  # type: ignore[arg-type]
        # Our share after the final with the daemon's own synthesis time (its Piper shares two cores with Whisper).
        print(f"  asrFinal -> agent audio - that{' - LLM' if llm_ms else '      '} {pct([(t.agent_at - t.final_at) * 1000 - t.tts_completed_ms - llm_ms for t in tts_done])}")  # type: ignore[operator]
    started = [(t.track_start_at - t.final_at) * 1000 for t in turns if t.track_start_at is not None]  # type: ignore[operator]
    if started:
        print(f"asrFinal -> trackStart event           {pct(started)}")
    split = sorted({t.utterance for t in turns if t.early_finals})
    print(f"utterances split by the VAD            {sum(1 for t in turns if t.early_finals)} of {len(turns)} turns"
          + (f" (utterances {split}: an earlier asrFinal came while the caller still spoke)" if split else ""))


async def socket_turns(daemon: Any, path: str, option: dict[str, Any], speaker: Speaker,
                       utterances: list[tuple[list[bytes], int]], turns: int) -> list[Turn]:
    """The ``call`` and ``playbook`` paths: a ``/call`` session whose client is the caller's phone."""
    client = await connect_agent(f"{daemon.ws_url}/call?id=turnlat-{path}&dump=false&ping=0")
    client.scripted = "playbook" not in option
    client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": RATE, **option}})
    await client.wait_event("answer", timeout_s=30)
    if not client.scripted:
        await client.wait_event("trackEnd", timeout_s=30, trackId="server-side-track")  # the greeting
    mouth = task.LoopingCall(lambda: client.sendMessage(speaker.next_frame(), isBinary=True))
    mouth.start(0.02)
    try:
        return await run_turns(client, speaker, None, utterances, turns)
    finally:
        mouth.stop()
        client.transport.loseConnection()


async def run(args: argparse.Namespace) -> None:
    if shutil.which("espeak-ng") is None:
        sys.exit("needs espeak-ng")
    audios = [espeak_16k(text) for text in SENTENCES]
    utterances = [frames_of(a) for a in audios]
    durations = [len(a) / RATE for a in audios]
    print(f"utterances: {len(audios)}, " + ", ".join(f"{d:.1f}" for d in durations) + " s")
    models = ModelTimes(audios, args.reply, args.repeat)
    print("in-process whisper decode ms: " + ", ".join(f"{m:.0f}" for m in models.whisper_ms)
          + f"; piper first chunk {models.piper_ms:.0f} ms")
    Agent.reply = args.reply
    workdir = tempfile.mkdtemp(prefix="ac-turnlat-")
    base = 24000 + 2 * (os.getpid() % 2000)
    config = f"rtp_start_port = {base}\nrtp_end_port = {base + 100}\n" + BASE_CONFIG
    daemon = await start_daemon(workdir, config)
    option = {"vad": {"type": "silero", "silencePadding": args.padding_ms}, "asr": {"provider": "whisper"},
              "tts": {"provider": "piper"}}
    llm_port = None
    try:
        for path in args.paths.split(","):
            Agent.run_id = f"{os.getpid()}-{int(time.time())}-{path}"  # cacheKeys never seen: every reply synthesized
            speaker = Speaker()
            if path == "call":
                turns = await socket_turns(daemon, path, option, speaker, utterances, args.turns)
            elif path == "playbook":
                if llm_port is None:
                    llm_port = listen_llm(reactor, ScriptedLlm(reactor, responder=fixed_reply(args.reply, args.llm_delay_ms)))
                playbook = PLAYBOOK.format(padding=args.padding_ms, base_url=llm_port.base_url)
                turns = await socket_turns(daemon, path, {"playbook": playbook}, speaker, utterances, args.turns)
            elif path == "sip":
                far = FarEnd(speaker, reactor, workdir, codecs=("pcmu", "telephone_event"), srtp=False)
                service = build_sip_service(Config(addr="127.0.0.1", udp_port=free_port(socket.SOCK_DGRAM), useragent="turnlat-far"),
                                            reactor, SystemIds(), far)
                service.startService()
                try:
                    client = await connect_agent(f"{daemon.ws_url}/call/sip?id=turnlat-sip&dump=false&ping=0")
                    client.hears_audio = False
                    client.send({"command": "invite", "option": {
                        "callee": f"sip:agent@127.0.0.1:{service.port('udp')}", "caller": "sip:bot@127.0.0.1",
                        **option}})
                    await client.wait_event("answer", timeout_s=30)
                    turns = await run_turns(client, speaker, far, utterances, args.turns)
                    client.send({"command": "hangup"})
                    await client.wait_event("hangup", timeout_s=10)
                    client.transport.loseConnection()
                finally:
                    await far.shutdown()
                    await defer.maybeDeferred(service.stopService)
            else:
                sys.exit(f"unknown path {path!r}")
            report(path, turns, models, args.padding_ms, durations, args.llm_delay_ms if path == "playbook" else 0.0)
    finally:
        if llm_port is not None:
            await llm_port.stop()
        await daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20, help="measured turns per path (after one warm-up turn)")
    parser.add_argument("--paths", default="call,sip,playbook", help="comma-separated: call, sip, playbook")
    parser.add_argument("--llm-delay-ms", type=float, default=200.0, help="the playbook path's model: first-token delay")
    parser.add_argument("--reply", default=DEFAULT_REPLY, help="the scripted agent's answer")
    parser.add_argument("--padding-ms", type=int, default=100, help="vad.silencePadding")
    parser.add_argument("--repeat", type=int, default=3, help="in-process model timings: median of N")
    args = parser.parse_args()
    task.react(lambda _: defer.Deferred.fromCoroutine(run(args)))


if __name__ == "__main__":
    main()
