"""Preprocessing: samples -> a cache of tensors, so training never touches audio or text.

    omniflow train preprocess --source data/train.jsonl --out cache/       # encoders from $OMNIFLOW_HOME
    omniflow train preprocess --source data/train.jsonl --out cache/ --tokenizer ckpt/ \
        --whisper /data/small.pt --snac /data/snac

Whisper and SNAC are found as the whisper and vocoder nodes find them (omniflow.model.weights:
explicit path -> $OMNIFLOW_HOME -> an error naming `omniflow fetch`), so training and serving read
the same files.

Per sample it stores the prompt and answer token ids, the whisper features of spoken input and the
SNAC frames of spoken output. The run is resumable (samples already in the cache, or already
reported bad, are skipped), shows a progress bar, and never stops on one bad input: an unreadable
or empty audio file, or a malformed entry, is written to `bad.jsonl` and counted in the summary.

Cache layout (`SampleCache` reads it):
    meta.json      encoders and tokenizer used (a resume with different ones is refused); written
                   with the first cached sample or at the end of a run, so a run that fails before
                   caching anything (no weights, say) leaves nothing that blocks the retry
    index.jsonl    one line per cached sample: key, file, task, lengths
    bad.jsonl      one line per skipped input: key, error
    samples/*.pt   {"task", "id", "prompt_text", "answer_text", "features", "codes"}
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from omniflow.errors import UsageError

from .audio import SNAC_SAMPLE_RATE, WHISPER_SAMPLE_RATE, BadAudio, load_audio
from .manifest import AUDIO_INPUT_TASKS, AUDIO_OUTPUT_TASKS, Invalid, Sample

log = logging.getLogger(__name__)

INDEX_FILE = "index.jsonl"
BAD_FILE = "bad.jsonl"
META_FILE = "meta.json"
SAMPLES_DIR = "samples"
CACHE_VERSION = 1


@dataclass
class PreprocessReport:
    written: int = 0
    skipped_done: int = 0     # already in the cache (resume)
    bad: int = 0              # reported in bad.jsonl this run

    def __str__(self) -> str:
        return f"{self.written} cached, {self.skipped_done} already done, {self.bad} bad (see {BAD_FILE})"


class CacheWriter:
    """Appends records to a cache: the sample file first (atomically), then its index line, so
    a crash at any point leaves a cache that reads fine and resumes."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        (self.out / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
        self._index = (self.out / INDEX_FILE).open("a", encoding="utf-8")

    def add(self, record: dict) -> None:
        """record: {"task", "id", "prompt_text" (L,) | None, "answer_text" (n,), "features" (T, D) |
        None, "codes" (F, 7) | None} (tensors)."""
        rel = _key_file(record["id"])
        tmp = self.out / (rel + ".tmp")
        torch.save(record, tmp)
        os.replace(tmp, self.out / rel)          # never a half-written sample file
        self._index.write(json.dumps({
            "key": record["id"], "file": rel, "task": record["task"],
            **{k: _len(record.get(k)) for k in ("prompt_text", "answer_text", "features", "codes")}}) + "\n")
        self._index.flush()

    def close(self) -> None:
        self._index.close()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _key_file(key: str) -> str:
    return f"{SAMPLES_DIR}/{hashlib.sha1(key.encode()).hexdigest()[:20]}.pt"


def _read_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                keys.add(json.loads(line)["key"])
            except (ValueError, KeyError):
                continue      # a line cut by a crash: that sample is simply redone
    return keys


def _check_meta(out: Path, meta: dict) -> bool:
    """Refuse a cache written with other encoders; True when `out` already has its meta.json."""
    path = out / META_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old != meta:
            raise UsageError(f"{out} was preprocessed with {old}, this run uses {meta}; "
                             f"use another --out directory (or delete {out}) to start over")
        return True
    return False


def preprocess(samples: Iterable[Sample | Invalid], out_dir: str | Path, tokenizer, *,
               whisper: str = "small", snac: str | None = None, device: str = "cpu",
               batch_size: int = 8, retry_bad: bool = False, progress: bool = True,
               features_fp16: bool = False) -> PreprocessReport:
    """Cache `samples` under `out_dir`. `tokenizer` has `encode(str) -> list[int]`.

    whisper: a size ("small": $OMNIFLOW_HOME/whisper-small/small.pt) or a .pt path; snac: a
    directory or a Hugging Face repo id, None for $OMNIFLOW_HOME/snac. Both load on first use.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"version": CACHE_VERSION, "whisper": str(whisper), "snac": str(snac or "cache"),
            "tokenizer": repr(tokenizer), "features_fp16": features_fp16}
    has_meta = _check_meta(out, meta)
    done = _read_keys(out / INDEX_FILE)
    if not retry_bad:
        done |= _read_keys(out / BAD_FILE)
    encoders = _LazyEncoders(whisper, snac, device)
    report = PreprocessReport()
    seen: set[str] = set()

    with CacheWriter(out) as writer, (out / BAD_FILE).open("a", encoding="utf-8") as bad_log:

        def bad(key: str, reason: str) -> None:
            report.bad += 1
            log.warning("skipping %s: %s", key, reason)
            bad_log.write(json.dumps({"key": key, "error": reason}) + "\n")
            bad_log.flush()

        bar = tqdm(desc="preprocess", unit="sample", disable=not progress)
        for chunk in _chunks(samples, batch_size):
            todo = []
            for s in chunk:
                if s.id in seen:
                    bad(s.id, "duplicate id in the source (ids must be unique)")
                    continue
                seen.add(s.id)
                if s.id in done:
                    report.skipped_done += 1
                elif isinstance(s, Invalid):
                    bad(s.id, s.reason)
                else:
                    todo.append(s)
            for sample, record, error in _encode(todo, tokenizer, encoders, features_fp16):
                if error is not None:
                    bad(sample.id, error)
                    continue
                if not has_meta:          # the cache now holds data made with these encoders
                    (out / META_FILE).write_text(json.dumps(meta, indent=1))
                    has_meta = True
                writer.add(record)
                report.written += 1
            bar.update(len(chunk))
            bar.set_postfix(ok=report.written, done=report.skipped_done, bad=report.bad)
        bar.close()
    if not has_meta:
        (out / META_FILE).write_text(json.dumps(meta, indent=1))
    log.info("preprocess %s: %s", out, report)
    return report


def _len(t) -> int | None:
    return None if t is None else int(t.shape[0])


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _LazyEncoders:
    """Load whisper / SNAC only when a sample needs them (text-only or pre-coded data needs neither)."""

    MEMO = 64     # recent per-file results: one audio file often serves several tasks (ASR, A1T2, A1A2)

    def __init__(self, whisper: str, snac: str | None, device: str):
        self.whisper_name, self.snac_name, self.device = whisper, snac, device
        self._whisper = self._snac = None
        self.features_memo: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.codes_memo: OrderedDict[str, np.ndarray] = OrderedDict()

    def remember(self, memo: OrderedDict, source, value) -> None:
        if isinstance(source, str):
            memo[source] = value
            while len(memo) > self.MEMO:
                memo.popitem(last=False)

    @property
    def whisper(self):
        if self._whisper is None:
            from omniflow.model import weights

            from .encoders import WhisperFeatures
            path = weights.resolve_whisper(self.whisper_name)
            weights.warn_if_demo(path, log)
            self._whisper = WhisperFeatures(str(path), self.device)
        return self._whisper

    @property
    def snac(self):
        if self._snac is None:
            from omniflow.model import weights

            from .encoders import SnacCodes
            path = weights.resolve("snac", self.snac_name)
            weights.warn_if_demo(path, log)
            self._snac = SnacCodes(str(path), self.device)
        return self._snac


def _encode(samples: list[Sample], tokenizer, enc: _LazyEncoders, fp16: bool):
    """Yield (sample, record, None) or (sample, None, error) — the whisper batch runs once."""
    records: dict[str, dict] = {}
    pcm: dict = {}                             # audio to encode, by file path (or ("bytes", sample id))
    waiting: dict = {}                         # that audio -> ids of the samples that need its features
    for s in samples:
        try:
            rec = {"task": s.task, "id": s.id, "features": None, "codes": None, "prompt_text": None}
            if s.task not in AUDIO_INPUT_TASKS:
                rec["prompt_text"] = _ids(tokenizer, s.input_text, "input_text")
            rec["answer_text"] = _ids(tokenizer, s.target_text or "", "target_text")
            if s.task in AUDIO_OUTPUT_TASKS:
                codes = s.target_codes
                if codes is None and isinstance(s.target_audio, str):
                    codes = enc.codes_memo.get(s.target_audio)
                if codes is None:
                    codes = enc.snac(load_audio(s.target_audio, SNAC_SAMPLE_RATE))
                    enc.remember(enc.codes_memo, s.target_audio, codes)
                if len(codes) == 0:
                    raise BadAudio("target audio gives 0 SNAC frames")
                rec["codes"] = torch.as_tensor(codes, dtype=torch.int16)     # (F, 7), codes < 4096
            if s.task in AUDIO_INPUT_TASKS:
                known = enc.features_memo.get(s.input_audio) if isinstance(s.input_audio, str) else None
                if known is not None:
                    rec["features"] = known.half() if fp16 else known
                else:
                    # one whisper run per distinct file in the batch (a file often serves several tasks)
                    key = s.input_audio if isinstance(s.input_audio, str) else ("bytes", s.id)
                    if key not in pcm:
                        pcm[key] = _whisper_window(load_audio(s.input_audio, WHISPER_SAMPLE_RATE), s)
                    waiting.setdefault(key, []).append(s.id)
            records[s.id] = rec
        except (BadAudio, ValueError) as e:
            yield s, None, str(e)
    keys = list(pcm)
    if keys:
        feats = enc.whisper([pcm[k] for k in keys])                         # each (T, D)
        for key, f in zip(keys, feats):
            enc.remember(enc.features_memo, key, f)
            for sid in waiting[key]:
                records[sid]["features"] = f.half() if fp16 else f
    for s in samples:
        if s.id in records:
            yield s, records[s.id], None


def _whisper_window(pcm: np.ndarray, sample: Sample) -> np.ndarray:
    """Refuse spoken prompts longer than whisper's 30 s window: the encoder would see a truncated
    prompt while the target still answers all of it."""
    from omniflow.model.units import WHISPER_WINDOW_S
    seconds = len(pcm) / WHISPER_SAMPLE_RATE
    if seconds > WHISPER_WINDOW_S:
        raise BadAudio(f"input audio is {seconds:.1f} s, longer than whisper's {WHISPER_WINDOW_S} s window "
                       f"(split the utterance, or leave it out)")
    return pcm


def _ids(tokenizer, text: str, what: str) -> torch.Tensor:
    ids = tokenizer.encode(text)
    if not ids and what == "input_text":
        raise ValueError(f"{what} {text!r} encodes to no tokens")
    return torch.tensor(ids, dtype=torch.long)
