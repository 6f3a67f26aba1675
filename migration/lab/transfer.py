"""Moving a checkpoint over the shaped edge link as a real TCP byte stream.

The receiver runs inside the link namespace (``ip netns exec qmig-link python -m
migration.lab.transfer receive ...``), so every byte crosses the tbf-limited veth pair; the
sender is the orchestrator on the machine.  A SHA-256 trailer lets the receiver prove the
copy is whole before anything is restored from it.

The checkpoint is mostly memory pages.  The sender compresses on the fly with a *codec*
(``none``, ``gzip-1``, ``zstd-N``) and the receiver decompresses on the fly, so the
destination stores the plain tar that podman imports fastest.  Which codec is best depends
on the link: compressing and sending overlap, so a move costs about ``max(compress time,
wire time)`` and :func:`choose_codec` picks the codec that minimises it, measured on a
sample of the very memory that is about to move (zstd-1 at 1 Gbit/s, zstd-3 at 100 Mbit/s,
zstd-9 at 10 Mbit/s on this machine's broker).

Wire format: ``b"QMIGCKP3"``, one byte giving the codec name's length and the name, then
chunks each prefixed by its length (4 bytes, big endian), a zero length, and the 32-byte
SHA-256 of the chunk bytes (as sent, compressed).  The receiver answers
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol

from .net import LabError, in_netns, netns_exec

MAGIC = b"QMIGCKP3"
CHUNK = 1 << 20
ZSTD_LEVELS = (1, 3, 6, 9)
WIRE_OVERHEAD = 1.05  # TCP/IP headers and acks on the wire, roughly


class _Stream(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _Unstream(Protocol):
    def decompress(self, data: bytes) -> bytes: ...


class _Same:
    def compress(self, data: bytes) -> bytes:
        return data

    def decompress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def _zstd() -> ModuleType | None:
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def codecs() -> tuple[str, ...]:
    """The codecs this machine has: zstd only where the zstandard module is installed."""
    names = ["none", "gzip-1"]
    if _zstd() is not None:
        names += [f"zstd-{level}" for level in ZSTD_LEVELS]
    return tuple(names)


def _codec(codec: str) -> tuple[Callable[[], _Stream], Callable[[], _Unstream]]:
    """The (compressor, decompressor) factories of one of :func:`codecs`."""
    if codec not in codecs():
        raise LabError(f"unknown or unavailable codec {codec!r} (have: {', '.join(codecs())})")
    if codec == "none":
        return _Same, _Same
    if codec == "gzip-1":  # 31: gzip framing
        return lambda: zlib.compressobj(1, zlib.DEFLATED, 31), lambda: zlib.decompressobj(31)
    zstandard = _zstd()
    assert zstandard is not None  # codecs() lists zstd only then
    level = int(codec.split("-", 1)[1])
    return (lambda: zstandard.ZstdCompressor(level=level).compressobj(),
            lambda: zstandard.ZstdDecompressor().decompressobj())  # fmt: skip


def compressor(codec: str) -> _Stream:
    return _codec(codec)[0]()


def decompressor(codec: str) -> _Unstream:
    return _codec(codec)[1]()


@dataclass(frozen=True)
class CodecChoice:
    codec: str
    estimate_s: float  # for the whole payload at the link rate
    table: dict[str, dict[str, float]]  # codec -> ratio, MB/s, estimate


def choose_codec(sample: bytes, payload_bytes: int, rate_bps: float,
                 candidates: Sequence[str] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> CodecChoice:  # fmt: skip
    """The codec that moves ``payload_bytes`` like ``sample`` fastest over ``rate_bps``.

    Each candidate compresses the sample once; its ratio and speed give the move's time as
    ``max(compress, wire)`` (the sender overlaps the two).  Ties go to the cheaper codec.
    """
    table: dict[str, dict[str, float]] = {}
    best: tuple[float, str] | None = None
    for codec in candidates or codecs():
        start = clock()
        stream = compressor(codec)
        size = len(stream.compress(sample)) + len(stream.flush())
        seconds = max(clock() - start, 1e-6)
        ratio = size / max(1, len(sample))
        cpu = payload_bytes / (len(sample) / seconds) if codec != "none" else 0.0
        wire = payload_bytes * ratio * 8 * WIRE_OVERHEAD / rate_bps
        estimate = max(cpu, wire)
        table[codec] = {"ratio": round(ratio, 3), "mb_s": round(len(sample) / seconds / 1e6, 1),
                        "estimate_s": round(estimate, 3)}  # fmt: skip
        if best is None or estimate < best[0] * 0.97:  # 3 %: not worth more CPU
            best = (estimate, codec)
    assert best is not None
    return CodecChoice(best[1], best[0], table)


@dataclass
class TransferResult:
    bytes: int  # on the wire (compressed if it was)
    source_bytes: int
    seconds: float
    sha256: str
    codec: str = "none"

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


def send(path: Path, host: str, port: int, codec: str = "none",
         timeout: float = 600.0, ns: str | None = None) -> TransferResult:  # fmt: skip
    """Stream ``path`` (compressed on the fly with ``codec``) to a receiver, from namespace
    ``ns`` if given (an edge host with its own Podman sends from its own network).

    Returns once the receiver confirmed the byte count and digest.
    """
    source = path.stat().st_size
    digest = hashlib.sha256()
    sent = 0
    stream = compressor(codec)
    name = codec.encode()
    start = time.monotonic()
    try:
        with in_netns(ns):
            sock = socket.create_connection((host, port), timeout=10)
        with sock:
            sock.settimeout(timeout)
            sock.sendall(MAGIC + bytes([len(name)]) + name)

            def chunk_out(data: bytes) -> None:
                nonlocal sent
                if data:
                    digest.update(data)
                    sock.sendall(len(data).to_bytes(4, "big") + data)
                    sent += len(data)

            with open(path, "rb") as f:
                while block := f.read(CHUNK):
                    chunk_out(stream.compress(block))
            chunk_out(stream.flush())
            sock.sendall(b"\0\0\0\0" + digest.digest())
            sock.shutdown(socket.SHUT_WR)
            reply = sock.makefile("r").readline().strip()
    except OSError as exc:
        raise LabError(f"checkpoint transfer to {host}:{port} failed: {exc}") from exc
    seconds = time.monotonic() - start
    if not reply.startswith("OK "):
        raise LabError(f"checkpoint transfer refused by the receiver: {reply or 'no answer'}")
    return TransferResult(sent, source, seconds, digest.hexdigest(), codec)


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
        head = stream.read(len(MAGIC) + 1)
        name = stream.read(head[-1]).decode(errors="replace") if len(head) == len(MAGIC) + 1 else ""
        if head[: len(MAGIC)] != MAGIC:
            conn.sendall(b"ERR bad header\n")
            return 1
        try:
            unstream = decompressor(name)
        except LabError as exc:
            conn.sendall(f"ERR {exc}\n".encode())
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
                f.write(unstream.decompress(chunk))
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
