"""Moving a checkpoint over the shaped edge link as a real TCP byte stream.

The receiver runs inside the link namespace (``ip netns exec qmig-link python -m
migration.lab.transfer receive ...``), so every byte crosses the tbf-limited veth pair; the
sender is the orchestrator on the machine.  A SHA-256 trailer lets the receiver prove the
copy is whole before anything is restored from it.

The checkpoint is mostly memory pages, which gzip at level 1 shrinks about 4x in about
0.2 s for 26 MB: on an edge link (100 Mbit/s) that saves seconds of downtime, so the sender
compresses on the fly by default and the receiver stores the ``.tar.gz`` that podman's
import-restore reads as it is.

Wire format: ``b"QMIGCKP2"``, then chunks each prefixed by its length (4 bytes, big
endian), a zero length, and the 32-byte SHA-256 of the chunk bytes.  The receiver answers
``OK <bytes> <hex digest>\\n`` or ``ERR <reason>\\n``.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from .net import LabError, netns_exec

MAGIC = b"QMIGCKP2"
CHUNK = 1 << 20


@dataclass
class TransferResult:
    bytes: int  # on the wire (compressed if it was)
    source_bytes: int
    seconds: float
    sha256: str

    @property
    def mbit_per_s(self) -> float:
        return self.bytes * 8 / 1e6 / self.seconds if self.seconds else 0.0


class Receiver:
    """A one-shot receiver process in ``ns``, writing to ``out``; started before the dump."""

    def __init__(self, ns: str, host: str, port: int, out: Path,
                 fail_after: int | None = None) -> None:  # fmt: skip
        cmd = [sys.executable, "-m", "migration.lab.transfer", "receive", "--host", host,
               "--port", str(port), "--out", str(out)]  # fmt: skip
        if fail_after is not None:
            cmd += ["--fail-after", str(fail_after)]
        self.proc = subprocess.Popen(netns_exec(ns, *cmd), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "LISTENING":
            self.stop()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise LabError(f"checkpoint receiver did not start: {err.strip() or line.strip()}")
        self.host, self.port, self.out = host, port, out

    def result(self, timeout: float) -> str:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise LabError(f"checkpoint receiver did not finish within {timeout:g} s") from None
        if self.proc.returncode != 0:
            raise LabError(f"checkpoint receiver failed: {(err or out).strip()}")
        return out.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def send(path: Path, host: str, port: int, compress: bool = True,
         timeout: float = 600.0) -> TransferResult:  # fmt: skip
    """Stream ``path`` (gzip-compressed on the fly if ``compress``) to a receiver.

    Returns once the receiver confirmed the byte count and digest.
    """
    source = path.stat().st_size
    digest = hashlib.sha256()
    sent = 0
    gz = zlib.compressobj(1, zlib.DEFLATED, 31) if compress else None  # 31: gzip framing
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.settimeout(timeout)
            sock.sendall(MAGIC)

            def chunk_out(data: bytes) -> None:
                nonlocal sent
                if data:
                    digest.update(data)
                    sock.sendall(len(data).to_bytes(4, "big") + data)
                    sent += len(data)

            with open(path, "rb") as f:
                while block := f.read(CHUNK):
                    chunk_out(gz.compress(block) if gz else block)
            if gz:
                chunk_out(gz.flush())
            sock.sendall(b"\0\0\0\0" + digest.digest())
            sock.shutdown(socket.SHUT_WR)
            reply = sock.makefile("r").readline().strip()
    except OSError as exc:
        raise LabError(f"checkpoint transfer to {host}:{port} failed: {exc}") from exc
    seconds = time.monotonic() - start
    if not reply.startswith("OK "):
        raise LabError(f"checkpoint transfer refused by the receiver: {reply or 'no answer'}")
    return TransferResult(sent, source, seconds, digest.hexdigest())


def receive(host: str, port: int, out: Path, fail_after: int | None = None,
            timeout: float = 600.0) -> int:  # fmt: skip
    """Accept one sender, write its bytes to ``out``, check length and digest."""
    with socket.create_server((host, port), reuse_port=False) as server:
        server.settimeout(timeout)
        print("LISTENING", flush=True)
        conn, _ = server.accept()
    with conn:
        conn.settimeout(timeout)
        stream = conn.makefile("rb")
        if stream.read(len(MAGIC)) != MAGIC:
            conn.sendall(b"ERR bad header\n")
            return 1
        digest = hashlib.sha256()
        got = 0
        with open(out, "wb") as f:
            while True:
                if fail_after is not None and got >= fail_after:
                    print(f"failing on purpose after {got} bytes", file=sys.stderr)
                    return 3  # the link "breaks": the sender sees a reset
                head = stream.read(4)
                if len(head) != 4:
                    conn.sendall(f"ERR stream cut after {got} bytes\n".encode())
                    return 2
                size = int.from_bytes(head, "big")
                if size == 0:
                    break
                chunk = stream.read(size)
                if len(chunk) != size:
                    conn.sendall(f"ERR stream cut after {got} bytes\n".encode())
                    return 2
                digest.update(chunk)
                f.write(chunk)
                got += size
        if stream.read(32) != digest.digest():
            conn.sendall(f"ERR bad digest after {got} bytes\n".encode())
            return 2
        conn.sendall(f"OK {got} {digest.hexdigest()}\n".encode())
    print(f"OK {got} {digest.hexdigest()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migration.lab.transfer")
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("receive")
    r.add_argument("--host", required=True)
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--fail-after", type=int, default=None)
    args = parser.parse_args(argv)
    return receive(args.host, args.port, args.out, args.fail_after)


if __name__ == "__main__":
    sys.exit(main())
