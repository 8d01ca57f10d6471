"""`omniflow validate graph.yaml` (check only) and `omniflow graph graph.yaml` (print Mermaid)."""
from __future__ import annotations

import argparse
import sys

from .graph import Graph, GraphError, load_graph


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of both commands."""
    parser.add_argument("graph", help="graph file (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE",
                        help="override a node parameter (or, with no dot, a graph variable) before "
                             "checking (repeatable)")


def _load(args) -> Graph | None:
    try:
        return load_graph(args.graph, args.set)
    except GraphError as e:
        print(e, file=sys.stderr)
        print(f"{len(e.errors)} problem(s) in {args.graph}", file=sys.stderr)
        return None


def validate_main(args: argparse.Namespace) -> int:
    graph = _load(args)
    if graph is None:
        return 1
    print(f"{args.graph}: ok ({len(graph.nodes)} nodes, {len(graph.edges)} edges)")
    return 0


def mermaid(graph: Graph) -> str:
    """The graph as a Mermaid flowchart: one box per node, one arrow per edge."""
    lines = ["flowchart LR"]
    for name, spec in graph.nodes.items():
        lines.append(f'    {name}["{name}<br/><small>{spec.use}</small>"]')
    for e in graph.edges:
        label = e.src_port if e.src_port == e.dst_port else f"{e.src_port} → {e.dst_port}"
        if e.kind != "any":
            label += f" ({e.kind})"
        if e.policy != "lossless":
            label += f", {e.policy} {e.depth}"
        arrow = "-.->" if e.feedback else "-->"
        lines.append(f'    {e.src} {arrow}|"{label}"| {e.dst}')
    return "\n".join(lines)


def graph_main(args: argparse.Namespace) -> int:
    graph = _load(args)
    if graph is None:
        return 1
    print(mermaid(graph))
    return 0
