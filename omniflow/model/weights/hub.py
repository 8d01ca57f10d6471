"""Download the official weights (for machines with internet): Mini-Omni, whisper, SNAC.

    fetch_miniomni("~/.cache/omniflow/miniomni")        # lit_model.pth, model_config.yaml, tokenizer*.json
    fetch_whisper("small", "~/.cache/omniflow/whisper-small")   # -> .../small.pt, SHA-256 verified
    fetch_snac("~/.cache/omniflow/snac")                # config.json, pytorch_model.bin

Mini-Omni and SNAC come from the Hugging Face Hub (`huggingface_hub.snapshot_download`, which honours
HF_ENDPOINT, HF_TOKEN and HTTPS_PROXY); whisper comes from OpenAI's URL table in the openai-whisper
package, whose URLs embed each file's SHA-256. A failed download raises `DownloadError` saying what
failed and the three ways out: fix the connection/proxy, use a mirror, or copy the files by hand.
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

from .components import COMPONENTS

MINIOMNI_REPO = COMPONENTS["miniomni"].repo
SNAC_REPO = COMPONENTS["snac"].repo
WHISPER_CACHE = Path("~/.cache/whisper")                     # openai-whisper's own default
CHUNK_BYTES = 1 << 20                                        # download read size: 1 MiB


class DownloadError(RuntimeError):
    """A download failed; the message names what and how to fix it."""


# --- Hugging Face Hub -----------------------------------------------------------------------------
def _hub_fix(repo: str, files: tuple[str, ...], dest: Path) -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return (
        f"Fixes: check the internet connection or set HTTPS_PROXY for a proxy; point HF_ENDPOINT at a "
        f"reachable mirror (now {endpoint}); set HF_TOKEN if the repo needs a login; or copy "
        f"{', '.join(files)} from a machine that has them into {dest}."
    )


def _snapshot(repo: str, files: tuple[str, ...], required: tuple[str, ...], dest, revision) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    dest = Path(dest).expanduser()
    if all((dest / f).is_file() for f in required):     # fetched before, or copied in by hand
        log.info("%s: files already in %s", repo, dest)
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    try:
        huggingface_hub.snapshot_download(repo_id=repo, revision=revision, local_dir=dest,
                                          allow_patterns=list(files))
    except (HfHubHTTPError, OSError) as e:      # LocalEntryNotFoundError (offline) is an OSError
        raise DownloadError(
            f"could not download {', '.join(files)} from the Hugging Face repo {repo} into {dest}: "
            f"{type(e).__name__}: {e}\n{_hub_fix(repo, files, dest)}"
        ) from e
    missing = [f for f in required if not (dest / f).is_file()]
    if missing:
        raise DownloadError(f"{repo} was downloaded to {dest} but has no {', '.join(missing)}: is {repo} "
                            f"the right repository? {_hub_fix(repo, files, dest)}")
    for f in set(files) - set(required):
        if not (dest / f).is_file():
            log.warning("%s has no %s (optional)", repo, f)
    return dest


def _fetch(component: str, dest, repo: str, revision: str | None) -> Path:
    c = COMPONENTS[component]
    return _snapshot(repo, c.download, c.download_required, dest, revision)


def fetch_miniomni(dest, repo: str = MINIOMNI_REPO, *, revision: str | None = None) -> Path:
    """Mini-Omni's lit_model.pth, model_config.yaml, tokenizer.json, tokenizer_config.json -> dest."""
    return _fetch("miniomni", dest, repo, revision)


def fetch_snac(dest, repo: str = SNAC_REPO, *, revision: str | None = None) -> Path:
    """SNAC 24 kHz config.json + pytorch_model.bin -> dest (loadable with `SNAC.from_pretrained(dest)`)."""
    return _fetch("snac", dest, repo, revision)


def fetch_component(component: str, dest, repo: str | None = None) -> Path:
    """A directory component ("miniomni" | "snac") from `repo` (default: the official one) -> dest."""
    fetcher = {"miniomni": fetch_miniomni, "snac": fetch_snac}[component]   # looked up per call
    return fetcher(dest, repo=repo or COMPONENTS[component].repo)


# --- openai-whisper ---------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def whisper_url(name: str) -> str:
    import whisper

    if name not in whisper._MODELS:
        raise ValueError(f"unknown whisper model {name!r}; choose one of {', '.join(whisper._MODELS)}")
    return whisper._MODELS[name]


def fetch_whisper(name: str = "small", dest=None) -> Path:
    """openai-whisper checkpoint `<name>.pt` -> dest (default ~/.cache/whisper); returns the file.

    The SHA-256 embedded in the URL is checked; a file that does not match is deleted, never left
    where a loader would find it. A correct file already in `dest` is not downloaded again.
    """
    from tqdm import tqdm

    url = whisper_url(name)
    expected = url.split("/")[-2]                    # .../models/<sha256>/<name>.pt
    dest = Path(dest or WHISPER_CACHE).expanduser()
    target = dest / os.path.basename(url)
    if target.is_file():
        if sha256_file(target) == expected:
            return target
        log.warning("%s exists but its SHA-256 does not match; downloading it again", target)
    dest.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url) as source, open(part, "wb") as out:
            total = int(source.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"whisper {name}") as bar:
                while chunk := source.read(CHUNK_BYTES):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"could not download whisper {name!r} from {url}: {type(e).__name__}: {e}\n"
            f"Fixes: check the internet connection or set HTTPS_PROXY for a proxy; or download that URL "
            f"on another machine and copy the file to {target} (SHA-256 {expected})."
        ) from e
    if h.hexdigest() != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"whisper {name!r} downloaded from {url} has SHA-256 {h.hexdigest()}, expected {expected}; "
            f"the corrupt file was deleted. Retry (a proxy or captive portal may have altered it), or "
            f"copy a verified {target.name} to {target}."
        )
    os.replace(part, target)                          # appears only complete and verified
    return target
