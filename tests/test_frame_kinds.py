"""Frame kinds are registered by the package that defines them; node processes and recordings
carry the registry, so a frame decodes wherever it arrives."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from omniflow.frame import KINDS, Frame, FrameError, decode, encode, register_kind

REPO = Path(__file__).resolve().parent.parent


def test_core_registers_only_generic_kinds():
    code = "import omniflow.frame as f; print(sorted(f.KINDS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    assert eval(out) == ["any", "control", "eos", "error", "pcm", "text", "utterance"]


def test_importing_a_node_registers_the_model_kinds():
    code = "import nodes.text, omniflow.frame as f; print(sorted(f.KINDS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    assert {"features", "embeds", "tokens", "codes"} <= set(eval(out))


@pytest.fixture
def registry():
    """The registry, restored to what it held after the test."""
    saved = dict(KINDS)
    yield KINDS
    KINDS.clear()
    KINDS.update(saved)


def test_register_kind_makes_a_new_kind_decodable(registry):
    with pytest.raises(FrameError, match="unknown frame kind"):
        decode(encode(Frame(kind="video-test")))
    assert register_kind("video-test", "one RGB frame uint8 (H, W, 3)") == "video-test"
    assert decode(encode(Frame(kind="video-test"))).kind == "video-test"
    register_kind("video-test", "one RGB frame uint8 (H, W, 3)")       # the same again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_kind("video-test", "something else")
    with pytest.raises(ValueError, match="letters, digits"):
        register_kind("bad kind", "spaces are not allowed")


def test_node_config_carries_the_launchers_kinds(registry):
    import msgspec

    from omniflow.runtime import NodeConfig
    from omniflow.transport import Wiring

    register_kind("video-test", "one RGB frame")
    cfg = NodeConfig(name="n", use="m:C", params={}, wiring=Wiring())
    sent = msgspec.json.encode(cfg)                      # as the launcher writes it for a process
    del registry["video-test"]
    assert msgspec.json.decode(sent, type=NodeConfig).kinds["video-test"] == "one RGB frame"


def test_a_recording_carries_its_kinds(registry, tmp_path):
    from omniflow.record import Recording, RecordTap

    register_kind("video-test", "one RGB frame")
    tap = RecordTap({"a/out->b/in": str(tmp_path / "r.omnirec")})
    link = type("Link", (), {"id": "a/out->b/in"})()
    tap.received(link, None, encode(Frame(kind="video-test", seq=1)), 5)
    tap.close()
    del registry["video-test"]                          # a reader that never imported its package
    [(t_ns, frame)] = list(Recording(tmp_path / "r.omnirec"))
    assert (t_ns, frame.kind, frame.seq) == (5, "video-test", 1)
