"""The orchestrator's inventory (errors a user can act on) and its decision core's rules.

The core is sans I/O, so its rules are checked directly with a clock the test sets; the
inventory is parsed from YAML text.  The service, its HTTP API and its restarts are in
``tests/test_orchestrator_api.py``; the move on real containers in
``tests/lab/test_orchestrate.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from migration.lab.lab import Lab
from migration.orchestrator.core import Core
from migration.orchestrator.inventory import Inventory, InventoryError, load, parse
from migration.scenario import Scenario

SOCK = "unix:///run/podman/podman.sock"


def inventory_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "driver": "lab",
        "lab": {"state_dir": "/tmp/nowhere"},
        "hosts": {
            "edge-a": {"podman": SOCK, "address": "198.18.1.2", "link": "198.18.250.2"},
            "edge-b": {
                "podman": SOCK,
                "address": "198.18.2.2",
                "link": "198.18.250.2",
                "networks": ["10.2.0.0/16"],
            },
            "edge-c": {"podman": SOCK, "address": "198.18.3.2", "link": "198.18.250.2"},
        },
        "brokers": {"lab": {"host": "edge-a", "control": {"port": 7883}}},
    }
    data.update(changes)
    return data


def inv(**changes: Any) -> Inventory:
    return parse(yaml.safe_dump(inventory_data(**changes)), "inv.yaml")


# ---------------------------------------------------------------------- inventory
@pytest.mark.parametrize(("podman", "machine"),
                         [("per-host", "198.18.20.1"), ("shared", "198.18.1.1")])  # fmt: skip
def test_the_lab_writes_an_inventory_the_orchestrator_loads(tmp_path: Path, podman: str,
                                                            machine: str) -> None:  # fmt: skip
    lab = Lab(Scenario.load("demo").replace(podman=podman), tmp_path)
    inventory = load(lab.write_inventory())
    assert [h.name for h in inventory.hosts] == ["edge-a", "edge-b", "edge-c"]
    assert inventory.host("edge-b").address == "198.18.2.2"  # type: ignore[union-attr]
    assert inventory.brokers[0].name == "lab" and inventory.brokers[0].host == "edge-a"
    assert inventory.orchestrator["api"].startswith("127.0.0.1:")  # local by default
    # the pods reach it: the machine on the start host's uplink, or its pod network's gateway
    assert inventory.orchestrator["triggers"] == f"{machine}:7891"
    assert inventory.lab["podman"] == podman
    assert inventory.lab["state_dir"] == str(tmp_path)


def _hosts(**edge_a: Any) -> dict[str, Any]:
    hosts = inventory_data()["hosts"]
    hosts["edge-a"] = {**hosts["edge-a"], **edge_a}
    return hosts


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("hosts: [", "not valid YAML at line 1"),
        ("- a list", "top level: must be a mapping, not list"),
        (inventory_data(hosts=None), "hosts: must be a mapping, not nothing"),
        (inventory_data(extra=1), "top level: unknown key 'extra'"),
        (inventory_data(driver="k8s"), "driver: 'k8s' is not one of lab"),
        (inventory_data(hosts={"edge-a": _hosts()["edge-a"]}), "at least two edge hosts"),
        (inventory_data(hosts=_hosts(podman="http://x")), "hosts.edge-a.podman: 'http://x'"),
        (inventory_data(hosts=_hosts(podman="tcp://h:8888")), "must use TLS"),
        (inventory_data(hosts=_hosts(podman="ssh://h")), "ssh needs a host and the socket"),
        (inventory_data(hosts=_hosts(address="198.18.2.2")), "is also edge-a's address"),
        (inventory_data(hosts=_hosts(address="not an address!")), "hosts.edge-a.address"),
        (inventory_data(hosts=_hosts(link={"port": 1})), "hosts.edge-a.link: missing address"),
        (inventory_data(hosts=_hosts(link={"address": "h", "port": 70000})),
         "hosts.edge-a.link.port: must be a port number"),
        (inventory_data(hosts=_hosts(networks=["x"])), "hosts.edge-a.networks[0]: 'x'"),
        (inventory_data(hosts=_hosts(colour="red")), "hosts.edge-a: unknown key 'colour'"),
        (inventory_data(brokers={"lab": {"host": "edge-z", "control": {"port": 7883}}}),
         "brokers.lab.host: no edge host 'edge-z'"),
        (inventory_data(brokers={"lab": {"host": "edge-a"}}), "brokers.lab: missing control"),
        (inventory_data(hosts={**_hosts(), "edge-b": {**_hosts()["edge-b"],
                                                      "podman": "unix:///other.sock"}}),
         "the lab driver moves within one Podman"),
        (inventory_data(lab={"state_dir": "/x", "podman": "both"}), "lab.podman: 'both'"),
        (inventory_data(policies={"schedule": [{"broker": "lab", "every": 60,
                                                "hosts": ["edge-a"]}]}),
         "policies.schedule[0].hosts: must list at least two"),
        (inventory_data(policies={"schedule": [{"broker": "lab", "every": -1,
                                                "hosts": ["edge-a", "edge-b"]}]}),
         "policies.schedule[0].every: must be a positive number"),
        (inventory_data(orchestrator={"api": "localhost"}), "orchestrator.api: 'localhost' is "
         "not HOST:PORT"),
    ],
)  # fmt: skip
def test_inventory_errors_say_where_and_what(data: Any, message: str) -> None:
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    with pytest.raises(InventoryError) as err:
        parse(text, "inv.yaml")
    assert str(err.value).startswith("inventory inv.yaml")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_per_host_lab_names_one_podman_api_per_host() -> None:
    hosts = {name: {**h, "podman": f"unix:///run/qmig/lab/hosts/{name}/podman.sock"}
             for name, h in inventory_data()["hosts"].items()}  # fmt: skip
    data = inventory_data(lab={"state_dir": "/x", "podman": "per-host"}, hosts=hosts)
    inventory = parse(yaml.safe_dump(data), "inv.yaml")
    assert inventory.lab["podman"] == "per-host"
    assert len({h.podman for h in inventory.hosts}) == 3


def test_an_unreadable_inventory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match=r"cannot read inventory .*missing.yaml"):
        load(tmp_path / "missing.yaml")


def test_hints_name_a_host_by_name_address_or_client_network() -> None:
    inventory = inv()
    assert [h.name for h in inventory.hosts_matching("edge-c")] == ["edge-c"]
    assert [h.name for h in inventory.hosts_matching("198.18.2.2:14567")] == ["edge-b"]
    assert [h.name for h in inventory.hosts_matching("10.2.7.1")] == ["edge-b"]
    assert inventory.hosts_matching("somewhere") == []
    assert inventory.hosts_matching("") == []


# ---------------------------------------------------------------------- the core's rules
def test_one_job_per_broker_and_never_two_running() -> None:
    core = Core(inv())
    decision, job = core.request("lab", "edge-b", "operator", "api", 10.0)
    assert decision.kind == "queued" and job is not None
    again, none = core.request("lab", "edge-c", "operator", "api", 11.0)
    assert (again.kind, again.reason, none) == ("refused", "busy", None)
    started = core.start_next(12.0)
    assert started is not None and started[1].source == "edge-a"
    assert core.start_next(12.5) is None  # one at a time
    assert core.request("lab", "edge-c", "operator", "api", 13.0)[0].reason == "busy"
    done = core.finished(job.id, True, "edge-b", 14.0, {"ok": True})
    assert done[0].kind == "done" and core.locations["lab"] == "edge-b"
    assert core.request("lab", "edge-b", "operator", "api", 15.0)[0].reason == "already_there"
    assert core.request("nope", "edge-b", "operator", "api", 15.0)[0].reason == "unknown_broker"
    assert core.request("lab", "edge-z", "operator", "api", 15.0)[0].reason == "unknown_host"


def test_triggers_need_one_matching_host_and_respect_the_cooldown() -> None:
    core = Core(inv(policies={"triggers": {"cooldown": 30}}))
    assert core.trigger("lab", "mars", "client x", 1.0)[0].reason == "no_match"
    decision, job = core.trigger("lab", "10.2.0.9", "client x", 2.0, requested_at=1.9)
    assert decision.kind == "queued" and job is not None and job.dest == "edge-b"
    assert job.reason == "trigger" and job.requested_at == 1.9
    started = core.start_next(3.0)
    assert started is not None
    core.finished(job.id, True, "edge-b", 5.0, {"ok": True})
    refused = core.trigger("lab", "edge-c", "client y", 20.0)[0]
    assert (refused.kind, refused.reason) == ("refused", "cooldown")
    assert core.trigger("lab", "edge-c", "client y", 33.0)[0].kind == "queued"
    off = Core(inv(policies={"triggers": {"enabled": False}}))
    assert off.trigger("lab", "edge-b", "client x", 1.0)[0].reason == "triggers_disabled"


def test_draining_moves_brokers_off_and_keeps_them_off() -> None:
    core = Core(inv())
    decisions = core.drain("edge-a", "api", 1.0)
    assert [d.kind for d in decisions] == ["drain", "queued"]
    assert core.queue[0].dest == "edge-b" and core.queue[0].reason == "drain"
    core.drain("edge-b", "api", 2.0)  # the broker is busy: nothing more for it yet
    assert core.request("x", "edge-b", "operator", "api", 3.0)[0].reason == "unknown_broker"
    started = core.start_next(3.0)
    assert started is not None
    # It ended on a host that is draining by now: off it goes again, to the first one left.
    after = core.finished(started[1].id, True, "edge-b", 4.0, {"ok": True})
    assert [d.kind for d in after] == ["done", "queued"] and core.queue[0].dest == "edge-c"
    assert core.undrain("edge-a", "api").kind == "undrain"
    assert core.undrain("edge-a", "api").reason == "not_draining"
    core.drain("edge-c", "api", 5.0)
    core.drain("edge-a", "api", 5.0)
    core.queue.clear()
    core.locations["lab"] = "edge-c"
    assert core.drain("edge-c", "api", 6.0)[-1].reason == "nowhere_to_go"
    assert core.request("lab", "edge-a", "operator", "api", 7.0)[0].reason == "draining"


def test_schedules_rotate_and_a_busy_broker_skips_its_turn() -> None:
    schedule = {"schedule": [{"broker": "lab", "every": 60, "hosts": ["edge-a", "edge-c"]}]}
    core = Core(inv(policies=schedule))
    assert core.tick(0.0) == [] and core.next_due() == 60.0
    (turn,) = core.tick(60.0)
    assert turn.kind == "queued" and core.queue[0].dest == "edge-c"
    (skipped,) = core.tick(120.0)
    assert skipped.reason == "busy"


def test_a_restart_keeps_the_queue_and_interrupts_the_running_job() -> None:
    core = Core(inv())
    first = core.request("lab", "edge-b", "operator", "api", 1.0)[1]
    assert first is not None
    core.start_next(2.0)
    core.pause(True, "api")
    snapshot = core.snapshot()
    snapshot["queue"].append({**first.as_dict(), "id": 7, "dest": "edge-c", "state": "queued"})
    again, decisions = Core.restore(inv(), snapshot, 3.0)
    assert [d.kind for d in decisions] == ["interrupted", "reloaded"]
    assert again.job(first.id).state == "interrupted"  # type: ignore[union-attr]
    assert [j.id for j in again.queue] == [7] and again.paused
    assert again.start_next(4.0) is None  # paused across the restart
    again.pause(False, "api")
    started = again.start_next(5.0)
    assert started is not None and started[1].id == 7
