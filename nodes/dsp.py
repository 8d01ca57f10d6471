"""Small signal-processing nodes on "pcm" frames: `Gain` (dB) and `Resample` (streaming soxr)."""
from __future__ import annotations

import msgspec
import numpy as np
import soxr

from omniflow import Node
from omniflow.audio import as_float32


class Gain(Node):
    """Multiply audio by 10^(db/20); output is float32 (not clipped: the sink clips)."""
    inputs = {"audio": "pcm"}
    outputs = {"audio": "pcm"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        db: float = 0.0

    def setup(self) -> None:
        self.factor = np.float32(10 ** (self.params.db / 20))

    def process(self, port, frame):
        yield "audio", frame.follow("pcm", as_float32(frame.data) * self.factor,
                                    meta=frame.meta, last=frame.last)


class Resample(Node):
    """Resample each session's stream to `rate` Hz with soxr.ResampleStream.

    Chunk boundaries do not change the result: the concatenated output equals resampling the
    whole stream at once. The filter's tail is flushed on a frame with `last` or at end of stream.
    """
    inputs = {"audio": "pcm"}
    outputs = {"audio": "pcm"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        rate: int                  # Hz of the output
        quality: str = "HQ"        # soxr quality: QQ, LQ, MQ, HQ, VHQ

    def setup(self) -> None:
        if self.params.rate <= 0:
            raise ValueError(f"rate must be positive, got {self.params.rate}")
        self.streams: dict[str, tuple[soxr.ResampleStream, int]] = {}   # session -> (stream, in rate)
        self.last_frame: dict[str, object] = {}

    def process(self, port, frame):
        in_rate = frame.meta.get("rate")
        if not isinstance(in_rate, int) or in_rate <= 0:
            raise ValueError(f"pcm frame of session {frame.session!r} has no meta['rate'] (Hz). "
                             "Fix: the producer must set meta={'rate': ...}")
        stream, rate = self.streams.get(frame.session, (None, in_rate))
        if stream is None:
            stream = soxr.ResampleStream(in_rate, self.params.rate, 1, dtype="float32",
                                         quality=self.params.quality)
            self.streams[frame.session] = (stream, in_rate)
        elif rate != in_rate:
            raise ValueError(f"session {frame.session!r} changed rate from {rate} to {in_rate} Hz "
                             "mid-stream; one Resample stream has one input rate")
        out = stream.resample_chunk(as_float32(frame.data), last=frame.last)   # (M,)
        if frame.last:
            del self.streams[frame.session]
            self.last_frame.pop(frame.session, None)
        else:
            self.last_frame[frame.session] = frame
        yield "audio", frame.follow("pcm", out, meta={**frame.meta, "rate": self.params.rate},
                                    last=frame.last)

    def reset(self, session, turn):
        self.streams.pop(session, None)       # a new turn starts with a fresh filter
        self.last_frame.pop(session, None)
        return ()

    def finish(self):
        for session, (stream, _) in list(self.streams.items()):
            tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)
            prev = self.last_frame.pop(session)
            yield "audio", prev.follow("pcm", tail, seq=prev.seq + 1,
                                       meta={**prev.meta, "rate": self.params.rate}, last=True)
        self.streams.clear()
