"""Expected failures: the ones whose message already says what is wrong and the fix (a missing
file, unreadable audio, no weights, a package that is not installed). The command line and a
node's setup report them as one line; every other exception keeps its traceback, since it is a bug.
"""
from __future__ import annotations

from .audio import BadAudio


class UsageError(ValueError):
    """A request that cannot be done as asked (a missing option, a cache made with other
    encoders, ...); the message says what to do instead."""


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,         # also omniflow.model.weights.WeightsNotFound
    PermissionError, IsADirectoryError, NotADirectoryError,
    ModuleNotFoundError,       # an extra that is not installed
    BadAudio, UsageError,
)
