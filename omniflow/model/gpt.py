"""The Mini-Omni network: a Qwen2-shaped litgpt trunk over 8 averaged token streams.

Parameter names equal the keys of the official `lit_model.pth` (REFERENCE.md §6.2), so a plain
`load_state_dict` reads the published file. Math follows litgpt as Mini-Omni uses it (§1):
pre-norm blocks, RMSNorm in fp32, fused QKV laid out per KV group, NeoX RoPE, GQA, SwiGLU MLP,
tied head. Two attention paths share the same weights:

* `MiniOmni.forward` — the whole sequence, causal, no cache (training, parity of prefill logits);
* `CausalSelfAttention.prefill` / `.decode` — used by `omniflow.model.engine.Engine`, which owns the
  KV cache (kept at `n_query_groups` heads, never expanded).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import tokens
from .config import Config


FEW_ROWS = 4   # decode steps of at most this many rows pick their fp32 CPU GEMM per shape
# The ways to multiply x (M, in) by a row-major (out, in) weight; all are the same fp32 math.
FEW_ROWS_KERNELS = {
    "linear": lambda x, w: F.linear(x, w),                           # MKL x @ w.T
    "wxT": lambda x, w: (w @ x.t()).t(),                             # MKL w @ x.T
    "mv": lambda x, w: torch.stack([torch.mv(w, row) for row in x]),  # one GEMV per row
}
# (out, in, rows, threads) -> FEW_ROWS_KERNELS key, filled by calibrate_few_rows. Which one
# streams a weight fastest depends on the CPU, its BLAS and the thread count (README, Performance).
_few_rows_choice: dict[tuple[int, int, int, int], str] = {}


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` for the few rows of a decode step, x (M, in) -> (M, out).

    fp32 on CPU with 1-FEW_ROWS rows: the kernel `calibrate_few_rows` measured fastest for this
    shape, row count and thread count (`weight @ x.T` for 2-4 rows, `F.linear` for 1 when not
    calibrated). Elsewhere: plain `F.linear`.
    """
    if (x.dim() == 2 and x.size(0) <= FEW_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"
            and weight.is_contiguous()):
        key = (weight.size(0), weight.size(1), x.size(0), torch.get_num_threads())
        how = _few_rows_choice.get(key, "linear" if x.size(0) == 1 else "wxT")
        y = FEW_ROWS_KERNELS[how](x, weight)  # (M, out)
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)


def calibrate_few_rows(weights: list[torch.Tensor], rows=range(1, FEW_ROWS + 1), rounds: int = 2,
                       per_shape: int = 4) -> dict:
    """Time each FEW_ROWS_KERNELS entry on `weights` (fp32 CPU, grouped by shape: up to
    `per_shape` distinct weights of a shape in one pass, so they stream from memory as in a real
    step) for each row count; keep the fastest (median over interleaved rounds). Shapes measured
    before are kept. Returns the new {key: kernel} choices."""
    import time

    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for w in weights:
        if w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous():
            group = by_shape.setdefault(tuple(w.shape), [])
            if len(group) < per_shape:
                group.append(w)
    threads, chosen = torch.get_num_threads(), {}
    with torch.inference_mode():
        for (n_out, n_in), ws in by_shape.items():
            for m in rows:
                if (n_out, n_in, m, threads) in _few_rows_choice:
                    continue                                    # measured by an earlier engine
                x = torch.randn(m, n_in)
                times = {k: [] for k in FEW_ROWS_KERNELS}
                for _ in range(rounds):
                    for name, fn in FEW_ROWS_KERNELS.items():
                        t0 = time.perf_counter()
                        for w in ws:
                            fn(x, w)
                        times[name].append(time.perf_counter() - t0)
                best = min(times, key=lambda k: sorted(times[k])[len(times[k]) // 2])
                chosen[(n_out, n_in, m, threads)] = best
    _few_rows_choice.update(chosen)
    return chosen


def project(lin: nn.Linear, x: torch.Tensor, few_rows: bool = False) -> torch.Tensor:
    """lin(x) through its quantized kernel when `quant.quantize_model_` packed one (`lin.packed`),
    else the exact dense GEMM (`few_rows_linear` for a decode step's x (M, in))."""
    packed = lin.__dict__.get("packed")
    if packed is not None:
        return packed(x)
    return few_rows_linear(x, lin.weight, lin.bias) if few_rows else lin(x)


class RMSNorm(nn.Module):
    """litgpt RMSNorm: normalise in fp32, cast back, then scale (no unit offset)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        norm_x = torch.mean(x * x, dim=-1, keepdim=True)
        return (x * torch.rsqrt(norm_x + self.eps)).to(dtype) * self.weight


class LLaMAMLP(nn.Module):
    """SwiGLU: proj(silu(fc_1(x)) * fc_2(x)). Also the whisper adapter (`whisperMLP`)."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(n_in, n_hidden, bias=False)   # gate
        self.fc_2 = nn.Linear(n_in, n_hidden, bias=False)   # up
        self.proj = nn.Linear(n_hidden, n_out, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.__dict__.get("_gate_up_packed")
        if packed is not None:
            gate, up = packed(x).chunk(2, dim=-1)  # (..., hidden) each
            return project(self.proj, F.silu(gate) * up)
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))

    def fuse_gate_up_(self) -> None:
        """Move fc_1 and fc_2 into one (2 * hidden, in) weight so inference runs one GEMM for both.

        fc_1/fc_2 stay Parameters (views of the fused storage), so state dicts, loading and
        training are unchanged; `infer` uses the fused weight.
        """
        w1, w2 = self.fc_1.weight.data, self.fc_2.weight.data
        n = w1.size(0)
        storage = torch.cat([w1, w2], dim=0).contiguous()  # (2 * hidden, in)
        self.fc_1.weight.data, self.fc_2.weight.data = storage[:n], storage[n:]
        self._gate_up = storage

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Decode-step forward for x (M, in): one fused gate/up GEMM when the fused weight still
        aliases fc_1 (it does not after the module was moved or re-loaded with new tensors)."""
        packed = self.__dict__.get("_gate_up_packed")
        if packed is not None:
            gate, up = packed(x).chunk(2, dim=-1)  # (M, hidden) each
            return project(self.proj, F.silu(gate) * up, few_rows=True)
        fused = getattr(self, "_gate_up", None)
        if fused is None or fused.data_ptr() != self.fc_1.weight.data_ptr() or fused.device != x.device:
            gate, up = few_rows_linear(x, self.fc_1.weight), few_rows_linear(x, self.fc_2.weight)
        else:
            gate, up = few_rows_linear(x, fused).chunk(2, dim=-1)  # (M, hidden) each
        return few_rows_linear(F.silu(gate) * up, self.proj.weight)  # (M, out)


def rope_tables(cfg: Config, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_size, rope_n_elem) cos and sin tables, fp32, NeoX layout (halves repeated)."""
    n_elem = cfg.rope_n_elem
    theta = 1.0 / (cfg.rope_base ** (torch.arange(0, n_elem, 2, device=device).float() / n_elem))
    positions = torch.arange(cfg.block_size, device=device) / cfg.rope_condense_ratio  # (L,)
    angles = torch.outer(positions, theta).repeat(1, 2)  # (L, n_elem)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.size(-1) dims of the last axis; cos/sin broadcast to x."""
    n = cos.size(-1)
    x_rope, x_pass = x[..., :n], x[..., n:]
    x1, x2 = x_rope[..., : n // 2], x_rope[..., n // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    roped = (x_rope * cos + rotated * sin).to(x.dtype)
    return torch.cat((roped, x_pass), dim=-1) if x_pass.size(-1) else roped


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn = nn.Linear(cfg.n_embd, cfg.qkv_size, bias=cfg.add_qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_size, cfg.n_embd, bias=cfg.bias)
        self.scale = 1.0 / math.sqrt(cfg.head_size)

    def _split_seq(self, x, cos, sin):
        """x (B, T, C) -> roped q (B, G, q_per_kv, T, hs), roped k (B, G, T, hs), v (B, G, T, hs)."""
        c = self.cfg
        B, T, _ = x.shape
        qkv = project(self.attn, x)  # (B, T, (nh + 2G) * hs)
        qkv = qkv.view(B, T, c.n_query_groups, c.q_per_kv + 2, c.head_size)
        qkv = qkv.permute(0, 2, 3, 1, 4)  # (B, G, q_per_kv + 2, T, hs)
        q = qkv[:, :, : c.q_per_kv]  # (B, G, q_per_kv, T, hs)
        k = qkv[:, :, c.q_per_kv]  # (B, G, T, hs)
        v = qkv[:, :, c.q_per_kv + 1]  # (B, G, T, hs)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Causal attention over the whole sequence. x (B, T, C); cos/sin (T, n_elem).

        Returns (y (B, T, C), k (B, G, T, hs), v (B, G, T, hs)) so a caller may cache k/v.
        """
        c = self.cfg
        B, T, _ = x.shape
        q, k, v = self._split_seq(x, cos, sin)
        q = q.reshape(B, c.n_head, T, c.head_size)  # (B, nh, T, hs): head h uses group h // q_per_kv
        k_heads = k.repeat_interleave(c.q_per_kv, dim=1)  # (B, nh, T, hs)
        v_heads = v.repeat_interleave(c.q_per_kv, dim=1)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k_heads, v_heads, is_causal=True, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, c.n_head * c.head_size)  # (B, T, nh * hs)
        return project(self.proj, y), k, v

    def prefill_chunk(self, x, cos, sin, k_cache, v_cache, start: int):
        """Positions start..start+T-1 of a prompt whose first `start` positions are in the cache.

        x (B, T, C); cos/sin (T, n_elem) at those positions; k_cache/v_cache (B, G, start + T, hs)
        views of the engine's cache. Writes the chunk's k/v, attends causally over the cache.
        """
        c = self.cfg
        B, T, _ = x.shape
        q, k, v = self._split_seq(x, cos, sin)  # q (B, G, qpk, T, hs); k, v (B, G, T, hs)
        k_cache[:, :, start:] = k
        v_cache[:, :, start:] = v
        L = start + T
        # Query t (at position start + t) sees slots <= start + t; the q_per_kv heads of a group
        # take the query axis together, so the cache is never expanded to n_head heads.
        mask = torch.arange(L, device=x.device)[None, :] <= start + torch.arange(T, device=x.device)[:, None]  # (T, L)
        y = F.scaled_dot_product_attention(q.reshape(B, c.n_query_groups, c.q_per_kv * T, c.head_size),
                                           k_cache, v_cache, attn_mask=mask.repeat(c.q_per_kv, 1),
                                           scale=self.scale)  # (B, G, qpk * T, hs)
        y = y.reshape(B, c.n_head, T, c.head_size).transpose(1, 2).reshape(B, T, c.n_head * c.head_size)
        return project(self.proj, y)  # (B, T, C)

    def decode(self, x, cos, sin, k_cache, v_cache, rows, pos, mask):
        """One new position per row, attending over that row's filled cache prefix.

        x (R, C); cos/sin (R, n_elem) at each row's position; k_cache/v_cache (R, G, L, hs) views
        of the engine's cache (rows 0..R-1, first L slots); rows (R,) = arange(R); pos (R,) long;
        mask (R, 1, 1, L) bool, True where slot <= pos. Writes this step's k/v at `pos`.
        """
        c = self.cfg
        R = x.size(0)
        qkv = project(self.attn, x, few_rows=True)  # (R, (nh + 2G) * hs)
        qkv = qkv.reshape(R, c.n_query_groups, c.q_per_kv + 2, c.head_size)  # (R, G, qpk+2, hs)
        q = apply_rope(qkv[:, :, : c.q_per_kv], cos[:, None, None], sin[:, None, None])  # (R, G, qpk, hs)
        k = apply_rope(qkv[:, :, c.q_per_kv], cos[:, None], sin[:, None])  # (R, G, hs)
        k_cache[rows, :, pos] = k
        v_cache[rows, :, pos] = qkv[:, :, c.q_per_kv + 1]
        # The q_per_kv query heads of a group take the "query length" axis: one key/value head per
        # group serves them all, so the cache is never expanded to n_head heads.
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=self.scale)
        return project(self.proj, y.reshape(R, c.n_head * c.head_size), few_rows=True)  # (R, C)


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm_2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = LLaMAMLP(cfg.n_embd, cfg.intermediate_size, cfg.n_embd)

    def forward(self, x, cos, sin):
        """x (B, T, C) -> (x (B, T, C), k, v) with k/v (B, G, T, hs) for caching."""
        h, k, v = self.attn(self.norm_1(x), cos, sin)
        x = x + h
        return x + self.mlp(self.norm_2(x)), k, v

    def prefill_chunk(self, x, cos, sin, k_cache, v_cache, start: int):
        """x (B, T, C) at positions start.. -> (B, T, C), writing the chunk's k/v to the cache."""
        x = x + self.attn.prefill_chunk(self.norm_1(x), cos, sin, k_cache, v_cache, start)
        return x + self.mlp(self.norm_2(x))

    def decode(self, x, cos, sin, k_cache, v_cache, rows, pos, mask):
        x = x + self.attn.decode(self.norm_1(x), cos, sin, k_cache, v_cache, rows, pos, mask)
        return x + self.mlp.infer(self.norm_2(x))  # (R, C)


class MiniOmni(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=RMSNorm(cfg.n_embd, cfg.norm_eps),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.whisper_adapter = LLaMAMLP(cfg.whisper_adapter_dim, cfg.intermediate_size, cfg.n_embd)
        # Built on the CPU even under a meta/device context: cheap, exact, moved by .to().
        cos, sin = rope_tables(cfg, device="cpu")
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, n_elem) fp32
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # Keep RoPE tables in fp32 whatever the weights' dtype (litgpt computes them in fp32 too).
        super()._apply(fn, *args, **kwargs)
        self.rope_cos = self.rope_cos.float()
        self.rope_sin = self.rope_sin.float()
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    # --- pieces --------------------------------------------------------------------------------
    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """Whisper adapter: (..., T, whisper_adapter_dim) encoder output -> (..., T, n_embd)."""
        if features.size(-1) != self.config.whisper_adapter_dim:
            raise ValueError(
                f"adapter input has {features.size(-1)} features per frame, expected "
                f"whisper_adapter_dim={self.config.whisper_adapter_dim} (whisper-small encoder output)"
            )
        return self.whisper_adapter(features.to(self.dtype))

    def embed(self, input_ids, audio_embeds=None, whisper_lens=None) -> torch.Tensor:
        """Average the 8 streams' embeddings, whisper frames replacing audio positions 1..T.

        input_ids (B, 8, S) long (streams 0..6 layer-shifted, 7 text); audio_embeds (B, T, C)
        adapter output; whisper_lens (B,) frames per row (default T). Returns (B, S, C).
        """
        B, n_streams, S = input_ids.shape
        if n_streams != tokens.N_STREAMS:
            raise ValueError(f"input_ids must be (B, {tokens.N_STREAMS}, S), got {tuple(input_ids.shape)}")
        emb = self.transformer.wte(input_ids)  # (B, 8, S, C)
        if audio_embeds is not None:
            if audio_embeds.dim() == 2:
                audio_embeds = audio_embeds.expand(B, -1, -1)  # (B, T, C)
            if whisper_lens is None:
                whisper_lens = [audio_embeds.size(1)] * B
            audio_embeds = audio_embeds.to(emb.dtype)
            for b, n in enumerate(int(t) for t in whisper_lens):
                if n + 1 > S or n > audio_embeds.size(1):
                    raise ValueError(
                        f"whisper_lens[{b}]={n} does not fit: prompt length {S}, "
                        f"{audio_embeds.size(1)} adapter frames"
                    )
                emb[b, : tokens.N_AUDIO_LAYERS, 1: 1 + n] = audio_embeds[b, :n]
        return emb.sum(dim=1) / tokens.N_STREAMS  # (B, S, C)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_vocab, C) and (7 * audio_vocab, C) row slices of lm_head: the 8 output heads."""
        c = self.config
        w = self.lm_head.weight  # (padded_vocab, C)
        audio_end = c.text_vocab_size + tokens.N_AUDIO_LAYERS * c.audio_vocab_size
        return w[: c.text_vocab_size], w[c.text_vocab_size: audio_end]

    def split_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., padded_vocab) -> text (..., text_vocab) and audio (..., 7, audio_vocab)."""
        c = self.config
        audio_end = c.text_vocab_size + tokens.N_AUDIO_LAYERS * c.audio_vocab_size
        text = logits[..., : c.text_vocab_size]
        audio = logits[..., c.text_vocab_size: audio_end]
        return text, audio.unflatten(-1, (tokens.N_AUDIO_LAYERS, c.audio_vocab_size))

    # --- whole sequence ------------------------------------------------------------------------
    def forward(self, input_ids, audio_embeds=None, whisper_lens=None, return_kv: bool = False):
        """Full-sequence forward without cache: input_ids (B, 8, S) -> logits (B, S, padded_vocab).

        With return_kv, also returns the per-layer (k, v), each (B, G, S, hs), and the final hidden
        states (B, S, C) instead of logits — the engine uses this to prefill its cache.
        """
        S = input_ids.size(-1)
        if S > self.config.block_size:
            raise ValueError(f"sequence of {S} positions exceeds block_size={self.config.block_size}")
        x = self.embed(input_ids, audio_embeds, whisper_lens)  # (B, S, C)
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]  # (S, n_elem)
        kvs = []
        for block in self.transformer.h:
            x, k, v = block(x, cos, sin)
            if return_kv:
                kvs.append((k, v))
        x = self.transformer.ln_f(x)  # (B, S, C)
        if return_kv:
            return x, kvs
        return self.lm_head(x)  # (B, S, padded_vocab)
