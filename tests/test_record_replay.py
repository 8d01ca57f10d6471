"""Record the frames of an edge (`run --record`, `omniflow record`), replay them (nodes.replay:Replay).

* the speech graph's adapter/embeds edge, replayed into backbone -> scheduler -> vocoder -> sink
  (graphs/replay_backbone.yaml): the answer WAV and text equal the original run's exactly;
* across processes through the CLI: `omniflow record`, `omniflow replay FILE`, a replay graph;
* Replay keeps kinds/sessions/turns/meta/payloads, paces frames with realtime/speed;
* a cut-off recording replays what is whole; a wrong file or edge is a clear error.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from omniflow.frame import Frame, encode
from omniflow.record import Recording, RecordingError, RecordTap, start_recordings
from omniflow.testing import run_node

REPO = Path(__file__).resolve().parent.parent
SPEECH = REPO / "graphs" / "speech_to_speech.yaml"
REPLAY = REPO / "graphs" / "replay_backbone.yaml"
QUESTION = REPO / "examples" / "question.wav"
STEPS = 40                      # answer length: a few vocoder chunks, seconds on 2 cores
NS_PER_MS = 1_000_000


class FakeLink:
    def __init__(self, id: str, port: str = "in"):
        self.id, self.port = id, port


def write_recording(path: Path, frames_at_ms: list[tuple[int, Frame]], edge: str = "a/x->b/y"):
    """A recording as a consuming runtime writes it: encoded parts + receive times."""
    path.unlink(missing_ok=True)
    tap = RecordTap({edge: str(path)})
    for t_ms, frame in frames_at_ms:
        tap.received(FakeLink(edge), frame, encode(frame), t_ms * NS_PER_MS)
    tap.close()


def omniflow(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omniflow.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, COLUMNS="200"))     # rich wraps at the width


# the vocoder's speculate: auto decides by the listener's clock (how fast chunks arrive), so its
# cross-faded samples depend on timing; speculate: first is the same decoder, decided by position only
DETERMINISTIC = ["vocoder.speculate=first"]


def test_replayed_embeds_give_the_same_answer_sample_for_sample(demo_home, tmp_path):
    from omniflow.graph import load_graph
    from omniflow.launch.local import run_graph

    rec = tmp_path / "question.omnirec"
    original = load_graph(SPEECH, [f"mic.path={QUESTION}", f"speaker.path={tmp_path}/original.wav",
                                   f"text.path={tmp_path}/original.txt",
                                   f"backbone.max_new_tokens={STEPS}", *DETERMINISTIC])
    result = run_graph(original, in_process=True, record={"adapter/embeds": rec})
    assert result.ok, result.message

    recording = Recording(rec)
    assert recording.edges == ["adapter/embeds->backbone/embeds"]
    frames = [f for _, f in recording]
    # one utterance -> one final embeds frame, after the tentative one the backbone speculates on
    [embeds] = [f for f in frames if not f.meta.get("tentative")]
    assert all(np.array_equal(f.data, embeds.data) for f in frames)      # the speculation was confirmed
    assert embeds.kind == "embeds" and embeds.last and embeds.data.ndim == 2   # (T, n_embd)

    replay = load_graph(REPLAY, [f"replay.path={rec}", f"speaker.path={tmp_path}/replayed.wav",
                                 f"text.path={tmp_path}/replayed.txt",
                                 f"backbone.max_new_tokens={STEPS}", *DETERMINISTIC])
    result = run_graph(replay, in_process=True)
    assert result.ok, result.message
    want, rate = sf.read(tmp_path / "original.wav", dtype="int16")
    got, got_rate = sf.read(tmp_path / "replayed.wav", dtype="int16")
    assert len(want) > 0 and got_rate == rate
    np.testing.assert_array_equal(got, want)             # sample for sample
    assert (tmp_path / "replayed.txt").read_text() == (tmp_path / "original.txt").read_text()


def test_replay_graph_keeps_the_speech_graphs_back_half():
    """graphs/replay_backbone.yaml promises the speech graph's answer half: same nodes, same params."""
    speech, replay = (yaml.safe_load(p.read_text())["nodes"] for p in (SPEECH, REPLAY))
    for name in ("backbone", "scheduler", "vocoder"):
        assert replay[name]["use"] == speech[name]["use"]
        assert replay[name].get("params") == speech[name].get("params"), name
    assert replay["backbone"]["inputs"] == {"embeds": "replay/frames"}


def test_record_and_replay_across_processes_with_the_cli(tmp_path, tone_wav):
    wav, _ = tone_wav(seconds=1.0)
    rec, out = tmp_path / "gain.omnirec", tmp_path / "demo.wav"
    done = omniflow("record", str(REPO / "graphs" / "demo.yaml"), "--edge", "gain/audio",
                    "--out", str(rec), "--set", f"src.path={wav}", "--set", f"sink.path={out}")
    assert done.returncode == 0, done.stderr[-2000:]

    shown = omniflow("replay", str(rec))
    assert shown.returncode == 0, shown.stderr
    assert "50 frames" in shown.stdout and "gain/audio->sink/audio" in shown.stdout

    graph = tmp_path / "replay.yaml"
    graph.write_text(yaml.safe_dump({"nodes": {
        "replay": {"use": "nodes.replay:Replay", "params": {"path": str(rec)}},
        "sink": {"use": "nodes.audio:WavSink", "params": {"path": str(tmp_path / "again.wav")},
                 "inputs": {"audio": "replay/frames"}}}}))
    done = omniflow("run", str(graph))
    assert done.returncode == 0, done.stderr[-2000:]
    want, _ = sf.read(out, dtype="int16")
    got, _ = sf.read(tmp_path / "again.wav", dtype="int16")
    assert len(want) == 16000
    np.testing.assert_array_equal(got, want)


def test_replay_keeps_headers_and_payloads_and_paces_in_realtime(tmp_path):
    from nodes.replay import Replay

    frames = [Frame(kind="embeds", session="a", turn=2, seq=i, last=i == 2, meta={"i": i},
                    stamps=[("old", 123)], data=np.full((3, 4), i, np.float32)) for i in range(3)]
    rec = tmp_path / "r.omnirec"
    write_recording(rec, [(1000 + 100 * i, f) for i, f in enumerate(frames)])   # 100 ms apart

    started = time.monotonic()
    out = run_node(Replay({"path": str(rec)})).on("frames")
    fast = time.monotonic() - started
    assert [(f.kind, f.session, f.turn, f.seq, f.last, f.meta) for f in out] == \
        [("embeds", "a", 2, i, i == 2, {"i": i}) for i in range(3)]
    for f, g in zip(out, frames):
        np.testing.assert_array_equal(f.data, g.data)
    assert all(f.stamps == [] for f in out)           # the recorded run's clock is not this one's

    started = time.monotonic()
    run_node(Replay({"path": str(rec), "realtime": True, "speed": 2.0}))
    paced = time.monotonic() - started
    assert 0.1 <= paced < 0.1 + 0.5 and fast < 0.1     # 200 ms of recording at speed 2


def test_a_cut_off_recording_replays_its_whole_frames(tmp_path, caplog):
    rec = tmp_path / "r.omnirec"
    write_recording(rec, [(i, Frame(kind="pcm", seq=i, meta={"rate": 16000},
                                    data=np.zeros(320, np.float32))) for i in range(3)])
    rec.write_bytes(rec.read_bytes()[:-100])          # the recording node was killed mid-write
    assert [f.seq for _, f in Recording(rec)] == [0, 1]
    assert "cut-off" in caplog.text


def test_bad_recordings_and_edges_are_clear_errors(tmp_path):
    from omniflow.graph import load_graph

    not_rec = tmp_path / "x.wav"
    not_rec.write_bytes(b"RIFF....WAVE")
    with pytest.raises(RecordingError, match="not an omniflow recording"):
        Recording(not_rec)
    with pytest.raises(FileNotFoundError, match="--record"):
        Recording(tmp_path / "missing.omnirec")

    graph = load_graph(REPO / "graphs" / "demo.yaml")
    with pytest.raises(RecordingError, match="src/audio->gain/audio"):   # lists the edges
        start_recordings(graph, {"gain/nope": tmp_path / "r.omnirec"})
    with pytest.raises(RecordingError, match="already recorded"):
        start_recordings(graph, {"gain/audio": tmp_path / "a.omnirec",          # output port
                                 "gain/audio->sink/audio": tmp_path / "b.omnirec"})  # same edge
    assert start_recordings(graph, {"sink/audio": tmp_path / "c.omnirec"}) == {  # input port
        "gain/audio->sink/audio": str(tmp_path / "c.omnirec")}
    done = omniflow("run", str(REPO / "graphs" / "demo.yaml"), "--record", "nowhere")
    assert done.returncode == 2 and "EDGE=FILE" in done.stderr
