"""The runtime with real processes and real sockets: sample-exact streaming, fan-out, malformed
frames straight to a node's socket, and turn changes on the control channel."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import msgspec
import numpy as np
import soundfile as sf
import zmq

from omniflow.delivery import Receiver, marker, message
from omniflow.frame import MAX_HEADER_BYTES, Frame, decode, encode
from omniflow.graph import parse_graph
from omniflow.launch.local import run_graph
from omniflow.runtime import NodeConfig
from omniflow.transport import Link, Wiring

from nodes.audio import to_int16


def gained(pcm: np.ndarray, db: float) -> np.ndarray:
    """What FileSource -> Gain(db) -> WavSink must write, computed without the framework."""
    x = pcm.astype(np.float32) / np.float32(32768)            # soundfile's int16 -> float32
    return to_int16(x * np.float32(10 ** (db / 20)))


def test_three_processes_sample_exact_over_thousands_of_frames(tone_wav, tmp_path):
    path, pcm = tone_wav(seconds=5.0)
    out = tmp_path / "out.wav"
    graph = parse_graph(f"""
nodes:
  src:  {{use: "nodes.audio:FileSource", params: {{path: "{path}", rate: 16000, chunk_ms: 2}}}}
  gain: {{use: "nodes.dsp:Gain", params: {{db: -6}}, inputs: {{audio: src/audio}}}}
  sink: {{use: "nodes.audio:WavSink", params: {{path: "{out}"}}, inputs: {{audio: gain/audio}}}}
""")
    result = run_graph(graph)
    assert result.ok, result.message
    written, rate = sf.read(out, dtype="int16")
    assert rate == 16000
    np.testing.assert_array_equal(written, gained(pcm, -6.0))    # nothing lost or reordered
    assert result.metrics["gain"]["frames_in"] == 2500 == result.metrics["sink"]["frames_in"]
    assert all(m["rejected"] == 0 and m["dropped_overflow"] == 0 for m in result.metrics.values())


def test_fan_out_delivers_every_frame_to_every_consumer_in_process(tone_wav, tmp_path):
    path, pcm = tone_wav(seconds=1.0)
    graph = parse_graph(f"""
nodes:
  src:  {{use: "nodes.audio:FileSource", params: {{path: "{path}", chunk_ms: 5}}}}
  a:    {{use: "nodes.audio:WavSink", params: {{path: "{tmp_path}/a.wav"}}, inputs: {{audio: src/audio}}}}
  loud: {{use: "nodes.dsp:Gain", params: {{db: 3}}, inputs: {{audio: src/audio}}}}
  b:    {{use: "nodes.audio:WavSink", params: {{path: "{tmp_path}/b.wav"}}, inputs: {{audio: loud/audio}}}}
""")
    result = run_graph(graph, in_process=True)
    assert result.ok, result.message
    np.testing.assert_array_equal(sf.read(tmp_path / "a.wav", dtype="int16")[0], pcm)
    np.testing.assert_array_equal(sf.read(tmp_path / "b.wav", dtype="int16")[0], gained(pcm, 3.0))


def receive(sock, receiver: Receiver) -> list:
    """The next frame's [header, payload] for `receiver`, past markers and frames sent again."""
    while True:
        assert sock.poll(10_000), "the node stopped serving"
        parts = receiver.take(sock.recv_multipart())
        if parts is not None:
            return parts


def test_malformed_frames_on_a_nodes_socket_are_counted_and_it_keeps_serving(tmp_path):
    ctx = zmq.Context()
    feed, out = f"ipc://{tmp_path}/in.sock", f"ipc://{tmp_path}/out.sock"
    producer = ctx.socket(zmq.PUSH)
    producer.setsockopt(zmq.SNDTIMEO, 10_000)  # fail, not hang, if the node never connects
    producer.bind(feed)                       # the test plays the upstream node
    downstream = Receiver(Link("relay->down", "in", out))   # the edge protocol's consumer end
    consumer = ctx.socket(zmq.PULL)
    consumer.connect(out)                     # ... and the downstream node
    cfg = NodeConfig(name="relay", use="test_runtime_nodes:Relay", params={},
                     wiring=Wiring(inputs=[Link("up->relay", "in", feed)],
                                   outputs=[Link("relay->down", "out", out)]),
                     metrics_path=str(tmp_path / "metrics.json"))
    (tmp_path / "relay.json").write_bytes(msgspec.json.encode(cfg))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))   # finds test_runtime_nodes
    proc = subprocess.Popen([sys.executable, "-m", "omniflow.runtime", str(tmp_path / "relay.json")],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        header, payload = encode(Frame(kind="pcm", data=np.arange(4, dtype=np.float32)))
        me = 42                                       # the test producer's instance
        producer.send_multipart(marker(me, 1))        # the edge protocol: numbers from 1 follow
        bad = [
            [b"\x93garbage bytes that are not msgpack"],                      # one part, no marker
            [bytes(header), bytes(payload)],                                  # no envelope
            [b"short", bytes(header), bytes(payload)],                        # a bad envelope
            message(me, 1, [bytes(header), bytes(payload)[:-4]]),             # payload too short
            message(me, 2, [b"\x00" * (MAX_HEADER_BYTES + 1), b""]),          # oversize header
        ]
        for parts in bad:
            producer.send_multipart(parts)
        good = Frame(kind="pcm", seq=7, data=np.arange(4, dtype=np.float32), meta={"rate": 8000})
        producer.send_multipart(message(me, 3, encode(good)))
        echoed = decode(receive(consumer, downstream))
        assert downstream.instance is not None        # the node's marker came first
        assert echoed.seq == 7 and echoed.meta == {"rate": 8000}
        np.testing.assert_array_equal(echoed.data, good.data)
        producer.send_multipart(message(me, 4, encode(Frame(kind="eos"))))
        assert decode(receive(consumer, downstream)).kind == "eos"    # eos is forwarded
        consumer.close()                                           # lets the node exit
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        producer.close(linger=0)
        if not consumer.closed:
            consumer.close(linger=0)
        ctx.term()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rejected"] == 5 and metrics["frames_in"] == 1 and metrics["lost"] == 0
    log = proc.stderr.read()
    for reason in ("producer's marker", "expected 3 message parts", "5-byte envelope",
                   "payload is 12 bytes", "exceeds"):
        assert reason in log


def test_turn_change_makes_every_node_drop_the_old_turn(tmp_path):
    rec, resets = tmp_path / "rec.jsonl", tmp_path / "relay_resets.txt"
    graph = parse_graph(f"""
nodes:
  src:   {{use: "test_runtime_nodes:TurnSource", params: {{n: 5}}}}
  relay: {{use: "test_runtime_nodes:Relay", params: {{reset_log: "{resets}"}}, inputs: {{in: src/out}}}}
  rec:   {{use: "test_runtime_nodes:Recorder", params: {{path: "{rec}"}}, inputs: {{in: [relay/out, src/out]}}}}
""")
    result = run_graph(graph)
    assert result.ok, result.message
    records = [json.loads(line) for line in rec.read_text().splitlines()]
    frames = [(r["turn"], r["seq"]) for r in records if "reset" not in r]
    # each frame arrives twice (through relay and directly); stale turn-0 frames (seq 5..9) never
    assert sorted(frames) == sorted(2 * ([(0, i) for i in range(5)] + [(1, i) for i in range(5)]))
    # a session's first frame starts its turn (reset to 0); the bus's turn 1 resets it again
    first_new = min(i for i, r in enumerate(records) if r.get("turn") == 1 and "reset" not in r)
    assert records.index({"reset": "s", "turn": 1, "by": "rec"}) < first_new   # reset before the new turn
    assert resets.read_text().split() == ["s:0", "s:1"]
    assert result.metrics["relay"]["dropped_old_turn"] == 5
    assert result.metrics["rec"]["dropped_old_turn"] == 5               # the direct copies


def test_a_node_that_opts_out_of_turns_keeps_hearing_its_stream_after_a_turn_change(tmp_path):
    rec = tmp_path / "rec.jsonl"
    graph = parse_graph(f"""
nodes:
  src: {{use: "test_runtime_nodes:TurnSource", params: {{n: 3}}}}
  vad: {{use: "test_runtime_nodes:TurnlessRecorder", params: {{path: "{rec}"}}, inputs: {{in: src/out}}}}
""")
    result = run_graph(graph)
    assert result.ok, result.message
    records = [json.loads(line) for line in rec.read_text().splitlines()]
    frames = [(r["turn"], r["seq"]) for r in records if "reset" not in r]
    # the turn-0 frames sent after turn 1 began (seq 3..5) still arrive; the reset still happens
    assert frames == [(0, i) for i in range(6)] + [(1, i) for i in range(3)]
    assert {"reset": "s", "turn": 1, "by": "vad"} in records
    assert result.metrics["vad"]["dropped_old_turn"] == 0


def test_a_loop_closed_by_a_feedback_edge_ends_when_eos_comes_back(tmp_path):
    graph = parse_graph(f"""
nodes:
  client: {{use: "test_runtime_nodes:LoopClient", params: {{path: "{tmp_path}/back.json", n: 300}},
            inputs: {{back: {{from: relay/out, feedback: true}}}}}}
  relay:  {{use: "test_runtime_nodes:Relay", inputs: {{in: client/out}}}}
""")
    result = run_graph(graph)
    assert result.ok, result.message
    assert json.loads((tmp_path / "back.json").read_text()) == list(range(300))


def test_tcp_edges_from_host_keys_carry_the_stream_exactly(tone_wav, tmp_path):
    path, pcm = tone_wav(seconds=1.0)
    out = tmp_path / "out.wav"
    graph = parse_graph(f"""
nodes:
  src:  {{use: "nodes.audio:FileSource", params: {{path: "{path}", chunk_ms: 10}}, host: 127.0.0.1}}
  gain: {{use: "nodes.dsp:Gain", params: {{db: -3}}, inputs: {{audio: src/audio}}, host: 127.0.0.1}}
  sink: {{use: "nodes.audio:WavSink", params: {{path: "{out}"}}, inputs: {{audio: gain/audio}}}}
""")
    from omniflow.transport import endpoint_map
    endpoints = endpoint_map(graph, "ipc", tmp_path)
    assert endpoints["src/audio->gain/audio"].startswith("tcp://127.0.0.1:")
    result = run_graph(graph)
    assert result.ok, result.message
    np.testing.assert_array_equal(sf.read(out, dtype="int16")[0], gained(pcm, -3.0))


def test_cli_run_with_set_overrides(tone_wav, tmp_path):
    from omniflow import cli
    path, pcm = tone_wav(seconds=0.5)
    out = tmp_path / "demo.wav"
    code = cli.main(["run", "graphs/demo.yaml", "--in-process", "--set", f"src.path={path}",
                     "--set", f"sink.path={out}", "--set", "gain.db=0"])
    assert code == 0
    np.testing.assert_array_equal(sf.read(out, dtype="int16")[0], pcm)
    assert cli.main(["run", "graphs/demo.yaml", "--set", "gain.gain=1"]) == 2     # validated first


def test_a_new_turns_data_arriving_before_its_announcement_starts_the_turn(tmp_path):
    rec = tmp_path / "rec.jsonl"
    graph = parse_graph(f"""
nodes:
  src: {{use: "test_runtime_nodes:TurnSource", params: {{n: 3, announce_late: true, pause_s: 0.3}}}}
  rec: {{use: "test_runtime_nodes:Recorder", params: {{path: "{rec}"}}, inputs: {{in: src/out}}}}
""")
    result = run_graph(graph, in_process=True)
    assert result.ok, result.message
    records = [json.loads(line) for line in rec.read_text().splitlines()]
    # reset once per turn, before its first frame; the late control frame changes nothing
    assert [("reset", r["turn"]) if "reset" in r else (r["turn"], r["seq"]) for r in records] == \
        [("reset", 0), (0, 0), (0, 1), (0, 2), ("reset", 1), (1, 0), (1, 1), (1, 2)]


def test_drop_oldest_edge_never_blocks_the_producer_and_keeps_the_newest_frames(tone_wav, tmp_path):
    path, _ = tone_wav(seconds=1.0)
    rec = tmp_path / "rec.jsonl"
    graph = parse_graph(f"""
nodes:
  src: {{use: "nodes.audio:FileSource", params: {{path: "{path}", chunk_ms: 2, realtime: true}}}}
  rec:
    use: "test_runtime_nodes:Recorder"
    params: {{path: "{rec}", delay_s: 0.02}}
    inputs: {{in: {{from: src/audio, policy: drop-oldest, depth: 4}}}}
""")
    result = run_graph(graph)
    assert result.ok, result.message
    seqs = [r["seq"] for r in map(json.loads, rec.read_text().splitlines()) if "reset" not in r]
    assert seqs == sorted(seqs) and seqs[-1] == 499             # in order; the newest survived
    rec_m, src_m = result.metrics["rec"], result.metrics["src"]
    assert rec_m["dropped_overflow"] > 0 and rec_m["frames_in"] < 100   # 20 ms per 2 ms frame
    # each frame was delivered or counted: by the consumer (oldest), or by the producer while
    # no consumer had connected yet (a lossy edge never waits)
    assert rec_m["frames_in"] + rec_m["dropped_overflow"] + src_m["dropped_overflow"] == 500


def test_endpoint_map_is_plain_data_with_overrides_and_a_clear_ipc_length_error(tmp_path):
    import pytest
    from omniflow.transport import CONTROL_IN, CONTROL_PUB, endpoint_map, wiring_for
    graph = parse_graph("""
nodes:
  a: {use: "test_runtime_nodes:TurnSource"}
  b: {use: "test_runtime_nodes:Relay", inputs: {in: a/out}}
  c: {use: "test_runtime_nodes:Recorder", params: {path: x}, inputs: {in: [a/out, b/out]}}
""")
    endpoints = endpoint_map(graph, "ipc", "/tmp/of", {"b/out->c/in": "tcp://10.0.0.2:5555"})
    assert endpoints == {CONTROL_PUB: "ipc:///tmp/of/0.sock", CONTROL_IN: "ipc:///tmp/of/1.sock",
                         "a/out->b/in": "ipc:///tmp/of/2.sock", "a/out->c/in": "ipc:///tmp/of/3.sock",
                         "b/out->c/in": "tcp://10.0.0.2:5555"}
    w = wiring_for(graph, "c", endpoints)
    assert [(l.port, l.address) for l in w.inputs] == [("in", "ipc:///tmp/of/3.sock"),
                                                      ("in", "tcp://10.0.0.2:5555")]
    assert w.outputs == [] and w.control_pub == "ipc:///tmp/of/0.sock"
    assert msgspec.json.decode(msgspec.json.encode(w), type=Wiring) == w     # travels as JSON
    with pytest.raises(ValueError, match="too long for ipc:// paths"):
        endpoint_map(graph, "ipc", "/tmp/" + "x" * 100)
