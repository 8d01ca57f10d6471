"""The install story of pyproject, README and .ci/run agree: one onnxruntime build per install, the CPU
torch from PyTorch's CPU index, no [dev] in the quick start, CI running exactly the README's test command."""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PROJECT["project"]["optional-dependencies"]
MACHINE_BUILDS = {"torch", "onnxruntime", "onnxruntime-gpu", "openai-whisper", "triton"}


def names(reqs: list[str]) -> set[str]:
    return {Requirement(r).name.lower() for r in reqs}


def setup_commands() -> list[str]:
    """The two commands of the README's Set-up block."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Set-up", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_machine_dependent_builds_come_only_from_the_cpu_or_gpu_extra():
    assert not names(PROJECT["project"]["dependencies"]) & MACHINE_BUILDS
    for extra, reqs in EXTRAS.items():
        if extra not in ("cpu", "gpu"):
            assert not names(reqs) & MACHINE_BUILDS, f"[{extra}] brings a machine-dependent build"
    cpu, gpu = names(EXTRAS["cpu"]), names(EXTRAS["gpu"])
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    assert "triton" not in cpu and "openai-whisper" not in cpu      # whisper goes in with --no-deps


def test_uv_takes_cpu_torch_from_the_cpu_index_and_keeps_the_extras_apart():
    uv = PROJECT["tool"]["uv"]
    assert [{"extra": "cpu"}, {"extra": "gpu"}] in uv["conflicts"]
    index = {i["name"]: i for i in uv["index"]}
    [source] = [s for s in uv["sources"]["torch"] if s.get("extra") == "cpu"]
    assert index[source["index"]]["url"].endswith("/whl/cpu") and index[source["index"]]["explicit"]


def test_readme_quick_start_installs_cpu_without_dev_and_ci_runs_its_test_command():
    install, test = setup_commands()
    pip = [shlex.split(part) for part in install.split("&&") if "pip install" in part]
    extras = [arg for cmd in pip for arg in cmd if arg.startswith(".[")]
    assert extras == [".[cpu]"], extras                                   # no [dev] for every user
    assert any("--extra-index-url" in cmd and "https://download.pytorch.org/whl/cpu" in cmd for cmd in pip)
    assert any(cmd[-2:] == ["--no-deps", "openai-whisper"] for cmd in pip)
    assert "omniflow run graphs/speech_to_speech.yaml" in install
    assert "pytest" in test
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == test                                                 # exactly the README's command
    assert re.search(r"pip install .*--no-deps openai-whisper", "\n".join(ci))


def dockerfile(name: str) -> str:
    return (REPO / name).read_text().replace("\\\n", " ")        # continuation lines joined


def test_dockerfiles_install_the_readme_builds_and_match_the_k8s_export():
    from omniflow.launch import k8s
    cpu, cuda = dockerfile("Dockerfile"), dockerfile("Dockerfile.cuda")
    for text in (cpu, cuda):
        for line in text.splitlines():
            if line.startswith("COPY "):
                *sources, _ = line.split()[1:]
                assert all((REPO / s).exists() for s in sources), line
        assert f"USER {k8s.POD_USER}" in text and f"--uid {k8s.POD_USER}" in text
        assert f"OMNIFLOW_HOME={k8s.WEIGHTS_DIR}" in text
    assert re.search(r"pip install '\.\[cpu,web\]' --extra-index-url https://download\.pytorch\.org/whl/cpu", cpu)
    assert "pip install --no-deps openai-whisper" in cpu and ".[gpu" not in cpu
    assert "pip install '.[gpu,web]'" in cuda and ".[cpu" not in cuda
    assert "! pip show onnxruntime " in cuda                 # the build fails on both onnxruntimes
    assert f"docker build -t {k8s.DEFAULT_IMAGE} ." in cpu
    assert f"docker build -f Dockerfile.cuda -t {k8s.DEFAULT_CUDA_IMAGE} ." in cuda
