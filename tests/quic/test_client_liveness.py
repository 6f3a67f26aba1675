"""A QUIC client knows when its broker is gone, and comes back (issue #15's rollback finding).

Over QUIC the client follows a migrating broker without reconnecting.  But a connection can
die for real: the broker restarted, or a post-copy move rolled back after the destination
had served, leaving the client's connection state ahead of the broker's (it then hears
nothing, ever).  A client that hangs on to such a connection loses everything it sends.
Rules (client.client): silence for a whole keep alive interval is a dead connection, and a
dead QUIC connection is replaced by a new one that resumes the MQTT session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived

from broker.certs import CertPaths
from client.client import Client

from .conftest import HOST, free_udp_port

pytestmark = pytest.mark.timeout(60)


async def _until(condition: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _client(port: int, pki: CertPaths, client_id: str) -> Client:
    return Client(HOST, port, transport="quic", cafile=str(pki.ca_cert), client_id=client_id,
                  clean_start=True, session_expiry=60, keep_alive=2,
                  reconnect_delay=(0.05, 0.2), connect_timeout=2.0)  # fmt: skip


async def test_a_silent_broker_is_given_up_after_one_keep_alive_and_rejoined(
    make_broker: Callable[..., Any], pki: CertPaths
) -> None:
    port = free_udp_port()
    server = await make_broker(quic_port=port)
    client = _client(port, pki, "silent")
    try:
        await client.connect()
        await client.subscribe("t/silent", qos=1)
        udp = server.listeners["quic"].server._transport
        udp.pause_reading()  # the broker hears nothing and answers nothing
        for i in range(10):  # the client keeps publishing into the silence
            await client.publish("t/silent", f"{i}".encode(), qos=0)
        gone = await _until(lambda: not client.connected, 6.0)
        assert gone <= 4.0, gone  # keep alive 2 s, checked every 0.5 s
        udp.resume_reading()
        await asyncio.wait_for(client.wait_connected(), 10)
        assert client.reconnects == 1
        assert client.session_present  # the broker kept the session for it
        await client.publish("t/silent", b"back", qos=1)
        assert (await client.next_message(timeout=5)).payload == b"back"
    finally:
        await client.disconnect()


async def test_a_restarted_broker_gets_its_quic_client_back(
    make_broker: Callable[..., Any], pki: CertPaths
) -> None:
    port = free_udp_port()
    first = await make_broker(quic_port=port)
    client = _client(port, pki, "restart")
    try:
        await client.connect()
        await client.subscribe("t/restart", qos=1)
        await first.stop()
        await _until(lambda: not client.connected, 6.0)
        await make_broker(quic_port=port)  # the same address, a new process state
        await asyncio.wait_for(client.wait_connected(), 10)
        assert client.reconnects == 1
        await client.subscribe("t/restart", qos=1)  # a new broker: no session kept
        await client.publish("t/restart", b"again", qos=1)
        assert (await client.next_message(timeout=5)).payload == b"again"
    finally:
        await client.disconnect()


class _AckingPeer(QuicConnectionProtocol):
    """A QUIC server that accepts MQTT CONNECT and then answers no MQTT packet at all: its
    QUIC stack still acknowledges every packet, as a broker busy with thousands of clients
    returning from a move does long before it gets to each PINGREQ."""

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived) and event.data[:1] == b"\x10":  # CONNECT
            self._quic.send_stream_data(event.stream_id, b"\x20\x03\x00\x00\x00")  # CONNACK
            self.transmit()


async def test_a_broker_that_acknowledges_is_alive_for_move_grace_without_answering(
    pki: CertPaths,
) -> None:
    config = QuicConfiguration(is_client=False, alpn_protocols=["mqtt"])
    config.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    port = free_udp_port()
    server = await serve(HOST, port, configuration=config, create_protocol=_AckingPeer)
    client = Client(HOST, port, transport="quic", cafile=str(pki.ca_cert), client_id="acked",
                    keep_alive=2, move_grace=3, reconnect_delay=(0.05, 0.2),
                    connect_timeout=2.0)  # fmt: skip
    try:
        await client.connect()
        await asyncio.sleep(4.0)  # twice the keep alive without a PINGRESP, every ping acked
        assert client.connected and client.reconnects == 0
        # But not for ever: keep alive + move grace (5 s) without an MQTT answer ends it.
        await _until(lambda: client.reconnects == 1, 4.0)
    finally:
        await client.disconnect()
        server.close()
