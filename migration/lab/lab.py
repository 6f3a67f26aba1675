"""The edge lab: edge hosts as pods on their own podman networks, clients in a namespace.

``qmig lab up`` builds, from a :class:`~migration.scenario.Scenario`:

- one podman network and one pod per edge host (``qmig-edge-a`` on 198.18.1.0/24 with the
  pod at .2, ...), the broker container running in the start host's pod;
- the clients' network namespace ``qmig-cl`` with a veth to the machine (198.18.100.0/24),
  where nftables drops the scenario's loss percentage both ways;
- the checkpoint link: namespace ``qmig-link`` behind a veth pair shaped with tbf to the
  scenario's rate, through which every checkpoint travels as a real byte stream;
- forwarding between these networks without NAT, so each side sees the other's own address.

``qmig lab down`` removes all of it, found by name prefix and label, not only by the state
file, so a crashed run is cleaned too.  The state (where the broker runs, the API service's
PID, the control token) lives under ``/run/qmig/lab``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.certs import CertPaths, issue_client_cert, issue_server_cert, make_lab_certs
from migration.control import ControlError, control_request
from migration.scenario import BACKHAUL_BASE, Host, Scenario

from . import net
from .net import LabError
from .podman import Api, ApiTls, Instance, Podman, stop_pid
from .postcopy import RUNTIME, runtime_installed

STATE_DIR = Path(os.environ.get("QMIG_LAB_DIR", "/run/qmig/lab"))
# Per-host Podman: each edge host's storage (kept across labs: it caches the broker image).
HOSTS_STORAGE = Path(os.environ.get("QMIG_LAB_HOSTS", "/var/lib/qmig/lab-hosts"))
CLIENT_NS = "qmig-cl"
LINK_NS = "qmig-link"
CLIENT_VETH = ("qmig-cl0", "qmig-cl1")
LINK_VETH = ("qmig-lk0", "qmig-lk1")
BROKER_ETC = "/etc/qmig"  # where the broker container sees certificates and token
BROKER_STORE = "/var/lib/qmig"  # in the container's rootfs: it travels with the checkpoint
READY_TIMEOUT = 30.0
# The orchestrator (migration.orchestrator) of the lab: its operator API on the machine's
# loopback, and the listener where the broker, wherever it runs, posts its clients'
# MIGRATION_TRIGGERs (the machine at the start host's gateway, routed from every pod).
BROKER_NAME = "lab"
ORCHESTRATOR_PORT = 7890
TRIGGER_PORT = 7891
METRICS_PORT = 9883  # the broker's Prometheus metrics, on its lab address
# Per-host Podman: each host's API on its uplink address, behind mutual TLS (apifront).
PODMAN_API_PORT = 8888
PODMAN_CLIENT = "orchestrator"  # the one client certificate the hosts' APIs accept


def pod_name(host: Host | str) -> str:
    return f"qmig-{host if isinstance(host, str) else host.name}"


def container_name(host: Host | str) -> str:
    """The broker container is named after the edge host it runs on (qmig-broker-edge-a)."""
    return f"qmig-broker-{host if isinstance(host, str) else host.name}"


def host_netns(host: Host) -> str:
    """Per-host Podman: the edge host's own network namespace (its Podman runs in it)."""
    return f"qmig-h-{host.name}"


def uplink_veths(index: int) -> tuple[str, str]:
    """Per-host Podman: the veth pair between the machine and the index-th edge host."""
    return f"qmig-up{index}", f"qmig-up{index}h"


def backhaul_veths(index: int) -> tuple[str, str]:
    """Per-host Podman: the index-th host's shaped checkpoint link (link netns end, host's)."""
    return f"qmig-bk{index}", f"qmig-bk{index}h"


LOCK_PATH = Path("/run/qmig/lab.lock")
LOCK_ENV = "QMIG_LAB_LOCKED"  # set while held: child processes run under the same lock


@contextlib.contextmanager
def lab_lock(timeout: float = 1200.0, say: Any = None) -> Iterator[None]:
    """Hold the machine's one lab for a whole run (names and addresses are fixed).

    Runs in parallel (a test suite, a demo, a benchmark) queue here instead of tearing down
    each other's pods.  Processes started while it is held inherit it (``QMIG_LAB_LOCKED``).
    """
    if os.environ.get(LOCK_ENV):  # our parent holds it and runs us (e.g. `qmig lab up`)
        yield
        return
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "a+") as f:
        deadline = time.monotonic() + timeout
        waiting = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"another lab run held the lab for {timeout:g} s") from None
                if not waiting and say is not None:
                    say("waiting for another lab run to finish")
                waiting = True
                time.sleep(0.5)
        os.environ[LOCK_ENV] = str(os.getpid())
        try:
            yield
        finally:
            os.environ.pop(LOCK_ENV, None)
            fcntl.flock(f, fcntl.LOCK_UN)


def containers_unavailable() -> str | None:
    """Why this machine cannot run the container lab, or None if it can."""
    from migration.image import containers_unavailable as image_unavailable

    reason = image_unavailable()
    if reason:
        return reason
    for tool in ("ip", "nft", "iptables", "nsenter", "tc"):
        if not net.have(tool):
            return f"{tool} is not installed (as root run: make setup)"
    return None


@dataclass
class LabState:
    scenario: str
    image: str
    broker_host: str
    service_pid: int
    token: str
    started_at: float
    services: dict[str, int] = dataclasses.field(default_factory=dict)  # per-host Podman
    fronts: dict[str, int] = dataclasses.field(default_factory=dict)  # their TLS fronts
    podman: str = "shared"  # the scenario's Podman mode, for every later command on the lab

    def save(self, state_dir: Path) -> None:
        path = state_dir / "state.json"
        path.write_text(json.dumps(self.__dict__, indent=2))
        path.chmod(0o600)

    @classmethod
    def load(cls, state_dir: Path) -> LabState | None:
        try:
            data = json.loads((state_dir / "state.json").read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None


class Lab:
    """One lab on this machine (there is only ever one: names are fixed)."""

    def __init__(self, scenario: Scenario, state_dir: Path = STATE_DIR) -> None:
        self.scenario = scenario
        self.state_dir = state_dir
        self.etc = state_dir / "etc"
        # Per-host Podman: the CA of the hosts' API fronts, their certificates and the
        # orchestrator's (never mounted into a container, unlike etc).
        self.podman_pki = state_dir / "podman-tls"
        self.state: LabState | None = LabState.load(state_dir)
        self._asked = scenario  # what `up` builds
        if self.state is not None and self.state.podman != scenario.podman:
            self.scenario = scenario.replace(podman=self.state.podman)  # as the lab was made
        self._podman: Podman | None = None
        self._podmans: dict[str, Podman] = {}

    # ------------------------------------------------------------------ accessors
    @property
    def per_host(self) -> bool:
        return self.scenario.podman == "per-host"

    @property
    def podman(self) -> Podman:
        """The Podman of the broker's host (the machine's one Podman unless per-host)."""
        if self.per_host:
            return self.podman_at(self.broker_host)
        if self._podman is None:
            pid = self.state.service_pid if self.state else None
            self._podman = Podman(self.state_dir / "podman.sock", pid)
        return self._podman

    def instance(self, host: Host) -> Instance:
        """Per-host Podman: ``host``'s own Podman instance."""
        return Instance(host_netns(host), HOSTS_STORAGE / host.name,
                        self.state_dir / "hosts" / host.name)  # fmt: skip

    def podman_at(self, host: Host) -> Podman:
        """The Podman that runs ``host``'s pod: its own one per-host, else the machine's."""
        if not self.per_host:
            return self.podman
        if host.name not in self._podmans:
            inst = self.instance(host)
            pid = self.state.services.get(host.name) if self.state else None
            exposed = self.state is not None and host.name in self.state.fronts
            api = self.podman_api(host) if exposed else None
            self._podmans[host.name] = Podman(inst.socket, pid, inst, api)
        return self._podmans[host.name]

    def host_api_address(self, host: Host) -> str:
        """Per-host Podman: ``host``'s address on its uplink, where its Podman API is."""
        return net.net_address(self.scenario.uplink_subnet(host), 2)

    def podman_api(self, host: Host) -> Api:
        """Per-host Podman: how the machine reaches ``host``'s Podman API, by address."""
        pki = self.podman_pki
        tls = ApiTls(pki / "ca.crt", pki / f"{PODMAN_CLIENT}.crt", pki / f"{PODMAN_CLIENT}.key")
        return Api(f"tcp://{self.host_api_address(host)}:{PODMAN_API_PORT}", tls)

    def machine_uplink(self, host: Host) -> str:
        """Per-host Podman: the machine's address on ``host``'s uplink."""
        return net.net_address(self.scenario.uplink_subnet(host), 1)

    @property
    def broker_host(self) -> Host:
        if self.state is None:
            raise LabError("the lab is not up (run `qmig lab up`)")
        return self.scenario.host(self.state.broker_host)

    @property
    def cafile(self) -> str:
        return str(self.etc / "ca.crt")

    def control(self, cmd: str, host: Host | None = None, timeout: float = 10.0,
                **args: Any) -> dict[str, Any]:  # fmt: skip
        """One control API request to the broker on ``host`` (default: where it runs)."""
        assert self.state is not None
        where = host or self.broker_host
        port = self.scenario.ports.control
        request = control_request(where.address, port, self.state.token, cmd, timeout=timeout,
                                  **args)  # fmt: skip
        return asyncio.run(request)

    # ------------------------------------------------------------------ up
    def up(self, image: str) -> LabState:
        """Build the lab from scratch (removing any previous one) and start the broker."""
        reason = containers_unavailable()
        if reason:
            raise LabError(f"containers unavailable: {reason}")
        self.down(quiet=True)
        self.scenario = self._asked
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.etc.mkdir(parents=True, exist_ok=True)
        sc = self.scenario
        try:
            token = secrets.token_hex(16)
            if self.per_host:
                self.state = LabState(sc.name, image, sc.start, 0, token, time.time(),
                                      podman="per-host")  # fmt: skip
                self._up_hosts(image)
            else:
                podman = Podman.start_service(self.state_dir / "podman.sock",
                                              self.state_dir / "podman-service.log")  # fmt: skip
                self._podman = podman
                self.state = LabState(sc.name, image, sc.start, podman.pid or 0, token,
                                      time.time())  # fmt: skip
                self.state.save(self.state_dir)
                for host in sc.hosts:
                    podman.ensure_network(pod_name(host), host.subnet, host.gateway)
                    podman.create_pod(pod_name(host), pod_name(host), host.address)
            net.add_netns_link(CLIENT_NS, *CLIENT_VETH, sc.client_subnet)
            net.set_loss(CLIENT_NS, sc.loss)
            net.add_netns_link(LINK_NS, *LINK_VETH, sc.link_subnet)
            net.shape(LINK_VETH[0], sc.link_rate)
            net.shape(LINK_VETH[1], sc.link_rate, ns=LINK_NS)
            if self.per_host:
                self._backhaul()
            net.route_lab_range()
            self._broker_certs()
            token_file = self.etc / "control.token"
            token_file.write_text(token + "\n")
            token_file.chmod(0o644)  # read inside the container; the directory is root's
            trigger_token = self.etc / "orchestrator.token"
            trigger_token.write_text(secrets.token_urlsafe(32) + "\n")
            trigger_token.chmod(0o644)  # the broker's, to post triggers with
            self.etc.chmod(0o755)
            self.write_inventory()
            self.start_broker(sc.host(sc.start))
        except BaseException:
            self.down(quiet=True)
            raise
        return self.state

    def _up_hosts(self, image: str) -> None:
        """Per-host Podman: each edge host's namespace, uplink, own Podman, network and pod.

        The machine routes each host's pod network through that host's uplink; inside, the
        host forwards without NAT (as the machine does for the shared lab).
        """
        assert self.state is not None
        pki = self._podman_pki()
        for index, host in enumerate(self.scenario.hosts):
            ns = host_netns(host)
            _, host_ip = net.add_netns_link(ns, *uplink_veths(index),
                                            self.scenario.uplink_subnet(host))  # fmt: skip
            net.run(["ip", "route", "replace", host.subnet, "via", host_ip])
            net.route_lab_range(ns)
            inst = self.instance(host)
            podman = Podman.start_service(inst.socket, inst.run_dir / "service.log", inst)
            self._podmans[host.name] = podman
            self.state.services[host.name] = podman.pid or 0
            self.state.save(self.state_dir)
            # From here on the machine reaches this host's Podman API only by its address.
            server = issue_server_cert(pki, host.name, [host_ip])
            self.state.fronts[host.name] = podman.expose(
                self.podman_api(host), server, inst.run_dir / "apifront.log"
            )
            self.state.save(self.state_dir)
            podman.ensure_image(image)  # the first time: as a registry pull would
            podman.ensure_network(pod_name(host), host.subnet, host.gateway)
            podman.create_pod(pod_name(host), pod_name(host), host.address)

    def _broker_certs(self) -> None:
        """The lab CA and the brokers' certificate, made (or kept) in ``state_dir/pki``; the
        broker's ``etc`` (mounted into its container) gets the CA and server certificates
        and the server key, never the CA key, so a broker cannot mint the lab's certificates."""
        pki_dir = self.state_dir / "pki"
        pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        hosts = ["localhost", *(h.address for h in self.scenario.hosts)]
        pki = make_lab_certs(pki_dir, hosts=hosts)
        for source in (pki.ca_cert, pki.server_cert, pki.server_key):
            shutil.copy2(source, self.etc / source.name)
        (self.etc / pki.ca_key.name).unlink(missing_ok=True)  # an earlier lab's

    def _podman_pki(self) -> CertPaths:
        """A fresh CA for the hosts' Podman APIs and the orchestrator's client certificate."""
        shutil.rmtree(self.podman_pki, ignore_errors=True)
        self.podman_pki.mkdir(mode=0o700, parents=True)
        paths = make_lab_certs(self.podman_pki, hosts=["localhost"])
        issue_client_cert(paths, PODMAN_CLIENT)
        return paths

    def _backhaul(self) -> None:
        """Per-host Podman: checkpoints go host to host, each host's link shaped to the
        scenario's rate and routed through the link namespace, never through the machine."""
        sc = self.scenario
        net.enable_forwarding(LINK_NS)
        for index, host in enumerate(sc.hosts):
            there, ns = backhaul_veths(index)
            gateway, _ = net.add_ns_pair(LINK_NS, there, host_netns(host), ns,
                                         sc.backhaul_subnet(host))  # fmt: skip
            net.run(net.netns_exec(host_netns(host), "ip", "route", "add", BACKHAUL_BASE,
                                   "via", gateway))  # fmt: skip
            net.shape(there, sc.link_rate, ns=LINK_NS)
            net.shape(ns, sc.link_rate, ns=host_netns(host))

    def checkpoint_link(self, host: Host) -> tuple[str, str, str, str | None]:
        """Where ``host`` receives checkpoints (address, netns) and which interface (and
        netns) carries what it sends: per-host its own shaped link, else the machine's."""
        if not self.per_host:
            return net.net_address(self.scenario.link_subnet, 2), LINK_NS, LINK_VETH[0], None
        address = net.net_address(self.scenario.backhaul_subnet(host), 2)
        ns = host_netns(host)
        return address, ns, backhaul_veths(self.scenario.host_index(host))[1], ns

    @property
    def trigger_url(self) -> str:
        start = self.scenario.host(self.scenario.start)
        # The machine, seen from the start host's pod: its gateway, or its uplink per-host.
        where = self.machine_uplink(start) if self.per_host else start.gateway
        return f"http://{where}:{TRIGGER_PORT}"

    def inventory(self) -> dict[str, Any]:
        """The orchestrator's inventory of this lab (migration.orchestrator.inventory)."""
        from .live import TRANSFER_PORT

        sc = self.scenario
        link = {"address": net.net_address(sc.link_subnet, 2), "port": TRANSFER_PORT,
                "rate": sc.link_rate}  # fmt: skip

        def api(h: Host) -> dict[str, Any]:
            where = self.podman_at(h).api
            if where.tls is None:
                return {"podman": where.url}
            tls = {"ca": str(where.tls.ca), "cert": str(where.tls.cert),
                   "key": str(where.tls.key)}  # fmt: skip
            return {"podman": where.url, "tls": tls}

        def link_of(h: Host) -> dict[str, Any]:  # per-host: its own link's address
            return {**link, "address": self.checkpoint_link(h)[0]}

        hosts = {h.name: {**api(h), "address": h.address, "link": link_of(h)}
                 for h in sc.hosts}  # fmt: skip
        control = {"port": sc.ports.control, "token_file": str(self.etc / "control.token")}
        broker = {"host": sc.start, "control": control,
                  "ports": {"quic": sc.ports.quic, "tcp": sc.ports.tcp}}  # fmt: skip
        return {
            "driver": "lab",
            "lab": {"state_dir": str(self.state_dir), "scenario": sc.name, "podman": sc.podman},
            "orchestrator": {
                "api": f"127.0.0.1:{ORCHESTRATOR_PORT}",
                "triggers": self.trigger_url.removeprefix("http://"),
                "trigger_token_file": str(self.etc / "orchestrator.token"),
                "state_dir": str(self.state_dir / "orchestrator"),
            },
            "hosts": hosts,
            "brokers": {BROKER_NAME: broker},
        }

    def write_inventory(self) -> Path:
        """``STATE_DIR/inventory.yaml``: ``qmig orchestrate --inventory`` it."""
        import yaml

        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / "inventory.yaml"
        head = "# The lab's edge hosts, written by `qmig lab up` for `qmig orchestrate`.\n"
        path.write_text(head + yaml.safe_dump(self.inventory(), sort_keys=False))
        return path

    def broker_command(self) -> list[str]:
        p = self.scenario.ports
        return ["python3", "-m", "qmig", "broker", "--host", "0.0.0.0",
                "--tcp-port", str(p.tcp), "--tls-port", str(p.tls),
                "--mptcp-port", str(p.mptcp), "--quic-port", str(p.quic),
                "--cert", f"{BROKER_ETC}/server.crt", "--key", f"{BROKER_ETC}/server.key",
                "--control-host", "0.0.0.0", "--control-port", str(p.control),
                "--control-token-file", f"{BROKER_ETC}/control.token",
                "--pool", ",".join(self.scenario.pool), "--sys-interval", "0",
                "--name", BROKER_NAME, "--orchestrator-url", self.trigger_url,
                "--orchestrator-token-file", f"{BROKER_ETC}/orchestrator.token",
                "--metrics-host", "0.0.0.0", "--metrics-port", str(METRICS_PORT),
                *(["--persistence", BROKER_STORE] if self.scenario.persistence else []),
                ]  # fmt: skip

    def start_broker(self, host: Host) -> None:
        assert self.state is not None
        self.podman_at(host).run_container(
            container_name(host), self.state.image, self.broker_command(), pod=pod_name(host),
            env={"PYTHONUNBUFFERED": "1"},
            mounts=[{"type": "bind", "source": str(self.etc), "target": BROKER_ETC,
                     "read_only": True}],
            # The post-copy wrapper when it is installed (runc itself unless armed): podman
            # keeps a container's runtime across checkpoint/restore, so every move can be lazy.
            runtime=RUNTIME if runtime_installed() else None,
        )  # fmt: skip
        self.state.broker_host = host.name
        self.state.save(self.state_dir)
        self.wait_ready(host)

    def wait_ready(self, host: Host, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Poll the control API until the broker on ``host`` answers ``status``."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                return self.control("status", host=host, timeout=2.0)
            except ControlError as exc:
                last = str(exc)
            state = self.podman_at(host).container_state(container_name(host))
            if state is not None and state["status"] not in ("running", "created", "configured"):
                logs = self.podman_at(host).logs(container_name(host))
                raise LabError(f"broker container on {host.name} is {state['status']}: "
                               f"{logs.strip().splitlines()[-1:] or '(no log)'}")  # fmt: skip
            time.sleep(0.2)
        raise LabError(f"broker on {host.name} not ready within {timeout:g} s ({last})")

    # ------------------------------------------------------------------ down
    def down(self, quiet: bool = False) -> list[str]:
        """Remove everything the lab made; returns what was removed.  Never raises LabError."""
        removed: list[str] = self._down_hosts()  # per-host Podman, whatever the mode now
        if self.per_host:
            self._podman = Podman(self.state_dir / "podman.sock")  # and any shared-lab leftover
        podman = self._podman or self.podman
        started_here = False
        if not podman.alive() and net.have("podman"):
            with contextlib.suppress(LabError):
                self._podman = podman = Podman.start_service(
                    self.state_dir / "podman.sock", Path("/dev/null"))  # fmt: skip
                started_here = True
        if podman.alive():
            with contextlib.suppress(Exception):
                for name in podman.lab_containers():
                    podman.remove_container(name)
                    removed.append(f"container {name}")
            with contextlib.suppress(Exception):
                pods = set(podman.lab_pods()) | {pod_name(h) for h in self.scenario.hosts}
                for name in sorted(pods):
                    if podman.client.pods.exists(name):
                        podman.remove_pod(name)
                        removed.append(f"pod {name}")
            with contextlib.suppress(Exception):
                nets = set(podman.lab_networks()) | {pod_name(h) for h in self.scenario.hosts}
                for name in sorted(nets):
                    if podman.client.networks.exists(name):
                        podman.remove_network(name)
                        removed.append(f"network {name}")
        for ns in (CLIENT_NS, LINK_NS):
            if ns in net.netns_list():
                net.del_netns(ns)
                removed.append(f"netns {ns}")
        for link in net.prefixed_links():
            net.del_link(link)
            removed.append(f"link {link}")
        with contextlib.suppress(LabError):
            net.unroute_lab_range()
        if podman.pid or started_here:
            podman.stop_service()
            removed.append("podman API service")
        if self.state is not None and self.state.service_pid:
            stop_pid(self.state.service_pid, grace=2.0)
        for leftover in ("state.json", "podman.sock", "inventory.yaml"):
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / leftover).unlink()
        # The default state of an orchestrator of this lab: its queue was about this lab.
        shutil.rmtree(self.state_dir / "orchestrator", ignore_errors=True)
        self.state = None
        self._podman = None
        self._podmans = {}
        if not quiet:
            for line in removed:
                print(f"qmig lab: removed {line}")
        return removed

    def _down_hosts(self) -> list[str]:
        """Per-host Podman: each host's containers, pods and networks (through its own
        podman, even if its service died), its service, namespace and run directory."""
        removed = []
        for index, host in enumerate(self.scenario.hosts):
            inst = self.instance(host)
            ns = host_netns(host)
            inside = ns in net.netns_list()
            # Its Podman may hold something only if this lab, or a crashed one, made it.
            if inst.storage.exists() and (self.per_host or inside or inst.run_dir.exists()):
                inst.prepare()  # its containers.conf, if a crash took the run directory
                steps = ((("pod", "rm", "-f", "-t", "0", "-a"), "pods"),
                         (("rm", "-f", "-t", "0", "-a"), "containers"),
                         (("network", "rm", "-f", pod_name(host)), "network"))  # fmt: skip
                for args, what in steps:
                    with contextlib.suppress(LabError):
                        done = net.run(inst.argv(*args, in_netns=inside), check=False,
                                       timeout=60, env=inst.env())  # fmt: skip
                        if done.returncode == 0 and done.stdout.strip():
                            removed.append(f"{what} of {host.name}'s Podman")
            front = self.state.fronts.get(host.name) if self.state else None
            if front:
                stop_pid(front, grace=2.0)
                removed.append(f"{host.name}'s Podman API front")
            pid = self.state.services.get(host.name) if self.state else None
            if pid:
                stop_pid(pid, grace=2.0)
                removed.append(f"{host.name}'s Podman API service")
            if ns in net.netns_list():
                net.del_netns(ns)  # and whatever still runs in it
                removed.append(f"netns {ns}")
            for link in uplink_veths(index):
                net.del_link(link)
            shutil.rmtree(inst.run_dir, ignore_errors=True)
        for ns in net.netns_list():  # hosts of another scenario's lab
            if ns.startswith("qmig-h-"):
                net.del_netns(ns)
                removed.append(f"netns {ns}")
        shutil.rmtree(self.state_dir / "hosts", ignore_errors=True)
        shutil.rmtree(self.podman_pki, ignore_errors=True)
        return removed

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        if self.state is None:
            return {"up": False}
        podman = self.podman
        out: dict[str, Any] = {
            "up": True,
            "scenario": self.state.scenario,
            "image": self.state.image,
            "broker_host": self.state.broker_host,
            "broker_address": self.broker_host.address,
            "service": podman.alive(),
            "hosts": {},
            "netns": [ns for ns in net.netns_list() if ns.startswith("qmig")],
        }
        for host in self.scenario.hosts:
            out["hosts"][host.name] = {
                "address": host.address,
                "container": self.podman_at(host).container_state(container_name(host))
                if self.podman_at(host).alive() else None,
            }  # fmt: skip
        try:
            out["broker"] = self.control("status", timeout=2.0)
        except ControlError as exc:
            out["broker"] = {"error": str(exc)}
        return out
