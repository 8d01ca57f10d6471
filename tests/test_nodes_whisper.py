"""nodes.whisper: the original's feature semantics, on demo weights, compared with openai-whisper itself."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from nodes.whisper import WhisperEncoder
from omniflow.model import weights
from omniflow.frame import Frame
from omniflow.testing import run_node

RATE = 16000


@pytest.fixture(scope="module")
def whisper_home(tmp_path_factory):
    root = tmp_path_factory.mktemp("omniflow_home")
    weights.write_demo_whisper(root / "whisper-small", "small")
    return root


@pytest.fixture
def node(whisper_home, monkeypatch):
    monkeypatch.setenv(weights.HOME_ENV, str(whisper_home))
    return WhisperEncoder({"checkpoint": "small"})


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise shaped by a 4 Hz envelope: enough structure for the mel features to vary in time."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * rng.standard_normal(len(t)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def reference_features(path, audio: np.ndarray) -> np.ndarray:
    """What the original Mini-Omni computes: whole openai-whisper model, 30 s window, int(ms/20)+1 frames."""
    import whisper

    model = whisper.load_model(str(path))
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)))
    with torch.no_grad():
        feats = model.embed_audio(mel[None])[0]
    return feats[: int(len(audio) / RATE * 1000 / 20) + 1].numpy()


def test_features_equal_openai_whisper(node, whisper_home):
    audio = speechlike(2.5)
    out = run_node(node, [Frame(kind="utterance", session="s1", turn=3, data=audio, last=True,
                                meta={"rate": RATE, "task": "A1A2"})], port="audio")
    (feat,) = out.on("features")
    expected = reference_features(whisper_home / "whisper-small/small.pt", audio)
    assert feat.data.shape == (126, 64) == expected.shape        # int(2500 / 20) + 1 frames
    np.testing.assert_allclose(feat.data, expected, rtol=1e-5, atol=1e-5)
    assert feat.meta["ms"] == pytest.approx(2500) and feat.meta["task"] == "A1A2"
    assert (feat.session, feat.turn, feat.last) == ("s1", 3, True)


def test_other_rates_are_resampled_to_16k(node):
    audio_8k = speechlike(1.0)[::2].copy()                       # 1 s at 8 kHz
    (feat,) = run_node(node, [Frame(kind="utterance", data=audio_8k, meta={"rate": 8000})], port="audio").on("features")
    assert feat.data.shape[0] == 51 and feat.meta["ms"] == pytest.approx(1000)


def test_35_second_input_is_split_not_truncated(node):
    audio = speechlike(35.0)
    (feat,) = run_node(node, [Frame(kind="utterance", data=audio, meta={"rate": RATE})], port="audio").on("features")
    assert feat.meta["windows"] == [1500, 251]                   # 30 s window (capped) + 5 s window
    assert feat.data.shape[0] == 1751
    np.testing.assert_allclose(feat.data[1500:], node.encode(audio[30 * RATE:]), rtol=1e-5, atol=1e-5)


def test_35_second_input_is_refused_with_a_message(whisper_home, monkeypatch, caplog):
    monkeypatch.setenv(weights.HOME_ENV, str(whisper_home))
    node = WhisperEncoder({"checkpoint": "small", "over_limit": "refuse"})
    with caplog.at_level(logging.ERROR):
        out = run_node(node, [Frame(kind="utterance", data=speechlike(35.0), meta={"rate": RATE})], port="audio")
    assert [f.kind for f in out.on("features")] == ["error"]         # no features: the turn gets an error
    assert "35.0 s" in out.on("features")[0].meta["error"]
    assert "35.0 s" in caplog.text and "over_limit: split" in caplog.text


def test_demo_weights_warn_that_output_is_not_speech(node, caplog):
    with caplog.at_level(logging.WARNING):
        node.setup()
    assert "not speech" in caplog.text


def test_missing_weights_name_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.HOME_ENV, str(tmp_path))
    with pytest.raises(weights.WeightsNotFound, match="omniflow fetch"):
        WhisperEncoder({"checkpoint": "base"}).setup()
    with pytest.raises(weights.WeightsNotFound, match="does not exist"):
        WhisperEncoder({"checkpoint": str(tmp_path / "nope.pt")}).setup()


@pytest.mark.slow      # the ONNX export of the encoder takes ~10 s on 2 cores (cached afterwards)
def test_onnx_runtime_gives_the_same_features(whisper_home, monkeypatch):
    pytest.importorskip("onnxscript", reason="ONNX export needs pip install 'omniflow[onnx]'")
    monkeypatch.setenv(weights.HOME_ENV, str(whisper_home))
    audio = speechlike(2.0)
    torch_node, onnx_node = WhisperEncoder(), WhisperEncoder({"runtime": "onnx"})
    torch_node.setup()
    onnx_node.setup()
    np.testing.assert_allclose(onnx_node.encode(audio), torch_node.encode(audio), rtol=1e-4, atol=1e-4)


def relative_l2(x: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(x - reference) / np.linalg.norm(reference))


def test_bfloat16_features_are_float32_features_within_2_percent(whisper_home, monkeypatch):
    """dtype: bfloat16 is a speed option: same frame count, float32 out, features ~1 % (L2) off."""
    monkeypatch.setenv(weights.HOME_ENV, str(whisper_home))
    audio = speechlike(2.5)
    exact, fast = WhisperEncoder(), WhisperEncoder({"dtype": "bfloat16"})
    exact.setup()
    fast.setup()
    assert fast.whisper.encoder.conv1.weight.dtype == torch.bfloat16
    assert fast.whisper.encoder.ln_post.weight.dtype == torch.float32        # LayerNorms stay fp32
    want, got = exact.encode(audio), fast.encode(audio)
    assert got.dtype == np.float32 and got.shape == want.shape == (126, 64)
    assert 0 < relative_l2(got, want) < 0.02


def test_bad_dtype_names_the_choices(whisper_home, monkeypatch):
    monkeypatch.setenv(weights.HOME_ENV, str(whisper_home))
    # refused when the params are read (the graph loads), before any weights
    with pytest.raises(ValueError, match="Invalid enum value 'int8' - at `\\$.dtype`"):
        WhisperEncoder({"dtype": "int8"})
    with pytest.raises(ValueError, match="set dtype: float32"):
        WhisperEncoder({"dtype": "bfloat16", "runtime": "onnx"})
    with pytest.raises(ValueError, match="set runtime: onnx"):
        WhisperEncoder({"quantize": "int8"})


def test_auto_dtype_is_bf16_only_where_the_cpu_has_it(tmp_path):
    from omniflow.model.dtypes import cpu_has_fast_bf16
    from omniflow.model.whisper_encoder import resolve_dtype
    for flags, fast in (("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_bf16", True), ("fpu avx2 fma", False)):
        (tmp_path / "cpuinfo").write_text(f"flags\t\t: {flags}\n")
        assert cpu_has_fast_bf16(tmp_path / "cpuinfo") == fast
    assert resolve_dtype("auto", "cpu", fast_bf16=True) == "bfloat16"
    assert resolve_dtype("auto", "cpu", fast_bf16=False) == "float32"
    assert resolve_dtype("auto", "cuda:0") == "float16"
    assert resolve_dtype("auto", "cpu", runtime="onnx") == "float32"
    assert resolve_dtype("bfloat16") == "bfloat16"


@pytest.mark.slow     # exports and quantizes the (tiny) encoder once
def test_onnx_int8_features_are_close_to_float32(tmp_path):
    import shutil

    from omniflow.model.whisper_encoder import WhisperFeatures
    path = weights.write_demo_whisper(tmp_path / "w", "small")
    audio = speechlike(2.5)
    want = WhisperFeatures.load(path)(audio)
    got = WhisperFeatures.load(path, runtime="onnx", quantize="int8")(audio)
    assert (path.parent / f"{path.stem}_encoder_int8.onnx").is_file()
    assert got.shape == want.shape and 0 < relative_l2(got, want) < 0.1
    shutil.rmtree(tmp_path / "w")
