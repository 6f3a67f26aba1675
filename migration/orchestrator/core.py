"""The orchestrator's decisions, sans I/O: requests and events in, decisions and jobs out.

No socket, no clock, no file: every call gets ``now`` (Unix time), and the caller (the
service) persists :meth:`Core.snapshot` and writes each returned :class:`Decision` to the
audit log and the metrics.  The rules, in the order they are checked:

1. A move names a broker and a destination host of the inventory (else refused:
   ``unknown_broker`` / ``unknown_host``).
2. One job per broker: a broker with a job queued or running gets no second one (refused:
   ``busy``; the HTTP API answers 409).  This is what keeps two migrations of the same
   broker from ever running together, whoever asks.
3. Never onto a draining host (refused: ``draining``), never where the broker already is
   (refused: ``already_there``).
4. Jobs run one at a time, oldest first (:meth:`Core.start_next` hands out the next only
   when none runs and the queue is not paused); a job's source is where the broker is when
   it starts.
5. Triggers (a client's MIGRATION_TRIGGER, forwarded by its broker): only when the policy
   is enabled (else ``triggers_disabled``); the hint must name exactly one host (its name,
   its broker address, or an address in its client networks; else ``no_match`` /
   ``ambiguous``); and at most one trigger-made move per broker per ``cooldown`` seconds
   (``cooldown``: clients in two places must not bounce the broker between them).
6. Draining a host queues a move for every broker on it to the first host in inventory
   order that is not draining (``nowhere_to_go`` if none) and keeps new brokers off it
   until it is undrained.  A broker that is busy when its host is drained is moved off
   once its job ends, if it ended on the draining host.
7. Schedules rotate a broker over their hosts every ``every`` seconds: at each due time,
   to the host after its current one in the list (a busy broker skips that turn).
8. A restart: jobs still queued are kept in order; the job that was running is
   ``interrupted`` (not retried: it may have moved the broker or not, and only the
   executor can say where the broker is now: :meth:`Core.relocate`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .inventory import Inventory

REASONS = ("operator", "trigger", "drain", "schedule")


@dataclass
class Job:
    """One move of one broker, from the queue to its outcome."""

    id: int
    broker: str
    dest: str
    reason: str  # operator | trigger | drain | schedule
    by: str  # who asked: "api", a client id, "drain edge-a", "schedule"
    created_at: float
    method: str = "cold"
    state: str = "queued"  # queued | running | done | failed | interrupted
    source: str | None = None
    requested_at: float | None = None  # a trigger: when its broker accepted it
    started_at: float | None = None
    finished_at: float | None = None
    outcome: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Decision:
    """What the core decided, for the audit log and the metrics."""

    # queued | refused | started | done | failed | interrupted | reloaded | drain | undrain
    # | pause | resume
    kind: str
    reason: str  # the rule (busy, draining, ...) or the request's reason (trigger, ...)
    broker: str | None = None
    host: str | None = None
    job: int | None = None
    detail: str = ""
    by: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}


class Core:
    """Where each broker is, the queue, the draining hosts, the schedules' next turns."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self.locations = {b.name: b.host for b in inventory.brokers}
        self.queue: list[Job] = []
        self.running: Job | None = None
        self.draining: set[str] = set()
        self.next_id = 1
        self.last_trigger_move: dict[str, float] = {}
        self.next_turn: dict[int, float] = {}  # schedule index -> when it is due
        self.recent: list[Job] = []  # finished jobs, newest last (bounded)
        self.paused = False

    # ------------------------------------------------------------------ requests
    def request(self, broker: str, dest: str, reason: str, by: str, now: float, *,
                method: str = "cold", requested_at: float | None = None
                ) -> tuple[Decision, Job | None]:  # fmt: skip
        """Queue a move of ``broker`` to ``dest`` if the rules allow it (rules 1-3)."""
        refused = self._check(broker, dest)
        if refused is not None:
            return Decision("refused", refused, broker, dest, detail=f"asked for {reason}",
                            by=by), None  # fmt: skip
        job = Job(self.next_id, broker, dest, reason, by, now, method,
                  requested_at=requested_at)  # fmt: skip
        self.next_id += 1
        self.queue.append(job)
        return Decision("queued", reason, broker, dest, job.id, by=by), job

    def _check(self, broker: str, dest: str) -> str | None:
        inv = self.inventory
        if inv.broker(broker) is None:
            return "unknown_broker"
        if inv.host(dest) is None:
            return "unknown_host"
        if self.busy(broker):
            return "busy"
        if dest in self.draining:
            return "draining"
        if self.locations.get(broker) == dest:
            return "already_there"
        return None

    def busy(self, broker: str) -> bool:
        running = self.running is not None and self.running.broker == broker
        return running or any(j.broker == broker for j in self.queue)

    def trigger(self, broker: str, hint: str, by: str, now: float,
                requested_at: float | None = None) -> tuple[Decision, Job | None]:  # fmt: skip
        """A client's MIGRATION_TRIGGER (rule 5)."""
        policies = self.inventory.policies
        if not policies.triggers:
            return Decision("refused", "triggers_disabled", broker, detail=hint, by=by), None
        if self.inventory.broker(broker) is None:
            return Decision("refused", "unknown_broker", broker, detail=hint, by=by), None
        hosts = self.inventory.hosts_matching(hint)
        if not hosts:
            return Decision("refused", "no_match", broker, detail=hint, by=by), None
        if len(hosts) > 1:
            names = ", ".join(h.name for h in hosts)
            return Decision("refused", "ambiguous", broker, detail=f"{hint}: {names}",
                            by=by), None  # fmt: skip
        last = self.last_trigger_move.get(broker)
        if last is not None and now - last < policies.cooldown:
            return Decision("refused", "cooldown", broker, hosts[0].name,
                            detail=f"{policies.cooldown - (now - last):.0f} s left",
                            by=by), None  # fmt: skip
        decision, job = self.request(broker, hosts[0].name, "trigger", by, now,
                                     requested_at=requested_at)  # fmt: skip
        if job is not None:
            self.last_trigger_move[broker] = now
        return decision, job

    def drain(self, host: str, by: str, now: float) -> list[Decision]:
        """Rule 6: keep brokers off ``host`` and move those on it away."""
        if self.inventory.host(host) is None:
            return [Decision("refused", "unknown_host", host=host, by=by)]
        self.draining.add(host)
        out = [Decision("drain", "operator", host=host, by=by)]
        for broker, where in sorted(self.locations.items()):
            if where == host and not self.busy(broker):
                out.append(self._move_off(broker, host, now))
        return out

    def _move_off(self, broker: str, host: str, now: float) -> Decision:
        dest = next((h.name for h in self.inventory.hosts
                     if h.name != host and h.name not in self.draining), None)  # fmt: skip
        if dest is None:
            return Decision("refused", "nowhere_to_go", broker, host,
                            detail="every other host is draining", by=f"drain {host}")  # fmt: skip
        decision, _ = self.request(broker, dest, "drain", f"drain {host}", now)
        return decision

    def undrain(self, host: str, by: str) -> Decision:
        if host not in self.draining:
            return Decision("refused", "not_draining", host=host, by=by)
        self.draining.discard(host)
        return Decision("undrain", "operator", host=host, by=by)

    def pause(self, paused: bool, by: str) -> Decision:
        """Hold the queue (nothing new starts; a running job runs on) or let it go."""
        self.paused = paused
        return Decision("pause" if paused else "resume", "operator", by=by,
                        detail=f"{len(self.queue)} queued")  # fmt: skip

    def tick(self, now: float) -> list[Decision]:
        """Rule 7: the schedules that are due."""
        out = []
        for index, schedule in enumerate(self.inventory.policies.schedule):
            due = self.next_turn.setdefault(index, now + schedule.every)
            if now < due:
                continue
            self.next_turn[index] = now + schedule.every
            here = self.locations.get(schedule.broker)
            hosts = schedule.hosts
            after = hosts[(hosts.index(here) + 1) % len(hosts)] if here in hosts else hosts[0]
            decision, _ = self.request(schedule.broker, after, "schedule", "schedule", now)
            out.append(decision)
        return out

    def next_due(self) -> float | None:
        return min(self.next_turn.values(), default=None)

    # ------------------------------------------------------------------ jobs
    def start_next(self, now: float) -> tuple[Decision, Job] | None:
        """Rule 4: the next job, if none runs."""
        if self.running is not None or not self.queue or self.paused:
            return None
        job = self.queue.pop(0)
        job.state = "running"
        job.started_at = now
        job.source = self.locations.get(job.broker)
        self.running = job
        return Decision("started", job.reason, job.broker, job.dest, job.id,
                        detail=f"from {job.source}", by=job.by), job  # fmt: skip

    def finished(self, job_id: int, ok: bool, where: str | None, now: float,
                 outcome: dict[str, Any]) -> list[Decision]:  # fmt: skip
        """The running job ended; ``where`` is the broker's host now (None: unknown)."""
        job = self.running
        if job is None or job.id != job_id:
            return [Decision("refused", "not_running", job=job_id)]
        self.running = None
        job.state = "done" if ok else "failed"
        job.finished_at = now
        job.outcome = outcome
        if where is not None:
            self.locations[job.broker] = where
        self._remember(job)
        detail = str(outcome.get("error", "")) if not ok else ""
        out = [Decision(job.state, job.reason, job.broker, where, job.id, detail, job.by)]
        if where in self.draining and not self.busy(job.broker):
            out.append(self._move_off(job.broker, where, now))
        return out

    def _remember(self, job: Job, keep: int = 100) -> None:
        self.recent.append(job)
        del self.recent[:-keep]

    def relocate(self, broker: str, host: str) -> None:
        """The executor says where ``broker`` runs (at start, after an interruption)."""
        if self.inventory.host(host) is not None:
            self.locations[broker] = host

    def job(self, job_id: int) -> Job | None:
        if self.running is not None and self.running.id == job_id:
            return self.running
        return next((j for j in (*self.queue, *self.recent) if j.id == job_id), None)

    # ------------------------------------------------------------------ persistence
    def snapshot(self) -> dict[str, Any]:
        """Everything a restart needs (rule 8), as JSON-able data."""
        return {
            "version": 1,
            "locations": dict(self.locations),
            "queue": [j.as_dict() for j in self.queue],
            "running": self.running.as_dict() if self.running else None,
            "draining": sorted(self.draining),
            "next_id": self.next_id,
            "last_trigger_move": dict(self.last_trigger_move),
            "next_turn": {str(k): v for k, v in self.next_turn.items()},
            "recent": [j.as_dict() for j in self.recent],
            "paused": self.paused,
        }

    @classmethod
    def restore(cls, inventory: Inventory, data: dict[str, Any],
                now: float) -> tuple[Core, list[Decision]]:  # fmt: skip
        """The core as :meth:`snapshot` left it; a job that was running is interrupted."""
        core = cls(inventory)
        core.locations.update({b: h for b, h in data.get("locations", {}).items()
                               if inventory.broker(b) and inventory.host(h)})  # fmt: skip
        core.queue = [Job.from_dict(j) for j in data.get("queue", [])]
        core.draining = {h for h in data.get("draining", []) if inventory.host(h)}
        core.next_id = int(data.get("next_id", 1))
        core.last_trigger_move = dict(data.get("last_trigger_move", {}))
        schedules = len(inventory.policies.schedule)
        core.next_turn = {int(k): float(v) for k, v in data.get("next_turn", {}).items()
                          if int(k) < schedules}  # fmt: skip
        core.recent = [Job.from_dict(j) for j in data.get("recent", [])]
        core.paused = bool(data.get("paused", False))
        out = []
        running = data.get("running")
        if running:
            job = Job.from_dict(running)
            job.state = "interrupted"
            job.finished_at = now
            core._remember(job)
            out.append(Decision("interrupted", job.reason, job.broker, job.dest, job.id,
                                "the orchestrator stopped while it ran", job.by))  # fmt: skip
        for job in core.queue:
            out.append(Decision("reloaded", job.reason, job.broker, job.dest, job.id, by=job.by))
        return core, out

    # ------------------------------------------------------------------ views
    def status(self) -> dict[str, Any]:
        return {
            "brokers": {
                b.name: {"host": self.locations.get(b.name), "busy": self.busy(b.name)}
                for b in self.inventory.brokers
            },
            "running": self.running.as_dict() if self.running else None,
            "queue": [j.as_dict() for j in self.queue],
            "draining": sorted(self.draining),
            "paused": self.paused,
        }
