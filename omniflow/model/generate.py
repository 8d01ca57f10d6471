"""Per-session streaming on top of `Engine`, and whole-answer helpers.

`stream` yields each kept step (7 raw audio ids + 1 text id) as soon as it is produced; `answer`
collects them into the original functions' return format. Both drive only their own session
(`Engine.step([session_id])`), so other sessions in the same engine are left where they are.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from . import tokens as tk
from .engine import Engine, StepOut
from .prompts import get_task
from .sampling import Sampling

_ids = itertools.count()


def stream(
    engine: Engine,
    task: str,
    *,
    embeds: torch.Tensor | None = None,
    text_ids: list[int] | None = None,
    sampling: Sampling = Sampling(),
    max_new_tokens: int | None = None,
    session_id: str | None = None,
) -> Iterator[StepOut]:
    """Start a session and yield its kept steps until it ends; the slot is freed on exit
    (also when the consumer stops iterating early, e.g. on barge-in)."""
    sid = session_id or f"gen-{next(_ids)}"
    out = engine.start(sid, task, embeds=embeds, text_ids=text_ids, sampling=sampling,
                       max_new_tokens=max_new_tokens)
    try:
        if out.kept:
            yield out
        while not out.done:
            out = engine.step([sid])[sid]
            if out.kept:
                yield out
    finally:
        engine.stop(sid)


def answer(engine: Engine, task: str, **kwargs) -> list[list[int]] | list[int]:
    """Run one session to the end. Speaking tasks -> 8 lists (7 audio layers of raw ids, then
    text), as the original `generate_TA_BATCH/AA/TA`; text tasks -> the list of text ids."""
    steps = list(stream(engine, task, **kwargs))
    if get_task(task).audio_out:
        return [[s.tokens[i] for s in steps] for i in range(tk.N_STREAMS)]
    return [s.text for s in steps]



generate = stream  # the name the model API contract uses for the per-session streaming generator
