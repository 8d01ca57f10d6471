"""Mini-Omni token layout: one shared 181120-row vocabulary, 1 text + 7 audio streams.

Everything that names a token id imports it from here (REFERENCE.md §1.2, §2, §4.1).

Vocabulary rows (padded_vocab_size = 181120):
    [0, 152000)                         text: Qwen2 BPE ids 0..151935 + 64 mini-omni specials
    [152000 + 4160·i, 152000 + 4160·(i+1))  audio layer i (i = 0..6): 4096 SNAC codes + 64 specials
"""
from __future__ import annotations

# --- sizes -------------------------------------------------------------------------------
TEXT_BASE_VOCAB = 151936           # Qwen2 tokenizer rows (ids 0..151935)
TEXT_SPECIALS = 64                 # mini-omni's reserved text specials
TEXT_VOCAB = TEXT_BASE_VOCAB + TEXT_SPECIALS      # 152000: width of the text logit slice
AUDIO_CODEBOOK = 4096              # SNAC codebook size: raw audio ids 0..4095 are codes
AUDIO_SPECIALS = 64
AUDIO_VOCAB = AUDIO_CODEBOOK + AUDIO_SPECIALS     # 4160: width of each audio-layer logit slice
N_AUDIO_LAYERS = 7                 # SNAC 1 + 2 + 4 codes per coarse frame
N_STREAMS = N_AUDIO_LAYERS + 1     # 7 audio streams then the text stream (index 7)
TEXT_STREAM = N_AUDIO_LAYERS       # index of the text stream in every (…, 8, …) tensor
PADDED_VOCAB = TEXT_VOCAB + N_AUDIO_LAYERS * AUDIO_VOCAB   # 181120

# --- text specials (ids in the text slice) -----------------------------------------------
EOT = TEXT_BASE_VOCAB + 0          # 151936 end of text
PAD_T = TEXT_BASE_VOCAB + 1        # 151937 text padding
INPUT_T = TEXT_BASE_VOCAB + 2      # 151938 start of text-stream input
ANSWER_T = TEXT_BASE_VOCAB + 3     # 151939 "answer in text" trigger
ASR = TEXT_BASE_VOCAB + 4          # 151940 "transcribe" trigger

# --- audio specials (raw ids, per layer; shift with layershift before feeding back) -------
EOA = AUDIO_CODEBOOK + 0           # 4096 end of audio
PAD_A = AUDIO_CODEBOOK + 1         # 4097 audio padding
INPUT_A = AUDIO_CODEBOOK + 2       # 4098 start of audio input
ANSWER_A = AUDIO_CODEBOOK + 3      # 4099 "answer in audio" trigger
SPLIT = AUDIO_CODEBOOK + 4         # 4100 defined by the original, unused in inference

# --- delay pattern: layer i of SNAC frame f is emitted at decode step f + DELAYS[i] --------
# (step 0 = the prefill position; text leads layer 0 by one step.)
DELAYS = [1, 2, 3, 4, 5, 6, 7]
# layer -> (SNAC codebook, position inside the frame): depth-first order of the 1-2-4 tree
LAYER_TO_CODEBOOK = [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3)]
CODES_PER_FRAME = [1, 2, 4]        # codebook c has this many codes per coarse frame


def audio_offset(layer: int) -> int:
    """First vocabulary row of audio layer `layer` (0..6)."""
    return TEXT_VOCAB + AUDIO_VOCAB * layer


def layershift(raw_id, layer: int):
    """Raw audio id (0..4159) of `layer` -> row in the shared vocabulary. Works on ints and tensors."""
    return raw_id + audio_offset(layer)


def is_audio_code(raw_id: int) -> bool:
    """True for a real SNAC code (not a special) — only these may reach the vocoder."""
    return 0 <= raw_id < AUDIO_CODEBOOK


# --- SNAC layer packing: the one place frames and SNAC's three codebooks are converted ------
def frames_to_codebooks(frames):
    """(F, 7) raw codes per frame -> [c0 (F,), c1 (2F,), c2 (4F,)] int64 numpy arrays.

    Layer i of frame f goes to codebook c at position CODES_PER_FRAME[c]·f + p, (c, p) =
    LAYER_TO_CODEBOOK[i] (REFERENCE.md §5.2).
    """
    import numpy as np

    frames = np.asarray(frames, dtype=np.int64).reshape(-1, N_AUDIO_LAYERS)
    books = [np.empty(len(frames) * per, dtype=np.int64) for per in CODES_PER_FRAME]
    for layer, (book, pos) in enumerate(LAYER_TO_CODEBOOK):
        books[book][pos::CODES_PER_FRAME[book]] = frames[:, layer]
    return books


def codebooks_to_frames(books):
    """[c0 (F,), c1 (2F,), c2 (4F,)] int arrays (lengths already checked) -> (F, 7) int64 frames."""
    import numpy as np

    frames = np.empty((len(books[0]), N_AUDIO_LAYERS), dtype=np.int64)     # (F, 7)
    for layer, (book, pos) in enumerate(LAYER_TO_CODEBOOK):
        frames[:, layer] = books[book][pos::CODES_PER_FRAME[book]]
    return frames
