"""`omniflow export k8s`: the manifests parse, have the shapes Kubernetes expects, wire edges through
Service DNS names, map restart policies and GPUs, ship keys as a Secret; and the exported node
configs run as a container would run them."""
from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys

import msgspec
import numpy as np
import soundfile as sf
import yaml

from omniflow import cli
from omniflow.graph import load_graph, parse_graph
from omniflow.launch.k8s import KEYS_DIR, manifests
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
    assert set(files) == {"namespace.yaml", "config.yaml", "control.yaml", "src.yaml", "gain.yaml",
                          "sink.yaml"}
    jobs, services = by_kind(files, "Job"), by_kind(files, "Service")
    assert set(jobs) == {"src", "gain", "sink"}                # demo: restart never/on-failure
    assert set(services) == {"src", "gain", "demo-control"}    # sink produces nothing
    bus = by_kind(files, "Deployment")["demo-control"]["spec"]["template"]["spec"]["containers"][0]
    assert bus["command"][:3] == ["python", "-m", "omniflow.launch.bus"]
    gain = jobs["gain"]
    assert gain["metadata"]["namespace"] == "voice"
    assert gain["spec"]["backoffLimit"] == 3                   # on-failure, max_restarts 3
    pod = gain["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    assert jobs["src"]["spec"]["backoffLimit"] == 0
    assert jobs["src"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == "reg/omniflow:1"
    assert container["command"] == ["python", "-m", "omniflow.runtime", "/etc/omniflow/config/gain.json"]
    assert "resources" not in container                        # asks for nothing it does not need
    # the Service selects exactly the pod's labels
    labels = gain["spec"]["template"]["metadata"]["labels"]
    assert services["gain"]["spec"]["selector"] == labels

    cfg = configs(files)
    (edge_in,) = cfg["gain"].wiring.inputs
    (edge_out,) = cfg["gain"].wiring.outputs
    port = services["src"]["spec"]["ports"][0]["port"]
    assert edge_in.address == f"tcp://src.voice.svc:{port}"     # dials the producer's Service
    assert edge_out.address == f"tcp://*:{services['gain']['spec']['ports'][0]['targetPort']}"
    assert cfg["gain"].keys_dir is None
    assert cfg["gain"].wiring.control_pub == "tcp://demo-control.voice.svc:5590"
    assert cfg["gain"].wiring.control_in == "tcp://demo-control.voice.svc:5591"
    assert [p["port"] for p in services["demo-control"]["spec"]["ports"]] == [5590, 5591]


def test_restart_always_is_a_deployment_and_cuda_nodes_request_a_gpu(tmp_path):
    graph = parse_graph("""
nodes:
  src: {use: "nodes.audio:FileSource", params: {path: x.wav}, restart: always}
  big: {use: "nodes.dsp:Gain", inputs: {audio: src/audio}, resources: {num_gpus: 2, num_cpus: 1.5, memory: 2000000000}}
""", "my_graph.yaml")
    files = manifests(graph)
    (deploy,) = [o for o in files["src.yaml"] if o["kind"] == "Deployment"]
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["selector"]["matchLabels"] == deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["template"]["spec"]["restartPolicy"] == "Always"
    (big,) = files["big.yaml"]
    res = big["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res == {"requests": {"cpu": "1500m", "memory": "2000000000"}, "limits": {"nvidia.com/gpu": 2}}
    assert files["config.yaml"][0]["metadata"]["name"] == "my-graph-config"     # a DNS name

    speech = load_graph("graphs/speech_to_speech.yaml", ["backbone.device=cuda"])
    backbone = manifests(speech)["backbone.yaml"][0]
    assert backbone["spec"]["template"]["spec"]["containers"][0]["resources"] == \
        {"limits": {"nvidia.com/gpu": 1}}


def test_keys_become_a_private_secret_mounted_into_every_pod(tmp_path):
    public, secret = generate_keys(tmp_path / "keys")
    files = export(tmp_path, "graphs/demo.yaml", "--keys", str(tmp_path / "keys"))
    assert stat.S_IMODE((tmp_path / "k8s" / "secret.yaml").stat().st_mode) == 0o600
    (sec,) = by_kind(files, "Secret").values()
    assert base64.b64decode(sec["data"]["omniflow.key_secret"]) == secret.read_bytes()
    assert base64.b64decode(sec["data"]["omniflow.key"]) == public.read_bytes()
    for job in [*by_kind(files, "Job").values(), *by_kind(files, "Deployment").values()]:
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
    bus_proc = subprocess.Popen([sys.executable, *command[1:]], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    procs = []
    for name, cfg in configs(files).items():
        cfg.wiring.control_pub, cfg.wiring.control_in = control["--pub"], control["--in"]
        for link in cfg.wiring.outputs:
            assert link.address.startswith("tcp://*:")
            link.address = here(name, link.address)
        for link in cfg.wiring.inputs:
            producer = link.id.partition("/")[0]
            assert link.address.startswith(f"tcp://{producer}.voice.svc:")
            link.address = here(producer, link.address)
        assert cfg.keys_dir == KEYS_DIR
        cfg.keys_dir = str(tmp_path / "keys")
        path = tmp_path / f"{name}.json"
        path.write_bytes(msgspec.json.encode(cfg))
        procs.append(subprocess.Popen([sys.executable, "-m", "omniflow.runtime", str(path)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
    bus_proc.terminate()
    output, _ = bus_proc.communicate(timeout=10)
    assert bus_proc.returncode == 0 and "control bus on" in output, output
    assert all(f"node '{n}' joined" in output for n in ("src", "gain", "sink")), output  # over CURVE
    assert output.count("graph ready") == 1, output      # the bus alone gates the source too
    x = pcm.astype(np.float32) / np.float32(32768)
    np.testing.assert_array_equal(sf.read(out, dtype="int16")[0], to_int16(x * np.float32(10 ** (-6 / 20))))
