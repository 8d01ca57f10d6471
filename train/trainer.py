"""The training loop shared by all stages.

    train(cfg, data=["cache/"], out_dir="runs/stage1", init="checkpoints/mini-omni")

* one process, or many under `torchrun` (PyTorch DDP: gloo on CPU, NCCL on GPU);
* gradient accumulation, global-norm clipping, bf16 autocast on GPU (fp32 master weights);
* AdamW + linear warm-up + cosine decay (LambdaLR), per-stream losses to `log.jsonl` and a
  progress bar;
* checkpoints `out_dir/step-NNNNNN/` every `save_every` steps: `lit_model.pth` +
  `model_config.yaml` in the official format (plus the tokenizer files of the initial
  checkpoint), so the graph and `python -m omniflow.model.parity` load them unchanged; next to
  them `trainer_state.pt` (optimizer, scheduler, step, data position) and `rng_rank<r>.pt`;
  `out_dir/latest` names the newest one;
* exact resume: model, optimizer, scheduler, data position and RNG states come back.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from omniflow.errors import UsageError
from omniflow.model.checkpoint import WEIGHTS_FILE, load_model, save_checkpoint
from omniflow.model.config import CONFIG_FILE
from omniflow.model.weights import checkpoint_dir
from omniflow.model.weights.components import RUN_LATEST_FILE, TOKENIZER_FILES

from .config import StageConfig
from .data.cache import SampleCache
from .loss import STREAM_NAMES, OmniLoss
from .sampler import MicroBatchSampler
from .sequence import LossPolicy, collate, sequence_length
from .stages import apply_trainable, param_groups

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
LATEST_FILE = RUN_LATEST_FILE
LOG_FILE = "log.jsonl"


# ------------------------------------------------------------------------- schedule ---------
def lr_at(step: int, cfg: StageConfig) -> float:
    """Linear warm-up lr_min -> lr_max over warmup_steps, then cosine lr_max -> lr_min."""
    if step < cfg.warmup_steps:
        return cfg.lr_min + (cfg.lr_max - cfg.lr_min) * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr_min + 0.5 * (cfg.lr_max - cfg.lr_min) * (1 + math.cos(math.pi * progress))


def _lr_factor(step: int, cfg: StageConfig) -> float:
    return lr_at(step, cfg) / cfg.lr_max


# ------------------------------------------------------------------------- processes --------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def setup_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), dev


# ------------------------------------------------------------------------- checkpoints ------
def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (-> the checkpoint its `latest` file names)."""
    path = checkpoint_dir(path)
    if not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}; expected a Mini-Omni checkpoint directory "
                                f"({WEIGHTS_FILE} + {CONFIG_FILE}) or a training run directory with "
                                f"a '{LATEST_FILE}' file")
    return path


def prepare_init(init: str | Path, out_dir: Path, ddp: Dist) -> Path:
    """The starting checkpoint: a Mini-Omni checkpoint / run dir, or a Hugging Face Qwen2 model
    directory, converted once with the model's "any model can talk" conversion."""
    init = Path(init)
    if (init / "config.json").exists() and not (init / WEIGHTS_FILE).exists():
        converted = out_dir / "init-converted"
        if ddp.main and not (converted / WEIGHTS_FILE).exists():
            from omniflow.model.convert import qwen2_to_miniomni
            log.info("converting Hugging Face model %s to a Mini-Omni checkpoint in %s", init, converted)
            qwen2_to_miniomni(init, converted)
        ddp.barrier()
        return converted
    return resolve_checkpoint(init)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, state: dict, ddp: Dist,
                     tokenizer_dir: Path | None) -> Path:
    ckpt = out_dir / f"step-{step:06d}"
    if ddp.main:
        save_checkpoint(model, model.config, ckpt)
        for name in TOKENIZER_FILES:
            if tokenizer_dir is not None and (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, ckpt / name)
        torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   ckpt / STATE_FILE)
    ddp.barrier()
    torch.save(_rng_state(), ckpt / f"rng_rank{ddp.rank}.pt")
    ddp.barrier()
    if ddp.main:
        (out_dir / LATEST_FILE).write_text(ckpt.name + "\n")
    return ckpt


# ------------------------------------------------------------------------- the loop ---------
def train(cfg: StageConfig, data: list[str | Path], out_dir: str | Path, *, init: str | Path | None = None,
          resume: str | Path | None = None, device: str | None = None, progress: bool = True,
          stop_after: int | None = None) -> Path:
    """Train one stage; returns the last checkpoint directory.

    init: starting checkpoint (previous stage's run or checkpoint dir, a Mini-Omni checkpoint, or a
    Hugging Face Qwen2 dir). resume: a checkpoint dir, a run dir, or "auto" (out_dir's latest if
    any, else start from init). stop_after: leave after this optimizer step with a checkpoint, as an
    interrupted job would (for time-limited job slots); `resume` continues exactly.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    ddp, dev = setup_distributed(device)
    if ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ddp.barrier()

    # --- where to start from ---
    if resume == "auto":
        resume = out_dir if (out_dir / LATEST_FILE).exists() else None
    state: dict = {}
    if resume is not None:
        start_ckpt = resolve_checkpoint(resume)
        state = torch.load(start_ckpt / STATE_FILE, map_location="cpu", weights_only=False)  # our own file
        _check_resume(cfg, state, start_ckpt)
        tokenizer_dir = Path(state["tokenizer_dir"]) if state.get("tokenizer_dir") else None
    else:
        if init is None:
            raise UsageError("nothing to start from: pass --init (the previous stage's checkpoint, a "
                             "Mini-Omni checkpoint or a Hugging Face Qwen2 directory) or --resume")
        start_ckpt = prepare_init(init, out_dir, ddp)
        tokenizer_dir = start_ckpt
    model, model_cfg = load_model(start_ckpt, device=dev, dtype=torch.float32)
    model.train()
    hooks = apply_trainable(model, cfg.trainable)  # noqa: F841 (the hooks live as long as the model)

    # --- data ---
    max_len = min(cfg.max_seq_len or model_cfg.block_size, model_cfg.block_size)
    dataset = SampleCache(data, tasks=cfg.tasks, keep=lambda e: _entry_length(e) <= max_len)
    if ddp.main:
        log.info("data: %d samples (%s); %d skipped as longer than %d positions", len(dataset),
                 ", ".join(f"{n} {t}" for t, n in dataset.task_counts.items()), dataset.n_filtered, max_len)
    fingerprint = dataset.fingerprint()
    if state and state["data_fingerprint"] != fingerprint:
        raise ValueError(f"the training data changed since {start_ckpt} (was {state['data_fingerprint']}, now "
                         f"{fingerprint}); an exact resume needs the same --data (start a new run with "
                         f"--init {start_ckpt} instead)")
    policy = LossPolicy.default(tts_text_loss=cfg.tts_text_loss)
    step = int(state.get("step", 0))
    samples_seen = int(state.get("samples_seen", 0))
    sampler = MicroBatchSampler(len(dataset), cfg.seed, cfg.micro_batch_size, cfg.grad_accum,
                                ddp.rank, ddp.world, start_position=samples_seen)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=partial(collate, policy=policy),
                                         num_workers=cfg.num_workers, pin_memory=dev.type == "cuda",
                                         persistent_workers=False)

    # --- optimisation ---
    module = OmniLoss(model, cfg.text_loss_weight, cfg.audio_loss_weight)
    if ddp.enabled:
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=True,    # a batch without spoken prompts leaves the adapter unused
            broadcast_buffers=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr_max, betas=cfg.betas,
                                  eps=cfg.eps, fused=dev.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_lr_factor, cfg=cfg))
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng_file = start_ckpt / f"rng_rank{ddp.rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        torch.manual_seed(cfg.seed + ddp.rank)

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
    autocast = partial(torch.autocast, device_type=dev.type, dtype=torch.bfloat16) if bf16 \
        else contextlib.nullcontext

    log_path = out_dir / LOG_FILE
    bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.stage, unit="step",
               disable=not (progress and ddp.main))
    batches = iter(loader)
    last_ckpt = start_ckpt
    t_start = time.perf_counter()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        n_global = ddp.sum(torch.tensor(float(sum(b.n_loss_tokens for b in micro)), device=dev))
        if n_global.item() == 0:
            raise ValueError(f"step {step}: the global batch has no loss tokens (tasks {cfg.tasks})")
        scale = ddp.world / n_global.item()
        sums = torch.zeros(len(STREAM_NAMES), device=dev)
        counts = torch.zeros(len(STREAM_NAMES), device=dev)
        positions = 0
        for j, b in enumerate(micro):
            b = b.to(dev)
            sync = (not ddp.enabled) or j == len(micro) - 1
            with (contextlib.nullcontext() if sync else module.no_sync()), autocast():
                loss, s, c = module(b.input_ids, b.targets, b.loss_mask, b.features, b.whisper_lens, scale)
            loss.backward()
            sums += s
            counts += c
            positions += int(b.input_ids.shape[0] * b.input_ids.shape[2])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        samples_seen += sampler.global_batch

        stats = ddp.sum(torch.cat([sums, counts, torch.tensor([float(positions)], device=dev)]))
        if ddp.main and (step % cfg.log_every == 0 or step == cfg.max_steps):
            record = _log_record(step, lr, stats, float(grad_norm), samples_seen, cfg,
                                 time.perf_counter() - t0, time.perf_counter() - t_start)
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.3f}", text=_fmt(record["text"]),
                            audio=_fmt(record["audio_mean"]))
        bar.update(1)
        stopping = stop_after is not None and step >= stop_after
        if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
            last_ckpt = write_checkpoint(
                out_dir, step, model, optimizer, scheduler,
                {"step": step, "samples_seen": samples_seen, "config": cfg.to_dict(),
                 "data_fingerprint": fingerprint, "world_size": ddp.world,
                 "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir else None}, ddp, tokenizer_dir)
        if stopping:
            break
    bar.close()
    return last_ckpt


def _entry_length(e: dict) -> int:
    return sequence_length(e["task"], prompt_text=e.get("prompt_text"), answer_text=e["answer_text"],
                           features=e.get("features"), codes=e.get("codes"))


def _log_record(step, lr, stats, grad_norm, samples_seen, cfg, step_s, elapsed_s) -> dict:
    n = len(STREAM_NAMES)
    sums, counts, positions = stats[:n].tolist(), stats[n:2 * n].tolist(), stats[2 * n].item()
    per = [s / c if c else None for s, c in zip(sums, counts)]
    audio_sum, audio_count = sum(sums[:-1]), sum(counts[:-1])
    weighted = cfg.text_loss_weight * sums[-1] + cfg.audio_loss_weight * audio_sum
    return {"step": step, "lr": lr, "loss": weighted / max(1.0, sum(counts)),
            "text": per[-1], "audio_mean": audio_sum / audio_count if audio_count else None,
            **{name: v for name, v in zip(STREAM_NAMES[:-1], per[:-1])},
            "loss_tokens": int(sum(counts)), "positions": int(positions), "grad_norm": grad_norm,
            "samples": samples_seen, "step_s": round(step_s, 4), "elapsed_s": round(elapsed_s, 2),
            "positions_per_s": round(positions / step_s, 1) if step_s > 0 else None}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


# Keys that may change between a run and its resume without breaking exactness of what is done so far.
_RESUME_MUTABLE = {"max_steps", "save_every", "log_every", "num_workers", "description"}


def _check_resume(cfg: StageConfig, state: dict, ckpt: Path) -> None:
    old = state.get("config", {})
    changed = sorted(k for k, v in cfg.to_dict().items() if k not in _RESUME_MUTABLE and old.get(k) != v)
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(f"cannot resume {ckpt} exactly: config changed ({diff}); "
                         f"start a new run with --init {ckpt}")
