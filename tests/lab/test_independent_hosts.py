"""Edge hosts with their own Podman (issue #17): real migrations between three instances.

With ``podman: per-host`` every edge host has its own Podman: its own storage, run directory,
file locks, CNI networks and API service, running in the host's own network namespace, so
the pod network's bridge is that host's and the machine reaches the pod through the host's
uplink.  The broker is checkpointed through the source host's Podman API and restored
through the destination's, the machine's own Podman takes no part, and afterwards nothing
of either instance is left but its storage (the image cache).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from typing import Any

import pytest

from migration.lab import net
from migration.lab.lab import (
    HOSTS_STORAGE,
    PODMAN_API_PORT,
    Lab,
    container_name,
    host_netns,
    pod_name,
)
from migration.lab.postcopy import postcopy_support
from migration.lab.precopy import best_method
from migration.lab.run import run_scenario
from migration.orchestrator import inventory
from migration.scenario import ClientSpec, Scenario

from . import test_live
from .test_live import REASON

image = test_live.image
nothing_left_behind = test_live.nothing_left_behind

# The first run on a machine loads the image into each host's storage: a longer timeout.
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"containers unavailable: {REASON}"),
              pytest.mark.timeout(420)]  # fmt: skip


def _refused(address: str) -> bool:
    try:
        with socket.create_connection((address, PODMAN_API_PORT), timeout=10) as raw:
            tls = ssl.create_default_context()
            tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE  # any server, no cert
            with tls.wrap_socket(raw, server_hostname=address) as conn:
                conn.sendall(b"GET /v4.0.0/libpod/_ping HTTP/1.1\r\nHost: x\r\n\r\n")
                return not conn.recv(4096).startswith(b"HTTP/")
    except OSError:
        return True


def _netns_inode(path: str) -> int:
    return os.stat(path).st_ino


def test_the_broker_tours_three_independent_podman_instances(image: str) -> None:
    """A to B to C and home.  The third hop is what the second cannot show: a checkpoint
    restored from another Podman carried that Podman's pidfile paths, and the next
    restore failed once the first host's container was gone."""
    demo = Scenario.load("demo")
    scenario = demo.replace(
        podman="per-host", hosts=demo.hosts[:3], migrations=("edge-b", "edge-c", "edge-a"),
        method=best_method()[0], settle=1.5,
        clients=(ClientSpec("quic-proactive", "quic", "proactive"),
                 ClientSpec("quic-announce", "quic", "announce"), ClientSpec("tcp", "tcp")),
    )  # fmt: skip
    a, b, c = (scenario.host(name) for name in ("edge-a", "edge-b", "edge-c"))
    seen: dict[str, Any] = {}

    def look(lab: Lab) -> None:
        for host in (a, b, c):
            podman = lab.podman_at(host)
            assert podman.pid and podman.instance is not None
            service_ns = _netns_inode(f"/proc/{podman.pid}/ns/net")
            seen[f"{host.name} service netns"] = service_ns == _netns_inode(
                f"/run/netns/{host_netns(host)}"
            )
            seen[f"{host.name} storage"] = podman.client.info()["store"]["graphRoot"]
            seen[f"{host.name} containers"] = sorted(  # not the pods' infra containers
                n for n in podman.lab_containers() if n.startswith("qmig-")
            )
            bridges = net.run(net.netns_exec(host_netns(host), "ip", "-o", "addr")).stdout
            seen[f"{host.name} bridge"] = f"inet {host.gateway}/" in bridges
            seen[f"{host.name} pod"] = podman.pod_id(pod_name(host))
            # reached by its address on the lab network, behind mutual TLS, as another
            # machine's would be; without the orchestrator's certificate, nothing gets in
            seen[f"{host.name} api"] = podman.api.url
            seen[f"{host.name} api without a certificate"] = _refused(lab.host_api_address(host))
        # what the broker's container sees of the lab's PKI: no CA key to mint certificates
        seen["broker etc"] = sorted(p.name for p in lab.etc.iterdir())
        listed = inventory.load(lab.state_dir / "inventory.yaml")
        seen["inventory"] = {h.name: (h.podman, h.tls is not None) for h in listed.hosts}
        cmd = ["podman", "ps", "-a", "--filter", "label=qmig=lab", "--format", "{{.Names}}"]
        shared = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        seen["machine's podman"] = shared.stdout.split()

    # A to B to C by the best method here, home by post-copy where it can run (its page
    # server then serves from the source host's namespace, its lazy-pages daemon pulls from
    # C's).
    back = "postcopy" if postcopy_support() is None else scenario.method
    methods = [scenario.method, scenario.method, back]
    result = run_scenario(scenario, image, methods=methods, on_lab=look)

    assert [m["ok"] for m in result["migrations"]] == [True] * 3, result["migrations"]
    assert [m["method"] for m in result["migrations"]] == methods
    assert [m["to"] for m in result["migrations"]] == ["edge-b", "edge-c", "edge-a"]
    for m in result["migrations"]:
        for row in m["clients"]:
            assert row["lost"] == 0, (m["to"], row)
    quic = [c for c in result["clients"] if c["name"].startswith("quic")]
    assert quic and all(c.get("reconnects", 0) == 0 for c in quic), quic  # one connection each
    for host in (a, b, c):
        assert seen[f"{host.name} service netns"], seen  # its Podman runs in its namespace
        assert seen[f"{host.name} bridge"], seen  # and its pod network is that host's
        assert seen[f"{host.name} storage"] == str(HOSTS_STORAGE / host.name), seen
        api = f"tcp://{Lab(scenario).host_api_address(host)}:{PODMAN_API_PORT}"
        assert seen[f"{host.name} api"] == api, seen
        assert seen[f"{host.name} api without a certificate"], seen
        assert seen["inventory"][host.name] == (api, True), seen
    # Back on edge-a: only edge-a's Podman runs a broker; the others dropped their copies.
    assert seen["edge-a containers"] == [container_name(a)], seen
    assert seen["edge-b containers"] == seen["edge-c containers"] == [], seen
    assert seen["machine's podman"] == [], seen
    assert "ca.key" not in seen["broker etc"] and "ca.crt" in seen["broker etc"], seen
    assert not any(name.endswith(".key") and name != "server.key"
                   for name in seen["broker etc"]), seen  # fmt: skip
