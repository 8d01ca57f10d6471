"""Helper nodes for the runtime tests (no tests here): they run inside real node processes."""
from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec
import numpy as np

from omniflow import CONTROL, Frame, Node
from omniflow.node import InputError


class Relay(Node):
    """Forward every frame unchanged; append each reset's session to `reset_log` if given."""
    inputs = {"in": "any"}
    outputs = {"out": "any"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        reset_log: str = ""

    def process(self, port, frame):
        yield "out", frame

    def reset(self, session, turn):
        if self.params.reset_log:
            with open(self.params.reset_log, "a") as f:
                f.write(f"{session}:{turn}\n")
        return ()


class TurnSource(Node):
    """Session "s": `n` frames of turn 0; after `pause_s` (they have arrived everywhere) it
    announces turn 1 on the control channel, waits `pause_s` again, then sends `n` stale frames
    of turn 0 and `n` frames of turn 1."""
    outputs = {"out": "any"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        n: int = 5
        pause_s: float = 0.5
        start_s: float = 0.5        # let the other nodes join the control channel first
        announce_late: bool = False  # send turn 1's frames first, its control frame after them

    def setup(self):
        n, pause = self.params.n, ("sleep", self.params.pause_s)
        self.plan = [("sleep", self.params.start_s)] + [("data", 0, i) for i in range(n)] + [pause]
        if self.params.announce_late:
            self.plan += [("data", 1, i) for i in range(n)] + [pause, ("turn", 1), pause]
        else:
            self.plan += [("turn", 1), pause] + [("data", 0, n + i) for i in range(n)] \
                + [("data", 1, i) for i in range(n)]

    def has_work(self):
        return bool(self.plan)

    def step(self):
        action = self.plan.pop(0)
        if action[0] == "sleep":
            time.sleep(action[1])
        elif action[0] == "turn":
            yield CONTROL, Frame(kind="control", session="s", turn=action[1], meta={"op": "turn"})
        else:
            _, turn, seq = action
            yield "out", Frame(kind="pcm", session="s", turn=turn, seq=seq,
                               data=np.full(4, seq, np.float32), meta={"rate": 16000})


class Recorder(Node):
    """Append every received frame (and every reset) as one JSON line to `path`."""
    inputs = {"in": "any"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        path: str
        delay_s: float = 0.0        # seconds spent on each frame: a slow consumer

    def setup(self):
        self.file = open(self.params.path, "a")

    def _write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def process(self, port, frame):
        time.sleep(self.params.delay_s)
        self._write({"kind": frame.kind, "session": frame.session, "turn": frame.turn,
                     "seq": frame.seq, "last": frame.last, "meta": frame.meta})
        return ()

    def reset(self, session, turn):
        self._write({"reset": session, "turn": turn, "by": self.name})
        return ()

    def teardown(self):
        self.file.close()


class BrokenSetup(Node):
    outputs = {"out": "any"}

    def setup(self):
        raise RuntimeError("the model file is corrupt (a test failure on purpose)")


class LoopClient(Node):
    """Sends `n` frames out and counts those that come back on a feedback edge."""
    inputs = {"back": "any"}
    outputs = {"out": "any"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        path: str
        n: int = 100

    def setup(self):
        self.sent, self.back = 0, []

    def has_work(self):
        return self.sent < self.params.n

    def step(self):
        yield "out", Frame(kind="pcm", seq=self.sent, data=np.zeros(2, np.float32))
        self.sent += 1

    def process(self, port, frame):
        self.back.append(frame.seq)
        return ()

    def teardown(self):
        with open(self.params.path, "w") as f:
            json.dump(self.back, f)


class Stopper(Node):
    """Serves forever, but asks the whole graph to stop after `after_s`."""
    outputs = {"out": "any"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        after_s: float = 0.3

    def setup(self):
        self.start = time.monotonic()

    def has_work(self):
        return True

    def step(self):
        time.sleep(0.01)
        if time.monotonic() - self.start > self.params.after_s:
            yield CONTROL, Frame(kind="control", meta={"op": "stop"})

class TurnlessRecorder(Recorder):
    """A Recorder whose input has no turns (like the VAD's pcm stream): it keeps every frame."""
    drop_old_turns = False


class ThreadsReporter(Node):
    """Loads torch in setup(), then writes the intra-op threads it computes with to `path`, and ends."""

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        path: str

    def setup(self):
        import torch  # noqa: F401  (as a model node would)

    def finish(self):
        import torch
        Path(self.params.path).write_text(str(torch.get_num_threads()))
        return None


class SlowSetupRecorder(Recorder):
    """A Recorder whose setup() takes `setup_s` (as a weight load does). Its first line says when
    setup ended; each frame's line carries the frame's stamps (when each hop sent it)."""

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        path: str
        delay_s: float = 0.0
        setup_s: float = 0.0

    def setup(self):
        time.sleep(self.params.setup_s)
        super().setup()
        self._write({"setup_done_ns": time.monotonic_ns()})

    def process(self, port, frame):
        self._write({"seq": frame.seq, "stamps": frame.stamps})
        return ()


class HeavyThreadsReporter(ThreadsReporter):
    """A ThreadsReporter that declares heavy math: the CPU plan gives it a share of the cores."""
    cpu_weight = 1


class RefuseLong(Node):
    """Forwards text frames; refuses (InputError) those longer than `max_chars`."""
    inputs = {"text": "text"}
    outputs = {"text": "text"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        max_chars: int = 10

    def process(self, port, frame):
        if len(frame.meta["text"]) > self.params.max_chars:
            raise InputError(f"a prompt of {len(frame.meta['text'])} characters; at most {self.params.max_chars}")
        yield "text", frame
