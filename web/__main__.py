"""python -m web [--host 127.0.0.1] [--port 8000] [--bundles ./bundles]

Binds first, then prints where it listens and the URL to open, then hands the socket to uvicorn; a port already in
use is reported before anything claims to be serving, and --port 0 prints the port the system picked.
"""
from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path

import uvicorn

from .app import create_app, list_bundles

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m web", description="Tiny-QMoE development server")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, loopback only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--bundles", type=Path, default=Path("bundles"), help="folder of bundle folders (default ./bundles)")
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def describe(host: str, port: int) -> list[str]:
    """The lines printed at start-up: where we listen, who can reach it, and which URL to open.

    Why the last line differs: the page needs crossOriginIsolated for threads, and browsers grant that only in a
    secure context, which over plain http means localhost / 127.0.0.1 only. Other machines get no threads."""
    if _is_loopback(host):
        return [f"serving on {_url(host, port)} (loopback only; use --host 0.0.0.0 to expose)",
                f"open {_url(host, port)}/"]
    if host in WILDCARD_HOSTS:
        return [f"serving on {_url(host, port)} (all interfaces: anyone who can reach this machine can download "
                f"the bundles; use --host 127.0.0.1 for loopback only)",
                f"open http://localhost:{port}/ (from other machines plain http is not a secure context, "
                f"so the page runs without threads)"]
    return [f"serving on {_url(host, port)} (reachable from the network at {host})",
            f"open {_url(host, port)}/ (not localhost: plain http is not a secure context, so the page runs "
            f"without threads)"]


def bind(host: str, port: int) -> socket.socket:
    family, type_, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, type_, proto)
    if sys.platform != "win32":                 # on Windows SO_REUSEADDR would let two servers share the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve(host: str, port: int, bundles: Path) -> int:
    app = create_app(bundles)
    try:
        sock = bind(host, port)
    except OSError as e:
        print(f"cannot listen on {_url(host, port)}: {e}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    found = list_bundles(bundles)
    print(f"bundles: {bundles.resolve()} ({len(found)} found"
          f"{'' if bundles.is_dir() else '; the folder does not exist yet'})", flush=True)
    for line in describe(host, port):
        print(line, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = configure_parser().parse_args(argv)
    return serve(**vars(args))


if __name__ == "__main__":
    sys.exit(main())
