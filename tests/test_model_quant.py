"""Quantized backbone weights: packing, kernel math, model plumbing and the node parameter.

Random weights cannot show that quantized tokens are "good" (their logits are near-ties); these
tests check what must hold whatever the weights: each kernel multiplies by the weight it
dequantizes to, that weight is within the mode's rounding error of fp32, logits stay within a
bounded error, and every path (prefill, decode, heads, node) runs with the right shapes.
`omniflow bench quality` measures the error on real-size and trained weights.
"""
import typing
import warnings

import numpy as np
import pytest
import torch

from nodes.backbone import Backbone
from omniflow.model import weights
from omniflow.frame import Frame
from omniflow.model import quant
from omniflow.model.config import Config
from omniflow.model.engine import Engine
from omniflow.model.gpt import MiniOmni
from omniflow.testing import run_node

MODES = [m for m in quant.KERNELS]
# Relative Frobenius error of the dequantized weight vs fp32 for N(0, 1) weights: fp16 rounds at
# 2^-11; int8 per channel ~ amax / 127 / sqrt(12) per entry; int4 over groups of 32 ~ range / 15.
WEIGHT_ERR = {"fp16": 1e-3, "int8": 0.015, "int8dyn": 0.015, "int4": 0.12, "int4ort": 0.12}
# Kernel output vs x @ dequantized.T: the bf16 activation cast (int8, int4) or the int8 activation
# quantization (int8dyn; int4ort per block of 32) is all that may differ.
KERNEL_ERR = {"fp16": 1e-4, "int8": 0.01, "int8dyn": 0.03, "int4": 0.01, "int4ort": 0.03}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def available(mode: str) -> bool:
    try:
        quant.pack(torch.randn(32, 64), mode)
        return True
    except quant.QuantUnavailable:
        return False


@pytest.fixture(params=MODES)
def mode(request):
    if not available(request.param):
        pytest.skip(f"{request.param} kernel unavailable in this torch build/CPU")
    return request.param


def test_packed_weight_dequantizes_close_to_fp32_and_the_kernel_multiplies_by_it(mode):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g)                     # (N, K)
    bias = torch.randn(96, generator=g)
    x = torch.randn(2, 2, 128, generator=g)                   # (..., K): 4 rows, the packed kernel
    lin = quant.pack(w, mode, bias)
    deq = lin.dequantized()
    assert deq.shape == w.shape
    assert rel(deq, w) < WEIGHT_ERR[mode]
    y = lin(x)
    assert y.shape == (2, 2, 96) and y.dtype == x.dtype
    assert rel(y, x @ deq.T + bias) < KERNEL_ERR[mode]
    assert rel(y, x @ w.T + bias) < WEIGHT_ERR[mode] + KERNEL_ERR[mode]
    assert 0 < lin.nbytes <= 2 * w.numel()                    # never more than bf16 bytes


def test_int8_scales_are_per_output_channel():
    w = torch.randn(4, 64)
    w[2] *= 1000.0                                            # one huge channel must not flatten the others
    if not available("int8"):
        pytest.skip("int8 kernel unavailable")
    deq = quant.pack(w, "int8").dequantized()
    for row in (0, 1, 3):
        assert rel(deq[row], w[row]) < WEIGHT_ERR["int8"]


def tiny_model() -> MiniOmni:
    torch.manual_seed(0)
    cfg = Config(block_size=64, n_layer=2, n_embd=64, n_head=4, n_query_groups=2, head_size=16,
                 intermediate_size=96)
    return MiniOmni(cfg).eval()


def test_quantized_model_logits_stay_within_a_bounded_error_of_fp32(mode):
    ref = tiny_model()
    model = tiny_model()
    ids = torch.randint(0, 4000, (1, 8, 12))                  # (B, 8, S)
    with torch.inference_mode():
        want = ref(ids)                                       # (1, S, vocab)
        from omniflow.model.engine import prepare_for_decode
        prepare_for_decode(model)
        assert quant.quantize_model_(model, mode) == mode
        for block in model.transformer.h:
            assert block.attn.attn.packed.mode == mode and block.mlp._gate_up_packed.mode == mode
        got = model(ids)                                      # 12 rows: the dense weights
        few = model(ids[..., :quant.PACKED_MAX_ROWS])         # the packed kernels
    assert got.shape == want.shape
    assert torch.equal(got, want)
    assert rel(few, want[:, :quant.PACKED_MAX_ROWS]) < 2 * (WEIGHT_ERR[mode] + KERNEL_ERR[mode])
    assert quant.packed_mode(model) == mode
    assert quant.quantize_model_(model, "none") == "none"        # back to the exact weights
    with torch.inference_mode():
        assert torch.equal(model(ids), want)


def test_calls_of_more_rows_than_the_crossover_take_the_exact_dense_weight(mode):
    w, b = torch.randn(48, 64), torch.randn(48)
    packed = quant.pack(w, mode, b)
    few, many = torch.randn(quant.PACKED_MAX_ROWS, 64), torch.randn(2, 5, 64)   # packed; 10 rows: dense
    with torch.inference_mode():
        assert rel(packed(few), few @ packed.dequantized().T + b) < KERNEL_ERR[mode]
        assert torch.equal(packed(many), torch.nn.functional.linear(many, w, b))   # a prefill is exact


def test_quantized_prefill_is_the_exact_one(mode):
    ref, model = tiny_model(), tiny_model()
    embeds = torch.randn(20, 64)                              # a 23-position prompt, 2 rows
    e_ref, eng = Engine(ref, max_sessions=1), Engine(model, max_sessions=1, quant=mode)
    e_ref.start("s", "A1A2", embeds=embeds), eng.start("s", "A1A2", embeds=embeds)   # (step-0 tokens: packed heads)
    # row 0 holds the whole 23-position prompt (dense); row 1 only re-runs its last few positions
    # (the batch trick's differing tail: few rows, the packed kernel)
    assert torch.equal(eng.k_cache[:, 0, :, :23], e_ref.k_cache[:, 0, :, :23])


def test_engine_decodes_with_quantized_trunk_and_heads(mode):
    ref, model = tiny_model(), tiny_model()
    embeds = torch.randn(5, 64)
    e_ref = Engine(ref, max_sessions=2)
    eng = Engine(model, max_sessions=2, quant=mode)
    assert eng.quant == mode and eng._q_text.mode == mode
    with torch.inference_mode():
        h = torch.randn(3, 64)
        assert rel(eng._text_head(h), e_ref._text_head(h)) < WEIGHT_ERR[mode] + KERNEL_ERR[mode]
        assert rel(eng._audio_head(h), e_ref._audio_head(h)) < WEIGHT_ERR[mode] + KERNEL_ERR[mode]
    first = eng.start("a", "A1A2", embeds=embeds, max_new_tokens=6)
    eng.start("b", "T1A2", text_ids=[5, 6, 7], max_new_tokens=6)
    outs = [first]
    while "a" in eng:
        outs.append(eng.step()["a"])
    assert len(outs) <= 6 and all(len(o.tokens) == 8 for o in outs)
    audio_vocab = model.config.audio_vocab_size
    assert all(0 <= t < audio_vocab for o in outs for t in o.audio)


def test_auto_resolves_per_device_and_unavailable_kernels_fall_back_with_a_warning(monkeypatch):
    assert quant.resolve("auto", "cuda") == "none"
    assert quant.resolve("auto", "cpu") in quant.KERNELS
    assert quant.resolve("int4", "cpu") == "int4"
    with pytest.raises(ValueError, match="must be one of"):
        quant.resolve("int3", "cpu")
    assert quant.resolve("auto", "cpu") == quant.auto_cpu()[0]
    assert quant.resolve("auto", "cpu", fast_bf16=True) == "int4"      # torch's kernel on bf16 hardware
    assert quant.resolve("auto", "cpu", fast_bf16=False) == "int4ort"  # AVX2-only: no emulated bf16
    monkeypatch.setattr(quant, "_fbgemm_ready", lambda: "no fbgemm here")
    model = tiny_model()
    with pytest.warns(UserWarning, match="no fbgemm here"):
        assert quant.quantize_model_(model, "int8dyn") == "none"
    assert all("packed" not in block.attn.attn.__dict__ for block in model.transformer.h)

    def no_int4(*args):
        raise quant.QuantUnavailable("no int4pack kernel here")
    monkeypatch.setitem(quant.KERNELS, "int4", no_int4)
    monkeypatch.setattr(quant, "cpu_has_fast_bf16", lambda: True)   # auto's list: int4, int8, fp16
    with pytest.warns(UserWarning, match="no int4pack kernel here.*trying 'int8'"):
        assert quant.quantize_model_(model, "auto") == "int8"          # auto: the next that works
    assert all(block.attn.attn.packed.mode == "int8" for block in model.transformer.h)


def test_node_quant_param_lists_the_modes_and_runs(tmp_path):
    hint = typing.get_type_hints(Backbone.Params)["quant"]
    assert typing.get_args(hint) == quant.MODES
    with pytest.raises(Exception, match="int9"):
        Backbone({"quant": "int9"})
    mode = "int8" if available("int8") else "auto"
    ckpt = weights.write_demo_miniomni(tmp_path / "miniomni", size="tiny")
    node = Backbone({"checkpoint": str(ckpt), "max_new_tokens": 5, "quant": mode})
    node.setup()
    n_embd = node.cfg.n_embd
    data = np.random.default_rng(0).standard_normal((10, n_embd)).astype(np.float32)
    frame = Frame(kind="embeds", session="s", turn=0, data=data, last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # no fallback warning on this CPU
        out = run_node(node, [("embeds", frame)], setup=False)
    assert node.engine.quant == quant.resolve(mode, "cpu")
    frames = out.on("tokens")
    assert frames and frames[-1].last
    assert all(f.data.shape == (8,) for f in frames if f.data is not None)


def test_few_rows_kernels_are_the_same_fp32_math_and_calibration_picks_one_per_shape(monkeypatch):
    from omniflow.model import gpt
    monkeypatch.setattr(gpt, "_few_rows_choice", {})
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(48, 32, generator=g) for _ in range(3)] + [torch.randn(16, 32, generator=g)]
    chosen = gpt.calibrate_few_rows(ws, rounds=1)
    threads = torch.get_num_threads()
    assert set(chosen) == {(n, 32, m, threads) for n in (48, 16) for m in range(1, gpt.FEW_ROWS + 1)}
    assert set(chosen.values()) <= set(gpt.FEW_ROWS_KERNELS)
    assert gpt.calibrate_few_rows(ws) == {}                      # measured once per shape
    x, b = torch.randn(3, 32, generator=g), torch.randn(48, generator=g)
    for name in gpt.FEW_ROWS_KERNELS:
        gpt._few_rows_choice[(48, 32, 3, threads)] = name
        torch.testing.assert_close(gpt.few_rows_linear(x, ws[0], b), torch.nn.functional.linear(x, ws[0], b))
