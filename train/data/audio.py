"""Audio for training data: the sample rates of the two encoders, and the project's one file reader
(`omniflow.audio.load_audio`, re-exported here for the data pipeline)."""
from __future__ import annotations

from omniflow.audio import BadAudio, load_audio

WHISPER_SAMPLE_RATE = 16_000     # Hz, what whisper's log-mel front end expects
SNAC_SAMPLE_RATE = 24_000        # Hz, the snac_24khz codec

__all__ = ["BadAudio", "load_audio", "WHISPER_SAMPLE_RATE", "SNAC_SAMPLE_RATE"]
