"""The asyncio client's reconnect loop: one at a time, and back home after a failed move."""

from __future__ import annotations

import asyncio
import socket

import pytest

import client.client as client_module
from broker.config import BrokerConfig
from broker.server import BrokerServer
from client.client import Client

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def _tcp_broker() -> BrokerServer:
    config = BrokerConfig(host=HOST, tcp_port=_free_port(), tls_port=0, mptcp_port=0,
                          quic_port=0, sys_interval=0).validate()  # fmt: skip
    server = BrokerServer(config)
    await server.start()
    return server


def _tcp_connections(server: BrokerServer) -> int:
    return sum(1 for c in server.broker.connections if c.transport == "tcp" and c.io)


@pytest.mark.timeout(30)
async def test_sent_to_a_dead_server_the_client_falls_back_with_one_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rolled-back migration: the Server Reference never answers, the old broker does."""
    monkeypatch.setattr(client_module, "FALLBACK_AFTER", 0.6)
    server = await _tcp_broker()
    home = server.config.tcp_port
    nowhere = _free_port()  # nothing listens there
    client = Client(HOST, home, transport="tcp", client_id="fallback", clean_start=True,
                    session_expiry=60, reconnect_delay=(0.02, 0.1))  # fmt: skip
    try:
        await client.connect()
        await client.subscribe("t/fallback", qos=1)
        await server.migration.pre_checkpoint(f"{HOST}:{nowhere}")
        await asyncio.sleep(0.3)
        assert not client.connected and client.port == nowhere
        await server.migration.rollback()  # the broker serves at home again
        await asyncio.wait_for(client.wait_connected(), 10)
        assert client.port == home
        await asyncio.sleep(0.3)  # any duplicate reconnect loop would connect again now
        assert client.reconnects == 1
        assert _tcp_connections(server) == 1
        assert client.session_present  # the session waited for it
        await client.publish("t/fallback", b"back", qos=1)
        message = await client.next_message(timeout=5)
        assert message.payload == b"back"
    finally:
        await client.disconnect()
        await server.stop()


@pytest.mark.timeout(30)
async def test_a_destination_that_served_then_died_sends_the_client_home(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A post-copy rollback: the client followed the Server Reference and was served there,
    then the destination died (its lazy phase failed) and the broker serves at home again.
    The client must come home, not knock at the dead destination for ever."""
    monkeypatch.setattr(client_module, "FALLBACK_AFTER", 0.6)
    server = await _tcp_broker()
    destination = await _tcp_broker()
    home, there = server.config.tcp_port, destination.config.tcp_port
    client = Client(HOST, home, transport="tcp", client_id="home", clean_start=True,
                    session_expiry=60, reconnect_delay=(0.02, 0.1))  # fmt: skip
    try:
        await client.connect()
        await server.migration.pre_checkpoint(f"{HOST}:{there}")
        await asyncio.wait_for(client.wait_connected(), 10)
        for _ in range(100):
            if client.connected and client.port == there:
                break
            await asyncio.sleep(0.05)
        assert client.connected and client.port == there
        await destination.stop()  # the destination dies mid-way through its lazy phase
        await server.migration.rollback()
        await asyncio.sleep(0.2)
        await asyncio.wait_for(client.wait_connected(), 10)
        assert client.port == home
        assert client.reconnects == 2
        assert _tcp_connections(server) == 1
    finally:
        await client.disconnect()
        await server.stop()
        await destination.stop()


@pytest.mark.timeout(30)
async def test_refused_reconnects_do_not_multiply_loops() -> None:
    """Each refused attempt loses a stream; still only one reconnect loop may run."""
    server = await _tcp_broker()
    port = server.config.tcp_port
    client = Client(HOST, port, transport="tcp", client_id="single", clean_start=True,
                    session_expiry=60, reconnect_delay=(0.01, 0.05))  # fmt: skip
    try:
        await client.connect()
        # Refuse new connections with a reference to this very broker for a while: each
        # attempt gets CONNACK 0x9D and a closed connection, many times over.
        server.broker.set_redirect(f"{HOST}:{port}", permanent=True)
        server.broker.disconnect_clients(["tcp"], server_reference=f"{HOST}:{port}")
        server.flush()
        await asyncio.sleep(0.5)
        server.broker.set_redirect(None)
        await asyncio.wait_for(client.wait_connected(), 10)
        await asyncio.sleep(0.5)
        assert client.reconnects == 1
        assert _tcp_connections(server) == 1
    finally:
        await client.disconnect()
        await server.stop()


@pytest.mark.timeout(30)
async def test_a_slow_move_is_not_delayed_by_racing_the_blackholed_old_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long freeze: the Server Reference stays unreachable past FALLBACK_AFTER while the
    old address drops every SYN (the source after the checkpoint).  Once the destination
    serves, the client is there within a couple of retries, not after a detour through an
    attempt at the old address (it used to alternate, and such an attempt lasts seconds)."""
    monkeypatch.setattr(client_module, "FALLBACK_AFTER", 0.3)
    source = await _tcp_broker()
    home = source.config.tcp_port
    dest_port = _free_port()
    client = Client(HOST, home, transport="tcp", client_id="slow-move", clean_start=True,
                    session_expiry=60, reconnect_delay=(0.02, 0.1))  # fmt: skip
    blackhole = socket.socket()
    backlog_filler = socket.socket()
    dest: BrokerServer | None = None
    try:
        await client.connect()
        await source.migration.pre_checkpoint(f"{HOST}:{dest_port}")
        await asyncio.sleep(0.2)
        assert not client.connected and client.port == dest_port
        await source.stop()
        # The old address now drops SYNs: a listener whose accept queue is full.
        blackhole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blackhole.bind((HOST, home))
        blackhole.listen(0)
        backlog_filler.connect((HOST, home))
        await asyncio.sleep(1.5)  # past FALLBACK_AFTER: attempts race both addresses
        config = BrokerConfig(host=HOST, tcp_port=dest_port, tls_port=0, mptcp_port=0,
                              quic_port=0, sys_interval=0).validate()  # fmt: skip
        dest = BrokerServer(config)
        await dest.start()
        up = asyncio.get_running_loop().time()
        await asyncio.wait_for(client.wait_connected(), 10)
        took = asyncio.get_running_loop().time() - up
        assert client.port == dest_port
        assert took < 0.5, f"{took:.2f} s after the destination came up"
        assert _tcp_connections(dest) == 1 and client.reconnects == 1
    finally:
        await client.disconnect()
        blackhole.close()
        backlog_filler.close()
        if dest is not None:
            await dest.stop()


@pytest.mark.timeout(30)
async def test_a_crashed_reconnect_loop_is_reported_not_waited_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in the reconnect path (here: an attempt that raises) must end the caller's wait
    with an error and a log line, not leave it hanging on a client that never comes back."""
    server = await _tcp_broker()
    port = server.config.tcp_port
    client = Client(HOST, port, transport="tcp", client_id="crash", clean_start=True,
                    session_expiry=60, reconnect_delay=(0.01, 0.05))  # fmt: skip

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug in an attempt")

    try:
        await client.connect()
        client._connect_once = broken  # type: ignore[method-assign]
        server.broker.disconnect_clients(["tcp"])
        server.flush()
        with pytest.raises(client_module.ClientError, match="bug in an attempt"):
            await client.next_message(timeout=5)
        assert "reconnect loop failed" in caplog.text
    finally:
        await client.disconnect()
        await server.stop()
