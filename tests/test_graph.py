"""Graph files: every error names the file, the line and the fix, and all errors come at once."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from omniflow import cli
from omniflow.graph import GraphError, load_graph, parse_graph

SRC = 'use: "nodes.audio:FileSource"'


def errors_of(text: str, overrides=()) -> list[str]:
    with pytest.raises(GraphError) as e:
        parse_graph(textwrap.dedent(text), "g.yaml", list(overrides))
    return e.value.errors


def test_demo_graph_loads_with_typed_params_and_edges():
    g = load_graph("graphs/demo.yaml")
    assert list(g.nodes) == ["src", "gain", "sink"]
    assert g.nodes["src"].params == {"path": "examples/hello.wav", "rate": 16000, "chunk_ms": 20.0,
                                     "realtime": False, "session": "default"}
    assert [e.id for e in g.edges] == ["src/audio->gain/audio", "gain/audio->sink/audio"]
    assert g.nodes["gain"].restart == "on-failure"


def test_set_overrides_params_with_yaml_typed_values():
    g = load_graph("graphs/demo.yaml", ["gain.db=3", "src.path=other.wav", "src.realtime=true"])
    assert g.nodes["gain"].params == {"db": 3.0}
    assert g.nodes["src"].params["path"] == "other.wav" and g.nodes["src"].params["realtime"] is True


def test_edge_options_fan_in_and_policy():
    g = parse_graph(textwrap.dedent(f"""
        nodes:
          a: {{{SRC}, params: {{path: x}}}}
          b: {{{SRC}, params: {{path: y}}}}
          rec:
            use: "test_runtime_nodes:Recorder"
            params: {{path: out}}
            inputs:
              in: [a/audio, {{from: b/audio, policy: drop-oldest, depth: 4}}]
    """))
    (ea, eb) = g.edges
    assert (ea.src, ea.policy, ea.depth) == ("a", "lossless", 64)
    assert (eb.src, eb.policy, eb.depth, eb.kind) == ("b", "drop-oldest", 4, "pcm")


def test_port_that_does_not_exist_names_line_and_fix():
    errs = errors_of(f"""
        nodes:
          mic: {{{SRC}, params: {{path: x}}}}
          gain:
            use: nodes.dsp:Gain
            inputs: {{audio: mic/pcm}}
    """)
    assert errs == ["g.yaml:6: node 'gain' input 'audio' comes from 'mic/pcm', but node 'mic' has no "
                    "output 'pcm' (outputs: audio). Fix: use one of mic/audio"]


def test_unknown_input_port_missing_node_and_bad_source():
    errs = errors_of(f"""
        nodes:
          src: {{{SRC}, params: {{path: x}}}}
          gain:
            use: nodes.dsp:Gain
            inputs: {{audoi: src/audio}}
          gain2:
            use: nodes.dsp:Gain
            inputs: {{audio: micc/audio}}
          gain3:
            use: nodes.dsp:Gain
            inputs: {{audio: src}}
    """)
    assert errs[0] == "g.yaml:6: node 'gain' has no input 'audoi' (inputs: audio). Fix: use 'audio'"
    assert errs[1].startswith("g.yaml:9: node 'gain2' input 'audio' comes from 'micc/audio', but "
                              "there is no node 'micc'. Fix: use one of gain, gain2, gain3, src, or add node 'micc'")
    assert errs[2].startswith("g.yaml:12: node 'gain3' input 'audio' comes from 'src', which is not "
                              "'node/port'. Fix:")
    assert len(errs) == 3                                  # all errors, not only the first


def test_unknown_keys_at_every_level():
    errs = errors_of(f"""
        nodez: {{}}
        nodes:
          src: {{{SRC}, params: {{path: x}}, restrat: never}}
          gain:
            use: nodes.dsp:Gain
            inputs: {{audio: {{from: src/audio, polcy: lossless}}}}
    """)
    assert "g.yaml:2: unknown key 'nodez' in the graph file. Fix: use 'nodes'" in errs[0]
    assert errs[1].startswith("g.yaml:4: unknown key 'restrat' in node 'src'. Fix: use 'restart'")
    assert errs[2].startswith("g.yaml:7: unknown key 'polcy' in input 'gain/audio'. Fix: use 'policy'")


def test_unknown_missing_and_mistyped_params():
    errs = errors_of("""
        nodes:
          src:
            use: nodes.audio:FileSource
            params:
              path: in.wav
              rate: fast
          gain:
            use: nodes.dsp:Gain
            params: {dB: 3}
          sink:
            use: nodes.audio:WavSink
            params: {}
    """)
    assert errs[0].startswith("g.yaml:7: node 'src': param 'rate': Expected `int`, got `str`. "
                              "Fix: give 'rate' int (params: path: str, rate: int")
    assert errs[1] == "g.yaml:10: node 'gain': Gain has no param 'dB'. Fix: use 'db' (params: db: float)"
    assert errs[2].startswith("g.yaml:13: node 'sink': WavSink needs param 'path'. Fix: add 'path: ...'")


def test_bad_use_and_restart_policy():
    errs = errors_of("""
        nodes:
          a: {use: nodes.nothere:Thing}
          b: {use: nodes.dsp:Gainn}
          c: {use: nodes.dsp, restart: sometimes}
          d: {params: {}}
          e/f: {use: nodes.dsp:Gain}
    """)
    assert errs[0].startswith("g.yaml:3: node 'a': cannot import 'nodes.nothere:Thing'")
    assert errs[1] == "g.yaml:4: node 'b': module 'nodes.dsp' has no 'Gainn'. Fix: check the class name"
    assert errs[2].startswith("g.yaml:5: 'use: nodes.dsp' must look like 'package.module:ClassName'")
    assert errs[3].startswith("g.yaml:5: node 'c': unknown restart policy 'sometimes'. Fix: use one "
                              "of never, on-failure, always")
    assert errs[4] == "g.yaml:6: node 'd' has no 'use:'. Fix: add 'use: package.module:ClassName'"
    assert errs[5].startswith("g.yaml:7: node name 'e/f' is not a plain name. Fix: use letters")


def test_mismatched_frame_kinds():
    errs = errors_of(f"""
        nodes:
          src: {{{SRC}, params: {{path: x}}}}
          vad:
            use: test_graph:TextSink
            inputs: {{text: src/audio}}
    """)
    assert errs == ["g.yaml:6: node 'vad' input 'text' expects 'text' frames, but 'src/audio' "
                    "produces 'pcm'. Fix: connect an output that produces 'text', or put a "
                    "converter between"]


def test_cycles_are_errors_unless_marked_feedback():
    loop = """
        nodes:
          a: {use: test_runtime_nodes:Relay, inputs: {in: c/out}}
          b: {use: test_runtime_nodes:Relay, inputs: {in: a/out}}
          c: {use: test_runtime_nodes:Relay, inputs: {in: b/out}}
    """
    errs = errors_of(loop)
    assert len(errs) == 1 and errs[0].startswith("g.yaml:3: loop a -> b -> c -> a")
    assert "Fix: if the loop is intended, mark one of its edges 'feedback: true'" in errs[0]
    g = parse_graph(textwrap.dedent(loop.replace("in: c/out", "in: {from: c/out, feedback: true}")))
    assert [e.feedback for e in g.edges] == [True, False, False]


def test_bad_edge_options_and_overrides():
    errs = errors_of(f"""
        nodes:
          src: {{{SRC}, params: {{path: x}}}}
          gain: {{use: nodes.dsp:Gain, inputs: {{audio: {{from: src/audio, policy: newest, depth: 0}}}}}}
    """, overrides=["gian.db=3", "gain"])
    assert errs[0] == "--set gian.db=3: no node 'gian'. Fix: use 'gain'"
    assert errs[1].startswith("--set gain: expected node.param=value")
    assert errs[2].startswith("g.yaml:4: input 'gain/audio': unknown policy 'newest'. Fix: use one of "
                              "lossless, drop-oldest")
    assert errs[3].startswith("g.yaml:4: input 'gain/audio': depth must be a positive integer, got 0")


def test_not_yaml_and_missing_file(tmp_path):
    assert errors_of("nodes:\n  a: [1, 2\n")[0].startswith("g.yaml:3: not valid YAML")
    with pytest.raises(GraphError, match="cannot read graph file"):
        load_graph(tmp_path / "nope.yaml")


def test_cli_validate_and_graph(capsys, tmp_path):
    assert cli.main(["validate", "graphs/demo.yaml"]) == 0
    assert "graphs/demo.yaml: ok (3 nodes, 2 edges)" in capsys.readouterr().out
    assert cli.main(["graph", "graphs/demo.yaml"]) == 0
    mermaid = capsys.readouterr().out
    assert mermaid.startswith("flowchart LR") and 'src -->|"audio (pcm)"| gain' in mermaid
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  g: {use: nodes.dsp:Gain, params: {gain: 2}}\n")
    assert cli.main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: node 'g': Gain has no param 'gain'" in err and "1 problem(s)" in err


# a node with a "text" input, for the kind-mismatch test
from omniflow import Node  # noqa: E402


class TextSink(Node):
    inputs = {"text": "text"}


def test_threads_is_a_whole_number_of_at_least_one():
    graph = parse_graph(f"""
nodes:
  mic: {{{SRC}, params: {{path: x}}, threads: 2}}
""")
    assert graph.nodes["mic"].threads == 2
    for bad in ("0", "1.5", "two", "true"):
        errs = errors_of(f"""
            nodes:
              mic: {{{SRC}, params: {{path: x}}, threads: {bad}}}
        """)
        assert len(errs) == 1 and "threads must be a whole number >= 1" in errs[0], errs
        assert "Fix: write e.g. 'threads: 1'" in errs[0]


def test_validate_reports_every_bad_value_with_its_line_and_what_is_allowed():
    errs = errors_of("""
        nodes:
          vad:
            use: nodes.vad:SileroVAD
            params:
              threshold: 1.5
              min_silence_ms: -3
          whisper:
            use: nodes.whisper:WhisperEncoder
            params: {runtime: onnx, dtype: bfloat16}
            inputs: {audio: vad/utterance}
          backbone:
            use: nodes.backbone:Backbone
            params:
              task: T1A2
              dtype: bf16
              top_p: 0
              device: gpu
    """)
    assert len(errs) == 7, errs
    assert errs[0].startswith("g.yaml:6: node 'vad': param 'threshold': Expected `float` < 1.0. "
                              "Fix: give 'threshold' float in (0, 1)")
    assert errs[1].startswith("g.yaml:7: node 'vad': param 'min_silence_ms': Expected `float` >= 0.0")
    # a combination the whisper node cannot run is refused when the graph loads, not at run time
    assert errs[2].startswith("g.yaml:10: node 'whisper': WhisperEncoder params: whisper runtime: onnx "
                              "exports a float32 graph")
    assert errs[3].startswith("g.yaml:15: node 'backbone': param 'task': Invalid enum value 'T1A2'. "
                              "Fix: give 'task' 'A1A2' | 'A1A2_SINGLE' | 'A1T2' | 'ASR'")
    assert errs[4].startswith("g.yaml:16: node 'backbone': param 'dtype': Invalid enum value 'bf16'. "
                              "Fix: give 'dtype' 'auto' | 'float32' | 'bfloat16' | 'float16'")
    assert any("g.yaml:17: node 'backbone': param 'top_p'" in e and "float in (0, 1]" in e for e in errs[5:])
    assert any("g.yaml:18: node 'backbone': param 'device'" in e and "cpu | cuda | cuda:N | mps" in e
               for e in errs[5:])


def test_a_graph_with_a_server_restarts_its_nodes_by_default():
    from omniflow.graph import load_graph

    served = load_graph(Path(__file__).resolve().parent.parent / "graphs" / "serve.yaml")
    assert {spec.restart for spec in served.nodes.values()} == {"on-failure"}
    batch = load_graph(Path(__file__).resolve().parent.parent / "graphs" / "speech_to_speech.yaml")
    assert {spec.restart for spec in batch.nodes.values()} == {"never"}
