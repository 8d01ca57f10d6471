"""The demo tokenizer.json: byte-level BPE in Qwen2's id layout, learnt from a few sentences."""
from __future__ import annotations

import itertools
import json
import string
from pathlib import Path

from .components import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

# A few sentences to learn merges from, so common words become single tokens.
_TOKENIZER_CORPUS = """\
What is the capital of France? The capital of France is Paris.
How are you today? I am fine, thank you. What can I do for you?
Tell me a short story about a cat and a dog who became friends.
The weather is nice and sunny, so let us go for a walk in the park.
Speech to speech models listen, think and answer with their own voice.
""" * 4
QWEN_TEXT_VOCAB = 151643     # Qwen2's ordinary BPE ids 0..151642; its specials follow
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]   # ids 151643, 151644, 151645
DEMO_MERGE_VOCAB = 600       # vocabulary size reached by real merges before filler words


def write_demo_tokenizer(dest: Path) -> Path:
    """A byte-level BPE tokenizer.json in Qwen2's id layout (ordinary ids 0..151642, then its specials).

    Merges are learnt from a few sentences; the remaining ids up to 151642 are filled with made-up
    4-letter words so that any text id a random model emits decodes to visible text.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=DEMO_MERGE_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    learnt = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(learnt["vocab"].items(), key=lambda kv: kv[1]))
    fillers = ("\u0120" + "".join(w) for w in itertools.product(string.ascii_lowercase, repeat=4))
    for word in fillers:                 # "\u0120" is byte-level BPE's spelling of a leading space
        if len(vocab) >= QWEN_TEXT_VOCAB:
            break
        vocab.setdefault(word, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learnt["merges"]]

    final = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    final.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    final.decoder = decoders.ByteLevel()
    final.add_special_tokens([AddedToken(s, special=True) for s in QWEN_SPECIALS])
    dest.mkdir(parents=True, exist_ok=True)
    final.save(str(dest / TOKENIZER_FILE))
    (dest / TOKENIZER_CONFIG_FILE).write_text(json.dumps(
        {"add_bos_token": False, "add_eos_token": False, "bos_token": None,
         "eos_token": "<|endoftext|>", "model_max_length": 32768}, indent=2))
    return dest / TOKENIZER_FILE


