"""A process's liveness as the modification time of a file, for supervisors that cannot read the
control bus (Kubernetes probes).

A node runtime (and the control bus) started with $OMNIFLOW_HEARTBEAT_FILE set touches that file
at every heartbeat, from its main loop, so the file's age says how long ago that loop last turned:
it first appears once setup() has finished, and stops ageing only while the loop runs. `probe()`
is the check a probe runs: a stdlib-only `python -c` (no omniflow import, a few ms) that fails
when the file is missing or older than the given age.
"""
from __future__ import annotations

import os

ENV = "OMNIFLOW_HEARTBEAT_FILE"

_CHECK = ("import os, sys, time; "
          "sys.exit(time.time() - os.stat(sys.argv[1]).st_mtime > float(sys.argv[2]))")


def path_from_env() -> str | None:
    return os.environ.get(ENV) or None


def beat(path: str | None) -> None:
    """Touch `path` (no-op for None); a failing touch must never stop the node."""
    if path is None:
        return
    try:
        with open(path, "a"):
            os.utime(path)
    except OSError:
        pass


def probe(path: str, max_age_s: float) -> list[str]:
    """Command that exits 0 when `path` was touched less than `max_age_s` seconds ago, else 1."""
    return ["python", "-c", _CHECK, path, f"{max_age_s:g}"]
