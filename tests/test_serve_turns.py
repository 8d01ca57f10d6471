"""graphs/serve.yaml through its gateway, one session per way a conversation mixes its turns:
typed then spoken, spoken/typed/spoken, spoken/typed/typed/spoken, a barge-in over a spoken and
over a typed answer, a disconnect in the middle of an answer, and an oversize typed prompt. All at
once, tiny demo weights, on 127.0.0.1.

Every question must get exactly one `end` (or `error`), or be interrupted by the next question's
`turn` notice; no text of an older turn reaches the client after a newer turn's notice, and no
audio arrives between a turn's end and the next turn's notice.
"""
from __future__ import annotations

import asyncio
import json

import pytest
import yaml

pytest.importorskip("websockets")

from test_gateway import QUESTION, SERVE, connect_when_up, free_port, run_server, ws_client  # noqa: E402

STEPS = 80                  # answer steps; paced at 2x real time an answer lasts ~3.4 s
TIMEOUT_S = 120.0
SCRIPTS = {                 # session -> what its user does, in order
    "ts": ["type", "speak"],
    "sts": ["speak", "type", "speak"],
    "sttd": ["speak", "type", "type", "speak"],
    "bs": ["speak+barge"],           # talks over the spoken question's answer
    "bt": ["type+barge"],            # talks over a typed question's answer
    "dc": ["speak+leave"],           # leaves while the answer plays
    "big": ["huge", "type"],         # an oversize prompt is refused; the session goes on
}


def serve_graph(tmp, port):
    from omniflow.graph import parse_graph

    spec = yaml.safe_load(SERVE.read_text())
    spec["nodes"]["tap"] = {"use": "test_graph_speech:Recorder", "params": {"path": str(tmp / "tap.jsonl")},
                            "inputs": {"tokens": "backbone/tokens"}}
    sets = [f"gateway.port={port}", "gateway.idle_timeout_s=2", f"backbone.max_new_tokens={STEPS}",
            "backbone.max_speed=2.0", "backbone.dtype=float32"]
    return parse_graph(yaml.safe_dump(spec), str(SERVE), sets)


async def converse(port: int, name: str, script: list[str], question) -> list:
    """Play `script` as session `name`; every message received, in order (audio as ("audio", n))."""
    from websockets.exceptions import ConnectionClosed

    log: list = []
    try:
        return await _converse(port, name, script, question, log)
    except (ConnectionClosed, asyncio.TimeoutError) as e:
        raise AssertionError(f"session {name}: {e!r} after {log}") from None


async def _converse(port: int, name: str, script: list[str], question, log: list) -> list:
    state = {"turn": None}

    async def until(ws, done) -> None:
        while True:
            message = await asyncio.wait_for(ws.recv(), TIMEOUT_S)
            entry = ("audio", len(message)) if isinstance(message, bytes) else json.loads(message)
            log.append(entry)
            if isinstance(entry, dict) and entry["type"] == "turn":
                state["turn"] = entry["turn"]
            if done(entry):
                return

    def answered(entry) -> bool:          # the current question's end (or error)
        return isinstance(entry, dict) and entry["type"] in ("end", "error") and "turn" in entry \
            and entry["turn"] == state["turn"]

    def audio(entry) -> bool:
        return isinstance(entry, tuple)

    async def speak(ws) -> None:
        for i in range(0, len(question), 1600):
            await ws.send(question[i:i + 1600].tobytes())
        await ws.send(json.dumps({"type": "flush"}))

    async def type_(ws, text="What is the capital of France?") -> None:
        await ws.send(json.dumps({"type": "text", "text": text}))

    async with await connect_when_up(f"ws://127.0.0.1:{port}/?session={name}", TIMEOUT_S) as ws:
        await ws.recv()                                          # the greeting
        for step in script:
            if step == "speak":
                await speak(ws)
                await until(ws, answered)
            elif step == "type":
                await type_(ws)
                await until(ws, answered)
            elif step in ("speak+barge", "type+barge"):
                await (speak(ws) if step == "speak+barge" else type_(ws))
                await until(ws, audio)                           # the answer is playing ...
                await speak(ws)                                  # ... and the user talks over it
                first = state["turn"]
                assert first is not None, log
                await until(ws, lambda e: answered(e) and state["turn"] > first)
            elif step == "speak+leave":
                await speak(ws)
                await until(ws, audio)
                return log                                       # leaves mid-answer
            elif step == "huge":
                await type_(ws, "hello " * 2000)
                await until(ws, lambda e: isinstance(e, dict) and e["type"] == "error")
    return log


def run_all(port: int):
    question = ws_client().read_question(str(QUESTION))

    async def everyone():
        return await asyncio.gather(*(converse(port, name, script, question) for name, script in SCRIPTS.items()))
    return dict(zip(SCRIPTS, asyncio.run(asyncio.wait_for(everyone(), 3 * TIMEOUT_S))))


def check_log(name: str, log: list) -> dict[int, str]:
    """The protocol rules of the module doc; returns turn -> how it ended ('end' | 'error' | 'cut')."""
    notices = [m["turn"] for m in log if isinstance(m, dict) and m["type"] == "turn"]
    assert notices == sorted(set(notices)), (name, notices)            # each turn announced once, in order
    outcome: dict[int, str] = {}
    current, closed = None, False
    for m in log:
        if isinstance(m, tuple):
            assert current is not None and not closed, (name, "audio outside an open turn", log)
            continue
        if m["type"] == "turn":
            if current is not None and current not in outcome:
                outcome[current] = "cut"
            current, closed = m["turn"], False
        elif m["type"] == "text":
            assert m["turn"] == current and not closed, (name, "text of another turn", m, current)
        elif m["type"] in ("end", "error") and "turn" in m:
            assert m["turn"] == current and current not in outcome, (name, "a second end", m, log)
            outcome[current], closed = m["type"], True
    return outcome


def check(logs: dict[str, list], records: list[dict]) -> None:
    outcomes = {name: check_log(name, log) for name, log in logs.items()}
    for name in ("ts", "sts", "sttd"):                     # every question answered, in order
        assert list(outcomes[name].values()) == ["end"] * len(SCRIPTS[name]), (name, outcomes[name])
    for name in ("bs", "bt"):                              # the first answer cut, the second in full
        assert list(outcomes[name].values()) == ["cut", "end"], (name, outcomes[name], logs[name])
    # an oversize typed prompt: an error naming the limit, no turn spent; the next prompt answered
    big = logs["big"]
    assert "max_prompt_chars=4000" in next(m["error"] for m in big if isinstance(m, dict) and m["type"] == "error")
    assert list(outcomes["big"].values()) == ["end"]
    # the session that left: its answer was cancelled in the backbone, not decoded to the end
    dc = [r for r in records if r["session"] == "dc" and r["port"] == "tokens"]
    assert dc and not any(r["last"] for r in dc), "the backbone finished the answer of a client that left"
    # the backbone answered each turn of a mixed session under its own number
    for name in ("ts", "sts", "sttd"):
        turns = sorted({r["turn"] for r in records if r["session"] == name and r["port"] == "tokens"})
        assert turns == sorted(outcomes[name]), (name, turns)


def test_mixed_turns_barge_ins_and_a_disconnect_in_process(demo_home, tmp_path):
    from test_graph_speech import read_records

    port = free_port()
    logs = run_server(serve_graph(tmp_path, port), lambda: run_all(port), in_process=True)
    check(logs, read_records(tmp_path / "tap.jsonl"))


@pytest.mark.slow          # nine node processes each import torch
def test_mixed_turns_barge_ins_and_a_disconnect_each_node_its_own_process(demo_home, tmp_path):
    from test_graph_speech import read_records

    port = free_port()
    logs = run_server(serve_graph(tmp_path, port), lambda: run_all(port))
    check(logs, read_records(tmp_path / "tap.jsonl"))
