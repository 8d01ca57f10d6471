"""nodes.text: prompts in; streamed token ids detokenized; print / file / JSON-lines out."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nodes.text import Detokenizer, TextSink, TextSource
from omniflow.model import weights
from omniflow.frame import Frame
from omniflow.model.tokenizer import Tokenizer
from omniflow.model.tokens import EOT, PAD_A, PAD_T
from omniflow.node import CONTROL
from omniflow.testing import run_node

ANSWER = "Paris is the capital of France, café included."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    weights.write_demo_tokenizer(root)
    return root


def token_frames(ids: list[int], session="s", turn=0, end_frame=True) -> list[Frame]:
    """What the backbone sends: one (8,) step per frame (7 audio ids, then the text id)."""
    frames = [Frame(kind="tokens", session=session, turn=turn, seq=i,
                    data=np.array([PAD_A] * 7 + [t], dtype=np.int64), meta={"step": i})
              for i, t in enumerate(ids)]
    if end_frame:
        frames.append(Frame(kind="tokens", session=session, turn=turn, seq=len(ids), last=True))
    return frames


def answer_ids(ckpt) -> list[int]:
    return Tokenizer.from_dir(ckpt).encode(ANSWER) + [EOT, PAD_T, PAD_T, 151700]


def test_text_source_one_session_per_line():
    out = run_node(TextSource({"text": "Hello there.\n\nWhat time is it?\n"}))
    assert [(f.session, f.turn, f.meta["text"], f.last) for f in out.on("text")] == [
        ("default-0", 0, "Hello there.", True), ("default-1", 0, "What time is it?", True)]


def test_text_source_turns_of_one_session_from_a_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first\nsecond\n", encoding="utf-8")
    out = run_node(TextSource({"path": str(path), "per_line": "turn", "session": "chat"}))
    # each line asks the bus for the next turn; its prompt goes out with the granted number
    assert [(p, f.kind, f.meta.get("op"), f.turn) for p, f in out] == [
        (CONTROL, "control", "next_turn", 0), ("text", "text", None, 0),
        (CONTROL, "control", "next_turn", 0), ("text", "text", None, 1)]
    assert [(a.session, a.turn, a.meta["op"]) for a in out.announced] == [("chat", 0, "turn"), ("chat", 1, "turn")]
    assert out.on("text")[1].meta["text"] == "second"


def test_text_source_explains_bad_params(tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        TextSource().setup()
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        TextSource({"path": str(tmp_path / "missing.txt")}).setup()


def test_detokenizer_streams_the_text_stream(ckpt):
    ids = answer_ids(ckpt)
    out = run_node(Detokenizer({"checkpoint": str(ckpt)}), token_frames(ids))
    pieces = [f.meta["text"] for f in out.on("text")]
    assert "".join(pieces) == ANSWER                      # cut at _eot, specials dropped
    assert all("\ufffd" not in p for p in pieces)         # "é" is two byte tokens: never split
    assert len(pieces) > 5 and out.on("text")[-1].last


def test_sink_prints_streamed_tokens(ckpt, capsys):
    run_node(TextSink({"checkpoint": str(ckpt)}), token_frames(answer_ids(ckpt)), port="tokens")
    assert capsys.readouterr().out == ANSWER + "\n"


def test_sink_file_gets_one_line_per_turn(tmp_path):
    frames = [Frame(kind="text", session="a", meta={"text": "Hello "}),
              Frame(kind="text", session="a", meta={"text": "world."}, last=True),
              Frame(kind="text", session="b", meta={"text": "Other."}, last=True)]
    run_node(TextSink({"path": str(tmp_path / "{session}.txt")}), frames, port="text")     # mode inferred
    assert (tmp_path / "a.txt").read_text() == "Hello world.\n"
    assert (tmp_path / "b.txt").read_text() == "Other.\n"


def test_sink_jsonl_has_timestamped_pieces_and_marks_barge_in(tmp_path):
    path = tmp_path / "log.jsonl"
    frames = [Frame(kind="text", session="a", turn=0, meta={"text": "The answer"}),
              Frame(kind="control", session="a", turn=1, meta={"op": "turn"}),     # user barged in
              Frame(kind="text", session="a", turn=0, meta={"text": " is late"}),  # old turn: dropped
              Frame(kind="text", session="a", turn=1, meta={"text": "New."}, last=True)]
    run_node(TextSink({"path": str(path)}), frames, port="text")                           # mode inferred
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r.get("turn"), r["text"] if "text" in r else None, r.get("interrupted", False)) for r in records] == [
        (0, "The answer", False), (None, "The answer", True), (1, "New.", False), (1, "New.", False)]
    assert all(isinstance(r["time"], float) for r in records)


def test_sink_needs_a_path_for_files():
    with pytest.raises(ValueError, match="needs params.path"):
        TextSink({"mode": "jsonl"}).setup()
