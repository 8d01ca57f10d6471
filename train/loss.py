"""The training forward: adapter + model + cross-entropy per stream, as one nn.Module so that
DistributedDataParallel wraps all of it (the adapter runs inside the forward, since stage 1 and 3
train it).

Loss = (w_text · Σ text CE + w_audio · Σ audio CE) / (loss tokens of the whole global batch).
Summing per token and dividing by the global count makes the update independent of how the
global batch is split into micro-batches and processes: 1 process × 4 samples, 2 × 2, or
gradient accumulation all give the same gradient (DDP averages over processes, so each process
scales its sum by world_size / global_count).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omniflow.model.tokens import N_AUDIO_LAYERS, N_STREAMS, TEXT_STREAM

# Per-stream stats vector layout: index 0..6 audio layers, 7 text (the stream order everywhere).
STREAM_NAMES = [f"audio_{i}" for i in range(N_AUDIO_LAYERS)] + ["text"]


class OmniLoss(nn.Module):
    def __init__(self, model: nn.Module, text_weight: float = 1.0, audio_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.text_weight, self.audio_weight = text_weight, audio_weight

    def forward(self, input_ids, targets, loss_mask, features, whisper_lens, scale: float):
        """input_ids/targets/loss_mask (B, 8, S); features (B, T, D) or None; whisper_lens (B,).

        Returns (loss to backpropagate, CE sums (8,), token counts (8,)) — sums and counts are
        per stream (audio layers 0..6, text), detached, for logging.

        Logits are computed only where a target counts: the 152000-row text head at text-loss
        positions, the 7 audio heads at audio-loss positions. The same numbers as slicing the
        full (B, S, 181120) logits, at a fraction of the memory and time.
        """
        m = self.model
        embeds = m.adapt(features) if features is not None else None                 # (B, T, C)
        # return_kv gives the final (post-norm) hidden states instead of logits.
        hidden, _ = m(input_ids, embeds, whisper_lens if embeds is not None else None, return_kv=True)  # (B, S, C)
        w_text, w_audio = m.head_weights()                                 # (152000, C), (7*4160, C)

        text_mask = loss_mask[:, TEXT_STREAM]                                         # (B, S)
        text_logits = F.linear(hidden[text_mask], w_text)                             # (M_t, 152000)
        text_ce = F.cross_entropy(text_logits.float(), targets[:, TEXT_STREAM][text_mask], reduction="none")

        audio_mask = loss_mask[:, :N_AUDIO_LAYERS].transpose(1, 2)                    # (B, S, 7)
        speaking = audio_mask.any(dim=-1)                                             # (B, S)
        audio_logits = F.linear(hidden[speaking], w_audio).unflatten(-1, (N_AUDIO_LAYERS, -1))  # (M_a, 7, 4160)
        layer_mask = audio_mask[speaking]                                             # (M_a, 7)
        audio_targets = targets[:, :N_AUDIO_LAYERS].transpose(1, 2)[speaking]         # (M_a, 7)
        audio_ce = F.cross_entropy(audio_logits[layer_mask].float(), audio_targets[layer_mask],
                                   reduction="none")                                  # (M_a',)

        layer_of = torch.arange(N_AUDIO_LAYERS, device=hidden.device).expand_as(layer_mask)[layer_mask]
        sums = torch.zeros(N_STREAMS, device=hidden.device).index_add(0, layer_of, audio_ce.detach())
        sums[TEXT_STREAM] = text_ce.detach().sum()
        counts = loss_mask.sum(dim=(0, 2)).float()                                    # (8,)
        loss = (self.text_weight * text_ce.sum() + self.audio_weight * audio_ce.sum()) * scale
        return loss, sums, counts
