"""Read an audio file (a path or the bytes of a file) as mono float32 at a given sample rate.

One reader for the graph's `nodes.audio:FileSource` and for training's data preparation, so both
decode, down-mix and resample a file the same way.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np


class BadAudio(ValueError):
    """An audio input that cannot be used (unreadable, empty, NaN/infinite samples)."""


def load_audio(source: str | Path | bytes, sample_rate: int) -> np.ndarray:
    """-> (N,) float32 mono at `sample_rate` Hz: channels are averaged, other rates are resampled
    with soxr (its default "HQ" quality). Raises BadAudio naming the file and the reason."""
    import soundfile as sf
    import soxr

    is_bytes = isinstance(source, (bytes, bytearray))
    name = "<bytes>" if is_bytes else str(source)
    try:
        data, sr = sf.read(io.BytesIO(source) if is_bytes else name, dtype="float32",
                           always_2d=True)                                  # (N, channels)
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError, OSError)
        raise BadAudio(f"cannot read audio file {name} ({type(e).__name__}: {e})") from e
    if data.shape[0] == 0:
        raise BadAudio(f"audio file {name} contains no samples (it is empty)")
    mono = data.mean(axis=1, dtype=np.float32)                             # (N,)
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate).astype(np.float32)
    if not np.isfinite(mono).all():
        raise BadAudio(f"audio file {name} holds NaN or infinite samples")
    return mono
