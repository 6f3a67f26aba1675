"""The broker's rules: sessions, routing, retained messages, wills, timers and redirects.

:class:`Broker` is pure: it never touches a socket or a clock of its own (``clock`` is
injected), so every rule is unit-testable.  The asyncio layer in :mod:`broker.server` owns
the transports, calls :meth:`Broker.tick` periodically, flushes :meth:`take_dirty`, and,
while :attr:`Broker.replaying`, calls :meth:`Broker.step_replays` once per event-loop turn.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mqttproto.errors import MQTTError, ProtocolError
from mqttproto.packets import MQTT_5, Connect, Publish, Subscribe, Will
from mqttproto.properties import PropertyId
from mqttproto.reasons import ReasonCode
from mqttproto.topics import (
    parse_shared,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)

from .auth import Authenticator
from .config import BrokerConfig
from .connection import BrokerConnection, State
from .provisional import DEFERRED_OVERHEAD, Deferred, Provisional
from .session import (
    DELIVERY_OVERHEAD,
    NEVER_EXPIRES,
    Delivery,
    Message,
    RetainedReplay,
    Session,
    SubOptions,
    message_size,
)
from .store import MemoryStore, Store, WillEntry

log = logging.getLogger("qmig.broker")
P = PropertyId
# MIGRATION_TRIGGER is authorized like a PUBLISH to this topic: with an ACL, a client needs
# "topic write $qmig/migrate" (or readwrite, or a pattern line); "#" never grants it, as
# wildcards do not match $-topics (MQTT-4.7.2-1).
MIGRATE_TOPIC = "$qmig/migrate"

# Retained messages on subscribe are sent in batches, one per connection and event-loop
# turn, so that a SUBSCRIBE matching 100,000 of them neither queues its whole answer at once
# nor holds up other clients (EMQX paces its retainer likewise: flow_control.
# batch_deliver_number).  A batch examines at most REPLAY_STEP_MESSAGES and adds about
# REPLAY_STEP_BYTES of output; a turn examines at most REPLAY_TURN_MESSAGES over all
# connections.  A connection paused by its transport (a full socket or QUIC stream) gets
# no batch until it drains, and QoS 1/2 messages wait for room in the in-flight window.
REPLAY_STEP_MESSAGES = 1024
REPLAY_STEP_BYTES = 64 << 10
REPLAY_TURN_MESSAGES = 4096


@dataclass
class Stats:
    """Counters published under ``$SYS/broker/`` (mosquitto's topic names)."""

    messages_received: int = 0
    messages_sent: int = 0
    publish_received: int = 0
    dropped: int = 0
    protocol_errors: int = 0
    connections_total: int = 0
    # Messages refused by a queue byte budget (also in ``dropped``), and connections closed
    # by a limit on bytes held for them (unread output, incomplete packets) or its timeout.
    quota_dropped: int = 0
    limit_closed: int = 0


class Broker:
    """Sessions and routing shared by all connections of all transports."""

    def __init__(
        self,
        config: BrokerConfig | None = None,
        store: Store | None = None,
        clock: Callable[[], float] = time.monotonic,
        version: str = "qmig",
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or BrokerConfig()
        self.store: Store = store or MemoryStore()
        self.now = clock
        self.wall = wall  # Unix time: deadlines that must hold across a restore elsewhere
        self.version = version
        self.started_at = clock()
        self.stats = Stats()
        self.auth = Authenticator.from_files(
            self.config.password_file, self.config.acl_file, self.config.allow_anonymous
        )
        self._acl = self.config.acl_file is not None
        self.connections: set[BrokerConnection] = set()
        self.redirect: tuple[str, bool] | None = (
            (self.config.redirect, self.config.redirect_permanent) if self.config.redirect else None
        )
        self._dirty: set[BrokerConnection] = set()
        self._wills: dict[str, WillEntry] = {}
        self._expiring: dict[str, float] = {}
        self._next_sys = self.started_at
        self.wakeup: Callable[[], None] = lambda: None
        # Byte budgets.  queued_bytes: messages held in sessions' queues and in-flight
        # windows, each message once plus DELIVERY_OVERHEAD per delivery holding it.
        # incomplete_bytes: partial packets the connections' readers hold; _incomplete:
        # the connections holding some, oldest first (the first shed when over the cap).
        self.queued_bytes = 0
        self._over_total = False
        self._quota_refused = 0
        self.incomplete_bytes = 0
        self._incomplete: dict[BrokerConnection, None] = {}
        # Connections with a retained replay that can make progress, in turn order.
        self._replay_ready: dict[BrokerConnection, None] = {}
        # A durable store (broker.persist) is told of every change (self.journal).  In
        # strict mode PUBACK, PUBREC and PUBCOMP for inbound messages wait behind a
        # durability barrier: held_acks collects them, ack_wakeup asks the I/O layer for a
        # commit, and release_acks() sends the ones taken before it once it is durable.
        self.journal = self.store.journaling
        self.strict = self.journal and self.config.persistence_sync == "strict"
        self.held_acks: list[tuple[BrokerConnection, bytes, int]] = []
        self.ack_wakeup: Callable[[], None] = lambda: None
        # A post-copy migration's commit point (broker.provisional): None when not moving.
        self.provisional: Provisional | None = None

    # ----------------------------------------------------------------- durability
    def restore(self, wall: float) -> None:
        """Load the durable store (``wall``: Unix time now): sessions offline, their
        queues charged to the byte budgets, expiry timers and delayed wills armed."""
        now = self.now()
        for client_id, entry in self.store.restore(now, wall).items():
            self._wills[client_id] = entry
        for session in self.store.sessions():
            if session.expires_at is not None:
                self._expiring[session.client_id] = session.expires_at
            for delivery in (*session.pending, *session.inflight.values()):
                message = delivery.message
                cost = (message.size or message_size(message)) + DELIVERY_OVERHEAD
                message.holders += 1
                delivery.held = cost
                session.held_bytes += cost
                self.queued_bytes += cost

    def send_ack(self, conn: BrokerConnection, data: bytes, durable: bool = True) -> None:
        """Send an acknowledgement that commits state: now, or once that state is durable
        (``durable`` ones in strict mode) and committed by a migration (while provisional).
        It goes out on the channel of the packet it answers, whenever it goes."""
        channel = conn.rx_channel
        if durable and self.strict:
            if not self.held_acks:
                self.ack_wakeup()
            self.held_acks.append((conn, data, channel))
        elif self.provisional is not None:
            self.provisional.acks.append((conn, data, channel))
        else:
            conn.send_bytes(data, channel)

    def take_acks(self) -> list[tuple[BrokerConnection, bytes, int]]:
        """The acknowledgements the next commit makes durable (taken before it begins)."""
        acks, self.held_acks = self.held_acks, []
        return acks

    def release_acks(self, acks: list[tuple[BrokerConnection, bytes, int]]) -> None:
        """The commit after :meth:`take_acks` is durable: send what it covered (or, while
        provisional, hold it on for the migration's commit)."""
        if self.provisional is not None:
            self.provisional.acks.extend(acks)
            return
        for conn, data, channel in acks:
            if conn.state is State.CONNECTED and not conn.closing:
                conn.send_bytes(data, channel)

    # ----------------------------------------------------------------- migration commit point
    def begin_provisional(self, seconds: float) -> None:
        """Hold back acknowledgements and QoS 2 routing (broker.provisional) for at most
        ``seconds``, until :meth:`end_provisional`."""
        deadline = self.wall() + seconds
        if self.provisional is None:
            self.provisional = Provisional(deadline)
        else:
            self.provisional.deadline = deadline

    def defer_qos2(self, conn: BrokerConnection, topic: str, packet: Publish) -> bool:
        """Keep an inbound QoS 2 message until the commit (rule 3); False: over budget."""
        held = self.provisional
        assert held is not None  # only while provisional
        cost = len(topic) + len(packet.payload) + DEFERRED_OVERHEAD
        total = self.config.max_queued_bytes_total
        if total and self.queued_bytes + cost > total:
            return False
        self.queued_bytes += cost
        held.deferred_bytes += cost
        held.deferred.append(Deferred(conn, topic, packet, conn.rx_channel, cost))
        return True

    def end_provisional(self) -> dict[str, int]:
        """The commit (or the rollback at the source): route the kept QoS 2 messages in
        order, then send every held acknowledgement in order.  Returns what was held."""
        held = self.provisional
        if held is None:
            return {"held_acks": 0, "held_qos2": 0, "held_qos2_bytes": 0}
        counts = held.counts()
        for item in held.deferred:
            self.queued_bytes -= item.cost
        self.provisional = None
        for item in held.deferred:
            conn = item.conn
            rx = conn.rx_channel
            conn.rx_channel = item.channel
            try:
                conn.route_qos2(item.topic, item.packet)
            finally:
                conn.rx_channel = rx
        self.release_acks(held.acks)
        return counts

    def _provisional_expired(self) -> None:
        held = self.provisional
        if held is not None and self.wall() >= held.deadline:
            counts = self.end_provisional()
            log.warning("provisional since pre-checkpoint and no commit or rollback came by "
                        "its deadline: committed by itself (%d acknowledgements, %d QoS 2 "
                        "messages released)", counts["held_acks"], counts["held_qos2"])  # fmt: skip

    def _note_will(self, client_id: str, entry: WillEntry | None) -> None:
        if self.journal:
            self.store.note_will(client_id, entry)

    # ----------------------------------------------------------------- I/O hooks
    def open_connection(self, transport: str, peer: str) -> BrokerConnection:
        conn = BrokerConnection(self, transport, peer)
        self.connections.add(conn)
        return conn

    def mark_dirty(self, conn: BrokerConnection) -> None:
        if not self._dirty:
            self.wakeup()
        self._dirty.add(conn)

    def take_dirty(self) -> set[BrokerConnection]:
        dirty, self._dirty = self._dirty, set()
        return dirty

    # ----------------------------------------------------------------- connect
    def cap_expiry(self, expiry: int) -> int:
        cap = self.config.max_session_expiry
        return expiry if cap is None else min(expiry, cap)

    def connect(self, conn: BrokerConnection, packet: Connect) -> None:
        """Authenticate, resolve the session (clean start, takeover, resume) and CONNACK."""
        v5 = packet.protocol_version == MQTT_5
        props = packet.properties
        if self.redirect is not None:
            reference, permanent = self.redirect
            reason = ReasonCode.SERVER_MOVED if permanent else ReasonCode.USE_ANOTHER_SERVER
            conn._refuse(reason, f"redirected to {reference}", {P.SERVER_REFERENCE: reference})
            return
        will = packet.will
        if will is not None:
            try:
                validate_topic_name(will.topic)  # MQTT-3.1.3-11: a topic name, no wildcards
            except MQTTError as exc:
                if v5:
                    conn._refuse(ReasonCode.TOPIC_NAME_INVALID, f"will {exc.message}")
                else:  # 3.1.1 has no return code for it: close (section 4.8 of 3.1.1)
                    log.info("closing %s (%s): will %s", conn.peer, conn.transport, exc.message)
                    conn.close()
                return
        if not self.auth.check_password(packet.username, packet.password):
            conn._refuse(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "bad user name or password")
            return
        client_id = packet.client_id
        connack: dict[int, Any] = {}
        if not client_id:
            if not v5 and not packet.clean_start:
                # MQTT-3.1.3-8: a zero-length id needs clean session in 3.1.1.
                conn._refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "empty client id")
                return
            client_id = "qmig-" + secrets.token_hex(8)
            if v5:
                connack[P.ASSIGNED_CLIENT_IDENTIFIER] = client_id  # MQTT-3.2.2-16
        keep_alive = packet.keep_alive
        max_ka = self.config.max_keepalive
        if max_ka and (keep_alive == 0 or keep_alive > max_ka):
            if not v5:
                # 3.1.1 cannot be told a server keep alive: refuse as mosquitto does.
                conn._refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "keep alive above maximum")
                return
            keep_alive = max_ka
            connack[P.SERVER_KEEP_ALIVE] = max_ka
        # Session expiry: 3.1.1 clean session 0 keeps the session until it is cleaned.
        if v5:
            expiry = self.cap_expiry(props.get(P.SESSION_EXPIRY_INTERVAL, 0))
            if expiry != props.get(P.SESSION_EXPIRY_INTERVAL, 0):
                connack[P.SESSION_EXPIRY_INTERVAL] = expiry
        else:
            expiry = 0 if packet.clean_start else self.cap_expiry(NEVER_EXPIRES)
        if not self._may_own(client_id, packet.username):
            # A session belongs to the identity that made it: another user may neither
            # resume it (and read its queue), take its live connection over, nor discard
            # it with Clean Start.  mosquitto lets the CONNECT in and withholds the queue;
            # refusing keeps the owner's connection and queue whole.
            conn._refuse(ReasonCode.NOT_AUTHORIZED, f"client id {client_id!r} is another user's")
            return
        conn.client_id = client_id
        conn.username = packet.username
        conn.keep_alive = keep_alive
        if v5:
            conn.send_quota = min(
                props.get(P.RECEIVE_MAXIMUM, 65535), self.config.max_inflight_messages
            )
            conn.client_max_packet = props.get(P.MAXIMUM_PACKET_SIZE, 0)
            conn.client_alias_max = props.get(P.TOPIC_ALIAS_MAXIMUM, 0)
            connack[P.RECEIVE_MAXIMUM] = self.config.receive_maximum
            connack[P.MAXIMUM_PACKET_SIZE] = self.config.max_packet_size
            if self.config.topic_alias_maximum:
                connack[P.TOPIC_ALIAS_MAXIMUM] = self.config.topic_alias_maximum
        else:
            conn.send_quota = self.config.max_inflight_messages
        # A pending delayed will of a previous connection is cancelled by a connection that
        # resumes the session (MQTT-3.1.3-9); Clean Start ends that session, and a will
        # waits at most until its session ends, so then it is sent now.
        pending_will = self._wills.pop(client_id, None)
        if pending_will is not None:
            self._note_will(client_id, None)
        if pending_will is not None and packet.clean_start:
            self._publish_will(client_id, pending_will[1], pending_will[2])
        session = self.store.get_session(client_id)
        if session is not None and session.connection is not None:
            old = session.connection
            log.info("client %s taken over by a new connection from %s", client_id, conn.peer)
            old.close(ReasonCode.SESSION_TAKEN_OVER)  # MQTT-3.1.4-3
            # A DISCONNECT 0x00 already received on it still discards its will.
            self._connection_gone(
                old, old.disconnected_cleanly, takeover=True, resumed=not packet.clean_start
            )
        present = False
        # A connected session never expires; and a session discarded by Clean Start must
        # not leave its timer behind to end the new one.
        self._expiring.pop(client_id, None)
        if session is not None and not packet.clean_start:
            present = True  # MQTT-3.2.2-3
        else:
            if session is not None:
                self._remove_session(client_id)  # MQTT-3.1.2-4
            session = Session(client_id, packet.protocol_version)
            self.store.add_session(session)
        session.version = packet.protocol_version
        session.username = packet.username
        session.expiry_interval = expiry
        session.expires_at = None
        session.will = packet.will
        session.connection = conn
        if self.journal:
            self.store.note_session(session)
        self.stats.connections_total += 1
        log.debug("client %s connected over %s from %s", client_id, conn.transport, conn.peer)
        conn.accept(session, present, connack)

    def _may_own(self, client_id: str, username: str | None) -> bool:
        """May ``username`` use the session of ``client_id``?  Only its owner may.

        Without a password file user names are claims, not identities, so nothing is
        enforced (as every client may then claim any name).
        """
        if self.auth.users is None:
            return True
        session = self.store.get_session(client_id)
        return session is None or session.username == username

    def may_receive(self, session: Session, message: Message) -> bool:
        """The ACL's word on delivering ``message`` to ``session``'s user, now."""
        return not self._acl or self.auth.can_receive(
            session.client_id, session.username, message.topic
        )

    # ----------------------------------------------------------------- disconnect
    def connection_dropped(self, conn: BrokerConnection) -> None:
        """A connection that closed before CONNECT was accepted."""
        self.connections.discard(conn)
        self._dirty.discard(conn)
        if conn.input_held:
            self._set_input(conn, 0)

    def connection_closed(self, conn: BrokerConnection, clean: bool) -> None:
        self.connections.discard(conn)
        self._dirty.discard(conn)
        if conn.input_held:
            self._set_input(conn, 0)
        self._connection_gone(conn, clean, takeover=False)

    # ----------------------------------------------------------------- incomplete packets
    def input_changed(self, conn: BrokerConnection, held: int) -> None:
        """``conn``'s readers hold ``held`` bytes of incomplete packets now.

        Over ``max_incomplete_bytes_total`` for all connections together, the connection
        whose incomplete packets began first is closed (0x97), and so on until under it:
        a stalled sender is the oldest, a client in the middle of a packet the youngest.
        """
        self._set_input(conn, held)
        cap = self.config.max_incomplete_bytes_total
        while cap and self.incomplete_bytes > cap and self._incomplete:
            victim = next(iter(self._incomplete))
            victim.drop_incomplete(
                ReasonCode.QUOTA_EXCEEDED,
                "incomplete packets of all clients hold over %d bytes (max_incomplete_bytes_"
                "total) and its %d bytes are the oldest",
                cap,
                victim.input_held,
            )

    def _set_input(self, conn: BrokerConnection, held: int) -> None:
        self.incomplete_bytes += held - conn.input_held
        conn.input_held = held
        if held:
            self._incomplete.setdefault(conn, None)  # keeps its place: when it began
        else:
            self._incomplete.pop(conn, None)

    def _connection_gone(
        self, conn: BrokerConnection, clean: bool, takeover: bool, resumed: bool = False
    ) -> None:
        session = conn.session
        if session is None or session.connection is not conn:
            return
        session.connection = None
        now = self.now()
        will = session.will
        session.will = None
        if will is not None and not clean:
            delay = will.properties.get(P.WILL_DELAY_INTERVAL, 0) if conn.version == MQTT_5 else 0
            delay = min(delay, session.expiry_interval)
            if conn.will_grace and session.expiry_interval:
                # Sent away on purpose (server moved): the client is expected back, so
                # its will waits for it rather than announcing it gone.
                delay = max(delay, min(conn.will_grace, session.expiry_interval))
            if delay and not takeover:
                self._wills[session.client_id] = entry = (now + delay, will, session.username)
                self._note_will(session.client_id, entry)
            elif not (delay and resumed):
                self._publish_will(session.client_id, will, session.username)
            # else: taken over by a connection that resumes the session before the will
            # delay elapsed, so the will is not sent (MQTT-3.1.3-9, MQTT-3.1.2-8).
        if takeover:
            return
        if session.expiry_interval == 0:
            self._end_session(session.client_id)
        elif session.expiry_interval != NEVER_EXPIRES:
            session.expires_at = now + session.expiry_interval
            self._expiring[session.client_id] = session.expires_at
        if self.journal:
            self.store.note_session(session)

    def _end_session(self, client_id: str) -> None:
        self._expiring.pop(client_id, None)
        pending = self._wills.pop(client_id, None)
        if pending is not None:
            self._note_will(client_id, None)
            # MQTT-3.1.3-9: the will is sent when the session ends, if that comes first.
            self._publish_will(client_id, pending[1], pending[2])
        self._remove_session(client_id)

    def _remove_session(self, client_id: str) -> None:
        """Forget a session, and what its queued and in-flight messages held."""
        session = self.store.remove_session(client_id)
        if session is not None:
            for delivery in session.pending:
                self.release(session, delivery)
            for delivery in session.inflight.values():
                self.release(session, delivery)
            session.pending.clear()
            session.inflight.clear()

    def _publish_will(self, client_id: str, will: Will, username: str | None) -> None:
        if will.topic.startswith("$SYS"):
            return  # clients cannot publish to $SYS, by will no more than by PUBLISH
        if self._acl and not self.auth.can_publish(client_id, username, will.topic):
            return
        props = {k: v for k, v in will.properties.items() if k != P.WILL_DELAY_INTERVAL}
        expiry = props.get(P.MESSAGE_EXPIRY_INTERVAL)
        message = Message(
            will.topic,
            will.payload,
            will.qos,
            will.retain,
            props,
            self.now() + expiry if expiry is not None else None,
            client_id,
        )
        log.debug("publishing the will of %s to %s", client_id, will.topic)
        self.route(message)

    # ----------------------------------------------------------------- publish
    def publish_from(self, conn: BrokerConnection, topic: str, packet: Publish) -> int:
        """Route a client's PUBLISH; the reason code is what its PUBACK/PUBREC says."""
        self.stats.publish_received += 1
        if topic.startswith("$SYS"):
            return ReasonCode.NOT_AUTHORIZED
        if self._acl and not self.auth.can_publish(conn.client_id, conn.username, topic):
            return ReasonCode.NOT_AUTHORIZED
        props = packet.properties
        expires_at = None
        if props:
            expiry = props.get(P.MESSAGE_EXPIRY_INTERVAL)
            if expiry is not None:
                expires_at = self.now() + expiry
        message = Message(
            topic, packet.payload, packet.qos, packet.retain, props, expires_at, conn.client_id
        )
        self._quota_refused = 0
        if self.route(message):
            return ReasonCode.SUCCESS
        # Every session it was meant for refused it for a queue limit: say so (0x97, not
        # 0x10 "no matching subscribers", which would tell the publisher nobody wants it).
        if self._quota_refused:
            return ReasonCode.QUOTA_EXCEEDED
        return ReasonCode.NO_MATCHING_SUBSCRIBERS

    def route(self, message: Message) -> int:
        """Deliver ``message`` to every matching subscription; returns how many sessions."""
        self.stats.messages_received += 1
        if message.retain:
            self.store.set_retained(message)
        matches, shared = self.store.match(message.topic)
        count = 0
        sender = message.sender
        pub_qos = message.qos
        if len(matches) == 1 and not shared:
            # Common case: a single matching filter, so no merging of overlaps.
            for client_id, opts in matches[0].items():
                if opts.no_local and client_id == sender:
                    continue  # MQTT-3.8.3-3
                session = self.store.get_session(client_id)
                if session is None:
                    continue
                sub_ids = [opts.subscription_id] if opts.subscription_id else None
                qos = pub_qos if pub_qos < opts.qos else opts.qos  # MQTT-3.8.4-6
                retain = message.retain and opts.retain_as_published  # MQTT-3.3.1-12/13
                if self._deliver(session, message, qos, retain, sub_ids, opts.channel):
                    count += 1
            return count
        merged: dict[str, list[Any]] = {}
        for subs in matches:
            for client_id, opts in subs.items():
                if opts.no_local and client_id == sender:
                    continue
                entry = merged.get(client_id)
                if entry is None:
                    entry = merged[client_id] = [
                        opts.qos,
                        opts.retain_as_published,
                        [],
                        opts.channel,
                    ]
                else:
                    # MQTT-3.3.4-2: one copy with the maximum QoS of all matches.
                    entry[0] = max(entry[0], opts.qos)
                    entry[1] = entry[1] or opts.retain_as_published
                if opts.subscription_id:
                    entry[2].append(opts.subscription_id)  # MQTT-3.3.4-3
        for client_id, (sub_qos, rap, ids, channel) in merged.items():
            session = self.store.get_session(client_id)
            if session is None:
                continue
            qos = min(pub_qos, sub_qos)
            retain = message.retain and rap
            if self._deliver(session, message, qos, retain, ids or None, channel):
                count += 1
        for groups in shared:
            for group in groups.values():
                if self._deliver_shared(group, message):
                    count += 1
        return count

    def _deliver_shared(self, group: Any, message: Message) -> bool:
        """Round-robin among members, preferring connected ones (section 4.8.2)."""
        members = list(group.members.items())
        n = len(members)
        fallback = None
        for i in range(n):
            client_id, opts = members[(group.cursor + i) % n]
            session = self.store.get_session(client_id)
            if session is None:
                continue
            if session.connection is None or not session.connection.writable:
                if fallback is None:
                    fallback = (session, opts)
                continue
            group.cursor = (group.cursor + i + 1) % n
            sub_ids = [opts.subscription_id] if opts.subscription_id else None
            return self._deliver(
                session, message, min(message.qos, opts.qos), False, sub_ids, opts.channel
            )
        if fallback is not None:
            group.cursor = (group.cursor + 1) % n
            session, opts = fallback
            sub_ids = [opts.subscription_id] if opts.subscription_id else None
            return self._deliver(
                session, message, min(message.qos, opts.qos), False, sub_ids, opts.channel
            )
        return False

    def _deliver(
        self,
        session: Session,
        message: Message,
        qos: int,
        retain: bool,
        sub_ids: list[int] | None,
        channel: int = 0,
    ) -> bool:
        if not self.may_receive(session, message):
            return False
        conn = session.connection
        if conn is not None and conn.state is State.CONNECTED and not conn.closing:
            return conn.deliver(Delivery(message, qos, retain, sub_ids, channel=channel))
        if qos == 0 and not self.config.queue_qos0_messages:
            return True  # QoS 0 is not kept for offline clients (section 4.1 allows it)
        return self.enqueue(session, Delivery(message, qos, retain, sub_ids))

    def enqueue(self, session: Session, delivery: Delivery) -> bool:
        """Queue a delivery in its session, within the session's count and byte limits."""
        if len(session.pending) >= self.config.max_queued_messages:
            self._refuse_delivery(session)
            return False
        if not self.hold(session, delivery):
            return False
        session.queue().append(delivery)
        return True

    # ----------------------------------------------------------------- queue byte budgets
    def hold(self, session: Session, delivery: Delivery) -> bool:
        """Charge a delivery about to be queued or put in flight to the byte budgets.

        The session's budget (``max_queued_bytes``, as mosquitto's, though it covers the
        in-flight window too) counts the whole message for every session holding it: that
        is what the session would cost alone.  The broker's (``max_queued_bytes_total``)
        counts each message once, however many sessions share it, since they share one
        object; both add DELIVERY_OVERHEAD per delivery.  A session holding nothing always
        takes its next message, so no message is undeliverable for its size alone.  False:
        the delivery is refused (dropped, counted, logged once); release() undoes a charge.
        """
        message = delivery.message
        size = message.size or message_size(message)
        cost = size + DELIVERY_OVERHEAD
        config = self.config
        limit = config.max_queued_bytes
        if limit and session.held_bytes and session.held_bytes + cost > limit:
            if not session.over_budget:
                session.over_budget = True
                log.info(
                    "session %s holds %d bytes of messages (max_queued_bytes %d): dropping "
                    "its further QoS > 0 messages until it drains",
                    session.client_id, session.held_bytes, limit,
                )  # fmt: skip
            self._refuse_delivery(session)
            return False
        added = cost if message.holders == 0 else DELIVERY_OVERHEAD
        total = config.max_queued_bytes_total
        if total and self.queued_bytes + added > total:
            if not self._over_total:
                self._over_total = True
                log.warning(
                    "sessions hold %d bytes of messages (max_queued_bytes_total %d): "
                    "dropping further queued messages until they drain",
                    self.queued_bytes, total,
                )  # fmt: skip
            self._refuse_delivery(session)
            return False
        message.holders += 1
        self.queued_bytes += added
        session.held_bytes += cost
        delivery.held = cost
        if self.journal:
            self.store.note_delivery(session, delivery)
        return True

    def release(self, session: Session, delivery: Delivery) -> None:
        """A delivery left its session's queue or in-flight window: uncharge it."""
        held = delivery.held
        if not held:
            return
        delivery.held = 0
        if self.journal:
            self.store.note_delivery(session, delivery)
        session.held_bytes -= held
        message = delivery.message
        message.holders -= 1
        self.queued_bytes -= held if message.holders == 0 else DELIVERY_OVERHEAD
        config = self.config
        if session.over_budget and session.held_bytes * 2 < config.max_queued_bytes:
            session.over_budget = False
        if self._over_total and self.queued_bytes * 2 < config.max_queued_bytes_total:
            self._over_total = False

    def _refuse_delivery(self, session: Session) -> None:
        session.dropped += 1
        self.stats.dropped += 1
        self.stats.quota_dropped += 1
        self._quota_refused += 1

    # ----------------------------------------------------------------- subscribe
    def subscribe(self, conn: BrokerConnection, packet: Subscribe) -> None:
        session = conn.session
        if session is None:
            raise ProtocolError("SUBSCRIBE before CONNECT")
        v5 = conn.version == MQTT_5
        sub_id_list = packet.properties.get(P.SUBSCRIPTION_IDENTIFIER)
        sub_id = sub_id_list[0] if sub_id_list else None
        codes: list[int] = []
        # Filters whose retained messages are owed, each once however often it is listed:
        # a repeated filter replaces its own subscription (MQTT-3.8.4-3), so the packet
        # makes one subscription and one replay of it, not one per copy.
        replays: dict[str, None] = {}
        limit = self.config.max_subscriptions_per_client
        refused = 0
        for sub in packet.subscriptions:
            topic_filter = sub.topic_filter
            try:
                validate_topic_filter(topic_filter)
            except MQTTError:
                codes.append(ReasonCode.TOPIC_FILTER_INVALID)
                continue
            group, inner = parse_shared(topic_filter)
            if group is not None and sub.no_local:
                raise ProtocolError("no local on a shared subscription")  # MQTT-3.8.3-4
            if self._acl and not self.auth.can_subscribe(conn.client_id, conn.username, inner):
                codes.append(ReasonCode.NOT_AUTHORIZED)
                continue
            if topic_filter not in session.subscriptions and len(session.subscriptions) >= limit:
                codes.append(ReasonCode.QUOTA_EXCEEDED)
                refused += 1
                continue
            opts = SubOptions(
                sub.qos,
                sub.no_local,
                sub.retain_as_published,
                sub.retain_handling,
                sub_id,
                conn.rx_channel,
            )
            existed = self.store.subscribe(session, topic_filter, opts)
            codes.append(sub.qos)  # every entry gets its own reason code (MQTT-3.9.3-1)
            if group is None and (
                sub.retain_handling == 0 or (sub.retain_handling == 1 and not existed)
            ):
                replays[topic_filter] = None
        if not v5 and len(codes) != len(packet.subscriptions):  # pragma: no cover
            raise ProtocolError("internal: SUBACK does not match SUBSCRIBE")
        if refused:
            conn.warn_once(
                "subscriptions",
                "client %s reached its limit of %d subscriptions: refused %d topic filters",
                conn.client_id,
                limit,
                refused,
            )
        conn.send_suback(packet.packet_id, codes)
        if replays:
            queue = session.queue_replays()
            if any(r.topic_filter in replays for r in queue):
                # Subscribing again restarts that filter's replay (RH 0 resends them all).
                queue = session.replays = deque(r for r in queue if r.topic_filter not in replays)
            horizon = self.store.retained_version()
            queue.extend(RetainedReplay(f, horizon) for f in replays)
            self.replay_ready(conn)

    # ----------------------------------------------------------------- retained replay
    @property
    def replaying(self) -> bool:
        """Whether :meth:`step_replays` has work: the I/O layer calls it once per turn."""
        return bool(self._replay_ready)

    def replay_ready(self, conn: BrokerConnection) -> None:
        """``conn`` may go on with its retained replay (new, drained, or acked)."""
        session = conn.session
        if session is not None and session.replays and conn not in self._replay_ready:
            if not self._replay_ready and not self._dirty:
                self.wakeup()
            self._replay_ready[conn] = None

    def step_replays(self) -> None:
        """Send the next batch of retained messages of every connection ready for one."""
        ready, self._replay_ready = self._replay_ready, {}
        budget = REPLAY_TURN_MESSAGES
        again: list[BrokerConnection] = []
        later: list[BrokerConnection] = []
        for conn in ready:
            if budget <= 0:
                later.append(conn)  # first in line next turn
                continue
            examined, more = self._replay_step(conn, min(budget, REPLAY_STEP_MESSAGES))
            budget -= examined
            if more:
                again.append(conn)
        added, self._replay_ready = self._replay_ready, {}
        for conn in (*later, *again, *added):
            self._replay_ready[conn] = None

    def _replay_step(self, conn: BrokerConnection, budget: int) -> tuple[int, bool]:
        """One batch of ``conn``'s oldest replays: (messages examined, whether to go on).

        Stops when the batch is full (go on next turn), or when the connection cannot take
        more now: paused by its transport, or a QoS > 0 message finds the in-flight window
        full or messages queued before it.  ``set_writable`` and acks resume it (pump).
        """
        session = conn.session
        if (
            session is None
            or session.connection is not conn
            or conn.state is not State.CONNECTED
            or conn.closing
        ):
            return 0, False
        replays = session.replays
        store = self.store
        now = self.now()
        acl = self._acl
        examined = 0
        size = 0
        while replays:
            replay = replays[0]
            opts = session.subscriptions.get(replay.topic_filter)
            if opts is None:  # unsubscribed meanwhile
                replays.popleft()
                continue
            messages = replay.messages
            if messages is None:
                messages = replay.messages = store.retained_candidates(replay.topic_filter)
            topic_filter = replay.topic_filter
            wildcard = "+" in topic_filter or "#" in topic_filter
            ids = [opts.subscription_id] if opts.subscription_id else None
            n = len(messages)
            while replay.position < n:
                if examined >= budget or size >= REPLAY_STEP_BYTES:
                    return examined, True
                if not conn.writable:
                    return examined, False
                message = messages[replay.position]
                examined += 1
                if (
                    message.retained_seq > replay.horizon  # sent live: retained after
                    or store.retained(message.topic) is not message  # replaced or cleared
                    or (wildcard and not topic_matches(topic_filter, message.topic))
                    or (acl and not self.auth.can_receive(
                        conn.client_id, conn.username, message.topic
                    ))
                ):  # fmt: skip
                    replay.position += 1
                    continue
                expires_at = message.expires_at
                if expires_at is not None and expires_at <= now:
                    store.drop_retained(message.topic)
                    replay.position += 1
                    continue
                qos = message.qos if message.qos < opts.qos else opts.qos
                if qos and (session.pending or len(session.inflight) >= conn.send_quota):
                    return examined, False  # this one again once the window has room
                replay.position += 1
                # MQTT-3.3.1-9: retained messages sent on subscribe keep RETAIN 1.
                conn.deliver(Delivery(message, qos, True, ids, channel=opts.channel))
                size += len(message.payload) + len(message.topic) + 16
            replays.popleft()
        return examined, False

    # ----------------------------------------------------------------- migration API
    def may_trigger_migration(self, conn: BrokerConnection | None) -> bool:
        """Whether ``conn``'s client may ask the broker to move (MIGRATION_TRIGGER).

        Only once its CONNECT was accepted, and then: with an ACL, if the ACL grants it write
        access to :data:`MIGRATE_TOPIC`; without an ACL but with a password file, if it logged
        in with a user name and password (not anonymously); with neither, any client (such a
        broker lets every client publish anywhere too).
        """
        if conn is None or conn.state is not State.CONNECTED or conn.session is None:
            return False
        if conn.closing:
            return False
        if self._acl:
            return self.auth.can_publish(conn.client_id, conn.username, MIGRATE_TOPIC)
        if self.auth.users is not None:
            return conn.username is not None
        return True

    def disconnect_clients(
        self,
        transports: Iterable[str],
        reason: int = ReasonCode.SERVER_MOVED,
        server_reference: str | None = None,
        will_grace: float = 30.0,
    ) -> int:
        """Close every connection of the given transports, telling MQTT 5 clients where to go.

        Sessions stay: after a migration the clients resume them at ``server_reference``.
        Their wills wait ``will_grace`` seconds (capped by the session expiry) for them to
        come back, so a planned move does not announce every device as gone.
        """
        wanted = set(transports)
        closed = 0
        for conn in list(self.connections):
            if conn.transport in wanted and not conn.closing:
                conn.will_grace = will_grace
                conn.close(reason, server_reference)
                closed += 1
        return closed

    def set_redirect(self, reference: str | None, permanent: bool = False) -> None:
        """Refuse new connections with a server reference (or stop doing so with None)."""
        self.redirect = (reference, permanent) if reference else None

    # ----------------------------------------------------------------- timers
    def allow_for_stall(self, seconds: float) -> None:
        """The broker heard no one for ``seconds``: its process was frozen (a checkpoint:
        CRIU tells it nothing, the I/O layer notices its timers firing late) or starved.
        That silence is the broker's, so no client's keep alive counts it (MQTT-3.1.2-24
        is about the client's silence)."""
        now = self.now()
        for conn in self.connections:
            conn.last_received = min(now, conn.last_received + seconds)

    def tick(self) -> None:
        """Keep-alive, will delays, session expiry, $SYS and the provisional deadline; call
        about twice a second."""
        now = self.now()
        if self.provisional is not None:
            self._provisional_expired()
        timeout = self.config.incomplete_packet_timeout
        for conn in list(self.connections):
            if conn.closing:
                continue
            since = conn.incomplete_since
            if timeout and since and now - min(since.values()) > timeout:
                # Keep alive 0 turns off the keep-alive timer, not this one: a client must
                # not hold a partial packet (up to max_packet_size) open forever.
                conn.drop_incomplete(
                    ReasonCode.KEEP_ALIVE_TIMEOUT,
                    "a packet incomplete for over %g s (%d bytes held)",
                    timeout,
                    conn.input_held,
                )
                continue
            if conn.state is State.AWAIT_CONNECT:
                if now - conn.opened_at > 10.0:
                    log.info("closing %s: no CONNECT within 10 s", conn.peer)
                    conn.close()
            elif conn.keep_alive and now - conn.last_received > 1.5 * conn.keep_alive:
                log.info("keep alive timeout for %s", conn.client_id)  # MQTT-3.1.2-24
                conn.close(ReasonCode.KEEP_ALIVE_TIMEOUT)
        if self._wills:
            for client_id, (at, will, username) in list(self._wills.items()):
                if at <= now:
                    del self._wills[client_id]
                    self._note_will(client_id, None)
                    self._publish_will(client_id, will, username)
        if self._expiring:
            for client_id, at in list(self._expiring.items()):
                if at <= now:
                    log.debug("session of %s expired", client_id)
                    self._end_session(client_id)
        interval = self.config.sys_interval
        if interval and now >= self._next_sys:
            self._next_sys = now + interval
            self.publish_sys()

    def publish_sys(self) -> None:
        now = self.now()
        connected = sum(1 for c in self.connections if c.state is State.CONNECTED)
        values = {
            "version": self.version,
            "uptime": f"{int(now - self.started_at)} seconds",
            "clients/connected": connected,
            "clients/total": self.store.session_count(),
            "messages/received": self.stats.messages_received,
            "messages/sent": self.stats.messages_sent,
            "publish/messages/received": self.stats.publish_received,
            "publish/messages/dropped": self.stats.dropped,
            "store/messages/bytes": self.queued_bytes,  # mosquitto's name: bytes held queued
            "subscriptions/count": self.store.subscription_count(),
            "retained messages/count": self.store.retained_count(),
        }
        for name, value in values.items():
            message = Message(f"$SYS/broker/{name}", str(value).encode(), 0, True, {})
            self.store.set_retained(message)
            matches, _ = self.store.match(message.topic)
            for subs in matches:
                for client_id, opts in subs.items():
                    session = self.store.get_session(client_id)
                    if session is not None and session.connection is not None:
                        self._deliver(session, message, 0, opts.retain_as_published, None)
