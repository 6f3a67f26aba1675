"""Real post-copy migrations (issue #15): lazy pages over the shaped link, and a rollback.

The same lab and clients as test_live.py, with ``method: postcopy``: the broker resumes at
the destination before its memory has arrived, the rest is pulled from a page server that
reads the source's full dump from disk.  One move at 100 Mbit/s, and one whose lazy-pages
daemon is killed mid-way, after which the broker must serve at the source again.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest

from migration.lab.lab import Lab
from migration.lab.postcopy import postcopy_support
from migration.lab.run import run_scenario
from migration.scenario import ClientSpec, Scenario

from . import test_live
from .test_live import REASON, _in_clients_ns, _rows

# The lab tests' fixtures: the broker image, and nothing of the lab left behind afterwards.
image = test_live.image
nothing_left_behind = test_live.nothing_left_behind

POSTCOPY = postcopy_support() if REASON is None else REASON
pytestmark = [pytest.mark.skipif(POSTCOPY is not None, reason=f"no post-copy: {POSTCOPY}"),
              pytest.mark.timeout(180)]  # fmt: skip

CLIENTS = (
    ClientSpec("quic-proactive", "quic", "proactive"),
    ClientSpec("quic-reactive", "quic", "reactive"),
    ClientSpec("tcp", "tcp"),
)


def test_a_postcopy_move_resumes_before_its_pages_and_loses_nothing(image: str) -> None:
    scenario = Scenario.load("demo").replace(
        method="postcopy", migrations=("edge-b",), settle=3.0, clients=CLIENTS
    )
    b = scenario.host("edge-b")
    seen: dict[str, Any] = {}

    def after(lab: Lab) -> None:
        seen["status"] = lab.control("status", host=b)
        seen["host"] = lab.state.broker_host if lab.state else None
        podman = lab.podman_at(b)  # edge-b's own Podman, its CLI as on that host
        ps = subprocess.run(podman.argv("ps", "--filter", "name=qmig-broker-edge-b",
                                        "--filter", "status=running", "--format", "{{.Names}}"),
                            capture_output=True, text=True, timeout=30,
                            env=podman.env())  # fmt: skip
        seen["ps"] = ps.stdout.split()
        logs = subprocess.run(podman.argv("logs", "qmig-broker-edge-b"), capture_output=True,
                              text=True, timeout=30, env=podman.env())  # fmt: skip
        seen["logs_rc"] = logs.returncode

    result = run_scenario(scenario, image, on_lab=after)

    (m,) = result["migrations"]
    assert m["ok"] and m["method"] == "postcopy", m
    assert (m["ip_before"], m["ip_after"]) == ("198.18.1.2", b.address)
    t = m["timeline"]
    assert t["restore_done"] < t["resumed"] < t["pages_done"] < t["source_cleaned"]
    assert m["lazy_bytes"] > 10_000_000 and m["transfer_bytes"] < 3_000_000  # pages came lazily
    assert m["pages_pulled"] > 0 and m["link_bytes"] > m["lazy_bytes"]
    # A normal running Podman container at the destination, serving its old sessions.
    assert seen["host"] == "edge-b" and seen["status"]["state"] == "serving"
    assert seen["ps"] == ["qmig-broker-edge-b"] and seen["logs_rc"] == 0
    assert seen["status"]["sessions"] >= len(CLIENTS)
    for row in _rows(result):
        assert row["lost"] == 0, row
        assert row["interruption_ms"] is not None, row
    for client in result["clients"]:
        assert client["final_server"].startswith(b.address), client["name"]
        if client["transport"] == "quic":
            assert client["reconnects"] == 0, client["name"]


def test_killing_the_lazy_pages_daemon_rolls_back_and_loses_nothing_acknowledged(
    image: str,
) -> None:
    """The link or the destination dies mid-way through the lazy phase: the broker serves
    at the source again, from its frozen image, and nothing the destination acknowledged
    meanwhile is lost.  An offline persistent session (mosquitto's own client) subscribed to
    every client's topic must, after the rollback, hold every message any client was told
    was delivered: the destination served 0.5 s before the kill, so without the commit
    point (broker.provisional) its PUBACKs would name messages the source never saw."""
    scenario = Scenario.load("demo").replace(
        method="postcopy",
        migrations=("edge-b",),
        clients=CLIENTS,
        settle=7.0,  # > the TCP client's fallback to the source (5 s)
    )
    a = scenario.host("edge-a")
    seen: dict[str, Any] = {}
    keeper = ("-i", "qmig-keeper", "-c", "-q", "1", "-t", "qmig/lab/#")

    def before(lab: Lab) -> None:
        made = _in_clients_ns("mosquitto_sub", "-h", a.address, *keeper, "-E")
        assert made.returncode == 0, made.stderr
        seen["keeper_from"] = time.time()

    def after(lab: Lab) -> None:
        seen["host"] = lab.state.broker_host if lab.state else None
        seen["status"] = lab.control("status", host=a)
        seen["b_reachable"] = _in_clients_ns("mosquitto_pub", "-h", "198.18.2.2", "-t", "x",
                                             "-m", "x", timeout=10).returncode == 0  # fmt: skip
        seen["keeper_until"] = time.time()
        drained = _in_clients_ns("mosquitto_sub", "-h", a.address, *keeper, "-v", "-W", "4")
        seen["kept"] = {tuple(line.split(" ", 1)) for line in drained.stdout.splitlines()}

    result = run_scenario(scenario, image, fail_at={0: "lazy-pages"}, on_ready=before,
                          on_lab=after)  # fmt: skip

    (m,) = result["migrations"]
    assert m["ok"] is False and m["failed_at"] == "lazy_pages", m
    assert m["rollback"] == "restored from the same checkpoint"
    t = m["timeline"]
    assert t["resumed"] < t["lazy_daemon_killed"] < t["rolled_back"]
    assert t["rolled_back"] - t["lazy_daemon_killed"] < 5.0  # serving at the source again
    assert seen["host"] == "edge-a" and seen["status"]["state"] == "serving"
    assert not seen["b_reachable"]  # the half-restored destination is gone
    assert seen["status"]["provisional"] is None  # the rollback released what it held
    # Nothing acknowledged is lost: every message a client had a PUBACK for, between the
    # keeper's subscription and its drain, waits in the keeper's session at the source.
    missing: dict[str, list[int]] = {}
    for client in result["clients"]:
        topic = f"qmig/lab/{client['name']}"
        acked = [int(seq) for seq, at in client["acked"]
                 if seen["keeper_from"] + 0.5 < at < seen["keeper_until"]]  # fmt: skip
        assert acked, client["name"]
        gone = [seq for seq in acked if (topic, str(seq)) not in seen["kept"]]
        if gone:
            missing[client["name"]] = gone
    assert not missing, f"acknowledged, then lost by the rollback: {missing}"
    # Every client, QUIC and TCP, is served by the source again at the end.
    back = {c["name"]: (c["connected_at_end"], c["final_server"].split(":")[0])
            for c in result["clients"]}  # fmt: skip
    assert back == {c.name: (True, a.address) for c in CLIENTS}, back
