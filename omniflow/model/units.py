"""The audio rates and frame sizes of the model, each defined once with its unit and derivation.

Speech in goes through whisper at 16 kHz; speech out comes from the SNAC 24 kHz codec, and one
model decode step emits exactly one SNAC frame, so a step is worth SNAC_FRAME_S of speech.

    whisper   16 000 Hz, mel hop 160 samples (10 ms), conv stride 2 -> one feature row per 20 ms;
              a fixed 30 s window = 1500 rows. Mini-Omni keeps int(duration_ms / 20) + 1 rows.
    SNAC      24 000 Hz, hop 512 samples (encoder rates 2·4·8·8) at the finest layer; vq_strides
              [4, 2, 1] -> a coarse frame = 4 · 512 = 2048 samples = 85.33 ms, carried as 7 codes
              (1 + 2 + 4 across the three layers).
"""
from __future__ import annotations

WHISPER_RATE = 16_000                                  # Hz: whisper's input (silero VAD runs at it too)
WHISPER_HOP = 160                                      # samples per mel frame: 10 ms
WHISPER_CONV_STRIDE = 2                                # the encoder's second conv halves the mel frames
WHISPER_FRAME_MS = 1000 * WHISPER_HOP * WHISPER_CONV_STRIDE // WHISPER_RATE   # 20 ms per feature row
WHISPER_WINDOW_S = 30                                  # s: the encoder's fixed window
WHISPER_WINDOW_SAMPLES = WHISPER_WINDOW_S * WHISPER_RATE                     # 480 000 samples
WHISPER_WINDOW_FRAMES = WHISPER_WINDOW_S * 1000 // WHISPER_FRAME_MS          # 1500 feature rows

SNAC_RATE = 24_000                                     # Hz: the snac_24khz codec
SNAC_HOP = 512                                         # samples per finest SNAC step (2·4·8·8)
SNAC_COARSE_STRIDE = 4                                 # vq_strides[0]: finest steps per coarse frame
SNAC_SAMPLES_PER_FRAME = SNAC_HOP * SNAC_COARSE_STRIDE                       # 2048 samples
SNAC_FRAME_S = SNAC_SAMPLES_PER_FRAME / SNAC_RATE                            # 0.08533 s = one decode step
SNAC_FRAME_MS = 1000 * SNAC_FRAME_S                                          # 85.33 ms
STEPS_PER_SECOND = 1 / SNAC_FRAME_S                                          # 11.72 decode steps per s of speech
