"""Replay: a source that re-emits the frames of a recording (`omniflow run --record EDGE=FILE`).

    replay:   {use: nodes.replay:Replay, params: {path: out/question.omnirec, realtime: false}}
    backbone: {use: nodes.backbone:Backbone, inputs: {embeds: replay/frames}}

Each frame goes out with its recorded kind, session, turn, seq, `last`, meta and payload, so the
consumer sees what it saw in the recorded run (graphs/replay_backbone.yaml feeds a captured
utterance to the backbone without microphone, VAD or whisper). Stamps start afresh: the recorded
run's clock means nothing to this run's trace. `realtime: true` keeps the recorded spacing
between frames (divided by `speed`); otherwise frames go as fast as the graph takes them.
"""
from __future__ import annotations

import time

import msgspec

from omniflow import Frame, Node
from omniflow.record import Recording

NS_PER_S = 1_000_000_000


class Replay(Node):
    outputs = {"frames": "any"}      # the recorded kind: connect it to an input of that kind

    class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        path: str
        realtime: bool = False       # keep the recorded timing between frames
        speed: float = 1.0           # with realtime: 2.0 replays twice as fast

    def setup(self) -> None:
        if self.params.speed <= 0:
            raise ValueError(f"speed must be > 0, got {self.params.speed}. Fix: 1.0 is the "
                             "recorded pace, 2.0 twice as fast")
        self.recording = Recording(self.params.path)
        self.frames = iter(self.recording)
        self.next = next(self.frames, None)
        if self.next is None:
            self.log.warning("recording %s holds no frames", self.params.path)
        self.first_ns = self.next.t_ns if self.next is not None else 0
        self.started_ns: int | None = None     # the first step's time (sources start at graph ready)

    def teardown(self) -> None:
        if hasattr(self, "frames"):
            self.frames.close()          # the reader holds the file open until exhausted

    def has_work(self) -> bool:
        return self.next is not None

    def step(self):
        t_ns, recorded = self.next
        if self.started_ns is None:
            self.started_ns = time.monotonic_ns()
        if self.params.realtime:     # frame k is due at its recorded offset / speed
            due = self.started_ns + (t_ns - self.first_ns) / self.params.speed
            time.sleep(max(0.0, (due - time.monotonic_ns()) / NS_PER_S))
        self.next = next(self.frames, None)
        yield "frames", Frame(kind=recorded.kind, session=recorded.session, turn=recorded.turn,
                              seq=recorded.seq, last=recorded.last, meta=recorded.meta,
                              data=recorded.data)
