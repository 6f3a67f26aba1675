"""What a broker does when its container moves: the steps the orchestrator calls, in order.

1. ``prepare(dest)``: tell every QUIC client (that supports it) the destination address in a
   SERVER_MIGRATION frame; proactive clients start probing it.
2. ``pre_checkpoint(reference)``: CRIU cannot dump MPTCP sockets and TCP connections cannot
   follow a new IP, so TCP/TLS/MPTCP clients get DISCONNECT 0x9D "Server moved" with the
   destination as Server Reference (MQTT 5) and the MPTCP listener closes.  Meanwhile it
   waits (within the same grace) until every QUIC client told in step 1 has acknowledged its
   SERVER_MIGRATION: one whose frame is still in flight at the freeze could never learn the
   destination (a client drops datagrams from server addresses it does not know), and
   would be deaf until its keep-alive made it reconnect.
3. (the container is checkpointed, moved and restored: memory, sessions, QUIC state intact)
4. ``restored(new_addr)``: reopen listeners, announce the new address (SERVER_MIGRATED) to
   clients that wait for it, and resend what the freeze swallowed without PTO backoff.

``status()`` reports where things stand; MIGRATION_TRIGGER frames from clients are kept in
``triggers`` for the orchestrator to read, and sent to it at once when the broker has an
``--orchestrator-url`` (:mod:`broker.forward`).  Everything lives in the broker's memory, so it
survives the checkpoint/restore it orchestrates.

A trigger is a request from the network, so it counts only from a client whose MQTT CONNECT
was accepted and that may trigger (:meth:`Broker.may_trigger_migration`: with an ACL, write
access to ``$qmig/migrate``), at most ``TRIGGER_BURST`` in a row and one per
``1 / TRIGGER_RATE`` s per connection, and ``TRIGGER_BURST_ALL`` / ``TRIGGER_RATE_ALL`` for
the whole broker.  Other triggers are dropped without an answer, counted in
``status()["trigger_counts"]`` and logged once a minute; the hint is escaped before it is
logged or kept (docs/protocol.md section 9).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

from mqttproto.reasons import ReasonCode
from quicmig.connection import (
    MigratingQuicConnection,
    MigrationFrameAcknowledged,
    MigrationFrameReceived,
)
from quicmig.frames import (
    STRATEGY_ANNOUNCE,
    STRATEGY_EXPLICIT,
    STRATEGY_POOL,
    Address,
    MigrationTrigger,
    PoolMigrationAddress,
    ServerMigrated,
    ServerMigration,
)

from .observe import ReturnWatch
from .throttle import LogWindow, TokenBucket, log_safe

if TYPE_CHECKING:
    from .connection import BrokerConnection
    from .forward import TriggerForwarder
    from .quic import BrokerQuicProtocol
    from .server import BrokerServer

log = logging.getLogger("qmig.migration")

RECONNECTING_TRANSPORTS = ("tcp", "tls", "mptcp")
FREEZE_TICK = 0.005  # seconds between the freeze watch's ticks (only after pre-checkpoint)
FREEZE_WATCH_MAX = 900.0  # seconds the freeze watch runs at most
FREEZE_GAP = 0.2  # a tick this late means the process was frozen (CRIU takes longer)
# MIGRATION_TRIGGER limits: per connection 3 in a row, then one per 10 s; for the broker 10 in
# a row, then one a second.  Triggers kept for status: the latest MAX_TRIGGERS.
TRIGGER_RATE = 0.1
TRIGGER_BURST = 3
TRIGGER_RATE_ALL = 1.0
TRIGGER_BURST_ALL = 10
MAX_TRIGGERS = 100
MAX_HISTORY = 100  # migrations kept for status (the counters count them all)
TRIGGER_LOG_WINDOW = 60.0  # seconds: drops make one log line per window and kind of drop


class MigrationAPI:
    def __init__(self, server: BrokerServer, pool: list[Address] | None = None) -> None:
        self.server = server
        self.pool = list(pool or [])
        self.sequence = 0
        self.state = "serving"
        self.destination: Address | None = None
        self.triggers: list[dict[str, Any]] = []
        self.trigger_counts = {"accepted": 0, "not_authorized": 0, "rate_limited": 0}
        self._trigger_buckets: weakref.WeakKeyDictionary[BrokerConnection, TokenBucket] = (
            weakref.WeakKeyDictionary()
        )
        self._trigger_bucket = TokenBucket(TRIGGER_RATE_ALL, TRIGGER_BURST_ALL, server.broker.now())
        self._dropped_log = {kind: LogWindow(TRIGGER_LOG_WINDOW)
                             for kind in ("not_authorized", "rate_limited")}  # fmt: skip
        self.history: list[dict[str, Any]] = []  # the latest MAX_HISTORY migrations
        # Every migration since the start, for the metrics: outcome counts, frozen seconds.
        self.outcomes = {"restored": 0, "rolled_back": 0}
        self.freezes = 0
        self.frozen_seconds = 0.0
        # The process's own view of its freeze (see _watch_freeze): wall-clock from/to.
        self.last_freeze: dict[str, Any] | None = None
        self._freeze_watch: asyncio.Task[None] | None = None
        # After the thaw: who came back when (the I/O layer's observer, see broker.observe).
        self.returns: ReturnWatch | None = None
        # Where accepted triggers go besides ``triggers`` (--orchestrator-url, broker.forward).
        self.forwarder: TriggerForwarder | None = None
        # QUIC clients told of the current destination that have not acknowledged it yet,
        # and what is set once none is left (see announcement_acknowledged).
        self._unacknowledged: weakref.WeakSet[BrokerQuicProtocol] = weakref.WeakSet()
        self._acknowledged = asyncio.Event()
        self._acknowledged.set()

    def _quic(self, proto: BrokerQuicProtocol) -> MigratingQuicConnection:
        quic = proto._quic
        assert isinstance(quic, MigratingQuicConnection)
        return quic

    # ------------------------------------------------------------------ QUIC events
    def connection_ready(self, proto: BrokerQuicProtocol) -> None:
        """Handshake done: give the client the pool of addresses, as the paper does."""
        if self.pool:
            frame = PoolMigrationAddress(self.sequence, tuple(self.pool))
            if self._quic(proto).send_migration_frame(frame):
                proto.transmit()

    def frame_received(self, proto: BrokerQuicProtocol, event: MigrationFrameReceived) -> None:
        if isinstance(event.frame, MigrationTrigger):
            self._trigger(proto.conn, event.frame, event.source)

    def frame_acknowledged(
        self, proto: BrokerQuicProtocol, event: MigrationFrameAcknowledged
    ) -> None:
        frame = event.frame
        if isinstance(frame, ServerMigration) and frame.sequence == self.sequence:
            self._settle(proto)

    def connection_gone(self, proto: BrokerQuicProtocol) -> None:
        """A QUIC connection ended: nothing to wait for from it."""
        self._settle(proto)

    def _settle(self, proto: BrokerQuicProtocol) -> None:
        self._unacknowledged.discard(proto)
        if not self._unacknowledged:
            self._acknowledged.set()

    def _settle_all(self) -> None:
        """Nothing to wait for any more (a new notice, or the freeze is over)."""
        self._unacknowledged = weakref.WeakSet()
        self._acknowledged.set()

    async def announcement_acknowledged(self, timeout: float) -> int:
        """Wait up to ``timeout`` s until every QUIC client told of the destination has
        acknowledged it; returns how many have not (0: all have)."""
        if self._unacknowledged:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acknowledged.wait(), timeout)
        return len(self._unacknowledged)

    def _trigger(
        self, conn: BrokerConnection | None, frame: MigrationTrigger, source: Address | None
    ) -> None:
        """A client asks the broker to move: keep it for the orchestrator, if it may ask."""
        broker = self.server.broker
        now = broker.now()
        where = str(source) if source else "?"
        if conn is None or conn.session is None:
            self._drop_trigger("not_authorized", where, "before its CONNECT", now)
            return
        who = f"{log_safe(conn.client_id, 64)} ({where})"
        if not broker.may_trigger_migration(conn):
            self._drop_trigger("not_authorized", who, "not authorized", now)
            return
        bucket = self._trigger_buckets.get(conn)
        if bucket is None:
            bucket = self._trigger_buckets[conn] = TokenBucket(TRIGGER_RATE, TRIGGER_BURST, now)
        if not bucket.take(now) or not self._trigger_bucket.take(now):
            self._drop_trigger("rate_limited", who, "over the rate limit", now)
            return
        self.trigger_counts["accepted"] += 1
        entry = {
            "client_id": conn.client_id,
            "username": conn.username,
            "from": str(source) if source else None,
            "reason": frame.reason,
            "hint": log_safe(frame.hint),
            "at": time.time(),
        }
        self.triggers.append(entry)
        del self.triggers[:-MAX_TRIGGERS]  # bounded: the orchestrator reads them via status
        log.info("migration trigger from %s: reason %d, hint %s", who, frame.reason,
                 entry["hint"] or "-")  # fmt: skip
        if self.forwarder is not None:
            self.forwarder.forward(entry)

    def _drop_trigger(self, kind: str, who: str, why: str, now: float) -> None:
        self.trigger_counts[kind] += 1
        held = self._dropped_log[kind].hit(now)
        if held is not None:
            log.warning(
                "migration trigger from %s dropped: %s (%d more dropped since the last such "
                "line; the next %g s are only counted, in status trigger_counts)",
                who, why, held, TRIGGER_LOG_WINDOW,
            )  # fmt: skip

    def freeze_report(self) -> dict[str, Any] | None:
        """The last freeze as the process saw it, and the first datagram after it."""
        if self.last_freeze is None:
            return None
        report = dict(self.last_freeze)
        watch = self.returns
        if watch is not None and watch.first_packet_at is not None:
            report["first_packet_at"] = watch.first_packet_at
            report["first_packet_from"] = watch.first_packet_from
        return report

    def returned_clients(self) -> list[dict[str, Any]]:
        """Per client, how long after the thaw it was heard again: the broker's view."""
        return self.returns.returned() if self.returns is not None else []

    def _watch_returns(self, thawed_at: float) -> None:
        self.returns = ReturnWatch(thawed_at, self._stop_watching_returns)
        self.server.observer = self.returns

    def _stop_watching_returns(self, watch: ReturnWatch) -> None:
        if self.server.observer is watch:
            self.server.observer = None

    def _restore_configured_redirect(self) -> None:
        """Drop pre-checkpoint's redirect but keep one the broker was started with."""
        cfg = self.server.config
        self.server.broker.set_redirect(cfg.redirect, cfg.redirect_permanent)

    # ------------------------------------------------------------------ steps
    def prepare(self, dest: Address) -> dict[str, Any]:
        """Step 1: announce ``dest`` (the broker's QUIC address after the move)."""
        self.sequence += 1
        self.destination = dest
        self.state = "prepared"
        frame = ServerMigration(self.sequence, dest)
        told = 0
        self._settle_all()  # an earlier notice is superseded
        for proto in list(self.server.quic_protocols):
            if self._quic(proto).send_migration_frame(frame):
                self._unacknowledged.add(proto)
                proto.transmit()
                told += 1
        if self._unacknowledged:
            self._acknowledged.clear()
        log.info("prepare: told %d QUIC clients about %s (sequence %d)", told, dest, frame.sequence)
        return {"sequence": self.sequence, "destination": str(dest), "quic_notified": told}

    async def pre_checkpoint(self, reference: str | None, grace: float = 1.0,
                             provisional: float | None = None) -> dict[str, Any]:  # fmt: skip
        """Step 2: send reconnecting transports away and close what CRIU cannot dump.

        CRIU refuses established TCP connections (they could not follow a new IP anyway), so
        every TCP-family listener closes too: a client connecting after this point is refused
        and retries, rather than slipping an established socket into the checkpoint.  The
        DISCONNECTs get ``grace`` seconds to drain; connections still open then are aborted.

        With ``provisional`` (seconds, post-copy), the broker acknowledges nothing a rollback
        would forget from now until :meth:`commit` or :meth:`rollback`, or for that long at
        most (:mod:`broker.provisional`).
        """
        if provisional is not None:
            self.server.broker.begin_provisional(provisional)
        sent_away = self.server.broker.disconnect_clients(
            RECONNECTING_TRANSPORTS, ReasonCode.SERVER_MOVED, reference
        )
        if reference:  # kept for restored(): new arrivals until then learn where to go
            self.server.broker.set_redirect(reference, permanent=True)
        self.server.flush()
        for kind in RECONNECTING_TRANSPORTS:
            await self.server.close_listener(kind)
        aborted, unacknowledged = await asyncio.gather(
            self._drain_stream_connections(grace), self.announcement_acknowledged(grace)
        )
        if unacknowledged:
            log.warning("pre-checkpoint: %d QUIC clients have not acknowledged the "
                        "destination within %g s", unacknowledged, grace)  # fmt: skip
        if self.forwarder is not None:  # no connection to the orchestrator into the dump
            await self.forwarder.drain(grace)
        self._start_freeze_watch()
        self.state = "checkpoint-ready"
        log.info("pre-checkpoint: %d TCP/TLS/MPTCP clients sent to %s", sent_away, reference)
        return {"disconnected": sent_away, "aborted": aborted, "reference": reference,
                "quic_unacknowledged": unacknowledged,
                "provisional": self.server.broker.provisional is not None}  # fmt: skip

    def _start_freeze_watch(self) -> None:
        if self._freeze_watch is None or self._freeze_watch.done():
            self.last_freeze = None
            self._freeze_watch = asyncio.get_running_loop().create_task(self._watch_freeze())

    def _stop_freeze_watch(self) -> None:
        if self._freeze_watch is not None:
            self._freeze_watch.cancel()
            self._freeze_watch = None

    async def _watch_freeze(self, tick: float = FREEZE_TICK) -> None:
        """Notice the checkpoint from the inside: a jump of the wall clock between ticks.

        CRIU freezes the process without telling it; after the restore its next tick comes
        late by exactly the frozen time.  This gives the true freeze-to-resume time (to one
        tick) instead of the orchestrator's view, which also counts podman's overheads.  The
        longest jump wins (a CPU stall before the checkpoint is shorter than the freeze);
        the watch runs until ``restored`` or ``rollback`` stops it.
        """
        last = started = time.time()
        while last - started < FREEZE_WATCH_MAX:  # bounded if no restored/rollback comes
            await asyncio.sleep(tick)
            now = time.time()
            gap = now - last
            longest = self.last_freeze
            if gap > FREEZE_GAP and (
                longest is None or gap > longest["thawed_at"] - longest["frozen_at"]
            ):
                self.last_freeze = {"frozen_at": last, "thawed_at": now}
                log.info("was frozen for %.0f ms", gap * 1000)
                self._watch_returns(now)
                self._speak_first()
            last = now

    def _speak_first(self) -> None:
        """Just thawed: make every following QUIC client hear the broker where it is now.

        A client probing the destination challenges an address at once when a datagram
        comes from it, so it need not probe fast for the whole freeze.  Connections with
        packets in flight speak anyway (their overdue loss timers fire); the others get a
        PING, ack-eliciting, so it is resent if lost.
        """
        pinged = 0
        for proto in list(self.server.quic_protocols):
            quic = self._quic(proto)
            if quic.qmig_peer and not quic._loss.bytes_in_flight:
                quic.send_ping(0)
                proto.transmit()
                pinged += 1
        log.debug("thawed: pinged %d idle QUIC clients", pinged)

    async def _drain_stream_connections(self, grace: float) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            open_ = [c for c in self.server.broker.connections
                     if c.transport in RECONNECTING_TRANSPORTS and c.io is not None]  # fmt: skip
            if not open_:
                return 0
            if loop.time() >= deadline:
                for conn in open_:
                    transport = getattr(conn.io, "transport", None)
                    if transport is not None:
                        transport.abort()
                await asyncio.sleep(0)
                return len(open_)
            await asyncio.sleep(0.01)

    async def restored(self, new_addr: Address) -> dict[str, Any]:
        """Step 4: serve again at ``new_addr``."""
        self._stop_freeze_watch()
        self._restore_configured_redirect()
        self._settle_all()
        for kind in self.server.listeners:
            await self.server.open_listener(kind)
        frame = ServerMigrated(self.sequence, new_addr)
        announced = 0
        now = self.server.loop_time()
        for proto in list(self.server.quic_protocols):
            quic = self._quic(proto)
            if quic.send_migration_frame(frame):
                announced += 1
            # Packets sent before the freeze are gone: resend now, not after PTO backoff.
            quic._retransmit_in_flight(now)
            proto.transmit()
        self._remember("restored", {"sequence": self.sequence, "to": str(new_addr),
                                    "announced": announced, "at": time.time()})  # fmt: skip
        provisional = self.server.broker.provisional is not None
        self.state = "provisional" if provisional else "serving"
        log.info("restored at %s: announced to %d QUIC clients%s", new_addr, announced,
                 "; provisional until the commit" if provisional else "")  # fmt: skip
        return {
            "address": str(new_addr),
            "quic_announced": announced,
            "freeze": self.freeze_report(),
            "provisional": provisional,
        }

    def commit(self) -> dict[str, Any]:
        """Step 5 of a post-copy move: every page has arrived, so a rollback can no longer
        happen.  Route the QoS 2 messages kept since pre-checkpoint and send the held
        acknowledgements (:mod:`broker.provisional`)."""
        released = self.server.broker.end_provisional()
        self.server.flush()
        self.state = "serving"
        log.info("commit: released %d acknowledgements and %d QoS 2 messages",
                 released["held_acks"], released["held_qos2"])  # fmt: skip
        return {"state": self.state, **released}

    async def rollback(self, address: Address | None = None) -> dict[str, Any]:
        """The move failed and the broker serves where it was: undo prepare/pre-checkpoint.

        With ``address`` (where the broker serves now), QUIC clients get a new
        SERVER_MIGRATION naming it: "stay", so that proactive and reactive clients stop
        probing a destination that will never answer.  Packets swallowed by the freeze are
        resent at once, as after a successful move.
        """
        self._stop_freeze_watch()
        self._restore_configured_redirect()
        self._settle_all()
        # Resumed from the frozen image: what it held back is real state here (rule 4).
        released = self.server.broker.end_provisional()
        for kind in self.server.listeners:
            await self.server.open_listener(kind)
        told = 0
        if address is not None:
            self.sequence += 1
            frame = ServerMigration(self.sequence, address)
            now = self.server.loop_time()
            for proto in list(self.server.quic_protocols):
                quic = self._quic(proto)
                if quic.send_migration_frame(frame):
                    told += 1
                quic._retransmit_in_flight(now)
                proto.transmit()
        self._remember("rolled_back", {"sequence": self.sequence,
                                       "rolled_back_to": str(address), "told": told,
                                       "at": time.time()})  # fmt: skip
        self.state = "serving"
        self.destination = None
        log.info("rollback: serving at %s again, told %d QUIC clients to stay", address, told)
        return {"state": self.state, "quic_told": told, "freeze": self.freeze_report(),
                **released}  # fmt: skip

    def _remember(self, outcome: str, entry: dict[str, Any]) -> None:
        """Count a migration's outcome and freeze; keep its entry among the latest."""
        freeze = entry["freeze"] = self.freeze_report()
        self.outcomes[outcome] += 1
        if freeze:
            self.freezes += 1
            self.frozen_seconds += freeze["thawed_at"] - freeze["frozen_at"]
        self.history.append(entry)
        del self.history[:-MAX_HISTORY]

    def status(self) -> dict[str, Any]:
        held = self.server.broker.provisional
        by_transport: dict[str, int] = {}
        for conn in self.server.broker.connections:
            by_transport[conn.transport] = by_transport.get(conn.transport, 0) + 1
        strategies = {"explicit": 0, "pool": 0, "announce": 0, "none": 0}
        for proto in self.server.quic_protocols:
            peer = self._quic(proto).qmig_peer or 0
            if not peer:
                strategies["none"] += 1
            for bit, name in ((STRATEGY_EXPLICIT, "explicit"), (STRATEGY_POOL, "pool"),
                              (STRATEGY_ANNOUNCE, "announce")):  # fmt: skip
                if peer & bit:
                    strategies[name] += 1
        return {
            "state": self.state,
            "sequence": self.sequence,
            "destination": str(self.destination) if self.destination else None,
            "pool": [str(a) for a in self.pool],
            "listeners": {k: v.bound for k, v in self.server.listeners.items()},
            "connections": by_transport,
            "sessions": self.server.broker.store.session_count(),
            "quic_clients_by_strategy": strategies,
            "triggers": list(self.triggers),
            "trigger_counts": dict(self.trigger_counts),
            "history": list(self.history),
            "provisional": held.counts() if held is not None else None,
            "last_freeze": self.freeze_report(),
            "returned": self.returned_clients(),
        }
