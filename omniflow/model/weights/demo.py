"""`omniflow fetch --demo`: a complete, randomly initialised weight set in the official formats.

The whole graph runs on a machine that reaches no model hub; each component directory gets a
`DEMO` marker so nodes can say that the output is not speech.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .. import tokens
from ..units import SNAC_RATE
from .components import (DEMO_MARKER, MINIOMNI_CONFIG_FILE, MINIOMNI_WEIGHTS_FILE, SNAC_CONFIG_FILE,
                         SNAC_WEIGHTS_FILE, WHISPER_PREFIX, component_dirs)
from .demo_tokenizer import write_demo_tokenizer
from .resolve import is_demo

DEMO_SEED = 0

# "tiny" runs the whole graph on 2 CPU cores in seconds; "real" has the official shapes (random
# values) for benchmarks. Both keep every interface dimension: the 181120-row vocabulary, whisper's
# 80 mel bins and 1500-frame (30 s) window, SNAC's 24 kHz, hop 512, vq_strides [4, 2, 1], 4096 codes.

MINIOMNI_TRUNK = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=2, head_size=16,
                 intermediate_size=256, block_size=512),
    "real": dict(n_layer=24, n_embd=896, n_head=14, n_query_groups=2, head_size=64,
                 intermediate_size=4864, block_size=2048),
}
WHISPER_DIMS = {   # openai-whisper ModelDimensions; n_vocab 51865 = the multilingual tokenizer's size
    "tiny": dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                 n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=4, n_text_layer=2),
    "real": dict(n_mels=80, n_audio_ctx=1500, n_audio_state=768, n_audio_head=12, n_audio_layer=12,
                 n_vocab=51865, n_text_ctx=448, n_text_state=768, n_text_head=12, n_text_layer=12),
}
SNAC_CONFIG = {
    "tiny": dict(sampling_rate=SNAC_RATE, encoder_dim=8, encoder_rates=[2, 4, 8, 8], latent_dim=None,
                 decoder_dim=64, decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096,
                 codebook_dim=8, vq_strides=[4, 2, 1], noise=True, depthwise=True),
    "real": dict(sampling_rate=SNAC_RATE, encoder_dim=48, encoder_rates=[2, 4, 8, 8], latent_dim=768,
                 decoder_dim=1024, decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096,
                 codebook_dim=8, vq_strides=[4, 2, 1], noise=True, depthwise=True),
}
INIT_STD = 0.02           # normal init of every matrix (GPT-2 / litgpt convention)


def miniomni_config(size: str, whisper_adapter_dim: int) -> dict:
    """model_config.yaml contents (litgpt field names, official values outside the trunk)."""
    return {
        "name": f"mini-omni-demo-{size}",
        "hf_config": {"name": "Qwen2-0.5B", "org": "Qwen"},
        **MINIOMNI_TRUNK[size],
        "padded_vocab_size": tokens.PADDED_VOCAB, "vocab_size": 50254, "padding_multiple": 512,
        "text_vocab_size": tokens.TEXT_VOCAB, "audio_vocab_size": tokens.AUDIO_VOCAB,
        "cat_audio_vocab_size": tokens.N_AUDIO_LAYERS * tokens.AUDIO_VOCAB,
        "whisper_adapter_dim": whisper_adapter_dim, "asr_adapter": "llamamlp",
        "rotary_percentage": 1.0, "rope_base": 1000000, "rope_condense_ratio": 1,
        "parallel_residual": False, "shared_attention_norm": False, "bias": False,
        "add_qkv_bias": True, "lm_head_bias": False, "norm_class_name": "RMSNorm", "norm_eps": 1.0e-6,
        "mlp_class_name": "LLaMAMLP", "scale_embeddings": False, "tie_word_embeddings": True,
        "post_adapter": False, "post_adapter_layers": 6,
    }


def _marker(dest: Path, what: str) -> None:
    (dest / DEMO_MARKER).write_text(
        f"Demo weights written by `omniflow fetch --demo`: {what}, randomly initialised (seed "
        f"{DEMO_SEED}). They have the official file formats but produce noise, not speech.\n")


def write_demo_miniomni(dest: Path, size: str = "tiny", whisper_adapter_dim: int | None = None,
                        seed: int = DEMO_SEED) -> Path:
    """lit_model.pth (official 198-key layout scaled to `size`) + model_config.yaml + tokenizer.json."""
    import torch
    import yaml

    cfg = miniomni_config(size, whisper_adapter_dim or WHISPER_DIMS[size]["n_audio_state"])
    E, I, V = cfg["n_embd"], cfg["intermediate_size"], cfg["padded_vocab_size"]
    qkv_rows = (cfg["n_head"] + 2 * cfg["n_query_groups"]) * cfg["head_size"]
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * INIT_STD

    wte = normal(V, E)                                                # (V, E)
    sd: dict[str, torch.Tensor] = {
        "whisper_adapter.fc_1.weight": normal(I, cfg["whisper_adapter_dim"]),
        "whisper_adapter.fc_2.weight": normal(I, cfg["whisper_adapter_dim"]),
        "whisper_adapter.proj.weight": normal(E, I),
        "lm_head.weight": wte,                 # tied: one tensor under both keys, as the original saves it
        "transformer.wte.weight": wte,
    }
    for n in range(cfg["n_layer"]):
        p = f"transformer.h.{n}."
        sd[p + "norm_1.weight"] = torch.ones(E)
        sd[p + "attn.attn.weight"] = normal(qkv_rows, E)
        sd[p + "attn.attn.bias"] = torch.zeros(qkv_rows)
        sd[p + "attn.proj.weight"] = normal(E, cfg["n_head"] * cfg["head_size"])
        sd[p + "norm_2.weight"] = torch.ones(E)
        sd[p + "mlp.fc_1.weight"] = normal(I, E)
        sd[p + "mlp.fc_2.weight"] = normal(I, E)
        sd[p + "mlp.proj.weight"] = normal(E, I)
    sd["transformer.ln_f.weight"] = torch.ones(E)

    dest.mkdir(parents=True, exist_ok=True)
    torch.save(sd, dest / MINIOMNI_WEIGHTS_FILE)
    (dest / MINIOMNI_CONFIG_FILE).write_text(yaml.safe_dump(cfg, sort_keys=True))
    write_demo_tokenizer(dest)
    _marker(dest, f"Mini-Omni ({size} trunk: {cfg['n_layer']} layers, n_embd {E})")
    return dest



def write_demo_whisper(dest: Path, name: str = "small", size: str = "tiny", seed: int = DEMO_SEED) -> Path:
    """`<name>.pt` exactly like openai-whisper's files: {"dims": {...}, "model_state_dict": fp16 tensors}."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(**WHISPER_DIMS[size])
    torch.manual_seed(seed)
    model = Whisper(dims)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.dim() > 1:                  # linear/conv/embedding weights; LayerNorms keep 1 and 0
                p.normal_(0.0, INIT_STD)
            elif key.endswith(".bias") and "ln" not in key:
                p.normal_(0.0, INIT_STD)
    state = {k: v.half() for k, v in model.state_dict().items()}   # the released files are fp16
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}.pt"
    torch.save({"dims": dims.__dict__, "model_state_dict": state}, path)
    _marker(dest, f"openai-whisper encoder+decoder named {name!r} with {size} dims")
    return path


def write_demo_snac(dest: Path, size: str = "tiny", seed: int = DEMO_SEED) -> Path:
    """SNAC 24 kHz config.json + pytorch_model.bin (the snac package's own state-dict names)."""
    import torch
    from snac import SNAC

    config = SNAC_CONFIG[size]
    torch.manual_seed(seed)
    model = SNAC(**config)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / SNAC_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    torch.save(model.state_dict(), dest / SNAC_WEIGHTS_FILE)
    _marker(dest, f"SNAC 24 kHz codec ({size} config)")
    return dest


def _holds_real_weights(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir()) and not is_demo(folder)


def write_demo(root: Path, whisper: Iterable[str] = ("small",), size: str = "tiny",
               seed: int = DEMO_SEED) -> dict[str, Path]:
    """The whole demo set under `root`: miniomni/, whisper-<name>/<name>.pt, snac/.

    Refuses to write over a component directory that holds anything but demo weights.
    """
    if size not in MINIOMNI_TRUNK:
        raise ValueError(f"unknown demo size {size!r}; choose one of {sorted(MINIOMNI_TRUNK)}")
    whisper = list(whisper)
    dirs = component_dirs(Path(root).expanduser(), whisper)
    for folder in dirs.values():
        if _holds_real_weights(folder):
            raise FileExistsError(f"{folder} holds weights that are not demo weights; refusing to overwrite "
                                  f"them with random ones. Fix: write the demo set elsewhere "
                                  f"(omniflow fetch --demo --home DIR) or move {folder} away")
    out = {"miniomni": write_demo_miniomni(dirs["miniomni"], size, seed=seed),
           "snac": write_demo_snac(dirs["snac"], size, seed=seed)}
    for name in whisper:     # every demo whisper has the adapter's input width, so any name works
        out[WHISPER_PREFIX + name] = write_demo_whisper(dirs[WHISPER_PREFIX + name], name, size, seed)
    return out


