"""SNAC 24 kHz vocoder: chunks of whole SNAC frames -> 24 kHz float32 PCM, seamless across chunks.

The original decodes each 4-frame chunk in isolation. SNAC's decoder is non-causal (each output
sample depends on about 2 frames of codes on either side), so isolated chunks are wrong at both
edges and click at every seam. This node instead, per session:

  1. decodes `context_frames` already-played frames + the new chunk, and keeps only the new samples
     (left context: measured on the real 24 kHz config, 2 frames bring the chunk start to within
     1e-4 of a whole-utterance decode, 1 frame to within 1e-2);
  2. holds back the last `crossfade_ms` of each chunk — the samples that lack right context and
     are furthest off — and, when the next chunk arrives, cross-fades them (raised cosine) into
     the same samples re-decoded with the new chunk as right context. So there is no step at the
     seam, and the held-back samples end up close to the whole-utterance decode;
  3. flushes the held-back tail on the turn's last chunk: a turn of F frames gives exactly
     F × 2048 samples, nothing dropped.
  Cost: each chunk decodes context_frames more frames; audio leaves crossfade_ms later.

Determinism: SNAC's `NoiseBlock` adds `randn · conv1x1(x)` after every decoder upsampling, so the
original is stochastic. `noise` selects what this node does:
  "fixed"   (default) the noise is a fixed function of (seed, block, absolute sample position):
            deterministic, and a streamed chunk sees exactly the noise a whole-utterance decode
            sees at the same samples, so streaming only differs from whole decoding at the edges;
  "off"     no noise (the NoiseBlock adds nothing);
  "random"  the original's fresh torch.randn on every call.

  With `runtime: onnx` the decoder is an onnxruntime export of the same weights, which has no
  noise blocks: noise is "off" there.

Weights: the official `config.json` + `pytorch_model.bin` (hubertsiuzdak/snac_24khz), found by
`omniflow.model.weights.resolve("snac", params.checkpoint)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import torch
from torch import nn

from omniflow.frame import Frame
from omniflow.model.tokens import CODES_PER_FRAME, LAYER_TO_CODEBOOK, N_AUDIO_LAYERS
from omniflow.node import Node

from omniflow.model.units import SNAC_RATE as SAMPLE_RATE
from omniflow.model.units import SNAC_SAMPLES_PER_FRAME as SAMPLES_PER_FRAME
NOISE_MODES = ("fixed", "off", "random")
RUNTIMES = ("torch", "onnx")


def frames_to_codes(frames: np.ndarray, device="cpu") -> list[torch.Tensor]:
    """(F, 7) raw codes per frame -> SNAC's 3 codebook tensors (1, F), (1, 2F), (1, 4F).

    Layer i of a frame goes to codebook c at position p inside the frame (LAYER_TO_CODEBOOK).
    """
    frames = np.asarray(frames, dtype=np.int64).reshape(-1, N_AUDIO_LAYERS)
    n = len(frames)
    codes = [np.zeros((n, per), dtype=np.int64) for per in CODES_PER_FRAME]   # (F, 1), (F, 2), (F, 4)
    for layer, (book, pos) in enumerate(LAYER_TO_CODEBOOK):
        codes[book][:, pos] = frames[:, layer]
    return [torch.from_numpy(c.reshape(1, -1)).to(device) for c in codes]    # (1, F·per)


@dataclass
class _Window:
    """Where the frames being decoded sit in the turn: read by FixedNoise during a decode."""

    start_frame: int = 0
    n_frames: int = 0


class FixedNoise(nn.Module):
    """Replaces snac's NoiseBlock: same weights, noise = f(seed, block, absolute position)."""

    def __init__(self, block: nn.Module, index: int, seed: int, window: _Window, mode: str):
        super().__init__()
        self.linear = block.linear            # keeps the state-dict key `...block.2.linear...`
        self.index, self.seed, self.window, self.mode = index, seed, window, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # x: (B, C, T)
        if self.mode == "off":
            return x
        B, _, T = x.shape
        if self.mode == "random":
            noise = torch.randn((B, 1, T), device=x.device, dtype=x.dtype)
        else:
            per_frame = T // self.window.n_frames               # samples per frame at this rate
            rows = [np.random.default_rng([self.seed, self.index, f]).standard_normal(per_frame,
                                                                                     dtype=np.float32)
                    for f in range(self.window.start_frame, self.window.start_frame + self.window.n_frames)]
            noise = torch.from_numpy(np.concatenate(rows)).to(x.device, x.dtype).expand(B, 1, T)
        return x + noise * self.linear(x)


class SnacDecoder:
    """A loaded SNAC model that decodes whole frames at a known position in the turn."""

    def __init__(self, model: nn.Module, noise: str = "fixed", seed: int = 0, device="cpu", backend=None):
        """backend: something with SNAC's `decode(codes)` to run instead of `model` (onnxruntime's
        `OrtSnacDecoder`, which has no noise: use noise="off" with it)."""
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        hop = int(np.prod(model.encoder_rates))
        if hop * model.vq_strides[0] != SAMPLES_PER_FRAME or model.sampling_rate != SAMPLE_RATE:
            raise ValueError(f"this SNAC model has {hop * model.vq_strides[0]} samples per frame at "
                             f"{model.sampling_rate} Hz; Mini-Omni needs the 24 kHz model "
                             f"({SAMPLES_PER_FRAME} samples per frame): use hubertsiuzdak/snac_24khz")
        self.model = model.to(device).eval()     # its noise blocks are replaced: one decoder per model
        self.device = device
        self.window = _Window()
        from snac.layers import NoiseBlock
        blocks = [(parent, name, child) for parent in self.model.decoder.modules()
                  for name, child in parent.named_children() if isinstance(child, (NoiseBlock, FixedNoise))]
        for index, (parent, name, child) in enumerate(blocks):
            setattr(parent, name, FixedNoise(child, index, seed, self.window, noise))
        if backend is not None and noise != "off":
            raise ValueError(f"{backend!r} decodes without SNAC's noise blocks: use noise='off' with it")
        self.backend = backend or self.model

    @classmethod
    def from_dir(cls, path: str | Path, **kwargs) -> "SnacDecoder":
        """Load the official format: `config.json` + `pytorch_model.bin` in `path`."""
        from snac import SNAC

        from omniflow.model.weights import missing_files
        path = Path(path)
        missing = missing_files("snac", path)                # of config.json, pytorch_model.bin
        if missing:
            raise FileNotFoundError(f"{path / missing[0]} is missing: a SNAC checkpoint directory holds "
                                    "config.json and pytorch_model.bin (run `omniflow fetch`)")
        model = SNAC.from_config(str(path / "config.json"))
        model.load_state_dict(torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True))
        return cls(model, **kwargs)

    @torch.inference_mode()
    def decode(self, frames: np.ndarray, start_frame: int = 0) -> np.ndarray:
        """(F, 7) codes of frames start_frame.. -> float32 (F · 2048,) samples at 24 kHz."""
        frames = np.asarray(frames).reshape(-1, N_AUDIO_LAYERS)
        if len(frames) == 0:
            return np.zeros(0, np.float32)
        if frames.min() < 0 or frames.max() >= self.model.codebook_size:
            raise ValueError(f"SNAC codes must be in [0, {self.model.codebook_size}); got "
                             f"[{frames.min()}, {frames.max()}] (special ids must be dropped upstream)")
        self.window.start_frame, self.window.n_frames = start_frame, len(frames)
        audio = self.backend.decode(frames_to_codes(frames, self.device))        # (1, 1, F·2048)
        return audio[0, 0].float().cpu().numpy()


def fade_in(n: int) -> np.ndarray:
    """Raised-cosine weights rising from ~0 to ~1 over n samples (the new signal's share)."""
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)


@dataclass
class StreamState:
    """One session's streaming state for its current turn (moshi-style: explicit, resettable)."""

    turn: int
    next_frame: int = 0                                  # index of the next frame to decode
    context: np.ndarray = field(default_factory=lambda: np.zeros((0, N_AUDIO_LAYERS), np.int64))
    held: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # decoded, not yet sent


class StreamingSnac:
    """Chunk-by-chunk decoding with left context and a cross-fade at each seam (see module doc)."""

    def __init__(self, decoder: SnacDecoder, context_frames: int = 2, crossfade_ms: float = 10.0):
        self.decoder = decoder
        self.context_frames = context_frames
        self.crossfade = round(crossfade_ms * SAMPLE_RATE / 1000)               # samples
        if context_frames < 0 or crossfade_ms < 0:
            raise ValueError("context_frames and crossfade_ms must be >= 0")
        if self.crossfade and self.crossfade > context_frames * SAMPLES_PER_FRAME:
            raise ValueError(f"crossfade_ms={crossfade_ms} needs re-decoded samples to fade into: "
                             f"use context_frames >= {math.ceil(self.crossfade / SAMPLES_PER_FRAME)} "
                             "or crossfade_ms=0")

    def push(self, state: StreamState, frames: np.ndarray, last: bool) -> np.ndarray:
        """Decode a chunk of frames (F, 7); return the samples that can be played now."""
        frames = np.asarray(frames, dtype=np.int64).reshape(-1, N_AUDIO_LAYERS)
        out = state.held
        if len(frames):
            window = np.concatenate([state.context, frames])                       # (C + F, 7)
            start = state.next_frame - len(state.context)
            audio = self.decoder.decode(window, start)                             # ((C + F)·2048,)
            split = len(state.context) * SAMPLES_PER_FRAME
            new = audio[split:]
            if len(state.held):
                redone = audio[split - len(state.held):split]      # the held samples, now with right context
                w = fade_in(len(state.held))
                out = state.held * (1 - w) + redone * w
            out = np.concatenate([out, new])
            state.next_frame += len(frames)
            state.context = window[len(window) - min(self.context_frames, len(window)):]
        hold = 0 if last else min(self.crossfade, len(out))
        state.held = out[len(out) - hold:].copy()
        return out[:len(out) - hold].astype(np.float32)


class SnacVocoder(Node):
    inputs = {"codes": "codes"}
    outputs = {"pcm": "pcm"}
    cpu_weight = 1                 # CPU plan: its share of the cores (omniflow.launch.plan)

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        checkpoint: str | None = None     # SNAC dir (config.json + pytorch_model.bin); None: cache/fetch
        context_frames: int = 2           # already-played frames re-decoded as left context
        crossfade_ms: float = 10.0        # held back per chunk and cross-faded at the seam
        noise: str | None = None          # fixed | off | random (module doc); None: fixed (torch), off (onnx)
        seed: int = 0                     # for noise="fixed"
        device: str = "cpu"
        runtime: str = "torch"            # torch | onnx (onnxruntime, exported once next to the weights)

    def setup(self):
        p = self.params
        if p.runtime not in RUNTIMES:
            raise ValueError(f"runtime {p.runtime!r} is not available for SnacVocoder; use one of {RUNTIMES}")
        noise = p.noise or ("fixed" if p.runtime == "torch" else "off")
        if p.runtime == "onnx" and noise != "off":
            raise ValueError(f"runtime: onnx decodes without SNAC's noise; noise: {noise!r} needs "
                             "runtime: torch (or set noise: off)")
        from omniflow.model import weights
        path = weights.resolve("snac", p.checkpoint)
        weights.warn_if_demo(path, self.log)
        decoder = SnacDecoder.from_dir(path, noise=noise, seed=p.seed, device=p.device)
        if p.runtime == "onnx":
            from omniflow.model.ort import OrtSnacDecoder
            backend = OrtSnacDecoder.from_torch(decoder.model, cache_dir=path, device=p.device)
            decoder = SnacDecoder(decoder.model, noise="off", device=p.device, backend=backend)
        self.stream = StreamingSnac(decoder, self.params.context_frames, self.params.crossfade_ms)
        self.states: dict[str, StreamState] = {}

    def process(self, port, frame: Frame):
        state = self.states.get(frame.session)
        if state is None or state.turn != frame.turn:
            state = self.states[frame.session] = StreamState(turn=frame.turn)
        first = frame.meta.get("first_frame", state.next_frame)
        if first != state.next_frame:
            self.log.warning("session %s: chunk starts at frame %s, expected %s (lost chunk?)",
                             frame.session, first, state.next_frame)
        start_sample = (state.next_frame * SAMPLES_PER_FRAME) - len(state.held)
        pcm = self.stream.push(state, frame.data, last=frame.last)
        if frame.last:
            self.states.pop(frame.session, None)
        if len(pcm) or frame.last:
            yield "pcm", frame.follow("pcm", pcm, last=frame.last,
                                      meta={"rate": SAMPLE_RATE, "first_sample": start_sample})

    def reset(self, session: str):
        self.states.pop(session, None)
        return ()
