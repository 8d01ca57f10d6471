"""Only invited clients get in: API keys (omniflow/apikeys.py), the Origin allow-list and TLS on the
gateway (nodes/web.py). Real servers on 127.0.0.1, free ports."""
from __future__ import annotations

import json
import logging
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

pytest.importorskip("websockets")
from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from nodes.gateway import Gateway  # noqa: E402
from omniflow.apikeys import KeyFile  # noqa: E402




def refused_status(url: str, **options) -> int:
    with pytest.raises(InvalidStatus) as e:
        with connect(url, **options):
            pass
    return e.value.response.status_code


def test_keys_cli_create_list_revoke(tmp_path):
    file = tmp_path / "keys" / "api.json"
    cli = [sys.executable, "-m", "omniflow.cli", "keys", "api"]
    out = subprocess.run([*cli, "create", "alice", "--file", str(file)], capture_output=True, text=True, check=True)
    key = out.stdout.split("\n")[1]
    assert key.startswith("of-") and len(key) > 40
    assert stat.S_IMODE(file.stat().st_mode) == 0o600 and key not in file.read_text()   # only its hash
    assert KeyFile(file).check(key) == "alice" and KeyFile(file).check(key + "x") is None
    again = subprocess.run([*cli, "create", "alice", "--file", str(file)], capture_output=True, text=True)
    assert again.returncode == 2 and "exists already" in again.stderr
    listed = subprocess.run([*cli, "list", "--file", str(file)], capture_output=True, text=True, check=True)
    assert listed.stdout.startswith("alice\t") and key not in listed.stdout
    subprocess.run([*cli, "revoke", "alice", "--file", str(file)], check=True, capture_output=True)
    assert KeyFile(file).check(key) is None


def test_api_keys_bearer_or_token_else_401_counted_and_logged_once_per_peer(gateway, tmp_path, caplog):
    keys = KeyFile(tmp_path / "api.json")
    key = keys.create("alice")
    node = gateway(api_keys=str(keys.path))
    base = f"ws://127.0.0.1:{node.port}"
    with caplog.at_level(logging.WARNING, logger="omniflow"):
        assert refused_status(f"{base}/") == 401
        assert refused_status(f"{base}/v1/realtime") == 401                      # the same peer: counted
        assert refused_status(f"{base}/", additional_headers={"Authorization": "Bearer of-wrong"}) == 401
    logged = [r.getMessage() for r in caplog.records if "refused a client" in r.getMessage()]
    assert len(logged) == 2 and "no_key" in logged[0] and "unknown_key" in logged[1]
    assert node.server.access.refused == {"no_key": 2, "unknown_key": 1}

    with connect(f"{base}/", additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "session"
    with connect(f"{base}/v1/realtime?token={key}") as ws:                     # a browser's way
        assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
    with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/") as r:           # the page stays open
        assert r.status == 200

    keys.revoke("alice")                                                          # no restart needed
    assert refused_status(f"{base}/?token={key}") == 401


def test_openai_sdk_presents_its_api_key(gateway, tmp_path):
    openai = pytest.importorskip("openai")
    keys = KeyFile(tmp_path / "api.json")
    key = keys.create("sdk")
    node = gateway(api_keys=str(keys.path))
    base_url = f"http://127.0.0.1:{node.port}/v1"
    with openai.OpenAI(base_url=base_url, api_key=key).realtime.connect(model="mini-omni") as conn:
        assert conn.recv().type == "session.created"
    with pytest.raises(InvalidStatus) as e:
        with openai.OpenAI(base_url=base_url, api_key="of-not-invited").realtime.connect(model="mini-omni") as conn:
            conn.recv()
    assert e.value.response.status_code == 401


def test_origin_allow_list(gateway):
    node = gateway(allowed_origins=["https://app.example"])
    url = f"ws://127.0.0.1:{node.port}/"
    assert refused_status(url, origin="https://evil.example") == 403
    for origin in ("https://app.example", f"http://127.0.0.1:{node.port}", None):   # listed, the page's own, none
        with connect(url, origin=origin) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session"
    assert node.server.access.refused == {"origin": 1}


def test_tls(gateway, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    node = gateway(tls_cert=str(cert), tls_key=str(key))
    trust = ssl.create_default_context(cafile=str(cert))
    with connect(f"wss://127.0.0.1:{node.port}/v1/realtime", ssl=trust) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
    with urllib.request.urlopen(f"https://127.0.0.1:{node.port}/", context=trust) as r:
        assert r.status == 200
    with pytest.raises(Exception):                                                  # plain ws:// is not served
        with connect(f"ws://127.0.0.1:{node.port}/", open_timeout=5):
            pass
    with pytest.raises(ValueError, match="tls_cert"):
        Gateway({"port": 0, "tls_key": str(key)}).setup()
    with pytest.raises(ValueError, match="cannot load certificate"):
        Gateway({"port": 0, "tls_cert": str(tmp_path / "missing.pem")}).setup()


def test_a_loud_warning_when_any_client_can_reach_it(gateway, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="omniflow"):
        gateway(host="0.0.0.0")
    assert any("TAKES ANY CLIENT" in r.getMessage() for r in caplog.records)
    assert any("unencrypted" in r.getMessage() for r in caplog.records)
    caplog.clear()
    keys = KeyFile(tmp_path / "api.json")
    keys.create("a")
    with caplog.at_level(logging.WARNING, logger="omniflow"):
        gateway(host="127.0.0.1")
        gateway(host="0.0.0.0", api_keys=str(keys.path))
    assert not any("TAKES ANY CLIENT" in r.getMessage() for r in caplog.records)
    with pytest.raises(FileNotFoundError, match="keys api create"):
        Gateway({"port": 0, "api_keys": str(tmp_path / "none.json")}).setup()


def test_run_flags_set_the_serving_params_of_the_nodes_that_take_them():
    import argparse

    from omniflow.graph import load_graph
    from omniflow.launch.cli_run import add_arguments, serving_overrides

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["graphs/serve.yaml", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--api-keys", "a.json"])
    extra = serving_overrides(load_graph(args.graph, args.set), args)
    gateway = load_graph(args.graph, extra).nodes["gateway"].params
    assert (gateway["tls_cert"], gateway["tls_key"], gateway["api_keys"]) == ("c.pem", "k.pem", "a.json")
    args = parser.parse_args(["graphs/demo.yaml", "--api-keys", "a.json"])
    with pytest.raises(ValueError, match="no node of graphs/demo.yaml has a 'api_keys' param"):
        serving_overrides(load_graph(args.graph, []), args)
