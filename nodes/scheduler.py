"""SNAC delay scheduler: per-step tokens -> whole SNAC frames -> chunks for the vocoder.

The backbone emits, at every decode step, 7 raw audio ids (one per SNAC layer) and 1 text id.
Layer i of SNAC frame f comes out at step f + DELAYS[i] (REFERENCE.md §4.1), so a frame is only
complete MAX_DELAY steps after its first layer. This node owns that delay (`Undelayer`) and groups
the completed frames into chunks:

    first chunk   `first_chunk_frames` frames  (small: audio starts sooner)
    later chunks  as many frames as were already sent, up to `chunk_frames` (1, 1, 2, 4, 4, ...
                  with the defaults): a chunk never waits for more frames than the listener has
                  queued, so while decoding keeps real time the start of an answer has no gaps;
                  then `chunk_frames` (larger: fewer vocoder calls)
    last chunk    whatever is left when the turn ends (`last=True` or the model's end of audio):
                  the tail is always flushed, unlike the original, which drops up to 3 frames

The original (`run_AT_batch_stream`, stride 4) emits its first 4-frame chunk after 10 decode steps;
with `first_chunk_frames=1` the first chunk leaves after 7 steps (frame 0 completes at step 7).
Why 1 and not 2: the vocoder decodes every chunk with frames of left context and cross-fades it
into the next, so a 1-frame first chunk streams audio as close to a whole-utterance decode as a
2-frame one (README, Performance), and waiting for a second frame would cost one decode step of
latency.

A frame with any special id (>= 4096: pad, eoa, ...) is not a SNAC frame: it is dropped here and
counted (`meta["dropped"]` on the turn's last chunk), so specials never reach the vocoder.

A tokens frame without data (the backbone's end of a turn whose stop step is not part of the
answer) only ends the turn.

Output "codes": int64 (F, 7) raw codes, meta {"first_frame": index of the chunk's first frame
among this turn's emitted frames, "frames_total", "dropped"} (the last two on the last chunk).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import numpy as np

from omniflow.frame import Frame
from omniflow.model.delay import Undelayer, valid_frames
from omniflow.model.tokens import N_AUDIO_LAYERS
from omniflow.node import Node
from omniflow.params import Positive

EMPTY_CHUNK = np.zeros((0, N_AUDIO_LAYERS), dtype=np.int64)   # (0, 7)


@dataclass
class _Turn:
    """One session's scheduling state for its current turn."""

    turn: int
    undelayer: Undelayer = field(default_factory=Undelayer)
    pending: list[np.ndarray] = field(default_factory=list)    # completed frames not yet sent, (7,) each
    emitted: int = 0                                           # frames sent so far this turn
    dropped: int = 0                                           # frames with specials, never sent
    closed: bool = False                                       # last chunk sent: ignore the rest
    warned: bool = False                                       # a gap in its steps was logged (once)


class SnacScheduler(Node):
    inputs = {"tokens": "tokens"}
    outputs = {"codes": "codes"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        first_chunk_frames: Positive = 1    # 1 frame = 85.3 ms of audio; sent 7 steps after prefill
        chunk_frames: Positive = 4          # the original's stride: 341.3 ms per chunk

    def __init__(self, params=None, name=None):
        super().__init__(params, name)
        for key in ("first_chunk_frames", "chunk_frames"):
            if getattr(self.params, key) < 1:
                raise ValueError(f"{key} must be >= 1 frame, got {getattr(self.params, key)}")
        self.turns: dict[str, _Turn] = {}

    def process(self, port, frame: Frame):
        state = self.turns.get(frame.session)
        if state is None or frame.turn != state.turn:     # a session's next turn starts afresh
            state = self.turns[frame.session] = _Turn(turn=frame.turn)
        if state.closed:               # the turn already ended (eoa seen): later steps carry nothing
            return
        if frame.data is None:         # the backbone's end-of-turn frame for a dropped stop step
            if frame.last:
                yield from self._chunks(frame, state, flush=True)
                state.closed = True
            return
        ids = np.asarray(frame.data).reshape(-1)
        if ids.shape != (N_AUDIO_LAYERS + 1,):
            raise ValueError(f"tokens frame of session {frame.session!r} has shape {ids.shape}; "
                             f"expected ({N_AUDIO_LAYERS + 1},): 7 audio ids then the text id")
        if "step" in frame.meta and frame.meta["step"] != state.undelayer.step and not state.warned:
            state.warned = True                                   # once per turn, not once per step
            self.log.warning("session %s turn %d: tokens step %s arrived, expected step %s (lost or "
                             "reordered frames?); not repeated for this turn", frame.session, frame.turn,
                             frame.meta["step"], state.undelayer.step)
        new = state.undelayer.push(ids[:N_AUDIO_LAYERS])          # (k, 7) completed frames
        keep = valid_frames(new)
        state.dropped += int((~keep).sum())
        state.pending.extend(new[keep])
        end = frame.last or state.undelayer.finished
        yield from self._chunks(frame, state, flush=end)
        if end:
            state.closed = True

    def _chunks(self, frame: Frame, state: _Turn, flush: bool):
        """Send every full chunk that is ready; on `flush` also the remainder, marked last."""
        while True:
            size = min(self.params.chunk_frames, max(self.params.first_chunk_frames, state.emitted))
            if len(state.pending) < size and not flush:
                return
            take = state.pending[:size]
            del state.pending[:size]
            last = flush and not state.pending
            codes = np.stack(take) if take else EMPTY_CHUNK                  # (F, 7)
            meta = {"first_frame": state.emitted}
            if last:
                meta.update(frames_total=state.emitted + len(codes), dropped=state.dropped)
            state.emitted += len(codes)
            yield "codes", frame.follow("codes", codes, meta=meta, last=last)
            if last:
                return

    def reset(self, session: str, turn: int):
        self.turns.pop(session, None)
        return ()
