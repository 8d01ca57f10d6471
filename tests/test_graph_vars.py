"""Graph variables (`vars:` + `${name}` + `--set name=value`) and `use:` modules next to the graph."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from omniflow.graph import GraphError, load_graph, parse_graph

REPO = Path(__file__).resolve().parent.parent

GRAPH = """
vars:
  db: -6
  name: out
nodes:
  src: {use: nodes.audio:FileSource, params: {path: "${name}/in.wav"}}
  a: {use: nodes.dsp:Gain, params: {db: "${db}"}, inputs: {audio: src/audio}}
  b: {use: nodes.dsp:Gain, params: {db: "${db}"}, inputs: {audio: a/audio}}
"""


def test_a_variable_sets_every_node_that_reads_it_and_keeps_its_type():
    g = parse_graph(GRAPH)
    assert g.nodes["a"].params["db"] == g.nodes["b"].params["db"] == -6.0
    assert g.nodes["src"].params["path"] == "out/in.wav"                   # inside a longer string
    g = parse_graph(GRAPH, overrides=["db=-12", "name=runs"])
    assert g.nodes["a"].params["db"] == g.nodes["b"].params["db"] == -12.0
    assert g.nodes["src"].params["path"] == "runs/in.wav"
    g = parse_graph(GRAPH, overrides=["db=-12", "b.db=3"])                           # one node's --set wins
    assert (g.nodes["a"].params["db"], g.nodes["b"].params["db"]) == (-12.0, 3.0)


def test_unknown_variables_are_errors_that_name_the_fix():
    with pytest.raises(GraphError) as err:
        parse_graph(GRAPH, overrides=["gain=1"])
    assert "no variable 'gain'" in str(err.value) and "db, name" in str(err.value)
    with pytest.raises(GraphError) as err:
        parse_graph(GRAPH.replace('"${db}"}, inputs: {audio: a/audio}', '"${level}"}, inputs: {audio: a/audio}'))
    assert "${level}" in str(err.value) and "vars:" in str(err.value)


def test_the_shipped_speech_graph_takes_one_checkpoint_for_every_miniomni_node():
    g = load_graph(REPO / "graphs" / "speech_to_speech.yaml", ["checkpoint=runs/final"])
    users = {n for n, s in g.nodes.items() if s.params.get("checkpoint") == "runs/final"}
    assert users == {"adapter", "backbone", "text"}
    assert g.nodes["whisper"].params["checkpoint"] == "small"              # whisper's own weights


NODE = '''
import msgspec
from omniflow import Node

class Upper(Node):
    inputs = {"text": "text"}
    outputs = {"text": "text"}

    class Params(msgspec.Struct):
        pass

    def process(self, port, frame):
        yield "text", frame.follow("text", meta={"text": frame.meta["text"].upper()})
'''


def test_a_node_class_next_to_the_graph_runs_without_pythonpath(tmp_path):
    (tmp_path / "shout.py").write_text(NODE)
    out = tmp_path / "answer.txt"
    (tmp_path / "g.yaml").write_text(textwrap.dedent(f"""
        nodes:
          prompt: {{use: nodes.text:TextSource, params: {{text: "hello"}}}}
          shout: {{use: shout:Upper, inputs: {{text: prompt/text}}}}
          sink: {{use: nodes.text:TextSink, params: {{path: {str(out)!r}}}, inputs: {{text: shout/text}}}}
        """))
    env = {"PATH": "/usr/bin:/bin", "OMNIFLOW_HOME": str(tmp_path / "home")}      # no PYTHONPATH
    for cmd in (["validate"], ["run"]):
        done = subprocess.run([sys.executable, "-m", "omniflow.cli", *cmd, str(tmp_path / "g.yaml")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "HELLO" in out.read_text()
