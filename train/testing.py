"""Small checkpoints in the official formats, for tests and benchmarks (no model hub needed).

The vocabulary layout is always the real one (181120 rows: the token ids require it); only the
trunk is scaled. Whisper and SNAC come from `omniflow.model.weights`' demo writers (same file formats
as openai-whisper's `small.pt` and `hubertsiuzdak/snac_24khz`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from omniflow.model.checkpoint import save_checkpoint
from omniflow.model.config import Config
from omniflow.model.gpt import MiniOmni
from omniflow.model.weights import INIT_STD, MINIOMNI_TRUNK

# n_embd 16-32 and 1-2 layers train in seconds on 2 CPU cores; block_size bounds RoPE tables.
TINY_TRUNK = dict(n_layer=1, n_embd=32, n_head=4, n_query_groups=2, head_size=8, intermediate_size=64,
                  block_size=512)
REAL_TRUNK = MINIOMNI_TRUNK["real"]     # the official trunk (REFERENCE.md §1.1), for the benchmark


def model_config(whisper_adapter_dim: int, **trunk) -> Config:
    return Config(name="mini-omni-test", whisper_adapter_dim=whisper_adapter_dim, **{**TINY_TRUNK, **trunk})


def init_model(cfg: Config, seed: int = 0) -> MiniOmni:
    """A randomly initialised MiniOmni (normal(0, 0.02) matrices, unit norms, zero biases)."""
    torch.manual_seed(seed)
    model = MiniOmni(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, INIT_STD)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return model


def write_model(dest: str | Path, whisper_adapter_dim: int, seed: int = 0, **trunk) -> Path:
    """lit_model.pth + model_config.yaml of a random model (no tokenizer.json: the Qwen fallback)."""
    cfg = model_config(whisper_adapter_dim, **trunk)
    return save_checkpoint(init_model(cfg, seed), cfg, dest)


def write_whisper(dest: str | Path, seed: int = 0) -> tuple[Path, int]:
    """A tiny openai-whisper `.pt`; returns (path, n_audio_state)."""
    from omniflow.model.weights import WHISPER_DIMS, write_demo_whisper
    return write_demo_whisper(Path(dest), "tiny-test", "tiny", seed), WHISPER_DIMS["tiny"]["n_audio_state"]


def write_snac(dest: str | Path, seed: int = 0) -> Path:
    """A tiny SNAC 24 kHz directory (config.json + pytorch_model.bin)."""
    from omniflow.model.weights import write_demo_snac
    return write_demo_snac(Path(dest), "tiny", seed)


def write_synthetic_cache(root: str | Path, samples: list[dict], feature_dim: int, seed: int = 0) -> Path:
    """A preprocessed cache without encoders, for fast tests. Each sample dict has `task`, `id`,
    `answer_text` (ids), and as the task needs `prompt_text` (ids), `n_frames` (random whisper
    features of that many frames) and `codes` ((F, 7) SNAC frames)."""
    import numpy as np

    from .data.preprocess import CacheWriter

    gen = torch.Generator().manual_seed(seed)
    with CacheWriter(root) as writer:
        for s in samples:
            features = None
            if s.get("n_frames"):
                features = torch.randn(s["n_frames"], feature_dim, generator=gen)         # (T, D)
            writer.add({
                "task": s["task"], "id": s["id"],
                "prompt_text": None if s.get("prompt_text") is None else torch.tensor(s["prompt_text"]),
                "answer_text": torch.tensor(s["answer_text"], dtype=torch.long),
                "features": features,
                "codes": None if s.get("codes") is None else torch.as_tensor(np.asarray(s["codes"]),
                                                                           dtype=torch.int16),
            })
    return Path(root)
