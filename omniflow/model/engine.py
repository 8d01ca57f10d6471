"""Batched, step-level Mini-Omni decoding with a pre-allocated KV cache.

One `Engine` hosts many sessions. Each session owns one or two contiguous cache rows (the A1A2
batch trick uses two) and sits at its own position. `start` prefills one session; `step` runs one
decode step for all live sessions (or a chosen subset) in one batched forward pass; `stop` frees
a session's rows (end of answer or barge-in).

Why it is fast (REFERENCE.md §4.4 lists what the original does instead):
* the cache keeps `n_query_groups` key/value heads (2 for Mini-Omni), never expanded to `n_head`;
* attention reads only the filled prefix `[0, max position]` of the live rows, not all slots;
* live rows are kept contiguous (rows are compacted when a session ends), so the cache of a
  step is a view, not a gather;
* only the last position's logits are computed, and only the heads that are read: the 152000-row
  text head for each session's text row, the 7×4160 audio heads for its speaking row;
* the two rows of an A1A2 session share their prompt prefix, so its prefill runs once;
* `prepare_for_decode` fuses each MLP's gate/up GEMM; fp32 CPU GEMMs of 1-4 rows run the kernel
  (`x @ w.T`, `w @ x.T` or one GEMV per row) that `gpt.calibrate_few_rows` measured fastest on
  this CPU for that shape and thread count: which one wins differs between CPUs by up to 5x;
* buffers are allocated once; decoding runs under `torch.inference_mode`.

Stop rules are the original's (REFERENCE.md §4.2): the prefill step is kept unchecked; in the
loop, audio tasks force text to `_pad_t` after the loop sampled `_eot` and stop when layer 6
emits `_eoa`; text tasks stop on `_eot`. The stopping step is reported with `stop` set and
`kept == False` (the original does not append it).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import quant as q
from . import tokens as tk
from .gpt import FEW_ROWS, MiniOmni, calibrate_few_rows, few_rows_linear
from .prompts import Task, build_input_ids, decode_feedback, get_task
from .sampling import Sampling, sample

STOP_EOA = "eoa"        # layer 6 emitted end-of-audio: this step is not part of the answer
STOP_EOT = "eot"        # a text task emitted end-of-text: this step is not part of the answer
STOP_LENGTH = "length"  # max_new_tokens reached: this step is the last one kept


@dataclass
class StepOut:
    """One decode step of one session: 7 raw audio ids (0..4159), then the text id."""

    session: str
    step: int                  # 0 = the prefill position
    tokens: list[int]          # 8 ids; text-only tasks report `_pad_a` for the audio layers
    done: bool = False
    stop: str | None = None    # None while running; STOP_EOA | STOP_EOT | STOP_LENGTH on the last step

    @property
    def kept(self) -> bool:
        """False for the step that sampled a stop token (the original drops it)."""
        return self.stop not in (STOP_EOA, STOP_EOT)

    @property
    def audio(self) -> list[int]:
        return self.tokens[: tk.N_AUDIO_LAYERS]

    @property
    def text(self) -> int:
        return self.tokens[tk.TEXT_STREAM]


@dataclass
class _Session:
    id: str
    task: Task
    row0: int                  # first cache row
    prompt_len: int
    max_new_tokens: int
    sampling: Sampling
    generator: torch.Generator | None
    step: int = 0
    length: int = 0            # filled cache positions (= position of the next input)
    text_end: bool = False
    pending: "_Prefill | None" = None  # set while a chunked prefill is under way (`Engine.begin`)

    @property
    def n_rows(self) -> int:
        return len(self.task.rows)


@dataclass
class _Prefill:
    """A prompt being prefilled in chunks: rows 0..first-1 run positions done.. of x."""

    input_ids: torch.Tensor    # (R, 8, S)
    x: torch.Tensor            # (first, S, C) the prompt's averaged embeddings
    shared: int                # positions rows 1.. copy from row 0 (0: every row runs the chunks)
    first: int                 # rows that run the chunks
    done: int = 0              # positions in the cache


def prepare_for_decode(model: MiniOmni) -> None:
    """Fuse each block's MLP gate and up projections into one weight (one GEMM per decode step
    instead of two). Values, shapes and parameter names are unchanged."""
    for block in model.transformer.h:
        if getattr(block.mlp, "_gate_up", None) is None:
            block.mlp.fuse_gate_up_()


class Engine:
    """Many concurrent Mini-Omni sessions over one model and one pre-allocated KV cache.

    max_sessions: sessions alive at once; max_rows: cache rows (default 2 per session, enough for
    all-A1A2 traffic); static_shapes: attend over all `block_size` slots of all rows every step,
    so the decode step has one shape (for CUDA graphs / `torch.compile`); default on CUDA only;
    pack_heads: on CPU keep oneDNN copies of the heads (+ head-size memory; faster head GEMMs
    above 4 rows); quant: `omniflow.model.quant` mode for the trunk projections and the heads
    (none: the exact weights; the mode in effect is `self.quant`); prefill_chunk: prompt
    positions a `begin` session prefills per `step()` while other sessions decode; calibrate: on an fp32 CPU
    engine, time the few-row GEMM kernels once per shape and thread count (`gpt.calibrate_few_rows`). `prepare_for_decode` fuses the
    model's MLP gate/up weights (values unchanged).
    """

    def __init__(
        self,
        model: MiniOmni,
        max_sessions: int = 8,
        max_rows: int | None = None,
        static_shapes: bool | None = None,
        compile: bool = False,
        pack_heads: bool = True,
        quant: str = "none",
        calibrate: bool = True,
        prefill_chunk: int = 32,
    ) -> None:
        self.model = model.eval()
        cfg = self.cfg = model.config
        self.device, self.dtype = model.device, model.dtype
        self.max_sessions = max_sessions
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 prompt positions per step, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.max_rows = max_rows or 2 * max_sessions
        self.static_shapes = (self.device.type == "cuda") if static_shapes is None else static_shapes
        shape = (cfg.n_layer, self.max_rows, cfg.n_query_groups, cfg.block_size, cfg.head_size)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)  # (layers, rows, G, L, hs)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.positions = torch.zeros(self.max_rows, dtype=torch.long, device=self.device)  # (rows,)
        self.feed = torch.zeros(self.max_rows, tk.N_STREAMS, dtype=torch.long, device=self.device)  # (rows, 8)
        self._row_index = torch.arange(self.max_rows, device=self.device)
        self._slots = torch.arange(cfg.block_size, device=self.device)
        # oneDNN runs bf16 GEMMs only on CPUs with bf16-capable instructions (avx512bw/vl/dq or
        # avx_ne_convert); on others (AVX2-only) mkldnn_linear refuses bf16 at the first call
        onednn_dtypes = (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() \
            else (torch.float32,)
        self.pack_heads = (pack_heads and self.device.type == "cpu" and torch.backends.mkldnn.is_available()
                           and self.dtype in onednn_dtypes)
        prepare_for_decode(model)
        self.quant = q.quantize_model_(model, quant)
        self.w_text, self.w_audio = model.head_weights()  # (152000, C), (29120, C)
        self._q_text = self._q_audio = None
        if self.quant != "none":
            self._q_text, self._q_audio = model.head_packed  # packed (152000, C), (29120, C)
            self.pack_heads = False
        self._text_logits = torch.empty(self.max_sessions, self.w_text.size(0), dtype=self.dtype, device=self.device)
        self._audio_logits = torch.empty(self.max_sessions, self.w_audio.size(0), dtype=self.dtype, device=self.device)
        if self.pack_heads:
            # oneDNN copies of the two heads (+ head-size memory): for the few rows of a decode
            # step its GEMM streams them faster than MKL does (README, Performance)
            try:
                self._packed_text = self.w_text.contiguous().to_mkldnn()
                self._packed_audio = self.w_audio.contiguous().to_mkldnn()
            except RuntimeError as err:  # a CPU build whose oneDNN lacks this dtype
                warnings.warn(f"Engine: oneDNN head packing unavailable ({err}); using plain GEMMs")
                self.pack_heads = False
        if calibrate and self.quant == "none" and self.dtype == torch.float32 and self.device.type == "cpu":
            trunk = [w for block in model.transformer.h
                     for w in (block.attn.attn.weight, block.attn.proj.weight, block.mlp._gate_up, block.mlp.proj.weight)]
            calibrate_few_rows(trunk)
            # the heads take few_rows_linear only for 2-4 rows (see _head)
            calibrate_few_rows([self.w_text, self.w_audio], rows=range(2, FEW_ROWS + 1))
        self.sessions: dict[str, _Session] = {}  # live sessions, in row order
        self.n_rows = 0
        self._trunk_fn = self._trunk
        if compile:
            if self.static_shapes:
                # Buffers the decode step writes in place: static addresses let CUDA graphs
                # ("reduce-overhead") capture the step with them.
                for buf in (self.k_cache, self.v_cache, self.feed, self.positions, self._row_index, self._slots):
                    torch._dynamo.mark_static_address(buf)
            self._trunk_fn = torch.compile(self._trunk, mode="reduce-overhead" if self.static_shapes else None,
                                           dynamic=not self.static_shapes)

    # --- bookkeeping -------------------------------------------------------------------------
    @property
    def kv_bytes_per_row(self) -> int:
        """KV-cache bytes one cache row holds (a session uses 1 row, A1A2 uses 2)."""
        return 2 * self.k_cache[:, 0].numel() * self.k_cache.element_size()

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.sessions

    def stop(self, session_id: str) -> None:
        """Free a session's cache rows (end of answer or barge-in). Unknown ids are ignored."""
        s = self.sessions.pop(session_id, None)
        if s is None:
            return
        n, first_moved = s.n_rows, s.row0 + s.n_rows
        later = [o for o in self.sessions.values() if o.row0 >= first_moved]
        if later:
            filled = max(o.length for o in later)
            # Shift later rows down by n, one row at a time (a row never overlaps its source).
            for r in range(first_moved, self.n_rows):
                self.k_cache[:, r - n, :, :filled].copy_(self.k_cache[:, r, :, :filled])
                self.v_cache[:, r - n, :, :filled].copy_(self.v_cache[:, r, :, :filled])
            self.positions[s.row0: self.n_rows - n] = self.positions[first_moved: self.n_rows].clone()
            self.feed[s.row0: self.n_rows - n] = self.feed[first_moved: self.n_rows].clone()
            for o in later:
                o.row0 -= n
        self.n_rows -= n
        self.positions[self.n_rows:] = 0  # idle rows stay inside the RoPE table (static shapes)

    def reset(self) -> None:
        """Drop every session."""
        self.sessions.clear()
        self.n_rows = 0
        self.positions.zero_()

    # --- prefill -----------------------------------------------------------------------------
    def _check_start(self, session_id, task, embeds, text_ids, max_new_tokens):
        """Validate a new session: -> (input_ids (R, 8, S), embeds, n_frames, max_new_tokens)."""
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already running; stop() it before restarting")
        spec = get_task(task)
        if spec.audio_in and embeds is None:
            raise ValueError(f"task {task} takes speech: pass embeds=model.adapt(whisper_features)")
        if not spec.audio_in and embeds is not None:
            raise ValueError(f"task {task} takes text, not speech: pass text_ids, not embeds")
        n_frames = None
        if embeds is not None:
            embeds = embeds.to(self.device, self.dtype)
            if embeds.dim() == 3 and embeds.size(0) == 1:
                embeds = embeds[0]  # (T, C), shared by the task's rows
            rows = len(spec.rows)
            if embeds.dim() not in (2, 3) or (embeds.dim() == 3 and embeds.size(0) != rows) \
                    or embeds.size(-1) != self.cfg.n_embd:
                raise ValueError(
                    f"embeds must be adapter output (T, {self.cfg.n_embd}) (or ({rows}, T, {self.cfg.n_embd}) "
                    f"for task {task}), got {tuple(embeds.shape)}; whisper features go through model.adapt first"
                )
            n_frames = int(embeds.shape[-2])
        input_ids = build_input_ids(task, n_frames, text_ids).to(self.device)  # (R, 8, S)
        R, _, S = input_ids.shape
        if len(self.sessions) >= self.max_sessions or self.n_rows + R > self.max_rows:
            raise RuntimeError(
                f"engine full: {len(self.sessions)}/{self.max_sessions} sessions, "
                f"{self.n_rows}/{self.max_rows} cache rows; stop() a session or build the Engine "
                f"with larger max_sessions/max_rows"
            )
        room = self.cfg.block_size - S
        if room < 1:
            raise ValueError(f"prompt of {S} positions leaves no room in block_size={self.cfg.block_size}")
        limit = room + 1  # the last step's tokens are never fed back, so block_size - S + 1 fit
        if max_new_tokens is None:
            max_new_tokens = room  # the original: max_returned_tokens = block_size
        if not 1 <= max_new_tokens <= limit:
            raise ValueError(f"max_new_tokens must be in [1, {limit}] for a {S}-position prompt, got {max_new_tokens}")

        return input_ids, embeds, n_frames, max_new_tokens

    @torch.inference_mode()
    def start(
        self,
        session_id: str,
        task: str,
        embeds: torch.Tensor | None = None,
        text_ids: list[int] | None = None,
        sampling: Sampling = Sampling(),
        max_new_tokens: int | None = None,
    ) -> StepOut:
        """Prefill one session at once and return its step-0 tokens (`begin` spreads a prefill
        over the next steps instead).

        embeds: adapter output (T, n_embd) (or (R, T, n_embd)) for audio-input tasks;
        text_ids: tokenized prompt for text-input tasks; max_new_tokens: answer steps including
        this prefill step (default block_size - prompt length, the original's bound).
        """
        input_ids, embeds, n_frames, max_new_tokens = self._check_start(
            session_id, task, embeds, text_ids, max_new_tokens)
        S = input_ids.shape[-1]
        last = self._prefill(self.n_rows, input_ids, embeds, n_frames)  # (R, C)
        s = self._take_rows(session_id, task, input_ids, max_new_tokens, sampling, position=S, length=S)
        return self._first_step(s, last)

    def _take_rows(self, session_id, task, input_ids, max_new_tokens, sampling, position, **state) -> "_Session":
        """Give a new session the next R cache rows at `position` and register it."""
        R, _, S = input_ids.shape
        row0 = self.n_rows
        self.positions[row0: row0 + R] = position
        self.n_rows += R
        s = _Session(session_id, get_task(task), row0, S, max_new_tokens, sampling, sampling.generator(self.device),
                     **state)
        self.sessions[session_id] = s
        return s

    @torch.inference_mode()
    def begin(
        self,
        session_id: str,
        task: str,
        embeds: torch.Tensor | None = None,
        text_ids: list[int] | None = None,
        sampling: Sampling = Sampling(),
        max_new_tokens: int | None = None,
    ) -> None:
        """Admit a session whose prompt is prefilled by the next `step()`s, `prefill_chunk`
        positions per step (chunked prefill: the live sessions keep decoding meanwhile). The step
        that completes it returns the session's step-0 tokens among its outputs. Same arguments
        and errors as `start`; the cache rows are taken now."""
        input_ids, embeds, n_frames, max_new_tokens = self._check_start(
            session_id, task, embeds, text_ids, max_new_tokens)
        R = input_ids.shape[0]
        shared = self._shared_prefix(input_ids, embeds, n_frames)
        first = 1 if shared else R  # rows that run the chunks; the others copy the shared prefix
        if embeds is not None and embeds.dim() == 3:
            embeds = embeds[:first]
        x = self.model.embed(input_ids[:first], embeds, [n_frames] * first if n_frames else None)  # (first, S, C)
        # Until the prompt is in, a static-shape step writes these rows' garbage k/v at the last
        # slot, which a session only attends to after writing it itself.
        self._take_rows(session_id, task, input_ids, max_new_tokens, sampling, position=self.cfg.block_size - 1,
                        length=0, pending=_Prefill(input_ids, x, shared, first))

    def _first_step(self, s: "_Session", last: torch.Tensor) -> StepOut:
        """Step 0 of a prefilled session from its final hidden states last (R, C)."""
        spec, session_id = s.task, s.id
        text_logits = self._text_head(last[spec.text_row: spec.text_row + 1])  # (1, 152000)
        audio_logits = None
        if spec.audio_out:
            audio_logits = self._audio_head(last[spec.audio_row: spec.audio_row + 1])  # (1, 7 * 4160)
            audio_logits = audio_logits.view(1, tk.N_AUDIO_LAYERS, self.cfg.audio_vocab_size)  # (1, 7, 4160)
        text, audio = self._sample_one(s, text_logits[0], None if audio_logits is None else audio_logits[0])
        out = self._advance(s, audio, text, check_stops=False)
        if out.done:  # max_new_tokens == 1
            self.stop(session_id)
        return out

    def _prefill(self, row0: int, input_ids, embeds, n_frames) -> torch.Tensor:
        """Fill cache rows row0.. with the prompt (R, 8, S); return final hidden states (R, C) at
        the last position.

        Rows that share a prompt prefix (the A1A2 batch trick: the two rows differ only in the
        last position's audio ids) share its keys/values: the prefix runs once, in row 0, is
        copied to the other rows, and only their differing positions are run, one decode step
        each. That halves the prefill of an A1A2 session.
        """
        R, _, S = input_ids.shape
        shared = self._shared_prefix(input_ids, embeds, n_frames)
        first = 1 if shared else R
        if embeds is not None and embeds.dim() == 3:
            embeds = embeds[:first]
        x, kvs = self.model(input_ids[:first], embeds, [n_frames] * first if n_frames else None, return_kv=True)
        for layer, (k, v) in enumerate(kvs):  # each (first, G, S, hs)
            self.k_cache[layer, row0: row0 + first, :, :S] = k
            self.v_cache[layer, row0: row0 + first, :, :S] = v
        if first == R:
            return x[:, -1]  # (R, C)
        return self._other_rows(row0, input_ids, shared, x[:, -1])

    def _shared_prefix(self, input_ids, embeds, n_frames) -> int:
        """Prompt positions all rows share with row 0 (0: nothing to share, one batched forward)."""
        R, _, S = input_ids.shape
        same = (input_ids[1:] == input_ids[:1]).all(dim=1)  # (R-1, S) position equal to row 0
        shared = int(same.all(dim=0).long().cumprod(0).sum()) if R > 1 else 0  # common prefix
        per_row_embeds = embeds is not None and embeds.dim() == 3 and not bool((embeds == embeds[:1]).all())
        audio_end = (n_frames or 0) + 1  # whisper frames sit at positions 1..T
        if R > 1 and (per_row_embeds or shared < audio_end):
            return 0
        return min(shared, S - 1)  # the last position always runs (its hidden state is needed)

    def _other_rows(self, row0: int, input_ids, shared: int, last0: torch.Tensor) -> torch.Tensor:
        """Rows 1.. of a prompt whose first `shared` positions row 0 has in the cache: copy them,
        run the positions where the rows differ; -> final hidden states (R, C) (row 0: last0 (1, C))."""
        R, _, S = input_ids.shape
        rest = slice(row0 + 1, row0 + R)
        self.k_cache[:, rest, :, :shared] = self.k_cache[:, row0: row0 + 1, :, :shared]
        self.v_cache[:, rest, :, :shared] = self.v_cache[:, row0: row0 + 1, :, :shared]
        rows = self._row_index[: R - 1]
        for p in range(shared, S):  # the few positions where the other rows differ
            pos = torch.full((R - 1,), p, dtype=torch.long, device=self.device)
            h = self._trunk(input_ids[1:, :, p], pos, self.k_cache[:, rest, :, : p + 1],
                            self.v_cache[:, rest, :, : p + 1], rows, p + 1)  # (R-1, C)
        return torch.cat([last0, h])  # (R, C)

    # --- decode ------------------------------------------------------------------------------
    def _trunk(self, ids, pos, k_cache, v_cache, rows, n_slots: int):
        """ids (R, 8), pos (R,) -> final hidden states (R, C) after writing this step's k/v."""
        m = self.model
        x = m.transformer.wte(ids).sum(dim=1) / tk.N_STREAMS  # (R, C)
        cos, sin = m.rope_cos[pos], m.rope_sin[pos]  # (R, n_elem)
        mask = (self._slots[:n_slots][None, :] <= pos[:, None])[:, None, None, :]  # (R, 1, 1, L)
        for layer, block in enumerate(m.transformer.h):
            x = block.decode(x, cos, sin, k_cache[layer], v_cache[layer], rows, pos, mask)
        return m.transformer.ln_f(x)  # (R, C)

    @torch.inference_mode()
    def step(self, sessions: list[str] | None = None) -> dict[str, StepOut]:
        """One decode step for all decoding sessions (or the named subset), batched together,
        then up to `prefill_chunk` prompt positions of the sessions `begin` admitted (all of them
        when nobody is decoding: no one waits). A session whose prefill completes here reports its
        step 0 in the result."""
        if sessions is None:
            chosen = [s for s in self.sessions.values() if s.pending is None]
        else:
            missing = [sid for sid in sessions if sid not in self.sessions]
            if missing:
                raise KeyError(f"no live session(s) {missing}; start() them first (or they already ended)")
            chosen = sorted((self.sessions[sid] for sid in sessions if self.sessions[sid].pending is None),
                            key=lambda s: s.row0)
        outs = self._decode(chosen) if chosen else {}
        outs.update(self._prefill_some(self.prefill_chunk if chosen else None))
        return outs

    def _decode(self, chosen: list[_Session]) -> dict[str, StepOut]:
        # Rows 0..R-1 exactly (the usual case: sessions still prefilling sit after the decoding
        # ones) decode on views of the cache; scattered rows on a gathered copy.
        all_rows = chosen[0].row0 == 0 and all(a.row0 + a.n_rows == b.row0 for a, b in zip(chosen, chosen[1:]))
        R_all = chosen[-1].row0 + chosen[-1].n_rows if all_rows else None
        if self.static_shapes:
            # One shape every step: all rows, all slots (idle rows compute harmless garbage).
            R, n_slots, rows = self.max_rows, self.cfg.block_size, self._row_index
        elif all_rows:
            R, n_slots, rows = R_all, max(s.length for s in chosen) + 1, self._row_index[:R_all]
        else:
            R = sum(s.n_rows for s in chosen)
            n_slots = max(s.length for s in chosen) + 1
            rows = torch.tensor([s.row0 + i for s in chosen for i in range(s.n_rows)], device=self.device)
        if self.static_shapes:
            # The very same tensors every step (no views), so a captured graph can mutate them.
            h = self._trunk_fn(self.feed, self.positions, self.k_cache, self.v_cache, rows, n_slots)
            local = {s.id: s.row0 for s in chosen}
        elif all_rows:
            k_cache = self.k_cache[:, :R, :, :n_slots]  # views: (layers, R, G, L, hs)
            v_cache = self.v_cache[:, :R, :, :n_slots]
            h = self._trunk_fn(self.feed[:R], self.positions[:R], k_cache, v_cache, rows, n_slots)
            local = {s.id: s.row0 for s in chosen}
        else:
            # A subset at scattered rows: decode on a gathered copy, then write the new k/v back.
            k_cache = self.k_cache[:, rows, :, :n_slots]  # (layers, R, G, L, hs) copy
            v_cache = self.v_cache[:, rows, :, :n_slots]
            pos = self.positions[rows]
            local_rows = self._row_index[:R]
            h = self._trunk_fn(self.feed[rows], pos, k_cache, v_cache, local_rows, n_slots)
            self.k_cache[:, rows, :, pos] = k_cache[:, local_rows, :, pos]
            self.v_cache[:, rows, :, pos] = v_cache[:, local_rows, :, pos]
            local, offset = {}, 0
            for s in chosen:
                local[s.id] = offset
                offset += s.n_rows

        # Only the heads that are read: text rows through the text head, speaking rows through the
        # audio heads. A speaking session whose text ended reads no text logits (its text is forced
        # to _pad_t, `_advance`), so it skips the text head, the largest GEMM of a step.
        readers = [s for s in chosen if not (s.task.audio_out and s.text_end)]
        speakers = [s for s in chosen if s.task.audio_out]
        text_rows = [local[s.id] + s.task.text_row for s in readers]
        audio_rows = [local[s.id] + s.task.audio_row for s in speakers]
        text_logits = self._text_head(h[text_rows]) if readers else None  # (n_t, 152000)
        audio_logits = None
        if speakers:
            audio_logits = self._audio_head(h[audio_rows])  # (n_a, 7 * 4160)
            audio_logits = audio_logits.view(len(speakers), tk.N_AUDIO_LAYERS, self.cfg.audio_vocab_size)

        # Greedy sessions (the default) are sampled together with one argmax per head.
        greedy_text = text_logits.argmax(dim=-1).tolist() if readers else []  # (n_t,)
        greedy_audio = audio_logits.argmax(dim=-1).tolist() if speakers else []  # (n_a, 7)
        text_of = {s.id: i for i, s in enumerate(readers)}
        audio_of = {s.id: i for i, s in enumerate(speakers)}
        outs = {}
        for s in chosen:
            t, a = text_of.get(s.id), audio_of.get(s.id)
            if s.sampling.greedy:
                text = greedy_text[t] if t is not None else tk.PAD_T
                audio = greedy_audio[a] if a is not None else None
            else:
                text, audio = self._sample_one(s, None if t is None else text_logits[t],
                                               None if a is None else audio_logits[a])
            outs[s.id] = self._advance(s, audio, text, check_stops=True)
        if all_rows and not self.static_shapes:
            self.positions[:R_all] += 1
        else:
            for s in chosen:
                self.positions[s.row0: s.row0 + s.n_rows] += 1
        for s in chosen:
            s.length += 1
        for sid, out in outs.items():
            if out.done:
                self.stop(sid)
        return outs

    def _prefill_some(self, budget: int | None) -> dict[str, StepOut]:
        """Run up to `budget` prompt positions (None: all) of the sessions `begin` admitted, in
        admission order; -> the step-0 outputs of those whose prompt is now complete."""
        outs = {}
        for s in [s for s in self.sessions.values() if s.pending is not None]:
            if budget is not None and budget <= 0:
                break
            p = s.pending
            S = p.input_ids.size(-1)
            n = S - p.done if budget is None else min(budget, S - p.done)
            last = self._prefill_chunk(s, p.done, p.done + n)  # (first, C)
            if budget is not None:
                budget -= n
            if p.done < S:
                continue
            if p.first < s.n_rows:
                last = self._other_rows(s.row0, p.input_ids, p.shared, last)  # (R, C)
            s.pending = None
            self.positions[s.row0: s.row0 + s.n_rows] = S
            s.length = S
            outs[s.id] = self._first_step(s, last)
        return outs

    def _prefill_chunk(self, s: _Session, start: int, end: int) -> torch.Tensor:
        """Prompt positions start..end-1 of a `begin` session through the trunk, attending to the
        cache it already holds; -> final hidden states (first, C) at position end - 1."""
        p, m = s.pending, self.model
        rows = slice(s.row0, s.row0 + p.first)
        x = p.x[:, start:end]  # (first, T, C)
        cos, sin = m.rope_cos[start:end], m.rope_sin[start:end]  # (T, n_elem)
        for layer, block in enumerate(m.transformer.h):
            x = block.prefill_chunk(x, cos, sin, self.k_cache[layer, rows, :, :end],
                                    self.v_cache[layer, rows, :, :end], start)
        p.done = s.length = end
        return m.transformer.ln_f(x[:, -1])  # (first, C)

    # --- heads -------------------------------------------------------------------------------
    def _head(self, x: torch.Tensor, weight: torch.Tensor, packed, out: torch.Tensor, quant=None) -> torch.Tensor:
        """x (n, C) -> logits (n, rows of weight)."""
        if quant is not None:
            return quant(x)
        if self.pack_heads and not (self.dtype == torch.float32 and 2 <= x.size(0) <= 4):
            return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), packed, None).to_dense()
        if self.dtype == torch.float32 and self.device.type == "cpu":
            return few_rows_linear(x, weight)  # 2-4 fp32 rows: the calibrated kernel
        return torch.mm(x, weight.t(), out=out[: x.size(0)])

    def _text_head(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, C) -> text logits (n, text_vocab)."""
        return self._head(x, self.w_text, getattr(self, "_packed_text", None), self._text_logits,
                          self._q_text)

    def _audio_head(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, C) -> the 7 audio layers' logits, flat (n, 7 * audio_vocab)."""
        return self._head(x, self.w_audio, getattr(self, "_packed_audio", None), self._audio_logits,
                          self._q_audio)

    # --- per-session rules -------------------------------------------------------------------
    def _sample_one(self, s: _Session, text_logits, audio_logits) -> tuple[int, list[int] | None]:
        text = tk.PAD_T if text_logits is None else int(sample(text_logits, s.sampling, s.generator))
        audio = sample(audio_logits, s.sampling, s.generator).tolist() if audio_logits is not None else None
        return text, audio

    def _advance(self, s: _Session, audio: list[int] | None, text: int, check_stops: bool) -> StepOut:
        """Apply the original's stop rules to one sampled step and queue the next inputs."""
        if audio is None:
            audio = [tk.PAD_A] * tk.N_AUDIO_LAYERS
        stop = None
        if check_stops:
            if s.task.audio_out:
                if s.text_end:
                    text = tk.PAD_T
                if audio[-1] == tk.EOA:
                    stop = STOP_EOA
                elif text == tk.EOT:
                    s.text_end = True
            elif text == tk.EOT:
                stop = STOP_EOT
        if stop is None and s.step + 1 >= s.max_new_tokens:
            stop = STOP_LENGTH
        out = StepOut(s.id, s.step, list(audio) + [text], done=stop is not None, stop=stop)
        s.step += 1
        if stop is None:
            feed = decode_feedback(s.task, audio, text).to(self.device)  # (R, 8)
            self.feed[s.row0: s.row0 + s.n_rows] = feed
        return out
