"""`omniflow doctor`: what this machine can run, and how to fix what it cannot.

Prints one row per check: ✓ works, ! works with a caveat, ✗ missing (with the fix). Exits 1 when
something the core needs is missing (Python, the core packages, libzmq), else 0: optional extras,
test tools and weights are reported but do not fail the check.

    omniflow doctor                  # weights from $OMNIFLOW_HOME (default ~/.cache/omniflow)
    omniflow doctor --home DIR       # weights from DIR (as `omniflow fetch --home DIR`)
    omniflow doctor --json           # the same, machine-readable
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import platform
import shutil
import sys
from pathlib import Path
from typing import Callable

import msgspec

MIN_PYTHON = (3, 11)
CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")         # CPU instructions that make bfloat16 fast
# core packages (pyproject dependencies) -> import name; imported for real, since some fail only
# at import (soundfile without libsndfile, torch with a broken CUDA runtime)
CORE_PACKAGES = {"numpy": "numpy", "msgspec": "msgspec", "pyyaml": "yaml", "soundfile": "soundfile",
                 "soxr": "soxr", "rich": "rich", "snac": "snac", "openai-whisper": "whisper",
                 "tokenizers": "tokenizers", "huggingface_hub": "huggingface_hub",
                 "silero-vad": "silero_vad"}
OK, WARN, FAIL = "ok", "warn", "fail"
MARKS = {OK: "[green]✓[/]", WARN: "[yellow]![/]", FAIL: "[red]✗[/]"}


class Check(msgspec.Struct):
    name: str
    status: str                 # ok | warn | fail
    detail: str
    fix: str = ""
    required: bool = False      # a failed required check makes `omniflow doctor` exit 1


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- the checks: each returns one or more rows, and never raises (run_checks guards them) --------

def check_python() -> list[Check]:
    v = sys.version_info
    ok = v[:2] >= MIN_PYTHON
    need = ".".join(map(str, MIN_PYTHON))
    return [Check("python", OK if ok else FAIL, f"{platform.python_version()} ({sys.executable})",
                  "" if ok else f"install Python >= {need} and reinstall omniflow with it", True)]


def check_core_packages() -> list[Check]:
    missing, broken = [], []
    for dist, module in CORE_PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
        except Exception as e:                      # e.g. OSError: libsndfile not found
            broken.append(f"{dist} ({type(e).__name__}: {e})")
    if missing or broken:
        return [Check("core packages", FAIL, "; ".join(filter(None, [
            "missing: " + ", ".join(missing) if missing else "",
            "failing to import: " + ", ".join(broken) if broken else ""])),
            "pip install -e '.[cpu]' (a CPU machine) or pip install -e . (a CUDA machine)", True)]
    return [Check("core packages", OK, f"{len(CORE_PACKAGES)} import", required=True)]


def check_torch() -> list[Check]:
    try:
        import torch
    except Exception as e:
        return [Check("torch", FAIL, f"cannot import torch ({e})",
                      "pip install -e '.[cpu]' for the CPU wheel, or a CUDA build from pytorch.org", True)]
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
    try:
        import onnxruntime as ort
    except Exception as e:
        return [Check("onnxruntime", FAIL, f"cannot import ({e})", "pip install onnxruntime", True)]
    providers = ort.get_available_providers()
    return [Check("onnxruntime", OK, f"{ort.__version__}: {', '.join(providers)}", required=True)]


def check_zmq() -> list[Check]:
    try:
        import zmq
    except Exception as e:
        return [Check("pyzmq / libzmq", FAIL, f"cannot import zmq ({e})", "pip install pyzmq", True)]
    rows = [Check("pyzmq / libzmq", OK, f"pyzmq {zmq.pyzmq_version()}, libzmq {zmq.zmq_version()}",
                  required=True)]
    if zmq.has("curve"):
        rows.append(Check("CURVE", OK, "encrypted tcp edges available (run --keys DIR)"))
    else:
        rows.append(Check("CURVE", FAIL, "libzmq was built without CURVE: run --keys will fail",
                          "pip install --force-reinstall pyzmq (its wheels bundle libzmq with "
                          "CURVE), or a libzmq built with libsodium"))
    return rows


def check_extras() -> list[Check]:
    rows = []
    for dist, module, extra, use in (("ray", "ray", "ray", "--launcher ray"),
                                     ("websockets", "websockets", "web", "the WebSocket gateway")):
        version = _version(dist) if importlib.util.find_spec(module) else None
        rows.append(Check(dist, OK, f"{version} ({use})") if version else
                    Check(dist, WARN, f"not installed (needed for {use})",
                          f"pip install 'omniflow[{extra}]'"))
    rows.append(_check_sounddevice())
    return rows


def _check_sounddevice() -> Check:
    if importlib.util.find_spec("sounddevice") is None:
        return Check("sounddevice", WARN, "not installed (needed for microphone / speaker nodes)",
                     "pip install 'omniflow[audio]'")
    try:
        import sounddevice as sd
        inputs = [d["name"] for d in sd.query_devices() if d["max_input_channels"] > 0]
    except Exception as e:                           # OSError: PortAudio library not found
        return Check("sounddevice", WARN, f"installed but unusable ({e})",
                     "install PortAudio (apt install libportaudio2)")
    if not inputs:
        return Check("sounddevice", WARN, f"{sd.__version__}, no input device",
                     "plug in a microphone, or use nodes.audio:FileSource")
    return Check("sounddevice", OK, f"{sd.__version__}, {len(inputs)} input device(s): "
                 + ", ".join(inputs[:3]))


def check_tools() -> list[Check]:
    rows = []
    for tool, why, package in (("espeak-ng", "synthesises test questions (examples/make_question.sh)",
                                "espeak-ng"), ("sox", "audio conversions in tests", "sox")):
        path = shutil.which(tool)
        rows.append(Check(tool, OK, path) if path else
                    Check(tool, WARN, f"not found: {why}", f"apt install {package}"))
    return rows


def check_weights(root: Path | None = None) -> list[Check]:
    from . import weights
    root = weights.home(root).resolve()
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


CHECKS: list[Callable[[], list[Check]]] = [check_python, check_core_packages, check_torch,
                                            check_cpu_bf16, check_onnxruntime, check_zmq,
                                            check_extras, check_tools]


def run_checks(home: str | Path | None = None) -> list[Check]:
    """Every check, in order; a check that crashes is reported as a failed row, not raised."""
    rows: list[Check] = []
    for check in [*CHECKS, lambda: check_weights(Path(home) if home else None)]:
        try:
            rows += check()
        except Exception as e:
            name = getattr(check, "__name__", "check").removeprefix("check_")
            rows.append(Check(name, FAIL, f"the check itself failed: {e!r}",
                              "please report this with the output of omniflow doctor"))
    return rows


def exit_code(rows: list[Check]) -> int:
    return 1 if any(r.required and r.status == FAIL for r in rows) else 0


def print_checks(rows: list[Check], console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(title="omniflow doctor", title_justify="left")
    for col in ("", "check", "found", "fix"):
        table.add_column(col)
    for r in rows:
        name = f"{escape(r.name)} [dim](required)[/]" if r.required else escape(r.name)
        table.add_row(MARKS[r.status], name, escape(r.detail), escape(r.fix))   # "[audio]" is text
    console.print(table)
    failed = [r.name for r in rows if r.required and r.status == FAIL]
    console.print(f"[red]missing for the core: {', '.join(failed)}[/]" if failed else
                  "[green]the core works[/] (rows marked ! or ✗ are optional or need weights)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", default=None,
                        help="weights cache to check (default: $OMNIFLOW_HOME or ~/.cache/omniflow)")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def main(args: argparse.Namespace) -> int:
    rows = run_checks(args.home)
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(rows).decode()))
    else:
        print_checks(rows)
    return exit_code(rows)
