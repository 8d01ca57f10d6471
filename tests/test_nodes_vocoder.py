"""SnacVocoder / snac_stream: a streamed turn equals a whole-turn SNAC decode, no clicks, nothing lost.

The reference is snac's own `SNAC.decode` of all the turn's frames at once (`SnacDecoder`), with
the same deterministic noise. Tiny random SNAC (the real layer structure), 13 frames, chunks
1 + 4 + 4 + 4:
  * exact samples (every sample not speculated): max |streamed - whole| < 1e-4 (float rounding);
  * speculated samples (decoded before their right context came): RMS error < 25 % of the whole
    decode's RMS (what chunked decoders play everywhere near a chunk edge);
  * seams: the step a seam adds, max |Δstreamed - Δwhole|, is below half the mean sample-to-sample
    step |Δwhole| with the 10 ms cross-fade (without it, it is larger: a click).
"""
import numpy as np
import pytest

from nodes.vocoder import SnacVocoder
from omniflow.frame import Frame
from omniflow.model import weights
from omniflow.model.snac_stream import (HOP, SAMPLE_RATE, SAMPLES_PER_FRAME, SnacDecoder, SnacStream,
                                        TurnStream, build_stream, frames_to_codes)
from omniflow.testing import run_node

CHUNKS = [1, 4, 4, 4]                    # first chunk of 1 frame, then 4-frame chunks
N_FRAMES = sum(CHUNKS)


@pytest.fixture(scope="module")
def snac_dir(tmp_path_factory):
    return weights.write_demo_snac(tmp_path_factory.mktemp("snac"), size="tiny")


@pytest.fixture(scope="module")
def whole(snac_dir):
    return SnacDecoder.from_dir(snac_dir)


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 4096, size=(N_FRAMES, 7))      # (F, 7)


@pytest.fixture(scope="module")
def streams(snac_dir):
    return {(noise, spec): build_stream(snac_dir, noise=noise, speculate=spec)
            for noise in ("fixed", "off") for spec in ("first", "always")}


def stream(st: SnacStream, frames, chunks=CHUNKS):
    s, out, i = TurnStream(turn=0), [], 0
    for k, n in enumerate(chunks):
        out.append(st.push_frames(s, frames[i:i + n], last=k == len(chunks) - 1))
        i += n
    return np.concatenate(out), s


def speculated(chunks, lag, crossfade):
    """Sample ranges played before their exact values existed, for speculate='always'."""
    ends = np.cumsum(chunks)[:-1] * SAMPLES_PER_FRAME           # samples known after each non-last push
    return [(max(0, e - lag), e + crossfade) for e in ends]


def test_layer_to_codebook_map():
    frame = np.array([[10, 11, 12, 13, 14, 15, 16]])        # l0..l6 of one frame
    c0, c1, c2 = frames_to_codes(np.concatenate([frame, frame + 100]))
    assert c0.tolist() == [[10, 110]]
    assert c1.tolist() == [[11, 14, 111, 114]]              # c1[2f] = l1, c1[2f+1] = l4
    assert c2.tolist() == [[12, 13, 15, 16, 112, 113, 115, 116]]


def test_whole_decode_is_deterministic_with_fixed_noise(whole, frames, snac_dir):
    a, b = whole.decode(frames), whole.decode(frames)
    assert a.shape == (N_FRAMES * SAMPLES_PER_FRAME,) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    quiet = SnacDecoder.from_dir(snac_dir, noise="off")      # the noise really is there
    assert not np.allclose(quiet.decode(frames), a)


@pytest.mark.parametrize("noise", ["fixed", "off"])
def test_stream_is_the_whole_decode_after_the_first_chunk(streams, snac_dir, frames, noise):
    ref = SnacDecoder.from_dir(snac_dir, noise=noise).decode(frames)
    st = streams[noise, "first"]
    out, s = stream(st, frames)
    assert out.shape == ref.shape == (N_FRAMES * SAMPLES_PER_FRAME,)      # F x 2048: no tail lost
    assert s.speculated == 1
    spec_end = SAMPLES_PER_FRAME + st.crossfade                          # the first chunk, faded out
    assert np.abs(out[spec_end:] - ref[spec_end:]).max() < 1e-4
    rms = np.sqrt(np.mean(ref ** 2))
    assert 0 < np.sqrt(np.mean((out[:spec_end] - ref[:spec_end]) ** 2)) < 0.25 * rms


def test_always_speculating_is_exact_away_from_the_speculated_tails(streams, whole, frames):
    st = streams["fixed", "always"]
    ref = whole.decode(frames)
    out, s = stream(st, frames)
    assert out.shape == ref.shape and s.speculated == len(CHUNKS) - 1
    spec = np.zeros(len(ref), bool)
    for a, b in speculated(CHUNKS, st.lag, st.crossfade):
        spec[a:b] = True
    err = np.abs(out - ref)
    assert err[~spec].max() < 1e-4
    rms = np.sqrt(np.mean(ref ** 2))
    assert np.sqrt(np.mean(err[spec] ** 2)) < 0.25 * rms


def test_seams_are_continuous(snac_dir, whole, frames):
    ref = whole.decode(frames)
    typical_step = np.abs(np.diff(ref)).mean()
    for crossfade_ms, continuous in ((10.0, True), (0.0, False)):
        out, _ = stream(build_stream(snac_dir, speculate="always", crossfade_ms=crossfade_ms), frames)
        added = np.abs(np.diff(out) - np.diff(ref))
        assert (added.max() < 0.5 * typical_step) == continuous, (crossfade_ms, added.max(), typical_step)


def test_one_frame_chunks_give_every_sample_exactly(streams, whole, frames):
    st = streams["fixed", "first"]
    out, s = stream(st, frames, chunks=[1] * N_FRAMES)
    ref = whole.decode(frames)
    assert out.shape == ref.shape and s.speculated == 1
    end = SAMPLES_PER_FRAME + st.crossfade
    assert np.abs(out[end:] - ref[end:]).max() < 1e-4


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_auto_speculates_only_when_the_listener_would_run_dry(snac_dir, frames):
    def run(seconds_per_chunk):
        st = build_stream(snac_dir, speculate="auto")
        st.clock = clock = Clock()
        s, i = TurnStream(turn=0), 0
        for k, n in enumerate([1] + [2] * 6):
            st.push_frames(s, frames[i:i + n], last=k == 6)
            i += n
            clock.t += seconds_per_chunk
        return s.speculated
    # 2 frames (170.7 ms of audio) every 20 ms: the lead grows, only the first chunk is speculated
    assert run(0.02) == 1
    # 2 frames every 170 ms (real time): the lead never covers the next wait, every push speculates
    assert run(0.17) == 6
    # 2 frames every 250 ms (slower than real time): the listener waits whatever is played early,
    # so only the first push speculates
    assert run(0.25) == 1


def test_auto_pays_only_for_the_tail_it_needs_and_recovers_after_a_stall(snac_dir):
    st = build_stream(snac_dir, speculate="auto")
    st.clock = clock = Clock()
    frames = np.random.default_rng(1).integers(0, 4096, size=(40, 7))      # (F, 7)
    s, pushes = TurnStream(turn=0), []
    for k in range(len(frames) // 2):        # 2 frames (170.7 ms of audio) every 150 ms ...
        before = s.speculated_steps
        st.push_frames(s, frames[2 * k:2 * k + 2], last=False)
        pushes.append(s.speculated_steps - before)
        clock.t += 1.0 if k == 2 else 0.15   # ... but one push 1 s late (a stall)
    assert pushes[0] == st.lag_steps                      # the first push: the whole tail
    assert 0 < min(p for p in pushes if p) < st.lag_steps  # later: only what covers the next wait
    assert pushes[-3:] == [0, 0, 0]          # the listener's clock resumed after the stall: ahead again


def test_special_ids_are_refused_with_a_clear_message(whole, streams):
    with pytest.raises(ValueError, match="special ids must be dropped upstream"):
        whole.decode(np.full((1, 7), 4097))
    with pytest.raises(ValueError, match="special ids must be dropped upstream"):
        streams["fixed", "first"].push_frames(TurnStream(turn=0), np.full((1, 7), 4097), last=False)


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


def test_node_streams_pcm_at_24khz_per_session(snac_dir, frames, streams):
    node = SnacVocoder({"checkpoint": str(snac_dir), "speculate": "first"})
    a = chunk_frames(frames, session="a")
    b = chunk_frames(frames[::-1].copy(), session="b")
    out = run_node(node, [f for pair in zip(a, b) for f in pair])
    for sess, want in (("a", frames), ("b", frames[::-1])):
        pcm = [f for f in out.on("pcm") if f.session == sess]
        assert all(f.meta["rate"] == SAMPLE_RATE and f.data.dtype == np.float32 for f in pcm)
        assert pcm[-1].last and not any(f.last for f in pcm[:-1])
        audio = np.concatenate([f.data for f in pcm])
        np.testing.assert_array_equal(audio, stream(streams["fixed", "first"], want)[0])  # interleaving changes nothing
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


def test_unknown_runtime_and_noise_are_refused(snac_dir):
    with pytest.raises(Exception, match="runtime"):
        SnacVocoder({"checkpoint": str(snac_dir), "runtime": "tensorrt"}).setup()
    with pytest.raises(ValueError, match="Invalid enum value 'loud' - at `\\$.noise`"):
        SnacVocoder({"checkpoint": str(snac_dir), "noise": "loud"})            # when the graph loads
    with pytest.raises(ValueError, match="noise must be one of"):
        SnacDecoder.from_dir(snac_dir, noise="loud")


def test_lag_is_what_the_layers_add_up_to(streams):
    st = streams["fixed", "first"]
    # 24 kHz config: first conv 3 steps x 512, then per block (convT pad + residual pads 3+9+27)
    assert st.lag == 3 * HOP + (4 + 39) * 64 + (4 + 39) * 8 + (2 + 39) * 2 + (1 + 39) + 3 == 4757


@pytest.mark.slow     # the first ONNX export of the streaming decoder takes ~1 min on 2 cores (then cached)
def test_onnx_runtime_streams_like_torch(snac_dir, frames, tmp_path):
    import shutil
    local = shutil.copytree(snac_dir, tmp_path / "snac")       # the export is cached next to the weights
    onnx = run_node(SnacVocoder({"checkpoint": str(local), "runtime": "onnx", "speculate": "first"}),
                    chunk_frames(frames))
    torch_ = run_node(SnacVocoder({"checkpoint": str(local), "speculate": "first"}), chunk_frames(frames))
    a = np.concatenate([f.data for f in onnx.on("pcm")])
    b = np.concatenate([f.data for f in torch_.on("pcm")])
    assert a.shape == b.shape == (N_FRAMES * SAMPLES_PER_FRAME,)
    np.testing.assert_allclose(a, b, atol=1e-4)
