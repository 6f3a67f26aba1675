"""Locust users for qmig: IoT telemetry over QUIC (qmig's client) and over TCP (locust's MqttUser).

    locust -f loadtests/locustfile.py --headless -u 200 -r 50 -t 60s --host 127.0.0.1 \\
        --quic-port 14567 --tcp-port 1883 --cafile ca.crt [QuicUser] [TcpUser]

Each user connects (MQTT 5, a session that outlives a reconnect), subscribes to its own topic
and publishes numbered telemetry to it at ``--msg-rate`` messages per second and ``--qos``.
Locust sees, per transport (``quic:``/``tcp:``):

- ``publish``: the publish round trip (PUBACK at QoS 1/2) as one request; a timeout or a
  refusal is a failure;
- ``deliver``: the end-to-end delivery latency of each message as one request; a message not
  delivered within ``--delivery-timeout`` is a failure ("lost");
- ``connect``/``subscribe``: one each per (re)connection; ``connection``: a QUIC connection
  lost for good (a failure: QUIC clients are meant to follow the broker, not reconnect).

A user stopping waits up to ``--drain`` seconds for its messages still in flight, then counts
the rest as lost.  ``--trace-file`` writes every user's counts and series as JSON when the run
stops (the migration and limits drivers read it), and ``<trace>.ready`` once every spawned
user is connected.

QUIC users run qmig's asyncio client in one OS thread shared by all of them
(:mod:`loadtests.bridge`); TCP users are :class:`locust.contrib.mqtt.MqttUser` (paho-mqtt),
whose network loop is a greenlet under locust's monkey-patching.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import gevent
import gevent.event
import paho.mqtt.client as mqtt
from locust import User, events, task
from locust.contrib.mqtt import MqttClient, MqttUser
from locust.env import Environment
from locust.event import EventHook
from locust.exception import StopUser
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from client.client import Client, parse_reference
from loadtests.bridge import get_bridge
from loadtests.telemetry import Tracker, payload, wall
from migration.scenario import RECONNECT_DELAY

log = logging.getLogger("qmig.loadtests")
REQUEST_TYPE = "MQTT"
TRACKERS: list[Tracker] = []
_ids = itertools.count(1)

_Handler = TypeVar("_Handler", bound=Callable[..., Any])


def _listener(hook: EventHook) -> Callable[[_Handler], _Handler]:
    """``@hook.add_listener`` keeping the handler's type (locust's method is unannotated)."""

    def add(handler: _Handler) -> _Handler:
        hook.add_listener(handler)
        return handler

    return add


_run: dict[str, float | None] = {"started_at": None, "ready_at": None}


class LostMessage(Exception):
    """A message was not delivered within the delivery timeout (or before the user stopped)."""


class ConnectionLost(Exception):
    """The connection ended and the client will not get it back by itself."""


class NotConnected(Exception):
    """The user had no connection when it had to publish."""


@dataclass(frozen=True)
class Settings:
    """The ``--`` options below, with defaults for runs that have no parsed options."""

    msg_rate: float = 1.0
    qos: int = 1
    payload_bytes: int = 64
    quic_port: int = 14567
    tcp_port: int = 1883
    cafile: str = ""
    follow: str = "proactive"
    ack_timeout: float = 10.0
    delivery_timeout: float = 10.0
    connect_timeout: float = 15.0
    drain: float = 5.0
    session_expiry: int = 300
    topic_prefix: str = "qmig/load"
    trace_file: str = ""

    @classmethod
    def of(cls, environment: Environment) -> Settings:
        options = environment.parsed_options
        if options is None:
            return cls()
        return cls(**{k: getattr(options, k) for k in cls.__dataclass_fields__
                      if getattr(options, k, None) is not None})  # fmt: skip


@_listener(events.init_command_line_parser)
def _options(parser: Any) -> None:
    d = Settings()
    group = parser.add_argument_group("qmig telemetry")
    add = group.add_argument
    add("--msg-rate", type=float, default=d.msg_rate, help="messages per second per user")
    add("--qos", type=int, choices=(0, 1, 2), default=d.qos, help="publish/subscribe QoS")
    add("--payload-bytes", type=int, default=d.payload_bytes, help="telemetry payload size")
    add("--quic-port", type=int, default=d.quic_port, help="broker QUIC port")
    add("--tcp-port", type=int, default=d.tcp_port, help="broker MQTT/TCP port")
    add("--cafile", default=d.cafile, help="CA for the broker's QUIC certificate (else insecure)")
    add("--follow", default=d.follow, help="QUIC migration strategy (proactive, reactive, ...)")
    add("--ack-timeout", type=float, default=d.ack_timeout, help="seconds to wait for a PUBACK")
    add(
        "--delivery-timeout",
        type=float,
        default=d.delivery_timeout,
        help="seconds after which an undelivered message counts as lost",
    )
    add("--connect-timeout", type=float, default=d.connect_timeout, help="seconds to connect")
    add(
        "--drain",
        type=float,
        default=d.drain,
        help="seconds a stopping user waits for its messages in flight",
    )
    add("--session-expiry", type=int, default=d.session_expiry, help="MQTT session expiry (s)")
    add("--topic-prefix", default=d.topic_prefix, help="each user publishes to PREFIX/<id>")
    add("--trace-file", default=d.trace_file, help="write per-user counts and series here (JSON)")


# ---------------------------------------------------------------------- shared user behaviour
class TelemetryUser(User):
    """Pacing, message bookkeeping and request events common to both transports."""

    abstract = True
    transport = ""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.settings = Settings.of(environment)
        self.client_id = f"lt-{os.getpid()}-{self.transport}-{next(_ids)}"
        self.topic = f"{self.settings.topic_prefix}/{self.client_id}"
        self.tracker = Tracker(self.client_id, self.transport,
                               keep_series=bool(self.settings.trace_file))  # fmt: skip
        TRACKERS.append(self.tracker)
        self.interval = 1.0 / self.settings.msg_rate
        self.next_due = 0.0
        self.stopping = False

    def wait_time(self) -> float:
        """A fixed schedule at the message rate; after a stall it resumes, it does not burst."""
        now = time.perf_counter()
        self.next_due = max(self.next_due + self.interval, now)
        return self.next_due - now

    def stagger(self) -> None:
        """Start publishing at a random phase so that users do not publish in lockstep."""
        gevent.sleep(random.uniform(0, self.interval))
        self.next_due = time.perf_counter()

    def fire(self, name: str, seconds: float, length: int = 0,
             exc: BaseException | None = None) -> None:  # fmt: skip
        self.environment.events.request.fire(
            request_type=REQUEST_TYPE, name=f"{self.transport}:{name}",
            response_time=seconds * 1000.0, response_length=length, exception=exc,
            context={"client_id": self.client_id},
        )  # fmt: skip
        if exc is not None:
            self.tracker.failure(time.perf_counter(), f"{self.transport}:{name}",
                                 f"{type(exc).__name__}: {exc}")  # fmt: skip

    def on_delivery(self, data: bytes | bytearray, at: float) -> None:
        """A message arrived (runs in the hub or the network greenlet: must not block)."""
        latency = self.tracker.deliver(data, at)
        if latency is not None:
            self.fire("deliver", latency, len(data))

    def check_overdue(self) -> None:
        timeout = self.settings.delivery_timeout
        for seq, age in self.tracker.overdue(time.perf_counter(), timeout):
            self.fire("deliver", age, exc=LostMessage(f"message {seq} not delivered in "
                                                      f"{timeout:g} s"))  # fmt: skip

    def drain(self) -> None:
        """Wait for the messages still in flight, then count what never came as lost."""
        deadline = time.perf_counter() + self.settings.drain
        while self.tracker.outstanding and time.perf_counter() < deadline:
            gevent.sleep(0.05)
        for seq, age in self.tracker.give_up(time.perf_counter()):
            self.fire("deliver", age, exc=LostMessage(f"message {seq} not delivered before "
                                                      "the user stopped"))  # fmt: skip

    def connected(self) -> None:
        if self.tracker.connected_at is None:
            self.tracker.connected_at = time.perf_counter()


# ---------------------------------------------------------------------- QUIC: qmig's client
class QuicUser(TelemetryUser):
    """MQTT 5 over QUIC with qmig's asyncio client, driven through the gevent/asyncio bridge."""

    transport = "quic"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.bridge = get_bridge()
        self.client: Client | None = None
        self.lost = False

    async def _open(self, host: str, port: int) -> tuple[Client, float, float]:
        s = self.settings
        client = Client(
            host, port, transport="quic", client_id=self.client_id,
            clean_start=self.tracker.connected_at is None,  # later: resume the session
            session_expiry=s.session_expiry, keep_alive=60,
            cafile=s.cafile or None, insecure=not s.cafile, follow=s.follow,
            connect_timeout=s.connect_timeout,
        )  # fmt: skip
        t0 = time.perf_counter()
        try:
            await client.connect()
        except BaseException:
            await client.disconnect()
            raise
        t1 = time.perf_counter()
        if not client.session_present:
            await client.subscribe(self.topic, s.qos, timeout=s.ack_timeout)
        return client, t1 - t0, time.perf_counter() - t1

    def _connect(self, host: str, port: int) -> bool:
        t0 = time.perf_counter()
        try:
            client, connect_s, subscribe_s = self.bridge.run(
                self._open(host, port),
                self.settings.connect_timeout + self.settings.ack_timeout + 5,
            )
        except Exception as exc:
            self.fire("connect", time.perf_counter() - t0, exc=exc)
            return False
        self.client, self.lost = client, False
        self.fire("connect", connect_s)
        self.fire("subscribe", subscribe_s)
        self.bridge.spawn(self._receive(client))
        self.connected()
        return True

    async def _receive(self, client: Client) -> None:
        try:
            async for message in client.messages():
                self.bridge.post(self.on_delivery, message.payload, time.perf_counter())
        finally:
            self.bridge.post(self._receiver_ended, client)

    def _receiver_ended(self, client: Client) -> None:
        if client is self.client and not self.stopping:
            self.lost = True
            self.fire("connection", 0.0, exc=ConnectionLost("QUIC connection lost"))

    async def _publish(self, client: Client, data: bytes) -> float:
        t0 = time.perf_counter()
        await client.publish(self.topic, data, self.settings.qos,
                             timeout=self.settings.ack_timeout)  # fmt: skip
        return time.perf_counter() - t0

    def on_start(self) -> None:
        if not self._connect(self.host or "127.0.0.1", self.settings.quic_port):
            raise StopUser()
        self.stagger()

    @task
    def publish(self) -> None:
        if self.lost or self.client is None:
            self._reconnect()
            if self.client is None or self.lost:
                return
        now = time.perf_counter()
        seq = self.tracker.new(now)
        data = payload(seq, self.settings.payload_bytes)
        try:
            rtt = self.bridge.run(self._publish(self.client, data), self.settings.ack_timeout + 2)
        except Exception as exc:  # ClientError, TimeoutError, ...: a failure, not a crash
            self.fire("publish", time.perf_counter() - now, exc=exc)
        else:
            self.tracker.ack(now, rtt)
            self.fire("publish", rtt, len(data))
        self.check_overdue()

    def _reconnect(self) -> None:
        """A new connection where the old one last was (it may have followed the broker)."""
        old, self.client = self.client, None
        host, port = self.host or "127.0.0.1", self.settings.quic_port
        if old is not None:
            host, port = old.host, old.port
            self.bridge.spawn(old.disconnect())
        self._connect(host, port)

    def on_stop(self) -> None:
        self.stopping = True
        if self.client is not None:
            self.drain()
            client, self.client = self.client, None
            try:
                self.bridge.run(client.disconnect(), 5)
            except Exception as exc:  # the run is over: a slow goodbye is not a failure
                log.debug("disconnect: %s", exc)


# ---------------------------------------------------------------------- TCP: locust's MqttUser
class TelemetryMqttClient(MqttClient):
    """locust's paho client, MQTT 5 with a persistent session, reporting under ``tcp:``.

    Publish round trips are timed by the user's task (from its start, waiting for a
    connection included), so the PUBACK callback only forgets the request.  A DISCONNECT
    carrying a Server Reference (the broker migrating) sends the reconnect there.
    """

    owner: TcpUser
    session_expiry = 300  # seconds; the user sets its own

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, *args, **kwargs)
        self.is_up = gevent.event.Event()
        self.connect_started = time.perf_counter()
        self.subscribed = False
        # As the lab workload's clients. paho annotates the delays int; it takes floats.
        self.reconnect_delay_set(*RECONNECT_DELAY)  # type: ignore[arg-type]

    def connect_async(self, host: str, port: int = 1883, keepalive: int = 60,
                      bind_address: str = "", bind_port: int = 0,
                      clean_start: Any = mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                      properties: Properties | None = None) -> None:  # fmt: skip
        if properties is None:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.session_expiry
        super().connect_async(host, port, keepalive, bind_address, bind_port, clean_start,
                              properties)  # fmt: skip

    def _generate_event_name(self, event_type: str, qos: int, topic: str) -> str:
        return f"tcp:{event_type}"

    def _on_publish_cb(self, client: Any, userdata: Any, mid: int, *args: Any) -> None:
        self._publish_requests.pop(mid, None)

    def _on_connect_cb_v5(self, client: Any, userdata: Any, connect_flags: Any,
                          reasoncode: Any, properties: Any) -> None:  # fmt: skip
        owner = self.owner
        took = time.perf_counter() - self.connect_started
        if reasoncode.is_failure:
            owner.fire("connect", took, exc=ConnectionError(f"CONNACK {reasoncode}"))
            return
        owner.fire("connect", took)
        if not connect_flags.session_present or not self.subscribed:
            self.subscribed = True
            self.subscribe(owner.topic, owner.settings.qos)
        owner.connected()
        self.is_up.set()

    def _on_disconnect_cb_v5(self, client: Any, userdata: Any, disconnect_flags: Any,
                             reasoncode: Any, properties: Any) -> None:  # fmt: skip
        self.is_up.clear()
        self.connect_started = time.perf_counter()
        owner = self.owner
        reference = getattr(properties, "ServerReference", None) if properties else None
        if reference:
            host, port = parse_reference(reference, self.port)
            try:
                self.host, self.port = host, port
            except RuntimeError:  # paho refuses while a socket is open: it is closing
                self._host, self._port = host, port
            owner.tracker.failures.append((wall(time.perf_counter()), "tcp:moved",
                                           f"{reasoncode}: to {host}:{port}"))  # fmt: skip
            return  # the broker moving is not a failure; not getting back would be
        if owner.stopping or not reasoncode.is_failure:
            return
        owner.fire("disconnect", 0.0, exc=ConnectionLost(f"disconnected: {reasoncode}"))

    def _deliver_cb(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.owner.on_delivery(message.payload, time.perf_counter())


class TcpUser(MqttUser, TelemetryUser):
    """MQTT 5 over TCP with :class:`locust.contrib.mqtt.MqttUser` (paho-mqtt)."""

    transport = "tcp"
    client_cls = TelemetryMqttClient
    protocol = mqtt.MQTTv5
    use_loop_selectors = True  # paho's select() loop stops at about 340 connections
    client: TelemetryMqttClient  # made by MqttUser from client_cls
    # Set by TelemetryUser.__init__, read by MqttUser.__init__; locust leaves its class
    # default (MqttUser.client_id = None) unannotated, so mypy types that None only.
    client_id: str  # type: ignore[assignment]

    def __init__(self, environment: Environment) -> None:
        settings = Settings.of(environment)
        self.port = settings.tcp_port
        self.host = self.host or "127.0.0.1"
        # MRO: MqttUser.__init__ -> TelemetryUser.__init__ (our client id and topic) -> User;
        # then MqttUser creates the client with our id and starts its network greenlet, which
        # runs at the next switch: everything it needs is set before this method returns.
        super().__init__(environment)
        client = self.client
        client.owner = self
        client.session_expiry = self.settings.session_expiry
        client.on_message = client._deliver_cb
        client.connect_async(self.host, self.port)

    def on_start(self) -> None:
        t0 = time.perf_counter()
        client = self.client
        if not client.is_up.wait(self.settings.connect_timeout):
            self.fire(
                "connect",
                time.perf_counter() - t0,
                exc=ConnectionError("no CONNACK within the connect timeout"),
            )
            raise StopUser()
        self.stagger()

    @task
    def publish(self) -> None:
        client = self.client
        t0 = time.perf_counter()
        if not client.is_up.wait(self.settings.ack_timeout):
            self.fire("publish", time.perf_counter() - t0, exc=NotConnected("not connected"))
            self.check_overdue()
            return
        sent = time.perf_counter()
        seq = self.tracker.new(sent)
        data = payload(seq, self.settings.payload_bytes)
        info = client.publish(self.topic, data, self.settings.qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:  # MqttClient fired the failure already
            self.tracker.failure(time.perf_counter(), "tcp:publish", f"rc {info.rc}")
        else:
            remaining = self.settings.ack_timeout - (time.perf_counter() - t0)
            info.wait_for_publish(max(0.0, remaining))
            took = time.perf_counter() - t0
            if info.is_published():
                self.tracker.ack(sent, took)
                self.fire("publish", took, len(data))
            else:
                self.fire("publish", took, exc=TimeoutError("no PUBACK in time"))
        self.check_overdue()

    def on_stop(self) -> None:
        self.stopping = True
        self.drain()
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------------- run-level events
@_listener(events.test_start)
def _test_start(environment: Environment, **_: Any) -> None:
    _run["started_at"] = time.time()


@_listener(events.spawning_complete)
def _spawned(user_count: int, **_: Any) -> None:
    """Once every spawned user is connected, note the time (and tell a driver via a file)."""

    def wait() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if sum(t.connected_at is not None for t in TRACKERS) >= user_count:
                break
            gevent.sleep(0.1)
        _run["ready_at"] = time.time()
        connected = sum(t.connected_at is not None for t in TRACKERS)
        log.info("%d of %d users connected", connected, user_count)
        trace = _trace_path()
        if trace is not None:
            ready = trace.with_name(trace.name + ".ready")
            ready.write_text(json.dumps({"users": user_count, "connected": connected,
                                         "at": _run["ready_at"]}) + "\n")  # fmt: skip

    gevent.spawn(wait)


_environment: list[Environment] = []


@_listener(events.init)
def _init(environment: Environment, **_: Any) -> None:
    _environment.append(environment)


def _trace_path() -> Path | None:
    if not _environment:
        return None
    name = Settings.of(_environment[0]).trace_file
    return Path(name) if name else None


def totals() -> dict[str, dict[str, int]]:
    """Counts summed per transport."""
    out: dict[str, dict[str, int]] = {}
    for t in TRACKERS:
        row = out.setdefault(
            t.transport,
            dict.fromkeys(("users", "sent", "acked", "delivered", "lost", "late", "duplicates"), 0),
        )
        row["users"] += 1
        for key in ("sent", "acked", "delivered", "lost", "late", "duplicates"):
            row[key] += getattr(t, key)
    return out


@_listener(events.test_stop)
def _test_stop(environment: Environment, **_: Any) -> None:
    for transport, row in totals().items():
        log.info("%s: %s", transport, ", ".join(f"{k} {v}" for k, v in row.items()))
    trace = _trace_path()
    if trace is None:
        return
    data = {
        "clock": "wall",
        "started_at": _run["started_at"],
        "ready_at": _run["ready_at"],
        "stopped_at": time.time(),
        "settings": asdict(Settings.of(environment)),
        "host": environment.host,
        "totals": totals(),
        "users": [t.summary() for t in TRACKERS],
    }
    tmp = trace.with_name(f".{trace.name}.tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, trace)
