"""CURVE-secured edges: key files, a secured tcp graph carries the stream exactly, a client with a
wrong key gets nothing (and is counted), plain tcp still works and warns when exposed."""
from __future__ import annotations

import logging
import stat
import threading

import numpy as np
import pytest
import soundfile as sf
import zmq

from omniflow import cli
from omniflow.graph import parse_graph
from omniflow.launch.local import LocalLauncher
from omniflow.security import Curve, generate_keys
from omniflow.transport import CONTROL_IN, CONTROL_PUB, Link, bind_output, free_tcp_port

from nodes.audio import to_int16

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")


def gained(pcm: np.ndarray, db: float) -> np.ndarray:
    x = pcm.astype(np.float32) / np.float32(32768)
    return to_int16(x * np.float32(10 ** (db / 20)))


def tcp_graph(wav, out, realtime: bool = False) -> str:
    return f"""
nodes:
  src:  {{use: "nodes.audio:FileSource", params: {{path: "{wav}", chunk_ms: 10, realtime: {str(realtime).lower()}}},
          host: 127.0.0.1}}
  gain: {{use: "nodes.dsp:Gain", params: {{db: -3}}, inputs: {{audio: src/audio}}, host: 127.0.0.1}}
  sink: {{use: "nodes.audio:WavSink", params: {{path: "{out}"}}, inputs: {{audio: gain/audio}}}}
"""


def test_keys_generate_writes_a_pair_with_private_permissions(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert cli.main(["keys", "generate", str(keys)]) == 0
    secret = keys / "omniflow.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    curve = Curve.load(keys)
    assert len(curve.public) == len(curve.secret) == 40          # Z85 of 32 bytes
    assert curve.allowed == (curve.public,)                      # the cluster admits itself
    assert cli.main(["keys", "generate", str(keys)]) == 2        # never overwrites keys
    assert Curve.load(keys) == curve
    capsys.readouterr()
    assert cli.main(["keys", "show", str(keys)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"public key: {curve.public}"


def test_loading_keys_from_a_wrong_directory_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="omniflow keys generate"):
        Curve.load(tmp_path)


def test_tcp_graph_with_keys_carries_the_stream_exactly(tone_wav, tmp_path):
    wav, pcm = tone_wav(seconds=1.0)
    out = tmp_path / "out.wav"
    generate_keys(tmp_path / "keys")
    launcher = LocalLauncher(parse_graph(tcp_graph(wav, out)), keys=tmp_path / "keys")
    assert launcher.endpoints["src/audio->gain/audio"].startswith("tcp://127.0.0.1:")
    result = launcher.run()
    assert result.ok, result.message
    np.testing.assert_array_equal(sf.read(out, dtype="int16")[0], gained(pcm, -3.0))
    assert result.metrics["gain"]["frames_in"] == 100
    assert all(m["refused"] == 0 for m in result.metrics.values())


def rogue_pull(address: str, curve: Curve | None, server_public: str) -> zmq.Socket:
    """A client that knows the server's public key (it is public) but holds another key pair."""
    sock = zmq.Context.instance().socket(zmq.PULL)
    if curve is not None:
        sock.curve_secretkey, sock.curve_publickey = curve.secret.encode(), curve.public.encode()
        sock.curve_serverkey = server_public.encode()
    sock.connect(address)
    return sock


def test_a_client_with_a_wrong_key_gets_nothing_and_the_node_keeps_serving(tone_wav, tmp_path):
    wav, pcm = tone_wav(seconds=1.5)
    out = tmp_path / "out.wav"
    good = Curve.load(generate_keys(tmp_path / "keys")[0].parent)
    other = Curve.load(generate_keys(tmp_path / "other")[0].parent)
    control = {CONTROL_PUB: f"tcp://127.0.0.1:{free_tcp_port()}",
               CONTROL_IN: f"tcp://127.0.0.1:{free_tcp_port()}"}    # the control channel on tcp too
    launcher = LocalLauncher(parse_graph(tcp_graph(wav, out, realtime=True)),
                             keys=tmp_path / "keys", endpoints=control)
    results = []
    thread = threading.Thread(target=lambda: results.append(launcher.run()))
    thread.start()
    edge = launcher.endpoints["src/audio->gain/audio"]
    thieves = [rogue_pull(edge, other, good.public),          # wrong key pair
               rogue_pull(edge, None, good.public)]           # no CURVE at all
    sub = zmq.Context.instance().socket(zmq.SUB)             # eavesdrop on the control channel
    sub.curve_secretkey, sub.curve_publickey = other.secret.encode(), other.public.encode()
    sub.curve_serverkey = good.public.encode()
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(control[CONTROL_PUB])
    thread.join(timeout=30)
    assert not thread.is_alive(), "the launcher did not return"
    result = results[0]
    assert result.ok, result.message
    for sock in [*thieves, sub]:
        assert sock.poll(100) == 0, "an unauthenticated client received frames"
        sock.close(linger=0)
    # every frame reached the real consumer: none was round-robined to a thief
    np.testing.assert_array_equal(sf.read(out, dtype="int16")[0], gained(pcm, -3.0))
    assert result.metrics["src"]["refused"] >= 1          # the wrong key was refused and counted


def test_without_keys_an_exposed_tcp_bind_warns_and_loopback_does_not(caplog):
    ctx = zmq.Context()
    caplog.set_level(logging.WARNING, logger="omniflow.security")
    try:
        for host, warns in (("127.0.0.1", False), ("0.0.0.0", True)):
            caplog.clear()
            sock, watch = bind_output(ctx, Link("a/out->b/in", "out", f"tcp://{host}:{free_tcp_port()}"))
            assert ("without authentication" in caplog.text) == warns, host
            assert "--keys" in caplog.text or not warns
            watch.close()
            sock.close()
    finally:
        ctx.term()


def test_cli_run_with_keys_and_a_missing_key_dir(tone_wav, tmp_path):
    wav, pcm = tone_wav(seconds=0.3)
    out = tmp_path / "out.wav"
    graph = tmp_path / "g.yaml"
    graph.write_text(tcp_graph(wav, out))
    assert cli.main(["run", str(graph), "--keys", str(tmp_path / "nokeys")]) == 2
    generate_keys(tmp_path / "keys")
    assert cli.main(["run", str(graph), "--in-process", "--keys", str(tmp_path / "keys")]) == 0
    np.testing.assert_array_equal(sf.read(out, dtype="int16")[0], gained(pcm, -3.0))


def test_two_launchers_as_two_machines_run_one_graph_over_curve(tone_wav, tmp_path):
    """Each 'machine' runs its part (nodes=); host: ADDRESS:PORT_BASE gives both the same map."""
    wav, pcm = tone_wav(seconds=1.0)
    out = tmp_path / "out.wav"
    generate_keys(tmp_path / "keys")
    base_a, base_b = free_tcp_port(), free_tcp_port()      # one output edge each
    graph = parse_graph(f"""
nodes:
  src:  {{use: "nodes.audio:FileSource", params: {{path: "{wav}", chunk_ms: 10}}, host: "127.0.0.1:{base_a}"}}
  gain: {{use: "nodes.dsp:Gain", params: {{db: -3}}, inputs: {{audio: src/audio}}, host: "127.0.0.1:{base_b}"}}
  sink: {{use: "nodes.audio:WavSink", params: {{path: "{out}"}}, inputs: {{audio: gain/audio}}}}
""")
    machine_a = LocalLauncher(graph, keys=tmp_path / "keys", nodes=["src", "sink"])
    machine_b = LocalLauncher(graph, keys=tmp_path / "keys", nodes=["gain"])
    assert machine_a.endpoints["src/audio->gain/audio"] == f"tcp://127.0.0.1:{base_a}"
    assert {k: v for k, v in machine_a.endpoints.items() if not k.startswith("$")} == \
        {k: v for k, v in machine_b.endpoints.items() if not k.startswith("$")}
    results = {}
    threads = [threading.Thread(target=lambda m=m, k=k: results.__setitem__(k, m.run()))
               for k, m in (("a", machine_a), ("b", machine_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results["a"].ok and results["b"].ok, (results["a"].message, results["b"].message)
    assert set(results["a"].metrics) == {"src", "sink"} and set(results["b"].metrics) == {"gain"}
    np.testing.assert_array_equal(sf.read(out, dtype="int16")[0], gained(pcm, -3.0))


def test_a_split_needs_tcp_between_machines_and_ports_for_remote_hosts(tmp_path):
    graph = parse_graph("""
nodes:
  src:  {use: "nodes.audio:FileSource", params: {path: x.wav}}
  sink: {use: "nodes.audio:WavSink", params: {path: y.wav}, inputs: {audio: src/audio}}
""")
    with pytest.raises(ValueError, match="give node 'src' a 'host: ADDRESS:PORT_BASE'"):
        LocalLauncher(graph, nodes=["sink"])
    with pytest.raises(ValueError, match="no node"):
        LocalLauncher(graph, nodes=["snk"])
    remote = parse_graph("""
nodes:
  src:  {use: "nodes.audio:FileSource", params: {path: x.wav}, host: 198.51.100.77}
  sink: {use: "nodes.audio:WavSink", params: {path: y.wav}, inputs: {audio: src/audio}}
""")
    with pytest.raises(ValueError, match="host: 198.51.100.77:47100"):      # not this machine's
        LocalLauncher(remote, nodes=["sink"])
    from omniflow.graph import GraphError
    with pytest.raises(GraphError, match="bad port base '99999'"):
        parse_graph('nodes:\n  src: {use: "nodes.audio:FileSource", params: {path: x.wav}, host: "h:99999"}\n')
    assert cli.main(["run", "graphs/demo.yaml", "--skip", "gian"]) == 2          # names checked


def test_the_run_dir_and_its_ipc_sockets_are_private(tmp_path):
    graph = parse_graph('nodes:\n  src: {use: "nodes.audio:FileSource", params: {path: x.wav}}\n')
    launcher = LocalLauncher(graph, run_dir=tmp_path / "run")
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700
    assert stat.S_IMODE(launcher.sock_dir.stat().st_mode) == 0o700     # ipc:// edges stay plain
    assert launcher.endpoints[CONTROL_PUB].startswith(f"ipc://{launcher.sock_dir.resolve()}")
    launcher.context.term()
