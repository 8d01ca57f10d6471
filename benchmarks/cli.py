"""`omniflow bench NAME [ARGS...]`: dispatch to `benchmarks.<NAME>.main(argv)`."""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "transport": "one-hop and 6-hop latency/throughput of omniflow edges vs raw pyzmq",
    "decode": "backbone decode steps per second",
    "quality": "logits and greedy tokens of each fast numeric path (bf16, quantized weights) vs fp32",
    "graph": "speech-to-speech graph latency",
    "concurrency": "first-audio latency and decode step with 1, 2, 4 concurrent speakers",
    "train": "training step throughput",
    "live": "a real-time conversation with the shipped graphs as processes: first audio, stalls, RTF, CPU per node",
    "whisper": "whisper encoder per 30 s window (torch fp32, onnx fp32, onnx int8) and feature error vs fp32",
    "vocoder": "SNAC vocoder CPU per frame (stream vs re-decoded context, torch vs onnx) and stream-vs-whole error",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS),
                        help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="passed to the benchmark (see: omniflow bench NAME --help)")


def main(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"benchmarks.{args.name}")
    return int(module.main(list(args.args)) or 0)
