"""Forged QUIC Initials and abandoned handshakes: what they leave in the broker.

Two phases at the broker's QUIC port: ``--quic-flood-packets`` random 1,200-byte datagrams
shaped like Initials (version 1, fresh connection IDs, bytes that decrypt to nothing), then
``--quic-flood-handshakes`` real aioquic ClientHellos whose clients go silent once the broker
answers (a Retry is followed once, as a client on a real address would).  Meanwhile a TCP
bystander pings (StallMeter), a QUIC bystander publishes to itself and waits for each
message, and a new QUIC client connects every second.  Afterwards the probe watches for
``--quic-flood-watch`` seconds how long the broker keeps the connection objects.

Connection objects are counted with the control API's status: QUIC connections that did not
advertise qmig's transport parameter (every forged and abandoned one; the probe's own QUIC
clients advertise it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shlex
import socket
import ssl
import threading
import time
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from client.client import Client
from migration.control import ControlError, control_request
from qmig.benchmarks.abuse import Context, StallMeter, rss_mb
from qmig.benchmarks.brokers import HOST, RunningBroker, free_port

NAME = "quic-flood"
HELP = "forged Initials + abandoned handshakes at the QUIC port: state kept, memory, stalls, Retry"

DATAGRAM = 1200
BATCH = 100  # forged datagrams per burst, then a short pause (at most ~10,000/s)
PAUSE = 0.01
HANDSHAKE_BATCH = 20
CID_LENGTH = 8  # aioquic's host connection ID length: replies carry the client's in their DCID
SAMPLE_INTERVAL = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quic-flood-packets",
        type=int,
        default=10_000,
        metavar="N",
        help="quic-flood: forged Initial datagrams (default 10000)",
    )
    parser.add_argument(
        "--quic-flood-handshakes",
        type=int,
        default=2_000,
        metavar="N",
        help="quic-flood: abandoned real handshakes (default 2000)",
    )
    parser.add_argument(
        "--quic-flood-watch",
        type=float,
        default=20.0,
        metavar="S",
        help="quic-flood: seconds to watch the clean-up afterwards (default 20)",
    )
    parser.add_argument(
        "--quic-flood-broker",
        default="",
        metavar="OPTIONS",
        help="quic-flood: more qmig broker options, e.g. '--quic-retry always'",
    )


def forged_initial() -> bytes:
    """A long-header Initial (version 1) with random connection IDs and random 'ciphertext'."""
    head = (
        bytes([0xC3]) + (1).to_bytes(4, "big")
        + bytes([CID_LENGTH]) + os.urandom(CID_LENGTH)
        + bytes([CID_LENGTH]) + os.urandom(CID_LENGTH)
        + b"\x00"  # no token
    )  # fmt: skip
    rest = DATAGRAM - len(head) - 2
    return head + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)


class Sampler:
    """Broker RSS every 0.1 s, and its QUIC connection objects via the control API."""

    def __init__(self, b: RunningBroker, control_port: int, token: str) -> None:
        self.b, self.control_port, self.token = b, control_port, token
        self.rss_peak = rss_mb(b)
        self.objects_peak = 0
        self.objects: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def count(self) -> int | None:
        try:
            status = asyncio.run(control_request(
                HOST, self.control_port, self.token, "status", timeout=2.0
            ))  # fmt: skip
        except ControlError:
            return None  # the broker did not answer in time (stalled)
        return int(status["quic_clients_by_strategy"]["none"])

    def _run(self) -> None:
        last_count = 0.0
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.rss_peak = max(self.rss_peak, rss_mb(self.b))
            if time.monotonic() - last_count >= 0.5:
                last_count = time.monotonic()
                objects = self.count()
                if objects is not None:
                    self.objects = objects
                    self.objects_peak = max(self.objects_peak, objects)
            self._stop.wait(SAMPLE_INTERVAL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


class QuicBystander:
    """A QUIC client doing QoS 1 request/response to itself, and a new client every second."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.delays: list[float] = []
        self.waiting_since: float | None = None
        self.connects: list[float] = []
        self.connect_failures = 0
        self.lost = False
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self.ready.wait(15.0):
            raise ConnectionError("the QUIC bystander could not connect")

    def _client(self, name: str) -> Client:
        return Client(HOST, self.port, transport="quic", insecure=True, reconnect=False,
                      client_id=f"{name}-{secrets.token_hex(4)}", connect_timeout=30.0)  # fmt: skip

    async def _main(self) -> None:
        client = self._client("abuse-quic-bystander")
        await client.connect()
        topic = f"abuse/quic/{client.client_id}"
        await client.subscribe(topic, qos=1)
        self.ready.set()
        newcomers = asyncio.create_task(self._newcomers())
        try:
            while not self._stop.is_set():
                sent = time.monotonic()
                self.waiting_since = sent
                await client.publish(topic, b"ping", qos=1)
                await client.next_message(timeout=120.0)
                self.delays.append(time.monotonic() - sent)
                self.waiting_since = None
                await asyncio.sleep(0.02)
        except Exception:
            self.lost = True
        finally:
            newcomers.cancel()
            with contextlib.suppress(BaseException):
                await newcomers
            with contextlib.suppress(Exception):
                await client.disconnect()

    async def _newcomers(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            client = self._client("abuse-quic-newcomer")
            try:
                await client.connect()
                self.connects.append(time.monotonic() - started)
            except Exception:
                self.connect_failures += 1
            finally:
                with contextlib.suppress(Exception):
                    await client.disconnect()
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

    def stop(self) -> dict[str, Any]:
        now = time.monotonic()
        self._stop.set()
        self._thread.join(10.0)
        pending = now - self.waiting_since if self.waiting_since is not None else 0.0
        delays = sorted(self.delays)
        worst = max([*delays, pending])
        return {
            "quic_round_trips": len(delays),
            "quic_rtt_worst_ms": round(worst * 1000, 1),
            "quic_rtt_median_ms": round(delays[len(delays) // 2] * 1000, 2) if delays else None,
            "quic_bystander_lost": self.lost,
            "quic_new_connects": len(self.connects),
            "quic_new_connect_failures": self.connect_failures,
            "quic_new_connect_worst_ms": round(max(self.connects) * 1000, 1)
            if self.connects
            else None,
        }


def flood(port: int, count: int) -> int:
    """Send ``count`` forged Initials; returns how many datagrams came back."""
    replies = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for i in range(count):
            with contextlib.suppress(BlockingIOError):
                sock.sendto(forged_initial(), (HOST, port))
            if i % BATCH == BATCH - 1:
                time.sleep(PAUSE)
        time.sleep(0.5)
        with contextlib.suppress(BlockingIOError):
            while sock.recv(65536):
                replies += 1
    return replies


def abandoned_handshakes(port: int, count: int) -> dict[str, int]:
    """``count`` ClientHellos whose clients never finish; each follows one Retry first."""
    addr = (HOST, port)
    config = QuicConfiguration(is_client=True, alpn_protocols=["mqtt"], verify_mode=ssl.CERT_NONE)
    waiting: dict[bytes, tuple[QuicConnection, float]] = {}  # by the client's connection ID
    seen = {"retry_received": 0, "server_flights": 0}

    def drain(sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
            except ValueError:
                continue
            entry = waiting.pop(header.destination_cid, None)
            if header.packet_type == QuicPacketType.RETRY:
                seen["retry_received"] += 1
                if entry is not None:  # follow it once, then go silent like the others
                    conn = entry[0]
                    conn.receive_datagram(data, addr, now=time.monotonic())
                    for datagram, _ in conn.datagrams_to_send(now=time.monotonic()):
                        sock.sendto(datagram, addr)
                    waiting[header.destination_cid] = (conn, time.monotonic())
            elif entry is not None:
                seen["server_flights"] += 1

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.setblocking(False)
        for i in range(count):
            conn = QuicConnection(configuration=config)
            now = time.monotonic()
            conn.connect(addr, now=now)
            waiting[conn.host_cid] = (conn, now)
            for datagram, _ in conn.datagrams_to_send(now=now):
                sock.sendto(datagram, addr)
            if i % HANDSHAKE_BATCH == HANDSHAKE_BATCH - 1:
                time.sleep(PAUSE)
                drain(sock)
                for cid, (_, since) in list(waiting.items()):
                    if now - since > 2.0:
                        del waiting[cid]  # bounded: the probe's own memory
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            drain(sock)
            time.sleep(0.02)
    return seen


def run(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    token = secrets.token_hex(16)
    token_file = ctx.workdir / "control.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    control_port = free_port()
    extra = ["--control-port", str(control_port), "--control-token-file", str(token_file)]
    b = ctx.broker(extra=[*extra, *shlex.split(args.quic_flood_broker)], quic=True)
    sampler = Sampler(b, control_port, token)
    time.sleep(0.6)
    figures: dict[str, Any] = {
        "forged_initials": args.quic_flood_packets,
        "abandoned_handshakes": args.quic_flood_handshakes,
        "rss_before_mb": rss_mb(b),
        "quic_objects_before": sampler.objects,
    }
    meter = StallMeter(b.port)
    bystander = QuicBystander(b.quic_port)
    started = time.monotonic()
    figures["replies_to_forged"] = flood(b.quic_port, args.quic_flood_packets)
    figures["forged_phase_s"] = round(time.monotonic() - started, 2)
    time.sleep(0.6)
    figures["quic_objects_after_forged"] = sampler.count()
    figures.update(abandoned_handshakes(b.quic_port, args.quic_flood_handshakes))
    flood_end = time.monotonic()
    figures["flood_s"] = round(flood_end - started, 2)
    cleared: float | None = None
    while time.monotonic() - flood_end < args.quic_flood_watch:
        objects = sampler.count()
        if objects == 0:
            cleared = time.monotonic() - flood_end
            break
        time.sleep(0.5)
    figures["quic_objects_peak"] = sampler.objects_peak
    figures["quic_objects_cleared_after_s"] = round(cleared, 1) if cleared is not None else None
    figures["quic_objects_at_end"] = sampler.count()
    figures["rss_peak_mb"] = max(sampler.rss_peak, rss_mb(b))
    sampler.stop()
    figures.update(meter.stop())
    figures.update(bystander.stop())
    figures["rss_after_mb"] = rss_mb(b)
    figures["broker_alive"] = b.alive()
    return figures
