"""The frame kinds of the Mini-Omni model's nodes, registered with the core on import.

The nodes package imports this module, so a graph that uses these kinds knows them as soon as
its node classes are imported (`omniflow validate`, the launcher).
"""
from omniflow.frame import register_kind

FEATURES = register_kind("features", "audio-encoder output float32 (T, D): one row per 20 ms")
EMBEDS = register_kind("embeds", "adapter output float32 (T, n_embd), ready to replace audio-stream "
                                 "embeddings")
TOKENS = register_kind("tokens", "one decode step: int64 (8,) = 7 raw audio ids + 1 text id; meta['step']")
CODES = register_kind("codes", "whole SNAC frames, undelayed: int64 (F, 7) raw codes 0..4095")
SPEECH = register_kind("speech", "voice activity of a session's input (the VAD's): meta['event'] "
                                 "'started' | 'stopped', meta['audio_ms']")
