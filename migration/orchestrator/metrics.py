"""The orchestrator's Prometheus metrics, read from the service at scrape time.

Decisions by kind and rule (queued, refused: busy / draining / cooldown ..., started,
done, failed, interrupted), the queue, the running job, draining hosts, where each broker
runs, and per finished move: its wall time, the broker's downtime and the orchestration
overhead (from the request, or the broker accepting the trigger, to the move's first step).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

if TYPE_CHECKING:
    from .service import Service


class OrchestratorCollector:
    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterable[Metric]:
        service = self.service
        with service.lock:
            decisions = dict(service.decisions)
            figures = {k: list(v) for k, v in service.figures.items()}
            core = service.core
            queued = len(core.queue)
            running = core.running is not None
            draining = set(core.draining)
            locations = dict(core.locations)
            paused = core.paused
        family = CounterMetricFamily(
            "qmig_orchestrator_decisions", "Decisions, by kind and rule or reason.",
            labels=["kind", "reason"],
        )  # fmt: skip
        for (kind, reason), count in sorted(decisions.items()):
            family.add_metric([kind, reason], count)
        yield family
        yield GaugeMetricFamily("qmig_orchestrator_queued", "Jobs waiting.", value=queued)
        yield GaugeMetricFamily("qmig_orchestrator_running", "1 while a move runs.",
                                value=int(running))  # fmt: skip
        yield GaugeMetricFamily("qmig_orchestrator_paused", "1 while the queue is held.",
                                value=int(paused))  # fmt: skip
        hosts = GaugeMetricFamily("qmig_orchestrator_host_draining", "1 for a draining host.",
                                  labels=["host"])  # fmt: skip
        for edge in service.inventory.hosts:
            hosts.add_metric([edge.name], int(edge.name in draining))
        yield hosts
        where = GaugeMetricFamily("qmig_orchestrator_broker_host", "1 where a broker runs.",
                                  labels=["broker", "host"])  # fmt: skip
        for broker, at in sorted(locations.items()):
            where.add_metric([broker, at], 1)
        yield where
        for name, key, text in (
            ("qmig_orchestrator_move_seconds", "total", "Wall time of finished moves."),
            ("qmig_orchestrator_downtime_seconds", "downtime", "Brokers' downtime per move."),
            ("qmig_orchestrator_overhead_seconds", "overhead",
             "From the request (or the broker accepting a trigger) to the move's first step."),
        ):  # fmt: skip
            n, total, last = figures[key]
            yield SummaryMetricFamily(name, text, count_value=int(n), sum_value=float(total))
            yield GaugeMetricFamily(f"{name.removesuffix('_seconds')}_last_seconds",
                                    f"The last one: {text[0].lower()}{text[1:]}",
                                    value=last)  # fmt: skip
