"""Deterministic data order whose whole state is one number: samples consumed so far.

Epoch e visits the dataset in `randperm(n, seed + e)` order; global sample p (counting across
epochs) is `perm_{p // n}[p % n]`. An optimizer step consumes one global batch
(micro_batch × grad_accum × world_size samples); process r's micro-batch j of that step is the
slice `[(j·world + r)·micro, …+micro)`. So the position after k steps is k × global batch, resume
is exact, and the global batch is the same whatever the number of processes.
"""
from __future__ import annotations

from typing import Iterator

import torch


class GlobalOrder:
    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("no samples to train on")
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch][offset]


class MicroBatchSampler:
    """Yields this process's micro-batches (lists of dataset indices), step after step, forever."""

    def __init__(self, n: int, seed: int, micro_batch: int, grad_accum: int, rank: int = 0,
                 world: int = 1, start_position: int = 0):
        self.order = GlobalOrder(n, seed)
        self.micro, self.accum, self.rank, self.world = micro_batch, grad_accum, rank, world
        self.start = start_position

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            for j in range(self.accum):
                first = position + (j * self.world + self.rank) * self.micro
                yield [self.order.index(p) for p in range(first, first + self.micro)]
            position += self.global_batch
