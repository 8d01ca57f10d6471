"""The CPU plan of a graph: how many math threads (torch, OpenMP, MKL) each node process gets.

Every node process that loads torch starts, by default, one math thread per core. On a small
machine a graph of several such nodes then runs cores x nodes threads that preempt each other in
the middle of their parallel regions, and every node slows down. The plan gives each node a
thread count so that the compute-heavy nodes add up to the machine:

* a node with `threads: N` in the graph gets N;
* a light node (class attribute `cpu_weight = 0`: I/O, bookkeeping) gets 1;
* the heavy nodes without `threads:` share the cores the explicit heavy nodes left, in proportion
  to their `cpu_weight`, at least 1 each;
* a heavy node that works in bursts (class attribute `cpu_burst = True`: the Whisper encoder, one
  encode per utterance, on the turn's critical path while that turn's decode has not begun) gets
  every core and does not count against the others: the brief overlap with other sessions'
  decode costs less than an encode at a fraction of the machine (`omniflow bench live`, README).

    plan = cpu_plan(graph)              # {node: threads}, with plan.warnings
    plan = cpu_plan(graph, cores=16)

A plan whose heavy nodes ask for more threads than there are cores, where lowering a count would
help (some node has more than 1), comes with a warning; the launcher logs it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..graph import Graph, import_class

LIGHT_THREADS = 1     # a node that mostly waits on I/O needs no parallel math


@dataclass
class CpuPlan:
    threads: dict[str, int]                        # node -> math threads
    cores: int
    heavy: list[str] = field(default_factory=list)  # nodes that count against the cores
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One log line: the threads of the heavy nodes, and the machine."""
        heavy = ", ".join(f"{n} {self.threads[n]}" for n in self.heavy) or "none"
        return (f"CPU plan on {self.cores} cores: threads {heavy}; "
                f"{len(self.threads) - len(self.heavy)} light node(s) 1 each")


def cpu_weight(use: str) -> int:
    """The node class's `cpu_weight` (0 when it declares none or cannot be imported here)."""
    return int(_attr(use, "cpu_weight") or 0)


def cpu_burst(use: str) -> bool:
    """The node class's `cpu_burst` (False when it declares none or cannot be imported here)."""
    return bool(_attr(use, "cpu_burst"))


def _attr(use: str, name: str):
    try:
        return getattr(import_class(use), name, None)
    except (ImportError, AttributeError, ValueError):
        return None


def cpu_plan(graph: Graph, cores: int | None = None, nodes: list[str] | None = None) -> CpuPlan:
    """Threads per node of `graph` (only `nodes`, the ones this machine runs, when given) on a
    machine of `cores` cores (default: the cores this process may run on)."""
    cores = cores or available_cores()
    names = list(nodes) if nodes is not None else list(graph.nodes)
    weights = {n: cpu_weight(graph.nodes[n].use) for n in names}
    explicit = {n: graph.nodes[n].threads for n in names if graph.nodes[n].threads is not None}
    threads: dict[str, int] = {}
    heavy = [n for n in names if weights[n] > 0 or explicit.get(n, LIGHT_THREADS) > LIGHT_THREADS]
    burst = {n for n in heavy if n not in explicit and cpu_burst(graph.nodes[n].use)}
    shared = [n for n in heavy if n not in explicit and n not in burst]   # heavy, no `threads:`
    left = max(0, cores - sum(explicit[n] for n in heavy if n in explicit))
    total_weight = sum(weights[n] for n in shared)
    for n in names:
        if n in explicit:
            threads[n] = explicit[n]
        elif n in burst:
            threads[n] = cores
        elif n in shared:
            threads[n] = max(1, left * weights[n] // total_weight)
        else:
            threads[n] = LIGHT_THREADS
    plan = CpuPlan(threads, cores, heavy)
    counted = [n for n in heavy if n not in burst]       # the nodes that run at the same time
    demand = sum(threads[n] for n in counted)
    if demand > cores and any(threads[n] > 1 for n in counted):
        asked = ", ".join(f"{n} ({threads[n]})" for n in counted)
        plan.warnings.append(
            f"{graph.path}: the compute-heavy nodes {asked} run {demand} math threads on "
            f"{cores} cores: they preempt each other and every one slows down. Fix: lower their "
            "'threads:' so they add up to the cores (or remove 'threads:' and the launcher splits "
            "the cores itself)")
    return plan


def available_cores() -> int:
    """Cores this process may run on (its affinity mask: a container's CPU set), else cpu_count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def others_running() -> int | None:
    """Threads of other processes running or runnable right now, machine-wide (/proc/stat's
    procs_running less the caller's own); None where the kernel does not say (not Linux). In a
    container that sees the host's /proc/stat this counts the host's: callers that take free
    cores only when this is low then simply take none."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"procs_running"):
                    return max(0, int(line.split()[1]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    return None
