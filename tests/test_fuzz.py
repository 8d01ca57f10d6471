"""Hostile input, generated: random frame headers/payloads into `frame.decode`, random JSON and
binary messages into the gateway. Only `FrameError` / error replies may come out, never a crash."""
from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from omniflow.frame import KINDS, Frame, FrameError, Header, decode, encode  # noqa: E402

TRICKY_DTYPES = ["", "bytes", "<f4", "<i2", "<i8", "|b1", "<c8", "V0", "V8", "i4,i4", "(2,)f4", "|O",
                 "<U4", "S3", "M8[s]", "m8", "f4)", "<zz", "float128", "=f8", ">f4", "|u1"]
small_ints = st.integers(min_value=-3, max_value=8)
dims = st.one_of(small_ints, st.integers(min_value=-(2**63), max_value=2**63 - 1))
json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
                           | st.text(max_size=12),
                           lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)


def check(parts) -> None:
    try:
        frame = decode(parts)
    except FrameError:
        return
    assert isinstance(frame, Frame) and frame.kind in KINDS
    if isinstance(frame.data, np.ndarray):            # what came through is a usable array
        assert frame.data.dtype.kind in "biufc" and frame.data.nbytes == len(parts[1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(KINDS)) | st.text(max_size=6),
       dtype=st.sampled_from(TRICKY_DTYPES) | st.text(max_size=8),
       shape=st.lists(dims, max_size=6) | st.lists(st.just(1), min_size=60, max_size=120),
       payload=st.binary(max_size=64), meta=st.dictionaries(st.text(max_size=6), json_values, max_size=3),
       turn=st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_random_headers_decode_or_raise_frame_error(kind, dtype, shape, payload, meta, turn):
    raw = msgspec.msgpack.encode(Header(kind, "s", turn, 0, False, meta, [], dtype, tuple(shape)))
    check([raw, payload])


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200), payload=st.binary(max_size=32),
       extra=st.lists(st.binary(max_size=8), max_size=2))
def test_random_bytes_decode_or_raise_frame_error(raw, payload, extra):
    check([raw, payload, *extra])
    check([raw, payload])


@settings(max_examples=200, deadline=None)
@given(fields=st.lists(json_values, min_size=0, max_size=11))
def test_random_msgpack_arrays_as_headers(fields):
    check([msgspec.msgpack.encode(fields), b""])


def test_a_valid_frame_still_round_trips():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(decode([bytes(p) for p in encode(Frame(kind="features", data=x))]).data, x)


# --- the gateway's client messages ---------------------------------------------------------------

messages = st.one_of(
    json_values.map(json.dumps),
    st.fixed_dictionaries({"type": st.sampled_from(["start", "text", "flush", "dance", None, 3])},
                          optional={"rate": json_values, "format": json_values, "output_format": json_values,
                                    "text": json_values}).map(json.dumps),
    st.text(max_size=40),
    st.binary(max_size=64))


@pytest.fixture(scope="module")
def live_gateway():
    pytest.importorskip("websockets")
    from nodes.gateway import Gateway

    node = Gateway({"port": 0, "dtype": "float32"})
    node.setup()
    yield node
    node.teardown()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(messages, min_size=1, max_size=8))
def test_random_client_messages_get_replies_or_errors_never_a_crash(live_gateway, batch):
    from websockets.sync.client import connect

    node = live_gateway
    with connect(f"ws://127.0.0.1:{node.port}/") as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "session"
        for message in batch:
            ws.send(message)
        ws.ping().wait(5)                       # the connection survived every message
        replies = []
        while True:
            try:
                replies.append(ws.recv(timeout=0.05))
            except TimeoutError:
                break
    for reply in replies:
        assert isinstance(reply, str) and json.loads(reply)["type"] in {"error", "session"}, reply
    for _ in range(50):                         # the node side digests every event without raising
        list(node.step())
        if node.events.empty() and not node.sessions:
            break
