"""Runtime: the loop that hosts one node. It calls the node exactly as `omniflow.testing.run_node`:

    setup(); for each input frame: process(port, frame); while has_work(): step();
    when every input edge reached end of stream: finish(); send "eos" on every output; teardown()

One iteration: read control, poll inputs (not waiting when the node has work), call the node, send
what it yields, heartbeat. Turns go through the turn gate (omniflow/turns.py), the same one
`omniflow.testing.run_node` uses: the bus's announcement of session S's turn N calls reset(S, N)
and drops data frames of S with turn < N that arrive later; a data frame of a newer turn starts
that turn the same way (its announcement is still on the way); {"op": "stop"} ends the loop. A
node call that raises while handling one frame is caught by the gate: logged once, an "error"
frame goes downstream for that session's turn, and the node keeps serving. A malformed frame is
counted and logged; the node keeps serving. With no control bus (a runtime hosted alone), the
runtime allocates turns itself with the same `TurnAuthority` the bus uses.

Edges: every message is numbered by its producer (omniflow/delivery.py); on a lossless ipc edge the
producer keeps what the consumer has not taken and sends it again to a consumer that (re)connects.

Graph ready: heartbeats start once setup() has finished (the control bus counts them). A source
(a node with no input but feedback edges: a file, a microphone, the WebSocket gateway) wired to a
control channel holds its first step() until the bus announces {"op": "graph_ready"}: the first
utterance must not queue behind another node's weight load.

A node process is started as `python -m omniflow.runtime CONFIG.json` (a `NodeConfig`).
"""
from __future__ import annotations

import collections
import faulthandler
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import msgspec
import zmq

from . import heartbeat_file
from .errors import EXPECTED_ERRORS
from .delivery import Receiver, Sender, new_instance
from .frame import KINDS, Frame, FrameError, decode, encode, register_kind
from .graph import GRAPH_DIRS
from .node import CONTROL, Node, Output, drain
from .turns import ANNOUNCE_OPS, TurnAuthority, TurnGate
from .security import REFUSALS, Curve, is_tcp, secure_connect, start_authenticator, stop_authenticator
from .transport import (Link, Wiring, bind_output, connect_input, recv_parts, send_blocking,
                        send_or_drop)

HEARTBEAT_S = 1.0          # a node reports liveness and metrics this often
EOS_QUIET_S = 1.0          # a restarted node's input whose producer already ended: quiet this long = eos
IDLE_POLL_MS = 100         # longest wait for input, so a stop request is seen within 0.1 s
FLUSH_LINGER_MS = 5000     # at a normal end, time allowed for queued frames + eos to leave
REJOIN_WAIT_S = 30.0       # an ended producer waits this long for a dead consumer's successor to
                           # take the frames kept for it (omniflow/delivery.py)
EXIT_OK, EXIT_FAILED, EXIT_SETUP_FAILED = 0, 1, 3
LOG_FORMAT = "%(levelname)s %(message)s"   # a node's log lines, wherever it runs (launchers prefix [node])


class SetupError(RuntimeError):
    """The node's setup() raised: the run cannot work, restarting will not help."""


class Metrics(msgspec.Struct):
    frames_in: int = 0
    frames_out: int = 0
    dropped_old_turn: int = 0      # data frames of a session's older turn, dropped on arrival
    dropped_overflow: int = 0      # drop-oldest edges that overflowed
    rejected: int = 0              # malformed frames (undecodable, wrong parts, size mismatch)
    turns: int = 0                 # session turns this node started
    failed_turns: int = 0          # ... of which one of its calls raised (an error frame went out)
    sessions: int = 0              # sessions it holds a turn for now
    refused: int = 0               # CURVE handshakes refused (unknown client key), this process
    lost: int = 0                  # frames missing from an input's sequence, or not kept for a restart
    resent: int = 0                # frames sent again to a consumer that restarted (delivery.py)
    unprotected: int = 0           # frames no longer kept for a consumer that was far behind

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in msgspec.structs.asdict(self).items())


class Tap(Protocol):
    """Sees every frame a node receives, before the node does (omniflow run --trace / --record).
    Off by default: a runtime without taps pays one tuple truth test per frame."""

    def received(self, link: Link, frame: Frame, parts: list[zmq.Frame], now_ns: int) -> None: ...
    def close(self) -> None: ...


class NodeRuntime:
    def __init__(self, node: Node, wiring: Wiring, *, context: zmq.Context | None = None,
                 heartbeat_s: float = HEARTBEAT_S, parent_pid: int | None = None,
                 curve: Curve | None = None, taps: list[Tap] | None = None,
                 threads: int | None = None, restarted: int = 0):
        self.node, self.name, self.wiring = node, node.name, wiring
        self.metrics = Metrics()
        self.log = logging.getLogger(f"omniflow.{self.name}")
        self.heartbeat_s, self.parent_pid = heartbeat_s, parent_pid
        self.curve = curve                        # keys: tcp:// sockets use CURVE (security.py)
        self._allow = None                        # the ZAP allow list, while we serve CURVE
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._stopping = False
        self._ended = False                       # eos sent on every output
        self._gate = TurnGate(node)               # turns, drops, resets, per-frame errors
        self.restarted = restarted                # how many instances of this node ran before
        self._quiet_eos: dict[zmq.Socket, float] = {}   # input -> when its producer was known ended
        self._authority: TurnAuthority | None = None   # turns allocated here when there is no bus
        self._control: list[Frame] = []           # control frames read, not yet applied
        self._taps = tuple(taps or ())            # observers of received frames (trace, record)
        self.threads = threads                    # torch/OpenMP/MKL threads (graph key `threads`)
        self._held = False                        # a source waiting for "graph_ready"
        self._untaken_since: float | None = None  # ended, consumers gone, frames kept for them
        self._beat_file = heartbeat_file.path_from_env()   # touched per heartbeat (k8s probes)
        # the closing metrics line: DEBUG when a launcher collects the metrics and prints them
        # itself (run_config), so a run logs them once
        self.metrics_level = logging.INFO

    def stop(self) -> None:
        """Ask the loop to end soon (safe from another thread or a signal handler)."""
        self._stopping = True

    # --- sockets ---------------------------------------------------------------------------
    def _open(self) -> None:
        self._outs: dict[str, list[tuple[Link, zmq.Socket, Sender]]] = collections.defaultdict(list)
        self._ins, self._sub, self._push = {}, None, None   # (for _close)
        self._senders: list[tuple[zmq.Socket, Sender, "ConsumerWatch"]] = []   # one per output edge
        self._receivers: dict[zmq.Socket, Receiver] = {}
        instance = new_instance()
        if self.curve is not None and any(is_tcp(link.address) for link in self.wiring.outputs):
            self._allow = start_authenticator(self._ctx, self.curve)   # checks clients' keys
        for link in self.wiring.outputs:
            sock, watch = bind_output(self._ctx, link, self.curve)
            sender = Sender(link, instance)
            self._outs[link.port].append((link, sock, sender))
            self._senders.append((sock, sender, watch))
        for link in self.wiring.inputs:
            receiver = Receiver(link)                 # its ack file exists before we connect
            sock = connect_input(self._ctx, link, self.curve)
            self._ins[sock] = link
            self._receivers[sock] = receiver
        self._backlog = {sock: collections.deque(maxlen=link.depth)
                         for sock, link in self._ins.items() if link.policy == "drop-oldest"}
        if self.wiring.control_pub:
            self._sub = self._ctx.socket(zmq.SUB)
            self._sub.setsockopt(zmq.SUBSCRIBE, b"")
            self._sub.setsockopt(zmq.LINGER, 0)
            secure_connect(self._sub, self.wiring.control_pub, self.curve)
        if not self.wiring.control_in:
            self._authority = TurnAuthority()
        else:
            self._push = self._ctx.socket(zmq.PUSH)
            self._push.setsockopt(zmq.LINGER, 1000)
            secure_connect(self._push, self.wiring.control_in, self.curve)

    def _close(self, flush: bool) -> None:
        for outs in self._outs.values():
            for _, sock, sender in outs:
                sock.close(linger=FLUSH_LINGER_MS if flush else 0)
                sender.close()
        for _, _, watch in self._senders:
            watch.close()
        for receiver in self._receivers.values():
            receiver.close()
        for sock in [*self._ins, self._sub, self._push]:
            if sock is not None and not sock.closed:
                sock.close()
        if self.curve is not None:                # peers refused by any CURVE socket of this process
            self.metrics.refused = REFUSALS.total
            stop_authenticator(self._ctx)
        if self._own_ctx:
            self._ctx.term()

    # --- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        """Host the node until its streams end or it is stopped. Raises what the node raised."""
        try:
            self._open()
        except BaseException:           # e.g. an address in use: close what was opened
            self._close(flush=False)
            raise
        finished = False
        try:
            try:
                apply_threads(self.threads)
                self.node.curve = self.curve          # for sockets the node opens itself (--keys)
                self.node.setup()
                apply_threads(self.threads)   # again if setup() loaded torch: it caps the
                                              # OMP_NUM_THREADS its launcher set at the core count
            except Exception as e:
                raise SetupError(f"node '{self.name}' failed in setup(): {type(e).__name__}: {e}") from e
            self._heartbeat()                 # the first one tells the bus setup() is done
            try:
                self._loop()
                finished = not self._stopping
            finally:
                self.node.teardown()
        finally:
            self.metrics.turns, self.metrics.failed_turns = self._gate.turns, self._gate.failed_turns
            self._count_delivery()
            self._close(flush=finished)
            for tap in self._taps:
                tap.close()
            self.log.log(self.metrics_level, "metrics: %s", self.metrics.line())

    def _loop(self) -> None:
        poller = zmq.Poller()
        monitors = {w.monitor: w for _, _, w in self._senders}
        for sock in [self._sub, *self._ins, *monitors]:
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        main = {s for s, link in self._ins.items() if not link.feedback}   # inputs without eos yet
        feedback = set(self._ins) - main
        self._held = not main and self._sub is not None      # a source: wait for graph_ready
        if self._held:
            self.log.info("waiting for every node of the graph to finish setup()")
        next_beat = time.monotonic() + self.heartbeat_s
        while not self._stopping:
            self._apply_control()
            if not self._ended and not main and not self._held and not self.node.has_work():
                self._end()
            if self._ended and not feedback and self._consumers_done():
                return                          # every consumer has read our eos and hung up
            busy = not self._ended and not self._held and self.node.has_work()
            backlog = any(self._backlog.values())
            for sock, _ in poller.poll(0 if busy or backlog else IDLE_POLL_MS):
                if sock is self._sub:
                    self._read_control()
                elif sock in monitors:
                    monitors[sock].connected()          # a consumer came or went
                    self._rejoin()
                elif self._read_input(sock):            # eos on this edge
                    poller.unregister(sock)
                    main.discard(sock)
                    feedback.discard(sock)
                    sock.close()                        # tells the producer it may exit
            for sock in [s for s in self._quiet_eos if s in main and self._producer_gone(s)]:
                poller.unregister(sock)                 # its eos went to our previous instance
                main.discard(sock)
                sock.close()
            for sock, frames in self._backlog.items():      # one frame per drop-oldest edge
                if frames:
                    self._deliver(self._ins[sock], frames.popleft())
            if busy and not self._stopping:
                self._emit(self.node.step())
            if time.monotonic() >= next_beat:
                self._heartbeat()
                next_beat = time.monotonic() + self.heartbeat_s

    def _end(self) -> None:
        """All inputs ended (or a source ran dry): flush the node, then end every output."""
        self._emit(self.node.finish())
        while self.node.has_work() and not self._stopping:
            self._emit(self.node.step())
            self._read_control()                # e.g. the turn a flushed utterance waits for
            self._apply_control()
        parts = encode(Frame(kind="eos"))
        for outs in self._outs.values():
            for _, sock, sender in outs:                # never dropped, even if lossy
                send_blocking(sock, sender.wrap(parts), self._should_stop)
        self._ended = True
        if self._push is not None:      # the bus tells a consumer that restarts later (it missed this)
            send_or_drop(self._push, encode(Frame(kind="control", meta={"op": "eos", "node": self.name})))

    # --- input -----------------------------------------------------------------------------
    def _read_input(self, sock: zmq.Socket) -> bool:
        """Read what is ready on one edge; True when the edge reached end of stream.

        A lossless edge yields one frame per poll: polling again is cheaper than reading until
        zmq.Again (an exception per edge per poll), and keeps the edges fair."""
        link = self._ins[sock]
        if link.policy == "drop-oldest":
            return self._read_lossy(sock, link)
        try:
            parts = self._receivers[sock].take(recv_parts(sock))
        except zmq.Again:
            return False
        except FrameError as e:
            self._reject(link.id, e)
            return False
        if parts is None:                               # a marker, or a frame sent again later
            return False
        frame = self._decode(parts, link.id)
        if frame is None:
            return False
        if sock in self._quiet_eos:
            self._quiet_eos[sock] = time.monotonic()    # still talking: not gone yet
        if frame.kind == "eos":
            return True
        if self._taps:
            self._observe(link, frame, parts)
        self._deliver(link, frame)
        return False

    def _read_lossy(self, sock: zmq.Socket, link: Link) -> bool:
        """Move everything ready on a drop-oldest edge into its backlog of the newest `depth`
        frames; the loop hands the node one per iteration. At eos the backlog is flushed."""
        backlog, receiver = self._backlog[sock], self._receivers[sock]
        while True:
            try:
                parts = receiver.take(recv_parts(sock))
            except zmq.Again:
                return False
            except FrameError as e:
                self._reject(link.id, e)
                continue
            if parts is None:
                continue
            frame = self._decode(parts, link.id)
            if frame is None:
                continue
            if frame.kind == "eos":
                while backlog:
                    self._deliver(link, backlog.popleft())
                return True
            if self._taps:
                self._observe(link, frame, parts)
            if len(backlog) == backlog.maxlen:
                self.metrics.dropped_overflow += 1     # the deque drops its oldest
            backlog.append(frame)

    def _deliver(self, link: Link, frame: Frame) -> None:
        dropped = self._gate.dropped
        out = self._gate.deliver(link.port, frame)
        if self._gate.dropped != dropped:
            self.metrics.dropped_old_turn += 1
        else:
            self.metrics.frames_in += 1
        self._emit(out)

    def _observe(self, link: Link, frame: Frame, parts: list[zmq.Frame]) -> None:
        """Show a frame that arrived on `link` to every tap; a failing tap is logged, not fatal."""
        now = time.monotonic_ns()
        for tap in self._taps:
            try:
                tap.received(link, frame, parts, now)
            except Exception:
                self.log.exception("tap %s failed on a frame of %s; it is turned off",
                                   type(tap).__name__, link.id)
                self._taps = tuple(t for t in self._taps if t is not tap)

    def _decode(self, parts: list[zmq.Frame], where: str) -> Frame | None:
        try:
            return decode([p.buffer for p in parts])
        except FrameError as e:
            self._reject(where, e)
            return None

    def _reject(self, where: str, error: FrameError) -> None:
        self.metrics.rejected += 1
        self.log.warning("rejected a malformed frame on %s (%d so far): %s",
                         where, self.metrics.rejected, error)

    # --- control ---------------------------------------------------------------------------
    def _read_control(self) -> None:
        while self._sub is not None:
            try:
                parts = recv_parts(self._sub)
            except zmq.Again:
                return
            frame = self._decode(parts, "the control channel")
            if frame is None or frame.kind != "control":
                continue
            op = frame.meta.get("op")
            if op == "stop":
                self.log.info("stop requested on the control channel")
                self._stopping = True
            elif op == "graph_ready":
                self._held = False
            elif op == "eos" and frame.meta.get("replay") and self.restarted:
                self._producer_ended(str(frame.meta.get("node")))
            elif op == "health":
                self.node.run_status(frame.meta)
            elif op in ANNOUNCE_OPS:
                self._control.append(frame)

    def _producer_ended(self, producer: str) -> None:
        """A restarted node hears (the bus's replay) that `producer` sent its eos before this
        instance started: that eos went to the previous instance. The edge counts as ended once
        it has been quiet for EOS_QUIET_S (frames still queued for us are read first)."""
        for sock, link in self._ins.items():
            if link.id.split("/", 1)[0] == producer and not link.feedback and sock not in self._quiet_eos:
                self.log.info("input %s: its producer ended before this restart; it ends here too", link.id)
                self._quiet_eos[sock] = time.monotonic()

    def _producer_gone(self, sock: zmq.Socket) -> bool:
        since = self._quiet_eos.get(sock)
        return since is not None and time.monotonic() - since >= EOS_QUIET_S

    def _apply_control(self) -> None:
        while self._control:
            self._on_control(self._control.pop(0))

    def _on_control(self, frame: Frame) -> None:
        self._emit(self._gate.announce(frame))

    def _should_stop(self) -> bool:
        """Called while blocked on a full edge: keep listening for a stop."""
        self._read_control()
        return self._stopping

    def _heartbeat(self) -> None:
        heartbeat_file.beat(self._beat_file)
        if self.curve is not None:                # peers refused by any CURVE socket of this process
            self.metrics.refused = REFUSALS.total
        gate = self._gate
        self.metrics.turns, self.metrics.failed_turns = gate.turns, gate.failed_turns
        self.metrics.sessions = gate.sessions()
        self._count_delivery()
        if self._authority is not None:
            for announcement in self._authority.expire():
                self._on_control(announcement)
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.log.error("the launcher (pid %d) is gone; stopping", self.parent_pid)
            self._stopping = True
        if self._push is not None:
            beat = Frame(kind="control", meta={"op": "heartbeat", "node": self.name,
                                               "pid": os.getpid(),
                                               "metrics": msgspec.structs.asdict(self.metrics),
                                               "stats": self.node.stats()})
            send_or_drop(self._push, encode(beat))

    # --- output ----------------------------------------------------------------------------
    def _emit(self, results: Iterable[Output] | None) -> None:
        for port, frame in drain(results):
            if port == CONTROL:
                self._gate.outgoing(frame)              # (the turns it asks for come back granted)
                if self._push is not None:
                    send_blocking(self._push, encode(frame), self._should_stop)
                elif self._authority is not None:       # no bus: this runtime numbers the turns
                    announcement = self._authority.handle(frame)
                    if announcement is not None:
                        self._on_control(announcement)
                continue
            if port not in self.node.outputs:
                raise KeyError(f"{type(self.node).__name__} emitted on undeclared port {port!r}; "
                               f"declared: {sorted(self.node.outputs)}")
            if self._ended:                             # e.g. a feedback frame's answer
                self.log.warning("dropped a frame emitted on %r after end of stream", port)
                continue
            self.metrics.frames_out += 1
            outs = self._outs.get(port)
            if not outs:
                continue                                # declared but not connected in this graph
            parts = encode(frame.stamp(self.name))
            for link, sock, sender in outs:
                if link.policy == "lossless":
                    if not send_blocking(sock, sender.wrap(parts), self._should_stop):
                        return
                elif not send_or_drop(sock, sender.wrap(parts)):
                    self.metrics.dropped_overflow += 1

    # --- delivery (omniflow/delivery.py) -----------------------------------------------------
    def _rejoin(self) -> None:
        """A consumer connected: send it our marker and what its predecessor had not taken."""
        for sock, sender, watch in self._senders:
            if watch.accepts == sender.joins:
                continue
            sender.joins = watch.accepts
            if sender.path is None:
                continue
            messages = sender.rejoin()
            for message in messages:
                if not send_blocking(sock, message, self._should_stop):
                    return
            if len(messages) > 1:
                self.metrics.resent += len(messages) - 1
                self.log.info("edge %s: a consumer connected; sent it again the %d frames its "
                              "predecessor had not taken", sender.link.id, len(messages) - 1)

    def _consumers_done(self) -> bool:
        """After our eos: every consumer has hung up, and took what was kept for it (or its
        successor did not come within REJOIN_WAIT_S)."""
        if any(w.connected() for _, _, w in self._senders):
            self._rejoin()
            self._untaken_since = None
            return False
        untaken = [s.link.id for _, s, _ in self._senders if not s.link.feedback and not s.all_taken()]
        if not untaken:
            return True
        now = time.monotonic()
        if self._untaken_since is None:
            self._untaken_since = now
        if now - self._untaken_since < REJOIN_WAIT_S:
            return False
        self.log.warning("ending with frames its consumers never took on %s (they did not come back "
                         "within %.0f s)", ", ".join(untaken), REJOIN_WAIT_S)
        return True

    def _count_delivery(self) -> None:
        m = self.metrics
        m.lost = sum(r.lost for r in self._receivers.values()) + sum(s.lost for _, s, _ in self._senders)
        m.unprotected = sum(s.unprotected for _, s, _ in self._senders)


# --- process entry point ---------------------------------------------------------------------

class NodeConfig(msgspec.Struct):
    """What a node process needs, written as JSON by the launcher."""
    name: str
    use: str
    params: dict[str, Any]
    wiring: Wiring
    log_level: str = "INFO"
    metrics_path: str | None = None
    parent_pid: int | None = None
    keys_dir: str | None = None    # CURVE keys (`omniflow keys generate`); secrets stay in that dir
    trace_path: str | None = None  # append sampled received-frame stamps here (omniflow run --trace)
    trace_every: int = 1           # trace one frame in N per edge (plus each turn's first and last)
    record: dict[str, str] = {}    # input edge id -> file: record every frame received on it
    threads: int | None = None     # CPU threads for torch/OpenMP/MKL (graph key `threads`)
    restarted: int = 0             # instances of this node that ran before this one (restarts)
    # every frame kind the launcher knew (its node classes registered theirs), so this process
    # decodes them whatever modules it imports itself
    kinds: dict[str, str] = msgspec.field(default_factory=lambda: dict(KINDS))
    # directories the launcher's graphs import their `use:` modules from (graph.GRAPH_DIRS)
    sys_path: list[str] = msgspec.field(default_factory=lambda: list(GRAPH_DIRS))


THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Idle OpenMP threads sleep instead of spinning (unless the user's environment says otherwise):
# a node's spinning threads take the cores the other nodes' math needs.
WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")


def thread_env(threads: int | None) -> dict[str, str]:
    """Environment variables for a not-yet-started node process: its math libraries' threads
    capped at `threads`, and passive OpenMP waiting (read when torch / numpy's BLAS load, so
    they must be set before)."""
    env = {} if threads is None else {var: str(threads) for var in THREAD_ENV_VARS}
    if WAIT_POLICY[0] not in os.environ:
        env[WAIT_POLICY[0]] = WAIT_POLICY[1]
    return env


def apply_threads(threads: int | None) -> None:
    """Cap torch's intra-op threads in this process. torch is not imported for this (seconds):
    a node that loads it later reads the OMP_NUM_THREADS its launcher set instead."""
    if threads is None:
        return
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def build_taps(cfg: NodeConfig) -> list[Tap]:
    """The observers a run asked for in `cfg`; none (and nothing imported) by default."""
    taps: list[Tap] = []
    if cfg.trace_path:
        from .trace import TraceTap
        taps.append(TraceTap(cfg.trace_path, cfg.name, every=cfg.trace_every))
    mine = {link.id for link in cfg.wiring.inputs}
    recorded = {edge: path for edge, path in cfg.record.items() if edge in mine}
    if recorded:
        from .record import RecordTap
        taps.append(RecordTap(recorded))
    return taps


def build_node(name: str, use: str, params: dict[str, Any]) -> Node:
    from .graph import import_class
    cls = import_class(use)
    return cls(msgspec.convert(params, cls.Params), name=name)


def run_config(cfg: NodeConfig, *, context: zmq.Context | None = None, curve: Curve | None = None,
               parent_pid: int | None = None,
               started: Callable[[NodeRuntime], None] | None = None) -> tuple[int, str]:
    """Build the node `cfg` describes and host it until it ends -> (exit code, error line for the
    launcher's message, '' when it ended well). The one place that maps how a node ended to an
    exit code, for node processes (`main`) and node threads (launch.local.ThreadWorker).
    `curve` defaults to the keys in `cfg.keys_dir`; `parent_pid` is the launcher a node process
    watches (a node thread has none: its parent is its own process); `started` sees the runtime
    before it runs."""
    log = logging.getLogger(f"omniflow.{cfg.name}")
    try:
        for kind, doc in cfg.kinds.items():
            register_kind(kind, doc)
        for folder in cfg.sys_path:
            if folder not in sys.path:
                sys.path.append(folder)
        if curve is None and cfg.keys_dir:
            curve = Curve.load(cfg.keys_dir)
        runtime = NodeRuntime(build_node(cfg.name, cfg.use, cfg.params), cfg.wiring, context=context,
                              parent_pid=parent_pid, curve=curve, taps=build_taps(cfg),
                              threads=cfg.threads, restarted=cfg.restarted)
        if cfg.metrics_path:                            # the launcher reads and prints them
            runtime.metrics_level = logging.DEBUG
        if started is not None:
            started(runtime)
        runtime.run()
        return EXIT_OK, ""
    except KeyboardInterrupt:
        return EXIT_OK, ""                              # stopped by the launcher or Ctrl-C
    except SetupError as e:
        # an expected failure (a missing file, unreadable audio, no weights, a missing package)
        # is its one-line message; anything else brings its traceback
        expected = isinstance(e.__cause__, EXPECTED_ERRORS)
        log.error("%s", e, exc_info=None if expected else e.__cause__)
        if expected:
            log.debug("the traceback of that setup failure", exc_info=e.__cause__)
        return EXIT_SETUP_FAILED, f"ERROR {e}"
    except Exception as e:
        log.exception("node '%s' failed", cfg.name)
        return EXIT_FAILED, f"ERROR {e!r}"


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the launcher dies, so no node outlives it."""
    try:
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass                                            # elsewhere the heartbeat check does it


def _ignore(signum, _frame):
    pass                            # (SIG_IGN would print a warning for an already pending signal)


def interrupt_once(signum, _frame):
    """Signal handler for SIGTERM/SIGINT (node processes and `omniflow run`): the first one stops
    (raises KeyboardInterrupt: the loop unwinds, tears down, writes metrics). Later ones (Ctrl-C
    reaches us and the launcher's SIGTERM follows) must not cut that cleanup short."""
    signal.signal(signal.SIGTERM, _ignore)
    signal.signal(signal.SIGINT, _ignore)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m omniflow.runtime NODE_CONFIG.json", file=sys.stderr)
        return 2
    cfg = msgspec.json.decode(Path(argv[0]).read_bytes(), type=NodeConfig)
    os.environ.update(thread_env(cfg.threads))         # before torch loads (e.g. another launcher)
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    _die_with_parent()
    signal.signal(signal.SIGTERM, interrupt_once)
    signal.signal(signal.SIGINT, interrupt_once)       # Ctrl-C, even if started ignoring it
    faulthandler.register(signal.SIGUSR1)              # `kill -USR1 PID` prints where a node is stuck
    if cfg.parent_pid is not None and os.getppid() != cfg.parent_pid:
        return EXIT_FAILED                              # the launcher died before we started
    hosted: list[NodeRuntime] = []
    try:
        return run_config(cfg, parent_pid=cfg.parent_pid, started=hosted.append)[0]
    finally:
        if hosted and cfg.metrics_path:
            Path(cfg.metrics_path).write_bytes(msgspec.json.encode(hosted[0].metrics))

if __name__ == "__main__":
    sys.exit(main())
