"""The asyncio edge of the broker: TCP, TLS and MPTCP listeners around the sans-I/O engine.

Output is batched: connections that have something to send are marked dirty, and one
callback per event-loop turn writes each of them once, however many packets piled up.
Retained messages on subscribe follow in batches, one per turn (``Broker.step_replays``),
so other clients' packets are handled between them.
Listeners can be closed and reopened at run time (``close_listener``/``open_listener``):
CRIU cannot checkpoint MPTCP sockets, so a migrating broker closes that one first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from mqttproto.reasons import ReasonCode
from quicmig.frames import Address

from .config import BrokerConfig, ConfigError
from .connection import BrokerConnection
from .control import (
    ControlError,
    ControlServer,
    default_token_file,
    generate_token_file,
)
from .engine import Broker
from .memory import Trimmer
from .migration_api import MigrationAPI
from .observe import Observer
from .store import StoreError

if TYPE_CHECKING:
    from quicmig.tickets import TicketStore

    from .metrics import MetricsServer
    from .persist import SqliteStore

log = logging.getLogger("qmig.broker")

TICK_SECONDS = 0.5
# A tick this much later than due means the process was frozen (a checkpoint) or starved.
STALL_SECONDS = 2.0
WRITE_HIGH_WATER = 1 << 20  # bytes buffered for one client before its QoS 0 is dropped
CLOSE_LINGER = 1.0  # seconds a closing connection waits for the peer's FIN before aborting


class StreamConnection(asyncio.Protocol):
    """Carries one MQTT byte stream between a transport and a :class:`BrokerConnection`."""

    __slots__ = ("_linger", "conn", "kind", "server", "transport")

    def __init__(self, server: BrokerServer, kind: str) -> None:
        self.server = server
        self.kind = kind
        self.transport: asyncio.Transport | None = None
        self.conn: BrokerConnection | None = None
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if peer else "?"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = self.server.broker.open_connection(self.kind, peer_text)
        self.conn.io = self
        observer = self.server.observer
        if observer is not None:
            observer.connection(self)

    def data_received(self, data: bytes) -> None:
        assert self.conn is not None  # set by connection_made
        self.conn.receive_data(data)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        if self.conn is not None:
            self.conn.connection_lost()
            self.conn.io = None

    def pause_writing(self) -> None:
        assert self.conn is not None  # set by connection_made
        self.conn.set_writable(False)

    def resume_writing(self) -> None:
        assert self.conn is not None
        self.conn.set_writable(True)

    def write(self, data: bytes) -> None:
        assert self.transport is not None  # set by connection_made
        self.transport.write(data)

    def write_channel(self, channel: int, data: bytes) -> None:
        """A byte stream has only channel 0 (the engine gives it no other): all goes there."""
        self.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close after the last packet, with a FIN, never a reset.

        Closing a socket with unread input makes the kernel answer with a RST, and the peer
        then drops what it had not read yet: the DISCONNECT carrying the reason and Server
        Reference included.  So the connection half-closes (TLS cannot: it waits for the
        peer instead), keeps reading and discarding (the engine ignores a closing
        connection's input) until the peer closes too, and aborts after ``CLOSE_LINGER``.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:  # the peer reset it meanwhile (ENOTCONN): nothing to linger for
                transport.abort()
                return
        loop = asyncio.get_running_loop()
        self._linger = loop.call_later(CLOSE_LINGER, transport.abort)


@dataclass
class Listener:
    kind: str
    host: str
    port: int
    server: Any = None  # asyncio.Server, or aioquic's QuicServer for "quic"

    @property
    def address(self) -> tuple[str, int] | None:
        if self.server is None:
            return None
        if self.kind == "quic":
            transport = self.server._transport  # aioquic keeps its UDP transport here
            sockname = transport.get_extra_info("sockname") if transport else None
        else:
            sockets = self.server.sockets
            sockname = sockets[0].getsockname() if sockets else None
        return (sockname[0], sockname[1]) if sockname else None

    @property
    def bound(self) -> str:
        address = self.address
        if address is None:
            return f"{self.host}:{self.port} (closed)"
        return f"{address[0]}:{address[1]}"


class BrokerServer:
    """Owns the engine, the listeners and the timers of one broker process."""

    def __init__(self, config: BrokerConfig, broker: Broker | None = None) -> None:
        self.config = config
        self.store: SqliteStore | None = None
        if broker is None:
            if config.persistence:
                from .persist import open_store  # sqlite3 only where persistence is on

                self.store = open_store(config.persistence, config.persistence_sync == "strict")
            broker = Broker(config, store=self.store, version=_version())
            if self.store is not None:
                try:
                    broker.restore(time.time())
                except StoreError:
                    self.store.close()
                    raise
        elif broker.store.journaling:  # a durable store: this server commits it
            self.store = cast("SqliteStore", broker.store)
        self.broker = broker
        self.broker.wakeup = self._schedule_flush
        self.broker.ack_wakeup = self._schedule_commit
        self._commit_scheduled = False
        self._committer: asyncio.TimerHandle | None = None
        self.listeners: dict[str, Listener] = {}
        self._flush_scheduled = False
        self._replay_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._tick_due = 0.0
        self._ssl: ssl.SSLContext | None = None
        self._quic_touched: set[Any] = set()
        self.quic_protocols: set[Any] = set()  # live BrokerQuicProtocol objects
        # TLS session tickets of the QUIC listener (broker.quic), in this process's memory:
        # they move with a migrated broker, so its clients resume there too.
        self.quic_tickets: TicketStore | None = None
        self.migration = MigrationAPI(
            self, [Address.parse(a) for a in config.pool_addresses_text()]
        )
        self.observer: Observer | None = None  # measurement's hook (broker.observe)
        self.control: ControlServer | None = None  # not a listener: CRIU keeps it open
        self.metrics: MetricsServer | None = None  # --metrics-port (broker.metrics)
        # malloc_trim after QUIC handshakes (broker.memory); made with the loop in start().
        self.trimmer: Trimmer | None = None

    # ----------------------------------------------------------------- output
    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    @property
    def flush_pending(self) -> bool:
        return self._flush_scheduled

    def flush(self) -> None:
        """Write everything the engine produced since the last turn, one write per client.

        A connection whose transport fails here is aborted alone: an error must never leave
        the rest of the batch unflushed (they would not be queued again: a connection is
        marked dirty only when its output goes from empty to not empty).
        """
        self._flush_scheduled = False
        for conn in self.broker.take_dirty():
            io = conn.io
            if io is None:
                continue
            try:
                data = conn.data_to_send()
                if data:
                    io.write(data)
                if conn.has_side_data:
                    for channel, chunk in conn.side_data_to_send().items():
                        io.write_channel(channel, chunk)
                if conn.closing:
                    if conn.abort:
                        io.abort()
                    else:
                        io.close()
            except Exception as exc:
                conn.warn_once("flush", "aborting %s (%s): its transport failed: %r",
                               conn.client_id or conn.peer, conn.transport, exc)  # fmt: skip
                with contextlib.suppress(Exception):
                    io.abort()
        if self._quic_touched:
            touched, self._quic_touched = self._quic_touched, set()
            for proto in touched:
                proto.transmit()
        if self.broker.replaying and not self._replay_scheduled and self._loop is not None:
            # The next batch of retained messages waits for the next turn: what arrived
            # meanwhile (other clients' packets) is handled first.
            self._replay_scheduled = True
            self._loop.call_soon(self._replay)

    def _replay(self) -> None:
        self._replay_scheduled = False
        self.broker.step_replays()
        self.flush()

    def loop_time(self) -> float:
        """The clock aioquic's connections run on."""
        assert self._loop is not None
        return self._loop.time()

    def quic_touched(self, proto: Any) -> None:
        """A QUIC connection got stream data this turn: transmit it once, after the flush."""
        self._quic_touched.add(proto)

    # ----------------------------------------------------------------- durability
    def _schedule_commit(self) -> None:
        """Strict mode: acks are held; commit at the end of this event-loop turn."""
        if not self._commit_scheduled and self._loop is not None:
            self._commit_scheduled = True
            self._loop.call_soon(self.commit)

    def commit(self) -> None:
        """Write the store's journal, then send the acks it made durable (strict mode)."""
        self._commit_scheduled = False
        store = self.store
        if store is None:
            return
        broker = self.broker
        acks = broker.take_acks()
        try:
            store.commit(broker.now(), time.time())
        except StoreError as exc:
            # Nothing is acknowledged that is not on disk: the clients resend them.
            log.error("%s; closing %d connections with unacknowledged messages", exc, len(acks))
            for conn in {conn for conn, _, _ in acks}:
                conn.close(ReasonCode.UNSPECIFIED_ERROR)
            return
        if acks:
            broker.release_acks(acks)

    def _periodic_commit(self) -> None:
        self.commit()
        assert self._loop is not None
        self._committer = self._loop.call_later(self.config.persistence_interval,
                                                self._periodic_commit)  # fmt: skip

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        late = now - self._tick_due
        if late > STALL_SECONDS:
            # Frozen for a checkpoint (CRIU tells no one) or starved: nobody could be heard
            # meanwhile, and the first thing after the thaw must not be keep-alive verdicts.
            log.info("ticked %.1f s late (frozen or starved): keep alive allows for it", late)
            self.broker.allow_for_stall(late)
        self.broker.tick()
        self._tick_due = now + TICK_SECONDS
        self._ticker = self._loop.call_later(TICK_SECONDS, self._tick)

    # ----------------------------------------------------------------- listeners
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.trimmer = Trimmer(self._loop)
        cfg = self.config
        if cfg.tcp_port:
            self.listeners["tcp"] = Listener("tcp", cfg.host, cfg.tcp_port)
        if cfg.tls_enabled:
            self._ssl = self._make_ssl_context()
            self.listeners["tls"] = Listener("tls", cfg.host, cfg.tls_port)
        elif cfg.tls_port:
            log.info("TLS listener off: no --cert/--key given")
        if cfg.mptcp_port:
            self.listeners["mptcp"] = Listener("mptcp", cfg.host, cfg.mptcp_port)
        if cfg.quic_enabled:
            self.listeners["quic"] = Listener("quic", cfg.host, cfg.quic_port)
        elif cfg.quic_port:
            log.info("QUIC listener off: no --cert/--key given")
        for kind in list(self.listeners):
            await self.open_listener(kind)
        self._warn_if_exposed()
        if cfg.control_port:
            self.control = ControlServer(
                self.migration, cfg.control_host, cfg.control_port, self._control_token()
            )
            host, port = await self.control.start()
            log.info("control API on %s:%s", host, port)
        if cfg.orchestrator_url and cfg.orchestrator_token:
            from .forward import TriggerForwarder

            self.migration.forwarder = TriggerForwarder(
                cfg.orchestrator_url, cfg.orchestrator_token, cfg.name
            )
            log.info("migration triggers go to %s", self.migration.forwarder.url)
        if cfg.metrics_port:
            from .metrics import MetricsServer

            self.metrics = MetricsServer(self, cfg.metrics_host, cfg.metrics_port)
            host, port = self.metrics.start()
            log.info("Prometheus metrics on http://%s:%s/metrics", host, port)
        self._tick_due = self._loop.time() + TICK_SECONDS
        self._ticker = self._loop.call_later(TICK_SECONDS, self._tick)
        if self.store is not None:
            self._committer = self._loop.call_later(cfg.persistence_interval,
                                                    self._periodic_commit)  # fmt: skip

    def _control_token(self) -> str:
        """The configured token, or one generated into the token file (see BrokerConfig)."""
        cfg = self.config
        if cfg.control_token:
            return cfg.control_token
        if not cfg.control_token_file:
            raise ConfigError("control_port needs a token (validate the config first)")
        try:
            cfg.control_token = generate_token_file(cfg.control_token_file)
        except ControlError as exc:
            raise ConfigError(str(exc)) from exc
        path = cfg.control_token_file
        found = Path(path) == default_token_file(cfg.control_port)
        log.info("control API token generated in %s (mode 0600); %s", path,
                 f"qmig ctl --port {cfg.control_port} finds it (as this user)" if found
                 else f"qmig ctl --token-file {path}")  # fmt: skip
        return cfg.control_token

    def _warn_if_exposed(self) -> None:
        """One line when clients on the network may connect without logging in."""
        cfg = self.config
        if not self.listeners or not cfg.allow_anonymous or _is_loopback(cfg.host):
            return
        ports = ", ".join(f"{kind} {ln.bound}" for kind, ln in self.listeners.items())
        log.warning(
            "listening on %s (%s) with anonymous clients allowed: anyone who reaches it may "
            "connect without a password; set --password-file and --no-allow-anonymous, an "
            "--acl-file, or --host 127.0.0.1 (README: Before putting qmig on a network)",
            cfg.host, ports,
        )  # fmt: skip

    def _make_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        assert self.config.cert is not None  # only with tls_enabled: cert and key are set
        ctx.load_cert_chain(self.config.cert, self.config.key)
        if self.config.cafile:
            ctx.load_verify_locations(self.config.cafile)
            if self.config.require_certificate:
                ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    async def open_listener(self, kind: str) -> Listener:
        """(Re)open one listener, e.g. after a checkpoint/restore closed it."""
        listener = self.listeners[kind]
        if listener.server is not None:
            return listener
        if kind == "quic":
            from .quic import start_quic_listener

            assert self.config.cert and self.config.key
            listener.server = await start_quic_listener(
                self, listener.host, listener.port, self.config.cert, self.config.key
            )
            log.info("listening quic %s (UDP, ALPN mqtt)", listener.bound)
            return listener
        loop = asyncio.get_running_loop()
        sock = self._listening_socket(kind, listener.host, listener.port)
        listener.server = await loop.create_server(
            lambda: StreamConnection(self, kind),
            sock=sock,
            ssl=self._ssl if kind == "tls" else None,
            backlog=1024,
        )
        log.info("listening %s %s", kind, listener.bound)
        return listener

    async def close_listener(self, kind: str) -> None:
        """Stop accepting on one listener; established connections are left alone."""
        listener = self.listeners.get(kind)
        if listener is None or listener.server is None:
            return
        listener.server.close()
        if kind != "quic":
            await listener.server.wait_closed()
        listener.server = None
        log.info("closed %s listener", kind)

    def _listening_socket(self, kind: str, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        proto = 0
        if kind == "mptcp":
            proto = getattr(socket, "IPPROTO_MPTCP", 262)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
        except OSError as exc:
            if kind != "mptcp":
                raise
            log.warning("MPTCP refused by the kernel (%s): mptcp listener uses plain TCP", exc)
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    # ----------------------------------------------------------------- shutdown
    async def stop(self) -> None:
        """Close listeners, tell MQTT 5 clients the server is shutting down, flush."""
        for kind in list(self.listeners):
            await self.close_listener(kind)
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)  # waits for its thread's poll
            self.metrics = None
        if self._ticker is not None:
            self._ticker.cancel()
        if self.trimmer is not None:
            self.trimmer.cancel()
        if self._committer is not None:
            self._committer.cancel()
        self.commit()  # what the clients were told before they are disconnected
        for conn in list(self.broker.connections):
            conn.close(ReasonCode.SERVER_SHUTTING_DOWN)
        self.flush()
        await asyncio.sleep(0.05)
        if self.store is not None:
            self.commit()  # the sessions as their connections ended: offline, expiring
            self.store.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any address


def _version() -> str:
    """qmig's version, from the package (importlib.metadata would cost the broker 2.3 MB)."""
    from . import __version__

    return f"qmig {__version__}"


async def serve(config: BrokerConfig) -> None:
    server = BrokerServer(config)
    await server.start()
    print("qmig broker: ready", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop()


def run(config: BrokerConfig) -> int:
    """Entry point of ``qmig broker``."""
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="qmig broker: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(config))
    except StoreError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
