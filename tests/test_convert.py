"""Qwen2 (Hugging Face) -> Mini-Omni conversion on a tiny random Qwen2 built locally."""
import pytest
import torch
import yaml

from omniflow.model import tokens
from omniflow.model.convert import fuse_qkv, main, qwen2_to_miniomni

VOCAB = 1000             # tiny text vocabulary: ids 0..999
N_LAYER = 2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=N_LAYER,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"},
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():    # random (not zero) biases and norms so a wrong layout cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    d = tmp_path_factory.mktemp("qwen2_tiny")
    model.save_pretrained(d)
    (d / "tokenizer.json").write_text('{"stand-in": true}')
    return d


@pytest.fixture(scope="module")
def ckpt_dir(hf_dir, tmp_path_factory):
    return qwen2_to_miniomni(hf_dir, tmp_path_factory.mktemp("omni"), seed=0)


def _hf_model(hf_dir):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def test_writes_official_layout(ckpt_dir):
    sd = torch.load(ckpt_dir / "lit_model.pth", map_location="cpu", weights_only=True)
    per_block = ["norm_1.weight", "attn.attn.weight", "attn.attn.bias", "attn.proj.weight",
                 "norm_2.weight", "mlp.fc_1.weight", "mlp.fc_2.weight", "mlp.proj.weight"]
    expected = {"whisper_adapter.fc_1.weight", "whisper_adapter.fc_2.weight", "whisper_adapter.proj.weight",
                "lm_head.weight", "transformer.wte.weight", "transformer.ln_f.weight"}
    expected |= {f"transformer.h.{n}.{k}" for n in range(N_LAYER) for k in per_block}
    assert set(sd) == expected
    assert sd["transformer.wte.weight"].shape == (tokens.PADDED_VOCAB, 32)
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    assert sd["transformer.h.0.attn.attn.weight"].shape == ((4 + 2 * 2) * 8, 32)   # (G·(q_per_kv+2)·hs, d)
    assert sd["whisper_adapter.fc_1.weight"].shape == (48, 768)
    assert sd["whisper_adapter.proj.weight"].shape == (32, 48)
    cfg = yaml.safe_load((ckpt_dir / "model_config.yaml").read_text())
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_query_groups"], cfg["head_size"]) == (2, 32, 4, 2, 8)
    assert cfg["rope_base"] == 1_000_000 and cfg["tie_word_embeddings"] is True
    assert cfg["padded_vocab_size"] == tokens.PADDED_VOCAB and cfg["block_size"] == 128
    assert (ckpt_dir / "tokenizer.json").read_text() == '{"stand-in": true}'


def test_embedding_rows(hf_dir, ckpt_dir):
    hf_emb = _hf_model(hf_dir).model.embed_tokens.weight.detach()
    wte = torch.load(ckpt_dir / "lit_model.pth", weights_only=True)["transformer.wte.weight"]
    assert torch.equal(wte[:VOCAB], hf_emb)                       # text rows copied
    new = wte[VOCAB:]
    assert torch.allclose(new.mean(0), hf_emb.mean(0), atol=0.01)  # centred on the mean text row
    assert new.std(0).mean() < 0.5 * hf_emb.std(0).mean()          # small noise ...
    assert not torch.equal(new[0], new[1])                         # ... but rows differ


def test_seeded(hf_dir, ckpt_dir, tmp_path):
    a = torch.load(ckpt_dir / "lit_model.pth", weights_only=True)
    b = torch.load(qwen2_to_miniomni(hf_dir, tmp_path / "s0", seed=0) / "lit_model.pth", weights_only=True)
    c = torch.load(qwen2_to_miniomni(hf_dir, tmp_path / "s1", seed=1) / "lit_model.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["whisper_adapter.fc_1.weight"], c["whisper_adapter.fc_1.weight"])
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])


def test_fuse_qkv_group_order():
    hs, d = 2, 3
    q = torch.arange(4 * hs * d).reshape(4 * hs, d)                 # 4 query heads
    k = 100 + torch.arange(2 * hs * d).reshape(2 * hs, d)           # 2 KV heads
    v = 200 + torch.arange(2 * hs * d).reshape(2 * hs, d)
    fused = fuse_qkv(q, k, v, n_query_groups=2)
    expected = torch.cat([q[0:4], k[0:2], v[0:2], q[4:8], k[2:4], v[2:4]])
    assert torch.equal(fused, expected)
    assert torch.equal(fuse_qkv(q[:, 0], k[:, 0], v[:, 0], 2), expected[:, 0])   # biases


def test_text_logits_match_hf(hf_dir, ckpt_dir):
    """Feeding all 8 streams the same text ids makes the averaged embedding the text embedding, so
    the Mini-Omni text logits must equal the HF model's logits: this proves the weight layout."""
    load_model = pytest.importorskip("omniflow.model.checkpoint").load_model
    model, cfg = load_model(ckpt_dir, device="cpu", dtype=torch.float32)
    model.eval()
    ids = torch.tensor([[5, 17, 999, 3, 256, 42, 7, 600, 1, 12]])                # (B=1, S)
    with torch.no_grad():
        ref = _hf_model(hf_dir)(ids).logits                                   # (B, S, VOCAB)
        logits = model(ids[:, None, :].expand(1, tokens.N_STREAMS, -1).contiguous())   # (B, S, 181120)
    assert logits.shape == (1, ids.shape[1], tokens.PADDED_VOCAB)
    torch.testing.assert_close(logits[..., :VOCAB], ref, atol=1e-4, rtol=1e-4)


def test_cli(hf_dir, tmp_path):
    assert main([str(hf_dir), str(tmp_path / "cli"), "--seed", "3", "--block-size", "64"]) == 0
    cfg = yaml.safe_load((tmp_path / "cli" / "model_config.yaml").read_text())
    assert cfg["block_size"] == 64
    assert (tmp_path / "cli" / "lit_model.pth").is_file()


def test_rejects_non_hf_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        qwen2_to_miniomni(tmp_path, tmp_path / "out")


def test_rejects_untied_head(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="not tied"):
        qwen2_to_miniomni(Qwen2ForCausalLM(cfg), tmp_path / "out")
