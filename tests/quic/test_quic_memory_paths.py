"""A released broker-side connection, without sockets: what it still does (issue #16).

The release swaps aioquic's deques for short lists, the spent 1-RTT crypto stream for a
shared one and the TLS context's handshake state for class-level Nones.  Two aioquic
connections exchange datagrams by hand on a simulated clock, the server adopted as the
broker's are, and the server must still: validate a new client address (its challenge
queues; the harness tests have clients challenge the broker), carry stream data, and close with
the TLS alert's error code when the client sends a TLS message after the handshake.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import AlertDescription, Epoch

from broker.certs import CertPaths, make_lab_certs
from client.transports import quic_configuration
from quicmig.connection import (
    SPENT_CRYPTO_STREAM,
    TLS_HANDSHAKE_ONLY,
    MigratingQuicConnection,
    ReleasedServerConnection,
    ShortQueue,
    ShortRing,
)
from quicmig.frames import ALL_STRATEGIES
from quicmig.tickets import TicketStore

CLIENT_ADDR = ("127.0.0.1", 40000)
CLIENT_NEW_ADDR = ("127.0.0.1", 40001)
SERVER_ADDR = ("127.0.0.1", 14567)
STEP = 0.002


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_lab_certs(Path(tmp_path_factory.mktemp("release-certs")))


class Pair:
    """A qmig client and a broker-side server connection on an in-memory path."""

    def __init__(self, certs: CertPaths, tickets: bool) -> None:
        config = quic_configuration(str(certs.ca_cert), server_name="localhost")
        self.client = MigratingQuicConnection.adopt(QuicConnection(configuration=config), 0)
        server_config = QuicConfiguration(is_client=False, alpn_protocols=["mqtt"])
        server_config.load_cert_chain(str(certs.server_cert), str(certs.server_key))
        server = QuicConnection(
            configuration=server_config,
            original_destination_connection_id=self.client.original_destination_connection_id,
        )
        self.server = MigratingQuicConnection.adopt(server, ALL_STRATEGIES)
        if tickets:
            self.server.ticket_store = TicketStore()
        self.client_addr: NetworkAddress = CLIENT_ADDR
        self.now = 0.0
        self.to_client = bytearray()
        self.to_server = bytearray()
        self.closed: list[ConnectionTerminated] = []
        self.client.connect(SERVER_ADDR, now=self.now)
        self.run(0.1)
        self.sid = self.client.get_next_available_stream_id()

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += STEP
            for conn in (self.client, self.server):
                timer = conn.get_timer()
                if timer is not None and timer <= self.now:
                    conn.handle_timer(self.now)
            for data, _ in self.client.datagrams_to_send(self.now):
                self.server.receive_datagram(data, self.client_addr, self.now)
            for data, addr in self.server.datagrams_to_send(self.now):
                if addr == self.client_addr:  # the old address is gone
                    self.client.receive_datagram(data, SERVER_ADDR, self.now)
            for conn, inbox in ((self.client, self.to_client), (self.server, self.to_server)):
                while (event := conn.next_event()) is not None:
                    if isinstance(event, StreamDataReceived):
                        inbox += event.data
                    elif isinstance(event, ConnectionTerminated):
                        self.closed.append(event)

    def exchange(self, label: bytes) -> None:
        """Stream data both ways, delivered."""
        sent = len(self.to_server), len(self.to_client)
        self.client.send_stream_data(self.sid, b"up " + label)
        self.run(0.02)
        self.server.send_stream_data(self.sid, b"down " + label)
        self.run(0.05)
        assert self.to_server[sent[0] :] == b"up " + label
        assert self.to_client[sent[1] :] == b"down " + label


@pytest.mark.parametrize("tickets", [False, True], ids=["no-ticket", "ticket"])
def test_released_connection_keeps_its_state_small(certs: CertPaths, tickets: bool) -> None:
    pair = Pair(certs, tickets)
    pair.exchange(b"1")
    server = pair.server
    for queue in (server._events, server._datagrams_pending):
        assert isinstance(queue, ShortQueue)
    path = server._network_paths[0]
    assert isinstance(path.local_challenges, ShortRing)
    assert isinstance(path.remote_challenges, ShortQueue)
    # The ticket (sent on the 1-RTT crypto stream) was acknowledged: the stream is spent.
    assert server._crypto_streams[Epoch.ONE_RTT] is SPENT_CRYPTO_STREAM
    context = server.tls
    assert not set(TLS_HANDSHAKE_ONLY) & set(vars(context))
    assert context.key_schedule is None and context.alpn_negotiated == "mqtt"
    assert not isinstance(server.receive_paused, set)
    # Settled attributes come from the class: the instance dict stays in a small table.
    assert isinstance(server, ReleasedServerConnection)
    assert len(vars(server)) <= 85 and "_handshake_complete" not in vars(server)
    assert server._handshake_complete and not server._is_client
    pair.exchange(b"2")
    server.close(error_code=0x0, reason_phrase="bye")
    pair.run(0.1)
    assert pair.closed and pair.closed[0].reason_phrase == "bye"


def test_client_address_change_is_validated(certs: CertPaths) -> None:
    pair = Pair(certs, tickets=True)
    pair.exchange(b"before")
    server = pair.server
    pair.client_addr = CLIENT_NEW_ADDR  # NAT rebinding: the server must validate it
    pair.exchange(b"moved")
    pair.run(0.1)
    active = server._network_paths[0]
    assert active.addr == CLIENT_NEW_ADDR and active.is_validated
    assert isinstance(active.local_challenges, ShortRing)
    assert not active.local_challenges  # cleared by the PATH_RESPONSE
    pair.exchange(b"after")
    assert not pair.closed


def test_tls_message_after_the_handshake_is_refused_as_before(certs: CertPaths) -> None:
    pair = Pair(certs, tickets=True)
    pair.exchange(b"1")
    assert pair.server._crypto_streams[Epoch.ONE_RTT] is SPENT_CRYPTO_STREAM
    key_update = bytes([24, 0, 0, 1, 0])  # TLS KeyUpdate, forbidden in QUIC
    pair.client._crypto_streams[Epoch.ONE_RTT].sender.write(key_update)
    pair.run(0.2)
    assert pair.closed, "the client was not closed"
    error = QuicErrorCode.CRYPTO_ERROR + int(AlertDescription.unexpected_message)
    assert pair.closed[0].error_code == error
    # The shared stream took no data from this client.
    assert SPENT_CRYPTO_STREAM.receiver.starting_offset() == 0


def test_short_ring_keeps_the_last_items() -> None:
    ring: deque[int] = deque(maxlen=3)
    short = ShortRing[int](3)
    for k in range(5):
        ring.append(k)
        short.append(k)
    assert list(short) == list(ring) == [2, 3, 4]
    assert short.popleft() == 2 and 2 not in short
    short.clear()
    with pytest.raises(IndexError):
        short.popleft()
