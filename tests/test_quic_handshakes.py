"""New QUIC connections cost bounded state: forged Initials, Retry, half-open limit, timeout.

The broker runs in-process so the tests can look at its QUIC connection table (aioquic's
``_protocols``: connection ID -> protocol) and at its live protocols.  Attackers are raw UDP
sockets: forged Initials (random bytes) and aioquic clients that send their ClientHello and
never finish the handshake.  Each test ends with a real qmig client connecting and getting a
message through, so the defences never lock out a well-behaved client.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, pull_quic_header

from broker.certs import make_lab_certs
from broker.config import BrokerConfig, ConfigError, add_broker_arguments, config_from_args
from broker.server import BrokerServer
from client.client import Client

HOST = "127.0.0.1"
CID_LENGTH = 8


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


CLIENTS: list[Client] = []  # the test's real clients, disconnected before the broker stops


@pytest.fixture
async def make_broker(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    certs = make_lab_certs(tmp_path / "certs")
    started: list[BrokerServer] = []

    async def start(**options: Any) -> BrokerServer:
        config = BrokerConfig(
            host=HOST, tcp_port=0, tls_port=0, mptcp_port=0, quic_port=_free_udp_port(),
            cert=str(certs.server_cert), key=str(certs.server_key), sys_interval=0, **options,
        ).validate()  # fmt: skip
        server = BrokerServer(config)
        await server.start()
        started.append(server)
        return server

    yield start
    while CLIENTS:
        await CLIENTS.pop().disconnect()
    for server in started:
        await server.stop()


def quic_server(server: BrokerServer) -> Any:
    return server.listeners["quic"].server


def table(server: BrokerServer) -> set[Any]:
    """The distinct protocols in the QUIC listener's connection table."""
    return set(quic_server(server)._protocols.values())


def forged_initial() -> bytes:
    head = (
        bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([CID_LENGTH]) + os.urandom(CID_LENGTH)
        + bytes([CID_LENGTH]) + os.urandom(CID_LENGTH) + b"\x00"
    )  # fmt: skip
    rest = 1200 - len(head) - 2
    return head + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)


class Abandoned:
    """An aioquic client that sends its ClientHello and never finishes the handshake."""

    def __init__(self, port: int, follow_retry: bool = False) -> None:
        self.addr = (HOST, port)
        self.follow_retry = follow_retry
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        config = QuicConfiguration(
            is_client=True, alpn_protocols=["mqtt"], verify_mode=ssl.CERT_NONE
        )
        self.quic = QuicConnection(configuration=config)
        self.quic.connect(self.addr, now=time.monotonic())
        self.replies: list[QuicPacketType] = []
        self._send()

    def _send(self) -> None:
        for datagram, _ in self.quic.datagrams_to_send(now=time.monotonic()):
            self.sock.sendto(datagram, self.addr)

    def poll(self) -> list[QuicPacketType]:
        """Packet types of the broker's datagrams so far; a Retry is followed if asked."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.replies
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
            self.replies.append(header.packet_type)
            if header.packet_type != QuicPacketType.RETRY:
                self.quic.receive_datagram(data, self.addr, now=time.monotonic())
            elif self.follow_retry:
                self.quic.receive_datagram(data, self.addr, now=time.monotonic())
                self._send()  # the Initial again, with the token; then silence

    def ended_by(self) -> ConnectionTerminated:
        """How the connection ended for this client: the broker's close, or else idle."""
        self.poll()
        self.quic.handle_timer(now=time.monotonic() + 3600)  # past draining (or idle)
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, ConnectionTerminated):
                return event
        raise AssertionError("no ConnectionTerminated")

    def close(self) -> None:
        self.sock.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def echo(client: Client) -> str:
    return f"guard/{client.client_id}"


async def assert_served(server: BrokerServer, ca: Path) -> Client:
    """A real qmig QUIC client connects, and its message comes back through the broker."""
    client = Client(HOST, server.config.quic_port, transport="quic", cafile=str(ca),
                    client_id=f"real-{os.urandom(3).hex()}", reconnect=False)  # fmt: skip
    CLIENTS.append(client)
    await client.connect()
    await client.subscribe(echo(client), qos=1)
    await client.publish(echo(client), b"served", qos=1)
    message = await client.next_message(timeout=5)
    assert message.payload == b"served"
    return client


@pytest.mark.timeout(30)
async def test_forged_initials_leave_no_connection_state(
    make_broker: Callable[..., Any], tmp_path: Path
) -> None:
    server = await make_broker()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(300):
            sock.sendto(forged_initial(), (HOST, server.config.quic_port))
            if i % 20 == 19:
                await asyncio.sleep(0.01)  # let the broker read them all
        await asyncio.sleep(0.3)
        assert table(server) == set()
        assert server.quic_protocols == set()
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(65536)  # not a single datagram answered (nothing to reflect)
    assert quic_server(server).counts["undecryptable"] == 300
    await assert_served(server, tmp_path / "certs" / "ca.crt")


@pytest.mark.timeout(30)
async def test_retry_always_real_client_connects_and_publishes(
    make_broker: Callable[..., Any], tmp_path: Path
) -> None:
    server = await make_broker(quic_retry="always")
    probe = Abandoned(server.config.quic_port)
    await wait_for(lambda: bool(probe.poll()))
    assert probe.replies == [QuicPacketType.RETRY]  # no state for a first Initial
    assert table(server) == set()
    probe.close()
    await assert_served(server, tmp_path / "certs" / "ca.crt")
    assert quic_server(server).counts["retry"] == 2


@pytest.mark.timeout(30)
async def test_auto_retry_starts_under_load(
    make_broker: Callable[..., Any], tmp_path: Path
) -> None:
    # A limit of 8 handshakes: auto sends Retry once 2 are in progress.
    server = await make_broker(quic_max_handshakes=8)
    first = [Abandoned(server.config.quic_port) for _ in range(2)]
    await wait_for(lambda: all(a.poll() for a in first))
    assert all(QuicPacketType.RETRY not in a.replies for a in first)
    assert len(table(server)) == 2
    late = Abandoned(server.config.quic_port, follow_retry=True)
    await wait_for(lambda: QuicPacketType.INITIAL in late.poll())
    assert late.replies[0] == QuicPacketType.RETRY  # validated first, then served
    assert len(table(server)) == 3
    await assert_served(server, tmp_path / "certs" / "ca.crt")  # through a Retry
    for a in [*first, late]:
        a.close()


@pytest.mark.timeout(30)
async def test_abandoned_handshake_times_out(
    make_broker: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qmig.broker")
    server = await make_broker(quic_handshake_timeout=0.5)
    client = await assert_served(server, tmp_path / "certs" / "ca.crt")
    silent = Abandoned(server.config.quic_port)
    await wait_for(lambda: bool(silent.poll()))
    assert len(table(server)) == 2 and len(server.quic_protocols) == 2
    await wait_for(lambda: len(table(server)) == 1, timeout=3.0)  # the idle timeout is 180 s
    assert len(server.quic_protocols) == 1
    assert "timed out 1" in caplog.text
    ended = silent.ended_by()
    assert ended.error_code == QuicErrorCode.CONNECTION_REFUSED
    assert ended.reason_phrase == "handshake not completed within 0.5 s"
    # The established connection is not a handshake: it outlives the timeout.
    await asyncio.sleep(0.6)
    await client.publish(echo(client), b"still", qos=1)
    assert (await client.next_message(timeout=5)).payload == b"still"
    silent.close()


@pytest.mark.timeout(30)
async def test_half_open_limit_drops_the_oldest(
    make_broker: Callable[..., Any], tmp_path: Path
) -> None:
    server = await make_broker(quic_retry="never", quic_max_handshakes=3)
    attempts = []
    for _ in range(5):
        attempts.append(Abandoned(server.config.quic_port))
        await wait_for(lambda: bool(attempts[-1].poll()))
    await asyncio.sleep(0.1)  # the evicted ones end on the next loop turn
    assert len(table(server)) == 3
    assert quic_server(server).counts["evicted"] == 2
    for a in attempts[:2]:  # the two oldest were told
        ended = a.ended_by()
        assert ended.error_code == QuicErrorCode.CONNECTION_REFUSED
        assert ended.reason_phrase == "over 3 handshakes in progress"
    assert attempts[2].ended_by().reason_phrase == "Idle timeout"  # this one was not
    # A real client still gets in: it takes the place of the oldest abandoned handshake.
    await assert_served(server, tmp_path / "certs" / "ca.crt")
    assert len(quic_server(server).half_open) == 2
    for a in attempts:
        a.close()


class CountingDict(dict[bytes, Any]):
    """The connection table, counting walks over it."""

    walks = 0

    def items(self) -> Any:
        CountingDict.walks += 1
        return super().items()

    def values(self) -> Any:
        CountingDict.walks += 1
        return super().values()

    def __iter__(self) -> Any:
        CountingDict.walks += 1
        return super().__iter__()


@pytest.mark.timeout(30)
async def test_closing_a_connection_removes_its_own_ids_only(
    make_broker: Callable[..., Any], tmp_path: Path
) -> None:
    server = await make_broker()
    ca = tmp_path / "certs" / "ca.crt"
    stays = await assert_served(server, ca)
    leaves = await assert_served(server, ca)
    qs = quic_server(server)
    qs._protocols = CountingDict(qs._protocols)

    def snapshot() -> dict[bytes, Any]:
        return dict(dict.items(qs._protocols))  # without counting a walk

    before = snapshot()
    assert len(set(before.values())) == 2
    CLIENTS.remove(leaves)
    await leaves.disconnect()
    await wait_for(lambda: len(set(snapshot().values())) == 1, timeout=10.0)
    gone = set(before.values()) - set(snapshot().values())
    assert len(gone) == 1
    # The survivor keeps every ID it had, and works.
    assert {c: p for c, p in before.items() if p not in gone} == snapshot()
    assert CountingDict.walks == 0  # removed by its own IDs, not by walking the table
    await stays.publish(echo(stays), b"again", qos=1)
    assert (await stays.next_message(timeout=5)).payload == b"again"


def test_options_from_flags_and_yaml(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    cfg = config_from_args(parser.parse_args([]))
    assert (cfg.quic_retry, cfg.quic_max_handshakes, cfg.quic_handshake_timeout) == (
        "auto", 256, 10.0,
    )  # fmt: skip
    path = tmp_path / "broker.yaml"
    path.write_text("quic-retry: always\nquic_max_handshakes: 50\nquic-handshake-timeout: 3\n")
    cfg = config_from_args(parser.parse_args(["--config", str(path)]))
    assert (cfg.quic_retry, cfg.quic_max_handshakes, cfg.quic_handshake_timeout) == (
        "always", 50, 3.0,
    )  # fmt: skip
    cfg = config_from_args(parser.parse_args(["--config", str(path), "--quic-retry", "never"]))
    assert cfg.quic_retry == "never"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quic-retry", "sometimes"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quic_retry": "sometimes"}, "quic_retry must be one of auto, always, never"),
        ({"quic_max_handshakes": 0}, "quic_max_handshakes must be >= 1"),
        ({"quic_handshake_timeout": 0.0}, "quic_handshake_timeout must be > 0"),
    ],
)
def test_bad_options_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BrokerConfig(**options).validate()
