"""`omniflow export k8s graph.yaml --out DIR`: Kubernetes manifests that run the graph, one pod per node.

    omniflow export k8s graphs/speech_to_speech.yaml --out k8s/ --image registry/omniflow:0.1 \\
        --namespace voice --keys keys/
    kubectl apply -f k8s/

What is written (every object labelled `app.kubernetes.io/instance: <graph>`):
* `config.yaml`: a ConfigMap with one `NODE.json` per node: the `NodeConfig` a node container
  runs with `python -m omniflow.runtime /etc/omniflow/config/NODE.json` (no secrets in it).
* `NODE.yaml`: the node's workload, and a Service named after the node when it has outputs.
  Its outputs bind `tcp://*:PORT` in the pod; consumers connect to `tcp://NODE.NS.svc:PORT`.
  The workload follows the node's restart policy: `always` -> Deployment (pods always restart);
  `on-failure` -> Job (restartPolicy OnFailure, backoffLimit = max_restarts); `never` -> Job
  (restartPolicy Never, backoffLimit 0). (Kubernetes applies its own restart backoff, not backoff_s.)
* `control.yaml`: the control bus (`python -m omniflow.launch.bus`), a Deployment and the Service
  `<graph>-control`: nodes announce turns (barge-in) and heartbeats on it, as in a local run.
* `secret.yaml` (with --keys): the CURVE keys as a Secret mounted read-only at
  /etc/omniflow/keys; every tcp edge is then CURVE-secured. The file holds the secret key: it is
  written 0600; keep it out of version control.
* Resources: `resources: {num_cpus, memory, num_gpus}` become requests (GPUs as limits of
  `nvidia.com/gpu`); a node whose params say `device: cuda...` gets one GPU if it asks for none.

Nodes reach each other through the Services only. There is no launcher: Kubernetes supervises each
pod. Paths in params (weights, files) are paths inside the container image or volumes.
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

from ..graph import Graph, GraphError, NodeSpec, load_graph
from ..runtime import NodeConfig
from ..security import KEY_NAME, Curve
from ..transport import CONTROL_IN, CONTROL_PUB, wiring_for

NODE_PORT_BASE = 5600            # a node's k-th output edge binds this + k in its own pod
CONTROL_PORTS = {CONTROL_PUB: 5590, CONTROL_IN: 5591}     # the control bus's pod
CONFIG_DIR = "/etc/omniflow/config"
KEYS_DIR = "/etc/omniflow/keys"
DEFAULT_IMAGE = "omniflow:latest"
GPU_RESOURCE = "nvidia.com/gpu"
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
SECRET_FILE_MODE = 0o400          # the keys inside a pod: readable by the node's user only


def dns_name(name: str, what: str) -> str:
    """Kubernetes object names are DNS labels: lowercase letters, digits and '-'."""
    label = name.lower().replace("_", "-")
    if not DNS_LABEL.fullmatch(label) or len(label) > 63:
        raise ValueError(f"{what} '{name}' cannot be a Kubernetes name ('{label}' is not a DNS "
                         "label). Fix: rename it with letters, digits and '-', starting with a letter")
    return label


def service_names(graph: Graph) -> dict[str, str]:
    names = {n: dns_name(n, "node") for n in graph.nodes}
    seen: dict[str, str] = {}
    for node, label in names.items():
        if label in seen:
            raise ValueError(f"nodes '{seen[label]}' and '{node}' both become '{label}' in "
                             "Kubernetes. Fix: rename one of them")
        seen[label] = node
    return names


def control_name(graph: Graph) -> str:
    name = f"{dns_name(Path(graph.path).stem, 'graph file name')}-control"
    if name in service_names(graph).values():
        raise ValueError(f"a node becomes '{name}', the name of the control bus's Service. "
                         "Fix: rename that node")
    return name


def endpoints(graph: Graph, namespace: str) -> tuple[dict[str, str], dict[str, str], dict[str, int]]:
    """(connect map, bind map, edge -> port): consumers dial the producer's Service DNS name,
    producers bind every interface of their pod; every node dials the control bus's Service."""
    names = service_names(graph)
    bus = control_name(graph)
    connect = {key: f"tcp://{bus}.{namespace}.svc:{port}" for key, port in CONTROL_PORTS.items()}
    bind, ports = {}, {}
    for name in graph.nodes:
        for k, edge in enumerate(graph.outputs_of(name)):
            ports[edge.id] = NODE_PORT_BASE + k
            connect[edge.id] = f"tcp://{names[name]}.{namespace}.svc:{ports[edge.id]}"
            bind[edge.id] = f"tcp://*:{ports[edge.id]}"
    return connect, bind, ports


def node_config(graph: Graph, spec: NodeSpec, connect: dict[str, str], bind: dict[str, str],
                with_keys: bool) -> NodeConfig:
    wiring = wiring_for(graph, spec.name, connect)
    for link in wiring.outputs:
        link.address = bind[link.id]
    return NodeConfig(name=spec.name, use=spec.use, params=spec.params, wiring=wiring,
                      keys_dir=KEYS_DIR if with_keys else None)


def wants_gpu(spec: NodeSpec) -> int:
    if "num_gpus" in spec.resources:
        return int(-(-spec.resources["num_gpus"] // 1))      # whole GPUs: k8s cannot share one
    device = spec.params.get("device")
    return 1 if isinstance(device, str) and device.startswith("cuda") else 0


def container_resources(spec: NodeSpec) -> dict[str, Any]:
    requests: dict[str, Any] = {}
    if "num_cpus" in spec.resources:
        requests["cpu"] = f"{int(spec.resources['num_cpus'] * 1000)}m"
    if "memory" in spec.resources:
        requests["memory"] = str(int(spec.resources["memory"]))
    out: dict[str, Any] = {"requests": requests} if requests else {}
    if gpus := wants_gpu(spec):
        out["limits"] = {GPU_RESOURCE: gpus}          # extended resources go in limits
    return out


def pod_spec(command: list[str], resources: dict[str, Any], image: str, config_map: str | None,
             secret: str | None, restart_policy: str) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    if config_map:
        mounts.append({"name": "config", "mountPath": CONFIG_DIR, "readOnly": True})
        volumes.append({"name": "config", "configMap": {"name": config_map}})
    if secret:
        mounts.append({"name": "curve-keys", "mountPath": KEYS_DIR, "readOnly": True})
        volumes.append({"name": "curve-keys",
                        "secret": {"secretName": secret, "defaultMode": SECRET_FILE_MODE}})
    container = {
        "name": "node",
        "image": image,
        "command": command,
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "volumeMounts": mounts,
    }
    if resources:
        container["resources"] = resources
    return {"restartPolicy": restart_policy, "containers": [container], "volumes": volumes}


def workload(restart: str, max_restarts: int, meta: dict[str, Any], labels: dict[str, str],
             pod: dict[str, Any]) -> dict[str, Any]:
    template = {"metadata": {"labels": labels}, "spec": pod}
    if restart == "always":
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
                "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": template}}
    backoff = max_restarts if restart == "on-failure" else 0
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"backoffLimit": backoff, "template": template}}


def manifests(graph: Graph, *, image: str = DEFAULT_IMAGE, namespace: str = "default",
              keys: str | Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """file name -> the Kubernetes objects it holds (plain dicts, ready for yaml.safe_dump)."""
    instance = dns_name(Path(graph.path).stem, "graph file name")
    names = service_names(graph)
    connect, bind, ports = endpoints(graph, namespace)
    common = {"app.kubernetes.io/name": "omniflow", "app.kubernetes.io/instance": instance}

    def meta(name: str, **labels: str) -> dict[str, Any]:
        return {"name": name, "namespace": namespace, "labels": {**common, **labels}}

    config_map = f"{instance}-config"
    secret = f"{instance}-curve-keys" if keys else None
    files: dict[str, list[dict[str, Any]]] = {}
    if namespace != "default":
        files["namespace.yaml"] = [{"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": namespace}}]
    configs = {f"{n}.json": msgspec.json.encode(node_config(graph, s, connect, bind, bool(keys)))
               .decode() for n, s in graph.nodes.items()}
    files["config.yaml"] = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(config_map),
                             "data": configs}]
    if keys:
        files["secret.yaml"] = [{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                 "metadata": meta(secret), "data": key_files(keys)}]
    def service(name: str, labels: dict[str, str], named_ports: list[tuple[str, int]]) -> dict:
        return {"apiVersion": "v1", "kind": "Service", "metadata": meta(name),
                "spec": {"selector": labels, "ports": [
                    {"name": port_name, "port": port, "targetPort": port, "protocol": "TCP"}
                    for port_name, port in named_ports]}}

    bus = control_name(graph)
    labels = {**common, "omniflow/node": bus}
    command = ["python", "-m", "omniflow.launch.bus", f"--pub=tcp://*:{CONTROL_PORTS[CONTROL_PUB]}",
               f"--in=tcp://*:{CONTROL_PORTS[CONTROL_IN]}", f"--nodes={','.join(graph.nodes)}"] + \
        ([f"--keys={KEYS_DIR}"] if keys else [])
    pod = pod_spec(command, {}, image, None, secret, "Always")
    files["control.yaml"] = [
        workload("always", 0, meta(bus, **{"omniflow/node": bus}), labels, pod),
        service(bus, labels, [("pub", CONTROL_PORTS[CONTROL_PUB]), ("in", CONTROL_PORTS[CONTROL_IN])])]
    for name, spec in graph.nodes.items():
        labels = {**common, "omniflow/node": names[name]}
        restart = {"always": "Always", "on-failure": "OnFailure", "never": "Never"}[spec.restart]
        command = ["python", "-m", "omniflow.runtime", f"{CONFIG_DIR}/{spec.name}.json"]
        pod = pod_spec(command, container_resources(spec), image, config_map, secret, restart)
        objects = [workload(spec.restart, spec.max_restarts,
                            meta(names[name], **{"omniflow/node": names[name]}), labels, pod)]
        outs = graph.outputs_of(name)
        if outs:
            objects.append(service(names[name], labels,
                                   [(f"out-{k}", ports[e.id]) for k, e in enumerate(outs)]))
        files[f"{name}.yaml"] = objects
    return files


def key_files(keys: str | Path) -> dict[str, str]:
    """The key directory as Secret data: the key pair and every allowed client's public key."""
    keys = Path(keys)
    Curve.load(keys)            # what a node checks when it loads them, with the same errors
    paths = [keys / f"{KEY_NAME}.key_secret", *sorted(keys.glob("*.key"))]
    return {p.name: base64.b64encode(p.read_bytes()).decode() for p in paths}


def write_manifests(files: dict[str, list[dict[str, Any]]], out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, objects in files.items():
        path = out / name
        if name == "secret.yaml":                 # create it private: it holds the secret key
            path.touch(mode=0o600, exist_ok=True)
            os.chmod(path, 0o600)
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        written.append(path)
    return written


# --- `omniflow export` -----------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    k8s = sub.add_parser("k8s", help="Kubernetes manifests: one workload (+ Service) per node")
    k8s.add_argument("graph", help="graph file (YAML)")
    k8s.add_argument("--out", required=True, help="directory for the manifests (kubectl apply -f DIR)")
    k8s.add_argument("--image", default=DEFAULT_IMAGE,
                     help=f"container image with omniflow and the node packages (default {DEFAULT_IMAGE})")
    k8s.add_argument("--namespace", default="default", help="Kubernetes namespace (default: default)")
    k8s.add_argument("--keys", metavar="DIR", help="CURVE keys ('omniflow keys generate DIR'), "
                                                   "shipped as a Secret: every edge is secured")
    k8s.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE",
                     help="override a node parameter (repeatable)")


def main(args: argparse.Namespace) -> int:
    try:
        if dns_name(args.namespace, "namespace") != args.namespace:
            raise ValueError(f"namespace '{args.namespace}' is not a DNS label. "
                             f"Fix: use '{dns_name(args.namespace, 'namespace')}'")
        graph = load_graph(args.graph, args.set)
        files = manifests(graph, image=args.image, namespace=args.namespace, keys=args.keys)
        written = write_manifests(files, args.out)
    except GraphError as e:
        print(e, file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"omniflow export k8s: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.out}; apply them with: kubectl apply -f {args.out}")
    if args.keys:
        print(f"{args.out}/secret.yaml holds the CURVE secret key: keep it out of version control")
    else:
        print("without --keys the edges between pods are not authenticated "
              "(see docs/distributed.md)")
    return 0
