"""One whisper-features function: training preprocessing and the serving graph's nodes give the
same features, bit for bit, for the same audio file."""
import json

import numpy as np
import soundfile as sf

from nodes.audio import FileSource
from nodes.whisper import WhisperEncoder
from omniflow.frame import Frame
from omniflow.model.whisper_encoder import frames_to_keep
from omniflow.testing import run_node
from train.data.cache import SampleCache
from train.data.preprocess import preprocess
from train.data.readers import open_source
from train.testing import write_whisper


class CharTokenizer:
    """Stand-in text tokenizer (one id per character): preprocessing only needs `encode`."""

    def encode(self, text):
        return [ord(c) for c in text]

    def __repr__(self):
        return "CharTokenizer()"


def test_training_and_serving_features_are_identical(tmp_path):
    whisper, dim = write_whisper(tmp_path / "whisper")
    rng = np.random.default_rng(0)
    t = np.arange(int(1.3 * 22050)) / 22050                      # 1.3 s, 22.05 kHz stereo: both resample
    mono = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    sf.write(tmp_path / "q.wav", np.stack([mono, 0.5 * mono + 0.01 * rng.standard_normal(len(t))], 1), 22050)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"task": "ASR", "id": "q", "input_audio": "q.wav", "target_text": "x"}) + "\n")

    preprocess(open_source(str(manifest)), tmp_path / "cache", CharTokenizer(), whisper=str(whisper), snac="unused", progress=False)
    (rec,) = list(SampleCache(tmp_path / "cache"))
    trained = np.asarray(rec["features"], np.float32)

    pcm = run_node(FileSource({"path": str(tmp_path / "q.wav")})).on("audio")     # what the graph's mic emits
    audio = np.concatenate([f.data for f in pcm])
    utterance = Frame(kind="utterance", data=audio, last=True, meta={"rate": pcm[0].meta["rate"]})
    (served,) = run_node(WhisperEncoder({"checkpoint": str(whisper)}), [utterance], port="audio").on("features")

    assert trained.shape == served.data.shape == (frames_to_keep(len(audio)), dim) == (66, dim)
    np.testing.assert_array_equal(trained, served.data)
