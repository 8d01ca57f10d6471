"""Read preprocessed caches (see preprocess.py): a map-style dataset of tensor records."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from .manifest import TASKS
from .preprocess import INDEX_FILE, META_FILE


class SampleCache(torch.utils.data.Dataset):
    """`cache[i]` -> {"task", "id", "prompt_text", "answer_text", "features", "codes"}.

    roots: one or more cache directories. tasks: keep only samples of those tasks (a stage trains
    on a subset of the data). keep: a predicate on index entries (lengths), e.g. a length limit.
    """

    def __init__(self, roots: str | Path | Iterable[str | Path], tasks: Iterable[str] | None = None,
                 keep: Callable[[dict], bool] | None = None):
        roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
        wanted = set(tasks) if tasks is not None else set(TASKS)
        unknown = wanted - set(TASKS)
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}; use some of {', '.join(TASKS)}")
        found: list[dict] = []
        for root in roots:
            found.extend(dict(e, root=str(root)) for e in _read_index(root).values())
        of_task = [e for e in found if e["task"] in wanted]
        self.entries = sorted((e for e in of_task if keep is None or keep(e)),
                              key=lambda e: (e["root"], e["key"]))
        self.n_filtered = len(of_task) - len(self.entries)
        self.task_counts = {t: sum(e["task"] == t for e in self.entries) for t in sorted(wanted)}
        if not self.entries:
            raise ValueError(f"{', '.join(map(str, roots))}: no usable samples of task(s) "
                             f"{', '.join(sorted(wanted))} (the data holds {_describe(found)}; "
                             f"{self.n_filtered} were filtered out, e.g. too long)")

    def fingerprint(self) -> str:
        """Changes when the sample list changes (an exact resume needs the same data)."""
        h = hashlib.sha1()
        for e in self.entries:
            h.update(f"{e['root']}\0{e['key']}\n".encode())
        return f"{len(self.entries)}:{h.hexdigest()[:16]}"

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        return torch.load(Path(e["root"]) / e["file"], map_location="cpu", weights_only=True)


def _read_index(root: Path) -> dict[str, dict]:
    index = root / INDEX_FILE
    if not index.exists():
        hint = "" if (root / META_FILE).exists() else " (run `omniflow train preprocess` first)"
        raise FileNotFoundError(f"no preprocessed data in {root}: {INDEX_FILE} missing{hint}")
    entries: dict[str, dict] = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                e = json.loads(line)
            except ValueError:
                continue          # a line cut by a crash during preprocessing
            entries[e["key"]] = e
    return entries


def _describe(entries: list[dict]) -> str:
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["task"]] = counts.get(e["task"], 0) + 1
    return ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) or "nothing"
