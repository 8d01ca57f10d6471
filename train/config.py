"""Typed stage configs: `train/configs/<stage>.yaml` -> `StageConfig`, every field overridable on
the command line (`--lr-max 2e-4`, `--tasks ASR,T1A2`). Unknown keys and wrong types are errors.

Defaults follow the paper where it speaks (REFERENCE.md §7.1, §7.2): AdamW, cosine schedule from
lr_min 4e-6 up to lr_max (1e-3 stage 1, 4e-4 stages 2-3, 5e-5 final), global batch 192. Where it
is silent we take litgpt's `pretrain.py` defaults, which the authors built on (issue #78):
betas (0.9, 0.95), weight decay 0.1 on weight matrices (never on the embedding or norms),
gradient clipping at 1.0, linear warm-up.
"""
from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from .data.manifest import TASKS

CONFIG_DIR = Path(__file__).parent / "configs"
STAGES = ("stage1", "stage2", "stage3", "final")

# What a stage may train (see train/stages.py for how each part maps onto parameter names).
PARTS = ("adapter", "embedding_audio_rows", "trunk")


class StageConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    stage: str                                   # stage1 | stage2 | stage3 | final
    description: str = ""
    tasks: list[str]                             # samples of other tasks in --data are ignored
    trainable: list[str]                         # parts of PARTS; everything else is frozen
    # --- optimisation ---
    max_steps: int                               # optimizer steps
    lr_max: float                                # peak learning rate (after warm-up)
    lr_min: float = 4e-6                         # start of warm-up and end of the cosine decay
    warmup_steps: int = 0
    weight_decay: float = 0.1                    # AdamW, on weight matrices only
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0                       # max global grad norm (0 = off)
    micro_batch_size: int = 8                    # samples per forward pass per process
    grad_accum: int = 24                         # micro-batches per optimizer step
    # --- loss ---
    text_loss_weight: float = 1.0
    audio_loss_weight: float = 1.0
    tts_text_loss: bool = False                  # T1A2 text stream carries loss (off: issue #101/#110)
    max_seq_len: int | None = None               # skip longer samples (default: model block_size)
    # --- run ---
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 autocast on CUDA, fp32 on CPU
    save_every: int = 1000                       # checkpoint every N optimizer steps (and at the end)
    log_every: int = 1
    seed: int = 1234                             # data order
    num_workers: int = 2                         # DataLoader worker processes (0 = load in-process)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"stage config {self.stage!r}: {msg}")

        if self.stage not in STAGES:
            bad(f"stage must be one of {', '.join(STAGES)}")
        if not self.tasks or set(self.tasks) - set(TASKS):
            bad(f"tasks {self.tasks} must be a non-empty subset of {', '.join(TASKS)}")
        if not self.trainable or set(self.trainable) - set(PARTS):
            bad(f"trainable {self.trainable} must be a non-empty subset of {', '.join(PARTS)}")
        for name in ("max_steps", "micro_batch_size", "grad_accum", "save_every", "log_every"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr_min <= self.lr_max:
            bad(f"need 0 < lr_min ({self.lr_min}) <= lr_max ({self.lr_max})")
        if not 0 <= self.warmup_steps < self.max_steps:
            bad(f"warmup_steps ({self.warmup_steps}) must be in [0, max_steps={self.max_steps})")
        if self.text_loss_weight < 0 or self.audio_loss_weight < 0:
            bad("loss weights must be >= 0")

    def to_dict(self) -> dict:
        return msgspec.to_builtins(self)


def load_stage_config(stage_or_path: str | Path, overrides: dict[str, object] | None = None) -> StageConfig:
    """A stage name (built-in YAML in train/configs/) or a YAML path, plus overrides -> StageConfig."""
    path = Path(stage_or_path)
    if str(stage_or_path) in STAGES:
        path = CONFIG_DIR / f"{stage_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"stage config {path} not found (built-in stages: {', '.join(STAGES)})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(data, StageConfig, strict=False)
    except msgspec.ValidationError as e:
        hint = ""
        if "unknown field" in str(e):
            hint = " (known keys: " + ", ".join(f.name for f in msgspec.structs.fields(StageConfig)) + ")"
        raise ValueError(f"{path}: {e}{hint}") from e


# ----------------------------------------------------------------------- command line ------
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` option per StageConfig field (except `stage`), default: the YAML value."""
    group = parser.add_argument_group("stage config overrides (default: the stage's YAML)")
    for f in msgspec.structs.fields(StageConfig):
        if f.name == "stage":
            continue
        kind = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        if kind is list:
            group.add_argument(flag, dest=f.name, metavar="A,B", type=lambda s: [x for x in s.split(",") if x])
        elif kind is tuple:
            group.add_argument(flag, dest=f.name, metavar="X,Y", type=lambda s: s.split(","))
        elif kind is bool:
            group.add_argument(flag, dest=f.name, type=_parse_bool, metavar="true|false")
        else:
            group.add_argument(flag, dest=f.name, metavar=f.name.upper())
    parser.set_defaults(_config_fields=[f.name for f in msgspec.structs.fields(StageConfig)])


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    return {name: getattr(args, name) for name in getattr(args, "_config_fields", [])
            if getattr(args, name, None) is not None}


def _base_type(tp) -> type:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return origin
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp if isinstance(tp, type) else str


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
