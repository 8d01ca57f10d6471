"""omniflow.model.weights: the demo set loads with every official loader; missing weights name the fix."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from omniflow.model import weights
from omniflow.cli import main as cli_main
from omniflow.model import tokens

from golden import GOLDEN

GOLDEN_CKPT = GOLDEN / "checkpoint" / "lit_model.pth"


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("omniflow_home")
    assert cli_main(["fetch", "--demo", "--home", str(root)]) == 0
    return root


def test_demo_set_has_every_official_file_and_marker(demo_home):
    for rel in ["miniomni/lit_model.pth", "miniomni/model_config.yaml", "miniomni/tokenizer.json",
                "whisper-small/small.pt", "snac/config.json", "snac/pytorch_model.bin"]:
        assert (demo_home / rel).is_file(), rel
    for rel in ["miniomni", "whisper-small/small.pt", "snac"]:
        assert weights.is_demo(demo_home / rel)


def test_demo_lit_model_has_the_official_key_layout(demo_home):
    sd = torch.load(demo_home / "miniomni/lit_model.pth", map_location="cpu", weights_only=True)
    assert sd["transformer.wte.weight"].shape[0] == tokens.PADDED_VOCAB == 181120
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])      # tied
    if GOLDEN_CKPT.is_file():      # same 2-block key set as the original's scaled-down checkpoint
        golden = torch.load(GOLDEN_CKPT, map_location="cpu", weights_only=True)
        assert list(sd) == list(golden)


def test_demo_miniomni_loads_with_the_model_loader(demo_home):
    checkpoint = pytest.importorskip("omniflow.model.checkpoint",
                                     reason="omniflow.model.checkpoint not written yet")
    model, cfg = checkpoint.load_model(demo_home / "miniomni", device="cpu", dtype=torch.float32)
    assert cfg.whisper_adapter_dim == weights.WHISPER_DIMS["tiny"]["n_audio_state"]
    assert cfg.padded_vocab_size == 181120


def test_demo_whisper_loads_with_openai_whisper(demo_home):
    import whisper

    model = whisper.load_model(str(weights.resolve("whisper-small", demo_home / "whisper-small")))
    assert model.dims.n_mels == 80 and model.dims.n_audio_ctx == 1500   # the 30 s window holds
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.zeros(16000)))
    assert model.embed_audio(mel[None]).shape == (1, 1500, model.dims.n_audio_state)


def test_demo_snac_loads_with_the_snac_package(demo_home):
    from snac import SNAC

    model = SNAC.from_pretrained(str(demo_home / "snac"))
    assert model.sampling_rate == 24000 and model.hop_length == 512 and model.vq_strides == [4, 2, 1]
    codes = [torch.zeros(1, n, dtype=torch.long) for n in (2, 4, 8)]      # 2 frames
    with torch.no_grad():
        assert model.decode(codes).shape == (1, 1, 2 * 2048)


def test_demo_tokenizer_round_trips_text(demo_home):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_home / "miniomni/tokenizer.json"))
    text = "What is the capital of France?"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id("<|endoftext|>") == 151643                     # Qwen2's id layout
    assert tok.decode([150000]).strip()              # any ordinary id a random model emits shows up


def test_resolve_order_explicit_then_cache(demo_home, tmp_path, monkeypatch):
    monkeypatch.setenv(weights.HOME_ENV, str(demo_home))
    assert weights.resolve("miniomni") == demo_home / "miniomni"
    assert weights.resolve("whisper-small") == demo_home / "whisper-small" / "small.pt"
    assert weights.resolve("snac", demo_home / "snac") == demo_home / "snac"
    with pytest.raises(weights.WeightsNotFound, match="explicit path"):
        weights.resolve("snac", tmp_path / "nowhere")


def test_a_hub_repo_id_is_downloaded_once_into_the_cache(demo_home, tmp_path, monkeypatch):
    import shutil

    from omniflow.model.weights import hub

    calls = []

    def fake_fetch(dest, repo):          # stands in for huggingface_hub: copies the demo files
        calls.append(repo)
        shutil.copytree(demo_home / "miniomni", dest)
        return dest

    monkeypatch.setattr(hub, "fetch_miniomni", fake_fetch)
    monkeypatch.setenv(weights.HOME_ENV, str(tmp_path))
    expected = tmp_path / "hub" / "gpt-omni--mini-omni"
    assert weights.resolve("miniomni", "gpt-omni/mini-omni") == expected
    assert weights.resolve("miniomni", "gpt-omni/mini-omni") == expected    # now from the cache
    assert calls == ["gpt-omni/mini-omni"]


@pytest.mark.parametrize("component", ["miniomni", "snac", "whisper-small", "whisper-base"])
def test_missing_weights_name_the_fetch_command(component, tmp_path, monkeypatch):
    monkeypatch.setenv(weights.HOME_ENV, str(tmp_path))
    with pytest.raises(weights.WeightsNotFound) as err:
        weights.resolve(component)
    message = str(err.value)
    assert "omniflow fetch" in message and "omniflow fetch --demo" in message
    assert str(tmp_path / component) in message


def test_unknown_component_is_refused():
    with pytest.raises(ValueError, match="whisper-<size>"):
        weights.resolve("wav2vec")


def test_demo_set_is_deterministic(demo_home, tmp_path):
    weights.write_demo_snac(tmp_path / "snac")
    for name in ["config.json", "pytorch_model.bin"]:
        a, b = (hashlib.sha256((d / "snac" / name).read_bytes()).hexdigest() for d in (demo_home, tmp_path))
        assert a == b, name


def test_demo_never_overwrites_real_weights(tmp_path, capsys):
    real = tmp_path / "snac"
    real.mkdir()
    (real / "pytorch_model.bin").write_bytes(b"real weights")
    assert cli_main(["fetch", "--demo", "--home", str(tmp_path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (real / "pytorch_model.bin").read_bytes() == b"real weights"


def test_real_fetch_replaces_demo_weights_and_reports_download_errors(tmp_path, monkeypatch, capsys):
    from omniflow.model.weights import hub

    weights.write_demo_snac(tmp_path / "snac")
    seen = {}

    def offline(dest, *a, **k):
        seen["demo_left"] = (Path(dest) / weights.DEMO_MARKER).exists()
        raise hub.DownloadError("could not download from the Hugging Face repo (offline)")

    monkeypatch.setattr(hub, "fetch_miniomni", offline)
    monkeypatch.setattr(hub, "fetch_snac", offline)
    assert cli_main(["fetch", "--home", str(tmp_path)]) == 1
    assert "could not download" in capsys.readouterr().err
    assert not (tmp_path / "snac").exists() and seen["demo_left"] is False


def test_a_training_run_directory_resolves_to_its_latest_checkpoint(demo_home, tmp_path):
    import shutil

    run = tmp_path / "runs" / "final"
    for step in ("step-000001", "step-000002"):
        shutil.copytree(demo_home / "miniomni", run / step)
    (run / weights.RUN_LATEST_FILE).write_text("step-000002\n")        # as the trainer writes it
    assert weights.resolve("miniomni", run) == run / "step-000002"
    assert weights.resolve("miniomni", run / "step-000001") == run / "step-000001"
    from nodes.text import Detokenizer                                   # the text nodes take it too
    node = Detokenizer(Detokenizer.Params(checkpoint=str(run)))
    node.setup()
    (run / weights.RUN_LATEST_FILE).write_text("step-000009\n")        # names a step that is gone
    with pytest.raises(weights.WeightsNotFound, match="step-000009"):
        weights.resolve("miniomni", run)


def test_a_mistyped_local_path_is_an_error_not_a_hub_download(tmp_path, monkeypatch):
    from omniflow.model import weights
    from omniflow.model.weights import hub

    def no_download(*args):
        raise AssertionError("a local path must never be downloaded")
    monkeypatch.setattr(hub, "fetch_miniomni", no_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()                        # the user's run directory; 'fnal' is a typo
    with pytest.raises(weights.WeightsNotFound, match="runs/fnal"):
        weights.resolve("miniomni", "runs/fnal")
