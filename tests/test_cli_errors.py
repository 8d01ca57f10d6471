"""The first hour at the command line: `omniflow run` says what it wrote and logs each node's
metrics once; expected failures are one line, not a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def omniflow(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omniflow.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.parametrize("how", [[], ["--in-process"]])
def test_run_names_the_files_it_wrote_and_logs_metrics_once(tmp_path, how):
    out = tmp_path / "quiet.wav"
    done = omniflow("run", "graphs/demo.yaml", "--set", f"sink.path={out}", *how)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote: {out} (" in done.stderr
    assert done.stderr.count("frames_in=") == 3                    # one line per node, not two


def test_a_missing_input_file_is_one_line_not_a_traceback(tmp_path):
    done = omniflow("run", "graphs/demo.yaml", "--set", f"src.path={tmp_path / 'nowhere.wav'}",
                    "--set", f"sink.path={tmp_path / 'out.wav'}")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "audio file not found" in done.stderr and "wrote:" not in done.stderr


def test_expected_cli_failures_are_one_line(tmp_path):
    for args, needle in ((["train", "stage1", "--data", str(tmp_path), "--out", str(tmp_path / "run")],
                          "nothing to start from"),
                         (["train", "preprocess", "--source", str(tmp_path / "none.jsonl"), "--out",
                           str(tmp_path / "cache"), "--tokenizer", str(tmp_path)], "none.jsonl")):
        done = omniflow(*args)
        assert done.returncode == 1, done.stderr[-2000:]
        assert "Traceback" not in done.stderr and needle in done.stderr
        assert "OMNIFLOW_DEBUG=1" in done.stderr                      # how to see the traceback
