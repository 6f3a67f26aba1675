"""aioquic's QuicServer with bounded half-open state: the broker's QUIC listener.

aioquic builds a ``QuicConnection`` (TLS context, keys for every epoch, three 16 KB crypto
buffers: about 90 KB) for every datagram shaped like an Initial with a new Destination
Connection ID, before anything is decrypted, keeps it until the idle timeout, never sends a
Retry unless told to, and removes a terminated connection by scanning every entry of its
connection table.  Random 1,200-byte datagrams thus bought 90 KB and minutes of life each,
and their expiry stalled the event loop.  :class:`GuardedQuicServer` subclasses it: the
server-side adapter, as ``quicmig/connection.py`` is for connections (aioquic is extended by
subclassing, never edited), and the one place the broker touches QuicServer's private names
(``_protocols``, ``_retry``, the ``_connection_*`` handlers, a connection's ``_close_at``):

- An Initial that opens a connection must decrypt with the Initial keys of its Destination
  Connection ID (RFC 9001 section 5.2) before any state exists; one that does not is
  dropped unanswered (aioquic would drop it too, after building the connection).
- Address validation with Retry (RFC 9000 section 8.1.2): ``always``, ``never``, or ``auto``
  once a quarter of the half-open limit is taken, so a flood from spoofed addresses costs
  one stateless Retry per datagram and creates nothing.
- At most ``max_half_open`` handshakes in progress: a new one evicts the oldest, addresses
  not validated by a Retry token first; each gets ``handshake_timeout`` seconds to finish
  (the idle timeout, 180 s, is for established connections).  Either way the connection is
  closed with CONNECTION_REFUSED and its state dropped at once, without a closing period.
- A terminated connection is removed from the table by its own connection IDs, which it
  keeps itself (with bound methods for aioquic's per-connection callbacks: issue #16).
- It listens on :class:`~quicmig.udp.BatchingDatagramTransport`: datagrams are read in
  batches, and every connection a batch touched transmits once at its end, its datagrams
  to one peer in UDP GSO runs (``GuardedProtocol.transmit``, ``batch_ended``).

The policy (:class:`HalfOpen`) is sans-I/O; the server class is the thin asyncio layer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from aioquic._buffer import Buffer  # where it is defined and typed (see quicmig.frames)
from aioquic._crypto import CryptoError  # defined there; aioquic.quic.crypto re-imports it
from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamHandler
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicHeader,
    QuicPacketType,
    pull_quic_header,
)

from .connection import short_queue
from .udp import BATCH, BatchingDatagramTransport, open_udp

log = logging.getLogger("qmig.broker")

RETRY_SHARE = 4  # auto: Retry once 1/RETRY_SHARE of the half-open limit is taken
REPORT_INTERVAL = 10.0  # seconds between two log lines about refused handshakes

T = TypeVar("T", bound=Hashable)


@dataclass(frozen=True)
class HandshakePolicy:
    """How a QUIC server admits new connections (see the module docstring)."""

    retry: str = "auto"  # or "always" or "never"
    max_half_open: int = 256
    handshake_timeout: float = 10.0

    @property
    def retry_threshold(self) -> int:
        """``auto`` sends Retry while at least this many handshakes are in progress."""
        return max(1, self.max_half_open // RETRY_SHARE)

    def wants_retry(self, half_open: int) -> bool:
        if self.retry == "always":
            return True
        return self.retry == "auto" and half_open >= self.retry_threshold


class HalfOpen(Generic[T]):
    """Handshakes in progress with their deadlines, oldest first (sans-I/O).

    Every entry gets the same timeout, so insertion order is deadline order and both
    eviction and expiry take from the front: O(1) per connection.
    """

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        # Addresses validated by a Retry token are evicted only when no other is left.
        self._unvalidated: OrderedDict[T, float] = OrderedDict()
        self._validated: OrderedDict[T, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._unvalidated) + len(self._validated)

    def __contains__(self, item: object) -> bool:
        return item in self._unvalidated or item in self._validated

    def add(self, item: T, validated: bool, now: float) -> list[T]:
        """Track ``item``; returns the entries evicted to stay within the limit."""
        evicted = []
        while len(self) >= self.limit:
            oldest = self._unvalidated or self._validated
            evicted.append(oldest.popitem(last=False)[0])
        (self._validated if validated else self._unvalidated)[item] = now + self.timeout
        return evicted

    def discard(self, item: T) -> None:
        self._unvalidated.pop(item, None)
        self._validated.pop(item, None)

    def next_deadline(self) -> float | None:
        fronts = [next(iter(d.values())) for d in (self._unvalidated, self._validated) if d]
        return min(fronts) if fronts else None

    def expired(self, now: float) -> list[T]:
        """Remove and return the entries whose handshake time is up."""
        out = []
        for table in (self._unvalidated, self._validated):
            while table and next(iter(table.values())) <= now:
                out.append(table.popitem(last=False)[0])
        return out

    def clear(self) -> None:
        self._unvalidated.clear()
        self._validated.clear()


def initial_decrypts(header: QuicHeader, data: bytes, encrypted_offset: int) -> bool:
    """Whether a client's first Initial decrypts with its Destination Connection ID's keys.

    ``encrypted_offset``: where the packet number starts, as left by ``pull_quic_header``.
    Anyone can derive these keys, so this proves nothing about the sender; it only makes
    random bytes cost a key derivation instead of a connection.
    """
    assert header.version is not None
    crypto = CryptoPair()
    crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
    try:
        crypto.decrypt_packet(data[: header.packet_length], encrypted_offset, 0)
    except (CryptoError, ValueError):
        return False
    return True


class GuardedProtocol(QuicConnectionProtocol):
    """What :class:`GuardedQuicServer` serves: a protocol that reports its handshake's end.

    A subclass calls ``self.handshake_done()`` on ``HandshakeCompleted``; until then the
    connection counts as half-open.

    Per connection it keeps little: the listener and the connection IDs it is registered
    under (a list), and bound methods for aioquic's three connection-table callbacks (which
    aioquic makes per connection as ``partial`` objects with a keyword dict, 330 bytes
    each); the ``asyncio.Event`` aioquic sets on termination waits with a list instead of
    a deque (nothing waits on it in the broker: 760 bytes saved).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listener: GuardedQuicServer | None = None
        self._table_keys: list[bytes] = []  # its keys in the listener's connection table
        closed: Any = self._closed  # asyncio's private name, unknown to typeshed
        if type(getattr(closed, "_waiters", None)) is deque:
            closed._waiters = short_queue(closed._waiters)

    def transmit(self) -> None:
        """Send what the connection has; while the listener reads a batch, at its end."""
        listener = self._listener
        if listener is not None and listener.batching:
            listener.defer(self)
            return
        self.transmit_now()

    def transmit_now(self) -> None:
        """aioquic's transmit, with this connection's datagrams sent in GSO runs."""
        transport = self._transport
        if not isinstance(transport, BatchingDatagramTransport):
            super().transmit()
            return
        transport.cork()
        try:
            super().transmit()
        finally:
            transport.uncork()

    def handshake_done(self) -> None:
        """No longer half-open for the listener."""
        if self._listener is not None:
            self._listener.half_open.discard(self)

    def _listen(self, listener: GuardedQuicServer, keys: list[bytes]) -> None:
        """Attach to ``listener``, registered under ``keys``."""
        self._listener = listener
        self._table_keys = keys

    def _take_callbacks(self) -> None:
        """Replace the callbacks aioquic's server just gave this connection by methods."""
        self._connection_id_issued_handler = self._cid_issued
        self._connection_id_retired_handler = self._cid_retired
        self._connection_terminated_handler = self._terminated

    def _cid_issued(self, cid: bytes) -> None:
        if self._listener is not None:
            self._listener._connection_id_issued(cid, self)

    def _cid_retired(self, cid: bytes) -> None:
        if self._listener is not None:
            self._listener._connection_id_retired(cid, self)

    def _terminated(self) -> None:
        if self._listener is not None:
            self._listener._connection_terminated(self)


class GuardedQuicServer(QuicServer):
    """QuicServer that bounds what connections in their handshake may cost."""

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        create_protocol: Callable[..., GuardedProtocol],
        policy: HandshakePolicy,
        stream_handler: QuicStreamHandler | None = None,
    ) -> None:
        self._factory = create_protocol
        super().__init__(
            configuration=configuration,
            create_protocol=self._new_protocol,
            retry=True,
            stream_handler=stream_handler,
        )
        self.policy = policy
        self._config = configuration
        self._tokens = self._retry  # aioquic's Retry token handler, lent per datagram
        self._clock = asyncio.get_running_loop()
        self.half_open: HalfOpen[GuardedProtocol] = HalfOpen(
            policy.max_half_open, policy.handshake_timeout
        )
        self._opening: tuple[bytes, bool] | None = None  # the Initial being admitted
        self._created: GuardedProtocol | None = None  # the connection that Initial opened
        # While a batch of datagrams is read (BatchingDatagramTransport), connections
        # transmit once, at its end.
        self.batching = False
        self._deferred: dict[GuardedProtocol, None] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self.counts = {"undecryptable": 0, "retry": 0, "timed_out": 0, "evicted": 0}
        self._reported = dict(self.counts)
        self._report: asyncio.Handle | None = None
        self._last_report = -REPORT_INTERVAL

    # ------------------------------------------------------------------ batches
    def batch_started(self) -> None:
        self.batching = True

    def defer(self, protocol: GuardedProtocol) -> None:
        self._deferred[protocol] = None

    def batch_ended(self) -> None:
        """Transmit every connection the batch touched, once, datagrams to a peer in GSO runs."""
        self.batching = False
        transport = self._transport
        corked = transport if isinstance(transport, BatchingDatagramTransport) else None
        if corked is not None:
            corked.cork()
        try:
            while self._deferred:
                deferred, self._deferred = self._deferred, {}
                for protocol in deferred:
                    try:
                        protocol.transmit_now()
                    except Exception as exc:
                        context = {"message": "QUIC transmit failed", "exception": exc}
                        self._clock.call_exception_handler(context)
        finally:
            if corked is not None:
                corked.uncork()

    # ------------------------------------------------------------------ admission
    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        data = cast(bytes, data)
        # Only a long-header datagram of at least 1,200 bytes can open a connection.
        if len(data) >= SMALLEST_MAX_DATAGRAM_SIZE and data[0] & 0x80 and not self._admit(data):
            return
        try:
            super().datagram_received(data, addr)
        finally:
            self._opening = None
            created, self._created = self._created, None
            if created is not None:  # aioquic has set its callbacks: ours replace them
                created._take_callbacks()

    def _admit(self, data: bytes) -> bool:
        """Decide on a datagram that may open a connection; False drops it."""
        buf = Buffer(data=data)
        try:
            header = pull_quic_header(buf, host_cid_length=self._config.connection_id_length)
        except ValueError:
            return False
        if (
            header.packet_type != QuicPacketType.INITIAL
            or header.version not in self._config.supported_versions
            or header.destination_cid in self._protocols
        ):
            return True  # an existing connection's, or version negotiation: aioquic's part
        if not initial_decrypts(header, data, buf.tell()):
            self._count("undecryptable")
            return False
        retry = bool(header.token) or self.policy.wants_retry(len(self.half_open))
        # aioquic sends a Retry for a tokenless Initial, and validates a token, only while
        # it has a token handler; a token from our Retry is validated whatever the load.
        # aioquic itself sets _retry to None when Retry is off, but mypy infers the
        # attribute from its first assignment there: QuicRetryTokenHandler, not Optional.
        self._retry = self._tokens if retry else None  # type: ignore[assignment]
        if retry and not header.token:
            self._count("retry")
        self._opening = (header.destination_cid, bool(header.token))
        return True

    def _new_protocol(
        self, connection: QuicConnection, stream_handler: QuicStreamHandler | None = None
    ) -> GuardedProtocol:
        """aioquic's create_protocol: track the new connection as half-open."""
        protocol = self._factory(connection, stream_handler=stream_handler)
        if not isinstance(protocol, GuardedProtocol):
            raise TypeError("GuardedQuicServer serves GuardedProtocol subclasses only")
        assert self._opening is not None
        dcid, validated = self._opening
        # aioquic registers the connection under these two; _connection_id_issued adds more.
        protocol._listen(self, [dcid, connection.host_cid])
        self._created = protocol
        now = self._clock.time()
        for old in self.half_open.add(protocol, validated, now):
            self._count("evicted")
            self._refuse(old, f"over {self.policy.max_half_open} handshakes in progress")
        if self._expiry is None:
            self._expiry = self._clock.call_at(now + self.policy.handshake_timeout, self._expire)
        return protocol

    def _expire(self) -> None:
        self._expiry = None
        now = self._clock.time()
        for protocol in self.half_open.expired(now):
            self._count("timed_out")
            timeout = self.policy.handshake_timeout
            self._refuse(protocol, f"handshake not completed within {timeout:g} s")
        deadline = self.half_open.next_deadline()
        if deadline is not None:
            self._expiry = self._clock.call_at(deadline, self._expire)

    def _refuse(self, protocol: GuardedProtocol, reason: str) -> None:
        """CONNECTION_REFUSED to the peer, and the connection's state dropped at once.

        aioquic would keep a closed connection for its closing period (three PTOs, seconds
        in a handshake); RFC 9000 section 10.2 only asks for it so that late packets get
        the close again.  Setting the end of that period to now makes aioquic's own timer
        end the connection on the next loop turn, through its usual termination path.
        """
        quic = protocol._quic
        # A transport close (a frame type given): aioquic would turn an application close in
        # a handshake into APPLICATION_ERROR without the reason (RFC 9000 section 10.2.3).
        quic.close(
            error_code=QuicErrorCode.CONNECTION_REFUSED,
            frame_type=QuicFrameType.PADDING,
            reason_phrase=reason,
        )
        protocol.transmit_now()  # the CONNECTION_CLOSE (not at the end of a batch)
        quic._close_at = self._clock.time()
        protocol.transmit_now()  # re-arms aioquic's timer for now

    # ------------------------------------------------------------------ connection table
    def _connection_id_issued(self, cid: bytes, protocol: QuicConnectionProtocol) -> None:
        super()._connection_id_issued(cid, protocol)
        if isinstance(protocol, GuardedProtocol) and cid not in protocol._table_keys:
            protocol._table_keys.append(cid)

    def _connection_id_retired(self, cid: bytes, protocol: QuicConnectionProtocol) -> None:
        super()._connection_id_retired(cid, protocol)
        if isinstance(protocol, GuardedProtocol) and cid in protocol._table_keys:
            protocol._table_keys.remove(cid)

    def _connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        """Remove the connection by its own IDs (aioquic scans the whole table)."""
        if not isinstance(protocol, GuardedProtocol):  # never: _new_protocol makes only these
            return
        keys, protocol._table_keys = protocol._table_keys, []
        for cid in keys:
            if self._protocols.get(cid) is protocol:
                del self._protocols[cid]
        self.half_open.discard(protocol)
        protocol._listener = None

    def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._report is not None:
            self._report.cancel()
            self._report = None
        self.half_open.clear()
        super().close()

    # ------------------------------------------------------------------ reporting
    def _count(self, what: str) -> None:
        """Count a refused handshake; the log gets a summary at most every 10 s."""
        self.counts[what] += 1
        if self._report is None:
            delay = max(0.0, self._last_report + REPORT_INTERVAL - self._clock.time())
            self._report = self._clock.call_later(delay, self._log_counts)

    def _log_counts(self) -> None:
        self._report = None
        self._last_report = self._clock.time()
        new = {k: v - self._reported[k] for k, v in self.counts.items()}
        self._reported = dict(self.counts)
        labels = {
            "undecryptable": "undecryptable Initials dropped",
            "retry": "Retry sent",
            "timed_out": "timed out",
            "evicted": "evicted",
        }
        log.info(
            "QUIC handshakes: %s (%d in progress, limit %d, retry %s)",
            ", ".join(f"{labels[k]} {n}" for k, n in new.items() if n),
            len(self.half_open),
            self.policy.max_half_open,
            self.policy.retry,
        )


async def serve_guarded(
    host: str,
    port: int,
    *,
    configuration: QuicConfiguration,
    create_protocol: Callable[..., GuardedProtocol],
    policy: HandshakePolicy,
    batch: int = BATCH,
) -> GuardedQuicServer:
    """aioquic's ``serve()`` with a :class:`GuardedQuicServer` on a batching UDP transport.

    ``batch``: datagrams read per wake-up (1: one, as asyncio's own transport does).
    """
    server = GuardedQuicServer(
        configuration=configuration, create_protocol=create_protocol, policy=policy
    )
    await open_udp(host, port, server, batch)
    return server
