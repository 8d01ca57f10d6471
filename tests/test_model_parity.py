"""`python -m omniflow.model.parity DIR`: the golden outputs of the original, and any DIR in that format."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from omniflow.model import parity
from omniflow.model import tokens as tk
from omniflow.model.checkpoint import save_checkpoint
from omniflow.model.config import Config
from omniflow.model.gpt import MiniOmni
from omniflow.model.prompts import TASKS, build_input_ids, decode_feedback

from golden import GOLDEN
ROOT = Path(__file__).resolve().parents[1]


def test_parity_command_on_golden():
    run = subprocess.run([sys.executable, "-m", "omniflow.model.parity", str(GOLDEN)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    for case in ("a1a2_batch", "a1a2", "a1t2", "asr", "t1a2", "t1t2"):
        assert any(line.startswith(f"{case} ok 40/40 steps") for line in lines), run.stdout


def test_a_changed_golden_token_is_reported(tmp_path, capsys):
    root = tmp_path / "golden"
    shutil.copytree(GOLDEN, root)
    cases = json.loads((root / "cases.json").read_text())
    cases["cases"]["a1a2_batch"]["output"][3][17] += 1  # audio layer 3, step 17
    cases["cases"]["t1t2"]["output"] = cases["cases"]["t1t2"]["output"][:-1]  # one step short
    (root / "cases.json").write_text(json.dumps(cases))
    assert parity.main([str(root)]) == 1
    out = capsys.readouterr().out
    original = cases["cases"]["a1a2_batch"]["output"][3][17]
    assert f"a1a2_batch MISMATCH step 17 stream 3 (audio3): ours {original - 1} original {original}" in out
    assert "t1t2 MISMATCH step 39 stream 7 (text)" in out
    assert "a1t2 ok 40/40" in out


def last_logits(model, ids, embeds, lens):
    """Logits (R, V) at the last position of the no-cache full forward."""
    with torch.inference_mode():
        hidden, _ = model(ids, embeds, lens, return_kv=True)  # (R, S, C)
        return model.lm_head(hidden[:, -1])


def reference_loop(model, fn, input_ids, embeds, lens, max_returned):
    """The original generate_* loop, recomputing the whole sequence (no KV cache) every step."""
    task = parity.TASK_OF_FUNCTION[fn]
    spec = TASKS[task]
    S = input_ids.size(-1)
    ids, steps, text_end = input_ids, [], False
    for step in range(max_returned - S):
        logits = last_logits(model, ids, embeds, lens)  # (R, V)
        text_l, audio_l = model.split_logits(logits)
        text = int(text_l[spec.text_row].argmax())
        audio = audio_l[spec.audio_row].argmax(-1).tolist() if spec.audio_out else [tk.PAD_A] * 7
        if step > 0:
            if spec.audio_out:
                text = tk.PAD_T if text_end else text
                if audio[-1] == tk.EOA:
                    break
                text_end = text_end or text == tk.EOT
            elif text == tk.EOT:
                break
        steps.append(audio + [text])
        ids = torch.cat([ids, decode_feedback(spec, audio, text)[:, :, None]], dim=2)
    if spec.audio_out:
        return [[s[i] for s in steps] for i in range(8)]
    return [s[7] for s in steps]


def write_case_dir(root: Path, cfg: Config, frames=6, text=(5, 77, 901), max_returned=20):
    """A directory in the golden format for another model size, outputs from `reference_loop`."""
    torch.manual_seed(1)
    model = MiniOmni(cfg).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.attn.weight.mul_(4.0)
    save_checkpoint(model, cfg, root / "checkpoint")
    rng = np.random.default_rng(0)
    probes = {str(s): rng.integers(0, tk.TEXT_VOCAB if s == 7 else tk.AUDIO_VOCAB, 16).tolist() for s in range(8)}
    cases = {}
    for name, task in TASKS.items():
        R = len(task.rows)
        ids = build_input_ids(name, frames if task.audio_in else None, None if task.audio_in else list(text))
        embeds = lens = None
        if task.audio_in:
            feats = np.repeat(rng.standard_normal((1, frames, cfg.whisper_adapter_dim), dtype=np.float32), R, 0)
            np.save(root / f"features_{name}.npy", feats)
            with torch.inference_mode():
                embeds = model.adapt(torch.from_numpy(feats))
            lens = [frames] * R
        text_l, audio_l = model.split_logits(last_logits(model, ids, embeds, lens))
        probe = np.stack([(text_l if s == 7 else audio_l[:, s])[:, probes[str(s)]].numpy() for s in range(8)], 1)
        np.save(root / f"prefill_logits_{name}.npy", probe)
        cases[name] = dict(fn=task.original, task=list(task.rows), whisper_lens=lens, with_audio=task.audio_in,
                           input_ids=ids.permute(1, 0, 2).tolist(), max_returned_tokens=max_returned,
                           output=reference_loop(model, task.original, ids, embeds, lens, max_returned))
    (root / "cases.json").write_text(json.dumps(dict(cases=cases, prefill_probe_indices=probes)))


@pytest.mark.parametrize("shape", [
    dict(n_layer=3, n_embd=24, n_head=6, n_query_groups=3, head_size=8, intermediate_size=40),
    dict(n_layer=1, n_embd=16, n_head=4, n_query_groups=1, head_size=4, intermediate_size=32, rotary_percentage=0.5),
])
def test_parity_works_for_other_sizes(tmp_path, shape):
    write_case_dir(tmp_path, Config(block_size=48, **shape))
    results = parity.run(tmp_path)
    assert [r.name for r in results] == list(TASKS)
    assert all(r.ok for r in results), [r.line for r in results]


@pytest.mark.slow
def test_parity_with_the_compiled_decode_step():
    assert parity.main([str(GOLDEN), "--compile"]) == 0
