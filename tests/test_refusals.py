"""Under --keys no tcp endpoint of a run is open to anyone: the client PCM source is a CURVE server
too, the gateway refuses to start exposed without API keys, and every refused peer (unknown key,
no CURVE, wrong server key) is counted and logged once."""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import zmq

from nodes.client import PcmClientSource
from omniflow.security import REFUSALS, Curve, generate_keys
from omniflow.transport import free_tcp_port


def keys(tmp_path, name: str) -> Curve:
    return Curve.load(generate_keys(tmp_path / name)[0].parent)


def pusher(address: str, own: Curve | None, server_public: str | None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.linger = 0
    if own is not None:
        sock.curve_secretkey, sock.curve_publickey = own.secret.encode(), own.public.encode()
        sock.curve_serverkey = server_public.encode()
    sock.connect(address)
    return sock


def pump(node, seconds: float) -> list:
    frames, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        frames += [f for _, f in node.step()]
    return frames


def test_keyed_pcm_source_takes_only_the_runs_clients_and_logs_each_refused_peer_once(tmp_path, caplog):
    run, intruder = keys(tmp_path, "run"), keys(tmp_path, "intruder")
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    node = PcmClientSource({"endpoint": address, "session": "s"})
    node.curve = run                                   # as the runtime does under --keys
    node.setup()
    before = dict(REFUSALS.by_reason)
    socks = []
    try:
        with caplog.at_level(logging.WARNING, logger="omniflow"):
            for own, server in ((None, None), (intruder, run.public), (run, intruder.public)):
                sock = pusher(address, own, server)    # no CURVE; unknown key; wrong server key
                sock.send(np.ones(160, "<i2").tobytes(), zmq.NOBLOCK) if sock.poll(0, zmq.POLLOUT) else None
                socks.append(sock)
            assert pump(node, 2.0) == [], "an intruder's audio got in"      # (they retry meanwhile)
            good = pusher(address, run, run.public)
            socks.append(good)
            good.send(np.arange(160, dtype="<i2").tobytes())
            frames = []
            deadline = time.monotonic() + 5
            while not frames and time.monotonic() < deadline:
                frames = pump(node, 0.1)
        assert len(frames) == 1 and np.array_equal(frames[0].data, np.arange(160, dtype=np.int16))
        counted = {k: REFUSALS.by_reason.get(k, 0) - before.get(k, 0) for k in REFUSALS.WHY}
        assert counted["no_curve"] >= 1 and counted["wrong_server_key"] >= 1 and counted["unknown_key"] >= 1
        logged = [r.getMessage() for r in caplog.records if "refused a peer" in r.getMessage()]
        for reason in ("no_curve", "wrong_server_key", "unknown_key"):
            assert sum(f"({reason})" in line for line in logged) == 1, (reason, logged)   # once, retries counted
        assert any(intruder.public in line for line in logged)           # the unknown key is named
    finally:
        for sock in socks:
            sock.close(linger=0)
        node.teardown()


def test_keyed_run_refuses_an_exposed_gateway_without_api_keys(tmp_path):
    pytest.importorskip("websockets")
    from nodes.gateway import Gateway
    from omniflow.apikeys import KeyFile

    run = keys(tmp_path, "run")
    exposed = Gateway({"host": "0.0.0.0", "port": 0})
    exposed.curve = run
    with pytest.raises(ValueError, match="api_keys"):
        exposed.setup()
    api = KeyFile(tmp_path / "api.json")
    api.create("a")
    for params in ({"host": "127.0.0.1"}, {"host": "0.0.0.0", "api_keys": str(api.path)}):
        node = Gateway({"port": 0, **params})
        node.curve = run
        node.setup()
        node.teardown()


def test_the_runtime_hands_the_node_the_runs_keys(tmp_path):
    from omniflow.node import Node
    from omniflow.runtime import NodeRuntime
    from omniflow.transport import Wiring

    seen = []

    class Probe(Node):
        def setup(self):
            seen.append(self.curve)

    run = keys(tmp_path, "run")
    NodeRuntime(Probe(), Wiring(inputs=[], outputs=[]), curve=run).run()
    assert seen == [run]


def test_keyed_control_bus_on_tcp_counts_a_plain_subscriber(tmp_path):
    from omniflow.launch.bus import ControlBus

    run = keys(tmp_path, "run")
    ctx = zmq.Context()
    pub, inbox = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    bus = ControlBus(ctx, pub, inbox, run)
    before = REFUSALS.by_reason.get("no_curve", 0)
    spy = ctx.socket(zmq.SUB)
    spy.setsockopt(zmq.SUBSCRIBE, b"")
    spy.connect(pub)                                  # no CURVE: refused, counted
    try:
        poller = zmq.Poller()
        bus.register(poller)
        deadline = time.monotonic() + 5
        while REFUSALS.by_reason.get("no_curve", 0) == before and time.monotonic() < deadline:
            bus.handle(dict(poller.poll(50)))
        assert REFUSALS.by_reason.get("no_curve", 0) > before
        assert bus.health()["bus"]["refused"] >= 1
        assert spy.poll(100) == 0                     # and it heard nothing
    finally:
        spy.close(0)
        bus.close()
        ctx.term()
