"""`omniflow run graph.yaml`: validate the graph, then run it with the local (or Ray) launcher."""
from __future__ import annotations

import argparse
import glob
import logging
import signal
import sys
import time
from pathlib import Path

import yaml

from ..graph import Graph, GraphError, import_class, load_graph
from ..runtime import LOG_FORMAT, interrupt_once


class NodePrefixFormatter(logging.Formatter):
    """In one process, prefix records of logger `omniflow.<node>` with `[node]`, as processes are."""

    def __init__(self, nodes: set[str]):
        super().__init__(LOG_FORMAT)
        self.nodes = nodes

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        node = record.name.removeprefix("omniflow.")
        return f"[{node}] {text}" if node in self.nodes else text


def written_outputs(graph: Graph, since: float, extra: list[str] = ()) -> list[Path]:
    """The files this run wrote: the `path` param of each node without outputs (a sink; a
    "{session}" in it matches every session's file), plus `extra` (trace, recordings), each only
    if it was modified since `since` (time.time())."""
    patterns = list(extra)
    for spec in graph.nodes.values():
        path = spec.params.get("path")
        if isinstance(path, str) and path and not getattr(import_class(spec.use), "outputs", {}):
            patterns.append(path.replace("{session}", "*"))
    found: list[Path] = []
    for pattern in patterns:
        for name in sorted(glob.glob(pattern)):
            p = Path(name)
            if p.is_file() and p.stat().st_mtime >= since and p not in found:
                found.append(p)
    return found


def _report_outputs(graph: Graph, since: float, extra: list[str]) -> None:
    files = written_outputs(graph, since, extra)
    if files:
        print("wrote: " + ", ".join(f"{p} ({p.stat().st_size:,} bytes)" for p in files),
              file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", help="graph file (YAML)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every node as a thread of this process (debugging)")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE",
                        help="override a node parameter, e.g. --set src.path=other.wav, its math "
                             "threads: --set backbone.threads=2, or a graph variable (no dot): --set "
                             "checkpoint=runs/final (repeatable)")
    serving = parser.add_argument_group("serving (the nodes whose params take them: the gateway)")
    serving.add_argument("--tls-cert", metavar="PEM", help="serve wss:// and https:// with this certificate "
                         "(chain); sets tls_cert on every node that has it")
    serving.add_argument("--tls-key", metavar="PEM", help="the certificate's private key (tls_key)")
    serving.add_argument("--api-keys", metavar="FILE", help="only clients holding a key of FILE get in "
                         "(omniflow keys api create NAME --file FILE); sets api_keys")
    parser.add_argument("--run-dir", help="keep node configs and metrics here (default: a temp dir, removed)")
    parser.add_argument("--endpoints", help="YAML map of edge id ('a/out->b/in', or '$control.pub' / "
                                           "'$control.in') to address, e.g. tcp://10.0.0.2:5555")
    parser.add_argument("--keys", metavar="DIR",
                        help="CURVE keys from 'omniflow keys generate DIR': every tcp:// edge and "
                             "the control channel are encrypted, and only holders of the keys connect")
    parser.add_argument("--nodes", metavar="A,B,...",
                        help="run only these nodes here (their partners run on other machines; "
                             "edges between machines need 'host: ADDRESS:PORT_BASE')")
    parser.add_argument("--skip", metavar="A,B,...", help="run every node but these here")
    parser.add_argument("--launcher", choices=["local", "ray"], default="local",
                        help="local: one process per node on this machine (default); ray: one Ray "
                             "actor per node on a Ray cluster (pip install 'omniflow[ray]')")
    parser.add_argument("--address", default=None,
                        help="with --launcher ray: the cluster to join ('auto': the one 'ray start' "
                             "started; default: a new local Ray instance)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--trace", metavar="FILE.jsonl",
                        help="every node appends the stamps of the frames it receives here; "
                             "read it with 'omniflow trace FILE.jsonl'")
    parser.add_argument("--trace-every", type=int, default=1, metavar="N",
                        help="with --trace: trace one frame in N per edge (and each turn's first "
                             "and last), to keep the overhead low")
    parser.add_argument("--record", action="append", default=[], metavar="EDGE=FILE",
                        help="write every frame crossing EDGE (an output 'node/port' or an edge "
                             "id) to FILE, for nodes.replay:Replay (repeatable)")


SERVING_FLAGS = {"tls_cert": "--tls-cert", "tls_key": "--tls-key", "api_keys": "--api-keys"}


def serving_overrides(graph, args: argparse.Namespace) -> list[str]:
    """--tls-cert/--tls-key/--api-keys as `--set NODE.PARAM=VALUE` for every node whose params
    have PARAM (the core knows no gateway: a node takes them by having the param)."""
    extra = []
    for param, flag in SERVING_FLAGS.items():
        value = getattr(args, param, None)
        if value is None:
            continue
        takers = [name for name, spec in graph.nodes.items() if param in spec.params]
        if not takers:
            raise ValueError(f"{flag}: no node of {args.graph} has a '{param}' param (a gateway does). "
                             "Fix: drop the flag, or run a graph that serves clients (graphs/serve.yaml)")
        extra += [f"{name}.{param}={value}" for name in takers]
    return extra


def main(args: argparse.Namespace) -> int:
    from ..transport import CONTROL_IN, CONTROL_PUB
    from .local import LocalLauncher
    try:
        graph = load_graph(args.graph, args.set)
        extra = serving_overrides(graph, args)
        if extra:
            graph = load_graph(args.graph, [*args.set, *extra])
    except (GraphError, ValueError) as e:
        print(e if isinstance(e, GraphError) else f"omniflow run: {e}", file=sys.stderr)
        return 2
    endpoints = None
    if args.endpoints:
        with open(args.endpoints) as f:
            endpoints = {str(k): str(v) for k, v in (yaml.safe_load(f) or {}).items()}
        unknown = set(endpoints) - {e.id for e in graph.edges} - {CONTROL_PUB, CONTROL_IN}
        if unknown:
            print(f"{args.endpoints}: unknown edge ids {sorted(unknown)}. Fix: use ids printed "
                  f"by 'omniflow graph {args.graph}'", file=sys.stderr)
            return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(NodePrefixFormatter(set(graph.nodes)))
    logging.basicConfig(level=args.log_level, handlers=[handler], force=True)
    options = dict(run_dir=args.run_dir, endpoints=endpoints, log_level=args.log_level,
                   keys=args.keys, trace=args.trace, trace_every=args.trace_every)
    if args.record:
        from ..record import RecordingError, parse_record_options
        try:
            options["record"] = parse_record_options(args.record)
        except RecordingError as e:
            print(f"omniflow run: {e}", file=sys.stderr)
            return 2
    if args.nodes or args.skip:
        skip = set(filter(None, (args.skip or "").split(",")))
        chosen = list(filter(None, args.nodes.split(","))) if args.nodes else list(graph.nodes)
        unknown = skip - set(graph.nodes)
        if unknown:
            print(f"--skip: no node(s) {', '.join(sorted(unknown))}. Fix: use names from: "
                  f"{', '.join(graph.nodes)}", file=sys.stderr)
            return 2
        options["nodes"] = [n for n in chosen if n not in skip]
    try:
        if args.launcher == "ray":
            from .ray import RayLauncher
            launcher = RayLauncher(graph, address=args.address, **options)
        else:
            launcher = LocalLauncher(graph, in_process=args.in_process, **options)
    except (OSError, ValueError, RuntimeError) as e:      # keys missing, ray not installed, ...
        print(f"omniflow run: {e}", file=sys.stderr)
        return 2
    # SIGTERM stops the run like Ctrl-C; SIGINT is re-armed in case a shell started us ignoring it
    previous = {sig: signal.signal(sig, handler) for sig, handler in
                [(signal.SIGTERM, interrupt_once), (signal.SIGINT, interrupt_once)]}
    started = time.time() - 1.0            # file times have a coarse resolution on some filesystems
    try:
        result = launcher.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    extra = [*([args.trace] if args.trace else []), *options.get("record", {}).values()]
    _report_outputs(graph, started, extra)
    return result.exit_code
