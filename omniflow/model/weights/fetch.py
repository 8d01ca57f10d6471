"""`omniflow fetch`: download the official weights into the cache, or write the demo set."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Iterable

from .components import DEFAULT_HOME, HOME_ENV, WHISPER_PREFIX, component_dirs, home
from .demo import MINIOMNI_TRUNK, write_demo
from .resolve import is_demo

log = logging.getLogger("omniflow.weights")


def fetch(root: Path, whisper: Iterable[str] = ("small",)) -> dict[str, Path]:
    """Download the official weights into `root` (see hub.py)."""
    import shutil

    from . import hub

    whisper = list(whisper)
    dirs = component_dirs(Path(root).expanduser(), whisper)
    for folder in dirs.values():
        if is_demo(folder):        # demo files have the real names: the downloader would keep them
            log.warning("replacing the demo weights in %s with the real ones", folder)
            shutil.rmtree(folder)
    out = {"miniomni": Path(hub.fetch_miniomni(dirs["miniomni"])),
           "snac": Path(hub.fetch_snac(dirs["snac"]))}
    for name in whisper:
        out[WHISPER_PREFIX + name] = Path(hub.fetch_whisper(name, dirs[WHISPER_PREFIX + name]))
    return out


# --- CLI: omniflow fetch -----------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demo", action="store_true",
                        help="write randomly initialised weights in the official formats (no download; "
                             "output is not speech)")
    parser.add_argument("--demo-size", choices=sorted(MINIOMNI_TRUNK), default="tiny",
                        help="tiny: runs on 2 CPU cores in seconds; real: official shapes, for benchmarks")
    parser.add_argument("--home", default=None,
                        help=f"cache directory (default ${HOME_ENV} or {DEFAULT_HOME})")
    parser.add_argument("--whisper", action="append", default=None, metavar="SIZE",
                        help="openai-whisper size to fetch (repeatable; default: small)")


def main(args: argparse.Namespace) -> int:
    root = home(args.home)
    whisper = args.whisper or ["small"]
    try:
        if args.demo:
            written = write_demo(root, whisper, size=args.demo_size)
            print(f"wrote DEMO weights ({args.demo_size}, random: output is not speech) to {root}:")
        else:
            written = fetch(root, whisper)
            print(f"fetched weights to {root}:")
    except (OSError, RuntimeError, ValueError) as e:    # DownloadError is a RuntimeError
        print(f"omniflow fetch: error: {e}", file=sys.stderr)
        return 1
    for component, path in written.items():
        print(f"  {component:16s} {path}")
    if args.home and Path(args.home).expanduser() != home():
        print(f"use them with: export {HOME_ENV}={root}")
    return 0
