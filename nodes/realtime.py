"""The OpenAI Realtime API (GA event names) on the gateway: `ws://HOST:PORT/v1/realtime`.

Existing Realtime clients talk to a running graph unchanged; the official Python SDK, for one:

    client = openai.OpenAI(base_url="http://127.0.0.1:8765/v1", api_key="KEY")   # (any key without auth)
    with client.realtime.connect(model="mini-omni") as conn:                      # ws://.../v1/realtime?model=
        conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad"}}}})
        conn.input_audio_buffer.append(audio=base64_pcm16_24khz)
        for event in conn: ...        # input_audio_buffer.speech_started ... response.output_audio.delta ... response.done

This module is a translator and nothing else: each connection's client events become the same
events the gateway's own protocol makes ("pcm", "text", "flush", "cancel"), and what the gateway's
node sends back (answer audio with its turn, text pieces, end of turn, the VAD's speech events, a
new turn) becomes Realtime server events. Turns stay the node's business (nodes/gateway.py).

Client events
    session.update                  audio.input.format {type: audio/pcm, rate} (24 kHz as OpenAI; any rate
                                    8-48 kHz is accepted and resampled by the VAD), audio.output.format
                                    (audio/pcm, 24 kHz only), audio.input.turn_detection {type: server_vad}
                                    or null; instructions, voice and tools are ignored with a warning
    input_audio_buffer.append       {audio: base64 pcm16 little-endian}
    input_audio_buffer.commit       server_vad: the utterance in progress ends here (the VAD flushes);
                                    none: the buffered audio becomes a user item, answered at response.create
                                    as one utterance (pcm meta segment: client: the VAD trims, never splits)
    input_audio_buffer.clear        none: drop the buffered audio (server_vad: audio already went to the
                                    VAD as it came, so only the reply is sent)
    conversation.item.create        {item: {type: message, role: user, content: [{type: input_text, text}]}}
    response.create                 answer the items created since the last response (typed text, committed audio)
    response.cancel                 stop the answer in progress (the graph starts a new turn)

Server events
    session.created / session.updated, input_audio_buffer.speech_started / .speech_stopped /
    .committed / .cleared, conversation.item.added / .done, response.created,
    response.output_item.added, response.content_part.added, response.output_audio.delta (base64
    pcm16, 24 kHz), response.output_audio_transcript.delta, response.output_audio.done,
    response.output_audio_transcript.done, response.content_part.done, response.output_item.done,
    response.done (status completed | cancelled | failed), error.

Barge-in, as OpenAI's server VAD does it: speech heard during an answer sends speech_started and
ends that answer with response.done {status: cancelled, status_details.reason: turn_detected};
nothing of it is sent afterwards (the graph also drops it: the VAD started a new turn).

What is not here: the model answers each utterance or prompt on its own (Mini-Omni has no
conversation memory, so earlier items are not context), there is no input transcription, no
function calling, and the graph's VAD parameters apply to every session (a session's
threshold/silence_duration_ms are reported back but not applied).
"""
from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from omniflow.audio import to_int16
from omniflow.model.units import SNAC_RATE

PATH = "/v1/realtime"
OUTPUT_RATE = SNAC_RATE              # Hz: the Realtime API's pcm16 rate, and SNAC's
DEFAULT_INPUT_RATE = OUTPUT_RATE     # Hz: the Realtime API's default input rate (its pcm16 rate)
MIN_RATE, MAX_RATE = 8000, 48000     # Hz: input rates accepted (the VAD resamples to 16 kHz)
MAX_BUFFER_S = 60.0                  # turn_detection none: longest audio held before a commit
MODEL = "mini-omni"
IGNORED = ("instructions", "voice", "tools", "tool_choice", "prompt", "tracing", "truncation",
           "max_output_tokens", "include")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class ClientError(ValueError):
    """A client event that cannot be applied: becomes an `error` event, the session goes on."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


@dataclass
class _Response:
    """The answer in progress: bound to a graph turn once the node says which one it is."""
    id: str
    item_id: str
    turn: int | None                  # None: a prompt sent, the node has not yet said its turn
    transcript: list[str] = field(default_factory=list)
    audio_bytes: int = 0


@dataclass
class _Config:
    input_rate: int = DEFAULT_INPUT_RATE
    server_vad: bool = True
    turn_detection: dict | None = field(default_factory=lambda: {"type": "server_vad", "create_response": True,
                                                                "interrupt_response": True})


class RealtimeSession:
    """One Realtime connection. `to_node(event)` queues a gateway event (the gateway adds the session),
    `to_client(text)` queues a message for the client; both are called on the server's loop thread."""

    def __init__(self, session: str, to_node: Callable[..., None], to_client: Callable[[str], None], log,
                 model: str = MODEL):
        self.session, self.to_node, self.to_client, self.log = session, to_node, to_client, log
        self.model = model
        self.config = _Config()
        self.response: _Response | None = None
        self.awaiting: list[str] = []          # kinds of items response.create will send: "text" | "audio"
        self.pending_text: list[str] = []      # typed items not answered yet
        self.buffer: list[np.ndarray] = []     # turn_detection none: appended, not yet committed
        self.committed: list[np.ndarray] = []  # committed audio items not answered yet
        self.dropped_upto = -1                 # output of turns <= this is of a cancelled answer
        self.speech_item: str | None = None    # the user item the VAD is hearing now
        self.last_item: str | None = None
        self.warned: set[str] = set()
        self.got_audio = False

    # --- server -> client ------------------------------------------------------------------
    def _send(self, kind: str, **fields: Any) -> None:
        self.to_client(json.dumps({"type": kind, "event_id": _id("event"), **fields}, ensure_ascii=False))

    def error(self, message: str, code: str = "invalid_value", param: str | None = None,
              event_id: str | None = None, kind: str = "invalid_request_error") -> None:
        self.log.warning("session %s (realtime): %s", self.session, message)
        self._send("error", error={"type": kind, "code": code, "message": message, "param": param,
                                   "event_id": event_id})

    def _session_object(self) -> dict:
        c = self.config
        return {"type": "realtime", "object": "realtime.session", "id": self.session, "model": self.model,
                "output_modalities": ["audio"], "instructions": "",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": c.input_rate},
                                    "turn_detection": c.turn_detection, "transcription": None},
                          "output": {"format": {"type": "audio/pcm", "rate": OUTPUT_RATE}, "voice": "default"}}}

    def greet(self) -> None:
        self._send("session.created", session=self._session_object())

    # --- client -> server ------------------------------------------------------------------
    def receive(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            return self.error("the Realtime API takes JSON text messages; send audio base64-encoded in "
                              "input_audio_buffer.append", code="invalid_message")
        try:
            event = json.loads(message)
        except ValueError:
            return self.error("a message must be a JSON object, e.g. {\"type\": \"response.create\"}",
                              code="invalid_json")
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return self.error("a client event must be a JSON object with a string 'type'", code="invalid_event")
        handler = self.HANDLERS.get(event["type"])
        event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        if handler is None:
            return self.error(f"unsupported event type {event['type']!r}: this server takes "
                              f"{', '.join(sorted(self.HANDLERS))}", code="unknown_event", param="type",
                              event_id=event_id)
        try:
            handler(self, event)
        except ClientError as e:
            self.error(str(e), e.code, e.param, event_id)
        except (TypeError, AttributeError, KeyError, ValueError) as e:     # a field of the wrong shape
            self.error(f"malformed {event['type']} event ({type(e).__name__}: {e}): see the OpenAI Realtime "
                       "API reference for its fields", code="invalid_event", event_id=event_id)

    def _session_update(self, event: dict) -> None:
        s = event.get("session")
        if not isinstance(s, dict):
            raise ClientError("session.update needs a 'session' object", param="session")
        if s.get("type", "realtime") != "realtime":
            raise ClientError(f"session type {s.get('type')!r} is not served: only 'realtime'", param="session.type")
        for key in IGNORED:
            if s.get(key) and key not in self.warned:
                self.warned.add(key)
                self.log.warning("session %s (realtime): session.%s is ignored: Mini-Omni takes no %s",
                                 self.session, key, "system prompt" if key == "instructions" else key)
        modalities = s.get("output_modalities")
        if modalities is not None and "audio" not in modalities:
            raise ClientError("this model always answers with audio (and its transcript): "
                              "output_modalities must include 'audio'", param="session.output_modalities")
        audio = s.get("audio") or {}
        if not isinstance(audio, dict):
            raise ClientError("session.audio must be an object", param="session.audio")
        inp, out = audio.get("input") or {}, audio.get("output") or {}
        rate, server_vad, detection = self.config.input_rate, self.config.server_vad, self.config.turn_detection
        if "format" in inp:
            rate = self._input_format(inp["format"])
        if "format" in out:
            f = out["format"] or {}
            if f.get("type", "audio/pcm") != "audio/pcm" or f.get("rate", OUTPUT_RATE) != OUTPUT_RATE:
                raise ClientError(f"output format {f!r} is not served: use {{'type': 'audio/pcm', 'rate': "
                                  f"{OUTPUT_RATE}}}", code="unsupported_format", param="session.audio.output.format")
        if "turn_detection" in inp:
            detection = inp["turn_detection"]
            if detection is None:
                server_vad = False
            elif isinstance(detection, dict) and detection.get("type") == "server_vad":
                for key in ("create_response", "interrupt_response"):
                    if detection.get(key) is False:
                        raise ClientError(f"turn_detection.{key}: false is not served: the graph answers "
                                          "every utterance and speech interrupts the answer; use "
                                          "turn_detection null to decide turns yourself",
                                          param=f"session.audio.input.turn_detection.{key}")
                server_vad = True
                detection = {**detection, "create_response": True, "interrupt_response": True}
            else:
                raise ClientError(f"turn_detection {detection!r} is not served: use {{'type': 'server_vad'}} "
                                  "or null", param="session.audio.input.turn_detection")
        if rate != self.config.input_rate and self.got_audio:
            raise ClientError("the input rate cannot change once audio was sent: reconnect to use another",
                              param="session.audio.input.format")
        if server_vad and not self.config.server_vad and self.buffer:
            self.buffer.clear()                        # (OpenAI too starts the VAD on a fresh buffer)
        self.config = _Config(rate, server_vad, detection)
        self._send("session.updated", session=self._session_object())

    @staticmethod
    def _input_format(f: Any) -> int:
        if not isinstance(f, dict) or f.get("type", "audio/pcm") != "audio/pcm":
            raise ClientError(f"input format {f!r} is not served: use {{'type': 'audio/pcm', 'rate': 24000}} "
                              "(pcm16 little-endian mono)", code="unsupported_format",
                              param="session.audio.input.format")
        rate = f.get("rate", DEFAULT_INPUT_RATE)
        if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
            raise ClientError(f"input rate {rate!r} is not served: an integer {MIN_RATE}..{MAX_RATE} Hz "
                              f"(the API's own is {DEFAULT_INPUT_RATE})", param="session.audio.input.format.rate")
        return rate

    def _append(self, event: dict) -> None:
        now = time.monotonic_ns()
        data = event.get("audio")
        if not isinstance(data, str):
            raise ClientError("input_audio_buffer.append needs 'audio': base64 pcm16", param="audio")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ClientError("'audio' is not valid base64", param="audio") from None
        if len(raw) % 2:
            raise ClientError(f"'audio' decodes to {len(raw)} bytes, not whole pcm16 samples (2 bytes each)",
                              param="audio")
        audio = np.frombuffer(raw, "<i2").astype(np.int16)                 # (N,)
        if not len(audio):
            return
        self.got_audio = True
        if self.config.server_vad:
            self.to_node("pcm", audio, self.config.input_rate, now)
            return
        held = sum(len(b) for b in self.buffer) + len(audio)
        if held > MAX_BUFFER_S * self.config.input_rate:
            raise ClientError(f"the input buffer holds more than {MAX_BUFFER_S:.0f} s: commit it "
                              "(input_audio_buffer.commit) or clear it", code="buffer_too_large")
        self.buffer.append(audio)

    def _commit(self, event: dict) -> None:
        if self.config.server_vad:
            self.to_node("flush", self.config.input_rate, time.monotonic_ns())   # speech_stopped follows
            return
        if not self.buffer:
            raise ClientError("the input audio buffer is empty: append audio before committing",
                              code="input_audio_buffer_commit_empty")
        self.committed.append(np.concatenate(self.buffer))
        self.buffer.clear()
        item = _id("item")
        self._send("input_audio_buffer.committed", item_id=item, previous_item_id=self.last_item)
        self._user_item(item, {"type": "input_audio", "transcript": None})

    def _clear(self, event: dict) -> None:
        self.buffer.clear()
        self._send("input_audio_buffer.cleared")

    def _item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message" or item.get("role") != "user":
            raise ClientError("conversation.item.create takes a user message: {'type': 'message', 'role': "
                              "'user', 'content': [{'type': 'input_text', 'text': '...'}]}", param="item")
        content = item.get("content")
        texts = [c.get("text") for c in content or [] if isinstance(c, dict) and c.get("type") == "input_text"]
        if not isinstance(content, list) or len(texts) != len(content) or not texts \
                or not all(isinstance(t, str) for t in texts):
            raise ClientError("a user item's content must be input_text parts (typed text); send audio "
                              "with input_audio_buffer.append", param="item.content")
        text = " ".join(texts).strip()
        if not text:
            raise ClientError("the item's text is empty", param="item.content")
        self.pending_text.append(text)
        self._user_item(item.get("id") if isinstance(item.get("id"), str) else _id("item"),
                        {"type": "input_text", "text": text})

    def _user_item(self, item: str, content: dict) -> None:
        obj = {"id": item, "type": "message", "object": "realtime.item", "role": "user", "status": "completed",
               "content": [content]}
        self._send("conversation.item.added", previous_item_id=self.last_item, item=obj)
        self._send("conversation.item.done", previous_item_id=self.last_item, item=obj)
        self.last_item = item

    def _response_create(self, event: dict) -> None:
        if self.response is not None:
            raise ClientError(f"Conversation already has an active response in progress: {self.response.id}. "
                              "Wait until the response is finished before creating a new one.",
                              code="conversation_already_has_active_response")
        now = time.monotonic_ns()
        if self.committed:                   # turn_detection none: the committed audio, as one stream
            audio = np.concatenate(self.committed)
            self.committed.clear()
            step = self.config.input_rate // 10                          # 100 ms events
            for i in range(0, len(audio), step):
                self.to_node("pcm", audio[i:i + step], self.config.input_rate, now, {"segment": "client"})
            self.to_node("flush", self.config.input_rate, now)
            self.awaiting.append("audio")
        if self.pending_text:
            self.to_node("text", " ".join(self.pending_text), now)
            self.pending_text.clear()
            self.awaiting.append("text")
        if not self.awaiting:
            raise ClientError("nothing to answer: create a user item (conversation.item.create) or commit "
                              "audio first (with server_vad, speech is answered by itself)",
                              code="response_create_empty")
        self._start_response(None)

    def _response_cancel(self, event: dict) -> None:
        if self.response is None:
            raise ClientError("there is no response in progress to cancel", code="response_cancel_not_active")
        self.to_node("cancel")
        self._finish("cancelled", {"type": "cancelled", "reason": "client_cancelled"})

    HANDLERS: dict[str, Callable[["RealtimeSession", dict], None]] = {
        "session.update": _session_update,
        "input_audio_buffer.append": _append,
        "input_audio_buffer.commit": _commit,
        "input_audio_buffer.clear": _clear,
        "conversation.item.create": _item_create,
        "response.create": _response_create,
        "response.cancel": _response_cancel,
    }

    # --- responses -------------------------------------------------------------------------
    def _start_response(self, turn: int | None) -> None:
        r = self.response = _Response(_id("resp"), _id("item"), turn)
        self._send("response.created", response=self._response_object(r, "in_progress"))
        item = self._item_object(r, "in_progress")
        self._send("response.output_item.added", response_id=r.id, output_index=0, item=item)
        self._send("conversation.item.added", previous_item_id=self.last_item, item=item)
        self._send("response.content_part.added", response_id=r.id, item_id=r.item_id, output_index=0,
                   content_index=0, part={"type": "audio", "transcript": ""})
        self.last_item = r.item_id

    def _response_object(self, r: _Response, status: str, details: dict | None = None,
                         output: list | None = None) -> dict:
        return {"id": r.id, "object": "realtime.response", "status": status, "status_details": details,
                "output": output or [], "output_modalities": ["audio"], "conversation_id": self.session,
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": OUTPUT_RATE}, "voice": "default"}},
                "usage": None, "metadata": None}

    def _item_object(self, r: _Response, status: str) -> dict:
        content = [{"type": "output_audio", "transcript": "".join(r.transcript)}] if status != "in_progress" else []
        return {"id": r.item_id, "type": "message", "object": "realtime.item", "role": "assistant",
                "status": status, "content": content}

    def _finish(self, status: str, details: dict | None = None) -> None:
        """End the response in progress: every done event, then response.done with `status`."""
        r, self.response = self.response, None
        if r is None:
            return
        if r.turn is not None:
            self.dropped_upto = max(self.dropped_upto, r.turn)
        transcript = "".join(r.transcript)
        ids = {"response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0}
        self._send("response.output_audio.done", **ids)
        self._send("response.output_audio_transcript.done", **ids, transcript=transcript)
        self._send("response.content_part.done", **ids, part={"type": "audio", "transcript": transcript})
        item_status = "completed" if status == "completed" else "incomplete"
        item = self._item_object(r, item_status)
        self._send("response.output_item.done", response_id=r.id, output_index=0, item=item)
        self._send("conversation.item.done", previous_item_id=None, item=item)
        self._send("response.done", response=self._response_object(r, status, details, [item]))

    def _current(self, turn: int) -> _Response | None:
        """The response that output of `turn` belongs to (starting one if the graph began answering a
        turn nobody asked for here, e.g. a second utterance in committed audio); None: drop it."""
        r = self.response
        if r is not None and r.turn == turn:
            return r
        if turn <= self.dropped_upto or (r is not None and (r.turn is None or r.turn > turn)):
            return None                              # an older (cancelled or superseded) answer
        if r is not None:                            # the graph moved on to a newer turn
            self._finish("cancelled", {"type": "cancelled", "reason": "turn_detected"})
        self._start_response(turn)
        return self.response

    # --- the gateway node -> client --------------------------------------------------------
    def deliver(self, message: Any, turn: int | None = None) -> None:
        """What the gateway node sends this session: an answer audio chunk (with its turn), or a
        message of the gateway's protocol (a JSON string) or of its internal ones (a dict)."""
        if isinstance(message, np.ndarray):
            r = self._current(turn) if turn is not None else self.response
            if r is None or not message.size:
                return
            pcm = to_int16(np.asarray(message).reshape(-1)).astype("<i2").tobytes()
            r.audio_bytes += len(pcm)
            self._send("response.output_audio.delta", response_id=r.id, item_id=r.item_id, output_index=0,
                       content_index=0, delta=base64.b64encode(pcm).decode("ascii"))
            return
        msg = json.loads(message) if isinstance(message, str) else message
        kind, turn = msg.get("type"), msg.get("turn")
        if kind == "text":
            r = self._current(turn)
            if r is not None:
                r.transcript.append(msg["text"])
                self._send("response.output_audio_transcript.delta", response_id=r.id, item_id=r.item_id,
                           output_index=0, content_index=0, delta=msg["text"])
        elif kind == "end":
            r = self._current(turn)
            if r is not None:
                self._finish("completed")
        elif kind == "turn":                          # a new turn began: an older answer is over
            r = self.response
            # (with server_vad the VAD's speech_started follows on its own path and cancels it then,
            # so the client sees speech_started before response.done, as from OpenAI's server)
            if r is not None and r.turn is not None and turn > r.turn and not self.config.server_vad:
                self._finish("cancelled", {"type": "cancelled", "reason": "turn_detected"})
        elif kind == "accepted":                      # the node took a typed prompt as `turn`
            self._bind(turn, "text")
        elif kind == "speech":
            self._speech(msg)
        elif kind == "error":
            self.error(msg.get("error", "the graph failed on this turn"), code="server_error", kind="server_error")
            r = self.response
            if r is not None and (turn is None or r.turn in (None, turn)):
                self._finish("failed", {"type": "failed", "error": {"type": "server_error",
                                                                   "message": msg.get("error", "")}})

    def _bind(self, turn: int, source: str) -> None:
        """The node said which turn answers an item response.create sent."""
        if source not in self.awaiting:
            self.dropped_upto = max(self.dropped_upto, turn)   # its response was cancelled meanwhile
            return
        self.awaiting.remove(source)
        r = self.response
        if r is not None and r.turn is None:
            r.turn = turn
        elif r is not None and turn > r.turn:         # a second item of one response.create: its answer
            r.turn = turn                             # replaces the first (the graph starts a new turn)
        else:
            self.dropped_upto = max(self.dropped_upto, turn)

    def _speech(self, msg: dict) -> None:
        """The VAD heard speech start or stop (server_vad), or found the utterance of committed audio."""
        event, turn, ms = msg.get("event"), msg.get("turn"), int(msg.get("audio_ms", 0))
        if not self.config.server_vad:
            if event == "stopped" and "audio" in self.awaiting:
                self._bind(turn, "audio")
            elif event == "silence" and "audio" in self.awaiting:    # committed audio without speech
                self.awaiting.remove("audio")
                self.error("the committed audio holds no speech the VAD heard: nothing to answer",
                           code="no_speech")
                if self.response is not None and self.response.turn is None and not self.awaiting:
                    self._finish("failed", {"type": "failed", "error": {"type": "invalid_request_error",
                                                                       "code": "no_speech"}})
            return
        if event == "started":
            self.speech_item = _id("item")
            self._send("input_audio_buffer.speech_started", audio_start_ms=ms, item_id=self.speech_item)
            if self.response is not None:            # barge-in: speech during an answer cancels it
                self._finish("cancelled", {"type": "cancelled", "reason": "turn_detected"})
                self.awaiting.clear()
        elif event == "stopped":
            item = self.speech_item or _id("item")
            self.speech_item = None
            self._send("input_audio_buffer.speech_stopped", audio_end_ms=ms, item_id=item)
            self._send("input_audio_buffer.committed", item_id=item, previous_item_id=self.last_item)
            self._user_item(item, {"type": "input_audio", "transcript": None})
            if self.response is not None:
                self._finish("cancelled", {"type": "cancelled", "reason": "turn_detected"})
            if turn > self.dropped_upto:
                self._start_response(turn)
