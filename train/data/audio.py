"""Read an audio file (a path or the bytes of a file) as mono float32 at a given sample rate."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

WHISPER_SAMPLE_RATE = 16_000     # Hz, what whisper's log-mel front end expects
SNAC_SAMPLE_RATE = 24_000        # Hz, the snac_24khz codec


class BadAudio(ValueError):
    """An audio input that cannot be used (unreadable, empty, silent by construction)."""


def load_audio(source: str | Path | bytes, sample_rate: int) -> np.ndarray:
    """-> (N,) float32 mono at `sample_rate`. Raises BadAudio with the reason for unusable input."""
    import soundfile as sf
    import soxr

    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        data, sr = sf.read(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source),
                           dtype="float32", always_2d=True)             # (N, channels)
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError, OSError)
        raise BadAudio(f"{name}: cannot read audio ({type(e).__name__}: {e})") from e
    if data.shape[0] == 0:
        raise BadAudio(f"{name}: audio is empty (0 samples)")
    mono = data.mean(axis=1)                                             # (N,)
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate).astype(np.float32)
    if not np.isfinite(mono).all():
        raise BadAudio(f"{name}: audio holds NaN or infinite samples")
    return mono
