"""Audio for training data: the sample rates of the two encoders, and the project's one file reader
(`omniflow.audio.load_audio`, re-exported here for the data pipeline)."""
from __future__ import annotations

from omniflow.audio import BadAudio, load_audio
from omniflow.model.units import SNAC_RATE as SNAC_SAMPLE_RATE
from omniflow.model.units import WHISPER_RATE as WHISPER_SAMPLE_RATE

__all__ = ["BadAudio", "load_audio", "WHISPER_SAMPLE_RATE", "SNAC_SAMPLE_RATE"]
