"""The client side of a live migration, as its own process: publish, receive, record, report.

The lab runs its clients inside a network namespace (``ip netns exec qmig-cl python -m
migration.workload --spec SPEC.json --out RESULT.json``), so the workload cannot share a
Python process with the orchestrator; it is driven by files and signals instead:

1. read SPEC.json (:class:`WorkloadSpec`), connect every client (MQTT 5, clean start, a
   session that outlives a reconnect) and subscribe each to its own topic;
2. print ``READY`` on stdout once all of them are connected and subscribed;
3. each client publishes sequence numbers to its topic at ``rate`` msg/s, so every message
   crosses the migration twice (publisher -> broker -> subscriber); at rate 0 the clients
   stay idle (a fleet of sleeping devices: what their connections cost the broker);
4. on SIGTERM/SIGINT, after ``duration`` seconds, or on stdin EOF (``--stdin-stop``): stop
   publishing, drain in-flight messages for up to ``drain`` seconds, disconnect, write
   RESULT.json and exit 0.

Every time in RESULT.json is wall clock (``time.time()``) so it lines up with the
orchestrator's timeline, which another process records.  They are taken on the monotonic
clock (the one aioquic and the client's migration records use) and shifted by one offset
measured at start, so intervals inside one run are never bent by a clock step.

A TCP, TLS or MPTCP client runs either qmig's own :class:`~client.client.Client` or, with
``library: paho``, paho-mqtt 2.x (:class:`PahoClient`, the design card's client) in its own
network thread; both follow a Server Reference and retry on the same stated schedule.

Exit status: 0 with RESULT.json written; 2 if the spec is unusable; 3 if a client could not
connect at start (one line on stderr says which and why).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import client.client as client_module
from client.client import (
    FALLBACK_AFTER,
    RECONNECT_ATTEMPT_TIMEOUT,
    Client,
    ClientError,
    parse_reference,
)
from client.transports import TRANSPORTS, Target, race_connect_blocking
from migration.ledger import Ledger
from migration.scenario import (
    LIBRARIES,
    PAHO_TRANSPORTS,
    RECONNECT_DELAY,
    ClientSpec,
    check_reconnect_delay,
)
from quicmig.follower import Strategy

log = logging.getLogger("qmig.workload")

SESSION_EXPIRY = 600  # seconds: a TCP/MPTCP client's session survives its reconnect
KEEP_ALIVE = 30
# A reconnect's SYN is resent after this long, by qmig's client and by PahoClient alike.
SYN_RESEND = float(getattr(client_module, "RECONNECT_SYN_TIMEOUT", 0.25))
PAHO_MAX_INFLIGHT = 1024  # the broker's Receive Maximum (paho's own default is 20)
SERVER_MOVED_CODES = (0x9C, 0x9D)  # Use another server, Server moved
CONNECT_TIMEOUT = 10.0
# Connects in progress at once at start: a fleet of 1,000 QUIC handshakes all at once would
# run into the broker's half-open limit (quicmig.server) and its Retry threshold.
CONNECT_CONCURRENCY = 32
CONNECT_ATTEMPTS = 3  # at start, with a fresh client each time (a handshake may time out)
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


def _delay_pair(value: Any) -> tuple[float, float]:
    """A spec's ``reconnect_delay`` as (first, cap); the wrong length is a SpecError."""
    delay = tuple(float(x) for x in value)
    check_reconnect_delay(delay, SpecError)
    return delay[0], delay[1]


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything ``python -m migration.workload`` needs; JSON round-trips through it."""

    broker: BrokerTarget
    clients: tuple[ClientSpec, ...]
    rate: float = 20.0  # messages per second per client; 0: idle (connected, subscribed)
    qos: int = 1
    duration: float | None = None  # seconds of publishing; None = until told to stop
    drain: float = 2.0  # seconds to wait for in-flight messages after publishing stops
    topic_prefix: str = "qmig/lab"
    reconnect_delay: tuple[float, float] = RECONNECT_DELAY  # first retry, cap (seconds)
    # Bounded accounting (migration.ledger) instead of every message's trace: a soak.
    ledger: bool = False

    def qos_of(self, client: ClientSpec) -> int:
        return self.qos if client.qos is None else client.qos

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
            if c.library not in LIBRARIES:
                raise SpecError(f"client {c.name}: library must be one of {LIBRARIES}")
            if c.library == "paho" and c.transport not in PAHO_TRANSPORTS:
                raise SpecError(f"client {c.name}: paho-mqtt runs over {PAHO_TRANSPORTS} only")
            if c.transport not in self.broker.ports:
                raise SpecError(f"client {c.name}: no broker port for {c.transport}")
            if c.qos not in (None, 0, 1, 2):
                raise SpecError(f"client {c.name}: qos must be 0, 1 or 2")
        if self.qos not in (0, 1, 2):
            raise SpecError("qos must be 0, 1 or 2")
        if not self.rate >= 0:
            raise SpecError("rate must be >= 0 (0: idle clients, connected and subscribed)")
        if self.duration is not None and self.duration < 0:
            raise SpecError("duration must be >= 0 (or null: until stopped)")
        if self.drain < 0:
            raise SpecError("drain must be >= 0")
        check_reconnect_delay(self.reconnect_delay, SpecError)
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
            clients = tuple(ClientSpec.from_dict(c) for c in data["clients"])
            duration = data.get("duration")
            spec = cls(
                broker=target,
                clients=clients,
                rate=float(data.get("rate", 20.0)),
                qos=int(data.get("qos", 1)),
                duration=None if duration is None else float(duration),
                drain=float(data.get("drain", 2.0)),
                topic_prefix=str(data.get("topic_prefix", "qmig/lab")),
                reconnect_delay=_delay_pair(data.get("reconnect_delay", RECONNECT_DELAY)),
                ledger=bool(data.get("ledger", False)),
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
TRACED_MIGRATIONS = 10_000  # migration records a traced client keeps (a week at one an hour)


class TracedClient(Client):
    """A :class:`Client` that also notes when its connection went and came back.

    ``Client.reconnects`` only counts; the lab wants to see *when* a TCP client was sent
    away and when it was back, next to the orchestrator's timeline (through the client's
    ``on_connection`` hook).
    """

    def __init__(self, *args: Any, clock: WallClock, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        self.events: list[list[Any]] = []  # [event, wall time, detail]
        self.on_connection = self._note
        self.max_moves = TRACED_MIGRATIONS  # the report wants every move of a long run
        if self.follower is not None:
            self.follower.max_records = TRACED_MIGRATIONS

    def _note(self, event: str, detail: str) -> None:
        self.events.append([event, self.clock.now(), detail])
        del self.events[:-1000]


# ---------------------------------------------------------------------- paho-mqtt
@dataclass
class Delivery:
    """A message paho delivered, stamped in paho's network thread when it arrived."""

    topic: str
    payload: bytes
    received_at: float


class _Acks:
    """paho acknowledgements (network thread) matched to asyncio futures (by message id).

    An ack may arrive before the caller has registered its message id; it is kept until then.
    Never holds its lock while calling into paho, so it cannot deadlock with paho's mutexes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.early: dict[int, Any] = {}

    def expect(self, mid: int) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        with self.lock:
            if mid in self.early:
                fut.set_result(self.early.pop(mid))
            else:
                self.waiting[mid] = fut
        return fut

    def done(self, mid: int, value: Any) -> None:  # called in paho's thread
        with self.lock:
            fut = self.waiting.pop(mid, None)
            if fut is None:
                self.early[mid] = value
                if len(self.early) > 10_000:  # QoS 0 "acks" nobody waits for
                    self.early.pop(next(iter(self.early)))
                return
        self.loop.call_soon_threadsafe(_settle, fut, value)

    def fail_all(self, exc: Exception) -> None:
        with self.lock:
            futures, self.waiting = list(self.waiting.values()), {}
        for fut in futures:
            self.loop.call_soon_threadsafe(_settle, fut, exc)


def _settle(fut: asyncio.Future[Any], value: Any) -> None:
    if fut.done():
        return
    if isinstance(value, Exception):
        fut.set_exception(value)
    else:
        fut.set_result(value)


def _paho_class(transport: str) -> type:
    """paho's Client connecting as qmig's client does (MPTCP for ``mptcp``)."""
    import paho.mqtt.client as mqtt

    mptcp = transport == "mptcp"

    class LabPahoClient(mqtt.Client):
        fallback: Callable[[], Target | None] = staticmethod(lambda: None)
        reached: Callable[[Target, Target], None] = staticmethod(lambda was, now: None)

        def _create_socket_connection(self) -> socket.socket:
            # paho has no socket factory option; this private hook is the narrowest seam.
            primary = (self._host, self._port)
            try:
                sock, target = race_connect_blocking(primary, self.fallback(), mptcp,
                                                     syn_timeout=SYN_RESEND,
                                                     timeout=self._connect_timeout)  # fmt: skip
            except OSError:
                raise
            except Exception as exc:  # anything else would end paho's network thread
                raise OSError(f"connect to {primary[0]}:{primary[1]} failed: {exc!r}") from exc
            if target != primary:  # TLS then checks the certificate of the host reached
                self.reached(primary, target)
                self._host, self._port = target
            return sock

    return LabPahoClient


class PahoClient:
    """paho-mqtt 2.x (MQTT 5) behind the async calls the workload makes of qmig's Client.

    paho runs its own network thread (``loop_start``) and its own reconnect loop, set to the
    schedule qmig's client uses (the spec's ``reconnect_delay``, by default first retry 50 ms
    after a loss, then doubling up to 0.5 s, back to 50 ms after a successful CONNACK; paho's
    default is 1 s doubling to 120 s), each attempt bounded by ``RECONNECT_ATTEMPT_TIMEOUT``
    with its SYN resent every ``SYN_RESEND`` s. The session outlives a reconnect (clean start
    only on the first connect, session expiry ``SESSION_EXPIRY``); paho resends unacknowledged
    QoS 1/2 messages after reconnecting.

    paho does not follow a Server Reference by itself: on DISCONNECT 0x9C/0x9D (or a refused
    CONNACK) carrying one, this class points paho's next attempt at the referenced host (a
    bare host keeps the port).  If that host stays unreachable for ``FALLBACK_AFTER`` s (a
    rolled-back migration), every attempt also races a connection to the previous host
    (:func:`client.transports.race_connect_blocking`) until one of them answers; attempts
    to the referenced host go on as before, so a freeze longer than that costs no detour.
    """

    def __init__(self, host: str, port: int, *, transport: str, client_id: str,
                 session_expiry: int, keep_alive: int, cafile: str | None,
                 reconnect_delay: tuple[float, float], clock: WallClock) -> None:  # fmt: skip
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        if transport not in PAHO_TRANSPORTS:
            raise ValueError(f"paho-mqtt runs over {PAHO_TRANSPORTS}, not {transport!r}")
        self.transport = transport
        self.clock = clock
        self.loop = asyncio.get_running_loop()
        self.paho = _paho_class(transport)(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
            reconnect_on_failure=True,
        )  # fmt: skip
        if transport == "tls":
            self.paho.tls_set(ca_certs=cafile)
        self.paho.reconnect_delay_set(*reconnect_delay)
        self.paho.connect_timeout = RECONNECT_ATTEMPT_TIMEOUT
        self.paho.max_inflight_messages_set(PAHO_MAX_INFLIGHT)
        self.paho.suppress_exceptions = True  # a failing callback must not end paho's thread
        self.paho.enable_logger(logging.getLogger(f"qmig.workload.paho.{client_id}"))
        self.paho.on_connect = self._on_connect
        self.paho.fallback = self._fallback
        self.paho.reached = self._reached_fallback
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_message = self._on_message
        self.paho.on_publish = self._on_publish
        self.paho.on_subscribe = self._on_subscribe
        self.connect_properties = Properties(PacketTypes.CONNECT)
        self.connect_properties.SessionExpiryInterval = session_expiry
        self._start = (host, port, keep_alive)
        self.reconnects = 0
        self.events: list[list[Any]] = []  # [event, wall time, detail], as TracedClient's
        self.migrations: list[dict[str, object]] = []  # no QUIC path moves over TCP
        self.moves: list[tuple[float, Any]] = []
        self._pubs = _Acks(self.loop)
        self._subs = _Acks(self.loop)
        self._messages: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._connack: asyncio.Future[Any] | None = None
        self._was_connected = False
        self._ever_connected = False
        self._closing = False
        self._previous: tuple[str, int] | None = None
        self._failing_since = time.monotonic()

    # ------------------------------------------------------------------ properties
    @property
    def host(self) -> str:
        return str(self.paho.host or self._start[0])

    @property
    def port(self) -> int:
        return int(self.paho.port or self._start[1])

    @property
    def connected(self) -> bool:
        return bool(self.paho.is_connected())

    # ------------------------------------------------------------------ paho's thread
    def _note(self, event: str, detail: str) -> None:
        self.events.append([event, self.clock.now(), detail])
        del self.events[:-1000]

    def _follow(self, reference: str) -> None:
        """Point paho's next attempt at ``reference`` (the public setters refuse while the
        connection is merely lost, so the attributes paho's ``reconnect()`` reads are set)."""
        host, port = parse_reference(reference, self.port)
        self._previous = (self.host, self.port)
        self.paho._host, self.paho._port = host, port
        self._failing_since = time.monotonic()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:  # fmt: skip
        if reason.is_failure:
            reference = getattr(properties, "ServerReference", None)
            if reference and reason.value in SERVER_MOVED_CODES:
                self._follow(reference)
            elif self._connack is not None and not self._ever_connected:
                error = ClientError(f"connection refused: {reason}", reason.value)
                self.loop.call_soon_threadsafe(_settle, self._connack, error)
            return
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = self._was_connected = True
        self._previous = None
        self._note("connected", f"{self.host}:{self.port}")
        if self._connack is not None:
            self.loop.call_soon_threadsafe(_settle, self._connack, True)

    def _fallback(self) -> Target | None:
        """The previous host, once the referenced one failed for ``FALLBACK_AFTER`` s."""
        if self._previous and time.monotonic() - self._failing_since >= FALLBACK_AFTER:
            return self._previous
        return None

    def _reached_fallback(self, referenced: Target, previous: Target) -> None:
        """The previous host answered first: it is the broker now (the move was undone)."""
        self._previous = referenced
        self._failing_since = time.monotonic()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:  # fmt: skip
        if self._closing:
            return
        reference = getattr(properties, "ServerReference", None)
        if reference and reason.value in SERVER_MOVED_CODES:
            self._follow(reference)
        if self._was_connected:  # paho may report one loss twice
            self._was_connected = False
            self._failing_since = time.monotonic()
            self._note("lost", str(reason))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        delivery = Delivery(message.topic, bytes(message.payload), self.clock.now())
        self.loop.call_soon_threadsafe(self._messages.put_nowait, delivery)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:  # fmt: skip
        self._pubs.done(mid, int(reason.value))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:  # fmt: skip
        self._subs.done(mid, [int(r.value) for r in reasons])

    # ------------------------------------------------------------------ the workload's calls
    async def connect(self) -> None:
        import paho.mqtt.client as mqtt

        host, port, keep_alive = self._start
        self._connack = self.loop.create_future()
        self.paho.connect_async(host, port, keepalive=keep_alive,
                                clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                                properties=self.connect_properties)  # fmt: skip
        self.paho.loop_start()
        try:
            await asyncio.wait_for(self._connack, CONNECT_TIMEOUT)
        except TimeoutError:
            where = f"{host}:{port}"
            raise ClientError(f"no CONNACK from {where} within {CONNECT_TIMEOUT:g} s") from None

    async def subscribe(self, topic: str, qos: int, timeout: float | None = None) -> list[int]:
        rc, mid = self.paho.subscribe(topic, qos)
        if rc != 0:
            raise ClientError(f"subscribe to {topic} failed: paho error {rc}")
        codes: list[int] = await asyncio.wait_for(self._subs.expect(mid), timeout)
        if any(c >= 0x80 for c in codes):
            raise ClientError(f"subscription refused: {[hex(c) for c in codes]}", codes[0])
        return codes

    async def publish(self, topic: str, payload: bytes, qos: int) -> int:
        """Publish; for QoS 1/2 wait for paho's on_publish (PUBACK/PUBCOMP)."""
        info = self.paho.publish(topic, payload, qos)
        if qos == 0:
            return 0
        reason: int = await self._pubs.expect(info.mid)
        if reason >= 0x80:
            raise ClientError(f"publish to {topic} refused: reason {reason:#04x}", reason)
        return reason

    async def messages(self) -> AsyncIterator[Delivery]:
        while True:
            message = await self._messages.get()
            if message is None:
                return
            yield message

    async def disconnect(self) -> None:
        """DISCONNECT, then stop paho's thread; waited for at most ``DISCONNECT_TIMEOUT`` s
        (a daemon thread joins it, so a stuck paho thread cannot hold the process open)."""
        self._closing = True
        self.paho.disconnect()
        stopped = self.loop.create_future()

        def stop() -> None:
            try:
                self.paho.loop_stop()
            finally:
                with contextlib.suppress(RuntimeError):  # the event loop may be gone
                    self.loop.call_soon_threadsafe(_settle, stopped, True)

        threading.Thread(target=stop, name="paho-stop", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stopped), DISCONNECT_TIMEOUT)
        self._pubs.fail_all(ClientError("disconnected"))
        self._subs.fail_all(ClientError("disconnected"))
        self._messages.put_nowait(None)


WorkloadClient = TracedClient | PahoClient


@dataclass
class ClientRun:
    """What one client did; ``sent``/``acked``/``received`` are ``[seq, wall time]``, or,
    with a ``ledger``, empty (the ledger accounts for them in bounded memory)."""

    spec: ClientSpec
    topic: str
    client: WorkloadClient
    qos: int = 1
    ledger: Ledger | None = None
    sent: list[list[float]] = field(default_factory=list)
    acked: list[list[float]] = field(default_factory=list)
    received: list[list[float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    errors_dropped: int = 0
    connected_at_end: bool | None = None  # noted before the final disconnect
    pending: set[asyncio.Task[None]] = field(default_factory=set)
    receiver: asyncio.Task[None] | None = None
    publisher: asyncio.Task[None] | None = None

    def note_sent(self, seq: int, at: float) -> None:
        if self.ledger is not None:
            self.ledger.sent(seq, at)
        else:
            self.sent.append([seq, at])

    def note_acked(self, seq: int, at: float) -> None:
        if self.ledger is not None:
            self.ledger.acknowledged(seq, at)
        else:
            self.acked.append([seq, at])

    def note_received(self, seq: int, at: float) -> None:
        if self.ledger is not None:
            self.ledger.received(seq, at)
        else:
            self.received.append([seq, at])

    def unreceived(self) -> bool:
        """Whether a message sent is still to arrive."""
        if self.ledger is not None:
            return bool(self.ledger.outstanding)
        return bool({s for s, _ in self.sent} - {s for s, _ in self.received})

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
                at = record.get(key)
                assert at is None or isinstance(at, (int, float))  # monotonic seconds
                converted[key] = clock.wall(at)
            migrations.append(converted)
        errors = list(self.errors)
        if self.errors_dropped:
            errors.append(f"... and {self.errors_dropped} more errors")
        return {
            "name": self.spec.name,
            "transport": self.spec.transport,
            "strategy": self.spec.strategy,
            "library": self.spec.library,
            "qos": self.qos,
            "topic": self.topic,
            **(
                self.ledger.result()
                if self.ledger is not None
                else {
                    "sent": [[s, round(t, 6)] for s, t in self.sent],
                    "acked": [[s, round(t, 6)] for s, t in self.acked],
                    "received": [[s, round(t, 6)] for s, t in self.received],
                }
            ),
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

    def _ledger_gap(self) -> float:
        """A silence that starts a new delivery segment: five intervals, at least 0.25 s."""
        return max(0.25, 5 / self.spec.rate) if self.spec.rate else 0.25

    # ------------------------------------------------------------------ start
    def _make_client(self, c: ClientSpec) -> WorkloadClient:
        b = self.spec.broker
        if c.library == "paho":
            return PahoClient(
                b.host, b.ports[c.transport], transport=c.transport, client_id=c.name,
                session_expiry=SESSION_EXPIRY, keep_alive=KEEP_ALIVE, cafile=b.cafile,
                reconnect_delay=self.spec.reconnect_delay, clock=self.clock,
            )  # fmt: skip
        return TracedClient(
            b.host, b.ports[c.transport], transport=c.transport, client_id=c.name,
            clean_start=True, session_expiry=SESSION_EXPIRY, keep_alive=KEEP_ALIVE,
            cafile=b.cafile, follow=c.strategy if c.transport == "quic" else "none",
            reconnect_delay=self.spec.reconnect_delay, connect_timeout=CONNECT_TIMEOUT,
            clock=self.clock,
        )  # fmt: skip

    async def _connect(self, run: ClientRun) -> None:
        """Connect and subscribe one client; raises ClientError saying what failed."""
        c = run.spec
        where = f"{self.spec.broker.host}:{self.spec.broker.ports[c.transport]}"
        try:
            await asyncio.wait_for(run.client.connect(), CONNECT_TIMEOUT + 1)
            await run.client.subscribe(run.topic, run.qos, timeout=CONNECT_TIMEOUT)
        except Exception as exc:  # whatever it was, the orchestrator gets one clear line
            why = str(exc) or type(exc).__name__
            raise ClientError(
                f"client {c.name} ({c.transport}) cannot start at {where}: {why}"
            ) from exc

    async def start(self) -> None:
        """Connect and subscribe every client (concurrently); all or nothing."""
        self.runs = [
            ClientRun(
                c,
                self.spec.topic(c),
                self._make_client(c),
                qos=self.spec.qos_of(c),
                ledger=Ledger(self._ledger_gap()) if self.spec.ledger else None,
            )
            for c in self.spec.clients
        ]
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def connect(run: ClientRun) -> None:
            async with gate:
                for attempt in range(CONNECT_ATTEMPTS):
                    try:
                        return await self._connect(run)
                    except ClientError:
                        if attempt + 1 == CONNECT_ATTEMPTS:
                            raise
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(run.client.disconnect(), DISCONNECT_TIMEOUT)
                    run.client = self._make_client(run.spec)

        results = await asyncio.gather(*(connect(run) for run in self.runs),
                                       return_exceptions=True)  # fmt: skip
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
                now = getattr(message, "received_at", None) or self.clock.now()
                try:
                    seq = int(message.payload)
                except ValueError:
                    run.error(f"unexpected payload {message.payload[:32]!r} on {message.topic}")
                    continue
                run.note_received(seq, now)
        except Exception as exc:  # a bug here must not take the workload down
            run.error(f"receiver failed: {type(exc).__name__}: {exc}")
            return
        if not self.stop.is_set():
            run.error(f"connection lost for good at {self.clock.now():.3f}")

    async def _publish(self, run: ClientRun, offset: float) -> None:
        """Publish ``seq`` at ``start + seq / rate``; never waits for an acknowledgement.
        At rate 0 the client stays idle: connected, subscribed, silent."""
        rate = self.spec.rate
        if not rate:
            return
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(offset / rate)
            start = time.monotonic()
            seq = 0
            while not self.stop.is_set():
                seq += 1
                run.note_sent(seq, self.clock.now())
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
            await run.client.publish(run.topic, str(seq).encode(), run.qos)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # recorded, never fatal: the run goes on
            if not self.finishing:  # at the end, finish() sums up what was never acked
                run.error(f"publish {seq}: {type(exc).__name__}: {exc}")
            return
        run.note_acked(seq, self.clock.now())

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
            if run.qos and run.unreceived():
                return False
        return True

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.spec.drain
        while time.monotonic() < deadline and not self._settled():
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ end
    async def _disconnect_all(self) -> None:
        async def one(client: WorkloadClient) -> None:
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
    faulthandler.register(signal.SIGUSR1)  # the orchestrator asks for stacks before a kill
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
