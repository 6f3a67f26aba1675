"""What a lab is made of, checked without building one: per-host Podman's configuration and
the scenario's rules for it (issue #17)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from migration.lab import podman as podman_mod
from migration.lab.podman import Instance
from migration.scenario import Scenario, ScenarioError


def test_an_instance_keeps_the_machines_dropins_and_adds_file_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropins = tmp_path / "containers.conf.d"
    dropins.mkdir()
    (dropins / "qmig.conf").write_text(
        '[containers]\ndefault_ulimits = ["nofile=1024:1024"]\n[engine]\nruntime = "runc"\n'
    )
    (dropins / "qmig-runtime.conf").write_text(
        '[engine.runtimes]\nqmig-runc = ["/usr/local/libexec/qmig/qmig-runc"]\n'
    )
    monkeypatch.setattr(podman_mod, "CONF_DROPINS", dropins)
    inst = Instance("qmig-h-edge-a", tmp_path / "storage", tmp_path / "run")
    inst.prepare()
    conf = tomllib.loads(inst.conf.read_text())
    assert conf["containers"]["default_ulimits"] == ["nofile=1024:1024"]  # else setrlimit EPERM
    assert conf["engine"]["runtime"] == "runc"
    assert conf["engine"]["runtimes"]["qmig-runc"] == ["/usr/local/libexec/qmig/qmig-runc"]
    assert conf["engine"]["lock_type"] == "file"  # no lock shared with the machine's Podman
    assert conf["network"]["network_config_dir"] == str(tmp_path / "run" / "cni")
    argv = inst.argv("ps")
    assert argv[:2] == ["nsenter", "--net=/run/netns/qmig-h-edge-a"]
    assert ["--root", str(tmp_path / "storage")] == argv[3:5] and argv[-1] == "ps"
    assert inst.env()["CONTAINERS_CONF"] == str(inst.conf)
    assert "nsenter" not in inst.argv("ps", in_netns=False)


def test_per_host_scenarios_give_each_host_its_own_uplink() -> None:
    scenario = Scenario.load("demo").replace(podman="per-host")
    uplinks = [scenario.uplink_subnet(h) for h in scenario.hosts]
    assert uplinks == ["198.18.20.0/30", "198.18.20.4/30", "198.18.20.8/30"]
    with pytest.raises(ScenarioError, match="podman must be one of"):
        scenario.replace(podman="both")
    with pytest.raises(ScenarioError, match="overlap"):
        scenario.replace(client_subnet="198.18.21.0/24")  # inside the uplinks' range
    loaded = Scenario.from_dict({"hosts": {"a": "198.18.1.0/24", "b": "198.18.2.0/24"},
                                 "podman": "per-host"})  # fmt: skip
    assert loaded.podman == "per-host"
