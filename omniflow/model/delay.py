"""The text-first delay pattern as data (REFERENCE.md §4.1).

Layer i of SNAC frame f is emitted at decode step f + DELAYS[i] (step 0 = the prefill position).
`delay` lays whole frames out on the step grid (the training target layout), `undelay` inverts it,
and `Undelayer` does the same incrementally, one step at a time, for streaming.
"""
from __future__ import annotations

import numpy as np

from .tokens import DELAYS, EOA, N_AUDIO_LAYERS, PAD_A, is_audio_code

MAX_DELAY = max(DELAYS)


def delay(frames: np.ndarray, pad: int = PAD_A, end: int | None = EOA) -> np.ndarray:
    """(F, 7) raw codes per frame -> (F + MAX_DELAY + 1, 7) raw ids per step.

    Layer i reads `pad` for steps < DELAYS[i], then its F codes, then `end` (if given), then `pad`.
    """
    frames = np.asarray(frames, dtype=np.int64).reshape(-1, N_AUDIO_LAYERS)
    n = len(frames)
    steps = np.full((n + MAX_DELAY + 1, N_AUDIO_LAYERS), pad, dtype=np.int64)  # (S, 7)
    for layer, d in enumerate(DELAYS):
        steps[d:d + n, layer] = frames[:, layer]
        if end is not None:
            steps[d + n, layer] = end
    return steps


def undelay(steps: np.ndarray) -> np.ndarray:
    """(S, 7) raw ids per step -> (F, 7) complete frames, stopping at each layer's first EOA.

    A frame is complete when all 7 layers have produced it; specials inside a frame are kept
    (use `is_audio_code` to filter before a vocoder).
    """
    steps = np.asarray(steps, dtype=np.int64).reshape(-1, N_AUDIO_LAYERS)
    columns = []
    for layer, d in enumerate(DELAYS):
        col = steps[d:, layer]
        ends = np.flatnonzero(col == EOA)
        columns.append(col[: ends[0]] if len(ends) else col)
    n = min(len(c) for c in columns)
    return np.stack([c[:n] for c in columns], axis=1) if n else np.zeros((0, N_AUDIO_LAYERS), np.int64)


class Undelayer:
    """Streaming `undelay`: feed one step's 7 audio ids at a time, get frames as they complete.

    Frame f completes at step f + MAX_DELAY. After a layer emits EOA, that layer is finished:
    frames that layer never produced are incomplete and never emitted.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.columns: list[list[int]] = [[] for _ in range(N_AUDIO_LAYERS)]
        self.ended = [False] * N_AUDIO_LAYERS
        self.emitted = 0

    @property
    def finished(self) -> bool:
        """True once the most delayed layer has emitted EOA (the original's stop rule)."""
        return self.ended[-1]

    def push(self, audio_ids) -> np.ndarray:
        """One step's 7 raw audio ids -> (k, 7) newly completed frames (k is 0 or 1, rarely more)."""
        for layer, d in enumerate(DELAYS):
            if self.step >= d and not self.ended[layer]:
                tok = int(audio_ids[layer])
                if tok == EOA:
                    self.ended[layer] = True
                else:
                    self.columns[layer].append(tok)
        self.step += 1
        ready = min(len(c) for c in self.columns)
        new = [[c[f] for c in self.columns] for f in range(self.emitted, ready)]
        self.emitted = ready
        return np.array(new, dtype=np.int64).reshape(-1, N_AUDIO_LAYERS)


def valid_frames(frames: np.ndarray) -> np.ndarray:
    """Boolean mask (F,) of frames whose 7 ids are all real SNAC codes (no specials)."""
    frames = np.asarray(frames).reshape(-1, N_AUDIO_LAYERS)
    return np.all((frames >= 0) & (frames < EOA), axis=1) if len(frames) else np.zeros(0, bool)


__all__ = ["DELAYS", "MAX_DELAY", "Undelayer", "delay", "undelay", "valid_frames", "is_audio_code"]
