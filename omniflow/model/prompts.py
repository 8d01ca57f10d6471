"""Prompt layouts of the five Mini-Omni tasks (REFERENCE.md §3) and what each task decodes.

A prompt is one (8, S) row per cache row: streams 0..6 layer-shifted audio ids, stream 7 text.
The "answer now" trigger is always the last position. `TASKS` is the registry the engine reads:
which row layouts a task prefills, whether it speaks, and which row each head is read from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import tokens as tk

# Row layouts (one cache row each). Audio-input rows carry whisper frames at positions 1..T.
ROW_A1A2 = "A1A2"   # speech in, answer in speech (+ its own text)
ROW_A1T2 = "A1T2"   # speech in, answer in text
ROW_ASR = "ASR"     # speech in, transcript
ROW_T1A2 = "T1A2"   # text in, answer in speech
ROW_T1T2 = "T1T2"   # text in, answer in text
AUDIO_INPUT_ROWS = {ROW_A1A2, ROW_A1T2, ROW_ASR}


@dataclass(frozen=True)
class Task:
    """What a decoding task prefills and how its steps are read and fed back."""

    name: str
    rows: tuple[str, ...]      # row layouts, one KV-cache row each
    audio_in: bool             # prompt carries whisper frames
    audio_out: bool            # samples 7 audio layers and stops on layer-6 EOA (else text, stops on EOT)
    audio_row: int = 0         # row whose audio logits are sampled
    text_row: int = 0          # row whose text logits are sampled
    original: str = ""         # the original function this reproduces


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        # The streaming default: row 0 speaks, row 1 answers in text; row 1's text drives both
        # (REFERENCE.md §4.3).
        Task("A1A2", (ROW_A1A2, ROW_A1T2), True, True, audio_row=0, text_row=1,
             original="generate_TA_BATCH"),
        # Single-row speech-to-speech (the original's non-batched `generate_AA`).
        Task("A1A2_SINGLE", (ROW_A1A2,), True, True, original="generate_AA"),
        Task("A1T2", (ROW_A1T2,), True, False, original="generate_AT"),
        Task("ASR", (ROW_ASR,), True, False, original="generate_ASR"),
        Task("T1A2", (ROW_T1A2,), False, True, original="generate_TA"),
        Task("T1T2", (ROW_T1T2,), False, False, original="generate_TT"),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


def _row(layout: str, n_audio_frames: int | None, text_ids: list[int] | None) -> torch.Tensor:
    """One (8, S) prompt row in the given layout."""
    if layout in AUDIO_INPUT_ROWS:
        if n_audio_frames is None or n_audio_frames < 1:
            raise ValueError(f"task row {layout} needs n_audio_frames >= 1 (whisper frames kept)")
        T = n_audio_frames
        last_audio = tk.ANSWER_A if layout == ROW_A1A2 else tk.PAD_A
        audio = [tk.INPUT_A] + [tk.PAD_A] * T + [tk.EOA, last_audio]
        text = [tk.INPUT_T] + [tk.PAD_T] * T + [tk.EOT, tk.ASR if layout == ROW_ASR else tk.ANSWER_T]
    else:
        if not text_ids:
            raise ValueError(f"task row {layout} needs text_ids (the tokenized prompt)")
        L = len(text_ids)
        bad = [t for t in text_ids if not 0 <= int(t) < tk.TEXT_VOCAB]
        if bad:
            raise ValueError(f"text_ids must be text-vocabulary ids in [0, {tk.TEXT_VOCAB}), got {bad[:5]}")
        last_audio = tk.ANSWER_A if layout == ROW_T1A2 else tk.PAD_A
        audio = [tk.PAD_A] * (L + 2) + [last_audio]
        text = [tk.INPUT_T] + [int(t) for t in text_ids] + [tk.EOT, tk.ANSWER_T]
    streams = [[tk.layershift(a, layer) for a in audio] for layer in range(tk.N_AUDIO_LAYERS)]
    return torch.tensor(streams + [text], dtype=torch.long)  # (8, S)


def build_input_ids(task: str, n_audio_frames: int | None = None, text_ids: list[int] | None = None) -> torch.Tensor:
    """Prompt of `task` -> LongTensor (R, 8, S); R = 2 for "A1A2" (the batch trick), else 1.

    n_audio_frames: whisper frames T kept for audio-input tasks (S = T + 3);
    text_ids: tokenized prompt for text-input tasks (S = len + 3).
    """
    spec = get_task(task)
    return torch.stack([_row(layout, n_audio_frames, text_ids) for layout in spec.rows])  # (R, 8, S)


def decode_feedback(spec: Task, audio: list[int], text: int) -> torch.Tensor:
    """Next step's inputs (R, 8) from one step's raw audio ids (7) and text id (REFERENCE.md §4.2/4.3).

    Speaking rows (layout with an audio answer) get the sampled audio, layer-shifted; every other
    row gets `_pad_a`. Every row gets the (possibly forced) text token.
    """
    rows = []
    for layout in spec.rows:
        speaks = layout in (ROW_A1A2, ROW_T1A2)
        ids = audio if speaks else [tk.PAD_A] * tk.N_AUDIO_LAYERS
        rows.append([tk.layershift(a, i) for i, a in enumerate(ids)] + [text])
    return torch.tensor(rows, dtype=torch.long)  # (R, 8)
