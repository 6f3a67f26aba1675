"""Small helpers shared by the QUIC tests: unique names, message collection, paho in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import sys
import threading
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from client.client import Client, Message
from mqttproto.packets import MQTT_3_1_1, MQTT_5
from qmig.benchmarks.streams import DelayLossRelay

from .conftest import HOST, QBroker

TIMEOUT = 5.0
VERSIONS = {"v5": MQTT_5, "v311": MQTT_3_1_1}


def uid(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def qmig_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qmig", *args]


def make_client(broker: QBroker, transport: str, **kwargs: Any) -> Client:
    """A qmig Client for ``transport`` on the test broker (certificates checked by the CA)."""
    return Client(HOST, broker.port(transport), transport=transport, cafile=broker.ca, **kwargs)


async def collect(client: Client, count: int, timeout: float = TIMEOUT) -> list[Message]:
    """Exactly ``count`` messages (fails with what arrived if fewer come in ``timeout``)."""
    got: list[Message] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(got) < count:
        left = deadline - loop.time()
        try:
            got.append(await client.next_message(max(left, 0.001)))
        except TimeoutError as exc:
            summary = [(m.topic, m.payload[:40]) for m in got[-5:]]
            raise AssertionError(f"got {len(got)} of {count} messages; last: {summary}") from exc
    return got


async def assert_quiet(client: Client, wait: float = 0.3) -> None:
    """No further message arrives within ``wait`` seconds (no duplicates, no strays)."""
    with contextlib.suppress(TimeoutError):
        extra = await client.next_message(wait)
        raise AssertionError(f"unexpected extra message {extra.topic} {extra.payload!r}")


class Paho:
    """A paho-mqtt client on its own network thread, with blocking waits for acks."""

    def __init__(
        self, port: int, version: int = MQTT_5, client_id: str = "", clean_session: bool = True
    ) -> None:
        v5 = version == MQTT_5
        self.version = version
        self.port = port
        self.client_id = client_id or uid("paho-")
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else clean_session,
        )
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack_rc: Any = None
        self.session_present = False
        self._acked: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_ack
        self.client.on_publish = self._on_publish

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _props: Any) -> None:
        self.connack_rc = reason
        self.session_present = bool(flags.session_present)
        if not reason.is_failure:
            self.connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, _reason: Any, _props: Any) -> None:
        self.disconnected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(msg)

    def _event(self, mid: int) -> threading.Event:
        with self._lock:
            return self._acked.setdefault(mid, threading.Event())

    def _on_ack(self, _c: Any, _u: Any, mid: int, _codes: Any, _props: Any) -> None:
        self._event(mid).set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, _reason: Any, _props: Any) -> None:
        self._event(mid).set()

    def connect(self, timeout: float = TIMEOUT) -> Paho:
        self.client.connect(HOST, self.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise AssertionError(f"paho: no successful CONNACK (rc {self.connack_rc})")
        return self

    def subscribe(self, topic: str, qos: int = 1, timeout: float = TIMEOUT) -> None:
        rc, mid = self.client.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        assert self._event(mid).wait(timeout), f"paho: no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                timeout: float = TIMEOUT) -> None:  # fmt: skip
        info = self.client.publish(topic, payload, qos, retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        if qos:
            assert self._event(info.mid).wait(timeout), f"paho: publish {topic} not acked"

    def get(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("paho: no message within the timeout") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.connected.is_set():
                self.client.disconnect()
        self.client.loop_stop()


async def quic_terminated(broker: QBroker, client_id: str, since: int, timeout: float) -> None:
    """Wait until the QUIC connection that carried ``client_id`` has ended, per the broker
    log: its peer address, then aioquic's connection id for that path, then its end."""
    line = await broker.await_log(
        rf"client {re.escape(client_id)} connected over quic from [\d.]+:\d+", since
    )
    port = line.rsplit(":", 1)[1]
    cid_line = await broker.await_log(
        rf"\[[0-9a-f]+\] Network path \('[\d.:a-f]+', {port}\) discovered", since
    )
    cid = re.escape(cid_line.split("]")[0] + "]")
    await broker.await_log(rf"{cid} .*QuicConnectionState.TERMINATED", since, timeout)


class UdpRelay(DelayLossRelay):
    """A loopback UDP relay between one QUIC client and the broker that drops on request.

    ``drop_from_client`` drops the next N datagrams the client sends (``dropped_from_client``
    counts them), which is how a test loses exactly the datagram that carries a given packet.
    """

    def __init__(self, broker_port: int) -> None:
        super().__init__(broker_port, delay=0.0, loss=0.0, seed=0)
        self.drop_from_client = 0
        self.dropped_from_client = 0
        self.port = 0

    async def start(self) -> UdpRelay:  # type: ignore[override]
        self.port = await super().start()
        return self

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.drop_from_client > 0:
            self.client = addr
            self.drop_from_client -= 1
            self.dropped_from_client += 1
            return
        super().datagram_received(data, addr)
