"""What the core reaches in other packages, by name only: commands and `omniflow doctor` checks.

The core (omniflow/ outside omniflow/model/) imports no model code. The packages that build on it
(the Mini-Omni model, the trainer, the benchmarks) are named here as strings and imported only when
their command runs, so `omniflow run`, `validate` and friends work on an install without the model
stack, and a missing package is one line that names the install, not a traceback.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# how to install the model stack (README, Installing): one of the [cpu] / [gpu] extras
MODEL_INSTALL = ("on a CPU machine pip install -e '.[cpu]' --extra-index-url https://download.pytorch.org/whl/cpu "
                 "&& pip install --no-deps openai-whisper; on a CUDA machine pip install -e '.[gpu]'")

# command -> (module, one-line help); the module has add_arguments(parser) and main(args)
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch": ("omniflow.model.weights.fetch", "download official weights (or write --demo weights)"),
    "bench": ("benchmarks.cli", "run a benchmark: live | decode | graph | concurrency | transport | train"),
    "train": ("train.cli", "train a Mini-Omni stage: stage1 | stage2 | stage3 | final"),
}

# modules with `checks(home) -> list[doctor.Check]`, run by `omniflow doctor` after the core checks
DOCTOR_CHECKS: tuple[str, ...] = ("omniflow.model.doctor",)


class PluginMissing(ImportError):
    """A package the command needs is not installed; the message names the install."""

    @classmethod
    def for_package(cls, package: str | None, what: str) -> "PluginMissing":
        return cls(f"{what} needs the package {package!r}, which is not installed: {MODEL_INSTALL}")


def load(module: str, what: str) -> ModuleType:
    """Import `module` for `what` (a command name); a missing dependency becomes PluginMissing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise PluginMissing.for_package(e.name, what) from e
