"""Misbehaving QUIC clients, driven with aioquic directly.

In each case only the offending connection is closed: a bystander QUIC subscriber and a TCP
subscriber keep receiving, the broker keeps running, and it logs one line about it.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived

from client.client import Client
from mqttproto.codec import PacketReader, encode
from mqttproto.packets import (
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Subscribe,
    Subscription,
    Will,
)

from .conftest import HOST, QBroker
from .helpers import make_client, quic_terminated, uid

ERROR_PROTOCOL = 0x1  # broker/quic.py: application error code for protocol violations
# TLS alert no_application_protocol (120) as a QUIC CRYPTO_ERROR (0x100 + alert).
NO_APPLICATION_PROTOCOL = 0x100 + 120


class RawQuic(QuicConnectionProtocol):
    """An aioquic client that does exactly what the test says, and records what it gets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.ended: set[int] = set()
        self.terminated: asyncio.Future[ConnectionTerminated] = self._loop.create_future()
        self.changed = asyncio.Event()
        self.stalled = False  # True: drop every datagram (no reading, no acknowledgement)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not self.stalled:
            super().datagram_received(data, addr)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self.received[event.stream_id] += event.data
            if event.end_stream:
                self.ended.add(event.stream_id)
        elif isinstance(event, ConnectionTerminated) and not self.terminated.done():
            self.terminated.set_result(event)
        self.changed.set()

    def send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        self._quic.send_stream_data(stream_id, data, end_stream)
        self.transmit()

    def new_stream(self, unidirectional: bool = False) -> int:
        return self._quic.get_next_available_stream_id(is_unidirectional=unidirectional)

    def reset(self, stream_id: int) -> None:
        self._quic.reset_stream(stream_id, 0x10)
        self.transmit()

    async def wait_bytes(self, stream_id: int, count: int, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            while len(self.received[stream_id]) < count:
                self.changed.clear()
                await self.changed.wait()
        return bytes(self.received[stream_id])

    async def closed_by_peer(self, timeout: float) -> ConnectionTerminated:
        return await asyncio.wait_for(asyncio.shield(self.terminated), timeout)

    async def mqtt_connect(self, client_id: str, will: Will | None = None,
                           keep_alive: int = 30) -> int:  # fmt: skip
        """CONNECT on a new bidirectional stream; waits for a successful CONNACK."""
        sid = self.new_stream()
        self.send(sid, encode(Connect(client_id, MQTT_5, True, keep_alive, will=will), MQTT_5))
        data = await self.wait_bytes(sid, 2)
        data = await self.wait_bytes(sid, 2 + data[1])
        assert data[0] == 0x20 and data[3] == 0, f"CONNACK refused: {data!r}"
        return sid


def quic_config(broker: QBroker, alpn: list[str] | None = None) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=True, alpn_protocols=["mqtt"] if alpn is None else alpn, idle_timeout=30.0
    )
    config.load_verify_locations(broker.ca)
    return config


@asynccontextmanager
async def raw_quic(broker: QBroker, alpn: list[str] | None = None) -> AsyncIterator[RawQuic]:
    async with connect(
        HOST, broker.port("quic"), configuration=quic_config(broker, alpn),
        create_protocol=RawQuic,
    ) as proto:  # fmt: skip
        assert isinstance(proto, RawQuic)
        yield proto


@dataclass
class Bystanders:
    """A QUIC and a TCP subscriber that must keep receiving whatever the test does."""

    broker: QBroker
    topic: str
    quic: Client
    tcp: Client
    publisher: Client
    sent: int = 0

    async def check(self) -> None:
        """Both still connected and receiving: a fresh QoS 1 message reaches each."""
        self.sent += 1
        payload = f"still here {self.sent}".encode()
        await self.publisher.publish(self.topic, payload, qos=1, timeout=5)
        for sub in (self.quic, self.tcp):
            assert sub.connected
            msg = await sub.next_message(5)
            assert (msg.topic, msg.payload) == (self.topic, payload)
        assert self.broker.alive()


@pytest.fixture
async def bystanders(qbroker: QBroker) -> AsyncIterator[Bystanders]:
    topic = uid("bystand/")
    async with (
        make_client(qbroker, "quic") as quic,
        make_client(qbroker, "tcp") as tcp,
        make_client(qbroker, "tcp") as publisher,
    ):
        await quic.subscribe(topic, qos=1)
        await tcp.subscribe(topic, qos=1)
        group = Bystanders(qbroker, topic, quic, tcp, publisher)
        await group.check()
        yield group
        await group.check()


def qmig_lines(log: str, pattern: str) -> list[str]:
    """Lines qmig itself logged (not aioquic's ``[connection id]`` lines) matching pattern."""
    regex = re.compile(pattern)
    return [
        line for line in log.splitlines()
        if regex.search(line) and not re.match(r"qmig broker: \w+ \[[0-9a-f]+\]", line)
    ]  # fmt: skip


async def one_log_line(broker: QBroker, pattern: str, since: int) -> str:
    await broker.await_log(pattern, since)
    await asyncio.sleep(0.1)  # anything logged twice would be there by now
    lines = qmig_lines(broker.log_since(since), pattern)
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------ streams
async def test_connect_on_a_data_stream(qbroker: QBroker, bystanders: Bystanders) -> None:
    """A second stream is a data stream (multi-stream mode); CONNECT does not belong there:
    DISCONNECT 0x82 on the control stream, the connection closes, the will goes out."""
    since = qbroker.log_size()
    will_topic = uid("will-2nd/")
    await bystanders.quic.subscribe(will_topic, qos=1)
    async with raw_quic(qbroker) as proto:
        client_id = uid("second-")
        first = await proto.mqtt_connect(client_id, Will(will_topic, b"bye"))
        second = proto.new_stream()
        assert second != first
        proto.send(second, encode(Connect(uid("again-")), MQTT_5))
        await proto.closed_by_peer(5)
        sent = PacketReader(MQTT_5).feed(bytes(proto.received[first]))
        assert [type(p) for p in sent] == [Connack, Disconnect]
        assert sent[1].reason_code == 0x82  # type: ignore[attr-defined]
    await one_log_line(qbroker, rf"closing {client_id} \(quic\): .*CONNECT", since)
    will = await bystanders.quic.next_message(5)
    assert (will.topic, will.payload) == (will_topic, b"bye")
    await bystanders.check()


async def test_unidirectional_stream_first(qbroker: QBroker, bystanders: Bystanders) -> None:
    since = qbroker.log_size()
    async with raw_quic(qbroker) as proto:
        sid = proto.new_stream(unidirectional=True)
        proto.send(sid, encode(Connect(uid("uni-")), MQTT_5))
        closed = await proto.closed_by_peer(5)
        assert closed.error_code == ERROR_PROTOCOL
        assert "bidirectional" in closed.reason_phrase
    await one_log_line(
        qbroker, rf"closing QUIC connection: MQTT must start on a client bidirectional "
        rf"stream, not {sid}\b", since,
    )  # fmt: skip
    assert "connected over quic" not in qmig_lines(qbroker.log_since(since), "uni-")
    await bystanders.check()


async def test_stream_reset_is_a_network_failure(qbroker: QBroker, bystanders: Bystanders) -> None:
    """The client resets its MQTT stream: the broker drops the connection, the will goes out."""
    will_topic = uid("will-reset/")
    await bystanders.tcp.subscribe(will_topic, qos=1)
    async with raw_quic(qbroker) as proto:
        client_id = uid("reset-")
        sid = await proto.mqtt_connect(client_id, Will(will_topic, b"reset"))
        proto.reset(sid)
        will = await bystanders.tcp.next_message(5)
        assert (will.topic, will.payload) == (will_topic, b"reset")
        # The QUIC connection has nothing left to carry: the broker closes it too.
        closed = await proto.closed_by_peer(5)
        assert closed.error_code == 0
    await bystanders.check()


# ------------------------------------------------------------------------------ bytes
@pytest.mark.parametrize(
    ("when", "payload", "pattern"),
    [
        ("first", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", r"the first packet must be CONNECT"),
        ("first", b"\x82" + random.Random(7).randbytes(300), r"closing .*\(quic\)"),
        ("after-connect", b"\xff\xff\xff\xff\xff\x00", r"closing .*\(quic\): .*\[reason 0x"),
    ],
    ids=["http", "random", "after-connect"],
)
async def test_garbage_on_the_stream(
    qbroker: QBroker, bystanders: Bystanders, when: str, payload: bytes, pattern: str
) -> None:
    """Bytes that are not MQTT: the broker closes the stream and then the connection."""
    since = qbroker.log_size()
    client_id = uid("garbage-")
    async with raw_quic(qbroker) as proto:
        if when == "first":
            sid = proto.new_stream()
            proto.send(sid, payload)
        else:
            sid = await proto.mqtt_connect(client_id)
            proto.send(sid, payload)
        closed = await proto.closed_by_peer(8)
        assert sid in proto.ended  # the stream was finished before the connection closed
        assert closed.error_code == 0
        if when == "after-connect":
            # MQTT 5: after the CONNACK, a DISCONNECT with a reason code >= 0x80, then the end.
            data = bytes(proto.received[sid])
            disconnect = data[2 + data[1] :]
            assert disconnect[0] == 0xE0 and disconnect[2] >= 0x80, data
    line = await one_log_line(qbroker, pattern, since)
    assert "(quic)" in line
    await bystanders.check()


async def test_not_quic_at_all(qbroker: QBroker, bystanders: Bystanders) -> None:
    """Random UDP datagrams at the QUIC port are ignored."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for size in (1, 20, 1200, 1500):
            for _ in range(5):
                sock.sendto(os.urandom(size), (HOST, qbroker.port("quic")))
    await asyncio.sleep(0.1)
    await bystanders.check()


# ------------------------------------------------------------------------------ handshake
@pytest.mark.parametrize("alpn", [["h3"], ["mqtt-bad", "x"], []], ids=["h3", "two", "none"])
async def test_wrong_alpn_refused(
    qbroker: QBroker, bystanders: Bystanders, alpn: list[str]
) -> None:
    since = qbroker.log_size()
    with pytest.raises(ConnectionError):
        async with asyncio.timeout(5), raw_quic(qbroker, alpn=alpn):
            pytest.fail("the handshake succeeded with a wrong ALPN")
    refusal = rf"\] Connection close sent \(code 0x{NO_APPLICATION_PROTOCOL:X}"
    await qbroker.await_log(refusal, since)
    assert "connected over quic" not in qbroker.log_since(since)
    await bystanders.check()


async def test_qmig_client_offers_only_mqtt(qbroker: QBroker) -> None:
    """qmig's own client offers only "mqtt" (so it cannot talk to, say, an HTTP/3 server)."""
    from client.transports import quic_configuration

    assert quic_configuration(qbroker.ca).alpn_protocols == ["mqtt"]


# ------------------------------------------------------------------------------ flow control
async def test_client_that_never_reads(qbroker: QBroker, bystanders: Bystanders) -> None:
    """A subscriber stops reading (so never acknowledges) while QoS 0 floods its topic: the
    broker pauses it and drops its QoS 0 (saying so once), the others keep receiving, and
    its keep alive (3 s) closes it."""
    since = qbroker.log_size()
    flood_topic = uid("flood/")
    client_id = uid("stalled-")
    payload = b"x" * 1000
    async with raw_quic(qbroker) as stalled:
        sid = await stalled.mqtt_connect(client_id, keep_alive=3)
        stalled.send(sid, encode(Subscribe(1, [Subscription(flood_topic, 0)]), MQTT_5))
        await stalled.wait_bytes(sid, len(stalled.received[sid]) + 5)  # SUBACK
        stalled.stalled = True
        n = 0
        while not qmig_lines(qbroker.log_since(since), rf"client {client_id} \(quic\) is not"):
            # 2 MB beyond the broker's 1 MiB high-water mark, then check the bystanders.
            for _ in range(2000):
                await bystanders.publisher.publish(flood_topic, payload + str(n).encode())
                n += 1
            await bystanders.check()
            assert n < 20_000, "the broker never paused the stalled client"
        # Said once at INFO (then at DEBUG for each message dropped).
        await one_log_line(
            qbroker, rf"INFO client {client_id} \(quic\) is not reading: dropping QoS 0", since
        )
        await one_log_line(qbroker, rf"keep alive timeout for {client_id}", since)
        await bystanders.check()
        # The broker finishes the stream, waits (CLOSE_LINGER) for an acknowledgement that
        # never comes, then closes the connection.
        await quic_terminated(qbroker, client_id, since, timeout=8)
    await bystanders.check()


# ------------------------------------------------------------------------------ timeouts
@dataclass
class Silent:
    """Connections that never send CONNECT, opened when this module starts so that the
    broker's 10 s timeout runs while the other tests do."""

    since: int
    started: float = 0.0
    closed_after: dict[str, float] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    ended_stream: bool = False
    error: BaseException | None = None

    async def run(self, broker: QBroker) -> None:
        loop = asyncio.get_running_loop()
        self.started = loop.time()

        async def watch(name: str, proto: RawQuic) -> None:
            closed = await proto.closed_by_peer(SILENT_WAIT)
            self.closed_after[name] = loop.time() - self.started
            self.codes[name] = closed.error_code

        async with raw_quic(broker) as no_stream, raw_quic(broker) as half:
            sid = half.new_stream()
            half.send(sid, b"\x10")  # CONNECT's first byte, then nothing
            await asyncio.gather(watch("no stream", no_stream), watch("half CONNECT", half))
            self.ended_stream = sid in half.ended


SILENT_WAIT = 14.0


@pytest.fixture(scope="module", autouse=True)
def silent_connections(qbroker: QBroker) -> Iterator[tuple[Silent, threading.Thread]]:
    silent = Silent(qbroker.log_size())

    def main() -> None:
        try:
            asyncio.run(silent.run(qbroker))
        except BaseException as exc:  # reported by the test
            silent.error = exc

    thread = threading.Thread(target=main, name="silent-quic", daemon=True)
    thread.start()
    yield silent, thread
    thread.join(SILENT_WAIT + 5)


async def test_no_connect_closed_by_timeout(
    qbroker: QBroker, bystanders: Bystanders, silent_connections: tuple[Silent, threading.Thread]
) -> None:
    """Connections that never send CONNECT are closed by the broker's CONNECT timeout (10 s):
    one that completes the handshake but opens no stream, one that sends half a CONNECT.
    (Kept last in this module: they were opened when its first test started.)"""
    silent, thread = silent_connections
    await asyncio.to_thread(thread.join, SILENT_WAIT + 5)
    assert not thread.is_alive()
    assert silent.error is None, repr(silent.error)
    assert set(silent.closed_after) == {"no stream", "half CONNECT"}
    for name, after in silent.closed_after.items():
        assert 9.5 <= after <= 13.5, (name, after)
    assert silent.codes["no stream"] == ERROR_PROTOCOL
    assert silent.codes["half CONNECT"] == 0
    assert silent.ended_stream  # the half CONNECT's stream was finished before the close
    await one_log_line(qbroker, r"closing [\d.:]+: no CONNECT within 10 s", silent.since)
    await one_log_line(qbroker, r"closing QUIC connection: no MQTT stream within 10 s",
                       silent.since)  # fmt: skip
    await bystanders.check()
