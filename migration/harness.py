"""In-process migration harness: the network's view of a CRIU move, without containers.

A real broker (:class:`~broker.server.BrokerServer`) serves QUIC on one loopback address
(127.0.0.2 by default).  :meth:`Harness.migrate` does what a live container migration looks
like from the network: ``prepare`` (SERVER_MIGRATION to clients, each acknowledged, as the
broker's pre-checkpoint step waits for), then a **freeze** (the
broker's UDP endpoint goes silent: nothing in, nothing out, while its timers keep running
into a black hole, as a frozen process's would on restore), then the endpoint comes back on
**another address** (127.0.0.3) with every connection's state intact, and ``restored``
announces it.  :meth:`Harness.rollback` is a move that fails: the endpoint comes back on the
same address and ``rollback`` tells clients to stay.  A loss relay drops a chosen fraction
of datagrams both ways (also with ``loss=0``: the broker's own batching UDP transport, under
a relay that can black out what it sends, :meth:`Harness.blackout`).

The workload: N qmig clients over QUIC, each following the broker with one strategy,
publishing to their own topic at a steady rate (QoS 1 and 2 alternately) and subscribed to it,
so each message crosses the migration twice.  Per client it reports interruption (the
largest gap between consecutive deliveries around the move), extra interruption (minus the
freeze), lost and duplicated messages, whether it ended on the new address, and when it
learned/probed/validated the new path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from broker.certs import make_lab_certs
from broker.config import BrokerConfig
from broker.server import BrokerServer
from client.client import Client
from quicmig.frames import Address
from quicmig.udp import open_udp

log = logging.getLogger("qmig.harness")


class _Blackhole:
    """Stands in for the UDP transport while the broker is frozen: sends go nowhere."""

    def sendto(self, data: bytes, addr: Any = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class _LossyTransport:
    """Wraps the UDP transport: drops each outgoing datagram with probability ``loss``, and
    every one while ``blackout_until`` (monotonic s) is ahead."""

    def __init__(self, inner: asyncio.DatagramTransport, loss: float, rng: random.Random):
        self.inner = inner
        self.loss = loss
        self.rng = rng
        self.blackout_until = 0.0

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self.inner.is_closing():
            # Closed by a freeze or by stop() while a connection still transmits (a closing
            # one lingers for its last acknowledgements): asyncio would crash on it.
            return
        if self.loss and self.rng.random() < self.loss:
            return
        if self.blackout_until and time.monotonic() < self.blackout_until:
            return
        self.inner.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _LossyEndpoint(asyncio.DatagramProtocol):
    """The broker's UDP endpoint with the loss relay: drops incoming datagrams too."""

    def __init__(self, quic_server: Any, loss: float, rng: random.Random) -> None:
        self.quic_server = quic_server
        self.loss = loss
        self.rng = rng
        self.transport: _LossyTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        lossy = _LossyTransport(cast(asyncio.DatagramTransport, transport), self.loss, self.rng)
        self.transport = lossy
        self.quic_server.connection_made(lossy)
        for proto in set(self.quic_server._protocols.values()):
            proto._transport = lossy  # every connection sends through the new endpoint

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.loss and self.rng.random() < self.loss:
            return
        self.quic_server.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass

    # The listener's batches (quicmig.udp.BatchingDatagramTransport), passed through.
    def batch_started(self) -> None:
        self.quic_server.batch_started()

    def batch_ended(self) -> None:
        self.quic_server.batch_ended()


def qos_of(seq: int) -> int:
    """The QoS a harness client publishes message ``seq`` at: 1 and 2 in turn."""
    return 1 if seq % 2 else 2


@dataclass
class ClientStats:
    name: str
    strategy: str
    sent: dict[int, float] = field(default_factory=dict)  # seq -> publish time
    received: list[tuple[int, float]] = field(default_factory=list)  # (seq, time)
    acked: int = 0

    def missing(self) -> list[int]:
        """Messages published that never arrived (after :meth:`Harness.drain`: lost)."""
        return sorted(set(self.sent) - {seq for seq, _ in self.received})

    def qos2_duplicates(self) -> list[int]:
        """QoS 2 messages that arrived more than once."""
        counts = Counter(seq for seq, _ in self.received if qos_of(seq) == 2)
        return sorted(seq for seq, n in counts.items() if n > 1)

    def interruption(self, start: float, end: float) -> float | None:
        """Largest gap between deliveries that spans [start, end] (seconds)."""
        times = sorted(t for _, t in self.received)
        before = [t for t in times if t <= start]
        after = [t for t in times if t >= end]
        if not before or not after:
            return None
        gap = 0.0
        window = [before[-1], *[t for t in times if start < t < end], after[0]]
        for a, b in itertools.pairwise(window):
            gap = max(gap, b - a)
        return gap


@dataclass
class MigrationResult:
    strategy: str
    freeze_s: float
    loss: float
    prepare_at: float
    freeze_at: float
    resume_at: float
    clients: list[dict[str, Any]]

    @property
    def extra_ms(self) -> list[float]:
        return [c["extra_interruption_ms"] for c in self.clients
                if c["extra_interruption_ms"] is not None]  # fmt: skip

    def summary(self) -> dict[str, Any]:
        extra = sorted(self.extra_ms)
        return {
            "strategy": self.strategy,
            "freeze_ms": round(self.freeze_s * 1000, 1),
            "loss": self.loss,
            "clients": len(self.clients),
            "moved": sum(1 for c in self.clients if c["moved"]),
            "extra_interruption_ms": {
                "median": round(statistics.median(extra), 1) if extra else None,
                "p95": round(extra[int(0.95 * (len(extra) - 1))], 1) if extra else None,
            },
            "lost": sum(c["lost"] for c in self.clients),
            "duplicates": sum(c["duplicates"] for c in self.clients),
        }


class Harness:
    """One in-process broker on ``source`` plus its QUIC clients; moves to ``destination``."""

    def __init__(
        self,
        source: str = "127.0.0.2",
        destination: str = "127.0.0.3",
        port: int = 0,
        loss: float = 0.0,
        pool_position: int | None = None,
        pool_size: int = 3,
        seed: int = 1,
    ) -> None:
        self.source = source
        self.destination = destination
        self.port = port
        self.loss = loss
        # Pool clients are given ``pool_size`` addresses with the destination at
        # ``pool_position`` (1-based); the others are decoys where nothing listens.
        self.pool_position = pool_position
        self.pool_size = pool_size
        self.rng = random.Random(seed)
        self.server: BrokerServer | None = None
        self.clients: list[Client] = []
        self.stats: list[ClientStats] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="qmig-harness-")
        self.cafile = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._quiet = False  # drain(): publishers stop
        self.host = source
        self._endpoint: _LossyEndpoint | None = None
        # How long migrate() waits for every client to acknowledge the destination, as the
        # broker's pre-checkpoint step does (its grace).
        self.announce_grace = 1.0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        certs = make_lab_certs(Path(self._tmp.name), hosts=["localhost", "127.0.0.1",
                               self.source, self.destination])  # fmt: skip
        self.cafile = str(certs.ca_cert)
        port = self.port or _free_udp_port(self.source)
        pool = None
        if self.pool_position is not None:
            hosts = [f"127.0.0.{10 + i}" for i in range(self.pool_size - 1)]
            hosts.insert(self.pool_position - 1, self.destination)
            pool = ",".join(f"{h}:{port}" for h in [*hosts, self.source])
        config = BrokerConfig(
            host=self.source, tcp_port=0, tls_port=0, mptcp_port=0, quic_port=port,
            cert=str(certs.server_cert), key=str(certs.server_key), sys_interval=0,
            pool=pool,
        ).validate()  # fmt: skip
        self.port = port
        self.server = BrokerServer(config)
        await self.server.start()
        await self._rebind(self.source)  # the relay is in from the start

    async def stop(self) -> None:
        self._stop.set()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for client in self.clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2)
        if self.server is not None:
            await self.server.stop()
        self._tmp.cleanup()

    async def __aenter__(self) -> Harness:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ clients
    async def add_clients(
        self, strategies: list[str], rate: float = 50.0, prefix: str = "h", *,
        keep_alive: int = 30, move_grace: float = 120.0,
    ) -> None:  # fmt: skip
        """Connect one client per strategy entry and start its steady publish loop."""
        for i, strategy in enumerate(strategies):
            name = f"{prefix}{len(self.clients)}-{strategy}"
            client = Client(self.source, self.port, transport="quic", cafile=self.cafile,
                            client_id=name, clean_start=True, session_expiry=300,
                            follow=strategy, keep_alive=keep_alive,
                            move_grace=move_grace)  # fmt: skip
            await client.connect()
            await client.subscribe(f"harness/{name}", qos=2)
            stats = ClientStats(name, strategy)
            self.clients.append(client)
            self.stats.append(stats)
            self._spawn(self._receive(client, stats))
            self._spawn(self._publish(client, stats, rate, offset=i / max(1, len(strategies))))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, client: Client, stats: ClientStats, rate: float,
                       offset: float) -> None:  # fmt: skip
        await asyncio.sleep(offset / rate)
        seq = 0
        start = time.monotonic()
        while not self._stop.is_set() and not self._quiet:
            seq += 1
            stats.sent[seq] = time.monotonic()
            self._spawn(self._publish_one(client, stats, seq, qos_of(seq)))
            await asyncio.sleep(max(0.0, start + seq / rate - time.monotonic()))

    async def drain(self, timeout: float = 5.0) -> None:
        """Stop publishing and wait up to ``timeout`` s until every message published so far
        has arrived at its subscriber: what is missing afterwards was lost, not late."""
        self._quiet = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(st.missing() for st in self.stats):
                return
            await asyncio.sleep(0.05)

    async def _publish_one(self, client: Client, stats: ClientStats, seq: int, qos: int) -> None:
        with contextlib.suppress(Exception):
            await client.publish(f"harness/{client.client_id}", seq.to_bytes(4, "big"), qos)
            stats.acked += 1

    async def _receive(self, client: Client, stats: ClientStats) -> None:
        async for message in client.messages():
            stats.received.append((int.from_bytes(message.payload, "big"), time.monotonic()))

    # ------------------------------------------------------------------ migration
    def _go_dark(self) -> None:
        """Freeze the endpoint: close the UDP socket, send every connection into a hole."""
        assert self.server is not None
        quic_server = self.server.listeners["quic"].server
        old = quic_server._transport
        quic_server._transport = _Blackhole()
        for proto in set(quic_server._protocols.values()):
            proto._transport = quic_server._transport
        old.close()

    async def _come_back(self, host: str) -> None:
        """Bind the endpoint on ``host`` (through the loss relay), connections intact."""
        assert self.server is not None
        listener = self.server.listeners["quic"]
        quic_server = listener.server
        for attempt in range(50):
            endpoint = _LossyEndpoint(quic_server, self.loss, self.rng)
            try:
                await open_udp(host, self.port, endpoint)  # the listener's own transport
                self._endpoint = endpoint
                break
            except OSError:
                # asyncio closes the old socket on a later loop turn: give it that turn.
                if attempt == 49:
                    raise
                await asyncio.sleep(0.01)
        listener.host = host

    def blackout(self, seconds: float) -> None:
        """Drop every datagram the broker sends for the next ``seconds``."""
        assert self._endpoint is not None and self._endpoint.transport is not None
        self._endpoint.transport.blackout_until = time.monotonic() + seconds

    async def _announce(self, dest: Address, notice: float) -> None:
        """prepare, then what pre-checkpoint waits for: every client acknowledged ``dest``
        (at most ``announce_grace`` s), and at least ``notice`` s."""
        assert self.server is not None
        started = time.monotonic()
        self.server.migration.prepare(dest)
        missing = await self.server.migration.announcement_acknowledged(self.announce_grace)
        if missing:
            log.warning("%d clients did not acknowledge %s before the freeze", missing, dest)
        await asyncio.sleep(max(0.0, started + notice - time.monotonic()))

    async def _rebind(self, host: str) -> None:
        self._go_dark()
        await self._come_back(host)

    async def migrate(self, freeze: float = 0.3, notice: float = 0.1,
                      strategy: str = "") -> MigrationResult:  # fmt: skip
        """prepare -> (notice, acknowledged) -> freeze -> endpoint back on the destination ->
        restored."""
        assert self.server is not None
        dest = Address(self.destination, self.port)
        prepare_at = time.monotonic()
        await self._announce(dest, notice)
        self._go_dark()  # as the container does during checkpoint, transfer and restore
        freeze_at = time.monotonic()
        await asyncio.sleep(freeze)
        await self._come_back(self.destination)
        resume_at = time.monotonic()
        await self.server.migration.restored(dest)
        self.source, self.destination = self.destination, self.source
        return MigrationResult(strategy, freeze, self.loss, prepare_at, freeze_at, resume_at, [])

    async def rollback(self, freeze: float = 0.3, notice: float = 0.1,
                       strategy: str = "") -> MigrationResult:  # fmt: skip
        """A move that fails: prepare -> (notice) -> freeze -> back on the *same* address ->
        rollback, whose SERVER_MIGRATION names that address ("stay")."""
        assert self.server is not None
        dest = Address(self.destination, self.port)
        prepare_at = time.monotonic()
        await self._announce(dest, notice)
        self._go_dark()
        freeze_at = time.monotonic()
        await asyncio.sleep(freeze)
        await self._come_back(self.source)
        resume_at = time.monotonic()
        await self.server.migration.rollback(Address(self.source, self.port))
        return MigrationResult(strategy, freeze, self.loss, prepare_at, freeze_at, resume_at, [])

    async def settle(self, result: MigrationResult, after: float = 1.5) -> MigrationResult:
        """Let traffic run ``after`` seconds past the resume, then measure every client."""
        await asyncio.sleep(after)
        end = time.monotonic()
        for client, stats in zip(self.clients, self.stats, strict=True):
            gap = stats.interruption(result.freeze_at, result.resume_at)
            sent = [s for s, t in stats.sent.items() if t < end - 0.5]
            got = [s for s, _ in stats.received]
            quic = getattr(client._stream, "_quic", None)
            addr = quic._network_paths[0].addr if quic is not None else None
            here = Address(self.source, self.port)
            result.clients.append({
                "name": stats.name,
                "strategy": stats.strategy,
                "interruption_ms": round(gap * 1000, 1) if gap is not None else None,
                "extra_interruption_ms": (round((gap - result.freeze_s) * 1000, 1)
                                          if gap is not None else None),
                "lost": len(set(sent) - set(got)),
                "duplicates": len(got) - len(set(got)),
                "moved": addr is not None and here.matches(addr),
                "reconnects": client.reconnects,
                # The move this migration caused (later false alarms are not moves).
                "migrations": [m for m in client.migrations
                               if _validated_at(m) >= result.prepare_at][:1],
            })  # fmt: skip
        return result


def _validated_at(record: dict[str, object]) -> float:
    """When a client's migration record was validated (monotonic s); 0 if it never was."""
    at = record["validated_at"]
    return at if isinstance(at, (int, float)) else 0


def _free_udp_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
