"""Sound devices: `Microphone` (source) and `Speaker` (sink) through `sounddevice` (PortAudio).

    mic:     {use: nodes.devices:Microphone, params: {rate: 16000}}
    speaker: {use: nodes.devices:Speaker, inputs: {audio: vocoder/audio}}

`sounddevice` is an optional extra: `pip install 'omniflow[audio]'` (on Linux it also needs the
PortAudio library: `apt-get install libportaudio2`). A device that does not support the requested
rate is opened at its own default rate and the stream is resampled, so the graph always sees `rate`.
On a barge-in the speaker drops the audio of the interrupted answer that it has not played yet.
"""
from __future__ import annotations

import collections
import queue
import threading
import time

import msgspec
import numpy as np

from omniflow.audio import to_float_mono
from omniflow.frame import Frame
from omniflow.model.units import SNAC_RATE, WHISPER_RATE
from omniflow.node import Node

INSTALL_HINT = "install it with: pip install 'omniflow[audio]' (Linux also needs: apt-get install libportaudio2)"
READ_TIMEOUT_S = 0.05        # a microphone step waits at most this long for a block
DRAIN_TIMEOUT_S = 30.0       # at end of stream the speaker plays what it holds, at most this long


def import_sounddevice():
    try:
        import sounddevice
    except ImportError:
        raise RuntimeError(f"the sounddevice package is missing: {INSTALL_HINT}") from None
    except OSError as e:                       # the package is there but PortAudio is not
        raise RuntimeError(f"sounddevice cannot load PortAudio ({e}): {INSTALL_HINT}") from None
    return sounddevice


def list_devices(sd) -> str:
    lines = [f"  [{i}] {d['name']} (in {d['max_input_channels']}, out {d['max_output_channels']}, "
             f"{d['default_samplerate']:.0f} Hz)" for i, d in enumerate(sd.query_devices())]
    return "\n".join(lines) or "  (none)"


def pick_device(sd, device, kind: str) -> dict:
    """The device dict for `device` (index, name or None = default) that has `kind` ("input"/"output")."""
    channels = f"max_{kind}_channels"
    devices = list(sd.query_devices())
    if not any(d[channels] > 0 for d in devices):
        raise RuntimeError(f"no {kind} device found. Devices:\n{list_devices(sd)}\n"
                           f"Fix: connect a {'microphone' if kind == 'input' else 'speaker'}, or use "
                           f"{'nodes.audio:FileSource' if kind == 'input' else 'nodes.audio:WavSink'} instead")
    try:
        info = sd.query_devices(device, kind)
    except (ValueError, sd.PortAudioError) as e:
        raise RuntimeError(f"{kind} device {device!r} is not usable ({e}). Devices:\n{list_devices(sd)}\n"
                           f"Fix: set params.device to one of the indices or names above") from None
    return dict(info)


def close_stream(node: Node) -> None:
    """Stop and close a device node's PortAudio stream, once (setup may have failed before it)."""
    stream = getattr(node, "stream", None)
    if stream is not None:
        stream.stop()
        stream.close()
        node.stream = None


class Microphone(Node):
    outputs = {"audio": "pcm"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        device: int | str | None = None     # index or name; None: the system default input
        rate: int = WHISPER_RATE            # Hz of the emitted pcm
        chunk_ms: float = 20.0
        session: str = "default"
        duration_s: float | None = None     # stop after this long; None: until the graph stops

    def setup(self) -> None:
        p = self.params
        sd = import_sounddevice()
        info = pick_device(sd, p.device, "input")
        self.queue: queue.Queue[np.ndarray] = queue.Queue()
        self.resampler = None
        open_rate = p.rate
        try:
            sd.check_input_settings(device=p.device, samplerate=p.rate, channels=1, dtype="float32")
        except (ValueError, sd.PortAudioError):
            import soxr
            open_rate = int(info["default_samplerate"])
            self.log.info("input device does not take %d Hz; recording at %d Hz and resampling", p.rate, open_rate)
            self.resampler = soxr.ResampleStream(open_rate, p.rate, 1, dtype="float32")
        block = max(1, round(open_rate * p.chunk_ms / 1000))
        self.stream = sd.InputStream(device=p.device, samplerate=open_rate, channels=1, dtype="float32",
                                     blocksize=block, callback=self._callback)
        self.stream.start()
        self.started = time.monotonic()
        self.seq = 0
        self.log.info("recording from %s at %d Hz", info.get("name", p.device), open_rate)

    def _callback(self, indata, frames, time_info, status) -> None:   # PortAudio's thread
        if status:
            self.log.warning("microphone: %s", status)
        self.queue.put(np.array(indata, dtype=np.float32).reshape(frames, -1).mean(axis=1))

    def has_work(self) -> bool:
        d = self.params.duration_s
        return d is None or time.monotonic() - self.started < d or not self.queue.empty()

    def step(self):
        try:
            block = self.queue.get(timeout=READ_TIMEOUT_S)
        except queue.Empty:
            return
        if self.resampler is not None:
            block = self.resampler.resample_chunk(block)
        yield from self._emit(block)

    def _emit(self, block: np.ndarray, last: bool = False):
        if len(block) or last:
            frame = Frame(kind="pcm", session=self.params.session, seq=self.seq, last=last,
                          data=np.asarray(block, np.float32), meta={"rate": self.params.rate})
            self.seq += 1
            yield "audio", frame.stamp(self.name)

    def finish(self):
        close_stream(self)
        tail = np.zeros(0, np.float32)
        while not self.queue.empty():                     # blocks recorded before the stop
            block = self.queue.get()
            tail = np.concatenate([tail, self.resampler.resample_chunk(block) if self.resampler else block])
        if self.resampler is not None:                    # the resampler's held-back samples
            tail = np.concatenate([tail, self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)])
        yield from self._emit(tail, last=True)             # the recording ends: downstream flushes

    def teardown(self) -> None:
        close_stream(self)


class Speaker(Node):
    inputs = {"audio": "pcm"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        device: int | str | None = None     # index or name; None: the system default output
        rate: int = SNAC_RATE               # Hz the device is opened at (SNAC's rate)
        blocksize: int = 1024

    def setup(self) -> None:
        p = self.params
        sd = import_sounddevice()
        info = pick_device(sd, p.device, "output")
        self.rate = p.rate
        try:
            sd.check_output_settings(device=p.device, samplerate=p.rate, channels=1, dtype="float32")
        except (ValueError, sd.PortAudioError):
            self.rate = int(info["default_samplerate"])
            self.log.info("output device does not take %d Hz; playing at %d Hz (resampled)", p.rate, self.rate)
        self.lock = threading.Lock()
        self.pending: collections.deque[tuple[str, np.ndarray]] = collections.deque()   # (session, audio)
        self.clipped = 0
        self.stream = sd.OutputStream(device=p.device, samplerate=self.rate, channels=1, dtype="float32",
                                      blocksize=p.blocksize, callback=self._callback)
        self.stream.start()

    def process(self, port, frame: Frame):
        audio = to_float_mono(frame.data)
        rate = int(frame.meta.get("rate", self.rate))
        if rate != self.rate:
            import soxr
            audio = soxr.resample(audio, rate, self.rate).astype(np.float32)
        over = np.abs(audio) > 1.0
        if over.any():
            self.clipped += int(over.sum())
            audio = np.clip(audio, -1.0, 1.0)
        with self.lock:
            self.pending.append((frame.session, audio))
        return ()

    def reset(self, session: str, turn: int):
        with self.lock:                      # barge-in: never play the rest of the old answer
            self.pending = collections.deque(x for x in self.pending if x[0] != session)
        return ()

    def _callback(self, outdata, frames, time_info, status) -> None:   # PortAudio's thread
        out = np.zeros(frames, np.float32)
        filled = 0
        with self.lock:
            while filled < frames and self.pending:
                session, audio = self.pending[0]
                n = min(frames - filled, len(audio))
                out[filled:filled + n] = audio[:n]
                filled += n
                if n == len(audio):
                    self.pending.popleft()
                else:
                    self.pending[0] = (session, audio[n:])
        outdata[:] = out.reshape(-1, 1)

    def buffered_samples(self) -> int:
        with self.lock:
            return sum(len(a) for _, a in self.pending)

    def finish(self):
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.buffered_samples() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.clipped:
            self.log.warning("clipped %d samples outside [-1, 1]", self.clipped)
        return ()

    def teardown(self) -> None:
        close_stream(self)
