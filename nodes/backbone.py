"""Backbone node: Mini-Omni hosting many sessions at once, one batched decode step at a time.

Inputs
    embeds  adapter output of one utterance, float32 (T, n_embd): starts a speech-input turn
            (task `params.task`, or the frame's meta["task"]); with meta["tentative"] (the VAD's
            tentative end of the utterance) it starts it speculatively (Speculation, below).
    text    a text prompt in meta["text"]: starts a text-input turn (task `params.text_task`, or
            meta["task"]); tokenized with the checkpoint's tokenizer.json.
Output
    tokens  one frame per decode step per session: int64 (8,) = 7 raw audio ids then the text id,
            meta {"step": 0 for the prefill, 1, 2, ...; "task"}. The turn's final frame has
            last=True and meta["stop"] = "eoa" | "eot" | "length". When the model stopped by
            sampling a stop token (eoa for speech, eot for text), that step is not part of the
            answer (the original does not append it): its frame carries no data (data=None), only
            the end of the turn.

Scheduling (through `omniflow.model.engine.Engine`): `process()` prefills a new turn at once and
emits its step 0, so a new utterance joins the running batch at the next `step()` (with
`prefill_chunk: N` its prompt is prefilled N positions per `step()` instead, so the sessions
already speaking never wait for a join; the step that completes it emits its step 0); `step()` runs
ONE batched decode step for every live session and emits one frame per session. A turn that
finds no free cache slot waits in a FIFO queue and starts as soon as a session ends — never
dropped. A new turn of a session that is still answering replaces the old one (barge-in);
`reset(session, turn)` (the bus announced a newer turn) frees the session's slot. A bad request
(wrong embedding width, empty prompt, a prompt longer than the context, a task the input cannot
take) raises `InputError`: that session's turn gets an error frame (the gateway tells its client)
and every other session goes on.

Speed: `dtype: float32` is the original's arithmetic (token-for-token golden parity); `dtype:
bfloat16` is faster where the hardware has bf16 instructions. `compile: true` runs the decode step
through `torch.compile`, compiled in `setup()` on a throw-away session so that the first user does
not pay for it. `omniflow bench decode` / `bench graph` measure them (README, Performance).

Speculation (`speculate: true`, the default): the VAD sends a tentative utterance at the first
`speech_pad_ms` of silence and the final one only after `min_silence_ms`; whisper and the adapter
pass the tentative on (embeds meta tentative: true, same session and turn). Waiting for the final
would put whisper, the adapter, the prefill and the first decode steps after the end of the turn;
started on the tentative, they run inside the VAD's hang-over instead, so the first audio can leave
as soon as the turn is confirmed. A speculative turn is admitted like any other (prefill, step 0,
decode steps), but its token frames are HELD, never emitted, and after `speculate_steps` steps
(enough for the scheduler's first SNAC frame) it is paused: not decoded, so a user who goes on
talking costs nothing more than its cache rows. When the final embeds of that session and turn
arrive equal to the speculated ones (np.array_equal), the held frames go out at once and decoding
goes on (no second prefill: the tokens are exactly those of the final alone); otherwise the
speculation is cancelled and the final starts as usual. A newer tentative of the same turn (the
user paused again) replaces it; `reset` (a newer turn, barge-in, the end of the session) cancels
it. A speculation never waits in the queue and never keeps a confirmed turn waiting: a confirmed
turn that finds no room drops speculations first. stats() counts `speculation_hits` (confirmed)
and `speculation_misses` (cancelled unconfirmed).
"""
from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import Meta
import numpy as np

from omniflow.frame import Frame
from omniflow.launch.plan import available_cores, others_running
from omniflow.model.delay import MAX_DELAY
from omniflow.model.dtypes import AutoDtype, resolve_auto
from omniflow.model.units import SNAC_FRAME_S, WHISPER_FRAME_MS
from omniflow.node import InputError, Node
from omniflow.params import Device, NonNegative, Positive, UnitInterval

SpeechTask = Literal["A1A2", "A1A2_SINGLE", "A1T2", "ASR"]     # take embeds
TextTask = Literal["T1A2", "T1T2"]                             # take a text prompt
SPEECH_TASKS, TEXT_TASKS = get_args(SpeechTask), get_args(TextTask)
QuantMode = Literal["none", "fp16", "int8", "int8dyn", "int4", "int4ort", "auto"]  # = omniflow.model.quant.MODES
FEATURE_S = WHISPER_FRAME_MS / 1000   # one whisper frame (embeds row) = 20 ms of speech
PROMPT_EXTRA = 3            # positions a prompt adds around its T frames / L tokens (REFERENCE §3)
# decode steps (1 step = 1 SNAC frame = 85.33 ms of speech) a speculative turn runs ahead, step 0
# included: layer i of SNAC frame f comes out at step f + DELAYS[i], so frame 0 (the scheduler's
# first chunk at first_chunk_frames: 1) is complete after steps 0..MAX_DELAY
SPECULATE_STEPS = 1 + MAX_DELAY                               # 8
BURST_CHECK_MIN_S = 0.02    # engine calls shorter than this (tiny models) say little about contention


@dataclass
class _Request:
    """A turn waiting for (or holding) a cache slot."""

    session: str
    turn: int
    task: str
    embeds: Any = None             # torch (T, n_embd) for speech tasks
    text_ids: list[int] | None = None
    origin: Frame | None = None    # the input frame: its session/turn/stamps follow every output
    speculative: bool = False      # started on a tentative utterance: outputs held until confirmed
    tentative: Any = None          # numpy (T, n_embd) the speculation started from (to compare)
    held: list = field(default_factory=list)    # engine StepOuts of a speculation, not yet emitted

    def paused(self, steps: int) -> bool:
        """A speculation that holds `steps` steps (or its whole answer) decodes no further."""
        return self.speculative and (len(self.held) >= steps or bool(self.held and self.held[-1].done))


class Backbone(Node):
    inputs = {"embeds": "embeds", "text": "text"}
    outputs = {"tokens": "tokens"}
    cpu_weight = 2                 # CPU plan: its share of the cores (omniflow.launch.plan)

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        checkpoint: str | None = None      # Mini-Omni dir (lit_model.pth + model_config.yaml); None: cache
        task: SpeechTask = "A1A2"          # speech input: A1A2 (batch-parallel) | A1A2_SINGLE | A1T2 | ASR
        text_task: TextTask = "T1A2"       # text input: T1A2 | T1T2
        dtype: AutoDtype = "float32"       # float32 (the original) | bfloat16 | float16 | auto
                                           # (bf16 on CUDA and on CPUs with native bf16, else float32)
        quant: QuantMode = "none"          # weights of the decode-step GEMMs (<= 4 rows; the prefill
                                           # stays dense): none (exact) | fp16 | int8 | int8dyn | int4 |
                                           # int4ort (onnxruntime, int8 activations) | auto (int4 on a
                                           # CPU with native bf16, int4ort on AVX2-only CPUs, none on
                                           # CUDA). See omniflow.model.quant
        device: Device = "cpu"
        compile: bool = False              # torch.compile the decode step (compiled during setup)
        max_sessions: Positive = 8              # sessions decoded together; more wait in a queue
        max_new_tokens: Positive | None = None  # answer steps incl. the prefill (capped by the context
                                           # left after the prompt); None: fill the context
        temperature: NonNegative = 0.9           # the original's sampling: top_k 1 = greedy
        top_k: Positive | None = 1
        top_p: UnitInterval = 1.0
        seed: int | None = None
        prefill_chunk: Annotated[int, Meta(ge=0)] = 0  # >0: a joining turn's prompt is prefilled this many
                                           # positions per decode step of the live sessions
                                           # (chunked prefill: joins never stall them); 0: at once
        max_speed: NonNegative = 0.0             # decode at most this many times faster than real time
                                           # (1 step = one SNAC frame of speech); 0: as fast as possible.
                                           # Answers a listener hears in real time gain nothing from
                                           # racing ahead, and a paced answer leaves the CPU to others
        speculate: bool = True             # start a turn on the VAD's tentative utterance (embeds meta
                                           # tentative), its output held until the final confirms it
        speculate_steps: Positive = SPECULATE_STEPS  # decode steps (85.33 ms of speech each, step 0
                                           # included) a speculation runs before it pauses
        burst_threads: Annotated[int, Meta(ge=0)] = 0  # math threads while no answer is voiced yet
                                           # (prefills and the steps before a first SNAC frame: the
                                           # vocoder is idle then); 0: every core this process may
                                           # use; once an answer is voiced, the node's `threads`

    def __init__(self, params=None, name=None):
        super().__init__(params, name)
        # (task, text_task, dtype and the bounds are checked by Params' types when the graph loads)
        self._next_step_at = 0.0                     # time.monotonic() before which no step runs
        self.queue: deque[_Request] = deque()
        self.live: dict[str, _Request] = {}          # session -> its running turn
        self._tokenizer = None
        self._threads: int | None = None             # math threads of the CPU plan (_pick_threads)
        self._cores = available_cores()
        self._burst = self.params.burst_threads or self._cores
        self._contended = False                      # a burst call did not get its cores

    # --- lifecycle ---------------------------------------------------------------------------
    def setup(self):
        import torch

        self.decode_steps, self.decode_s = 0, 0.0          # batched steps and their seconds (stats())
        self.speculation_hits = self.speculation_misses = 0   # speculations confirmed / cancelled

        from omniflow.model import weights
        from omniflow.model.checkpoint import load_model
        from omniflow.model.engine import Engine
        from omniflow.model.sampling import Sampling

        self.ckpt_dir = weights.resolve("miniomni", self.params.checkpoint)
        weights.warn_if_demo(self.ckpt_dir, self.log)
        p = self.params
        self.dtype = resolve_auto(p.dtype, p.device)
        model, self.cfg = load_model(self.ckpt_dir, device=p.device, dtype=getattr(torch, self.dtype))
        self.engine = Engine(model, max_sessions=p.max_sessions, compile=p.compile, quant=p.quant,
                             **({"prefill_chunk": p.prefill_chunk} if p.prefill_chunk else {}))
        if p.quant != "none" or p.dtype == "auto":
            self.log.info("backbone %s, quant %s (%s requested)", self.dtype, self.engine.quant, p.quant)
        self.sampling = Sampling(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed)
        if p.compile:
            self._compile_now()

    WARMUP_SESSION = "__omniflow_compile__"
    WARMUP_FRAMES = 8              # whisper frames of the throw-away prompt that triggers compilation

    def _compile_now(self) -> None:
        """Run a throw-away session through the compiled step so compilation happens here, before
        any user is waiting: one session alone, then two at once (the batch shapes users bring)."""
        import time

        import torch

        t0 = time.perf_counter()
        embeds = torch.zeros(self.WARMUP_FRAMES, self.cfg.n_embd, device=self.params.device)  # (T, C)
        ids = [self.WARMUP_SESSION + str(i) for i in range(min(2, self.params.max_sessions))]
        for sid in ids:
            self.engine.start(sid, "A1A2", embeds=embeds, max_new_tokens=4)
            self.engine.step()
        for sid in ids:
            self.engine.stop(sid)
        self.log.info("decode step compiled in %.1f s", time.perf_counter() - t0)

    @property
    def tokenizer(self):
        if self._tokenizer is None:                  # loaded on the first text prompt only
            from omniflow.model.tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_dir(self.ckpt_dir)
        return self._tokenizer

    # --- inputs ------------------------------------------------------------------------------
    def process(self, port, frame: Frame):
        running = self.live.get(frame.session)
        if running is not None and frame.turn < running.turn:
            return                                   # a late frame of an older turn
        if port == "embeds" and frame.meta.get("tentative"):
            yield from self._speculate(frame)
            return
        if running is not None and running.speculative and self._confirms(running, port, frame):
            yield from self._confirm(running, frame)    # (checked and prefilled as the tentative)
            return
        request = self._request(port, frame)     # InputError: this turn fails, the others go on
        self._cancel(frame.session)                  # a new turn replaces whatever the session had
        self.queue.append(request)
        yield from self._admit()

    # --- speculation -------------------------------------------------------------------------
    def _speculate(self, frame: Frame):
        """Start the turn of a tentative utterance now, its outputs held (module doc). Skipped
        when speculation is off, the session already has a confirmed turn, or the engine has no
        free slot (or confirmed turns are waiting for one): the final then starts as usual."""
        if not self.params.speculate:
            return
        session = frame.session
        running = self.live.get(session)
        if (running is not None and not running.speculative) or any(r.session == session for r in self.queue):
            return
        try:
            req = self._request("embeds", frame)
        except InputError as e:                      # the final utterance reports it to its user
            self.log.debug("session %s turn %d: no speculation: %s", session, frame.turn, e)
            return
        self._cancel(session)                        # a newer tentative replaces the old speculation
        if self.queue or not self._has_room(req.task):
            self.log.debug("session %s turn %d: no free slot to speculate", session, frame.turn)
            return
        req.speculative, req.tentative = True, np.asarray(frame.data)
        self.log.debug("session %s turn %d: speculating on %d tentative frames", session, frame.turn,
                       len(req.tentative))
        yield from self._start(req)

    def _confirms(self, spec: _Request, port: str, final: Frame) -> bool:
        """Is `final` the very turn `spec` speculated on (same turn, task and embeds)?"""
        return (port == "embeds" and final.turn == spec.turn and self._task(port, final) == spec.task
                and np.array_equal(np.asarray(final.data), spec.tentative))

    def _task(self, port: str, frame: Frame) -> str:
        """The task a frame on `port` asks for: its meta["task"], else the port's default."""
        return frame.meta.get("task") or (self.params.task if port == "embeds" else self.params.text_task)

    def _confirm(self, req: _Request, final: Frame):
        """The final utterance is the speculated one: emit the held steps at once (stamped with
        the final frame's path) and go on decoding it as a confirmed turn."""
        held, req.held = req.held, []
        req.speculative, req.tentative, req.origin = False, None, final
        self.speculation_hits += 1
        self.log.debug("session %s turn %d: speculation confirmed, %d steps ready", req.session,
                       req.turn, len(held))
        for out in held:
            yield self._frame(req, out)

    def _request(self, port: str, frame: Frame) -> _Request:
        import torch

        task = self._task(port, frame)
        allowed = SPEECH_TASKS if port == "embeds" else TEXT_TASKS
        if task not in allowed:
            raise InputError(f"session {frame.session!r}: task {task!r} on the {port!r} input; "
                             f"that input takes tasks {allowed}")
        req = _Request(frame.session, frame.turn, task, origin=frame)
        if port == "embeds":
            embeds = np.asarray(frame.data)
            if embeds.ndim != 2 or embeds.shape[1] != self.cfg.n_embd or len(embeds) == 0:
                raise InputError(f"session {frame.session!r}: embeds of shape {embeds.shape}; expected "
                                 f"(T >= 1, {self.cfg.n_embd}): the adapter output of this checkpoint")
            room = self.prompt_room()
            if len(embeds) > room:
                raise InputError(f"the utterance is {len(embeds) * FEATURE_S:.1f} s ({len(embeds)} whisper "
                                 f"frames) but the model's context (block_size {self.cfg.block_size}) "
                                 f"takes at most {room} frames ({room * FEATURE_S:.1f} s): speak in "
                                 "shorter turns")
            req.embeds = torch.from_numpy(np.array(embeds, dtype=np.float32)).to(self.params.device)  # (T, n_embd)
        else:
            text = frame.meta.get("text")
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"session {frame.session!r}: a text prompt needs a non-empty "
                                 f"meta['text'], got {text!r}")
            req.text_ids = self.tokenizer.encode(text)
            room = self.prompt_room()
            if len(req.text_ids) > room:
                raise InputError(f"the typed prompt is {len(req.text_ids)} tokens but the model's "
                                 f"context (block_size {self.cfg.block_size}) takes at most {room}: "
                                 "send a shorter prompt")
        return req

    def prompt_room(self) -> int:
        """Most whisper frames / prompt tokens a turn may have: the context less the prompt's
        extra positions and one answer step."""
        return self.cfg.block_size - PROMPT_EXTRA - 1

    # --- scheduling --------------------------------------------------------------------------
    def _has_room(self, task: str) -> bool:
        from omniflow.model.prompts import get_task
        eng = self.engine
        return len(eng.sessions) < eng.max_sessions and eng.n_rows + len(get_task(task).rows) <= eng.max_rows

    def _admit(self):
        """Admit queued turns while the engine has room, dropping speculations to make room (a
        confirmed turn never waits for one)."""
        while self.queue:
            if not self._has_room(self.queue[0].task):
                spec = next((r for r in self.live.values() if r.speculative and r.session in self.engine), None)
                if spec is None:
                    return
                self.log.debug("session %s turn %d: speculation dropped for a confirmed turn",
                               spec.session, spec.turn)
                self._cancel(spec.session)
                continue
            yield from self._start(self.queue.popleft())

    def _start(self, req: _Request):
        """Put a turn into the engine. Prefilled at once, it emits its step-0 tokens here;
        chunked (prefill_chunk > 0), the step() that completes its prompt does."""
        kw = dict(embeds=req.embeds, text_ids=req.text_ids, sampling=self.sampling,
                  max_new_tokens=self._max_new_tokens(req))
        if self.params.prefill_chunk:
            self.engine.begin(req.session, req.task, **kw)
            req.embeds = None                        # the engine holds the prompt's embeddings
            self.live[req.session] = req
            return
        self._pick_threads()
        with self._burst_check():
            out = self.engine.start(req.session, req.task, **kw)
        req.embeds = None                            # the prompt is in the KV cache now
        self.live[req.session] = req
        yield from self._emit(req, out)

    def _max_new_tokens(self, req: _Request) -> int | None:
        """params.max_new_tokens, capped by what the context has left after this prompt."""
        if self.params.max_new_tokens is None:
            return None                              # the engine's default: fill the context
        prompt = (len(req.embeds) if req.embeds is not None else len(req.text_ids)) + PROMPT_EXTRA
        return max(1, min(self.params.max_new_tokens, self.cfg.block_size - prompt + 1))

    def _decoding(self) -> list[str]:
        """Sessions the next step() advances: all live turns but paused speculations."""
        return [s for s, r in self.live.items() if not r.paused(self.params.speculate_steps)]

    def has_work(self) -> bool:
        return bool(self._decoding())

    def step(self):
        decoding = self._decoding()
        confirmed = any(not self.live[s].speculative for s in decoding)
        if self.params.max_speed > 0 and confirmed:   # (a speculation alone races ahead: nobody hears it yet)
            time.sleep(max(0.0, self._next_step_at - time.monotonic()))
            self._next_step_at = time.monotonic() + SNAC_FRAME_S / self.params.max_speed
        self._pick_threads()
        t0 = time.perf_counter()
        with self._burst_check():
            outs = self.engine.step(sessions=None if len(decoding) == len(self.live) else decoding)
        self.decode_s += time.perf_counter() - t0
        self.decode_steps += 1
        for session, out in outs.items():
            yield from self._emit(self.live[session], out)
        yield from self._admit()

    def stats(self) -> dict[str, float]:
        """Batched decode steps so far and their total time (the gateway's /metrics: mean step
        time); speculations confirmed and cancelled unconfirmed."""
        return {"decode_steps": self.decode_steps, "decode_seconds": self.decode_s,
                "speculation_hits": self.speculation_hits, "speculation_misses": self.speculation_misses}

    def _pick_threads(self) -> None:
        """Every core while no confirmed answer has a complete SNAC frame (nothing for the
        vocoder to do yet, so this turn's prefill and first steps take the whole CPU: first audio
        comes sooner) and no other process is running on those cores; the CPU plan's `threads`
        once an answer is being voiced (the vocoder needs its share in real time)."""
        import torch

        if self._threads is None:                   # the plan's count (the runtime set it after setup)
            self._threads = torch.get_num_threads()
        if not self.live:                           # idle until now: the cores may be free again
            self._contended = False
        sessions = self.engine.sessions             # their step counts (0 = the prefill's)
        voiced = any(not r.speculative and s in sessions and sessions[s].step >= SPECULATE_STEPS
                     for s, r in self.live.items())
        want = self._threads
        if not (voiced or self._contended) and self._burst > self._threads:
            busy = others_running()                 # e.g. whisper encoding the next user's question
            if busy is None or busy + self._burst <= self._cores:
                want = self._burst
        if want != torch.get_num_threads():
            torch.set_num_threads(want)

    @contextmanager
    def _burst_check(self):
        """Around an engine call: if it ran on more threads than the plan's and the process got
        under 3/4 of a core per thread (another node, e.g. whisper encoding the next user's
        question, holds the cores; OpenMP threads that wait on each other then slow every
        step), the burst ends until the backbone is idle again."""
        import torch

        threads, wall, cpu = torch.get_num_threads(), time.perf_counter(), time.process_time()
        yield
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if threads > self._threads and wall >= BURST_CHECK_MIN_S and cpu < 0.75 * threads * wall:
            self._contended = True
            self.log.debug("burst threads: %.2f cores of %d in %.0f ms; back to %d", cpu / wall, threads,
                           wall * 1e3, self._threads)

    def _emit(self, req: _Request, out):
        """One engine step of `req`: its tokens frame, or held while `req` is a speculation."""
        if req.speculative:
            req.held.append(out)
            if req.paused(self.params.speculate_steps):
                self.log.debug("session %s turn %d: speculation paused after %d steps", req.session,
                               req.turn, len(req.held))
            return
        yield self._frame(req, out)

    def _frame(self, req: _Request, out) -> tuple[str, Frame]:
        meta: dict[str, Any] = {"step": out.step, "task": req.task}
        data = np.asarray(out.tokens, dtype=np.int64)                      # (8,) 7 audio + text
        if out.done:
            meta["stop"] = out.stop
            self.live.pop(req.session, None)          # the engine already freed its slot
            if not out.kept:
                data = None                           # the stop token is not part of the answer
        return "tokens", req.origin.follow("tokens", data, seq=out.step, meta=meta, last=out.done)

    def _cancel(self, session: str) -> None:
        self.queue = deque(r for r in self.queue if r.session != session)
        req = self.live.pop(session, None)
        if req is not None:
            self.engine.stop(session)                # (a speculation that already ended: no-op)
            if req.speculative:
                self.speculation_misses += 1
                self.log.debug("session %s turn %d: speculation cancelled", session, req.turn)

    def reset(self, session: str, turn: int):
        self._cancel(session)          # (the gate calls this only for a turn newer than any it saw)
        return ()
