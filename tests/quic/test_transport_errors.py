"""How the client's QUIC transport takes socket errors during the handshake."""

from __future__ import annotations

import asyncio

import pytest
from aioquic.quic.connection import QuicConnection

from client.transports import QuicStreamProtocol, quic_configuration


async def test_local_firewall_drop_is_loss_not_refusal() -> None:
    """EPERM from sendto (a local nftables drop) must not fail the connect: QUIC resends;
    a port unreachable (ECONNREFUSED) is the broker's answer and fails it at once."""
    proto = QuicStreamProtocol(QuicConnection(configuration=quic_configuration(insecure=True)))
    waiter = proto._connected_waiter = asyncio.get_running_loop().create_future()
    proto.error_received(PermissionError(1, "Operation not permitted"))
    assert not waiter.done()
    proto.error_received(ConnectionRefusedError(111, "Connection refused"))
    with pytest.raises(ConnectionRefusedError):
        await waiter
