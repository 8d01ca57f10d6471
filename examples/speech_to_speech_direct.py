"""Speech in, speech and text out, with the model called directly (no graph, no processes).

    omniflow fetch --demo                  # or `omniflow fetch` for the real weights
    python examples/speech_to_speech_direct.py examples/question.wav out/answer.wav

The same steps the graph's nodes take, in one loop: whisper features -> adapter -> the batched
engine (A1A2) -> the SNAC scheduler (delay undone, chunks) -> the streaming vocoder.
"""
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from nodes.scheduler import SnacScheduler
from omniflow.model import weights
from omniflow.frame import Frame
from omniflow.model.checkpoint import load_model
from omniflow.model.engine import Engine
from omniflow.model.snac_stream import SAMPLE_RATE, TurnStream, build_stream
from omniflow.model.whisper_encoder import WhisperFeatures
from omniflow.model.tokenizer import Tokenizer
from omniflow.model.units import WHISPER_RATE

question = sys.argv[1] if len(sys.argv) > 1 else "examples/question.wav"
answer = Path(sys.argv[2] if len(sys.argv) > 2 else "out/answer.wav")
answer.parent.mkdir(parents=True, exist_ok=True)

# 1. 16 kHz mono audio -> whisper features: the 30 s window, one row per 20 ms kept
audio, rate = sf.read(question, dtype="float32", always_2d=True)
audio = soxr.resample(audio.mean(axis=1), rate, WHISPER_RATE).astype(np.float32)          # (N,)
features = torch.from_numpy(WhisperFeatures.load(weights.resolve("whisper-small"))(audio))   # (T, 768)

# 2. adapter + decoding: one session on the batched engine, one step at a time
ckpt = weights.resolve("miniomni")
weights.warn_if_demo(ckpt)
model, cfg = load_model(ckpt)
engine = Engine(model, max_sessions=1)
with torch.inference_mode():
    embeds = model.adapt(features)                                                 # (T, 896)
steps = [engine.start("me", "A1A2", embeds=embeds, max_new_tokens=200)]
while not steps[-1].done:
    steps += engine.step().values()

# 3. tokens -> SNAC frames in chunks -> 24 kHz audio; text stream -> text
scheduler = SnacScheduler()                        # first chunk 1 frame, then 4
vocoder = build_stream(weights.resolve("snac"))   # each frame decoded once, seamless across chunks
state, pcm = TurnStream(turn=0), []
for out in steps:
    data = np.asarray(out.tokens, np.int64) if out.kept else None
    frame = Frame(kind="tokens", data=data, meta={"step": out.step}, last=out.done)
    for _, chunk in scheduler.process("tokens", frame):
        pcm.append(vocoder.push_frames(state, chunk.data, last=chunk.last))
sf.write(answer, np.concatenate(pcm), SAMPLE_RATE)
text = Tokenizer.from_dir(ckpt).decode([o.tokens[7] for o in steps if o.kept])
print(f"{len(steps)} steps -> {answer} ({sum(map(len, pcm)) / SAMPLE_RATE:.2f} s); text: {text!r}")
