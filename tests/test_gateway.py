"""The WebSocket gateway: client messages -> frames, answer frames -> client messages, and the
whole speech server (graphs/serve.yaml) answering two clients at once. All traffic on 127.0.0.1.

Node-level tests run the real server (port 0: a free one) and talk to it with websockets' sync
client; the node is driven by `run_node` (client -> graph: it runs until the server is idle) or by
calling `process`/`reset` as the runtime would (graph -> client, while the client stays connected).
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("websockets")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from nodes.gateway import Gateway  # noqa: E402
from omniflow.frame import Frame, decode, encode  # noqa: E402
from omniflow.node import CONTROL  # noqa: E402
from omniflow.testing import run_node  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SERVE = REPO / "graphs" / "serve.yaml"
QUESTION = REPO / "examples" / "question.wav"
SAMPLES_PER_FRAME = 2048        # SNAC 24 kHz: answer samples per coarse frame
STEPS = 40                      # max_new_tokens per answer in the end-to-end tests
RECV_S = 5.0                    # a message the server owes us arrives within this




def url(node: Gateway, session: str | None = None) -> str:
    return f"ws://127.0.0.1:{node.port}/" + (f"?session={session}" if session else "")


def recv_json(ws) -> dict:
    message = ws.recv(timeout=RECV_S)
    assert isinstance(message, str), f"expected a JSON message, got {len(message)} bytes of audio"
    return json.loads(message)


def pump(node: Gateway, until) -> list:
    """Step the node (as the runtime would) until `until()` holds; returns what it emitted."""
    out, deadline = [], time.monotonic() + RECV_S
    while not until():
        assert time.monotonic() < deadline, "the gateway did not see the client's message"
        out += list(node.step())
    return out


def wire(frame: Frame) -> Frame:
    return decode([bytes(p) for p in encode(frame)])


# --- client -> graph -------------------------------------------------------------------------

def test_client_audio_text_and_disconnect_become_frames(gateway):
    node = gateway(idle_timeout_s=0.2)
    x = np.linspace(-0.5, 0.5, 480, dtype=np.float32)                   # 20 ms at 24 kHz
    with connect(url(node, "alice")) as ws:
        assert recv_json(ws) == {"type": "session", "session": "alice", "input": {"rate": 16000, "format": "s16"},
                                 "output": {"rate": 24000, "format": "f32"}}
        ws.send(json.dumps({"type": "start", "rate": 24000, "format": "f32", "output_format": "s16"}))
        assert recv_json(ws)["input"] == {"rate": 24000, "format": "f32"}
        ws.send(x.tobytes())
        ws.send(x[:240].tobytes())
        ws.send(json.dumps({"type": "flush"}))
        ws.send(json.dumps({"type": "text", "text": "What is the capital of France?"}))
    out = run_node(node, setup=False)       # runs until the server has been idle for 0.2 s

    audio = out.on("audio")
    assert [len(f.data) for f in audio] == [480, 240, 0]
    assert np.array_equal(audio[0].data, x) and audio[0].data.dtype == np.float32
    assert all(f.session == "alice" and f.meta["rate"] == 24000 and f.turn == 0 for f in audio)
    assert [f.seq for f in audio] == [0, 1, 2] and [f.last for f in audio] == [False, False, True]
    # the prompt asks the bus for a turn and goes out with the one granted; the disconnect ends
    # the session on the bus
    controls = out.on(CONTROL)
    assert [(c.session, c.meta["op"]) for c in controls] == [("alice", "next_turn"), ("alice", "end_session")]
    assert [(a.session, a.turn, a.meta["op"]) for a in out.announced] == [("alice", 0, "turn"), ("alice", 1, "end")]
    [text] = out.on("text")
    assert (text.session, text.turn, text.meta["text"]) == ("alice", 0, "What is the capital of France?")
    kinds = [(p, f.meta.get("op")) for p, f in out if p != "audio"]
    assert kinds == [(CONTROL, "next_turn"), ("text", None), (CONTROL, "end_session")]


def test_a_burst_of_client_messages_loses_none(gateway):
    # a step handles at most MAX_EVENTS_PER_STEP of them: the rest wait for the next step, none
    # is dropped (the soak saw a typed prompt, queued behind 16 clients' audio, never answered)
    from nodes.gateway import MAX_EVENTS_PER_STEP
    node = gateway(idle_timeout_s=0.2)
    chunks = 3 * MAX_EVENTS_PER_STEP + 5
    with connect(url(node, "lou")) as ws:
        recv_json(ws)
        for k in range(chunks):
            ws.send(np.full(160, k, "<i2").tobytes())
        ws.send(json.dumps({"type": "text", "text": "after the audio"}))
        ws.ping().wait(RECV_S)                                      # (all of it is in the node's queue)
    out = run_node(node, setup=False)
    assert [int(f.data[0]) for f in out.on("audio")] == list(range(chunks))
    assert [f.meta["text"] for f in out.on("text")] == ["after the audio"]
    assert [c.meta["op"] for c in out.on(CONTROL)] == ["next_turn", "end_session"]


def test_int16_audio_by_default_and_a_silent_visitor_costs_no_turn(gateway):
    node = gateway(idle_timeout_s=0.2)
    pcm = (np.arange(320) - 160).astype(np.int16)
    with connect(url(node)) as ws:
        session = recv_json(ws)["session"]
        assert len(session) == 32                                   # a fresh uuid (hex)
        ws.send(pcm.astype("<i2").tobytes())
    with connect(url(node)) as ws:
        assert recv_json(ws)["session"] != session                  # another fresh one
    out = run_node(node, setup=False)
    [frame] = out.on("audio")
    assert frame.data.dtype == np.int16 and np.array_equal(frame.data, pcm) and frame.meta["rate"] == 16000
    # both sessions end on the bus when they leave (the VAD frees what it heard of them)
    assert sorted(c.meta["op"] for c in out.on(CONTROL)) == ["end_session", "end_session"]


def test_malformed_messages_get_an_error_and_the_session_goes_on(gateway):
    node = gateway(idle_timeout_s=0.2)
    with connect(url(node, "carol")) as ws:
        recv_json(ws)
        bad = ["not json", json.dumps([1, 2]), json.dumps({"type": "dance"}),
               json.dumps({"type": "text", "text": "  "}), json.dumps({"type": "text"}),
               json.dumps({"type": "start", "rate": "fast"}), json.dumps({"type": "start", "format": "mp3"}),
               b"\x01\x02\x03"]                                    # 3 bytes: not whole int16 samples
        bad += [json.dumps({"type": "start", "format": ["s16"]}), json.dumps({"type": "text", "text": "x" * 4001}),
                json.dumps({"type": "start", "output_format": {"a": 1}})]
        replies = []
        for message in bad:
            ws.send(message)
            replies.append(recv_json(ws))
            assert replies[-1]["type"] == "error" and replies[-1]["error"], message
        assert "'format' must be one of" in replies[-3]["error"]              # a list, not a name
        assert "4001 characters, more than max_prompt_chars=4000" in replies[-2]["error"]
        ws.send(np.zeros(160, "<i2").tobytes())
        ws.send(json.dumps({"type": "start", "rate": 8000}))          # too late: audio already came
        assert "before any audio" in recv_json(ws)["error"]
        ws.send(json.dumps({"type": "text", "text": "still here"}))
        ws.ping().wait(RECV_S)                                      # the connection is alive
    out = run_node(node, setup=False)
    assert [len(f.data) for f in out.on("audio")] == [160]
    assert [f.meta["text"] for f in out.on("text")] == ["still here"]


def test_float32_nan_is_refused(gateway):
    node = gateway(dtype="float32")
    with connect(url(node)) as ws:
        recv_json(ws)
        ws.send(np.array([0.1, np.nan], "<f4").tobytes())
        assert "NaN" in recv_json(ws)["error"]


def test_session_names_refused_reused_and_a_full_server(gateway):
    node = gateway(max_sessions=1)
    for name, why in (("bad%20name", "not allowed"), ("x" * 65, "not allowed")):
        with connect(url(node, name)) as ws:
            assert why in recv_json(ws)["error"]
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=RECV_S)
            assert ws.close_code == 1008
    with connect(url(node, "dave")) as ws:
        assert recv_json(ws)["session"] == "dave"
        with connect(url(node, "erin")) as other:
            assert "full" in recv_json(other)["error"]
            with pytest.raises(ConnectionClosed):
                other.recv(timeout=RECV_S)
            assert other.close_code == 1013
    with connect(url(node, "dave")) as ws:                          # the name was used before
        assert recv_json(ws)["session"] == "dave~2"
    names = node.server.names_used                                  # bounded: invented names are forgotten
    for k in range(names.size + 1):
        names.add(f"visitor{k}", 1)
    assert len(names) == names.size and "dave" not in names


def test_a_connected_name_is_refused(gateway):
    node = gateway()
    with connect(url(node, "frank")) as ws:
        recv_json(ws)
        with connect(url(node, "frank")) as twin:
            assert "already connected" in recv_json(twin)["error"]


# --- graph -> client -------------------------------------------------------------------------

def test_answers_go_to_their_client_and_an_interrupted_turn_never_does(gateway):
    node = gateway(end_after=["pcm", "text"])
    first = np.linspace(-1.5, 0.5, 2048, dtype=np.float32)       # out of range: clipped for int16
    with connect(url(node, "gina")) as ws, connect(url(node, "hal")) as bystander:
        recv_json(ws), recv_json(bystander)
        ws.send(json.dumps({"type": "start", "output_format": "s16"}))
        recv_json(ws)
        pump(node, lambda: {"gina", "hal"} <= set(node.sessions))

        def answer(port, turn, data=None, text=None, last=False, session="gina"):
            meta = {"rate": 24000} if port == "pcm" else {"text": text}
            frame = Frame(kind=port, session=session, turn=turn, data=data, meta=meta, last=last)
            assert list(node.process(port, wire(frame))) == []

        answer("pcm", 0, first)
        want = np.clip(np.rint(first * 32768), -32768, 32767).astype("<i2")
        assert ws.recv(timeout=RECV_S) == want.tobytes()
        answer("text", 0, text="Par")
        assert recv_json(ws) == {"type": "text", "text": "Par", "turn": 0}
        answer("text", 0, text="", last=True)                    # text ended; audio still to come
        answer("pcm", 0, np.zeros(2048, np.float32), last=True)
        assert ws.recv(timeout=RECV_S) == bytes(4096)
        assert recv_json(ws) == {"type": "end", "turn": 0}

        answer("pcm", 0, np.ones(2048, np.float32))             # after its end: stale, never sent
        # a new question: the bus announced turn 1, so the runtime calls reset
        assert list(node.reset("gina", 1)) == []
        assert recv_json(ws) == {"type": "turn", "turn": 1}
        answer("pcm", 0, np.ones(2048, np.float32))             # late audio of the old answer
        answer("text", 0, text="old")
        answer("text", 1, text="Rome", last=True)
        answer("pcm", 1, np.full(2048, 0.25, np.float32), last=True)
        assert recv_json(ws) == {"type": "text", "text": "Rome", "turn": 1}
        assert ws.recv(timeout=RECV_S) == np.full(2048, 8192, "<i2").tobytes()
        assert recv_json(ws) == {"type": "end", "turn": 1}
        # the other client heard nothing of gina's answers; its own answer comes as float32
        answer("pcm", 0, np.full(4, 0.5, np.float32), last=True, session="hal")
        assert bystander.recv(timeout=RECV_S) == np.full(4, 0.5, "<f4").tobytes()
        # (hal's end waits for its text too: end_after [pcm, text])
        answer("text", 0, text="", last=True, session="hal")
        assert recv_json(bystander) == {"type": "end", "turn": 0}


def test_speech_started_reaches_the_client_when_the_bus_announced_its_turn_first(gateway):
    # the VAD asks for the turn, then sends speech-started with the pcm's (older) turn: the bus's
    # announcement may come first (CI saw a Realtime barge-in without speech_started)
    from omniflow.turns import TurnGate
    node = gateway()
    gate = TurnGate(node)                                       # as the runtime delivers frames
    with connect(f"ws://127.0.0.1:{node.port}/v1/realtime") as ws:
        assert recv_json(ws)["type"] == "session.created"
        pump(node, lambda: node.sessions)
        [session] = node.sessions
        gate.announce(Frame(kind="control", session=session, turn=1, meta={"op": "turn"}))
        gate.deliver("speech", wire(Frame(kind="speech", session=session, turn=0,
                                          meta={"event": "started", "audio_ms": 2000})))
        event = recv_json(ws)
        assert (event["type"], event["audio_start_ms"]) == ("input_audio_buffer.speech_started", 2000)


def test_a_typed_prompt_during_an_answer_asks_the_bus_for_a_new_turn(gateway):
    node = gateway()
    with connect(url(node, "ivy")) as ws:
        recv_json(ws)
        pump(node, lambda: "ivy" in node.sessions)
        node.process("pcm", wire(Frame(kind="pcm", session="ivy", turn=0, data=np.zeros(8, np.float32),
                                       meta={"rate": 24000})))
        ws.recv(timeout=RECV_S)
        ws.send(json.dumps({"type": "text", "text": "stop, tell me about Rome"}))
        [(port, request)] = pump(node, lambda: node.sessions["ivy"].prompts)
        assert port == CONTROL and request.meta["op"] == "next_turn"     # the prompt waits for its number
        # the bus announces turn 7 (its numbering, not ours): the client hears it, the prompt goes out
        assert list(node.reset("ivy", 7)) == [] and node.sessions["ivy"].turn == 7
        assert recv_json(ws) == {"type": "turn", "turn": 7}
        [(port, prompt)] = node.granted("ivy", 7, request.meta["ref"])
        assert (port, prompt.turn, prompt.meta["text"]) == ("text", 7, "stop, tell me about Rome")
        node.process("pcm", wire(Frame(kind="pcm", session="ivy", turn=0, data=np.ones(8, np.float32),
                                       meta={"rate": 24000}, last=True)))
        node.process("pcm", wire(Frame(kind="pcm", session="ivy", turn=7, data=np.zeros(8, np.float32),
                                       meta={"rate": 24000}, last=True)))
        assert ws.recv(timeout=RECV_S) == bytes(32)                 # turn 7's audio, not turn 0's
        assert recv_json(ws) == {"type": "end", "turn": 7}


def test_a_typed_prompt_whose_turn_is_not_granted_asks_again_with_the_same_ref(gateway, monkeypatch):
    import nodes.gateway as gateway_module

    node = gateway()
    with connect(url(node, "una")) as ws:
        recv_json(ws)
        pump(node, lambda: "una" in node.sessions)
        ws.send(json.dumps({"type": "text", "text": "hello"}))
        [(_, request)] = pump(node, lambda: node.sessions["una"].prompts)
        monkeypatch.setattr(gateway_module, "GRANT_RETRY_S", 0.0)     # the bus's answer was lost
        [(port, again)] = list(node.step())
        assert port == CONTROL and again.meta == request.meta          # same ref: the same turn
        [(port, prompt)] = node.granted("una", 0, request.meta["ref"])
        assert (port, prompt.meta["text"]) == ("text", "hello") and list(node.step()) == []
        ws.send(json.dumps({"type": "text", "text": "and again"}))
        pump(node, lambda: node.sessions["una"].prompts)
        monkeypatch.setattr(gateway_module, "GRANT_GIVE_UP_S", 0.0)   # the bus never answers
        assert list(node.step()) == [] and not node.sessions["una"].prompts
        assert "please send it again" in recv_json(ws)["error"]


def test_an_error_frame_ends_its_turn_with_an_error_for_that_client_only(gateway):
    node = gateway(end_after=["pcm"])
    with connect(url(node, "jo")) as ws, connect(url(node, "kim")) as other:
        recv_json(ws), recv_json(other)
        pump(node, lambda: {"jo", "kim"} <= set(node.sessions))
        error = Frame(kind="error", session="jo", turn=0, last=True,
                      meta={"error": "the typed prompt is 9000 tokens but ...", "node": "backbone"})
        assert list(node.failed(wire(error))) == []
        assert recv_json(ws) == {"type": "error", "turn": 0, "error": "the typed prompt is 9000 tokens but ..."}
        assert list(node.failed(wire(error))) == []                  # (it came on the other input too)
        node.process("pcm", wire(Frame(kind="pcm", session="jo", turn=0, data=np.ones(8, np.float32),
                                       meta={"rate": 24000}, last=True)))     # stale: the turn is over
        node.process("pcm", wire(Frame(kind="pcm", session="kim", turn=0, data=np.zeros(8, np.float32),
                                       meta={"rate": 24000}, last=True)))
        assert other.recv(timeout=RECV_S) == bytes(32) and recv_json(other) == {"type": "end", "turn": 0}
        ws.ping().wait(RECV_S)
        with pytest.raises(TimeoutError):                            # jo got nothing more
            ws.recv(timeout=0.3)


def test_a_restart_fails_the_open_turns_and_ends_them_in_the_graph(gateway):
    node = gateway()
    health = lambda restarts: {"op": "health", "nodes": {"backbone": {"restarts": restarts}}}
    with connect(url(node, "ana")) as ws, connect(url(node, "bo")) as other:
        recv_json(ws), recv_json(other)
        pump(node, lambda: {"ana", "bo"} <= set(node.sessions))
        node.run_status(health(0))
        node.reset("ana", 0)                                         # ana's question is answering
        assert recv_json(ws) == {"type": "turn", "turn": 0}
        node.run_status(health(1))                                   # the backbone died and restarted
        assert recv_json(ws)["error"].startswith("the answer was lost: node backbone failed")
        [(port, request)] = list(node.step())
        assert (port, request.session, request.meta["op"], request.meta["after"]) == \
            (CONTROL, "ana", "next_turn", 0)                         # only ana's turn, only if still 0
        node.run_status(health(1))
        assert list(node.step()) == []                               # once
        ws.ping().wait(RECV_S)
        other.ping().wait(RECV_S)
        with pytest.raises(TimeoutError):                            # bo had no turn open
            other.recv(timeout=0.3)


def test_float32_audio_sent_as_s16_is_named(gateway):
    node = gateway()                                                   # int16 by default
    t = np.arange(1600) / 16000
    with connect(url(node)) as ws:
        recv_json(ws)
        ws.send((0.3 * np.sin(2 * np.pi * 220 * t)).astype("<f4").tobytes())
        assert "looks like float32 samples but the session's input format is s16" in recv_json(ws)["error"]
        ws.send((3000 * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes())   # real int16 is fine
        ws.send(np.zeros(1600, "<i2").tobytes())                                # and so is silence
        ws.ping().wait(RECV_S)
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.3)
    node2 = gateway(dtype="float32")
    with connect(url(node2)) as ws:
        recv_json(ws)
        ws.send((3000 * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes())
        assert "is not float32 samples in [-1, 1] (is it int16?)" in recv_json(ws)["error"]


def test_bad_params_and_a_busy_port_are_clear_errors(gateway):
    with pytest.raises(ValueError, match="end_after"):
        Gateway({"end_after": []}).setup()
    node = gateway()
    with pytest.raises(RuntimeError, match="cannot listen on 127.0.0.1:.*Fix"):
        gateway(port=node.port)


def test_a_server_thread_that_died_fails_the_node(gateway):
    node = gateway()
    node.server._error = OSError("boom")              # as if its event loop had crashed ...
    node.server.stop()                                # ... and the thread ended
    with pytest.raises(RuntimeError, match="server stopped: OSError"):
        list(node.step())


# --- the speech server end to end ------------------------------------------------------------

def ws_client():
    """examples/ws_client.py, imported from its file (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("ws_client", REPO / "examples" / "ws_client.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ws_client"] = module              # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_graph(tmp: Path, port: int):
    """graphs/serve.yaml on `port`, short answers, a tap recording the backbone's tokens, and an
    idle timeout so the graph ends by itself once the clients have gone."""
    from omniflow.graph import load_graph, parse_graph

    assert load_graph(SERVE) is not None                      # the shipped file itself is valid
    spec = yaml.safe_load(SERVE.read_text())
    spec["nodes"]["tap"] = {"use": "test_graph_speech:Recorder", "params": {"path": str(tmp / "tap.jsonl")},
                            "inputs": {"tokens": "backbone/tokens"}}
    sets = [f"gateway.port={port}", "gateway.idle_timeout_s=2", f"backbone.max_new_tokens={STEPS}"]
    return parse_graph(yaml.safe_dump(spec), str(SERVE), sets)


async def connect_when_up(address: str, timeout_s: float):
    """The graph's other nodes may still be loading: retry until the gateway listens."""
    from websockets import connect

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await connect(address, max_size=None)
        except OSError:
            assert time.monotonic() < deadline, "the gateway never started listening"
            await asyncio.sleep(0.1)


async def ask_twice(port: int, question: np.ndarray, timeout_s: float) -> list:
    """Session z asks, and asks again as soon as the answer starts playing (a barge-in). Returns
    every message in order: JSON messages as dicts, audio as ("audio", samples)."""
    log: list = []

    async def receive(ws, until) -> None:
        while not until():
            message = await asyncio.wait_for(ws.recv(), timeout_s)
            log.append(("audio", len(message) // 4) if isinstance(message, bytes) else json.loads(message))

    async def ask(ws) -> None:
        for i in range(0, len(question), 1600):               # 100 ms messages, as fast as they go
            await ws.send(question[i:i + 1600].tobytes())
        await ws.send(json.dumps({"type": "flush"}))

    async with await connect_when_up(f"ws://127.0.0.1:{port}/?session=z", timeout_s) as ws:
        await ws.recv()                                        # the session greeting
        await ask(ws)
        await receive(ws, lambda: log and isinstance(log[-1], tuple))     # the answer is playing
        await ask(ws)                                          # ... and the user talks over it
        await receive(ws, lambda: log[-1] == {"type": "end", "turn": 1})
    return log


def converse_at_once(port: int, timeout_s: float):
    """Clients a and b each ask examples/question.wav (with examples/ws_client.py) while z barges
    in on its own answer; all three at once."""
    client = ws_client()
    question = client.read_question(str(QUESTION))

    async def one(name):
        ws = await connect_when_up(f"ws://127.0.0.1:{port}/", timeout_s)   # (the server is up)
        await ws.close()
        return await client.converse(f"ws://127.0.0.1:{port}/?session={name}", question,
                                     chunk_ms=100, realtime=False, timeout_s=timeout_s)

    async def everyone():
        return await asyncio.gather(one("a"), one("b"), ask_twice(port, question, timeout_s))
    *answers, barge_log = asyncio.run(asyncio.wait_for(everyone(), 2 * timeout_s))
    return answers, barge_log


def check_answers(answers, records):
    from test_graph_speech import expected_samples, recorded_tokens

    assert {a.session for a in answers} == {"a", "b"}
    for answer in answers:
        assert answer.errors == [] and answer.turn == 0
        assert answer.rate == 24000 and answer.first_audio_s is not None
        tokens = recorded_tokens(records, answer.session)
        assert 0 < len(tokens) <= STEPS
        assert len(answer.samples) == expected_samples(tokens) > 0       # frames × 2048, tail included
        assert len(answer.samples) % SAMPLES_PER_FRAME == 0
        assert answer.text.strip(), "no answer text"
    tokens = [r for r in records if r["port"] == "tokens" and r["session"] in "ab"]
    sessions = [r["session"] for r in tokens]                 # they really ran together
    spans = {s: (sessions.index(s), len(sessions) - 1 - sessions[::-1].index(s)) for s in "ab"}
    assert spans["a"][0] < spans["b"][1] and spans["b"][0] < spans["a"][1], spans


def check_barge_in(log, records):
    """After the gateway said turn 1 began, every sample and word is the new answer's, in full."""
    from test_graph_speech import expected_samples, recorded_tokens

    assert {"type": "end", "turn": 0} not in log, "the first answer was not interrupted"
    assert recorded_tokens(records, "z", turn=0), "the first answer never started"
    after = log[log.index({"type": "turn", "turn": 1}) + 1:]
    assert all(m["turn"] == 1 for m in after if isinstance(m, dict) and "turn" in m)
    assert any(isinstance(m, dict) and m["type"] == "text" for m in after)
    turn1 = recorded_tokens(records, "z", turn=1)
    assert sum(m[1] for m in after if isinstance(m, tuple)) == expected_samples(turn1) > 0


def run_server(graph, clients, **options):
    """Run the graph on a thread while `clients()` talks to it; the gateway's idle timeout ends it."""
    from omniflow.launch.local import LocalLauncher

    launcher = LocalLauncher(graph, **options)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("run", launcher.run()), daemon=True)
    runner.start()
    try:
        out = clients()
    finally:
        runner.join(60)
        if runner.is_alive():
            launcher.stop("the test gave up waiting")
            runner.join(10)
    assert result["run"].ok, result["run"].message
    assert result["run"].message == "every node finished"      # ended by itself, not stopped
    return out


def test_serve_graph_in_process_two_clients_at_once_and_a_barge_in(demo_home, tmp_path):
    from test_graph_speech import read_records

    port = free_port()
    answers, barge_log = run_server(serve_graph(tmp_path, port), lambda: converse_at_once(port, 120),
                                    in_process=True)
    records = read_records(tmp_path / "tap.jsonl")
    check_answers(answers, records)
    check_barge_in(barge_log, records)


@pytest.mark.slow          # ~35 s on 2 cores: nine processes each import torch
def test_serve_graph_each_node_its_own_process(demo_home, tmp_path):
    from test_graph_speech import read_records

    port = free_port()
    answers, barge_log = run_server(serve_graph(tmp_path, port), lambda: converse_at_once(port, 120))
    records = read_records(tmp_path / "tap.jsonl")
    check_answers(answers, records)
    check_barge_in(barge_log, records)
