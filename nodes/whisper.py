"""Whisper encoder node: one utterance in, Mini-Omni's audio features out.

The features are `omniflow.model.whisper_encoder` (the one definition serving and training share:
the 30 s window semantics of the original, REFERENCE.md §1.4); this node wires it to ports and
params. `runtime`, `dtype` (auto: bf16 where the CPU has it, fp16 on CUDA, else fp32) and
`quantize` (int8: onnxruntime dynamic int8) choose how the encoder runs; float32 torch, the
default, is the original's arithmetic exactly. `omniflow bench whisper` measures them.

Inputs longer than `max_seconds` (at most 30) are never silently truncated: with
`over_limit: split` they are cut into consecutive windows that are encoded one by one (each with
the semantics above) and their kept frames concatenated; with `over_limit: refuse` the utterance
fails with an error to its user (and one log line) that says how long it was and how to allow it.

Weights: `checkpoint` is an openai-whisper size ("small", "base", ...) looked up through
omniflow.model.weights (explicit path -> $OMNIFLOW_HOME/whisper-<size>/<size>.pt -> `omniflow fetch`), or
a path to a `.pt` file in openai-whisper's format. Only the encoder is kept in memory.

Early encode (input `early`, the VAD's tentative utterances): the VAD sends the utterance it would
close at the first `speech_pad_ms` of silence, `min_silence_ms - speech_pad_ms` before the final
one. Its features are computed at once and sent on `features` with meta tentative: true (same
session and turn), so the adapter and the backbone can start the turn speculatively inside the
VAD's hang-over (nodes/backbone.py: its output is held until the final confirms it). They are also
kept: when the final utterance of that turn has the same samples, its features are the kept ones
(meta early: true; no second encode), so the backbone sees the very embeds it speculated on.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta
import numpy as np

from omniflow.model import weights
from omniflow.audio import to_float_mono
from omniflow.frame import Frame
from omniflow.model.whisper_encoder import WhisperFeatures, check_options, resolve_dtype
from omniflow.node import InputError, Node
from omniflow.params import Device

from omniflow.model.units import WHISPER_RATE as SAMPLE_RATE
from omniflow.model.units import WHISPER_WINDOW_S as WINDOW_SECONDS


class WhisperEncoder(Node):
    inputs = {"audio": "utterance", "early": "utterance"}     # early: the VAD's tentative utterances
    outputs = {"features": "features"}
    cpu_weight = 1                 # CPU plan: its share of the cores (omniflow.launch.plan)
    cpu_burst = True               # one encode per utterance, before that turn's decode: every core

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        checkpoint: str = "small"                 # whisper size name, or path to a .pt file
        device: Device = "cpu"
        runtime: Literal["torch", "onnx"] = "torch"   # onnx: onnxruntime (pip install 'omniflow[onnx]')
        dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"                  # float32 (the original) | bfloat16 | float16 | auto (model doc)
        quantize: Literal["none", "int8"] = "none"   # int8: onnxruntime dynamic int8 (runtime: onnx)
        max_seconds: Annotated[float, Meta(gt=0, le=WINDOW_SECONDS)] = WINDOW_SECONDS   # longest utterance
                                                 # encoded in one window
        over_limit: Literal["split", "refuse"] = "split"

        def __post_init__(self):                  # choices that cannot go together fail at load
            check_options(self.runtime, self.dtype, self.quantize)

    def setup(self) -> None:
        p = self.params
        if not 0 < p.max_seconds <= WINDOW_SECONDS:
            raise ValueError(f"whisper max_seconds={p.max_seconds} must be in (0, {WINDOW_SECONDS}]: "
                             "the encoder's window is 30 s; longer inputs are split (over_limit: split)")
        resolve_dtype(p.dtype, p.device, p.runtime)          # a bad name fails before the weights load
        self.path = self._resolve(p.checkpoint)
        weights.warn_if_demo(self.path, self.log)
        self.whisper = WhisperFeatures.load(self.path, runtime=p.runtime, dtype=p.dtype, quantize=p.quantize,
                                            device=p.device)
        self.dims = self.whisper.dims
        self.early: dict[str, tuple[int, np.ndarray, tuple]] = {}   # session -> (turn, audio, features) tentative
        self.finished: dict[str, int] = {}                        # session -> turn of its last final utterance
        self.early_hits = 0                                       # finals answered from a tentative encode
        self.log.info("whisper encoder %s: %d mels, %d-dim, %d layers, %s", self.path, self.dims.n_mels,
                      self.dims.n_audio_state, self.dims.n_audio_layer, self.whisper.description)

    @staticmethod
    def _resolve(checkpoint: str) -> Path:
        return weights.resolve_whisper(checkpoint)

    # --- features -----------------------------------------------------------------------------
    def encode(self, audio: np.ndarray) -> np.ndarray:
        """(N,) float32 16 kHz mono, N <= max_seconds -> (int(ms/20)+1 capped at 1500, d) features."""
        return self.whisper(audio)

    def process(self, port, frame: Frame):
        """`audio`: an utterance -> its features. `early`: a tentative utterance (the VAD's first
        silence after speech): encoded now, sent on (meta tentative) and kept; when the final
        utterance of the same turn comes with the same samples, its features go out without
        encoding again. A tentative the final does not match (speech resumed) is dropped."""
        audio, rate = self._as_16k_mono(frame)
        if port == "early":
            if frame.turn > self.finished.get(frame.session, frame.turn - 1):     # not answered yet
                try:
                    features = self._features(frame, audio)
                except InputError:             # too long: the final utterance reports it to its user
                    return
                self.early[frame.session] = (frame.turn, audio, features)
                yield self._send(frame, audio, features, tentative=True)
            return
        self.finished[frame.session] = frame.turn
        kept = self.early.pop(frame.session, None)
        hit = kept is not None and kept[0] == frame.turn and np.array_equal(kept[1], audio)
        self.early_hits += hit
        yield self._send(frame, audio, kept[2] if hit else self._features(frame, audio), early=hit)

    def _send(self, frame: Frame, audio: np.ndarray, features: tuple[np.ndarray, list[int]], **flags):
        """The features output of utterance `frame`: meta as the utterance's (less its rate) plus
        ms, frames, windows and `flags` (early: reused a tentative encode; tentative: is one)."""
        data, windows = features
        meta = {k: v for k, v in frame.meta.items() if k != "rate"}
        meta.update(ms=len(audio) / SAMPLE_RATE * 1000, frames=len(data), windows=windows, **flags)
        return "features", frame.follow("features", data, meta=meta, last=frame.last)

    def end(self, session: str):
        """The session is over: forget its tentative encode and its last turn."""
        self.early.pop(session, None)
        self.finished.pop(session, None)
        return ()

    def _features(self, frame: Frame, audio: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """(N,) 16 kHz -> ((T, d) features, rows per window); split or refused past max_seconds."""
        seconds = len(audio) / SAMPLE_RATE
        limit = self.params.max_seconds
        if seconds > limit and self.params.over_limit == "refuse":
            raise InputError(f"the utterance is {seconds:.1f} s, longer than whisper's max_seconds={limit} "
                             f"(over_limit: refuse): speak in shorter turns, or set over_limit: split")
        piece = int(limit * SAMPLE_RATE)
        n_pieces = max(1, math.ceil(len(audio) / piece))
        feats = [self.encode(audio[i * piece:(i + 1) * piece]) for i in range(n_pieces)]
        if n_pieces > 1:
            self.log.info("utterance of %.1f s split into %d windows of <= %s s", seconds, n_pieces, limit)
        data = np.concatenate(feats, axis=0).astype(np.float32)              # (T, d)
        return data, [len(f) for f in feats]

    def _as_16k_mono(self, frame: Frame) -> tuple[np.ndarray, int]:
        audio = np.asarray(frame.data)
        if audio.ndim == 2:                           # (N, channels): mixed down by to_float_mono
            self.log.warning("utterance of session %s has %d channels; mixing to mono",
                             frame.session, audio.shape[1])
        audio = to_float_mono(audio)                  # int16 or float -> (N,) float32
        rate = int(frame.meta.get("rate", SAMPLE_RATE))
        if rate != SAMPLE_RATE:
            import soxr
            audio = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
        return audio, SAMPLE_RATE
