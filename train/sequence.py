"""Sequence builder: one sample -> the 8-stream input, the per-step targets and the loss mask.

The layout is the one the decoder reads (REFERENCE.md §3, §4.1), so what training teaches is
what inference asks for:

* prompt (P positions): the task's prompt exactly as inference builds it; its last position is the
  "answer now" trigger whose output is decode step 0.
* answer (N steps): step s is what the model emits at decode step s and is fed back at step s+1.
  text stream:   y_1 … y_n, _eot, then _pad_t (the decoder forces _pad_t after _eot)
  audio layer i: DELAYS[i] × _pad_a, that layer's code of frames 0..F-1, _eoa, then _pad_a
                 (`omniflow.model.delay.delay`); the decoder stops when layer 6 emits _eoa.
  text-only answers keep all 7 audio streams at _pad_a (the decoder feeds _pad_a there).
* sequence = prompt + answer steps 0..N-2 fed back (audio layer-shifted); the target at position
  P-1+s is answer step s, so S = P + N - 1.

Loss mask (which targets count):
* prompts never carry loss; batch padding never does (the collate function pads with mask off).
* text loss: the answer text and its _eot (the _pad_t after it is forced at inference, so it needs
  no loss); only for tasks with a text answer — not TTS (T1A2), whose text stream only reads along
  (issue answers #101/#110, REFERENCE.md §7.1). `LossPolicy` can change that.
* audio loss: every answer step up to the step where layer 6 emits _eoa, on all 7 layers —
  including the delay's leading _pad_a and each layer's _pad_a after its own _eoa, because the
  decoder feeds those sampled tokens back, so the model must produce exactly them. Only for tasks
  with a spoken answer (A1A2, T1A2); ASR/text answers carry no audio loss (issue #61).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from omniflow.model.delay import MAX_DELAY, delay
from omniflow.model.prompts import build_input_ids
from omniflow.model.tokens import EOT, N_AUDIO_LAYERS, N_STREAMS, PAD_A, PAD_T, TEXT_STREAM, layershift

from .data.manifest import AUDIO_INPUT_TASKS, AUDIO_OUTPUT_TASKS, TASKS

AUDIO = slice(0, N_AUDIO_LAYERS)             # streams 0..6 in every (8, …) tensor
PAD_STEP = [PAD_A] * N_AUDIO_LAYERS + [PAD_T]   # raw ids of an empty step (7 audio, text)
# Training task -> the inference task whose prompt row it trains.
INFERENCE_TASK = {"A1A2": "A1A2_SINGLE"}


@dataclass(frozen=True)
class LossPolicy:
    """Which tasks carry text loss and which carry audio loss."""

    text: frozenset = field(default_factory=lambda: frozenset({"ASR", "A1T2", "A1A2", "T1T2"}))
    audio: frozenset = field(default_factory=lambda: frozenset({"A1A2", "T1A2"}))

    @classmethod
    def default(cls, tts_text_loss: bool = False) -> "LossPolicy":
        """The policy above; `tts_text_loss` adds text loss to TTS (T1A2) answers."""
        policy = cls()
        return cls(text=policy.text | {"T1A2"}) if tts_text_loss else policy


@dataclass
class TrainSequence:
    input_ids: torch.Tensor      # (8, S) long: streams 0..6 layer-shifted audio ids, stream 7 text
    targets: torch.Tensor        # (8, S) long: raw ids (audio 0..4159, text 0..151999) per position
    loss_mask: torch.Tensor      # (8, S) bool
    prompt_len: int              # P
    whisper_len: int             # T: positions 1..T of the audio streams take adapter output
    answer_len: int              # N decode steps (step 0 = the prefill position's output)

    @property
    def answer_targets(self) -> torch.Tensor:
        """(8, N) raw ids the decoder should emit at steps 0..N-1."""
        return self.targets[:, self.prompt_len - 1:]


def shift_audio(raw: torch.Tensor) -> torch.Tensor:
    """(8, S) raw ids -> (8, S) model input ids: audio stream i moved into its vocabulary rows."""
    out = raw.clone()
    for layer in range(N_AUDIO_LAYERS):
        out[layer] = layershift(raw[layer], layer)
    return out


def build_prompt(task: str, n_audio_frames: int | None = None, text_ids=None) -> torch.Tensor:
    """(8, P) model input ids of a task's prompt, built by the inference code itself
    (`omniflow.model.prompts`), so training and decoding cannot disagree on it. A1A2 trains the
    single speaking row; the two-row batch trick is inference-only (mini-omni2 issue #29)."""
    _check_task(task)
    if text_ids is not None:
        text_ids = [int(i) for i in text_ids]
    return build_input_ids(INFERENCE_TASK.get(task, task), n_audio_frames, text_ids)[0]   # (8, P)


def build_answer(task: str, text_ids, codes=None) -> tuple[torch.Tensor, int, int]:
    """-> (answer (8, N) raw ids, text loss steps, audio loss steps) for one sample."""
    _check_task(task)
    text = [int(i) for i in text_ids] + [EOT]
    if task in AUDIO_OUTPUT_TASKS:
        if codes is None or len(codes) == 0:
            raise ValueError(f"{task} needs the answer's SNAC codes (F >= 1 frames of 7)")
        audio = delay(np.asarray(codes, dtype=np.int64))               # (F + 8, 7): ends with layer-6 _eoa
        audio_steps = len(audio)
    else:
        audio = np.zeros((0, N_AUDIO_LAYERS), dtype=np.int64)
        audio_steps = 0
    n = max(len(text), audio_steps)
    answer = torch.tensor(PAD_STEP, dtype=torch.long)[:, None].repeat(1, n)   # (8, N)
    answer[TEXT_STREAM, :len(text)] = torch.tensor(text)
    answer[AUDIO, :audio_steps] = torch.from_numpy(audio).T
    return answer, len(text), audio_steps


def build_sequence(task: str, answer_text, *, prompt_text=None, n_audio_frames: int | None = None,
                   codes=None, policy: LossPolicy | None = None) -> TrainSequence:
    """One sample -> TrainSequence (see the module docstring for the layout)."""
    policy = policy or LossPolicy()
    prompt = build_prompt(task, n_audio_frames, prompt_text)               # (8, P) shifted ids
    answer, text_steps, audio_steps = build_answer(task, answer_text, codes)  # (8, N) raw ids
    p, n = prompt.shape[1], answer.shape[1]
    input_ids = torch.cat([prompt, shift_audio(answer[:, :n - 1])], dim=1)  # (8, S), S = P + N - 1
    targets = torch.cat([torch.tensor(PAD_STEP)[:, None].repeat(1, p - 1), answer], dim=1)  # (8, S)
    mask = torch.zeros_like(targets, dtype=torch.bool)
    if task in policy.text:
        mask[TEXT_STREAM, p - 1:p - 1 + text_steps] = True
    if task in policy.audio and audio_steps:
        mask[AUDIO, p - 1:p - 1 + audio_steps] = True
    return TrainSequence(input_ids=input_ids, targets=targets, loss_mask=mask,
                         prompt_len=p, whisper_len=n_audio_frames if task in AUDIO_INPUT_TASKS else 0,
                         answer_len=n)


def sequence_length(task: str, *, prompt_text: int | None, answer_text: int, features: int | None,
                    codes: int | None) -> int:
    """S of the sequence `build_sequence` makes, from lengths alone (to filter long samples early)."""
    p = (features if task in AUDIO_INPUT_TASKS else prompt_text) + 3
    n = max(answer_text + 1, (codes + MAX_DELAY + 1) if task in AUDIO_OUTPUT_TASKS else 0)
    return p + n - 1


def sequence_from_record(record: dict, policy: LossPolicy | None = None) -> TrainSequence:
    """A preprocessed cache record (see data/preprocess.py) -> TrainSequence."""
    feats = record.get("features")
    return build_sequence(record["task"], record["answer_text"], prompt_text=record.get("prompt_text"),
                          n_audio_frames=None if feats is None else int(feats.shape[0]),
                          codes=None if record.get("codes") is None else record["codes"].long().numpy(),
                          policy=policy)


@dataclass
class Batch:
    input_ids: torch.Tensor            # (B, 8, S) long
    targets: torch.Tensor              # (B, 8, S) long, raw ids
    loss_mask: torch.Tensor            # (B, 8, S) bool
    features: torch.Tensor | None      # (B, T_max, D) float, whisper features (None: no spoken prompt)
    whisper_lens: torch.Tensor         # (B,) long, 0 for text prompts
    tasks: list[str]

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.targets), move(self.loss_mask), move(self.features),
                     move(self.whisper_lens), self.tasks)

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True): page-locked tensors copy to the GPU asynchronously."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(pin(self.input_ids), pin(self.targets), pin(self.loss_mask), pin(self.features),
                     pin(self.whisper_lens), self.tasks)

    @property
    def n_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def collate(records: list[dict], policy: LossPolicy | None = None) -> Batch:
    """Cache records of any tasks and lengths -> one right-padded batch (padding carries no loss)."""
    seqs = [sequence_from_record(r, policy) for r in records]
    b, s = len(seqs), max(q.input_ids.shape[1] for q in seqs)
    pad_in = shift_audio(torch.tensor(PAD_STEP)[:, None])[:, 0]          # (8,) layer-shifted pads
    input_ids = pad_in[None, :, None].repeat(b, 1, s)                    # (B, 8, S)
    targets = torch.tensor(PAD_STEP)[None, :, None].repeat(b, 1, s)      # (B, 8, S)
    mask = torch.zeros(b, N_STREAMS, s, dtype=torch.bool)                # (B, 8, S)
    for i, q in enumerate(seqs):
        n = q.input_ids.shape[1]
        input_ids[i, :, :n], targets[i, :, :n], mask[i, :, :n] = q.input_ids, q.targets, q.loss_mask
    feats = [r.get("features") for r in records]
    lens = torch.tensor([q.whisper_len for q in seqs], dtype=torch.long)  # (B,)
    features = None
    if any(f is not None for f in feats):
        dim = next(f.shape[1] for f in feats if f is not None)
        features = torch.zeros(b, int(lens.max()), dim)                  # (B, T_max, D)
        for i, f in enumerate(feats):
            if f is not None:
                features[i, :f.shape[0]] = f.float()
    return Batch(input_ids, targets, mask, features, lens, [r["task"] for r in records])


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
