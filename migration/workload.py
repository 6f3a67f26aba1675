"""The client side of a live migration, as its own process: publish, receive, record, report.

The lab runs its clients inside a network namespace (``ip netns exec qmig-cl python -m
migration.workload --spec SPEC.json --out RESULT.json``), so the workload cannot share a
Python process with the orchestrator; it is driven by files and signals instead:

1. read SPEC.json (:class:`WorkloadSpec`), connect every client (MQTT 5, clean start, a
   session that outlives a reconnect) and subscribe each to its own topic;
2. print ``READY`` on stdout once all of them are connected and subscribed;
3. each client publishes sequence numbers to its topic at ``rate`` msg/s, so every message
   crosses the migration twice (publisher -> broker -> subscriber);
4. on SIGTERM/SIGINT, after ``duration`` seconds, or on stdin EOF (``--stdin-stop``): stop
   publishing, drain in-flight messages for up to ``drain`` seconds, disconnect, write
   RESULT.json and exit 0.

Every time in RESULT.json is wall clock (``time.time()``) so it lines up with the
orchestrator's timeline, which another process records.  They are taken on the monotonic
clock (the one aioquic and the client's migration records use) and shifted by one offset
measured at start, so intervals inside one run are never bent by a clock step.

Exit status: 0 with RESULT.json written; 2 if the spec is unusable; 3 if a client could not
connect at start (one line on stderr says which and why).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client.client import Client, ClientError
from client.transports import TRANSPORTS
from migration.scenario import ClientSpec  # one client of a scenario, as the workload runs it
from migration.strategies import Strategy
from mqttproto.client import Connected, Event

log = logging.getLogger("qmig.workload")

SESSION_EXPIRY = 600  # seconds: a TCP/MPTCP client's session survives its reconnect
KEEP_ALIVE = 30
RECONNECT_DELAY = (0.05, 0.5)  # first retry after 50 ms, then doubling up to 0.5 s
CONNECT_TIMEOUT = 10.0
DISCONNECT_TIMEOUT = 2.0
MAX_ERRORS = 100  # per client: the first ones explain; the rest are only counted
READY = "READY"

EXIT_OK, EXIT_SPEC, EXIT_CONNECT = 0, 2, 3


class SpecError(ValueError):
    """SPEC.json does not describe a runnable workload."""


# ---------------------------------------------------------------------- spec
@dataclass(frozen=True)
class BrokerTarget:
    """Where the broker is at start: one host, a port per transport, the lab CA."""

    host: str
    ports: dict[str, int] = field(
        default_factory=lambda: {"quic": 14567, "tcp": 1883, "tls": 8883, "mptcp": 1885}
    )
    cafile: str | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything ``python -m migration.workload`` needs; JSON round-trips through it."""

    broker: BrokerTarget
    clients: tuple[ClientSpec, ...]
    rate: float = 20.0  # messages per second per client
    qos: int = 1
    duration: float | None = None  # seconds of publishing; None = until told to stop
    drain: float = 2.0  # seconds to wait for in-flight messages after publishing stops
    topic_prefix: str = "qmig/lab"

    def topic(self, client: ClientSpec) -> str:
        return f"{self.topic_prefix}/{client.name}"

    def validate(self) -> WorkloadSpec:
        if not self.clients:
            raise SpecError("no clients")
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names) or not all(names):
            raise SpecError("client names must be non-empty and distinct")
        for c in self.clients:
            if c.transport not in TRANSPORTS:
                raise SpecError(f"client {c.name}: transport must be one of {TRANSPORTS}")
            try:
                Strategy(c.strategy)
            except ValueError:
                choices = [s.value for s in Strategy]
                raise SpecError(f"client {c.name}: strategy must be one of {choices}") from None
            if c.transport not in self.broker.ports:
                raise SpecError(f"client {c.name}: no broker port for {c.transport}")
        if self.qos not in (0, 1, 2):
            raise SpecError("qos must be 0, 1 or 2")
        if not self.rate > 0:
            raise SpecError("rate must be positive")
        if self.duration is not None and self.duration < 0:
            raise SpecError("duration must be >= 0 (or null: until stopped)")
        if self.drain < 0:
            raise SpecError("drain must be >= 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["clients"] = [asdict(c) for c in self.clients]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkloadSpec:
        try:
            broker = data["broker"]
            target = BrokerTarget(
                host=str(broker["host"]),
                ports={str(k): int(v) for k, v in (broker.get("ports") or {}).items()}
                or BrokerTarget("").ports,
                cafile=broker.get("cafile"),
            )
            clients = tuple(
                ClientSpec(str(c["name"]), str(c.get("transport", "quic")),
                           str(c.get("strategy", "none")))
                for c in data["clients"]
            )  # fmt: skip
            duration = data.get("duration")
            spec = cls(
                broker=target,
                clients=clients,
                rate=float(data.get("rate", 20.0)),
                qos=int(data.get("qos", 1)),
                duration=None if duration is None else float(duration),
                drain=float(data.get("drain", 2.0)),
                topic_prefix=str(data.get("topic_prefix", "qmig/lab")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(f"bad workload spec: {type(exc).__name__}: {exc}") from exc
        return spec.validate()

    @classmethod
    def from_json(cls, text: str) -> WorkloadSpec:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SpecError(f"workload spec is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise SpecError("workload spec must be a JSON object")
        return cls.from_dict(data)


# ---------------------------------------------------------------------- clock
class WallClock:
    """Monotonic readings shifted onto the wall clock by one offset taken at start."""

    def __init__(self) -> None:
        self.offset = time.time() - time.monotonic()

    def now(self) -> float:
        return time.monotonic() + self.offset

    def wall(self, monotonic: float | None) -> float | None:
        return None if monotonic is None else round(monotonic + self.offset, 6)


# ---------------------------------------------------------------------- one client
class TracedClient(Client):
    """A :class:`Client` that also notes when its connection went and came back.

    ``Client.reconnects`` only counts; the lab wants to see *when* a TCP client was sent
    away and when it was back, next to the orchestrator's timeline.
    """

    def __init__(self, *args: Any, clock: WallClock, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        self.events: list[list[Any]] = []  # [event, wall time, detail]

    def _on_lost(self, exc: Exception | None) -> None:
        if not self._closing:
            self.events.append(["lost", self.clock.now(), str(exc) if exc else ""])
            del self.events[:-1000]
        super()._on_lost(exc)

    async def _connect_once(self, timeout: float | None = None) -> Event:
        event = await super()._connect_once(timeout)
        if isinstance(event, Connected):
            self.events.append(["connected", self.clock.now(), f"{self.host}:{self.port}"])
            del self.events[:-1000]
        return event


@dataclass
class ClientRun:
    """What one client did; ``sent``/``acked``/``received`` are ``[seq, wall time]``."""

    spec: ClientSpec
    topic: str
    client: TracedClient
    sent: list[list[float]] = field(default_factory=list)
    acked: list[list[float]] = field(default_factory=list)
    received: list[list[float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    errors_dropped: int = 0
    connected_at_end: bool | None = None  # noted before the final disconnect
    pending: set[asyncio.Task[None]] = field(default_factory=set)
    receiver: asyncio.Task[None] | None = None
    publisher: asyncio.Task[None] | None = None

    def error(self, text: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(text)
        else:
            self.errors_dropped += 1

    def result(self, clock: WallClock) -> dict[str, Any]:
        client = self.client
        migrations = []
        for record in client.migrations:
            converted = dict(record)
            for key in ("learned_at", "first_probe_at", "validated_at"):
                converted[key] = clock.wall(record.get(key))  # type: ignore[arg-type]
            migrations.append(converted)
        errors = list(self.errors)
        if self.errors_dropped:
            errors.append(f"... and {self.errors_dropped} more errors")
        return {
            "name": self.spec.name,
            "transport": self.spec.transport,
            "strategy": self.spec.strategy,
            "topic": self.topic,
            "sent": [[s, round(t, 6)] for s, t in self.sent],
            "acked": [[s, round(t, 6)] for s, t in self.acked],
            "received": [[s, round(t, 6)] for s, t in self.received],
            "reconnects": client.reconnects,
            "migrations": migrations,
            "moves": [[clock.wall(t), str(a)] for t, a in client.moves],
            "connections": [[e, round(t, 6), d] for e, t, d in client.events],
            "final_server": f"{client.host}:{client.port}",
            "connected_at_end": self.connected_at_end,
            "errors": errors,
        }


# ---------------------------------------------------------------------- the workload
class Workload:
    """Runs the clients of one :class:`WorkloadSpec` in this process's event loop."""

    def __init__(self, spec: WorkloadSpec, clock: WallClock | None = None) -> None:
        self.spec = spec
        self.clock = clock or WallClock()
        self.runs: list[ClientRun] = []
        self.stop = asyncio.Event()
        self.started_at = self.clock.now()
        self.ready_at: float | None = None
        self.stopped_at: float | None = None
        self.ended_at: float | None = None
        self.stop_reason = ""
        self.finishing = False

    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()

    # ------------------------------------------------------------------ start
    def _make_client(self, c: ClientSpec) -> TracedClient:
        b = self.spec.broker
        return TracedClient(
            b.host, b.ports[c.transport], transport=c.transport, client_id=c.name,
            clean_start=True, session_expiry=SESSION_EXPIRY, keep_alive=KEEP_ALIVE,
            cafile=b.cafile, follow=c.strategy if c.transport == "quic" else "none",
            reconnect_delay=RECONNECT_DELAY, connect_timeout=CONNECT_TIMEOUT,
            clock=self.clock,
        )  # fmt: skip

    async def _connect(self, run: ClientRun) -> None:
        """Connect and subscribe one client; raises ClientError saying what failed."""
        c = run.spec
        where = f"{self.spec.broker.host}:{self.spec.broker.ports[c.transport]}"
        try:
            await asyncio.wait_for(run.client.connect(), CONNECT_TIMEOUT + 1)
            await run.client.subscribe(run.topic, self.spec.qos, timeout=CONNECT_TIMEOUT)
        except Exception as exc:  # whatever it was, the orchestrator gets one clear line
            why = str(exc) or type(exc).__name__
            raise ClientError(
                f"client {c.name} ({c.transport}) cannot start at {where}: {why}"
            ) from exc

    async def start(self) -> None:
        """Connect and subscribe every client (concurrently); all or nothing."""
        self.runs = [
            ClientRun(c, self.spec.topic(c), self._make_client(c)) for c in self.spec.clients
        ]
        results = await asyncio.gather(
            *(self._connect(run) for run in self.runs), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self._disconnect_all()
            raise failures[0]
        for run in self.runs:
            run.receiver = asyncio.create_task(self._receive(run))
        self.ready_at = self.clock.now()

    # ------------------------------------------------------------------ traffic
    async def _receive(self, run: ClientRun) -> None:
        """Note each delivery; ends when the client is disconnected or lost for good."""
        try:
            async for message in run.client.messages():
                now = self.clock.now()
                try:
                    seq = int(message.payload)
                except ValueError:
                    run.error(f"unexpected payload {message.payload[:32]!r} on {message.topic}")
                    continue
                run.received.append([seq, now])
        except Exception as exc:  # a bug here must not take the workload down
            run.error(f"receiver failed: {type(exc).__name__}: {exc}")
            return
        if not self.stop.is_set():
            run.error(f"connection lost for good at {self.clock.now():.3f}")

    async def _publish(self, run: ClientRun, offset: float) -> None:
        """Publish ``seq`` at ``start + seq / rate``; never waits for an acknowledgement."""
        rate = self.spec.rate
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(offset / rate)
            start = time.monotonic()
            seq = 0
            while not self.stop.is_set():
                seq += 1
                run.sent.append([seq, self.clock.now()])
                task = asyncio.create_task(self._publish_one(run, seq))
                run.pending.add(task)
                task.add_done_callback(run.pending.discard)
                delay = start + seq / rate - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), delay)
                else:
                    await asyncio.sleep(0)  # behind schedule (a stall): catch up, yielding

    async def _publish_one(self, run: ClientRun, seq: int) -> None:
        try:
            await run.client.publish(run.topic, str(seq).encode(), self.spec.qos)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # recorded, never fatal: the run goes on
            if not self.finishing:  # at the end, finish() sums up what was never acked
                run.error(f"publish {seq}: {type(exc).__name__}: {exc}")
            return
        run.acked.append([seq, self.clock.now()])

    async def run(self) -> None:
        """Publish until stopped, then drain; the clients stay connected (see finish)."""
        n = len(self.runs)
        for i, run in enumerate(self.runs):
            run.publisher = asyncio.create_task(self._publish(run, i / n))
        duration = self.spec.duration
        if duration is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), duration)
            self.request_stop("duration")
        await self.stop.wait()
        self.stopped_at = self.clock.now()
        for run in self.runs:
            if run.publisher is not None:
                await run.publisher
        await self._drain()

    def _settled(self) -> bool:
        """Nothing in flight and (above QoS 0) every message delivered: no need to wait."""
        for run in self.runs:
            run.connected_at_end = run.client.connected
            if run.pending:
                return False
            if self.spec.qos and {s for s, _ in run.sent} - {s for s, _ in run.received}:
                return False
        return True

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.spec.drain
        while time.monotonic() < deadline and not self._settled():
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ end
    async def _disconnect_all(self) -> None:
        async def one(client: Client) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), DISCONNECT_TIMEOUT)

        await asyncio.gather(*(one(run.client) for run in self.runs))

    async def finish(self) -> None:
        """Disconnect cleanly, then stop whatever is still waiting for an ack."""
        self.finishing = True
        for run in self.runs:
            run.connected_at_end = run.client.connected
            if run.pending:
                run.error(f"{len(run.pending)} publishes still unacknowledged at the end")
        await self._disconnect_all()
        for run in self.runs:
            tasks = [*run.pending, *([run.receiver] if run.receiver else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.ended_at = self.clock.now()

    def result(self) -> dict[str, Any]:
        return {
            "clock": "wall",
            "started_at": _round(self.started_at),
            "ready_at": _round(self.ready_at),  # the orchestrator may migrate from here on
            "stopped_at": _round(self.stopped_at),  # publishing stopped; the drain began
            "ended_at": _round(self.ended_at),
            "stop_reason": self.stop_reason,
            "spec": self.spec.to_dict(),
            "clients": [run.result(self.clock) for run in self.runs],
        }


def _round(t: float | None) -> float | None:
    return None if t is None else round(t, 6)


# ---------------------------------------------------------------------- process
def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: the orchestrator never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _watch_stdin(loop: asyncio.AbstractEventLoop, workload: Workload) -> None:
    """Stop at stdin EOF: the orchestrator's end of the pipe closing (even if it died)."""
    fd = sys.stdin.fileno()
    if stat.S_ISREG(os.fstat(fd).st_mode):  # a file is read to its end at once
        workload.request_stop("stdin EOF")
        return

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            workload.request_stop("stdin EOF")

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)


async def amain(spec: WorkloadSpec, out: Path, stdin_stop: bool = False) -> int:
    workload = Workload(spec)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, workload.request_stop, signal.Signals(sig).name)
    try:
        await workload.start()
    except ClientError as exc:
        print(f"workload: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONNECT
    print(READY, flush=True)
    if stdin_stop:
        _watch_stdin(loop, workload)
    try:
        await workload.run()
    finally:
        await workload.finish()
        write_json(out, workload.result())
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m migration.workload",
        description="MQTT clients that publish to themselves through a live migration.",
    )
    parser.add_argument("--spec", required=True, type=Path, help="workload spec (JSON)")
    parser.add_argument("--out", required=True, type=Path, help="where to write RESULT.json")
    parser.add_argument("--stdin-stop", action="store_true", help="also stop at stdin EOF")
    parser.add_argument("--log-level", default="WARNING", help="client log level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="workload: %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        spec = WorkloadSpec.from_json(args.spec.read_text())
    except OSError as exc:
        print(f"workload: error: cannot read {args.spec}: {exc.strerror}", file=sys.stderr)
        return EXIT_SPEC
    except SpecError as exc:
        print(f"workload: error: {args.spec}: {exc}", file=sys.stderr)
        return EXIT_SPEC
    return asyncio.run(amain(spec, args.out, args.stdin_stop))


if __name__ == "__main__":
    sys.exit(main())
