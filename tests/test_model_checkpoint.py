"""Config and lit_model.pth: strict official format, round trip, tied head."""

import pytest
import torch
import yaml

from omniflow.model import tokens as tk
from omniflow.model.checkpoint import load_model, save_checkpoint
from omniflow.model.config import Config
from omniflow.model.gpt import MiniOmni
from omniflow.model.prompts import build_input_ids

from golden import GOLDEN


def tiny_config(**kw) -> Config:
    base = dict(block_size=64, n_layer=2, n_embd=32, n_head=4, n_query_groups=2, head_size=8,
                intermediate_size=48)
    return Config(**{**base, **kw})


def test_official_yaml_loads_with_litgpt_field_names():
    cfg = Config.load(GOLDEN / "checkpoint" / "model_config.yaml")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_query_groups, cfg.head_size) == (2, 16, 4, 2, 4)
    assert cfg.padded_vocab_size == tk.PADDED_VOCAB and cfg.block_size == 256
    assert cfg.qkv_size == 32  # (4 query + 2 key + 2 value heads) * 4


def test_unknown_config_key_is_named(tmp_path):
    data = yaml.safe_load((GOLDEN / "checkpoint" / "model_config.yaml").read_text())
    data["n_layers"] = 3  # typo of n_layer
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="n_layers"):
        Config.load(tmp_path)


def test_unsupported_architecture_value_is_named():
    with pytest.raises(ValueError, match="parallel_residual"):
        tiny_config(parallel_residual=True)


def test_config_save_load_round_trip(tmp_path):
    cfg = tiny_config(rope_base=10000)
    assert Config.load(cfg.save(tmp_path)) == cfg


def test_checkpoint_round_trip_gives_same_logits(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = MiniOmni(cfg).eval()
    save_checkpoint(model, cfg, tmp_path)
    state = torch.load(tmp_path / "lit_model.pth", weights_only=True)
    assert "lm_head.weight" in state and "transformer.wte.weight" in state  # both tied keys, as published
    loaded, cfg2 = load_model(tmp_path)
    assert cfg2 == cfg
    ids = build_input_ids("T1A2", text_ids=[11, 22, 33])
    with torch.inference_mode():
        assert torch.equal(model(ids), loaded(ids))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_tied_head_uses_the_embedding_key(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    save_checkpoint(MiniOmni(cfg), cfg, tmp_path)
    state = torch.load(tmp_path / "lit_model.pth", weights_only=True)
    state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])  # the original ignores it
    torch.save(state, tmp_path / "lit_model.pth")
    model, _ = load_model(tmp_path)
    assert torch.equal(model.lm_head.weight, state["transformer.wte.weight"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("transformer.h.1.mlp.fc_2.weight"), "missing keys.*transformer.h.1.mlp.fc_2.weight"),
        (lambda s: s.__setitem__("post_adapter.0.weight", torch.zeros(1)), "unexpected keys.*post_adapter.0.weight"),
        (lambda s: s.__setitem__("transformer.h.0.attn.attn.bias", torch.zeros(7)),
         r"wrong shapes.*transformer.h.0.attn.attn.bias: file \(7,\) vs model \(64,\)"),
    ],
)
def test_strict_loading_lists_the_problem(tmp_path, edit, message):
    torch.manual_seed(0)
    cfg = tiny_config()
    save_checkpoint(MiniOmni(cfg), cfg, tmp_path)
    state = torch.load(tmp_path / "lit_model.pth", weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "lit_model.pth")
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path)


def test_config_of_other_size_is_reported_as_shape_mismatch(tmp_path):
    cfg = tiny_config()
    save_checkpoint(MiniOmni(cfg), cfg, tmp_path)
    tiny_config(n_embd=48, head_size=12).save(tmp_path)  # wrong yaml for these weights
    with pytest.raises(ValueError, match="wrong shapes"):
        load_model(tmp_path)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="lit_model.pth"):
        load_model(tmp_path)


def test_golden_checkpoint_loads_strictly():
    model, cfg = load_model(GOLDEN / "checkpoint")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert model.lm_head.weight is model.transformer.wte.weight
