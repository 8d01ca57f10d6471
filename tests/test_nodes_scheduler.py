"""SnacScheduler: per-step tokens -> whole SNAC frames in chunks (delay undone, tail kept, no specials)."""
import numpy as np
import pytest

from nodes.scheduler import SnacScheduler
from omniflow.frame import Frame
from omniflow.model.delay import delay
from omniflow.model.tokens import EOT, PAD_A, PAD_T
from omniflow.testing import run_node


def step_frames(audio_steps: np.ndarray, session="s", turn=0, mark_last=True) -> list[Frame]:
    """(S, 7) raw audio ids per step -> one tokens frame per step, as the backbone sends them."""
    frames = []
    for step, audio in enumerate(audio_steps):
        ids = np.append(audio, PAD_T).astype(np.int64)       # (8,) 7 audio + text
        frames.append(Frame(kind="tokens", session=session, turn=turn, seq=step, data=ids,
                            meta={"step": step}, last=mark_last and step == len(audio_steps) - 1))
    return frames


def random_codes(n, seed=0):
    return np.random.default_rng(seed).integers(0, 4096, size=(n, 7))    # (F, 7) real codes


def codes_of(out):
    return [f.data for f in out.on("codes")]


@pytest.mark.parametrize("n_frames", [0, 1, 5, 9, 12])
def test_round_trip_with_delay(n_frames):
    frames = random_codes(n_frames, seed=n_frames)
    out = run_node(SnacScheduler({"first_chunk_frames": 2, "chunk_frames": 4}),
                   step_frames(delay(frames)))
    chunks = codes_of(out)
    got = np.concatenate(chunks) if chunks else np.zeros((0, 7))
    np.testing.assert_array_equal(got, frames)
    assert out.on("codes")[-1].last and not any(f.last for f in out.on("codes")[:-1])
    assert out.on("codes")[-1].meta["frames_total"] == n_frames


def test_chunk_sizes_first_then_ramp_then_steady_then_tail():
    """Each chunk holds at most the frames already sent (the listener's queue), up to chunk_frames."""
    frames = random_codes(14)
    out = run_node(SnacScheduler({"first_chunk_frames": 1, "chunk_frames": 4}), step_frames(delay(frames)))
    assert [len(c) for c in codes_of(out)] == [1, 1, 2, 4, 4, 2]     # tail of 2 flushed, not dropped
    assert [f.meta["first_frame"] for f in out.on("codes")] == [0, 1, 2, 4, 8, 12]


def test_first_chunk_leaves_after_seven_steps():
    """Frame 0 completes at step MAX_DELAY = 7: the first 1-frame chunk is sent on that step."""
    sched = SnacScheduler({"first_chunk_frames": 1, "chunk_frames": 4})
    steps = step_frames(delay(random_codes(6)))
    sent_at = []
    for i, f in enumerate(steps):
        if list(sched.process("tokens", f)):
            sent_at.append(i)
    assert sent_at[0] == 7
    sched_orig = SnacScheduler({"first_chunk_frames": 4, "chunk_frames": 4})
    first = next(i for i, f in enumerate(steps) if list(sched_orig.process("tokens", f)))
    assert first == 10                                 # the original's first chunk (4 frames)


def test_tail_flushed_at_eoa_without_last_flag():
    """The model's end of audio (layer 6 emits eoa) ends the turn even before the backbone's last frame."""
    frames = random_codes(6)
    steps = delay(frames)                                  # ends with eoa on every layer
    extra = np.full((3, 7), PAD_A)                         # steps after eoa carry nothing
    out = run_node(SnacScheduler({"first_chunk_frames": 4, "chunk_frames": 4}),
                   step_frames(np.concatenate([steps, extra]), mark_last=False))
    assert [len(c) for c in codes_of(out)] == [4, 2]
    assert out.on("codes")[-1].last
    np.testing.assert_array_equal(np.concatenate(codes_of(out)), frames)


def test_specials_never_reach_the_vocoder_and_are_counted():
    frames = random_codes(8)
    frames[2, 3] = PAD_A                                   # a frame with a special id in layer 3
    frames[5, 6] = 4100                                    # and one with _split in layer 6
    out = run_node(SnacScheduler({"first_chunk_frames": 1, "chunk_frames": 2}), step_frames(delay(frames)))
    got = np.concatenate(codes_of(out))
    np.testing.assert_array_equal(got, np.delete(frames, [2, 5], axis=0))
    assert got.max() < 4096
    assert out.on("codes")[-1].meta["dropped"] == 2


def test_text_only_answer_gives_one_empty_last_chunk():
    """Speech->text tasks feed pad audio: no frame is real, but the turn still ends downstream."""
    steps = np.full((12, 7), PAD_A)
    out = run_node(SnacScheduler(), step_frames(steps))
    assert [c.shape for c in codes_of(out)] == [(0, 7)]
    assert out.on("codes")[0].last


def test_sessions_are_independent_and_reset_clears_state():
    a, b = random_codes(5, seed=1), random_codes(5, seed=2)
    fa, fb = step_frames(delay(a), session="a"), step_frames(delay(b), session="b")
    interleaved = [f for pair in zip(fa, fb) for f in pair]
    out = run_node(SnacScheduler({"first_chunk_frames": 2, "chunk_frames": 2}), interleaved)
    for sess, want in (("a", a), ("b", b)):
        got = np.concatenate([f.data for f in out.on("codes") if f.session == sess])
        np.testing.assert_array_equal(got, want)

    # barge-in: session a's turn 0 is cut after 8 steps; turn 1 starts from scratch
    new = random_codes(3, seed=3)
    frames = fa[:8] + [Frame(kind="control", session="a", turn=1, meta={"op": "turn"})] \
        + step_frames(delay(new), session="a", turn=1)
    out = run_node(SnacScheduler({"first_chunk_frames": 1, "chunk_frames": 4}), frames)
    turn1 = [f for f in out.on("codes") if f.turn == 1]
    np.testing.assert_array_equal(np.concatenate([f.data for f in turn1]), new)
    assert turn1[0].meta["first_frame"] == 0
    assert not any(f.last for f in out.on("codes") if f.turn == 0)


def test_bad_shape_is_a_clear_error_for_that_turn_only():
    good = step_frames(delay(random_codes(2)), session="ok")
    out = run_node(SnacScheduler(), [Frame(kind="tokens", session="bad", turn=4, data=np.zeros(7, np.int64))] + good)
    [error] = [f for f in out.on("codes") if f.session == "bad"]
    assert error.kind == "error" and error.last and error.turn == 4
    assert "7 audio ids then the text id" in error.meta["error"] and error.meta["node"] == "snacscheduler"
    assert all(f.kind == "codes" for f in out.on("codes") if f.session == "ok")
    with pytest.raises(ValueError, match="chunk_frames"):
        SnacScheduler({"chunk_frames": 0})


def test_text_stream_does_not_matter():
    frames = random_codes(4)
    steps = step_frames(delay(frames))
    for f in steps:
        f.data[7] = EOT
    np.testing.assert_array_equal(np.concatenate(codes_of(run_node(SnacScheduler(), steps))), frames)


def test_dataless_last_frame_ends_the_turn():
    """The backbone ends a turn whose stop step is dropped with a frame that carries no tokens."""
    frames = random_codes(6)
    steps = step_frames(delay(frames)[:-1], mark_last=False)       # up to, not including, the eoa step
    steps.append(Frame(kind="tokens", session="s", seq=len(steps), last=True, meta={"stop": "eoa"}))
    out = run_node(SnacScheduler({"first_chunk_frames": 4, "chunk_frames": 4}), steps)
    np.testing.assert_array_equal(np.concatenate(codes_of(out)), frames)
    assert out.on("codes")[-1].last
