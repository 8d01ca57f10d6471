"""Audio files in and out: `FileSource` reads any file libsndfile reads, `WavSink` writes WAV.

    src:  {use: nodes.audio:FileSource, params: {path: examples/hello.wav, rate: 16000, chunk_ms: 20}}
    sink: {use: nodes.audio:WavSink, params: {path: "out/{session}.wav"}, inputs: {audio: src/audio}}
"""
from __future__ import annotations

import time
from pathlib import Path

import msgspec
import numpy as np
import soundfile as sf

from omniflow import Frame, Node
from omniflow.audio import BadAudio, load_audio, to_int16
from omniflow.model.units import WHISPER_RATE

__all__ = ["FileSource", "WavSink", "to_int16"]      # to_int16: omniflow.audio's, kept importable here


class FileSource(Node):
    """Emit an audio file as mono float32 "pcm" chunks of `chunk_ms` at `rate` Hz.

    Stereo is averaged to mono; the file is resampled with soxr (high quality) to `rate`.
    The last chunk may be shorter and carries `last=True`. `realtime: true` paces chunks at the
    speed of speech (for live demos); otherwise they go as fast as the graph takes them.
    """
    outputs = {"audio": "pcm"}

    class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        path: str
        rate: int = WHISPER_RATE  # Hz of the emitted audio
        chunk_ms: float = 20.0   # duration of one frame
        realtime: bool = False
        session: str = "default"

    def setup(self) -> None:
        p = self.params
        if p.rate <= 0 or p.chunk_ms <= 0:
            raise ValueError(f"rate ({p.rate}) and chunk_ms ({p.chunk_ms}) must be positive")
        path = Path(p.path)
        if not path.is_file():
            raise FileNotFoundError(f"audio file not found: {p.path}. Fix: check the path "
                                    "(or override it: --set <node>.path=FILE)")
        try:
            self.audio = load_audio(path, p.rate)                               # (N,)
        except BadAudio as e:
            raise ValueError(f"{e}. Fix: use a non-empty file libsndfile reads (wav, flac, ogg, ...)") from None
        self.chunk = max(1, round(p.rate * p.chunk_ms / 1000))     # samples per frame
        self.pos = 0
        self.seq = 0
        self.started: float | None = None    # the first step's time: realtime pacing starts there

    def has_work(self) -> bool:
        return self.pos < len(self.audio)

    def step(self):
        p = self.params
        if self.started is None:    # not setup(): a graph starts its sources when every node is ready
            self.started = time.monotonic()
        if p.realtime:      # frame k is due when k chunks of audio have played
            due = self.started + self.pos / p.rate
            time.sleep(max(0.0, due - time.monotonic()))
        data = self.audio[self.pos:self.pos + self.chunk]             # (chunk,)
        self.pos += len(data)
        yield "audio", Frame(kind="pcm", session=p.session, seq=self.seq, data=data,
                             last=self.pos >= len(self.audio), meta={"rate": p.rate})
        self.seq += 1


class WavSink(Node):
    """Write "pcm" frames to a WAV file per session (`path` may contain `{session}`).

    float32 audio is clipped to [-1, 1) and stored as 16-bit PCM (never wraps around); int16
    is stored as is. The file is flushed when a frame says `last` and closed at end of stream.
    """
    inputs = {"audio": "pcm"}

    class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        path: str
        subtype: str = "PCM_16"

    def setup(self) -> None:
        self.files: dict[str, sf.SoundFile] = {}

    def _open(self, session: str, rate: int) -> sf.SoundFile:
        path = Path(self.params.path.format(session=session))
        path.parent.mkdir(parents=True, exist_ok=True)
        f = sf.SoundFile(str(path), "w", samplerate=rate, channels=1, subtype=self.params.subtype)
        self.files[session] = f
        return f

    def process(self, port, frame):
        rate = frame.meta.get("rate")
        if not isinstance(rate, int) or rate <= 0:
            raise ValueError(f"pcm frame of session {frame.session!r} has no meta['rate'] "
                             "(Hz). Fix: the producer must set meta={'rate': ...}")
        f = self.files.get(frame.session) or self._open(frame.session, rate)
        if f.samplerate != rate:
            raise ValueError(f"session {frame.session!r} changed rate from {f.samplerate} to {rate} "
                             "Hz mid-stream. Fix: put a nodes.dsp:Resample node before the sink")
        f.write(to_int16(np.asarray(frame.data)))
        if frame.last:
            f.flush()
        return ()

    def finish(self):
        self.teardown()
        return ()

    def teardown(self) -> None:
        for f in self.files.values():
            if not f.closed:
                f.close()

