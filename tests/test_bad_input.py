"""Hostile and broken clients against a real ``python -m qmig broker`` process.

Each test makes one client misbehave over a raw TCP socket (garbage, malformed or
oversized packets, protocol violations, stalling, never reading, too many subscriptions)
and then checks the same four things:

* the offender is closed, with the reason code its protocol version can carry;
* the broker wrote exactly one INFO-or-above line about it on stderr;
* a bystander paho subscriber, connected all along, still receives;
* QoS 1 messages queued before the incident for an offline persistent session of another
  client are all delivered when it comes back.

One broker serves the whole module (started with a small ``--max-packet-size``); it is
always terminated by PID, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest

from mqttproto.codec import PacketReader, encode
from mqttproto.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)
from mqttproto.properties import PropertyId
from mqttproto.reasons import ReasonCode
from tests.brokers import stop_process

P = PropertyId
R = ReasonCode
T = TypeVar("T")

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 15.0
IO_TIMEOUT = 5.0
MAX_PACKET_SIZE = 16_384
MAX_SUBSCRIPTIONS = 5000
_LOUD = re.compile(r"\b(INFO|WARNING|ERROR|CRITICAL)\b")


# --------------------------------------------------------------------------- broker process


@dataclass
class QmigProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log_mark(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, mark: int) -> list[str]:
        with self.log_path.open("rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace").splitlines()

    def loud_lines(self, mark: int, needle: str) -> list[str]:
        """INFO-or-above lines written since ``mark`` that mention ``needle``."""
        return [ln for ln in self.log_since(mark) if needle in ln and _LOUD.search(ln)]

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0  # pragma: no cover


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def qmig_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QmigProcess]:
    work = tmp_path_factory.mktemp("bad-input-broker")
    config = work / "broker.yaml"
    config.write_text(f"max_subscriptions_per_client: {MAX_SUBSCRIPTIONS}\n", encoding="utf-8")
    log_path = work / "stderr.log"
    port = _free_port()
    cmd = [
        sys.executable, "-m", "qmig", "broker", "--config", str(config),
        "--host", HOST, "--tcp-port", str(port), "--tls-port", "0", "--mptcp-port", "0",
        "--max-packet-size", str(MAX_PACKET_SIZE), "--log-level", "DEBUG",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while b"qmig broker: ready" not in log_path.read_bytes():
            if proc.poll() is not None:
                pytest.fail(f"broker exited with {proc.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"broker not ready after {READY_TIMEOUT} s:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield QmigProcess(proc, port, log_path)
        assert proc.poll() is None, "the broker died during the tests"
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------- raw client


class RawClient:
    """A blocking MQTT client on a plain socket, using the project's codec."""

    def __init__(self, port: int, version: int = MQTT_5, rcvbuf: int | None = None) -> None:
        self.version = version
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect((HOST, port))
        self.local = "{}:{}".format(*self.sock.getsockname())
        self.reader = PacketReader(version=version, max_packet_size=1 << 24)
        self.inbox: list[Packet] = []
        self.eof = False
        self._ids = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_id(self) -> int:
        self._ids = self._ids % 65535 + 1
        return self._ids

    def send(self, *packets: Packet) -> None:
        self.sock.sendall(b"".join(encode(p, self.version) for p in packets))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read once; False on EOF or reset."""
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.inbox.extend(self.reader.feed(data))
        return True

    def recv(self, timeout: float = IO_TIMEOUT) -> Packet | None:
        """The next packet, or None once the broker has closed the connection."""
        deadline = time.monotonic() + timeout
        while not self.inbox:
            if self.eof or not self._fill(deadline):
                return None
        return self.inbox.pop(0)

    def expect(self, kind: type[T], timeout: float = IO_TIMEOUT) -> T:
        packet = self.recv(timeout)
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    def until_closed(self, timeout: float = IO_TIMEOUT) -> list[Packet]:
        """Every packet the broker sends before it closes the connection (which it must)."""
        deadline = time.monotonic() + timeout
        out: list[Packet] = []
        while True:
            while self.inbox:
                out.append(self.inbox.pop(0))
            if self.eof:
                return out
            try:
                self._fill(deadline)
            except TimeoutError:
                pytest.fail(f"broker did not close the connection; received {out!r}")

    def connect(self, client_id: str, **kw: Any) -> Connack:
        expiry = kw.pop("session_expiry", None)
        props: dict[int, Any] = dict(kw.pop("properties", {}))
        if expiry is not None:
            props[P.SESSION_EXPIRY_INTERVAL] = expiry
        self.send(Connect(client_id, self.version, properties=props, **kw))
        return self.expect(Connack)

    def subscribe(self, *filters: str, qos: int = 1) -> Suback:
        pid = self.next_id()
        self.send(Subscribe(pid, [Subscription(f, qos) for f in filters]))
        suback = self.expect(Suback)
        assert suback.packet_id == pid
        return suback

    def publish_qos1(self, topic: str, payload: bytes) -> int:
        pid = self.next_id()
        self.send(Publish(topic, payload, 1, packet_id=pid))
        ack = self.expect(Puback)
        assert ack.packet_id == pid
        return ack.reason_code

    def ping(self) -> float:
        start = time.monotonic()
        self.send(Pingreq())
        self.expect(Pingresp)
        return time.monotonic() - start


# --------------------------------------------------------------------------- witnesses


class Bystander:
    """A paho MQTT 5 subscriber on ``bystander/#`` for the whole module."""

    def __init__(self, port: int) -> None:
        self.messages: queue.Queue[bytes] = queue.Queue()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="bystander", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(HOST, port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(IO_TIMEOUT), "bystander did not connect"
        self.client.subscribe("bystander/#", qos=1)
        assert self._subscribed.wait(IO_TIMEOUT), "bystander did not subscribe"
        self.publisher = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="bystander-pub", protocol=mqtt.MQTTv311
        )
        self.publisher.connect(HOST, port, keepalive=30)
        self.publisher.loop_start()
        self._seq = 0

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if not reason.is_failure:
            self._connected.set()

    def _on_subscribe(self, *_args: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(msg.payload)

    def check(self) -> None:
        """A fresh message published now reaches the bystander."""
        self._seq += 1
        payload = f"still-here-{self._seq}".encode()
        info = self.publisher.publish("bystander/check", payload, qos=1)
        info.wait_for_publish(IO_TIMEOUT)
        deadline = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if self.messages.get(timeout=0.1) == payload:
                    return
            except queue.Empty:
                continue
        pytest.fail("the bystander subscriber stopped receiving")

    def close(self) -> None:
        for client in (self.client, self.publisher):
            client.disconnect()
            client.loop_stop()


@pytest.fixture(scope="module")
def bystander(qmig_broker: QmigProcess) -> Iterator[Bystander]:
    b = Bystander(qmig_broker.port)
    try:
        yield b
    finally:
        b.close()


class OfflineSession:
    """A persistent session, offline, holding QoS 1 messages queued for it."""

    PAYLOADS = (b"queued-1", b"queued-2", b"queued-3")

    def __init__(self, port: int, name: str) -> None:
        self.port = port
        self.client_id = f"keeper-{name}"
        self.topic = f"keep/{name}"
        with RawClient(port) as c:
            assert not c.connect(self.client_id, session_expiry=300).session_present
            assert c.subscribe(self.topic).reason_codes == [1]
            c.send(Disconnect())
            assert c.until_closed() == []
        with RawClient(port) as pub:
            pub.connect(f"keeper-pub-{name}")
            for payload in self.PAYLOADS:
                assert pub.publish_qos1(self.topic, payload) == R.SUCCESS
            pub.send(Disconnect())

    def check(self) -> None:
        """Reconnect: every queued message arrives, in order."""
        with RawClient(self.port) as c:
            connack = c.connect(self.client_id, clean_start=False, session_expiry=300)
            assert connack.session_present
            got = []
            for _ in self.PAYLOADS:
                msg = c.expect(Publish)
                assert msg.topic == self.topic and msg.qos == 1
                c.send(Puback(msg.packet_id))  # type: ignore[arg-type]
                got.append(msg.payload)
            assert tuple(got) == self.PAYLOADS
            c.send(Disconnect(0, {P.SESSION_EXPIRY_INTERVAL: 0}))


@dataclass
class Witnesses:
    broker: QmigProcess
    bystander: Bystander
    offline: OfflineSession
    mark: int

    def verify(self, needle: str) -> None:
        """Exactly one INFO+ log line mentions ``needle``; bystanders are unharmed."""
        deadline = time.monotonic() + IO_TIMEOUT
        while not self.broker.loud_lines(self.mark, needle) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.bystander.check()
        self.offline.check()
        lines = self.broker.loud_lines(self.mark, needle)
        assert len(lines) == 1, f"expected one log line about {needle!r}, got {lines!r}"
        assert self.broker.proc.poll() is None


@pytest.fixture
def witnesses(
    qmig_broker: QmigProcess, bystander: Bystander, request: pytest.FixtureRequest
) -> Witnesses:
    name = re.sub(r"\W+", "-", request.node.name).strip("-")
    offline = OfflineSession(qmig_broker.port, name)
    bystander.check()
    return Witnesses(qmig_broker, bystander, offline, qmig_broker.log_mark())


def _connect_frame(name: bytes, level: int, flags: int = 0x02, props: bytes = b"") -> bytes:
    """A CONNECT with client id "x" and the given protocol name, level and flags."""
    body = len(name).to_bytes(2, "big") + name + bytes((level, flags)) + b"\x00\x3c"
    body += props + b"\x00\x01x"
    return bytes((0x10, len(body))) + body


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x00",  # reserved packet type 0
        b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n",  # a confused HTTP client
        b"\x10\xff\xff\xff\xff\x7f",  # remaining length longer than 4 bytes
        bytes(range(256)),
    ],
    ids=["type-0", "http", "bad-length", "bytes"],
)
def test_garbage_bytes_close_connection_mqtt_4_13_1(witnesses: Witnesses, garbage: bytes) -> None:
    """Not MQTT at all: the broker closes that one connection (MQTT-4.13.1-1) and logs it."""
    with RawClient(witnesses.broker.port) as c:
        c.send_raw(garbage)
        assert c.until_closed() == []
        witnesses.verify(c.local)


def test_bad_protocol_name_mqtt_3_1_2_1(witnesses: Witnesses) -> None:
    """MQTT-3.1.2-1: the server may answer CONNACK 0x84 and must close; it does both."""
    with RawClient(witnesses.broker.port) as c:
        c.send_raw(_connect_frame(b"MQTX", 5, props=b"\x00"))
        packets = c.until_closed()
        assert [(type(p), p.reason_code) for p in packets] == [  # type: ignore[union-attr]
            (Connack, R.UNSUPPORTED_PROTOCOL_VERSION)
        ]
        witnesses.verify(c.local)


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_connect_reserved_flag_is_malformed_mqtt_3_1_2_3(
    witnesses: Witnesses, version: int
) -> None:
    with RawClient(witnesses.broker.port, version) as c:
        props = b"\x00" if version == MQTT_5 else b""
        c.send_raw(_connect_frame(b"MQTT", version, flags=0x03, props=props))
        packets = c.until_closed()
        # Closing is required; a CONNACK 0x81 first is allowed (MQTT 5 section 4.13).
        assert all(isinstance(p, Connack) and p.reason_code == R.MALFORMED_PACKET for p in packets)
        witnesses.verify(c.local)


def test_unsupported_protocol_level_v5_connack_0x84_mqtt_3_1_2_2(witnesses: Witnesses) -> None:
    with RawClient(witnesses.broker.port) as c:
        c.send_raw(_connect_frame(b"MQTT", 6, props=b"\x00"))
        packets = c.until_closed()
        assert [(type(p), p.reason_code) for p in packets] == [  # type: ignore[union-attr]
            (Connack, R.UNSUPPORTED_PROTOCOL_VERSION)
        ]
        witnesses.verify(c.local)


def test_unsupported_protocol_level_v311_return_code_1_mqtt_3_1_2_2(witnesses: Witnesses) -> None:
    """3.1.1 MQTT-3.1.2-2: CONNACK return code 0x01, then disconnect."""
    with RawClient(witnesses.broker.port, MQTT_3_1_1) as c:
        c.send_raw(_connect_frame(b"MQTT", 2))
        c.sock.settimeout(IO_TIMEOUT)
        data = b""
        while chunk := c.sock.recv(100):
            data += chunk
        assert data == b"\x20\x02\x00\x01"  # the exact 3.1.1 wire form, then EOF
        witnesses.verify(c.local)


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_packet_over_max_packet_size_mqtt_3_2_2_15(witnesses: Witnesses, version: int) -> None:
    """Bigger than the broker's Maximum Packet Size: DISCONNECT 0x95 for MQTT 5."""
    with RawClient(witnesses.broker.port, version) as c:
        client_id = f"big-{version}"
        connack = c.connect(client_id)
        if version == MQTT_5:
            assert connack.properties[P.MAXIMUM_PACKET_SIZE] == MAX_PACKET_SIZE
        c.send(Publish("big", b"x" * (MAX_PACKET_SIZE + 1000), 0))
        packets = c.until_closed()
        if version == MQTT_5:
            assert [(type(p), p.reason_code) for p in packets] == [  # type: ignore[union-attr]
                (Disconnect, R.PACKET_TOO_LARGE)
            ]
        else:
            assert packets == []
        witnesses.verify(client_id)


def test_publish_before_connect_mqtt_3_1_0_1(witnesses: Witnesses) -> None:
    with RawClient(witnesses.broker.port) as c:
        c.send(Publish("early", b"x", 0))
        assert c.until_closed() == []
        witnesses.verify(c.local)


def _subscribe_qos3(version: int) -> bytes:
    data = bytearray(encode(Subscribe(1, [Subscription("a", 2)]), version))
    data[-1] = 3  # requested QoS 3 (MQTT-3.8.3-4 in 3.1.1; Malformed Packet in 5.0)
    return bytes(data)


def _second_connect(version: int) -> bytes:
    return encode(Connect("again", version), version)


def _publish_wildcard(version: int) -> bytes:
    return encode(Publish("a/#", b"x", 0), version)


def _publish_qos3(version: int) -> bytes:
    body = b"\x00\x01a\x00\x01" + (b"\x00" if version == MQTT_5 else b"")
    return bytes((0x36, len(body))) + body  # QoS bits 11 (MQTT-3.3.1-4)


# name: (bytes sent once connected, the MQTT 5 reason code of the DISCONNECT)
VIOLATIONS: dict[str, tuple[Callable[[int], bytes], int]] = {
    "second-connect": (_second_connect, R.PROTOCOL_ERROR),
    "subscribe-qos3": (_subscribe_qos3, R.MALFORMED_PACKET),
    "publish-wildcard": (_publish_wildcard, R.TOPIC_NAME_INVALID),
    "publish-qos3": (_publish_qos3, R.MALFORMED_PACKET),
}


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
@pytest.mark.parametrize("violation", sorted(VIOLATIONS))
def test_protocol_violation_when_connected_mqtt_4_13_1(
    witnesses: Witnesses, violation: str, version: int
) -> None:
    """Second CONNECT (MQTT-3.1.0-2), SUBSCRIBE QoS 3, wildcard topic name (MQTT-3.3.2-2),
    PUBLISH QoS 3 (MQTT-3.3.1-4): MQTT 5 gets DISCONNECT with the reason, 3.1.1 a close."""
    build, reason = VIOLATIONS[violation]
    client_id = f"bad-{violation}-{version}"
    with RawClient(witnesses.broker.port, version) as c:
        assert c.connect(client_id).reason_code == R.SUCCESS
        c.send_raw(build(version))
        packets = c.until_closed()
        if version == MQTT_5:
            assert [(type(p), p.reason_code) for p in packets] == [  # type: ignore[union-attr]
                (Disconnect, reason)
            ]
        else:
            assert packets == []
        witnesses.verify(client_id)


def test_client_stalled_mid_packet_closed_after_keep_alive_mqtt_3_1_2_24(
    witnesses: Witnesses,
) -> None:
    """Half a PUBLISH and then silence: others are unaffected meanwhile, and the staller is
    disconnected (0x8D) once 1.5 x its keep alive passes without a complete packet."""
    with RawClient(witnesses.broker.port) as c:
        start = time.monotonic()
        c.connect("staller", keep_alive=1)
        whole = encode(Publish("stall", b"y" * 200, 1, packet_id=1), MQTT_5)
        c.send_raw(whole[: len(whole) // 2])
        witnesses.bystander.check()  # served while the staller holds half a packet
        with RawClient(witnesses.broker.port) as other:
            other.connect("stall-neighbour")
            assert other.ping() < 1.0
        packets = c.until_closed(timeout=6)
        elapsed = time.monotonic() - start
        assert [(type(p), p.reason_code) for p in packets] == [  # type: ignore[union-attr]
            (Disconnect, R.KEEP_ALIVE_TIMEOUT)
        ]
        assert 1.5 <= elapsed < 4.0
        witnesses.verify("staller")


def test_client_never_reads_while_publisher_floods(witnesses: Witnesses) -> None:
    """A subscriber that never reads must not make the broker buffer without bound or stop
    serving others: once its transport is paused its QoS 0 messages are dropped."""
    broker = witnesses.broker
    sloth = RawClient(broker.port, rcvbuf=4096)
    try:
        sloth.connect("sloth")
        sloth.subscribe("flood/#", qos=0)
        rss_before = broker.rss_kib()
        payload = b"z" * 4000
        frame = encode(Publish("flood/x", payload, 0), MQTT_5)
        total = 0
        with RawClient(broker.port) as flooder:
            flooder.connect("flooder")
            batch = frame * 256  # ~1 MB per sendall
            for _ in range(32):
                flooder.send_raw(batch)
                total += len(batch)
            # The broker is still responsive, to the flooder and to a newcomer.
            assert flooder.ping() < 2.0
            with RawClient(broker.port) as other:
                other.connect("flood-neighbour")
                assert other.ping() < 1.0
        growth_mib = (broker.rss_kib() - rss_before) / 1024
        assert growth_mib < total / 2**20 / 2, f"broker grew {growth_mib:.0f} MiB"
        witnesses.verify("sloth")
    finally:
        sloth.close()


def test_ten_thousand_subscriptions_quota_exceeded_0x97(witnesses: Witnesses) -> None:
    """Subscriptions beyond the per-client limit get SUBACK 0x97; the rest keep working."""
    with RawClient(witnesses.broker.port) as c:
        c.connect("hoarder")
        codes: list[int] = []
        per_packet = 1000
        for start in range(0, 10_000, per_packet):
            filters = [f"h/{i:05d}" for i in range(start, start + per_packet)]
            codes += c.subscribe(*filters, qos=1).reason_codes
        refused = 10_000 - MAX_SUBSCRIPTIONS
        assert codes == [1] * MAX_SUBSCRIPTIONS + [R.QUOTA_EXCEEDED] * refused
        # Granted subscriptions work; refused ones do not exist.
        with RawClient(witnesses.broker.port) as pub:
            pub.connect("hoard-pub")
            assert pub.publish_qos1("h/00042", b"granted") == R.SUCCESS
            assert pub.publish_qos1("h/09999", b"refused") == R.NO_MATCHING_SUBSCRIBERS
        msg = c.expect(Publish)
        assert msg.payload == b"granted"
        c.send(Puback(msg.packet_id))  # type: ignore[arg-type]
        assert c.ping() < 1.0
        witnesses.verify("hoarder")
