"""Start and stop each broker under test as its own process on a free loopback port.

Every broker gets a fresh process per test so that one test's backlog or heap growth never
leaks into the next figure.  Readiness is judged by a real MQTT CONNECT/CONNACK exchange,
not by a log line, because that is what the load generator needs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .loadgen import connect_packet

HOST = "127.0.0.1"
BROKER_NAMES = ("qmig", "qmig-quic", "qmig-bridge", "amqtt", "mosquitto")
QUIC_BROKERS = ("qmig-quic", "qmig-bridge")
"""qmig-quic: the load generator speaks MQTT over QUIC to qmig; qmig-bridge: plain TCP
clients go through ``qmig bridge``, which carries each connection over QUIC to qmig."""
PERSIST_BROKERS = {
    "qmig-persist": ("--persistence-sync", "batch"),
    "qmig-strict": ("--persistence-sync", "strict"),
}
"""qmig over TCP with ``--persistence`` in a fresh directory of the run (issue #18): batch
(the default sync) and strict; not in the default set, name them in ``--brokers``."""
ALL_BROKER_NAMES = (*BROKER_NAMES, *PERSIST_BROKERS)

# amqtt in a subprocess: quiet logging (a log line per packet would be measured too) and only
# the anonymous-auth plugin, so its figures are not taxed by the default logging plugins.
_AMQTT_LAUNCHER = """
import asyncio, json, logging, sys
logging.basicConfig(level=logging.WARNING)
logging.getLogger("transitions").setLevel(logging.WARNING)
from amqtt.broker import Broker

async def main():
    broker = Broker(json.loads(sys.argv[1]))
    await broker.start()
    print("amqtt ready", file=sys.stderr, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class BrokerUnavailable(Exception):
    """The broker could not be started here; the message says why."""


@dataclass
class RunningBroker:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    transport: str = "tcp"
    """How the load generator reaches ``port``: "tcp" or "quic"."""
    quic_port: int = 0
    """qmig's QUIC (UDP) port, 0 when it has no QUIC listener."""
    helpers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    """Extra processes on the message path (the bridge), measured for CPU like the broker."""
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.proc.pid)

    def helper_ps(self) -> dict[str, psutil.Process]:
        return {label: psutil.Process(p.pid) for label, p in self.helpers.items()}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / (1024 * 1024)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; only our own PIDs are signalled."""
        for proc in [*self.helpers.values(), self.proc]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def unavailable_reason(name: str) -> str | None:
    """Why ``name`` cannot run here at all (None if it may), checked without starting it."""
    if name == "mosquitto":
        return None if _mosquitto_path() else "mosquitto binary not found"
    if name == "amqtt":
        return None if importlib.util.find_spec("amqtt") else "amqtt is not installed"
    if name == "qmig" or name in PERSIST_BROKERS:
        return None
    if name in QUIC_BROKERS:
        return None if importlib.util.find_spec("aioquic") else "aioquic is not installed"
    return f"unknown broker {name!r}"


def _mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )


def version_of(name: str) -> str | None:
    """Best-effort version string for the machine section of the report."""
    try:
        if name == "mosquitto":
            path = _mosquitto_path()
            if not path:
                return None
            out = subprocess.run([path, "-h"], capture_output=True, text=True, timeout=5)
            first = (out.stdout or out.stderr).splitlines()
            return first[0].split("version", 1)[-1].strip() if first else None
        if name == "amqtt":
            from importlib.metadata import version

            return version("amqtt")
        if name == "qmig" or name in QUIC_BROKERS or name in PERSIST_BROKERS:
            from qmig import __version__

            return __version__
    except Exception:
        return None
    return None


def _command(
    name: str, port: int, workdir: Path, quic_port: int = 0, extra: Sequence[str] = ()
) -> list[str]:
    if extra and name not in ("qmig", *QUIC_BROKERS, *PERSIST_BROKERS):
        raise BrokerUnavailable(f"{name} takes no extra broker options")
    if name in PERSIST_BROKERS:
        store = workdir / f"store-{port}"
        extra = ["--persistence", str(store), *PERSIST_BROKERS[name], *extra]
    if name in ("qmig", *QUIC_BROKERS, *PERSIST_BROKERS):
        cmd = [
            sys.executable,
            "-m",
            "qmig",
            "broker",
            "--host",
            HOST,
            "--tcp-port",
            str(port),
            "--tls-port",
            "0",
            "--mptcp-port",
            "0",
            "--sys-interval",
            "0",
            "--log-level",
            "WARNING",
            "--quic-port",
            str(quic_port),
        ]
        if quic_port:
            from broker.certs import make_lab_certs

            certs = make_lab_certs(workdir / "certs")
            cmd += ["--cert", str(certs.server_cert), "--key", str(certs.server_key)]
        return cmd + list(extra)
    if name == "amqtt":
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {
                    "allow_anonymous": True,
                }
            },
        }
        return [sys.executable, "-c", _AMQTT_LAUNCHER, json.dumps(config)]
    if name == "mosquitto":
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listener {port} {HOST}",
                    "allow_anonymous true",
                    "persistence false",
                    # Stock Nagle setting on purpose: set_tcp_nodelay true sends one segment
                    # per message and cut mosquitto's QoS 0 figure from ~150k to ~100k msg/s
                    # here, while p99 latency at 200 msg/s stays ~0.3 ms either way.
                    # Queue enough that a flood measures throughput, not drops; the in-flight
                    # limit matches the load generator's QoS 1 window of 100.
                    "max_queued_messages 1000000",
                    "max_inflight_messages 100",
                    "max_connections -1",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "connection_messages false",
                    "",
                ]
            )
        )
        path = _mosquitto_path()
        if path is None:
            raise BrokerUnavailable("mosquitto binary not found")
        return [path, "-c", str(conf)]
    raise BrokerUnavailable(f"unknown broker {name!r}")


def _mqtt_ready(port: int) -> bool:
    """One CONNECT/CONNACK round trip: the listener is up and speaks MQTT."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as s:
            s.sendall(connect_packet("bench-probe"))
            data = s.recv(4)
            ok = len(data) >= 2 and data[0] == 0x20
            with contextlib.suppress(OSError):
                s.sendall(b"\xe0\x00")
            return ok
    except OSError:
        return False


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def start_broker(
    name: str,
    workdir: Path,
    ready_timeout: float = 20.0,
    extra: Sequence[str] = (),
    quic: bool = False,
) -> RunningBroker:
    """Start ``name`` on a free port and wait until it answers CONNECT; else BrokerUnavailable.

    For qmig-quic the returned port is qmig's QUIC port; for qmig-bridge it is the TCP port
    of a ``qmig bridge`` in front of it, ready once a CONNECT made it through the bridge.
    ``extra``: more ``qmig broker`` options; ``quic``: give plain qmig a QUIC listener too
    (its port in :attr:`RunningBroker.quic_port`, the returned port staying TCP's).
    """
    reason = unavailable_reason(name)
    if reason:
        raise BrokerUnavailable(reason)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    quic_port = free_udp_port() if name in QUIC_BROKERS or quic else 0
    cmd = _command(name, port, workdir, quic_port, extra)
    log_path = workdir / f"{name}-{port}.log"
    root = str(Path(__file__).resolve().parents[2])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    broker = RunningBroker(name, port, proc, workdir, log_path, quic_port=quic_port)
    _wait_ready(broker, port, proc, log_path, ready_timeout)
    if name == "qmig-quic":
        broker.port, broker.transport = quic_port, "quic"
    elif name == "qmig-bridge":
        bport = free_port()
        blog = workdir / f"bridge-{bport}.log"
        with open(blog, "wb") as log:
            broker.helpers["bridge"] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "qmig",
                    "bridge",
                    "--listen",
                    f"{HOST}:{bport}",
                    "--to",
                    f"{HOST}:{quic_port}",
                    "--insecure",
                    "--log-level",
                    "WARNING",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
            )
        broker.port = bport
        _wait_ready(broker, bport, broker.helpers["bridge"], blog, ready_timeout)
    return broker


def _wait_ready(
    broker: RunningBroker, port: int, proc: subprocess.Popen[bytes], log_path: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            broker.stop()
            raise BrokerUnavailable(
                f"exited with code {proc.returncode}: {_tail(log_path) or 'no output'}"
            )
        if _mqtt_ready(port):
            return
        time.sleep(0.05)
    broker.stop()
    raise BrokerUnavailable(f"not answering CONNECT within {timeout} s: {_tail(log_path)}")
