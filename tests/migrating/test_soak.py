"""The soak's pure parts: its schedule, its RSS rule and its verdict."""

from __future__ import annotations

import argparse

import pytest

from migration.scenario import Scenario
from migration.soak import parse_duration, rotation, rss_growth, soak_clients, verdict


def test_durations_read_as_a_user_writes_them() -> None:
    assert parse_duration("1h") == 3600
    assert parse_duration("5m") == 300
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90") == parse_duration("90s") == 90
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("soon")


def test_the_broker_visits_every_edge_host_in_turn() -> None:
    demo = Scenario.load("demo")
    assert rotation(demo, 5) == ["edge-b", "edge-c", "edge-a", "edge-b", "edge-c"]


def test_the_clients_make_1000_msg_s_over_quic_and_tcp_at_qos_1_and_2() -> None:
    clients = soak_clients()
    assert len(clients) * 20 == 1000
    assert {c.transport for c in clients} == {"quic", "tcp"}
    assert {c.library for c in clients} == {"qmig", "paho"}
    for transport in ("quic", "tcp"):
        assert {c.qos for c in clients if c.transport == transport} == {1, 2}
    Scenario.load("demo").replace(clients=clients)  # a valid scenario


def test_rss_growth_is_judged_after_the_warm_up() -> None:
    samples = [(float(t), 40.0 + (20.0 if t < 100 else 0.0) + t / 1000) for t in range(0, 600, 10)]
    rss = rss_growth(samples, since=100.0)
    assert rss["warm_mb"] == pytest.approx(40.11)  # the warm-up's 60 MB is not the baseline
    assert rss["growth"] == pytest.approx(0.0114, abs=0.001)
    assert rss_growth(samples[:3], since=0.0)["growth"] is None


def _row(**over: object) -> dict[str, object]:
    row: dict[str, object] = {"move": 1, "ok": True, "lost": 0, "duplicates_qos1": 3,
                              "duplicates_qos2": 0, "quic_rehandshakes": 0}  # fmt: skip
    row.update(over)
    return row


def test_the_verdict_fails_on_loss_qos2_duplicates_rehandshakes_rollbacks_and_growth() -> None:
    fine = {"growth": 0.05}
    assert verdict([_row(), _row(move=2)], fine, 0.10) == []  # QoS 1 duplicates are allowed
    assert verdict([_row(lost=2)], fine, 0.10) == ["2 messages lost"]
    assert verdict([_row(duplicates_qos2=1)], fine, 0.10) == ["1 QoS 2 duplicates"]
    assert verdict([_row(quic_rehandshakes=1)], fine, 0.10) == ["1 QUIC re-handshakes"]
    assert verdict([_row(ok=False)], fine, 0.10) == ["migrations [1] rolled back"]
    assert "grew 12.0%" in verdict([_row()], {"growth": 0.12}, 0.10)[0]
    assert verdict([_row()], {"growth": None}, 0.10)  # no judgement is no pass
