"""Network plumbing of the lab: namespaces, veth pairs, shaping, loss, forwarding.

Everything goes through ``ip``, ``tc``, ``nft`` and ``iptables`` from iproute2/nftables, each
call bounded in time; a failing command raises :class:`LabError` with the command and its
stderr on one line.  Every object made here carries the ``qmig`` prefix so ``lab down`` can
find and remove it even when the state file is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

PREFIX = "qmig"
NFT_TABLE = "qmig_loss"
LAB_RANGE = "198.18.0.0/15"


class LabError(RuntimeError):
    """A lab step that failed; the message is one line fit for the terminal."""


def run(cmd: Sequence[str], *, timeout: float = 30.0, check: bool = True,
        input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run one command; raise LabError (with its stderr) if it fails and ``check``."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              input=input, env=env)  # fmt: skip
    except FileNotFoundError as exc:
        raise LabError(f"{cmd[0]} is not installed (run `make setup` as root)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"`{' '.join(cmd)}` did not finish within {timeout:g} s") from exc
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise LabError(f"`{' '.join(cmd)}` failed: {err[-1] if err else proc.returncode}")
    return proc


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


# ---------------------------------------------------------------------- namespaces
def netns_list() -> list[str]:
    out = run(["ip", "-o", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_exec(ns: str, *cmd: str) -> list[str]:
    """The argv that runs ``cmd`` inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *cmd]


def net_address(subnet: str, index: int) -> str:
    """The ``index``-th address of ``subnet`` (1: the first host)."""
    return str(ipaddress.IPv4Network(subnet).network_address + index)


def add_netns_link(ns: str, host_if: str, ns_if: str, subnet: str) -> tuple[str, str]:
    """Namespace ``ns`` joined to the machine by a veth pair on a /24 or /30 ``subnet``.

    The machine's end gets the first address, the namespace's end the second and a default
    route through the first.  Returns (machine address, namespace address).
    """
    prefix = ipaddress.IPv4Network(subnet).prefixlen
    host_ip, ns_ip = net_address(subnet, 1), net_address(subnet, 2)
    if ns not in netns_list():
        run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns])
    run(["ip", "addr", "add", f"{host_ip}/{prefix}", "dev", host_if])
    run(["ip", "link", "set", host_if, "up"])
    run(netns_exec(ns, "ip", "addr", "add", f"{ns_ip}/{prefix}", "dev", ns_if))
    run(netns_exec(ns, "ip", "link", "set", ns_if, "up"))
    run(netns_exec(ns, "ip", "link", "set", "lo", "up"))
    run(netns_exec(ns, "ip", "route", "add", "default", "via", host_ip))
    return host_ip, ns_ip


def add_ns_pair(ns_a: str, if_a: str, ns_b: str, if_b: str, subnet: str) -> tuple[str, str]:
    """A veth pair between two namespaces on a /30 ``subnet`` (``ns_a`` gets the first
    address, ``ns_b`` the second); returns both addresses."""
    prefix = ipaddress.IPv4Network(subnet).prefixlen
    ip_a, ip_b = net_address(subnet, 1), net_address(subnet, 2)
    run(["ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
         "netns", ns_b])  # fmt: skip
    for ns, dev, ip in ((ns_a, if_a, ip_a), (ns_b, if_b, ip_b)):
        run(netns_exec(ns, "ip", "addr", "add", f"{ip}/{prefix}", "dev", dev))
        run(netns_exec(ns, "ip", "link", "set", dev, "up"))
    return ip_a, ip_b


def iface_bytes(dev: str, ns: str | None = None) -> int:
    """Bytes both ways on ``dev`` (in namespace ``ns``), 0 if it is gone."""
    cmd = ["ip", "-j", "-s", "link", "show", "dev", dev]
    proc = run(netns_exec(ns, *cmd) if ns else cmd, check=False)
    try:
        (link,) = json.loads(proc.stdout or "[]")
        stats = link["stats64"]
        return int(stats["rx"]["bytes"]) + int(stats["tx"]["bytes"])
    except (ValueError, KeyError, TypeError):
        return 0


_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(ns: str | None) -> Iterator[None]:
    """Run the block in network namespace ``ns`` (this thread only; None: stay put).

    Sockets made inside keep that namespace when the block ends, so a sender on the machine
    can speak from an edge host's namespace as a process there would.
    """
    if ns is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as own, open(f"/run/netns/{ns}") as there:
        if libc.setns(there.fileno(), _CLONE_NEWNET) != 0:
            raise LabError(f"cannot enter netns {ns}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            if libc.setns(own.fileno(), _CLONE_NEWNET) != 0:  # pragma: no cover - fatal
                raise RuntimeError(f"cannot leave netns {ns}: {os.strerror(ctypes.get_errno())}")


def del_netns(ns: str) -> None:
    """Remove a namespace (its veth ends go with it) after killing what still runs in it."""
    if ns not in netns_list():
        return
    pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    run(["ip", "netns", "del", ns], check=False)


def del_link(name: str) -> None:
    if Path(f"/sys/class/net/{name}").exists():
        run(["ip", "link", "del", name], check=False)


def prefixed_links() -> list[str]:
    return sorted(p.name for p in Path("/sys/class/net").iterdir()
                  if p.name.startswith(PREFIX))  # fmt: skip


# ---------------------------------------------------------------------- shaping and loss
def shape(dev: str, rate: str, ns: str | None = None) -> None:
    """Limit ``dev``'s egress to ``rate`` (tc syntax, e.g. 100mbit) with a token bucket.

    The burst is sized for the rate (at least 32 KiB, about 4 ms worth) so a fast link is not
    throttled by the bucket, and the queue holds 50 ms so a slow one does not drop bulk data.
    """
    bits = parse_rate(rate)
    burst = max(32 * 1024, bits // 8 // 250)
    cmd = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
           "burst", str(burst), "latency", "50ms"]  # fmt: skip
    run(netns_exec(ns, *cmd) if ns else cmd)


def shaped_rate(dev: str, ns: str | None = None) -> int | None:
    """The rate (bit/s) ``dev``'s token bucket lets through now, or None if it is not shaped."""
    cmd = ["tc", "-j", "qdisc", "show", "dev", dev]
    proc = run(netns_exec(ns, *cmd) if ns else cmd, check=False)
    try:
        qdiscs = json.loads(proc.stdout or "[]")
    except ValueError:
        return None
    for q in qdiscs:
        if q.get("kind") == "tbf" and "rate" in q.get("options", {}):
            return int(q["options"]["rate"]) * 8  # tc -j gives bytes per second
    return None


def parse_rate(rate: str) -> int:
    """tc rate text to bits per second: 10mbit, 1gbit, 500kbit, 1000000 (bit/s)."""
    text = rate.strip().lower()
    for suffix, factor in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3), ("bit", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def set_loss(ns: str, percent: float) -> None:
    """Drop ``percent`` % of packets at random, both ways, inside namespace ``ns``.

    nftables' ``numgen random`` stands in for netem's loss, which this kernel lacks.  Only
    whole percent steps are possible; 0 removes the table.
    """
    run(netns_exec(ns, "nft", "delete", "table", "inet", NFT_TABLE), check=False)
    n = round(percent)
    if n <= 0:
        return
    ruleset = f"""table inet {NFT_TABLE} {{
    chain in {{ type filter hook input priority -300; numgen random mod 100 < {n} drop; }}
    chain out {{ type filter hook output priority -300; numgen random mod 100 < {n} drop; }}
}}
"""
    run(netns_exec(ns, "nft", "-f", "-"), input=ruleset)


# ---------------------------------------------------------------------- forwarding
def enable_forwarding(ns: str | None = None) -> None:
    if ns is None:
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    else:
        run(netns_exec(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"))


def _iptables(*args: str, check: bool = True,
              ns: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    cmd = ["iptables", "-w", "5", *args]
    return run(netns_exec(ns, *cmd) if ns else cmd, check=check)


NAT_RULE = ("POSTROUTING", "-s", LAB_RANGE, "-d", LAB_RANGE, "-m", "comment", "--comment",
            "qmig-lab", "-j", "RETURN")  # fmt: skip
FWD_RULE = ("FORWARD", "-s", LAB_RANGE, "-d", LAB_RANGE, "-m", "comment", "--comment",
            "qmig-lab", "-j", "ACCEPT")  # fmt: skip


def route_lab_range(ns: str | None = None) -> None:
    """Let lab hosts reach each other unchanged: forward, and never masquerade, within the range.

    Podman masquerades what leaves a container network; a broker that speaks first from a
    new address (announce) must reach clients with its own address, so lab-to-lab traffic
    skips NAT.  The rules carry the comment ``qmig-lab`` and go first in their chains: on the
    machine, or in namespace ``ns`` (an edge host with its own Podman; its rules go with it).
    """
    enable_forwarding(ns)
    for table, rule in (("nat", NAT_RULE), ("filter", FWD_RULE)):
        if _iptables("-t", table, "-C", *rule, check=False, ns=ns).returncode != 0:
            _iptables("-t", table, "-I", *rule, ns=ns)


def unroute_lab_range() -> None:
    for table, rule in (("nat", NAT_RULE), ("filter", FWD_RULE)):
        while _iptables("-t", table, "-C", *rule, check=False).returncode == 0:
            _iptables("-t", table, "-D", *rule, check=False)


# ---------------------------------------------------------------------- CRIU's network lock
def criu_lock_rules(pid: int) -> list[str]:
    """CRIU network-lock leftovers in the network namespace of process ``pid``."""
    found = []
    for tool in ("iptables", "ip6tables"):
        out = run(["nsenter", "-t", str(pid), "-n", tool, "-w", "5", "-S"], check=False).stdout
        found += [f"{tool} {line}" for line in out.splitlines() if "CRIU" in line]
    out = run(["nsenter", "-t", str(pid), "-n", "nft", "list", "tables"], check=False).stdout
    found += [line for line in out.splitlines() if "CRIU" in line.upper()]
    return found


def clear_criu_lock(pid: int) -> int:
    """Remove CRIU's network lock from the namespace of ``pid``; returns rules removed.

    A checkpoint (and a failed restore) leaves chains named CRIU that drop every packet, so
    the next container in that pod would be silently unreachable.
    """
    removed = 0
    for tool in ("iptables", "ip6tables"):
        ns = ["nsenter", "-t", str(pid), "-n", tool, "-w", "5"]
        rules = run([*ns, "-S"], check=False).stdout.splitlines()
        for line in rules:
            parts = line.split()
            if parts[:1] == ["-A"] and "CRIU" in parts and parts[1] != "CRIU":
                run([*ns, "-D", *parts[1:]], check=False)
                removed += 1
        if any(line.startswith("-N CRIU") for line in rules):
            run([*ns, "-F", "CRIU"], check=False)
            run([*ns, "-X", "CRIU"], check=False)
            removed += 1
    out = run(["nsenter", "-t", str(pid), "-n", "nft", "list", "tables"], check=False).stdout
    for line in out.splitlines():
        parts = line.split()  # "table inet CRIU-12345"
        if len(parts) == 3 and "CRIU" in parts[2].upper():
            run(["nsenter", "-t", str(pid), "-n", "nft", "delete", "table", parts[1], parts[2]],
                check=False)  # fmt: skip
            removed += 1
    return removed
