"""Typed model configuration: the official `model_config.yaml` with litgpt `Config` field names.

Mini-Omni ships its trunk hyper-parameters as a litgpt config (REFERENCE.md §1.1). `Config.load`
reads that file strictly: an unknown key is an error that names it, so a typo or a newer format
never silently falls back to a default. Values this implementation does not support (e.g.
`parallel_residual: true`) are also errors that name the key, instead of producing a different
network than the checkpoint was trained as.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import tokens
from .weights.components import MINIOMNI_CONFIG_FILE as CONFIG_FILE


@dataclass
class Config:
    # --- identity ----------------------------------------------------------------------------
    name: str = "Qwen2-0.5B"
    hf_config: dict = field(default_factory=lambda: {"name": "Qwen2-0.5B", "org": "Qwen"})
    # --- trunk (Qwen2-0.5B values, REFERENCE.md §1.1) ------------------------------------------
    block_size: int = 2048               # max context = KV-cache length = RoPE table length
    n_layer: int = 24
    n_embd: int = 896
    n_head: int = 14
    n_query_groups: int = 2              # KV heads (GQA)
    head_size: int | None = 64           # None -> n_embd // n_head (litgpt rule)
    intermediate_size: int = 4864        # SwiGLU hidden width (trunk MLP and whisper adapter)
    rotary_percentage: float = 1.0
    rope_base: int = 1_000_000
    rope_condense_ratio: int = 1
    parallel_residual: bool = False
    shared_attention_norm: bool = False
    norm_class_name: str = "RMSNorm"
    norm_eps: float = 1e-6
    mlp_class_name: str = "LLaMAMLP"
    bias: bool = False
    add_qkv_bias: bool = True
    lm_head_bias: bool = False
    scale_embeddings: bool = False
    tie_word_embeddings: bool = True
    # --- vocabulary ----------------------------------------------------------------------------
    padded_vocab_size: int = tokens.PADDED_VOCAB
    vocab_size: int = 50254              # litgpt leftover; unused (padded_vocab_size is explicit)
    padding_multiple: int = 512          # litgpt leftover; unused
    text_vocab_size: int = tokens.TEXT_VOCAB
    audio_vocab_size: int = tokens.AUDIO_VOCAB
    cat_audio_vocab_size: int = tokens.N_AUDIO_LAYERS * tokens.AUDIO_VOCAB
    # --- adapters ------------------------------------------------------------------------------
    whisper_adapter_dim: int = 768       # whisper-small n_audio_state
    asr_adapter: str = "llamamlp"
    vision_adapter_dim: int | None = None  # mini-omni2 only; not built here
    post_adapter: bool = False           # "TTS adapter": not in the released model
    post_adapter_layers: int = 6
    # --- unused by the released model, accepted so official files load ------------------------
    pos_type: str = "rope"
    force_align: bool = False
    use_pretrain_phoneme_emb: bool = False
    prompt_vocab_size: int | None = None
    attn_dropout: float = 0.0
    gelu_approximate: str = "none"
    n_expert: int = 0
    n_expert_per_token: int = 0

    def __post_init__(self) -> None:
        if self.head_size is None:
            self.head_size = self.n_embd // self.n_head
        self._check()

    # --- derived ---------------------------------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one key/value head."""
        return self.n_head // self.n_query_groups

    @property
    def rope_n_elem(self) -> int:
        """Leading dims of each head that get rotary embedding."""
        return int(self.rotary_percentage * self.head_size)

    @property
    def qkv_size(self) -> int:
        """Rows of the fused QKV projection: per KV group, q_per_kv query heads + 1 key + 1 value."""
        return (self.n_head + 2 * self.n_query_groups) * self.head_size

    # --- validation ------------------------------------------------------------------------
    def _check(self) -> None:
        unsupported = {
            "parallel_residual": (self.parallel_residual, False),
            "shared_attention_norm": (self.shared_attention_norm, False),
            "norm_class_name": (self.norm_class_name, "RMSNorm"),
            "mlp_class_name": (self.mlp_class_name, "LLaMAMLP"),
            "bias": (self.bias, False),
            "lm_head_bias": (self.lm_head_bias, False),
            "scale_embeddings": (self.scale_embeddings, False),
            "post_adapter": (self.post_adapter, False),
            "n_expert": (self.n_expert, 0),
            "pos_type": (self.pos_type, "rope"),
            "asr_adapter": (self.asr_adapter, "llamamlp"),
        }
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(
                    f"model config: {key}={value!r} is not supported by omniflow's Mini-Omni "
                    f"network (only {supported!r}, as in the released checkpoint)"
                )
        if self.n_head % self.n_query_groups:
            raise ValueError(
                f"model config: n_head={self.n_head} must be a multiple of "
                f"n_query_groups={self.n_query_groups}"
            )
        if self.rope_n_elem % 2:
            raise ValueError(f"model config: rotary dims {self.rope_n_elem} must be even")
        audio_end = self.text_vocab_size + tokens.N_AUDIO_LAYERS * self.audio_vocab_size
        if audio_end > self.padded_vocab_size:
            raise ValueError(
                f"model config: text_vocab_size + 7*audio_vocab_size = {audio_end} exceeds "
                f"padded_vocab_size={self.padded_vocab_size}"
            )
        if (self.text_vocab_size, self.audio_vocab_size) != (tokens.TEXT_VOCAB, tokens.AUDIO_VOCAB):
            raise ValueError(
                f"model config: text_vocab_size={self.text_vocab_size}, audio_vocab_size="
                f"{self.audio_vocab_size} differ from the Mini-Omni token layout "
                f"({tokens.TEXT_VOCAB}, {tokens.AUDIO_VOCAB}) that omniflow.model.tokens encodes"
            )

    # --- files -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model config") -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(unknown)}; known keys are the litgpt Config "
                f"fields Mini-Omni uses (see omniflow/model/config.py)"
            )
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        """Read `model_config.yaml` (or a directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.exists():
            raise FileNotFoundError(f"model config not found: {path} (expected {CONFIG_FILE})")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the config as YAML (a directory gets `model_config.yaml`). Returns the file path."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        data = {k: v for k, v in self.to_dict().items() if v is not None}
        path.write_text(yaml.safe_dump(data, sort_keys=True))
        return path
