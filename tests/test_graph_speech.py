"""The speech-to-speech graph end to end, on the shipped question and the demo weights.

* each node its own process: an answer WAV at 24 kHz with frames × 2048 samples (no tail dropped),
  and the text file holds the decoded text stream;
* in one process: the same tokens as the model called directly (the graph changes nothing);
* two sessions at once through one backbone: exactly the tokens each gets alone;
* barge-in: a second question during the answer cancels the first turn everywhere.

`Recorder` (below) is a tap node the tests splice into the graph: it appends every frame it
receives to a JSON-lines file, so it works across processes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import soundfile as sf

from omniflow.frame import Frame
from omniflow.node import Node

REPO = Path(__file__).resolve().parent.parent
GRAPH = REPO / "graphs" / "speech_to_speech.yaml"
QUESTION = REPO / "examples" / "question.wav"
STEPS = 40                      # max_new_tokens per answer: a few SNAC chunks, seconds on 2 cores
SAMPLES_PER_FRAME = 2048        # SNAC 24 kHz: samples per coarse frame
ANSWER_RATE = 24_000
GAP_S = 3.0                     # barge-in test: silence between the two questions


class Recorder(Node):
    """Appends one JSON line per received frame: arrival time, port, header, tokens or sample count."""

    inputs = {"tokens": "any", "audio": "any"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        path: str

    def process(self, port, frame: Frame):
        record = {"t": time.monotonic(), "port": port, "kind": frame.kind, "session": frame.session,
                  "turn": frame.turn, "seq": frame.seq, "last": frame.last, "meta": frame.meta}
        if frame.kind == "tokens":
            record["tokens"] = None if frame.data is None else [int(x) for x in frame.data]
        elif frame.data is not None:
            record["samples"] = int(np.asarray(frame.data).size)
        with open(self.params.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return ()


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- fixtures ------------------------------------------------------------------------------

def speech_graph(tmp: Path, *sets: str, edit=None):
    """The shipped graph, outputs redirected into `tmp`, a Recorder on tokens and audio; `edit(spec)`
    may change the parsed YAML first; `sets` are `--set` overrides applied after the defaults."""
    import yaml

    from omniflow.graph import load_graph, parse_graph

    assert load_graph(GRAPH) is not None                  # the shipped file itself is valid
    spec = yaml.safe_load(GRAPH.read_text())
    spec["nodes"]["tap"] = {"use": "test_graph_speech:Recorder", "params": {"path": str(tmp / "tap.jsonl")},
                            "inputs": {"tokens": "backbone/tokens", "audio": "vocoder/pcm"}}
    if edit is not None:
        edit(spec)
    overrides = [f"mic.path={QUESTION}", f"speaker.path={tmp}/answer_{{session}}.wav",
                 f"text.path={tmp}/answer_{{session}}.txt", f"backbone.max_new_tokens={STEPS}", *sets]
    return parse_graph(yaml.safe_dump(spec), str(GRAPH), overrides)


def graph_params(node: str) -> dict:
    """The shipped graph's params of `node` as the graph gives them (its variables filled in; the
    direct model calls below use the same dtypes)."""
    from omniflow.graph import load_graph

    return load_graph(GRAPH).nodes[node].params


def embeds_of(wav: Path, home: Path) -> list[np.ndarray]:
    """The front half (file -> VAD -> whisper -> adapter) run node by node, for the direct model call,
    each node with the graph's params (whisper's dtype included)."""
    from nodes.adapter import Adapter
    from nodes.audio import FileSource
    from nodes.vad import SileroVAD
    from nodes.whisper import WhisperEncoder
    from omniflow.testing import run_node

    pcm = run_node(FileSource({"path": str(wav), "rate": 16000, "chunk_ms": 20})).frames()
    utterances = run_node(SileroVAD(), pcm).on("utterance")
    features = run_node(WhisperEncoder(graph_params("whisper")), utterances, port="audio").on("features")
    return [f.data for f in run_node(Adapter(graph_params("adapter")), features).on("embeds")]


def direct_tokens(embeds: np.ndarray, steps: int = STEPS) -> list[list[int]]:
    """Mini-Omni called directly, one session alone, no graph: the kept steps' 8 tokens (with the
    graph's backbone dtype and quant: bfloat16 int4 tokens are compared with bfloat16 int4 tokens)."""
    import torch

    from omniflow.model import weights
    from omniflow.model.checkpoint import load_model
    from omniflow.model.dtypes import resolve_auto
    from omniflow.model.engine import Engine

    params = graph_params("backbone")
    dtype = getattr(torch, resolve_auto(params.get("dtype", "float32")))
    model, _ = load_model(weights.resolve("miniomni"), dtype=dtype)
    engine = Engine(model, max_sessions=1, quant=params.get("quant", "none"))
    outs = [engine.start("x", "A1A2", embeds=torch.from_numpy(np.array(embeds)), max_new_tokens=steps)]
    while not outs[-1].done:
        outs += engine.step().values()
    return [o.tokens for o in outs if o.kept]


def expected_samples(tokens: list[list[int]]) -> int:
    """Samples the answer WAV must hold: every complete SNAC frame without specials × 2048."""
    from omniflow.model.delay import undelay, valid_frames

    frames = undelay(np.array([t[:7] for t in tokens]))
    return int(valid_frames(frames).sum()) * SAMPLES_PER_FRAME


def recorded_tokens(records, session="default", turn=None):
    return [r["tokens"] for r in records if r["port"] == "tokens" and r["session"] == session
            and r["tokens"] is not None and (turn is None or r["turn"] == turn)]


# --- tests ---------------------------------------------------------------------------------

def test_full_graph_each_node_its_own_process(demo_home, tmp_path):
    from omniflow.launch.local import run_graph
    from omniflow.model.tokenizer import Tokenizer
    from omniflow.model import weights

    result = run_graph(speech_graph(tmp_path))
    assert result.ok, result.message
    tokens = recorded_tokens(read_records(tmp_path / "tap.jsonl"))
    assert 0 < len(tokens) <= STEPS

    wav, rate = sf.read(tmp_path / "answer_default.wav", dtype="float32")
    assert rate == ANSWER_RATE
    assert len(wav) == expected_samples(tokens) > 0          # every frame generated, tail included
    text = (tmp_path / "answer_default.txt").read_text().rstrip("\n")
    assert text == Tokenizer.from_dir(weights.resolve("miniomni")).decode([t[7] for t in tokens])


def test_graph_in_one_process_equals_the_model_called_directly(demo_home, tmp_path):
    from omniflow.launch.local import run_graph

    result = run_graph(speech_graph(tmp_path), in_process=True)
    assert result.ok, result.message
    records = read_records(tmp_path / "tap.jsonl")
    [embeds] = embeds_of(QUESTION, demo_home)
    want = direct_tokens(embeds)
    assert recorded_tokens(records) == want
    pcm = [r for r in records if r["port"] == "audio"]
    assert sum(r["samples"] for r in pcm) == expected_samples(want) and pcm[-1]["last"]


def test_two_sessions_at_once_get_exactly_their_solo_tokens(demo_home, tmp_path):
    """Two microphones (sessions a and b) share one VAD, whisper, adapter and backbone."""
    from omniflow.launch.local import run_graph

    second = tmp_path / "second.wav"                      # another question: the shipped one, slowed
    audio, rate = sf.read(QUESTION, dtype="float32")
    sf.write(second, np.interp(np.arange(0, len(audio), 0.8), np.arange(len(audio)), audio), rate)
    def second_microphone(spec):
        spec["nodes"]["mic_b"] = {"use": "nodes.audio:FileSource",
                                  "params": {"path": str(second), "session": "b"}}
        spec["nodes"]["vad"]["inputs"] = {"audio": ["mic/audio", "mic_b/audio"]}

    graph = speech_graph(tmp_path, "mic.session=a", "backbone.max_new_tokens=80", edit=second_microphone)
    result = run_graph(graph, in_process=True)
    assert result.ok, result.message
    records = [r for r in read_records(tmp_path / "tap.jsonl") if r["port"] == "tokens"]
    sessions = [r["session"] for r in records]
    # they really ran together: b's answer started before a's ended (or the other way round)
    spans = {s: (sessions.index(s), len(sessions) - 1 - sessions[::-1].index(s)) for s in "ab"}
    assert spans["a"][0] < spans["b"][1] and spans["b"][0] < spans["a"][1], spans
    for session, wav in (("a", QUESTION), ("b", second)):
        [embeds] = embeds_of(wav, demo_home)
        assert recorded_tokens(records, session) == direct_tokens(embeds, steps=80), session


def test_barge_in_cancels_the_old_turn_everywhere(demo_home, tmp_path):
    """The question twice, at the speed of speech: the second one interrupts the first answer.

    The questions are GAP_S apart, so the first answer has started everywhere (even on a busy
    machine) before the second question is heard; the paced answer lasts longer than that.
    """
    from omniflow.launch.local import run_graph

    twice = tmp_path / "twice.wav"
    audio, rate = sf.read(QUESTION, dtype="float32")
    gap = np.zeros(int(GAP_S * rate), np.float32)
    sf.write(twice, np.concatenate([audio, gap, audio]), rate)
    # The tiny demo model decodes far faster than speech; paced at 4x real time its 200-step
    # answer lasts ~4.3 s, so the first answer is surely still running when the second question
    # is heard (~2.3 s after it started), however fast or busy the machine is.
    graph = speech_graph(tmp_path, f"mic.path={twice}", "mic.realtime=true", "backbone.max_speed=4.0",
                         "backbone.max_new_tokens=200", "scheduler.chunk_frames=1")
    result = run_graph(graph, in_process=True)
    assert result.ok, result.message
    records = read_records(tmp_path / "tap.jsonl")
    tokens = [r for r in records if r["port"] == "tokens"]
    audio_out = [r for r in records if r["port"] == "audio"]
    assert any(r["turn"] == 0 for r in tokens), "the first answer never started"
    assert not any(r["last"] for r in tokens + audio_out if r["turn"] == 0), "the first answer was not cut"
    # the second turn is answered in full
    assert [r["meta"]["step"] for r in tokens if r["turn"] == 1][0] == 0
    assert any(r["last"] for r in audio_out if r["turn"] == 1)
    # once the new turn's audio reached the sink, no audio of the old turn follows
    first_new = next(i for i, r in enumerate(audio_out) if r["turn"] == 1)
    assert all(r["turn"] == 1 for r in audio_out[first_new:])


def test_the_latency_benchmarks_measure_this_graphs_settings():
    """`omniflow bench graph|concurrency` read their omniflow settings from this file, not from a copy."""
    from benchmarks.graph import graph_defaults

    d = graph_defaults(GRAPH)
    assert d["whisper"].dtype == graph_params("whisper").get("dtype", "float32")
    assert d["backbone"].dtype == graph_params("backbone").get("dtype", "float32")
    assert d["scheduler"].first_chunk_frames == graph_params("scheduler")["first_chunk_frames"]
    assert d["vocoder"].crossfade_ms == graph_params("vocoder")["crossfade_ms"]
    assert graph_defaults(GRAPH, {"backbone": {"dtype": "float32"}})["backbone"].dtype == "float32"
    with pytest.raises(ValueError, match="no nodes.whisper:WhisperEncoder node"):
        graph_defaults(REPO / "graphs" / "tts.yaml")
