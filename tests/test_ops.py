"""/healthz and /metrics (nodes/ops.py) and the control bus's health frames, without a model.
(tests/test_realtime.py reads both from a running graphs/serve.yaml.)"""
from __future__ import annotations

import collections
import json

import pytest
import zmq

from nodes import ops as ops_module
from nodes.ops import Ops


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(ops_module.time, "monotonic", c)
    return c


def health(**nodes):
    return {"op": "health", "ready": True,
            "nodes": {name: {"up": up, "age_s": 0.5, "restarts": 0, "metrics": {}, "stats": {}}
                      for name, up in nodes.items()}}


def test_healthz_needs_a_fresh_health_frame_a_ready_graph_and_every_node_up(clock):
    o = Ops(lambda: 2, collections.Counter())
    status, _, body = o.healthz()
    assert status == 503 and "no health" in json.loads(body)["error"]
    o.run_status(health(vad=True, backbone=True))
    status, _, body = o.healthz()
    assert status == 200 and json.loads(body) == {
        "ok": True, "ready": True, "sessions": 2,
        "nodes": {"vad": {"up": True, "age_s": 0.5, "restarts": 0}, "backbone": {"up": True, "age_s": 0.5, "restarts": 0}}}
    o.run_status(health(vad=True, backbone=False))
    assert o.healthz()[0] == 503
    o.run_status({**health(vad=True), "ready": False})
    assert o.healthz()[0] == 503
    o.run_status(health(vad=True))
    clock.now += ops_module.HEALTH_FRESH_S + 1                # the bus went quiet
    assert o.healthz()[0] == 503 and "old" in json.loads(o.healthz()[2])["error"]


def samples(o: Ops) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    status, _, text = o.metrics()
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_first_audio_and_stalls_of_a_real_time_listener(clock):
    pytest.importorskip("prometheus_client")
    o = Ops(lambda: 1, collections.Counter(no_key=2))
    o.turn_asked("a")
    clock.now += 1.5
    o.audio_sent("a", 0, 0.5)        # first audio 1.5 s after the question; plays until +0.5
    clock.now += 0.3
    o.audio_sent("a", 0, 0.5)        # in time: queued behind the first (plays until +1.0)
    clock.now += 1.2                 # 0.5 s after the listener ran out
    o.audio_sent("a", 0, 0.5)
    o.turn_ended("a")
    o.audio_sent("a", 1, 0.5)        # a new turn: no stall, and no first-audio without a question
    m = samples(o)
    assert m[("omniflow_first_audio_seconds_count", ())] == 1
    assert m[("omniflow_first_audio_seconds_sum", ())] == pytest.approx(1.5)
    assert m[("omniflow_playback_stalls_total", ())] == 1
    assert m[("omniflow_playback_stall_seconds_total", ())] == pytest.approx(0.5)
    assert m[("omniflow_turns_total", ())] == 1
    assert m[("omniflow_refused_clients_total", (("reason", "no_key"),))] == 2
    o.run_status({"op": "health", "ready": True, "nodes": {"backbone": {
        "up": True, "age_s": 0.1, "restarts": 2, "metrics": {"frames_in": 7, "refused": 3},
        "stats": {"decode_steps": 10, "decode_seconds": 0.9}}}})
    m = samples(o)
    assert m[("omniflow_node_restarts_total", (("node", "backbone"),))] == 2
    assert m[("omniflow_refused_peers_total", (("node", "backbone"),))] == 3
    assert m[("omniflow_decode_steps_total", (("node", "backbone"),))] == 10
    assert m[("omniflow_decode_seconds_total", (("node", "backbone"),))] == pytest.approx(0.9)


def test_bus_health_lists_every_node_with_its_last_heartbeat_and_restarts(tmp_path):
    from omniflow.frame import Frame, decode, encode
    from omniflow.launch.bus import ControlBus

    ctx = zmq.Context()
    bus = ControlBus(ctx, f"ipc://{tmp_path}/pub", f"ipc://{tmp_path}/in", nodes=["a", "b"],
                     restarts=lambda: {"b": 1})
    push, sub = ctx.socket(zmq.PUSH), ctx.socket(zmq.SUB)
    push.connect(f"ipc://{tmp_path}/in")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{tmp_path}/pub")
    try:
        push.send_multipart(encode(Frame(kind="control", meta={"op": "heartbeat", "node": "a",
                                                               "metrics": {"frames_in": 4}, "stats": {"x": 1.0}})))
        poller = zmq.Poller()
        bus.register(poller)
        seen = None
        for _ in range(100):
            bus._next_health = 0.0                   # publish on every pass
            bus.handle(dict(poller.poll(20)))
            while sub.poll(0):
                frame = decode(sub.recv_multipart())
                if frame.meta.get("op") == "health" and frame.meta["nodes"]["a"]["up"]:
                    seen = frame.meta
            if seen:
                break
        assert seen is not None, "no health frame with node a up"
        assert seen["nodes"]["a"]["metrics"] == {"frames_in": 4} and seen["nodes"]["a"]["stats"] == {"x": 1.0}
        assert seen["nodes"]["b"] == {"up": False, "age_s": None, "restarts": 1, "metrics": {}, "stats": {}}
        assert seen["ready"] is False                 # b never finished setup
    finally:
        push.close(0)
        sub.close(0)
        bus.close()
        ctx.term()
