"""Real MQTT clients for the interop suite: paho-mqtt, mosquitto_pub/sub, amqtt.

Everything here is bounded in time and cleaned up by ``ClientPool.close_all``
(the ``clients`` fixture), even when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as mqtt
import pytest
from brokers import broker_kind
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .rawmqtt import RawClient

TIMEOUT = 5.0
V311, V5 = 4, 5


class BrokerLike(Protocol):
    host: str
    tcp_port: int
    tls_port: int
    kind: str

    @property
    def cafile(self) -> str: ...


def skip_on_mosquitto(reason: str) -> pytest.MarkDecorator:
    """For tests mosquitto cannot pass (a spec deviation, a missing feature or a different
    but permitted choice, as ``reason`` says); they stay in the suite for qmig."""
    return pytest.mark.skipif(broker_kind() == "mosquitto", reason=f"mosquitto: {reason}")


def uid(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def topic_root(name: str) -> str:
    """A topic prefix unique to one test, so tests sharing a broker do not interfere."""
    return f"it/{name}/{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- collector


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)
    source: str = ""

    @property
    def sub_ids(self) -> list[int]:
        ids = self.properties.get("SubscriptionIdentifier", [])
        return list(ids) if isinstance(ids, list | tuple) else [ids]


class Collector:
    """Thread-safe list of received messages with blocking waits."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._cond = threading.Condition()
        self._items: list[Received] = []

    def add(self, msg: Received) -> None:
        with self._cond:
            self._items.append(msg)
            self._cond.notify_all()

    @property
    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._items)

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def matching(self, topic: str | None = None) -> list[Received]:
        return [m for m in self.messages if topic is None or m.topic == topic]

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [m.payload for m in self.matching(topic)]

    def wait_until(
        self, predicate: Callable[[list[Received]], bool], timeout: float = TIMEOUT, what: str = ""
    ) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._items):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"collector {self.name!r}: timed out after {timeout}s waiting for "
                        f"{what or predicate}; got {len(self._items)}: {self._summary()}"
                    )
                self._cond.wait(remaining)
            return list(self._items)

    def wait_for(
        self, n: int, timeout: float = TIMEOUT, topic: str | None = None
    ) -> list[Received]:
        """Wait until at least ``n`` messages (on ``topic`` if given) arrived; return those."""

        def enough(items: list[Received]) -> bool:
            return sum(1 for m in items if topic is None or m.topic == topic) >= n

        self.wait_until(enough, timeout, f"{n} message(s) on {topic or 'any topic'}")
        return self.matching(topic)

    def _summary(self, limit: int = 12) -> str:
        shown = [
            f"{m.topic}={m.payload[:40]!r}(q{m.qos}{',r' if m.retain else ''})"
            for m in self._items[-limit:]
        ]
        return ", ".join(shown)


# --------------------------------------------------------------------------- paho


@dataclass
class Connack:
    reason_code: int
    reason_name: str
    session_present: bool
    properties: dict[str, Any]


@dataclass
class Disconnected:
    reason_code: int
    reason_name: str
    properties: dict[str, Any]
    at: float


def _props_dict(props: Properties | None) -> dict[str, Any]:
    if props is None:
        return {}
    return dict(props.json())


def _rc(code: Any) -> int:
    """paho reason codes are ReasonCode objects (v5 and, in paho 2.x, v3.1.1 too)."""
    return int(getattr(code, "value", code))


class PahoClient:
    """A paho-mqtt 2.x client running its network loop in a thread (``loop_start``)."""

    def __init__(
        self,
        broker: BrokerLike,
        *,
        version: int = V5,
        client_id: str | None = None,
        tls: bool = False,
        clean: bool = True,
        session_expiry: int | None = None,
        keepalive: int = 30,
        username: str | None = None,
        password: str | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        will_properties: Properties | None = None,
        connect_properties: dict[str, Any] | None = None,
        name: str = "",
    ) -> None:
        self.broker = broker
        self.version = version
        self.client_id = client_id or uid("paho")
        self.tls = tls
        self.clean = clean
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.connect_properties = connect_properties or {}
        self.collector = Collector(name or self.client_id)
        self.connack: Connack | None = None
        self.disconnects: list[Disconnected] = []
        self._cond = threading.Condition()
        self._acks: dict[int, Any] = {}
        protocol = mqtt.MQTTv5 if version == V5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {}
        if version != V5:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            reconnect_on_failure=False,
            **kwargs,
        )
        if tls:
            self.client.tls_set(ca_certs=broker.cafile)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos, retain, properties=will_properties)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self.client.on_publish = self._on_publish
        self._loop_started = False

    # -- callbacks (network thread) ---------------------------------------------------

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._cond:
            self.connack = Connack(
                _rc(reason), str(reason), bool(flags.session_present), _props_dict(props)
            )
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, props: Any) -> None:
        with self._cond:
            self.disconnects.append(
                Disconnected(_rc(reason), str(reason), _props_dict(props), time.monotonic())
            )
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = _props_dict(msg.properties) if self.version == V5 else {}
        self.collector.add(
            Received(
                msg.topic,
                bytes(msg.payload),
                msg.qos,
                bool(msg.retain),
                props,
                source=self.client_id,
            )
        )

    def _ack(self, mid: int, value: Any) -> None:
        with self._cond:
            self._acks[mid] = value
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _props: Any) -> None:
        self._ack(mid, [_rc(c) for c in codes])

    def _on_unsubscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _props: Any) -> None:
        self._ack(mid, [_rc(c) for c in codes] if codes else [])

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _props: Any) -> None:
        self._ack(mid, _rc(reason))

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.client_id}: timed out waiting for {what}")
                self._cond.wait(remaining)

    def _wait_ack(self, mid: int, timeout: float, what: str) -> Any:
        self._wait(lambda: mid in self._acks, timeout, f"{what} (mid {mid})")
        with self._cond:
            return self._acks.pop(mid)

    # -- API --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.broker.tls_port if self.tls else self.broker.tcp_port

    def connect(self, timeout: float = TIMEOUT, *, expect_success: bool = True) -> Connack:
        kwargs: dict[str, Any] = {}
        if self.version == V5:
            props = Properties(PacketTypes.CONNECT)
            if self.session_expiry is not None:
                props.SessionExpiryInterval = self.session_expiry
            for key, value in self.connect_properties.items():
                setattr(props, key, value)
            kwargs = {"clean_start": self.clean, "properties": props}
        with self._cond:
            self.connack = None
        self.client.connect(self.broker.host, self.port, self.keepalive, **kwargs)
        if not self._loop_started:
            self.client.loop_start()
            self._loop_started = True
        self._wait(lambda: self.connack is not None, timeout, "CONNACK")
        assert self.connack is not None
        if expect_success:
            assert self.connack.reason_code == 0, f"connect refused: {self.connack}"
        return self.connack

    @property
    def is_connected(self) -> bool:
        return bool(self.client.is_connected())

    def subscribe(
        self,
        topic: str | Sequence[tuple[str, int]],
        qos: int = 0,
        *,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        sub_id: int | None = None,
        timeout: float = TIMEOUT,
    ) -> list[int]:
        """Subscribe and wait for SUBACK; return its reason codes / granted QoS values."""
        filters = [(topic, qos)] if isinstance(topic, str) else list(topic)
        if self.version == V5:
            props = None
            if sub_id is not None:
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = sub_id
            opts = [
                (
                    t,
                    SubscribeOptions(
                        qos=q,
                        noLocal=no_local,
                        retainAsPublished=retain_as_published,
                        retainHandling=retain_handling,
                    ),
                )
                for t, q in filters
            ]
            rc, mid = self.client.subscribe(opts, properties=props)
        else:
            rc, mid = self.client.subscribe(filters)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe failed locally: {rc}"
        assert mid is not None
        codes: list[int] = self._wait_ack(mid, timeout, "SUBACK")
        return codes

    def unsubscribe(self, topic: str, timeout: float = TIMEOUT) -> list[int]:
        rc, mid = self.client.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        assert mid is not None
        codes: list[int] = self._wait_ack(mid, timeout, "UNSUBACK")
        return codes

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        *,
        properties: Properties | None = None,
        wait: bool = True,
        timeout: float = TIMEOUT,
    ) -> int | None:
        """Publish; with ``wait`` block until sent (QoS 0) or acknowledged (QoS 1/2).

        Returns the PUBACK/PUBREC reason code paho reports (0 for v3.1.1 / QoS 0).
        """
        info = self.client.publish(topic, payload, qos, retain, properties=properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish failed locally: {info.rc}"
        if not wait:
            return None
        code: int = self._wait_ack(info.mid, timeout, f"publish ack for {topic}")
        return code

    def disconnect(self, reason_code: int = 0, timeout: float = TIMEOUT) -> None:
        """Send DISCONNECT and wait until paho reports the connection closed."""
        n = len(self.disconnects)
        if self.version == V5 and reason_code:
            from paho.mqtt.reasoncodes import ReasonCode

            self.client.disconnect(ReasonCode(PacketTypes.DISCONNECT, identifier=reason_code))
        else:
            self.client.disconnect()
        self._wait(lambda: len(self.disconnects) > n, timeout, "on_disconnect")

    def wait_disconnected(self, timeout: float = TIMEOUT, since: int = 0) -> Disconnected:
        """Wait until the *broker* closes the connection (e.g. DISCONNECT 0x8E, keepalive);
        return the first disconnect event after the first ``since`` ones."""
        self._wait(lambda: len(self.disconnects) > since, timeout, "server-side disconnect")
        return self.disconnects[since]

    def close(self) -> None:
        """Finalizer: DISCONNECT if still connected, then stop the loop thread."""
        with contextlib.suppress(Exception):
            if self.client.is_connected():
                self.client.disconnect()
        with contextlib.suppress(Exception):
            self.client.loop_stop()


def v5_props(packet_type: int, **values: Any) -> Properties:
    props = Properties(packet_type)
    for key, value in values.items():
        setattr(props, key, value)
    return props


# --------------------------------------------------------------------------- mosquitto CLI


def _cli(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    return path


def _common_args(
    broker: BrokerLike, *, version: int, tls: bool, client_id: str | None
) -> list[str]:
    args = [
        "-h",
        broker.host,
        "-p",
        str(broker.tls_port if tls else broker.tcp_port),
        "-V",
        "mqttv5" if version == V5 else "mqttv311",
    ]
    if tls:
        args += ["--cafile", broker.cafile]
    if client_id:
        args += ["-i", client_id]
    return args


def mosquitto_pub(
    broker: BrokerLike,
    topic: str,
    message: bytes | str,
    *,
    qos: int = 0,
    retain: bool = False,
    version: int = V5,
    tls: bool = False,
    client_id: str | None = None,
    extra: Iterable[str] = (),
    timeout: float = 10.0,
) -> subprocess.CompletedProcess[bytes]:
    """Run mosquitto_pub once (bounded by ``timeout``); raises on non-zero exit."""
    payload = message.encode() if isinstance(message, str) else message
    argv = [
        _cli("mosquitto_pub"),
        *_common_args(broker, version=version, tls=tls, client_id=client_id),
        "-t",
        topic,
        "-q",
        str(qos),
        "-s",
    ]
    if retain:
        argv.append("-r")
    argv += list(extra)
    proc = subprocess.run(argv, input=payload, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(
            f"mosquitto_pub exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
            f" ({' '.join(argv)})"
        )
    return proc


class MosquittoSub:
    """A mosquitto_sub subprocess; messages parsed from its stdout into a Collector.

    Output format is ``MSG <qos> <retain> <topic> <hex payload>`` (``-F``) so it can be
    told apart from the ``-d`` debug lines, which we use to see the SUBACK.
    """

    def __init__(
        self,
        broker: BrokerLike,
        topics: str | Sequence[str],
        *,
        qos: int = 0,
        count: int | None = None,
        wait_seconds: int = 10,
        version: int = V5,
        tls: bool = False,
        client_id: str | None = None,
        extra: Iterable[str] = (),
    ) -> None:
        self.collector = Collector(f"mosquitto_sub:{topics}")
        self.suback = threading.Event()
        self.lines: list[str] = []
        argv = [
            _cli("mosquitto_sub"),
            *_common_args(broker, version=version, tls=tls, client_id=client_id or uid("msub")),
            "-q",
            str(qos),
            "-d",
            "-W",
            str(wait_seconds),
            "-F",
            "MSG %q %r %t %x",
        ]
        for t in [topics] if isinstance(topics, str) else topics:
            argv += ["-t", t]
        if count is not None:
            argv += ["-C", str(count)]
        argv += list(extra)
        stdbuf = shutil.which("stdbuf")
        if stdbuf:  # line-buffer stdout so "-d" SUBACK lines are seen when they happen
            argv = [stdbuf, "-oL", *argv]
        self.argv = argv
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if "received SUBACK" in line:
                self.suback.set()
            elif line.startswith("MSG "):
                _, qos, retain, rest = line.split(" ", 3)
                topic, _, hexpayload = rest.rpartition(" ")
                self.collector.add(
                    Received(
                        topic,
                        bytes.fromhex(hexpayload),
                        int(qos),
                        retain == "1",
                        source="mosquitto_sub",
                    )
                )

    def wait_subscribed(self, timeout: float = TIMEOUT) -> MosquittoSub:
        if not self.suback.wait(timeout):
            raise AssertionError(f"mosquitto_sub got no SUBACK: {self.output()}")
        return self

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        return rc

    def output(self) -> str:
        return "\n".join(self.lines[-30:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL: the TCP connection is dropped without DISCONNECT."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# --------------------------------------------------------------------------- amqtt


@contextlib.asynccontextmanager
async def amqtt_client(
    broker: BrokerLike,
    *,
    tls: bool = False,
    client_id: str | None = None,
    cleansession: bool = True,
    username: str | None = None,
    password: str | None = None,
    keep_alive: int = 30,
) -> AsyncIterator[Any]:
    """A connected ``amqtt.client.MQTTClient`` (MQTT 3.1.1), always disconnected afterwards."""
    from amqtt.client import MQTTClient

    client = MQTTClient(
        client_id=client_id or uid("amqtt"),
        config={"auto_reconnect": False, "keep_alive": keep_alive, "plugins": {}},
    )
    scheme = "mqtts" if tls else "mqtt"
    port = broker.tls_port if tls else broker.tcp_port
    auth = f"{username}:{password}@" if username is not None else ""
    uri = f"{scheme}://{auth}{broker.host}:{port}"
    try:
        await asyncio.wait_for(
            client.connect(uri, cleansession=cleansession, cafile=broker.cafile if tls else None),
            TIMEOUT,
        )
    except BaseException:
        # amqtt quirk: a refused CONNACK leaves the TCP transport open; close it ourselves
        handler = getattr(client, "_handler", None)
        if handler is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(handler.stop(), TIMEOUT)
        raise
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), TIMEOUT)


async def amqtt_receive(client: Any, n: int, timeout: float = TIMEOUT) -> list[Received]:
    """Collect ``n`` messages from an amqtt client (raises TimeoutError otherwise)."""
    out: list[Received] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        msg = await client.deliver_message(timeout_duration=max(0.01, deadline - time.monotonic()))
        assert msg is not None
        out.append(
            Received(
                msg.topic, bytes(msg.data), int(msg.qos or 0), bool(msg.retain), source="amqtt"
            )
        )
    return out


async def wait_collected(
    collector: Collector, n: int, timeout: float = TIMEOUT, topic: str | None = None
) -> list[Received]:
    """``Collector.wait_for`` for async tests (does not block the event loop)."""
    return await asyncio.to_thread(collector.wait_for, n, timeout, topic)


# --------------------------------------------------------------------------- pool


class ClientPool:
    """Creates clients for one test and closes all of them in the finalizer."""

    def __init__(self, broker: BrokerLike | None = None) -> None:
        self.broker = broker
        self._paho: list[PahoClient] = []
        self._subs: list[MosquittoSub] = []
        self._raw: list[RawClient] = []

    def _broker(self, broker: BrokerLike | None) -> BrokerLike:
        b = broker or self.broker
        assert b is not None, "no broker given"
        return b

    def paho(
        self, broker: BrokerLike | None = None, *, connect: bool = True, **kwargs: Any
    ) -> PahoClient:
        client = PahoClient(self._broker(broker), **kwargs)
        self._paho.append(client)
        if connect:
            client.connect()
        return client

    def mosquitto_sub(
        self,
        topics: str | Sequence[str],
        broker: BrokerLike | None = None,
        *,
        wait: bool = True,
        **kwargs: Any,
    ) -> MosquittoSub:
        sub = MosquittoSub(self._broker(broker), topics, **kwargs)
        self._subs.append(sub)
        if wait:
            sub.wait_subscribed()
        return sub

    def raw(self, broker: BrokerLike | None = None) -> RawClient:
        b = self._broker(broker)
        client = RawClient(b.host, b.tcp_port)
        self._raw.append(client)
        return client

    def close_all(self) -> None:
        for client in self._paho:
            client.close()
        for sub in self._subs:
            sub.close()
        for raw in self._raw:
            raw.close()
