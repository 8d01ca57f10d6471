"""nodes.vad: real speech (espeak-ng) in, utterances with plausible boundaries out; barge-in turns."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr

from nodes.vad import SileroVAD
from omniflow.frame import Frame
from omniflow.node import CONTROL
from omniflow.testing import run_node
from omniflow.turns import GRANT_RETRY_S

RATE = 16000
TOLERANCE_S = 0.150
PHRASES = ["What is the capital of France?", "Tell me a joke please."]


def speak(text: str, tmp_path) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng): it speaks the test audio")
    path = tmp_path / f"{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True, capture_output=True)
    audio, rate = sf.read(path, dtype="float32")
    return soxr.resample(audio, rate, RATE).astype(np.float32)


def speech_extent(audio: np.ndarray) -> tuple[int, int]:
    """First and last sample louder than -40 dB of the peak: where the voice really is."""
    loud = np.flatnonzero(np.abs(audio) > 0.01 * np.abs(audio).max())
    return int(loud[0]), int(loud[-1]) + 1


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory):
    """0.5 s silence, phrase 1, 1.5 s silence, phrase 2, 1 s silence; and the true speech extents (s)."""
    tmp = tmp_path_factory.mktemp("speech")
    parts, truth, pos = [silence(0.5)], [], int(0.5 * RATE)
    for i, text in enumerate(PHRASES):
        voice = speak(text, tmp)
        a, b = speech_extent(voice)
        truth.append(((pos + a) / RATE, (pos + b) / RATE))
        parts.append(voice)
        pos += len(voice)
        gap = silence(1.5 if i == 0 else 1.0)
        parts.append(gap)
        pos += len(gap)
    return np.concatenate(parts), truth


def chunks(audio: np.ndarray, size: int, session: str = "default", rate: int = RATE):
    n = len(audio)
    return [Frame(kind="pcm", session=session, seq=i, data=audio[s:s + size], meta={"rate": rate},
                  last=s + size >= n) for i, s in enumerate(range(0, n, size))]


def test_two_phrases_give_two_utterances_with_plausible_boundaries(dialogue):
    audio, truth = dialogue
    out = run_node(SileroVAD(), chunks(audio, 480))
    utts = out.on("utterance")
    assert len(utts) == 2
    pad = SileroVAD.Params().speech_pad_ms / 1000
    for utt, (start, end) in zip(utts, truth):
        assert utt.meta["start_s"] == pytest.approx(start - pad, abs=TOLERANCE_S)
        assert utt.meta["end_s"] == pytest.approx(end + pad, abs=TOLERANCE_S)
        assert len(utt.data) == round((utt.meta["end_s"] - utt.meta["start_s"]) * RATE)
        s = round(utt.meta["start_s"] * RATE)
        np.testing.assert_array_equal(utt.data, audio[s:s + len(utt.data)])     # the input's own samples
        assert utt.last and utt.meta["rate"] == RATE


def test_every_utterance_asks_the_bus_for_its_turn_while_it_is_spoken(dialogue):
    audio, truth = dialogue
    node = SileroVAD()
    node.setup()
    events = []                                          # (stream time in s when emitted, port, frame)
    numbers = iter([5, 9])                               # what the bus grants: the VAD counts nothing
    for f in chunks(audio, 320):
        now = (f.seq + 1) * 320 / RATE
        for port, frame in node.process("audio", f):
            events.append((now, port, frame))
            if port == CONTROL:                          # the bus answers at once
                assert frame.kind == "control" and frame.meta["op"] == "next_turn"
                events += [(now, p, g) for p, g in node.granted(frame.session, next(numbers), frame.meta["ref"])]
    speech = [(fr.turn, fr.meta["event"], fr.meta["audio_ms"]) for _, p, fr in events if p == "speech"]
    early = [(fr.turn, len(fr.data)) for _, p, fr in events if p == "early"]
    events = [e for e in events if e[1] not in ("speech", "early")]
    assert early == [(fr.turn, len(fr.data)) for _, p, fr in events if p == "utterance"]   # tentative = final
    assert [(p, fr.turn) for _, p, fr in events if p == "utterance"] == [("utterance", 5), ("utterance", 9)]
    assert [p for _, p, _ in events] == [CONTROL, "utterance", CONTROL, "utterance"]
    # speech events: started when confirmed (the pcm's turn: the utterance's is not granted yet),
    # stopped with the utterance (its granted turn)
    assert [(turn, event) for turn, event, _ in speech] == [(0, "started"), (5, "stopped"), (0, "started"),
                                                            (9, "stopped")]
    for (_, _, start_ms), (_, _, end_ms), (start, end) in zip(speech[::2], speech[1::2], truth):
        assert start_ms / 1000 == pytest.approx(start, abs=TOLERANCE_S)
        assert end_ms / 1000 == pytest.approx(end, abs=TOLERANCE_S)
    for k, (start, end) in enumerate(truth):
        t_ask, t_utt = events[2 * k][0], events[2 * k + 1][0]
        assert start < t_ask < end < t_utt               # asked while the user is still talking


def test_an_utterance_that_ends_before_its_turn_is_granted_waits_for_it(dialogue):
    audio, truth = dialogue
    node = SileroVAD()
    node.setup()
    out = [pf for f in chunks(audio[: int((truth[0][1] + 1.0) * RATE)], 320) for pf in node.process("audio", f)]
    [(port, request), (_, started)] = out                # asked, and the speech ended: no grant yet
    assert port == CONTROL and started.meta["event"] == "started"
    assert node.has_work()                               # the runtime keeps reading control meanwhile
    assert list(node.step()) == []                       # (not asked again yet)
    node.asked[request.meta["ref"]] -= GRANT_RETRY_S     # no answer for GRANT_RETRY_S: lost on the way
    [(port, again)] = node.step()
    assert port == CONTROL and again.meta == request.meta and list(node.step()) == []   # same ref: same turn
    [(port, utt), (_, stopped)] = node.granted("default", 3, request.meta["ref"])
    assert port == "utterance" and utt.turn == 3 and stopped.turn == 3 and not node.has_work()
    assert list(node.granted("default", 4, "someone-else")) == [] and not node.asked


def test_a_session_that_ends_mid_speech_is_forgotten(dialogue):
    audio, truth = dialogue
    node = SileroVAD()
    node.setup()
    frames = chunks(audio[: int((truth[0][0] + 0.8) * RATE)], 320, "gone")
    frames[-1].last = False                              # the client vanished: no flush
    for f in frames:
        list(node.process("audio", f))
    assert "gone" in node.streams
    assert list(node.end("gone")) == []
    assert not node.streams and not node.count and not node.held and not node.asked and not node.has_work()


def test_chunk_size_and_input_format_do_not_change_the_result(dialogue):
    audio, _ = dialogue
    ref = [(u.meta["start_s"], u.meta["end_s"]) for u in run_node(SileroVAD(), chunks(audio, 512)).on("utterance")]
    odd = [(u.meta["start_s"], u.meta["end_s"]) for u in run_node(SileroVAD(), chunks(audio, 1234)).on("utterance")]
    assert odd == ref
    pcm16_8k = (soxr.resample(audio, RATE, 8000) * 32767).astype(np.int16)       # int16 at 8 kHz
    low = [(u.meta["start_s"], u.meta["end_s"])
           for u in run_node(SileroVAD(), chunks(pcm16_8k, 800, rate=8000)).on("utterance")]
    assert len(low) == 2
    for (a, b), (c, d) in zip(low, ref):
        assert abs(a - c) < 0.1 and abs(b - d) < 0.1


@pytest.mark.parametrize("kind", ["silence", "noise"])
def test_no_speech_gives_no_utterance(kind):
    rng = np.random.default_rng(0)
    audio = silence(4.0) if kind == "silence" else (0.05 * rng.standard_normal(4 * RATE)).astype(np.float32)
    out = run_node(SileroVAD(), chunks(audio, 1600))
    assert [(port, f.meta["event"]) for port, f in out] == [("speech", "silence")]   # no utterance, no turn


def test_speech_in_progress_is_flushed_at_end_of_stream(dialogue):
    audio, truth = dialogue
    cut = int((truth[0][1] - 0.1) * RATE)                  # the stream ends while phrase 1 is spoken
    frames = chunks(audio[:cut], 512)
    frames[-1].last = False                                # no last flag: only finish() can flush
    utts = run_node(SileroVAD(), frames).on("utterance")
    assert len(utts) == 1 and utts[0].meta["end_s"] == pytest.approx(cut / RATE, abs=0.04)


def test_sessions_are_segmented_independently(dialogue):
    audio, _ = dialogue
    a, b = chunks(audio, 800, "alice"), chunks(audio, 800, "bob")
    interleaved = [f for pair in zip(a, b) for f in pair]
    out = run_node(SileroVAD(), interleaved)
    for who in ("alice", "bob"):                          # each session's turns, numbered by the "bus"
        assert [u.turn for u in out.on("utterance") if u.session == who] == [0, 1]
    assert [(a.session, a.turn) for a in out.announced].count(("alice", 1)) == 1


def test_long_speech_is_cut_at_max_utterance(dialogue):
    audio, truth = dialogue
    out = run_node(SileroVAD({"max_utterance_s": 1.0, "min_speech_ms": 100}), chunks(audio, 512))
    utts = out.on("utterance")
    assert len(utts) >= 3 and all(len(u.data) <= RATE for u in utts)


def test_bad_params_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        SileroVAD({"threshold": 1.5}).setup()


def phrases_with_a_pause(tmp_path, pause_s: float) -> np.ndarray:
    """phrase 1, `pause_s` of silence, phrase 2, 1 s of silence (0.5 s before)."""
    one, two = (speak(t, tmp_path) for t in PHRASES)
    return np.concatenate([silence(0.5), one, silence(pause_s), two, silence(1.0)])


def test_the_tentative_end_goes_out_during_the_hang_over(dialogue):
    audio, truth = dialogue
    node = SileroVAD()
    node.setup()
    sent = []                                            # (stream time in s, port, frame)
    for f in chunks(audio, 320):
        for port, frame in node.process("audio", f):
            sent.append(((f.seq + 1) * 320 / RATE, port, frame))
            if port == CONTROL:
                sent += [((f.seq + 1) * 320 / RATE, p, g) for p, g in node.granted(frame.session, 7, frame.meta["ref"])]
    early = [(t, fr) for t, p, fr in sent if p == "early"]
    final = [(t, fr) for t, p, fr in sent if p == "utterance"]
    assert len(final) == 2
    for t_final, u in final:
        t_early, e = [(t, fr) for t, fr in early if t <= t_final][-1]           # its last tentative
        np.testing.assert_array_equal(e.data, u.data)                            # the same samples
        assert e.meta["tentative"] and e.turn == u.turn and "tentative" not in u.meta
        p = SileroVAD.Params()
        # sent a pad after the speech ended, min_silence - pad before the final
        assert t_final - t_early == pytest.approx((p.min_silence_ms - p.speech_pad_ms) / 1000, abs=0.05)
    off = run_node(SileroVAD({"early": False}), chunks(audio, 480))
    assert off.on("early") == [] and len(off.on("utterance")) == 2


@pytest.fixture(scope="module")
def whisper_path(tmp_path_factory):
    from omniflow.model import weights
    return weights.write_demo_whisper(tmp_path_factory.mktemp("whisper"), "small")


def vad_then_whisper(audio, whisper_path):
    """The VAD's outputs in the order it sent them, through a whisper node (early wired):
    (vad outputs, the finals' features, the tentatives' features, the whisper node)."""
    from nodes.whisper import WhisperEncoder
    vad = run_node(SileroVAD(), chunks(audio, 320))
    frames = [(port, f) for port, f in vad if port in ("early", "utterance")]
    node = WhisperEncoder({"checkpoint": str(whisper_path)})
    node.setup()
    feats = [g for port, f in frames for _, g in node.process("audio" if port == "utterance" else "early", f)]
    tentative = [f for f in feats if f.meta.get("tentative")]
    return vad, [f for f in feats if not f.meta.get("tentative")], tentative, node


def test_resumed_speech_gives_one_answer_with_the_whole_speech(tmp_path, whisper_path):
    from nodes.whisper import WhisperEncoder
    audio = phrases_with_a_pause(tmp_path, 0.25)          # + espeak's own trailing silence: > pad, < min_silence
    vad, feats, tentative, node = vad_then_whisper(audio, whisper_path)
    (utt,) = vad.on("utterance")
    assert len(vad.on("early")) >= 2                       # at the pause (void), and at the end
    assert utt.meta["end_s"] - utt.meta["start_s"] > 2.0   # both phrases
    (feat,) = feats                                         # ONE final features frame, of the whole speech
    plain = WhisperEncoder({"checkpoint": str(whisper_path)})
    (want,) = run_node(plain, [utt], port="audio").on("features")
    np.testing.assert_array_equal(feat.data, want.data)
    assert feat.meta["early"] and node.early_hits == 1     # the last tentative was the final one
    # every tentative went on downstream (the backbone speculates on it); the void one is shorter
    assert len(tentative) == len(vad.on("early")) and {f.turn for f in tentative} == {utt.turn}
    assert len(tentative[0].data) < len(feat.data)
    np.testing.assert_array_equal(tentative[-1].data, feat.data)


def test_a_confirmed_tentative_gives_the_features_of_the_plain_path(dialogue, whisper_path):
    from nodes.whisper import WhisperEncoder
    audio, _ = dialogue
    vad, feats, tentative, node = vad_then_whisper(audio, whisper_path)
    assert len(feats) == 2 and all(f.meta["early"] for f in feats) and node.early_hits == 2
    for f in feats:                                   # the tentatives went on downstream too
        *_, last = [t for t in tentative if t.turn == f.turn]
        np.testing.assert_array_equal(last.data, f.data)
    plain = run_node(WhisperEncoder({"checkpoint": str(whisper_path)}), vad.on("utterance"), port="audio").on("features")
    for a, b in zip(feats, plain):
        np.testing.assert_array_equal(a.data, b.data)
        assert not b.meta["early"] and a.turn == b.turn


def test_a_client_segmented_stream_is_one_utterance_from_first_to_last_speech(dialogue):
    audio, truth = dialogue
    frames = chunks(audio, 800)
    for f in frames:
        f.meta["segment"] = "client"                 # the client decides where its turn ends
    out = run_node(SileroVAD(), frames)
    [utt] = out.on("utterance")                      # the silence between the phrases does not split it
    pad = SileroVAD.Params().speech_pad_ms / 1000
    assert utt.meta["start_s"] == pytest.approx(truth[0][0] - pad, abs=TOLERANCE_S)
    assert utt.meta["end_s"] == pytest.approx(truth[1][1] + pad, abs=TOLERANCE_S)
    assert [f.meta["event"] for f in out.on("speech")] == ["started", "stopped"]
