"""Ray launcher: each node runs the same `NodeRuntime` inside a Ray actor, anywhere on a cluster.

    omniflow run graph.yaml --launcher ray                 # a new local Ray instance
    omniflow run graph.yaml --launcher ray --address auto  # the cluster `ray start` joined
    omniflow run graph.yaml --launcher ray --address auto --keys keys/   # CURVE on every edge

Two phases, because an address is only known once a node is placed:
1. one actor per node, placed with the node's `resources:` (e.g. `{num_gpus: 1}`); each reports
   its machine's IP and reserves a free tcp port there for every output edge;
2. the endpoint map (outputs bind `tcp://<actor IP>:<port>`, the control channel binds on the
   driver's IP) goes to every actor, which runs its node.
Supervision is the local launcher's: the same control channel, heartbeats, restart policy (a
node restarts in its actor; an actor that died is replaced on the same machine, so its ports
stay valid) and the same clean shutdown. The CURVE keys travel to the actors in memory over
Ray's own (token-authenticated) channel; they are never written to a file on the workers.
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Any

import msgspec

from ..graph import Graph, NodeSpec
from ..runtime import EXIT_FAILED, LOG_FORMAT, NodeConfig
from ..security import Curve
from ..transport import CONTROL_IN, CONTROL_PUB, free_tcp_port
from .local import LOG_TAIL_LINES, LocalLauncher, ThreadWorker

log = logging.getLogger("omniflow.launch.ray")

ACTOR_THREADS = 4           # run() blocks one thread; stop() and metrics() need others
METRICS_TIMEOUT_S = 5.0
# Ray's own resources: actor option -> name in ray.cluster_resources(); the rest are custom resources
RAY_RESOURCES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}


def _ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError("the Ray launcher needs ray. Fix: pip install 'omniflow[ray]'") from None
    return ray


class NodeHost:
    """The actor that hosts one node: reports where it is, then runs the node in a thread."""

    def __init__(self, name: str, log_level: str = "INFO"):
        self.name = name
        self.worker: ThreadWorker | None = None
        logging.basicConfig(level=log_level, format=LOG_FORMAT, force=True)

    def __repr__(self) -> str:        # Ray prefixes the actor's log lines with this
        return f"omniflow:{self.name}"

    def place(self, n_ports: int) -> dict[str, Any]:
        ray = _ray()
        ip = ray.util.get_node_ip_address()
        return {"ip": ip, "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "ports": [free_tcp_port(ip) for _ in range(n_ports)]}

    def run(self, cfg_json: bytes, curve: Curve | None) -> tuple[int, str]:
        """Run the node to its end; (exit code, last error line) as the local launcher's."""
        cfg = msgspec.json.decode(cfg_json, type=NodeConfig)
        # a thread worker without a shared context: the node's runtime owns its ZeroMQ context,
        # and errors map to the same exit codes as in a node process
        self.worker = ThreadWorker(cfg, None, curve)
        self.worker.run_here()                      # on this actor thread, until the node ends
        return self.worker.code, (self.worker.tail[-1] if self.worker.tail else "")

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.terminate()

    def metrics(self) -> dict[str, int] | None:
        return self.worker.metrics() if self.worker is not None else None


class RayWorker:
    """The launcher's handle on one node running in an actor (the local workers' interface)."""

    def __init__(self, actor, cfg: NodeConfig, curve: Curve | None, pid: int | None):
        self.actor, self.cfg, self.curve, self.pid = actor, cfg, curve, pid
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.ref = None
        self.code: int | None = None
        self.actor_died = False

    def start(self) -> None:
        self.ref = self.actor.run.remote(msgspec.json.encode(self.cfg), self.curve)

    def poll(self) -> int | None:
        if self.code is not None:
            return self.code
        ray = _ray()
        ready, _ = ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        try:
            self.code, last = ray.get(self.ref)
            if last:
                self.tail.append(last)
        except ray.exceptions.RayError as e:
            self.actor_died = isinstance(e, ray.exceptions.RayActorError)
            self.code = EXIT_FAILED
            what = "the Ray actor hosting the node died" if self.actor_died else "Ray failed"
            self.tail.append(f"ERROR {what}: {str(e).splitlines()[0]}")
        return self.code

    def terminate(self) -> None:
        if self.poll() is None:
            self.actor.stop.remote()

    def kill(self) -> None:
        _ray().kill(self.actor)
        self.actor_died = True
        if self.code is None:
            self.code = EXIT_FAILED

    def metrics(self) -> dict[str, int] | None:
        if self.actor_died:
            return None
        ray = _ray()
        try:
            return ray.get(self.actor.metrics.remote(), timeout=METRICS_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError):
            return None


def ray_options(spec: NodeSpec) -> dict[str, Any]:
    """Actor options from the node's `resources:` (Ray's names; others are custom resources).
    A node without any takes no CPU slot, so a small cluster hosts a whole graph."""
    options: dict[str, Any] = {"num_cpus": 0}
    options.update((k, v) for k, v in spec.resources.items() if k in RAY_RESOURCES)
    custom = {k: v for k, v in spec.resources.items() if k not in RAY_RESOURCES}
    if custom:
        options["resources"] = custom
    return options


def check_resources(graph: Graph, cluster: dict[str, float]) -> None:
    """A node asking for more than the whole cluster has would wait for ever: say so now."""
    for spec in graph.nodes.values():
        for key, amount in spec.resources.items():
            have = cluster.get(RAY_RESOURCES.get(key, key), 0)
            if amount > have:
                raise ValueError(f"node '{spec.name}' asks for {key}={amount:g} but the Ray cluster "
                                 f"has {have:g} in all. Fix: add machines that have it (ray start "
                                 "--num-gpus=N ...), or lower the node's 'resources:'")


class RayLauncher(LocalLauncher):
    def __init__(self, graph: Graph, *, address: str | None = None, **options):
        if options.pop("in_process", False) or options.pop("nodes", None) is not None:
            raise ValueError("--in-process and --nodes do not apply to --launcher ray: it places "
                             "every node of the graph in a Ray actor")
        ray = _ray()
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(address=address, include_dashboard=False,
                     runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
        self._actor_class = ray.remote(max_concurrency=ACTOR_THREADS)(NodeHost)
        self.actors: dict[str, Any] = {}
        self.placement: dict[str, dict[str, Any]] = {}
        try:
            super().__init__(graph, **options)     # calls _endpoint_map below: phase 1 is there
        except BaseException:
            self._release()
            raise

    def _new_actor(self, spec: NodeSpec, node_id: str | None = None):
        opts = ray_options(spec)
        if node_id is not None:                # a replacement: same machine, same ports
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        return self._actor_class.options(**opts).remote(spec.name, self.log_level)

    def _endpoint_map(self, overrides: dict[str, str] | None) -> dict[str, str]:
        """Phase 1: place every node; its outputs bind on its machine, the control channel here."""
        ray = _ray()
        overrides = overrides or {}
        check_resources(self.graph, ray.cluster_resources())
        for name, spec in self.graph.nodes.items():
            self.actors[name] = self._new_actor(spec)
        names = list(self.graph.nodes)
        n_out = {name: len(self.graph.outputs_of(name)) for name in names}
        placed = ray.get([self.actors[n].place.remote(n_out[n]) for n in names])
        self.placement = dict(zip(names, placed, strict=True))
        here = ray.util.get_node_ip_address()
        endpoints = {key: overrides.get(key, f"tcp://{here}:{free_tcp_port(here)}")
                     for key in (CONTROL_PUB, CONTROL_IN)}
        ports = {name: iter(p["ports"]) for name, p in self.placement.items()}
        for edge in self.graph.edges:
            where = self.placement[edge.src]
            endpoints[edge.id] = overrides.get(edge.id, f"tcp://{where['ip']}:{next(ports[edge.src])}")
        for name, where in self.placement.items():
            log.info("node '%s' placed on %s (pid %s)", name, where["ip"], where["pid"])
        return endpoints

    def _worker(self, spec: NodeSpec) -> RayWorker:
        """Phase 2 (and every restart): run the node in its actor with the whole endpoint map."""
        old = self.workers.get(spec.name)
        if old is not None and old.actor_died:
            self.actors[spec.name] = self._new_actor(spec, self.placement[spec.name]["node_id"])
            self.placement[spec.name]["pid"] = _ray().get(self.actors[spec.name].place.remote(0))["pid"]
        cfg = msgspec.structs.replace(self._node_config(spec), parent_pid=None, keys_dir=None,
                                      metrics_path=None)
        return RayWorker(self.actors[spec.name], cfg, self.curve, self.placement[spec.name]["pid"])

    def run(self):
        try:
            return super().run()
        finally:
            self._release()

    def _release(self) -> None:
        """Kill our actors (Ray would keep them while the driver lives) and a Ray we started."""
        ray = _ray()
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
        if self._started_ray:
            ray.shutdown()
