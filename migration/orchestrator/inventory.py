"""The orchestrator's inventory: edge hosts, the brokers on them, how to reach each.

A YAML file (``qmig lab up`` writes one for the lab, ``$QMIG_LAB_DIR/inventory.yaml``)::

    driver: lab                # how a move is carried out (see below)
    lab: {state_dir: /run/qmig/lab, scenario: demo}
    orchestrator:              # optional; flags of `qmig orchestrate` win
      api: 127.0.0.1:7890      # the token-protected HTTP API (loopback by default)
      triggers: 198.18.1.1:7891  # where brokers POST triggers (off unless given)
      trigger_token_file: /run/qmig/lab/etc/orchestrator.token
    hosts:
      edge-a:
        podman: unix:///run/qmig/lab/podman.sock   # or ssh://user@host/run/podman/podman.sock
                                                   # or tcp://host:8888 with tls: {ca, cert, key}
        address: 198.18.1.2    # the broker's address when it runs here
        link: {address: 198.18.250.2, port: 7999, rate: 100mbit}  # where checkpoints arrive
        networks: [198.18.100.0/24]   # clients there are best served here (trigger hints)
    brokers:
      lab:                     # the name the broker is started with (--name)
        host: edge-a           # where it runs at first
        control: {port: 7883, token_file: /run/qmig/lab/etc/control.token}
        ports: {quic: 14567, tcp: 1883}
    policies:
      triggers: {enabled: true, cooldown: 30}   # seconds between trigger-made moves
      schedule: [{broker: lab, every: 3600, hosts: [edge-a, edge-b]}]

Drivers: ``lab`` moves within the lab of :mod:`migration.lab`: with ``lab.podman: per-host``
(what ``qmig lab up`` writes) each host names its own Podman API, ``tcp://ADDR:8888`` with
``tls``; with ``shared`` the hosts' ``podman`` must all be the same URL.  The format already
says what independent machines need (a Podman API per host, a checkpoint link address per
host), so a ``podman`` driver for real machines adds an executor, not a new format.

:func:`load` raises :class:`InventoryError` with the file, the entry and what is wrong in
one line; nothing is half-loaded.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from migration.scenario import PODMAN_MODES

DRIVERS = ("lab",)
PODMAN_SCHEMES = ("unix", "ssh", "tcp")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DEFAULT_API = "127.0.0.1:7890"
DEFAULT_COOLDOWN = 30.0


class InventoryError(ValueError):
    """An inventory that cannot be used; the text says where and why, in one line."""


@dataclass(frozen=True)
class Tls:
    ca: str
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Link:
    """Where checkpoints for this host arrive (and at what rate the link runs, if known)."""

    address: str
    port: int = 7999
    rate: str | None = None


@dataclass(frozen=True)
class EdgeHost:
    name: str
    podman: str
    address: str
    link: Link
    tls: Tls | None = None
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def matches(self, hint: str) -> bool:
        """Whether a trigger's hint names this host: its name, its address (with or
        without a port), or an address inside one of its client ``networks``."""
        text = hint.strip()
        if not text:
            return False
        if text == self.name:
            return True
        host = _strip_port(text)
        if host == self.address:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)


@dataclass(frozen=True)
class BrokerEntry:
    name: str
    host: str  # where it runs at first
    control_port: int
    control_token_file: str | None
    ports: dict[str, int]


@dataclass(frozen=True)
class Schedule:
    broker: str
    every: float
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class Policies:
    triggers: bool = True
    cooldown: float = DEFAULT_COOLDOWN
    schedule: tuple[Schedule, ...] = ()


@dataclass(frozen=True)
class Inventory:
    path: str
    driver: str
    hosts: tuple[EdgeHost, ...]
    brokers: tuple[BrokerEntry, ...]
    policies: Policies = field(default_factory=Policies)
    lab: dict[str, str] = field(default_factory=dict)
    orchestrator: dict[str, str] = field(default_factory=dict)

    def host(self, name: str) -> EdgeHost | None:
        return next((h for h in self.hosts if h.name == name), None)

    def broker(self, name: str) -> BrokerEntry | None:
        return next((b for b in self.brokers if b.name == name), None)

    def hosts_matching(self, hint: str) -> list[EdgeHost]:
        return [h for h in self.hosts if h.matches(hint)]


def _strip_port(text: str) -> str:
    if text.startswith("["):  # [v6]:port
        return text[1:].split("]", 1)[0]
    if text.count(":") == 1:
        return text.split(":", 1)[0]
    return text


# ---------------------------------------------------------------------- parsing
class _Reader:
    """Checks values and says where a bad one is: ``inventory F: hosts.edge-a.link: ...``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, what: str) -> InventoryError:
        return InventoryError(f"inventory {self.path}: {where}: {what}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, not {_kind(value)}")
        return {str(k): v for k, v in value.items()}

    def keys(self, data: dict[str, Any], where: str, required: tuple[str, ...],
             optional: tuple[str, ...] = ()) -> None:  # fmt: skip
        missing = [k for k in required if k not in data]
        if missing:
            raise self.fail(where, f"missing {', '.join(missing)}")
        unknown = sorted(set(data) - set(required) - set(optional))
        if unknown:
            known = ", ".join((*required, *optional))
            raise self.fail(where, f"unknown key {unknown[0]!r} (known: {known})")

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"must be a non-empty string, not {_kind(value)}")
        return value.strip()

    def name(self, value: Any, where: str) -> str:
        text = self.text(value, where) if not isinstance(value, int) else str(value)
        if not NAME_RE.match(text):
            raise self.fail(where, f"{text!r} is not a name (letters, digits, . _ -)")
        return text

    def port(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.fail(where, f"must be a port number 1..65535, not {value!r}")
        return value

    def number(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.fail(where, f"must be a positive number of seconds, not {value!r}")
        return float(value)

    def address(self, value: Any, where: str) -> str:
        text = self.text(value, where)
        try:
            ipaddress.ip_address(text)
        except ValueError:
            if not NAME_RE.match(text):
                what = f"{text!r} is neither an IP address nor a host name"
                raise self.fail(where, what) from None
        return text

    def listen(self, value: Any, where: str) -> str:
        text = self.text(value, where)
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise self.fail(where, f"{text!r} is not HOST:PORT")
        return text


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _podman_url(r: _Reader, value: Any, where: str, tls: Tls | None) -> str:
    url = r.text(value, where)
    parts = urlsplit(url)
    if parts.scheme not in PODMAN_SCHEMES:
        raise r.fail(where, f"{url!r}: the Podman API is unix:///PATH, ssh://USER@HOST/PATH or "
                            "tcp://HOST:PORT (with tls)")  # fmt: skip
    if parts.scheme == "unix" and not parts.path.startswith("/"):
        raise r.fail(where, f"{url!r}: a unix socket needs an absolute path (unix:///run/...)")
    if parts.scheme == "ssh" and (not parts.hostname or not parts.path.startswith("/")):
        raise r.fail(where, f"{url!r}: ssh needs a host and the socket's path "
                            "(ssh://user@host/run/podman/podman.sock)")  # fmt: skip
    if parts.scheme == "tcp":
        if not parts.hostname or parts.port is None:
            raise r.fail(where, f"{url!r}: tcp needs HOST:PORT")
        if tls is None:
            raise r.fail(where, f"{url!r}: the Podman API over TCP must use TLS: add "
                                "tls: {ca: FILE, cert: FILE, key: FILE}")  # fmt: skip
    return url


def _host(r: _Reader, name: str, value: Any) -> EdgeHost:
    where = f"hosts.{name}"
    data = r.mapping(value, where)
    r.keys(data, where, ("podman", "address", "link"), ("tls", "networks"))
    tls = None
    if data.get("tls") is not None:
        t = r.mapping(data["tls"], f"{where}.tls")
        r.keys(t, f"{where}.tls", ("ca",), ("cert", "key"))
        if ("cert" in t) != ("key" in t):
            raise r.fail(f"{where}.tls", "cert and key go together")
        tls = Tls(r.text(t["ca"], f"{where}.tls.ca"),
                  r.text(t["cert"], f"{where}.tls.cert") if "cert" in t else None,
                  r.text(t["key"], f"{where}.tls.key") if "key" in t else None)  # fmt: skip
    podman = _podman_url(r, data["podman"], f"{where}.podman", tls)
    address = r.address(data["address"], f"{where}.address")
    link_data = data["link"]
    if isinstance(link_data, str):
        link_data = {"address": link_data}
    ld = r.mapping(link_data, f"{where}.link")
    r.keys(ld, f"{where}.link", ("address",), ("port", "rate"))
    link = Link(r.address(ld["address"], f"{where}.link.address"),
                r.port(ld.get("port", 7999), f"{where}.link.port"),
                r.text(ld["rate"], f"{where}.link.rate") if "rate" in ld else None)  # fmt: skip
    networks = []
    raw = data.get("networks") or []
    if not isinstance(raw, list):
        raise r.fail(f"{where}.networks", "must be a list of CIDR networks")
    for i, item in enumerate(raw):
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise r.fail(f"{where}.networks[{i}]", f"{item!r} is not a network") from None
    return EdgeHost(name, podman, address, link, tls, tuple(networks))


def _broker(r: _Reader, name: str, value: Any, hosts: dict[str, EdgeHost]) -> BrokerEntry:
    where = f"brokers.{name}"
    data = r.mapping(value, where)
    r.keys(data, where, ("host", "control"), ("ports",))
    host = r.name(data["host"], f"{where}.host")
    if host not in hosts:
        raise r.fail(f"{where}.host", f"no edge host {host!r} (hosts: {', '.join(hosts)})")
    control = r.mapping(data["control"], f"{where}.control")
    r.keys(control, f"{where}.control", ("port",), ("token_file",))
    ports = {}
    for proto, port in r.mapping(data.get("ports") or {"quic": 14567}, f"{where}.ports").items():
        ports[proto] = r.port(port, f"{where}.ports.{proto}")
    token_file = control.get("token_file")
    return BrokerEntry(
        name, host, r.port(control["port"], f"{where}.control.port"),
        r.text(token_file, f"{where}.control.token_file") if token_file is not None else None,
        ports,
    )  # fmt: skip


def _policies(r: _Reader, value: Any, inv_hosts: dict[str, EdgeHost],
              brokers: dict[str, BrokerEntry]) -> Policies:  # fmt: skip
    if value is None:
        return Policies()
    data = r.mapping(value, "policies")
    r.keys(data, "policies", (), ("triggers", "schedule"))
    triggers = r.mapping(data.get("triggers") or {}, "policies.triggers")
    r.keys(triggers, "policies.triggers", (), ("enabled", "cooldown"))
    enabled = triggers.get("enabled", True)
    if not isinstance(enabled, bool):
        raise r.fail("policies.triggers.enabled", "must be true or false")
    cooldown = float(triggers.get("cooldown", DEFAULT_COOLDOWN))
    if cooldown < 0:
        raise r.fail("policies.triggers.cooldown", "must be >= 0 seconds")
    schedules = []
    raw = data.get("schedule") or []
    if not isinstance(raw, list):
        raise r.fail("policies.schedule", "must be a list of {broker, every, hosts}")
    for i, item in enumerate(raw):
        where = f"policies.schedule[{i}]"
        s = r.mapping(item, where)
        r.keys(s, where, ("broker", "every", "hosts"))
        broker = r.name(s["broker"], f"{where}.broker")
        if broker not in brokers:
            raise r.fail(f"{where}.broker", f"no broker {broker!r}")
        hosts = s["hosts"]
        if not isinstance(hosts, list) or len(hosts) < 2:
            raise r.fail(f"{where}.hosts", "must list at least two edge hosts to rotate over")
        for h in hosts:
            if str(h) not in inv_hosts:
                raise r.fail(f"{where}.hosts", f"no edge host {h!r}")
        schedules.append(Schedule(broker, r.number(s["every"], f"{where}.every"),
                                  tuple(str(h) for h in hosts)))  # fmt: skip
    return Policies(enabled, cooldown, tuple(schedules))


def parse(text: str, path: str = "<text>") -> Inventory:
    """An inventory from YAML ``text``; :class:`InventoryError` says what is wrong."""
    r = _Reader(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise InventoryError(f"inventory {path}: not valid YAML{line}: {problem}") from None
    top = r.mapping(data, "top level")
    r.keys(top, "top level", ("hosts", "brokers"), ("driver", "lab", "orchestrator", "policies"))
    driver = str(top.get("driver", "lab"))
    if driver not in DRIVERS:
        raise r.fail("driver", f"{driver!r} is not one of {', '.join(DRIVERS)} (moves between "
                               "independent Podman instances are not built yet)")  # fmt: skip
    host_data = r.mapping(top["hosts"], "hosts")
    if len(host_data) < 2:
        raise r.fail("hosts", "a migration needs at least two edge hosts")
    hosts = {}
    for raw_name, value in host_data.items():
        name = r.name(raw_name, "hosts")
        hosts[name] = _host(r, name, value)
    seen: dict[str, str] = {}
    for h in hosts.values():
        if h.address in seen:
            raise r.fail(f"hosts.{h.name}.address",
                         f"{h.address} is also {seen[h.address]}'s address")  # fmt: skip
        seen[h.address] = h.name
    broker_data = r.mapping(top["brokers"], "brokers")
    if not broker_data:
        raise r.fail("brokers", "name at least one broker")
    brokers = {r.name(n, "brokers"): v for n, v in broker_data.items()}
    entries = {n: _broker(r, n, v, hosts) for n, v in brokers.items()}
    lab: dict[str, str] = {}
    if driver == "lab":
        lab_data = r.mapping(top.get("lab") or {}, "lab")
        r.keys(lab_data, "lab", ("state_dir",), ("scenario", "podman"))
        lab = {"state_dir": r.text(lab_data["state_dir"], "lab.state_dir"),
               "scenario": r.text(lab_data.get("scenario", "demo"), "lab.scenario"),
               "podman": r.text(lab_data.get("podman", "shared"), "lab.podman")}  # fmt: skip
        if lab["podman"] not in PODMAN_MODES:
            raise r.fail("lab.podman", f"{lab['podman']!r}: one of {', '.join(PODMAN_MODES)}")
        apis = {h.podman for h in hosts.values()}
        if lab["podman"] == "shared" and len(apis) > 1:
            raise r.fail("hosts", f"the lab driver moves within one Podman, but the hosts name "
                                  f"{len(apis)} Podman APIs")  # fmt: skip
        if len(entries) > 1:
            raise r.fail("brokers", "the lab driver runs one broker")
    orch: dict[str, str] = {}
    if top.get("orchestrator") is not None:
        o = r.mapping(top["orchestrator"], "orchestrator")
        r.keys(o, "orchestrator", (), ("api", "triggers", "token_file", "trigger_token_file",
                                       "state_dir"))  # fmt: skip
        for key in ("api", "triggers"):
            if key in o:
                orch[key] = r.listen(o[key], f"orchestrator.{key}")
        for key in ("token_file", "trigger_token_file", "state_dir"):
            if key in o:
                orch[key] = r.text(o[key], f"orchestrator.{key}")
    policies = _policies(r, top.get("policies"), hosts, entries)
    return Inventory(path, driver, tuple(hosts.values()), tuple(entries.values()), policies,
                     lab, orch)  # fmt: skip


def load(path: str | Path) -> Inventory:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InventoryError(f"cannot read inventory {p}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise InventoryError(f"inventory {p} is not UTF-8") from None
    return parse(text, str(p))
