"""Token-for-token parity with the original Mini-Omni implementation.

    python -m omniflow.model.parity DIR [--device cpu] [--dtype float32] [--compile]

DIR holds `checkpoint/` (official `lit_model.pth` + `model_config.yaml`), `cases.json` (what the
original `generate_*` functions returned) and per case `features_<case>.npy` (adapter input) and
`prefill_logits_<case>.npy` (logits at probe indices). Each case runs through the same `Engine`
the backbone node uses; one line per case, exit status 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import tokens as tk
from .checkpoint import load_model
from .dtypes import DTYPES, torch_dtype
from .engine import Engine
from .generate import answer
from .gpt import MiniOmni
from .prompts import TASKS, build_input_ids

LOGIT_TOLERANCE = 1e-4   # |ours - original| at the probe indices, fp32
TASK_OF_FUNCTION = {t.original: name for name, t in TASKS.items()}


@dataclass
class CaseResult:
    name: str
    ok: bool
    line: str


def _first_mismatch(ours, theirs, speaks: bool) -> str | None:
    """Describe the first differing step (and stream), or None if equal."""
    if speaks:
        n = max(len(theirs[0]), len(ours[0]))
        for step in range(n):
            for stream in range(tk.N_STREAMS):
                a = ours[stream][step] if step < len(ours[stream]) else None
                b = theirs[stream][step] if step < len(theirs[stream]) else None
                if a != b:
                    name = "text" if stream == tk.TEXT_STREAM else f"audio{stream}"
                    return f"step {step} stream {stream} ({name}): ours {a} original {b}"
        return None
    for step in range(max(len(ours), len(theirs))):
        a = ours[step] if step < len(ours) else None
        b = theirs[step] if step < len(theirs) else None
        if a != b:
            return f"step {step} stream {tk.TEXT_STREAM} (text): ours {a} original {b}"
    return None


def prefill_logit_error(model: MiniOmni, input_ids, embeds, whisper_lens, probes, expected) -> float:
    """Max |error| of the last-position logits at the probe indices, via the full forward."""
    with torch.inference_mode():
        logits = model(input_ids, embeds, whisper_lens)[:, -1].float()  # (B, padded_vocab)
    text, audio = model.split_logits(logits)  # (B, 152000), (B, 7, 4160)
    got = np.zeros_like(expected)  # (B, 8, n_probe)
    for stream in range(tk.N_STREAMS):
        idx = torch.as_tensor(probes[str(stream)], device=logits.device)
        part = text if stream == tk.TEXT_STREAM else audio[:, stream]
        got[:, stream] = part[:, idx].cpu().numpy()
    return float(np.abs(got - expected).max())


def run_case(model: MiniOmni, engine: Engine, root: Path, name: str, case: dict, probes: dict) -> CaseResult:
    task = TASK_OF_FUNCTION.get(case["fn"])
    if task is None:
        return CaseResult(name, False, f"{name} FAIL unknown original function {case['fn']!r}")
    spec = TASKS[task]
    # cases.json stores (8 streams, B rows, S); the model takes (B, 8, S).
    input_ids = torch.tensor(case["input_ids"], dtype=torch.long).permute(1, 0, 2).to(model.device)
    S = input_ids.size(-1)
    embeds, n_frames, text_ids, lens = None, None, None, None
    if spec.audio_in:
        features = torch.from_numpy(np.load(root / f"features_{name}.npy")).to(model.device)  # (B, T, 768)
        with torch.inference_mode():
            embeds = model.adapt(features)  # (B, T, C)
        lens = case.get("whisper_lens") or [S - 3] * input_ids.size(0)
        n_frames = int(lens[0])
    else:
        text_ids = input_ids[0, tk.TEXT_STREAM, 1: S - 2].tolist()
    ours_prompt = build_input_ids(task, n_frames, text_ids).to(model.device)
    if not torch.equal(ours_prompt, input_ids):
        diff = (ours_prompt != input_ids).nonzero()[0].tolist() if ours_prompt.shape == input_ids.shape else "shape"
        return CaseResult(name, False, f"{name} FAIL prompt layout differs from the original at {diff}")

    notes = []
    ok = True
    logit_file = root / f"prefill_logits_{name}.npy"
    if logit_file.exists():
        err = prefill_logit_error(model, input_ids, embeds, lens, probes, np.load(logit_file))
        tol = LOGIT_TOLERANCE if model.dtype == torch.float32 else 5e-2
        notes.append(f"prefill logits max err {err:.1e}")
        if err > tol:
            ok = False
            notes[-1] += f" > {tol:g}"

    expected = case["output"]
    ours = answer(engine, task, embeds=embeds, text_ids=text_ids,
                  max_new_tokens=case["max_returned_tokens"] - S, session_id=f"parity-{name}")
    mismatch = _first_mismatch(ours, expected, spec.audio_out)
    n_expected = len(expected[0]) if spec.audio_out else len(expected)
    n_ours = len(ours[0]) if spec.audio_out else len(ours)
    if mismatch:
        ok = False
        head = f"{name} MISMATCH {mismatch} ({n_ours} vs {n_expected} steps)"
    else:
        head = f"{name} {'ok' if ok else 'FAIL'} {n_ours}/{n_expected} steps"
    return CaseResult(name, ok, head + (f" ({'; '.join(notes)})" if notes else ""))


def run(root: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
        compile: bool = False) -> list[CaseResult]:
    root = Path(root)
    cases_file = root / "cases.json"
    if not cases_file.exists():
        raise FileNotFoundError(f"{cases_file} not found: DIR must hold cases.json and checkpoint/")
    spec = json.loads(cases_file.read_text())
    model, _ = load_model(root / "checkpoint", device=device, dtype=dtype)
    engine = Engine(model, max_sessions=2, compile=compile)
    probes = spec.get("prefill_probe_indices", {})
    return [run_case(model, engine, root, name, case, probes) for name, case in spec["cases"].items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omniflow.model.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="golden directory (checkpoint/, cases.json, features_*.npy)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="exact parity is an fp32 property; other dtypes show how far they drift")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine's decode step")
    args = parser.parse_args(argv)
    results = run(args.dir, args.device, torch_dtype(args.dtype), compile=args.compile)
    for r in results:
        print(r.line)
    failed = [r.name for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} cases match" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
