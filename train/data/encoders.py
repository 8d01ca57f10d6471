"""The frozen encoders run once at preprocessing: whisper features (speech in) and SNAC codes
(speech out), so training reads only tensors.

Whisper follows the original pipeline exactly (REFERENCE.md §1.4): 16 kHz mono, padded or trimmed
to 30 s, log-mel, encoder on the full window, keep `int(duration_ms / 20) + 1` frames.
"""
from __future__ import annotations

import numpy as np
import torch

from .audio import SNAC_SAMPLE_RATE, WHISPER_SAMPLE_RATE
from .snac_codes import frames_from_codebooks

from omniflow.model.units import WHISPER_FRAME_MS, WHISPER_WINDOW_S
SNAC_DEFAULT = "hubertsiuzdak/snac_24khz"


def whisper_frames(n_samples: int) -> int:
    """Encoder frames Mini-Omni keeps for `n_samples` of 16 kHz audio (capped at the 30 s window)."""
    duration_ms = n_samples / WHISPER_SAMPLE_RATE * 1000
    return min(int(duration_ms / WHISPER_FRAME_MS) + 1, WHISPER_WINDOW_S * 1000 // WHISPER_FRAME_MS)


class WhisperFeatures:
    """openai-whisper encoder: 16 kHz audio -> (T, n_audio_state) features."""

    def __init__(self, checkpoint: str = "small", device: str | torch.device = "cpu"):
        try:
            import whisper
        except ImportError as e:
            raise ImportError("whisper features need openai-whisper: pip install openai-whisper") from e
        self._whisper = whisper
        # `checkpoint` is a model name ("small", downloaded to ~/.cache/whisper) or a .pt path.
        model = whisper.load_model(checkpoint, device=device)
        self.encoder = model.encoder.eval()
        self.n_mels = model.dims.n_mels
        self.dim = model.dims.n_audio_state
        self.device = torch.device(device)
        del model

    @torch.inference_mode()
    def __call__(self, batch: list[np.ndarray]) -> list[torch.Tensor]:
        """list of (N_b,) float32 16 kHz -> list of (T_b, dim) float32 CPU tensors."""
        wh = self._whisper
        mels = [wh.log_mel_spectrogram(wh.pad_or_trim(torch.from_numpy(pcm)), n_mels=self.n_mels)
                for pcm in batch]                                        # each (n_mels, 3000)
        feats = self.encoder(torch.stack(mels).to(self.device))          # (B, 1500, dim)
        return [feats[b, :whisper_frames(len(pcm))].float().cpu() for b, pcm in enumerate(batch)]


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
