"""`omniflow export k8s graph.yaml --out DIR`: Kubernetes manifests that run the graph, one pod per node.

    docker build -t registry/omniflow:cpu .                         # Dockerfile (Dockerfile.cuda: GPUs)
    omniflow export k8s graphs/serve.yaml --out k8s/ --image registry/omniflow:cpu \\
        --cuda-image registry/omniflow:cuda --namespace voice --keys keys/
    kubectl apply -f k8s/

Every object is named `<graph>-...` (the graph file's stem) and labelled
`app.kubernetes.io/instance: <graph>`, so two graphs share a namespace. What is written:
* `config.yaml`: a ConfigMap with one `NODE.json` per node: the `NodeConfig` a node container
  runs with `python -m omniflow.runtime /etc/omniflow/config/NODE.json` (no secrets in it).
* `NODE.yaml`: the node's workload `<graph>-<node>`, and a Service of that name when it has outputs.
  Its outputs bind `tcp://*:PORT` in the pod; consumers connect to `tcp://<graph>-<node>.NS.svc:PORT`.
  - A graph with a server node (a class with `listen = (host param, port param)`: the gateway)
    runs every node as a Deployment: the pipeline behind a server lives as long as the server.
    The server binds 0.0.0.0 in its pod, and its port is on the Service `<graph>-<node>-public`
    (`--service-type`: ClusterIP, NodePort or LoadBalancer).
  - Any other graph is a batch run: a node's restart policy `always` -> Deployment; `on-failure` ->
    Job (restartPolicy OnFailure, backoffLimit = max_restarts); `never` -> Job (Never, backoffLimit 0).
* Probes. Every node process and the control bus touch $OMNIFLOW_HEARTBEAT_FILE at each heartbeat
  of their main loop (omniflow/heartbeat_file.py), from the end of setup() on: a startup probe
  waits for the first (weights load for minutes), a liveness probe restarts a pod whose loop has
  not turned for LIVENESS_AGE_S, a readiness probe checks it is fresh; a server's readiness is
  GET /healthz on its port (200 once every node of the graph is up and beating).
* Resources from the graph's `threads:` (or, without it, the node's CPU plan: 1 thread for a light
  node, `cpu_weight` threads for a heavy one): the math threads are capped in the pod (the thread
  variables and NodeConfig.threads), a heavy node requests that many CPUs and HEAVY_MEMORY per
  thread, a light one LIGHT_CPU and LIGHT_MEMORY; `resources: {num_cpus, memory}` override them.
  A node whose params say `device: cuda...` gets `nvidia.com/gpu` (1, or `resources.num_gpus`) and
  the CUDA image; no other node asks for a GPU.
* `weights.yaml`: the PersistentVolumeClaim `<graph>-weights` (`--weights-size`,
  `--weights-access`) and the Job `<graph>-fetch-weights` that fills it with `omniflow fetch`
  (`--demo-weights`: `fetch --demo`). Every node pod mounts the claim at $OMNIFLOW_HOME
  (WEIGHTS_DIR). `--weights-claim NAME` mounts an existing claim instead and writes neither.
* `control.yaml`: the control bus (`python -m omniflow.launch.bus`), a Deployment and the Service
  `<graph>-control`: nodes announce turns (barge-in) and heartbeats on it, as in a local run.
* `api-keys.yaml` (with --api-keys FILE): the server's API key file (hashes of the keys) as a
  Secret mounted at /etc/omniflow/api-keys; the server's `api_keys` param points there. A keyed
  export of a graph with a server needs it (the gateway refuses to serve keyless edges' clients).
* `secret.yaml` (with --keys): the CURVE keys as a Secret mounted read-only at
  /etc/omniflow/keys; every tcp edge is then CURVE-secured. The file holds the secret key: it is
  written 0600; keep it out of version control.

Nodes reach each other through the Services only. There is no launcher: Kubernetes supervises each
pod. Paths in params (weights, files) are paths inside the container image or volumes. The pods run
as the image's user (UID 10001, see Dockerfile).
"""
from __future__ import annotations

import argparse
import base64
import os
import re
import sys
from pathlib import Path
from typing import Any

import msgspec
import yaml

from .. import heartbeat_file
from ..graph import Graph, GraphError, NodeSpec, import_class, load_graph
from ..runtime import NodeConfig, thread_env
from ..security import KEY_NAME, Curve
from ..transport import CONTROL_IN, CONTROL_PUB, wiring_for

NODE_PORT_BASE = 5600            # a node's k-th output edge binds this + k in its own pod
CONTROL_PORTS = {CONTROL_PUB: 5590, CONTROL_IN: 5591}     # the control bus's pod
CONFIG_DIR = "/etc/omniflow/config"
KEYS_DIR = "/etc/omniflow/keys"
API_KEYS_DIR = "/etc/omniflow/api-keys"    # the server's API key file (hashes), from --api-keys
API_KEYS_FILE = "api.json"
API_KEYS_PARAM = "api_keys"                # a server's param naming that file (the gateway's)
WEIGHTS_DIR = "/var/lib/omniflow"          # $OMNIFLOW_HOME in every pod: the weights volume
HEARTBEAT_PATH = "/tmp/omniflow-heartbeat"  # $OMNIFLOW_HEARTBEAT_FILE in every pod
DEFAULT_IMAGE = "omniflow:cpu"             # docker build -t omniflow:cpu .
DEFAULT_CUDA_IMAGE = "omniflow:cuda"       # docker build -f Dockerfile.cuda -t omniflow:cuda .
GPU_RESOURCE = "nvidia.com/gpu"
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
POD_USER = 10001                  # the image's user (Dockerfile); fsGroup makes volumes its group's
SECRET_FILE_MODE = 0o440          # the keys inside a pod: readable by the node's user (its group) only
LIGHT_CPU, LIGHT_MEMORY = "250m", "256Mi"  # a light node (I/O, bookkeeping): mostly waits
HEAVY_MEMORY_GI = 2                        # GiB requested per math thread of a heavy node
STARTUP_PERIOD_S, STARTUP_FAILURES = 10, 60   # setup() (weights, compile) may take 10 minutes
LIVENESS_AGE_S = 60               # a main loop stuck this long (no heartbeat) is restarted
READINESS_AGE_S = 15
HEALTHZ = "/healthz"
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
ACCESS_MODES = ("ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod")


def dns_name(name: str, what: str) -> str:
    """Kubernetes object names are DNS labels: lowercase letters, digits and '-'."""
    label = name.lower().replace("_", "-")
    if not DNS_LABEL.fullmatch(label) or len(label) > 63:
        raise ValueError(f"{what} '{name}' cannot be a Kubernetes name ('{label}' is not a DNS "
                         "label of at most 63 characters). Fix: rename it with letters, digits and "
                         "'-', starting with a letter")
    return label


def instance_name(graph: Graph) -> str:
    """The graph's name in Kubernetes (its file's stem): every object's name starts with it."""
    return dns_name(Path(graph.path).stem, "graph file name")


def object_names(graph: Graph) -> dict[str, str]:
    """node -> `<graph>-<node>`, the name of its workload and Service."""
    instance = instance_name(graph)
    names = {n: dns_name(f"{instance}-{dns_name(n, 'node')}", f"node '{n}' with its graph's name")
             for n in graph.nodes}
    seen: dict[str, str] = {}
    for node, label in names.items():
        if label in seen:
            raise ValueError(f"nodes '{seen[label]}' and '{node}' both become '{label}' in "
                             "Kubernetes. Fix: rename one of them")
        seen[label] = node
    return names


def control_name(graph: Graph) -> str:
    name = f"{instance_name(graph)}-control"
    if name in object_names(graph).values():
        raise ValueError(f"a node becomes '{name}', the name of the control bus's Service. "
                         "Fix: rename that node")
    return name


def servers(graph: Graph) -> dict[str, tuple[str, str]]:
    """node -> (host param, port param) of the nodes that serve clients (their class's `listen`)."""
    found = {}
    for name, spec in graph.nodes.items():
        listen = getattr(import_class(spec.use), "listen", None)
        if listen:
            found[name] = tuple(listen)
    return found


def endpoints(graph: Graph, namespace: str) -> tuple[dict[str, str], dict[str, str], dict[str, int]]:
    """(connect map, bind map, edge -> port): consumers dial the producer's Service DNS name,
    producers bind every interface of their pod; every node dials the control bus's Service."""
    names = object_names(graph)
    bus = control_name(graph)
    connect = {key: f"tcp://{bus}.{namespace}.svc:{port}" for key, port in CONTROL_PORTS.items()}
    bind, ports = {}, {}
    for name in graph.nodes:
        for k, edge in enumerate(graph.outputs_of(name)):
            ports[edge.id] = NODE_PORT_BASE + k
            connect[edge.id] = f"tcp://{names[name]}.{namespace}.svc:{ports[edge.id]}"
            bind[edge.id] = f"tcp://*:{ports[edge.id]}"
    return connect, bind, ports


def node_threads(spec: NodeSpec) -> int:
    """The node's math threads in its pod: the graph's `threads:`, else 1 for a light node and its
    class's `cpu_weight` for a heavy one (the CPU plan's weights, on a pod of its own)."""
    if spec.threads is not None:
        return spec.threads
    return max(1, int(getattr(import_class(spec.use), "cpu_weight", 0) or 0))


def is_heavy(spec: NodeSpec) -> bool:
    return node_threads(spec) > 1 or int(getattr(import_class(spec.use), "cpu_weight", 0) or 0) > 0


def node_config(graph: Graph, spec: NodeSpec, connect: dict[str, str], bind: dict[str, str],
                with_keys: bool, listen: tuple[str, str] | None, api_keys: bool = False) -> NodeConfig:
    wiring = wiring_for(graph, spec.name, connect)
    for link in wiring.outputs:
        link.address = bind[link.id]
    params = dict(spec.params)
    if listen:
        params[listen[0]] = "0.0.0.0"         # in its pod: reachable through its Service
        if api_keys:
            params[API_KEYS_PARAM] = f"{API_KEYS_DIR}/{API_KEYS_FILE}"
    return NodeConfig(name=spec.name, use=spec.use, params=params, wiring=wiring,
                      keys_dir=KEYS_DIR if with_keys else None, threads=node_threads(spec))


def on_cuda(spec: NodeSpec) -> bool:
    device = spec.params.get("device")
    return isinstance(device, str) and device.startswith("cuda")


def gpu_count(spec: NodeSpec) -> int:
    """GPUs for the pod: only a `device: cuda...` node gets any (1, or resources.num_gpus)."""
    if not on_cuda(spec):
        return 0
    return max(1, int(-(-spec.resources.get("num_gpus", 1) // 1)))   # whole GPUs: k8s cannot share one


def check_server_auth(graph: Graph, serving: dict[str, tuple[str, str]], with_keys: bool,
                      api_keys: str | Path | None) -> None:
    """A server binds 0.0.0.0 in its pod: its API key file must travel with the export (a path in
    the graph is a path on this machine), and a keyed export must have one, as the gateway demands."""
    if api_keys is not None and not Path(api_keys).is_file():
        raise ValueError(f"--api-keys {api_keys}: no such file. Fix: omniflow keys api create NAME "
                         f"--file {api_keys}")
    if api_keys is not None and not serving:
        raise ValueError("--api-keys given, but the graph has no server node (such as the gateway)")
    for name in serving:
        if graph.nodes[name].params.get(API_KEYS_PARAM) and api_keys is None:
            raise ValueError(f"node '{name}' names an API key file on this machine "
                             f"({graph.nodes[name].params[API_KEYS_PARAM]}), which a pod cannot read. Fix: "
                             f"pass it with --api-keys FILE: it travels as a Secret")
        if with_keys and api_keys is None:
            raise ValueError(f"a keyed export (--keys) secures every edge, but the server node '{name}' "
                             "would take any client. Fix: omniflow keys api create NAME --file keys/api.json "
                             "and --api-keys keys/api.json")


def export_warnings(graph: Graph) -> list[str]:
    return [f"node '{n}' asks for resources.num_gpus but runs on {s.params.get('device', 'cpu')!r}: no "
            f"GPU requested for it (set its device: cuda to use one)"
            for n, s in graph.nodes.items() if s.resources.get("num_gpus") and not on_cuda(s)]


def container_resources(spec: NodeSpec) -> dict[str, Any]:
    threads = node_threads(spec)
    heavy = is_heavy(spec)
    requests: dict[str, Any] = {"cpu": str(threads) if heavy else LIGHT_CPU,
                                "memory": f"{HEAVY_MEMORY_GI * threads}Gi" if heavy else LIGHT_MEMORY}
    if "num_cpus" in spec.resources:
        requests["cpu"] = f"{int(spec.resources['num_cpus'] * 1000)}m"
    if "memory" in spec.resources:
        requests["memory"] = str(int(spec.resources["memory"]))
    out: dict[str, Any] = {"requests": requests}
    if gpus := gpu_count(spec):
        out["limits"] = {GPU_RESOURCE: str(gpus)}     # a quantity (a string); extended resources go in limits
    return out


def heartbeat_probes(server_port: int | None = None, https: bool = False) -> dict[str, Any]:
    """startup (setup() done), liveness (the loop turns) and readiness (fresh; a server: /healthz)."""
    def beat(max_age: float) -> dict[str, Any]:
        return {"exec": {"command": heartbeat_file.probe(HEARTBEAT_PATH, max_age)}}
    probes = {
        "startupProbe": {**beat(LIVENESS_AGE_S), "periodSeconds": STARTUP_PERIOD_S,
                         "failureThreshold": STARTUP_FAILURES, "timeoutSeconds": 5},
        "livenessProbe": {**beat(LIVENESS_AGE_S), "periodSeconds": 10, "failureThreshold": 3,
                          "timeoutSeconds": 5},
        "readinessProbe": {**beat(READINESS_AGE_S), "periodSeconds": 5, "failureThreshold": 2,
                           "timeoutSeconds": 5},
    }
    if server_port is not None:
        probes["readinessProbe"] = {"httpGet": {"path": HEALTHZ, "port": server_port,
                                                "scheme": "HTTPS" if https else "HTTP"},
                                    "periodSeconds": 5, "failureThreshold": 2, "timeoutSeconds": 5}
    return probes


def pod_spec(command: list[str], resources: dict[str, Any], image: str, config_map: str | None,
             secret: str | None, restart_policy: str, weights_claim: str | None,
             threads: int | None = None, probes: dict[str, Any] | None = None,
             ports: list[tuple[str, int]] = (), api_keys: str | None = None) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    if config_map:
        mounts.append({"name": "config", "mountPath": CONFIG_DIR, "readOnly": True})
        volumes.append({"name": "config", "configMap": {"name": config_map}})
    if secret:
        mounts.append({"name": "curve-keys", "mountPath": KEYS_DIR, "readOnly": True})
        volumes.append({"name": "curve-keys",
                        "secret": {"secretName": secret, "defaultMode": SECRET_FILE_MODE}})
    if api_keys:          # a directory, not a subPath: a revoked key reaches the pod (the file is reread)
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
        volumes.append({"name": "api-keys",
                        "secret": {"secretName": api_keys, "defaultMode": SECRET_FILE_MODE}})
    if weights_claim:     # writable: hub downloads and ONNX exports are cached next to the weights
        mounts.append({"name": "weights", "mountPath": WEIGHTS_DIR})
        volumes.append({"name": "weights", "persistentVolumeClaim": {"claimName": weights_claim}})
    env = {"PYTHONUNBUFFERED": "1", "OMNIFLOW_HOME": WEIGHTS_DIR, heartbeat_file.ENV: HEARTBEAT_PATH,
           **(thread_env(threads) if threads else {})}
    container: dict[str, Any] = {
        "name": "node",
        "image": image,
        "command": command,
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "volumeMounts": mounts,
    }
    if ports:
        container["ports"] = [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports]
    if resources:
        container["resources"] = resources
    container.update(probes or {})
    return {"restartPolicy": restart_policy,
            "securityContext": {"runAsNonRoot": True, "runAsUser": POD_USER, "runAsGroup": POD_USER,
                                "fsGroup": POD_USER},
            "containers": [container], "volumes": volumes}


def workload(kind: str, max_restarts: int, meta: dict[str, Any], labels: dict[str, str],
             pod: dict[str, Any]) -> dict[str, Any]:
    """kind: "deployment" | "job-on-failure" | "job-never"."""
    template = {"metadata": {"labels": labels}, "spec": pod}
    if kind == "deployment":
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
                "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": template}}
    backoff = max_restarts if kind == "job-on-failure" else 0
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"backoffLimit": backoff, "template": template}}


def workload_kind(spec: NodeSpec, server_graph: bool) -> tuple[str, str]:
    """(workload kind, pod restartPolicy) for a node."""
    if server_graph or spec.restart == "always":
        return "deployment", "Always"
    if spec.restart == "on-failure":
        return "job-on-failure", "OnFailure"
    return "job-never", "Never"


def manifests(graph: Graph, *, image: str = DEFAULT_IMAGE, cuda_image: str = DEFAULT_CUDA_IMAGE,
              namespace: str = "default", keys: str | Path | None = None,
              weights_claim: str | None = None, weights_size: str = "10Gi",
              weights_access: str = "ReadWriteMany", demo_weights: bool = False,
              service_type: str = "ClusterIP", api_keys: str | Path | None = None
              ) -> dict[str, list[dict[str, Any]]]:
    """file name -> the Kubernetes objects it holds (plain dicts, ready for yaml.safe_dump)."""
    if service_type not in SERVICE_TYPES:
        raise ValueError(f"service type {service_type!r}: use one of {', '.join(SERVICE_TYPES)}")
    if weights_access not in ACCESS_MODES:
        raise ValueError(f"weights access mode {weights_access!r}: use one of {', '.join(ACCESS_MODES)}")
    instance = instance_name(graph)
    names = object_names(graph)
    connect, bind, ports = endpoints(graph, namespace)
    serving = servers(graph)
    check_server_auth(graph, serving, bool(keys), api_keys)
    common = {"app.kubernetes.io/name": "omniflow", "app.kubernetes.io/instance": instance}

    def meta(name: str, **labels: str) -> dict[str, Any]:
        return {"name": name, "namespace": namespace, "labels": {**common, **labels}}

    config_map = f"{instance}-config"
    secret = f"{instance}-curve-keys" if keys else None
    files: dict[str, list[dict[str, Any]]] = {}
    if namespace != "default":
        files["namespace.yaml"] = [{"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": namespace}}]
    configs = {f"{n}.json": msgspec.json.encode(node_config(graph, s, connect, bind, bool(keys),
                                                            serving.get(n), bool(api_keys))).decode()
               for n, s in graph.nodes.items()}
    files["config.yaml"] = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(config_map),
                             "data": configs}]
    if keys:
        files["secret.yaml"] = [{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                 "metadata": meta(secret), "data": key_files(keys)}]
    api_secret = f"{instance}-api-keys" if api_keys else None
    if api_keys:
        files["api-keys.yaml"] = [{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                   "metadata": meta(api_secret), "data": {
                                       API_KEYS_FILE: base64.b64encode(Path(api_keys).read_bytes()).decode()}}]
    if weights_claim is None:
        weights_claim = f"{instance}-weights"
        fetch = ["omniflow", "fetch", "--home", WEIGHTS_DIR] + (["--demo"] if demo_weights else [])
        fetch_name = f"{instance}-fetch-weights"
        files["weights.yaml"] = [
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta(weights_claim),
             "spec": {"accessModes": [weights_access],
                      "resources": {"requests": {"storage": weights_size}}}},
            workload("job-on-failure", 3, meta(fetch_name, **{"omniflow/node": fetch_name}),
                     {**common, "omniflow/node": fetch_name},
                     pod_spec(fetch, {}, image, None, None, "OnFailure", weights_claim))]

    def service(name: str, labels: dict[str, str], named_ports: list[tuple[str, int]],
                kind: str = "ClusterIP") -> dict:
        return {"apiVersion": "v1", "kind": "Service", "metadata": meta(name),
                "spec": {"type": kind, "selector": labels, "ports": [
                    {"name": port_name, "port": port, "targetPort": port, "protocol": "TCP"}
                    for port_name, port in named_ports]}}

    bus = control_name(graph)
    labels = {**common, "omniflow/node": bus}
    command = ["python", "-m", "omniflow.launch.bus", f"--pub=tcp://*:{CONTROL_PORTS[CONTROL_PUB]}",
               f"--in=tcp://*:{CONTROL_PORTS[CONTROL_IN]}", f"--nodes={','.join(graph.nodes)}"] + \
        ([f"--keys={KEYS_DIR}"] if keys else [])
    bus_ports = [("pub", CONTROL_PORTS[CONTROL_PUB]), ("in", CONTROL_PORTS[CONTROL_IN])]
    pod = pod_spec(command, {"requests": {"cpu": LIGHT_CPU, "memory": LIGHT_MEMORY}}, image, None,
                   secret, "Always", None, probes=heartbeat_probes(), ports=bus_ports)
    files["control.yaml"] = [
        workload("deployment", 0, meta(bus, **{"omniflow/node": bus}), labels, pod),
        service(bus, labels, bus_ports)]
    for name, spec in graph.nodes.items():
        labels = {**common, "omniflow/node": names[name]}
        kind, restart = workload_kind(spec, bool(serving))
        command = ["python", "-m", "omniflow.runtime", f"{CONFIG_DIR}/{spec.name}.json"]
        outs = [(f"out-{k}", ports[e.id]) for k, e in enumerate(graph.outputs_of(name))]
        public: list[tuple[str, int]] = []
        if name in serving:
            host_param, port_param = serving[name]
            full = msgspec.convert(spec.params, import_class(spec.use).Params)   # with the defaults
            port = getattr(full, port_param)
            if not port:
                raise ValueError(f"node '{name}' serves on port {port!r}: a Service needs a fixed "
                                 f"port. Fix: --set {name}.{port_param}=8765")
            public = [("clients", int(port))]
            probes = heartbeat_probes(int(port), https=bool(getattr(full, "tls_cert", None)))
        else:
            probes = heartbeat_probes()
        pod = pod_spec(command, container_resources(spec), cuda_image if on_cuda(spec) else image,
                       config_map, secret, restart, weights_claim, node_threads(spec), probes,
                       outs + public, api_secret if name in serving else None)
        objects = [workload(kind, spec.max_restarts,
                            meta(names[name], **{"omniflow/node": names[name]}), labels, pod)]
        if outs:
            objects.append(service(names[name], labels, outs))
        if public:
            objects.append(service(dns_name(f"{names[name]}-public", f"node '{name}'s public Service"),
                                   labels, public, service_type))
        files[f"{name}.yaml"] = objects
    return files


def key_files(keys: str | Path) -> dict[str, str]:
    """The key directory as Secret data: the key pair and every allowed client's public key."""
    keys = Path(keys)
    Curve.load(keys)            # what a node checks when it loads them, with the same errors
    paths = [keys / f"{KEY_NAME}.key_secret", *sorted(keys.glob("*.key"))]
    return {p.name: base64.b64encode(p.read_bytes()).decode() for p in paths}


class _PlainDumper(yaml.SafeDumper):
    """Writes a dict used twice (a selector and its pod labels) twice, not as a YAML alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write_manifests(files: dict[str, list[dict[str, Any]]], out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, objects in files.items():
        path = out / name
        if name == "secret.yaml":                 # create it private: it holds the secret key
            path.touch(mode=0o600, exist_ok=True)
            os.chmod(path, 0o600)
        path.write_text(yaml.dump_all(objects, Dumper=_PlainDumper, sort_keys=False))
        written.append(path)
    return written


# --- `omniflow export` -----------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    k8s = sub.add_parser(
        "k8s", help="Kubernetes manifests: one workload (+ Service) per node",
        description="Write Kubernetes manifests that run the graph: one pod per node (Deployments "
                    "for a graph with a server such as the gateway), a weights volume at "
                    "$OMNIFLOW_HOME, probes on the node heartbeat and the gateway's /healthz, CPU "
                    "and memory requests from threads:, GPUs for device: cuda nodes. See "
                    "docs/deploy.md.")
    k8s.add_argument("graph", help="graph file (YAML)")
    k8s.add_argument("--out", required=True, help="directory for the manifests (kubectl apply -f DIR)")
    k8s.add_argument("--image", default=DEFAULT_IMAGE,
                     help=f"image for the CPU pods, built from the Dockerfile (default {DEFAULT_IMAGE})")
    k8s.add_argument("--cuda-image", default=DEFAULT_CUDA_IMAGE,
                     help="image for device: cuda nodes, built from Dockerfile.cuda "
                          f"(default {DEFAULT_CUDA_IMAGE})")
    k8s.add_argument("--namespace", default="default", help="Kubernetes namespace (default: default)")
    k8s.add_argument("--keys", metavar="DIR", help="CURVE keys ('omniflow keys generate DIR'), "
                                                   "shipped as a Secret: every edge is secured")
    k8s.add_argument("--api-keys", metavar="FILE",
                     help="the server's API key file ('omniflow keys api create NAME --file FILE'), "
                          "shipped as a Secret; required with --keys when the graph has a server")
    k8s.add_argument("--weights-claim", metavar="NAME",
                     help="an existing PersistentVolumeClaim holding $OMNIFLOW_HOME (default: write "
                          "weights.yaml with a claim <graph>-weights and a Job that fills it)")
    k8s.add_argument("--weights-size", default="10Gi", help="size of the weights claim (default 10Gi)")
    k8s.add_argument("--weights-access", default="ReadWriteMany", choices=ACCESS_MODES,
                     help="access mode of the weights claim; ReadWriteMany (the default) lets pods on "
                          "several machines share it, ReadWriteOnce suits a one-machine cluster")
    k8s.add_argument("--demo-weights", action="store_true",
                     help="the fetch Job writes demo weights (omniflow fetch --demo): no model hub needed")
    k8s.add_argument("--service-type", default="ClusterIP", choices=SERVICE_TYPES,
                     help="type of the Service that exposes a server node's port (default ClusterIP)")
    k8s.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE",
                     help="override a node parameter (or, with no dot, a graph variable; repeatable)")


def main(args: argparse.Namespace) -> int:
    try:
        if dns_name(args.namespace, "namespace") != args.namespace:
            raise ValueError(f"namespace '{args.namespace}' is not a DNS label. "
                             f"Fix: use '{dns_name(args.namespace, 'namespace')}'")
        graph = load_graph(args.graph, args.set)
        files = manifests(graph, image=args.image, cuda_image=args.cuda_image,
                          namespace=args.namespace, keys=args.keys, weights_claim=args.weights_claim,
                          weights_size=args.weights_size, weights_access=args.weights_access,
                          demo_weights=args.demo_weights, service_type=args.service_type,
                          api_keys=args.api_keys)
        written = write_manifests(files, args.out)
    except GraphError as e:
        print(e, file=sys.stderr)
        return 2
    except (OSError, ValueError, ImportError) as e:
        print(f"omniflow export k8s: {e}", file=sys.stderr)
        return 2
    for warning in export_warnings(graph):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {len(written)} files to {args.out}; apply them with: kubectl apply -f {args.out}")
    if "weights.yaml" in files:
        print(f"the weights: kubectl apply -f {args.out}/weights.yaml, then wait for "
              f"job/{instance_name(graph)}-fetch-weights to complete")
    if args.keys:
        print(f"{args.out}/secret.yaml holds the CURVE secret key: keep it out of version control")
    else:
        print("without --keys the edges between pods are not authenticated "
              "(see docs/distributed.md)")
    return 0
