"""Smoke test of ``qmig bench strategies``: every strategy moves its clients, loses nothing.

It runs the quick benchmark (one run, three clients, no loss) in a subprocess and checks the
report's shape and correctness figures, never anyone's speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ("proactive", "reactive", "pool-2", "announce")


@pytest.mark.timeout(150)
def test_quick_bench_strategies() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qmig", "bench", "strategies", "--quick", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert {"strategies", "goals", "settings", "literature_ms"} <= report.keys()
    results = report["strategies"]
    assert set(QUICK) <= results.keys(), results.keys()
    for name in QUICK:
        r = results[name]
        assert {"median", "p95"} <= r["extra_interruption_ms"].keys(), r
        assert r["lost"] == 0, (name, r)
        assert r["duplicates"] == 0, (name, r)
        assert r["clients"] > 0, (name, r)
        assert r["moved"] == r["clients"], (name, r)
