"""Voice activity detection: a PCM stream in, whole utterances out, and barge-in on the control channel.

Silero VAD (the `silero-vad` package's ONNX model, shipped inside the package) scores every 32 ms
window (512 samples at 16 kHz) with a speech probability. The segmentation rules are the ones of
silero's `VADIterator`, plus a minimum speech length and a maximum utterance length:

* speech starts at the first window with p >= threshold; the utterance begins `speech_pad_ms` earlier;
* speech ends after `min_silence_ms` of windows with p < threshold - 0.15 (silero's hysteresis);
  the utterance ends `speech_pad_ms` after the first silent window;
* utterances whose speech (without pads) is shorter than `min_speech_ms` are dropped (coughs, clicks);
* an utterance reaching `max_utterance_s` is cut there and the next one starts at once;
* at end of stream (or a pcm frame with last=True), an utterance in progress is flushed;
* a stream whose frames say meta {"segment": "client"} (its client decides where a turn ends: the
  Realtime API's turn_detection null) is not split at silences: its speech, first to last, is one
  utterance, sent when the stream is flushed.

Turns and barge-in: every utterance is a new turn of its session. The VAD does not number turns:
as soon as an utterance's speech is confirmed (`min_speech_ms` of it heard) it asks the control
bus for the session's next turn (`omniflow.turns.ask_turn`), so the bus announces it and every
node cancels the old answer while the user is still talking. The utterance follows, stamped with
the turn the bus granted, when the speech ends (held back until the grant, if it ends first; a
grant that does not come within GRANT_RETRY_S is asked for again with the same ref).
When the session ends (`end`: its client left) its stream state is freed.

Early end (output `early`, `early: true`): when speech is followed by its first `speech_pad_ms` of
silence, the utterance it would close is sent at once as a tentative (meta tentative: true, same
turn and samples as the final one if the silence lasts `min_silence_ms`). The end-of-turn silence
must stay long (people pause mid-sentence), but waiting it out before any work would put the whole
answer's start after it; with the tentative, whisper encodes it and passes it on, and the backbone
starts the answer speculatively (prefill and its first decode steps, output held), all while the
hang-over runs. The final utterance still follows on `utterance` as before: equal to the
tentative, it confirms the work done (the held answer goes out at once); if the speech resumes
instead, the tentative is simply never confirmed (the final one differs from it) and the work on
it is dropped.

Speech events (output `speech`, for clients that show them, e.g. the gateway's Realtime API): a
frame {"event": "started", "audio_ms"} when an utterance's speech is confirmed (with the pcm
stream's turn: the utterance's own is not granted yet), and {"event": "stopped", "audio_ms"} with the utterance's turn when the
utterance is sent; {"event": "silence"} when a stream is flushed (a pcm frame with last=True,
or end of stream) without having given any utterance. audio_ms counts the session's input stream
from its start (pads excluded).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec
import numpy as np

from omniflow.audio import to_float_mono
from omniflow.frame import Frame
from omniflow.model.units import WHISPER_RATE
from omniflow.node import Node
from omniflow.params import Fraction, NonNegative, PositiveFloat
from omniflow.turns import GRANT_RETRY_S, ask_turn

GRANT_POLL_S = 0.002         # an utterance waiting for its turn number checks this often
RATE = WHISPER_RATE          # Hz: silero VAD's and whisper's input rate
WINDOW = 512                 # samples per VAD decision at 16 kHz (32 ms), fixed by the model
CONTEXT = 64                 # samples of the previous window the model sees with each window
STATE_SHAPE = (2, 1, 128)    # the model's recurrent state
HYSTERESIS = 0.15            # speech ends below threshold - 0.15 (silero's VADIterator)


class SileroModel:
    """The ONNX Silero VAD, stateless here: each stream passes its own (state, context)."""

    def __init__(self) -> None:
        from silero_vad import load_silero_vad

        self.session = load_silero_vad(onnx=True).session      # onnxruntime.InferenceSession
        self.sr = np.array(RATE, dtype=np.int64)

    def prob(self, window: np.ndarray, stream: "StreamState") -> float:
        """Speech probability of one (512,) float32 window; advances `stream`'s state and context."""
        x = np.concatenate([stream.context, window])[None]               # (1, 576)
        out, stream.rnn = self.session.run(None, {"input": x, "state": stream.rnn, "sr": self.sr})
        stream.context = window[-CONTEXT:].copy()
        return float(out.reshape(-1)[0])


@dataclass
class StreamState:
    """One session's VAD state: explicit, so a reset is just a new object."""
    rnn: np.ndarray = field(default_factory=lambda: np.zeros(STATE_SHAPE, np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # < 1 window, unscored
    kept: list[np.ndarray] = field(default_factory=list)   # scored audio still needed, in order
    audio_start: int = 0          # stream position (samples) of kept[0][0]
    position: int = 0             # samples scored so far
    triggered: bool = False
    speech_start: int = 0         # first speech window's start
    silence_start: int = 0        # start of the current run of silent windows (0: none)
    announced: bool = False       # the turn of the utterance in progress was asked for
    ref: str | None = None        # ... its request (omniflow.turns.ask_turn)
    turn: int | None = None       # ... the turn the bus granted it (None: not yet)
    resampler: object | None = None
    rate: int = RATE
    origin: int = 0               # samples of the session's input before this stream (earlier flushes)
    early_sent: bool = False      # the tentative end of the current silence was sent (output `early`)
    utterances: int = 0           # utterances this stream gave (a flush of none says "silence")
    whole: bool = False           # segment: client (no split at silences; the flush ends it)


@dataclass
class Segment:
    start: int                    # samples, stream position, pads included
    end: int
    speech_ms: float              # speech without pads


class SileroVAD(Node):
    inputs = {"audio": "pcm"}
    outputs = {"utterance": "utterance", "speech": "speech", "early": "utterance"}
    drop_old_turns = False        # the pcm stream has no turns: the VAD is where they begin

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        threshold: Fraction = 0.5              # speech probability above which a window is speech
        min_speech_ms: NonNegative = 250          # shorter speech is ignored (and never barges in)
        min_silence_ms: NonNegative = 600         # end-of-speech silence that closes an utterance
        speech_pad_ms: NonNegative = 100          # audio kept before and after the speech
        max_utterance_s: PositiveFloat = 30         # whisper's window: longer speech is cut here
        early: bool = True                  # send the tentative utterance at the first silence (output early)

    def setup(self) -> None:
        p = self.params
        if not 0 < p.threshold < 1:
            raise ValueError(f"vad threshold={p.threshold} must be between 0 and 1 (silero's default is 0.5)")
        if p.max_utterance_s <= 0 or p.min_silence_ms < 0 or p.min_speech_ms < 0 or p.speech_pad_ms < 0:
            raise ValueError("vad durations must be >= 0 (and max_utterance_s > 0)")
        self.model = SileroModel()
        self.streams: dict[str, StreamState] = {}
        self.count: dict[str, int] = {}          # session -> utterances emitted
        self.heard: dict[str, int] = {}          # session -> samples heard before its stream was flushed
        self.held: dict[str, dict[str, list[tuple[str, Frame]]]] = {}   # session -> ref -> outputs awaiting its turn
        self.asked: dict[str, float] = {}        # ref of a turn request not granted yet -> when last sent
        ms = RATE / 1000
        self.pad = int(p.speech_pad_ms * ms)
        self.min_silence = int(p.min_silence_ms * ms)
        self.min_speech = int(p.min_speech_ms * ms)
        self.max_len = int(p.max_utterance_s * RATE)

    # --- input ------------------------------------------------------------------------------
    def process(self, port, frame: Frame):
        s = self.streams.get(frame.session)
        if s is None:
            s = self.streams[frame.session] = StreamState(origin=self.heard.pop(frame.session, 0))
        s.whole = s.whole or frame.meta.get("segment") == "client"
        audio = self._to_16k(frame, s)
        s.pending = np.concatenate([s.pending, audio])
        n = len(s.pending) // WINDOW * WINDOW
        windows, s.pending = s.pending[:n], s.pending[n:]
        for i in range(0, n, WINDOW):
            yield from self._score(frame, s, windows[i:i + WINDOW])
        if frame.last:
            yield from self._flush(frame, s)

    def finish(self):
        for session, s in list(self.streams.items()):
            yield from self._flush(Frame(kind="pcm", session=session), s)

    def has_work(self) -> bool:
        return bool(self.held)      # utterances whose turn is still on its way from the bus

    def step(self):
        time.sleep(GRANT_POLL_S)    # (the runtime reads the control channel between steps)
        now = time.monotonic()
        for session, held in self.held.items():        # a lost request or announcement: ask again
            for ref in held:                           # (same ref: the bus answers with the same turn)
                if now - self.asked.get(ref, now) >= GRANT_RETRY_S:
                    self.asked[ref] = now
                    self.log.warning("session %s: no turn granted for its utterance in %.0f s; asking again",
                                     session, GRANT_RETRY_S)
                    yield ask_turn(session, "speech", ref)[1]

    def reset(self, session: str, turn: int):
        # The VAD is where turns begin: a new turn (its own barge-in, or a client's) must not throw
        # away the speech being heard right now, so there is nothing to forget here.
        return ()

    def granted(self, session: str, turn: int, ref: str):
        self.asked.pop(ref, None)
        s = self.streams.get(session)
        if s is not None and s.ref == ref:
            s.turn = turn                                # the utterance in progress is this turn
        held = self.held.get(session, {})
        if ref in held:
            outputs = held.pop(ref)
            if not held:
                del self.held[session]
            for port, frame in outputs:
                frame.turn = turn
                yield port, frame

    def end(self, session: str):
        """The client left: forget its stream (speech in progress is dropped, never answered)."""
        s = self.streams.pop(session, None)
        self.count.pop(session, None)
        for ref in [*self.held.pop(session, {}), s.ref if s is not None else None]:
            self.asked.pop(ref, None)
        self.heard.pop(session, None)
        return ()

    def _to_16k(self, frame: Frame, s: StreamState) -> np.ndarray:
        audio = to_float_mono(frame.data)                 # (N,) float32
        rate = int(frame.meta.get("rate", RATE))
        if rate != RATE:
            import soxr
            if s.resampler is None or s.rate != rate:
                s.resampler, s.rate = soxr.ResampleStream(rate, RATE, 1, dtype="float32"), rate
            audio = s.resampler.resample_chunk(audio, last=frame.last)
        return np.asarray(audio, np.float32)

    # --- segmentation -----------------------------------------------------------------------
    def _score(self, frame: Frame, s: StreamState, window: np.ndarray):
        prob = self.model.prob(window, s)
        start, s.position = s.position, s.position + WINDOW
        s.kept.append(window)            # a list: joined once per utterance, not once per window
        p = self.params
        if prob >= p.threshold:
            s.silence_start, s.early_sent = 0, False          # speech goes on: a tentative end is void
            if not s.triggered:
                s.triggered, s.speech_start, s.announced = True, start, False
        elif prob < p.threshold - HYSTERESIS and s.triggered:
            if not s.silence_start:
                s.silence_start = start
            if s.position - s.silence_start >= self.min_silence and not s.whole:
                yield from self._close(frame, s, s.silence_start)
        if s.triggered and s.silence_start and p.early and not s.early_sent and not s.whole:   # (whole: no
            # silence ends it, so a tentative end would only make whisper encode twice)
            yield from self._tentative(frame, s)
        if s.triggered:
            speech_end = s.silence_start or s.position
            if not s.announced and speech_end - s.speech_start >= self.min_speech:
                yield from self._announce(frame, s)
            cut = self._utterance_start(s) + self.max_len
            if s.position >= cut:
                self.log.warning("session %s: utterance reached max_utterance_s=%s; cut there, the rest "
                                 "is the next utterance (a new turn)", frame.session, p.max_utterance_s)
                silence_start = s.silence_start
                yield from self._close(frame, s, cut, pad_after=False)
                # the rest starts exactly at the cut: no front pad, no overlap with this utterance
                # (a silence already running before the cut keeps counting: it ends the rest as empty)
                s.triggered, s.speech_start, s.announced = True, cut, False
                s.silence_start = silence_start
                s.kept, s.audio_start = [self._audio(s)[cut - s.audio_start:]], cut
        if not s.triggered:                  # keep only what a future utterance's front pad needs
            keep = self.pad + WINDOW
            while len(s.kept) > 1 and s.position - s.audio_start - len(s.kept[0]) >= keep:
                s.audio_start += len(s.kept.pop(0))

    def _announce(self, frame: Frame, s: StreamState):
        """Confirmed speech: ask the bus for the session's next turn (a barge-in if it is answering)."""
        s.announced = True
        session = frame.session
        s.ref, output = ask_turn(session, "speech")
        s.turn = None
        self.asked[s.ref] = time.monotonic()
        yield output
        yield "speech", Frame(kind="speech", session=session, turn=frame.turn,   # (the pcm's turn)
                              meta={"event": "started", "audio_ms": self._ms(s, s.speech_start)})

    @staticmethod
    def _audio(s: StreamState) -> np.ndarray:
        """The kept audio as one array (stream positions audio_start .. position)."""
        if len(s.kept) > 1:
            s.kept = [np.concatenate(s.kept)]
        return s.kept[0] if s.kept else np.zeros(0, np.float32)

    def _utterance_start(self, s: StreamState) -> int:
        return max(s.audio_start, s.speech_start - self.pad)

    def _tentative(self, frame: Frame, s: StreamState):
        """The utterance as it will be if the silence that began goes on for min_silence_ms: sent
        (output `early`, meta tentative) once its end pad is heard, so a consumer (whisper) can
        start on it during the hang-over. If speech resumes, nothing is said: the final utterance
        (output `utterance`) then differs from it and a consumer must not use it."""
        end = s.silence_start + self.pad
        if s.position < end or s.turn is None or s.silence_start - s.speech_start < self.min_speech:
            return
        s.early_sent = True
        start = self._utterance_start(s)
        audio = self._audio(s)[start - s.audio_start: end - s.audio_start].copy()
        meta = {"rate": RATE, "start_s": start / RATE, "end_s": end / RATE, "tentative": True,
                "speech_ms": (s.silence_start - s.speech_start) / RATE * 1000}
        yield "early", Frame(kind="utterance", session=frame.session, turn=s.turn, last=True,
                             stamps=list(frame.stamps), data=audio, meta=meta).stamp(self.name)

    def _close(self, frame: Frame, s: StreamState, speech_end: int, pad_after: bool = True):
        seg = Segment(start=self._utterance_start(s),
                      end=min(s.position, speech_end + (self.pad if pad_after else 0)),
                      speech_ms=(speech_end - s.speech_start) / RATE * 1000)
        s.triggered, s.silence_start, s.early_sent = False, 0, False
        if speech_end - s.speech_start < self.min_speech:
            return
        if not s.announced:
            yield from self._announce(frame, s)
        audio = self._audio(s)[seg.start - s.audio_start: seg.end - s.audio_start].copy()
        session = frame.session
        s.utterances += 1
        self.count[session] = self.count.get(session, 0) + 1
        meta = {"rate": RATE, "start_s": seg.start / RATE, "end_s": seg.end / RATE,
                "speech_ms": seg.speech_ms}
        out = Frame(kind="utterance", session=session, turn=s.turn if s.turn is not None else -1,
                    seq=self.count[session] - 1, last=True, stamps=list(frame.stamps), data=audio, meta=meta)
        out.stamp(self.name)
        outputs = [("utterance", out), ("speech", Frame(kind="speech", session=session, turn=out.turn, meta={
            "event": "stopped", "audio_ms": self._ms(s, speech_end)}))]
        if s.turn is None:                               # its turn is on its way: hold it until then
            self.held.setdefault(session, {})[s.ref] = outputs
        else:
            yield from outputs
        s.ref, s.turn = None, None

    @staticmethod
    def _ms(s: StreamState, position: int) -> int:
        """A stream position (samples at 16 kHz) as ms since the session's input began."""
        return int((s.origin + position) * 1000 // RATE)

    def _flush(self, frame: Frame, s: StreamState):
        """End of the stream: score the partial window (zero-padded) and close speech in progress."""
        if len(s.pending):
            tail = len(s.pending)
            window = np.concatenate([s.pending, np.zeros(WINDOW - tail, np.float32)])
            s.pending = np.zeros(0, np.float32)
            yield from self._score(frame, s, window)
            s.position -= WINDOW - tail                   # the zero padding is not audio
            s.kept[-1] = s.kept[-1][: len(s.kept[-1]) - (WINDOW - tail)]
        if s.triggered:
            yield from self._close(frame, s, s.silence_start or s.position)
        if not s.utterances:             # a flushed stream with no speech: say so (a client that
            yield "speech", Frame(kind="speech", session=frame.session, turn=frame.turn,   # waits for an answer)
                                  meta={"event": "silence", "audio_ms": self._ms(s, s.position)})
        s = self.streams.pop(frame.session, None)
        if s is not None:
            self.heard[frame.session] = s.origin + s.position
