"""SnacVocoder: streamed chunks sound like one whole-utterance decode, no clicks, nothing lost.

Tolerances (tiny random SNAC, 13 frames, chunks 1 + 4 + 4 + 4, context_frames=2, crossfade_ms=10):
  * away from seams (every frame except the 2 frames just before a seam, which lack right context):
    max |streamed - whole| < 1e-3;
  * the 2 frames before each seam: RMS error < 10 % of the whole decode's RMS;
  * seams: the step a seam adds to the signal, max |Δstreamed - Δwhole|, is below half the mean
    sample-to-sample step |Δwhole| (without cross-fade it is about 1.5× that: a click).
"""
import numpy as np
import pytest

from nodes.vocoder import (SAMPLE_RATE, SAMPLES_PER_FRAME, SnacDecoder, SnacVocoder, StreamingSnac,
                           StreamState, frames_to_codes)
from omniflow.model import weights
from omniflow.frame import Frame
from omniflow.testing import run_node

CHUNKS = [1, 4, 4, 4]                    # first chunk of 1 frame, then 4-frame chunks
N_FRAMES = sum(CHUNKS)


@pytest.fixture(scope="module")
def snac_dir(tmp_path_factory):
    return weights.write_demo_snac(tmp_path_factory.mktemp("snac"), size="tiny")


@pytest.fixture(scope="module")
def decoder(snac_dir):
    return SnacDecoder.from_dir(snac_dir)


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 4096, size=(N_FRAMES, 7))      # (F, 7)


def stream(decoder, frames, context_frames=2, crossfade_ms=10.0, chunks=CHUNKS):
    s, state, out, i = StreamingSnac(decoder, context_frames, crossfade_ms), StreamState(turn=0), [], 0
    for k, n in enumerate(chunks):
        out.append(s.push(state, frames[i:i + n], last=k == len(chunks) - 1))
        i += n
    return np.concatenate(out)


def seams(chunks=CHUNKS):
    return list(np.cumsum(chunks)[:-1])          # frame index where each new chunk starts


def test_layer_to_codebook_map():
    frame = np.array([[10, 11, 12, 13, 14, 15, 16]])        # l0..l6 of one frame
    c0, c1, c2 = frames_to_codes(np.concatenate([frame, frame + 100]))
    assert c0.tolist() == [[10, 110]]
    assert c1.tolist() == [[11, 14, 111, 114]]              # c1[2f] = l1, c1[2f+1] = l4
    assert c2.tolist() == [[12, 13, 15, 16, 112, 113, 115, 116]]


def test_decode_is_deterministic_with_fixed_noise(decoder, frames, snac_dir):
    a, b = decoder.decode(frames), decoder.decode(frames)
    assert a.shape == (N_FRAMES * SAMPLES_PER_FRAME,) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # the noise really is there (a noiseless decode differs)
    quiet = SnacDecoder.from_dir(snac_dir, noise="off")
    assert not np.allclose(quiet.decode(frames), a)


def test_streamed_matches_whole_decode_away_from_seams(decoder, frames):
    whole = decoder.decode(frames)
    streamed = stream(decoder, frames)
    assert streamed.shape == whole.shape                    # F × 2048: no tail lost
    err = np.abs(streamed - whole).reshape(N_FRAMES, SAMPLES_PER_FRAME)     # (F, 2048)
    near = {s - k for s in seams() for k in (1, 2)}         # frames that lack right context
    far = [f for f in range(N_FRAMES) if f not in near]
    assert err[far].max() < 1e-3
    rms_whole = np.sqrt(np.mean(whole ** 2))
    assert np.sqrt(np.mean(err[sorted(near)] ** 2)) < 0.1 * rms_whole


def test_seams_are_continuous(decoder, frames):
    whole = decoder.decode(frames)
    typical_step = np.abs(np.diff(whole)).mean()
    for crossfade_ms, continuous in ((10.0, True), (0.0, False)):
        added = np.abs(np.diff(stream(decoder, frames, crossfade_ms=crossfade_ms)) - np.diff(whole))
        assert (added.max() < 0.5 * typical_step) == continuous, (crossfade_ms, added.max(), typical_step)


def test_one_frame_chunks_and_no_context_still_give_every_sample(decoder, frames):
    for ctx, xf in ((0, 0.0), (1, 10.0), (3, 20.0)):
        out = stream(decoder, frames, ctx, xf, chunks=[1] * N_FRAMES)
        assert out.shape == (N_FRAMES * SAMPLES_PER_FRAME,)
    with pytest.raises(ValueError, match="context_frames >= 1"):
        StreamingSnac(decoder, context_frames=0, crossfade_ms=10.0)


def test_special_ids_are_refused_with_a_clear_message(decoder):
    with pytest.raises(ValueError, match="special ids must be dropped upstream"):
        decoder.decode(np.full((1, 7), 4097))


def test_missing_files_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="omniflow fetch"):
        SnacDecoder.from_dir(tmp_path)


def chunk_frames(frames, session="s", turn=0, chunks=CHUNKS):
    out, i = [], 0
    for k, n in enumerate(chunks):
        out.append(Frame(kind="codes", session=session, turn=turn, seq=k, data=frames[i:i + n],
                         meta={"first_frame": i}, last=k == len(chunks) - 1))
        i += n
    return out


def test_node_streams_pcm_at_24khz_per_session(snac_dir, frames, decoder):
    node = SnacVocoder({"checkpoint": str(snac_dir)})
    a = chunk_frames(frames, session="a")
    b = chunk_frames(frames[::-1].copy(), session="b")
    out = run_node(node, [f for pair in zip(a, b) for f in pair])
    for sess, want in (("a", frames), ("b", frames[::-1])):
        pcm = [f for f in out.on("pcm") if f.session == sess]
        assert all(f.meta["rate"] == SAMPLE_RATE and f.data.dtype == np.float32 for f in pcm)
        assert pcm[-1].last and not any(f.last for f in pcm[:-1])
        audio = np.concatenate([f.data for f in pcm])
        np.testing.assert_array_equal(audio, stream(decoder, want))     # interleaving changes nothing
        starts = [f.meta["first_sample"] for f in pcm]
        assert starts == list(np.cumsum([0] + [len(f.data) for f in pcm[:-1]]))


def test_node_flushes_on_empty_last_chunk_and_reset_forgets_the_turn(snac_dir, frames):
    cut = chunk_frames(frames)[:2]                           # turn 0 interrupted after 5 frames
    end = Frame(kind="codes", session="s", turn=1, data=np.zeros((0, 7), np.int64), last=True)
    out = run_node(SnacVocoder({"checkpoint": str(snac_dir)}),
                   cut + [Frame(kind="control", session="s", turn=1, meta={"op": "turn"})]
                   + chunk_frames(frames[:2], turn=1, chunks=[2])[:1] + [end])
    turn1 = [f for f in out.on("pcm") if f.turn == 1]
    assert sum(len(f.data) for f in turn1) == 2 * SAMPLES_PER_FRAME  # starts from scratch, tail flushed
    assert turn1[0].meta["first_sample"] == 0


def test_demo_weights_are_announced(snac_dir, caplog):
    node = SnacVocoder({"checkpoint": str(snac_dir)})
    with caplog.at_level("WARNING"):
        node.setup()
    assert "not speech" in caplog.text


def test_unknown_runtime_and_noise_are_refused(snac_dir, decoder):
    with pytest.raises(ValueError, match="runtime"):
        SnacVocoder({"checkpoint": str(snac_dir), "runtime": "tensorrt"}).setup()
    with pytest.raises(ValueError, match="decodes without SNAC's noise"):
        SnacVocoder({"checkpoint": str(snac_dir), "runtime": "onnx", "noise": "fixed"}).setup()
    with pytest.raises(ValueError, match="noise must be one of"):
        SnacDecoder.from_dir(snac_dir, noise="loud")


@pytest.mark.slow     # the first ONNX export of SNAC takes ~25 s on 2 cores (then it is cached)
def test_onnx_runtime_streams_like_torch_without_noise(snac_dir, frames, tmp_path):
    import shutil
    local = shutil.copytree(snac_dir, tmp_path / "snac")       # the export is cached next to the weights
    onnx = run_node(SnacVocoder({"checkpoint": str(local), "runtime": "onnx"}), chunk_frames(frames))
    torch_off = run_node(SnacVocoder({"checkpoint": str(local), "noise": "off"}), chunk_frames(frames))
    a = np.concatenate([f.data for f in onnx.on("pcm")])
    b = np.concatenate([f.data for f in torch_off.on("pcm")])
    assert a.shape == b.shape == (N_FRAMES * SAMPLES_PER_FRAME,)
    np.testing.assert_allclose(a, b, atol=1e-4)
