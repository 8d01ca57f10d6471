"""The gateway's OpenAI Realtime endpoint (nodes/realtime.py).

The translator is tested alone first (client events in, gateway events and server events out, no
sockets), then the official `openai` SDK's realtime client holds a spoken exchange, a barge-in and
a typed exchange with graphs/serve.yaml on tiny demo weights (the answer is not speech: the test
asserts the events and that audio bytes arrive, not what is said).
"""
from __future__ import annotations

import base64
import json
import logging

import numpy as np
import pytest

from nodes.realtime import RealtimeSession

LOG = logging.getLogger("test_realtime")


class Wire:
    """A RealtimeSession with its two sides recorded."""

    def __init__(self):
        self.to_node: list[tuple] = []
        self.sent: list[dict] = []
        self.rt = RealtimeSession("s", lambda *event: self.to_node.append(event),
                                  lambda text: self.sent.append(json.loads(text)), LOG)

    def client(self, kind: str, **fields) -> list[dict]:
        """Send a client event; the server events it caused."""
        return self._since(lambda: self.rt.receive(json.dumps({"type": kind, **fields})))

    def node(self, message, turn=None) -> list[dict]:
        """The gateway node sends `message`; the server events it caused."""
        return self._since(lambda: self.rt.deliver(message, turn))

    def _since(self, act) -> list[dict]:
        n = len(self.sent)
        act()
        return self.sent[n:]


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


def pcm_b64(samples: np.ndarray) -> str:
    return base64.b64encode(samples.astype("<i2").tobytes()).decode()


def test_session_created_and_updated_with_its_effective_config():
    w = Wire()
    w.rt.greet()
    [created] = w.sent
    assert created["type"] == "session.created" and created["session"]["type"] == "realtime"
    assert created["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    [updated] = w.client("session.update", session={
        "type": "realtime", "instructions": "be brief",
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None},
                  "output": {"format": {"type": "audio/pcm", "rate": 24000}}}})
    assert updated["type"] == "session.updated"
    assert updated["session"]["audio"]["input"] == {"format": {"type": "audio/pcm", "rate": 16000},
                                                    "turn_detection": None, "transcription": None}
    assert updated["session"]["instructions"] == ""          # ignored (and logged)


@pytest.mark.parametrize("session, param", [
    ({"audio": {"output": {"format": {"type": "audio/pcmu"}}}}, "session.audio.output.format"),
    ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 4000}}}}, "session.audio.input.format.rate"),
    ({"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}, "session.audio.input.turn_detection"),
    ({"audio": {"input": {"turn_detection": {"type": "server_vad", "create_response": False}}}},
     "session.audio.input.turn_detection.create_response"),
    ({"output_modalities": ["text"]}, "session.output_modalities"),
])
def test_unserved_session_settings_are_errors_naming_the_field(session, param):
    w = Wire()
    [error] = w.client("session.update", session=session, event_id="evt_1")
    assert error["type"] == "error" and error["error"]["param"] == param
    assert error["error"]["event_id"] == "evt_1" and error["error"]["message"]


def test_malformed_events_get_errors_and_nothing_reaches_the_graph():
    w = Wire()
    w.rt.receive("not json")
    w.rt.receive(b"\x00\x01")
    for kind, fields in [("dance", {}), ("input_audio_buffer.append", {"audio": "%%%"}),
                         ("input_audio_buffer.append", {"audio": base64.b64encode(b"abc").decode()}),
                         ("conversation.item.create", {"item": {"type": "message", "role": "user",
                                                                "content": [{"type": "input_audio"}]}}),
                         ("response.create", {}), ("response.cancel", {})]:
        w.client(kind, **fields)
    assert types(w.sent) == ["error"] * 8 and w.to_node == []
    assert [e["error"]["code"] for e in w.sent[-2:]] == ["response_create_empty", "response_cancel_not_active"]


def test_server_vad_spoken_turn_then_barge_in():
    w = Wire()
    audio = (np.arange(480) - 240).astype(np.int16)
    w.client("input_audio_buffer.append", audio=pcm_b64(audio))
    [(kind, got, rate, _)] = w.to_node                           # (the gateway adds the session)
    assert (kind, rate) == ("pcm", 24000) and np.array_equal(got, audio)

    assert types(w.node({"type": "speech", "event": "started", "turn": 0, "audio_ms": 120})) == [
        "input_audio_buffer.speech_started"]
    events = w.node({"type": "speech", "event": "stopped", "turn": 0, "audio_ms": 900})
    assert types(events)[:5] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                                 "conversation.item.added", "conversation.item.done", "response.created"]
    assert events[0]["audio_end_ms"] == 900 and events[0]["item_id"] == events[1]["item_id"]
    response = events[4]["response"]["id"]
    answer = np.linspace(-0.5, 0.5, 2048, dtype=np.float32)
    [delta] = w.node(answer, turn=0)
    assert delta["type"] == "response.output_audio.delta" and delta["response_id"] == response
    pcm = np.frombuffer(base64.b64decode(delta["delta"]), "<i2")
    assert len(pcm) == 2048 and pcm[0] == -16384 and pcm[-1] == 16384
    [text] = w.node(json.dumps({"type": "text", "text": "Par", "turn": 0}))
    assert (text["type"], text["delta"]) == ("response.output_audio_transcript.delta", "Par")

    # the user talks over the answer: it is cancelled, and nothing more of it is sent
    events = w.node({"type": "speech", "event": "started", "turn": 1, "audio_ms": 2000})
    assert types(events)[0] == "input_audio_buffer.speech_started" and types(events)[-1] == "response.done"
    assert events[-1]["response"]["status"] == "cancelled"
    assert events[-1]["response"]["status_details"]["reason"] == "turn_detected"
    assert events[-1]["response"]["output"][0]["content"][0]["transcript"] == "Par"
    assert w.node(answer, turn=0) == [] and w.node(json.dumps({"type": "end", "turn": 0})) == []
    assert w.node(json.dumps({"type": "turn", "turn": 1})) == []

    events = w.node({"type": "speech", "event": "stopped", "turn": 1, "audio_ms": 3000})
    assert types(events)[-4] == "response.created"
    assert types(w.node(answer, turn=1)) == ["response.output_audio.delta"]
    done = w.node(json.dumps({"type": "end", "turn": 1}))
    assert types(done) == ["response.output_audio.done", "response.output_audio_transcript.done",
                           "response.content_part.done", "response.output_item.done", "conversation.item.done",
                           "response.done"]
    assert done[-1]["response"]["status"] == "completed"


def test_typed_item_answered_on_response_create_and_cancelled():
    w = Wire()
    w.client("conversation.item.create", item={"type": "message", "role": "user",
                                               "content": [{"type": "input_text", "text": "Hi there"}]})
    assert w.to_node == []                                        # an item alone is not answered
    events = w.client("response.create")
    assert [e[0] for e in w.to_node] == ["text"] and w.to_node[0][1] == "Hi there"
    assert types(events)[0] == "response.created"
    assert "active response" in w.client("response.create")[0]["error"]["message"]
    assert w.node(np.ones(8, np.float32), turn=2) == []         # older audio before the node took the prompt
    assert w.node({"type": "accepted", "turn": 3}) == []
    assert types(w.node(np.ones(8, np.float32), turn=3)) == ["response.output_audio.delta"]
    events = w.client("response.cancel")
    assert w.to_node[-1] == ("cancel",)
    assert events[-1]["type"] == "response.done" and events[-1]["response"]["status"] == "cancelled"
    assert w.node(np.ones(8, np.float32), turn=3) == []


def test_turn_detection_none_buffers_until_commit_and_response_create():
    w = Wire()
    w.client("session.update", session={"audio": {"input": {"turn_detection": None,
                                                            "format": {"type": "audio/pcm", "rate": 16000}}}})
    audio = np.arange(4000, dtype=np.int16)
    w.client("input_audio_buffer.append", audio=pcm_b64(audio[:2500]))
    w.client("input_audio_buffer.append", audio=pcm_b64(audio[2500:]))
    assert w.to_node == []
    assert types(w.client("input_audio_buffer.clear")) == ["input_audio_buffer.cleared"]
    assert w.client("input_audio_buffer.commit")[0]["error"]["code"] == "input_audio_buffer_commit_empty"
    w.client("input_audio_buffer.append", audio=pcm_b64(audio))
    events = w.client("input_audio_buffer.commit")
    assert types(events) == ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
    assert w.to_node == []
    w.client("response.create")
    sent = [e for e in w.to_node if e[0] == "pcm"]
    assert np.array_equal(np.concatenate([e[1] for e in sent]), audio) and {e[2] for e in sent} == {16000}
    assert all(e[4] == {"segment": "client"} for e in sent)      # one utterance: the VAD does not split it
    assert w.to_node[-1][0] == "flush"
    # the VAD's speech events are not the client's in this mode; "stopped" says which turn answers
    assert w.node({"type": "speech", "event": "started", "turn": 0, "audio_ms": 0}) == []
    assert w.node({"type": "speech", "event": "stopped", "turn": 0, "audio_ms": 250}) == []
    assert types(w.node(np.ones(8, np.float32), turn=0)) == ["response.output_audio.delta"]
    assert w.node(json.dumps({"type": "end", "turn": 0}))[-1]["response"]["status"] == "completed"
    # committed audio in which the VAD hears no speech: an error and a failed response, not a hang
    w.client("input_audio_buffer.append", audio=pcm_b64(np.zeros(1600, np.int16)))
    w.client("input_audio_buffer.commit")
    assert types(w.client("response.create"))[0] == "response.created"
    events = w.node({"type": "speech", "event": "silence", "turn": 0, "audio_ms": 350})
    assert events[0]["type"] == "error" and events[0]["error"]["code"] == "no_speech"
    assert events[-1]["type"] == "response.done" and events[-1]["response"]["status"] == "failed"
    assert types(w.client("response.cancel")) == ["error"]                 # nothing left in progress


def test_random_client_events_get_replies_or_errors_never_a_crash():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from nodes.realtime import RealtimeSession as R

    leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
    value = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4)),
                         max_leaves=12)
    event = st.fixed_dictionaries({"type": st.sampled_from(sorted(R.HANDLERS))},
                                  optional={k: value for k in ("session", "audio", "item", "event_id")})

    @hypothesis.settings(max_examples=150, deadline=None)
    @hypothesis.given(st.lists(event, max_size=6))
    def run(events):
        w = Wire()
        for e in events:
            w.rt.receive(json.dumps(e))              # raises nothing: a reply or an error event
        assert all(isinstance(e.get("type"), str) for e in w.sent)
    run()


FIELDS = ["type", "audio", "input", "output", "format", "rate", "turn_detection", "create_response",
          "output_modalities", "instructions", "role", "content", "text", "id"]


# --- the official SDK against graphs/serve.yaml ------------------------------------------------

def _question_24k() -> np.ndarray:
    """examples/question.wav as the Realtime API's default input: pcm16 at 24 kHz, then 1.5 s of
    silence so the server VAD hears the question end."""
    import soxr
    from test_gateway import QUESTION, ws_client

    question = ws_client().read_question(str(QUESTION))                      # int16 at 16 kHz
    audio = soxr.resample(question.astype(np.float32) / 32768, 16000, 24000)
    audio = np.concatenate([audio, np.zeros(36000, np.float32)])
    return np.clip(np.rint(audio * 32768), -32768, 32767).astype(np.int16)


def _speak(conn, audio: np.ndarray) -> None:
    for i in range(0, len(audio), 2400):                                    # 100 ms events
        conn.input_audio_buffer.append(audio=pcm_b64(audio[i:i + 2400]))


def _until(conn, log: list, stop) -> None:
    for event in conn:
        log.append(event)
        assert event.type != "error", event
        if stop(event):
            return
    raise AssertionError("the connection closed")


def wait_listening(port: int, timeout_s: float = 120) -> None:
    """The graph's other nodes may still be loading: wait until the gateway accepts connections."""
    import socket
    import time
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as probe:
            up = probe.connect_ex(("127.0.0.1", port)) == 0
        if up:
            http_get(port, "/healthz")            # (a whole request: no half-open handshake in the log)
            return
        assert time.monotonic() < deadline, "the gateway never listened"
        time.sleep(0.05)


def http_get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def check_health_and_metrics(ops: dict, graph) -> None:
    """/healthz and /metrics of the gateway after the four exchanges (one of them cancelled)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = ops["/healthz"]
    health = json.loads(body)
    assert status == 200 and health["ok"] and health["ready"], health
    assert set(health["nodes"]) == set(graph.nodes) and all(n["up"] for n in health["nodes"].values())
    assert health["sessions"] == 1
    status, text = ops["/metrics"]
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("omniflow_sessions_connected", ())] == 1
    assert samples[("omniflow_sessions_total", (("protocol", "realtime"),))] == 1
    assert samples[("omniflow_turns_total", ())] == 3                         # the cancelled one is not a turn
    assert samples[("omniflow_first_audio_seconds_count", ())] == 4           # each question's answer began
    assert samples[("omniflow_first_audio_seconds_sum", ())] > 0
    assert ("omniflow_playback_stalls_total", ()) in samples
    assert samples[("omniflow_decode_steps_total", (("node", "backbone"),))] > 0
    assert samples[("omniflow_decode_seconds_total", (("node", "backbone"),))] > 0
    for node in graph.nodes:
        assert samples[("omniflow_node_up", (("node", node),))] == 1
        assert samples[("omniflow_node_restarts_total", (("node", node),))] == 0
        assert ("omniflow_refused_peers_total", (("node", node),)) in samples
    assert samples[("omniflow_node_frames_in_total", (("node", "whisper"),))] >= 3


def test_openai_sdk_spoken_barge_in_and_typed_exchanges(demo_home, tmp_path):
    openai = pytest.importorskip("openai", reason="the test drives the official SDK: pip install 'openai[realtime]'")
    from test_gateway import free_port, run_server, serve_graph

    port = free_port()
    graph = serve_graph(tmp_path, port)
    graph.nodes["backbone"].params["max_speed"] = 1.0          # real-time answers: room to barge in
    graph.nodes["gateway"].params["idle_timeout_s"] = 10.0     # (ends the run once the client has gone)
    question = _question_24k()

    def converse():
        wait_listening(port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        log: list = []
        with client.realtime.connect(model="mini-omni") as conn:
            _until(conn, log, lambda e: e.type == "session.created")
            conn.session.update(session={"type": "realtime", "instructions": "You are terse.", "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": {"type": "server_vad"}},
                "output": {"format": {"type": "audio/pcm", "rate": 24000}}}})
            _until(conn, log, lambda e: e.type == "session.updated")
            _speak(conn, question)                                       # 1: a spoken question, answered
            _until(conn, log, lambda e: e.type == "response.done")
            spoken = len(log)
            _speak(conn, question)                                       # 2: asked, then talked over
            _until(conn, log, lambda e: e.type == "response.output_audio.delta")
            _speak(conn, question)
            _until(conn, log, lambda e: e.type == "response.done")      # (2's, cancelled)
            _until(conn, log, lambda e: e.type == "response.done")      # 3's
            barge = len(log)
            conn.conversation.item.create(item={"type": "message", "role": "user",
                                                "content": [{"type": "input_text", "text": "What is the capital of France?"}]})
            conn.response.create()                                      # 4: typed
            _until(conn, log, lambda e: e.type == "response.done")
            ops = {path: http_get(port, path) for path in ("/healthz", "/metrics")}   # while the run goes on
        return log, spoken, barge, ops

    log, spoken, barge, ops = run_server(graph, converse, in_process=True)
    check_health_and_metrics(ops, graph)

    def response(events):
        kinds = [e.type for e in events]
        audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
        transcript = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        done = [e for e in events if e.type == "response.done"]
        return kinds, audio, transcript, done

    kinds, audio, transcript, [done] = response(log[:spoken])
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "response.created", "response.output_audio.done"):
        assert kind in kinds
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("response.created") \
        < kinds.index("response.output_audio.delta")
    assert done.response.status == "completed" and len(audio) > 0 and len(audio) % (2 * 2048) == 0
    assert transcript and done.response.output[0].content[0].transcript == transcript

    kinds, audio, _, dones = response(log[spoken:barge])
    assert [d.response.status for d in dones] == ["cancelled", "completed"]
    assert dones[0].response.status_details.reason == "turn_detected"
    cut = kinds.index("response.done")
    assert "input_audio_buffer.speech_started" in kinds[:cut]          # the barge-in, before the cancel
    later = [e for e in log[spoken:barge][cut:] if getattr(e, "response_id", None) == dones[0].response.id]
    assert later == [], "output of the cancelled answer after its response.done"
    assert len(audio) > 0

    kinds, audio, transcript, [done] = response(log[barge:])
    assert kinds[:2] == ["conversation.item.added", "conversation.item.done"] and "response.created" in kinds
    assert done.response.status == "completed" and len(audio) > 0 and transcript


def test_a_barge_in_whose_turn_notice_comes_first_still_says_speech_started_before_the_cancel():
    w = Wire()
    w.node({"type": "speech", "event": "started", "turn": 0, "audio_ms": 0})
    w.node({"type": "speech", "event": "stopped", "turn": 0, "audio_ms": 900})
    w.node(np.ones(8, np.float32), turn=0)
    assert w.node(json.dumps({"type": "turn", "turn": 1})) == []          # the bus's notice, before the VAD's event
    events = w.node({"type": "speech", "event": "started", "turn": 0, "audio_ms": 2000})
    assert types(events)[0] == "input_audio_buffer.speech_started"
    assert events[-1]["type"] == "response.done" and events[-1]["response"]["status"] == "cancelled"
    assert w.node(np.ones(8, np.float32), turn=0) == []
