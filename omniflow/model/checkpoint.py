"""Read and write the official Mini-Omni checkpoint files (REFERENCE.md §6.2).

`lit_model.pth` is a plain `torch.save` of a flat {name: tensor} dict with both `lm_head.weight`
and `transformer.wte.weight` (the head is tied). Loading is strict: missing keys, unexpected
keys and wrong shapes are one error that lists them all.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import CONFIG_FILE, Config
from .gpt import MiniOmni, rope_tables
from .weights.components import MINIOMNI_WEIGHTS_FILE as WEIGHTS_FILE

TIED_HEAD_KEY = "lm_head.weight"
EMBEDDING_KEY = "transformer.wte.weight"


def expected_shapes(model: MiniOmni) -> dict[str, tuple[int, ...]]:
    """Every key of the official file with its shape (both tied keys included)."""
    shapes = {name: tuple(p.shape) for name, p in model.state_dict(keep_vars=True).items()}
    shapes[TIED_HEAD_KEY] = tuple(model.lm_head.weight.shape)
    return shapes


def check_state_dict(state: dict[str, torch.Tensor], model: MiniOmni, source: str = "checkpoint") -> None:
    """Raise ValueError listing every missing key, unexpected key and shape mismatch."""
    want = expected_shapes(model)
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {want[k]}"
        for k in set(want) & set(state)
        if tuple(state[k].shape) != want[k]
    )
    if missing or unexpected or wrong:
        lines = [f"{source} does not match the model config:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if wrong:
            lines.append(f"  wrong shapes ({len(wrong)}): " + "; ".join(wrong))
        lines.append(f"  (is {CONFIG_FILE} the one that belongs to these weights?)")
        raise ValueError("\n".join(lines))


def load_weights(model: MiniOmni, path: str | Path) -> MiniOmni:
    """Strictly load an official-format `lit_model.pth` into `model` (in place)."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    check_state_dict(state, model, source=str(path))
    if model.config.tie_word_embeddings:
        # The original loads lm_head then transformer.wte into one shared Parameter, so the
        # embedding key wins for both (REFERENCE.md §6.2).
        state = dict(state)
        state[TIED_HEAD_KEY] = state[EMBEDDING_KEY]
    model.load_state_dict(state, strict=True, assign=False)
    return model


def load_model(
    ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[MiniOmni, Config]:
    """`ckpt_dir/model_config.yaml` + `ckpt_dir/lit_model.pth` -> (model in eval mode, config)."""
    ckpt_dir = Path(ckpt_dir)
    weights = ckpt_dir / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(
            f"{weights} not found: a Mini-Omni checkpoint directory holds {WEIGHTS_FILE} and "
            f"{CONFIG_FILE} (fetch it with `omniflow fetch` or huggingface_hub.snapshot_download)"
        )
    cfg = Config.load(ckpt_dir / CONFIG_FILE)
    with torch.device("meta"):
        model = MiniOmni(cfg)
    model = model.to_empty(device="cpu")
    # to_empty leaves non-persistent buffers uninitialised: rebuild the RoPE tables.
    model.rope_cos, model.rope_sin = rope_tables(cfg)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    load_weights(model, weights)
    return model.to(device=device, dtype=dtype).eval(), cfg


def save_checkpoint(model: MiniOmni, cfg: Config, ckpt_dir: str | Path) -> Path:
    """Write official-format `lit_model.pth` (both tied keys, fp32) + `model_config.yaml`."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    state[TIED_HEAD_KEY] = state.get(TIED_HEAD_KEY, state[EMBEDDING_KEY])
    # Official key order: whisper_adapter, lm_head, transformer.* (cosmetic, but diff-friendly).
    order = sorted(state, key=lambda k: (not k.startswith("whisper_adapter"), k != TIED_HEAD_KEY))
    torch.save({k: state[k] for k in order}, ckpt_dir / WEIGHTS_FILE)
    cfg.save(ckpt_dir / CONFIG_FILE)
    return ckpt_dir
