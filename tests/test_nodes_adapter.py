"""nodes.adapter: the node's embeddings equal MiniOmni.adapt on the demo checkpoint."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from nodes.adapter import Adapter
from omniflow.model import weights
from omniflow.frame import Frame
from omniflow.model.checkpoint import load_model
from omniflow.testing import run_node


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return weights.write_demo_miniomni(tmp_path_factory.mktemp("home") / "miniomni")


def test_embeds_equal_model_adapt(ckpt):
    model, cfg = load_model(ckpt, device="cpu", dtype=torch.float32)
    feats = np.random.default_rng(0).standard_normal((40, cfg.whisper_adapter_dim)).astype(np.float32)
    out = run_node(Adapter({"checkpoint": str(ckpt)}),
                   [Frame(kind="features", session="a", turn=2, data=feats, last=True, meta={"ms": 780.0})])
    (emb,) = out.on("embeds")
    with torch.no_grad():
        expected = model.adapt(torch.from_numpy(feats)).numpy()                # (T, n_embd)
    assert emb.data.shape == (40, cfg.n_embd) and emb.data.dtype == np.float32
    np.testing.assert_allclose(emb.data, expected, rtol=1e-5, atol=1e-6)
    assert (emb.session, emb.turn, emb.last, emb.meta["ms"]) == ("a", 2, True, 780.0)


def test_checkpoint_comes_from_the_cache_by_default(ckpt, monkeypatch):
    monkeypatch.setenv(weights.HOME_ENV, str(ckpt.parent))
    node = Adapter()
    node.setup()
    assert node.path == ckpt


def test_wrong_feature_width_fails_that_turn_with_a_message(ckpt, caplog):
    with caplog.at_level(logging.ERROR):
        out = run_node(Adapter({"checkpoint": str(ckpt)}), [Frame(kind="features", data=np.zeros((5, 768), np.float32))])
    [(port, error)] = out                                   # the turn's error goes downstream
    assert port == "embeds" and error.kind == "error" and "expected (T, 64)" in error.meta["error"]
    assert "expected (T, 64)" in caplog.text


def test_missing_checkpoint_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.HOME_ENV, str(tmp_path))
    with pytest.raises(weights.WeightsNotFound, match="omniflow fetch"):
        Adapter().setup()


def test_onnx_runtime_gives_the_same_embeds(ckpt):
    pytest.importorskip("onnxscript", reason="ONNX export needs pip install 'omniflow[onnx]'")
    feats = np.random.default_rng(1).standard_normal((7, 64)).astype(np.float32)
    frames = [Frame(kind="features", data=feats)]
    (ref,) = run_node(Adapter({"checkpoint": str(ckpt)}), frames).on("embeds")
    (onnx,) = run_node(Adapter({"checkpoint": str(ckpt), "runtime": "onnx"}), frames).on("embeds")
    np.testing.assert_allclose(onnx.data, ref.data, rtol=1e-5, atol=1e-6)
    assert (ckpt / "whisper_adapter.onnx").is_file()                   # cached next to the weights
