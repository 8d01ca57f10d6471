"""Transport: one ZeroMQ PUSH/PULL socket pair per edge, addressed by a plain endpoint map.

* The endpoint map is a dict `edge id -> address` (plus `CONTROL_PUB` / `CONTROL_IN` for the
  control channel). Launchers build it; nothing else decides addresses, so a Ray or k8s launcher
  only has to build its own map.
* Producers bind, consumers connect: ZeroMQ reconnects by itself, so a restarted node heals its edges.
* One socket pair per edge (not one PUSH shared by consumers, which would round-robin): fan-out
  delivers every frame to every consumer.
* Lossless edges block the producer when the consumer falls `depth` frames behind (backpressure).
  Drop-oldest edges never block: the consumer keeps the newest `depth` frames and drops older ones.
* tcp:// sockets are CURVE-encrypted and authenticated when a run has keys (`security.py`).
* The control channel is a bus: every node PUSHes to `CONTROL_IN`, the launcher republishes on
  `CONTROL_PUB`, every node SUBscribes to it.
"""
from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Callable

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from .graph import Graph, split_host
from .security import REFUSAL_EVENTS, Curve, is_tcp, note_monitor_event, secure_bind, secure_connect

CONTROL_PUB = "$control.pub"      # endpoint-map keys of the control channel
CONTROL_IN = "$control.in"
RECONNECT_MS = 20                 # how soon a consumer retries a producer that is not up (yet)
IPC_PATH_MAX = 100                # sun_path holds 107 bytes on Linux; keep a margin
IPC_NAME_ROOM = 24                # bytes kept for "/<index>.sock" after the socket directory
LOSSY_QUEUE_CAP = 1000           # frames a drop-oldest edge's sockets hold before the producer drops
COPY_BELOW_BYTES = 512 * 1024    # copying a payload this small beats zero-copy send bookkeeping
# Flags as plain ints: pyzmq's are enum.Flag members, and `NOBLOCK | SNDMORE` on those goes
# through enum.__or__, an order of magnitude dearer than an int `|`, on every frame sent.
NOBLOCK, SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)


class Link(msgspec.Struct):
    """One edge as one of its two nodes sees it."""
    id: str
    port: str                     # this node's port on the edge
    address: str
    policy: str = "lossless"
    depth: int = 64
    feedback: bool = False


class Wiring(msgspec.Struct):
    """Everything a node runtime needs to know about its sockets: plain data, JSON-able."""
    inputs: list[Link] = []
    outputs: list[Link] = []
    control_pub: str | None = None
    control_in: str | None = None


def _slug(edge_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", edge_id)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ipc_dir_fits(sock_dir: str | Path) -> bool:
    """True if ipc:// sockets in `sock_dir` stay within the length limit of a socket path."""
    return len(str(sock_dir)) + IPC_NAME_ROOM <= IPC_PATH_MAX


def endpoint_map(graph: Graph, scheme: str = "ipc", sock_dir: str | Path | None = None,
                 overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Addresses for every edge and the control channel.

    scheme "ipc": files under `sock_dir`; "inproc": one process; "tcp": 127.0.0.1. A node with
    `host:` binds its outputs with tcp on that host: on free ports, or, with a port base
    (`host: 10.0.0.2:47100`), on base + k for its k-th output edge, so that launchers on several
    machines compute the same map. `overrides` (an --endpoints file) win.
    """
    overrides = overrides or {}
    if scheme == "ipc":
        if sock_dir is None:
            raise ValueError("ipc endpoints need a sock_dir")
        sock_dir = Path(sock_dir)
        if not ipc_dir_fits(sock_dir):
            raise ValueError(f"socket directory {sock_dir} is too long for ipc:// paths "
                             f"(limit ~{IPC_PATH_MAX} bytes); use a shorter --run-dir")
    addresses: dict[str, str] = {}

    def address(key: str, host: str | None, index: int, k: int = 0, node: str = "") -> str:
        if key in overrides:
            return overrides[key]
        if host is not None or scheme == "tcp":
            name, base = split_host(host or "127.0.0.1")
            if base is not None:
                return f"tcp://{name}:{base + k}"
            try:
                return f"tcp://{name}:{free_tcp_port(name)}"
            except OSError:
                raise ValueError(f"node '{node}': host '{name}' is not an address of this machine, "
                                 "so no free port can be picked for it here. Fix: give a port "
                                 f"base, 'host: {name}:47100', so every machine computes the "
                                 "same ports") from None
        if scheme == "inproc":
            return f"inproc://{_slug(key)}"
        return f"ipc://{sock_dir}/{index}.sock"   # short names: ipc paths are length-limited

    for i, key in enumerate([CONTROL_PUB, CONTROL_IN]):
        addresses[key] = address(key, None, i)
    outputs_seen: dict[str, int] = {}              # node -> its output edges so far
    for i, edge in enumerate(graph.edges, start=2):
        k = outputs_seen[edge.src] = outputs_seen.get(edge.src, -1) + 1
        addresses[edge.id] = address(edge.id, graph.nodes[edge.src].host, i, k, edge.src)
    return addresses


def wiring_for(graph: Graph, name: str, endpoints: dict[str, str]) -> Wiring:
    def link(e, port):
        return Link(e.id, port, endpoints[e.id], e.policy, e.depth, e.feedback)
    return Wiring(inputs=[link(e, e.dst_port) for e in graph.inputs_of(name)],
                  outputs=[link(e, e.src_port) for e in graph.outputs_of(name)],
                  control_pub=endpoints.get(CONTROL_PUB), control_in=endpoints.get(CONTROL_IN))


# --- sockets ---------------------------------------------------------------------------------

def _hwm(link: Link) -> int:
    """Frames queued at each end. Lossless: `depth`, then the producer blocks. Drop-oldest: the
    consumer keeps the newest `depth` itself, so the socket queues are only a safety cap (beyond
    it the producer drops, counted)."""
    return link.depth if link.policy == "lossless" else max(link.depth, LOSSY_QUEUE_CAP)


def bind_output(ctx: zmq.Context, link: Link,
                curve: Curve | None = None) -> tuple[zmq.Socket, "ConsumerWatch"]:
    """The producer's end; a CURVE server on tcp:// when `curve` keys are given."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, _hwm(link))
    sock.copy_threshold = COPY_BELOW_BYTES
    sock.setsockopt(zmq.LINGER, 0)            # the runtime sets a linger before closing
    watch = ConsumerWatch(sock, refusals=curve is not None and is_tcp(link.address))   # before bind
    if link.address.startswith("ipc://"):
        Path(link.address[6:]).unlink(missing_ok=True)   # left by a killed predecessor
    try:
        secure_bind(sock, link.address, curve)
    except zmq.ZMQError as e:
        watch.close()
        sock.close(linger=0)
        raise zmq.ZMQError(e.errno, f"cannot bind {link.address} for edge {link.id}: {e.strerror}"
                           ) from None
    return sock, watch


class ConsumerWatch:
    """Counts the consumers connected to a bound socket (ZeroMQ socket monitor).

    Why: closing a bound ipc:// socket loses frames still in flight, whatever its linger
    (libzmq 4.3). So a producer that sent eos stays up until its consumers, who close their end
    on reading eos, have disconnected: then everything before eos has arrived.
    """

    def __init__(self, sock: zmq.Socket, refusals: bool = False):
        """refusals: the socket is a CURVE server: also count and log the handshakes it refuses."""
        events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
        self.monitor = sock.get_monitor_socket(events | (REFUSAL_EVENTS if refusals else 0))
        self.peers = 0
        self.accepts = 0                  # connections so far (omniflow/delivery.py: a rejoin each)

    def connected(self) -> int:
        while self.monitor.poll(0):
            message = recv_monitor_message(self.monitor)
            event = message["event"]
            if event == zmq.EVENT_ACCEPTED:
                self.peers += 1
                self.accepts += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self.peers -= 1
            else:                                        # a CURVE handshake failed: a refused peer
                note_monitor_event(message)
        return self.peers

    def close(self) -> None:
        self.monitor.close(linger=0)


def connect_input(ctx: zmq.Context, link: Link, curve: Curve | None = None) -> zmq.Socket:
    """The consumer's end; a CURVE client on tcp:// when `curve` keys are given."""
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, _hwm(link))
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
    secure_connect(sock, link.address, curve)
    return sock


def send_parts(sock: zmq.Socket, parts: list, flags: int = 0) -> None:
    """`sock.send_multipart(parts, flags, copy=False)` without its per-call argument checks
    (a measurable share of a hop: `omniflow bench transport`). ZeroMQ queues a multipart message whole or not at all, so only the first
    part can raise zmq.Again."""
    *head, tail = parts
    for part in head:
        sock.send(part, flags | SNDMORE, copy=False)
    sock.send(tail, flags, copy=False)


def recv_parts(sock: zmq.Socket, flags: int = NOBLOCK) -> list[zmq.Frame]:
    """`sock.recv_multipart(flags, copy=False)`, asking each part whether more follow instead of
    the socket (a getsockopt per part, which costs more than the check). Raises zmq.Again if none is
    ready; the rest of a message is always ready once its first part is."""
    part = sock.recv(flags, copy=False)
    parts = [part]
    while part.more:
        part = sock.recv(flags, copy=False)
        parts.append(part)
    return parts


def send_blocking(sock: zmq.Socket, parts: list, should_stop: Callable[[], bool],
                  wait_ms: int = 50) -> bool:
    """Send, waiting while the consumer is full or not connected (backpressure). Returns False
    if `should_stop()` turned True while waiting (the frame was not sent)."""
    while True:
        try:
            send_parts(sock, parts, NOBLOCK)
            return True
        except zmq.Again:
            if should_stop():
                return False
            sock.poll(wait_ms, zmq.POLLOUT)


def send_or_drop(sock: zmq.Socket, parts: list) -> bool:
    """Send without waiting; False if the edge is full (the frame is dropped)."""
    try:
        send_parts(sock, parts, NOBLOCK)
        return True
    except zmq.Again:
        return False
