"""`omniflow run --trace` + `omniflow trace`: per-edge and per-node latency, the critical path.

* the analysis on a hand-made trace, where every number is known;
* sampling (--trace-every) keeps each turn's first and last frame;
* the speech graph with demo weights: every edge traced, and the critical path (VAD's end of
  utterance -> first audio at the speaker) is the measured time, hop by hop.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omniflow.trace import TraceRecord, critical_paths, read_trace, summarize

REPO = Path(__file__).resolve().parent.parent
GRAPH = REPO / "graphs" / "speech_to_speech.yaml"
QUESTION = REPO / "examples" / "question.wav"
MS = 1_000_000                     # ns


def rec(node, edge, t_ms, stamps_ms, kind="pcm", turn=0, seq=0, port="in", last=False):
    return TraceRecord(node=node, port=port, edge=edge, kind=kind, session="s", turn=turn, seq=seq,
                       last=last, t=t_ms * MS, stamps=[(hop, t * MS) for hop, t in stamps_ms])


def test_analysis_of_a_known_trace():
    # src sends at 0; vad receives at 1, stamps itself at 5 (end of utterance), sends at 6;
    # asr receives at 8, sends at 20 and again (a later output of the same input) at 30;
    # out receives those at 21 and 33.
    records = [
        rec("vad", "src/a->vad/a", 1, [("src", 0)]),
        rec("asr", "vad/u->asr/u", 8, [("src", 0), ("vad", 5), ("vad", 6)], kind="utterance"),
        rec("out", "asr/t->out/t", 21, [("src", 0), ("vad", 5), ("vad", 6), ("asr", 20)], seq=0),
        rec("out", "asr/t->out/t", 33, [("src", 0), ("vad", 5), ("vad", 6), ("asr", 30)], seq=1),
    ]
    s = summarize(records)
    assert {e: st.count for e, st in s.edges.items()} == {"src/a->vad/a": 1, "vad/u->asr/u": 1,
                                                          "asr/t->out/t": 2}
    assert s.edges["src/a->vad/a"].max_ms == 1.0
    assert s.edges["vad/u->asr/u"].max_ms == 2.0                  # 8 - 6
    assert s.edges["asr/t->out/t"].max_ms == 3.0                  # 33 - 30
    assert s.nodes["vad"].max_ms == 5.0                           # received at 1, sent at 6
    assert s.nodes["asr"].count == 1 and s.nodes["asr"].max_ms == 12.0   # first output: 20 - 8
    [path] = s.paths                                              # start: the utterance sender
    assert (path.start, path.sink, path.session, path.turn) == ("vad", "out", "s", 0)
    assert path.total_ms == 16.0                                  # 21 - 5: the first output
    assert [(h.node, h.ms) for h in path.hops] == [("vad", 1.0), ("asr", 14.0), ("out", 1.0)]
    assert critical_paths(records, start="src")[0].total_ms == 21.0
    assert critical_paths(records, start="src", sinks=["asr"])[0].total_ms == 8.0


def test_a_served_graph_ends_its_critical_paths_where_the_answer_comes_back():
    # gw sends the question to vad and receives the answer (audio on pcm, text on text): no node
    # only receives, so the paths end at the gateway's input ports
    records = [
        rec("vad", "gw/a->vad/a", 1, [("gw", 0)]),
        rec("tts", "vad/u->tts/u", 8, [("gw", 0), ("vad", 6)], kind="utterance"),
        rec("gw", "tts/t->gw/text", 12, [("gw", 0), ("vad", 6), ("tts", 10)], port="text"),
        rec("gw", "tts/p->gw/pcm", 30, [("gw", 0), ("vad", 6), ("tts", 25)], port="pcm"),
    ]
    paths = {p.sink: p for p in critical_paths(records)}
    assert sorted(paths) == ["gw/pcm", "gw/text"]
    assert paths["gw/pcm"].total_ms == 24.0 and paths["gw/text"].total_ms == 6.0      # after the vad
    assert [h.node for h in paths["gw/pcm"].hops] == ["tts", "gw"]
    assert [p.sink for p in critical_paths(records, sinks=["gw/pcm"])] == ["gw/pcm"]


def test_trace_every_keeps_each_turns_first_and_last_frame(tmp_path, tone_wav):
    from omniflow.graph import load_graph
    from omniflow.launch.local import run_graph

    wav, _ = tone_wav(seconds=1.0)                                # 50 frames of 20 ms
    graph = load_graph(REPO / "graphs" / "demo.yaml", [f"src.path={wav}",
                                                       f"sink.path={tmp_path}/out.wav"])
    trace = tmp_path / "t.jsonl"
    result = run_graph(graph, in_process=True, trace=trace, trace_every=1000)
    assert result.ok, result.message
    records = read_trace(trace)
    for edge in ("src/audio->gain/audio", "gain/audio->sink/audio"):
        seen = [(r.seq, r.last) for r in records if r.edge == edge]
        assert seen == [(0, False), (49, True)], edge

    every = run_graph(graph, in_process=True, trace=trace, trace_every=1)
    assert every.ok and len(read_trace(trace)) == 2 * 50          # a new run starts a new file


def test_speech_graph_critical_path_is_vad_to_first_audio(demo_home, tmp_path):
    from omniflow.graph import load_graph
    from omniflow.launch.local import run_graph

    graph = load_graph(GRAPH, [f"mic.path={QUESTION}", f"speaker.path={tmp_path}/answer.wav",
                               f"text.path={tmp_path}/answer.txt", "backbone.max_new_tokens=24"])
    trace = tmp_path / "trace.jsonl"
    result = run_graph(graph, in_process=True, trace=trace)
    assert result.ok, result.message
    records = read_trace(trace)
    summary = summarize(records)
    assert set(summary.edges) == {e.id for e in graph.edges}       # every edge carried frames
    assert all(s.max_ms >= 0 for s in summary.edges.values())
    assert {"vad", "whisper", "adapter", "backbone", "scheduler", "vocoder"} <= set(summary.nodes)

    paths = {p.sink: p for p in summary.paths}
    assert set(paths) == {"speaker", "text"}
    speech = paths["speaker"]
    assert (speech.start, speech.session, speech.turn) == ("vad", "default", 0)
    assert [h.node for h in speech.hops] == ["vad", "whisper", "adapter", "backbone", "scheduler",
                                             "vocoder", "speaker"]
    assert speech.total_ms == pytest.approx(sum(h.ms for h in speech.hops))
    # the same number measured directly: first pcm at the speaker minus the VAD's own stamp
    first_pcm = min((r for r in records if r.node == "speaker"), key=lambda r: r.t)
    vad_stamp = next(t for hop, t in first_pcm.stamps if hop == "vad")
    assert speech.total_ms == pytest.approx((first_pcm.t - vad_stamp) / MS)
    assert paths["text"].total_ms < speech.total_ms              # text needs no vocoder

    done = subprocess.run([sys.executable, "-m", "omniflow.cli", "trace", str(trace), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["paths"][0]["start"] == "vad"
    table = subprocess.run([sys.executable, "-m", "omniflow.cli", "trace", str(trace)],
                           capture_output=True, text=True, cwd=REPO, timeout=60,
                           env=dict(os.environ, COLUMNS="200"))     # rich wraps at the width
    assert table.returncode == 0, table.stderr
    assert "adapter/embeds->backbone/embeds" in table.stdout and "Critical path" in table.stdout


def test_trace_of_a_missing_file_says_how_to_make_one(tmp_path):
    done = subprocess.run([sys.executable, "-m", "omniflow.cli", "trace", str(tmp_path / "no.jsonl")],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2 and "--trace" in done.stderr
