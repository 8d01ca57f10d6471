"""The gateway's plain HTTP side, on the WebSocket port: the talk page and the operations endpoints.

    GET /            the web page (nodes/static/index.html): talk to the graph from a browser
    GET /healthz     200 when every node of the run is up and beating, else 503 (JSON either way)
    GET /metrics     Prometheus text format (needs prometheus-client: pip install 'omniflow[web]')

Everything else that is not a WebSocket upgrade is a 404. The WebSocket server calls `respond`
for every request before its handshake (websockets' `process_request` hook): None lets the
upgrade go on, a Response answers the request instead.

Who gets in (`Access`): with params.api_keys (a file from `omniflow keys api create`), every
WebSocket session and /metrics need a key (`Authorization: Bearer KEY` or `?token=KEY`): without
one, 401. A request whose Origin header (sent by browsers) is neither this server's own origin nor
in params.allowed_origins is refused with 403, so a web page elsewhere cannot use a local gateway
through its visitor's browser. The page and /healthz stay open (the page asks for the key;
probes need no secret). Every refusal is counted; each peer's first refusal of each kind is logged.
"""
from __future__ import annotations

import collections
import ssl
from functools import lru_cache
from importlib import resources
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from omniflow.apikeys import KeyFile, token_of

PAGE = "/"
OPEN = {PAGE, "/healthz"}            # paths served without a key
MAX_PEERS_REMEMBERED = 4096          # peers whose refusal was logged (then forgotten: logged again)


@lru_cache(maxsize=1)
def page() -> str:
    return (resources.files("nodes") / "static" / "index.html").read_text(encoding="utf-8")


def is_upgrade(request) -> bool:
    return "websocket" in request.headers.get("Upgrade", "").lower()


def reply(connection, status: int, body: str, content_type: str = "text/plain; charset=utf-8",
          headers: dict[str, str] | None = None):
    """A complete HTTP response (websockets' Response) with `content_type`."""
    response = connection.respond(status, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    response.headers["Cache-Control"] = "no-store"
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


class Access:
    """The gateway's door: API keys and the Origin allow-list (see the module doc)."""

    def __init__(self, api_keys: str | None, allowed_origins: list[str] | None, log):
        self.keys = KeyFile(api_keys) if api_keys else None
        if self.keys is not None:
            self.keys.check(None)                    # a missing or broken file fails setup, not a client
            if not self.keys.path.exists():
                raise FileNotFoundError(f"gateway api_keys file {api_keys} not found. Fix: "
                                        f"omniflow keys api create NAME --file {api_keys}")
        self.origins = {o.rstrip("/") for o in allowed_origins or ()}
        self.log = log
        self.refused: collections.Counter = collections.Counter()     # reason -> requests refused
        self._logged: set[tuple[str, str]] = set()

    def check(self, connection, request) -> tuple[int, str] | None:
        """(status, why) when the request is refused; None when it may go on."""
        url = urlsplit(request.path)
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_ok(origin, request.headers.get("Host", "")):
            return self._refuse(connection, "origin", 403, f"origin {origin} is not allowed here. Fix: add it "
                                "to the gateway's params.allowed_origins")
        if self.keys is None or (url.path in OPEN and not is_upgrade(request)):
            return None
        token = token_of(request.headers, parse_qs(url.query))
        if token is None:
            return self._refuse(connection, "no_key", 401, "this server needs an API key: send 'Authorization: "
                                "Bearer KEY' or ?token=KEY (keys come from 'omniflow keys api create')")
        name = self.keys.check(token)
        if name is None:
            return self._refuse(connection, "unknown_key", 401, "unknown or revoked API key")
        connection.api_key_name = name
        return None

    def _origin_ok(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/")
        return origin in self.origins or "*" in self.origins or urlsplit(origin).netloc == host

    def _refuse(self, connection, reason: str, status: int, why: str) -> tuple[int, str]:
        self.refused[reason] += 1
        peer = str((getattr(connection, "remote_address", None) or ("?",))[0])
        if (peer, reason) not in self._logged:
            if len(self._logged) >= MAX_PEERS_REMEMBERED:
                self._logged.clear()
            self._logged.add((peer, reason))
            self.log.warning("refused a client from %s (%d %s): %s (%d refused for this reason so far; "
                             "this peer's next refusals of this kind are counted, not logged)",
                             peer, status, reason, why, self.refused[reason])
        return status, why


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server's TLS context from PEM files (params.tls_cert / tls_key), or None for plain."""
    if not cert:
        if key:
            raise ValueError("gateway tls_key is set but tls_cert is not. Fix: set both (tls_cert: the "
                             "certificate chain PEM, tls_key: its private key PEM)")
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"gateway TLS: cannot load certificate {cert!r} / key {key!r}: {e}. Fix: point "
                         "tls_cert at a PEM certificate (chain) and tls_key at its private key") from None
    return ctx


def warn_exposure(host: str, access: Access, tls: ssl.SSLContext | None, log) -> None:
    """Loud warnings for a gateway reachable from other machines without auth, or without TLS."""
    from omniflow.security import is_loopback
    if is_loopback(f"tcp://{host}:0"):
        return
    if access.keys is None:
        log.warning("!" * 78)
        log.warning("THE GATEWAY ON %s TAKES ANY CLIENT: anyone who can reach this address can talk to the "
                    "model and use its machine. Fix: omniflow keys api create NAME --file keys/api.json, then "
                    "--set gateway.api_keys=keys/api.json (or bind host 127.0.0.1)", host)
        log.warning("!" * 78)
    if tls is None:
        log.warning("the gateway on %s serves plain ws:// and http://: audio, text and API keys cross the "
                    "network unencrypted. Fix: set gateway tls_cert and tls_key (or put a TLS proxy in front)",
                    host)


def respond(connection, request, routes: dict[str, Callable[[], tuple[int, str, str]]],
            access: Access | None = None) -> Any:
    """Answer a plain HTTP request from `routes` (path -> () -> (status, content type, body));
    None for a WebSocket upgrade that `access` lets in."""
    refused = access.check(connection, request) if access is not None else None
    if refused is not None:
        status, why = refused
        headers = {"WWW-Authenticate": 'Bearer realm="omniflow"'} if status == 401 else None
        return reply(connection, status, why + "\n", headers=headers)
    if is_upgrade(request):
        return None
    path = urlsplit(request.path).path
    if path == PAGE:
        return reply(connection, 200, page(), "text/html; charset=utf-8")
    route = routes.get(path)
    if route is None:
        known = ", ".join([PAGE, *routes])
        return reply(connection, 404, f"no page at {path}: this server has {known}, and WebSockets at / "
                                      "(omniflow's protocol) and /v1/realtime (the OpenAI Realtime API)\n")
    status, content_type, body = route()
    return reply(connection, status, body, content_type)
