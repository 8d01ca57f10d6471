"""Whisper encoder node: one utterance in, Mini-Omni's audio features out.

Feature semantics are the original's, exactly (REFERENCE.md §1.4):

    audio (16 kHz mono float32) -> whisper.pad_or_trim to 30 s (480000 samples)
      -> whisper.log_mel_spectrogram (n_mels from the checkpoint) -> encoder -> (1500, d)
      -> keep the first int(duration_ms / 20) + 1 frames (one frame per 20 ms)

What it costs: the encoder always runs on the whole 30 s window (1500 frames), whatever the
utterance length, because the model was trained on features of padded windows; a shorter window
would be faster but changes the features.

`dtype: bfloat16` runs the encoder's GEMMs and convolutions in bf16 (LayerNorms stay fp32, as in
openai-whisper): faster where the hardware has bf16 instructions, with features close to, not
equal to, float32's. float32, the default, is the original's arithmetic exactly. `runtime: onnx`
runs an onnxruntime export of the float32 encoder. `omniflow bench graph` measures them; the
figures are in the README (Performance).

Inputs longer than `max_seconds` (at most 30) are never silently truncated: with
`over_limit: split` they are cut into consecutive windows that are encoded one by one (each with
the semantics above) and their kept frames concatenated; with `over_limit: refuse` the utterance
fails with an error to its user (and one log line) that says how long it was and how to allow it.

Weights: `checkpoint` is an openai-whisper size ("small", "base", ...) looked up through
omniflow.model.weights (explicit path -> $OMNIFLOW_HOME/whisper-<size>/<size>.pt -> `omniflow fetch`), or
a path to a `.pt` file in openai-whisper's format. Only the encoder is kept in memory.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from omniflow.model import weights
from omniflow.audio import to_float_mono
from omniflow.frame import Frame
from omniflow.node import InputError, Node

from omniflow.model.dtypes import DTYPES
from omniflow.model.units import WHISPER_FRAME_MS as MS_PER_FRAME
from omniflow.model.units import WHISPER_RATE as SAMPLE_RATE
from omniflow.model.units import WHISPER_WINDOW_S as WINDOW_SECONDS


def frames_to_keep(n_samples: int, rate: int = SAMPLE_RATE) -> int:
    """The original's `int(duration_ms / 20) + 1` (capped by the 1500-frame window when sliced)."""
    duration_ms = n_samples / rate * 1000
    return int(duration_ms / MS_PER_FRAME) + 1


def load_encoder(path: str | Path, device: str = "cpu"):
    """openai-whisper `.pt` -> (AudioEncoder in eval mode, ModelDimensions). The decoder is never built."""
    import torch
    from whisper.model import AudioEncoder, ModelDimensions

    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError(f"{path} is not an openai-whisper checkpoint: expected a dict with 'dims' and "
                         "'model_state_dict' (the format of whisper's small.pt)")
    dims = ModelDimensions(**ckpt["dims"])
    encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                           dims.n_audio_layer)
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in ckpt["model_state_dict"].items() if k.startswith(prefix)}
    encoder.load_state_dict(state, strict=True)      # fp16 tensors in the file are upcast here
    del ckpt
    return encoder.to(device).eval(), dims


def cast_encoder(encoder, dtype):
    """Cast an openai-whisper encoder's weights to `dtype` in place, except its LayerNorms.

    whisper's LayerNorm normalises in fp32 (`x.float()`) and CPU layer_norm needs fp32 weights for
    fp32 input; its Linear/Conv1d cast their weights to the input's dtype, so bf16 weights plus a
    bf16 mel run every GEMM in bf16 without a per-call weight copy.
    """
    import torch

    for module in encoder.modules():
        if isinstance(module, torch.nn.LayerNorm):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)
    return encoder


class WhisperEncoder(Node):
    inputs = {"audio": "utterance"}
    outputs = {"features": "features"}
    cpu_weight = 1                 # CPU plan: its share of the cores (omniflow.launch.plan)

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        checkpoint: str = "small"                 # whisper size name, or path to a .pt file
        device: str = "cpu"
        runtime: Literal["torch", "onnx"] = "torch"   # onnx: onnxruntime (pip install 'omniflow[onnx]')
        dtype: str = "float32"                   # float32 (the original) | bfloat16 (faster with bf16 hardware) | float16
        max_seconds: float = WINDOW_SECONDS      # longest utterance encoded in one window (<= 30)
        over_limit: Literal["split", "refuse"] = "split"

    def setup(self) -> None:
        p = self.params
        if not 0 < p.max_seconds <= WINDOW_SECONDS:
            raise ValueError(f"whisper max_seconds={p.max_seconds} must be in (0, {WINDOW_SECONDS}]: "
                             "the encoder's window is 30 s; longer inputs are split (over_limit: split)")
        if p.dtype not in DTYPES:
            raise ValueError(f"whisper dtype {p.dtype!r} must be one of {DTYPES}")
        if p.runtime == "onnx" and p.dtype != "float32":
            raise ValueError(f"whisper runtime: onnx exports a float32 graph; set dtype: float32 (got {p.dtype}) "
                             "or use runtime: torch for bfloat16/float16")
        self.path = self._resolve(p.checkpoint)
        weights.warn_if_demo(self.path, self.log)
        import torch

        self.encoder, self.dims = load_encoder(self.path, p.device)
        self.dtype = getattr(torch, p.dtype)                 # the mel is cast to this before the encoder
        if self.dtype != torch.float32:
            cast_encoder(self.encoder, self.dtype)
        if p.runtime == "onnx":       # exported once next to the weights, re-exported if they change
            from omniflow.model.ort import OrtWhisperEncoder

            self.encoder = OrtWhisperEncoder.from_torch(self.encoder, cache_dir=self.path.parent,
                                                        name=f"{self.path.stem}_encoder.onnx", device=p.device)
        self.log.info("whisper encoder %s: %d mels, %d-dim, %d layers, %s", self.path, self.dims.n_mels,
                      self.dims.n_audio_state, self.dims.n_audio_layer, p.dtype)

    @staticmethod
    def _resolve(checkpoint: str) -> Path:
        return weights.resolve_whisper(checkpoint)

    # --- features -----------------------------------------------------------------------------
    def encode(self, audio: np.ndarray) -> np.ndarray:
        """(N,) float32 16 kHz mono, N <= max_seconds -> (int(ms/20)+1 capped at 1500, d) features."""
        import torch
        import whisper

        window = whisper.pad_or_trim(torch.tensor(audio, dtype=torch.float32))   # (480000,); copies read-only wire buffers
        mel = whisper.log_mel_spectrogram(window, n_mels=self.dims.n_mels)                     # (n_mels, 3000)
        with torch.inference_mode():
            feats = self.encoder(mel[None].to(self.params.device, self.dtype))[0]              # (1500, d)
        return feats[: frames_to_keep(len(audio))].float().cpu().numpy()

    def process(self, port, frame: Frame):
        audio, rate = self._as_16k_mono(frame)
        seconds = len(audio) / SAMPLE_RATE
        limit = self.params.max_seconds
        if seconds > limit and self.params.over_limit == "refuse":
            raise InputError(f"the utterance is {seconds:.1f} s, longer than whisper's max_seconds={limit} "
                             f"(over_limit: refuse): speak in shorter turns, or set over_limit: split")
        piece = int(limit * SAMPLE_RATE)
        n_pieces = max(1, math.ceil(len(audio) / piece))
        feats = [self.encode(audio[i * piece:(i + 1) * piece]) for i in range(n_pieces)]
        if n_pieces > 1:
            self.log.info("utterance of %.1f s split into %d windows of <= %s s", seconds, n_pieces, limit)
        data = np.concatenate(feats, axis=0).astype(np.float32)              # (T, d)
        meta = {k: v for k, v in frame.meta.items() if k != "rate"}
        meta.update(ms=seconds * 1000, frames=len(data), windows=[len(f) for f in feats])
        yield "features", frame.follow("features", data, meta=meta, last=frame.last)

    def _as_16k_mono(self, frame: Frame) -> tuple[np.ndarray, int]:
        audio = np.asarray(frame.data)
        if audio.ndim == 2:                           # (N, channels): mixed down by to_float_mono
            self.log.warning("utterance of session %s has %d channels; mixing to mono",
                             frame.session, audio.shape[1])
        audio = to_float_mono(audio)                  # int16 or float -> (N,) float32
        rate = int(frame.meta.get("rate", SAMPLE_RATE))
        if rate != SAMPLE_RATE:
            import soxr
            audio = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
        return audio, SAMPLE_RATE
