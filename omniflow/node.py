"""Node: the unit of computation in a graph.

A node declares its ports and parameters and implements a few methods. It never touches sockets:
the same object runs in-process (`omniflow.testing.run_node`), in its own process, or on another
machine (`omniflow.runtime`).

    class Gain(Node):
        inputs = {"audio": "pcm"}
        outputs = {"audio": "pcm"}

        class Params(msgspec.Struct, forbid_unknown_fields=True):
            db: float = 0.0

        def process(self, port, frame):
            yield "audio", frame.follow("pcm", frame.data * 10 ** (self.params.db / 20), meta=frame.meta)
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Iterable, Iterator

import msgspec

from .frame import Frame

Output = tuple[str, Frame]          # (output port, frame)
CONTROL = "$control"                # yield (CONTROL, frame) to broadcast on the control channel


class InputError(ValueError):
    """A user's input the node cannot take (too long, wrong shape, a task the input cannot do).
    Raised from `process`, it reaches that user as an error (omniflow/turns.py) and is logged as
    one line, without a traceback: the node is fine, the input was not."""


class NoParams(msgspec.Struct, forbid_unknown_fields=True):
    pass


class Node:
    inputs: ClassVar[dict[str, str]] = {}      # port name -> frame kind (see frame.KINDS)
    outputs: ClassVar[dict[str, str]] = {}
    Params: ClassVar[type] = NoParams          # msgspec Struct; validated from the graph's params
    # Barge-in: the runtime drops input frames of a session's older turns before `process` (the
    # turn gate, omniflow/turns.py). A node whose input has no turns (the VAD hearing a
    # microphone's stream, where turns begin) sets this False.
    drop_old_turns: ClassVar[bool] = True
    # Input ports whose frames are events of the session (the VAD's speech started / stopped), not
    # data of one turn: the gate never drops them as an older turn's and never starts a turn from
    # them (a speech-started event says a new turn is coming; the bus may announce it first).
    event_ports: ClassVar[frozenset[str]] = frozenset()
    # The run's CURVE keys (omniflow.security.Curve) under `omniflow run --keys`, set by the runtime
    # before setup(): a node that opens tcp sockets of its own secures them with them
    # (security.secure_bind), so no tcp endpoint of a keyed run is open to anyone.
    curve: Any = None
    # CPU plan (omniflow.launch.plan): the node's share of the cores when its graph sets no
    # `threads:`. 0: light (I/O, bookkeeping), 1 thread. A node whose math is heavy (an encoder, a
    # decoder, a vocoder) declares a weight; the launcher splits the cores among those nodes.
    cpu_weight: ClassVar[int] = 0
    # A node that serves clients over the network names the params that hold its listening address,
    # (host param, port param). `omniflow export k8s` then exposes that port on a Service, binds the
    # host to 0.0.0.0 inside the pod, probes readiness at GET /healthz on it, and runs every node of
    # the graph as a Deployment (a server's graph runs until it is stopped).
    listen: ClassVar[tuple[str, str] | None] = None

    def __init__(self, params: Any = None, name: str | None = None):
        if params is None:
            params = self.Params()
        elif isinstance(params, dict):
            params = msgspec.convert(params, self.Params)
        self.params = params
        self.name = name or type(self).__name__.lower()
        self.log = logging.getLogger(f"omniflow.{self.name}")

    # --- lifecycle -----------------------------------------------------------------------
    def setup(self) -> None:
        """Load weights, open devices. Runs once, in the process that hosts the node."""

    def process(self, port: str, frame: Frame) -> Iterable[Output]:
        """Handle one input frame; yield (output port, frame) pairs."""
        return ()

    def has_work(self) -> bool:
        """True while `step()` should be called without waiting for input (sources, decoders)."""
        return False

    def step(self) -> Iterable[Output]:
        """Do one unit of self-driven work (read a chunk, run one batched decode step)."""
        return ()

    def reset(self, session: str, turn: int) -> Iterable[Output]:
        """`session`'s turn `turn` began (the control bus announced it: a barge-in, a typed prompt,
        the end of the session): forget what belongs to its older turns."""
        return ()

    def granted(self, session: str, turn: int, ref: str) -> Iterable[Output]:
        """The turn this node asked for with `omniflow.turns.ask_turn` (its `ref`) is `turn`; it
        is called right after `reset(session, turn)`."""
        return ()

    def end(self, session: str) -> Iterable[Output]:
        """`session` is over (its client left, or it was idle too long): free everything kept for
        it. Called after `reset`."""
        return ()

    def failed(self, error: Frame) -> Iterable[Output]:
        """An "error" frame arrived (this session's turn failed upstream, or here): by default it
        goes on downstream on every output, so it reaches whoever tells the user (the gateway)."""
        for port in self.outputs:
            yield port, error.follow("error", meta=dict(error.meta), last=True)

    def stats(self) -> dict[str, float]:
        """Numbers this node reports with each heartbeat (e.g. the backbone's decode steps and their
        time); they reach /metrics through the control bus's health frames."""
        return {}

    def run_status(self, health: dict[str, Any]) -> None:
        """The run's health, about once a second (omniflow.launch.bus: every node's up/age/restarts/
        metrics/stats). Most nodes ignore it; the gateway serves it as /healthz and /metrics."""

    def finish(self) -> Iterable[Output]:
        """All inputs reached end of stream: flush what is buffered."""
        return ()

    def teardown(self) -> None:
        """Release resources. Runs once when the node stops."""


def drain(outputs: Iterable[Output] | None) -> Iterator[Output]:
    """Iterate a node method's result, accepting None for methods written as plain functions."""
    if outputs is None:
        return iter(())
    return iter(outputs)
