"""Whisper features, defined once: the encoder wrapper and the feature function that serving
(nodes/whisper.py), training preprocessing (train/data/encoders.py), the benchmarks and the
examples all call, so training and serving cannot drift apart.

Feature semantics are the original's, exactly (REFERENCE.md §1.4):

    audio (16 kHz mono float32) -> whisper.pad_or_trim to 30 s (480000 samples)
      -> whisper.log_mel_spectrogram (n_mels from the checkpoint) -> encoder -> (1500, d)
      -> keep the first int(duration_ms / 20) + 1 rows (one row per 20 ms)

The encoder always runs on the whole 30 s window whatever the utterance length, because the model
was trained on features of padded windows; a shorter window would be faster but changes them.

Ways to run the encoder (`WhisperFeatures.load`):
  runtime torch, dtype float32   the original's arithmetic
  runtime torch, dtype bfloat16 / float16   GEMMs and convolutions in that dtype (LayerNorms fp32)
  runtime onnx                   onnxruntime, float32 export cached next to the weights
  runtime onnx, quantize int8    the export with its MatMul weights dynamically quantized to
                                 8 bits (onnxruntime.quantization, per output channel): features
                                 within a few % (relative L2) of float32, see `omniflow bench whisper`
  dtype auto                     bfloat16 on a CPU with native bf16 (avx512_bf16 / AMX), float16 on
                                 CUDA, else float32
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from omniflow.model.dtypes import DTYPES, resolve_auto
from omniflow.model.units import WHISPER_FRAME_MS, WHISPER_RATE, WHISPER_WINDOW_FRAMES

QUANTIZE = ("none", "int8")
RUNTIMES = ("torch", "onnx")


def frames_to_keep(n_samples: int, rate: int = WHISPER_RATE) -> int:
    """The original's `int(duration_ms / 20) + 1` rows, capped by the 1500-row window."""
    duration_ms = n_samples / rate * 1000
    return min(int(duration_ms / WHISPER_FRAME_MS) + 1, WHISPER_WINDOW_FRAMES)


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


def resolve_dtype(dtype: str, device: str = "cpu", runtime: str = "torch", fast_bf16: bool | None = None) -> str:
    """"auto" -> the fastest dtype this machine runs well (module doc: float32 for onnx, float16 on
    CUDA, bf16 on a CPU with native bf16); other names are checked."""
    if dtype == "auto" and runtime == "onnx":
        return "float32"
    if dtype not in ("auto",) + DTYPES:
        raise ValueError(f"whisper dtype {dtype!r} must be one of {('auto',) + DTYPES}")
    return resolve_auto(dtype, device, cuda="float16", fast_bf16=fast_bf16)


def log_mel(audio: np.ndarray, n_mels: int):
    """(N,) float32 16 kHz -> (n_mels, 3000) torch log-mel of the 30 s padded/trimmed window."""
    import torch
    import whisper

    window = whisper.pad_or_trim(torch.tensor(np.asarray(audio, np.float32)))     # (480000,); copies read-only buffers
    return whisper.log_mel_spectrogram(window, n_mels=n_mels)                      # (n_mels, 3000)


def features(encoder, batch: list[np.ndarray], n_mels: int, dtype=None, device="cpu") -> list[np.ndarray]:
    """THE whisper-features function: list of (N_b,) float32 16 kHz (each <= 30 s) -> list of
    (frames_to_keep(N_b), d) float32 features, each from its own padded 30 s window.

    encoder: a torch AudioEncoder (weights in `dtype`) or `OrtWhisperEncoder`; batching does not
    change a sample's features beyond float rounding.
    """
    import torch

    mels = torch.stack([log_mel(a, n_mels) for a in batch])                      # (B, n_mels, 3000)
    with torch.inference_mode():
        out = encoder(mels.to(device, dtype or torch.float32))                   # (B, 1500, d)
    return [out[b, :frames_to_keep(len(a))].float().cpu().numpy() for b, a in enumerate(batch)]


def check_options(runtime: str, dtype: str, quantize: str) -> None:
    """ValueError for runtime/dtype/quantize choices that cannot go together (checked when a graph
    loads, from the whisper node's Params, and again by `WhisperFeatures.load`)."""
    if quantize != "none" and runtime != "onnx":
        raise ValueError(f"whisper quantize: {quantize} runs on onnxruntime: set runtime: onnx")
    if runtime == "onnx" and dtype not in ("float32", "auto"):
        raise ValueError(f"whisper runtime: onnx exports a float32 graph; set dtype: float32 or auto "
                         f"(got {dtype}), or use runtime: torch for bfloat16/float16")


class WhisperFeatures:
    """A loaded whisper encoder and how to run it: `feats = WhisperFeatures.load(path)(audio)`."""

    def __init__(self, encoder, dims, dtype, device: str = "cpu", description: str = ""):
        self.encoder, self.dims, self.dtype, self.device = encoder, dims, dtype, device
        self.n_mels, self.dim = dims.n_mels, dims.n_audio_state
        self.description = description

    @classmethod
    def load(cls, path: str | Path, *, runtime: str = "torch", dtype: str = "float32", quantize: str = "none",
             device: str = "cpu", threads: int | None = None) -> "WhisperFeatures":
        """The encoder of the openai-whisper `.pt` at `path`, ready to run as asked (module doc)."""
        import torch

        if runtime not in RUNTIMES:
            raise ValueError(f"whisper runtime {runtime!r} must be one of {RUNTIMES}")
        if quantize not in QUANTIZE:
            raise ValueError(f"whisper quantize {quantize!r} must be one of {QUANTIZE}")
        check_options(runtime, dtype, quantize)
        name = resolve_dtype(dtype, device, runtime)
        if runtime == "onnx" and name != "float32":
            raise ValueError(f"whisper runtime: onnx exports a float32 graph; set dtype: float32 or auto "
                             f"(got {dtype}), or use runtime: torch for bfloat16/float16")
        path = Path(path)
        encoder, dims = load_encoder(path, device)
        torch_dtype = getattr(torch, name)
        if torch_dtype != torch.float32:
            cast_encoder(encoder, torch_dtype)
        if runtime == "onnx":       # exported once next to the weights, re-exported if they change
            from omniflow.model.ort import OrtWhisperEncoder

            encoder = OrtWhisperEncoder.from_torch(encoder, cache_dir=path.parent, name=f"{path.stem}_encoder.onnx",
                                                   device=device, quantize=quantize, threads=threads)
        what = f"{runtime} {name}" + (f" {quantize}" if quantize != "none" else "")
        return cls(encoder, dims, torch_dtype, device, what)

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """(N,) float32 16 kHz mono, N <= 30 s -> (frames_to_keep(N), d) float32."""
        return features(self.encoder, [audio], self.n_mels, self.dtype, self.device)[0]

    def batch(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        return features(self.encoder, batch, self.n_mels, self.dtype, self.device)
