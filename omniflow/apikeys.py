"""API keys: who may open a session on a gateway. Only invited clients get in.

    omniflow keys api create alice --file keys/api.json    # prints the key once; the file keeps its hash
    omniflow keys api list --file keys/api.json
    omniflow keys api revoke alice --file keys/api.json
    omniflow run graphs/serve.yaml --set gateway.api_keys=keys/api.json

A client presents its key as `Authorization: Bearer KEY` (the OpenAI SDKs do, with `api_key=KEY`)
or, from a browser, which cannot set WebSocket headers, as `?token=KEY` in the URL. The file holds
one SHA-256 hash per named key (never the key itself) and is written 0600; the gateway rereads it
when it changes, so a revoked key stops working without a restart.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

PREFIX = "of-"                      # omniflow keys are recognisable in logs and secret scanners
KEY_BYTES = 32                      # of randomness (256 bits)
FILE_MODE = 0o600


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyFile:
    """The keys file: {"keys": {name: {"sha256": hex, "created": unix seconds}}}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mtime: float | None = None
        self._hashes: dict[str, str] = {}         # sha256 -> name

    def read(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            keys = data["keys"]
            assert isinstance(keys, dict) and all(isinstance(v.get("sha256"), str) for v in keys.values())
        except (ValueError, KeyError, AssertionError, AttributeError) as e:
            raise ValueError(f"{self.path} is not an omniflow API keys file ({e!r}). Fix: point at a file "
                             f"written by 'omniflow keys api create NAME --file {self.path}'") from None
        return keys

    def _write(self, keys: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": keys}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def create(self, name: str) -> str:
        """A new key for `name` (returned once, never stored)."""
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' or '-'")
        keys = self.read()
        if name in keys:
            raise ValueError(f"a key named {name!r} exists already. Fix: revoke it first, or choose another name")
        key = PREFIX + secrets.token_urlsafe(KEY_BYTES)
        keys[name] = {"sha256": digest(key), "created": int(time.time())}
        self._write(keys)
        return key

    def revoke(self, name: str) -> None:
        keys = self.read()
        if name not in keys:
            raise ValueError(f"no key named {name!r} in {self.path} (keys: {', '.join(sorted(keys)) or 'none'})")
        del keys[name]
        self._write(keys)

    def check(self, key: str | None) -> str | None:
        """The name of the key `key` is, or None. Rereads the file when it changed."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            mtime = None
        if mtime != self._mtime:
            self._hashes = {v["sha256"]: name for name, v in self.read().items()}
            self._mtime = mtime
        if not key:
            return None
        want = digest(key)
        for h, name in self._hashes.items():       # constant time per comparison
            if hmac.compare_digest(h, want):
                return name
        return None


def token_of(headers, query: dict[str, list[str]]) -> str | None:
    """The key a request presents: `Authorization: Bearer KEY`, else `?token=KEY`."""
    auth = headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    tokens = query.get("token")
    return tokens[0] if tokens else None


def main(args) -> int:
    """`omniflow keys api create|list|revoke` (wired in omniflow.security.add_arguments)."""
    import sys
    keys = KeyFile(args.file)
    try:
        if args.api_action == "create":
            key = keys.create(args.name)
            print(f"API key for {args.name} (shown once; {args.file} keeps only its hash):\n{key}\n"
                  f"Serve with it: omniflow run graphs/serve.yaml --set gateway.api_keys={args.file}")
        elif args.api_action == "revoke":
            keys.revoke(args.name)
            print(f"revoked {args.name}: a running gateway refuses it from its next connection on")
        else:
            for name, v in sorted(keys.read().items()):
                created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.get("created", 0)))
                print(f"{name}\tcreated {created} UTC\tsha256 {v['sha256'][:12]}…")
    except (OSError, ValueError) as e:
        print(f"omniflow keys api: {e}", file=sys.stderr)
        return 2
    return 0
