"""`omniflow bench live`: the listener's clock, the end of speech, and a whole run on demo weights."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.live import answer_steps, last_voiced_sample, playback, STEP_S


def test_last_voiced_sample_is_found_in_the_signal_not_at_the_end_of_the_file():
    rate = 16000
    rng = np.random.default_rng(0)
    speech = 0.3 * np.sin(2 * np.pi * 220 * np.arange(rate) / rate)          # 1 s of "speech"
    audio = np.concatenate([np.zeros(rate // 2), speech, 1e-4 * rng.standard_normal(rate)])
    end = last_voiced_sample(audio.astype(np.float32), rate)
    assert abs(end - (rate // 2 + rate - 1)) < rate // 100                   # within one 10 ms window


def test_last_voiced_sample_refuses_silence():
    with pytest.raises(ValueError, match="silent"):
        last_voiced_sample(np.zeros(16000, np.float32))


def test_playback_counts_every_time_the_buffer_runs_dry():
    rate = 1000
    # 1 s at t=0, then 1 s at t=1.5 (0.5 s gap), then 1 s at t=2.0 (still playing: no gap)
    play = playback([(0.0, 1000), (1.5, 1000), (2.0, 1000)], rate)
    assert play["first_t"] == 0.0 and play["answer_s"] == 3.0
    assert play["stalls"] == 1 and play["stall_s"] == pytest.approx(0.5)
    assert play["stalls_at"] == [(1.0, 0.5)]                            # dry 1 s in, for 0.5 s
    assert play["rtf"] == pytest.approx(3.0 / 2.0)


def test_playback_of_an_answer_faster_than_real_time_has_no_stall():
    play = playback([(0.1 * k, 4800) for k in range(10)], 24000)       # 0.2 s every 0.1 s
    assert play["stalls"] == 0 and play["stall_s"] == 0.0 and play["rtf"] > 1


def test_playback_of_nothing():
    play = playback([], 24000)
    assert play["first_t"] is None and play["answer_s"] == 0.0


def test_answer_steps_cover_the_delay():
    assert (answer_steps(20.0) - 7) * STEP_S >= 20.0


@pytest.mark.slow
def test_bench_live_on_demo_weights_reports_every_field(demo_home, tmp_path):
    out = tmp_path / "live.json"
    # float32: the CPU bf16 path needs avx512 on some torch builds; this checks the bench, not a dtype
    proc = subprocess.run([sys.executable, "-m", "omniflow.cli", "bench", "live", "--sessions", "1,2",
                           "--answer-seconds", "1.5", "--set", "backbone.dtype=float32",
                           "--set", "whisper.dtype=float32", "--json", str(out), "--trace", str(tmp_path / "t.jsonl")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]
    assert 0 < r["question"]["speech_ends_s"] <= r["question"]["seconds"]
    assert set(r["graphs"]) == {"serve", "speech"}
    assert [rnd["sessions"] for rnd in r["graphs"]["serve"]["rounds"]] == [1, 2]
    assert [rnd["sessions"] for rnd in r["graphs"]["speech"]["rounds"]] == [1]
    for name, g in r["graphs"].items():
        assert g["ready_s"] > 0 and "CPU plan" in g["plan"]
        for rnd in g["rounds"]:
            assert len(rnd["clients"]) == rnd["sessions"]
            for c in rnd["clients"]:
                assert c["ended"] and not c["timed_out"] and c["errors"] == []
                assert c["first_audio_s"] > 0                 # after the true end of speech
                assert c["answer_s"] == pytest.approx(1.5, abs=2 * STEP_S)
                assert c["stall_s"] >= 0 and c["stalls"] >= 0 and c["rtf"] > 0
            nodes = {"backbone", "whisper", "vocoder", "vad"}
            assert nodes <= set(rnd["cpu"]["per_node"]), rnd["cpu"]
            assert rnd["cpu"]["per_node"]["backbone"] > 0
    from omniflow.trace import read_trace
    traced = {(rec.session, rec.edge.split("/")[0]) for rec in read_trace(tmp_path / "t.jsonl")}
    assert {("n1-0", "vocoder"), ("n2-1", "backbone")} <= traced       # the served graph's frames, per client
    o = r["original"]
    assert o["first_audio_s"] > 0 and o["answer_s"] > 0 and o["rtf"] > 0
    assert "first vs orig" in proc.stdout and "original" in proc.stdout


def test_gpu_script_times_decode_steps_on_cpu_and_writes_one_json(tmp_path):
    """benchmarks/gpu.sh's pieces on CPU (2 layers, no time left for the served graph): it still
    writes its one JSON, with a decode point per session count and the skipped part said."""
    import os
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu.json"
    env = {**os.environ, "DEVICE": "cpu", "N_LAYER": "2", "DECODE_SESSIONS": "1,2", "BUDGET_S": "70",
           "PYTHON": sys.executable, "PYTHONPATH": str(repo), "OMNIFLOW_HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    steps = r["decode"]["steps"]
    assert set(steps) == {"1", "2"}, r["decode"]
    for e in steps.values():
        assert e["eager_ms"] > 0 and e["best_ms"] == e["eager_ms"] and e["graphs_ms"] is None
        assert "CUDA" in e["graphs_skipped"]
    assert r["decode"]["complete"] and r["decode"]["n_layer"] == 2
    assert r["sessions_held_without_stalls"] == 0 and "error" in r["live"]     # no time was left
