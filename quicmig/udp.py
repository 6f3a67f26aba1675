"""The QUIC listener's UDP socket: batched receives, and UDP GSO for datagrams to one peer.

asyncio's datagram transport reads one datagram per wake-up of the event loop and sends
each datagram with its own ``sendto``; the broker then transmitted after every datagram it
read (aioquic's protocol does), so every incoming datagram cost a ``epoll_wait``, a
``recvfrom`` and at least one ``sendto``, and a subscriber got one small datagram per
datagram its publisher sent.  :class:`BatchingDatagramTransport` replaces it for the
listener (issue #16):

- **Batched receives**: up to ``batch`` datagrams are read per wake-up (until the socket
  would block), between the protocol's ``batch_started()`` and ``batch_ended()``; the QUIC
  listener transmits each connection once at the end of the batch (see
  ``GuardedQuicServer``), so acknowledgements and deliveries of several datagrams share
  packets.  Python has no ``recvmmsg``: each datagram is still one ``recvfrom``.
- **UDP GSO** (Linux 4.18+): while :meth:`cork`-ed, datagrams are held; :meth:`uncork`
  sends consecutive ones to the same address that have the same size (the last of a run
  may be shorter) as one ``sendmsg`` with a ``UDP_SEGMENT`` control message, which the
  kernel splits into datagrams.  Where the kernel refuses it, one log line says so and
  datagrams go one ``sendto`` each.  (Python has no ``sendmmsg`` either.)

Sending otherwise follows asyncio's transport: a datagram the socket cannot take now waits
in a buffer flushed when the socket is writable; other errors go to the protocol's
``error_received``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("qmig.broker")

Address = Any  # a socket address: (host, port) or (host, port, flowinfo, scope_id)

BATCH = 16  # datagrams read per wake-up at most (bounded latency for the first of them)
MAX_DATAGRAM = 65536
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # linux/udp.h; Python 3.11 lacks it
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in the kernel
GSO_MAX_BYTES = 65000  # below the 64 KB an IP datagram can carry, headers included
# sendmsg errors that mean "no GSO here" rather than a problem with this datagram.
_NO_GSO = {errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP}


def gso_supported(sock: socket.socket) -> bool:
    """Whether the kernel accepts UDP_SEGMENT on ``sock`` (set, then cleared again)."""
    try:
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 1200)
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
    except OSError:
        return False
    return True


def gso_runs(datagrams: list[bytes]) -> list[list[bytes]]:
    """Split datagrams (to one address, in order) into runs that one GSO send can carry.

    A run's datagrams all have its first one's size, except that the last may be shorter;
    at most GSO_MAX_SEGMENTS of them and GSO_MAX_BYTES in all.
    """
    runs: list[list[bytes]] = []
    run: list[bytes] = []
    size = total = 0
    for data in datagrams:
        n = len(data)
        if run and (
            n > size
            or len(run[-1]) < size
            or len(run) >= GSO_MAX_SEGMENTS
            or total + n > GSO_MAX_BYTES
        ):
            runs.append(run)
            run = []
        if not run:
            size, total = n, 0
        run.append(data)
        total += n
    if run:
        runs.append(run)
    return runs


class BatchingDatagramTransport(asyncio.DatagramTransport):
    """A datagram transport over a bound non-blocking UDP socket (see the module doc).

    The protocol may define ``batch_started()`` and ``batch_ended()``; both are called
    around every batch of ``datagram_received`` calls.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.DatagramProtocol,
        batch: int = BATCH,
        gso: bool | None = None,
    ) -> None:
        super().__init__(extra={"socket": sock, "sockname": sock.getsockname()})
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self.batch = batch
        self.gso = gso_supported(sock) if gso is None else gso
        if not self.gso:
            log.info("UDP GSO unavailable on this kernel: one sendto per QUIC datagram")
        self._started: Callable[[], None] = getattr(protocol, "batch_started", _nothing)
        self._ended: Callable[[], None] = getattr(protocol, "batch_ended", _nothing)
        self._closing = False
        self._reading = False
        self._corked = 0
        self._held: dict[Address, list[bytes]] = {}
        # What the socket would not take yet: (datagrams, address), a run for GSO.
        self._backlog: deque[tuple[list[bytes], Address]] = deque()
        self.counts = {"received": 0, "batches": 0, "sent": 0, "sends": 0}

    def start(self) -> None:
        """Hand the transport to the protocol and start reading."""
        self._protocol.connection_made(self)
        self._reading = True
        self._loop.add_reader(self._sock.fileno(), self._read_ready)

    def pause_reading(self) -> None:
        """Stop reading datagrams (as asyncio's selector transports do); they queue in the
        socket's buffer, then the kernel drops them."""
        if not self._closing and self._reading:
            self._reading = False
            self._loop.remove_reader(self._sock.fileno())

    def resume_reading(self) -> None:
        if not self._closing and not self._reading:
            self._reading = True
            self._loop.add_reader(self._sock.fileno(), self._read_ready)

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    # ------------------------------------------------------------------ receiving
    def _read_ready(self) -> None:
        if self._closing:
            return
        sock, protocol, loop = self._sock, self._protocol, self._loop
        received = 0
        self._started()
        try:
            for _ in range(self.batch):
                try:
                    data, addr = sock.recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    protocol.error_received(exc)
                    break
                received += 1
                try:
                    protocol.datagram_received(data, addr)
                except Exception as exc:  # one bad datagram must not lose the batch
                    context = {"message": "datagram_received failed", "exception": exc}
                    loop.call_exception_handler(context)
                if self.is_closing():  # the protocol closed it
                    break
        finally:
            self._ended()
        self.counts["received"] += received
        self.counts["batches"] += 1

    # ------------------------------------------------------------------ sending
    def sendto(self, data: bytes | bytearray | memoryview, addr: Address = None) -> None:
        if self._closing:
            return
        payload = bytes(data)
        if self._corked:
            self._held.setdefault(addr, []).append(payload)
            return
        self._send([payload], addr)

    def cork(self) -> None:
        """Hold datagrams until the matching :meth:`uncork` (calls nest)."""
        self._corked += 1

    def uncork(self) -> None:
        """Send what was held, each address's datagrams in GSO runs."""
        self._corked -= 1
        if self._corked or not self._held:
            return
        held, self._held = self._held, {}
        for addr, datagrams in held.items():
            if self.gso and len(datagrams) > 1:
                for run in gso_runs(datagrams):
                    self._send(run, addr)
            else:
                for data in datagrams:
                    self._send([data], addr)

    def _send(self, run: list[bytes], addr: Address) -> None:
        if self._backlog:
            self._backlog.append((run, addr))
            return
        try:
            self._write(run, addr)
        except (BlockingIOError, InterruptedError):
            self._backlog.append((run, addr))
            self._loop.add_writer(self._sock.fileno(), self._write_ready)
        except OSError as exc:
            self._protocol.error_received(exc)

    def _write(self, run: list[bytes], addr: Address) -> None:
        if len(run) == 1:
            self._sock.sendto(run[0], addr)
        else:
            control = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(run[0])))]
            try:
                self._sock.sendmsg(run, control, 0, addr)
            except OSError as exc:
                if exc.errno not in _NO_GSO:
                    raise
                self.gso = False
                log.info("UDP GSO refused (%s): one sendto per QUIC datagram from now on", exc)
                for data in run:
                    self._sock.sendto(data, addr)
        self.counts["sent"] += len(run)
        self.counts["sends"] += 1

    def _write_ready(self) -> None:
        while self._backlog:
            run, addr = self._backlog[0]
            try:
                self._write(run, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
            self._backlog.popleft()
        self._loop.remove_writer(self._sock.fileno())
        if self._closing:
            self._finish()

    def get_write_buffer_size(self) -> int:
        return sum(len(d) for run, _ in self._backlog for d in run)

    # ------------------------------------------------------------------ closing
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        if not self._backlog:
            self._loop.call_soon(self._finish)

    def abort(self) -> None:
        self._backlog.clear()
        self.close()

    def _finish(self) -> None:
        if self._sock.fileno() == -1:
            return
        self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        self._protocol.connection_lost(None)


def _nothing() -> None:
    pass


async def open_udp(
    host: str, port: int, protocol: asyncio.DatagramProtocol, batch: int = BATCH
) -> BatchingDatagramTransport:
    """Bind a UDP socket to ``host``:``port`` (the first address that binds) for ``protocol``."""
    loop = asyncio.get_running_loop()
    infos: Sequence[tuple[Any, ...]]
    try:  # an address needs no resolver (whose thread pool would stay in the process)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        transport = BatchingDatagramTransport(loop, sock, protocol, batch)
        transport.start()
        return transport
    raise error or OSError(f"cannot bind UDP {host}:{port}")
