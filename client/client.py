"""An asyncio MQTT client over QUIC, TCP, TLS or MPTCP, on the shared sans-I/O protocol.

    async with Client("127.0.0.1", transport="quic", cafile="ca.crt") as client:
        await client.subscribe("sensors/#", qos=1)
        await client.publish("sensors/t1", b"21.5", qos=1)
        async for message in client.messages():
            print(message.topic, message.payload)

The client reconnects by itself when the connection drops and resumes its session (clean
start off, session expiry > 0); a DISCONNECT or CONNACK carrying a Server Reference
(0x9C/0x9D) sends it to the named server.  Unacknowledged QoS 1/2 messages are resent after
reconnecting, so none is lost.  Over QUIC the connection follows a migrating broker without
reconnecting; it reconnects (resuming its TLS session) only when the connection is really
gone: the broker restarted, or it stayed silent for a whole keep alive interval.

A connection is dead when nothing at all came from the broker for ``keep_alive`` seconds:
the client sends PINGREQ once it has heard nothing for half the interval (also while it is
publishing, since a broker that takes PUBLISHes but answers nothing is not serving), and the
PINGRESP, like any packet, proves the broker alive; over QUIC so does any packet of the
connection (an ACK: QUIC runs in the broker's own process), for ``move_grace`` seconds at
most without an MQTT answer.  While a QUIC client knows the broker is moving (a
SERVER_MIGRATION not yet followed, or probing for the broker), the verdict waits
``move_grace`` seconds longer: a broker frozen for a big checkpoint over a slow link is
silent for tens of seconds, and its connections are intact.  A connection lost during such
a move reconnects to the announced address first.  A QUIC connection whose state diverged
from the broker's (a migration rolled back after the destination had served) hears nothing,
and is replaced by a fresh one instead of hanging on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aioquic.tls import SessionTicket

from mqttproto.client import (
    ClientProtocol,
    ClientSession,
    Connected,
    ConnectionRefused,
    Event,
    MessageReceived,
    PingResponse,
    ProtocolViolation,
    PublishCompleted,
    ServerDisconnected,
    Subscribed,
    Unsubscribed,
)
from mqttproto.errors import MQTTError
from mqttproto.packets import MQTT_5, Publish, Subscription, Will
from mqttproto.properties import Properties, PropertyId
from mqttproto.reasons import ReasonCode
from quicmig.follower import Follower, Strategy
from quicmig.frames import MAX_HINT, TRIGGER_OPERATOR, Address

from .transports import (
    DEFAULT_PORTS,
    TRANSPORTS,
    ByteStream,
    Closer,
    QuicStreamProtocol,
    open_stream,
)

log = logging.getLogger("qmig.client")
P = PropertyId
Message = Publish


RECONNECT_ATTEMPT_TIMEOUT = 3.0  # seconds one reconnect attempt may take
# A reconnect's SYN is resent after this, not after the kernel's 1 s initial RTO: a server
# that is being restored drops SYNs (CRIU's network lock), then answers within milliseconds.
RECONNECT_SYN_TIMEOUT = 0.25
STREAM_MODES = ("single", "per-topic", "per-qos")
MAX_DATA_STREAMS = 64
# A clean QUIC disconnect waits at most this long for the broker to acknowledge DISCONNECT.
CLOSE_TIMEOUT = 2.0
FALLBACK_AFTER = 5.0  # seconds a referenced server may stay unreachable before falling back


class ClientError(Exception):
    """A request the broker refused or a connection that could not be made."""

    def __init__(self, message: str, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


def parse_reference(reference: str, default_port: int) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` (first of a space-separated list)."""
    first = reference.split()[0]
    if first.startswith("["):
        host, _, rest = first[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if first.count(":") == 1:
        host, port = first.split(":")
        return host, int(port)
    return first, default_port


class Client:
    def __init__(
        self,
        host: str,
        port: int | None = None,
        *,
        transport: str = "quic",
        version: int = MQTT_5,
        client_id: str = "",
        clean_start: bool = True,
        session_expiry: int = 0,
        keep_alive: int = 60,
        will: Will | None = None,
        username: str | None = None,
        password: str | bytes | None = None,
        cafile: str | None = None,
        insecure: bool = False,
        certfile: str | None = None,
        keyfile: str | None = None,
        reconnect: bool = True,
        reconnect_delay: tuple[float, float] = (0.05, 2.0),
        connect_timeout: float = 10.0,
        properties: Properties | None = None,
        follow: str = "proactive",
        streams: str = "single",
        session_ticket: SessionTicket | None = None,
        move_grace: float = 120.0,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; choose from {TRANSPORTS}")
        if streams not in STREAM_MODES:
            raise ValueError(f"unknown streams mode {streams!r}; choose from {STREAM_MODES}")
        if streams != "single" and transport != "quic":
            raise ValueError(f"streams={streams!r} needs transport='quic'")
        self.streams = streams
        self._topic_channels: dict[str, int] = {}
        self.host = host
        self.port = port or DEFAULT_PORTS[transport]
        self.transport = transport
        self.version = version
        if not client_id and (not clean_start or version != MQTT_5):
            client_id = "qmig-" + secrets.token_hex(6)
        self.client_id = client_id
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.keep_alive = keep_alive
        # QUIC: extra silence allowed while the broker is moving (an announced move not yet
        # reached, or probing for one): a frozen broker answers no PINGREQ.
        self.move_grace = move_grace
        self.will = will
        self.username = username
        self.password = password.encode() if isinstance(password, str) else password
        self.cafile = cafile
        self.insecure = insecure
        if bool(certfile) != bool(keyfile):
            raise ValueError("certfile and keyfile go together")
        self.client_cert = (certfile, keyfile) if certfile and keyfile else None
        # QUIC: the broker's latest TLS session ticket, offered on the next connect to resume
        # the session (no certificate exchange).  Pass one to a new Client to resume too.
        self.session_ticket = session_ticket
        self.reconnect = reconnect
        self.reconnect_delay = reconnect_delay
        self._end_reason = "connection lost"  # what next_message raises once it is over
        self.connect_timeout = connect_timeout
        self.properties = dict(properties or {})
        self.session = ClientSession(client_id)
        self.protocol: ClientProtocol | None = None
        self.session_present = False
        self.connack_properties: Properties = {}
        self.reconnects = 0
        self._stream: ByteStream | None = None
        self._closer: Closer | None = None
        self._messages: asyncio.Queue[Publish | None] = asyncio.Queue()  # None: the end
        self._waiters: dict[tuple[str, int], asyncio.Future[Any]] = {}
        self._connected = asyncio.Event()
        self._connack: asyncio.Future[Event] | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_sent = time.monotonic()
        self._last_heard = time.monotonic()  # anything from the broker (keep alive, above)
        self._ping_task: asyncio.Task[None] | None = None
        self._first_connect = True
        # One stream generation per connection attempt: a loss reported by an older stream
        # (closed while a newer one is being opened) must not tear down the newer one.
        self._generation = 0
        self._reconnect_task: asyncio.Task[None] | None = None
        # Where we were before a Server Reference sent us elsewhere: if the referenced
        # server stays unreachable (its migration was rolled back), try here again; kept
        # after we reached it too (a rollback can follow its serving), until the next move.
        self._previous: tuple[str, int] | None = None
        # How a QUIC connection follows a migrating broker (see quicmig.follower).
        self.follower = Follower(Strategy(follow)) if transport == "quic" else None
        self.moves: list[tuple[float, Address]] = []  # the latest max_moves moves
        self.max_moves = 64  # bounded for a client that lives through a move a minute
        # Observers' hook (measurement, logs): called with ("connected", "host:port") when a
        # CONNACK accepts a connection and ("lost", reason) when one is lost unasked.
        self.on_connection: Callable[[str, str], None] | None = None

    # ----------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    async def connect(self) -> None:
        """Connect (and resume the session where the broker kept it)."""
        event = await self._connect_once()
        if isinstance(event, ConnectionRefused):
            reference = event.server_reference
            if reference and event.reason_code in (
                ReasonCode.USE_ANOTHER_SERVER,
                ReasonCode.SERVER_MOVED,
            ):
                self.host, self.port = parse_reference(reference, self.port)
                log.info("redirected to %s:%s", self.host, self.port)
                event = await self._connect_once()
            if isinstance(event, ConnectionRefused):
                raise ClientError(
                    f"connection refused: reason {event.reason_code:#04x}", event.reason_code
                )
        self._ping_task = asyncio.create_task(self._keepalive_loop())

    def _keep_ticket(self, ticket: SessionTicket) -> None:
        self.session_ticket = ticket

    async def _connect_once(
        self,
        timeout: float | None = None,
        syn_timeout: float | None = None,
        fallback: tuple[str, int] | None = None,
    ) -> Event:
        properties = dict(self.properties)
        if self.version == MQTT_5 and self.session_expiry:
            properties[P.SESSION_EXPIRY_INTERVAL] = self.session_expiry
        clean = self.clean_start if self._first_connect else False
        proto = ClientProtocol(
            self.session.client_id, self.version, clean, self.keep_alive, self.username,
            self.password, self.will, properties, self.session,
        )  # fmt: skip
        self.protocol = proto
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        self._generation += 1
        generation = self._generation

        def on_lost(exc: Exception | None) -> None:
            if generation == self._generation:
                self._on_lost(exc)

        try:
            self._stream, self._closer = await open_stream(
                self.transport, self.host, self.port, self._on_data, on_lost,
                self.cafile, self.insecure, timeout or self.connect_timeout, self.follower,
                syn_timeout, fallback=fallback, client_cert=self.client_cert,
                session_ticket=self.session_ticket, on_session_ticket=self._keep_ticket,
            )  # fmt: skip
            reached = getattr(self._stream, "target", None)
            if reached is not None and reached != (self.host, self.port):
                log.info("%s:%s answered before %s:%s", *reached, self.host, self.port)
                self._previous, (self.host, self.port) = (self.host, self.port), reached
            stream = self._stream
            if isinstance(stream, QuicStreamProtocol):
                stream.on_migrated = self._on_migrated
                stream.on_channel_data = self._on_channel_data
                stream.on_channel_closed = self._on_channel_closed
        except (TimeoutError, OSError, ConnectionError) as exc:
            where = f"{self.host}:{self.port} over {self.transport}"
            raise ClientError(f"cannot reach {where}: {exc}") from exc
        proto.connect()
        self._flush()
        try:
            event = await asyncio.wait_for(self._connack, timeout or self.connect_timeout)
        except TimeoutError as exc:
            self._abort_stream()
            raise ClientError(f"no CONNACK from {self.host}:{self.port}") from exc
        if isinstance(event, Connected):
            self._first_connect = False
            self.session_present = event.session_present
            self.connack_properties = event.properties
            self._connected.set()
            if self.on_connection is not None:
                self.on_connection("connected", f"{self.host}:{self.port}")
        return event

    async def disconnect(self) -> None:
        self._closing = True
        if self._ping_task is not None:
            self._ping_task.cancel()
        proto = self.protocol
        if proto is not None and proto.connected and not proto.closed and self._stream:
            proto.disconnect()
            self._flush()
            await asyncio.sleep(0)
        stream, self._stream = self._stream, None
        if stream is not None:
            finish = getattr(stream, "close_gracefully", None)
            if finish is not None:
                await finish(CLOSE_TIMEOUT)
            else:
                stream.close()  # TCP, TLS, MPTCP: the kernel delivers what is buffered
        if self._closer is not None:
            with contextlib.suppress(Exception):
                await self._closer.__aexit__(None, None, None)
            self._closer = None
        for task in list(self._tasks):
            task.cancel()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(ClientError("client disconnected"))
        self._waiters.clear()
        self._messages.put_nowait(None)  # ends messages()

    def _abort_stream(self, graceful: bool = False) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close() if graceful else stream.abort()

    # ----------------------------------------------------------------- I/O callbacks
    def _flush(self) -> None:
        proto = self.protocol
        if proto is None or self._stream is None:
            return
        data = proto.data_to_send()
        if data:
            self._stream.write(data)
            self._last_sent = time.monotonic()
        side = proto.side_data_to_send() if self.streams != "single" else None
        if side:
            write_channel = getattr(self._stream, "write_channel", None)
            for channel, chunk in side.items():
                if write_channel is not None:
                    write_channel(channel, chunk)
                else:
                    self._stream.write(chunk)

    def _on_data(self, data: bytes, channel: int = 0) -> None:
        proto = self.protocol
        if proto is None:
            return
        self._last_heard = time.monotonic()
        for event in proto.receive_data(data, channel):
            self._dispatch(event)
        self._flush()

    def _on_channel_data(self, channel: int, data: bytes) -> None:
        self._on_data(data, channel)

    def _on_channel_closed(self, channel: int) -> None:
        if self.protocol is not None:
            self.protocol.channel_closed(channel)

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, MessageReceived):
            self._messages.put_nowait(event.publish)
        elif isinstance(event, PublishCompleted):
            self._resolve(("pub", event.packet_id), event.reason_code)
        elif isinstance(event, (Subscribed, Unsubscribed)):
            self._resolve(("sub", event.packet_id), event.reason_codes)
        elif isinstance(event, (Connected, ConnectionRefused)):
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(event)
        elif isinstance(event, ServerDisconnected):
            log.info("broker disconnected us: reason %#04x", event.reason_code)
            if event.server_reference:
                self._previous = (self.host, self.port)
                self.host, self.port = parse_reference(event.server_reference, self.port)
                log.info("broker moved to %s:%s", self.host, self.port)
            self._abort_stream(graceful=True)
        elif isinstance(event, ProtocolViolation):
            log.warning("protocol violation by the broker: %s", event.message)
            self._flush()
            self._abort_stream()
        elif isinstance(event, PingResponse):
            pass

    def _resolve(self, key: tuple[str, int], value: Any) -> None:
        fut = self._waiters.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _on_lost(self, exc: Exception | None) -> None:
        self._connected.clear()
        self._stream = None
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ClientError(f"connection lost: {exc}"))
        if self._closing:
            return
        if self.on_connection is not None:
            self.on_connection("lost", str(exc) if exc else "")
        self._head_for_announced()
        if self.reconnect:
            if self._reconnect_task is None or self._reconnect_task.done():
                task = asyncio.get_running_loop().create_task(self._reconnect_loop())
                self._reconnect_task = task
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                task.add_done_callback(self._reconnect_ended)
        else:
            self._give_up(f"connection lost: {exc}")

    def _give_up(self, reason: str) -> None:
        """No connection will come back: fail the waiters and end message iteration."""
        self._end_reason = reason
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(ClientError(reason))
        self._waiters.clear()
        self._messages.put_nowait(None)

    def _reconnect_ended(self, task: asyncio.Task[None]) -> None:
        """A reconnect loop that died of a bug must say so, not leave the caller waiting."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("reconnect loop failed: %r", exc, exc_info=exc)
        self._give_up(f"reconnecting failed: {exc!r}")

    async def _reconnect_loop(self) -> None:
        """Reconnect until it works: one loop at a time, backing off, falling back.

        Attempts are bounded by ``RECONNECT_ATTEMPT_TIMEOUT`` (their SYN by
        ``RECONNECT_SYN_TIMEOUT``) so that a server that drops packets (a frozen or restoring
        container) costs a fraction of a second, not the kernel's SYN backoff.  When a
        Server Reference sent us to a server that stays unreachable for ``FALLBACK_AFTER``
        seconds, every attempt from then on races it and the previous server (TCP, TLS,
        MPTCP): a rolled-back migration leaves the broker where it was, a slow one brings it
        there, and neither address's silence delays the other.
        """
        loop = asyncio.get_running_loop()
        delay, max_delay = self.reconnect_delay
        failing_since = loop.time()
        racing = False
        while not self._closing:
            if not await self._sleep_open(delay):
                return
            fallback = self._previous if racing else None
            try:
                event = await self._connect_once(
                    min(self.connect_timeout, RECONNECT_ATTEMPT_TIMEOUT), RECONNECT_SYN_TIMEOUT,
                    fallback)  # fmt: skip
            except ClientError as exc:
                log.debug("reconnect failed: %s", exc)
                delay = min(delay * 2, max_delay)
                if self._next_pool_address():
                    continue
                if racing and self.transport == "quic" and self._previous:
                    # QUIC has no connect race here: alternate between the two instead.
                    (self.host, self.port), self._previous = self._previous, (self.host, self.port)
                if self._previous and not racing and loop.time() - failing_since >= FALLBACK_AFTER:
                    # From now on every attempt races the two: the move may still be under
                    # way (a long freeze) or have been rolled back.
                    log.info("%s:%s unreachable for %.0f s: racing %s:%s too", self.host,
                             self.port, FALLBACK_AFTER, *self._previous)  # fmt: skip
                    racing = True  # on the same schedule: racing needs no fresh start
                continue
            if isinstance(event, ConnectionRefused) and event.server_reference:
                self._previous = (self.host, self.port)
                self.host, self.port = parse_reference(event.server_reference, self.port)
                failing_since = loop.time()
                racing = False
                continue
            if isinstance(event, Connected):
                # self._previous stays: a post-copy move can still roll back after its
                # destination served (the lazy phase), and a referenced server that then
                # falls silent sends us home again.  Only the next Server Reference
                # replaces it.
                self.reconnects += 1
                log.info("reconnected to %s:%s (session present %s)", self.host, self.port,
                         event.session_present)  # fmt: skip
                return
            delay = min(delay * 2, max_delay)

    async def _sleep_open(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; whether the client is still open after it.

        (A method of its own: in the reconnect loop, ``while not self._closing`` would leave
        mypy sure that ``self._closing`` is still false after the sleep.)
        """
        await asyncio.sleep(delay)
        return not self._closing

    async def _keepalive_loop(self) -> None:
        while not self._closing:
            proto = self.protocol
            keep_alive = proto.keep_alive if proto else self.keep_alive
            if not keep_alive:
                return
            await asyncio.sleep(max(0.05, keep_alive * 0.25))
            if proto is None or not proto.connected or proto is not self.protocol:
                continue
            now = time.monotonic()
            heard, limit = self._heard(), keep_alive + self._move_allowance(now)
            # Silent (nothing at all came), or alive without answering any MQTT packet for
            # move_grace more: a broker that acknowledges but never answers is not serving.
            if now - heard >= limit or now - self._last_heard >= limit + self.move_grace:
                log.warning("%s:%s silent for %.0f s (keep alive %d s): the connection is dead",
                            self.host, self.port, now - self._last_heard, keep_alive)  # fmt: skip
                self._last_heard = now  # one verdict per connection
                self._generation += 1  # the aborted stream's own loss report is stale now
                self._abort_stream()
                self._on_lost(TimeoutError(f"no packet from the broker in {keep_alive} s"))
            elif (now - self._last_sent >= keep_alive * 0.5
                  or now - self._last_heard >= keep_alive * 0.5):  # fmt: skip
                proto.ping()
                self._flush()

    def _heard(self) -> float:
        """When the broker was last heard: an MQTT packet, or over QUIC any packet the
        connection processed (an ACK, a PATH_RESPONSE).  After a move, a broker busy with
        thousands of returning clients acknowledges long before it answers every PINGREQ."""
        stream = self._stream
        at = stream.heard_at if isinstance(stream, QuicStreamProtocol) else None
        return self._last_heard if at is None else max(self._last_heard, at)

    def _move_allowance(self, now: float) -> float:
        """Extra silence the dead-connection verdict allows: ``move_grace`` while the broker
        is moving as far as the follower knows, else none."""
        follower = self.follower
        return self.move_grace if follower is not None and follower.expecting_move(now) else 0.0

    def _head_for_announced(self) -> None:
        """A QUIC connection lost while an announced move is under way: reconnect where the
        broker said it was going, with where it was as the fallback (a rollback)."""
        follower = self.follower
        if follower is None or not follower.expecting_move(time.monotonic()):
            return
        dest = follower.announced
        if dest is None or (dest.host, dest.port) == (self.host, self.port):
            return
        log.info("connection lost during an announced move: reconnecting to %s", dest)
        self._previous = (self.host, self.port)
        self.host, self.port = dest.host, dest.port

    def _next_pool_address(self) -> bool:
        """QUIC, with a pool of the broker's addresses (pool and announce clients): move the
        next reconnect attempt to the pool's next address.  Never told where the broker
        went, the client finds it where it answers; a silent address costs one attempt."""
        follower = self.follower
        if follower is None or not follower.pool:
            return False
        pool = [(a.host, a.port) for a in follower.pool]
        here = (self.host, self.port)
        following = pool[(pool.index(here) + 1) % len(pool)] if here in pool else pool[0]
        log.debug("reconnect: trying the pool's %s:%s next", *following)
        self.host, self.port = following
        return True

    def _on_migrated(self, address: Address) -> None:
        log.info("QUIC connection follows the broker to %s", address)
        self.moves.append((time.monotonic(), address))
        del self.moves[: -self.max_moves]
        if (address.host, address.port) != (self.host, self.port):
            # where a reconnect falls back to if the new address falls silent (a rollback)
            self._previous = (self.host, self.port)
        self.host, self.port = address.host, address.port

    @property
    def migrations(self) -> list[dict[str, object]]:
        """Per migration: when the address was learned, probed, validated (monotonic s)."""
        return [r.as_dict() for r in self.follower.records] if self.follower else []

    # ----------------------------------------------------------------- API
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        timeout: float | None = None,
    ) -> int:
        """Publish; for QoS 1/2 wait for PUBACK/PUBCOMP and return its reason code."""
        if isinstance(payload, str):
            payload = payload.encode()
        proto = self.protocol
        if proto is None:
            raise ClientError("not connected")
        if qos == 0:
            if not self.connected:
                await self.wait_connected(timeout)
                proto = self.protocol
                assert proto is not None
            proto.publish(topic, payload, 0, retain, properties, self._channel(topic, 0))
            self._flush()
            return 0
        pid = proto.publish(topic, payload, qos, retain, properties, self._channel(topic, qos))
        assert pid is not None
        fut = asyncio.get_running_loop().create_future()
        self._waiters[("pub", pid)] = fut
        self._flush()
        reason: int = await asyncio.wait_for(fut, timeout)
        if reason >= 0x80:
            raise ClientError(f"publish to {topic} refused: reason {reason:#04x}", reason)
        return reason

    async def request_migration(self, hint: str = "", reason: int = TRIGGER_OPERATOR) -> None:
        """Ask the broker to move (MIGRATION_TRIGGER, QUIC only): ``hint`` names the host or
        address its orchestrator should prefer.  The broker acts only on requests of users
        its ACL lets write ``$qmig/migrate`` (any logged-in user without an ACL), a few at a
        time; nothing answers the request itself: the move, if it comes, is the answer."""
        if len(hint.encode()) > MAX_HINT:
            raise ClientError(f"a migration hint has at most {MAX_HINT} bytes")
        stream = self._stream
        if not isinstance(stream, QuicStreamProtocol) or not self.connected:
            raise ClientError("migration requests need a connected QUIC client")
        if not stream.request_migration(reason, hint):
            raise ClientError("the broker does not take migration requests")

    async def subscribe(
        self,
        topic: str | list[str] | list[Subscription],
        qos: int = 0,
        *,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        subscription_id: int | None = None,
        timeout: float | None = 10.0,
    ) -> list[int]:
        if isinstance(topic, str):
            topic = [topic]
        subs = [
            t if isinstance(t, Subscription)
            else Subscription(t, qos, no_local, retain_as_published, retain_handling)
            for t in topic
        ]  # fmt: skip
        props: Properties = {}
        if subscription_id is not None:
            props[P.SUBSCRIPTION_IDENTIFIER] = [subscription_id]
        channel = self._channel(subs[0].topic_filter, max(s.qos for s in subs))
        codes = await self._request("sub", lambda p: p.subscribe(subs, props, channel), timeout)
        refused = [c for c in codes if c >= 0x80]
        if refused:
            raise ClientError(f"subscription refused: {[hex(c) for c in codes]}", refused[0])
        return codes

    async def unsubscribe(self, topic: str | list[str], timeout: float | None = 10.0) -> list[int]:
        filters = [topic] if isinstance(topic, str) else topic
        channel = self._topic_channels.get(filters[0], 0) if self.streams == "per-topic" else 0
        return await self._request("sub", lambda p: p.unsubscribe(filters, channel), timeout)

    def _channel(self, topic: str, qos: int) -> int:
        """The data channel (QUIC stream) for a topic or QoS in multi-stream mode; 0: control.

        ``per-topic``: one stream per topic name or filter, so a lost datagram of one topic
        never holds up another; ``per-qos``: one stream per QoS level.  A SUBSCRIBE with
        several filters goes on the stream of its first filter (and its highest QoS).
        """
        if self.streams == "single":
            return 0
        if self.streams == "per-qos":
            return qos + 1
        channel = self._topic_channels.get(topic)
        if channel is None:
            # Streams stay open for the connection's life and a broker allows only so many
            # at once (aioquic: 128): past MAX_DATA_STREAMS, topics share streams.
            channel = len(self._topic_channels) % MAX_DATA_STREAMS + 1
            self._topic_channels[topic] = channel
        return channel

    async def _request(
        self, kind: str, send: Callable[[ClientProtocol], int], timeout: float | None
    ) -> list[int]:
        """Send a (UN)SUBSCRIBE with ``send``; its SUBACK's (UNSUBACK's) reason codes."""
        if not self.connected:
            await self.wait_connected(timeout)
        proto = self.protocol
        assert proto is not None
        pid = send(proto)
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._waiters[(kind, pid)] = fut
        self._flush()
        return await asyncio.wait_for(fut, timeout)

    async def messages(self) -> AsyncIterator[Publish]:
        """Received messages in order; ends when the connection is lost for good."""
        while True:
            message = await self._messages.get()
            if message is None:
                return
            yield message

    async def next_message(self, timeout: float | None = None) -> Publish:
        message = await asyncio.wait_for(self._messages.get(), timeout)
        if message is None:
            raise ClientError(self._end_reason)
        return message


__all__ = ["Client", "ClientError", "MQTTError", "Message", "parse_reference"]
