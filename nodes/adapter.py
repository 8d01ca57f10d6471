"""Adapter node: whisper features in, Mini-Omni input embeddings out.

The whisper adapter (`whisperMLP`, REFERENCE.md §1.4) is a SwiGLU MLP
`proj(silu(fc_1(f)) * fc_2(f))`, whisper_adapter_dim -> intermediate_size -> n_embd. Being its own
node, it can be swapped, moved next to the encoder or to the backbone, or run through ONNX.

Only the three `whisper_adapter.*` tensors are read from the Mini-Omni `lit_model.pth` (the file is
memory-mapped, so the 2.8 GB trunk is never loaded by this node).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from omniflow.model import weights
from omniflow.model.dtypes import torch_dtype
from omniflow.frame import Frame
from omniflow.node import InputError, Node
from omniflow.params import Device

ADAPTER_PREFIX = "whisper_adapter."
ADAPTER_KEYS = ("fc_1.weight", "fc_2.weight", "proj.weight")


def load_adapter(ckpt_dir: str | Path, device: str = "cpu", dtype: str = "float32"):
    """The whisper adapter of a Mini-Omni checkpoint directory, as an eval-mode LLaMAMLP."""
    import torch

    from omniflow.model.checkpoint import WEIGHTS_FILE
    from omniflow.model.gpt import LLaMAMLP

    path = Path(ckpt_dir) / WEIGHTS_FILE
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    missing = [ADAPTER_PREFIX + k for k in ADAPTER_KEYS if ADAPTER_PREFIX + k not in state]
    if missing:
        raise KeyError(f"{path} has no whisper adapter (missing {missing}); is it a Mini-Omni lit_model.pth?")
    adapter_state = {k: state[ADAPTER_PREFIX + k].clone() for k in ADAPTER_KEYS}
    del state
    n_hidden, n_in = adapter_state["fc_1.weight"].shape          # (intermediate_size, whisper dim)
    n_out = adapter_state["proj.weight"].shape[0]                 # n_embd
    adapter = LLaMAMLP(n_in, n_hidden, n_out)
    adapter.load_state_dict(adapter_state, strict=True)
    return adapter.to(device=device, dtype=torch_dtype(dtype)).eval()


class Adapter(Node):
    inputs = {"features": "features"}
    outputs = {"embeds": "embeds"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        checkpoint: str | None = None        # Mini-Omni directory; None -> $OMNIFLOW_HOME/miniomni
        device: Device = "cpu"
        dtype: Literal["float32", "float16", "bfloat16"] = "float32"   # checked when the graph loads
        runtime: Literal["torch", "onnx"] = "torch"   # onnx: onnxruntime (pip install 'omniflow[onnx]')

    def setup(self) -> None:
        import torch

        p = self.params
        self.path = weights.resolve("miniomni", p.checkpoint)
        weights.warn_if_demo(self.path, self.log)
        self.adapter = load_adapter(self.path, p.device, p.dtype)
        self.in_dim = self.adapter.fc_1.in_features
        self.in_dtype = torch_dtype(p.dtype)
        if p.runtime == "onnx":       # exported once next to the weights, re-exported if they change
            from omniflow.model.ort import OrtAdapter

            self.adapter = OrtAdapter.from_torch(self.adapter, cache_dir=self.path, device=p.device)
            self.in_dtype = torch.float32                 # the export is fp32

    def adapt(self, features: np.ndarray) -> np.ndarray:
        """(T, whisper_adapter_dim) -> (T, n_embd) float32."""
        import torch

        with torch.inference_mode():
            x = torch.tensor(features, dtype=self.in_dtype, device=self.params.device)   # (T, whisper dim)
            return self.adapter(x).float().cpu().numpy()                       # (T, n_embd)

    def process(self, port, frame: Frame):
        feats = np.asarray(frame.data, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.in_dim:
            raise InputError(f"features of shape {feats.shape}, expected (T, {self.in_dim}) (the whisper "
                             "encoder's width this checkpoint was trained with): check the graph's whisper "
                             "checkpoint")
        yield "embeds", frame.follow("embeds", self.adapt(feats), meta=dict(frame.meta), last=frame.last)
