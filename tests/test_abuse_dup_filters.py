"""Smoke test of the ``dup-filters`` probe of ``qmig bench abuse``, on a tiny budget.

It checks that the figures come out (and, since the fix of issue #13 finding 5, that each
retained message reaches the attacker once), never how fast or small the broker is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qmig.benchmarks import abuse

FIGURES = ("rss_before_mb", "rss_peak_mb", "stall_worst_ms", "broker_cpu_s", "publish_mb")


def test_dup_filters_probe_reports_its_figures(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    abuse.add_arguments(parser)
    out = tmp_path / "abuse.json"
    args = parser.parse_args(
        ["dup-filters", "--dup-filters-retained", "500", "--dup-filters-copies", "8",
         "--dup-filters-seconds", "10", "--json", str(out)]
    )  # fmt: skip
    assert abuse.run(args) == 0
    figures = json.loads(out.read_text())["dup-filters"]
    assert figures["retained"] == 500 and figures["filters_in_subscribe"] == 8
    assert figures["suback_received"] and figures["broker_alive"]
    assert figures["publish_packets"] == 500  # one copy each, not eight
    assert figures["copies_per_retained"] == 1.0
    for key in FIGURES:
        assert isinstance(figures[key], int | float), key
    assert figures["rss_peak_mb"] >= figures["rss_before_mb"] > 0
    assert figures["pings_answered"] > 0 and not figures["bystander_lost"]
