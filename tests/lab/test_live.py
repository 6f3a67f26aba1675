"""Real live migrations: Podman + CRIU move the broker container between lab networks.

Each test brings the lab up (pods on 198.18.x.0/24 podman networks, the client namespace,
the shaped checkpoint link), runs real clients in the client namespace (qmig's QUIC client
with each strategy, TCP and MPTCP clients, mosquitto_pub/sub), migrates, and tears the lab
down; afterwards nothing the lab made may remain, whether the test passed or not.
Skipped (with the reason) where this machine cannot run containers; CI runs them as root.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migration.lab import net
from migration.lab.lab import (
    CLIENT_NS,
    HOSTS_STORAGE,
    STATE_DIR,
    Lab,
    containers_unavailable,
    lab_lock,
)
from migration.lab.podman import Instance
from migration.lab.run import run_scenario
from migration.scenario import ClientSpec, Scenario

ROOT = Path(__file__).resolve().parents[2]
REASON = containers_unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"containers unavailable: {REASON}"),
              pytest.mark.timeout(240)]  # fmt: skip


@pytest.fixture(scope="module")
def image() -> str:
    from migration.image import ensure_image

    return ensure_image(ROOT)


def _leftovers() -> list[str]:
    """Everything a lab makes, found by name or label: must be empty after a run."""
    found = [f"netns {ns}" for ns in net.netns_list() if ns.startswith("qmig")]
    found += [f"link {link}" for link in net.prefixed_links()]
    for kind, cmd in (("container", ["podman", "ps", "-a"]), ("pod", ["podman", "pod", "ps"]),
                      ("network", ["podman", "network", "ls"])):  # fmt: skip
        out = subprocess.run([*cmd, "--filter", "label=qmig=lab", "--format", "{{.Name}}"],
                             capture_output=True, text=True, timeout=30).stdout  # fmt: skip
        found += [f"{kind} {name}" for name in out.split()]
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=30).stdout
    found += [f"rule {line}" for line in rules.splitlines() if "qmig-lab" in line]
    return found + _per_host_leftovers()


def _per_host_leftovers() -> list[str]:
    """Containers and pods left in an edge host's own Podman (``podman: per-host``)."""
    found = []
    for storage in sorted(HOSTS_STORAGE.glob("*")) if HOSTS_STORAGE.is_dir() else []:
        # The run directory the lab gives it (Podman's database remembers it), made again
        # for the check only: the lab removed it.
        inst = Instance(f"qmig-h-{storage.name}", storage, STATE_DIR / "hosts" / storage.name)
        inst.prepare()
        try:
            for kind, args in (("container", ("ps", "-a")), ("pod", ("pod", "ps"))):
                out = subprocess.run(inst.argv(*args, "--format", "{{.Name}}", in_netns=False),
                                     capture_output=True, text=True, timeout=30,
                                     env=inst.env()).stdout  # fmt: skip
                found += [f"{kind} {name} in {storage.name}'s Podman" for name in out.split()]
        finally:
            shutil.rmtree(STATE_DIR / "hosts", ignore_errors=True)
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    yield
    with lab_lock():  # another run (a demo, a benchmark) may own the lab right now
        left = _leftovers()
        if left:
            Lab(Scenario.load("demo")).down(quiet=True)  # leave the machine clean
    assert not left, f"the lab left these behind: {left}"


def _in_clients_ns(*cmd: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(net.netns_exec(CLIENT_NS, *cmd), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for m in result["migrations"] for row in m["clients"]]


def test_two_migrations_there_and_back_keep_sessions_and_connections(image: str) -> None:
    scenario = Scenario.load("demo").replace(settle=1.5)
    a, b = scenario.host("edge-a"), scenario.host("edge-b")
    seen: dict[str, Any] = {}

    def before(lab: Lab) -> None:
        # A retained message and a persistent subscription, made by mosquitto's own clients.
        pub = _in_clients_ns("mosquitto_pub", "-h", a.address, "-V", "mqttv5", "-q", "1",
                             "-r", "-t", "lab/retained", "-m", "kept")  # fmt: skip
        assert pub.returncode == 0, pub.stderr
        seen["sessions_before"] = lab.control("status")["sessions"]

    def after(lab: Lab) -> None:
        seen["status"] = lab.control("status")
        seen["b_reachable"] = _in_clients_ns("mosquitto_pub", "-h", b.address, "-t", "x",
                                             "-m", "x", timeout=10).returncode == 0  # fmt: skip
        sub = _in_clients_ns("mosquitto_sub", "-h", a.address, "-V", "mqttv5", "-t",
                             "lab/retained", "-C", "1", "-W", "5")  # fmt: skip
        seen["retained"] = sub.stdout.strip()

    result = run_scenario(scenario, image, on_ready=before, on_lab=after)

    first, second = result["migrations"]
    assert (first["ip_before"], first["ip_after"]) == (a.address, b.address)
    assert (second["ip_before"], second["ip_after"]) == (b.address, a.address)
    assert first["ok"] and second["ok"]
    for m in (first, second):
        assert m["checkpoint_bytes"] > 1_000_000  # a real process image moved
        assert m["downtime_ms"] > 0 and m["source_lock_rules_removed"] > 0
    # The broker's state survived two checkpoints: retained message, sessions.
    assert seen["retained"] == "kept"
    assert seen["status"]["sessions"] >= seen["sessions_before"] >= len(scenario.clients)
    assert not seen["b_reachable"]  # it really left edge-b
    # Every QoS 1 message published during both migrations reached its subscriber.
    for row in _rows(result):
        assert row["lost"] == 0, row
        assert row["interruption_ms"] is not None, row  # every client came back
    for client in result["clients"]:
        connects = [e for e in client["connections"] if e[0] == "connected"]
        if client["transport"] == "quic":
            # Same QUIC connection throughout: one handshake, two moves, back home.
            assert len(connects) == 1 and client["reconnects"] == 0, client["name"]
            assert [addr for _, addr in client["moves"]] == [
                f"{b.address}:{scenario.ports.quic}",
                f"{a.address}:{scenario.ports.quic}",
            ]
        else:
            # TCP and MPTCP were sent to each destination and resumed their sessions there.
            assert client["reconnects"] == 2, client["name"]
            assert connects[-1][2].startswith(a.address), client["name"]


@pytest.mark.parametrize("step", ["restore", "transfer"])
def test_a_failed_migration_rolls_back_and_loses_nothing(image: str, step: str) -> None:
    scenario = Scenario.load("demo").replace(
        migrations=("edge-b",), settle=7.0,  # > the TCP client's fallback (5 s)
        clients=(ClientSpec("quic-proactive", "quic", "proactive"),
                 ClientSpec("quic-reactive", "quic", "reactive"),
                 ClientSpec("tcp", "tcp")),
    )  # fmt: skip
    a = scenario.host("edge-a")
    seen: dict[str, Any] = {}

    def after(lab: Lab) -> None:
        seen["host"] = lab.state.broker_host if lab.state else None
        seen["status"] = lab.control("status", host=a)

    result = run_scenario(scenario, image, fail_at={0: step}, on_lab=after)

    (migration,) = result["migrations"]
    assert migration["ok"] is False and migration["failed_at"] == step
    assert migration["rollback"] == "restored from the same checkpoint"
    assert seen["host"] == "edge-a" and seen["status"]["state"] == "serving"
    for row in _rows(result):
        assert row["lost"] == 0, row
        assert row["interruption_ms"] is not None, row
    for client in result["clients"]:
        assert client["final_server"].startswith(a.address), client["name"]
        if client["transport"] == "quic":
            assert client["reconnects"] == 0 and client["moves"] == [], client["name"]


def test_cli_lab_up_migrate_json_status_down(image: str) -> None:
    def qmig(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qmig", *args], capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)  # fmt: skip

    with lab_lock():
        _cli_round_trip(qmig, image)


def _wait_for_session(qmig: Any, client_id: str, timeout: float = 15.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads(qmig("lab", "status").stdout)
        if status.get("broker", {}).get("connections", {}).get("quic"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{client_id} never connected")


def _cli_round_trip(qmig: Any, image: str) -> None:
    try:
        # The single-Podman lab (--podman shared) keeps working: this test is its one.
        up = qmig("lab", "up", "--image", image, "--podman", "shared")
        assert up.returncode == 0, up.stderr
        # A QUIC subscriber (qmig sub, proactive) in the clients' namespace stays connected.
        sub = subprocess.Popen(net.netns_exec(
            CLIENT_NS, sys.executable, "-m", "qmig", "sub", "-h", "198.18.1.2", "-t", "cli/t",
            "-q", "1", "-C", "1", "-i", "cli-sub", "--cafile", "/run/qmig/lab/etc/ca.crt"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
        try:
            _wait_for_session(qmig, "cli-sub")
            moved = qmig("migrate", "--to", "edge-b", "--json")
            assert moved.returncode == 0, moved.stderr
            pub = _in_clients_ns("mosquitto_pub", "-h", "198.18.2.2", "-V", "mqttv5", "-q", "1",
                                 "-t", "cli/t", "-m", "after the move")  # fmt: skip
            assert pub.returncode == 0, pub.stderr
            out, err = sub.communicate(timeout=15)
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.wait(5)
        assert sub.returncode == 0 and out.strip() == "after the move", err
        outcome = json.loads(moved.stdout)
        (back,) = [c for c in outcome["clients"] if c["client_id"] == "cli-sub"]
        assert back["transport"] == "quic" and back["after_thaw_ms"] >= 0
        assert outcome["ip_before"] == "198.18.1.2" and outcome["ip_after"] == "198.18.2.2"
        assert outcome["downtime_ms"] > 0
        for event in ("trigger", "clients_notified", "freeze_start", "dump_done",
                      "transfer_done", "restore_done", "resumed"):  # fmt: skip
            assert event in outcome["timeline"], event
        status = json.loads(qmig("lab", "status").stdout)
        assert status["broker_host"] == "edge-b" and status["broker"]["state"] == "serving"
        same = qmig("migrate", "--to", "edge-b")
        assert same.returncode == 1 and "already runs on edge-b" in same.stderr
    finally:
        down = qmig("lab", "down")
    assert down.returncode == 0, down.stderr
