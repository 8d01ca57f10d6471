"""Audio helpers shared by the nodes and training: one way to read a file, one int16 <-> float32 scale.

`load_audio` reads an audio file (a path or the bytes of a file) as mono float32 at a given sample
rate, for the graph's `nodes.audio:FileSource` and for training's data preparation alike.
"pcm" frames carry float32 in [-1, 1) or int16; `as_float32`, `to_float_mono` and `to_int16`
convert between the two with the scale libsndfile uses for PCM_16, so a round trip is exact.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np


INT16_SCALE = 32768.0        # soundfile reads PCM_16 as int16 / 32768; writing inverts it exactly


# the sample formats raw PCM travels in between clients and the graph: name -> little-endian dtype
PCM_DTYPES = {"int16": np.dtype("<i2"), "float32": np.dtype("<f4")}


def as_float32(x: np.ndarray) -> np.ndarray:
    """pcm payload (int16 or float) -> float32, int16 scaled to [-1, 1)."""
    x = np.asarray(x)
    if x.dtype == np.int16:
        return x.astype(np.float32) / np.float32(INT16_SCALE)
    return x.astype(np.float32, copy=False)


def to_float_mono(audio: np.ndarray) -> np.ndarray:
    """pcm payload (N,) or (N, channels), int16 or float -> (N,) float32; channels are averaged."""
    audio = as_float32(audio)
    return audio.mean(axis=1) if audio.ndim == 2 else audio


def to_int16(x: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1) -> int16, clipping out-of-range samples (no wraparound)."""
    if x.dtype == np.int16:
        return x
    y = np.rint(np.asarray(x, dtype=np.float32) * INT16_SCALE)
    return np.clip(y, -INT16_SCALE, INT16_SCALE - 1).astype(np.int16)


class BadAudio(ValueError):
    """An audio input that cannot be used (unreadable, empty, NaN/infinite samples)."""


def load_audio(source: str | Path | bytes, sample_rate: int) -> np.ndarray:
    """-> (N,) float32 mono at `sample_rate` Hz: channels are averaged, other rates are resampled
    with soxr (its default "HQ" quality). Raises BadAudio naming the file and the reason."""
    try:
        import soundfile as sf
        import soxr
    except ModuleNotFoundError as e:
        raise BadAudio(f"reading audio needs the package {e.name!r}: pip install soundfile soxr "
                       "(part of the model stack, omniflow[model])") from e

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
