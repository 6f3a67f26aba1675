"""A lab scenario, described once: hosts, links, clients, strategies, migrations.

The same :class:`Scenario` drives ``make demo``, the lab tests and the benchmarks, so that a
figure in README.md and a test assertion talk about the same setup.  Scenarios are small
YAML files (``migration/scenarios/*.yaml``); any field can be overridden in code with
:meth:`Scenario.replace`.

Addressing (all inside 198.18.0.0/15, RFC 2544's benchmarking range, so that no lab address
can be mistaken for a real one): edge host ``N`` is the podman network ``198.18.N.0/24``
whose gateway ``.1`` is the machine and whose pod (the edge host) is ``.2``; the clients'
network namespace sits on ``198.18.100.0/24``; the checkpoint link on ``198.18.250.0/30``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The lab's one reconnect schedule (TCP, TLS, MPTCP clients, paho's and qmig's alike): first
# retry 50 ms after a loss, then doubling up to 0.5 s.  Scenarios and workload specs may set
# their own; this is the default of both.
RECONNECT_DELAY = (0.05, 0.5)


def check_reconnect_delay(delay: tuple[float, ...], error: type[Exception]) -> None:
    if len(delay) != 2 or not 0 < delay[0] <= delay[1]:
        raise error("reconnect_delay is [first, max] seconds with 0 < first <= max")


SCENARIO_DIR = Path(__file__).parent / "scenarios"
LAB_NET = ipaddress.IPv4Network("198.18.0.0/15")
TRANSPORTS = ("quic", "tcp", "tls", "mptcp")
STRATEGIES = ("proactive", "reactive", "pool", "announce", "none")
LIBRARIES = ("qmig", "paho")  # which MQTT client library a client runs
PAHO_TRANSPORTS = ("tcp", "tls", "mptcp")  # paho-mqtt has no QUIC


METHODS = ("cold", "precopy", "postcopy", "hybrid")  # how a migration moves memory
# shared: every edge host is a pod of the machine's one Podman; per-host: each edge host has
# its own Podman (storage, run directory, networks, API service) in its own network namespace
PODMAN_MODES = ("shared", "per-host")
UPLINK_BASE = "198.18.20.0/22"  # per-host: edge host i's uplink to the machine is the i-th /30
BACKHAUL_BASE = "198.18.24.0/22"  # per-host: host i's shaped checkpoint link, the i-th /30


class ScenarioError(ValueError):
    """A scenario file or override that does not describe a usable lab."""


@dataclass(frozen=True)
class Host:
    """An edge host: a pod on its own podman network."""

    name: str
    subnet: str

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def address(self) -> str:
        """Where the broker listens when it runs on this host."""
        return str(self.network.network_address + 2)


@dataclass(frozen=True)
class ClientSpec:
    """One client of a scenario; ``library`` is "qmig" (qmig's Client) or "paho" (paho-mqtt);
    ``qos`` its own (None: the scenario's)."""

    name: str
    transport: str = "quic"
    strategy: str = "none"
    library: str = "qmig"
    qos: int | None = None

    def check(self) -> None:
        """Raise ValueError (ScenarioError) if this client cannot run as described."""
        if self.transport not in TRANSPORTS:
            raise ScenarioError(f"client {self.name}: transport must be one of {TRANSPORTS}")
        if self.strategy not in STRATEGIES:
            raise ScenarioError(f"client {self.name}: strategy must be one of {STRATEGIES}")
        if self.transport != "quic" and self.strategy != "none":
            raise ScenarioError(f"client {self.name}: only QUIC clients follow a strategy")
        if self.library not in LIBRARIES:
            raise ScenarioError(f"client {self.name}: library must be one of {LIBRARIES}")
        if self.library == "paho" and self.transport not in PAHO_TRANSPORTS:
            raise ScenarioError(f"client {self.name}: paho-mqtt runs over {PAHO_TRANSPORTS} only")
        if self.qos not in (None, 0, 1, 2):
            raise ScenarioError(f"client {self.name}: qos must be 0, 1 or 2")

    @classmethod
    def many(cls, data: dict[str, Any]) -> list[ClientSpec]:
        """One entry of a scenario's ``clients``; ``count: N`` makes N of them, named
        ``NAME-000``... (a fleet: issue #16's 1,000 clients in a few lines of YAML)."""
        count = int(data.get("count", 1))
        if count < 1:
            raise ScenarioError(f"client {data.get('name')}: count must be >= 1")
        if "count" not in data:
            return [cls.from_dict(data)]
        width = len(str(count - 1))
        return [cls.from_dict({**data, "name": f"{data['name']}-{i:0{width}d}"})
                for i in range(count)]  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientSpec:
        qos = data.get("qos")
        return cls(str(data["name"]), str(data.get("transport", "quic")),
                   str(data.get("strategy", "none")), str(data.get("library", "qmig")),
                   None if qos is None else int(qos))  # fmt: skip


@dataclass(frozen=True)
class Ports:
    quic: int = 14567
    tcp: int = 1883
    tls: int = 8883
    mptcp: int = 1885
    control: int = 7883

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Scenario:
    name: str
    hosts: tuple[Host, ...]
    start: str
    clients: tuple[ClientSpec, ...] = ()
    link_rate: str = "100mbit"
    compress: bool = True  # compress on the link, with the codec measured fastest for it
    method: str = "cold"  # cold | precopy | postcopy | hybrid (here: post-copy)
    # The broker's durable store (--persistence) inside its container's own filesystem, so
    # that it moves with the container in every method (podman exports the rootfs changes).
    persistence: bool = False
    loss: float = 0.0  # percent, on the clients' access link, both directions
    rate: float = 20.0  # messages per second per client; 0: idle clients
    qos: int = 1
    # Reconnecting clients (TCP, TLS, MPTCP): first retry this long after a loss, then
    # doubling up to the second value (seconds); one schedule for paho and qmig's client.
    reconnect_delay: tuple[float, float] = RECONNECT_DELAY
    migrations: tuple[str, ...] = ()
    settle: float = 3.0
    # Client processes (``python -m migration.workload``) the clients are dealt to, round
    # robin: one asyncio loop cannot keep up with about 1,000 QUIC clients at 1 msg/s.
    processes: int = 1
    ports: Ports = field(default_factory=Ports)
    # Host names in the order the broker lists them in POOL_MIGRATION_ADDRESS; empty means
    # the order of ``hosts`` (the benchmark moves the destination 1st, 2nd, 3rd).
    pool_order: tuple[str, ...] = ()
    client_subnet: str = "198.18.100.0/24"
    link_subnet: str = "198.18.250.0/30"
    podman: str = "per-host"  # PODMAN_MODES: each edge host its own Podman, by default

    # ------------------------------------------------------------------ queries
    def uplink_subnet(self, host: Host) -> str:
        """Per-host Podman: the /30 between the machine (.1) and ``host``'s namespace (.2)."""
        return self._slot(UPLINK_BASE, host)

    def backhaul_subnet(self, host: Host) -> str:
        """Per-host Podman: the /30 between the link namespace (.1), which routes between the
        hosts' checkpoint links, and ``host``'s namespace (.2)."""
        return self._slot(BACKHAUL_BASE, host)

    def host_index(self, host: Host) -> int:
        """Where ``host`` stands in ``hosts`` (per-host Podman numbers its links by it)."""
        return [h.name for h in self.hosts].index(host.name)

    def _slot(self, base: str, host: Host) -> str:
        return str(list(ipaddress.IPv4Network(base).subnets(new_prefix=30))[self.host_index(host)])

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join(h.name for h in self.hosts)
        raise ScenarioError(f"no edge host {name!r} in scenario {self.name!r} (hosts: {known})")

    @property
    def pool(self) -> list[str]:
        """Every QUIC address the broker may move to, for POOL_MIGRATION_ADDRESS."""
        hosts = [self.host(n) for n in self.pool_order] if self.pool_order else self.hosts
        return [f"{h.address}:{self.ports.quic}" for h in hosts]

    def replace(self, **changes: Any) -> Scenario:
        return dataclasses.replace(self, **changes).validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> Scenario:
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names) or len(names) < 2:
            raise ScenarioError("a scenario needs at least two edge hosts with distinct names")
        if self.podman not in PODMAN_MODES:
            raise ScenarioError(f"podman must be one of {', '.join(PODMAN_MODES)}")
        if self.podman == "per-host" and len(self.hosts) > 256:
            raise ScenarioError("per-host Podman: at most 256 edge hosts")
        subnets = [*(h.subnet for h in self.hosts), self.client_subnet, self.link_subnet]
        if self.podman == "per-host":
            subnets += [UPLINK_BASE, BACKHAUL_BASE]
        nets = [ipaddress.ip_network(s) for s in subnets]
        for net in nets:
            if not (isinstance(net, ipaddress.IPv4Network) and net.subnet_of(LAB_NET)):
                raise ScenarioError(f"{net} is outside the lab range {LAB_NET}")
        for i, a in enumerate(nets):
            for b in nets[i + 1 :]:
                if a.overlaps(b):
                    raise ScenarioError(f"lab networks {a} and {b} overlap")
        self.host(self.start)
        for dest in self.migrations:
            self.host(dest)
        here = self.start
        for dest in self.migrations:
            if dest == here:
                raise ScenarioError(f"migration to {dest!r} where the broker already is")
            here = dest
        clients = [c.name for c in self.clients]
        if len(set(clients)) != len(clients):
            raise ScenarioError("client names must be distinct")
        for c in self.clients:
            c.check()
        if len(set(self.pool_order)) != len(self.pool_order):
            raise ScenarioError("pool_order names a host twice")
        for name in self.pool_order:
            self.host(name)
        if self.method not in METHODS:
            raise ScenarioError(f"method must be one of {', '.join(METHODS)}")
        if not 0 <= self.loss < 100:
            raise ScenarioError("loss is a percentage in [0, 100)")
        if self.qos not in (0, 1, 2) or not self.rate >= 0:
            raise ScenarioError("qos must be 0, 1 or 2 and rate >= 0 (0: idle clients)")
        check_reconnect_delay(self.reconnect_delay, ScenarioError)
        if not 1 <= self.processes <= max(1, len(self.clients)):
            raise ScenarioError("processes must be between 1 and the number of clients")
        return self

    # ------------------------------------------------------------------ files
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        try:
            hosts = tuple(Host(n, s) for n, s in dict(data["hosts"]).items())
            clients = tuple(s for c in data.get("clients", ()) for s in ClientSpec.many(c))
            link = data.get("link") or {}
            return cls(
                name=str(data.get("name", "scenario")),
                hosts=hosts,
                start=str(data.get("start", hosts[0].name)),
                clients=clients,
                link_rate=str(link.get("rate", "100mbit")),
                compress=bool(link.get("compress", True)),
                method=str(data.get("method", "cold")),
                persistence=bool(data.get("persistence", False)),
                loss=float(data.get("loss", 0)),
                rate=float(data.get("rate", 20)),
                qos=int(data.get("qos", 1)),
                reconnect_delay=_delay_pair(data.get("reconnect_delay", RECONNECT_DELAY)),
                migrations=tuple(data.get("migrations", ())),
                settle=float(data.get("settle", 3.0)),
                processes=int(data.get("processes", 1)),
                ports=Ports(**(data.get("ports") or {})),
                pool_order=tuple(str(n) for n in data.get("pool_order") or ()),
                podman=str(data.get("podman", "per-host")),
            ).validate()
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            if isinstance(exc, ScenarioError):
                raise
            raise ScenarioError(f"bad scenario: {exc}") from exc

    @classmethod
    def load(cls, name_or_path: str | Path = "demo") -> Scenario:
        """A scenario by name (``migration/scenarios/NAME.yaml``) or by file path."""
        path = Path(name_or_path)
        if not path.suffix:
            path = SCENARIO_DIR / f"{name_or_path}.yaml"
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ScenarioError(f"cannot read scenario {path}: {exc.strerror}") from exc
        if not isinstance(data, dict):
            raise ScenarioError(f"{path}: a scenario is a YAML mapping")
        return cls.from_dict(data)


def _delay_pair(value: Any) -> tuple[float, float]:
    first, cap = (float(x) for x in value)
    return first, cap
