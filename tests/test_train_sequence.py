"""Sequence builder: the training layout is the one the decoder reads (REFERENCE.md §3, §4)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omniflow.model import tokens as tk
from omniflow.model.delay import Undelayer, undelay
from omniflow.model.prompts import build_input_ids
from train.loss import OmniLoss
from train.sequence import LossPolicy, build_sequence, collate, sequence_length, shift_audio
from train.testing import init_model, model_config

from golden import GOLDEN as GOLDEN_DIR

GOLDEN = GOLDEN_DIR / "cases.json"
RNG = np.random.default_rng(0)
CODES = RNG.integers(0, tk.AUDIO_CODEBOOK, size=(5, 7))           # (F, 7) real SNAC codes
TEXT = [9707, 1879, 13, 40, 1079]                                  # "Hello world. I am"
PROMPT = [3838, 374, 279]
T_FRAMES = 6

SAMPLES = {   # task -> build_sequence kwargs
    "ASR": dict(n_audio_frames=T_FRAMES),
    "A1T2": dict(n_audio_frames=T_FRAMES),
    "A1A2": dict(n_audio_frames=T_FRAMES, codes=CODES),
    "T1A2": dict(prompt_text=PROMPT, codes=CODES),
    "T1T2": dict(prompt_text=PROMPT),
}
SPEAKS = {"A1A2", "T1A2"}


def decode_like_the_engine(task: str, steps: torch.Tensor):
    """Feed answer steps (8, N) through the decoder's stop rules (REFERENCE.md §4.2, as
    omniflow.model.engine applies them) -> (kept text ids, frames by Undelayer, frames by undelay)."""
    kept, text_end = [], False
    for s in range(steps.shape[1]):
        audio, text = steps[:7, s].tolist(), int(steps[7, s])
        if s > 0:                                   # the prefill step is kept unchecked
            if task in SPEAKS:
                if text_end:
                    text = tk.PAD_T
                if audio[-1] == tk.EOA:
                    break                           # layer 6 ended: this step is not kept
                if text == tk.EOT:
                    text_end = True
            elif text == tk.EOT:
                break
        kept.append((audio, text))
    text_ids = [t for _, t in kept]
    streaming, und = [], Undelayer()
    for audio, _ in kept:
        streaming.extend(und.push(audio).tolist())
    whole = undelay(np.array([a for a, _ in kept]))
    return text_ids, np.array(streaming).reshape(-1, 7), whole


def answer_text(text_ids):
    """What a user reads: cut at the first _eot, drop forced _pad_t."""
    if tk.EOT in text_ids:
        text_ids = text_ids[:text_ids.index(tk.EOT)]
    return [t for t in text_ids if t != tk.PAD_T]


@pytest.mark.parametrize("task", list(SAMPLES))
def test_targets_decode_back_to_the_sample(task):
    seq = build_sequence(task, TEXT, **SAMPLES[task])
    text_ids, streamed, whole = decode_like_the_engine(task, seq.answer_targets)
    assert answer_text(text_ids) == TEXT
    if task in SPEAKS:
        np.testing.assert_array_equal(streamed, CODES)
        np.testing.assert_array_equal(whole, CODES)
    else:
        assert len(whole) == 0 and all(t == tk.PAD_A for t in seq.answer_targets[:7].flatten().tolist())


@pytest.mark.parametrize("task", list(SAMPLES))
def test_each_target_is_the_next_input(task):
    """Teacher forcing: what the model must emit at position p is what it is fed at p + 1."""
    seq = build_sequence(task, TEXT, **SAMPLES[task])
    p = seq.prompt_len
    fed = seq.input_ids[:, p:]                                     # answer steps 0..N-2, shifted
    assert torch.equal(fed, shift_audio(seq.answer_targets[:, :-1]))
    assert seq.input_ids.shape == seq.targets.shape == seq.loss_mask.shape
    assert seq.input_ids.shape[1] == p + seq.answer_len - 1


@pytest.mark.parametrize("task", list(SAMPLES))
def test_prompt_is_the_inference_prompt(task):
    seq = build_sequence(task, TEXT, **SAMPLES[task])
    name = "A1A2_SINGLE" if task == "A1A2" else task
    want = build_input_ids(name, SAMPLES[task].get("n_audio_frames"), SAMPLES[task].get("prompt_text"))[0]
    assert torch.equal(seq.input_ids[:, :seq.prompt_len], want)


@pytest.mark.skipif(not GOLDEN.exists(), reason=f"golden data not found at {GOLDEN}")
def test_prompt_equals_the_original_codes_input_ids():
    cases = json.loads(GOLDEN.read_text())
    T, L = cases["frames"], cases["text_prompt_ids"]
    for case, row, task in [("a1a2_batch", 0, "A1A2"), ("a1t2", 0, "A1T2"), ("asr", 0, "ASR"),
                            ("t1a2", 0, "T1A2"), ("t1t2", 0, "T1T2")]:
        gold = torch.tensor(cases["cases"][case]["input_ids"])[:, row]     # (8, S)
        seq = build_sequence(task, TEXT, n_audio_frames=T if task[0] == "A" or task == "ASR" else None,
                             prompt_text=L if task[0] == "T" else None,
                             codes=CODES if task in SPEAKS else None)
        assert torch.equal(seq.input_ids[:, :seq.prompt_len], gold), case


def test_loss_masks_follow_the_task():
    n_text = len(TEXT) + 1                                         # answer text + _eot
    n_audio = len(CODES) + max(tk.DELAYS) + 1                      # delay layout up to layer-6 _eoa
    for task, kwargs in SAMPLES.items():
        seq = build_sequence(task, TEXT, **kwargs)
        p = seq.prompt_len
        assert not seq.loss_mask[:, :p - 1].any(), f"{task}: the prompt carries loss"
        text_loss = seq.loss_mask[7, p - 1:]
        audio_loss = seq.loss_mask[:7, p - 1:]
        if task == "T1A2":
            assert not text_loss.any(), "TTS carries no text loss by default"
        else:
            assert text_loss.tolist() == [True] * n_text + [False] * (seq.answer_len - n_text)
        if task in SPEAKS:
            assert audio_loss.all(dim=0).tolist() == [True] * n_audio + [False] * (seq.answer_len - n_audio)
        else:
            assert not audio_loss.any(), f"{task}: a text answer carries audio loss"
    tts = build_sequence("T1A2", TEXT, **SAMPLES["T1A2"], policy=LossPolicy.default(tts_text_loss=True))
    assert tts.loss_mask[7].sum() == n_text


def test_samples_of_all_tasks_share_a_padded_batch():
    records = [
        {"task": "ASR", "answer_text": torch.tensor(TEXT[:2]), "features": torch.randn(4, 8)},
        {"task": "T1A2", "prompt_text": torch.tensor(PROMPT), "answer_text": torch.tensor(TEXT),
         "codes": torch.as_tensor(CODES, dtype=torch.int16)},
        {"task": "A1A2", "answer_text": torch.tensor(TEXT), "features": torch.randn(7, 8),
         "codes": torch.as_tensor(CODES[:2], dtype=torch.int16)},
        {"task": "T1T2", "prompt_text": torch.tensor(PROMPT[:1]), "answer_text": torch.tensor(TEXT[:1])},
    ]
    batch = collate(records)
    assert batch.features.shape == (4, 7, 8) and batch.whisper_lens.tolist() == [4, 0, 7, 0]
    assert torch.equal(batch.features[2], records[2]["features"]) and not batch.features[1].any()
    for i, r in enumerate(records):
        seq = build_sequence(r["task"], r["answer_text"].tolist(),
                             prompt_text=None if "prompt_text" not in r else r["prompt_text"].tolist(),
                             n_audio_frames=None if "features" not in r else len(r["features"]),
                             codes=None if "codes" not in r else r["codes"].numpy())
        n = seq.input_ids.shape[1]
        assert n == sequence_length(r["task"], prompt_text=None if "prompt_text" not in r else len(r["prompt_text"]),
                                    answer_text=len(r["answer_text"]),
                                    features=None if "features" not in r else len(r["features"]),
                                    codes=None if "codes" not in r else len(r["codes"]))
        assert torch.equal(batch.input_ids[i, :, :n], seq.input_ids)
        assert torch.equal(batch.loss_mask[i, :, :n], seq.loss_mask)
        assert not batch.loss_mask[i, :, n:].any(), "padding carries loss"


def test_loss_equals_cross_entropy_of_the_full_logits():
    torch.manual_seed(0)
    model = init_model(model_config(whisper_adapter_dim=8, n_embd=16, head_size=4))
    batch = collate([
        {"task": "A1A2", "answer_text": torch.tensor(TEXT), "features": torch.randn(5, 8),
         "codes": torch.as_tensor(CODES, dtype=torch.int16)},
        {"task": "T1T2", "prompt_text": torch.tensor(PROMPT), "answer_text": torch.tensor(TEXT[:3])},
    ])
    loss, sums, counts = OmniLoss(model)(batch.input_ids, batch.targets, batch.loss_mask, batch.features,
                                         batch.whisper_lens, scale=1.0)
    logits = model(batch.input_ids, model.adapt(batch.features), batch.whisper_lens)   # (B, S, V)
    text_logits, audio_logits = model.split_logits(logits)
    for stream in range(8):
        m = batch.loss_mask[:, stream]                                                 # (B, S)
        lg = text_logits[m] if stream == 7 else audio_logits[:, :, stream][m]
        want = F.cross_entropy(lg, batch.targets[:, stream][m], reduction="sum")
        assert torch.allclose(sums[stream], want, rtol=1e-5), stream
        assert counts[stream] == m.sum()
    assert torch.allclose(loss, sums.sum(), rtol=1e-5)
