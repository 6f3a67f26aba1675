"""Where an idle QUIC client's bytes go in the broker (issue #16): tracemalloc, in-process.

``python -m qmig.benchmarks.quic_memory --clients 300`` starts a :class:`BrokerServer` in
this process on loopback, connects ``--clients`` idle MQTT-over-QUIC clients from a child
process (so their memory is not counted), and prints, per connection:

- the heap diff (tracemalloc snapshot after the clients connected minus before), grouped
  by allocation site (file:line of the innermost frame) and by file;
- the deep size of each attribute of one broker-side ``MigratingQuicConnection`` (objects
  shared by every connection, such as the configuration, are left out; a ``Buffer``
  counts its capacity, which it allocates with PyMem_Malloc);
- the process's RSS growth, for comparison with ``qmig bench broker``'s figure.

It is a measuring tool for docs/design/quic-memory.md, not a test: numbers vary a little
with the Python build and aioquic's version.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import gc
import json
import os
import socket
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import psutil

HOST = "127.0.0.1"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- the clients


async def _hold(port: int, cafile: str, count: int, streams: str) -> None:
    from client.client import Client

    clients = []
    for k in range(count):
        c = Client(
            HOST, port, transport="quic", cafile=cafile, client_id=f"mem{k}",
            keep_alive=600, streams=streams, reconnect=False,
        )  # fmt: skip
        await c.connect()
        clients.append(c)
    print(json.dumps({"ready": len(clients)}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # the parent says stop
    for c in clients:
        await c.disconnect()


# --------------------------------------------------------------------------- deep size


def _deep_size(obj: Any, seen: set[int], shared: set[int]) -> int:
    from aioquic.buffer import Buffer

    if id(obj) in seen or id(obj) in shared or isinstance(obj, (enum.Enum, type)):
        return 0  # enum members and classes belong to no connection
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, Buffer):
        return size + obj.capacity
    if isinstance(obj, (str, bytes, bytearray, int, float, bool, type(None))):
        return size
    if isinstance(obj, dict):
        return size + sum(
            _deep_size(k, seen, shared) + _deep_size(v, seen, shared) for k, v in obj.items()
        )
    if isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
        return size + sum(_deep_size(v, seen, shared) for v in obj)
    if callable(obj) and not hasattr(obj, "__dict__"):
        return size  # bound methods, builtins: their target is counted where it lives
    state = getattr(obj, "__dict__", None)
    if state is not None:
        size += _deep_size(state, seen, shared)
    for slot in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, slot):
            size += _deep_size(getattr(obj, slot), seen, shared)
    return size


def attribute_sizes(quic: Any, shared: list[Any]) -> list[tuple[str, int]]:
    """Deep size of each attribute of one connection, largest first (shared objects left out)."""
    skip = {id(o) for o in shared}
    skip.add(id(quic))
    seen: set[int] = set()
    out = [(name, _deep_size(value, seen, skip)) for name, value in vars(quic).items()]
    return sorted(out, key=lambda item: -item[1])


# --------------------------------------------------------------------------- the broker


async def measure(count: int, streams: str, top: int) -> dict[str, Any]:
    from broker.certs import make_lab_certs
    from broker.config import BrokerConfig
    from broker.server import BrokerServer

    tmp = Path(tempfile.mkdtemp(prefix="quic-memory-"))
    certs = make_lab_certs(tmp / "certs")
    port = _free_udp_port()
    config = BrokerConfig(
        host=HOST, tcp_port=0, tls_port=0, mptcp_port=0, quic_port=port,
        cert=str(certs.server_cert), key=str(certs.server_key), sys_interval=0,
        quic_max_handshakes=max(256, count),
    ).validate()  # fmt: skip
    server = BrokerServer(config)
    await server.start()
    proc = psutil.Process()
    child = None
    try:
        await _clients(port, str(certs.ca_cert), 3, streams)  # warm caches up: not counted
        gc.collect()
        await asyncio.sleep(0.5)
        tracemalloc.start(8)
        gc.collect()
        before = tracemalloc.take_snapshot()
        rss_before = proc.memory_info().rss
        child, ready = await _start_clients(port, str(certs.ca_cert), count, streams)
        await asyncio.sleep(1.0)
        gc.collect()
        after = tracemalloc.take_snapshot()
        rss_after = proc.memory_info().rss
        tracemalloc.stop()
        protocols = [p for p in server.quic_protocols if p.conn is not None]
        quic = protocols[0]._quic
        shared = [quic._configuration, quic._logger, quic._loss._cc]
        shared += _shared_by_connections()
        report = _report(before, after, ready, top)
        report["rss_delta_bytes_per_connection"] = (rss_after - rss_before) / ready
        report["attributes"] = attribute_sizes(quic, shared)[:top]
        report["attributes_total"] = sum(size for _, size in attribute_sizes(quic, shared))
        return report
    finally:
        if child is not None:
            await _stop_clients(child)
        await server.stop()


def _shared_by_connections() -> list[Any]:
    """The adapter's objects that every connection points at (absent before issue #16)."""
    from quicmig import connection

    names = ("DISCARDED_KEYS", "DISCARDED_SPACE", "_FrameHandlers")
    found = [getattr(connection, name) for name in names if hasattr(connection, name)]
    table = getattr(getattr(connection, "_FrameHandlers", None), "_table", None)
    return [*found, table] if table is not None else found


async def _clients(port: int, cafile: str, count: int, streams: str) -> None:
    child, _ = await _start_clients(port, cafile, count, streams)
    await _stop_clients(child)


async def _start_clients(
    port: int, cafile: str, count: int, streams: str
) -> tuple[asyncio.subprocess.Process, int]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmig.benchmarks.quic_memory", "--hold", str(port),
        "--cafile", cafile, "--clients", str(count), "--streams", streams,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), 60 + count / 20)
    if not line:
        raise RuntimeError("the client process ended before its clients connected")
    return child, int(json.loads(line)["ready"])


async def _stop_clients(child: asyncio.subprocess.Process) -> None:
    assert child.stdin is not None
    child.stdin.write(b"stop\n")
    try:
        await asyncio.wait_for(child.wait(), 30)
    except TimeoutError:
        child.kill()
        await child.wait()


def _report(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, count: int, top: int
) -> dict[str, Any]:
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(ignore), after.filter_traces(ignore)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def short(name: str) -> str:
        for marker in ("site-packages" + os.sep, root + os.sep):
            if marker in name:
                return name.split(marker, 1)[1]
        return name

    sites = [s for s in after.compare_to(before, "lineno") if s.size_diff > 0]
    files = [s for s in after.compare_to(before, "filename") if s.size_diff > 0]
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    return {
        "connections": count,
        "heap_bytes_per_connection": total / count,
        "sites": [
            (f"{short(s.traceback[0].filename)}:{s.traceback[0].lineno}", s.size_diff / count)
            for s in sites[:top]
        ],
        "files": [(short(s.traceback[0].filename), s.size_diff / count) for s in files[:top]],
    }


def _print(report: dict[str, Any]) -> None:
    n = report["connections"]
    print(f"{n} idle QUIC connections")
    print(f"heap (tracemalloc) per connection: {report['heap_bytes_per_connection']:,.0f} B")
    print(f"RSS per connection:                {report['rss_delta_bytes_per_connection']:,.0f} B")
    print("\ntop allocation sites, bytes per connection:")
    for where, size in report["sites"]:
        print(f"  {size:9,.0f}  {where}")
    print("\nby file, bytes per connection:")
    for where, size in report["files"]:
        print(f"  {size:9,.0f}  {where}")
    print(f"\none connection's attributes (deep, unshared): {report['attributes_total']:,} B")
    for name, size in report["attributes"]:
        print(f"  {size:9,}  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qmig.benchmarks.quic_memory")
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--streams", default="single", choices=("single", "per-qos", "per-topic"))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--hold", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cafile", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hold is not None:
        asyncio.run(_hold(args.hold, args.cafile, args.clients, args.streams))
        return 0
    report = asyncio.run(measure(args.clients, args.streams, args.top))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
