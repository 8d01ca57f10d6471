"""The import graph, read with `ast` (nothing is imported): no cycles in omniflow/, nodes/, train/
and benchmarks/, and a core that knows no model.

Every import statement counts, also the ones inside functions (a lazy import is still a
dependency); only `if TYPE_CHECKING:` blocks are skipped. `from a import b` depends on the module
`a.b` when that is a module of the repository, else on `a`.
"""
from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from omniflow.doctor import CORE_PACKAGES

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("omniflow", "nodes", "train", "benchmarks")
# what the core (omniflow/ outside omniflow/model/) must not import, lazily or not
MODEL_CODE = ("omniflow.model", "nodes", "train", "benchmarks", "torch", "snac", "whisper",
              "transformers", "tokenizers", "huggingface_hub", "onnxruntime", "silero_vad")
# the third-party packages a core module may import at module level: pyproject's core dependencies
# (doctor.CORE_PACKAGES: distribution -> import name). Anything else the core uses is imported
# where it is used, with an install hint.
CORE_DEPENDENCIES = set(CORE_PACKAGES.values())


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def repository_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import statement in `path`."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit_one(sub, top)
                continue
            visit_one(child, top)

    def visit_one(child: ast.AST, top: bool) -> None:
        if isinstance(child, ast.Import):
            found.extend((alias.name, child.lineno, top) for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (child.level - 1)]
                source = ".".join(base + ([child.module] if child.module else []))
            else:
                source = child.module or ""
            for alias in child.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in modules else source, child.lineno, top))
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(child, False)
        else:
            visit(child, top)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def known(target: str, modules: dict[str, Path]) -> str | None:
    """The repository module `target` names (itself or its longest known parent), or None."""
    parts = target.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    modules = repository_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, _ in imports_of(name, path, modules):
            dep = known(target, modules)
            if dep is not None and dep != name:
                graph[name].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for v in sorted(graph):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def is_core(name: str) -> bool:
    return (name == "omniflow" or name.startswith("omniflow.")) and not (
        name == "omniflow.model" or name.startswith("omniflow.model."))


def test_there_are_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (each line: modules that reach each other through imports):\n" + \
        "\n".join("  " + ", ".join(c) for c in found)


def test_the_core_imports_no_model_code():
    modules = repository_modules()
    bad = [f"{modules[name].relative_to(REPO)}:{line} imports {target}"
           for name in modules if is_core(name)
           for target, line, _ in imports_of(name, modules[name], modules)
           if any(target == m or target.startswith(m + ".") for m in MODEL_CODE)]
    assert not bad, "core modules importing model code:\n" + "\n".join("  " + b for b in bad)


def test_the_core_imports_only_its_dependencies_at_module_level():
    modules = repository_modules()
    stdlib = sys.stdlib_module_names
    bad = [f"{modules[name].relative_to(REPO)}:{line} imports {target} at module level"
           for name in modules if is_core(name)
           for target, line, top in imports_of(name, modules[name], modules)
           if top and known(target, modules) is None and target.split(".")[0] not in stdlib
           and target.split(".")[0] not in CORE_DEPENDENCIES and target != "__future__"]
    assert not bad, ("a core module imports a package outside the core dependencies "
                     f"{sorted(CORE_DEPENDENCIES)} when it is imported (import it where it is "
                     "used, or add it to pyproject's core dependencies):\n" + "\n".join(bad))


def test_pyproject_core_dependencies_are_the_core_packages_and_the_model_stack_is_an_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {Requirement(r).name.lower() for r in project["dependencies"]}
    assert core == set(CORE_PACKAGES)
    extras = project["optional-dependencies"]
    model = {Requirement(r).name.lower().replace("_", "-") for r in extras["model"]}
    assert {"snac", "tokenizers", "huggingface-hub", "soundfile"} <= model
    for machine in ("cpu", "gpu"):             # the README installs one of them: the model comes along
        assert "omniflow[model]" in extras[machine]


@pytest.mark.parametrize("source, expected", [
    ("import a.b\n", [("a.b", 1, True)]),
    ("def f():\n    from .sibling import x\n", [("pkg.sibling", 2, False)]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n",
     [("typing", 1, True)]),
])
def test_the_walker_reads_imports(tmp_path, source, expected):
    path = tmp_path / "mod.py"
    path.write_text(source)
    assert imports_of("pkg.mod", path, {}) == expected


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
sys.meta_path.insert(0, Block())
"""


def test_the_core_imports_and_its_cli_works_without_the_model_stack(tmp_path):
    """Every core module imports, and `omniflow --help` / `doctor` run, with the model stack absent."""
    import subprocess

    core = sorted(m for m in repository_modules() if is_core(m))
    blocked = ["torch", "snac", "whisper", "transformers", "tokenizers", "huggingface_hub",
               "onnxruntime", "silero_vad", "soundfile", "soxr", "tqdm"]
    code = BLOCKER.format(blocked=blocked) + f"""
import importlib
for m in {core!r}:
    importlib.import_module(m)
from omniflow.cli import main
sys.argv = ["omniflow", "--help"]
try:
    main()
except SystemExit as e:
    assert e.code == 0
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
print("ok", len({core!r}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"ok {len(core)}")
    fetch = subprocess.run([sys.executable, "-c", BLOCKER.format(blocked=blocked)
                            + "from omniflow.cli import main; sys.exit(main(['fetch', '--demo', "
                            f"'--home', {str(tmp_path)!r}]))"],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert fetch.returncode == 1 and "pip install" in fetch.stderr, fetch.stderr
    assert "Traceback" not in fetch.stderr


def test_the_audio_rates_are_written_once():
    """16 kHz and 24 kHz appear as numbers only in omniflow/model/units.py; code imports them."""
    units = REPO / "omniflow" / "model" / "units.py"
    standalone = {REPO / "examples" / "ws_client.py"}     # a WebSocket client that needs no omniflow
    rates = {16_000, 24_000}
    bad = [f"{path.relative_to(REPO)}:{node.lineno}: {node.value}"
           for pkg in (*PACKAGES, "examples") for path in sorted((REPO / pkg).rglob("*.py"))
           if path != units and path not in standalone
           for node in ast.walk(ast.parse(path.read_text()))
           if isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value in rates]
    assert not bad, "use omniflow.model.units (WHISPER_RATE, SNAC_RATE) instead of:\n" + "\n".join(bad)
