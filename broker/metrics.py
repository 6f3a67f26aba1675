"""Prometheus metrics of a running broker (``--metrics-port``), read at scrape time.

Nothing here runs on the broker's hot path: no counter is incremented per packet for
Prometheus.  :class:`BrokerCollector` is a custom prometheus-client collector that, when
scraped, reads what the broker already keeps (the engine's ``$SYS`` counters, its
connections and sessions, the migration API's history, trigger counts and freeze watch,
the QUIC listener's handshake guard and the QUIC connections' network paths).

prometheus-client serves HTTP from a thread of its own; the broker's state belongs to the
event loop, so the collector hands the reading to the loop (``run_coroutine_threadsafe``)
and waits for it, bounded by :data:`SCRAPE_TIMEOUT`: the figures of one scrape are one
consistent snapshot.  A scrape is one HTTP/1.0 request per connection, closed after the
answer, so no established TCP connection lingers into a checkpoint (CRIU refuses them);
the listening socket moves with the broker like the control API's.  It listens on loopback
unless ``--metrics-host`` says otherwise and asks for no token: it tells counts, never
client ids, topics or hints.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.process_collector import ProcessCollector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .server import BrokerServer

log = logging.getLogger("qmig.metrics")

SCRAPE_TIMEOUT = 5.0  # seconds a scrape waits for the event loop's snapshot
TRANSPORTS = ("tcp", "tls", "mptcp", "quic")
MIGRATION_STATES = ("serving", "prepared", "checkpoint-ready")


class BrokerCollector:
    """The broker's figures as Prometheus metric families, read on the event loop."""

    def __init__(self, server: BrokerServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop

    def collect(self) -> Iterable[Metric]:
        """Called by prometheus-client in its HTTP thread: snapshot on the loop, bounded."""
        future = asyncio.run_coroutine_threadsafe(self._snapshot(), self.loop)
        try:
            return future.result(SCRAPE_TIMEOUT)
        except TimeoutError:
            future.cancel()
            log.warning("metrics scrape: the event loop did not answer in %g s", SCRAPE_TIMEOUT)
            return []

    async def _snapshot(self) -> list[Metric]:
        return list(self.families())

    def families(self) -> Iterator[Metric]:
        """Every metric family, from the broker's state as it is now (on the loop)."""
        server = self.server
        broker = server.broker
        stats = broker.stats
        api = server.migration

        connections = GaugeMetricFamily(
            "qmig_connections", "Open client connections by transport.", labels=["transport"]
        )
        by_transport = dict.fromkeys(TRANSPORTS, 0)
        for conn in broker.connections:
            by_transport[conn.transport] = by_transport.get(conn.transport, 0) + 1
        for transport, count in sorted(by_transport.items()):
            connections.add_metric([transport], count)
        yield connections
        yield CounterMetricFamily(
            "qmig_connections_accepted", "Connections accepted since start.",
            value=stats.connections_total,
        )  # fmt: skip
        yield CounterMetricFamily(
            "qmig_messages_received", "MQTT packets received.", value=stats.messages_received
        )
        yield CounterMetricFamily(
            "qmig_messages_sent", "MQTT packets sent.", value=stats.messages_sent
        )
        yield CounterMetricFamily(
            "qmig_publish_received", "PUBLISH packets received.", value=stats.publish_received
        )
        dropped = CounterMetricFamily(
            "qmig_messages_dropped", "Messages dropped, by why.", labels=["reason"]
        )
        dropped.add_metric(["byte_budget"], stats.quota_dropped)
        dropped.add_metric(["other"], stats.dropped - stats.quota_dropped)
        yield dropped
        yield CounterMetricFamily(
            "qmig_connections_closed_by_limit",
            "Connections closed by a byte limit or the incomplete-packet timeout.",
            value=stats.limit_closed,
        )
        queued = 0
        for session in broker.store.sessions():
            queued += len(session.pending) + len(session.inflight)
        yield GaugeMetricFamily(
            "qmig_queued_messages", "Messages queued or in flight in sessions.", value=queued
        )
        yield GaugeMetricFamily(
            "qmig_queued_bytes", "Bytes those messages hold (the byte budgets' count).",
            value=broker.queued_bytes,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "qmig_sessions", "Sessions (connected or not).", value=broker.store.session_count()
        )
        yield GaugeMetricFamily(
            "qmig_subscriptions", "Subscriptions.", value=broker.store.subscription_count()
        )
        yield GaugeMetricFamily(
            "qmig_retained_messages", "Retained messages.", value=broker.store.retained_count()
        )
        yield from self._migration_families(api)
        yield from self._quic_families()

    def _migration_families(self, api: Any) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "qmig_migration_state", "1 for the migration state the broker is in.",
            labels=["state"],
        )  # fmt: skip
        for name in MIGRATION_STATES:
            state.add_metric([name], 1 if api.state == name else 0)
        yield state
        migrations = CounterMetricFamily(
            "qmig_migrations", "Migrations this broker went through, by outcome.",
            labels=["outcome"],
        )  # fmt: skip
        for outcome, count in api.outcomes.items():
            migrations.add_metric([outcome], count)
        yield migrations
        yield SummaryMetricFamily(
            "qmig_migration_freeze_seconds",
            "Freezes as the broker's own clock saw them (checkpoint to thaw).",
            count_value=api.freezes,
            sum_value=api.frozen_seconds,
        )
        last = api.last_freeze
        yield GaugeMetricFamily(
            "qmig_migration_last_freeze_seconds", "The last freeze (0: none yet).",
            value=last["thawed_at"] - last["frozen_at"] if last else 0.0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "qmig_migration_returned_clients",
            "Clients heard again since the last thaw (the broker's return watch).",
            value=len(api.returned_clients()),
        )
        triggers = CounterMetricFamily(
            "qmig_migration_triggers", "MIGRATION_TRIGGER frames, by what became of them.",
            labels=["result"],
        )  # fmt: skip
        for result, count in sorted(api.trigger_counts.items()):
            triggers.add_metric([result], count)
        yield triggers
        forwarder = api.forwarder
        if forwarder is not None:
            forwarded = CounterMetricFamily(
                "qmig_migration_triggers_forwarded",
                "Accepted triggers sent to the orchestrator, by outcome.",
                labels=["result"],
            )
            for result, count in sorted(forwarder.counts.items()):
                forwarded.add_metric([result], count)
            yield forwarded

    def _quic_families(self) -> Iterator[Metric]:
        """Paths of QUIC connections (probing clients) and the handshake guard's counts."""
        paths = GaugeMetricFamily(
            "qmig_quic_paths",
            "Network paths of QUIC connections: validated, or being probed (a client "
            "challenging an address of the broker it does not use yet).",
            labels=["state"],
        )
        validated = probing = 0
        for proto in self.server.quic_protocols:
            for path in proto._quic._network_paths:
                if path.is_validated:
                    validated += 1
                else:
                    probing += 1
        paths.add_metric(["validated"], validated)
        paths.add_metric(["probing"], probing)
        yield paths
        listener = self.server.listeners.get("quic")
        guard = getattr(listener.server, "counts", None) if listener is not None else None
        refused = CounterMetricFamily(
            "qmig_quic_handshakes_refused",
            "Datagrams and handshakes the QUIC guard turned away since its listener opened "
            "(undecryptable, retry, timed_out, evicted).",
            labels=["reason"],
        )
        for reason, count in sorted((guard or {}).items()):
            refused.add_metric([reason], count)
        yield refused


class MetricsServer:
    """prometheus-client's HTTP server on ``host:port`` for one broker's registry."""

    def __init__(self, server: BrokerServer, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BrokerCollector(server, asyncio.get_running_loop()))
        ProcessCollector(namespace="qmig", registry=self.registry)  # CPU, RSS, open fds
        self._httpd: WSGIServer | None = None

    def start(self) -> tuple[str, int]:
        """Listen (port 0: a free one) and return the bound address."""
        self._httpd, _ = start_http_server(self.port, self.host, registry=self.registry)
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
