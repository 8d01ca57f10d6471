"""`omniflow doctor`: reports what works, names the fix for what does not, exits 1 only when the
core is broken."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from omniflow import doctor
from omniflow.model import doctor as model_doctor

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = ("miniomni", "snac", "whisper-small")


def omniflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omniflow.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def rows_by_name(rows) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


def test_doctor_reports_demo_weights_after_fetch_demo(tmp_path):
    home = tmp_path / "home"
    assert omniflow("fetch", "--demo", "--home", str(home)).returncode == 0
    done = omniflow("doctor", "--home", str(home), "--json")
    assert done.returncode == 0, done.stderr            # this machine runs the core
    rows = rows_by_name(json.loads(done.stdout))
    for component in WEIGHTS:
        row = rows[f"weights: {component}"]
        assert row["status"] == "warn" and "DEMO" in row["detail"], row
        assert str(home / component) in row["detail"]
    assert rows["python"]["status"] == "ok" and rows["python"]["required"]
    assert rows["torch"]["status"] == "ok" and "build" in rows["torch"]["detail"]
    assert rows["pyzmq / libzmq"]["status"] == "ok"
    for name in ("CURVE", "CPU bf16", "onnxruntime", "CUDA devices", "ray", "websockets",
                 "sounddevice", "espeak-ng", "sox"):
        assert name in rows                             # every promised check has its row

    table = omniflow("doctor", "--home", str(home))    # the human form says the same
    assert table.returncode == 0
    assert "DEMO weights" in table.stdout and "✓" in table.stdout and "the core works" in table.stdout


def test_missing_weights_fail_with_the_fetch_command_but_not_the_exit_code(tmp_path):
    rows = doctor.run_checks(tmp_path / "empty")
    weights = [r for r in rows if r.name.startswith("weights: ")]
    assert [r.name for r in weights] == [f"weights: {c}" for c in WEIGHTS]
    assert all(r.status == doctor.FAIL and "omniflow fetch" in r.fix for r in weights)
    assert doctor.exit_code(rows) == 0                  # weights are data, not the core


def test_a_missing_core_package_exits_1_and_names_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(doctor.CORE_PACKAGES, "no-such-package", "no_such_package_xyz")
    code = doctor.main(argparse.Namespace(home=str(tmp_path), json=True))
    assert code == 1
    row = rows_by_name(json.loads(capsys.readouterr().out))["core packages"]
    assert row["status"] == "fail" and "no-such-package" in row["detail"]
    assert "pip install" in row["fix"]


@pytest.mark.parametrize("flags, status", [("fpu sse avx512f avx512_bf16 amx_tile", doctor.OK),
                                           ("fpu sse avx2", doctor.WARN)])
def test_cpu_bf16_is_read_from_cpuinfo_flags(tmp_path, flags, status):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    [row] = model_doctor.check_cpu_bf16(cpuinfo)
    assert row.status == status
    if status == doctor.OK:
        assert row.detail.startswith("avx512_bf16") and not row.fix
    else:
        assert "float32" in row.fix                     # what to do without bf16 instructions


def test_a_crashing_check_is_a_failed_row_not_a_traceback(monkeypatch):
    def check_broken():
        raise RuntimeError("boom")
    monkeypatch.setattr(doctor, "CHECKS", [doctor.check_python, check_broken])
    rows = doctor.run_checks()
    assert rows[0].name == "python"
    assert rows[1].name == "broken" and rows[1].status == doctor.FAIL and "boom" in rows[1].detail


def test_a_cuda_build_lists_its_devices(monkeypatch):
    """No GPU here: the CUDA branch runs against torch's own API, answered as a one-GPU box would."""
    import torch

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    build, devices = model_doctor.check_torch()
    assert build.status == doctor.OK and "CUDA 12.4 build" in build.detail
    assert devices.status == doctor.OK and devices.detail == "1: NVIDIA H100 80GB HBM3 (bf16 ok)"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, devices = model_doctor.check_torch()
    assert devices.status == doctor.WARN and "nvidia-smi" in devices.fix


def test_onnxruntime_and_onnxruntime_gpu_together_fail(monkeypatch):
    """Both builds share one module and overwrite each other's files: doctor names it and the fix."""
    monkeypatch.setattr(model_doctor, "_installed", lambda dist: dist in model_doctor.ORT_DISTS)
    [row] = model_doctor.check_onnxruntime()
    assert row.status == doctor.FAIL and row.required
    assert "both installed" in row.detail and "pip uninstall -y onnxruntime onnxruntime-gpu" in row.fix


def test_onnxruntime_row_names_the_installed_build():
    pytest.importorskip("onnxruntime")
    [row] = model_doctor.check_onnxruntime()
    installed = [d for d in model_doctor.ORT_DISTS if model_doctor._installed(d)]
    assert row.status == doctor.OK and f"({', '.join(installed)})" in row.detail
