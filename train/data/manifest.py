"""One training sample, and the JSON-lines manifest that lists them.

A manifest has one JSON object a line. Keys (paths are relative to the manifest's directory):

    task          ASR | A1T2 | A1A2 | T1A2 | T1T2
    id            optional unique name (default: the line number)
    input_audio   speech prompt (audio-input tasks: ASR, A1T2, A1A2)
    input_text    text prompt (text-input tasks: T1A2, T1T2)
    target_text   text answer / transcript (ASR, A1T2, A1A2, T1T2; for T1A2 it defaults to
                  input_text: the text the speech reads out, carried by the text stream)
    target_audio  speech answer as an audio file (A1A2, T1A2), encoded to SNAC at preprocessing
    target_snac   or the answer already as SNAC codes: "# c0 c1a c2a c2b c1b c2c c2d # …" or a
                  list of 7-code frames

    {"task": "ASR", "input_audio": "wav/0001.wav", "target_text": "hello there"}
    {"task": "T1A2", "input_text": "hello there", "target_audio": "wav/0001.wav"}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .snac_codes import check_frames, format_snac_string, parse_snac_string

TASKS = ("ASR", "A1T2", "A1A2", "T1A2", "T1T2")
AUDIO_INPUT_TASKS = frozenset({"ASR", "A1T2", "A1A2"})
AUDIO_OUTPUT_TASKS = frozenset({"A1A2", "T1A2"})
MANIFEST_KEYS = ("task", "id", "input_audio", "input_text", "target_text", "target_audio", "target_snac")


@dataclass
class Invalid:
    """A source entry that cannot become a Sample (bad line, malformed codes): reported, skipped."""

    id: str
    reason: str


@dataclass
class Sample:
    """One example before preprocessing. Audio is a path, or bytes of an audio file (parquet)."""

    task: str
    id: str
    input_audio: str | bytes | None = None
    input_text: str | None = None
    target_text: str | None = None
    target_audio: str | bytes | None = None
    target_codes: np.ndarray | None = field(default=None, repr=False)   # (F, 7) SNAC frames

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"sample {self.id!r}: unknown task {self.task!r}; use one of {', '.join(TASKS)}")
        if self.task == "T1A2" and self.target_text is None:
            self.target_text = self.input_text
        if self.target_codes is not None:
            self.target_codes = check_frames(self.target_codes)
        self.validate()

    def validate(self) -> None:
        def need(what: str, ok: bool) -> None:
            if not ok:
                raise ValueError(f"sample {self.id!r} (task {self.task}) needs {what}")

        if self.task in AUDIO_INPUT_TASKS:
            need("input_audio (the spoken prompt)", self.input_audio is not None)
        else:
            need("input_text (the text prompt)", bool(self.input_text))
        need("target_text", self.target_text is not None and (self.target_text != "" or self.task == "T1A2"))
        if self.task in AUDIO_OUTPUT_TASKS:
            need("target_audio or target_snac (the spoken answer)",
                 self.target_audio is not None or self.target_codes is not None)

    def to_json(self) -> dict:
        out: dict = {"task": self.task, "id": self.id}
        for key in ("input_audio", "input_text", "target_text", "target_audio"):
            value = getattr(self, key)
            if isinstance(value, bytes):
                raise ValueError(f"sample {self.id!r}: {key} holds audio bytes; write them to a file "
                                 f"before putting the sample in a manifest")
            if value is not None:
                out[key] = value
        if self.target_codes is not None:
            out["target_snac"] = format_snac_string(self.target_codes)
        return out


def sample_from_json(obj: dict, default_id: str, base_dir: Path | None = None) -> Sample:
    """A manifest line (already parsed) -> Sample; relative audio paths resolve against base_dir."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(MANIFEST_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; manifest keys are {', '.join(MANIFEST_KEYS)}")
    if "task" not in obj:
        raise ValueError(f"missing 'task' (one of {', '.join(TASKS)})")

    def path(key: str) -> str | None:
        value = obj.get(key)
        if value is None or base_dir is None or Path(value).is_absolute():
            return value
        return str(base_dir / value)

    codes = obj.get("target_snac")
    if isinstance(codes, str):
        codes = parse_snac_string(codes)
    return Sample(task=obj["task"], id=str(obj.get("id", default_id)), input_audio=path("input_audio"),
                  input_text=obj.get("input_text"), target_text=obj.get("target_text"),
                  target_audio=path("target_audio"), target_codes=codes)


def read_manifest(path: str | Path, skip_invalid: bool = False) -> Iterator[Sample | Invalid]:
    """Yield the samples of a JSON-lines manifest. A bad line is an error naming file and line,
    or, with `skip_invalid`, an `Invalid` entry (preprocessing reports those and goes on)."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield sample_from_json(json.loads(line), default_id=f"{path.stem}:{lineno}",
                                       base_dir=path.parent)
            except ValueError as e:          # json.JSONDecodeError is a ValueError
                if not skip_invalid:
                    raise ValueError(f"{path}:{lineno}: {e}") from e
                yield Invalid(id=f"{path.name}:{lineno}", reason=str(e))


def write_manifest(samples: Iterable[Sample], path: str | Path) -> int:
    """Write samples as JSON lines (paths as given); returns the number written."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n
