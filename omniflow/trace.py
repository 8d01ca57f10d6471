"""Per-hop latency of a run: `omniflow run GRAPH --trace FILE.jsonl`, then `omniflow trace FILE.jsonl`.

Every frame carries `stamps`, one `(node, time.monotonic_ns())` per send (the runtime appends it;
`Frame.follow` copies an input's stamps onto the outputs derived from it). With `--trace`, every
node's runtime appends one JSON line per frame it receives (a `TraceRecord`: the frame's header
fields, its stamps, and the receive time `t`). From those lines:

    edge latency     t - the frame's last stamp                       (send -> receive, queueing incl.)
    node latency     first output's send stamp - the input's receive time, per input frame
                     (matched through the stamps the output inherited from that input)
    critical path    per session/turn and sink: the start node's stamp (default: the node that
                     sends "utterance" frames, i.e. the VAD at the end of an utterance) -> the first
                     frame derived from it reaching the sink, hop by hop

`--trace-every N` keeps one frame in N per edge, and always a turn's first and last frame (so the
critical path stays exact). Lines are written with one O_APPEND write each, so the node processes
share the file safely. Times are CLOCK_MONOTONIC: comparable between processes of one machine,
not across machines.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

NS_PER_MS = 1_000_000


class TraceRecord(msgspec.Struct, kw_only=True):
    """One received frame, as one JSON line of a trace file."""
    node: str                        # the node that received it
    port: str                        # its input port
    edge: str                        # edge id "src/port->dst/port"
    kind: str
    session: str
    turn: int
    seq: int
    last: bool
    t: int                           # receive time, time.monotonic_ns()
    stamps: list[tuple[str, int]]    # (node, send time) per hop so far
    shape: tuple[int, ...] = ()      # the payload's shape (e.g. samples of a pcm frame); () if none


_encoder = msgspec.json.Encoder()


# --- writing (inside each node's runtime) ------------------------------------------------------

def start_trace(path: str | os.PathLike, every: int = 1) -> str:
    """Called once per run by the launcher: an empty trace file; returns its absolute path."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"--trace-every must be a whole number >= 1, got {every!r}. "
                         "Fix: pass e.g. --trace-every 10 to trace one frame in ten")
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")                       # a new run is a new trace
    return str(path)


class TraceTap:
    """A runtime tap (`runtime.Tap`): appends a `TraceRecord` line for sampled received frames."""

    def __init__(self, path: str, node: str, every: int = 1):
        self.node, self.every = node, max(1, every)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.seen: dict[str, int] = {}                  # edge id -> frames received
        self.turns: set[tuple[str, str, int]] = set()   # (edge, session, turn) already traced

    def received(self, link, frame, parts, now_ns: int) -> None:
        n = self.seen.get(link.id, 0)
        self.seen[link.id] = n + 1
        turn = (link.id, frame.session, frame.turn)
        first = turn not in self.turns
        if not (first or frame.last or n % self.every == 0):
            return
        if first:
            self.turns.add(turn)
        if frame.last:
            self.turns.discard(turn)            # the turn ended on this edge: keep the set small
        record = TraceRecord(node=self.node, port=link.port, edge=link.id, kind=frame.kind,
                             session=frame.session, turn=frame.turn, seq=frame.seq,
                             last=frame.last, t=now_ns, stamps=frame.stamps,
                             shape=tuple(getattr(frame.data, "shape", ())))
        os.write(self.fd, _encoder.encode(record) + b"\n")   # one write: lines never interleave

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- reading and analysis ----------------------------------------------------------------------

_line_decoder = msgspec.json.Decoder(TraceRecord)


def read_trace(path: str | os.PathLike) -> list[TraceRecord]:
    """Every record of a trace file. A cut-off last line (a killed node) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file {path}. Fix: run the graph with "
                                f"'omniflow run GRAPH --trace {path}' first")
    records = []
    lines = path.read_bytes().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(_line_decoder.decode(line))
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            if i == len(lines) - 1:
                continue                        # the writer died mid-line
            raise ValueError(f"{path}:{i + 1}: not a trace record ({e}). Fix: pass a file "
                             "written by 'omniflow run --trace'") from None
    return records


class Stats(msgspec.Struct):
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, values_ns: list[int]) -> "Stats":
        ms = np.asarray(values_ns, dtype=np.float64) / NS_PER_MS
        return cls(len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
                   float(ms.max()))


class Hop(msgspec.Struct):
    node: str            # the node that sent (or, for the last hop, received) the frame
    ms: float            # time since the previous hop's stamp


class CriticalPath(msgspec.Struct):
    session: str
    turn: int
    sink: str
    start: str           # the node whose stamp starts the path
    total_ms: float
    hops: list[Hop]      # after the start stamp, in order; the last is the sink's receive


class Summary(msgspec.Struct):
    records: int
    edges: dict[str, Stats]          # edge id -> send->receive latency
    nodes: dict[str, Stats]          # node -> input received -> first derived output sent
    paths: list[CriticalPath]


def _upstream(stamps: list[tuple[str, int]]) -> tuple[str, tuple[str, int]] | None:
    """(last sender, the stamp before its own stamps) or None: a node that stamps itself (the
    VAD marks the end of an utterance) adds stamps of its own name before the runtime's."""
    hop = stamps[-1][0]
    for prev in reversed(stamps[:-1]):
        if prev[0] != hop:
            return hop, tuple(prev)
    return None


def edge_latencies(records: list[TraceRecord]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in records:
        if r.stamps:
            out.setdefault(r.edge, []).append(r.t - r.stamps[-1][1])
    return out


def node_latencies(records: list[TraceRecord]) -> dict[str, list[int]]:
    """Per node: for each traced input, the time until the first output that inherited its stamps."""
    received = {(r.node, tuple(r.stamps[-1])): r.t for r in records if r.stamps}
    first_out: dict[tuple[str, tuple[str, int]], int] = {}
    for r in records:
        if len(r.stamps) < 2:
            continue
        up = _upstream(r.stamps)
        if up is None or (up[0], up[1]) not in received:
            continue
        spent = r.stamps[-1][1] - received[up]
        first_out[up] = min(spent, first_out.get(up, spent))
    out: dict[str, list[int]] = {}
    for (node, _), spent in first_out.items():
        out.setdefault(node, []).append(spent)
    return out


def _before(stamps: list[tuple[str, int]], start: str) -> list[str]:
    """The nodes a frame passed before it first reached `start`."""
    hops = [hop for hop, _ in stamps]
    return hops[:hops.index(start)] if start in hops else []


def default_start(records: list[TraceRecord]) -> str | None:
    """The node that sends "utterance" frames (the VAD): where a spoken turn ends."""
    senders = sorted({r.stamps[-1][0] for r in records if r.kind == "utterance" and r.stamps})
    return senders[0] if senders else None


def critical_paths(records: list[TraceRecord], start: str | None = None,
                   sinks: list[str] | None = None) -> list[CriticalPath]:
    """Per (session, turn, sink): the first frame reaching the sink that passed `start`. A sink
    is a node, or one input port of it ("gateway/pcm"). By default the nodes that never send; in a
    graph without any (a served one: the gateway sends the question and receives the answer),
    each input port of the nodes the question came from, where the answer comes back."""
    start = start or default_start(records)
    if start is None:
        return []
    passed = [r for r in records if any(hop == start for hop, _ in r.stamps)]
    if not sinks:
        senders = {hop for r in records for hop, _ in r.stamps}
        sinks = sorted({r.node for r in records} - senders)       # nodes that never send
    if not sinks:                                                  # a loop: back where it began
        origins = {hop for r in passed for hop in _before(r.stamps, start)}
        sinks = sorted({f"{r.node}/{r.port}" for r in passed if r.node in origins})
    first: dict[tuple[str, int, str], TraceRecord] = {}
    for r in passed:
        sink = next((s for s in (f"{r.node}/{r.port}", r.node) if s in sinks), None)
        if sink is None:
            continue
        key = (r.session, r.turn, sink)
        if key not in first or r.t < first[key].t:
            first[key] = r
    paths = []
    for (session, turn, sink), r in sorted(first.items()):
        i = next(i for i, (hop, _) in enumerate(r.stamps) if hop == start)
        t0, hops, prev = r.stamps[i][1], [], r.stamps[i][1]
        for hop, t in [*r.stamps[i + 1:], (r.node, r.t)]:
            if hops and hops[-1].node == hop:           # a node's own stamp, then the runtime's
                hops[-1].ms += (t - prev) / NS_PER_MS
            else:
                hops.append(Hop(hop, (t - prev) / NS_PER_MS))
            prev = t
        paths.append(CriticalPath(session, turn, sink, start, (r.t - t0) / NS_PER_MS, hops))
    return paths


def summarize(records: list[TraceRecord], start: str | None = None,
              sinks: list[str] | None = None) -> Summary:
    return Summary(
        records=len(records),
        edges={e: Stats.of(v) for e, v in sorted(edge_latencies(records).items())},
        nodes={n: Stats.of(v) for n, v in sorted(node_latencies(records).items())},
        paths=critical_paths(records, start, sinks))


# --- printing ----------------------------------------------------------------------------------

def print_summary(summary: Summary, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()

    def stats_table(title: str, what: str, rows: dict[str, Stats]) -> Table:
        table = Table(title=title, title_justify="left")
        table.add_column(what)
        for col in ("frames", "p50 ms", "p99 ms", "max ms"):
            table.add_column(col, justify="right")
        for name, s in rows.items():
            table.add_row(name, str(s.count), f"{s.p50_ms:.2f}", f"{s.p99_ms:.2f}", f"{s.max_ms:.2f}")
        return table

    console.print(f"{summary.records} traced frames")
    console.print(stats_table("Edges: send -> receive", "edge", summary.edges))
    console.print(stats_table("Nodes: input received -> first output sent", "node", summary.nodes))
    if not summary.paths:
        console.print("No critical path: no frame passed a start node on its way to a sink "
                      "(give --from NODE, e.g. --from vad).")
        return
    table = Table(title=f"Critical path: {summary.paths[0].start} -> first frame at each sink",
                  title_justify="left")
    for col in ("session", "turn", "sink", "total ms"):
        table.add_column(col, justify="right" if col in ("turn", "total ms") else "left")
    table.add_column("hops (ms since the previous hop)")
    for p in summary.paths:
        table.add_row(p.session, str(p.turn), p.sink, f"{p.total_ms:.1f}",
                      " -> ".join(f"{h.node} {h.ms:.1f}" for h in p.hops))
    console.print(table)


# --- command line: omniflow trace FILE.jsonl ---------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="trace written by 'omniflow run GRAPH --trace FILE.jsonl'")
    parser.add_argument("--from", dest="start", metavar="NODE",
                        help="node whose stamp starts the critical path (default: the node that "
                             "sends 'utterance' frames, the VAD)")
    parser.add_argument("--to", dest="sinks", action="append", metavar="NODE[/PORT]",
                        help="end the critical path at this node or input port (repeatable; default: "
                             "every node that receives but never sends; in a served graph, where the "
                             "answer comes back: e.g. gateway/pcm and gateway/text)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def main(args: argparse.Namespace) -> int:
    try:
        records = read_trace(args.file)
    except (OSError, ValueError) as e:
        print(f"omniflow trace: {e}", file=sys.stderr)
        return 2
    summary = summarize(records, args.start, args.sinks)
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(summary).decode()))
    else:
        print_summary(summary)
    return 0
