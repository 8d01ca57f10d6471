"""Read a preprocessed cache (see preprocess.py): a map-style dataset of tensor records."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from .manifest import TASKS
from .preprocess import INDEX_FILE, META_FILE


class SampleCache(torch.utils.data.Dataset):
    """`cache[i]` -> {"task", "id", "prompt_text", "answer_text", "features", "codes"}.

    `tasks` keeps only samples of those tasks (a stage trains on a subset of the data).
    """

    def __init__(self, root: str | Path, tasks: Iterable[str] | None = None):
        self.root = Path(root)
        index = self.root / INDEX_FILE
        if not index.exists():
            hint = "" if (self.root / META_FILE).exists() else " (run `omniflow train preprocess` first)"
            raise FileNotFoundError(f"no preprocessed data in {self.root}: {INDEX_FILE} missing{hint}")
        wanted = set(tasks) if tasks is not None else set(TASKS)
        unknown = wanted - set(TASKS)
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}; use some of {', '.join(TASKS)}")
        entries: dict[str, dict] = {}
        for line in index.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue          # a line cut by a crash during preprocessing
                entries[e["key"]] = e
        self.entries = sorted((e for e in entries.values() if e["task"] in wanted), key=lambda e: e["key"])
        self.task_counts = {t: sum(e["task"] == t for e in self.entries) for t in sorted(wanted)}
        if not self.entries:
            raise ValueError(f"{self.root}: no samples of task(s) {', '.join(sorted(wanted))} "
                             f"(the cache holds {self._all_tasks(entries)})")

    @staticmethod
    def _all_tasks(entries: dict) -> str:
        counts: dict[str, int] = {}
        for e in entries.values():
            counts[e["task"]] = counts.get(e["task"], 0) + 1
        return ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) or "nothing"

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        return torch.load(self.root / self.entries[i]["file"], map_location="cpu", weights_only=True)
