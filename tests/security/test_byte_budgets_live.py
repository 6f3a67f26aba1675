"""Finding 7 of issue #13 against the real server (TCP and QUIC on loopback sockets).

The broker runs in the test's event loop with small budgets: a packet left incomplete for
``incomplete_packet_timeout`` (1 s) closes its connection even with keep alive 0, and a
client that never reads is closed once ``max_output_bytes`` (4 KiB) of output waits for it
behind its full transport, while a bystander is served throughout and the closed client's
session keeps its unacknowledged QoS 1 message.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived

from broker.certs import make_lab_certs
from broker.config import BrokerConfig
from broker.server import BrokerServer
from mqttproto.codec import PacketReader, encode
from mqttproto.packets import (
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

HOST = "127.0.0.1"
P = PropertyId
R = ReasonCode
T = TypeVar("T")
TIMEOUT = 1.0  # incomplete_packet_timeout
OUTPUT_CAP = 4096  # max_output_bytes
BIG = encode(Publish("big", b"b" * 200_000, 0), MQTT_5)  # sent only in part


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[BrokerServer]:
    caplog.set_level(logging.INFO, "qmig.broker")
    certs = make_lab_certs(tmp_path / "certs")
    config = BrokerConfig(
        host=HOST, tcp_port=_free_port(), tls_port=0, mptcp_port=0,
        quic_port=_free_port(socket.SOCK_DGRAM), cert=str(certs.server_cert),
        key=str(certs.server_key), sys_interval=0, incomplete_packet_timeout=TIMEOUT,
        max_output_bytes=OUTPUT_CAP,
    ).validate()  # fmt: skip
    srv = BrokerServer(config)
    await srv.start()
    srv.ca = str(certs.ca_cert)  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        await srv.stop()


class Tcp:
    """A raw MQTT 5 client on an asyncio stream (``rcvbuf``: a small receive window)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = PacketReader(MQTT_5)
        self.inbox: list[Packet] = []

    @classmethod
    async def open(cls, port: int, client_id: str, rcvbuf: int = 0, **connect: Any) -> Tcp:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
        client = cls(*await asyncio.open_connection(sock=sock, limit=1024))
        client.send(Connect(client_id, MQTT_5, **connect))
        assert (await client.expect(Connack)).reason_code == R.SUCCESS
        return client

    def send(self, *packets: Packet) -> None:
        self.writer.write(b"".join(encode(p, MQTT_5) for p in packets))

    async def expect(self, kind: type[T], timeout: float = 3.0) -> T:
        async with asyncio.timeout(timeout):
            while not self.inbox:
                data = await self.reader.read(65536)
                assert data, f"closed while expecting {kind.__name__}"
                self.inbox += self.decoder.feed(data)
        packet = self.inbox.pop(0)
        assert isinstance(packet, kind), packet
        return packet

    async def until_eof(self, timeout: float) -> list[Packet]:
        """Everything received until the broker closes the connection."""
        async with asyncio.timeout(timeout):
            while data := await self.reader.read(65536):
                self.inbox += self.decoder.feed(data)
        out, self.inbox = self.inbox, []
        return out

    async def ping(self) -> None:
        self.send(Pingreq())
        await self.expect(Pingresp)

    def close(self) -> None:
        self.writer.transport.abort()


class Quic(QuicConnectionProtocol):
    """An aioquic client; ``stalled`` drops every datagram (it neither reads nor acks)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.terminated = asyncio.Event()
        self.changed = asyncio.Event()
        self.stalled = False

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not self.stalled:
            super().datagram_received(data, addr)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self.received[event.stream_id] += event.data
        elif isinstance(event, ConnectionTerminated):
            self.terminated.set()
        self.changed.set()

    def send(self, sid: int, data: bytes) -> None:
        self._quic.send_stream_data(sid, data)
        self.transmit()

    async def wait_bytes(self, sid: int, count: int, timeout: float = 3.0) -> bytes:
        async with asyncio.timeout(timeout):
            while len(self.received[sid]) < count:
                self.changed.clear()
                await self.changed.wait()
        return bytes(self.received[sid])

    async def mqtt_connect(self, client_id: str) -> int:
        sid = self._quic.get_next_available_stream_id()
        self.send(sid, encode(Connect(client_id, MQTT_5, keep_alive=0), MQTT_5))
        data = await self.wait_bytes(sid, 2)
        data = await self.wait_bytes(sid, 2 + data[1])
        assert data[0] == 0x20 and data[3] == 0, data
        return sid


def quic(server: BrokerServer) -> Any:
    config = QuicConfiguration(is_client=True, alpn_protocols=["mqtt"], idle_timeout=30.0)
    config.load_verify_locations(server.ca)  # type: ignore[attr-defined]
    return quic_connect(HOST, server.config.quic_port, configuration=config, create_protocol=Quic)


def log_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# --------------------------------------------------------------------------- incomplete packets


@pytest.mark.timeout(20)
async def test_tcp_incomplete_packet_closed_after_the_timeout(
    server: BrokerServer, caplog: pytest.LogCaptureFixture
) -> None:
    port = server.config.tcp_port
    bystander = await Tcp.open(port, "bystander")
    staller = await Tcp.open(port, "staller", keep_alive=0)
    staller.writer.write(BIG[:100_000])
    await bystander.ping()
    loop = asyncio.get_running_loop()
    started = loop.time()
    packets = await staller.until_eof(timeout=TIMEOUT + 3)
    elapsed = loop.time() - started
    assert [(type(p), p.reason_code) for p in packets] == [  # type: ignore[attr-defined]
        (Disconnect, R.KEEP_ALIVE_TIMEOUT)
    ]
    assert TIMEOUT <= elapsed + 0.1 < TIMEOUT + 2
    assert server.broker.incomplete_bytes == 0
    assert len(log_lines(caplog, "a packet incomplete for over")) == 1
    await bystander.ping()
    bystander.close()


@pytest.mark.timeout(20)
async def test_quic_incomplete_packet_closed_after_the_timeout(server: BrokerServer) -> None:
    async with quic(server) as client:
        assert isinstance(client, Quic)
        sid = await client.mqtt_connect("quic-staller")
        client.send(sid, BIG[:100_000])
        data = await client.wait_bytes(sid, 3 + 4, timeout=TIMEOUT + 3)  # CONNACK is 3+n
        connack_len = 2 + data[1]
        disconnect = await client.wait_bytes(sid, connack_len + 3, timeout=TIMEOUT + 3)
        assert disconnect[connack_len] == 0xE0  # DISCONNECT
        assert disconnect[connack_len + 2] == R.KEEP_ALIVE_TIMEOUT
        await asyncio.wait_for(client.terminated.wait(), 6)
    assert server.broker.incomplete_bytes == 0


# --------------------------------------------------------------------------- unread output


@pytest.mark.timeout(30)
async def test_tcp_client_that_never_reads_is_closed_bystander_served_session_kept(
    server: BrokerServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The sloth subscribes (QoS 0 flood, QoS 1 keeper), gets one QoS 1 message it never
    acknowledges, then floods QoS 0 and PINGREQs without reading: its transport fills, its
    PINGRESPs wait in the engine, and past 4 KiB it is aborted.  A bystander is answered
    all along; the session resumes with the unacknowledged message."""
    port = server.config.tcp_port
    bystander = await Tcp.open(port, "bystander")
    sloth = await Tcp.open(
        port, "sloth", rcvbuf=4096, clean_start=False,
        properties={P.SESSION_EXPIRY_INTERVAL: 600},
    )  # fmt: skip
    sloth.send(Subscribe(1, [Subscription("flood/#", 0), Subscription("keep/#", 1)]))
    await sloth.expect(Suback)
    publisher = await Tcp.open(port, "publisher")
    publisher.send(Publish("keep/x", b"keep me", 1, packet_id=1))
    assert (await publisher.expect(Puback)).reason_code == R.SUCCESS
    flood = encode(Publish("flood/x", b"f" * 8000, 0), MQTT_5) * 16
    pings = encode(Pingreq(), MQTT_5) * 512
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while server.broker.stats.limit_closed == 0:
        assert loop.time() < deadline, "the sloth was never closed"
        try:
            sloth.writer.write(flood + pings)
            await sloth.writer.drain()
        except ConnectionError:
            break
        await bystander.ping()
    await bystander.ping()
    assert len(log_lines(caplog, "it does not read")) == 1
    assert server.broker.stats.limit_closed == 1
    sloth.close()
    back = await Tcp.open(
        port, "sloth", clean_start=False, properties={P.SESSION_EXPIRY_INTERVAL: 600}
    )
    resent = await back.expect(Publish)
    assert (resent.topic, resent.payload, resent.dup) == ("keep/x", b"keep me", True)
    for client in (back, publisher, bystander):
        client.close()


@pytest.mark.timeout(30)
async def test_quic_client_that_never_reads_is_closed(
    server: BrokerServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Over QUIC the same: a stalled client's stream is paused past its high water by a
    QoS 0 flood, then its PINGRESPs pass the cap and the connection is dropped."""
    port = server.config.tcp_port
    bystander = await Tcp.open(port, "bystander")
    publisher = await Tcp.open(port, "publisher")
    async with quic(server) as client:
        assert isinstance(client, Quic)
        sid = await client.mqtt_connect("quic-sloth")
        before = len(client.received[sid])
        client.send(sid, encode(Subscribe(1, [Subscription("qflood/#", 0)]), MQTT_5))
        await client.wait_bytes(sid, before + 5)  # SUBACK
        client.stalled = True
        flood = encode(Publish("qflood/x", b"f" * 8000, 0), MQTT_5) * 16
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not log_lines(caplog, "client quic-sloth (quic) is not reading"):
            assert loop.time() < deadline, "the broker never paused the stalled client"
            publisher.writer.write(flood)
            await bystander.ping()
        client.send(sid, encode(Pingreq(), MQTT_5) * (OUTPUT_CAP // 2 + 1))
        while server.broker.stats.limit_closed == 0:
            assert loop.time() < deadline, "the stalled client was never closed"
            await bystander.ping()
        assert len(log_lines(caplog, "quic-sloth (quic): it does not read")) == 1
        assert not any(c.client_id == "quic-sloth" for c in server.broker.connections)
    await bystander.ping()
    for tcp in (publisher, bystander):
        tcp.close()
