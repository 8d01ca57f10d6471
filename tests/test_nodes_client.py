"""nodes.client: PCM pushed from a real ZeroMQ socket comes out as "pcm" frames per session."""
from __future__ import annotations

import numpy as np
import pytest
import zmq

from nodes.client import PcmClientSource
from omniflow.testing import run_node


@pytest.fixture
def endpoint(tmp_path):
    return f"ipc://{tmp_path}/pcm.sock"


def serve(params: dict, send) -> list:
    """Start the source, let `send(socket)` push from a client, run until idle; return the pcm frames."""
    node = PcmClientSource({**params, "idle_timeout_s": 0.3})
    node.setup()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH if node.params.socket == "pull" else zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(node.params.endpoint)
    try:
        send(sock)
        return run_node(node, setup=False).on("audio")
    finally:
        sock.close()
        node.teardown()


def test_pushed_int16_chunks_become_pcm_frames_per_session(endpoint):
    alice = (np.arange(1000) - 500).astype(np.int16)
    bob = np.full(300, 7, np.int16)

    def send(sock):
        sock.send_multipart([b"alice", alice[:600].tobytes()])
        sock.send_multipart([bob.tobytes()])                     # no session part: params.session
        sock.send_multipart([b"alice", alice[600:].tobytes()])
        sock.send_multipart([b"alice", b""])                     # alice's stream ends

    frames = serve({"endpoint": endpoint, "rate": 8000, "session": "bob"}, send)
    by = {s: [f for f in frames if f.session == s] for s in ("alice", "bob")}
    np.testing.assert_array_equal(np.concatenate([f.data for f in by["alice"]]), alice)
    assert [f.seq for f in by["alice"]] == [0, 1, 2] and by["alice"][-1].last
    np.testing.assert_array_equal(by["bob"][0].data, bob)
    assert all(f.meta["rate"] == 8000 and f.data.dtype == np.int16 for f in frames)


def test_router_float32_uses_the_client_identity_as_session(endpoint):
    audio = np.linspace(-1, 1, 480, dtype=np.float32)

    def send(sock):
        sock.send_multipart([audio.tobytes()])

    (frame,) = serve({"endpoint": endpoint, "socket": "router", "dtype": "float32"}, send)
    np.testing.assert_array_equal(frame.data, audio)
    assert len(frame.session) > 0 and frame.session != "default"


def test_truncated_samples_are_dropped_not_crashing(endpoint, caplog):
    def send(sock):
        sock.send_multipart([b"\x01\x02\x03"])                   # 3 bytes: 1.5 int16 samples
        sock.send_multipart([np.zeros(4, np.int16).tobytes()])

    frames = serve({"endpoint": endpoint}, send)
    assert [len(f.data) for f in frames] == [4]
    assert "not a whole number of int16 samples" in caplog.text


def test_busy_endpoint_is_a_clear_error():
    taken = zmq.Context.instance().socket(zmq.PULL)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(RuntimeError, match="choose a free address"):
            PcmClientSource({"endpoint": f"tcp://127.0.0.1:{port}"}).setup()
    finally:
        taken.close()
