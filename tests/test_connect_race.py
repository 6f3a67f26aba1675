"""The client's TCP connect race (client/transports.py): one socket wins, nothing leaks,
and a losing attempt that connects as it is cancelled raises nothing in the event loop.

Issue #16 saw 441 ``InvalidStateError`` tracebacks from ``Future.set_result`` with 960
clients: a cancelled attempt's writer callback fired on its already-cancelled future.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from client.transports import _connect_socket, race_connect_blocking

HOST = "127.0.0.1"


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(4096)
    return sock


@pytest.mark.timeout(30)
async def test_an_attempt_cancelled_as_it_connects_raises_nothing_in_the_loop() -> None:
    """The losing attempt of a race is cancelled in the same event-loop turn in which its
    socket becomes writable: its writer callback must not set the cancelled future."""
    blackhole = socket.socket()  # drops SYNs while its accept queue is full
    blackhole.bind((HOST, 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname())
    trigger_r, trigger_w = socket.socketpair()
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    attempt = asyncio.ensure_future(_connect_socket(*blackhole.getsockname()))

    def cancel_attempt() -> None:  # selected before the attempt's socket in the same turn
        trigger_r.recv(1)
        attempt.cancel()

    def block_while_the_syn_is_answered() -> None:
        trigger_w.send(b"x")  # readable first...
        blackhole.accept()[0].close()  # ...then room for the kernel's resent SYN (at ~1 s)
        time.sleep(1.5)  # the loop is blocked: both are ready when it selects next

    loop.add_reader(trigger_r.fileno(), cancel_attempt)
    try:
        await asyncio.sleep(0.2)  # the SYN is out and dropped; the writer is registered
        loop.call_soon(block_while_the_syn_is_answered)
        with pytest.raises(asyncio.CancelledError):
            await attempt
        await asyncio.sleep(0.05)
        assert not errors, errors[0]
    finally:
        loop.remove_reader(trigger_r.fileno())
        loop.set_exception_handler(None)
        for sock in (blackhole, filler, trigger_r, trigger_w):
            sock.close()


def test_the_blocking_race_prefers_the_reference_and_falls_back_when_it_refuses() -> None:
    """The race for threaded clients (paho in the lab workload): a blocking socket to the
    primary when it answers, the fallback when the primary refuses, a refusal at once."""
    a, b = _listener(), _listener()
    dead = socket.socket()
    dead.bind((HOST, 0))  # bound, never listening: refused at once
    try:
        pa, pb, pdead = a.getsockname(), b.getsockname(), dead.getsockname()
        sock, reached = race_connect_blocking(pa, pb, timeout=2.0)
        with sock:
            assert reached == pa and sock.getpeername() == pa and sock.gettimeout() == 2.0
        sock, reached = race_connect_blocking(pdead, pb)
        with sock:
            assert reached == pb
        t0 = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            race_connect_blocking(pdead, None)
        with pytest.raises(ConnectionRefusedError):
            race_connect_blocking(pdead, pdead)
        assert time.monotonic() - t0 < 0.5
    finally:
        for sock in (a, b, dead):
            sock.close()


async def test_the_blocking_race_works_from_a_thread_that_runs_an_event_loop() -> None:
    a = _listener()
    try:
        sock, reached = race_connect_blocking(a.getsockname(), None)
        sock.close()
        assert reached == a.getsockname()
    finally:
        a.close()
