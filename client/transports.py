"""Byte-stream transports for the client: TCP, TLS, MPTCP and QUIC behind one small interface.

MQTT needs an ordered byte stream.  For TCP, TLS and MPTCP that is the socket; for QUIC it is
one client-initiated bidirectional stream (the single-stream mode EMQX also uses).  Each
transport calls ``on_data`` with received bytes and ``on_lost`` once when it is gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import socket
import ssl
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import SessionTicket

from quicmig.connection import IDLE_TIMEOUT, MigratingQuicConnection, ServerAddressChanged
from quicmig.follower import Follower
from quicmig.frames import Address

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    # A socket address as asyncio's DatagramTransport.sendto takes it (typeshed's).
    SocketAddress: TypeAlias = tuple[Any, ...] | str | ReadableBuffer

IPPROTO_MPTCP = getattr(socket, "IPPROTO_MPTCP", 262)
# Linux: queue ICMP errors (port unreachable) on unconnected UDP sockets too (ip(7), ipv6(7)).
_RECVERR = ((socket.IPPROTO_IP, 11), (socket.IPPROTO_IPV6, 25)) if sys.platform == "linux" else ()
ALPN = "mqtt"
TRANSPORTS = ("quic", "tcp", "tls", "mptcp")
DEFAULT_PORTS = {"quic": 14567, "tcp": 1883, "tls": 8883, "mptcp": 1885}

DataCallback = Callable[[bytes], None]
LostCallback = Callable[[Exception | None], None]
# What open_stream returns beside a QUIC stream: aioquic's connect(), exited to free the socket.
Closer = contextlib.AbstractAsyncContextManager[object]


class ByteStream(Protocol):
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class _StreamProtocol(asyncio.Protocol):
    def __init__(self, on_data: DataCallback, on_lost: LostCallback) -> None:
        self.on_data = on_data
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.target: tuple[str, int] | None = None  # which of the raced targets answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(exc)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _RetryRefusedSend(asyncio.DatagramTransport):
    """The client's UDP transport, resending a datagram refused for an earlier ICMP error.

    While ICMP errors are reported (IP_RECVERR, during the handshake only, see
    :meth:`QuicStreamProtocol.connection_made`), Linux reports a port-unreachable on the
    *next* send of the unconnected socket, whatever its destination, and asyncio then drops
    that datagram.  Once the handshake is done errors are no longer reported, so this only
    matters where IP_RECVERR could not be switched off again.

    A DatagramTransport that hands every call to ``inner``: the methods the base class
    defines (which would only raise NotImplementedError) explicitly, anything else through
    ``__getattr__``.
    """

    def __init__(self, inner: asyncio.DatagramTransport, proto: QuicStreamProtocol) -> None:
        super().__init__()
        self.inner = inner
        self.proto = proto

    def sendto(
        self, data: bytes | bytearray | memoryview, addr: SocketAddress | None = None
    ) -> None:
        self.proto.send_error = None
        self.inner.sendto(data, addr)
        if self._refused():
            self.proto.send_error = None
            self.inner.sendto(data, addr)  # the pending error was consumed: send again

    def _refused(self) -> bool:
        # A method of its own: in sendto mypy would keep ``send_error`` narrowed to None.
        return isinstance(self.proto.send_error, ConnectionRefusedError)

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.inner.get_protocol()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class QuicStreamProtocol(QuicConnectionProtocol):
    """aioquic client connection carrying MQTT on stream 0; one transmit per loop turn."""

    def __init__(self, *args: Any, follower: Follower | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # qmig's migration extension: advertise what this client's strategy understands.
        strategies = follower.strategy.advertised if follower is not None else 0
        MigratingQuicConnection.adopt(self._quic, strategies, follower)
        self.follower = follower
        self.on_migrated: Callable[[Address], None] = lambda address: None
        self.on_data: DataCallback = lambda data: None
        self.on_lost: LostCallback = lambda exc: None
        self.stream_id: int | None = None  # the control stream
        # Multi-stream mode: the application's data channels and their streams.
        self.on_channel_data: Callable[[int, bytes], None] = lambda channel, data: None
        self.on_channel_closed: Callable[[int], None] = lambda channel: None
        self._channel_streams: dict[int, int] = {}
        self._stream_channels: dict[int, int] = {}
        self.close_reason = ""  # why the connection was terminated, for error messages
        self._lost = False
        # Not _transmit_soon: that is a method of aioquic's QuicConnectionProtocol.
        self._flush_scheduled = False
        self._progress: asyncio.Event | None = None  # set per datagram while closing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.send_error: Exception | None = None
        # asyncio's UDP transport (create_datagram_endpoint's) has DatagramTransport's
        # methods without being one by class (_SelectorDatagramTransport): aioquic casts too.
        udp = cast(asyncio.DatagramTransport, transport)
        super().connection_made(_RetryRefusedSend(udp, self))
        # Without this a handshake with no listener behind the port waits for the timeout.
        self._udp_socket = transport.get_extra_info("socket")
        self._report_icmp_errors(True)

    def _report_icmp_errors(self, on: bool) -> None:
        """Switch IP_RECVERR (and IPV6_RECVERR) on or off for the client's UDP socket.

        It is on for the handshake only.  With it, the kernel queues every ICMP error on
        the socket's error queue, which nothing here reads (asyncio never asks for
        MSG_ERRQUEUE): the queue is charged to the receive buffer and, once that is full,
        every datagram from the broker is dropped, while epoll keeps reporting EPOLLERR and
        the event loop spins.  A connected client earns such errors whenever it probes an
        address where no broker listens (pool decoys, a destination still frozen) or sends
        to a broker that moved away.  Switching the option off also purges the queue.
        """
        sock = self._udp_socket
        for level, option in _RECVERR if sock is not None else ():
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, 1 if on else 0)

    def error_received(self, exc: Exception) -> None:
        """An ICMP error (e.g. port unreachable) during the handshake fails the connect.

        A datagram dropped by a local firewall fails its ``sendto`` with EPERM: that is
        loss, not an answer, and QUIC's retransmission deals with it.
        """
        if isinstance(exc, PermissionError):
            return
        self.send_error = exc
        waiter = self._connected_waiter
        if waiter is not None and not waiter.done():
            self._connected_waiter = None
            self.close_reason = str(exc)
            waiter.set_exception(exc)

    async def wait_connected(self) -> None:
        try:
            await super().wait_connected()
        except asyncio.CancelledError:
            # aioquic shields its waiter: once the close ends the handshake it gets an
            # exception no one awaits ("Future exception was never retrieved").
            waiter = self._connected_waiter
            if waiter is not None:
                waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise

    def start_stream(self) -> None:
        self.stream_id = self._quic.get_next_available_stream_id()

    @property
    def heard_at(self) -> float | None:
        """When the broker's last packet was processed (loop time), None before any."""
        quic = self._quic
        return quic.qmig_heard_at if isinstance(quic, MigratingQuicConnection) else None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived) and event.stream_id == self.stream_id:
            if event.data:
                self.on_data(event.data)
            if event.end_stream:
                self._gone(None)
        elif isinstance(event, StreamReset) and event.stream_id == self.stream_id:
            self._gone(ConnectionResetError("QUIC stream reset by the broker"))
        elif isinstance(event, (StreamDataReceived, StreamReset)):
            channel = self._stream_channels.get(event.stream_id)
            if channel is None:
                return
            if isinstance(event, StreamDataReceived) and event.data:
                self.on_channel_data(channel, event.data)
            if isinstance(event, StreamReset) or event.end_stream:
                del self._stream_channels[event.stream_id]
                del self._channel_streams[channel]
                self.on_channel_closed(channel)
        elif isinstance(event, ServerAddressChanged):
            self.on_migrated(event.address)
        elif isinstance(event, HandshakeCompleted):
            self._report_icmp_errors(False)  # connected: see _report_icmp_errors
        elif isinstance(event, ConnectionTerminated):
            if not self.close_reason:  # the first reason is the one that explains it
                self.close_reason = event.reason_phrase or f"error code {event.error_code:#x}"
            self._gone(ConnectionError(f"QUIC connection closed: {self.close_reason}"))

    def _gone(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self.on_lost(exc)
        if self._progress is not None:
            self._progress.set()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._gone(exc)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        if self._progress is not None:
            self._progress.set()
        if self._on_drained is not None:
            self._check_drained()  # acknowledgements arrive here

    def write(self, data: bytes) -> None:
        if self._lost or self.stream_id is None:
            return
        self._quic.send_stream_data(self.stream_id, data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def write_channel(self, channel: int, data: bytes) -> None:
        """Write on the data stream of ``channel``, opening it on first use (multi-stream)."""
        if self._lost or self.stream_id is None:
            return
        sid = self._channel_streams.get(channel)
        if sid is None:
            sid = self._quic.get_next_available_stream_id()
            self._channel_streams[channel] = sid
            self._stream_channels[sid] = channel
        self._quic.send_stream_data(sid, data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.transmit()

    def close(self, error_code: int = QuicErrorCode.NO_ERROR, reason_phrase: str = "") -> None:
        if not self._lost:
            if self.stream_id is not None:
                with contextlib.suppress(Exception):  # finished already (close_gracefully)
                    self._quic.send_stream_data(self.stream_id, b"", end_stream=True)
            super().close(error_code=error_code, reason_phrase=reason_phrase)
        self._gone(None)

    def transmit(self) -> None:
        transport = self._transport
        if transport is not None and transport.is_closing():
            # Closed without waiting out the closing period: aioquic's timer must not
            # keep firing into a closed socket.
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        super().transmit()

    def _sent_everything(self) -> bool:
        stream = self._quic._streams.get(self.stream_id) if self.stream_id is not None else None
        return stream is None or stream.sender.is_finished

    async def close_gracefully(self, timeout: float) -> None:
        """Finish the MQTT stream and close once the broker has all of it, or after ``timeout``.

        A plain CONNECTION_CLOSE drops stream data not yet acknowledged: a DISCONNECT lost
        on the way would never be resent, and the broker would publish the will of a client
        that left cleanly.  TCP's kernel keeps retransmitting after close(); here the FIN
        goes out at once and the close waits until the broker acknowledged the stream,
        ended it or ended the connection.  The closing period (three PTOs in aioquic)
        is not waited out: the broker already has everything and closes its side itself.
        """
        if self._lost or self.stream_id is None:
            self.close()
            self._closed.set()
            return
        with contextlib.suppress(Exception):  # the stream may be finished already
            self._quic.send_stream_data(self.stream_id, b"", end_stream=True)
        self.transmit()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        progress = self._progress = asyncio.Event()
        try:
            while not self._lost and not self._sent_everything():
                left = deadline - loop.time()
                if left <= 0:
                    break
                progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(progress.wait(), left)
        finally:
            self._progress = None
        self.close()
        self._closed.set()

    def abort(self) -> None:
        self.close()

    # ------------------------------------------------------------------ back-pressure
    # Hooks for a relay (``qmig bridge``) that must not buffer without bound either way:
    # the send side reports its backlog and when it drained, the receive side can stop
    # granting the peer flow-control credit (see MigratingQuicConnection.receive_window).
    _on_drained: Callable[[], None] | None = None
    _drain_low = 0

    def write_buffer_size(self) -> int:
        """MQTT stream bytes written, not yet acknowledged by the broker, unsent included.

        aioquic has no public size; its stream sender's offsets tell it (as the broker's
        ``_unacked`` does).
        """
        stream = self._quic._streams.get(self.stream_id) if self.stream_id is not None else None
        if stream is None:
            return 0
        return int(stream.sender._buffer_stop - stream.sender._buffer_start)

    def when_drained(self, low: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when acknowledgements bring the backlog down to ``low``.

        A writer that stopped its source above a high-water mark resumes it from there;
        only the latest callback is kept.  It is not called if the connection is lost.
        """
        self._drain_low = low
        self._on_drained = callback

    def _check_drained(self) -> None:
        callback = self._on_drained
        if callback is not None and self.write_buffer_size() <= self._drain_low:
            self._on_drained = None
            callback()

    def set_receive_window(self, window: int | None) -> None:
        """Bound the broker's credit on this connection's streams to ``window`` bytes.

        Call it before connecting, with the configuration's ``max_stream_data`` at most
        ``window`` (``open_stream(receive_window=...)`` does both): the initial credit is
        announced in the handshake and cannot be taken back.
        """
        self._migrating().receive_window = window

    def pause_reading(self) -> None:
        """Grant the broker no more credit on the MQTT stream: it blocks once the window
        is used.  Data channels (multi-stream mode) are not paused: the bridge has none."""
        if self.stream_id is not None:
            self._migrating().pause_receiving(self.stream_id)

    def resume_reading(self) -> None:
        """Grant credit again, at once: the broker may be waiting for it with data queued."""
        if self.stream_id is not None:
            self._migrating().resume_receiving(self.stream_id)
        if not self._lost:
            self.transmit()

    def request_migration(self, reason: int, hint: str) -> bool:
        """Send MIGRATION_TRIGGER; False if the broker does not take migration requests."""
        if self._lost or not self._migrating().trigger_migration(reason, hint):
            return False
        self.transmit()
        return True

    def _migrating(self) -> MigratingQuicConnection:
        quic = self._quic
        assert isinstance(quic, MigratingQuicConnection)  # adopted in __init__
        return quic


async def _connect_socket(host: str, port: int, mptcp: bool = False) -> socket.socket:
    """Connect a TCP socket, MPTCP if asked (plain TCP if the kernel refuses MPTCP).

    asyncio's ``sock_connect`` resolves with the socket's protocol number, which
    getaddrinfo rejects for IPPROTO_MPTCP, so resolve first and wait for writability here.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, address = infos[0]
    sock = None
    if mptcp:
        with contextlib.suppress(OSError):
            sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
    if sock is None:
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        if err:
            ready: asyncio.Future[None] = loop.create_future()
            # A cancelled attempt's future is done before its writer is removed: the
            # callback must not set it again (InvalidStateError in the event loop).
            loop.add_writer(sock.fileno(), _resolve, ready)
            try:
                await ready
            finally:
                loop.remove_writer(sock.fileno())
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
    except BaseException:  # refused, or the attempt was cancelled (timeout): no leak
        sock.close()
        raise
    return sock


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _connect_mptcp(host: str, port: int) -> socket.socket:
    return await _connect_socket(host, port, mptcp=True)


Target = tuple[str, int]
FALLBACK_GRACE = 0.05  # s the fallback may still answer after the primary refused


async def _connect_resending_syn(
    host: str, port: int, mptcp: bool, syn_timeout: float, timeout: float,
    fallback: Target | None = None,
) -> tuple[socket.socket, Target]:  # fmt: skip
    """Connect, starting over with a fresh SYN every ``syn_timeout`` s until ``timeout``.

    The kernel resends an unanswered SYN only after 1 s (then 3 s, ...); a server that drops
    SYNs while it is being restored answers within milliseconds once it is up.  With
    ``fallback`` (where the broker was before a Server Reference) every round races both,
    so neither a blackholed old address nor a slow new one delays the other; the primary
    wins a tie, and after it refuses the fallback has ``FALLBACK_GRACE`` s more.  Returns
    the socket and the target that answered.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    primary = (host, port)
    targets = [primary] + ([fallback] if fallback and fallback != primary else [])
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"no TCP connection within {timeout:g} s")
        round_end = loop.time() + min(syn_timeout, left)
        tasks = {asyncio.ensure_future(_connect_socket(h, p, mptcp)): (h, p) for h, p in targets}
        refused: BaseException | None = None
        try:
            while tasks and (wait := round_end - loop.time()) > 0:
                done, _ = await asyncio.wait(tasks, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                for task in sorted(done, key=lambda t: tasks[t] != primary):
                    target = tasks.pop(task)
                    if task.exception() is None:
                        return task.result(), target
                    if target == primary:
                        refused = task.exception()
                        round_end = min(round_end, loop.time() + FALLBACK_GRACE)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:  # a socket that connected meanwhile must not leak
                with contextlib.suppress(BaseException):
                    (await task).close()
        if refused is not None:
            raise refused  # the attempt failed at once: the caller backs off


def race_connect_blocking(
    primary: Target, fallback: Target | None, mptcp: bool = False, *,
    syn_timeout: float = 0.25, timeout: float = 3.0,
) -> tuple[socket.socket, Target]:  # fmt: skip
    """:func:`_connect_resending_syn` for a threaded client (paho's network thread).

    The race runs on an event loop of its own (on a thread of its own if the caller's
    thread already runs one); the socket comes back blocking, with ``timeout`` set as
    ``socket.create_connection`` leaves it.
    """

    def race() -> tuple[socket.socket, Target]:
        return asyncio.run(_connect_resending_syn(*primary, mptcp, syn_timeout, timeout, fallback))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        sock, target = race()
    else:
        with concurrent.futures.ThreadPoolExecutor(1, "qmig-connect") as pool:
            sock, target = pool.submit(race).result()
    sock.setblocking(True)
    sock.settimeout(timeout)
    return sock, target


def quic_configuration(
    cafile: str | None = None,
    insecure: bool = False,
    server_name: str | None = None,
    client_cert: tuple[str, str] | None = None,
    session_ticket: SessionTicket | None = None,
) -> QuicConfiguration:
    """The client's QUIC settings; ``client_cert`` is (certificate file, key file).

    ``session_ticket``: a ticket from an earlier connection to the same server name, offered
    to resume that TLS session (aioquic offers it only while valid and for that name).
    """
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        max_data=16 << 20,
        max_stream_data=8 << 20,
        idle_timeout=IDLE_TIMEOUT,  # as the broker's: MQTT keep alive decides
        server_name=server_name,
    )
    if insecure:
        config.verify_mode = ssl.CERT_NONE
    elif cafile:
        config.load_verify_locations(cafile)
    if client_cert is not None:
        config.load_cert_chain(*client_cert)
    config.session_ticket = session_ticket
    return config


async def open_stream(
    transport: str,
    host: str,
    port: int,
    on_data: DataCallback,
    on_lost: LostCallback,
    cafile: str | None = None,
    insecure: bool = False,
    timeout: float = 10.0,
    follower: Follower | None = None,
    syn_timeout: float | None = None,
    receive_window: int | None = None,
    fallback: tuple[str, int] | None = None,
    client_cert: tuple[str, str] | None = None,
    session_ticket: SessionTicket | None = None,
    on_session_ticket: Callable[[SessionTicket], None] | None = None,
) -> tuple[ByteStream, Closer | None]:
    """Connect and return (stream, closer); ``closer`` is an async context to exit on close.

    ``syn_timeout`` (TCP, TLS, MPTCP): start the TCP connection over after that long
    without an answer instead of waiting for the kernel's SYN retransmission; with
    ``fallback`` as well, race a connection to that address too (the stream's ``target``
    says which one answered).
    ``client_cert`` (TLS, QUIC): (certificate file, key file) to present to the broker.
    ``receive_window`` (QUIC): bound the broker's stream credit to that many bytes beyond
    what was received, so :meth:`QuicStreamProtocol.pause_reading` holds the broker back.
    ``session_ticket`` (QUIC): offer it to resume a TLS session; ``on_session_ticket`` gets
    each ticket the broker issues, to offer on the next connect.
    """
    loop = asyncio.get_running_loop()
    if transport in ("tcp", "mptcp", "tls"):
        ssl_ctx = None
        if transport == "tls":
            ssl_ctx = ssl.create_default_context(cafile=cafile)
            if insecure:
                ssl_ctx.check_hostname = False
                ssl_ctx.verify_mode = ssl.CERT_NONE
            if client_cert is not None:
                ssl_ctx.load_cert_chain(*client_cert)
        sock = None
        mptcp = transport == "mptcp"
        target = (host, port)
        if syn_timeout is not None:
            sock, target = await _connect_resending_syn(host, port, mptcp, syn_timeout, timeout,
                                                        fallback)  # fmt: skip
        elif mptcp:
            sock = await asyncio.wait_for(_connect_mptcp(host, port), timeout)
        factory = lambda: _StreamProtocol(on_data, on_lost)  # noqa: E731
        if sock is not None:
            tls: dict[str, Any] = {}
            if ssl_ctx is not None:
                tls = {"ssl": ssl_ctx, "server_hostname": target[0]}
            _, proto = await asyncio.wait_for(
                loop.create_connection(factory, sock=sock, **tls), timeout
            )
        else:
            _, proto = await asyncio.wait_for(
                loop.create_connection(factory, host, port, ssl=ssl_ctx), timeout
            )
        assert proto.transport is not None  # set by connection_made
        raw = proto.transport.get_extra_info("socket")
        if raw is not None:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proto.target = target
        return proto, None
    if transport == "quic":
        config = quic_configuration(
            cafile, insecure, server_name=host, client_cert=client_cert,
            session_ticket=session_ticket,
        )  # fmt: skip
        if receive_window is not None:
            config.max_stream_data = receive_window  # the initial credit, in the handshake
        made: list[QuicStreamProtocol] = []

        def create_protocol(*args: Any, **kwargs: Any) -> QuicStreamProtocol:
            made.append(QuicStreamProtocol(*args, follower=follower, **kwargs))
            if receive_window is not None:
                made[-1].set_receive_window(receive_window)
            return made[-1]

        manager = quic_connect(
            host, port, configuration=config, create_protocol=create_protocol,
            session_ticket_handler=on_session_ticket,
        )  # fmt: skip
        try:
            quic = await asyncio.wait_for(manager.__aenter__(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no QUIC handshake within {timeout:g} s") from None
        except ConnectionError as exc:
            why = made[0].close_reason if made else ""
            raise ConnectionError(f"QUIC handshake failed: {why or exc or 'closed'}") from exc
        assert isinstance(quic, QuicStreamProtocol)  # made by create_protocol
        quic.on_data = on_data
        quic.on_lost = on_lost
        quic.start_stream()
        return quic, manager
    raise ValueError(f"unknown transport {transport!r}; choose from {', '.join(TRANSPORTS)}")
