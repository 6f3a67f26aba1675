"""Smoke test of the ``user-properties`` probe of ``qmig bench abuse``, on a tiny budget.

It checks that the figures come out (and, since the fix of issue #13 finding 6, that the
packets are refused with 0x97 and none is retained), never how fast or small the broker is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qmig.benchmarks import abuse

FIGURES = ("rss_before_mb", "rss_peak_mb", "rss_after_mb", "stall_worst_ms", "worst_packet_ms")


def test_user_properties_probe_reports_its_figures(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    abuse.add_arguments(parser)
    out = tmp_path / "abuse.json"
    args = parser.parse_args(
        ["user-properties", "--user-properties-packets", "3", "--user-properties-count", "2000",
         "--json", str(out)]
    )  # fmt: skip
    assert abuse.run(args) == 0
    figures = json.loads(out.read_text())["user-properties"]
    assert figures["packets"] == 3 and figures["user_properties_each"] == 2000
    assert figures["refused"] == 3 and figures["refusal_reasons"] == ["0x97"]
    assert figures["kept"] == 0 and figures["retained_stored"] == 0
    for key in FIGURES:
        assert isinstance(figures[key], int | float), key
    assert figures["broker_alive"] and not figures["bystander_lost"]
