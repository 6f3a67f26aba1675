"""``qmig bench freeze``'s figures, on synthetic moves (the real ones run in tests/lab)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qmig.benchmarks import freeze

ROOT = Path(__file__).resolve().parents[1]


def _client(sent: list[tuple[int, float]], latency: dict[int, float]) -> dict:
    return {"sent": [[s, t] for s, t in sent],
            "received": [[s, t + latency[s]] for s, t in sent if s in latency]}  # fmt: skip


def test_degradation_compares_messages_sent_before_the_trigger_and_after_the_resume() -> None:
    # 10 msg/s from t=0 to 10; trigger at 4, resume at 6; after it a 300 ms stall
    sent = [(i, i / 10) for i in range(100)]
    latency = {i: (0.300 if 60 <= i < 65 else 0.002) for i in range(100)}
    latency.pop(50)  # one lost during the freeze: it has no latency at all
    before, after = freeze.degradation([_client(sent, latency)], trigger=4.0, resume=6.0)
    assert before == 2.0 and after == 300.0


def test_rows_are_medians_per_cell_and_lost_is_summed() -> None:
    def move(method: str, downtime: float, lost: int, ok: bool = True) -> dict:
        return {"link": "100mbit", "state": "idle", "method": method, "ok": ok,
                "downtime_ms": downtime, "total_ms": downtime * 2, "link_mb": 5.0,
                "pages_faulted": None, "p99_before_ms": 2.0, "p99_after_ms": 3.0,
                "lost": lost, "duplicates": 0}  # fmt: skip

    moves = [move("cold", 1600, 0), move("cold", 1500, 0), move("cold", 1700, 1),
             move("precopy", 900, 0), move("precopy", 800, 0),
             move("precopy", 99999, 0, ok=False)]  # fmt: skip
    rows = {r["method"]: r for r in freeze.with_ratios(freeze.aggregate(moves))}
    assert rows["cold"]["downtime_ms"] == 1600 and rows["cold"]["lost"] == 1
    # a failed move counts as failed, and its figures stay out of the medians
    assert rows["precopy"]["downtime_ms"] == 850 and rows["precopy"]["failed"] == 1
    assert rows["precopy"]["vs_cold"] == 0.53
    assert "| 100mbit | idle | precopy | 850 | 0.53 |" in freeze.summary_markdown(
        {"command": "qmig bench freeze", "repeats": 3, "started": "now",
         "results": list(rows.values())})  # fmt: skip


def test_move_figures_read_the_outcome_of_each_method() -> None:
    t0 = 1000.0
    post = {"method": "postcopy", "ok": True, "downtime_ms": 1100.0, "total_ms": 3500.0,
            "link_bytes": 28_000_000, "checkpoint_bytes": 29_000_000, "pages_faulted": 700,
            "timeline": {"trigger": t0, "resumed": t0 + 2, "pages_done": t0 + 4},
            "clients": [{"lost": 0, "duplicates": 2}, {"lost": 1, "duplicates": 0}]}  # fmt: skip
    row = freeze.move_figures(post, [])
    assert (row["link_mb"], row["pages_faulted"], row["lost"], row["duplicates"]) == (
        28.0,
        700,
        1,
        2,
    )
    assert row["p99_after_ms"] is None  # no client traces: no latency, not zero


def test_bad_lists_are_refused_with_the_choices() -> None:
    parser = argparse.ArgumentParser()
    freeze.add_arguments(parser)
    with pytest.raises(ValueError, match="choose from cold, precopy, postcopy"):
        freeze._csv_arg("cold,warm", freeze.METHODS, freeze.METHODS)
    assert freeze._csv_arg(None, ("idle",), freeze.STATES) == ("idle",)
    assert freeze.run(parser.parse_args(["--repeats", "0"])) == 2


@pytest.mark.timeout(300)
def test_quick_bench_moves_the_broker_cold_and_precopied(tmp_path: Path) -> None:
    from migration.lab.lab import containers_unavailable

    reason = containers_unavailable()
    if reason:
        pytest.skip(f"containers unavailable: {reason}")
    out = tmp_path / "freeze.json"
    proc = subprocess.run(
        [sys.executable, "-m", "qmig", "bench", "freeze", "--quick", "--json", str(out),
         "--report-dir", str(tmp_path / "report")],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert out.exists(), proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["results"]}
    assert set(rows) == {"cold", "precopy"}, rows
    for r in rows.values():
        assert (r["link"], r["state"], r["moves"], r["failed"], r["lost"]) == (
            "100mbit", "idle", 1, 0, 0), r  # fmt: skip
        assert r["downtime_ms"] and r["total_ms"] and r["link_mb"], r
    # pre-copy sends its memory ahead of the freeze, cold within it
    (pre,) = [m for m in data["moves"] if m["method"] == "precopy"]
    assert pre["precopy_rounds"] >= 1
    assert (tmp_path / "report" / "summary.md").exists()
    assert (tmp_path / "report" / "downtime.png").stat().st_size > 1000
    assert proc.returncode == 0, proc.stderr[-3000:]
