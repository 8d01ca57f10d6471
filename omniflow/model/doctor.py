"""The model stack's rows of `omniflow doctor`: its packages, torch/CUDA, CPU bf16, onnxruntime, weights.

Run by the core doctor through `omniflow.plugins.DOCTOR_CHECKS`; each check returns rows and
imports what it checks only when it runs.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Callable

from omniflow.doctor import FAIL, OK, WARN, Check, check_packages
from omniflow.model.dtypes import BF16_FLAGS      # CPU instructions that make bfloat16 fast
from omniflow.plugins import MODEL_INSTALL

CPUINFO = Path("/proc/cpuinfo")
# the model stack's packages (the [model] extra) -> import name; torch and onnxruntime have rows of
# their own below
MODEL_PACKAGES = {"soundfile": "soundfile", "soxr": "soxr", "snac": "snac", "openai-whisper": "whisper",
                  "tokenizers": "tokenizers", "huggingface_hub": "huggingface_hub",
                  "silero-vad": "silero_vad", "tqdm": "tqdm"}
ORT_DISTS = ("onnxruntime", "onnxruntime-gpu")   # one `onnxruntime` module, two builds: never both


def check_model_packages() -> list[Check]:
    return check_packages("model packages", MODEL_PACKAGES, MODEL_INSTALL, True)


def check_torch() -> list[Check]:
    try:
        import torch
    except Exception as e:
        return [Check("torch", FAIL, f"cannot import torch ({e})",
                      MODEL_INSTALL + "; or a CUDA build of torch from pytorch.org", True)]
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    rows = [Check("torch", OK, f"{torch.__version__}, {build}", required=True)]
    if not torch.version.cuda:
        rows.append(Check("CUDA devices", WARN, "none: a CPU build of torch; models run on the CPU",
                          "for a GPU, install a CUDA build of torch (https://pytorch.org)"))
    elif not torch.cuda.is_available():
        rows.append(Check("CUDA devices", WARN, "a CUDA build, but no usable GPU (driver? "
                          "CUDA_VISIBLE_DEVICES?)", "check nvidia-smi and the driver version"))
    else:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        bf16 = "bf16 ok" if torch.cuda.is_bf16_supported() else "no bf16"
        rows.append(Check("CUDA devices", OK, f"{len(names)}: {', '.join(names)} ({bf16})"))
    return rows


def check_cpu_bf16(cpuinfo: Path = CPUINFO) -> list[Check]:
    """bfloat16 is only faster than float32 on CPUs with bf16 instructions (see nodes/backbone.py)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return [Check("CPU bf16", WARN, f"unknown ({cpuinfo} unreadable: not Linux?)",
                      "keep dtype: float32 on the CPU nodes unless you know the CPU has bf16")]
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    have = [f for f in BF16_FLAGS if f in flags]
    if have:
        return [Check("CPU bf16", OK, f"{', '.join(have)}: dtype: bfloat16 speeds up CPU nodes")]
    return [Check("CPU bf16", WARN, f"no {' / '.join(BF16_FLAGS)}: bfloat16 would be emulated (slow)",
                  "keep dtype: float32 on CPU nodes (the default)")]


def check_onnxruntime() -> list[Check]:
    both = [d for d in ORT_DISTS if _installed(d)]
    if len(both) == 2:      # each overwrote the other's files: which build answers is an accident
        return [Check("onnxruntime", FAIL, "onnxruntime and onnxruntime-gpu are both installed (they share one "
                      "module and overwrite each other's files)",
                      "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'onnxruntime-gpu>=1.18' "
                      "on a CUDA machine or 'onnxruntime>=1.18' on a CPU one", True)]
    try:
        import onnxruntime as ort
    except Exception as e:
        return [Check("onnxruntime", FAIL, f"cannot import ({e})", MODEL_INSTALL, True)]
    providers = ort.get_available_providers()
    return [Check("onnxruntime", OK, f"{ort.__version__} ({', '.join(both) or 'unknown build'}): "
                  f"{', '.join(providers)}", required=True)]


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def check_weights(home: Path | None = None) -> list[Check]:
    from . import weights
    root = weights.home(home).resolve()
    sizes = sorted(p.name.removeprefix(weights.WHISPER_PREFIX)
                   for p in root.glob(f"{weights.WHISPER_PREFIX}*") if p.is_dir())
    rows = []
    for component, folder in weights.component_dirs(root, sizes or ["small"]).items():  # graphs use small
        try:
            path = weights.resolve(component, folder)
        except (weights.WeightsNotFound, ValueError):
            rows.append(Check(f"weights: {component}", FAIL, f"not in {root}",
                              f"omniflow fetch (needs internet) or omniflow fetch --demo "
                              f"--home {root} (random weights)"))
            continue
        if weights.is_demo(path):
            rows.append(Check(f"weights: {component}", WARN, f"DEMO weights at {path} "
                              "(random: the output is not speech)",
                              "omniflow fetch, for the real model"))
        else:
            rows.append(Check(f"weights: {component}", OK, str(path)))
    return rows


CHECKS: list[Callable[..., list[Check]]] = [check_model_packages, check_torch, check_cpu_bf16,
                                             check_onnxruntime, check_weights]
