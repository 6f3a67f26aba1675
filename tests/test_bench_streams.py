"""Smoke test of ``qmig bench streams``: both modes run through the lossy, delaying relay.

Checks the report's shape and that the relay really dropped datagrams while every probe
still arrived (QUIC retransmits); never anyone's speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(90)
def test_quick_bench_streams() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qmig", "bench", "streams", "--quick", "--loss", "5", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert [r["mode"] for r in report["results"]] == ["single", "per-topic"]
    for r in report["results"]:
        assert r["datagrams_dropped"] > 0, r
        assert r["probe_latency_ms"]["count"] == r["probes_sent"] > 0, r
        assert r["bulk_received"] == r["bulk_sent"], r
        assert {"median", "p95", "p99", "max"} <= r["probe_latency_ms"].keys()
