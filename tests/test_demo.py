"""The demo is a cross-transport test too: TCP, TLS and MPTCP clients all see each other."""

from __future__ import annotations

import io
from pathlib import Path

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
