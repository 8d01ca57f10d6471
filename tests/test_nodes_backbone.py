"""Backbone: many sessions through one batched engine, each getting exactly its solo tokens."""
import time

import numpy as np
import pytest
import torch

import nodes.backbone as backbone_module
from nodes.backbone import SPECULATE_STEPS, Backbone
from omniflow.model import weights
from omniflow.frame import Frame
from omniflow.model.checkpoint import load_model
from omniflow.model.engine import Engine
from omniflow.model.tokenizer import Tokenizer
from omniflow.testing import run_node

STEPS = 12                    # answer length per turn (max_new_tokens): enough for 5 SNAC frames


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return weights.write_demo_miniomni(tmp_path_factory.mktemp("miniomni"), size="tiny")


@pytest.fixture(scope="module")
def n_embd(ckpt):
    return load_model(ckpt)[1].n_embd


def embeds_frame(n_embd, session="s", turn=0, frames=20, seed=0, **meta):
    data = np.random.default_rng(seed).standard_normal((frames, n_embd)).astype(np.float32)
    return ("embeds", Frame(kind="embeds", session=session, turn=turn, data=data, meta=meta, last=True))


def direct_tokens(ckpt, task, embeds=None, text_ids=None, steps=STEPS, dtype=torch.float32) -> list[list[int]]:
    """The model called directly, one session alone: what the graph must reproduce."""
    model, _ = load_model(ckpt, dtype=dtype)
    eng = Engine(model, max_sessions=1)
    emb = None if embeds is None else torch.from_numpy(embeds)
    outs = [eng.start("x", task, embeds=emb, text_ids=text_ids, max_new_tokens=steps)]
    while not outs[-1].done:
        outs += eng.step().values()
    return [o.tokens for o in outs if o.kept]


def tokens_of(out, session):
    return [f.data.tolist() for f in out.on("tokens") if f.session == session and f.data is not None]


def backbone(ckpt, **params):
    return Backbone({"checkpoint": str(ckpt), "max_new_tokens": STEPS, **params})


def test_one_session_equals_the_model_called_directly(ckpt, n_embd):
    port, frame = embeds_frame(n_embd)
    out = run_node(backbone(ckpt), [(port, frame)])
    assert tokens_of(out, "s") == direct_tokens(ckpt, "A1A2", embeds=frame.data)
    frames = out.on("tokens")
    assert [f.meta["step"] for f in frames] == list(range(len(frames)))
    assert frames[-1].last and not any(f.last for f in frames[:-1])
    assert frames[-1].meta["stop"] in ("eoa", "length")


def test_max_speed_paces_decoding_without_changing_the_tokens(ckpt, n_embd):
    import time

    port, frame = embeds_frame(n_embd)
    started = time.monotonic()
    out = run_node(backbone(ckpt, max_speed=4.0), [(port, frame)])
    elapsed = time.monotonic() - started
    steps = len(out.on("tokens"))
    assert tokens_of(out, "s") == direct_tokens(ckpt, "A1A2", embeds=frame.data)
    # the decode steps after the prefill take at least 85.3 ms / 4 each
    assert elapsed >= (steps - 2) * (2048 / 24000) / 4.0


def test_two_sessions_at_once_get_exactly_their_solo_tokens(ckpt, n_embd):
    a, b = embeds_frame(n_embd, "a", seed=1, frames=15), embeds_frame(n_embd, "b", seed=2, frames=30)
    out = run_node(backbone(ckpt), [a, b])
    assert tokens_of(out, "a") == direct_tokens(ckpt, "A1A2", embeds=a[1].data)
    assert tokens_of(out, "b") == direct_tokens(ckpt, "A1A2", embeds=b[1].data)


def test_a_session_joins_the_running_batch_at_the_next_step(ckpt, n_embd):
    node = backbone(ckpt)
    node.setup()
    a, b = embeds_frame(n_embd, "a", seed=1), embeds_frame(n_embd, "b", seed=2)
    log = list(node.process(*a))                       # a's prefill
    for _ in range(3):
        log += node.step()                             # a decodes alone
    log += node.process(*b)                            # b arrives mid-answer: prefilled now
    first_batched = list(node.step())
    assert {f.session for _, f in first_batched} == {"a", "b"}      # one step serves both
    while node.has_work():
        log += first_batched
        first_batched = list(node.step())
    log += first_batched
    got = {s: [f.data.tolist() for _, f in log if f.session == s and f.data is not None] for s in "ab"}
    assert got["a"] == direct_tokens(ckpt, "A1A2", embeds=a[1].data)
    assert got["b"] == direct_tokens(ckpt, "A1A2", embeds=b[1].data)


def test_chunked_prefill_keeps_the_live_session_stepping_while_another_joins(ckpt, n_embd):
    node = backbone(ckpt, prefill_chunk=4, max_new_tokens=30)
    node.setup()
    a, b = embeds_frame(n_embd, "a", seed=1), embeds_frame(n_embd, "b", seed=2)   # 20 frames: 23 positions
    log = list(node.process(*a))                       # nobody else decoding: a's whole prompt...
    assert log == []                                   # ...runs in the next step
    log += node.step()
    assert [f.meta["step"] for _, f in log] == [0]
    log += node.step()
    assert list(node.process(*b)) == []                # b joins: its prompt goes 4 positions a step
    steps = 0
    while True:
        outs = list(node.step())
        log += outs
        steps += 1
        sessions = {f.session for _, f in outs}
        assert "a" in sessions                         # a steps every time b's prompt advances
        if "b" in sessions:
            break
    assert steps >= 23 // 4                            # b's prefill was spread over several steps
    while node.has_work():
        log += node.step()
    got = {s: [f.data.tolist() for _, f in log if f.session == s and f.data is not None] for s in "ab"}
    assert got["a"] == direct_tokens(ckpt, "A1A2", embeds=a[1].data, steps=30)
    assert got["b"] == direct_tokens(ckpt, "A1A2", embeds=b[1].data, steps=30)


def test_sessions_beyond_capacity_wait_and_are_never_dropped(ckpt, n_embd):
    frames = [embeds_frame(n_embd, f"s{i}", seed=i) for i in range(3)]
    out = run_node(backbone(ckpt, max_sessions=1), frames)
    for i, (_, f) in enumerate(frames):
        assert tokens_of(out, f"s{i}") == direct_tokens(ckpt, "A1A2", embeds=f.data)
    # one session at a time: s1 starts only after s0's last frame
    order = [f.session for f in out.on("tokens")]
    assert order.index("s1") > max(i for i, s in enumerate(order) if s == "s0")


def test_barge_in_stops_the_old_turn(ckpt, n_embd):
    node = backbone(ckpt)
    node.setup()
    old = list(node.process(*embeds_frame(n_embd, "s", turn=0, seed=1)))
    old += node.step()
    node.reset("s", 1)                                # the bus announced turn 1 (a barge-in)
    assert not node.has_work() and "s" not in node.engine
    new_port, new = embeds_frame(n_embd, "s", turn=1, seed=2)
    frames = list(node.process(new_port, new))
    while node.has_work():
        frames += node.step()
    assert {f.turn for _, f in frames} == {1}
    assert [f.data.tolist() for _, f in frames if f.data is not None] == \
        direct_tokens(ckpt, "A1A2", embeds=new.data)


def test_text_prompt_and_per_frame_task(ckpt, n_embd):
    prompt = "What is the capital of France?"
    text = ("text", Frame(kind="text", session="t", meta={"text": prompt, "task": "T1T2"}, last=True))
    asr = embeds_frame(n_embd, "r", task="ASR")
    out = run_node(backbone(ckpt), [text, asr])
    ids = Tokenizer.from_dir(ckpt).encode(prompt)
    assert tokens_of(out, "t") == direct_tokens(ckpt, "T1T2", text_ids=ids)
    assert tokens_of(out, "r") == direct_tokens(ckpt, "ASR", embeds=asr[1].data)
    assert {f.meta["task"] for f in out.on("tokens") if f.session == "r"} == {"ASR"}


def test_bad_inputs_fail_their_own_turn_with_the_fix(ckpt, n_embd, caplog):
    bad = [("embeds", Frame(kind="embeds", session="w", data=np.zeros((5, 3), np.float32))),
           ("text", Frame(kind="text", session="e", meta={"text": " "})),
           embeds_frame(n_embd, "t", task="T1A2"),
           ("text", Frame(kind="text", session="long", turn=2, meta={"text": "hello " * 2000})),
           embeds_frame(n_embd, "26s", frames=1300)]                  # 26 s of speech: no room
    good = embeds_frame(n_embd, "ok")
    with caplog.at_level("ERROR"):
        out = run_node(backbone(ckpt), [*bad, good])          # the good session is still served
    assert {f.session for f in out.on("tokens") if f.kind == "tokens"} == {"ok"}
    errors = {f.session: f for f in out.on("tokens") if f.kind == "error"}
    assert set(errors) == {"w", "e", "t", "long", "26s"} and all(f.last for f in errors.values())
    assert "expected (T >= 1, 64)" in errors["w"].meta["error"]
    assert "non-empty meta['text']" in errors["e"].meta["error"]
    assert "that input takes tasks" in errors["t"].meta["error"]
    assert errors["long"].turn == 2 and "tokens but the model's context (block_size 512) takes at most 508" \
        in errors["long"].meta["error"]
    assert "the utterance is 26.0 s" in errors["26s"].meta["error"]
    assert caplog.text.count("failed in process()") == 5 and "Traceback" not in caplog.text
    with pytest.raises(ValueError, match=r"Invalid enum value .T1T2. - at `\$.task`"):
        Backbone({"task": "T1T2"})


def test_max_new_tokens_is_capped_by_the_context_left(ckpt, n_embd):
    frames = 500                                       # tiny demo model: block_size 512
    out = run_node(backbone(ckpt, max_new_tokens=1000), [embeds_frame(n_embd, frames=frames)])
    steps = out.on("tokens")
    assert len(steps) <= 512 - (frames + 3) + 1 and steps[-1].last


def test_bfloat16_node_equals_the_bfloat16_model_called_directly(ckpt, n_embd):
    a, b = embeds_frame(n_embd, "a", seed=1), embeds_frame(n_embd, "b", seed=2)
    node = backbone(ckpt, dtype="bfloat16")
    out = run_node(node, [a, b])
    assert node.engine.dtype == torch.bfloat16
    for session, (_, frame) in (("a", a), ("b", b)):
        assert tokens_of(out, session) == direct_tokens(ckpt, "A1A2", embeds=frame.data, dtype=torch.bfloat16)


def test_dtype_auto_is_bfloat16_only_where_the_cpu_computes_it(ckpt, n_embd, monkeypatch):
    from omniflow.model import dtypes

    for fast, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(dtypes, "cpu_has_fast_bf16", lambda fast=fast: fast)
        node = backbone(ckpt, dtype="auto")
        run_node(node, [embeds_frame(n_embd, "a", seed=1)])
        assert node.engine.dtype == want
    assert dtypes.resolve_auto("auto", "cuda:0") == "bfloat16"


@pytest.mark.slow       # torch.compile of the decode step: ~10-30 s even for the tiny model on 2 cores
def test_compiled_node_compiles_in_setup_and_gives_the_same_tokens(ckpt, n_embd, caplog):
    a, b = embeds_frame(n_embd, "a", seed=1), embeds_frame(n_embd, "b", seed=2)
    node = backbone(ckpt, compile=True)
    with caplog.at_level("INFO"):
        node.setup()
    assert "decode step compiled" in caplog.text
    assert not node.engine.sessions and node.engine.n_rows == 0       # the throw-away sessions are gone
    out = run_node(node, [a, b], setup=False)
    for session, (_, frame) in (("a", a), ("b", b)):
        assert tokens_of(out, session) == direct_tokens(ckpt, "A1A2", embeds=frame.data)


# --- speculation on the VAD's tentative utterance ---------------------------------------------

def tentative_of(item):
    """The tentative twin of an embeds input: the same session, turn and data, meta tentative."""
    port, frame = item
    return port, Frame(kind="embeds", session=frame.session, turn=frame.turn, data=frame.data.copy(),
                       meta={**frame.meta, "tentative": True}, last=True)


def drive(node, *items):
    """Each (port, frame) through process() and then step() until idle, as the runtime does with
    nothing else arriving; -> the outputs that followed each item."""
    outputs = []
    for item in items:
        out = list(node.process(*item))
        while node.has_work():
            out += node.step()
        outputs.append(out)
    return outputs


def data_of(outputs, session="s"):
    return [f.data.tolist() for _, f in outputs if f.session == session and f.data is not None]


@pytest.mark.parametrize("prefill_chunk", [0, 4])
def test_a_confirmed_speculation_emits_nothing_before_the_final_and_the_tokens_of_the_final_alone(
        ckpt, n_embd, prefill_chunk):
    final = embeds_frame(n_embd, seed=1)
    node = backbone(ckpt, prefill_chunk=prefill_chunk)
    node.setup()
    starts = []
    for name in ("start", "begin"):                     # count the prefills
        def spy(*a, _real=getattr(node.engine, name), **k):
            starts.append(a[0])
            return _real(*a, **k)
        setattr(node.engine, name, spy)
    (before,) = drive(node, tentative_of(final))
    assert before == []                                 # nothing of a speculation goes out...
    assert node.engine.sessions["s"].step == SPECULATE_STEPS == 8     # ...it ran ahead, then paused
    (after,) = drive(node, final)
    assert data_of(after) == direct_tokens(ckpt, "A1A2", embeds=final[1].data)
    assert [f.meta["step"] for _, f in after] == list(range(len(after))) and after[-1][1].last
    assert starts == ["s"]                              # the final did not prefill again
    assert node.stats()["speculation_hits"] == 1 and node.stats()["speculation_misses"] == 0


def test_a_speculation_stops_decoding_at_speculate_steps(ckpt, n_embd):
    final = embeds_frame(n_embd, seed=1)
    node = backbone(ckpt, speculate_steps=3)
    node.setup()
    (before,) = drive(node, tentative_of(final))
    assert before == [] and not node.has_work()         # paused: the runtime does not step it
    assert node.engine.sessions["s"].step == 3
    assert len(node.live["s"].held) == 3
    (after,) = drive(node, final)
    assert data_of(after) == direct_tokens(ckpt, "A1A2", embeds=final[1].data)


def test_a_final_unlike_the_tentative_is_answered_as_if_alone(ckpt, n_embd):
    tentative, final = tentative_of(embeds_frame(n_embd, seed=1)), embeds_frame(n_embd, seed=2, frames=25)
    node = backbone(ckpt)
    out = run_node(node, [tentative, final])
    assert tokens_of(out, "s") == direct_tokens(ckpt, "A1A2", embeds=final[1].data)
    assert [f.meta["step"] for f in out.on("tokens")] == list(range(len(out.on("tokens"))))
    assert node.stats()["speculation_hits"] == 0 and node.stats()["speculation_misses"] == 1


def test_a_newer_tentative_of_the_turn_replaces_the_speculation(ckpt, n_embd):
    final = embeds_frame(n_embd, seed=2, frames=30)     # the user paused, went on, paused again
    node = backbone(ckpt)
    out = run_node(node, [tentative_of(embeds_frame(n_embd, seed=1)), tentative_of(final), final])
    assert tokens_of(out, "s") == direct_tokens(ckpt, "A1A2", embeds=final[1].data)
    assert node.stats()["speculation_hits"] == 1 and node.stats()["speculation_misses"] == 1


def test_a_newer_turn_cancels_the_speculation_and_nothing_of_it_goes_out(ckpt, n_embd):
    node = backbone(ckpt)
    newer = Frame(kind="control", session="s", turn=1, meta={"op": "turn"})     # the bus: turn 1 began
    out = run_node(node, [tentative_of(embeds_frame(n_embd, turn=0)), newer])
    assert out.on("tokens") == []
    assert "s" not in node.engine and not node.live and node.stats()["speculation_misses"] == 1


def test_a_confirmed_turn_takes_the_slot_of_a_speculation(ckpt, n_embd):
    a, b = embeds_frame(n_embd, "a", seed=1), embeds_frame(n_embd, "b", seed=2)
    node = backbone(ckpt, max_sessions=1)
    out = run_node(node, [tentative_of(a), b, a])       # b is confirmed while a speculates: b first
    assert tokens_of(out, "b") == direct_tokens(ckpt, "A1A2", embeds=b[1].data)
    assert tokens_of(out, "a") == direct_tokens(ckpt, "A1A2", embeds=a[1].data)
    order = [f.session for f in out.on("tokens")]
    assert order.index("a") > max(i for i, s in enumerate(order) if s == "b")
    assert node.stats()["speculation_hits"] == 0 and node.stats()["speculation_misses"] == 1


def test_a_paused_speculation_leaves_another_sessions_answer_unchanged(ckpt, n_embd):
    a, b = embeds_frame(n_embd, "a", seed=1), embeds_frame(n_embd, "b", seed=2, frames=25)
    node = backbone(ckpt)
    node.setup()
    # b speculates first (its cache rows come before a's), a is answered in full meanwhile
    spec, answer_a, answer_b = drive(node, tentative_of(b), a, b)
    assert spec == [] and {f.session for _, f in answer_a} == {"a"}
    assert data_of(answer_a, "a") == direct_tokens(ckpt, "A1A2", embeds=a[1].data)
    assert data_of(answer_b, "b") == direct_tokens(ckpt, "A1A2", embeds=b[1].data)


def test_with_speculate_off_a_tentative_is_ignored(ckpt, n_embd):
    final = embeds_frame(n_embd, seed=1)
    node = backbone(ckpt, speculate=False)
    node.setup()
    (before,) = drive(node, tentative_of(final))
    assert before == [] and not node.engine.sessions and not node.live
    (after,) = drive(node, final)
    assert data_of(after) == direct_tokens(ckpt, "A1A2", embeds=final[1].data)



def burst_run(ckpt, n_embd, starved_s=0.0):
    """One answer on a node whose CPU plan gives it 1 thread and burst_threads 2: the math threads
    of each engine call, its tokens, and the frame. starved_s: the prefill also waits this long
    without CPU (as when another process holds the cores)."""
    def counting(call, wait=0.0):                      # an engine call that records its math threads
        def wrapped(*args, **kw):
            threads.append(torch.get_num_threads())
            time.sleep(wait)
            return call(*args, **kw)
        return wrapped

    before, threads = torch.get_num_threads(), []
    torch.set_num_threads(1)                           # the CPU plan's share, as the runtime sets it
    try:
        node = backbone(ckpt, burst_threads=2, max_new_tokens=20)
        node.setup()
        node.engine.start, node.engine.step = counting(node.engine.start, starved_s), counting(node.engine.step)
        port, frame = embeds_frame(n_embd, "a", seed=1)
        out = list(node.process(port, frame))
        while node.has_work():
            out += node.step()
    finally:
        torch.set_num_threads(before)
    return threads, [f.data.tolist() for _, f in out if f.data is not None], frame


def test_burst_threads_take_every_core_until_an_answer_is_voiced(ckpt, n_embd, monkeypatch):
    """Prefill and the steps before the first SNAC frame (the vocoder idle) run on burst_threads;
    once the answer is voiced the node gives the plan's threads back to the vocoder."""
    monkeypatch.setattr(backbone_module, "BURST_CHECK_MIN_S", float("inf"))   # a busy test machine
    monkeypatch.setattr(backbone_module, "others_running", lambda: 0)         # is not the point here
    monkeypatch.setattr(backbone_module, "available_cores", lambda: 2)
    threads, got, frame = burst_run(ckpt, n_embd)
    assert threads[:SPECULATE_STEPS] == [2] * SPECULATE_STEPS    # prefill (step 0) .. step 7: burst
    assert set(threads[SPECULATE_STEPS:]) == {1}                 # voiced: the plan's share
    assert got == direct_tokens(ckpt, "A1A2", embeds=frame.data, steps=20)


def test_no_burst_while_other_processes_hold_the_cores(ckpt, n_embd, monkeypatch):
    monkeypatch.setattr(backbone_module, "others_running", lambda: 1)         # whisper is encoding
    monkeypatch.setattr(backbone_module, "available_cores", lambda: 2)
    threads, got, frame = burst_run(ckpt, n_embd)
    assert set(threads) == {1}
    assert got == direct_tokens(ckpt, "A1A2", embeds=frame.data, steps=20)


def test_a_burst_that_does_not_get_its_cores_ends(ckpt, n_embd, monkeypatch):
    monkeypatch.setattr(backbone_module, "others_running", lambda: 0)
    monkeypatch.setattr(backbone_module, "available_cores", lambda: 2)
    threads, got, frame = burst_run(ckpt, n_embd, starved_s=0.05)   # the prefill got no CPU
    assert threads[0] == 2 and set(threads[1:]) == {1}
    assert got == direct_tokens(ckpt, "A1A2", embeds=frame.data, steps=20)
