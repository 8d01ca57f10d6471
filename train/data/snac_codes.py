"""SNAC codes in Mini-Omni's per-frame layout (REFERENCE.md §5.2, §7.4).

One model frame = one coarse SNAC step = 2048 samples at 24 kHz = 85.33 ms, carried as 7 codes in
the depth-first order of SNAC's 1-2-4 code tree: `[c0[f], c1[2f], c2[4f], c2[4f+1], c1[2f+1],
c2[4f+2], c2[4f+3]]` (`tokens.LAYER_TO_CODEBOOK`). Three forms appear in practice:

* frames     (F, 7) int64 array: what the sequence builder lays out with the delay pattern;
* codebooks  [c0 (F,), c1 (2F,), c2 (4F,)]: what `snac.SNAC.encode/decode` use (batch dim dropped);
* string     "# l0 l1 l2 l3 l4 l5 l6 # …": VoiceAssistant-400K's `answer_snac` column.
"""
from __future__ import annotations

import numpy as np

from omniflow.model.tokens import (AUDIO_CODEBOOK, CODES_PER_FRAME, N_AUDIO_LAYERS, codebooks_to_frames,
                                   frames_to_codebooks)

FRAME_SEPARATOR = "#"


def frames_from_codebooks(codebooks) -> np.ndarray:
    """[c0 (F,), c1 (2F,), c2 (4F,)] (tensors or arrays, an optional leading batch dim of 1)
    -> (F, 7) frames."""
    cbs = [np.asarray(getattr(c, "cpu", lambda: c)()).reshape(-1).astype(np.int64) for c in codebooks]
    if len(cbs) != len(CODES_PER_FRAME):
        raise ValueError(f"expected {len(CODES_PER_FRAME)} SNAC codebooks, got {len(cbs)}")
    n = len(cbs[0])
    for c, (cb, per) in enumerate(zip(cbs, CODES_PER_FRAME)):
        if len(cb) != n * per:
            raise ValueError(f"SNAC codebook {c} has {len(cb)} codes, expected {n * per} "
                             f"({per} per frame for {n} frames)")
    return codebooks_to_frames(cbs)                          # (F, 7)


def codebooks_from_frames(frames) -> list[np.ndarray]:
    """(F, 7) frames -> [c0 (F,), c1 (2F,), c2 (4F,)] (add a batch dim before `SNAC.decode`)."""
    return frames_to_codebooks(check_frames(frames))


def parse_snac_string(text: str) -> np.ndarray:
    """VoiceAssistant-400K `answer_snac` ("# c0 c1a c2a c2b c1b c2c c2d # …") -> (F, 7) frames."""
    frames = []
    for i, chunk in enumerate(text.split(FRAME_SEPARATOR)):
        chunk = chunk.strip()
        if not chunk:
            continue
        try:
            values = [int(v) for v in chunk.split()]
        except ValueError as e:
            raise ValueError(f"SNAC string frame {i}: {chunk[:60]!r} is not 7 integers") from e
        if len(values) != N_AUDIO_LAYERS:
            raise ValueError(f"SNAC string frame {i} has {len(values)} codes, expected "
                             f"{N_AUDIO_LAYERS} ('# c0 c1a c2a c2b c1b c2c c2d # …')")
        frames.append(values)
    return check_frames(np.array(frames, dtype=np.int64).reshape(-1, N_AUDIO_LAYERS))


def format_snac_string(frames) -> str:
    """(F, 7) frames -> "# l0 … l6 # l0 … l6 #" (the dataset's format)."""
    frames = check_frames(frames)
    body = " # ".join(" ".join(str(int(v)) for v in row) for row in frames)
    return f"# {body} #" if len(frames) else "#"


def check_frames(frames) -> np.ndarray:
    """Validate and return (F, 7) int64 frames of real SNAC codes (0..4095)."""
    frames = np.asarray(frames, dtype=np.int64)
    if frames.size == 0:
        return frames.reshape(0, N_AUDIO_LAYERS)
    if frames.ndim != 2 or frames.shape[1] != N_AUDIO_LAYERS:
        raise ValueError(f"SNAC frames must have shape (F, {N_AUDIO_LAYERS}), got {frames.shape}")
    bad = (frames < 0) | (frames >= AUDIO_CODEBOOK)
    if bad.any():
        f, layer = np.argwhere(bad)[0]
        raise ValueError(f"SNAC frame {f} layer {layer} holds {frames[f, layer]}, outside the codebook "
                         f"0..{AUDIO_CODEBOOK - 1} (special audio ids never belong in target codes)")
    return frames
