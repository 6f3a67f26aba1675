"""The demo is a cross-transport test too: TCP, TLS and MPTCP clients all see each other."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from qmig.demo import TRANSPORTS, print_report, run_demo


def test_demo_every_transport_reaches_every_subscriber_without_loss() -> None:
    console = Console(file=io.StringIO(), width=120)
    report = run_demo(duration=1.0, rate=20.0, console=console)
    sent = report["sent_per_publisher"]
    assert set(sent) == set(TRANSPORTS) and all(n >= 15 for n in sent.values())
    for transport, sub in report["subscribers"].items():
        assert sub["received"] == sent, transport
        assert sum(sub["lost"].values()) == 0
        assert sum(sub["duplicates"].values()) == 0
    # Where the kernel has MPTCP enabled, the MPTCP subscriber really used an MPTCP socket.
    enabled = Path("/proc/sys/net/mptcp/enabled")
    if enabled.exists() and enabled.read_text().strip() == "1":
        assert report["subscribers"]["mptcp"]["socket_protocol"] == "MPTCP"
    assert report["subscribers"]["tcp"]["socket_protocol"] == "TCP"
    print_report(report, console)
    assert "from mptcp" in console.file.getvalue()


def test_without_containers_the_demo_says_so_and_runs_the_harness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse
    import json

    import migration.lab.lab as lab_module
    from qmig.demo import run

    monkeypatch.setattr(lab_module, "containers_unavailable", lambda: "no podman here")
    assert run(argparse.Namespace(report_dir=str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert "containers unavailable (no podman here)" in out
    (report,) = tmp_path.glob("demo-*.json")
    migrations = json.loads(report.read_text())["migrations"]
    assert len(migrations) == 2
    for m in migrations:
        assert {"ip_before", "ip_after", "downtime_ms", "timeline", "clients"} <= set(m)
        strategies = {c["strategy"] for c in m["clients"]}
        assert strategies == {"proactive", "reactive", "pool", "announce"}
        assert all(c["lost"] == 0 and c["interruption_ms"] is not None for c in m["clients"])
