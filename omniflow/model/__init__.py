"""Mini-Omni in PyTorch: config, token layout, network, checkpoints, prompts, batched decoding.

    from omniflow.model.checkpoint import load_model
    from omniflow.model.engine import Engine
    model, cfg = load_model("checkpoint/")
    engine = Engine(model, max_sessions=8)
    out = engine.start("s1", "A1A2", embeds=model.adapt(whisper_features))
    while not out.done:
        out = engine.step()["s1"]

Modules: tokens (ids), delay (delay pattern), config (Config), gpt (MiniOmni), checkpoint
(load_model, save_checkpoint), prompts (build_input_ids, TASKS), sampling (Sampling), engine
(Engine, StepOut), generate (stream, answer), parity (`python -m omniflow.model.parity DIR`).
Submodules are imported on use so `import omniflow.model.tokens` stays light.
"""
