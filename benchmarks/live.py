"""`omniflow bench live`: a spoken conversation with a shipped graph, run as users run it.

The benchmark starts `omniflow run GRAPH` as a child process (every node in its own process, the
launcher's CPU plan, the weights in $OMNIFLOW_HOME), waits for the launcher's "graph ready" (every
node finished setup()), then talks to it in real time:

serve   graphs/serve.yaml through its WebSocket gateway. N clients (`--sessions 1,2,4`, started
        `--stagger` seconds apart) each stream the question like a microphone: 20 ms of 16 kHz int16
        per message, each sent when its last sample has been "spoken", followed by silence for as
        long as the answer plays (a microphone does not stop). One warm-up conversation (cut after
        its first second of answer) runs before the measured rounds, so kernels are warm.
speech  graphs/speech_to_speech.yaml, its `mic` FileSource paced in real time (`mic.realtime=true`)
        over a file that holds the question twice: the first is the warm-up (the second barges in
        on its answer), the second is measured. Times come from the run's `--trace`: the mic's
        first frame sets the clock, the speaker node's received pcm frames are the answer. One
        session (the graph has one microphone).

Per conversation:

first audio   the first answer sample's arrival minus the TRUE end of speech: the last voiced
              sample of the question, found in the signal (`last_voiced_sample`), not the VAD's
              decision (which adds its hang-over, `min_silence_ms`)
stall         a listener's playback clock starts at the first answer sample and plays 24 kHz;
              every time the buffer runs dry counts, and the seconds it stays dry add up
RTF           answer seconds / seconds from the first to the last answer sample's arrival (>= 1:
              the answer arrived at least as fast as it plays)
CPU           seconds of CPU per node process over the round (/proc/PID/stat), and the cores
              they kept busy on average

Answers have a fixed length (`--answer-seconds`, through backbone.max_new_tokens: random weights
never stop by themselves).

original      the Mini-Omni loop, re-created step for step by `benchmarks.graph.ReferenceDecoder`
              (via `benchmarks.concurrency.original_answer`), on the SAME weights in this process,
              after the graphs have stopped: float32 whisper on the utterance, the adapter, the
              2-row prefill, decode steps, and a SNAC decode per 4-frame chunk. Its clock starts
              when it holds the utterance (as if the client's VAD had cut it with no hang-over).

    omniflow bench live --sessions 1,2 --json live.json
    omniflow bench live --graphs serve --sessions 1,2,4 --stagger 1.5
    omniflow bench live --set backbone.device=cuda --set whisper.device=cuda --set vocoder.device=cuda
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from omniflow.model.units import SNAC_FRAME_S, SNAC_RATE, WHISPER_RATE

REPO = Path(__file__).resolve().parent.parent
GRAPHS = {"serve": REPO / "graphs" / "serve.yaml", "speech": REPO / "graphs" / "speech_to_speech.yaml"}
DEFAULT_AUDIO = REPO / "examples" / "question.wav"
RATE_IN = WHISPER_RATE        # Hz: what clients send (the VAD's and whisper's rate)
RATE_OUT = SNAC_RATE          # Hz: SNAC's answer audio
CHUNK_MS = 20                 # audio per client message, as a microphone delivers it
STEP_S = SNAC_FRAME_S         # one decode step = one SNAC frame of answer
DELAY_STEPS = 7               # the last audio layer of frame f comes out at step f + 7
VOICED_WINDOW_MS = 10         # last_voiced_sample looks at the signal in windows of this length
VOICED_BELOW_PEAK_DB = 35.0   # a window is voiced when its RMS is within this of the loudest
READY_TIMEOUT_S = 600.0       # weights load: minutes on a slow disk
QUIET_CORES = 0.15            # the graph counts as idle below this CPU use (a round starts then)
WARMUP_ANSWER_S = 1.0         # the warm-up conversation ends after this much answer audio
MAX_STALLS_LISTED = 20        # stalls whose time and length the JSON lists per client


# --- the signal and the listener ---------------------------------------------------------------

def last_voiced_sample(audio: np.ndarray, rate: int = RATE_IN) -> int:
    """Index of the last sample of speech in `audio` (N,): the end of the last 10 ms window whose
    RMS is within VOICED_BELOW_PEAK_DB of the loudest window's. Read from the signal, so it does
    not depend on any VAD's threshold or hang-over."""
    win = max(1, rate * VOICED_WINDOW_MS // 1000)
    n = len(audio) // win
    if n == 0:
        raise ValueError("the question is shorter than 10 ms")
    rms = np.sqrt(np.mean(audio[: n * win].astype(np.float64).reshape(n, win) ** 2, axis=1))  # (n,)
    voiced = np.flatnonzero(rms >= rms.max() * 10 ** (-VOICED_BELOW_PEAK_DB / 20))
    if rms.max() <= 0 or len(voiced) == 0:
        raise ValueError("the question is silent: no voiced sample")
    return int((voiced[-1] + 1) * win - 1)


def playback(arrivals: list[tuple[float, int]], rate: int = RATE_OUT) -> dict:
    """A listener's playback of an answer that arrives as (time s, samples) pieces, in order.

    The clock starts at the first piece and plays `rate` samples per second; a piece that arrives
    after everything before it has played is a stall (the listener hears a gap until it comes)."""
    pieces = [(t, n) for t, n in arrivals if n > 0]
    if not pieces:
        return {"first_t": None, "answer_s": 0.0, "stall_s": 0.0, "stalls": 0, "rtf": None, "stalls_at": []}
    first_t = pieces[0][0]
    played_until = first_t                       # when the buffer runs dry if nothing else comes
    stall_s, stalls, stalls_at = 0.0, 0, []
    for t, n in pieces:
        if t > played_until and played_until > first_t:
            stalls += 1
            stall_s += t - played_until
            if len(stalls_at) < MAX_STALLS_LISTED:  # (s after the first sample, s of silence)
                stalls_at.append((round(played_until - first_t, 3), round(t - played_until, 3)))
            played_until = t
        played_until = max(played_until, t) + n / rate
    answer_s = sum(n for _, n in pieces) / rate
    span = pieces[-1][0] - first_t
    return {"first_t": first_t, "answer_s": answer_s, "stall_s": stall_s, "stalls": stalls,
            "rtf": answer_s / span if span > 0 else None, "stalls_at": stalls_at}


def answer_steps(seconds: float) -> int:
    """backbone.max_new_tokens for `seconds` of answer audio (the delay adds DELAY_STEPS)."""
    return math.ceil(seconds / STEP_S) + DELAY_STEPS


def load_question(path: str | Path) -> np.ndarray:
    """Any audio file -> (N,) float32 mono at 16 kHz."""
    from omniflow.audio import load_audio
    return load_audio(Path(path), RATE_IN)


def to_int16(audio: np.ndarray) -> np.ndarray:
    from omniflow.audio import to_int16 as convert
    return convert(audio)


# --- the machine and the node processes --------------------------------------------------------

def machine() -> dict:
    """CPU model, cores this process may use, and the load when the run started."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next((l.split(":", 1)[1].split() for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("flags")), [])
    except OSError:
        flags = []
    from omniflow.launch.plan import available_cores
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    try:                                      # the GPU, if any (without importing torch here)
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        gpu = None
    return {"cpu": model, "cores": available_cores(), "isa": isa, "gpu": gpu,
            "load_average": os.getloadavg()[0]}


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid`, all its threads (None once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK        # utime, stime (fields 14, 15)


def node_pids(run_pid: int) -> dict[str, int]:
    """{node: pid} of the node processes an `omniflow run` process started (their command line
    is `python -m omniflow.runtime RUN_DIR/nodes/NODE.json`)."""
    out = {}
    for task in Path(f"/proc/{run_pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"omniflow.runtime" in argv:
                out[Path(argv[argv.index(b"omniflow.runtime") + 1].decode()).stem] = child
    return out


class CpuMeter:
    """CPU seconds per node between `start()` and `stop()`. A node process that ends meanwhile
    (the speech graph's mic, VAD and whisper end before the answer does) counts with its last
    reading: call `read()` every fraction of a second while it may end."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.last: dict[str, float] = {}               # node -> its latest reading

    def read(self) -> dict[str, float]:
        self.last.update({n: s for n, pid in self.pids.items() if (s := cpu_seconds(pid)) is not None})
        return dict(self.last)

    def start(self) -> None:
        self.t0, self.c0 = time.monotonic(), self.read()

    def stop(self) -> dict:
        c1, wall = self.read(), time.monotonic() - self.t0
        per_node = {n: round(c1[n] - self.c0[n], 2) for n in c1 if n in self.c0}
        return {"wall_s": wall, "per_node": per_node,
                "cores_busy": sum(per_node.values()) / wall if wall > 0 else 0.0}

    def wait_quiet(self, timeout_s: float = 60.0, window_s: float = 1.0) -> None:
        """Until the graph's processes use less than QUIET_CORES together (a round starts idle)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            before = sum(self.read().values())
            time.sleep(window_s)
            if (sum(self.read().values()) - before) / window_s < QUIET_CORES:
                return


# --- a graph run, as `omniflow run` -----------------------------------------------------------

class GraphRun:
    """`python -m omniflow.cli run GRAPH --set ...` as a child process; its log is kept."""

    def __init__(self, graph: Path, sets: list[str], extra: list[str] = (), env: dict | None = None):
        cmd = [sys.executable, "-m", "omniflow.cli", "run", str(graph), *extra]
        for s in sets:
            cmd += ["--set", s]
        self.cmd = cmd
        self.lines: deque[str] = deque(maxlen=400)
        self.ready_at: float | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env={**os.environ, **(env or {})}, preexec_fn=die_with_parent())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "graph ready" in line and not self._ready.is_set():
                self.ready_at = time.monotonic()
                self._ready.set()
        self._ready.set()                          # the run ended: wait_ready() must not hang

    def tail(self, n: int = 25) -> str:
        return "\n".join(list(self.lines)[-n:])

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Seconds from the start to "graph ready"; raises with the run's log if it never came."""
        t0 = time.monotonic()
        if not self._ready.wait(timeout_s) or self.ready_at is None:
            self.stop()
            raise RuntimeError(f"{' '.join(self.cmd[2:])} did not become ready (every node's setup()) "
                               f"within {timeout_s:.0f} s; its last lines:\n{self.tail()}")
        return self.ready_at - t0

    def failed(self) -> str | None:
        """The run's last lines if it ended with an error, else None."""
        code = self.proc.poll()
        return None if code in (None, 0) else f"exit code {code}:\n{self.tail()}"

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)                   # SIGINT: stops every node like Ctrl-C
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=2)


def die_with_parent():
    """A Popen preexec_fn (Linux): the `omniflow run` child gets SIGINT when the benchmark dies, so a
    benchmark killed by a timeout leaves no graph running (its nodes follow their launcher). libc
    is loaded here, in the parent: the child only makes the call. None where there is no prctl."""
    try:
        import ctypes
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, 2)                     # PR_SET_PDEATHSIG, SIGINT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets_for(graph: Path, sets: list[str]) -> list[str]:
    """The --set overrides that name a node of `graph` (one list serves both graphs)."""
    import yaml
    nodes = set((yaml.safe_load(graph.read_text()) or {}).get("nodes", {}))
    return [s for s in sets if s.partition(".")[0] in nodes]


# --- serve.yaml: WebSocket clients ------------------------------------------------------------

async def converse(url: str, question: np.ndarray, speech_end: int, *, start_at: float,
                   stop_after_s: float | None = None, timeout_s: float = 600.0) -> dict:
    """One client: stream `question` (int16, 16 kHz) like a microphone from `start_at`
    (time.monotonic), then silence until the answer ends; return its arrivals and timings.
    `stop_after_s`: hang up after that much answer audio (the warm-up)."""
    from websockets import connect

    chunk = RATE_IN * CHUNK_MS // 1000
    arrivals: list[tuple[float, int]] = []
    result = {"errors": [], "ended": False}
    done = asyncio.Event()

    async def receive(ws) -> None:
        got = 0
        while not done.is_set():
            message = await ws.recv()
            now = time.monotonic()
            if isinstance(message, bytes):
                n = len(message) // 4                          # float32 samples
                arrivals.append((now, n))
                got += n
                if stop_after_s is not None and got >= stop_after_s * RATE_OUT:
                    done.set()
                continue
            msg = json.loads(message)
            if msg["type"] == "end":
                result["ended"] = True
                done.set()
            elif msg["type"] == "error":
                result["errors"].append(msg["error"])
            elif msg["type"] == "turn":                        # a new turn: older audio is void
                arrivals.clear()
                got = 0

    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    async with connect(url, max_size=None) as ws:
        hello = json.loads(await ws.recv())
        if hello.get("type") != "session":
            raise RuntimeError(f"the gateway refused the session: {hello}")
        await ws.send(json.dumps({"type": "start", "rate": RATE_IN, "format": "s16",
                                  "output_format": "f32"}))
        receiver = asyncio.ensure_future(receive(ws))
        silence = np.zeros(chunk, np.int16).tobytes()
        t0 = time.monotonic()
        sent = 0
        deadline = t0 + len(question) / RATE_IN + timeout_s
        while not done.is_set() and time.monotonic() < deadline:
            if receiver.done():                                # the connection failed
                break
            # a message leaves when its last sample has been spoken (a microphone's pace)
            await asyncio.sleep(max(0.0, t0 + (sent + chunk) / RATE_IN - time.monotonic()))
            piece = question[sent:sent + chunk].tobytes() if sent < len(question) else silence
            await ws.send(piece)
            sent += chunk
        finished = done.is_set()
        done.set()
        if receiver.done() and receiver.exception() is not None:
            raise receiver.exception()
        receiver.cancel()
    end_of_speech = t0 + (speech_end + 1) / RATE_IN
    play = playback([(t - end_of_speech, n) for t, n in arrivals])
    return {**result, **play, "first_audio_s": play["first_t"],
            "timed_out": not finished or (stop_after_s is None and not result["ended"])}


async def clients(port: int, question: np.ndarray, speech_end: int, n: int, stagger_s: float,
                  tag: str, timeout_s: float) -> list[dict]:
    t = time.monotonic() + 0.2
    return list(await asyncio.gather(*[
        converse(f"ws://127.0.0.1:{port}/?session={tag}-{k}", question, speech_end,
                 start_at=t + k * stagger_s, timeout_s=timeout_s) for k in range(n)]))


def run_serve(args, question: np.ndarray, speech_end: int, steps: int, saved=lambda g: None) -> dict:
    port = free_port()
    sets = [f"gateway.port={port}", f"backbone.max_new_tokens={steps}",
            *sets_for(GRAPHS["serve"], args.set)]
    sessions = sorted({int(x) for x in args.sessions.split(",")})
    print(f"serve: starting graphs/serve.yaml (port {port}) ...", file=sys.stderr)
    run = GraphRun(GRAPHS["serve"], sets, ["--trace", args.trace] if args.trace else [])
    rounds = []
    try:
        ready_s = run.wait_ready()
        meter = CpuMeter(node_pids(run.proc.pid))
        print(f"serve: graph ready after {ready_s:.1f} s; warm-up conversation ...", file=sys.stderr)
        asyncio.run(converse(f"ws://127.0.0.1:{port}/?session=warmup", question, speech_end,
                             start_at=time.monotonic(), stop_after_s=WARMUP_ANSWER_S,
                             timeout_s=args.timeout))
        for n in sessions:
            meter.wait_quiet()
            print(f"serve: {n} session(s) ...", file=sys.stderr)
            meter.start()
            talks = asyncio.run(clients(port, question, speech_end, n, args.stagger, f"n{n}",
                                        args.timeout))
            cpu = meter.stop()
            if (why := run.failed()) is not None:
                raise RuntimeError(f"graphs/serve.yaml failed during the round of {n}: {why}")
            rounds.append({"sessions": n, "clients": talks, "cpu": cpu})
            print(f"  {summary(rounds[-1])}", file=sys.stderr)
            saved({"graph": "graphs/serve.yaml", "sets": sets, "ready_s": ready_s, "rounds": rounds,
                   "plan": plan_line(run)})
    finally:
        run.stop()
    return {"graph": "graphs/serve.yaml", "sets": sets, "ready_s": ready_s, "rounds": rounds,
            "plan": plan_line(run)}


def plan_line(run: GraphRun) -> str:
    return next((l.split("] ", 1)[-1].removeprefix("INFO ") for l in run.lines if "CPU plan" in l), "")


# --- speech_to_speech.yaml: the mic file, timed through --trace ---------------------------------

def run_speech(args, question: np.ndarray, speech_end: int, steps: int, tmp: Path) -> dict:
    import soundfile as sf

    from omniflow.trace import read_trace

    gap = np.zeros(int(args.warmup_s * RATE_IN), np.float32)
    pad = np.zeros(int(args.pad_s * RATE_IN), np.float32)
    mic = np.concatenate([question, gap, question, pad])                 # warm-up, then measured
    second = len(question) + len(gap)                                     # where question 2 starts
    sf.write(tmp / "mic.wav", mic, RATE_IN, subtype="FLOAT")
    trace = tmp / "speech.trace.jsonl"
    sets = [f"mic.path={tmp / 'mic.wav'}", "mic.realtime=true", f"speaker.path={tmp / 'answer.wav'}",
            f"text.path={tmp / 'answer.txt'}", f"backbone.max_new_tokens={steps}",
            *sets_for(GRAPHS["speech"], args.set)]
    print("speech: starting graphs/speech_to_speech.yaml ...", file=sys.stderr)
    run = GraphRun(GRAPHS["speech"], sets, ["--trace", str(trace)])
    try:
        ready_s = run.wait_ready()
        meter = CpuMeter(node_pids(run.proc.pid))
        print(f"speech: graph ready after {ready_s:.1f} s; the mic plays {len(mic) / RATE_IN:.1f} s "
              "(question, warm-up gap, question) ...", file=sys.stderr)
        origin = wait_for(lambda: mic_origin(read_trace(trace)), 30.0, run)
        time.sleep(max(0.0, origin + second / RATE_IN - time.monotonic()))
        meter.start()                                  # the measured question begins
        deadline = time.monotonic() + len(mic) / RATE_IN + args.timeout
        while time.monotonic() < deadline and run.proc.poll() is None:
            records = read_trace(trace)
            utterances = utterance_turns(records)
            turns = speaker_turns(records)
            meter.read()                               # nodes that end early keep their count
            if len(utterances) == 2 and any(last for *_, last in turns.get(utterances[1], [])):
                break                                  # the measured answer has ended
            time.sleep(0.25)
        cpu = meter.stop()
        if (why := run.failed()) is not None:
            raise RuntimeError(f"graphs/speech_to_speech.yaml failed: {why}")
    finally:
        run.stop()
    records = read_trace(trace)
    utterances, turns = utterance_turns(records), speaker_turns(records)
    if len(utterances) != 2:
        raise RuntimeError(f"the speech graph's VAD cut {len(utterances)} utterances from the mic file "
                           f"(expected 2: the warm-up question and the measured one); its last "
                           f"lines:\n{run.tail()}")
    measured = turns.get(utterances[1], [])
    end_of_speech = origin + (second + speech_end + 1) / RATE_IN
    play = playback([(t - end_of_speech, n) for t, n, _ in measured])
    cold = turns.get(utterances[0], [])
    cold_first = cold[0][0] - (origin + (speech_end + 1) / RATE_IN) if cold else None
    ended = bool(measured) and measured[-1][2]
    client = {**play, "first_audio_s": play["first_t"], "errors": [], "ended": ended,
              "timed_out": not ended}
    return {"graph": "graphs/speech_to_speech.yaml", "sets": sets, "ready_s": ready_s,
            "cold_first_audio_s": cold_first, "plan": plan_line(run),
            "rounds": [{"sessions": 1, "clients": [client], "cpu": cpu}]}


def wait_for(probe, timeout_s: float, run: GraphRun):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := probe()) is not None:
            return value
        if (why := run.failed()) is not None:
            raise RuntimeError(why)
        time.sleep(0.05)
    raise RuntimeError(f"no audio left the mic within {timeout_s:.0f} s of graph ready:\n{run.tail()}")


def mic_origin(records) -> float | None:
    """time.monotonic() of the mic's first frame (its send stamp; the pacing clock's zero)."""
    for r in records:
        if r.edge.startswith("mic/audio->") and r.seq == 0 and r.stamps:
            return dict(r.stamps)["mic"] / 1e9
    return None


def utterance_turns(records) -> list[int]:
    """Turns of the utterances the VAD handed to whisper, in order."""
    return sorted({r.turn for r in records if r.kind == "utterance"})


def speaker_turns(records) -> dict[int, list[tuple[float, int, bool]]]:
    """turn -> [(arrival s, samples, last)] of the pcm frames the speaker node received."""
    turns: dict[int, list] = {}
    for r in records:
        if r.node == "speaker" and r.kind == "pcm":
            n = int(np.prod(r.shape)) if r.shape else 0
            turns.setdefault(r.turn, []).append((r.t / 1e9, n, r.last))
    return turns


# --- the original, on the same weights ----------------------------------------------------------

def run_original(question: np.ndarray, speech_end: int, steps: int, threads: int | None = None) -> dict:
    """The reference loop on $OMNIFLOW_HOME's weights (float32), after a short warm-up answer;
    torch's default threads (as the original runs) unless `threads`."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from benchmarks.concurrency import original_answer
    from omniflow.model.snac_stream import SnacDecoder
    from omniflow.model.whisper_encoder import load_encoder
    from omniflow.model import weights
    from omniflow.model.checkpoint import load_model

    print("original: loading the same weights in this process ...", file=sys.stderr)
    encoder, dims = load_encoder(weights.resolve(f"{weights.WHISPER_PREFIX}small"))
    model, _ = load_model(weights.resolve("miniomni"))
    snac = SnacDecoder.from_dir(weights.resolve("snac"), noise="fixed")
    utterance = question[: speech_end + 1]            # what a client VAD would hand over, no hang-over
    with torch.inference_mode():
        original_answer(encoder, dims, model, snac, utterance, 12)          # warm-up
        print(f"original: one answer of {steps} steps ...", file=sys.stderr)
        r = original_answer(encoder, dims, model, snac, utterance, steps)
    play = playback(r["chunks"])
    return {"first_audio_s": r["first_audio"], "answer_total_s": r["answer"], "step_ms": r["step_ms"],
            "stall_s": play["stall_s"], "stalls": play["stalls"], "rtf": play["rtf"],
            "answer_s": play["answer_s"], "threads": torch.get_num_threads()}


# --- report ------------------------------------------------------------------------------------

def summary(rnd: dict) -> str:
    firsts = [c["first_audio_s"] for c in rnd["clients"] if c["first_audio_s"] is not None]
    stalls = sum(c["stall_s"] for c in rnd["clients"])
    worst = f"{max(firsts):.2f} s" if firsts else "none"
    return f"{rnd['sessions']} session(s): worst first audio {worst}, stalls {stalls:.2f} s"


def cpu_per_answer_s(rnd: dict) -> float | None:
    """CPU seconds the graph's processes spent per second of answer audio in a round: real time
    on C cores needs less than C (on a starved machine it is what the answer cost, not its speed)."""
    answer = sum(c["answer_s"] for c in rnd["clients"])
    return sum(rnd["cpu"]["per_node"].values()) / answer if answer > 0 else None


def run(args: argparse.Namespace) -> dict:
    question = load_question(args.audio)
    speech_end = last_voiced_sample(question)
    padded = np.concatenate([question[: speech_end + 1], np.zeros(int(args.pad_s * RATE_IN), np.float32)])
    steps = answer_steps(args.answer_seconds)
    results = {"machine": machine(), "question": {
        "path": str(args.audio), "seconds": len(question) / RATE_IN,
        "speech_ends_s": (speech_end + 1) / RATE_IN, "pad_s": args.pad_s},
        "answer_seconds": args.answer_seconds, "max_new_tokens": steps,
        "weights": os.environ.get("OMNIFLOW_HOME", "~/.cache/omniflow"),
        "stagger_s": args.stagger, "graphs": {}}
    graphs = [g for g in args.graphs.split(",") if g]
    unknown = set(graphs) - set(GRAPHS)
    if unknown:
        raise SystemExit(f"--graphs: unknown {sorted(unknown)}; choose from {sorted(GRAPHS)}")
    with tempfile.TemporaryDirectory(prefix="omniflow-live-") as tmp:
        if "serve" in graphs:
            results["graphs"]["serve"] = run_serve(
                args, to_int16(padded), speech_end, steps,
                lambda g: save_partial(args, {**results, "graphs": {**results["graphs"], "serve": g}}))
            save_partial(args, results)
        if "speech" in graphs:
            results["graphs"]["speech"] = run_speech(args, padded, speech_end, steps, Path(tmp))
            print(f"  {summary(results['graphs']['speech']['rounds'][0])}", file=sys.stderr)
            save_partial(args, results)
    if args.original:
        results["original"] = run_original(question, speech_end, steps, args.original_threads)
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    return results


def save_partial(args, results: dict) -> None:
    """--json after each graph, so a run cut short still leaves what it measured."""
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "partial": True}, indent=2))


def _fmt(x, spec=".2f", unit="") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def report(results: dict) -> str:
    m, q, o = results["machine"], results["question"], results.get("original")
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    lines = [f"omniflow bench live on {m['cpu']} ({m['cores']} cores; {', '.join(m['isa']) or 'no avx2'}{gpu}); "
             f"load average {m['load_average']:.1f} at start, {m['load_average_end']:.1f} at end",
             f"question {q['seconds']:.2f} s (speech ends at {q['speech_ends_s']:.2f} s, then silence); "
             f"answers {results['answer_seconds']:.0f} s (max_new_tokens {results['max_new_tokens']}); "
             f"weights {results['weights']}",
             "first audio: after the last voiced sample of the question; stall: gaps a listener hears; "
             "RTF: answer s / arrival span (>= 1 keeps up); cores: CPU s of the graph's processes / wall s "
             "(what it got); CPU/ans s: CPU s per s of answer audio (what real time needs: < cores)",
             f"{'graph':<8}{'N':>3}{'first audio worst':>19}{'median':>8}{'stall s':>9}{'stalls':>8}"
             f"{'RTF min':>9}{'cores':>7}{'CPU/ans s':>10}{'first vs orig':>15}"]
    for name, g in results["graphs"].items():
        for rnd in g["rounds"]:
            cs = rnd["clients"]
            firsts = [c["first_audio_s"] for c in cs if c["first_audio_s"] is not None]
            rtfs = [c["rtf"] for c in cs if c["rtf"] is not None]
            worst = max(firsts) if len(firsts) == len(cs) else None
            ratio = f"{worst / o['first_audio_s']:.2f}x" if o and worst is not None else "-"
            lines.append(f"{name:<8}{rnd['sessions']:>3}{_fmt(worst, '.2f', ' s'):>19}"
                         f"{_fmt(statistics.median(firsts) if firsts else None, '.2f'):>8}"
                         f"{sum(c['stall_s'] for c in cs):>9.2f}{sum(c['stalls'] for c in cs):>8}"
                         f"{_fmt(min(rtfs) if rtfs else None, '.2f'):>9}{rnd['cpu']['cores_busy']:>7.2f}"
                         f"{_fmt(cpu_per_answer_s(rnd), '.2f'):>10}{ratio:>15}")
    if o:
        lines.append(f"{'original':<8}{1:>3}{_fmt(o['first_audio_s'], '.2f', ' s'):>19}{'':>8}"
                     f"{o['stall_s']:>9.2f}{o['stalls']:>8}{_fmt(o['rtf'], '.2f'):>9}{'':>7}{'':>10}{'1.00x':>15}"
                     f"   (float32, {o['threads']} threads, decode step {o['step_ms']:.0f} ms; "
                     "clock starts when it holds the utterance)")
    for name, g in results["graphs"].items():
        lines.append(f"{name}: ready {g['ready_s']:.1f} s after start; {g['plan']}")
        if g.get("cold_first_audio_s") is not None:
            lines.append(f"{name}: first question after graph ready (cold kernels): first audio "
                         f"{g['cold_first_audio_s']:.2f} s")
        for rnd in g["rounds"]:
            cpu = rnd["cpu"]
            per = ", ".join(f"{n} {s:.1f}" for n, s in sorted(cpu["per_node"].items(), key=lambda x: -x[1]))
            lines.append(f"{name} N={rnd['sessions']}: CPU s per node over {cpu['wall_s']:.1f} s: {per}")
            bad = [c for c in rnd["clients"] if c["errors"] or c["timed_out"]]
            for c in bad:
                lines.append(f"  a session timed out or got errors: {c['errors'] or 'no end of answer'}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--graphs", default="serve,speech",
                        help="comma list: serve (graphs/serve.yaml, WebSocket clients), speech "
                             "(graphs/speech_to_speech.yaml, its mic file in real time)")
    parser.add_argument("--sessions", default="1,2,4",
                        help="serve: comma list of concurrent clients per round (speech: always 1)")
    parser.add_argument("--stagger", type=float, default=0.0, metavar="S",
                        help="serve: client k starts k*S seconds after the first (0: all at once)")
    parser.add_argument("--answer-seconds", type=float, default=20.0,
                        help="length of every answer (backbone.max_new_tokens; random weights never stop)")
    parser.add_argument("--audio", default=str(DEFAULT_AUDIO), help="the spoken question (any libsndfile file)")
    parser.add_argument("--pad-s", type=float, default=2.0,
                        help="silence after the last voiced sample before the stream goes on silent")
    parser.add_argument("--warmup-s", type=float, default=6.0,
                        help="speech: seconds between the warm-up question and the measured one")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE",
                        help="node parameter for the graphs that have that node, e.g. "
                             "--set backbone.device=cuda (repeatable)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds an answer may take before the round is reported as timed out")
    parser.add_argument("--original", default=True, action=argparse.BooleanOptionalAction,
                        help="time the original Mini-Omni loop on the same weights (the baseline)")
    parser.add_argument("--original-threads", type=int, default=None, metavar="N",
                        help="torch threads of the original (default: torch's, as the original runs; "
                             "on a busy machine its spinning OpenMP threads slow it far more than the "
                             "graph's passive ones)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--trace", default=None, metavar="FILE.jsonl",
                        help="serve: trace every frame of the served graph (omniflow run --trace), to see "
                             "where the time goes: omniflow trace FILE.jsonl")


def main(argv=None) -> int:
    import signal

    from benchmarks.graph import bench_main
    from omniflow.runtime import interrupt_once
    signal.signal(signal.SIGTERM, interrupt_once)   # a timeout's SIGTERM stops the graph it runs
    try:
        return bench_main(argv, "omniflow bench live", __doc__, add_arguments, run, report)
    except KeyboardInterrupt:
        print("omniflow bench live: interrupted; the graph it ran is stopped (--json keeps the "
              "rounds that finished)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
