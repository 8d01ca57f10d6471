"""The frozen encoders run once at preprocessing: whisper features (speech in) and SNAC codes
(speech out), so training reads only tensors.

Whisper follows the original pipeline exactly (REFERENCE.md §1.4) through omniflow.model.whisper_encoder,
the function serving uses: 16 kHz mono, padded or trimmed
to 30 s, log-mel, encoder on the full window, keep `int(duration_ms / 20) + 1` frames.
"""
from __future__ import annotations

import numpy as np
import torch

from .audio import SNAC_SAMPLE_RATE
from .snac_codes import frames_from_codebooks

SNAC_DEFAULT = "hubertsiuzdak/snac_24khz"


class WhisperFeatures:
    """openai-whisper encoder: 16 kHz audio -> (T, n_audio_state) features, by the same function
    the serving node uses (omniflow.model.whisper_encoder.features)."""

    def __init__(self, checkpoint: str, device: str | torch.device = "cpu"):
        try:
            import whisper  # noqa: F401
        except ImportError as e:
            raise ImportError("whisper features need openai-whisper: pip install openai-whisper") from e
        from omniflow.model.whisper_encoder import WhisperFeatures as Encoder

        self.encoder = Encoder.load(checkpoint, device=str(device))      # an openai-whisper .pt path
        self.n_mels, self.dim = self.encoder.n_mels, self.encoder.dim
        self.device = torch.device(device)

    def __call__(self, batch: list[np.ndarray]) -> list[torch.Tensor]:
        """list of (N_b,) float32 16 kHz -> list of (T_b, dim) float32 CPU tensors."""
        return [torch.from_numpy(f) for f in self.encoder.batch(batch)]


class SnacCodes:
    """SNAC 24 kHz encoder: 24 kHz audio -> (F, 7) frames in Mini-Omni's layer order."""

    def __init__(self, checkpoint: str = SNAC_DEFAULT, device: str | torch.device = "cpu"):
        try:
            from snac import SNAC
        except ImportError as e:
            raise ImportError("SNAC codes need the snac package: pip install snac") from e
        # a Hugging Face repo id or a local directory with config.json + pytorch_model.bin
        self.model = SNAC.from_pretrained(checkpoint).to(device).eval()
        if self.model.sampling_rate != SNAC_SAMPLE_RATE:
            raise ValueError(f"{checkpoint}: SNAC at {self.model.sampling_rate} Hz; Mini-Omni uses the "
                             f"{SNAC_SAMPLE_RATE} Hz codec ({SNAC_DEFAULT})")
        self.device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        """(N,) float32 at 24 kHz -> (F, 7) int64 frames, F = ceil(N / 2048)."""
        audio = torch.from_numpy(pcm).to(self.device)[None, None]        # (1, 1, N)
        return frames_from_codebooks([c[0] for c in self.model.encode(audio)])
