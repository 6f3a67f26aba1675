"""The load tests' bookkeeping and figures (pure: no locust, no network)."""

from __future__ import annotations

from loadtests.report import migration_impact, steady_state
from loadtests.telemetry import Tracker, parse_seq, payload, wall
from measure import distribution, percentile


def test_payload_round_trips_and_has_the_requested_size() -> None:
    data = payload(42, 64)
    assert len(data) == 64 and parse_seq(data) == 42
    assert parse_seq(payload(123456, 3)) == 123456  # never cut the number short
    assert parse_seq(b"garbage") is None


def test_tracker_counts_deliveries_losses_lates_and_duplicates() -> None:
    t = Tracker("u1", "quic", keep_series=True)
    s1, s2, s3 = t.new(10.0), t.new(11.0), t.new(12.0)
    latency = t.deliver(payload(s1, 8), 10.005)
    assert latency is not None and abs(latency - 0.005) < 1e-9 and t.delivered == 1
    assert t.deliver(payload(s1, 8), 10.006) is None and t.duplicates == 1
    assert t.overdue(13.5, timeout=2.0) == [(s2, 2.5)]  # s3 is only 1.5 s old
    assert t.lost == 1 and list(t.outstanding) == [s3]
    assert t.deliver(payload(s2, 8), 14.0) is None  # arrives after being declared lost
    assert (t.lost, t.late) == (0, 1)
    assert t.give_up(20.0) == [(s3, 8.0)] and t.lost == 1
    assert t.deliver(b"999.", 20.0) is None and t.unexpected == 1
    summary = t.summary()
    assert summary["delivered"] == 1 and summary["lost_messages"] == [[s3, wall(12.0)]]
    assert len(summary["deliveries"]) == 1 and len(summary["lates"]) == 1


def test_percentiles_are_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile(values, 100) == 100 and percentile([], 50) is None
    assert distribution([5.0])["p99"] == 5.0


def _trace(users: list[dict], ready: float = 100.0, rate: float = 10.0) -> dict:
    return {
        "ready_at": ready,
        "started_at": ready - 5,
        "settings": {"msg_rate": rate},
        "users": users,
    }


def _user(name: str, transport: str, deliveries: list, lost: list | None = None) -> dict:
    return {
        "name": name,
        "transport": transport,
        "connected_at": 99.0,
        "duplicates": 0,
        "failures": [],
        "lost_messages": lost or [],
        "lates": [],
        "acks": [],
        "deliveries": deliveries,
    }


def test_steady_state_leaves_the_warmup_out() -> None:
    early = [[1, 100.5, 500.0]]  # the connection storm
    steady = [[i, 103.0 + i * 0.1, 2.0] for i in range(2, 100)]
    s = steady_state(_trace([_user("a", "quic", early + steady)]), warmup=2.0)["quic"]
    assert s["deliver_ms"]["max"] == 2.0 and s["messages"] == 98 and s["lost"] == 0


def test_migration_impact_measures_the_gap_and_the_spike() -> None:
    # 10 msg/s; the broker freezes from t=200.0 to 201.0; messages sent meanwhile wait.
    deliveries = [[i, 190 + i * 0.1, 2.0] for i in range(100)]  # up to 199.9
    deliveries += [[100, 200.0, 1002.0]]  # sent at the freeze, delivered at resume
    deliveries += [[101 + i, 201.1 + i * 0.1, 2.0] for i in range(50)]
    trace = _trace([_user("a", "quic", deliveries)], ready=150.0)
    impact = migration_impact(trace, {"trigger": 199.95, "resumed": 201.0})
    quic = impact["transports"]["quic"]
    assert quic["gap_ms"]["max"] == 1100.0  # received at 199.902, then at 201.002
    assert quic["interruption_ms"]["max"] == 1000.0  # beyond the 100 ms nominal interval
    assert quic["max_latency_ms"]["max"] == 1002.0 and quic["lost"] == 0
    spike = max(impact["spike"], key=lambda row: row["max"] or 0)
    assert spike["max"] == 1002.0 and abs(spike["t_s"]) < 0.3
