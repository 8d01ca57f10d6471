"""Where weights live, how to get them, and the demo set (`omniflow fetch`).

One resolution order for every node that loads weights:

    1. an explicit path in the graph's params          (checkpoint: /data/mini-omni)
       or a Hugging Face repo id, downloaded once into $OMNIFLOW_HOME/hub/ (checkpoint: gpt-omni/mini-omni)
    2. the cache: $OMNIFLOW_HOME/<component>            (default ~/.cache/omniflow)
    3. an error that names the command that fills the cache: `omniflow fetch`

Components and their files (the official formats, unchanged):

    miniomni        lit_model.pth + model_config.yaml + tokenizer.json       (gpt-omni/mini-omni)
    whisper-<size>  <size>.pt   (openai-whisper: {"dims": ..., "model_state_dict": ...})
    snac            config.json + pytorch_model.bin                          (hubertsiuzdak/snac_24khz)

`omniflow fetch --demo` writes a complete, randomly initialised set in exactly these formats, so the
whole graph runs on a machine that reaches no model hub. Each demo directory holds a `DEMO` marker;
`is_demo(path)` lets a node print that its output is not speech.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import string
import sys
from pathlib import Path
from typing import Iterable

log = logging.getLogger("omniflow.weights")

HOME_ENV = "OMNIFLOW_HOME"
DEFAULT_HOME = Path("~/.cache/omniflow")
DEMO_MARKER = "DEMO"
DEMO_SEED = 0

# component -> files that must all exist for the component to count as present
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "miniomni": ("lit_model.pth", "model_config.yaml"),
    "snac": ("config.json", "pytorch_model.bin"),
}
WHISPER_PREFIX = "whisper-"
HUB_FETCHERS = {"miniomni": "fetch_miniomni", "snac": "fetch_snac"}   # components that live in HF repos
FETCH_HINT = ("fetch them with `omniflow fetch` (needs internet), or write random demo weights with "
              "`omniflow fetch --demo` (output is not speech)")


class WeightsNotFound(FileNotFoundError):
    """Weights a node needs are neither at the given path nor in the cache."""


# --- resolution --------------------------------------------------------------------------------

def home(override: str | os.PathLike | None = None) -> Path:
    """The weights cache: `override`, else $OMNIFLOW_HOME, else ~/.cache/omniflow."""
    return Path(override or os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def _whisper_size(component: str) -> str | None:
    return component[len(WHISPER_PREFIX):] if component.startswith(WHISPER_PREFIX) else None


def _check_component(component: str) -> None:
    if component in REQUIRED_FILES or (_whisper_size(component) or ""):
        return
    raise ValueError(f"unknown weights component {component!r}; "
                     f"expected one of {sorted(REQUIRED_FILES)} or 'whisper-<size>' (e.g. whisper-small)")


def _locate(component: str, path: Path) -> Path | None:
    """The usable path for `component` at `path` (a directory, or for whisper a .pt file), or None."""
    size = _whisper_size(component)
    if size:
        if path.is_file():
            return path
        candidate = path / f"{size}.pt"
        return candidate if candidate.is_file() else None
    if path.is_dir() and all((path / f).is_file() for f in REQUIRED_FILES[component]):
        return path
    return None


def _describe(component: str) -> str:
    size = _whisper_size(component)
    return f"a {size}.pt file" if size else " + ".join(REQUIRED_FILES[component])


def resolve(component: str, explicit: str | os.PathLike | None = None) -> Path:
    """Path of `component`'s weights: explicit path -> $OMNIFLOW_HOME/<component> -> error.

    Returns the directory for "miniomni" and "snac", and the `.pt` file for "whisper-<size>"
    (an explicit whisper path may be the file or a directory holding `<size>.pt`).
    """
    _check_component(component)
    if explicit and _is_repo_id(component, str(explicit)):
        return _from_hub(component, str(explicit))
    if explicit:
        path = Path(explicit).expanduser()
        found = _locate(component, path)
        if found is None:
            raise WeightsNotFound(
                f"{component} weights not found at {path} (the explicit path in the graph's params): "
                f"expected {_describe(component)} there. Fix the path, or drop it to use the cache "
                f"{home() / component}, and {FETCH_HINT}.")
        return found
    cached = home() / component
    found = _locate(component, cached)
    if found is None:
        size = _whisper_size(component)
        raise WeightsNotFound(
            f"{component} weights not found in the cache {cached} (set by ${HOME_ENV}, default "
            f"{DEFAULT_HOME}): expected {_describe(component)}. Fix: {FETCH_HINT}"
            + (f" (add `--whisper {size}` for this size)." if size else "."))
    return found


def _is_repo_id(component: str, text: str) -> bool:
    """"org/name" that is not a local path, for a component that lives in a Hugging Face repo."""
    return (component in HUB_FETCHERS and re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None
            and not Path(text).expanduser().exists())


def _from_hub(component: str, repo: str) -> Path:
    """Download `repo` into $OMNIFLOW_HOME/hub/<org>--<name> once; later runs read it from there."""
    dest = home() / "hub" / repo.replace("/", "--")
    found = _locate(component, dest)
    if found is not None:
        return found
    from omniflow.model import hub

    log.info("downloading %s from the Hugging Face hub into %s", repo, dest)
    getattr(hub, HUB_FETCHERS[component])(dest, repo=repo)
    found = _locate(component, dest)
    if found is None:
        raise WeightsNotFound(f"{repo} was downloaded to {dest} but has no {_describe(component)}: "
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


# --- demo set: sizes ---------------------------------------------------------------------------
# "tiny" runs the whole graph on 2 CPU cores in seconds; "real" has the official shapes (random
# values) for benchmarks. Both keep every interface dimension: the 181120-row vocabulary, whisper's
# 80 mel bins and 1500-frame (30 s) window, SNAC's 24 kHz, hop 512, vq_strides [4, 2, 1], 4096 codes.

MINIOMNI_TRUNK = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=2, head_size=16,
                 intermediate_size=256, block_size=512),
    "real": dict(n_layer=24, n_embd=896, n_head=14, n_query_groups=2, head_size=64,
                 intermediate_size=4864, block_size=2048),
}
WHISPER_DIMS = {   # openai-whisper ModelDimensions; n_vocab 51865 = the multilingual tokenizer's size
    "tiny": dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                 n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=4, n_text_layer=2),
    "real": dict(n_mels=80, n_audio_ctx=1500, n_audio_state=768, n_audio_head=12, n_audio_layer=12,
                 n_vocab=51865, n_text_ctx=448, n_text_state=768, n_text_head=12, n_text_layer=12),
}
SNAC_CONFIG = {
    "tiny": dict(sampling_rate=24000, encoder_dim=8, encoder_rates=[2, 4, 8, 8], latent_dim=None,
                 decoder_dim=64, decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096,
                 codebook_dim=8, vq_strides=[4, 2, 1], noise=True, depthwise=True),
    "real": dict(sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], latent_dim=768,
                 decoder_dim=1024, decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096,
                 codebook_dim=8, vq_strides=[4, 2, 1], noise=True, depthwise=True),
}
INIT_STD = 0.02           # normal init of every matrix (GPT-2 / litgpt convention)


def miniomni_config(size: str, whisper_adapter_dim: int) -> dict:
    """model_config.yaml contents (litgpt field names, official values outside the trunk)."""
    from .model import tokens
    return {
        "name": f"mini-omni-demo-{size}",
        "hf_config": {"name": "Qwen2-0.5B", "org": "Qwen"},
        **MINIOMNI_TRUNK[size],
        "padded_vocab_size": tokens.PADDED_VOCAB, "vocab_size": 50254, "padding_multiple": 512,
        "text_vocab_size": tokens.TEXT_VOCAB, "audio_vocab_size": tokens.AUDIO_VOCAB,
        "cat_audio_vocab_size": tokens.N_AUDIO_LAYERS * tokens.AUDIO_VOCAB,
        "whisper_adapter_dim": whisper_adapter_dim, "asr_adapter": "llamamlp",
        "rotary_percentage": 1.0, "rope_base": 1000000, "rope_condense_ratio": 1,
        "parallel_residual": False, "shared_attention_norm": False, "bias": False,
        "add_qkv_bias": True, "lm_head_bias": False, "norm_class_name": "RMSNorm", "norm_eps": 1.0e-6,
        "mlp_class_name": "LLaMAMLP", "scale_embeddings": False, "tie_word_embeddings": True,
        "post_adapter": False, "post_adapter_layers": 6,
    }


def _marker(dest: Path, what: str) -> None:
    (dest / DEMO_MARKER).write_text(
        f"Demo weights written by `omniflow fetch --demo`: {what}, randomly initialised (seed "
        f"{DEMO_SEED}). They have the official file formats but produce noise, not speech.\n")


def write_demo_miniomni(dest: Path, size: str = "tiny", whisper_adapter_dim: int | None = None,
                        seed: int = DEMO_SEED) -> Path:
    """lit_model.pth (official 198-key layout scaled to `size`) + model_config.yaml + tokenizer.json."""
    import torch
    import yaml

    cfg = miniomni_config(size, whisper_adapter_dim or WHISPER_DIMS[size]["n_audio_state"])
    E, I, V = cfg["n_embd"], cfg["intermediate_size"], cfg["padded_vocab_size"]
    qkv_rows = (cfg["n_head"] + 2 * cfg["n_query_groups"]) * cfg["head_size"]
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * INIT_STD

    wte = normal(V, E)                                                # (V, E)
    sd: dict[str, torch.Tensor] = {
        "whisper_adapter.fc_1.weight": normal(I, cfg["whisper_adapter_dim"]),
        "whisper_adapter.fc_2.weight": normal(I, cfg["whisper_adapter_dim"]),
        "whisper_adapter.proj.weight": normal(E, I),
        "lm_head.weight": wte,                 # tied: one tensor under both keys, as the original saves it
        "transformer.wte.weight": wte,
    }
    for n in range(cfg["n_layer"]):
        p = f"transformer.h.{n}."
        sd[p + "norm_1.weight"] = torch.ones(E)
        sd[p + "attn.attn.weight"] = normal(qkv_rows, E)
        sd[p + "attn.attn.bias"] = torch.zeros(qkv_rows)
        sd[p + "attn.proj.weight"] = normal(E, cfg["n_head"] * cfg["head_size"])
        sd[p + "norm_2.weight"] = torch.ones(E)
        sd[p + "mlp.fc_1.weight"] = normal(I, E)
        sd[p + "mlp.fc_2.weight"] = normal(I, E)
        sd[p + "mlp.proj.weight"] = normal(E, I)
    sd["transformer.ln_f.weight"] = torch.ones(E)

    dest.mkdir(parents=True, exist_ok=True)
    torch.save(sd, dest / "lit_model.pth")
    (dest / "model_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    write_demo_tokenizer(dest)
    _marker(dest, f"Mini-Omni ({size} trunk: {cfg['n_layer']} layers, n_embd {E})")
    return dest


# A few sentences to learn merges from, so common words become single tokens.
_TOKENIZER_CORPUS = """\
What is the capital of France? The capital of France is Paris.
How are you today? I am fine, thank you. What can I do for you?
Tell me a short story about a cat and a dog who became friends.
The weather is nice and sunny, so let us go for a walk in the park.
Speech to speech models listen, think and answer with their own voice.
""" * 4
QWEN_TEXT_VOCAB = 151643     # Qwen2's ordinary BPE ids 0..151642; its specials follow
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]   # ids 151643, 151644, 151645
DEMO_MERGE_VOCAB = 600       # vocabulary size reached by real merges before filler words


def write_demo_tokenizer(dest: Path) -> Path:
    """A byte-level BPE tokenizer.json in Qwen2's id layout (ordinary ids 0..151642, then its specials).

    Merges are learnt from a few sentences; the remaining ids up to 151642 are filled with made-up
    4-letter words so that any text id a random model emits decodes to visible text.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=DEMO_MERGE_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    learnt = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(learnt["vocab"].items(), key=lambda kv: kv[1]))
    fillers = ("\u0120" + "".join(w) for w in itertools.product(string.ascii_lowercase, repeat=4))
    for word in fillers:                 # "\u0120" is byte-level BPE's spelling of a leading space
        if len(vocab) >= QWEN_TEXT_VOCAB:
            break
        vocab.setdefault(word, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learnt["merges"]]

    final = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    final.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    final.decoder = decoders.ByteLevel()
    final.add_special_tokens([AddedToken(s, special=True) for s in QWEN_SPECIALS])
    dest.mkdir(parents=True, exist_ok=True)
    final.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "add_eos_token": False, "bos_token": None,
         "eos_token": "<|endoftext|>", "model_max_length": 32768}, indent=2))
    return dest / "tokenizer.json"


def write_demo_whisper(dest: Path, name: str = "small", size: str = "tiny", seed: int = DEMO_SEED) -> Path:
    """`<name>.pt` exactly like openai-whisper's files: {"dims": {...}, "model_state_dict": fp16 tensors}."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(**WHISPER_DIMS[size])
    torch.manual_seed(seed)
    model = Whisper(dims)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.dim() > 1:                  # linear/conv/embedding weights; LayerNorms keep 1 and 0
                p.normal_(0.0, INIT_STD)
            elif key.endswith(".bias") and "ln" not in key:
                p.normal_(0.0, INIT_STD)
    state = {k: v.half() for k, v in model.state_dict().items()}   # the released files are fp16
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}.pt"
    torch.save({"dims": dims.__dict__, "model_state_dict": state}, path)
    _marker(dest, f"openai-whisper encoder+decoder named {name!r} with {size} dims")
    return path


def write_demo_snac(dest: Path, size: str = "tiny", seed: int = DEMO_SEED) -> Path:
    """SNAC 24 kHz config.json + pytorch_model.bin (the snac package's own state-dict names)."""
    import torch
    from snac import SNAC

    config = SNAC_CONFIG[size]
    torch.manual_seed(seed)
    model = SNAC(**config)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(model.state_dict(), dest / "pytorch_model.bin")
    _marker(dest, f"SNAC 24 kHz codec ({size} config)")
    return dest


def component_dirs(root: Path, whisper: Iterable[str]) -> dict[str, Path]:
    """component -> its directory under the cache `root`: miniomni, snac, whisper-<name> per name."""
    dirs = {"miniomni": root / "miniomni", "snac": root / "snac"}
    dirs.update({WHISPER_PREFIX + n: root / (WHISPER_PREFIX + n) for n in whisper})
    return dirs


def _holds_real_weights(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir()) and not is_demo(folder)


def write_demo(root: Path, whisper: Iterable[str] = ("small",), size: str = "tiny",
               seed: int = DEMO_SEED) -> dict[str, Path]:
    """The whole demo set under `root`: miniomni/, whisper-<name>/<name>.pt, snac/.

    Refuses to write over a component directory that holds anything but demo weights.
    """
    if size not in MINIOMNI_TRUNK:
        raise ValueError(f"unknown demo size {size!r}; choose one of {sorted(MINIOMNI_TRUNK)}")
    whisper = list(whisper)
    dirs = component_dirs(Path(root).expanduser(), whisper)
    for folder in dirs.values():
        if _holds_real_weights(folder):
            raise FileExistsError(f"{folder} holds weights that are not demo weights; refusing to overwrite "
                                  f"them with random ones. Fix: write the demo set elsewhere "
                                  f"(omniflow fetch --demo --home DIR) or move {folder} away")
    out = {"miniomni": write_demo_miniomni(dirs["miniomni"], size, seed=seed),
           "snac": write_demo_snac(dirs["snac"], size, seed=seed)}
    for name in whisper:     # every demo whisper has the adapter's input width, so any name works
        out[WHISPER_PREFIX + name] = write_demo_whisper(dirs[WHISPER_PREFIX + name], name, size, seed)
    return out


# --- real downloads ----------------------------------------------------------------------------

def fetch(root: Path, whisper: Iterable[str] = ("small",)) -> dict[str, Path]:
    """Download the official weights into `root` (see omniflow/model/hub.py)."""
    import shutil

    from .model import hub

    whisper = list(whisper)
    dirs = component_dirs(Path(root).expanduser(), whisper)
    for folder in dirs.values():
        if is_demo(folder):        # demo files have the real names: the downloader would keep them
            log.warning("replacing the demo weights in %s with the real ones", folder)
            shutil.rmtree(folder)
    out = {"miniomni": Path(hub.fetch_miniomni(dirs["miniomni"])),
           "snac": Path(hub.fetch_snac(dirs["snac"]))}
    for name in whisper:
        out[WHISPER_PREFIX + name] = Path(hub.fetch_whisper(name, dirs[WHISPER_PREFIX + name]))
    return out


# --- CLI: omniflow fetch -----------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demo", action="store_true",
                        help="write randomly initialised weights in the official formats (no download; "
                             "output is not speech)")
    parser.add_argument("--demo-size", choices=sorted(MINIOMNI_TRUNK), default="tiny",
                        help="tiny: runs on 2 CPU cores in seconds; real: official shapes, for benchmarks")
    parser.add_argument("--home", default=None,
                        help=f"cache directory (default ${HOME_ENV} or {DEFAULT_HOME})")
    parser.add_argument("--whisper", action="append", default=None, metavar="SIZE",
                        help="openai-whisper size to fetch (repeatable; default: small)")


def main(args: argparse.Namespace) -> int:
    root = home(args.home)
    whisper = args.whisper or ["small"]
    try:
        if args.demo:
            written = write_demo(root, whisper, size=args.demo_size)
            print(f"wrote DEMO weights ({args.demo_size}, random: output is not speech) to {root}:")
        else:
            written = fetch(root, whisper)
            print(f"fetched weights to {root}:")
    except (OSError, RuntimeError, ValueError) as e:    # DownloadError is a RuntimeError
        print(f"omniflow fetch: error: {e}", file=sys.stderr)
        return 1
    for component, path in written.items():
        print(f"  {component:16s} {path}")
    if args.home and Path(args.home).expanduser() != home():
        print(f"use them with: export {HOME_ENV}={root}")
    return 0
