"""WebSocket gateway: many clients talk to one running graph, audio and text both ways.

    gateway:
      use: nodes.gateway:Gateway
      params: {host: 0.0.0.0, port: 8765, end_after: [pcm, text]}
      inputs:
        pcm:  {from: vocoder/pcm, feedback: true}     # answer audio (24 kHz) back to its client
        text: {from: detok/text, feedback: true}      # answer text pieces back to its client
      # outputs: audio (client PCM -> the VAD), text (typed prompts -> the backbone)

Every connection is a session: `ws://HOST:PORT/?session=alice` names it (letters, digits, `._-`,
at most 64), otherwise it is a fresh uuid. A name already connected is refused; a name used by an
earlier connection gets a suffix (`alice~2`): the graph's nodes may still hold that session's state.

Client -> server
    binary                    mono PCM, little-endian, `dtype` samples at `rate` Hz (the params), any size
    {"type": "start", "rate": 24000, "format": "f32", "output_format": "s16"}
                              before any audio: this session's input rate/format and answer format
                              (formats: "s16"/"int16" or "f32"/"float32"; output_format defaults to
                              params.output_dtype)
    {"type": "text", "text": "..."}   a typed prompt: a new turn, emitted on output `text`
    {"type": "flush"}         no more audio for now: the utterance in progress ends here (the VAD
                              flushes, as after a silence)

Server -> client
    {"type": "session", "session": S, "input": {"rate", "format"}, "output": {"rate", "format"}}
                              on connect, and again after a "start"
    binary                    answer audio of the current turn, in the session's output format
    {"type": "text", "text": "...", "turn": N}      answer text pieces, streamed
    {"type": "end", "turn": N}                      turn N is complete: the last frame of every
                                                    port in `end_after` has been sent
    {"type": "turn", "turn": N}                     turn N began (a spoken or typed question,
                                                    maybe over an answer): stop playing anything older
    {"type": "error", "error": "...", "turn": N}    turn N failed (the error names the limit or the
                                                    fault); it gets no "end"; the session goes on
    {"type": "error", "error": "..."}               a malformed message (the session goes on)

Turns. Every question is a new turn numbered by the control bus (omniflow/turns.py): the VAD asks
for one when it hears speech, this node asks for one when a typed prompt comes (the prompt goes
out once the bus granted it). Every announced turn reaches `reset(session, turn)` here, which
tells the client; the runtime drops answer frames of older turns and this node drops any it still
sees, so audio/text of an interrupted answer is never sent. An "error" frame for a turn (some node
failed on it, or its input broke a limit) becomes the client's error message for that turn. A
client that disconnects ends its session on the bus (`end_session`), so the backbone frees its
slot and every node forgets the session.

Limits where input enters: a typed prompt longer than `max_prompt_chars`, audio that looks like
float32 sent as s16 (or s16 as f32), and malformed fields get an error naming the limit at once.

Threads. The WebSocket server is an asyncio loop on a background thread. Received messages go to
the node through a thread-safe queue that `step()` drains (as `PcmClientSource` drains its ZeroMQ
socket); answers go to the loop with `call_soon_threadsafe`. The node never learns whether it runs
in-process or in its own process. Needs the `websockets` package (`pip install 'omniflow[web]'`).
"""
from __future__ import annotations

import asyncio
import json
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

import msgspec
from msgspec import Meta
import numpy as np

from omniflow.audio import PCM_DTYPES, as_float32, to_int16
from omniflow.frame import Frame
from omniflow.model.units import SNAC_RATE, WHISPER_RATE
from omniflow.node import Node
from omniflow.params import NonNegative, Port, Positive
from omniflow.turns import ENDED_KEPT, GRANT_RETRY_S, Bounded, ask_turn, end_session

from . import ops, realtime, web

POLL_S = 0.02                  # an idle step waits at most this long for a client message
MAX_EVENTS_PER_STEP = 64       # then return, so the runtime can read its inputs and control channel
GRANT_GIVE_UP_S = 30.0         # s: a typed prompt whose turn is still not granted after this long of asking
                               # again (every GRANT_RETRY_S) gets its client an error: the bus is not answering
SETUP_TIMEOUT_S = 10.0         # the server thread must be listening within this
STOP_TIMEOUT_S = 5.0           # teardown waits this long for connections to close
NAMES_KEPT = 4 * ENDED_KEPT    # client-chosen session names remembered (see _Server.names_used)
SESSION_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
FORMATS = {"s16": "int16", "int16": "int16", "f32": "float32", "float32": "float32"}
DTYPES = PCM_DTYPES
SHORT = {"int16": "s16", "float32": "f32"}        # the names the protocol reports
MAX_RATE = 384_000             # Hz: anything higher is a client bug, not audio
SampleRate = Annotated[int, Meta(ge=1, le=MAX_RATE)]   # Hz
SNIFFED_MESSAGES = 4           # a session's first binary messages are checked for a wrong sample format


def _import_websockets():
    try:
        import websockets  # noqa: F401
    except ImportError:
        raise ImportError("the gateway needs the 'websockets' package. Fix: pip install 'omniflow[web]' "
                          "(or pip install 'websockets>=12')") from None
    try:                                        # websockets >= 13: the new asyncio implementation
        from websockets.asyncio.server import serve
    except ImportError:                         # websockets 12
        from websockets.server import serve
    from websockets.exceptions import ConnectionClosed
    return serve, ConnectionClosed


# --- the asyncio side: connections ------------------------------------------------------------

@dataclass
class _Connection:
    """One client, owned by the loop thread."""
    session: str
    ws: Any
    rate: int
    dtype: str                      # input sample format: "int16" | "float32"
    out_dtype: str                  # answer sample format
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    got_audio: bool = False
    sniffed: int = 0                # binary messages checked for a wrong sample format
    closing: bool = False           # being disconnected for reading too slowly
    realtime: Any = None            # a nodes.realtime.RealtimeSession: this client speaks the Realtime API


class _Server:
    """The WebSocket server on its own thread and event loop. Events for the node go to `events`:
    ("open", session) | ("pcm", session, (N,) array, rate, t_ns) | ("text", session, str, t_ns)
    | ("flush", session, rate, t_ns) | ("close", session)."""

    def __init__(self, params, events: queue.SimpleQueue, log):
        self.p, self.events, self.log = params, events, log
        self.connections: dict[str, _Connection] = {}     # loop thread only
        # loop thread only: name -> connections. A name connecting again gets a fresh session id
        # (name~2, ...): the bus ended the old one and drops its requests. Bounded (a client could
        # invent names forever); a name forgotten here is long over on the bus too (it keeps ENDED_KEPT).
        self.names_used = Bounded(NAMES_KEPT)
        self.open_count = 0                               # read by the node thread (an int: atomic)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None                      # the bound port (params.port 0: a free one)
        self.routes: dict = {}                            # HTTP path -> () -> (status, content type, body)
        self.access = web.Access(params.api_keys, params.allowed_origins, log)   # who gets in
        self.tls = web.tls_context(params.tls_cert, params.tls_key)
        web.warn_exposure(params.host, self.access, self.tls, log)
        self.ops = ops.Ops(lambda: self.open_count, self.access.refused)       # /healthz, /metrics
        self.routes.update({"/healthz": self.ops.healthz, "/metrics": self.ops.metrics})
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gateway-ws", daemon=True)

    # --- lifecycle (node thread) ----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(SETUP_TIMEOUT_S):
            raise RuntimeError(f"the gateway's WebSocket server did not start within {SETUP_TIMEOUT_S} s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(STOP_TIMEOUT_S)

    def send(self, session: str, message: str | dict | np.ndarray, turn: int | None = None) -> None:
        """Queue a message for `session`'s client (thread-safe; dropped if it has gone). A JSON
        string is this protocol's message; a dict is internal (only Realtime clients get it, as
        their events); audio carries its `turn`."""
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._deliver, session, message, turn)
            except RuntimeError:                  # the loop closed meanwhile: the server stopped
                pass

    # --- the loop thread ------------------------------------------------------------------
    @property
    def failed(self) -> BaseException | None:
        """Why the server thread ended on its own (None while it serves, or after stop())."""
        return self._error if self._ready.is_set() and not self._thread.is_alive() else None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:                # start() raises it in setup, step() later
            self._error = self._error or e
            self._ready.set()

    async def _serve(self) -> None:
        serve, self.ConnectionClosed = _import_websockets()
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        p = self.p
        try:
            server = await serve(self._handle, p.host, p.port, max_size=p.max_message_bytes,
                                 process_request=self._http, ssl=self.tls)
        except OSError as e:
            self._error = RuntimeError(f"the gateway cannot listen on {p.host}:{p.port}: {e.strerror}. Fix: "
                                       "choose a free port (params.port, 0 picks one) or another host")
            self._ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        ws, http = ("wss", "https") if self.tls else ("ws", "http")
        self.log.info("gateway listening on %s://%s:%d (input %s at %d Hz, answers as %s; the talk page: "
                      "%s://%s:%d/, the Realtime API: %s://%s:%d/v1/realtime; %s)", ws, p.host, self.port,
                      p.dtype, p.rate, p.output_dtype, http, p.host, self.port, ws, p.host, self.port,
                      "API keys required" if self.access.keys else "no API keys")
        self._ready.set()
        await self._stop.wait()
        server.close()                            # closes every connection (1001 going away)
        await server.wait_closed()

    def _http(self, connection, request):
        """Plain HTTP on the same port (the page, /healthz, /metrics); None: a WebSocket upgrade."""
        return web.respond(connection, request, self.routes, self.access)

    def _session_name(self, ws) -> tuple[str | None, str | None]:
        """(session, None) or (None, why it is refused)."""
        path = _request_path(ws)
        wanted = parse_qs(urlsplit(path).query).get("session", [None])[0]
        if wanted is None:
            return uuid.uuid4().hex, None
        if not SESSION_NAME.fullmatch(wanted):
            return None, (f"session name {wanted!r} is not allowed: use 1-64 letters, digits, '.', '_' "
                          "or '-'")
        if wanted in self.connections:
            return None, f"session {wanted!r} is already connected: use another name or close that connection"
        count = self.names_used.get(wanted, 0)
        self.names_used.add(wanted, count + 1)
        return (wanted if count == 0 else f"{wanted}~{count + 1}"), None

    async def _handle(self, ws, _path: str | None = None) -> None:
        if len(self.connections) >= self.p.max_sessions:
            session, refused = None, f"the server is full ({self.p.max_sessions} sessions): try again later"
        else:
            session, refused = self._session_name(ws)
        if refused is not None:
            await ws.send(json.dumps({"type": "error", "error": refused}))
            await ws.close(1008 if "full" not in refused else 1013, refused[:120])
            return
        p = self.p
        conn = _Connection(session, ws, rate=p.rate, dtype=p.dtype, out_dtype=p.output_dtype)
        if urlsplit(_request_path(ws)).path.rstrip("/") == realtime.PATH:
            conn.realtime = realtime.RealtimeSession(
                session, lambda kind, *args: self.events.put((kind, session, *args)), conn.outbox.put_nowait,
                self.log)
        self.connections[session] = conn
        self.ops.connected("omniflow" if conn.realtime is None else "realtime")
        self.open_count = len(self.connections)
        self.events.put(("open", session))
        self.log.info("session %s connected from %s", session, getattr(ws, "remote_address", "?"))
        sender = asyncio.ensure_future(self._send_loop(conn))
        self._greet(conn)
        try:
            async for message in ws:
                try:
                    self._receive(conn, message)
                except Exception as e:            # a bug here must not drop the connection
                    self.log.exception("session %s: a client message could not be handled", session)
                    self._error_reply(conn, f"the server could not handle that message ({type(e).__name__})")
        except self.ConnectionClosed:
            pass
        finally:
            del self.connections[session]
            self.open_count = len(self.connections)
            conn.outbox.put_nowait(None)
            sender.cancel()
            self.events.put(("close", session))
            self.log.info("session %s disconnected", session)

    async def _send_loop(self, conn: _Connection) -> None:
        try:
            while (message := await conn.outbox.get()) is not None:
                await conn.ws.send(message)
        except self.ConnectionClosed:
            pass

    def _deliver(self, session: str, message: str | dict | np.ndarray, turn: int | None = None) -> None:
        conn = self.connections.get(session)
        if conn is None or conn.closing:
            return                                 # the client has gone: its answer goes nowhere
        if conn.realtime is None and isinstance(message, dict):
            return                                 # internal: this protocol has no such message
        if conn.outbox.qsize() >= self.p.max_backlog:
            conn.closing = True
            self.log.warning("session %s reads too slowly (%d messages queued); closing it",
                             session, conn.outbox.qsize())
            asyncio.ensure_future(conn.ws.close(1008, "client too slow: answers piled up"))
            return
        if conn.realtime is not None:
            return conn.realtime.deliver(message, turn)
        if isinstance(message, np.ndarray):
            message = _encode_pcm(message, conn.out_dtype)
        conn.outbox.put_nowait(message)

    def _error_reply(self, conn: _Connection, why: str) -> None:
        self.log.warning("session %s: %s", conn.session, why)
        conn.outbox.put_nowait(json.dumps({"type": "error", "error": why}))

    def _greet(self, conn: _Connection) -> None:
        if conn.realtime is not None:
            return conn.realtime.greet()
        conn.outbox.put_nowait(json.dumps({
            "type": "session", "session": conn.session,
            "input": {"rate": conn.rate, "format": SHORT[conn.dtype]},
            "output": {"rate": self.p.output_rate, "format": SHORT[conn.out_dtype]}}))

    def _receive(self, conn: _Connection, message: str | bytes) -> None:
        if conn.realtime is not None:
            return conn.realtime.receive(message)
        now = time.monotonic_ns()
        if isinstance(message, bytes):
            wrong = None
            if conn.sniffed < SNIFFED_MESSAGES:            # the sample format the client meant?
                conn.sniffed += 1
                wrong = _sniff_format(message, conn.dtype)
            audio = wrong or _decode_pcm(message, conn.dtype)
            if isinstance(audio, str):
                self._error_reply(conn, audio)
            elif len(audio):
                conn.got_audio = True
                self.events.put(("pcm", conn.session, audio, conn.rate, now))
            return
        try:
            msg = json.loads(message)
        except ValueError:
            return self._error_reply(conn, "a text message must be JSON, e.g. {\"type\": \"text\", "
                                           "\"text\": \"hello\"}; audio goes in binary messages")
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "text":
            text = msg.get("text")
            if not isinstance(text, str) or not text.strip():
                return self._error_reply(conn, "a text message needs a non-empty string 'text'")
            if len(text) > self.p.max_prompt_chars:
                return self._error_reply(conn, f"the typed prompt is {len(text)} characters, more than "
                                               f"max_prompt_chars={self.p.max_prompt_chars}: send a shorter one")
            self.events.put(("text", conn.session, text, now))
        elif kind == "start":
            why = self._start(conn, msg)
            if why:
                return self._error_reply(conn, why)
            self._greet(conn)
        elif kind == "flush":
            self.events.put(("flush", conn.session, conn.rate, now))
        else:
            self._error_reply(conn, f"unknown message type {kind!r}: send 'start', 'text' or 'flush' "
                                    "as JSON, audio as binary")

    def _start(self, conn: _Connection, msg: dict) -> str | None:
        """Apply a start message; the reason it is refused, or None."""
        if conn.got_audio:
            return "'start' must come before any audio: the session's input format is fixed by then"
        rate = msg.get("rate", conn.rate)
        if isinstance(rate, bool) or not isinstance(rate, int) or not 0 < rate <= MAX_RATE:
            return f"'rate' must be a sample rate in Hz (an integer, 1..{MAX_RATE}), got {rate!r}"
        formats = {}
        for key, current in (("format", conn.dtype), ("output_format", conn.out_dtype)):
            value = msg.get(key, SHORT[current])
            if not isinstance(value, str) or value not in FORMATS:
                return f"'{key}' must be one of {sorted(FORMATS)}, got {value!r}"
            formats[key] = FORMATS[value]
        conn.rate, conn.dtype, conn.out_dtype = rate, formats["format"], formats["output_format"]
        return None


def _request_path(ws) -> str:
    request = getattr(ws, "request", None)   # websockets >= 13; 12 has ws.path
    return request.path if request is not None else getattr(ws, "path", "/")


def _decode_pcm(payload: bytes, dtype: str) -> np.ndarray | str:
    """Binary message -> (N,) samples in the native byte order, or why it cannot be audio."""
    dt = DTYPES[dtype]
    if len(payload) % dt.itemsize:
        return (f"a binary message of {len(payload)} bytes is not a whole number of {dtype} samples "
                f"({dt.itemsize} bytes each): is the client sending {SHORT[dtype]}? (see 'start')")
    audio = np.frombuffer(payload, dtype=dt).astype(dt.newbyteorder("="))     # (N,)
    if dtype == "float32" and not np.isfinite(audio).all():
        return "float32 audio contains NaN or infinity: send samples in [-1, 1]"
    return audio


def _sniff_format(payload: bytes, dtype: str) -> str | None:
    """Why `payload` looks like audio of the other sample format, or None. float32 samples in
    [-1, 1] read as int16 are noise; int16 read as float32 are tiny (1e-38) or huge numbers."""
    if len(payload) % 4 or len(payload) < 128:
        return None
    as_float = np.abs(np.frombuffer(payload, dtype="<f4"))           # (N/4,)
    audio_like = np.isfinite(as_float).all() and (as_float <= 1.5).all() \
        and np.mean((as_float >= 1e-6) & (as_float <= 1.0)) >= 0.5
    if dtype == "int16" and audio_like:
        return ("this audio looks like float32 samples but the session's input format is s16: send "
                '{"type": "start", "format": "f32"} before the audio, or send int16 samples')
    if dtype == "float32" and not audio_like and np.mean(as_float > 1.5) + np.mean(
            (as_float > 0) & (as_float < 1e-6)) > 0.5:
        return ("this audio is not float32 samples in [-1, 1] (is it int16?): send "
                '{"type": "start", "format": "s16"} before the audio, or float32 samples')
    return None


def _encode_pcm(audio: np.ndarray, dtype: str) -> bytes:
    """(N,) answer audio -> little-endian bytes in the client's format (float clipped to [-1, 1))."""
    audio = np.asarray(audio).reshape(-1)
    if dtype == "int16":
        return to_int16(audio).astype("<i2").tobytes()
    return as_float32(audio).astype("<f4").tobytes()


# --- the node side: sessions and turns ---------------------------------------------------------

@dataclass
class _ClientSession:
    """What the node thread knows about one connected session."""
    turn: int = -1                   # the session's current turn (-1: no question yet)
    seq: int = 0                     # next pcm frame's seq
    text_seq: int = 0
    ended: set[str] = field(default_factory=set)    # ports whose current-turn answer has ended
    closed: int = -1                 # latest turn that got its "end" or "error": later frames are stale
    prompts: dict[str, tuple[str, int, float]] = field(default_factory=dict)   # turn request ->
                                     # (prompt, t_ns, monotonic time it was last asked)


class Gateway(Node):
    inputs = {"pcm": "pcm", "text": "text",          # answers: audio (vocoder), text pieces (detokenizer)
              "speech": "speech"}                    # the VAD's speech started/stopped (Realtime clients)
    outputs = {"audio": "pcm", "text": "text"}       # client audio (to the VAD), typed prompts
    event_ports = frozenset({"speech"})              # (speech started carries the pcm's turn: the bus
                                                     # may announce the new turn before it comes)

    listen = ("host", "port")        # a server: its address, for the Kubernetes export

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        host: str = "127.0.0.1"          # 0.0.0.0 to serve other machines
        port: Port = 8765                 # 0: a free port (logged; `Gateway.port` after setup)
        rate: SampleRate = WHISPER_RATE         # Hz of client audio, unless its "start" message says otherwise
        dtype: Literal["int16", "float32"] = "int16"          # client audio sample format (default)
        output_dtype: Literal["int16", "float32"] = "float32"  # answer audio format (default)
        output_rate: SampleRate = SNAC_RATE     # Hz of the answer audio the graph sends back (SNAC 24 kHz)
        # an answer ends ("end" message) once these inputs' last frames arrived: [pcm, text] in a
        # graph that streams text back too, so the client has everything when "end" comes
        end_after: list[Literal["pcm", "text"]] = msgspec.field(default_factory=lambda: ["pcm"])
        max_sessions: Positive = 64           # clients connected at once; more are refused (try later)
        max_message_bytes: Positive = 1 << 20  # largest client message (1 MiB = 32 s of 16 kHz int16)
        max_backlog: Positive = 1024          # messages queued for a slow client before it is disconnected
        max_prompt_chars: Positive = 4000     # longest typed prompt (the backbone also checks its tokens)
        idle_timeout_s: NonNegative | None = None   # stop serving after this long with no client; None: never
        # who gets in (nodes/web.py): an API keys file (omniflow keys api create NAME --file FILE); web
        # pages of these origins besides the gateway's own ("*": any); TLS (wss:// and https://)
        api_keys: str | None = None
        allowed_origins: list[str] = msgspec.field(default_factory=list)
        tls_cert: str | None = None      # PEM certificate (chain) file
        tls_key: str | None = None       # PEM private key file (default: in tls_cert)

    def setup(self) -> None:
        p = self.params
        if not 0 < p.rate <= MAX_RATE or not 0 < p.output_rate <= MAX_RATE:
            raise ValueError(f"gateway rate={p.rate} / output_rate={p.output_rate} must be sample rates "
                             f"in Hz (1..{MAX_RATE})")
        if not p.end_after:
            raise ValueError("gateway end_after must name at least one input: [pcm], [text] or [pcm, text]")
        if p.max_sessions < 1 or p.max_backlog < 1 or p.max_message_bytes < 1:
            raise ValueError("gateway max_sessions, max_backlog and max_message_bytes must be >= 1")
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.sessions: dict[str, _ClientSession] = {}
        self.restarts_seen: dict[str, int] = {}  # node -> restarts, from the bus's health frames
        self.idle_since = time.monotonic()       # no client connected since (for idle_timeout_s)
        self.busy = False                        # an answer frame arrived since the last step
        self.serving = True
        self.rate_warned = False
        from omniflow.security import is_loopback
        if self.curve is not None and not p.api_keys and not is_loopback(f"tcp://{p.host}:0"):
            raise ValueError(f"this run is keyed (--keys): every endpoint it opens is secured, but the gateway on "
                             f"{p.host} would take any client. Fix: omniflow keys api create NAME --file "
                             "keys/api.json and --set gateway.api_keys=keys/api.json (or bind host 127.0.0.1)")
        self.server = _Server(p, self.events, self.log)
        self.server.start()

    @property
    def port(self) -> int | None:
        """The port the server listens on (useful with params.port 0)."""
        return self.server.port

    def has_work(self) -> bool:
        if not self.serving:
            return False
        timeout = self.params.idle_timeout_s
        if timeout is None or self.server.open_count or self.sessions or not self.events.empty():
            return True
        return time.monotonic() - self.idle_since < timeout

    # --- client -> graph -------------------------------------------------------------------
    def step(self):
        if self.server.failed is not None:            # the runtime reports it; restart: on-failure heals
            raise RuntimeError(f"the gateway's WebSocket server stopped: {self.server.failed!r}")
        # Wait for a client message only when no answer is flowing: answers arrive through the
        # runtime's poll, which runs between steps.
        try:
            event = self.events.get(timeout=POLL_S) if not self.busy else self.events.get_nowait()
        except queue.Empty:
            event = None
        self.busy = False
        yield from self._ask_again()
        for handled in range(MAX_EVENTS_PER_STEP):
            if handled:                                # (an event taken is always handled)
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    return
            if event is None:
                return
            yield from self._on_event(event)

    def _ask_again(self):
        """Typed prompts whose turn was not granted within GRANT_RETRY_S ask the bus again (same
        ref: the same turn), so a lost request or announcement cannot leave a client waiting; one
        still not granted after GRANT_GIVE_UP_S is dropped with an error to its client."""
        now = time.monotonic()
        for session, s in self.sessions.items():
            for ref, (text, t_ns, asked) in list(s.prompts.items()):
                if now - t_ns / 1e9 >= GRANT_GIVE_UP_S:
                    del s.prompts[ref]
                    self.log.error("session %s: no turn granted for its typed prompt in %.0f s (is the "
                                   "control bus up?); the client gets an error", session, now - t_ns / 1e9)
                    self.server.send(session, json.dumps({"type": "error", "error": (
                        "the server could not start an answer to this prompt (no turn was granted in "
                        f"{GRANT_GIVE_UP_S:.0f} s): please send it again")}))
                elif now - asked >= GRANT_RETRY_S:
                    s.prompts[ref] = (text, t_ns, now)
                    self.log.warning("session %s: no turn granted for its typed prompt in %.0f s; asking again",
                                     session, now - asked)
                    yield ask_turn(session, "typed", ref)[1]

    def _on_event(self, event: tuple):
        kind, session = event[0], event[1]
        if kind == "open":
            self.sessions[session] = _ClientSession()
            return
        s = self.sessions.get(session)
        if s is None:
            return
        if kind == "pcm":
            _, _, audio, rate, t_ns, *meta = event          # (meta: e.g. the Realtime API's segment: client)
            yield "audio", self._pcm(session, s, audio, rate, t_ns, meta=meta[0] if meta else None)
        elif kind == "flush":
            _, _, rate, t_ns = event
            self.server.ops.turn_asked(session)
            yield "audio", self._pcm(session, s, np.zeros(0, np.float32), rate, t_ns, last=True)
        elif kind == "text":                           # a typed prompt is a new turn: ask the bus
            _, _, text, t_ns = event
            self.server.ops.turn_asked(session)
            ref, request = ask_turn(session, "typed")
            s.prompts[ref] = (text, t_ns, time.monotonic())
            yield request
        elif kind == "abandon":                        # a turn failed: every node stops working on it
            _, _, turn = event
            yield ask_turn(session, "failed", after=turn)[1]
        elif kind == "cancel":                         # stop the answer in progress (Realtime clients)
            if s.turn >= 0:
                yield ask_turn(session, "cancel")[1]   # a new turn, with no question: the answer stops
        elif kind == "close":                          # free the backbone slot and every node's state
            yield end_session(session)
            del self.sessions[session]
            self.server.ops.forget(session)
            if not self.sessions:
                self.idle_since = time.monotonic()

    def _pcm(self, session: str, s: _ClientSession, audio: np.ndarray, rate: int, t_ns: int,
             last: bool = False, meta: dict | None = None) -> Frame:
        frame = Frame(kind="pcm", session=session, turn=max(s.turn, 0), seq=s.seq, last=last, data=audio,
                      meta={**(meta or {}), "rate": rate}, stamps=[(f"{self.name}:ws", t_ns)])
        s.seq = 0 if last else s.seq + 1               # a flushed stream starts again at seq 0
        return frame

    def granted(self, session: str, turn: int, ref: str):
        """The bus numbered a typed prompt's turn: the prompt goes to the backbone now."""
        s = self.sessions.get(session)
        if s is None or ref not in s.prompts:
            return
        text, t_ns, _ = s.prompts.pop(ref)
        yield "text", Frame(kind="text", session=session, turn=turn, seq=s.text_seq, last=True,
                            meta={"text": text}, stamps=[(f"{self.name}:ws", t_ns)])
        s.text_seq += 1
        self.server.send(session, {"type": "accepted", "turn": turn})     # (Realtime clients)

    # --- graph -> client -------------------------------------------------------------------
    def process(self, port, frame: Frame):
        self.busy = True
        s = self.sessions.get(frame.session)
        if s is None:
            return ()                                  # its client has gone
        if port == "speech":                           # the VAD's events: not part of an answer
            if frame.meta.get("event") == "stopped":
                self.server.ops.turn_asked(frame.session)
            self.server.send(frame.session, {"type": "speech", "turn": frame.turn, **frame.meta})
            return ()
        if frame.turn < s.turn or frame.turn <= s.closed:
            return ()                                  # an interrupted or finished answer: never sent
        if frame.turn > s.turn:                        # a newer turn whose announcement we missed
            s.turn, s.ended = frame.turn, set()
        if port == "pcm":
            self._send_audio(frame)
        else:
            piece = frame.meta.get("text", "")
            if isinstance(piece, str) and piece:
                self.server.send(frame.session, json.dumps({"type": "text", "text": piece, "turn": frame.turn},
                                                           ensure_ascii=False))
        if frame.last:
            s.ended.add(port)
            if s.ended.issuperset(self.params.end_after):
                self.server.send(frame.session, json.dumps({"type": "end", "turn": frame.turn}))
                self.server.ops.turn_ended(frame.session)
                s.ended, s.closed = set(), frame.turn
        return ()

    def failed(self, error: Frame):
        """A node failed on this turn (or its input broke a limit): tell the client, end the turn."""
        s = self.sessions.get(error.session)
        if s is None or error.turn < s.turn or error.turn <= s.closed:
            return ()
        s.closed, s.ended = error.turn, set()
        self.server.ops.turn_ended(error.session)
        self.server.send(error.session, json.dumps({"type": "error", "turn": error.turn,
                                                    "error": str(error.meta.get("error", "failed"))}))
        return ()

    def _send_audio(self, frame: Frame) -> None:
        if frame.data is None or not np.asarray(frame.data).size:
            return
        rate = frame.meta.get("rate", self.params.output_rate)
        if rate != self.params.output_rate:
            if not self.rate_warned:
                self.log.error("answer audio comes at %s Hz but the gateway tells clients output_rate=%d: "
                               "dropped. Fix: set the gateway's params.output_rate: %s", rate,
                               self.params.output_rate, rate)
                self.rate_warned = True
            return
        self.server.send(frame.session, np.asarray(frame.data), frame.turn)
        self.server.ops.audio_sent(frame.session, frame.turn, np.asarray(frame.data).size / rate)

    def reset(self, session: str, turn: int):
        """The bus announced `session`'s turn `turn` (a question, spoken or typed): tell the client."""
        s = self.sessions.get(session)
        if s is None or turn <= s.turn:
            return ()
        s.turn, s.ended = turn, set()
        self.server.send(session, json.dumps({"type": "turn", "turn": turn}))
        return ()

    def run_status(self, health) -> None:
        self.server.ops.run_status(health)             # the control bus's health: /healthz, /metrics
        restarts = {name: int(n.get("restarts", 0)) for name, n in health.get("nodes", {}).items()}
        restarted = sorted(name for name, n in restarts.items() if n > self.restarts_seen.get(name, 0))
        self.restarts_seen = restarts
        if restarted:                                  # what those nodes held for open turns is lost
            self._fail_open_turns(f"the answer was lost: node {', '.join(restarted)} failed and restarted; "
                                  "please ask again")

    def _fail_open_turns(self, why: str) -> None:
        """Every session whose current turn has not ended gets `why` as that turn's error, and the
        graph a new turn in its place (unless the client asked a newer question first), so that no
        node goes on working on the lost one: the frames a restarted node is sent again
        (omniflow/delivery.py) would otherwise make it answer a question nobody waits for."""
        lost = 0
        for session, s in self.sessions.items():
            if s.turn >= 0 and s.turn > s.closed:
                self.events.put(("abandon", session, s.turn))   # before the error: the client may
                s.closed, s.ended = s.turn, set()               # ask again at once, and that must win
                self.server.ops.turn_ended(session)
                self.server.send(session, json.dumps({"type": "error", "turn": s.turn, "error": why}))
                lost += 1
        if lost:
            self.log.warning("%s: %d turn(s) in flight get an error", why, lost)

    def finish(self):
        self.serving = False                           # end of stream: take no new clients
        self.server.stop()
        return ()

    def teardown(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()
