"""Export the swappable components to ONNX: whisper encoder, whisper adapter, SNAC decoder.

Each export has fixed input/output names, dynamic axes where the component allows them, and the
SHA-256 of the source weights in its metadata (`omniflow.source_sha256`), so `cached_export` reuses
a file next to the weights only while the weights are unchanged:

    path = cached_export("adapter", model.whisper_adapter, ckpt_dir)   # ckpt_dir/whisper_adapter.onnx

| kind      | inputs (dtype, shape)                                   | output                          |
|-----------|---------------------------------------------------------|---------------------------------|
| whisper   | mel float32 (B, n_mels, 3000)                           | features (B, 1500, n_audio_state) |
| adapter   | features float32 (B, T, whisper_adapter_dim)            | embeds (B, T, n_embd)           |
| snac      | codes_0 / codes_1 / codes_2 int64 (B, F), (B, 2F), (B, 4F) | audio (B, 1, F·2048)         |
| snac_stream | z (1, 768, m), t0, end, noise_i, state_i (snac_stream.py) | audio (1, 1, 512·m), new_state_i |

SNAC noise: every SNAC `DecoderBlock` has a `NoiseBlock` that adds `randn · conv1x1(x)` (REFERENCE
§5.1), so torch decoding is stochastic. The export **disables it** (the block becomes the identity):
the ONNX decoder is deterministic and equals torch SNAC with noise off (the vocoder node's
`noise: off`). The noise is a small high-frequency dither; without it the codec output is the
network's mean prediction.

Exports go through `torch.onnx.export(dynamo=True)` (torch.export + onnxscript): the legacy
TorchScript exporter bakes SNAC's frame count into its reshapes. Needs `pip install omniflow[onnx]`.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

OPSET = 18
HASH_KEY = "omniflow.source_sha256"      # ONNX metadata key holding the source weights' hash
EXPORT_VERSION = "1"                      # bump when an export's graph changes for the same weights
WHISPER_FRAMES = 3000                     # mel frames in whisper's 30 s window (openai-whisper asserts it)
# kind -> default file name (next to the weights)
FILE_NAMES = {"whisper": "whisper_encoder.onnx", "adapter": "whisper_adapter.onnx", "snac": "snac_decoder.onnx",
              "snac_stream": "snac_stream.onnx"}


def _need_onnxscript() -> None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter imports it)
    except ImportError as e:
        raise ImportError("ONNX export needs onnxscript: pip install 'omniflow[onnx]' "
                          "(or pip install onnxscript onnx)") from e


def weights_hash(module: nn.Module, kind: str = "") -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, values) and the export kind."""
    h = hashlib.sha256(f"{kind}:{EXPORT_VERSION}".encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")     # hashed in place, not copied
    return h.hexdigest()


def _prepare(module: nn.Module) -> nn.Module:
    """An fp32, CPU, eval copy to export (the caller's module is left as it was).

    Weight-norm parametrizations are kept: removing them from a deep copy would also strip them
    from the original (torch shares the generated Parametrized* class between the two).
    """
    return copy.deepcopy(module).float().cpu().eval()


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes,
            source_hash: str) -> Path:
    _need_onnxscript()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, input_names=list(input_names),
                                    output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                    opset_version=OPSET, verbose=False)
    program.model.metadata_props[HASH_KEY] = source_hash
    tmp = path.with_name(path.name + ".tmp")
    program.save(str(tmp))
    os.replace(tmp, path)                 # a reader never sees a half-written file
    log.info("exported %s (%s)", path, source_hash[:12])
    return path


# --- the three components ----------------------------------------------------------------------
def export_whisper_encoder(encoder: nn.Module, path, *, source_hash: str | None = None) -> Path:
    """openai-whisper `AudioEncoder` (e.g. `whisper.load_model(...).encoder`) -> ONNX, dynamic batch."""
    enc = _prepare(encoder)
    n_mels = enc.conv1.in_channels
    batch = torch.export.Dim("batch", min=1, max=1024)
    mel = torch.zeros(2, n_mels, WHISPER_FRAMES)                    # (B, n_mels, 3000)
    return _export(enc, (mel,), Path(path), ["mel"], ["features"], {"x": {0: batch}},
                   source_hash or weights_hash(encoder, "whisper"))


def export_adapter(adapter: nn.Module, path, *, source_hash: str | None = None) -> Path:
    """Mini-Omni whisper adapter (SwiGLU `fc_1/fc_2/proj`) -> ONNX, dynamic batch and frames."""
    ad = _prepare(adapter)
    batch, frames = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("frames", min=1, max=65536)
    features = torch.zeros(2, 3, ad.fc_1.in_features)               # (B, T, whisper_adapter_dim)
    return _export(ad, (features,), Path(path), ["features"], ["embeds"],
                   {"x": {0: batch, 1: frames}}, source_hash or weights_hash(adapter, "adapter"))


def _is_noise_block(m: nn.Module) -> bool:
    # snac's NoiseBlock, or the vocoder node's FixedNoise that replaces it (same role, same place).
    return type(m).__name__ in ("NoiseBlock", "FixedNoise")


class SnacDecode(nn.Module):
    """SNAC codes -> audio with the noise blocks removed: forward(codes_0, codes_1, codes_2)."""

    def __init__(self, snac: nn.Module):
        super().__init__()
        self.snac = snac
        for parent in list(snac.decoder.modules()):
            for name, child in list(parent.named_children()):
                if _is_noise_block(child):
                    setattr(parent, name, nn.Identity())

    def forward(self, codes_0: torch.Tensor, codes_1: torch.Tensor, codes_2: torch.Tensor) -> torch.Tensor:
        return self.snac.decode([codes_0, codes_1, codes_2])        # (B, 1, F·2048)


def export_snac_decoder(snac: nn.Module, path, *, source_hash: str | None = None) -> Path:
    """`snac.SNAC` decoder (noise disabled, see module doc) -> ONNX, dynamic batch and frames."""
    strides = list(snac.vq_strides)
    if len(strides) != 3:
        raise ValueError(f"expected a 3-codebook SNAC (vq_strides like [4, 2, 1]), got vq_strides={strides}")
    dec = SnacDecode(_prepare(snac)).eval()
    batch, frames = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("frames", min=1, max=4096)
    per_frame = [strides[0] // s for s in strides]                   # codes per coarse frame: [1, 2, 4]
    codes = tuple(torch.zeros(1, 2 * k, dtype=torch.long) for k in per_frame)   # (B, F·k), F=2
    dynamic = {f"codes_{i}": {0: batch, 1: k * frames} for i, k in enumerate(per_frame)}
    return _export(dec, codes, Path(path), ["codes_0", "codes_1", "codes_2"], ["audio"], dynamic,
                   source_hash or weights_hash(snac, "snac"))


def export_snac_stream(decoder: nn.Module, path, *, source_hash: str | None = None) -> Path:
    """`omniflow.model.snac_stream.StreamingDecoder` -> ONNX, dynamic number of latent steps.

    Inputs z (1, latent_dim, m), t0 and end (int64 scalars), noise_i (1, 1, rate_i·m) when built
    with noise, state_i (fixed shapes); outputs audio (1, 1, 512·m) and new_state_i.
    """
    _need_onnxscript()
    dec = copy.deepcopy(decoder).float().cpu().eval()
    m = 8
    steps = torch.export.Dim("steps", min=1, max=65536)
    z = torch.zeros(1, dec.state_shapes[0][0], m)
    noise = [torch.zeros(1, 1, m * r) for r in dec.noise_rates]
    state = dec.initial_state()
    args = (z, torch.tensor(0), torch.tensor(1 << 40), *noise, *state)
    rest = tuple([{2: r * steps} for r in dec.noise_rates] + [None] * len(state))
    names = (["z", "t0", "end"] + [f"noise_{i}" for i in range(len(noise))]
             + [f"state_{i}" for i in range(len(state))])
    with torch.no_grad():          # *args forward: torch.export takes the nested dynamic shapes
        program = torch.export.export(dec, args, dynamic_shapes=({2: steps}, None, None, rest))
    return _export(program, args, Path(path), names, ["audio"] + [f"new_state_{i}" for i in range(len(state))],
                   None, source_hash or weights_hash(decoder, "snac_stream"))


EXPORTERS = {"whisper": export_whisper_encoder, "adapter": export_adapter, "snac": export_snac_decoder,
             "snac_stream": export_snac_stream}


# --- cache --------------------------------------------------------------------------------------
def source_hash_of(path) -> str | None:
    """The source-weights hash stored in an exported file (None if absent or unreadable)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:              # a truncated or foreign file: treat as stale, say why
        log.warning("cannot read %s (%s); it will be re-exported", path, e)
        return None
    return {p.key: p.value for p in model.metadata_props}.get(HASH_KEY)


def cached_export(kind: str, module: nn.Module, cache_dir, name: str | None = None) -> Path:
    """`cache_dir/<name>` exported from `module`, re-exported only when its weights changed.

    kind: "whisper" | "adapter" | "snac" | "snac_stream"; name defaults to FILE_NAMES[kind]. `cache_dir` is the
    weights' directory; where it cannot be written the file goes to $OMNIFLOW_HOME/onnx/<hash>/.
    """
    if kind not in EXPORTERS:
        raise ValueError(f"unknown ONNX export kind {kind!r}; choose one of {', '.join(EXPORTERS)}")
    h = weights_hash(module, kind)
    path = Path(cache_dir).expanduser() / (name or FILE_NAMES[kind])
    if path.is_file() and source_hash_of(path) == h:
        return path                    # also works from a read-only weights folder
    if not _writable(path.parent):
        from omniflow.model.weights import home

        fallback = home() / "onnx" / h[:16] / path.name
        log.warning("cannot write to %s; caching the ONNX export at %s instead", path.parent, fallback)
        path = fallback
    if path.is_file() and source_hash_of(path) == h:
        return path
    return EXPORTERS[kind](module, path, source_hash=h)


def cached_quantized(path) -> Path:
    """`<stem>_int8.onnx` beside the float32 export at `path`: its MatMul weights quantized to 8 bits
    per output channel (onnxruntime dynamic quantization: activations are quantized per call), redone
    only when the float32 export changed (its source hash is copied into the quantized file).

    uint8 weights per channel and MatMuls with a constant weight only (attention's activation x
    activation products stay float32): the most accurate of the variants measured on whisper-small.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    out = path.with_name(path.stem + "_int8.onnx")
    h = source_hash_of(path)
    if out.is_file() and h is not None and source_hash_of(out) == h:
        return out
    if not _writable(out.parent):
        from omniflow.model.weights import home
        out = home() / "onnx" / (h or "unknown")[:16] / out.name
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_file() and h is not None and source_hash_of(out) == h:
            return out
    tmp = out.with_name(out.name + ".tmp")
    quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QUInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": True})
    model = onnx.load(str(tmp))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != HASH_KEY]
    del model.metadata_props[:]
    for key, value in kept + [(HASH_KEY, h or "")]:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(tmp))
    os.replace(tmp, out)
    log.info("quantized %s -> %s", path.name, out)
    return out


def _writable(folder: Path) -> bool:
    """True if files can be created in `folder` (made if missing); probes instead of trusting modes."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False
