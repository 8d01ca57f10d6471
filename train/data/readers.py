"""Readers that turn datasets into `Sample`s: manifests, VoiceAssistant-400K parquet, and ASR/TTS
corpora given as audio files + transcripts.

`open_source(spec)` picks the reader from a string, so one command line option covers them all:

    data/train.jsonl                  a manifest (see manifest.py)
    va:data/train-000*.parquet        VoiceAssistant-400K shards (glob), as A1A2 samples
    corpus:path/to/LibriTTS           audio files + transcripts, as ASR and T1A2 samples
    corpus[ASR]:path/to/librispeech   ... only as ASR samples
"""
from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Iterable, Iterator

from omniflow.errors import UsageError

from .manifest import AUDIO_INPUT_TASKS, TASKS, Invalid, Sample, read_manifest
from .snac_codes import parse_snac_string

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
# VoiceAssistant-400K parquet columns (REFERENCE.md §7.4)
VA_COLUMNS = ("question", "question_audio", "answer", "answer_snac")


# ---------------------------------------------------------------- VoiceAssistant-400K --------
def read_voiceassistant(paths: Iterable[str | Path], tasks: Iterable[str] = ("A1A2",)
                        ) -> Iterator[Sample | Invalid]:
    """Yield samples from VoiceAssistant-400K parquet shards.

    A row is a spoken question (`question_audio`: HF `Audio` struct with the file's `bytes`),
    its text answer and the SNAC codes of the spoken answer (`answer_snac`). `tasks` chooses which
    samples a row gives: A1A2 (speech -> speech + text), A1T2 (speech -> text), T1A2, T1T2.
    A row with malformed codes or a missing value gives an `Invalid` entry instead.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading parquet needs pyarrow: pip install 'omniflow[train]'") from e
    tasks = _check_tasks(tasks)
    for path in paths:
        pf = pq.ParquetFile(str(path))
        missing = [c for c in VA_COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: not a VoiceAssistant-400K shard, missing column(s) "
                             f"{', '.join(missing)} (have {', '.join(pf.schema_arrow.names)})")
        columns = [c for c in ("index", "round", *VA_COLUMNS) if c in pf.schema_arrow.names]
        row_no = 0
        for batch in pf.iter_batches(columns=columns, batch_size=64):
            for row in batch.to_pylist():
                name = f"{Path(path).stem}:{row.get('index', row_no)}:{row.get('round', '')}"
                row_no += 1
                try:
                    audio = row["question_audio"]
                    audio = audio.get("bytes") or audio.get("path") if isinstance(audio, dict) else audio
                    codes = parse_snac_string(row["answer_snac"] or "")
                    samples = [Sample(task=task, id=f"{name}:{task}",
                                      input_audio=audio if task in AUDIO_INPUT_TASKS else None,
                                      input_text=row["question"] if task not in AUDIO_INPUT_TASKS else None,
                                      target_text=row["answer"] if task != "T1A2" else None,
                                      target_codes=codes) for task in tasks]
                except ValueError as e:
                    yield Invalid(id=name, reason=str(e))
                    continue
                yield from samples


# ---------------------------------------------------------------- audio + transcripts --------
def find_transcribed_audio(root: str | Path) -> Iterator[tuple[str, Path, str]]:
    """Yield (id, audio path, transcript) for the common corpus layouts under `root`, sorted:

    * a sidecar text file per audio file: `x.wav` + `x.txt` (or LibriTTS `x.normalized.txt`);
    * LibriSpeech: `*.trans.txt` lines "<utterance id> <transcript>" beside `<utterance id>.flac`;
    * LJSpeech: `metadata.csv` lines "id|text|normalized text" with audio in `wavs/<id>.wav`.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory not found: {root}")
    seen: set[Path] = set()
    for meta in sorted(root.rglob("metadata.csv")):
        for line in meta.read_text(encoding="utf-8").splitlines():
            parts = line.split("|")
            if len(parts) >= 2:
                audio = meta.parent / "wavs" / f"{parts[0]}.wav"
                seen.add(audio)
                yield parts[0], audio, parts[-1].strip()
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if line.strip():
                utt, _, text = line.partition(" ")
                audio = _with_audio_suffix(trans.parent / utt)
                seen.add(audio)
                yield utt, audio, text.strip()
    for audio in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES):
        if audio in seen:
            continue
        for sidecar in (audio.with_suffix(".normalized.txt"), audio.with_suffix(".txt")):
            if sidecar.exists():
                yield str(audio.relative_to(root).with_suffix("")), audio, \
                    sidecar.read_text(encoding="utf-8").strip()
                break


def read_corpus(root: str | Path, tasks: Iterable[str] = ("ASR", "T1A2")) -> Iterator[Sample]:
    """Audio files + transcripts -> ASR samples (speech -> transcript) and/or TTS samples
    (T1A2: transcript -> that speech)."""
    tasks = _check_tasks(tasks)
    bad = [t for t in tasks if t not in ("ASR", "T1A2")]
    if bad:
        raise ValueError(f"a transcribed-speech corpus gives ASR and T1A2 samples, not {', '.join(bad)}")
    for utt, audio, text in find_transcribed_audio(root):
        for task in tasks:
            if task == "ASR":
                yield Sample(task="ASR", id=f"{utt}:ASR", input_audio=str(audio), target_text=text)
            else:
                yield Sample(task="T1A2", id=f"{utt}:T1A2", input_text=text, target_audio=str(audio))


# ---------------------------------------------------------------- one option for all ---------
_SPEC = re.compile(r"^(?P<kind>va|corpus)(\[(?P<tasks>[A-Z0-9,]+)\])?:(?P<path>.+)$")


def open_source(spec: str, skip_invalid: bool = False) -> Iterator[Sample | Invalid]:
    """`path.jsonl` | `va[TASKS]:glob` | `corpus[TASKS]:dir` -> samples (see the module docstring)."""
    m = _SPEC.match(spec)
    if m is None:
        if not spec.endswith((".jsonl", ".json")):
            raise UsageError(f"data source {spec!r}: use a .jsonl manifest, 'va:<parquet glob>' or "
                             f"'corpus:<dir>' (optionally with tasks: 'corpus[ASR]:<dir>')")
        return read_manifest(spec, skip_invalid=skip_invalid)
    tasks = m["tasks"].split(",") if m["tasks"] else None
    if m["kind"] == "va":
        paths = sorted(glob.glob(m["path"]))
        if not paths:
            raise FileNotFoundError(f"no parquet files match {m['path']!r}")
        return read_voiceassistant(paths, tasks or ("A1A2",))
    return read_corpus(m["path"], tasks or ("ASR", "T1A2"))


def _check_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UsageError(f"unknown task(s) {unknown or '(none given)'}; use some of {', '.join(TASKS)}")
    return tasks


def _with_audio_suffix(stem: Path) -> Path:
    for suffix in AUDIO_SUFFIXES:
        if stem.with_suffix(suffix).exists():
            return stem.with_suffix(suffix)
    return stem.with_suffix(".flac")
