"""DDP (torchrun, 2 CPU processes on gloo) makes the same update as 1 process on the same global batch."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

from omniflow.model.checkpoint import load_model
from train.testing import write_model, write_synthetic_cache
from train.trainer import resolve_checkpoint

DIM = 8
RNG = np.random.default_rng(2)
SAMPLES = [   # mixed tasks and lengths: the processes see different token counts
    {"task": "ASR", "id": "a", "n_frames": 5, "answer_text": [11, 12, 13]},
    {"task": "T1T2", "id": "b", "prompt_text": [21], "answer_text": [22]},
    {"task": "T1A2", "id": "c", "prompt_text": [31, 32], "answer_text": [31, 32], "codes": RNG.integers(0, 4096, (3, 7))},
    {"task": "A1A2", "id": "d", "n_frames": 2, "answer_text": [41, 42, 43, 44], "codes": RNG.integers(0, 4096, (2, 7))},
]


def run_cli(args, nproc):
    launcher = [sys.executable, "-m", "train.cli"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "train.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launcher + args, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_gloo_processes_equal_one_process(tmp_path):
    init = write_model(tmp_path / "init", DIM, n_embd=16, head_size=4)
    write_synthetic_cache(tmp_path / "cache", SAMPLES, DIM)
    common = ["stage3", "--data", str(tmp_path / "cache"), "--init", str(init), "--max-steps", "3",
              "--warmup-steps", "0", "--lr-max", "1e-3", "--grad-accum", "1", "--num-workers", "0",
              "--device", "cpu", "--no-progress"]
    run_cli(common + ["--out", str(tmp_path / "one"), "--micro-batch-size", "4"], nproc=1)
    run_cli(common + ["--out", str(tmp_path / "two"), "--micro-batch-size", "2"], nproc=2)

    log1 = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    log2 = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in log2] == [4, 8, 12], "global batch = 2 processes x 2 samples"
    for a, b in zip(log1, log2):
        assert a["loss_tokens"] == b["loss_tokens"]
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * a["grad_norm"]
    one, _ = load_model(resolve_checkpoint(tmp_path / "one"))
    two, _ = load_model(resolve_checkpoint(tmp_path / "two"))
    init_model, _ = load_model(init)
    for (name, p1), p2, p0 in zip(one.state_dict().items(), two.state_dict().values(),
                                  init_model.state_dict().values()):
        torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(one.transformer.h[0].attn.attn.weight, init_model.transformer.h[0].attn.attn.weight)
