"""nodes.devices without a sound card: a fake `sounddevice` module stands in for PortAudio."""
from __future__ import annotations

import sys
import threading
import time
import types

import numpy as np
import pytest

from nodes.devices import Microphone, Speaker
from omniflow.frame import Frame
from omniflow.testing import run_node

MIC = {"name": "Fake Mic", "max_input_channels": 1, "max_output_channels": 0, "default_samplerate": 48000.0}
SPK = {"name": "Fake Speaker", "max_input_channels": 0, "max_output_channels": 2, "default_samplerate": 48000.0}


class PortAudioError(Exception):
    pass


def fake_sounddevice(devices: list[dict], rates: set[int], recording: np.ndarray | None = None):
    """A module with the parts of sounddevice's API the nodes use; `recording` is what the mic hears."""
    sd = types.ModuleType("sounddevice")
    sd.PortAudioError = PortAudioError
    sd.autoplay = False
    sd.streams = []

    def query_devices(device=None, kind=None):
        if kind is None:
            return list(devices)
        key = f"max_{kind}_channels"
        matches = [d for i, d in enumerate(devices) if d[key] > 0 and device in (None, i, d["name"])]
        if not matches:
            raise ValueError(f"No {kind} device matching {device!r}")
        return matches[0]

    def check_settings(device=None, samplerate=None, channels=None, dtype=None):
        if samplerate not in rates:
            raise PortAudioError(f"Invalid sample rate {samplerate}")

    class Stream:
        def __init__(self, device=None, samplerate=None, channels=None, dtype=None, blocksize=None, callback=None):
            self.samplerate, self.blocksize, self.callback = samplerate, blocksize, callback
            self.active = False
            sd.streams.append(self)

        def stop(self):
            self.active = False

        def close(self):
            pass

    class InputStream(Stream):
        def start(self):                       # PortAudio calls back from its own thread
            self.active = True

            def feed():
                for i in range(0, len(recording), self.blocksize):
                    block = recording[i:i + self.blocksize]
                    self.callback(block.reshape(-1, 1), len(block), None, None)
            threading.Thread(target=feed, daemon=True).start()

    class OutputStream(Stream):
        played: list[np.ndarray]

        def start(self):
            self.active, self.played = True, []
            if sd.autoplay:                    # PortAudio's thread pulls a block every few ms

                def play():
                    while self.active:
                        self.played.append(self.pull(self.blocksize))
                        time.sleep(0.001)
                threading.Thread(target=play, daemon=True).start()

        def pull(self, frames: int) -> np.ndarray:     # what PortAudio would do each period
            out = np.empty((frames, 1), np.float32)
            self.callback(out, frames, None, None)
            return out[:, 0]

    sd.query_devices, sd.check_input_settings, sd.check_output_settings = query_devices, check_settings, check_settings
    sd.InputStream, sd.OutputStream = InputStream, OutputStream
    return sd


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)          # import sounddevice -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'omniflow\[audio\]'"):
        Microphone().setup()


def test_no_input_device_lists_the_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice([SPK], {48000}))
    with pytest.raises(RuntimeError, match="no input device found") as err:
        Microphone().setup()
    assert "Fake Speaker" in str(err.value)


def test_microphone_streams_what_it_hears(monkeypatch):
    heard = np.sin(np.arange(16000) / 10).astype(np.float32)            # 1 s at 16 kHz
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice([MIC], {16000}, heard))
    out = run_node(Microphone({"duration_s": 0.5, "session": "me"})).on("audio")
    np.testing.assert_array_equal(np.concatenate([f.data for f in out]), heard)
    assert out[-1].last and not any(f.last for f in out[:-1])          # the recording's end
    assert len(out[0].data) == 320 and {f.session for f in out} == {"me"}      # 20 ms chunks
    assert [f.seq for f in out] == list(range(len(out))) and out[0].meta["rate"] == 16000


def test_microphone_resamples_from_the_device_rate(monkeypatch):
    heard = np.zeros(48000, np.float32)                                   # 1 s at 48 kHz
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice([MIC], {48000}, heard))
    out = run_node(Microphone({"duration_s": 0.5})).on("audio")
    total = sum(len(f.data) for f in out)
    assert total == 16000 and out[0].meta["rate"] == 16000 and out[-1].last


def test_speaker_plays_in_order_resamples_clips_and_drops_interrupted_audio(monkeypatch):
    sd = fake_sounddevice([SPK], {24000})
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    node = Speaker()
    node.setup()
    (stream,) = sd.streams
    node.process("audio", Frame(kind="pcm", session="a", data=np.full(1000, 0.5, np.float32), meta={"rate": 24000}))
    node.process("audio", Frame(kind="pcm", session="a", data=np.full(800, 2.0, np.float32), meta={"rate": 24000}))
    node.process("audio", Frame(kind="pcm", session="b", data=np.full(1600, 8192, np.int16), meta={"rate": 16000}))
    first = stream.pull(1200)
    np.testing.assert_array_equal(first[:1000], 0.5)
    np.testing.assert_array_equal(first[1000:], 1.0)                     # 2.0 clipped to full scale
    node.reset("a", 1)                                                   # barge-in on session a
    rest = stream.pull(4000)
    assert abs(int((np.abs(rest - 0.25) < 0.01).sum()) - 2400) < 50      # b's 1600 samples at 16 kHz -> ~2400
    assert not np.any(rest == 1.0)                                       # a's unplayed audio never plays
    node.finish()
    node.teardown()


def test_speaker_plays_everything_before_it_finishes(monkeypatch):
    sd = fake_sounddevice([SPK], {24000})
    sd.autoplay = True
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    answer = np.sin(np.arange(1, 6001) / 7).astype(np.float32)      # starts non-zero
    frames = [Frame(kind="pcm", seq=i, data=answer[i * 1500:(i + 1) * 1500], meta={"rate": 24000}) for i in range(4)]
    node = Speaker({"blocksize": 256})
    run_node(node, frames)                             # finish() waits until the device played it all
    (stream,) = sd.streams
    played = np.concatenate(stream.played)
    start = int(np.flatnonzero(played)[0])             # the device may play silence before the first frame
    np.testing.assert_array_equal(played[start:start + len(answer)], answer)
    node.teardown()
