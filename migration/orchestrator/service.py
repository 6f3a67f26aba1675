"""``qmig orchestrate``: the core, its state on disk, the audit log, the API and one worker.

Threads: the HTTP servers' (:mod:`.api`, one thread per request) and one worker that runs
the queue, one job at a time, and the schedules.  Everything the core holds is touched
under one lock; a move itself runs outside it (it takes seconds), so status, history and
refusals answer while it runs.  Each change is written to the audit log and to
``state.json`` before the caller hears of it: what the API acknowledged survives a crash.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .audit import AuditLog
from .core import Core, Decision, Job
from .executor import Executor
from .inventory import Inventory
from .queue import StateFile

log = logging.getLogger("qmig.orchestrator")

IDLE_WAIT = 1.0  # seconds the worker sleeps when nothing is due
STOP_WAIT = 900.0  # seconds stop() waits for a running move: never cut one short
HISTORY_MAX = 1000  # audit records one history request returns at most


class Service:
    """The orchestrator: decisions (core), their record (audit, state) and their execution."""

    def __init__(self, inventory: Inventory, state_dir: Path, executor: Executor) -> None:
        self.inventory = inventory
        self.executor = executor
        self.state = StateFile(state_dir)
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self.core = Core(inventory)
        self.audit: AuditLog | None = None
        # For the metrics: decisions by (kind, reason); per figure of finished jobs, how many
        # and their sum in seconds (a Prometheus summary), and the last one.
        self.decisions: dict[tuple[str, str], int] = {}
        names = ("total", "downtime", "overhead")
        self.figures: dict[str, list[float]] = {k: [0, 0.0, 0.0] for k in names}
        self._stopping = False
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        """Own the state directory, reload the queue, learn where brokers run, start work."""
        self.state.lock()
        self.audit = AuditLog(self.state.dir / "audit.jsonl")
        now = time.time()
        data = self.state.load()
        decisions: list[Decision] = []
        if data is not None:
            self.core, decisions = Core.restore(self.inventory, data, now)
        for broker in self.inventory.brokers:
            where = self._locate(broker.name)
            if where is not None:
                self.core.relocate(broker.name, where)
        with self.lock:
            self._record([Decision("start", "service", detail=f"{len(self.core.queue)} queued, "
                                   f"paused: {self.core.paused}"), *decisions], now)  # fmt: skip
        self._worker = threading.Thread(target=self._work, name="qmig-orchestrator", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Stop taking jobs; a move that runs is let finish (a cut one could leave the broker
        checkpointed and nowhere), bounded by :data:`STOP_WAIT`."""
        with self.lock:
            self._stopping = True
            self._wake.notify_all()
            running = self.core.running
        if running is not None:
            log.info("stopping once job %d (%s to %s) has finished", running.id,
                     running.broker, running.dest)  # fmt: skip
        if self._worker is not None:
            self._worker.join(STOP_WAIT)
        if self.audit is not None:
            with self.lock:
                self._record([Decision("stop", "service")], time.time())
            self.audit.close()
        self.state.unlock()

    def _locate(self, broker: str) -> str | None:
        try:
            return self.executor.locate(broker)
        except Exception as exc:  # the executor's world may be down: keep what we know
            log.warning("cannot tell where broker %s runs: %s", broker, exc)
            return None

    # ------------------------------------------------------------------ recording
    def _record(self, decisions: Iterable[Decision], now: float) -> list[dict[str, Any]]:
        """Audit, count and persist (caller holds the lock); the audit records."""
        assert self.audit is not None
        out = []
        for d in decisions:
            out.append(self.audit.write(d.as_dict(), now))
            key = (d.kind, d.reason)
            self.decisions[key] = self.decisions.get(key, 0) + 1
            log.info("%s", " ".join(f"{k}={v}" for k, v in d.as_dict().items()))
        self.state.save(self.core.snapshot())
        self._wake.notify_all()
        return out

    # ------------------------------------------------------------------ requests (API)
    def migrate(
        self, broker: str | None, dest: str, method: str, by: str
    ) -> tuple[Decision, Job | None]:
        with self.lock:
            name = broker or self.inventory.brokers[0].name
            decision, job = self.core.request(name, dest, "operator", by, time.time(),
                                              method=method)  # fmt: skip
            self._record([decision], time.time())
            return decision, job

    def trigger(self, broker: str, hint: str, by: str, requested_at: float | None,
                detail: dict[str, Any]) -> tuple[Decision, Job | None]:  # fmt: skip
        now = time.time()
        with self.lock:
            decision, job = self.core.trigger(broker, hint, by, now, requested_at)
            self.audit_extra({"trigger": detail}, now)
            self._record([decision], now)
            return decision, job

    def audit_extra(self, entry: dict[str, Any], now: float) -> None:
        assert self.audit is not None
        self.audit.write(entry, now)

    def drain(self, host: str, by: str) -> list[Decision]:
        with self.lock:
            decisions = self.core.drain(host, by, time.time())
            self._record(decisions, time.time())
            return decisions

    def undrain(self, host: str, by: str) -> Decision:
        with self.lock:
            decision = self.core.undrain(host, by)
            self._record([decision], time.time())
            return decision

    def pause(self, paused: bool, by: str) -> Decision:
        with self.lock:
            decision = self.core.pause(paused, by)
            self._record([decision], time.time())
            return decision

    def status(self) -> dict[str, Any]:
        with self.lock:
            out = self.core.status()
        out["driver"] = self.inventory.driver
        return out

    def hosts(self) -> list[dict[str, Any]]:
        with self.lock:
            where = dict(self.core.locations)
            draining = set(self.core.draining)
        return [
            {"name": h.name, "address": h.address, "podman": h.podman,
             "link": {"address": h.link.address, "port": h.link.port, "rate": h.link.rate},
             "networks": [str(n) for n in h.networks], "draining": h.name in draining,
             "brokers": sorted(b for b, at in where.items() if at == h.name)}
            for h in self.inventory.hosts
        ]  # fmt: skip

    def history(self, limit: int) -> list[dict[str, Any]]:
        assert self.audit is not None
        return self.audit.tail(max(1, min(limit, HISTORY_MAX)))

    def job(self, job_id: int) -> dict[str, Any] | None:
        with self.lock:
            job = self.core.job(job_id)
            return job.as_dict() if job else None

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            with self.lock:
                if self._stopping:
                    return
                now = time.time()
                decisions = self.core.tick(now)
                started = self.core.start_next(now)
                if started is not None:
                    decisions.append(started[0])
                if decisions:
                    self._record(decisions, now)
                if started is None:
                    due = self.core.next_due()
                    wait = IDLE_WAIT if due is None else max(0.0, min(IDLE_WAIT, due - now))
                    self._wake.wait(wait)
                    continue
            self._run(started[1])

    def _run(self, job: Job) -> None:
        log.info("job %d: moving %s %s -> %s (%s)", job.id, job.broker, job.source, job.dest,
                 job.reason)  # fmt: skip
        try:
            outcome = self.executor.migrate(job, lambda step: log.info("job %d: %s", job.id, step))
        except Exception as exc:  # an executor bug must not stop the queue
            log.exception("job %d: the executor failed", job.id)
            outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        where = self._locate(job.broker)
        now = time.time()
        summary = _summary(outcome)
        with self.lock:
            ok = bool(outcome.get("ok"))
            decisions = self.core.finished(job.id, ok, where, now, summary)
            self._note_figures(job, outcome)
            figures = {k: v for k, v in summary.items() if k not in ("timeline", "clients")}
            self.audit_extra({"job": job.id, "outcome": figures}, now)
            self._record(decisions, now)

    def _note_figures(self, job: Job, outcome: dict[str, Any]) -> None:
        began = (outcome.get("timeline") or {}).get("trigger")
        values = {
            "total": job.finished_at - job.started_at
            if job.started_at is not None and job.finished_at is not None else None,
            "downtime": float(outcome["downtime_ms"]) / 1000
            if outcome.get("downtime_ms") is not None else None,
            "overhead": float(began) - (job.requested_at or job.created_at)
            if began is not None else None,
        }  # fmt: skip
        for key, value in values.items():
            if value is not None:
                figure = self.figures[key]
                figure[0] += 1
                figure[1] += value
                figure[2] = value


def _summary(outcome: dict[str, Any]) -> dict[str, Any]:
    """What a job keeps of its outcome: figures, timeline, the clients' returns."""
    keep = ("ok", "error", "from", "to", "ip_before", "ip_after", "method", "downtime_ms",
            "service_gap_ms", "total_ms", "checkpoint_bytes", "transfer_bytes", "failed_at",
            "rollback", "quic_notified", "quic_announced", "timeline", "clients")  # fmt: skip
    out = {k: outcome[k] for k in keep if k in outcome}
    with contextlib.suppress(KeyError, TypeError, ValueError):
        first = float(outcome["timeline"]["first_client_packet"])
        out["first_client_packet_at"] = first
    return out
