"""The compute dtypes a model node or tool accepts by name (`dtype: bfloat16` in a graph).

float32 is the original's arithmetic (token-exact with the golden data); bfloat16 and float16 are
faster where the hardware has them. Names are checked here without importing torch.
"""
from __future__ import annotations

from typing import Literal, get_args

Dtype = Literal["float32", "bfloat16", "float16"]      # a Params field type: validate lists the choices
DTYPES = get_args(Dtype)


def check_dtype(name: str, what: str = "dtype") -> str:
    """`name` if it is one of DTYPES, else ValueError naming the choices."""
    if name not in DTYPES:
        raise ValueError(f"{what} {name!r} must be one of {DTYPES}")
    return name


def torch_dtype(name: str):
    """"bfloat16" -> torch.bfloat16 (ValueError for a name outside DTYPES)."""
    import torch

    return getattr(torch, check_dtype(name))
