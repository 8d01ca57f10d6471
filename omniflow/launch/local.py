"""Local launcher: one OS process per node (or one thread per node with `in_process=True`).

The launcher builds the endpoint map, starts every node, forwards the control channel, applies
each node's restart policy (never | on-failure | always, at most `max_restarts` times, waiting
`backoff_s` doubled per restart) and returns when every node has exited, when a node failed for
good, or on Ctrl-C / SIGTERM (every node is then stopped within `STOP_GRACE_S`). Node logs are
prefixed with the node's name.

    result = run_graph(load_graph("graphs/demo.yaml"))
    assert result.ok, result.message

Across machines, one launcher per machine runs its part of the same graph (`nodes=`); the edges
between the parts are tcp:// (nodes with `host: ADDRESS:PORT_BASE`), so every launcher computes
the same endpoint map. Each launcher has its own control channel: a new turn reaches the other
machine with its data (see runtime.py).
"""
from __future__ import annotations

import collections
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Collection

import msgspec
import zmq

from ..graph import Graph, NodeSpec
from ..runtime import (EXIT_OK, EXIT_SETUP_FAILED, Metrics, NodeConfig, NodeRuntime, run_config,
                       thread_env)
from ..security import Curve
from ..transport import CONTROL_IN, CONTROL_PUB, endpoint_map, ipc_dir_fits, wiring_for
from .bus import ControlBus
from .plan import cpu_plan

STOP_GRACE_S = 4.0          # SIGTERM, then SIGKILL after this: every node is gone within 5 s
MONITOR_POLL_MS = 50        # how often the launcher checks its children
LOG_TAIL_LINES = 20         # lines of a node's output kept to explain its failure
SILENT_WARN_S = 10.0        # warn when a running node has not sent a heartbeat for this long

log = logging.getLogger("omniflow.launch")


class RunResult(msgspec.Struct):
    ok: bool
    message: str
    exit_codes: dict[str, int]                  # last exit code per node that exited
    restarts: dict[str, int]
    metrics: dict[str, dict[str, int]]          # per node: frames_in, frames_out, dropped..., rejected
    run_dir: str | None = None                  # kept only when the caller chose it
    interrupted: bool = False                   # Ctrl-C or SIGTERM

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 0 if self.ok else 1


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    if code == EXIT_SETUP_FAILED:
        return "failed in setup()"
    return f"exited with code {code}"


# --- workers: one running instance of a node -------------------------------------------------

class ProcessWorker:
    """A node in its own OS process; its output lines are prefixed with `[name]`."""

    def __init__(self, cfg: NodeConfig, cfg_path: Path):
        self.cfg, self.cfg_path = cfg, cfg_path
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.cfg_path.write_bytes(msgspec.json.encode(self.cfg))
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)),
                   **thread_env(self.cfg.threads))   # torch/OpenMP/MKL read these as they load
        self.proc = subprocess.Popen([sys.executable, "-m", "omniflow.runtime", str(self.cfg_path)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._relay, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _relay(self, stream) -> None:
        for line in stream:
            self.tail.append(line.rstrip("\n"))
            sys.stderr.write(f"[{self.cfg.name}] {line}")
        stream.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is not None:
            self._reader.join(timeout=1.0)        # let its last lines (the error) come out first
        return code

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def metrics(self) -> dict[str, int] | None:
        path = Path(self.cfg.metrics_path)
        return msgspec.json.decode(path.read_bytes()) if path.exists() else None


class ThreadWorker:
    """A node on a thread of the launcher's process (debugging, tests); sockets are inproc://."""

    def __init__(self, cfg: NodeConfig, context: zmq.Context | None, curve: Curve | None = None):
        self.cfg, self.context, self.curve = cfg, context, curve
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.code: int | None = None
        self.runtime: NodeRuntime | None = None
        self.pid = None

    def start(self) -> None:
        self.code = None
        self._thread = threading.Thread(target=self.run_here, name=self.cfg.name, daemon=True)
        self._thread.start()

    def _hosting(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        runtime.metrics_level = logging.DEBUG     # the launcher prints them from self.metrics()

    def run_here(self) -> None:
        """Run the node on the calling thread until it ends (`start` calls it on a new thread)."""
        self.code, error = run_config(self.cfg, context=self.context, curve=self.curve,
                                      started=self._hosting)
        if error:
            self.tail.append(error)

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else self.code

    def terminate(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()

    def kill(self) -> None:
        self.terminate()
        self._thread.join(timeout=1.0)

    def metrics(self) -> dict[str, int] | None:
        return msgspec.structs.asdict(self.runtime.metrics) if self.runtime else None


# --- the launcher ----------------------------------------------------------------------------

class LocalLauncher:
    def __init__(self, graph: Graph, *, in_process: bool = False, run_dir: str | Path | None = None,
                 endpoints: dict[str, str] | None = None, log_level: str = "INFO",
                 keys: str | Path | None = None, nodes: Collection[str] | None = None,
                 trace: str | Path | None = None, trace_every: int = 1,
                 record: dict[str, str] | None = None):
        self.graph, self.in_process, self.log_level = graph, in_process, log_level
        # observability (trace.py, record.py): what every node's runtime taps on its inputs
        self.trace, self.trace_every, self.record = None, trace_every, {}
        if trace:
            from ..trace import start_trace
            self.trace = start_trace(trace, trace_every)      # a fresh file, absolute path
        if record:
            from ..record import start_recordings
            self.record = start_recordings(graph, record)     # edge id -> fresh file
        self.here = list(nodes) if nodes is not None else list(graph.nodes)   # nodes we run
        # CURVE keys (security.py): node processes load them from the directory themselves
        self.keys_dir = str(Path(keys).resolve()) if keys else None
        self.curve = Curve.load(keys) if keys else None
        self.keep_run_dir = run_dir is not None
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="omniflow-"))
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)   # (mkdtemp's is 0700 too)
        self.sock_dir = self.run_dir / "ipc"
        if not ipc_dir_fits(self.sock_dir.resolve()):    # ipc:// paths are length-limited
            self.sock_dir = Path(tempfile.mkdtemp(prefix="omniflow-ipc-"))
        self.sock_dir.mkdir(exist_ok=True)
        os.chmod(self.sock_dir, 0o700)        # ipc sockets: only this user may connect to them
        try:
            self.endpoints = self._endpoint_map(endpoints)
            if nodes is not None:
                check_split(graph, self.here, self.endpoints)
        except Exception:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
            if not self.keep_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self.context = zmq.Context()
        self.workers: dict[str, ProcessWorker | ThreadWorker] = {}
        self.restarts = {name: 0 for name in self.here}
        self.heartbeats: dict[str, dict[str, Any]] = {}     # node -> last heartbeat's meta
        self._stop_reason: str | None = None
        self._silent: set[str] = set()                      # nodes warned about as silent
        self.plan = cpu_plan(graph, nodes=self.here)        # math threads per node (plan.py)

    def _endpoint_map(self, overrides: dict[str, str] | None) -> dict[str, str]:
        """Every address of the run (a Ray launcher builds its own from its actors' IPs)."""
        return endpoint_map(self.graph, "inproc" if self.in_process else "ipc",
                            self.sock_dir.resolve(), overrides)

    def stop(self, reason: str = "stopped") -> None:
        """Ask `run()` to stop every node and return (thread-safe)."""
        self._stop_reason = reason

    def _node_config(self, spec: NodeSpec) -> NodeConfig:
        (self.run_dir / "nodes").mkdir(exist_ok=True)
        return NodeConfig(name=spec.name, use=spec.use, params=spec.params,
                          wiring=wiring_for(self.graph, spec.name, self.endpoints),
                          log_level=self.log_level, parent_pid=os.getpid(), keys_dir=self.keys_dir,
                          metrics_path=str(self.run_dir / "nodes" / f"{spec.name}.metrics.json"),
                          trace_path=self.trace, trace_every=self.trace_every, record=self.record,
                          threads=self.plan.threads[spec.name], restarted=self.restarts.get(spec.name, 0))

    def _worker(self, spec: NodeSpec):
        cfg = self._node_config(spec)
        if self.in_process:
            return ThreadWorker(cfg, self.context, self.curve)
        return ProcessWorker(cfg, self.run_dir / "nodes" / f"{spec.name}.json")

    def run(self) -> RunResult:
        self._started_at = time.monotonic()
        bus = ControlBus(self.context, self.endpoints[CONTROL_PUB], self.endpoints[CONTROL_IN],
                         self.curve, on_heartbeat=self._on_heartbeat, on_stop=self.stop,
                         nodes=self.here, on_ready=self._on_ready, restarts=lambda: self.restarts)
        log.info("%s", self.plan.line())
        for warning in self.plan.warnings:
            log.warning("%s", warning)
        codes: dict[str, int] = {}
        ok, message, interrupted = True, "every node finished", False
        try:
            for name in self.here:
                self.workers[name] = self._worker(self.graph.nodes[name])
                self.workers[name].start()
            log.info("started %d nodes (%s); run dir %s", len(self.workers),
                     "threads" if self.in_process else "processes", self.run_dir)
            ok, message = self._supervise(bus, codes)
        except KeyboardInterrupt:
            ok, message, interrupted = False, "interrupted (Ctrl-C or SIGTERM): stopped every node", True
        finally:
            self._stop_all(codes)
            bus.close()
            if all(w.poll() is not None for w in self.workers.values()):
                self.context.term()          # (a node thread stuck in a call would block it)
            metrics = self._collect_metrics()
            shutil.rmtree(self.sock_dir, ignore_errors=True)
            if not self.keep_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
        for name, m in metrics.items():
            log.info("[%s] %s", name, Metrics(**m).line())
        if ok and not interrupted and (failing := failed_every_turn(metrics)):
            ok, message = False, failing
        (log.info if ok else log.error)("%s", message)
        return RunResult(ok, message, codes, dict(self.restarts), metrics,
                         str(self.run_dir) if self.keep_run_dir else None, interrupted)

    def _supervise(self, bus: ControlBus, codes: dict[str, int]) -> tuple[bool, str]:
        done: set[str] = set()
        due: dict[str, float] = {}                      # node -> when to restart it
        poller = zmq.Poller()
        bus.register(poller)
        while True:
            bus.handle(dict(poller.poll(MONITOR_POLL_MS)))
            if self._stop_reason is not None:
                return True, self._stop_reason
            now = time.monotonic()
            for name, worker in self.workers.items():
                if name in done or name in due:
                    continue
                code = worker.poll()
                if code is None:
                    continue
                codes[name] = code
                spec = self.graph.nodes[name]
                if code == EXIT_SETUP_FAILED:
                    return False, self._failure(name, code, "a node that cannot set up stops the run")
                wanted = spec.restart == "always" or (spec.restart == "on-failure" and code != EXIT_OK)
                if wanted and self.restarts[name] < spec.max_restarts:
                    delay = spec.backoff_s * 2 ** self.restarts[name]
                    log.warning("node '%s' %s; restarting it in %.1f s (restart %d of %d)", name,
                                describe_exit(code), delay, self.restarts[name] + 1, spec.max_restarts)
                    due[name] = now + delay
                    self.heartbeats.pop(name, None)       # the next instance beats anew
                elif code != EXIT_OK:
                    why = (f"its restart policy is '{spec.restart}'. Fix: set 'restart: on-failure' "
                           "on it to restart it" if spec.restart == "never" else
                           f"it already restarted {self.restarts[name]} times (max_restarts)")
                    return False, self._failure(name, code, why)
                else:
                    done.add(name)
            self._warn_silent(done | set(due))
            for name, when in list(due.items()):
                if now >= when:
                    del due[name]
                    self.restarts[name] += 1
                    self.workers[name] = self._worker(self.graph.nodes[name])
                    self.workers[name].start()
            if len(done) == len(self.workers):
                return True, "every node finished"

    def _warn_silent(self, not_running: set[str]) -> None:
        """A node stuck in one call (or hung) stops sending heartbeats: say so, once."""
        now = time.monotonic()
        for name, beat in self.heartbeats.items():
            if name not in not_running and name not in self._silent \
                    and now - beat["received"] > SILENT_WARN_S:
                self._silent.add(name)
                log.warning("node '%s' has sent no heartbeat for %.0f s: it is stuck in a long "
                            "call or hung (kill -USR1 %s prints its stack)", name,
                            now - beat["received"], beat.get("pid"))

    def _failure(self, name: str, code: int, why: str) -> str:
        errors = [l for l in self.workers[name].tail if l.startswith(("ERROR", "Traceback"))
                  or "Error" in l]
        said = f"node '{name}' {describe_exit(code)}: "        # the node's own error line says it
        detail = f": {errors[-1].removeprefix('ERROR ').removeprefix(said)}" if errors else ""
        return f"node '{name}' {describe_exit(code)}{detail}; {why}. Stopping the run"

    def _on_ready(self) -> None:
        log.info("graph ready: every node finished setup() in %.1f s; sources start now",
                 time.monotonic() - self._started_at)

    def _on_heartbeat(self, meta: dict[str, Any]) -> None:
        node = str(meta.get("node"))
        if node in self._silent:
            log.info("node '%s' is responsive again", node)
            self._silent.discard(node)
        self.heartbeats[node] = {**meta, "received": time.monotonic()}

    def _stop_all(self, codes: dict[str, int]) -> None:
        for worker in self.workers.values():
            worker.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for name, worker in self.workers.items():
            while worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if worker.poll() is None:
                log.warning("node '%s' did not stop within %.0f s; killing it", name, STOP_GRACE_S)
                worker.kill()
            code = worker.poll()
            if code is not None:
                codes[name] = code

    def _collect_metrics(self) -> dict[str, dict[str, int]]:
        out = {}
        for name, worker in self.workers.items():
            m = worker.metrics() or self.heartbeats.get(name, {}).get("metrics")
            if m is not None:
                out[name] = m
        return out


def failed_every_turn(metrics: dict[str, dict[str, int]]) -> str | None:
    """Why a run whose nodes ran must still fail: a node failed every turn it handled (each of
    them logged its error and told its user), so the run produced nothing; None otherwise."""
    for name, m in metrics.items():
        turns, failed = m.get("turns", 0), m.get("failed_turns", 0)
        if turns and failed >= turns:
            return (f"node '{name}' failed every turn it handled ({failed} of {turns}; its log says why): "
                    "the run produced no answer")
    return None


def check_split(graph: Graph, here: list[str], endpoints: dict[str, str]) -> None:
    """Running only `here` on this machine: every edge to or from another machine must be tcp."""
    unknown = [n for n in here if n not in graph.nodes]
    if unknown:
        raise ValueError(f"no node(s) {', '.join(unknown)} in {graph.path}. "
                         f"Fix: use names from: {', '.join(graph.nodes)}")
    for edge in graph.edges:
        if (edge.src in here) != (edge.dst in here) and not endpoints[edge.id].startswith("tcp://"):
            raise ValueError(f"edge {edge.id} crosses machines but is {endpoints[edge.id]}, which "
                             f"only this machine can reach. Fix: give node '{edge.src}' a "
                             "'host: ADDRESS:PORT_BASE' in the graph")


def run_graph(graph: Graph, **options) -> RunResult:
    """Run `graph` to completion; options as `LocalLauncher` (in_process, run_dir, endpoints, log_level,
    keys, nodes, trace, trace_every, record)."""
    return LocalLauncher(graph, **options).run()
