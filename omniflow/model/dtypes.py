"""The compute dtypes a model node or tool accepts by name (`dtype: bfloat16` in a graph).

float32 is the original's arithmetic (token-exact with the golden data); bfloat16 and float16 are
faster where the hardware has them. Names are checked here without importing torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

Dtype = Literal["float32", "bfloat16", "float16"]      # a Params field type: validate lists the choices
DTYPES = get_args(Dtype)
AutoDtype = Literal["auto", "float32", "bfloat16", "float16"]   # auto: `resolve_auto`
BF16_FLAGS = ("avx512_bf16", "amx_bf16")         # CPU instructions that make bfloat16 fast


def check_dtype(name: str, what: str = "dtype") -> str:
    """`name` if it is one of DTYPES, else ValueError naming the choices."""
    if name not in DTYPES:
        raise ValueError(f"{what} {name!r} must be one of {DTYPES}")
    return name


def torch_dtype(name: str):
    """"bfloat16" -> torch.bfloat16 (ValueError for a name outside DTYPES)."""
    import torch

    return getattr(torch, check_dtype(name))


def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU computes bfloat16 natively (avx512_bf16 or AMX); elsewhere torch emulates it."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return any(f in flags for f in BF16_FLAGS)


def resolve_auto(name: str, device: str = "cpu", cuda: str = "bfloat16", fast_bf16: bool | None = None) -> str:
    """"auto" -> `cuda` on a CUDA device, bfloat16 on a CPU with native bf16, else float32 (where
    bf16 is emulated and slower than float32); other names are checked and returned.
    fast_bf16: whether the CPU has native bf16 (None: read /proc/cpuinfo)."""
    if name != "auto":
        return check_dtype(name)
    if str(device).startswith("cuda"):
        return cuda
    return "bfloat16" if (cpu_has_fast_bf16() if fast_bf16 is None else fast_bf16) else "float32"
