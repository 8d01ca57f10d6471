"""The gateway's plain HTTP side, on the WebSocket port: the talk page and the operations endpoints.

    GET /            the web page (nodes/static/index.html): talk to the graph from a browser
    GET /healthz     200 when every node of the run is up and beating, else 503 (JSON either way)
    GET /metrics     Prometheus text format (needs prometheus-client: pip install 'omniflow[web]')

Everything else that is not a WebSocket upgrade is a 404. The WebSocket server calls `respond`
for every request before its handshake (websockets' `process_request` hook): None lets the
upgrade go on, a Response answers the request instead.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, Callable
from urllib.parse import urlsplit

PAGE = "/"


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


def respond(connection, request, routes: dict[str, Callable[[], tuple[int, str, str]]]) -> Any:
    """Answer a plain HTTP request from `routes` (path -> () -> (status, content type, body));
    None for a WebSocket upgrade."""
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
