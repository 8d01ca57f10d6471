"""Bounded parameter types for node `Params` (msgspec Structs): the graph loader checks them and
`omniflow validate` reports every bad value with its file:line and what is allowed.

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        port: Port = 8765
        threshold: Fraction = 0.5

A parameter with a fixed set of values is a `typing.Literal`; a number with bounds carries them
as `msgspec.Meta` (`Annotated[float, Meta(ge=0)]`), so its limits are data, not a check in setup().
"""
from __future__ import annotations

from typing import Annotated

from msgspec import Meta

Port = Annotated[int, Meta(ge=0, le=65535, description="a TCP port (0: a free one)")]
Positive = Annotated[int, Meta(ge=1)]                     # counts: sessions, frames, bytes
NonNegative = Annotated[float, Meta(ge=0)]                # durations (ms, s), speeds
PositiveFloat = Annotated[float, Meta(gt=0)]
Fraction = Annotated[float, Meta(gt=0, lt=1)]             # a probability threshold, strictly inside (0, 1)
UnitInterval = Annotated[float, Meta(gt=0, le=1)]         # top_p: (0, 1]
Device = Annotated[str, Meta(pattern=r"^(cpu|mps|cuda(:\d+)?)$", description="cpu | cuda | cuda:N | mps")]
