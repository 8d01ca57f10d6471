"""The local launcher: restart policies after SIGKILL, setup failures, Ctrl-C/SIGTERM cleanup."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import soundfile as sf

from omniflow.graph import parse_graph
from omniflow.launch.local import LocalLauncher, run_graph


def realtime_graph(wav: Path, out: Path, restart: str) -> str:
    """src paces 10 ms chunks at real time, so a node can be killed mid-stream."""
    return f"""
nodes:
  src:  {{use: "nodes.audio:FileSource", params: {{path: "{wav}", chunk_ms: 10, realtime: true}}}}
  gain: {{use: "nodes.dsp:Gain", inputs: {{audio: src/audio}}, restart: {restart}, backoff_s: 0.1}}
  sink: {{use: "nodes.audio:WavSink", params: {{path: "{out}"}}, inputs: {{audio: gain/audio}}}}
"""


def run_and_kill(graph_text: str, victim: str, after_s: float):
    launcher = LocalLauncher(parse_graph(graph_text))
    results = []
    thread = threading.Thread(target=lambda: results.append(launcher.run()))
    thread.start()
    deadline = time.monotonic() + 10
    while (victim not in launcher.workers or launcher.workers[victim].pid is None) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(after_s)
    os.kill(launcher.workers[victim].pid, signal.SIGKILL)
    killed = time.monotonic()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the launcher did not return"
    return results[0], time.monotonic() - killed


def test_sigkill_with_on_failure_restarts_and_the_run_completes(tone_wav, tmp_path):
    wav, pcm = tone_wav(seconds=2.5)
    out = tmp_path / "out.wav"
    result, _ = run_and_kill(realtime_graph(wav, out, "on-failure"), "gain", after_s=1.0)
    assert result.ok, result.message
    assert result.restarts == {"src": 0, "gain": 1, "sink": 0}
    written = sf.read(out, dtype="int16")[0]
    # frames inside the killed process are lost; everything after the restart arrives
    assert len(pcm) // 2 < len(written) <= len(pcm)


def test_sigkill_with_never_stops_the_run_with_a_clear_message(tone_wav, tmp_path):
    wav, _ = tone_wav(seconds=2.5)
    result, after_kill_s = run_and_kill(realtime_graph(wav, tmp_path / "out.wav", "never"), "gain",
                                        after_s=0.8)
    assert not result.ok and result.exit_code == 1
    assert "node 'gain' was killed by SIGKILL" in result.message
    assert "restart policy is 'never'" in result.message and "restart: on-failure" in result.message
    assert after_kill_s < 1.5                # stopped at once, did not play the file to its end


def test_setup_failure_stops_the_run_naming_the_node_and_its_error(tmp_path):
    graph = parse_graph(f"""
nodes:
  src:  {{use: "nodes.audio:FileSource", params: {{path: "{tmp_path}/missing.wav"}}}}
  sink: {{use: "nodes.audio:WavSink", params: {{path: "{tmp_path}/o.wav"}}, inputs: {{audio: src/audio}},
          restart: always}}
""")
    t0 = time.monotonic()
    result = run_graph(graph)
    assert not result.ok
    assert "node 'src' failed in setup()" in result.message
    assert "missing.wav" in result.message
    assert time.monotonic() - t0 < 8


def test_setup_failure_in_process_too(tmp_path):
    graph = parse_graph("""
nodes:
  broken: {use: "test_runtime_nodes:BrokenSetup"}
  rec:    {use: "test_runtime_nodes:Recorder", params: {path: "/dev/null"}, inputs: {in: broken/out}}
""")
    result = run_graph(graph, in_process=True)
    assert not result.ok and "the model file is corrupt" in result.message


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_sigterm_stops_every_node_within_5s_and_leaves_no_ipc_files(tone_wav, tmp_path):
    wav, _ = tone_wav(seconds=30)
    graph = tmp_path / "g.yaml"
    graph.write_text(realtime_graph(wav, tmp_path / "out.wav", "never"))
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "omniflow.cli", "run", str(graph),
                             "--run-dir", str(run_dir)],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 15
    while len(children_of(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    kids = children_of(proc.pid)
    assert len(kids) == 3
    while len(list((run_dir / "ipc").glob("*.sock"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)                                 # 2 control + 2 edge sockets: streaming
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=10)
    assert time.monotonic() - t0 < 5.0
    assert code == 130
    assert not any(Path(f"/proc/{k}").exists() and "Z" not in Path(f"/proc/{k}/stat").read_text()
                   .rsplit(")", 1)[1].split()[0] for k in kids), "orphan node processes"
    assert not (run_dir / "ipc").exists()
    log = proc.stderr.read()
    assert "[src] INFO" in log                                           # prefixed node logs
    assert "INFO [src] frames_in=" in log and "INFO [gain] frames_in=" in log   # metrics, once
    assert "interrupted" in log


def test_a_node_silent_for_too_long_is_reported(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr("omniflow.launch.local.SILENT_WARN_S", 1.0)
    graph = parse_graph(f"""
nodes:
  src: {{use: "test_runtime_nodes:TurnSource", params: {{n: 1, start_s: 0.1, pause_s: 1.6}}}}
  rec: {{use: "test_runtime_nodes:Recorder", params: {{path: "{tmp_path}/r.jsonl"}}, inputs: {{in: src/out}}}}
""")
    with caplog.at_level("WARNING", logger="omniflow.launch"):
        assert run_graph(graph, in_process=True).ok
    assert "node 'src' has sent no heartbeat for 1 s: it is stuck in a long call or hung" in caplog.text


def test_a_stop_on_the_control_channel_ends_every_node(tmp_path):
    graph = parse_graph(f"""
nodes:
  stopper: {{use: "test_runtime_nodes:Stopper", params: {{after_s: 0.3}}}}
  rec:     {{use: "test_runtime_nodes:Recorder", params: {{path: "{tmp_path}/r.jsonl"}}, inputs: {{in: stopper/out}}}}
""")
    t0 = time.monotonic()
    result = run_graph(graph)
    assert result.ok and result.message.startswith("stopped by a node's control frame")
    assert result.exit_codes == {"stopper": 0, "rec": 0}
    assert time.monotonic() - t0 < 6


def threads_graph(tmp_path: Path) -> str:
    # two values, so the default (one thread per core) cannot satisfy both
    return f"""
nodes:
  one:   {{use: "test_runtime_nodes:ThreadsReporter", params: {{path: "{tmp_path}/one"}}, threads: 1}}
  three: {{use: "test_runtime_nodes:ThreadsReporter", params: {{path: "{tmp_path}/three"}},
          threads: 3}}
"""


def test_threads_caps_torch_in_each_node_process(tmp_path):
    result = run_graph(parse_graph(threads_graph(tmp_path)))
    assert result.ok, result.message
    assert (tmp_path / "one").read_text() == "1"
    assert (tmp_path / "three").read_text() == "3"


def test_threads_applies_in_process_when_torch_is_loaded(tmp_path):
    import torch
    before = torch.get_num_threads()
    graph = parse_graph(f"""
nodes:
  three: {{use: "test_runtime_nodes:ThreadsReporter", params: {{path: "{tmp_path}/three"}},
          threads: 3}}
""")
    try:
        assert run_graph(graph, in_process=True).ok
        assert (tmp_path / "three").read_text() == "3"
    finally:
        torch.set_num_threads(before)


def ready_graph(wav: Path, tmp_path: Path) -> str:
    """A source feeding a node whose setup() takes 1.5 s (a weight load)."""
    return f"""
nodes:
  src:  {{use: "nodes.audio:FileSource", params: {{path: "{wav}", chunk_ms: 100}}}}
  slow: {{use: "test_runtime_nodes:SlowSetupRecorder", params: {{path: "{tmp_path}/slow.jsonl",
         setup_s: 1.5}}, inputs: {{in: src/audio}}}}
"""


def check_source_waited(tmp_path: Path) -> None:
    import json
    lines = [json.loads(line) for line in (tmp_path / "slow.jsonl").read_text().splitlines()]
    setup_done = lines[0]["setup_done_ns"]
    frames = [r for r in lines[1:] if "reset" not in r]       # (the session's turn 0 starting)
    assert len(frames) == 5                                   # 0.5 s of audio in 100 ms chunks
    sent = [dict(f["stamps"])["src"] for f in frames]         # when the source sent each frame
    assert min(sent) >= setup_done, "the source started before every node had finished setup()"


def test_sources_start_only_when_every_node_finished_setup(tone_wav, tmp_path, caplog):
    import logging
    wav, _ = tone_wav(seconds=0.5)
    with caplog.at_level(logging.INFO, logger="omniflow.launch"):
        result = run_graph(parse_graph(ready_graph(wav, tmp_path)))
    assert result.ok, result.message
    check_source_waited(tmp_path)
    assert sum("graph ready" in r.getMessage() for r in caplog.records) == 1


def test_sources_wait_for_setup_in_process_too(tone_wav, tmp_path):
    wav, _ = tone_wav(seconds=0.5)
    assert run_graph(parse_graph(ready_graph(wav, tmp_path)), in_process=True).ok
    check_source_waited(tmp_path)


def test_the_cpu_plan_gives_light_nodes_one_thread_and_heavy_ones_the_cores(tmp_path):
    from omniflow.launch.plan import available_cores
    graph = parse_graph(f"""
nodes:
  light: {{use: "test_runtime_nodes:ThreadsReporter", params: {{path: "{tmp_path}/light"}}}}
  heavy: {{use: "test_runtime_nodes:HeavyThreadsReporter", params: {{path: "{tmp_path}/heavy"}}}}
""")
    result = run_graph(graph)
    assert result.ok, result.message
    assert (tmp_path / "light").read_text() == "1"       # torch's default would be every core
    assert (tmp_path / "heavy").read_text() == str(available_cores())


def test_node_processes_wait_passively_unless_the_user_says_otherwise(monkeypatch):
    from omniflow.runtime import thread_env
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert thread_env(2) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                             "OPENBLAS_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert "OMP_WAIT_POLICY" not in thread_env(2)


def failing_graph(text: str, out: Path) -> str:
    return f"""
nodes:
  src: {{use: nodes.text:TextSource, params: {{text: {json.dumps(text)}}}}}
  check: {{use: test_runtime_nodes:RefuseLong, inputs: {{text: src/text}}}}
  sink: {{use: nodes.text:TextSink, params: {{mode: file, path: {json.dumps(str(out))}}}, inputs: {{text: check/text}}}}
"""


@pytest.mark.parametrize("in_process", [True, False])
def test_a_run_whose_every_turn_failed_does_not_succeed(tmp_path, in_process):
    result = run_graph(parse_graph(failing_graph("a very long prompt indeed", tmp_path / "out.txt")),
                       in_process=in_process)
    assert not result.ok and result.exit_code == 1
    assert "node 'check' failed every turn it handled (1 of 1" in result.message
    assert result.metrics["check"]["failed_turns"] == 1
    # one bad turn among good ones: the run succeeds, the bad one was reported to its user
    ok = run_graph(parse_graph(failing_graph("short\na very long prompt indeed\nfine", tmp_path / "ok.txt")),
                   in_process=in_process)
    assert ok.ok, ok.message
    assert ok.metrics["check"]["turns"] == 3 and ok.metrics["check"]["failed_turns"] == 1


def deep_edge_graph(wav: Path, record: Path) -> str:
    """src sends its whole file (10 ms chunks) and its eos at once into a 1000-deep edge; rec, which
    restarts on failure, takes 20 ms a frame and records each one."""
    return f"""
nodes:
  src: {{use: "nodes.audio:FileSource", params: {{path: "{wav}", chunk_ms: 10}}}}
  rec: {{use: "test_runtime_nodes:Recorder", params: {{path: "{record}", delay_s: 0.02}},
         inputs: {{in: {{from: src/audio, depth: 1000}}}}, restart: on-failure, backoff_s: 0.1}}
"""


def test_a_node_restarted_after_its_producer_ended_learns_it_and_the_run_ends(tone_wav, tmp_path):
    """src sends its whole file and its eos at once (a deep edge); rec is killed while still
    working through it: the eos went to the dead instance, and the new one hears it from the bus."""
    wav, _ = tone_wav(seconds=2.5)
    graph = deep_edge_graph(wav, tmp_path / "r.jsonl")
    result, after_kill_s = run_and_kill(graph, "rec", after_s=2.5)
    assert result.ok, result.message
    assert result.restarts == {"src": 0, "rec": 1}
    assert after_kill_s < 15                      # ended by itself, did not wait for a timeout


def test_a_killed_consumer_loses_none_of_the_frames_queued_for_it(tone_wav, tmp_path):
    """src sends 250 frames at once into a deep lossless edge; rec takes 20 ms each and is killed
    with ~200 still queued for it: its successor gets every frame the dead one had not taken,
    once and in order (omniflow/delivery.py). Lost is at most the one frame it was handling."""
    wav, pcm = tone_wav(seconds=2.5)
    n = len(pcm) // 160                               # 10 ms chunks at 16 kHz
    graph = deep_edge_graph(wav, tmp_path / "r.jsonl")
    result, _ = run_and_kill(graph, "rec", after_s=1.0)
    assert result.ok, result.message
    assert result.restarts == {"src": 0, "rec": 1}
    seqs = [json.loads(line)["seq"] for line in (tmp_path / "r.jsonl").read_text().splitlines()
            if '"reset"' not in line]
    assert len(seqs) == len(set(seqs)), "a frame arrived twice"
    assert seqs == sorted(seqs), "frames arrived out of order"
    missing = set(range(n)) - set(seqs)
    assert len(missing) <= 1, f"lost {sorted(missing)}"
    assert result.metrics["src"]["resent"] > 100          # what the dead instance had queued
