"""A broker process frozen as CRIU freezes it (SIGSTOP, SIGCONT) keeps its clients.

The checkpointed broker is told nothing: after the thaw its timers fire late, and the first
thing it used to do was end every client whose keep alive had run out during the freeze,
although the silence was the broker's own.  After a real migration nothing the clients sent
meanwhile is waiting in the restored sockets, so here the client, too, says nothing until
the broker is back.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.brokers import BrokerFactory
from tests.interop.rawmqtt import RawClient

PINGREQ = b"\xc0\x00"
PINGRESP = 13
DISCONNECT = 14
KEEP_ALIVE_TIMEOUT = 0x8D


def test_a_frozen_broker_does_not_end_clients_for_its_own_silence(
    start_broker: BrokerFactory,
) -> None:
    broker = start_broker()
    if broker.kind != "qmig":
        pytest.skip("qmig's own behaviour")
    assert broker.pid is not None
    raw = RawClient(broker.host, broker.tcp_port)
    try:
        raw.connect("frozen-keep-alive", keepalive=2)
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            time.sleep(4.0)  # twice the keep alive, more than its 1.5x
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        time.sleep(0.7)  # the thawed broker's late ticks have run
        raw.sock.sendall(PINGREQ)
        pkt = raw.read_packet(timeout=3.0)
        assert pkt is not None and pkt.ptype == PINGRESP, f"ended after the thaw: {pkt}"
        # Keep alive still holds: the client's own silence ends it after 1.5 x 2 s.
        started = time.monotonic()
        packets = raw.wait_closed(timeout=6.0)
        assert 2.5 < time.monotonic() - started < 5.0
        assert [(p.ptype, p.body[:1]) for p in packets] == [
            (DISCONNECT, bytes([KEEP_ALIVE_TIMEOUT]))
        ]
    finally:
        raw.close()
        if broker.pid is not None:
            os.kill(broker.pid, signal.SIGCONT)  # never leave it stopped
