"""Smoke test of the ``trigger-flood`` probe of ``qmig bench abuse`` (issue #13 finding 8).

The probe runs through the CLI with 300 frames a phase, about two seconds; the test checks
that its figures come out and that the broker's limits showed (triggers before CONNECT all
dropped, the rest rate-limited, no forged log line), never how fast or how small.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 300


@pytest.mark.timeout(60)
def test_trigger_flood_reports_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "abuse.json"
    proc = subprocess.run(
        [sys.executable, "-m", "qmig", "bench", "abuse", "trigger-flood", "--json", str(out),
         "--trigger-flood-frames", str(FRAMES)],
        cwd=ROOT, capture_output=True, text=True, timeout=55,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())["trigger-flood"]
    assert figures["frames_per_phase"] == FRAMES
    assert figures["triggers_dropped"]["not_authorized"] == FRAMES  # all before CONNECT
    accepted = figures["triggers_accepted"]
    assert 0 < accepted < FRAMES
    assert figures["triggers_dropped"]["rate_limited"] == FRAMES - accepted
    assert figures["forged_log_lines"] == 0
    assert figures["before_connect_log_lines"] < 10 and figures["after_connect_log_lines"] < 10
    assert figures["triggers_kept_in_status"] == accepted
    for key in ("rss_before_mb", "rss_peak_mb", "stall_worst_ms", "pings_answered"):
        assert isinstance(figures[key], int | float), key
    assert figures["broker_alive"] and not figures["bystander_lost"]
