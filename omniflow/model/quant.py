"""Quantized weights for the backbone's decode and prefill GEMMs, made at load from the fp32 file.

A decode step reads every weight of the backbone once for a few rows, so on a CPU its time is
set by how many bytes the weights take and how well a kernel streams them. `quantize_model_`
packs each trunk projection (QKV, attention output, fused MLP gate/up, MLP down) into one of the
kernels below, and `QuantLinear` packs the engine's text and audio heads. The fp32 weights stay
in the model (the embedding lookup and `state_dict` use them); `none` is the exact fp32 path.

Modes (each one `QuantLinear` subclass; `omniflow bench decode` times them against fp32 and the
original, `omniflow bench quality` measures their error):

* `fp16`    fp16 weights, fp32 activations and accumulation (fbgemm's packed fp16 GEMM, x86 CPU).
* `int8`    weight-only int8, one scale per output channel; activations cast to bf16 for the
            kernel (`torch.ops.aten._weight_int8pack_mm`). Rows stay independent.
* `int8dyn` int8 weights (per channel) AND 7-bit activations, quantized per call with one scale
            for the whole (rows, in) input (fbgemm dynamic quantized linear, x86 CPU). Because that
            activation scale is shared, a session's logits can depend on which rows share its step.
* `int4`    weight-only int4, asymmetric, one scale/zero per INT4_GROUP inputs of a channel
            (`torch.ops.aten._weight_int4pack_mm_for_cpu`, CPU).
* `int4ort` int4 weights (scale and integer zero point per INT4_GROUP inputs) run by onnxruntime's
            MatMulNBits with int8 activations per block: faster than `int4` when a call has several
            rows (two sessions), less exact (int8 activations); auto's first choice on a CPU
            without native bf16 (below).
* `auto`    on a CPU the first of `auto_cpu()` whose kernel this build has: int4 where the CPU
            computes bf16 natively (the fewest bytes per step, the only mode that decodes two
            sessions in real time on one core of a 2-core Xeon), int4ort first where it does not:
            torch's int4/int8 kernels take bf16 activations, which AVX2-only CPUs emulate (there
            `bench decode --threads 1`: int4 370 ms a step, int4ort 156 ms; `omniflow bench
            quality` states both errors). `none` on CUDA, where the
            dense bf16 GEMMs are already bandwidth-bound and these CPU kernels do not exist.

Only a decode step's few rows go through a packed kernel: these kernels dequantize per row, so
their time grows with the rows while a dense GEMM's stays flat (it is bound by reading the
weight). A call with more than PACKED_MAX_ROWS rows (a prefill, a batch of more than two A1A2
sessions) runs the model's own dense weight instead: the prefill is exact. A fixed bound, not a
timing taken at load, so the same input always takes the same kernels (reproducible answers).

A mode whose kernel this torch build or device lacks falls back to `none` with a warning that
names the reason, so one graph file runs unchanged on CPU and CUDA.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from omniflow.model.dtypes import cpu_has_fast_bf16

MODES = ("none", "fp16", "int8", "int8dyn", "int4", "int4ort", "auto")
# auto on a CPU: the first mode whose kernel works here. int8dyn is left out: its per-call activation
# scale ties a session's logits to the rows sharing its step.
AUTO_CPU = ("int4", "int8", "fp16")                  # a CPU with native bf16 (avx512_bf16 / AMX)
AUTO_CPU_NO_BF16 = ("int4ort",) + AUTO_CPU           # AVX2-only: torch's int4/int8 kernels emulate bf16
INT4_GROUP = 32           # inputs per int4 scale/zero (896 and 4864 are multiples)
INT8_MAX = 127
INT4_LEVELS = 15
PACKED_MAX_ROWS = 4       # rows per call up to which the packed kernel runs (2 A1A2 sessions'
                          # trunk rows); above it the dense weight is faster (bench decode --paths)


class QuantUnavailable(RuntimeError):
    """This torch build or device has no kernel for the mode."""


def _fbgemm_ready() -> str | None:
    """None when fbgemm's quantized CPU ops can be used, else why not."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch build has no fbgemm engine (x86 CPU builds have it)"
    if not hasattr(torch.ops.quantized, "linear_dynamic"):
        return "this torch build has no quantized::linear_dynamic"
    return None


class QuantLinear:
    """y = x @ W.T (+ b) with W (N, K) held in a packed low-precision form.

    `__call__(x (..., K)) -> (..., N)` in x's dtype; `dequantized()` -> the (N, K) fp32 weight the
    kernel effectively multiplies by (what the tests compare against the fp32 weight).
    """

    mode = "none"
    max_rows: int | None = PACKED_MAX_ROWS   # calls of more rows run the dense weight (None: never)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if weight.dim() != 2:
            raise ValueError(f"QuantLinear needs a 2-D (out, in) weight, got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.device = weight.device
        self.dense = weight.detach()   # the model's own (N, K) weight, not a copy: for calls of many rows
        self.dense_bias = None if bias is None else bias.detach()
        self.bias = None if bias is None else bias.detach().float()
        with torch.no_grad():
            self._pack(weight.detach().float().contiguous())
            probe = torch.zeros(1, self.in_features, device=self.device)
            try:
                self._mm(probe)  # a kernel the build lacks fails here, at load, not mid-answer
            except (RuntimeError, NotImplementedError) as err:
                raise QuantUnavailable(f"{self.mode} kernel failed on {self.device}: {err}") from err

    def _pack(self, w: torch.Tensor) -> None:
        raise NotImplementedError

    def _mm(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d (M, K) -> (M, N), any float dtype."""
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of packed weight a GEMM streams."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # (M, K)
        if self.max_rows is not None and x2d.size(0) > self.max_rows:
            w = self.dense
            b = None if self.dense_bias is None else self.dense_bias.to(w.dtype)
            return F.linear(x.to(w.dtype), w, b).to(x.dtype)  # (..., N) the dense GEMM
        y = self._mm(x2d)  # (M, N)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)


def _int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) fp32 -> symmetric int8 (N, K) and fp32 scales (N,)."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)  # (N, K)
    return q, scale


class Int8WeightOnly(QuantLinear):
    mode = "int8"

    def _pack(self, w):
        self.q, scale = _int8_per_channel(w)        # (N, K) int8
        self.scale = scale.to(torch.bfloat16)        # (N,) the kernel wants the activation dtype

    def _mm(self, x2d):
        # The kernel's fp32-activation path is several times slower on CPU: feed it bf16.
        return torch.ops.aten._weight_int8pack_mm(x2d.to(torch.bfloat16), self.q, self.scale)

    def dequantized(self):
        return self.q.float() * self.scale.float()[:, None]

    @property
    def nbytes(self):
        return self.q.numel() + 2 * self.scale.numel()


class Int4WeightOnly(QuantLinear):
    mode = "int4"

    def _pack(self, w):
        N, K = w.shape
        if self.device.type != "cpu":
            raise QuantUnavailable("int4 uses the CPU int4pack kernel")
        if K % INT4_GROUP:
            raise QuantUnavailable(f"int4 needs in_features divisible by {INT4_GROUP}, got {K}")
        g = w.view(N, K // INT4_GROUP, INT4_GROUP)   # (N, groups, group)
        lo, hi = g.amin(-1), g.amax(-1)              # (N, groups)
        scale = (hi - lo).clamp(min=1e-12) / INT4_LEVELS
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, INT4_LEVELS).to(torch.int32)
        # The kernel computes (q - 8) * scale + zero, so zero = lo + 8 * scale.
        zero = lo + (INT4_LEVELS + 1) // 2 * scale
        self.scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (groups, N, 2)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(N, K), 1)
        self._q = q.to(torch.uint8).view(N, K)      # kept for dequantized() only (tests, quality)

    def _mm(self, x2d):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.to(torch.bfloat16), self.packed, INT4_GROUP,
                                                          self.scale_zero)

    def dequantized(self):
        sz = self.scale_zero.float().transpose(0, 1)  # (N, groups, 2)
        N, K = self._q.shape
        g = self._q.view(N, K // INT4_GROUP, INT4_GROUP).float()
        w = (g - (INT4_LEVELS + 1) // 2) * sz[..., :1] + sz[..., 1:]
        return w.view(N, K)

    @property
    def nbytes(self):
        return self.packed.numel() * self.packed.element_size() + 2 * self.scale_zero.numel()


class Int4Ort(QuantLinear):
    """int4 weights, one scale and integer zero point per INT4_GROUP inputs of a channel, run by
    onnxruntime's MatMulNBits (one tiny session per weight) with accuracy_level 4: the activations
    are quantized to int8 per block and multiplied with VNNI dot products, ~2x the speed of torch's
    int4pack kernel on x86 CPUs (`omniflow bench decode`); `omniflow bench quality` states the
    error the int8 activations add."""

    mode = "int4ort"
    ACCURACY_LEVEL = 4        # MatMulNBits: int8 activations, int32 accumulation

    def _pack(self, w):
        if self.device.type != "cpu":
            raise QuantUnavailable("int4ort runs onnxruntime's CPU MatMulNBits")
        try:
            from onnx import TensorProto, helper

            from .ort import CPU_EP, _ort, session_options
            ort = _ort()
        except ImportError as err:
            raise QuantUnavailable(f"int4ort needs onnxruntime and onnx ({err})") from err
        N, K = w.shape
        if K % INT4_GROUP:
            raise QuantUnavailable(f"int4ort needs in_features divisible by {INT4_GROUP}, got {K}")
        blocks = K // INT4_GROUP
        g = w.view(N, blocks, INT4_GROUP)                       # (N, blocks, group)
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)   # 0 exactly representable
        scale = (hi - lo).clamp(min=1e-12) / INT4_LEVELS        # (N, blocks)
        zp = torch.round(-lo / scale).clamp(0, INT4_LEVELS)     # (N, blocks) integer zero points
        q = (torch.round(g / scale[..., None]) + zp[..., None]).clamp(0, INT4_LEVELS).to(torch.uint8)
        b = (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()   # (N, blocks, group/2): low nibble first
        self._b, self._scale, self._zp = b, scale, zp           # for dequantized() and nbytes
        zpad = torch.nn.functional.pad(zp.to(torch.uint8), (0, blocks % 2))          # (N, even)
        z = (zpad[:, 0::2] | (zpad[:, 1::2] << 4)).contiguous()                       # (N, ceil(blocks/2))
        inits = [helper.make_tensor("b", TensorProto.UINT8, list(b.shape), b.numpy().tobytes(), raw=True),
                 helper.make_tensor("s", TensorProto.FLOAT, [N * blocks], scale.float().numpy().tobytes(), raw=True),
                 helper.make_tensor("z", TensorProto.UINT8, [z.numel()], z.numpy().tobytes(), raw=True)]
        node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft",
                                K=K, N=N, bits=4, block_size=INT4_GROUP, accuracy_level=self.ACCURACY_LEVEL)
        graph = helper.make_graph([node], "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        try:            # the node's torch threads, no spinning workers (omniflow.model.ort.session_options)
            self._session = ort.InferenceSession(model.SerializeToString(), session_options(torch.get_num_threads()),
                                                 providers=[CPU_EP])
        except Exception as err:       # an onnxruntime without the contrib op
            raise QuantUnavailable(f"onnxruntime has no usable MatMulNBits: {err}") from err

    def _mm(self, x2d):
        x = x2d.to(torch.float32).contiguous().numpy()             # (M, K)
        return torch.from_numpy(self._session.run(None, {"x": x})[0])   # (M, N) fp32

    def dequantized(self):
        b = self._b                                                # (N, blocks, group/2)
        q = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2).float()   # (N, blocks, group)
        N, blocks, _ = q.shape
        return ((q - self._zp[..., None]) * self._scale[..., None]).view(N, blocks * INT4_GROUP)

    @property
    def nbytes(self):
        return self._b.numel() + 4 * self._scale.numel() + self._zp.numel() // 2


class Fp16Fbgemm(QuantLinear):
    mode = "fp16"

    def _pack(self, w):
        reason = _fbgemm_ready()
        if reason or self.device.type != "cpu":
            raise QuantUnavailable(reason or "fp16 uses fbgemm, a CPU kernel")
        self._w16 = w.half()                          # for dequantized()
        self.packed = torch.ops.quantized.linear_prepack_fp16(w, None)

    def _mm(self, x2d):
        return torch.ops.quantized.linear_dynamic_fp16(x2d.float(), self.packed)

    def dequantized(self):
        return self._w16.float()

    @property
    def nbytes(self):
        return 2 * self._w16.numel()


class Int8Dynamic(QuantLinear):
    mode = "int8dyn"

    def _pack(self, w):
        reason = _fbgemm_ready()
        if reason or self.device.type != "cpu":
            raise QuantUnavailable(reason or "int8dyn uses fbgemm, a CPU kernel")
        q, scale = _int8_per_channel(w)
        self._q, self._scale = q, scale
        with warnings.catch_warnings():               # quantized tensors are marked deprecated
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(),
                                                          torch.zeros_like(scale, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, None)

    def _mm(self, x2d):
        # reduce_range: 7-bit activations. Without it, AVX2's u8 x s8 pair sums (vpmaddubsw)
        # saturate int16 and the error grows several-fold.
        return torch.ops.quantized.linear_dynamic(x2d.float().contiguous(), self.packed, True)

    def dequantized(self):
        return self._q.float() * self._scale[:, None]

    @property
    def nbytes(self):
        return self._q.numel() + 4 * self._scale.numel()


KERNELS: dict[str, type[QuantLinear]] = {
    "fp16": Fp16Fbgemm, "int8": Int8WeightOnly, "int8dyn": Int8Dynamic, "int4": Int4WeightOnly,
    "int4ort": Int4Ort,
}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"quant {mode!r} must be one of {MODES} (none: the exact fp32/bf16 weights)")
    return mode


def auto_cpu(fast_bf16: bool | None = None) -> tuple[str, ...]:
    """The modes auto tries on a CPU, in order (module doc); fast_bf16 None: read /proc/cpuinfo."""
    return AUTO_CPU if (cpu_has_fast_bf16() if fast_bf16 is None else fast_bf16) else AUTO_CPU_NO_BF16


def candidates(mode: str, device: torch.device | str, fast_bf16: bool | None = None) -> tuple[str, ...]:
    """The modes `mode` stands for on `device`, to try in order: auto -> `auto_cpu()` on a CPU,
    none elsewhere; any other mode -> itself."""
    check_mode(mode)
    if mode != "auto":
        return (mode,)
    return auto_cpu(fast_bf16) if torch.device(device).type == "cpu" else ("none",)


def resolve(mode: str, device: torch.device | str, fast_bf16: bool | None = None) -> str:
    """`auto` -> the first mode it tries on this device; other modes are returned as given."""
    return candidates(mode, device, fast_bf16)[0]


def pack(weight: torch.Tensor, mode: str, bias: torch.Tensor | None = None) -> QuantLinear:
    """One (N, K) weight packed for `mode` (not none/auto); raises QuantUnavailable."""
    return KERNELS[mode](weight, bias)


def _packs(model: nn.Module):
    """(module, attribute) of every pack quantize_model_ sets."""
    for block in model.transformer.h:
        yield block.attn.attn, "packed"
        yield block.attn.proj, "packed"
        yield block.mlp, "_gate_up_packed"
        yield block.mlp.proj, "packed"
    yield model, "head_packed"


def packed_mode(model: nn.Module) -> str:
    """The mode quantize_model_ left the model in."""
    heads = model.__dict__.get("head_packed")
    return "none" if heads is None else heads[0].mode


def quantize_model_(model: nn.Module, mode: str) -> str:
    """Pack every GEMM of the decode step for `mode` (in place); returns the mode in effect.
    `none` removes the packs (the exact weights again); packing the mode the model already has
    is free. Calls of more than PACKED_MAX_ROWS rows keep the dense weights (module doc).

    Sets `packed` on attn.attn, attn.proj and mlp.proj, `_gate_up_packed` on the MLP (the fused
    gate/up weight), which `gpt.project` and `LLaMAMLP` use, and `model.head_packed` = (text
    head, audio heads) for the engine. A mode this device lacks warns and tries the next of
    `candidates` (auto), else leaves `none`.
    """
    tries = candidates(mode, model.device)
    if packed_mode(model) in tries[:1]:
        return tries[0]
    for module, attr in _packs(model):
        module.__dict__.pop(attr, None)
    for mode in tries:
        if mode == "none":
            return mode
        try:
            packs = _pack_all(model, mode)
        except QuantUnavailable as err:
            warnings.warn(f"quant {mode!r} unavailable ({err}); "
                          + (f"trying {tries[tries.index(mode) + 1]!r}" if mode != tries[-1]
                             else "the backbone runs unquantized"))
            continue
        for (module, attr), packed in zip(_packs(model), packs):
            module.__dict__[attr] = packed
        return mode
    return "none"


def _pack_all(model: nn.Module, mode: str) -> list:
    """Every decode GEMM of `model` packed for `mode`, in `_packs` order; raises QuantUnavailable."""
    packs = []
    for block in model.transformer.h:
        mlp = block.mlp
        gate_up = getattr(mlp, "_gate_up", None)  # the fused (2 * hidden, C) weight prepare_for_decode made
        if gate_up is None or gate_up.data_ptr() != mlp.fc_1.weight.data_ptr():
            gate_up = torch.cat([mlp.fc_1.weight, mlp.fc_2.weight], dim=0)  # (2 * hidden, C)
        packs += [pack(block.attn.attn.weight, mode, block.attn.attn.bias),
                  pack(block.attn.proj.weight, mode, block.attn.proj.bias),
                  pack(gate_up, mode), pack(mlp.proj.weight, mode)]
    packs.append(tuple(pack(w, mode) for w in model.head_weights()))  # (152000, C), (29120, C)
    return packs
