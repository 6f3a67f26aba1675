"""Finding 1 of issue #13: one client's reset must never freeze the other clients.

A client that sends non-MQTT bytes and resets its TCP connection at once leaves the broker a
connection to close whose socket is already gone: ``write_eof()`` raises ENOTCONN.  When that
happened inside the broker's batched flush, every connection after it in the batch lost its
output for good (a connection is queued again only when its buffer was empty), so a live
subscriber got no PINGRESP and no message ever again.

The broker runs in the test's event loop on real loopback sockets; each round puts an
attacker's garbage + RST and a bystander's PINGREQ into the same event-loop turn.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from broker.config import BrokerConfig
from broker.server import BrokerServer
from mqttproto.codec import encode
from mqttproto.packets import MQTT_3_1_1, Connect

HOST = "127.0.0.1"
ROUNDS = 30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def _read_packet(reader: asyncio.StreamReader, timeout: float = 2.0) -> bytes:
    head = await asyncio.wait_for(reader.readexactly(2), timeout)
    assert head[1] < 0x80
    return head + await asyncio.wait_for(reader.readexactly(head[1]), timeout)


@pytest.mark.timeout(60)
async def test_a_reset_attacker_does_not_starve_a_live_client() -> None:
    config = BrokerConfig(host=HOST, tcp_port=_free_port(), tls_port=0, mptcp_port=0,
                          quic_port=0, sys_interval=0).validate()  # fmt: skip
    server = BrokerServer(config)
    await server.start()
    port = config.tcp_port
    errors: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(encode(Connect(client_id="bystander", protocol_version=MQTT_3_1_1),
                            MQTT_3_1_1))  # fmt: skip
        assert (await _read_packet(reader))[0] == 0x20
        for n in range(ROUNDS):
            attacker = socket.create_connection((HOST, port))
            deadline = time.monotonic() + 2
            while len(server.broker.connections) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.001)  # the broker accepted the attacker
            # One event-loop turn sees both: the attacker's garbage then its RST, and the
            # bystander's PINGREQ.  Nothing below yields to the loop until the RST is out.
            attacker.sendall(b"\xff\xff\xff\xff garbage")
            writer.write(b"\xc0\x00")
            time.sleep(0.005)
            attacker.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            attacker.close()
            answer = await _read_packet(reader)
            assert answer == b"\xd0\x00", f"round {n}: {answer!r}"
        flush_errors = [e for e in errors if "exception" in e]
        assert not flush_errors, flush_errors[0]
        writer.close()
    finally:
        loop.set_exception_handler(None)
        await server.stop()
