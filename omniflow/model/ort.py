"""onnxruntime drop-ins for the swappable components, called like their torch counterparts.

| ORT wrapper          | torch counterpart                         | call                                      |
|----------------------|-------------------------------------------|-------------------------------------------|
| `OrtWhisperEncoder`  | openai-whisper `AudioEncoder`             | `enc(mel (B, n_mels, 3000)) -> (B, 1500, d)` |
| `OrtAdapter`         | `MiniOmni.whisper_adapter` (`LLaMAMLP`)   | `ad(features (…, T, 768)) -> (…, T, n_embd)` |
| `OrtSnacDecoder`     | `snac.SNAC` (noise off)                   | `snac.decode([c0, c1, c2]) -> (B, 1, F·2048)` |

Torch tensors in give torch tensors out (on the input's device); numpy in gives numpy out. So a node
switches with `runtime: onnx` by replacing the module:

    encoder = OrtWhisperEncoder.from_torch(encoder, cache_dir=weights_dir)   # exports once, cached

Execution provider: CUDAExecutionProvider when onnxruntime-gpu provides it (`device="auto"`), else
CPUExecutionProvider; `device="cpu"` or `"cuda[:N]"` forces one.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("runtime: onnx needs onnxruntime, which the [cpu] extra brings (onnxruntime-gpu: "
                          "the [gpu] extra): pip install 'onnxruntime>=1.18' on a CPU machine, "
                          "'onnxruntime-gpu>=1.18' on a CUDA one, never both") from e
    return onnxruntime


def providers(device: str = "auto") -> list:
    """Execution providers for `device`: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N"."""
    available = _ort().get_available_providers()
    if device == "cpu":
        return [CPU_EP]
    if device == "auto":
        return [CUDA_EP, CPU_EP] if CUDA_EP in available else [CPU_EP]
    if device.startswith("cuda"):
        if CUDA_EP not in available:
            raise RuntimeError(
                f"device {device!r} asked for, but onnxruntime has no CUDAExecutionProvider (it has "
                f"{', '.join(available)}): pip uninstall onnxruntime && pip install 'omniflow[gpu]', "
                f"or use device: cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        return [(CUDA_EP, {"device_id": index}), CPU_EP]
    raise ValueError(f"unknown ONNX device {device!r}; use auto, cpu, cuda or cuda:N")


def threads_default() -> int | None:
    """The node's thread cap (the graph's `threads:`, which the launcher exports as OMP_NUM_THREADS)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def session(path, device: str = "auto", threads: int | None = None):
    """An onnxruntime InferenceSession for the file at `path`.

    threads: intra-op threads (None: the node's cap from `threads_default`, else onnxruntime's
    default of one per core); the options are `session_options`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path} (export it with omniflow.model.onnx_export)")
    sess = _ort().InferenceSession(str(path), session_options(threads), providers=providers(device))
    log.info("onnxruntime %s on %s", path.name, sess.get_providers()[0])
    return sess


def session_options(threads: int | None = None):
    """SessionOptions of every omniflow session: `threads` intra-op threads (None: the node's cap,
    `threads_default`), one inter-op thread, and worker threads that never spin-wait: on a CPU
    shared by a graph of nodes a spinning pool takes cores from the others."""
    options = _ort().SessionOptions()
    threads = threads or threads_default()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _to_numpy(x, dtype) -> tuple[np.ndarray, object]:
    """Array for ORT, and a function that turns ORT's output back into the input's kind."""
    try:
        import torch
    except ImportError:        # pragma: no cover - torch is a core dependency
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        device, out_dtype = x.device, x.dtype if x.is_floating_point() else torch.float32
        back = lambda y: torch.from_numpy(y).to(device=device, dtype=out_dtype)  # noqa: E731
        return x.detach().to("cpu").numpy().astype(dtype, copy=False), back
    return np.ascontiguousarray(x, dtype=dtype), lambda y: y


class _OrtModule:
    kind = ""          # onnx_export kind

    def __init__(self, path, device: str = "auto", threads: int | None = None):
        self.path = Path(path)
        self.session = session(self.path, device, threads)
        self.inputs = {i.name: i for i in self.session.get_inputs()}

    @classmethod
    def from_torch(cls, module, cache_dir, name: str | None = None, device: str = "auto",
                   quantize: str = "none", threads: int | None = None):
        """Export `module` next to its weights (`cache_dir`, cached by weights hash) and load it.

        quantize "int8": the export's MatMul weights dynamically quantized (`cached_quantized`)."""
        from .onnx_export import cached_export, cached_quantized

        path = cached_export(cls.kind, module, cache_dir, name)
        if quantize == "int8":
            path = cached_quantized(path)
        elif quantize != "none":
            raise ValueError(f"quantize {quantize!r} must be none or int8")
        return cls(path, device, threads)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feeds)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {self.session.get_providers()[0]})"


class OrtWhisperEncoder(_OrtModule):
    """openai-whisper encoder: mel (B, n_mels, 3000) -> features (B, 1500, n_audio_state)."""

    kind = "whisper"

    def __call__(self, mel):
        x, back = _to_numpy(mel, np.float32)
        if x.ndim != 3:
            raise ValueError(f"whisper encoder input must be (B, n_mels, 3000), got shape {x.shape}")
        return back(self._run({"mel": x}))                                # (B, 1500, d)


class OrtAdapter(_OrtModule):
    """Mini-Omni whisper adapter: features (B, T, 768) or (T, 768) -> embeds (…, T, n_embd)."""

    kind = "adapter"

    def __init__(self, path, device: str = "auto", threads: int | None = None):
        super().__init__(path, device, threads)
        self.in_features = self.inputs["features"].shape[-1]              # whisper_adapter_dim
        self.out_features = self.session.get_outputs()[0].shape[-1]       # n_embd

    def __call__(self, features):
        x, back = _to_numpy(features, np.float32)
        if x.ndim not in (2, 3) or x.shape[-1] != self.in_features:
            raise ValueError(f"adapter input must be (T, {self.in_features}) or (B, T, {self.in_features}), "
                             f"got shape {x.shape}")
        y = self._run({"features": x[None] if x.ndim == 2 else x})      # (B, T, n_embd)
        return back(y[0] if x.ndim == 2 else y)


class OrtSnacDecoder(_OrtModule):
    """SNAC decoder with noise disabled: decode([c0 (B, F), c1 (B, 2F), c2 (B, 4F)]) -> (B, 1, F·hop·4)."""

    kind = "snac"

    def decode(self, codes):
        if len(codes) != 3:
            raise ValueError(f"SNAC decode takes 3 code tensors (B, F), (B, 2F), (B, 4F); got {len(codes)}")
        arrays, back = zip(*(_to_numpy(c, np.int64) for c in codes))
        n = arrays[0].shape[-1]
        if [a.shape[-1] for a in arrays] != [n, 2 * n, 4 * n]:
            raise ValueError(f"SNAC code lengths must be F, 2F, 4F; got {[a.shape[-1] for a in arrays]}")
        return back[0](self._run({f"codes_{i}": a for i, a in enumerate(arrays)}))   # (B, 1, samples)
