"""The control bus: every node PUSHes control frames to `CONTROL_IN`; the bus answers or
republishes them on `CONTROL_PUB`, which every node SUBscribes to. It is the graph's turn
authority (omniflow/turns.py): requests for a session's next turn, a claim of a turn and the end
of a session are answered with one announcement to every node; turn numbers are allocated
nowhere else. Heartbeats stop here (they go to `on_heartbeat`); a `stop` frame is republished and
reported to `on_stop`. The latest turn of every live session is replayed to a node that
(re)joins, so a node that starts late or restarts still drops old turns. Sessions that asked for
nothing for `turns.SESSION_IDLE_S` are ended by the bus (announced like a client's end).
A node that ended its outputs says so ({"op": "eos"}); the bus replays that to every node that
joins later, so a consumer restarted after its producer's eos went to its previous instance
still ends (omniflow/runtime.py, `restarted`).

Graph ready: a node's heartbeats begin when its setup() has finished. Once every node in `nodes`
has sent one, the bus publishes {"op": "graph_ready"} (and replays it to any node that
joins later) and calls `on_ready` once; sources (nodes without inputs of their own) hold their
first step until they see it, so the first question never waits behind a weight load. A bus
given no `nodes` announces the graph ready at once (nothing is held).

Health: about once a second the bus publishes {"op": "health", "nodes": {name: {"up", "age_s",
"restarts", "metrics", "stats"}}}: every node in `nodes` (and any other that beats), up while its
last heartbeat is younger than STALE_S, with the runtime metrics and node stats (`Node.stats`) of
that heartbeat and the restarts `restarts()` reports. The gateway serves it as /healthz and /metrics.

The local and Ray launchers host one in their supervision loop; on Kubernetes it runs alone:

    python -m omniflow.launch.bus --pub tcp://*:5590 --in tcp://*:5591 [--keys /etc/omniflow/keys]
"""
from __future__ import annotations

import argparse
import logging
import signal
import time
import sys
import time
from pathlib import Path
from typing import Any, Callable, Collection

import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import heartbeat_file
from ..frame import Frame, FrameError, decode, encode
from ..runtime import HEARTBEAT_S, LOG_FORMAT
from ..security import (REFUSALS, Curve, is_tcp, note_monitor_event, secure_bind, start_authenticator,
                        stop_authenticator, watch_refusals)
from ..turns import REQUEST_OPS, TurnAuthority

EXPIRE_EVERY_S = 1.0        # how often idle sessions are looked for

log = logging.getLogger("omniflow.launch")
GRAPH_READY = encode(Frame(kind="control", meta={"op": "graph_ready"}))   # sources may start
HEALTH_S = 1.0               # the run's health is published this often
STALE_S = 3.5                # a node whose last heartbeat is older is not up (heartbeats: every 1 s)


class ControlBus:
    def __init__(self, context: zmq.Context, pub_address: str, in_address: str,
                 curve: Curve | None = None, *,
                 on_heartbeat: Callable[[dict[str, Any]], None] = lambda meta: None,
                 on_stop: Callable[[str], None] = lambda reason: None,
                 nodes: Collection[str] | None = None, on_ready: Callable[[], None] = lambda: None,
                 restarts: Callable[[], dict[str, int]] = dict):
        self.context, self.on_heartbeat, self.on_stop = context, on_heartbeat, on_stop
        self.on_ready = on_ready
        self.waiting = set(nodes or ())           # nodes whose setup() has not finished yet
        self.ready = not self.waiting             # graph_ready announced
        self.nodes, self.restarts = list(nodes or ()), restarts
        self.beats: dict[str, tuple[float, dict]] = {}    # node -> (monotonic time, its last heartbeat)
        self._next_health = 0.0
        self.pub = context.socket(zmq.XPUB)     # XPUB: hears each node subscribe (see _replay_turns)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.pull = context.socket(zmq.PULL)
        self._zap = curve is not None and (is_tcp(pub_address) or is_tcp(in_address))
        if self._zap:
            start_authenticator(context, curve)
        self._monitors = [watch_refusals(sock) for sock, address in ((self.pub, pub_address),
                                                                     (self.pull, in_address))
                          if curve is not None and is_tcp(address)]     # refused peers (before bind)
        secure_bind(self.pub, pub_address, curve)
        secure_bind(self.pull, in_address, curve)
        self.turns = TurnAuthority()
        self._latest: dict[str, list[bytes]] = {}    # session -> its latest announcement, encoded
        self._ended_nodes: dict[str, list[bytes]] = {}   # node that sent eos -> its replay
        self._next_expiry = time.monotonic() + EXPIRE_EVERY_S
        if self.ready:
            self.on_ready()

    def register(self, poller: zmq.Poller) -> None:
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)
        for monitor in self._monitors:
            poller.register(monitor, zmq.POLLIN)

    def handle(self, ready: dict) -> None:
        """Serve what `poller.poll()` found ready on the bus's sockets."""
        if self.pull in ready:
            self._forward()
        if self.pub in ready:
            self._replay_turns()
        for monitor in self._monitors:
            while monitor.poll(0):
                note_monitor_event(recv_monitor_message(monitor))
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRE_EVERY_S
            for announcement in self.turns.expire():
                self._announce(announcement)
        if now >= self._next_health:
            self._next_health = now + HEALTH_S
            self.pub.send_multipart(encode(Frame(kind="control", meta=self.health(now))))

    def health(self, now: float | None = None) -> dict[str, Any]:
        """The run's health (see the module doc)."""
        now = time.monotonic() if now is None else now
        restarts = self.restarts()
        nodes = {}
        for name in dict.fromkeys([*self.nodes, *self.beats]):
            when, beat = self.beats.get(name, (None, {}))
            age = None if when is None else round(now - when, 3)
            nodes[name] = {"up": age is not None and age < STALE_S, "age_s": age,
                           "restarts": restarts.get(name, 0), "metrics": beat.get("metrics", {}),
                           "stats": beat.get("stats", {})}
        return {"op": "health", "ready": self.ready, "nodes": nodes,
                "bus": {"refused": REFUSALS.total if self._zap else 0}}

    def _announce(self, frame) -> None:
        parts = encode(frame)
        self.pub.send_multipart(parts)
        if frame.meta.get("op") == "end":
            self._latest.pop(frame.session, None)
        else:
            self._latest[frame.session] = [bytes(p) for p in parts]

    def close(self) -> None:
        for monitor in self._monitors:
            monitor.close(linger=0)
        self.pub.close(linger=0)
        self.pull.close(linger=0)
        if self._zap:
            stop_authenticator(self.context)

    def _forward(self) -> None:
        while True:
            try:
                parts = self.pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                frame = decode(parts)
            except FrameError as e:
                log.warning("rejected a malformed control frame: %s", e)
                continue
            op = frame.meta.get("op")
            if op == "heartbeat":
                if not self.ready:
                    self._node_ready(str(frame.meta.get("node")))
                self.beats[str(frame.meta.get("node"))] = (time.monotonic(), frame.meta)
                self.on_heartbeat(frame.meta)
                continue
            if op == "eos":                # a node ended its outputs: tell consumers that restart later
                node = str(frame.meta.get("node"))
                self._ended_nodes[node] = [bytes(p) for p in encode(Frame(
                    kind="control", meta={"op": "eos", "node": node, "replay": True}))]
                continue
            if op in REQUEST_OPS:
                announcement = self.turns.handle(frame)
                if announcement is not None:
                    self._announce(announcement)
                continue
            self.pub.send_multipart(parts)
            if op == "stop":
                self.on_stop(f"stopped by a node's control frame (session {frame.session})")

    def _node_ready(self, node: str) -> None:
        self.waiting.discard(node)
        if not self.waiting and not self.ready:
            self.ready = True
            self.pub.send_multipart(GRAPH_READY)
            self.on_ready()

    def _replay_turns(self) -> None:
        """A node (re)joined: send it the current turn of every session (last-value cache)."""
        joined = False
        while True:
            try:
                joined |= self.pub.recv(zmq.NOBLOCK)[:1] == b"\x01"
            except zmq.Again:
                break
        if joined:
            if self.ready:
                self.pub.send_multipart(GRAPH_READY)
            for parts in [*self._latest.values(), *self._ended_nodes.values()]:
                self.pub.send_multipart(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omniflow.launch.bus",
                                     description="run a graph's control bus on its own (Kubernetes)")
    parser.add_argument("--pub", required=True, help="address nodes subscribe to, e.g. tcp://*:5590")
    parser.add_argument("--in", dest="inbox", required=True, help="address nodes push to, e.g. tcp://*:5591")
    parser.add_argument("--keys", help="CURVE key directory")
    parser.add_argument("--nodes", default="", metavar="A,B,...",
                        help="the graph's nodes: sources start once every one has finished setup() "
                             "(default: at once)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format=LOG_FORMAT)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    context = zmq.Context()
    curve = Curve.load(Path(args.keys)) if args.keys else None
    seen: set[str] = set()

    def on_heartbeat(meta: dict[str, Any]) -> None:
        if meta.get("node") not in seen:            # once per node: who is on the bus
            seen.add(meta.get("node"))
            log.info("node '%s' joined (pid %s)", meta.get("node"), meta.get("pid"))

    bus = ControlBus(context, args.pub, args.inbox, curve, on_heartbeat=on_heartbeat,
                     nodes=[n for n in args.nodes.split(",") if n],
                     on_ready=lambda: log.info("graph ready: every node finished setup()"))
    poller = zmq.Poller()
    bus.register(poller)
    log.info("control bus on %s (pub) and %s (in)", args.pub, args.inbox)
    beat_file, next_beat = heartbeat_file.path_from_env(), 0.0
    try:
        while not stopping:
            bus.handle(dict(poller.poll(100)))
            if time.monotonic() >= next_beat:         # the loop turns: a probe sees the file age
                heartbeat_file.beat(beat_file)
                next_beat = time.monotonic() + HEARTBEAT_S
    except KeyboardInterrupt:
        pass
    finally:
        bus.close()
        context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
