"""Training and inference agree: a tiny model trained on a few samples then generates exactly the
training answers through the ordinary decode path (`omniflow.model.engine.Engine`, greedy)."""
import numpy as np
import pytest
import torch

from omniflow.model.checkpoint import load_model
from omniflow.model.delay import undelay
from omniflow.model.engine import Engine
from omniflow.model.generate import answer
from omniflow.model.sampling import Sampling
from train.config import load_stage_config
from train.data.cache import SampleCache
from train.trainer import train
from train.testing import write_model, write_synthetic_cache

FEATURE_DIM = 16
RNG = np.random.default_rng(0)
SAMPLES = [
    {"task": "ASR", "id": "asr", "n_frames": 6, "answer_text": [9707, 1879, 13]},            # "Hello world."
    {"task": "A1T2", "id": "a1t2", "n_frames": 5, "answer_text": [40, 1079, 6915, 11, 9702]},
    {"task": "T1A2", "id": "tts", "prompt_text": [9707, 1879], "answer_text": [9707, 1879],
     "codes": RNG.integers(0, 4096, (4, 7))},
]
EXTRA = [   # the slow variant adds speech-to-speech and a second sample per text task
    {"task": "A1A2", "id": "a1a2", "n_frames": 7, "answer_text": [2585, 525], "codes": RNG.integers(0, 4096, (3, 7))},
    {"task": "ASR", "id": "asr2", "n_frames": 4, "answer_text": [5050, 11, 1052, 0]},
]


def overfit(tmp_path, samples, steps):
    init = write_model(tmp_path / "init", FEATURE_DIM)
    write_synthetic_cache(tmp_path / "cache", samples, FEATURE_DIM)
    cfg = load_stage_config("stage3", dict(
        max_steps=steps, lr_max=1e-2, lr_min=1e-3, warmup_steps=0, weight_decay=0.0,
        micro_batch_size=len(samples), grad_accum=1, num_workers=0, save_every=steps))
    last = train(cfg, [tmp_path / "cache"], tmp_path / "run", init=init, progress=False)
    model, _ = load_model(last)                  # the checkpoint as written, loaded the ordinary way
    return model, SampleCache(tmp_path / "cache")


def generate(engine, model, rec):
    greedy = Sampling(top_k=1)
    with torch.no_grad():
        embeds = model.adapt(rec["features"]) if rec["features"] is not None else None
    if rec["task"] in ("ASR", "A1T2"):
        return answer(engine, rec["task"], embeds=embeds, sampling=greedy, max_new_tokens=32)
    task = "A1A2_SINGLE" if rec["task"] == "A1A2" else rec["task"]
    kwargs = {"embeds": embeds} if embeds is not None else {"text_ids": rec["prompt_text"].tolist()}
    return answer(engine, task, sampling=greedy, max_new_tokens=32, **kwargs)


def check_answers(model, data):
    engine = Engine(model, max_sessions=2)
    for rec in data:
        out = generate(engine, model, rec)
        if rec["task"] in ("ASR", "A1T2"):
            assert out == rec["answer_text"].tolist(), rec["id"]
        else:
            frames = undelay(np.array(out[:7]).T)                              # (F, 7)
            np.testing.assert_array_equal(frames, rec["codes"].numpy(), err_msg=rec["id"])
            text = out[7][:out[7].index(151936)] if 151936 in out[7] else out[7]
            assert text == rec["answer_text"].tolist(), rec["id"]


def test_overfit_asr_a1t2_tts_then_generate_exactly(tmp_path):
    model, data = overfit(tmp_path, SAMPLES, steps=100)
    check_answers(model, data)


@pytest.mark.slow
def test_overfit_all_speaking_tasks_longer(tmp_path):
    model, data = overfit(tmp_path, SAMPLES + EXTRA, steps=300)
    check_answers(model, data)
