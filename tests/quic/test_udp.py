"""quicmig.udp: the QUIC listener's socket reads datagrams in batches and sends with GSO.

Real loopback sockets: a burst of datagrams reaches the protocol in batches bracketed by
batch_started/batch_ended, nothing lost or reordered; datagrams held while corked reach
their peer intact and in order, in one sendmsg per run where the kernel has UDP GSO, one
sendto each where it has not; a datagram the socket cannot take yet is sent later.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from quicmig.udp import (
    GSO_MAX_SEGMENTS,
    BatchingDatagramTransport,
    gso_runs,
    gso_supported,
    open_udp,
)

HOST = "127.0.0.1"


class Recorder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.current: list[bytes] | None = None
        self.errors: list[Exception] = []

    def batch_started(self) -> None:
        assert self.current is None
        self.current = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.current is not None, "a datagram outside a batch"
        self.current.append(data)

    def batch_ended(self) -> None:
        assert self.current is not None
        if self.current:
            self.batches.append(self.current)
        self.current = None

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)

    @property
    def received(self) -> list[bytes]:
        return [d for batch in self.batches for d in batch]


def peer() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    return sock


async def drain(sock: socket.socket, count: int, timeout: float = 5.0) -> list[bytes]:
    loop = asyncio.get_running_loop()
    out: list[bytes] = []
    deadline = loop.time() + timeout
    while len(out) < count and loop.time() < deadline:
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            await asyncio.sleep(0.005)
    return out


def test_gso_runs_keep_order_and_the_kernel_rules() -> None:
    a, b, c = bytes(1200), bytes(1200), bytes(300)
    assert gso_runs([a, b, c]) == [[a, b, c]]
    assert gso_runs([c, a]) == [[c], [a]]  # a run cannot grow past its first size
    assert gso_runs([a, c, b]) == [[a, c], [b]]  # only the last may be shorter
    many = [bytes(1000)] * (GSO_MAX_SEGMENTS + 5)
    runs = gso_runs(many)
    assert [len(r) for r in runs] == [GSO_MAX_SEGMENTS, 5]
    big = [bytes(1400)] * 60  # 84 KB: over one IP datagram
    assert all(sum(map(len, r)) <= 65000 for r in gso_runs(big))
    assert sum(len(r) for r in gso_runs(big)) == 60


async def test_burst_arrives_in_batches_in_order() -> None:
    recorder = Recorder()
    transport = await open_udp(HOST, 0, recorder, batch=8)
    sender = peer()
    try:
        address = transport.get_extra_info("sockname")
        sent = [f"d{k:03}".encode() for k in range(50)]
        for data in sent:
            sender.sendto(data, address)
        await asyncio.sleep(0.2)
        assert recorder.received == sent
        assert max(len(b) for b in recorder.batches) <= 8
        assert len(recorder.batches) < len(sent)  # several per wake-up
    finally:
        transport.close()
        sender.close()


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "no-gso"])
async def test_corked_datagrams_reach_the_peer_intact(gso: bool) -> None:
    if gso and not gso_supported(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)):
        pytest.skip("no UDP GSO on this kernel")
    transport = await open_udp(HOST, 0, Recorder())
    transport.gso = gso
    receiver = peer()
    try:
        address = receiver.getsockname()
        datagrams = [bytes([k]) * 1200 for k in range(5)] + [b"tail" * 50]
        transport.cork()
        for data in datagrams:
            transport.sendto(data, address)
        assert transport.counts["sent"] == 0  # held while corked
        transport.uncork()
        assert await drain(receiver, len(datagrams)) == datagrams
        assert transport.counts["sends"] == (1 if gso else len(datagrams))
    finally:
        transport.close()
        receiver.close()


class FullOnce:
    """A socket whose first send finds the buffer full (as a real one can)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.refused = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def sendto(self, data: bytes, addr: Any) -> int:
        if not self.refused:
            self.refused = True
            raise BlockingIOError
        return self.sock.sendto(data, addr)


async def test_datagram_the_socket_cannot_take_yet_is_sent_later() -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    transport = BatchingDatagramTransport(loop, FullOnce(sock), Recorder(), gso=False)  # type: ignore[arg-type]
    transport.start()
    receiver = peer()
    try:
        address = receiver.getsockname()
        transport.sendto(b"first", address)
        transport.sendto(b"second", address)  # queued behind the first
        assert transport.get_write_buffer_size() == len(b"firstsecond")
        assert await drain(receiver, 2) == [b"first", b"second"]
        assert transport.get_write_buffer_size() == 0
    finally:
        transport.close()
        receiver.close()


async def test_binding_an_address_starts_no_resolver_thread() -> None:
    """asyncio's default executor (the resolver's) would stay in the broker for good."""
    import threading

    before = threading.active_count()
    transport = await open_udp(HOST, 0, Recorder())
    try:
        assert threading.active_count() == before
    finally:
        transport.close()
