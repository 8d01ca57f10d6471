"""SNAC 24 kHz decoding as a stream: each frame decoded once, output equal to a whole-turn decode.

SNAC's decoder is non-causal: every convolution pads both sides, so an output sample depends on
`LAG` samples (about 2.3 frames) of later codes. Decoding chunk by chunk in isolation (the original)
is wrong at both edges of every chunk; re-decoding a left context fixes the left edge only and
costs the context again on every chunk. `StreamingDecoder` instead keeps, for every convolution,
the last inputs it needs as explicit state, so each latent step goes through the network once:

    decoder(z_new, t0, end, noise..., state...) -> (audio, state...)

    z_new  (1, latent_dim, m)  latent steps t0 .. t0+m-1 (4 per SNAC frame, `codes_to_latent`)
    audio  (1, 1, 512·m)       output samples starting at sample 512·t0 - LAG (negative times:
                               not audio yet, dropped by the caller)

Every convolution zeroes its inputs outside [0, end) (latent steps, scaled to its rate), which
is exactly the zero padding of a whole decode of `end` steps: so with `end` = the turn's length
and enough trailing steps pushed through (`lag_steps` of zeros), the concatenated outputs equal
`SNAC.decode` of the whole turn to float rounding. Calling it on a *copy* of the state with
end = what is known so far gives the whole-decode-so-far's tail ("speculative" samples: what
the original plays, it never waits for right context); `SnacStream` uses that only when the
listener would otherwise run dry, and cross-fades into the exact samples when they come.

The state is a flat list of fixed-size tensors (`initial_state`), so the same module runs in
torch and exports to ONNX (`omniflow.model.onnx_export`, kind "snac_stream") with onnxruntime
holding nothing between calls. Noise (SNAC's NoiseBlock: x + n · conv1x1(x)) is an input per
block, so a stream can reproduce the deterministic "fixed" noise of a whole decode (`noise_rows`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omniflow.model.tokens import N_AUDIO_LAYERS, frames_to_codebooks

from omniflow.model.units import SNAC_COARSE_STRIDE as STEPS_PER_FRAME   # latent steps per frame
from omniflow.model.units import SNAC_HOP as HOP                          # output samples per latent step
from omniflow.model.units import SNAC_RATE as SAMPLE_RATE
from omniflow.model.units import SNAC_SAMPLES_PER_FRAME as SAMPLES_PER_FRAME
NOISE_MODES = ("fixed", "off", "random")
SPECULATE = ("auto", "always", "first")


# --- codes ---------------------------------------------------------------------------------
def frames_to_codes(frames: np.ndarray) -> list[np.ndarray]:
    """(F, 7) raw codes per frame -> SNAC's 3 codebook arrays (1, F), (1, 2F), (1, 4F), int64
    (the packing of omniflow.model.tokens.frames_to_codebooks, with SNAC's batch dim)."""
    return [c[None] for c in frames_to_codebooks(frames)]                    # (1, F·per)


class Latent:
    """Codes -> SNAC latent (quantizer.from_codes) in numpy: embedding, 1x1 projection, repeat."""

    def __init__(self, snac: nn.Module):
        self.tables = []                         # per codebook: (codebook_size, latent_dim) float32
        with torch.no_grad():
            for q in snac.quantizer.quantizers:
                emb = q.codebook.weight[:, :, None]                       # (N, codebook_dim, 1)
                proj = q.out_proj(emb)[:, :, 0]                           # (N, latent_dim)
                self.tables.append((proj.float().numpy(), q.stride))
        self.codebook_size = snac.codebook_size

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(F, 7) codes -> (1, latent_dim, 4F) float32."""
        frames = check_codes(frames, self.codebook_size)
        if not len(frames):
            return np.zeros((1, self.tables[0][0].shape[1], 0), np.float32)
        z = 0
        for (table, stride), codes in zip(self.tables, frames_to_codes(frames)):
            z = z + np.repeat(table[codes[0]], stride, axis=0)           # (4F, latent_dim)
        return np.ascontiguousarray(z.T[None], dtype=np.float32)


def load_snac(path) -> nn.Module:
    """The official format (`config.json` + `pytorch_model.bin` in `path`) -> snac.SNAC in eval mode."""
    from pathlib import Path

    from snac import SNAC

    from omniflow.model.weights import SNAC_CONFIG_FILE, SNAC_WEIGHTS_FILE, missing_files
    path = Path(path)
    missing = missing_files("snac", path)                # of config.json, pytorch_model.bin
    if missing:
        raise FileNotFoundError(f"{path / missing[0]} is missing: a SNAC checkpoint directory holds "
                                "config.json and pytorch_model.bin (run `omniflow fetch`)")
    model = SNAC.from_config(str(path / SNAC_CONFIG_FILE))
    model.load_state_dict(torch.load(path / SNAC_WEIGHTS_FILE, map_location="cpu", weights_only=True))
    hop = int(np.prod(model.encoder_rates))
    if hop * model.vq_strides[0] != SAMPLES_PER_FRAME or model.sampling_rate != SAMPLE_RATE:
        raise ValueError(f"this SNAC model has {hop * model.vq_strides[0]} samples per frame at "
                         f"{model.sampling_rate} Hz; Mini-Omni needs the 24 kHz model "
                         f"({SAMPLES_PER_FRAME} samples per frame): use hubertsiuzdak/snac_24khz")
    return model.eval()


def check_codes(frames: np.ndarray, codebook_size: int) -> np.ndarray:
    frames = np.asarray(frames, dtype=np.int64).reshape(-1, N_AUDIO_LAYERS)
    if len(frames) and (frames.min() < 0 or frames.max() >= codebook_size):
        raise ValueError(f"SNAC codes must be in [0, {codebook_size}); got [{frames.min()}, {frames.max()}] "
                         "(special ids must be dropped upstream)")
    return frames


class FixedNoise(nn.Module):
    """Replaces snac's NoiseBlock in a whole decode: same weights, noise = `noise_rows` by position."""

    def __init__(self, block: nn.Module, index: int, seed: int, decoder: "SnacDecoder", mode: str):
        super().__init__()
        self.linear = block.linear            # keeps the state-dict key `...block.2.linear...`
        self.index, self.seed, self.decoder, self.mode = index, seed, decoder, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # x: (B, C, T)
        if self.mode == "off":
            return x
        B, _, T = x.shape
        if self.mode == "random":
            noise = torch.randn((B, 1, T), device=x.device, dtype=x.dtype)
        else:
            per_frame = T // self.decoder.n_frames               # samples per frame at this rate
            rows = noise_rows(self.seed, self.index, self.decoder.start_frame * per_frame, T, per_frame)
            noise = torch.from_numpy(rows).to(x.device, x.dtype).expand(B, 1, T)
        return x + noise * self.linear(x)


class SnacDecoder:
    """Whole-window SNAC decode (snac's own `decode`) with a chosen noise: the reference a stream is
    measured against, and what a non-streaming caller (e.g. `train`) uses."""

    def __init__(self, model: nn.Module, noise: str = "fixed", seed: int = 0, device="cpu"):
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        from snac.layers import NoiseBlock

        self.model, self.device = model.to(device).eval(), device
        self.start_frame, self.n_frames = 0, 0
        blocks = [(parent, name, child) for parent in self.model.decoder.modules()
                  for name, child in parent.named_children() if isinstance(child, (NoiseBlock, FixedNoise))]
        for index, (parent, name, child) in enumerate(blocks):   # one decoder per model
            setattr(parent, name, FixedNoise(child, index, seed, self, noise))

    @classmethod
    def from_dir(cls, path, **kwargs) -> "SnacDecoder":
        return cls(load_snac(path), **kwargs)

    @torch.inference_mode()
    def decode(self, frames: np.ndarray, start_frame: int = 0) -> np.ndarray:
        """(F, 7) codes of frames start_frame.. -> float32 (F · 2048,) samples at 24 kHz."""
        frames = check_codes(frames, self.model.codebook_size)
        if len(frames) == 0:
            return np.zeros(0, np.float32)
        self.start_frame, self.n_frames = start_frame, len(frames)
        codes = [torch.from_numpy(c).to(self.device) for c in frames_to_codes(frames)]
        return self.model.decode(codes)[0, 0].float().cpu().numpy()           # (F·2048,)


# --- the streaming network -----------------------------------------------------------------
def _masked(x: torch.Tensor, t: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """x (B, C, n) at times t..t+n-1: zero outside [0, length) (a whole decode's zero padding)."""
    idx = torch.arange(x.shape[-1], device=x.device) + t
    return x * ((idx >= 0) & (idx < length)).to(x.dtype)


def _snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)      # snac.layers.snake


class _Snake(nn.Module):
    lag, n_state = 0, 0

    def __init__(self, m):
        super().__init__()
        self.alpha = nn.Parameter(m.alpha.detach().clone(), requires_grad=False)   # (1, C, 1)

    def forward(self, x, t, end, noise, state):
        return _snake(x, self.alpha), t, []


def _plain(conv):
    """A copy of a (weight-normed) conv as a plain one: g·v/|v| computed once, not per call."""
    kind = nn.ConvTranspose1d if isinstance(conv, nn.ConvTranspose1d) else nn.Conv1d
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
              bias=conv.bias is not None)
    if kind is nn.ConvTranspose1d:
        kw["output_padding"] = conv.output_padding
    plain = kind(conv.in_channels, conv.out_channels, conv.kernel_size, **kw)
    with torch.no_grad():
        plain.weight.copy_(conv.weight)
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    return plain.requires_grad_(False)


class _Pointwise(nn.Module):
    """A module that maps each time step on its own (1x1 conv, tanh): no state, no lag."""
    lag, n_state = 0, 0

    def __init__(self, m):
        super().__init__()
        self.m = _plain(m) if isinstance(m, nn.Conv1d) else m

    def forward(self, x, t, end, noise, state):
        return self.m(x), t, []


class _Conv(nn.Module):
    """Conv1d with symmetric padding p: keeps its last (k-1)·d inputs; output lags input by p."""
    n_state = 1

    def __init__(self, conv: nn.Conv1d, rate: int):
        super().__init__()
        k, d = conv.kernel_size[0], conv.dilation[0]
        self.ctx = (k - 1) * d
        if conv.stride[0] != 1 or conv.padding[0] * 2 != self.ctx:
            raise ValueError(f"cannot stream {conv}: needs stride 1 and 'same' padding")
        self.conv, self.rate, self.lag = _plain(conv), rate, conv.padding[0]

    def state_shape(self):
        return (self.conv.in_channels, self.ctx)

    def forward(self, x, t, end, noise, state):
        x = _masked(x, t, end * self.rate)
        buf = torch.cat([state[0], x], dim=-1)                              # (B, C, ctx + n)
        c = self.conv
        y = F.conv1d(buf, c.weight, c.bias, dilation=c.dilation, groups=c.groups)   # (B, C', n)
        return y, t - self.lag, [buf[..., buf.shape[-1] - self.ctx:]]


class _ConvT(nn.Module):
    """ConvTranspose1d with kernel 2s, stride s, padding p: keeps its last input; x s samples.

    Computed as the equivalent Conv1d of kernel 2 with s·C_out channels plus a depth-to-space
    reshape: output block b (s samples) = W[:, :, s:]ᵀ x[b-1] + W[:, :, :s]ᵀ x[b] + bias. Same
    arithmetic per sample, and a plain convolution is faster than a transposed one on CPU.
    """
    n_state = 1

    def __init__(self, conv: nn.ConvTranspose1d, rate: int):
        super().__init__()
        s = conv.stride[0]
        if (conv.kernel_size[0] != 2 * s or conv.output_padding[0] != 0 or conv.dilation[0] != 1
                or conv.groups != 1):
            raise ValueError(f"cannot stream {conv}: needs kernel 2·stride, no output padding, groups 1")
        self.rate, self.s, self.pad, self.out_channels = rate, s, conv.padding[0], conv.out_channels
        with torch.no_grad():
            w = conv.weight.detach()                                  # (C_in, C_out, 2s)
            c_in, c_out = w.shape[:2]
            # (C_out·s, C_in, 2): tap 0 reads x[b-1] (kernel taps s..2s-1), tap 1 reads x[b] (taps 0..s-1)
            w2 = torch.stack([w[:, :, s:], w[:, :, :s]], dim=-1)      # (C_in, C_out, s, 2)
            w2 = w2.permute(1, 2, 0, 3).reshape(c_out * s, c_in, 2)
            bias = conv.bias.detach().repeat_interleave(s) if conv.bias is not None else None   # (C_out·s,)
        self.register_buffer("weight", w2.contiguous())
        self.register_buffer("bias", bias)
        self.in_channels = c_in

    def state_shape(self):
        return (self.in_channels, 1)

    def forward(self, x, t, end, noise, state):
        x = _masked(x, t, end * self.rate)
        buf = torch.cat([state[0], x], dim=-1)                              # (B, C, 1 + n): t-1 .. t+n-1
        B, n = x.shape[0], x.shape[-1]
        y = F.conv1d(buf, self.weight, self.bias)                           # (B, C_out·s, n): blocks t..t+n-1
        y = y.view(B, self.out_channels, self.s, n).transpose(2, 3).reshape(B, self.out_channels, n * self.s)
        # block b covers uncropped samples b·s..; cropped by the padding: starts at t·s - pad
        return y, t * self.s - self.pad, [buf[..., n:]]


class _Noise(nn.Module):
    """SNAC's NoiseBlock with the noise given as an input: x + noise · conv1x1(x)."""
    lag, n_state = 0, 0

    def __init__(self, block):
        super().__init__()
        self.linear = _plain(block.linear)

    def forward(self, x, t, end, noise, state):
        return x + noise * self.linear(x), t, []


class _Residual(nn.Module):
    """ResidualUnit: x + branch(x); the skip path is delayed by the branch's lag."""

    def __init__(self, unit, rate: int):
        super().__init__()
        self.branch = nn.ModuleList(_stream_ops(unit.block, rate))
        self.lag = sum(op.lag for op in self.branch)
        self.n_state = 1 + sum(op.n_state for op in self.branch)

    def state_shape(self):
        channels = self.branch[0].alpha.shape[1]
        return [(channels, self.lag)] + [s for op in self.branch if op.n_state for s in _shapes(op)]

    def forward(self, x, t, end, noise, state):
        n = x.shape[-1]
        buf = torch.cat([state[0], x], dim=-1)                              # (B, C, lag + n)
        y, new, i = x, [buf[..., n:]], 1
        for op in self.branch:
            y, t, s = op(y, t, end, noise, state[i:i + op.n_state])
            new += s
            i += op.n_state
        return buf[..., :n] + y, t, new


def _shapes(op) -> list[tuple[int, int]]:
    shape = op.state_shape()
    return shape if isinstance(shape, list) else [shape]


def _stream_ops(seq: nn.Module, rate: int) -> list[nn.Module]:
    """SNAC decoder modules (in order) -> streaming ops; `rate` = samples per latent step here."""
    from snac.layers import DecoderBlock, NoiseBlock, ResidualUnit, Snake1d

    ops = []
    for m in seq.children():
        if isinstance(m, DecoderBlock):
            inner = _stream_ops(m.block, rate)
            ops += inner
            rate *= math.prod(op.s for op in inner if isinstance(op, _ConvT))
        elif isinstance(m, Snake1d):
            ops.append(_Snake(m))
        elif isinstance(m, nn.ConvTranspose1d):
            ops.append(_ConvT(m, rate))
            rate *= m.stride[0]
        elif isinstance(m, nn.Conv1d):
            ops.append(_Conv(m, rate) if m.kernel_size[0] > 1 else _Pointwise(m))
        elif isinstance(m, NoiseBlock) or type(m).__name__ == "FixedNoise":
            ops.append(_Noise(m))
        elif isinstance(m, ResidualUnit):
            ops.append(_Residual(m, rate))
        elif isinstance(m, (nn.Tanh, nn.Identity)):
            ops.append(_Pointwise(m))
        else:
            raise ValueError(f"cannot stream SNAC decoder layer {type(m).__name__} (local attention is "
                             "not streamable: use a SNAC model with attn_window_size null, e.g. snac_24khz)")
    return ops


class StreamingDecoder(nn.Module):
    """SNAC decoder with explicit conv state: forward(z, t0, end, *noise, *state) -> (audio, *state).

    z (1, latent_dim, m) float32; t0, end: 0-d int64 (latent steps); noise: one (1, 1, m·rate)
    tensor per noise block (`noise_rates`), or none when built with noise=False; state: the
    tensors of `initial_state()`, in order. Returns audio (1, 1, 512·m) at samples
    512·t0 - LAG.., and the new state.
    """

    def __init__(self, snac: nn.Module, noise: bool = True):
        super().__init__()
        self.ops = nn.ModuleList(_stream_ops(snac.decoder.model, 1))     # copies: `snac` is left as is
        if not noise:
            self.ops = nn.ModuleList(op for op in self.ops if not isinstance(op, _Noise))
        self.noise = noise
        self.noise_rates, rate = [], 1                # samples per latent step at each noise block
        for op in self.ops:
            rate *= op.s if isinstance(op, _ConvT) else 1
            if isinstance(op, _Noise):
                self.noise_rates.append(rate)
        self.hop = rate
        if self.hop != HOP:
            raise ValueError(f"this SNAC decoder upsamples x{self.hop}; the 24 kHz model has {HOP}")
        self.lag = -self.output_start(0)              # output samples the stream lags its input
        self.lag_steps = math.ceil(self.lag / HOP)    # latent steps of zeros that flush it
        self.state_shapes = [s for op in self.ops if op.n_state for s in _shapes(op)]

    def output_start(self, t0: int) -> int:
        """Time (output samples) of the first output sample when the input starts at step t0."""
        t = t0
        for op in self.ops:
            t = op_time(op, t)
        return t

    def noise_starts(self, t0: int) -> list[int]:
        """Time of the first sample each noise block sees, for an input starting at step t0."""
        t, out = t0, []
        for op in self.ops:
            if isinstance(op, _Noise):
                out.append(t)
            t = op_time(op, t)
        return out

    def initial_state(self, dtype=torch.float32) -> list[torch.Tensor]:
        return [torch.zeros((1, *shape), dtype=dtype) for shape in self.state_shapes]

    def forward(self, z, t0, end, *rest):
        n_noise = len(self.noise_rates)
        noise, state = list(rest[:n_noise]), list(rest[n_noise:])
        x, t, new, i, k = z, t0, [], 0, 0
        for op in self.ops:
            nz = None
            if isinstance(op, _Noise):
                nz, k = noise[k], k + 1
            x, t, s = op(x, t, end, nz, state[i:i + op.n_state])
            new += s
            i += op.n_state
        return (x, *new)


def op_time(op, t: int) -> int:
    """Start time after `op` for input starting at t (python ints; mirrors the ops' forward)."""
    if isinstance(op, _ConvT):
        return t * op.s - op.pad
    return t - op.lag


def noise_rows(seed: int, block: int, start: int, n: int, per_frame: int) -> np.ndarray:
    """The "fixed" noise of `block` at samples start..start+n (its own rate): one row per frame.

    Row f is `default_rng([seed, block, f]).standard_normal(per_frame)`, a function of the absolute
    position only, so a streamed decode sees exactly the noise a whole decode sees.
    """
    out = np.zeros(n, np.float32)
    if n <= 0:
        return out
    first, last = max(0, start // per_frame), (start + n - 1) // per_frame
    for f in range(first, last + 1):
        row = np.random.default_rng([seed, block, f]).standard_normal(per_frame, dtype=np.float32)
        a, b = max(start, f * per_frame), min(start + n, (f + 1) * per_frame)
        out[a - start:b - start] = row[a - f * per_frame:b - f * per_frame]
    return out


# --- runners: the same step in torch or onnxruntime ---------------------------------------
class TorchRunner:
    """Runs a StreamingDecoder in torch; state stays torch tensors."""

    def __init__(self, decoder: StreamingDecoder, device: str = "cpu"):
        self.decoder, self.device = decoder.to(device).eval(), device

    def initial_state(self):
        return [s.to(self.device) for s in self.decoder.initial_state()]

    @torch.inference_mode()
    def __call__(self, z: np.ndarray, t0: int, end: int, noise: list[np.ndarray], state):
        dev = self.device
        args = [torch.from_numpy(n).to(dev) for n in noise]
        out = self.decoder(torch.from_numpy(z).to(dev), torch.tensor(t0, device=dev),
                           torch.tensor(end, device=dev), *args, *state)
        return out[0][0, 0].float().cpu().numpy(), list(out[1:])


class OrtRunner:
    """Runs the ONNX export of a StreamingDecoder; state stays numpy arrays between calls."""

    def __init__(self, path, decoder: StreamingDecoder, device: str = "auto", threads: int | None = None):
        from omniflow.model.ort import session

        self.session = session(path, device, threads=threads)
        self.shapes = decoder.state_shapes
        self.n_noise = len(decoder.noise_rates)
        self.state_names = [f"state_{i}" for i in range(len(self.shapes))]

    def initial_state(self):
        return [np.zeros((1, *s), np.float32) for s in self.shapes]

    def __call__(self, z, t0, end, noise, state):
        feeds = {"z": z, "t0": np.array(t0, np.int64), "end": np.array(end, np.int64)}
        feeds.update({f"noise_{i}": n for i, n in enumerate(noise)})
        feeds.update(zip(self.state_names, state))
        out = self.session.run(None, feeds)
        return out[0][0, 0], out[1:]


# --- per-session streaming with speculation and cross-fade ---------------------------------
def _smooth(average: float, x: float) -> float:
    """An exponential average of the per-push figures (0: none yet); half weight on the newest."""
    return x if not average else 0.5 * average + 0.5 * x


def fade_in(n: int) -> np.ndarray:
    """Raised-cosine weights rising from ~0 to ~1 over n samples (the new signal's share)."""
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)


@dataclass
class TurnStream:
    """One session's vocoder state for its current turn (explicit, resettable)."""

    turn: int
    frames: int = 0                    # frames pushed so far
    state: list | None = None          # decoder conv state (None: start of the turn)
    sent: int = 0                      # samples handed out so far
    exact: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # exact, from `sent` on
    held: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))   # speculative, not sent
    played_until: float = 0.0          # clock time the listener runs out of samples (plays 24 kHz
                                       # from the first one, resuming after each gap)
    last_push_at: float | None = None
    interval: float = 0.0              # smoothed seconds between pushes
    chunk_s: float = 0.0               # smoothed seconds of audio per push (same smoothing)
    speculated: int = 0                # pushes that ran a speculative tail
    speculated_steps: int = 0          # latent steps those tails decoded (lag_steps at most each)


class SnacStream:
    """Chunks of frames in, playable samples out; equal to a whole-turn decode wherever it can be.

    Per push: the new frames go through `StreamingDecoder` once (exact samples up to LAG behind
    the frames). If the listener would otherwise run dry, the missing tail is speculated (a
    decode of a copy of the state as if the turn ended here: what chunked decoders play) and all
    but `crossfade_ms` of it is handed out; the held samples cross-fade into the exact ones when
    they arrive. `speculate`:
      "auto"   on the first push the whole tail; later only when what the listener still has
               plus the exact samples of this push would not last until the next push is expected
               (the smoothed interval between pushes x `margin`), and then only as many latent
               steps of the tail as cover that (a speculated prefix is the whole tail's prefix:
               the decoder is causal in its state), so a stream that keeps real time pays little;
               never while the audio arrives slower than it plays (the smoothed audio per push
               under the smoothed interval): no tail can then prevent the wait, only move it;
      "always" on every push the whole tail (lowest latency per chunk, costs lag_steps more steps);
      "first"  on the turn's first push only (deterministic; later chunks come LAG later).
    The last push flushes: a turn of F frames gives exactly F x 2048 samples.
    """

    def __init__(self, decoder: StreamingDecoder, runner, latent: Latent, *, noise: str = "fixed", seed: int = 0,
                 crossfade_ms: float = 10.0, speculate: str = "auto", margin: float = 1.5, clock=time.monotonic):
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        if speculate not in SPECULATE:
            raise ValueError(f"speculate must be one of {SPECULATE}, got {speculate!r}")
        if crossfade_ms < 0:
            raise ValueError("crossfade_ms must be >= 0")
        if noise != "off" and not decoder.noise:
            raise ValueError(f"noise={noise!r} needs a StreamingDecoder built with noise=True")
        self.decoder, self.runner, self.latent = decoder, runner, latent
        self.noise, self.seed, self.speculate, self.margin, self.clock = noise, seed, speculate, margin, clock
        self.crossfade = round(crossfade_ms * SAMPLE_RATE / 1000)              # samples
        self.lag, self.lag_steps = decoder.lag, decoder.lag_steps

    def _noise(self, t0: int, m: int) -> list[np.ndarray]:
        if not self.decoder.noise:
            return []
        out = []
        for block, (start, rate) in enumerate(zip(self.decoder.noise_starts(t0), self.decoder.noise_rates)):
            n = m * rate
            if self.noise == "fixed":
                out.append(noise_rows(self.seed, block, start, n, rate * STEPS_PER_FRAME)[None, None])
            elif self.noise == "random":
                out.append(np.random.standard_normal((1, 1, n)).astype(np.float32))
            else:
                out.append(np.zeros((1, 1, n), np.float32))
        return out

    def _run(self, z: np.ndarray, t0: int, end: int, state):
        """Decode latent steps t0.. ; return (samples at times >= 0 with their start time, new state)."""
        audio, state = self.runner(z, t0, end, self._noise(t0, z.shape[-1]), state)
        start = t0 * HOP - self.lag
        skip = max(0, -start)
        return np.asarray(audio[skip:], np.float32), start + skip, state

    def _flush(self, state, t0: int, end: int, steps: int | None = None):
        """Push `steps` (default lag_steps: all) latent steps of zeros: the tail as if the turn
        ended at `end`, up to the end of the known frames."""
        zeros = np.zeros((1, self.decoder_latent_dim, steps or self.lag_steps), np.float32)
        audio, start, _ = self._run(zeros, t0, end, state)
        return audio[:end * HOP - start], start              # up to the end of the known frames

    @property
    def decoder_latent_dim(self) -> int:
        return self.decoder.state_shapes[0][0]

    def push_frames(self, s: TurnStream, frames: np.ndarray, last: bool) -> np.ndarray:
        """(F, 7) codes of the turn's next F frames -> samples playable now (float32)."""
        return self.push(s, self.latent(frames), last)

    def push(self, s: TurnStream, z: np.ndarray, last: bool) -> np.ndarray:
        """Latent (1, D, 4F) of the next F frames -> samples playable now (float32)."""
        now = self.clock()
        t0, m = s.frames * STEPS_PER_FRAME, z.shape[-1]
        if s.last_push_at is not None:
            s.interval = _smooth(s.interval, now - s.last_push_at)
            s.chunk_s = _smooth(s.chunk_s, m * HOP / SAMPLE_RATE)
        s.last_push_at = now
        if s.state is None:
            s.state = self.runner.initial_state()
        end_known = t0 + m
        if m:
            audio, start, s.state = self._run(z, t0, 2 ** 40, s.state)   # end unknown: no right edge
            self._add_exact(s, audio, start)
        s.frames += m // STEPS_PER_FRAME
        total = s.frames * SAMPLES_PER_FRAME
        if last:
            if s.frames:
                audio, start = self._flush(s.state, end_known, end_known)
                self._add_exact(s, audio, start)
            cand, spec = s.exact, False
        else:
            cand, spec = s.exact, False
            exact_end = s.sent + len(s.exact)
            steps = self._speculation_steps(s, now, exact_end, end_known) if exact_end < total else 0
            if steps:
                tail, start = self._flush(list(s.state), end_known, end_known, steps)
                tail = tail[exact_end - start:]
                cand, spec = np.concatenate([s.exact, tail]), True
                s.speculated += 1
                s.speculated_steps += steps
        h = len(s.held)
        if len(cand) < h:                      # the held samples wait for what they fade into
            return np.zeros(0, np.float32)
        out = cand.copy()
        if h:
            w = fade_in(h)
            out[:h] = s.held * (1 - w) + cand[:h] * w
        keep = min(self.crossfade, len(out)) if spec else 0
        send, s.held = out[:len(out) - keep], out[len(out) - keep:].copy()
        s.exact = s.exact[min(len(s.exact), len(send)):]
        s.sent += len(send)
        if len(send):
            s.played_until = max(s.played_until, now) + len(send) / SAMPLE_RATE
        return send

    def _add_exact(self, s: TurnStream, audio: np.ndarray, start: int) -> None:
        """Keep the exact samples not handed out yet (those before `sent` were played speculated)."""
        end = start + len(audio)
        have = s.sent + len(s.exact)
        if end <= have:
            return
        s.exact = np.concatenate([s.exact, audio[max(0, have - start):]])

    def _speculation_steps(self, s: TurnStream, now: float, exact_end: int, end_known: int) -> int:
        """Latent steps of the speculated tail this push needs (0: none; lag_steps: all of it)."""
        if self.speculate == "always" or s.sent == 0:
            return self.lag_steps
        if self.speculate == "first":
            return 0
        if s.chunk_s < s.interval:      # audio arrives slower than it plays: the listener will wait
            return 0                    # anyway, and a tail played early only moves that wait later
                                        # (at the cost of CPU the producer needs to catch up)
        lead = max(0.0, s.played_until - now)                           # s the listener still has
        cover = lead + (exact_end - s.sent) / SAMPLE_RATE               # ... with this push's exact
        want = self.margin * s.interval
        if cover >= want:
            return 0
        target = exact_end + math.ceil((want - cover) * SAMPLE_RATE) + self.crossfade   # sample
        exact_stop = end_known * HOP - self.lag                         # where the exact samples end
        return max(1, min(self.lag_steps, math.ceil((target - exact_stop) / HOP)))


def build_stream(path, **kwargs) -> SnacStream:
    """A SnacStream for the SNAC checkpoint in `path` (config.json + pytorch_model.bin); an ONNX
    export (runtime "onnx") is cached next to the weights. kwargs: those of `make_stream`."""
    return make_stream(load_snac(path), cache_dir=path, **kwargs)


def make_stream(model: nn.Module, *, runtime: str = "torch", device: str = "cpu", noise: str = "fixed",
                seed: int = 0, crossfade_ms: float = 10.0, speculate: str = "auto", threads: int | None = None,
                cache_dir=None) -> SnacStream:
    """A SnacStream on a loaded snac.SNAC (left unchanged: the stream decodes with its own copies).

    runtime "onnx" exports the streaming decoder to `cache_dir` once (re-exported when the weights
    change; `omniflow.model.onnx_export.cached_export`) and runs it with onnxruntime.
    """
    if runtime not in ("torch", "onnx"):
        raise ValueError(f"SNAC runtime {runtime!r} is not available; use torch or onnx")
    decoder = StreamingDecoder(model, noise=noise != "off").eval()
    if runtime == "onnx":
        import tempfile

        from omniflow.model.onnx_export import cached_export
        name = "snac_stream.onnx" if decoder.noise else "snac_stream_nonoise.onnx"
        path = cached_export("snac_stream", decoder, cache_dir or tempfile.mkdtemp(), name)
        runner = OrtRunner(path, decoder, device, threads)
    else:
        runner = TorchRunner(decoder, device)
    stream = SnacStream(decoder, runner, Latent(model), noise=noise, seed=seed, crossfade_ms=crossfade_ms,
                        speculate=speculate)
    stream.push(TurnStream(turn=-1), np.zeros((1, decoder.state_shapes[0][0], STEPS_PER_FRAME), np.float32),
                last=True)          # warm-up: the first call of a runtime is slow; keep it out of a turn
    return stream
