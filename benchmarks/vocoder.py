"""`omniflow bench vocoder`: CPU cost per SNAC frame of each way to stream, and stream-vs-whole error.

Candidates (same run, interleaved rounds, medians of process CPU time, so other load on the
machine inflates them less than wall time; ratios vs the first row):

  whole+ctx2 torch   the previous vocoder: each 4-frame chunk re-decoded with 2 frames of left
                     context by snac's own decode (weight norm recomputed every call)
  whole+ctx2 onnx    the same on onnxruntime (the `snac` export)
  stream torch       omniflow.model.snac_stream: conv state kept, each frame decoded once
  stream onnx        the same network exported to ONNX (the `snac_stream` export)
  stream onnx 1f     the stream fed one frame per call (chunk_frames: 1)
  +speculate         stream torch plus one speculative tail per chunk (speculate: always)

Error: a streamed turn (chunks 1 + 4 + 4 ...) vs snac's whole-turn decode of the same frames,
with speculate first / always: relative RMS over all samples and max |error| outside the
speculated tails.

    omniflow bench vocoder [--checkpoint DIR] [--threads 1,2] [--frames 40] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def _median_cpu(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()                                                     # warm-up
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            times[k].append(time.process_time() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="omniflow bench vocoder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="SNAC dir (default: $OMNIFLOW_HOME's snac, e.g. real-size demo weights)")
    ap.add_argument("--threads", default="1", help="comma-separated torch/onnxruntime thread counts (default 1)")
    ap.add_argument("--frames", type=int, default=25, help="frames in the error measurement (default 25)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime candidates")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    import torch

    from omniflow.model import weights
    from omniflow.model.ort import session
    from omniflow.model.snac_stream import (SAMPLES_PER_FRAME, SnacDecoder, TurnStream, frames_to_codes,
                                            load_snac, make_stream)

    path = weights.resolve("snac", args.checkpoint)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 4096, (max(args.frames, 12), 7))
    report = {"checkpoint": str(path), "timing": {}, "error": {}}
    tmp = tempfile.mkdtemp()
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        whole = SnacDecoder(load_snac(path), noise="off")
        streams = {"stream torch": make_stream(load_snac(path), noise="off", speculate="first")}
        spec = make_stream(load_snac(path), noise="off", speculate="always")
        fns = {"whole+ctx2 torch": lambda: whole.decode(frames[:6])}
        if not args.no_onnx:
            from omniflow.model.onnx_export import export_snac_decoder
            onnx_whole = session(export_snac_decoder(load_snac(path), f"{tmp}/snac.onnx"), "cpu", threads)

            def ort_whole():
                codes = frames_to_codes(frames[:6])
                onnx_whole.run(None, {f"codes_{i}": c for i, c in enumerate(codes)})
            fns["whole+ctx2 onnx"] = ort_whole
            streams["stream onnx"] = make_stream(load_snac(path), runtime="onnx", noise="off", speculate="first",
                                                 threads=threads, cache_dir=tmp)
        states = {k: TurnStream(turn=0) for k in streams}
        for k, st in streams.items():
            fns[k] = lambda st=st, s=states[k]: st.push_frames(s, frames[4:8], last=False)
        if "stream onnx" in streams:
            s1 = TurnStream(turn=0)
            fns["stream onnx 1f"] = lambda: [streams["stream onnx"].push_frames(s1, frames[4 + i:5 + i], last=False)
                                             for i in range(4)]
        ss = TurnStream(turn=0)
        fns["stream torch +speculate"] = lambda: spec.push_frames(ss, frames[4:8], last=False)
        cpu = _median_cpu(fns, args.rounds)
        base = cpu["whole+ctx2 torch"]
        print(f"\nthreads={threads}: CPU per 4-frame chunk (341 ms of audio), median of {args.rounds} "
              "interleaved rounds")
        for k, v in cpu.items():
            print(f"  {k:26s} {v * 1000:7.1f} ms  {v * 250:6.1f} ms/frame  x{base / v:4.2f} vs whole+ctx2 torch")
        report["timing"][threads] = {k: v / 4 for k, v in cpu.items()}

    ref = SnacDecoder(load_snac(path), noise="fixed").decode(frames)
    rms = float(np.sqrt(np.mean(ref ** 2)))
    chunks = [1] + [4] * ((len(frames) - 1) // 4)
    chunks[-1] += len(frames) - sum(chunks)
    print(f"\nstream vs whole decode, {len(frames)} frames in chunks {chunks[:3]}..., noise fixed "
          f"(whole-decode RMS {rms:.4f}):")
    for mode in ("first", "always"):
        st = make_stream(load_snac(path), noise="fixed", speculate=mode)
        s, out, i = TurnStream(turn=0), [], 0
        for k, n in enumerate(chunks):
            out.append(st.push_frames(s, frames[i:i + n], last=k == len(chunks) - 1))
            i += n
        out = np.concatenate(out)
        spec = np.zeros(len(ref), bool)
        ends = [SAMPLES_PER_FRAME] if mode == "first" else list(np.cumsum(chunks)[:-1] * SAMPLES_PER_FRAME)
        for e in ends:
            spec[max(0, e - st.lag):e + st.crossfade] = True
        err = out - ref
        row = {"relative_rms": float(np.sqrt(np.mean(err ** 2)) / rms),
               "speculated_relative_rms": float(np.sqrt(np.mean(err[spec] ** 2)) / rms),
               "max_abs_exact": float(np.abs(err[~spec]).max()), "speculated_samples": int(spec.sum())}
        report["error"][mode] = row
        print(f"  speculate={mode:6s} relative RMS {row['relative_rms']:.4f} (speculated samples "
              f"{row['speculated_relative_rms']:.4f}); max |err| elsewhere {row['max_abs_exact']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
