"""Where a node's weights are: one resolution order for every node that loads weights.

    1. an explicit path in the graph's params          (checkpoint: /data/mini-omni)
       or a Hugging Face repo id, downloaded once into $OMNIFLOW_HOME/hub/ (checkpoint: gpt-omni/mini-omni)
    2. the cache: $OMNIFLOW_HOME/<component>            (default ~/.cache/omniflow)
    3. an error that names the command that fills the cache: `omniflow fetch`

Demo directories hold a `DEMO` marker; `is_demo(path)` lets a node print that its output is not speech.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .components import (COMPONENTS, DEFAULT_HOME, DEMO_MARKER, FETCH_HINT, HOME_ENV, RUN_LATEST_FILE,
                         WHISPER_PREFIX, check_component, describe, home, missing_files, whisper_size)

log = logging.getLogger("omniflow.weights")


class WeightsNotFound(FileNotFoundError):
    """Weights a node needs are neither at the given path nor in the cache."""


def _locate(component: str, path: Path) -> Path | None:
    """The usable path for `component` at `path` (a directory, or for whisper a .pt file), or None."""
    size = whisper_size(component)
    if size:
        if path.is_file():
            return path
        candidate = path / f"{size}.pt"
        return candidate if candidate.is_file() else None
    if path.is_dir() and not missing_files(component, path):
        return path
    return None


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """A training run directory -> the checkpoint its `latest` file names (its newest
    step-NNNNNN/); any other path as it is. So a run directory works wherever a checkpoint does."""
    path = Path(path).expanduser()
    latest = path / RUN_LATEST_FILE
    if latest.is_file():
        step = path / latest.read_text().strip()
        log.info("%s is a training run: using its latest checkpoint %s", path, step)
        return step
    return path


def resolve(component: str, explicit: str | os.PathLike | None = None) -> Path:
    """Path of `component`'s weights: explicit path -> $OMNIFLOW_HOME/<component> -> error.

    Returns the directory for "miniomni" and "snac", and the `.pt` file for "whisper-<size>"
    (an explicit whisper path may be the file or a directory holding `<size>.pt`). An explicit
    Mini-Omni path may be a training run directory: its latest checkpoint is used.
    """
    check_component(component)
    if explicit and _is_repo_id(component, str(explicit)):
        return _from_hub(component, str(explicit))
    if explicit:
        path = Path(explicit).expanduser()
        if component == "miniomni":
            path = checkpoint_dir(path)
        found = _locate(component, path)
        if found is None:
            raise WeightsNotFound(
                f"{component} weights not found at {path} (the explicit path in the graph's params): "
                f"expected {describe(component)} there. Fix the path, or drop it to use the cache "
                f"{home() / component}, and {FETCH_HINT}.")
        return found
    cached = home() / component
    found = _locate(component, cached)
    if found is None:
        size = whisper_size(component)
        raise WeightsNotFound(
            f"{component} weights not found in the cache {cached} (set by ${HOME_ENV}, default "
            f"{DEFAULT_HOME}): expected {describe(component)}. Fix: {FETCH_HINT}"
            + (f" (add `--whisper {size}` for this size)." if size else "."))
    return found


def resolve_whisper(checkpoint: str | os.PathLike) -> Path:
    """An openai-whisper checkpoint as the whisper node and `train preprocess` name it: a size
    ("small") -> $OMNIFLOW_HOME/whisper-<size>/<size>.pt; a path to a `.pt` file -> that file."""
    text = str(checkpoint)
    if text.endswith(".pt") or "/" in text or Path(text).is_file():
        path = Path(text).expanduser()
        if not path.is_file():
            raise WeightsNotFound(
                f"whisper checkpoint {path} does not exist: give a size name (e.g. small) to use the "
                f"cache, or a path to an openai-whisper .pt file; {FETCH_HINT}")
        return path
    return resolve(f"{WHISPER_PREFIX}{text}")


def _is_repo_id(component: str, text: str) -> bool:
    """"org/name" that is not a local path, for a component that lives in a Hugging Face repo."""
    # "runs/final" where ./runs exists is a mistyped local path, not a repo to download
    return (component in COMPONENTS and re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None
            and not text.startswith(".") and not Path(text).expanduser().exists()
            and not Path(text).parent.is_dir())


def _from_hub(component: str, repo: str) -> Path:
    """Download `repo` into $OMNIFLOW_HOME/hub/<org>--<name> once; later runs read it from there."""
    dest = home() / "hub" / repo.replace("/", "--")
    found = _locate(component, dest)
    if found is not None:
        return found
    from . import hub

    log.info("downloading %s from the Hugging Face hub into %s", repo, dest)
    hub.fetch_component(component, dest, repo=repo)
    found = _locate(component, dest)
    if found is None:
        raise WeightsNotFound(f"{repo} was downloaded to {dest} but has no {describe(component)}: "
                              f"is it a {component} repository?")
    return found


def is_demo(path: str | os.PathLike) -> bool:
    """True if `path` (a weights directory or a file inside one) holds randomly initialised demo weights."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return (folder / DEMO_MARKER).is_file()


def warn_if_demo(path: str | os.PathLike, logger: logging.Logger | None = None) -> bool:
    """Log a loud warning when `path` holds demo weights; returns is_demo(path)."""
    demo = is_demo(path)
    if demo:
        (logger or log).warning("DEMO WEIGHTS at %s are randomly initialised: the output is not speech "
                                "(run `omniflow fetch` for the real model)", path)
    return demo
