"""Transport benchmark: what one omniflow edge costs, against the raw pyzmq floor.

    omniflow bench transport [--quick] [--sizes 640,4096,65536,1048576]

For each payload size it measures
  * floor:   raw pyzmq ping-pong between two processes, the same two-part message, no framework
  * hop:     a driver sends a Frame to a Relay node hosted by the real runtime, which sends it back;
             one-way latency = round trip / 2 (each way is a full hop: encode, send, poll, recv,
             decode, call the node). In one process (threads, inproc://) and across processes
             (ipc:// and tcp://127.0.0.1).
  * chain:   driver -> 6 Relay nodes -> driver (7 socket hops), end to end, against calling the
             same six nodes directly in one process.
Latency: p50/p99 over ping-pongs. Throughput: frames/s while a sender thread streams frames
through and the driver receives them (lossless edges, so backpressure paces the sender).
Every row is the median of `--repeat` interleaved runs.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import zmq

from omniflow import Frame, Node
from omniflow.frame import decode, encode
from omniflow.runtime import NodeConfig, NodeRuntime
from omniflow.transport import COPY_BELOW_BYTES, Link, Wiring, free_tcp_port

SIZES = [640, 4 * 1024, 64 * 1024, 1024 * 1024]      # payload bytes
CHAIN = 6                                            # relay nodes in the chain


class Relay(Node):
    inputs = {"in": "any"}
    outputs = {"out": "any"}

    def process(self, port, frame):
        yield "out", frame


def iterations(size: int, quick: bool) -> tuple[int, int]:
    """(ping-pongs for latency, frames for throughput): fewer for big payloads."""
    lat, thr = (2000, 5000) if size <= 4096 else (500, 2000) if size <= 65536 else (100, 300)
    return (lat // 5, thr // 5) if quick else (lat, thr)


def percentiles(ns: list[int]) -> tuple[float, float]:
    us = np.array(ns) / 1e3
    return float(np.percentile(us, 50)), float(np.percentile(us, 99))


# --- the floor: raw pyzmq between two processes ----------------------------------------------

def _raw_echo(addr_in: str, addr_out: str, n: int) -> None:
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(addr_in)
    push.connect(addr_out)
    for _ in range(n):
        push.send_multipart(pull.recv_multipart(copy=False), copy=False)
    push.close(linger=5000)
    pull.close()
    ctx.term()


class Driver:
    """The benchmark's end of a path: PUSH into the path's first hop, PULL from its last."""

    def __init__(self, ctx: zmq.Context, addr_in: str, addr_out: str, framed: bool):
        self.push, self.pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        if framed:                             # the driver stands for an upstream omniflow node
            self.push.copy_threshold = COPY_BELOW_BYTES
        self.push.bind(addr_in)
        self.pull.bind(addr_out) if not framed else self.pull.connect(addr_out)
        self.framed = framed

    def send(self, payload: np.ndarray, seq: int) -> None:
        if self.framed:
            self.push.send_multipart(encode(Frame(kind="pcm", seq=seq, data=payload)), copy=False)
        else:
            self.push.send_multipart([b"h" * 24, payload], copy=False)

    def recv(self) -> None:
        parts = self.pull.recv_multipart(copy=False)
        if self.framed:
            decode([p.buffer for p in parts])

    def latency(self, payload: np.ndarray, n: int, hops: int) -> tuple[float, float]:
        times = []
        for i in range(n):
            t0 = time.perf_counter_ns()
            self.send(payload, i)
            self.recv()
            times.append((time.perf_counter_ns() - t0) // hops)
        return percentiles(times[n // 10:])            # the first 10 % warm up

    def throughput(self, payload: np.ndarray, n: int) -> float:
        sender = threading.Thread(target=lambda: [self.send(payload, i) for i in range(n)])
        t0 = time.perf_counter()
        sender.start()
        for _ in range(n):
            self.recv()
        sender.join()
        return n / (time.perf_counter() - t0)

    def close(self, eos: bool) -> None:
        if eos:
            self.push.send_multipart(encode(Frame(kind="eos")))
            self.recv_eos()
        self.push.close(linger=0)
        self.pull.close(linger=0)

    def recv_eos(self) -> None:
        while self.pull.poll(5000):
            if decode(self.pull.recv_multipart()).kind == "eos":
                return


def addresses(scheme: str, tmp: Path, count: int) -> list[str]:
    if scheme == "tcp":
        return [f"tcp://127.0.0.1:{free_tcp_port()}" for _ in range(count)]
    if scheme == "ipc":
        return [f"ipc://{tmp}/{i}.sock" for i in range(count)]
    return [f"inproc://bench-{time.monotonic_ns()}-{i}" for i in range(count)]


def measure_floor(scheme: str, payload: np.ndarray, n_lat: int, n_thr: int, tmp: Path):
    ctx = zmq.Context()
    a_in, a_out = addresses(scheme, tmp, 2)
    drv = Driver(ctx, a_in, a_out, framed=False)
    echo = mp.get_context("spawn").Process(target=_raw_echo, args=(a_in, a_out, n_lat + n_thr))
    echo.start()
    try:
        p50, p99 = drv.latency(payload, n_lat, hops=2)
        fps = drv.throughput(payload, n_thr)
    finally:
        echo.join(timeout=10)
        drv.close(eos=False)
        ctx.term()
    return p50, p99, fps


# --- omniflow: relay nodes on the real runtime -----------------------------------------------

def _chain_wiring(addrs: list[str], i: int) -> Wiring:
    return Wiring(inputs=[Link(f"e{i}", "in", addrs[i])], outputs=[Link(f"e{i + 1}", "out", addrs[i + 1])])


def start_relays(scheme: str, addrs: list[str], tmp: Path, ctx: zmq.Context):
    """Relays i = 0..len(addrs)-2, relay i reads addrs[i] and binds addrs[i+1]. Processes for
    ipc/tcp (the real `python -m omniflow.runtime`), threads for inproc."""
    handles = []
    for i in range(len(addrs) - 1):
        wiring = _chain_wiring(addrs, i)
        if scheme == "inproc":
            rt = NodeRuntime(Relay(name=f"relay{i}"), wiring, context=ctx)
            t = threading.Thread(target=rt.run, daemon=True)
            t.start()
            handles.append(t)
        else:
            cfg = NodeConfig(name=f"relay{i}", use="benchmarks.transport:Relay", params={},
                             wiring=wiring, log_level="WARNING")
            path = tmp / f"relay{i}.json"
            path.write_bytes(msgspec.json.encode(cfg))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            handles.append(subprocess.Popen([sys.executable, "-m", "omniflow.runtime", str(path)], env=env))
    return handles


def stop_relays(handles) -> None:
    for h in handles:
        if isinstance(h, threading.Thread):
            h.join(timeout=10)
        else:
            try:
                h.wait(timeout=10)
            except subprocess.TimeoutExpired:
                h.kill()


def measure_path(scheme: str, relays: int, payload: np.ndarray, n_lat: int, n_thr: int, tmp: Path):
    ctx = zmq.Context()
    addrs = addresses(scheme, tmp, relays + 1)
    drv = Driver(ctx, addrs[0], addrs[-1], framed=True)
    handles = start_relays(scheme, addrs, tmp, ctx)
    try:
        drv.latency(payload, min(50, n_lat), hops=1)    # wait until every relay is up
        p50, p99 = drv.latency(payload, n_lat, hops=2 if relays == 1 else 1)
        fps = drv.throughput(payload, n_thr)
    finally:
        drv.close(eos=True)
        stop_relays(handles)
        ctx.term()
    return p50, p99, fps


def measure_direct(payload: np.ndarray, n: int) -> tuple[float, float]:
    """The six nodes called one after another in one process: no sockets, no encoding."""
    relays = [Relay(name=f"r{i}") for i in range(CHAIN)]
    times = []
    for i in range(n):
        frame = Frame(kind="pcm", seq=i, data=payload)
        t0 = time.perf_counter_ns()
        for r in relays:
            ((_, frame),) = r.process("in", frame)
        times.append(time.perf_counter_ns() - t0)
    return percentiles(times[n // 10:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="omniflow bench transport", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="payload bytes, comma-separated")
    ap.add_argument("--quick", action="store_true", help="5x fewer iterations")
    ap.add_argument("--repeat", type=int, default=3,
                    help="measure each row this many times, interleaved, and report medians "
                         "(a shared machine's noise hits single runs hard)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    header = f"{'path':<22}{'transport':<10}{'payload':>9}{'p50 µs':>10}{'p99 µs':>10}{'frames/s':>11}{'MB/s':>9}"
    print(header)
    print("-" * len(header))

    def row(path, scheme, size, p50, p99, fps):
        rows.append(dict(path=path, transport=scheme, bytes=size, p50_us=p50, p99_us=p99, fps=fps))
        fps_s = f"{fps:>11.0f}" if fps else f"{'':>11}"
        mbs = f"{fps * size / 1e6:>9.1f}" if fps else f"{'':>9}"
        print(f"{path:<22}{scheme:<10}{size:>9}{p50:>10.1f}{p99:>10.1f}{fps_s}{mbs}", flush=True)

    with tempfile.TemporaryDirectory(prefix="ofb-") as tmp:
        tmp = Path(tmp)
        for size in sizes:
            payload = np.zeros(size, np.uint8)
            n_lat, n_thr = iterations(size, args.quick)
            cases = [("floor (raw pyzmq)", s, lambda s=s: measure_floor(s, payload, n_lat, n_thr, tmp))
                     for s in ("ipc", "tcp")]
            cases += [("1 hop", s, lambda s=s: measure_path(s, 1, payload, n_lat, n_thr, tmp))
                      for s in ("inproc", "ipc", "tcp")]
            cases += [(f"{CHAIN} nodes direct", "call", lambda: (*measure_direct(payload, n_lat), 0.0))]
            cases += [(f"{CHAIN}-node chain", s,
                       lambda s=s: measure_path(s, CHAIN, payload, n_lat, n_thr // 2, tmp))
                      for s in ("inproc", "ipc")]
            results = {(path, s): [] for path, s, _ in cases}
            for _ in range(args.repeat):              # interleaved: noise hits every row alike
                for path, s, measure in cases:
                    results[(path, s)].append(measure())
            for (path, s), runs in results.items():
                row(path, s, size, *np.median(np.array(runs), axis=0))
    print()
    by = {(r["path"], r["transport"], r["bytes"]): r for r in rows}
    for size in sizes:
        for scheme in ("ipc", "tcp"):
            hop, floor = by[("1 hop", scheme, size)], by[("floor (raw pyzmq)", scheme, size)]
            print(f"{size:>8} B {scheme}: hop p50 = {hop['p50_us'] / floor['p50_us']:.2f} x floor")
        chain, direct = by[(f"{CHAIN}-node chain", "ipc", size)], by[(f"{CHAIN} nodes direct", "call", size)]
        print(f"{size:>8} B: {CHAIN}-node chain over ipc adds {(chain['p50_us'] - direct['p50_us']) / 1e3:.2f} ms "
              "p50 over direct calls")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
