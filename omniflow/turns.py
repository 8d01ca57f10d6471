"""Turns: one authority numbers every session's turns; one gate applies them in every node.

A turn is one question and its answer. Whoever starts one (the VAD hearing speech, the gateway
getting a typed prompt, a text source reading its next line) never counts turns itself: it asks
the authority, which lives in the control bus (omniflow/launch/bus.py), and every node learns the
number from the bus's announcement. Control frames (kind "control", session S):

    {"op": "next_turn", "reason": R, "ref": REF}   a node asks for S's next turn (`ask_turn`)
    {"op": "turn", "reason": R, "ref": REF}, N     the bus: S is now at turn N (to every node)
    {"op": "end_session"}                          a node says S is over (the client left)
    {"op": "end", "reason": R}, N                  the bus: S ended at turn N; forget it

A node may also send {"op": "turn"} with a turn number of its own (a claim: tests and replays of
one recorded session); the authority announces it only if it is newer than S's latest turn.

`TurnGate` is what the runtime (omniflow/runtime.py) and `omniflow.testing.run_node` both use, so
a node behaves the same in a test and in production:

* an announcement of a newer turn calls `node.reset(S, N)`; if this node asked for that turn
  (its ref), `node.granted(S, N, ref)` follows; an "end" calls `reset` and then `node.end(S)`;
* a data frame of an older turn of S is dropped on arrival (unless the node sets
  `drop_old_turns = False`); a data frame of a newer turn starts that turn at once, as if its
  announcement had come first (data takes one hop, control two);
* frames on the node's `event_ports` (events of the session, not one turn's data) are neither
  dropped as old nor start a turn;
* frames of a session that ended are dropped. The authority also ends every session that asked
  for nothing for `SESSION_IDLE_S` (reason "idle": its client vanished without a word), so no
  node's per-session map grows without bound; an idle-ended session that speaks again goes on
  with its next turn number.
"""
from __future__ import annotations

import collections
import time
import uuid
from typing import Callable

from .frame import Frame
from .node import CONTROL, InputError, Node, Output, drain

SESSION_IDLE_S = 600.0       # a session that sent nothing for 10 minutes is over
ENDED_KEPT = 4096            # ended sessions remembered, so their late frames are dropped, not revived
REQUEST_OPS = ("next_turn", "end_session", "turn")      # what a node sends to the authority
ANNOUNCE_OPS = ("turn", "end")                          # what the authority sends to every node
GRANT_RETRY_S = 2.0          # s: a turn request unanswered this long is sent again (same ref: same turn)
IDLE = "idle"                # the reason of an "end" the authority decided (no word for SESSION_IDLE_S)


def ask_turn(session: str, reason: str, ref: str | None = None,
             after: int | None = None) -> tuple[str, Output]:
    """(ref, output) for a node that starts a new turn of `session`: yield the output; the turn
    number comes back as `granted(session, turn, ref)`. Asking again with the same `ref` (no
    answer came: the request or its announcement was lost) gets the same turn announced again,
    never a second one. With `after`, only if turn `after` is still the session's latest (to end
    that turn, not a newer question asked meanwhile)."""
    ref = ref or uuid.uuid4().hex[:16]
    meta = {"op": "next_turn", "reason": reason, "ref": ref}
    if after is not None:
        meta["after"] = after
    return ref, (CONTROL, Frame(kind="control", session=session, meta=meta))


def end_session(session: str, reason: str = "disconnected") -> Output:
    """The output a node yields when `session` is over (its client left)."""
    return CONTROL, Frame(kind="control", session=session, meta={"op": "end_session", "reason": reason})


class Bounded(collections.OrderedDict):
    """An ordered map that forgets its oldest entries beyond `size`."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def add(self, key, value=True) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class TurnAuthority:
    """Allocates turn numbers per session (the control bus hosts one; `run_node` and a runtime with
    no bus host their own). `handle(request)` -> the announcement to broadcast, or None."""

    def __init__(self, idle_s: float = SESSION_IDLE_S, clock: Callable[[], float] = time.monotonic):
        self.idle_s, self.clock = idle_s, clock
        self.latest: dict[str, int] = {}          # session -> its latest announced turn
        self.seen: dict[str, float] = {}          # session -> when it last asked for anything
        self.ended = Bounded(ENDED_KEPT)         # session -> its final turn (it is over)
        self.idled = Bounded(ENDED_KEPT)         # session -> its final turn (it may come back)
        self.refs = Bounded(ENDED_KEPT)          # ref of a granted next_turn -> (session, turn)

    def sessions(self) -> int:
        return len(self.latest)

    def handle(self, request: Frame) -> Frame | None:
        op, session = request.meta.get("op"), request.session
        if op not in REQUEST_OPS:
            return None
        if session in self.ended:
            return None                           # a late request of a session that is over
        latest = self.latest.get(session, self.idled.pop(session, -1))
        meta = {k: v for k, v in request.meta.items() if k in ("reason", "ref")}
        if op == "next_turn":
            ref = meta.get("ref")
            if isinstance(ref, str) and ref in self.refs:     # asked again: the same turn, if still current
                asked, turn = self.refs[ref]
                if asked != session or turn != latest:
                    return None
                return Frame(kind="control", session=session, turn=turn, meta={"op": "turn", **meta})
            after = request.meta.get("after")
            if isinstance(after, int) and after != latest:
                return None                       # "end turn `after`": it is over already
            turn = latest + 1
            if isinstance(ref, str):
                self.refs.add(ref, (session, turn))
        elif op == "turn":                        # a claim: only a newer turn is announced
            if request.turn <= latest:
                return None
            turn = request.turn
        else:                                     # end_session
            return self._end(session, latest + 1, meta.get("reason", "ended"))
        self.latest[session] = turn
        self.seen[session] = self.clock()
        return Frame(kind="control", session=session, turn=turn, meta={"op": "turn", **meta})

    def _end(self, session: str, turn: int, reason: str) -> Frame:
        self.latest.pop(session, None)
        self.seen.pop(session, None)
        (self.idled if reason == IDLE else self.ended).add(session, turn)
        return Frame(kind="control", session=session, turn=turn, meta={"op": "end", "reason": reason})

    def expire(self) -> list[Frame]:
        """End every session idle for longer than `idle_s`; their "end" announcements."""
        cutoff = self.clock() - self.idle_s
        idle = [s for s, t in self.seen.items() if t < cutoff]
        return [self._end(s, self.latest.get(s, -1) + 1, IDLE) for s in idle]


class TurnGate:
    """One node's view of every session's current turn: which input frames reach the node, when
    its `reset`/`granted`/`end` run, and what happens when one of its calls raises. Every method
    returns the node's outputs for the caller to send.

    A node call that raises while handling one session's frame (or announcement) is caught here:
    logged once with node, session and turn, and an "error" frame for that session's turn goes
    downstream (`Node.failed`), so the user who caused it hears why and everyone else goes on."""

    def __init__(self, node: Node):
        self.node = node
        self.current: dict[str, int] = {}        # session -> current turn
        self.asked: dict[str, str] = {}          # ref -> session, for turns this node asked for
        self.ended = Bounded(ENDED_KEPT)
        self.errored = Bounded(ENDED_KEPT)      # (session, turn) whose error frame went out
        self.dropped = 0                         # data frames of an older turn or an ended session
        self.turns = 0                           # (session, turn) pairs this node started
        self.failed_turns = 0                    # ... of which a call of this node raised

    def sessions(self) -> int:
        return len(self.current)

    # --- data --------------------------------------------------------------------------------
    def deliver(self, port: str, frame: Frame) -> list[Output]:
        """A data frame arrived on `port`: the node's outputs (nothing if it was dropped)."""
        if port in self.node.event_ports:
            ok, out = frame.session not in self.ended, []
            self.dropped += not ok
        else:
            ok, out = self.admit(frame)
        if not ok:
            return out
        if frame.kind == "error":
            return out + self._forward(frame)
        return out + self.call(frame.session, frame.turn, self.node.process, port, frame)

    def admit(self, frame: Frame) -> tuple[bool, list[Output]]:
        """(deliver `frame` to the node?, outputs of the reset it caused)."""
        session = frame.session
        if session in self.ended:
            self.dropped += 1
            return False, []
        current = self.current.get(session)
        if not self.node.drop_old_turns:
            if current is None:
                self.current[session] = frame.turn
                self.turns += 1
            return True, []
        if current is None:             # the session's first frame here: its turn starts now
            return True, self._start(session, frame.turn, None)
        if frame.turn < current:
            self.dropped += 1
            return False, []
        if frame.turn > current:
            return True, self._start(session, frame.turn, None)
        return True, []

    def call(self, session: str, turn: int, method, *args) -> list[Output]:
        """`method(*args)`'s outputs; if it raises, what it yielded so far plus the error frame."""
        out: list[Output] = []
        try:
            out.extend(drain(method(*args)))
        except Exception as e:               # one session's failure must not end the others
            out += self.fail(session, turn, e, method.__name__)
        return out

    def fail(self, session: str, turn: int, error: BaseException, where: str) -> list[Output]:
        """Log `error` (raised in the node's `where` for session/turn) and send the error frame."""
        name = self.node.name
        if (session, turn) not in self.errored:
            self.failed_turns += 1
            self.node.log.error("node '%s' failed in %s() for session %s turn %d: %s: %s. That turn "
                                "gets an error; other sessions go on", name, where, session, turn,
                                type(error).__name__, error,
                                exc_info=None if isinstance(error, InputError) else error)
        frame = Frame(kind="error", session=session, turn=turn, last=True,
                      meta={"error": f"{error}" or type(error).__name__, "node": name})
        return self._forward(frame)

    def _forward(self, error: Frame) -> list[Output]:
        key = (error.session, error.turn)
        if key in self.errored:
            return []                        # one error per turn per node (it may come on two inputs)
        self.errored.add(key)
        try:
            return list(drain(self.node.failed(error)))
        except Exception:
            self.node.log.exception("node '%s' failed handling an error frame", self.node.name)
            return []

    # --- control -----------------------------------------------------------------------------
    def outgoing(self, frame: Frame) -> None:
        """A control frame this node sends: remember the turns it asks for."""
        ref = frame.meta.get("ref")
        if frame.meta.get("op") == "next_turn" and isinstance(ref, str):
            self.asked[ref] = frame.session

    def announce(self, frame: Frame) -> list[Output]:
        """Apply an announcement of the authority (op "turn" or "end")."""
        op, session = frame.meta.get("op"), frame.session
        if op == "end":
            return self._end(session, frame.turn, forever=frame.meta.get("reason") != IDLE)
        if op != "turn" or session in self.ended:
            return []
        ref = frame.meta.get("ref")
        mine = isinstance(ref, str) and self.asked.pop(ref, None) == session
        if frame.turn <= self.current.get(session, -1):
            if mine:        # our turn's data came back before its announcement (a loop): still ours
                return self.call(session, frame.turn, self.node.granted, session, frame.turn, ref)
            return []
        return self._start(session, frame.turn, ref if mine else None)

    def _start(self, session: str, turn: int, ref: str | None) -> list[Output]:
        self.current[session] = turn
        self.turns += 1
        out = self.call(session, turn, self.node.reset, session, turn)
        if ref is not None:
            out += self.call(session, turn, self.node.granted, session, turn, ref)
        return out

    def _end(self, session: str, turn: int, forever: bool) -> list[Output]:
        known = session in self.current
        self.current.pop(session, None)
        for ref in [r for r, s in self.asked.items() if s == session]:
            del self.asked[ref]
        if session in self.ended:
            return []
        if forever:
            self.ended.add(session, turn)
        out = self.call(session, turn, self.node.reset, session, turn) if known else []
        return out + self.call(session, turn, self.node.end, session)
