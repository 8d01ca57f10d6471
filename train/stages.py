"""Which parameters a stage trains: the config's `trainable` parts -> requires_grad, plus the row
mask that lets stage 1 train only the audio rows of the shared embedding / tied head.

Parts (REFERENCE.md §7.1):
* adapter               whisper_adapter.* (the ASR adapter, whisper MLP)
* embedding_audio_rows  rows [152000, 181120) of transformer.wte.weight. The head is tied
                        (lm_head.weight *is* wte.weight), so these rows are both the audio input
                        embeddings and the 7 audio output heads: what the paper's stage 1 trains as
                        a "TTS adapter", which the released model does not have. A gradient hook
                        zeroes the text rows' gradient, and the embedding gets no weight decay,
                        so text rows stay bit-identical. (Unlike a separate TTS adapter, the audio
                        rows of the prompt's specials — _input_a, _pad_a, _eoa — also receive ASR
                        gradients through the input side; issue #110's "ASR and TTS share no
                        trainable parameters" holds only for the output heads here.)
* trunk                 the LLM: transformer.* (embedding with all rows, blocks, final norm)
"""
from __future__ import annotations

import torch
from torch import nn

from omniflow.model.tokens import TEXT_VOCAB

EMBEDDING = "transformer.wte.weight"


def apply_trainable(model: nn.Module, parts: list[str]) -> list[torch.utils.hooks.RemovableHandle]:
    """Freeze everything, then unfreeze `parts`. Returns hook handles (keep them alive)."""
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = []
    for name, p in model.named_parameters():
        if "adapter" in parts and name.startswith("whisper_adapter."):
            p.requires_grad_(True)
        if "trunk" in parts and name.startswith("transformer."):
            p.requires_grad_(True)
    if "embedding_audio_rows" in parts and "trunk" not in parts:
        wte = model.get_parameter(EMBEDDING)
        wte.requires_grad_(True)
        keep = torch.zeros(wte.shape[0], 1, dtype=wte.dtype, device=wte.device)  # (V, 1)
        keep[TEXT_VOCAB:] = 1
        hooks.append(wte.register_hook(lambda grad: grad * keep.to(grad.dtype)))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"trainable parts {parts} select no parameters")
    return hooks


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices; none on the embedding (= tied head), norms, biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and name != EMBEDDING else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
