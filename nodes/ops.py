"""The gateway's operations endpoints: /healthz and Prometheus /metrics.

/healthz is 200 when the control bus's latest health frame (omniflow.launch.bus, about once a
second) is fresh, the graph is ready (every node finished setup) and every node is up (beating);
else 503. Either way the body is JSON: {"ok", "ready", "nodes": {name: {"up", "age_s",
"restarts"}}, "sessions"}. Kubernetes readiness/liveness probes can use it.

/metrics (prometheus-client), per gateway:

    omniflow_sessions_connected             connected clients now
    omniflow_sessions_total{protocol}       connections accepted (omniflow | realtime)
    omniflow_turns_total                    answers sent in full (the end of a turn)
    omniflow_first_audio_seconds            histogram: end of the user's turn (the VAD's speech stop, a
                                            flush/commit, a typed prompt) -> the answer's first audio sent
    omniflow_playback_stalls_total          answer audio that came after the client would have played
    omniflow_playback_stall_seconds_total   everything sent before it (a real-time listener's underrun)
    omniflow_refused_clients_total{reason}  requests refused at the gateway (no_key, unknown_key, origin)
    omniflow_node_up{node}                  1 while the node beats (from the bus's health frames)
    omniflow_node_restarts_total{node}      restarts by the launcher
    omniflow_refused_peers_total{node}      CURVE peers the node's process refused (unknown key, no CURVE, wrong
                                            server key; node="control-bus": the bus's own tcp sockets)
    omniflow_node_frames_in_total{node}, omniflow_node_frames_out_total{node}, omniflow_node_rejected_total{node}
    omniflow_decode_steps_total{node}, omniflow_decode_seconds_total{node}
                                            batched decode steps and their time: mean step time is
                                            rate(omniflow_decode_seconds_total[1m]) / rate(omniflow_decode_steps_total[1m])
"""
from __future__ import annotations

import json
import time
from typing import Any

HEALTH_FRESH_S = 5.0                # a health frame older than this means the bus is gone
STALL_MIN_S = 0.02                  # gaps shorter than this are not counted as stalls
FIRST_AUDIO_BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0)


class Ops:
    """Measurements (node thread and loop thread) and the two routes (loop thread)."""

    def __init__(self, sessions_now, refused):
        self.sessions_now, self.refused = sessions_now, refused     # () -> int, Counter reason -> n
        self.health: dict[str, Any] | None = None
        self.health_at = 0.0
        self.asked: dict[str, float] = {}            # session -> when its user's turn ended
        self.playing: dict[str, tuple[int, float]] = {}   # session -> (turn, when its audio so far ends)
        self.registry = None
        try:
            import prometheus_client as prom
        except ImportError:
            self.prom = None
            return
        self.prom = prom
        self.registry = r = prom.CollectorRegistry(auto_describe=True)
        prom.Gauge("omniflow_sessions_connected", "connected clients", registry=r).set_function(sessions_now)
        self.sessions_total = prom.Counter("omniflow_sessions", "connections accepted", ["protocol"], registry=r)
        self.turns = prom.Counter("omniflow_turns", "answers sent in full", registry=r)
        self.first_audio = prom.Histogram("omniflow_first_audio_seconds", "end of the user's turn -> first "
                                          "answer audio sent", buckets=FIRST_AUDIO_BUCKETS, registry=r)
        self.stalls = prom.Counter("omniflow_playback_stalls", "answer audio later than a real-time "
                                   "listener needed it", registry=r)
        self.stall_s = prom.Counter("omniflow_playback_stall_seconds", "seconds a real-time listener "
                                    "waited for answer audio", registry=r)
        r.register(_RunCollector(self))

    # --- measurements ----------------------------------------------------------------------
    def connected(self, protocol: str) -> None:
        if self.prom:
            self.sessions_total.labels(protocol).inc()

    def turn_asked(self, session: str) -> None:
        """The user's turn ended now: the clock for its first audio starts."""
        self.asked[session] = time.monotonic()

    def audio_sent(self, session: str, turn: int, seconds: float) -> None:
        now = time.monotonic()
        asked = self.asked.pop(session, None)
        if asked is not None and self.prom:
            self.first_audio.observe(now - asked)
        playing = self.playing.get(session)
        end = now
        if playing is not None and playing[0] == turn:
            gap = now - playing[1]
            if gap > STALL_MIN_S and self.prom:
                self.stalls.inc()
                self.stall_s.inc(gap)
            end = max(now, playing[1])
        self.playing[session] = (turn, end + seconds)

    def turn_ended(self, session: str) -> None:
        self.playing.pop(session, None)
        if self.prom:
            self.turns.inc()

    def forget(self, session: str) -> None:
        self.asked.pop(session, None)
        self.playing.pop(session, None)

    def run_status(self, health: dict[str, Any]) -> None:
        self.health, self.health_at = health, time.monotonic()     # (one assignment: read by the loop)

    # --- routes (the loop thread) ----------------------------------------------------------
    def healthz(self) -> tuple[int, str, str]:
        health, age = self.health, time.monotonic() - self.health_at
        if health is None or age > HEALTH_FRESH_S:
            why = ("no health from the control bus yet" if health is None else
                   f"the control bus's last health frame is {age:.0f} s old")
            return 503, "application/json", json.dumps({"ok": False, "error": why, "sessions": self.sessions_now()})
        nodes = {name: {k: n.get(k) for k in ("up", "age_s", "restarts")} for name, n in health["nodes"].items()}
        ok = bool(health.get("ready")) and all(n["up"] for n in nodes.values())
        body = {"ok": ok, "ready": bool(health.get("ready")), "nodes": nodes, "sessions": self.sessions_now()}
        return (200 if ok else 503), "application/json", json.dumps(body)

    def metrics(self) -> tuple[int, str, str]:
        if self.prom is None:
            return 501, "text/plain; charset=utf-8", ("/metrics needs prometheus-client. Fix: pip install "
                                                      "'omniflow[web]' (or pip install prometheus-client)\n")
        return 200, self.prom.CONTENT_TYPE_LATEST, self.prom.generate_latest(self.registry).decode()


class _RunCollector:
    """Metrics read at scrape time: the gateway's refusals and the bus's health frame."""

    def __init__(self, ops: Ops):
        self.ops = ops

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        refused = CounterMetricFamily("omniflow_refused_clients", "requests refused at the gateway", labels=["reason"])
        for reason, n in sorted(self.ops.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        nodes = (self.ops.health or {}).get("nodes", {})
        up = GaugeMetricFamily("omniflow_node_up", "1 while the node beats", labels=["node"])
        families = {key: CounterMetricFamily(f"omniflow_{name}", doc, labels=["node"]) for key, name, doc in (
            ("restarts", "node_restarts", "restarts by the launcher"),
            ("refused", "refused_peers", "CURVE handshakes refused (unknown client key)"),
            ("frames_in", "node_frames_in", "frames received"),
            ("frames_out", "node_frames_out", "frames sent"),
            ("rejected", "node_rejected", "malformed frames rejected"),
            ("decode_steps", "decode_steps", "batched decode steps"),
            ("decode_seconds", "decode_seconds", "time in batched decode steps"))}
        for name, n in sorted(nodes.items()):
            up.add_metric([name], 1.0 if n.get("up") else 0.0)
            values = {"restarts": n.get("restarts", 0), **n.get("metrics", {}), **n.get("stats", {})}
            for key, family in families.items():
                if key in values:
                    family.add_metric([name], values[key])
        bus = (self.ops.health or {}).get("bus")
        if bus is not None:                   # the control bus's own CURVE sockets (a keyed run over tcp)
            families["refused"].add_metric(["control-bus"], bus.get("refused", 0))
        yield up
        yield from families.values()
