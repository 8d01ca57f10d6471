"""`omniflow bench whisper`: one 30 s-window encode per way of running the whisper encoder, and
each one's feature error vs float32 torch (the original's arithmetic).

Candidates (omniflow.model.whisper_encoder.WhisperFeatures.load; same run, interleaved rounds,
medians): torch float32 (baseline), torch bfloat16 (only with --bf16: emulated and slow on CPUs
without avx512_bf16/AMX), onnx float32, onnx int8 (dynamic quantization). Reported: wall time,
process CPU time (less disturbed by other load), ratio vs the baseline, and feature error as
relative L2 over the kept rows of a 3 s utterance plus the smallest per-row cosine.

    omniflow bench whisper [--checkpoint small|PATH] [--threads 1,2] [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="omniflow bench whisper", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="small", help="whisper size or .pt path (default: small)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch/onnxruntime threads (default 1,2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    ap.add_argument("--seconds", type=float, default=3.0, help="utterance length (default 3 s)")
    ap.add_argument("--bf16", action="store_true", help="also time torch bfloat16")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    import torch

    from omniflow.model import weights
    from omniflow.model.units import WHISPER_RATE
    from omniflow.model.whisper_encoder import WhisperFeatures

    path = weights.resolve_whisper(args.checkpoint)
    rng = np.random.default_rng(0)
    t = np.arange(int(args.seconds * WHISPER_RATE)) / WHISPER_RATE
    audio = (0.3 * rng.standard_normal(len(t)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)
    ways = {"torch float32": {}, "onnx float32": {"runtime": "onnx"},
            "onnx int8": {"runtime": "onnx", "quantize": "int8"}}
    if args.bf16:
        ways["torch bfloat16"] = {"dtype": "bfloat16"}
    report = {"checkpoint": str(path), "seconds": args.seconds, "timing": {}, "error": {}}
    for threads in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(threads)
        encoders = {k: WhisperFeatures.load(path, threads=threads, **kw) for k, kw in ways.items()}
        feats = {k: e(audio) for k, e in encoders.items()}                 # also the warm-up
        ref = feats["torch float32"]
        for k, f in feats.items():
            cos = (f * ref).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(ref, axis=1)
            report["error"][k] = {"relative_l2": float(np.linalg.norm(f - ref) / np.linalg.norm(ref)),
                                  "min_row_cosine": float(cos.min())}
        wall, cpu = {k: [] for k in encoders}, {k: [] for k in encoders}
        for _ in range(args.rounds):
            for k, e in encoders.items():
                t0, c0 = time.perf_counter(), time.process_time()
                e(audio)
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        base = np.median(cpu["torch float32"])
        print(f"\nthreads={threads}: one 30 s-window encode ({args.seconds:g} s utterance), median of "
              f"{args.rounds} interleaved rounds")
        report["timing"][threads] = {}
        for k in encoders:
            w, c, e = np.median(wall[k]), np.median(cpu[k]), report["error"][k]
            report["timing"][threads][k] = {"wall_s": float(w), "cpu_s": float(c)}
            print(f"  {k:15s} wall {w:6.2f} s  cpu {c:6.2f} s  x{base / c:4.2f} cpu vs torch float32   "
                  f"features: rel L2 {e['relative_l2']:.4f}, min row cosine {e['min_row_cosine']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
