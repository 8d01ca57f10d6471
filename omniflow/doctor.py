"""`omniflow doctor`: what this machine can run, and how to fix what it cannot.

Prints one row per check: ✓ works, ! works with a caveat, ✗ missing (with the fix). Exits 1 when
something required is missing (Python, the core packages, libzmq; torch and onnxruntime of the
model stack), else 0: optional extras, test tools and weights are reported but do not fail the check.
The model stack's rows (torch/CUDA, bf16, onnxruntime, weights) come from the modules named in
`omniflow.plugins.DOCTOR_CHECKS`.

    omniflow doctor                  # weights from $OMNIFLOW_HOME (default ~/.cache/omniflow)
    omniflow doctor --home DIR       # weights from DIR (as `omniflow fetch --home DIR`)
    omniflow doctor --json           # the same, machine-readable
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import platform
import shutil
import sys
from pathlib import Path
from typing import Callable

import msgspec

from . import plugins

MIN_PYTHON = (3, 11)
# core packages (pyproject dependencies) -> import name; imported for real, since some fail only
# at import (a broken binary wheel)
CORE_PACKAGES = {"numpy": "numpy", "msgspec": "msgspec", "pyyaml": "yaml", "pyzmq": "zmq", "rich": "rich"}
CORE_INSTALL = "pip install -e ."
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


def check_packages(name: str, packages: dict[str, str], fix: str, required: bool) -> list[Check]:
    """One row for a group of packages ({distribution: import name}): all import, or what does not."""
    missing, broken = [], []
    for dist, module in packages.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
        except Exception as e:                      # e.g. OSError: libsndfile not found
            broken.append(f"{dist} ({type(e).__name__}: {e})")
    if missing or broken:
        return [Check(name, FAIL, "; ".join(filter(None, [
            "missing: " + ", ".join(missing) if missing else "",
            "failing to import: " + ", ".join(broken) if broken else ""])), fix, required)]
    return [Check(name, OK, f"{len(packages)} import", required=required)]


def check_core_packages() -> list[Check]:
    return check_packages("core packages", CORE_PACKAGES, CORE_INSTALL, True)


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


CHECKS: list[Callable[[], list[Check]]] = [check_python, check_core_packages, check_zmq,
                                            check_extras, check_tools]


def _plugin_checks(home: Path | None) -> list[Callable[[], list[Check]]]:
    """The checks of the packages named in plugins.DOCTOR_CHECKS, bound to `home`."""
    checks: list[Callable[[], list[Check]]] = []
    for module in plugins.DOCTOR_CHECKS:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            checks.append(lambda m=module, e=e: [Check(m, WARN, f"not importable ({e})",
                                                       plugins.MODEL_INSTALL)])
            continue
        checks += [functools.partial(check, home) if "home" in inspect.signature(check).parameters
                   else check for check in mod.CHECKS]
    return checks


def run_checks(home: str | Path | None = None) -> list[Check]:
    """Every check, in order; a check that crashes is reported as a failed row, not raised."""
    rows: list[Check] = []
    for check in [*CHECKS, *_plugin_checks(Path(home) if home else None)]:
        try:
            rows += check()
        except Exception as e:
            name = getattr(getattr(check, "func", check), "__name__", "check").removeprefix("check_")
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
    console.print(f"[red]missing: {', '.join(failed)}[/]" if failed else
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
