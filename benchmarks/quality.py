"""Quality of the fast numeric paths: each one against fp32, the exact path, in the same run.

    omniflow bench quality [--paths bfloat16,float32+int8dyn,...] [--steps 200] [--json out.json]
    omniflow bench quality --make-trained DIR      # train a small espeak checkpoint first (minutes)
    omniflow bench quality --trained DIR           # ... and compare greedy answers on it

1. Real-size weights ($OMNIFLOW_HOME/miniomni: real shapes; random unless you fetched the real
   model): one A1A2 session decoded for --steps steps, teacher-forced on fp32's greedy tokens
   (every path is fed the same tokens, so one early difference does not compound). Per path:
   relative error of the text and audio logits (||l - l_fp32|| / ||l_fp32||, mean over steps) and
   top-1 agreement with fp32 for the text head and each of the 7 audio heads.
2. A checkpoint trained by `train/` on the espeak set (--trained; --make-trained builds one):
   free-running greedy answers of each path vs fp32 for every sample of its cache: answers
   identical, and tokens equal up to the first difference. Random weights have near-tie logits, so
   only a trained model says how often a path changes what a user hears.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.decode import parse_path, random_embeds
from omniflow.model import quant
from omniflow.model import tokens as tk
from omniflow.model.checkpoint import load_model
from omniflow.model.dtypes import torch_dtype
from omniflow.model.engine import Engine
from omniflow.model.prompts import build_input_ids, decode_feedback, get_task

PROMPT_FRAMES = 50            # whisper frames of the real-size prompt (1 s of speech)
TRAINED_TRUNK = dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=2, head_size=16, intermediate_size=128,
                     block_size=512)   # K = 64 and 128: every quant kernel's shape rules hold


def default_paths() -> str:
    return ",".join(["bfloat16"] + [f"float32+{m}" for m in quant.KERNELS])


def teacher_forced(model, mode: str, steps: int, embeds, ref=None) -> dict:
    """Decode one A1A2 session for `steps` steps with `mode`'s engine, feeding `ref`'s tokens
    (its own greedy tokens when ref is None). Returns per-step logits and greedy tokens."""
    eng = Engine(model, max_sessions=1, quant=mode)
    spec = get_task("A1A2")
    ids = build_input_ids("A1A2", embeds.size(0)).to(eng.device)  # (2, 8, S)
    S = ids.size(-1)
    out = {"text": [], "audio": [], "tokens": [], "quant": eng.quant}
    rows = eng._row_index[:2]
    with torch.inference_mode():
        h = eng._prefill(0, ids, embeds.to(eng.device, eng.dtype), embeds.size(0))  # (2, C)
        for step in range(steps):
            text = eng._text_head(h[spec.text_row: spec.text_row + 1])[0].float()  # (152000,)
            audio = eng._audio_head(h[spec.audio_row: spec.audio_row + 1])[0].float()  # (7 * 4160,)
            audio = audio.view(tk.N_AUDIO_LAYERS, -1)  # (7, 4160)
            out["text"].append(text.cpu())
            out["audio"].append(audio.cpu())
            mine = audio.argmax(-1).tolist() + [int(text.argmax())]
            out["tokens"].append(mine)
            feed_tokens = mine if ref is None else ref["tokens"][step]
            feed = decode_feedback(spec, feed_tokens[: tk.N_AUDIO_LAYERS], feed_tokens[-1]).to(eng.device)  # (2, 8)
            n = S + step + 1
            pos = torch.full((2,), S + step, dtype=torch.long, device=eng.device)
            h = eng._trunk(feed, pos, eng.k_cache[:, :2, :, :n], eng.v_cache[:, :2, :, :n], rows, n)
    return out


def compare_logits(got: dict, ref: dict) -> dict:
    def rel(a, b):
        return float(sum((x - y).norm() / y.norm() for x, y in zip(a, b)) / len(b))

    n = len(ref["tokens"])
    agree = [sum(g[i] == r[i] for g, r in zip(got["tokens"], ref["tokens"])) / n for i in range(tk.N_STREAMS)]
    return {"text_rel_err": rel(got["text"], ref["text"]), "audio_rel_err": rel(got["audio"], ref["audio"]),
            "text_top1": agree[-1], "audio_top1": agree[: tk.N_AUDIO_LAYERS]}


def real_size(paths, steps: int, device: str, checkpoint: str | None) -> list[dict]:
    from omniflow.model import weights

    ckpt = weights.resolve("miniomni", checkpoint)
    print(f"\n1. real-size weights {ckpt}: A1A2, {PROMPT_FRAMES} whisper frames, {steps} steps teacher-forced "
          f"on fp32's greedy tokens")
    models = {"float32": load_model(ckpt, device=device, dtype=torch.float32)[0]}
    embeds = random_embeds(models["float32"], PROMPT_FRAMES, device).float()  # (T, C)
    t0 = time.perf_counter()
    ref = teacher_forced(models["float32"], "none", steps, embeds)
    print(f"   (fp32 reference decoded in {time.perf_counter() - t0:.0f} s)")
    rows = []
    print(f"   {'path':18s} {'text err':>9s} {'audio err':>9s} {'text top1':>9s}  audio top1 per layer 1..7")
    for dname, mode in paths:
        if dname not in models:
            models[dname] = load_model(ckpt, device=device, dtype=torch_dtype(dname))[0]
        got = teacher_forced(models[dname], mode, steps, embeds, ref)
        row = {"path": f"{dname}+{got['quant']}" if got["quant"] != "none" else dname, **compare_logits(got, ref)}
        rows.append(row)
        print(f"   {row['path']:18s} {row['text_rel_err']:9.4f} {row['audio_rel_err']:9.4f} {row['text_top1']:9.3f}  "
              + " ".join(f"{a:.3f}" for a in row["audio_top1"]))
    return rows


def make_trained(root: Path, sentences: int, steps: int) -> Path:
    """espeak set -> preprocessed cache -> stage3 training of a TRAINED_TRUNK model; returns the run dir."""
    from omniflow.cli import main as omniflow
    from train.data.make_espeak_set import make_espeak_set
    from train.testing import write_model, write_snac, write_whisper

    root.mkdir(parents=True, exist_ok=True)
    manifest = make_espeak_set(root / "speech", count=sentences, tasks=("ASR", "T1A2", "A1T2", "A1A2", "T1T2"))
    whisper, dim = write_whisper(root / "whisper")
    snac = write_snac(root / "snac")
    init = write_model(root / "init", dim, **TRAINED_TRUNK)
    if omniflow(["train", "preprocess", "--source", str(manifest), "--out", str(root / "cache"), "--tokenizer",
                 str(init), "--whisper", str(whisper), "--snac", str(snac), "--no-progress"]):
        raise SystemExit("preprocess failed")
    if omniflow(["train", "stage3", "--data", str(root / "cache"), "--init", str(init), "--out", str(root / "run"),
                 "--max-steps", str(steps), "--warmup-steps", "0", "--lr-max", "3e-3", "--lr-min", "3e-4",
                 "--micro-batch-size", "8", "--grad-accum", "1", "--num-workers", "0", "--device", "cpu",
                 "--save-every", str(steps), "--no-progress"]):
        raise SystemExit("training failed")
    return root


def trained(paths, root: Path, device: str, max_new_tokens: int) -> list[dict]:
    from omniflow.model.generate import answer
    from omniflow.model.sampling import Sampling
    from omniflow.model.weights.resolve import resolve
    from train.data.cache import SampleCache

    ckpt = resolve("miniomni", root / "run")
    data = SampleCache(root / "cache")
    print(f"\n2. trained checkpoint {ckpt} ({len(data)} espeak samples): free-running greedy answers vs fp32")

    def answers(dname, mode):
        model = load_model(ckpt, device=device, dtype=torch_dtype(dname))[0]
        eng = Engine(model, max_sessions=1, quant=mode)
        outs = []
        for i in range(len(data)):
            rec = data[i]
            task = "A1A2_SINGLE" if rec["task"] == "A1A2" else rec["task"]
            with torch.inference_mode():
                kw = ({"embeds": model.adapt(rec["features"].to(device))} if rec["features"] is not None
                      else {"text_ids": rec["prompt_text"].tolist()})
            out = answer(eng, task, sampling=Sampling(top_k=1), max_new_tokens=max_new_tokens, **kw)
            outs.append(list(zip(*out)) if get_task(task).audio_out else [(t,) for t in out])  # steps
        return outs, eng.quant

    ref, _ = answers("float32", "none")
    rows = []
    print(f"   {'path':18s} {'identical':>10s} {'tokens equal up to 1st difference':>34s}")
    for dname, mode in paths:
        got, used = answers(dname, mode)
        same = sum(g == r for g, r in zip(got, ref))
        prefix = []
        for g, r in zip(got, ref):
            k = next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), min(len(g), len(r)))
            prefix.append(k / max(len(r), 1))
        row = {"path": f"{dname}+{used}" if used != "none" else dname, "identical": same, "samples": len(ref),
               "prefix_agreement": sum(prefix) / len(prefix)}
        rows.append(row)
        print(f"   {row['path']:18s} {same:4d}/{len(ref):<5d} {row['prefix_agreement']:34.3f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omniflow bench quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--paths", default=None, help="comma list of DTYPE[+QUANT] as in bench decode "
                   f"(default: {default_paths()}); each is compared with float32")
    p.add_argument("--steps", type=int, default=200, help="teacher-forced decode steps on real-size weights")
    p.add_argument("--checkpoint", default=None, help="real-size Mini-Omni dir (default: $OMNIFLOW_HOME/miniomni)")
    p.add_argument("--skip-real", action="store_true", help="skip part 1 (real-size weights)")
    p.add_argument("--trained", type=Path, default=None,
                   help="directory made by --make-trained: compare greedy answers on its trained checkpoint")
    p.add_argument("--make-trained", type=Path, default=None,
                   help="build a trained espeak checkpoint in this directory first (then as --trained)")
    p.add_argument("--sentences", type=int, default=8, help="espeak sentences for --make-trained")
    p.add_argument("--train-steps", type=int, default=300, help="training steps for --make-trained")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer steps per trained sample")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [parse_path(t) for t in (args.paths or default_paths()).split(",")]
    print(f"quality vs float32: device {args.device}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    report = {"device": args.device}
    if not args.skip_real:
        report["real_size"] = real_size(paths, args.steps, args.device, args.checkpoint)
    root = args.trained
    if args.make_trained is not None:
        t0 = time.perf_counter()
        root = make_trained(args.make_trained, args.sentences, args.train_steps)
        print(f"\n(trained {TRAINED_TRUNK} for {args.train_steps} steps on {args.sentences} espeak sentences "
              f"in {time.perf_counter() - t0:.0f} s)")
    if root is not None:
        report["trained"] = {"dir": str(root), "rows": trained(paths, root, args.device, args.max_new_tokens)}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
