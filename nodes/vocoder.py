"""SNAC 24 kHz vocoder node: chunks of whole SNAC frames -> 24 kHz float32 PCM, seamless across chunks.

The decoding is `omniflow.model.snac_stream`: every frame goes through SNAC's decoder once (conv
state kept per session), and the stream equals a whole-turn decode except where the listener
would run dry before the right context arrives; there the missing tail is decoded as if the turn
ended (speculated), played, and cross-faded (`crossfade_ms`) into the exact samples when they come.
`speculate` says when (auto: only when needed; always; first: the turn's first chunk only). A turn
of F frames gives exactly F × 2048 samples.

`noise`: SNAC adds `randn · conv1x1(x)` after every decoder upsampling, so the original is
stochastic. "fixed" (default): the noise is a fixed function of (seed, block, absolute sample
position), so output is deterministic and a stream sees the noise a whole decode sees; "off": none;
"random": fresh normal noise on every call.

`runtime`: torch, or onnx (onnxruntime: the streaming decoder exported once next to the weights).
Weights: the official `config.json` + `pytorch_model.bin` (hubertsiuzdak/snac_24khz), found by
`omniflow.model.weights.resolve("snac", params.checkpoint)`.
"""
from __future__ import annotations

from typing import Literal

import msgspec

from omniflow.frame import Frame
from omniflow.model.snac_stream import (NOISE_MODES, SAMPLE_RATE, SPECULATE, SnacStream,
                                        TurnStream, build_stream)
from omniflow.node import Node
from omniflow.params import Device, NonNegative


class SnacVocoder(Node):
    inputs = {"codes": "codes"}
    outputs = {"pcm": "pcm"}
    cpu_weight = 1                 # CPU plan: its share of the cores (omniflow.launch.plan)

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        checkpoint: str | None = None     # SNAC dir (config.json + pytorch_model.bin); None: cache/fetch
        crossfade_ms: NonNegative = 10.0        # speculated samples held back and cross-faded into exact ones
        speculate: Literal[SPECULATE] = "auto"   # auto | always | first (module doc)
        noise: Literal[NOISE_MODES] = "fixed"    # fixed | off | random (module doc)
        seed: int = 0                     # for noise="fixed"
        device: Device = "cpu"
        runtime: Literal["torch", "onnx"] = "torch"

    def setup(self):
        p = self.params
        if p.noise not in NOISE_MODES or p.speculate not in SPECULATE:
            raise ValueError(f"vocoder noise must be one of {NOISE_MODES} and speculate one of {SPECULATE}; "
                             f"got noise={p.noise!r}, speculate={p.speculate!r}")
        from omniflow.model import weights
        path = weights.resolve("snac", p.checkpoint)
        weights.warn_if_demo(path, self.log)
        self.stream: SnacStream = build_stream(path, runtime=p.runtime, device=p.device, noise=p.noise,
                                               seed=p.seed, crossfade_ms=p.crossfade_ms, speculate=p.speculate)
        self.states: dict[str, TurnStream] = {}
        self.gaps: dict[str, int] = {}            # session -> turn whose lost frames were logged

    def process(self, port, frame: Frame):
        state = self.states.get(frame.session)
        if state is None or state.turn != frame.turn:
            state = self.states[frame.session] = TurnStream(turn=frame.turn)
        first = frame.meta.get("first_frame", state.frames)
        if first != state.frames and self.gaps.get(frame.session) != frame.turn:
            self.gaps[frame.session] = frame.turn                 # logged once per turn
            self.log.warning("session %s turn %d: chunk starts at frame %s, expected %s: frames lost "
                             "upstream (a restart?); not repeated for this turn", frame.session,
                             frame.turn, first, state.frames)
        start_sample = state.sent
        pcm = self.stream.push_frames(state, frame.data, last=frame.last)
        if frame.last:
            self.states.pop(frame.session, None)
            self.gaps.pop(frame.session, None)
        if len(pcm) or frame.last:
            yield "pcm", frame.follow("pcm", pcm, last=frame.last,
                                      meta={"rate": SAMPLE_RATE, "first_sample": start_sample})

    def reset(self, session: str, turn: int):
        self.states.pop(session, None)
        self.gaps.pop(session, None)
        return ()
