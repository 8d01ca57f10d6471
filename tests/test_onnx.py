"""ONNX export + onnxruntime wrappers equal their torch counterparts (tiny random models)."""
import copy

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript: pip install 'omniflow[onnx]'")

from omniflow.model import onnx_export  # noqa: E402
from omniflow.model.gpt import LLaMAMLP  # noqa: E402
from omniflow.model.ort import OrtAdapter, OrtSnacDecoder, OrtWhisperEncoder, providers  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def whisper_encoder():
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                           n_vocab=64, n_text_ctx=8, n_text_state=32, n_text_head=2, n_text_layer=1)
    return Whisper(dims).encoder.eval()


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    return LLaMAMLP(768, 64, 32).eval()          # whisper-small width in, tiny n_embd out


def tiny_snac(noise: bool):
    from snac import SNAC

    # 2 decoder blocks instead of 4 keeps the export at a few seconds; layout is the 24 kHz model's.
    return SNAC(sampling_rate=24000, encoder_dim=8, encoder_rates=[4, 4], decoder_dim=16, decoder_rates=[4, 4],
                attn_window_size=None, codebook_size=64, codebook_dim=4, vq_strides=[4, 2, 1],
                noise=noise, depthwise=True).eval()


def test_whisper_encoder(whisper_encoder, tmp_path):
    ort_enc = OrtWhisperEncoder.from_torch(whisper_encoder, tmp_path, device="cpu")
    assert (tmp_path / "whisper_encoder.onnx").is_file()
    mel = torch.randn(2, 80, 3000)                                    # (B, n_mels, 3000)
    with torch.no_grad():
        ref = whisper_encoder(mel)                                    # (B, 1500, 32)
    out = ort_enc(mel)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1500, 32)
    torch.testing.assert_close(out, ref, **TOL)
    one = ort_enc(mel[:1].numpy())                                    # other batch size, numpy in/out
    assert isinstance(one, np.ndarray)
    np.testing.assert_allclose(one, ref[:1].numpy(), **TOL)


def test_adapter_dynamic_frames(adapter, tmp_path):
    ort_ad = OrtAdapter.from_torch(adapter, tmp_path, device="cpu")
    assert (ort_ad.in_features, ort_ad.out_features) == (768, 32)
    for shape in [(1, 1, 768), (3, 7, 768), (1, 200, 768)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(ort_ad(x), adapter(x), **TOL)
    feats = np.random.default_rng(0).standard_normal((13, 768), dtype=np.float32)   # (T, 768), as nodes pass
    with torch.no_grad():
        np.testing.assert_allclose(ort_ad(feats), adapter(torch.from_numpy(feats)).numpy(), **TOL)
    with pytest.raises(ValueError, match="adapter input must be"):
        ort_ad(np.zeros((4, 512), np.float32))


def test_adapter_cache_keyed_by_weights(adapter, tmp_path, monkeypatch):
    path = onnx_export.cached_export("adapter", adapter, tmp_path)
    assert onnx_export.source_hash_of(path) == onnx_export.weights_hash(adapter, "adapter")
    calls = []
    monkeypatch.setitem(onnx_export.EXPORTERS, "adapter",
                        lambda m, p, source_hash: calls.append(p) or onnx_export.export_adapter(m, p, source_hash=source_hash))
    assert onnx_export.cached_export("adapter", adapter, tmp_path) == path and calls == []   # reused
    changed = copy.deepcopy(adapter)
    with torch.no_grad():
        changed.proj.weight.add_(1.0)
    assert onnx_export.cached_export("adapter", changed, tmp_path) == path and calls == [path]  # re-exported
    x = torch.randn(1, 5, 768)
    with torch.no_grad():
        torch.testing.assert_close(OrtAdapter(path, device="cpu")(x), changed(x), **TOL)


def test_snac_decoder_matches_torch_without_noise(tmp_path):
    torch.manual_seed(0)
    snac = tiny_snac(noise=True)
    ort_dec = OrtSnacDecoder.from_torch(snac, tmp_path, device="cpu")
    # Reference: snac's own decode with every NoiseBlock's conv zeroed, i.e. noise · 0 added.
    from snac.layers import NoiseBlock

    ref = copy.deepcopy(snac)
    noise_blocks = [m for m in ref.modules() if isinstance(m, NoiseBlock)]
    assert len(noise_blocks) == 2
    with torch.no_grad():
        for block in noise_blocks:
            block.linear.parametrizations.weight.original0.zero_()   # weight-norm gain g = 0
    hop = 16 * 4                                                      # samples per coarse frame here
    for frames in (1, 3, 10):
        codes = [torch.randint(0, 64, (2, frames * k)) for k in (1, 2, 4)]
        out = ort_dec.decode(codes)
        with torch.no_grad():
            expected = ref.decode(codes)                              # (B, 1, F·hop)
        assert out.shape == (2, 1, frames * hop)
        torch.testing.assert_close(out, expected, **TOL)
    with torch.no_grad():
        snac.decode([torch.zeros(1, n, dtype=torch.long) for n in (1, 2, 4)])   # caller's model untouched
    with pytest.raises(ValueError, match="F, 2F, 4F"):
        ort_dec.decode([torch.zeros(1, 2, dtype=torch.long)] * 3)


def test_providers_cpu_and_missing_cuda():
    assert providers("cpu") == ["CPUExecutionProvider"]
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert providers("auto")[0] == "CUDAExecutionProvider"
    else:
        assert providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(RuntimeError, match=r"omniflow\[gpu\]"):
            providers("cuda:0")
    with pytest.raises(ValueError, match="unknown ONNX device"):
        providers("tpu")


def test_unknown_kind(adapter, tmp_path):
    with pytest.raises(ValueError, match="unknown ONNX export kind 'vocoder'"):
        onnx_export.cached_export("vocoder", adapter, tmp_path)


def test_read_only_weights_dir_falls_back_to_home(adapter, tmp_path, monkeypatch):
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    monkeypatch.setenv("OMNIFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(onnx_export, "_writable", lambda folder: folder != weights_dir)
    path = onnx_export.cached_export("adapter", adapter, weights_dir)
    assert path.parent.parent == tmp_path / "home" / "onnx" and path.name == "whisper_adapter.onnx"
    assert not (weights_dir / "whisper_adapter.onnx").exists()
