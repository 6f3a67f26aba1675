"""qmig's server-migration extension grafted onto aioquic's QuicConnection by subclassing.

aioquic's servers and ``connect()`` build plain ``QuicConnection`` objects; the protocol
factory hands each one to :meth:`MigratingQuicConnection.adopt`, which makes it an instance
of this subclass before a single datagram is processed.  The subclass overrides a handful of
aioquic methods and always calls the original (the seams are tested in
``tests/test_quic_migration.py`` against the pinned aioquic series):

- ``_serialize_transport_parameters`` / ``_parse_transport_parameters``: one more parameter.
- ``_write_connection_limits`` (called once per 1-RTT packet): appends pending extension
  frames, with a delivery handler that queues a lost frame again (frames are retransmitted).
- ``receive_datagram``: a client accepts datagrams from a server address it was told about
  (announced or pooled) by opening a probe path to it; aioquic validates it and moves there.
- ``get_timer`` / ``handle_timer``: the short fixed probing schedule of a migration window.
- ``_send_probing_frames``: a client's probes to other server addresses stay out of the
  active path's congestion control and loss detection (RFC 9000 section 9.4).
- ``_write_stream_limits`` (opt-in, ``receive_window``): a bounded receive window per stream
  that the application can stop from moving, so a slow consumer holds back the sender.
- ``_initialize`` (opt-in, ``client_cafile``): a server that requires client certificates
  makes its TLS context a :class:`ClientCertificateRequired`, since aioquic's server neither
  asks for a client certificate nor verifies one it is sent.  Also in ``_initialize``: a
  client offers key shares for X25519 and P-256 only (aioquic offers four, and generating
  the P-384 and X448 ones cost a client ~0.45 ms per handshake), and a server with a
  ``ticket_store`` (opt-in) issues and honours session tickets through it, 0-RTT refused
  (:meth:`MigratingQuicConnection._qmig_use_tickets`).
- ``_replenish_connection_ids``: as many connection IDs as a pool needs, issued by a server
  only once it sends a migration frame (see the method).

Memory of an established server connection (issue #16, docs/design/quic-memory.md): once
its handshake is over, a server-side connection drops what only the handshake used
(:meth:`MigratingQuicConnection._qmig_release_handshake`), and one table of frame handlers
serves every connection (:class:`_FrameHandlers`).  The private aioquic names these touch are
listed there; ``tests/quic/test_quic_memory.py`` checks that they still exist.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MethodType
from typing import Any, TypeVar, cast

from aioquic import tls
from aioquic._buffer import Buffer  # where it is defined and typed (see quicmig.frames)
from aioquic.quic.connection import (
    EPOCHS,
    MAX_LOCAL_CHALLENGES,
    MAX_NETWORK_PATHS,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
    QuicConnectionError,
    QuicConnectionId,
    QuicNetworkPath,
    QuicReceiveContext,
)
from aioquic.quic.crypto import CryptoContext, CryptoPair, NoCallback
from aioquic.quic.events import QuicEvent
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicStreamFrame
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream, QuicStreamReceiver
from aioquic.tls import Epoch
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from .follower import Follower
from .frames import (
    FRAME_TYPES,
    MAX_POOL_ADDRESSES,
    MIGRATION_TRIGGER,
    POOL_MIGRATION_ADDRESS,
    SERVER_MIGRATED,
    SERVER_MIGRATION,
    STRATEGY_ANNOUNCE,
    STRATEGY_EXPLICIT,
    STRATEGY_POOL,
    STRATEGY_TRIGGER,
    Address,
    Frame,
    FrameError,
    MigrationTrigger,
    PoolMigrationAddress,
    ServerMigrated,
    ServerMigration,
    encode_body,
    encode_transport_parameter,
    find_transport_parameter,
    frame_size,
    pull_frame,
)
from .tickets import StoredTicket, TicketStore

log = logging.getLogger("qmig.migration")
# Key shares a client offers, in order; the server takes the first it supports.  X25519 is
# the cheapest exchange; P-256 is there for servers without it (aioquic does no
# HelloRetryRequest, so a server must find one it supports).
CLIENT_KEY_SHARES = (tls.Group.X25519, tls.Group.SECP256R1)
# Connection IDs a qmig endpoint takes (client) and issues (broker), and network paths a client
# keeps: one per pool address it may probe at once, plus the active path and the one it left.
# aioquic's own limit is 8 of each.
ACTIVE_CONNECTION_ID_LIMIT = MAX_POOL_ADDRESSES + 2

# Connection IDs a server issues, and takes from its client, until it sends a migration frame:
# the one in use and spares for a client that changes address or probes one new server
# address.  A server's own path changes only when its client's address does.
SERVER_CONNECTION_IDS = 4
# Both ends advertise this max_idle_timeout (RFC 9000 10.1: the effective one is the smaller).
# MQTT keep alive is what declares a connection dead; a long freeze (a big broker's
# checkpoint over a slow link, tens of seconds) must not end it at the QUIC layer first.
IDLE_TIMEOUT = 180.0

_REQUIRED_BIT = {
    SERVER_MIGRATION: STRATEGY_EXPLICIT,
    POOL_MIGRATION_ADDRESS: STRATEGY_POOL,
    SERVER_MIGRATED: STRATEGY_ANNOUNCE,
    MIGRATION_TRIGGER: STRATEGY_TRIGGER,
}
_SERVER_SENDS = frozenset({SERVER_MIGRATION, POOL_MIGRATION_ADDRESS, SERVER_MIGRATED})


@dataclass
class MigrationFrameReceived(QuicEvent):
    """An extension frame arrived (``source``: the address it came from)."""

    frame: Frame
    source: Address | None


@dataclass
class MigrationFrameAcknowledged(QuicEvent):
    """The peer acknowledged a migration frame this endpoint sent (the packet carrying it).

    The broker waits for these before it freezes (``MigrationAPI.pre_checkpoint``): a client
    whose SERVER_MIGRATION is still in flight when the broker goes silent cannot learn the
    destination afterwards, as it must drop datagrams from a server address it does not know
    (RFC 9000 section 9).
    """

    frame: Frame


@dataclass
class ServerAddressChanged(QuicEvent):
    """A client's connection moved to a validated new server address."""

    address: Address


@functools.lru_cache(maxsize=1024)
def to_address(addr: NetworkAddress) -> Address:
    """qmig's Address for a socket address (cached: parsing it was 5 % of a client's CPU
    under a flood of datagrams)."""
    host = addr[0]
    if host.startswith("::ffff:"):
        host = host[7:]
    return Address(host, int(addr[1]))


def to_network_address(address: Address, like: NetworkAddress) -> NetworkAddress:
    """The socket address aioquic uses for ``address`` (IPv4-mapped on dual-stack sockets)."""
    if len(like) == 4 and address.version == 4:
        return (f"::ffff:{address.host}", address.port, 0, 0)
    if len(like) == 4:
        return (address.host, address.port, 0, 0)
    return (address.host, address.port)


class AlertCertificateRequired(tls.Alert):
    description = tls.AlertDescription.certificate_required


class ClientCertificateRequired(tls.Context):
    """A server TLS context that demands a client certificate signed by ``client_cafile``.

    It sends a CertificateRequest, refuses an empty Certificate (alert certificate_required),
    and once the client proved it holds the key (CertificateVerify) checks the chain against
    the CA, the validity dates and, where the certificate names its uses, clientAuth (alert
    bad_certificate).  The alert ends the QUIC handshake with CRYPTO_ERROR, before any stream
    data is read: like the TLS listener's CERT_REQUIRED.
    """

    client_cafile: str
    # Set once the client's certificate passed every check (a full handshake only: a PSK
    # handshake has no certificate, see MigratingQuicConnection._qmig_use_tickets).
    certificate_verified: bool

    @classmethod
    def adopt(cls, context: tls.Context, cafile: str) -> ClientCertificateRequired:
        context.__class__ = cls
        assert isinstance(context, ClientCertificateRequired)
        context.client_cafile = cafile
        context.certificate_verified = False
        context._request_client_certificate = True
        return context

    def _server_handle_hello(
        self, input_buf: Buffer, initial_buf: Buffer, handshake_buf: Buffer
    ) -> None:
        """A PSK handshake asks for no certificate: expect the client's Finished next.

        aioquic sends no CertificateRequest when it resumes a session, yet still waits for
        a Certificate, and the client's Finished then ends the handshake with
        unexpected_message.  A session is resumed here only from a ticket that was issued
        after a verified client certificate (see MigratingQuicConnection._qmig_use_tickets),
        so that ticket stands for the certificate.
        """
        super()._server_handle_hello(input_buf, initial_buf, handshake_buf)
        if self._session_resumed and self.state == tls.State.SERVER_EXPECT_CERTIFICATE:
            self._server_expect_finished()

    def _server_handle_certificate(self, input_buf: Buffer) -> None:
        super()._server_handle_certificate(input_buf)
        if self._peer_certificate is None:
            raise AlertCertificateRequired("a client certificate is required")

    def _server_handle_certificate_verify(self, input_buf: Buffer) -> None:
        super()._server_handle_certificate_verify(input_buf)  # the key's signature
        certificate = self._peer_certificate
        assert certificate is not None
        tls.verify_certificate(
            certificate=certificate, chain=self._peer_certificate_chain, cafile=self.client_cafile
        )
        try:
            usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
            raise tls.AlertBadCertificate("the certificate is not for client authentication")
        self.certificate_verified = True


# ---------------------------------------------------------------------- memory (issue #16)
# Every connection's discarded Initial and Handshake epochs point at these two instead of
# their own torn-down keys and packet spaces.  Nothing writes to a discarded epoch's state:
# aioquic only asks whether its keys are valid (they never are: the shared contexts refuse
# keys) and skips the space, whose loss recovery was discarded with it.
class _DiscardedKeys(CryptoContext):
    def setup(self, *, cipher_suite: Any, secret: bytes, version: int) -> None:
        raise RuntimeError("keys set up for a discarded epoch")

    def teardown(self) -> None:
        pass  # nothing to tear down, and the callbacks belong to no connection


DISCARDED_KEYS = CryptoPair()
DISCARDED_KEYS.recv = _DiscardedKeys()
DISCARDED_KEYS.send = _DiscardedKeys()
DISCARDED_SPACE = QuicPacketSpace()
DISCARDED_SPACE.discarded = True

# tls.Context attributes that only the handshake reads (aioquic 1.7): key schedules, offers,
# ephemeral keys, extensions and callbacks into the connection.  A server context in
# SERVER_POST_HANDSHAKE reads only ``state`` and ``_receive_buffer`` (any further handshake
# message is an unexpected_message alert); the connection reads ``alpn_negotiated``,
# ``early_data_accepted`` and ``session_resumed``, which stay, as does ``_peer_certificate``.
TLS_HANDSHAKE_ONLY = (
    "key_schedule", "_key_schedule_psk", "_key_schedule_proxy", "received_extensions",
    "handshake_extensions", "_certificate_request", "_new_session_ticket",
    "_peer_certificate_chain", "_ec_private_keys", "_x25519_private_key", "_x448_private_key",
    "_cipher_suites", "_legacy_compression_methods", "_psk_key_exchange_modes",
    "_signature_algorithms", "_supported_groups", "_supported_versions", "client_random",
    "legacy_session_id", "_enc_key", "_dec_key", "alpn_cb", "update_traffic_key_cb",
    "get_session_ticket_cb", "new_session_ticket_cb", "certificate", "certificate_chain",
    "certificate_private_key", "session_ticket", "server_random", "_expected_verify_data",
)  # fmt: skip

T = TypeVar("T")


class _RefusingReceiver(QuicStreamReceiver):
    """Takes no CRYPTO frame: a server expects no TLS message from its client any more."""

    def handle_frame(self, frame: QuicStreamFrame) -> None:
        # What the TLS context in SERVER_POST_HANDSHAKE answers to any message (RFC 9001
        # section 4.1.3 leaves the client none to send: KeyUpdate is forbidden, section 6,
        # and post-handshake authentication is never requested), before any state changes.
        raise QuicConnectionError(
            error_code=QuicErrorCode.CRYPTO_ERROR + int(tls.AlertDescription.unexpected_message),
            frame_type=QuicFrameType.CRYPTO,
            reason_phrase="no TLS message is expected after the handshake",
        )


# A released server connection's 1-RTT crypto stream once everything it sent (the
# NewSessionTicket) is acknowledged: one for all, since nothing changes its state.  The
# receiver refuses every frame before touching it; the sender is never written to (the TLS
# context's crypto buffers are gone) and, with nothing in flight, never told of a loss.
SPENT_CRYPTO_STREAM = QuicStream(stream_id=None, readable=True, writable=True)
SPENT_CRYPTO_STREAM.receiver = _RefusingReceiver(stream_id=None, readable=True)


class ShortQueue(list[T]):
    """A FIFO for aioquic's queues that are empty nearly all the time, at 1/10th the size.

    A ``deque`` allocates a 64-slot block when it is created: 760 bytes for a queue that
    holds nothing between two datagrams (a connection's events), or nothing ever (DATAGRAM
    frames, which MQTT does not use; path challenges once a path is validated).  A list is
    56 bytes.  aioquic uses only ``append``, ``popleft``, ``[0]``, ``len``, truth, ``in``
    and ``clear`` on them; ``popleft`` is O(n), for n that stays a handful.
    """

    __slots__ = ()

    def popleft(self) -> T:
        return self.pop(0)


class ShortRing(ShortQueue[T]):
    """A :class:`ShortQueue` that keeps only its last ``maxlen`` items, as a bounded deque."""

    __slots__ = ("maxlen",)

    def __init__(self, maxlen: int) -> None:
        super().__init__()
        self.maxlen = maxlen

    def append(self, item: T) -> None:
        super().append(item)
        if len(self) > self.maxlen:
            del self[0]


def short_queue(queue: deque[T]) -> deque[T]:
    """``queue``'s items in a :class:`ShortQueue` (a :class:`ShortRing` if it is bounded).

    Typed as the deque it replaces: aioquic's attributes are declared ``deque``.
    """
    short: ShortQueue[T] = ShortQueue() if queue.maxlen is None else ShortRing(queue.maxlen)
    short.extend(queue)
    return cast("deque[T]", short)


def _shorten_path_queues(path: QuicNetworkPath) -> None:
    if type(path.local_challenges) is deque:
        path.local_challenges = short_queue(path.local_challenges)
        path.remote_challenges = short_queue(path.remote_challenges)


_RELEASED_TLS: dict[type, type] = {}


def _released_tls_class(cls: type[tls.Context]) -> type[tls.Context]:
    """``cls`` with TLS_HANDSHAKE_ONLY as class attributes, all None (one per context class).

    A released context's instance dict drops those names and reads them from here, so the
    dict shrinks from about 45 entries (1.6 KB) to 15 (0.4 KB) and every name still reads
    None, as before the release.
    """
    released = _RELEASED_TLS.get(cls)
    if released is None:
        namespace: dict[str, Any] = dict.fromkeys(TLS_HANDSHAKE_ONLY)
        namespace["__module__"] = __name__
        released = _RELEASED_TLS[cls] = type(f"Released{cls.__name__}", (cls,), namespace)
    return released


_DISCARDED_INITIAL: dict[tuple[int, ...], dict[int, CryptoPair]] = {}


def _discarded_initial(versions: Iterable[int]) -> dict[int, CryptoPair]:
    """A released connection's ``_cryptos_initial``: DISCARDED_KEYS per version, shared.

    aioquic only reads it after the Initial epoch is discarded (a late Initial, which then
    does not decrypt), so one read-only table serves every connection of the same versions.
    """
    key = tuple(versions)
    table = _DISCARDED_INITIAL.get(key)
    if table is None:
        table = _DISCARDED_INITIAL[key] = dict.fromkeys(key, DISCARDED_KEYS)
    return table


Handler = Callable[..., None]
_FRAME_HANDLERS = "_QuicConnection__frame_handlers"


class _FrameHandlers(Mapping[int, tuple[Handler, frozenset[Epoch]]]):
    """aioquic's ``__frame_handlers`` table for one connection, from a table shared by all.

    aioquic builds a dict of 33 (bound method, frozenset of epochs) pairs in every
    connection's ``__init__``: about 12 KB each, the epochs sets alone 8 KB.  The
    functions and epochs are the same for every connection, so one table holds them and
    this view binds the function to its connection when a frame is looked up (aioquic's
    only use: ``self.__frame_handlers[frame_type]``, KeyError for an unknown type).
    """

    __slots__ = ("_connection",)
    _table: dict[int, tuple[Handler, frozenset[Epoch]]] = {}

    def __init__(self, connection: QuicConnection) -> None:
        self._connection = connection

    @classmethod
    def share(cls, handlers: Mapping[int, tuple[Any, frozenset[Epoch]]]) -> None:
        """Take the functions and epochs of aioquic's table (the first connection's)."""
        if cls._table:
            return
        interned: dict[frozenset[Epoch], frozenset[Epoch]] = {}
        for frame_type, (method, epochs) in handlers.items():
            func = method.__func__ if isinstance(method, MethodType) else method
            cls._table[frame_type] = (func, interned.setdefault(epochs, epochs))

    def __getitem__(self, frame_type: int) -> tuple[Handler, frozenset[Epoch]]:
        func, epochs = self._table[frame_type]
        return MethodType(func, self._connection), epochs

    def __iter__(self) -> Iterator[int]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


class MigratingQuicConnection(QuicConnection):
    """QuicConnection plus qmig's transport parameter, frames and client probing."""

    qmig_local: int
    qmig_peer: int | None
    follower: Follower | None
    # Bounded receive window (see _write_stream_limits); None keeps aioquic's doubling.
    receive_window: int | None = None
    # Client: when a packet from the server last decrypted and was processed (an ACK, a
    # PATH_RESPONSE, anything): proof the server is alive, however busy (loop time).
    qmig_heard_at: float | None = None
    # Streams whose receive window stands still (pause_receiving, _write_stream_limits):
    # immutable, so that the empty one is shared by every connection (a set is 216 bytes).
    receive_paused: frozenset[int] = frozenset()
    # Server side: the CA that client certificates must chain to; None asks for none.
    client_cafile: str | None = None
    # Server side: where session tickets are kept; None issues none (no resumption).
    ticket_store: TicketStore | None = None
    # Server side, resumed connections: the stored ticket this handshake resumed.
    resumed_ticket: StoredTicket | None = None

    @classmethod
    def adopt(
        cls, connection: QuicConnection, strategies: int, follower: Follower | None = None
    ) -> MigratingQuicConnection:
        connection.__class__ = cls
        assert isinstance(connection, MigratingQuicConnection)
        connection._qmig_setup(strategies, follower)
        return connection

    def _qmig_setup(self, strategies: int, follower: Follower | None) -> None:
        self.qmig_local = strategies
        self.qmig_peer = None
        self.follower = follower
        self.qmig_pending: list[Frame] = []
        self.qmig_last_received: float | None = None
        # The silence (keyed by when the path last spoke) already reported to the follower:
        # each silence is reported once, so a follower that does nothing about it (strategy
        # none, nothing announced) does not make the timer fire again and again.
        self._qmig_silence_handled: float | None = None
        self._qmig_active_addr: NetworkAddress | None = None
        self._qmig_spacing_window: float | None = None  # see _probe_spacing
        self._qmig_spacing = 0.0
        self.receive_window = None
        # Room for a connection ID per pool address (see _replenish_connection_ids); a
        # server makes room for more once it sends a migration frame.
        self._qmig_cid_target = (
            ACTIVE_CONNECTION_ID_LIMIT if self._is_client else SERVER_CONNECTION_IDS
        )
        self._local_active_connection_id_limit = self._qmig_cid_target
        # Server side: what the handshake left is dropped in two steps (see _qmig_release).
        self._qmig_released = False
        self._qmig_release_pending = not self._is_client
        # Name-mangled private attribute of QuicConnection (self.__frame_handlers), which
        # mypy knows only by its unmangled name: reached through the instance's __dict__.
        state = vars(self)
        handlers = state[_FRAME_HANDLERS]
        for frame_type in FRAME_TYPES:
            handlers[frame_type] = (MigratingQuicConnection._handle_migration_frame, EPOCHS("1"))
        _FrameHandlers.share(handlers)
        state[_FRAME_HANDLERS] = _FrameHandlers(self)
        self._events = short_queue(self._events)
        self._datagrams_pending = short_queue(self._datagrams_pending)

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        context = self.tls
        if self._is_client:
            groups = [group for group in CLIENT_KEY_SHARES if group in context._supported_groups]
            context._supported_groups = groups or context._supported_groups
            return
        if self.client_cafile is not None:
            ClientCertificateRequired.adopt(context, self.client_cafile)
        if self.ticket_store is not None:
            self._qmig_use_tickets(self.ticket_store)

    # ------------------------------------------------------------------ session tickets
    def _qmig_use_tickets(self, store: TicketStore) -> None:
        """Issue session tickets into ``store`` and resume handshakes from it; no 0-RTT.

        Per connection (aioquic's server hands every connection the same two callbacks),
        because a ticket records how its connection was authenticated: with
        ``client_cafile`` set, only a ticket issued after a verified client certificate (or
        resumed from such a ticket) is honoured, since aioquic sends no CertificateRequest
        in a PSK handshake.

        0-RTT is refused: MQTT in early data (CONNECT, PUBLISH) can be replayed by anyone
        who recorded it.  Tickets announce no early data (``_max_early_data``), and a
        client that sends early data anyway (aioquic's server would accept it whatever
        the ticket said) gets no 0-RTT keys: EncryptedExtensions then says early data was
        rejected, and its 0-RTT packets do not decrypt, so it sends their data again in
        1-RTT packets.
        """
        context = self.tls
        context._max_early_data = None
        context.get_session_ticket_cb = self._qmig_fetch_ticket
        context.new_session_ticket_cb = self._qmig_issue_ticket
        install_key = context.update_traffic_key_cb

        def update_traffic_key(
            direction: tls.Direction, epoch: Epoch, cipher_suite: tls.CipherSuite, secret: bytes
        ) -> None:
            if epoch == Epoch.ZERO_RTT:
                context.early_data_accepted = False
                return
            install_key(direction, epoch, cipher_suite, secret)

        context.update_traffic_key_cb = update_traffic_key

    def _qmig_fetch_ticket(self, identity: bytes) -> tls.SessionTicket | None:
        store = self.ticket_store
        if store is None:
            return None
        entry = store.take(identity, certified_only=self.client_cafile is not None)
        self.resumed_ticket = entry
        return entry.ticket if entry is not None else None

    def _qmig_issue_ticket(self, ticket: tls.SessionTicket) -> None:
        store = self.ticket_store
        if store is None:
            return
        context = self.tls
        resumed = self.resumed_ticket if context.session_resumed else None
        not_after = None
        if resumed is not None:  # a ticket for a ticket: the same standing, no longer
            certified = resumed.certified
            not_after = resumed.ticket.not_valid_after
        elif isinstance(context, ClientCertificateRequired):
            certified = context.certificate_verified
            peer = context._peer_certificate
            if peer is not None:
                not_after = peer.not_valid_after_utc
        else:
            certified = False
        if self.client_cafile is not None and not certified:
            return  # it could never be honoured
        store.add(ticket, certified=certified, not_after=not_after)

    # ------------------------------------------------------------------ connection IDs
    def _replenish_connection_ids(self) -> None:
        """Issue as many connection IDs as the peer takes, up to ``_qmig_cid_target``.

        aioquic issues at most eight (this replaces its loop, which does the same with
        another limit).  A client following a pool probes every pool address at once, and
        each probed address needs a connection ID of its own (RFC 9000 section 9.5 forbids
        using one towards two addresses), so with eight a pool of more than about seven
        addresses left the last ones unprobed and the client behind.  A server issues
        SERVER_CONNECTION_IDS until it sends a migration frame (:meth:`send_migration_frame`
        then raises the target to ACTIVE_CONNECTION_ID_LIMIT): each costs about 550 bytes,
        and most clients are never told to move.  The new IDs go out in the packets that
        carry the frame, before a move can freeze the broker.
        """
        limit = min(self._remote_active_connection_id_limit, self._qmig_cid_target)
        while len(self._host_cids) < limit:
            self._host_cids.append(
                QuicConnectionId(
                    cid=os.urandom(self._configuration.connection_id_length),
                    sequence_number=self._host_cid_seq,
                    stateless_reset_token=os.urandom(16),
                )
            )
            self._host_cid_seq += 1

    def _add_network_path(self, network_path: QuicNetworkPath) -> None:
        """Keep up to ACTIVE_CONNECTION_ID_LIMIT paths instead of aioquic's eight.

        Past eight, aioquic evicts the oldest unvalidated path and retires its connection
        ID: a client probing a larger pool would evict its own probes, and while the broker
        is frozen no retired ID is replaced, so the probing starves.
        """
        _shorten_path_queues(network_path)
        if MAX_NETWORK_PATHS <= len(self._network_paths) < ACTIVE_CONNECTION_ID_LIMIT:
            self._network_paths.append(network_path)
        else:
            super()._add_network_path(network_path)

    # ------------------------------------------------------------------ transport parameter
    def _serialize_transport_parameters(self) -> bytes:
        data = super()._serialize_transport_parameters()
        if self.qmig_local:
            data += encode_transport_parameter(self.qmig_local)
        return data

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        if not from_session_ticket:
            self.qmig_peer = find_transport_parameter(data)

    def peer_accepts(self, strategy_bits: int) -> bool:
        return bool(self.qmig_peer and self.qmig_peer & strategy_bits)

    # ------------------------------------------------------------------ sending frames
    def send_migration_frame(self, frame: Frame) -> bool:
        """Queue ``frame`` if the peer advertised support for it; False if it did not."""
        if not self.peer_accepts(_REQUIRED_BIT[frame.type]):
            return False
        self.qmig_pending.append(frame)
        if self._qmig_cid_target < ACTIVE_CONNECTION_ID_LIMIT:
            self._qmig_cid_target = ACTIVE_CONNECTION_ID_LIMIT  # room to follow a pool
            if self._handshake_complete:  # else aioquic replenishes when it completes
                self._replenish_connection_ids()
        return True

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        super()._write_connection_limits(builder=builder, space=space)
        while self.qmig_pending:
            frame = self.qmig_pending[0]
            body = encode_body(frame)
            buf = builder.start_frame(
                frame.type,
                capacity=frame_size(frame),  # the 8-byte type too, or a full packet overflows
                handler=self._on_frame_delivery,
                handler_args=(frame,),
            )
            buf.push_bytes(body)
            self.qmig_pending.pop(0)

    def _on_frame_delivery(self, delivery: QuicDeliveryState, frame: Frame) -> None:
        if delivery == QuicDeliveryState.LOST:
            self.qmig_pending.append(frame)  # retransmit in a new packet
        elif delivery == QuicDeliveryState.ACKED:
            self._events.append(MigrationFrameAcknowledged(frame))

    # ------------------------------------------------------------------ receive window
    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        """MAX_STREAM_DATA from a bounded window that stands still while the stream is paused.

        aioquic hands all stream data to the application at once and doubles the limit
        whenever half of it is used, so a peer never feels a consumer that cannot keep up
        (the bridge's slow local TCP client).  With ``receive_window`` set the limit is
        ``highest_offset + receive_window``: at most one window is in flight beyond what
        was handed over, and while the stream is paused (:meth:`pause_receiving`) no credit is
        granted at all, so the peer's sender blocks on flow control.  It is raised only
        once half a window is used, to batch MAX_STREAM_DATA frames as aioquic does.  A
        frame that was lost (``max_stream_data_local_sent`` reset by aioquic's delivery
        handler) is sent again with the current limit, paused or not.

        Connection-level MAX_DATA keeps aioquic's doubling: the bridge, which opts in,
        carries each client on one stream, so the stream limit already bounds the
        connection (a user with many streams would have to bound MAX_DATA too).  The
        initial limit comes from the transport parameters (``max_stream_data``): set it
        to the window too, or the first window is that one.
        """
        window = self.receive_window
        if window is None:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
            return
        if not stream.max_stream_data_local:
            return  # a locally created unidirectional stream receives nothing
        highest = stream.receiver.highest_offset
        if (
            stream.stream_id not in self.receive_paused
            and not stream.receiver.is_finished
            and highest + window - stream.max_stream_data_local >= window // 2
        ):
            stream.max_stream_data_local = highest + window
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            stream_id = stream.stream_id
            assert stream_id is not None  # None only for a stream not yet opened
            buf.push_uint_var(stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local
            if self._quic_logger is not None:
                frames = builder.quic_logger_frames
                assert frames is not None  # a list while a packet is open, with a logger
                frames.append(
                    self._quic_logger.encode_max_stream_data_frame(
                        maximum=stream.max_stream_data_local, stream_id=stream_id
                    )
                )

    def pause_receiving(self, stream_id: int) -> None:
        """With ``receive_window`` set: grant the peer no more credit on ``stream_id``."""
        self.receive_paused = self.receive_paused | {stream_id}

    def resume_receiving(self, stream_id: int) -> None:
        """Grant credit on ``stream_id`` again (sent with the next packet)."""
        self.receive_paused = self.receive_paused - {stream_id}

    # ------------------------------------------------------------------ receiving frames
    def _handle_migration_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        try:
            frame = pull_frame(frame_type, buf)
        except FrameError as exc:
            raise QuicConnectionError(
                error_code=QuicErrorCode.FRAME_ENCODING_ERROR,
                frame_type=frame_type,
                reason_phrase=str(exc),
            ) from exc
        if not self.qmig_local or (frame_type in _SERVER_SENDS) != self._is_client:
            raise QuicConnectionError(
                error_code=QuicErrorCode.PROTOCOL_VIOLATION,
                frame_type=frame_type,
                reason_phrase="unexpected migration frame",
            )
        source = to_address(context.network_path.addr)
        follower = self.follower
        if follower is not None:
            now = context.time
            if isinstance(frame, ServerMigration):
                follower.on_server_migration(frame, now, source)
            elif isinstance(frame, PoolMigrationAddress):
                follower.on_pool(frame, now)
            elif isinstance(frame, ServerMigrated):
                follower.on_server_migrated(frame, source, now)
        self._events.append(MigrationFrameReceived(frame, source))

    def trigger_migration(self, reason: int, hint: str = "") -> bool:
        """Client side: ask the broker to move (it forwards this to its orchestrator)."""
        return self.send_migration_frame(MigrationTrigger(reason, hint))

    # ------------------------------------------------------------------ memory
    def _qmig_release(self) -> None:
        """Called after each datagram of a server connection until both steps have run."""
        if not self._qmig_released:
            self._qmig_release_handshake()
        if self._qmig_released and self._qmig_release_crypto_stream():
            self._qmig_release_pending = False
            ReleasedServerConnection.compact(self)

    def _qmig_release_handshake(self) -> None:
        """A server connection whose handshake is over drops what only the handshake used.

        The first step (:meth:`_qmig_release`); it runs once the handshake is complete
        (the server then has handled the client's Finished and queued its NewSessionTicket
        on the 1-RTT crypto stream) and the Initial and Handshake epochs are discarded (so
        their packets no longer decrypt: a late retransmitted CRYPTO frame of theirs is
        dropped as aioquic drops it).  Private aioquic names it touches:

        - ``_crypto_buffers``: three 16 KB buffers the TLS context writes its handshake
          messages into.  A server context past its Finished writes nothing (and aioquic
          copies the buffers of the dict, now empty, after each CRYPTO frame).
        - ``_crypto_streams``: the Initial and Handshake entries go (with unacknowledged
          handshake data); aioquic reads them only once those epochs' keys are valid.
          The 1-RTT one stays (NewSessionTicket, retransmitted until acknowledged).
        - ``_cryptos``, ``_cryptos_initial``: torn-down keys of discarded epochs, and 0-RTT
          keys never set up, become the shared DISCARDED_KEYS.  The 1-RTT keys stay (key
          updates derive from them); without a QuicLogger their logging callbacks do nothing.
        - ``_spaces``, ``_loss.spaces``: discarded packet spaces become DISCARDED_SPACE,
          and loss recovery keeps only the 1-RTT space.
        - ``tls``: the attributes in TLS_HANDSHAKE_ONLY leave its instance dict and read
          None from its class (:func:`_released_tls_class`).
        - ``_network_paths``: a path's two challenge deques become :class:`ShortQueue`s
          (paths added later get them in ``_add_network_path``).
        """
        if self._qmig_released or self._is_client or not self._handshake_complete:
            return
        spaces = self._spaces
        done = (Epoch.INITIAL, Epoch.HANDSHAKE)
        if not all(spaces[epoch].discarded for epoch in done):
            return
        self._qmig_released = True
        self._crypto_buffers = {}
        cryptos = self._cryptos
        for epoch in done:
            self._crypto_streams.pop(epoch, None)
            cryptos[epoch] = DISCARDED_KEYS
            spaces[epoch] = DISCARDED_SPACE
        zero_rtt = cryptos[Epoch.ZERO_RTT]
        if not zero_rtt.recv.is_valid() and not zero_rtt.send.is_valid():
            cryptos[Epoch.ZERO_RTT] = DISCARDED_KEYS
        self._cryptos_initial = _discarded_initial(self._cryptos_initial)
        self._loss.spaces = [spaces[Epoch.ONE_RTT]]
        if self._quic_logger is None:  # the callbacks only log key updates to it
            one_rtt = cryptos[Epoch.ONE_RTT]
            for keys in (one_rtt.recv, one_rtt.send):
                keys._setup_cb = keys._teardown_cb = NoCallback
        context = self.tls
        context.__class__ = _released_tls_class(type(context))
        state = vars(context)
        context.__dict__ = {k: v for k, v in state.items() if k not in TLS_HANDSHAKE_ONLY}
        for path in self._network_paths:
            _shorten_path_queues(path)

    def _qmig_release_crypto_stream(self) -> bool:
        """The 1-RTT crypto stream becomes SPENT_CRYPTO_STREAM once all it sent is acked.

        Called after each datagram from the release on (the acknowledgement of the
        NewSessionTicket comes in one).  Until then the stream may have to retransmit;
        after, its sender holds nothing and aioquic only asks ``buffer_is_empty`` (True)
        and hands a CRYPTO frame from the client to the receiver, which refuses it as the
        TLS context did.  A stale loss report for an old packet goes to the old stream,
        which the packet's handler still holds.  About 3 KB per connection.
        """
        stream = self._crypto_streams.get(Epoch.ONE_RTT)
        if stream is None:
            return True
        sender = stream.sender
        if sender._buffer_start != sender._buffer_stop or len(sender._pending):
            return False
        self._crypto_streams[Epoch.ONE_RTT] = SPENT_CRYPTO_STREAM
        return True

    # ------------------------------------------------------------------ client probing
    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        follower = self.follower
        if follower is not None and self._is_client and self._network_paths:
            known = any(path.addr == addr for path in self._network_paths)
            if not known and follower.acceptable(to_address(addr)):
                # RFC 9000 section 9 makes clients drop datagrams from unknown server
                # addresses; an announced or pooled one is known to us, so open a path.
                self._open_probe_path(addr)
            if known and addr == self._network_paths[0].addr:
                self.qmig_last_received = now
        close_at = self._close_at
        super().receive_datagram(data, addr, now)
        if self._is_client and self._close_at != close_at:
            self.qmig_heard_at = now  # aioquic re-arms its idle timer per processed packet
        if self._qmig_release_pending:
            self._qmig_release()
        if follower is not None:
            self._qmig_after_receive(now)
            self._qmig_check_false_alarm(now)
            if (
                follower.probing
                and self._network_paths
                and addr != self._network_paths[0].addr
                and follower.heard_from(to_address(addr), now, self._probe_spacing())
            ):
                self._open_probe_path(addr)  # challenge now: the broker is back there

    def _open_probe_path(self, addr: NetworkAddress) -> QuicNetworkPath | None:
        for index, path in enumerate(self._network_paths):
            if path.addr == addr:
                if index == 0:
                    return path  # already there
                if not path.is_validated:
                    path.local_challenge_sent = False  # challenge again
                    return path
                # A path validated earlier (the broker's former address, before it moved
                # away and back): its state is stale and aioquic never re-validates a
                # validated path, so replace it by a fresh probe with a new connection ID.
                self._network_paths.remove(path)
                if path.peer_cid is not None:  # never the case today: do not leak it
                    self._retire_peer_cid(path.peer_cid)
                break
        if not self._peer_cid_available:
            log.debug("no spare connection ID to probe %s", addr)
            return None
        path = QuicNetworkPath(addr)
        # A connection ID must not be used towards two addresses (RFC 9000 section 9.5);
        # aioquic switches to this reserved one when the path validates.
        path.peer_cid = self._peer_cid_available.pop(0)
        self._add_network_path(path)
        return path

    def _send_probing_frames(
        self, network_path: QuicNetworkPath, now: float
    ) -> list[tuple[bytes, NetworkAddress]]:
        """Probes on a path other than the active one stay out of its loss recovery.

        aioquic registers them with the one congestion controller and loss detector it has,
        which is harmless for its single preferred-address probe but not for a client that
        challenges several server addresses every ``probe_interval`` (RFC 9000 section 9.4
        keeps congestion control per path): probes to addresses where nothing answers would
        fill the active path's congestion window, so that nothing else can be sent there,
        keep postponing its PTO (it counts from the last ack-eliciting packet sent), keep
        "data outstanding" true for the silence check, and count as congestion losses.  A
        probe needs no retransmission (the next one carries a new challenge) and a
        PATH_RESPONSE validates a path whatever happens to the packet that asked for it.
        """
        first = self._packet_number
        last_sent = self._loss._time_of_last_sent_ack_eliciting_packet
        datagrams = super()._send_probing_frames(network_path=network_path, now=now)
        active = self._network_paths[0] if self._network_paths else None
        if self._is_client and self.follower is not None and network_path is not active:
            self._qmig_untrack(range(first, self._packet_number))
            self._loss._time_of_last_sent_ack_eliciting_packet = last_sent
        return datagrams

    def _qmig_untrack(self, packet_numbers: range) -> None:
        space = self._spaces[Epoch.ONE_RTT]
        for number in packet_numbers:
            packet = space.sent_packets.pop(number, None)
            if packet is None:
                continue
            if packet.is_ack_eliciting:
                space.ack_eliciting_in_flight -= 1
            if packet.in_flight:
                self._loss._cc.on_packets_expired(packets=[packet])

    def _qmig_after_receive(self, now: float) -> None:
        follower = self.follower
        assert follower is not None
        active = self._network_paths[0].addr if self._network_paths else None
        if self._qmig_active_addr is None:
            self._qmig_active_addr = active
            if active is not None:
                follower.current = to_address(active)
            return
        if active != self._qmig_active_addr and active is not None:
            self._qmig_active_addr = active
            address = to_address(active)
            log.debug("connection moved to server address %s", address)
            follower.on_validated(address, now)
            self.qmig_last_received = now
            self._retransmit_in_flight(now)
            self._events.append(ServerAddressChanged(address))

    def _retransmit_in_flight(self, now: float) -> None:
        """After moving, resend what the old path swallowed instead of waiting out the
        PTO backoff that built up while the broker was frozen (RFC 9002 section 6.2)."""
        loss = self._loss
        for space in loss.spaces:
            if not space.is_application_data or not space.sent_packets:
                continue
            packets = [p for p in space.sent_packets.values() if p.is_ack_eliciting]
            if packets:
                loss._on_packets_lost(congestion_event=False, now=now, packets=packets, space=space)
        loss._pto_count = 0

    def _qmig_check_false_alarm(self, now: float) -> None:
        """Silence started probing, then the current path spoke again: it was no move."""
        follower = self.follower
        if follower is None or not follower.probing or not follower.records:
            return
        record = follower.records[-1]
        heard = self.qmig_last_received
        if (
            record.trigger in ("loss", "pool")
            and heard is not None
            and record.probing_since is not None
            and heard > record.probing_since
        ):
            log.debug("false alarm: server address %s spoke again", follower.current)
            follower.cancel_false_alarm()
            if self._loss._pto_count:
                # The silence was a freeze the broker came back from where it was: what
                # it swallowed goes again now, not after the PTO backoff built meanwhile.
                self._retransmit_in_flight(now)

    def _awaiting_acks(self) -> bool:
        space = self._spaces.get(Epoch.ONE_RTT)
        return space is not None and bool(space.ack_eliciting_in_flight)

    def _silent(self, now: float) -> bool:
        if self.qmig_last_received is None or not self._awaiting_acks():
            return False
        assert self.follower is not None
        return now - self.qmig_last_received >= self.follower.silence

    def get_timer(self) -> float | None:
        timer = super().get_timer()
        follower = self.follower
        if follower is None or self._close_at is None:  # not connected yet
            return timer
        candidates = [t for t in (timer, follower.next_timer()) if t is not None]
        if (
            not follower.probing
            and self.qmig_last_received is not None
            and self.qmig_last_received != self._qmig_silence_handled
            and self._awaiting_acks()
        ):  # only a silence with data outstanding is worth waking up for
            candidates.append(self.qmig_last_received + follower.silence)
        return min(candidates) if candidates else None

    def handle_timer(self, now: float) -> None:
        if self._close_at is None:  # not connected yet: aioquic has no timer to handle
            return
        super().handle_timer(now)
        follower = self.follower
        if follower is None or not self._network_paths:
            return
        if (
            not follower.probing
            and self.qmig_last_received != self._qmig_silence_handled
            and self._silent(now)
        ):
            follower.on_silence(now)
            self._qmig_silence_handled = self.qmig_last_received  # once per silence
        self._qmig_check_false_alarm(now)
        like = self._network_paths[0].addr
        for address in follower.due_probes(now, self._probe_spacing()):
            self._open_probe_path(to_network_address(address, like))

    def _probe_spacing(self) -> float:
        """The shortest interval between two challenges on one path.

        aioquic keeps the last ``MAX_LOCAL_CHALLENGES`` challenges of a path and ignores a
        PATH_RESPONSE to an older one; challenging every 20 ms, a path with a round trip
        above 80-100 ms would never validate.  Spacing them by twice the current round trip
        over (MAX_LOCAL_CHALLENGES - 1) lets a path up to twice as far as the current one
        validate; on a LAN the floor stays far below ``probe_interval``.

        It is taken once per migration window, when probing starts: after the thaw the
        broker acknowledges packets sent before the freeze, and those round-trip samples,
        as long as the freeze, would stretch the floor to half a second just when the
        destination answers.
        """
        follower = self.follower
        window = follower.window_until if follower is not None else None
        if window is not None and window == self._qmig_spacing_window:
            return self._qmig_spacing
        loss = self._loss
        rtt = max(loss._rtt_smoothed, loss._rtt_latest) if loss._rtt_initialized else 0.0
        spacing = 2 * rtt / (MAX_LOCAL_CHALLENGES - 1)
        if window is not None:
            self._qmig_spacing_window, self._qmig_spacing = window, spacing
        return spacing


class ReleasedServerConnection(MigratingQuicConnection):
    """A released server connection: attributes that hold the same value in every one of
    them (:data:`RELEASED_DEFAULTS`) are read from this class instead of its instance dict.

    aioquic's connection has about 100 attributes; past 85 a dict takes a 256-slot table
    (3.3 KB), below it a 128-slot one (1.5 KB).  These are settled once the handshake and
    the release are over (set during the handshake, or never by a server: no logger, no
    retry token handler, no follower); should aioquic set one again, it simply goes back
    into the instance dict.
    """

    @classmethod
    def compact(cls, connection: MigratingQuicConnection) -> None:
        """Make ``connection`` one, dropping its instance entries that equal the defaults."""
        state = vars(connection)
        connection.__class__ = cls
        connection.__dict__ = {
            name: value
            for name, value in state.items()
            if not (
                name in RELEASED_DEFAULTS
                and type(value) is type(RELEASED_DEFAULTS[name])
                and value == RELEASED_DEFAULTS[name]
            )
        }


# Values every released server connection has (aioquic 1.7 names, then the adapter's).
RELEASED_DEFAULTS: dict[str, object] = {
    "_is_client": False,
    "_handshake_complete": True,
    "_handshake_confirmed": True,
    "_connect_called": False,
    "_crypto_frame_type": int(QuicFrameType.CRYPTO),
    "_crypto_packet_version": 1,
    "_version": 1,
    "_quic_logger": None,
    "_session_ticket_fetcher": None,
    "_session_ticket_handler": None,
    "_token_handler": None,
    "_remote_preferred_address": None,
    "_retry_count": 0,
    "_retry_source_connection_id": None,
    "_peer_token": b"",
    "_version_negotiated_compatible": True,
    "_version_negotiated_incompatible": False,
    "_remote_max_datagram_frame_size": None,
    "follower": None,
    "qmig_last_received": None,
    "_qmig_silence_handled": None,
    "_qmig_active_addr": None,
    "_qmig_spacing_window": None,
    "_qmig_spacing": 0.0,
    "_qmig_released": True,
    "_qmig_release_pending": False,
    "receive_window": None,
}
for _name, _value in RELEASED_DEFAULTS.items():
    setattr(ReleasedServerConnection, _name, _value)
