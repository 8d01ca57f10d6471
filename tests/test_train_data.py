"""Training data: manifests, dataset readers, SNAC code forms, resumable preprocessing."""
import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from train.data.cache import SampleCache
from train.data.manifest import Invalid, Sample, read_manifest, write_manifest
from train.data.preprocess import preprocess
from train.data.readers import open_source, read_corpus, read_voiceassistant
from train.data.snac_codes import (codebooks_from_frames, format_snac_string, frames_from_codebooks,
                                   parse_snac_string)

FRAMES = np.arange(3 * 7).reshape(3, 7) * 50            # (F, 7) codes 0..1000


class CharTokenizer:
    """Stand-in text tokenizer (one id per character) — preprocessing only needs `encode`."""

    def encode(self, text):
        return [ord(c) for c in text]

    def __repr__(self):
        return "CharTokenizer()"


def write_wav(path, seconds=0.5, sr=16000, freq=220.0):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.3 * np.sin(2 * np.pi * freq * t), sr)
    return path


# ---------------------------------------------------------------- SNAC code forms ----------
def test_snac_string_round_trip_in_the_dataset_format():
    text = format_snac_string(FRAMES)
    assert text.startswith("# 0 50 100 150 200 250 300 # 350")
    np.testing.assert_array_equal(parse_snac_string(text), FRAMES)


def test_frames_follow_the_depth_first_codebook_order():
    c0, c1, c2 = codebooks_from_frames(FRAMES)
    f = 1                                                   # frame 1: c0[1], c1[2,3], c2[4..7]
    assert FRAMES[f].tolist() == [c0[f], c1[2 * f], c2[4 * f], c2[4 * f + 1], c1[2 * f + 1],
                                  c2[4 * f + 2], c2[4 * f + 3]]
    np.testing.assert_array_equal(frames_from_codebooks([torch.tensor(c)[None] for c in (c0, c1, c2)]), FRAMES)


@pytest.mark.parametrize("bad, why", [("# 1 2 3 #", "has 3 codes"), ("# 1 2 3 4 5 6 x #", "not 7 integers"),
                                      ("# 1 2 3 4 5 6 4097 #", "outside the codebook")])
def test_malformed_snac_strings_are_named(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_snac_string(bad)


# ---------------------------------------------------------------- manifests ----------------
def test_manifest_round_trip_and_relative_paths(tmp_path):
    samples = [Sample("ASR", "a", input_audio="wav/a.wav", target_text="hi"),
               Sample("T1A2", "b", input_text="hello", target_codes=FRAMES),
               Sample("T1T2", "c", input_text="q", target_text="a")]
    write_manifest(samples, tmp_path / "m.jsonl")
    back = list(read_manifest(tmp_path / "m.jsonl"))
    assert back[0].input_audio == str(tmp_path / "wav" / "a.wav")
    assert back[1].target_text == "hello", "TTS reads its input text along by default"
    np.testing.assert_array_equal(back[1].target_codes, FRAMES)
    assert [s.task for s in back] == ["ASR", "T1A2", "T1T2"]


def test_a_bad_manifest_line_names_file_line_and_problem(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"task": "ASR", "target_text": "x"}) + "\n"
                    + json.dumps({"task": "ASR", "input_audio": "a.wav", "target_txt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl:1: .*needs input_audio"):
        list(read_manifest(path))
    entries = list(read_manifest(path, skip_invalid=True))
    assert all(isinstance(e, Invalid) for e in entries)
    assert "unknown key(s) target_txt" in entries[1].reason


# ---------------------------------------------------------------- VoiceAssistant-400K ------
def write_va_shard(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "split_name": pa.array(["train"] * len(rows)), "index": pa.array([str(i) for i in range(len(rows))]),
        "round": pa.array(["0"] * len(rows)), "question": pa.array([r[0] for r in rows]),
        "question_audio": pa.array([{"bytes": r[1], "path": "q.wav"} for r in rows], type=audio_type),
        "answer": pa.array([r[2] for r in rows]), "answer_snac": pa.array([r[3] for r in rows]),
    })
    pq.write_table(table, path)


def test_voiceassistant_rows_become_speech_to_speech_samples(tmp_path):
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1600), 16000, format="WAV")
    write_va_shard(tmp_path / "train-00000-of-00325.parquet",
                   [("What is two plus two?", buf.getvalue(), "Four.", format_snac_string(FRAMES)),
                    ("Broken row", buf.getvalue(), "x", "# 1 2 #")])
    out = list(open_source(f"va[A1A2,A1T2]:{tmp_path}/train-*.parquet"))
    good = [s for s in out if isinstance(s, Sample)]
    assert [s.task for s in good] == ["A1A2", "A1T2"]
    assert good[0].input_audio == buf.getvalue() and good[0].target_text == "Four."
    np.testing.assert_array_equal(good[0].target_codes, FRAMES)
    assert isinstance(out[-1], Invalid) and "has 2 codes" in out[-1].reason


def test_a_parquet_without_the_columns_is_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="missing column"):
        list(read_voiceassistant([tmp_path / "x.parquet"]))


# ---------------------------------------------------------------- transcribed corpora ------
def test_corpus_layouts_sidecar_librispeech_ljspeech(tmp_path):
    (tmp_path / "tts").mkdir()
    write_wav(tmp_path / "tts" / "s1.wav")
    (tmp_path / "tts" / "s1.txt").write_text("sidecar text\n")
    libri = tmp_path / "libri" / "19" / "198"
    libri.mkdir(parents=True)
    write_wav(libri / "19-198-0001.flac".replace(".flac", ".wav"))
    (libri / "19-198.trans.txt").write_text("19-198-0001 LIBRI TEXT\n")
    lj = tmp_path / "lj"
    (lj / "wavs").mkdir(parents=True)
    write_wav(lj / "wavs" / "LJ001-0001.wav")
    (lj / "metadata.csv").write_text("LJ001-0001|Raw text|Normalized text\n")
    found = {s.id: s for s in read_corpus(tmp_path)}
    assert found["19-198-0001:ASR"].target_text == "LIBRI TEXT"
    assert found["LJ001-0001:T1A2"].input_text == "Normalized text"
    assert found["tts/s1:ASR"].target_text == "sidecar text"
    assert found["tts/s1:T1A2"].target_audio.endswith("s1.wav")
    assert len(found) == 6, "each pair gives one ASR and one TTS sample, transcripts are not audio"
    assert {s.task for s in read_corpus(tmp_path, tasks=["ASR"])} == {"ASR"}


# ---------------------------------------------------------------- preprocessing ------------
@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from train.testing import write_snac, write_whisper
    root = tmp_path_factory.mktemp("enc")
    whisper, dim = write_whisper(root / "whisper")
    return str(whisper), str(write_snac(root / "snac")), dim


def test_preprocess_caches_tensors_skips_bad_files_and_resumes(tmp_path, encoders):
    whisper, snac, dim = encoders
    write_wav(tmp_path / "good.wav", seconds=0.5)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF not really a wav file")
    sf.write(tmp_path / "empty.wav", np.zeros(0), 16000)
    sf.write(tmp_path / "long.wav", np.zeros(31 * 8000), 8000)           # 31 s: over whisper's window
    manifest = tmp_path / "m.jsonl"
    lines = [{"task": "ASR", "id": "good", "input_audio": "good.wav", "target_text": "hi"},
             {"task": "ASR", "id": "corrupt", "input_audio": "corrupt.wav", "target_text": "x"},
             {"task": "T1A2", "id": "empty", "input_text": "x", "target_audio": "empty.wav"},
             {"task": "T1A2", "id": "missing", "input_text": "x", "target_audio": "nowhere.wav"},
             {"task": "T1T2", "id": "text", "input_text": "q?", "target_text": "a."},
             {"task": "T1A2", "id": "tts", "input_text": "hi", "target_audio": "good.wav"},
             {"task": "A1T2", "id": "long", "input_audio": "long.wav", "target_text": "x"}]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{not json\n")
    cache = tmp_path / "cache"

    report = preprocess(open_source(str(manifest), skip_invalid=True), cache, CharTokenizer(),
                        whisper=whisper, snac=snac, progress=False, batch_size=4)
    assert (report.written, report.bad) == (3, 5)
    bad = {json.loads(x)["key"]: json.loads(x)["error"] for x in (cache / "bad.jsonl").read_text().splitlines()}
    assert "cannot read audio" in bad["corrupt"] and "empty" in bad["empty"] and "m.jsonl:8" in bad
    assert "nowhere.wav" in bad["missing"] and "longer than whisper's 30 s window" in bad["long"]

    data = SampleCache(cache)
    recs = {r["id"]: r for r in data}
    good = recs["good"]
    # whisper keeps int(500 ms / 20) + 1 = 26 frames of the 30 s window
    assert good["features"].shape == (26, dim) and good["prompt_text"] is None
    assert good["answer_text"].tolist() == [ord("h"), ord("i")]
    # 0.5 s at 24 kHz = 12000 samples -> ceil(12000 / 2048) = 6 frames of 7 codes
    assert recs["tts"]["codes"].shape == (6, 7) and recs["tts"]["features"] is None
    assert recs["text"]["prompt_text"].tolist() == [ord("q"), ord("?")]

    again = preprocess(open_source(str(manifest), skip_invalid=True), cache, CharTokenizer(),
                       whisper=whisper, snac=snac, progress=False)
    assert (again.written, again.skipped_done, again.bad) == (0, 8, 0), "a rerun redoes nothing"
    with pytest.raises(ValueError, match="preprocessed with"):
        preprocess([], cache, CharTokenizer(), whisper="other.pt", snac=snac, progress=False)


def test_training_data_filters_tasks_and_says_what_is_there(tmp_path):
    from train.testing import write_synthetic_cache
    write_synthetic_cache(tmp_path, [{"task": "ASR", "id": "a", "n_frames": 3, "answer_text": [1]},
                                     {"task": "T1T2", "id": "b", "prompt_text": [1], "answer_text": [2]}], 4)
    assert len(SampleCache(tmp_path, tasks=["ASR"])) == 1
    with pytest.raises(ValueError, match="holds 1 ASR, 1 T1T2"):
        SampleCache(tmp_path, tasks=["A1A2"])
    with pytest.raises(FileNotFoundError, match="omniflow train preprocess"):
        SampleCache(tmp_path / "nothing")


def test_preprocess_finds_whisper_and_snac_in_omniflow_home_and_a_failed_run_blocks_no_retry(
        tmp_path, demo_weights, monkeypatch):
    from omniflow.model.weights import WeightsNotFound

    write_wav(tmp_path / "q.wav", seconds=0.5)
    samples = [Sample(task="A1A2", id="q", input_audio=str(tmp_path / "q.wav"), target_text="hi",
                      target_audio=str(tmp_path / "q.wav"))]
    cache = tmp_path / "cache"
    monkeypatch.setenv("OMNIFLOW_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(WeightsNotFound, match="omniflow fetch"):
        preprocess(samples, cache, CharTokenizer(), progress=False)
    assert not (cache / "meta.json").exists()          # nothing cached: nothing blocks the retry

    monkeypatch.setenv("OMNIFLOW_HOME", str(demo_weights))   # as the nodes: $OMNIFLOW_HOME/whisper-small, snac
    report = preprocess(samples, cache, CharTokenizer(), progress=False)
    assert (report.written, report.bad) == (1, 0)
    assert json.loads((cache / "meta.json").read_text())["snac"] == "cache"
    [rec] = list(SampleCache(cache))
    assert rec["features"].shape[0] == 26 and rec["codes"].shape == (6, 7)
