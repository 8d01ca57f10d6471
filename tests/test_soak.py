"""Soak and faults (slow): graphs/serve.yaml, each node its own process, 16 clients at once mixing
speech, typed prompts, barge-ins, oversize prompts and disconnects while the backbone and then the
vocoder are SIGKILLed mid-turn. Every question ends with `end` or `error` (or is cut by the next
one), nothing hangs, and the server still answers a fresh client afterwards. Prints the counts."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import pytest

pytest.importorskip("websockets")

from test_gateway import QUESTION, connect_when_up, free_port, ws_client  # noqa: E402
from test_serve_turns import check_log, serve_graph  # noqa: E402

CLIENTS = 16
ACTIONS = ["speak", "type", "speak+barge", "huge", "type+barge", "type", "speak", "leave"]
PER_CLIENT = 3                   # actions per client (a "leave" ends it early)
QUESTION_S = 90.0                # a question is answered (or fails) within this, restarts included


async def client(port: int, i: int, question, first_audio: asyncio.Event, counts: dict) -> list:
    log: list = []
    try:
        return await _client(port, i, question, first_audio, counts, log)
    except (asyncio.TimeoutError, asyncio.CancelledError, Exception) as e:
        raise AssertionError(f"client c{i}: {e!r}; its last messages: {log[-6:]}") from None


async def _client(port, i, question, first_audio, counts, log) -> list:
    turn = {"now": None}

    async def recv():
        message = await asyncio.wait_for(ws.recv(), QUESTION_S)
        entry = ("audio", len(message)) if isinstance(message, bytes) else json.loads(message)
        log.append(entry)
        if isinstance(entry, tuple):
            first_audio.set()
        elif entry["type"] == "turn":
            turn["now"] = entry["turn"]
        return entry

    def closes(entry, after=None) -> bool:
        return isinstance(entry, dict) and entry["type"] in ("end", "error") and entry.get("turn") is not None \
            and entry["turn"] == turn["now"] and (after is None or entry["turn"] > after)

    async def speak():
        for k in range(0, len(question), 1600):
            await ws.send(question[k:k + 1600].tobytes())
        await ws.send(json.dumps({"type": "flush"}))

    async def type_(text="Tell me a story."):
        await ws.send(json.dumps({"type": "text", "text": text}))

    async def answered(after=None):
        while not closes(await recv(), after):
            pass
        counts[log[-1]["type"]] += 1

    async with await connect_when_up(f"ws://127.0.0.1:{port}/?session=c{i}", QUESTION_S) as ws:
        await recv()                                                      # the greeting
        for k in range(PER_CLIENT):
            action = ACTIONS[(i + k) % len(ACTIONS)]
            if action == "leave":
                await speak()
                await recv()                                              # something came back; leave
                counts["left"] += 1
                return log
            if action == "huge":
                await type_("hello " * 2000)
                while not (isinstance(e := await recv(), dict) and e["type"] == "error" and "turn" not in e):
                    pass
                counts["refused"] += 1
                continue
            await (speak() if action.startswith("speak") else type_())
            if action.endswith("+barge"):
                while True:                                               # audio (then barge in) or the end
                    entry = await recv()
                    if isinstance(entry, tuple) or closes(entry):
                        break
                if isinstance(entry, tuple):
                    first = turn["now"]
                    await speak()
                    await answered(after=first)
                    counts["barged"] += 1
                else:
                    counts[entry["type"]] += 1
                continue
            await answered()
    return log


def kill_mid_turn(launcher, first_audio: threading.Event, killed: list) -> None:
    """SIGKILL the backbone once answers are playing; then, once it is back, the vocoder."""
    first_audio.wait(300)
    for victim in ("backbone", "vocoder"):
        worker = launcher.workers[victim]
        os.kill(worker.pid, signal.SIGKILL)
        killed.append(victim)
        deadline = time.monotonic() + 120
        while launcher.restarts[victim] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(8.0)                  # the restarted node loads; answers flow again


@pytest.mark.slow
def test_sixteen_clients_while_the_backbone_and_the_vocoder_are_killed(demo_home, tmp_path):
    from omniflow.launch.local import LocalLauncher

    port = free_port()
    graph = serve_graph(tmp_path, port)
    graph.nodes["gateway"].params["idle_timeout_s"] = None          # serve until the test stops it
    graph.nodes["backbone"].params.update(max_speed=0.0, max_new_tokens=40)   # short, unpaced answers
    launcher = LocalLauncher(graph)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("run", launcher.run()), daemon=True)
    runner.start()
    question = ws_client().read_question(str(QUESTION))
    counts = {"end": 0, "error": 0, "refused": 0, "barged": 0, "left": 0}
    audio_seen, killed = threading.Event(), []
    try:
        async def everyone():
            first_audio = asyncio.Event()
            asyncio.get_running_loop().create_task(_relay(first_audio, audio_seen))
            return await asyncio.gather(*(client(port, i, question, first_audio, counts) for i in range(CLIENTS)))

        killer = threading.Thread(target=kill_mid_turn, args=(launcher, audio_seen, killed), daemon=True)
        killer.start()
        logs = asyncio.run(everyone())          # (each question has its own timeout)
        killer.join(120)
        assert killed == ["backbone", "vocoder"]
        fresh = asyncio.run(asyncio.wait_for(client(port, 99, question, asyncio.Event(), counts),
                                             3 * QUESTION_S))
        print(f"\nsoak: {CLIENTS} clients, killed {killed}; answered {counts['end']}, errors {counts['error']}, "
              f"refused oversize {counts['refused']}, barge-ins {counts['barged']}, left mid-answer {counts['left']}; "
              f"restarts {dict(launcher.restarts)}")
        for i, log in enumerate(logs):
            check_log(f"c{i}", log)
        outcomes = check_log("fresh", fresh)
        assert outcomes and list(outcomes.values())[-1] == "end", fresh      # the healed server answers
        assert counts["error"] >= 1                 # the turns lost in the crashes were told so
        assert launcher.restarts["backbone"] == 1 and launcher.restarts["vocoder"] == 1
    finally:
        launcher.stop("the soak test is over")
        runner.join(60)
    assert not runner.is_alive(), "the run did not stop"


async def _relay(event: asyncio.Event, flag: threading.Event) -> None:
    await event.wait()
    flag.set()
