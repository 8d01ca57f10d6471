"""`omniflow export k8s`: the manifests are valid Kubernetes objects (the official client's models),
wire edges through Service DNS names, run a server's graph as Deployments with probes, expose the
gateway, mount the weights volume, request CPU/memory from threads: and GPUs for cuda nodes only,
ship keys as a Secret; and the exported node configs run as a container would run them, heartbeat
file and probe included."""
from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys

import msgspec
import numpy as np
import pytest
import soundfile as sf
import yaml

from omniflow import cli
from omniflow.graph import load_graph, parse_graph
from omniflow.launch.k8s import HEARTBEAT_PATH, KEYS_DIR, WEIGHTS_DIR, export_warnings, manifests
from omniflow.runtime import NodeConfig
from omniflow.security import generate_keys
from omniflow.transport import free_tcp_port

from nodes.audio import to_int16


def export(tmp_path, graph: str, *extra: str) -> dict[str, list[dict]]:
    out = tmp_path / "k8s"
    assert cli.main(["export", "k8s", graph, "--out", str(out), *extra]) == 0
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in out.glob("*.yaml")}


def by_kind(files, kind):
    return {o["metadata"]["name"]: o for objs in files.values() for o in objs if o["kind"] == kind}


def configs(files) -> dict[str, NodeConfig]:
    (cm,) = by_kind(files, "ConfigMap").values()
    return {k.removesuffix(".json"): msgspec.json.decode(v, type=NodeConfig)
            for k, v in cm["data"].items()}


def test_demo_export_has_one_workload_per_node_and_services_for_producers(tmp_path):
    files = export(tmp_path, "graphs/demo.yaml", "--namespace", "voice", "--image", "reg/omniflow:1")
    assert set(files) == {"namespace.yaml", "config.yaml", "control.yaml", "weights.yaml", "src.yaml",
                          "gain.yaml", "sink.yaml"}
    jobs, services = by_kind(files, "Job"), by_kind(files, "Service")
    assert set(jobs) == {"demo-src", "demo-gain", "demo-sink", "demo-fetch-weights"}  # a batch graph
    assert set(services) == {"demo-src", "demo-gain", "demo-control"}    # sink produces nothing
    bus = by_kind(files, "Deployment")["demo-control"]["spec"]["template"]["spec"]["containers"][0]
    assert bus["command"][:3] == ["python", "-m", "omniflow.launch.bus"]
    gain = jobs["demo-gain"]
    assert gain["metadata"]["namespace"] == "voice"
    assert gain["spec"]["backoffLimit"] == 3                   # on-failure, max_restarts 3
    pod = gain["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    assert jobs["demo-src"]["spec"]["backoffLimit"] == 0
    assert jobs["demo-src"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == "reg/omniflow:1"
    assert container["command"] == ["python", "-m", "omniflow.runtime", "/etc/omniflow/config/gain.json"]
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"}}   # a light node
    assert "limits" not in container["resources"]              # no GPU for a CPU node
    # the Service selects exactly the pod's labels
    labels = gain["spec"]["template"]["metadata"]["labels"]
    assert services["demo-gain"]["spec"]["selector"] == labels

    cfg = configs(files)
    (edge_in,) = cfg["gain"].wiring.inputs
    (edge_out,) = cfg["gain"].wiring.outputs
    port = services["demo-src"]["spec"]["ports"][0]["port"]
    assert edge_in.address == f"tcp://demo-src.voice.svc:{port}"     # dials the producer's Service
    assert edge_out.address == f"tcp://*:{services['demo-gain']['spec']['ports'][0]['targetPort']}"
    assert cfg["gain"].keys_dir is None
    assert cfg["gain"].wiring.control_pub == "tcp://demo-control.voice.svc:5590"
    assert cfg["gain"].wiring.control_in == "tcp://demo-control.voice.svc:5591"
    assert [p["port"] for p in services["demo-control"]["spec"]["ports"]] == [5590, 5591]


def test_restart_always_is_a_deployment_and_only_cuda_nodes_request_a_gpu(tmp_path):
    graph = parse_graph("""
nodes:
  src: {use: "nodes.audio:FileSource", params: {path: x.wav}, restart: always}
  big: {use: "nodes.dsp:Gain", inputs: {audio: src/audio}, resources: {num_gpus: 2, num_cpus: 1.5, memory: 2000000000}}
""", "my_graph.yaml")
    files = manifests(graph)
    (deploy,) = [o for o in files["src.yaml"] if o["kind"] == "Deployment"]
    assert deploy["metadata"]["name"] == "my-graph-src"
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["selector"]["matchLabels"] == deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["template"]["spec"]["restartPolicy"] == "Always"
    (big,) = files["big.yaml"]
    res = big["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res == {"requests": {"cpu": "1500m", "memory": "2000000000"}}   # num_gpus, but device: cpu
    assert files["config.yaml"][0]["metadata"]["name"] == "my-graph-config"     # a DNS name
    assert any("num_gpus" in w and "'big'" in w for w in export_warnings(graph))

    speech = load_graph("graphs/speech_to_speech.yaml", ["backbone.device=cuda"])
    files = manifests(speech, image="reg/omniflow:cpu", cuda_image="reg/omniflow:cuda")
    for name in speech.nodes:
        (pod,) = [o["spec"]["template"]["spec"] for o in files[f"{name}.yaml"] if o["kind"] != "Service"]
        (container,) = pod["containers"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus == ("1" if name == "backbone" else None), name
        assert container["image"] == ("reg/omniflow:cuda" if name == "backbone" else "reg/omniflow:cpu")
    split = load_graph("graphs/split_across_machines.yaml")    # num_gpus: 1 on a device: cpu backbone
    assert "limits" not in manifests(split)["backbone.yaml"][0]["spec"]["template"]["spec"][
        "containers"][0]["resources"]


def test_threads_set_cpu_memory_requests_and_cap_the_math_threads():
    graph = load_graph("graphs/speech_to_speech.yaml")
    files = manifests(graph)
    cfg = configs(files)

    def container(node):
        return files[f"{node}.yaml"][0]["spec"]["template"]["spec"]["containers"][0]

    backbone = container("backbone")
    threads = graph.nodes["backbone"].threads or 2     # the graph's threads:, else its cpu_weight (2)
    assert backbone["resources"]["requests"] == {"cpu": str(threads), "memory": f"{2 * threads}Gi"}
    assert cfg["backbone"].threads == threads
    assert {"name": "OMP_NUM_THREADS", "value": str(threads)} in backbone["env"]
    assert container("text")["resources"]["requests"] == {"cpu": "250m", "memory": "256Mi"}
    explicit = load_graph("graphs/speech_to_speech.yaml")
    explicit.nodes["whisper"].threads = 3
    whisper = manifests(explicit)["whisper.yaml"][0]["spec"]["template"]["spec"]["containers"][0]
    assert whisper["resources"]["requests"] == {"cpu": "3", "memory": "6Gi"}


def test_a_server_graph_runs_as_deployments_with_probes_and_a_public_gateway(tmp_path):
    files = export(tmp_path, "graphs/serve.yaml", "--namespace", "voice", "--service-type",
                   "LoadBalancer", "--demo-weights")
    graph = load_graph("graphs/serve.yaml")
    deployments = by_kind(files, "Deployment")
    assert set(deployments) == {f"serve-{n}" for n in graph.nodes} | {"serve-control"}
    assert set(by_kind(files, "Job")) == {"serve-fetch-weights"}       # only the weights filler
    cfg = configs(files)
    assert cfg["gateway"].params["host"] == "0.0.0.0"                    # reachable in the cluster
    public = by_kind(files, "Service")["serve-gateway-public"]
    assert public["spec"]["type"] == "LoadBalancer"
    assert public["spec"]["ports"] == [{"name": "clients", "port": 8765, "targetPort": 8765,
                                        "protocol": "TCP"}]
    gateway = deployments["serve-gateway"]
    assert public["spec"]["selector"] == gateway["spec"]["template"]["metadata"]["labels"]
    for name, deploy in deployments.items():
        pod = deploy["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert pod["restartPolicy"] == "Always"
        assert c["startupProbe"]["exec"]["command"][-2] == HEARTBEAT_PATH
        assert c["livenessProbe"]["exec"]["command"][-2] == HEARTBEAT_PATH
        assert {"name": "OMNIFLOW_HEARTBEAT_FILE", "value": HEARTBEAT_PATH} in c["env"]
        if name == "serve-gateway":
            assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 8765, "scheme": "HTTP"}
        else:
            assert c["readinessProbe"]["exec"]["command"][-2] == HEARTBEAT_PATH
        if name != "serve-control":                          # every node pod: the weights volume
            assert {"name": "OMNIFLOW_HOME", "value": WEIGHTS_DIR} in c["env"]
            assert {"name": "weights", "mountPath": WEIGHTS_DIR} in c["volumeMounts"]
            assert {"name": "weights", "persistentVolumeClaim": {"claimName": "serve-weights"}} \
                in pod["volumes"]
    (claim,) = by_kind(files, "PersistentVolumeClaim").values()
    assert claim["metadata"]["name"] == "serve-weights"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    fetch = by_kind(files, "Job")["serve-fetch-weights"]["spec"]["template"]["spec"]["containers"][0]
    assert fetch["command"] == ["omniflow", "fetch", "--home", WEIGHTS_DIR, "--demo"]

    mine = export(tmp_path / "own", "graphs/serve.yaml", "--weights-claim", "my-weights")
    assert "weights.yaml" not in mine and not by_kind(mine, "PersistentVolumeClaim")
    pod = by_kind(mine, "Deployment")["serve-backbone"]["spec"]["template"]["spec"]
    assert {"name": "weights", "persistentVolumeClaim": {"claimName": "my-weights"}} in pod["volumes"]


def test_a_keyed_server_export_ships_its_api_keys_or_refuses(tmp_path, capsys):
    generate_keys(tmp_path / "keys")
    keyed = ["export", "k8s", "graphs/serve.yaml", "--out", str(tmp_path / "o"), "--keys", str(tmp_path / "keys")]
    assert cli.main(keyed) == 2                                  # the gateway would take any client
    assert "--api-keys" in capsys.readouterr().err
    api = tmp_path / "api.json"
    assert cli.main(["keys", "api", "create", "alice", "--file", str(api)]) == 0
    files = export(tmp_path, "graphs/serve.yaml", "--keys", str(tmp_path / "keys"), "--api-keys", str(api))
    secret = by_kind(files, "Secret")["serve-api-keys"]
    assert base64.b64decode(secret["data"]["api.json"]) == api.read_bytes()
    assert configs(files)["gateway"].params["api_keys"] == "/etc/omniflow/api-keys/api.json"
    for name, deploy in by_kind(files, "Deployment").items():
        pod = deploy["spec"]["template"]["spec"]
        mounted = any(v.get("secret", {}).get("secretName") == "serve-api-keys" for v in pod["volumes"])
        assert mounted == (name == "serve-gateway"), name          # the server alone reads it
    local = ["export", "k8s", "graphs/serve.yaml", "--out", str(tmp_path / "p"), "--set",
             f"gateway.api_keys={api}"]
    assert cli.main(local) == 2 and "--api-keys" in capsys.readouterr().err   # a path on this machine


MODELS = {"Deployment": "V1Deployment", "Job": "V1Job", "Service": "V1Service",
          "ConfigMap": "V1ConfigMap", "Secret": "V1Secret", "Namespace": "V1Namespace",
          "PersistentVolumeClaim": "V1PersistentVolumeClaim"}


def k8s_model(obj: dict):
    """`obj` as the official client's model (which refuses missing required fields and wrong
    types), and the dict that model writes back: equal to `obj` unless a field was unknown."""
    from kubernetes.client import ApiClient
    api = ApiClient()
    model = api._ApiClient__deserialize(obj, MODELS[obj["kind"]])
    return model, api.sanitize_for_serialization(model)


@pytest.mark.parametrize("graph", ["graphs/serve.yaml", "graphs/speech_to_speech.yaml", "graphs/demo.yaml",
                                   "graphs/split_across_machines.yaml"])
def test_every_object_is_a_valid_kubernetes_object(tmp_path, graph):
    pytest.importorskip("kubernetes", reason="validation needs the kubernetes client: pip install -e '.[dev]'")
    generate_keys(tmp_path / "keys")
    server = graph == "graphs/serve.yaml"
    if server:
        assert cli.main(["keys", "api", "create", "alice", "--file", str(tmp_path / "api.json")]) == 0
    files = export(tmp_path, graph, "--namespace", "voice", "--keys", str(tmp_path / "keys"),
                   *(["--api-keys", str(tmp_path / "api.json")] if server else []),
                   "--set", "backbone.device=cuda" if "demo" not in graph else "gain.db=1")
    kinds = set()
    for name, objects in files.items():
        for obj in objects:
            model, back = k8s_model(obj)
            assert back == obj, f"{name}: {obj['kind']} has fields the Kubernetes API does not know"
            assert model.metadata.name and len(model.metadata.name) <= 63
            kinds.add(obj["kind"])
            if obj["kind"] in ("Deployment", "Job"):
                for c in model.spec.template.spec.containers:
                    assert c.name and c.image and c.command
                    if c.command[:3] != ["omniflow", "fetch", "--home"]:     # nodes and the bus
                        assert c.liveness_probe and c.startup_probe and c.readiness_probe
    assert {"Deployment", "Service", "ConfigMap", "Secret", "Namespace"} <= kinds


def test_the_validator_catches_a_misspelled_or_missing_field():
    pytest.importorskip("kubernetes", reason="validation needs the kubernetes client: pip install -e '.[dev]'")
    deploy = manifests(load_graph("graphs/demo.yaml"))["control.yaml"][0]
    assert k8s_model(deploy)[1] == deploy
    typo = json.loads(json.dumps(deploy))
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    assert k8s_model(typo)[1] != typo
    missing = json.loads(json.dumps(deploy))
    del missing["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(Exception):
        k8s_model(missing)


def test_keys_become_a_private_secret_mounted_into_every_pod(tmp_path):
    public, secret = generate_keys(tmp_path / "keys")
    files = export(tmp_path, "graphs/demo.yaml", "--keys", str(tmp_path / "keys"))
    assert stat.S_IMODE((tmp_path / "k8s" / "secret.yaml").stat().st_mode) == 0o600
    (sec,) = by_kind(files, "Secret").values()
    assert base64.b64decode(sec["data"]["omniflow.key_secret"]) == secret.read_bytes()
    assert base64.b64decode(sec["data"]["omniflow.key"]) == public.read_bytes()
    for job in [*by_kind(files, "Job").values(), *by_kind(files, "Deployment").values()]:
        if job["metadata"]["name"] == "demo-fetch-weights":      # writes weights; needs no keys
            continue
        pod = job["spec"]["template"]["spec"]
        assert {"name": "curve-keys", "mountPath": KEYS_DIR, "readOnly": True} \
            in pod["containers"][0]["volumeMounts"]
        assert any(v.get("secret", {}).get("secretName") == sec["metadata"]["name"]
                   for v in pod["volumes"])
    assert all(c.keys_dir == KEYS_DIR for c in configs(files).values())
    assert "secret" not in json.dumps(by_kind(files, "ConfigMap"))   # no key material in configs


def test_node_names_that_are_not_dns_labels_are_refused_with_a_fix(tmp_path):
    graph = tmp_path / "g.yaml"
    graph.write_text('nodes:\n  _src: {use: "nodes.audio:FileSource", params: {path: x.wav}}\n')
    assert cli.main(["export", "k8s", str(graph), "--out", str(tmp_path / "o")]) == 2
    assert cli.main(["export", "k8s", "graphs/demo.yaml", "--out", str(tmp_path / "o"),
                     "--namespace", "Voice"]) == 2


def test_exported_node_configs_run_as_containers_would(tone_wav, tmp_path):
    """Run each ConfigMap entry with `python -m omniflow.runtime` and the control bus, as the pods
    do, with the Service names pointed at this machine and the Secret's keys in a directory: the
    stream is exact (over CURVE)."""
    wav, pcm = tone_wav(seconds=0.5)
    out = tmp_path / "out.wav"
    generate_keys(tmp_path / "keys")
    files = export(tmp_path, "graphs/demo.yaml", "--namespace", "voice", "--keys",
                   str(tmp_path / "keys"), "--set", f"src.path={wav}", "--set", f"sink.path={out}")
    local: dict[tuple[str, str], str] = {}          # (pod, port in the pod) -> address here

    def here(pod: str, address: str) -> str:
        port = address.rpartition(":")[2]
        return local.setdefault((pod, port), f"tcp://127.0.0.1:{free_tcp_port()}")

    (bus,) = by_kind(files, "Deployment").values()
    command = bus["spec"]["template"]["spec"]["containers"][0]["command"]
    control = {"--pub": here("bus", "x:5590"), "--in": here("bus", "x:5591")}
    command = [f"{a.partition('=')[0]}={control[a.partition('=')[0]]}" if a.startswith(("--pub", "--in"))
               else a.replace(KEYS_DIR, str(tmp_path / "keys")) for a in command]
    beats = {n: tmp_path / f"{n}.beat" for n in ("bus", "src", "gain", "sink")}   # each pod's file

    def env(pod: str) -> dict[str, str]:
        return {**os.environ, "OMNIFLOW_HEARTBEAT_FILE": str(beats[pod])}

    bus_proc = subprocess.Popen([sys.executable, *command[1:]], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env("bus"))
    procs = []
    for name, cfg in configs(files).items():
        cfg.wiring.control_pub, cfg.wiring.control_in = control["--pub"], control["--in"]
        for link in cfg.wiring.outputs:
            assert link.address.startswith("tcp://*:")
            link.address = here(name, link.address)
        for link in cfg.wiring.inputs:
            producer = link.id.partition("/")[0]
            assert link.address.startswith(f"tcp://demo-{producer}.voice.svc:")
            link.address = here(producer, link.address)
        assert cfg.keys_dir == KEYS_DIR
        cfg.keys_dir = str(tmp_path / "keys")
        path = tmp_path / f"{name}.json"
        path.write_bytes(msgspec.json.encode(cfg))
        procs.append(subprocess.Popen([sys.executable, "-m", "omniflow.runtime", str(path)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env(name)))
    for proc in procs:
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
    # the pods' probes, as the manifests write them, on each process's heartbeat file
    probes = {n: by_kind(files, "Job")[f"demo-{n}"]["spec"]["template"]["spec"]["containers"][0]
              for n in ("src", "gain", "sink")}
    probes["bus"] = bus["spec"]["template"]["spec"]["containers"][0]
    for pod, container in probes.items():
        live = [a.replace(HEARTBEAT_PATH, str(beats[pod])) for a in container["livenessProbe"]["exec"]["command"]]
        assert subprocess.run(live).returncode == 0, pod             # beat within the last minute
        assert subprocess.run([*live[:-1], "0"]).returncode == 1, pod   # older than 0 s: fails
    missing = [a.replace(HEARTBEAT_PATH, str(tmp_path / "never.beat"))
               for a in probes["bus"]["startupProbe"]["exec"]["command"]]
    assert subprocess.run(missing, capture_output=True).returncode == 1   # no file yet: not started
    bus_proc.terminate()
    output, _ = bus_proc.communicate(timeout=10)
    assert bus_proc.returncode == 0 and "control bus on" in output, output
    assert all(f"node '{n}' joined" in output for n in ("src", "gain", "sink")), output  # over CURVE
    assert output.count("graph ready") == 1, output      # the bus alone gates the source too
    x = pcm.astype(np.float32) / np.float32(32768)
    np.testing.assert_array_equal(sf.read(out, dtype="int16")[0], to_int16(x * np.float32(10 ** (-6 / 20))))
