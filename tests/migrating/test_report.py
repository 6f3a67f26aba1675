"""The lab report's figures on synthetic runs whose right answers are known by construction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from migration.report import (
    client_figures,
    counting_windows,
    figures_by_migration,
    interruption,
    plot_arrivals,
    summary_table,
    write_report,
)

T0 = 1_800_000_000.0  # wall clock, as the workload writes it
RATE = 10.0  # messages per second


def run(
    seconds: float = 10.0,
    outages: tuple[tuple[float, float], ...] = (),
    lose: set[int] | frozenset[int] = frozenset(),
    twice: set[int] | frozenset[int] = frozenset(),
    name: str = "c",
) -> dict[str, Any]:
    """A client that publishes at RATE from T0; a delivery takes 5 ms unless it would land
    in an outage (seconds after T0), then it arrives right at the outage's end."""
    sent, received = [], []
    for seq in range(1, int(seconds * RATE) + 1):
        t = T0 + seq / RATE
        sent.append([seq, t])
        if seq in lose:
            continue
        at = t + 0.005
        for a, b in outages:
            if T0 + a <= at < T0 + b:
                at = T0 + b
        received.append([seq, at])
        if seq in twice:
            received.append([seq, at + 0.001])
    received.sort(key=lambda r: r[1])
    return {
        "name": name, "transport": "quic", "strategy": "proactive", "sent": sent,
        "acked": list(sent), "received": received, "reconnects": 0, "migrations": [],
    }  # fmt: skip


def migration(freeze: float, resume: float, **timeline: float) -> dict[str, Any]:
    return {"ip_before": "198.18.1.2", "ip_after": "198.18.2.2", "freeze_at": T0 + freeze,
            "resume_at": T0 + resume,
            "timeline": {k.replace("_", "-"): T0 + v for k, v in timeline.items()}}  # fmt: skip


def test_interruption_is_the_largest_delivery_gap_spanning_the_freeze() -> None:
    client = run(outages=((3.0, 4.5),))
    fig = client_figures(client, T0 + 3.0, T0 + 4.2)
    # Last delivery before: seq 29 at 2.905; first after: 4.5 (everything held arrives then).
    assert fig["interruption_ms"] == pytest.approx(1595.0, abs=0.2)
    assert fig["extra_ms"] == pytest.approx(1595.0 - 1200.0, abs=0.2)
    assert fig["lost"] == 0 and fig["duplicates"] == 0
    assert {k: fig[k] for k in ("name", "transport", "strategy")} == {
        "name": "c", "transport": "quic", "strategy": "proactive"}  # fmt: skip


def test_a_gap_inside_the_window_counts_too_and_one_outside_does_not() -> None:
    # Deliveries at 1.0 and 3.0 bracket a window [1.5, 2.0]; a later bigger gap is irrelevant.
    assert interruption([0.5, 1.0, 3.0, 3.1, 9.0], 1.5, 2.0) == pytest.approx(2.0)
    # Deliveries inside the window split the gap: the largest piece wins.
    assert interruption([1.0, 1.6, 1.7, 3.0], 1.5, 2.0) == pytest.approx(1.3)


def test_nothing_received_after_the_resume_means_no_interruption_and_losses() -> None:
    client = run(seconds=10.0, lose={s for s in range(30, 101)})  # dead from 3.0 s on
    fig = client_figures(client, T0 + 3.0, T0 + 4.0)
    assert fig["interruption_ms"] is None and fig["extra_ms"] is None
    assert fig["lost"] == 71


def test_duplicates_count_extra_deliveries() -> None:
    fig = client_figures(run(twice={5, 6, 7}), T0 + 3.0, T0 + 3.5)
    assert fig["duplicates"] == 3 and fig["lost"] == 0


def test_messages_sent_just_before_the_end_are_not_lost_yet() -> None:
    client = run(seconds=10.0, lose={40, 99, 100})  # 9.9 s and 10.0 s: in flight at the end
    assert client_figures(client, T0 + 3.0, T0 + 3.5, end=T0 + 10.2)["lost"] == 1
    assert client_figures(client, T0 + 3.0, T0 + 3.5, end=T0 + 10.2, margin=0.0)["lost"] == 3
    assert client_figures(client, T0 + 3.0, T0 + 3.5)["lost"] == 3  # end=None: drained


def test_per_migration_windows_split_the_run_without_double_counting() -> None:
    migrations = [migration(3.0, 4.0, prepare=2.8), migration(7.0, 8.0, prepare=6.6)]
    windows = counting_windows(migrations)
    # Cut halfway between the first resume (4.0) and the second migration's prepare (6.6).
    assert windows == [(None, pytest.approx(T0 + 5.3)), (pytest.approx(T0 + 5.3), None)]
    # Order of the list does not matter: windows follow the migrations.
    assert counting_windows(migrations[::-1]) == windows[::-1]
    client = run(outages=((3.0, 4.1), (7.0, 8.3)), lose={35, 36, 75}, twice={20, 80, 81})
    rows = [m["clients"][0] for m in figures_by_migration([client], migrations)]
    assert [r["lost"] for r in rows] == [2, 1]
    assert [r["duplicates"] for r in rows] == [1, 2]
    whole = client_figures(client, T0 + 3.0, T0 + 4.0)
    assert sum(r["lost"] for r in rows) == whole["lost"] == 3
    assert sum(r["duplicates"] for r in rows) == whole["duplicates"] == 3
    # Each migration's interruption is its own gap.
    assert rows[0]["interruption_ms"] == pytest.approx(1195.0, abs=0.2)
    assert rows[1]["interruption_ms"] == pytest.approx(1395.0, abs=0.2)
    assert [m["downtime_ms"] for m in figures_by_migration([client], migrations)] == [1000, 1000]


def test_reconnects_are_counted_per_window_from_connection_events() -> None:
    client = run()
    client["connections"] = [["connected", T0, "a:1"], ["lost", T0 + 3, ""],
                             ["connected", T0 + 4, "b:1"], ["lost", T0 + 7, ""],
                             ["connected", T0 + 8, "a:1"]]  # fmt: skip
    migrations = [migration(3.0, 4.0), migration(7.0, 8.0)]
    rows = [m["clients"][0] for m in figures_by_migration([client], migrations)]
    assert [r["reconnects"] for r in rows] == [1, 1]
    del client["connections"]
    client["reconnects"] = 2
    assert client_figures(client, T0 + 3, T0 + 4)["reconnects"] == 2


def test_a_quic_clients_path_validation_is_reported_relative_to_the_resume() -> None:
    client = run()
    client["migrations"] = [{"sequence": 1, "destination": "198.18.2.2:14567",
                             "adopted": "198.18.2.2:14567", "trigger": "explicit",
                             "learned_at": T0 + 2.9, "first_probe_at": T0 + 2.9,
                             "validated_at": T0 + 4.05}]  # fmt: skip
    fig = client_figures(client, T0 + 3.0, T0 + 4.0)
    assert fig["validated_after_resume_ms"] == pytest.approx(50.0)
    assert fig["moved_to"] == "198.18.2.2:14567"


def test_summary_table_and_report_json_have_the_required_shape(tmp_path: Path) -> None:
    clients = [run(outages=((3.0, 4.2),), name="quic"),
               {**run(outages=((2.9, 5.0),), lose={31}, name="tcp"), "transport": "tcp",
                "strategy": "none"}]  # fmt: skip
    migrations = figures_by_migration(clients, [migration(3.0, 4.0, prepare=2.8)])
    console = Console(width=120, record=True)
    console.print(summary_table(migrations))
    text = console.export_text()
    assert "quic" in text and "tcp" in text and "198.18.1.2 -> 198.18.2.2" in text
    path = write_report(tmp_path / "sub" / "report.json", migrations)
    data = json.loads(path.read_text())
    (m,) = data["migrations"]
    assert {"ip_before", "ip_after", "downtime_ms", "timeline", "clients"} <= set(m)
    assert m["downtime_ms"] == 1000 and m["timeline"] == {"prepare": T0 + 2.8}
    required = {"name", "transport", "strategy", "interruption_ms", "lost", "duplicates"}
    for row in m["clients"]:
        assert required <= set(row)
    assert [r["lost"] for r in m["clients"]] == [0, 1]


def test_a_migration_without_its_window_is_refused() -> None:
    with pytest.raises(ValueError, match="freeze_at"):
        figures_by_migration([run()], [{"ip_before": "a", "ip_after": "b"}])
    # ... but a timeline naming freeze and resume will do.
    (m,) = figures_by_migration([run()], [{"timeline": {"freeze": T0 + 3, "resume": T0 + 4}}])
    assert m["downtime_ms"] == 1000


@pytest.mark.timeout(30)
def test_plot_writes_a_png(tmp_path: Path) -> None:
    tcp = run(outages=((2.9, 4.8), (6.9, 8.9)), lose={50}, name="tcp")
    clients = [run(outages=((3.0, 4.2), (7.0, 8.1)), name="quic-proactive"),
               {**tcp, "transport": "tcp", "strategy": "none"},
               {**run(name="idle"), "received": []}]  # fmt: skip
    migrations = [migration(3.0, 4.0, prepare=2.8, pre_checkpoint=2.85, restored=4.0),
                  migration(7.0, 8.0, prepare=6.8, restored=8.0)]  # fmt: skip
    path = plot_arrivals(clients, migrations, tmp_path / "plots" / "arrivals.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
