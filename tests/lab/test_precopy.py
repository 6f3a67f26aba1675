"""Real pre-copy migrations (issue #15): live rounds from /proc, a delta at the freeze.

The same lab and clients as test_live.py, with ``method: precopy``: the broker's memory
crosses the shaped link while it serves, and at the freeze only the pages that changed since
the last round do.  A move there and back (the restored broker is pre-copied again), and a
move whose restore fails, after which the broker must serve at the source again.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from migration.lab.lab import Lab
from migration.lab.run import run_scenario
from migration.scenario import ClientSpec, Scenario

from . import test_live
from .test_live import REASON, _rows

# The lab tests' fixtures: the broker image, and nothing of the lab left behind afterwards.
image = test_live.image
nothing_left_behind = test_live.nothing_left_behind

pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"containers unavailable: {REASON}"),
              pytest.mark.timeout(240)]  # fmt: skip

CLIENTS = (
    ClientSpec("quic-proactive", "quic", "proactive"),
    ClientSpec("quic-reactive", "quic", "reactive"),
    ClientSpec("tcp", "tcp"),
)


def test_a_precopy_move_there_and_back_ships_only_changed_pages_and_loses_nothing(
    image: str,
) -> None:
    scenario = Scenario.load("demo").replace(
        method="precopy", migrations=("edge-b", "edge-a"), settle=3.0, clients=CLIENTS
    )
    a, b = scenario.host("edge-a"), scenario.host("edge-b")
    seen: dict[str, Any] = {}

    def after(lab: Lab) -> None:
        seen["status"] = lab.control("status", host=a)
        podman = lab.podman_at(a)  # edge-a's own Podman, its CLI as on that host
        ps = subprocess.run(podman.argv("ps", "--filter", "name=qmig-broker-edge-a",
                                        "--filter", "status=running", "--format", "{{.Names}}"),
                            capture_output=True, text=True, timeout=30,
                            env=podman.env())  # fmt: skip
        seen["ps"] = ps.stdout.split()

    result = run_scenario(scenario, image, on_lab=after)

    there, back = result["migrations"]
    assert (there["ip_after"], back["ip_after"]) == (b.address, a.address)
    for m in (there, back):
        assert m["ok"] and m["method"] == "precopy", m
        rounds = m["precopy_rounds"]
        assert rounds[0]["pages_sent"] == rounds[0]["pages_read"] > 2000, rounds  # all of it
        assert rounds[-1]["pages_sent"] < rounds[0]["pages_sent"] / 4, rounds
        # At the freeze, most of the dump's pages were at the destination already.
        assert m["pages_from_copy"] > 4 * m["pages_shipped"], m
        assert m["transfer_bytes"] < m["checkpoint_bytes"] / 8, m
        t = m["timeline"]
        assert t["round_1"] < t["clients_notified"] < t["freeze_start"] < t["delta_done"]
        assert t["delta_done"] < t["transfer_done"] < t["rebuilt"] < t["restore_done"]
    assert seen["status"]["state"] == "serving" and seen["ps"] == ["qmig-broker-edge-a"]
    assert seen["status"]["sessions"] >= len(CLIENTS)
    for row in _rows(result):
        assert row["lost"] == 0, row
        assert row["interruption_ms"] is not None, row
    for client in result["clients"]:
        assert client["final_server"].startswith(a.address), client["name"]
        if client["transport"] == "quic":
            assert client["reconnects"] == 0, client["name"]


def test_a_failed_precopy_restore_rolls_back_and_the_next_moves_go_on(image: str) -> None:
    # A -> B fails and rolls back; the scenario's "A" then means "B again", and its last "B"
    # means "back to A": a rollback does not stop a sequence of moves.
    scenario = Scenario.load("demo").replace(
        method="precopy", migrations=("edge-b", "edge-a", "edge-b"), settle=2.0,
        clients=CLIENTS[:1],
    )  # fmt: skip
    a = scenario.host("edge-a")
    seen: dict[str, Any] = {}

    def after(lab: Lab) -> None:
        seen["host"] = lab.state.broker_host if lab.state else None
        seen["status"] = lab.control("status", host=a)

    result = run_scenario(scenario, image, fail_at={0: "restore"}, on_lab=after)

    m, again, back = result["migrations"]
    assert (again["ok"], again["from"], again["to"]) == (True, "edge-a", "edge-b"), again
    assert (back["ok"], back["from"], back["to"]) == (True, "edge-b", "edge-a"), back
    assert m["ok"] is False and m["failed_at"] == "restore", m
    assert m["rollback"] == "restored from the same checkpoint"
    t = m["timeline"]
    assert t["round_1"] < t["rebuilt"] < t["rollback_start"] < t["rolled_back"]
    # seconds, not tens: the failure-injecting container's removal is off the rollback's path
    assert t["rolled_back"] - t["rollback_start"] < 5.0, t
    assert seen["host"] == "edge-a" and seen["status"]["state"] == "serving"
    for row in _rows(result):
        assert row["lost"] == 0, row
