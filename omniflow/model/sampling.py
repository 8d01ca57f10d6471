"""Token sampling as the original `sample()` does it: top-k -> /temperature -> top-p -> draw.

The original's default (temperature 0.9, top_k 1) keeps one candidate, i.e. greedy; that case
short-cuts to argmax, which is the same token without the softmax. One divergence, on purpose:
temperature 0 means greedy here (the original would sample at temperature 1 in that case).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.9
    top_k: int | None = 1      # 1 = greedy, the original's default; None = no top-k filter
    top_p: float = 1.0
    seed: int | None = None    # seeds this session's own generator (None: nondeterministic)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0 or self.top_p == 0.0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A per-session generator (seeded if `seed` is set); None for greedy decoding."""
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (-inf) the low tail whose cumulative probability is <= 1 - top_p. logits (..., V)."""
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)  # (..., V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (..., V) -> token ids (...,) long."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if sampling.top_k is not None and sampling.top_k < logits.size(-1):
        values, idx = torch.topk(logits, sampling.top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, idx, values)
    logits = logits / sampling.temperature
    if sampling.top_p < 1.0:
        logits = top_p_filter(logits, sampling.top_p)
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, probs.size(-1))  # (N, V)
    ids = torch.multinomial(flat, num_samples=1, generator=generator)  # (N, 1)
    return ids.view(probs.shape[:-1])
