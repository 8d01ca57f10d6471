"""The CPU plan: threads per node that add up to the machine (omniflow.launch.plan)."""
from __future__ import annotations

from omniflow.graph import load_graph, parse_graph
from omniflow.launch.plan import cpu_plan

HEAVY = {"whisper", "backbone", "vocoder"}


def test_serve_graph_on_two_cores_gives_whisper_both_and_the_decode_nodes_one_each_without_a_warning():
    plan = cpu_plan(load_graph("graphs/serve.yaml"), cores=2)
    assert set(plan.heavy) == HEAVY
    assert plan.threads == {name: 2 if name == "whisper" else 1 for name in plan.threads}
    assert plan.warnings == []          # whisper's bursts do not count against the decode nodes


def test_heavy_nodes_share_a_big_machine_by_weight_and_light_ones_keep_one():
    plan = cpu_plan(load_graph("graphs/serve.yaml"), cores=16)
    assert plan.threads["backbone"] == 10 and plan.threads["vocoder"] == 5 and plan.threads["whisper"] == 16
    assert all(plan.threads[n] == 1 for n in plan.threads if n not in HEAVY)
    assert plan.threads["backbone"] + plan.threads["vocoder"] <= 16 and plan.warnings == []


def test_explicit_threads_are_kept_and_the_rest_share_what_is_left():
    graph = load_graph("graphs/serve.yaml")
    graph.nodes["backbone"].threads = 10
    plan = cpu_plan(graph, cores=16)
    assert plan.threads["backbone"] == 10
    assert plan.threads["vocoder"] == 6 and plan.threads["whisper"] == 16   # what is left; the burst: all
    assert plan.warnings == []


def test_an_oversubscribed_graph_is_warned_about_with_a_fix():
    graph = load_graph("graphs/serve.yaml")
    for name in HEAVY:
        graph.nodes[name].threads = 2
    plan = cpu_plan(graph, cores=2)
    (warning,) = plan.warnings
    assert "6 math threads on 2 cores" in warning and "Fix:" in warning


def test_only_the_nodes_run_here_count():
    graph = load_graph("graphs/serve.yaml")
    plan = cpu_plan(graph, cores=4, nodes=["backbone", "scheduler"])
    assert plan.threads == {"backbone": 4, "scheduler": 1}


def test_a_light_node_given_many_threads_counts_against_the_cores():
    graph = parse_graph("""
nodes:
  a: {use: "nodes.dsp:Gain", threads: 3}
  b: {use: "nodes.dsp:Gain", threads: 1, inputs: {audio: a/audio}}
""")
    plan = cpu_plan(graph, cores=2)
    assert plan.threads == {"a": 3, "b": 1} and len(plan.warnings) == 1


def test_set_node_threads_on_the_command_line():
    from omniflow.graph import GraphError
    graph = load_graph("graphs/serve.yaml", ["backbone.threads=2"])
    assert graph.nodes["backbone"].threads == 2 and "threads" not in graph.nodes["backbone"].params
    try:
        load_graph("graphs/serve.yaml", ["backbone.threads=0"])
    except GraphError as e:
        assert "threads must be a whole number >= 1" in str(e)
    else:
        raise AssertionError("threads=0 was accepted")
