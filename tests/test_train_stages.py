"""Each stage, run by its command on a small real speech set (espeak-ng), trains exactly the
parameters it should and lowers its loss; each stage starts from the previous one's checkpoint."""
import json

import pytest
import torch

from omniflow.cli import main as omniflow
from omniflow.model.checkpoint import load_model
from omniflow.model.tokens import TEXT_VOCAB
from train.config import load_stage_config
from train.data.cache import SampleCache
from train.data.make_espeak_set import espeak_available, make_espeak_set
from train.loss import OmniLoss
from train.sequence import LossPolicy, collate
from train.testing import write_model, write_snac, write_whisper
from train.trainer import resolve_checkpoint

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed (apt-get install espeak-ng)")
STAGES = ["stage1", "stage2", "stage3", "final"]


@pytest.fixture(scope="module")
def espeak(tmp_path_factory):
    """4 spoken sentences -> a preprocessed cache with every task, plus a tiny initial model."""
    root = tmp_path_factory.mktemp("espeak")
    manifest = make_espeak_set(root / "speech", count=4, tasks=("ASR", "T1A2", "A1T2", "A1A2", "T1T2"))
    whisper, dim = write_whisper(root / "whisper")
    snac = write_snac(root / "snac")
    init = write_model(root / "init", dim)
    assert omniflow(["train", "preprocess", "--source", str(manifest), "--out", str(root / "cache"),
                     "--tokenizer", str(init), "--whisper", str(whisper), "--snac", str(snac),
                     "--no-progress"]) == 0
    return root, init


def snapshot(ckpt):
    model, _ = load_model(ckpt)
    return {k: v.clone() for k, v in model.state_dict().items()}


def eval_loss(ckpt, cache, stage):
    """Mean CE per loss token of the stage's objective over all its samples."""
    cfg = load_stage_config(stage)
    model, _ = load_model(ckpt)
    data = SampleCache(cache, tasks=cfg.tasks)
    batch = collate([data[i] for i in range(len(data))], LossPolicy.default(cfg.tts_text_loss))
    with torch.no_grad():
        loss, _, _ = OmniLoss(model)(batch.input_ids, batch.targets, batch.loss_mask, batch.features,
                                     batch.whisper_lens, scale=1.0 / batch.n_loss_tokens)
    return float(loss)


def changed(before, after, prefix):
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


def test_stages_train_their_parameters_and_lower_their_loss(espeak):
    root, init = espeak
    assert len(SampleCache(root / "cache")) == 20
    start = init
    for stage in STAGES:
        run = root / stage
        before = snapshot(resolve_checkpoint(start))
        loss_before = eval_loss(resolve_checkpoint(start), root / "cache", stage)
        assert omniflow(["train", stage, "--data", str(root / "cache"), "--init", str(start), "--out", str(run),
                         "--max-steps", "5", "--warmup-steps", "0", "--lr-max", "3e-3", "--micro-batch-size", "4",
                         "--grad-accum", "1", "--num-workers", "0", "--device", "cpu", "--no-progress"]) == 0
        ckpt = resolve_checkpoint(run)
        after = snapshot(ckpt)
        loss_after = eval_loss(ckpt, root / "cache", stage)
        assert loss_after < loss_before, f"{stage}: loss {loss_before:.3f} -> {loss_after:.3f}"
        log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        assert len(log) == 5 and all(k in log[0] for k in ["text", "audio_0", "audio_6", "lr", "grad_norm"])

        wte_b, wte_a = before["transformer.wte.weight"], after["transformer.wte.weight"]
        if stage == "stage1":
            assert changed(before, after, "whisper_adapter.")
            assert torch.equal(wte_a[:TEXT_VOCAB], wte_b[:TEXT_VOCAB]), "stage 1 touched text embedding rows"
            assert not torch.equal(wte_a[TEXT_VOCAB:], wte_b[TEXT_VOCAB:])
            assert not changed(before, after, "transformer.h.") and not changed(before, after, "transformer.ln_f")
        elif stage == "stage2":
            assert not changed(before, after, "whisper_adapter."), "stage 2 must keep the adapter frozen"
            assert changed(before, after, "transformer.h.") and not torch.equal(wte_a, wte_b)
        else:
            assert changed(before, after, "whisper_adapter.") and changed(before, after, "transformer.h.")
        assert torch.equal(after["lm_head.weight"], after["transformer.wte.weight"]), "the head stays tied"
        start = run                                   # the next stage starts from this run's checkpoint
