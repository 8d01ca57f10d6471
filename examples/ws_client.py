"""Talk to a running `graphs/serve.yaml` over WebSocket: stream a WAV file as a microphone would,
write the spoken answer to a WAV file, print the answer text and the time to first audio.

    omniflow fetch --demo                       # once: demo weights (random: the answer is not speech)
    omniflow run graphs/serve.yaml              # the server, on ws://127.0.0.1:8765
    python examples/ws_client.py examples/question.wav --out answer.wav

The file is resampled to 16 kHz and sent as int16 in `--chunk-ms` pieces, paced in real time
(`--fast` sends them at once), followed by a `flush` so the utterance ends even without trailing
silence. Needs `websockets` (pip install 'omniflow[web]').
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import soxr

RATE = 16000                 # Hz: what the client sends (the server's VAD and whisper rate)
INT16_SCALE = 32768.0


@dataclass
class Answer:
    session: str = ""
    rate: int = 0                                   # Hz of the answer audio (the server says)
    audio: list[np.ndarray] = field(default_factory=list)   # float32 chunks, in arrival order
    text: str = ""
    turn: int | None = None                         # the turn the server ended
    sent_s: float = 0.0                             # seconds spent sending the question
    # first answer audio, in seconds after the question's last chunk was sent: negative when the
    # server heard the end of speech (the VAD's silence) before the file's trailing silence was sent
    first_audio_s: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def samples(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)


def read_question(path: str) -> np.ndarray:
    """Any audio file -> (N,) int16 mono at 16 kHz."""
    audio, rate = sf.read(path, dtype="float32", always_2d=True)       # (N, C)
    mono = audio.mean(axis=1)
    if rate != RATE:
        mono = soxr.resample(mono, rate, RATE)
    return np.clip(np.rint(mono * INT16_SCALE), -INT16_SCALE, INT16_SCALE - 1).astype(np.int16)


async def converse(url: str, question: np.ndarray, *, chunk_ms: float = 20.0, realtime: bool = True,
                   timeout_s: float = 120.0, on_text=None) -> Answer:
    """Send one spoken question (int16 at 16 kHz) and collect the answer until the server ends it.
    Sending and receiving run concurrently, as with a live microphone."""
    from websockets import connect

    answer = Answer()
    first_audio_at: float | None = None

    async def receive(ws) -> None:
        nonlocal first_audio_at
        while answer.turn is None:
            message = await ws.recv()
            if isinstance(message, bytes):
                first_audio_at = first_audio_at or time.monotonic()
                answer.audio.append(np.frombuffer(message, dtype="<f4"))
                continue
            msg = json.loads(message)
            if msg["type"] == "text":
                answer.text += msg["text"]
                if on_text is not None:
                    on_text(msg["text"])
            elif msg["type"] == "end":
                answer.turn = msg["turn"]
            elif msg["type"] == "error":
                answer.errors.append(msg["error"])
            elif msg["type"] == "turn":              # a new turn: drop what an older one sent
                answer.audio, answer.text, first_audio_at = [], "", None

    async with connect(url, max_size=None) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
        if hello.get("type") != "session":
            raise RuntimeError(f"the server refused the session: {hello}")
        answer.session, answer.rate = hello["session"], hello["output"]["rate"]
        await ws.send(json.dumps({"type": "start", "rate": RATE, "format": "s16", "output_format": "f32"}))
        receiver = asyncio.ensure_future(receive(ws))
        chunk = int(RATE * chunk_ms / 1000)
        start = time.monotonic()
        for i in range(0, len(question), chunk):
            if realtime:                             # chunk k is due when k chunks have played
                await asyncio.sleep(max(0.0, start + i / RATE - time.monotonic()))
            await ws.send(question[i:i + chunk].tobytes())
        await ws.send(json.dumps({"type": "flush"}))
        done_sending = time.monotonic()
        answer.sent_s = done_sending - start
        await asyncio.wait_for(receiver, timeout_s)
    if first_audio_at is not None:
        answer.first_audio_s = first_audio_at - done_sending
    return answer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("question", help="audio file to send (any rate; sent as 16 kHz int16)")
    ap.add_argument("--url", default="ws://127.0.0.1:8765", help="the gateway (add ?session=NAME to name it)")
    ap.add_argument("--out", default="answer.wav", help="where to write the spoken answer")
    ap.add_argument("--chunk-ms", type=float, default=20.0, help="audio per message, in ms")
    ap.add_argument("--fast", action="store_true", help="send the file at once instead of in real time")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    args = ap.parse_args(argv)
    try:
        question = read_question(args.question)
    except (OSError, RuntimeError) as e:
        print(f"cannot read {args.question}: {e}", file=sys.stderr)
        return 2
    print(f"sending {len(question) / RATE:.2f} s of audio to {args.url} ...", file=sys.stderr)
    from websockets.exceptions import WebSocketException

    try:
        answer = asyncio.run(converse(args.url, question, chunk_ms=args.chunk_ms, realtime=not args.fast,
                                      timeout_s=args.timeout, on_text=lambda t: print(t, end="", flush=True)))
    except (OSError, asyncio.TimeoutError, WebSocketException) as e:
        print(f"\nno answer from {args.url}: {e!r}. Is `omniflow run graphs/serve.yaml` running?",
              file=sys.stderr)
        return 1
    print()
    for error in answer.errors:
        print(f"server error: {error}", file=sys.stderr)
    sf.write(args.out, answer.samples, answer.rate)
    if answer.first_audio_s is None:
        first = "no audio came"
    else:
        first = (f"first audio {answer.first_audio_s * 1000:+.0f} ms after the question's last chunk"
                 + (" (it began during the file's trailing silence)" if answer.first_audio_s < 0 else ""))
    print(f"session {answer.session}, turn {answer.turn}: {len(answer.samples) / answer.rate:.2f} s of "
          f"audio -> {args.out}; {first}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
