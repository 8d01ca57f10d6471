"""`omniflow` command line: one subcommand per module, imported only when used.

Each subcommand module exposes `add_arguments(parser)` and `main(args) -> int | None`; a module
serving several commands names them per command: `add_<command>_arguments`, `<command>_main`.
Commands of the core are listed here; those of the model, trainer and benchmarks come from
`omniflow.plugins.COMMANDS` (by module name: the core imports no model code).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import plugins
from .errors import EXPECTED_ERRORS

DEBUG_ENV = "OMNIFLOW_DEBUG"     # set: expected failures raise with their traceback

# name -> (module, one-line help). Modules are imported lazily so `omniflow --help` is instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("omniflow.launch.cli_run", "run a graph (one process per node by default)"),
    "validate": ("omniflow.graph_cli", "check a graph file without starting anything"),
    "graph": ("omniflow.graph_cli", "print a graph as Mermaid text"),
    "keys": ("omniflow.security", "CURVE keys for secured tcp edges (keys generate DIR | show DIR); API keys for gateway clients (keys api create|list|revoke)"),
    "export": ("omniflow.launch.k8s", "export a graph for another platform: export k8s GRAPH --out DIR"),
    "trace": ("omniflow.trace", "per-hop latency of a run traced with 'run --trace FILE.jsonl'"),
    "record": ("omniflow.record_cli", "run a graph recording the frames of an edge: record GRAPH --edge E --out F"),
    "replay": ("omniflow.record_cli", "show what a recording holds (replay it with a nodes.replay:Replay node)"),
    "doctor": ("omniflow.doctor", "check this machine: Python, torch/CUDA, bf16, libzmq/CURVE, extras, weights"),
    **plugins.COMMANDS,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omniflow",
        description="Run Mini-Omni speech-to-speech models as streaming graphs of nodes.",
        epilog="Start with:  omniflow fetch --demo && omniflow run graphs/speech_to_speech.yaml",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name in sys.argv[1:2]:          # only the chosen command's module is imported
            mod = plugins.load(module, f"omniflow {name}")
            (getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv[1:] = argv
    try:
        args = build_parser().parse_args()
    except plugins.PluginMissing as e:
        print(f"omniflow: error: {e}", file=sys.stderr)
        return 1
    mod = importlib.import_module(args._module)
    entry = getattr(mod, f"{args.command}_main", None) or mod.main
    try:
        return int(entry(args) or 0)
    except ModuleNotFoundError as e:           # a package of an extra that is not installed
        print(f"omniflow {args.command}: error: {plugins.PluginMissing.for_package(e.name, args.command)}",
              file=sys.stderr)
        return 1
    except EXPECTED_ERRORS as e:               # its message names the problem and the fix
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"omniflow {args.command}: error: {e}  (traceback: {DEBUG_ENV}=1)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
