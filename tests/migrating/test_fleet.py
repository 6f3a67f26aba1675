"""The fleet scenario of issue #16: client counts, processes, and its figures (no lab)."""

from __future__ import annotations

import pytest

from measure import percentile
from migration.fleet import recovery, stranded, summarize
from migration.scenario import ClientSpec, Scenario, ScenarioError


def test_fleet_scenario_has_1000_quic_clients_of_every_strategy() -> None:
    sc = Scenario.load("fleet")
    assert len(sc.clients) == 1000 and sc.processes == 4
    assert {c.transport for c in sc.clients} == {"quic"}
    assert {c.strategy for c in sc.clients} == {"proactive", "reactive", "pool", "announce"}
    assert sc.clients[0].name == "quic-proactive-000" and sc.rate == 1 and sc.qos == 1


def test_count_expands_and_processes_are_bounded() -> None:
    specs = ClientSpec.many({"name": "q", "strategy": "pool", "count": 12})
    assert [s.name for s in specs][:2] == ["q-00", "q-01"] and len(specs) == 12
    assert ClientSpec.many({"name": "one"}) == [ClientSpec("one")]
    with pytest.raises(ScenarioError):
        ClientSpec.many({"name": "q", "count": 0})
    with pytest.raises(ScenarioError):
        Scenario.load("demo").replace(processes=99)


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (
        50.0, 99.0, 100.0)  # fmt: skip


def test_summary_and_recovery_per_strategy() -> None:
    rows = [
        {"strategy": "pool", "lost": 2, "duplicates": 0, "reconnects": 1, "extra_ms": 10.0},
        {"strategy": "pool", "lost": 0, "duplicates": 1, "reconnects": 0, "extra_ms": None},
    ]
    fig = summarize({"clients": rows, "timeline": {"trigger": 0.0, "resumed": 1.5}})
    assert (fig["lost"], fig["lost_clients"], fig["second_handshakes"]) == (2, 1, 1)
    assert fig["strategies"]["pool"]["no_interruption_figure"] == 1
    assert fig["timeline_ms"] == {"trigger": 0, "resumed": 1500}
    client = {"strategy": "pool", "sent": [[1, 9.0], [2, 10.5]], "received": [[1, 9.1], [2, 12.0]]}
    assert recovery([client], {"freeze_at": 10.0, "resume_at": 11.0}) == {
        "pool": {"clients": 1, "p50_ms": 1000.0, "p95_ms": 1000.0, "p99_ms": 1000.0,
                 "max_ms": 1000.0}}  # fmt: skip


def test_idle_fleet_holds_10000_silent_quic_clients() -> None:
    sc = Scenario.load("fleet-idle")
    assert len(sc.clients) == 10_000 and sc.rate == 0 and sc.method == "precopy"
    assert {c.strategy for c in sc.clients} == {"proactive", "reactive", "pool", "announce"}
    with pytest.raises(ScenarioError):
        sc.replace(rate=-1)


def test_summary_says_who_followed_and_what_the_broker_held() -> None:
    rows = [
        {"strategy": "reactive", "lost": 0, "duplicates": 0, "reconnects": 0,
         "extra_ms": None, "validated_after_resume_ms": 40.0},
        {"strategy": "reactive", "lost": 0, "duplicates": 0, "reconnects": 0,
         "extra_ms": None, "validated_after_resume_ms": 300.0},
        {"strategy": "reactive", "lost": 0, "duplicates": 0, "reconnects": 0, "extra_ms": None},
    ]  # fmt: skip
    fig = summarize({"clients": rows, "timeline": {"trigger": 0.0},
                     "broker_rss_bytes": 290_400_000, "checkpoint_bytes": 3e8})  # fmt: skip
    assert fig["broker_rss_mb"] == 290.4 and fig["checkpoint_mb"] == 300.0
    reactive = fig["strategies"]["reactive"]
    assert reactive["followed"] == 2 and reactive["no_interruption_figure"] == 3
    assert (reactive["validated_p50_ms"], reactive["validated_p99_ms"]) == (40.0, 300.0)


def test_a_big_fleet_gets_time_to_connect_and_to_stop() -> None:
    """10,000 QUIC clients took more than the flat minute to connect (and 30 s to stop)."""
    from migration.lab.run import READY_TIMEOUT, ready_timeout

    clients = len(Scenario.load("fleet-idle").clients)
    assert ready_timeout(4) < READY_TIMEOUT + 1
    assert ready_timeout(clients) >= READY_TIMEOUT + clients / 50


def test_a_client_still_holding_the_old_address_at_the_end_is_not_following() -> None:
    """A QUIC client within its move grace still says "connected", to where the broker was:
    the fleet run counts it as not following (it is not served)."""
    clients = [
        {"transport": "quic", "connected_at_end": True, "final_server": "198.18.2.2:14567"},
        {"transport": "quic", "connected_at_end": True, "final_server": "198.18.1.2:14567"},
        {"transport": "quic", "connected_at_end": False, "final_server": "198.18.2.2:14567"},
        {"transport": "tcp", "connected_at_end": True, "final_server": "198.18.2.2:1883"},
    ]
    assert stranded(clients, "198.18.2.2") == 2
