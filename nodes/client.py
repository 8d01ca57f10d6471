"""PCM pushed by clients over ZeroMQ, turned into "pcm" frames.

    mic_in: {use: nodes.client:PcmClientSource, params: {endpoint: "tcp://*:5555", rate: 16000, dtype: int16}}

The node binds `endpoint`; clients connect and send raw little-endian mono PCM (`dtype` samples at
`rate` Hz), one chunk per message, any chunk size:

    PULL   (clients use PUSH):   [pcm]  or  [session, pcm]
    ROUTER (clients use DEALER): [pcm]  or  [session, pcm]   (without a session part the session is
                                                            the client's ZeroMQ identity, hex)

Under `omniflow run --keys DIR` a tcp:// endpoint is a CURVE server like every edge of the run:
clients need the run's server key and a client key in DIR (security.make_client(sock, curve) with
`Curve.load(DIR)`); anyone else is refused, counted and logged (omniflow.security.REFUSALS).

An empty pcm part ends that session's stream (its last frame has last=True, so the VAD flushes).
The source runs until stopped, or until no message came for `idle_timeout_s` (when set).

A minimal client:

    sock = zmq.Context().socket(zmq.PUSH); sock.connect("tcp://server:5555")
    sock.send_multipart([b"alice", pcm_int16.tobytes()])
"""
from __future__ import annotations

import time
from typing import Literal

import msgspec
import numpy as np

from omniflow.audio import PCM_DTYPES
from omniflow.frame import Frame
from omniflow.model.units import WHISPER_RATE
from omniflow.node import Node
from omniflow.security import (is_tcp, note_monitor_event, secure_bind, start_authenticator, stop_authenticator,
                               watch_refusals)

POLL_MS = 20                 # one step waits at most this long for a message
MAX_MESSAGES_PER_STEP = 64   # then yield, so the runtime can read its control channel
DTYPES = PCM_DTYPES


class PcmClientSource(Node):
    outputs = {"audio": "pcm"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        endpoint: str = "tcp://127.0.0.1:5555"
        socket: Literal["pull", "router"] = "pull"
        rate: int = WHISPER_RATE           # Hz of the pushed audio
        dtype: Literal["int16", "float32"] = "int16"
        session: str = "default"           # session of messages without a session part (PULL)
        idle_timeout_s: float | None = None   # stop after this long without a message; None: never

    def setup(self) -> None:
        import zmq

        p = self.params
        if p.rate <= 0:
            raise ValueError(f"client rate={p.rate} must be a positive sample rate in Hz")
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PULL if p.socket == "pull" else zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.secured = self.curve is not None and is_tcp(p.endpoint)
        self.monitor = None
        try:
            if self.secured:                     # --keys: CURVE, the run's allow list, refusals watched
                start_authenticator(self.ctx, self.curve)
                self.monitor = watch_refusals(self.sock)
            secure_bind(self.sock, p.endpoint, self.curve)
        except zmq.ZMQError as e:
            self.teardown()
            raise RuntimeError(f"cannot bind the PCM client endpoint {p.endpoint!r}: {e}. Fix: choose a "
                               "free address (params.endpoint), e.g. tcp://*:5556 or ipc:///tmp/pcm") from None
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        if self.monitor is not None:
            self.poller.register(self.monitor, zmq.POLLIN)
        self.dtype = DTYPES[p.dtype]
        self.seq: dict[str, int] = {}
        self.last_message = time.monotonic()
        self.log.info("waiting for %s PCM at %d Hz on %s (%s%s)", p.dtype, p.rate, p.endpoint, p.socket,
                      ", CURVE" if self.secured else "")

    def has_work(self) -> bool:
        timeout = self.params.idle_timeout_s
        return timeout is None or time.monotonic() - self.last_message < timeout

    def step(self):
        import zmq

        ready = dict(self.poller.poll(POLL_MS))
        if self.monitor is not None and self.monitor in ready:
            from zmq.utils.monitor import recv_monitor_message
            while self.monitor.poll(0):
                note_monitor_event(recv_monitor_message(self.monitor))
        if self.sock not in ready:
            return
        for _ in range(MAX_MESSAGES_PER_STEP):
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.last_message = time.monotonic()
            frame = self._frame(parts)
            if frame is not None:
                yield "audio", frame

    def _frame(self, parts: list[bytes]) -> Frame | None:
        identity = None
        if self.params.socket == "router":
            identity, parts = parts[0], parts[1:]
        if len(parts) == 1:
            session = identity.hex() if identity is not None else self.params.session
        elif len(parts) == 2:
            session = parts[0].decode("utf-8", errors="replace")
            parts = parts[1:]
        else:
            self.log.warning("dropped a client message of %d parts: send [pcm] or [session, pcm]", len(parts))
            return None
        payload = parts[0]
        if len(payload) % self.dtype.itemsize:
            self.log.warning("dropped %d bytes from session %s: not a whole number of %s samples (is the "
                             "client sending %s?)", len(payload), session, self.params.dtype, self.params.dtype)
            return None
        audio = np.frombuffer(payload, dtype=self.dtype).astype(self.dtype.newbyteorder("="))   # (N,)
        seq = self.seq.get(session, 0)
        self.seq[session] = seq + 1
        end = len(audio) == 0                    # an empty chunk ends this session's stream
        if end:
            self.seq.pop(session)
        return Frame(kind="pcm", session=session, seq=seq, last=end, data=audio,
                     meta={"rate": self.params.rate}).stamp(self.name)

    def teardown(self) -> None:
        for name in ("monitor", "sock"):
            sock = getattr(self, name, None)
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        if getattr(self, "secured", False):
            stop_authenticator(self.ctx)
            self.secured = False
