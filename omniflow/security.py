"""CURVE-secured edges: one key pair per run or cluster, an allow list of client public keys.

    omniflow keys generate keys/          # keys/omniflow.key (public), keys/omniflow.key_secret (0600)
    omniflow run graph.yaml --keys keys/  # every tcp:// edge and the control channel use CurveZMQ

Design (the keys belong to a deployment, not to a graph, so the same graph file runs with or
without them):
* Every node of a run holds the same key pair. A socket that binds is a CURVE server with it; a
  socket that connects is a CURVE client with it and expects the server's public key.
* Servers admit only clients whose public key is in the allow list: every `*.key` public
  certificate in the key directory (the cluster's own, plus any other client's you copy in).
  A ZAP handler (pyzmq's `ThreadAuthenticator`, one per ZeroMQ context) checks each handshake.
* ipc:// and inproc:// edges stay plain: they never leave the machine, and the run directory
  holding the ipc sockets is 0700.
* Without keys, tcp:// still works; binding it to a non-loopback address logs a warning.
* Every refused peer is counted (`REFUSALS`, per process) and logged once per peer and reason:
  an unknown client key (the ZAP handler; the peer is its public key), a client without CURVE, or
  one that expects another server key (handshake failures the socket monitor reports, see
  `watch_refusals`; libzmq does not say which address those came from, so they are logged once
  per bound endpoint and reason, and counted every time).
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import threading
from pathlib import Path

import msgspec
import zmq

KEY_NAME = "omniflow"                 # keys/omniflow.key + keys/omniflow.key_secret
ZAP_DOMAIN = "omniflow"
SECRET_MODE, PUBLIC_MODE, DIR_MODE = 0o600, 0o644, 0o700

log = logging.getLogger("omniflow.security")


class Curve(msgspec.Struct, frozen=True):
    """A run's CURVE keys (Z85 text, as ZeroMQ prints them). Plain data: a launcher may hand it
    to a node in memory (Ray) instead of a path; it never goes into a node's config file."""
    public: str
    secret: str
    allowed: tuple[str, ...]          # client public keys a server admits

    @classmethod
    def load(cls, key_dir: str | Path) -> "Curve":
        """Read `omniflow keys generate`'s directory; errors name the problem and the fix."""
        import zmq.auth
        key_dir = Path(key_dir)
        secret_file = key_dir / f"{KEY_NAME}.key_secret"
        if not secret_file.exists():
            raise FileNotFoundError(f"{secret_file} not found: {key_dir} is not a key directory. "
                                    f"Fix: run 'omniflow keys generate {key_dir}'")
        if secret_file.stat().st_mode & 0o077:
            log.warning("%s is readable by other users; run 'chmod 600 %s'", secret_file, secret_file)
        public, secret = zmq.auth.load_certificate(secret_file)
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret key. "
                             f"Fix: run 'omniflow keys generate {key_dir}' again")
        allowed = sorted(k.decode() for k in zmq.auth.load_certificates(key_dir))
        return cls(public.decode(), secret.decode(), tuple(allowed))


def require_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support (built without libsodium). "
                           "Fix: pip install --force-reinstall pyzmq (its wheels bundle CURVE)")


def generate_keys(key_dir: str | Path) -> tuple[Path, Path]:
    """Write a fresh key pair; the secret file is created 0600 (never readable by others, not
    even for a moment) and the directory 0700. Refuses to overwrite existing keys."""
    import zmq.auth
    require_curve()
    key_dir = Path(key_dir)
    if (key_dir / f"{KEY_NAME}.key_secret").exists():
        raise FileExistsError(f"{key_dir} already holds keys. Fix: choose a new directory "
                              "(or delete the old keys to rotate them everywhere at once)")
    key_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(key_dir, DIR_MODE)
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(key_dir, KEY_NAME)
    finally:
        os.umask(old)
    os.chmod(secret, SECRET_MODE)
    os.chmod(public, PUBLIC_MODE)
    return Path(public), Path(secret)


# --- sockets ---------------------------------------------------------------------------------

def is_tcp(address: str) -> bool:
    return address.startswith("tcp://")


def make_server(sock: zmq.Socket, curve: Curve) -> None:
    """Before bind: this socket accepts only CURVE clients the ZAP handler admits."""
    sock.curve_secretkey = curve.secret.encode()
    sock.curve_publickey = curve.public.encode()
    sock.zap_domain = ZAP_DOMAIN.encode()
    sock.curve_server = True


def make_client(sock: zmq.Socket, curve: Curve) -> None:
    """Before connect: encrypt to the cluster's server key, authenticate with ours."""
    sock.curve_secretkey = curve.secret.encode()
    sock.curve_publickey = curve.public.encode()
    sock.curve_serverkey = curve.public.encode()


def secure_bind(sock: zmq.Socket, address: str, curve: Curve | None) -> None:
    """Bind, as a CURVE server on tcp:// when keys are given; warn about open tcp otherwise."""
    if is_tcp(address):
        if curve is not None:
            make_server(sock, curve)
        elif not is_loopback(address):
            log.warning("%s is bound without authentication: anyone who can reach it can read "
                        "and inject frames. Fix: run with --keys DIR ('omniflow keys generate DIR')",
                        address)
    sock.bind(address)


def secure_connect(sock: zmq.Socket, address: str, curve: Curve | None) -> None:
    if is_tcp(address) and curve is not None:
        make_client(sock, curve)
    sock.connect(address)


def is_loopback(address: str) -> bool:
    host = address.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    if host in ("*", ""):
        return False                             # every interface
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:                           # a host name (or an interface name)
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


class Refusals:
    """Refused peers of this process: counted by reason, each (reason, peer) logged once."""

    WHY = {"unknown_key": "its public key is not in the key directory (copy its .key file there)",
           "no_curve": "it does not use CURVE (run it with --keys too)",
           "wrong_server_key": "it encrypts to another server key (it holds another key directory)",
           "handshake": "its CURVE handshake failed"}
    MAX_LOGGED = 4096                     # (reason, peer) pairs remembered; then forgotten, logged anew

    def __init__(self):
        self._lock = threading.Lock()
        self.by_reason: dict[str, int] = {}
        self._logged: set[tuple[str, str]] = set()

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def refuse(self, reason: str, peer: str) -> None:
        with self._lock:
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
            first = (reason, peer) not in self._logged
            if first:
                if len(self._logged) >= self.MAX_LOGGED:
                    self._logged.clear()
                self._logged.add((reason, peer))
            count = self.by_reason[reason]
        if first:
            log.warning("refused a peer (%s) %s: %s. %d refused for this reason so far; this peer's "
                        "next refusals are counted, not logged", reason, peer, self.WHY.get(reason, reason), count)


REFUSALS = Refusals()
_FAILED = {zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "no_curve",
           zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "wrong_server_key"}
REFUSAL_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def note_monitor_event(event: dict) -> None:
    """A socket monitor's event (zmq.utils.monitor.recv_monitor_message) on a CURVE server socket:
    count and log a failed handshake. (Failed ZAP checks are the allow list's: not counted twice.)"""
    if event["event"] & REFUSAL_EVENTS:
        endpoint = event.get("endpoint", b"")
        endpoint = endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else str(endpoint)
        REFUSALS.refuse(_FAILED.get(event.get("value"), "handshake"), f"connecting to {endpoint}")


def watch_refusals(sock: zmq.Socket) -> zmq.Socket:
    """A monitor socket for `sock` (a CURVE server): poll it and pass each event to note_monitor_event."""
    return sock.get_monitor_socket(REFUSAL_EVENTS)


class _AllowList:
    """ZAP credentials provider: admits the allowed public keys, counts and logs the others."""

    def __init__(self, allowed: tuple[str, ...]):
        self.allowed = {k.encode() for k in allowed}

    @property
    def refused(self) -> int:
        return REFUSALS.total

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        REFUSALS.refuse("unknown_key", "with public key " + key.decode(errors="replace"))
        return False


class _Zap:
    """One `ThreadAuthenticator` per ZeroMQ context (ZeroMQ allows one ZAP handler per context),
    shared by every runtime on that context (threads of one process) and stopped with the last."""
    _lock = threading.Lock()
    _running: dict[int, list] = {}          # id(context) -> [authenticator, allow list, users]

    @classmethod
    def acquire(cls, ctx: zmq.Context, curve: Curve) -> _AllowList:
        from zmq.auth.thread import ThreadAuthenticator
        with cls._lock:
            entry = cls._running.get(id(ctx))
            if entry is None:
                auth = ThreadAuthenticator(ctx, log=logging.getLogger("omniflow.zap"))
                auth.start()
                allow = _AllowList(curve.allowed)
                auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=allow)
                entry = cls._running[id(ctx)] = [auth, allow, 0]
            entry[2] += 1
            return entry[1]

    @classmethod
    def release(cls, ctx: zmq.Context) -> None:
        with cls._lock:
            entry = cls._running.get(id(ctx))
            if entry is None:
                return
            entry[2] -= 1
            if entry[2] == 0:
                del cls._running[id(ctx)]
                entry[0].stop()                 # before ctx.term(), which would wait on its socket


def start_authenticator(ctx: zmq.Context, curve: Curve) -> _AllowList:
    """Start (or share) the ZAP handler of `ctx`; pair every call with `stop_authenticator`."""
    require_curve()
    return _Zap.acquire(ctx, curve)


def stop_authenticator(ctx: zmq.Context) -> None:
    _Zap.release(ctx)


# --- `omniflow keys` -------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    gen = sub.add_parser("generate", help="write a new key pair (one per run or cluster)")
    gen.add_argument("dir", help="directory for omniflow.key (public) and omniflow.key_secret")
    show = sub.add_parser("show", help="print the public key and the allowed client keys of DIR")
    show.add_argument("dir")
    api = sub.add_parser("api", help="API keys for the gateway's clients (see omniflow/apikeys.py)",
                         description="API keys: only clients holding one may open a gateway session "
                                     "(params.api_keys: the file)")
    api_sub = api.add_subparsers(dest="api_action", metavar="ACTION", required=True)
    for action, what in (("create", "a new key for NAME, printed once"), ("revoke", "remove NAME's key"),
                         ("list", "the names of the keys")):
        cmd = api_sub.add_parser(action, help=what)
        if action != "list":
            cmd.add_argument("name")
        cmd.add_argument("--file", default="keys/api.json", help="the keys file (default: keys/api.json)")


def main(args: argparse.Namespace) -> int:
    if args.action == "api":
        from .apikeys import main as api_main
        return api_main(args)
    try:
        if args.action == "generate":
            public, secret = generate_keys(args.dir)
            print(f"wrote {public} (public) and {secret} (secret, mode 600).\n"
                  f"Copy {args.dir} to every machine of the run (or make it a Kubernetes Secret), "
                  f"then: omniflow run GRAPH --keys {args.dir}")
        else:
            curve = Curve.load(args.dir)
            print(f"public key: {curve.public}")
            for key in curve.allowed:
                print(f"allowed client: {key}")
    except (OSError, ValueError, RuntimeError) as e:
        print(f"omniflow keys: {e}", file=sys.stderr)
        return 2
    return 0
