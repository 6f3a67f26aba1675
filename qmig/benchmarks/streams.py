"""``qmig bench streams``: head-of-line blocking, single-stream against multi-stream QUIC.

One subscriber takes a bulk topic (QoS 0, ``--bulk-rate`` messages/s of ``--bulk-size``
bytes) and a probe topic (QoS 0, ``--probe-rate`` messages/s carrying their send time) over
one QUIC connection.  Between it and the broker sits a relay that delays every datagram by
``--delay-ms`` each way and drops ``--loss`` % of the broker's datagrams.  In single-stream
mode a lost bulk datagram holds back every later byte of the one stream, probes included,
until its retransmission arrives; with a stream per topic only the bulk stream waits.  The
probes' latency (median, p95, p99, max) shows what multi-stream mode is for.

Everything runs in this process on loopback (broker, relay, publisher, subscriber), so the
absolute figures include one event loop's queueing; the modes are compared on equal terms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODES = ("single", "per-topic")
HOST = "127.0.0.1"


@dataclass
class Settings:
    loss: float = 3.0  # percent of the broker's datagrams dropped
    delay_ms: float = 20.0  # one way
    seconds: float = 10.0
    bulk_rate: float = 100.0  # under what 3 % loss and 40 ms RTT let Reno carry
    bulk_size: int = 1000
    probe_rate: float = 50.0
    seed: int = 1


class DelayLossRelay(asyncio.DatagramProtocol):
    """UDP relay for one client: ``delay`` each way, ``loss`` of the broker's datagrams."""

    def __init__(self, broker_port: int, delay: float, loss: float, seed: int) -> None:
        self.broker = (HOST, broker_port)
        self.delay = delay
        self.loss = loss
        self.rng = random.Random(seed)
        self.client: Any = None
        self.dropped = 0
        self.forwarded = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.upstream: asyncio.DatagramTransport | None = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(HOST, 0))
        relay = self

        class Upstream(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                relay.from_broker(data)

        self.upstream, _ = await loop.create_datagram_endpoint(Upstream, remote_addr=self.broker)
        return int(self.transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client = addr
        upstream = self.upstream
        if upstream is not None:
            asyncio.get_running_loop().call_later(self.delay, _send, upstream, data, None)

    def from_broker(self, data: bytes) -> None:
        if self.rng.random() < self.loss:
            self.dropped += 1
            return
        self.forwarded += 1
        transport, client = self.transport, self.client
        if transport is not None and client is not None:
            asyncio.get_running_loop().call_later(self.delay, _send, transport, data, client)

    def close(self) -> None:
        for t in (self.transport, self.upstream):
            if t is not None:
                t.close()


def _send(transport: asyncio.DatagramTransport, data: bytes, addr: Any) -> None:
    if not transport.is_closing():  # the relay may have closed while this was delayed
        transport.sendto(data, addr)


def summarize(latencies_ms: list[float]) -> dict[str, float | int | None]:
    values = sorted(latencies_ms)
    if not values:
        return {"count": 0, "median": None, "p95": None, "p99": None, "max": None}

    def q(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))], 2)

    return {"count": len(values), "median": q(0.5), "p95": q(0.95), "p99": q(0.99),
            "max": round(values[-1], 2)}  # fmt: skip


async def _pace(rate: float, stop_at: float, send: Any) -> int:
    """Await ``send(seq)`` ``rate`` times a second until ``stop_at`` (loop time)."""
    loop = asyncio.get_running_loop()
    start, seq = loop.time(), 0
    while (now := loop.time()) < stop_at:
        due = start + seq / rate
        if due > now:
            await asyncio.sleep(due - now)
        await send(seq)
        seq += 1
    return seq


async def run_mode(mode: str, s: Settings, broker_port: int, tcp_port: int,
                   cafile: str) -> dict[str, Any]:  # fmt: skip
    from client.client import Client

    relay = DelayLossRelay(broker_port, s.delay_ms / 1000, s.loss / 100, s.seed)
    relay_port = await relay.start()
    root = f"hol/{mode}/{time.monotonic_ns()}"
    probes: list[float] = []
    bulk_received = 0
    loop = asyncio.get_running_loop()
    try:
        async with (
            Client(HOST, relay_port, transport="quic", cafile=cafile, streams=mode,
                   connect_timeout=10) as sub,
            Client(HOST, tcp_port, transport="tcp") as pub,
        ):  # fmt: skip
            await sub.subscribe(f"{root}/bulk", qos=0)
            await sub.subscribe(f"{root}/probe", qos=0)

            async def receive() -> None:
                nonlocal bulk_received
                async for message in sub.messages():
                    if message.topic.endswith("/probe"):
                        (sent,) = struct.unpack("!d", message.payload[:8])
                        probes.append((loop.time() - sent) * 1000)
                    else:
                        bulk_received += 1

            reader = asyncio.create_task(receive())
            stop_at = loop.time() + s.seconds
            filler = b"b" * s.bulk_size

            async def bulk(seq: int) -> None:
                await pub.publish(f"{root}/bulk", filler)

            async def probe(seq: int) -> None:
                await pub.publish(f"{root}/probe", struct.pack("!d", loop.time()))

            sent_bulk, sent_probes = await asyncio.gather(
                _pace(s.bulk_rate, stop_at, bulk), _pace(s.probe_rate, stop_at, probe)
            )
            await asyncio.sleep(1.0 + 4 * s.delay_ms / 1000)  # let retransmissions land
            reader.cancel()
    finally:
        relay.close()
    return {
        "mode": mode,
        "probe_latency_ms": summarize(probes),
        "probes_sent": sent_probes,
        "bulk_sent": sent_bulk,
        "bulk_received": bulk_received,
        "datagrams_dropped": relay.dropped,
        "datagrams_forwarded": relay.forwarded,
    }


async def run_all(s: Settings, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    from broker.certs import make_lab_certs
    from broker.config import BrokerConfig
    from broker.server import BrokerServer

    from .brokers import free_port, free_udp_port

    with tempfile.TemporaryDirectory(prefix="qmig-bench-streams-") as tmp:
        certs = make_lab_certs(Path(tmp), hosts=["localhost", HOST])
        config = BrokerConfig(
            host=HOST, tcp_port=free_port(), tls_port=0, mptcp_port=0,
            quic_port=free_udp_port(), cert=str(certs.server_cert), key=str(certs.server_key),
            sys_interval=0,
        ).validate()  # fmt: skip
        server = BrokerServer(config)
        await server.start()
        try:
            results = []
            for mode in modes:
                _log(f"{mode}: {s.seconds:g} s, loss {s.loss:g} %, delay {s.delay_ms:g} ms")
                results.append(await run_mode(mode, s, config.quic_port, config.tcp_port,
                                              str(certs.ca_cert)))  # fmt: skip
        finally:
            await server.stop()
    return {"benchmark": "streams", "settings": asdict(s), "results": results}


def _log(message: str) -> None:
    print(f"qmig bench streams: {message}", file=sys.stderr, flush=True)


def render_table(report: dict[str, Any], file: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    table = Table(title=f"probe latency (ms), {s['loss']:g} % loss, {s['delay_ms']:g} ms each "
                  f"way, bulk {s['bulk_rate']:g} x {s['bulk_size']} B/s")  # fmt: skip
    for col in ("mode", "median", "p95", "p99", "max", "probes", "bulk recv/sent", "dropped"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in report["results"]:
        lat = r["probe_latency_ms"]
        table.add_row(
            r["mode"],
            *(str(lat[k]) for k in ("median", "p95", "p99", "max")),
            f"{lat['count']}/{r['probes_sent']}",
            f"{r['bulk_received']}/{r['bulk_sent']}",
            str(r["datagrams_dropped"]),
        )
    Console(file=file).print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument(
        "--loss",
        type=float,
        default=d.loss,
        help=f"percent of the broker's datagrams dropped (default {d.loss:g})",
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=d.delay_ms,
        help=f"one-way delay added by the relay (default {d.delay_ms:g})",
    )
    parser.add_argument(
        "--seconds", type=float, default=d.seconds, help=f"traffic per mode (default {d.seconds:g})"
    )
    parser.add_argument("--bulk-rate", type=float, default=d.bulk_rate)
    parser.add_argument("--bulk-size", type=int, default=d.bulk_size)
    parser.add_argument("--probe-rate", type=float, default=d.probe_rate)
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1 s per mode")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the JSON report to PATH, or stdout without PATH")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    s = Settings(loss=args.loss, delay_ms=args.delay_ms,
                 seconds=1.0 if args.quick else args.seconds, bulk_rate=args.bulk_rate,
                 bulk_size=args.bulk_size, probe_rate=args.probe_rate)  # fmt: skip
    report = asyncio.run(run_all(s))
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        render_table(report, sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
