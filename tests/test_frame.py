"""Frames survive the wire exactly, and anything malformed is rejected with a FrameError."""
from __future__ import annotations

import msgspec
import numpy as np
import pytest

from omniflow.frame import (MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES, Frame, FrameError, Header,
                            decode, encode)


def wire(frame: Frame) -> Frame:
    return decode([bytes(p) for p in encode(frame)])


@pytest.mark.parametrize("data", [
    np.arange(6, dtype=np.int64).reshape(2, 3),
    np.linspace(-1, 1, 320, dtype=np.float32),
    np.zeros((0, 7), dtype=np.int64),
    np.arange(10, dtype=np.int16)[::2],          # not contiguous: sent as a contiguous copy
    b"\x00raw bytes\xff",
    None,
])
def test_round_trip_keeps_header_and_payload(data):
    f = Frame(kind="pcm", session="s1", turn=3, seq=42, last=True,
              meta={"rate": 24000, "text": "héllo"}, stamps=[("src", 123)], data=data)
    g = wire(f)
    assert (g.kind, g.session, g.turn, g.seq, g.last, g.meta, g.stamps) == \
        ("pcm", "s1", 3, 42, True, {"rate": 24000, "text": "héllo"}, [("src", 123)])
    if isinstance(data, np.ndarray):
        assert g.data.dtype == data.dtype and g.data.shape == data.shape
        np.testing.assert_array_equal(g.data, data)
    else:
        assert g.data == data


def test_follow_keeps_session_turn_seq_and_stamps():
    f = Frame(kind="pcm", session="a", turn=2, seq=9).stamp("mic")
    g = f.follow("utterance", data=np.ones(3, np.float32))
    assert (g.kind, g.session, g.turn, g.seq, [h for h, _ in g.stamps]) == ("utterance", "a", 2, 9, ["mic"])
    g.stamp("vad")
    assert len(f.stamps) == 1                    # the copy does not alias the original's stamps


def header(**over) -> bytes:
    fields = dict(kind="pcm", session="s", turn=0, seq=0, last=False, meta={}, stamps=[],
                  dtype="<f4", shape=(4,))
    fields.update(over)
    return msgspec.msgpack.encode(Header(**fields))


@pytest.mark.parametrize("parts, reason", [
    ([b"garbage"], "expected 2 message parts"),
    ([header(), b"\x00" * 16, b"x"], "expected 2 message parts"),
    ([b"\xc1not msgpack", b""], "undecodable header"),
    ([msgspec.msgpack.encode({"kind": "pcm"}), b""], "undecodable header"),
    ([b"\x00" * (MAX_HEADER_BYTES + 1), b""], "exceeds"),
    ([header(), b"\x00" * 12], "payload is 12 bytes but <f4[4] needs 16"),
    ([header(kind="video"), b"\x00" * 16], "unknown frame kind"),
    ([header(dtype="<zz"), b"\x00" * 16], "unknown dtype"),
    ([header(dtype="|O"), b"\x00" * 8], "refusing dtype"),
    ([header(shape=(-4,)), b""], "refusing dtype"),
    ([header(dtype="", shape=()), b"\x00"], "no payload"),
    ([header(dtype="bytes", shape=(3,)), b"\x00"], "payload has 1"),
    # numpy accepts these dtype strings, and each used to escape as ValueError/TypeError
    ([header(dtype="V0", shape=(4,)), b""], "refusing dtype"),
    ([header(dtype="i4,i4", shape=(2,)), b"\x00" * 16], "refusing dtype"),
    ([header(dtype="(2,)f4", shape=(2,)), b"\x00" * 16], "refusing dtype"),
    ([header(dtype="<U4", shape=(1,)), b"\x00" * 16], "refusing dtype"),
    ([header(dtype="M8[s]", shape=(1,)), b"\x00" * 8], "refusing dtype"),
    ([header(dtype="f4)", shape=(1,)), b"\x00" * 4], "unknown dtype"),
    ([header(dtype="<f4", shape=(1,) * 100), b"\x00" * 4], "refusing dtype"),
    ([header(dtype="<f4", shape=(0, 2**62, 2**62)), b""], "cannot be shaped|refusing"),
])
def test_malformed_frames_are_rejected(parts, reason):
    with pytest.raises(FrameError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        decode(parts)


def test_oversize_payload_is_rejected_before_decoding(monkeypatch):
    monkeypatch.setattr("omniflow.frame.MAX_PAYLOAD_BYTES", 64)
    with pytest.raises(FrameError, match="payload of 80 bytes exceeds 64"):
        decode([header(shape=(20,)), b"\x00" * 80])
    assert MAX_PAYLOAD_BYTES > 64
