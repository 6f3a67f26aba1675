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
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .loadgen import connect_packet

HOST = "127.0.0.1"
BROKER_NAMES = ("qmig", "amqtt", "mosquitto")

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
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / (1024 * 1024)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; only this broker's own PID is signalled."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def unavailable_reason(name: str) -> str | None:
    """Why ``name`` cannot run here at all (None if it may), checked without starting it."""
    if name == "mosquitto":
        return None if _mosquitto_path() else "mosquitto binary not found"
    if name == "amqtt":
        return None if importlib.util.find_spec("amqtt") else "amqtt is not installed"
    if name == "qmig":
        return None
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
        if name == "qmig":
            from qmig import __version__

            return __version__
    except Exception:
        return None
    return None


def _command(name: str, port: int, workdir: Path) -> list[str]:
    if name == "qmig":
        return [
            sys.executable, "-m", "qmig", "broker", "--host", HOST, "--tcp-port", str(port),
            "--tls-port", "0", "--mptcp-port", "0", "--sys-interval", "0",
            "--log-level", "WARNING",
        ]
    if name == "amqtt":
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {
                "allow_anonymous": True,
            }},
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


def start_broker(name: str, workdir: Path, ready_timeout: float = 20.0) -> RunningBroker:
    """Start ``name`` on a free port and wait until it answers CONNECT; else BrokerUnavailable."""
    reason = unavailable_reason(name)
    if reason:
        raise BrokerUnavailable(reason)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = _command(name, port, workdir)
    log_path = workdir / f"{name}-{port}.log"
    root = str(Path(__file__).resolve().parents[2])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    broker = RunningBroker(name, port, proc, workdir, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerUnavailable(
                f"exited with code {proc.returncode}: {_tail(log_path) or 'no output'}"
            )
        if _mqtt_ready(port):
            return broker
        time.sleep(0.05)
    broker.stop()
    raise BrokerUnavailable(f"not answering CONNECT within {ready_timeout} s: {_tail(log_path)}")
