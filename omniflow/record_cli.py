"""`omniflow record GRAPH --edge E --out F` and `omniflow replay FILE` (see record.py).

Kept apart from record.py, which the node runtime imports for its recording tap: the command
line needs the launcher, and the launcher needs the runtime.
"""
from __future__ import annotations

import argparse
import sys

from .launch import cli_run
from .record import Recorded, Recording


def add_record_arguments(parser: argparse.ArgumentParser) -> None:
    cli_run.add_arguments(parser)
    parser.add_argument("--edge", required=True, action="append", metavar="NODE/PORT",
                        help="edge to record: an output 'node/port', an input 'node/port' or an "
                             "edge id (repeatable, one --out each)")
    parser.add_argument("--out", required=True, action="append", metavar="FILE",
                        help="recording file for the matching --edge")


def record_main(args: argparse.Namespace) -> int:
    """`omniflow record GRAPH --edge E --out F`: the same as `omniflow run GRAPH --record E=F`."""
    if len(args.edge) != len(args.out):
        print("omniflow record: give one --out FILE per --edge", file=sys.stderr)
        return 2
    args.record = [*args.record, *(f"{e}={o}" for e, o in zip(args.edge, args.out))]
    return cli_run.main(args)


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a recording (omniflow run GRAPH --record NODE/PORT=FILE)")
    parser.add_argument("--frames", action="store_true", help="list every frame, not only totals")


def replay_main(args: argparse.Namespace) -> int:
    """`omniflow replay FILE`: what a recording holds; replay it with a nodes.replay:Replay node."""
    from rich.console import Console
    from rich.table import Table

    try:
        rec = Recording(args.file)
        frames = list(rec)
    except (OSError, ValueError) as e:
        print(f"omniflow replay: {e}", file=sys.stderr)
        return 2
    console = Console()
    span = (frames[-1].t_ns - frames[0].t_ns) / 1e9 if frames else 0.0
    console.print(f"{rec.path}: {len(frames)} frames over {span:.3f} s from {', '.join(rec.edges)}")
    groups: dict[tuple[str, str, int], list[Recorded]] = {}
    for r in frames:
        groups.setdefault((r.frame.kind, r.frame.session, r.frame.turn), []).append(r)
    table = Table(title="frames by kind, session and turn", title_justify="left")
    for col in ("kind", "session", "turn", "frames", "shapes", "last"):
        table.add_column(col)
    for (kind, session, turn), rs in groups.items():
        shapes = sorted({str(tuple(getattr(r.frame.data, "shape", ()))) for r in rs})
        table.add_row(kind, session, str(turn), str(len(rs)), ", ".join(shapes[:4]),
                      "yes" if rs[-1].frame.last else "no")
    console.print(table)
    if args.frames:
        for r in frames:
            f = r.frame
            console.print(f"{(r.t_ns - frames[0].t_ns) / 1e6:10.2f} ms  {f.kind} {f.session} "
                          f"turn={f.turn} seq={f.seq} last={f.last} "
                          f"shape={getattr(f.data, 'shape', None)} meta={f.meta}")
    console.print("Replay it with a source node 'use: nodes.replay:Replay' "
                  f"(e.g. omniflow run graphs/replay_backbone.yaml --set replay.path={rec.path})")
    return 0
