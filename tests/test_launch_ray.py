"""The Ray launcher on a local Ray instance: the demo graph over tcp between actors is sample-exact
(plain and with CURVE keys), a killed actor is replaced under the restart policy, resources map to
actor options."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import soundfile as sf

from omniflow import cli
from omniflow.graph import load_graph, parse_graph
from omniflow.launch.ray import ray_options
from omniflow.security import generate_keys

from nodes.audio import to_int16


def gained(pcm: np.ndarray, db: float) -> np.ndarray:
    x = pcm.astype(np.float32) / np.float32(32768)
    return to_int16(x * np.float32(10 ** (db / 20)))


def test_resources_become_ray_actor_options():
    graph = parse_graph("""
nodes:
  a: {use: "nodes.dsp:Gain"}
  b: {use: "nodes.dsp:Gain", resources: {num_gpus: 1, num_cpus: 2, memory: 4000000000, accelerator_type_h100: 1}}
""")
    assert ray_options(graph.nodes["a"]) == {"num_cpus": 0}        # fits on any small cluster
    assert ray_options(graph.nodes["b"]) == {"num_cpus": 2, "num_gpus": 1, "memory": 4e9,
                                             "resources": {"accelerator_type_h100": 1}}


def test_without_ray_the_cli_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)      # import ray fails
    assert cli.main(["run", "graphs/demo.yaml", "--launcher", "ray"]) == 2
    assert "pip install 'omniflow[ray]'" in capsys.readouterr().err


def test_a_node_asking_for_more_than_the_cluster_has_is_refused_at_once():
    from omniflow.launch.ray import check_resources
    graph = load_graph("graphs/split_across_machines.yaml")        # backbone: num_gpus 1
    with pytest.raises(ValueError, match="node 'backbone' asks for num_gpus=1 .* has 0"):
        check_resources(graph, {"CPU": 2.0, "memory": 1e9})
    check_resources(graph, {"CPU": 2.0, "GPU": 1.0})


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'omniflow[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def demo(wav, out) -> list[str]:
    return [f"src.path={wav}", f"sink.path={out}"]


def test_demo_graph_on_ray_writes_input_times_gain(ray_instance, tone_wav, tmp_path):
    from omniflow.launch.ray import RayLauncher
    wav, pcm = tone_wav(seconds=1.0)
    out = tmp_path / "out.wav"
    launcher = RayLauncher(load_graph("graphs/demo.yaml", demo(wav, out)))
    ip = ray_instance.util.get_node_ip_address()
    assert all(a.startswith(f"tcp://{ip}:") for a in launcher.endpoints.values())
    result = launcher.run()
    assert result.ok, result.message
    np.testing.assert_array_equal(sf.read(out, dtype="int16")[0], gained(pcm, -6.0))
    assert result.metrics["sink"]["frames_in"] == 50 == result.metrics["src"]["frames_out"]


def test_cli_ray_launcher_with_curve_keys(ray_instance, tone_wav, tmp_path):
    wav, pcm = tone_wav(seconds=0.5)
    out = tmp_path / "out.wav"
    generate_keys(tmp_path / "keys")
    args = ["run", "graphs/demo.yaml", "--launcher", "ray", "--keys", str(tmp_path / "keys")]
    assert cli.main(args + [f"--set={s}" for s in demo(wav, out)]) == 0
    np.testing.assert_array_equal(sf.read(out, dtype="int16")[0], gained(pcm, -6.0))


def test_a_killed_actor_is_replaced_and_the_run_completes(ray_instance, tone_wav, tmp_path):
    from omniflow.launch.ray import RayLauncher
    wav, pcm = tone_wav(seconds=2.5)
    out = tmp_path / "out.wav"
    launcher = RayLauncher(parse_graph(f"""
nodes:
  src:  {{use: "nodes.audio:FileSource", params: {{path: "{wav}", chunk_ms: 10, realtime: true}}}}
  gain: {{use: "nodes.dsp:Gain", inputs: {{audio: src/audio}}, restart: on-failure, backoff_s: 0.1}}
  sink: {{use: "nodes.audio:WavSink", params: {{path: "{out}"}}, inputs: {{audio: gain/audio}}}}
"""))
    results = []
    thread = threading.Thread(target=lambda: results.append(launcher.run()))
    thread.start()
    time.sleep(1.0)
    ray_instance.kill(launcher.actors["gain"])          # the actor's process dies mid-stream
    thread.join(timeout=60)
    assert not thread.is_alive(), "the launcher did not return"
    result = results[0]
    assert result.ok, result.message
    assert result.restarts == {"src": 0, "gain": 1, "sink": 0}
    written = sf.read(out, dtype="int16")[0]
    assert len(pcm) // 4 < len(written) <= len(pcm)     # frames inside the dead actor may be lost
    chunk = 160                                          # 10 ms at 16 kHz, the source's chunk
    expected = [bytes(c) for c in gained(pcm, 0.0).reshape(-1, chunk)]
    got = [bytes(c) for c in written.reshape(-1, chunk)]
    it = iter(expected)
    assert all(c in it for c in got), "the output is not the input's chunks, in order"
