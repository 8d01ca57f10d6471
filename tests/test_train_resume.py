"""Exact resume: 20 steps straight == 10 steps, stop, resume, 10 steps; checkpoints load unchanged."""
import json

import numpy as np
import pytest
import torch

from omniflow.model.checkpoint import load_model
from train.config import load_stage_config
from train.trainer import train
from train.testing import write_model, write_synthetic_cache

DIM = 8
RNG = np.random.default_rng(1)
SAMPLES = [
    {"task": "ASR", "id": "a", "n_frames": 5, "answer_text": [11, 12, 13]},
    {"task": "A1T2", "id": "b", "n_frames": 3, "answer_text": [21, 22]},
    {"task": "T1A2", "id": "c", "prompt_text": [31, 32], "answer_text": [31, 32], "codes": RNG.integers(0, 4096, (3, 7))},
    {"task": "T1T2", "id": "d", "prompt_text": [41], "answer_text": [42, 43, 44]},
    {"task": "A1A2", "id": "e", "n_frames": 4, "answer_text": [51], "codes": RNG.integers(0, 4096, (2, 7))},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    init = write_model(root / "init", DIM, n_embd=16, head_size=4)
    write_synthetic_cache(root / "cache", SAMPLES, DIM)
    # 2 micro-batches of 2 per step over 5 samples: the order crosses epoch boundaries.
    cfg = load_stage_config("stage3", dict(max_steps=20, lr_max=3e-3, warmup_steps=3, micro_batch_size=2,
                                           grad_accum=2, num_workers=0, save_every=20))
    return root, init, cfg


def losses(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_resume_gives_the_same_curve_and_weights(setup):
    root, init, cfg = setup
    straight = train(cfg, [root / "cache"], root / "straight", init=init, progress=False)
    first = train(cfg, [root / "cache"], root / "resumed", init=init, progress=False, stop_after=10)
    assert first.name == "step-000010"
    # the second half loads data in 2 worker processes: prefetching must not change the order
    with_workers = load_stage_config("stage3", {**cfg.to_dict(), "num_workers": 2})
    resumed = train(with_workers, [root / "cache"], root / "resumed", resume="auto", progress=False)
    assert resumed.name == "step-000020"

    a, b = losses(root / "straight"), losses(root / "resumed")
    assert [r["step"] for r in b] == list(range(1, 21))
    for ra, rb in zip(a, b):
        assert ra["samples"] == rb["samples"] and ra["lr"] == pytest.approx(rb["lr"], rel=1e-12)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-7), ra["step"]
    assert a[-1]["loss"] < a[0]["loss"]

    wa, _ = load_model(straight)
    wb, _ = load_model(resumed)
    for (name, pa), (_, pb) in zip(wa.state_dict().items(), wb.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=name)


def test_resume_refuses_changed_config_or_data(setup):
    root, init, cfg = setup
    train(cfg, [root / "cache"], root / "short", init=init, progress=False, stop_after=1)
    changed = load_stage_config("stage3", {**cfg.to_dict(), "lr_max": 1e-4, "stage": "stage3"})
    with pytest.raises(ValueError, match=r"config changed \(lr_max"):
        train(changed, [root / "cache"], root / "short", resume="auto", progress=False)
    write_synthetic_cache(root / "other", SAMPLES[:3], DIM)
    with pytest.raises(ValueError, match="training data changed"):
        train(cfg, [root / "other"], root / "short", resume="auto", progress=False)


def test_checkpoint_is_the_official_format_with_tokenizer(setup, tmp_path):
    root, init, cfg = setup
    (init / "tokenizer.json").write_text("{}")       # copied along so the graph finds it
    short = load_stage_config("stage1", dict(max_steps=1, warmup_steps=0, micro_batch_size=2, grad_accum=1, num_workers=0))
    ckpt = train(short, [root / "cache"], tmp_path / "run", init=init, progress=False)
    state = torch.load(ckpt / "lit_model.pth", weights_only=True)
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    assert (ckpt / "model_config.yaml").exists() and (ckpt / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "run" / "latest").read_text().strip() == ckpt.name
    (init / "tokenizer.json").unlink()


def test_bf16_autocast_trains(setup, tmp_path):
    """The GPU default (bf16 autocast, fp32 master weights) also runs on CPU when asked for."""
    root, init, cfg = setup
    bf16 = load_stage_config("stage3", {**cfg.to_dict(), "precision": "bf16", "max_steps": 2, "warmup_steps": 0})
    ckpt = train(bf16, [root / "cache"], tmp_path / "run", init=init, progress=False)
    model, _ = load_model(ckpt)
    assert model.transformer.wte.weight.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    log = losses(tmp_path / "run")
    assert len(log) == 2 and all(r["loss"] == r["loss"] for r in log)
