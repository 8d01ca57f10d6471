"""Run a node with no sockets: a node's unit test is a few lines.

    out = run_node(Gain({"db": 6}), [Frame(kind="pcm", data=x)])
    assert np.allclose(out.on("audio")[0].data, 2 * x, rtol=1e-3)

Every frame crosses `frame.encode`/`frame.decode` on its way in and out (as it would between
processes), so a node that emits something that cannot travel fails here, not in production.
"""
from __future__ import annotations

from typing import Iterable

from .frame import Frame, decode, encode
from .node import CONTROL, Node, Output, drain
from .turns import TurnAuthority, TurnGate


class Outputs(list):
    """List of (port, frame) pairs in emission order, with helpers to select by port;
    `announced`: the turn announcements the node's control frames caused."""

    announced: list[Frame]

    def on(self, port: str) -> list[Frame]:
        return [f for p, f in self if p == port]

    def frames(self) -> list[Frame]:
        return [f for _, f in self]


def _wire(frame: Frame) -> Frame:
    return decode([bytes(p) for p in encode(frame)])


def run_node(node: Node, frames: Iterable[Frame | Output] = (), *, port: str | None = None,
             setup: bool = True, finish: bool = True, wire: bool = True,
             max_steps: int = 1_000_000) -> Outputs:
    """Feed `frames` to `node` (to `port`, or the node's only input), run its self-driven
    work until idle, then signal end of stream. Returns everything it emitted.

    An item may be a Frame (sent to `port`) or a (port, Frame) pair. Turns work as in the runtime,
    through the same `TurnGate` (omniflow/turns.py): a control frame item is an announcement of
    the bus (e.g. {"op": "turn"}, turn N: the node resets that session and frames of older turns
    are dropped); what the node sends on the control channel goes to a `TurnAuthority` playing the
    bus, and its announcements come back to the node (`Outputs.announced` lists them). A call that
    raises while handling a frame yields an "error" frame, as in the runtime.
    """
    out = Outputs()
    out.announced = []
    gate, authority = TurnGate(node), TurnAuthority()

    def collect(results: Iterable[Output] | None) -> None:
        for p, f in drain(results):
            if p != CONTROL and p not in node.outputs:
                raise KeyError(f"{type(node).__name__} emitted on undeclared port {p!r}; "
                               f"declared: {sorted(node.outputs)}")
            f = _wire(f) if wire else f
            out.append((p, f))
            if p == CONTROL:
                gate.outgoing(f)
                announcement = authority.handle(f)
                if announcement is not None:
                    out.announced.append(announcement)
                    collect(gate.announce(announcement))

    def run_steps() -> None:
        for _ in range(max_steps):
            if not node.has_work():
                return
            collect(node.step())
        raise RuntimeError(f"{type(node).__name__} still has work after {max_steps} steps")

    if setup:
        node.setup()
    default_port = port or (next(iter(node.inputs)) if len(node.inputs) == 1 else None)
    for item in frames:
        p, f = item if isinstance(item, tuple) else (default_port, item)
        f = _wire(f) if wire else f
        if f.kind == "control":
            if f.meta.get("op") == "turn":
                authority.handle(f)              # the bus's numbering goes on from this turn
            collect(gate.announce(f))
            continue
        if p is None:
            raise ValueError(f"{type(node).__name__} has inputs {sorted(node.inputs)}: "
                             "pass (port, frame) pairs or port=")
        if p not in node.inputs:
            raise KeyError(f"{type(node).__name__} has no input port {p!r}; "
                           f"declared: {sorted(node.inputs)}")
        collect(gate.deliver(p, f))
        run_steps()
    run_steps()
    if finish:
        collect(node.finish())
        run_steps()
    return out
