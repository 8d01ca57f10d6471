"""Built-in audio nodes, each driven through run_node (no sockets)."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import soxr

from nodes.audio import FileSource, WavSink, to_int16
from nodes.dsp import Gain, Resample
from omniflow import Frame
from omniflow.testing import run_node


def test_file_source_chunks_the_whole_file_in_order(tone_wav):
    path, pcm = tone_wav(seconds=1.01)
    frames = run_node(FileSource({"path": str(path), "chunk_ms": 20})).on("audio")
    assert [len(f.data) for f in frames] == [320] * 50 + [160]         # 16160 samples
    assert [f.seq for f in frames] == list(range(51)) and frames[-1].last and not frames[0].last
    assert frames[0].meta == {"rate": 16000} and frames[0].data.dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([f.data for f in frames]) * 32768, pcm)


def test_file_source_downmixes_stereo_and_resamples(tone_wav):
    path, pcm = tone_wav(seconds=0.5, rate=48000, channels=2)
    out = np.concatenate([f.data for f in run_node(FileSource({"path": str(path), "rate": 16000}))
                          .on("audio")])
    expected = soxr.resample(pcm[:, 0].astype(np.float32) / 32768, 48000, 16000, quality="HQ")
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("content, message", [
    (None, "audio file not found"), (b"", "contains no samples"), (b"RIFF junk", "cannot read audio file"),
])
def test_file_source_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    if content == b"":
        sf.write(path, np.zeros(0, np.int16), 16000)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises((FileNotFoundError, ValueError), match=message) as e:
        run_node(FileSource({"path": str(path)}))
    assert str(path) in str(e.value)


def test_gain_scales_in_float32():
    x = np.array([0.5, -0.25, 0.0], np.float32)
    (f,) = run_node(Gain({"db": -6.0}), [Frame(kind="pcm", seq=3, last=True, data=x,
                                               meta={"rate": 8000})]).on("audio")
    np.testing.assert_array_equal(f.data, x * np.float32(10 ** (-6 / 20)))
    assert (f.seq, f.last, f.meta) == (3, True, {"rate": 8000})


def test_resample_stream_equals_whole_signal_and_flushes_the_tail():
    x = np.random.default_rng(1).standard_normal(4000).astype(np.float32) * 0.1
    chunks = [Frame(kind="pcm", seq=i, data=c, meta={"rate": 16000})
              for i, c in enumerate(np.array_split(x, 7))]
    out = run_node(Resample({"rate": 24000}), chunks).on("audio")   # tail flushed by finish()
    y = np.concatenate([f.data for f in out])
    np.testing.assert_allclose(y, soxr.resample(x, 16000, 24000, quality="HQ"), atol=1e-5)
    assert all(f.meta["rate"] == 24000 for f in out) and out[-1].last


def test_wav_sink_writes_per_session_and_clips_without_wraparound(tmp_path):
    loud = np.array([0.5, 1.5, -2.0, 1.0, -1.0], np.float32)
    frames = [Frame(kind="pcm", session=s, data=loud, meta={"rate": 8000}) for s in ("a", "b")]
    run_node(WavSink({"path": str(tmp_path / "{session}.wav")}), frames)
    for s in ("a", "b"):
        data, rate = sf.read(tmp_path / f"{s}.wav", dtype="int16")
        assert rate == 8000
        np.testing.assert_array_equal(data, [16384, 32767, -32768, 32767, -32768])
    np.testing.assert_array_equal(to_int16(np.array([1e9, -1e9], np.float32)), [32767, -32768])


def test_wav_sink_rejects_frames_without_rate(tmp_path, caplog):
    with caplog.at_level("ERROR"):         # that turn fails (logged once); the node goes on
        out = run_node(WavSink({"path": str(tmp_path / "x.wav")}), [Frame(kind="pcm", data=np.zeros(3, np.float32))])
    assert out == [] and "no meta['rate']" in caplog.text and "failed in process()" in caplog.text
