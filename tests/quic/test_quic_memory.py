"""An established broker-side QUIC connection keeps no handshake state (issue #16).

The broker runs in-process so the test can look at its connections: once the handshake is
over, the crypto buffers, the Initial and Handshake epochs' streams, keys and packet spaces,
the TLS context's key schedule and offers, and the per-connection frame-handler table are
gone, and only SERVER_CONNECTION_IDS connection IDs are issued until a pool is announced.
The same connections then go on working: messages both ways, key updates started by
either side, several streams, and a pool client given room to follow the pool.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.tls import Epoch

from broker.certs import make_lab_certs
from broker.config import BrokerConfig
from broker.server import BrokerServer
from client.client import Client
from quicmig.connection import (
    _FRAME_HANDLERS,
    ACTIVE_CONNECTION_ID_LIMIT,
    DISCARDED_KEYS,
    DISCARDED_SPACE,
    SERVER_CONNECTION_IDS,
    MigratingQuicConnection,
    _FrameHandlers,
)

from .conftest import HOST, free_udp_port
from .helpers import collect, uid

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    certs = make_lab_certs(tmp_path / "certs")
    started: list[BrokerServer] = []
    clients: list[Client] = []

    async def start(**options: Any) -> tuple[BrokerServer, Callable[..., Client]]:
        config = BrokerConfig(
            host=HOST, tcp_port=0, tls_port=0, mptcp_port=0, quic_port=free_udp_port(),
            cert=str(certs.server_cert), key=str(certs.server_key), sys_interval=0, **options,
        ).validate()  # fmt: skip
        server = BrokerServer(config)
        await server.start()
        started.append(server)

        def client(**kwargs: Any) -> Client:
            c = Client(HOST, config.quic_port, transport="quic", cafile=str(certs.ca_cert),
                       reconnect=False, **kwargs)  # fmt: skip
            clients.append(c)
            return c

        return server, client

    yield start
    for c in clients:
        await c.disconnect()
    for server in started:
        await server.stop()


def broker_side(server: BrokerServer, client_id: str) -> MigratingQuicConnection:
    for proto in server.quic_protocols:
        if proto.conn is not None and proto.conn.client_id == client_id:
            quic = proto._quic
            assert isinstance(quic, MigratingQuicConnection)
            return quic
    raise AssertionError(f"no broker-side connection for {client_id}")


def client_side(client: Client) -> QuicConnection:
    quic = client._stream._quic  # type: ignore[union-attr]
    assert isinstance(quic, QuicConnection)
    return quic


def assert_released(quic: MigratingQuicConnection) -> None:
    assert quic._crypto_buffers == {}
    assert set(quic._crypto_streams) == {Epoch.ONE_RTT}
    for epoch in (Epoch.INITIAL, Epoch.HANDSHAKE, Epoch.ZERO_RTT):
        assert quic._cryptos[epoch] is DISCARDED_KEYS
    assert set(quic._cryptos_initial.values()) == {DISCARDED_KEYS}
    assert quic._spaces[Epoch.INITIAL] is quic._spaces[Epoch.HANDSHAKE] is DISCARDED_SPACE
    assert quic._loss.spaces == [quic._spaces[Epoch.ONE_RTT]]
    assert quic._cryptos[Epoch.ONE_RTT].send.is_valid()
    tls = quic.tls
    assert tls.key_schedule is None and tls._key_schedule_proxy is None
    assert tls._signature_algorithms is None and tls.alpn_cb is None
    assert tls.alpn_negotiated == "mqtt"
    assert isinstance(vars(quic)[_FRAME_HANDLERS], _FrameHandlers)


async def roundtrip(sub: Client, pub: Client, topic: str, count: int = 3) -> None:
    for k in range(count):
        await pub.publish(topic, f"m{k}".encode(), qos=1)
    got = await collect(sub, count)
    assert [m.payload for m in got] == [f"m{k}".encode() for k in range(count)]


async def test_established_connection_drops_handshake_state(broker: Any) -> None:
    server, make = await broker()
    sub, pub = make(client_id=uid("sub-")), make(client_id=uid("pub-"))
    await sub.connect()
    await pub.connect()
    topic = uid("mem/")
    await sub.subscribe(topic, qos=1)
    quic = broker_side(server, sub.client_id)
    assert_released(quic)
    # No pool announced: few connection IDs each way.
    assert len(quic._host_cids) == SERVER_CONNECTION_IDS
    assert len(quic._peer_cid_available) <= SERVER_CONNECTION_IDS - 1
    await roundtrip(sub, pub, topic)

    # Key updates: started by the broker, then by the client, messages flowing each time.
    phase = quic._cryptos[Epoch.ONE_RTT].recv.key_phase
    quic.request_key_update()
    await roundtrip(sub, pub, topic)
    assert quic._cryptos[Epoch.ONE_RTT].recv.key_phase != phase
    client_side(sub).request_key_update()
    await roundtrip(sub, pub, topic)
    assert quic._cryptos[Epoch.ONE_RTT].recv.key_phase == phase
    assert_released(quic)


async def test_multi_stream_connection_after_release(broker: Any) -> None:
    server, make = await broker()
    sub = make(client_id=uid("sub-"), streams="per-topic")
    pub = make(client_id=uid("pub-"), streams="per-qos")
    await sub.connect()
    await pub.connect()
    topics = [uid("mem/a/"), uid("mem/b/")]
    for topic in topics:
        await sub.subscribe(topic, qos=1)
    quic = broker_side(server, sub.client_id)
    assert_released(quic)
    for topic in topics:
        await roundtrip(sub, pub, topic)
    assert len(broker_side(server, pub.client_id)._streams) >= 2


async def test_pool_raises_the_connection_ids(broker: Any) -> None:
    server, make = await broker(pool="127.0.0.1:1,127.0.0.1:2")
    client = make(client_id=uid("pool-"), follow="pool")
    await client.connect()
    quic = broker_side(server, client.client_id)
    assert_released(quic)
    assert len(quic._host_cids) == ACTIVE_CONNECTION_ID_LIMIT
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    theirs = client_side(client)
    while len(theirs._peer_cid_available) < ACTIVE_CONNECTION_ID_LIMIT - 1:
        assert loop.time() < deadline, "the client never got the pool's connection IDs"
        await asyncio.sleep(0.02)
    # Every issued ID routes to the connection in the listener's table.
    table = server.listeners["quic"].server._protocols
    assert all(cid.cid in table for cid in quic._host_cids)


async def test_listener_table_empties_as_clients_leave(broker: Any) -> None:
    """Each connection knows its own keys in the listener's table (no per-connection
    ``partial`` callbacks, no table of sets): all of them go when it ends."""
    server, make = await broker(pool="127.0.0.1:1,127.0.0.1:2")
    clients = [make(client_id=uid("leave-")), make(client_id=uid("leave-"), follow="pool")]
    for c in clients:
        await c.connect()
    listener = server.listeners["quic"].server
    for c in clients:
        proto = next(
            p for p in server.quic_protocols if p._quic is broker_side(server, c.client_id)
        )
        assert sorted(proto._table_keys) == sorted(
            k for k, v in listener._protocols.items() if v is proto
        )
        assert proto._connection_terminated_handler == proto._terminated
    for c in clients:
        await c.disconnect()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while listener._protocols:
        assert loop.time() < deadline, f"{len(listener._protocols)} table entries left"
        await asyncio.sleep(0.05)


async def test_private_names_exist() -> None:
    """The aioquic names the release touches are still there (aioquic 1.7's layout)."""
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    quic.connect(("127.0.0.1", 4433), now=0.0)  # builds the TLS context and epochs
    state = vars(quic)
    for name in ("_crypto_buffers", "_crypto_streams", "_cryptos", "_cryptos_initial",
                 "_spaces", _FRAME_HANDLERS):  # fmt: skip
        assert name in state, name
    assert quic._loss.spaces == list(quic._spaces.values())
    for name in ("key_schedule", "_signature_algorithms", "alpn_cb", "_receive_buffer"):
        assert name in vars(quic.tls), name
    # The queues the adapter shortens are deques, of the methods it provides.
    path = quic._network_paths[0]
    for queue in (quic._events, quic._datagrams_pending, path.remote_challenges):
        assert type(queue) is deque and queue.maxlen is None
    assert type(path.local_challenges) is deque and path.local_challenges.maxlen
    sender = quic._crypto_streams[Epoch.ONE_RTT].sender
    for name in ("_buffer_start", "_buffer_stop", "_pending"):
        assert name in vars(sender), name
    assert type(vars(asyncio.Event())["_waiters"]) is deque
    protocol = QuicConnectionProtocol(quic)
    for name in ("_connection_id_issued_handler", "_connection_id_retired_handler",
                 "_connection_terminated_handler", "_closed"):  # fmt: skip
        assert name in vars(protocol), name
