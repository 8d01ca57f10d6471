"""Frames: what flows along every edge.

A frame travels as two ZeroMQ message parts:

    part 0  header   msgspec msgpack of `Header` (kind, session, turn, seq, stamps, dtype, shape, meta)
    part 1  payload  raw bytes: an ndarray's buffer (no copy through msgpack), plain bytes, or empty

`encode` / `decode` are the only way frames cross a process boundary; `decode` validates and raises
`FrameError` (the runtime counts it, logs it and keeps serving).
"""
from __future__ import annotations

import math
import time
from typing import Any

import msgspec
import numpy as np

MAX_HEADER_BYTES = 64 * 1024        # a header is metadata, never data: larger ones are rejected
MAX_PAYLOAD_BYTES = 256 * 1024**2   # one frame's payload; a whole 30 s utterance is ~1.9 MB
MAX_DIMS = 8                        # dimensions of an array payload (nodes send 1-3)
PLAIN_KINDS = "biufc"               # numpy dtype kinds a payload may have: bool, int, uint, float, complex

# Frame kinds a port may declare, name -> what the frame holds. The core registers the generic
# ones; a package that defines others registers them when it is imported (the Mini-Omni kinds:
# omniflow/model/kinds.py, imported by the nodes package). "any" accepts everything (generic
# sinks, taps, recorders). The launcher hands every node process the kinds of its graph
# (runtime.NodeConfig.kinds), so `decode` knows them whatever the process imported.
KINDS: dict[str, str] = {}


def register_kind(name: str, doc: str) -> str:
    """Make `name` a frame kind ports may declare and frames may carry; returns `name`.

    Registering a name again with the same `doc` is a no-op; with another doc it is an error (two
    packages would mean different things by one kind).
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"frame kind {name!r}: use letters, digits, '_' and '-'")
    known = KINDS.get(name)
    if known is not None and known != doc:
        raise ValueError(f"frame kind {name!r} is already registered as {known!r}; "
                         f"pick another name for {doc!r}")
    KINDS[name] = doc
    return name


register_kind("any", "accepts every kind")
register_kind("pcm", "mono audio chunk; int16 or float32 (N,), meta['rate'] in Hz")
register_kind("utterance", "one whole utterance of mono float32 audio (N,), meta['rate'] in Hz")
register_kind("text", "UTF-8 text in meta['text'] (a prompt, a transcript, a streamed answer piece)")
register_kind("control", "control-channel message: meta['op'] in {'turn', 'next_turn', 'end', "
              "'end_session', 'stop', ...}")
register_kind("error", "this session's turn failed upstream: meta['error'] says why, meta['node'] "
              "where; last=True")
register_kind("eos", "end of stream on this edge: the producer will send nothing more")


class FrameError(ValueError):
    """A frame that cannot be decoded or whose payload disagrees with its header."""


class Frame(msgspec.Struct, kw_only=True):
    """One unit of data on an edge. `data` is the payload; everything else is the header."""

    kind: str
    session: str = "default"
    turn: int = 0
    seq: int = 0
    last: bool = False                      # last frame of this session's turn on this edge
    meta: dict[str, Any] = {}
    stamps: list[tuple[str, int]] = []      # (hop name, time.monotonic_ns()) per hop, for tracing
    data: Any = None                        # np.ndarray | bytes | None — sent as its own part

    def stamp(self, hop: str) -> "Frame":
        self.stamps.append((hop, time.monotonic_ns()))
        return self

    def follow(self, kind: str, data: Any = None, **fields: Any) -> "Frame":
        """A new frame of `kind` for the same session/turn/seq, carrying this frame's stamps."""
        fields.setdefault("seq", self.seq)
        return Frame(kind=kind, session=self.session, turn=self.turn, stamps=list(self.stamps),
                     data=data, **fields)


class Header(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    kind: str
    session: str
    turn: int
    seq: int
    last: bool
    meta: dict[str, Any]
    stamps: list[tuple[str, int]]
    dtype: str          # numpy dtype string ("<f4"), "bytes" for raw bytes, "" for no payload
    shape: tuple[int, ...]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)


def encode(frame: Frame) -> list[bytes | memoryview]:
    """Frame -> [header, payload] for `socket.send_multipart(..., copy=False)`."""
    data = frame.data
    if data is None:
        dtype, shape, payload = "", (), b""
    elif isinstance(data, (bytes, bytearray, memoryview)):
        dtype, shape, payload = "bytes", (len(data),), data
    else:
        arr = np.ascontiguousarray(data)
        # flattened first: memoryview cannot cast an empty (0, 7) view, and empty chunks are valid
        dtype, shape, payload = arr.dtype.str, arr.shape, memoryview(arr.reshape(-1)).cast("B")
    header = Header(frame.kind, frame.session, frame.turn, frame.seq, frame.last, frame.meta,
                    frame.stamps, dtype, tuple(shape))
    return [_encoder.encode(header), payload]


def _array(dtype: str, shape: tuple[int, ...], payload) -> np.ndarray:
    """The payload as an ndarray of a plain numeric `dtype` and `shape`, or FrameError. Only
    bool/int/uint/float/complex dtypes travel: numpy accepts far more strings ("V0", "i4,i4",
    "(2,)f4", "O"), and each of those can fail later in ways no node expects."""
    try:
        dt = np.dtype(dtype)
    except Exception:                   # TypeError, ValueError, SyntaxError: numpy parses the string
        raise FrameError(f"unknown dtype {dtype!r}") from None
    if dt.kind not in PLAIN_KINDS or dt.fields is not None or dt.subdtype is not None \
            or dt.itemsize == 0 or len(shape) > MAX_DIMS or any(s < 0 for s in shape):
        raise FrameError(f"refusing dtype {dtype!r} / shape {shape}: payloads are plain numbers "
                         f"(numpy kinds {PLAIN_KINDS!r}) of at most {MAX_DIMS} dimensions")
    expected = dt.itemsize * math.prod(shape)   # exact ints, and cheaper than np.prod
    if expected != len(payload):
        raise FrameError(f"payload is {len(payload)} bytes but {dtype}{list(shape)} needs {expected}")
    try:
        return np.frombuffer(payload, dtype=dt).reshape(shape)
    except (ValueError, TypeError) as e:      # e.g. a shape numpy cannot index
        raise FrameError(f"payload cannot be shaped {dtype}{list(shape)}: {e}") from None


def decode(parts: list[bytes | memoryview]) -> Frame:
    """[header, payload] -> Frame. Raises FrameError on anything malformed."""
    if len(parts) != 2:
        raise FrameError(f"expected 2 message parts (header, payload), got {len(parts)}")
    raw_header, payload = parts
    if len(raw_header) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(raw_header)} bytes exceeds {MAX_HEADER_BYTES}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise FrameError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        h = _decoder.decode(raw_header)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise FrameError(f"undecodable header: {e}") from None
    if h.kind not in KINDS:
        raise FrameError(f"unknown frame kind {h.kind!r}")
    if h.dtype == "":
        if len(payload):
            raise FrameError(f"header says no payload but {len(payload)} bytes arrived")
        data = None
    elif h.dtype == "bytes":
        if h.shape != (len(payload),):
            raise FrameError(f"header says {h.shape} bytes, payload has {len(payload)}")
        data = bytes(payload)
    else:
        data = _array(h.dtype, h.shape, payload)
    return Frame(kind=h.kind, session=h.session, turn=h.turn, seq=h.seq, last=h.last,
                 meta=h.meta, stamps=h.stamps, data=data)
