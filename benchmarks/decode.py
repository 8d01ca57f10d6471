"""Decode benchmark: the real Mini-Omni shape with random weights, omniflow Engine vs the original.

    python benchmarks/decode.py [--paths float32,bfloat16,float32+int8dyn] [--batches 1,2,8,32] [--steps 5]
    omniflow bench decode ...

Prints prefill time for a 154-token audio prompt (151 whisper frames = 3 s of speech), decode
ms/step and steps/s for 1, 2, 8 and 32 concurrent A1A2 sessions (2 cache rows each: the
original's streaming batch trick), KV-cache bytes per session and the real-time factor. The
baseline, measured in the same run, re-creates the original's decode step (REFERENCE.md §4.4):
a 14-head-expanded fp32 cache of all 2048 slots, attention over every slot with a boolean mask,
full 181120-row logits for both rows. Each numeric path (dtype, optionally a quantized-weight
mode of `omniflow.model.quant`) is also compared with the fp32 path of the same run. Runs on CUDA
unchanged (quant modes without a CUDA kernel fall back to none and say so).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from omniflow.model import quant
from omniflow.model.config import Config
from omniflow.model.dtypes import torch_dtype
from omniflow.model.engine import Engine
from omniflow.model.gpt import MiniOmni, apply_rope, rope_tables
from omniflow.model.prompts import build_input_ids
from omniflow.model.sampling import Sampling
from omniflow.model.units import STEPS_PER_SECOND

REAL_TIME_STEPS_PER_S = STEPS_PER_SECOND   # model steps (SNAC frames) per second of speech
PROMPT_FRAMES = 151                    # whisper frames -> A1A2 prompt of 154 positions
BATCH_PROMPT_FRAMES = 20               # shorter prompts for the many-session step timings


def random_model(cfg: Config, dtype: torch.dtype, device: str, seed: int = 0) -> MiniOmni:
    """The real architecture with N(0, 0.02) weights (allocated once, no kaiming init cost)."""
    with torch.device("meta"):
        model = MiniOmni(cfg)
    model = model.to_empty(device="cpu")
    model.rope_cos, model.rope_sin = rope_tables(cfg)
    model.lm_head.weight = model.transformer.wte.weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_1.weight") or name.endswith("norm_2.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.to(device=device, dtype=dtype).eval()


class OriginalDecoder:
    """The original's cached forward: 14-head-expanded cache over all block_size slots, masked."""

    def __init__(self, model: MiniOmni, batch: int) -> None:
        self.model, cfg = model, model.config
        shape = (batch, cfg.n_head, cfg.block_size, cfg.head_size)
        self.k = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.n_layer)]
        L = cfg.block_size
        self.mask_cache = torch.ones(L, L, dtype=torch.bool, device=model.device).tril()[None, None]  # (1, 1, L, L)

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor, audio_embeds=None, whisper_lens=None):
        """input_ids (B, 8, T) at positions input_pos (T,) -> logits (B, T, padded_vocab).
        audio_embeds/whisper_lens (prefill only): adapter output replacing audio positions 1..T."""
        m, c = self.model, self.model.config
        B, _, T = input_ids.shape
        x = m.embed(input_ids, audio_embeds, whisper_lens)  # (B, T, C): 8 streams averaged
        cos, sin = m.rope_cos[input_pos], m.rope_sin[input_pos]  # (T, n_elem)
        mask = self.mask_cache.index_select(2, input_pos)  # (1, 1, T, L)
        for layer, block in enumerate(m.transformer.h):
            a = block.attn
            h = block.norm_1(x)
            qkv = a.attn(h).view(B, T, c.n_query_groups, c.q_per_kv + 2, c.head_size).permute(0, 2, 3, 1, 4)
            q, k, v = qkv.split((c.q_per_kv, 1, 1), dim=2)  # (B, G, qpk|1|1, T, hs)
            k = k.expand(B, c.n_query_groups, c.q_per_kv, T, c.head_size)  # expanded to 14 heads
            v = v.expand(B, c.n_query_groups, c.q_per_kv, T, c.head_size)
            q = apply_rope(q.reshape(B, -1, T, c.head_size), cos, sin)  # (B, nh, T, hs)
            k = apply_rope(k.reshape(B, -1, T, c.head_size), cos, sin)
            v = v.reshape(B, -1, T, c.head_size)
            kc = self.k[layer].index_copy_(2, input_pos, k)  # (B, nh, 2048, hs)
            vc = self.v[layer].index_copy_(2, input_pos, v)
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=a.scale)  # (B, nh, T, hs)
            x = x + a.proj(y.transpose(1, 2).reshape(B, T, -1))
            x = x + block.mlp(block.norm_2(x))
        return m.lm_head(m.transformer.ln_f(x))  # (B, T, padded_vocab)

    def step(self, input_ids: torch.Tensor, pos: int) -> list[int]:
        """One batch-2 decode step and the original's sampling (audio from row 0, text from row 1)."""
        logits = self.forward(input_ids, torch.tensor([pos], device=input_ids.device))[:, -1]  # (B, V)
        text, audio = self.model.split_logits(logits)
        return audio[0].argmax(-1).tolist() + [int(text[-1].argmax())]


def timed(fn, repeat: int, warmup: int = 1) -> float:
    """Median seconds of `repeat` calls after `warmup` untimed ones (the median resists the
    spikes of a shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_original(model: MiniOmni, steps: int, device: str) -> dict:
    prompt = build_input_ids("A1A2", n_audio_frames=PROMPT_FRAMES).to(device)  # (2, 8, 154)
    S = prompt.size(-1)
    dec = OriginalDecoder(model, batch=2)
    embeds = random_embeds(model, PROMPT_FRAMES, device)
    prefill = timed(lambda: (dec.forward(prompt, torch.arange(S, device=device), embeds, [PROMPT_FRAMES] * 2),
                             sync(device)), 1)
    feed = prompt[:, :, -1:]  # (2, 8, 1)
    pos = iter(range(S, model.config.block_size))
    step = timed(lambda: (dec.step(feed, next(pos)), sync(device)), steps)
    return dict(prefill_s=prefill, step_s=step, cache_bytes=dec.cache_bytes)


def bench_prefill(model: MiniOmni, device: str, repeat: int = 1, quant: str = "none") -> dict:
    """Prefill time of one A1A2 session with the full PROMPT_FRAMES prompt, its cache size and
    the quant mode in effect."""
    eng = Engine(model, max_sessions=1, quant=quant)
    embeds = random_embeds(model, PROMPT_FRAMES, device)
    ids = iter(range(10**9))

    def prefill():
        sid = f"p{next(ids)}"
        eng.start(sid, "A1A2", embeds=embeds)
        sync(device)
        eng.stop(sid)

    return dict(prefill_s=timed(prefill, repeat), cache_bytes_per_session=2 * eng.kv_bytes_per_row,
                quant=eng.quant)


def bench_step(model: MiniOmni, sessions: int, steps: int, device: str, **kw) -> float:
    """Median seconds of one decode step of `sessions` concurrent A1A2 sessions.

    The sessions are started with a short prompt (BATCH_PROMPT_FRAMES) so that starting 32 of
    them stays quick; attention over ~150 more positions adds well under 1 % to a step here.
    """
    eng = Engine(model, max_sessions=sessions, max_rows=2 * sessions, **kw)
    embeds = random_embeds(model, BATCH_PROMPT_FRAMES, device)
    for i in range(sessions):
        eng.start(f"s{i}", "A1A2", embeds=embeds, sampling=Sampling())

    def step():
        eng.step()
        sync(device)

    return timed(step, steps, warmup=3)


def bench_join(model: MiniOmni, chunk: int, device: str, quant: str = "none") -> dict:
    """A live session's step times while a second A1A2 session (PROMPT_FRAMES prompt) joins with
    prefill chunks of `chunk` positions: the longest step (what the live listener waits at worst)
    and how many steps the join took."""
    eng = Engine(model, max_sessions=2, quant=quant, prefill_chunk=chunk)
    eng.start("live", "A1A2", embeds=random_embeds(model, BATCH_PROMPT_FRAMES, device))
    for _ in range(2):
        eng.step()
    eng.begin("join", "A1A2", embeds=random_embeds(model, PROMPT_FRAMES, device))
    times = []
    while "join" in eng and eng.sessions["join"].pending is not None:
        t0 = time.perf_counter()
        eng.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return dict(chunk=chunk, max_step_s=max(times), join_steps=len(times))


def random_embeds(model: MiniOmni, frames: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        return model.adapt(torch.randn(frames, model.config.whisper_adapter_dim, generator=g).to(device))  # (T, C)


def parse_path(text: str) -> tuple[str, str]:
    """"float32" or "float32+int8dyn" -> (dtype name, quant mode)."""
    dname, _, mode = text.partition("+")
    torch_dtype(dname)
    return dname, quant.check_mode(mode or "none")


def default_paths(device: str) -> str:
    """Every numeric path this device has: the quantized CPU kernels only where they exist."""
    paths = ["float32", "bfloat16"]
    if device == "cpu":
        paths += [f"float32+{m}" for m in quant.KERNELS]
    return ",".join(paths)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omniflow bench decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", "--dtypes", dest="paths", default=None,
                   help="comma list of DTYPE[+QUANT]: DTYPE float32|bfloat16|float16, QUANT "
                        f"{'|'.join(quant.MODES)} (default: float32, bfloat16 and, on CPU, "
                        "float32 with every quant kernel)")
    p.add_argument("--batches", default="1,2,8,32", help="concurrent A1A2 sessions to time")
    p.add_argument("--steps", type=int, default=5, help="timed decode steps per point (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-baseline", action="store_true", help="skip the original's decode step")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's decode step")
    p.add_argument("--n-layer", type=int, default=None, help="fewer layers for a quick smoke run")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--join-chunks", default="16",
                   help="prefill chunk sizes to time a join under (comma list; empty: skip)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [parse_path(t) for t in (args.paths or default_paths(args.device)).split(",")]

    cfg = Config() if args.n_layer is None else Config(n_layer=args.n_layer)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"Mini-Omni decode benchmark: {cfg.n_layer} layers, n_embd {cfg.n_embd}, {cfg.n_head} heads, "
          f"{cfg.n_query_groups} KV groups, vocab {cfg.padded_vocab_size}, block {cfg.block_size}; "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"prompt: A1A2, {PROMPT_FRAMES} whisper frames = {PROMPT_FRAMES + 3} positions; "
          f"real time = {REAL_TIME_STEPS_PER_S:.2f} steps/s per session; ratios are to figures of this run")
    base, fp32, report = None, {}, {"device": args.device, "threads": torch.get_num_threads(), "paths": []}
    models: dict[str, MiniOmni] = {}
    for dname, mode in paths:
        if dname not in models:
            t0 = time.perf_counter()
            models[dname] = random_model(cfg, torch_dtype(dname), args.device)
            print(f"\n(random {dname} weights built in {time.perf_counter() - t0:.1f} s)")
        model = models[dname]
        quant.quantize_model_(model, "none")     # each path packs its own weights in its engines
        label = dname if mode == "none" else f"{dname}+{mode}"
        print(f"\n== {label}")
        if base is None and dname == "float32" and not args.no_baseline:
            base = bench_original(model, args.steps, args.device)
            report["original"] = base
            print(f"original (re-created), batch 2 (1 A1A2 session): prefill {base['prefill_s'] * 1e3:8.1f} ms | "
                  f"step {base['step_s'] * 1e3:7.1f} ms = {1 / base['step_s']:6.2f} steps/s | "
                  f"KV cache {base['cache_bytes'] / 2**20:7.1f} MiB/session (2048 slots x 14 heads)")
        pre = bench_prefill(model, args.device, quant=mode)
        if pre["quant"] != mode:
            print(f"(quant {mode} is not available on {args.device}: ran {pre['quant']})")
        row = {"path": label, "dtype": dname, "quant": pre["quant"], "prefill_s": pre["prefill_s"], "steps": {}}
        line = f"omniflow  prefill {PROMPT_FRAMES + 3} positions (A1A2, 2 rows): {pre['prefill_s'] * 1e3:8.1f} ms"
        if base is not None:
            line += f" | original {base['prefill_s'] * 1e3:.1f} ms: {base['prefill_s'] / pre['prefill_s']:.2f}x faster"
        if fp32 and label != "float32":
            line += f" | float32 {fp32['prefill_s'] / pre['prefill_s']:.2f}x faster"
        print(line)
        if label == "float32":
            line = (f"omniflow  KV cache {pre['cache_bytes_per_session'] / 2**20:.1f} MiB/session "
                    f"(2 rows x {cfg.block_size} slots x {cfg.n_query_groups} heads)")
            if base is not None:
                line += f" | original {base['cache_bytes'] / 2**20:.1f} MiB: {base['cache_bytes'] / pre['cache_bytes_per_session']:.1f}x smaller"
            print(line)
        for n in batches:
            step_s = bench_step(model, n, args.steps, args.device, compile=args.compile, quant=mode)
            row["steps"][n] = step_s
            per_s = 1 / step_s
            line = (f"omniflow  {n:3d} session(s) ({2 * n:3d} rows): step {step_s * 1e3:7.1f} ms = "
                    f"{per_s:6.2f} steps/s per session, {n * per_s:7.1f} steps/s total, "
                    f"RTF {per_s / REAL_TIME_STEPS_PER_S:5.2f}x real time")
            if base is not None and n == 1:
                line += f" | original {base['step_s'] * 1e3:.1f} ms: {base['step_s'] / step_s:.2f}x faster"
            if fp32 and label != "float32" and n in fp32["steps"]:
                line += f" | float32 {fp32['steps'][n] / step_s:.2f}x faster"
            print(line)
        row["joins"] = []
        for chunk in [int(c) for c in args.join_chunks.split(",") if c]:
            join = bench_join(model, chunk, args.device, quant=mode)
            row["joins"].append(join)
            print(f"omniflow  a session joins (prefill {PROMPT_FRAMES + 3} positions in chunks of {chunk}) while one "
                  f"decodes: its longest step {join['max_step_s'] * 1e3:7.1f} ms over {join['join_steps']} steps "
                  f"(unchunked: one {pre['prefill_s'] * 1e3:.0f} ms stall)")
        if label == "float32":
            fp32 = row
        report["paths"].append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
