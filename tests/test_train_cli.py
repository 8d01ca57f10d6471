"""`omniflow train …`: typed stage configs, command-line overrides, clear errors, starting points."""
import math

import pytest
import torch

from omniflow.cli import build_parser, main as omniflow
from omniflow.model.checkpoint import load_model
from train.config import CONFIG_DIR, STAGES, load_stage_config
from train.testing import write_synthetic_cache
from train.trainer import lr_at, resolve_checkpoint


def test_train_command_lists_every_stage(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["omniflow", "train", "--help"])
    with pytest.raises(SystemExit):
        build_parser().parse_args()
    out = capsys.readouterr().out
    assert all(s in out for s in (*STAGES, "preprocess"))


def test_builtin_stages_follow_the_paper():
    cfg = {s: load_stage_config(s) for s in STAGES}
    assert (cfg["stage1"].lr_min, cfg["stage1"].lr_max) == (4e-6, 1e-3)
    assert cfg["stage2"].lr_max == cfg["stage3"].lr_max == 4e-4 and cfg["final"].lr_max == 5e-5
    assert cfg["stage1"].trainable == ["adapter", "embedding_audio_rows"]
    assert cfg["stage2"].trainable == ["trunk"], "stage 2 keeps the adapter frozen"
    assert not {"A1A2", "T1A2"} & set(cfg["stage2"].tasks), "stage 2 has no audio output"
    assert set(cfg["stage3"].tasks) == {"ASR", "A1T2", "A1A2", "T1A2", "T1T2"}
    assert all(c.micro_batch_size * c.grad_accum == 192 for c in cfg.values()), "the paper's batch"


def test_cosine_schedule_with_warmup():
    cfg = load_stage_config("stage1", {"max_steps": 100, "warmup_steps": 10})
    assert lr_at(0, cfg) == cfg.lr_min and lr_at(10, cfg) == cfg.lr_max
    assert lr_at(100, cfg) == pytest.approx(cfg.lr_min)
    assert lr_at(55, cfg) == pytest.approx((cfg.lr_min + cfg.lr_max) / 2)
    after = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert not any(math.isnan(x) for x in after)


def test_overrides_are_typed(monkeypatch):
    monkeypatch.setattr("sys.argv", ["omniflow", "train", "stage3", "--data", "d", "--out", "o",
                                     "--lr-max", "2e-4", "--tasks", "ASR,T1A2", "--betas", "0.9,0.99",
                                     "--tts-text-loss", "false", "--grad-accum", "3"])
    args = build_parser().parse_args()
    from train.config import overrides_from_args
    cfg = load_stage_config("stage3", overrides_from_args(args))
    assert (cfg.lr_max, cfg.tasks, cfg.betas, cfg.tts_text_loss, cfg.grad_accum) == \
        (2e-4, ["ASR", "T1A2"], (0.9, 0.99), False, 3)
    with pytest.raises(ValueError, match="Expected `int`"):
        load_stage_config("stage3", {"grad_accum": "three"})


def test_unknown_or_bad_config_keys_are_errors(tmp_path):
    path = tmp_path / "stage1.yaml"
    path.write_text((CONFIG_DIR / "stage1.yaml").read_text() + "lr_maxx: 1\n")
    with pytest.raises(ValueError, match=r"unknown field `lr_maxx`.*known keys: stage, description"):
        load_stage_config(path)
    with pytest.raises(ValueError, match="trainable .* must be a non-empty subset"):
        load_stage_config("stage1", {"trainable": ["everything"]})
    with pytest.raises(ValueError, match="lr_min"):
        load_stage_config("stage1", {"lr_min": 1.0})


def test_training_needs_a_starting_point(tmp_path, capsys):
    write_synthetic_cache(tmp_path / "cache", [{"task": "T1T2", "id": "a", "prompt_text": [1],
                                                "answer_text": [2]}], 8)
    assert omniflow(["train", "stage2", "--data", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                     "--max-steps", "1", "--warmup-steps", "0", "--no-progress"]) == 1
    assert "nothing to start from: pass --init" in capsys.readouterr().err     # one line, no traceback
    assert omniflow(["train", "stage2", "--data", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                     "--init", str(tmp_path), "--max-steps", "1", "--warmup-steps", "0", "--no-progress"]) == 1
    assert "no lit_model.pth" in capsys.readouterr().err


def test_a_hugging_face_qwen2_starts_stage1(tmp_path):
    """"Any model can talk": a HF Qwen2 directory is converted, then trained like any checkpoint."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True))
    hf.save_pretrained(tmp_path / "qwen2")
    # the conversion builds a whisper-small-sized adapter (768 features per frame)
    write_synthetic_cache(tmp_path / "cache", [{"task": "ASR", "id": "a", "n_frames": 3, "answer_text": [5, 6]}], 768)
    assert omniflow(["train", "stage1", "--data", str(tmp_path / "cache"), "--init", str(tmp_path / "qwen2"),
                     "--out", str(tmp_path / "run"), "--max-steps", "1", "--warmup-steps", "0",
                     "--micro-batch-size", "1", "--grad-accum", "1", "--num-workers", "0", "--no-progress"]) == 0
    model, cfg = load_model(resolve_checkpoint(tmp_path / "run"))
    assert (cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size) == (16, 1, 181120)
    text_rows = hf.model.embed_tokens.weight.detach()
    assert torch.equal(model.transformer.wte.weight[:64], text_rows), "stage 1 keeps the LM's text rows"


def test_a_stage_config_file_must_match_the_command(tmp_path):
    with pytest.raises(SystemExit, match="is a stage2 config, not stage1"):
        omniflow(["train", "stage1", "--data", "x", "--out", str(tmp_path), "--config",
                  str(CONFIG_DIR / "stage2.yaml")])
