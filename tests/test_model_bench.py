"""benchmarks/decode.py: its baseline re-creates the original's decode faithfully; it runs."""
import pytest
import torch

from benchmarks.decode import OriginalDecoder, main
from omniflow.model.config import Config
from omniflow.model.engine import Engine
from omniflow.model.generate import answer
from omniflow.model.gpt import MiniOmni
from omniflow.model.prompts import build_input_ids, decode_feedback, get_task


def test_original_decoder_baseline_gives_the_engines_tokens():
    """The timed baseline (14-head expanded cache, all slots masked, full logits, the batch
    trick) produces the engine's A1A2 tokens, so the speed ratio compares equal work."""
    torch.manual_seed(0)
    cfg = Config(block_size=40, n_layer=2, n_embd=32, n_head=4, n_query_groups=2, head_size=8,
                 intermediate_size=48)
    model = MiniOmni(cfg).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.attn.weight.mul_(4.0)
    with torch.inference_mode():
        embeds = model.adapt(torch.randn(5, cfg.whisper_adapter_dim))  # (T, C)
    ids = build_input_ids("A1A2", n_audio_frames=5)  # (2, 8, 8)
    S, steps = ids.size(-1), 12
    dec = OriginalDecoder(model, batch=2)
    logits = dec.forward(ids, torch.arange(S), embeds, [5, 5])[:, -1]  # (2, V)
    text, audio = model.split_logits(logits)
    tokens = [audio[0].argmax(-1).tolist() + [int(text[1].argmax())]]
    spec = get_task("A1A2")
    for pos in range(S, S + steps - 1):
        feed = decode_feedback(spec, tokens[-1][:7], tokens[-1][7])[:, :, None]  # (2, 8, 1)
        tokens.append(dec.step(feed, pos))
    ours = answer(Engine(model, max_sessions=1), "A1A2", embeds=embeds, max_new_tokens=steps)
    assert [[t[i] for t in tokens] for i in range(8)] == ours


@pytest.mark.slow
def test_benchmark_runs_on_a_one_layer_model(capsys):
    assert main(["--n-layer", "1", "--batches", "1,2", "--steps", "1", "--paths", "float32,float32+auto"]) == 0
    out = capsys.readouterr().out
    assert "original (re-created)" in out and "1 session(s)" in out and "prefill 154 positions" in out
    assert "== float32+auto" in out and "| float32 " in out        # the quantized path's ratio to fp32


@pytest.mark.slow
def test_quality_benchmark_reports_every_path_on_tiny_and_trained_weights(tmp_path, capsys):
    import json

    from benchmarks.quality import main as quality
    from omniflow.model import weights
    from train.data.make_espeak_set import espeak_available

    ckpt = weights.write_demo_miniomni(tmp_path / "m", size="tiny")
    argv = ["--checkpoint", str(ckpt), "--steps", "4", "--paths", "bfloat16,float32+fp16", "--json", str(tmp_path / "q.json")]
    if espeak_available():
        argv += ["--make-trained", str(tmp_path / "t"), "--sentences", "2", "--train-steps", "3", "--max-new-tokens", "6"]
    assert quality(argv) == 0
    report = json.loads((tmp_path / "q.json").read_text())
    rows = report["real_size"]
    assert [r["path"] for r in rows] == ["bfloat16", "float32+fp16"]
    for r in rows:
        assert 0 <= r["text_rel_err"] < 1 and 0 <= r["text_top1"] <= 1 and len(r["audio_top1"]) == 7
    if espeak_available():
        for r in report["trained"]["rows"]:
            assert 0 <= r["identical"] <= r["samples"] == 10 and 0 <= r["prefix_agreement"] <= 1
