"""Engine: batched sessions at different positions equal solo runs; the original's stop rules."""
import pytest
import torch

from omniflow.model import tokens as tk
from omniflow.model.config import Config
from omniflow.model.engine import STOP_EOA, STOP_EOT, STOP_LENGTH, Engine, prepare_for_decode
from omniflow.model.generate import answer, stream
from omniflow.model.gpt import MiniOmni
from omniflow.model.prompts import build_input_ids, decode_feedback, get_task
from omniflow.model.sampling import Sampling

TEXT = [101, 2002, 30003, 404]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Config(block_size=64, n_layer=2, n_embd=32, n_head=6, n_query_groups=2, head_size=8,
                 intermediate_size=48)
    model = MiniOmni(cfg).eval()
    with torch.no_grad():  # sharpen attention so that a wrong key or position changes tokens
        for block in model.transformer.h:
            block.attn.attn.weight.mul_(4.0)
    return model


def embeds_for(model, n_frames, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        return model.adapt(torch.randn(n_frames, model.config.whisper_adapter_dim, generator=g))  # (T, C)


def solo(model, task, **kw):
    return [o.tokens for o in stream(Engine(model, max_sessions=1), task, **kw)]


def test_three_sessions_at_different_positions_match_solo_runs(model):
    e1, e3 = embeds_for(model, 5, 1), embeds_for(model, 9, 3)
    jobs = {
        "a": dict(task="A1A2", embeds=e1, max_new_tokens=9),
        "b": dict(task="T1T2", text_ids=TEXT, max_new_tokens=14),
        "c": dict(task="A1A2_SINGLE", embeds=e3, max_new_tokens=12),
    }
    eng = Engine(model, max_sessions=3)
    got = {sid: [] for sid in jobs}

    def collect(outs):
        for sid, o in outs.items():
            if o.kept:
                got[sid].append(o.tokens)

    collect({"a": eng.start("a", **jobs["a"])})
    collect(eng.step()); collect(eng.step())
    collect({"b": eng.start("b", **jobs["b"])})
    collect(eng.step())
    collect({"c": eng.start("c", **jobs["c"])})
    while eng.sessions:  # "a" (rows 0-1) ends first: "b" and "c" move down under it
        collect(eng.step())
    for sid, job in jobs.items():
        assert got[sid] == solo(model, **job), sid
    assert eng.n_rows == 0


def test_barge_in_frees_rows_and_the_others_continue_unchanged(model):
    e1 = embeds_for(model, 6, 5)
    eng = Engine(model, max_sessions=2)
    eng.start("x", "A1A2", embeds=e1, max_new_tokens=30)
    first = [eng.start("y", "T1A2", text_ids=TEXT, max_new_tokens=10).tokens]
    first.append(eng.step()["y"].tokens)
    eng.stop("x")  # interrupted: its 2 rows go, "y" moves down to row 0
    assert eng.n_rows == 1 and eng.sessions["y"].row0 == 0
    while "y" in eng:
        first.append(eng.step()["y"].tokens)
    assert first == solo(model, "T1A2", text_ids=TEXT, max_new_tokens=10)


def test_stepping_a_subset_leaves_the_others_where_they_are(model):
    eng = Engine(model, max_sessions=2)
    eng.start("p", "T1T2", text_ids=TEXT, max_new_tokens=8)
    outs_q = [eng.start("q", "T1A2", text_ids=TEXT[:2], max_new_tokens=8).tokens]
    for _ in range(3):
        outs_q.append(eng.step(["q"])["q"].tokens)
    assert eng.sessions["p"].step == 1
    while "q" in eng:
        outs_q.append(eng.step()["q"].tokens)
    assert outs_q == solo(model, "T1A2", text_ids=TEXT[:2], max_new_tokens=8)


def test_a1a2_prefill_shares_the_prompt_prefix_exactly(model):
    """The batch trick's two rows share all but the last position: the engine runs that prefix
    once; its cache and last hidden states equal a plain 2-row forward."""
    e = embeds_for(model, 5, 9)
    ids = build_input_ids("A1A2", n_audio_frames=5)  # (2, 8, 8)
    eng = Engine(model, max_sessions=1)
    with torch.inference_mode():
        last = eng._prefill(0, ids, e, 5)  # (2, C)
        hidden, kvs = model(ids, e, [5, 5], return_kv=True)
    torch.testing.assert_close(last, hidden[:, -1], rtol=1e-5, atol=1e-5)
    for layer, (k, v) in enumerate(kvs):
        torch.testing.assert_close(eng.k_cache[layer, :2, :, :8], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eng.v_cache[layer, :2, :, :8], v, rtol=1e-5, atol=1e-5)


def test_static_shapes_give_the_same_tokens(model):
    e = embeds_for(model, 4, 7)
    fast = answer(Engine(model, max_sessions=2), "A1A2", embeds=e, max_new_tokens=15)
    static = answer(Engine(model, max_sessions=2, static_shapes=True), "A1A2", embeds=e, max_new_tokens=15)
    assert fast == static


def test_cached_decode_equals_recomputing_the_whole_sequence(model):
    """Every decode step's tokens equal greedy tokens of the no-cache forward over the prefix."""
    spec = get_task("A1A2_SINGLE")
    e = embeds_for(model, 3, 11)
    steps = solo(model, "A1A2_SINGLE", embeds=e, max_new_tokens=10)
    ids = build_input_ids("A1A2_SINGLE", n_audio_frames=3)  # (1, 8, S)
    for toks in steps:
        with torch.inference_mode():
            logits = model(ids, e[None], [3])[0, -1]
        text, audio = model.split_logits(logits)
        assert [*audio.argmax(-1).tolist(), int(text.argmax())] == toks
        ids = torch.cat([ids, decode_feedback(spec, toks[:7], toks[7])[:, :, None]], dim=2)


def test_seeded_sampling_is_reproducible_per_session(model):
    s = Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=123)
    run = lambda: solo(model, "T1A2", text_ids=TEXT, sampling=s, max_new_tokens=12)  # noqa: E731
    assert run() == run()
    assert run() != solo(model, "T1A2", text_ids=TEXT, max_new_tokens=12)  # differs from greedy


class ScriptedEngine(Engine):
    """Engine whose sampler returns scripted (audio, text) per step, to exercise the stop rules."""

    def __init__(self, model, script):
        super().__init__(model, max_sessions=1)
        self.script = list(script)

    def _sample_one(self, s, text_logits, audio_logits):
        audio, text = self.script.pop(0)
        return text, (audio if audio_logits is not None else None)


RANDOM = Sampling(temperature=1.0, top_k=None)  # non-greedy: goes through _sample_one
A = [7] * 7


def run_script(model, task, script, **kw):
    eng = ScriptedEngine(model, script)
    if get_task(task).audio_in:
        kw["embeds"] = embeds_for(model, 2, 0)
    else:
        kw["text_ids"] = TEXT
    outs = [eng.start("s", task, sampling=RANDOM, **kw)]
    while not outs[-1].done:
        outs.append(eng.step()["s"])
    return outs, eng


def test_audio_task_forces_pad_after_eot_and_stops_on_layer6_eoa(model):
    eoa6 = [7] * 6 + [tk.EOA]
    script = [(A, 5), (A, 6), (A, tk.EOT), (A, 8), ([tk.EOA] * 6 + [9], 9), (eoa6, 10)]
    outs, eng = run_script(model, "T1A2", script)
    assert [o.text for o in outs] == [5, 6, tk.EOT, tk.PAD_T, tk.PAD_T, tk.PAD_T]
    assert outs[-1].stop == STOP_EOA and not outs[-1].kept and all(o.kept for o in outs[:-1])
    assert "s" not in eng and eng.n_rows == 0


class EotEngine(Engine):
    """Engine whose text head always prefers _eot; counts the rows it is asked for."""

    text_head_rows: list

    def _text_head(self, x):
        self.text_head_rows = getattr(self, "text_head_rows", []) + [x.size(0)]
        logits = super()._text_head(x).clone()  # (n, 152000)
        logits[:, tk.EOT] = logits.max() + 1
        return logits


def test_a_speaking_session_past_its_text_end_skips_the_text_head(model):
    eng = EotEngine(model, max_sessions=2)
    a1a2 = [o.tokens for o in stream(eng, "A1A2", embeds=embeds_for(model, 4, 0), max_new_tokens=6)]
    # the prefill step's _eot is not checked; step 1's ends the text; after it _pad_t, no head call
    assert [t[tk.TEXT_STREAM] for t in a1a2] == [tk.EOT, tk.EOT] + [tk.PAD_T] * 4
    assert eng.text_head_rows == [1, 1]
    text_only = EotEngine(model, max_sessions=1)
    outs = list(stream(text_only, "T1T2", text_ids=TEXT, max_new_tokens=6))
    assert len(outs) == 1 and text_only.text_head_rows == [1, 1]   # a text task stops at step 1's _eot


def test_prefill_tokens_are_never_checked(model):
    # EOT at the prefill step neither stops a text task nor switches on forcing in an audio task.
    outs, _ = run_script(model, "T1T2", [(None, tk.EOT), (None, 4), (None, tk.EOT)])
    assert [(o.text, o.kept) for o in outs] == [(tk.EOT, True), (4, True), (tk.EOT, False)]
    assert outs[-1].stop == STOP_EOT
    outs, _ = run_script(model, "A1A2", [([tk.EOA] * 7, tk.EOT), (A, 3)], max_new_tokens=2)
    assert [o.text for o in outs] == [tk.EOT, 3] and outs[-1].stop == STOP_LENGTH


def test_text_task_reports_pad_audio_and_feeds_pad_audio(model):
    outs, eng = run_script(model, "ASR", [(None, 1), (None, 2), (None, 3)], max_new_tokens=3)
    assert all(o.audio == [tk.PAD_A] * 7 for o in outs) and len(outs) == 3


def test_batch_trick_feedback_rows():
    spec = get_task("A1A2")
    fed = decode_feedback(spec, list(range(7)), 42)  # (2, 8)
    assert fed[0, :7].tolist() == [tk.layershift(i, i) for i in range(7)]  # speaking row: sampled audio
    assert fed[1, :7].tolist() == [tk.layershift(tk.PAD_A, i) for i in range(7)]  # text row: pad
    assert fed[:, 7].tolist() == [42, 42]  # both rows get the text row's token


def test_errors_name_the_fix(model):
    eng = Engine(model, max_sessions=1)
    with pytest.raises(ValueError, match="embeds"):
        eng.start("s", "A1A2", text_ids=TEXT)
    with pytest.raises(ValueError, match="unknown task"):
        eng.start("s", "A2A1", text_ids=TEXT)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.start("s", "T1T2", text_ids=TEXT, max_new_tokens=10_000)
    eng.start("s", "T1T2", text_ids=TEXT)
    with pytest.raises(RuntimeError, match="engine full"):
        eng.start("t", "T1T2", text_ids=TEXT)
    with pytest.raises(ValueError, match="already running"):
        eng.start("s", "T1T2", text_ids=TEXT)


def test_prepare_for_decode_keeps_values_and_training(model):
    """Fusing the MLP gate/up weights changes storage only: same state dict, same forward,
    and gradients still reach every parameter."""
    torch.manual_seed(3)
    fresh = MiniOmni(model.config)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    ids = build_input_ids("T1A2", text_ids=TEXT)
    with torch.inference_mode():
        logits = fresh(ids)
    prepare_for_decode(fresh)
    mlp = fresh.transformer.h[0].mlp
    assert mlp.fc_1.weight.data_ptr() == mlp._gate_up.data_ptr()  # fc_1, fc_2 live in one weight
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    with torch.inference_mode():
        torch.testing.assert_close(fresh(ids), logits, rtol=1e-5, atol=1e-5)
        x = torch.randn(3, model.config.n_embd)
        mlp = fresh.transformer.h[0].mlp
        torch.testing.assert_close(mlp.infer(x), mlp(x), rtol=1e-5, atol=1e-5)
    speech = build_input_ids("A1A2_SINGLE", n_audio_frames=4)
    fresh(speech, fresh.adapt(torch.randn(1, 4, model.config.whisper_adapter_dim))).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fresh.parameters())


def test_bfloat16_engine_batches_like_solo_runs():
    torch.manual_seed(4)
    cfg = Config(block_size=48, n_layer=2, n_embd=32, n_head=4, n_query_groups=2, head_size=8,
                 intermediate_size=48)
    m = MiniOmni(cfg).to(torch.bfloat16).eval()
    eng = Engine(m, max_sessions=2)
    a = eng.start("a", "T1A2", text_ids=TEXT, max_new_tokens=10)
    b = eng.start("b", "T1T2", text_ids=TEXT[:2], max_new_tokens=10)
    got = {"a": [a.tokens], "b": [b.tokens]}
    while eng.sessions:
        for sid, o in eng.step().items():
            got[sid].append(o.tokens)
    assert got["a"] == solo(m, "T1A2", text_ids=TEXT, max_new_tokens=10)
    assert got["b"] == solo(m, "T1T2", text_ids=TEXT[:2], max_new_tokens=10)


@pytest.mark.slow
@pytest.mark.parametrize("static", [True, False])
def test_compiled_decode_step_gives_the_same_tokens(model, static):
    e = embeds_for(model, 4, 13)
    ref = answer(Engine(model, max_sessions=1), "A1A2", embeds=e, max_new_tokens=12)
    compiled = Engine(model, max_sessions=1, compile=True, static_shapes=static)
    assert answer(compiled, "A1A2", embeds=e, max_new_tokens=12) == ref


def test_embeds_of_the_wrong_shape_are_explained(model):
    eng = Engine(model, max_sessions=1)
    with pytest.raises(ValueError, match="model.adapt"):
        eng.start("s", "ASR", embeds=torch.randn(5, 768))  # whisper features, not adapter output
    out = eng.start("s", "ASR", embeds=embeds_for(model, 5, 2)[None], max_new_tokens=2)  # (1, T, C) is fine
    assert out.step == 0


def test_packed_and_plain_heads_give_the_same_tokens(model):
    e = embeds_for(model, 4, 17)
    packed = answer(Engine(model, max_sessions=1, pack_heads=True), "A1A2", embeds=e, max_new_tokens=15)
    plain = answer(Engine(model, max_sessions=1, pack_heads=False), "A1A2", embeds=e, max_new_tokens=15)
    assert packed == plain


@pytest.mark.parametrize("chunk,static", [(1, False), (3, False), (64, False), (3, True)])
def test_chunked_prefill_gives_the_whole_prefill_tokens_while_others_decode(model, chunk, static):
    """`begin` spreads a prompt over the next steps, `chunk` positions per step, while a live
    session keeps decoding every step; every session's tokens equal its solo unchunked run."""
    e1, e2 = embeds_for(model, 5, 1), embeds_for(model, 9, 2)
    jobs = {
        "live": dict(task="A1A2", embeds=e1, max_new_tokens=30),
        "a1a2": dict(task="A1A2", embeds=e2, max_new_tokens=10),    # shared-prefix rows
        "t1a2": dict(task="T1A2", text_ids=TEXT, max_new_tokens=10),
        "a1t2": dict(task="A1T2", embeds=e2, max_new_tokens=10),
    }
    eng = Engine(model, max_sessions=4, prefill_chunk=chunk, static_shapes=static)  # static: the CUDA step
    got = {sid: [] for sid in jobs}

    def collect(outs):
        for sid, o in outs.items():
            if o.kept:
                got[sid].append(o.tokens)

    collect({"live": eng.start("live", **jobs["live"])})
    steps_live = []
    for sid in ("a1a2", "t1a2", "a1t2"):
        eng.begin(sid, **jobs[sid])
        assert sid in eng and eng.sessions[sid].pending is not None
        for _ in range(2):
            outs = eng.step()
            steps_live.append("live" in outs)
            collect(outs)
    while eng.sessions:
        outs = eng.step()
        collect(outs)
    assert all(steps_live)                                  # the live session decoded every step
    for sid, job in jobs.items():
        want = solo(model, job["task"], **{k: v for k, v in job.items() if k != "task"})
        assert got[sid] == want, sid


def test_chunked_prefill_alone_runs_the_whole_prompt_in_one_step_and_can_be_stopped(model):
    eng = Engine(model, max_sessions=2, prefill_chunk=2)
    eng.begin("a", "A1A2", embeds=embeds_for(model, 9, 2), max_new_tokens=5)
    assert eng.n_rows == 2
    outs = eng.step()                                       # nobody decoding: no reason to wait
    assert outs["a"].step == 0 and eng.sessions["a"].pending is None
    eng.begin("b", "T1A2", text_ids=TEXT, max_new_tokens=5)
    eng.stop("b")                                           # barge-in while prefilling
    assert "b" not in eng and eng.n_rows == 2
    eng.stop("a")
    assert eng.n_rows == 0
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, prefill_chunk=0)
