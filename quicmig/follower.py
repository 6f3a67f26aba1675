"""How a client follows a server that moves: the four strategies, as a pure state machine.

:class:`Follower` never touches a socket or a QUIC connection.  It is told what the server
announced and what the network did (silence, a datagram from a new address, a validated
path) and answers with the server addresses to probe now.  The QUIC layer
(:mod:`quicmig.connection`) sends the PATH_CHALLENGEs and moves the connection once a path
validates; RFC 9000's rules (validate before use, anti-amplification) stay with aioquic.

- proactive: on SERVER_MIGRATION, probe the announced address at once and keep probing until
  it answers (the broker is frozen meanwhile): every 20 ms for half a second, then backing
  off to 0.1 s, and after 5 s doubling to 5 s, so a long freeze (seconds over a slow
  checkpoint link, tens of seconds for a broker with 10,000 clients) does not flood the
  destination with padded PATH_CHALLENGEs (RFC 9000 section 8.2.1): 7,500 clients probing
  every 0.1 s through a 20 s freeze are 75,000 datagrams a second.  The thawed broker
  speaks first (retransmitted like any ack-eliciting packet), and a datagram from a probed
  address is challenged at once (``heard_from``), so the backoff costs no time; the probes
  matter where the broker's datagrams cannot reach the client first (a NAT that filters by
  source).  An announced move is probed for up to 2 minutes; while it is under way
  (:meth:`Follower.expecting_move`) the client does not take the broker's silence for a
  dead connection.
- reactive: keep the old address until silence suggests loss, then probe the announced one.
  A notice that comes *from* the address it names (its first copy was lost before the
  freeze; the thawed broker resent it from there) is proof enough: both explicit strategies
  probe that address at once, as the silence that would start it has passed already.
- pool: ignore announcements; on silence probe every pool address at once, take the first
  that validates (the literature tried them one after another); for up to a minute, as
  never told, it cannot tell a long freeze from a dead broker.
- announce: wait for the broker to speak first from its new address (SERVER_MIGRATED) and
  accept it only if that address was announced or is in the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .frames import (
    STRATEGY_ANNOUNCE,
    STRATEGY_EXPLICIT,
    STRATEGY_POOL,
    Address,
    PoolMigrationAddress,
    ServerMigrated,
    ServerMigration,
)


class Strategy(StrEnum):
    PROACTIVE = "proactive"
    REACTIVE = "reactive"
    POOL = "pool"
    ANNOUNCE = "announce"
    NONE = "none"

    @property
    def advertised(self) -> int:
        """The transport-parameter bits a client with this strategy sends."""
        return {
            Strategy.PROACTIVE: STRATEGY_EXPLICIT,
            Strategy.REACTIVE: STRATEGY_EXPLICIT,
            Strategy.POOL: STRATEGY_POOL,
            # Announcements and the pool only authorise the address the broker speaks from.
            Strategy.ANNOUNCE: STRATEGY_ANNOUNCE | STRATEGY_EXPLICIT | STRATEGY_POOL,
            Strategy.NONE: 0,
        }[self]


@dataclass
class MigrationRecord:
    """What one migration looked like from this client (monotonic seconds)."""

    sequence: int
    destination: Address | None
    trigger: str  # "explicit", "loss", "pool", "announce"
    learned_at: float
    probing_since: float | None = None
    first_probe_at: float | None = None
    validated_at: float | None = None
    adopted: Address | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "sequence": self.sequence,
            "destination": str(self.destination) if self.destination else None,
            "adopted": str(self.adopted) if self.adopted else None,
            "trigger": self.trigger,
            "learned_at": self.learned_at,
            "first_probe_at": self.first_probe_at,
            "validated_at": self.validated_at,
        }


@dataclass
class Follower:
    strategy: Strategy
    probe_interval: float = 0.02  # probing schedule at the start of a migration window...
    probe_backoff_after: float = 0.5  # ...for this long; then each interval doubles...
    probe_interval_max: float = 0.1  # ...up to this
    window: float = 5.0  # probing at up to probe_interval_max lasts this long...
    probe_interval_late: float = 5.0  # ...then doubling up to this (a long freeze)
    # How long probing lasts at most: on suspicion alone (a pool client hears silence), and
    # for an announced move, whose notice also keeps the client expecting it that long.  A
    # big broker's freeze over a slow link takes tens of seconds (10,000 clients: 20-40 s).
    pool_window: float = 60.0
    announced_window: float = 120.0
    silence: float = 0.05  # silence with data outstanding that counts as loss
    current: Address | None = None
    announced: Address | None = None
    announced_at: float | None = None
    pool: tuple[Address, ...] = ()
    targets: list[Address] = field(default_factory=list)
    window_until: float | None = None
    next_probe_at: float | None = None
    last_probe_at: float | None = None
    records: list[MigrationRecord] = field(default_factory=list)  # the latest max_records
    max_records: int = 64  # a client that lives through a move a minute stays bounded
    interval: float = 0.02  # the current probing interval (see probe_backoff_after)
    _probing_since: float = 0.0
    answer_wait: float = 0.2  # see heard_from
    answer_wait_max: float = 1.6
    _answer_due_at: float | None = None
    _answer_wait: float = 0.2
    _sequence: int = -1

    # ------------------------------------------------------------------ what we learn
    def on_server_migration(
        self, frame: ServerMigration, now: float, source: Address | None = None
    ) -> None:
        """SERVER_MIGRATION arrived, from ``source`` (None: not known)."""
        if self.strategy is Strategy.POOL or self.strategy is Strategy.NONE:
            return
        if frame.sequence <= self._sequence:
            return  # a retransmission or a stale notice
        self._sequence = frame.sequence
        self.announced, self.announced_at = frame.address, now
        if frame.address == self.current:  # "stay": the move was called off (rollback)
            self.cancel_false_alarm()
            return
        if self.strategy is Strategy.ANNOUNCE:
            return
        record = MigrationRecord(frame.sequence, frame.address, "explicit", now)
        self._record(record)
        if self.strategy is Strategy.PROACTIVE or source == frame.address:
            self._start(record, [frame.address], now)

    def on_pool(self, frame: PoolMigrationAddress, now: float) -> None:
        if self.strategy in (Strategy.POOL, Strategy.ANNOUNCE):
            self.pool = frame.addresses

    def on_server_migrated(self, frame: ServerMigrated, source: Address, now: float) -> None:
        """SERVER_MIGRATED arrived (possibly from an address we did not know yet)."""
        if self.strategy is not Strategy.ANNOUNCE or self.probing:
            return
        if not self.acceptable(source) or source == self.current:
            return  # unknown, or already there (the restored broker's first packets moved us)
        record = MigrationRecord(frame.sequence, source, "announce", now)
        self._record(record)
        self._start(record, [source], now)

    def on_silence(self, now: float) -> None:
        """Nothing heard for ``silence`` seconds while waiting for acknowledgements."""
        if self.probing:
            return
        if (
            self.strategy is Strategy.REACTIVE
            and self.announced is not None
            and self.announced != self.current  # already there: silence is just loss
        ):
            record = self._pending_record() or MigrationRecord(
                self._sequence, self.announced, "loss", now
            )
            if record not in self.records:
                self._record(record)
            record.trigger = "loss"
            self._start(record, [self.announced], now)
        elif self.strategy is Strategy.POOL and self.pool:
            candidates = [a for a in self.pool if a != self.current]
            if candidates:
                record = MigrationRecord(len(self.records), None, "pool", now)
                self._record(record)
                self._start(record, candidates, now)

    def on_validated(self, address: Address, now: float) -> None:
        """The QUIC layer validated a path to ``address`` and moved the connection there."""
        self.current = address
        record = self.records[-1] if self.records else None
        if record is not None and record.validated_at is None:
            record.validated_at = now
            record.adopted = address
        self.targets = []
        self.window_until = None
        self.next_probe_at = None

    def cancel_false_alarm(self) -> None:
        """The current path spoke again: the silence was loss or jitter, not a move."""
        self.targets = []
        self.window_until = None
        self.next_probe_at = None
        record = self._pending_record()
        if record is None:
            return
        if record.trigger == "pool":
            self.records.pop()  # it never was a migration
        else:
            record.trigger = "explicit"  # reactive: the notice stands, the probing stops
            record.probing_since = record.first_probe_at = None

    # ------------------------------------------------------------------ what to do
    @property
    def probing(self) -> bool:
        return bool(self.targets)

    def expecting_move(self, now: float) -> bool:
        """Whether the server may be moving: a move announced (within ``announced_window``)
        that has not reached its address yet, or probing for one.

        The client's dead-connection verdict allows for it: a frozen broker is silent.
        """
        if self.probing:
            return True
        return (
            self.announced is not None
            and self.announced != self.current
            and self.announced_at is not None
            and now - self.announced_at < self.announced_window
        )

    def acceptable(self, address: Address) -> bool:
        """Only announced or pooled addresses may ever carry this connection."""
        return address == self.announced or address in self.pool

    def due_probes(self, now: float, min_interval: float = 0.0) -> list[Address]:
        """Addresses to send a PATH_CHALLENGE to now (empty when nothing is due).

        The next ones are due ``probe_interval`` later, or ``min_interval`` if that is
        longer (the QUIC layer's floor: a path with a long round trip must get an answer
        to a challenge before newer ones make the endpoint forget it).
        """
        if not self.targets or self.next_probe_at is None:
            return []
        if self.window_until is not None and now >= self.window_until:
            self.targets = []  # window over: back to aioquic's own timers
            self.next_probe_at = None
            return []
        if now < self.next_probe_at:
            return []
        since = now - self._probing_since
        if since >= self.probe_backoff_after:
            ceiling = self.probe_interval_max if since < self.window else self.probe_interval_late
            self.interval = min(self.interval * 2, ceiling)
        self.next_probe_at = now + max(self.interval, min_interval)
        self.last_probe_at = now
        record = self.records[-1] if self.records else None
        if record is not None and record.first_probe_at is None:
            record.first_probe_at = now
        return list(self.targets)

    def heard_from(self, address: Address, now: float, min_interval: float = 0.0) -> bool:
        """A datagram came from an address being probed: challenge it now, not next tick.

        The restored broker speaks first (its overdue timers fire at the thaw), so the
        path can validate one round trip after the thaw instead of up to a probe interval
        later.  Returns whether to challenge now; ``min_interval`` is the QUIC layer's floor.

        The broker is back, so what it needs now is time, not more challenges: the answer
        is awaited ``answer_wait`` s (doubling per further challenge, up to
        ``answer_wait_max``) before another, and the periodic probes hold off meanwhile.
        A broker thawing with 1,000 clients sends each many datagrams; a challenge per
        datagram, 1,200 padded bytes each, swamped it, its answers came later than aioquic
        remembers challenges (five), and the paths never validated.
        """
        if address not in self.targets or self.next_probe_at is None:
            return False
        if self.last_probe_at is not None and now - self.last_probe_at < min_interval:
            return False
        if self._answer_due_at is not None and now < self._answer_due_at:
            return False  # the last one prompted by the broker's own datagram is pending
        wait = self._answer_wait
        self._answer_due_at = now + wait
        self._answer_wait = min(wait * 2, self.answer_wait_max)
        self.last_probe_at = now
        self.next_probe_at = now + max(wait, self.interval, min_interval)
        return True

    def next_timer(self) -> float | None:
        return self.next_probe_at if self.targets else None

    def _start(self, record: MigrationRecord, targets: list[Address], now: float) -> None:
        record.probing_since = now
        self.targets = targets
        announced = record.trigger != "pool"
        self.window_until = now + (self.announced_window if announced else self.pool_window)
        self.next_probe_at = now
        self.interval = self.probe_interval
        self._probing_since = now
        self._answer_due_at, self._answer_wait = None, self.answer_wait

    def _record(self, record: MigrationRecord) -> None:
        self.records.append(record)
        del self.records[: -self.max_records]

    def _pending_record(self) -> MigrationRecord | None:
        if self.records and self.records[-1].validated_at is None:
            return self.records[-1]
        return None
