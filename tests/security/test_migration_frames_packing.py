"""Many migration frames queued at once: every packet they fill ends cleanly.

A client may queue any number of MIGRATION_TRIGGER frames (the trigger-flood probe queues
thousands); the extension writes them into aioquic's packets, and a frame must reserve room
for its 8-byte type as well as its body, or the packet it tops up overflows on encryption.
Two aioquic connections in memory, a simulated clock, no sockets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from broker.certs import CertPaths, make_lab_certs
from client.transports import quic_configuration
from quicmig.connection import MigratingQuicConnection, MigrationFrameReceived
from quicmig.frames import ALL_STRATEGIES, MigrationTrigger


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_lab_certs(Path(tmp_path_factory.mktemp("packing-certs")))


def test_many_frames_at_once_fill_packets_without_overflowing(certs: CertPaths) -> None:
    """Frames of every size queued together: each packet that fills up ends cleanly (the
    frame's 8-byte type counts towards the room it needs) and all of them arrive."""
    client = MigratingQuicConnection.adopt(
        QuicConnection(
            configuration=quic_configuration(str(certs.ca_cert), server_name="localhost")
        ),
        0,
    )
    config = QuicConfiguration(is_client=False, alpn_protocols=["mqtt"])
    config.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    server = MigratingQuicConnection.adopt(
        QuicConnection(
            configuration=config,
            original_destination_connection_id=client.original_destination_connection_id,
        ),
        ALL_STRATEGIES,
    )
    got: list[MigrationTrigger] = []
    now = 0.0

    def exchange(rounds: int) -> None:
        nonlocal now
        for _ in range(rounds):
            now += 0.002
            for conn in (client, server):
                timer = conn.get_timer()
                if timer is not None and timer <= now:
                    conn.handle_timer(now)
            for data, _ in client.datagrams_to_send(now):
                server.receive_datagram(data, ("127.0.0.1", 40000), now)
            for data, _ in server.datagrams_to_send(now):
                client.receive_datagram(data, ("127.0.0.1", 14567), now)
            while client.next_event() is not None:
                pass
            while (event := server.next_event()) is not None:
                if isinstance(event, MigrationFrameReceived):
                    assert isinstance(event.frame, MigrationTrigger)
                    got.append(event.frame)

    client.connect(("127.0.0.1", 14567), now=now)
    exchange(50)
    hints = ["x" * (i % 23) for i in range(3000)]
    for hint in hints:
        assert client.trigger_migration(1, hint)
    exchange(300)
    assert not client.qmig_pending
    assert [t.hint for t in got] == hints
