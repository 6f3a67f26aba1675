"""An edge host's Podman API on the network: mutual TLS in front of its unix socket.

podman 4.3's ``system service`` listens on a unix socket or on plain TCP, and plain TCP would
give anyone who reaches the port root on the host.  A real edge host is reached through
``ssh://`` or a TLS terminator; the per-host lab runs this terminator in each host's network
namespace, on the host's uplink address, so the lab's every Podman API call crosses the lab
network to an address, as it would to another machine.  Its rules:

- TLS 1.3 only; the server presents the host's own certificate (issued by the lab's Podman CA
  for the host's address, no other host's);
- the client must present a certificate from that CA (the orchestrator's): without one, or
  with one from another CA, the handshake fails and not a byte reaches Podman;
- an accepted connection is piped to the unix socket both ways until either side closes;
  at most ``MAX_CONNECTIONS`` at a time (more are closed at once), each handshake bounded by
  ``HANDSHAKE_TIMEOUT``.

``python -m migration.lab.apifront --listen ADDR:PORT --socket PATH --cert F --key F --ca F``
serves until SIGTERM; refusals go to stderr, one line each.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

MAX_CONNECTIONS = 64
HANDSHAKE_TIMEOUT = 10.0
CHUNK = 256 * 1024


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def serve(listener: socket.socket, socket_path: Path, ctx: ssl.SSLContext) -> None:
    """Accept on ``listener`` until it is closed, one thread per connection.

    Blocking sockets, on purpose: the handshake reads the client's first bytes itself (an
    asyncio stream upgraded with ``start_tls`` can lose a ClientHello that arrived first).
    """
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    while True:
        try:
            conn, peer = listener.accept()
        except OSError:
            return  # closed: stopping
        if not slots.acquire(blocking=False):
            _say(f"refused {peer}: {MAX_CONNECTIONS} connections already open")
            conn.close()
            continue
        threading.Thread(target=_serve_one, args=(conn, peer, socket_path, ctx, slots.release),
                         daemon=True).start()  # fmt: skip


def _serve_one(conn: socket.socket, peer: object, socket_path: Path, ctx: ssl.SSLContext,
               done: Callable[[], None]) -> None:  # fmt: skip
    try:
        conn.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls = ctx.wrap_socket(conn, server_side=True)  # the handshake, client cert checked
        except (OSError, ssl.SSLError) as exc:
            _say(f"refused {peer}: {exc!r}")
            conn.close()
            return
        tls.settimeout(None)
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            up.connect(str(socket_path))
        except OSError as exc:
            _say(f"Podman's socket {socket_path}: {exc}")
            up.close()
            tls.close()
            return
        back = threading.Thread(target=_pump, args=(up, tls), daemon=True)
        back.start()
        _pump(tls, up)
        back.join()
        tls.close()
        up.close()
    finally:
        done()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy until EOF or an error on either side, then shut both sockets down, which ends
    the other direction's copy too."""
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the TCP/unix socket itself


def _say(line: str) -> None:
    print(f"apifront: {line}"[:300], file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migration.lab.apifront",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--listen", required=True, help="ADDR:PORT")
    parser.add_argument("--socket", required=True, type=Path, help="Podman's API socket")
    parser.add_argument("--cert", required=True, type=Path)
    parser.add_argument("--key", required=True, type=Path)
    parser.add_argument("--ca", required=True, type=Path, help="the CA of allowed clients")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--listen {args.listen!r}: expected ADDR:PORT")
    try:
        ctx = server_context(args.cert, args.key, args.ca)
    except (OSError, ssl.SSLError) as exc:
        print(f"apifront: cannot load the TLS files: {exc}", file=sys.stderr)
        return 2

    try:
        listener = socket.create_server((host, int(port)))
    except OSError as exc:
        print(f"apifront: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: listener.close())
    signal.signal(signal.SIGINT, lambda *_: listener.close())
    serve(listener, args.socket, ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
