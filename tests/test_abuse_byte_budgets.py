"""Smoke test of the ``qmig bench abuse`` probes of issue #13 finding 7 (byte budgets).

``queued-bytes``, ``partial-packets`` and ``never-reads`` run through the CLI with tiny
counts and small broker budgets, so each takes a second or two; the test checks that their
figures come out and that the budgets showed (drops, closes), never how fast or how small.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(90)
def test_byte_budget_probes_report_their_figures(tmp_path: Path) -> None:
    out = tmp_path / "abuse.json"
    proc = subprocess.run(
        [sys.executable, "-m", "qmig", "bench", "abuse",
         "queued-bytes", "partial-packets", "never-reads", "--json", str(out),
         "--queued-bytes-count", "200", "--queued-bytes-size", "10000",
         "--queued-bytes-budget", "300000", "--queued-bytes-resume", "2",
         "--partial-packets-conns", "12", "--partial-packets-bytes", "100000",
         "--partial-packets-seconds", "4", "--partial-packets-timeout", "1",
         "--partial-packets-cap", "500000",
         "--never-reads-mb", "32", "--never-reads-seconds", "20",
         "--never-reads-max-output", "65536"],
        cwd=ROOT, capture_output=True, text=True, timeout=85,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    queued = report["queued-bytes"]
    assert queued["published"] == 200
    assert queued["acked_success"] + queued["acked_quota_exceeded"] == 200
    assert 0 < queued["acked_success"] < 200  # the session's budget filled up
    assert queued["delivered_on_resume"] == queued["acked_success"]  # nothing kept was lost
    assert queued["rss_peak_mb"] >= queued["rss_before_mb"] > 0

    partial = report["partial-packets"]
    assert partial["closed"] == 12 and partial["still_open_at_end"] == 0
    assert partial["closed_within_1s"] >= 1  # shed by the cap on all incomplete packets
    assert partial["closed_last_s"] is not None and partial["rss_peak_mb"] > 0

    never = report["never-reads"]
    assert never["closed_by_broker"] and never["closed_after_s"] is not None
    assert never["pingreq_mb_sent"] > 0 and never["rss_peak_mb"] > 0

    for figures in report.values():
        assert figures["bystander_lost"] is False
        assert figures["stall_worst_ms"] >= 0
