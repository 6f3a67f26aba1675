"""Smoke test of the ``qmig bench abuse quic-flood`` probe (issue #13 finding 4).

It runs through the CLI with a few hundred forged Initials, a few abandoned handshakes and a
1 s handshake timeout, and checks that the figures come out and that the defences showed:
no state for forged Initials, Retry once the (small) half-open limit filled, every abandoned
handshake gone, the QUIC bystander served.  Never how fast or how small.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(90)
def test_quic_flood_probe_reports_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "abuse.json"
    proc = subprocess.run(
        [sys.executable, "-m", "qmig", "bench", "abuse", "quic-flood", "--json", str(out),
         "--quic-flood-packets", "300", "--quic-flood-handshakes", "12",
         "--quic-flood-watch", "8",
         "--quic-flood-broker", "--quic-max-handshakes 8 --quic-handshake-timeout 1"],
        cwd=ROOT, capture_output=True, text=True, timeout=85,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())["quic-flood"]
    assert figures["forged_initials"] == 300 and figures["abandoned_handshakes"] == 12
    assert figures["replies_to_forged"] == 0
    assert figures["quic_objects_before"] == 0
    assert figures["quic_objects_after_forged"] == 0  # forged Initials leave nothing
    assert figures["retry_received"] >= 1  # auto Retry once 2 of 8 were in progress
    assert figures["server_flights"] >= 2
    assert figures["quic_objects_peak"] >= 1
    assert figures["quic_objects_cleared_after_s"] is not None
    assert figures["quic_objects_at_end"] == 0
    assert figures["rss_peak_mb"] >= figures["rss_before_mb"] > 0
    assert figures["rss_after_mb"] > 0
    assert figures["bystander_lost"] is False and figures["stall_worst_ms"] >= 0
    assert figures["quic_bystander_lost"] is False and figures["quic_round_trips"] > 0
    assert figures["quic_new_connects"] >= 1 and figures["quic_new_connect_failures"] == 0
    assert figures["broker_alive"] is True
