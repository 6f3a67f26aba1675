"""The durable store travels with the broker (issue #18), in the methods that rewrite the tar.

With ``persistence: true`` the lab's broker keeps its SQLite store in its container's own
filesystem, which podman's checkpoint export carries (its rootfs changes) and pre-copy's
delta and post-copy's shipped tar keep as they are.  Retained messages and an offline
session's queued messages are written at the source; after the move the destination's
broker is killed with SIGKILL and started again, so what it serves then comes from the
store that crossed the link, not from the memory that did.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from migration.lab.lab import Lab, container_name
from migration.lab.postcopy import postcopy_support
from migration.lab.run import run_scenario
from migration.scenario import ClientSpec, Host, Scenario

from . import test_live
from .test_live import REASON, _in_clients_ns

image = test_live.image
nothing_left_behind = test_live.nothing_left_behind

pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"containers unavailable: {REASON}"),
              pytest.mark.timeout(240)]  # fmt: skip

RETAINED = 20
QUEUED = 10


def _podman(lab: Lab, host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    """``podman ARGS`` on ``host``, as its own CLI (its Podman, in its namespace)."""
    podman = lab.podman_at(host)
    return subprocess.run(podman.argv(*args), capture_output=True, text=True, timeout=60,
                          env=podman.env())  # fmt: skip


@pytest.mark.parametrize("method", ["precopy", "postcopy"])
def test_the_store_moves_with_the_broker_and_survives_a_kill_there(image: str, method: str) -> None:
    if method == "postcopy" and postcopy_support():
        pytest.skip(f"no post-copy: {postcopy_support()}")
    scenario = Scenario.load("demo").replace(
        method=method, persistence=True, migrations=("edge-b",), settle=1.5,
        clients=(ClientSpec("quic-proactive", "quic", "proactive"),),
    )  # fmt: skip
    a, b = scenario.host("edge-a"), scenario.host("edge-b")
    seen: dict[str, Any] = {}

    def before(lab: Lab) -> None:
        sub = _in_clients_ns("mosquitto_sub", "-h", a.address, "-i", "store-sub", "-c",
                             "-q", "1", "-t", "store/q", "-E")  # fmt: skip
        assert sub.returncode == 0, sub.stderr
        for i in range(QUEUED):
            _in_clients_ns("mosquitto_pub", "-h", a.address, "-q", "1", "-t", "store/q",
                           "-m", f"queued-{i}")  # fmt: skip
        for i in range(RETAINED):
            _in_clients_ns("mosquitto_pub", "-h", a.address, "-q", "1", "-r", "-t",
                           f"store/r/{i}", "-m", f"kept-{i}")  # fmt: skip

    def after(lab: Lab) -> None:
        name = container_name(b)
        seen["kill"] = _podman(lab, b, "kill", "-s", "KILL", name).returncode
        _podman(lab, b, "wait", name)
        seen["start"] = _podman(lab, b, "start", name).returncode
        lab.wait_ready(b)
        retained = _in_clients_ns("mosquitto_sub", "-h", b.address, "-t", "store/r/#", "-v",
                                  "-C", str(RETAINED), "-W", "10", timeout=20)  # fmt: skip
        seen["retained"] = retained.stdout.split("\n")
        queued = _in_clients_ns("mosquitto_sub", "-h", b.address, "-i", "store-sub", "-c",
                                "-q", "1", "-t", "store/q", "-C", str(QUEUED), "-W", "10",
                                timeout=20)  # fmt: skip
        seen["queued"] = queued.stdout.split()

    result = run_scenario(scenario, image, on_ready=before, on_lab=after)

    (m,) = result["migrations"]
    assert m["ok"] and m["method"] == method, m
    if method == "precopy":  # the store's files crossed in the live rounds, not the freeze
        assert m["store_bytes"] > 0 and m["store_bytes_from_copy"] >= m["store_bytes"] / 2, m
    assert (seen["kill"], seen["start"]) == (0, 0), seen
    assert sorted(ln for ln in seen["retained"] if ln) == sorted(
        f"store/r/{i} kept-{i}" for i in range(RETAINED)
    )
    assert seen["queued"] == [f"queued-{i}" for i in range(QUEUED)]
