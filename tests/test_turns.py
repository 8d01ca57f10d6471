"""The turn authority (numbers per session, ends, idle expiry) and the turn gate (what a node sees),
which the runtime and `run_node` share."""
from __future__ import annotations

import numpy as np

from omniflow.frame import Frame
from omniflow.node import CONTROL, InputError, Node
from omniflow.testing import run_node
from omniflow.turns import IDLE, TurnAuthority, TurnGate, ask_turn, end_session


def announce(authority, request):
    """The authority's answer to a request: a Frame, an output (CONTROL, Frame) or ask_turn's (ref, output)."""
    while isinstance(request, tuple):
        request = request[1]
    return authority.handle(request)


def test_the_authority_numbers_each_sessions_turns_and_forgets_ended_ones():
    clock = [0.0]
    auth = TurnAuthority(idle_s=10, clock=lambda: clock[0])
    a0 = announce(auth, ask_turn("a", "speech"))
    a1 = announce(auth, ask_turn("a", "typed"))
    b0 = announce(auth, ask_turn("b", "typed"))
    assert [(f.session, f.turn, f.meta["op"], f.meta["reason"]) for f in (a0, a1, b0)] == [
        ("a", 0, "turn", "speech"), ("a", 1, "turn", "typed"), ("b", 0, "turn", "typed")]
    assert announce(auth, Frame(kind="control", session="a", turn=1, meta={"op": "turn"})) is None  # old claim
    assert announce(auth, Frame(kind="control", session="a", turn=5, meta={"op": "turn"})).turn == 5
    end = announce(auth, end_session("a"))
    assert (end.meta["op"], end.turn) == ("end", 6) and auth.sessions() == 1
    assert announce(auth, ask_turn("a", "speech")) is None          # a late request of an ended session
    clock[0] = 11.0                                                  # b said nothing for 11 s
    [idle] = auth.expire()
    assert (idle.session, idle.meta["reason"], auth.sessions()) == ("b", IDLE, 0)
    assert announce(auth, ask_turn("b", "speech")).turn == 2         # back after idling: numbering goes on


class Log(Node):
    inputs = {"in": "any"}
    outputs = {"out": "any"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def process(self, port, frame):
        if frame.meta.get("boom"):
            raise InputError("too long")
        self.calls.append(("process", frame.session, frame.turn))
        yield "out", frame

    def reset(self, session, turn):
        self.calls.append(("reset", session, turn))
        return ()

    def granted(self, session, turn, ref):
        self.calls.append(("granted", session, turn))
        return ()

    def end(self, session):
        self.calls.append(("end", session))
        return ()


def data(session, turn, **meta):
    return Frame(kind="pcm", session=session, turn=turn, data=np.zeros(2, np.float32), meta=meta)


def test_the_gate_drops_old_turns_starts_new_ones_and_ends_sessions():
    node = Log()
    gate = TurnGate(node)
    gate.deliver("in", data("s", 0))
    gate.announce(Frame(kind="control", session="s", turn=2, meta={"op": "turn"}))
    assert gate.deliver("in", data("s", 1)) == [] and gate.dropped == 1          # an older turn
    gate.deliver("in", data("s", 3))                                              # data outran its turn
    gate.announce(Frame(kind="control", session="s", turn=3, meta={"op": "turn"}))  # (ignored: not newer)
    ref, request = ask_turn("s", "x")
    gate.outgoing(request[1])
    gate.announce(Frame(kind="control", session="s", turn=4, meta={"op": "turn", "ref": ref}))
    gate.announce(Frame(kind="control", session="s", turn=5, meta={"op": "end"}))
    assert gate.deliver("in", data("s", 6)) == [] and gate.sessions() == 0      # ended: not revived
    assert node.calls == [("reset", "s", 0), ("process", "s", 0), ("reset", "s", 2), ("reset", "s", 3),
                          ("process", "s", 3), ("reset", "s", 4), ("granted", "s", 4), ("reset", "s", 5),
                          ("end", "s")]


class Events(Log):
    inputs = {"in": "any", "events": "any"}
    event_ports = frozenset({"events"})


def test_event_ports_are_neither_dropped_as_old_nor_start_a_turn():
    # the VAD's speech-started event carries the pcm's turn; the bus may announce the new turn first
    node = Events()
    gate = TurnGate(node)
    gate.announce(Frame(kind="control", session="s", turn=1, meta={"op": "turn"}))
    gate.deliver("events", data("s", 0))                       # older than the turn announced: kept
    gate.deliver("events", data("s", 2))                       # newer: no reset
    assert gate.deliver("in", data("s", 0)) == [] and gate.dropped == 1       # data of turn 0: dropped
    gate.announce(Frame(kind="control", session="s", turn=3, meta={"op": "end"}))
    assert gate.deliver("events", data("s", 3)) == [] and gate.dropped == 2   # ended: dropped
    assert node.calls == [("reset", "s", 1), ("process", "s", 0), ("process", "s", 2),
                          ("reset", "s", 3), ("end", "s")]


def test_a_failing_frame_gives_its_turn_one_error_frame_and_the_node_goes_on():
    node = Log()
    out = run_node(node, [data("bad", 3, boom=True), data("bad", 3, boom=True), data("ok", 0)])
    errors = [f for f in out.on("out") if f.kind == "error"]
    assert [(f.session, f.turn, f.last, f.meta["error"]) for f in errors] == [("bad", 3, True, "too long")]
    assert ("process", "ok", 0) in node.calls


def test_run_node_resets_on_a_newer_turns_data_as_the_runtime_does():
    node = Log()
    run_node(node, [data("s", 0), data("s", 1), data("s", 0)])
    assert node.calls == [("reset", "s", 0), ("process", "s", 0), ("reset", "s", 1), ("process", "s", 1)]


class Asker(Node):
    """Asks for a turn per input frame and emits it with the granted number."""
    inputs = {"in": "any"}
    outputs = {"out": "any"}

    def setup(self):
        self.waiting = {}

    def process(self, port, frame):
        ref, request = ask_turn(frame.session, "test")
        self.waiting[ref] = frame
        yield request

    def granted(self, session, turn, ref):
        frame = self.waiting.pop(ref)
        yield "out", Frame(kind="text", session=session, turn=turn, meta={"text": "x"})


def test_run_node_plays_the_bus_for_a_node_that_asks_for_turns():
    out = run_node(Asker(), [data("a", 0), data("a", 0), data("b", 0)])
    assert [(f.session, f.turn) for f in out.on("out")] == [("a", 0), ("a", 1), ("b", 0)]
    assert [p for p, _ in out].count(CONTROL) == 3 and len(out.announced) == 3


def test_asking_again_with_the_same_ref_gets_the_same_turn_never_a_second_one():
    auth = TurnAuthority()
    ref, request = ask_turn("a", "typed")
    first = announce(auth, request)
    again = announce(auth, ask_turn("a", "typed", ref))        # its answer was lost: ask again
    assert (first.turn, again.turn, again.meta["ref"]) == (0, 0, ref)
    assert announce(auth, ask_turn("a", "speech")).turn == 1   # numbering goes on from there
    assert announce(auth, ask_turn("a", "typed", ref)) is None  # a newer turn began: nothing to repeat


def test_a_turn_ended_with_after_starts_none_once_a_newer_question_came():
    auth = TurnAuthority()
    announce(auth, ask_turn("a", "typed"))                                  # turn 0, then it fails
    assert announce(auth, ask_turn("a", "failed", after=0)).turn == 1      # no node works on 0 now
    announce(auth, ask_turn("a", "speech"))                                 # turn 2: a new question
    assert announce(auth, ask_turn("a", "failed", after=1)) is None        # ... which it must not end
