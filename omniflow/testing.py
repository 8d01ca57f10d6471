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


class Outputs(list):
    """List of (port, frame) pairs in emission order, with helpers to select by port."""

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

    An item may be a Frame (sent to `port`) or a (port, Frame) pair. A control frame
    (kind "control", meta {"op": "turn"}) is applied as the runtime would: the node resets
    that session and frames of older turns are dropped.
    """
    out = Outputs()
    current_turn: dict[str, int] = {}

    def collect(results: Iterable[Output] | None) -> None:
        for p, f in drain(results):
            if p != CONTROL and p not in node.outputs:
                raise KeyError(f"{type(node).__name__} emitted on undeclared port {p!r}; "
                               f"declared: {sorted(node.outputs)}")
            f = _wire(f) if wire else f
            if p == CONTROL:
                apply_control(f)
            out.append((p, f))

    def apply_control(f: Frame) -> None:
        if f.meta.get("op") == "turn" and f.turn > current_turn.get(f.session, -1):
            current_turn[f.session] = f.turn
            collect(node.reset(f.session))

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
        if f.kind == "control":
            apply_control(_wire(f) if wire else f)
            continue
        if p is None:
            raise ValueError(f"{type(node).__name__} has inputs {sorted(node.inputs)}: "
                             "pass (port, frame) pairs or port=")
        if p not in node.inputs:
            raise KeyError(f"{type(node).__name__} has no input port {p!r}; "
                           f"declared: {sorted(node.inputs)}")
        if node.drop_old_turns and f.turn < current_turn.get(f.session, -1):
            continue                     # an older turn of this session: dropped on arrival
        collect(node.process(p, _wire(f) if wire else f))
        run_steps()
    run_steps()
    if finish:
        collect(node.finish())
        run_steps()
    return out
