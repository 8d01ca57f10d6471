"""Training benchmark: the real Mini-Omni size (random weights), one stage's optimizer step.

    python benchmarks/train.py [--stage stage3] [--batch 1] [--positions 256] [--steps 2] [--device cpu]
    omniflow bench train ...

Times full optimizer steps (forward, backward, clipping, AdamW) of `train`'s own training
forward (`train.loss.OmniLoss`) on A1A2 samples (speech in, speech + text out: every head is
used), and prints positions/s, loss tokens/s, step time, peak memory and parameter counts. It
then estimates what the paper's schedule (REFERENCE.md §7.2, issue #112) costs on one H100 from
the FLOPs per position, with the assumed utilisation printed next to the result.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import torch

from train.config import STAGES, load_stage_config
from train.loss import OmniLoss
from train.sequence import LossPolicy, collate
from train.stages import apply_trainable, param_groups
from train.testing import REAL_TRUNK, TINY_TRUNK, init_model, model_config

WHISPER_SMALL_DIM = 768
PAPER_STEPS = {"stage1": 20_000, "stage2": 30_000, "stage3": 60_000}   # issue #112 (upper ends)
PAPER_BATCH = 192                                                        # samples per step (paper §4.2)
H100_BF16_FLOPS = 989e12                                                 # dense bf16 peak, SXM
ASSUMED_MFU = 0.35                    # typical for a 0.5 B model at a few hundred positions a sample


def synthetic_batch(batch: int, positions: int, policy: LossPolicy):
    """`batch` A1A2 samples whose sequences are `positions` long: half prompt, half answer."""
    gen = torch.Generator().manual_seed(0)
    n_frames = max(1, positions // 2 - 3)                    # prompt = T + 3 positions
    n_codes = max(1, positions - (n_frames + 3) - 8)         # answer = F + 8 steps (delay + _eoa)
    records = [{"task": "A1A2", "answer_text": torch.randint(0, 151000, (min(n_codes, 40),), generator=gen),
                "features": torch.randn(n_frames, WHISPER_SMALL_DIM, generator=gen),
                "codes": torch.randint(0, 4096, (n_codes, 7), generator=gen, dtype=torch.int16)}
               for _ in range(batch)]
    return collate(records, policy)


def flops_per_position(cfg, seq_len: int, text_frac: float, audio_frac: float) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per input position."""
    d, L = cfg.n_embd, cfg.n_layer
    attn_proj = d * cfg.qkv_size + cfg.n_head * cfg.head_size * d
    mlp = 3 * d * cfg.intermediate_size
    trunk = L * (attn_proj + mlp)
    attention = L * 2 * cfg.n_head * cfg.head_size * seq_len        # QK^T and AV, causal half of 2·2
    heads = text_frac * d * cfg.text_vocab_size + audio_frac * d * 7 * cfg.audio_vocab_size
    adapter = 0.5 * 3 * cfg.whisper_adapter_dim * cfg.intermediate_size   # about half the positions
    return 3 * 2 * (trunk + heads + adapter) + 3 * attention


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024       # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omniflow bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="stage3", choices=STAGES, help="which parameters train")
    p.add_argument("--size", default="real", choices=["real", "tiny"])
    p.add_argument("--batch", type=int, default=1, help="samples per step")
    p.add_argument("--positions", type=int, default=256, help="sequence length of each sample")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps (after 1 warm-up step)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--avg-positions", type=int, default=300,
                   help="mean sequence length assumed for the paper-schedule estimate")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    stage = load_stage_config(args.stage)
    cfg = model_config(WHISPER_SMALL_DIM, **(REAL_TRUNK if args.size == "real" else TINY_TRUNK))
    t0 = time.perf_counter()
    model = init_model(cfg).to(device).train()
    build_s = time.perf_counter() - t0
    apply_trainable(model, stage.trainable)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, stage.weight_decay), lr=1e-5, fused=device.type == "cuda")
    loss_fn = OmniLoss(model)
    batch = synthetic_batch(args.batch, args.positions, LossPolicy.default(stage.tts_text_loss)).to(device)
    bf16 = device.type == "cuda"
    n_pos = batch.input_ids.shape[0] * batch.input_ids.shape[2]

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = loss_fn(batch.input_ids, batch.targets, batch.loss_mask, batch.features,
                                 batch.whisper_lens, scale=1.0 / batch.n_loss_tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()                                                                   # warm-up (allocations)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))

    n_total = sum(q.numel() for q in model.parameters())
    n_train = sum(q.numel() for q in params)
    text_frac = float(batch.loss_mask[:, 7].sum()) / n_pos              # positions with text logits
    audio_frac = float(batch.loss_mask[:, :7].any(1).sum()) / n_pos     # positions with audio logits
    fpp = flops_per_position(cfg, args.positions, text_frac, audio_frac)
    achieved = fpp * n_pos / step_s

    print(f"device {device} ({torch.get_num_threads()} CPU threads), {args.size} model: "
          f"{n_total / 1e6:.1f} M parameters, {n_train / 1e6:.1f} M trained in {args.stage} (built in {build_s:.1f} s)")
    print(f"batch {args.batch} x {batch.input_ids.shape[2]} positions, {batch.n_loss_tokens} loss tokens, "
          f"{'bf16 autocast' if bf16 else 'fp32'}")
    print(f"step {step_s * 1000:.0f} ms (median of {args.steps}) -> {n_pos / step_s:.1f} positions/s, "
          f"{batch.n_loss_tokens / step_s:.1f} loss tokens/s, {achieved / 1e9:.1f} GFLOP/s achieved")
    print(f"peak memory {peak_memory_bytes(device) / 2**30:.2f} GiB "
          f"({'CUDA allocated' if device.type == 'cuda' else 'process max RSS'})")

    # --- the paper's schedule on one H100, from FLOPs ---
    real = model_config(WHISPER_SMALL_DIM, **REAL_TRUNK)
    fpp_avg = flops_per_position(real, args.avg_positions, text_frac=0.15, audio_frac=0.4)
    steps = sum(PAPER_STEPS.values())
    positions = steps * PAPER_BATCH * args.avg_positions
    total = positions * fpp_avg
    h100_s = total / (H100_BF16_FLOPS * ASSUMED_MFU)
    print(f"paper schedule: {steps:,} steps x {PAPER_BATCH} samples x ~{args.avg_positions} positions = "
          f"{positions / 1e9:.2f} G positions, {fpp_avg / 1e9:.2f} GFLOP each = {total:.2e} FLOP")
    print(f"  one H100 at {ASSUMED_MFU:.0%} of {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16: "
          f"{h100_s / 3600:.1f} h ({h100_s / 86400:.2f} days)"
          + (f"; at this run's rate: {total / achieved / 86400 / 365:.1f} years" if args.size == "real" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
