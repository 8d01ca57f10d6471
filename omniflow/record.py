"""Record the frames crossing an edge, and read them back (`nodes.replay:Replay` re-emits them).

    omniflow run graphs/speech_to_speech.yaml --record adapter/embeds=out/question.omnirec
    omniflow replay out/question.omnirec                              # what it holds (record_cli.py)
    omniflow run graphs/replay_backbone.yaml --set replay.path=out/question.omnirec

The consuming node's runtime writes each frame exactly as it arrived (the two encoded parts,
see frame.py) with its receive time. File layout (little-endian):

    MAGIC (8 bytes) | u32 n | n bytes of JSON {"version", "edges", "kinds"}   preamble, once
    i64 receive time (time.monotonic_ns) | u32 header bytes | u32 payload bytes | header | payload
    ...                                                                 one record per frame

Each record (its fixed part, header and payload) is flushed before the next one is written, so
a killed node leaves at most one cut-off record at the end, which the reader skips with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

from .frame import KINDS, Frame, FrameError, decode, register_kind

log = logging.getLogger("omniflow.record")

MAGIC = b"OMNIREC1"
VERSION = 1
PREAMBLE_LEN = struct.Struct("<I")
RECORD = struct.Struct("<qII")          # receive time ns, header length, payload length


class RecordingError(ValueError):
    """A file that is not a recording, or a request to record an edge the graph lacks."""


# --- choosing what to record (launcher side) ---------------------------------------------------

def resolve_edges(graph, what: str) -> list[str]:
    """Edge ids meant by `what`: an edge id ('a/out->b/in'), an output 'node/port' (its first
    consumer's edge: fan-out gives every consumer the same frames) or an input 'node/port'
    (every edge into that port)."""
    ids = [e.id for e in graph.edges]
    if what in ids:
        return [what]
    node, _, port = what.partition("/")
    out = [e.id for e in graph.edges if (e.src, e.src_port) == (node, port)]
    if out:
        return out[:1]
    into = [e.id for e in graph.edges if (e.dst, e.dst_port) == (node, port)]
    if into:
        return into
    raise RecordingError(f"--record {what}: no such edge or connected port in {graph.path}. Fix: "
                         f"name an output 'node/port' or one of the edges: {', '.join(ids)}")


def start_recordings(graph, wanted: dict[str, str | os.PathLike]) -> dict[str, str]:
    """`{what: file}` (see resolve_edges) -> `{edge id: absolute file}`, each file new and holding
    its preamble. Called once per run by the launcher; the consumer's runtime appends to it."""
    plan: dict[str, str] = {}
    for what, file in wanted.items():
        path = str(Path(file).resolve())
        if path in plan.values():
            raise RecordingError(f"--record: {file} is named twice. Fix: give each edge its own file")
        for edge in resolve_edges(graph, what):
            if edge in plan:
                raise RecordingError(f"--record {what}: edge {edge} is already recorded to "
                                     f"{plan[edge]}. Fix: record each edge once")
            plan[edge] = path
    for path in set(plan.values()):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:                       # a new run is a new recording
            _write_preamble(f, sorted(e for e, p in plan.items() if p == path))
    return plan


def parse_record_options(items: list[str]) -> dict[str, str]:
    """`run --record EDGE=FILE` values -> {EDGE: FILE}."""
    out = {}
    for item in items:
        what, eq, file = item.rpartition("=")
        if not eq or not what or not file:
            raise RecordingError(f"--record {item}: expected EDGE=FILE. Fix: write e.g. "
                                 "--record adapter/embeds=out/question.omnirec")
        out[what] = file
    return out


def _write_preamble(f: BinaryIO, edges: list[str]) -> None:
    # the frame kinds known when recording, so a reader decodes them without importing their package
    meta = json.dumps({"version": VERSION, "edges": edges, "kinds": KINDS}).encode()
    f.write(MAGIC + PREAMBLE_LEN.pack(len(meta)) + meta)


# --- writing (inside the consuming node's runtime) ---------------------------------------------

class RecordTap:
    """A runtime tap (`runtime.Tap`): appends every frame received on the recorded edges."""

    def __init__(self, files: dict[str, str]):
        self.by_path: dict[str, BinaryIO] = {}
        self.files: dict[str, BinaryIO] = {}              # edge id -> open file
        for edge, path in files.items():
            if path not in self.by_path:
                f = open(path, "ab")
                if f.tell() == 0:                         # not prepared by a launcher here
                    _write_preamble(f, sorted(e for e, p in files.items() if p == path))
                self.by_path[path] = f
            self.files[edge] = self.by_path[path]

    def received(self, link, frame, parts, now_ns: int) -> None:
        f = self.files.get(link.id)
        if f is None:
            return
        header, payload = (p.buffer if hasattr(p, "buffer") else p for p in parts)
        f.write(RECORD.pack(now_ns, len(header), len(payload)))
        f.write(header)
        f.write(payload)                  # (a memoryview of the received message: no copy)
        f.flush()

    def close(self) -> None:
        for f in self.by_path.values():
            f.close()


# --- reading -----------------------------------------------------------------------------------

class Recorded(NamedTuple):
    t_ns: int          # receive time in the recording run (time.monotonic_ns)
    frame: Frame


class Recording:
    """A recording file: `edges` it holds, and its frames in order (`for t_ns, frame in rec`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no recording {self.path}. Fix: record one with "
                                    "'omniflow run GRAPH --record NODE/PORT=FILE'")
        with open(self.path, "rb") as f:
            head = f.read(len(MAGIC) + PREAMBLE_LEN.size)
            if len(head) < len(MAGIC) + PREAMBLE_LEN.size or head[:len(MAGIC)] != MAGIC:
                raise RecordingError(f"{self.path} is not an omniflow recording (no {MAGIC!r} "
                                     "at its start). Fix: pass a file written by --record")
            (n,) = PREAMBLE_LEN.unpack(head[len(MAGIC):])
            meta = json.loads(f.read(n))
            self._start = f.tell()
        if meta.get("version") != VERSION:
            raise RecordingError(f"{self.path} is a version {meta.get('version')} recording; "
                                 f"this omniflow reads version {VERSION}. Fix: record it again with "
                                 "this omniflow (omniflow run GRAPH --record NODE/PORT=FILE)")
        self.edges: list[str] = meta.get("edges", [])
        for kind, doc in meta.get("kinds", {}).items():
            register_kind(kind, doc)

    def __iter__(self) -> Iterator[Recorded]:
        with open(self.path, "rb") as f:
            f.seek(self._start)
            while True:
                fixed = f.read(RECORD.size)
                if not fixed:
                    return
                body = b""
                if len(fixed) == RECORD.size:
                    t_ns, n_header, n_payload = RECORD.unpack(fixed)
                    body = f.read(n_header + n_payload)
                if len(fixed) < RECORD.size or len(body) < n_header + n_payload:
                    log.warning("%s ends in a cut-off record (the recording node was killed?); "
                                "ignoring it", self.path)
                    return
                try:
                    frame = decode([body[:n_header], body[n_header:]])
                except FrameError as e:
                    raise RecordingError(f"{self.path}: a recorded frame does not decode ({e})") from None
                yield Recorded(t_ns, frame)
