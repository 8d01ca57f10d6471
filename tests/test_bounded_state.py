"""Bounded state: clients that connect, speak 1.5 s and vanish without a flush, over and over,
leave nothing behind in any node of graphs/serve.yaml (the bus's end of each session frees every
per-session map), and the process's memory stays flat."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("websockets")

from test_gateway import QUESTION, connect_when_up, free_port, ws_client  # noqa: E402
from test_serve_turns import serve_graph  # noqa: E402

PARALLEL = 8                 # clients at once
SPEECH_S = 1.5


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def cycles(port: int, n: int, speech) -> None:
    async def one(k: int) -> None:
        async with await connect_when_up(f"ws://127.0.0.1:{port}/?session=v{k}", 120) as ws:
            await ws.recv()                                          # the greeting
            for i in range(0, len(speech), 1600):                  # 100 ms at a time, as it is spoken
                await ws.send(speech[i:i + 1600].tobytes())
                await asyncio.sleep(0.1)
            await ws.ping()                                          # (the server has read it all)
        # gone: no flush, no goodbye

    async def lane(start: int) -> None:
        for k in range(start, n, PARALLEL):
            await one(k)
    await asyncio.gather(*(lane(i) for i in range(PARALLEL)))


def held_sessions(launcher) -> dict[str, int]:
    """Per node: how many sessions its turn gate and its own per-session maps still hold."""
    out = {}
    for name, worker in launcher.workers.items():
        node, gate = worker.runtime.node, worker.runtime._gate
        maps = [gate.current, gate.asked]
        for attr in ("streams", "count", "held", "heard", "sessions", "live", "turns", "states",
                     "early", "finished"):
            value = getattr(node, attr, None)
            if isinstance(value, dict):
                maps.append(value)
        if hasattr(node, "detok") and node.detok is not None:
            maps.append(node.detok.streams)
        out[name] = sum(len(m) for m in maps)
    return out


def held_names(launcher) -> dict:
    """What is held, by node and map (for a failure message)."""
    out = {}
    for name in ("gateway", "vad", "backbone"):
        runtime = launcher.workers[name].runtime
        node = runtime.node
        out[name] = {"gate": dict(runtime._gate.current), "asked": dict(runtime._gate.asked),
                     **{a: list(getattr(node, a)) for a in ("sessions", "streams", "held", "live")
                        if isinstance(getattr(node, a, None), dict)}}
    return out


def wait_ready(port: int, timeout_s: float = 120) -> None:
    """Until the gateway's /healthz says every node of the graph is up."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError("the graph never became ready")


def run_cycles(tmp_path, n: int, check_rss: bool) -> None:
    import threading

    from omniflow.launch.local import LocalLauncher

    port = free_port()
    graph = serve_graph(tmp_path, port)
    graph.nodes["gateway"].params["idle_timeout_s"] = None
    launcher = LocalLauncher(graph, in_process=True)
    runner = threading.Thread(target=launcher.run, daemon=True)
    runner.start()
    speech = ws_client().read_question(str(QUESTION))[: int(SPEECH_S * 16000)]
    try:
        wait_ready(port)               # steady state: sessions that come and go while serving
        asyncio.run(cycles(port, 2 * PARALLEL, speech))                # warm-up
        time.sleep(1.0)
        before = rss_bytes()
        asyncio.run(cycles(port, n, speech))
        deadline = time.monotonic() + 120
        while any(held_sessions(launcher).values()) and time.monotonic() < deadline:
            time.sleep(0.2)                                            # the ends are on their way
        after = rss_bytes()
        held = held_sessions(launcher)
        print(f"\n{n} connect/speak {SPEECH_S} s/vanish cycles: RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB; "
              f"sessions held per node {held}")
        assert not any(held.values()), (held, held_names(launcher))
        if check_rss:
            assert after <= 1.10 * before, (before, after)
    finally:
        launcher.stop("the test is over")
        runner.join(30)


def test_sessions_that_vanish_mid_speech_leave_nothing_behind(demo_home, tmp_path):
    run_cycles(tmp_path, 48, check_rss=False)


@pytest.mark.slow          # ~5 min: 8 clients at a time speak in real time, 1,000 cycles (issue 9)
def test_a_thousand_vanishing_sessions_keep_memory_flat(demo_home, tmp_path):
    run_cycles(tmp_path, 1000, check_rss=True)
