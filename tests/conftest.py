"""Shared fixtures. The tests directory is put on sys.path so graphs can `use:` the helper nodes
in tests/test_runtime_nodes.py; node processes inherit the launcher's sys.path."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture
def tone_wav(tmp_path):
    """Write a mono 16-bit WAV: a 2 s sweep at 16 kHz with some noise. Returns (path, int16 samples)."""
    def make(seconds: float = 2.0, rate: int = 16000, name: str = "tone.wav", channels: int = 1):
        t = np.arange(int(seconds * rate)) / rate
        x = 0.5 * np.sin(2 * np.pi * (200 + 400 * t) * t)
        x += 0.01 * np.random.default_rng(0).standard_normal(len(t))
        pcm = np.round(x * 32767).astype(np.int16)
        if channels > 1:
            pcm = np.stack([pcm] * channels, axis=1)
        path = tmp_path / name
        sf.write(path, pcm, rate, subtype="PCM_16")
        return path, pcm
    return make


@pytest.fixture(scope="session")
def demo_weights(tmp_path_factory) -> Path:
    """`omniflow fetch --demo --home <tmp>`, once per test session (random weights, official formats)."""
    import subprocess

    home = tmp_path_factory.mktemp("omniflow-home")
    subprocess.run([sys.executable, "-m", "omniflow.cli", "fetch", "--demo", "--home", str(home)],
                   check=True, capture_output=True, cwd=TESTS.parent)
    return home


@pytest.fixture(scope="module")
def demo_home(demo_weights):
    """The demo weights, with OMNIFLOW_HOME pointing at them for the tests of one module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OMNIFLOW_HOME", str(demo_weights))
    yield demo_weights
    mp.undo()


@pytest.fixture
def gateway():
    """Start Gateway nodes on free ports; torn down after the test."""
    from nodes.gateway import Gateway

    started = []

    def start(**params):
        node = Gateway({"port": 0, **params})
        node.setup()
        started.append(node)
        return node
    yield start
    for node in started:
        node.teardown()
