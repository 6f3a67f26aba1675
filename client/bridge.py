"""``qmig bridge``: plain MQTT over local TCP in, one QUIC connection per client out.

Any MQTT client (paho, mosquitto_pub/sub, device firmware behind a gateway) connects to the
bridge over TCP; the bridge opens a QUIC connection to the broker for it and copies bytes
both ways without parsing MQTT.  The QUIC leg is what survives address changes: it follows a
migrating broker like qmig's own client does (``--follow``), so a plain client behind the
bridge keeps its TCP connection and its session when the broker's container moves.

Back-pressure works both ways, so the bridge's memory stays bounded and a fast client cannot
starve the others.  A client that publishes faster than its QUIC leg carries is not read
while more than ``QUIC_HIGH_WATER`` bytes wait for the broker's acknowledgement.  A client
that reads slowly fills its TCP write buffer; past ``TCP_HIGH_WATER`` its QUIC leg grants
the broker no more flow-control credit (a bounded ``RECEIVE_WINDOW`` instead of aioquic's
ever-doubling one), the broker's stream blocks and the broker treats the client as it
treats a slow TCP client: QoS 0 dropped for it alone, QoS 1 and 2 queued in its session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from quicmig.follower import Follower, Strategy
from quicmig.frames import Address

from .transports import Closer, QuicStreamProtocol, open_stream

log = logging.getLogger("qmig.bridge")

QUIC_HIGH_WATER = 1 << 20  # bytes unacknowledged on a QUIC leg before its client is not read
QUIC_LOW_WATER = 256 << 10  # ... and read again
TCP_HIGH_WATER = 1 << 20  # bytes queued for a TCP client before the broker gets no credit
RECEIVE_WINDOW = 1 << 20  # the broker's stream credit beyond what a QUIC leg received
CLOSE_TIMEOUT = 2.0  # seconds a leg may take to deliver a departing client's last bytes


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest else default_port
    host, _, port = text.rpartition(":")
    if not host:
        return text, default_port
    return host, int(port)


class BridgedClient(asyncio.Protocol):
    """One local TCP client and its QUIC leg to the broker."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.tcp: asyncio.Transport | None = None
        self.quic: QuicStreamProtocol | None = None
        self.closer: Closer | None = None
        self.backlog: list[bytes] = []
        self.closed = False
        self.tcp_full = False  # the TCP client reads too slowly: the broker gets no credit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.tcp = transport
        self.tcp.set_write_buffer_limits(high=TCP_HIGH_WATER)
        self.tcp.pause_reading()  # until the QUIC leg is up
        task = asyncio.get_running_loop().create_task(self._open())
        self.bridge.tasks.add(task)
        task.add_done_callback(self.bridge.tasks.discard)

    async def _open(self) -> None:
        b = self.bridge
        try:
            stream, self.closer = await open_stream(
                "quic", b.host, b.port, self._from_broker, self._broker_lost, b.cafile,
                b.insecure, follower=Follower(Strategy(b.follow)), receive_window=RECEIVE_WINDOW,
            )  # fmt: skip
            assert isinstance(stream, QuicStreamProtocol)
            self.quic = stream
            self.quic.on_migrated = b.moved
        except (TimeoutError, OSError, ConnectionError) as exc:
            log.warning("cannot reach broker %s:%s over QUIC: %s", b.host, b.port, exc)
            self.close()
            return
        if self.closed:
            self.quic.close()
            self._release()
            return
        if self.tcp_full:
            self.quic.pause_reading()
        for chunk in self.backlog:
            self.quic.write(chunk)
        self.backlog.clear()
        if not self._quic_full():
            assert self.tcp is not None
            self.tcp.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.quic is None:
            self.backlog.append(data)
            return
        self.quic.write(data)
        if self._quic_full():
            assert self.tcp is not None
            self.tcp.pause_reading()

    def _quic_full(self) -> bool:
        """Over the high-water mark: stop reading the client until the broker acknowledged.

        Without this aioquic's send buffer takes all a flooding client sends, and the
        bridge's time goes into that one leg while the others starve.
        """
        assert self.quic is not None
        if self.quic.write_buffer_size() <= QUIC_HIGH_WATER:
            return False
        self.quic.when_drained(QUIC_LOW_WATER, self._quic_drained)
        return True

    def _quic_drained(self) -> None:
        if not self.closed and self.tcp is not None:
            self.tcp.resume_reading()

    def pause_writing(self) -> None:
        """The TCP client reads too slowly: let the broker feel it through flow control."""
        self.tcp_full = True
        if self.quic is not None:
            self.quic.pause_reading()

    def resume_writing(self) -> None:
        self.tcp_full = False
        if self.quic is not None:
            self.quic.resume_reading()

    def _from_broker(self, data: bytes) -> None:
        if self.tcp is not None and not self.tcp.is_closing():
            self.tcp.write(data)

    def _broker_lost(self, exc: Exception | None) -> None:
        log.info("broker side closed%s", f": {exc}" if exc else "")
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(graceful=True)

    def close(self, graceful: bool = False) -> None:
        """Close both legs; ``graceful`` (the TCP client left) first delivers what it sent.

        A client's last bytes (its DISCONNECT, typically) may still be in the QUIC leg's
        buffer or in a lost datagram: a plain close would drop them and the broker would
        publish the will of a client that left cleanly.
        """
        if self.closed:
            return
        self.closed = True
        if self.tcp is not None:
            self.tcp.close()
        if self.quic is not None:
            if graceful:
                self._release(self.quic.close_gracefully(CLOSE_TIMEOUT))
            else:
                self.quic.close()
                self._release()
        self.bridge.clients.discard(self)

    def _release(self, finish: Coroutine[Any, Any, None] | None = None) -> None:
        """Exit the QUIC connection's context (after ``finish``), which frees the socket."""
        closer, self.closer = self.closer, None
        if closer is None:
            if finish is not None:
                finish.close()
            return

        async def release() -> None:
            with contextlib.suppress(Exception):
                if finish is not None:
                    await finish
                await closer.__aexit__(None, None, None)

        task = asyncio.get_running_loop().create_task(release())
        self.bridge.tasks.add(task)
        task.add_done_callback(self.bridge.tasks.discard)


class Bridge:
    """Local TCP in, QUIC out; each QUIC leg follows the broker when it migrates.

    ``follow`` is the strategy of every QUIC leg (see :mod:`quicmig.follower`).  When a
    leg follows the broker to a new address, new local clients are bridged there too.
    """

    def __init__(
        self, host: str, port: int, cafile: str | None = None, insecure: bool = False,
        follow: str = "proactive",
    ) -> None:  # fmt: skip
        self.host = host
        self.port = port
        self.cafile = cafile
        self.insecure = insecure
        self.follow = Strategy(follow).value
        self.moves: list[Address] = []
        self.clients: set[BridgedClient] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.AbstractServer | None = None

    def moved(self, address: Address) -> None:
        """A QUIC leg validated the broker's new address: bridge new clients there."""
        if (address.host, address.port) != (self.host, self.port):
            log.info("the broker moved to %s: new clients are bridged there", address)
            self.host, self.port = address.host, address.port
            self.moves.append(address)

    def _accept(self) -> BridgedClient:
        client = BridgedClient(self)
        self.clients.add(client)
        return client

    async def start(self, listen_host: str, listen_port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._accept, listen_host, listen_port)
        sockname = self.server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for client in list(self.clients):
            client.close()
        await asyncio.sleep(0)
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=2.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default="127.0.0.1:1884",
        metavar="HOST:PORT",
        help="local TCP address for plain MQTT clients (default 127.0.0.1:1884)",
    )
    parser.add_argument(
        "--to",
        required=True,
        metavar="HOST:PORT",
        help="the broker's QUIC address (port default 14567)",
    )
    parser.add_argument("--cafile", default=None, help="CA certificate of the broker")
    parser.add_argument("--insecure", action="store_true", help="do not verify the broker")
    parser.add_argument(
        "--follow",
        default="proactive",
        choices=[s.value for s in Strategy],
        help="how each QUIC leg follows a migrating broker (default proactive)",
    )
    parser.add_argument("--log-level", default="INFO")  # fmt: skip


async def _serve(args: argparse.Namespace) -> None:
    host, port = parse_hostport(args.to, 14567)
    bridge = Bridge(host, port, args.cafile, args.insecure, args.follow)
    lhost, lport = parse_hostport(args.listen, 1884)
    bound = await bridge.start(lhost, lport)
    print(f"qmig bridge: listening tcp {bound[0]}:{bound[1]} -> quic {host}:{port}; ready",
          file=sys.stderr, flush=True)  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await bridge.stop()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="qmig bridge: %(message)s")
    try:
        asyncio.run(_serve(args))
    except OSError as exc:
        print(f"qmig bridge: {exc}", file=sys.stderr)
        return 1
    return 0
